"""The edge of the ingress (`serve.edge`): refused from the headers before the body is read, body deadlines,
per-address caps, browser and host hardening.

Two levels, both over real sockets on loopback and bounded in time: the middleware on a small FastAPI app
under uvicorn (seconds; small limits so each case is quick), then the real Serve app of conftest.py, the
way the audit attacked it (a client that sends its headers and then drips its body). Distinct client
addresses are distinct loopback addresses (127.0.0.2, 127.0.0.3, …: all of 127/8 is loopback on Linux).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import httpx
import pytest
from fastapi import (
    Request,  # at module level: the small app's routes are annotated with it (as strings)
)

from serve.edge import CSP, EdgeGuard, EdgePolicy, host_allowed, host_name
from serve.settings import ServeSettings
from tests.serve.conftest import CLIENT_HEADERS, CLIENT_KEY

KEY = "edge-test-key-0123456789"
HARDENING = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


# --- raw HTTP: a client that controls when each byte of its body goes out --------------------------------
def open_request(
    port: int,
    path: str,
    headers: dict[str, str],
    body_start: bytes = b"",
    *,
    method: str = "POST",
    source: str = "127.0.0.1",
    host: str = "127.0.0.1",
) -> socket.socket:
    """Connect from ``source``, send the request line, ``headers`` and the first ``body_start`` bytes only."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body_start)
    return s


def read_response(s: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one response, or a TimeoutError if none arrives within ``timeout``."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def drip(s: socket.socket, stop: threading.Event, every_s: float) -> None:
    """Send one body byte every ``every_s`` until stopped or the server hangs up."""
    while not stop.wait(every_s):
        try:
            s.sendall(b" ")
        except OSError:
            return


# --- the middleware alone, on a small app under uvicorn -----------------------------------------------------
def _small_app(policy: EdgePolicy):
    from fastapi import FastAPI

    app = FastAPI(docs_url=None, redoc_url=None)
    app.add_middleware(EdgeGuard, policy=policy)
    parsed = []

    @app.post("/v1/retrieve")
    async def retrieve(request: Request):
        body = await request.body()
        parsed.append(len(body))
        return {"bytes": len(body)}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await request.body()
        parsed.append(len(body))
        return {"bytes": len(body)}

    @app.get("/v1/tokens")
    async def tokens():
        return {"tokens": []}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app, parsed


@contextlib.contextmanager
def small_server(**settings):
    """The edge in front of a small app, served by uvicorn on a free loopback port; yields (port, parsed bodies)."""
    import uvicorn

    os.environ["TF_EDGE_TEST_KEY"] = KEY
    s = ServeSettings(registry="r", index="i", api_key_env="TF_EDGE_TEST_KEY", require_key=True, **settings)
    app, parsed = _small_app(EdgePolicy(s, s.api_key_digest(), None))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield port, parsed
    finally:
        server.should_exit = True
        thread.join(10)


AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL_LIMITS = {"body_timeout_s": 1.0, "max_in_flight_per_address": 3, "cheap_per_s": 1000, "cheap_burst": 1000}


@pytest.fixture(scope="module")
def small():
    with small_server(limits=SMALL_LIMITS) as served:
        yield served


def test_a_keyless_client_is_refused_while_its_body_is_still_unsent(small):
    port, parsed = small
    before = len(parsed)
    s = open_request(port, "/v1/retrieve", {"Content-Type": "application/json", "Content-Length": "2000"}, b'{"q')
    with s:
        t0 = time.monotonic()
        status, _, body = read_response(s, timeout=5)  # 1,997 bytes of the body were never sent
        assert status == 401 and b'"unauthorized"' in body and time.monotonic() - t0 < 2
    assert len(parsed) == before  # the app never saw the request


def test_a_wrong_key_is_refused_before_the_body_too(small):
    port, _ = small
    with open_request(
        port, "/v1/classify", {"Authorization": "Bearer wrong-key-wrong-key", "Content-Length": "8000000"}, b"x" * 1000
    ) as s:
        status, _, body = read_response(s, timeout=5)
    assert status == 401 and b"wrong API key" in body


def test_a_keyed_slow_body_gets_408_within_the_deadline_and_the_connection_closed(small):
    port, parsed = small
    before = len(parsed)
    s = open_request(port, "/v1/retrieve", {**AUTH, "Content-Length": "200"}, b"{")
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=(s, stop, 0.2))
    dripper.start()
    try:
        t0 = time.monotonic()
        status, headers, body = read_response(s, timeout=10)
        took = time.monotonic() - t0
        assert status == 408 and b'"body_timeout"' in body, body
        assert 0.9 < took < 3.0  # the 1 s deadline for the whole body, though a byte came every 0.2 s
        assert headers.get("connection") == "close" and closed_by_server(s, 5)
    finally:
        stop.set()
        dripper.join()
        s.close()
    assert len(parsed) == before


