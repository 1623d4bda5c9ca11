"""Time a resolved model on torch, ONNX Runtime and TensorRT; which backends and devices this machine offers."""

from __future__ import annotations

import torch

from compress.errors import ConfigError
from compress.models import ResolvedModel
from search_spaces import count_macs, count_params


def available_backends() -> list[str]:
    """Latency backends usable here: torch and onnxruntime always, tensorrt with TensorRT and a CUDA GPU."""
    # compress.backends loads compress.export and with it onnx (about 1.5 s): kept out of ffsc --help
    from compress.backends import all_backends

    return [b.name for b in all_backends()
            if b.available() is None and (not b.cuda_only or torch.cuda.is_available())]


def backend_device(backend: str, requested: str | None) -> str:
    """Device a backend runs on: the requested one, else CUDA where that backend can use it, else the CPU."""
    # compress.backends loads compress.export and with it onnx (about 1.5 s): kept out of ffsc --help
    from compress.backends import get_backend

    return get_backend(backend).default_device(requested or None)


def bench_model(
    resolved: ResolvedModel,
    backends: list[str],
    height: int,
    width: int,
    iters: int,
    warmup: int = 5,
    repeats: int = 20,
    precision: str = "fp32",
    compile: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
    device: str | None = None,
    cache: str | None = None,
    clock: str = "wall",
) -> dict:
    """Time a resolved model on each backend; returns machine, model cost and one row per backend."""
    # compress.backends and compress.latency load compress.export and with it onnx (about 1.5 s): kept out of
    # ffsc --help
    from compress.backends import BACKENDS, get_backend
    from compress.latency import machine_info, measure  # (see above)

    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown --backend {', '.join(unknown)}; valid: {', '.join(BACKENDS)}")
    if resolved.kind == "onnx":
        # compress.export loads onnx (about 1.5 s): kept out of ffsc --help
        from compress.export.onnx_export import check_onnx_size

        check_onnx_size(resolved.path, height, width)  # before ONNX Runtime fails inside the timing loop
    cost = {"params": None, "gmacs": None}
    if resolved.module is not None:
        macs = count_macs(resolved.module, height, width, iters=iters)
        cost = {"params": count_params(resolved.module), "gmacs": macs.gmacs}
    rows = []
    process_threads = torch.get_num_threads()
    try:
        for backend in backends:
            dev = backend_device(backend, device)
            target = resolved.module.to(dev) if resolved.module is not None else resolved.path
            if get_backend(backend).own_threads and threads is not None:
                torch.set_num_threads(threads)  # the user asked for this thread count for this measurement
            stats = measure(target, backend, height, width, iters=iters, warmup=warmup, repeats=repeats, device=dev,
                            precision=precision, compile=compile, cuda_graph=cuda_graph, cache=cache,
                            intra_op_threads=threads, clock=clock)
            rows.append({**stats.to_dict(), **cost})
    finally:  # a library call leaves the caller's thread count as it found it
        torch.set_num_threads(process_threads)
    return {"machine": machine_info(), "model": resolved.description, "kind": resolved.kind, "height": height,
            "width": width, "iters": iters, "results": rows}
