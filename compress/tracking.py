"""A thin MLflow tracker: one parent run per study, one nested run per trial, artifacts beside the run dir."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import yaml

from compress.atomic import atomic_write_text
from compress.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

_log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "ffsc"


@dataclasses.dataclass
class TrackingConfig:
    """MLflow, the same keys in every recipe: a SQLite store in the run directory unless ``uri`` names one."""

    enabled: bool = True
    """Log the run to MLflow (params, every step's or trial's metrics, the result files)."""
    uri: str | None = None
    """MLflow tracking URI; None = a SQLite store ``mlflow.db`` in the run directory."""
    experiment: str = DEFAULT_EXPERIMENT
RUN_RECORD = "mlflow_runs.json"
ROLE_TAG = "ffsc.role"
STUDY_TAG = "ffsc.study"
STUDY_KEY_TAG = "ffsc.study_key"
PARENT_TAG = "mlflow.parentRunId"
# The run's description, rendered as Markdown on its Overview tab.
NOTE_TAG = "mlflow.note.content"
# MLflow 3 marks an experiment's type with this tag (mlflow/demo/generators/traces.py sets "genai_development";
# the UI's list of kinds holds "custom_model_development", shown as "Machine learning").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
OVERVIEW_ARTIFACTS = "overview"
_FALLBACK_TAG_VALUE_LEN = 8000

# MLflow's documented limits, used when its validation module does not expose them.
_FALLBACK_PARAM_VALUE_LEN = 6000
_FALLBACK_KEY_LEN = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_LOCAL_SCHEMES = ("sqlite", "file", "")
# MLflow accepts letters, digits, underscores, dashes, periods, spaces and slashes in keys.
_KEY_UNSAFE = re.compile(r"[^\w\-. /]", re.ASCII)


def _tag_value_limit() -> int:
    try:
        # lazy: mlflow takes seconds to import, and only tracked runs need it
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        return int(MAX_TAG_VAL_LENGTH)
    except ImportError:
        return _FALLBACK_TAG_VALUE_LEN


def _limits() -> tuple[int, int]:
    try:
        # lazy: mlflow takes seconds to import, and only tracked runs need it
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH), int(MAX_ENTITY_KEY_LENGTH)
    except ImportError:
        return _FALLBACK_PARAM_VALUE_LEN, _FALLBACK_KEY_LEN


def _quiet_mlflow_logging() -> None:
    # MLflow and its migration tool announce every table they create at INFO, and a client of a
    # tracking server prints two "View run" lines per finished run (one per trial) unless told not to.
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _scalar_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps([v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in value])
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Return nested params as MLflow strings under dotted keys (dataclasses and mappings are expanded)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_params(value, name))
            else:
                flat[name] = "{}"
        else:
            flat[name] = _scalar_text(value)
    return flat


def clip_params(flat: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Return params with keys MLflow accepts and clipped values, and the names of those changed."""
    max_value, max_key = _limits()
    clipped: dict[str, str] = {}
    notes: list[str] = []
    for key, value in flat.items():
        new_key = _KEY_UNSAFE.sub("_", key)
        new_key = new_key if len(new_key) <= max_key else new_key[: max_key - 3] + "..."
        new_value = value if len(value) <= max_value else value[: max_value - 3] + "..."
        if new_key != key or new_value != value:
            notes.append(key)
        clipped[new_key] = new_value
    return clipped, notes


