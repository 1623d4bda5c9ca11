"""Teacher against student presets: latency on every backend available here, with parameters and GMACs.

Every model has random weights (seed 0): latency does not depend on the values. Students run their own
iteration count (cfg.iters); the teacher runs ``--teacher-iters`` (its official count is 32, far too slow
on a CPU), and its GMACs are also given at 32 iterations. All rows come from one run on one machine, so
the teacher / Fast-FoundationStereo ratios compare like with like.

    python benchmarks/latency.py                 # teacher vits+vitl and every preset at 480x640 and 256x320
    python benchmarks/latency.py --quick         # teacher vits and fast_foundationstereo at 256x320, 3 runs

Writes ``benchmarks/results/latency-<machine>.json`` and ``.md`` (``-<tag>`` and ``-quick`` appended when given).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from compress.backends import get_backend
from compress.deploy import available_backends, backend_device
from compress.latency import machine_info, machine_slug, measure
from compress.models import resolve_model
from search_spaces import PRESETS, count_macs, count_params

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

REFERENCE = "fast_foundationstereo"
TEACHER_OFFICIAL_ITERS = 32


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 480x640") from None
    return h, w


def _cost(model: torch.nn.Module, height: int, width: int, iters: int) -> dict:
    return {"params": count_params(model), "gmacs": count_macs(model, height, width, iters=iters).gmacs}


def _ratios(rows: list[dict]) -> list[dict]:
    """Teacher / reference-preset latency and MACs ratios, per size and backend, from this run's rows."""
    out = []
    ok = [r for r in rows if "median_ms" in r]
    for ref in (r for r in ok if r["model"] == REFERENCE):
        for t in (r for r in ok if r["model"].startswith("teacher:")):
            if (t["height"], t["width"], t["backend"]) != (ref["height"], ref["width"], ref["backend"]):
                continue
            out.append({"teacher": t["model"], "height": t["height"], "width": t["width"], "backend": t["backend"],
                        "teacher_iters": t["iters"], "reference_iters": ref["iters"],
                        "latency_ratio": t["median_ms"] / ref["median_ms"],
                        "gmacs_ratio_measured_iters": t["gmacs"] / ref["gmacs"],
                        "gmacs_ratio_official_iters": t["gmacs_official_iters"] / ref["gmacs"]})
    return out


