"""The pretraining steps themselves (no Ray): which weights each stage and tower setting trains."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from factory.backbones import create_backbone, get_backbone_config
from factory.errors import ConfigError
from factory.pretrain import PretrainConfig, Pretrainer, average_gradients, gradient_buckets
from jobs.pretrain import world_batches
from tests.fakecuda import assert_device_clean, fake_cuda


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny-hf-clip", "tiny-open-clip"])
def test_image_tower_training_leaves_the_text_tower_alone(name: str) -> None:
    backbone = create_backbone(get_backbone_config(name))
    image_before = [_snapshot(m) for m in backbone.image_tower()]
    clip_before = _snapshot(backbone.clip)
    cfg = PretrainConfig(stage="clip", steps=2, batch_size=8, lr=1e-3, warmup=1, towers="image")
    Pretrainer(backbone, cfg, world_batches(32, 0.3, group_size=4)).train_steps(2)

    image_params = {p.data_ptr() for m in backbone.image_tower() for p in m.parameters()}
    for m, before in zip(backbone.image_tower(), image_before):
        after = m.state_dict()
        assert any(not torch.equal(after[k], v) for k, v in before.items()), "the image tower did not train"
    text_changed = [
        k
        for k, p in backbone.clip.named_parameters()
        if p.data_ptr() not in image_params and k != "logit_scale" and not torch.equal(p, clip_before[k])
    ]
    assert text_changed == []
    assert any(k.startswith(("text_model", "transformer", "token_embedding")) for k in clip_before)


def test_a_checkpoint_resumes_only_with_the_same_towers() -> None:
    backbone = create_backbone(get_backbone_config("tiny-hf-clip"))
    batches = world_batches(32, 0.0)
    both = Pretrainer(backbone, PretrainConfig(stage="clip", steps=1, batch_size=4, towers="both"), batches)
    image = Pretrainer(backbone, PretrainConfig(stage="clip", steps=1, batch_size=4, towers="image"), batches)
    with pytest.raises(ValueError, match="towers='both'"):
        image.load_state_dict(both.state_dict())


def test_unknown_towers_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="towers must be"):
        PretrainConfig(towers="text")


# ---- the GPU path (audit rows #2, #3, #17; issue 30) ---------------------------------------------------


def _train(stage: str, device: str | None = None, precision: str = "fp32", steps: int = 2) -> tuple[float, Pretrainer]:
    backbone = create_backbone(get_backbone_config("tiny-hf-clip"))
    if device is not None:
        backbone.to(device)
    cfg = PretrainConfig(stage=stage, steps=steps, batch_size=8, warmup=1, precision=precision)
    trainer = Pretrainer(backbone, cfg, world_batches(32, 0.3, 4 if stage == "clip" else 1))
    return trainer.train_steps(steps)["loss"], trainer


@pytest.mark.parametrize("stage", ["clip", "unet"])
def test_both_stages_run_on_a_gpu_with_no_device_violation_and_no_read_back_per_step(stage: str) -> None:
    # Before the fix: `same`/`target` (clip) and the noise, timesteps and pixels (unet) stayed on the CPU
    # beside GPU logits/UNet, which a real GPU rejects ("Expected all tensors to be on the same device").
    with fake_cuda() as rec:
        gpu_loss, trainer = _train(stage, device="cuda", steps=1)
        assert trainer.device.type == "cuda"
        # The losses are read back once per `train_steps` call, not once per step: ``float(loss)`` and
        # ``isfinite`` made the host wait for the GPU every step, so it could not render the next batch.
        trainer.cfg.steps = 3
        with rec.counting() as syncs:
            trainer.train_steps(2)
    assert_device_clean(rec)
    reads = [s for s in syncs if s.kind in ("d2h", "item", "bool")]
    assert len(reads) == 1, [str(s) for s in syncs]
    # Random draws come from the CPU generator and are copied: the same seed gives the same run on the GPU
    # as on the CPU (the fake GPU computes with real CPU values, so fp32 losses agree exactly).
    cpu_loss, _ = _train(stage, steps=1)
    assert gpu_loss == cpu_loss


def test_bf16_autocast_trains_in_bf16_with_fp32_weights() -> None:
    fp32, _ = _train("clip", steps=1)
    bf16, trainer = _train("clip", precision="bf16", steps=1)
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.05 * abs(fp32)  # rounded, not broken
    assert all(p.dtype == torch.float32 for p in trainer.params)  # master weights stay fp32
    unet, trainer = _train("unet", precision="bf16", steps=1)
    assert np.isfinite(unet) and all(p.dtype == torch.float32 for p in trainer.ema.parameters())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precisions_without_a_recipe_are_refused(precision: str) -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        PretrainConfig(precision=precision)


def test_pixel_space_generator_encodes_onto_the_unets_device() -> None:
    # fashion-mini's generator has no VAE: `encode` used to hand back the CPU pixels unmoved, so pretraining
    # fed CPU pixels to a GPU UNet. The meta device stands in for a GPU.
    gen = create_backbone(get_backbone_config("fashion-mini")).generator
    assert gen.vae is None
    gen.unet.to("meta")
    assert gen.encode(torch.zeros(2, 3, 32, 32)).device.type == "meta"


def test_train_steps_stops_at_its_deadline() -> None:
    backbone = create_backbone(get_backbone_config("tiny-hf-clip"))
    trainer = Pretrainer(backbone, PretrainConfig(stage="clip", steps=5, batch_size=4), world_batches(32, 0.0))
    metrics = trainer.train_steps(5, deadline=time.time() - 1)
    assert trainer.step == 0 and metrics["step"] == 0
    trainer.train_steps(5, deadline=time.time() + 3600)
    assert trainer.step == 5


def test_a_non_finite_loss_names_its_step() -> None:
    backbone = create_backbone(get_backbone_config("tiny-hf-clip"))
    trainer = Pretrainer(backbone, PretrainConfig(stage="clip", steps=3, batch_size=4), world_batches(32, 0.0))
    real = trainer._clip_loss
    trainer._clip_loss = lambda *a: real(*a) * (float("nan") if trainer.step == 1 else 1.0)
    with pytest.raises(FloatingPointError, match="at step 1"):
        trainer.train_steps(3)


def test_gradient_buckets_keep_order_and_split_by_size_and_dtype() -> None:
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(1)]
    buckets = gradient_buckets(grads, bucket_bytes=100)  # 25 floats
    assert [[g.numel() for g in b] for b in buckets] == [[10, 10], [30], [5], [1]]
    assert [g for b in buckets for g in b] == grads


def test_flat_average_makes_one_call_per_bucket() -> None:
    grads = [torch.randn(n) for n in (3, 4, 5, 6)]
    expected = [g.clone() for g in grads]
    calls = []

    def all_reduce(t):  # two workers holding the same gradients: the sum is twice each
        calls.append(t.numel())
        t.mul_(2)

    average_gradients(grads, world_size=2, all_reduce=all_reduce)
    assert calls == [18]  # one flat call, not four
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    average_gradients(grads, world_size=1, all_reduce=all_reduce)
    assert calls == [18]  # a single worker needs no collective


_GLOO_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from factory.pretrain import average_gradients

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    shapes = [(7, 3), (11,), (2, 2, 5), (300,), (1,)]
    grads = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(4, generator=g, dtype=torch.float64)]
    per_tensor = [x.clone() for x in grads]
    for x in per_tensor:  # what jobs/pretrain.py did before: one all-reduce per tensor
        dist.all_reduce(x)
        x /= 2
    calls = []
    def counted(t):
        calls.append(t.numel())
        dist.all_reduce(t)
    average_gradients(grads, 2, counted, bucket_bytes=64 * 4)  # small buckets: several flat calls
    if rank == 0:
        json.dump({"equal": [torch.equal(a, b) for a, b in zip(grads, per_tensor)], "calls": calls}, open(out, "w"))
    dist.destroy_process_group()
""")


def test_flat_all_reduce_averages_like_one_all_reduce_per_tensor(tmp_path) -> None:
    # Two real gloo processes: the bucketed, flattened all-reduce gives the same averaged gradients,
    # bit for bit, as the per-tensor loop it replaces, in fewer calls.
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    out = tmp_path / "result.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GLOO_WORKER, str(r), str(tmp_path / "store"), str(out)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["equal"] == [True] * 6
    assert result["calls"] == [21 + 11 + 20, 300, 1, 4]  # buckets of <= 64 floats, big tensor alone, fp64 apart
