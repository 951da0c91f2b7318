"""The Ray Serve deployments behind the ingress.

    RegistryWatcher  1 replica: which registry version the app serves (polls for new ones, admin reload)
    TextEncoder      prompts with <concept:ID> markers -> text features (@serve.batch); classification
    ImageEncoder     images -> CLIP image features (@serve.batch)
    GalleryIndex     vector search over the gallery (@serve.batch: one matrix search per batch)
    Generator        text-conditioned sampling and GAIR (its own deployment: GPU-able, scales to zero)

Replicas that hold tokens ask the watcher for the current version at most every ``version_check_s``
(one actor call; the admin reload waits that long before it answers, so every request sent after it
returns sees the new version) and switch by building the new `TokenState` first and then swapping one
reference, so no request ever sees half a version and none fails during a reload. Client errors are *returned* as ``{"error": …}``
dicts, not raised: a raised exception would cross the actor boundary wrapped and lose its meaning.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from ray import serve

from factory.errors import MalformedMarker, PromptTooLong, TokenFactoryError, UnknownConceptMarker, UnknownWord
from factory.storage import S3Options
from serve.settings import ServeSettings
from serve.state import TokenState

log = logging.getLogger("tokenfactory.serve")


def error(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


def prompt_error(e: Exception) -> dict:
    """The client error a bad prompt deserves."""
    if isinstance(e, UnknownConceptMarker):
        return error(404, "unknown_concept", str(e))
    if isinstance(e, MalformedMarker):
        return error(422, "malformed_marker", str(e))
    if isinstance(e, PromptTooLong):
        return error(422, "prompt_too_long", str(e))
    if isinstance(e, UnknownWord):
        return error(422, "unknown_word", str(e))
    return error(422, "bad_prompt", str(e))


def _setup(settings: dict) -> ServeSettings:
    s = ServeSettings(**settings)
    torch.set_num_threads(s.threads)
    return s


def _backbone(s: ServeSettings):
    from factory.backbones import load_backbone

    return load_backbone(s.backbone, weights=s.weights, s3=S3Options.from_env())


class VersionFollower:
    """Keeps a replica's `TokenState` at the version the watcher names."""

    def __init__(self, watcher, load: Callable[[int | None], TokenState], check_s: float):
        self.watcher, self._load, self.check_s = watcher, load, check_s
        self.current = load(None)  # the newest committed version, so the replica starts ready
        self._lock = asyncio.Lock()
        self._checked_at = time.monotonic()

    async def state(self) -> TokenState:
        if time.monotonic() - self._checked_at < self.check_s:
            return self.current
        version = await self.watcher.current.remote()
        self._checked_at = time.monotonic()
        if version != self.current.version:
            async with self._lock:
                if version != self.current.version:
                    t0 = time.perf_counter()
                    self.current = await asyncio.to_thread(self._load, version)
                    log.info("now serving registry version %d (%.2fs to load)", version, time.perf_counter() - t0)
        return self.current


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class RegistryWatcher:
    def __init__(self, settings: dict):
        from factory.registry import NoCommittedVersion, TokenRegistry

        s = ServeSettings(**settings)
        self.registry = TokenRegistry(s.registry, S3Options.from_env())
        latest = self.registry.latest()
        if latest is None:
            raise NoCommittedVersion(f"no committed version in registry {s.registry}: run `tokenfactory onboard` first")
        self.version, self.pinned = latest, False
        if s.poll_s > 0:
            threading.Thread(target=self._poll, args=(s.poll_s,), daemon=True).start()

    def _poll(self, every: float) -> None:
        while True:
            time.sleep(every)
            try:
                latest = self.registry.latest()
            except Exception as e:  # a flaky store must not stop polling
                log.warning("registry poll failed: %s", e)
                continue
            if not self.pinned and latest is not None and latest > self.version:
                log.info("registry version %d committed: switching from %d", latest, self.version)
                self.version = latest

    async def current(self) -> int:
        return self.version

    async def reload(self, version: int | None = None) -> dict:
        from factory.registry import RegistryError

        try:
            opened = await asyncio.to_thread(self.registry.open, version)  # verifies checksums first
        except (RegistryError, FileNotFoundError) as e:
            return error(404 if version is not None else 409, "no_such_version", str(e))
        previous, self.version, self.pinned = self.version, opened.version, version is not None
        return {"registry_version": self.version, "previous_version": previous}


