"""The precision asked for is the one the layers compute in: latency measurement, distillation and ONNX export.

A model whose config says ``mixed_precision`` autocasts its stages to fp16 on CUDA when nobody chose a precision;
that default must never override a caller's choice. CPU runs this suite, so the fixture ``model_default_on_cpu``
gives the model the same fp16 default on CPU (CPU autocast runs fp16 too): every check below would see fp16
if the model's own autocast won. Forward hooks on every convolution record the dtype it computed in (its output
dtype under autocast), and the tests assert those observed dtypes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import teacher.stages as stages
from compress.deploy.export import export_model
from compress.distill.config import load_recipe
from compress.distill.trainer import Trainer
from compress.export import to_onnx
from compress.latency import measure
from compress.latency_predictor import run_blocks, student_blocks, time_module
from compress.models import ResolvedModel
from search_spaces import build_student, preset
from teacher.stages import precision_ctx, use_precision

H, W = 64, 128
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConvSpy:
    """Records, per convolution call, the dtype it computed in and whether an ONNX export was tracing it."""

    def __init__(self, *models: nn.Module) -> None:
        self.calls: list[tuple[str, torch.dtype, bool]] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for model in models
                        for name, m in model.named_modules() if isinstance(m, CONVS)]
        assert self.handles, "no convolution to spy on"

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.calls.append((name, out.dtype, torch.onnx.is_in_onnx_export()))

        return hook

    def dtypes(self, exporting: bool | None = None) -> set[torch.dtype]:
        """Dtypes seen (only those seen while an ONNX export was, or was not, tracing when ``exporting`` is set)."""
        assert self.calls, "no convolution ran"
        return {dtype for _, dtype, export in self.calls if exporting is None or export == exporting}

    def clear(self) -> None:
        self.calls.clear()


@pytest.fixture
def model_default_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The official default (mixed_precision -> fp16 autocast, CUDA only) applied on CPU as well."""
    monkeypatch.setitem(stages.DEFAULT_AUTOCAST, "cpu", torch.float16)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_student(preset("tiny", mixed_precision=True), pretrained=False).eval()


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    left = 255 * torch.rand(1, 3, H, W, generator=g)
    return left, torch.roll(left, -3, dims=-1)


def test_without_a_choice_the_model_default_applies_and_a_caller_autocast_wins(model_default_on_cpu) -> None:
    # The control for every test below: the simulated default really does turn the convolutions fp16.
    model = _tiny()
    spy = ConvSpy(model)
    with torch.no_grad():
        model(*_pair(), iters=1, test_mode=True)
    assert spy.dtypes() == {torch.float16}
    spy.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*_pair(), iters=1, test_mode=True)
    assert spy.dtypes() == {torch.bfloat16}, "an autocast the caller opened must not be overridden"
    spy.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), use_precision(model, "fp32"):
        model(*_pair(), iters=1, test_mode=True)
    assert spy.dtypes() == {torch.float32}, "a chosen fp32 runs fp32 even inside an autocast"
    assert model.precision is None, "use_precision restores the unset state"


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # building the CUDA autocast on a CPU-only machine
def test_the_official_default_is_fp16_on_cuda_only() -> None:
    on_cuda = precision_ctx(None, True, torch.device("cuda"))
    assert isinstance(on_cuda, torch.autocast) and (on_cuda.device, on_cuda.fast_dtype) == ("cuda", torch.float16)
    assert not isinstance(precision_ctx(None, True, torch.device("cpu")), torch.autocast)
    assert not isinstance(precision_ctx(None, False, torch.device("cuda")), torch.autocast)
    with pytest.raises(ValueError, match="precision 'int8'"), use_precision(_tiny(), "int8"):
        pass


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_measure_times_the_precision_it_labels(model_default_on_cpu, precision: str, dtype: torch.dtype) -> None:
    model = _tiny()
    spy = ConvSpy(model)
    stats = measure(model, "torch", H, W, iters=1, warmup=0, repeats=1, device="cpu", precision=precision)
    assert stats.precision == precision
    assert spy.dtypes() == {dtype}
    assert model.precision is None


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("bf16", True)])
def test_fp32_timing_turns_tf32_off_and_restores_it(model_default_on_cpu, precision: str, tf32: bool) -> None:
    model = _tiny()
    seen = []
    model.register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32,
                                                        torch.backends.cuda.matmul.allow_tf32)))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # PyTorch's cuDNN default
    try:
        measure(model, "torch", H, W, iters=1, warmup=0, repeats=1, device="cpu", precision=precision)
        assert seen and set(seen) == {(tf32, tf32)}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_block_timing_runs_the_precision_of_its_table(model_default_on_cpu) -> None:
    model = _tiny()
    blocks = student_blocks(model)
    with use_precision(model, "fp32"):
        _, inputs = run_blocks(blocks, *_pair(), iters=1)
    spy = ConvSpy(model)
    time_module(blocks["feature"], inputs["feature"], "torch", precision="bf16", warmup=0, repeats=1)
    assert spy.dtypes() == {torch.bfloat16}
    spy.clear()
    time_module(blocks["feature"], inputs["feature"], "torch", precision="fp32", warmup=0, repeats=1)
    assert spy.dtypes() == {torch.float32}


