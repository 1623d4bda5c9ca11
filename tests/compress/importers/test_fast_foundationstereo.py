"""``ffsc import fast-foundationstereo``: parity with the official code, round trips, and one-line errors.

The checkpoints in tests/data/ffs were built and run with the official code (tests/data/ffs/make_reference.py,
pinned commit in tests/data/ffs/COMMIT): ``code_topology`` is the topology the code builds, ``released_like``
has pruned widths and the correlation without normalisation, as the smaller releases do; ``searched_variant``
has cost-volume stages replaced by the official searched blocks (ForwardHelper / PostForwardHelper).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.cli import main
from compress.errors import CheckpointError
from compress.importers import import_fast_foundationstereo
from search_spaces import load_student
from search_spaces.serialization import load_model
from tests.paths import DATA as TEST_DATA
from tests.paths import REPO

DATA = TEST_DATA / "ffs"
CKPT = "model_best_bp2_serialize.pth"


def _reference():
    ref = np.load(DATA / "reference.npz")
    return torch.from_numpy(ref["left"]), torch.from_numpy(ref["right"]), int(ref["iters"]), ref


@pytest.mark.parametrize("case", ["code_topology", "released_like", "searched_variant"])
def test_imported_model_matches_the_official_forward(case: str, tmp_path: Path) -> None:
    left, right, iters, ref = _reference()
    import_fast_foundationstereo(DATA / case / CKPT, tmp_path / "student")
    model = load_student(tmp_path / "student")  # what every other command loads
    with torch.no_grad():
        out = model(left, right, iters=iters, return_intermediates=True)
    init_err = (out.init_disp - torch.from_numpy(ref[f"{case}/init_disp"])).abs().max().item()
    disp_err = (out.disp - torch.from_numpy(ref[f"{case}/disp"])).abs().max().item()
    assert init_err < 1e-4 and disp_err < 1e-4, (init_err, disp_err)
    assert float(out.disp.std()) > 1.0  # a real disparity map, not a constant both sides agree on


def test_released_widths_and_flags_are_recorded(tmp_path: Path) -> None:
    model = import_fast_foundationstereo(DATA / "released_like" / CKPT, tmp_path / "s", name="mine")
    cfg = model.cfg
    assert cfg.name == "mine" and cfg.gwc_normalize is False and cfg.attention_heads_as_sequence
    assert cfg.motion_conv_kernel == 1 and cfg.hidden_dim == 16 and cfg.max_disp == 64
    enc = model.update_block.encoder
    assert (enc.convc1.out_channels, enc.convc2.out_channels, enc.convd2.out_channels) == (24, 40, 8)
    assert model.cost_agg.conv_out[0].conv1[0].out_channels == 4  # a pruned APC hidden width
    report = json.loads((tmp_path / "s" / "import_report.json").read_text())
    assert "update_block.encoder.convc2" in report["pruned_layers"]  # 24 -> 40, unlike the code's equal pair
    assert report["dropped_unused_layers"] == ["context_zqr_convs"]
    # Same tensors after a save/load round trip through the generic loader.
    again = load_model(tmp_path / "s")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    code = import_fast_foundationstereo(DATA / "code_topology" / CKPT, tmp_path / "c").cfg
    assert code.gwc_normalize and code.motion_corr_dim == 256 and code.volume_dim == 8


def test_searched_blocks_become_volume_blocks_and_round_trip(tmp_path: Path) -> None:
    model = import_fast_foundationstereo(DATA / "searched_variant" / CKPT, tmp_path / "s")
    blocks = model.cfg.volume_blocks
    assert blocks["corr_stem"] == {"kind": "identity"} and blocks["cost_agg.conv1"] == {"kind": "identity"}
    assert blocks["cost_agg.post8_to_4"]["kind"] == "merge" and blocks["cost_agg.agg_0"] == {"kind": "absent"}
    kernels = [layer["kernel_disp"] for layer in blocks["cost_agg.feature_att_16"]["layers"] if layer["type"] == "apc"]
    assert kernels == [13, 3]
    up = blocks["cost_agg.post32_to_16"]["upsample"][0]
    assert up["deconv"] and up["output_padding"] == [1, 1, 1]
    assert blocks["cost_agg.post8_to_4"]["upsample"][0]["relu"] is False
    assert model.cost_agg.agg_0 is None and "cost_agg.agg_0.0.conv.weight" not in model.state_dict()
    again = load_model(tmp_path / "s")
    assert again.cfg.volume_blocks == blocks
    left, right, iters, _ = _reference()
    with torch.no_grad():
        assert torch.equal(model(left, right, iters=iters, test_mode=True), again(left, right, iters=iters,
                                                                                  test_mode=True))


def _pair(d: Path) -> None:
    left, right, _, _ = _reference()
    for name, img in (("left", left), ("right", right)):
        Image.fromarray(img[0].permute(1, 2, 0).numpy().astype(np.uint8)).save(d / f"{name}.png")


def test_cli_import_then_export_and_infer(tmp_path: Path, capsys) -> None:
    student = tmp_path / "imported"
    assert main(["import", "fast-foundationstereo", str(DATA / "searched_variant" / CKPT), str(student)]) == 0
    assert "15 searched blocks" in capsys.readouterr().out
    onnx = tmp_path / "s.onnx"
    # The export runs its ONNX Runtime parity check against PyTorch (fails above 1e-2 px).
    assert main(["export", "--model", str(student), "--height", "64", "--width", "128", "--iters", "2",
                 "--out", str(onnx), "--json", str(tmp_path / "e.json")]) == 0
    parity = json.loads((tmp_path / "e.json").read_text())
    assert parity["kind"] == "student" and parity["onnx"]["max_abs_diff"] < 1e-3
    _pair(tmp_path)
    out = tmp_path / "disp.npy"
    assert main(["infer", "--onnx", str(onnx), "--left", str(tmp_path / "left.png"), "--right",
                 str(tmp_path / "right.png"), "--out", str(out)]) == 0
    model = load_student(student)
    left, right, _, _ = _reference()
    with torch.no_grad():
        expected = model(left, right, iters=2, test_mode=True)[0, 0].numpy()
    assert np.abs(np.load(out) - expected).max() < 1e-2


def test_eval_and_prune_an_imported_model(tmp_path: Path, capsys) -> None:
    from compress.data import SyntheticConfig, write_synthetic_dataset
    from search_spaces import count_params

    student = tmp_path / "imported"
    import_fast_foundationstereo(DATA / "released_like" / CKPT, student)
    data = tmp_path / "data"
    write_synthetic_dataset(data, 2, SyntheticConfig(height=70, width=140, max_disp=16), progress=False)
    before = count_params(load_student(student))
    assert main(["eval", "--model", str(student), "--data", str(data), "--iters", "2", "--json",
                 str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["gt/epe"] > 0 and "gt/d1" in metrics
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(student), "--ratio", "0.3", "--scope", "refinement", "--out", str(out),
               "--data", str(data), "--height", "64", "--width", "128", "--distill-steps", "1",
               "--recovery-steps", "1", "--samples", "2", "--train-iters", "2", "--teacher-iters", "2",
               "--no-progress", "data.eval_samples=1", "importance.calibration_batches=1"])
    assert rc == 0, capsys.readouterr()
    pruned = load_model(out / "model")
    assert count_params(pruned) < before
    assert pruned.cfg.gwc_normalize is False and pruned.cfg.attention_heads_as_sequence
    with torch.no_grad():
        disp = pruned(255 * torch.rand(1, 3, 64, 128), 255 * torch.rand(1, 3, 64, 128), test_mode=True)
    assert disp.shape == (1, 1, 64, 128) and torch.isfinite(disp).all()
    # A latency budget on the imported model: timed on this CPU (generous, so shared cores cannot flake it).
    out_ms = tmp_path / "pruned_ms"
    rc = main(["prune", "--model", str(student), "--budget-ms", "60000", "--backend", "torch", "--out", str(out_ms),
               "--data", str(data), "--height", "64", "--width", "128", "--iters", "2", "--warmup", "1",
               "--repeats", "2", "--distill-steps", "1", "--recovery-steps", "1", "--samples", "2",
               "--train-iters", "2", "--teacher-iters", "2", "--no-progress", "--no-mlflow", "data.eval_samples=1",
               "importance.calibration_batches=1"])
    assert rc == 0, capsys.readouterr()
    result = json.loads((out_ms / "prune_result.json").read_text())
    latency = result["initial"]["latency"]
    assert result["met"] and latency["backend"] == "torch" and 0 < latency["median_ms"] < 60000


# --- bad input: one line, exit status 2 ----------------------------------------------------------------------
def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(["import", "fast-foundationstereo", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def _with_cfg(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "released_like" / "cfg.yaml", folder / "cfg.yaml")
    return folder / CKPT


class _Payload:
    """Pickles as a call to os.system: loading it with torch.load(weights_only=False) would run a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_naming_an_unknown_class_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    ckpt = _with_cfg(tmp_path / "evil")
    marker = tmp_path / "ran"
    torch.save({"model": _Payload(marker)}, ckpt)
    err = _one_line_error(capsys, [str(ckpt), str(tmp_path / "out")])
    assert "names class posix.system" in err or "names class os.system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_official_block_names_the_layer(tmp_path: Path, capsys) -> None:
    # The released-like pickle with one class renamed (same length, so the pickle stays valid).
    ckpt = _with_cfg(tmp_path / "variant")
    with zipfile.ZipFile(DATA / "released_like" / CKPT) as src, zipfile.ZipFile(ckpt, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"\nSpatialAttentionExtractor\n", b"\nSpatialAttentionExtractoX\n")
                data = data.replace(b"SpatialAttentionExtractor", b"SpatialAttentionExtractoX")
            dst.writestr(item, data)
    err = _one_line_error(capsys, [str(ckpt), str(tmp_path / "out")])
    assert "layer sam is a core.submodule.SpatialAttentionExtractoX" in err


