"""Does the search's short-distillation proxy rank students the way their fully trained accuracy does?

In the stand-in world of the CPU quick start (a stand-in teacher trained on synthetic stereo with exact
ground truth, the ``tiny`` space at 64x128): sample students spread over the space's cost range, score each
with every proxy variant, train each fully with the final distillation, and report the rank agreement
(Kendall tau-b and Spearman) between proxy score and final EPE, and how much of the true Pareto front
(cost vs final EPE) the proxy's front finds.

Why 64x128 and ``tiny``: it is the quick start's working size and space, so the answer is about the search a
CPU user runs; the tiny space's students span ~4x in GMACs there, and at 64x128 with disparities up to 24 px
their fully trained errors differ by more than the evaluation's noise. The cost axis is GMACs at 64x128
(exact and repeatable on a shared CPU, where measured milliseconds are not).

Proxy variants (same seed, the same per-candidate steps, batch and learning-rate schedule as the search):

* ``distill``: random init, ``--proxy-steps`` of distillation, evaluate (the default before this benchmark).
* ``inherit`` (the default): weights sliced from a parent student (the space's largest member) trained once per
  study for ``--parent-steps`` and reordered by channel importance (:mod:`compress.nas.inherit`), then
  ``--proxy-steps`` of distillation, evaluate.
* ``inherit0``: those inherited weights evaluated without any training (no per-candidate compute).
* ``inherit_plain``: as ``inherit``, from the parent in its trained channel order (no importance reordering).
* ``distill_hot`` / ``inherit_hot``: as ``distill`` / ``inherit`` with a schedule conditioned for few steps
  (peak learning rate x2.5, two warm-up steps), the same number of steps.

``--noise-students K`` also retrains the final distillation of K evenly spaced students with another seed: how
far two equally good trainings of one student differ bounds the rank agreement any proxy can reach.

The parent's steps are a once-per-study cost; the report gives it per candidate for a study of the
benchmark's size. Every score is the search's error metric (EPE against the teacher on the held-out set);
the truth is the final student's EPE against ground truth (also reported against the teacher).

    python benchmarks/search_quality.py                  # 12 students, the default budgets
    python benchmarks/search_quality.py --quick          # smoke run: 5 students, short budgets

Default budgets: stand-in teacher 200 steps, 48 training / 16 held-out pairs, a pool of 120 random members,
12 students, proxy 30 steps per candidate (the quick start's ``search.distill_steps``), parent 300 steps,
final distillation 250 steps per student (2.5x the quick start's final ``distill.steps``), batch 4. From
the smoke run's step times on 2 shared cores with OMP_NUM_THREADS=1 (teacher ~1.5 s/step, parent ~0.8,
students ~0.45): about 38 minutes for the four first variants; the full run with all six, four
seed-noise students and the hand-made design measured 2453 s of training and evaluation on 2 shared cores.

Writes benchmarks/results/search-quality-<machine>[-smoke].{json,md,png}; a rerun on the same --work-dir
reuses every finished training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

VARIANTS = ("distill", "inherit", "inherit0", "inherit_plain", "distill_hot", "inherit_hot")
HOT = {"lr_scale": 2.5, "warmup_steps": 2}
"""The few-step schedule of the *_hot variants."""


# ------------------------------------------------------------------------------------------- statistics


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (tie-corrected) of two paired samples."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = np.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return float((concordant - discordant) / denom) if denom else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def pairwise_agreement(proxy: list[float], truth: list[float], margin: float) -> dict[str, float]:
    """Kendall-style agreement over the pairs whose true values differ by more than ``margin`` (a proxy tie
    counts as neither): the rank agreement on the pairs that have a reliable true order."""
    c = d = n = 0
    for i in range(len(truth)):
        for j in range(i + 1, len(truth)):
            if abs(truth[i] - truth[j]) <= margin:
                continue
            n += 1
            s = np.sign(proxy[i] - proxy[j]) * np.sign(truth[i] - truth[j])
            c, d = c + (s > 0), d + (s < 0)
    return {"tau": float((c - d) / n) if n else float("nan"), "pairs": n,
            "concordant_share": float(c / n) if n else float("nan")}


def front_overlap(cost: list[float], proxy: list[float], final: list[float]) -> dict[str, Any]:
    """The proxy's and the true Pareto fronts (minimise cost and error) and how much they share."""
    from compress.nas.pareto import pareto_front

    true = set(pareto_front(np.c_[cost, final], ["minimize", "minimize"]).tolist())
    found = set(pareto_front(np.c_[cost, proxy], ["minimize", "minimize"]).tolist())
    both = true & found
    return {"true_front": sorted(true), "proxy_front": sorted(found),
            "recall": len(both) / len(true) if true else float("nan"),
            "precision": len(both) / len(found) if found else float("nan")}


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


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether (cost, error) ``a`` Pareto-dominates ``b`` (no worse in both, better in one)."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def against_handmade(rows: list[dict], hand: dict, front: list[int]) -> dict[str, Any]:
    """Which students dominate the hand-made design, and whether the given front has one that does."""
    point = (hand["gmacs"], hand["final"]["gt/epe"])
    by = [r["index"] for r in rows if dominates((r["gmacs"], r["final"]["gt/epe"]), point)]
    beaten = [r["index"] for r in rows if dominates(point, (r["gmacs"], r["final"]["gt/epe"]))]
    return {"dominated_by": by, "front_dominates": sorted(set(by) & set(front)), "dominates": beaten}



