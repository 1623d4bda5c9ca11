"""TensorRT engines: shape profiles, cache keys and sidecars on CPU; real builds where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import compress.latency as latency
from compress.errors import ConfigError, MissingDependencyError
from compress.export import (
    EngineInfo,
    build_engine,
    engine_cache_key,
    find_cached_engine,
    make_shape_profiles,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from compress.export.engine import (
    TIMING_CACHE_ENV,
    ShapeProfile,
    default_timing_cache_dir,
    timing_cache_path,
)
from compress.export.fp16 import fp32_island_names
from compress.export.onnx_export import to_onnx
from search_spaces import build_student, preset
from tests.compress.export.fake_tensorrt import (
    FakeCuda,
    FakeTensorRT,
    install_tensorrt,
    write_float_onnx,
    write_qdq_onnx,
)
from tests.stereo_toy import make_toy

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SHAPES = make_shape_profiles(64, 128)


def test_static_profile_is_min_opt_max_equal() -> None:
    profiles = make_shape_profiles(64, 128, batch=2)
    assert set(profiles) == {"left", "right"}
    assert profiles["left"] == ((2, 3, 64, 128),) * 3


def test_dynamic_profile_defaults_and_bounds() -> None:
    low, opt, high = make_shape_profiles(96, 160, dynamic=True)["right"]
    assert low == (1, 3, 32, 64) and opt == (1, 3, 96, 160) and high == (1, 3, 192, 320)
    low, opt, high = make_shape_profiles(64, 128, batch=2, dynamic=True, min_height=32, min_width=64,
                                         max_height=128, max_width=256, max_batch=4)["left"]
    assert low == (1, 3, 32, 64) and opt == (2, 3, 64, 128) and high == (4, 3, 128, 256)


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_height=32), "dynamic=True"),
    (dict(dynamic=True, min_height=96), "min <= opt <= max"),
    (dict(dynamic=True, max_width=200), "multiple of 32"),
])
def test_profile_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_shape_profiles(64, 128, **kwargs)


def _key(**overrides) -> str:
    args = dict(onnx_sha256="ab" * 32, tensorrt_version="10.8.0", gpu_name="NVIDIA H100", precision="fp16",
                shapes=SHAPES, iters=8)
    args.update(overrides)
    return engine_cache_key(**args)


def test_cache_key_is_stable_and_order_independent() -> None:
    assert _key() == _key()
    reordered: dict[str, ShapeProfile] = {"right": SHAPES["right"], "left": SHAPES["left"]}
    listed = {name: [list(s) for s in profile] for name, profile in SHAPES.items()}
    assert _key(shapes=reordered) == _key() == _key(shapes=listed)


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "cd" * 32), ("tensorrt_version", "11.0.0"), ("gpu_name", "NVIDIA H200"),
    ("precision", "fp32"), ("shapes", make_shape_profiles(64, 160)), ("iters", 4),
    ("extra", {"strongly_typed": True}),
])
def test_cache_key_changes_with_every_field(field: str, value: object) -> None:
    assert _key(**{field: value}) != _key()


def _info(engine: Path, key: str) -> EngineInfo:
    return EngineInfo(
        engine_path=engine, onnx_sha256="ab" * 32, tensorrt_version="10.8.0", gpu_name="NVIDIA H100",
        compute_capability="9.0", precision="fp16", shapes={k: [list(s) for s in v] for k, v in SHAPES.items()},
        iters=8, build_seconds=12.5, ffsc_version="0.1.0", cache_key=key,
    )


def test_sidecar_roundtrip(tmp_path: Path) -> None:
    engine = tmp_path / "toy.engine"
    info = _info(engine, _key())
    path = write_sidecar(info)
    assert path == sidecar_path(engine) == tmp_path / "toy.engine.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.engine.json"]
    data = json.loads(path.read_text())
    assert data["engine_path"] == "toy.engine" and data["compute_capability"] == "9.0"
    assert "cached" not in data
    assert read_sidecar(engine) == info


def test_cache_hit_needs_engine_and_matching_key(tmp_path: Path) -> None:
    engine = tmp_path / "toy.engine"
    key = _key()
    write_sidecar(_info(engine, key))
    assert find_cached_engine(engine, key) is None, "sidecar without engine is not a hit"
    engine.write_bytes(b"serialized engine")
    hit = find_cached_engine(engine, key)
    assert hit is not None and hit.cached and hit.build_seconds == 12.5
    assert dataclasses.replace(hit, cached=False) == _info(engine, key)
    assert find_cached_engine(engine, _key(iters=4)) is None
    sidecar_path(engine).write_text("{not json")
    assert read_sidecar(engine) is None and find_cached_engine(engine, key) is None


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_build_engine_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"placeholder")
    with pytest.raises(MissingDependencyError, match=r"pip install tensorrt.*ffsc\[tensorrt\]"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(ConfigError, match="precision"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int3")


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_runner_without_tensorrt(tmp_path: Path) -> None:
    from compress.export import TensorRTRunner

    with pytest.raises(MissingDependencyError, match="CUDA GPU"):
        TensorRTRunner(tmp_path / "m.engine")


# --- real TensorRT --------------------------------------------------------------------------------

needs_trt_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TensorRT")


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    from compress.export import to_onnx

    model = make_toy()
    path = tmp_path_factory.mktemp("trt") / "toy.onnx"
    to_onnx(model, path, 64, 128, iters=2, dynamic=True)
    return model, path


@pytest.mark.cuda
@needs_trt_gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-2), ("fp16", 0.25)])
def test_build_run_and_cache_engine(toy_onnx, tmp_path: Path, precision: str, atol: float) -> None:
    pytest.importorskip("tensorrt", reason="needs a CUDA GPU and TensorRT")
    from compress.export import TensorRTRunner, random_stereo_pair

    model, onnx_path = toy_onnx
    engine = tmp_path / f"toy_{precision}.engine"
    shapes = make_shape_profiles(64, 128, dynamic=True, max_batch=2)
    info = build_engine(onnx_path, engine, precision=precision, workspace_gb=1.0, shapes=shapes,
                        keep_fp32_nodes=("*/corr_norm*/*",))
    assert engine.is_file() and not info.cached and info.iters == 2
    assert read_sidecar(engine).cache_key == info.cache_key
    again = build_engine(onnx_path, engine, precision=precision, workspace_gb=1.0, shapes=shapes,
                         keep_fp32_nodes=("*/corr_norm*/*",))
    assert again.cached and again.cache_key == info.cache_key

    runner = TensorRTRunner(engine)
    for batch, h, w in [(1, 64, 128), (2, 32, 64)]:
        left, right = random_stereo_pair(batch, h, w, seed=batch)
        with torch.no_grad():
            expected = model(left, right, iters=2, test_mode=True).numpy()
        got = runner.run(left.numpy(), right.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=atol)

    graphed = TensorRTRunner(engine, cuda_graph=True)
    left, right = random_stereo_pair(1, 64, 128, seed=9)
    first = graphed.infer(left.cuda(), right.cuda())
    second = graphed.infer(left.cuda(), right.cuda())
    torch.testing.assert_close(first, second)
    np.testing.assert_allclose(first.cpu().numpy(), runner.run(left, right), atol=1e-4)


# --- the real build path against a recording fake TensorRT (10.x and 11.x) -------------------------------------

TRT10, TRT11 = "10.8.0", "11.0.0"


@pytest.fixture
def timing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The timing cache folder, set through the environment variable users set."""
    folder = tmp_path / "timing"
    monkeypatch.setenv(TIMING_CACHE_ENV, str(folder))
    return folder


