"""Per-block latency lookup tables for students: measure each block variant once, predict any config by a sum.

A StudentStereo forward (test mode) is seven blocks run in order::

    feature      EdgeNeXt pyramid of both views + the 1/2-resolution stem   (backbone widths/depths, feature_dim)
    volume       group-wise + concatenation cost volume, its 3-D stem and feature attention
    hourglass    the cost-filtering hourglass (levels, widths, APC kernel, disparity transformer)
    classifier   3-D classifier, softmax and soft-argmin: the initial disparity
    context      context features and attention, and the geometry-lookup pyramids (all-pairs correlation)
    gru_iteration  one geometry lookup + selective ConvGRU update          (run ``iters`` times)
    upsampler    convex upsampling of the last disparity to full resolution

Each block is a thin module calling the student's own stage methods (:class:`teacher.stages.StereoStages`),
and :func:`run_blocks` composes them as the model's forward does, so the predictor times what the model runs.
Each block's latency depends only on a few config fields (its *variant*) and the image size. A
:class:`LatencyTable` measures every variant in isolation on the target backend (ONNX Runtime, PyTorch or
TensorRT, exported and timed like whole models are) and caches the numbers in a JSON file keyed by block,
fields, image shape, backend and device. ``predict(cfg)`` sums the blocks (the GRU iteration times
``iters``) minus the per-call overhead counted once per extra block call; :func:`evaluate_predictor`
compares predictions with direct :func:`compress.latency.measure` of whole models.

One module over the ~500-line guide: the seven block wrappers, the variant keys, the table (storage, measuring,
prediction) and the predictor's evaluation all speak the same block decomposition; split apart, each would
re-derive it. The evaluation is the first candidate to move out if it grows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.atomic import atomic_write_text
from compress.errors import ConfigError
from compress.export.onnx_export import check_image_size, fp32_node_patterns
from compress.latency import (
    AUTOCAST_DTYPES,
    BACKENDS,
    PRECISIONS,
    LatencyConfig,
    check_clock,
    device_name,
    machine_info,
    time_calls,
)
from search_spaces import SearchSpace, StudentConfig, build_student
from teacher.features import normalize_image
from teacher.geometry import GeometryEncoding
from teacher.stages import StereoStages, use_precision

BLOCKS: tuple[str, ...] = ("feature", "volume", "hourglass", "classifier", "context", "gru_iteration", "upsampler")
"""The blocks of a student forward, in execution order."""
OVERHEAD = "call_overhead"
"""Pseudo-block: one call of a trivial graph, the fixed cost every separately timed block pays."""
TABLE_FORMAT = "ffsc-latency-table/1"

# StudentConfig fields each block's effective fields are computed from (for enumerating a space).
_BLOCK_INPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "feature": ("backbone", "backbone_dims", "backbone_depths", "backbone_heads", "feature_dim"),
    "volume": ("volume_scale", "max_disp", "cv_groups", "concat_dim", "volume_dim", "stem_blocks", "feature_dim",
               "backbone_dims"),
    "hourglass": ("volume_scale", "max_disp", "volume_dim", "hourglass_levels", "hourglass_widths", "apc_kernel",
                  "agg_blocks", "transformer_layers", "transformer_heads", "feature_dim", "backbone_dims"),
    "classifier": ("volume_scale", "max_disp", "volume_dim"),
    "context": ("volume_scale", "max_disp", "volume_dim", "gru_levels", "hidden_dim", "corr_levels", "feature_dim",
                "backbone_dims"),
    "gru_iteration": ("volume_scale", "max_disp", "volume_dim", "gru_levels", "hidden_dim", "motion_dim",
                      "motion_corr_dim", "motion_disp_dim", "head_blocks", "corr_levels", "corr_radius"),
    "upsampler": ("volume_scale",),
}
# Fields a search space's repairs tie together (see search_spaces.space): enumerated jointly.
_COUPLED = ("volume_scale", "hourglass_levels", "hourglass_widths", "volume_dim", "gru_levels")


# ------------------------------------------------------------------------------------------ block variants


def pyramid_widths(cfg: StudentConfig) -> list[int]:
    """Channel widths of the student's feature pyramid at 1/4, 1/8, 1/16, 1/32."""
    if cfg.backbone == "edgenext":
        c = cfg.backbone_dims
        return [cfg.feature_dim, 2 * c[1], 2 * c[2], c[3]]
    with torch.device("meta"):
        return list(build_student(cfg.replace(layer_shapes={})).feature.d_out)


