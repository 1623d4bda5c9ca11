"""Do our models give sensible disparity on a real photograph? Measured beside OpenCV's SGBM.

The real pair is Middlebury 2014 "Motorcycle" as scikit-image ships it (``skimage.data.stereo_motorcycle``:
500x741 RGB with its ground-truth disparity, ``inf`` where there is none). For each ``--heights`` entry the pair
is resized (bilinear, both sides rounded to multiples of 32, the width following the aspect ratio); the ground
truth is resized by nearest-neighbour sampling and multiplied by the width's scale factor.

Scored pixels, metrics and SGBM's settings are those of ``compress.real_pairs`` (the library module the pipeline
scores real pairs with): ground truth present and the match inside the right image (x - d >= 0), EPE with the left
band x < d included reported beside; SGBM reported on its own valid pixels and with its holes counted as bad.

Models (``--model NAME=PATH``, anything ``ffsc infer --model`` takes) run through
``compress.deploy.open_predictor`` on the CPU, one call per size, timed by the wall clock; SGBM gets the same
number of OpenCV threads as torch has. Needs the ``real`` extra (``pip install -e ".[real]"``).

    python benchmarks/real_pairs.py --model teacher=runs/<run>/teacher --heights 256,384

Writes benchmarks/results/real-pairs-<machine>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.atomic import atomic_write
from compress.deploy import open_predictor
from compress.errors import FFSCError
from compress.latency import machine_info, machine_slug
from compress.real_pairs import load_motorcycle, require_optional, resize_pair, score, sgbm, sgbm_num_disparities

try:
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    from report import machine_line, write_report

TABLE_KEYS = (("epe", "EPE px"), ("bp1", "bad-1 %"), ("bp2", "bad-2 %"), ("bp3", "bad-3 %"), ("d1", "D1 %"))


def _parse_models(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model {spec!r}: expected NAME=PATH (PATH: anything 'ffsc infer --model' takes)")
        if name in models or name.lower() in ("sgbm", "gt", "left"):
            parser.error(f"--model {spec!r}: the name {name!r} is taken; give each model its own name")
        models[name] = path
    return models


def _plot(sizes: list[dict[str, Any]], images: list[dict[str, np.ndarray]], path: Path) -> None:
    # optional (ffsc[bench]) and slow to import: only to draw the figure
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cols = len(images[0])
    fig = Figure(figsize=(3.2 * cols, 2.4 * len(sizes) + 0.4), dpi=100, layout="constrained")
    cmap = colormaps["turbo"].with_extremes(bad="black")
    for r, (size, row) in enumerate(zip(sizes, images, strict=True)):
        vmax, axes = size["gt_range"][1], []
        for c, (name, im) in enumerate(row.items()):
            ax = fig.add_subplot(len(sizes), cols, r * cols + c + 1)
            axes.append(ax)
            ax.set_axis_off()
            if name == "left":
                ax.imshow(im)
                ax.set_title(f"left {size['size'][0]}x{size['size'][1]}", fontsize=9)
                continue
            shown = ax.imshow(np.where(np.isfinite(im) & (im >= 0 if name == "SGBM" else True), im, np.nan),
                              cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            m = size["methods"].get(name, {}).get("metrics")
            ax.set_title(f"{name} (black: none)" if m is None else
                         f"{name}: EPE {m['epe']:.2f}, bad-2 {m['bp2']:.0f}%", fontsize=9)
        fig.colorbar(shown, ax=axes, label="disparity (px)", shrink=0.9)
    atomic_write(path, lambda tmp: fig.savefig(tmp))


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    md = ["# Real pair: Middlebury Motorcycle (scikit-image), models beside OpenCV SGBM", "",
          machine_line(m),
          f"Models on the CPU with {report['threads']} torch thread(s), SGBM with as many OpenCV threads; OpenCV "
          f"{report['opencv']}, scikit-image {report['skimage']}.", "",
          "Scored: GT pixels whose match lies inside the right image (x - d >= 0); the last column adds the left "
          "band (x < d) no method can match. EPE px; bad-N: % of pixels with error > N px; D1: > 3 px and > 5%. "
          "SGBM 'holes as errors' counts its holes as bad pixels, its EPE stays on its valid pixels.", ""]
    for name, model in report["models"].items():
        md.append(f"- `{name}`: {model['description']}, {model['iters']} iterations, max_disp {model['max_disp']}")
    for size in report["sizes"]:
        h, w = size["size"]
        lo, hi = size["gt_range"]
        md += ["", f"## {h}x{w} (scale {size['scale']:.3f}): GT disparity {lo:.1f}-{hi:.1f} px, "
               f"{size['pixels']} scored pixels; SGBM numDisparities {size['sgbm_num_disparities']}", "",
               "| method | density % | " + " | ".join(t for _, t in TABLE_KEYS) + " | EPE with band | time s |",
               "|---|" + "---|" * (len(TABLE_KEYS) + 3)]
        rows = [("SGBM, holes as errors", size["methods"]["SGBM"], "metrics"),
                ("SGBM, its valid pixels", size["methods"]["SGBM"], "valid_only")]
        rows += [(name, res, "metrics") for name, res in size["methods"].items() if name != "SGBM"]
        for label, res, key in rows:
            md.append(f"| {label} | {res['density']:.1f} | " + " | ".join(f"{res[key][k]:.2f}" for k, _ in TABLE_KEYS)
                      + f" | {res['with_band']['epe']:.2f} | {res['seconds']:.3f} |")
        for name, res in size["methods"].items():
            if res.get("max_disp") is not None and hi > res["max_disp"]:
                md.append(f"\n`{name}` sees disparities only up to {res['max_disp']} px; this size needs {hi:.0f}.")
    md += ["", f"Disparity maps: `{report['png']}`. Command: `{report['command']}`."]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run SGBM and every --model on the Motorcycle pair at each height; write JSON, Markdown and PNG."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="a model to score (repeatable); PATH is anything 'ffsc infer --model' takes")
    parser.add_argument("--heights", default="256,384", help="comma-separated image heights (multiples of 32)")
    parser.add_argument("--iters", type=int, default=None, help="GRU iterations (default: each model's own)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    models = _parse_models(args.model, parser)
    try:
        heights = [int(h) for h in args.heights.split(",") if h.strip()]
    except ValueError:
        parser.error(f"--heights {args.heights!r}: expected comma-separated integers such as 256,384")
    if not heights or min(heights) < 32:
        parser.error(f"--heights {args.heights!r}: expected at least one height, each >= 32")
    cv2 = require_optional("cv2", "opencv-python-headless")
    skimage = require_optional("skimage", "scikit-image")
    left0, right0, gt0 = load_motorcycle()
    predictors = {name: open_predictor(path, device="cpu", iters=args.iters) for name, path in models.items()}
    cv2.setNumThreads(torch.get_num_threads())

    sizes, images = [], []
    for height in heights:
        left, right, gt = resize_pair(left0, right0, gt0, height)
        finite = gt[np.isfinite(gt)]
        size: dict[str, Any] = {"size": list(gt.shape), "scale": gt.shape[1] / gt0.shape[1],
                                "gt_range": [float(finite.min()), float(finite.max())],
                                "sgbm_num_disparities": sgbm_num_disparities(gt), "methods": {}}
        row = {"left": left, "GT": gt}
        start = time.perf_counter()
        row["SGBM"] = sgbm(left, right, size["sgbm_num_disparities"])
        seconds = time.perf_counter() - start
        size["methods"]["SGBM"] = {**score(row["SGBM"], gt, holes=row["SGBM"] < 0), "seconds": seconds}
        for name, predictor in predictors.items():
            start = time.perf_counter()
            row[name] = predictor(left, right)
            seconds = time.perf_counter() - start
            max_disp = getattr(getattr(predictor.resolved.module, "cfg", None), "max_disp", None)
            size["methods"][name] = {**score(row[name], gt), "seconds": seconds, "max_disp": max_disp}
        size["pixels"] = size["methods"]["SGBM"]["pixels"]
        sizes.append(size)
        images.append(row)
        print(f"{size['size'][0]}x{size['size'][1]}: " + ", ".join(
            f"{k} EPE {v['metrics']['epe']:.2f} bad-2 {v['metrics']['bp2']:.1f}%" for k, v in size["methods"].items()),
            flush=True)

    machine = machine_info()
    out = Path(args.out)
    stem = out / f"real-pairs-{machine_slug(machine)}"
    report = {
        "benchmark": "real_pairs", "pair": "Middlebury 2014 Motorcycle (skimage.data.stereo_motorcycle)",
        "machine": machine, "threads": torch.get_num_threads(), "opencv": cv2.__version__,
        "skimage": skimage.__version__, "command": "python benchmarks/real_pairs.py " + shlex.join(argv),
        "png": stem.with_suffix(".png").name,
        "models": {name: {"path": models[name], "description": p.description, "iters": p.iters,
                          "max_disp": getattr(getattr(p.resolved.module, "cfg", None), "max_disp", None)}
                   for name, p in predictors.items()},
        "sizes": sizes,
    }
    _plot(sizes, images, stem.with_suffix(".png"))
    md = _markdown(report)
    write_report(stem, report, md)
    print(md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FFSCError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
