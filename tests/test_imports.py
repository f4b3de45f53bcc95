"""Every module of detaudit and local_backend imports on its own, in a fresh interpreter;
no module-level import circle; no module imports another module's private names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("detaudit", "local_backend")
# run as scripts, not imported: their module level does the work
SCRIPTS = {"detaudit.__main__", "local_backend.train_tiny"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


# One interpreter loads the third-party libraries once, then forks a child per project
# module, which imports that module alone: fresh as far as detaudit and local_backend are
# concerned (neither is loaded in the parent), without paying torch's start-up 50 times.
IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
for heavy in ("numpy", "pandas", "scipy.stats", "torch", "triton", "openai", "httpx", "typer",
              "rich.console", "tokenizers", "safetensors", "starlette", "uvicorn", "tiktoken"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not any(m.split(".")[0] in ("detaudit", "local_backend") for m in sys.modules)
failed = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed[name] = message or f"exit status {status}"
print(json.dumps(failed))
"""


def test_every_module_imports_alone():
    names = sorted(set(MODULES) - SCRIPTS)
    assert "detaudit.session" in names and "detaudit.commands.run" in names
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("name", ["detaudit", "detaudit.cli", "detaudit.api", "detaudit.session",
                                  "detaudit.commands.serve", "local_backend.engine"])
def test_entry_modules_import_alone_in_a_fresh_interpreter(name):
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _top_level_imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of the imports run at import time:
    not those inside functions, nor under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((alias.name, [], node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([node.module] if node.module else []))
                found.append((base, [alias.name for alias in node.names], node.lineno))
            elif isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at import time (``from pkg import sub``
    counts as importing ``pkg.sub``)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges = set()
        for target, names, _ in _top_level_imports(path, module):
            if target.split(".")[0] not in PACKAGES:
                continue
            subs = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
            edges.update(subs)
            if not names or len(subs) < len(names):
                edges.add(target)
        graph[module] = edges - {module}
    return graph


def test_no_import_circle():
    graph = import_graph()
    assert "detaudit.session" in graph["detaudit.api"]  # the graph sees real edges
    state: dict[str, int] = {}  # 1: on the path, 2: done
    circles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert circles == []


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        project_aliases = set()  # names bound to project modules: ``x._private`` is flagged
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
                    if f"{node.module}.{alias.name}" in MODULES:
                        project_aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES and alias.asname:
                        project_aliases.add(alias.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in project_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offenders.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert offenders == []


@pytest.mark.parametrize("argv", [["-m", "detaudit", "--help"], ["-m", "detaudit.cli", "--help"],
                                  ["-m", "detaudit", "--version"]])
def test_the_command_line_starts_every_way(argv):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("Usage" in done.stdout and "gate" in done.stdout) or done.stdout.startswith("detaudit ")
