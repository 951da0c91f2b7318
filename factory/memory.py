"""GPU memory of learning, computed before it is spent: the meta-device byte counter and the TI micro-batch plan.

Why compute instead of trying: an out-of-memory error on a GPU comes after the backbone is loaded and the
concepts are encoded, and on a Ray worker it kills the whole chunk; a wrong guess the other way (gradient
checkpointing "to be safe", tiny micro-batches) costs up to 3.5x the time (``../shared/audits/gpu-path.md``
§3.3). The activation memory of a UNet sample is a property of the UNet's shapes alone, so it can be
measured exactly on the meta device (tensors with shapes and no storage): a dispatch mode counts the bytes
of every tensor each op creates, and frees them as Python frees them (`PeakBytes`). On an H200 this count
gave 0.721 GiB per SD 1.5 UNet sample at 512 px, the same as `max_memory_allocated` measured, and
reproduced every measured peak to +0.10..0.12 GiB (audit §2).

What learning holds at its peak (the λ_TI calibration pass, once it is micro-batched like a step; a step
otherwise): the text tower's graph over every prompt of the group (C × T, the calibration encodes every
template), plus one UNet micro-batch of activations. `plan_ti_micro_batch` turns those two numbers and the
device's free bytes into the largest micro-batch that fits; `auto_ti_micro_batch` measures them for a
backbone. No Ray here: the learner (and a Train worker through it) calls this with ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from factory.errors import ConfigError, DeviceError

GiB = 2**30

# Share of the free bytes kept back for what the byte count does not see: the caching allocator rounds each
# block up (512 B / 2 MiB) and fragments, cuDNN and cuBLAS take workspaces, and an out-of-memory error is
# decided on *reserved*, not allocated, memory. The audit measured +0.10..0.12 GiB over the count on an H200
# and recommends 10-15 % over ``max_memory_allocated``; 12 % sits inside that and above the measured excess
# at every size from 8 to 141 GB.
ALLOCATOR_MARGIN = 0.12

# Below this many UNet samples per call a step is launch-bound (the audit counted ~16,700 kernel launches per
# step at micro-batch 8 with checkpointing against ~1,600 plain), so where plain micro-batches this small are
# all that fits, recomputing activations (gradient checkpointing) at a larger micro-batch is the better trade.
MIN_PLAIN_MICRO_BATCH = 8


# ---- the byte counter ------------------------------------------------------------------------------------


class PeakBytes:
    """Peak bytes of the tensors created inside it, beyond ``resident`` ones (the weights), from a torch
    dispatch mode: on the meta device every op runs on shapes alone, so this is the activation and
    temporary memory of a computation without any device or data. Storages are tracked weakly, so a tensor
    counts from its creation until it is freed (saved-for-backward tensors until backward frees them).
    ``current`` is what is alive now (e.g. a graph held after its forward pass)."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        live, skip = WeakIdKeyDictionary(), WeakIdKeyDictionary({t.untyped_storage(): 0 for t in resident})
        self.live, self.peak = live, 0
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        if st not in live and st not in skip:
                            live[st] = st.nbytes()
                tracker.peak = max(tracker.peak, sum(live.values()))
                return out

        self.mode = Mode()

    @property
    def current(self) -> int:
        return sum(self.live.values())

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for a fused SDPA kernel (flash / memory-efficient attention, what a GPU runs):
    it saves q, k, v, the output and the log-sum-exp for backward, never the [L, L] attention matrix.
    On the meta device torch would otherwise take the math path and count that matrix for every layer
    (≥ 0.25 GiB per 64×64 attention layer per sample, which no GPU run holds: audit §2)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def fused_attention():
    """Inside it, ``F.scaled_dot_product_attention`` on meta tensors is counted as a fused kernel; on any
    other tensor it is the real function. It patches ``torch.nn.functional`` for its duration (diffusers and
    transformers look the function up there at each call) rather than using a torch function mode, because
    gradient checkpointing recomputes the forward in the autograd engine, where a function mode is not
    active, and would take the math path there (a metadata mismatch between forward and recompute)."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type == "meta":
            return _FusedAttention.apply(q, k, v)
        return real(q, k, v, *args, **kwargs)

    with _PATCH_LOCK:
        F.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = real


@contextlib.contextmanager
def _eager():
    """A UNet compiled by `factory.gpu_tuning.tune_unet` runs eagerly here: the count is of shapes, and
    compiling a meta graph would cost seconds for nothing."""
    try:
        ctx = torch.compiler.set_stance("force_eager")
    except AttributeError:  # torch < 2.6: no stances, nothing compiled by this project either
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Shape-only copies of a module's parameters and buffers (no bytes are allocated or copied)."""
    state = {n: torch.empty_like(p, device="meta") for n, p in module.named_parameters(remove_duplicate=False)}
    state.update({n: torch.empty_like(b, device="meta") for n, b in module.named_buffers(remove_duplicate=False)})
    return state


