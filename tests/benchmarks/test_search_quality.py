"""benchmarks/search_quality.py: its rank statistics against SciPy, the Pareto bookkeeping and the hand-made
design's place in the tiny space."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from benchmarks.search_quality import (
    HANDMADE,
    against_handmade,
    dominates,
    front_overlap,
    kendall_tau_b,
    pairwise_agreement,
    spearman,
)
from search_spaces import load_space


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_statistics_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 12).astype(float)  # ties on purpose: tau-b and average ranks must handle them
    b = a + rng.normal(0, 2, 12)
    assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


def test_fronts_and_domination():
    cost = [1.0, 2.0, 3.0, 4.0]
    final = [5.0, 3.0, 4.0, 1.0]  # student 2 is dominated by student 1
    proxy = [5.0, 4.0, 3.0, 2.0]  # the proxy thinks 2 beats 1
    fronts = front_overlap(cost, proxy, final)
    assert fronts["true_front"] == [0, 1, 3] and fronts["proxy_front"] == [0, 1, 2, 3]
    assert fronts["recall"] == 1.0 and fronts["precision"] == 0.75
    assert dominates((1, 1), (1, 2)) and not dominates((1, 1), (1, 1)) and not dominates((0, 3), (1, 2))
    rows = [{"index": i, "gmacs": c, "final": {"gt/epe": e}} for i, (c, e) in enumerate(zip(cost, final, strict=True))]
    hand = {"gmacs": 2.5, "final": {"gt/epe": 3.5}}
    result = against_handmade(rows, hand, [0, 3])
    assert result == {"dominated_by": [1], "front_dominates": [], "dominates": [2]}


def test_handmade_design_is_a_member_of_its_space():
    space = load_space("tiny")
    cfg = space.config_from_values(HANDMADE["tiny"])
    for dim in space.dimensions:
        assert HANDMADE["tiny"][dim.name] in dim.values(), dim.name
    assert cfg.volume_scale == 4 and cfg.gru_levels == 1 and cfg.concat_dim > 0 and cfg.transformer_layers == 1


def test_agreement_on_reliably_ordered_pairs_ignores_close_pairs():
    truth = [1.0, 1.1, 3.0, 3.05]  # two clusters; inside each the order is within the noise
    proxy = [2.0, 1.0, 5.0, 4.0]  # right about the clusters, wrong inside both
    assert kendall_tau_b(proxy, truth) == pytest.approx(1 / 3)
    assert pairwise_agreement(proxy, truth, 0.2) == {"tau": 1.0, "pairs": 4, "concordant_share": 1.0}
    assert pairwise_agreement(proxy, truth, 0.0)["tau"] == pytest.approx(1 / 3)
