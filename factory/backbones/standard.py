"""Backbones from real checkpoints in their standard layouts.

A weights ROOT (a folder or an ``s3://`` prefix) holds

    clip/        an HF CLIP folder (`CLIPModel.save_pretrained`: config.json, model.safetensors,
                 preprocessor_config.json, tokenizer files), or an open_clip checkpoint
                 (open_clip_model.safetensors or open_clip_pytorch_model.bin, optional open_clip_config.json)
    diffusion/   a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, scheduler/,
                 text_encoder/, tokenizer/)

Two steps, so that a job fails fast and ships its backbone as data:

- `resolve_standard` reads only the small JSON files and returns a complete `BackboneConfig` (the
  architecture, the noise schedule, the VAE's scaling factor, the image preprocessing). It checks the
  conventions that would otherwise fail deep inside a Ray worker: the UNet's cross-attention width, and
  that the pipeline's text encoder has the layer count the config's ``text_layer`` implies.
- `load_standard` loads each part with its own library (`CLIPModel.from_pretrained`,
  `UNet2DConditionModel.from_pretrained(subfolder=…)`, memory-mapped safetensors onto a meta-device
  open_clip model, so weights never sit in memory beside a random model), and refuses a pipeline whose
  text encoder is not the CLIP text tower the tokens are learned for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch

from factory import storage
from factory.backbones.cache import fingerprint_of, local_root
from factory.backbones.config import BackboneConfig, ImageConfig
from factory.errors import BackboneMismatch, WeightsError

log = logging.getLogger(__name__)

CLIP_DIR, DIFFUSION_DIR = "clip", "diffusion"
OPEN_CLIP_CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PIPELINE_PARTS = ("unet", "scheduler", "text_encoder", "tokenizer")


def _json(uri: str, what: str, s3) -> dict:
    try:
        return storage.read_json(uri, s3)
    except FileNotFoundError:
        raise WeightsError(f"{what} not found: expected {uri}") from None


def _public(d: dict) -> dict:
    """A diffusers/transformers config without its bookkeeping keys (``_class_name``, ``_name_or_path``…)."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def resolve_standard(config: BackboneConfig, root: str, s3=None) -> BackboneConfig:
    """``config`` completed from the config files under ``root`` (see the module docstring)."""
    d = copy.deepcopy(config.to_dict())
    clip_uri, diff_uri = storage.join(root, CLIP_DIR), storage.join(root, DIFFUSION_DIR)
    if config.family == "hf-clip":
        clip, text_width, text_layers, ctx, image = _resolve_hf_clip(clip_uri, s3)
    else:
        clip, text_width, text_layers, ctx, image = _resolve_open_clip(config.clip, clip_uri, s3)
    d["clip"], d["image"] = clip, image
    d["tokenizer"]["context_length"] = ctx
    d["generator"] = _resolve_pipeline(diff_uri, s3, config, text_width, text_layers)
    d["weights"] = d["resolved_from"] = root
    return BackboneConfig.from_dict(d)


def _resolve_hf_clip(clip_uri: str, s3):
    cfg = _json(storage.join(clip_uri, "config.json"), "HF CLIP config (clip/config.json)", s3)
    if cfg.get("model_type") != "clip":
        raise WeightsError(
            f"{clip_uri}/config.json is not an HF CLIPModel config (model_type "
            f"{cfg.get('model_type')!r}); clip/ must be a `CLIPModel.save_pretrained` folder"
        )
    text, vision = cfg.get("text_config", {}), cfg.get("vision_config", {})
    size = vision.get("image_size", 224)
    mean, std = ImageConfig.mean, ImageConfig.std
    pre_uri = storage.join(clip_uri, "preprocessor_config.json")
    if storage.exists(pre_uri, s3):
        pre = storage.read_json(pre_uri, s3)
        crop = pre.get("crop_size", pre.get("size", size))
        if isinstance(crop, dict):
            crop = crop.get("height", crop.get("shortest_edge", size))
        size, mean, std = int(crop), pre.get("image_mean", mean), pre.get("image_std", std)
    image = {"size": size, "mean": list(mean), "std": list(std)}
    return (
        _public(cfg),
        text.get("hidden_size", 512),
        text.get("num_hidden_layers", 12),
        text.get("max_position_embeddings", 77),
        image,
    )


