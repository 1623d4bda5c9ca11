"""benchmarks/search_quality.py: its rank statistics (benchmarks/rank_agreement.py) against SciPy, the Pareto
bookkeeping and the hand-made design's place in the tiny space."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from benchmarks.rank_agreement import (
    against_handmade,
    dominates,
    front_overlap,
    kendall_tau_b,
    pairwise_agreement,
    spearman,
    within_groups,
)
from benchmarks.search_quality import HANDMADE
from search_spaces import load_space
from tests.paths import REPO


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


def test_agreement_within_groups_ignores_pairs_across_groups():
    groups = [8, 8, 4, 4]  # two groups the proxy separates right, but orders wrongly inside one
    truth = [3.0, 3.5, 1.0, 1.5]
    proxy = [9.0, 10.0, 2.0, 1.0]
    assert kendall_tau_b(proxy, truth) == pytest.approx(2 / 3)
    assert within_groups(proxy, truth, groups) == {"tau": 0.0, "pairs": 2}
    assert within_groups(proxy, truth, [0, 0, 0, 0])["tau"] == pytest.approx(kendall_tau_b(proxy, truth))


def test_world_arguments_and_recipes():
    from benchmarks.search_quality import RECIPE, legacy_overrides, parse_args, quickstart_overrides
    from compress.pipeline import load_run_recipe
    from compress.structured import to_plain

    args = parse_args(["--world", "quickstart"])
    assert args.variants == ["inherit", "inherit0", "distill"] and args.proxy_steps is None  # None: the recipe's
    assert args.final_steps == 150 and args.parent_steps == 0 and args.truth_samples == 32
    assert args.work_dir == "runs/bench-search-quality-quickstart"
    with pytest.raises(SystemExit):
        parse_args(["--world", "quickstart", "--height", "32"])  # the recipe's size, not the benchmark's
    with pytest.raises(SystemExit):
        parse_args(["--world", "quickstart", "--space", "tiny"])
    assert parse_args(["--world", "quickstart", "--quick", "--final-steps", "7"]).final_steps == 7  # explicit wins

    # The quickstart world is the quick start's recipe: its data, teacher and space, unchanged.
    recipe = load_run_recipe(RECIPE)
    world = load_run_recipe(RECIPE, quickstart_overrides(args))
    assert to_plain(world.data) == to_plain(recipe.data) and world.teacher.stand_in == "shipped"
    assert (world.search.space, world.search.parent, world.search.proxy) == ("subnets", "auto", "inherit")
    counts = load_run_recipe(RECIPE, quickstart_overrides(parse_args(["--world", "quickstart", "--train-samples",
                                                                      "8"])))
    assert counts.data.train.num_samples == 8 and counts.data.train.synthetic == recipe.data.train.synthetic

    # The legacy world stays the one of its committed result, whatever the quick start's recipe became since.
    legacy = load_run_recipe(RECIPE, legacy_overrides(parse_args([])))
    assert legacy.teacher.stand_in == "train" and legacy.optim.lr == pytest.approx(2e-3)
    synth = legacy.data.train.synthetic
    assert synth.texture_dir is None and synth.max_disp_low is None and synth.max_disp == 24
    assert legacy.data.eval.num_samples == 16 and legacy.data.eval.synthetic.seed == 1000


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads under load run the stand-in many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_quickstart_world_smoke(tmp_path, one_thread):
    """The quick start's world end to end at tiny budgets: the shipped stand-in as teacher and parent, its
    sub-networks, every proxy, the truth from the sliced weights on its own held-out set, seed noise; a rerun
    trains nothing again."""
    import json

    from benchmarks.search_quality import main
    from compress.pipeline.standin import SHIPPED_DIR
    from search_spaces import SUBNETS, load_space, load_student

    argv = ["--world", "quickstart", "--students", "2", "--pool", "4", "--proxy-steps", "2", "--final-steps", "3",
            "--train-samples", "8", "--eval-samples", "2", "--truth-samples", "2", "--noise-students", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--quick"]
    assert main(argv) == 0
    (json_path,) = (tmp_path / "out").glob("search-quality-quickstart-*-smoke.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file()
    report = json.loads(json_path.read_text())
    assert report["world"] == "quickstart" and report["space"] == SUBNETS and report["size"] == [64, 128]
    assert report["budgets"]["parent_steps"] == 0 and report["parent"]["steps"] == 0
    assert report["parent"]["path"] == SHIPPED_DIR.relative_to(REPO).as_posix()  # no path of this machine
    assert "shipped stand-in" in report["teacher"]
    assert report["data"]["train"]["synthetic"]["texture_dir"] == "skimage" and report["max_disp"] == 48
    assert set(report["summary"]) == {"inherit", "inherit0", "distill"}
    assert report["summary"]["inherit0"]["per_candidate_steps"] == 0
    assert report["summary"]["inherit"]["per_candidate_steps"] == 2
    assert "kendall_tau_vs_final_gt_on_proxy_set" in report["summary"]["inherit"]
    assert len(report["seed_noise"]) == 1
    space = load_space(SUBNETS, parent=load_student(SHIPPED_DIR).cfg)
    for row in report["students"]:
        assert row["inherit"]["inherited_fraction"] > 0.5 and "search_eval" in row["final"]
        values = {d.name: row["config"][d.name] for d in space.dimensions}
        assert space.config_from_values(values).to_dict() == row["config"]  # a sub-network of the stand-in
    assert (tmp_path / "work" / "students" / "00" / "sliced" / "model.safetensors").is_file()

    measurements = (tmp_path / "work" / "measurements.json").read_text()
    assert main(argv) == 0
    assert (tmp_path / "work" / "measurements.json").read_text() == measurements  # all reused
