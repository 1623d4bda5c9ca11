"""``ffsc export``, ``ffsc bench`` and ``ffsc infer --onnx`` on a tiny saved student, against PyTorch inference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from compress.cli import main
from compress.export import to_onnx
from compress.models import resolve_model
from search_spaces import build_student, load_student, preset, save_student
from search_spaces.serialization import save_pruned_teacher
from teacher import infer

ITERS = 2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny student, a 60x90 image pair (pads to 64x96) and a static 64x96 export made by the CLI."""
    d = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    save_student(build_student(preset("tiny")), d / "student")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    for name, (h, w) in {"": (60, 90), "small_": (40, 70), "big_": (70, 100)}.items():
        Image.fromarray(img[:h, :w]).save(d / f"{name}left.png")
        Image.fromarray(np.roll(img, -3, axis=1)[:h, :w]).save(d / f"{name}right.png")
    code = main(["export", "--model", str(d / "student"), "--height", "64", "--width", "96", "--iters", str(ITERS),
                 "--out", str(d / "static.onnx"), "--json", str(d / "static.json")])
    assert code == 0
    return d


def _pair(d: Path, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    return (np.array(Image.open(d / f"{prefix}left.png")), np.array(Image.open(d / f"{prefix}right.png")))


def _infer(d: Path, out: Path, source: list[str], prefix: str = "", *extra: str) -> int:
    return main(["infer", *source, "--left", str(d / f"{prefix}left.png"), "--right", str(d / f"{prefix}right.png"),
                 "--out", str(out), *extra])


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_export_reports_parity_size_and_lint(work: Path, capsys) -> None:
    report = json.loads((work / "static.json").read_text())
    assert report["kind"] == "student"
    onnx_part = report["onnx"]
    assert onnx_part["max_abs_diff"] < 1e-3 and onnx_part["iters"] == ITERS
    assert onnx_part["onnx_bytes"] == (work / "static.onnx").stat().st_size
    assert not [f for f in onnx_part["lint"] if f["severity"] == "error"]
    assert [s["shape"] for s in onnx_part["inputs"]] == [[1, 3, 64, 96]] * 2


def test_infer_onnx_matches_pytorch_inference(work: Path, tmp_path: Path) -> None:
    assert _infer(work, tmp_path / "disp.npy", ["--onnx", str(work / "static.onnx")]) == 0
    got = np.load(tmp_path / "disp.npy")
    left, right = _pair(work)
    expected = infer(load_student(work / "student"), left, right, iters=ITERS)[0, 0].numpy()
    assert got.shape == (60, 90)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_infer_dynamic_onnx_matches_pytorch_inference(work: Path, tmp_path: Path) -> None:
    model = load_student(work / "student")
    # The runner's padding is under test here, not the export: skip parity and onnxslim to keep it quick.
    path = to_onnx(model, tmp_path / "dyn.onnx", 32, 64, ITERS, dynamic=True, check_parity=False,
                   simplify=False).path
    left, right = _pair(work, "big_")  # 70x100 pads to 96x128
    assert _infer(work, tmp_path / "disp.npy", ["--onnx", str(path)], "big_") == 0
    expected = infer(model, left, right, iters=ITERS)[0, 0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "disp.npy"), expected, atol=1e-3)


def test_static_onnx_pads_smaller_images_to_its_size(work: Path, tmp_path: Path) -> None:
    assert _infer(work, tmp_path / "disp.npy", ["--onnx", str(work / "static.onnx")], "small_") == 0
    left, right = _pair(work, "small_")  # 40x70: padded 12/12 rows and 13/13 columns up to 64x96
    to_t = [torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (left, right)]
    padded = [F.pad(t, (13, 13, 12, 12), mode="replicate") for t in to_t]
    with torch.no_grad():
        disp = load_student(work / "student")(*padded, iters=ITERS, test_mode=True)
    np.testing.assert_allclose(np.load(tmp_path / "disp.npy"), disp[0, 0, 12:52, 13:83].numpy(), atol=1e-3)


def test_static_onnx_refuses_larger_images(work: Path, tmp_path: Path, capsys) -> None:
    err = _one_line_error(capsys, _infer(work, tmp_path / "d.npy", ["--onnx", str(work / "static.onnx")], "big_"))
    assert "100x70" in err and "static shape" in err and "--dynamic" in err
    assert not (tmp_path / "d.npy").exists()


