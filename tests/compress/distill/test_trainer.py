"""Distillation trainer: losses fall and agreement with the teacher rises; a crashed run resumes bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data.datasets import build_dataset
from compress.distill.config import DistillConfig, LabelCacheConfig, TeacherRef, load_recipe
from compress.distill.label_cache import build_label_cache
from compress.distill.trainer import Trainer, distill
from compress.errors import ConfigError
from compress.evaluation import evaluate_student
from compress.models import resolve_model, student_from_spec, teacher_from_spec
from tests.paths import REPO

TINY_TEACHER = [
    "teacher.stand_in=random", "teacher.config.vit_size=vitt", "teacher.config.hidden_dims=[32,32,32]",
    "teacher.config.max_disp=64", "teacher.config.mixed_precision=false", "teacher.iters=2",
]
DATA = [
    "data.train.num_samples=4", "data.train.synthetic.height=32", "data.train.synthetic.width=64",
    "data.train.synthetic.max_disp=12", "data.train.synthetic.num_objects=2", "data.eval_samples=2",
]
TOY_STUDENT = ["student.kind=factory", "student.factory=tests.stereo_toy:make_toy", "student.config.seed=4"]
TINY_STUDENT = ["student.kind=search_space", "student.preset=tiny"]


def _overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", f"data.labels.folder={cache}", "data.labels.build=false", "progress=false",
        "data.labels.feature_levels=[0,1]",
        "train_iters=2", "eval_iters=2", "log_every=1", "eval_every=0", "optim.warmup_steps=2",
        *TINY_TEACHER, *DATA, *extra,
    ]


def _recipe(run_dir: Path, cache: Path, *extra: str) -> DistillConfig:
    return load_recipe(None, _overrides(run_dir, cache, *extra))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Labels of the tiny random teacher for the 4 synthetic training pairs (features at 1/4 and 1/8)."""
    root = tmp_path_factory.mktemp("labels")
    cfg = load_recipe(None, [*TINY_TEACHER, *DATA])
    teacher = teacher_from_spec(cfg.teacher)
    build_label_cache(
        teacher, build_dataset(cfg.data.train), root, LabelCacheConfig(feature_levels=[0, 1]), iters=2,
        progress=False,
    )
    return root


def _rows(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_distillation_lowers_every_loss_and_approaches_the_teacher(tmp_path: Path, cache: Path) -> None:
    # The toy student starts far from the random teacher (its outputs are ~30 px off), so progress shows within
    # a second; ground truth is left out because the random teacher and the ground truth disagree.
    cfg = _recipe(
        tmp_path / "run", cache, *TOY_STUDENT, "student.config.max_disp=12", "steps=60", "batch_size=2",
        "optim.lr=5e-3", "optim.min_lr_ratio=1.0", "loss.output.gt_weight=0", "checkpoint_every=30",
    )
    eval_set = Trainer(cfg).eval_set  # the first two training pairs with their cached teacher disparity
    before = evaluate_student(student_from_spec(cfg.student), eval_set, iters=2)
    result = distill(cfg)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 61))
    for name in ("feature", "cost_volume", "output_teacher", "init"):
        series = [r[f"loss/{name}"] for r in rows]
        first, last = np.mean(series[:5]), np.mean(series[-5:])
        assert 0 < last < 0.9 * first, (name, first, last)
    after = result.eval_metrics
    assert after["teacher/epe"] < 0.5 * before["teacher/epe"], (before, after)
    assert {"gt/epe", "gt/d1", "teacher/bp1"} <= set(after)
    # The saved student loads and reproduces the final evaluation.
    for saved in (result.student_path, result.checkpoint_path):  # student.pt, and the last checkpoint
        resolved = resolve_model(saved)
        assert resolved.kind == "student"
        assert evaluate_student(resolved.module, eval_set, iters=2) == pytest.approx(after)
    eval_rows = _rows(tmp_path / "run", "eval")
    assert eval_rows[-1]["step"] == 60 and eval_rows[-1]["eval/teacher/epe"] == pytest.approx(after["teacher/epe"])


