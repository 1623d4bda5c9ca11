"""Build TensorRT engines from ONNX, with a JSON sidecar, a build cache keyed on everything that matters,
and a TensorRT timing cache shared by every build on the same TensorRT and GPU.

TensorRT 10 builds weakly typed networks: precision comes from BuilderFlag.FP16 / BF16. TensorRT 11
builds strongly typed networks only (the precision flags are gone), so fp16 there means an fp16
graph: build_engine casts the ONNX with cast_onnx_fp16 first, keeping fp32 islands. An INT8 graph
(explicit Q/DQ nodes, from `ffsc quantize --target tensorrt`) builds with precision 'int8': strongly
typed wherever TensorRT has strong typing (10 and later), as TensorRT's explicit-quantization docs
ask, from the graph as it is (no fp16 cast pass: Casts between DequantizeLinear and Conv would stop
TensorRT fusing them into INT8 kernels). fp32 means IEEE float32: TensorRT allows TF32 by default, so
build_engine clears BuilderFlag.TF32 wherever the engine's float layers are meant to be float32 (precision
'fp32', and the float layers of a strongly typed 'int8' build), and the sidecar records it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from compress.errors import ConfigError, ExportError
from compress.export._files import atomic_write_bytes, atomic_write_text, sha256_file, staging_dir
from compress.export._trt import cuda_index, gpu_identity, import_tensorrt, require_cuda, trt_major
from compress.export.fp16 import DEFAULT_KEEP_FP32_OPS, cast_onnx_fp16, fp32_island_names
from compress.export.onnx_export import ffsc_version, read_metadata, recorded_fp32_nodes
from compress.export.runtime import INPUT_NAMES

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
"""'int8' is for graphs with Q/DQ nodes (`ffsc quantize --target tensorrt`); the others for float graphs."""
TIMING_CACHE_ENV = "FFSC_TRT_TIMING_CACHE_DIR"
"""Environment variable naming the folder of TensorRT timing caches (default ~/.cache/ffsc/tensorrt)."""
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
ShapeProfile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shape of one input for a TensorRT optimization profile."""
_GIB = 1 << 30