def _markdown(data: dict) -> str:
    m, s = data["machine"], data["settings"]
    lines = [
        "# Teacher vs student presets: latency, parameters, GMACs",
        "",
        machine_line(m, s["note"]),
        f"Medians of {s['repeats']} runs after {s['warmup']} warm-up runs ("
        + ("one CPU thread, timed by the thread's CPU time" if s["clock"] == "thread" else "wall-clock time")
        + f"); random weights; batch 1; precision "
        f"{s['precision']} (TensorRT: {s['trt_precision']}). Students run their own iteration count, the teacher "
        f"{s['teacher_iters']} (GMACs also at its official {TEACHER_OFFICIAL_ITERS}).",
        "",
        "| model | size | backend | iters | median ms | p10-p90 ms | params (M) | GMACs | GMACs @32 it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        size = f"{r['height']}x{r['width']}"
        official = f"{r['gmacs_official_iters']:.0f}" if r.get("gmacs_official_iters") else "-"
        if "error" in r:
            lines.append(f"| {r['model']} | {size} | {r['backend']} | {r['iters']} | failed: {r['error']} | | "
                         f"{r['params'] / 1e6:.2f} | {r['gmacs']:.1f} | {official} |")
            continue
        lines.append(f"| {r['model']} | {size} | {r['backend']} | {r['iters']} | {r['median_ms']:.1f} | "
                     f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f} | {r['params'] / 1e6:.2f} | {r['gmacs']:.1f} | {official} |")
    if data["ratios"]:
        lines += ["", f"## Teacher / {REFERENCE} (same run, same backend)", "",
                  "| teacher | size | backend | iters (teacher / student) | latency ratio | GMACs ratio | "
                  f"GMACs ratio, teacher at {TEACHER_OFFICIAL_ITERS} it |", "|---|---|---|---|---|---|---|"]
        for q in data["ratios"]:
            lines.append(f"| {q['teacher']} | {q['height']}x{q['width']} | {q['backend']} | {q['teacher_iters']} / "
                         f"{q['reference_iters']} | {q['latency_ratio']:.2f}x | {q['gmacs_ratio_measured_iters']:.1f}x "
                         f"| {q['gmacs_ratio_official_iters']:.1f}x |")
    lines += ["", f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure every model x size x backend, write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["teacher:vits", "teacher:vitl", *PRESETS])
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(480, 640), (256, 320)])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend available here")
    parser.add_argument("--teacher-iters", type=int, default=None, help="default: 32 on a GPU, 2 on a CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on a GPU, 3 on a CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on a GPU, 1 on a CPU")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="torch and onnxruntime precision")
    parser.add_argument("--trt-precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for onnxruntime")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: one CPU thread for torch and onnxruntime, timed by the thread's CPU time "
                             "(steady on cores shared with other work)")
    parser.add_argument("--quick", action="store_true",
                        help=f"teacher:vits and {REFERENCE} at 256x320 only, 3 runs after 1 warm-up")
    parser.add_argument("--note", default="", help="a remark on the machine for the report (e.g. shared cores)")
    parser.add_argument("--tag", default="", help="suffix of the result files (keeps several runs apart)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available()
    if args.quick:
        args.models, args.sizes = ["teacher:vits", REFERENCE], [(256, 320)]
        args.repeats, args.warmup = args.repeats or 3, args.warmup if args.warmup is not None else 1
    args.teacher_iters = args.teacher_iters or (TEACHER_OFFICIAL_ITERS if gpu else 2)
    args.repeats = args.repeats or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    backends = args.backends or available_backends()
    if args.clock == "thread":
        torch.set_num_threads(1)  # the thread clock times single-threaded runs (asked for on the command line)
        args.threads = 1
    info = machine_info()

    results = []
    for spec in args.models:
        resolved = resolve_model(spec)
        iters = args.teacher_iters if resolved.is_teacher else resolved.default_iters
        for height, width in args.sizes:
            cost = _cost(resolved.module, height, width, iters)
            if resolved.is_teacher:
                cost["gmacs_official_iters"] = count_macs(resolved.module, height, width,
                                                          iters=TEACHER_OFFICIAL_ITERS).gmacs
            for backend in backends:
                precision = args.trt_precision if get_backend(backend).builds_engine else args.precision
                device = backend_device(backend, None)
                row = {"model": spec, "height": height, "width": width, "backend": backend, "iters": iters, **cost}
                print(f"{spec} {height}x{width} {backend} ({iters} iterations) ...", flush=True)
                start = time.perf_counter()
                try:
                    stats = measure(resolved.module.to(device), backend, height, width, iters=iters,
                                    warmup=args.warmup, repeats=args.repeats, device=device, precision=precision,
                                    intra_op_threads=args.threads, clock=args.clock)
                    row.update(stats.to_dict())
                    print(f"  median {stats.median_ms:.1f} ms ({time.perf_counter() - start:.0f} s)", flush=True)
                except Exception as err:  # one failing row (memory, a missing provider) must not lose the others
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                    print(f"  failed: {row['error']}", flush=True)
                row["wall_seconds"] = time.perf_counter() - start
                results.append(row)
        resolved.module.to("cpu")
        del resolved

    data = {"machine": info, "settings": {**vars(args), "sizes": [f"{h}x{w}" for h, w in args.sizes],
                                          "backends": backends},
            "results": results, "ratios": _ratios(results),
            "command": " ".join(["python benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    stem = f"latency-{machine_slug(info)}" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    write_report(out / stem, data, _markdown(data))
    for q in data["ratios"]:
        print(f"{q['teacher']} / {REFERENCE} at {q['height']}x{q['width']} on {q['backend']}: latency "
              f"{q['latency_ratio']:.2f}x, GMACs {q['gmacs_ratio_measured_iters']:.1f}x "
              f"({q['gmacs_ratio_official_iters']:.1f}x with the teacher at {TEACHER_OFFICIAL_ITERS} iterations)")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
