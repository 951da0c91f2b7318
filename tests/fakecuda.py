"""A fake GPU for CPU CI: run device code to the end with real numbers and record what a GPU would reject.

Why: the first GPU run of the factory crashed at its first step on a CPU-built tensor mixed with a GPU one
(`factory/tokens/parametrization.py`), and no CPU test could see it. Under `fake_cuda()`:

* every tensor sent to ``"cuda"`` becomes a `FakeCudaTensor`: a wrapper whose device, to Python code, is
  ``cuda:0`` (so ``x.device.type == "cuda"`` branches run as on a GPU) and, to the dispatcher, ``meta``
  (so autograd needs no CUDA runtime), holding its real values in an inner CPU tensor;
* a `TorchFunctionMode` rewrites ``device="cuda"`` arguments before PyTorch could initialise CUDA, and turns
  ``.to("cuda")`` / ``.cuda()`` into a differentiable wrap (the gradient flows back to the CPU tensor);
* a `TorchDispatchMode` runs every aten op on the inner tensors and *records instead of raising*:
  - ``mixed_device``: an op that mixes a GPU tensor with a CPU tensor of one or more dimensions (CPU
    index tensors and 0-dim scalars are allowed, as CUDA allows them);
  - ``cpu_generator``: a random op that writes a GPU tensor from a CPU ``torch.Generator``;
  - ``numpy``: ``.numpy()`` of a GPU tensor;
  - host synchronisations (`FakeCuda.syncs`): ``.item()``/``bool()``, ``.tolist()``, ``nonzero``,
    ``unique``, boolean-mask indexing, device-to-host copies, indexing with a CPU index tensor (an implicit
    host-to-device copy) and blocking host-to-device copies (``non_blocking=False``, or from unpinned memory).

Each record names the first project frame (factory/, jobs/, serve/, cli/, benchmarks/) that issued it.
``torch.cuda.is_available()`` and friends answer as a one-GPU machine would, with ``mem_get_info`` a
configurable 80 GiB card. Limitations: the modes are thread-local, so code must run in the calling thread;
real ``meta`` tensors cannot be used inside the block (a factory op on ``meta`` is taken for a GPU one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIRS = tuple(os.path.join(ROOT, d) + os.sep for d in ("factory", "jobs", "serve", "cli", "benchmarks"))
CUDA = torch.device("cuda", 0)
aten = torch.ops.aten

# Ops that read a GPU tensor's values on the host (the CPU waits for the GPU stream to drain).
SYNC_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.is_nonzero.default: "bool",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.equal.default: "equal",
}
INDEX_OPS = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
    aten._unsafe_index.Tensor,
    aten._unsafe_index_put.default,
}
COPY_OPS = {aten.copy_.default, aten._to_copy.default, aten.copy.default}


@dataclasses.dataclass(frozen=True)
class Record:
    kind: str
    op: str
    where: str  # "path:line in function" of the first project frame, or "?" when none

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) at {self.where}"


class FakeCudaTensor(torch.Tensor):
    """A "GPU" tensor: ``meta`` to the dispatcher, ``cuda:0`` to Python, real values in ``inner``."""

    inner: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl  # the modes do the work

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        assert not isinstance(inner, FakeCudaTensor) and inner.device.type == "cpu", (type(inner), inner.device)
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device="meta",
            requires_grad=requires_grad,
        )
        r.inner = inner
        return r

    @property
    def device(self) -> torch.device:  # what Python code sees: the tensor lives on the GPU
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_meta(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"FakeCuda({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"a fake GPU tensor escaped fake_cuda() (op {func}): use it inside the context")


def _is_fake(x) -> bool:
    return isinstance(x, FakeCudaTensor)


def _is_cuda_device(d) -> bool:
    if d is None:
        return False
    if isinstance(d, int):
        return True  # an ordinal means a CUDA device in torch's API
    return torch.device(d).type == "cuda"


def _where() -> str:
    # Frames walked by hand: traceback.extract_stack reads every frame's source line (seconds per test).
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PROJECT_DIRS):
            return f"{os.path.relpath(name, ROOT)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class _ToFake(torch.autograd.Function):
    """CPU -> fake GPU, differentiable (the gradient comes back as a CPU tensor)."""

    @staticmethod
    def forward(ctx, x):
        return FakeCudaTensor(x.detach())

    @staticmethod
    def backward(ctx, g):
        return g.inner if _is_fake(g) else g


class FakeCuda:
    """The recorder; see the module docstring. ``violations`` and ``syncs`` are lists of `Record`."""

    def __init__(self, free_bytes: int = 80 * 2**30, total_bytes: int = 96 * 2**30):
        self.violations: list[Record] = []
        self.syncs: list[Record] = []
        self.free_bytes, self.total_bytes = free_bytes, total_bytes
        self._pinned: set[int] = set()  # data_ptr of CPU tensors "pinned" by pin_memory()

    # ---- recording -----------------------------------------------------------------------------
    def violate(self, kind: str, op: str) -> None:
        self.violations.append(Record(kind, op, _where()))

    def sync(self, kind: str, op: str) -> None:
        self.syncs.append(Record(kind, op, _where()))

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[Record]]:
        """The syncs recorded inside the block."""
        start, out = len(self.syncs), []
        try:
            yield out
        finally:
            out.extend(self.syncs[start:])

    def report(self) -> str:
        return "\n".join(str(r) for r in self.violations) or "no device violations"

    # ---- moves ---------------------------------------------------------------------------------
    def to_fake(self, x: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if _is_fake(x):
            return x
        if not (non_blocking and x.data_ptr() in self._pinned):
            # A pageable or blocking host-to-device copy: the host waits for the copy (and the stream).
            self.sync("h2d_blocking", "to(cuda)")
        return _ToFake.apply(x) if x.requires_grad else FakeCudaTensor(x.detach())


class _FunctionMode(TorchFunctionMode):
    """Rewrites ``cuda`` device arguments and moves before anything reaches CUDA."""

    def __init__(self, rec: FakeCuda):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        rec = self.rec
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.numpy and _is_fake(args[0]):
            rec.violate("numpy", "numpy()")
            return args[0].inner.detach().numpy()
        if func is torch.Tensor.tolist and _is_fake(args[0]):
            rec.sync("tolist", "tolist()")
            return args[0].inner.tolist()
        if func is torch.Tensor.pin_memory:
            rec._pinned.add(args[0].data_ptr())
            return args[0]  # this machine cannot pin (no CUDA driver); the record is what matters
        if func is torch.Tensor.is_pinned:
            return args[0].data_ptr() in rec._pinned
        kwargs.pop("pin_memory", None) if kwargs.get("pin_memory") else None
        if _is_cuda_device(kwargs.get("device")):
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                rec.violate("cpu_generator", getattr(func, "__name__", str(func)))
            kwargs["device"] = "cpu"
            out = func(*args, **kwargs)
            return tree_map(
                lambda o: (
                    FakeCudaTensor(o.detach(), o.requires_grad)
                    if isinstance(o, torch.Tensor) and not _is_fake(o)
                    else o
                ),
                out,
            )
        return func(*args, **kwargs)

    def _move(self, func, args, kwargs):
        """``Tensor.to`` in its three signatures, and ``Tensor.cuda``."""
        x, rest = args[0], list(args[1:])
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        non_blocking = kwargs.pop("non_blocking", False)
        memory_format = kwargs.pop("memory_format", None)
        kwargs.pop("copy", None)
        if func is torch.Tensor.cuda:
            device = CUDA
        elif rest and isinstance(rest[0], torch.Tensor):
            other = rest.pop(0)
            device, dtype = other.device, other.dtype
        elif rest and isinstance(rest[0], (str, int, torch.device)):
            device = rest.pop(0)
        if rest and (rest[0] is None or isinstance(rest[0], torch.dtype)):
            dtype = rest.pop(0)
        if rest:
            non_blocking = bool(rest.pop(0)) or non_blocking
        if _is_cuda_device(device):
            x = self.rec.to_fake(x, non_blocking)
            device = None
        elif device is not None and torch.device(device).type == "cpu" and not _is_fake(x):
            device = None  # already there
        extra = {
            k: v for k, v in (("device", device), ("dtype", dtype), ("memory_format", memory_format)) if v is not None
        }
        return torch.Tensor.to(x, **extra) if extra else x  # a D2H copy is recorded at dispatch


class _DispatchMode(TorchDispatchMode):
    """Runs aten ops on the inner CPU tensors, checks and records, wraps the outputs."""

    def __init__(self, rec: FakeCuda):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))]
        fakes = [a for a in flat if _is_fake(a)]
        name = str(func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func)
        to_cpu = func in COPY_OPS and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if not fakes:
            if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
                # A factory op that C++ code issued with a fake tensor's options (SDPA's math path builds
                # its causal mask so): the tensor belongs on the GPU. So real meta tensors cannot be used
                # under the harness.
                return tree_map(
                    lambda o: FakeCudaTensor(o) if isinstance(o, torch.Tensor) else o,
                    func(*args, **{**kwargs, "device": torch.device("cpu")}),
                )
            return func(*args, **kwargs)
        # -- checks ---------------------------------------------------------------------------------
        cpu = [a for a in flat if isinstance(a, torch.Tensor) and not _is_fake(a) and a.device.type == "cpu"]
        if func in INDEX_OPS:
            idx = [t for t in torch.utils._pytree.tree_leaves(args[1]) if isinstance(t, torch.Tensor)]
            if any(t.dtype == torch.bool for t in idx):
                rec.sync("bool_mask_index", name)
            if any(not _is_fake(t) and t.dim() > 0 for t in idx):
                rec.sync("cpu_index", name)  # CUDA copies the index to the device, from pageable memory
            idx_ids = {id(t) for t in idx}
            cpu = [a for a in cpu if id(a) not in idx_ids]
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if _is_fake(dst) and not _is_fake(src):
                if src.dim() > 0:
                    rec.sync("h2d_blocking", name)
                cpu = []
            elif not _is_fake(dst) and _is_fake(src):
                rec.sync("d2h", name)
                dst.copy_(src.inner)
                return dst
        if to_cpu:
            rec.sync("d2h", name)
        elif any(a.dim() > 0 for a in cpu):
            rec.violate("mixed_device", name)
        if func in SYNC_OPS:
            rec.sync(SYNC_OPS[func], name)
        gen = kwargs.get("generator")
        if gen is not None and gen.device.type == "cpu":
            rec.violate("cpu_generator", name)
        # -- run on the inner tensors ----------------------------------------------------------------
        unwrap = lambda a: a.inner if _is_fake(a) else a  # noqa: E731
        if kwargs.get("device") is not None:  # _to_copy, new_zeros, zeros_like… with a GPU (meta) or CPU device
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if to_cpu:
            return out
        by_inner = {id(a.inner): a for a in fakes}

        def wrap(o):
            if not isinstance(o, torch.Tensor) or _is_fake(o):
                return o
            if id(o) in by_inner:  # in-place ops return their argument
                return by_inner[id(o)]
            return FakeCudaTensor(o)

        return tree_map(wrap, out)


def _cuda_api(rec: FakeCuda) -> dict[str, Any]:
    """``torch.cuda`` as one 80 GiB GPU would answer it (patched for the duration of `fake_cuda`)."""
    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda d: None,
        "synchronize": lambda device=None: rec.sync("synchronize", "torch.cuda.synchronize"),
        "mem_get_info": lambda device=None: (rec.free_bytes, rec.total_bytes),
        "max_memory_allocated": lambda device=None: 0,
        "memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "get_device_name": lambda device=None: "FakeCuda",
        "is_bf16_supported": lambda *a, **k: True,
    }


class _Stream:
    """The default stream, never capturing a graph (what the optimizers ask before a step)."""

    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def _accelerator_api() -> dict[str, Any]:
    return {
        "current_stream": lambda device=None: _Stream(),
        "current_device_index": lambda: 0,
        "device_count": lambda: 1,
    }


@contextlib.contextmanager
def fake_cuda(**kw) -> Iterator[FakeCuda]:
    """Run the block on a fake GPU; yields the recorder (see the module docstring)."""
    rec = FakeCuda(**kw)
    patches = [
        (torch.cuda, _cuda_api(rec)),
        (torch.accelerator, _accelerator_api()),
        (torch.cuda, {"current_stream": lambda device=None: _Stream()}),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, fns in patches for name in fns]
    for mod, fns in patches:
        for name, fn in fns.items():
            setattr(mod, name, fn)
    try:
        with _FunctionMode(rec), _DispatchMode(rec):
            yield rec
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)


def assert_device_clean(rec: FakeCuda) -> None:
    assert not rec.violations, "device violations:\n" + rec.report()
