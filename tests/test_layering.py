"""The layers of ARCHITECTURE.md, checked on the imports: every import in teacher/, search_spaces/, compress/ and
benchmarks/ (top-level, inside functions, under TYPE_CHECKING) must point down the table below, or sideways
inside a layer; stage packages must not import each other in a cycle. Latency backend names are compared only in
the backend registry (compress.backends): everywhere else code asks the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("teacher", "search_spaces", "compress", "benchmarks")

# Lowest first. A module may import its own layer and the layers above it in this list, never one below.
# The longest matching prefix decides a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("compress", "compress.errors", "compress.atomic", "compress.terminal", "compress.structured",
                    "compress.checks", "compress.device", "compress.run_lock", "compress.pruning_rules")),
    ("teacher", ("teacher",)),
    ("search_spaces", ("search_spaces",)),
    ("core", ("compress.data", "compress.metrics", "compress.tracking", "compress.teacher_ref",
              "compress.geometry", "compress.cuda_graph", "compress.training", "compress.evaluation",
              "compress.real_pairs", "compress.machine", "compress.compiled")),
    ("stages", ("compress.export", "compress.backends", "compress.latency", "compress.latency_cache",
                "compress.latency_config", "compress.latency_predictor", "compress.models",
                "compress.distill", "compress.prune", "compress.nas", "compress.deploy", "compress.preflight",
                "compress.quantize", "compress.importers")),
    ("pipeline", ("compress.pipeline",)),
    ("cli", ("compress.commands", "compress.cli")),
]
# benchmarks/ are scripts on top of the library: they may import any layer but the command line.
BENCHMARKS_MAY_NOT = ("cli",)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (None for benchmarks and anything outside the project)."""
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best


def stage_of(module: str) -> str | None:
    """The stage (compress.<name>) a module of the stages layer belongs to."""
    if layer_of(module) != "stages":
        return None
    return ".".join(module.split(".")[:2])


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a project module in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    targets = [".".join([*base, node.module])]
                else:  # "from . import x": each x may be a module of the package
                    targets = [".".join([*base, alias.name]) for alias in node.names]
            else:
                targets = [node.module or ""]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t.split(".")[0] in PACKAGES]
    return found


