"""Model-agnostic NAS machinery: Optuna storage, multi-objective studies with a latency budget, Pareto fronts.

Importing this package is cheap: Optuna, MLflow and matplotlib load only when a study runs or a plot is drawn.
"""

from compress.nas.pareto import (
    ParetoFront,
    TrialPoint,
    front_from_study,
    pareto_front,
    plot_front,
    write_front,
)
from compress.nas.spec import StudySpec, create_study
from compress.nas.storage import describe_storage, make_storage
from compress.nas.study import StudyResult, run_study
from compress.nas.workers import reap_dead_trials, trial_counts

__all__ = [
    "ParetoFront",
    "StudyResult",
    "StudySpec",
    "TrialPoint",
    "create_study",
    "describe_storage",
    "front_from_study",
    "make_storage",
    "pareto_front",
    "plot_front",
    "reap_dead_trials",
    "run_study",
    "trial_counts",
    "write_front",
]