def _rig(monkeypatch: pytest.MonkeyPatch, version: str = TRT10, **cuda) -> tuple[FakeTensorRT, FakeCuda]:
    trt = install_tensorrt(monkeypatch, version)
    return trt, FakeCuda(**cuda).install(monkeypatch, trt)


@pytest.mark.parametrize("version, precision, flags, typed", [
    (TRT10, "fp32", set(), False),              # TF32 cleared: fp32 means fp32
    (TRT10, "fp16", {"TF32", "FP16"}, False),
    (TRT10, "bf16", {"TF32", "BF16"}, False),
    (TRT11, "fp32", set(), True),
    (TRT11, "fp16", {"TF32"}, True),            # 11 has no precision flags: the fp16 graph carries the precision
])
def test_builder_flags_per_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timing_dir: Path, version: str,
                                   precision: str, flags: set[str], typed: bool) -> None:
    trt, _ = _rig(monkeypatch, version)
    onnx_path = write_float_onnx(tmp_path / "m.onnx")
    info = build_engine(onnx_path, tmp_path / "m.engine", precision=precision)
    (config,), (network,) = trt.configs, trt.networks
    assert {flag.name for flag in config.flags} == flags
    assert network.strongly_typed is typed and info.strongly_typed is typed
    assert info.tf32 is (precision != "fp32") and read_sidecar(tmp_path / "m.engine").tf32 is info.tf32
    assert (("clear_flag", ("TF32",)) in [(n, a) for n, a, _ in trt.calls]) is (precision == "fp32")
    # Strongly typed fp16 parses the fp16-cast graph (Casts at its boundary); everything else the ONNX as is.
    assert ("Cast" in network.op_types) is (typed and precision == "fp16")


