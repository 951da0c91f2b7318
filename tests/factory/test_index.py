"""The vector index: exact vs brute force, ANN vs exact, save/load on disk and on a real S3, and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factory import storage
from factory.errors import TokenFactoryError
from factory.index import (
    MANIFEST_NAME,
    CorruptIndex,
    DuplicateItemId,
    EmptyIndex,
    ExactIndex,
    IncompleteIndex,
    IndexDimensionMismatch,
    IndexNotFound,
    InvalidIndexParams,
    InvalidItems,
    VectorIndex,
    create_index,
    load_index,
)
from factory.index.faiss_backend import FaissIndex
from jobs.s3server import SeaweedS3

DIM = 64
BACKENDS = ["exact", "hnsw", "ivf"]


def clustered(n: int, dim: int = DIM, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """A Gaussian mixture: what image features look like far more than uniform noise does."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + 0.8 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(2000)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(100, seed=1)


@pytest.fixture(scope="module")
def exact_top10(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = ExactIndex(DIM)
    index.add(gallery, ids(len(gallery)))
    return index.search(queries, 10).indices


def ids(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def small_index(backend: str, n: int = 200, **params: object) -> VectorIndex:
    index = create_index(backend, DIM, **params)
    vectors = clustered(n, seed=3)
    index.add(vectors, ids(n), uris=[f"s3://gallery/{i}.png" for i in range(n)], metadata=[{"n": i} for i in range(n)])
    return index


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))


def test_exact_top_k_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    gallery, queries = rng.standard_normal((500, 32)), rng.standard_normal((20, 32))
    index = ExactIndex(32)
    index.add(gallery, ids(500))
    result = index.search(queries, 7)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cosine = q @ g.T
    truth = np.argsort(-cosine, axis=1)[:, :7]
    np.testing.assert_array_equal(result.indices, truth)
    np.testing.assert_allclose(result.scores, np.take_along_axis(cosine, truth, axis=1), atol=1e-5)
    assert result.scores.dtype == np.float32 and result.indices.dtype == np.int64


def test_exact_query_blocks_do_not_change_results(gallery: np.ndarray, queries: np.ndarray) -> None:
    whole, blocked = ExactIndex(DIM), ExactIndex(DIM, max_block_bytes=4 * len(gallery) * 3)  # 3 queries/block
    for index in (whole, blocked):
        for start in range(0, len(gallery), 500):  # added in batches, too
            index.add(gallery[start : start + 500], ids(500, prefix=f"b{start}"))
    np.testing.assert_array_equal(whole.search(queries, 10).indices, blocked.search(queries, 10).indices)


def test_hnsw_recall_at_10_against_exact(gallery: np.ndarray, queries: np.ndarray, exact_top10: np.ndarray) -> None:
    index = create_index("hnsw", DIM, ef_search=64)
    index.add(gallery, ids(len(gallery)))
    assert recall_at_10(index.search(queries, 10).indices, exact_top10) >= 0.95


def test_ivf_recall_at_10_against_exact(gallery: np.ndarray, queries: np.ndarray, exact_top10: np.ndarray) -> None:
    index = create_index("ivf", DIM, nlist=32, nprobe=12)
    index.add(gallery, ids(len(gallery)))
    assert recall_at_10(index.search(queries, 10).indices, exact_top10) >= 0.95


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_are_cosines_whatever_the_vector_lengths(backend: str) -> None:
    index = small_index(backend)
    vectors = clustered(200, seed=3)
    result = index.search(vectors[:5] * 1000.0, 1)  # each item, scaled, finds itself at cosine 1
    assert result.ids == [[f"img-{i:05d}"] for i in range(5)]
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)


