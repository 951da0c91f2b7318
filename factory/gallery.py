"""A gallery of images into a vector index, in one process (`tokenfactory index` is the Ray version)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.concepts import encode_images
from factory.index import VectorIndex, create_index
from factory.onboarding import load_images
from factory.storage import S3Options


def index_images(
    backbone: Backbone, items: Mapping[str, str], backend: str = "exact", s3: S3Options | None = None
) -> tuple[VectorIndex, list[tuple[str, str]]]:
    """Index ``items`` (item id -> image URI) by their normalised CLIP features.

    Returns the index and the images that could not be used, as (uri, reason); they are left out.
    """
    loaded = load_images({item: [uri] for item, uri in items.items()}, backbone.config.image.size, s3)
    if not len(loaded.images):
        raise ValueError(f"none of the {len(items)} gallery images could be read")
    feats, _ = encode_images(backbone, loaded.images, latents=False)
    index = create_index(backend, feats.shape[1])
    index.add(F.normalize(feats, dim=-1).numpy().astype(np.float32), loaded.owners, [items[i] for i in loaded.owners])
    return index, loaded.rejected


__all__ = ["index_images"]
