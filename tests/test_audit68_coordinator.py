"""Audit 68, coordinator: ``resolve_atomic`` beside a live ``walstore.atomic`` whose
coordinator's decision (its COMMIT) is being made durable.

Findings (each test named below fails on the code before its fix):
- Under durability="full" the coordinator's COMMIT reads "prepared" until its fsync is
  done; ``_decide_coordinator`` then tried ``rollback_prepared`` (UnknownGid: decided
  meanwhile), read "prepared" again and took it as "roll back": the participants were
  rolled back while the coordinator committed — a mixed group (the live atomic raised
  "committed at the coordinator but 1 participant(s) failed to finish"; after a kill -9
  the stores disagreed for good).
- Under durability="normal" the COMMIT reads "commit" at its append, before its forced
  fsync: the participants were committed, and that fsync then failed (the coordinator
  back in doubt, its outcome unknown).
Now the coordinator's decision is read durable only, waited for while another caller
makes it durable (bounded), and one whose fsync failed leaves every participant in doubt,
``resolve_atomic`` saying "outcome unknown" for the group.
(``test_resolve_atomic_beside_a_coordinator_decision_being_made_durable_never_ends_mixed``,
``test_a_kill_during_the_coordinators_decision_beside_resolve_atomic_ends_one_way``.)
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

import walstore
from walstore import fileio

from test_atomic_crash import _end_state, _seed_stores
from test_audit68_review4 import _FailingSlowFsync
from test_audit68_saga_scans_review import _SlowFsync


@pytest.mark.parametrize("fails", [False, True], ids=["synced", "fsync-fails"])
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_resolve_atomic_beside_a_coordinator_decision_being_made_durable_never_ends_mixed(
        tmp_path, durability, fails):
    """A live ``walstore.atomic(a, b)`` whose coordinator's COMMIT waits for its fsync
    (held 0.3 s by the fault seam) while another thread runs ``resolve_atomic(a, b)``.
    Before: under "full" the participant was rolled back and the coordinator committed
    (mixed); under "normal" the participant was committed though the coordinator's fsync
    then failed (its outcome unknown).  Now resolve_atomic follows the coordinator's
    durable decision, or leaves the participant in doubt ("outcome unknown")."""
    pa, pb = _seed_stores(tmp_path)
    backend = _FailingSlowFsync() if fails else _SlowFsync()
    old = fileio.set_backend(backend)
    a = walstore.open(str(pa), durability=durability)
    b = walstore.open(str(pb), durability=durability)
    resolved: list = []

    def resolve():
        try:
            resolved.append(walstore.resolve_atomic(a, b))
        except Exception as e:  # (named in the assertion below)
            resolved.append(e)
    try:
        group = walstore.atomic(a, b)
        raised = None
        try:
            with group as (ta, tb):
                ta.put("a/x", "new")
                ta.put("a/y", "new")
                ta.delete("a/gone")
                tb.put("b/x", "new")
                tb.put("b/total", tb.get("b/total") + 1)
                real_commit = ta.commit

                def commit():  # (the decision: its fsync, the main thread's next one,
                    backend.then = resolve  # starts resolve_atomic beside it)
                    return real_commit()
                ta.commit = commit
        except walstore.WalstoreError as e:
            raised = e
        backend.thread.join(30)
        (out,) = resolved
        gid = group.gid
        if not fails:
            assert raised is None, raised
            assert out in ({}, {gid: "committed"}), out
            assert _end_state(a, b) == "committed"
            assert a.decision(gid) == b.decision(gid) == "commit"
            assert a.prepared() == [] and b.prepared() == []
            a.close()
            b.close()
        else:
            assert isinstance(raised, walstore.CommitOutcomeUnknown), raised
            assert out == {gid: "outcome unknown"}, out
            assert b.prepared() == [gid] and b.decision(gid) == "prepared"
            a._drop_like_a_crash()
            b.close()
    finally:
        fileio.set_backend(old)
    a = walstore.open(str(pa), durability=durability)
    b = walstore.open(str(pb), durability=durability)
    try:  # after a reopen: one outcome across the stores
        walstore.resolve_atomic(a, b)
        assert _end_state(a, b) in ("committed", "rolled back")
        assert a.decision(gid) == b.decision(gid)
        assert a.prepared() == [] and b.prepared() == []
    finally:
        a.close()
        b.close()


_CHILD = """
import os, signal, sys, threading
import walstore
pa, pb, durability = sys.argv[1:4]
a = walstore.open(pa, durability=durability)
b = walstore.open(pb, durability=durability)
journal = a._engine.journal
real_force_durable = journal.force_durable
deciding = []

def resolve():
    try:
        print("RESOLVED", walstore.resolve_atomic(a, b), flush=True)
    except Exception as e:
        print("RESOLVE RAISED", repr(e), flush=True)

def force_durable(end, *rest):  # the coordinator's COMMIT (the decision), before its fsync
    if deciding:
        t = threading.Thread(target=resolve, daemon=True)
        t.start()
        t.join(1.0)
        print("STEP killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    real_force_durable(end, *rest)
journal.force_durable = force_durable

group = walstore.atomic(a, b)
print("GID", group.gid, flush=True)
with group as (ta, tb):
    ta.put("a/x", "new")
    ta.put("a/y", "new")
    ta.delete("a/gone")
    tb.put("b/x", "new")
    tb.put("b/total", tb.get("b/total") + 1)
    real_commit = ta.commit
    def commit():
        deciding.append(True)
        return real_commit()
    ta.commit = commit
print("DONE", flush=True)
"""


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_kill_during_the_coordinators_decision_beside_resolve_atomic_ends_one_way(
        tmp_path, durability):
    """A real process: ``walstore.atomic(a, b)``'s coordinator COMMIT is appended, and
    before its fsync another thread runs ``resolve_atomic(a, b)`` for up to 1 s; then the
    process is killed (SIGKILL).  Before: under "full" resolve_atomic had rolled the
    participant back (durably) while the coordinator's COMMIT reached its log: after the
    reopen the group was mixed.  Now resolve_atomic waits for the decision, the kill
    leaves the participant in doubt, and resolving on reopen ends both one way."""
    pa, pb = _seed_stores(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(pa), str(pb), durability],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert "STEP killed" in proc.stdout and "DONE" not in proc.stdout, proc.stdout
    gid = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GID "))
    a = walstore.open(str(pa), durability="full")
    b = walstore.open(str(pb), durability="full")
    try:
        decided = a.decision(gid)
        outcomes = walstore.resolve_atomic(a, b)
        assert _end_state(a, b) == ("committed" if decided == "commit" else "rolled back"), (
            decided, outcomes, proc.stdout)
        assert a.decision(gid) == b.decision(gid)
        assert a.prepared() == [] and b.prepared() == []
    finally:
        a.close()
        b.close()
