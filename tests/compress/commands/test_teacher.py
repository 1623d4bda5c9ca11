"""``ffsc infer`` / ``ffsc teacher inspect`` on a tiny checkpoint, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from compress.cli import main
from compress.data.io import read_pfm
from teacher import FoundationStereo, TeacherConfig

TINY = dict(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False, valid_iters=2)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    TeacherConfig(**TINY).to_yaml(d / "cfg.yaml")
    torch.save({"model": FoundationStereo(TeacherConfig(**TINY)).state_dict()}, d / "model_best_bp2.pth")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "left.png")
    Image.fromarray(np.roll(img, -2, axis=1)).save(d / "right.png")
    Image.fromarray(img[:, :80]).save(d / "narrow.png")
    Image.fromarray(img[..., 0]).save(d / "grey.png")
    (d / "broken.png").write_bytes(b"\x89PNG garbage")
    return d


def _infer(d, out, *extra):
    return main(["infer", "--checkpoint", str(d / "model_best_bp2.pth"), "--left", str(d / "left.png"),
                 "--right", str(d / "right.png"), "--out", str(out), *extra])


@pytest.mark.parametrize("suffix", [".npy", ".pfm", ".png"])
def test_infer_writes_each_format(ckpt_dir, tmp_path, suffix):
    out = tmp_path / f"disp{suffix}"
    assert _infer(ckpt_dir, out) == 0
    if suffix == ".npy":
        assert np.load(out).shape == (60, 90)
    elif suffix == ".pfm":
        assert read_pfm(out).shape == (60, 90)
    else:
        assert Image.open(out).size == (90, 60) and Image.open(out).mode == "RGB"


def test_infer_depth(ckpt_dir, tmp_path):
    assert _infer(ckpt_dir, tmp_path / "disp.pfm", "--fx", "100", "--baseline", "0.5") == 0
    disp, depth = read_pfm(tmp_path / "disp.pfm"), read_pfm(tmp_path / "disp_depth.pfm")
    pos = disp > 0
    assert np.allclose(depth[pos], 50.0 / disp[pos], rtol=1e-4)


def _one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_errors_are_one_line(ckpt_dir, tmp_path, capsys):
    d = ckpt_dir
    base = ["infer", "--checkpoint", str(d / "model_best_bp2.pth"), "--out", str(tmp_path / "x.npy")]
    err = _one_line_error(capsys, main(base + ["--left", str(d / "left.png"), "--right", str(d / "narrow.png")]))
    assert "is 60x90 but" in err and "is 60x80 (height x width)" in err
    err = _one_line_error(capsys, main(base + ["--left", str(d / "broken.png"), "--right", str(d / "left.png")]))
    assert "broken.png" in err
    (tmp_path / "lone").mkdir()
    lone = tmp_path / "lone" / "model.pth"
    lone.write_bytes((d / "model_best_bp2.pth").read_bytes())
    err = _one_line_error(capsys, main(["infer", "--checkpoint", str(lone), "--left", str(d / "left.png"),
                                        "--right", str(d / "right.png"), "--out", str(tmp_path / "y.npy")]))
    assert "cfg.yaml" in err


def test_grey_pairs_are_converted_as_the_readers_convert_them(ckpt_dir, tmp_path):
    grey = np.asarray(Image.open(ckpt_dir / "grey.png"))
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    for name in ("grey", "grey_rgb"):
        src = ckpt_dir / "grey.png" if name == "grey" else tmp_path / "grey_rgb.png"
        assert main(["infer", "--checkpoint", str(ckpt_dir / "model_best_bp2.pth"), "--left", str(src),
                     "--right", str(src), "--out", str(tmp_path / f"{name}.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "grey.npy"), np.load(tmp_path / "grey_rgb.npy"))


def test_teacher_inspect_json(ckpt_dir, capsys):
    assert main(["teacher", "inspect", str(ckpt_dir / "model_best_bp2.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loads"] and info["config"]["vit_size"] == "vitt"
    model = FoundationStereo(TeacherConfig(**TINY))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(info["parts"].values()) == info["parameters"]


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "infer" in proc.stdout
