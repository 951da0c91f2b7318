"""Onboarding a catalog in one process: images -> features and latents -> tokens -> registry rows.

The same steps the Ray job distributes (`jobs/onboard.py`), as plain functions: the demo and the
benchmarks call them directly, Ray Data and Ray Train workers call them on their shards.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, TypeVar

import numpy as np
import torch

from factory import storage
from factory.backbones import Backbone, BackboneConfig
from factory.concepts import concept_data, encode_images, negative_banks
from factory.images import BadImage, load_rgb, thumbnail_b64
from factory.learner import ConceptData, LearnedToken, LearnerConfig, NegativeBank, learn_tokens
from factory.storage import S3Options
from schemas import ConceptSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedImages:
    images: np.ndarray  # uint8 [N, S, S, 3]
    owners: list[str]  # concept id of each image
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)


def image_size_for(config: BackboneConfig) -> int:
    """One size that serves both encoders (each resizes further if it needs less)."""
    return max(config.image.size, config.generator.image_size if config.generator is not None else 0)


def read_image(uri: str, size: int, s3: S3Options | None = None) -> tuple[np.ndarray | None, str | None]:
    """(uint8 image [size, size, 3], None), or (None, why) for a bad or missing one: never raises for bad data."""
    try:
        return load_rgb(storage.read_bytes(uri, s3), size), None
    except BadImage as e:
        return None, str(e)
    except FileNotFoundError:
        return None, "missing: no such object"


def load_images(
    uris_by_concept: dict[str, Sequence[str]], size: int, s3: S3Options | None = None, threads: int = 8
) -> LoadedImages:
    """Read and validate every image; a bad or missing one is listed with its reason, never fatal."""
    jobs = [(cid, uri) for cid, uris in uris_by_concept.items() for uri in uris]

    def one(job):
        cid, uri = job
        return (cid, uri, *read_image(uri, size, s3))

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, jobs))
    good = [(cid, img) for cid, _, img, _ in results if img is not None]
    images = np.stack([g[1] for g in good]) if good else np.zeros((0, size, size, 3), np.uint8)
    return LoadedImages(images, [g[0] for g in good], [(uri, why) for _, uri, img, why in results if img is None])


def skip_reason(usable_images: int, min_images: int) -> str | None:
    """Why a concept with this many usable images is skipped, or None if it is learned."""
    return f"only {usable_images} usable image(s), need {min_images}" if usable_images < min_images else None


def too_few_images(specs: Sequence[ConceptSpec], counts: Mapping[str, int], min_images: int) -> dict[str, str]:
    """Concepts (id -> reason) with fewer than ``min_images`` usable images; ``counts`` maps id -> count."""
    reasons = {s.concept_id: skip_reason(counts.get(s.concept_id, 0), min_images) for s in specs}
    return {cid: why for cid, why in reasons.items() if why}


def prepare_concepts(
    backbone: Backbone,
    specs: Sequence[ConceptSpec],
    s3: S3Options | None = None,
    min_images: int = 1,
    latents: bool = True,
) -> tuple[list[ConceptData], LoadedImages, dict[str, str]]:
    """Load and encode the few-shot images of ``specs``; returns the usable concepts, the load result and
    the concepts skipped (id -> reason) for having fewer than ``min_images`` good images."""
    loaded = load_images({s.concept_id: s.image_uris for s in specs}, image_size_for(backbone.config), s3)
    feats, lats = encode_images(backbone, loaded.images, latents=latents) if len(loaded.images) else (None, None)
    skipped = too_few_images(specs, Counter(loaded.owners), min_images)
    keep = [s for s in specs if s.concept_id not in skipped]
    if not keep:
        return [], loaded, skipped
    data = concept_data([s.concept_id for s in keep], [s.parent for s in keep], feats, lats, loaded.owners)
    return data, loaded, skipped


class _Owned(Protocol):
    concept_id: str
    parent: str


_C = TypeVar("_C", bound=_Owned)


def chunks_by_parent(concepts: Sequence[_C], size: int, catalog: Sequence[_Owned] | None = None) -> list[list[_C]]:
    """Chunks of at most ``size`` concepts, concepts of one parent kept together where possible. The one
    rule for every learner call (the image-side CE couples a chunk's concepts): the onboarding job applies
    it to the catalog's specs, local onboarding and the evaluation's ablations to learner data, so the
    same catalog gives the same chunks everywhere, whatever the order it arrives in.

    ``catalog``: form the chunks over these concepts instead and keep only the members in ``concepts``
    (empty chunks dropped). The job chunks the whole catalog before it knows which concepts have too few
    usable images, so a learner that sees only the registry's concepts chunks the catalog to match it."""
    ordered = sorted(catalog if catalog is not None else concepts, key=lambda c: (c.parent, c.concept_id))
    chunks = [list(ordered[i : i + size]) for i in range(0, len(ordered), size)]
    if catalog is None:
        return chunks
    by_id = {c.concept_id: c for c in concepts}
    kept = [[by_id[c.concept_id] for c in chunk if c.concept_id in by_id] for chunk in chunks]
    return [chunk for chunk in kept if chunk]


def learn_in_chunks(
    backbone: Backbone,
    concepts: Sequence[ConceptData],
    banks: dict[str, NegativeBank],
    config: LearnerConfig,
    concepts_per_step: int,
    on_chunk: Callable[[list[LearnedToken]], None] | None = None,
    catalog: Sequence[_Owned] | None = None,
) -> list[LearnedToken]:
    """Learn ``concepts`` C at a time, in the chunks `chunks_by_parent` forms (over ``catalog`` when given);
    ``on_chunk`` sees each chunk's tokens as soon as they exist."""
    out = []
    for chunk in chunks_by_parent(concepts, concepts_per_step, catalog=catalog):
        t0 = time.perf_counter()
        tokens = learn_tokens(backbone, chunk, banks, config)
        log.debug("learned %d concepts in %.1fs", len(chunk), time.perf_counter() - t0)
        out.extend(tokens)
        if on_chunk is not None:
            on_chunk(tokens)
    return out


def heldout_features(
    backbone: Backbone, specs: Sequence[ConceptSpec], s3: S3Options | None = None
) -> dict[str, torch.Tensor]:
    """CLIP features of each concept's held-out images (for evaluation)."""
    loaded = load_images(
        {s.concept_id: s.heldout_uris for s in specs if s.heldout_uris}, backbone.config.image.size, s3
    )
    if not len(loaded.images):
        return {}
    feats, _ = encode_images(backbone, loaded.images, latents=False)
    owners = np.array(loaded.owners)
    return {cid: feats[torch.from_numpy(np.nonzero(owners == cid)[0])] for cid in dict.fromkeys(loaded.owners)}


def learn_and_commit(
    registry,
    specs: Sequence[ConceptSpec],
    run_id: str,
    backbone: Backbone,
    config: LearnerConfig,
    concepts_per_step: int = 8,
    s3: S3Options | None = None,
) -> int:
    """Onboard ``specs`` in this process and commit them as one registry version; returns its number.

    The single-process counterpart of `tokenfactory onboard` (no Ray): for small catalogs, tests and
    benchmarks. ``registry`` is a `factory.registry.TokenRegistry`.
    """
    from factory.learner import to_record

    data, loaded, skipped = prepare_concepts(backbone, specs, s3, latents=config.weights.ti > 0)
    if not data:
        raise ValueError(f"no concept has a usable image ({len(skipped)} skipped)")
    # Chunked over the whole catalog, as the Ray job chunks it: a skipped concept does not shift the chunks.
    learned = learn_in_chunks(backbone, data, negative_banks(data), config, concepts_per_step, catalog=specs)
    thumbs = thumbnails_of(loaded)
    writer = registry.begin(run_id, backbone.name, backbone.fingerprint())
    writer.write_shard("all", [to_record(t, backbone, run_id, thumbs.get(t.concept_id)) for t in learned])
    return writer.commit()


def thumbnails_of(loaded: LoadedImages, per_concept: int = 3) -> dict[str, list[str]]:
    """The first few images of each concept as small base64 PNGs (stored with its token)."""
    out: dict[str, list[str]] = {}
    for image, cid in zip(loaded.images, loaded.owners):
        if len(out.setdefault(cid, [])) < per_concept:
            out[cid].append(thumbnail_b64(image))
    return out


__all__ = [
    "LoadedImages",
    "chunks_by_parent",
    "heldout_features",
    "image_size_for",
    "learn_and_commit",
    "learn_in_chunks",
    "load_images",
    "negative_banks",
    "prepare_concepts",
    "read_image",
    "skip_reason",
    "thumbnails_of",
    "too_few_images",
]
