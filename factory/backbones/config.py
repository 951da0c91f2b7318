"""Typed backbone configs and the name -> config registry (the open_clip pattern).

JSON files in ``configs/`` are scanned at import; `add_backbone_config` registers more (a path or a
dict). A config fully determines the architecture; weights come separately from a URI, so the same
config serves random-init tests and real pretrained checkpoints.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from factory.errors import UnknownBackbone

_CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIGS: dict[str, dict] = {}

FAMILIES = ("hf-clip", "open-clip")
# "tokenfactory": the architecture is in this config, weights are one model.safetensors (the embedded
# default, the tiny test models). "standard": weights ROOT holds clip/ (an HF CLIP folder or an open_clip
# checkpoint) and diffusion/ (a diffusers pipeline folder); the architecture is read from their own
# config files at resolve time (see `factory.backbones.standard`).
LAYOUTS = ("tokenfactory", "standard")
TEXT_LAYERS = ("last", "penultimate")  # which text layer (then the final layer norm) conditions the UNet


@dataclass
class TokenizerConfig:
    context_length: int = 77
    pad: str = "eot"  # "eot" (OpenAI CLIP, SD 1.x) or "zero" (open_clip, SD 2.x)
    keep_ids: list[int] | None = None  # a trimmed embedding table: the BPE ids it keeps, in row order


@dataclass
class ImageConfig:
    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class GeneratorConfig:
    """A diffusers UNet2DConditionModel (+ optional AutoencoderKL) conditioned on the CLIP text states."""

    unet: dict
    scheduler: dict = field(default_factory=lambda: {"num_train_timesteps": 1000})
    vae: dict | None = None  # None: the UNet works on pixels in [-1, 1]
    latent_scale: float = 1.0  # the VAE's scaling_factor (0.18215 for SD 1.x); read from vae/ when standard

    @property
    def image_size(self) -> int:
        """Pixel resolution of generated images: the UNet's sample size times the VAE's downsampling."""
        size = self.unet["sample_size"]
        if self.vae is not None:
            size *= 2 ** (len(self.vae["block_out_channels"]) - 1)
        return size


@dataclass
class BackboneConfig:
    name: str
    family: str
    clip: dict  # family-specific architecture kwargs (HF CLIPConfig / open_clip CLIP kwargs)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    generator: GeneratorConfig | None = None
    weights: str | None = None  # default weights URI; relative paths are relative to the config file
    init_seed: int = 0  # random-init seed, so configs without weights still build reproducibly
    vocabulary: str | None = None  # preferred attribute vocabulary, else chosen by parent word
    description: str = ""
    layout: str = "tokenfactory"  # see LAYOUTS
    text_layer: str = "last"  # see TEXT_LAYERS: SD 1.x conditions on the last layer, SD 2.x the penultimate
    resolved_from: str | None = None  # standard layout: the weights ROOT the architecture was read from

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        d = copy.deepcopy(d)
        if d.get("family") not in FAMILIES:
            raise ValueError(f"backbone {d.get('name')!r}: family must be one of {FAMILIES}, got {d.get('family')!r}")
        for key, allowed, default in (("layout", LAYOUTS, "tokenfactory"), ("text_layer", TEXT_LAYERS, "last")):
            if d.get(key, default) not in allowed:
                raise ValueError(f"backbone {d.get('name')!r}: {key} must be one of {allowed}, got {d.get(key)!r}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"backbone {d.get('name')!r}: unknown config keys {sorted(unknown)}")
        d["tokenizer"] = TokenizerConfig(**d.get("tokenizer", {}))
        img = d.get("image", {})
        d["image"] = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in img.items()})
        if d.get("generator") is not None:
            d["generator"] = GeneratorConfig(**d["generator"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_resolved(self) -> bool:
        """True when the architecture is known (always for the tokenfactory layout)."""
        return self.layout == "tokenfactory" or self.resolved_from is not None

    def expected_layout(self) -> str:
        """What the weights URI of this backbone must hold, in words (`tokenfactory backbones` prints it)."""
        if self.layout == "tokenfactory":
            return "model.safetensors (the full state dict, as `save_weights` writes it)"
        clip = (
            "clip/: HF CLIPModel save_pretrained (config.json, model.safetensors, preprocessor_config.json)"
            if self.family == "hf-clip"
            else "clip/: open_clip checkpoint (open_clip_model.safetensors or open_clip_pytorch_model.bin, "
            f"optional open_clip_config.json; model config {self.clip.get('model_name')!r})"
        )
        return (
            f"ROOT/{clip}; ROOT/diffusion/: diffusers pipeline (model_index.json, unet/, vae/, scheduler/, "
            f"text_encoder/, tokenizer/); UNet on the {self.text_layer} text layer, {self.tokenizer.pad} padding"
        )


def _not_a_backbone_config(d: dict, origin: str) -> str | None:
    """Why a JSON file is a checkpoint's own config rather than a backbone config, if it is one."""
    if "_class_name" in d or "_diffusers_version" in d:
        return (
            f"{origin} is a diffusers config ({d.get('_class_name')}), not a backbone config: put the pipeline "
            "folder at ROOT/diffusion/ and run with --backbone clip-vit-l14+sd15 (or openclip-vit-h14+sd21) "
            "--weights ROOT"
        )
    if "model_type" in d or "architectures" in d:
        return (
            f"{origin} is an HF transformers config ({d.get('model_type')}), not a backbone config: put the "
            "CLIP folder at ROOT/clip/ and run with --backbone clip-vit-l14+sd15 --weights ROOT"
        )
    if "model_cfg" in d:
        return (
            f"{origin} is an open_clip model config, not a backbone config: put it with its checkpoint at "
            "ROOT/clip/ and run with --backbone openclip-vit-h14+sd21 --weights ROOT"
        )
    return None


def config_dict(d: dict, origin: str, base: str | None = None) -> dict:
    """A validated backbone config dict from JSON at ``origin``; relative ``weights`` resolved against ``base``."""
    why = _not_a_backbone_config(d, origin)
    if why:
        raise UnknownBackbone(why)
    d = copy.deepcopy(d)
    w = d.get("weights")
    if base and w and "://" not in w and not Path(w).is_absolute():
        d["weights"] = str((Path(base) / w).resolve())
    BackboneConfig.from_dict(d)  # validate now, not at first load
    return d


def add_backbone_config(source: str | Path | dict, name: str | None = None) -> str:
    """Register a config from a JSON path or a dict; returns its name.

    Registration is process-local: jobs ship the resolved config itself to their workers (see
    `factory.backbones.resolve_backbone_config`), so a config registered in a driver needs no registration there.
    """
    if isinstance(source, dict):
        d = config_dict({**source, **({"name": name} if name else {})}, "the given dict")
    else:
        path = Path(source)
        raw = json.loads(path.read_text())
        raw.setdefault("name", path.stem)
        if name:
            raw["name"] = name
        d = config_dict(raw, str(path), str(path.parent))
    _CONFIGS[d["name"]] = d
    return d["name"]


def list_backbones() -> list[str]:
    return sorted(_CONFIGS)


def get_backbone_config(name: str) -> BackboneConfig:
    try:
        return BackboneConfig.from_dict(_CONFIGS[name])
    except KeyError:
        raise UnknownBackbone(f"unknown backbone {name!r}; known: {list_backbones()}") from None


for _path in sorted(_CONFIG_DIR.glob("*.json")):
    add_backbone_config(_path)
