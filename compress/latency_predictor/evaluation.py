"""How well a latency table predicts direct measurements of whole students, and the search's check of it."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from compress.errors import ConfigError
from compress.latency import measure
from compress.latency_config import LatencyConfig
from compress.latency_predictor.table import LatencyTable
from compress.terminal import progress_bar
from search_spaces import SearchSpace, StudentConfig, build_student


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
    # optuna takes about 0.2 s to import and only the predictor's evaluation samples with it
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


def check_predictor(table: LatencyTable, space: SearchSpace, lat: LatencyConfig, height: int, width: int,
                    seed: int = 0, progress: bool = True) -> PredictorEvaluation | None:
    """Predicted against measured latency of lat.check_students students of the space (None when 0 are asked)."""
    students, timing = lat.predictor_config().check_students, lat.timing_config()
    if students < 1:
        return None
    # Whole students are timed as the run deploys them (compiled, CUDA graphs), so the calibration scale maps
    # eager block sums onto that.
    return evaluate_predictor(space, students, height, width, table, seed=seed, warmup=timing.warmup,
                              repeats=timing.repeats, progress=progress, compile=timing.compile,
                              cuda_graph=timing.cuda_graph)
