"""The attribution engine's structure, read from its source: its rooms talk through the declared engine
state (no module reads or writes another module's object's underscore names, no options set onto an
object with setattr, no room imports the scorer), and no import circle in p2t/ (every import counts,
function-level ones too: an import moved into a function to break a circle is still a circle)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "p2t")
ATTRIBUTION = os.path.join(PKG, "attribution")
# torch.nn.Module's own tables, read by the freeze walk (methods.frozen): a library's internals, not a room's
ALLOWED_PRIVATE = {"_parameters", "_modules"}
# the modules built on the scorer (a subclass, a ready-made scorer); every other module is a room
ABOVE_SCORER = {"scorer", "multimodal", "minilm", "__init__"}


def _sources(folder: str) -> Dict[str, str]:
    return {f[:-3]: open(os.path.join(folder, f), encoding="utf-8").read()
            for f in sorted(os.listdir(folder)) if f.endswith(".py")}


def private_accesses(source: str) -> List[str]:
    """``name._private`` reads and writes of an object other than ``self`` / ``cls``, and private names
    imported from another module (``from .x import _y``), as ``line: text``."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            a = node.attr
            if a.startswith("_") and not a.startswith("__") and a not in ALLOWED_PRIVATE:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


def setattr_calls(source: str) -> List[str]:
    return [f"{n.lineno}: {ast.unparse(n)}" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "setattr"]


def test_the_scan_finds_what_it_forbids():
    """The scans catch the patterns the engine used to have (a room reading the scorer's state and writing
    it back, options set onto the scorer, a private helper imported from another module)."""
    old = ("def f(scorer):\n    x = scorer._plan(1)\n    scorer._vmap_ok = False\n    type(scorer)._inputs_embeds\n"
           "from .align import _within\n"
           "def apply(self, obj):\n    for k in self.names:\n        setattr(obj, k, getattr(self, k))\n")
    assert len(private_accesses(old)) == 4 and len(setattr_calls(old)) == 1
    assert private_accesses("def g(self):\n    return self._x, cls._y, m._parameters\n") == []


def test_no_room_reaches_into_another_modules_private_names():
    bad = {name: hits for name, src in _sources(ATTRIBUTION).items() if (hits := private_accesses(src))}
    assert not bad, f"underscore names of another module's objects: {bad}"


def test_no_options_set_with_setattr():
    bad = {name: hits for name, src in _sources(ATTRIBUTION).items() if (hits := setattr_calls(src))}
    assert not bad, f"setattr in p2t/attribution: {bad}"


def _imports(path: str, module: str, is_pkg: bool, known: Set[str]) -> Set[str]:
    """The p2t modules ``module`` imports anywhere in its file (module or function level)."""
    out = set()
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:  # import p2t.x.y -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t != module:
                out.add(t)
    return out


def import_graph() -> Dict[str, Set[str]]:
    files = {}
    for d, _, fs in os.walk(PKG):
        for f in fs:
            if f.endswith((".so", ".pyd")):  # a compiled extension: a module that imports nothing of p2t
                files[os.path.relpath(os.path.join(d, f.split(".")[0]), ROOT).replace(os.sep, ".")] = (None, False)
            elif f.endswith(".py") and f != "__main__.py":
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                is_pkg = rel.endswith(".__init__")
                files[rel[:-9] if is_pkg else rel] = (os.path.join(d, f), is_pkg)
    known = set(files)
    return {m: (_imports(p, m, is_pkg, known) if p else set()) for m, (p, is_pkg) in files.items()}


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_attribution_engine():
    graph = import_graph()
    bad = [c for c in circles(graph) if any(m.startswith("p2t.attribution") for m in c)]
    assert not bad, f"import circles through p2t.attribution: {bad}"


def test_rooms_do_not_import_the_scorer():
    graph = import_graph()
    rooms = {f"p2t.attribution.{n}" for n in _sources(ATTRIBUTION) if n not in ABOVE_SCORER}
    bad = sorted(r for r in rooms if "p2t.attribution.scorer" in graph[r])
    assert not bad, f"rooms importing scorer.py: {bad}"


def test_no_import_circle_in_p2t():
    bad = circles(import_graph())
    if bad and all(not any(m.startswith("p2t.attribution") for m in c) for c in bad):
        pytest.xfail(f"import circles outside p2t.attribution: {bad}")
    assert not bad, f"import circles: {bad}"


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module of p2t/, in sorted order, imports in a fresh interpreter (one that has imported nothing
    else of p2t first); the optional dependencies (trl, verl, plotting) are imported inside functions."""
    mods = sorted(m for m in import_graph() if not m.endswith("._C"))
    code = ("import importlib, sys\nfailed = []\nfor m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'p2t' or k.startswith('p2t.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert got.returncode == 0, got.stdout + got.stderr[-2000:]
