"""Per-block latency tables: the block decomposition, variant keys, the JSON table and the predictor's report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compress.errors import ConfigError
from compress.latency_predictor import (
    BLOCKS,
    OVERHEAD,
    LatencyTable,
    UpsamplerBlock,
    block_variants,
    evaluate_predictor,
    run_blocks,
    sample_configs,
    space_block_variants,
    student_blocks,
    time_module,
)
from search_spaces import build_student, load_space, preset

H, W = 64, 128


@pytest.mark.parametrize("overrides", [
    {},
    dict(volume_scale=8, hourglass_levels=2, gru_levels=2, concat_dim=0, transformer_layers=0),
])
def test_blocks_compose_to_the_student_forward(overrides: dict) -> None:
    torch.manual_seed(0)
    student = build_student(preset("tiny", **overrides)).eval()
    left, right = torch.rand(1, 3, H, W) * 255, torch.rand(1, 3, H, W) * 255
    with torch.no_grad():
        expected = student(left, right, iters=3, test_mode=True)
    got, inputs = run_blocks(student_blocks(student), left, right, iters=3)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the same stage methods, in the same order
    assert set(inputs) == set(BLOCKS)


def test_variants_depend_only_on_their_fields() -> None:
    base = {v.block: v for v in block_variants(preset("tiny"), H, W)}
    wider_gru = {v.block: v for v in block_variants(preset("tiny", hidden_dim=16), H, W)}
    changed = {b for b in BLOCKS if base[b] != wider_gru[b]}
    assert changed == {"context", "gru_iteration"}
    assert block_variants(preset("tiny", iters=2), H, W) == list(base.values())
    other_size = block_variants(preset("tiny"), H, 2 * W)
    assert all(a.identity() != b.identity() for a, b in zip(base.values(), other_size, strict=True))


def test_a_smaller_classifier_kernel_is_its_own_variant_and_the_default_keeps_old_keys() -> None:
    base = {v.block: v for v in block_variants(preset("tiny"), H, W)}
    small = {v.block: v for v in block_variants(preset("tiny", classifier_kernel=3), H, W)}
    assert {b for b in BLOCKS if base[b] != small[b]} == {"classifier"}
    assert "classifier_kernel" not in base["classifier"].fields  # tables measured before the field still match
    assert small["classifier"].fields["classifier_kernel"] == 3


def test_space_enumeration_covers_sampled_students() -> None:
    space = load_space("tiny")
    variants = space_block_variants(space, H, W)
    assert {v.block for v, _ in variants.values()} == set(BLOCKS)
    for cfg in sample_configs(space, 8, seed=3):
        for variant in block_variants(cfg, H, W):
            assert variant.identity() in variants, variant


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> LatencyTable:
    path = tmp_path_factory.mktemp("table") / "table.json"
    table = LatencyTable(path, backend="torch", warmup=1, repeats=3)
    assert table.measure_config(preset("tiny"), H, W) == len(BLOCKS)
    table.save()
    return table


def test_table_round_trips_through_json(table: LatencyTable) -> None:
    data = json.loads(table.path.read_text())
    assert data["format"] == "ffsc-latency-table/1" and data["machine"]["cores"] >= 1
    assert {e["block"] for e in data["entries"].values()} == {*BLOCKS, OVERHEAD}
    again = LatencyTable(table.path, backend="torch", warmup=1, repeats=3)
    assert again.entries == table.entries and len(again) == len(BLOCKS) + 1
    assert again.predict(preset("tiny"), H, W) == table.predict(preset("tiny"), H, W)
    assert again.measure_config(preset("tiny"), H, W) == 0, "stored variants are not measured again"
    # Another backend or size is another key: nothing to reuse.
    other = LatencyTable(table.path, backend="onnxruntime")
    assert len(other) == 0 and len(other.missing(preset("tiny"), H, W)) == len(BLOCKS)
    assert len(table.missing(preset("tiny"), H, 2 * W)) == len(BLOCKS)


def test_prediction_grows_with_iterations(table: LatencyTable) -> None:
    cfg = preset("tiny")
    p2, p4, p8 = (table.predict(cfg, H, W, iters=i) for i in (2, 4, 8))
    assert 0 < p2 < p4 < p8
    parts = table.breakdown(cfg, H, W, iters=1)
    per_iteration = parts["gru_iteration"] - table.overhead_ms()
    assert math.isclose(p4 - p2, 2 * per_iteration, rel_tol=1e-9)
    assert math.isclose(sum(table.breakdown(cfg, H, W).values()), table.predict(cfg, H, W), rel_tol=1e-12)


def test_missing_blocks_raise_with_the_fix(table: LatencyTable) -> None:
    with pytest.raises(ConfigError, match="measure_config"):
        table.predict(preset("tiny", hidden_dim=16), H, W)


def test_predictor_evaluation_reports_finite_errors(tmp_path: Path) -> None:
    space = load_space("tiny")
    table = LatencyTable(tmp_path / "table.json", backend="torch", warmup=0, repeats=2)
    configs = sample_configs(space, 2, seed=1)
    report = evaluate_predictor(space, 2, 32, 64, table, warmup=0, repeats=2, progress=False, configs=configs,
                                remeasure=True)
    assert len(report.rows) == 2
    for row in report.rows:
        assert row.predicted_ms > 0 and row.measured_ms > 0 and math.isfinite(row.relative_error)
        assert row.remeasured_ms is not None and row.remeasured_ms > 0
        assert row.measured_p10_ms <= row.measured_ms <= row.measured_p90_ms
    summary = report.to_dict()
    assert math.isfinite(summary["median_abs_relative_error"]) and summary["n"] == 2
    assert summary["max_abs_relative_error"] >= summary["median_abs_relative_error"]
    assert math.isfinite(summary["median_abs_remeasure_error"])
    # The blocks it measured on the way were saved.
    assert len(LatencyTable(table.path, backend="torch")) >= len(BLOCKS) + 1


def test_onnxruntime_block_timing() -> None:
    torch.manual_seed(0)
    student = build_student(preset("tiny")).eval()
    _, inputs = run_blocks(student_blocks(student), torch.rand(1, 3, H, W) * 255, torch.rand(1, 3, H, W) * 255, 1)
    timing = time_module(UpsamplerBlock(student), inputs["upsampler"], "onnxruntime", threads=1, warmup=1,
                         repeats=3)
    assert timing.repeats == 3 and 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms


def test_thread_clock_tables_are_separate(table: LatencyTable) -> None:
    threaded = LatencyTable(table.path, backend="onnxruntime", threads=1, clock="thread")
    wall = LatencyTable(table.path, backend="onnxruntime", threads=1)
    variant = block_variants(preset("tiny"), H, W)[0]
    assert threaded.key(variant) != wall.key(variant)
    with pytest.raises(ConfigError, match="single-threaded"):
        LatencyTable(backend="onnxruntime", threads=2, clock="thread")


def test_invalid_tables_and_configs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not an ffsc latency table"):
        LatencyTable(bad)
    with pytest.raises(ConfigError, match="backend"):
        LatencyTable(backend="tvm")
    pruned = preset("tiny").replace(layer_shapes={"cnet.net.0": {"attrs": {"out_channels": 24}}})
    with pytest.raises(ConfigError, match="pruned"):
        block_variants(pruned, H, W)


def test_table_from_latency_config_is_cached_across_runs(tmp_path: Path, monkeypatch) -> None:
    """The search's table lives in the user's cache and grows on demand: a second run measures nothing."""
    from compress.latency import LatencyConfig
    from compress.latency_predictor import default_table_path, open_table, predict_latency

    monkeypatch.setenv("FFSC_CACHE_DIR", str(tmp_path / "cache"))
    lat = LatencyConfig(mode="predicted", backend="torch", device="cpu", warmup=0, repeats=2)
    assert default_table_path() == tmp_path / "cache" / "latency_table.json"
    cfg = preset("tiny")
    first = open_table(lat)
    ms = predict_latency(first, cfg, H, W, iters=2)
    assert ms > 0 and default_table_path().is_file()
    again = open_table(lat)  # a new run: reads the file
    assert len(again) == len(first) and again.missing(cfg, H, W) == []
    assert again.predict(cfg, H, W, iters=2) == pytest.approx(ms)
    other_size = open_table(lat)
    assert other_size.missing(cfg, 2 * H, W)  # keyed by image size: another size is measured anew
    with pytest.raises(ConfigError, match="resolve latency.backend 'auto'"):
        open_table(LatencyConfig(mode="predicted", backend="auto"))


def test_check_predictor_samples_the_space(tmp_path: Path) -> None:
    from compress.latency import LatencyConfig
    from compress.latency_predictor import check_predictor

    lat = LatencyConfig(mode="predicted", backend="torch", device="cpu", warmup=0, repeats=2, check_students=2)
    table = LatencyTable(tmp_path / "t.json", backend="torch", warmup=0, repeats=2)
    result = check_predictor(table, load_space("tiny"), lat, H, W, progress=False)
    assert len(result.rows) == 2 and math.isfinite(result.median_abs_relative_error)
    assert check_predictor(table, load_space("tiny"), LatencyConfig(check_students=0), H, W) is None


def test_calibration_scale_is_the_median_ratio() -> None:
    from compress.latency_predictor import calibration_scale

    assert calibration_scale([(10.0, 8.0), (20.0, 14.0), (5.0, 5.0)]) == pytest.approx(0.8)
    assert calibration_scale([]) == 1.0



def test_tables_sharing_a_file_keep_each_others_entries(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    first, second = (LatencyTable(path, backend="torch", warmup=0, repeats=1) for _ in range(2))
    first.measure_overhead(batch=1)
    first.save()
    second.measure_overhead(batch=2)  # opened before the first saved: it does not hold batch 1
    second.save()
    merged = LatencyTable(path, backend="torch")
    assert merged.overhead_ms(1) > 0 and merged.overhead_ms(2) > 0
