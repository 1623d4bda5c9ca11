"""Latency-predictor accuracy: per-block lookup table against direct measurement of sampled students.

Builds (or reuses) a per-block latency table for a search space on one backend, samples N students from the
space, predicts each one's latency from the table and measures the whole model with compress.latency.measure
on the same backend. Reports the median / mean absolute relative error (goal: median within 10%).

    python benchmarks/predictor.py                                  # tiny space, 30 students, ORT CPU, 64x128
    python benchmarks/predictor.py --scope samples --n 10           # table for the sampled students only

Writes ``benchmarks/results/predictor-<machine>.json`` and ``.md``; the table goes to
``benchmarks/results/latency-table-<machine>.json`` (reused by later runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from compress.latency import machine_info, machine_slug
from compress.latency_predictor import (
    LatencyTable,
    calibration_scale,
    evaluate_predictor,
    sample_configs,
    space_block_variants,
)
from search_spaces import load_space

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

GOAL = 0.10


def _shape(cfg: dict) -> list[str]:
    widths = "/".join(map(str, cfg["hourglass_widths"]))
    return ["/".join(map(str, cfg["backbone_dims"])), "/".join(map(str, cfg["backbone_depths"])),
            str(cfg["feature_dim"]), f"1/{cfg['volume_scale']}", f"{cfg['cv_groups']}+{cfg['concat_dim']}",
            str(cfg["volume_dim"]), widths, str(cfg["transformer_layers"]), str(cfg["gru_levels"]),
            str(cfg["hidden_dim"]), str(cfg["corr_radius"]), str(cfg["iters"])]


def _markdown(data: dict) -> str:
    m, ev, t = data["machine"], data["evaluation"], data["table"]
    s = data["settings"]
    lines = [
        f"# Latency predictor on the {s['space']} space ({ev['n']} students, {s['height']}x{s['width']})",
        "",
        machine_line(m, s["note"]),
        f"Backend: {ev['backend']} on {ev['device']}, {ev['precision']}; medians of {s['repeats']} runs after "
        f"{s['warmup']} warm-up runs (blocks and whole models alike), "
        + ("wall-clock time." if ev["clock"] == "wall" else "timed by the thread's CPU time (single-threaded runs)."),
        f"Table: {t['entries']} block variants stored ({t['measured_now']} measured in this run, "
        f"{t['build_seconds']:.0f} s); the space has {t['space_variants']} distinct block variants "
        f"(scope: {s['scope']}).",
        "",
        f"**Median absolute relative error: {100 * ev['median_abs_relative_error']:.1f}%** (goal: within "
        f"{100 * GOAL:.0f}%); mean {100 * ev['mean_abs_relative_error']:.1f}%, max "
        f"{100 * ev['max_abs_relative_error']:.1f}%.",
        *([] if ev["median_abs_remeasure_error"] is None else [
            "",
            f"Noise floor: measuring each student a second time (after all first measurements) differs from its "
            f"first measurement by a median {100 * ev['median_abs_remeasure_error']:.1f}% (column 'again').",
        ]),
        "",
        "| # | backbone | depths | feat | volume | groups+concat | vol dim | hourglass | trf | GRU | hidden | radius "
        "| iters | predicted ms | measured ms (p10-p90) | error | again ms |",
        "|" + "---|" * 17,
    ]
    for i, row in enumerate(ev["rows"]):
        again = "-" if row["remeasured_ms"] is None else f"{row['remeasured_ms']:.2f}"
        lines.append(f"| {i} | " + " | ".join(_shape(row["config"])) + f" | {row['predicted_ms']:.2f} | "
                     f"{row['measured_ms']:.2f} ({row['measured_p10_ms']:.2f}-{row['measured_p90_ms']:.2f}) | "
                     f"{100 * row['relative_error']:+.1f}% | {again} |")
    cal = data.get("calibrated")
    if cal:
        lines += ["", "**Calibrated as the search does: median absolute relative error "
                  f"{100 * cal['median_abs_error']:.1f}%** "
                  f"(mean {100 * cal['mean_abs_error']:.1f}%, max {100 * cal['max_abs_error']:.1f}%) on students "
                  f"{cal['first_tested']}-{ev['n'] - 1}, after scaling every prediction by {cal['scale']:.3f}, the "
                  f"median measured / predicted of students 0-{cal['calibration_students'] - 1} (what "
                  "`search.latency.check_students` measures at the start of a search)."]
    lines += ["", f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def calibrated(evaluation: dict, k: int) -> dict | None:
    """Out-of-sample error after the search's calibration: scale from the first k students, tested on the rest."""
    rows = evaluation["rows"]
    if not 0 < k < len(rows):
        return None
    scale = calibration_scale((r["predicted_ms"], r["measured_ms"]) for r in rows[:k])
    errors = [abs(scale * r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows[k:]]
    return {"calibration_students": k, "first_tested": k, "scale": scale,
            "median_abs_error": statistics.median(errors), "mean_abs_error": statistics.fmean(errors),
            "max_abs_error": max(errors)}


def main(argv: list[str] | None = None) -> int:
    """Build the table, evaluate the predictor, write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--n", type=int, default=30, help="students to sample and measure")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (1 keeps a shared CPU's timings steady)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall time, or the thread's CPU time (with --threads 1: steady on shared cores)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scope", choices=["space", "samples"], default="space",
                        help="measure every block variant of the space, or only those of the sampled students")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure every student twice: how much two measurements disagree on this machine")
    parser.add_argument("--table", default=None, help="table JSON (default: results/latency-table-<machine>.json)")
    parser.add_argument("--note", default="", help="a remark on the machine for the report (e.g. shared cores)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--calibrate", type=int, default=5,
                        help="students whose measured / predicted ratio calibrates the rest, as the search does")
    parser.add_argument("--rerender", metavar="JSON", help="recompute the calibrated error and the Markdown of an "
                        "earlier result without measuring again")
    args = parser.parse_args(argv)
    if args.rerender:
        path = Path(args.rerender)
        data = json.loads(path.read_text())
        data["calibrated"] = calibrated(data["evaluation"], args.calibrate)
        write_report(path.with_suffix(""), data, _markdown(data))
        print(f"rewrote {path} and its .md")
        return 0

    info = machine_info()
    slug = machine_slug(info)
    out = Path(args.out)
    table_path = Path(args.table) if args.table else out / f"latency-table-{slug}.json"
    space = load_space(args.space)
    table = LatencyTable(table_path, backend=args.backend, device=args.device, precision=args.precision,
                         threads=args.threads, warmup=args.warmup, repeats=args.repeats, clock=args.clock)
    configs = sample_configs(space, args.n, seed=args.seed)
    start = time.perf_counter()
    measured = table.build(space, args.height, args.width, configs=None if args.scope == "space" else configs)
    build_seconds = time.perf_counter() - start
    print(f"latency table: {measured} block variants measured in {build_seconds:.0f} s, {len(table)} stored",
          flush=True)
    evaluation = evaluate_predictor(space, args.n, args.height, args.width, table, warmup=args.warmup,
                                    repeats=args.repeats, configs=configs, remeasure=args.remeasure)
    data = {
        "machine": info,
        "settings": {**vars(args), "table": str(table_path)},
        "table": {"path": str(table_path), "entries": len(table), "measured_now": measured,
                  "build_seconds": build_seconds,
                  "space_variants": len(space_block_variants(space, args.height, args.width))},
        "evaluation": evaluation.to_dict(),
        "calibrated": calibrated(evaluation.to_dict(), args.calibrate),
        "command": " ".join(["python benchmarks/predictor.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    stem = f"predictor-{slug}" + ("" if args.space == "tiny" else f"-{args.space}-{args.height}x{args.width}")
    stem += "" if args.clock == "wall" else f"-{args.clock}-clock"
    write_report(out / stem, data, _markdown(data))
    ev = evaluation
    print(f"median |error| {100 * ev.median_abs_relative_error:.1f}%, mean {100 * ev.mean_abs_relative_error:.1f}% "
          f"over {len(ev.rows)} students -> {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
