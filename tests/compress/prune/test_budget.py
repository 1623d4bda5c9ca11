"""Channel selection (rounding, heads, correlation groups, ranking) and the prune-to-budget loop."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from compress.latency import measure
from compress.prune import load_prune_config, plan_removals, prune_to_budget
from compress.prune.coupling import ChannelGroup
from search_spaces import build_student, count_macs, preset
from search_spaces.serialization import load_model

FAST = [
    "model=preset:tiny", "latency.height=64", "latency.width=128", "data.num_samples=2", "data.eval_samples=1",
    "distill.steps_between=1", "distill.recovery_steps=2", "distill.train_iters=2", "teacher.iters=2",
    "importance.calibration_batches=1", "progress=false",
]


def _group(gid: int, size: int, unit: str = "channel", unit_size: int = 1, num_groups: int = 1) -> ChannelGroup:
    return ChannelGroup(id=gid, root=f"layer{gid}", size=size, part="refinement", members=[], unit=unit,
                        unit_size=unit_size, num_groups=num_groups)


def test_plan_rounds_to_multiples_and_removes_least_important():
    g = _group(0, 32)
    scores = {0: torch.arange(32.0).flip(0)}  # channel 31 matters least
    plan = plan_removals([g], scores, keep_fraction=0.6, round_to=8, global_ranking=False)
    assert plan[0] == list(range(16, 32))  # 19.2 kept rounds to 16: the 16 least important go
    assert plan_removals([g], scores, keep_fraction=0.9, round_to=8, global_ranking=False) == {}  # 28.8 -> 32
    # Never below 1 - max_ratio of the original width, never below one multiple.
    assert len(plan_removals([g], scores, 0.05, round_to=8, global_ranking=False, max_ratio=0.5)[0]) == 16
    odd = _group(1, 31)  # a width that is not a multiple (motion_dim - 1) shrinks to one
    assert 31 - len(plan_removals([odd], {1: torch.rand(31)}, 0.75, global_ranking=False)[1]) == 24


def test_plan_removes_whole_heads_and_equal_correlation_groups():
    heads = _group(0, 16, unit="head", unit_size=4)
    scores = torch.ones(16)
    scores[8:12] = 0.1  # head 2 is the least important on average
    plan = plan_removals([heads], {0: scores}, keep_fraction=0.75, round_to=8, global_ranking=False)
    assert plan[0] == [8, 9, 10, 11]
    corr = _group(1, 32, unit="correlation", num_groups=4)
    gen = torch.Generator().manual_seed(0)
    plan = plan_removals([corr], {1: torch.rand(32, generator=gen)}, keep_fraction=0.5, round_to=8,
                         global_ranking=False)
    counts = Counter(i // 8 for i in plan[1])
    assert len(plan[1]) == 16 and set(counts.values()) == {4} and len(counts) == 4


def test_global_ranking_prunes_where_importance_is_low():
    a, b = _group(0, 32), _group(1, 32)
    scores = {0: torch.full((32,), 0.1) + torch.arange(32) * 1e-3, 1: torch.full((32,), 2.0) + torch.arange(32) * 1e-3}
    plan = plan_removals([a, b], scores, keep_fraction=0.75, round_to=8, global_ranking=True)
    assert len(plan[0]) == 16 and 1 not in plan  # all 16 removals come from the unimportant group
    local = plan_removals([a, b], scores, keep_fraction=0.75, round_to=8, global_ranking=False)
    assert len(local[0]) == len(local[1]) == 8


def test_prune_to_macs_budget(tmp_path):
    torch.manual_seed(0)
    model = build_student(preset("tiny")).eval()
    before = count_macs(model, 64, 128)
    budget = 0.8 * before.gmacs
    cfg = load_prune_config(None, [*FAST, f"budget_gmacs={budget}", f"run_dir={tmp_path}",
                                   "importance.method=magnitude", "scope=[backbone,cost_filtering,refinement]",
                                   "step_ratio=0.15"])
    events = []
    result = prune_to_budget(cfg, model=model, callbacks=[lambda kind, step, m: events.append((kind, step, m))])
    assert result.met and result.final["gmacs"] <= budget < result.initial["gmacs"]
    # Steps move towards the budget, never more than step_ratio of the MACs at once (predicted, so allow 5%).
    macs = [result.initial["gmacs"]] + [s.gmacs for s in result.steps]
    assert all(b < a and b >= a * (1 - 0.15) * 0.95 for a, b in zip(macs, macs[1:], strict=False))
    saved = json.loads((tmp_path / "prune_result.json").read_text())
    assert saved["budget_kind"] == "gmacs" and saved["met"] is True and len(saved["steps"]) == len(result.steps)
    assert saved["measurement"] is None  # a MAC budget is not timed
    assert set(saved["evaluation"]) == {"unpruned", "before_recovery", "after_recovery"}
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert kinds[0] == "baseline" and kinds[-2:] == ["recovery", "end"] and "step" in kinds
    assert [e[0] for e in events] == kinds and "gmacs" in events[-1][2]
    reloaded = load_model(tmp_path / "model")
    left = 255 * torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        assert torch.equal(reloaded(left, left, iters=2, test_mode=True),
                           result.model(left, left, iters=2, test_mode=True))


@pytest.mark.slow
def test_prune_to_onnxruntime_latency_budget(tmp_path):
    torch.manual_seed(0)
    # A wider refinement than "tiny": at 64x128 the tiny student's ONNX Runtime time is mostly fixed
    # per-operator cost, which channel pruning cannot remove.
    model = build_student(preset("tiny", hidden_dim=96, motion_dim=96, motion_corr_dim=96)).eval()
    timing = ["latency.backend=onnxruntime", "latency.iters=4", "latency.warmup=2", "latency.repeats=7",
              "latency.threads=1"]
    base = measure(model, "onnxruntime", 64, 128, iters=4, warmup=2, repeats=7, intra_op_threads=1)
    budget = 0.7 * base.median_ms  # generous enough to be stable on a noisy machine
    cfg = load_prune_config(None, [*FAST, *timing, f"budget_ms={budget}", f"run_dir={tmp_path}",
                                   "importance.method=magnitude", "scope=[refinement]", "step_ratio=0.4"])
    result = prune_to_budget(cfg, model=model)
    assert result.met and result.final["latency"]["median_ms"] <= budget
    saved = json.loads((tmp_path / "prune_result.json").read_text())["measurement"]
    assert saved["backend"] == "onnxruntime" and saved["precision"] == "fp32" and saved["iters"] == 4
    assert saved["shapes"]["left"] == [1, 3, 64, 128] and saved["repeats"] == 7 and "p90_ms" in saved


def test_data_path_given_by_an_override_is_read_as_a_folder(tmp_path) -> None:
    """kind 'auto' without a path means synthetic pairs; a path given later must still be read as a folder."""
    from compress.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from compress.prune.samples import build_samples

    write_synthetic_dataset(tmp_path / "d", 2, SyntheticConfig(height=70, width=140, max_disp=16), progress=False)
    samples = build_samples(load_prune_config(None, [f"data.path={tmp_path / 'd'}"]))
    assert len(samples) == 2 and tuple(samples[0]["left"].shape[-2:]) == (64, 128)
    assert len(build_samples(load_prune_config(None, []))) == 8  # no path: 8 generated pairs


def test_pruning_the_teacher_itself_scores_it_at_the_targets_iterations(tmp_path):
    torch.manual_seed(0)
    teacher = build_student(preset("tiny")).eval()  # deployed at 4 iterations; the targets use 2 (FAST)
    model = build_student(preset("tiny")).eval()
    model.load_state_dict(teacher.state_dict())
    cfg = load_prune_config(None, [*FAST, "budget_gmacs=1000", f"run_dir={tmp_path}", "importance.method=magnitude"])
    result = prune_to_budget(cfg, model=model, teacher=teacher)  # a budget already met: no step, only the scores
    assert result.evaluation["unpruned"]["teacher/epe"] == pytest.approx(0.0, abs=1e-4)
