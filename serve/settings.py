"""How the service is configured: where tokens and the gallery live, which backbone, limits, security.

One pydantic model, so the same settings come from `tokenfactory serve` flags or from the ``args`` of a
Serve config file (``serve deploy``), and a typo in either is an error at start-up, not a silent default.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from factory.errors import ConfigError, TokenFactoryError

# Where a replica computes: "auto" is its GPU when Ray reserved one for it (``num_gpus`` in the Serve
# config) and torch sees it, else the CPU (`serve.deployments.replica_device`).
DEVICES = ("auto", "cpu", "cuda")
# The keys of `factory.device.PRECISIONS` (a test keeps them equal), spelled out because this module is
# imported when `tokenfactory serve`'s flags are registered, and that must not import torch.
PRECISION_NAMES = ("fp32", "bf16", "fp16")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class Limits(BaseModel):
    """Per-request limits: anything above is refused with a 4xx naming the limit."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: PositiveInt = 8 << 20  # /v1/classify: a 4 Mpx PNG fits; base64 adds a third
    max_json_bytes: PositiveInt = 64 << 10  # every other route: prompts and ids only, refused before parsing
    max_image_pixels: PositiveInt = 4096 * 4096
    max_prompt_chars: PositiveInt = 500
    max_top_k: PositiveInt = 100
    max_images: PositiveInt = 8  # `n` of /v1/generate
    max_steps: PositiveInt = 100  # DDIM steps of /v1/generate and /v1/gair
    max_previews: PositiveInt = 4  # GAIR previews per α
    max_alphas: PositiveInt = 11
    max_concepts: PositiveInt = 4  # concept ids of one GAIR request
    timeout_s: PositiveFloat = 60.0  # encoders and index
    generation_timeout_s: PositiveFloat = 300.0  # generate and GAIR (CPU sampling is slow)
    # Cost: UNet passes one request may buy (generate: n × steps × 2 with guidance; GAIR: previews × α × steps × 2).
    max_unet_passes: PositiveInt = 400
    # Abuse resistance, per client (API key, else address) and route class: cheap = classify, retrieve,
    # tokens; costly = generate, GAIR. A request over its rate or over the class's concurrency cap is a 429
    # with Retry-After; past ``max_queued_requests`` Serve itself answers a fast 503.
    cheap_per_s: PositiveFloat = 50.0
    cheap_burst: PositiveInt = 100
    costly_per_s: PositiveFloat = 0.2
    costly_burst: PositiveInt = 2
    max_concurrent_cheap: PositiveInt = 64
    max_concurrent_costly: PositiveInt = 2
    max_queued_requests: PositiveInt = 64
    # The edge (`serve.edge`), checked from the headers before a body is read: requests one address may
    # have in flight at once (a 429 beyond), and the time the whole body may take to arrive (a 408 and the
    # connection closed beyond), so slow-drip clients cannot hold the ingress's slots.
    max_in_flight_per_address: PositiveInt = 32
    body_timeout_s: PositiveFloat = 10.0


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: str = Field(description="token registry root URI")
    index: str = Field(
        description="gallery index URI (written by `tokenfactory index`): a saved index, or a root of "
        "index versions (`--append`), whose newest version is served and followed"
    )
    index_check_s: float = Field(
        default=5.0, ge=0, description="seconds between looks for a newer gallery index version (a versions root only)"
    )
    gallery_shards: PositiveInt = Field(
        default=1,
        description="above 1: ``index`` is a sharded index (`factory.index.sharded`) of this many shards; "
        "each shard is its own GalleryIndex deployment (GalleryIndexShard<i>, replicas hold one shard) and the ingress "
        "asks them all and merges. Not followed for new versions; the Generator (GAIR) loads the whole sharded index",
    )
    backbone: str | dict[str, Any] = Field(
        default="fashion-mini", description="a registered name, a config file/URI, or a resolved config (a dict)"
    )
    weights: str | None = None
    api_key_env: str | None = Field(default=None, description="env var holding the clients' API key (--require-key)")
    require_key: bool = Field(default=False, description="require the clients' API key on every /v1 route")
    admin_key_env: str | None = Field(
        default=None, description="env var holding the admin key of /v1/admin/*; unset: admin API off"
    )
    image_uri_prefixes: list[str] = Field(
        default_factory=list, description="s3:// prefixes `image_uri` may read from; empty (default): image_uri is off"
    )
    poll_s: float = Field(
        default=30.0, ge=0, description="seconds between checks for a newer registry version (0: off)"
    )
    version_check_s: float = Field(
        default=0.5, ge=0, le=10, description="how stale a replica's idea of the served version may be"
    )
    max_batch_size: PositiveInt = 32  # @serve.batch of the ingress, the encoders and the index (1: no batching)
    batch_wait_s: float = Field(default=0.005, ge=0)
    threads: PositiveInt = 1  # torch threads per replica
    device: Literal[DEVICES] = Field(
        default="auto",
        description="where replicas compute: 'auto' (a replica's GPU when Ray gave it one, e.g. the "
        "Generator's num_gpus in serve/configs/cluster.yaml, else the CPU), 'cpu', or 'cuda' (every replica, whether "
        "or not Ray accounted a GPU to it; an error where torch sees none)",
    )
    precision: Literal[PRECISION_NAMES] = Field(
        default="fp32",
        description="precision of the backbone's weights in every replica (tokens and answers stay "
        "fp32); bf16 halves a GPU replica's memory, but is slower than fp32 on CPUs",
    )
    # Samplings a Generator replica runs at once; more wait their turn (still cancellable). On a CPU, two
    # concurrent samplings only split the cores between them and take the cheap routes' share too; a GPU
    # runs one kernel stream at a time anyway. The costly-class cap still bounds how many may wait.
    sampling_concurrency: PositiveInt = 1
    replica_env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables set in every replica (e.g. the S3 endpoint of a local store); the "
        "settings are visible in Serve's config, so put real secrets in the cluster's environment instead",
    )
    s3_env_file: str | None = Field(
        default=None,
        description="a JSON file (owner-only) of S3 environment variables the replicas read: keys "
        "stay out of the Serve config, which anyone who can read the cluster's config store can see",
    )
    limits: Limits = Field(default_factory=Limits)
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS),
        min_length=1,
        description="Host header names the service answers (others get 400): against DNS rebinding. Loopback "
        "names by default; behind a proxy or on a cluster, the names clients use ('*.example.com' for subdomains)",
    )
    docs: bool = Field(
        default=False,
        description="serve /docs: the routes as a plain page (no scripts, no CDN); /openapi.json is served either way",
    )

    def __init__(self, **data: Any):
        # Checked before pydantic's own validation so that a bad value from a flag or a Serve config's
        # ``args`` is the project's ConfigError (one line from the CLI, naming the choices), not a
        # ValidationError dump; the Literal types keep `model_validate` strict as well.
        for name, allowed in (("device", DEVICES), ("precision", PRECISION_NAMES)):
            if name in data and data[name] not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {data[name]!r}")
        super().__init__(**data)
        if self.require_key and not self.api_key_env:
            # Without it there is no key to require, and the service would answer everyone (audit N13).
            raise ConfigError(
                "require_key needs api_key_env (--api-key-env VAR): the environment variable holding the clients' key"
            )

    def s3(self):
        """The S3 options of this service: the process environment, overlaid with ``s3_env_file``."""
        import json

        from factory.storage import S3Options

        if not self.s3_env_file:
            return S3Options.from_env()
        with open(self.s3_env_file) as f:
            return S3Options.from_env({**os.environ, **json.load(f)})

    def api_key_digest(self) -> str | None:
        """sha256 of the clients' API key read from ``api_key_env`` now (in the process building the app).

        Replicas get the digest, never the key: the settings travel through Ray and Serve's config
        store, where a plain secret would be readable by anyone who can read the config.
        """
        return _digest(self.api_key_env, "--api-key-env")

    def admin_key_digest(self) -> str | None:
        """sha256 of the admin key (``admin_key_env``); it must differ from the clients' key."""
        digest = _digest(self.admin_key_env, "--admin-key-env")
        if digest is not None and digest == self.api_key_digest():
            raise ValueError("the admin key equals the clients' API key: give the admin API a key of its own")
        return digest

    def check_exposure(self, host: str) -> None:
        """Refuse to bind beyond loopback unless every /v1 route needs a key."""
        if not is_loopback(host) and not (self.require_key and self.api_key_env):
            raise ExposureRefused(
                f"binding {host!r} exposes the service beyond this machine: start it with "
                "--require-key and --api-key-env VAR (and --admin-key-env for the admin API)"
            )


class ExposureRefused(TokenFactoryError, ValueError):
    """A service that would answer anyone on the network without a key."""

    http_status, code = 500, "exposure_refused"


def is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def _digest(env: str | None, flag: str) -> str | None:
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ValueError(f"{flag} {env}: that environment variable is empty or unset")
    if len(key) < 16:
        raise ValueError(f"the key in ${env} is shorter than 16 characters: use a random key")
    return hashlib.sha256(key.encode()).hexdigest()


def configure_batching(s: ServeSettings, *methods) -> None:
    """Apply the settings' batch size and wait to a replica's @serve.batch methods (1: no batching)."""
    for m in methods:
        m.set_max_batch_size(s.max_batch_size)
        m.set_batch_wait_timeout_s(s.batch_wait_s)