def test_infer_onnx_rejects_other_iteration_counts(work: Path, tmp_path: Path, capsys) -> None:
    code = _infer(work, tmp_path / "d.npy", ["--onnx", str(work / "static.onnx")], "", "--iters", "5")
    assert "fixed at export" in _one_line_error(capsys, code)
    code = _infer(work, tmp_path / "d.npy", ["--onnx", str(work / "static.onnx")], "", "--hierarchical")
    assert "--checkpoint" in _one_line_error(capsys, code)


def test_bench_prints_table_and_writes_json(work: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(work / "static.onnx"), "--backend", "onnxruntime", "--height", "64",
                 "--width", "96", "--repeats", "3", "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    assert "median ms" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["iters"] == ITERS and data["machine"]["cores"] >= 1
    (row,) = data["results"]
    assert row["backend"] == "onnxruntime" and 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]


def test_bench_several_backends_with_cost(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(work / "student"), "--backend", "torch,onnxruntime", "--height", "32",
                 "--width", "64", "--iters", "1", "--repeats", "2", "--warmup", "0", "--threads", "1",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    params = sum(p.numel() for p in load_student(work / "student").parameters())
    assert all(r["params"] == params and r["gmacs"] > 0 and r["median_ms"] > 0 for r in rows)


def test_bench_thread_clock(work: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(work / "static.onnx"), "--backend", "onnxruntime", "--height", "64", "--width",
            "96", "--repeats", "3", "--warmup", "1", "--clock", "thread"]
    assert main([*args, "--threads", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["options"]["clock"] == "thread" and row["median_ms"] > 0
    capsys.readouterr()
    assert "single-threaded" in _one_line_error(capsys, main([*args, "--threads", "2"]))


def test_model_resolution(work: Path, tmp_path: Path) -> None:
    assert resolve_model(str(work / "student")).kind == "student"
    assert resolve_model("tiny").kind == "preset"
    assert resolve_model("teacher:vitt").is_teacher
    assert resolve_model(str(work / "static.onnx"), allow_files=True).default_iters == ITERS
    ckpt = tmp_path / "model.pth"
    torch.save({"model": resolve_model("teacher:vitt").module.state_dict()}, ckpt)
    (tmp_path / "cfg.yaml").write_text("vit_size: vitt\nhidden_dims: [128, 128, 128]\n")
    resolved = resolve_model(str(ckpt))
    assert resolved.kind == "teacher" and "checkpoint" in resolved.description
    save_pruned_teacher(resolved.module, tmp_path / "pruned")  # the directory layout ffsc prune writes for teachers
    from_dir = resolve_model(str(tmp_path / "pruned"))
    assert from_dir.is_teacher and "pruned teacher" in from_dir.description
    assert from_dir.default_iters == resolved.module.cfg.valid_iters
    for a, b in zip(from_dir.module.state_dict().values(), resolved.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_preset"], "tiny"),
    (["--model", "missing/model.pth"], "no such file"),
    (["--model", "teacher:vitt", "--dynamic"], "static image size"),
    (["--model", "tiny", "--height", "60"], "multiples of 32"),
    (["--model", "tiny", "--precision", "bf16"], "fp32 or fp16"),
    (["--model", "tiny", "--format", "engine"], "not end in .onnx"),
])
def test_export_errors_are_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    err = _one_line_error(capsys, main(["export", *args, "--out", str(tmp_path / "m.onnx")]))
    assert message in err
    assert not list(tmp_path.iterdir())


def test_export_unsupported_file_type(tmp_path: Path, capsys) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    err = _one_line_error(capsys, main(["export", "--model", str(tmp_path / "weights.bin"), "--out",
                                        str(tmp_path / "m.onnx")]))
    assert "unsupported file type '.bin'" in err


def test_export_directory_without_config(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, main(["export", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]))
    assert "config.yaml" in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="checks the path without TensorRT or a GPU")
def test_engine_export_without_tensorrt_fails_before_exporting(tmp_path: Path, capsys) -> None:
    code = main(["export", "--model", "tiny", "--format", "engine", "--out", str(tmp_path / "m.engine")])
    err = _one_line_error(capsys, code)
    assert "TensorRT" in err or "CUDA" in err
    assert not list(tmp_path.iterdir())
