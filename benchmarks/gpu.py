"""The one GPU check: what the GPU paths claim, settled on a CUDA GPU in one process, within a time budget.

Two parts, in this order (the first rows are the cheapest per question answered):

1. The GPU items, one row each; a missing piece (no TensorRT, no ONNX Runtime CUDA provider, one GPU) makes the
   row "skipped: <reason>", never a crash:
   - 1 precision: ``measure()`` at fp32, bf16 and fp16 on CUDA for a tiny student and a small stand-in teacher,
     both ``mixed_precision`` (their own default is fp16 autocast); a hook on every convolution records the dtype
     it computed in; fp32 must be float32 only. A second row traces the student to ONNX on CUDA: no fp16 inside.
   - 3 Triton: whether torch.compile can generate Triton kernels here (one tiny inductor compile), and what
     latency backend ``auto`` picks.
   - 6 TensorRT 11 and bf16: refused by preflight's check there, accepted on 10.
   - 2 compile sequence: ``--students`` students of different widths timed compiled one after the other
     (``--sequence-backend``: Dynamo with the eager backend by default; the latency table's compiled rows then
     compile with inductor in the same process); no frame may hit the recompile limit.
   - 7 ONNX Runtime CUDA: the provider present and used by a session; fp32 and fp16 latency.
   - 4 TensorRT timing cache: one fp16 engine built twice (engine cache off) from a cold timing cache: each build's
     seconds, the bytes the second build loaded and the bytes it added (0: every tactic timing was a hit).
   - 9 fp16 disparity: a refinement graph at about 400 px (steps finer than fp16's 0.25 px spacing there) as an fp16
     TensorRT engine and ONNX Runtime CUDA graph against fp32, with and without the float32 islands (max abs px).
   - 10 TF32: a TensorRT fp32 engine (TF32 cleared) against PyTorch fp32 (TF32 off), beside what TF32 alone moves.
   - 5 INT8: ``quantize_onnx`` with target tensorrt on generated calibration frames, the Q/DQ graph built as an INT8
     engine, run and timed against the fp16 engine.
   - 8 several GPUs: the tiny student timed on cuda:1, and a TensorRT engine built and run there.
2. The latency table at 480x640: the teacher (ViT-L, its own 32 iterations, the official fp16 autocast, eager); the
   ``fast_foundationstereo`` preset at its 8 iterations, first eager and compiled + CUDA graphs in fp16 and as a
   TensorRT fp16 engine, then in every other mode (eager + CUDA graph, compiled) and precision (fp32, bf16); the
   quick start's final student (``--student``, default the newest ``runs/quickstart-*/final/student``). A
   compiled row records Dynamo's and Inductor's counts over its measurement (graphs, graph breaks, recompile-limit
   hits, CUDA-graph skips) and is marked "fell back" when parts of it ran eagerly or without graphs.

Reference on an H200 with the official code, eager: teacher 340 ms (fp16, 32 iterations), the Fast-FoundationStereo
code 47.7 ms (bf16, 8 iterations). The goal: the preset under 8 ms.

The budget (``--budget-s``, default 480 s after start-up): a row whose estimated cost exceeds the time left is
recorded "not run: budget"; a row still running at the deadline is interrupted ("stopped: budget"), and one that
cannot be interrupted (inside a TensorRT build) is ended with the process 30 s later, after the report is written
(exit 3). The report (JSON and Markdown) is rewritten after every row, so a killed run keeps the rows it finished.

    python benchmarks/gpu.py                 # everything, writes benchmarks/results/gpu-<gpu>.{json,md}
    python benchmarks/gpu.py --quick         # the items, then the teacher and the preset in three modes only
    python benchmarks/gpu.py --part latency  # only the latency table (after a call whose budget left it out)

Without a CUDA GPU it exits with one line (exit 2) and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress.backends import check_tensorrt_precision, onnxruntime_conflict, tensorrt_problem
from compress.compiled import compile_problem, tf32
from compress.errors import ConfigError, MissingDependencyError
from compress.export import TensorRTRunner, build_engine, cast_onnx_fp16, read_metadata, read_sidecar, to_onnx
from compress.export._trt import import_tensorrt, trt_major
from compress.export.engine import TIMING_CACHE_ENV, EngineInfo, count_qdq_nodes
from compress.export.onnx_export import fp32_node_patterns
from compress.export.runtime import INPUT_NAMES, import_onnxruntime, make_session, random_stereo_pair
from compress.latency import (
    COMPILE_BACKEND_ENV,
    compile_counters,
    measure,
    no_tf32,
    resolve_backend,
    time_calls,
    triton_problem,
)
from compress.machine import installed_version
from compress.models import resolve_model
from compress.pipeline import quiet_third_party
from compress.quantize import QuantizeConfig, quantize_onnx
from search_spaces import build_student, count_macs, count_params, preset
from teacher import FoundationStereo, TeacherConfig
from teacher.inference import model_iters
from teacher.stages import use_precision
from teacher.update import ConvexCombination, DisparityUpdate

try:
    from benchmarks.report import write_report
except ModuleNotFoundError:  # run as `python benchmarks/gpu.py`: this folder is on sys.path, the repository not
    from report import write_report

PRESET = "fast_foundationstereo"
MODES = {  # name: (compile, cuda_graph)
    "eager": (False, False),
    "eager+graph": (False, True),
    "compiled": (True, False),
    "compiled+graph": (True, True),
}
ENGINE_MODE = "engine"
"""The mode of a TensorRT latency row (the engine as built; no compile, no graph)."""
PRECISIONS = ("fp32", "bf16", "fp16")
PARTS = ("all", "items", "latency")
"""What --part runs: the GPU items, the latency table, or both (items first)."""
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
REFERENCE_MS = {"teacher": 340.0, "ffs_code": 47.7, "goal_preset": 8.0}
DEFAULT_BUDGET_S = 480.0
"""Rows run for at most this long; with start-up and the hard stop's grace the call stays under 9 minutes."""
HARD_STOP_GRACE_S = 30.0
"""How long past the deadline a row that ignores the interruption may run before the process is ended."""
SMALL = (64, 128)
"""Height x width of the checks whose question does not depend on the size (precision, compile sequence)."""
CALIBRATION_FRAMES = 4
KEPT_TOLERANCE_PX = 0.01
"""Largest fp16-vs-fp32 disparity difference accepted with the float32 islands kept (fp16 alone spaces 0.25 px)."""
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- the runner: budget, deadline, one report write per row -------------------------------------------------------


