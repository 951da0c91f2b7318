"""Building, starting and stopping the application.

``build_app(settings)`` wires the deployments; ``app_builder(args)`` is the ``import_path`` target of the
Serve config files in ``serve/configs/`` (``serve deploy serve/configs/local.yaml``), with ``args`` being
`ServeSettings` fields; ``start``/``stop`` run it on the connected Ray cluster for `tokenfactory serve`,
the demo and the tests.
"""

from __future__ import annotations

import logging
import time

import ray
from ray import serve
from ray.serve import Application

from serve.deployments import GalleryIndex, Generator, ImageEncoder, RegistryWatcher, TextEncoder
from serve.ingress import Ingress
from serve.settings import LOOPBACK_HOSTS, ServeSettings, is_loopback

log = logging.getLogger("tokenfactory.serve")
APP_NAME = "tokenfactory"


def build_app(settings: ServeSettings) -> Application:
    digest = settings.api_key_digest()  # read here, in the process that has the key; replicas get a hash
    admin = settings.admin_key_digest()
    cfg = settings.model_dump()

    def d(deployment):
        if not settings.replica_env:
            return deployment
        options = {**(deployment.ray_actor_options or {}), "runtime_env": {"env_vars": dict(settings.replica_env)}}
        return deployment.options(ray_actor_options=options)

    watcher = d(RegistryWatcher).bind(cfg)
    # A sharded gallery: one deployment per shard (each scales on its own), the ingress fans out to all.
    gallery = (
        d(GalleryIndex).bind(cfg)
        if settings.gallery_shards == 1
        else [
            d(GalleryIndex).options(name=f"GalleryIndexShard{i}").bind(cfg, i) for i in range(settings.gallery_shards)
        ]
    )
    # Past max_queued_requests waiting for the ingress, Serve answers 503 at once instead of queueing.
    ingress = d(Ingress).options(max_queued_requests=settings.limits.max_queued_requests)
    return ingress.bind(
        cfg,
        digest,
        d(TextEncoder).bind(cfg, watcher),
        d(ImageEncoder).bind(cfg),
        gallery,
        d(Generator).bind(cfg, watcher),
        watcher,
        admin,
    )


def app_builder(args: dict) -> Application:
    """Entry point of ``serve deploy`` / ``serve run serve.app:app_builder registry=… index=…``."""
    return build_app(ServeSettings(**args))


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, ready_timeout_s: float = 300.0) -> str:
    """Run the app on the connected Ray cluster; returns its URL once ``/readyz`` answers 200.

    Refuses a host beyond loopback unless every route needs a key (`ServeSettings.check_exposure`)."""
    import httpx

    settings.check_exposure(host)
    for attempt in range(3):  # a proxy that misses Serve's 60 s start-up deadline on a loaded machine is retried
        try:
            serve.start(http_options={"host": host, "port": port})
            break
        except ray.exceptions.ActorDiedError:
            if attempt == 2:
                raise
            serve.shutdown()
    if not is_loopback(host) and set(settings.allowed_hosts) <= set(LOOPBACK_HOSTS):
        log.warning(
            "bound to %s but allowed_hosts is loopback only: clients reaching it by another name get 400 "
            "(set allowed_hosts to the names they use)",
            host,
        )
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    # The edge answers only the allowed Host names: the readiness probe uses one of them, whatever the address.
    probe = {"Host": settings.allowed_hosts[0].replace("*", "ready")} if settings.allowed_hosts else {}
    deadline = time.monotonic() + ready_timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=10.0, headers=probe)
            if r.status_code == 200:
                return url
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"the service at {url} was not ready after {ready_timeout_s:.0f}s (last answer: {last})")


def stop() -> None:
    serve.delete(APP_NAME)
    serve.shutdown()