def all_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def forbidden(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (None when it may)."""
    src, dst = layer_of(importer), layer_of(imported)
    if importer.split(".")[0] == "benchmarks":
        if imported.split(".")[0] == "benchmarks" or dst not in BENCHMARKS_MAY_NOT:
            return None
        return f"benchmarks may not import the {dst} layer"
    if src is None or dst is None:
        return f"{importer if src is None else imported} is in no layer of tests/test_layering.py; add it"
    if RANK[dst] > RANK[src]:
        return f"the {src} layer may not import the {dst} layer above it"
    return None


def test_every_module_is_in_a_layer() -> None:
    unplaced = [module_name(p) for p in all_files()
                if not module_name(p).startswith("benchmarks") and layer_of(module_name(p)) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS and ARCHITECTURE.md): {unplaced}"


def layering_problems(root: Path = ROOT) -> list[str]:
    """One "file:line: imports X: why" line per forbidden import under root."""
    problems = []
    for path in all_files(root):
        importer = module_name(path, root)
        for line, imported in project_imports(path, root):
            why = forbidden(importer, imported)
            if why:
                problems.append(f"{path.relative_to(root).as_posix()}:{line}: imports {imported}: {why}")
    return problems


def test_imports_point_down_the_layers() -> None:
    problems = layering_problems()
    assert not problems, "forbidden imports (see ARCHITECTURE.md):\n" + "\n".join(problems)


def test_stages_import_each_other_without_cycles() -> None:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for path in all_files():
        src = stage_of(module_name(path))
        if src is None:
            continue
        for line, imported in project_imports(path):
            dst = stage_of(imported)
            if dst is not None and dst != src:
                graph.setdefault(src, set()).add(dst)
                where.setdefault((src, dst), f"{path.relative_to(ROOT)}:{line}")

    def cycle_from(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return trail[trail.index(node):] + [node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, trail + [node])
            if found:
                return found
        return None

    for start in sorted(graph):
        cycle = cycle_from(start, [])
        if cycle:
            edges = ", ".join(f"{a} -> {b} ({where[(a, b)]})" for a, b in zip(cycle, cycle[1:], strict=False))
            pytest.fail(f"stages import each other in a cycle: {edges}")


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("compress.pipeline.run", "compress.commands.common", False),
        ("compress.tracking", "compress.nas.pareto", False),
        ("teacher.model", "search_spaces.model", False),
        ("compress.nas.study", "compress.tracking", True),
        ("teacher.loading", "compress.errors", True),
        ("compress.commands.run", "compress.pipeline.run", True),
        ("benchmarks.latency", "compress.deploy", True),
        ("benchmarks.latency", "compress.commands.deploy", False),
    ],
)
def test_the_table_says_what_architecture_md_says(importer: str, imported: str, allowed: bool) -> None:
    assert (forbidden(importer, imported) is None) == allowed


def test_a_forbidden_import_is_reported_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "compress" / "nas").mkdir(parents=True)
    (tmp_path / "compress" / "metrics.py").write_text(
        "import numpy\n\n\ndef f():\n    from compress.commands.common import console\n")
    (tmp_path / "compress" / "nas" / "__init__.py").write_text("from . import pareto\nfrom ..pipeline import run\n")
    assert layering_problems(tmp_path) == [
        "compress/metrics.py:5: imports compress.commands.common: the core layer may not import the cli layer "
        "above it",
        "compress/nas/__init__.py:2: imports compress.pipeline: the stages layer may not import the pipeline "
        "layer above it",
    ]


BACKEND_NAMES = frozenset({"torch", "onnxruntime", "tensorrt", "ort", "trt"})
"""Latency backend names and their short forms: compared only inside the registry."""
BACKEND_REGISTRY = ("compress.backends",)


def _backend_constant(node: ast.expr) -> bool:
    """A string constant naming a backend, or a tuple / list / set literal holding one."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_backend_constant(element) for element in node.elts)
    return isinstance(node, ast.Constant) and node.value in BACKEND_NAMES


def _names_a_backend(node: ast.expr) -> bool:
    """Whether an expression reads something called a backend (``backend``, ``lat.backend``, ``row["backend"]``)."""
    for part in ast.walk(node):
        name = (part.id if isinstance(part, ast.Name) else part.attr if isinstance(part, ast.Attribute)
                else part.value if isinstance(part, ast.Constant) and isinstance(part.value, str) else "")
        if "backend" in name.lower():
            return True
    return False


def backend_comparisons(root: Path = ROOT) -> list[tuple[str, str]]:
    """(file:line, comparison) for every comparison of a backend's name with a backend value outside the registry.

    Precise on purpose: only a comparison between a backend-name constant and an expression that reads a
    backend counts, so ``module == "torch"`` (a pickle's module) or ``precision == "fp16"`` do not."""
    found = []
    for path in all_files(root):
        if module_name(path, root) in BACKEND_REGISTRY:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            if any(_backend_constant(a) and any(_names_a_backend(b) for b in operands if b is not a)
                   for a in operands):
                found.append((f"{path.relative_to(root).as_posix()}:{node.lineno}", ast.unparse(node)))
    return found


def test_backend_names_are_compared_only_in_the_registry() -> None:
    left = [f"{where}: {text}" for where, text in backend_comparisons()]
    assert not left, ("compare backends through compress.backends (get_backend(name) and its flags), not by name:\n"
                      + "\n".join(left))


def test_a_planted_backend_comparison_is_reported(tmp_path: Path) -> None:
    (tmp_path / "compress").mkdir()
    (tmp_path / "compress" / "backends.py").write_text('def f(backend):\n    return backend == "torch"\n')
    (tmp_path / "compress" / "timing.py").write_text(
        'def f(backend, lat, precision, module, row):\n'
        '    if precision == "fp16" or module == "torch":\n'
        '        return None\n'
        '    if lat.backend in ("torch", "auto"):\n'
        '        return 1\n'
        '    return row["backend"] != "trt" and "tensorrt" == backend\n')
    assert backend_comparisons(tmp_path) == [
        ("compress/timing.py:4", "lat.backend in ('torch', 'auto')"),
        ("compress/timing.py:6", "row['backend'] != 'trt'"),
        ("compress/timing.py:6", "'tensorrt' == backend"),
    ]


def test_architecture_md_names_every_layer() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for name, prefixes in LAYERS:
        assert name in text, f"ARCHITECTURE.md does not describe the {name} layer"
        for prefix in prefixes:
            if prefix != "compress":
                assert prefix.replace("compress.", "") in text, f"ARCHITECTURE.md does not place {prefix}"
