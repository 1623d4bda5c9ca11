"""The latency backends (PyTorch, ONNX Runtime, TensorRT) as objects: the one place that knows how each is
checked, where it runs by default and how it turns a model into one timed inference step.

Every other module looks a backend up with :func:`get_backend` and asks it (``available()``, ``default_device()``,
``prepare()``, ``describe()`` and the capability flags) instead of comparing names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.compiled import compile_backend, compile_for_timing, no_tf32, refuse_eager_fallback
from compress.cuda_graph import capture
from compress.device import pick_device
from compress.errors import ConfigError, MissingDependencyError
from compress.export._trt import import_tensorrt, require_cuda, trt_major
from compress.export.engine import build_engine
from compress.export.fp16 import cast_onnx_fp16
from compress.export.runtime import import_onnxruntime, make_session
from compress.export.trt_runner import TensorRTRunner
from compress.machine import installed_version
from teacher.stages import use_precision

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""Autocast dtype of each reduced precision (fp32 runs without autocast)."""


@dataclass
class Step:
    """One timed inference: call it; ``stream`` is the CUDA stream its work runs on (None: the current one)."""

    run: Callable[[], object]
    stream: torch.cuda.Stream | None = None

    def __call__(self) -> object:
        return self.run()


def tensorrt_problem() -> str | None:
    """None when TensorRT imports, else the reason it does not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"TensorRT does not import ({err})"
    except Exception as err:  # a broken install raises other types (missing libnvinfer, wrong CUDA)
        return f"TensorRT fails to import ({type(err).__name__}: {err})"
    return None


def onnxruntime_conflict() -> str | None:
    """A line when both onnxruntime and onnxruntime-gpu are installed (one overwrites the other's module)."""
    installed = [f"{dist} {version}" for dist in ("onnxruntime", "onnxruntime-gpu")
                 if (version := installed_version(dist)) is not None]
    return f"both {' and '.join(installed)} are installed" if len(installed) == 2 else None


def check_tensorrt_precision(precision: str, key: str = "precision") -> None:
    """Refuse bf16 where the installed TensorRT is 11 or later (strongly typed only; ffsc writes no bf16 graph)."""
    if precision != "bf16" or tensorrt_problem() is not None:
        return

    trt = import_tensorrt()
    if trt_major(trt) >= 11:
        raise ConfigError(f"{key}='bf16' with TensorRT {trt.__version__}: TensorRT 11 and later build strongly typed "
                          "networks only and ffsc writes no bf16 graph; use 'fp16' or 'fp32'")


class Backend:
    """A latency backend: how it is checked, where it runs and how a model becomes a timed step."""

    name: str = ""
    label: str = ""
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
    takes_files: bool = True
    """Times .onnx / engine files; False: only nn.Modules."""
    exports_onnx: bool = True
    """An nn.Module is exported to ONNX before it is timed."""
    gpu_events: bool = True
    """GPU work is asynchronous and timed by CUDA events (ONNX Runtime's run() returns only when it is done)."""
    compiles: bool = False
    cuda_graphs: bool = False
    cuda_only: bool = False
    own_threads: bool = False
    """Runs with torch's thread setting, not ONNX Runtime's intra-op threads."""
    builds_engine: bool = False
    """Times an engine built for one precision (TensorRT's own precision flags apply)."""

    def available(self) -> str | None:
        """None when this backend can run here, else a one-line reason why not."""
        return None

    def describe(self) -> str:
        """The label used in headers and rows."""
        return self.name

    def default_device(self, requested: str | torch.device | None = None) -> str:
        """The device to run on: ``requested``, else this process's GPU where this backend can use it, else cpu."""
        if requested is not None and str(requested):
            return str(requested)
        return "cuda" if self._uses_gpu() else "cpu"

    def _uses_gpu(self) -> bool:
        # The project's one device policy: this process's GPU when there is one (its index is resolved at timing).
        return pick_device(None).type == "cuda"

    def threads(self, intra_op_threads: int | None) -> int | None:
        """The thread count a measurement runs with (part of its cache key on CPU)."""
        return torch.get_num_threads() if self.own_threads else intra_op_threads

    def check_precision(self, precision: str, key: str) -> None:
        """Raise ConfigError unless this backend times ``precision``."""
        if precision not in self.precisions:
            raise ConfigError(f"{key}={precision!r}: the {self.name} backend times "
                              f"{' or '.join(self.precisions)} graphs")

    def check_here(self, device: torch.device, precision: str, key: str) -> None:
        """Raise unless this backend can run on ``device`` here (imports, providers, precision); for preflight."""

    def require(self, device: torch.device) -> None:
        """Raise unless this backend can time on ``device`` now (before any work)."""

    @contextlib.contextmanager
    def timing_context(self, model: nn.Module | None, precision: str, compile: bool) -> Iterator[None]:
        """What must hold while this backend's step is built and timed."""
        yield

    def prepare(self, model_or_path: nn.Module | Path, inputs: Mapping[str, torch.Tensor], workdir: Path,
                device: torch.device, precision: str = "fp32", *, forward_kwargs: Mapping | None = None,
                threads: int | None = None, compile: bool = False, cuda_graph: bool = False,
                iters: int | None = None, keep_fp32_nodes: tuple[str, ...] | None = None) -> Step:
        """One timed inference of ``model_or_path`` on ``inputs`` (named as the graph names them)."""
        raise NotImplementedError

    def deployable(self, onnx_path: Path, workdir: Path, precision: str, iters: int,
                   device: torch.device) -> Path:
        """The file this backend times for an exported ONNX graph (built once, timed in many rounds)."""
        return onnx_path


class TorchBackend(Backend):
    """PyTorch eager (or torch.compile'd), optionally replayed from CUDA graphs."""

    name, label = "torch", "PyTorch"
    takes_files = exports_onnx = False
    compiles = cuda_graphs = own_threads = True

    @contextlib.contextmanager
    def timing_context(self, model: nn.Module | None, precision: str, compile: bool) -> Iterator[None]:
        """The model at the precision the row is labelled with, TF32 off for fp32, no eager compile fallback."""
        with contextlib.ExitStack() as stack:
            # The model runs at the precision the row is labelled with, whatever its own mixed_precision says.
            if model is not None:
                stack.enter_context(use_precision(model, precision))
            stack.enter_context(no_tf32(precision == "fp32"))
            if compile:
                stack.enter_context(refuse_eager_fallback())
            yield

    def check_here(self, device: torch.device, precision: str, key: str) -> None:
        """CPU autocast has no fp16."""
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError(f"{key}='torch' with precision 'fp16' on CPU: CPU autocast has no fp16; "
                              "use 'fp32' or 'bf16'")

    def prepare(self, model_or_path: nn.Module | Path, inputs: Mapping[str, torch.Tensor], workdir: Path,
                device: torch.device, precision: str = "fp32", *, forward_kwargs: Mapping | None = None,
                threads: int | None = None, compile: bool = False, cuda_graph: bool = False,
                iters: int | None = None, keep_fp32_nodes: tuple[str, ...] | None = None) -> Step:
        """model(*inputs, **forward_kwargs) under inference mode and autocast (compiled / graphed as asked)."""
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("precision 'fp16' on CPU is not supported by CPU autocast; use 'fp32' or 'bf16'")
        if cuda_graph and device.type != "cuda":
            raise ConfigError("cuda_graph=True needs device='cuda'")
        model = model_or_path
        graphed_by_compile = compile and compile_backend() == "inductor"  # mode="reduce-overhead" captures graphs
        if compile:
            model = compile_for_timing(model, cuda_graph)
        # Autocast's weight-cast cache must be off under CUDA graph capture (PyTorch's CUDA graphs notes).
        autocast = dict(dtype=AUTOCAST_DTYPES.get(precision, torch.float32), enabled=precision in AUTOCAST_DTYPES,
                        cache_enabled=False if cuda_graph else None)
        args, kwargs = tuple(inputs.values()), dict(forward_kwargs or {})

        def forward() -> object:
            with torch.inference_mode(), torch.autocast(device.type, **autocast):
                return model(*args, **kwargs)

        if not cuda_graph or graphed_by_compile:
            return Step(forward)

        return Step(capture(lambda _first: forward(), args[0]))  # the inputs stay fixed across timed runs


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on its CPU or CUDA execution provider, fp32 or an fp16-cast graph."""

    name, label = "onnxruntime", "ONNX Runtime"
    precisions = ("fp32", "fp16")
    gpu_events = False

    def _uses_gpu(self) -> bool:
        if pick_device(None).type != "cuda":
            return False

        return "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()

    def check_here(self, device: torch.device, precision: str, key: str) -> None:
        """The execution provider for ``device`` is installed."""
        ort = import_onnxruntime()
        wanted = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            both = onnxruntime_conflict()
            fix = (f"{both}: uninstall both and install onnxruntime-gpu alone" if both else
                   "for CUDA install the GPU build in its place: pip uninstall -y onnxruntime, then pip install -e "
                   "\".[gpu]\" (the two share one module, so with both the CUDA provider disappears)")
            raise MissingDependencyError(
                f"{key}='onnxruntime' on {str(device)!r}: ONNX Runtime has no {wanted} here (it has "
                f"{ort.get_available_providers()}); {fix}")

    def prepare(self, model_or_path: nn.Module | Path, inputs: Mapping[str, torch.Tensor], workdir: Path,
                device: torch.device, precision: str = "fp32", *, forward_kwargs: Mapping | None = None,
                threads: int | None = None, compile: bool = False, cuda_graph: bool = False,
                iters: int | None = None, keep_fp32_nodes: tuple[str, ...] | None = None) -> Step:
        """A session run on the graph's inputs (bound CUDA buffers on a GPU, so no host copies are timed)."""
        path = Path(model_or_path)
        if precision == "bf16":
            raise ConfigError("the onnxruntime backend supports precision 'fp32' or 'fp16' (an fp16-cast graph)")
        if precision == "fp16":
            keep = {} if keep_fp32_nodes is None else {"keep_fp32_nodes": keep_fp32_nodes}
            path = cast_onnx_fp16(path, workdir / f"{path.stem}_fp16.onnx", **keep).path
        session = make_session(path, device, intra_op_threads=threads, require_device=True)
        present = {i.name for i in session.get_inputs()}  # onnxslim drops inputs a graph does not read
        feeds = {name: tensor for name, tensor in inputs.items() if name in present}
        if device.type == "cpu":
            arrays = {name: tensor.cpu().numpy() for name, tensor in feeds.items()}
            return Step(lambda: session.run(None, arrays))
        binding = session.io_binding()
        index = device.index or 0
        bound = [tensor.contiguous() for tensor in feeds.values()]
        for name, tensor in zip(feeds, bound, strict=True):
            binding.bind_input(name, "cuda", index, np.float32, list(tensor.shape), tensor.data_ptr())
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda", index)
        return Step(_BoundOrtRun(session, binding, bound))


class _BoundOrtRun:
    """One ONNX Runtime run on bound CUDA buffers; holds the input tensors the binding points into."""

    def __init__(self, session: object, binding: object, inputs: list[torch.Tensor]) -> None:
        self.session, self.binding, self.inputs = session, binding, inputs

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)


