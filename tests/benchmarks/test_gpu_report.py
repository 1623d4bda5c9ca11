"""benchmarks/gpu.py marks a row that did not run as its mode says, from real compile counters (checked on CPU)."""

from __future__ import annotations

import importlib.util

import torch
from torch._dynamo.utils import counters

from compress.latency import COMPILE_BACKEND_ENV, compile_counters
from tests.paths import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def test_a_graph_break_and_a_cudagraph_skip_mark_the_row(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    torch.compiler.reset()

    def breaks(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    before = compile_counters()
    torch.compile(breaks, backend="eager")(torch.ones(3))
    counters["inductor"]["cudagraph_skips"] += 1  # what Inductor counts when it cannot capture a graph
    delta = {k: v - before[k] for k, v in compile_counters().items()}
    assert delta["graphs"] >= 2 and delta["graph_breaks"] >= 1 and delta["cudagraph_skips"] == 1
    reasons = gpu.fallbacks(delta, compiled=True, graphed=True)
    assert any("graph break" in r for r in reasons) and any("CUDA graphs skipped 1" in r for r in reasons)
    assert gpu.fallbacks(delta, compiled=False, graphed=False) == []  # eager rows cannot fall back
    assert not any("CUDA graphs" in r for r in gpu.fallbacks(delta, compiled=True, graphed=False))
    row = {"model": "m", "mode": "compiled+graph", "precision": "fp16", "iters": 4, "median_ms": 1.0, "p10_ms": 1.0,
           "p90_ms": 1.0, "peak_mem_gib": 0.1, "fell_back": reasons}
    report = gpu.markdown({"environment": {"gpu": "test"}, "command": "x", "seconds": 1, "height": 64, "width": 128,
                           "rows": [row], "costs": {}})
    assert "compiled+graph (fell back: " in report


def test_a_clean_compile_is_not_marked(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    torch.compiler.reset()
    before = compile_counters()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    delta = {k: v - before[k] for k, v in compile_counters().items()}
    assert delta["graphs"] == 1 and gpu.fallbacks(delta, compiled=True, graphed=True) == []
