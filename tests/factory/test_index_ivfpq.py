"""The IVF-PQ backend: compressed codes instead of vectors, a usable recall, save/load, and its parameter errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factory.index import FAISS_NAME, InvalidIndexParams, create_index, load_index
from factory.index.faiss_backend import default_pq_m
from tests.factory.test_index import DIM, clustered, ids, recall_at_10

N = 5000


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(N)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(100, seed=1)


@pytest.fixture(scope="module")
def ivfpq(gallery: np.ndarray):
    index = create_index("ivfpq", DIM, nlist=64, m=16, nprobe=16)
    index.add(gallery, ids(N), uris=[f"s3://gallery/{i}.png" for i in range(N)])
    return index


def test_recall_at_10_against_exact(ivfpq, gallery: np.ndarray, queries: np.ndarray) -> None:
    exact = create_index("exact", DIM)
    exact.add(gallery, ids(N))
    # 4 bytes of code per 16 dimensions, no re-rank: well below HNSW's recall, far above chance (10/5000).
    assert recall_at_10(ivfpq.search(queries, 10).indices, exact.search(queries, 10).indices) >= 0.55


def test_save_load_round_trip(ivfpq, queries: np.ndarray, tmp_path: Path) -> None:
    ivfpq.save(str(tmp_path))
    loaded = load_index(str(tmp_path))
    assert (loaded.backend, len(loaded), loaded.params) == ("ivfpq", N, ivfpq.params)
    assert list(loaded.uris) == list(ivfpq.uris)
    before, after = ivfpq.search(queries, 10), loaded.search(queries, 10)
    np.testing.assert_array_equal(after.indices, before.indices)
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)


def test_the_saved_index_holds_codes_not_vectors(ivfpq, tmp_path: Path) -> None:
    ivfpq.save(str(tmp_path))
    per_vector = (tmp_path / FAISS_NAME).stat().st_size / N
    # 16 code bytes + an 8-byte id per vector, plus the lists' centroids and the codebooks (~20 B/vector
    # here): a tenth of the 256 bytes of a float32 vector would already be stored uncompressed.
    assert per_vector < 64, per_vector


def test_search_params_are_saved_with_the_index(ivfpq, tmp_path: Path) -> None:
    ivfpq.set_search_params(nprobe=5)
    try:
        ivfpq.save(str(tmp_path))
        loaded = load_index(str(tmp_path))
        assert loaded.params["nprobe"] == 5 and loaded._index.nprobe == 5  # type: ignore[attr-defined]
    finally:
        ivfpq.set_search_params(nprobe=16)


def test_vectors_of_returns_the_codes_reconstruction(ivfpq, gallery: np.ndarray) -> None:
    stored = gallery[[3, 42]] / np.linalg.norm(gallery[[3, 42]], axis=1, keepdims=True)
    approx = ivfpq.vectors_of(["img-00003", "img-00042"])
    cosines = np.sum(approx * stored, axis=1) / np.linalg.norm(approx, axis=1)
    assert np.all(cosines > 0.9) and not np.allclose(approx, stored, atol=1e-4)  # close, but lossy


def test_m_that_does_not_divide_dim_is_refused() -> None:
    with pytest.raises(InvalidIndexParams, match="m=10 does not divide dim 64"):
        create_index("ivfpq", DIM, m=10)


def test_default_m_is_the_largest_divisor_up_to_an_eighth_of_dim() -> None:
    assert [default_pq_m(d) for d in (512, 64, 100, 7)] == [64, 8, 10, 1]
    assert create_index("ivfpq", 512).params["m"] == 64


def test_too_few_vectors_to_learn_the_codebooks_is_refused_and_changes_nothing() -> None:
    index = create_index("ivfpq", DIM, nlist=4)  # nbits 8: 256 centroids per sub-quantizer to learn
    with pytest.raises(InvalidIndexParams, match="at least that many vectors to train on"):
        index.add(clustered(100), ids(100))
    assert len(index) == 0


def test_train_size_below_nlist_is_refused() -> None:
    index = create_index("ivfpq", DIM, nlist=64, train_size=50)
    with pytest.raises(InvalidIndexParams, match="nlist=64 needs at least that many vectors"):
        index.add(clustered(1000), ids(1000))


def test_training_on_a_sample_still_indexes_every_vector(gallery: np.ndarray) -> None:
    index = create_index("ivfpq", DIM, nlist=16, m=16, train_size=1000)
    index.add(gallery, ids(N))
    assert len(index) == N and index.search(gallery[:20], 1).ids[7] == ["img-00007"]
