"""Backbones: a name -> config registry and factory functions (the open_clip pattern).

    >>> from factory.backbones import list_backbones, load_backbone
    >>> bb = load_backbone("tiny-hf-clip")             # random init from the config
    >>> bb = load_backbone("name", weights="s3://bucket/weights/")   # model.safetensors under a URI
    >>> bb = load_backbone("clip-vit-l14+sd15", weights="s3://models/sd15/")  # ROOT/clip/ + ROOT/diffusion/
    >>> bb = load_backbone("my-backbone.json")          # a config file (or s3:// URI) instead of a name

A backbone *spec* is a registered name, a config file/URI, a dict or a `BackboneConfig`;
`resolve_backbone_config` turns any of them into one complete config (for the standard layout: with the
architecture read from the checkpoint folders), which is what jobs ship to their workers as data.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from factory.backbones.base import Backbone, TextEncoding
from factory.backbones.config import (
    BackboneConfig,
    GeneratorConfig,
    ImageConfig,
    TokenizerConfig,
    add_backbone_config,
    config_dict,
    get_backbone_config,
    list_backbones,
)
from factory.backbones.generator import DiffusionGenerator
from factory.device import PRECISIONS
from factory.errors import UnknownBackbone, WeightsError

WEIGHTS_FILE = "model.safetensors"

__all__ = [
    "Backbone",
    "BackboneConfig",
    "DiffusionGenerator",
    "GeneratorConfig",
    "ImageConfig",
    "TextEncoding",
    "TokenizerConfig",
    "add_backbone_config",
    "create_backbone",
    "get_backbone_config",
    "list_backbones",
    "load_backbone",
    "resolve_backbone_config",
    "save_weights",
    "WEIGHTS_FILE",
    "PRECISIONS",
]


def resolve_backbone_config(spec: str | dict | BackboneConfig, weights: str | None = None, s3=None) -> BackboneConfig:
    """One complete `BackboneConfig` from a name, a config file/URI, a dict or a config.

    ``weights`` overrides the config's weights URI. A standard-layout config is completed from the small
    config files under its weights ROOT (no weights are read), so a bad name, path or pairing fails here,
    in seconds, before any Ray worker starts.
    """
    from factory import storage

    if isinstance(spec, BackboneConfig):
        config = spec
    elif isinstance(spec, dict):
        config = BackboneConfig.from_dict(config_dict(spec, "the given backbone config"))
    elif spec in list_backbones():
        config = get_backbone_config(spec)
    elif spec.endswith(".json") or "/" in spec:
        try:
            raw = storage.read_json(spec, s3)
        except FileNotFoundError:
            raise UnknownBackbone(
                f"backbone config file not found: {spec} (registered names: {list_backbones()})"
            ) from None
        base = None if "://" in spec else os.path.dirname(os.path.abspath(spec))
        raw.setdefault("name", spec.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json"))
        config = BackboneConfig.from_dict(config_dict(raw, spec, base))
    else:
        raise UnknownBackbone(
            f"unknown backbone {spec!r}: give a registered name ({list_backbones()}) or a config file"
        )
    if weights and weights != config.weights:
        config = dataclasses.replace(config, weights=weights)
    if config.layout == "standard" and (config.resolved_from is None or config.resolved_from != config.weights):
        if not config.weights:
            raise WeightsError(
                f"backbone {config.name!r} loads checkpoints in their standard layouts: give "
                f"--weights ROOT, where ROOT holds {config.expected_layout()}"
            )
        from factory.backbones.standard import resolve_standard

        config = resolve_standard(config, config.weights, s3)
    return config


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


def load_backbone(
    spec: str | dict | BackboneConfig,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    s3=None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """The frozen backbone of ``spec`` (see `resolve_backbone_config`); weights from ``weights`` (a URI),
    else the config's default URI; ``dtype`` casts it (bf16/fp16 on GPUs; fp32 is the default).

    Tokenfactory layout: a ``.safetensors`` file or a directory/prefix holding ``model.safetensors`` with the
    full state dict (as `save_weights` writes it); without any weights the model is randomly initialised
    from the config, which is what tests use. Standard layout: see `factory.backbones.standard`.
    """
    config = resolve_backbone_config(spec, weights, s3)
    if config.layout == "standard":
        from factory.backbones.standard import load_standard

        backbone = load_standard(config, s3, dtype)
    else:
        backbone = create_backbone(config)
        if config.weights:
            _load_state(backbone, _weights_uri(config.weights), s3)
    if dtype is not None and dtype != torch.float32:
        backbone.fingerprint()  # of the weights as stored: tokens learned in bf16 serve in fp32 and back
        backbone.cast_precision(dtype)  # the text tower stays fp32 (see there)
    return backbone.to(device).freeze()


def _load_state(backbone: Backbone, uri: str, s3) -> None:
    import hashlib

    from safetensors.torch import load as load_safetensors

    from factory import storage

    name = backbone.name
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
    backbone._fingerprint = hashlib.sha256(blob).hexdigest()


def save_weights(backbone: Backbone, uri: str, s3=None) -> str:
    """Write the backbone's full state dict as safetensors; returns the file URI."""
    from safetensors.torch import save

    from factory import storage

    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    target = _weights_uri(uri)
    storage.write_bytes(target, save(state), s3=s3)
    return target