def test_plain_state_dict_without_cfg(tmp_path: Path, capsys) -> None:
    student = import_fast_foundationstereo(DATA / "released_like" / CKPT, tmp_path / "s")
    ckpt = tmp_path / "sd" / "weights.pth"
    ckpt.parent.mkdir()
    torch.save(student.state_dict(), ckpt)
    err = _one_line_error(capsys, [str(ckpt), str(tmp_path / "out")])
    assert "plain state dict" in err and "no cfg.yaml beside it" in err


def test_truncated_file(tmp_path: Path, capsys) -> None:
    ckpt = _with_cfg(tmp_path / "cut")
    data = (DATA / "released_like" / CKPT).read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert "truncated" in _one_line_error(capsys, [str(ckpt), str(tmp_path / "out")])


def test_foundationstereo_teacher_checkpoint(tmp_path: Path, capsys) -> None:
    ckpt = _with_cfg(tmp_path / "teacher")
    # The official FoundationStereo layout: {"model": state_dict} with the DepthAnything ViT under feature.dino.
    state = {"feature.dino.depth_anything.pretrained.cls_token": torch.zeros(1, 1, 8), "feature.conv4.0.conv.weight":
             torch.zeros(4, 4, 3, 3), "cost_agg.conv1.0.conv.weight": torch.zeros(4, 4, 3, 3, 3)}
    buf = io.BytesIO()
    torch.save({"model": state, "epoch": 3}, buf)
    ckpt.write_bytes(buf.getvalue())
    err = _one_line_error(capsys, [str(ckpt), str(tmp_path / "out")])
    assert "FoundationStereo teacher checkpoint" in err