def block_fields(cfg: StudentConfig, block: str) -> dict:
    """The effective parameters a block's structure (hence latency) depends on, for one config."""
    if cfg.layer_shapes:
        raise ConfigError(f"{cfg.name} has pruned layer widths; latency tables cover search-space configs, time "
                          "pruned students directly with compress.latency.measure")
    d = pyramid_widths(cfg)
    base = 0 if cfg.volume_scale == 4 else 1
    common = {"volume_scale": cfg.volume_scale, "mixed_precision": cfg.mixed_precision}
    if block == "feature":
        return {"mixed_precision": cfg.mixed_precision, "backbone": cfg.backbone, "backbone_dims": cfg.backbone_dims,
                "backbone_depths": cfg.backbone_depths, "backbone_heads": cfg.backbone_heads,
                "feature_dim": cfg.feature_dim}
    if block == "volume":
        return {**common, "max_disp": cfg.max_disp, "cv_groups": cfg.cv_groups, "concat_dim": cfg.concat_dim,
                "volume_dim": cfg.volume_dim, "stem_blocks": cfg.stem_blocks, "feature_width": d[base]}
    if block == "hourglass":
        att = {"transformer_layers": cfg.transformer_layers}
        if cfg.transformer_layers:
            att["transformer_heads"] = cfg.transformer_heads
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim,
                "hourglass_widths": cfg.hourglass_widths, "apc_kernel": cfg.apc_kernel, "agg_blocks": cfg.agg_blocks,
                **att, "feature_widths": d[base: base + cfg.hourglass_levels + 1]}
    if block == "classifier":
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim}
    if block == "context":
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim, "gru_levels": cfg.gru_levels,
                "hidden_dim": cfg.hidden_dim, "corr_levels": cfg.corr_levels,
                "feature_widths": d[base: base + cfg.gru_levels]}
    if block == "gru_iteration":
        return {**common, "max_disp": cfg.max_disp, "volume_dim": cfg.volume_dim, "gru_levels": cfg.gru_levels,
                "hidden_dim": cfg.hidden_dim, "motion_dim": cfg.motion_dim, "motion_corr_dim": cfg.motion_corr_dim,
                "motion_disp_dim": cfg.motion_disp_dim, "head_blocks": cfg.head_blocks,
                "corr_levels": cfg.corr_levels, "corr_radius": cfg.corr_radius}
    if block == "upsampler":
        return common
    raise ConfigError(f"unknown block {block!r}; blocks: {', '.join(BLOCKS)}")


@dataclass(frozen=True)
class BlockVariant:
    """One block with its effective fields at one image shape: the unit a latency table stores."""

    block: str
    fields: dict
    image_shape: tuple[int, int, int, int]

    def identity(self) -> str:
        """Canonical JSON of block, fields and shape (hashable, backend-independent)."""
        return json.dumps({"block": self.block, "fields": self.fields, "image": list(self.image_shape)},
                          sort_keys=True)


def block_variants(cfg: StudentConfig, height: int, width: int, batch: int = 1) -> list[BlockVariant]:
    """The seven block variants a config runs at an image size, in execution order."""
    check_image_size(height, width)
    return [BlockVariant(b, block_fields(cfg, b), (batch, 3, height, width)) for b in BLOCKS]


def space_block_variants(
    space: SearchSpace, height: int, width: int, batch: int = 1
) -> dict[str, tuple[BlockVariant, StudentConfig]]:
    """Every distinct block variant a search space can produce, each with a config that contains it.

    Per block, only the dimensions that feed its fields are enumerated (with the coupled dimensions the
    space's repairs tie together); the others stay at their first value.
    """
    found: dict[str, tuple[BlockVariant, StudentConfig]] = {}
    first = {d.name: d.values()[0] for d in space.dimensions}
    for block in BLOCKS:
        inputs = set(_BLOCK_INPUT_FIELDS[block])
        if inputs & set(_COUPLED):
            inputs |= set(_COUPLED)
        dims = [d for d in space.dimensions if d.name in inputs]
        for combo in itertools.product(*(d.values() for d in dims)):
            values = {**first, **{d.name: v for d, v in zip(dims, combo, strict=True)}}
            try:
                cfg = space.config_from_values(values)
            except ConfigError:
                continue  # an invalid combination the space never samples
            variant = BlockVariant(block, block_fields(cfg, block), (batch, 3, height, width))
            found.setdefault(variant.identity(), (variant, cfg))
    return found


