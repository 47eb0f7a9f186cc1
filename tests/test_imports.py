"""The package's layering: no import cycle among fcdistill's modules (imports inside functions
count too: they run as soon as the function does), data never reaches into the teacher, nothing
below serve imports training code, and the CLI loads none of the heavy libraries."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """module -> the fcdistill modules it imports anywhere in its body."""
    mods: dict[str, Path] = {}
    for path in sorted((ROOT / "fcdistill").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:  # `fcdistill.tools.ToolSpec` -> `fcdistill.tools`
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("fcdistill") else None
                if target and target != mod and not mod.startswith(target + "."):  # a parent package is not a cycle
                    graph[mod].add(target)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # it did read the package
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_cycle_check_finds_a_cycle():
    graph = import_graph()
    graph["fcdistill.tools"].add("fcdistill.cli")  # cli reaches tools, so this closes a loop
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        assert "fcdistill.cli" in exc.args[1]
    else:
        raise AssertionError("a cycle went unnoticed")


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_layering_follows_the_data_flow():
    graph = import_graph()
    for mod in graph:
        reached = _reaches(graph, mod)
        if mod.startswith("fcdistill.data"):
            assert not {r for r in reached if r.startswith("fcdistill.teacher")}, mod
        if mod.startswith(("fcdistill.serve", "fcdistill.client", "fcdistill.eval")):
            assert not {r for r in reached if r.startswith("fcdistill.train")}, mod
        if mod.startswith("fcdistill.client"):
            assert not {r for r in reached if r.startswith(("fcdistill.teacher", "fcdistill.eval"))}, mod


def test_the_cli_loads_no_heavy_library():
    code = ("import sys, fcdistill.cli; heavy = {'torch', 'transformers', 'trl', 'peft', 'openai', 'fastapi', "
            "'bfcl_eval', 'vllm', 'datasets', 'outlines_core'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