def test_hits_carry_ids_uris_and_metadata() -> None:
    index = small_index("exact")
    hit = index.search(clustered(200, seed=3)[42], 3).hits(0)[0]
    assert (hit.id, hit.uri, hit.position, hit.metadata) == ("img-00042", "s3://gallery/42.png", 42, {"n": 42})


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_the_index_returns_every_item(backend: str) -> None:
    index = small_index(backend, n=50, **({"nprobe": 64} if backend == "ivf" else {}))
    result = index.search(clustered(3, seed=9), 500)
    assert result.scores.shape == result.indices.shape == (3, 50)
    assert all(sorted(row) == sorted(ids(50)) for row in result.ids)
    assert np.all(np.diff(result.scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip_local(backend: str, tmp_path: Path) -> None:
    index = small_index(backend)
    index.save(str(tmp_path / "idx"))
    loaded = load_index(str(tmp_path / "idx"))
    assert (type(loaded), loaded.backend, loaded.dim, len(loaded)) == (type(index), backend, DIM, 200)
    assert loaded.params == index.params
    assert list(loaded.ids) == list(index.ids) and list(loaded.uris) == list(index.uris)
    assert list(loaded.metadata) == list(index.metadata)
    q = clustered(10, seed=5)
    np.testing.assert_array_equal(loaded.search(q, 10).indices, index.search(q, 10).indices)


@pytest.mark.s3
@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_save_load_round_trip_on_s3(backend: str, s3_bucket: str, s3_server: SeaweedS3) -> None:
    index = small_index(backend)
    uri = f"{s3_bucket}/indexes/gallery"
    index.save(uri, s3=s3_server.s3_options)
    loaded = load_index(uri, s3=s3_server.s3_options)
    assert list(loaded.ids) == list(index.ids) and list(loaded.uris) == list(index.uris)
    q = clustered(10, seed=5)
    np.testing.assert_array_equal(loaded.search(q, 10).indices, index.search(q, 10).indices)


def test_search_params_are_saved_with_the_index(tmp_path: Path) -> None:
    index = small_index("hnsw", m=8, ef_construction=40)
    assert isinstance(index, FaissIndex)
    index.set_search_params(ef_search=123)
    index.save(str(tmp_path))
    loaded = load_index(str(tmp_path))
    assert loaded.params == {"m": 8, "ef_construction": 40, "ef_search": 123}
    assert loaded._index.hnsw.efSearch == 123  # type: ignore[attr-defined]


def test_ivf_saved_before_its_first_add_loads_and_trains_later(tmp_path: Path) -> None:
    create_index("ivf", DIM).save(str(tmp_path))
    loaded = load_index(str(tmp_path))
    loaded.add(clustered(400), ids(400))
    assert loaded.search(clustered(400)[7], 1).ids == [["img-00007"]]


def test_saving_over_an_index_replaces_it(tmp_path: Path) -> None:
    small_index("hnsw").save(str(tmp_path))
    small_index("exact", n=30).save(str(tmp_path))
    loaded = load_index(str(tmp_path))
    assert (loaded.backend, len(loaded)) == ("exact", 30)


def test_duplicate_id_of_an_indexed_item_is_rejected() -> None:
    index = small_index("exact")
    with pytest.raises(DuplicateItemId, match="img-00003"):
        index.add(clustered(1), ["img-00003"])


def test_duplicate_id_within_a_batch_is_rejected() -> None:
    with pytest.raises(DuplicateItemId, match="'a'"):
        create_index("hnsw", DIM).add(clustered(3), ["a", "b", "a"])


def test_a_rejected_add_leaves_the_index_unchanged() -> None:
    index = small_index("hnsw", n=20)
    with pytest.raises(DuplicateItemId):
        index.add(clustered(2), ["new-item", "img-00000"])
    assert len(index) == 20 and "new-item" not in index


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_of_the_wrong_dimension_are_rejected(backend: str) -> None:
    with pytest.raises(IndexDimensionMismatch, match="dimension 32 but the index has dimension 64"):
        create_index(backend, DIM).add(np.ones((4, 32), np.float32), ids(4))


def test_queries_of_the_wrong_dimension_are_rejected() -> None:
    with pytest.raises(IndexDimensionMismatch, match="queries have dimension 65"):
        small_index("exact").search(np.ones((2, 65), np.float32), 5)


def test_zero_and_non_finite_vectors_are_rejected() -> None:
    index = create_index("exact", DIM)
    bad = clustered(3)
    bad[1] = 0.0
    with pytest.raises(InvalidItems, match="zero length"):
        index.add(bad, ids(3))
    bad[1] = np.nan
    with pytest.raises(InvalidItems, match="NaN"):
        index.add(bad, ids(3))


def test_search_on_an_empty_index_raises_empty_index() -> None:
    with pytest.raises(EmptyIndex):
        create_index("exact", DIM).search(clustered(1), 5)


def test_unknown_backend_and_parameters_are_named() -> None:
    with pytest.raises(InvalidIndexParams, match="'annoy'"):
        create_index("annoy", DIM)
    with pytest.raises(InvalidIndexParams, match="nlist"):
        create_index("hnsw", DIM, nlist=10)


def test_a_half_written_folder_is_not_loadable(tmp_path: Path) -> None:
    small_index("exact").save(str(tmp_path))
    storage.delete(str(tmp_path / MANIFEST_NAME))  # as if the save died before its last write
    with pytest.raises(IncompleteIndex, match="did not finish"):
        load_index(str(tmp_path))


def test_a_missing_folder_is_index_not_found(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFound, match="no index at") as info:
        load_index(str(tmp_path / "nothing-here"))
    assert isinstance(info.value, TokenFactoryError) and isinstance(info.value, FileNotFoundError)


def test_data_changed_behind_the_manifest_is_corrupt(tmp_path: Path) -> None:
    small_index("exact").save(str(tmp_path))
    small_index("exact", n=10).save(str(tmp_path / "other"))
    (tmp_path / "items.parquet").write_bytes((tmp_path / "other" / "items.parquet").read_bytes())
    with pytest.raises(CorruptIndex, match="checksum"):
        load_index(str(tmp_path))


def test_metadata_that_is_not_json_is_rejected_at_add() -> None:
    with pytest.raises(InvalidItems, match="JSON"):
        create_index("exact", DIM).add(clustered(1), ["a"], metadata=[{"when": object()}])


def test_ann_slots_it_could_not_fill_are_marked_and_skipped() -> None:
    index = create_index("ivf", DIM, nlist=8, nprobe=1)  # one list of eight: cannot reach every item
    index.add(clustered(400), ids(400))
    result = index.search(clustered(1, seed=4), 400)
    missing = result.indices[0] < 0
    assert missing.any() and np.all(np.isneginf(result.scores[0][missing]))
    assert len(result.ids[0]) == len(result.hits(0)) == int((~missing).sum())


def test_exact_search_peak_memory_stays_within_its_block_budget():
    import tracemalloc

    n, dim, budget = 200_000, 8, 8 << 20
    rng = np.random.default_rng(0)
    index = ExactIndex(dim, max_block_bytes=budget)
    index.add(rng.standard_normal((n, dim)).astype(np.float32), [f"i{j}" for j in range(n)])
    index.vectors  # noqa: B018 (concatenate the added chunks before measuring)
    queries = rng.standard_normal((64, dim)).astype(np.float32)
    tracemalloc.start()
    try:
        index.search(queries, 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The [block, n] scores and argpartition's int64 indices together, not the scores alone, are the budget.
    assert peak <= 1.2 * budget, f"peak {peak / 2**20:.1f} MiB for a {budget / 2**20:.0f} MiB budget"


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_of_returns_the_stored_normalised_vectors(backend: str, tmp_path: Path) -> None:
    vecs = clustered(400)
    index = create_index(backend, DIM)
    index.add(vecs, [f"i{k}" for k in range(400)])
    expected = vecs[[7, 3, 399]] / np.linalg.norm(vecs[[7, 3, 399]], axis=1, keepdims=True)
    np.testing.assert_allclose(index.vectors_of(["i7", "i3", "i399"]), expected, atol=1e-5)
    index.save(str(tmp_path / "idx"))
    np.testing.assert_allclose(load_index(str(tmp_path / "idx")).vectors_of(["i3"]), expected[1:2], atol=1e-5)
    with pytest.raises(KeyError):
        index.vectors_of(["missing"])