def _trainer(tmp_path: Path, amp: str) -> Trainer:
    """A live mixed-precision teacher and a mixed-precision tiny student on 32x64 synthetic pairs."""
    cfg = load_recipe(None, [
        f"run_dir={tmp_path / 'run'}", "progress=false", f"amp='{amp}'", "steps=1", "batch_size=1", "train_iters=1",
        "eval_iters=1", "data.eval_samples=1", "loss.feature.enabled=false",
        "teacher.stand_in=random", "teacher.config.vit_size=vitt", "teacher.config.hidden_dims=[32,32,32]",
        "teacher.config.max_disp=64", "teacher.config.mixed_precision=true", "teacher.iters=1",
        "data.train.num_samples=2", "data.train.synthetic.height=32", "data.train.synthetic.width=64",
        "data.train.synthetic.max_disp=12", "data.train.synthetic.num_objects=2",
        "student.kind=search_space", "student.preset=tiny", "student.config.mixed_precision=true",
    ])
    return Trainer(cfg)


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16)])
def test_distillation_trains_and_evaluates_at_its_amp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: str,
                                                       dtype: torch.dtype) -> None:
    trainer = _trainer(tmp_path, amp)
    assert trainer.teacher is not None and trainer.teacher.cfg.mixed_precision and trainer.student.cfg.mixed_precision
    if amp == "bf16":
        assert trainer.amp_dtype is None, "amp is CUDA only: CPU trains float32"
        trainer.amp_dtype = torch.bfloat16  # what amp 'bf16' resolves to on CUDA
    monkeypatch.setitem(stages.DEFAULT_AUTOCAST, "cpu", torch.float16)  # after set-up: the model default, on CPU
    student, teacher = ConvSpy(trainer.student), ConvSpy(trainer.teacher)
    total, _ = trainer.batch_loss(next(trainer.batches()))
    total.backward()
    assert student.dtypes() == {dtype} and teacher.dtypes() == {dtype}
    assert trainer.precision == {"off": "fp32", "bf16": "bf16"}[amp]
    assert not trainer.scaler.is_enabled(), "bf16 and fp32 need no GradScaler"
    student.clear()
    trainer.evaluate()
    assert student.dtypes() == {dtype}
    assert trainer.student.precision is None and trainer.teacher.precision is None


def _half_in_graph(path: Path) -> list[str]:
    proto = onnx.load(str(path))
    half = onnx.TensorProto.FLOAT16
    casts = [n.name for n in proto.graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == half for a in n.attribute)]
    return casts + [t.name for t in proto.graph.initializer if t.data_type == half]


def test_onnx_export_traces_float32(model_default_on_cpu, tmp_path: Path) -> None:
    # to_onnx chooses no precision: its trace must still be float32 (fp16 graphs are cast from it later).
    model = _tiny()
    spy = ConvSpy(model)
    path = to_onnx(model, tmp_path / "m.onnx", H, W, iters=1, check_parity=False).path
    assert spy.dtypes(exporting=True) == {torch.float32}
    assert _half_in_graph(path) == []


def test_ffsc_export_runs_and_traces_float32(model_default_on_cpu, tmp_path: Path) -> None:
    # `ffsc export` sets fp32 on the model: its trace and its parity check's PyTorch run are float32 alike.
    model = _tiny()
    spy = ConvSpy(model)
    report = export_model(ResolvedModel(kind="preset", description="tiny", module=model), tmp_path / "m.onnx",
                          "onnx", H, W, iters=1, check_parity=True)
    assert spy.dtypes(exporting=True) == {torch.float32} and spy.dtypes(exporting=False) == {torch.float32}
    assert report["onnx"]["max_abs_diff"] < 1e-3
    assert _half_in_graph(tmp_path / "m.onnx") == []
    assert model.precision is None
