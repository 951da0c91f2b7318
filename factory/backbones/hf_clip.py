"""HF-transformers CLIP (OpenAI CLIP ViT-L/14 + Stable Diffusion 1.x in production)."""

from __future__ import annotations

import torch
from torch import nn

from factory.backbones.base import Backbone, TextEncoding
from factory.backbones.config import BackboneConfig
from factory.tokens.injection import pool_at


class HFClipBackbone(Backbone):
    def __init__(self, config: BackboneConfig, clip=None, generator=None):
        super().__init__(config, generator)
        from transformers import CLIPConfig, CLIPModel

        # `clip` is a CLIPModel already loaded from a standard folder; else built (random) from the config.
        self.clip = clip if clip is not None else CLIPModel(CLIPConfig(**config.clip))

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.text_model.embeddings.token_embedding

    def text_transformer(self, embeddings: torch.Tensor, eot: torch.Tensor) -> TextEncoding:
        # CLIPTextModel.forward only takes ids; this is its body with `inputs_embeds` instead, and pooling
        # at our recorded end-of-text positions instead of its argmax/eos-id search over the ids.
        from transformers.masking_utils import create_causal_mask

        tm = self.clip.text_model
        h = tm.embeddings(inputs_embeds=embeddings)
        mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, past_key_values=None)
        layers = tm.encoder.layers
        for layer in layers[:-1]:
            h = layer(h, mask, is_causal=True)
        # SD 2.x conditions its UNet on the penultimate layer (then the final layer norm), SD 1.x on the last.
        cond = tm.final_layer_norm(h) if self.config.text_layer == "penultimate" else None
        h = tm.final_layer_norm(layers[-1](h, mask, is_causal=True))
        return TextEncoding(self.clip.text_projection(pool_at(h, eot)), h if cond is None else cond)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixels).pooler_output

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp())

    def image_tower(self) -> list[nn.Module]:
        return [self.clip.vision_model, self.clip.visual_projection]

    def text_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of a standalone `CLIPTextModel` (what a diffusers pipeline's `text_encoder` holds)."""
        return self.clip.text_model.state_dict()