def spread_students(space, n: int, pool: int, height: int, width: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct students at evenly spaced GMACs quantiles of ``pool`` random members of the space."""
    from search_spaces import build_student, count_macs

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


class World:
    """The stand-in teacher, its label cache and held-out set, and one way to distil and score a student."""

    def __init__(self, args: argparse.Namespace) -> None:
        from compress.device import pick_device
        from compress.pipeline import load_run_recipe
        from compress.pipeline.run import _labels_config, prepare_labels, teacher_scores
        from compress.pipeline.teacher_stage import get_teacher

        h, w = args.height, args.width
        synth = f"{{height: {h}, width: {w}, max_disp: {args.max_disp}, num_objects: 4"
        overrides = [
            f"run_dir={args.work_dir}", f"height={h}", f"width={w}", f"seed={args.seed}",
            f"data.train={{kind: synthetic, num_samples: {args.train_samples}, synthetic: {synth}, seed: 0}}}}",
            f"data.eval={{kind: synthetic, num_samples: {args.eval_samples}, synthetic: {synth}, seed: 1000}}}}",
            f"teacher.train_steps={args.teacher_steps}", "teacher.stand_in=train",
        ]
        root = Path(__file__).resolve().parent.parent
        self.recipe = load_run_recipe(root / "recipes" / "quickstart_cpu.yaml", overrides)
        self.run_dir = Path(args.work_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(None)
        self.teacher = get_teacher(self.recipe, self.run_dir, self.device)
        self.labels_dir, self.eval_set = prepare_labels(self.recipe, self.run_dir, self.teacher, self.device)
        self.labels = _labels_config(self.recipe)
        self.teacher_vs_gt = teacher_scores(self.eval_set)
        self.args = args

    def train(self, out_dir: Path, steps: int, cfg=None, init: Path | None = None, hot: bool = False,
              seed: int | None = None) -> Path:
        """Distil a student exactly as a search trial does (same loss, optimiser and warm-up rule; ``hot``: the
        few-step schedule)."""
        from compress.distill import distill
        from compress.distill.config import StudentSpec, from_label_cache

        s = self.recipe.search
        spec = (StudentSpec(kind="search_space", init_checkpoint=str(init)) if init is not None
                else StudentSpec(kind="search_space", config=cfg.to_dict()))
        iters = cfg.iters
        optim = dataclasses.replace(self.recipe.optim, warmup_steps=min(self.recipe.optim.warmup_steps, steps // 4))
        if hot:
            optim = dataclasses.replace(optim, lr=optim.lr * HOT["lr_scale"], warmup_steps=HOT["warmup_steps"])
        dc = from_label_cache(
            out_dir, spec, self.recipe.data.train, self.labels_dir, self.labels, iters,
            seed=self.args.seed if seed is None else seed,
            steps=steps, batch_size=s.batch_size, amp="off", device=str(self.device),
            log_every=max(1, steps // 4), checkpoint_every=steps, progress=False, loss=self.recipe.loss,
            optim=optim,
        )
        return distill(dc).student_path

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """EPE/D1 against the teacher and against ground truth on the held-out set."""
        from compress.evaluation import evaluate_student

        return evaluate_student(model.to(self.device).eval(), self.eval_set, iters=model.cfg.iters,
                                device=self.device)


class Results:
    """Finished measurements on disk, so a rerun (or a crash) repeats no training."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, make) -> Any:
        """The stored value of ``key``, or ``make()``'s, stored."""
        from compress.atomic import atomic_write_text

        if key not in self.data:
            t0 = time.perf_counter()
            value = make()
            value["seconds"] = time.perf_counter() - t0
            self.data[key] = value
            atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str))
        return self.data[key]


