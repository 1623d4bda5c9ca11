"""The ``ffsc`` command line: one subcommand per stage; user mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compress.errors import DataError, FFSCError


def _console():
    """A rich console; wide when not a terminal so tables in logs and pipes are not squeezed."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _save_array(path: Path, disp, what: str = "disparity") -> None:
    """Write a H x W float map as .npy, .pfm or a colour-mapped .png, by extension."""
    import numpy as np

    from compress.atomic import atomic_write
    from compress.data.io import write_disparity_png, write_pfm

    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        atomic_write(path, lambda tmp: np.save(tmp, disp.astype(np.float32), allow_pickle=False))
    elif suffix == ".pfm":
        write_pfm(path, disp.astype(np.float32))
    elif suffix == ".png":
        write_disparity_png(path, disp)
    else:
        raise DataError(f"--out {path}: unknown {what} format {suffix!r}; expected .npy, .pfm or .png")


def _read_rgb(path: str):
    from PIL import Image

    from compress.data.io import read_image

    img = read_image(path)  # raises a DataError naming the file when unreadable
    with Image.open(path) as im:
        mode = im.mode
    if mode not in ("RGB", "RGBA"):
        raise DataError(f"{path} is a {mode!r} image; stereo models expect RGB colour images")
    return img


def _read_pair(left: str, right: str):
    left_img, right_img = _read_rgb(left), _read_rgb(right)
    if left_img.shape != right_img.shape:
        raise DataError(
            f"left image {left} is {left_img.shape[1]}x{left_img.shape[0]} but right image {right} is "
            f"{right_img.shape[1]}x{right_img.shape[0]}; a rectified stereo pair has equal sizes"
        )
    return left_img, right_img


def cmd_infer(args: argparse.Namespace) -> int:
    """Disparity (and optionally depth) for one stereo pair with the teacher."""
    import numpy as np

    from teacher import infer, load_teacher

    left_img, right_img = _read_pair(args.left, args.right)
    device = _device(args.device)
    model = load_teacher(args.checkpoint, cfg=args.config, device=device, trust_pickle=args.trust_checkpoint)
    start = time.perf_counter()
    disp = infer(
        model,
        left_img,
        right_img,
        iters=args.iters,
        mixed_precision=args.mixed_precision,
        hierarchical=args.hierarchical,
    )
    seconds = time.perf_counter() - start
    disp_np = disp[0, 0].cpu().numpy()
    out = Path(args.out)
    _save_array(out, disp_np)
    print(f"disparity {disp_np.shape[1]}x{disp_np.shape[0]} -> {out} ({seconds:.2f} s on {device})")
    if args.fx is not None or args.baseline is not None:
        if args.fx is None or args.baseline is None:
            raise DataError("depth needs both --fx (focal length, pixels) and --baseline (metres)")
        with np.errstate(divide="ignore"):
            depth = np.where(disp_np > 0, args.fx * args.baseline / np.maximum(disp_np, 1e-6), 0.0)
        depth_out = out.with_name(out.stem + "_depth" + (out.suffix if out.suffix != ".png" else ".npy"))
        _save_array(depth_out, depth.astype(np.float32), "depth")
        print(f"depth (fx={args.fx}, baseline={args.baseline}) -> {depth_out}")
    return 0


def cmd_teacher_inspect(args: argparse.Namespace) -> int:
    """Print a checkpoint's config, parameter counts per part and whether it loads strictly."""
    from rich.table import Table

    from teacher import TeacherConfig, load_teacher
    from teacher.loading import teacher_summary

    ckpt = Path(args.checkpoint)
    cfg = TeacherConfig.from_yaml(args.config or ckpt.with_name("cfg.yaml"))
    model = load_teacher(ckpt, cfg=cfg, trust_pickle=args.trust_checkpoint)
    summary = teacher_summary(model)
    if args.json:
        print(json.dumps({**summary, "loads": True}, indent=2))
        return 0
    console = _console()
    console.print(f"[bold]{ckpt}[/bold] loads strictly as FoundationStereo ({cfg.vit_size})")
    table = Table("config key", "value")
    for k, v in summary["config"].items():
        table.add_row(k, str(v))
    console.print(table)
    parts = Table("part", "parameters")
    for k, v in summary["parts"].items():
        parts.add_row(k, f"{v:,}")
    parts.add_row("[bold]total[/bold]", f"[bold]{summary['parameters']:,}[/bold]")
    console.print(parts)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Teacher inference on the bundled example pair, scored against its ground truth."""
    from importlib.resources import files

    import numpy as np
    import torch

    from compress.data.io import read_pfm, write_disparity_png
    from compress.metrics import compute_metrics
    from teacher import FoundationStereo, TeacherConfig, infer, load_teacher

    examples = Path(str(files("teacher") / "examples"))
    left_img, right_img = _read_pair(str(examples / "im0.png"), str(examples / "im1.png"))
    gt = read_pfm(examples / "disp0GT.pfm")
    device = _device(args.device)
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


def cmd_space_show(args: argparse.Namespace) -> int:
    """Print a search space's dimensions and size."""
    from rich.table import Table

    from search_spaces import load_space

    space = load_space(args.space)
    table = Table("dimension", "values", title=f"search space {space.name} (base preset: {space.base})")
    for name, values in space.describe():
        table.add_row(name, values)
    console = _console()
    console.print(table)
    console.print(f"size: {space.size():,} distinct students; widths in multiples of {space.channel_multiple}")
    return 0


