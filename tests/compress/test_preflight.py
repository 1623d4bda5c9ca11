"""Preflight checks: each bad case raises one error naming the key or path, and nothing is left behind."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import save_file

from compress import checks, preflight
from compress.distill.config import FeatureLossConfig
from compress.errors import CheckpointError, ConfigError, DataError, MissingDependencyError
from compress.latency import LatencyConfig, resolve_backend
from compress.training import OptimConfig
from tests.paths import REPO


@pytest.mark.parametrize("value", [0, -5, math.nan, math.inf, None, True, "3"])
def test_require_positive_names_key(value) -> None:
    with pytest.raises(ConfigError, match=r"search\.budget_ms=.*expected a number > 0"):
        checks.require_positive("search.budget_ms", value)


def test_require_positive_accepts() -> None:
    checks.require_positive("search.budget_ms", 12.5)
    checks.require_positive("prune.budget_ms", None, allow_none=True)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, None, False])
def test_require_non_negative_names_key(value) -> None:
    with pytest.raises(ConfigError, match=r"^loss\.feature\.weight=.*expected a number >= 0$"):
        checks.require_non_negative("loss.feature.weight", value)


def test_require_non_negative_accepts_zero_and_the_recipes_use_it() -> None:
    checks.require_non_negative("loss.feature.weight", 0)
    checks.require_non_negative("loss.feature.weight", None, allow_none=True)
    with pytest.raises(ConfigError, match=r"^loss\.feature\.weight=-1.0: expected a number >= 0$"):
        FeatureLossConfig(weight=-1.0)
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay=-0.5: expected a number >= 0$"):
        OptimConfig(weight_decay=-0.5)
    with pytest.raises(ConfigError, match=r"^optim\.lr=0.0: expected a number > 0$"):
        OptimConfig(lr=0.0)


@pytest.mark.parametrize("value", [0, -1, 1.5, None])
def test_require_at_least(value) -> None:
    with pytest.raises(ConfigError, match=r"teacher\.train\.steps=.*expected an integer >= 1 \(the stand-in"):
        checks.require_at_least("teacher.train.steps", value, 1, why="the stand-in teacher must train")


def test_resolve_backend_auto_on_cpu_machine() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU fallback is what is checked here")
    choice = resolve_backend("auto")
    assert (choice.backend, choice.device) == ("onnxruntime", "cpu")
    assert "no CUDA GPU" in choice.reason


def test_latency_config_auto_resolves_to_a_concrete_backend() -> None:
    lat, choice = LatencyConfig(backend="auto", threads=1).resolved()
    assert lat.backend == choice.backend != "auto" and lat.threads == 1
    if not torch.cuda.is_available():
        assert (lat.backend, lat.device, lat.compile, lat.cuda_graph) == ("onnxruntime", "cpu", False, False)
    same, named = LatencyConfig(backend="torch").resolved()
    assert same.backend == "torch" and named.reason == "named in the config"
    # Every resolved config names its device: ONNX Runtime defaults to the CPU even where a GPU is present.
    assert LatencyConfig(backend="onnxruntime").resolved()[0].device == "cpu"


def test_resolve_backend_auto_with_cpu_device() -> None:
    choice = resolve_backend("auto", device="cpu")
    assert choice.backend == "onnxruntime" and "device 'cpu'" in choice.reason


def test_resolve_backend_named_and_unknown() -> None:
    assert resolve_backend("torch", "cpu").reason == "named in the config"
    with pytest.raises(ConfigError, match="latency backend 'tensorflow'"):
        resolve_backend("tensorflow")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_check_backend_tensorrt_without_it() -> None:
    with pytest.raises(MissingDependencyError, match=r"search\.latency\.backend='tensorrt'"):
        preflight.check_backend("tensorrt", "cuda", key="search.latency.backend")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_check_backend_cuda_missing() -> None:
    with pytest.raises(MissingDependencyError, match="sees no CUDA GPU"):
        preflight.check_backend("torch", "cuda")


def test_check_backend_cuda_graph_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="CUDA graphs need device 'cuda'"):
        preflight.check_backend("torch", "cpu", cuda_graph=True)


def test_check_backend_fp16_cpu() -> None:
    with pytest.raises(ConfigError, match="CPU autocast has no fp16"):
        preflight.check_backend("torch", "cpu", precision="fp16")


def test_check_backend_ort_cpu_ok() -> None:
    preflight.check_backend("onnxruntime", "cpu")


def test_checkpoint_with_nan_named(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    weights = {"a.weight": torch.ones(3), "b.weight": torch.tensor([1.0, float("nan"), float("inf")])}
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match=r"'b\.weight' holds 2 NaN/Inf"):
        preflight.check_checkpoint(path)


def test_corrupted_pth_named(tmp_path) -> None:
    """Bytes overwritten in the middle of a .pth: the file still unpickles, with NaN weights."""
    path = tmp_path / "model.pth"
    torch.save({"model": {"x.weight": torch.zeros(4096), "y.bias": torch.zeros(8)}}, path)
    raw = bytearray(path.read_bytes())
    start = raw.find(bytes(4096 * 4)) + 4000  # inside x.weight's zero bytes
    raw[start:start + 8] = b"\xff" * 8  # 0xffffffff is a NaN in float32
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"'x\.weight' holds 2 NaN/Inf"):
        preflight.check_checkpoint(path)


def test_student_dir_with_nan_refuses_to_load(tmp_path) -> None:
    from search_spaces import build_student, preset
    from search_spaces.serialization import load_student, save_student

    torch.manual_seed(0)
    model = build_student(preset("tiny"))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    save_student(model, tmp_path / "student")
    with pytest.raises(CheckpointError, match="holds 1 NaN/Inf"):
        load_student(tmp_path / "student")
    with pytest.raises(CheckpointError, match="holds 1 NaN/Inf"):
        preflight.check_checkpoint(tmp_path / "student")


def test_checkpoint_missing(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"teacher\.checkpoint: .*does not exist"):
        preflight.check_checkpoint(tmp_path / "nope.pth", key="teacher.checkpoint")


def test_dataset_missing_and_unknown_layout(tmp_path) -> None:
    with pytest.raises(DataError, match=r"data\.path: .* is not a folder"):
        preflight.check_dataset(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(DataError) as err:
        preflight.check_dataset(tmp_path / "junk")
    message = str(err.value)
    assert "\n" not in message and "Tried" not in message  # one line, not cut off at the readers' list
    assert re.fullmatch(r"data\.path: .*junk: no known stereo dataset layout found; expected the layout of one of "
                        r"kitti2015, kitti2012, sceneflow, fsd, middlebury, pairs \(or name one with the dataset's "
                        r"kind\)", message), message


@pytest.mark.parametrize("uri", [None, "runs/mlruns", "file:///tmp/mlruns", "sqlite:///x/mlflow.db",
                                 "postgresql+psycopg2://u:p@h/db", "http://localhost:5000", "databricks"])
def test_tracking_uris_mlflow_has_a_store_for_pass(uri) -> None:
    preflight.check_tracking_uri(uri)


def test_a_tracking_uri_mlflow_has_no_store_for_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^tracking\.uri='ftp://nowhere': MLflow has no tracking store for scheme "
                                          r"'ftp'; expected a folder, file:PATH, sqlite:///PATH"):
        preflight.check_tracking_uri("ftp://nowhere")


@pytest.mark.parametrize("storage", [None, "", "journal:", "journal:/x/s.log", "study.log", "study.db",
                                     "sqlite:///x/optuna.db", "sqlite://"])
def test_storages_optuna_can_open_pass_and_nothing_is_made(tmp_path, monkeypatch, storage) -> None:
    monkeypatch.chdir(tmp_path)
    preflight.check_storage(storage)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("storage", "message"), [
    ("foo://x", r"^search\.storage: unknown storage scheme 'foo' in 'foo://x'; expected a path to a \.db/\.log file"),
    ("study.txt", r"^search\.storage: cannot tell what storage 'study\.txt' is; expected a \.db/\.sqlite file"),
    ("postgresql://u:p@h:xx/db", r"^search\.storage: storage URL .* cannot be parsed"),
    ("://db", r"^search\.storage: storage URL .* cannot be parsed"),
])
def test_a_storage_optuna_cannot_open_is_one_line(storage, message) -> None:
    with pytest.raises(ConfigError, match=message):
        preflight.check_storage(storage)


def test_writable_probe_leaves_nothing(tmp_path) -> None:
    preflight.check_writable(tmp_path / "deep" / "run", key="run_dir")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_under_a_file(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"export\.out: .*is a file, not a folder"):
        preflight.check_writable(tmp_path / "file" / "student.onnx", key="export.out")


def test_unwritable_filesystem() -> None:
    # /proc refuses new files even to root, which permission bits do not stop.
    with pytest.raises(ConfigError, match=r"out: /proc/ffsc-out\.png is not writable"):
        preflight.check_writable("/proc/ffsc-out.png", key="out")


def test_onnxruntime_on_cuda_names_the_two_package_conflict(monkeypatch) -> None:
    from importlib import metadata

    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine where ORT lost its CUDA provider
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}

    def version(dist: str) -> str:
        if dist not in versions:
            raise metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(MissingDependencyError, match="both onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are "
                                                     "installed: uninstall both and install onnxruntime-gpu alone"):
        preflight.check_backend("onnxruntime", "cuda")
    del versions["onnxruntime-gpu"]
    assert preflight.onnxruntime_conflict() is None
    with pytest.raises(MissingDependencyError, match=r"install the GPU build in its place: pip uninstall -y "
                                                     r"onnxruntime, then pip install -e \"\.\[gpu\]\""):
        preflight.check_backend("onnxruntime", "cuda")


def test_the_cpu_and_gpu_onnxruntime_builds_are_alternative_extras() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert not names & {"onnxruntime", "onnxruntime-gpu"}  # a core pin would sit beside the GPU build and break it
    extras = project["optional-dependencies"]
    assert any(d.startswith("onnxruntime>=") for d in extras["cpu"]) and not any("gpu" in d for d in extras["cpu"])
    assert any(d.startswith("onnxruntime-gpu>=") for d in extras["gpu"])
    assert not any(d.startswith("onnxruntime>=") for d in extras["gpu"] + extras["tensorrt"] + extras["real"])
    # dev goes with either build (".[dev,gpu]" must not bring the CPU build beside the GPU one)
    assert not any(d.startswith("onnxruntime") for d in extras["dev"])


def test_the_readme_test_command_installs_one_onnxruntime_build_and_ci_runs_it() -> None:
    readme = (REPO / "README.md").read_text()
    command = readme.split("# 2. set up and run the tests\n", 1)[1].splitlines()[0]
    install, test = (part.strip() for part in command.split(" && ")[1:])
    assert '-e ".[dev,cpu]"' in install and test == ".venv/bin/pytest -q"
    # CI runs exactly the README's test command, after the same install (quiet).
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install.replace("pip install ", "pip install -q ") in ci and ci[-1] == test


def test_a_missing_onnxruntime_is_one_line_naming_the_extras(monkeypatch) -> None:
    import builtins

    from compress.export.runtime import import_onnxruntime, make_session

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    for call in (import_onnxruntime, lambda: make_session(b"not used")):
        with pytest.raises(MissingDependencyError, match=r'ONNX Runtime is not installed: pip install -e "\.\[cpu\]"'):
            call()
