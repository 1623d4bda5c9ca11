"""Does the search's short-distillation proxy rank students the way their fully trained accuracy does?

Sample students spread over a space's cost range, score each with every proxy variant, train each fully with
the final distillation, and report the rank agreement (Kendall tau-b and Spearman) between proxy score and
final EPE, and how much of the true Pareto front (cost vs final EPE) the proxy's front finds. The cost axis is
GMACs at the world's size (exact and repeatable on a shared CPU, where measured milliseconds are not).

Two worlds (``--world``), both built on the CPU quick start's recipe (``recipes/quickstart_cpu.yaml``):

``quickstart`` (the quick start as it runs now)
    The shipped stand-in teacher (``teacher.stand_in: shipped``) and the recipe's data exactly (photo-textured
    procedural scenes at 64x128, disparities up to 48 px, labelled by that teacher; ``--train-samples`` /
    ``--eval-samples`` override only the counts). The space is ``subnets``: the stand-in's sub-networks, as the
    recipe's ``search.parent: auto`` resolves them (:func:`compress.pipeline.search_parent`,
    :func:`~compress.pipeline.search_space`). The parent is the stand-in itself, so it costs nothing per
    study. The truth is each student's final distillation for ``--final-steps`` (default 150) starting from its
    sliced weights, as the pipeline's final distillation starts from the chosen trial's (inherited) student; 150
    is 2x the 20 + 50 steps a quick-start student gets in the pipeline (trial plus final), long enough that the
    ranking is the students' trained one rather than their first steps', and affordable on 2 cores. It is scored
    on a separate held-out set of ``--truth-samples`` scenes (default 32, the recipe's generator with seed 2000),
    so the proxy's 8 scoring scenes are not also the truth's (also reported: the truth on those 8).
``legacy`` (the default; reproduces ``search-quality-amd-epyc-2cores``)
    A stand-in teacher trained inside the benchmark (``teacher.stand_in: train``, ``--teacher-steps``), the
    ``tiny`` space, untextured scenes with disparities up to 24 px, the recipe's loss and the learning rate of
    that result (2e-3), and a parent: the space's largest member distilled once per study for
    ``--parent-steps``. The truth is a final distillation from random init.

Proxy variants (same seed, the same per-candidate steps, batch and learning-rate schedule as a search trial):

* ``inherit`` (the search's default): weights sliced from the parent, whose channels are first reordered by
  importance (:mod:`compress.nas.inherit`), then ``--proxy-steps`` of distillation, evaluate.
* ``inherit0``: those inherited weights evaluated without any training (no per-candidate compute).
* ``distill``: random init, ``--proxy-steps`` of distillation, evaluate.
* ``inherit_plain``: as ``inherit``, from the parent in its trained channel order (no importance reordering).
* ``distill_hot`` / ``inherit_hot``: as ``distill`` / ``inherit`` with a schedule conditioned for few steps
  (peak learning rate x2.5, two warm-up steps), the same number of steps.

``--noise-students K`` also retrains the final distillation of K evenly spaced students with another seed (the
same starting weights): how far two equally good trainings of one student differ bounds the rank agreement any
proxy can reach. Every proxy score is the search's error metric (EPE against the teacher on the recipe's
held-out set); the truth is the final student's EPE against ground truth (also reported against the teacher).

    python benchmarks/search_quality.py --world quickstart     # the quick start's search, 10 students
    python benchmarks/search_quality.py                        # legacy: 12 students of the tiny space
    python benchmarks/search_quality.py [--world W] --quick    # smoke run: few students, short budgets

Quickstart defaults: 10 students at GMACs quantiles of 120 random sub-networks, proxy ``search.distill_steps``
(20) per candidate, final 150 steps, 3 seed-noise students, variants inherit, inherit0, distill. Legacy
defaults: stand-in teacher 200 steps, 48 training / 16 held-out pairs, 12 students of 120, proxy 30 steps,
parent 300, final 250 (2453 s of training and evaluation on 2 shared cores with all six variants).

Writes benchmarks/results/search-quality-[quickstart-]<machine>[-proxy<steps>][-smoke].{json,md,png} (the
quickstart world tags a proxy budget other than the recipe's); a rerun on the same --work-dir reuses every
finished training (a work dir holds one world and one data setting), so other proxy budgets cost only their
proxies: ``--world quickstart --variants inherit --proxy-steps 50``.

Over the project's ~500-line guide on purpose: the two worlds, the stored measurements and the report read one set
of arguments and rows, and the rank statistics already live apart (``benchmarks/rank_agreement.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.atomic import atomic_write_text
from compress.data.datasets import build_dataset
from compress.device import pick_device
from compress.distill import distill
from compress.distill.config import StudentSpec, trial_config
from compress.distill.label_cache import LabelledDataset, build_label_cache
from compress.errors import ConfigError
from compress.evaluation import evaluate_student
from compress.latency import machine_info, machine_slug
from compress.nas.inherit import inherit_student, order_by_importance, parent_config
from compress.pipeline import (
    labels_config,
    load_run_recipe,
    prepare_labels,
    quiet_third_party,
    search_parent,
    search_space,
    teacher_folder,
    teacher_scores,
)
from compress.pipeline.teacher_stage import get_teacher
from compress.structured import to_plain
from search_spaces import SUBNETS, build_student, count_macs, load_space, load_student, save_student

try:
    from benchmarks import rank_agreement
    from benchmarks.report import machine_line, write_report
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on sys.path, the repository not
    import rank_agreement
    from report import machine_line, write_report

VARIANTS = ("distill", "inherit", "inherit0", "inherit_plain", "distill_hot", "inherit_hot")
HOT = {"lr_scale": 2.5, "warmup_steps": 2}
"""The few-step schedule of the *_hot variants."""


# ------------------------------------------------------------------------------------------- students

HANDMADE = {
    # Fast-FoundationStereo's hand-made shape at the tiny space's scale: the space's standard-width, deeper
    # backbone (EdgeNeXt-S is the deep member of its family), the hybrid group-wise + concatenation volume at 1/4,
    # slim cost filtering (what its blockwise search chose: thin volume, narrow hourglass), the small disparity
    # transformer, one GRU level with a hidden state at half the space's widest (64 of the teacher's 128), and
    # the most iterations the space allows (its 4-8 at full scale).
    "tiny": dict(backbone_dims=[16, 32, 48, 64], backbone_depths=[1, 1, 2, 1], feature_dim=32, volume_scale=4,
                 cv_groups=8, concat_dim=8, volume_dim=8, hourglass_levels=2, hourglass_widths=[1, 2],
                 transformer_layers=1, gru_levels=1, hidden_dim=16, corr_radius=2, iters=4),
}


def spread_students(space, n: int, pool: int, height: int, width: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct students at evenly spaced GMACs quantiles of ``pool`` random members of the space."""
    rng = random.Random(seed)
    seen, candidates = set(), []
    for _ in range(pool * 20):
        if len(candidates) >= pool:
            break
        cfg = space.config_from_values({d.name: rng.choice(d.values()) for d in space.dimensions})
        key = cfg.to_json()
        if key in seen:
            continue
        seen.add(key)
        gmacs = count_macs(build_student(cfg), height, width, iters=cfg.iters).gmacs
        candidates.append({"config": cfg, "gmacs": gmacs})
    candidates.sort(key=lambda c: c["gmacs"])
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, n)).astype(int))
    return [candidates[i] for i in picks]


