"""The benchmarks' shared report writer: both files, atomically, naming no path of the machine that ran them."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report import ROOT, machine_line, portable, write_report

MACHINE = {"cpu": "Some CPU", "cores": 2, "gpu": None, "torch": "2.5.0", "onnxruntime": "1.20.0", "tensorrt": None}


def test_machine_line_names_cpu_cores_gpu_and_versions() -> None:
    assert machine_line(MACHINE) == "Machine: Some CPU (2 cores), GPU none; torch 2.5.0, onnxruntime 1.20.0."
    with_trt = machine_line({**MACHINE, "gpu": "H100", "tensorrt": "10.3"}, note="shared cores")
    assert with_trt == ("Machine: Some CPU (2 cores, shared cores), GPU H100; torch 2.5.0, onnxruntime 1.20.0, "
                        "TensorRT 10.3.")


def test_paths_become_relative_to_the_repository_or_names(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "bench-1"
    assert portable(str(ROOT / "teacher" / "standin")) == "teacher/standin"
    assert portable(f"cd {ROOT} && ls") == "cd . && ls"
    assert portable(f"run_dir={run_dir} x", run_dir) == "run_dir=<run_dir> x"
    assert portable(f"`{run_dir}/final/student`", run_dir) == "`<run_dir>/final/student`"
    assert portable(f"model {tmp_path}/other/student.onnx ok") == "model student.onnx ok"
    # Not paths of this machine: relative paths, URLs, ratios, what was already replaced, ONNX node names.
    for text in ("runs/x/final", "./teacher/standin", "https://github.com/a/b", "px/s 1/4", "<run_dir>/final", "/",
                 "/model/gwc/*"):
        assert portable(text, run_dir) == text


def test_write_report_writes_portable_json_and_markdown(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    data = {"machine": MACHINE, "path": ROOT / "teacher" / "standin", "out": run_dir / "final",
            "elsewhere": [str(tmp_path / "a" / "b.json")], str(tmp_path / "key"): 1.5}
    md = f"# Report\n\n{machine_line(MACHINE)}\n\nFinal student: `{run_dir}/final` from {ROOT}/recipes/x.yaml"
    json_path, md_path = write_report(tmp_path / "out" / "bench-some-cpu", data, md, run_dir=run_dir)
    assert (json_path.name, md_path.name) == ("bench-some-cpu.json", "bench-some-cpu.md")
    assert json.loads(json_path.read_text()) == {
        "machine": MACHINE, "path": "teacher/standin", "out": "<run_dir>/final", "elsewhere": ["b.json"], "key": 1.5}
    text = md_path.read_text()
    assert text.endswith("x.yaml\n") and "`<run_dir>/final` from recipes/x.yaml" in text
    assert str(tmp_path) not in json_path.read_text() + text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench-some-cpu.json", "bench-some-cpu.md"]


def test_every_benchmark_writes_through_the_shared_writer() -> None:
    """One epilogue: no benchmark writes its JSON or Markdown report itself."""
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        source = script.read_text(encoding="utf-8")
        if script.name == "report.py" or "__main__" not in source:  # the writer itself, or a module scripts import
            continue
        assert "write_report(" in source, script.name
        assert 'with_suffix(".md")' not in source and '.md", ' not in source, script.name
