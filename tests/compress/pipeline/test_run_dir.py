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
from compress.errors import ConfigError
from compress.pipeline import load_run_recipe
from compress.pipeline.context import claim_run_dir
from compress.run_lock import LOCK_NAME, RunDirBusy, RunDirLock
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


def test_start_over_clears_the_directory_and_records_the_new_recipe(tmp_path):
    _recorded(tmp_path)
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "0.json").write_text("{}")
    changed = load_run_recipe(RECIPE, [f"run_dir={tmp_path}", "progress=false", "seed=3"])
    claim_run_dir(changed, tmp_path, start_over=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    assert "seed: 3" in (tmp_path / "recipe.yaml").read_text()


def test_overrides_after_options_say_where_they_belong(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["nas", str(RECIPE), "--run-dir", str(tmp_path / "x"), "search.n_trials=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search.n_trials=1" in err and "right after the recipe" in err
    assert not (tmp_path / "x").exists() and time.perf_counter() - started < 5  # refused before any work
    with pytest.raises(SystemExit):  # anything else unknown is still argparse's own error
        main(["nas", str(RECIPE), "--no-such-option"])