def test_a_whole_body_in_time_reaches_the_route(small):
    port, _ = small
    r = httpx.post(f"http://127.0.0.1:{port}/v1/retrieve", json={"query": "a boot"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["bytes"] == len(b'{"query":"a boot"}')
    r = httpx.post(f"http://127.0.0.1:{port}/v1/retrieve", content=b"x" * (65 << 10), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_an_address_over_its_in_flight_cap_gets_429_and_another_address_is_served(small):
    port, _ = small
    held = [
        open_request(port, "/v1/retrieve", {**AUTH, "Content-Length": "100"}, b"{", source="127.0.0.2")
        for _ in range(3)
    ]  # the cap: 3 requests in flight, each waiting for its body
    try:
        time.sleep(0.2)
        with open_request(port, "/v1/retrieve", {**AUTH, "Content-Length": "2"}, b"{}", source="127.0.0.2") as extra:
            status, headers, body = read_response(extra, timeout=5)
        assert status == 429 and b"too_many_in_flight" in body and headers["retry-after"] == "1"
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"))
        with other:
            r = other.post(f"http://127.0.0.1:{port}/v1/retrieve", json={"query": "x"}, headers=AUTH)
        assert r.status_code == 200
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5  # the slots are freed when their clients go (or at the body deadline)
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as again:
        while True:
            r = again.post(f"http://127.0.0.1:{port}/v1/retrieve", json={"query": "x"}, headers=AUTH)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert r.status_code == 200


def test_over_the_rate_is_refused_before_the_body():
    with small_server(limits={"cheap_per_s": 0.1, "cheap_burst": 1}) as (port, parsed):
        assert httpx.get(f"http://127.0.0.1:{port}/v1/tokens", headers=AUTH).status_code == 200
        with open_request(port, "/v1/retrieve", {**AUTH, "Content-Length": "5000"}, b"{") as s:
            status, headers, body = read_response(s, timeout=5)
        assert status == 429 and b"rate_limited" in body and int(headers["retry-after"]) >= 1
        assert parsed == []


def test_every_answer_carries_the_hardening_headers(small):
    port, _ = small
    base = f"http://127.0.0.1:{port}"
    answers = [
        httpx.get(base + "/healthz"),
        httpx.get(base + "/v1/tokens"),  # 200, 401
        httpx.get(base + "/v1/tokens", headers=AUTH),
        httpx.get(base + "/nothing"),  # 200, 404
        httpx.get(base + "/healthz", headers={"Host": "evil.example"}),
    ]  # 400
    assert [r.status_code for r in answers] == [200, 401, 200, 404, 400]
    for r in answers:
        assert {k: r.headers.get(k) for k in HARDENING} == HARDENING, r.request.url


def test_every_v1_route_needs_a_key_unless_listed_as_open():
    from serve.edge import ADMIN, CHEAP, CLIENT, COSTLY, route_needs

    assert route_needs("POST", "/v1/classify") == (CLIENT, CHEAP) and route_needs("POST", "/v1/gair") == (
        CLIENT,
        COSTLY,
    )
    assert route_needs("HEAD", "/v1/tokens") == (CLIENT, CHEAP)  # HEAD is no way around the key or the bucket
    assert route_needs("GET", "/v1/items/a b/thumbnail") == (CLIENT, CHEAP)
    assert route_needs("GET", "/v1/some-later-route") == (CLIENT, None)  # never open by omission
    assert route_needs("POST", "/v1/admin/reload") == (ADMIN, None) and route_needs("GET", "/v1/admin/x") == (
        ADMIN,
        None,
    )
    for open_path in ("/v1/auth", "/healthz", "/readyz", "/studio", "/studio/studio.js", "/openapi.json", "/"):
        assert route_needs("GET", open_path) == (None, None), open_path


def test_other_hosts_are_refused_and_the_allow_list_is_a_setting():
    assert ServeSettings(registry="r", index="i").allowed_hosts == ["localhost", "127.0.0.1", "[::1]"]
    loopback = ServeSettings(registry="r", index="i").allowed_hosts
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "[::1]"):
        assert host_allowed(host, loopback), host
    for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example:80", "", "[::2]:80"):
        assert not host_allowed(host, loopback), host
    assert host_name("api.example.com:443") == "api.example.com"
    assert host_allowed("a.example.com", ["*.example.com"]) and not host_allowed("example.org", ["*.example.com"])
    with small_server(allowed_hosts=["api.example.com"]) as (port, _):
        url = f"http://127.0.0.1:{port}/healthz"
        assert httpx.get(url).status_code == 400 and httpx.get(url).json()["error"]["code"] == "bad_host"
        assert httpx.get(url, headers={"Host": "api.example.com"}).status_code == 200


def test_docs_are_off_by_default_and_on_serve_nothing_from_elsewhere(small):
    port, _ = small
    assert ServeSettings(registry="r", index="i").docs is False
    assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 404
    with small_server(docs=True) as (on, _):
        r = httpx.get(f"http://127.0.0.1:{on}/docs")
        assert r.status_code == 200 and "/v1/retrieve" in r.text and "openapi.json" in r.text
        assert "<script" not in r.text and "http" not in r.text.replace(
            "http-equiv", ""
        )  # nothing loaded from elsewhere
        assert r.headers["content-security-policy"] == CSP


def _request(body: bytes, content_type: str = "application/json"):
    from starlette.requests import Request as StarletteRequest

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/classify",
        "headers": [(b"content-type", content_type.encode())],
    }
    return StarletteRequest(scope, receive)


def test_classify_bodies_are_parsed_off_the_event_loop_and_hostile_ones_not_at_all():
    import asyncio

    from fastapi.exceptions import RequestValidationError

    from serve.api import ApiError, ClassifyRequest
    from serve.ingress import parse_off_loop

    threads = []

    class Recording(ClassifyRequest):
        @classmethod
        def model_validate_json(cls, data, **kw):
            threads.append(threading.get_ident())
            return super().model_validate_json(data, **kw)

    async def parse(body, content_type="application/json"):
        return threading.get_ident(), await parse_off_loop(Recording, _request(body, content_type))

    loop_thread, req = asyncio.run(parse(b'{"image": "' + b"A" * (6 << 20) + b'", "top_k": 3}'))
    assert req.top_k == 3 and len(req.image) == 6 << 20 and threads and threads[0] != loop_thread
    threads.clear()
    with pytest.raises(ApiError, match="JSON objects and lists"):  # 2M empty lists: refused by a byte count
        asyncio.run(parse(b'{"x": [' + b"[]," * 2_000_000 + b'[]], "image": "aaaa"}'))
    assert threads == []  # never parsed
    with pytest.raises(RequestValidationError) as e:  # the envelope of a body parameter's errors
        asyncio.run(parse(b'{"image": "aaaa", "drop_tables": true}'))
    assert e.value.errors()[0]["loc"] == ("body", "drop_tables")
    with pytest.raises(RequestValidationError):
        asyncio.run(parse(b'{"image": "aaaa"}', "text/plain"))


# --- the real Serve app ------------------------------------------------------------------------------------
def _port(service) -> int:
    return httpx.URL(service.url).port


def test_serve_keyless_dripping_body_gets_401_before_it_is_complete(service):
    s = open_request(
        _port(service), "/v1/retrieve", {"Content-Type": "application/json", "Content-Length": "200"}, b'{"query": "a'
    )
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=(s, stop, 1.0))
    dripper.start()
    try:
        t0 = time.monotonic()
        status, _, body = read_response(s, timeout=20)
        # at one byte a second, 188 bytes were still unsent: the answer came while the body was incomplete
        assert status == 401 and b'"unauthorized"' in body and time.monotonic() - t0 < 10
    finally:
        stop.set()
        dripper.join()
        s.close()


