"""The package is built in four layers; each imports only from the layers below it.

    1  frames, errors, config (and origins, proxy, version): the shared vocabulary
    2  engines and connections: core, _core (Cython), _wsproto_engine, _pyconn, handshake
    3  the node: app, node, rooms, delivery, resume, limits, broker/, health, metrics,
       stats, publish_api, presence, roomproto, regions
    4  the fronts: server, supervisor, asgi/, runner, the CLI (fastws.cli), and the
       package's own __init__ (the public API re-exports everything)

``fastws.bench`` (the benchmark tooling) sits beside the layers: it may use
the public API but nothing may import it except the CLI.

``fastws.client`` (the Python client) sits beside the layers too: it uses the
vocabulary and the engines (layers 1 and 2: frames, errors, config, core,
handshake), never the node or the fronts; of the server's modules only the
package's own ``__init__`` (``fastws.connect``) imports it, and the bench.

Checked over the source with ``ast`` (and a regular expression for the
Cython ``.pyx``/``.pxi`` files): every import between fastws modules, at
module level or not.  The rules:

* no module imports from a higher layer;
* no import circle between modules;
* no function-level import of a fastws module (the usual way to hide a circle); the
  imports of a module-level ``if TYPE_CHECKING:`` block count as module-level (they
  are read by type checkers only, and obey the other rules all the same);
* no module takes another layer's underscore names (``from x import _y``,
  ``x._y`` on an imported module).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "fastws"
CLI = ROOT / "cli"

LAYER_OF = {
    # 1: the vocabulary
    "fastws.frames": 1, "fastws.errors": 1, "fastws.config": 1, "fastws.origins": 1,
    "fastws.version": 1, "fastws.proxy": 1,
    # 2: engines and connections
    "fastws.core": 2, "fastws._core": 2, "fastws._wsproto_engine": 2, "fastws._pyconn": 2,
    "fastws.handshake": 2,
    # 3: the node
    "fastws.app": 3, "fastws.node": 3, "fastws.rooms": 3, "fastws.delivery": 3, "fastws.resume": 3,
    "fastws.limits": 3, "fastws.broker": 3, "fastws.health": 3, "fastws.metrics": 3,
    "fastws.stats": 3, "fastws.publish_api": 3, "fastws.presence": 3, "fastws.roomproto": 3,
    "fastws.regions": 3, "fastws.memory": 3,
    # 4: the fronts
    "fastws.server": 4, "fastws.supervisor": 4, "fastws.asgi": 4, "fastws.socketio": 4, "fastws.runner": 4,
    "fastws.cli": 4, "fastws": 4,
    # gateway mode: a front (it serves an app's routes from a backend, on the node's services)
    "fastws.gateway": 4,
    # beside the layers
    "fastws.bench": 5,
    "fastws.client": 6,
}
#: the layers the client (fastws.client, beside the server's layers) may import
CLIENT_MAY_IMPORT = (1, 2)


def module_name(path: Path) -> str:
    if path.is_relative_to(CLI):
        rel = path.relative_to(CLI).with_suffix("")
        parts = ["fastws", "cli", *rel.parts]
    else:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[-1].startswith("_core_"):      # a .pxi included by _core.pyx
        parts[-1] = "_core"
    return ".".join(parts)


def layer(module: str) -> int:
    """The layer of ``module``: its own entry, else its package's."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in LAYER_OF:
            return LAYER_OF[name]
        parts.pop()
    raise KeyError(module)


def sources() -> list[Path]:
    files = [p for p in PKG.rglob("*") if p.suffix in (".py", ".pyx", ".pxi")]
    files += list(CLI.rglob("*.py"))
    return sorted(p for p in files if "__pycache__" not in p.parts)


