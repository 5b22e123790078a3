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
import threading

import pytest

import walstore
from walstore import fileio

from test_audit68_saga_scans_review import _SlowFsync, _prepared


class _FailingSlowFsync(_SlowFsync):
    """_SlowFsync whose held fsync then fails (EIO): the decision's outcome is unknown."""

    def _maybe(self) -> None:
        armed = self.then is not None and threading.current_thread() is threading.main_thread()
        super()._maybe()
        if armed:
            raise OSError(errno.EIO, "injected fsync failure")


@pytest.mark.parametrize("owner", ["commit", "rollback"])
def test_an_owners_end_beside_a_decision_whose_fsync_fails_says_the_outcome_is_unknown(
        tmp_path, owner):
    """The owner's ``tx.commit()``/``rollback()`` while another caller's
    ``store.commit_prepared(gid)`` waits for its COMMIT's fsync, and that fsync fails
    (the other caller gets CommitOutcomeUnknown, the gid is back in doubt): the owner got
    UnknownGid "another caller's decision of it is being made durable (nothing changed
    now)" and the transaction stayed "active" — the outcome is unknown, recovery decides.
    Now it ends "unknown" and TransactionClosed says the outcome is unknown."""
    backend = _FailingSlowFsync()
    old = fileio.set_backend(backend)
    try:
        s = walstore.open(str(tmp_path / "s"), durability="full")
        tx = _prepared(s, action=False)
        out: list = []

        def own():
            try:
                out.append(getattr(tx, owner)())
            except walstore.WalstoreError as e:
                out.append(e)

        backend.then = own
        with pytest.raises(walstore.CommitOutcomeUnknown):
            s.commit_prepared("g1")
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
        out: list = []

        def own():
            try:
                out.append(tx.commit())
            except walstore.WalstoreError as e:
                out.append(e)

        backend.then = own
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
