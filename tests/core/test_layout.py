"""The package layout (docs/architecture.md#rooms-and-floors): every module and every csrc file sits
in a room, the rooms stand on floors, and an import may only go to the module's own room or down
to a lower floor. Imports inside functions count too; so does ``from gradguide import X``."""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Lowest first. A module may import its own room and any room on a lower floor; rooms on one floor
# may not import each other, except where the floor is marked shared (the applications, which lend
# each other small helpers).  "gradguide" is the top package's __init__ (the public names);
# "_C" is the compiled csrc extension.
FLOORS = (
    ("kernels", "_C"),                                    # Triton kernels and the C++ extension
    ("ops", "schedules", "predictions", "debug", "metrics"),  # backends, noise tables, conversions
    ("linear", "comfy_schedules"),                        # affine operands over ops; ComfyUI's named σ lists
    ("guidance", "samplers"),                             # the terms, the scalar tables
    ("runkey",),                                          # the one description of a run for both caches
    ("projection", "graphs", "stepplan"),                 # PixelAsParam, CUDA graphs, fused plan
    ("config",),                                          # Sampler / Execution / Diagnostics
    ("flow_schedules", "comfy_ksampler"),                 # flow σ schedules, ComfyUI's KSampler (they make Samplers)
    ("sampling",),                                        # the loop
    ("integrations", "adaptive"),                         # diffusers adapters; drivers looping over sample()
    ("gradguide",),                                       # the public names (from_diffusers lazily)
    ("experiments", "tools"),                             # applications (shared floor)
    ("bench",),
    ("cli",),
)
SHARED_FLOORS = {("experiments", "tools")}
OUTSIDE_CORE = ("integrations", "experiments", "tools", "bench", "cli")
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
KERNEL_LIBS = {"triton", "torch"}
CSRC_SYSTEM = re.compile(r"^(ATen/|c10/|torch/|Python\.h$|cuda_runtime\.h$|sys/|[a-z_]+$)")


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


def _room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gradguide"


def _raw_imports(name, path):
    """(absolute module, imported names) for every import statement in ``path``."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _imports(name, path, mods):
    """The gradguide modules ``name`` imports anywhere in its source; ``from gradguide import f``
    of a name that is no module counts as importing the top package."""
    out = set()
    for target, names in _raw_imports(name, path):
        if target != "gradguide" and not target.startswith("gradguide."):
            continue
        subs = [f"{target}.{n}" for n in names]
        hits = [s for s in subs if s in mods or s == "gradguide._C"]
        if target in mods and (len(hits) < len(subs) or not subs):
            hits.append(target)
        out.update(h for h in hits if h != name)
    return out


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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


def test_every_module_sits_in_a_room():
    rooms = {_room(m) for m in _modules()}
    assert rooms - set(FLOOR) == set(), "a new room needs a floor in FLOORS (and docs/architecture.md)"


def test_no_import_goes_up_a_floor():
    mods = _modules()
    bad = []
    for m, path in mods.items():
        here = _room(m)
        for target in _imports(m, path, mods):
            there = _room(target)
            if there == here or here not in FLOOR or there not in FLOOR:
                continue   # an unplaced room fails test_every_module_sits_in_a_room
            same_shared = FLOOR[there] == FLOOR[here] and FLOORS[FLOOR[here]] in SHARED_FLOORS
            if FLOOR[there] >= FLOOR[here] and not same_shared:
                bad.append(f"{m} ({here}, floor {FLOOR[here]}) imports {target} ({there}, floor {FLOOR[there]})")
    assert bad == []


def test_the_floor_check_catches_an_upward_import(tmp_path):
    # the check above must be able to fail: the two imports that once ran up the floors
    mods = _modules()
    kern = tmp_path / "fused.py"
    kern.write_text("from gradguide.ops.policies import POLICIES\n")
    native = tmp_path / "native_backend.py"
    native.write_text("def load():\n    from gradguide import sample\n")
    assert _imports("gradguide.kernels.fused", str(kern), mods) == {"gradguide.ops.policies"}
    assert _imports("gradguide.ops.native_backend", str(native), mods) == {"gradguide"}
    assert FLOOR["ops"] > FLOOR["kernels"] and FLOOR["gradguide"] > FLOOR["ops"]


def test_kernels_import_only_triton_torch_and_each_other():
    mods = _modules()
    bad = []
    for m, path in mods.items():
        if _room(m) != "kernels":
            continue
        for target, _ in _raw_imports(m, path):
            top = target.split(".")[0]
            if target.startswith("gradguide.kernels") or top in KERNEL_LIBS or top == "__future__":
                continue
            if top in sys.stdlib_module_names:
                continue
            bad.append(f"{m} imports {target}")
    assert bad == []


def test_below_ops_nothing_imports_the_loop_or_the_terms():
    mods = _modules()
    upper = {"guidance", "samplers", "sampling"}
    bad = {m: sorted(t for t in _imports(m, p, mods) if _room(t) in upper)
           for m, p in mods.items() if FLOOR.get(_room(m), len(FLOORS)) <= FLOOR["ops"]}
    assert {m: t for m, t in bad.items() if t} == {}


def test_csrc_includes_only_csrc_headers_and_torch():
    folder = os.path.join(ROOT, "csrc")
    own = set(os.listdir(folder))
    bad = []
    for name in sorted(own):
        if not name.endswith((".h", ".cpp", ".cu")):
            continue
        for line in open(os.path.join(folder, name)):
            got = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
            if not got:
                continue
            kind, header = got.groups()
            if kind == '"' and header not in own:
                bad.append(f"{name}: \"{header}\" is not a csrc header")
            elif kind == "<" and not CSRC_SYSTEM.match(header):
                bad.append(f"{name}: <{header}> is neither torch nor the standard library")
    assert bad == []


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


def test_core_imports_no_integration_experiment_or_tool():
    mods = _modules()
    core = {m for m in mods if _room(m) not in OUTSIDE_CORE and m != "gradguide"}
    bad = {m: sorted(t for t in _imports(m, mods[m], mods) if _room(t) in OUTSIDE_CORE) for m in core}
    assert {m: t for m, t in bad.items() if t} == {}
    # and at run time: importing the library and sampling loads none of the applications (the top
    # package loads integrations.diffusers lazily, on first use of from_diffusers)
    outside = tuple(f"gradguide.{r}" for r in OUTSIDE_CORE)
    code = ("import sys, torch, gradguide as gg\n"
            "gg.sample(lambda x, t: 0 * x, (2, 3), schedule=gg.Schedule.linear(100), steps=3)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({outside!r})))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_architecture_page_lists_the_same_floors():
    # docs/architecture.md's table of rooms is the one a contributor reads: it must be this one
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    documented = []
    for line in text.splitlines():
        got = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if got:
            rooms = []
            for name in re.findall(r"`([^`]+)`", got.group(2)):
                if name == "csrc/":
                    continue
                name = {"gradguide._C": "_C", "gradguide/__init__.py": "gradguide"}.get(name, name)
                rooms.append(name.replace("gradguide/", "").rstrip("/").removesuffix(".py"))
            documented.append((int(got.group(1)), tuple(rooms)))
    assert documented == list(enumerate(FLOORS))
