"""A recording fake of the `tensorrt` Python module (10.x and 11.x) and of the torch.cuda calls the TensorRT paths
make, so that build_engine, TensorRTRunner and preflight run their real code on a CPU-only machine.

The fake follows the documented TensorRT Python API: Builder / INetworkDefinition / IBuilderConfig /
IOptimizationProfile / OnnxParser / Runtime / ICudaEngine / IExecutionContext / ITimingCache. Per version:

- 10.x: BuilderFlag has FP16, BF16, INT8, TF32, PREFER/OBEY_PRECISION_CONSTRAINTS, ...; networks are weakly
  typed unless created with NetworkDefinitionCreationFlag.STRONGLY_TYPED.
- 11.x: the precision flags (FP16, BF16, INT8, FP8, INT4, FP4) and the precision-constraint flags are gone
  (touching them raises AttributeError, as on the real module); every network is strongly typed.

Every call that matters is appended to ``fake.calls`` as ``(name, args, device)``, where device is the CUDA
device current at the call (from :class:`FakeCuda`, None without it). Builds write a fake engine (JSON) that
the fake Runtime deserializes, and each build adds an entry to the attached timing cache.
"""

from __future__ import annotations

import enum
import json
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

_FLAGS_10 = {
    "FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
    "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
    "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12, "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15,
    "ERROR_ON_TIMING_CACHE_MISS": 16, "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19,
    "REFIT_IDENTICAL": 20, "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23, "STRICT_NANS": 24,
    "MONITOR_MEMORY": 25, "FP4": 26, "EDITABLE_TIMING_CACHE": 27,
}
REMOVED_IN_11 = ("FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS")
"""BuilderFlag members TensorRT 11 removed (its 10.x-to-11.x migration guide)."""
_FLAGS_11 = {
    "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
    "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
    "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19,
    "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23, "MONITOR_MEMORY": 24,
    "EDITABLE_TIMING_CACHE": 26,
}
DEFAULT_FLAGS = ("TF32",)
"""Flags a new IBuilderConfig has set (TensorRT enables TF32 by default)."""
_CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE"
_ENGINE_MAGIC = b"FAKE-TRT-ENGINE"


class FakeTensorRT(types.ModuleType):
    """The fake module; one instance per test, installed as sys.modules['tensorrt']."""

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.calls: list[tuple[str, tuple, int | None]] = []
        self.current_device: Callable[[], int | None] = lambda: None
        self.timing_caches: list[FakeTimingCache] = []
        self.configs: list[FakeBuilderConfig] = []
        self.networks: list[FakeNetwork] = []
        self.contexts: list[FakeContext] = []
        fake = self

        flags = _FLAGS_10 if self.major < 11 else _FLAGS_11
        self.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
        creation = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if self.major < 11 else {"STRONGLY_TYPED": 1}
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
        self.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
        self.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4,
                                                  "UINT8": 5, "BF16": 7, "INT64": 8})
        self.float32, self.float16, self.bfloat16 = self.DataType.FLOAT, self.DataType.HALF, self.DataType.BF16
        self.int8 = self.DataType.INT8
        self.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

        class Logger:
            VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = 4, 3, 2, 1, 0

            def __init__(self, min_severity: int = 2) -> None:
                self.min_severity = min_severity

        class Builder:
            def __init__(self, logger: Logger) -> None:
                fake.record("Builder")

            def create_network(self, flags: int = 0) -> FakeNetwork:
                fake.record("create_network", flags)
                network = FakeNetwork(fake, flags)
                fake.networks.append(network)
                return network

            def create_builder_config(self) -> FakeBuilderConfig:
                config = FakeBuilderConfig(fake)
                fake.configs.append(config)
                return config

            def create_optimization_profile(self) -> FakeProfile:
                return FakeProfile(fake)

            def build_serialized_network(self, network: FakeNetwork, config: FakeBuilderConfig) -> bytes:
                fake.record("build_serialized_network")
                if config.timing_cache is not None:  # the tactic timings this build made
                    config.timing_cache.entries.append(f"{network.source}:{sorted(f.name for f in config.flags)}")
                engine = {"inputs": {name: list(shape) for name, shape in network.inputs},
                          "outputs": {name: list(shape) for name, shape in network.outputs},
                          "profiles": [p.shapes for p in config.profiles]}
                return _ENGINE_MAGIC + json.dumps(engine).encode()

        class OnnxParser:
            def __init__(self, network: FakeNetwork, logger: Logger) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                fake.record("parse_from_file", path)
                self.network.load(Path(path))
                return True

            def get_error(self, index: int) -> str:
                return ""

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                fake.record("Runtime")

            def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
                fake.record("deserialize_cuda_engine")
                if not bytes(data).startswith(_ENGINE_MAGIC):
                    return None
                return FakeEngine(fake, json.loads(bytes(data)[len(_ENGINE_MAGIC):]))

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.ITimingCache = FakeTimingCache

    def record(self, name: str, *args: object) -> None:
        """Append one call with the CUDA device current at the time."""
        self.calls.append((name, args, self.current_device()))

    def names(self) -> list[str]:
        """The recorded call names, in order."""
        return [name for name, _, _ in self.calls]


