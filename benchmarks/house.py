"""How readable the package is: the numbers issue 23 asks for, measured, not timed.

Prints: modules and lines; import floors and circles (top-level and lazy imports apart) and the
lazy imports that climb to a higher floor; the ten longest functions and classes; what a newcomer
reads to follow `mlflow run . -P beta=1.25` (traced from one real `millvae train` on synthetic data,
one epoch); README lines. Run it from the repository root; `--root` to measure another checkout.

    .venv/bin/python benchmarks/house.py
    .venv/bin/python benchmarks/house.py --root /tmp/before   # another checkout, same way
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "millvae"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(top-level imports, lazy imports inside functions) between the package's modules."""
    top: dict[str, set[str]] = {m: set() for m in mods}
    lazy: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}".rstrip(".")
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            inner = _inside_function(tree, node)
            for t in targets:
                r = _resolve(t, mods)
                if r and r != mod and r.startswith(PACKAGE):
                    # `import millvae.x.y` binds the package too, but the edge that matters is x.y
                    (lazy if inner else top)[mod].add(r)
    return top, lazy


def _inside_function(tree: ast.AST, target: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Floor 0: imports nothing of ours; else one above the highest it imports (cycles cut)."""
    memo: dict[str, int] = {}

    def floor(v: str, seen: frozenset) -> int:
        if v in memo:
            return memo[v]
        below = [floor(w, seen | {v}) for w in graph[v] if w not in seen and w != v]
        memo[v] = 1 + max(below) if below else 0
        return memo[v]

    return {v: floor(v, frozenset()) for v in graph}


def longest(mods: dict[str, Path], kind: type, n: int = 10) -> list[tuple[int, str]]:
    rows = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind) or (
                kind is ast.FunctionDef and isinstance(node, ast.AsyncFunctionDef)
            ):
                rows.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))
    return sorted(rows, reverse=True)[:n]


TRACER = r"""
import json, sys, threading
root = sys.argv[1]
calls = {}   # (file, first line, name) of every package function that ran
edges = set()  # direct caller -> callee pairs, both package functions

def ours(code):
    return code.co_filename.startswith(root) and not code.co_name.startswith("<")

def prof(frame, event, arg):
    if event != "call" or not ours(frame.f_code):
        return
    c = frame.f_code
    key = (c.co_filename, c.co_firstlineno, c.co_qualname)
    calls[key] = True
    back = frame.f_back
    if back is not None and ours(back.f_code):
        b = back.f_code
        edges.add(((b.co_filename, b.co_firstlineno, b.co_qualname), key))

sys.setprofile(prof)
threading.setprofile(prof)
from millvae.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
sys.setprofile(None)
json.dump({"calls": list(calls), "edges": [list(e) for e in edges]}, sys.stdout)
"""


def trace_main(root: Path, workdir: Path) -> dict:
    """One real `millvae train` (synthetic data, one epoch), every package call recorded."""
    argv = ["train", "--data", "synthetic", "--epochs", "1", "--bootstrap", "10"]
    env = {
        "PYTHONPATH": str(root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
        "MILLVAE_CACHE": str(workdir / "cache"),
        "MILLVAE_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
    }
    tracer = workdir / "tracer.py"
    tracer.write_text(TRACER)
    out = subprocess.run(
        [sys.executable, str(tracer), str(root / PACKAGE), *argv],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def spans(path: Path) -> dict[int, int]:
    """First line of each def (decorators excluded, as in co_firstlineno) -> its length."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            out[first] = node.end_lineno - first + 1
    return out


def main_flow(root: Path, traced: dict) -> dict:
    """The entry modules (cli.main down to the module that holds train_run), and one hop out.

    A reader reads the entry modules' functions that ran and, once each, every package function
    they call directly; the files are where those functions live, the lines their bodies.
    """
    calls = [tuple(c) for c in traced["calls"]]
    edges = [(tuple(a), tuple(b)) for a, b in traced["edges"]]
    by_name = {c[2]: c for c in calls}
    target = by_name["train_run"]
    parents: dict[tuple, set[tuple]] = {}
    for a, b in edges:
        parents.setdefault(b, set()).add(a)
    chain, todo = {target}, [target]
    while todo:
        for p in parents.get(todo.pop(), ()):
            if p not in chain:
                chain.add(p)
                todo.append(p)
    entry_files = {c[0] for c in chain}
    read = {c for c in calls if c[0] in entry_files}
    read |= {b for a, b in edges if a[0] in entry_files}
    lines = 0
    span_cache: dict[str, dict[int, int]] = {}
    for f, first, _ in read:
        span_cache.setdefault(f, spans(Path(f)))
        lines += span_cache[f].get(first, 0)
    rel = sorted({str(Path(f).relative_to(root)) for f, _, _ in read})
    return {
        "entry": sorted(str(Path(f).relative_to(root)) for f in entry_files),
        "files": rel,
        "lines": lines,
        "functions": len(read),
        "file_lines": sum(len(Path(root / f).read_text().splitlines()) for f in rel),
        "modules_run": len({c[0] for c in calls}),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--no-trace", action="store_true", help="skip the traced training run")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    mods = modules(root)
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    top, lazy = imports(mods)
    both = {m: top[m] | lazy[m] for m in mods}
    fl = floors(top)
    climbs = sorted(f"{m} -> {t}" for m in mods for t in lazy[m] if fl[t] >= fl[m])
    print(f"root {root}")
    print(f"modules {len(mods)}, lines {sum(sizes.values())}")
    print(f"floors (top-level imports) {max(fl.values()) + 1}")
    print(f"circles, top-level imports: {circles(top) or 0}")
    print(f"circles, with lazy imports: {circles(both) or 0}")
    print(f"lazy imports to the same or a higher floor ({len(climbs)}):")
    for c in climbs:
        print(f"  {c}")
    print("ten longest functions:")
    for n, name in longest(mods, ast.FunctionDef):
        print(f"  {n:4d}  {name}")
    print("five longest classes:")
    for n, name in longest(mods, ast.ClassDef, 5):
        print(f"  {n:4d}  {name}")
    readme = root / "README.md"
    print(f"README lines {len(readme.read_text().splitlines())}")
    if not args.no_trace:
        with tempfile.TemporaryDirectory() as tmp:
            flow = main_flow(root, trace_main(root, Path(tmp)))
        print(
            f"main flow: {len(flow['files'])} files, {flow['lines']} lines of "
            f"{flow['functions']} functions, {flow['file_lines']} lines in those files "
            f"(entry {', '.join(flow['entry'])}; "
            f"{flow['modules_run']} package modules ran in all)"
        )
        for f in flow["files"]:
            print(f"  {f}")


if __name__ == "__main__":
    main()
