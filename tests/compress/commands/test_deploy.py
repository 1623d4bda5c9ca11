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
    assert "70x100 (height x width)" in err and "takes exactly 64x96" in err
    assert "static shape" in err and "--dynamic" in err
    assert not (tmp_path / "d.npy").exists()


def test_infer_onnx_rejects_other_iteration_counts(work: Path, tmp_path: Path, capsys) -> None:
    code = _infer(work, tmp_path / "d.npy", ["--onnx", str(work / "static.onnx")], "", "--iters", "5")
    assert "fixed at export" in _one_line_error(capsys, code)
    code = _infer(work, tmp_path / "d.npy", ["--onnx", str(work / "static.onnx")], "", "--hierarchical")
    assert "PyTorch model" in _one_line_error(capsys, code)


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
    threads = torch.get_num_threads()
    code = main(["bench", "--model", str(work / "student"), "--backend", "torch,onnxruntime", "--height", "32",
                 "--width", "64", "--iters", "1", "--repeats", "2", "--warmup", "0", "--threads", "1",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    params = sum(p.numel() for p in load_student(work / "student").parameters())
    assert all(r["params"] == params and r["gmacs"] > 0 and r["median_ms"] > 0 for r in rows)
    assert torch.get_num_threads() == threads  # --threads 1 held for the measurement only, not for the process


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


# ------------------------------------------------------------------------------------- infer: depth, clouds, folders

FX, BASELINE = 40.0, 0.2


def _intrinsics(d: Path) -> Path:
    path = d / "K.txt"
    path.write_text(f"{FX} 0 45 0 {FX} 30 0 0 1\n{BASELINE}\n")
    return path


def test_infer_student_writes_disparity_depth_and_cloud(work: Path, tmp_path: Path, capsys) -> None:
    from compress.geometry import point_cloud, read_ply

    out = tmp_path / "out"
    code = main(["infer", "--model", str(work / "student"), "--left", str(work / "left.png"), "--right",
                 str(work / "right.png"), "--intrinsics", str(_intrinsics(tmp_path)), "--out", str(out)])
    assert code == 0
    assert "student directory" in capsys.readouterr().out
    left, right = _pair(work)
    student = load_student(work / "student")
    expected = infer(student, left, right, iters=student.cfg.iters)[0, 0].numpy()  # the student's own count
    disp = np.load(out / "disparity.npy")
    np.testing.assert_allclose(disp, expected, atol=1e-4)
    assert Image.open(out / "disparity.png").mode == "RGB"
    depth = np.load(out / "depth.npy")
    pos = disp > 0
    np.testing.assert_allclose(depth[pos], FX * BASELINE / disp[pos], rtol=1e-5)
    assert np.all(depth[~pos] == 0)
    mm = np.asarray(Image.open(out / "depth.png"))
    assert mm.dtype == np.uint16 and mm.shape == (60, 90)
    points, colors = read_ply(out / "cloud.ply")
    K = np.array([[FX, 0, 45], [0, FX, 30], [0, 0, 1]])
    want_points, want_colors = point_cloud(depth, K, left, zfar=10.0)
    assert len(points) == int(((depth > 0) & (depth <= 10.0)).sum()) > 0
    np.testing.assert_allclose(points, want_points, rtol=1e-6)
    np.testing.assert_array_equal(colors, want_colors)


def test_infer_scale_and_remove_invisible(work: Path, tmp_path: Path) -> None:
    from compress.geometry import invisible_mask

    out = tmp_path / "out"
    # 70x100 halved: 35x50, above the 32x32 the models take (60x90 would give 30x45, refused).
    code = main(["infer", "--model", str(work / "student"), "--left", str(work / "big_left.png"), "--right",
                 str(work / "big_right.png"), "--intrinsics", str(_intrinsics(tmp_path)), "--scale", "0.5",
                 "--remove-invisible", "--formats", "npy,pfm", "--out", str(out)])
    assert code == 0
    disp, depth = np.load(out / "disparity.npy"), np.load(out / "depth.npy")
    assert disp.shape == depth.shape == (35, 50) and (out / "depth.pfm").is_file()
    keep = (disp > 0) & ~invisible_mask(disp)
    np.testing.assert_allclose(depth[keep], FX * 0.5 * BASELINE / disp[keep], rtol=1e-5)
    assert np.all(depth[~keep] == 0)


def test_infer_folders_skip_a_bad_frame_and_go_on(work: Path, tmp_path: Path, capsys) -> None:
    left_dir, right_dir = tmp_path / "L", tmp_path / "R"
    left_dir.mkdir(), right_dir.mkdir()
    for name, prefix in (("a", ""), ("b", "small_"), ("c", "")):
        Image.open(work / f"{prefix}left.png").save(left_dir / f"{name}.png")
        right = work / (f"{prefix}right.png" if name != "c" else "big_right.png")  # c: sizes differ
        Image.open(right).save(right_dir / f"{name}.png")
    out = tmp_path / "out"
    code = main(["infer", "--model", str(work / "student"), "--left", str(left_dir), "--right", str(right_dir),
                 "--intrinsics", str(_intrinsics(tmp_path)), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # one frame skipped
    assert "skipped c:" in captured.err and "is 60x90 but" in captured.err and "2 of 3 pairs" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [".ffsc-infer.json", "a", "b"]  # the record of the input
    for name, shape in (("a", (60, 90)), ("b", (40, 70))):
        assert np.load(out / name / "disparity.npy").shape == shape
        assert (out / name / "depth.png").is_file() and (out / name / "cloud.ply").is_file()


def test_infer_pairs_folder_with_an_onnx_model(work: Path, tmp_path: Path, capsys) -> None:
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name in ("x", "y"):
        Image.open(work / "left.png").save(pairs / f"{name}_left.png")
        Image.open(work / "right.png").convert("L").save(pairs / f"{name}_right.png")  # grey: converted
    out = tmp_path / "out"
    assert main(["infer", "--model", str(work / "static.onnx"), "--pairs", str(pairs), "--out", str(out)]) == 0
    assert "ONNX file" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".ffsc-infer.json", "x", "y"]
    assert sorted(p.name for p in (out / "x").iterdir()) == ["disparity.npy", "disparity.png"]


def test_infer_checks_outputs_before_inference(work: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    base = ["infer", "--model", str(work / "student"), "--left", str(work / "left.png"), "--right",
            str(work / "right.png")]
    err = _one_line_error(capsys, main([*base, "--out", str(blocker / "out")]))
    assert "is a file" in err
    err = _one_line_error(capsys, main([*base, "--out", str(tmp_path / "o.tif")]))
    assert "o.tif" in err
    err = _one_line_error(capsys, main([*base, "--out", str(tmp_path / "o"), "--formats", "jpg"]))
    assert "--formats" in err
    assert "pass the model once" in _one_line_error(
        capsys, main([*base, "--onnx", str(work / "static.onnx"), "--out", str(tmp_path / "o")]))


@pytest.mark.parametrize("argv", [
    ["infer", "--model", "{student}", "--left", "{d}/left.png", "--right", "{d}/right.png", "--out", "{tmp}/out"],
    ["bench", "--model", "{student}", "--height", "64", "--width", "96", "--backend", "torch"],
    ["export", "--model", "{student}", "--height", "64", "--width", "96", "--out", "{tmp}/m.onnx"],
])
def test_cuda_device_without_a_gpu_is_one_line(work: Path, tmp_path: Path, capsys, argv: list[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda is valid here")
    argv = [a.format(student=work / "student", d=work, tmp=tmp_path) for a in argv]
    for device in ("cuda", "cuda:1"):
        err = _one_line_error(capsys, main([*argv, "--device", device]))
        assert f"device '{device}' requested but CUDA is not available; use device=cpu" in err
    assert "device 'gpu' is not a torch device" in _one_line_error(capsys, main([*argv, "--device", "gpu"]))
    assert not list(tmp_path.iterdir())
