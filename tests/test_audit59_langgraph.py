"""Audit 59 of ``WalstoreSaver.rewind`` and ``copy_thread``, used as a demanding user would.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import collections
import random
import time

import pytest

pytest.importorskip("langgraph")

from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from langgraph.checkpoint.base.id import uuid6  # noqa: E402

import walstore  # noqa: E402
import walstore.engine.transaction as _transaction  # noqa: E402
import walstore.store as _store  # noqa: E402
from walstore.agent.scope import NO_SCOPE  # noqa: E402
from walstore.errors import PointTypeError  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.saver import _Line  # noqa: E402


def _step(saver, cfg, i, ns=""):
    """One step of a graph, as LangGraph saves it: a checkpoint made by the loop, then the
    pending write of its task."""
    c = empty_checkpoint()
    c["id"] = str(uuid6())
    c["channel_values"] = {"x": i}
    c["channel_versions"] = {"x": saver.get_next_version(None if i == 0 else str(i))}
    cfg = dict(cfg["configurable"], checkpoint_ns=ns)
    out = saver.put({"configurable": cfg}, c, {"source": "loop", "step": i},
                    c["channel_versions"])
    saver.put_writes(out, [("x", i)], f"task{i}")
    return out


@pytest.fixture
def counted(monkeypatch):
    """Rows the store hands out: of every ``store.scan`` and transaction scan (by kind),
    and of ``store.log``."""
    rows = collections.Counter()

    def wrap(cls, name):
        orig = getattr(cls, name)

        def scan(self, *a, **k):
            rows["scans"] += 1
            for row in orig(self, *a, **k):
                rows["scan"] += 1
                yield row
        monkeypatch.setattr(cls, name, scan)
    wrap(_store.Store, "scan")
    wrap(_transaction.Transaction, "scan")
    orig_log = _store.Store.log

    def log(self, *a, **k):
        got = orig_log(self, *a, **k)
        rows["log"] += len(got)
        return got
    monkeypatch.setattr(_store.Store, "log", log)
    return rows


def _rows_to_rewind_one_step(tmp_path, n, counted):
    store = walstore.open(str(tmp_path / f"s{n}"), durability="none")
    saver = WalstoreSaver(store)
    cfg = {"configurable": {"thread_id": "t"}}
    sub = {"configurable": {"thread_id": "t"}}
    for i in range(n):
        cfg = _step(saver, cfg, i)
        if i % 10 == 0 and i < 50:  # (a subgraph namespace beside it)
            sub = _step(saver, sub, i, ns="child:1")
    other = {"configurable": {"thread_id": "u"}}
    for i in range(n):  # (another thread, as long)
        other = _step(saver, other, i)
    time.sleep(0.2)  # (the old steps lie well before the last ones, as between turns)
    target = cfg = _step(saver, cfg, n)
    cfg = _step(saver, cfg, n + 1)
    counted.clear()
    plan = saver.rewind(target, dry_run=True)
    dry = dict(counted)
    counted.clear()
    info = saver.rewind(target)
    real = dict(counted)
    assert info is not None
    assert saver.get_tuple({"configurable": {"thread_id": "t"}}).config[
        "configurable"]["checkpoint_id"] == target["configurable"]["checkpoint_id"]
    assert len(list(saver.list({"configurable": {"thread_id": "u"}}))) == n
    store.close()
    return dry, real, plan


def test_rewinding_one_step_reads_as_much_of_a_long_thread_as_of_a_short_one(tmp_path,
                                                                            counted):
    """``saver.rewind`` read every checkpoint and pending write of the thread
    (``_early_work``) and walked every ancestor of the target (``_rewind_plan``'s line):
    rewinding ONE step took 0.006 s beside 20 checkpoints and 0.53 s beside 3,000 (rows
    handed out by scans: 58 for 20, 8,998 for 3,000), where the contract says a rewind's
    cost grows with what it undoes.  Now the same rows are read whatever the thread's
    length (the log's by-time bisection aside: a probe per halving, a few more): of each
    namespace, the rows from the target's id on, and at most 33 below it."""
    short_dry, short_real, short_plan = _rows_to_rewind_one_step(tmp_path, 60, counted)
    long_dry, long_real, long_plan = _rows_to_rewind_one_step(tmp_path, 600, counted)
    assert long_dry["scan"] == short_dry["scan"], (short_dry, long_dry)
    assert long_real["scan"] == short_real["scan"], (short_real, long_real)
    assert long_dry["log"] <= short_dry["log"] + 12, (short_dry, long_dry)
    assert long_real["log"] <= short_real["log"] + 12, (short_real, long_real)
    assert len(long_plan.as_dict()["txids"]) == len(
        short_plan.as_dict()["txids"])


def test_a_thread_of_many_subgraph_namespaces_is_not_read_a_seek_each(tmp_path, counted):
    """A subgraph's checkpoints land in a namespace of their own at each call (its task
    id is in it): a rewind that opened a scan per namespace to read from the target's
    id on (a first version of the fix) took 0.17 s beside 2,000 of them, where reading
    them all took 0.03 s.  The namespaces with few rows below the target are read as
    they come: the scans opened do not grow with their number."""
    opened = []
    for n in (60, 300):
        store = walstore.open(str(tmp_path / f"s{n}"), durability="none")
        saver = WalstoreSaver(store)
        cfg = {"configurable": {"thread_id": "t"}}
        for i in range(n):
            cfg = _step(saver, cfg, i)
            _step(saver, {"configurable": {"thread_id": "t"}}, i, ns=f"sub:{i}")
        time.sleep(0.2)
        target = cfg = _step(saver, cfg, n)
        cfg = _step(saver, cfg, n + 1)
        counted.clear()
        saver.rewind(target, dry_run=True)
        opened.append(counted["scans"])
        assert counted["scan"] <= 3 * (2 * n + 4) + 40  # (no more than all the rows)
        store.close()
    assert opened[1] == opened[0], opened


def _old_line(saver, tx, ns, cid):
    """The line as ``_rewind_plan`` read it before: every ancestor, eagerly."""
    child = tx.get(ns.checkpoint(cid)) or {}
    run_id = child.get("r")
    older, made_by_step = set(), set()
    for at, rec in saver._ancestors(tx, ns, cid, child):
        older.add(at)
        md = saver.codec.loads(child["m"]) if "m" in child else None
        if isinstance(md, dict) and md.get("source") == "loop":
            made_by_step.add(at)
        child = rec
    return run_id, older, made_by_step


@pytest.mark.parametrize("seed", range(6))
def test_the_lazy_line_answers_as_the_whole_line_did(tmp_path, seed):
    """The line of ancestors is now read only as far as a question needs (``_Line``):
    on a forest of forks, ids out of time order (another process's clock), checkpoints
    removed from the middle of a line and ids that name nothing, every answer is the
    one the whole line gave."""
    rng = random.Random(seed)
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store, fencing=False)
    ids: list[str] = []
    for i in range(120):
        cid = f"{rng.randrange(16 ** 6):06x}-{i}"   # (no time order at all)
        parent = None
        if ids and rng.random() < 0.97:
            parent = ids[-1] if rng.random() < 0.7 else rng.choice(ids)
        c = empty_checkpoint()
        c["id"] = cid
        cfg = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                                "checkpoint_id": parent}}
        source = rng.choice(["loop", "loop", "input", "update"])
        saver.put(cfg, c, {"source": source, "step": i}, {})
        ids.append(cid)
    ns = saver.keys.at("t", "")
    with store.transaction(scope=ns.thread_prefix) as tx:  # (some lines broken)
        for cid in rng.sample(ids, 6):
            tx.delete(ns.checkpoint(cid))
    left = [c for c in ids if store.get(ns.checkpoint(c)) is not None]
    asked = ids + ["nothing", "0" * 6, ids[0] + "x"]
    for cid in rng.sample(left, 12):
        tx = store.transaction(scope=NO_SCOPE)
        try:
            run_id, older, made = _old_line(saver, tx, ns, cid)
            line = _Line(saver, tx, ns, cid)
            assert line.run_id == run_id
            order = asked[:]
            rng.shuffle(order)  # (questions in any order: the walk resumes)
            for x in order:
                assert (x in line) == (x in older), (cid, x)
                assert (x in line.made_by_step) == (x in made), (cid, x)
            assert None not in line
            line.close()
        finally:
            tx.rollback()
    store.close()


