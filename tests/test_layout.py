"""The package layout (issue 11 item 7): the core imports neither the experiments nor the tools,
and no two modules import each other (graphs <-> sampling was such a circle), counting imports
inside functions too."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE_CORE = ("gradguide.experiments", "gradguide.bench", "gradguide.tools", "gradguide.cli")


def _modules():
    mods = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "gradguide")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mods[".".join(parts)] = path
    return mods


def _imports(name, path, mods):
    """The gradguide modules ``name`` imports anywhere in its source (not the top package)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out.update(c for c in candidates if c in mods and c not in (name, "gradguide"))
    return out


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_between_modules():
    mods = _modules()
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "gradguide.sampling" not in edges["gradguide.graphs"]

    def own_package(comp):
        # a package and its own submodules (a registry importing its members, which import a
        # helper from the package) is not a circle between modules
        top = min(comp, key=len)
        return all(m == top or m.startswith(top + ".") for m in comp)
    assert [sorted(c) for c in _cycles(edges) if not own_package(c)] == []


def test_core_imports_no_experiment_or_tool():
    mods = _modules()
    core = {m for m in mods if m != "gradguide" and not m.startswith(OUTSIDE_CORE)}
    bad = {m: sorted(t for t in _imports(m, mods[m], mods) if t.startswith(OUTSIDE_CORE)) for m in core}
    assert {m: t for m, t in bad.items() if t} == {}
    # and at run time: importing the library and sampling loads none of them
    code = ("import sys, torch, gradguide as gg\n"
            "gg.sample(lambda x, t: 0 * x, (2, 3), schedule=gg.Schedule.linear(100), steps=3)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({OUTSIDE_CORE!r})))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
