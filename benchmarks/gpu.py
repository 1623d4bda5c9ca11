"""One GPU check: the teacher, the Fast-FoundationStereo-shaped preset and a trained student, in one process.

At 480x640 on one CUDA GPU, PyTorch backend, random weights (latency does not depend on the values):
- the teacher (FoundationStereo ViT-L, 32 iterations, fp16 autocast as the official demo runs it, eager);
- the ``fast_foundationstereo`` preset at 8 iterations in every mode x precision: eager, eager + CUDA graph
  (manual capture), ``torch.compile``, ``torch.compile`` + CUDA graphs (``mode="reduce-overhead"``); fp32, bf16,
  fp16;
- the quick start's final student (``--student``, default: the newest ``runs/quickstart-*/final/student``), in
  its best mode.

Reference figures on an H200 with the official code, eager: teacher 340 ms (fp16, 32 iterations), the
Fast-FoundationStereo code 47.7 ms (bf16, 8 iterations). The goal this check is built for: the preset under
8 ms. Budget: under 5 minutes on an H100-class GPU (``--budget-s`` stops starting new rows after that).

    python benchmarks/gpu.py                       # everything, writes benchmarks/results/gpu-<gpu>.{json,md}
    python benchmarks/gpu.py --quick               # the teacher and the preset in two modes (smoke test)

A row that fails (out of memory, a compile error) is recorded with its error and the check goes on. A compiled row
records Dynamo's and Inductor's counts over its measurement (graphs, graph breaks, recompile-limit hits, CUDA-graph
skips) and is marked "fell back" when parts of it ran eagerly or without graphs, rather than reported as compiled.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from compress.latency import compile_counters, measure
from compress.models import resolve_model
from search_spaces import count_macs, count_params

try:
    from benchmarks.report import write_report
except ModuleNotFoundError:  # run as `python benchmarks/gpu.py`: this folder is on sys.path, the repository not
    from report import write_report

PRESET = "fast_foundationstereo"
MODES = {  # name: (compile, cuda_graph)
    "eager": (False, False),
    "eager+graph": (False, True),
    "compiled": (True, False),
    "compiled+graph": (True, True),
}
PRECISIONS = ("fp32", "bf16", "fp16")
REFERENCE_MS = {"teacher": 340.0, "ffs_code": 47.7, "goal_preset": 8.0}


def environment() -> dict:
    """GPU, driver and library versions of this run."""
    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "host": platform.node()}
    for pkg in ("timm", "onnxruntime", "tensorrt"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def newest_quickstart_student(root: Path = Path("runs")) -> Path | None:
    """runs/quickstart-*/final/student of the newest run, if any."""
    found = sorted(root.glob("quickstart*/final/student"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_row(rows: list[dict], name: str, model: torch.nn.Module, iters: int, mode: str, precision: str,
            args: argparse.Namespace) -> None:
    """Measure one (model, mode, precision) and append its row; failures become rows with the error."""
    compile_, graph = MODES[mode]
    row = {"model": name, "mode": mode, "precision": precision, "iters": iters, "height": args.height,
           "width": args.width}
    start = time.perf_counter()
    try:
        torch.compiler.reset()
        torch.cuda.reset_peak_memory_stats()
        before = compile_counters()
        stats = measure(model, "torch", args.height, args.width, iters=iters, warmup=args.warmup,
                        repeats=args.repeats, device="cuda", precision=precision, compile=compile_,
                        cuda_graph=graph)
        row.update(median_ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms,
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        row["compile"] = {k: after - before[k] for k, after in compile_counters().items()}
        if fell_back := fallbacks(row["compile"], compile_, graph):
            row["fell_back"] = fell_back
    except Exception as err:  # one failing mode must not end the check: record why
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - start, 1)
    rows.append(row)
    shown = f"{row['median_ms']:.2f} ms" if "median_ms" in row else row["error"]
    if row.get("fell_back"):
        shown += f" [fell back: {'; '.join(row['fell_back'])}]"
    print(f"{name:<28} {mode:<15} {precision:<5} {shown}  ({row['seconds']} s)", flush=True)


def fallbacks(counts: dict[str, int], compiled: bool, graphed: bool) -> list[str]:
    """Why a row did not run as its mode says, from the compile counters' change over its measurement."""
    reasons = []
    if compiled and counts.get("recompile_limit_hits", 0):
        reasons.append(f"{counts['recompile_limit_hits']} frame(s) hit the recompile limit and ran eagerly")
    if compiled and counts.get("graph_breaks", 0):
        reasons.append(f"{counts['graph_breaks']} graph break(s): parts ran eagerly between graphs")
    if compiled and graphed and counts.get("cudagraph_skips", 0):
        reasons.append(f"CUDA graphs skipped {counts['cudagraph_skips']} time(s): replayed without graphs")
    return reasons