def test_bf16_on_tensorrt_11_is_refused_by_build_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         timing_dir: Path) -> None:
    trt, _ = _rig(monkeypatch, TRT11)
    with pytest.raises(ConfigError, match="bf16 with a strongly typed network"):
        build_engine(write_float_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="bf16")
    assert "Builder" not in trt.names()


def test_one_optimisation_profile_covers_every_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     timing_dir: Path) -> None:
    trt, _ = _rig(monkeypatch)
    shapes = make_shape_profiles(64, 128, dynamic=True, max_batch=2)
    build_engine(write_float_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="fp16", shapes=shapes)
    (config,) = trt.configs
    assert len(config.profiles) == 1 and trt.names().count("add_optimization_profile") == 1
    assert config.profiles[0].shapes == {name: [list(s) for s in shapes[name]] for name in ("left", "right")}


def test_timing_cache_is_loaded_and_saved_per_tensorrt_and_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               timing_dir: Path) -> None:
    trt, _ = _rig(monkeypatch, TRT10)
    first = build_engine(write_float_onnx(tmp_path / "a.onnx"), tmp_path / "a.engine", device="cuda:1")
    path = timing_dir / "timing-trt10.8.0-Fake-GPU-H100-sm9.0.cache"
    assert first.timing_cache == str(path) and path.is_file()
    saved = path.read_bytes()
    assert trt.timing_caches[0].loaded == b"" and b"a.onnx" in saved  # cold start, then this build's timings
    names = trt.names()
    assert names.index("create_timing_cache") < names.index("set_timing_cache") < \
        names.index("build_serialized_network") < names.index("serialize_timing_cache")
    assert ("set_timing_cache", (False,)) in [(n, a) for n, a, _ in trt.calls]

    # A block variant (another ONNX, another precision) on the same TensorRT and GPU starts from those timings.
    second = build_engine(write_float_onnx(tmp_path / "b.onnx", 64, 96), tmp_path / "b.engine", precision="fp32",
                          device=1)
    assert trt.timing_caches[1].loaded == saved and second.timing_cache == str(path)
    assert b"a.onnx" in path.read_bytes() and b"b.onnx" in path.read_bytes()

    # Another GPU, and another TensorRT, each get a cache of their own, cold.
    build_engine(tmp_path / "a.onnx", tmp_path / "a0.engine", device=0)
    assert trt.timing_caches[2].loaded == b""
    trt11, _ = _rig(monkeypatch, TRT11)
    build_engine(tmp_path / "a.onnx", tmp_path / "a11.engine", device=1)
    assert trt11.timing_caches[0].loaded == b""
    assert sorted(p.name for p in timing_dir.iterdir()) == [
        "timing-trt10.8.0-Fake-GPU-A100-sm8.0.cache", "timing-trt10.8.0-Fake-GPU-H100-sm9.0.cache",
        "timing-trt11.0.0-Fake-GPU-H100-sm9.0.cache"]


