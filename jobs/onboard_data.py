"""The Ray Data stage of onboarding: read and validate images, encode each once, one row per chunk.

    chunk rows (chunk, concept ids, parents, uris) -> map_batches(decode_chunks, tasks)
      -> map_batches(ChunkEncoder, actor pool) -> (features, latents, thumbnails, rejected) per concept
      -> streamed to the Train workers (`jobs.onboard_train`), never gathered in the driver

A row is a whole chunk of C concepts (what one learner call learns together), not an image or a concept,
so nothing downstream has to group rows back: that grouping would need a shuffle or a full
materialisation, and the driver's memory would grow with the catalog. Chunks are formed once from the
catalog (`factory.onboarding.chunks_by_parent`), so the tokens do not depend on how the stream is split
over workers. Arrays travel as NumPy ``.npz`` bytes (any shape, an empty one included, no pickle).

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

    def __init__(
        self,
        backbone: str | dict,
        weights: str | None,
        s3: S3Options | None,
        threads: int = 1,
        latents: bool = True,
        keep: tuple[str, ...] = ("concept_id", "parent"),
        precision: str = "fp32",
        thumbnails: bool = False,
    ):
        import torch

        from factory.backbones import PRECISIONS, load_backbone
        from factory.concepts import to_encoding_device

        torch.set_num_threads(threads)  # several actors share a node: do not oversubscribe its cores
        cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        device = actor_device(bool(ray_gpu_ids()), cuda, gpu_stand_in())
        # Loaded on the CPU; only the image tower and the VAE go to the GPU (the encoders never run the text
        # tower or the UNet, and the GPU is shared with a Train worker: see `plan_placement`).
        self.backbone = load_backbone(backbone, weights=weights, s3=s3, dtype=PRECISIONS[precision])
        if device.type != "cpu":
            from factory.device import configure_cuda_math

            configure_cuda_math()
            to_encoding_device(self.backbone, device)
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


# Set (to anything but "" or "0") in a Ray cluster's runtime env to let the CPU stand in for a GPU that the
# cluster only *declares* (`ray.init(num_gpus=1)` on a machine without CUDA). For tests of GPU placement on
# CPU machines only: without it, a GPU that Ray hands out and torch cannot see is an error.
GPU_STAND_IN_ENV = "TOKENFACTORY_CPU_STANDS_IN_FOR_GPU"


def gpu_stand_in() -> bool:
    import os

    return os.environ.get(GPU_STAND_IN_ENV, "") not in ("", "0")


def actor_device(ray_gave_gpu: bool, cuda_device, stand_in: bool = False):
    """The torch device of a Ray actor or Train worker: ``cuda_device`` (what torch sees, None when it sees
    no GPU) when Ray gave it a GPU, else the CPU. A GPU that Ray gave and torch cannot see (no driver, a
    CPU build of torch, CUDA_VISIBLE_DEVICES emptied) is a `DeviceError`, never a silent CPU run that
    holds the GPU's reservation: except under `GPU_STAND_IN_ENV`, for tests."""
    import torch

    from factory.errors import DeviceError

    if not ray_gave_gpu:
        return torch.device("cpu")
    if cuda_device is not None:
        return torch.device(cuda_device)
    if stand_in:
        return torch.device("cpu")
    raise DeviceError(
        "Ray gave this worker a GPU but torch sees none (no CUDA driver, or a CPU build of torch): "
        "fix the node's CUDA setup or drop --use-gpu"
    )


# The GPU share of one encoder actor under --use-gpu; a Train worker takes the rest of its GPU (1 - this).
# Why a fraction, and why 0.2: encoding is about 3 % of a concept's GPU time (an image is encoded once, a
# token takes 150 learner steps), so a whole GPU per encoder mostly idles and, on a one-GPU node, left the
# Train worker nothing (the job waited on resources for ever). 0.2 lets one encoder share each worker's GPU
# (0.8 + 0.2 = 1) and five share a free one. Ray counts these shares only: memory is not partitioned, and
# an encoder holds the image tower, the VAE and `factory.concepts.GPU_ENCODE_BATCH` images' activations
# (about 11 GiB at SD 1.5 / 512 px in bf16) beside the worker. Tenths keep Ray's fixed-point sums exact.
ENCODER_GPU_SHARE = 0.2


