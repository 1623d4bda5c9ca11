"""Prune 60% of the Fast-FoundationStereo-shaped student's refinement on this machine and recover it.

Reports, from one run: latency before and after pruning (same backend, size, threads; their ratio), MACs and
parameters, and the EPE against the teacher of the unpruned student, of the pruned one before recovery and
after a short fixed recovery distillation (also against the unpruned student itself).

The teacher (``--teacher tiny``, the default) is a tiny FoundationStereo with random weights (no official
checkpoint ships with ffsc): the EPE numbers show the mechanics (pruning damage, recovery), not stereo
accuracy; the student is first distilled briefly from it so that pruning starts from a trained model.
``--teacher self`` distils from the unpruned student instead (what ``ffsc prune`` does without --teacher), so
the EPE is the pruned model's disagreement with the model it came from.

    python benchmarks/prune.py                               # defaults below, about 10 minutes on 2 CPU cores
    python benchmarks/prune.py --ratio 0.5 --backend onnxruntime --latency-height 480 --latency-width 640

Writes benchmarks/results/prune-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from compress.data import SyntheticConfig
from compress.evaluation import evaluate_student
from compress.latency import machine_info, machine_slug, measure_together
from compress.prune import PruneConfig, build_samples, prune_once
from compress.prune.config import DataSpec, DistillSpec
from compress.prune.recovery import Distiller
from search_spaces import build_student, count_macs, preset
from teacher import FoundationStereo, TeacherConfig

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

TEACHERS = {
    "tiny": "tiny FoundationStereo (vitt, hidden 32) with **random weights**, so the EPE columns show the "
            "mechanics (damage and recovery), not accuracy",
    "self": "the unpruned student itself (random weights, seed 0): the EPE is the pruned model's disagreement "
            "with the model it was pruned from",
}


def _epe(model, distiller, n: int, iters: int, reference: list[torch.Tensor] | None = None) -> float:
    disps = reference if reference is not None else [t.disp for t in distiller.targets[:n]]
    return evaluate_student(model, distiller.samples[:n], iters=iters, teacher_disps=disps[:n])["teacher/epe"]


def _latencies(models: dict, args) -> dict[str, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices of the ONNX export behind the onnxruntime backend
        stats = measure_together(models, args.backend, args.latency_height, args.latency_width, iters=args.iters,
                                 rounds=args.rounds, warmup=args.warmup, repeats=args.repeats,
                                 intra_op_threads=args.threads, progress=True)
    return {name: st.to_dict() for name, st in stats.items()}


def _markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    b, p = r["unpruned"], r["pruned"]
    lines = [
        f"# Pruning {s['ratio']:.0%} of the {s['preset']} student's {'+'.join(s['scope'])}",
        "",
        machine_line(m),
        f"Latency: {s['backend']} on {b['latency']['device']}, {s['latency_size'][0]}x{s['latency_size'][1]}, "
        f"{s['iters']} GRU iterations, fp32; {s['rounds']} rounds alternating the unpruned and the pruned model "
        f"in one process, each a median of {s['repeats']} runs after {s['warmup']} warm-up; the table gives the "
        "median over rounds.",
        "",
        f"Teacher: {s['teacher_description']}. Student: randomly initialised (seed 0), distilled "
        f"{s['pre_steps']} steps from the teacher before pruning. Data: {s['samples']} synthetic pairs at "
        f"{s['size'][0]}x{s['size'][1]} "
        f"(EPE on the first {s['eval_samples']}). Importance: {s['importance']}; widths rounded to "
        f"{s['round_to']}; recovery: {s['recovery_steps']} distillation steps (lr {s['lr']:g}).",
        "",
        "| | unpruned | pruned |",
        "|---|---|---|",
        f"| latency median (ms) | {b['latency']['median_ms']:.1f} | {p['latency']['median_ms']:.1f} |",
        f"| latency p10-p90 (ms) | {b['latency']['p10_ms']:.1f}-{b['latency']['p90_ms']:.1f} | "
        f"{p['latency']['p10_ms']:.1f}-{p['latency']['p90_ms']:.1f} |",
        f"| GMACs ({s['latency_size'][0]}x{s['latency_size'][1]}, {s['iters']} iters) | {b['gmacs']:.2f} | "
        f"{p['gmacs']:.2f} |",
        f"| parameters (M) | {b['mparams']:.2f} | {p['mparams']:.2f} |",
        f"| EPE vs teacher (px) | {b['epe_teacher']:.3f} | {p['epe_teacher_before_recovery']:.3f} before recovery, "
        f"{p['epe_teacher_after_recovery']:.3f} after |",
        f"| EPE vs unpruned student (px) | 0 | {p['epe_unpruned_before_recovery']:.3f} before recovery, "
        f"{p['epe_unpruned_after_recovery']:.3f} after |",
        "",
        f"Latency ratio pruned/unpruned: **{r['latency_ratio']:.3f}** (per round: "
        f"{', '.join(f'{x:.3f}' for x in r['latency_ratio_per_round'])}); MACs ratio: **{r['macs_ratio']:.3f}**; "
        f"{r['groups_pruned']} channel groups pruned. Total time {r['seconds']:.0f} s. System load average "
        f"(1 min) {r['load_average']['start'][0]:.1f} at the start, {r['load_average']['end'][0]:.1f} at the end"
        f"{'; ' + r['note'] if r['note'] else ''}.",
        "",
        "Pruned widths (group root: before -> after):",
        "",
        *[f"- `{k}`: {v[0]} -> {v[1]}" for k, v in r["widths"].items()],
        "",
        f"Command: `{r['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast_foundationstereo")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--scope", default="refinement")
    parser.add_argument("--importance", default="taylor", choices=("taylor", "magnitude", "random"))
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--height", type=int, default=64, help="distillation / evaluation size")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--pre-steps", type=int, default=0, help="distil the unpruned student first (tiny teacher)")
    parser.add_argument("--recovery-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--teacher", default="tiny", choices=("tiny", "self"))
    parser.add_argument("--teacher-iters", type=int, default=8)
    parser.add_argument("--train-iters", type=int, default=4)
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--latency-height", type=int, default=256)
    parser.add_argument("--latency-width", type=int, default=512)
    parser.add_argument("--iters", type=int, default=None, help="GRU iterations timed (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate unpruned/pruned timing this many times (a shared machine's load drifts)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--note", default="", help="free text for the report (e.g. what else shared the machine)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()
    scope = [p.strip() for p in args.scope.split(",") if p.strip()]

    torch.manual_seed(0)
    student = build_student(preset(args.preset)).eval()
    args.iters = args.iters or student.cfg.iters
    torch.manual_seed(0)
    if args.teacher == "self":
        teacher, args.pre_steps, args.teacher_iters = copy.deepcopy(student), 0, args.iters
    else:
        teacher = FoundationStereo(TeacherConfig(vit_size="vitt", hidden_dims=[32, 32, 32],
                                                 max_disp=student.cfg.max_disp, mixed_precision=False)).eval()
    synthetic = SyntheticConfig(height=args.height, width=args.width, max_disp=min(32.0, args.width / 4))
    cfg = PruneConfig(data=DataSpec(num_samples=args.samples, size=[args.height, args.width], synthetic=synthetic))
    samples = build_samples(cfg)
    distiller = Distiller(teacher, samples, torch.device("cpu"), args.teacher_iters, args.train_iters,
                          progress=True)
    optim = dataclasses.replace(DistillSpec().optim, lr=args.lr)  # prune's recovery optimiser at this lr
    n_eval = min(args.eval_samples, len(samples))
    if args.pre_steps:
        print(f"distilling the unpruned student for {args.pre_steps} steps", file=sys.stderr)
        distiller.train(student, args.pre_steps, optim, desc="pre-distillation", progress=True)
    student.eval()
    unpruned = copy.deepcopy(student)
    with torch.no_grad():
        reference = [unpruned(s["left"][None], s["right"][None], iters=args.iters, test_mode=True)
                     for s in samples[:n_eval]]

    def cost(model) -> dict:
        c = count_macs(model, args.latency_height, args.latency_width, iters=args.iters)
        return {"gmacs": c.gmacs, "mparams": c.params / 1e6}

    before = {**cost(student), "epe_teacher": _epe(student, distiller, n_eval, args.iters)}
    loss_fn = (lambda model, idxs: distiller.loss_of(model, idxs)[0]) if args.importance == "taylor" else None
    calib = [[i] for i in range(min(4, len(samples)))]
    changed = prune_once(student, args.ratio, scope, importance=args.importance, round_to=args.round_to,
                         loss_fn=loss_fn, batches=calib)
    student.eval()
    latency = _latencies({"unpruned": unpruned, "pruned": student}, args)
    before["latency"] = latency["unpruned"]
    after = {**cost(student), "latency": latency["pruned"],
             "epe_teacher_before_recovery": _epe(student, distiller, n_eval, args.iters),
             "epe_unpruned_before_recovery": _epe(student, distiller, n_eval, args.iters, reference)}
    distiller.train(student, args.recovery_steps, optim, desc="recovery", progress=True)
    student.eval()
    after["epe_teacher_after_recovery"] = _epe(student, distiller, n_eval, args.iters)
    after["epe_unpruned_after_recovery"] = _epe(student, distiller, n_eval, args.iters, reference)

    info = machine_info()
    report = {
        "machine": info,
        "settings": {
            "preset": args.preset, "ratio": args.ratio, "scope": scope, "importance": args.importance,
            "round_to": args.round_to, "size": [args.height, args.width], "samples": len(samples),
            "eval_samples": n_eval, "pre_steps": args.pre_steps, "recovery_steps": args.recovery_steps,
            "lr": args.lr, "teacher": args.teacher, "teacher_description": TEACHERS[args.teacher],
            "teacher_iters": args.teacher_iters, "train_iters": args.train_iters, "backend": args.backend,
            "latency_size": [args.latency_height, args.latency_width], "iters": args.iters,
            "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds, "threads": args.threads,
        },
        "unpruned": before,
        "pruned": after,
        "latency_ratio": after["latency"]["median_ms"] / before["latency"]["median_ms"],
        "latency_ratio_per_round": [a / b for b, a in zip(before["latency"]["round_medians_ms"],
                                                          after["latency"]["round_medians_ms"], strict=True)],
        "macs_ratio": after["gmacs"] / before["gmacs"],
        "groups_pruned": len(changed),
        "widths": {k: list(v) for k, v in changed.items()},
        "seconds": time.perf_counter() - start,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "note": args.note,
        "command": "python benchmarks/prune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    stem = out / f"prune-{args.teacher}-teacher-{machine_slug(info)}"
    write_report(stem, report, _markdown(report))
    print(_markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
