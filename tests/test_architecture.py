"""The shape of the code: imports flow one way (no cycle between project modules, function-local imports
counted), the evaluator reads models without torch, and modules and functions stay small enough to read."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "calibration", "eval", "recipes")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 90


def _modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (module level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import sub" imports the submodule pkg.sub when there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        for name in names:
            while name and name not in mods:  # "import compress.quant.core" -> the deepest project module
                name = name.rpartition(".")[0]
            if name and not (ROOT / name.replace(".", "/") / "__init__.py").exists():
                found.add(name)  # package __init__ files hold no code: importing a package is no edge
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_local_import(tmp_path):
    """The checker itself: a cycle held together by an import inside a function is still a cycle."""
    a = tmp_path / "a.py"
    a.write_text("import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from a import x\n")
    mods = {"a": a, "b": b}
    assert _cycles({m: _imports(p, mods) for m, p in mods.items()}) == [["a", "b"]]


def test_no_import_cycle_between_project_modules():
    mods = _modules()
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    assert sum(len(v) for v in graph.values()) > 50  # the parser sees the project's imports
    assert _cycles(graph) == []


def test_the_evaluator_reads_models_without_torch():
    code = ("import sys, eval.report, eval.evaluate, eval.model_info, eval.latency, eval.profile; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not bad, bad[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert long_modules == [] and long_functions == []


def test_no_test_skips_itself():
    """A test whose data or runtime is missing fails, loudly, instead of skipping: CI cannot go green with a
    part of the project untested (the README's test command installs everything the tests need)."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("skip", "skipif", "importorskip", "xfail"):
                if isinstance(node.value, (ast.Name, ast.Attribute)) and "pytest" in ast.unparse(node.value):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert offenders == []


def test_the_declared_python_has_what_the_code_imports():
    """``requires-python`` admits no interpreter that lacks a standard-library module the project imports
    (tomllib, which reads every recipe, is new in 3.11)."""
    import re
    import tomllib

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip()).groups())
    needs = {"tomllib": (3, 11)}
    used = {name for path in _modules().values() for name in needs if name in _top_imports(path)}
    assert all(floor >= needs[name] for name in used), (spec, used)


def _top_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out