# ------------------------------------------------------------------------------------------ block modules


class _Block(nn.Module):
    """One stage of a student, timed on its own: a thin module calling the student's own stage method."""

    def __init__(self, student: StereoStages) -> None:
        super().__init__()
        self.model = student


class FeatureBlock(_Block):
    """(left, right) -> left pyramid, right pyramid (finest first) and the left 1/2 stem feature."""

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats_l, feats_r, _, stem_2x = self.model.encode(normalize_image(left), normalize_image(right))
        return (*feats_l, *feats_r, stem_2x)


class VolumeBlock(_Block):
    """(left, right features at the volume resolution) -> the stemmed, feature-gated cost volume."""

    def forward(self, fl: torch.Tensor, fr: torch.Tensor) -> torch.Tensor:
        return self.model.build_volume(fl, fr)[1]


class HourglassBlock(_Block):
    """(volume, left features from the volume resolution down) -> filtered volume."""

    def forward(self, vol: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        return self.model.filter_volume(vol, list(feats))


class ClassifierBlock(_Block):
    """filtered volume -> initial disparity (soft-argmin)."""

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        return self.model.initial_disparity(vol)[1]


class ContextBlock(_Block):
    """(filtered volume, left/right volume features, left pyramid) -> GRU states, attention, lookup pyramids."""

    def forward(self, vol: torch.Tensor, fl: torch.Tensor, fr: torch.Tensor, *feats_l: torch.Tensor):
        net, inp, att = self.model.context(list(feats_l))
        geo = self.model.geometry(fl, fr, vol)
        return (*net, *inp, *att, *geo.volume_pyramid, *geo.corr_pyramid)


class GruIterationBlock(_Block):
    """(disparity, GRU states, context, attention, lookup pyramids) -> new disparity, states, mask feature."""

    def forward(self, disp: torch.Tensor, *state: torch.Tensor):
        n, c = self.model.update_block.n_levels, self.model.cfg.corr_levels
        net, inp, att = list(state[:n]), list(state[n: 2 * n]), list(state[2 * n: 3 * n])
        pyramids = state[3 * n:]
        geo = GeometryEncoding(pyramids[:c], pyramids[c:], self.model.cfg.corr_radius)
        disp, net, mask_feat = self.model.refine_step(geo, disp, net, inp, att)
        return (disp, *net, mask_feat)


class UpsamplerBlock(_Block):
    """(low-resolution disparity, mask feature, stem feature) -> full-resolution disparity."""

    def forward(self, disp: torch.Tensor, mask_feat: torch.Tensor, stem_2x: torch.Tensor) -> torch.Tensor:
        return self.model.upsample(disp, mask_feat, stem_2x)


class _Overhead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


_BLOCK_CLASSES = {"feature": FeatureBlock, "volume": VolumeBlock, "hourglass": HourglassBlock,
                  "classifier": ClassifierBlock, "context": ContextBlock, "gru_iteration": GruIterationBlock,
                  "upsampler": UpsamplerBlock}


def student_blocks(student: nn.Module) -> dict[str, nn.Module]:
    """The seven blocks of a StudentStereo, sharing its weights."""
    return {name: cls(student) for name, cls in _BLOCK_CLASSES.items()}


@torch.no_grad()
def run_blocks(
    blocks: dict[str, nn.Module], left: torch.Tensor, right: torch.Tensor, iters: int
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """Run the blocks in the order the model's ``run`` composes its stages (test mode); returns the disparity
    and each block's inputs (its last call's, for the GRU iteration)."""
    model = blocks["feature"].model
    inputs: dict[str, tuple[torch.Tensor, ...]] = {"feature": (left, right)}
    *pyramids, stem_2x = blocks["feature"](left, right)
    feats_l, feats_r = pyramids[: len(pyramids) // 2], pyramids[len(pyramids) // 2:]
    fl, fr = feats_l[model.base], feats_r[model.base]
    inputs["volume"] = (fl, fr)
    inputs["hourglass"] = (blocks["volume"](fl, fr), *feats_l[model.base:])
    vol = blocks["hourglass"](*inputs["hourglass"])
    inputs["classifier"] = (vol,)
    disp = blocks["classifier"](vol).float()
    inputs["context"] = (vol, fl, fr, *feats_l)
    state, n = blocks["context"](*inputs["context"]), model.update_block.n_levels
    net, rest = list(state[:n]), state[n:]
    mask_feat = None
    for _ in range(iters):
        inputs["gru_iteration"] = (disp, *net, *rest)
        disp, *net, mask_feat = blocks["gru_iteration"](*inputs["gru_iteration"])
    inputs["upsampler"] = (disp, mask_feat, stem_2x)
    return blocks["upsampler"](*inputs["upsampler"]), inputs


# -------------------------------------------------------------------------------------------------- timing


@dataclass
class BlockTiming:
    """Latency of one block variant (one call) in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def _summary(times: list[float]) -> BlockTiming:
    arr = np.asarray(times, dtype=np.float64)
    return BlockTiming(float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)),
                       len(times))


def _export_block(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> list[str]:
    """ONNX of a block (TorchScript exporter + onnxslim, as to_onnx exports whole models); its input names."""
    import warnings

    import onnx
    import onnxslim

    names = [f"x{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape-dependent Python values are expected here
        with torch.no_grad():  # no saved activations while tracing
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17, input_names=names,
                              do_constant_folding=True)
    proto = onnxslim.slim(onnx.load(str(path)))
    onnx.save_model(proto, str(path))
    return [i.name for i in proto.graph.input]


def time_module(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    backend: str,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    clock: str = "wall",
) -> BlockTiming:
    """Latency of ``module(*inputs)`` on a backend, timed as compress.latency.measure times whole models."""
    from compress.export.runtime import make_session

    device = torch.device(device)
    check_clock(clock, device, torch.get_num_threads() if backend == "torch" else threads)
    inputs = tuple(t.to(device) for t in inputs)
    module = module.to(device).eval()
    if backend == "torch":
        autocast = dict(dtype=AUTOCAST_DTYPES.get(precision, torch.float32), enabled=precision in AUTOCAST_DTYPES)

        def step() -> object:
            with torch.inference_mode(), torch.autocast(device.type, **autocast):
                return module(*inputs)

        with use_precision(module, precision):  # the block's stages run at the precision timed, as in measure()
            return _summary(time_calls(step, device, warmup, repeats, events=True, clock=clock))
    with tempfile.TemporaryDirectory(prefix="ffsc-block-") as tmp:
        path = Path(tmp) / "block.onnx"
        present = set(_export_block(module, inputs, path))
        feeds = {f"x{i}": t for i, t in enumerate(inputs) if f"x{i}" in present}
        keep = tuple(fp32_node_patterns(module))
        if backend == "onnxruntime":
            if precision == "bf16":
                raise ConfigError("the onnxruntime backend supports precision 'fp32' or 'fp16'")
            if precision == "fp16":
                from compress.export.fp16 import cast_onnx_fp16

                path = cast_onnx_fp16(path, Path(tmp) / "block_fp16.onnx", keep_fp32_nodes=keep).path
            session = make_session(path, device, intra_op_threads=threads, require_device=True)
            if device.type == "cpu":
                arrays = {k: v.cpu().numpy() for k, v in feeds.items()}
                return _summary(time_calls(lambda: session.run(None, arrays), device, warmup, repeats, events=False,
                                           clock=clock))
            binding = session.io_binding()
            for name, tensor in feeds.items():
                t = tensor.contiguous()
                feeds[name] = t
                binding.bind_input(name, "cuda", device.index or 0, np.float32, list(t.shape), t.data_ptr())
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda", device.index or 0)
            return _summary(time_calls(lambda: session.run_with_iobinding(binding), device, warmup, repeats,
                                  events=False))
        if backend == "tensorrt":
            from compress.export.engine import build_engine
            from compress.export.trt_runner import TensorRTRunner

            engine = Path(tmp) / "block.engine"
            build_engine(path, engine, precision=precision, cache=False, keep_fp32_nodes=keep, device=device)
            runner = TensorRTRunner(engine, device=device)
            buffers = runner.bind({name: tuple(t.shape) for name, t in feeds.items()})
            for name, t in feeds.items():
                buffers[name].copy_(t)
            torch.cuda.synchronize(device)
            return _summary(time_calls(runner.execute, device, warmup, repeats, events=True, stream=runner.stream))
    raise ConfigError(f"unknown latency backend '{backend}'; valid backends: {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------------------------------- table


@dataclass
class TableEntry:
    """A stored measurement: the variant, where it was measured, and its latency."""

    block: str
    fields: dict
    image_shape: list[int]
    backend: str
    device: str
    precision: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    input_shapes: list[list[int]] = field(default_factory=list)
    clock: str = "wall"


def _read_entries(path: Path) -> dict[str, TableEntry]:
    """The entries of a table file, with a clear error for anything else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"latency table {path} is not readable JSON ({err}); delete it to rebuild") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ConfigError(f"{path} is not an ffsc latency table (format {TABLE_FORMAT})")
    try:
        return {k: TableEntry(**v) for k, v in data.get("entries", {}).items()}
    except TypeError as err:
        raise ConfigError(f"latency table {path} has malformed entries ({err}); delete it to rebuild") from None


class LatencyTable:
    """Block latencies on one backend/device/precision, cached in a JSON file (several tables may share one).

    ``device`` is where blocks run ("cpu", "cuda"); entries are keyed by the hardware's name, so a file
    copied to another machine does not serve its numbers there. ``clock="thread"`` times single-threaded
    CPU runs by thread CPU time (see compress.latency.measure), steadier on cores shared with other work.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        backend: str = "onnxruntime",
        device: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        warmup: int = 3,
        repeats: int = 15,
        clock: str = "wall",
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown latency backend '{backend}'; valid backends: {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
        if warmup < 0 or repeats < 1:
            raise ConfigError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
        self.path = Path(path) if path is not None else None
        self.backend, self.precision, self.threads = backend, precision, threads
        self.device = torch.device(device)
        self.warmup, self.repeats = warmup, repeats
        if backend == "torch" and self.device.type == "cpu":
            self.threads = torch.get_num_threads()  # torch times with its current setting; name it in the key
        check_clock(clock, self.device, self.threads)
        self.clock = clock
        self.hardware = device_name(self.device, self.threads)
        self.entries: dict[str, TableEntry] = {}
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    # --- storage -------------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        self.entries = _read_entries(path)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write every entry (all backends/devices held) to JSON atomically; returns the path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("no path to save the latency table to; pass one")
        if target.is_file():  # runs sharing the file keep each other's entries (theirs first, ours win)
            self.entries = {**_read_entries(target), **self.entries}
        data = {"format": TABLE_FORMAT, "machine": machine_info(),
                "entries": {k: asdict(v) for k, v in sorted(self.entries.items())}}
        atomic_write_text(target, json.dumps(data, indent=1, sort_keys=True) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, **settings) -> LatencyTable:
        """A table reading (and later saving to) an existing file; settings as for the constructor."""
        if not Path(path).is_file():
            raise ConfigError(f"latency table {path} does not exist")
        return cls(path, **settings)

    def __len__(self) -> int:
        return sum(1 for e in self.entries.values() if self._mine(e))

    def _mine(self, entry: TableEntry) -> bool:
        mine = (self.backend, self.hardware, self.precision, self.clock)
        return (entry.backend, entry.device, entry.precision, entry.clock) == mine

    # --- keys ----------------------------------------------------------------------------------------
    def key(self, variant: BlockVariant) -> str:
        """Cache key: block, fields, image shape, backend, device (hardware name) and precision."""
        payload = {"variant": json.loads(variant.identity()), "backend": self.backend, "device": self.hardware,
                   "precision": self.precision}
        if self.clock != "wall":
            payload["clock"] = self.clock
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def _overhead_variant(self, batch: int = 1) -> BlockVariant:
        return BlockVariant(OVERHEAD, {}, (batch, 1, 8, 8))

    def overhead_ms(self, batch: int = 1) -> float:
        """The stored per-call overhead (0 when not measured yet)."""
        return self.lookup(self._overhead_variant(batch)) or 0.0

    def lookup(self, variant: BlockVariant) -> float | None:
        """Stored median milliseconds of a variant, or None."""
        entry = self.entries.get(self.key(variant))
        return None if entry is None else entry.median_ms

    def missing(self, cfg: StudentConfig, height: int, width: int, batch: int = 1) -> list[BlockVariant]:
        """The config's block variants not yet in the table."""
        return [v for v in block_variants(cfg, height, width, batch) if self.lookup(v) is None]

    # --- measuring -----------------------------------------------------------------------------------
    def _store(self, variant: BlockVariant, timing: BlockTiming, input_shapes: list[list[int]]) -> None:
        self.entries[self.key(variant)] = TableEntry(
            block=variant.block, fields=variant.fields, image_shape=list(variant.image_shape), backend=self.backend,
            device=self.hardware, precision=self.precision, median_ms=timing.median_ms, p10_ms=timing.p10_ms,
            p90_ms=timing.p90_ms, repeats=timing.repeats, input_shapes=input_shapes, clock=self.clock)

    def _time(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> BlockTiming:
        return time_module(module, inputs, self.backend, self.device, self.precision, self.warmup, self.repeats,
                           self.threads, self.clock)

    def measure_overhead(self, batch: int = 1) -> float:
        """Measure (once) and return the per-call overhead of this backend."""
        variant = self._overhead_variant(batch)
        if (hit := self.lookup(variant)) is not None:
            return hit
        x = torch.zeros(variant.image_shape)
        self._store(variant, self._time(_Overhead(), (x,)), [list(x.shape)])
        return self.lookup(variant)

    def measure_config(
        self, cfg: StudentConfig, height: int, width: int, batch: int = 1, only: Iterable[str] | None = None,
        seed: int = 0,
    ) -> int:
        """Measure the config's block variants that the table lacks (or only the named blocks); returns how many."""
        wanted = {v.block: v for v in self.missing(cfg, height, width, batch)}
        if only is not None:
            wanted = {b: v for b, v in wanted.items() if b in set(only)}
        if not wanted:
            return 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            student = build_student(cfg).eval()
            left, right = (torch.rand(batch, 3, height, width) * 255.0 for _ in range(2))
        # One real forward gives every block realistic inputs (shapes and value ranges).
        _, inputs = run_blocks(student_blocks(student), left, right, iters=1)
        blocks = student_blocks(student)
        for name, variant in wanted.items():
            args = inputs[name]
            self._store(variant, self._time(blocks[name], args), [list(t.shape) for t in args])
        self.measure_overhead(batch)
        return len(wanted)

    def build(
        self,
        space: SearchSpace,
        height: int,
        width: int,
        batch: int = 1,
        configs: Iterable[StudentConfig] | None = None,
        progress: bool = True,
        save_every: int = 10,
    ) -> int:
        """Measure every block variant the space can produce (or those of the given configs) not yet stored.

        Saves to the table's path every ``save_every`` configs, so an interrupted build keeps its work.
        Returns the number of variants measured.
        """
        from compress.terminal import progress_bar

        if configs is None:
            todo = list(space_block_variants(space, height, width, batch).values())
        else:
            todo = [(v, cfg) for cfg in configs for v in block_variants(cfg, height, width, batch)]
        # Group the missing variants by the config that carries them: one student build per config.
        by_config: dict[str, tuple[StudentConfig, set[str]]] = {}
        seen: set[str] = set()
        for variant, cfg in todo:
            key = self.key(variant)
            if key in seen or key in self.entries:
                continue
            seen.add(key)
            by_config.setdefault(cfg.to_json(), (cfg, set()))[1].add(variant.block)
        measured = 0
        bar = progress_bar(by_config.values(), desc="latency table", unit="config", disable=not progress)
        for i, (cfg, blocks) in enumerate(bar, start=1):
            measured += self.measure_config(cfg, height, width, batch, only=blocks)
            if self.path is not None and i % save_every == 0:
                self.save()
        self.measure_overhead(batch)
        if self.path is not None:
            self.save()
        return measured

    # --- predicting ----------------------------------------------------------------------------------
    def breakdown(self, cfg: StudentConfig, height: int, width: int, iters: int | None = None,
                  batch: int = 1) -> dict[str, float]:
        """Per-block milliseconds of one forward (the GRU iteration multiplied by iters) and the overhead term."""
        iters = cfg.iters if iters is None else iters
        out: dict[str, float] = {}
        for variant in block_variants(cfg, height, width, batch):
            ms = self.lookup(variant)
            if ms is None:
                raise ConfigError(f"block {variant.block} of {cfg.name} ({variant.fields}) at "
                                  f"{height}x{width} is not in the latency table for {self.backend} on "
                                  f"{self.hardware}; measure it with table.measure_config(cfg, ...) or "
                                  "table.build(space, ...)")
            out[variant.block] = ms * (iters if variant.block == "gru_iteration" else 1)
        overhead = self.overhead_ms(batch)
        # Timed separately, each block paid one call overhead; the whole model pays it once.
        out[OVERHEAD] = -overhead * (len(BLOCKS) - 2 + iters)
        return out

    def predict(self, cfg: StudentConfig, height: int, width: int, iters: int | None = None, batch: int = 1,
                measure_missing: bool = False) -> float:
        """Predicted milliseconds of one forward of cfg (iters GRU iterations, default cfg.iters)."""
        if measure_missing:
            self.measure_config(cfg, height, width, batch)
        return max(sum(self.breakdown(cfg, height, width, iters, batch).values()), 0.0)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class PredictorRow:
    """One evaluated student: its config, predicted and measured latency."""

    config: dict
    predicted_ms: float
    measured_ms: float
    measured_p10_ms: float
    measured_p90_ms: float
    breakdown: dict[str, float]
    remeasured_ms: float | None = None
    """A second measurement of the same model, taken after all first ones (evaluate_predictor(remeasure=True))."""

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


@dataclass
class PredictorEvaluation:
    """How well a latency table predicts direct measurements of whole models."""

    rows: list[PredictorRow]
    backend: str
    device: str
    precision: str
    height: int
    width: int
    clock: str = "wall"

    @property
    def abs_relative_errors(self) -> list[float]:
        """|relative error| per student."""
        return [abs(r.relative_error) for r in self.rows]

    @property
    def median_abs_relative_error(self) -> float:
        """Median |predicted - measured| / measured."""
        return float(statistics.median(self.abs_relative_errors))

    @property
    def mean_abs_relative_error(self) -> float:
        """Mean |predicted - measured| / measured."""
        return float(statistics.fmean(self.abs_relative_errors))

    @property
    def median_abs_remeasure_error(self) -> float | None:
        """Median |remeasured - measured| / measured: how well one measurement predicts another (the noise
        floor of the predictor's error on this machine); None without remeasurements."""
        pairs = [(r.remeasured_ms, r.measured_ms) for r in self.rows if r.remeasured_ms is not None]
        return float(statistics.median(abs(a - b) / b for a, b in pairs)) if pairs else None

    @property
    def scale(self) -> float:
        """Median measured / predicted: the factor that removes the table's systematic bias here (blocks timed
        alone pay per-call costs that a whole model amortises)."""
        return calibration_scale([(r.predicted_ms, r.measured_ms) for r in self.rows])

    def to_dict(self) -> dict:
        """JSON-ready summary and rows."""
        return {"backend": self.backend, "device": self.device, "precision": self.precision, "clock": self.clock,
                "height": self.height, "width": self.width, "n": len(self.rows), "scale": self.scale,
                "median_abs_relative_error": self.median_abs_relative_error,
                "mean_abs_relative_error": self.mean_abs_relative_error,
                "max_abs_relative_error": max(self.abs_relative_errors),
                "median_abs_remeasure_error": self.median_abs_remeasure_error,
                "rows": [{**asdict(r), "relative_error": r.relative_error} for r in self.rows]}


def calibration_scale(pairs: Iterable[tuple[float, float]]) -> float:
    """Median measured / predicted over (predicted_ms, measured_ms) pairs (1.0 when there are none)."""
    ratios = [measured / predicted for predicted, measured in pairs if predicted > 0]
    return float(statistics.median(ratios)) if ratios else 1.0


def sample_configs(space: SearchSpace, n: int, seed: int = 0) -> list[StudentConfig]:
    """n distinct configs drawn at random from a space (Optuna's RandomSampler, as NAS trials draw them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs: dict[str, StudentConfig] = {}
    for _ in range(50 * n):
        if len(configs) == n:
            break
        trial = study.ask()
        cfg = space.sample(trial)
        study.tell(trial, 0.0)
        configs.setdefault(cfg.to_json(), cfg.replace(name=f"{space.name}-{len(configs)}"))
    if len(configs) < n:
        raise ConfigError(f"search space {space.name} gave only {len(configs)} distinct configs; ask for fewer")
    return list(configs.values())


def evaluate_predictor(
    space: SearchSpace,
    n: int,
    height: int,
    width: int,
    table: LatencyTable,
    seed: int = 0,
    warmup: int = 3,
    repeats: int = 15,
    progress: bool = True,
    configs: list[StudentConfig] | None = None,
    remeasure: bool = False,
    compile: bool = False,
    cuda_graph: bool = False,
) -> PredictorEvaluation:
    """Predict n sampled students of a space with the table (measuring missing blocks) and compare with
    direct measure() of each whole model on the table's backend/device/precision.

    remeasure=True measures every model a second time after all first measurements, which tells how much
    two measurements of one model disagree here (the error floor no predictor can beat on this machine).
    """
    from compress.latency import measure
    from compress.terminal import progress_bar

    def whole(cfg: StudentConfig):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_student(cfg).eval().to(table.device)
        return measure(model, table.backend, height, width, iters=cfg.iters, warmup=warmup, repeats=repeats,
                       device=table.device, precision=table.precision, intra_op_threads=table.threads,
                       clock=table.clock, compile=compile, cuda_graph=cuda_graph)

    configs = configs if configs is not None else sample_configs(space, n, seed)
    rows = []
    for cfg in progress_bar(configs, desc="predictor vs measure", unit="student", disable=not progress):
        table.measure_config(cfg, height, width)
        breakdown = table.breakdown(cfg, height, width)
        stats = whole(cfg)
        rows.append(PredictorRow(cfg.to_dict(), max(sum(breakdown.values()), 0.0), stats.median_ms, stats.p10_ms,
                                 stats.p90_ms, breakdown))
    if remeasure:
        for cfg, row in zip(progress_bar(configs, desc="remeasure", unit="student", disable=not progress), rows,
                            strict=True):
            row.remeasured_ms = whole(cfg).median_ms
    if table.path is not None:
        table.save()
    return PredictorEvaluation(rows, table.backend, table.hardware, table.precision, height, width, table.clock)


def default_table_path() -> Path:
    """The user's latency-table file ($FFSC_CACHE_DIR, else ~/.cache/ffsc): one per machine, shared by every run,
    since its entries are keyed by block, image size, backend, hardware, precision and clock."""
    root = Path(os.environ.get("FFSC_CACHE_DIR") or Path.home() / ".cache" / "ffsc")
    return root / "latency_table.json"


def open_table(lat: LatencyConfig) -> LatencyTable:
    """The per-block table for a (resolved) LatencyConfig, read from its file when it exists."""
    if lat.backend == "auto":
        raise ConfigError("resolve latency.backend 'auto' (LatencyConfig.resolved) before opening a table")
    device = lat.device or ("cuda" if lat.backend == "tensorrt" or torch.cuda.is_available() else "cpu")
    return LatencyTable(Path(lat.table) if lat.table else default_table_path(), backend=lat.backend, device=device,
                        precision=lat.precision, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats,
                        clock=lat.clock)


def predict_latency(table: LatencyTable, cfg: StudentConfig, height: int, width: int,
                    iters: int | None = None) -> float:
    """Predicted milliseconds of cfg, measuring (and saving) any block variant the table lacks first."""
    if table.measure_config(cfg, height, width) and table.path is not None:
        table.save()
    return table.predict(cfg, height, width, iters=iters)


def check_predictor(table: LatencyTable, space: SearchSpace, lat: LatencyConfig, height: int, width: int,
                    seed: int = 0, progress: bool = True) -> PredictorEvaluation | None:
    """Predicted against measured latency of lat.check_students students of the space (None when 0 are asked)."""
    if lat.check_students < 1:
        return None
    # Whole students are timed as the run deploys them (compiled, CUDA graphs), so the calibration scale maps
    # eager block sums onto that.
    return evaluate_predictor(space, lat.check_students, height, width, table, seed=seed, warmup=lat.warmup,
                              repeats=lat.repeats, progress=progress, compile=lat.compile, cuda_graph=lat.cuda_graph)
