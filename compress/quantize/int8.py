"""``quantize_onnx``: calibrate once, measure each node group's sensitivity, keep the sensitive groups float,
write the INT8 graph and check it on held-out frames."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.errors import ConfigError, ExportError
from compress.export._files import publish, save_onnx, staging_dir
from compress.export.onnx_export import (
    NOT_FFSC,
    _set_metadata,
    exported_by_ffsc,
    read_metadata,
    recorded_fp32_nodes,
    static_input_size,
)
from compress.export.trt_lint import lint_onnx
from compress.quantize.config import QuantizeConfig
from compress.quantize.frames import load_frames
from compress.quantize.qdq import (
    conv3d_nodes,
    epe_between,
    gt_epe,
    quantizable_groups,
    quantize_graph,
    run_frames,
)
from compress.quantize.report import GroupSensitivity, QuantizeReport, measure_int8_latency, write_report


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib: Any,
    cfg: QuantizeConfig | None = None,
    height: int | None = None,
    width: int | None = None,
    measure_latency: bool = True,
    progress: bool = False,
    heldout: Any = None,
) -> QuantizeReport:
    """Write an INT8 Q/DQ copy of the fp32 ONNX model src to dst, with sensitive groups kept float; report it.

    calib: a label cache folder (synthetic labels regenerate their frames), a stereo data folder, 'synthetic'
    or a Dataset. The first cfg.calib_frames pairs calibrate; the report's cfg.eval_frames held-out pairs are
    the next ones, or the first ones of ``heldout`` (same kinds of source) when given. height/width default to
    the model's static input size.
    """
    start = time.perf_counter()
    cfg = cfg or QuantizeConfig()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX file {src} does not exist; export the model first (`ffsc export`)")
    if dst.suffix != ".onnx":
        raise ConfigError(f"the INT8 output {dst} must end in .onnx")
    model = onnx.load(str(src))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ExportError(f"{src} is already quantized (it has QuantizeLinear/DequantizeLinear nodes); pass the "
                          "fp32 export")
    size = static_input_size(model)
    meta = read_metadata(model)
    if height is None or width is None:
        if size is None:
            origin = "" if exported_by_ffsc(meta) else f" and {NOT_FFSC}"
            raise ConfigError(f"{src} has a dynamic input size{origin}; pass the calibration image size (--height and "
                              "--width)")
        height, width = size
    elif size is not None and size != (height, width):
        raise ConfigError(f"{src} takes {size[0]}x{size[1]} images (height x width), but {height}x{width} was asked")
    iters = int(meta["iters"]) if meta.get("iters") else None
    islands = list(recorded_fp32_nodes(model)) + list(cfg.exclude)
    if cfg.target == "cpu":
        islands += conv3d_nodes(model)  # exact names: fnmatch treats them as literal patterns

    def say(msg: str) -> None:
        if progress:
            print(f"[ffsc quantize] {msg}", flush=True)

    if heldout is None:
        frames = load_frames(calib, cfg.calib_frames + cfg.eval_frames, height, width)
        calib_frames, held_out = frames[: cfg.calib_frames], frames[cfg.calib_frames:]
    else:
        calib_frames = load_frames(calib, cfg.calib_frames, height, width)
        # A different seed: 'synthetic' as held-out source must not repeat the calibration pairs.
        held_out = load_frames(heldout, cfg.eval_frames, height, width, seed=1) if cfg.eval_frames else []
    sens_frames = calib_frames[: cfg.sensitivity_frames]
    groups = quantizable_groups(model, cfg.op_types, cfg.group_depth, islands)
    if not groups:
        raise ExportError(f"{src} has no nodes of the op types {cfg.op_types} outside the float islands; nothing "
                          "to quantize")
    island_nodes = [n.name for n in model.graph.node
                    if n.op_type in cfg.op_types and n.name and any(fnmatchcase(n.name, p) for p in islands)]
    candidates = [n.name for nodes in groups.values() for n in nodes]
    with tempfile.TemporaryDirectory(prefix="ffsc-quantize-") as tmp:
        work = Path(tmp)
        cache = work / "calibration.json"
        say(f"fp32 reference on {len(sens_frames)} frames")
        ref_sens = run_frames(src, sens_frames, cfg.threads)
        say(f"calibrating on {len(calib_frames)} frames ({cfg.method})")
        trial = work / "trial.onnx"
        quantize_graph(src, trial, cfg, cache, calib_frames, candidates, island_nodes, progress=progress)
        whole_epe = epe_between(run_frames(trial, sens_frames, cfg.threads), ref_sens)

        table: list[GroupSensitivity] = []
        if cfg.sensitivity and len(groups) > 1:
            for i, (name, nodes) in enumerate(groups.items(), 1):
                quantize_graph(src, trial, cfg, cache, None, [n.name for n in nodes], island_nodes)
                score = epe_between(run_frames(trial, sens_frames, cfg.threads), ref_sens)
                table.append(GroupSensitivity(name, len(nodes), sorted({n.op_type for n in nodes}), score))
                say(f"sensitivity {i}/{len(groups)}: {name} ({len(nodes)} nodes) EPE {score:.4f} px")
        for g in table:
            if cfg.sensitivity and g.epe_px > cfg.group_threshold_px:
                g.kept_float, g.reason = True, f"> {cfg.group_threshold_px:g} px alone"

        def build(kept: set[str]) -> float:
            chosen = [n.name for name, nodes in groups.items() if name not in kept for n in nodes]
            excluded = island_nodes + [n.name for name, nodes in groups.items() if name in kept for n in nodes]
            if not chosen:
                raise ExportError("every node group is too sensitive to quantize within "
                                  f"{cfg.max_epe_px:g} px; raise max_epe_px or group_threshold_px")
            quantize_graph(src, trial, cfg, cache, None, chosen, excluded)
            return epe_between(run_frames(trial, sens_frames, cfg.threads), ref_sens)

        kept = {g.group for g in table if g.kept_float}
        # The sensitivity pass left a single-group trial in trial.onnx: rebuild the chosen graph.
        calib_epe = build(kept) if kept or cfg.sensitivity and len(groups) > 1 else whole_epe
        if cfg.sensitivity:
            # Release the most sensitive remaining groups to float until the whole graph meets the target.
            for g in sorted((g for g in table if not g.kept_float), key=lambda s: -s.epe_px):
                if calib_epe <= cfg.max_epe_px or len(kept) + 1 >= len(groups):
                    break
                kept.add(g.group)
                g.kept_float, g.reason = True, f"released to meet {cfg.max_epe_px:g} px"
                calib_epe = build(kept)
                say(f"kept {g.group} float: whole-graph EPE {calib_epe:.4f} px")

        proto = onnx.load(str(trial))
        _set_metadata(proto, {**meta, "quantization": json.dumps({
            "format": "QDQ", "target": cfg.target,
            "activations": "int8 symmetric" if cfg.target == "tensorrt" else "uint8 asymmetric",
            "weights": "int8 symmetric " + ("per-channel" if cfg.per_channel else "per-tensor"), "method": cfg.method,
            "kept_float_groups": sorted(kept)})})
        lint = [asdict(f) for f in lint_onnx(proto) if f.severity != "info"]
        with staging_dir(dst) as stage:
            staged = save_onnx(proto, stage / dst.name)
            publish(staged, dst)

        heldout: dict[str, Any] = {"frames": len(held_out)}
        if held_out:
            ref = run_frames(src, held_out, cfg.threads)
            got = run_frames(dst, held_out, cfg.threads)
            heldout.update(epe_vs_fp32=epe_between(got, ref),
                           max_abs_diff=float(max(np.max(np.abs(g - r)) for g, r in zip(got, ref, strict=True))),
                           fp32_epe_gt=gt_epe(ref, held_out), int8_epe_gt=gt_epe(got, held_out))
        latency = measure_int8_latency(src, dst, height, width, iters, cfg) if measure_latency else {}
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    kept_nodes = sum(len(groups[g]) for g in kept)
    check = heldout.get("epe_vs_fp32", calib_epe)
    return QuantizeReport(
        path=dst, source=src, height=height, width=width, iters=iters,
        calibration={"frames": len(calib_frames), "method": cfg.method, "per_channel": cfg.per_channel,
                     "op_types": list(cfg.op_types), "target": cfg.target, "sensitivity_frames": len(sens_frames),
                     "group_threshold_px": cfg.group_threshold_px, "whole_graph_epe_px": whole_epe},
        sensitivity=table, kept_float_groups=sorted(kept), excluded_nodes=kept_nodes + len(island_nodes),
        quantized_nodes=len(candidates) - kept_nodes, qdq_nodes=qdq,
        calib_epe_px=calib_epe, heldout=heldout, latency=latency, passed=bool(check <= cfg.max_epe_px),
        max_epe_px=cfg.max_epe_px, seconds=time.perf_counter() - start, lint=lint,
    )


def quantize_beside(onnx_path: str | os.PathLike, calib: Any, cfg: QuantizeConfig | None = None,
                    heldout: Any = None, progress: bool = False) -> QuantizeReport:
    """The pipeline's one call: ``<stem>_int8.onnx`` and ``<stem>_int8_report.{json,md}`` beside an fp32 export."""
    onnx_path = Path(onnx_path)
    out = onnx_path.with_name(f"{onnx_path.stem}_int8.onnx")
    report = quantize_onnx(onnx_path, out, calib, cfg, progress=progress, heldout=heldout)
    write_report(report, out.with_name(f"{onnx_path.stem}_int8_report.json"))
    return report