def encoder_options(use_gpu: bool, num_cpus: float | None = None) -> dict:
    """Ray Data `map_batches` resources of an encoder actor: `ENCODER_GPU_SHARE` of a GPU with --use-gpu
    (ViT-L/14 and the VAE on a CPU are the slowest part of onboarding), plus ``num_cpus`` (None: Ray's
    default of one)."""
    out = {} if num_cpus is None else {"num_cpus": num_cpus}
    if use_gpu:
        out["num_gpus"] = ENCODER_GPU_SHARE
    return out


@dataclass(frozen=True)
class Placement:
    """Where a job's Ray actors go: its Train workers' count and resources, its encoder actors' options."""

    workers: int  # Train workers (--workers, capped at the GPUs with --use-gpu)
    worker_resources: dict  # `ScalingConfig.resources_per_worker`
    encoder_options: dict  # `map_batches` resources of one encoder actor
    capped_from: int | None = None  # the --workers asked for, when the GPUs capped it


def plan_placement(
    gpus: float,
    workers: int,
    use_gpu: bool,
    encoders: int = 1,
    cpus_per_worker: float | None = None,
    encoder_cpus: float | None = None,
) -> Placement:
    """The resources of ``workers`` Train workers and ``encoders`` encoder actors on a cluster of ``gpus``
    GPUs (`ray.cluster_resources()["GPU"]`): a pure function, so the rule is tested without a cluster.

    Without ``use_gpu`` nothing asks for a GPU. With it, a worker asks for ``1 - ENCODER_GPU_SHARE`` of a GPU
    and an encoder for ``ENCODER_GPU_SHARE``; workers are capped at the whole GPUs (each needs most of one,
    two never share). Ray places a fractional request on one GPU, so encoders fit one beside each worker
    and ``1 / ENCODER_GPU_SHARE`` on each GPU no worker holds. A request that cannot fit raises
    `DeviceError` now: Ray would otherwise wait for resources that never come, silently."""
    from factory.errors import ConfigError, DeviceError

    if workers < 0 or encoders < 1:
        raise ConfigError(f"workers must be >= 0 and encoders >= 1, got {workers} and {encoders}")
    cpu = {} if cpus_per_worker is None else {"CPU": cpus_per_worker}
    if not use_gpu:
        return Placement(workers, cpu, encoder_options(False, encoder_cpus))
    n = int(gpus + 1e-9)  # a cluster's GPU total is whole; the epsilon only guards a float sum
    if n < 1:
        raise DeviceError(
            f"--use-gpu was given but the Ray cluster has no GPU (cluster resources: GPU={gpus:g}): "
            "drop --use-gpu, or start Ray on GPU nodes (`ray start --num-gpus N`)"
        )
    placed = min(workers, n)
    per_free_gpu = int(1 / ENCODER_GPU_SHARE + 1e-9)
    room = placed + (n - placed) * per_free_gpu
    if encoders > room:
        raise DeviceError(
            f"{encoders} encoder actors at {ENCODER_GPU_SHARE:g} GPU each do not fit beside {placed} "
            f"Train worker(s) at {1 - ENCODER_GPU_SHARE:g} GPU each on {n} GPU(s): at most {room}; "
            "lower --encoders (or --workers)"
        )
    resources = {**cpu, "GPU": round(1 - ENCODER_GPU_SHARE, 6)} if placed else cpu
    return Placement(
        placed, resources, encoder_options(True, encoder_cpus), capped_from=workers if placed < workers else None
    )


