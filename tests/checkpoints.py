"""Tiny random checkpoints in the *standard* layouts real users have (nothing can be downloaded here).

Each builder writes a weights ROOT with ``clip/`` and ``diffusion/`` using the libraries' own
``save_pretrained`` (or, for open_clip, its hub layout: open_clip_config.json + open_clip_model.safetensors),
with the real classes: HF `CLIPModel`, `CLIPTokenizer`, `CLIPImageProcessor`, diffusers
`StableDiffusionPipeline` with `UNet2DConditionModel`, `AutoencoderKL` and the scheduler SD ships.

- `write_sd1_root`: the `openai/clip-vit-large-patch14` + SD 1.5 layout: PNDM scheduler, epsilon prediction,
  the pipeline's text encoder equal to the CLIP text tower, the tokenizer padding with end-of-text.
- `write_sd2_root`: the OpenCLIP ViT-H/14 + SD 2.1 layout: DDIM, v-prediction, the pipeline's text
  encoder the open_clip text tower minus its last block (converted to HF keys), padding with "!".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
)
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=4,
    sample_size=16,
)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _tokenizer(pad_token: str):
    import tempfile

    from transformers import CLIPTokenizer

    from factory.tokens.tokenizer import PromptTokenizer

    with tempfile.TemporaryDirectory() as d:
        PromptTokenizer().write_hf_files(d)  # the CLIP BPE that open_clip ships, as vocab.json + merges.txt
        return CLIPTokenizer(
            vocab=f"{d}/vocab.json", merges=f"{d}/merges.txt", model_max_length=77, pad_token=pad_token
        )


def _pipeline(root: Path, text_encoder, tokenizer, scheduler, seed: int) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed + 1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "diffusion")


def write_sd1_root(root: Path, seed: int = 0, text_encoder_seed: int | None = None) -> Path:
    """An HF CLIP folder + SD 1.x pipeline folder under ``root``; ``text_encoder_seed`` (≠ seed) makes the
    pipeline's text encoder a *different* random model, which loading must refuse."""
    from diffusers import PNDMScheduler
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={**TEXT, "num_hidden_layers": 2, "pad_token_id": 49407},
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=32,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    ).save_pretrained(root / "clip")
    tokenizer = _tokenizer("<|endoftext|>")
    tokenizer.save_pretrained(root / "clip")
    text_encoder = CLIPTextModel(config.text_config)
    if text_encoder_seed is None:
        text_encoder.load_state_dict(clip.text_model.state_dict())
    else:
        torch.manual_seed(text_encoder_seed)
        text_encoder = CLIPTextModel(config.text_config)
    scheduler = PNDMScheduler(**SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    _pipeline(root, text_encoder, tokenizer, scheduler, seed)
    return root


def write_sd2_root(root: Path, seed: int = 0) -> Path:
    """An open_clip checkpoint (hub layout) + SD 2.x pipeline folder under ``root``."""
    from diffusers import DDIMScheduler
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from factory.backbones.standard import open_clip_text_to_hf

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
    }
    torch.manual_seed(seed)
    clip = CLIP(**model_cfg).eval()
    (root / "clip").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip" / "open_clip_model.safetensors")
    )
    (root / "clip" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}})
    )
    # SD 2.x's text encoder: the open_clip text tower without its last block, in HF CLIPTextModel keys.
    te_config = CLIPTextConfig(**TEXT, num_hidden_layers=2, hidden_act="gelu", pad_token_id=0, projection_dim=32)
    text_encoder = CLIPTextModel(te_config)
    missing, unexpected = text_encoder.load_state_dict(open_clip_text_to_hf(clip, 2), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    scheduler = DDIMScheduler(
        **SD_BETAS, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample=False
    )
    _pipeline(root, text_encoder, _tokenizer("!"), scheduler, seed)
    return root


def upload(root: Path, prefix: str, s3) -> str:
    """Copy a local weights ROOT to an ``s3://`` prefix, file by file; returns the prefix."""
    from factory import storage

    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(prefix, str(path.relative_to(root))), path.read_bytes(), s3)
    return prefix
