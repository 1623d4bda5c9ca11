"""Time the README's main job, ``ffsc run recipes/quickstart_cpu.yaml``, as a user runs it (a subprocess).

Reports wall time against the 5-minute goal on this machine, CPU time, peak memory and the final table
(teacher, every Pareto-front student and the final student) from the run's summary.json.

    python benchmarks/quickstart.py                                  # fresh run directory under runs/
    python benchmarks/quickstart.py --note "2 cores, nothing else running" search.n_trials=8

Writes benchmarks/results/quickstart-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from compress.atomic import atomic_write_text
from compress.latency import machine_info, machine_slug

GOAL_S = 300.0
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart_cpu.yaml"


def _fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def _markdown(data: dict) -> str:
    m, s = data["machine"], data["summary"]
    lines = [
        "# Quick start: `ffsc run recipes/quickstart_cpu.yaml`",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores{', ' + data['note'] if data['note'] else ''}), GPU "
        f"{m['gpu'] or 'none'}; torch {m['torch']}, onnxruntime {m['onnxruntime']}.",
        "",
        f"**Wall time {data['wall_s']:.0f} s** (goal: under {GOAL_S:.0f} s: "
        f"{'met' if data['goal_met'] else 'NOT met'}); "
        f"CPU time {data['cpu_s']:.0f} s; peak memory {data['max_rss_mb']:.0f} MB.",
        "",
        "| model | EPE vs GT (px) | EPE vs teacher (px) | latency (ms, side by side) | search-time latency (ms) "
        "| GMACs | params (M) |",
        "|---|---|---|---|---|---|---|",
    ]
    t = s["teacher"]
    lines.append(f"| teacher | {_fmt(t.get('gt/epe'))} | 0 | {_fmt(t.get('latency_ms'))} | - | "
                 f"{_fmt(t.get('gmacs'))} | {_fmt(t.get('mparams'), '{:.3f}')} |")
    for r in s["front"]:
        lines.append(f"| front trial {r['trial']} | {_fmt(r['epe_vs_gt'])} | {_fmt(r['epe_vs_teacher'])} | "
                     f"{_fmt(r['latency_ms'])} | {_fmt(r.get('search_latency_ms'))} | {_fmt(r['gmacs'])} | "
                     f"{_fmt(r['mparams'], '{:.3f}')} |")
    if s.get("final"):
        f = s["final"]
        steps = " pruned +" if s.get("pruned") else ""
        lines.append(f"| final (trial {s['chosen']['trial']}{steps} distilled) | {_fmt(f.get('gt/epe'))} | "
                     f"{_fmt(f.get('teacher/epe'))} | {_fmt(f.get('latency_ms'))} | - | {_fmt(f.get('gmacs'))} | "
                     f"{_fmt(f.get('mparams'), '{:.3f}')} |")
    if s.get("pruned"):
        p = s["pruned"]
        lines += ["", f"Pruning: {p['budget']} ({'met' if p['met'] else 'NOT met'}) in {p['steps']} step(s), "
                      f"GMACs {p['gmacs'][0]:.3f} -> {p['gmacs'][1]:.3f}, EPE vs teacher (unpruned / before / after "
                      f"recovery) {' / '.join(_fmt(v) for v in p['teacher_epe'])}."]
    lines += ["", f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the quick start once and write its timing and final table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides passed to ffsc run")
    parser.add_argument("--run-dir", default=None, help="default: runs/bench-quickstart-<time> (must be new)")
    parser.add_argument("--note", default="", help="a remark on the machine for the report")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir or ROOT / "runs" / time.strftime("bench-quickstart-%Y%m%d-%H%M%S"))
    if run_dir.exists():
        sys.exit(f"{run_dir} exists; the benchmark times a fresh run (a re-run would resume it)")
    ffsc = Path(sys.executable).with_name("ffsc")
    cmd = [str(ffsc) if ffsc.exists() else "ffsc", "run", str(RECIPE), f"run_dir={run_dir}", *args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"ffsc run failed with status {proc.returncode}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = machine_info()
    data = {
        "machine": info, "note": args.note, "wall_s": wall, "goal_s": GOAL_S, "goal_met": wall < GOAL_S,
        "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": usage.ru_maxrss / 1024,
        "run_dir": str(run_dir), "summary": json.loads((run_dir / "summary.json").read_text()),
        "command": "python benchmarks/quickstart.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    stem = Path(args.out) / f"quickstart-{machine_slug(info)}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(stem.with_suffix(".md"), _markdown(data))
    print(_markdown(data))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
