"""Time a recipe's whole run as a user runs it (``ffsc run``, a subprocess): by default the README's main job,
``recipes/quickstart_cpu.yaml``.

Reports wall time against the recipe's goal on this machine, CPU time, peak memory and the final table (teacher,
every Pareto-front student and the final student, with their scores on the held-out real pairs and OpenCV SGBM
beside them) from the run's summary.json, the goals the recipe is held to, and a picture of the teacher's, the
final student's and SGBM's disparity of the first real pair.

    python benchmarks/quickstart.py                                  # fresh run directory under runs/
    python benchmarks/quickstart.py --note "2 cores, nothing else running" search.n_trials=8
    python benchmarks/quickstart.py --recipe recipes/cpu_realtime.yaml --goal-s 3600
    python benchmarks/quickstart.py --recipe recipes/cpu_realtime.yaml --finished runs/cpu_realtime-x  # report a run

Writes benchmarks/results/<recipe name>-<machine>.{json,md,png} (quickstart-<machine> for the quick start).
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

import numpy as np
import yaml

from compress.atomic import atomic_write
from compress.latency import machine_info, machine_slug
from compress.models import resolve_model
from compress.pipeline import RunRecipe
from compress.pipeline.standin import SHIPPED_DIR
from compress.real_pairs import load_real_pairs, predict_disparity, sgbm, sgbm_num_disparities
from compress.structured import load_record

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

GOAL_S = 300.0
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart_cpu.yaml"
GOALS = {  # what issue-level goals each shipped recipe is held to on the real pair (BP-2 in %)
    "quickstart": {"max_retention": 1.5, "beat_sgbm": True},
    "cpu_realtime": {"max_retention": 1.25, "min_speedup": 4.0},
}


def _fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def _markdown(data: dict) -> str:
    m, s = data["machine"], data["summary"]
    lines = [
        f"# `ffsc run {data.get('recipe', 'recipes/quickstart_cpu.yaml')}`",
        "",
        machine_line(m, data["note"]),
        "",
        f"**Wall time {data['wall_s']:.0f} s** (goal: under {data.get('goal_s', GOAL_S):.0f} s: "
        f"{'met' if data['goal_met'] else 'NOT met'})"
        + (f"; CPU time {data['cpu_s']:.0f} s; peak memory {data['max_rss_mb']:.0f} MB." if data.get("cpu_s") else "."),
        "",
        "| model | EPE vs GT (px) | EPE vs teacher (px) | real EPE (px) | real BP-2 (%) | latency (ms, side by side) "
        "| search-time latency (ms) | GMACs | params (M) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t = s["teacher"]
    lines.append(f"| teacher | {_fmt(t.get('gt/epe'))} | 0 | {_fmt(t.get('real_epe'))} | "
                 f"{_fmt(t.get('real_bp2'), '{:.1f}')} | {_fmt(t.get('latency_ms'))} | - | {_fmt(t.get('gmacs'))} | "
                 f"{_fmt(t.get('mparams'), '{:.3f}')} |")
    sgbm = s.get("real_pairs", {}).get("scores", {}).get("sgbm")
    if sgbm:
        lines.append(f"| OpenCV SGBM (real pairs only) | - | - | {_fmt(sgbm['mean']['epe'])} | "
                     f"{_fmt(sgbm['mean']['bp2'], '{:.1f}')} | - | - | - | - |")
    for r in s["front"]:
        lines.append(f"| front trial {r['trial']} | {_fmt(r['epe_vs_gt'])} | {_fmt(r['epe_vs_teacher'])} | "
                     f"{_fmt(r.get('real_epe'))} | {_fmt(r.get('real_bp2'), '{:.1f}')} | "
                     f"{_fmt(r['latency_ms'])} | {_fmt(r.get('search_latency_ms'))} | {_fmt(r['gmacs'])} | "
                     f"{_fmt(r['mparams'], '{:.3f}')} |")
    if s.get("final"):
        f = s["final"]
        steps = " pruned +" if s.get("pruned") else ""
        lines.append(f"| final (trial {s['chosen']['trial']}{steps} distilled) | {_fmt(f.get('gt/epe'))} | "
                     f"{_fmt(f.get('teacher/epe'))} | {_fmt(f.get('real_epe'))} | "
                     f"{_fmt(f.get('real_bp2'), '{:.1f}')} | {_fmt(f.get('latency_ms'))} | - | "
                     f"{_fmt(f.get('gmacs'))} | {_fmt(f.get('mparams'), '{:.3f}')} |")
    real = s.get("real_pairs")
    if real:
        lines += ["", f"Real pairs: {', '.join(real['pairs'])} at {'x'.join(map(str, real['size']))}, held out: "
                      "never trained on and never used to choose a student. Dense metrics on the ground-truth pixels "
                      "whose match lies inside the right image; SGBM's holes count as bad pixels."]
    if data.get("goals"):
        lines += ["", "Goals: " + "; ".join(f"{g['what']}: {g['value']} ({'met' if g['met'] else 'NOT met'})"
                                            for g in data["goals"]) + "."]
    if data.get("png"):
        lines += ["", f"Disparity of the first real pair: `{data['png']}`."]
    if s.get("pruned"):
        p = s["pruned"]
        lines += ["", f"Pruning: {p['budget']} ({'met' if p['met'] else 'NOT met'}) in {p['steps']} step(s), "
                      f"GMACs {p['gmacs'][0]:.3f} -> {p['gmacs'][1]:.3f}, EPE vs teacher (unpruned / before / after "
                      f"recovery) {' / '.join(_fmt(v) for v in p['teacher_epe'])}."]
    lines += ["", f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def goals(summary: dict, recipe_name: str) -> list[dict]:
    """The recipe's goals on the real pair (retention, beating SGBM, speedup), each with its value and verdict."""
    want, out = GOALS.get(recipe_name, {}), []
    final, teacher = summary.get("final") or {}, summary.get("teacher") or {}
    if "real_retention" in final and "max_retention" in want:
        out.append({"what": f"final BP-2 at most {want['max_retention']}x the teacher's",
                    "value": f"{final['real_retention']:.2f}x",
                    "met": final["real_retention"] <= want["max_retention"]})
    sgbm = summary.get("real_pairs", {}).get("scores", {}).get("sgbm")
    if sgbm and want.get("beat_sgbm") and "real_bp2" in final:
        out.append({"what": "final BP-2 below SGBM's", "met": final["real_bp2"] < sgbm["mean"]["bp2"],
                    "value": f"{final['real_bp2']:.1f}% vs {sgbm['mean']['bp2']:.1f}%"})
    if "min_speedup" in want and final.get("latency_ms") and teacher.get("latency_ms"):
        speedup = teacher["latency_ms"] / final["latency_ms"]
        out.append({"what": f"final at least {want['min_speedup']:g}x faster than the teacher (side by side)",
                    "value": f"{speedup:.2f}x", "met": speedup >= want["min_speedup"]})
    return out


