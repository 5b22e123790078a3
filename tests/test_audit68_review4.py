"""Audit 68, review 4: the owner's commit()/rollback() of a prepared transaction decided
through the store (``_check_undecided``, ``_await_decision``), the compensation runner's
note of a compensator's return (``defaultdict(partial(fn, action))[0]``) and the Zope data
manager's tpc_finish taking TransactionClosed.

Findings (each test named below fails on the code before its fix):
- The owner's ``tx.commit()``/``rollback()`` beside another caller's ``commit_prepared``
  whose fsync failed raised UnknownGid "being made durable (nothing changed now)" and
  left the transaction "active", though its outcome is unknown
  (``test_an_owners_end_beside_a_decision_whose_fsync_fails_says_the_outcome_is_unknown``).
- Under durability="normal" a 2PC decision is published at its append, before its forced
  fsync: the owner's commit() beside ``commit_prepared`` was told "committed" (tx.lsn
  set) of a decision whose fsync then failed, its outcome unknown
  (``test_an_owner_is_never_told_committed_of_a_decision_not_yet_durable_under_normal``).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import walstore
from walstore import fileio

from test_audit68_saga_scans_review import _SlowFsync, _owner_in_the_fsync, _prepared
from test_interrupt_points import HOOK, SLOW_EXTRA_S


class _FailingSlowFsync(_SlowFsync):
    """_SlowFsync whose held fsync then fails (EIO): the decision's outcome is unknown."""

    def _maybe(self) -> None:
        armed = self.then is not None and threading.current_thread() is threading.main_thread()
        super()._maybe()
        if armed:
            raise OSError(errno.EIO, "injected fsync failure")


@pytest.mark.parametrize("decider", ["commit_prepared", "rollback_prepared"])
@pytest.mark.parametrize("owner", ["commit", "rollback"])
def test_an_owners_end_beside_a_decision_whose_fsync_fails_says_the_outcome_is_unknown(
        tmp_path, owner, decider):
    """The owner's ``tx.commit()``/``rollback()`` while another caller's
    ``store.commit_prepared(gid)`` (or ``rollback_prepared``) waits for its decision's
    fsync, and that fsync fails
    (the other caller gets CommitOutcomeUnknown, the gid is back in doubt): the owner got
    UnknownGid "another caller's decision of it is being made durable (nothing changed
    now)" and the transaction stayed "active" — the outcome is unknown, recovery decides.
    Now it ends "unknown" and TransactionClosed says the outcome is unknown."""
    backend = _FailingSlowFsync()
    old = fileio.set_backend(backend)
    try:
        s = walstore.open(str(tmp_path / "s"), durability="full")
        tx = _prepared(s, action=False)
        out = _owner_in_the_fsync(backend, getattr(tx, owner))
        with pytest.raises(walstore.CommitOutcomeUnknown):
            getattr(s, decider)("g1")
        backend.thread.join(10)
        (got,) = out
        assert type(got) is walstore.TransactionClosed and "unknown" in str(got), got
        assert tx.state == "outcome unknown" and tx.lsn is None
        assert s.prepared() == ["g1"]  # (in doubt: the next open decides)
        s._drop_like_a_crash()
    finally:
        fileio.set_backend(old)


@pytest.mark.parametrize("fails", [True, False])
def test_an_owner_is_never_told_committed_of_a_decision_not_yet_durable_under_normal(
        tmp_path, fails):
    """Under durability="normal" a prepared transaction's COMMIT (a 2PC decision, forced
    durable) is published at its append, before its fsync.  The owner's ``tx.commit()``
    beside another caller's ``store.commit_prepared(gid)`` in that window was told
    "already decided by another caller: it is committed", ``tx.lsn`` set — and then the
    fsync failed: the other caller got CommitOutcomeUnknown, the gid back in doubt.  Now
    the owner waits for the fsync: committed with the LSN when it succeeds, "outcome
    unknown" (TransactionClosed) when it fails."""
    backend = _FailingSlowFsync() if fails else _SlowFsync()
    old = fileio.set_backend(backend)
    try:
        s = walstore.open(str(tmp_path / "s"), durability="normal")
        tx = _prepared(s, action=False)
        out = _owner_in_the_fsync(backend, tx.commit)
        if fails:
            with pytest.raises(walstore.CommitOutcomeUnknown):
                s.commit_prepared("g1")
        else:
            lsn = s.commit_prepared("g1")
        backend.thread.join(10)
        (got,) = out
        if fails:
            assert type(got) is walstore.TransactionClosed and "unknown" in str(got), got
            assert tx.state == "outcome unknown" and tx.lsn is None
            s._drop_like_a_crash()
        else:
            assert isinstance(got, walstore.UnknownGid) and "committed" in str(got), got
            assert tx.state == "committed" and tx.lsn == lsn
            s.close()
    finally:
        fileio.set_backend(old)