def test_ground_truth_term_alone_learns(tmp_path: Path, cache: Path) -> None:
    cfg = _recipe(
        tmp_path / "run", cache, *TOY_STUDENT, "steps=12", "batch_size=2", "optim.lr=1e-2",
        "optim.min_lr_ratio=1.0", "loss.output.weight=0", "loss.output.init_weight=0", "loss.feature.enabled=false",
        "loss.cost_volume.enabled=false", "data.eval_samples=0",
    )
    distill(cfg)
    series = [r["loss/output_gt"] for r in _rows(tmp_path / "run")]
    assert np.mean(series[-3:]) < 0.7 * np.mean(series[:3]), series


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _same(x: torch.Tensor, y: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(x, y)
    # Across processes oneDNN may pick other kernels (memory alignment, thread pools): equal to float32 noise.
    return torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6)


def _assert_same_run(a: Path, b: Path, exact: bool = True) -> None:
    sa, sb = _state(a), _state(b)
    assert sa["step"] == sb["step"]
    for part in ("model", "adapters"):
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            assert _same(sa[part][k], sb[part][k], exact), f"{part}.{k} differs"
    for k, v in sa["optimizer"]["state"].items():
        for name, t in v.items():
            assert _same(t, sb["optimizer"]["state"][k][name], exact), f"optimizer {k}.{name} differs"


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def callback(kind: str, at: int, metrics: dict) -> None:
        if kind == "train" and at == step:
            raise _Crash(f"simulated crash at step {at}")

    return callback


@pytest.mark.parametrize("student", ["toy", pytest.param("tiny", marks=pytest.mark.slow)])
def test_crashed_run_resumes_to_the_same_weights(tmp_path: Path, cache: Path, student: str, capsys) -> None:
    # batch 1 over 4 pairs: 4 steps per epoch, so the step-6 checkpoint resumes in the middle of epoch 1, with
    # random crops and colour jitter drawn per (seed, epoch, index).
    steps = ["steps=8", "checkpoint_every=3"] if student == "toy" else ["steps=4", "checkpoint_every=2"]
    overrides = [
        *(TOY_STUDENT if student == "toy" else TINY_STUDENT), *steps, "batch_size=1", "data.crop_size=[32,32]",
        "data.jitter_prob=0.5", "optim.lr=1e-3", "data.eval_samples=1", "eval_every=2", "train_iters=1",
    ]
    whole = distill(_recipe(tmp_path / "whole", cache, *overrides))
    crash_step = 7 if student == "toy" else 3
    with pytest.raises(_Crash):
        distill(_recipe(tmp_path / "crashed", cache, *overrides), callbacks=[_crash_at(crash_step)])
    capsys.readouterr()
    resumed = distill(_recipe(tmp_path / "crashed", cache, *overrides, "progress=true"))  # progress: free on resume
    assert resumed.resumed_from == (6 if student == "toy" else 2)
    total = 8 if student == "toy" else 4
    assert f"resuming from step {resumed.resumed_from} of {total}" in capsys.readouterr().out  # says what is redone
    _assert_same_run(tmp_path / "whole", tmp_path / "crashed")
    assert resumed.eval_metrics == whole.eval_metrics
    # The log holds every step once, as an uninterrupted run's does.
    assert [r["step"] for r in _rows(tmp_path / "crashed")] == [r["step"] for r in _rows(tmp_path / "whole")]
    if student == "tiny":
        assert (tmp_path / "crashed" / "student" / "model.safetensors").is_file()
        loaded = resolve_model(resumed.student_path).module
        ref = _state(tmp_path / "whole")["model"]
        assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path: Path, cache: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 3\nbatch_size: 1\ndata:\n  crop_size: [32, 32]\n  eval_samples: 0\n")
    args = _overrides(tmp_path / "killed", cache, *TOY_STUDENT, "steps=60", "checkpoint_every=10", "train_iters=1",
                      "log_every=10")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "distill", str(recipe), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-checkpoint or mid-log
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    resumed = distill(load_recipe(recipe, args))
    assert resumed.resumed_from is not None and 0 < resumed.resumed_from < 60
    distill(load_recipe(recipe, [*args, f"run_dir={tmp_path / 'whole'}"]))
    # The killed part ran in another process; the in-process crash test above checks bitwise equality.
    _assert_same_run(tmp_path / "whole", tmp_path / "killed", exact=False)