# ---- what one UNet sample and one prompt cost --------------------------------------------------------------


@dataclass(frozen=True)
class TiMemoryCost:
    """Bytes that learning allocates beyond the resident weights, measured on the meta device.

    A UNet call on n samples holds ``unet_call + n * per_sample`` at its peak (``per_sample_checkpointed``
    with gradient checkpointing); the text tower's graph over p prompts holds ``text_call + p * per_prompt``
    while the TI term runs (it is kept for the backward pass through the text tower)."""

    per_sample: int
    per_sample_checkpointed: int
    unet_call: int
    per_prompt: int
    text_call: int

    def fixed(self, n_prompts: int) -> int:
        """What the peak holds whatever the micro-batch: the text graph of ``n_prompts`` prompts and a
        UNet call's batch-independent part."""
        return self.text_call + n_prompts * self.per_prompt + self.unet_call

    def peak(self, n_prompts: int, micro_batch: int, checkpointing: bool) -> int:
        """Peak bytes beyond the weights of a learner whose UNet calls hold ``micro_batch`` samples."""
        per = self.per_sample_checkpointed if checkpointing else self.per_sample
        return self.fixed(n_prompts) + micro_batch * per


_UNET_CACHE: dict[tuple, tuple[int, int]] = {}
_TEXT_CACHE: dict[tuple, tuple[int, int]] = {}


def _unet_call_bytes(unet, scheduler, n: int, cond_len: int, cond_dtype: torch.dtype, checkpointing: bool) -> int:
    """Peak bytes of one TI call on ``n`` samples (forward and backward to the text states, the UNet frozen,
    as `factory.losses.textual_inversion_loss` runs it in the learner), on a meta copy of ``unet``."""
    from factory.losses import textual_inversion_loss

    orig = getattr(unet, "_orig_mod", unet)  # torch.compile(module) wraps; Module.compile() does not
    with torch.device("meta"):
        meta = type(orig).from_config(dict(orig.config))  # the architecture only: built without storage
    # nn.Module.to, not diffusers' override: that one warns about fp32-kept modules on every dtype cast.
    meta = nn.Module.to(meta, orig.dtype).eval().requires_grad_(False)
    if checkpointing:
        meta.enable_gradient_checkpointing()
    s, ch, width = meta.config.sample_size, meta.config.in_channels, meta.config.cross_attention_dim
    with torch.device("meta"):
        lat, noise = torch.zeros(n, ch, s, s), torch.zeros(n, ch, s, s)
        steps = torch.zeros(n, dtype=torch.long)
        cond = torch.zeros(n, cond_len, width, dtype=cond_dtype, requires_grad=True)
    resident = [*meta.parameters(), *meta.buffers(), lat, noise, steps, cond]
    with _eager(), fused_attention(), PeakBytes(resident) as peak:
        mse = textual_inversion_loss(meta, scheduler, lat, cond, noise, steps)
        mse.sum().backward()
    return peak.peak


