"""``ffsc run`` with an official-format FoundationStereo checkpoint reaches summary.json (it once crashed in the final
table: the official config has ``valid_iters``, not ``iters``), the teacher timed at the iterations it labels with."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from tests.paths import REPO
from tests.reference_weights import rule_state_dict

RECIPE = REPO / "recipes" / "fast_foundationstereo_nas.yaml"
_SYNTH = "synthetic: {height: 64, width: 128, max_disp: 24, num_objects: 2"
SYNTHETIC_DATA = [  # in place of the recipe's FSD folders
    f"data.train={{kind: synthetic, path: null, limit: null, num_samples: 2, {_SYNTH}, seed: 0}}}}",
    f"data.eval={{kind: synthetic, path: null, options: {{}}, num_samples: 1, {_SYNTH}, seed: 1000}}}}",
]


def _official_checkpoint(folder: Path) -> Path:
    """A small official-format checkpoint (vits, narrow GRU) with the reference rule's weights, cfg.yaml beside it."""
    from teacher import FoundationStereo, TeacherConfig

    cfg = {"vit_size": "vits", "hidden_dims": [32, 32, 32], "n_gru_layers": 3, "n_downsample": 2, "corr_levels": 2,
           "corr_radius": 4, "max_disp": 64, "mixed_precision": False, "low_memory": 0, "valid_iters": 3}
    folder.mkdir(parents=True)
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with torch.device("meta"):
        template = FoundationStereo(TeacherConfig.from_dict(cfg)).state_dict()
    template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.items()}
    torch.save({"model": rule_state_dict(template)}, folder / "model_best_bp2.pth")
    return folder / "model_best_bp2.pth"


def test_the_gpu_recipe_runs_to_the_end_with_an_official_checkpoint(tmp_path, capsys):
    ckpt = _official_checkpoint(tmp_path / "weights")
    run_dir = tmp_path / "run"
    code = main(["run", str(RECIPE), f"run_dir={run_dir}", f"teacher.checkpoint={ckpt}", "teacher.iters=null",
                 "height=64", "width=128", "device=cpu", "progress=false", "search.space=tiny", *SYNTHETIC_DATA,
                 "data.labels={prob: full, feature_levels: [0], disp_dtype: float32}", "data.size=null",
                 "search.n_trials=2", "search.distill_steps=1", "search.parent_steps=1", "search.batch_size=1",
                 "search.budget_ms=null", "distill.steps=1", "distill.batch_size=1", "export.formats=[onnx]",
                 "search.latency={mode: measured, backend: torch, precision: fp32, warmup: 1, repeats: 1, "
                 "report_rounds: 1}", "real_pairs.height=64", "loss.output.max_disp=64"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    teacher = summary["teacher"]
    assert teacher["description"].startswith("FoundationStereo vits")
    assert teacher["iters"] == 3  # valid_iters of its cfg.yaml: labelled, timed and scored at the same count
    assert teacher["latency_ms"] > 0 and teacher["gmacs"] > 0 and teacher["real_bp2"] >= 0
    timed = json.loads((run_dir / "report_latency.json").read_text())["settings"]["iters"]
    assert timed["teacher"] == 3
    labelled = json.loads((run_dir / "labels" / "train" / "manifest.json").read_text())
    assert labelled["labels"]["iters"] == 3
    assert summary["final"]["latency_ms"] > 0 and (run_dir / "export" / "student.onnx").is_file()
    assert (run_dir / "parent" / "student" / "model.safetensors").is_file()  # not of the family: 'largest'
    # Every row names the count it was scored, counted and timed at, and the backend and precision it was timed on.
    rows = {"teacher": teacher, "final": summary["final"], **{f"trial {r['trial']}": r for r in summary["front"]}}
    for name, row in rows.items():
        assert row["iters"] == row["latency_iters"] == timed[name], name
        assert (row["latency_backend"], row["latency_precision"], row["latency_mode"]) == ("torch", "fp32",
                                                                                          "measured"), name
    from search_spaces import count_macs
    from teacher import load_teacher

    # The teacher's MACs at the 3 iterations it was timed at (once counted at another count: a 4x wrong ratio).
    assert teacher["gmacs"] == pytest.approx(count_macs(load_teacher(ckpt), 64, 128, iters=3).gmacs)
    threads = torch.get_num_threads()
    assert summary["latency"] == {
        "backend": "torch", "device": "cpu", "precision": "fp32", "threads": threads, "mode": "measured",
        "clock": "wall", "compile": False, "cuda_graph": False, "size": [64, 128], "side_by_side": True}
    out = capsys.readouterr().out
    assert f"latency: torch on cpu, fp32, {threads} thread{'' if threads == 1 else 's'} (named in the config)" in out
    assert "results at 64x128 (height x width)" in out
    assert summary["calls"] == 1 and summary["seconds_total"] == summary["seconds"] > 0


def test_the_gpu_recipe_with_its_engine_export_is_refused_before_any_work_without_tensorrt(tmp_path, capsys):
    ckpt = _official_checkpoint(tmp_path / "weights")
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    assert main(["run", str(RECIPE), f"run_dir={run_dir}", f"teacher.checkpoint={ckpt}", "device=cpu",
                 *SYNTHETIC_DATA, "search.latency.backend=torch", "search.latency.precision=fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export.formats" in err and "TensorRT" in err and "Traceback" not in err
    assert time.perf_counter() - started < 60 and not run_dir.exists()  # nothing labelled, nothing written


def test_the_teachers_count_is_teacher_iters_else_its_own_and_the_old_keys_name_it():
    from compress.errors import ConfigError
    from compress.pipeline import load_run_recipe, teacher_iters
    from teacher import FoundationStereo, TeacherConfig

    with torch.device("meta"):
        official = FoundationStereo(TeacherConfig(vit_size="vits", hidden_dims=[32, 32, 32], valid_iters=3))
    for overrides, want in ((["teacher.iters=null"], 3), (["teacher.iters=2"], 2), ([], 32)):
        assert teacher_iters(load_run_recipe(RECIPE, overrides), official) == want, overrides
    # One key labels, prunes against, times and scores the teacher: the others it replaced fail in one line.
    for old in ("data.labels.iters=8", "prune.distill.teacher_iters=8", "data.labels={iters: 8}"):
        with pytest.raises(ConfigError, match="was renamed to 'teacher.iters'"):
            load_run_recipe(RECIPE, [old])
