"""The layers of docs/architecture.md: no import cycle among normlab's modules (function-level and
TYPE_CHECKING imports included), every function-level import of normlab says why it waits, the
import-linter contracts hold (and fail when broken), and the old module paths still work."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

import normlab
from normlab._moved import MOVED

SRC = Path(normlab.__file__).resolve().parent.parent
ROOT = SRC.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, ast.AST]]]:
    """Every normlab module each module imports, at any depth of its code, with the node."""
    out: dict[str, list[tuple[str, ast.AST]]] = defaultdict(list)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    out[name].append((target, node))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


MODULES = {module_name(p): p for p in (SRC / "normlab").rglob("*.py")}


def test_cycles_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_normlab_modules():
    graph = {m: {t for t, _ in edges} for m, edges in all_imports(MODULES).items()}
    assert len(graph) > 50  # the walk saw the package
    assert cycles(graph) == []


def test_function_level_imports_of_normlab_say_why():
    """A normlab import inside a function is there for its import cost; the function says so
    in a comment '# imported on use: ...' above it."""
    unexplained = []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                module = getattr(inner, "module", None) or ""
                if isinstance(inner, ast.ImportFrom) and module.startswith("normlab"):
                    above = lines[node.lineno - 1:inner.lineno - 1]
                    if not any("# imported on use:" in line for line in above):
                        unexplained.append(f"{name}:{inner.lineno}")
    assert unexplained == []


def test_the_package_top_level_is_its_layers():
    entries = sorted(p.name for p in (SRC / "normlab").iterdir() if p.name != "__pycache__")
    assert len(entries) <= 14, entries  # the layers, runner.py, _moved.py, __init__.py


def run_lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
                          timeout=120, check=False)


needs_linter = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


@needs_linter
def test_the_layer_contracts_hold():
    done = run_lint_imports(ROOT, SRC)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@needs_linter
@pytest.mark.parametrize(("module", "line"), [
    ("normlab/runs/store.py", "import normlab.execute.local"),  # a layer imports one above it
    ("normlab/execute/pool.py", "import normlab.studies.base"),  # siblings import each other
    ("normlab/utils/atomic.py", "import normlab.data"),  # the base imports a layer
])
def test_a_broken_contract_fails(tmp_path, module, line):
    shutil.copytree(SRC / "normlab", tmp_path / "src" / "normlab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = run_lint_imports(tmp_path, tmp_path / "src")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "BROKEN" in done.stdout


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_warns_and_gives_the_new_objects(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old][0].replace(".", r"\.")):
        module = importlib.import_module(old)
    for new in map(importlib.import_module, MOVED[old]):
        for name, value in vars(new).items():
            if not name.startswith("__"):
                assert getattr(module, name) is value or name in _shadowed(old, new, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def _shadowed(old: str, new: object, name: str) -> set[str]:
    """A name two of the new modules define: the old path gives the first's."""
    first = importlib.import_module(MOVED[old][0])
    return {name} if new is not first and hasattr(first, name) else set()


def test_an_old_path_unpickles():
    import pickle

    from normlab.runs.spec import RunSpec

    data = pickle.dumps(RunSpec(seed=3), protocol=0).replace(b"normlab.runs.spec", b"normlab.spec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sys.modules.pop("normlab.spec", None)
        assert pickle.loads(data) == RunSpec(seed=3)
