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
        if i % 10 == 0:  # (a subgraph namespace beside it)
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
    length (the log's by-time bisection aside: a probe per halving, a few more)."""
    short_dry, short_real, short_plan = _rows_to_rewind_one_step(tmp_path, 30, counted)
    long_dry, long_real, long_plan = _rows_to_rewind_one_step(tmp_path, 300, counted)
    assert long_dry["scan"] == short_dry["scan"], (short_dry, long_dry)
    assert long_real["scan"] == short_real["scan"], (short_real, long_real)
    assert long_dry["log"] <= short_dry["log"] + 12, (short_dry, long_dry)
    assert long_real["log"] <= short_real["log"] + 12, (short_real, long_real)
    assert len(long_plan.as_dict()["txids"]) == len(
        short_plan.as_dict()["txids"])


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
