"""Which input an ``ffsc infer`` output location holds, so a second run never leaves two inputs' outputs mixed.

A run records its input and the files it wrote in a small JSON file beside them (``.ffsc-infer.json`` in an
output folder, ``.<name>.ffsc-infer.json`` beside a single disparity file). A location that holds ffsc-named
outputs of another input, or outputs with no record, is refused unless ``--overwrite``; once a run has written
its own outputs it removes the earlier ones it did not rewrite, so the location always holds one input's
outputs. Only ffsc-named files are ever removed (never a path read from a record).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from compress.atomic import atomic_write_text
from compress.deploy.infer import MAP_FORMATS
from compress.errors import ConfigError

RECORD_FORMAT = "ffsc-infer-outputs"
FOLDER_RECORD = ".ffsc-infer.json"
# The names plan_outputs gives the outputs in an output folder (and in each frame's sub-folder).
FOLDER_OUTPUT_NAMES = tuple(f"{stem}{suffix}" for stem in ("disparity", "depth") for suffix in MAP_FORMATS) + (
    "cloud.ply",)


@dataclass(frozen=True)
class OutputLocation:
    """Where one run's outputs and the record of their input go."""

    out: Path
    record: Path
    single_file: bool

    def existing_outputs(self) -> list[Path]:
        """The ffsc-named output files at this location now (recorded or not)."""
        if self.single_file:  # the disparity file, and depth and cloud beside it as plan_outputs names them
            stem = self.out.stem
            names = [self.out.name, *(f"{stem}_depth{s}" for s in MAP_FORMATS), f"{stem}_cloud.ply"]
            return [self.out.parent / n for n in names if (self.out.parent / n).is_file()]
        if not self.out.is_dir():
            return []
        # One level of frame sub-folders (a folder of pairs); a sub-folder with its own record is another location.
        folders = [self.out, *(d for d in sorted(self.out.iterdir())
                               if d.is_dir() and not (d / FOLDER_RECORD).exists())]
        return [d / n for d in folders for n in FOLDER_OUTPUT_NAMES if (d / n).is_file()]


def output_location(out: Path, folder_mode: bool) -> OutputLocation:
    """The location ``--out`` names: a single disparity file (one pair, a map suffix) or an output folder."""
    if not folder_mode and out.suffix.lower() in MAP_FORMATS:
        return OutputLocation(out, out.parent / f".{out.name}.ffsc-infer.json", True)
    return OutputLocation(out, out / FOLDER_RECORD, False)


def describe_input(source: dict[str, str]) -> str:
    """The input as the command line gives it, e.g. ``--left a.png --right b.png``."""
    return " ".join(f"--{key} {value}" for key, value in source.items())


def _recorded_input(location: OutputLocation) -> dict[str, str] | None:
    """The input the location's record names (None with no record, or one ffsc did not write)."""
    try:
        data = json.loads(location.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("input"), dict):
        return None
    return data["input"]


def check_outputs(location: OutputLocation, source: dict[str, str], overwrite: bool) -> list[Path]:
    """The outputs an earlier run left at the location (to replace), or ConfigError when they are another
    input's (or nobody's on record) and ``overwrite`` is off."""
    previous = location.existing_outputs()
    recorded = _recorded_input(location)
    if previous and recorded != source and not overwrite:
        shown = [os.path.relpath(p, location.out.parent if location.single_file else location.out)
                 for p in previous[:3]]
        files = ", ".join(shown) + (f" and {len(previous) - 3} more" if len(previous) > 3 else "")
        whose = (f"the outputs of another input ({describe_input(recorded)})" if recorded is not None
                 else f"ffsc outputs ({files}) with no record of their input")
        raise ConfigError(f"--out {location.out} already holds {whose}; pass --overwrite to replace them, or "
                          "choose another --out")
    return previous


def replace_outputs(location: OutputLocation, previous: list[Path], written: list[Path],
                    source: dict[str, str]) -> list[Path]:
    """Remove the earlier outputs this run did not rewrite, then record this run's input and files; returns
    the files removed."""
    kept = {p.absolute() for p in written}
    stale = [p for p in previous if p.absolute() not in kept]
    for path in stale:
        path.unlink(missing_ok=True)
    for folder in dict.fromkeys(p.parent for p in stale):
        if folder != location.out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a frame sub-folder the new input does not have
    base = location.record.parent
    record = {"format": RECORD_FORMAT, "version": 1, "input": source,
              "outputs": sorted(os.path.relpath(p, base) for p in written)}
    atomic_write_text(location.record, json.dumps(record, indent=2) + "\n")
    return stale