class Skip(Exception):
    """A row whose prerequisite is missing on this machine: recorded as "skipped: <reason>", not as a failure."""


class BudgetSpent(BaseException):
    """Raised into the running row at the deadline (a BaseException, so the rows' own ``except Exception`` lets it
    through)."""


@dataclass
class Task:
    """One planned row: its table ("checks" or "rows"), the fields naming it, its rough cost and its work."""

    table: str
    name: dict
    estimate_s: float
    work: Callable[[], dict]


def one_line(err: BaseException) -> str:
    """'Type: first line of the message', at most 300 characters."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:300]


class Runner:
    """Runs tasks within a budget and rewrites the whole report after every row, so a killed run keeps its rows.

    The deadline is budget_s after construction. A task whose estimate exceeds the time left is not started; a
    running one is interrupted at the deadline by SIGALRM (main thread only); one still running grace_s later (a
    C call that does not return, such as a TensorRT build) is recorded as stopped and the process exits with 3.
    """

    def __init__(self, result: dict, stem: Path, budget_s: float, markdown_of: Callable[[dict], str],
                 grace_s: float = HARD_STOP_GRACE_S) -> None:
        self.result, self.stem, self.budget_s, self.grace_s = result, Path(stem), budget_s, grace_s
        self.markdown_of = markdown_of
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self._lock = threading.RLock()
        self._pending: list[Task] = []
        self._current: tuple[Task, dict] | None = None
        self._in_row = False

    def left_s(self) -> float:
        """Seconds until the deadline (negative past it)."""
        return self.deadline - time.perf_counter()

    def write(self) -> None:
        """Write the report as it stands (atomically, through benchmarks/report.py)."""
        with self._lock:
            self.result["seconds"] = round(time.perf_counter() - self.start, 1)
            write_report(self.stem, self.result, self.markdown_of(self.result))

    def run(self, tasks: list[Task]) -> None:
        """Run every task in order (or record why not), writing the report after each."""
        self._pending = list(tasks)
        watchdog = threading.Timer(max(self.left_s(), 0.0) + self.grace_s, self._hard_stop)
        watchdog.daemon = True
        watchdog.start()
        alarm = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGALRM, self._on_alarm) if alarm else None
        try:
            while self._pending:
                task = self._pending.pop(0)
                try:
                    row = self._run_one(task, alarm)
                except BudgetSpent:  # the alarm landed between the row's end and its timer's reset
                    row = {**task.name, "status": self._stopped()}
                self._record(task, row)
        finally:
            watchdog.cancel()
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)

    def _stopped(self) -> str:
        return f"stopped: budget ({self.budget_s:.0f} s) spent during this row"

    def _run_one(self, task: Task, alarm: bool) -> dict:
        left = self.left_s()
        if task.estimate_s > left:
            return {**task.name, "status": f"not run: budget (needs about {task.estimate_s:.0f} s, "
                                           f"{max(left, 0):.0f} s left)"}
        row = dict(task.name)
        self._current = (task, row)
        start = time.perf_counter()
        try:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
            self._in_row = True
            row.update(task.work())
            row.setdefault("status", "ok")
        except Skip as why:
            row["status"] = f"skipped: {why}"
        except BudgetSpent:
            row["status"] = self._stopped()
        except Exception as err:  # one failing row must not end the check: record why
            row["status"] = f"failed: {one_line(err)}"
        finally:
            self._in_row = False
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # the next row starts without this one's cached blocks
        row["seconds"] = round(time.perf_counter() - start, 1)
        return row

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._in_row:
            raise BudgetSpent

    def _record(self, task: Task, row: dict) -> None:
        with self._lock:
            self.result[task.table].append(row)
            self._current = None  # only now: the watchdog must never lose a finished row that is not yet recorded
            self.write()
        print(describe(row), flush=True)

    def _hard_stop(self) -> None:
        """Watchdog thread: the running row did not stop at the deadline; record it and everything left, then exit."""
        with self._lock:
            if self._current is not None:
                task, row = self._current
                self.result[task.table].append({**row, "status": f"stopped: budget ({self.budget_s:.0f} s); still "
                                                f"running {self.grace_s:.0f} s later, so the process was ended"})
            for task in self._pending:
                self.result[task.table].append({**task.name, "status": "not run: budget"})
            self._pending = []
            self.write()
        print(f"benchmarks/gpu.py: a row ran {self.grace_s:.0f} s past the {self.budget_s:.0f} s budget; the "
              f"report {self.stem}.json holds every row; ending the process", file=sys.stderr, flush=True)
        os._exit(3)


def describe(row: dict) -> str:
    """One console line for a row."""
    if "check" in row:
        summary = f" - {row['summary']}" if row.get("summary") else ""
        return f"[{row['item']}] {row['check']}: {row['status']}{summary} ({row.get('seconds', 0)} s)"
    shown = f"{row['median_ms']:.2f} ms" if "median_ms" in row else row.get("status", "")
    if row.get("fell_back"):
        shown += f" [fell back: {'; '.join(row['fell_back'])}]"
    return (f"{row['model']:<28} {row.get('backend', 'torch'):<9} {row['mode']:<15} {row['precision']:<5} {shown}  "
            f"({row.get('seconds', 0)} s)")


# --- what the checks share -------------------------------------------------------------------------------------


def tiny_student(seed: int = 0, **overrides: object) -> nn.Module:
    """The tiny preset with mixed_precision on (its own default is then fp16 autocast), random weights, on the CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_student(preset("tiny", mixed_precision=True, **overrides), pretrained=False).eval()


