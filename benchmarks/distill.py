"""Distil the Fast-FoundationStereo-shaped student from a teacher on synthetic stereo, for a fixed budget.

Reports the student's EPE against ground truth and against the teacher before and after distillation,
and plots every loss curve. The teacher is a stand-in trained here on the synthetic ground truth (no
official checkpoint ships with ffsc), or the official one with --teacher-checkpoint.

    python benchmarks/distill.py                        # 300 steps at 64x128 on this machine
    python benchmarks/distill.py --steps 2000 --height 128 --width 256

Writes benchmarks/results/distill-<machine>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from compress.device import pick_device
from compress.distill.config import StudentSpec, from_label_cache
from compress.distill.trainer import distill
from compress.evaluation import evaluate_student
from compress.latency import machine_info, machine_slug
from compress.models import resolve_model, student_from_spec
from compress.pipeline import labels_config, load_run_recipe, prepare_labels, quiet_third_party, teacher_scores
from compress.pipeline.teacher_stage import get_teacher

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report


def _plot(metrics_file: Path, out_png: Path, title: str) -> None:
    from matplotlib.figure import Figure  # optional (ffsc[bench]) and slow to import: only to draw the plot

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    keys = sorted({k for r in train for k in r if k.startswith("loss/")})
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    for k in keys:
        pts = [(r["step"], r[k]) for r in train if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k.removeprefix("loss/"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON, Markdown and PNG."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast_foundationstereo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--teacher-steps", type=int, default=300, help="stand-in teacher training steps")
    parser.add_argument("--work-dir", default="runs/bench-distill")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    quiet_third_party()
    start = time.perf_counter()
    synth = f"{{height: {args.height}, width: {args.width}, max_disp: {args.width // 5}, num_objects: 4"
    overrides = [
        f"run_dir={args.work_dir}", f"height={args.height}", f"width={args.width}",
        f"data.train={{kind: synthetic, num_samples: {args.train_samples}, synthetic: {synth}, seed: 0}}}}",
        f"data.eval={{kind: synthetic, num_samples: {args.eval_samples}, synthetic: {synth}, seed: 1000}}}}",
        f"teacher.train.steps={args.teacher_steps}", "teacher.stand_in=train",
    ]
    if args.teacher_checkpoint:
        overrides.append(f"teacher.checkpoint={args.teacher_checkpoint}")
    recipe = load_run_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart_cpu.yaml", overrides)
    run_dir = Path(args.work_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(None)
    teacher = get_teacher(recipe, run_dir, device)
    labels_dir, eval_set = prepare_labels(recipe, run_dir, teacher, device)
    spec = StudentSpec(kind="search_space", preset=args.preset)
    torch.manual_seed(0)
    before_model = student_from_spec(spec).to(device)
    iters = before_model.cfg.iters
    before = evaluate_student(before_model, eval_set, iters=iters, device=device)
    dc = from_label_cache(
        run_dir / "student", spec, recipe.data.train, labels_dir, labels_config(recipe), iters, seed=0,
        steps=args.steps, batch_size=args.batch_size, device=str(device), log_every=max(1, args.steps // 50),
        checkpoint_every=max(1, args.steps // 4), progress=True, loss=recipe.loss,
        optim=dataclasses.replace(recipe.optim, lr=5e-4, warmup_steps=20),
    )
    t0 = time.perf_counter()
    result = distill(dc)
    train_s = time.perf_counter() - t0
    after = evaluate_student(resolve_model(result.student_path).module.to(device), eval_set, iters=iters,
                             device=device)
    machine = machine_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"distill-{machine_slug(machine)}"
    _plot(run_dir / "student" / "metrics.jsonl", stem.with_suffix(".png"),
          f"{args.preset} distilled from {'official' if args.teacher_checkpoint else 'stand-in'} teacher")
    report = {
        "benchmark": "distill", "machine": machine, "preset": args.preset, "steps": args.steps,
        "batch_size": args.batch_size, "size": [args.height, args.width], "iters": iters,
        "teacher": teacher.description, "teacher_vs_gt": teacher_scores(eval_set),
        "before": before, "after": after, "final_train_losses": result.train_losses,
        "train_seconds": train_s, "total_seconds": time.perf_counter() - start,
    }
    md = [
        "# Distillation benchmark", "",
        machine_line(machine),
        f"{args.preset}, {args.steps} steps x batch {args.batch_size} at {args.height}x{args.width}, "
        f"{iters} GRU iterations, {train_s:.0f} s of training. Teacher: {teacher.description}.", "",
        "| | EPE vs GT (px) | D1 vs GT (%) | EPE vs teacher (px) |", "|---|---|---|---|",
        f"| teacher | {report['teacher_vs_gt'].get('gt/epe', float('nan')):.2f} | "
        f"{report['teacher_vs_gt'].get('gt/d1', float('nan')):.1f} | 0 |",
        f"| student before | {before['gt/epe']:.2f} | {before['gt/d1']:.1f} | {before['teacher/epe']:.2f} |",
        f"| student after | {after['gt/epe']:.2f} | {after['gt/d1']:.1f} | {after['teacher/epe']:.2f} |",
        "", f"Loss curves: `{stem.with_suffix('.png').name}`.",
    ]
    write_report(stem, report, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