def resolve(module: str, level: int, name: str | None, is_package: bool) -> str:
    """The absolute name of a ``from ...name import`` in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    # cli/ is installed as fastws.cli: its relative imports stay inside it
    return ".".join(base + ([name] if name else []))


class Import:
    __slots__ = ("target", "names", "line", "top_level")

    def __init__(self, target, names, line, top_level):
        self.target, self.names, self.line, self.top_level = target, names, line, top_level


PYX_IMPORT = re.compile(r"^([ \t]*)(?:from\s+(\.*)([\w.]*)\s+c?import\s+(.+)|c?import\s+([\w.]+))", re.M)


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    is_package = path.name == "__init__.py"
    text = path.read_text()
    out = []
    if path.suffix in (".pyx", ".pxi"):
        for m in PYX_IMPORT.finditer(text):
            indent, dots, name, names, plain = m.groups()
            line = text.count("\n", 0, m.start()) + 1
            if plain:
                target = plain
                imported = []
            else:
                target = resolve(module, len(dots), name or None, False)
                imported = [n.strip().split(" as ")[0] for n in names.strip("() ").split(",")]
            if target.startswith("fastws"):
                out.append(Import(target, imported, line, not indent))
        return out
    tree = ast.parse(text)
    top = set(map(id, tree.body))
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            top.update(map(id, node.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, node.level, node.module, is_package)
            names = [a.name for a in node.names]
            if target.startswith("fastws"):
                # "from . import x" may name a submodule
                out.append(Import(target, names, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fastws"):
                    out.append(Import(a.name, [], node.lineno, id(node) in top))
    return out


def targets(imp: Import) -> list[str]:
    """The modules an import loads: ``from pkg import sub`` loads pkg.sub."""
    known = {module_name(p) for p in sources()}
    out = [imp.target]
    for n in imp.names:
        sub = f"{imp.target}.{n}"
        if sub in known:
            out.append(sub)
    return out


ALL = {module_name(p): p for p in sources()}
GRAPH = {m: imports_of(p) for m, p in ALL.items()}


def test_every_module_has_a_layer():
    missing = [m for m in ALL if not any(m == k or m.startswith(k + ".") for k in LAYER_OF)]
    assert not missing, f"give these modules a layer in LAYER_OF: {missing}"


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for module, imps in GRAPH.items():
        if module == "fastws" or layer(module) in (5, 6):
            continue           # beside the layers: their own tests below
        for imp in imps:
            for t in targets(imp):
                if t == "fastws":
                    continue           # the package itself (its __init__ runs first anyway)
                if module.startswith("fastws.cli") and layer(t) == 5:
                    continue           # `fastws bench` is a command of the CLI
                if layer(t) > layer(module):
                    bad.append(f"{ALL[module].relative_to(ROOT)}:{imp.line} ({module}, layer "
                               f"{layer(module)}) imports {t} (layer {layer(t)})")
    assert not bad, "\n".join(bad)


def test_client_imports_only_the_vocabulary_and_the_engines():
    bad = []
    for module, imps in GRAPH.items():
        if layer(module) != 6:
            continue
        for imp in imps:
            for t in targets(imp):
                if layer(t) not in CLIENT_MAY_IMPORT and layer(t) != 6:
                    bad.append(f"{ALL[module].relative_to(ROOT)}:{imp.line} ({module}) imports {t} "
                               f"(layer {layer(t)})")
    assert not bad, "\n".join(bad)
    assert any(layer(m) == 6 for m in GRAPH), "no fastws.client module found"


def test_client_is_imported_only_by_the_package_and_the_bench():
    bad = [f"{ALL[module].relative_to(ROOT)}:{imp.line} ({module}) imports {t}"
           for module, imps in GRAPH.items() for imp in imps for t in targets(imp)
           if layer(t) == 6 and layer(module) not in (5, 6) and module != "fastws"]
    assert not bad, "\n".join(bad)


def test_bench_is_imported_by_the_cli_alone():
    bad = [f"{module}:{imp.line}" for module, imps in GRAPH.items() for imp in imps
           if imp.target.startswith("fastws.bench") and layer(module) != 5
           and not module.startswith("fastws.cli")]
    assert not bad, bad


def test_no_function_level_import_of_a_fastws_module():
    bad = [f"{ALL[m].relative_to(ROOT)}:{imp.line} imports {imp.target} inside a function"
           for m, imps in GRAPH.items() for imp in imps if not imp.top_level]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    edges = {m: set() for m in ALL}
    for m, imps in GRAPH.items():
        for imp in imps:
            for t in targets(imp):
                if t in ALL and t != m and t != "fastws":
                    edges[m].add(t)
    # Tarjan's strongly connected components
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not sccs, f"import circles: {sccs}"


def test_no_underscore_names_taken_across_layers():
    bad = []
    for module, imps in GRAPH.items():
        for imp in imps:
            if imp.target in ALL and layer(imp.target) != layer(module):
                for n in imp.names:
                    if (n.startswith("_") and not n.startswith("__")
                            and f"{imp.target}.{n}" not in ALL):
                        bad.append(f"{ALL[module].relative_to(ROOT)}:{imp.line} takes {imp.target}.{n}")
    # attribute access on an imported module: ``core._engine_module``
    for module, path in ALL.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                target = resolve(module, node.level, node.module, path.name == "__init__.py")
                for a in node.names:
                    if f"{target}.{a.name}" in ALL:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in ALL:
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                target = aliases[node.value.id]
                if layer(target) != layer(module):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["fastws.frames", "fastws.errors", "fastws.config", "fastws.origins",
                                    "fastws.version"])
def test_layer_one_imports_only_layer_one(module):
    for imp in GRAPH[module]:
        assert layer(imp.target) == 1, f"{module}:{imp.line} imports {imp.target}"
