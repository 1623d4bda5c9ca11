"""MLflow tracking of NAS studies against real MLflow stores (SQLite file, and a real `mlflow server`)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from compress.errors import ConfigError
from compress.nas import StudySpec, make_storage, run_study
from compress.tracking import Tracker, flatten_params

optuna.logging.set_verbosity(optuna.logging.ERROR)


def analytic(trial: optuna.Trial) -> dict[str, float]:
    x = trial.suggest_float("x", 0.0, 3.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    return {"epe": (x - 1.0) ** 2 + y, "latency_ms": 10.0 / (1.0 + x) + y}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One MLflow SQLite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{(tmp_path_factory.mktemp('mlflow') / 'mlflow.db').as_posix()}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _children(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_study_is_logged_as_one_parent_run_with_nested_trials_and_resumes_it(tmp_path):
    run_dir = tmp_path / "run"
    spec = StudySpec("tracked", sampler="random", seed=2, n_trials=6, budget_ms=4.0)
    storage = make_storage(None, run_dir)
    teacher = {"name": "foundation-stereo", "sha256": "0123abcd"}
    result = run_study(spec, storage, analytic, tracker=Tracker(run_dir, teacher=teacher), run_dir=run_dir)
    assert result.n_complete == 6

    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve().as_posix()}"  # the default store lives in the run dir
    client = _client(uri)
    exp = client.get_experiment_by_name("ffsc")
    assert exp is not None and exp.artifact_location.startswith((run_dir / "mlartifacts").resolve().as_uri())
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`ffsc.role` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ffsc.teacher.sha256"] == "0123abcd"
    assert parent.data.params["budget_ms"] == "4.0" and parent.data.params["n_trials"] == "6"
    assert result.study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    children = _children(client, exp.experiment_id, parent.info.run_id)
    assert sorted(int(c.data.tags["ffsc.trial"]) for c in children) == list(range(6))
    by_trial = {int(c.data.tags["ffsc.trial"]): c for c in children}
    for t in result.study.trials:
        child = by_trial[t.number]
        assert child.data.metrics["epe"] == pytest.approx(t.values[0])
        assert child.data.metrics["latency_ms"] == pytest.approx(t.values[1])
        assert float(child.data.params["x"]) == pytest.approx(t.params["x"])
        assert child.data.tags["ffsc.feasible"] == str(t.values[1] <= 4.0)
        assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/pareto_front.png", "pareto/pareto_front.csv", "pareto/pareto_front.json"} <= artifacts
    assert parent.data.metrics["front_size"] == len(result.front.points)
    # MLflow 3 shows the experiment as model training, not as a GenAI app.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # A second invocation (a resume, or a larger budget) continues the same parent run.
    more = run_study(spec, storage, analytic, n_trials=9, tracker=Tracker(run_dir, teacher=teacher))
    assert more.ran == 3
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`ffsc.role` = 'study'")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert len(_children(client, exp.experiment_id, parent.info.run_id)) == 9


def test_trial_run_flattens_clips_and_skips_what_mlflow_cannot_store(tmp_path, shared_store):
    tracker = Tracker(tmp_path, tracking_uri=shared_store, experiment="direct", teacher="foundation-stereo-vitl")
    with pytest.raises(ConfigError, match="start_study_run"):
        tracker.trial_run(0, {"x": 1}, {"epe": 1.0})
    parent = tracker.start_study_run("direct", params={"space": {"encoder": {"depth": 4}}, "note": "n" * 7000})
    child = tracker.trial_run(
        3,
        params={"arch": {"widths": [32, 64], "act": "relu"}, "blob": "b" * 7000, "empty": {}, "odd:key": 1},
        metrics={"epe": 1.5, "d1": 2, "bad": math.nan, "far": math.inf, "label": "slow"},
        tags={"ffsc.state": "COMPLETE"},
    )
    artifact = tmp_path / "notes.txt"
    artifact.write_text("front notes\n")
    tracker.log_artifact(artifact)
    tracker.end()

    client = _client(shared_store)
    p = client.get_run(parent)
    assert p.data.params["space.encoder.depth"] == "4"
    assert len(p.data.params["note"]) == 6000 and p.data.params["note"].endswith("...")
    assert p.data.tags["ffsc.teacher"] == "foundation-stereo-vitl"
    c = client.get_run(child)
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert c.data.params["arch.widths"] == "[32, 64]" and c.data.params["arch.act"] == "relu"
    assert c.data.params["empty"] == "{}" and c.data.params["odd_key"] == "1"
    assert len(c.data.params["blob"]) == 6000 and "blob" in c.data.tags["ffsc.clipped_params"]
    assert c.data.metrics == {"epe": 1.5, "d1": 2.0}
    assert set(c.data.tags["ffsc.skipped_metrics"].split(",")) == {"bad", "far", "label"}
    assert [a.path for a in client.list_artifacts(parent)] == ["notes.txt"]


def test_study_key_and_run_record_resume_the_same_parent(tmp_path, shared_store):
    first = Tracker(tmp_path / "a", tracking_uri=shared_store, experiment="keys")
    run_a = first.start_study_run("s", params={"n": 1}, study_key="uid-1")
    first.end()
    # Another worker (another run dir) with the same study key joins the same run.
    assert (
        Tracker(tmp_path / "b", tracking_uri=shared_store, experiment="keys").start_study_run("s", study_key="uid-1")
        == run_a
    )
    # Without a key, the run dir's own record decides; a different study key gets its own run.
    assert Tracker(tmp_path / "a", tracking_uri=shared_store, experiment="keys").start_study_run("s") == run_a
    other = Tracker(tmp_path / "a", tracking_uri=shared_store, experiment="keys").start_study_run(
        "s", study_key="uid-2"
    )
    assert other != run_a
    assert _client(shared_store).get_run(run_a).info.status == "RUNNING"  # resumed runs are open again


def test_overview_shows_the_image_metrics_and_config(tmp_path, shared_store):
    from PIL import Image

    tracker = Tracker(tmp_path, tracking_uri=shared_store, experiment="overview")
    parent = tracker.start_study_run("overview")
    png = tmp_path / "pareto_front.png"
    Image.new("RGB", (8, 8), (0, 128, 255)).save(png)
    config = tmp_path / "config.yaml"
    config.write_text("name: tiny\niters: 4\n")
    note = tracker.log_overview("final student", {"gt/epe": 1.23456, "latency_ms": 7.0, "label": "x"}, config, png)
    client = _client(shared_store)
    run = client.get_run(parent)
    assert run.data.tags["mlflow.note.content"] == note
    assert f"get-artifact?path=overview/pareto_front.png&run_uuid={parent}" in note
    assert "| gt/epe | 1.235 |" in note and "| latency_ms | 7 |" in note and "label" not in note
    assert "```yaml\nname: tiny\niters: 4\n```" in note
    assert [a.path for a in client.list_artifacts(parent, "overview")] == ["overview/pareto_front.png"]
    # A long config is cut to MLflow's tag limit with its code fence still closed.
    long_note = tracker.log_overview("big", config={f"key{i}": "v" * 50 for i in range(400)})
    assert len(long_note) <= 8000 and long_note.endswith("...\n```\n")
    assert client.get_run(parent).data.tags["mlflow.note.content"] == long_note


def test_experiment_kind_chosen_by_the_user_is_kept(tmp_path, shared_store):
    client = _client(shared_store)
    exp_id = client.create_experiment("genai-kept")
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")
    Tracker(tmp_path, tracking_uri=shared_store, experiment="genai-kept").start_study_run("s")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "genai_development"


def test_log_files_logs_each_given_file_once(tmp_path, shared_store):
    tracker = Tracker(tmp_path, tracking_uri=shared_store, experiment="files")
    parent = tracker.start_study_run("files")
    a, b = tmp_path / "a.csv", tmp_path / "b.json"
    a.write_text("x\n"), b.write_text("{}\n")
    tracker.log_files([a, b, a], "front")
    assert sorted(x.path for x in _client(shared_store).list_artifacts(parent, "front")) == ["front/a.csv",
                                                                                             "front/b.json"]
    with pytest.raises(ConfigError, match="does not exist"):
        tracker.log_files([tmp_path / "missing.png"])


def test_flatten_params_expands_nested_mappings():
    assert flatten_params({"a": {"b": {"c": 1}}, "d": (1, "x"), "e": None}) == {
        "a.b.c": "1",
        "d": '[1, "x"]',
        "e": "None",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tracker_logs_to_a_real_mlflow_server(tmp_path):
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.exists() and shutil.which("mlflow") is None:
        pytest.skip("the mlflow command-line tool is not installed next to this Python")
    port = _free_port()
    server = subprocess.Popen(
        [
            str(mlflow_cli if mlflow_cli.exists() else shutil.which("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{(tmp_path / 'server.db').as_posix()}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited during start-up"
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 180 s"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        spec = StudySpec("served", sampler="random", n_trials=3)
        result = run_study(spec, make_storage(None, run_dir), analytic, tracker=Tracker(run_dir, tracking_uri=uri))
        client = _client(uri)
        parent_id = result.study.user_attrs["mlflow_parent_run_id"]
        exp_id = client.get_run(parent_id).info.experiment_id
        assert len(_children(client, exp_id, parent_id)) == 3
        paths = {a.path for a in client.list_artifacts(parent_id, "pareto")}
        assert "pareto/pareto_front.png" in paths
        assert any((tmp_path / "server-artifacts").rglob("pareto_front.png"))  # proxied to the server's store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
