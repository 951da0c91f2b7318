"""Real checkpoint layouts: an HF CLIP / open_clip folder + a diffusers SD pipeline folder (tiny, random).

Parity with diffusers is exact here (same weights, same code paths): the pipeline's `encode_prompt`
(prompt and empty-prompt states), the UNet's output and the VAE's scaled latents all agree within 1e-5
with what the factory computes, and the training noise schedule is the pipeline's own.
"""

from __future__ import annotations

import json

import pytest
import torch

from factory.backbones import load_backbone, resolve_backbone_config
from factory.errors import BackboneMismatch, UnknownBackbone, WeightsError
from tests.checkpoints import upload, write_sd1_root, write_sd2_root

LAYOUTS = {"sd1": ("clip-vit-l14+sd15", write_sd1_root), "sd2": ("openclip-vit-h14+sd21", write_sd2_root)}
PROMPT = "a photo of a striped dress on the beach"


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    name, write = LAYOUTS[request.param]
    root = write(tmp_path_factory.mktemp(request.param))
    pipe = StableDiffusionPipeline.from_pretrained(
        str(root / "diffusion"), safety_checker=None, requires_safety_checker=False
    )
    return request.param, name, root, load_backbone(name, weights=str(root)), pipe


def test_prompt_and_uncond_states_match_encode_prompt(layout):
    _, _, _, backbone, pipe = layout
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=None)
        ours = backbone.encode_prompts([PROMPT, ""]).hidden
    torch.testing.assert_close(ours[:1], cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1:], uncond, atol=1e-5, rtol=0)


def test_unet_and_vae_match_the_pipeline(layout):
    _, _, _, backbone, pipe = layout
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        cond = backbone.encode_prompts([PROMPT, "a coat"]).hidden
        theirs = pipe.unet(x, t, encoder_hidden_states=cond).sample
        ours = backbone.generator.unet(x, t, encoder_hidden_states=cond).sample
        want = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        got = backbone.generator.encode(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert backbone.generator.config.latent_scale == pipe.vae.config.scaling_factor == 0.18215


def test_training_schedule_is_the_pipelines(layout):
    from diffusers import DDPMScheduler

    kind, _, _, backbone, pipe = layout
    ours = backbone.generator.noise_scheduler()
    ref = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    assert (float(ours.betas[0]), float(ours.betas[-1])) == pytest.approx((0.00085, 0.012), rel=1e-5)  # scaled_linear
    assert ours.config.prediction_type == ("epsilon" if kind == "sd1" else "v_prediction")
    assert type(pipe.scheduler).__name__ == ("PNDMScheduler" if kind == "sd1" else "DDIMScheduler")


def test_conventions_come_from_the_folders(layout):
    kind, _, _, backbone, _ = layout
    cfg = backbone.config
    assert cfg.image.size == 32 and cfg.tokenizer.context_length == 77 and cfg.generator.image_size == 16
    assert backbone.tokenizer.pad_id == (49407 if kind == "sd1" else 0)  # end-of-text vs "!"
    assert cfg.text_layer == ("last" if kind == "sd1" else "penultimate")


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_any_sd_scheduler_config_gives_the_training_schedule(tmp_path, scheduler):
    import diffusers

    root = write_sd1_root(tmp_path / "root")
    sched_file = root / "diffusion" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_file.read_text())
    converted = getattr(diffusers, scheduler).from_config(cfg)
    converted.save_pretrained(root / "diffusion" / "scheduler")
    backbone = load_backbone("clip-vit-l14+sd15", weights=str(root))
    torch.testing.assert_close(
        backbone.generator.noise_scheduler().alphas_cumprod,
        diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod,
    )
    backbone.generator.sampling_scheduler().set_timesteps(2)


