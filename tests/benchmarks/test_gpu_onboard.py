"""`benchmarks/gpu_onboard.py --tiny` and `benchmarks/gpu_check.sh --smoke` (the unattended GPU benchmark's
smoke tests on the CPU), its honest-timing arithmetic, and the speed levers it measures (`factory.gpu_tuning`)."""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factory.errors import ConfigError
from factory.gpu_tuning import SDPAKernelProcessor, tune_unet

ROOT = Path(__file__).resolve().parents[2]
RUN_KEYS = {
    "concepts_per_gpu_minute",
    "mfu",
    "s_per_step",
    "one_off_s",
    "unet_samples_per_s",
    "flops_per_step",
    "speedup_vs_diffusers_ti",
    "samples_per_s_vs_diffusers_ti",
    "peak_gib_planned",
}


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_onboard", ROOT / "benchmarks" / "gpu_onboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_result(result: dict, concepts: set[int], modes: set[str]):
    runs = result["runs"]
    assert not [r for r in runs if "error" in r]
    assert {(r["c"], r["mode"]) for r in runs} == {(c, m) for c in concepts for m in modes}
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert all(_positive_finite(r[k]) for k in RUN_KEYS - {"one_off_s"}), r
        assert r["one_off_s"] >= 0
    anchor = result["anchor_diffusers_ti"]
    assert _positive_finite(anchor["concepts_per_gpu_minute"]) and _positive_finite(anchor["unet_samples_per_s"])
    # 3,000 optimizer steps of 4 samples each: the anchor's concepts/GPU-minute follows from its step time.
    assert anchor["concepts_per_gpu_minute"] == pytest.approx(60 / (3000 * anchor["s_per_optimizer_step"]))
    assert _positive_finite(result["speedup_vs_diffusers_ti"]) and _positive_finite(
        result["samples_per_s_vs_diffusers_ti"]
    )
    assert all(_positive_finite(v) for v in result["encode_images_per_s"].values())


@pytest.mark.timeout(900)  # a subprocess running the benchmark; minutes on a loaded 2-core box
def test_tiny_run_writes_every_key_with_finite_positive_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_onboard.py"),
            "--tiny",
            "--concepts",
            "2",
            "--modes",
            "plain",
            "checkpointing",
            "budget",
            "--budget-gib",
            "0.05",
            "--micro",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=900,
    )
    result = json.loads(out.read_text())
    _check_result(result, {2}, {"plain", "checkpointing", "budget"})
    rows = {r["mode"]: r for r in result["runs"]}
    assert (rows["plain"]["checkpointing"], rows["plain"]["ti_micro_batch"]) == (False, 0)
    assert (rows["checkpointing"]["checkpointing"], rows["checkpointing"]["ti_micro_batch"]) == (True, 2)
    assert rows["budget"]["fits_budget"] and rows["budget"]["budget_gib"] == 0.05


@pytest.mark.timeout(900)  # a subprocess running the benchmark; minutes on a loaded 2-core box
def test_gpu_check_smoke_writes_its_json_and_log_under_the_build_dir(tmp_path):
    env = {**os.environ, "BUILD_DIR": str(tmp_path / "build"), "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], check=True, cwd=ROOT, env=env, timeout=900
    )
    out = tmp_path / "build" / "gpu_check"
    result = json.loads((out / "gpu_onboard.json").read_text())
    _check_result(result, {2}, {"plain", "budget"})
    assert "wrote" in (out / "gpu_check.log").read_text()


def test_a_step_is_the_difference_of_a_1_step_and_an_n_step_run():
    bench = _bench()
    # 1 step: 3 s (2 s one-off + 1 s); 11 steps: 13 s -> 1 s per step, 2 s one-off.
    assert bench._split(3.0, 13.0, 11)[:2] == pytest.approx((1.0, 2.0))
    per_step, one_off, how = bench._split(3.0, 2.5, 11)  # noise on a loaded CPU: an upper bound, said so
    assert per_step == pytest.approx(2.5 / 11) and one_off == 0 and how.startswith("noisy")


@pytest.mark.timeout(900)  # a subprocess running the benchmark; minutes on a loaded 2-core box
def test_meta_memory_models_learn_tokens_and_agrees_with_the_plan(tmp_path):
    out = tmp_path / "meta.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_onboard.py"),
            "--tiny",
            "--meta-memory",
            "--concepts",
            "4",
            "--micro",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert "COMPUTED" in proc.stdout
    rows = {(r["checkpointing"], r["ti_micro_batch"]): r for r in json.loads(out.read_text())["memory_computed"]}
    peak = {k: r["peak_gib_computed"] for k, r in rows.items()}
    weights = rows[(False, 0)]["weights_gib"]
    assert peak[(False, 0)] > peak[(True, 0)] > weights  # recomputing UNet activations holds fewer of them
    assert peak[(False, 0)] > peak[(False, 1)] > weights  # one UNet sample at a time instead of all 8
    assert peak[(True, 1)] == min(peak.values())
    for r in rows.values():  # the calibration pass is in the model, and the plan is within a few % of it
        assert r["peak_gib_computed"] >= r["calibration_gib_computed"] > weights
        assert r["peak_gib_planned"] == pytest.approx(r["peak_gib_computed"], rel=0.1)


# ---- the speed levers (`factory.gpu_tuning`) on a tiny UNet --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**_bench().TINY["unet"]).eval().requires_grad_(False)


def _run(unet):
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g).requires_grad_()
    out = unet(x, torch.tensor([3, 700]), encoder_hidden_states=cond).sample
    out.square().sum().backward()
    return out.detach(), cond.grad


@pytest.mark.parametrize(
    "levers",
    [
        dict(channels_last=True),
        dict(attention="math"),
        dict(attention="flash"),
        dict(compile=True, compile_backend="eager"),
        dict(compile=True, compile_backend="eager", channels_last=True, attention="math"),
    ],
)
def test_each_lever_applies_and_computes_what_the_untuned_unet_does(tiny_unet, levers):
    ref_out, ref_grad = _run(tiny_unet)
    tuned = tune_unet(copy.deepcopy(tiny_unet), **levers)
    if levers.get("channels_last"):
        assert tuned.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if levers.get("attention"):
        assert {type(p) for p in tuned.attn_processors.values()} == {SDPAKernelProcessor}
    if levers.get("compile"):
        assert tuned._compiled_call_impl is not None and type(tuned) is type(tiny_unet)  # still a diffusers UNet
    out, grad = _run(tuned)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_cuda_only_attention_backends_and_unknown_ones_are_config_errors(tiny_unet):
    for bad in ("efficient", "cudnn", "xformers"):
        with pytest.raises(ConfigError):
            tune_unet(copy.deepcopy(tiny_unet), attention=bad)
