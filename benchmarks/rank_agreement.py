"""Rank agreement between a cheap proxy score and the truth, for benchmarks/search_quality.py: Kendall tau-b,
Spearman, agreement on reliably ordered pairs and within groups, Pareto-front overlap, and Pareto dominance against a
hand-made design."""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.nas.pareto import pareto_front


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


def within_groups(proxy: list[float], truth: list[float], groups: list[Any]) -> dict[str, float]:
    """Kendall-style agreement over the pairs in the same group only (e.g. students of one cost-volume scale): how
    well a proxy orders students where a coarse design choice does not already decide the order (a tie on either
    side counts as neither)."""
    c = d = n = 0
    for i in range(len(truth)):
        for j in range(i + 1, len(truth)):
            if groups[i] != groups[j]:
                continue
            n += 1
            s = np.sign(proxy[i] - proxy[j]) * np.sign(truth[i] - truth[j])
            c, d = c + (s > 0), d + (s < 0)
    return {"tau": float((c - d) / n) if n else float("nan"), "pairs": n}


def front_overlap(cost: list[float], proxy: list[float], final: list[float]) -> dict[str, Any]:
    """The proxy's and the true Pareto fronts (minimise cost and error) and how much they share."""
    true = set(pareto_front(np.c_[cost, final], ["minimize", "minimize"]).tolist())
    found = set(pareto_front(np.c_[cost, proxy], ["minimize", "minimize"]).tolist())
    both = true & found
    return {"true_front": sorted(true), "proxy_front": sorted(found),
            "recall": len(both) / len(true) if true else float("nan"),
            "precision": len(both) / len(found) if found else float("nan")}


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether (cost, error) ``a`` Pareto-dominates ``b`` (no worse in both, better in one)."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def against_handmade(rows: list[dict], hand: dict, front: list[int]) -> dict[str, Any]:
    """Which students dominate the hand-made design, and whether the given front has one that does."""
    point = (hand["gmacs"], hand["final"]["gt/epe"])
    by = [r["index"] for r in rows if dominates((r["gmacs"], r["final"]["gt/epe"]), point)]
    beaten = [r["index"] for r in rows if dominates(point, (r["gmacs"], r["final"]["gt/epe"]))]
    return {"dominated_by": by, "front_dominates": sorted(set(by) & set(front)), "dominates": beaten}
