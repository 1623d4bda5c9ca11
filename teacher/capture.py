"""Replaying a model's forward from a CUDA graph: what a capture-safe forward (teacher.stages) makes possible."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CudaGraphForward:
    """Test-mode forward of a FoundationStereo-family model, captured once per input shape and replayed.

    On a GPU these models are launch-bound (thousands of small kernels per forward), so replaying a captured
    graph saves most of the launch cost; labelling, which runs one model on many pairs of one size, gains
    most. Off CUDA it calls the model. Each call returns a copy of the disparity, safe to keep.
    """

    def __init__(self, model: nn.Module, iters: int, warmup: int = 2) -> None:
        self.model, self.iters, self.warmup = model, iters, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}

    @torch.inference_mode()
    def __call__(self, left: Tensor, right: Tensor) -> Tensor:
        """Disparity B x 1 x H x W of RGB 0..255 pairs whose H and W are multiples of 32."""
        if left.device.type != "cuda":
            return self.model(left, right, iters=self.iters, test_mode=True)
        key = (tuple(left.shape), left.dtype, left.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(left, right)
        graph, static_left, static_right, out = self._graphs[key]
        static_left.copy_(left)
        static_right.copy_(right)
        graph.replay()
        return out.clone()

    def _capture(self, left: Tensor, right: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]:
        static_left, static_right = left.clone(), right.clone()
        current = torch.cuda.current_stream(left.device)
        side = torch.cuda.Stream(left.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture stream: cuDNN and the allocator settle first
            for _ in range(self.warmup):
                self.model(static_left, static_right, iters=self.iters, test_mode=True)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(static_left, static_right, iters=self.iters, test_mode=True)
        return graph, static_left, static_right, out
