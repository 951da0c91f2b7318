"""Admission control, cancellation and exposure rules, on the plain classes (no Serve needed)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve.api import ApiError
from serve.guard import CHEAP, COSTLY, Admission, check_cost, unet_passes
from serve.settings import Limits, ServeSettings


def test_a_client_over_its_rate_gets_429_with_retry_after():
    admission = Admission(Limits(costly_per_s=0.5, costly_burst=2))
    for _ in range(2):
        with admission.admit("key:a", COSTLY):
            pass
    with pytest.raises(ApiError) as e:
        with admission.admit("key:a", COSTLY):
            pass
    assert e.value.status == 429 and e.value.code == "rate_limited" and int(e.value.headers["Retry-After"]) >= 1
    with admission.admit("key:b", COSTLY):  # another client has its own bucket
        pass
    with admission.admit("key:a", CHEAP):  # and the cheap class its own budget
        pass


def test_the_costly_class_has_a_concurrency_cap_that_leaves_cheap_routes_alone():
    admission = Admission(Limits(max_concurrent_costly=2, costly_burst=100))
    with admission.admit("a", COSTLY), admission.admit("b", COSTLY):
        with pytest.raises(ApiError) as e:
            with admission.admit("c", COSTLY):
                pass
        assert e.value.code == "busy" and e.value.headers["Retry-After"]
        with admission.admit("c", CHEAP):
            pass
    with admission.admit("c", COSTLY):  # freed on exit, errors included
        pass
    assert admission.in_flight == {CHEAP: 0, COSTLY: 0}


def test_rate_refills_over_time():
    admission = Admission(Limits(cheap_per_s=20, cheap_burst=1))
    with admission.admit("a", CHEAP):
        pass
    with pytest.raises(ApiError):
        with admission.admit("a", CHEAP):
            pass
    time.sleep(0.1)
    with admission.admit("a", CHEAP):
        pass


def test_unet_budget():
    assert unet_passes(4, 20, 4.0) == 160 and unet_passes(4, 20, 1.0) == 80
    check_cost(400, Limits())
    with pytest.raises(ApiError, match="400"):
        check_cost(401, Limits())


def test_binding_beyond_loopback_needs_a_required_key(monkeypatch):
    monkeypatch.setenv("TF_CLIENT_KEY", "k" * 24)
    open_settings = ServeSettings(registry="r", index="i")
    for host in ("127.0.0.1", "localhost", "::1"):
        open_settings.check_exposure(host)
    with pytest.raises(ValueError, match="--require-key"):
        open_settings.check_exposure("0.0.0.0")
    ServeSettings(registry="r", index="i", api_key_env="TF_CLIENT_KEY", require_key=True).check_exposure("0.0.0.0")


def test_start_refuses_to_expose_an_open_service():
    from serve.app import start

    with pytest.raises(ValueError, match="exposes the service"):
        start(ServeSettings(registry="r", index="i"), host="0.0.0.0", port=1)  # refused before anything deploys


def test_the_admin_key_must_differ_from_the_clients_key(monkeypatch):
    monkeypatch.setenv("TF_KEY_A", "a" * 24)
    with pytest.raises(ValueError, match="a key of its own"):
        ServeSettings(registry="r", index="i", api_key_env="TF_KEY_A", admin_key_env="TF_KEY_A").admin_key_digest()


def test_require_key_without_a_key_env_is_refused_at_start(monkeypatch):
    """It served open before (audit N13): there was no key to require."""
    from factory.errors import ConfigError

    with pytest.raises(ConfigError, match="require_key needs api_key_env"):
        ServeSettings(registry="r", index="i", require_key=True)
    monkeypatch.setenv("TF_CLIENT_KEY", "k" * 24)
    assert ServeSettings(registry="r", index="i", require_key=True, api_key_env="TF_CLIENT_KEY").require_key


def test_the_edge_caps_requests_in_flight_per_address_and_frees_them_on_errors(monkeypatch):
    from serve.edge import ADMIN, CLIENT, EdgePolicy

    monkeypatch.setenv("TF_CLIENT_KEY", "k" * 24)
    s = ServeSettings(
        registry="r",
        index="i",
        require_key=True,
        api_key_env="TF_CLIENT_KEY",
        limits=Limits(max_in_flight_per_address=2),
    )
    edge = EdgePolicy(s, s.api_key_digest(), None)
    with edge.slot("10.0.0.1"), edge.slot("10.0.0.1"):
        with pytest.raises(ApiError) as e:
            with edge.slot("10.0.0.1"):
                pass
        assert e.value.status == 429 and e.value.code == "too_many_in_flight" and e.value.headers["Retry-After"]
        with edge.slot("10.0.0.2"):  # another address has its own slots
            pass
    with pytest.raises(RuntimeError):
        with edge.slot("10.0.0.1"):
            raise RuntimeError("a failing request")
    assert edge.in_flight == {}  # all freed, and no entry left per address gone
    assert edge.authorise("Bearer " + "k" * 24, "10.0.0.1", CLIENT).startswith("key:")
    assert edge.authorise("", "10.0.0.1", None) == "addr:10.0.0.1"
    for header in ("", "Bearer wrong-wrong-wrong-wrong", "Basic " + "k" * 24):
        with pytest.raises(ApiError) as e:
            edge.authorise(header, "10.0.0.1", CLIENT)
        assert e.value.status == 401
    with pytest.raises(ApiError) as e:
        edge.authorise("Bearer " + "k" * 24, "10.0.0.1", ADMIN)
    assert e.value.status == 403 and e.value.code == "admin_disabled"


def test_a_cancelled_request_stops_its_sampling_thread():
    from serve.deployments import run_cancellable

    steps, stopped = [], threading.Event()

    def sample(should_stop):
        for i in range(500):
            if should_stop():
                stopped.set()
                return None
            steps.append(i)
            time.sleep(0.01)

    async def request():
        await asyncio.wait_for(run_cancellable(sample), 0.1)  # the ingress's timeout

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(request())
    assert stopped.wait(2.0) and len(steps) < 50  # it stopped, long before its 500 steps


def _generator_without_models(concurrency: int):
    """The Generator deployment's class with only its sampling slots (no models are needed to test them)."""
    from serve.deployments import Generator

    gen = object.__new__(Generator.func_or_class)
    gen.sampling = asyncio.Semaphore(concurrency)
    return gen