def _round32(value: int) -> int:
    return max(32, value // 32 * 32)


def make_shape_profiles(
    height: int,
    width: int,
    batch: int = 1,
    dynamic: bool = False,
    min_height: int | None = None,
    min_width: int | None = None,
    max_height: int | None = None,
    max_width: int | None = None,
    max_batch: int | None = None,
    input_names: tuple[str, ...] = INPUT_NAMES,
) -> dict[str, ShapeProfile]:
    """(min, opt, max) shapes per stereo input; opt is batch x 3 x height x width.

    Static: min = opt = max. Dynamic: defaults are half the size (rounded down to a multiple of 32)
    and batch 1 for min, twice the size and `batch` for max; every bound can be given.
    """
    opt = (batch, 3, height, width)
    if dynamic:
        low = (1, 3, min_height or _round32(height // 2), min_width or _round32(width // 2))
        high = (max_batch or batch, 3, max_height or 2 * height, max_width or 2 * width)
    else:
        extra = [n for n, v in (("min_height", min_height), ("min_width", min_width), ("max_height", max_height),
                                ("max_width", max_width), ("max_batch", max_batch)) if v is not None]
        if extra:
            raise ConfigError(f"{', '.join(extra)} given for a static profile; pass dynamic=True to use them")
        low = high = opt
    profile = (low, opt, high)
    _check_profile("input", profile)
    return {name: profile for name in input_names}


def _check_profile(name: str, profile: ShapeProfile) -> None:
    if len(profile) != 3 or len({len(s) for s in profile}) != 1:
        raise ConfigError(f"shape profile of '{name}' is {profile}; expected (min, opt, max) shapes of equal rank")
    low, opt, high = profile
    if any(d <= 0 for s in profile for d in s):
        raise ConfigError(f"shape profile of '{name}' has a non-positive dimension: {profile}")
    if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise ConfigError(f"shape profile of '{name}' needs min <= opt <= max per dimension, got {profile}")
    if len(opt) == 4 and any(s[2] % 32 or s[3] % 32 for s in profile):
        raise ConfigError(f"shape profile of '{name}' has a height or width that is not a multiple of 32: "
                          f"{profile}")


def _canonical_shapes(shapes: dict[str, ShapeProfile]) -> dict[str, list[list[int]]]:
    out = {}
    for name in sorted(shapes):
        profile = tuple(tuple(int(d) for d in s) for s in shapes[name])
        _check_profile(name, profile)
        out[name] = [list(s) for s in profile]
    return out


def engine_cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    precision: str,
    shapes: dict[str, ShapeProfile],
    iters: int | None,
    extra: dict | None = None,
) -> str:
    """Hex key over everything that makes an engine: ONNX bytes, TensorRT, GPU, precision, shapes, iters."""
    payload = {
        "onnx_sha256": onnx_sha256, "tensorrt": str(tensorrt_version), "gpu": gpu_name, "precision": precision,
        "shapes": _canonical_shapes(shapes), "iters": iters, "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class EngineInfo:
    """What an engine was built from and for; written as `<engine>.json` beside it."""

    engine_path: Path
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    shapes: dict[str, list[list[int]]]
    iters: int | None
    build_seconds: float
    ffsc_version: str
    cache_key: str
    strongly_typed: bool = False
    keep_fp32: dict = field(default_factory=dict)
    tf32: bool = True
    """Whether TensorRT could run float32 layers in TF32 (sidecars written before this field: it was on)."""
    workspace_bytes: int | None = None
    timing_cache: str | None = None
    """The TensorRT timing cache file the build loaded and updated (None: built without one)."""
    cached: bool = False
    """True when build_engine found this engine in the cache instead of building it (not stored)."""

    def to_dict(self) -> dict:
        """JSON-ready sidecar content (engine file name only, so the pair can be moved together)."""
        data = asdict(self)
        data["engine_path"] = self.engine_path.name
        data.pop("cached")
        return data

    @classmethod
    def from_dict(cls, data: dict, engine_path: Path) -> EngineInfo:
        """Rebuild from sidecar content; engine_path is where the engine actually is."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "engine_path"}
        return cls(engine_path=Path(engine_path), **fields)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """`<engine>.json`, the sidecar beside an engine file."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(info: EngineInfo) -> Path:
    """Write info beside its engine atomically; returns the sidecar path."""
    path = sidecar_path(info.engine_path)
    atomic_write_text(path, json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine_path: str | os.PathLike) -> EngineInfo | None:
    """The sidecar of an engine, or None when it is missing or unreadable (then the engine is rebuilt)."""
    path = sidecar_path(engine_path)
    try:
        return EngineInfo.from_dict(json.loads(path.read_text()), Path(engine_path))
    except (OSError, ValueError, TypeError):
        return None


def find_cached_engine(engine_path: str | os.PathLike, cache_key: str) -> EngineInfo | None:
    """The existing engine's info when the engine file exists and its sidecar has cache_key."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        return None
    info = read_sidecar(engine_path)
    if info is None or info.cache_key != cache_key:
        return None
    info.cached = True
    return info


def _static_shapes(onnx_path: Path) -> dict[str, ShapeProfile]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes: dict[str, ShapeProfile] = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if any(d is None for d in dims):
            raise ConfigError(f"input '{vi.name}' of {onnx_path} has dynamic dims {dims}; pass "
                              "shapes=make_shape_profiles(height, width, dynamic=True, ...)")
        shapes[vi.name] = (tuple(dims), tuple(dims), tuple(dims))
    return shapes


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors)
                          + "\nrun lint_onnx on the model to see which nodes TensorRT cannot handle")


def _pin_fp32_layers(trt, network, config, node_names: list[str]) -> int:
    """Weakly typed builds only: ask TensorRT to run the layers of fp32-island nodes in float32.

    The ONNX parser names each layer after its ONNX node (helper layers get a suffix), so a layer
    belongs to a node when its name is the node name or starts with it. Returns how many were pinned.
    """
    if not node_names:
        return 0
    floats = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float32)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not any(layer.name == n or layer.name.startswith(n + "_") for n in node_names):
            continue
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not float_outputs:  # shape arithmetic inside the island has no precision to pin
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    if pinned:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return pinned


def count_qdq_nodes(onnx_path: str | os.PathLike) -> int:
    """How many QuantizeLinear / DequantizeLinear nodes the ONNX graph has (0: a float graph)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(node.op_type in QDQ_OPS for node in model.graph.node)


def default_timing_cache_dir() -> Path:
    """$FFSC_TRT_TIMING_CACHE_DIR, else $XDG_CACHE_HOME/ffsc/tensorrt (~/.cache/ffsc/tensorrt)."""
    if folder := os.environ.get(TIMING_CACHE_ENV):
        return Path(folder).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ffsc" / "tensorrt"


def timing_cache_path(tensorrt_version: str, gpu_name: str, capability: str,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """The timing cache file of one TensorRT version on one GPU model (name and compute capability)."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    folder = Path(cache_dir) if cache_dir is not None else default_timing_cache_dir()
    return folder / f"timing-trt{tensorrt_version}-{gpu}-sm{capability}.cache"


def _attach_timing_cache(config, path: Path):
    """Load path's timing cache (an empty one when there is none) into config; returns the ITimingCache."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):  # an unreadable file is a cold cache, not a failed build
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    # Its header names another TensorRT, CUDA or GPU: start afresh instead of mixing timings of another device.
    print(f"[ffsc tensorrt] timing cache {path} does not match this TensorRT/GPU; starting a new one", flush=True)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _workspace_bytes(index: int, workspace_gb: float) -> int:
    """workspace_gb in bytes, capped at the free memory of CUDA device index (after PyTorch's cache is freed)."""
    wanted = int(workspace_gb * _GIB)
    # Blocks PyTorch's caching allocator keeps are not free to TensorRT's builder: hand them back first.
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(index)
    if wanted <= free:
        return wanted
    print(f"[ffsc tensorrt] builder workspace capped at {free / _GIB:.2f} GiB, the free memory of cuda:{index} "
          f"({workspace_gb:g} GiB asked)", flush=True)
    return int(free)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str = "fp16",
    workspace_gb: float = 4.0,
    shapes: dict[str, ShapeProfile] | None = None,
    iters: int | None = None,
    cache: bool = True,
    strongly_typed: bool | None = None,
    keep_fp32_ops: tuple[str, ...] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: tuple[str, ...] | None = None,
    verbose: bool = False,
    device: int | str | torch.device | None = None,
    timing_cache: bool = True,
    timing_cache_dir: str | os.PathLike | None = None,
) -> EngineInfo:
    """Build (or reuse from cache) a TensorRT engine for an ONNX model on a CUDA device; writes engine + sidecar.

    precision: fp32 | fp16 | bf16 for float graphs, int8 for Q/DQ graphs (`ffsc quantize --target tensorrt`).
    strongly_typed=None means: strongly typed on TensorRT >= 11 (the only mode there), and for int8 wherever
    TensorRT has strong typing; weakly typed with precision flags on TensorRT 10 otherwise.
    iters defaults to the value to_onnx stored in the ONNX.
    keep_fp32_nodes=None keeps the float32 islands to_onnx recorded (the correlation normalisation).
    device: the CUDA device to build for (default: the current one); the build runs with it current.
    timing_cache: load and update the timing cache of this TensorRT and GPU in timing_cache_dir
    (default_timing_cache_dir()), so later builds skip the tactic timings already made.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {PRECISIONS}")
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist; export it first (to_onnx / `ffsc export`)")
    trt = import_tensorrt()
    require_cuda("building a TensorRT engine")
    qdq = count_qdq_nodes(onnx_path)
    if precision == "int8" and not qdq:
        raise ConfigError(f"precision 'int8' builds a quantized graph, and {onnx_path} has no Q/DQ nodes; run "
                          f"`ffsc quantize {onnx_path} --target tensorrt --calib DATA --out OUT.onnx` first and "
                          "build from OUT.onnx")
    if qdq and precision != "int8":
        raise ConfigError(f"{onnx_path} is an INT8 graph ({qdq} QuantizeLinear/DequantizeLinear nodes); build it "
                          f"with precision='int8', not '{precision}'")
    # TensorRT 11 keeps STRONGLY_TYPED for compatibility (always on); TensorRT 8 has no strong typing.
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is None:
        typed = typed_flag is not None if precision == "int8" else trt_major(trt) >= 11
    else:
        typed = strongly_typed
    if typed and typed_flag is None:
        raise ConfigError(f"TensorRT {trt.__version__} has no strongly typed networks; pass strongly_typed=False")
    if typed and precision == "bf16":
        raise ConfigError("bf16 with a strongly typed network needs a bf16 graph, which ffsc does not write; "
                          "use precision='fp16' or 'fp32' (or strongly_typed=False on TensorRT 10)")
    if trt_major(trt) >= 11 and not typed:
        raise ConfigError("TensorRT >= 11 builds strongly typed networks only; leave strongly_typed unset")
    index = cuda_index(device)
    shapes = shapes if shapes is not None else _static_shapes(onnx_path)
    if iters is None and "iters" in (meta := read_metadata(onnx_path)):
        iters = int(meta["iters"])
    if keep_fp32_nodes is None:
        keep_fp32_nodes = recorded_fp32_nodes(onnx_path)
    gpu_name, capability = gpu_identity(index)
    # Float layers in reduced precision: fp16/bf16, and a weakly typed int8 build (its FP16 flag covers the rest).
    reduced = precision in ("fp16", "bf16") or (precision == "int8" and not typed)
    keep = {"ops": list(keep_fp32_ops), "nodes": list(keep_fp32_nodes)} if reduced else {}
    tf32 = not (precision == "fp32" or (precision == "int8" and typed))
    onnx_sha = sha256_file(onnx_path)
    key = engine_cache_key(onnx_sha, trt.__version__, gpu_name, precision, shapes, iters,
                           extra={"strongly_typed": typed, "keep_fp32": keep, "tf32": tf32})
    if cache and (hit := find_cached_engine(engine_path, key)) is not None:
        return hit
    cache_file = (timing_cache_path(str(trt.__version__), gpu_name, capability, timing_cache_dir)
                  if timing_cache else None)

    start = time.perf_counter()
    # TensorRT builds for the current CUDA device: make it the one asked for, for the whole build.
    with torch.cuda.device(index), staging_dir(engine_path) as stage:
        workspace = _workspace_bytes(index, workspace_gb)
        logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(typed_flag) if typed else 0)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        if not typed and precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # weakly typed, Q/DQ layers need it; FP16 below for the rest
        if not typed and precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        elif not typed and precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        if not tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        timings = _attach_timing_cache(config, cache_file) if cache_file is not None else None
        source = onnx_path
        if typed and precision == "fp16":
            source = cast_onnx_fp16(onnx_path, stage / onnx_path.name, keep_fp32_ops, keep_fp32_nodes).path
        _parse(trt, network, logger, source)
        if not typed and reduced:
            islands = fp32_island_names(onnx_path, keep_fp32_ops, keep_fp32_nodes)
            keep["pinned_layers"] = _pin_fp32_layers(trt, network, config, islands)
        # One optimisation profile covers every network input.
        profile = builder.create_optimization_profile()
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        missing = sorted(set(names) - set(shapes))
        if missing:
            raise ConfigError(f"no shape profile for network inputs {missing}; shapes has {sorted(shapes)}")
        for name in names:
            low, opt, high = shapes[name]
            profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above); "
                          "try a larger workspace_gb or precision='fp32'")
    if timings is not None:  # the next build (trial, block variant) reuses this one's tactic timings
        atomic_write_bytes(cache_file, memoryview(timings.serialize()))
    # Drop the old sidecar first: an interrupted write then leaves a cache miss, never a wrong hit.
    sidecar_path(engine_path).unlink(missing_ok=True)
    atomic_write_bytes(engine_path, memoryview(serialized))
    info = EngineInfo(
        engine_path=engine_path, onnx_sha256=onnx_sha, tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
        compute_capability=capability, precision=precision, shapes=_canonical_shapes(shapes), iters=iters,
        build_seconds=time.perf_counter() - start, ffsc_version=ffsc_version(), cache_key=key,
        strongly_typed=typed, keep_fp32=keep, tf32=tf32, workspace_bytes=workspace,
        timing_cache=str(cache_file) if cache_file is not None else None,
    )
    write_sidecar(info)
    return info
