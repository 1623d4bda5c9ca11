"""``ffsc import fast-foundationstereo CKPT OUT_DIR`` (a released checkpoint as an ffsc student), ``ffsc finetune``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.distill.own_footage import main as finetune_main
from compress.importers import import_fast_foundationstereo
from compress.importers.fast_foundationstereo import REPORT_NAME


def cmd_import_ffs(args: argparse.Namespace) -> int:
    """Import a released Fast-FoundationStereo checkpoint without running code from its pickle."""
    model = import_fast_foundationstereo(args.checkpoint, args.out_dir, name=args.name)
    report = json.loads((Path(args.out_dir) / REPORT_NAME).read_text())
    cfg = model.cfg
    print(f"imported {args.checkpoint} -> {args.out_dir} ({report['parameters'] / 1e6:.2f}M parameters, "
          f"{len(report['pruned_layers'])} layers with pruned widths, {len(report['searched_blocks'])} searched "
          f"blocks, correlation "
          f"{'normalised' if cfg.gwc_normalize else 'not normalised'}, {cfg.iters} iterations)")
    if report["dropped_unused_layers"]:
        print(f"left out (never used by the official forward): {', '.join(report['dropped_unused_layers'])}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a student on unlabeled footage (recipes/finetune_own_footage.yaml)."""
    return finetune_main([args.recipe, *args.overrides])


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ffsc import`` and ``ffsc finetune``."""
    ft = sub.add_parser("finetune", help="fine-tune a (e.g. imported) student on your own unlabeled stereo footage",
                        description="Distils the student from the teacher on a folder of unlabeled pairs and "
                        "reports the EPE against the teacher on held-out frames before and after.")
    ft.add_argument("recipe", help="YAML recipe (see recipes/finetune_own_footage.yaml)")
    ft.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.train.path=my_footage")
    ft.set_defaults(func=cmd_finetune)
    imp = sub.add_parser("import", help="import a checkpoint released by another project as an ffsc student")
    kinds = imp.add_subparsers(dest="import_kind", required=True)
    p = kinds.add_parser(
        "fast-foundationstereo",
        help="a released Fast-FoundationStereo model_best_bp2_serialize.pth (with cfg.yaml beside it)",
        description="Reads the pickled module without executing anything from it and writes an ffsc student "
        "directory (config.yaml + model.safetensors + import_report.json).",
    )
    p.add_argument("checkpoint", help="model_best_bp2_serialize.pth (cfg.yaml must sit beside it)")
    p.add_argument("out_dir", help="the student directory to write")
    p.add_argument("--name", default=None, help="the student's name (default: imported-<checkpoint folder>)")
    p.set_defaults(func=cmd_import_ffs)