class FakeTimingCache:
    """ITimingCache: serialize() holds a header (TensorRT version) and one line per timed build."""

    def __init__(self, fake: FakeTensorRT, data: bytes) -> None:
        self.fake, self.loaded = fake, bytes(data)
        self.header = f"{fake.__version__}".encode()
        self.entries: list[str] = []
        self.foreign = False
        if data:
            head, _, body = bytes(data).partition(b"\n")
            if head != _CACHE_MAGIC + b" " + self.header:
                self.foreign = True  # made by another TensorRT: set_timing_cache refuses it
            else:
                self.entries = [line for line in body.decode().split("\n") if line]

    def serialize(self) -> bytes:
        self.fake.record("serialize_timing_cache")
        return _CACHE_MAGIC + b" " + self.header + b"\n" + "\n".join(self.entries).encode()

    def combine(self, other: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.entries += [e for e in other.entries if e not in self.entries]
        return True

    def reset(self) -> bool:
        self.entries = []
        return True


class FakeBuilderConfig:
    """IBuilderConfig: flags (TF32 on by default), memory pools, profiles and the timing cache."""

    def __init__(self, fake: FakeTensorRT) -> None:
        self.fake = fake
        self.flags = {fake.BuilderFlag[name] for name in DEFAULT_FLAGS}
        self.pools: dict[int, int] = {}
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None

    def set_flag(self, flag) -> None:
        self.fake.record("set_flag", flag.name)
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.fake.record("clear_flag", flag.name)
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.fake.record("set_memory_pool_limit", pool.name, size)
        self.pools[pool] = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.fake.record("add_optimization_profile")
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        self.fake.record("create_timing_cache", bytes(data))
        cache = FakeTimingCache(self.fake, data)
        self.fake.timing_caches.append(cache)
        return cache

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.fake.record("set_timing_cache", ignore_mismatch)
        if cache.foreign and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeProfile:
    """IOptimizationProfile: (min, opt, max) per input name."""

    def __init__(self, fake: FakeTensorRT) -> None:
        self.fake = fake
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, low, opt, high) -> None:
        self.fake.record("set_shape", name, tuple(low), tuple(opt), tuple(high))
        self.shapes[name] = [list(low), list(opt), list(high)]


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeLayer:
    """ILayer as the ONNX parser makes one per node: name, outputs, precision."""

    def __init__(self, fake: FakeTensorRT, node: onnx.NodeProto) -> None:
        self.fake, self.name, self.type = fake, node.name, node.op_type
        self._outputs = [_Tensor(o, (), fake.float32) for o in node.output]
        self.num_outputs = len(self._outputs)
        self.precision = None

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]

    def set_output_type(self, index: int, dtype) -> None:
        self.fake.record("set_output_type", self.name, index, dtype)