@pytest.mark.s3
def test_loads_from_s3_through_a_checksummed_node_cache(tmp_path, s3_server, s3_bucket, monkeypatch):
    from factory.backbones.cache import MANIFEST

    monkeypatch.setenv("TOKENFACTORY_CACHE", str(tmp_path / "cache"))
    root = write_sd1_root(tmp_path / "root")
    uri = upload(root, f"{s3_bucket}/models/sd15", s3_server.s3_options)
    local = load_backbone("clip-vit-l14+sd15", weights=str(root))
    remote = load_backbone("clip-vit-l14+sd15", weights=uri, s3=s3_server.s3_options)
    assert remote.fingerprint() == local.fingerprint()  # the same bytes, wherever they were read from
    mirrors = list((tmp_path / "cache" / "mirror").glob("*/" + MANIFEST))
    assert len(mirrors) == 1
    files = json.loads(mirrors[0].read_text())["files"]
    assert "diffusion/unet/diffusion_pytorch_model.safetensors" in files and all(
        len(f["sha256"]) == 64 for f in files.values()
    )
    stamp = {p: p.stat().st_mtime_ns for p in mirrors[0].parent.rglob("*.safetensors")}
    load_backbone("clip-vit-l14+sd15", weights=uri, s3=s3_server.s3_options)  # a second load downloads nothing
    assert stamp == {p: p.stat().st_mtime_ns for p in mirrors[0].parent.rglob("*.safetensors")}
    (mirrors[0].parent / "clip" / "model.safetensors").write_bytes(b"partial")  # a damaged copy is repaired
    again = load_backbone("clip-vit-l14+sd15", weights=uri, s3=s3_server.s3_options)
    assert again.fingerprint() == local.fingerprint()


def test_a_pipeline_of_another_text_encoder_is_refused(tmp_path):
    root = write_sd1_root(tmp_path / "root", text_encoder_seed=7)
    with pytest.raises(BackboneMismatch, match="not the CLIP text tower"):
        load_backbone("clip-vit-l14+sd15", weights=str(root))


def test_a_text_layer_the_pipeline_does_not_have_fails_at_resolve_time(tmp_path):
    root = write_sd1_root(tmp_path / "root")
    # SD 1's text encoder has all the CLIP's layers: a "penultimate" config (SD 2's convention) cannot pair with it.
    spec = {**json.loads(_config_file("clip-vit-l14+sd15")), "name": "wrong", "text_layer": "penultimate"}
    with pytest.raises(BackboneMismatch, match="must have 1"):
        resolve_backbone_config(spec, str(root))


def _config_file(name: str) -> str:
    from factory.backbones.config import _CONFIG_DIR

    return (_CONFIG_DIR / f"{name}.json").read_text()


def test_missing_parts_name_the_file(tmp_path):
    root = write_sd1_root(tmp_path / "root")
    (root / "clip" / "config.json").unlink()
    with pytest.raises(WeightsError, match="clip/config.json"):
        resolve_backbone_config("clip-vit-l14+sd15", str(root))
    with pytest.raises(WeightsError, match="--weights ROOT"):
        resolve_backbone_config("clip-vit-l14+sd15")


def test_a_checkpoints_own_config_is_not_taken_for_a_backbone_config(tmp_path):
    root = write_sd1_root(tmp_path / "root")
    with pytest.raises(UnknownBackbone, match="HF transformers config"):
        resolve_backbone_config(str(root / "clip" / "config.json"))
    with pytest.raises(UnknownBackbone, match="diffusers config"):
        resolve_backbone_config(str(root / "diffusion" / "model_index.json"))


def test_a_config_file_is_a_backbone_spec(tmp_path):
    root = write_sd2_root(tmp_path / "root")
    spec = tmp_path / "my-sd2.json"
    spec.write_text(
        json.dumps({**json.loads(_config_file("openclip-vit-h14+sd21")), "name": "my-sd2", "weights": "root"})
    )  # relative to the config file
    config = resolve_backbone_config(str(spec))
    assert (
        config.name == "my-sd2" and config.weights == str(root) and config.generator.unet["cross_attention_dim"] == 32
    )
    # The resolved config is plain data: it rebuilds the same backbone without touching the registry.
    again = load_backbone(config.to_dict())
    assert again.fingerprint() == load_backbone(str(spec)).fingerprint()


def test_only_what_learning_runs_through_moves_to_the_training_device(layout):
    _, name, root, _, _ = layout
    backbone = load_backbone(name, weights=str(root)).to_training_device("meta")  # "meta" stands in for a GPU
    assert backbone.token_embedding.weight.is_meta and all(p.is_meta for p in backbone.generator.unet.parameters())
    stays = [*backbone.image_tower(), backbone.generator.vae]
    assert not any(p.is_meta for m in stays for p in m.parameters())