def test_a_foreign_timing_cache_is_replaced_not_mixed_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         timing_dir: Path, capsys: pytest.CaptureFixture) -> None:
    trt, _ = _rig(monkeypatch)
    path = timing_cache_path(TRT10, "Fake GPU A100", "8.0")
    path.parent.mkdir(parents=True)
    foreign = b"a timing cache of another CUDA or driver"
    path.write_bytes(foreign)
    build_engine(write_float_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")
    assert [c.loaded for c in trt.timing_caches] == [foreign, b""]
    assert trt.configs[0].timing_cache is trt.timing_caches[1]
    assert path.read_bytes().startswith(b"FAKE-TRT-TIMING-CACHE 10.8.0")
    assert "does not match this TensorRT/GPU" in capsys.readouterr().out


def test_timing_cache_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timing_dir: Path) -> None:
    trt, _ = _rig(monkeypatch)
    info = build_engine(write_float_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", timing_cache=False)
    assert info.timing_cache is None and "create_timing_cache" not in trt.names() and not timing_dir.exists()


def test_default_timing_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TIMING_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_timing_cache_dir() == tmp_path / "ffsc" / "tensorrt"
    monkeypatch.setenv(TIMING_CACHE_ENV, str(tmp_path / "mine"))
    assert timing_cache_path("10.8.0", "NVIDIA H100 80GB HBM3", "9.0") == \
        tmp_path / "mine" / "timing-trt10.8.0-NVIDIA-H100-80GB-HBM3-sm9.0.cache"


def test_build_runs_on_the_device_asked_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            timing_dir: Path) -> None:
    trt, cuda = _rig(monkeypatch)
    assert cuda.current_device() == 0
    info = build_engine(write_float_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", device="cuda:1")
    assert (info.gpu_name, info.compute_capability) == ("Fake GPU H100", "9.0")
    devices = {name: device for name, _, device in trt.calls}
    assert devices["Builder"] == devices["parse_from_file"] == devices["build_serialized_network"] == 1
    assert ("empty_cache", 1) in cuda.calls and ("mem_get_info", 1) in cuda.calls
    assert cuda.current_device() == 0
    build_engine(tmp_path / "m.onnx", tmp_path / "m0.engine")  # default: the current device
    assert trt.calls[-1][2] == 0 and read_sidecar(tmp_path / "m0.engine").gpu_name == "Fake GPU A100"


def test_workspace_is_capped_at_free_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timing_dir: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    trt, cuda = _rig(monkeypatch, free_bytes=1 << 30, initialized=False)
    info = build_engine(write_float_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", workspace_gb=4.0)
    assert ("set_memory_pool_limit", ("WORKSPACE", 1 << 30)) in [(n, a) for n, a, _ in trt.calls]
    assert info.workspace_bytes == 1 << 30
    assert "workspace capped at 1.00 GiB, the free memory of cuda:0 (4 GiB asked)" in capsys.readouterr().out
    assert not any(name == "empty_cache" for name, _ in cuda.calls), "CUDA was not initialised: nothing to free"
    cuda.initialized = True
    build_engine(tmp_path / "m.onnx", tmp_path / "m2.engine", workspace_gb=0.5)
    assert ("empty_cache", 0) in cuda.calls and trt.configs[-1].pools[trt.MemoryPoolType.WORKSPACE] == 1 << 29
    assert "capped" not in capsys.readouterr().out


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_qdq_graph_builds_strongly_typed_as_int8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timing_dir: Path,
                                                 version: str) -> None:
    trt, _ = _rig(monkeypatch, version)
    qdq = write_qdq_onnx(tmp_path / "m_int8.onnx")
    info = build_engine(qdq, tmp_path / "m_int8.engine", precision="int8")
    (config,), (network,) = trt.configs, trt.networks
    assert network.strongly_typed and info.strongly_typed and info.precision == "int8"
    assert {flag.name for flag in config.flags} == set(), "no FP16/INT8 flag, and TF32 cleared"
    assert not info.tf32 and info.keep_fp32 == {}
    # The graph TensorRT parsed is the Q/DQ file itself: no cast pass, so DequantizeLinear still feeds Conv.
    assert network.source == "m_int8.onnx" and "Cast" not in network.op_types
    assert network.op_types[network.op_types.index("Conv") - 1] == "DequantizeLinear"


def test_weakly_typed_int8_on_tensorrt_10_sets_int8_and_fp16(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            timing_dir: Path) -> None:
    trt, _ = _rig(monkeypatch, TRT10)
    info = build_engine(write_qdq_onnx(tmp_path / "q.onnx"), tmp_path / "q.engine", precision="int8",
                        strongly_typed=False)
    assert {flag.name for flag in trt.configs[0].flags} == {"INT8", "FP16", "TF32"}
    assert not trt.networks[0].strongly_typed and not info.strongly_typed


def test_int8_needs_a_qdq_graph_and_a_qdq_graph_needs_int8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          timing_dir: Path) -> None:
    trt, _ = _rig(monkeypatch, TRT10)
    with pytest.raises(ConfigError, match=r"no Q/DQ nodes; run `ffsc quantize .* --target tensorrt"):
        build_engine(write_float_onnx(tmp_path / "f.onnx"), tmp_path / "f.engine", precision="int8")
    with pytest.raises(ConfigError, match=r"INT8 graph \(3 QuantizeLinear/DequantizeLinear nodes\).*'int8'"):
        build_engine(write_qdq_onnx(tmp_path / "q.onnx"), tmp_path / "q.engine", precision="fp16")
    assert "Builder" not in trt.names()