def markdown(result: dict) -> str:
    """The result as a Markdown report."""
    env = result["environment"]
    lines = [f"# GPU check: {env.get('gpu')}", "",
             f"`{result['command']}`, {result['seconds']:.0f} s, {result['height']}x{result['width']}, batch 1, "
             "random weights, PyTorch backend, CUDA-event timing (median of repeats).", "",
             "| model | params (M) | GMACs | iters | mode | precision | median ms | p10 | p90 | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cost = result["costs"].get(r["model"], {})
        timing = (f"{r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {r['peak_mem_gib']}"
                  if "median_ms" in r else f"failed: {r['error']} | | |")
        mode = f"{r['mode']} (fell back: {'; '.join(r['fell_back'])})" if r.get("fell_back") else r["mode"]
        lines.append(f"| {r['model']} | {cost.get('params_m', '')} | {cost.get('gmacs', '')} | {r['iters']} | "
                     f"{mode} | {r['precision']} | {timing} |")
    lines += ["", "Reference (H200, official code, eager): teacher 340 ms (fp16, 32 iterations), Fast-FoundationStereo "
              "code 47.7 ms (bf16, 8 iterations). Goal: the preset under 8 ms.", ""]
    best = min((r for r in result["rows"] if r["model"] == PRESET and "median_ms" in r),
               key=lambda r: r["median_ms"], default=None)
    if best:
        verdict = "met" if best["median_ms"] < REFERENCE_MS["goal_preset"] else "not met"
        lines.append(f"Best preset row: {best['median_ms']:.2f} ms ({best['mode']}, {best['precision']}): "
                     f"goal {verdict}.")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the GPU check and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--student", type=Path, default=None, help="a trained student directory (default: newest "
                        "runs/quickstart-*/final/student)")
    parser.add_argument("--quick", action="store_true", help="teacher + preset eager and compiled+graph, fp16 only")
    parser.add_argument("--budget-s", type=float, default=290.0, help="start no new row after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2

    start = time.perf_counter()
    env = environment()
    print(f"GPU check on {env['gpu']} (driver {env.get('driver')}, torch {env['torch']}, CUDA {env['cuda']})")
    torch.backends.cudnn.benchmark = True
    rows: list[dict] = []
    costs: dict[str, dict] = {}
    plan: list[tuple[str, torch.nn.Module, int, str, str]] = []

    teacher = resolve_model("teacher:vitl").model.cuda().eval()
    preset = resolve_model(PRESET).model.cuda().eval()
    costs["teacher vitl"] = {"params_m": round(count_params(teacher) / 1e6, 2),
                             "gmacs": round(count_macs(teacher, args.height, args.width, iters=32).gmacs, 1)}
    costs[PRESET] = {"params_m": round(count_params(preset) / 1e6, 2),
                     "gmacs": round(count_macs(preset, args.height, args.width, iters=8).gmacs, 1)}
    plan.append(("teacher vitl", teacher, 32, "eager", "fp16"))
    modes = ("eager", "compiled+graph") if args.quick else tuple(MODES)
    precisions = ("fp16",) if args.quick else PRECISIONS
    plan += [(PRESET, preset, 8, mode, p) for p in precisions for mode in modes]
    student_dir = args.student or newest_quickstart_student()
    if student_dir is not None and not args.quick:
        student = resolve_model(str(student_dir)).model.cuda().eval()
        name = f"quick-start student ({student_dir})"
        costs[name] = {"params_m": round(count_params(student) / 1e6, 3),
                       "gmacs": round(count_macs(student, args.height, args.width, iters=student.cfg.iters).gmacs, 2)}
        plan += [(name, student, student.cfg.iters, mode, "bf16") for mode in ("eager", "compiled+graph")]
    else:
        print("no quick-start student given or found under runs/: its rows are skipped")

    for name, model, iters, mode, precision in plan:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"model": name, "mode": mode, "precision": precision, "iters": iters,
                         "error": f"skipped: the {args.budget_s:.0f} s budget was spent"})
            continue
        run_row(rows, name, model, iters, mode, precision, args)

    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "environment": env, "height": args.height, "width": args.width,
              "reference_ms": REFERENCE_MS, "costs": costs, "rows": rows,
              "seconds": time.perf_counter() - start}
    slug = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    stem = args.out / f"gpu-{slug}{'-quick' if args.quick else ''}"
    write_report(stem, result, markdown(result))
    print(f"wrote {stem}.json and .md ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
