"""The run's final numbers: latencies timed side by side, latency settings in words, scores on real pairs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from compress.backends import get_backend
from compress.latency import LatencyCache, LatencyConfig, measure, measure_together, model_hash
from compress.real_pairs import RealPair, retention, score_model, score_sgbm
from search_spaces import load_student
from teacher import model_iters

from .context import say, teacher_iters
from .recipe import RunRecipe
from .records import RunSummary, StageRecord


def report_latencies(summary: RunSummary, recipe: RunRecipe, teacher_model: torch.nn.Module, device,
                     run_dir: Path) -> None:
    """Latency of the teacher, every front student and the final student for the final table.

    With measured latency, all are timed together in alternating rounds: search-time latencies were taken minutes
    apart on a machine whose load drifts (they stay in the front's CSV and in ``search_latency_ms``). The result
    is kept in ``report_latency.json`` and reused while the models and settings are the same. With predicted
    latency (or ``report_rounds: 0``) the teacher and the final student are measured once each, cached.
    """
    lat = recipe.search.latency
    together = lat.mode == "measured" and lat.report_rounds > 0
    models = {"teacher": teacher_model.to(device).eval()}
    iters = {"teacher": teacher_iters(recipe, teacher_model)}
    if together:
        for row in summary.front:
            if row.student_path and Path(row.student_path).is_dir():  # other workers' trials may live elsewhere
                models[f"trial {row.trial}"] = load_student(row.student_path, device=device)
    if summary.final:
        models["final"] = load_student(summary.final["path"], device=device)
    for name, model in models.items():
        if name not in iters:
            iters[name] = model_iters(model)  # the final table times each model at the count it is used with
    settings = {"backend": lat.backend, "height": lat.height, "width": lat.width, "precision": lat.precision,
                "warmup": lat.warmup, "repeats": lat.repeats, "threads": lat.threads,
                "device": str(lat.device or device), "iters": iters,
                **({"clock": lat.clock} if lat.clock != "wall" else {})}
    names = ", ".join(models)
    if together:
        key = hashlib.sha256(json.dumps({"models": {n: model_hash(m) for n, m in models.items()}, "settings": settings,
                                         "rounds": lat.report_rounds}, sort_keys=True).encode()).hexdigest()
        record = StageRecord(run_dir / "report_latency.json", key)
        saved = record.load()
        if saved is not None:
            medians = saved["median_ms"]
        else:
            say(recipe, f"latency: timing {names} side by side in {lat.report_rounds} alternating "
                        f"round{'' if lat.report_rounds == 1 else 's'} "
                        f"({describe_latency(latency_settings(lat, device), notes=False)})")
            stats = measure_together(models, lat.backend, lat.height, lat.width, iters=iters, rounds=lat.report_rounds,
                                     device=lat.device or device, progress=recipe.progress, **lat.timing())
            medians = {name: st.median_ms for name, st in stats.items()}
            record.save(settings=settings, median_ms=medians, stats={n: st.to_dict() for n, st in stats.items()})
    else:
        cache = LatencyCache(run_dir / "latency_cache.sqlite")
        say(recipe, f"latency: timing {names} ({describe_latency(latency_settings(lat, device), notes=False)}; "
                    "each reused from the run's latency cache when timed before)")
        medians = {name: measure(model, lat.backend, lat.height, lat.width, iters=iters[name],
                                 device=lat.device or device,
                                 cache=cache, **lat.timing()).median_ms
                   for name, model in models.items()}
    summary.latency = latency_settings(lat, device)
    timed_here = {"latency_backend": lat.backend, "latency_precision": lat.precision, "latency_mode": "measured"}
    summary.teacher.update(latency_ms=medians["teacher"], latency_iters=iters["teacher"], **timed_here)
    for row in summary.front:
        if (found := medians.get(f"trial {row.trial}")) is not None:
            row.search_latency_ms, row.latency_ms = row.latency_ms, found
            row.timed(iters[f"trial {row.trial}"], lat.backend, lat.precision, "measured")
        else:  # the search's number: measured or predicted at search.latency.iters, else the student's own count
            row.timed(lat.iters or row.iters, lat.backend, lat.precision, lat.mode)
    if summary.final:
        summary.final.update(latency_ms=medians["final"], latency_iters=iters["final"], **timed_here)


def latency_settings(lat: LatencyConfig, device: torch.device | str | None = None) -> dict[str, Any]:
    """What latencies are timed with: backend, device, precision, CPU threads (None on a GPU) and the rest."""
    dev = str(lat.device or device or "cpu")
    threads = None
    if dev.startswith("cpu"):  # threads matter on a CPU only
        threads = get_backend(lat.backend).threads(lat.threads)
    return {"backend": lat.backend, "device": dev, "precision": lat.precision, "threads": threads,
            "mode": lat.mode, "clock": lat.clock, "compile": lat.compile, "cuda_graph": lat.cuda_graph,
            "size": [lat.height, lat.width],
            "side_by_side": lat.mode == "measured" and lat.report_rounds > 0}


def describe_latency(settings: dict[str, Any], notes: bool = True) -> str:
    """One line of latency settings, e.g. 'onnxruntime on cpu, fp32, 2 threads' (``notes``: with caveats)."""
    parts = [f"{get_backend(settings['backend']).describe()} on {settings['device']}", settings["precision"]]
    cpu = settings["device"].startswith("cpu")
    if cpu:
        threads = settings["threads"]
        parts.append(f"{threads} thread{'' if threads == 1 else 's'}" if threads else "default threads")
    if notes and cpu and settings["precision"] != "fp32":  # said, not silently accepted
        parts.append(f"{settings['precision']} on a CPU runs as casts: not what a GPU's {settings['precision']} gives")
    parts += [name for key, name in (("compile", "compiled"), ("cuda_graph", "CUDA graphs")) if settings[key]]
    if settings["clock"] != "wall":
        parts.append(f"{settings['clock']} clock")
    if settings["mode"] == "predicted":
        parts.append("search rows predicted")
    return ", ".join(parts)


def score_real_pairs(summary: RunSummary, recipe: RunRecipe, teacher_model: torch.nn.Module, pairs: list[RealPair],
                     device) -> None:
    """EPE and BP-2 of the teacher, every front student, the final student and SGBM on the recipe's real pairs, and
    the final student's retention (its BP-2 over the teacher's). Reported only: nothing chooses by them."""
    if not pairs:
        return
    say(recipe, f"real pairs: scoring on {', '.join(p.name for p in pairs)} ({'x'.join(map(str, pairs[0].gt.shape))}"
                f"{' and more' if len(pairs) > 1 else ''}; reported, never used to train or choose)")
    rows: dict[str, Any] = {"teacher": score_model(teacher_model, pairs, iters=teacher_iters(recipe, teacher_model),
                                                   device=device)}
    if recipe.real_pairs.sgbm:
        sgbm = score_sgbm(pairs, threads=torch.get_num_threads(), say=lambda m: say(recipe, m))
        if sgbm:
            rows["sgbm"] = sgbm
    for row in summary.front:
        if row.student_path and Path(row.student_path).is_dir():
            student = load_student(row.student_path)
            scores = score_model(student, pairs, iters=student.cfg.iters, device=device)
            rows[f"trial {row.trial}"] = scores
            row.real_epe, row.real_bp2 = scores["mean"]["epe"], scores["mean"]["bp2"]
    teacher_bp2 = rows["teacher"]["mean"]["bp2"]
    summary.teacher["real_epe"], summary.teacher["real_bp2"] = rows["teacher"]["mean"]["epe"], teacher_bp2
    if summary.final:
        final_model = load_student(summary.final["path"])
        rows["final"] = score_model(final_model, pairs, iters=final_model.cfg.iters, device=device)
        final = rows["final"]["mean"]
        summary.final.update({"real_epe": final["epe"], "real_bp2": final["bp2"],
                              "real_retention": retention(final["bp2"], teacher_bp2)})
    summary.real_pairs = {"pairs": [p.name for p in pairs], "size": list(pairs[0].gt.shape), "scores": rows,
                          "metric": "dense EPE (px) and BP-2 (% of pixels off by > 2 px) on the visible ground truth"}
