"""Imports live at the top of each module, so a reader sees a module's dependencies in one place.

An import inside a function in teacher/, search_spaces/, compress/ or benchmarks/ fails this test unless it
imports a heavy optional dependency (HEAVY_OPTIONAL: slow to import, or absent on some machines) or the line, or
the line above it, carries a comment saying why it is lazy (an import cycle it breaks, a start-up cost it keeps
out of ``ffsc --help``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("teacher", "search_spaces", "compress", "benchmarks")

HEAVY_OPTIONAL = frozenset({
    "tensorrt", "onnxruntime", "onnx", "onnxslim", "onnxscript", "google",  # google.protobuf comes with onnx
    "mlflow", "optuna", "cv2", "skimage", "scipy", "matplotlib", "triton",
})
"""Top-level packages that may be imported inside a function without a comment: each takes a second or more to
import, or is an optional extra (``pip install ffsc[tensorrt]``, ``[real]``), or is missing on some platforms."""


def _has_comment(lines: list[str], lineno: int) -> bool:
    """Whether line ``lineno`` (1-based) has a trailing comment or the line above is a comment."""
    line = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno > 1 else ""
    return "#" in line or above.startswith("#")


def _top_packages(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return ["." if node.level else (node.module or "").split(".")[0]]
    return [alias.name.split(".")[0] for alias in node.names]


def function_imports(root: Path = ROOT) -> list[str]:
    """"file:line: import text" for every uncommented import inside a function of a non-heavy package."""
    found = []
    for path in sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for func in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                if all(pkg in HEAVY_OPTIONAL for pkg in _top_packages(node)) or _has_comment(lines, node.lineno):
                    continue
                found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_imports_are_at_the_top_of_each_module() -> None:
    left = function_imports()
    assert not left, (
        f"{len(left)} imports inside functions: move each to the top of its module, or say on the line (or the "
        "line above) why it must be lazy:\n" + "\n".join(left))


def test_a_planted_function_import_is_reported(tmp_path: Path) -> None:
    (tmp_path / "compress").mkdir()
    (tmp_path / "compress" / "stage.py").write_text(
        "import json\n\n\n"
        "def f():\n"
        "    import tensorrt\n"
        "    from onnxruntime.quantization import quantize_static\n"
        "    # compress.export loads onnx: kept out of ffsc --help\n"
        "    from compress.export import to_onnx\n"
        "    from compress.latency import measure  # compress.latency imports this module\n"
        "    from compress.metrics import epe\n"
        "    import os, cv2\n"
        "    def g():\n"
        "        from . import sibling\n")
    assert function_imports(tmp_path) == [
        "compress/stage.py:10: from compress.metrics import epe",
        "compress/stage.py:11: import os, cv2",
        "compress/stage.py:13: from . import sibling",
    ]