# ------------------------------------------------------------------------------------------- report


def _plot(rows: list[dict], variants: list[str], out_png: Path, title: str, handmade: dict | None = None) -> None:
    from matplotlib.figure import Figure

    panels = len(variants) + 1
    cols = min(panels, 4)
    grid = (math.ceil(panels / cols), cols)
    fig = Figure(figsize=(4.6 * cols + 1, 4.2 * grid[0]), dpi=110, layout="constrained")
    final = [r["final"]["gt/epe"] for r in rows]
    cost = [r["gmacs"] for r in rows]
    ax = fig.add_subplot(*grid, 1)
    true = front_overlap(cost, final, final)["true_front"]
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
        ax.set_title(f"{v}: tau {kendall_tau_b(proxy, final):.2f}")
        ax.grid(alpha=0.3)
    fig.colorbar(sc, ax=fig.axes, label="GMACs")
    fig.suptitle(title)
    fig.savefig(out_png)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON, Markdown and PNG."""
    from compress.atomic import atomic_write_text
    from compress.latency import machine_info, machine_slug
    from compress.nas.inherit import inherit_student, order_by_importance, parent_config
    from compress.pipeline.run import quiet_third_party
    from search_spaces import build_student, count_macs, load_space, load_student, save_student

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--students", type=int, default=12)
    parser.add_argument("--pool", type=int, default=120, help="random members whose GMACs quantiles are picked")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-disp", type=int, default=24, help="largest disparity of the synthetic scenes")
    parser.add_argument("--train-samples", type=int, default=48)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=200, help="stand-in teacher training steps")
    parser.add_argument("--proxy-steps", type=int, default=30, help="per-candidate steps (the quick start's)")
    parser.add_argument("--parent-steps", type=int, default=300, help="once-per-study parent training steps")
    parser.add_argument("--final-steps", type=int, default=250, help="the final distillation of every student")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--noise-students", type=int, default=4,
                        help="retrain this many students' final distillation with another seed (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 students, teacher 60 / proxy 10 / parent 60 / final 60 steps")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.students, args.pool, args.teacher_steps = 5, 30, 60
        args.proxy_steps, args.parent_steps, args.final_steps, args.eval_samples = 10, 60, 60, 8
        args.noise_students = min(args.noise_students, 2)
    args.work_dir = args.work_dir or ("runs/bench-search-quality" + ("-smoke" if args.quick else ""))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"--variants: unknown {bad}, expected some of {', '.join(VARIANTS)}")
    quiet_third_party()
    start = time.perf_counter()
    space = load_space(args.space)
    world = World(args)
    results = Results(world.run_dir / "measurements.json")
    students = spread_students(space, args.students, args.pool, args.height, args.width, args.seed)
    work = world.run_dir / "students"

    parent_cfg = parent_config(space)
    parent_dir = work / "parent"
    parent_info = None
    if any(v.startswith("inherit") for v in variants):
        def make_parent() -> dict[str, Any]:
            path = world.train(parent_dir / f"run-{args.parent_steps}", args.parent_steps, cfg=parent_cfg)
            return {"path": str(path), **world.score(load_student(path))}

        parent_info = results.get("parent", make_parent)
        parent_info["gmacs"] = count_macs(build_student(parent_cfg), args.height, args.width,
                                          iters=parent_cfg.iters).gmacs
        plain_parent = load_student(parent_info["path"])
        parent = load_student(parent_info["path"])
        parent_info["importance_order"] = order_by_importance(parent, args.height, args.width, args.seed)

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
            run_name = f"{v}-{args.proxy_steps}-{args.parent_steps}"

            def make(v=v, cfg=cfg, tag=tag, run_name=run_name, hot=hot) -> dict[str, Any]:
                if v.startswith("distill"):
                    path = world.train(work / tag / run_name, args.proxy_steps, cfg=cfg, hot=hot)
                    return world.score(load_student(path))
                child, report = inherit_student(plain_parent if v == "inherit_plain" else parent, cfg)
                out = {"inherited_fraction": report.fraction_inherited()}
                if v == "inherit0":
                    return {**out, **world.score(child)}
                init = save_student(child, work / tag / f"{run_name}-init")
                path = world.train(work / tag / run_name, args.proxy_steps, cfg=cfg, init=init, hot=hot)
                return {**out, **world.score(load_student(path))}

            row[v] = results.get(f"{key}|{v}|{args.proxy_steps}|{args.parent_steps}{ordered}", make)
        row["final"] = results.get(
            f"{key}|final|{args.final_steps}",
            lambda cfg=cfg, tag=tag: world.score(load_student(world.train(work / tag / f"final-{args.final_steps}",
                                                                          args.final_steps, cfg=cfg))))
        rows.append(row)

    noise = []
    for i in np.unique(np.round(np.linspace(0, len(rows) - 1, args.noise_students)).astype(int)) \
            if args.noise_students else []:
        r, seed = rows[i], args.seed + 1
        cfg = students[i]["config"]
        again = results.get(
            f"{json.dumps(cfg.to_dict(), sort_keys=True)}|final|{args.final_steps}|seed{seed}",
            lambda cfg=cfg, i=i, seed=seed: world.score(load_student(world.train(
                work / f"{i:02d}" / f"final-{args.final_steps}-seed{seed}", args.final_steps, cfg=cfg, seed=seed))))
        noise.append({"index": int(i), "seed": seed, "gt/epe": again["gt/epe"], "first": r["final"]["gt/epe"]})

    handmade = None
    if args.space in HANDMADE:
        hand_cfg = space.config_from_values(HANDMADE[args.space]).replace(name=f"{args.space}-ffs-shaped")
        hand_key = json.dumps(hand_cfg.to_dict(), sort_keys=True)
        handmade = {"config": hand_cfg.to_dict(),
                    "gmacs": count_macs(build_student(hand_cfg), args.height, args.width, iters=hand_cfg.iters).gmacs}
        handmade["final"] = results.get(
            f"{hand_key}|final|{args.final_steps}",
            lambda: world.score(load_student(world.train(work / "handmade" / f"final-{args.final_steps}",
                                                         args.final_steps, cfg=hand_cfg))))

    final_gt = [r["final"]["gt/epe"] for r in rows]
    # Two trainings of one student differ by about the seed noise; pairs closer than twice it have no reliable order.
    margin = 2 * float(np.mean([abs(n["gt/epe"] - n["first"]) for n in noise])) if noise else 0.0
    final_teacher = [r["final"]["teacher/epe"] for r in rows]
    cost = [r["gmacs"] for r in rows]
    summary = {}
    for v in variants:
        proxy = [r[v]["teacher/epe"] for r in rows]
        summary[v] = {
            "kendall_tau_vs_final_gt": kendall_tau_b(proxy, final_gt),
            "spearman_vs_final_gt": spearman(proxy, final_gt),
            "kendall_tau_vs_final_teacher": kendall_tau_b(proxy, final_teacher),
            "spearman_vs_final_teacher": spearman(proxy, final_teacher),
            "reliable_pairs": {"margin_px": margin, **pairwise_agreement(proxy, final_gt, margin)},
            "front": front_overlap(cost, proxy, final_gt),
            "per_candidate_steps": 0 if v == "inherit0" else args.proxy_steps,
            "seconds_per_candidate": float(np.mean([r[v]["seconds"] for r in rows])),
        }
        if handmade is not None:
            summary[v]["vs_handmade"] = against_handmade(rows, handmade, summary[v]["front"]["proxy_front"])
    machine = machine_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"search-quality-{machine_slug(machine)}{'-smoke' if args.quick else ''}"
    label = "SMOKE RUN (--quick: reduced budgets; proves the script runs, not the benchmark's answer)" \
        if args.quick else "benchmark"
    report = {
        "benchmark": "search_quality", "kind": "smoke" if args.quick else "full", "machine": machine,
        "note": args.note, "space": args.space, "size": [args.height, args.width], "max_disp": args.max_disp,
        "budgets": {k: getattr(args, k) for k in ("students", "pool", "train_samples", "eval_samples",
                                                   "teacher_steps", "proxy_steps", "parent_steps", "final_steps")},
        "batch_size": world.recipe.search.batch_size, "optim": dataclasses.asdict(world.recipe.optim),
        "teacher": world.teacher.description, "teacher_vs_gt": world.teacher_vs_gt,
        "parent": {"config": parent_cfg.to_dict(), **(parent_info or {})} if parent_info else None,
        "summary": summary, "students": rows, "handmade": handmade, "seed_noise": noise,
        "invocation_seconds": time.perf_counter() - start,
        "measured_seconds": (parent_info or {}).get("seconds", 0.0)
        + sum(r[k]["seconds"] for r in rows for k in [*variants, "final"]),
    }
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    _plot(rows, variants, stem.with_suffix(".png"), f"{args.space} space at {args.height}x{args.width}: proxy vs final",
          handmade)
    per_cand_parent = args.parent_steps / max(1, len(rows))
    md = [
        f"# Search proxy quality: {label}", "",
        f"Machine: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores), GPU {machine.get('gpu') or 'none'}."
        + (f" {args.note}" if args.note else ""), "",
        f"Space `{args.space}` at {args.height}x{args.width} (disparities up to {args.max_disp} px), {len(rows)} "
        f"students at evenly spaced GMACs quantiles of {args.pool} random members ({min(cost):.3f}-{max(cost):.3f} "
        f"GMACs). Teacher: {world.teacher.description} (EPE vs GT "
        f"{world.teacher_vs_gt.get('gt/epe', float('nan')):.2f} px). Batch {world.recipe.search.batch_size}, "
        f"seed {args.seed}; proxy {args.proxy_steps} steps per candidate; parent {args.parent_steps} steps once "
        f"per study ({per_cand_parent:.0f} per candidate at this study size); final distillation "
        f"{args.final_steps} steps. Proxy score: EPE vs teacher on {args.eval_samples} held-out pairs; truth: "
        "final EPE vs ground truth.", "",
        "| proxy | Kendall tau | Spearman | tau on reliably ordered pairs | tau vs final EPE-to-teacher "
        "| true-front recall | proxy-front precision | steps / candidate | s / candidate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        md.append(f"| {v} | {s['kendall_tau_vs_final_gt']:.2f} | {s['spearman_vs_final_gt']:.2f} | "
                  f"{s['reliable_pairs']['tau']:.2f} ({s['reliable_pairs']['pairs']} pairs) | "
                  f"{s['kendall_tau_vs_final_teacher']:.2f} | {s['front']['recall']:.2f} | "
                  f"{s['front']['precision']:.2f} | {s['per_candidate_steps']} | {s['seconds_per_candidate']:.1f} |")
    md += ["", "| # | GMACs | final EPE vs GT | " + " | ".join(f"{v} proxy" for v in variants) + " |",
           "|---|---|---|" + "---|" * len(variants)]
    for r in rows:
        md.append(f"| {r['index']} | {r['gmacs']:.3f} | {r['final']['gt/epe']:.2f} | "
                  + " | ".join(f"{r[v]['teacher/epe']:.2f}" for v in variants) + " |")
    if noise:
        diffs = [abs(n["gt/epe"] - n["first"]) for n in noise]
        md += ["", f"**Seed noise of the truth**: the final distillation of students "
               f"{[n['index'] for n in noise]} repeated with seed {noise[0]['seed']}: final EPE differs by "
               f"{np.mean(diffs):.2f} px on average (max {max(diffs):.2f}); the {len(rows)} students' final EPEs span "
               f"{min(final_gt):.2f}-{max(final_gt):.2f} px (std {np.std(final_gt):.2f}). Pairs of students closer "
               f"than that noise have no reliable true order, which caps the reachable tau; 'tau on reliably "
               f"ordered pairs' counts only the pairs whose final EPEs differ by more than twice it "
               f"({margin:.2f} px)."]
    if handmade is not None:
        true_front = front_overlap(cost, final_gt, final_gt)["true_front"]
        by = against_handmade(rows, handmade, true_front)
        md += ["", f"**Against the hand-made design** (Fast-FoundationStereo's shape at this space's scale, "
               f"{handmade['gmacs']:.3f} GMACs, the same final distillation): final EPE vs GT "
               f"{handmade['final']['gt/epe']:.2f} px. Dominated by students {by['dominated_by'] or 'none'} "
               f"(true-front members among them: {by['front_dominates'] or 'none'}); it dominates students "
               f"{by['dominates'] or 'none'}. The front each proxy returns contains a dominating student: "
               + ", ".join(f"{v} {'yes' if s['vs_handmade']['front_dominates'] else 'no'}"
                           for v, s in summary.items()) + "."]
    cmd = "python benchmarks/search_quality.py" + (" --quick" if args.quick else "")
    md += ["", f"Scatter: `{stem.with_suffix('.png').name}`. Parent and student trainings and evaluations: "
           f"{report['measured_seconds']:.0f} s (stored measurements; the teacher's time is in its description). "
           f"Command: `{cmd}`."]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
