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
    time.sleep(0.5)
    assert asyncio.run(watcher.current()) == 1  # pinned: polling does not move it
    assert asyncio.run(watcher.reload()) == {"registry_version": 3, "previous_version": 1}
    assert asyncio.run(watcher.reload(7))["error"]["code"] == "no_such_version"


def test_an_empty_registry_is_a_clear_start_up_error(tmp_path):
    import pytest

    from factory.registry import NoCommittedVersion

    with pytest.raises(NoCommittedVersion, match="tokenfactory onboard"):
        RegistryWatcher.func_or_class(ServeSettings(registry=str(tmp_path), index="-", poll_s=0).model_dump())
