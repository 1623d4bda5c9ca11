"""Files a user passes are checked before work: a bad ONNX or engine file, an output folder holding another
input's outputs, a degenerate or mismatched pair, an output path under a file, a pair too large for the memory,
an empty calibration folder. Each is one line on stderr, exit 2, and nothing written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from compress.cli import main
from compress.deploy import memory
from compress.deploy.outputs import FOLDER_RECORD
from compress.models import resolve_model
from search_spaces import build_student, preset, save_student


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A saved tiny student, two 64x128 pairs (a, b), a 1x1 pair, a mismatched pair and a small valid ONNX."""
    d = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    save_student(build_student(preset("tiny")), d / "student")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (64, 128), "b": (64, 128), "dot": (1, 1), "odd": (64, 128)}.items():
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / f"{name}_left.png")
        right = img if name != "odd" else img[:48, :96]
        Image.fromarray(np.ascontiguousarray(np.roll(right, -3, axis=1))).save(d / f"{name}_right.png")
    # A valid ONNX with a 4 KB initializer: enough bytes to cut in the middle of a field.
    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])], [weight])
    onnx.save(helper.make_model(graph), d / "valid.onnx")
    data = (d / "valid.onnx").read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (d / "text.onnx").write_text("this is not a model\n")
    (d / "empty.engine").write_bytes(b"")
    return d


