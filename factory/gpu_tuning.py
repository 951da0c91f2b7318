"""Speed levers for the UNet that learning runs through, each one switchable on its own.

Why apart from the learner: each lever trades something (compile time, a memory-format copy of every conv
weight, an attention kernel with its own numerics), and the audit (``../shared/audits/gpu-path.md`` §3.3)
ranks them by *expected* gain only; `benchmarks/gpu_onboard.py` measures each one alone (``--compile``,
``--channels-last``, ``--attention``) before any becomes a default. None changes what the UNet computes
beyond kernel rounding: a tuned UNet gives the same outputs as the untuned one, to that rounding.

- ``compile``: ``torch.compile`` of the UNet in place (``Module.compile``: the module stays a
  ``UNet2DConditionModel``, so the learner's ``enable_gradient_checkpointing`` and the memory plan's
  ``unet.config`` keep working). It fuses GroupNorm+SiLU, GEGLU and the residual adds, the ~17 %
  memory-bound part of a step, and cuts kernel launches.
- ``channels_last``: NHWC conv weights, so cuDNN runs its tensor-core kernels without the NCHW<->NHWC
  transposes around each convolution (convs are about half of a UNet sample's FLOPs).
- ``attention``: the SDPA backend of every attention layer. SD 1.5's head dims are 40/80/160: FA2 rounds 40
  up to 64 (at most 62.5 % of its work is useful), so cuDNN's or the memory-efficient kernel may win on
  Hopper; "default" leaves PyTorch's own choice.
"""

from __future__ import annotations

import torch
from torch import nn

from factory.errors import ConfigError

ATTENTION_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
# Backends PyTorch implements only for CUDA tensors: asking for them on another device fails at the first
# attention call deep inside a step; failing here says which setting to change.
_CUDA_ONLY = ("efficient", "cudnn")


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


class SDPAKernelProcessor:
    """diffusers' SDPA attention processor (``AttnProcessor2_0``) run under ``sdpa_kernel(backend)``, so the
    backend is a property of this UNet rather than of a global context the caller must remember to enter
    around every forward and backward (the backward uses the kernel its forward chose)."""

    def __init__(self, backend: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.backend = backend
        self._inner = AttnProcessor2_0()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_backend(self.backend)):
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def tune_unet(
    unet: nn.Module,
    compile: bool = False,
    channels_last: bool = False,
    attention: str = "default",
    compile_backend: str = "inductor",
    compile_mode: str | None = None,
) -> nn.Module:
    """Apply the chosen levers to a diffusers UNet in place and return it (the same object).

    ``compile_backend`` / ``compile_mode`` go to ``torch.compile`` (tests use "eager": the wiring, not
    Inductor's code generation). Compilation itself happens at the first call of each input shape.
    """
    if attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {attention!r}")
    device = next(unet.parameters()).device
    if attention in _CUDA_ONLY and device.type != "cuda":
        raise ConfigError(
            f"attention={attention!r} is a CUDA-only SDPA backend, but the UNet is on {device}: "
            "move it to the GPU first, or use 'default', 'flash' or 'math'"
        )
    if channels_last:
        # nn.Module.to, not diffusers' override (which warns on any cast): only 4-D conv weights change layout.
        nn.Module.to(unet, memory_format=torch.channels_last)
    if attention != "default":
        unet.set_attn_processor(SDPAKernelProcessor(attention))
    if compile:
        unet.compile(backend=compile_backend, mode=compile_mode)
    return unet
