"""One measure() for every backend (PyTorch, ONNX Runtime, TensorRT), with a cross-process latency cache.

Model identity for the cache: an nn.Module hashes to sha256 over its class (module + qualified
name), repr() of its `cfg` or `config` attribute when it has one, and every state-dict entry's
name, dtype, shape and bytes; so two modules with equal config and weights share cache entries and
any weight change misses. A file (.onnx, .engine) hashes to the sha256 of its bytes.

Precision: the torch backend runs the model at the precision asked for (teacher.stages.use_precision), so a
model whose config says mixed_precision is not timed in fp16 under an fp32 or bf16 label; a module exported for
the other backends is traced in float32. fp32 means fp32 on every backend: TF32 is off in PyTorch's timing (cuDNN
allows it by default) and in TensorRT's fp32 engines.

Compiled timing (compile=True): each measurement resets Dynamo's caches and compiles with dynamic=False, so one
process can time any number of models; a recompile past Dynamo's limit (frames silently running eagerly) is
refused with an error rather than cached as a compiled latency. The environment variable FFSC_COMPILE_BACKEND
names another torch.compile backend than inductor (e.g. "eager", for tests on machines without a compiler); the
choice is part of the cache key.

One module over the ~500-line guide: one measure() per backend, the cache, the side-by-side timing and the
LatencyConfig that drives them change together whenever a backend is added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.device import same_device
from compress.errors import ConfigError, FFSCError
from compress.export._files import sha256_file
from compress.export._trt import import_tensorrt, require_cuda
from compress.export.onnx_export import check_image_size
from compress.export.runtime import INPUT_NAMES, OUTPUT_NAME, make_session, random_stereo_pair
from teacher.stages import use_precision

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
AUTOCAST_DTYPES = _AUTOCAST
"""Autocast dtype of each reduced precision (fp32 runs without autocast)."""
LATENCY_MODES = ("measured", "predicted")
MEASURE_WHEN = ("budget", "always", "never")
COMPILE_BACKEND_ENV = "FFSC_COMPILE_BACKEND"
"""Environment variable naming the torch.compile backend of compiled timing (unset: inductor)."""
TRITON_MIN_CAPABILITY = (7, 0)
"""Oldest CUDA compute capability Triton (and so inductor's GPU code) runs on."""


@dataclass(frozen=True)
class BackendChoice:
    """The latency backend a run uses, and why (logged, written to summary.json and MLflow)."""

    backend: str
    device: str
    reason: str
    compile: bool = False
    cuda_graph: bool = False


def tensorrt_problem() -> str | None:
    """None when TensorRT imports, else the reason it does not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"TensorRT does not import ({err})"
    except Exception as err:  # a broken install raises other types (missing libnvinfer, wrong CUDA)
        return f"TensorRT fails to import ({type(err).__name__}: {err})"
    return None


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
    from torch.utils._triton import has_triton

    if not has_triton():
        return "PyTorch finds no usable Triton backend for this GPU (torch.utils._triton.has_triton() is False)"
    return None


def resolve_backend(backend: str, device: str | None = None) -> BackendChoice:
    """Pick the backend for 'auto' (TensorRT, else PyTorch on CUDA with CUDA graphs, compiled where Triton works,
    else ONNX Runtime on CPU); other names pass through with their reason."""
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"latency backend {backend!r}: expected one of {['auto', *BACKENDS]}")
    cuda = torch.cuda.is_available()
    if backend != "auto":
        dev = device or ("cuda" if cuda and backend != "onnxruntime" else "cpu")
        return BackendChoice(backend, dev, "named in the config")
    if device is not None and torch.device(device).type == "cpu":
        return BackendChoice("onnxruntime", "cpu", "auto: the config names device 'cpu'")
    if not cuda:
        return BackendChoice("onnxruntime", "cpu", "auto: no CUDA GPU visible to PyTorch, so ONNX Runtime on CPU")
    trt_problem = tensorrt_problem()
    gpu = torch.cuda.get_device_name(0)
    if trt_problem is None:
        return BackendChoice("tensorrt", device or "cuda", f"auto: TensorRT imports and CUDA is present ({gpu})")
    compile_problem = triton_problem(device)
    if compile_problem is not None:  # torch.compile would fail (or fall back) on its first call
        return BackendChoice("torch", device or "cuda",
                             f"auto: {trt_problem}; PyTorch on CUDA ({gpu}) with CUDA graphs, without torch.compile "
                             f"because {compile_problem}", cuda_graph=True)
    return BackendChoice("torch", device or "cuda",
                         f"auto: {trt_problem}; PyTorch on CUDA ({gpu}) with torch.compile and CUDA graphs",
                         compile=True, cuda_graph=True)


@dataclass
class LatencyConfig:
    """How latency is obtained, for the search, pruning and the run's final table alike (see measure)."""

    mode: str = "measured"
    """measured (timed on this machine's backend) or predicted (per-block tables, compress.latency_predictor)."""
    backend: str = "onnxruntime"
    """auto | torch | onnxruntime | tensorrt; auto = TensorRT where it imports and CUDA is present, else PyTorch on
    CUDA with CUDA graphs (compiled too where Triton works), else ONNX Runtime on CPU (see resolve_backend)."""
    device: str | None = None
    """None = cuda when available (always for tensorrt), else cpu."""
    precision: str = "fp32"
    height: int | None = None
    width: int | None = None
    """Input size timed (and MACs counted at); None = the run recipe's working height and width."""
    iters: int | None = None
    """GRU iterations of the timed forward; None = the model's deployment count."""
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    """ONNX Runtime intra-op threads (None = its default)."""
    clock: str = "wall"
    """wall, or thread: the CPU time of one thread (needs threads=1), steady on shared cores."""
    measure: str = "budget"
    """Pruning: when to time, 'budget' (only for a latency budget), 'always' or 'never'."""
    report_rounds: int = 3
    """The run's final table: rounds of side-by-side timing of teacher and students (0 = time each once)."""
    compile: bool = False
    """PyTorch backend: time the torch.compile'd model. With backend 'auto' the choice sets compile and cuda_graph
    (True for PyTorch on CUDA, compile only where Triton works); name the backend to set them yourself."""
    cuda_graph: bool = False
    """PyTorch and TensorRT backends on CUDA: replay each forward from a captured CUDA graph."""
    table: str | None = None
    """Predicted mode: the per-block table file (None = the user's cache, shared by every run on this machine)."""
    check_students: int = 5
    """Predicted mode: students sampled at the start of a search to check the predictor against measurement."""
    max_predictor_error: float = 0.25
    """Predicted mode: above this median relative error the search says the predictor is off here."""

    def __post_init__(self) -> None:
        for key, allowed in (("mode", LATENCY_MODES), ("backend", ("auto", *BACKENDS)), ("precision", PRECISIONS),
                             ("clock", CLOCKS), ("measure", MEASURE_WHEN)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"latency.{key}: got {getattr(self, key)!r}, expected one of {', '.join(allowed)}")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value <= 0 or value % 32):
                raise ConfigError(f"latency.{key}: got {value}, expected a positive multiple of 32")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"latency.iters: got {self.iters}, expected >= 1 or null")
        if self.warmup < 0 or self.repeats < 1 or self.report_rounds < 0:
            raise ConfigError(f"latency.warmup/repeats/report_rounds: got {self.warmup}/{self.repeats}/"
                              f"{self.report_rounds}, expected >= 0 / >= 1 / >= 0")
        if self.check_students < 0 or not 0 < self.max_predictor_error:
            raise ConfigError(f"latency.check_students/max_predictor_error: got {self.check_students}/"
                              f"{self.max_predictor_error}, expected >= 0 / > 0")
        if self.compile and self.backend not in ("torch", "auto"):
            raise ConfigError(f"latency.compile: only the torch backend compiles, the backend is {self.backend!r}")
        if self.cuda_graph and self.backend == "onnxruntime":
            raise ConfigError("latency.cuda_graph: CUDA graphs are for the torch and tensorrt backends, the backend "
                              "is 'onnxruntime'")

    def timing(self) -> dict[str, object]:
        """The keyword arguments of measure() and measure_together() these settings fix."""
        return {"warmup": self.warmup, "repeats": self.repeats, "precision": self.precision,
                "intra_op_threads": self.threads, "clock": self.clock, "compile": self.compile,
                "cuda_graph": self.cuda_graph}

    def resolved(self) -> tuple[LatencyConfig, BackendChoice]:
        """These settings with 'auto' replaced by the backend this machine gets, and the choice with its reason."""
        choice = resolve_backend(self.backend, self.device)
        if self.backend != "auto":
            return replace(self, device=choice.device), choice
        return replace(self, backend=choice.backend, device=choice.device, compile=choice.compile,
                       cuda_graph=choice.cuda_graph), choice


