"""A replica's gallery follows the newest index version: searches never wait for a load or fail during a
swap, and a version that fails to load is skipped (on the plain class, no Serve needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from factory.index import create_index
from factory.index.versions import IndexVersions
from serve.deployments import GalleryFollower, gallery_hits

DIM = 16


def _index(n: int):
    index = create_index("exact", DIM)
    index.add(np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32), [f"i{k}" for k in range(n)])
    return index


def test_searches_go_on_while_a_new_version_swaps_in(tmp_path):
    versions = IndexVersions(str(tmp_path / "gallery"))
    versions.commit(_index(50))
    follower = GalleryFollower(versions.root, None, check_s=0.0)
    query = np.random.default_rng(1).standard_normal((1, DIM)).astype(np.float32)

    async def load():
        sizes, errors = [], []

        async def client():
            for _ in range(200):
                try:
                    index = follower.current()
                    assert len(gallery_hits(index, query, [5])[0]) == 5
                    sizes.append(len(index))
                except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                    errors.append(e)
                await asyncio.sleep(0.002)

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(versions.commit, _index(80))
        await asyncio.gather(*clients)
        return sizes, errors

    sizes, errors = asyncio.run(load())
    assert not errors and sizes[0] == 50 and sizes[-1] == 80 and follower.version == 2
    assert sizes == sorted(sizes)  # never back to the old version once swapped


def test_a_version_that_fails_to_load_is_skipped(tmp_path):
    versions = IndexVersions(str(tmp_path / "gallery"))
    versions.commit(_index(10))
    follower = GalleryFollower(versions.root, None, check_s=0.0)
    bad = versions.commit(_index(20))
    data = next(p for p in Path(versions.version_uri(bad)).iterdir() if p.suffix == ".npy")
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)  # the checksum no longer matches

    async def poll():
        for _ in range(20):
            follower.current()
            await asyncio.sleep(0.01)
        return follower.current()

    assert len(asyncio.run(poll())) == 10 and follower.version == 1 and bad in follower._bad


def test_a_single_saved_index_is_served_as_it_is(tmp_path):
    index = _index(7)
    index.save(str(tmp_path / "plain"))
    follower = GalleryFollower(str(tmp_path / "plain"), None, check_s=0.0)
    assert follower.versions is None and len(follower.current()) == 7