class FakeNetwork:
    """INetworkDefinition filled by the fake OnnxParser from the parsed ONNX file."""

    def __init__(self, fake: FakeTensorRT, flags: int) -> None:
        self.fake, self.flags = fake, flags
        self.source: str | None = None
        self.op_types: list[str] = []
        self.inputs: list[tuple[str, tuple[int, ...]]] = []
        self.outputs: list[tuple[str, tuple[int, ...]]] = []
        self._layers: list[FakeLayer] = []

    @property
    def strongly_typed(self) -> bool:
        """As the real TensorRT: always on 11; on 10 only when created with STRONGLY_TYPED."""
        typed = self.fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED
        return self.fake.major >= 11 or bool(self.flags & (1 << int(typed)))

    def load(self, path: Path) -> None:
        model = onnx.load(str(path), load_external_data=False)
        self.source = path.name
        self.op_types = [n.op_type for n in model.graph.node]
        self._layers = [FakeLayer(self.fake, n) for n in model.graph.node]

        def shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)

        self.inputs = [(vi.name, shape(vi)) for vi in model.graph.input]
        self.outputs = [(vi.name, shape(vi)) for vi in model.graph.output]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        name, shape = self.inputs[index]
        return _Tensor(name, shape, self.fake.float32)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_layer(self, index: int) -> FakeLayer:
        return self._layers[index]


class FakeEngine:
    """ICudaEngine of a fake build: inputs from the ONNX, outputs B x 1 x H x W of the first input."""

    def __init__(self, fake: FakeTensorRT, spec: dict) -> None:
        self.fake, self.spec = fake, spec
        self._names = list(spec["inputs"]) + list(spec["outputs"])
        self.num_io_tensors = len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str):
        return self.fake.TensorIOMode.INPUT if name in self.spec["inputs"] else self.fake.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return self.fake.float32

    def get_tensor_profile_shape(self, name: str, profile: int):
        return self.spec["profiles"][profile][name]

    def create_execution_context(self) -> FakeContext:
        self.fake.record("create_execution_context")
        context = FakeContext(self.fake, self)
        self.fake.contexts.append(context)
        return context


class FakeContext:
    """IExecutionContext: records shapes, addresses and enqueues; refuses shapes outside the profile."""

    def __init__(self, fake: FakeTensorRT, engine: FakeEngine) -> None:
        self.fake, self.engine = fake, engine
        self.shapes: dict[str, tuple[int, ...]] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.fake.record("set_input_shape", name, tuple(shape))
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if not all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch, _, height, width = next(iter(self.shapes.values()))  # output shapes follow the inputs
        return (batch, 1, height, width)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.fake.record("set_tensor_address", name)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.fake.record("execute_async_v3", stream_handle)
        return True


def install_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str = "10.8.0") -> FakeTensorRT:
    """A fake tensorrt of this version, installed as sys.modules['tensorrt'] for one test."""
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


# --- torch.cuda on a CPU-only machine ------------------------------------------------------------------------