def _resolve_open_clip(clip: dict, clip_uri: str, s3):
    import open_clip

    name = clip.get("model_name")
    oc_uri = storage.join(clip_uri, "open_clip_config.json")
    if storage.exists(oc_uri, s3):  # the hub layout of open_clip checkpoints carries its model config
        oc = storage.read_json(oc_uri, s3)
        model_cfg, pre = oc.get("model_cfg"), oc.get("preprocess_cfg", {})
    else:
        model_cfg, pre = open_clip.get_model_config(name) if name else None, {}
    if not model_cfg:
        raise WeightsError(
            f"no open_clip model config: {oc_uri} is absent and {name!r} is not an open_clip model "
            f"config name (known include {open_clip.list_models()[:5]})"
        )
    if not any(storage.exists(storage.join(clip_uri, f), s3) for f in OPEN_CLIP_CHECKPOINTS):
        raise WeightsError(f"no open_clip checkpoint under {clip_uri}: expected one of {OPEN_CLIP_CHECKPOINTS}")
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    image = {
        "size": vision.get("image_size", 224),
        "mean": list(pre.get("mean", ImageConfig.mean)),
        "std": list(pre.get("std", ImageConfig.std)),
    }
    return (
        {"model_name": name, **model_cfg},
        text.get("width", 512),
        text.get("layers", 12),
        text.get("context_length", 77),
        image,
    )


def _resolve_pipeline(diff_uri: str, s3, config: BackboneConfig, text_width: int, text_layers: int) -> dict:
    index = _json(storage.join(diff_uri, "model_index.json"), "diffusers pipeline (diffusion/model_index.json)", s3)
    absent = [p for p in PIPELINE_PARTS if p not in index]
    if absent:
        raise WeightsError(
            f"{diff_uri}/model_index.json names no {absent}: diffusion/ must be a Stable Diffusion "
            "pipeline folder (`StableDiffusionPipeline.save_pretrained`)"
        )
    part = lambda sub, file: _json(storage.join(diff_uri, sub, file), f"diffusion/{sub}/{file}", s3)  # noqa: E731
    unet, sched, te = (
        part("unet", "config.json"),
        part("scheduler", "scheduler_config.json"),
        part("text_encoder", "config.json"),
    )
    vae = part("vae", "config.json") if index.get("vae") and index["vae"][0] is not None else None
    if unet.get("cross_attention_dim") != text_width:
        raise BackboneMismatch(
            f"the UNet of {diff_uri} attends to {unet.get('cross_attention_dim')}-wide text states, "
            f"but the CLIP text tower is {text_width} wide: clip/ and diffusion/ are not a pair"
        )
    want = text_layers - 1 if config.text_layer == "penultimate" else text_layers
    got = te.get("num_hidden_layers")
    if got != want:
        raise BackboneMismatch(
            f"diffusion/text_encoder has {got} layers but clip/ has {text_layers}: with text_layer "
            f"{config.text_layer!r} the pipeline's text encoder must have {want} (SD 1.x: all layers, 'last'; "
            "SD 2.x: one fewer, 'penultimate'): pick the backbone config that matches this pipeline"
        )
    return {
        "unet": _public(unet),
        "vae": _public(vae) if vae else None,
        "scheduler": _public(sched),
        "latent_scale": float(vae.get("scaling_factor", 0.18215)) if vae else 1.0,
    }


# ---- loading ----------------------------------------------------------------------------------------