def _thread_of_three(store):
    saver = WalstoreSaver(store)
    cfg = {"configurable": {"thread_id": "t"}}
    made = []
    for i in range(3):
        cfg = _step(saver, cfg, i)
        made.append(cfg)
    return saver, made


def _state(store):
    return [(k, v) for k, v in store.scan()], [i.txid for i in store.log()]


@pytest.mark.parametrize("config, error", [
    ({"configurable": {}}, ValueError),
    ({}, ValueError),
    ({"configurable": None}, ValueError),
    ({"configurable": {"thread_id": None, "checkpoint_id": "x"}}, ValueError),
    (None, TypeError),
    ("t", TypeError),
    ({"configurable": ["t"]}, TypeError),
    ({"configurable": {"thread_id": "t", "checkpoint_ns": 3}}, TypeError),
    ({"configurable": {"thread_id": "t", "checkpoint_id": 5}}, PointTypeError),
    ({"configurable": {"thread_id": "t", "checkpoint_id": 0}}, PointTypeError),
    ({"configurable": {"thread_id": "t", "checkpoint_id": "nothing"}}, walstore.UnknownPoint),
    ({"configurable": {"thread_id": "empty"}}, walstore.UnknownPoint),
    ({"configurable": {"thread_id": "t", "checkpoint_ns": "sub"}}, walstore.UnknownPoint),
])
@pytest.mark.parametrize("call", ["rewind", "dry_run", "rewind_plan", "rewind_point",
                                  "checkpoint_lsn"])