def split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Return the finite numeric metrics as floats and the names of those skipped."""
    kept: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            skipped.append(str(key))
            continue
        if math.isfinite(number):
            kept[str(key)] = number
        else:
            skipped.append(str(key))
    return kept, skipped


def teacher_tags(teacher: str | Mapping[str, Any] | None) -> dict[str, str]:
    """Return tags naming the teacher (a name, or a mapping such as {"checkpoint": ..., "sha256": ...})."""
    if teacher is None:
        return {}
    if isinstance(teacher, Mapping):
        return {f"ffsc.teacher.{k}": str(v) for k, v in teacher.items()}
    return {"ffsc.teacher": str(teacher)}


class Tracker:
    """MLflow tracking for one run dir; MLflow is imported only when something is logged."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        teacher: str | Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tracking_uri is None:
            tracking_uri = f"sqlite:///{(self.run_dir / 'mlflow.db').resolve().as_posix()}"
        self.tracking_uri = tracking_uri
        scheme = tracking_uri.split("://", 1)[0] if "://" in tracking_uri else ""
        if artifact_location is None and scheme in _LOCAL_SCHEMES:
            artifact_location = (self.run_dir / "mlartifacts").resolve().as_uri()
        self.artifact_location = artifact_location
        self.experiment = experiment
        self.teacher = teacher
        self.parent_run_id: str | None = None
        self.held = False
        """Whether a ``with tracker:`` block holds it: that block, not run_study, then ends the study run."""
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        """The MlflowClient bound to this tracker's URI (created on first use)."""
        if self._client is None:
            # lazy: mlflow takes seconds to import, and only tracked runs need it
            from mlflow import MlflowClient

            _quiet_mlflow_logging()
            with warnings.catch_warnings():
                # MLflow's own SQLAlchemy models use a loader option SQLAlchemy 2 deprecates; not ours to fix.
                warnings.filterwarnings("ignore", message=".*noload.*")
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The id of the experiment, created on first use with artifacts under the run dir when local."""
        if self._experiment_id is None:
            # lazy: mlflow takes seconds to import, and only tracked runs need it
            from mlflow.exceptions import MlflowException

            client = self.client
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location
                    )
                except MlflowException:
                    exp = client.get_experiment_by_name(self.experiment)  # created concurrently by another worker
                    if exp is None:
                        raise
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
            if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:  # a kind the user chose is kept
                client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return self._experiment_id

    def _record_path(self) -> Path:
        return self.run_dir / RUN_RECORD

    def _read_record(self) -> dict[str, Any]:
        try:
            return json.loads(self._record_path().read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self, name: str, run_id: str) -> None:
        record = self._read_record()
        record.setdefault(self.tracking_uri, {})[name] = run_id
        atomic_write_text(self._record_path(), json.dumps(record, indent=2) + "\n")

    def _usable_run(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        # lazy: mlflow takes seconds to import, and only tracked runs need it
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    def _study_runs(self, study_key: str) -> list[Any]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_KEY_TAG}` = '{study_key}' and tags.`{ROLE_TAG}` = 'study'",
            max_results=100,
        )
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def start_study_run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        study_key: str | None = None,
        run_id: str | None = None,
        teacher: str | Mapping[str, Any] | None = None,
    ) -> str:
        """Start (or resume) the parent run of a study and return its id.

        Resumes, in order: the given `run_id`; the run tagged with `study_key` (a study's unique id, so
        concurrent workers converge on one run); the run this run dir recorded for `name`.
        """
        all_tags = {ROLE_TAG: "study", STUDY_TAG: name, **teacher_tags(teacher or self.teacher)}
        if study_key:
            all_tags[STUDY_KEY_TAG] = study_key
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})

        chosen = run_id if self._usable_run(run_id) else None
        if chosen is None and study_key:
            existing = self._study_runs(study_key)
            chosen = existing[0].info.run_id if existing else None
        if chosen is None and not study_key:
            recorded = self._read_record().get(self.tracking_uri, {}).get(name)
            chosen = recorded if self._usable_run(recorded) else None

        client = self.client
        if chosen is not None:
            client.update_run(chosen, status="RUNNING")
            self._log_batch(chosen, tags=all_tags)
            _log.info("resuming MLflow run %s for study %s", chosen, name)
        else:
            run = client.create_run(self.experiment_id, tags=all_tags, run_name=name)
            chosen = run.info.run_id
            if study_key:
                # Two workers may both have found no run and created one: all keep the oldest.
                oldest = self._study_runs(study_key)[0].info.run_id
                if oldest != chosen:
                    client.delete_run(chosen)
                    chosen = oldest
            if chosen == run.info.run_id and params:
                flat, clipped = clip_params(flatten_params(params))
                extra = {"ffsc.clipped_params": ",".join(clipped)} if clipped else {}
                self._log_batch(chosen, params=flat, tags=extra)
        self.parent_run_id = chosen
        self._write_record(name, chosen)
        return chosen

    def _log_batch(
        self,
        run_id: str,
        params: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> None:
        # lazy: mlflow takes seconds to import, and only tracked runs need it
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        metric_list = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, len(param_list), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=param_list[i : i + _PARAMS_PER_BATCH])
        for i in range(0, len(metric_list), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metric_list[i : i + _METRICS_PER_BATCH])
        for i in range(0, len(tag_list), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=tag_list[i : i + _PARAMS_PER_BATCH])

    def _require_parent(self) -> str:
        if self.parent_run_id is None:
            raise ConfigError("no study run is active; call Tracker.start_study_run() before logging to it")
        return self.parent_run_id

    def trial_run(
        self,
        trial_number: int,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        *,
        status: str = "FINISHED",
    ) -> str:
        """Log one trial as a finished run nested under the study run; return its id."""
        parent = self._require_parent()
        flat, clipped = clip_params(flatten_params(params))
        kept, skipped = split_metrics(metrics)
        run_name = f"trial-{trial_number:04d}"
        run_tags = {PARENT_TAG: parent, "ffsc.trial": str(trial_number)}
        run_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        if skipped:
            run_tags["ffsc.skipped_metrics"] = ",".join(skipped)
            _log.warning("trial %d: skipped non-finite or non-numeric metrics %s", trial_number, skipped)
        if clipped:
            run_tags["ffsc.clipped_params"] = ",".join(clipped)
        clip_tags, _ = clip_params(run_tags)  # tag values share the param length limit
        run = self.client.create_run(self.experiment_id, tags=clip_tags, run_name=run_name)
        self._log_batch(run.info.run_id, params=flat, metrics=kept)
        self.client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log finite metrics on the study run."""
        kept, _ = split_metrics(metrics)
        self._log_batch(self._require_parent(), metrics=kept, step=step)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file or folder into the study run's artifacts."""
        parent = self._require_parent()
        local = Path(path)
        if not local.exists():
            raise ConfigError(f"cannot log artifact {local}: it does not exist")
        if local.is_dir():
            self.client.log_artifacts(parent, str(local), artifact_path)
        else:
            self.client.log_artifact(parent, str(local), artifact_path)

    def log_files(self, files: Iterable[str | os.PathLike[str]], artifact_path: str | None = None) -> None:
        """Copy each given file into the study run's artifacts under artifact_path (each file once)."""
        for f in dict.fromkeys(Path(f) for f in files):
            self.log_artifact(f, artifact_path)

    def log_overview(
        self,
        title: str,
        metrics: Mapping[str, Any] | None = None,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        image: str | os.PathLike[str] | None = None,
    ) -> str:
        """Write the study run's description (its Overview): a metrics table, an image and a config; returns it.

        The image is logged under ``overview/`` and shown through the tracking server's ``get-artifact`` URL.
        """
        parent = self._require_parent()
        parts = [f"### {title}"]
        kept, _ = split_metrics(metrics or {})
        if kept:
            rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in kept.items())
            parts.append(f"| metric | value |\n|---|---|\n{rows}")
        if image is not None:
            image = Path(image)
            self.log_artifact(image, OVERVIEW_ARTIFACTS)
            url = f"get-artifact?path={quote(f'{OVERVIEW_ARTIFACTS}/{image.name}')}&run_uuid={parent}"
            parts.append(f"![{image.stem}]({url})")
        if config is not None:
            if isinstance(config, Mapping):
                text = yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
            else:
                text = Path(config).read_text(encoding="utf-8")
            parts.append(f"Config:\n\n```yaml\n{text.rstrip()}\n```")
        note = "\n\n".join(parts) + "\n"
        limit = _tag_value_limit()
        if len(note) > limit:  # the config is last: cut it, keeping the fence closed
            note = note[: limit - 20].rstrip() + "\n...\n```\n"
        self.client.set_tag(parent, NOTE_TAG, note)
        return note

    def ui_url(self, server: str = "http://127.0.0.1:5000") -> str:
        """The `mlflow ui` address of this experiment, opened as model training.

        MLflow 3.17's UI picks GenAI or model training from the page's ``workflowType`` (default GenAI), not
        from the experiment's kind tag, so the address names it.
        """
        return f"{server.rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

    def end(self, status: str = "FINISHED") -> None:
        """Mark the study run finished (or FAILED/KILLED); a later start_study_run resumes it."""
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status=status)
            self.parent_run_id = None

    def __enter__(self) -> Tracker:
        self.held = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.held = False
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))
