"""What a quantization did and how the INT8 graph compares with fp32: the report, its latency and its files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.atomic import atomic_write_text
from compress.latency import measure_together
from compress.quantize.config import QuantizeConfig


@dataclass
class GroupSensitivity:
    """One node group's INT8 cost: the EPE vs fp32 when only this group is quantized."""

    group: str
    nodes: int
    op_types: list[str]
    epe_px: float
    kept_float: bool = False
    reason: str = ""


@dataclass
class QuantizeReport:
    """What quantize_onnx did and how the INT8 graph compares with fp32."""

    path: Path
    source: Path
    height: int
    width: int
    iters: int | None
    calibration: dict[str, Any]
    sensitivity: list[GroupSensitivity]
    kept_float_groups: list[str]
    excluded_nodes: int
    quantized_nodes: int
    qdq_nodes: int
    calib_epe_px: float
    heldout: dict[str, Any]
    latency: dict[str, Any]
    passed: bool
    max_epe_px: float
    seconds: float
    lint: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["path"], data["source"] = str(self.path), str(self.source)
        return data

    def markdown(self, title: str | None = None) -> str:
        """The report as Markdown: the accuracy verdict, latency side by side and the sensitivity table."""
        h = self.heldout
        act = "symmetric INT8" if self.calibration["target"] == "tensorrt" else "UINT8"
        lines = [f"# {title or f'INT8 quantization of {self.source.name}'}", "",
                 f"`{self.path.name}` (target {self.calibration['target']}): {self.quantized_nodes} nodes "
                 f"quantized (Q/DQ, {act} activations, INT8 "
                 f"{'per-channel' if self.calibration['per_channel'] else 'per-tensor'} weights), "
                 f"{self.excluded_nodes} candidate nodes kept in float; calibrated on "
                 f"{self.calibration['frames']} frames ({self.calibration['method']}) at {self.height}x{self.width}.",
                 ""]
        verdict = "PASS" if self.passed else "FAIL"
        lines += ["| | value |", "|---|---|",
                  f"| EPE INT8 vs fp32, held-out ({h.get('frames', 0)} pairs) | {_fmt(h.get('epe_vs_fp32'))} px "
                  f"(max {_fmt(h.get('max_abs_diff'))} px) |",
                  f"| EPE INT8 vs fp32, calibration frames | {_fmt(self.calib_epe_px)} px |",
                  f"| accuracy check (held-out EPE <= {self.max_epe_px:g} px) | {verdict} |"]
        if h.get("fp32_epe_gt") is not None:
            lines.append(f"| EPE vs ground truth: fp32 / INT8 | {_fmt(h['fp32_epe_gt'])} / "
                         f"{_fmt(h['int8_epe_gt'])} px |")
        lat = self.latency
        if lat:
            lines.append(f"| latency fp32 / INT8 (median ms, {lat['threads']} thread, {lat['clock']} clock, "
                         f"{lat['rounds']} alternating rounds) | {lat['fp32_ms']:.1f} / {lat['int8_ms']:.1f} "
                         f"({lat['speedup']:.2f}x) |")
        lines += ["", "Per-group sensitivity (EPE vs fp32 with only that group quantized, calibration frames):", "",
                  "| group | nodes | ops | EPE (px) | kept float |", "|---|---|---|---|---|"]
        for g in sorted(self.sensitivity, key=lambda s: -s.epe_px):
            lines.append(f"| {g.group} | {g.nodes} | {', '.join(g.op_types)} | {g.epe_px:.4f} | "
                         f"{g.reason if g.kept_float else ''} |")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"



def measure_int8_latency(fp32: Path, int8: Path, height: int, width: int, iters: int | None,
                         cfg: QuantizeConfig) -> dict[str, Any]:
    """fp32 and INT8 graphs timed side by side in alternating rounds in ONNX Runtime on the CPU."""
    clock = "thread" if cfg.threads == 1 else "wall"
    stats = measure_together({"fp32": fp32, "int8": int8}, "onnxruntime", height, width, iters=iters or 1,
                             rounds=cfg.latency_rounds, warmup=1, repeats=cfg.latency_repeats, device="cpu",
                             intra_op_threads=cfg.threads, clock=clock)
    fp, q = stats["fp32"].median_ms, stats["int8"].median_ms
    return {"fp32_ms": fp, "int8_ms": q, "speedup": fp / q, "threads": cfg.threads, "clock": clock,
            "rounds": cfg.latency_rounds, "repeats": cfg.latency_repeats,
            "fp32_round_medians_ms": stats["fp32"].round_medians_ms,
            "int8_round_medians_ms": stats["int8"].round_medians_ms, "device": stats["fp32"].device}


def write_report(report: QuantizeReport, json_path: str | os.PathLike, title: str | None = None) -> tuple[Path, Path]:
    """Write report as JSON and Markdown (same stem) atomically; returns both paths."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    atomic_write_text(md_path, report.markdown(title))
    return json_path, md_path
