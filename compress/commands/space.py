"""Search-space subcommands: ``ffsc space show`` and ``ffsc space sample``."""

from __future__ import annotations

import argparse
import json

import optuna
from rich.table import Table

from search_spaces import build_student, count_macs, load_space

from .common import console


def cmd_space_show(args: argparse.Namespace) -> int:
    """Print a search space's dimensions and size."""
    space = load_space(args.space)
    table = Table("dimension", "values", title=f"search space {space.name} (base preset: {space.base})")
    for name, values in space.describe():
        table.add_row(name, values)
    out = console()
    out.print(table)
    out.print(f"size: {space.size():,} distinct students; widths in multiples of {space.channel_multiple}")
    return 0


def cmd_space_sample(args: argparse.Namespace) -> int:
    """Print sampled configs with their parameters and MACs at a given size."""
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
    console().print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the search-space subcommands."""
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