def unet_sample_cost(unet, scheduler, cond_len: int, cond_dtype: torch.dtype, checkpointing: bool) -> tuple[int, int]:
    """(per-sample bytes, per-call bytes) of the TI term's UNet: the slope and intercept of the peak over
    one and two samples (activations grow linearly with the batch; the intercept is what a call holds
    whatever its batch: the time embedding, workspace-like temporaries). Cached per architecture."""
    orig = getattr(unet, "_orig_mod", unet)
    key = (
        json.dumps(dict(orig.config), sort_keys=True, default=str),
        str(orig.dtype),
        cond_len,
        str(cond_dtype),
        checkpointing,
        type(orig).__name__,
    )
    if key not in _UNET_CACHE:
        one = _unet_call_bytes(unet, scheduler, 1, cond_len, cond_dtype, checkpointing)
        two = _unet_call_bytes(unet, scheduler, 2, cond_len, cond_dtype, checkpointing)
        _UNET_CACHE[key] = (two - one, max(0, 2 * one - two))
    return _UNET_CACHE[key]


class _EncodeText(nn.Module):
    """``backbone.encode_text`` as a module call, so `torch.func.functional_call` can run it on meta copies
    of the backbone's weights (whatever family, whatever checkpoint: no rebuilding from a config)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch, vectors):
        return self.backbone.encode_text(batch, vectors).hidden


def _text_graph_bytes(backbone, n_prompts: int) -> int:
    """Bytes the text tower's graph holds after its forward pass over ``n_prompts`` prompts that each hold a
    token (with injected vectors that require grad, as in the learner). Prompts are padded to the context
    length, so their words do not change the shapes: bare markers stand in for the learner's templates."""
    from factory.tokens import marker

    batch = backbone.tokenize([marker(f"m{i}") for i in range(n_prompts)])
    wrapper = _EncodeText(backbone)
    state = _meta_state(wrapper)
    with torch.device("meta"):
        vectors = torch.zeros(n_prompts, backbone.token_dim, requires_grad=True)
    with _eager(), fused_attention(), PeakBytes([*state.values(), vectors]) as peak:
        hidden = torch.func.functional_call(wrapper, state, (batch, vectors))
        held = peak.current
    del hidden
    return held


def text_prompt_cost(backbone) -> tuple[int, int]:
    """(per-prompt bytes, per-call bytes) of the text tower's graph, from one and two prompts. Cached."""
    emb = backbone.token_embedding.weight
    key = (json.dumps(backbone.config.to_dict(), sort_keys=True, default=str), str(emb.dtype))
    if key not in _TEXT_CACHE:
        one, two = _text_graph_bytes(backbone, 1), _text_graph_bytes(backbone, 2)
        _TEXT_CACHE[key] = (two - one, max(0, 2 * one - two))
    return _TEXT_CACHE[key]


def measure_ti_memory(backbone) -> TiMemoryCost:
    """The `TiMemoryCost` of a backbone with a generator, measured on the meta device (seconds at SD 1.5
    size, once per architecture and dtype: the results are cached)."""
    if backbone.generator is None:
        raise ConfigError(f"backbone {backbone.name!r} has no generator: the TI term (and its memory) does not apply")
    unet, scheduler = (
        backbone.generator.unet,
        backbone.generator.noise_scheduler(),
    )  # fresh: add_noise moves its tensors
    cond_len, cond_dtype = backbone.config.tokenizer.context_length, backbone.token_embedding.weight.dtype
    per, call = unet_sample_cost(unet, scheduler, cond_len, cond_dtype, checkpointing=False)
    per_ck, call_ck = unet_sample_cost(unet, scheduler, cond_len, cond_dtype, checkpointing=True)
    per_prompt, text_call = text_prompt_cost(backbone)
    return TiMemoryCost(per, per_ck, max(call, call_ck), per_prompt, text_call)


# ---- the plan ----------------------------------------------------------------------------------------------