def test_a_malformed_rewind_config_is_a_clear_walstore_error_and_changes_nothing(
        store, config, error, call):
    """``saver.rewind({"configurable": {}})`` raised a bare ``KeyError('thread_id')``,
    ``None`` or a str as the config AttributeError, an int ``checkpoint_id``
    ``AttributeError: 'int' object has no attribute 'encode'``, an int namespace a
    TypeError about str concatenation.  Now: a TypeError or ValueError naming what is
    wrong, a ``PointTypeError`` (an ``UnknownPoint`` that is also a TypeError, as
    ``store.rewind`` answers a point of another type) for a checkpoint id that is not a
    str, ``UnknownPoint`` for one that names no checkpoint of the thread (or a thread or
    namespace with none) — and nothing changed."""
    saver, _made = _thread_of_three(store)
    before = _state(store)
    with pytest.raises(error) as e:
        {"rewind": lambda: saver.rewind(config),
         "dry_run": lambda: saver.rewind(config, dry_run=True),
         "rewind_plan": lambda: saver.rewind_plan(config),
         "rewind_point": lambda: saver.rewind_point(config),
         "checkpoint_lsn": lambda: saver.checkpoint_lsn(config)}[call]()
    assert "nothing was changed" in str(e.value)
    assert not isinstance(e.value, AttributeError)
    if error in (ValueError, TypeError):
        assert not isinstance(e.value, KeyError)  # (not the bare KeyError it was)
    assert _state(store) == before


def test_a_checkpoint_of_another_thread_names_nothing_in_this_one(store):
    """A checkpoint id is a point of its own thread: given with another thread's id, it
    names nothing there (``UnknownPoint`` naming the checkpoint and the thread), and the
    other thread is untouched."""
    saver, made = _thread_of_three(store)
    other = _step(saver, {"configurable": {"thread_id": "u"}}, 0)
    before = _state(store)
    cid = made[0]["configurable"]["checkpoint_id"]
    with pytest.raises(walstore.UnknownPoint) as e:
        saver.rewind({"configurable": {"thread_id": "u", "checkpoint_id": cid}})
    assert cid in str(e.value) and "'u'" in str(e.value)
    assert e.value.point == cid
    assert _state(store) == before
    assert saver.get_tuple({"configurable": {"thread_id": "u"}}).config[
        "configurable"]["checkpoint_id"] == other["configurable"]["checkpoint_id"]