def chunk_rows(chunks) -> list[dict]:
    """One Ray Data row per chunk of concepts (`factory.onboarding.chunks_by_parent` over the specs): the
    chunk is the unit the learner's image-side CE couples, so it is formed once, here, from the catalog
    alone, and the same catalog and C give the same chunks (and tokens) whatever the worker count or the
    order in which the stream reaches the workers. Per-concept fields are JSON lists in chunk order."""
    return [
        {
            "chunk": chunk[0].concept_id,
            "concept_id": json.dumps([s.concept_id for s in chunk]),
            "parent": json.dumps([s.parent for s in chunk]),
            "uris": json.dumps([list(s.image_uris) for s in chunk]),
        }
        for chunk in chunks
    ]


def pack_many(arrays: list[np.ndarray]) -> bytes:
    """Several arrays (one per concept of a chunk) as one ``.npz`` cell, in order; no pickle."""
    buf = io.BytesIO()
    np.savez(buf, *[np.ascontiguousarray(a) for a in arrays])
    return buf.getvalue()


def unpack_many(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def decode_chunks(batch: dict, size: int, s3: S3Options | None) -> dict:
    """Read and decode each chunk's images: ``images`` (per concept a uint8 [n, S, S, 3] of its good
    images, `pack_many`) and ``rejected`` (per concept a JSON list of [uri, reason])."""
    from factory.onboarding import read_image

    images, rejected = [], []
    for uris_json in batch["uris"]:
        per_concept, bad_per_concept = [], []
        for uris in json.loads(str(uris_json)):
            good, bad = [], []
            for uri in uris:
                image, why = read_image(uri, size, s3)
                if image is not None:
                    good.append(image)
                else:
                    bad.append([uri, why])
            per_concept.append(np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8))
            bad_per_concept.append(bad)
        images.append(pack_many(per_concept))
        rejected.append(json.dumps(bad_per_concept))
    return {
        "chunk": batch["chunk"],
        "concept_id": batch["concept_id"],
        "parent": batch["parent"],
        "images": np.array(images, dtype=object),
        "rejected": np.array(rejected, dtype=object),
    }


class ChunkEncoder(CatalogEncoder):
    """Ray Data actor: a batch of decoded chunks -> per concept packed features, latents and a few
    thumbnails. All images of the batch go through the encoders together (one forward pass)."""

    def __init__(
        self,
        backbone: str | dict,
        s3: S3Options | None,
        precision: str = "fp32",
        latents: bool = True,
        thumbnails: bool = True,
        threads: int = 1,
    ):
        super().__init__(backbone, None, s3, threads=threads, latents=latents, precision=precision)
        self.with_thumbnails = thumbnails

    def __call__(self, batch: dict) -> dict:
        from factory.concepts import encode_images
        from factory.images import thumbnail_b64
        from factory.learner import MAX_THUMBNAILS

        chunks = [unpack_many(bytes(b)) for b in batch["images"]]
        flat = [x for chunk in chunks for x in chunk]
        feats = lats = None
        if sum(len(x) for x in flat):
            feats, lats = encode_images(
                self.backbone, np.concatenate([x for x in flat if len(x)]), latents=self.latents
            )
        out = {k: [] for k in ("features", "latents", "thumbnails")}
        start = 0
        for chunk in chunks:
            f, lat, thumbs = [], [], []
            for images in chunk:
                part = slice(start, start + len(images))
                start += len(images)
                f.append(feats[part].numpy() if len(images) else np.zeros((0, 0), np.float32))
                lat.append(lats[part].numpy() if len(images) and lats is not None else np.zeros(0, np.float32))
                thumbs.append([thumbnail_b64(im) for im in images[:MAX_THUMBNAILS]] if self.with_thumbnails else [])
            out["features"].append(pack_many(f))
            out["latents"].append(pack_many(lat) if lats is not None else b"")
            out["thumbnails"].append(json.dumps(thumbs))
        return {
            "chunk": batch["chunk"],
            "concept_id": batch["concept_id"],
            "parent": batch["parent"],
            "rejected": batch["rejected"],
            **{k: np.array(v, dtype=object) for k, v in out.items()},
        }


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
    def chunks_of(cls, batch: dict) -> list[list["EncodedConcept"]]:
        """The chunks of one encoded Ray Data batch (numpy format), each a list of its concepts."""
        out = []
        for i in range(len(batch["chunk"])):
            ids, parents = json.loads(str(batch["concept_id"][i])), json.loads(str(batch["parent"][i]))
            feats = unpack_many(bytes(batch["features"][i]))
            lat = bytes(batch["latents"][i])
            lats = unpack_many(lat) if lat else [None] * len(ids)
            thumbs, rejected = json.loads(str(batch["thumbnails"][i])), json.loads(str(batch["rejected"][i]))
            out.append(
                [
                    cls(cid, parent, f, lt if lt is not None and len(f) else None, th, [tuple(r) for r in rj])
                    for cid, parent, f, lt, th, rj in zip(ids, parents, feats, lats, thumbs, rejected)
                ]
            )
        return out

    def to_concept_data(self):
        """The learner's view (torch tensors)."""
        import torch

        from factory.learner import ConceptData

        # A copy: arrays that come out of Ray's object store are read-only views.
        return ConceptData(
            self.concept_id,
            self.parent,
            torch.tensor(np.asarray(self.features)),
            None if self.latents is None else torch.tensor(np.asarray(self.latents)),
        )