KINDS_SWEEP = HOOK + r'''
import functools, walstore
base, kind, stride = sys.argv[1], sys.argv[2], int(sys.argv[3])
refunds = []

class Refunder:
    def refund(self, a):
        refunds.append(a.args["k"])
        return Weird()

    def __call__(self, a):  # (co_name "__call__": told as inside by its c_return)
        refunds.append(a.args["k"])
        return b"x" * (1 << 20)  # (a huge return, held only by the runner's note)

class Weird:  # (a return whose __hash__/__eq__/__bool__ misbehave: never asked)
    __hash__ = None
    def __eq__(self, other):
        raise RuntimeError("__eq__")
    def __bool__(self):
        raise RuntimeError("__bool__")

def refund_plain(extra, a):
    refunds.append(a.args["k"])

fn = {"bound": Refunder().refund, "callable": Refunder(),
      "partial": functools.partial(refund_plain, None),
      "lambda": lambda a: refunds.append(a.args["k"])}[kind]
NAMES = {"bound": "refund", "callable": "__call__", "partial": "refund_plain",
         "lambda": "<lambda>"}

bad, k, inside_seen = [], list(NAMES).index(kind) % stride, 0
while True:
    path = f"{base}/{k}"
    s = walstore.open(path, durability="none", compensators={"refund": fn})
    tx = s.transaction()
    with tx.action("charge", args={"k": k}, compensate="refund"):
        pass
    tx.put("paid", k)
    where = interrupted(k, tx.rollback)
    inside = bool(where) and at["in_compensator"]
    inside_seen += inside
    if not where:
        break
    try:
        s.close()  # (rolls it back if the interrupt left it open)
        s = walstore.open(path, durability="none", compensators={"refund": fn})
    except Exception as e:
        bad.append((k, where, "close, reopen", repr(e)))
        k += stride
        continue
    n = refunds.count(k)
    states = [a.state for a in s.actions()]
    if s.get("paid") is not None or s.pending_compensations() or states != ["compensated"] \
            or not (n == 1 or (n == 2 and inside)):
        bad.append((k, where, "paid", s.get("paid"), "refunds", n, states))
    s.close()
    k += stride
print(k, len(bad), inside_seen)
for b in bad[:20]:
    print(*b)
'''


@pytest.mark.parametrize("kind", ["bound", "callable", "partial", "lambda"])
def test_an_interrupt_at_any_point_of_a_rollback_compensates_once_whatever_the_compensator(
        tmp_path, kind):
    """The compensation runner's note of a compensator's return
    (``defaultdict(partial(fn, action))[0]``), swept with an interrupt at every point of a
    rollback (the profile hook of test_interrupt_points), for a bound method, an object
    with ``__call__`` returning a huge object, a functools.partial and a lambda: each
    compensation is recorded once and runs once — twice only when the interrupt landed
    inside the compensator, after its side effect.  (Every point with WALSTORE_SLOW=1;
    else every fourth, each kind from its own offset.)"""
    stride = "1" if os.environ.get("WALSTORE_SLOW") == "1" else "4"
    src = KINDS_SWEEP.replace('at["in_compensator"] = frame.f_code.co_name == "refund"',
                              'at["in_compensator"] = frame.f_code.co_name == NAMES[kind]')
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(src), str(tmp_path), kind,
                        stride], capture_output=True, text=True, timeout=240 + SLOW_EXTRA_S)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    first, *problems = r.stdout.strip().splitlines()
    points, nbad, inside = map(int, first.split())
    assert points > 20 and (inside > 0 or stride != "1"), (points, inside)  # (walked it)
    assert nbad == 0, problems
