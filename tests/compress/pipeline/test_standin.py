"""The stand-in teacher: training from a recipe (resumable, recorded), the shipped one, and how a run picks it."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.data.io import write_image
from compress.data.synthetic import SyntheticStereoDataset
from compress.errors import ConfigError
from compress.pipeline import load_run_recipe
from compress.pipeline.context import preflight
from compress.pipeline.standin import SHIPPED_DIR, load_standin, load_standin_recipe, train_standin
from compress.pipeline.teacher_stage import get_teacher
from search_spaces import load_student
from tests.paths import REPO

CPU = torch.device("cpu")


def _textures(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_image(folder / f"t{i}.png", rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    return folder


def _tiny(tmp_path: Path, *extra: str):
    return load_standin_recipe(REPO / "recipes" / "standin_teacher.yaml", [
        "preset=tiny", f"textures={_textures(tmp_path / 'tex')}", "data.synthetic.height=64",
        "data.synthetic.width=128", "data.synthetic.max_disp=24", "data.synthetic.max_disp_low=8",
        "data.synthetic.num_objects=2", "crop_size=[32,128]", "steps=4", "batch_size=1", "checkpoint_every=2",
        "eval.num_samples=1", *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_student(path).state_dict()


def test_recipe_file_and_errors():
    recipe = load_standin_recipe(REPO / "recipes" / "standin_teacher.yaml")
    assert recipe.preset == "standin_teacher" and recipe.data.synthetic.max_disp == 128
    assert recipe.crop_size[1] == recipe.data.synthetic.width  # full-width crops keep the whole disparity range
    with pytest.raises(ConfigError, match="key 'step'.*Did you mean: 'steps'"):
        load_standin_recipe(None, ["step=3"])
    with pytest.raises(ConfigError, match=r"crop_size \[512, 320\] is larger than the scenes"):
        load_standin_recipe(None, ["crop_size=[512,320]"])
    with pytest.raises(ConfigError, match="multiples of 32"):
        load_standin_recipe(None, ["crop_size=[100,320]"])
    with pytest.raises(ConfigError, match="key 'crop' was renamed to 'crop_size'"):
        load_standin_recipe(None, ["crop=[96,320]"])


def test_training_writes_a_loadable_teacher_and_its_record(tmp_path):
    out = train_standin(_tiny(tmp_path), tmp_path / "standin", CPU, progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 4 and len(record["textures"]) == 2 and record["train_seconds"] > 0
    assert record["recipe"]["preset"] == "tiny" and record["eval"]["gt/epe"] > 0
    assert not (out / "train_state.pt").exists()  # removed once the weights are final
    model, path = load_standin(str(out), CPU)
    assert path == out and model.cfg.name == "tiny"


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = train_standin(_tiny(tmp_path), tmp_path / "whole", CPU, progress=False)
    real_getitem = SyntheticStereoDataset.__getitem__

    def crash_at_step_3(self, index):
        if index == 3:  # batch 1: sample 3 is step 3's; the step-2 state is on disk by then
            raise KeyboardInterrupt
        return real_getitem(self, index)

    monkeypatch.setattr(SyntheticStereoDataset, "__getitem__", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_standin(_tiny(tmp_path), tmp_path / "crashed", CPU, progress=False)
    assert torch.load(tmp_path / "crashed" / "train_state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(SyntheticStereoDataset, "__getitem__", real_getitem)
    with pytest.raises(ConfigError, match="different recipe"):
        train_standin(_tiny(tmp_path, "optim.lr=5e-4"), tmp_path / "crashed", CPU, progress=False)
    resumed = train_standin(_tiny(tmp_path), tmp_path / "crashed", CPU, progress=False)
    ref = _weights(whole)
    assert all(torch.equal(v, ref[k]) for k, v in _weights(resumed).items())


def test_cli_trains_with_overrides(tmp_path, capsys):
    tex = _textures(tmp_path / "tex")
    args = ["teacher", "train-standin", str(REPO / "recipes" / "standin_teacher.yaml"), "preset=tiny",
            f"textures={tex}", "data.synthetic.height=64", "data.synthetic.width=128", "data.synthetic.max_disp=24",
            "data.synthetic.max_disp_low=8", "crop_size=[32,128]", "steps=2", "batch_size=1", "eval.num_samples=1",
            "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(args) == 0
    assert f"teacher.stand_in={tmp_path / 'cli'}" in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_shipped_teacher_is_present_and_loads():
    record = json.loads((SHIPPED_DIR / "training.json").read_text())
    model, path = load_standin("shipped", CPU)
    assert path == SHIPPED_DIR and model.cfg.max_disp >= 128
    # The record says how it was made: the repo's recipe, its photographs' hashes, the machine and the result.
    assert record["recipe"] == json.loads(json.dumps(record["recipe"])) and record["textures"]
    assert record["recipe"]["data"]["synthetic"]["max_disp"] == 128 and record["eval"]["gt/epe"] < 5


def test_the_shipped_teacher_lives_with_the_teacher_and_installs_as_package_data():
    """teacher/standin/, and pyproject's package-data globs carry each of its files into an install."""
    import tomllib

    assert SHIPPED_DIR == REPO / "teacher" / "standin"
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["teacher"]
    files = sorted(p.relative_to(REPO / "teacher").as_posix() for p in SHIPPED_DIR.iterdir())
    assert files == ["standin/config.yaml", "standin/model.safetensors", "standin/training.json"]
    assert all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_run_uses_the_shipped_teacher_or_a_named_one(tmp_path):
    recipe = load_run_recipe(REPO / "recipes" / "quickstart_cpu.yaml", [f"run_dir={tmp_path}"])
    assert recipe.teacher.stand_in == "shipped"
    info = get_teacher(recipe, tmp_path, CPU)
    assert not info.trained_here and info.path == SHIPPED_DIR
    assert info.identity["kind"] == "stand_in" and len(info.identity["weights_sha256"]) == 64
    assert "shipped stand-in teacher" in info.description and not (tmp_path / "teacher").exists()

    named = load_run_recipe(REPO / "recipes" / "quickstart_cpu.yaml", [f"teacher.stand_in={SHIPPED_DIR}"])
    assert get_teacher(named, tmp_path, CPU).identity == info.identity


def test_a_missing_stand_in_is_refused_before_any_work(tmp_path):
    recipe = load_run_recipe(REPO / "recipes" / "quickstart_cpu.yaml",
                             [f"teacher.stand_in={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"teacher\.stand_in='.*nowhere': no such folder, and not one of "
                                          r"'shipped', 'train'"):
        preflight(recipe)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="teacher.stand_in: got an empty value"):
        load_run_recipe(None, ['teacher.stand_in=""'])


def test_stand_in_train_trains_the_fallback_preset_here(tmp_path):
    recipe = load_run_recipe(REPO / "recipes" / "quickstart_cpu.yaml", [
        "teacher.stand_in=train", "teacher.train.preset=tiny", "teacher.train.steps=2",
        "teacher.train.batch_size=2", "data.train.num_samples=4", "progress=false"])
    info = get_teacher(recipe, tmp_path, CPU)
    assert info.trained_here and info.path == tmp_path / "teacher" and info.model.cfg.name == "tiny"
    assert (tmp_path / "teacher" / "teacher.json").is_file() and "trained here" in info.description
    again = get_teacher(recipe, tmp_path, CPU)  # reused, not retrained
    assert again.description == info.description
    assert all(torch.equal(v, info.model.state_dict()[k]) for k, v in again.model.state_dict().items())
