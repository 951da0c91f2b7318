"""A gallery over shards: stable routing, a merge equal to the unsharded exact search, save/load with its
checksum chain, and the errors of a shard that is missing, altered or miscounted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factory.index import (
    MANIFEST_NAME,
    CorruptIndex,
    DuplicateItemId,
    IncompleteIndex,
    InvalidIndexParams,
    create_index,
    load_index,
)
from factory.index.sharded import (
    SHARDS_MANIFEST,
    ShardedIndex,
    load_shard,
    load_sharded_index,
    merge_hits,
    shard_of,
)
from tests.factory.test_index import DIM, clustered, ids

N = 600
EXPECTED_ROUTES = [3, 3, 2, 1, 2, 0, 1, 2]  # shard_of("img-0000<i>", 4), i = 0..7


def sharded(shards: int = 3, backend: str = "exact", n: int = N, **params) -> ShardedIndex:
    index = ShardedIndex.create(backend, DIM, shards, **params)
    index.add(
        clustered(n), ids(n), uris=[f"s3://gallery/{i}.png" for i in range(n)], metadata=[{"n": i} for i in range(n)]
    )
    return index


def test_merged_search_equals_one_exact_index() -> None:
    whole = create_index("exact", DIM)
    whole.add(clustered(N), ids(N))
    parts = sharded()
    q = clustered(30, seed=1)
    for k in (1, 10, 250):  # 250: more than any shard holds, so every shard answers with all it has
        merged, truth = parts.search(q, k), whole.search(q, k)
        assert merged.ids == truth.ids
        np.testing.assert_allclose(merged.scores, truth.scores, atol=1e-6)


def test_routing_is_stable_across_processes() -> None:
    # Fixed values: a change of hash would move every saved item to another shard.
    assert [shard_of(f"img-{i:05d}", 4) for i in range(8)] == EXPECTED_ROUTES
    code = "from factory.index.sharded import shard_of; print([shard_of(f'img-{i:05d}', 4) for i in range(8)])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert json.loads(out.stdout) == EXPECTED_ROUTES


def test_every_item_is_in_the_shard_its_id_routes_to() -> None:
    index = sharded(shards=4)
    assert all(shard_of(item, 4) == s for s, shard in enumerate(index.shards) for item in shard.ids)
    assert all(len(shard) > N // 8 for shard in index.shards)  # and the hash spreads them


def test_positions_ids_uris_and_vectors_agree() -> None:
    index = sharded()
    vecs = clustered(N)
    for item in ("img-00000", "img-00123", "img-00599"):
        pos = index.position(item)
        assert (index.ids[pos], index.uris[pos], index.metadata[pos]) == (
            item,
            f"s3://gallery/{int(item[4:])}.png",
            {"n": int(item[4:])},
        )
    expected = vecs[[123, 7]] / np.linalg.norm(vecs[[123, 7]], axis=1, keepdims=True)
    np.testing.assert_allclose(index.vectors_of(["img-00123", "img-00007"]), expected, atol=1e-6)
    assert list(index.ids) == [i for shard in index.shards for i in shard.ids] and len(index.ids) == N


def test_hits_carry_the_items_of_the_right_shard() -> None:
    index = sharded()
    hit = index.search(clustered(N)[42], 1).hits(0)[0]
    assert (hit.id, hit.uri, hit.metadata, hit.position) == (
        "img-00042",
        "s3://gallery/42.png",
        {"n": 42},
        index.position("img-00042"),
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = sharded()
    index.save(str(tmp_path))
    loaded = load_index(str(tmp_path))  # the generic loader recognises shards.json
    assert isinstance(loaded, ShardedIndex) and [len(s) for s in loaded.shards] == [len(s) for s in index.shards]
    q = clustered(10, seed=5)
    assert loaded.search(q, 10).ids == index.search(q, 10).ids
    assert list(loaded.uris) == list(index.uris)


def test_one_shard_loads_on_its_own(tmp_path: Path) -> None:
    index = sharded()
    index.save(str(tmp_path))
    shard = load_shard(str(tmp_path), 1, shards=3)
    assert list(shard.ids) == list(index.shards[1].ids)


def test_a_shard_count_other_than_the_configured_one_is_refused(tmp_path: Path) -> None:
    sharded().save(str(tmp_path))
    with pytest.raises(InvalidIndexParams, match="has 3 shards, but 2 were expected"):
        load_shard(str(tmp_path), 0, shards=2)
    with pytest.raises(InvalidIndexParams, match="shard 3 out of range"):
        load_shard(str(tmp_path), 3)


def test_a_missing_shard_is_corrupt(tmp_path: Path) -> None:
    sharded().save(str(tmp_path))
    shutil.rmtree(tmp_path / "shard-00001")
    with pytest.raises(CorruptIndex, match="shard 1 .* listed in shards.json but its index.json is missing"):
        load_sharded_index(str(tmp_path))


def test_a_shard_replaced_behind_the_manifest_is_corrupt(tmp_path: Path) -> None:
    sharded().save(str(tmp_path))
    other = create_index("exact", DIM)
    other.add(clustered(5), ids(5, prefix="other"))
    other.save(str(tmp_path / "shard-00002"))  # a valid index, but not the one shards.json vouches for
    with pytest.raises(CorruptIndex, match="shard 2 .* does not match the checksum in shards.json"):
        load_sharded_index(str(tmp_path))


def test_altered_data_of_a_shard_is_corrupt(tmp_path: Path) -> None:
    sharded().save(str(tmp_path))
    data = tmp_path / "shard-00000" / "vectors.npy"
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CorruptIndex, match="checksum"):
        load_sharded_index(str(tmp_path))


def test_a_save_that_did_not_finish_is_incomplete(tmp_path: Path) -> None:
    sharded().save(str(tmp_path))
    (tmp_path / SHARDS_MANIFEST).unlink()
    assert (tmp_path / "shard-00000" / MANIFEST_NAME).exists()
    with pytest.raises(IncompleteIndex, match="no shards.json"):
        load_sharded_index(str(tmp_path))


def test_a_rejected_add_leaves_every_shard_unchanged() -> None:
    index = sharded(n=50)
    before = [len(s) for s in index.shards]
    with pytest.raises(DuplicateItemId, match="img-00049"):
        index.add(clustered(3, seed=9), ["new-a", "new-b", "img-00049"])
    assert [len(s) for s in index.shards] == before and "new-a" not in index


def test_ivf_shards_share_one_trained_model() -> None:
    import faiss

    index = sharded(shards=3, backend="ivfpq", n=3000, nlist=16, m=8)
    centroids = [s._index.quantizer.reconstruct_n(0, 16) for s in index.shards]  # type: ignore[attr-defined]
    codebooks = [faiss.vector_to_array(s._index.pq.centroids) for s in index.shards]  # type: ignore[attr-defined]
    assert all(np.array_equal(c, centroids[0]) for c in centroids) and all(
        np.array_equal(c, codebooks[0]) for c in codebooks
    )


def test_sharded_ivfpq_finds_what_the_unsharded_index_finds() -> None:
    # One model and the same nprobe: every shard probes the lists the unsharded index probes, and the codes
    # score the same, so sharding changes where the work is done, not the answer.
    whole = create_index("ivfpq", DIM, nlist=16, m=8, nprobe=4)
    whole.add(clustered(3000), ids(3000))
    parts = sharded(shards=3, backend="ivfpq", n=3000, nlist=16, m=8, nprobe=4)
    q = clustered(50, seed=1)
    assert parts.search(q, 10).ids == whole.search(q, 10).ids


def test_an_add_too_small_to_train_on_leaves_every_shard_unchanged() -> None:
    index = ShardedIndex.create("ivf", DIM, 2, nlist=40)
    with pytest.raises(InvalidIndexParams, match="nlist=40 needs at least that many vectors"):
        index.add(clustered(30), ids(30))
    assert len(index) == 0 and all(s.needs_training for s in index.shards)  # type: ignore[attr-defined]


def test_shards_holding_items_of_another_route_are_refused() -> None:
    wrong = create_index("exact", DIM)
    item = next(i for i in ids(50) if shard_of(i, 2) == 1)
    wrong.add(clustered(1), [item])
    with pytest.raises(InvalidIndexParams, match="routes to shard 1"):
        ShardedIndex([wrong, create_index("exact", DIM)])


def test_ann_slots_a_shard_could_not_fill_stay_empty() -> None:
    index = sharded(shards=2, backend="ivf", n=800, nlist=8, nprobe=1)  # one list in eight per shard
    result = index.search(clustered(1, seed=4), 800)
    missing = result.indices[0] < 0
    assert missing.any() and np.all(np.isneginf(result.scores[0][missing]))
    assert len(result.ids[0]) == int((~missing).sum())


def test_merge_hits_keeps_each_querys_best_k_by_score() -> None:
    shard_a = [[("a1", None, 0.9), ("a2", None, 0.5)], [("a3", "u", 0.2)]]
    shard_b = [[("b1", None, 0.7)], [("b2", None, 0.8), ("b3", None, 0.1)]]
    assert merge_hits([shard_a, shard_b], [2, 3]) == [
        [("a1", None, 0.9), ("b1", None, 0.7)],
        [("b2", None, 0.8), ("a3", "u", 0.2), ("b3", None, 0.1)],
    ]
