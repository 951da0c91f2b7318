"""The pieces of streaming onboarding that need no cluster: packing, chunking and the bank sample."""
import numpy as np

from jobs.onboard_data import EncodedConcept, bank_sample, concept_rows, pack, unpack
from jobs.onboard_train import ChunkBuffer
from schemas import ConceptSpec


def _spec(cid, parent, n):
    return ConceptSpec(concept_id=cid, parent=parent, image_uris=[f"/x/{cid}-{i}.png" for i in range(n)])


def _concept(cid, n):
    return EncodedConcept(cid, "dress", np.zeros((n, 4), np.float32), rejected=[(f"/x/{cid}-bad.png", "corrupt")])


def test_pack_round_trips_any_shape_without_pickle():
    for a in (np.zeros((0, 8, 8, 3), np.uint8), np.arange(12, dtype=np.float32).reshape(3, 4)):
        b = unpack(pack(a))
        assert b.shape == a.shape and b.dtype == a.dtype and np.array_equal(a, b)


def test_concept_rows_are_sorted_by_parent_then_id():
    rows = concept_rows([_spec("b", "shirt", 1), _spec("z", "dress", 1), _spec("a", "shirt", 1)])
    assert [(r["parent"], r["concept_id"]) for r in rows] == [("dress", "z"), ("shirt", "a"), ("shirt", "b")]


def test_chunk_buffer_sets_aside_concepts_with_too_few_images():
    buf = ChunkBuffer(size=2, min_images=2, done=set())
    for cid, n in [("a", 3), ("b", 1), ("c", 2)]:
        buf.add(_concept(cid, n))
    assert [c.concept_id for c in buf.take()] == ["a", "c"]
    notes = buf.notes()
    assert notes["skipped"] == {"b": "only 1 usable image(s), need 2"} and len(notes["rejected"]) == 3
    assert buf.notes() == {"skipped": {}, "rejected": []}  # reported once


def test_chunk_buffer_holds_a_partial_chunk_until_the_end():
    buf = ChunkBuffer(size=2, min_images=1, done={"done"})
    buf.add(_concept("done", 2))  # staged by an earlier attempt: not learned again
    buf.add(_concept("a", 2))
    assert buf.take() == []
    assert [c.concept_id for c in buf.take(final=True)] == ["a"] and buf.take(final=True) == []


def test_bank_sample_keeps_every_concept_of_a_small_parent():
    specs = [_spec(f"c{i}", "dress", 3) for i in range(5)]
    assert {s.concept_id for s in bank_sample(specs, 100)} == {s.concept_id for s in specs}


def test_bank_sample_is_bounded_per_parent_and_independent_of_order():
    specs = [_spec(f"c{i}", "dress", 4) for i in range(500)] + [_spec(f"s{i}", "shirt", 4) for i in range(500)]
    chosen = bank_sample(specs, 64)
    for parent in ("dress", "shirt"):
        images = sum(len(s.image_uris) for s in chosen if s.parent == parent)
        assert 64 <= images < 64 + 4  # stops at the first concept that reaches the bound
    assert {s.concept_id for s in bank_sample(list(reversed(specs)), 64)} == {s.concept_id for s in chosen}


def test_steady_rate_leaves_out_start_up_and_pools_workers():
    from jobs.onboard import steady_rate

    workers = [{"started": 0.0, "chunks": [(30.0, 4), (36.0, 4)]},  # start-up: 30 s to the first chunk end
               {"started": 1.0, "chunks": [(33.0, 4), (39.0, 4)]}]
    rate, startup = steady_rate(workers)
    assert startup == 30.0 and rate == 12 / 9 * 60  # 12 concepts from t=30 to t=39
    assert steady_rate([{"started": 0.0, "chunks": [(5.0, 4)]}])[0] != steady_rate(workers)[0]  # NaN: one chunk
