"""Backbones: a name -> config registry and factory functions (the open_clip pattern).

    >>> from factory.backbones import list_backbones, load_backbone
    >>> bb = load_backbone("tiny-hf-clip")             # random init from the config
    >>> bb = load_backbone("name", weights="s3://bucket/weights/")   # model.safetensors under a URI
"""
from __future__ import annotations

import io

import torch

from factory.backbones.base import Backbone, TextEncoding
from factory.backbones.config import (
    BackboneConfig,
    GeneratorConfig,
    ImageConfig,
    TokenizerConfig,
    add_backbone_config,
    get_backbone_config,
    list_backbones,
)
from factory.backbones.generator import Generator
from factory.errors import WeightsError

WEIGHTS_FILE = "model.safetensors"

__all__ = [
    "Backbone", "BackboneConfig", "Generator", "GeneratorConfig", "ImageConfig", "TextEncoding",
    "TokenizerConfig", "add_backbone_config", "create_backbone", "get_backbone_config", "list_backbones",
    "load_backbone", "save_weights", "WEIGHTS_FILE",
]


def create_backbone(config: BackboneConfig) -> Backbone:
    """Build a backbone with random weights (seeded by ``config.init_seed``)."""
    from factory.backbones.hf_clip import HFClipBackbone
    from factory.backbones.open_clip_backbone import OpenClipBackbone

    cls = {"hf-clip": HFClipBackbone, "open-clip": OpenClipBackbone}[config.family]
    state = torch.random.get_rng_state()
    torch.manual_seed(config.init_seed)
    try:
        return cls(config)
    finally:
        torch.random.set_rng_state(state)  # building a model must not perturb the caller's RNG


def _weights_uri(weights: str) -> str:
    from factory import storage

    return weights if weights.endswith(".safetensors") else storage.join(weights, WEIGHTS_FILE)


def load_backbone(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                  s3=None) -> Backbone:
    """The frozen backbone ``name``; weights from ``weights`` (a URI), else the config's default URI.

    A weights URI is a ``.safetensors`` file or a directory/prefix holding ``model.safetensors`` with the
    full state dict (as `save_weights` writes it). Without any weights the model is randomly initialised
    from the config, which is what tests use.
    """
    from safetensors.torch import load as load_safetensors

    from factory import storage

    config = get_backbone_config(name)
    backbone = create_backbone(config)
    uri = weights or config.weights
    if uri:
        uri = _weights_uri(uri)
        try:
            blob = storage.read_bytes(uri, s3=s3)
        except FileNotFoundError as e:
            raise WeightsError(f"weights for backbone {name!r} not found at {uri}: {e}") from None
        state = load_safetensors(blob)
        try:
            missing, unexpected = backbone.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise WeightsError(f"weights at {uri} do not fit backbone {name!r}: {e}") from None
        # Non-persistent buffers (position ids) are not saved; anything else missing is a wrong file.
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise WeightsError(
                f"weights at {uri} do not fit backbone {name!r}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        import hashlib

        backbone._fingerprint = hashlib.sha256(blob).hexdigest()
    return backbone.to(device).freeze()


def save_weights(backbone: Backbone, uri: str, s3=None) -> str:
    """Write the backbone's full state dict as safetensors; returns the file URI."""
    from safetensors.torch import save

    from factory import storage

    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    target = _weights_uri(uri)
    storage.write_bytes(target, save(state), s3=s3)
    return target
