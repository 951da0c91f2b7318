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


@torch.no_grad()
def encode_images(backbone: Backbone, images: np.ndarray, batch_size: int = 256,
                  latents: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [N, H, W, 3] -> (CLIP features [N, D], latents [N, c, h, w] or None)."""
    feats, lats = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i: i + batch_size]
        feats.append(backbone.encode_image(backbone.preprocess(chunk)).float().cpu())
        if latents and backbone.generator is not None:
            px = backbone.generator_pixels(chunk).to(backbone.device)
            lats.append(backbone.generator.encode(px).float().cpu())
    return torch.cat(feats), (torch.cat(lats) if lats else None)


def concept_data(concept_ids: Sequence[str], parents: Sequence[str], features: torch.Tensor,
                 latents: torch.Tensor | None, owner: Sequence[str]) -> list[ConceptData]:
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
