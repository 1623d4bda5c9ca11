"""Replay a model's forward from a captured CUDA graph: one launch instead of thousands on launch-bound GPUs.

Our models are capture-safe (no host tensors, ``.item()`` or data-dependent branches in ``forward``; the
tests prove it), so a whole stereo forward, every refinement iteration included, can be captured once per
input shape and replayed. On CPU, or with ``enabled=False``, calls run eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from compress.errors import ConfigError


def capture(fn: Callable[..., Any], *static_inputs: torch.Tensor, warmup: int = 3) -> Callable[[], Any]:
    """Capture ``fn(*static_inputs)`` in a CUDA graph; the returned callable replays it and returns the
    captured outputs (overwritten by the next replay: copy what must outlive it)."""
    device = static_inputs[0].device
    if device.type != "cuda":
        raise ConfigError(f"CUDA graph capture needs CUDA tensors, got device '{device}'")
    # Warm up on a side stream, as torch.cuda.graph requires (lazy init, cuDNN autotuning stay out of the graph).
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_inputs)

    def replay() -> Any:
        graph.replay()
        return static_out  # holding it keeps the graph's output memory alive as long as the replayer

    return replay


class GraphedForward:
    """``fn(left, right)`` replayed from one CUDA graph per input shape (eager on CPU or when disabled)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], enabled: bool = True,
                 max_graphs: int = 4) -> None:
        self.fn = fn
        self.enabled = enabled
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, Callable[[], Any]]] = {}

    def __call__(self, left: torch.Tensor, right: torch.Tensor) -> Any:
        """Outputs for this pair; with a graph they live in static memory until the next call."""
        if not self.enabled or left.device.type != "cuda":
            return self.fn(left, right)
        key = (tuple(left.shape), tuple(right.shape), left.dtype, left.device)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:  # e.g. a last, smaller batch: not worth another graph
                return self.fn(left, right)
            static_left, static_right = left.clone(), right.clone()
            try:
                replay = capture(self.fn, static_left, static_right)
            except RuntimeError as err:  # a model that is not capture-safe still runs, only slower
                warnings.warn(f"CUDA graph capture failed, running eagerly: {err}", stacklevel=2)
                self.enabled = False
                return self.fn(left, right)
            self._graphs[key] = (static_left, static_right, replay)
        static_left, static_right, replay = self._graphs[key]
        static_left.copy_(left)
        static_right.copy_(right)
        return replay()
