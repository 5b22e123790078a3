"""Layering (issue 10): the agent layer, ops, replication, the integrations and the CLI are
built on the engine's public interface — no module of theirs reads or writes another layer's
private state (the CLI's internals all go through walstore/cli/_engine.py, whose remaining
reads of a store's privates ALLOWED lists).

The rule, checked by parsing walstore/ with ``ast`` (no import, no type inference):

- A *layer* is a subpackage of walstore (``walstore/agent/``, ``walstore/engine/``,
  ``walstore/log/``, ...); ``walstore/store.py`` is the engine's public face and counts as
  the engine layer; every other top-level module is a layer of its own.
- A private member ``_name`` (one leading underscore, not a dunder) *belongs to* a layer
  when a class of that layer defines it: a method, a class-body assignment, an entry of
  ``__slots__``, or ``self._name = ...`` / ``cls._name = ...`` in one of its methods.
- In a checked layer (CHECKED below) an access ``x._name`` whose receiver ``x`` is not
  ``self``, ``cls`` or ``super()`` is a reach-in when ``_name`` belongs to another layer
  and either (a) to no class of the accessing layer, or (b) ``x`` is a name (or a
  ``self.`` attribute) that the code base uses for another layer's object (HOLDERS: a
  store, a transaction, an engine, a log) — (b) catches a name both layers happen to use,
  e.g. ``store._engine`` read by replication, whose own ``Source`` also has an ``_engine``.

- The same for a layer's module-level privates (a function, class or constant named
  ``_name`` at a module's top level): a checked layer neither imports one from another
  layer's module (``from ..engine.snapshot import _purged_since``; ``from ..engine import
  _x`` of a package's ``__init__``) nor reads one through a module of another layer it
  imported (``fapply._pin_dir``, ``import walstore.files.apply as fapply``), in any of
  its modules, a package's ``__init__.py`` too.

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
# read ``store._engine`` and ``store._files``, now ``Store.engine`` / ``reversible_files``)
CHECKED = ("agent", "ops", "replication", "integrations", "cli")
# names the code base gives another layer's store, transaction, engine or log
HOLDERS = {"store", "s", "tx", "txn", "engine", "eng", "log", "writer",
           "_store", "_tx", "_engine", "_log", "_writer"}
# (module, receiver, attribute): what stays, and why
ALLOWED: dict[tuple[str, str, str], str] = {
    # UndoPlan is undo.py's own dataclass: the undo keeps its working state on the plan it
    # made (``_restore``, ``_files``, ``_force``, ``_changed``, ``_oldest``), out of the
    # plan's fields (its repr, as_dict and constructor); only ``_oldest`` is also a name
    # replication.targets' classes use — a collision of names, not a reach-in
    ("walstore.agent.undo", "plan", "_oldest"): "undo.py's own UndoPlan (name collision)",
    # the CLI's door into the internals (walstore/cli/_engine.py) reads what no public
    # Store or Engine method gives: ``_history.iter_log`` (`walstore log` streams the log;
    # ``Store.log`` returns a list, held whole), ``_history.check_file_history``,
    # ``_history.file_history`` and ``_history.unapplied_purges`` (`walstore files` /
    # `diff` read the file history and the purges LMDB does not hold yet)
    ("walstore.cli._engine", "store", "_history"): "CLI: streamed log, file history, purges",
    # ``_twophase.summaries()``: `walstore prepared` lists every in-doubt transaction in
    # one pass, summaries only (``Store.prepared_details(gid)`` reads one, values decoded)
    ("walstore.cli._engine", "store", "_twophase"): "CLI: in-doubt summaries in one pass",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root.parent).with_suffix("").parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "walstore.store":
        return "engine"
    return parts[1] if len(parts) > 2 else module


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


def _holder(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in HOLDERS
    return (isinstance(node, ast.Attribute) and node.attr in HOLDERS
            and isinstance(node.value, ast.Name) and node.value.id == "self")


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


def _module_reach_ins(module: str, nodes: list, trees: dict, privates) -> list:
    """Another layer's module-level privates, imported by name or read through its
    module (see the module docstring); ``nodes``: the module's, ``privates(key)``: a
    module's top-level ones."""
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
    for node in nodes:
        if isinstance(node, ast.Attribute) and _private(node.attr):
            recv = node.value
            key = (aliases.get(recv.id) if isinstance(recv, ast.Name) else
                   _tree_of(trees, ast.unparse(recv)) if isinstance(recv, ast.Attribute)
                   else None)  # (the latter: ``walstore.engine.snapshot._x``)
            if key is not None and _layer(key) != layer and node.attr in privates(key):
                found.append((module, node.lineno, ast.unparse(recv), node.attr))
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
        found += _module_reach_ins(module, nodes, trees, privates)
        for node in nodes:
            if not (isinstance(node, ast.Attribute) and _private(node.attr)) or \
                    _receiver_is_self(node.value):
                continue
            others = owners.get(node.attr, set()) - {layer}
            if others and (layer not in owners[node.attr] or _holder(node.value)):
                found.append((module, node.lineno, ast.unparse(node.value), node.attr))
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
