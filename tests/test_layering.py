"""Layering (issue 10): the agent layer, ops, replication, the integrations, the CLI and the
Store facade are built on the engine's public interface — no module of theirs reads or
writes another layer's private state (the CLI's internals all go through
walstore/cli/_engine.py, on ``Store.engine``, ``reversible_files``, ``txn_history`` and the
Store's methods; the facade, walstore/store.py, on the Engine's and the agent layer's
public names).

The rule, checked by parsing walstore/ with ``ast`` (no import, no type inference):

- A *layer* is a subpackage of walstore (``walstore/agent/``, ``walstore/engine/``,
  ``walstore/log/``, ...); every top-level module is a layer of its own, the facade
  ``walstore/store.py`` (layer ``store``) among them.
- A private member ``_name`` (one leading underscore, not a dunder) *belongs to* a layer
  when a class of that layer defines it: a method, a class-body assignment, an entry of
  ``__slots__``, or ``self._name = ...`` / ``cls._name = ...`` in one of its methods.
- In a checked layer (CHECKED below) an access ``x._name`` — or ``getattr(x, "_name"[,
  default])``, ``setattr``/``hasattr``/``delattr`` with the name a string literal — whose
  receiver ``x`` is not ``self``, ``cls`` or ``super()`` is a reach-in when ``_name``
  belongs to another layer and either (a) to no class of the accessing layer, or (b)
  ``x`` is a name (or a ``self.`` attribute) that the code base uses for another layer's
  object (HOLDERS: a store, a transaction, an engine, a log) — (b) catches a name both
  layers happen to use, e.g. ``store._engine`` read by replication, whose own ``Source``
  also has an ``_engine`` (a holder of the accessing layer's own kind is its own object:
  the facade's ``store._engine``).

- The same for a layer's module-level privates (a function, class or constant named
  ``_name`` at a module's top level): a checked layer neither imports one from another
  layer's module (``from ..engine.snapshot import _purged_since``; ``from ..engine import
  _x`` of a package's ``__init__``) nor reads one through a module of another layer it
  imported (``fapply._pin_dir``, ``import walstore.files.apply as fapply``; through
  ``getattr`` too), in any of its modules, a package's ``__init__.py`` too.

Without type inference the rule is by name: a private name only walstore's own classes
define is what it can see (a third-party object's privates, e.g. langgraph's, are not
walstore's layering and are not checked), and ALLOWED lists, each with why, what stays.
"""
from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "walstore"
# the layers issue 10 puts on the engine's public interface (the CLI since audit 70: it
# read ``store._engine`` and ``store._files``, now ``Store.engine`` / ``reversible_files``;
# since audit 71 ``store._history`` and ``store._twophase``, now ``Store.txn_history`` /
# ``prepared_summaries()``; and the facade: it read ``engine._open_failed`` and imported
# ``agent.scope._providers``, now ``Engine.open_failed`` / ``agent.scope.PROVIDERS``)
CHECKED = ("agent", "ops", "replication", "integrations", "cli", "store")
# names the code base gives a store, transaction, engine or log -> the layer of that object
HOLDERS = {**dict.fromkeys(("store", "s", "_store"), "store"),
           **dict.fromkeys(("tx", "txn", "_tx", "engine", "eng", "_engine"), "engine"),
           **dict.fromkeys(("log", "writer", "_log", "_writer"), "log")}
# the builtins whose second argument, a string literal, names an attribute of the first
BY_NAME = ("getattr", "setattr", "hasattr", "delattr")
# (module, receiver, attribute): what stays, and why
ALLOWED: dict[tuple[str, str, str], str] = {
    # UndoPlan is undo.py's own dataclass: the undo keeps its working state on the plan it
    # made (``_restore``, ``_files``, ``_force``, ``_changed``, ``_oldest``), out of the
    # plan's fields (its repr, as_dict and constructor); only ``_oldest`` is also a name
    # replication.targets' classes use — a collision of names, not a reach-in
    ("walstore.agent.undo", "plan", "_oldest"): "undo.py's own UndoPlan (name collision)",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root.parent).with_suffix("").parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "store" if module == "walstore.store" else module


def _class_members(cls: ast.ClassDef):
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Name):
                yield t.id
                if t.id == "__slots__" and node.value is not None:
                    yield from (c.value for c in ast.walk(node.value)
                                if isinstance(c, ast.Constant) and isinstance(c.value, str))


def _self_stores(nodes: list):
    """``self._name = ...`` / ``cls._name = ...`` in a module (its classes' methods: one
    walk of the module, not one more of each class)."""
    for node in nodes:
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            yield node.attr