STREAM_DECODE_CPUS = 0.25  # per decode task (I/O and PNG decoding)
STREAM_ENCODER_CPUS = 0.5  # per encoder actor on a CPU node


@dataclass(frozen=True)
class EncodeSettings:
    """How the onboarding stream reads and encodes a chunk's images (`encoded_chunks`): one typed value from
    the driver's `OnboardConfig` (`jobs.onboard.onboard`), not a dict of keywords passed along."""

    backbone: dict  # the resolved backbone config, as plain data (each encoder actor loads it once)
    image_size: int  # images are decoded to this square size (`factory.onboarding.image_size_for`)
    s3: S3Options | None = field(default=None, repr=False)  # may hold keys: never printed
    batch_size: int = 1  # chunks per Ray Data batch
    decode_tasks: int = 2
    encoders: int = 1  # image-encoder actors
    use_gpu: bool = False  # encoders take `ENCODER_GPU_SHARE` of a GPU each
    precision: str = "fp32"  # of the image tower and the VAE
    latents: bool = True  # diffusion latents too (the TI term needs them)
    thumbnails: bool = True


def encoded_chunks(chunks, encode: EncodeSettings):
    """The lazy Ray Dataset of ``chunks`` (lists of specs), encoded: one row per chunk (see `chunk_rows`).
    ``encode.batch_size`` counts chunks. Nothing runs until a consumer (the Train workers) iterates it."""
    import ray.data

    # Fractional CPUs: this pipeline runs *beside* the Train workers that consume it. Whole-CPU tasks
    # and actors would leave a small node no CPU for the decode tasks once the encoder actor and the
    # workers hold theirs, and the stream would stall (measured: a 2-CPU node deadlocked).
    return (
        ray.data.from_items(chunk_rows(chunks))
        .map_batches(
            decode_chunks,
            fn_kwargs={"size": encode.image_size, "s3": encode.s3},
            batch_size=encode.batch_size,
            compute=ray.data.TaskPoolStrategy(size=encode.decode_tasks),
            num_cpus=STREAM_DECODE_CPUS,
        )
        .map_batches(
            ChunkEncoder,
            fn_constructor_kwargs={
                "backbone": encode.backbone,
                "s3": encode.s3,
                "precision": encode.precision,
                "latents": encode.latents,
                "thumbnails": encode.thumbnails,
            },
            batch_size=encode.batch_size,
            compute=ray.data.ActorPoolStrategy(size=encode.encoders),
            **encoder_options(encode.use_gpu, STREAM_ENCODER_CPUS),
        )
    )


