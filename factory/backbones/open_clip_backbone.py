"""open_clip CLIP (OpenCLIP ViT-H/14 + Stable Diffusion 2.x in production)."""

from __future__ import annotations

import torch
from torch import nn

from factory.backbones.base import Backbone, TextEncoding
from factory.backbones.config import BackboneConfig
from factory.tokens.injection import pool_at


class OpenClipBackbone(Backbone):
    def __init__(self, config: BackboneConfig, clip=None, generator=None):
        super().__init__(config, generator)
        from open_clip.model import CLIP

        # `clip` is a CLIP already loaded from a checkpoint; else built (random) from the config, whose
        # ``model_name`` (standard layout) only records which open_clip model config it came from.
        self.clip = clip if clip is not None else CLIP(**clip_kwargs(config.clip))
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
        blocks, nld = c.transformer.resblocks, c.transformer.batch_first
        x = x if nld else x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x, attn_mask=c.attn_mask)
        # SD 2.x conditions its UNet on the penultimate layer (then ln_final), SD 1.x-style on the last.
        as_nld = (lambda t: t) if nld else (lambda t: t.transpose(0, 1))  # noqa: E731
        cond = c.ln_final(as_nld(x)) if self.config.text_layer == "penultimate" else None
        h = c.ln_final(as_nld(blocks[-1](x, attn_mask=c.attn_mask)))
        pooled = pool_at(h, eot)
        if isinstance(c.text_projection, nn.Linear):
            pooled = c.text_projection(pooled)
        elif c.text_projection is not None:
            pooled = pooled @ c.text_projection
        return TextEncoding(pooled, h if cond is None else cond)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp())

    def image_tower(self) -> list[nn.Module]:
        return [self.clip.visual]


def clip_kwargs(clip: dict) -> dict:
    """open_clip `CLIP` constructor kwargs of a config's ``clip`` dict (minus the model config name)."""
    return {k: v for k, v in clip.items() if k != "model_name"}
