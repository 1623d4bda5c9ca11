"""What compiled PyTorch timing needs: the torch.compile backend, a fresh compile per model, Dynamo's counters,
refusing eager fallback at the recompile limit, Triton's availability, and TF32 off for fp32 rows."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch._dynamo
import torch.utils._triton
from torch import nn
from torch._dynamo.utils import counters

from compress.errors import FFSCError

COMPILE_BACKEND_ENV = "FFSC_COMPILE_BACKEND"
"""Environment variable naming the torch.compile backend of compiled timing (unset: inductor)."""
TRITON_MIN_CAPABILITY = (7, 0)
"""Oldest CUDA compute capability Triton (and so inductor's GPU code) runs on."""


def triton_problem(device: int | str | torch.device | None = None) -> str | None:
    """None when torch.compile can generate Triton kernels for the CUDA GPU ``device``, else the reason it cannot."""
    try:
        import triton  # noqa: F401  (absent or broken on Windows and on Jetson's aarch64 wheels)
    except ImportError as err:
        return f"Triton does not import ({err})"
    except Exception as err:  # a broken install raises other types
        return f"Triton fails to import ({type(err).__name__}: {err})"
    capability = torch.cuda.get_device_capability(device)
    if capability < TRITON_MIN_CAPABILITY:
        return (f"the GPU's compute capability {capability[0]}.{capability[1]} is below Triton's minimum "
                f"{TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}")
    if not torch.utils._triton.has_triton():
        return "PyTorch finds no usable Triton backend for this GPU (torch.utils._triton.has_triton() is False)"
    return None


def compile_problem(device: str | torch.device) -> str | None:
    """Why torch.compile cannot time on ``device`` here (inductor on a CUDA GPU without a working Triton), or None;
    a CPU compiles C++ and another compile backend needs no Triton."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available() or compile_backend() != "inductor":
        return None  # no CUDA at all is check_backend's one line
    return triton_problem(dev)


def compile_backend() -> str:
    """The torch.compile backend of compiled timing: $FFSC_COMPILE_BACKEND, else inductor."""
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def compile_for_timing(model: nn.Module, cuda_graph: bool) -> nn.Module:
    """``model`` compiled for timing one input shape, from an empty Dynamo cache."""
    # Dynamo caches compiled frames per code object, and every model of a family shares the same forward code: without
    # a reset the models timed before count towards its recompile limit (8), past which frames run eagerly.
    torch.compiler.reset()
    backend = compile_backend()
    # One fixed input shape is timed: dynamic=False keeps shapes static (no symbolic-shape recompile in the warm-up).
    if backend == "inductor":
        return torch.compile(model, mode="reduce-overhead" if cuda_graph else "default", dynamic=False)
    return torch.compile(model, backend=backend, dynamic=False)


def compile_counters() -> dict[str, int]:
    """Dynamo and Inductor's process-wide counts a compiled timing can be judged by (diff two snapshots)."""
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hits": recompile_limit_hits(),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def recompile_limit_hits() -> int:
    """Frames Dynamo gave up on at its recompile limit in this process (they run eagerly)."""
    return sum(n for msg, n in counters["unimplemented"].items() if "recompile limit" in msg.lower())


@contextlib.contextmanager
def refuse_eager_fallback() -> Iterator[None]:
    """Raise instead of letting a compiled model's frames fall back to eager at Dynamo's recompile limit."""
    before = recompile_limit_hits()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise FFSCError("torch.compile hit Dynamo's recompile limit while timing, so frames would run eagerly "
                        "under a compiled label; time this model alone or without compile") from err
    if recompile_limit_hits() > before:  # belt and braces: a hit that did not raise still ran eagerly
        raise FFSCError("torch.compile hit Dynamo's recompile limit while timing (frames ran eagerly); the "
                        "latency is not a compiled one")


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 allowed (what TensorRT allows by default) or not in cuDNN convolutions and CUDA matmuls within the
    block; the settings before it restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def no_tf32(active: bool = True) -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls within the block, as TensorRT's fp32 engines build it."""
    # PyTorch allows TF32 in cuDNN convolutions by default: an "fp32" row would otherwise time 10-bit mantissas.
    if not active:
        yield
        return
    with tf32(allowed=False):
        yield
