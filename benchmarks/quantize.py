"""INT8 post-training quantization vs fp32 in ONNX Runtime on this CPU: latency ratio and EPE change.

Models (trained here, cheaply, because EPE of random weights means nothing):

- ``quickstart``: the quick start's stand-in teacher (``quickstart_teacher``, 120 steps on synthetic ground
  truth, as ``ffsc run recipes/quickstart_cpu.yaml`` trains it) and a ``tiny``-space student (the ``tiny``
  preset) distilled from it for 100 steps, the quick start's final distillation budget. It stands in for the
  quick start's final student (which is a NAS-chosen, pruned member of the same space).
- ``fast_foundationstereo``: the Fast-FoundationStereo-shaped preset distilled from the same teacher for
  ``--ffs-steps`` steps (trained enough to predict structured disparity; not a converged model).

Both are trained at 64x128 (the quick start's size) and exported, calibrated and evaluated at 256x320 on
synthetic stereo: calibration frames from one seed, held-out pairs from another. fp32 and INT8 are timed
side by side in alternating rounds with one ONNX Runtime thread each (``OMP_NUM_THREADS=1``,
``intra_op_num_threads=1``), timed by the thread's CPU clock (other jobs on the shared cores do not inflate it).

    OMP_NUM_THREADS=1 python benchmarks/quantize.py                # both models
    OMP_NUM_THREADS=1 python benchmarks/quantize.py --prepare-only # train the models only (cached in --work-dir)

Writes benchmarks/results/quantize-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from compress.distill.config import StudentSpec, from_label_cache
from compress.distill.trainer import distill
from compress.export import to_onnx
from compress.latency import machine_info, machine_slug
from compress.models import resolve_model
from compress.pipeline import labels_config, load_run_recipe, prepare_labels, quiet_third_party
from compress.pipeline.teacher_stage import get_teacher
from compress.quantize import QuantizeConfig, quantize_onnx
from compress.quantize import write_report as write_quantize_report
from search_spaces import preset as get_preset

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

ROOT = Path(__file__).resolve().parent.parent


def _recipe(work_dir: Path):
    return load_run_recipe(ROOT / "recipes" / "quickstart_cpu.yaml", [f"run_dir={work_dir}", "progress=true"])


def prepare_models(work_dir: Path, ffs_steps: int, names: tuple[str, ...] = ("quickstart", "fast_foundationstereo"),
                   ) -> dict[str, dict]:
    """Train (or reuse) the stand-in teacher and the two distilled students; returns name -> info."""
    quiet_third_party()
    recipe = _recipe(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    teacher = get_teacher(recipe, work_dir, device)
    labels_dir, _ = prepare_labels(recipe, work_dir, teacher, device)
    models = {}
    for name, preset, steps, batch in (("quickstart", "tiny", recipe.distill.steps, recipe.distill.batch_size),
                                       ("fast_foundationstereo", "fast_foundationstereo", ffs_steps, 2)):
        if name not in names:
            continue
        out = work_dir / name
        spec = StudentSpec(kind="search_space", preset=preset)
        iters = get_preset(preset).iters
        dc = from_label_cache(
            out, spec, recipe.data.train, labels_dir, labels_config(recipe), iters, seed=0, steps=steps,
            batch_size=batch, device="cpu", log_every=max(1, steps // 10), checkpoint_every=max(1, steps // 2),
            progress=True, loss=recipe.loss,
            optim=dataclasses.replace(recipe.optim, lr=5e-4 if preset != "tiny" else recipe.optim.lr, warmup_steps=10),
        )
        t0 = time.perf_counter()
        result = distill(dc)
        models[name] = {"preset": preset, "steps": steps, "batch_size": batch, "iters": iters,
                        "student": str(result.student_path), "train_seconds": time.perf_counter() - t0,
                        "teacher": teacher.description}
    return models


def _cpu_flags() -> dict[str, object]:
    """What the CPU offers for INT8 (ONNX Runtime's x86 kernels use VNNI when present)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {flag: flag in flags for flag in wanted}


def quantize_one(name: str, info: dict, work_dir: Path, height: int, width: int, cfg) -> dict:
    """Export the trained student at height x width, quantize it and return its report as plain data."""
    model = resolve_model(info["student"]).module
    fp32 = work_dir / f"{name}_{height}x{width}.onnx"
    if not fp32.is_file():
        to_onnx(model, fp32, height, width, iters=info["iters"])
    out = work_dir / f"{name}_{height}x{width}_int8.onnx"
    t0 = time.perf_counter()
    report = quantize_onnx(fp32, out, "synthetic", cfg, progress=True)
    write_quantize_report(report, out.with_name(out.stem + "_report.json"), title=f"INT8 quantization of {name}")
    data = report.to_dict()
    data["quantize_seconds"] = time.perf_counter() - t0
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/bench-quantize")
    parser.add_argument("--ffs-steps", type=int, default=30)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--models", nargs="+", default=["quickstart", "fast_foundationstereo"])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--calib-frames", type=int, default=8)
    parser.add_argument("--eval-frames", type=int, default=4)
    parser.add_argument("--sensitivity-frames", type=int, default=2)
    parser.add_argument("--group-depth", type=int, nargs="+", default=[2, 1],
                        help="sensitivity group depth per model (same order as --models)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work_dir = Path(args.work_dir)
    models = prepare_models(work_dir, args.ffs_steps, tuple(args.models))
    if args.prepare_only:
        print(json.dumps(models, indent=2))
        return 0
    rows = {}
    for i, name in enumerate(args.models):
        depth = args.group_depth[min(i, len(args.group_depth) - 1)]
        cfg = QuantizeConfig(calib_frames=args.calib_frames, eval_frames=args.eval_frames,
                             sensitivity_frames=args.sensitivity_frames, group_depth=depth,
                             latency_rounds=args.rounds, latency_repeats=args.repeats, threads=1)
        rows[name] = {**models[name], "group_depth": depth,
                      "report": quantize_one(name, models[name], work_dir, args.height, args.width, cfg)}
    machine = {**machine_info(), "cpu_int8_flags": _cpu_flags()}
    result = {"benchmark": "quantize", "machine": machine, "size": [args.height, args.width],
              "threads": 1, "clock": "thread", "goal": {"speedup": 1.5, "max_epe_change_px": 0.1},
              "models": rows, "total_seconds": time.perf_counter() - start,
              "command": "OMP_NUM_THREADS=1 python benchmarks/quantize.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    stem = out / f"quantize-{machine_slug(machine)}"
    write_report(stem, result, _markdown(result))
    print(_markdown(result))
    return 0


def _markdown(result: dict) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, on in m["cpu_int8_flags"].items() if on) or "none"
    h, w = result["size"]
    lines = [f"# INT8 vs fp32 in ONNX Runtime on the CPU ({m['cpu']}, {m['cores']} cores)", "", machine_line(m),
             f"{h}x{w}, batch 1, one ONNX Runtime thread for both (`OMP_NUM_THREADS=1`, intra-op threads 1), timed "
             "by the thread's CPU clock in alternating fp32/INT8 rounds. CPU INT8 features: " + flags +
             ". Goal: >= 1.5x faster at <= 0.1 px EPE change.",
             "", "| model | fp32 ms | INT8 ms | speedup | EPE INT8 vs fp32 (held-out) | EPE vs GT fp32 / INT8 | "
             "kept float | goal met |", "|---|---|---|---|---|---|---|---|"]
    for name, row in result["models"].items():
        r = row["report"]
        lat, ho = r["latency"], r["heldout"]
        change = abs((ho.get("int8_epe_gt") or 0) - (ho.get("fp32_epe_gt") or 0))
        met = lat["speedup"] >= 1.5 and ho["epe_vs_fp32"] <= 0.1
        lines.append(f"| {name} ({row['preset']}) | {lat['fp32_ms']:.1f} | {lat['int8_ms']:.1f} | "
                     f"{lat['speedup']:.2f}x | {ho['epe_vs_fp32']:.4f} px | {ho['fp32_epe_gt']:.3f} / "
                     f"{ho['int8_epe_gt']:.3f} (change {change:.4f}) | {', '.join(r['kept_float_groups']) or '-'} | "
                     f"{'yes' if met else 'no'} |")
    lines += ["", "Models: " + "; ".join(
        f"{name}: `{row['preset']}` preset distilled {row['steps']} steps x batch {row['batch_size']} at 64x128 "
        f"from {row['teacher']}" for name, row in result["models"].items()) + ".", ""]
    for name, row in result["models"].items():
        r = row["report"]
        lines += [f"## {name}: per-group sensitivity (group depth {row['group_depth']})", "",
                  f"Calibration: {r['calibration']['frames']} synthetic frames ({r['calibration']['method']}), "
                  f"target {r['calibration']['target']}; whole graph quantized: EPE "
                  f"{r['calibration']['whole_graph_epe_px']:.4f} px; after the sensitivity pass {r['calib_epe_px']:.4f}"
                  " px (calibration frames).", "", "| group | nodes | ops | EPE alone (px) | kept float |",
                  "|---|---|---|---|---|"]
        for g in sorted(r["sensitivity"], key=lambda s: -s["epe_px"]):
            lines.append(f"| {g['group']} | {g['nodes']} | {', '.join(g['op_types'])} | {g['epe_px']:.4f} | "
                         f"{g['reason'] if g['kept_float'] else ''} |")
        lines.append("")
    lines.append(f"Command: `{result['command']}` ({result['total_seconds']:.0f} s).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