# ------------------------------------------------------------------------------------------- worlds

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart_cpu.yaml"
"""Both worlds start from the CPU quick start's recipe (its loss, optimiser, labels and search batch)."""

WORLDS = ("legacy", "quickstart")
DEFAULTS: dict[str, dict[str, Any]] = {
    "legacy": dict(space="tiny", students=12, pool=120, height=64, width=128, max_disp=24, train_samples=48,
                   eval_samples=16, truth_samples=0, teacher_steps=200, proxy_steps=30, parent_steps=300,
                   final_steps=250, variants=",".join(VARIANTS), noise_students=4),
    # None: the recipe's value. The truth's 150 steps: see the module docstring.
    "quickstart": dict(space="subnets", students=10, pool=120, height=None, width=None, max_disp=None,
                       train_samples=None, eval_samples=None, truth_samples=32, teacher_steps=None,
                       proxy_steps=None, parent_steps=0, final_steps=150, variants="inherit,inherit0,distill",
                       noise_students=3),
}
QUICK: dict[str, dict[str, Any]] = {
    "legacy": dict(students=5, pool=30, teacher_steps=60, proxy_steps=10, parent_steps=60, final_steps=60,
                   eval_samples=8, noise_students=2),
    "quickstart": dict(students=4, pool=20, proxy_steps=5, final_steps=20, truth_samples=8, noise_students=1),
}
"""``--quick``'s budgets per world (explicit arguments still win)."""
RECIPE_ONLY = ("height", "width", "max_disp", "teacher_steps", "parent_steps")
"""Arguments the quickstart world takes from the recipe (or, for the parent, from the stand-in)."""
GROUP_FIELD = "volume_scale"
"""The design choice whose groups get their own agreement (quickstart: a 1/8 volume costs far less and is far
worse, an order any proxy finds; the agreement inside each group is the harder question)."""
TRUTH_SEED = 2000
"""The generator seed of the quickstart world's separate truth set (the recipe's: 0 train, 1000 held out)."""