class _Batched:
    """Applies the settings' batch size to a deployment's @serve.batch methods."""

    def _configure_batching(self, s: ServeSettings, *methods) -> None:
        for m in methods:
            m.set_max_batch_size(s.max_batch_size)
            m.set_batch_wait_timeout_s(s.batch_wait_s)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class TextEncoder(_Batched):
    def __init__(self, settings: dict, watcher):
        from factory.registry import TokenRegistry

        s = _setup(settings)
        self.backbone = _backbone(s)
        registry = TokenRegistry(s.registry, S3Options.from_env())
        self.follower = VersionFollower(watcher, lambda v: TokenState.load(registry, v, self.backbone), s.version_check_s)
        self._configure_batching(s, self.encode)

    async def ready(self) -> int:
        return self.follower.current.version

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode(self, prompts: list[str]) -> list[dict]:
        """Normalised text features of each prompt, or its error; valid prompts are encoded together."""
        state = await self.follower.state()
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
        return out

    async def classify(self, features: np.ndarray, parent: str | None, top_k: int) -> dict:
        state = await self.follower.state()
        if parent is not None and parent not in state.by_parent:
            return error(404, "unknown_parent", f"no learned concept has parent {parent!r} "
                                                f"(registry version {state.version})")
        return {"concepts": state.classify(features, parent, top_k), "registry_version": state.version}

    async def tokens(self) -> dict:
        state = await self.follower.state()
        return {"tokens": [r.model_dump(mode="json", exclude={"vector", "coefficients", "prototype", "metrics",
                                                              "basis_id", "backbone_fingerprint"})
                           for r in state.records.values()], "registry_version": state.version}

    async def token(self, concept_id: str) -> dict:
        state = await self.follower.state()
        rec = state.records.get(concept_id)
        if rec is None:
            return error(404, "unknown_concept", f"no token for concept {concept_id!r} in registry version {state.version}")
        return {**rec.model_dump(mode="json", exclude={"coefficients", "prototype", "basis_id", "backbone_fingerprint"}),
                "registry_version": state.version}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class ImageEncoder(_Batched):
    def __init__(self, settings: dict):
        s = _setup(settings)
        self.backbone = _backbone(s)
        self._configure_batching(s, self.encode)

    async def ready(self) -> bool:
        return True

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [S, S, 3] images (already at the backbone's size) -> normalised features."""
        with torch.no_grad():
            feats = self.backbone.encode_image(self.backbone.preprocess(np.stack(images)))
        return list(F.normalize(feats.float(), dim=-1).cpu().numpy())


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class GalleryIndex(_Batched):
    def __init__(self, settings: dict):
        from factory.index import load_index

        s = _setup(settings)
        self.index = load_index(s.index, S3Options.from_env())
        self._configure_batching(s, self.search)

    async def ready(self) -> int:
        return len(self.index)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def search(self, requests: list[tuple[np.ndarray, int]]) -> list[list[tuple[str, str | None, float]]]:
        """One matrix search for the whole batch at the largest k, each request cut to its own k."""
        queries = np.stack([q for q, _ in requests]).astype(np.float32)
        k = min(max(k for _, k in requests), len(self.index))
        res = self.index.search(queries, k)
        return [list(zip(res.ids[i][:kk], res.uris[i][:kk], map(float, res.scores[i][:kk])))
                for i, (_, kk) in enumerate(requests)]


def _png_b64(images: np.ndarray) -> list[str]:
    from factory.images import encode_png

    return [base64.b64encode(encode_png(im)).decode() for im in images]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class Generator:
    def __init__(self, settings: dict, watcher):
        from factory.index import load_index
        from factory.registry import TokenRegistry

        s = _setup(settings)
        self.backbone = _backbone(s)
        if self.backbone.generator is None:
            raise ValueError(f"backbone {s.backbone!r} has no generator: /v1/generate and /v1/gair need one")
        registry = TokenRegistry(s.registry, S3Options.from_env())
        self.follower = VersionFollower(watcher, lambda v: TokenState.load(registry, v, self.backbone, with_classes=False),
                                        s.version_check_s)
        self.index = load_index(s.index, S3Options.from_env())

    async def ready(self) -> int:
        return self.follower.current.version

    async def generate(self, prompt: str, n: int, seed: int, steps: int, guidance: float) -> dict:
        state = await self.follower.state()
        try:
            cond = self.backbone.encode_prompts([prompt], state.tokens).hidden
        except (TokenFactoryError, ValueError) as e:
            return prompt_error(e)

        def run() -> np.ndarray:
            from factory.figures import to_uint8

            with torch.no_grad():
                uncond = self.backbone.encode_prompts([""]).hidden
                return to_uint8(self.backbone.generator.sample(cond.expand(n, -1, -1), uncond, steps=steps,
                                                               guidance=guidance, seed=seed))

        images = await asyncio.to_thread(run)
        return {"images": _png_b64(images), "seed": seed, "registry_version": state.version}

    async def gair(self, request: dict[str, Any]) -> dict:
        from factory.gair import ConceptToken, Gair, GairRequest

        state = await self.follower.state()
        missing = [c for c in request["concept_ids"] if c not in state.records]
        if missing:
            return error(404, "unknown_concept", f"no token for concept(s) {', '.join(missing)} in registry "
                                                 f"version {state.version}")
        no_proto = [c for c in request["concept_ids"] if not state.records[c].prototype]
        if no_proto:
            return error(409, "no_prototype", f"concept(s) {', '.join(no_proto)} have no stored prototype (learned by an "
                                              "older version of tokenfactory): onboard them again to use GAIR")
        concepts = {c: ConceptToken(state.tokens[c], state.records[c].parent,
                                    torch.tensor(state.records[c].prototype)) for c in request["concept_ids"]}
        try:
            req = GairRequest(**request)
        except (TokenFactoryError, ValueError) as e:
            return prompt_error(e)
        try:
            res = await asyncio.to_thread(Gair(self.backbone, concepts, self.index), req)
        except (TokenFactoryError, ValueError) as e:
            return prompt_error(e)
        return {"alpha": res.alpha, "registry_version": state.version,
                "steps": [{"alpha": s.alpha, "fidelity": s.fidelity, "intent": s.intent, "score": s.score,
                           "previews": _png_b64(s.previews)} for s in res.steps],
                "ranking": [{"id": i, "uri": u, "score": sc} for i, u, sc in res.ranking]}
