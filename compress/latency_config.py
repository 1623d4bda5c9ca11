"""Latency settings: the backend a run uses ('auto' resolved here) and the recipe's ``latency`` section.

LatencyConfig is the one YAML section users write (its keys stay where they are); the code that times reads its
TimingConfig and the per-block predictor its PredictorConfig, so neither depends on the other's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from compress.backends import BACKENDS, get_backend, names_where
from compress.compiled import compile_problem, triton_problem
from compress.errors import ConfigError, MissingDependencyError

PRECISIONS = ("fp32", "fp16", "bf16")
LATENCY_MODES = ("measured", "predicted")
MEASURE_WHEN = ("budget", "always", "never")
CLOCKS = ("wall", "thread")
"""Clocks for CPU timing: wall time, or the CPU time of the calling thread (single-threaded runs only)."""


@dataclass(frozen=True)
class TimingConfig:
    """How one model is timed: backend, device, precision, input size, iterations, repeats, threads and clock."""

    backend: str
    device: str | None
    precision: str
    height: int | None
    width: int | None
    iters: int | None
    warmup: int
    repeats: int
    threads: int | None
    clock: str
    compile: bool
    cuda_graph: bool

    def timing(self) -> dict[str, object]:
        """The keyword arguments of measure() and measure_together() these settings fix."""
        return {"warmup": self.warmup, "repeats": self.repeats, "precision": self.precision,
                "intra_op_threads": self.threads, "clock": self.clock, "compile": self.compile,
                "cuda_graph": self.cuda_graph}

    def run_device(self) -> str:
        """The device these settings time on: the named one, else the backend's default."""
        return get_backend(self.backend).default_device(self.device)


@dataclass(frozen=True)
class PredictorConfig:
    """Predicted mode: the per-block table and how the search checks it against measurement."""

    table: str | None
    check_students: int
    max_predictor_error: float


@dataclass(frozen=True)
class BackendChoice:
    """The latency backend a run uses, and why (logged, written to summary.json and MLflow)."""

    backend: str
    device: str
    reason: str
    compile: bool = False
    cuda_graph: bool = False


def resolve_backend(backend: str, device: str | None = None) -> BackendChoice:
    """Pick the backend for 'auto' (TensorRT, else PyTorch on CUDA with CUDA graphs, compiled where Triton works,
    else ONNX Runtime on CPU); other names pass through with their reason."""
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"latency backend {backend!r}: expected one of {['auto', *BACKENDS]}")
    cuda = torch.cuda.is_available()
    if backend != "auto":
        return BackendChoice(backend, get_backend(backend).default_device(device), "named in the config")
    if device is not None and torch.device(device).type == "cpu":
        return BackendChoice("onnxruntime", "cpu", "auto: the config names device 'cpu'")
    if not cuda:
        return BackendChoice("onnxruntime", "cpu", "auto: no CUDA GPU visible to PyTorch, so ONNX Runtime on CPU")
    trt_problem = get_backend("tensorrt").available()
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
    """None = the backend's default device (compress.backends: this process's GPU where the backend can use it,
    always for tensorrt, else cpu)."""
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
        named = None if self.backend == "auto" else get_backend(self.backend)
        if self.compile and named is not None and not named.compiles:
            raise ConfigError(f"latency.compile: only the {' and '.join(names_where('compiles'))} backend compiles, "
                              f"the backend is {self.backend!r}")
        if self.cuda_graph and named is not None and not named.cuda_graphs:
            raise ConfigError(f"latency.cuda_graph: CUDA graphs are for the {' and '.join(names_where('cuda_graphs'))}"
                              f" backends, the backend is {self.backend!r}")

    def timing(self) -> dict[str, object]:
        """The keyword arguments of measure() and measure_together() these settings fix."""
        return self.timing_config().timing()

    def timing_config(self) -> TimingConfig:
        """The settings that time a model (measure, the final table, the predictor's blocks)."""
        return TimingConfig(**{f.name: getattr(self, f.name) for f in fields(TimingConfig)})

    def predictor_config(self) -> PredictorConfig:
        """The settings of predicted mode (the per-block table and its check against measurement)."""
        return PredictorConfig(**{f.name: getattr(self, f.name) for f in fields(PredictorConfig)})

    def resolved(self) -> tuple[LatencyConfig, BackendChoice]:
        """These settings with 'auto' replaced by the backend this machine gets, and the choice with its reason."""
        choice = resolve_backend(self.backend, self.device)
        if self.backend != "auto":
            # Asked for by name, compile is kept, so refused here (before any work) where it cannot run: 'auto' would
            # have left it out. Otherwise the first measurement fails, after the labelling.
            if self.compile and (problem := compile_problem(choice.device)) is not None:
                raise MissingDependencyError(
                    f"latency.compile: true on {choice.device}, but torch.compile cannot make GPU kernels here: "
                    f"{problem}; set compile: false (CUDA graphs work without it) or backend: auto")
            return replace(self, device=choice.device), choice
        return replace(self, backend=choice.backend, device=choice.device, compile=choice.compile,
                       cuda_graph=choice.cuda_graph), choice