class TensorRTBackend(Backend):
    """A TensorRT engine (built from the ONNX graph), optionally replayed from a CUDA graph."""

    name, label = "tensorrt", "TensorRT"
    cuda_graphs = cuda_only = builds_engine = True

    def available(self) -> str | None:
        """TensorRT's import problem, if any."""
        return tensorrt_problem()

    def _uses_gpu(self) -> bool:
        return True

    def require(self, device: torch.device) -> None:
        """TensorRT imports and a CUDA GPU is there."""
        import_tensorrt()
        require_cuda("the tensorrt latency backend")

    def check_here(self, device: torch.device, precision: str, key: str) -> None:
        """TensorRT imports, CUDA is present, and the precision builds."""
        problem = self.available()
        if problem:
            raise MissingDependencyError(f"{key}='tensorrt': {problem}; install it with "
                                         "`pip install -e \".[tensorrt]\"` on a CUDA machine, or use backend 'auto'")
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"{key}='tensorrt' needs a CUDA GPU, and PyTorch sees none here")
        prefix = key.removesuffix(".backend")
        check_tensorrt_precision(precision, f"{prefix}.precision" if prefix != key else "precision")

    def deployable(self, onnx_path: Path, workdir: Path, precision: str, iters: int,
                   device: torch.device) -> Path:
        """An engine built from the graph."""
        engine = workdir / "model.engine"
        build_engine(onnx_path, engine, precision=precision, iters=iters, cache=False, device=device)
        return engine

    def prepare(self, model_or_path: nn.Module | Path, inputs: Mapping[str, torch.Tensor], workdir: Path,
                device: torch.device, precision: str = "fp32", *, forward_kwargs: Mapping | None = None,
                threads: int | None = None, compile: bool = False, cuda_graph: bool = False,
                iters: int | None = None, keep_fp32_nodes: tuple[str, ...] | None = None) -> Step:
        """An engine's execution on its stream, inputs copied into its buffers once."""
        path = Path(model_or_path)
        if path.suffix == ".onnx":
            engine = workdir / f"{path.stem}.engine"
            extra = {k: v for k, v in (("iters", iters), ("keep_fp32_nodes", keep_fp32_nodes)) if v is not None}
            # No engine cache (the workdir is temporary), but the timing cache of this TensorRT and GPU is shared
            # by every build, so trials and block variants skip the tactic timings earlier builds made.
            build_engine(path, engine, precision=precision, cache=False, device=device, **extra)
            path = engine
        runner = TensorRTRunner(path, device=device, cuda_graph=cuda_graph)
        if runner.info is not None and runner.info.precision != precision:
            raise ConfigError(f"engine {path} was built for precision '{runner.info.precision}' but '{precision}' "
                              "was asked; pass the engine's precision or rebuild it")
        names = list(runner.input_names)
        # Named like the graph's inputs where they match; an engine from elsewhere takes them in order.
        feeds = ({n: inputs[n] for n in names} if set(names) <= set(inputs)
                 else dict(zip(names, inputs.values(), strict=False)))
        buffers = runner.bind({name: tuple(t.shape) for name, t in feeds.items()})
        for name, tensor in feeds.items():
            buffers[name].copy_(tensor)
        torch.cuda.synchronize(device)
        return Step(runner.execute, runner.stream)


_REGISTRY: dict[str, Backend] = {b.name: b for b in (TorchBackend(), OnnxRuntimeBackend(), TensorRTBackend())}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)
"""The names of the latency backends, in the order reports list them."""


def get_backend(name: str | Backend) -> Backend:
    """The backend called ``name`` (ConfigError naming the valid ones for anything else)."""
    if isinstance(name, Backend):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown latency backend '{name}'; valid backends: {', '.join(BACKENDS)}") from None


def all_backends() -> list[Backend]:
    """Every registered backend, in the order of BACKENDS."""
    return list(_REGISTRY.values())


def names_where(flag: str) -> list[str]:
    """The names of the backends whose capability ``flag`` (e.g. "cuda_graphs") is true."""
    return [b.name for b in _REGISTRY.values() if getattr(b, flag)]
