"""``ffsc run`` end to end on the quick-start recipe with tiny budgets: every artifact, MLflow, resume."""

from __future__ import annotations

import json

import pytest

from compress.cli import main
from compress.errors import ConfigError
from compress.pipeline import load_run_recipe
from tests.paths import REPO

RECIPE = REPO / "recipes" / "quickstart_cpu.yaml"
SMALL = [
    "search.n_trials=2", "search.distill_steps=2", "search.parent_steps=2",
    "search.batch_size=2", "distill.steps=2", "distill.batch_size=2", "search.latency.repeats=2",
    "search.latency.warmup=1", "search.latency.report_rounds=1", "data.train.num_samples=4",
    "data.eval.num_samples=2", "prune.samples=2", "prune.distill.steps_between=1", "prune.distill.recovery_steps=1",
    "progress=false", "real_pairs.height=64",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart")
    assert main(["run", str(RECIPE), f"run_dir={run_dir}", *SMALL]) == 0
    return run_dir


def test_run_leaves_every_artifact(finished_run):
    run_dir = finished_run
    for name in ("recipe.yaml", "summary.json",
                 "labels/train/manifest.json", "search/pareto_front.csv", "search/pareto_front.json",
                 "search/pareto_front.png", "final/student/config.yaml", "export/student.onnx", "mlflow.db"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["front"] and summary["chosen"]["trial"] in {r["trial"] for r in summary["front"]}
    final = summary["final"]
    for key in ("gt/epe", "teacher/epe", "latency_ms", "gmacs", "mparams"):
        assert final[key] > 0, key
    assert "shipped stand-in teacher" in summary["teacher"]["description"]
    assert not (run_dir / "teacher").exists()  # the shipped teacher is used where it is, not copied
    assert summary["latency_backend"]["backend"] == "onnxruntime" and summary["latency_backend"]["reason"]
    assert summary["teacher"]["gt/epe"] > 0 and summary["teacher"]["latency_ms"] > 0
    trials = [d for d in (run_dir / "trials").iterdir() if (d / "student" / "model.safetensors").is_file()]
    assert trials and not any((d / "checkpoint.pt").exists() or (d / "inherited").exists() for d in trials)


def test_every_run_scores_the_teacher_the_front_and_the_final_student_on_real_pairs(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    real = summary["real_pairs"]
    assert real["pairs"] == ["motorcycle"] and real["size"] == [64, 96]  # real_pairs.height=64, aspect kept
    scores = real["scores"]
    assert {"teacher", "sgbm", "final"} <= set(scores)
    assert {f"trial {r['trial']}" for r in summary["front"]} <= set(scores)
    for name, table in scores.items():
        assert 0 <= table["mean"]["bp2"] <= 100 and table["mean"]["epe"] > 0, name
    final, teacher = summary["final"], summary["teacher"]
    assert final["real_bp2"] == scores["final"]["mean"]["bp2"]
    assert teacher["real_bp2"] == scores["teacher"]["mean"]["bp2"]
    assert final["real_retention"] == pytest.approx(final["real_bp2"] / teacher["real_bp2"])
    for row in summary["front"]:
        assert row["real_bp2"] == scores[f"trial {row['trial']}"]["mean"]["bp2"]


def test_chosen_student_is_pruned_before_the_final_distillation(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    pruned = summary["pruned"]
    assert pruned["budget"] == "ratio <= 0.3" and pruned["met"] and pruned["steps"] >= 1
    assert pruned["gmacs"][1] < pruned["gmacs"][0]
    chosen = next(r for r in summary["front"] if r["trial"] == summary["chosen"]["trial"])
    # The final student keeps the pruned widths through distillation and export.
    assert summary["final"]["gmacs"] == pytest.approx(pruned["gmacs"][1])
    assert summary["final"]["gmacs"] < chosen["gmacs"]
    result = json.loads((finished_run / "prune" / "prune_result.json").read_text())
    assert result["model_path"] == pruned["path"] and (finished_run / "prune" / "model" / "config.yaml").is_file()
    # Every row of the final table was timed in the same side-by-side measurement.
    for row in summary["front"]:
        assert row["latency_ms"] > 0 and row["search_latency_ms"] > 0


def test_mlflow_store_has_study_and_trials(finished_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ffsc")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    child = children[0].data
    assert {"epe", "latency_ms", "gmacs"} <= set(child.metrics)
    assert "volume_scale" in child.params  # params = the sampled student's config
    parent = client.get_run(parents[0].info.run_id).data.metrics
    assert any(k.startswith("prune/") for k in parent) and "final_latency_ms" in parent
    assert {"real_teacher_bp2", "real_final_bp2", "real_sgbm_bp2", "final_real_retention"} <= set(parent)
    # The parent's Overview: the final student's metrics, the front's plot and the chosen config.
    note = client.get_run(parents[0].info.run_id).data.tags["mlflow.note.content"]
    assert "| teacher/epe |" in note and "get-artifact?path=overview/pareto_front.png" in note and "```yaml" in note
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = client.get_run(parents[0].info.run_id).data.tags
    assert tags["ffsc.latency.backend"] == "onnxruntime" and tags["ffsc.latency.reason"] == "named in the config"
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id)]
    assert any(p.endswith(".png") for p in artifacts) or any(
        a.path.endswith(".png") for d in artifacts for a in client.list_artifacts(parents[0].info.run_id, d)
    )


def test_rerun_resumes_without_redoing_work(finished_run, capsys):
    first = json.loads((finished_run / "summary.json").read_text())
    before = (finished_run / "optuna.db").stat().st_mtime
    pruned_at = (finished_run / "prune" / "prune_result.json").stat().st_mtime
    timed_at = (finished_run / "report_latency.json").stat().st_mtime
    trials = sorted(p.name for p in (finished_run / "trials").iterdir())
    assert main(["run", str(RECIPE), f"run_dir={finished_run}", *SMALL]) == 0
    assert sorted(p.name for p in (finished_run / "trials").iterdir()) == trials
    assert (finished_run / "optuna.db").stat().st_mtime >= before
    assert (finished_run / "prune" / "prune_result.json").stat().st_mtime == pruned_at  # pruning was reused
    assert (finished_run / "report_latency.json").stat().st_mtime == timed_at  # so was the side-by-side timing
    # The wall time counts both calls, and says how much of it was this one.
    second = json.loads((finished_run / "summary.json").read_text())
    assert first["calls"] == 1 and second["calls"] == 2
    assert second["seconds_total"] == pytest.approx(first["seconds_total"] + second["seconds"])
    assert second["seconds"] < second["seconds_total"]
    assert json.loads((finished_run / "wall_time.json").read_text())["seconds_total"] == second["seconds_total"]
    out = capsys.readouterr().out
    assert (f"wall time {second['seconds_total']:.0f} s over 2 calls ({second['seconds']:.0f} s in this one)"
            in out)


def test_rerun_with_other_prune_settings_prunes_and_distils_anew(finished_run):
    before = json.loads((finished_run / "summary.json").read_text())
    assert main(["run", str(RECIPE), f"run_dir={finished_run}", *SMALL, "prune.ratio=0.5"]) == 0
    after = json.loads((finished_run / "summary.json").read_text())
    assert after["pruned"]["budget"] == "ratio <= 0.5"
    assert after["pruned"]["gmacs"][1] < before["pruned"]["gmacs"][1]
    assert after["final"]["gmacs"] == pytest.approx(after["pruned"]["gmacs"][1])  # distilled from the new pruning


def test_predicted_latency_end_to_end(tmp_path, monkeypatch):
    """search.latency.mode=predicted: the table lands in the user's cache (keyed by size), is checked against
    measured students once, and every trial's latency is a prediction."""
    monkeypatch.setenv("FFSC_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = ["run", str(RECIPE), f"run_dir={run_dir}", *SMALL, "search.latency.mode=predicted",
            "search.latency.check_students=1", "distill.enabled=false", "export.enabled=false"]
    assert main(args) == 0
    check = json.loads((run_dir / "search" / "predictor_check.json").read_text())
    assert check["students"] == 1 and check["median_abs_error"] >= 0 and check["scale"] > 0
    assert (tmp_path / "cache" / "latency_table.json").is_file()
    front = json.loads((run_dir / "summary.json").read_text())["front"]
    assert front and all(row["latency_ms"] > 0 for row in front)
    made = (run_dir / "search" / "predictor_check.json").stat().st_mtime_ns
    assert main(args) == 0  # a re-run reuses the check instead of measuring again
    assert (run_dir / "search" / "predictor_check.json").stat().st_mtime_ns == made


def test_prune_stage_needs_the_search():
    with pytest.raises(ConfigError, match="search stage is off"):
        load_run_recipe(RECIPE, ["search.enabled=false", "prune.enabled=true"])


def test_stages_list_is_renamed_to_each_stages_enabled():
    """A stage is switched off one way, by its own ``enabled``: the old ``stages:`` list fails in one line."""
    with pytest.raises(ConfigError, match="'stages' was renamed to 'search.enabled, prune.enabled"):
        load_run_recipe(RECIPE, ["stages=[teacher,search]"])


def test_recipe_overrides_are_type_checked():
    recipe = load_run_recipe(RECIPE, ["search.n_trials=3", "height=96"])
    assert recipe.search.n_trials == 3 and recipe.height == 96
    with pytest.raises(ConfigError, match="n_trials"):
        load_run_recipe(RECIPE, ["search.n_trials=lots"])
    with pytest.raises(ConfigError, match="multiples of 32"):
        load_run_recipe(RECIPE, ["height=100"])
    with pytest.raises(ConfigError, match="bogus"):
        load_run_recipe(RECIPE, ["bogus=1"])


def test_shipped_recipes_load():
    for path in sorted(RECIPE.parent.glob("*.yaml")):
        if path.name in ("distill.yaml", "prune_to_budget.yaml", "finetune_own_footage.yaml", "standin_teacher.yaml"):
            continue  # other schemas (ffsc distill / prune / teacher train-standin), checked in their own tests
        load_run_recipe(path)


@pytest.mark.parametrize("rounds", [0, 1])
def test_report_latencies_side_by_side_or_cached_singly(rounds, tmp_path):
    import torch

    from compress.latency import LatencyCache
    from compress.pipeline import RunSummary
    from compress.pipeline.report import report_latencies
    from search_spaces import build_student, preset, save_student

    torch.manual_seed(0)
    save_student(build_student(preset("tiny")), tmp_path / "final")
    teacher = build_student(preset("tiny")).eval()
    recipe = load_run_recipe(RECIPE, [f"search.latency.report_rounds={rounds}", "search.latency.repeats=1",
                                      "search.latency.warmup=0", "height=32", "width=64", "progress=false"])
    summary = RunSummary(run_dir=tmp_path, teacher={}, final={"path": str(tmp_path / "final")})
    report_latencies(summary, recipe, teacher, torch.device("cpu"), tmp_path)
    assert summary.teacher["latency_ms"] > 0 and summary.final["latency_ms"] > 0
    for row in (summary.teacher, summary.final):  # each row says how it was timed
        assert row["latency_iters"] == teacher.cfg.iters
        assert (row["latency_backend"], row["latency_precision"]) == ("onnxruntime", "fp32")
    assert summary.latency["precision"] == "fp32" and summary.latency["device"] == "cpu"
    assert summary.latency["side_by_side"] is bool(rounds)
    record = tmp_path / "report_latency.json"
    if rounds == 0:  # each model once, through the run's latency cache
        assert not record.exists() and len(LatencyCache(tmp_path / "latency_cache.sqlite")) == 2
    else:
        saved = json.loads(record.read_text())
        assert saved["median_ms"] == {"teacher": summary.teacher["latency_ms"], "final": summary.final["latency_ms"]}
        stamp = record.stat().st_mtime
        report_latencies(summary, recipe, teacher, torch.device("cpu"), tmp_path)
        assert record.stat().st_mtime == stamp  # same models and settings: reused, not re-timed


def test_wall_time_adds_up_over_calls_and_a_failed_call_counts(tmp_path):
    import time

    from compress.pipeline.records import WallTime

    first = WallTime.open(tmp_path, time.perf_counter() - 10.0)  # a call that ran 10 s
    assert first.end()["calls"] == 1 and first.end() == first.ended  # recorded once
    second = WallTime.open(tmp_path, time.perf_counter() - 2.0)
    ended = second.end()
    assert ended["calls"] == 2 and ended["seconds_total"] == pytest.approx(first.ended["seconds"] + ended["seconds"])
    assert 2.0 <= ended["seconds"] < 10.0
    (tmp_path / "wall_time.json").write_text("{damaged")
    assert WallTime.open(tmp_path, time.perf_counter()).earlier_calls == 0  # unreadable: counting starts again


def test_a_call_that_fails_after_claiming_the_directory_still_counts(tmp_path, monkeypatch):
    import compress.pipeline.run as run

    def fail(*args, **kwargs):
        raise ConfigError("stage failed")

    monkeypatch.setattr(run, "_run_stages", fail)
    with pytest.raises(ConfigError, match="stage failed"):
        run.run_recipe(load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false"]))
    assert json.loads((tmp_path / "wall_time.json").read_text())["calls"] == 1
