"""Every model the project builds can be captured whole: one graph, no host tensors, no values read back.

The official FoundationStereo and Fast-FoundationStereo forwards copy host tensors to the device mid-forward,
so they cannot be captured in a CUDA graph. Ours must be, and these tests prove it on the CPU:

- torch.compile(fullgraph=True) traces the forward into one graph (a graph break, from ``.item()``,
  ``.tolist()`` or a Python branch on a tensor's value, is an error) and the compiled model gives the
  eager model's outputs;
- run on the meta device under a watch of every torch call, the forward touches no host (CPU) tensor, makes
  no tensor from Python data (``torch.tensor``, ``torch.as_tensor``) and reads no value back.

Where CUDA is present, the same models are captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from compress.cuda_graph import GraphedForward
from compress.importers import import_fast_foundationstereo
from compress.prune import prune_once
from search_spaces import PRESETS, build_student, load_space, load_student, preset
from teacher import FoundationStereo, TeacherConfig
from tests.paths import DATA as TEST_DATA

H, W, ITERS = 64, 128, 2
SPACES = ("tiny", "fast_foundationstereo")
SAMPLES_PER_SPACE = 2
TINY_TEACHER = dict(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False)


def _teacher() -> torch.nn.Module:
    return FoundationStereo(TeacherConfig(**TINY_TEACHER))


def _space_sample(space: str, index: int):
    def build() -> torch.nn.Module:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=11))
        configs = [load_space(space).sample(study.ask()) for _ in range(index + 1)]
        return build_student(configs[index])

    return build


def _pruned_student() -> torch.nn.Module:
    model = build_student(preset("tiny")).eval()
    prune_once(model, 0.5, ["backbone", "cost_filtering", "refinement"], importance="magnitude", round_to=8)
    return model


def _pruned_teacher() -> torch.nn.Module:
    model = _teacher().eval()
    prune_once(model, 0.5, ["refinement"], importance="magnitude", round_to=8)
    return model


FFS_DATA = TEST_DATA / "ffs"


def _imported(case: str):
    """A student imported from a Fast-FoundationStereo release-format pickle made with the official code."""

    def build() -> torch.nn.Module:
        with tempfile.TemporaryDirectory() as tmp:
            import_fast_foundationstereo(FFS_DATA / case / "model_best_bp2_serialize.pth", Path(tmp) / "student")
            return load_student(Path(tmp) / "student")

    return build


MODELS = {
    "teacher": _teacher,
    **{f"preset:{name}": (lambda name=name: build_student(preset(name))) for name in PRESETS},
    **{f"{space}:{i}": _space_sample(space, i) for space in SPACES for i in range(SAMPLES_PER_SPACE)},
    "pruned_student": _pruned_student,
    "pruned_teacher": _pruned_teacher,
    **{f"imported:{case}": _imported(case) for case in ("released_like", "searched_variant")},
}


@functools.cache
def _build(name: str) -> torch.nn.Module:
    """The named model in eval mode (built once; tests copy it before changing it)."""
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _pair(device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    left = 255 * torch.rand(1, 3, H, W, generator=g)
    return left.to(device), torch.roll(left, -3, dims=-1).to(device)


# ----------------------------------------------------------------------------------------- CPU: one graph


def _one_graph_backend(graphs: list):
    """The ``eager`` backend (run the captured graph as it is), keeping each graph for inspection."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


READBACK = {"item", "tolist", "cpu", "numpy"}
# Tracing costs 15-60 s a model on one core: the fast suite traces one model of each kind.
FAST_COMPILE = ("teacher", "preset:small_eighth", "tiny:0", "pruned_student", "imported:searched_variant")


@pytest.mark.parametrize(
    "name", [n if n in FAST_COMPILE else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)
def test_compiles_to_one_graph_equal_to_eager(name):
    model = _build(name)
    left, right = _pair()
    with torch.no_grad():
        expected = model(left, right, iters=ITERS, test_mode=True)
        torch._dynamo.reset()  # a fresh cache: no recompile limit reached by earlier models
        graphs: list[torch.fx.GraphModule] = []
        compiled = torch.compile(model, backend=_one_graph_backend(graphs), fullgraph=True)
        got = compiled(left, right, iters=ITERS, test_mode=True)
    assert len(graphs) == 1, f"{name}: {len(graphs)} graphs"
    calls = {str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_method", "call_function")}
    assert not calls & READBACK, f"{name} reads values back: {calls & READBACK}"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_graph_breaks_are_counted_as_zero():
    explanation = torch._dynamo.explain(_build("preset:tiny"))(*_pair(), iters=ITERS, test_mode=True)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


# ------------------------------------------------------------------------------ CPU: no host tensors (meta)


class _HostTraffic(TorchFunctionMode):
    """Records torch calls that would move data between host and device on a GPU."""

    FROM_PYTHON = {"tensor", "as_tensor", "from_numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.FROM_PYTHON | READBACK:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


class _HostTensors(TorchDispatchMode):
    """Records every operator that reads or makes a tensor on the host (the model and inputs are on meta)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in tensors):
            self.found.append(str(func))
        return out


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_touches_no_host_tensor(name):
    model = copy.deepcopy(_build(name)).to("meta")
    image = torch.empty(1, 3, H, W, device="meta")
    with torch.no_grad(), _HostTraffic() as calls, _HostTensors() as ops:
        disp = model(image, image, iters=ITERS, test_mode=True)
        out = model(image, image, iters=ITERS, return_intermediates=True)
    assert disp.shape == out.disp.shape == (1, 1, H, W)
    assert calls.found == [], f"{name} makes or reads host data: {sorted(set(calls.found))}"
    assert ops.found == [], f"{name} runs operators on host tensors: {sorted(set(ops.found))}"


def test_the_watch_sees_host_tensors():
    """The checks above can fail: a forward that builds a tensor on the host is caught."""

    class Leaky(torch.nn.Module):
        def forward(self, x):
            return x + torch.zeros(x.shape[-1]).to(x.device)

    class FromPython(torch.nn.Module):
        def forward(self, x):
            return x * torch.tensor([2.0], device=x.device)

    x = torch.empty(1, 3, device="meta")
    with _HostTraffic() as calls, _HostTensors() as ops:
        Leaky()(x)
        FromPython()(x)
    assert calls.found == ["tensor"] and "aten.zeros.default" in ops.found


# ------------------------------------------------------------------------------------- CUDA: graph replay

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
CUDA_MODELS = ["teacher", "preset:tiny", "preset:fast_foundationstereo", "pruned_student"]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", CUDA_MODELS)
def test_cuda_graph_capture_and_replay(name):
    model = copy.deepcopy(_build(name)).cuda()

    def forward(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(left, right, iters=ITERS, test_mode=True)

    graphed = GraphedForward(forward)
    for seed in (0, 1, 2):  # captured on the first pair, replayed on new inputs copied into its buffers
        left, right = _pair("cuda", seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # GraphedForward falls back to eager with a warning: that is a failure
            got = graphed(left, right).clone()
        torch.testing.assert_close(got, forward(left, right), rtol=1e-3, atol=1e-3)
    assert len(graphed._graphs) == 1


@pytest.mark.cuda
@needs_cuda
def test_reduce_overhead_compile_uses_cuda_graphs():
    from torch._dynamo.utils import counters

    model = copy.deepcopy(_build("preset:tiny")).cuda()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in range(3):  # cudagraph trees record on the second call and replay after
            left, right = _pair("cuda", seed=seed)
            got = compiled(left, right, iters=ITERS, test_mode=True).clone()
            expected = model(left, right, iters=ITERS, test_mode=True)
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