@dataclass
class LatencyStats:
    """Latency of one forward (all iterations) in milliseconds, over `repeats` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    backend: str
    device: str
    precision: str
    shapes: dict[str, list[int]]
    iters: int
    model_hash: str
    options: dict = field(default_factory=dict)
    """Settings that change the number but not the model: compile, cuda_graph, threads."""
    round_medians_ms: list[float] = field(default_factory=list)
    """Per-round medians when pooled by :func:`measure_together` (empty for one measure())."""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatencyStats:
        """Inverse of to_dict."""
        return cls(**data)


def model_hash(model_or_path: nn.Module | str | os.PathLike) -> str:
    """Identity of a model for caching (see the module docstring for what goes in)."""
    if not isinstance(model_or_path, nn.Module):
        return sha256_file(model_or_path)
    model = getattr(model_or_path, "_orig_mod", model_or_path)  # a torch.compile wrapper times its original
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "cfg", getattr(model, "config", None))
    if config is not None:
        digest.update(repr(config).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latency_key(
    model_hash: str, backend: str, device: str, shapes: dict[str, list[int]], precision: str, iters: int,
    options: dict | None = None,
) -> str:
    """Cache key: everything that changes a latency number."""
    payload = {"model": model_hash, "backend": backend, "device": device, "shapes": shapes,
               "precision": precision, "iters": iters, "options": options or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class LatencyCache:
    """Latency results in a SQLite file, safe for concurrent processes (SQLite's own locking)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS latency (key TEXT PRIMARY KEY, stats TEXT NOT NULL, "
                       "created REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        # One short-lived connection per call: nothing held across processes or threads.
        return sqlite3.connect(self.path, timeout=60.0)

    def get(self, key: str) -> LatencyStats | None:
        """Stored stats for key, or None."""
        with self._connect() as db:
            row = db.execute("SELECT stats FROM latency WHERE key = ?", (key,)).fetchone()
        return None if row is None else LatencyStats.from_dict(json.loads(row[0]))

    def put(self, key: str, stats: LatencyStats) -> None:
        """Store (or replace) stats under key."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO latency (key, stats, created) VALUES (?, ?, ?)",
                       (key, json.dumps(stats.to_dict(), sort_keys=True), time.time()))

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM latency").fetchone()[0])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def installed_version(*distributions: str) -> str | None:
    """The version of the first of ``distributions`` that is installed, or None."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, object]:
    """The hardware and library versions latency numbers are measured with, for reports."""
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": installed_version("onnxruntime", "onnxruntime-gpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "tensorrt": installed_version("tensorrt"),
    }


