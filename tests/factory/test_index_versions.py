"""Index versions: numbered, immutable, committed when their manifest is written; a claimed folder whose
save died is skipped; concurrent commits never share a number."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from factory import storage
from factory.index import IndexNotFound, create_index, load_index
from factory.index.versions import IndexVersions


def _index(ids):
    index = create_index("exact", 8)
    index.add(np.random.default_rng(len(ids)).standard_normal((len(ids), 8)).astype(np.float32), ids)
    return index


def test_commits_are_numbered_and_the_newest_is_loaded(tmp_path):
    versions = IndexVersions(str(tmp_path / "root"))
    with pytest.raises(IndexNotFound, match="--append"):
        versions.open()
    assert versions.commit(_index(["a"])) == 1 and versions.commit(_index(["a", "b"])) == 2
    assert versions.latest() == 2 and versions.open()[0] == 2 and sorted(versions.open(1)[1].ids) == ["a"]
    assert sorted(load_index(versions.root).ids) == ["a", "b"]


def test_a_claimed_version_without_a_manifest_is_skipped(tmp_path):
    versions = IndexVersions(str(tmp_path / "root"))
    versions.commit(_index(["a"]))
    storage.write_bytes(storage.join(versions.version_uri(2), "claim.json"), b'{"nonce": "dead"}')  # a build that died
    assert versions.latest() == 1 and versions.versions() == [1]
    assert versions.commit(_index(["a", "b"])) == 3  # the dead number is never reused


def test_concurrent_commits_get_distinct_versions(tmp_path):
    versions, got = IndexVersions(str(tmp_path / "root")), []
    threads = [threading.Thread(target=lambda i=i: got.append(versions.commit(_index([f"x{i}"])))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and versions.versions() == [1, 2, 3, 4, 5, 6]
