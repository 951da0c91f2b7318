"""open_clip CLIP (OpenCLIP ViT-H/14 + Stable Diffusion 2.x in production)."""
from __future__ import annotations

import torch
from torch import nn

from factory.backbones.base import Backbone, TextEncoding
from factory.backbones.config import BackboneConfig
from factory.tokens.injection import pool_at


class OpenClipBackbone(Backbone):
    def __init__(self, config: BackboneConfig):
        super().__init__(config)
        from open_clip.model import CLIP

        self.clip = CLIP(**config.clip)
        if self.clip.context_length != config.tokenizer.context_length:
            raise ValueError(
                f"backbone {config.name!r}: text_cfg.context_length {self.clip.context_length} != "
                f"tokenizer.context_length {config.tokenizer.context_length}"
            )

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.token_embedding

    def text_transformer(self, embeddings: torch.Tensor, eot: torch.Tensor) -> TextEncoding:
        # open_clip's CLIP.encode_text with embeddings in and pooling at the recorded end-of-text.
        c = self.clip
        x = embeddings.to(c.transformer.get_cast_dtype()) + c.positional_embedding.to(embeddings.dtype)
        x = c.transformer(x, attn_mask=c.attn_mask)
        h = c.ln_final(x)
        pooled = pool_at(h, eot)
        if isinstance(c.text_projection, nn.Linear):
            pooled = c.text_projection(pooled)
        elif c.text_projection is not None:
            pooled = pooled @ c.text_projection
        return TextEncoding(pooled, h)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp())

    def image_tower(self) -> list[nn.Module]:
        return [self.clip.visual]
