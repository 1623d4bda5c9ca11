"""Cheap checks before expensive work: numeric ranges, latency backends, checkpoints, data, output locations.

Every stage entry point (``ffsc run``, ``nas``, ``prune``, ``distill``, ``export``, ``infer``) calls these
before it creates anything: a user mistake found after hours of labelling costs those hours, and a
half-made run directory confuses the next resume. Each check raises one of the errors in
:mod:`compress.errors` with a one-line message naming the key or path and what was expected; none
of them writes anything that stays behind.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

import torch

from compress.backends import (  # the last two are re-exported: callers check through preflight
    BACKENDS,
    check_tensorrt_precision,  # noqa: F401
    get_backend,
    onnxruntime_conflict,  # noqa: F401
)
from compress.data.readers import layout_names, open_dataset
from compress.distill.label_cache import MANIFEST
from compress.errors import CheckpointError, ConfigError, DataError, MissingDependencyError
from compress.latency import check_clock
from compress.models import ENGINE_SUFFIXES, check_model_name
from compress.nas.storage import check_storage  # noqa: F401  (re-exported: callers check through preflight)
from teacher.loading import read_state_dict


def check_backend(backend: str, device: str, precision: str = "fp32", cuda_graph: bool = False,
                  key: str = "latency.backend") -> None:
    """Raise unless `backend` can run on `device` here (imports, CUDA, execution providers, precision)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError(f"{key}={backend!r} on device {device!r}: PyTorch sees no CUDA GPU here "
                                     "(torch.cuda.is_available() is False); use device 'cpu' or backend 'auto'")
    if cuda_graph and dev.type != "cuda":
        raise ConfigError(f"{key}: CUDA graphs need device 'cuda', got {device!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"{key}={backend!r}: expected one of {list(BACKENDS)} (resolve 'auto' first)")
    get_backend(backend).check_here(dev, precision, key)


def check_checkpoint(path: str | os.PathLike, key: str = "checkpoint", trust_pickle: bool = False) -> None:
    """The checkpoint file (or every weights file of a model folder) exists, reads as tensors, and every weight is
    finite (read_state_dict checks that)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{key}: {path} does not exist (expected a .pth or .safetensors checkpoint)")
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        if not weights:
            raise CheckpointError(f"{key}: {path} holds no saved model: expected config.yaml and model.safetensors (a "
                                  "student) or cfg.yaml, layer_shapes.json and model.safetensors (a pruned teacher)")
        for file in weights:
            read_state_dict(file, trust_pickle=trust_pickle)
        return
    read_state_dict(path, trust_pickle=trust_pickle)


def check_dataset(path: str | os.PathLike, kind: str = "auto", key: str = "data.path",
                  options: dict | None = None) -> None:
    """The dataset folder exists and has a layout the readers know (no image is decoded)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{key}: {root} is not a folder (expected a stereo dataset folder)")
    if not any(root.iterdir()):
        raise DataError(f"{key}: {root} is an empty folder (expected a stereo dataset folder)")
    try:
        dataset = open_dataset(root, kind=kind, **(options or {}))
    except TypeError as err:
        raise ConfigError(f"{key}: options {dict(options or {})} do not fit dataset kind {kind!r} ({err})") from None
    except (DataError, ConfigError) as err:
        # The readers list every layout they tried on the lines below the first; here they are named on one line.
        first = str(err).splitlines()[0]
        if first.endswith(" Tried:"):
            first = (f"{_first_line(err)}; expected the layout of one of {', '.join(layout_names())} (or name one "
                     "with the dataset's kind)")
        raise DataError(f"{key}: {first}") from None
    if len(dataset) == 0:
        raise DataError(f"{key}: {root} holds no stereo pairs")


def check_ground_truth(path: str | os.PathLike, kind: str = "auto", key: str = "data.path",
                       options: dict | None = None, why: str = "") -> None:
    """At least one pair of the dataset folder has a ground-truth disparity (no image is decoded); ``why``: what
    needs it and what to do instead."""
    dataset = open_dataset(Path(path), kind=kind, **(options or {}))
    records = getattr(dataset, "records", None)
    if records is not None and not any(r.disp is not None for r in records):
        raise DataError(f"{key} {path}: none of its {len(records)} pairs has a ground-truth disparity{why}")


def _first_line(err: Exception) -> str:
    """A reader's error without the layouts it tried, listed on the lines below the first: one line is enough."""
    return str(err).splitlines()[0].removesuffix(" Tried:").removesuffix(".")


def check_writable(path: str | os.PathLike, key: str = "output") -> None:
    """`path` (a file or folder, existing or not) can be written: probe the nearest existing folder above it,
    leaving nothing behind."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir() and not os.access(target, os.W_OK):
        raise ConfigError(f"{key}: {target} exists and is not writable")
    probe_dir = target if target.is_dir() else target.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"{key}: {target} cannot be created because {probe_dir} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".ffsc-probe-", dir=probe_dir)
    except OSError as err:
        raise ConfigError(f"{key}: {target} is not writable ({probe_dir}: {err.strerror or err})") from None
    os.close(fd)
    os.unlink(name)


TRACKING_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc")
"""MLflow's tracking stores that are not databases (a bare path has no scheme)."""
TRACKING_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
"""MLflow's database tracking stores (each also as ``<name>+<driver>``)."""


def check_tracking_uri(uri: str | None, key: str = "tracking.uri") -> None:
    """MLflow has a tracking store for the URI's scheme (its own, or a plugin's); connects to nothing."""
    if uri is None:
        return
    scheme = urllib.parse.urlparse(str(uri)).scheme.lower()
    if len(scheme) == 1 or scheme in TRACKING_SCHEMES or scheme.split("+")[0] in TRACKING_DATABASES:
        return  # one letter: a Windows drive, a path
    if scheme in {ep.name for ep in entry_points(group="mlflow.tracking_store")}:
        return
    raise ConfigError(f"{key}={uri!r}: MLflow has no tracking store for scheme {scheme!r}; expected a folder, "
                      "file:PATH, sqlite:///PATH, postgresql://, mysql:// or mssql:// database URL, an "
                      "http(s)://server or databricks (leave it unset for mlflow.db in the run directory)")


ONNX_EXPECTED = "expected an .onnx model exported by `ffsc export` (or another ONNX model)"
ENGINE_EXPECTED = "expected a TensorRT engine built by `ffsc export --format engine`"
# ModelProto fields an ONNX model cannot lack: ir_version (a varint) and graph (length-delimited).
_ONNX_REQUIRED_FIELDS = {(1, 0), (7, 2)}


def _read_varint(f) -> int:
    """One protobuf varint from a binary file; ValueError at the end of the file or past 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise ValueError("it ends inside a field header (truncated?)")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ValueError("it is not protobuf data")


def _protobuf_fields(path: Path) -> set[tuple[int, int]]:
    """(field number, wire type) of every top-level field of a protobuf file, reading only the field headers."""
    size = path.stat().st_size
    fields = set()
    with open(path, "rb") as f:
        while f.tell() < size:
            number, wire = divmod(_read_varint(f), 8)
            if number == 0 or wire not in (0, 1, 2, 5):
                raise ValueError("it is not protobuf data")
            if wire == 0:
                _read_varint(f)
            else:  # skip the contents: fixed 8 or 4 bytes, or a length-prefixed run
                length = _read_varint(f) if wire == 2 else (8 if wire == 1 else 4)
                f.seek(min(length, size + 1), os.SEEK_CUR)  # past the end is enough to tell, and no overflow
            if f.tell() > size:
                raise ValueError(f"its field {number} runs past the end of the file at byte {size} (truncated?)")
            fields.add((number, wire))
    return fields


def check_onnx_file(path: str | os.PathLike, key: str = "--model") -> None:
    """`path` is an ONNX model file, neither missing, empty, truncated nor another kind of file.

    Only the top-level field headers are read (seeking over their contents): a full parse of a 1.5 GB teacher
    export costs seconds and its size in memory, and the loaders parse it anyway. A file cut short ends inside
    a field; another kind of file is not protobuf, or lacks the ir_version and graph every ONNX model has.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{key} {path}: no such file; {ONNX_EXPECTED}")
    if path.is_dir():
        raise CheckpointError(f"{key} {path} is a folder; {ONNX_EXPECTED}")
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        fields = _protobuf_fields(path)
    except OSError as err:
        raise CheckpointError(f"{key} {path} cannot be read ({err.strerror or err}); {ONNX_EXPECTED}") from None
    except ValueError as err:
        raise CheckpointError(f"{key} {path} is not an ONNX model: {err}; {ONNX_EXPECTED}") from None
    if not _ONNX_REQUIRED_FIELDS <= fields:
        raise CheckpointError(f"{key} {path} is not an ONNX model: it has no ONNX graph (truncated, or another "
                              f"kind of file); {ONNX_EXPECTED}")


def check_engine_file(path: str | os.PathLike, key: str = "--model") -> None:
    """`path` is a non-empty file (TensorRT itself, absent on most machines, reads the rest when it loads)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{key} {path}: no such file; {ENGINE_EXPECTED}")
    if not path.is_file():
        raise CheckpointError(f"{key} {path} is not a file; {ENGINE_EXPECTED}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{key} {path} is empty (0 bytes); {ENGINE_EXPECTED}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{key} {path} is not readable; {ENGINE_EXPECTED}")


def check_exported_file(spec: str | os.PathLike | None, key: str = "--model") -> None:
    """An ``.onnx`` or engine path checked as such; other model specs pass (resolve_model reads them)."""
    if spec is None:
        return
    suffix = Path(spec).suffix.lower()
    if suffix == ".onnx":
        check_onnx_file(spec, key)
    elif suffix in ENGINE_SUFFIXES:
        check_engine_file(spec, key)


def check_frames_source(source: str | os.PathLike | None, key: str = "--calib") -> None:
    """A calibration or held-out source is 'synthetic', a label cache folder, or a folder of stereo pairs."""
    expected = ("expected a label cache folder (e.g. runs/<run>/labels/train), a stereo data folder or "
                "'synthetic'")
    if source is None or str(source) == "synthetic":
        return
    root = Path(source)
    if not root.exists():
        raise DataError(f"{key} {root}: no such folder; {expected}")
    if not root.is_dir():
        raise DataError(f"{key} {root} is a file, not a folder; {expected}")
    if (root / MANIFEST).is_file():
        return
    if not any(root.iterdir()):
        raise DataError(f"{key} {root} is an empty folder; {expected}")
    try:
        dataset = open_dataset(root)
    except DataError as err:
        raise DataError(f"{key} {root}: {_first_line(err).removeprefix(f'{root}: ')}; {expected}") from None
    if len(dataset) == 0:
        raise DataError(f"{key} {root} holds no stereo pairs; {expected}")


def check_model_source(spec: str | None, key: str = "--model", trust_pickle: bool = False) -> None:
    """A model named by a path (file or folder) exists and its weights read and are finite; a name is one that
    resolve_model builds (a preset, ``teacher:vitl``; nothing is built here)."""
    if spec is None:
        return
    path = Path(spec)
    if path.is_dir() or (path.is_file() and path.suffix in (".pth", ".pt", ".safetensors")):
        check_checkpoint(path, key=key, trust_pickle=trust_pickle)
    elif not path.exists() and (path.suffix or "/" in spec or "\\" in spec):
        raise CheckpointError(f"{key} {spec}: no such file or directory (expected a saved model folder or a "
                              "checkpoint file)")
    else:
        check_model_name(spec, key=key)


def check_latency(lat, key: str = "latency") -> None:
    """The (resolved) latency settings can be timed here: backend importable, device present, precision and
    clock valid."""
    device = lat.timing_config().run_device()
    check_backend(lat.backend, device, lat.precision, lat.cuda_graph, key=f"{key}.backend")
    get_backend(lat.backend).check_precision(lat.precision, f"{key}.precision")
    try:
        check_clock(lat.clock, torch.device(device), lat.threads)
    except ConfigError as err:
        raise ConfigError(f"{key}.clock: {err}") from None


def check_distill(cfg) -> None:
    """``ffsc distill``: the teacher checkpoint and an initial student checkpoint read with finite weights, a
    given label cache exists, data folders have a known layout, the run folder is writable."""
    check_model_source(cfg.teacher.checkpoint, key="teacher.checkpoint", trust_pickle=cfg.teacher.trust_checkpoint)
    check_model_source(cfg.student.model, key="student.model")
    labels = cfg.data.labels
    if labels.folder and not labels.build and not Path(labels.folder).is_dir():
        raise DataError(f"data.labels.folder: {labels.folder} is not a folder (expected a label cache made by ffsc, "
                        "or data.labels.build: true to make it)")
    for name in ("train", "eval"):
        spec = getattr(cfg.data, name)
        if spec is not None and spec.path:
            check_dataset(spec.path, spec.kind, key=f"data.{name}.path", options=spec.options)
    check_writable(cfg.run_dir, key="run_dir")


def check_prune(cfg):
    """``ffsc prune``: model and teacher readable, data present, output writable, and, when latency will be
    timed, the backend usable ('auto' resolved). Returns cfg with its latency backend resolved and the choice."""
    check_model_source(cfg.model, key="--model")
    check_model_source(cfg.teacher.checkpoint, key="--teacher", trust_pickle=cfg.teacher.trust_checkpoint)
    if cfg.data.path:
        check_dataset(cfg.data.path, cfg.data.kind, key="--data", options=cfg.data.options)
    check_writable(cfg.run_dir, key="--out")  # also where the MLflow store goes by default
    lat, choice = cfg.latency.resolved()
    timed = cfg.budget.kind == "latency_ms" or lat.measure == "always"
    if timed and lat.measure == "never":
        raise ConfigError("--budget-ms needs latency measurements, but latency.measure is 'never'")
    if timed:
        check_latency(lat, key="latency")
    return replace(cfg, latency=lat), choice
