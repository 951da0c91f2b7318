"""The Ray Data stage of onboarding: read and validate images, encode each once, one row per concept.

    concept rows (concept_id, parent, uris) -> map_batches(decode_concepts, tasks)
      -> map_batches(ConceptEncoder, actor pool) -> (features, latents, thumbnails, rejected) per concept
      -> streamed to the Train workers (`jobs.onboard_train`), never gathered in the driver

A row is a whole concept, not an image, so nothing downstream has to group images back into concepts:
that grouping would need a shuffle or a full materialisation, and the driver's memory would grow with
the catalog. Arrays travel as NumPy ``.npy`` bytes (any shape, an empty one included, no pickle).

Bad images (corrupt, truncated, empty, too large, missing) are listed with a reason in the concept's row,
so they are reported, never fatal. The encoders are callable classes: each actor loads the backbone once.
The per-image `decode_batch` and `CatalogEncoder` serve `tokenfactory index`, which has no concepts.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from factory.storage import S3Options


def decode_batch(batch: dict, size: int, s3: S3Options | None) -> dict:
    """Read and decode a batch of image URIs; bad ones get a zero image and a non-empty ``error``."""
    from factory.onboarding import read_image

    n = len(batch["uri"])
    images = np.zeros((n, size, size, 3), np.uint8)
    errors = []
    for i, uri in enumerate(batch["uri"]):
        image, why = read_image(str(uri), size, s3)
        if image is not None:
            images[i] = image
        errors.append(why or "")
    return {**batch, "image": images, "error": np.array(errors, dtype=object)}


class CatalogEncoder:
    """Ray Data actor: CLIP features and diffusion latents of decoded images."""

    def __init__(self, backbone: str | dict, weights: str | None, s3: S3Options | None, threads: int = 1,
                 latents: bool = True, keep: tuple[str, ...] = ("concept_id", "parent"), precision: str = "fp32",
                 thumbnails: bool = False):
        import torch

        from factory.backbones import PRECISIONS, load_backbone

        torch.set_num_threads(threads)  # several actors share a node: do not oversubscribe its cores
        device = "cuda" if torch.cuda.is_available() and ray_gpu_ids() else "cpu"
        self.backbone = load_backbone(backbone, weights=weights, s3=s3, dtype=PRECISIONS[precision], device=device)
        self.latents, self.keep, self.thumbnails = latents, keep, thumbnails

    def __call__(self, batch: dict) -> dict:
        from factory.concepts import encode_images

        feats, lats = encode_images(self.backbone, np.asarray(batch["image"]), latents=self.latents)
        out = {k: batch[k] for k in self.keep}
        out["features"] = feats.numpy()
        if lats is not None:
            out["latents"] = lats.numpy()
        if self.thumbnails:
            from factory.images import thumbnail_b64

            out["thumbnail"] = np.array([thumbnail_b64(im) for im in np.asarray(batch["image"])], dtype=object)
        return out


def ray_gpu_ids() -> list:
    """The GPUs Ray gave this actor (none unless it was started with num_gpus)."""
    import ray

    return ray.get_gpu_ids() if ray.is_initialized() else []


def encoder_options(use_gpu: bool, num_cpus: float | None = None) -> dict:
    """Ray Data `map_batches` resources of an encoder actor: a whole GPU with --use-gpu (ViT-L/14 and the
    VAE on a CPU are the slowest part of onboarding), else ``num_cpus`` (None: Ray's default of one)."""
    if use_gpu:
        return {"num_gpus": 1}
    return {} if num_cpus is None else {"num_cpus": num_cpus}


def pack(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes: one binary Arrow cell whatever its shape (a concept's image count varies)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def concept_rows(specs) -> list[dict]:
    """One Ray Data row per concept, sorted by (parent, id) so a Train worker's chunks mostly share a parent
    (the image-side CE compares the concepts of a chunk)."""
    return [{"concept_id": s.concept_id, "parent": s.parent, "uris": json.dumps(list(s.image_uris))}
            for s in sorted(specs, key=lambda s: (s.parent, s.concept_id))]


def decode_concepts(batch: dict, size: int, s3: S3Options | None) -> dict:
    """Read and decode each concept's images: ``images`` (packed uint8 [n, S, S, 3], good ones only) and
    ``rejected`` (JSON list of [uri, reason]) per concept."""
    from factory.onboarding import read_image

    images, rejected = [], []
    for uris in batch["uris"]:
        good, bad = [], []
        for uri in json.loads(str(uris)):
            image, why = read_image(uri, size, s3)
            if image is not None:
                good.append(image)
            else:
                bad.append([uri, why])
        images.append(pack(np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)))
        rejected.append(json.dumps(bad))
    return {"concept_id": batch["concept_id"], "parent": batch["parent"],
            "images": np.array(images, dtype=object), "rejected": np.array(rejected, dtype=object)}


class ConceptEncoder(CatalogEncoder):
    """Ray Data actor: a batch of concept rows -> packed features, latents and a few thumbnails each.
    All images of the batch go through the encoders together (one forward pass, not one per concept)."""

    def __init__(self, backbone: str | dict, s3: S3Options | None, precision: str = "fp32", latents: bool = True,
                 thumbnails: bool = True, threads: int = 1):
        super().__init__(backbone, None, s3, threads=threads, latents=latents, precision=precision)
        self.with_thumbnails = thumbnails

    def __call__(self, batch: dict) -> dict:
        from factory.concepts import encode_images
        from factory.images import thumbnail_b64
        from factory.learner import MAX_THUMBNAILS

        per_concept = [unpack(b) for b in batch["images"]]
        counts = [len(x) for x in per_concept]
        feats = lats = None
        if sum(counts):
            feats, lats = encode_images(self.backbone, np.concatenate([x for x in per_concept if len(x)]),
                                        latents=self.latents)
        out = {k: [] for k in ("features", "latents", "thumbnails")}
        start = 0
        for images, n in zip(per_concept, counts):
            part = slice(start, start + n)
            start += n
            out["features"].append(pack(feats[part].numpy() if n else np.zeros((0, 0), np.float32)))
            out["latents"].append(pack(lats[part].numpy()) if n and lats is not None else b"")
            thumbs = [thumbnail_b64(im) for im in images[:MAX_THUMBNAILS]] if self.with_thumbnails else []
            out["thumbnails"].append(json.dumps(thumbs))
        return {"concept_id": batch["concept_id"], "parent": batch["parent"], "rejected": batch["rejected"],
                "n_images": np.array(counts, dtype=np.int64),
                **{k: np.array(v, dtype=object) for k, v in out.items()}}


@dataclass(eq=False)  # holds arrays: compared by identity
class EncodedConcept:
    """One concept's images, encoded once: what a Train worker learns from (NumPy)."""

    concept_id: str
    parent: str
    features: np.ndarray  # [n, D] image features, not normalised
    latents: np.ndarray | None = None  # [n, ...] diffusion latents (None: the backbone has no generator)
    thumbnails: list[str] = field(default_factory=list)  # a few base64 PNGs for the registry
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason) of its unusable images

    @classmethod
    def rows_of(cls, batch: dict) -> list["EncodedConcept"]:
        """The concepts of one encoded Ray Data batch (numpy format)."""
        out = []
        for i, cid in enumerate(batch["concept_id"]):
            lat = bytes(batch["latents"][i])
            out.append(cls(str(cid), str(batch["parent"][i]), unpack(bytes(batch["features"][i])),
                           unpack(lat) if lat else None, json.loads(str(batch["thumbnails"][i])),
                           [tuple(r) for r in json.loads(str(batch["rejected"][i]))]))
        return out

    def to_concept_data(self):
        """The learner's view (torch tensors)."""
        import torch

        from factory.learner import ConceptData

        # A copy: arrays that come out of Ray's object store are read-only views.
        return ConceptData(self.concept_id, self.parent, torch.tensor(np.asarray(self.features)),
                           None if self.latents is None else torch.tensor(np.asarray(self.latents)))


STREAM_DECODE_CPUS = 0.25  # per decode task (I/O and PNG decoding)
STREAM_ENCODER_CPUS = 0.5  # per encoder actor on a CPU node


def encoded_concepts(specs, backbone: dict, image_size: int, s3: S3Options | None, batch_size: int = 8,
                     decode_tasks: int = 2, encoders: int = 1, use_gpu: bool = False, precision: str = "fp32",
                     latents: bool = True, thumbnails: bool = True):
    """The lazy Ray Dataset of `specs`' concepts, encoded (one row per concept; see the module docstring).
    ``batch_size`` counts concepts. Nothing runs until a consumer (the Train workers) iterates it."""
    import ray.data

    # Fractional CPUs: this pipeline runs *beside* the Train workers that consume it. Whole-CPU tasks
    # and actors would leave a small node no CPU for the decode tasks once the encoder actor and the
    # workers hold theirs, and the stream would stall (measured: a 2-CPU node deadlocked).
    return ray.data.from_items(concept_rows(specs)).map_batches(
        decode_concepts, fn_kwargs={"size": image_size, "s3": s3}, batch_size=batch_size, concurrency=decode_tasks,
        num_cpus=STREAM_DECODE_CPUS,
    ).map_batches(
        ConceptEncoder, fn_constructor_kwargs={"backbone": backbone, "s3": s3, "precision": precision,
                                               "latents": latents, "thumbnails": thumbnails},
        batch_size=batch_size, concurrency=encoders, **encoder_options(use_gpu, STREAM_ENCODER_CPUS),
    )


def bank_sample(specs, bank_size: int) -> list:
    """The concepts whose images make up the negative banks: per parent, concepts in a fixed pseudo-random
    order (a hash of the id, so the choice does not depend on catalog order or on which worker asks)
    until ``bank_size`` images are covered. A parent with fewer images keeps all of them, so a small
    catalog's banks are exactly "every image of the parent"; a large one's stay bounded, which keeps the
    memory and the per-step cost of the text-side CE flat however many concepts a parent has."""
    import hashlib
    from collections import defaultdict

    by_parent = defaultdict(list)
    for s in specs:
        by_parent[s.parent].append(s)
    chosen = []
    for group in by_parent.values():
        group.sort(key=lambda s: hashlib.sha1(s.concept_id.encode()).hexdigest())
        images = 0
        for s in group:
            if bank_size and images >= bank_size:
                break
            chosen.append(s)
            images += len(s.image_uris)
    return chosen


def banks_of(sample, min_images: int) -> dict:
    """parent -> NegativeBank from the encoded `bank_sample` (a Ray Dataset; only its features reach the
    driver, at most about ``bank_size`` images per parent). Concepts the job will skip (fewer than
    ``min_images`` usable images) are left out, as they were when banks held the whole catalog."""
    import torch

    from factory.learner import NegativeBank

    feats, owners = {}, {}
    for batch in sample.select_columns(["concept_id", "parent", "features"]).iter_batches(
            batch_size=None, batch_format="numpy"):
        for i, cid in enumerate(batch["concept_id"]):
            f = unpack(bytes(batch["features"][i]))
            if len(f) < max(1, min_images):
                continue
            parent = str(batch["parent"][i])
            feats.setdefault(parent, []).append(torch.from_numpy(np.array(f)))
            owners.setdefault(parent, []).extend([str(cid)] * len(f))
    return {p: NegativeBank(torch.cat(f), owners[p]) for p, f in feats.items()}


def concept_stream(specs, todo_ids: set[str], bank_size: int, min_images: int, **encode):
    """(banks, the Ray Dataset of the concepts to learn). The bank sample is encoded first and kept in
    Ray's object store (bounded by ``bank_size``), so its concepts stream to the workers from there and
    every image is still encoded exactly once; the rest of ``todo_ids`` is encoded as the workers pull."""
    sample = bank_sample(specs, bank_size)
    encoded = encoded_concepts(sample, **encode).materialize()
    banks = banks_of(encoded, min_images)
    in_sample = {s.concept_id for s in sample}
    drop = in_sample - todo_ids  # staged by an earlier attempt of this run: in the banks, not re-learned
    stream = encoded.filter(lambda row: row["concept_id"] not in drop) if drop else encoded
    rest = [s for s in specs if s.concept_id in todo_ids and s.concept_id not in in_sample]
    return banks, (stream.union(encoded_concepts(rest, **encode)) if rest else stream)
