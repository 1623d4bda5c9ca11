"""One measure() for every latency backend (compress.backends: PyTorch, ONNX Runtime, TensorRT), cached across
processes (compress.latency_cache), and measure_together() for side-by-side timing.

Precision: the torch backend runs the model at the precision asked for (teacher.stages.use_precision), so a
model whose config says mixed_precision is not timed in fp16 under an fp32 or bf16 label; a module exported for
the other backends is traced in float32. fp32 means fp32 on every backend: TF32 is off in PyTorch's timing (cuDNN
allows it by default) and in TensorRT's fp32 engines.

Compiled timing (compile=True): each measurement resets Dynamo's caches and compiles with dynamic=False, so one
process can time any number of models; a recompile past Dynamo's limit (frames silently running eagerly) is
refused with an error rather than cached as a compiled latency. The environment variable FFSC_COMPILE_BACKEND
names another torch.compile backend than inductor (e.g. "eager", for tests on machines without a compiler); the
choice is part of the cache key.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.backends import AUTOCAST_DTYPES, BACKENDS, get_backend, names_where, tensorrt_problem
from compress.compiled import (
    COMPILE_BACKEND_ENV,
    TRITON_MIN_CAPABILITY,
    compile_backend,
    compile_counters,
    no_tf32,
    triton_problem,
)
from compress.device import same_device
from compress.errors import ConfigError
from compress.export.onnx_export import check_image_size, read_metadata, to_onnx
from compress.export.runtime import INPUT_NAMES, random_stereo_pair
from compress.latency_cache import LatencyCache, LatencyStats, latency_key, model_hash
from compress.latency_config import (
    CLOCKS,
    LATENCY_MODES,
    MEASURE_WHEN,
    PRECISIONS,
    BackendChoice,
    LatencyConfig,
    PredictorConfig,
    TimingConfig,
    resolve_backend,
)
from compress.machine import device_name, installed_version, machine_info, machine_slug
from compress.terminal import progress_bar
from teacher.stages import use_precision

__all__ = [  # the names callers import from here, wherever they are defined
    "AUTOCAST_DTYPES", "BACKENDS", "CLOCKS", "COMPILE_BACKEND_ENV", "LATENCY_MODES", "MEASURE_WHEN", "PRECISIONS",
    "TRITON_MIN_CAPABILITY", "BackendChoice", "LatencyCache", "LatencyConfig", "LatencyStats", "PredictorConfig",
    "TimingConfig", "check_clock", "compile_backend", "compile_counters", "compiled_warmup", "device_name",
    "installed_version", "latency_key", "machine_info", "machine_slug", "measure", "measure_together", "model_hash",
    "no_tf32", "on_device", "resolve_backend", "tensorrt_problem", "time_calls", "triton_problem",
]


def _summarize(times_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": float(np.median(arr)), "p10_ms": float(np.percentile(arr, 10)),
            "p90_ms": float(np.percentile(arr, 90)), "mean_ms": float(arr.mean()),
            "std_ms": float(statistics.pstdev(times_ms)) if len(times_ms) > 1 else 0.0}


def _time(step: Callable[[], object], device: torch.device, warmup: int, repeats: int, events: bool,
          stream: torch.cuda.Stream | None = None, clock: str = "wall") -> list[float]:
    """Per-run milliseconds: CUDA events around asynchronous GPU work, perf_counter otherwise
    (CPU, and ONNX Runtime, whose run() returns only when its own stream is done). clock="thread" times a
    single-threaded CPU run by its thread's CPU time, which other processes sharing the cores do not inflate."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda" and events:
        stream = stream or torch.cuda.current_stream(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            step()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    now = time.thread_time if clock == "thread" else time.perf_counter
    for _ in range(repeats):
        t0 = now()
        step()
        times.append((now() - t0) * 1000.0)
    return times


def check_clock(clock: str, device: torch.device, threads: int | None) -> None:
    """Raise ConfigError unless the clock can time this run (the thread clock needs one CPU thread)."""
    if clock not in CLOCKS:
        raise ConfigError(f"unknown clock '{clock}'; valid: {', '.join(CLOCKS)}")
    if clock == "thread" and (device.type != "cpu" or threads != 1):
        raise ConfigError(f"clock='thread' times single-threaded CPU runs only (got device {device}, {threads} "
                          "threads); use 1 thread (intra_op_threads=1, torch.set_num_threads(1)) or clock='wall'")


def time_calls(step: Callable[[], object], device: torch.device, warmup: int, repeats: int, events: bool = True,
               stream: torch.cuda.Stream | None = None, clock: str = "wall") -> list[float]:
    """Milliseconds of each of `repeats` calls of step() after `warmup` untimed calls, timed as measure() times."""
    return _time(step, device, warmup, repeats, events, stream, clock)


def compiled_warmup(warmup: int, backend: str, compile: bool, cuda_graph: bool) -> int:
    """The untimed calls a measurement makes: at least those that compile and record, whatever ``warmup`` says."""
    # The first compiled call compiles; compile's CUDA graphs (reduce-overhead) record on the following calls.
    # Timing them would report seconds of compilation as latency, so warmup=0 cannot mean "none" there.
    if not get_backend(backend).compiles or not compile:
        return warmup
    return max(warmup, 3 if cuda_graph else 1)


def _onnx_file(model_or_path: nn.Module | Path, workdir: Path, height: int, width: int, iters: int,
               batch: int, device: torch.device) -> Path:
    if isinstance(model_or_path, nn.Module):
        dest = workdir / "model.onnx"
        with use_precision(model_or_path, "fp32"):  # an fp32 graph: reduced precision is cast from it afterwards
            to_onnx(model_or_path, dest, height, width, iters, device=device, batch=batch, check_parity=False)
        return dest
    return Path(model_or_path)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model itself when it lives on ``device``, else a copy moved there (the caller's model stays where
    it trains: a search distils on one device and may time on another, e.g. ONNX Runtime on the CPU)."""
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    if first is None or same_device(first.device, device):  # cuda:1 is not cuda:0: compare the index too
        return model

    return copy.deepcopy(model).to(device)


def _check_onnx_iters(path: Path, iters: int) -> None:
    stored = read_metadata(path).get("iters")
    if stored is not None and int(stored) != iters:
        raise ConfigError(f"{path} was exported with iters={stored} but iters={iters} was asked; the iteration "
                          f"count is fixed at export: pass iters={stored} or re-export")


def measure(
    model_or_path: nn.Module | str | os.PathLike,
    backend: str,
    height: int,
    width: int,
    iters: int = 8,
    warmup: int = 5,
    repeats: int = 20,
    batch: int = 1,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    compile: bool = False,
    cuda_graph: bool = False,
    cache: LatencyCache | str | os.PathLike | None = None,
    intra_op_threads: int | None = None,
    clock: str = "wall",
) -> LatencyStats:
    """Time one stereo forward (iters refinement iterations) on a backend; cached when cache is given.

    model_or_path: an nn.Module (torch; exported to ONNX / built to an engine for the other
    backends), an .onnx file (onnxruntime, tensorrt) or a TensorRT engine file (tensorrt).
    intra_op_threads applies to onnxruntime only; torch uses its current thread setting.
    clock="thread" reports the CPU time of single-threaded CPU runs (steady on cores shared with other work).
    """
    b = get_backend(backend)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if repeats < 1 or warmup < 0 or iters < 1 or batch < 1:
        raise ConfigError(f"need repeats >= 1, warmup >= 0, iters >= 1, batch >= 1; got {repeats}, {warmup}, "
                          f"{iters}, {batch}")
    check_image_size(height, width)
    is_module = isinstance(model_or_path, nn.Module)
    if not b.takes_files and not is_module:
        files = " or ".join(repr(name) for name in names_where("takes_files"))
        raise ConfigError(f"the {b.name} backend times an nn.Module, got {model_or_path!r}; use {files} for files")
    if not is_module and not Path(model_or_path).is_file():
        raise ConfigError(f"model file {model_or_path} does not exist")
    b.require(device)
    device = torch.device(b.default_device(device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if b.cuda_only and device.type != "cuda":
        raise ConfigError(f"the {b.name} backend runs on CUDA, got device '{device}'")
    if is_module:
        model_or_path = on_device(model_or_path, device)
    elif Path(model_or_path).suffix == ".onnx":
        _check_onnx_iters(Path(model_or_path), iters)

    threads = b.threads(intra_op_threads)
    shapes = {name: [batch, 3, height, width] for name in INPUT_NAMES}
    check_clock(clock, device, threads)
    options = {"compile": compile, "cuda_graph": cuda_graph}
    if b.compiles and compile:
        # Static shapes from a fresh Dynamo cache; also keeps out entries cached before, some of them eager frames.
        options["compile_dynamic"] = False
        if compile_backend() != "inductor":
            options["compile_backend"] = compile_backend()
    if not b.exports_onnx and device.type == "cuda":  # a backend running the module itself
        # Entries cached before the stages ran the labelled precision timed mixed_precision models in fp16.
        options["precision_pinned"] = True
    if device.type == "cpu":
        options["threads"] = threads
    if clock != "wall":  # only then: keys of wall-clock results stay as they were
        options["clock"] = clock
    identity = model_hash(model_or_path)
    hw = device_name(device, threads)
    cache = LatencyCache(cache) if cache is not None and not isinstance(cache, LatencyCache) else cache
    key = latency_key(identity, backend, hw, shapes, precision, iters, options)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit

    inputs = dict(zip(INPUT_NAMES, random_stereo_pair(batch, height, width, seed=0, device=device), strict=True))
    was_training = is_module and model_or_path.training
    if is_module:
        model_or_path.eval()
    try:
        with (tempfile.TemporaryDirectory(prefix="ffsc-latency-") as tmp,
              b.timing_context(model_or_path if is_module else None, precision, compile)):
            workdir, target = Path(tmp), model_or_path
            if is_module and b.exports_onnx:
                target = _onnx_file(model_or_path, workdir, height, width, iters, batch, device)
            step = b.prepare(target, inputs, workdir, device, precision,
                             forward_kwargs={"iters": iters, "test_mode": True}, threads=intra_op_threads,
                             compile=compile, cuda_graph=cuda_graph, iters=iters)
            times = _time(step, device, compiled_warmup(warmup, b.name, compile, cuda_graph), repeats,
                          events=b.gpu_events, stream=step.stream, clock=clock)
    finally:
        if was_training:
            model_or_path.train()
    stats = LatencyStats(**_summarize(times), repeats=repeats, backend=backend, device=hw, precision=precision,
                         shapes=shapes, iters=iters, model_hash=identity, options=options)
    if cache is not None:
        cache.put(key, stats)
    return stats


def measure_together(
    models: Mapping[str, nn.Module | str | os.PathLike],
    backend: str,
    height: int,
    width: int,
    iters: int | Mapping[str, int] = 8,
    rounds: int = 3,
    warmup: int = 5,
    repeats: int = 20,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    intra_op_threads: int | None = None,
    clock: str = "wall",
    progress: bool = False,
    compile: bool = False,
    cuda_graph: bool = False,
) -> dict[str, LatencyStats]:
    """Time several models in alternating rounds (uncached), so that drift in machine load hits all alike.

    Each model is exported (ONNX) or built (TensorRT) once, then every round times each model in turn with
    :func:`measure`; a model's stats are the medians over rounds of its per-round median / p10 / p90 / mean,
    with the per-round medians kept in ``round_medians_ms``. Compare models by these, not by numbers taken at
    different times on a shared machine.
    """
    if rounds < 1:
        raise ConfigError(f"rounds: got {rounds}, expected >= 1")
    if not models:
        raise ConfigError("measure_together needs at least one model")
    per_model = {name: iters[name] if isinstance(iters, Mapping) else iters for name in models}
    dev = torch.device(get_backend(backend).default_device(device))
    runs: dict[str, list[LatencyStats]] = {name: [] for name in models}
    say = (lambda message: print(f"[ffsc] latency: {message}", flush=True)) if progress else None
    with tempfile.TemporaryDirectory(prefix="ffsc-latency-together-") as tmp:
        targets = {name: _deployable(on_device(model, dev) if isinstance(model, nn.Module) else model, backend,
                                     Path(tmp) / f"m{i}", height, width, per_model[name], dev, precision,
                                     name=name, say=say)
                   for i, (name, model) in enumerate(models.items())}

        steps = progress_bar(total=rounds * len(models), desc="latency (alternating rounds)", disable=not progress,
                     leave=False)
        for _ in range(rounds):
            for name, target in targets.items():
                runs[name].append(measure(target, backend, height, width, iters=per_model[name], warmup=warmup,
                                          repeats=repeats, device=dev, precision=precision,
                                          intra_op_threads=intra_op_threads, clock=clock, compile=compile,
                                          cuda_graph=cuda_graph))
                steps.update()
        steps.close()
    return {name: _pool(stats, rounds) for name, stats in runs.items()}


def _deployable(model: nn.Module | str | os.PathLike, backend: str, workdir: Path, height: int, width: int,
                iters: int, device: torch.device, precision: str, name: str = "the model",
                say: Callable[[str], None] | None = None) -> nn.Module | Path:
    """What measure() should time each round: the module (torch), or a file exported / built once (each step said
    to ``say`` before it starts: a teacher's export or an engine build takes minutes)."""
    b = get_backend(backend)
    if not b.exports_onnx or (not isinstance(model, nn.Module) and Path(model).suffix != ".onnx"):
        return model
    workdir.mkdir(parents=True)
    if say is not None and isinstance(model, nn.Module):
        say(f"exporting {name} to ONNX ({height}x{width}, {iters} iteration{'' if iters == 1 else 's'}) ...")
    onnx_path = _onnx_file(model, workdir, height, width, iters, 1, device)
    if say is not None and b.builds_engine:
        say(f"building a {b.label} engine for {name} ({precision}) ...")
    return b.deployable(onnx_path, workdir, precision, iters, device)


def _pool(runs: list[LatencyStats], rounds: int) -> LatencyStats:
    first = runs[0]
    medians = [r.median_ms for r in runs]
    return LatencyStats(
        median_ms=statistics.median(medians), p10_ms=statistics.median(r.p10_ms for r in runs),
        p90_ms=statistics.median(r.p90_ms for r in runs), mean_ms=statistics.fmean(r.mean_ms for r in runs),
        std_ms=statistics.median(r.std_ms for r in runs), repeats=sum(r.repeats for r in runs),
        backend=first.backend, device=first.device, precision=first.precision, shapes=first.shapes,
        iters=first.iters, model_hash=first.model_hash, options={**first.options, "rounds": rounds},
        round_medians_ms=medians,
    )
