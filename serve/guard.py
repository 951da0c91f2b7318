"""Admission control of the ingress: who may call what, how often, how many at once, at what cost.

Two route classes, because their costs differ by three orders of magnitude: *cheap* (classify, retrieve,
tokens: milliseconds) and *costly* (generate, GAIR: hundreds of UNet passes). Each client (its API key,
else its address) has a token bucket per class, and each class a cap on requests in flight across all
clients; either one exceeded is a 429 with ``Retry-After``, answered at once, so one client flooding GAIR
never makes classify wait. Plain Python (no Ray, no FastAPI), so it is tested directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from serve.api import ApiError
from serve.settings import Limits

log = logging.getLogger(__name__)

CHEAP, COSTLY = "cheap", "costly"


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: int
    tokens: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self):
        self.tokens, self.stamp = float(self.burst), time.monotonic()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Admission:
    """Rate limits per (client, class) and concurrency caps per class (see the module docstring)."""

    MAX_CLIENTS = 10_000  # buckets kept; the oldest are dropped (a full bucket is the same as none)

    def __init__(self, limits: Limits):
        self.rates = {
            CHEAP: (limits.cheap_per_s, limits.cheap_burst),
            COSTLY: (limits.costly_per_s, limits.costly_burst),
        }
        self.caps = {CHEAP: limits.max_concurrent_cheap, COSTLY: limits.max_concurrent_costly}
        self.in_flight = {CHEAP: 0, COSTLY: 0}
        self.buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, client: str, kind: str) -> TokenBucket:
        key = (client, kind)
        bucket = self.buckets.pop(key, None) or TokenBucket(*self.rates[kind])
        self.buckets[key] = bucket  # most recently used last
        if len(self.buckets) > self.MAX_CLIENTS:
            self.buckets.pop(next(iter(self.buckets)))
        return bucket

    @contextlib.contextmanager
    def admit(self, client: str, kind: str):
        wait = self._bucket(client, kind).take()
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"too many {kind} requests from this client; retry in {wait:.1f}s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if self.in_flight[kind] >= self.caps[kind]:
            raise ApiError(
                429,
                "busy",
                f"{self.caps[kind]} {kind} requests are already running; retry shortly",
                headers={"Retry-After": "1" if kind == CHEAP else "5"},
            )
        self.in_flight[kind] += 1
        try:
            yield
        finally:
            self.in_flight[kind] -= 1


def unet_passes(n: int, steps: int, guidance: float) -> int:
    """UNet forward passes of one sampling call: classifier-free guidance doubles them."""
    return n * steps * (2 if guidance != 1.0 else 1)


def check_cost(passes: int, limits: Limits) -> None:
    if passes > limits.max_unet_passes:
        raise ApiError(
            422,
            "over_budget",
            f"the request needs {passes} UNet passes; the limit per request is "
            f"{limits.max_unet_passes}: fewer images, previews, alphas or steps",
        )


def read_allowed_image(uri: str, prefixes, s3, limit: int) -> bytes:
    """An image the server reads on a client's behalf (``image_uri``): only under ``prefixes`` (none by
    default), at most ``limit`` + 1 bytes read, one 404 for "absent" and "not allowed" so the store's
    contents cannot be probed through the service, and 503 when the store itself is unreachable."""
    from factory import storage
    from factory.storage import NotFoundInStorage, StorageError

    unavailable = ApiError(404, "image_unavailable", "no readable image at that image_uri")
    if len(uri) > 1024 or not uri.startswith("s3://") or ".." in uri.split("/"):
        raise unavailable
    if not any(uri.startswith(p.rstrip("/") + "/") for p in prefixes):
        raise unavailable
    try:
        data = storage.read_bytes(uri, s3, limit + 1)
    except NotFoundInStorage:
        raise unavailable from None
    except StorageError as e:
        if "ACCESS_DENIED" in str(e) or "403" in str(e):
            raise unavailable from None
        log.error("image store unreachable for %s: %s", uri, e)
        raise ApiError(503, "store_unavailable", "the image store is unreachable; retry later") from None
    if len(data) > limit:
        raise ApiError(413, "request_too_large", f"the image at image_uri is over {limit} bytes")
    return data
