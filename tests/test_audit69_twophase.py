"""Audit 69, two-phase commit: the agent layer's reach into a store's private state, a
prepared transaction decided through the store, and the atomic group's compensations
across a kill -9.

Findings (each test named below fails on the code before its fix):

- ``resolve_atomic`` read each store's decision through ``store._twophase`` (twice; one
  line said "(not a public method)"): the agent layer was built on a store's private
  state, and a coordinator of one's own had no way to ask for a decision once durable.
  ``Store.settled_decision(gid, timeout)`` is that interface, and the coordinator uses it
  (``test_the_agent_layer_reads_no_private_state_of_a_store_or_its_engine``,
  ``test_settled_decision_waits_for_a_decision_being_made_durable``); so does
  ``ActionScope.__exit__`` for ``Engine.forked_from`` (it read ``engine._forked_from``).
- After ``store.commit_prepared``/``rollback_prepared``, the transaction's ``release(sp)``
  went through silently and ``files(ws)`` handed out its file operations, its state still
  "active" — every other call on it says how it ended (audit 68)
  (``test_a_prepared_transaction_decided_by_the_store_says_how_it_ended_at_release_and_files``).

Probed and found right (each a test here): an atomic group whose participants each
charged a ledger, SIGKILLed with both prepared or after the coordinator's decision, then
resolved after a reopen by ``resolve_atomic`` or by hand (``commit_prepared`` /
``rollback_prepared`` on each store), and killed again inside ``resolve_atomic``'s first
compensator after its refund: the state and the action log agree, each compensation is
recorded exactly once (one COMPENSATED record), the ledger refunded once, and nothing is
left in doubt, pending or run again at the next open.
"""
from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import walstore
from walstore import fileio

from test_audit68_review4 import _FailingSlowFsync
from test_audit68_saga_scans_review import _SlowFsync, _prepared
from test_compensation_crash import compensated_records
import ws_ledger  # (tests/agent_scripts, on the path through test_compensation_crash)
import ws_ledger_handlers

ROOT = Path(__file__).resolve().parent.parent
# names the agent layer gives a store or its engine (``plan._files`` is an undo plan's own)
HOLDERS = {"store", "coordinator", "s", "engine", "eng", "_engine", "_store"}
CHILD = Path(__file__).resolve().parent / "twophase_scripts" / "atomic_charges_child.py"