def picture(summary: dict, path: Path) -> bool:
    """Left image, ground truth, teacher, final student and SGBM disparity of the first real pair, side by side."""
    # optional (ffsc[bench]) and slow to import: only to draw the picture
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    run_dir = Path(summary["run_dir"])
    recipe = load_record(RunRecipe, run_dir / "recipe.yaml", "recorded recipe")
    pairs = load_real_pairs(recipe.real_pairs)
    if not pairs or not summary.get("final"):
        return False
    pair = pairs[0]
    teacher_path = summary["teacher"].get("path") or recipe.teacher.checkpoint or {
        "shipped": SHIPPED_DIR, "train": run_dir / "teacher"}.get(recipe.teacher.stand_in, recipe.teacher.stand_in)
    teacher = resolve_model(teacher_path, config=recipe.teacher.architecture(),
                            trust_checkpoint=recipe.teacher.trust_checkpoint).module
    maps = {"left": pair.left, "ground truth": pair.gt}
    maps["teacher"] = predict_disparity(teacher, pair, summary["teacher"].get("iters"), "cpu")
    final = resolve_model(summary["final"]["path"]).module
    maps["final student"] = predict_disparity(final, pair, final.cfg.iters, "cpu")
    maps["OpenCV SGBM"] = sgbm(pair.left, pair.right, sgbm_num_disparities(pair.gt))
    scores = summary["real_pairs"]["scores"]
    titles = {"teacher": scores["teacher"][pair.name], "final student": scores["final"][pair.name],
              "OpenCV SGBM": scores.get("sgbm", {}).get(pair.name)}
    vmax = float(np.nanmax(np.where(np.isfinite(pair.gt), pair.gt, np.nan)))
    cmap = colormaps["turbo"].with_extremes(bad="black")
    fig = Figure(figsize=(3.4 * len(maps), 3.0), dpi=100, layout="constrained")
    for i, (name, im) in enumerate(maps.items()):
        ax = fig.add_subplot(1, len(maps), i + 1)
        ax.set_axis_off()
        if name == "left":
            ax.imshow(im)
            ax.set_title(f"{pair.name} (left)", fontsize=9)
            continue
        valid = np.isfinite(im) & (im > 0)
        ax.imshow(np.where(valid, im, np.nan), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        m = titles.get(name)
        ax.set_title(name if m is None else f"{name}: EPE {m['epe']:.2f}, BP-2 {m['bp2']:.1f}%", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return True


def main(argv: list[str] | None = None) -> int:
    """Run a recipe once (or read a finished run) and write its timing, final table, goals and picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides passed to ffsc run")
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe to run (default: the quick start)")
    parser.add_argument("--goal-s", type=float, default=None, help=f"wall-time goal (default: {GOAL_S:.0f} s for the "
                        "quick start, 3600 s otherwise)")
    parser.add_argument("--run-dir", default=None, help="default: runs/bench-<recipe>-<time> (must be new)")
    parser.add_argument("--finished", default=None, help="report a finished run directory instead of running one "
                        "(its wall time is the one its summary.json recorded)")
    parser.add_argument("--wall-s", type=float, default=None, help="with --finished: the run's wall time, in place of "
                        "the one summary.json recorded over all its calls (seconds_total)")
    parser.add_argument("--note", default="", help="a remark on the machine for the report")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    recipe_path = Path(args.recipe)
    name = yaml.safe_load(recipe_path.read_text()).get("name", recipe_path.stem)
    goal = args.goal_s or (GOAL_S if name == "quickstart" else 3600.0)
    if args.finished:
        run_dir = Path(args.finished)
        summary = json.loads((run_dir / "summary.json").read_text())
        # seconds_total: every call on the directory (older summaries recorded the last call's seconds only)
        wall, cpu, rss = float(args.wall_s or summary.get("seconds_total") or summary["seconds"]), None, None
    else:
        run_dir = Path(args.run_dir or ROOT / "runs" / time.strftime(f"bench-{name}-%Y%m%d-%H%M%S"))
        if run_dir.exists():
            sys.exit(f"{run_dir} exists; the benchmark times a fresh run (a re-run would resume it)")
        ffsc = Path(sys.executable).with_name("ffsc")
        cmd = [str(ffsc) if ffsc.exists() else "ffsc", "run", str(recipe_path), f"run_dir={run_dir}", *args.overrides]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"ffsc run failed with status {proc.returncode}")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        summary = json.loads((run_dir / "summary.json").read_text())
    info = machine_info()
    stem = Path(args.out) / f"{name.replace('_', '-')}-{machine_slug(info)}"
    png = stem.with_suffix(".png") if picture(summary, stem.with_suffix(".png")) else None
    data = {
        "recipe": str(recipe_path.relative_to(ROOT) if recipe_path.is_absolute() else recipe_path),
        "machine": info, "note": args.note, "wall_s": wall, "goal_s": goal, "goal_met": wall < goal,
        "cpu_s": cpu, "max_rss_mb": rss, "summary": summary, "goals": goals(summary, name),
        "png": png.name if png else None,
        "command": "python benchmarks/quickstart.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    _, md_path = write_report(stem, data, _markdown(data), run_dir=run_dir)
    print(md_path.read_text())
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
