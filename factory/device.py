"""Where the frozen models compute, and in what precision: one place for the device rules.

Why a module of its own: the learner, the encoders, serving, pretraining and evaluation each choose a
device and a precision, and the GPU audit found each choosing differently (fp32 kept on GPUs, TF32 off,
fp16 learning without loss scaling). Every caller asks here instead.
"""

from __future__ import annotations

import torch

from factory.errors import ConfigError, DeviceError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(use_gpu: bool) -> torch.device:
    """``cuda`` when asked for and present (the current device, which Ray Train sets per worker), else
    the CPU; asking for a GPU on a machine without one is an error, not a silent CPU run."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("a GPU was asked for (--use-gpu) but torch sees none: drop --use-gpu or run on a GPU node")
    configure_cuda_math()
    return torch.device("cuda", torch.cuda.current_device())


def default_precision(use_gpu: bool) -> str:
    """bf16 on GPUs (tensor cores, fp32's range), fp32 on CPUs (bf16 matmuls are slower there)."""
    return "bf16" if use_gpu else "fp32"


def configure_cuda_math() -> None:
    """TF32 for the fp32 matmuls and convolutions that remain (the fp32 text tower, the loss arithmetic)
    and cuDNN's autotuner (static shapes per step): both were off."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def check_learning_precision(precision: str) -> str:
    """The precision the frozen models may have while tokens are learned: fp32 or bf16, never fp16.

    Why refuse fp16 rather than scale the loss: the TI gradients reaching the text states are 1e-8..1e-6
    per element, at fp16's subnormal floor; measured on fashion-mini, fp16 turned the token gradient
    (cos 0.985 to fp32, norm +11 %) where bf16 kept it (cos 1.0000, +0.7 %). A loss scale would have to be
    tuned per backbone and resolution; bf16 has fp32's range on every GPU that has fp16 tensor cores worth
    using, so nothing is lost by refusing. fp16 stays allowed for encoding and serving (no gradients).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp16":
        raise ConfigError(
            "fp16 is not supported for learning tokens (its range loses the TI gradients without "
            "loss scaling): use bf16 on GPUs or fp32"
        )
    return precision


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory, non-blocking.

    Why: a plain ``.to("cuda")`` from pageable memory makes the host wait for the copy, which drains the
    GPU's queue every time; the learner copies its step's samples and rows this way so the host can run a
    step ahead of the GPU. The pinned buffer stays alive until the copy is done (PyTorch's host allocator
    records the copy's stream), so a fresh tensor per call is safe.
    """
    device = torch.device(device)
    if device.type != "cuda" or x.device.type == "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def deterministic_cuda(on: bool = True) -> None:
    """Bitwise-repeatable CUDA kernels (slower): deterministic algorithms (index_put/atomics-free
    backward, no flash-attention backward) and a fixed cuBLAS workspace. For tests and audits; learning
    needs only what it has without this, per-concept seeds (see `factory.learner`)."""
    import os

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
