"""The layout keeps its shape: the core step is free of transformers, the project's modules import
each other without cycles, and the library works without the `eval` package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("medusa_engine", "attention", "diffusion_ext", "eval")
LIBRARY = ("medusa_engine", "attention", "diffusion_ext")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "results" not in path.relative_to(ROOT).parts  # result folders keep their scripts
    }


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "medusa_engine.generate" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_eval():
    graph = import_graph()
    back_edges = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith(LIBRARY)
        for target in targets
        if target.split(".")[0] == "eval"
    )
    assert back_edges == []


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_the_core_step_does_not_import_transformers():
    proc = run_python(
        "import sys\n"
        "import medusa_engine.generate, medusa_engine.static_step, medusa_engine.tree_spec\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "print(leaked)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_library_runs_without_eval():
    proc = run_python(
        "import sys\n"
        "sys.modules['eval'] = None  # any import of eval now fails\n"
        "from medusa_engine import cli\n"
        "parser = cli.build_parser()\n"
        "names = parser._subparsers._group_actions[0].choices\n"
        "print(sorted(names))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generate" in proc.stdout and "bench" not in proc.stdout