def test_missing_cfg_yaml(tmp_path: Path) -> None:
    ckpt = tmp_path / "alone" / CKPT
    ckpt.parent.mkdir()
    shutil.copy(DATA / "released_like" / CKPT, ckpt)
    with pytest.raises(CheckpointError, match="no cfg.yaml beside it"):
        import_fast_foundationstereo(ckpt, tmp_path / "out")


# --- fine-tuning an imported student on one's own footage ---------------------------------------------------
TINY_TEACHER = [  # a stand-in teacher: random weights, tiny ViT (no FoundationStereo checkpoint in tests)
    "teacher.checkpoint=null", "teacher.stand_in=random", "teacher.config.vit_size=vitt",
    "teacher.config.hidden_dims=[32,32,32]", "teacher.config.max_disp=64", "teacher.config.mixed_precision=false",
    "teacher.iters=2",
]


def _footage(folder: Path, frames: int, corrupt: int) -> None:
    """``frames`` textured pairs as left/ + right/, the first ``corrupt`` of them with a damaged left image."""
    rng = np.random.default_rng(0)
    (folder / "left").mkdir(parents=True)
    (folder / "right").mkdir()
    for i in range(frames):
        base = rng.integers(0, 256, (64, 140, 3), dtype=np.uint8)
        Image.fromarray(base[:, 8:136]).save(folder / "left" / f"{i:03d}.png")
        Image.fromarray(base[:, 4:132]).save(folder / "right" / f"{i:03d}.png")
    for i in range(corrupt):
        path = folder / "left" / f"{i:03d}.png"
        path.write_bytes(path.read_bytes()[:200])  # truncated mid-image


def _finetune_args(tmp_path: Path, footage: Path, student: Path, *extra: str) -> list[str]:
    return [str(REPO / "recipes" / "finetune_own_footage.yaml"),
            f"run_dir={tmp_path / 'run'}", f"data.labels.folder={tmp_path / 'run' / 'labels'}",
            f"data.train.path={footage}", f"data.eval.path={footage}", f"student.model={student}",
            "data.train.options.heldout_fraction=0.25", "data.eval.options.heldout_fraction=0.25",
            "batch_size=1", "num_workers=0", "train_iters=2", "eval_iters=2", "log_every=1",
            "checkpoint_every=1", "eval_every=0", "progress=false", "optim.warmup_steps=1", "optim.lr=1e-4",
            *TINY_TEACHER, *extra]


