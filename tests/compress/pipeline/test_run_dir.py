"""The run directory is a unit: one process at a time (a lock naming its holder, taken over from a dead one), and a
resume that would mix two recipes' results is refused before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from compress.cli import main
from compress.data import SyntheticConfig, write_synthetic_dataset
from compress.errors import ConfigError
from compress.pipeline import finish, load_run_recipe, prepare_run
from compress.pipeline.context import claim_run_dir, record_recipe
from compress.run_lock import LOCK_NAME, RunDirBusy, RunDirLock
from compress.tracking import Tracker
from tests.paths import REPO

RECIPE = REPO / "recipes" / "quickstart_cpu.yaml"


def _holder_process(run_dir) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until killed; returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from compress.run_lock import RunDirLock
        RunDirLock({str(run_dir)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_with_the_holders_name_and_the_lock_is_taken_over_after_a_kill(tmp_path):
    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by process {proc.pid}\b.*since"):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = []
    with RunDirLock(tmp_path, say=lines.append):  # the kernel dropped the dead process's lock; its name is left
        assert len(lines) == 1 and f"left by process {proc.pid}" in lines[0] and "no longer running" in lines[0]
        with pytest.raises(RunDirBusy, match=f"process {os.getpid()}"):  # held by us now: a second open is refused
            RunDirLock(tmp_path).acquire()
    lines.clear()
    with RunDirLock(tmp_path, say=lines.append):  # a clean release leaves no name behind: nothing to say
        pass
    assert lines == [] and (tmp_path / LOCK_NAME).read_text() == ""


def test_ffsc_run_on_a_directory_in_use_says_who_holds_it_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = _holder_process(run_dir)
    try:
        before = sorted(p.name for p in run_dir.iterdir())
        assert main(["run", str(RECIPE), f"run_dir={run_dir}", "progress=false"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by process {proc.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in run_dir.iterdir()) == before == [LOCK_NAME]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _recorded(tmp_path, *overrides: str):
    recipe = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false", *overrides])
    claim_run_dir(recipe, tmp_path)
    record_recipe(recipe, tmp_path)
    return recipe


def test_a_resume_with_a_key_that_changes_results_is_refused_by_name(tmp_path):
    _recorded(tmp_path)
    record = (tmp_path / "recipe.yaml").read_bytes()
    changed = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false", "seed=3", "data.train.num_samples=9"])
    with pytest.raises(ConfigError, match=r"another recipe \(data\.train\.num_samples: \d+ -> 9, seed: 0 -> 3\).*"
                                          r"--start-over"):
        claim_run_dir(changed, tmp_path)
    assert (tmp_path / "recipe.yaml").read_bytes() == record  # the record of the first run is untouched


def test_a_recipe_recorded_before_the_teacher_keys_moved_is_compared_in_todays_keys(tmp_path):
    _recorded(tmp_path)
    record = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    train = record["teacher"].pop("train")  # as TeacherStage recorded it: the stand-in's training flat in teacher
    record["teacher"].update(fallback_preset=train["preset"], fallback_overrides=train["overrides"],
                             train_steps=train["steps"], train_batch_size=train["batch_size"], optim=train["optim"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(record))
    _recorded(tmp_path)  # the same recipe: resumed
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(record))
    changed = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false", "teacher.train.steps=7"])
    with pytest.raises(ConfigError, match=r"another recipe \(teacher\.train\.steps: 120 -> 7\)"):
        claim_run_dir(changed, tmp_path)


def test_keys_that_change_no_result_and_later_stages_may_change_on_resume(tmp_path):
    _recorded(tmp_path)
    again = _recorded(tmp_path, "search.n_trials=40", "distill.steps=7", "prune.ratio=0.5", "tracking.experiment=x",
                      "real_pairs.height=64", "search.latency.report_rounds=1")
    text = (tmp_path / "recipe.yaml").read_text()
    assert "n_trials: 40" in text and again.distill.steps == 7  # the record follows the run that goes on


def test_start_over_deletes_what_ffsc_made_and_keeps_the_rest(tmp_path, capsys):
    _recorded(tmp_path)
    made = ["trials/0000/student.json", "optuna.db", "optuna.db-wal", "mlflow.db", "labels/train/manifest.json",
            "summary.json", "wall_time.json", "search/pareto_front.csv"]
    for name in [*made, "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    changed = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false", "seed=3"])
    claim_run_dir(changed, tmp_path, start_over=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the user's own file stays
    assert "9 earlier entries removed; kept what ffsc did not make: notes.txt" in capsys.readouterr().out
    record_recipe(changed, tmp_path)  # the run then records its recipe as its first stage starts
    assert "seed: 3" in (tmp_path / "recipe.yaml").read_text()


def test_start_over_refuses_a_folder_that_is_not_a_run_directory_and_deletes_nothing(tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "photos").mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    (folder / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = _files(folder)
    assert main(["run", str(RECIPE), f"run_dir={folder}", "progress=false", "--start-over"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an ffsc run directory" in err and "nothing was deleted" in err
    assert _files(folder) == before and not (folder / LOCK_NAME).exists()  # not even the lock file


def _files(root) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (folders show through their files)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _finished_run(run_dir) -> dict[str, bytes]:
    """A finished run as a resume finds it: its recorded recipe, wall time, summary, study and lock file."""
    ctx = prepare_run(load_run_recipe(RECIPE, [f"run_dir={run_dir}", "progress=false", "search.distill_steps=2"]))
    record_recipe(ctx.recipe, run_dir)  # as ffsc run records it: checked, 'auto' resolved
    (run_dir / "wall_time.json").write_text('{"seconds": 5.0, "seconds_total": 5.0, "calls": 1}')
    (run_dir / "summary.json").write_text('{"front": []}')
    (run_dir / "optuna.db").write_bytes(b"SQLite format 3\x00")
    (run_dir / LOCK_NAME).write_text("")
    return _files(run_dir)


# Each names what is wrong before any work, and so before the finished run's record is touched.
LATE_FAILURES = [
    ("search.storage=foo://x", "search.storage: unknown storage scheme 'foo'"),
    ("tracking.uri=ftp://nowhere", "tracking.uri='ftp://nowhere': MLflow has no tracking store for scheme 'ftp'"),
    ("search.sampler=nsga3x", "expected one of ['tpe', 'nsga2', 'random']; did you mean 'nsga2'?"),
    ("search.error_metric=teacher/epee", "did you mean 'teacher/epe'?"),
    ("teacher.stand_in=shiped", "not one of 'shipped', 'train' (the shipped stand-in, one trained here); expected "
                                "one of those or a saved student folder; did you mean 'shipped'?"),
    ("search.parent=larget", "not one of 'auto', 'teacher', 'largest' (the teacher when it is of the student family, "
                             "the teacher, the space's largest member distilled here); expected one of those or a "
                             "saved student folder; did you mean 'largest'?"),
]


@pytest.mark.parametrize(("override", "message"), LATE_FAILURES, ids=[o for o, _ in LATE_FAILURES])
def test_a_failing_call_leaves_a_finished_run_byte_identical(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    before = _finished_run(run_dir)
    assert main(["run", str(RECIPE), f"run_dir={run_dir}", "progress=false", "search.distill_steps=2", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert _files(run_dir) == before


def test_nas_resuming_another_recipe_is_refused_by_name_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    before = _finished_run(run_dir)
    assert main(["nas", str(RECIPE), "progress=false", "search.distill_steps=3", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another recipe (search.distill_steps: 2 -> 3)" in err
    assert _files(run_dir) == before


@pytest.mark.parametrize("command", ["nas", "distill"])
def test_nas_and_distill_on_a_directory_in_use_say_who_holds_it_and_write_nothing(tmp_path, capsys, command):
    run_dir = tmp_path / "run"
    proc = _holder_process(run_dir)
    distill_recipe = tmp_path / "distill.yaml"
    (tmp_path / "labels").mkdir()
    distill_recipe.write_text(f"steps: 1\ndata:\n  labels:\n    folder: {tmp_path / 'labels'}\n    build: false\n")
    args = (["nas", str(RECIPE), "progress=false", "--run-dir", str(run_dir)] if command == "nas" else
            ["distill", str(distill_recipe), f"run_dir={run_dir}"])
    try:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by process {proc.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_overrides_after_options_say_where_they_belong(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["nas", str(RECIPE), "--run-dir", str(tmp_path / "x"), "search.n_trials=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search.n_trials=1" in err and "right after the recipe" in err
    assert not (tmp_path / "x").exists() and time.perf_counter() - started < 5  # refused before any work
    with pytest.raises(SystemExit):  # anything else unknown is still argparse's own error
        main(["nas", str(RECIPE), "--no-such-option"])


def test_a_prune_stopped_mid_way_is_said_to_start_again(tmp_path, capsys, monkeypatch):
    recipe = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false", "prune.enabled=true", "prune.ratio=0.5"])
    (tmp_path / "prune" / "steps").mkdir(parents=True)  # what a killed prune left: files, no prune_result.json
    started = []

    def prune_to_budget(cfg, **kwargs):  # pruning itself is test_budget's; here only what is said before it
        started.append(cfg.run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(finish, "prune_to_budget", prune_to_budget)
    with pytest.raises(KeyboardInterrupt):
        finish.prune_chosen(recipe, tmp_path, tmp_path / "student", None, "cpu", Tracker(tmp_path))
    assert started == [str(tmp_path / "prune")]
    assert capsys.readouterr().out == "[ffsc] prune: an earlier run stopped mid-way; pruning again from the start\n"
    (tmp_path / "prune" / "steps").rmdir()
    with pytest.raises(KeyboardInterrupt):  # a first prune: nothing to say
        finish.prune_chosen(recipe, tmp_path, tmp_path / "student", None, "cpu", Tracker(tmp_path))
    assert capsys.readouterr().out == ""


def test_a_ground_truth_metric_on_held_out_pairs_without_it_is_refused_before_any_work(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(data, 2, SyntheticConfig(height=64, width=128, max_disp=16, num_objects=1), progress=False)
    for gt in data.glob("*/disp0GT.pfm"):
        gt.unlink()  # pairs only: no ground truth
    run_dir = tmp_path / "run"
    assert main(["run", str(RECIPE), f"run_dir={run_dir}", "progress=false", "search.error_metric=gt/epe",
                 f"data.eval.path={data}", "data.eval.kind=auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of its 2 pairs has a ground-truth disparity" in err
    assert "use search.error_metric=teacher/epe" in err and not run_dir.exists()
