"""``DatasetSpec``: the recipe section that names one dataset (synthetic, a detected layout or a reader's folder).

Every recipe reads its data through it (``compress.data.datasets.build_dataset``), so it lives with the readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.data.readers import DATASET_KINDS
from compress.data.synthetic import SyntheticConfig
from compress.errors import ConfigError
from compress.structured import did_you_mean


@dataclass
class DatasetSpec:
    """One dataset: ``kind`` 'synthetic', 'auto' (detect the layout of ``path``; synthetic without a path) or a
    reader name. Every stage reads its data through this spec (compress.data.datasets.build_dataset)."""

    kind: str = "auto"
    path: str | None = None
    num_samples: int = 16
    """Synthetic only: number of generated pairs."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic only: the generator's settings."""
    limit: int | None = None
    """Use only the first this many samples."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the reader (e.g. split)."""

    def __post_init__(self) -> None:
        # 'auto' without a path stays 'auto' (read as synthetic): a path given later by an override must still be
        # read as a folder, which a kind rewritten here to 'synthetic' would silently ignore.
        if self.kind == "synthetic" and self.path:
            raise ConfigError(f"dataset kind 'synthetic' generates its pairs and reads no path, got path "
                              f"{self.path!r}; set kind to 'auto' (or a reader name) to read that folder")
        if self.kind not in ("synthetic", "auto", *DATASET_KINDS):
            raise ConfigError(f"unknown dataset kind {self.kind!r}{did_you_mean(self.kind, DATASET_KINDS)} (expected "
                              f"'synthetic', 'auto' or a reader: {', '.join(sorted(DATASET_KINDS))})")
        if self.kind not in ("synthetic", "auto") and not self.path:
            raise ConfigError(f"dataset kind {self.kind!r} needs a path (the dataset's root folder)")
        if self.num_samples < 1:
            raise ConfigError(f"dataset num_samples: got {self.num_samples}, expected >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"dataset limit: got {self.limit}, expected >= 1 or null")
