"""On a real CUDA GPU (`make gpu-check`; skipped wherever torch sees none): the learner gives the CPU's token,
`factory.memory`'s plan matches the measured peak, and the GPU benchmark's tiny run completes on the device.

These are the checks a fake-device harness cannot make: real kernels' numerics, the caching allocator's
real peak, and the benchmark's CUDA branches (synchronisation, peak statistics, autocast on cuda).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)"),
]

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_onboard", ROOT / "benchmarks" / "gpu_onboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _world(backbone, n: int = 3, shots: int = 4):
    from factory.concepts import negative_banks
    from factory.learner import ConceptData

    g = torch.Generator().manual_seed(0)
    dim = backbone.clip.config.projection_dim
    s, ch = backbone.generator.unet.config.sample_size, backbone.generator.latent_channels
    data = [
        ConceptData(f"c{i}", "dress", torch.randn(shots, dim, generator=g), torch.randn(shots, ch, s, s, generator=g))
        for i in range(n)
    ]
    return data, negative_banks(data)


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in fp32, not TF32 (`factory.device.configure_cuda_math` turns TF32 on): the comparison
    with the CPU is then of kernels' summation order only."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# The token moves from the parent word; rounding may move it by this fraction of that distance: fp32 kernels on
# the GPU sum in another order than the CPU's; bf16 rounds every weight and activation (as the CPU test of bf16
# learning, tests/factory/test_learner.py, allows).
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 0.02), (torch.bfloat16, 0.25)])
def test_learner_on_cuda_gives_the_cpu_token(exact_fp32, dtype, tolerance):
    from factory.backbones import load_backbone
    from factory.learner import LearnerConfig, learn_tokens

    cfg = LearnerConfig(steps=15, lr=0.02, ti_samples=2, parametrization="projected", log_every=0)
    cpu = load_backbone("tiny-hf-clip")
    data, banks = _world(cpu)
    want = learn_tokens(cpu, data, banks, cfg)
    gpu = load_backbone("tiny-hf-clip", dtype=dtype).to_training_device("cuda")
    got = learn_tokens(gpu, data, banks, cfg)
    start = cpu.word_embedding("dress")
    assert "ti_weight" in want[0].metrics  # the TI term ran, calibrated against a real CE term
    for w, g in zip(want, got):
        assert g.vector.device.type == "cpu" and g.basis_id == w.basis_id and torch.isfinite(g.vector).all()
        assert (g.vector - w.vector).norm() < tolerance * (w.vector - start).norm()


def test_memory_plan_matches_the_measured_peak():
    """SD 1.5 shapes at C=4 (random init, bf16, Train-worker placement): the planned peak beyond the resident
    weights is within 15 % of ``max_memory_allocated`` beyond them, plain and with the plan for a budget."""
    from factory.learner import LearnerConfig, learn_tokens
    from factory.memory import GiB, auto_ti_micro_batch, measure_ti_memory, planned_peak_bytes

    bench = _bench()
    backbone = bench.train_placement(bench.build(False, "bf16", "cuda"), "cuda")
    data, banks = _world(backbone, n=4)
    cost = measure_ti_memory(backbone)
    # 1.5 GiB beyond the weights holds ~1 plain sample (0.72 GiB each) and ~4 checkpointed ones (0.21 GiB).
    budget = int(1.5 * GiB)
    budget_micro, budget_ckpt = auto_ti_micro_batch(backbone, LearnerConfig(ti_samples=2), 4, budget, cost)
    assert budget_micro > 0 and budget_ckpt
    for micro, ckpt in ((0, False), (budget_micro, budget_ckpt)):
        cfg = LearnerConfig(steps=2, ti_samples=2, log_every=0, ti_micro_batch=micro, gradient_checkpointing=ckpt)
        learn_tokens(backbone, data, banks, cfg)  # warm-up: cuBLAS/cuDNN workspaces are allocated once
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        learn_tokens(backbone, data, banks, cfg)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        planned = planned_peak_bytes(backbone, cfg, 4, micro, ckpt, cost)
        assert abs(measured - planned) <= 0.15 * planned, (micro, ckpt, measured / GiB, planned / GiB)
        if micro:
            assert measured <= budget
    del backbone
    torch.cuda.empty_cache()


def test_benchmark_tiny_run_on_the_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_onboard.py"),
            "--tiny",
            "--device",
            "cuda",
            "--concepts",
            "2",
            "--modes",
            "plain",
            "checkpointing",
            "--micro",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["device"] != "cpu"
    assert not [r for r in result["runs"] if "error" in r]
    for r in result["runs"]:
        assert r["peak_gpu_gib"] > 0 and r["concepts_per_gpu_minute"] > 0 and 0 < r["mfu"] < 1
    assert result["anchor_diffusers_ti"]["unet_samples_per_s"] > 0 and result["speedup_vs_diffusers_ti"] > 0