def cmd_space_sample(args: argparse.Namespace) -> int:
    """Print sampled configs with their parameters and MACs at a given size."""
    import optuna
    from rich.table import Table

    from search_spaces import build_student, count_macs, load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rows = []
    for _ in range(args.n):
        cfg = space.sample(study.ask())
        cost = count_macs(build_student(cfg), args.height, args.width)
        rows.append((cfg, cost))
    if args.json:
        print(json.dumps([{"config": c.to_dict(), **k.to_dict()} for c, k in rows], indent=2, default=str))
        return 0
    table = Table("#", "backbone", "feat", "vol", "D", "hourglass", "trf", "GRU", "hidden", "iters", "params (M)",
                  f"GMACs @{args.height}x{args.width}")
    for i, (c, k) in enumerate(rows):
        table.add_row(str(i), "/".join(map(str, c.backbone_dims)), str(c.feature_dim), f"1/{c.volume_scale}",
                      str(c.max_disp // c.volume_scale), "/".join(map(str, c.hourglass_widths)),
                      str(c.transformer_layers), str(c.gru_levels), str(c.hidden_dim), str(c.iters),
                      f"{k.params / 1e6:.2f}", f"{k.gmacs:.2f}")
    _console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="ffsc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="disparity for a stereo pair with the teacher")
    p.add_argument("--checkpoint", required=True, help="official model_best_bp2.pth (or .safetensors)")
    p.add_argument("--config", help="cfg.yaml (default: the one beside the checkpoint)")
    p.add_argument("--left", required=True)
    p.add_argument("--right", required=True)
    p.add_argument("--out", required=True, help="output .npy, .pfm or .png (colour map)")
    p.add_argument("--iters", type=int, default=None, help="GRU iterations (default: valid_iters of the config)")
    p.add_argument("--hierarchical", action="store_true", help="two-pass mode for large images")
    p.add_argument("--mixed-precision", dest="mixed_precision", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--fx", type=float, default=None, help="focal length in pixels, for a depth map")
    p.add_argument("--baseline", type=float, default=None, help="stereo baseline in metres, for a depth map")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the checkpoint")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("demo", help="teacher inference on the bundled example pair")
    p.add_argument("--checkpoint", default=None, help="official checkpoint (default: random weights)")
    p.add_argument("--config", default=None)
    p.add_argument("--vit", default="vits", choices=["vits", "vitb", "vitl"], help="ViT size without a checkpoint")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(func=cmd_demo)

    sp = sub.add_parser("space", help="student search spaces").add_subparsers(dest="space_cmd", required=True)
    p = sp.add_parser("show", help="dimensions and size of a space")
    p.add_argument("space", help="a space name (tiny, fast_foundationstereo) or a YAML file")
    p.set_defaults(func=cmd_space_show)
    p = sp.add_parser("sample", help="random configs with parameters and MACs")
    p.add_argument("space")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_space_sample)

    t = sub.add_parser("teacher", help="teacher checkpoints").add_subparsers(dest="teacher_cmd", required=True)
    p = t.add_parser("inspect", help="config, parameter counts and a strict-load check")
    p.add_argument("checkpoint")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(func=cmd_teacher_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ffsc`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FFSCError as exc:
        if args.debug:
            raise
        print(f"ffsc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