def test_rewinding_to_the_latest_leaves_the_callers_config_as_it_was(store):
    """``saver.rewind(config)`` without a checkpoint_id found the thread's latest with
    ``get_tuple``, which marks the config it is given as a run's load (private
    ``configurable`` keys): the caller's config came back changed.  Now it is read
    without marking anything."""
    saver, made = _thread_of_three(store)
    config = {"configurable": {"thread_id": "t"}}
    saver.rewind(config, dry_run=True)
    saver.rewind_plan(config)
    saver.checkpoint_lsn(config)
    saver.rewind(config)  # (the head's pending writes, the next step's, are undone)
    assert config == {"configurable": {"thread_id": "t"}}
    assert saver.get_tuple(config).config["configurable"]["checkpoint_id"] == made[-1][
        "configurable"]["checkpoint_id"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_copy_thread_into_a_thread_that_exists_is_refused_not_merged(store, asynchronous):
    """``copy_thread(src, dst)`` into a thread that already had checkpoints wrote the
    source's beside them: one thread holding both histories, the newest checkpoint of
    either taken as its head (a user's conversation silently continued from another's
    state), and ``list`` of it interleaving both.  LangGraph's own savers here have no
    ``copy_thread`` to compare with (the base class only declares it; the platform copies
    to a new thread id), so the careful answer is to refuse: a ValueError naming the
    target, nothing written.  Into an empty thread, or one deleted first, it copies."""
    import asyncio
    saver, made = _thread_of_three(store)
    dst = _step(saver, {"configurable": {"thread_id": "dst"}}, 0)
    before = _state(store)

    def copy(a, b):
        if asynchronous:
            return asyncio.run(saver.acopy_thread(a, b))
        return saver.copy_thread(a, b)
    for target in ("dst", "t"):
        with pytest.raises(ValueError) as e:
            copy("t", target)
        assert repr(target) in str(e.value) and "nothing was copied" in str(e.value)
    assert _state(store) == before
    assert [t.checkpoint["id"] for t in saver.list({"configurable": {"thread_id": "dst"}})
            ] == [dst["configurable"]["checkpoint_id"]]
    with pytest.raises(ValueError):
        copy("nothing here", "dst")   # (an empty source: the target is still not a copy)
    saver.delete_thread("dst")
    copy("t", "dst")
    assert [t.checkpoint["id"] for t in saver.list({"configurable": {"thread_id": "dst"}})
            ] == [c["configurable"]["checkpoint_id"] for c in reversed(made)]
    copy("t", "fresh")
    assert len(list(saver.list({"configurable": {"thread_id": "fresh"}}))) == 3


def test_copy_thread_sees_a_writer_that_raced_into_the_target(store, monkeypatch):
    """The target is checked again in the copy's first transaction (its read set), so a
    checkpoint put into the target between the first look and that transaction makes
    the copy refuse, not merge."""
    saver, made = _thread_of_three(store)
    look = WalstoreSaver._refuse_existing_target
    calls = []

    def racing(src, source, target, dst_p):
        calls.append(src)
        if len(calls) == 1:
            look(src, source, target, dst_p)  # (empty now) ... then a writer gets in
            _step(saver, {"configurable": {"thread_id": target}}, 0)
            return
        look(src, source, target, dst_p)
    monkeypatch.setattr(WalstoreSaver, "_refuse_existing_target", staticmethod(racing))
    with pytest.raises(ValueError):
        saver.copy_thread("t", "dst")
    assert len(list(saver.list({"configurable": {"thread_id": "dst"}}))) == 1
