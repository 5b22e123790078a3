"""The ``owed`` index: an open, its recovery and ``pending_compensations()`` read the action
rows in flight or owed, never every action recorded (CONTRACT 4.4: recovery's cost grows
with the WAL since the last checkpoint, not with the store's size).

Costs are counted in action rows decoded (``tables.unpack_row`` on the ``actions`` table),
never in wall time.  A probe (probe-undoperf): 100k commits with an action each, a clean
open read all 100k rows twice (4.8 s), a recovery too (4.1 s).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lmdb
import pytest

import walstore
from walstore.engine import apply as apply_mod
from walstore.engine import tables


@pytest.fixture
def decoded(monkeypatch):
    """Counts the ``actions`` rows decoded (every reader decodes through unpack_row)."""
    seen = {"n": 0}
    real = tables.unpack_row

    def counting(raw, table, key, file=None):
        if table == "actions":
            seen["n"] += 1
        return real(raw, table, key, file)
    monkeypatch.setattr(tables, "unpack_row", counting)
    return seen


def _fill(path, n, owed_one=False):
    """``n`` committed transactions with an action each (settled: nothing owed); with
    ``owed_one``, one rolled-back action whose compensator is not registered (pending)."""
    s = walstore.open(path, durability="none", compensators={"noop": lambda a: None})
    for i in range(n):
        with s.transaction() as tx:
            tx.put(f"k{i % 10}", i)
            with tx.action("eff", args={}, compensate="noop") as a:
                a.result = i
    if owed_one:
        tx = s.transaction()
        tx.put("owed", 1)
        with tx.action("charge", args={"n": 1}, compensate="refund") as a:
            a.result = "ch_1"
        tx.rollback()
    s.checkpoint()
    owed = [a.id for a in s.pending_compensations()]
    s.close()
    return owed


@pytest.mark.parametrize("n", [40, 400])
def test_open_and_pending_read_only_what_is_owed(tmp_path, decoded, n):
    path = str(tmp_path / "s")
    owed = _fill(path, n, owed_one=True)
    assert len(owed) == 1
    decoded["n"] = 0
    s = walstore.open(path, durability="none", compensators={"noop": lambda a: None})
    try:
        at_open = decoded["n"]
        decoded["n"] = 0
        pending = s.pending_compensations()
        in_pending = decoded["n"]
        assert [a.id for a in pending] == owed
        assert pending[0].state == "pending" and pending[0].compensate == "refund"
        # the one owed row (read by settle twice), not the n settled ones
        assert at_open <= 4, at_open
        assert in_pending <= 2, in_pending
        # every action is still listed by actions()
        assert len(s.actions()) == n + 1
    finally:
        s.close()


CHILD = textwrap.dedent('''
    import sys, time, walstore
    s = walstore.open(sys.argv[1], durability="none", compensators={"noop": lambda a: None})
    for i in range(int(sys.argv[2])):
        with s.transaction() as tx:
            tx.put("k%d" % (i % 10), i)
            with tx.action("eff", args={}, compensate="noop") as a:
                a.result = i
    s.checkpoint()
    for i in range(5):
        with s.transaction() as tx:
            tx.put("c/%d" % i, i)
    tx = s.transaction()
    tx.put("c/x", 1)
    with tx.action("charge", args={"n": 1}, compensate="refund") as a:
        a.result = "ch_1"
    print(a.id, flush=True)
    time.sleep(120)
''')


@pytest.mark.parametrize("n", [30, 300])
def test_kill9_in_flight_action_found_and_compensated_once(tmp_path, decoded, n):
    path = str(tmp_path / "s")
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-c", CHILD, path, str(n)], stdout=subprocess.PIPE,
                         env=env)
    try:
        aid = p.stdout.readline().decode().strip()
        assert aid
    finally:
        p.kill()
        p.wait()
    ran = []
    decoded["n"] = 0
    s = walstore.open(path, durability="none",
                      compensators={"noop": lambda a: None, "refund": ran.append})
    try:
        assert decoded["n"] <= 8, decoded["n"]  # the loser's row, not the n settled ones
        assert [a.id for a in ran] == [aid]
        assert s.last_recovery.compensated == [aid]
        assert s.get("c/x") is None
        assert s.get_action(aid).state == "compensated"
        assert not s.pending_compensations()
    finally:
        s.close()
    s = walstore.open(path, durability="none",
                      compensators={"noop": lambda a: None, "refund": ran.append})
    try:
        assert len(ran) == 1  # exactly once: not again at the next open
        assert s.get_action(aid).state == "compensated"
    finally:
        s.close()


def _drop_owed_index(path):
    """Make the store look written before the ``owed`` table (an older walstore): the
    table gone, as it would be for a store that never had it."""
    env = lmdb.open(os.path.join(path, "db"), max_dbs=64, subdir=True)
    try:
        db = env.open_db(b"owed")
        with env.begin(write=True) as txn:
            txn.drop(db, delete=True)
    finally:
        env.close()


def _reopen_reads_only_the_owed(path: str, owed: list, decoded: dict) -> None:
    """A writable open lists the owed actions, decoding a few rows, not every one."""
    decoded["n"] = 0
    s = walstore.open(path, durability="none", compensators={"noop": lambda a: None})
    try:
        assert [a.id for a in s.pending_compensations()] == owed
        assert decoded["n"] <= 6, decoded["n"]
    finally:
        s.close()


def test_old_store_gets_the_index_built_once_and_compensates(tmp_path, decoded,
                                                              monkeypatch):
    path = str(tmp_path / "s")
    owed = _fill(path, 200, owed_one=True)
    _drop_owed_index(path)
    builds = []
    real = apply_mod.Applier.build_owed_index

    def counting(self):
        builds.append(1)
        return real(self)
    monkeypatch.setattr(apply_mod.Applier, "build_owed_index", counting)
    # a read-only process of the old store (no table): every row, and the right answer
    ro = walstore.open(path, readonly=True)
    try:
        assert [a.id for a in ro.pending_compensations()] == owed
    finally:
        ro.close()
    ran = []
    decoded["n"] = 0
    s = walstore.open(path, durability="none",
                      compensators={"noop": lambda a: None, "refund": ran.append})
    try:
        assert builds == [1]
        assert decoded["n"] >= 200  # (built from every row, once)
        assert [a.id for a in ran] == owed  # what it owed, found and compensated
        assert not s.pending_compensations()
    finally:
        s.close()
    decoded["n"] = 0
    s = walstore.open(path, durability="none", compensators={"noop": lambda a: None})
    try:
        assert builds == [1]  # not again
        assert decoded["n"] <= 4, decoded["n"]
        assert not s.pending_compensations()
    finally:
        s.close()


def test_stale_stamp_is_not_trusted(tmp_path, decoded):
    """An index whose stamp is not ``applied`` (an older walstore wrote the store since):
    readers scan every row, and the next writable open rebuilds it."""
    path = str(tmp_path / "s")
    owed = _fill(path, 50, owed_one=True)
    env = lmdb.open(os.path.join(path, "db"), max_dbs=64, subdir=True)
    try:
        db = env.open_db(b"owed")
        with env.begin(write=True) as txn:  # as if the owed row were never indexed
            for k in [k for k, _v in txn.cursor(db=db) if k != tables.OWED_STAMP]:
                txn.delete(k, db=db)
            txn.put(tables.OWED_STAMP, (1).to_bytes(8, "big"), db=db)
    finally:
        env.close()
    ro = walstore.open(path, readonly=True)
    try:
        assert [a.id for a in ro.pending_compensations()] == owed
    finally:
        ro.close()
    s = walstore.open(path, durability="none", compensators={"noop": lambda a: None})
    try:
        assert [a.id for a in s.pending_compensations()] == owed
    finally:
        s.close()
    _reopen_reads_only_the_owed(path, owed, decoded)


def test_index_follows_every_state(tmp_path):
    """The index names exactly the rows in flight, pending or failed, after rollbacks,
    failures, resolves and compensations (checked against every row)."""
    path = str(tmp_path / "s")
    calls = {"n": 0}

    def flaky(a):
        calls["n"] += 1
        raise RuntimeError("down")
    s = walstore.open(path, durability="none",
                      compensators={"noop": lambda a: None, "flaky": flaky})
    try:
        for i in range(6):
            tx = s.transaction()
            with tx.action("e", args={}, compensate="flaky" if i % 2 else "noop"):
                pass
            if i % 3 == 0:
                tx.commit()
            else:
                try:
                    tx.rollback()
                except walstore.CompensationFailed:
                    pass
        live = s.transaction()
        with live.action("e", args={}, compensate="noop"):
            pass
        s.checkpoint()
        eng = s._engine
        st = eng.state
        with st.read() as txn:
            assert apply_mod.owed_index_current(txn, st)
            indexed = {bytes(k).decode() for k, _v in txn.cursor(db=st.owed)
                       if k != tables.OWED_STAMP}
            rows = {k.decode(): tables.unpack_row(v, "actions", k)
                    for k, v in txn.cursor(db=st.actions)}
        expect = {a for a, r in rows.items() if r["state"] in tables.OWED_INDEX_STATES}
        assert indexed == expect and expect
        assert any(r["state"] == "in-flight" for r in rows.values())
        failed = [a for a in s.pending_compensations() if a.state == "failed"]
        assert failed
        s.resolve(failed[0].id, "by hand")
        live.rollback()
        s.checkpoint()
        with st.read() as txn:
            indexed = {bytes(k).decode() for k, _v in txn.cursor(db=st.owed)
                       if k != tables.OWED_STAMP}
            rows = {k.decode(): tables.unpack_row(v, "actions", k)
                    for k, v in txn.cursor(db=st.actions)}
        assert indexed == {a for a, r in rows.items()
                           if r["state"] in tables.OWED_INDEX_STATES}
        assert {a.id for a in s.pending_compensations()} == indexed
    finally:
        s.close()


def test_a_compacting_purge_keeps_the_index(tmp_path, decoded):
    """A purge's checkpoint rewrites LMDB row by row (every table): the index and its
    stamp come along, and the next open still reads only what is owed."""
    path = str(tmp_path / "s")
    owed = _fill(path, 60, owed_one=True)
    s = walstore.open(path, durability="none", compensators={"noop": lambda a: None})
    try:
        s.purge("k")
        st = s._engine.state
        with st.read() as txn:
            assert apply_mod.owed_index_current(txn, st)
        assert [a.id for a in s.pending_compensations()] == owed
    finally:
        s.close()
    _reopen_reads_only_the_owed(path, owed, decoded)


def test_verify_reports_an_owed_action_the_index_misses(tmp_path):
    """The open settles what the index names: an owed row it misses would be neither
    compensated nor listed.  ``verify`` compares the two (a review of the index: it said
    ok, exit 0)."""
    from walstore.ops.verify import verify_store

    path = str(tmp_path / "s")
    s = walstore.open(path)
    tx = s.transaction()
    with tx.action("charge", args={}, compensate="refund") as act:
        act.result = 1
    tx.rollback()  # (no compensator registered: pending)
    s.close()
    clean = verify_store(path)  # (no damage; the refund is owed: listed, exit 1)
    assert not clean.errors and not clean.ok
    assert [a["id"] for a in clean.pending_compensations] == [act.id]
    env = lmdb.open(os.path.join(path, "db"), max_dbs=64, subdir=True)
    try:
        db = env.open_db(b"owed", create=False)
        with env.begin(write=True) as t:
            gone = [bytes(k) for k, _v in t.cursor(db=db) if bytes(k) != tables.OWED_STAMP]
            for k in gone:
                t.delete(k, db=db)
    finally:
        env.close()
    assert gone
    report = verify_store(path)
    assert not report.ok
    assert any("does not list it" in e for e in report.errors), report.errors


def test_a_copys_inherited_debts_read_held_before_its_first_writable_open(tmp_path):
    """A copy never runs what its source owed (promise 10): its first writable open marks
    those actions held.  Listed read-only before that open, they read held=False (a
    script took them for compensations the next open would run)."""
    from walstore.ops.backup import backup

    src, dest = str(tmp_path / "s"), str(tmp_path / "copy")
    s = walstore.open(src)
    tx = s.transaction()
    tx.put("x", 1)
    with tx.action("charge", args={}, compensate="refund") as act:
        act.result = 1
    tx.rollback()  # (no compensator registered: pending)
    s.close()
    backup(src, dest)
    ro = walstore.open(dest, readonly=True)
    try:
        before = {a.id: a.held for a in ro.pending_compensations()}
    finally:
        ro.close()
    ran = []
    with walstore.open(dest, compensators={"refund": ran.append}) as w:
        after = {a.id: a.held for a in w.pending_compensations()}
    assert before == after == {"1.1": True}
    assert ran == []