# ---- the agent layer on the store's public interface --------------------------------------
def test_the_agent_layer_reads_no_private_state_of_a_store_or_its_engine(tmp_path):
    """No module of walstore/agent reads a private attribute of a Store or an Engine
    through another object than ``self`` (``store._twophase``, ``engine._forked_from``).
    Before: ``resolve_atomic`` asked ``store._twophase.settled_decision(gid)`` (twice) and
    ``ActionScope.__exit__`` read ``engine._forked_from``."""
    with walstore.open(str(tmp_path / "s")) as s:
        private = {n for obj in (s, s._engine) for n in vars(obj)
                   if n.startswith("_") and not n.startswith("__")}
    assert "_twophase" in private and "_forked_from" in private
    found = []
    for path in sorted((ROOT / "walstore" / "agent").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in private and (
                    isinstance(node.value, ast.Name) and node.value.id in HOLDERS
                    or isinstance(node.value, ast.Attribute) and node.value.attr in HOLDERS):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert found == []


@pytest.mark.parametrize("fails", [False, True], ids=["synced", "fsync-fails"])
def test_settled_decision_waits_for_a_decision_being_made_durable(tmp_path, fails):
    """``store.settled_decision(gid)`` while another thread's ``commit_prepared`` waits
    for its fsync (held 0.3 s by the fault seam): ``decision`` reads "prepared" then
    (durability="full"); ``settled_decision`` waits and reads "commit" — or "unknown"
    when that fsync fails.  Before: no such method on a Store (only through
    ``store._twophase``)."""
    backend = _FailingSlowFsync() if fails else _SlowFsync()
    old = fileio.set_backend(backend)
    got: list = []
    try:
        s = walstore.open(str(tmp_path / "s"), durability="full")
        assert s.settled_decision("g1") is None
        _prepared(s, "g1", action=False)
        assert s.settled_decision("g1") == "prepared"
        backend.then = lambda: got.append((s.decision("g1"), s.settled_decision("g1")))
        if fails:
            with pytest.raises(walstore.CommitOutcomeUnknown):
                s.commit_prepared("g1")
        else:
            s.commit_prepared("g1")
        backend.thread.join(10)
        assert got == [("prepared", "unknown" if fails else "commit")]
        s.close()
    finally:
        fileio.set_backend(old)
    with walstore.open(str(tmp_path / "s"), durability="full") as s:
        _prepared(s, "g2", action=False)
        s.rollback_prepared("g2")
        assert s.settled_decision("g2") == "abort"
        # (after the failed fsync the reopen decided: the COMMIT reached the file here)
        assert s.settled_decision("g1") in (("prepared", "commit") if fails else ("commit",))


# ---- a prepared transaction decided through the store -------------------------------------
@pytest.mark.parametrize("decide", ["commit_prepared", "rollback_prepared"])
@pytest.mark.parametrize("op", ["release", "files"])
def test_a_prepared_transaction_decided_by_the_store_says_how_it_ended_at_release_and_files(
        tmp_path, decide, op):
    """After ``store.commit_prepared``/``rollback_prepared`` beside its owner, the
    transaction's ``release("x")`` returned None and ``files(ws)`` a TxFiles, its state
    still "active" (savepoint, rollback_to, prepare, put, get and scan said how it ended:
    audit 68).  They raise TransactionClosed naming how it ended, and its state says so."""
    ended = "committed" if decide == "commit_prepared" else "rolled back"
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        (tmp_path / "ws").mkdir()
        ws = s.workspace(str(tmp_path / "ws"))
        tx = s.transaction()
        tx.put("k", 1)
        tx.savepoint("x")
        tx.put("k", 2)
        tx.prepare("g1")
        assert tx.files(ws) is not None  # (in doubt: handed out, its writes refused)
        getattr(s, decide)("g1")
        call = {"release": lambda: tx.release("x"), "files": lambda: tx.files(ws)}[op]
        with pytest.raises(walstore.TransactionClosed, match=f"already {ended}"):
            call()
        assert tx.state == ended
        assert s.get("k") == (2 if ended == "committed" else None)


def test_release_of_a_prepared_transaction_in_doubt_still_lets_its_savepoints_go(tmp_path):
    """The fix changes nothing for one still in doubt: release forgets the savepoint,
    the write set stays, and the decision commits it."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        tx.put("k", 1)
        sp = tx.savepoint("x")
        tx.put("k", 2)
        tx.prepare("g1")
        tx.release("x")
        assert not sp.active and tx.state == "active"
        tx.commit()
        assert s.get("k") == 2 and s.decision("g1") == "commit"


# ---- an atomic group with charges, kill -9, resolved after a reopen -----------------------
def _child(pa, pb, ledger, calls, step) -> str:
    proc = subprocess.run([sys.executable, str(CHILD), str(pa), str(pb), str(ledger),
                           str(calls), step], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert f"STEP {step}" in proc.stdout, proc.stdout
    return next((ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("GID ")),
                "")


def _open_both(pa, pb):
    comp = {"refund": ws_ledger_handlers.refund}
    return (walstore.open(str(pa), durability="full", compensators=comp),
            walstore.open(str(pb), durability="full", compensators=comp))


def _check_agree(pa, pb, ledger, calls, committed: bool, cut_short: int = 0) -> None:
    """Both stores ended one way, their actions, the WAL and the ledger agreeing: each
    action committed or compensated, one COMPENSATED record each, one refund each; the
    compensator called once per action (twice for the ``cut_short`` one the child was
    killed in, same key); nothing in doubt or pending; a reopen runs nothing again."""
    for round_ in range(2):
        a, b = _open_both(pa, pb)
        try:
            assert walstore.resolve_atomic(a, b) == {}
            for s, key in ((a, "a/x"), (b, "b/x")):
                assert s.prepared() == [] and s.pending_compensations() == []
                assert s.get(key) == ("new" if committed else None)
                (act,) = s.actions()
                assert (act.state, act.in_flight) == (
                    "committed" if committed else "compensated", False)
                records = compensated_records(s.path)
                assert records[act.id] == (0 if committed else 1), (key, records)
                assert ws_ledger.count(ledger, "charge", act.key) == 1
                assert ws_ledger.count(ledger, "refund", act.key) == (0 if committed else 1)
        finally:
            a.close()
            b.close()
    runs = Counter(json.loads(line)["key"] for line in Path(calls).read_text().splitlines()
                   ) if Path(calls).exists() else Counter()
    want = 0 if committed else 2
    assert sum(runs.values()) == want + cut_short, runs
    assert ws_ledger.balance(ledger) == (42 if committed else 0)


@pytest.mark.parametrize("how", ["resolve_atomic", "by-hand"])
@pytest.mark.parametrize("step", ["prepared", "decided"])
def test_an_atomic_group_with_charges_killed_in_doubt_ends_one_way_compensated_once(
        tmp_path, step, how):
    """Both participants charged, prepared, then kill -9 (before the decision, or after
    the coordinator's COMMIT); after a reopen ``resolve_atomic`` (or the operator by hand:
    ``commit_prepared``/``rollback_prepared`` as the coordinator decided) ends the group
    one way; every compensation recorded once, the ledger refunded once."""
    pa, pb, ledger, calls = (tmp_path / n for n in ("a", "b", "ledger", "calls"))
    gid = _child(pa, pb, ledger, calls, step)
    committed = step == "decided"
    a, b = _open_both(pa, pb)
    try:
        assert b.prepared() == [gid]
        assert a.prepared() == ([] if committed else [gid])
        assert a.decision(gid) == ("commit" if committed else "prepared")
        if how == "resolve_atomic":
            assert walstore.resolve_atomic(b, a) == {
                gid: "committed" if committed else "rolled back"}
        else:
            for s in (b, a) if committed else (a, b):
                if s.decision(gid) == "prepared":
                    (s.commit_prepared if committed else s.rollback_prepared)(gid)
    finally:
        a.close()
        b.close()
    _check_agree(pa, pb, ledger, calls, committed)


def test_resolve_atomic_killed_inside_a_compensation_finishes_it_once_at_the_next_open(
        tmp_path):
    """Both prepared, kill -9; a second process's ``resolve_atomic`` is killed inside the
    coordinator's compensator, after its refund, before its COMPENSATED record; the next
    open runs that compensation again (same key: the ledger refunds once) and records it
    once, ``resolve_atomic`` rolls the other participant back: no mixed group, nothing
    recorded twice."""
    pa, pb, ledger, calls = (tmp_path / n for n in ("a", "b", "ledger", "calls"))
    gid = _child(pa, pb, ledger, calls, "prepared")
    _child(pa, pb, ledger, calls, "resolve-effect")
    a, b = _open_both(pa, pb)
    try:
        assert a.prepared() == [] and a.decision(gid) == "abort"
        assert b.prepared() == [gid]  # (the coordinator is decided first: b never was)
        assert walstore.resolve_atomic(a, b) == {gid: "rolled back"}
    finally:
        a.close()
        b.close()
    _check_agree(pa, pb, ledger, calls, committed=False, cut_short=1)