class FakeCuda:
    """The torch.cuda calls of the TensorRT paths, on CPU: a device stack for `torch.cuda.device`, per-device
    names, capabilities and free memory, streams with a handle; every call recorded in ``calls``."""

    GPUS = {0: ("Fake GPU A100", (8, 0)), 1: ("Fake GPU H100", (9, 0))}

    def __init__(self, free_bytes: int = 64 << 30, initialized: bool = True) -> None:
        self.stack: list[int] = [0]
        self.free_bytes = free_bytes
        self.initialized = initialized
        self.calls: list[tuple[str, object]] = []

    def current_device(self) -> int:
        return self.stack[-1]

    def index(self, device) -> int:
        """The index a device spec names (None or a bare 'cuda': the current device)."""
        if isinstance(device, int):
            return device
        index = None if device is None else torch.device(device).index
        return self.current_device() if index is None else index

    @contextmanager
    def device(self, device) -> Iterator[None]:
        self.stack.append(self.index(device))
        try:
            yield
        finally:
            self.stack.pop()

    def install(self, monkeypatch: pytest.MonkeyPatch, fake_trt: FakeTensorRT | None = None) -> FakeCuda:
        """Patch torch.cuda's functions the TensorRT paths call; the fake TensorRT records the current device."""
        cuda = self

        class Stream:
            def __init__(self, device=None) -> None:
                self.device, self.cuda_stream = device, 7000 + cuda.current_device()

            def synchronize(self) -> None:
                cuda.calls.append(("stream.synchronize", cuda.current_device()))

            def wait_stream(self, other) -> None:
                pass

        def empty_cache() -> None:
            cuda.calls.append(("empty_cache", cuda.current_device()))

        def mem_get_info(device=None) -> tuple[int, int]:
            cuda.calls.append(("mem_get_info", device))
            return cuda.free_bytes, 80 << 30

        for name, value in {
            "is_available": lambda: True, "is_initialized": lambda: cuda.initialized,
            "current_device": self.current_device, "device": self.device, "Stream": Stream,
            "get_device_name": lambda device=None: cuda.GPUS[cuda.index(device)][0],
            "get_device_capability": lambda device=None: cuda.GPUS[cuda.index(device)][1],
            "empty_cache": empty_cache, "mem_get_info": mem_get_info,
            "synchronize": lambda device=None: cuda.calls.append(("synchronize", device)),
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        if fake_trt is not None:
            fake_trt.current_device = self.current_device
        return self


def cpu_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's device buffers, allocated on the CPU (the one seam of TensorRTRunner that needs memory)."""
    import compress.export.trt_runner as trt_runner

    monkeypatch.setattr(trt_runner, "_device_buffer", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype))


# --- small ONNX graphs --------------------------------------------------------------------------------------


def write_float_onnx(path: Path, height: int = 64, width: int = 128) -> Path:
    """left, right (1 x 3 x H x W) -> Sub -> Conv -> disp (1 x 1 x H x W): a float graph."""
    weight = numpy_helper.from_array(np.full((1, 3, 1, 1), 0.5, np.float32), "w")
    nodes = [helper.make_node("Sub", ["left", "right"], ["diff"], name="diff"),
             helper.make_node("Conv", ["diff", "w"], ["disp"], name="conv")]
    return _save(path, nodes, [weight], height, width)


def write_qdq_onnx(path: Path, height: int = 64, width: int = 128) -> Path:
    """The same graph quantized as `ffsc quantize --target tensorrt` writes it: symmetric INT8 Q/DQ on the
    activation and the weight (zero points 0), DequantizeLinear feeding Conv directly."""
    inits = [
        numpy_helper.from_array(np.full((1, 3, 1, 1), 64, np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.5 / 64, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0.1, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
    ]
    nodes = [
        helper.make_node("Sub", ["left", "right"], ["diff"], name="diff"),
        helper.make_node("QuantizeLinear", ["diff", "a_scale", "zero"], ["diff_q"], name="diff_q"),
        helper.make_node("DequantizeLinear", ["diff_q", "a_scale", "zero"], ["diff_dq"], name="diff_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zero"], ["w_dq"], name="w_dq"),
        helper.make_node("Conv", ["diff_dq", "w_dq"], ["disp"], name="conv"),
    ]
    return _save(path, nodes, inits, height, width)


def _save(path: Path, nodes: list, inits: list, height: int, width: int) -> Path:
    image = [1, 3, height, width]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info(n, TensorProto.FLOAT, image) for n in ("left", "right")],
        [helper.make_tensor_value_info("disp", TensorProto.FLOAT, [1, 1, height, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