@pytest.mark.parametrize("concurrency,expected_peak", [(1, 1), (2, 2)])
def test_a_generator_replica_samples_at_most_its_concurrency_at_once(concurrency, expected_peak):
    """On a CPU two samplings at once only split the cores, and take the cheap routes' share too."""
    gen, lock, running, peak = _generator_without_models(concurrency), threading.Lock(), [0], [0]

    def sample(should_stop):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return "done"

    async def three_requests():
        return await asyncio.gather(*(gen.sample(sample) for _ in range(3)))

    assert asyncio.run(three_requests()) == ["done"] * 3 and peak[0] == expected_peak


def test_a_request_waiting_for_a_sampling_slot_can_be_cancelled():
    gen, started = _generator_without_models(1), []

    def sample(should_stop):
        started.append(1)
        while not should_stop():
            time.sleep(0.01)

    async def two_requests():
        first = asyncio.ensure_future(gen.sample(sample))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gen.sample(sample), 0.05)  # never got the slot: gone without sampling
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(two_requests())
    assert started == [1]


def test_generator_sampling_polls_should_stop(hf_backbone_for_serve):
    from factory.errors import SamplingCancelled

    gen, calls = hf_backbone_for_serve.generator, []
    cond = hf_backbone_for_serve.encode_prompts(["a dress"]).hidden
    with pytest.raises(SamplingCancelled):
        gen.sample(cond, steps=10, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4


@pytest.fixture(scope="module")
def hf_backbone_for_serve():
    from factory.backbones import load_backbone

    return load_backbone("tiny-hf-clip")


def test_image_uri_reads_answer_absent_denied_and_outage_apart(s3_server, s3_bucket):
    from factory import storage
    from serve.guard import read_allowed_image

    s3 = s3_server.s3_options
    storage.write_bytes(f"{s3_bucket}/allowed/a.png", b"png-bytes", s3)
    storage.write_bytes(f"{s3_bucket}/private/a.png", b"png-bytes", s3)
    prefixes = [f"{s3_bucket}/allowed"]
    assert read_allowed_image(f"{s3_bucket}/allowed/a.png", prefixes, s3, 1024) == b"png-bytes"
    answers = []
    for uri in (
        f"{s3_bucket}/private/a.png",
        f"{s3_bucket}/allowed/missing.png",
        f"{s3_bucket}/allowed/../private/a.png",
    ):
        with pytest.raises(ApiError) as e:
            read_allowed_image(uri, prefixes, s3, 1024)
        answers.append((e.value.status, e.value.code, str(e.value)))
    assert len(set(answers)) == 1 and answers[0][0] == 404  # denied and absent look the same
    with pytest.raises(ApiError) as e:
        read_allowed_image(f"{s3_bucket}/allowed/a.png", prefixes, s3, 4)
    assert e.value.status == 413
    import dataclasses
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the store is down
        sock.bind(("127.0.0.1", 0))
        dead = dataclasses.replace(s3, endpoint=f"127.0.0.1:{sock.getsockname()[1]}", max_attempts=1)
    with pytest.raises(ApiError) as e:
        read_allowed_image(f"{s3_bucket}/allowed/a.png", prefixes, dead, 1024)
    assert e.value.status == 503 and e.value.code == "store_unavailable"  # an outage, not the client's fault


def test_an_empty_gallery_answers_no_hits_instead_of_failing():
    import numpy as np

    from factory.index import ExactIndex
    from serve.deployments import gallery_hits

    queries = np.ones((2, 8), np.float32)
    assert gallery_hits(ExactIndex(8), queries, [3, 1]) == [[], []]
    full = ExactIndex(8)
    full.add(np.eye(8, dtype=np.float32)[:3], ["a", "b", "c"])
    hits = gallery_hits(full, queries, [3, 1])
    assert [len(h) for h in hits] == [3, 1] and hits[1][0][0] == hits[0][0][0]