def machine_slug(info: dict[str, object] | None = None) -> str:
    """A file-name-safe machine name for result files: the GPU if there is one, else the CPU and its cores."""
    info = info or machine_info()
    name = str(info["gpu"]) if info.get("gpu") else f"{info['cpu']}-{info['cores']}cores"
    for noise in ("(R)", "(TM)", "CPU", "Processor", "NVIDIA"):
        name = name.replace(noise, " ")
    return "-".join("".join(c if c.isalnum() else " " for c in name).lower().split())


def device_name(device: torch.device, threads: int | None = None) -> str:
    """Human-readable hardware name for reports and cache keys (CPU names include the thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({threads if threads is not None else 'default'} threads)"


def _summarize(times_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": float(np.median(arr)), "p10_ms": float(np.percentile(arr, 10)),
            "p90_ms": float(np.percentile(arr, 90)), "mean_ms": float(arr.mean()),
            "std_ms": float(statistics.pstdev(times_ms)) if len(times_ms) > 1 else 0.0}


CLOCKS = ("wall", "thread")
"""Clocks for CPU timing: wall time, or the CPU time of the calling thread (single-threaded runs only)."""


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


def compile_backend() -> str:
    """The torch.compile backend of compiled timing: $FFSC_COMPILE_BACKEND, else inductor."""
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def _compile(model: nn.Module, cuda_graph: bool) -> nn.Module:
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
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hits": _recompile_limit_hits(),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def _recompile_limit_hits() -> int:
    """Frames Dynamo gave up on at its recompile limit in this process (they run eagerly)."""
    from torch._dynamo.utils import counters

    return sum(n for msg, n in counters["unimplemented"].items() if "recompile limit" in msg.lower())


@contextlib.contextmanager
def _refuse_eager_fallback() -> Iterator[None]:
    """Raise instead of letting a compiled model's frames fall back to eager at Dynamo's recompile limit."""
    import torch._dynamo

    before = _recompile_limit_hits()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise FFSCError("torch.compile hit Dynamo's recompile limit while timing, so frames would run eagerly "
                        "under a compiled label; time this model alone or without compile") from err
    if _recompile_limit_hits() > before:  # belt and braces: a hit that did not raise still ran eagerly
        raise FFSCError("torch.compile hit Dynamo's recompile limit while timing (frames ran eagerly); the "
                        "latency is not a compiled one")


def _torch_step(model: nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int, device: torch.device,
                precision: str, compile: bool, cuda_graph: bool) -> Callable[[], object]:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision 'fp16' on CPU is not supported by CPU autocast; use 'fp32' or 'bf16'")
    if cuda_graph and device.type != "cuda":
        raise ConfigError("cuda_graph=True needs device='cuda'")
    graphed_by_compile = compile and compile_backend() == "inductor"  # mode="reduce-overhead" captures the graphs
    if compile:
        model = _compile(model, cuda_graph)

    # Autocast's weight-cast cache must be off under CUDA graph capture (PyTorch's CUDA graphs notes).
    autocast = dict(dtype=_AUTOCAST.get(precision, torch.float32), enabled=precision in _AUTOCAST,
                    cache_enabled=False if cuda_graph else None)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, **autocast):
            return model(left, right, iters=iters, test_mode=True)

    if not cuda_graph or graphed_by_compile:
        return forward
    from compress.cuda_graph import capture

    return capture(lambda _left: forward(), left)  # the inputs stay fixed across timed runs


def compiled_warmup(warmup: int, backend: str, compile: bool, cuda_graph: bool) -> int:
    """The untimed calls a measurement makes: at least those that compile and record, whatever ``warmup`` says."""
    # The first compiled call compiles; compile's CUDA graphs (reduce-overhead) record on the following calls.
    # Timing them would report seconds of compilation as latency, so warmup=0 cannot mean "none" there.
    if backend != "torch" or not compile:
        return warmup
    return max(warmup, 3 if cuda_graph else 1)


def _onnx_file(model_or_path: nn.Module | Path, workdir: Path, height: int, width: int, iters: int,
               batch: int, device: torch.device) -> Path:
    from compress.export.onnx_export import to_onnx

    if isinstance(model_or_path, nn.Module):
        dest = workdir / "model.onnx"
        with use_precision(model_or_path, "fp32"):  # an fp32 graph: reduced precision is cast from it afterwards
            to_onnx(model_or_path, dest, height, width, iters, device=device, batch=batch, check_parity=False)
        return dest
    return Path(model_or_path)


def _ort_step(onnx_path: Path, workdir: Path, left: torch.Tensor, right: torch.Tensor, device: torch.device,
              precision: str, threads: int | None) -> Callable[[], object]:
    if precision == "bf16":
        raise ConfigError("the onnxruntime backend supports precision 'fp32' or 'fp16' (an fp16-cast graph)")
    if precision == "fp16":
        from compress.export.fp16 import cast_onnx_fp16

        onnx_path = cast_onnx_fp16(onnx_path, workdir / "model_fp16.onnx").path
    session = make_session(onnx_path, device, intra_op_threads=threads, require_device=True)
    if device.type == "cpu":
        feeds = {INPUT_NAMES[0]: left.cpu().numpy(), INPUT_NAMES[1]: right.cpu().numpy()}
        return lambda: session.run([OUTPUT_NAME], feeds)
    # On CUDA, bind device buffers so the timing excludes host<->device copies.
    binding = session.io_binding()
    index = device.index or 0
    bound = [tensor.contiguous() for tensor in (left, right)]
    for name, tensor in zip(INPUT_NAMES, bound, strict=True):
        binding.bind_input(name, "cuda", index, np.float32, list(tensor.shape), tensor.data_ptr())
    binding.bind_output(OUTPUT_NAME, "cuda", index)
    return _BoundOrtRun(session, binding, bound)


class _BoundOrtRun:
    """One ONNX Runtime run on bound CUDA buffers; holds the input tensors the binding points into."""

    def __init__(self, session, binding, inputs: list[torch.Tensor]) -> None:
        self.session, self.binding, self.inputs = session, binding, inputs

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)


def _trt_step(model_or_path: nn.Module | Path, workdir: Path, left: torch.Tensor, right: torch.Tensor,
              height: int, width: int, iters: int, batch: int, device: torch.device, precision: str,
              cuda_graph: bool):
    from compress.export.engine import build_engine
    from compress.export.trt_runner import TensorRTRunner

    path = model_or_path if not isinstance(model_or_path, nn.Module) else None
    if path is None or Path(path).suffix == ".onnx":
        onnx_path = _onnx_file(model_or_path, workdir, height, width, iters, batch, device)
        engine = workdir / "model.engine"
        # No engine cache (the workdir is temporary), but the timing cache of this TensorRT and GPU is shared by
        # every build, so trials and block variants skip the tactic timings earlier builds made.
        build_engine(onnx_path, engine, precision=precision, iters=iters, cache=False, device=device)
        path = engine
    runner = TensorRTRunner(path, device=device, cuda_graph=cuda_graph)
    if runner.info is not None and runner.info.precision != precision:
        raise ConfigError(f"engine {path} was built for precision '{runner.info.precision}' but '{precision}' "
                          "was asked; pass the engine's precision or rebuild it")
    buffers = runner.bind({name: tuple(t.shape) for name, t in zip(runner.input_names, (left, right),
                                                                     strict=True)})
    for name, tensor in zip(runner.input_names, (left, right), strict=True):
        buffers[name].copy_(tensor)
    torch.cuda.synchronize(device)
    return runner.execute, runner.stream


@contextlib.contextmanager
def no_tf32(active: bool = True):
    """TF32 off for cuDNN convolutions and CUDA matmuls within the block, as TensorRT's fp32 engines build it."""
    # PyTorch allows TF32 in cuDNN convolutions by default: an "fp32" row would otherwise time 10-bit mantissas.
    if not active:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model itself when it lives on ``device``, else a copy moved there (the caller's model stays where
    it trains: a search distils on one device and may time on another, e.g. ONNX Runtime on the CPU)."""
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    if first is None or same_device(first.device, device):  # cuda:1 is not cuda:0: compare the index too
        return model
    import copy

    return copy.deepcopy(model).to(device)


def _check_onnx_iters(path: Path, iters: int) -> None:
    from compress.export.onnx_export import read_metadata

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
    if backend not in BACKENDS:
        raise ConfigError(f"unknown latency backend '{backend}'; valid backends: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if repeats < 1 or warmup < 0 or iters < 1 or batch < 1:
        raise ConfigError(f"need repeats >= 1, warmup >= 0, iters >= 1, batch >= 1; got {repeats}, {warmup}, "
                          f"{iters}, {batch}")
    check_image_size(height, width)
    is_module = isinstance(model_or_path, nn.Module)
    if backend == "torch" and not is_module:
        raise ConfigError(f"the torch backend times an nn.Module, got {model_or_path!r}; use 'onnxruntime' or "
                          "'tensorrt' for files")
    if not is_module and not Path(model_or_path).is_file():
        raise ConfigError(f"model file {model_or_path} does not exist")
    if backend == "tensorrt":
        import_tensorrt()
        require_cuda("the tensorrt latency backend")
    if device is None:
        device = "cuda" if backend == "tensorrt" or torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend == "tensorrt" and device.type != "cuda":
        raise ConfigError(f"the tensorrt backend runs on CUDA, got device '{device}'")
    if is_module:
        model_or_path = on_device(model_or_path, device)
    elif Path(model_or_path).suffix == ".onnx":
        _check_onnx_iters(Path(model_or_path), iters)

    threads = torch.get_num_threads() if backend == "torch" else intra_op_threads
    shapes = {name: [batch, 3, height, width] for name in INPUT_NAMES}
    check_clock(clock, device, threads)
    options = {"compile": compile, "cuda_graph": cuda_graph}
    if backend == "torch" and compile:
        # Static shapes from a fresh Dynamo cache; also keeps out entries cached before, some of them eager frames.
        options["compile_dynamic"] = False
        if compile_backend() != "inductor":
            options["compile_backend"] = compile_backend()
    if backend == "torch" and device.type == "cuda":
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

    left, right = random_stereo_pair(batch, height, width, seed=0, device=device)
    stream = None
    was_training = is_module and model_or_path.training
    if is_module:
        model_or_path.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="ffsc-latency-") as tmp, contextlib.ExitStack() as stack:
            workdir = Path(tmp)
            if backend == "torch":
                # The model runs at the precision the row is labelled with, whatever its own mixed_precision says.
                stack.enter_context(use_precision(model_or_path, precision))
                stack.enter_context(no_tf32(precision == "fp32"))
                if compile:
                    stack.enter_context(_refuse_eager_fallback())
                step = _torch_step(model_or_path, left, right, iters, device, precision, compile, cuda_graph)
            elif backend == "onnxruntime":
                onnx_path = _onnx_file(model_or_path, workdir, height, width, iters, batch, device)
                step = _ort_step(onnx_path, workdir, left, right, device, precision, intra_op_threads)
            else:
                step, stream = _trt_step(model_or_path, workdir, left, right, height, width, iters, batch,
                                         device, precision, cuda_graph)
            times = _time(step, device, compiled_warmup(warmup, backend, compile, cuda_graph), repeats,
                          events=backend != "onnxruntime", stream=stream, clock=clock)
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
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if backend == "tensorrt" or torch.cuda.is_available() else "cpu")
    runs: dict[str, list[LatencyStats]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory(prefix="ffsc-latency-together-") as tmp:
        targets = {name: _deployable(on_device(model, dev) if isinstance(model, nn.Module) else model, backend,
                                     Path(tmp) / f"m{i}", height, width, per_model[name], dev, precision)
                   for i, (name, model) in enumerate(models.items())}
        from compress.terminal import progress_bar

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
                iters: int, device: torch.device, precision: str) -> nn.Module | Path:
    """What measure() should time each round: the module (torch), or a file exported / built once."""
    if backend == "torch" or (not isinstance(model, nn.Module) and Path(model).suffix != ".onnx"):
        return model
    workdir.mkdir(parents=True)
    onnx_path = _onnx_file(model, workdir, height, width, iters, 1, device)
    if backend == "onnxruntime":
        return onnx_path
    from compress.export.engine import build_engine

    engine = workdir / "model.engine"
    build_engine(onnx_path, engine, precision=precision, iters=iters, cache=False, device=device)
    return engine


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
