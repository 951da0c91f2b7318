"""From decoded concept images to what the learner needs: features, latents and negative banks.

Each image is encoded exactly once (CLIP features and, when a generator is present, diffusion latents);
the learner then loops over these tensors only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

from factory.backbones import Backbone
from factory.learner import ConceptData, NegativeBank

# Images per forward pass when the encoders sit on a GPU. Why a cap, and why 32: the SD VAE encoder holds
# about 322 MiB of activations per 512-px image, so the Ray batch (up to 256 images) in one pass would need
# up to 80 GiB, on a GPU that the encoder actor shares with a Train worker (`jobs.onboard_data`); 32 images
# are about 10 GiB, and measured throughput no longer grows past batch 32-64 (the VAE's GroupNorm is
# memory-bound). The CPU keeps the caller's batch size, so CPU outputs are unchanged.
GPU_ENCODE_BATCH = 32


def to_encoding_device(backbone: Backbone, device: str | torch.device) -> Backbone:
    """Move only what encoding runs through (the image tower and the VAE) to ``device``: the mirror image of
    `Backbone.to_training_device`. The text tower and the UNet stay where they are (on the CPU), which
    spares an encoder actor's GPU their memory (+1.9 GiB in bf16 at SD 1.5 size) for nothing."""
    move = [
        *backbone.image_tower(),
        *([backbone.generator.vae] if backbone.generator and backbone.generator.vae else []),
    ]
    for module in move:
        module.to(device)
    return backbone


def encode_batch_size(batch_size: int, device: torch.device, cap: int | None = None) -> int:
    """Images per forward pass on ``device``: ``batch_size``, capped at ``cap`` (None: `GPU_ENCODE_BATCH`
    off the CPU, no cap on the CPU)."""
    if cap is None:
        cap = batch_size if torch.device(device).type == "cpu" else GPU_ENCODE_BATCH
    return max(1, min(batch_size, cap))


def _images_tensor(images):
    """uint8 arrays become a uint8 tensor [N, H, W, 3] (no copy): it travels to the encoders' device as
    uint8, 4x fewer bytes than float, and is converted and resized there. Other inputs (PIL images)
    are left to `Backbone.preprocess`."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return torch.from_numpy(np.require(images, requirements=["C", "W"]))
    return images


@torch.no_grad()
def encode_images(
    backbone: Backbone, images: np.ndarray, batch_size: int = 256, latents: bool = True, max_batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [N, H, W, 3] -> (CLIP features [N, D], latents [N, c, h, w] or None).

    Computes where the image tower (and the VAE) are: the CPU, or a GPU after `to_encoding_device`.
    ``max_batch`` caps the images per forward pass (None: `encode_batch_size`'s rule for that device)."""
    tower = next(backbone.image_tower()[0].parameters()).device
    gen = backbone.generator if latents else None
    vae = gen.vae if gen is not None else None
    # A pixel-space generator (no VAE) has no encoder: its pixels go to the UNet's device, as `encode` returns them.
    gen_device = next(vae.parameters()).device if vae is not None else tower
    step = encode_batch_size(batch_size, tower, max_batch)
    x_all = _images_tensor(images)
    feats, lats = [], []
    for i in range(0, len(images), step):
        chunk = x_all[i : i + step]
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.to(tower, non_blocking=True)
        feats.append(backbone.encode_image(backbone.preprocess(chunk)).float().cpu())
        if gen is not None:
            if isinstance(chunk, torch.Tensor):
                chunk = chunk.to(gen_device, non_blocking=True)
            lats.append(gen.encode(backbone.generator_pixels(chunk)).float().cpu())
    return torch.cat(feats), (torch.cat(lats) if lats else None)


def concept_data(
    concept_ids: Sequence[str],
    parents: Sequence[str],
    features: torch.Tensor,
    latents: torch.Tensor | None,
    owner: Sequence[str],
) -> list[ConceptData]:
    """Group per-image rows (``owner[i]`` = concept of row i) into one ConceptData per concept."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(owner):
        rows[c].append(i)
    out = []
    for cid, parent in zip(concept_ids, parents):
        idx = torch.tensor(rows.get(cid, []), dtype=torch.long)
        out.append(ConceptData(cid, parent, features[idx], latents[idx] if latents is not None else None))
    return out


def negative_banks(concepts: Iterable[ConceptData]) -> dict[str, NegativeBank]:
    """One bank per parent: every image feature of that parent's concepts, tagged with its owner."""
    feats: dict[str, list[torch.Tensor]] = defaultdict(list)
    owners: dict[str, list[str]] = defaultdict(list)
    for c in concepts:
        feats[c.parent].append(c.image_features)
        owners[c.parent].extend([c.concept_id] * c.image_features.shape[0])
    return {p: NegativeBank(torch.cat(f), owners[p]) for p, f in feats.items()}
