"""The broker layer's imports, read from the source with ``ast``: no import
circle inside ``fastws.broker`` (function-level imports included), no module
importing another's underscore names, the byte layouts only in ``wire``, and
rooms / bridge / resume apart (``rooms`` knows no broker, the broker package
knows no rooms or resume)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fastws

PKG = Path(fastws.__file__).parent
BROKER = sorted((PKG / "broker").glob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list:
    """``(imported module, [names])`` of every import in ``path`` (any depth),
    relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            if not node.module:            # from . import x: x may be a submodule
                for n in names:
                    out.append((f"{mod}.{n}", []))
            out.append((mod, names))
    return out


def known(mod: str, modules: set) -> str | None:
    """The module of ``modules`` that ``mod`` names (or whose package it is)."""
    while mod:
        if mod in modules:
            return mod
        mod = mod.rpartition(".")[0]
    return None


def test_no_import_circle_in_the_broker_package():
    modules = {module_name(p): p for p in BROKER}
    graph = {m: set() for m in modules}
    for m, p in modules.items():
        for mod, _ in imports(p):
            target = known(mod, set(modules))
            if target is not None and target != m:
                graph[m].add(target)
    # depth-first search for a cycle; report the first one found
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # the two modules everything builds on import nothing else of the package
    assert graph["fastws.broker.wire"] == set()
    assert graph["fastws.broker.base"] == {"fastws.broker.wire"}


def test_no_module_imports_another_modules_underscore_names():
    files = BROKER + [PKG / "rooms.py", PKG / "resume.py"]
    bad = []
    for p in files:
        for mod, names in imports(p):
            if mod.startswith("fastws"):
                bad += [f"{p.name}: from {mod} import {n}" for n in names if n.startswith("_")]
    assert bad == []


def test_layouts_live_in_wire_and_the_parts_stay_apart():
    # struct layouts: only wire (the embedded link still catches struct.error)
    for p in BROKER:
        if p.name != "wire.py":
            assert not re.search(r"struct\.Struct\(", p.read_text()), p.name
    for p in BROKER:
        mods = [m for m, _ in imports(p)]
        assert not any(m.startswith(("fastws.rooms", "fastws.resume")) for m in mods), p.name
    rooms = [m for m, _ in imports(PKG / "rooms.py")]
    assert not any(m.startswith("fastws.broker") for m in rooms), rooms
    # rooms keeps membership, seq, batching, limits, local publish: no stream
    # ids, entries or replay in its code (its docstring may say who uses the hook)
    tree = ast.parse((PKG / "rooms.py").read_text())
    idents = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    idents |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    idents |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    idents |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    leaked = {i for i in idents if re.search(r"stream|replay|entry|fid|_id$|resume", i.lower())}
    assert leaked == set()
    bridge = (PKG / "broker" / "bridge.py").read_text()
    assert "hasattr(" not in bridge and "._rooms" not in bridge and "hub.connections" not in bridge
