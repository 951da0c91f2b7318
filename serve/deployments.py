"""The Ray Serve deployments behind the ingress.

    RegistryWatcher  1 replica: which registry version the app serves (polls for new ones, admin reload)
    TextEncoder      prompts with <concept:ID> markers -> text features (@serve.batch); classification
    ImageEncoder     images -> CLIP image features (@serve.batch)
    GalleryIndex     vector search over the gallery (@serve.batch: one matrix search per batch)
    Generator        text-conditioned sampling and GAIR (its own deployment: GPU-able, scales to zero)

Replicas that hold tokens ask the watcher for the current version at most every ``version_check_s``
(one actor call; the admin reload waits that long before it answers, so every request sent after it
returns sees the new version) and switch by building the new `TokenState` first and then swapping one
reference, so no request ever sees half a version and none fails during a reload. Client errors are
*returned* as ``{"error": …}`` dicts, not raised: a raised exception would cross the actor boundary
wrapped and lose its meaning.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ray import serve

from factory.errors import ConfigError, DeviceError, TokenFactoryError
from serve.settings import ServeSettings, configure_batching
from serve.state import TokenState

log = logging.getLogger("tokenfactory.serve")


def error(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


def prompt_error(e: Exception) -> dict:
    """The answer an error raised by a request's input deserves: each `TokenFactoryError` names its own
    status and code; any other ValueError is a prompt the encoders could not take."""
    if isinstance(e, TokenFactoryError):
        return error(e.http_status, e.code, str(e))
    return error(422, "bad_prompt", str(e))


def split_calls(flat, sizes: list[int]) -> list:
    """Undo the flattening of a batch of calls that each carried ``sizes[i]`` items."""
    bounds = np.cumsum([0, *sizes])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _setup(settings: dict) -> ServeSettings:
    s = ServeSettings(**settings)
    torch.set_num_threads(s.threads)
    return s


def replica_device(setting: str, gpu_ids: Sequence, cuda_available: bool) -> str:
    """Where a replica computes ("cuda" or "cpu"), given ``ServeSettings.device``, the GPU ids Ray gave it
    (`ray.get_gpu_ids()`) and whether torch sees a GPU; pure, so every case is tested on a CPU.

    "auto" takes the GPU only when Ray reserved one for this replica (``num_gpus`` in its ray_actor_options):
    Ray does not hide the node's GPUs from replicas that reserved none, and CPU replicas grabbing an
    unaccounted GPU would crowd the Generator that did reserve it. "cuda" is the operator's explicit wish,
    accounted or not, and an error where there is no GPU rather than a silent CPU replica.
    """
    if setting == "cpu":
        return "cpu"
    if setting == "cuda":
        if not cuda_available:
            raise DeviceError(
                "ServeSettings.device is 'cuda' but torch sees no GPU in this replica: use 'auto' or "
                "'cpu', or run the replica on a GPU node (num_gpus in its ray_actor_options)"
            )
        return "cuda"
    if setting != "auto":
        raise ConfigError(f"device must be one of auto, cpu, cuda, got {setting!r}")
    if gpu_ids and not cuda_available:
        log.warning(
            "Ray gave this replica GPU(s) %s but torch sees none (a CPU build of torch?): computing on the CPU",
            list(gpu_ids),
        )
    return "cuda" if gpu_ids and cuda_available else "cpu"


def _backbone(s: ServeSettings):
    """The replica's backbone, on the device `replica_device` picks, in ``s.precision``. The fingerprint
    the registry check compares is taken before the cast (`load_backbone`), so tokens learned in fp32 serve
    in bf16 and back."""
    import ray

    from factory.backbones import load_backbone
    from factory.device import PRECISIONS, pick_device

    # Outside a Ray worker (an in-process replica in tests) there are no Ray GPU ids to read.
    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    device = pick_device(replica_device(s.device, gpu_ids, torch.cuda.is_available()) == "cuda")
    log.info("backbone on %s in %s", device, s.precision)
    return load_backbone(s.backbone, weights=s.weights, s3=s.s3(), device=device, dtype=PRECISIONS[s.precision])


class VersionFollower:
    """Keeps a replica's `TokenState` at the version the watcher names.

    A version that fails to load here (an unreadable file, weights of another backbone) is not fatal: the
    replica keeps serving the one it has, logs why, and tries again after a backoff that doubles up to
    ``MAX_BACKOFF_S``, so a bad version costs one attempt per backoff, not one per request.
    """

    MAX_BACKOFF_S = 60.0

    def __init__(self, watcher, load: Callable[[int | None], TokenState], check_s: float):
        self.watcher, self._load, self.check_s = watcher, load, check_s
        self.current = load(None)  # the newest readable version, so the replica starts ready
        self._lock = asyncio.Lock()
        self._checked_at = time.monotonic()
        self._failed: dict[int, tuple[float, float]] = {}  # version -> (retry at, backoff)

    async def state(self) -> TokenState:
        if time.monotonic() - self._checked_at < self.check_s:
            return self.current
        version = await self.watcher.current.remote()
        self._checked_at = time.monotonic()
        if version != self.current.version and time.monotonic() >= self._failed.get(version, (0.0, 0.0))[0]:
            async with self._lock:
                if version != self.current.version:
                    await self._switch(version)
        return self.current

    async def _switch(self, version: int) -> None:
        t0 = time.perf_counter()
        try:
            self.current = await asyncio.to_thread(self._load, version)
        except Exception as e:  # keep serving what we have; the watcher only names verified versions
            backoff = min(self.MAX_BACKOFF_S, 2 * self._failed.get(version, (0.0, 0.5))[1])
            self._failed[version] = (time.monotonic() + backoff, backoff)
            log.error(
                "registry version %d failed to load (%s); still serving %d, retrying in %.0fs",
                version,
                e,
                self.current.version,
                backoff,
            )
            return
        self._failed.pop(version, None)
        log.info("now serving registry version %d (%.2fs to load)", version, time.perf_counter() - t0)


class GalleryFollower:
    """The gallery index a replica searches.

    When ``ServeSettings.index`` is a root of index versions (`tokenfactory index --append`), the replica
    moves to the newest committed version, looked for at most every ``check_s``. The new version loads in
    a background task while searches go on against the current one; then the reference is swapped, so no
    request waits for a load and none fails during a swap (a search holds the index it started with). A
    version that fails to load is logged and skipped; the current one stays.
    """

    def __init__(self, uri: str, s3, check_s: float, shard: int | None = None, shards: int = 1):
        from factory.index import load_index
        from factory.index.sharded import load_shard
        from factory.index.versions import IndexVersions

        self.check_s, self._checked_at, self._task = check_s, time.monotonic(), None
        self._bad: set[int] = set()
        if shard is not None:  # one shard of a sharded gallery, checked against its shards.json; not followed
            self.version, self.versions, self.index = None, None, load_shard(uri, shard, s3, shards=shards)
            return
        versions = IndexVersions(uri, s3)
        self.version = versions.latest()
        self.versions = versions if self.version is not None else None  # a single saved index: nothing to follow
        self.index = versions.open(self.version)[1] if self.versions else load_index(uri, s3)

    def current(self):
        """The index to search now; starts a look for a newer version when one is due."""
        due = time.monotonic() - self._checked_at >= self.check_s
        if self.versions is not None and due and (self._task is None or self._task.done()):
            self._checked_at = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._refresh())
        return self.index

    async def _refresh(self) -> None:
        latest = None
        try:
            latest = await asyncio.to_thread(self.versions.latest)
            if latest is None or latest <= self.version or latest in self._bad:
                return
            t0 = time.perf_counter()
            version, index = await asyncio.to_thread(self.versions.open, latest)
        except Exception as e:  # keep searching the current version
            if latest is not None:
                self._bad.add(latest)
            log.error("gallery index version %s failed to load (%s); still serving %s", latest, e, self.version)
            return
        self.version, self.index = version, index
        log.info(
            "now serving gallery index version %d, %d items (%.2fs to load)",
            version,
            len(index),
            time.perf_counter() - t0,
        )


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class RegistryWatcher:
    def __init__(self, settings: dict):
        from factory.registry import TokenRegistry

        s = ServeSettings(**settings)
        self.registry = TokenRegistry(s.registry, s.s3())
        opened, skipped = self.registry.newest_readable()  # NoCommittedVersion names `tokenfactory onboard`
        for v, why in skipped.items():
            log.error("registry version %d is unreadable, starting on %d: %s", v, opened.version, why)
        self.version, self.pinned = opened.version, False
        self.polls = 0  # polls begun; one that began at n has ended once this reads n + 1 (tests wait on it)
        self._bad: dict[int, float] = {v: time.monotonic() + s.poll_s for v in skipped}  # version -> retry at
        if s.poll_s > 0:
            threading.Thread(target=self._poll, args=(s.poll_s,), daemon=True).start()

    def _poll(self, every: float) -> None:
        while True:
            time.sleep(every)
            self.polls += 1
            try:
                latest = self.registry.latest()
            except Exception as e:  # a flaky store must not stop polling
                log.warning("registry poll failed: %s", e)
                continue
            if self.pinned or latest is None or latest <= self.version or time.monotonic() < self._bad.get(latest, 0):
                continue
            try:
                self.registry.open(latest)  # verified before any replica is told to load it
            except Exception as e:
                self._bad[latest] = time.monotonic() + 10 * every
                log.error("registry version %d fails verification, still serving %d: %s", latest, self.version, e)
                continue
            log.info("registry version %d committed: switching from %d", latest, self.version)
            self.version = latest

    async def current(self) -> int:
        return self.version

    async def reload(self, version: int | None = None) -> dict:
        from factory.registry import ChecksumMismatch, RegistryError
        from factory.storage import StorageError

        try:
            opened = await asyncio.to_thread(self.registry.open, version)  # verifies checksums first
        except (ChecksumMismatch, StorageError) as e:  # exists but unreadable: keep serving the current one
            log.error("reload to %s refused, still serving %d: %s", version or "the newest version", self.version, e)
            return error(409, "version_unreadable", f"{e}; still serving version {self.version}")
        except (RegistryError, FileNotFoundError) as e:
            return error(404 if version is not None else 409, "no_such_version", str(e))
        previous, self.version, self.pinned = self.version, opened.version, version is not None
        return {"registry_version": self.version, "previous_version": previous}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class TextEncoder:
    def __init__(self, settings: dict, watcher):
        from factory.registry import TokenRegistry

        s = _setup(settings)
        self.backbone = _backbone(s)
        registry = TokenRegistry(s.registry, s.s3())
        self.follower = VersionFollower(
            watcher, lambda v: TokenState.load(registry, v, self.backbone), s.version_check_s
        )
        configure_batching(s, self.encode)

    async def ready(self) -> int:
        return self.follower.current.version

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode(self, calls: list[list[str]]) -> list[list[dict]]:
        """Normalised text features of each prompt, or its error; a call carries a list of prompts (one
        request, or an ingress batch of them) and the valid prompts of all calls are encoded together."""
        state = await self.follower.state()
        prompts = [p for call in calls for p in call]
        out: list[dict] = [{} for _ in prompts]
        good = []
        for i, p in enumerate(prompts):
            try:
                batch = self.backbone.tokenize([p])
                self.backbone.lookup(batch.concept_ids, state.tokens)
                good.append(i)
            except (TokenFactoryError, ValueError) as e:
                out[i] = prompt_error(e)
        if good:
            with torch.no_grad():
                feats = self.backbone.encode_prompts([prompts[i] for i in good], state.tokens).features
            feats = F.normalize(feats.float(), dim=-1).cpu().numpy()
            for j, i in enumerate(good):
                out[i] = {"features": feats[j], "registry_version": state.version}
        return split_calls(out, [len(c) for c in calls])

    async def classify(self, features: np.ndarray, parents: list[str | None], top_ks: list[int]) -> list[dict]:
        """The best concepts for each row of ``features`` [k, D], among its parent's when one is given."""
        state = await self.follower.state()
        out = []
        for f, parent, top_k in zip(features, parents, top_ks):
            if parent is not None and parent not in state.by_parent:
                out.append(
                    error(
                        404,
                        "unknown_parent",
                        f"no learned concept has parent {parent!r} (registry version {state.version})",
                    )
                )
            else:
                out.append({"concepts": state.classify(f, parent, top_k), "registry_version": state.version})
        return out

    async def tokens(self) -> dict:
        state = await self.follower.state()
        return {
            "tokens": [
                {
                    **r.model_dump(
                        mode="json",
                        exclude={
                            "vector",
                            "coefficients",
                            "prototype",
                            "metrics",
                            "basis_id",
                            "backbone_fingerprint",
                            "thumbnails",
                        },
                    ),
                    "thumbnails": len(r.thumbnails or []),
                }
                for r in state.records.values()
            ],
            "registry_version": state.version,
        }

    async def thumbnail(self, concept_id: str, k: int) -> dict:
        """The k-th stored thumbnail (base64 PNG) of a concept's few-shot images."""
        state = await self.follower.state()
        rec = state.records.get(concept_id)
        if rec is None or not 0 <= k < len(rec.thumbnails or []):
            return error(
                404, "no_thumbnail", f"no thumbnail {k} of concept {concept_id!r} in registry version {state.version}"
            )
        return {"png": rec.thumbnails[k]}

    async def token(self, concept_id: str) -> dict:
        state = await self.follower.state()
        rec = state.records.get(concept_id)
        if rec is None:
            return error(
                404, "unknown_concept", f"no token for concept {concept_id!r} in registry version {state.version}"
            )
        return {
            **rec.model_dump(
                mode="json", exclude={"coefficients", "prototype", "basis_id", "backbone_fingerprint", "thumbnails"}
            ),
            "thumbnails": len(rec.thumbnails or []),
            "registry_version": state.version,
        }


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class ImageEncoder:
    def __init__(self, settings: dict):
        s = _setup(settings)
        self.backbone = _backbone(s)
        configure_batching(s, self.encode)

    async def ready(self) -> bool:
        return True

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode(self, calls: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 images [k, S, S, 3] per call (already at the backbone's size) -> normalised features
        [k, D] per call, all calls in one forward pass."""
        with torch.no_grad():
            feats = self.backbone.encode_image(self.backbone.preprocess(np.concatenate(calls)))
        feats = F.normalize(feats.float(), dim=-1).cpu().numpy()
        return split_calls(feats, [len(c) for c in calls])


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class GalleryIndex:
    """The gallery, or with ``shard`` (``gallery_shards`` > 1) one shard of it: the ingress merges the shards'
    hits (`factory.index.sharded.merge_hits`), so no replica needs the whole gallery in memory."""

    def __init__(self, settings: dict, shard: int | None = None):
        s = _setup(settings)
        self.gallery = GalleryFollower(s.index, s.s3(), s.index_check_s, shard, s.gallery_shards)
        self._uris: tuple[object, dict[str, str]] = (None, {})  # (the index they are of, id -> URI)
        configure_batching(s, self.search)

    async def ready(self) -> int:
        return len(self.gallery.current())

    async def uri_of(self, item_id: str) -> dict:
        """The stored URI of a gallery item: the only image URIs the studio's thumbnails may read."""
        index = self.gallery.current()
        if self._uris[0] is not index:
            self._uris = (index, {i: u for i, u in zip(index.ids, index.uris) if u})
        uri = self._uris[1].get(item_id)
        if uri is None:
            return error(404, "unknown_item", f"no gallery item {item_id!r} with an image")
        return {"uri": uri}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def search(
        self, calls: list[tuple[np.ndarray, list[int]]]
    ) -> list[list[list[tuple[str, str | None, float]]]]:
        """One matrix search for all queries of all calls at the largest k, each query cut to its own k.
        A call is (queries [k, D], the k of each query)."""
        queries = np.concatenate([q for q, _ in calls]).astype(np.float32)
        hits = gallery_hits(self.gallery.current(), queries, [k for _, call_ks in calls for k in call_ks])
        return split_calls(hits, [len(k) for _, k in calls])


def gallery_hits(index, queries: np.ndarray, ks: list[int]) -> list[list[tuple[str, str | None, float]]]:
    """(id, uri, score) of the ``ks[i]`` best items of each query: one search at the largest k. An empty
    gallery has no hits, which is an answer (an empty list), not a server error."""
    if len(index) == 0:
        return [[] for _ in ks]
    res = index.search(queries, min(max(ks), len(index)))
    return [list(zip(res.ids[i][:k], res.uris[i][:k], map(float, res.scores[i][:k]))) for i, k in enumerate(ks)]


async def run_cancellable(fn: Callable[[Callable[[], bool]], Any]) -> Any:
    """Run ``fn(should_stop)`` in a thread; when this request is cancelled (the ingress timed out, or the
    client went away and Serve cancelled the call), ``should_stop`` turns True and ``fn`` stops at its next
    sampling step instead of finishing work nobody will read."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(fn, stop.is_set)
    except asyncio.CancelledError:
        stop.set()
        raise


def _png_b64(images: np.ndarray) -> list[str]:
    from factory.images import encode_png

    return [base64.b64encode(encode_png(im)).decode() for im in images]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class Generator:
    def __init__(self, settings: dict, watcher):
        from factory.registry import TokenRegistry

        s = _setup(settings)
        self.backbone = _backbone(s)
        if self.backbone.generator is None:
            raise ValueError(f"backbone {s.backbone!r} has no generator: /v1/generate and /v1/gair need one")
        registry = TokenRegistry(s.registry, s.s3())
        self.follower = VersionFollower(
            watcher, lambda v: TokenState.load(registry, v, self.backbone, with_classes=False), s.version_check_s
        )
        self.gallery = GalleryFollower(s.index, s.s3(), s.index_check_s)
        self.sampling = asyncio.Semaphore(s.sampling_concurrency)

    async def ready(self) -> int:
        return self.follower.current.version

    async def sample(self, fn: Callable[[Callable[[], bool]], Any]) -> Any:
        """`run_cancellable` once a sampling slot is free (``ServeSettings.sampling_concurrency``)."""
        async with self.sampling:
            return await run_cancellable(fn)

    async def generate(self, prompt: str, n: int, seed: int, steps: int, guidance: float) -> dict:
        state = await self.follower.state()
        try:
            cond = self.backbone.encode_prompts([prompt], state.tokens).hidden
        except (TokenFactoryError, ValueError) as e:
            return prompt_error(e)

        def run(should_stop) -> np.ndarray:
            from factory.images import to_uint8

            with torch.no_grad():
                uncond = self.backbone.encode_prompts([""]).hidden
                images = self.backbone.generator.sample(
                    cond.expand(n, -1, -1), uncond, steps=steps, guidance=guidance, seed=seed, should_stop=should_stop
                )
                # NumPy takes neither a GPU tensor nor bf16: to the host in fp32 before the PNGs
                return to_uint8(images.float().cpu())

        images = await self.sample(run)
        return {"images": _png_b64(images), "seed": seed, "registry_version": state.version}

    async def gair(self, request: Any) -> dict:
        """One GAIR request (a `GairRequest`, as the ingress sends it, or its fields as a dict) -> the JSON of
        `serve.api.GairResponse`: the method's result dumped once, and the registry version."""
        from factory.evaluation.metrics import look_alikes
        from factory.gair import ConceptToken, Gair, GairRequest

        if not isinstance(request, GairRequest):
            try:
                request = GairRequest(**request)
            except (TokenFactoryError, ValueError) as e:
                return prompt_error(e)
        state = await self.follower.state()
        ids, records = request.concept_ids, state.records
        missing = [c for c in ids if c not in records]
        if missing:
            return error(
                404,
                "unknown_concept",
                f"no token for concept(s) {', '.join(missing)} in registry version {state.version}",
            )
        no_proto = [c for c in ids if not records[c].prototype]
        if no_proto:
            return error(
                409,
                "no_prototype",
                f"concept(s) {', '.join(no_proto)} have no stored prototype (learned by an "
                "older version of tokenfactory): onboard them again to use GAIR",
            )
        # the look-alikes' prototypes (`object` rule), only where the rule reads them
        rivals = (
            look_alikes(
                {c: r.prototype for c, r in records.items() if r.prototype},
                {c: r.parent for c, r in records.items()},
                of=ids,
            )
            if request.rule == "object"
            else {}
        )
        concepts = {
            c: ConceptToken(state.tokens[c], records[c].parent, torch.tensor(records[c].prototype), rivals.get(c))
            for c in ids
        }
        try:
            gair = Gair(self.backbone, concepts, self.gallery.current())
            res = await self.sample(lambda should_stop: gair(request, should_stop))
        except (TokenFactoryError, ValueError) as e:
            return prompt_error(e)
        return {**res.model_dump(mode="json"), "registry_version": state.version}
