"""The one training setup (OptimConfig, the optimiser and schedule built from it, fit) and the one device picker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.device import pick_device
from compress.errors import ConfigError
from compress.training import OptimConfig, build_optimizer, build_scheduler, fit


def _regression(n: int = 32) -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    torch.manual_seed(0)
    return nn.Linear(3, 1), [(x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4)]


def _mse(model: nn.Module):
    def loss_fn(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"mse": loss.detach()}

    return loss_fn


def test_fit_learns_and_stops_at_the_last_step_without_drawing_another_batch() -> None:
    model, data = _regression()
    drawn: list[int] = []

    def batches():
        for epoch in range(100):
            for i, b in enumerate(data):
                drawn.append(epoch * len(data) + i)
                yield b

    seen: list[tuple[int, float]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    reached = fit(model.parameters(), _mse(model), batches(), opt, sched, steps=60, start=10,
                  on_step=lambda step, total, parts: seen.append((step, float(parts["mse"]))))
    assert reached == 60 and [s for s, _ in seen] == list(range(11, 61))
    assert len(drawn) == 50  # one batch per step, none past the last
    assert seen[-1][1] < 0.01 * seen[0][1]
    assert all(p.grad is None for p in model.parameters())


def test_fit_stops_when_the_batches_run_out_and_clips_gradients() -> None:
    model, data = _regression()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def huge(batch):
        return ((1e3 * model(batch[0]) - batch[1]) ** 2).mean(), {}

    assert fit(model.parameters(), huge, data[:1], opt, sched, steps=5, grad_clip=0.5) == 1
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert moved.norm() == pytest.approx(0.5, rel=1e-5)  # SGD with lr 1 moves by exactly the clipped gradient


def test_the_optimiser_and_schedule_follow_the_optim_config() -> None:
    model, _ = _regression()
    cfg = OptimConfig(lr=0.1, weight_decay=0.01, warmup_steps=2, min_lr_ratio=0.1)
    opt = build_optimizer(model.parameters(), cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # the bias is not decayed
    sched = build_scheduler(opt, cfg, steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.05, 0.1]) and lrs[-1] > 0.01 and lrs == sorted(lrs[:2]) + sorted(lrs[2:])[::-1]
    one = OptimConfig(lr=0.1, schedule="one_cycle", decay_all=True)
    opt = build_optimizer(model.parameters(), one)
    assert len(opt.param_groups) == 1
    assert isinstance(build_scheduler(opt, one, steps=10), torch.optim.lr_scheduler.OneCycleLR)
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimConfig(schedule="linear")


def test_pick_device_checks_what_it_is_given() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        pick_device("gpu0")
    if torch.cuda.is_available():
        assert pick_device(None).type == "cuda" and pick_device("cuda").index is not None
    else:
        assert pick_device(None) == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda:1")


def _gpus(monkeypatch, count: int, current: int = 0) -> None:
    """A machine showing this process ``count`` GPUs (only the counts: nothing here touches a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_local_rank_picks_the_process_gpu_or_the_only_one_it_sees(monkeypatch) -> None:
    _gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert pick_device(None) == torch.device("cuda", 2) == pick_device("cuda")
    _gpus(monkeypatch, 1)  # the launcher exposed one GPU per process: cuda:2 does not exist here
    assert pick_device(None) == torch.device("cuda", 0)
    _gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=2 but this process sees 2 GPU\(s\)"):
        pick_device(None)
    with pytest.raises(ConfigError, match=r"'cuda:3': this process sees 2 GPU\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:3")


def test_same_device_tells_gpus_apart(monkeypatch) -> None:
    from compress.device import same_device

    _gpus(monkeypatch, 2, current=1)
    cuda = torch.device
    assert same_device(cuda("cuda"), cuda("cuda", 1)) and not same_device(cuda("cuda"), cuda("cuda", 0))
    assert not same_device(cuda("cuda", 0), cuda("cuda", 1)) and same_device(cuda("cpu"), cuda("cpu"))
    assert not same_device(cuda("cpu"), cuda("cuda", 0))


def test_on_device_moves_a_model_between_gpus_by_index(monkeypatch) -> None:
    from compress import latency

    _gpus(monkeypatch, 2)
    model = torch.nn.Linear(2, 2)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device: moved.append(device) or self)
    assert latency.on_device(model, torch.device("cpu")) is model and not moved
    monkeypatch.setattr(latency, "same_device", lambda a, b: str(b) == "cuda:0")  # the model lives on cuda:0
    assert latency.on_device(model, torch.device("cuda", 0)) is model
    latency.on_device(model, torch.device("cuda", 1))
    assert moved == [torch.device("cuda", 1)]
