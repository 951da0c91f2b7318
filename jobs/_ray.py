"""Joining Ray, written once for every job and command that needs a cluster.

``RAY_ADDRESS`` set (``ray job submit``, a cluster node): join that cluster; unset: start a local one.
Usage stats are off unless the environment says otherwise (nothing leaves the machine by default). A
process that is already connected (a test's cluster, the demo, a benchmark) keeps its connection.
"""

from __future__ import annotations

import os


def connect(dashboard: bool = False) -> None:
    """Connect this process to Ray (see the module's docstring); a no-op when it already is.

    ``dashboard``: start the dashboard with a local cluster, on loopback only (127.0.0.1:8265), for the
    long training jobs (onboard, pretrain) whose progress and workers it shows; a cluster joined at
    ``RAY_ADDRESS`` has its own.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    extra = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if dashboard else {}
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING", **extra)


__all__ = ["connect"]