def test_finetune_own_footage_end_to_end(tmp_path: Path, capsys) -> None:
    student = tmp_path / "imported"
    import_fast_foundationstereo(DATA / "released_like" / CKPT, student)
    footage = tmp_path / "footage"
    _footage(footage, frames=12, corrupt=1)
    ok = ["data.train.options.max_bad_fraction=0.1", "data.eval.options.max_bad_fraction=0.1"]
    with pytest.warns(UserWarning, match="skipping frame 000"):
        assert main(["finetune", *_finetune_args(tmp_path, footage, student, "steps=2", *ok)]) == 0
    printed = capsys.readouterr().out
    assert "EPE against the teacher on 2 held-out frames" in printed and "1 unreadable frames skipped" in printed
    report = json.loads((tmp_path / "run" / "finetune_report.json").read_text())
    assert report["train"] == {"frames": 9, "bad_frames": 1, "total_frames": 12}
    assert report["heldout"]["frames"] == 2 and report["steps"] == 2
    assert report["before"]["teacher/epe"] > 0 and report["after"]["teacher/epe"] != report["before"]["teacher/epe"]
    tuned = load_student(Path(report["student"]))
    assert tuned.cfg.gwc_normalize is False  # still the imported architecture
    # Resumes: two more steps on the same run directory keep the "before" number and the labels.
    with pytest.warns(UserWarning):
        assert main(["finetune", *_finetune_args(tmp_path, footage, student, "steps=4", *ok)]) == 0
    again = json.loads((tmp_path / "run" / "finetune_report.json").read_text())
    assert again["steps"] == 4 and again["before"] == report["before"]


def test_finetune_fails_when_too_many_frames_are_bad(tmp_path: Path, capsys) -> None:
    footage = tmp_path / "footage"
    _footage(footage, frames=12, corrupt=1)  # 8% > the default 5%
    import_fast_foundationstereo(DATA / "released_like" / CKPT, tmp_path / "imported")
    with pytest.warns(UserWarning):
        code = main(["finetune", *_finetune_args(tmp_path, footage, tmp_path / "imported", "steps=1")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 of 12 frames are unreadable" in err and "max_bad_fraction=0.05" in err


def test_finetune_recipe_loads_as_a_distill_recipe() -> None:
    from compress.distill.config import load_recipe

    cfg = load_recipe(REPO / "recipes" / "finetune_own_footage.yaml")
    assert cfg.data.train.kind == cfg.data.eval.kind == "own_footage"
    assert cfg.data.train.options["split"] == "train" and cfg.data.eval.options["split"] == "heldout"
    assert cfg.data.train.options["max_bad_fraction"] == 0.05 and cfg.student.model == "runs/imported"
    assert cfg.loss.feature.enabled and cfg.loss.cost_volume.enabled and cfg.loss.output.enabled


def test_finetune_under_torchrun(tmp_path: Path) -> None:
    import subprocess
    import sys

    student = tmp_path / "imported"
    import_fast_foundationstereo(DATA / "released_like" / CKPT, student)
    footage = tmp_path / "footage"
    _footage(footage, frames=8, corrupt=0)
    repo = REPO
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "compress.distill.own_footage", *_finetune_args(tmp_path, footage, student, "steps=2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("EPE against the teacher on 2 held-out frames") == 1  # rank 0 alone reports
    report = json.loads((tmp_path / "run" / "finetune_report.json").read_text())
    assert report["steps"] == 2 and report["train"]["frames"] == 6
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2


@pytest.mark.parametrize("scope", ["cost_filtering", "refinement"])
def test_searched_blocks_prune_and_reload(scope: str, tmp_path: Path) -> None:
    from compress.prune.step import prune_once
    from search_spaces import count_params, save_student

    model = import_fast_foundationstereo(DATA / "searched_variant" / CKPT, tmp_path / "s")
    before = count_params(model)
    changed = prune_once(model, 0.3, [scope], importance="magnitude", round_to=4)
    assert changed and count_params(model) < before
    if scope == "cost_filtering":
        assert any(name.startswith("cost_agg.post") for name in changed)  # inside the merge blocks too
    left, right, iters, _ = _reference()
    save_student(model, tmp_path / "p")
    with torch.no_grad():
        disp = model(left, right, iters=iters, test_mode=True)
        assert torch.equal(load_student(tmp_path / "p")(left, right, iters=iters, test_mode=True), disp)