@pytest.mark.parametrize("version, precision, refused", [
    (TRT11, "bf16", True), (TRT10, "bf16", False), (TRT11, "fp16", False), (TRT11, "fp32", False),
])
def test_preflight_refuses_bf16_on_tensorrt_11(monkeypatch: pytest.MonkeyPatch, version: str, precision: str,
                                               refused: bool) -> None:
    from compress import preflight

    install_tensorrt(monkeypatch, version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if not refused:
        preflight.check_backend("tensorrt", "cuda", precision, key="search.latency.backend")
        preflight.check_tensorrt_precision(precision, "export.precision")
        return
    with pytest.raises(ConfigError, match=r"^search\.latency\.precision='bf16' with TensorRT 11\.0\.0: .*use 'fp16' "
                                          r"or 'fp32'$"):
        preflight.check_backend("tensorrt", "cuda", precision, key="search.latency.backend")
    with pytest.raises(ConfigError, match=r"^export\.precision='bf16' with TensorRT 11\.0\.0"):
        preflight.check_tensorrt_precision(precision, "export.precision")


def test_weakly_typed_fp16_pins_the_disparity_islands_to_float32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 timing_dir: Path) -> None:
    # A real student's export: to_onnx records its float32 islands (the disparity accumulator, the convex
    # upsampling, the correlation); TensorRT 10 builds fp16 weakly typed, so each island layer is pinned.
    torch.manual_seed(0)
    onnx_path = tmp_path / "student.onnx"
    to_onnx(build_student(preset("tiny")).eval(), onnx_path, 64, 128, 1, check_parity=False)
    trt, _ = _rig(monkeypatch, TRT10)
    info = build_engine(onnx_path, tmp_path / "student.engine", precision="fp16")
    (config,), (network,) = trt.configs, trt.networks
    assert not network.strongly_typed and {"FP16", "PREFER_PRECISION_CONSTRAINTS"} <= {f.name for f in config.flags}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    pinned = {layer.name for layer in layers if layer.precision == trt.float32}
    for scope in ("/model/disparity_update/", "/model/convex_combination/"):
        island = {layer.name for layer in layers if layer.name.startswith(scope)}
        assert island and island <= pinned, scope
    assert pinned == set(fp32_island_names(onnx_path)) and len(pinned) < len(layers)  # the rest is left to FP16
    typed_outputs = {args[0] for name, args, _ in trt.calls if name == "set_output_type"}
    assert typed_outputs == pinned and all(args[2] == trt.float32 for name, args, _ in trt.calls
                                           if name == "set_output_type")
    assert info.keep_fp32["pinned_layers"] == len(pinned)


def test_side_by_side_timing_says_it_builds_an_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      timing_dir: Path) -> None:
    _rig(monkeypatch, TRT10)
    said: list[str] = []
    engine = latency._deployable(write_float_onnx(tmp_path / "m.onnx"), "tensorrt", tmp_path / "work", 64, 128, 1,
                                 torch.device("cuda"), "fp16", name="teacher", say=said.append)
    assert engine.suffix == ".engine" and engine.is_file()
    assert said == ["building a TensorRT engine for teacher (fp16) ..."]  # an .onnx file is not exported again