def _fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it exits 2 with one line on stderr holding every expected text, and no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (captured.out, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _infer(inputs: Path, pair: str, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["infer", "--model", str(model or inputs / "student"), "--left", str(inputs / f"{pair}_left.png"),
            "--right", str(inputs / f"{pair}_right.png"), "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------- ONNX and engines


@pytest.mark.parametrize("name, flag, expected", [
    ("text.onnx", "--onnx", "is not an ONNX model: it is not protobuf data"),
    ("truncated.onnx", "--onnx", "runs past the end of the file"),
    ("truncated.onnx", "--model", "truncated?"),
    ("missing.onnx", "--onnx", "no such file"),
])
def test_infer_bad_onnx_file(inputs: Path, tmp_path: Path, capsys, name: str, flag: str, expected: str) -> None:
    argv = ["infer", flag, str(inputs / name), "--left", str(inputs / "a_left.png"), "--right",
            str(inputs / "a_right.png"), "--out", str(tmp_path / "out")]
    err = _fails(capsys, argv, f"{flag} {inputs / name}", expected, "ffsc export")
    assert "DecodeError" not in err
    assert not list(tmp_path.iterdir())


def test_bench_truncated_onnx(inputs: Path, tmp_path: Path, capsys) -> None:
    _fails(capsys, ["bench", "--model", str(inputs / "truncated.onnx"), "--backend", "onnxruntime", "--json",
                    str(tmp_path / "b.json")], "--model", "truncated.onnx", "not an ONNX model")
    assert not list(tmp_path.iterdir())


def test_quantize_not_an_onnx_file(inputs: Path, tmp_path: Path, capsys) -> None:
    _fails(capsys, ["quantize", str(inputs / "text.onnx"), "--calib", "synthetic", "--out", str(tmp_path / "q.onnx")],
           "model", "text.onnx", "not an ONNX model")
    assert not list(tmp_path.iterdir())


def test_engine_files_empty_or_missing(inputs: Path, tmp_path: Path, capsys) -> None:
    _fails(capsys, ["infer", "--engine", str(inputs / "empty.engine"), "--left", str(inputs / "a_left.png"),
                    "--right", str(inputs / "a_right.png"), "--out", str(tmp_path / "out")],
           "--engine", "is empty (0 bytes)", "TensorRT engine")
    _fails(capsys, ["bench", "--model", str(tmp_path / "missing.plan")], "--model", "no such file", "TensorRT engine")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- quantize


def test_quantize_empty_calibration_folder(inputs: Path, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    _fails(capsys, ["quantize", str(inputs / "valid.onnx"), "--calib", str(calib), "--out", str(tmp_path / "q.onnx")],
           f"--calib {calib} is an empty folder", "label cache folder", "stereo data folder", "'synthetic'")
    (calib / "notes.txt").write_text("no images here")  # not empty, but no layout: still the first line only
    _fails(capsys, ["quantize", str(inputs / "valid.onnx"), "--calib", str(calib), "--out", str(tmp_path / "q.onnx")],
           f"--calib {calib}", "no known stereo dataset layout", "'synthetic'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]


# --------------------------------------------------------------------------------- infer: the output folder


def test_infer_refuses_outputs_of_another_input(inputs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_infer(inputs, "a", out, "--fx", "40", "--baseline", "0.2")) == 0
    assert {"disparity.npy", "disparity.png", "depth.npy", "depth.png", FOLDER_RECORD} == {p.name for p in
                                                                                           out.iterdir()}
    before = _snapshot(out)
    capsys.readouterr()
    _fails(capsys, _infer(inputs, "b", out), f"--out {out} already holds the outputs of another input",
           str(inputs / "a_left.png"), "--overwrite")
    assert _snapshot(out) == before


def test_infer_overwrite_replaces_the_previous_outputs(inputs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_infer(inputs, "a", out, "--fx", "40", "--baseline", "0.2")) == 0
    first = np.load(out / "disparity.npy")
    assert main(_infer(inputs, "b", out, "--overwrite")) == 0
    assert "removed 2 earlier output file(s)" in capsys.readouterr().out
    # No depth of pair a is left beside pair b's disparity.
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_RECORD, "disparity.npy", "disparity.png"]
    assert not np.array_equal(np.load(out / "disparity.npy"), first)
    record = json.loads((out / FOLDER_RECORD).read_text())
    assert record["input"]["left"] == str(inputs / "b_left.png")
    assert record["outputs"] == ["disparity.npy", "disparity.png"]


def test_infer_same_input_again_is_fine(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "disp.npy"  # the single-file form: its record sits beside it
    assert main(_infer(inputs, "a", out)) == 0
    first = np.load(out)
    assert main(_infer(inputs, "a", out)) == 0
    np.testing.assert_array_equal(np.load(out), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".disp.npy.ffsc-infer.json", "disp.npy"]


def test_infer_refuses_unrecorded_outputs(inputs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "depth.npy", np.zeros((2, 2), np.float32))  # from a run before outputs were recorded
    before = _snapshot(out)
    _fails(capsys, _infer(inputs, "a", out), "depth.npy", "no record of their input", "--overwrite")
    assert _snapshot(out) == before


def test_infer_out_under_an_existing_file(inputs: Path, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    _fails(capsys, _infer(inputs, "a", afile / "disp.npy"), "--out", str(afile), "is a file, not a folder")
    assert "--model" not in capsys.readouterr().out  # refused before the model was opened
    assert afile.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [afile]


# ------------------------------------------------------------------------------------ infer: the image pair


def test_infer_refuses_a_degenerate_pair(inputs: Path, tmp_path: Path, capsys) -> None:
    _fails(capsys, _infer(inputs, "dot", tmp_path / "out"), "is 1x1", "at least 32x32")
    _fails(capsys, _infer(inputs, "a", tmp_path / "out", "--scale", "0.25"),
           "is 16x32 (height x width) after --scale 0.25", "at least 32x32")
    assert not list(tmp_path.iterdir())


def test_infer_refuses_views_of_different_sizes(inputs: Path, tmp_path: Path, capsys) -> None:
    _fails(capsys, _infer(inputs, "odd", tmp_path / "out"), "is 64x128", "is 48x96 (height x width)", "equal sizes")
    assert not list(tmp_path.iterdir())


def test_infer_refuses_a_pair_too_large_for_the_memory(inputs: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2**20, "RAM available"))  # 1 MiB
    _fails(capsys, _infer(inputs, "a", tmp_path / "out", "--device", "cpu"),
           "a 64x128 (height x width) pair needs about 12 MiB on cpu",
           "but 1 MiB is RAM available", "--scale 0.25 or less", "--hierarchical does not help")
    assert not list(tmp_path.iterdir())


def test_memory_estimate_of_the_reported_pair() -> None:
    """The report: a 4000x6000 pair died at 7.6 GB on CPU; the estimate says so before the 104 s of work."""
    student = resolve_model("tiny").module
    estimate = memory.estimate_peak_bytes(student, 4000, 6000, "cpu")
    assert estimate > 7.6e9
    # It grows with the pixel count, from the 2D stages or the cost volume, whichever is larger.
    assert memory.estimate_peak_bytes(student, 2000, 3000, "cpu") == pytest.approx(estimate / 4, rel=0.01)
    assert memory.host_available_bytes() > 0


def test_metadata_reader_names_a_damaged_onnx_in_one_line(inputs: Path) -> None:
    """Callers past the preflight (library use) get one ExportError, not protobuf's DecodeError."""
    from compress.errors import ExportError
    from compress.export import read_metadata

    with pytest.raises(ExportError, match="truncated.onnx is not a readable ONNX model") as info:
        read_metadata(inputs / "truncated.onnx")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------- outputs checked before the work


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    """An existing file where an output's folder should be."""
    path = tmp_path / "afile"
    path.write_text("keep me")
    return path


@pytest.mark.parametrize("argv, key", [
    (["eval", "--model", "{student}", "--data", "{data}", "--json", "{afile}/x.json"], "--json"),
    (["bench", "--model", "{student}", "--height", "64", "--width", "128", "--json", "{afile}/x.json"], "--json"),
    (["quantize", "{student}", "--calib", "synthetic", "--height", "64", "--width", "128", "--iters", "1",
      "--out", "{afile}/q.onnx"], "--out"),
    (["quantize", "{student}", "--calib", "synthetic", "--out", "{tmp}/q.onnx", "--report", "{afile}/r.json"],
     "--report"),
])
def test_outputs_under_a_file_are_refused_before_the_work(inputs: Path, afile: Path, capsys, argv: list[str],
                                                          key: str) -> None:
    names = {"student": inputs / "student", "data": inputs, "afile": afile, "tmp": afile.parent}
    argv = [a.format(**names) for a in argv]
    started = time.perf_counter()
    _fails(capsys, argv, f"{key}: {afile}/", f"cannot be created because {afile} is a file, not a folder")
    assert time.perf_counter() - started < 5  # before the model is even opened
    assert afile.read_text() == "keep me" and sorted(afile.parent.iterdir()) == [afile]


def test_eval_refuses_a_non_positive_limit(inputs: Path, capsys) -> None:
    for limit in ("0", "-1"):
        _fails(capsys, ["eval", "--model", str(inputs / "student"), "--data", str(inputs), "--limit", limit],
               f"--limit={limit}: expected an integer >= 1", "leave it out to evaluate them all")


def test_infer_pairs_in_an_empty_or_unknown_folder(inputs: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    _fails(capsys, ["infer", "--model", str(inputs / "student"), "--pairs", str(empty), "--out", str(out)],
           f"--pairs: {empty} is an empty folder (expected a stereo dataset folder)")
    (empty / "notes.txt").write_text("no pairs")
    _fails(capsys, ["infer", "--model", str(inputs / "student"), "--pairs", str(empty), "--out", str(out)],
           f"--pairs: {empty}: no known stereo dataset layout found; expected the layout of one of kitti2015, "
           "kitti2012, sceneflow, fsd, middlebury, pairs (or name one with the dataset's kind)")
    assert not out.exists()


# ---------------------------------------------------------------------------------------- recipe files


@pytest.mark.parametrize("command", [["run"], ["distill"], ["prune", "--ratio", "0.5", "--recipe"]])
def test_recipe_file_mistakes_are_one_line(tmp_path: Path, capsys, command: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nsizes: [1, 2\nprogress: false\n")
    _fails(capsys, [*command, str(bad)], f"{bad} is not valid YAML at line 3, column 9",
           "did not find expected ',' or ']'")
    _fails(capsys, [*command, str(tmp_path)], f"{tmp_path} is a folder; expected a YAML file")
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        _fails(capsys, [*command, str(empty)], f"{empty} is empty; expected YAML settings")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "empty.yaml"]


# ------------------------------------------------------------------------------------- argparse mistakes


@pytest.mark.parametrize("argv, message", [
    (["prune", "--backend", "onnxrt"], "ffsc prune: error: argument --backend: invalid choice: 'onnxrt'"),
    (["run", "--resume"], "ffsc run: error: the following arguments are required: recipe (see ffsc run --help)"),
    (["nas", "r.yaml", "--no-such-option"], "ffsc nas: error: unrecognized arguments: --no-such-option"),
])
def test_argparse_mistakes_are_one_line(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.endswith(f"(see ffsc {argv[0]} --help)") and "usage:" not in err


# ------------------------------------------------------------------------------ ONNX models from elsewhere


def _foreign_onnx(path: Path, size: tuple[int, int] | None, inputs: tuple[str, str] = ("left", "right"),
                  output: str = "disp") -> Path:
    """A stereo-shaped ONNX made with onnx.helper (no ffsc metadata): disparity = mean over channels of l - r."""
    h, w = size if size is not None else ("H", "W")
    nodes = [helper.make_node("Sub", list(inputs), ["diff"]),
             helper.make_node("ReduceMean", ["diff"], [output], keepdims=1, axes=[1])]
    graph = helper.make_graph(nodes, "foreign",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, h, w]) for n in inputs],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 1, h, w])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_foreign_onnx_is_said_once_with_what_is_assumed(inputs: Path, tmp_path: Path, capsys) -> None:
    static = _foreign_onnx(tmp_path / "static.onnx", (64, 128))
    bench = ["bench", "--model", str(static), "--backend", "onnxruntime", "--repeats", "1", "--warmup", "0"]
    err = _fails(capsys, [*bench, "--height", "64", "--width", "128"],
                 f"--model {static} records no GRU iteration count (it is fixed inside the graph); pass --iters")
    assert "dynamic" not in err
    _fails(capsys, [*bench, "--height", "32", "--width", "64", "--iters", "1"],
           f"{static} takes only 64x128 (height x width) inputs (a static shape), but 32x64 was asked",
           "pass --height 64 --width 128")
    out = tmp_path / "out"
    assert main(_infer(inputs, "a", out, model=static)) == 0  # a 64x128 pair runs, with the assumption said
    said = capsys.readouterr().out
    assert said.count("was not exported by ffsc") == 1 and "inputs 'left' and 'right' (RGB 0..255) assumed" in said
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((96, 160, 3), np.uint8)).save(big)
    err = _fails(capsys, ["infer", "--model", str(static), "--left", str(big), "--right", str(big), "--out",
                          str(tmp_path / "o2")],
                 "the images are 96x160 (height x width)", "takes exactly 64x128 (a static shape)",
                 "was not exported by ffsc", "--scale")
    assert "re-export" not in err and not (tmp_path / "o2").exists()


def test_foreign_onnx_with_other_inputs_or_a_dynamic_size(inputs: Path, tmp_path: Path, capsys) -> None:
    other = _foreign_onnx(tmp_path / "xy.onnx", (64, 128), inputs=("a", "b"), output="y")
    _fails(capsys, _infer(inputs, "a", tmp_path / "out", model=other),
           f"{other} was not exported by ffsc (no ffsc metadata) and has inputs ['a', 'b'] and outputs ['y']",
           "inputs 'left' and 'right' (B x 3 x H x W, RGB 0..255) and an output 'disp'")
    dynamic = _foreign_onnx(tmp_path / "dynamic.onnx", None)
    _fails(capsys, ["quantize", str(dynamic), "--calib", "synthetic", "--out", str(tmp_path / "q.onnx")],
           f"{dynamic} has a dynamic input size and was not exported by ffsc",
           "pass the calibration image size (--height and --width)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic.onnx", "xy.onnx"]
