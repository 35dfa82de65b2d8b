"""The import structure: no cycles between the project's modules, and DeepSpeed only where an engine is built.

A cycle is how a package boundary erodes unnoticed (train/ once imported itself in a circle of six files through
the evaluation, generation, export and pipeline code), so a new one fails here with the modules it runs through.
The graph counts every import, including the ones deferred into a function body: a deferred import still ties
the two modules together, it only moves the failure to run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "train", "tools", "analysis")

# Modules that import deepspeed when imported: the ones that build an engine or read its files. Everything
# else (the model, the data pipeline, the configs, the tools) must import on a machine where deepspeed's
# accelerator detection would be slow or wrong, and a tool must open an HF directory without it.
DEEPSPEED_AT_IMPORT = {"train.engine", "train.zero", "train.pipeline", "train.stages", "train.safe_load"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> dict[str, list[str]]:
    """{imported project module: ['module-level' | 'deferred', ...]} for one module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, list[str]] = {}
    module_level = {id(n) for n in tree.body}

    def add(target: str, node: ast.AST) -> None:
        # `from a.b import c`: c may be a submodule (a.b.c) or a name in a.b.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, []).append("module-level" if id(node) in module_level else "deferred")

    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set(_imports(name, path, known)) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    """The checker itself: a three-module circle and a self-contained module."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_deferred_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from pkg import y\n")
    (pkg / "y.py").write_text("from .x import f\n")
    (pkg / "z.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.x import f\n")
    known = {"pkg", "pkg.x", "pkg.y", "pkg.z"}
    assert _imports("pkg.x", pkg / "x.py", known) == {"pkg.y": ["deferred"]}
    assert _imports("pkg.y", pkg / "y.py", known) == {"pkg.x": ["module-level"]}
    assert _imports("pkg.z", pkg / "z.py", known) == {}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40, sorted(graph)  # the walk found the project
    cycles = find_cycles(graph)
    detail = []
    for cycle in cycles:
        members = set(cycle)
        detail.append(" | ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in cycle))
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_deepspeed_is_imported_at_module_level_only_where_an_engine_is_built():
    offenders = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names) and name not in DEEPSPEED_AT_IMPORT:
                offenders.append(f"{name} (line {node.lineno})")
    assert not offenders, f"deepspeed imported at module level outside {sorted(DEEPSPEED_AT_IMPORT)}: {offenders}"


@pytest.mark.parametrize("modules", [
    ["model", "model.transformer", "model.hf", "model.flops", "model.generation"],
    ["data.loader", "data.validate", "data.prepare", "data.demo"],
    ["train.config", "train.log", "train.signals", "train.fingerprint"],
    ["tools.generate", "tools.evaluate", "tools.export", "tools.capacity", "tools.analyze"],
])
def test_importing_leaves_deepspeed_out(modules):
    """What these modules import, transitively, at import time (the static check above cannot follow a module-level
    import of a project module that itself imports deepspeed)."""
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"{modules} imported deepspeed: {out.stdout[-500:]}"
