"""`tokenfactory pretrain` on tiny configs, end to end on a local Ray cluster, and its resume."""

import io
import json

import pytest
import torch

from cli.main import build_parser, main
from factory import storage
from factory.backbones import create_backbone, get_backbone_config, load_backbone
from factory.errors import ConfigError, DeviceError
from jobs.pretrain import PretrainJobConfig, check_gpus, out_of_time, read_checkpoint


def _args(out, clip_steps, unet_steps):
    return [
        "pretrain",
        "--backbone",
        "tiny-hf-clip",
        "--out",
        str(out),
        "--clip-steps",
        str(clip_steps),
        "--unet-steps",
        str(unet_steps),
        "--batch-size",
        "8",
        "--checkpoint-every",
        "1",
        "--cpus-per-worker",
        "1",
    ]


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

    # A sitting whose --max-minutes budget is already spent stops cleanly before its first step: nothing is
    # trained or logged, and the checkpoint stays for the next sitting.
    assert main(_args(tmp_path, 5, 2) + ["--max-minutes", "1e-6"]) == 0
    assert [m["step"] for m in _log(tmp_path, "clip")] == [1, 2, 3]
    assert storage.exists(str(tmp_path / "checkpoints" / "clip.pt"))


# ---- GPU runs: checkpoints read on any device, time budget, precision, placement --------------------------


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(monkeypatch):
    # A state saved by a GPU worker names "cuda:0" for every tensor. Without map_location="cpu", loading it
    # on a machine with no GPU raised, and on a GPU machine it landed on cuda:0 whatever the worker's device.
    state = {"step": 7, "module": {"w": torch.arange(4.0)}}
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, buf)
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does with it here
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    loaded = read_checkpoint(buf.getvalue())
    assert loaded["step"] == 7 and loaded["module"]["w"].device.type == "cpu"
    assert torch.equal(loaded["module"]["w"], torch.arange(4.0))


def test_out_of_time_is_agreed_by_all_workers():
    assert not out_of_time(deadline=100.0, world=1, now=99.0)
    assert out_of_time(deadline=100.0, world=1, now=100.0)
    # With several workers the (all-reduced) verdict decides, not this worker's own clock: a worker still
    # in time stops when another is late, so no worker is left waiting in an all-reduce.
    assert out_of_time(deadline=100.0, world=2, agree=lambda late: True, now=0.0)
    assert not out_of_time(deadline=100.0, world=2, agree=lambda late: late, now=0.0)


def test_max_minutes_flag_and_its_old_name(tmp_path):
    parse = build_parser().parse_args
    base = ["pretrain", "--out", str(tmp_path)]
    assert parse(base + ["--max-minutes", "8"]).max_minutes == 8.0
    assert parse(base + ["--time-limit-min", "3"]).max_minutes == 3.0  # scripts using the old flag keep working
    assert parse(base).max_minutes == 0.0


def test_precision_defaults_to_bf16_on_gpus_and_refuses_fp16(tmp_path):
    assert PretrainJobConfig(out=str(tmp_path)).precision == "fp32"
    assert PretrainJobConfig(out=str(tmp_path), use_gpu=True).precision == "bf16"
    assert PretrainJobConfig(out=str(tmp_path), precision="bf16").precision == "bf16"
    with pytest.raises(ConfigError, match="loss scaling"):
        PretrainJobConfig(out=str(tmp_path), use_gpu=True, precision="fp16")
    with pytest.raises(ConfigError, match="max_minutes"):
        PretrainJobConfig(out=str(tmp_path), max_minutes=-1)


def test_a_gpu_run_the_cluster_cannot_place_is_refused():
    check_gpus(use_gpu=False, workers=4, cluster_gpus=0)
    check_gpus(use_gpu=True, workers=1, cluster_gpus=1)
    with pytest.raises(DeviceError, match="needs 2 GPUs"):
        check_gpus(use_gpu=True, workers=2, cluster_gpus=1)
