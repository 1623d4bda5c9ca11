"""Build TensorRT engines from ONNX, with a JSON sidecar and a build cache keyed on everything that matters.

TensorRT 10 builds weakly typed networks: precision comes from BuilderFlag.FP16 / BF16. TensorRT 11
builds strongly typed networks only (the precision flags are gone), so fp16 there means an fp16
graph: build_engine casts the ONNX with cast_onnx_fp16 first, keeping fp32 islands.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from compress.errors import ConfigError, ExportError
from compress.export._files import atomic_write_bytes, atomic_write_text, sha256_file, staging_dir
from compress.export._trt import gpu_identity, import_tensorrt, require_cuda, trt_major
from compress.export.fp16 import DEFAULT_KEEP_FP32_OPS, cast_onnx_fp16, fp32_island_names
from compress.export.onnx_export import ffsc_version, read_metadata, recorded_fp32_nodes
from compress.export.runtime import INPUT_NAMES

PRECISIONS = ("fp32", "fp16", "bf16")
ShapeProfile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shape of one input for a TensorRT optimization profile."""


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
) -> EngineInfo:
    """Build (or reuse from cache) a TensorRT engine for an ONNX model; writes engine + JSON sidecar.

    strongly_typed=None means: strongly typed on TensorRT >= 11 (the only mode there), weakly typed
    with precision flags on TensorRT 10. iters defaults to the value to_onnx stored in the ONNX.
    keep_fp32_nodes=None keeps the float32 islands to_onnx recorded (the correlation normalisation).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {PRECISIONS}")
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist; export it first (to_onnx / `ffsc export`)")
    trt = import_tensorrt()
    require_cuda("building a TensorRT engine")
    typed = trt_major(trt) >= 11 if strongly_typed is None else strongly_typed
    if typed and precision == "bf16":
        raise ConfigError("bf16 with a strongly typed network needs a bf16 graph, which ffsc does not write; "
                          "use precision='fp16' or 'fp32' (or strongly_typed=False on TensorRT 10)")
    if trt_major(trt) >= 11 and not typed:
        raise ConfigError("TensorRT >= 11 builds strongly typed networks only; leave strongly_typed unset")
    shapes = shapes if shapes is not None else _static_shapes(onnx_path)
    if iters is None and "iters" in (meta := read_metadata(onnx_path)):
        iters = int(meta["iters"])
    if keep_fp32_nodes is None:
        keep_fp32_nodes = recorded_fp32_nodes(onnx_path)
    gpu_name, capability = gpu_identity()
    keep = {"ops": list(keep_fp32_ops), "nodes": list(keep_fp32_nodes)} if precision != "fp32" else {}
    onnx_sha = sha256_file(onnx_path)
    key = engine_cache_key(onnx_sha, trt.__version__, gpu_name, precision, shapes, iters,
                           extra={"strongly_typed": typed, "keep_fp32": keep})
    if cache and (hit := find_cached_engine(engine_path, key)) is not None:
        return hit

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 keeps STRONGLY_TYPED only for compatibility (always on); 0 is the weakly typed default of 10.
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(typed_flag) if typed and typed_flag is not None else 0)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not typed and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif not typed and precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    with staging_dir(engine_path) as stage:
        source = onnx_path
        if typed and precision == "fp16":
            source = cast_onnx_fp16(onnx_path, stage / onnx_path.name, keep_fp32_ops, keep_fp32_nodes).path
        _parse(trt, network, logger, source)
        if not typed and precision != "fp32":
            islands = fp32_island_names(onnx_path, keep_fp32_ops, keep_fp32_nodes)
            keep["pinned_layers"] = _pin_fp32_layers(trt, network, config, islands)
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
    # Drop the old sidecar first: an interrupted write then leaves a cache miss, never a wrong hit.
    sidecar_path(engine_path).unlink(missing_ok=True)
    atomic_write_bytes(engine_path, memoryview(serialized))
    info = EngineInfo(
        engine_path=engine_path, onnx_sha256=onnx_sha, tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
        compute_capability=capability, precision=precision, shapes=_canonical_shapes(shapes), iters=iters,
        build_seconds=time.perf_counter() - start, ffsc_version=ffsc_version(), cache_key=key,
        strongly_typed=typed, keep_fp32=keep,
    )
    write_sidecar(info)
    return info
