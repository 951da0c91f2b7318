"""`tokenfactory pretrain` on tiny configs, end to end on a local Ray cluster, and its resume."""
import json

import torch

from factory import storage
from factory.backbones import create_backbone, get_backbone_config, load_backbone
from cli.main import main


def _args(out, clip_steps, unet_steps):
    return ["pretrain", "--backbone", "tiny-hf-clip", "--out", str(out), "--clip-steps", str(clip_steps),
            "--unet-steps", str(unet_steps), "--batch-size", "8", "--checkpoint-every", "1",
            "--cpus-per-worker", "1"]


def _log(out, stage):
    return [json.loads(line) for line in (out / f"pretrain-{stage}.jsonl").read_text().splitlines()]


def test_pretrain_two_steps_then_resume(ray_cluster, tmp_path):
    assert main(_args(tmp_path, 2, 2)) == 0
    trained = load_backbone("tiny-hf-clip", weights=str(tmp_path))
    fresh = create_backbone(get_backbone_config("tiny-hf-clip"))
    assert not torch.equal(trained.clip.visual_projection.weight, fresh.clip.visual_projection.weight)
    assert not torch.equal(trained.generator.unet.conv_in.weight, fresh.generator.unet.conv_in.weight)
    assert [m["step"] for m in _log(tmp_path, "clip")] == [1, 2]
    assert [m["step"] for m in _log(tmp_path, "unet")] == [1, 2]
    assert storage.exists(str(tmp_path / "checkpoints" / "clip.pt"))

    # A later sitting with more steps resumes each stage from its checkpoint: no step is repeated.
    assert main(_args(tmp_path, 3, 2)) == 0
    assert [m["step"] for m in _log(tmp_path, "clip")] == [1, 2, 3]
    assert [m["step"] for m in _log(tmp_path, "unet")] == [1, 2]