def plan_ti_micro_batch(
    per_sample_bytes: int,
    fixed_bytes: int,
    free_bytes: int,
    n_concepts: int,
    ti_samples: int,
    per_sample_checkpointed_bytes: int | None = None,
    margin: float = ALLOCATOR_MARGIN,
    min_plain: int = MIN_PLAIN_MICRO_BATCH,
) -> tuple[int, bool]:
    """(micro_batch, gradient_checkpointing) for learning ``n_concepts`` tokens at ``ti_samples`` TI samples
    each, in the learner's convention: micro_batch 0 is one UNet call on all C × ti_samples samples.

    ``fixed_bytes`` is what the peak holds whatever the micro-batch (the text graph, plus the weights if they
    are not resident yet when ``free_bytes`` was read); ``free_bytes`` less ``margin`` of it is the budget.
    The largest micro-batch that fits without checkpointing is taken when it is the whole batch or at least
    ``min_plain`` samples (or the whole batch, if smaller); otherwise checkpointing, at the largest
    micro-batch that fits with it (``per_sample_checkpointed_bytes``), where that is larger. Raises
    `DeviceError` where not even one sample fits.
    """
    for name, v in (("per_sample_bytes", per_sample_bytes), ("n_concepts", n_concepts), ("ti_samples", ti_samples)):
        if v is None or v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if fixed_bytes < 0 or free_bytes < 0:
        raise ConfigError(f"fixed_bytes and free_bytes must be >= 0, got {fixed_bytes} and {free_bytes}")
    if not 0 <= margin < 1:
        raise ConfigError(f"margin must be in [0, 1), got {margin}")
    total = n_concepts * ti_samples
    budget = math.floor(free_bytes * (1 - margin)) - fixed_bytes
    plain = max(0, budget) // per_sample_bytes
    if plain >= total:
        return 0, False
    if plain >= min(min_plain, total):
        return int(plain), False
    if per_sample_checkpointed_bytes:
        ck = max(0, budget) // per_sample_checkpointed_bytes
        if ck >= total:
            return 0, True
        if ck > plain:
            return int(ck), True
    if plain >= 1:
        return int(plain), False
    one = min(per_sample_bytes, per_sample_checkpointed_bytes or per_sample_bytes)
    raise DeviceError(
        f"learning {n_concepts} concept(s) at ti_samples={ti_samples} does not fit this device: it holds "
        f"{fixed_bytes / GiB:.2f} GiB whatever the micro-batch (the text graph of the group's prompts) plus "
        f"{one / GiB:.2f} GiB per UNet sample even with gradient checkpointing, but {free_bytes / GiB:.2f} GiB "
        f"are free ({margin:.0%} kept for the allocator): learn fewer concepts per chunk, or use a GPU with "
        "more free memory"
    )


def auto_ti_micro_batch(
    backbone, config, n_concepts: int, free_bytes: int, cost: TiMemoryCost | None = None
) -> tuple[int, bool]:
    """(micro_batch, gradient_checkpointing) for `factory.learner.learn_tokens` with ``config`` (a
    LearnerConfig) on ``n_concepts`` concepts, where ``free_bytes`` are free on the device with the backbone
    already resident (``torch.cuda.mem_get_info()[0]``). (0, False) when the TI term is off: no UNet runs."""
    if n_concepts < 1:
        raise ConfigError(f"n_concepts must be >= 1, got {n_concepts}")
    if config.weights.ti <= 0 or backbone.generator is None:
        return 0, False
    cost = cost or measure_ti_memory(backbone)
    # The calibration encodes every template, a step at most as many: the larger text graph bounds both.
    n_prompts = n_concepts * len(config.templates)
    return plan_ti_micro_batch(
        cost.per_sample,
        cost.fixed(n_prompts),
        free_bytes,
        n_concepts,
        config.ti_samples,
        per_sample_checkpointed_bytes=cost.per_sample_checkpointed,
    )


def planned_peak_bytes(
    backbone, config, n_concepts: int, micro_batch: int, checkpointing: bool, cost: TiMemoryCost | None = None
) -> int:
    """Peak bytes beyond the resident weights that ``learn_tokens`` should reach with this plan (what
    ``max_memory_allocated`` minus the weights measures, less the allocator's rounding)."""
    if config.weights.ti <= 0 or backbone.generator is None:
        raise ConfigError("the TI term is off: its memory plan does not apply")
    cost = cost or measure_ti_memory(backbone)
    n = micro_batch or n_concepts * config.ti_samples
    return cost.peak(n_concepts * len(config.templates), n, checkpointing)