def legacy_overrides(args: argparse.Namespace) -> list[str]:
    """The legacy world over the current quick-start recipe, pinned to what its committed result ran: a stand-in
    trained here, untextured scenes and the learning rate of then (the recipe's is gentler since)."""
    h, w = args.height, args.width
    synth = (f"{{height: {h}, width: {w}, max_disp: {args.max_disp}, num_objects: 4, texture_dir: null, "
             "max_disp_low: null, photo_prob: 0.5")
    return [
        f"height={h}", f"width={w}",
        f"data.train={{kind: synthetic, num_samples: {args.train_samples}, synthetic: {synth}, seed: 0}}}}",
        f"data.eval={{kind: synthetic, num_samples: {args.eval_samples}, synthetic: {synth}, seed: 1000}}}}",
        f"teacher.train.steps={args.teacher_steps}", "teacher.stand_in=train", "optim.lr=2.0e-3",
    ]


def quickstart_overrides(args: argparse.Namespace) -> list[str]:
    """The quick start as its recipe runs it (shipped stand-in, its sub-networks, its data); only counts change."""
    out = ["teacher.checkpoint=null", "teacher.stand_in=shipped", "search.space=subnets", "search.parent=auto",
           "search.proxy=inherit"]
    if args.train_samples is not None:
        out.append(f"data.train.num_samples={args.train_samples}")
    if args.eval_samples is not None:
        out.append(f"data.eval.num_samples={args.eval_samples}")
    return out


class World:
    """The teacher, its label cache and held-out sets, and one way to distil and score a student.

    ``overrides``: the world's ``key=value`` changes to the quick start's recipe. ``truth_samples``: a separate
    held-out set of that many scenes (the recipe's held-out generator, seed :data:`TRUTH_SEED`) for the truth;
    0 scores the truth on the recipe's held-out set, as the proxies are."""

    def __init__(self, args: argparse.Namespace, overrides: list[str], truth_samples: int = 0) -> None:
        self.recipe = load_run_recipe(RECIPE, [f"run_dir={args.work_dir}", f"seed={args.seed}", *overrides])
        self.height, self.width = self.recipe.height, self.recipe.width
        self.run_dir = Path(args.work_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(None)
        self.teacher = get_teacher(self.recipe, self.run_dir, self.device)
        self.labels_dir, self.eval_set = prepare_labels(self.recipe, self.run_dir, self.teacher, self.device)
        self.labels = labels_config(self.recipe)
        self.truth_set = self._held_out("truth", truth_samples) if truth_samples else self.eval_set
        self.teacher_vs_gt = teacher_scores(self.eval_set)
        self.teacher_vs_gt_truth = teacher_scores(self.truth_set)
        self.args = args

    def _held_out(self, split: str, n: int):
        """Another held-out set of ``n`` scenes from the recipe's held-out generator, labelled by the teacher."""
        spec = self.recipe.data.eval
        if spec.kind != "synthetic":
            raise ConfigError(f"--truth-samples: the held-out data are {spec.kind!r}, not synthetic; pass 0")
        spec = dataclasses.replace(spec, num_samples=n, limit=None,
                                   synthetic=dataclasses.replace(spec.synthetic, seed=TRUTH_SEED))
        dataset = build_dataset(spec, seed=self.recipe.seed + 2)
        root = self.run_dir / "labels" / split
        build_label_cache(self.teacher.model, dataset, root, self.labels, iters=self.recipe.teacher.iters,
                          size=self.recipe.data.size, identity=self.teacher.identity, device=self.device,
                          progress=False)
        return LabelledDataset(dataset, root, seed=self.recipe.seed)

    def fingerprint(self) -> dict[str, Any]:
        """What every stored measurement depends on besides its own key: a work dir holds one of these."""
        d = self.recipe.data
        return {"world": self.args.world, "teacher": self.teacher.identity, "size": [self.height, self.width],
                "train": d.train.num_samples, "eval": d.eval.num_samples, "truth": len(self.truth_set),
                "seed": self.args.seed}

    def train(self, out_dir: Path, steps: int, cfg=None, init: Path | None = None, hot: bool = False,
              seed: int | None = None, final: bool = False) -> Path:
        """Distil a student exactly as a search trial does (same loss, optimiser and warm-up rule; ``hot``: the
        few-step schedule), or with ``final`` as the pipeline's final distillation does (its batch, the recipe's
        warm-up unclipped)."""
        spec = (StudentSpec(kind="search_space", model=str(init)) if init is not None
                else StudentSpec(kind="search_space", config=cfg.to_dict()))
        r = self.recipe
        dc = trial_config(out_dir, spec, r.data.train, self.labels_dir, self.labels, cfg.iters, steps=steps,
                          batch_size=r.distill.batch_size if final else r.search.batch_size, loss=r.loss,
                          optim=r.optim, seed=self.args.seed if seed is None else seed, device=str(self.device),
                          crop_size=r.data.crop_size)
        if final:  # the pipeline's final distillation: the recipe's warm-up, unclipped
            dc.optim = r.optim
        if hot:
            dc.optim = dataclasses.replace(dc.optim, lr=dc.optim.lr * HOT["lr_scale"], warmup_steps=HOT["warmup_steps"])
        return distill(dc).student_path

    def score(self, model: torch.nn.Module, truth: bool = False) -> dict[str, float]:
        """EPE/D1 against the teacher and against ground truth on the held-out set (``truth``: the truth's)."""
        return evaluate_student(model.to(self.device).eval(), self.truth_set if truth else self.eval_set,
                                iters=model.cfg.iters, device=self.device)


class Results:
    """Finished measurements on disk, so a rerun (or a crash) repeats no training."""

    WORLD_KEY = "_world"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def check_world(self, fingerprint: dict[str, Any]) -> None:
        """Refuse measurements made in another world or on other data (their trainings would be resumed as done)."""
        plain = json.loads(json.dumps(fingerprint, default=str))
        stored = self.data.get(self.WORLD_KEY)
        if stored is not None and stored != plain:
            raise ConfigError(f"{self.path} holds measurements of {stored}, not {plain}: use another --work-dir")
        if stored is None:
            self.data[self.WORLD_KEY] = plain
            atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str))

    def get(self, key: str, make) -> Any:
        """The stored value of ``key``, or ``make()``'s, stored."""
        if key not in self.data:
            t0 = time.perf_counter()
            value = make()
            value["seconds"] = time.perf_counter() - t0
            self.data[key] = value
            atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str))
        return self.data[key]


