"""CUDA-graph replay of stereo forwards: eager on CPU, captured and equal to eager on CUDA."""

from __future__ import annotations

import pytest
import torch

from compress.cuda_graph import GraphedForward, capture
from compress.errors import ConfigError
from search_spaces import build_student, preset

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")


def _student(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(preset("tiny")).to(device).eval()


def _forward(model: torch.nn.Module):
    def fn(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(left, right, iters=2, test_mode=True)
    return fn


def test_cpu_runs_eagerly() -> None:
    model = _student("cpu")
    left, right = torch.rand(2, 1, 3, 64, 128).mul(255).unbind(0)
    graphed = GraphedForward(_forward(model))
    assert torch.equal(graphed(left, right), _forward(model)(left, right))
    assert graphed._graphs == {}


def test_capture_refuses_cpu_tensors() -> None:
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        capture(lambda x: x * 2, torch.ones(2))


@needs_cuda
@pytest.mark.cuda
def test_replay_matches_eager_and_follows_new_inputs() -> None:
    model = _student("cuda")
    fn = _forward(model)
    graphed = GraphedForward(fn)
    for seed in (0, 1):  # the second pair checks that replay reads the new inputs, not the captured ones
        gen = torch.Generator().manual_seed(seed)
        left, right = (torch.rand(2, 1, 3, 64, 128, generator=gen) * 255).cuda().unbind(0)
        out = graphed(left, right).clone()
        torch.testing.assert_close(out, fn(left, right), atol=1e-4, rtol=1e-4)
    assert len(graphed._graphs) == 1
