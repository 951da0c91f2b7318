"""`factory.memory`: the meta-device byte count and the TI micro-batch plan (numbers first, then a tiny backbone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factory.errors import ConfigError, DeviceError
from factory.learner import LearnerConfig
from factory.memory import (
    ALLOCATOR_MARGIN,
    GiB,
    PeakBytes,
    auto_ti_micro_batch,
    fused_attention,
    measure_ti_memory,
    plan_ti_micro_batch,
    planned_peak_bytes,
)

# ---- the plan, in numbers (SD 1.5 at 512 px: ~0.72 GiB per UNet sample, ~0.21 checkpointed) -------------------


def test_a_plan_that_fits_runs_one_unet_batch():
    # C=32 x 2 samples at 0.72 GiB + 2.4 GiB of text graph = 48.5 GiB, well inside 130 GiB free less 12 %.
    assert plan_ti_micro_batch(
        int(0.72 * GiB), int(2.4 * GiB), 130 * GiB, 32, 2, per_sample_checkpointed_bytes=int(0.21 * GiB)
    ) == (0, False)


def test_a_plan_that_fits_in_part_takes_the_largest_plain_micro_batch():
    # 40 GiB free: (40 * 0.88 - 2.4) / 0.72 = 45.5 -> 45 samples per UNet call, no recompute.
    assert plan_ti_micro_batch(
        int(0.72 * GiB), int(2.4 * GiB), 40 * GiB, 32, 2, per_sample_checkpointed_bytes=int(0.21 * GiB)
    ) == (45, False)


def test_a_plan_that_needs_checkpointing():
    # 8 GiB free: (8 * 0.88 - 2.4) / 0.72 = 6.4 -> 6 plain samples, under the floor of 8; checkpointed:
    # 4.64 / 0.21 = 22 samples per call.
    assert plan_ti_micro_batch(
        int(0.72 * GiB), int(2.4 * GiB), 8 * GiB, 32, 2, per_sample_checkpointed_bytes=int(0.21 * GiB)
    ) == (22, True)


def test_checkpointing_that_fits_everything_runs_one_batch():
    assert plan_ti_micro_batch(4 * GiB, 0, 10 * GiB, 2, 2, per_sample_checkpointed_bytes=GiB) == (0, True)


def test_below_the_floor_checkpointing_is_taken_only_where_it_gives_larger_calls():
    # 3 plain samples fit (3.52 GiB budget), under the floor of 8.
    assert plan_ti_micro_batch(GiB, 0, 4 * GiB, 8, 2, per_sample_checkpointed_bytes=GiB // 4) == (14, True)
    assert plan_ti_micro_batch(GiB, 0, 4 * GiB, 8, 2) == (3, False)  # no checkpointed cost known
    assert plan_ti_micro_batch(GiB, 0, 4 * GiB, 8, 2, per_sample_checkpointed_bytes=GiB) == (3, False)


def test_the_allocator_margin_is_kept():
    # Exactly 64 samples of 1 GiB fit 64 GiB; the margin leaves 56.32 GiB, so 56 per call.
    assert ALLOCATOR_MARGIN == pytest.approx(0.12)
    assert plan_ti_micro_batch(GiB, 0, 64 * GiB, 32, 2) == (56, False)
    assert plan_ti_micro_batch(GiB, 0, 64 * GiB, 32, 2, margin=0.0) == (0, False)


def test_a_plan_that_cannot_fit_is_a_device_error_that_says_what_to_do():
    with pytest.raises(DeviceError) as e:
        plan_ti_micro_batch(
            int(0.72 * GiB), int(2.4 * GiB), 2 * GiB, 32, 2, per_sample_checkpointed_bytes=int(0.21 * GiB)
        )
    msg = str(e.value)
    assert "32 concept(s)" in msg and "2.00 GiB are free" in msg and "fewer concepts" in msg


@pytest.mark.parametrize(
    "kwargs", [dict(per_sample_bytes=0), dict(n_concepts=0), dict(ti_samples=0), dict(free_bytes=-1), dict(margin=1.0)]
)
def test_bad_plan_input_is_a_config_error(kwargs):
    args = dict(per_sample_bytes=GiB, fixed_bytes=0, free_bytes=8 * GiB, n_concepts=4, ti_samples=2) | kwargs
    with pytest.raises(ConfigError):
        plan_ti_micro_batch(**args)


# ---- the byte counter -------------------------------------------------------------------------------------------


def test_peak_bytes_counts_live_tensors_and_frees_them():
    with torch.device("meta"):
        x = torch.zeros(1024)  # resident: not counted
        with PeakBytes([x]) as peak:
            y = x + 1  # 4 KiB
            z = y * 2  # 4 KiB more
            del y, z
            held = peak.current
    assert peak.peak == 2 * 4096 and held == 0


def test_fused_attention_counts_no_attention_matrix_and_restores_sdpa():
    real = F.scaled_dot_product_attention
    with torch.device("meta"):
        q = torch.zeros(1, 1, 4096, 40, requires_grad=True)
    with PeakBytes([q]) as math_path:
        F.scaled_dot_product_attention(q, q, q, attn_mask=None).sum().backward()
    with fused_attention(), PeakBytes([q]) as fused:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert F.scaled_dot_product_attention is real
    assert fused.peak < 4096 * 4096 * 4 <= math_path.peak  # the [L, L] weights: 64 MiB in fp32
    x = torch.randn(1, 1, 3, 4)
    with fused_attention():  # real tensors still compute for real
        torch.testing.assert_close(F.scaled_dot_product_attention(x, x, x), real(x, x, x))


# ---- on a tiny backbone -----------------------------------------------------------------------------------------


def test_measured_costs_of_a_tiny_backbone(backbone):
    cost = measure_ti_memory(backbone)
    assert cost.per_sample > cost.per_sample_checkpointed > 0 and cost.per_prompt > 0
    cfg = LearnerConfig(ti_samples=2)
    plain = planned_peak_bytes(backbone, cfg, 4, 0, False, cost)
    assert plain == cost.fixed(4 * len(cfg.templates)) + 8 * cost.per_sample
    assert (
        planned_peak_bytes(backbone, cfg, 4, 2, True, cost)
        < planned_peak_bytes(backbone, cfg, 4, 2, False, cost)
        < plain
    )


def test_auto_plan_of_a_tiny_backbone(hf_backbone):
    cost = measure_ti_memory(hf_backbone)
    cfg, C = LearnerConfig(ti_samples=2), 4
    fixed = cost.fixed(C * len(cfg.templates))
    assert auto_ti_micro_batch(hf_backbone, cfg, C, 10 * GiB) == (0, False)
    # Room for 5 checkpointed samples (and fewer than 8 plain ones): checkpointing at micro-batch 5.
    free = int((fixed + 5 * cost.per_sample_checkpointed + 1000) / (1 - ALLOCATOR_MARGIN))
    assert (free * (1 - ALLOCATOR_MARGIN) - fixed) // cost.per_sample < 8
    assert auto_ti_micro_batch(hf_backbone, cfg, C, free) == (5, True)
    with pytest.raises(DeviceError):
        auto_ti_micro_batch(hf_backbone, cfg, C, fixed)
    from factory.losses import LossWeights

    assert auto_ti_micro_batch(hf_backbone, LearnerConfig(weights=LossWeights(ti=0.0)), C, 0) == (0, False)
