"""Typed backbone configs and the name -> config registry (the open_clip pattern).

JSON files in ``configs/`` are scanned at import; `add_backbone_config` registers more (a path or a
dict). A config fully determines the architecture; weights come separately from a URI, so the same
config serves random-init tests and real pretrained checkpoints.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from factory.errors import UnknownBackbone

_CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIGS: dict[str, dict] = {}

FAMILIES = ("hf-clip", "open-clip")


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
    latent_scale: float = 1.0  # the VAE's scaling_factor (0.18215 for SD 1.x)

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

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        d = copy.deepcopy(d)
        if d.get("family") not in FAMILIES:
            raise ValueError(f"backbone {d.get('name')!r}: family must be one of {FAMILIES}, got {d.get('family')!r}")
        d["tokenizer"] = TokenizerConfig(**d.get("tokenizer", {}))
        img = d.get("image", {})
        d["image"] = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in img.items()})
        if d.get("generator") is not None:
            d["generator"] = GeneratorConfig(**d["generator"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def add_backbone_config(source: str | Path | dict, name: str | None = None) -> str:
    """Register a config from a JSON path or a dict; returns its name."""
    if isinstance(source, dict):
        d = copy.deepcopy(source)
    else:
        path = Path(source)
        d = json.loads(path.read_text())
        if d.get("weights") and "://" not in d["weights"] and not Path(d["weights"]).is_absolute():
            d["weights"] = str((path.parent / d["weights"]).resolve())
        d.setdefault("name", path.stem)
    if name:
        d["name"] = name
    BackboneConfig.from_dict(d)  # validate now, not at first load
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
