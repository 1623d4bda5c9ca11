"""The epilogue every benchmark shares: the Markdown line naming the machine, and the JSON and Markdown reports
written atomically, naming no path of the machine that ran them.

A committed result must read the same whoever ran it: paths under the repository become relative to it, the
benchmark's run directory becomes ``<run_dir>``, and any other path of this machine keeps only its last name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compress.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = "<run_dir>"

_NAME = r"[\w.+@%~-]"
# An absolute path starts a word (after a space, a quote, '=', '(', '[' or ','): not a URL's '//host', not
# '<run_dir>/x' or './x', not a ratio such as 'px/s'.
_ABSOLUTE = re.compile(rf"""(?<![^\s"'`=(\[,])/({_NAME}+)(?:/{_NAME}+)*/?""")


def machine_line(machine: dict[str, Any], note: str = "") -> str:
    """'Machine: CPU (N cores[, note]), GPU ...; torch ..., onnxruntime ...[, TensorRT ...].' from machine_info()."""
    software = f"torch {machine.get('torch', '?')}, onnxruntime {machine.get('onnxruntime') or 'none'}"
    if machine.get("tensorrt"):
        software += f", TensorRT {machine['tensorrt']}"
    return (f"Machine: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores{', ' + note if note else ''}), "
            f"GPU {machine.get('gpu') or 'none'}; {software}.")


def portable(text: str, run_dir: str | Path | None = None) -> str:
    """``text`` with the run directory as <run_dir>, repository paths relative, other absolute paths by name."""
    if run_dir is not None:
        given = Path(run_dir)
        # Longest first, so that the resolved form is not half-replaced through the relative one.
        for form in sorted({str(given.resolve()), str(given.absolute()), str(given)} - {"."}, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.+@%~/-]){re.escape(form)}(?!{_NAME})", RUN_DIR, text)
    text = re.sub(rf"{re.escape(str(ROOT))}(?:/(?={_NAME})|(?!{_NAME}))",
                  lambda m: "" if m.group().endswith("/") else ".", text)
    return _ABSOLUTE.sub(_name_of_local_path, text)


def _name_of_local_path(match: re.Match[str]) -> str:
    # Only what lies under a top-level folder of this machine is one of its paths: ONNX node names such as
    # '/model/gwc/*' look alike.
    path = match.group()
    return path.rstrip("/").rsplit("/", 1)[-1] if (Path("/") / match.group(1)).exists() else path


def _portable_data(value: Any, run_dir: str | Path | None) -> Any:
    if isinstance(value, str):
        return portable(value, run_dir)
    if isinstance(value, dict):
        return {portable(k, run_dir): _portable_data(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable_data(v, run_dir) for v in value]
    return value


def write_report(
    stem: str | Path, data: dict[str, Any], markdown: str, run_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically, paths made portable; returns the two paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Through JSON first: Paths, numpy numbers and other objects become the strings json would write.
    plain = _portable_data(json.loads(json.dumps(data, default=str)), run_dir)
    json_path = atomic_write_text(stem.with_name(stem.name + ".json"), json.dumps(plain, indent=2) + "\n")
    md_path = atomic_write_text(stem.with_name(stem.name + ".md"), portable(markdown, run_dir).rstrip("\n") + "\n")
    return json_path, md_path
