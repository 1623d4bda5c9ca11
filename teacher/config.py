"""TeacherConfig: the keys of an official FoundationStereo ``cfg.yaml`` that shape the model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import ConfigError
from compress.structured import dump_yaml, read_yaml

VIT_SIZES = ("vits", "vitb", "vitl", "vitt")
"""vits/vitb/vitl are the official DepthAnythingV2 sizes; vitt is a tiny ffsc-only size for tests and CPU runs."""


@dataclass
class TeacherConfig:
    """Construction and inference settings of FoundationStereo (official defaults: the 23-51-11 model)."""

    vit_size: str = "vitl"
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    n_gru_layers: int = 3
    n_downsample: int = 2
    corr_levels: int = 2
    corr_radius: int = 4
    max_disp: int = 416
    mixed_precision: bool = True
    low_memory: bool = False
    valid_iters: int = 32

    def __post_init__(self) -> None:
        if self.vit_size not in VIT_SIZES:
            raise ConfigError(f"vit_size: got {self.vit_size!r}, expected one of {', '.join(VIT_SIZES)}")
        self.hidden_dims = [int(h) for h in self.hidden_dims]
        if len(self.hidden_dims) != 3 or len(set(self.hidden_dims)) != 1 or self.hidden_dims[0] % 16:
            raise ConfigError(
                f"hidden_dims: got {self.hidden_dims}, expected three equal multiples of 16 (the official "
                "model shares one hidden width across its GRU levels; channel attention divides it by 16)"
            )
        if self.n_gru_layers not in (1, 2, 3):
            raise ConfigError(f"n_gru_layers: got {self.n_gru_layers}, expected 1, 2 or 3")
        if self.n_downsample != 2:
            raise ConfigError(
                f"n_downsample: got {self.n_downsample}, expected 2 (the cost volume and the ViT feature "
                "are built at 1/4 resolution)"
            )
        if self.corr_levels < 1 or self.corr_radius < 1:
            raise ConfigError(
                f"corr_levels/corr_radius: got {self.corr_levels}/{self.corr_radius}, expected both >= 1"
            )
        if self.max_disp % 32 != 0 or self.max_disp <= 0:
            raise ConfigError(
                f"max_disp: got {self.max_disp}, expected a positive multiple of 32 (the hourglass halves "
                "max_disp/4 three times)"
            )
        if self.valid_iters < 1:
            raise ConfigError(f"valid_iters: got {self.valid_iters}, expected >= 1")
        self.low_memory = bool(self.low_memory)
        self.mixed_precision = bool(self.mixed_precision)

    @property
    def iters(self) -> int:
        """GRU iterations at inference: every model of the family answers ``cfg.iters`` (here ``valid_iters``)."""
        return self.valid_iters

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherConfig:
        """Build from a mapping, ignoring keys that do not shape the model (as the official loader does)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        kwargs.setdefault("vit_size", "vitl")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TeacherConfig:
        """Read an official ``cfg.yaml``; a missing ``vit_size`` means ``vitl``, as the official demo does."""
        return cls.from_dict(read_yaml(path, "teacher config", "; expected the cfg.yaml beside the checkpoint"))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, suitable for YAML and for MLflow params."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        """Write as a cfg.yaml that both ffsc and the official code can read."""
        dump_yaml(self, path, sort_keys=True)