def test_serve_keyless_8mib_classify_gets_401_unparsed(service):
    declared = 8 << 20
    s = open_request(
        _port(service),
        "/v1/classify",
        {"Content-Type": "application/json", "Content-Length": str(declared)},
        b'{"x": [' + b"[]," * 300_000,
    )  # the start of the audit's body: lists meant to cost parsing
    with s:
        status, _, body = read_response(s, timeout=20)
    assert status == 401 and b'"unauthorized"' in body  # not 422: never parsed (7 of its 8 MiB were never sent)
    assert service.client.get("/healthz").status_code == 200


def test_serve_keyed_classify_with_a_hostile_body_is_refused_cheaply(service):
    huge = b'{"x": [' + b"[]," * 2_000_000 + b'[]], "image": "aaaa"}'
    t0 = time.monotonic()
    r = service.client.post("/v1/classify", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request" and time.monotonic() - t0 < 10


def test_serve_keyed_slow_body_gets_408_within_the_deadline(service):
    s = open_request(
        _port(service),
        "/v1/retrieve",
        {**CLIENT_HEADERS, "Content-Type": "application/json", "Content-Length": "200"},
        b"{",
    )
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=(s, stop, 1.0))
    dripper.start()
    try:
        t0 = time.monotonic()
        status, _, body = read_response(s, timeout=30)
        took = time.monotonic() - t0
        assert status == 408 and b'"body_timeout"' in body and took < 10.0 + 5.0  # the 10 s deadline + slack
        assert closed_by_server(s, 10)
    finally:
        stop.set()
        dripper.join()
        s.close()