def _receiver_is_self(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in ("self", "cls")
            or isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super")


def _holder(node: ast.expr) -> str | None:
    """The layer of the object ``node`` names by the code base's habit (HOLDERS), or None."""
    if isinstance(node, ast.Name):
        return HOLDERS.get(node.id)
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self"):
        return HOLDERS.get(node.attr)
    return None


def _private_accesses(nodes: list):
    """(line, receiver, name) of each access of a private member in ``nodes``:
    ``x._name``, and ``getattr(x, "_name"[, default])`` (``setattr``, ``hasattr``,
    ``delattr`` too) with the name a string literal."""
    for node in nodes:
        if isinstance(node, ast.Attribute):
            if _private(node.attr):
                yield node.lineno, node.value, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in BY_NAME and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            yield node.lineno, node.args[0], node.args[1].value


def _top_level_privates(tree: ast.Module) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        for t in (node.targets if isinstance(node, ast.Assign)
                  else [node.target] if isinstance(node, ast.AnnAssign) else []):
            if isinstance(t, ast.Name):
                out.add(t.id)
    return {n for n in out if _private(n)}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    # (a package's ``__init__`` is a module name one part longer than the package: ``.``
    # in walstore/agent/__init__.py is walstore.agent, as in walstore/agent/undo.py)
    base = module.split(".")[:len(module.split(".")) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _tree_of(trees: dict, name: str) -> str | None:
    """The key of module ``name`` in ``trees`` (a package: its ``__init__``), or None."""
    return name if name in trees else f"{name}.__init__" if f"{name}.__init__" in trees \
        else None


def _module_reach_ins(module: str, nodes: list, accesses: list, trees: dict,
                      privates) -> list:
    """Another layer's module-level privates, imported by name or read through its
    module (see the module docstring); ``nodes``: the module's, ``accesses``: its
    ``_private_accesses``, ``privates(key)``: a module's top-level ones."""
    layer, found = _layer(module), []
    aliases: dict[str, str] = {}  # a name bound to another layer's module here -> it
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            src = _tree_of(trees, source)
            for a in node.names:
                sub = _tree_of(trees, f"{source}.{a.name}")
                if sub is not None:
                    if _layer(sub) != layer:
                        aliases[a.asname or a.name] = sub
                elif (src is not None and _layer(src) != layer and _private(a.name)
                      and a.name in privates(src)):
                    found.append((module, node.lineno, source, a.name))
        elif isinstance(node, ast.Import):  # (``import walstore.engine.snapshot as sn``)
            for a in node.names:
                sub = _tree_of(trees, a.name)
                if a.asname and sub is not None and _layer(sub) != layer:
                    aliases[a.asname] = sub
    for line, recv, attr in accesses:
        key = (aliases.get(recv.id) if isinstance(recv, ast.Name) else
               _tree_of(trees, ast.unparse(recv)) if isinstance(recv, ast.Attribute)
               else None)  # (the latter: ``walstore.engine.snapshot._x``)
        if key is not None and _layer(key) != layer and attr in privates(key):
            found.append((module, line, ast.unparse(recv), attr))
    return found


def reach_ins(root: Path | None = None) -> list[tuple[str, int, str, str]]:
    """Every reach-in of a checked layer: (module, line, receiver, attribute).  Only
    walstore's own tree is read once per session: a synthetic tree is read every time
    (pytest 9 gives a test the directory a passed test before it had, emptied: cached by
    path, the second read the first's tree)."""
    return list(_package_reach_ins() if root is None else _reach_ins(root))


@functools.lru_cache(maxsize=None)
def _package_reach_ins() -> tuple[tuple[str, int, str, str], ...]:
    return _reach_ins(PKG)


def _reach_ins(root: Path) -> tuple[tuple[str, int, str, str], ...]:
    trees = {_module(p, root): ast.parse(p.read_text(), str(p))
             for p in sorted(root.rglob("*.py"))}
    privates = functools.lru_cache(maxsize=None)(lambda key: _top_level_privates(trees[key]))
    walked = {module: list(ast.walk(tree)) for module, tree in trees.items()}  # (once)
    owners: dict[str, set[str]] = defaultdict(set)  # private name -> layers defining it
    for module, nodes in walked.items():
        for name in _self_stores(nodes):
            if _private(name):
                owners[name].add(_layer(module))
        for cls in nodes:
            if isinstance(cls, ast.ClassDef):
                for name in _class_members(cls):
                    if _private(name):
                        owners[name].add(_layer(module))
    found = []
    for module, nodes in walked.items():
        layer = _layer(module)
        if layer not in CHECKED:
            continue
        accesses = list(_private_accesses(nodes))
        found += _module_reach_ins(module, nodes, accesses, trees, privates)
        for line, recv, attr in accesses:
            if _receiver_is_self(recv):
                continue
            others = owners.get(attr, set()) - {layer}
            if others and (layer not in owners[attr]
                           or _holder(recv) not in (None, layer)):
                found.append((module, line, ast.unparse(recv), attr))
    return tuple(sorted(found))


def test_the_agent_ops_replication_integrations_and_cli_layers_reach_into_no_private_state():
    """No module of walstore/agent, ops, replication, integrations or cli reads or writes a
    private member another layer's class defines (``tx._check_writable``,
    ``store._engine``, ``log._open_new``, ``tx._finish_as_decided``, ...), but for ALLOWED."""
    found = [f"{m}:{line} {recv}.{attr}" for m, line, recv, attr in reach_ins()
             if (m, recv, attr) not in ALLOWED]
    assert found == []


def test_every_allowed_reach_in_is_still_there():
    """An ALLOWED entry the code no longer has is dropped from the list, not kept as a
    blank cheque."""
    present = {(m, recv, attr) for m, _, recv, attr in reach_ins()}
    assert sorted(set(ALLOWED) - present) == []


def test_the_checker_sees_a_reach_in(tmp_path):
    """The rule itself: a module of the agent layer that reads ``tx._set`` and
    ``store._engine`` is caught (the latter though its own class has an ``_engine``
    too), and so is one importing an engine module's private function or reading it
    through the module; ``self._x`` / ``super()._x`` and public names are not."""
    root = tmp_path / "walstore"
    (root / "agent").mkdir(parents=True)
    (root / "engine").mkdir()
    (root / "engine" / "tx.py").write_text(
        "class Transaction:\n    def _set(self): pass\n")
    (root / "store.py").write_text(
        "class Store:\n    def __init__(self):\n        self._engine = None\n")
    (root / "agent" / "a.py").write_text(
        "class Source:\n"
        "    def __init__(self, store):\n"
        "        self._engine = store._engine\n"
        "    def f(self, tx):\n"
        "        tx._set()\n        self._engine\n        super()._set\n")
    (root / "engine" / "snap.py").write_text("def _as_of(): pass\ndef public(): pass\n")
    (root / "agent" / "b.py").write_text(
        "from ..engine.snap import _as_of, public\nfrom ..engine import snap as s2\n"
        "s2._as_of()\ns2.public()\n")
    assert sorted((m, r, a) for m, _, r, a in reach_ins(root)) == [
        ("walstore.agent.a", "store", "_engine"), ("walstore.agent.a", "tx", "_set"),
        ("walstore.agent.b", "s2", "_as_of"),
        ("walstore.agent.b", "walstore.engine.snap", "_as_of")]


def test_the_checker_sees_getattr_by_name_and_the_facades_reach_ins(tmp_path):
    """``getattr(tx, "_set")`` / ``getattr(store, "_engine", None)`` / ``setattr`` with a
    string-literal private name is a reach-in as ``tx._set`` is (the check could not see
    them: audit 71), a module's private read through ``getattr`` too; and the facade,
    walstore/store.py, is checked: its ``engine._open`` (the Engine's private) and an
    import of an agent module's private are caught, its own ``store._engine`` (a store
    is the facade's own object) and ``getattr(x, name)`` with a name not a literal are
    not."""
    root = tmp_path / "walstore"
    (root / "agent").mkdir(parents=True)
    (root / "engine").mkdir()
    (root / "engine" / "engine.py").write_text(
        "class Engine:\n    def _open(self): pass\n    def _set(self): pass\n"
        "def _helper(): pass\n")
    (root / "agent" / "scope.py").write_text("_providers = []\n")
    (root / "store.py").write_text(
        "from .agent.scope import _providers\n"
        "class Store:\n    def __init__(self, engine):\n        self._engine = engine\n"
        "        engine._open()\n        getattr(self, '_engine')\n"
        "def close_all(store):\n    store._engine\n")
    (root / "agent" / "a.py").write_text(
        "from ..engine import engine as em\n"
        "def f(tx, store, name):\n"
        "    getattr(tx, '_set')()\n    getattr(store, '_engine', None)\n"
        "    setattr(tx, '_set', None)\n    getattr(tx, name)\n    getattr(tx, 'public')\n"
        "    getattr(em, '_helper')\n")
    assert sorted((m, r, a) for m, _, r, a in reach_ins(root)) == [
        ("walstore.agent.a", "em", "_helper"),
        ("walstore.agent.a", "store", "_engine"), ("walstore.agent.a", "tx", "_set"),
        ("walstore.agent.a", "tx", "_set"),
        ("walstore.store", "engine", "_open"),
        ("walstore.store", "walstore.agent.scope", "_providers")]
