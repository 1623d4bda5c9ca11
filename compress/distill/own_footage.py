"""Fine-tune a (for example imported) student on a user's own unlabeled footage, reporting before and after.

A thin wrapper of the distillation trainer: the recipe (recipes/finetune_own_footage.yaml) reads the folder
as the ``own_footage`` dataset (corrupt frames skipped and counted, a fixed held-out split), labels the training
frames once with the teacher into the label cache and distils with feature / cost-volume / output losses. The
student is evaluated against the teacher on the held-out frames before training and after; both numbers go to
``finetune_report.json`` in the run directory (the "before" is written first, so a resumed run keeps it).

    ffsc finetune recipes/finetune_own_footage.yaml data.train.path=my_footage data.eval.path=my_footage \\
        student.model=runs/imported teacher.checkpoint=weights/23-51-11/model_best_bp2.pth
    torchrun --nproc_per_node=4 -m compress.distill.own_footage recipes/finetune_own_footage.yaml ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from compress.atomic import atomic_write_text
from compress.errors import FFSCError

from .config import DistillConfig, load_recipe
from .trainer import Trainer

REPORT_NAME = "finetune_report.json"


def _frames(dataset: Any) -> dict[str, int]:
    base = dataset
    for attr in ("dataset", "source"):  # a Subset / the label-cache wrapper around the folder
        base = getattr(base, attr, base)
    return {"frames": len(dataset), "bad_frames": len(getattr(base, "bad_frames", [])),
            "total_frames": getattr(base, "total_frames", len(dataset))}


def finetune(cfg: DistillConfig) -> dict[str, Any]:
    """Distil as ``cfg`` says, with the held-out EPE against the teacher before and after; returns the report."""
    trainer = Trainer(cfg)
    try:
        path = Path(trainer.run_dir) / REPORT_NAME
        report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if "before" not in report:
            report["before"] = trainer.evaluate()
            report["train"] = _frames(trainer.train_set)
            if trainer.eval_set is not None:
                report["heldout"] = _frames(trainer.eval_set)
            if trainer.dist.is_main:
                atomic_write_text(path, json.dumps(report, indent=1, sort_keys=True))
        result = trainer.train()
        report.update(after=result.eval_metrics, steps=result.steps, student=str(result.student_path))
        if trainer.dist.is_main:
            atomic_write_text(path, json.dumps(report, indent=1, sort_keys=True))
        return report
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    """``ffsc finetune RECIPE key=value ...`` (also ``torchrun -m compress.distill.own_footage``)."""
    parser = argparse.ArgumentParser(prog="ffsc finetune", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe (see recipes/finetune_own_footage.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.train.path=my_footage")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    try:
        report = finetune(load_recipe(args.recipe, list(args.overrides)))
    except FFSCError as exc:
        if args.debug:
            raise
        print(f"ffsc finetune: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        before, after = report["before"].get("teacher/epe"), report["after"].get("teacher/epe")
        held = report.get("heldout", {}).get("frames")
        bad = report.get("train", {}).get("bad_frames", 0)
        print(f"EPE against the teacher on {held} held-out frames: {before:.3f} px before, {after:.3f} px after "
              f"({bad} unreadable frames skipped); student -> {report['student']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
