"""TeacherRef: which teacher a recipe distils from, and at how many GRU iterations; the one ``teacher`` section of
every recipe (``ffsc run``/``ffsc nas``, ``ffsc distill``/``ffsc finetune``, ``ffsc prune``).

The official FoundationStereo checkpoint is ``checkpoint`` (its ``cfg.yaml`` beside it, or ``config``); without one,
``stand_in`` names what teaches instead, and ``train`` says how a stand-in trained in the run trains, in the words
of the stand-in recipe (``ffsc teacher train-standin``: ``StandInTraining`` is that recipe's base). A command
refuses, in one line, a setting it has no use for (``TeacherRef.check_for``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from compress.checks import require_at_least
from compress.errors import ConfigError
from compress.training import OptimConfig
from teacher import TeacherConfig

STAND_INS = ("shipped", "train", "random")
"""The stand-in keywords (anything else is a saved student folder): the shipped stand-in, one trained in the run,
a FoundationStereo of ``config`` with random weights (tests and smoke runs)."""


def standin_optim() -> OptimConfig:
    """How a stand-in teacher is optimised: AdamW on every parameter, torch's one-cycle schedule."""
    return OptimConfig(lr=1e-3, weight_decay=1e-5, schedule="one_cycle", warmup_steps=0, warmup_ratio=0.05,
                       decay_all=True, grad_clip=1.0)


@dataclass
class StandInTraining:
    """How a stand-in teacher trains on ground truth: the preset, its overrides, the steps, the batch and the
    optimiser. The keys of ``teacher.train`` in a run recipe and of the stand-in recipe alike."""

    WHERE: ClassVar[str] = "teacher.train."
    """The prefix its keys have in a recipe (for the messages)."""

    preset: str = "quickstart_teacher"
    """The search_spaces preset trained as the teacher."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the preset's StudentConfig to change."""
    steps: int = 300
    batch_size: int = 4
    optim: OptimConfig = field(default_factory=standin_optim)

    def __post_init__(self) -> None:
        why = "the stand-in teacher trains on ground truth"
        require_at_least(f"{self.WHERE}steps", self.steps, 1, why)
        require_at_least(f"{self.WHERE}batch_size", self.batch_size, 1, why)


@dataclass
class TeacherRef:
    """Which teacher: an official checkpoint, or without one a stand-in; and the GRU iterations it runs at."""

    checkpoint: str | None = None
    """The official FoundationStereo model_best_bp2.pth (cfg.yaml beside it); ``ffsc prune``: any model a
    ``--model`` names (a saved student or pruned-teacher folder, a checkpoint, preset:NAME)."""
    config: Any = None
    """The checkpoint's architecture when its cfg.yaml is not beside it: a cfg.yaml path, or TeacherConfig fields
    (also the architecture of ``stand_in: random``); None = the cfg.yaml beside the checkpoint."""
    trust_checkpoint: bool = False
    """Read a pickled checkpoint (only one you trust: unpickling runs code)."""
    iters: int | None = None
    """Teacher GRU iterations: the one count it labels, prunes against, is timed and is scored at; None = its own
    count (the official teacher's valid_iters)."""
    stand_in: str | None = None
    """Without a checkpoint: 'shipped' (the stand-in teacher in teacher/standin), 'train' (trained here on the
    training set's ground truth as ``train`` says), a saved student folder (e.g. from ``ffsc teacher
    train-standin``), or 'random' (random weights of ``config``, seeded by ``init_seed``); None = the command's
    default ('shipped' for ``ffsc run``; none for ``ffsc distill``; the unpruned model for ``ffsc prune``)."""
    init_seed: int = 0
    """The seed of the random weights of ``stand_in: random``."""
    train: StandInTraining | None = None
    """With ``stand_in: train``: how the stand-in trains (``ffsc run``/``ffsc nas`` only; None = the defaults)."""

    def __post_init__(self) -> None:
        if self.stand_in is not None and not self.stand_in:
            raise ConfigError("teacher.stand_in: got an empty value, expected 'shipped', 'train', 'random' or a saved "
                              "student folder")
        if self.iters is not None:
            require_at_least("teacher.iters", self.iters, 1)
        if isinstance(self.config, Mapping):
            self.config = dict(self.config) or None
        if self.config is not None and not isinstance(self.config, str | dict):
            raise ConfigError(f"teacher.config: got {self.config!r}, expected a cfg.yaml path or a mapping of "
                              "TeacherConfig fields")

    def architecture(self) -> TeacherConfig | str | None:
        """``config`` as ``teacher.load_teacher`` takes it: a TeacherConfig (from fields), a cfg.yaml path or None."""
        if not isinstance(self.config, dict):
            return self.config
        try:
            return TeacherConfig(**self.config)
        except TypeError as exc:
            raise ConfigError(f"teacher.config {self.config}: {exc}") from None

    def check_for(self, command: str, stand_ins: tuple[str, ...], folders: bool = False) -> None:
        """One line when ``command`` has no use for a setting: a ``stand_in`` outside ``stand_ins`` (or a saved
        folder, unless ``folders``), or ``train`` settings where no stand-in trains."""
        if self.stand_in is not None and self.stand_in not in stand_ins and (self.stand_in in STAND_INS
                                                                            or not folders):
            kinds = [repr(s) for s in stand_ins] + (["a saved student folder"] if folders else [])
            raise ConfigError(f"teacher.stand_in={self.stand_in}: {command} takes "
                              f"{' or '.join(kinds) if kinds else 'no stand-in (set teacher.checkpoint)'}")
        if "train" not in stand_ins and self.train is not None:
            raise ConfigError(f"teacher.train: {command} trains no stand-in teacher; remove the section")
