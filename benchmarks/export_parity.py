"""ONNX export parity of every student preset and the FoundationStereo teacher at one image size.

Each model (random weights, seed 0) is exported with ``to_onnx`` (TorchScript exporter, onnxslim, TensorRT
lint) and run by ONNX Runtime (CPU, float32) on a random stereo pair; the report gives the largest
|ONNX Runtime - PyTorch| disparity per model. The issue's bar: below 1e-2 px at 480x640.

    python benchmarks/export_parity.py                      # all presets + teacher:vits at 480x640
    python benchmarks/export_parity.py --models tiny --height 64 --width 128

Writes ``benchmarks/results/export-parity-<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from compress.export import to_onnx
from compress.latency import machine_info, machine_slug
from compress.models import resolve_model
from search_spaces import PRESETS

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

BAR_PX = 1e-2


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# ONNX export parity at {report['height']}x{report['width']} (float32)",
        "",
        machine_line(m),
        "Random weights (seed 0), one random stereo pair; ONNX Runtime CPU against PyTorch eager. "
        f"Bar: max abs diff below {BAR_PX:g} px.",
        "",
        "| model | iters | max abs diff (px) | below bar | nodes | ONNX MB | TensorRT lint (err/warn) | export s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['iters']} | failed: {r['error']} | no | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['iters']} | {r['max_abs_diff']:.2e} | "
                     f"{'yes' if r['max_abs_diff'] < BAR_PX else 'NO'} | {r['nodes']} | {r['onnx_mb']:.1f} | "
                     f"{r['lint_errors']}/{r['lint_warnings']} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"Command: `{report['command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Export each model, check parity, write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*PRESETS, "teacher:vits"],
                        help="preset names and/or teacher:<vit> (default: every preset and teacher:vits)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--teacher-iters", type=int, default=4, help="GRU iterations of the teacher export")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    info = machine_info()
    results = []
    for spec in args.models:
        resolved = resolve_model(spec)
        iters = args.teacher_iters if resolved.is_teacher else resolved.default_iters
        print(f"{spec}: exporting at {args.height}x{args.width}, {iters} iterations ...", flush=True)
        row: dict = {"model": spec, "iters": iters}
        with tempfile.TemporaryDirectory(prefix="ffsc-parity-") as tmp:
            start = time.perf_counter()
            try:
                report = to_onnx(resolved.module, Path(tmp) / "model.onnx", args.height, args.width, iters)
            except Exception as err:  # one failing model must not lose the others' numbers
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                print(f"  failed: {row['error']}", flush=True)
                results.append(row)
                continue
        row.update(max_abs_diff=report.max_abs_diff, nodes=report.node_count, onnx_mb=report.onnx_bytes / 1e6,
                   lint_errors=sum(f.severity == "error" for f in report.lint),
                   lint_warnings=sum(f.severity == "warning" for f in report.lint),
                   keep_fp32_nodes=report.keep_fp32_nodes, seconds=time.perf_counter() - start)
        print(f"  max abs diff {report.max_abs_diff:.3e} px, {report.node_count} nodes, {row['seconds']:.0f} s",
              flush=True)
        results.append(row)
        del resolved

    out = Path(args.out)
    stem = f"export-parity-{machine_slug(info)}"
    data = {"machine": info, "height": args.height, "width": args.width, "bar_px": BAR_PX, "results": results,
            "command": " ".join(["python benchmarks/export_parity.py", *(argv if argv is not None else sys.argv[1:])])}
    write_report(out / stem, data, _markdown(data))
    print(f"wrote {out / stem}.json and .md")
    return 0 if all("error" not in r and r["max_abs_diff"] < BAR_PX for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
