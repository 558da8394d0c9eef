"""Rules the code base keeps, so that it stays easy to read and to change (fast: no model).

* the import graph of src/amzft has no cycle (imports inside functions count too), and its
  packages import only those of the layers below them (``LAYERS``, docs/architecture.md);
* no function or method in src/amzft, benchmarks/ or gpu/ is longer than 80 lines;
* nothing shipped (src/, configs/, README.md, docs/) points at a file outside the repository;
* ``python -m amzft --help`` imports no heavy library (torch above all): it stays instant.

The linter (ruff, configured in pyproject.toml) is not run from here: ``make test`` runs it
before pytest.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO

SRC = REPO / "src"
PACKAGE = SRC / "amzft"
MAX_FUNCTION_LINES = 80
HEAVY = ("torch", "lightning", "transformers", "peft", "datasets", "bitsandbytes", "unsloth")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:`` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is an amzft module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..data import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: name may be a submodule (then that is what is imported)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected component (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        # the shortest way from the component's first module back to itself (breadth-first)
        start = min(component)
        queue, parent, back = [start], {start: None}, None
        while back is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & component):
                if w == start:
                    back = v
                    break
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
        path = []
        while back is not None:
            path.append(back)
            back = parent[back]
        cycles.append([*reversed(path), start])
    return cycles


def test_cycle_finder_finds_a_cycle():
    """The check below can fail: a -> b -> c -> a is reported, a -> d is not part of it."""
    assert find_cycles({"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_of_amzft_has_no_cycle():
    graph = import_graph()
    assert "amzft.cli.main" in graph and "amzft.data.build" in graph["amzft.data.module"]  # the walk sees imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/amzft (function-level imports count):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


# The layers of src/amzft, top to bottom (docs/architecture.md, "Layers"): a module imports modules of
# its own package or of a lower layer only, never of another package of its own layer; the
# foundations (single modules) may import one another, without a cycle (test above).
LAYERS = [
    {"__main__"},  # python -m amzft
    {"cli"},  # the commands
    {"catalogue", "training", "export"},  # the jobs: describe a catalogue, fit, export
    {"evaluation"},  # scoring answers (evaluate, and val/rougeL during a fit)
    {"inference"},  # a model ready to answer: a checkpoint or a base, loaded once
    {"checkpoints"},  # a run's files: written atomically, located, ranked
    {"model", "data"},  # the bottom floor: the LightningModule and the data pipeline
    {"settings", "files", "errors", "sources", "lightning_compat", ""},  # foundations ("": amzft/__init__)
]


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def layer_violations(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    rank = {package: i for i, packages in enumerate(layers) for package in packages}
    foundations = layers[-1]
    found = []
    for module, imports in sorted(graph.items()):
        source = _package(module)
        for target in sorted(imports):
            to = _package(target)
            if to == source or (source in foundations and to in foundations):
                continue
            if source not in rank or to not in rank:
                found.append(f"{module} -> {target}: package not in LAYERS")
            elif rank[to] <= rank[source]:
                found.append(f"{module} -> {target}: {to} is not below {source}")
    return found


def test_layer_check_finds_an_upward_and_a_sideways_import():
    layers = [{"cli"}, {"model", "data"}, {"errors"}]
    graph = {"amzft.model.a": {"amzft.cli.main", "amzft.data.b", "amzft.errors", "amzft.model.c"}, "amzft.cli.main": {"amzft.model.a"}}
    assert layer_violations(graph, layers) == ["amzft.model.a -> amzft.cli.main: cli is not below model",
                                               "amzft.model.a -> amzft.data.b: data is not below model"]


def test_packages_import_only_the_layers_below_them():
    graph = import_graph()
    assert {_package(m) for m in graph} == set().union(*LAYERS)  # every package has its layer
    violations = layer_violations(graph, LAYERS)
    assert not violations, "imports against the layers of src/amzft (LAYERS):\n" + "\n".join(f"  {v}" for v in violations)


def _functions(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    files = [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "gpu").glob("*.py")]
    assert len(files) > 20
    too_long = sorted(
        (length, f"{name}:{path.relative_to(REPO)}:{line}")
        for path in files
        for name, line, length in _functions(path)
        if length > MAX_FUNCTION_LINES
    )
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (name:file:line: length):\n" + "\n".join(
        f"  {where}: {length} lines" for length, where in reversed(too_long)
    )


OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|/work/")


def _shipped_text_files():
    roots = [REPO / "src", REPO / "configs", REPO / "docs"]
    files = [REPO / "README.md"]
    for root in roots:
        # build artefacts (pip's egg-info copy of an older README, bytecode) are not shipped sources
        files += [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and not any(part.endswith(".egg-info") for part in p.parts)]
    for path in files:
        if not path.is_file():
            continue
        try:
            yield path, path.read_text()
        except UnicodeDecodeError:  # binary
            continue


def test_nothing_shipped_names_a_file_outside_the_repository():
    """A reader of this repository alone must be able to follow every reference: no design
    notes kept elsewhere, no data folder beside the checkout, no path of one machine."""
    hits = [
        f"  {path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
        for path, text in _shipped_text_files()
        for number, line in enumerate(text.splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "references to files outside the repository (DESIGN.md, ../shared, /work/):\n" + "\n".join(hits)


def test_help_imports_no_heavy_library():
    """``python -m amzft --help`` must stay instant: no torch, Lightning, transformers, ... (the
    CLI imports a command's modules only once the command is known)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "amzft", "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "usage: python -m amzft" in done.stdout, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "amzft.cli.main" in imported  # the import log is read correctly
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, f"`python -m amzft --help` imports {heavy}"
