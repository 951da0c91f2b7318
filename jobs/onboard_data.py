"""The Ray Data stage of onboarding: read and validate images, encode each once, group per concept.

    rows (concept_id, parent, uri) -> map_batches(decode, tasks) -> materialise; split off bad images
      -> map_batches(CatalogEncoder, actor pool) -> features + latents -> one `EncodedConcept` each

Bad images (corrupt, truncated, empty, too large, missing) come back as rows with a reason, so they are
reported, never fatal. The encoder is a callable class: each actor loads the frozen backbone once.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from factory.storage import S3Options


def decode_batch(batch: dict, size: int, s3: S3Options | None) -> dict:
    """Read and decode a batch of image URIs; bad ones get a zero image and a non-empty ``error``."""
    from factory import storage
    from factory.images import BadImage, load_rgb

    n = len(batch["uri"])
    images = np.zeros((n, size, size, 3), np.uint8)
    errors = []
    for i, uri in enumerate(batch["uri"]):
        try:
            images[i] = load_rgb(storage.read_bytes(str(uri), s3), size)
            errors.append("")
        except BadImage as e:
            errors.append(str(e))
        except FileNotFoundError:
            errors.append("missing: no such object")
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


def encoder_options(use_gpu: bool) -> dict:
    """Ray Data `map_batches` resources of an encoder actor: a whole GPU with --use-gpu (ViT-L/14 and the
    VAE on a CPU are the slowest part of onboarding), else one CPU."""
    return {"num_gpus": 1} if use_gpu else {}


@dataclass(eq=False)  # holds arrays: compared by identity
class EncodedConcept:
    """One concept's images, encoded once: what the Train workers learn from (NumPy, so it pickles small)."""

    concept_id: str
    parent: str
    features: np.ndarray  # [n, D] image features, not normalised
    latents: np.ndarray | None = None  # [n, ...] diffusion latents (None: the backbone has no generator)
    thumbnails: list[str] = field(default_factory=list)  # a few base64 PNGs for the registry

    def to_concept_data(self):
        """The learner's view (torch tensors)."""
        import torch

        from factory.learner import ConceptData

        # A copy: arrays that come out of Ray's object store are read-only views.
        return ConceptData(self.concept_id, self.parent, torch.tensor(np.asarray(self.features)),
                           None if self.latents is None else torch.tensor(np.asarray(self.latents)))


@dataclass
class EncodedCatalog:
    records: list[EncodedConcept]
    rejected: list[tuple[str, str]]  # (uri, reason)
    images_read: int


def encode_catalog(specs, backbone: str | dict, image_size: int, s3: S3Options | None, batch_size: int = 64,
                   decode_tasks: int = 2, encoders: int = 1, use_gpu: bool = False,
                   precision: str = "fp32") -> EncodedCatalog:
    import ray.data

    from factory.learner import MAX_THUMBNAILS

    rows = [{"concept_id": s.concept_id, "parent": s.parent, "uri": u} for s in specs for u in s.image_uris]
    if not rows:
        return EncodedCatalog([], [], 0)
    decoded = ray.data.from_items(rows).map_batches(
        decode_batch, fn_kwargs={"size": image_size, "s3": s3}, batch_size=batch_size, concurrency=decode_tasks,
    ).materialize()
    bad = decoded.filter(lambda r: r["error"] != "").select_columns(["uri", "error"]).take_all()
    good = decoded.filter(lambda r: r["error"] == "")
    encoded = good.map_batches(
        CatalogEncoder, fn_constructor_kwargs={"backbone": backbone, "weights": None, "s3": s3, "precision": precision,
                                             "thumbnails": True},
        batch_size=batch_size, concurrency=encoders, **encoder_options(use_gpu),
    )
    feats, lats, thumbs, parent = defaultdict(list), defaultdict(list), defaultdict(list), {}
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for i, cid in enumerate(batch["concept_id"]):
            cid = str(cid)
            parent[cid] = str(batch["parent"][i])
            feats[cid].append(batch["features"][i])
            if "latents" in batch:
                lats[cid].append(batch["latents"][i])
            if len(thumbs[cid]) < MAX_THUMBNAILS:
                thumbs[cid].append(str(batch["thumbnail"][i]))
    records = [EncodedConcept(cid, parent[cid], np.stack(feats[cid]), np.stack(lats[cid]) if lats.get(cid) else None,
                              thumbs[cid]) for cid in feats]
    return EncodedCatalog(records, [(str(r["uri"]), str(r["error"])) for r in bad], len(rows))