def bank_sample(chunks, bank_size: int) -> list:
    """The chunks whose images make up the negative banks: per parent, its chunks in a fixed pseudo-random
    order (a hash of the chunk's first id, so the choice does not depend on catalog order or on which
    worker asks) until ``bank_size`` images of that parent are covered. Whole chunks, so the sample is
    encoded once and streams on to the workers as it is. A parent with fewer images keeps all of them,
    so a small catalog's banks are exactly "every image of the parent"; a large one's stay bounded, which
    keeps the memory and the per-step cost of the text-side CE flat however many concepts a parent has."""
    import hashlib
    from collections import defaultdict

    by_parent = defaultdict(list)
    for chunk in chunks:
        for parent in dict.fromkeys(s.parent for s in chunk):
            by_parent[parent].append(chunk)
    chosen = {}
    for parent, group in by_parent.items():
        group = sorted(group, key=lambda c: hashlib.sha1(c[0].concept_id.encode()).hexdigest())
        images = 0
        for chunk in group:
            if bank_size and images >= bank_size:
                break
            chosen[chunk[0].concept_id] = chunk
            images += sum(len(s.image_uris) for s in chunk if s.parent == parent)
    return [c for c in chunks if c[0].concept_id in chosen]


def banks_of(sample, min_images: int) -> dict:
    """parent -> NegativeBank from the encoded `bank_sample` (a Ray Dataset of chunk rows; only features
    reach the driver, about ``bank_size`` images per parent plus a chunk). Concepts the job will skip
    (fewer than ``min_images`` usable images) are left out, as they were when banks held the whole catalog."""
    import torch

    from factory.learner import NegativeBank

    feats, owners = {}, {}
    for batch in sample.select_columns(["chunk", "concept_id", "parent", "features"]).iter_batches(
        batch_size=None, batch_format="numpy"
    ):
        for ids, parents, packed in zip(batch["concept_id"], batch["parent"], batch["features"]):
            for cid, parent, f in zip(json.loads(str(ids)), json.loads(str(parents)), unpack_many(bytes(packed))):
                if len(f) < max(1, min_images):
                    continue
                feats.setdefault(parent, []).append(torch.from_numpy(np.array(f)))
                owners.setdefault(parent, []).extend([cid] * len(f))
    return {p: NegativeBank(torch.cat(f), owners[p]) for p, f in feats.items()}


def concept_stream(
    specs, todo_ids: set[str], bank_size: int, min_images: int, concepts_per_step: int, encode: EncodeSettings
):
    """(banks, the Ray Dataset of the chunks to learn, how many chunks it holds). Chunks are formed once from
    the whole catalog (`chunks_by_parent`), so a resumed run learns the same chunks as an uninterrupted one; a chunk is
    streamed while any of its concepts is still to do (the workers drop the done ones). The bank sample
    is encoded first and kept in Ray's object store (bounded by ``bank_size``), so its chunks stream to
    the workers from there and every image is still encoded exactly once; the rest is encoded as the
    workers pull."""
    from ray.data.expressions import col

    from factory.onboarding import chunks_by_parent

    chunks = chunks_by_parent(specs, concepts_per_step)
    sample = bank_sample(chunks, bank_size)
    encoded = encoded_chunks(sample, encode).materialize()
    banks = banks_of(encoded, min_images)
    in_sample = {c[0].concept_id for c in sample}
    keep = {c[0].concept_id for c in sample if any(s.concept_id in todo_ids for s in c)}
    # An expression, not a Python lambda: Ray evaluates it on the Arrow block without a row-by-row call.
    stream = encoded.filter(expr=col("chunk").is_in(sorted(keep))) if len(keep) < len(sample) else encoded
    rest = [c for c in chunks if c[0].concept_id not in in_sample and any(s.concept_id in todo_ids for s in c)]
    return banks, (stream.union(encoded_chunks(rest, encode)) if rest else stream), len(keep) + len(rest)
