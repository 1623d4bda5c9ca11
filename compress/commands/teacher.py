"""Teacher subcommands: ``ffsc demo``, ``ffsc teacher inspect`` and ``ffsc teacher train-standin`` (``ffsc infer``,
for every model kind, is in deploy.py)."""

from __future__ import annotations

import argparse
import json
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from compress.data.io import read_pfm, write_disparity_png
from compress.deploy.infer import read_stereo_pair
from compress.device import pick_device
from compress.metrics import compute_metrics
from compress.pipeline.standin import load_standin_recipe, train_standin
from compress.terminal import console
from teacher import FoundationStereo, TeacherConfig, infer, load_teacher
from teacher.loading import teacher_summary

from .common import recipe_from_args


def cmd_teacher_inspect(args: argparse.Namespace) -> int:
    """Print a checkpoint's config, parameter counts per part and whether it loads strictly."""
    ckpt = Path(args.checkpoint)
    cfg = TeacherConfig.from_yaml(args.config or ckpt.with_name("cfg.yaml"))
    model = load_teacher(ckpt, cfg=cfg, trust_pickle=args.trust_checkpoint)
    summary = teacher_summary(model)
    if args.json:
        print(json.dumps({**summary, "loads": True}, indent=2))
        return 0
    out = console()
    out.print(f"[bold]{ckpt}[/bold] loads strictly as FoundationStereo ({cfg.vit_size})")
    table = Table("config key", "value")
    for k, v in summary["config"].items():
        table.add_row(k, str(v))
    out.print(table)
    parts = Table("part", "parameters")
    for k, v in summary["parts"].items():
        parts.add_row(k, f"{v:,}")
    parts.add_row("[bold]total[/bold]", f"[bold]{summary['parameters']:,}[/bold]")
    out.print(parts)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Teacher inference on the bundled example pair, scored against its ground truth."""
    examples = Path(str(files("teacher") / "examples"))
    left_img, right_img = read_stereo_pair(examples / "im0.png", examples / "im1.png")
    gt = read_pfm(examples / "disp0GT.pfm")
    device = pick_device(args.device)
    if args.checkpoint:
        model = load_teacher(args.checkpoint, cfg=args.config, device=device, trust_pickle=args.trust_checkpoint)
        what = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(0)
        model = FoundationStereo(TeacherConfig(vit_size=args.vit, max_disp=192)).to(device).eval()
        what = f"FoundationStereo {args.vit} with RANDOM weights (pass --checkpoint for meaningful output)"
    print(f"demo: {what} on the bundled {left_img.shape[1]}x{left_img.shape[0]} synthetic pair, {device}")
    start = time.perf_counter()
    disp = infer(model, left_img, right_img, iters=args.iters)[0, 0].cpu().numpy()
    seconds = time.perf_counter() - start
    metrics = compute_metrics(disp, gt, np.isfinite(gt))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_disparity_png(out / "disparity.png", disp)
    np.save(out / "disparity.npy", disp)
    print(f"inference {seconds:.2f} s, EPE {metrics['epe']:.2f} px, D1 {metrics['d1']:.1f}% -> {out}/disparity.png")
    return 0


def cmd_train_standin(args: argparse.Namespace) -> int:
    """Train a stand-in teacher from a recipe (resumes a stopped run in the same --out)."""
    recipe = recipe_from_args(args, load_standin_recipe)
    device = pick_device(args.device)
    out = train_standin(recipe, args.out, device, progress=not args.no_progress)
    record = json.loads((out / "training.json").read_text())
    ev = record["eval"]
    console().print(f"stand-in teacher -> {out}: {recipe.steps} steps in {record['train_seconds']:.0f} s, "
                    f"EPE {ev['gt/epe']:.2f} px, bad-3 {ev['gt/bp3']:.1f}% on {ev['scenes']}; use it with "
                    f"teacher.stand_in={out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the teacher subcommands."""
    p = sub.add_parser("demo", help="teacher inference on the bundled example pair")
    p.add_argument("--checkpoint", default=None, help="official checkpoint (default: random weights)")
    p.add_argument("--config", default=None)
    p.add_argument("--vit", default="vits", choices=["vits", "vitb", "vitl"], help="ViT size without a checkpoint")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(func=cmd_demo)

    t = sub.add_parser("teacher", help="teacher checkpoints").add_subparsers(dest="teacher_cmd", required=True)
    p = t.add_parser("inspect", help="config, parameter counts and a strict-load check")
    p.add_argument("checkpoint")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(func=cmd_teacher_inspect)
    p = t.add_parser("train-standin",
                     help="train a stand-in teacher on procedural scenes (recipes/standin_teacher.yaml)")
    p.add_argument("recipe", nargs="?", help="stand-in recipe (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500")
    p.add_argument("--out", required=True, help="output folder (a saved student; a stopped run here resumes)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_standin)