def test_serve_one_address_over_its_cap_gets_429_while_another_client_is_served(service):
    from serve.settings import Limits

    cap = Limits().max_in_flight_per_address
    port = _port(service)
    held = [
        open_request(port, "/v1/retrieve", {**CLIENT_HEADERS, "Content-Length": "100"}, b"{", source="127.0.0.5")
        for _ in range(cap)
    ]
    try:
        deadline, status = time.monotonic() + 8, None
        while time.monotonic() < deadline:  # until the edge has seen all of them (each a request in flight)
            with open_request(
                port, "/v1/retrieve", {**CLIENT_HEADERS, "Content-Length": "2"}, b"{}", source="127.0.0.5"
            ) as extra:
                status, _, body = read_response(extra, timeout=10)
            if status == 429:
                break
            time.sleep(0.2)
        assert status == 429 and b"too_many_in_flight" in body
        spec = service.specs[0]
        with httpx.Client(
            base_url=service.url,
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=30,
            transport=httpx.HTTPTransport(local_address="127.0.0.6"),
        ) as other:
            r = other.post("/v1/retrieve", json={"query": f"a <concept:{spec.concept_id}> {spec.parent}", "top_k": 1})
        assert r.status_code == 200, r.text
    finally:
        for s in held:
            s.close()


def test_serve_hardening_headers_hosts_and_docs(service):
    spec = service.specs[0]
    answers = [
        service.client.get("/studio"),
        service.client.get("/studio/studio.js"),
        service.client.get("/v1/tokens"),
        service.client.get(f"/v1/tokens/{spec.concept_id}/thumbnails/0"),
        httpx.get(service.url + "/v1/tokens"),
        service.client.get("/openapi.json"),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 401, 200]
    for r in answers:
        assert {k: r.headers.get(k) for k in HARDENING} == HARDENING, r.request.url
    assert service.client.get("/docs").status_code == 404 and service.client.get("/redoc").status_code == 404
    evil = service.client.get("/v1/auth", headers={"Host": "evil.example"})
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "bad_host"
    assert service.client.get("/studio", headers={"Host": "evil.example:8000"}).status_code == 400