# ------------------------------------------------------------------------------------------- report


def _plot(rows: list[dict], variants: list[str], out_png: Path, title: str, handmade: dict | None = None) -> None:
    from matplotlib.figure import Figure  # optional (ffsc[bench]) and slow to import: only to draw the plot

    panels = len(variants) + 1
    cols = min(panels, 4)
    grid = (math.ceil(panels / cols), cols)
    fig = Figure(figsize=(4.6 * cols + 1, 4.2 * grid[0]), dpi=110, layout="constrained")
    final = [r["final"]["gt/epe"] for r in rows]
    cost = [r["gmacs"] for r in rows]
    ax = fig.add_subplot(*grid, 1)
    true = rank_agreement.front_overlap(cost, final, final)["true_front"]
    ax.scatter(cost, final, c="0.6", label="students (fully trained)")
    ax.plot(*zip(*sorted((cost[i], final[i]) for i in true), strict=True), "o-", c="C0", label="true front")
    if handmade is not None:
        ax.scatter([handmade["gmacs"]], [handmade["final"]["gt/epe"]], marker="*", s=160, c="C3",
                   label="hand-made (FFS-shaped)")
    ax.set_xlabel("GMACs")
    ax.set_ylabel("final EPE vs GT (px)")
    ax.set_title("cost vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for k, v in enumerate(variants):
        ax = fig.add_subplot(*grid, k + 2)
        proxy = [r[v]["teacher/epe"] for r in rows]
        sc = ax.scatter(proxy, final, c=[r["gmacs"] for r in rows], cmap="viridis")
        for i, (x, y) in enumerate(zip(proxy, final, strict=True)):
            ax.annotate(str(i), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"proxy '{v}': EPE vs teacher (px)")
        ax.set_ylabel("final EPE vs GT (px)")
        ax.set_title(f"{v}: tau {rank_agreement.kendall_tau_b(proxy, final):.2f}")
        ax.grid(alpha=0.3)
    fig.colorbar(sc, ax=fig.axes, label="GMACs")
    fig.suptitle(title)
    fig.savefig(out_png)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the world's defaults (and ``--quick``'s budgets) filled in where not given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=WORLDS, default="legacy",
                        help="quickstart: the quick start's recipe as it runs (shipped stand-in, its sub-networks, "
                             "textured data); legacy: the world of the committed tiny-space result")
    parser.add_argument("--space", default=None, help="legacy: a space name (tiny); quickstart: always subnets")
    parser.add_argument("--students", type=int, default=None)
    parser.add_argument("--pool", type=int, default=None, help="random members whose GMACs quantiles are picked")
    parser.add_argument("--height", type=int, default=None, help="legacy only (quickstart: the recipe's)")
    parser.add_argument("--width", type=int, default=None, help="legacy only (quickstart: the recipe's)")
    parser.add_argument("--max-disp", type=int, default=None,
                        help="legacy only: largest disparity of the synthetic scenes (quickstart: the recipe's)")
    parser.add_argument("--train-samples", type=int, default=None, help="training pairs (quickstart: the recipe's)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="held-out pairs that score the proxies (quickstart: the recipe's)")
    parser.add_argument("--truth-samples", type=int, default=None,
                        help="a separate held-out set scoring the truth (quickstart: 32; 0: the proxies' set)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="legacy only: stand-in training steps")
    parser.add_argument("--proxy-steps", type=int, default=None,
                        help="per-candidate steps (quickstart: the recipe's search.distill_steps)")
    parser.add_argument("--parent-steps", type=int, default=None, help="legacy only: parent training steps")
    parser.add_argument("--final-steps", type=int, default=None, help="the final distillation of every student")
    parser.add_argument("--variants", default=None, help=f"comma-separated, some of {', '.join(VARIANTS)}")
    parser.add_argument("--noise-students", type=int, default=None,
                        help="retrain this many students' final distillation with another seed (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: few students, short budgets")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if args.world == "quickstart":
        bad = [f"--{k.replace('_', '-')}" for k in RECIPE_ONLY if getattr(args, k) is not None]
        bad += ["--space"] if args.space not in (None, SUBNETS) else []
        if bad:
            parser.error(f"{', '.join(bad)}: the quickstart world takes these from the recipe and its stand-in")
    quick = QUICK[args.world] if args.quick else {}
    for key, value in DEFAULTS[args.world].items():
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, value))
    args.work_dir = args.work_dir or ("runs/bench-search-quality" + ("-quickstart" if args.world == "quickstart"
                                                                     else "") + ("-smoke" if args.quick else ""))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        parser.error(f"--variants: unknown {bad}, expected some of {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON, Markdown and PNG."""
    command = "python benchmarks/search_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    variants = args.variants
    quiet_third_party()
    start = time.perf_counter()
    qs = args.world == "quickstart"
    world = World(args, quickstart_overrides(args) if qs else legacy_overrides(args), args.truth_samples)
    recipe = world.recipe
    h, w = world.height, world.width
    max_disp = recipe.data.train.synthetic.max_disp
    args.train_samples, args.eval_samples = recipe.data.train.num_samples, recipe.data.eval.num_samples
    if args.proxy_steps is None:
        args.proxy_steps = recipe.search.distill_steps
    separate_truth = world.truth_set is not world.eval_set
    if qs:  # the pipeline's own resolution of search.parent: auto and space subnets
        parent_dir = search_parent(recipe, teacher_folder(recipe))
        space = search_space(recipe, parent_dir)
    else:
        parent_dir, space = None, load_space(args.space)
    results = Results(world.run_dir / "measurements.json")
    results.check_world(world.fingerprint())
    students = spread_students(space, args.students, args.pool, h, w, args.seed)
    work = world.run_dir / "students"

    parent_info = parent = plain_parent = parent_cfg = None
    if qs:  # the stand-in itself: nothing to train
        parent_cfg = load_student(parent_dir).cfg
        parent_info = results.get("parent", lambda: {"path": str(parent_dir), "steps": 0,
                                                     **world.score(load_student(parent_dir))})
    elif any(v.startswith("inherit") for v in variants):
        parent_cfg = parent_config(space)

        def make_parent() -> dict[str, Any]:
            path = world.train(work / "parent" / f"run-{args.parent_steps}", args.parent_steps, cfg=parent_cfg)
            return {"path": str(path), **world.score(load_student(path))}

        parent_info = results.get("parent", make_parent)
    if parent_info is not None:
        parent_info["gmacs"] = count_macs(build_student(parent_cfg), h, w, iters=parent_cfg.iters).gmacs
        plain_parent = load_student(parent_info["path"])
        parent = load_student(parent_info["path"])
        # As a search trial does: the parent's channels in importance order, on the CPU, at the working size.
        parent_info["importance_order"] = order_by_importance(parent, h, w, args.seed)

    sliced: dict[tuple[int, bool], tuple[Path, float]] = {}

    def inherited(i: int, plain: bool = False) -> tuple[Path, float]:
        """Student ``i``'s weights sliced from the parent (saved once; fresh tensors seeded by the student)."""
        if (i, plain) not in sliced:
            torch.manual_seed(args.seed + i)
            child, report = inherit_student(plain_parent if plain else parent, students[i]["config"])
            path = save_student(child, work / f"{i:02d}" / ("sliced-plain" if plain else "sliced"))
            sliced[(i, plain)] = (path, report.fraction_inherited())
        return sliced[(i, plain)]

    def final(i: int, seed: int | None = None) -> dict[str, Any]:
        """Student ``i``'s final distillation (quickstart: from its sliced weights; legacy: from random init)."""
        name = f"final-{args.final_steps}" + (f"-seed{seed}" if seed is not None else "")
        model = load_student(world.train(work / f"{i:02d}" / name, args.final_steps, cfg=students[i]["config"],
                                         init=inherited(i)[0] if qs else None, seed=seed, final=True))
        out = world.score(model, truth=True)
        return {**out, "search_eval": world.score(model)} if separate_truth else out

    parent_tag = "standin" if qs else str(args.parent_steps)
    final_tag = "|sliced" if qs else ""
    rows = []
    for i, st in enumerate(students):
        cfg, row = st["config"], {"index": i, "gmacs": st["gmacs"], "config": st["config"].to_dict()}
        tag = f"{i:02d}"
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        print(f"student {i}: {st['gmacs']:.3f} GMACs", flush=True)
        for v in variants:
            ordered = "|ordered" if v in ("inherit", "inherit0", "inherit_hot") else ""
            hot = v.endswith("_hot")
            # One directory per measurement: distill() resumes a finished run, so a reused one would not train.
            run_name = f"{v}-{args.proxy_steps}-{parent_tag}"

            def make(v=v, cfg=cfg, tag=tag, run_name=run_name, hot=hot, i=i) -> dict[str, Any]:
                if v.startswith("distill"):
                    path = world.train(work / tag / run_name, args.proxy_steps, cfg=cfg, hot=hot)
                    return world.score(load_student(path))
                init, fraction = inherited(i, plain=v == "inherit_plain")
                out = {"inherited_fraction": fraction}
                if v == "inherit0":
                    return {**out, **world.score(load_student(init))}
                path = world.train(work / tag / run_name, args.proxy_steps, cfg=cfg, init=init, hot=hot)
                return {**out, **world.score(load_student(path))}

            row[v] = results.get(f"{key}|{v}|{args.proxy_steps}|{parent_tag}{ordered}", make)
            print(f"  {v}: EPE vs teacher {row[v]['teacher/epe']:.3f} ({row[v]['seconds']:.1f} s)", flush=True)
        row["final"] = results.get(f"{key}|final|{args.final_steps}{final_tag}", lambda i=i: final(i))
        print(f"  final: EPE vs GT {row['final']['gt/epe']:.3f} ({row['final']['seconds']:.1f} s)", flush=True)
        rows.append(row)

    noise = []
    for i in np.unique(np.round(np.linspace(0, len(rows) - 1, args.noise_students)).astype(int)) \
            if args.noise_students else []:
        i, seed = int(i), args.seed + 1
        again = results.get(
            f"{json.dumps(students[i]['config'].to_dict(), sort_keys=True)}|final|{args.final_steps}{final_tag}"
            f"|seed{seed}", lambda i=i, seed=seed: final(i, seed))
        noise.append({"index": i, "seed": seed, "gt/epe": again["gt/epe"], "first": rows[i]["final"]["gt/epe"],
                      "seconds": again["seconds"]})
        print(f"seed noise, student {i}: {again['gt/epe']:.3f} vs {rows[i]['final']['gt/epe']:.3f}", flush=True)

    handmade = None
    if space.name in HANDMADE and not qs:
        hand_cfg = space.config_from_values(HANDMADE[space.name]).replace(name=f"{space.name}-ffs-shaped")
        hand_key = json.dumps(hand_cfg.to_dict(), sort_keys=True)
        handmade = {"config": hand_cfg.to_dict(),
                    "gmacs": count_macs(build_student(hand_cfg), h, w, iters=hand_cfg.iters).gmacs}
        handmade["final"] = results.get(
            f"{hand_key}|final|{args.final_steps}",
            lambda: world.score(load_student(world.train(work / "handmade" / f"final-{args.final_steps}",
                                                         args.final_steps, cfg=hand_cfg, final=True)), truth=True))

    final_gt = [r["final"]["gt/epe"] for r in rows]
    # Two trainings of one student differ by about the seed noise; pairs closer than twice it have no reliable order.
    margin = 2 * float(np.mean([abs(n["gt/epe"] - n["first"]) for n in noise])) if noise else 0.0
    final_teacher = [r["final"]["teacher/epe"] for r in rows]
    cost = [r["gmacs"] for r in rows]
    groups = [r["config"].get(GROUP_FIELD) for r in rows]
    summary = {}
    for v in variants:
        proxy = [r[v]["teacher/epe"] for r in rows]
        summary[v] = {
            "kendall_tau_vs_final_gt": rank_agreement.kendall_tau_b(proxy, final_gt),
            "spearman_vs_final_gt": rank_agreement.spearman(proxy, final_gt),
            "kendall_tau_vs_final_teacher": rank_agreement.kendall_tau_b(proxy, final_teacher),
            "spearman_vs_final_teacher": rank_agreement.spearman(proxy, final_teacher),
            "reliable_pairs": {"margin_px": margin, **rank_agreement.pairwise_agreement(proxy, final_gt, margin)},
            "front": rank_agreement.front_overlap(cost, proxy, final_gt),
            "per_candidate_steps": 0 if v == "inherit0" else args.proxy_steps,
            "seconds_per_candidate": float(np.mean([r[v]["seconds"] for r in rows])),
        }
        if len(set(groups)) > 1:
            summary[v][f"within_{GROUP_FIELD}"] = rank_agreement.within_groups(proxy, final_gt, groups)
        if separate_truth:  # the truth scored on the proxies' own held-out scenes (shared-sample agreement)
            summary[v]["kendall_tau_vs_final_gt_on_proxy_set"] = rank_agreement.kendall_tau_b(
                proxy, [r["final"]["search_eval"]["gt/epe"] for r in rows])
        if handmade is not None:
            summary[v]["vs_handmade"] = rank_agreement.against_handmade(rows, handmade,
                                                                        summary[v]["front"]["proxy_front"])
    machine = machine_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Another proxy budget than the quick start's gets its own files (the truth and seed noise are shared).
    steps_tag = f"-proxy{args.proxy_steps}" if qs and not args.quick and args.proxy_steps != \
        recipe.search.distill_steps else ""
    stem = out / (f"search-quality-{'quickstart-' if qs else ''}{machine_slug(machine)}{steps_tag}"
                  f"{'-smoke' if args.quick else ''}")
    label = "SMOKE RUN (--quick: reduced budgets; proves the script runs, not the benchmark's answer)" \
        if args.quick else "benchmark"
    measured = ((parent_info or {}).get("seconds", 0.0)
                + sum(r[k]["seconds"] for r in rows for k in [*variants, "final"])
                + sum(n["seconds"] for n in noise) + (handmade["final"]["seconds"] if handmade else 0.0))
    report = {
        "benchmark": "search_quality", "world": args.world, "kind": "smoke" if args.quick else "full",
        "machine": machine, "note": args.note, "space": space.name, "space_size": space.size(), "size": [h, w],
        "max_disp": max_disp, "recipe": str(RECIPE.relative_to(RECIPE.parent.parent)),
        "budgets": {k: getattr(args, k) for k in ("students", "pool", "train_samples", "eval_samples",
                                                   "truth_samples", "teacher_steps", "proxy_steps", "parent_steps",
                                                   "final_steps", "noise_students")},
        "recipe_steps": {"search.distill_steps": recipe.search.distill_steps, "distill.steps": recipe.distill.steps},
        "batch_size": recipe.search.batch_size, "optim": dataclasses.asdict(recipe.optim),
        "data": {"train": to_plain(recipe.data.train), "eval": to_plain(recipe.data.eval)},
        "teacher": world.teacher.description, "teacher_vs_gt": world.teacher_vs_gt,
        "teacher_vs_gt_truth_set": world.teacher_vs_gt_truth,
        "parent": {"config": parent_cfg.to_dict(), **parent_info} if parent_info else None,
        "summary": summary, "students": rows, "handmade": handmade, "seed_noise": noise,
        "invocation_seconds": time.perf_counter() - start, "measured_seconds": measured, "command": command,
    }
    _plot(rows, variants, stem.with_suffix(".png"),
          f"{args.world} world: space {space.name} at {h}x{w}, proxy vs final", handmade)
    truth_gt = world.teacher_vs_gt_truth.get("gt/epe", float("nan"))
    md = [f"# Search proxy quality ({args.world} world): {label}", "",
          machine_line(machine, args.note), ""]
    if qs:
        md += [
            f"The CPU quick start's search as `{report['recipe']}` runs it: teacher {world.teacher.description} "
            f"(EPE vs GT {truth_gt:.2f} px on the truth set); its sub-networks (space `subnets`, {space.size()} "
            f"members) at {h}x{w}; photo-textured procedural scenes with disparities up to {max_disp:g} px "
            f"({args.train_samples} training pairs labelled by the teacher, {args.eval_samples} held-out pairs "
            f"scoring the proxies). {len(rows)} students at evenly spaced GMACs quantiles of {args.pool} random "
            f"members ({min(cost):.3f}-{max(cost):.3f} GMACs; the stand-in itself "
            f"{parent_info['gmacs']:.3f}). Batch {recipe.search.batch_size}, lr {recipe.optim.lr:g}, seed "
            f"{args.seed}; proxy {args.proxy_steps} steps per candidate (the recipe's search.distill_steps: "
            f"{recipe.search.distill_steps}); parent: the stand-in itself, no training per study. Truth: each "
            f"student's final distillation for {args.final_steps} steps from its sliced weights (the recipe gives "
            f"the chosen student {recipe.search.distill_steps} + {recipe.distill.steps}), EPE vs ground truth on "
            + (f"{args.truth_samples} separate held-out scenes (generator seed {TRUTH_SEED})."
               if separate_truth else "the proxies' held-out pairs."), ""]
    else:
        per_cand_parent = args.parent_steps / max(1, len(rows))
        md += [
            f"Space `{space.name}` at {h}x{w} (disparities up to {max_disp:g} px), {len(rows)} "
            f"students at evenly spaced GMACs quantiles of {args.pool} random members ({min(cost):.3f}-"
            f"{max(cost):.3f} GMACs). Teacher: {world.teacher.description} (EPE vs GT "
            f"{world.teacher_vs_gt.get('gt/epe', float('nan')):.2f} px). Batch {recipe.search.batch_size}, "
            f"seed {args.seed}; proxy {args.proxy_steps} steps per candidate; parent {args.parent_steps} steps once "
            f"per study ({per_cand_parent:.0f} per candidate at this study size); final distillation "
            f"{args.final_steps} steps. Proxy score: EPE vs teacher on {args.eval_samples} held-out pairs; truth: "
            "final EPE vs ground truth.", ""]
    grouped = qs and all(f"within_{GROUP_FIELD}" in s for s in summary.values())
    extra = (f" | tau within equal {GROUP_FIELD}" if grouped else "") \
        + (" | tau vs final EPE on the proxies' pairs" if separate_truth else "")
    md += [
        "| proxy | Kendall tau | Spearman | tau on reliably ordered pairs | tau vs final EPE-to-teacher "
        f"| true-front recall | proxy-front precision{extra} | steps / candidate | s / candidate |",
        "|---|---|---|---|---|---|---|" + "---|" * (grouped + separate_truth) + "---|---|",
    ]
    for v, s in summary.items():
        md.append(f"| {v} | {s['kendall_tau_vs_final_gt']:.2f} | {s['spearman_vs_final_gt']:.2f} | "
                  f"{s['reliable_pairs']['tau']:.2f} ({s['reliable_pairs']['pairs']} pairs) | "
                  f"{s['kendall_tau_vs_final_teacher']:.2f} | {s['front']['recall']:.2f} | "
                  f"{s['front']['precision']:.2f} | "
                  + (f"{s[f'within_{GROUP_FIELD}']['tau']:.2f} ({s[f'within_{GROUP_FIELD}']['pairs']} pairs) | "
                     if grouped else "")
                  + (f"{s['kendall_tau_vs_final_gt_on_proxy_set']:.2f} | " if separate_truth else "")
                  + f"{s['per_candidate_steps']} | {s['seconds_per_candidate']:.1f} |")
    md += ["", f"| # | GMACs | {GROUP_FIELD} | final EPE vs GT | " + " | ".join(f"{v} proxy" for v in variants)
           + " |", "|---|---|---|---|" + "---|" * len(variants)]
    for r in rows:
        md.append(f"| {r['index']} | {r['gmacs']:.3f} | {r['config'].get(GROUP_FIELD, '-')} | "
                  f"{r['final']['gt/epe']:.2f} | " + " | ".join(f"{r[v]['teacher/epe']:.2f}" for v in variants) + " |")
    if noise:
        diffs = [abs(n["gt/epe"] - n["first"]) for n in noise]
        how = "the same sliced starting weights, another data order" if qs else "another initialisation and data order"
        md += ["", f"**Seed noise of the truth**: the final distillation of students "
               f"{[n['index'] for n in noise]} repeated with seed {noise[0]['seed']} ({how}): final EPE differs by "
               f"{np.mean(diffs):.2f} px on average (max {max(diffs):.2f}); the "
               f"{len(rows)} students' final EPEs span {min(final_gt):.2f}-{max(final_gt):.2f} px (std "
               f"{np.std(final_gt):.2f}). Pairs of students closer than that noise have no reliable true order, "
               f"which caps the reachable tau; 'tau on reliably ordered pairs' counts only the pairs whose final "
               f"EPEs differ by more than twice it ({margin:.2f} px)."]
    if handmade is not None:
        true_front = rank_agreement.front_overlap(cost, final_gt, final_gt)["true_front"]
        by = rank_agreement.against_handmade(rows, handmade, true_front)
        md += ["", f"**Against the hand-made design** (Fast-FoundationStereo's shape at this space's scale, "
               f"{handmade['gmacs']:.3f} GMACs, the same final distillation): final EPE vs GT "
               f"{handmade['final']['gt/epe']:.2f} px. Dominated by students {by['dominated_by'] or 'none'} "
               f"(true-front members among them: {by['front_dominates'] or 'none'}); it dominates students "
               f"{by['dominates'] or 'none'}. The front each proxy returns contains a dominating student: "
               + ", ".join(f"{v} {'yes' if s['vs_handmade']['front_dominates'] else 'no'}"
                           for v, s in summary.items()) + "."]
    md += ["", f"Scatter: `{stem.with_suffix('.png').name}`. "
           + ("Parent and student" if not qs else "Student") + " trainings and evaluations: "
           f"{measured:.0f} s (stored measurements, seed-noise retrainings included; the teacher's time is in its "
           f"description); this invocation {report['invocation_seconds']:.0f} s. Command: `{command}`."]
    write_report(stem, report, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
