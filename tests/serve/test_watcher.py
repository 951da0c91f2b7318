"""The registry watcher's polling, on the deployment's class directly (no Serve needed)."""

from __future__ import annotations

import asyncio
import time

from serve.deployments import RegistryWatcher
from serve.settings import ServeSettings


def _commit(registry, run_id, make_token):
    from factory.registry import TokenRegistry

    writer = TokenRegistry(registry).begin(run_id, "fashion-mini", "fp-0123")
    writer.write_shard("a", [make_token(concept_id="sku-1", run_id=run_id)])
    return writer.commit()


def test_polling_follows_new_versions_unless_pinned(tmp_path, make_token):
    registry = str(tmp_path / "registry")
    _commit(registry, "run-1", make_token)
    cls = RegistryWatcher.func_or_class
    watcher = cls(ServeSettings(registry=registry, index="-", poll_s=0.1).model_dump())
    assert asyncio.run(watcher.current()) == 1
    _commit(registry, "run-2", make_token)
    deadline = time.monotonic() + 5
    while asyncio.run(watcher.current()) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asyncio.run(watcher.current()) == 2
    assert asyncio.run(watcher.reload(1)) == {"registry_version": 1, "previous_version": 2}  # pin an old one
    _commit(registry, "run-3", make_token)
    polls, deadline = watcher.polls, time.monotonic() + 5
    while watcher.polls < polls + 2 and time.monotonic() < deadline:  # a whole poll after the commit
        time.sleep(0.02)
    assert watcher.polls >= polls + 2
    assert asyncio.run(watcher.current()) == 1  # pinned: polling does not move it
    assert asyncio.run(watcher.reload()) == {"registry_version": 3, "previous_version": 1}
    assert asyncio.run(watcher.reload(7))["error"]["code"] == "no_such_version"


def test_an_empty_registry_is_a_clear_start_up_error(tmp_path):
    import pytest

    from factory.registry import NoCommittedVersion

    with pytest.raises(NoCommittedVersion, match="tokenfactory onboard"):
        RegistryWatcher.func_or_class(ServeSettings(registry=str(tmp_path), index="-", poll_s=0).model_dump())


def _corrupt(registry: str, version: int) -> None:
    """Flip the bytes of a committed version's data file: its manifest still parses, its checksum fails."""
    from pathlib import Path

    from factory.registry import TokenRegistry

    shard = next(Path(TokenRegistry(registry).version_uri(version)).glob("tokens-*.parquet"))
    shard.write_bytes(bytes(b ^ 0xFF for b in shard.read_bytes()))


def _until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_a_corrupt_newest_version_is_not_advanced_to(tmp_path, make_token, caplog):
    registry = str(tmp_path / "registry")
    _commit(registry, "run-1", make_token)
    watcher = RegistryWatcher.func_or_class(ServeSettings(registry=registry, index="-", poll_s=0.05).model_dump())
    _commit(registry, "run-2", make_token)
    _corrupt(registry, 2)
    with caplog.at_level("ERROR", logger="tokenfactory.serve"):
        assert _until(lambda: "fails verification" in caplog.text)
    assert asyncio.run(watcher.current()) == 1
    answer = asyncio.run(watcher.reload())
    assert answer["error"]["code"] == "version_unreadable" and asyncio.run(watcher.current()) == 1
    _commit(registry, "run-3", make_token)  # a good version after the bad one is followed
    assert _until(lambda: asyncio.run(watcher.current()) == 3)


def test_start_up_skips_a_corrupt_newest_version(tmp_path, make_token):
    registry = str(tmp_path / "registry")
    _commit(registry, "run-1", make_token)
    _commit(registry, "run-2", make_token)
    _corrupt(registry, 2)
    watcher = RegistryWatcher.func_or_class(ServeSettings(registry=registry, index="-", poll_s=0).model_dump())
    assert asyncio.run(watcher.current()) == 1


def test_a_replica_keeps_its_version_when_a_newer_one_fails_to_load(tmp_path, make_token):
    from serve.deployments import VersionFollower
    from serve.state import TokenState

    class Watcher:  # names version 2, which this replica cannot load
        class current:
            @staticmethod
            async def remote():
                return 2

    calls = []

    def load(version):
        calls.append(version)
        if version == 2:
            raise OSError("store outage")
        return TokenState(1, {}, {})

    follower = VersionFollower(Watcher(), load, check_s=0)
    for _ in range(20):
        assert asyncio.run(follower.state()).version == 1
    assert calls == [None, 2]  # one failed attempt, then the backoff: no reload storm
