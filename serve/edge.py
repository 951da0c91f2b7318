"""The edge of the ingress: everything decided from a request's headers alone, before its body is read.

A request is checked in this order, and refused at the first failure with the one error envelope
(`serve.api.ApiError`):

1. ``Host`` is on the allow-list (400 ``bad_host``): a page on another origin cannot reach the service
   through DNS rebinding.
2. Requests in flight from its address are under ``max_in_flight_per_address`` (429 ``too_many_in_flight``).
3. The key the route needs, from ``Authorization`` (401 ``unauthorized``; 403 ``admin_disabled``).
4. Admission: the client's token bucket and the route class's concurrency cap (`serve.guard.Admission`,
   429 with ``Retry-After``).
5. Only then the body is read: at most the route's size limit (413) within ``body_timeout_s`` for the
   whole body (408, and the connection is closed).

Why before the body: FastAPI reads and parses the whole body before a route's code runs, so a key checked
in the route lets a keyless client hold a slot of the ingress for as long as it takes to drip its body in,
and make the ingress parse 8 MiB of JSON it was never going to answer (audit N1, N2). Here a keyless or
over-limit request is answered at once, its body unread.

Every response, the refusals included, also carries the browser hardening headers (`SECURITY_HEADERS`).
A pure ASGI middleware (Starlette's BaseHTTPMiddleware reads bodies and buffers responses). Plain Python
apart from Starlette's header parsing, so it is tested on its own app (`tests/serve/test_edge.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import re

from starlette.datastructures import Headers

from serve.api import ApiError
from serve.guard import CHEAP, COSTLY, Admission
from serve.settings import ServeSettings

# Same origin only: scripts, styles, fetches and frames from the service itself; images also from the
# blob: URLs (thumbnails fetched with the key) and data: URLs (GAIR previews) the studio makes. No page
# may frame the studio (clickjacking). The studio has no inline script or style (serve/static/).
CSP = "default-src 'self'; frame-ancestors 'none'; img-src 'self' blob: data:"
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)

CLIENT, ADMIN = "client", "admin"
# (method, path pattern) → (the key it needs, its admission class) of the metered routes. Any other /v1 path
# needs the clients' key too (so a route added later is never open by omission), /v1/admin/* the admin key,
# except /v1/auth, which reports on the key itself. Health, readiness, the studio's static files and the
# OpenAPI document need no key. Path parameters match what Starlette's `{name}` matches (no "/").
ROUTES = [
    ("POST", r"/v1/classify", CLIENT, CHEAP),
    ("POST", r"/v1/retrieve", CLIENT, CHEAP),
    ("POST", r"/v1/generate", CLIENT, COSTLY),
    ("POST", r"/v1/gair", CLIENT, COSTLY),
    ("GET", r"/v1/tokens", CLIENT, CHEAP),
    ("GET", r"/v1/tokens/[^/]+", CLIENT, CHEAP),
    ("GET", r"/v1/tokens/[^/]+/thumbnails/[^/]+", CLIENT, CHEAP),
    ("GET", r"/v1/items/[^/]+/thumbnail", CLIENT, CHEAP),
]
_ROUTES = [(m, re.compile(p), key, kind) for m, p, key, kind in ROUTES]
IMAGE_ROUTES = ("/v1/classify",)  # the routes that take `max_request_bytes`; the others `max_json_bytes`


def route_needs(method: str, path: str) -> tuple[str | None, str | None]:
    """(key needed: CLIENT, ADMIN or None; admission class: CHEAP, COSTLY or None) of a request."""
    method = "GET" if method == "HEAD" else method  # a HEAD costs what its GET costs
    for m, pattern, key, kind in _ROUTES:
        if m == method and pattern.fullmatch(path):
            return key, kind
    if path == "/v1/auth":
        return None, None
    if path.startswith("/v1/admin/"):
        return ADMIN, None
    if path.startswith("/v1/") or path == "/v1":
        return CLIENT, None
    return None, None


def host_name(host: str) -> str:
    """The name of a ``Host`` header without its port, lower case: ``[::1]:8000`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed) -> bool:
    """Whether a ``Host`` header is on the allow-list: exact names, ``*.example.com`` for its subdomains,
    ``*`` for any. An absent or empty header is refused (HTTP/1.1 requires it)."""
    name = host_name(host)
    if not name:
        return False
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def key_digest_of(authorization: str) -> str | None:
    scheme, _, key = authorization.partition(" ")
    return hashlib.sha256(key.strip().encode()).hexdigest() if scheme.lower() == "bearer" and key.strip() else None


class EdgePolicy:
    """What the edge checks, for one ingress replica: its settings, key digests, admission state and the
    requests in flight per address. The same object answers `authorise` for the routes that need it."""

    def __init__(
        self,
        settings: ServeSettings,
        key_digest: str | None,
        admin_digest: str | None,
        admission: Admission | None = None,
    ):
        self.s, self.limits = settings, settings.limits
        self.key_digest, self.admin_digest = key_digest, admin_digest
        self.admission = admission or Admission(self.limits)
        self.in_flight: dict[str, int] = {}

    def authorise(self, authorization: str, address: str, needed: str | None) -> str:
        """Check the key ``needed`` (CLIENT, ADMIN or None); returns who asks (for rate limits): a key
        digest's prefix, or the address when no key is needed."""
        if needed == ADMIN and self.admin_digest is None:
            raise ApiError(403, "admin_disabled", "the admin API is off: start the service with --admin-key-env")
        digest = (
            self.admin_digest
            if needed == ADMIN
            else (self.key_digest if needed == CLIENT and self.s.require_key else None)
        )
        if digest is not None:
            sent = key_digest_of(authorization)
            if sent is None:
                raise ApiError(401, "unauthorized", "send the API key as 'Authorization: Bearer <key>'")
            if not hmac.compare_digest(sent, digest):  # constant time: no timing oracle on the key
                raise ApiError(401, "unauthorized", "wrong API key")
            return "key:" + sent[:16]
        return "addr:" + address

    @contextlib.contextmanager
    def slot(self, address: str):
        """One of the address's ``max_in_flight_per_address`` slots, for the whole request."""
        cap = self.limits.max_in_flight_per_address
        if self.in_flight.get(address, 0) >= cap:
            raise ApiError(
                429,
                "too_many_in_flight",
                f"{cap} requests from this address are already in flight; retry when one has finished",
                headers={"Retry-After": "1"},
            )
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        try:
            yield
        finally:
            left = self.in_flight[address] - 1
            if left:
                self.in_flight[address] = left
            else:
                del self.in_flight[address]  # the table holds only addresses with requests in flight

    def body_limit(self, path: str) -> int:
        return self.limits.max_request_bytes if path in IMAGE_ROUTES else self.limits.max_json_bytes


class EdgeGuard:
    """The ASGI middleware (see the module docstring). ``policy`` is set by the ingress replica that owns
    the app (`serve.ingress.Ingress`): Serve runs a copy of the app made when the module was imported, so
    the replica's settings reach it through this class, as they did for the old body limit."""

    policy: EdgePolicy | None = None

    def __init__(self, app, policy: EdgePolicy | None = None):
        self.app, self._policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the app has no websockets
            return await self.app(scope, receive, send)
        started = False

        async def send_hardened(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *(h for h in SECURITY_HEADERS if h[0] not in present)],
                }
            await send(message)

        policy = self._policy or EdgeGuard.policy
        try:
            if policy is None:
                raise ApiError(503, "starting", "the service is starting; retry shortly", headers={"Retry-After": "1"})
            await self._guarded(policy, scope, receive, send_hardened)
        except ApiError as e:
            if started:  # the app answered already; nothing more can be said on this response
                raise
            await _answer(send_hardened, e)

    async def _guarded(self, p: EdgePolicy, scope, receive, send):
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        if not host_allowed(headers.get("host", ""), p.s.allowed_hosts):
            raise ApiError(400, "bad_host", "this Host is not served here (allowed_hosts)")
        if path in ("/docs", "/redoc") and method in ("GET", "HEAD"):
            return await _docs_page(p, scope, send)
        address = scope["client"][0] if scope.get("client") else "?"
        with p.slot(address):
            needed, kind = route_needs(method, path)
            who = p.authorise(headers.get("authorization", ""), address, needed)
            with p.admission.admit(who, kind) if kind else contextlib.nullcontext():
                if not _has_body(headers):
                    return await self.app(scope, receive, send)
                body = await read_body(receive, headers, p.body_limit(path), p.limits.body_timeout_s)
                if body is None:  # the client went away
                    return
                await self.app(scope, _replay(body, receive), send)


def _has_body(headers: Headers) -> bool:
    """HTTP/1.1: a request has a body only with a Content-Length above 0 or a Transfer-Encoding."""
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() != "0")


async def read_body(receive, headers: Headers, limit: int, timeout_s: float) -> bytes | None:
    """The whole body, or None if the client disconnected. Refused with 413 past ``limit`` bytes (at once
    when the Content-Length says so) and with 408 if the whole of it has not arrived within ``timeout_s``:
    the deadline is for the body, not per chunk, so a client dripping a byte a second cannot hold its slot
    for longer than that."""
    declared = headers.get("content-length")
    too_large = ApiError(413, "request_too_large", f"request body over the limit of {limit} bytes")
    if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
        raise too_large
    loop = asyncio.get_running_loop()
    deadline, chunks, size = loop.time() + timeout_s, [], 0
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"the request body did not arrive within {timeout_s:g}s",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that gives the app the body read already, then the connection's own messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in e.headers.items()),
    ]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _docs_page(p: EdgePolicy, scope, send) -> None:
    """``/docs`` when ``docs`` is on: the API's routes from its OpenAPI document, as a page with no script
    and nothing loaded from elsewhere (FastAPI's Swagger UI comes from a CDN, unpinned and without an
    integrity check, on the studio's origin, where it could read the key the studio keeps). Off: 404."""
    if not p.s.docs:
        raise ApiError(404, "not_found", "Not Found")
    spec = scope["app"].openapi()
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            summary = op.get("summary") or ""
            rows.append(
                f"<tr><td>{html.escape(method.upper())}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(summary)}</td></tr>"
            )
    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>tokenfactory API</title></head><body>"
        f"<h1>{html.escape(spec.get('info', {}).get('title', 'API'))}</h1>"
        '<p>The full contract: <a href="openapi.json">openapi.json</a> (OpenAPI 3).</p>'
        f"<table>{''.join(rows)}</table></body></html>"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(page)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": page})