def load_standard(config: BackboneConfig, s3=None, dtype: torch.dtype | None = None):
    """The backbone of a resolved standard-layout config, loaded from its (mirrored) weights ROOT."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from factory.backbones.generator import DiffusionGenerator
    from factory.backbones.hf_clip import HFClipBackbone
    from factory.backbones.open_clip_backbone import OpenClipBackbone

    root = local_root(config.weights, s3)
    clip_dir, diff_dir = root / CLIP_DIR, str(root / DIFFUSION_DIR)
    dtype = dtype or torch.float32
    if config.family == "hf-clip":
        from transformers import CLIPModel

        # CLIP in fp32: `Backbone.cast_precision` casts its image tower and keeps the text tower fp32.
        clip, cls = CLIPModel.from_pretrained(str(clip_dir), dtype=torch.float32), HFClipBackbone
    else:
        clip, cls = _load_open_clip(config.clip, clip_dir, torch.float32), OpenClipBackbone
    unet = UNet2DConditionModel.from_pretrained(diff_dir, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(diff_dir, subfolder="vae", torch_dtype=dtype) if config.generator.vae else None
    backbone = cls(config, clip=clip, generator=DiffusionGenerator(config.generator, unet=unet, vae=vae))
    check_text_encoder(backbone, Path(diff_dir) / "text_encoder")
    # Content, not location: the same checkpoint read from a folder or through an S3 mirror is one backbone.
    conventions = {k: v for k, v in config.to_dict().items() if k not in ("weights", "resolved_from", "description")}
    backbone._fingerprint = hashlib.sha256(
        (fingerprint_of(root) + json.dumps(conventions, sort_keys=True, default=str)).encode()
    ).hexdigest()
    return backbone


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, memory-mapped: safetensors, or a torch file read with weights_only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def _load_open_clip(clip: dict, clip_dir: Path, dtype: torch.dtype):
    from open_clip.model import CLIP

    from factory.backbones.open_clip_backbone import clip_kwargs

    path = next((clip_dir / f for f in OPEN_CLIP_CHECKPOINTS if (clip_dir / f).exists()), None)
    if path is None:
        raise WeightsError(f"no open_clip checkpoint in {clip_dir}: expected one of {OPEN_CLIP_CHECKPOINTS}")
    state = _read_state(path)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    with torch.device("meta"):  # no random weights: the checkpoint's tensors are assigned in place
        model = CLIP(**clip_kwargs(clip))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not fit open_clip model {clip.get('model_name')!r}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    # The causal mask is a non-persistent buffer, so it is not in the checkpoint: rebuild it.
    model.attn_mask = torch.full((model.context_length,) * 2, float("-inf")).triu_(1)
    return model.to(dtype)


def open_clip_text_to_hf(clip, layers: int | None = None) -> dict[str, torch.Tensor]:
    """The weights an HF `CLIPTextModel` of ``layers`` layers holds for an open_clip text tower (keys as
    transformers 5 names them; checkpoints of transformers 4 prefix them with "text_model.").

    This is the key map of diffusers' SD 2.x conversion (OpenCLIP ViT-H/14's text tower without its last
    block is SD 2.x's text encoder); used to check a pipeline against its CLIP and to build test pipelines.
    """
    out = {
        "embeddings.token_embedding.weight": clip.token_embedding.weight,
        "embeddings.position_embedding.weight": clip.positional_embedding,
        "final_layer_norm.weight": clip.ln_final.weight,
        "final_layer_norm.bias": clip.ln_final.bias,
    }
    blocks = clip.transformer.resblocks
    for i, block in enumerate(blocks[: len(blocks) if layers is None else layers]):
        pre = f"encoder.layers.{i}."
        for kind, t in (("weight", block.attn.in_proj_weight), ("bias", block.attn.in_proj_bias)):
            for proj, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"{pre}self_attn.{proj}_proj.{kind}"] = chunk
        for ours, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            mod = block.get_submodule(ours)
            out[f"{pre}{theirs}.weight"], out[f"{pre}{theirs}.bias"] = mod.weight, mod.bias
    return {k: v.detach() for k, v in out.items()}


def _expected_text_encoder(backbone, layers: int) -> dict[str, torch.Tensor]:
    if backbone.config.family == "open-clip":
        return open_clip_text_to_hf(backbone.clip, layers)
    state = {k: v for k, v in backbone.clip.text_model.state_dict().items() if not k.endswith("position_ids")}
    return {k: v for k, v in state.items() if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < layers}


def check_text_encoder(backbone, te_dir: Path) -> None:
    """Refuse a pipeline whose text encoder is not (the conditioning layers of) the backbone's CLIP text tower.

    Tokens are learned in the CLIP text tower; the UNet was trained on its pipeline's text encoder. If the
    two differ, a token classifies in one model and generates in another. Compared tensor by tensor from
    the memory-mapped file, within half-precision rounding (a pipeline may ship fp16 weights).
    """
    layers = json.loads((te_dir / "config.json").read_text())["num_hidden_layers"]
    file = next((te_dir / f for f in ("model.safetensors", "pytorch_model.bin") if (te_dir / f).exists()), None)
    if file is None:
        raise WeightsError(f"no weights in {te_dir}: expected model.safetensors")
    # transformers 4 saved these keys under "text_model." (every SD release); transformers 5 does not.
    theirs = {k.removeprefix("text_model."): v for k, v in _read_state(file).items()}
    expected = _expected_text_encoder(backbone, layers)
    absent = sorted(set(expected) - set(theirs))
    differ = [
        k
        for k in expected
        if k not in absent and not torch.allclose(theirs[k].float(), expected[k].float(), rtol=1e-2, atol=1e-3)
    ]
    if absent or differ:
        example = (absent or differ)[0]
        raise BackboneMismatch(
            f"the pipeline's text encoder ({te_dir}) is not the CLIP text tower of clip/: {len(absent)} tensors "
            f"absent, {len(differ)} of {len(expected)} differ (e.g. {example}). Tokens learned on this CLIP would "
            "condition the UNet wrongly: pair the CLIP with its own pipeline (ViT-L/14 + SD 1.x, ViT-H/14 + SD 2.x)"
        )
