"""The search objective's parent and trials: the parent's distillation says what it does, shows progress in a log,
resumes when killed and leaves one copy of its weights; it is ordered at the check size on the search device; a
trial keeps no training state, finished or failed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

import compress.nas.objective as objective_module
from compress.distill import distill
from compress.distill.trainer import CHECKPOINT_NAME
from compress.nas.inherit import CHECK_SIZE, parent_config
from compress.nas.objective import StudentSearchObjective, TrialSettings
from compress.pipeline import load_run_recipe, prepare_labels
from compress.pipeline.search import trial_settings
from search_spaces import build_student, load_space, preset, save_student
from tests.paths import REPO

SYNTH = "synthetic: {height: 64, width: 128, max_disp: 24, num_objects: 2"


def _settings(run_dir: Path, *overrides: str, **changes) -> TrialSettings:
    recipe = load_run_recipe(REPO / "recipes" / "quickstart_cpu.yaml", [
        f"run_dir={run_dir}", "search.parent=largest", "search.space=tiny", "search.proxy=inherit",
        f"data.train={{kind: synthetic, num_samples: 2, {SYNTH}, seed: 0}}}}",
        f"data.eval={{kind: synthetic, num_samples: 1, {SYNTH}, seed: 1000}}}}",
        "search.latency={mode: measured, backend: onnxruntime, warmup: 1, repeats: 1, threads: 1}",
        "search.distill_steps=1", "search.batch_size=1", *overrides,
    ])
    torch.manual_seed(0)
    teacher = SimpleNamespace(model=build_student(preset("tiny")).eval(), identity={"name": "test-teacher"})
    labels_dir, eval_set = prepare_labels(recipe, run_dir, teacher, torch.device("cpu"))
    return dataclasses.replace(trial_settings(recipe, run_dir, labels_dir, eval_set, torch.device("cpu")), **changes)


class _Killed(Exception):
    pass


def _unordered(monkeypatch) -> None:
    """Skip the parent's importance ordering (it permutes channels only; ~80 forwards a test need not pay)."""
    monkeypatch.setattr(objective_module, "order_by_importance", lambda parent, **kwargs: {})


def test_a_killed_parent_distillation_resumes_from_its_checkpoint_and_leaves_one_copy(tmp_path, monkeypatch, capsys):
    settings = _settings(tmp_path, "progress=true", "search.parent_steps=10")
    assert settings.progress  # the run's progress setting reaches the parent
    results, kill_at = [], [5]

    def killed_after_checkpoint(kind: str, step: int, metrics: dict) -> None:
        if kind == "checkpoint" and kill_at and step == kill_at[0]:
            raise _Killed(f"killed after the checkpoint of step {step}")

    def recording_distill(cfg, callbacks=()):
        results.append(distill(cfg, callbacks=[killed_after_checkpoint]))
        return results[-1]

    monkeypatch.setattr(objective_module, "distill", recording_distill)
    with pytest.raises(_Killed):
        StudentSearchObjective(load_space("tiny"), settings).parent()
    parent_dir = tmp_path / "parent"
    assert (parent_dir / CHECKPOINT_NAME).is_file() and not (parent_dir / "student").exists()
    out = capsys.readouterr().out
    assert f"parent: distilling tiny-parent (the space's largest member) for 10 steps, checkpointed every 1 step in " \
           f"{parent_dir}" in out

    # The rerun (a resumed `ffsc run`) picks the distillation up at its checkpoint.
    kill_at.clear()
    _unordered(monkeypatch)
    StudentSearchObjective(load_space("tiny"), settings).parent()
    assert results[-1].resumed_from == 5 and results[-1].steps == 10
    captured = capsys.readouterr()
    assert "resuming from step 5 of 10" in captured.out
    # Not a terminal: the bar is plain lines (one when it starts, one at the end, one per 30 s between).
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("distilling: ")]
    assert lines and lines[0].startswith("distilling: 5/10 (50%)") and lines[-1].startswith("distilling: 10/10 (100%)")
    # Once finished, the parent keeps its weights once: no optimiser checkpoint beside them.
    weights = sorted(p.relative_to(parent_dir).as_posix() for p in parent_dir.rglob("*")
                     if p.suffix in (".pt", ".pth", ".safetensors"))
    assert weights == ["student/model.safetensors"]


def test_a_quiet_run_distils_its_parent_without_a_line(tmp_path, monkeypatch, capsys):
    settings = _settings(tmp_path, "progress=false", "search.parent_steps=2")
    _unordered(monkeypatch)
    StudentSearchObjective(load_space("tiny"), settings).parent()
    captured = capsys.readouterr()
    assert "parent:" not in captured.out and "distilling:" not in captured.err
    assert not (tmp_path / "parent" / CHECKPOINT_NAME).exists()


def test_a_failed_trial_keeps_no_training_state(tmp_path, monkeypatch):
    settings = _settings(tmp_path, "progress=false", "search.parent_steps=2")
    _unordered(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(objective_module, "evaluate_student", broken)
    trial = optuna.create_study(directions=["minimize", "minimize"]).ask()
    with pytest.raises(RuntimeError, match="evaluation failed"):
        StudentSearchObjective(load_space("tiny"), settings)(trial)
    trial_dir = tmp_path / "trials" / f"{trial.number:04d}"
    assert (trial_dir / "student").is_dir()  # it got as far as its distilled student
    assert not (trial_dir / CHECKPOINT_NAME).exists() and not (trial_dir / "inherited").exists()


@pytest.mark.slow  # ~80 forwards of the parent (one per channel group)
def test_the_parent_is_ordered_on_the_search_device_at_the_check_size_with_one_iteration(tmp_path, monkeypatch):
    parent_dir = save_student(build_student(parent_config(load_space("tiny"))), tmp_path / "trained")
    settings = _settings(tmp_path, "progress=false", parent=parent_dir)
    seen: list[tuple] = []
    real_order = objective_module.order_by_importance

    def spy(parent, *args, **kwargs):
        def record(module, inputs, kw):
            device = next(module.parameters()).device
            if device.type != "meta":  # the dependency graph is traced on a meta copy, hooks and all
                seen.append((device, tuple(inputs[0].shape[-2:]), kw.get("iters")))

        handle = parent.register_forward_pre_hook(record, with_kwargs=True)
        try:
            return real_order(parent, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(objective_module, "order_by_importance", spy)
    parent = StudentSearchObjective(load_space("tiny"), settings).parent()
    assert len(seen) > 1 and set(seen) == {(torch.device(settings.device), CHECK_SIZE, 1)}
    assert next(parent.parameters()).device.type == "cpu"  # kept on the CPU, where trials slice it
