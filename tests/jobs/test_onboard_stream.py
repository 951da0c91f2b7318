"""The pieces of streaming onboarding that need no cluster: packing, chunking and the bank sample."""

import json

import numpy as np

from factory.onboarding import chunks_by_parent
from jobs.onboard_data import EncodedConcept, bank_sample, chunk_rows, pack_many, unpack_many
from jobs.onboard_train import triage
from schemas import ConceptSpec


def _spec(cid, parent, n):
    return ConceptSpec(concept_id=cid, parent=parent, image_uris=[f"/x/{cid}-{i}.png" for i in range(n)])


def _concept(cid, n):
    return EncodedConcept(cid, "dress", np.zeros((n, 4), np.float32), rejected=[(f"/x/{cid}-bad.png", "corrupt")])


def test_pack_many_round_trips_any_shapes_in_order_without_pickle():
    arrays = [np.zeros((0, 8, 8, 3), np.uint8), np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(0, np.float32)]
    back = unpack_many(pack_many(arrays))
    assert len(back) == 3
    for a, b in zip(arrays, back):
        assert b.shape == a.shape and b.dtype == a.dtype and np.array_equal(a, b)


def test_chunks_are_formed_from_the_catalog_by_parent_then_id():
    specs = [_spec("b", "shirt", 1), _spec("z", "dress", 1), _spec("a", "shirt", 1)]
    rows = chunk_rows(chunks_by_parent(specs, 2))
    assert [(r["chunk"], json.loads(r["concept_id"]), json.loads(r["parent"])) for r in rows] == [
        ("z", ["z", "a"], ["dress", "shirt"]),
        ("b", ["b"], ["shirt"]),
    ]
    assert rows == chunk_rows(chunks_by_parent(list(reversed(specs)), 2))  # catalog order does not matter


def test_triage_sets_aside_concepts_with_too_few_images_and_notes_rejects():
    learn, note = triage([_concept("a", 3), _concept("b", 1), _concept("c", 2)], min_images=2, done=set())
    assert [c.concept_id for c in learn] == ["a", "c"]
    assert note["skipped"] == {"b": "only 1 usable image(s), need 2"} and len(note["rejected"]) == 3


def test_triage_drops_concepts_staged_by_an_earlier_attempt():
    learn, note = triage([_concept("done", 2), _concept("a", 2)], min_images=1, done={"done"})
    assert [c.concept_id for c in learn] == ["a"] and len(note["rejected"]) == 1


def test_bank_sample_keeps_every_chunk_of_a_small_parent():
    chunks = chunks_by_parent([_spec(f"c{i}", "dress", 3) for i in range(5)], 2)
    assert bank_sample(chunks, 100) == chunks


def test_bank_sample_is_bounded_per_parent_and_independent_of_order():
    specs = [_spec(f"c{i}", "dress", 4) for i in range(500)] + [_spec(f"s{i}", "shirt", 4) for i in range(500)]
    chosen = bank_sample(chunks_by_parent(specs, 4), 64)
    for parent in ("dress", "shirt"):
        images = sum(len(s.image_uris) for c in chosen for s in c if s.parent == parent)
        assert 64 <= images < 64 + 16  # stops at the first chunk that reaches the bound
    again = bank_sample(chunks_by_parent(list(reversed(specs)), 4), 64)
    assert [[s.concept_id for s in c] for c in again] == [[s.concept_id for s in c] for c in chosen]


def test_steady_rate_leaves_out_start_up_and_pools_workers():
    from jobs.onboard import steady_rate

    workers = [
        {"started": 0.0, "chunks": [(30.0, 4), (36.0, 4)]},  # start-up: 30 s to the first chunk end
        {"started": 1.0, "chunks": [(33.0, 4), (39.0, 4)]},
    ]
    rate, startup = steady_rate(workers)
    assert startup == 30.0 and rate == 12 / 9 * 60  # 12 concepts from t=30 to t=39
    assert steady_rate([{"started": 0.0, "chunks": [(5.0, 4)]}])[0] != steady_rate(workers)[0]  # NaN: one chunk