def test_recipe_loading_checks_types_and_keys() -> None:
    cfg = load_recipe(REPO / "recipes" / "distill.yaml", ["steps=7", "optim.lr=1e-3", "data.crop_size=[64,128]"])
    assert isinstance(cfg, DistillConfig) and isinstance(cfg.teacher, TeacherRef)
    assert cfg.steps == 7 and cfg.optim.lr == 1e-3 and cfg.data.crop_size == [64, 128]
    assert cfg.student.preset == "fast_foundationstereo"
    with pytest.raises(ConfigError, match="steps"):
        load_recipe(REPO / "recipes" / "distill.yaml", ["steps=many"])
    with pytest.raises(ConfigError, match="stepz"):
        load_recipe(REPO / "recipes" / "distill.yaml", ["stepz=3"])
    with pytest.raises(ConfigError, match="multiples of 32"):
        load_recipe(REPO / "recipes" / "distill.yaml", ["data.crop_size=[30,64]"])
    with pytest.raises(ConfigError, match="amp"):
        load_recipe(REPO / "recipes" / "distill.yaml", ["amp=fp8"])


def test_resuming_with_another_config_is_refused(tmp_path: Path, cache: Path) -> None:
    overrides = [*TOY_STUDENT, "batch_size=2", "data.eval_samples=0"]
    distill(_recipe(tmp_path / "run", cache, *overrides, "steps=2"))
    with pytest.raises(ConfigError, match="optim.lr"):
        Trainer(_recipe(tmp_path / "run", cache, *overrides, "steps=2", "optim.lr=1e-2"))
    with pytest.raises(ConfigError, match="prob"):
        Trainer(_recipe(tmp_path / "other", cache, *overrides, "data.labels.prob=topk"))
    # Extending the run is allowed: it continues from step 2.
    result = distill(_recipe(tmp_path / "run", cache, *overrides, "steps=3"))
    assert result.resumed_from == 2 and result.steps == 3


def test_a_checkpoint_written_before_the_teacher_keys_moved_resumes(tmp_path: Path, cache: Path) -> None:
    overrides = [*TOY_STUDENT, "batch_size=2", "data.eval_samples=0"]
    distill(_recipe(tmp_path / "run", cache, *overrides, "steps=2"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    config = state["config"]  # as TeacherSpec wrote it: the label cache and the random init under ``teacher``
    labels = config["data"].pop("labels")
    teacher = config["teacher"]
    config["teacher"] = {"checkpoint": None, "config": teacher["config"], "trust_checkpoint": False,
                         "allow_random_init": True, "init_seed": 0, "label_cache": labels.pop("folder"),
                         "build_cache": labels.pop("build"), "cache": labels, "iters": teacher["iters"]}
    torch.save(state, path)
    result = distill(_recipe(tmp_path / "run", cache, *overrides, "steps=3"))
    assert result.resumed_from == 2 and result.steps == 3
    state = torch.load(path, weights_only=True)
    state["config"]["data"]["labels"]["prob"] = "topk"  # a real difference still refuses
    torch.save(state, path)
    with pytest.raises(ConfigError, match="data.labels.prob"):
        Trainer(_recipe(tmp_path / "run", cache, *overrides, "steps=4"))


def test_a_checkpoint_written_before_student_model_was_named_resumes(tmp_path: Path, cache: Path) -> None:
    distill(_recipe(tmp_path / "first", cache, *TOY_STUDENT, "batch_size=2", "data.eval_samples=0", "steps=2"))
    start = tmp_path / "first" / "student.pt"
    overrides = [*TOY_STUDENT, f"student.model={start}", "batch_size=2", "data.eval_samples=0"]
    distill(_recipe(tmp_path / "run", cache, *overrides, "steps=2"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    student = state["config"]["student"]
    student["init_checkpoint"] = student.pop("model")  # as the trainer wrote it before the rename
    torch.save(state, path)
    assert isinstance(resolve_model(path).module, torch.nn.Module)  # the old checkpoint reads as a model too
    result = distill(_recipe(tmp_path / "run", cache, *overrides, "steps=3"))
    assert result.resumed_from == 2 and result.steps == 3
    with pytest.raises(ConfigError, match="student.model"):  # another starting model is still another run
        Trainer(_recipe(tmp_path / "run", cache, *TOY_STUDENT, "student.model=null", "batch_size=2",
                        "data.eval_samples=0", "steps=4"))