def stand_in_teacher(seed: int = 0) -> nn.Module:
    """A small FoundationStereo (ViT-tiny, 32 hidden) with mixed_precision on, random weights, on the CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FoundationStereo(TeacherConfig(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64,
                                              mixed_precision=True)).eval()


def varied_students(count: int) -> list[nn.Module]:
    """``count`` tiny students, each with other hourglass and motion widths (other parameter shapes)."""
    return [tiny_student(i, hourglass_widths=[16 + 8 * i, 24 + 8 * i], motion_dim=32 + 2 * i) for i in range(count)]


PRECISION_MODELS: dict[str, Callable[[], nn.Module]] = {"tiny student": tiny_student,
                                                        "stand-in teacher": stand_in_teacher}
"""The models of the precision check, both mixed_precision."""


class ConvDtypes:
    """Forward hooks on every convolution of a model, recording the dtype each computed in (its output dtype)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: set[str] = set()
        self._handles = [m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, CONVS)]
        if not self._handles:
            raise ConfigError("the model has no convolution to watch")

    def _record(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.seen.add(str(out.dtype).removeprefix("torch."))

    def take(self) -> list[str]:
        """The dtypes seen since the last take, sorted."""
        seen, self.seen = sorted(self.seen), set()
        return seen

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


def dtype_problems(model: str, seen: dict[str, list[str]]) -> list[str]:
    """Where the convolutions did not run the precision asked: fp32 must be float32 only; a reduced precision must
    show its dtype and not the other reduced one."""
    problems = []
    for precision, dtypes in seen.items():
        if precision not in DTYPE_NAMES:
            continue
        wanted = DTYPE_NAMES[precision]
        others = {DTYPE_NAMES[p] for p in ("fp16", "bf16")} - {wanted}
        if (precision == "fp32" and dtypes != [wanted]) or wanted not in dtypes or others & set(dtypes):
            problems.append(f"{model} at {precision} ran in {', '.join(dtypes) or 'nothing'}")
    return problems


def half_in_graph(path: Path) -> list[str]:
    """Names of the fp16 Casts and fp16 initializers of an ONNX graph."""
    proto = onnx.load(str(path))
    half = onnx.TensorProto.FLOAT16
    casts = [n.name for n in proto.graph.node
             if n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute)]
    return casts + [t.name for t in proto.graph.initializer if t.data_type == half]


class Refine(nn.Module):
    """Three accumulations of small steps onto a large disparity, then the convex upsampling (as the models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.disparity_update = DisparityUpdate()
        self.convex_combination = ConvexCombination()

    def forward(self, disp: torch.Tensor, delta: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Full-resolution disparity after three updates."""
        for _ in range(3):
            disp = self.disparity_update(disp, delta * 1.0)  # the Mul stands for the update block (fp16)
        return self.convex_combination(disp, logits * 1.0, 4)


def refine_inputs(size: int = 32) -> dict[str, torch.Tensor]:
    """A smooth disparity near 100 px at 1/4 resolution (400 px after the upsampling), steps finer than fp16's
    0.25 px spacing there."""
    gen = torch.Generator().manual_seed(0)
    return {"disp": 100.0 + 0.5 * torch.rand(1, 1, size, size, generator=gen),
            "delta": 0.01 + 0.02 * torch.rand(1, 1, size, size, generator=gen),
            # exact in fp16: no rounding upstream of the islands
            "logits": (0.5 * torch.randn(1, 9, 4 * size, 4 * size, generator=gen)).half().float()}


def need(problem: str | None) -> None:
    """Skip the row when a prerequisite has a problem."""
    if problem:
        raise Skip(problem)


def ort_problem(device: torch.device) -> str | None:
    """None when ONNX Runtime can run on ``device`` here, else why not (naming a two-package conflict)."""
    try:
        ort = import_onnxruntime()
    except MissingDependencyError as err:
        return str(err)
    if device.type != "cuda" or "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    conflict = onnxruntime_conflict()
    return (f"ONNX Runtime has no CUDAExecutionProvider (it has {', '.join(ort.get_available_providers())})"
            + (f"; {conflict}" if conflict else ""))


def gpu_count_problem(count: int) -> str | None:
    """None when a second GPU is visible, else why the multi-GPU row cannot run."""
    if count >= 2:
        return None
    return "one GPU" if count == 1 else "no CUDA GPU"


