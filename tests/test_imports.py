"""The package's imports go one way: no module imports (at import time or lazily, inside a function)
a module that imports it back, directly or through others."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastdiff")


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def _imports(name: str, path: str, mods: set[str]) -> set[str]:
    """The fastdiff modules ``name`` imports, anywhere in its body (a package's ``__init__`` excluded
    as a target where a submodule is meant: ``from . import x`` names ``pkg.x``)."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastdiff")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("fastdiff"):
                continue
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods}
            found |= subs or {mod}
    return {m for m in found if m in mods and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    # a package's __init__ re-exports its submodules: its edges to them are not a layering fact
    graph = {m: {t for t in _imports(m, p, set(mods)) if not (p.endswith("__init__.py") and t.startswith(m + "."))}
             for m, p in mods.items()}
    graph = {m: {t for t in ts if t != "fastdiff"} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_old_module_paths_are_the_moved_modules():
    """Every pre-restructuring path still imports, as the SAME module object as its new path (one
    copy: monkeypatching or isinstance through either name sees the other), keeping its own name."""
    import importlib
    import subprocess
    import sys

    from fastdiff._moved import MOVED

    mods = _modules()
    for old, new in MOVED.items():
        assert new in mods, f"{old} -> {new}: no such module"
        assert old not in mods, f"{old} exists as a file: the alias would shadow it"
    code = ("import importlib, sys, fastdiff\n"
            "from fastdiff._moved import MOVED\n"
            "for old, new in MOVED.items():\n"
            "    a = importlib.import_module(old)\n"
            "    b = importlib.import_module(new)\n"
            "    assert a is b and a.__name__ == new and a.__spec__.name == new, (old, a, b)\n"
            "from fastdiff.schedules import VPSchedule\n"
            "from fastdiff.zoo.digits import timestep_embedding\n"
            "assert VPSchedule.__module__ == 'fastdiff.core.schedules'\n"
            "assert sys.modules['fastdiff.zoo.digits'] is sys.modules['fastdiff.models.zoo.digits']\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert importlib.import_module("fastdiff.ops") is importlib.import_module("fastdiff.runtime.ops")
