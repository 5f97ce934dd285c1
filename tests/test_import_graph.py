"""hcvision's import graph, read from the source with ``ast``: no module imports itself through others (no cycle),
and the floors of the design notes hold (nothing imports upward).

Every ``import`` counts, at module level or inside a function: a lazy import that closes a loop is still a loop that
a reader has to untangle. An edge goes to the module a statement names: ``from .models import x`` names
``hcvision/models/__init__.py`` unless ``x`` is a submodule, ``from . import io`` names ``hcvision/io.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hcvision"


def module_files(package: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package`` (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: Dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of ``modules`` (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    """Module -> the modules of the package it imports (anywhere in its source)."""
    modules = module_files(package)
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (_owner(a.name, modules) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    owner = full if full in modules else _owner(source, modules)
                    if owner:
                        targets.add(owner)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: List[str], graph: Dict[str, Set[str]]) -> str:
    inside = set(component)
    return "; ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a] & inside))


def test_cycle_finder_finds_a_planted_cycle():
    """The finder itself: a three-module loop and a self-contained chain beside it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "hcvision"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import io\n")
    (pkg / "io.py").write_text("def f():\n    from .sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("from ..io import f\n")
    (pkg / "sub" / "leaf.py").write_text("import os\nimport hcvision.io.nothing_here\n")
    graph = import_graph(pkg)
    assert graph == {"hcvision": {"hcvision.io"}, "hcvision.io": {"hcvision.sub.leaf"},
                     "hcvision.sub": {"hcvision.io"}, "hcvision.sub.leaf": {"hcvision.io"}}
    assert cycles(graph) == [["hcvision.io", "hcvision.sub.leaf"]]
    (pkg / "sub" / "leaf.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert cycles(graph) == []
    (pkg / "io.py").write_text("def f():\n    from .sub import g\n")  # names the package's __init__: a loop
    assert cycles(import_graph(pkg)) == [["hcvision.io", "hcvision.sub"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(c, graph) for c in found)


# The floors of DESIGN.md, ground first: a module may import its own floor and those below, never one above. The
# entry points (trainers, sample, demo, compare, analysis) stand above all of these and are not listed.
# diffusion.guidance is one equation on tensors (a leaf): HCDiT.forward_with_cfg uses it from below the models.
FLOORS = [
    ("hcvision.cli", "hcvision.provenance", "hcvision.resources", "hcvision.sampling_spec"),
    ("hcvision.io", "hcvision.layers", "hcvision.connections", "hcvision.diffusion.guidance"),
    ("hcvision.models",),
    ("hcvision.data",),
    ("hcvision.diffusion", "hcvision.eval"),
    ("hcvision.engine",),
]


def _floor(module: str) -> int | None:
    """The floor of the longest listed name that is ``module`` or a package above it."""
    matches = [(len(n), level) for level, names in enumerate(FLOORS) for n in names
               if module == n or module.startswith(n + ".")]
    return max(matches)[1] if matches else None


@pytest.mark.parametrize("lower,upper", [("hcvision.diffusion", "hcvision.eval"),
                                         ("hcvision.eval", "hcvision.diffusion")])
def test_diffusion_and_eval_do_not_import_each_other(lower, upper):
    """Training-side diffusion code and the evaluation share a floor: neither leans on the other (the REPA encoder
    and the FD-DINOv2 features load through hcvision.models.loading)."""
    graph = import_graph()
    crossing = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith(lower + ".") or a == lower
                      for b in targets if b == upper or b.startswith(upper + "."))
    assert not crossing, crossing


def test_nothing_imports_upward():
    graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _floor(a) is not None and _floor(b) is not None and _floor(b) > _floor(a))
    assert not upward, "upward imports: " + ", ".join(upward)