@contextlib.contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` within the block, restored after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def max_abs(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Largest absolute difference of two arrays with the same number of elements, in float64."""
    a, b = torch.as_tensor(a).detach().cpu().double(), torch.as_tensor(b).detach().cpu().double()
    return float((a.reshape(b.shape) - b).abs().max())


class EngineRun:
    """One engine bound to fixed inputs on its device: its output, and its latency by CUDA events."""

    def __init__(self, engine: Path, feeds: dict[str, torch.Tensor], device: torch.device) -> None:
        self.runner = TensorRTRunner(engine, device=device)
        names = self.runner.input_names
        buffers = self.runner.bind({n: tuple(feeds[n].shape) for n in names})
        for name in names:
            buffers[name].copy_(feeds[name].to(self.runner.device))
        torch.cuda.synchronize(self.runner.device)
        self.device = self.runner.device

    def output(self) -> torch.Tensor:
        """The first output after one run, as float32 on the CPU."""
        self.runner.execute()
        self.runner.stream.synchronize()
        return self.runner.buffers[self.runner.output_names[0]].float().cpu()

    def median_ms(self, warmup: int, repeats: int) -> float:
        """Median milliseconds of one run (CUDA events on the engine's stream)."""
        return float(np.median(time_calls(self.runner.execute, self.device, warmup, repeats,
                                          stream=self.runner.stream)))


class Checks:
    """The GPU items' rows and what they share: a work folder, the device, a tiny student, its ONNX and engines."""

    def __init__(self, workdir: Path, device: torch.device, height: int = 480, width: int = 640, warmup: int = 5,
                 repeats: int = 30, students: int = 10, sequence_backend: str = "eager", onnx: Path | None = None,
                 ) -> None:
        """``onnx``: a graph to use in place of the tiny student's export (the tests' small graphs)."""
        self.workdir, self.device, self.height, self.width = Path(workdir), torch.device(device), height, width
        self.warmup, self.repeats, self.students, self.sequence_backend = warmup, repeats, students, sequence_backend
        self.timing_dir = self.workdir / "timing"
        self._student: nn.Module | None = None
        self._onnx = onnx
        self._engines: dict[str, Path] = {}

    def tasks(self) -> list[Task]:
        """Every item's row, cheapest per question first; estimates are rough seconds on an H100-class GPU."""
        plan = [
            ("1", "precision asked = precision run (torch on CUDA)", 20, self.precision),
            ("1", "ONNX traced on CUDA is float32", 15, self.onnx_trace),
            ("3", "Triton and backend auto", 20, self.triton),
            ("6", "TensorRT 11 refuses bf16", 5, self.bf16_on_tensorrt_11),
            ("2", f"{self.students} students compiled in sequence", 6 * self.students, self.compile_sequence),
            ("7", "ONNX Runtime CUDA provider", 30, self.ort_cuda),
            ("4", "TensorRT timing cache: fp16 engine built twice", 120, self.timing_cache),
            ("9", "fp16 disparity above 256 px", 40, self.fp16_disparity),
            ("10", "TF32: TensorRT fp32 vs torch fp32", 60, self.tf32),
            ("5", "INT8 engine from a Q/DQ graph", 90, self.int8),
            ("8", "several GPUs: cuda:1", 60, self.multi_gpu),
        ]
        return [Task("checks", {"item": item, "check": check}, estimate, work) for item, check, estimate, work in plan]

    # shared pieces, made on first use

    def student(self) -> nn.Module:
        """The tiny student on the device."""
        if self._student is None:
            self._student = tiny_student().to(self.device)
        return self._student

    def feeds(self) -> dict[str, torch.Tensor]:
        """A random stereo pair at the check size, on the device."""
        pair = random_stereo_pair(1, self.height, self.width, seed=0, device=self.device)
        return dict(zip(INPUT_NAMES, pair, strict=True))

    def student_onnx(self) -> Path:
        """The tiny student exported once (fp32, static shapes, its own iterations)."""
        if self._onnx is None:
            model = self.student()
            self._onnx = to_onnx(model, self.workdir / "student.onnx", self.height, self.width, model_iters(model),
                                 device=self.device, check_parity=False).path
        return self._onnx

    def onnx_iters(self) -> int:
        """The iterations the student's ONNX was exported at (1 for a graph that does not say)."""
        return int(read_metadata(self.student_onnx()).get("iters") or 1)

    def engine(self, precision: str) -> Path:
        """The student's engine at ``precision``, built once (timing cache shared by every build of this run)."""
        if precision not in self._engines:
            path = self.workdir / f"student_{precision}.engine"
            build_engine(self.student_onnx(), path, precision=precision, device=self.device,
                         timing_cache_dir=self.timing_dir)
            self._engines[precision] = path
        return self._engines[precision]

    # the rows

    def precision(self, models: tuple[str, ...] = ("tiny student", "stand-in teacher")) -> dict:
        """Item 1: the convolutions compute in the precision measure() is asked for, fp32 meaning float32."""
        height, width = SMALL
        # CPU autocast has no fp16 (on a CPU device only the logic is exercised).
        precisions = PRECISIONS if self.device.type == "cuda" else ("fp32", "bf16")
        left, right = random_stereo_pair(1, height, width, seed=0, device=self.device)
        seen: dict[str, dict[str, list[str]]] = {}
        problems: list[str] = []
        for name in models:
            model = PRECISION_MODELS[name]().to(self.device)
            spy = ConvDtypes(model)
            try:
                # The control: with no precision chosen the model runs its own default (fp16 autocast on CUDA),
                # which the spy would see in every row below if that default overrode the caller's choice.
                with torch.inference_mode():
                    model(left, right, iters=1, test_mode=True)
                seen[name] = {"default": spy.take()}
                for precision in precisions:
                    measure(model, "torch", height, width, iters=1, warmup=0, repeats=1, device=self.device,
                            precision=precision)
                    seen[name][precision] = spy.take()
            finally:
                spy.remove()
            problems += dtype_problems(name, seen[name])
        summary = "; ".join(f"{name}: " + ", ".join(f"{p} -> {'/'.join(d)}" for p, d in dtypes.items())
                            for name, dtypes in seen.items())
        out = {"dtypes": seen, "summary": summary}
        if problems:
            out["status"] = "failed: " + "; ".join(problems)
        return out

    def onnx_trace(self) -> dict:
        """Item 1: an ONNX traced on the device from a mixed_precision model carries no fp16."""
        height, width = SMALL
        path = to_onnx(tiny_student().to(self.device), self.workdir / "traced.onnx", height, width, iters=1,
                       device=self.device, check_parity=False).path
        half = half_in_graph(path)
        out = {"fp16_nodes": len(half), "summary": f"{len(half)} fp16 casts or initializers"}
        if half:
            out["status"] = f"failed: the fp32 graph has fp16 inside ({', '.join(half[:3])} ...)"
        return out

    def triton(self) -> dict:
        """Item 3: whether Triton works here (one tiny inductor compile), and what backend auto picks."""
        need(None if self.device.type == "cuda" else "no CUDA GPU")
        problem = triton_problem(self.device)
        choice = resolve_backend("auto", str(self.device))
        out = {"triton_problem": problem, "auto_backend": choice.backend, "auto_compile": choice.compile,
               "auto_cuda_graph": choice.cuda_graph, "auto_reason": choice.reason}
        compiled = None
        if problem is None:  # triton_problem says inductor will work: show it does
            torch.compiler.reset()
            try:
                x = torch.arange(8.0, device=self.device)
                torch.testing.assert_close(torch.compile(lambda t: t * 2 + 1, backend="inductor")(x), x * 2 + 1)
                compiled = "ok"
            except Exception as err:  # reported, not raised: the row says what failed
                compiled = one_line(err)
            out["inductor_compile"] = compiled
        out["summary"] = (f"Triton {'works' if problem is None and compiled == 'ok' else 'unusable'}"
                          f"{': ' + problem if problem else ''}; auto -> {choice.backend}"
                          f"{' compiled' if choice.compile else ''}{' + CUDA graphs' if choice.cuda_graph else ''}")
        if problem is None and compiled != "ok":
            out["status"] = f"failed: triton_problem() found nothing wrong, but an inductor compile failed: {compiled}"
        return out

    def bf16_on_tensorrt_11(self) -> dict:
        """Item 6: preflight's precision check refuses bf16 on TensorRT 11 and later, and accepts it on 10."""
        need(tensorrt_problem())
        trt = import_tensorrt()
        try:
            check_tensorrt_precision("bf16")
            refused = None
        except ConfigError as err:
            refused = str(err)
        expected = trt_major(trt) >= 11
        out = {"tensorrt": str(trt.__version__), "bf16_refused": refused is not None,
               "summary": f"TensorRT {trt.__version__}: bf16 {'refused' if refused else 'accepted'}"}
        if (refused is not None) != expected:
            out["status"] = f"failed: TensorRT {trt.__version__} should {'' if expected else 'not '}refuse bf16"
        return out

    def compile_sequence(self) -> dict:
        """Item 2: students of different widths compiled one after the other never fall back to eager frames."""
        height, width = SMALL
        graphs, hits = [], 0
        with environment_variable(COMPILE_BACKEND_ENV, self.sequence_backend):
            for i, model in enumerate(varied_students(self.students)):
                before = compile_counters()
                # measure() refuses (raises) when a frame hits the recompile limit and would run eagerly.
                measure(model.to(self.device), "torch", height, width, iters=1, warmup=1, repeats=3,
                        device=self.device, compile=True)
                delta = {k: v - before[k] for k, v in compile_counters().items()}
                graphs.append(delta["graphs"])
                hits += delta["recompile_limit_hits"]
                if delta["graphs"] < 1:
                    return {"graphs": graphs, "status": f"failed: student {i} ran without a compiled graph"}
        out = {"backend": self.sequence_backend, "graphs": graphs, "recompile_limit_hits": hits,
               "summary": f"{len(graphs)} students, each compiled ({self.sequence_backend}), {hits} recompile-limit "
                          "hits"}
        if hits:
            out["status"] = f"failed: {hits} recompile-limit hit(s): frames ran eagerly"
        return out

    def ort_cuda(self) -> dict:
        """Item 7: ONNX Runtime's CUDA provider is present and used; fp32 and fp16 latency of the student."""
        need(None if self.device.type == "cuda" else "no CUDA GPU")
        need(ort_problem(self.device))
        path = self.student_onnx()
        used = make_session(path, self.device, require_device=True).get_providers()
        out: dict = {"providers": used, "conflict": onnxruntime_conflict()}
        if not used or used[0] != "CUDAExecutionProvider":
            out["status"] = f"failed: the session runs on {used} (the CUDA provider did not load)"
            return out
        for precision in ("fp32", "fp16"):
            stats = measure(path, "onnxruntime", self.height, self.width, iters=self.onnx_iters(), warmup=self.warmup,
                            repeats=self.repeats, device=self.device, precision=precision)
            out[f"{precision}_ms"] = round(stats.median_ms, 3)
        out["summary"] = f"CUDA provider used; fp32 {out['fp32_ms']} ms, fp16 {out['fp16_ms']} ms"
        return out

    def timing_cache(self) -> dict:
        """Item 4: a second build of the same engine loads the first one's timing cache (and needs few new timings)."""
        need(tensorrt_problem())
        onnx_path = self.student_onnx()
        cold = self.workdir / "timing-cold"  # a fresh cache folder: the first build starts from nothing
        engine = self.workdir / "student_fp16.engine"
        builds: list[EngineInfo] = []
        sizes = []
        for _ in range(2):
            # cache=False: a real second build, not the engine cache's copy of the first.
            builds.append(build_engine(onnx_path, engine, precision="fp16", cache=False, device=self.device,
                                       timing_cache_dir=cold))
            sizes.append(Path(builds[-1].timing_cache).stat().st_size)
        self._engines["fp16"] = engine
        first, second = builds[0].build_seconds, builds[1].build_seconds
        out = {"first_build_s": round(first, 1), "second_build_s": round(second, 1),
               "speedup": round(first / second, 2) if second > 0 else None,
               "cache_bytes_after_first": sizes[0], "bytes_added_by_second": sizes[1] - sizes[0],
               "summary": f"builds {first:.1f} s then {second:.1f} s; the second loaded {sizes[0]} bytes of timings "
                          f"and added {sizes[1] - sizes[0]}"}
        if sizes[0] == 0:
            out["status"] = "failed: the first build saved no timing cache"
        return out

    def fp16_disparity(self) -> dict:
        """Item 9: fp16 graphs keep large disparities to sub-pixel precision with the float32 islands, not without."""
        trt_skip, ort_skip = tensorrt_problem(), ort_problem(self.device)
        if self.device.type != "cuda":
            trt_skip = trt_skip or "no CUDA GPU"
        need(f"{trt_skip}; {ort_skip}" if trt_skip and ort_skip else None)
        model = Refine().eval()
        feeds = refine_inputs()
        src = self.workdir / "refine.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice: to_onnx uses it too
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, tuple(feeds.values()), str(src), input_names=list(feeds), output_names=["out"],
                              opset_version=17, dynamo=False)
        islands = fp32_node_patterns(model)
        with torch.no_grad():
            reference = model(*feeds.values())
        out: dict = {"islands": islands, "median_disparity_px": round(float(reference.median()), 1)}
        diffs: dict[str, float] = {}
        if trt_skip:
            out["tensorrt"] = f"skipped: {trt_skip}"
        else:
            runs = {}
            for label, precision, keep in (("fp32", "fp32", None), ("kept", "fp16", tuple(islands)),
                                           ("lost", "fp16", ())):
                engine = self.workdir / f"refine_{label}.engine"
                build_engine(src, engine, precision=precision, device=self.device, timing_cache_dir=self.timing_dir,
                             **({} if keep is None else {"keep_fp32_nodes": keep}))
                runs[label] = EngineRun(engine, feeds, self.device).output()
            diffs["tensorrt_fp32_vs_torch"] = max_abs(runs["fp32"], reference)
            diffs["tensorrt_fp16_islands"] = max_abs(runs["kept"], runs["fp32"])
            diffs["tensorrt_fp16_no_islands"] = max_abs(runs["lost"], runs["fp32"])
        if ort_skip:
            out["onnxruntime"] = f"skipped: {ort_skip}"
        else:
            arrays = {name: t.numpy() for name, t in feeds.items()}
            where = "onnxruntime_" + self.device.type

            def run(path: Path) -> np.ndarray:
                return make_session(path, self.device, require_device=True).run(None, arrays)[0]

            fp32 = run(src)
            kept = run(cast_onnx_fp16(src, self.workdir / "refine_kept.onnx", keep_fp32_nodes=islands).path)
            lost = run(cast_onnx_fp16(src, self.workdir / "refine_lost.onnx", keep_fp32_nodes=()).path)
            diffs[f"{where}_fp16_islands"] = max_abs(kept, fp32)
            diffs[f"{where}_fp16_no_islands"] = max_abs(lost, fp32)
        out["max_abs_px"] = {k: round(v, 5) for k, v in diffs.items()}
        out["summary"] = ", ".join(f"{k} {v:.4f} px" for k, v in diffs.items())
        worst = {k: v for k, v in diffs.items() if k.endswith("_islands") and "no_islands" not in k
                 and v > KEPT_TOLERANCE_PX}
        if worst:
            out["status"] = (f"failed: with the float32 islands kept the fp16 disparity is off by "
                             f"{max(worst.values()):.4f} px (> {KEPT_TOLERANCE_PX} px) in {', '.join(worst)}")
        return out

    def tf32(self) -> dict:
        """Item 10: TensorRT fp32 engines are built without TF32, and agree with PyTorch fp32 (TF32 off)."""
        need(tensorrt_problem())
        engine = self.engine("fp32")
        info = read_sidecar(engine)
        model, feeds = self.student(), self.feeds()
        iters = self.onnx_iters()
        with torch.inference_mode(), use_precision(model, "fp32"):
            with no_tf32():
                fp32 = model(*feeds.values(), iters=iters, test_mode=True).float().cpu()
            with tf32(allowed=True):
                with_tf32 = model(*feeds.values(), iters=iters, test_mode=True).float().cpu()
        run = EngineRun(engine, feeds, self.device)
        trt_vs_torch, tf32_alone = max_abs(run.output(), fp32), max_abs(with_tf32, fp32)
        torch_ms = measure(model, "torch", self.height, self.width, iters=iters, warmup=self.warmup,
                           repeats=self.repeats, device=self.device, precision="fp32").median_ms
        out = {"engine_tf32": None if info is None else info.tf32, "tensorrt_vs_torch_fp32_px": round(trt_vs_torch, 5),
               "torch_tf32_vs_fp32_px": round(tf32_alone, 5),
               "tensorrt_fp32_ms": round(run.median_ms(self.warmup, self.repeats), 3),
               "torch_fp32_ms": round(torch_ms, 3),
               "summary": f"TensorRT fp32 vs torch fp32 {trt_vs_torch:.4f} px (TF32 alone moves torch "
                          f"{tf32_alone:.4f} px); engine TF32 {None if info is None else info.tf32}"}
        if info is None or info.tf32:
            out["status"] = "failed: the fp32 engine was built with TF32 allowed"
        return out

    def int8_engine(self) -> tuple[EngineInfo, int]:
        """The student quantized for TensorRT on generated frames and built as an INT8 engine; (info, Q/DQ nodes)."""
        qdq_path = self.workdir / "student_int8.onnx"
        # Calibration runs in ONNX Runtime on the CPU: every core, not the one thread a CPU latency comparison wants.
        cfg = QuantizeConfig(target="tensorrt", calib_frames=CALIBRATION_FRAMES, sensitivity_frames=1, eval_frames=0,
                             sensitivity=False, threads=os.cpu_count() or 1)
        quantize_onnx(self.student_onnx(), qdq_path, "synthetic", cfg, measure_latency=False)
        info = build_engine(qdq_path, self.workdir / "student_int8.engine", precision="int8", device=self.device,
                            timing_cache_dir=self.timing_dir)
        return info, count_qdq_nodes(qdq_path)

    def int8(self) -> dict:
        """Item 5: a Q/DQ graph builds as an INT8 engine, runs, and is timed against the fp16 engine."""
        need(tensorrt_problem())
        info, qdq = self.int8_engine()
        feeds = self.feeds()
        int8, fp16 = EngineRun(info.engine_path, feeds, self.device), EngineRun(self.engine("fp16"), feeds, self.device)
        int8_ms, fp16_ms = int8.median_ms(self.warmup, self.repeats), fp16.median_ms(self.warmup, self.repeats)
        diff = max_abs(int8.output(), fp16.output())
        return {"qdq_nodes": qdq, "strongly_typed": info.strongly_typed, "build_s": round(info.build_seconds, 1),
                "calibration_frames": CALIBRATION_FRAMES, "int8_ms": round(int8_ms, 3), "fp16_ms": round(fp16_ms, 3),
                "int8_speedup": round(fp16_ms / int8_ms, 2), "int8_vs_fp16_px": round(diff, 4),
                "summary": f"INT8 {int8_ms:.3f} ms vs fp16 {fp16_ms:.3f} ms ({fp16_ms / int8_ms:.2f}x), "
                           f"{qdq} Q/DQ nodes, max diff {diff:.3f} px (random weights)"}

    def multi_gpu(self) -> dict:
        """Item 8: a model on cuda:1 is timed and an engine built and run there, the current device left alone."""
        need(gpu_count_problem(torch.cuda.device_count() if torch.cuda.is_available() else 0))
        second = torch.device("cuda", 1)
        current = torch.cuda.current_device()
        model = tiny_student().to("cuda:0")
        height, width = SMALL
        stats = measure(model, "torch", height, width, iters=1, warmup=1, repeats=3, device=second)
        problems = []
        if torch.cuda.current_device() != current:
            problems.append(f"measure on cuda:1 left cuda:{torch.cuda.current_device()} current")
        if next(model.parameters()).device != torch.device("cuda", 0):
            problems.append("measure moved the caller's model")
        out: dict = {"torch_device": stats.device, "torch_ms": round(stats.median_ms, 3)}
        trt_skip = tensorrt_problem()
        if trt_skip is None:
            engine = self.workdir / "student_fp16_cuda1.engine"
            info = build_engine(self.student_onnx(), engine, precision="fp16", device=second,
                                timing_cache_dir=self.timing_dir)
            feeds = {k: v.to(second) for k, v in self.feeds().items()}
            run = EngineRun(engine, feeds, second)
            result = run.runner.buffers[run.runner.output_names[0]]
            out.update(engine_gpu=info.gpu_name, tensorrt_ms=round(run.median_ms(self.warmup, self.repeats), 3))
            if info.gpu_name != torch.cuda.get_device_name(1) or result.device != second:
                problems.append(f"the engine was built for {info.gpu_name} with its output on {result.device}")
            if torch.cuda.current_device() != current:
                problems.append("the TensorRT build or run changed the current device")
        else:
            out["tensorrt"] = f"skipped: {trt_skip}"
        out["summary"] = f"torch on cuda:1 {stats.median_ms:.2f} ms" + (
            f", TensorRT engine on cuda:1 {out['tensorrt_ms']} ms" if "tensorrt_ms" in out else "")
        if problems:
            out["status"] = "failed: " + "; ".join(problems)
        return out


# --- the latency table -----------------------------------------------------------------------------------------


def environment() -> dict:
    """GPU, driver and library versions of this run."""
    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "host": platform.node()}
    info.update({pkg: installed_version(pkg) for pkg in ("timm", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                                                          "triton")})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def newest_quickstart_student(root: Path = Path("runs")) -> Path | None:
    """runs/quickstart-*/final/student of the newest run, if any."""
    found = sorted(root.glob("quickstart*/final/student"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class Models:
    """The latency table's models, built on first use (inside a row, so the budget counts it), with their costs."""

    def __init__(self, height: int, width: int, costs: dict, device: str | torch.device = "cuda") -> None:
        self.height, self.width, self.costs, self.device = height, width, costs, torch.device(device)
        self._models: dict[str, nn.Module] = {}

    def get(self, name: str, spec: str) -> nn.Module:
        """The model called ``name`` (resolve_model(spec)) on the device, in eval mode."""
        if name not in self._models:
            model = resolve_model(spec).module.to(self.device).eval()
            iters = model_iters(model)
            self.costs[name] = {"params_m": round(count_params(model) / 1e6, 3),
                                "gmacs": round(count_macs(model, self.height, self.width, iters=iters).gmacs, 2)}
            self._models[name] = model
        return self._models[name]


def latency_row(models: Models, name: str, spec: str, backend: str, mode: str, precision: str,
                args: argparse.Namespace) -> dict:
    """Measure one (model, backend, mode, precision) at its own iterations; the fields of its row."""
    compile_, graph = MODES.get(mode, (False, False))
    if mode == ENGINE_MODE:
        need(tensorrt_problem())
    if compile_:
        need(compile_problem(models.device))
    model = models.get(name, spec)
    iters = model_iters(model)  # the iterations the model is used at (the teacher's 32), never a guessed default
    cuda = models.device.type == "cuda"
    torch.compiler.reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats(models.device)
    before = compile_counters()
    stats = measure(model, backend, args.height, args.width, iters=iters, warmup=args.warmup, repeats=args.repeats,
                    device=models.device, precision=precision, compile=compile_, cuda_graph=graph)
    row = {"iters": iters, "median_ms": stats.median_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(models.device) / 2**30, 2) if cuda else None}
    row["compile"] = {k: after - before[k] for k, after in compile_counters().items()}
    if fell_back := fallbacks(row["compile"], compile_, graph):
        row.update(fell_back=fell_back, status="fell back")
    return row


def latency_tasks(models: Models, args: argparse.Namespace) -> list[Task]:
    """The latency table's rows, most telling first: teacher, the preset's best candidates, then the rest."""
    torch_backend, trt_backend = "torch", "tensorrt"
    plan = [("teacher vitl", "teacher:vitl", torch_backend, "eager", "fp16", 60),
            (PRESET, PRESET, torch_backend, "eager", "fp16", 30),
            (PRESET, PRESET, torch_backend, "compiled+graph", "fp16", 150),
            (PRESET, PRESET, trt_backend, ENGINE_MODE, "fp16", 240)]
    if not args.quick:
        plan += [(PRESET, PRESET, torch_backend, mode, precision, 150 if MODES[mode][0] else 30)
                 for precision in PRECISIONS for mode in MODES
                 if (mode, precision) not in (("eager", "fp16"), ("compiled+graph", "fp16"))]
        student_dir = args.student or newest_quickstart_student()
        if student_dir is not None:
            name = f"quick-start student ({student_dir})"
            plan += [(name, str(student_dir), torch_backend, mode, "bf16", 30 if mode == "eager" else 120)
                     for mode in ("eager", "compiled+graph")]
        else:
            print("no quick-start student given or found under runs/: its rows are left out")
    return [Task("rows", {"model": name, "backend": backend, "mode": mode, "precision": precision,
                          "height": args.height, "width": args.width}, estimate,
                 lambda n=name, s=spec, b=backend, m=mode, p=precision: latency_row(models, n, s, b, m, p, args))
            for name, spec, backend, mode, precision, estimate in plan]


def fallbacks(counts: dict[str, int], compiled: bool, graphed: bool) -> list[str]:
    """Why a row did not run as its mode says, from the compile counters' change over its measurement."""
    reasons = []
    if compiled and counts.get("recompile_limit_hits", 0):
        reasons.append(f"{counts['recompile_limit_hits']} frame(s) hit the recompile limit and ran eagerly")
    if compiled and counts.get("graph_breaks", 0):
        reasons.append(f"{counts['graph_breaks']} graph break(s): parts ran eagerly between graphs")
    if compiled and graphed and counts.get("cudagraph_skips", 0):
        reasons.append(f"CUDA graphs skipped {counts['cudagraph_skips']} time(s): replayed without graphs")
    return reasons


def markdown(result: dict) -> str:
    """The result as a Markdown report."""
    env = result["environment"]
    state = "" if result.get("finished", True) else " (unfinished: the rows done so far)"
    budget = f" of a {result['budget_s']:.0f} s budget" if "budget_s" in result else ""
    lines = [f"# GPU check: {env.get('gpu')}", "", f"`{result['command']}`, {result['seconds']:.0f} s{budget}{state}.",
             ""]
    if result.get("checks"):
        lines += ["## The GPU items", "", "| item | check | status | result | s |", "|---|---|---|---|---|"]
        for r in result["checks"]:
            lines.append(f"| {r['item']} | {r['check']} | {r['status']} | {r.get('summary', '')} | "
                         f"{r.get('seconds', '')} |")
        lines.append("")
    lines += ["## Latency", "", f"{result['height']}x{result['width']}, batch 1, random weights, CUDA-event timing "
              "(median of repeats).", "",
              "| model | params (M) | GMACs | iters | backend | mode | precision | median ms | p10 | p90 | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cost = result["costs"].get(r["model"], {})
        timing = (f"{r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {r['peak_mem_gib']}"
                  if "median_ms" in r else f"{r.get('status') or r.get('error', '')} | | |")
        mode = f"{r['mode']} (fell back: {'; '.join(r['fell_back'])})" if r.get("fell_back") else r["mode"]
        lines.append(f"| {r['model']} | {cost.get('params_m', '')} | {cost.get('gmacs', '')} | {r.get('iters', '')} | "
                     f"{r.get('backend', 'torch')} | {mode} | {r['precision']} | {timing} |")
    lines += ["", "Reference (H200, official code, eager): teacher 340 ms (fp16, 32 iterations), Fast-FoundationStereo "
              "code 47.7 ms (bf16, 8 iterations). Goal: the preset under 8 ms.", ""]
    best = min((r for r in result["rows"] if r["model"] == PRESET and "median_ms" in r),
               key=lambda r: r["median_ms"], default=None)
    if best:
        verdict = "met" if best["median_ms"] < REFERENCE_MS["goal_preset"] else "not met"
        lines.append(f"Best preset row: {best['median_ms']:.2f} ms ({best.get('backend', 'torch')}, {best['mode']}, "
                     f"{best['precision']}): goal {verdict}.")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the GPU check, writing JSON + Markdown after every row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--student", type=Path, default=None, help="a trained student directory (default: newest "
                        "runs/quickstart-*/final/student)")
    parser.add_argument("--quick", action="store_true", help="the items, then the teacher and the preset in two "
                        "modes and as a TensorRT engine only")
    parser.add_argument("--students", type=int, default=10, help="students compiled in sequence (item 2)")
    parser.add_argument("--sequence-backend", default="eager", help="torch.compile backend of the sequence "
                        "(inductor compiles each for real: about 30 s a student)")
    parser.add_argument("--part", choices=PARTS, default="all", help="the items, the latency table or both (a "
                        "second call runs the part the budget left out)")
    parser.add_argument("--budget-s", type=_positive, default=DEFAULT_BUDGET_S,
                        help="seconds the rows may take; later rows are not run, a running one is stopped")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2

    quiet_third_party()
    env = environment()
    print(f"GPU check on {env['gpu']} (driver {env.get('driver')}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"TensorRT {env['tensorrt']}); budget {args.budget_s:.0f} s", flush=True)
    torch.backends.cudnn.benchmark = True
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "environment": env, "height": args.height, "width": args.width,
              "budget_s": args.budget_s, "finished": False, "reference_ms": REFERENCE_MS, "costs": {},
              "checks": [], "rows": [], "seconds": 0.0}
    slug = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    stem = args.out / f"gpu-{slug}{'' if args.part == 'all' else '-' + args.part}{'-quick' if args.quick else ''}"
    with tempfile.TemporaryDirectory(prefix="ffsc-gpu-") as tmp:
        # Every TensorRT build of this run shares one timing cache of its own: the user's cache is left alone.
        with environment_variable(TIMING_CACHE_ENV, str(Path(tmp) / "timing")):
            checks = Checks(Path(tmp), torch.device("cuda", torch.cuda.current_device()), args.height, args.width,
                            args.warmup, args.repeats, args.students, args.sequence_backend)
            runner = Runner(result, stem, args.budget_s, markdown)
            runner.write()
            items = checks.tasks() if args.part in ("all", "items") else []
            table = latency_tasks(Models(args.height, args.width, result["costs"]), args) \
                if args.part in ("all", "latency") else []
            runner.run(items + table)
            result["finished"] = True
            runner.write()
    print(f"wrote {stem}.json and .md ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
