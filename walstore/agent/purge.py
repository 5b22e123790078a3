"""Erasure: ``store.purge(prefix)`` — a user's right to be forgotten, a deleted conversation.

A purge is a commit through the one pipeline that deletes every key under the prefix and
carries ``purge`` (the prefix: what was purged, never the data).  Applying it erases, in
the same LMDB transaction, every trace of those keys: their history rows (past values),
the history key index, and their names in the log rows of the transactions that wrote
them (walstore.engine.apply).  So afterwards no API returns them: ``get``/``scan``, ``at``,
``history``, ``log`` and ``revert`` included.  Then the purge checkpoints at once (the
"next checkpoint" of the contract): the WAL moves to a fresh segment and every older one is
removed, LMDB is rewritten without its free pages, and quarantined copies that may hold
the keys are removed (walstore.engine.scrub: a cut WAL range or segment holding them or
a write it cannot attribute to a key; every damaged LMDB ``recover --rebuild-state`` moved
aside), named in the report's ``quarantine_removed_names`` — their bytes are in no file of
the store directory.  The erasure is owed
durably from the moment the purge is applied (``apply.ERASE_OWED``, in the same LMDB
transaction as its rows): a crash before the compacting checkpoint finishes is finished by
the next writable open (or checkpoint), and quarantined bytes under the prefix go too.
A step after the commit that fails (the apply, the checkpoint, the LMDB rewrite or its
swap, the quarantine scrub) raises ``ErasureOwed`` (the step's error chained, the purge's
report in ``.report``): the purge committed and stands, only its erasure is owed.

A write racing into the prefix while the purge reads it makes the purge conflict; it runs
again (``Store.run``'s retry, ``PURGE_RETRIES`` times), so it erases what that write
added too; if every attempt lost, it runs once more with other threads' commits held out
(``CommitPipeline.held_out_on_conflict``), which cannot lose.  A prefix holding a scope a
prepared (in-doubt) transaction works for (``PreparedSet.check_undo``) is refused first,
ConflictError, nothing run (the commit checks again, for a prepare landing meanwhile).

A purge cannot be reverted (``revert`` of it raises RevertConflict; a rewind across it
cannot bring the keys back: their history is gone).

What it keeps (docs/GUIDE.md, "purge"): the rows of Saga actions (their args and results) and
the log's transaction meta, even of transactions that wrote only under the prefix (a
scoped rewind across the purge still runs their compensations with those args), and its
own record naming the prefix.  Copies outside the store directory (backups, a replica's
objects) are not touched, and nothing here can reach them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..agent.scope import ScopeRange
from ..errors import EmptyArgumentError, ErasureOwed, TransactionTooLarge, type_and_message

if TYPE_CHECKING:
    from ..engine.engine import Engine


PURGE_RETRIES = 4  # a purge that loses to a write racing into its prefix runs again


class Purge:
    def __init__(self, engine: "Engine", run: Callable[..., Any]) -> None:
        self.engine = engine
        self.run = run  # Store.run: fn(tx) in a transaction, retried on ConflictError
        # called after the purge commits, before old segments go (the store's replication:
        # ship up to the purge first, or the erasure's trim left a hole in the replica
        # that stopped every follower for good)
        self.before_erase: Callable[[], None] | None = None

    def purge(self, prefix: Any, progress: Callable[[int, int], None] | None = None
              ) -> dict:
        """``progress(done, total)``: the rewrite of LMDB at the purge's checkpoint (its
        longest part on a large store): the rows copied, as a share of the file's bytes."""
        if not isinstance(prefix, (str, bytes)) or not prefix:
            raise (EmptyArgumentError if isinstance(prefix, (str, bytes)) else TypeError)(
                f"purge takes a non-empty key prefix (str or bytes), not {prefix!r}")
        eng = self.engine
        eng.check_writable()
        rng = ScopeRange(prefix)
        if eng.prepared.works:  # (a scope a prepared transaction works for: refused before
            # anything, see Undo.rewind — the commit's check alone ran it 6 times, the
            # last holding every writer out; it still catches a prepare landing meanwhile)
            with eng.journal.lock:
                eng.prepared.check_undo({"purge_range": [rng.lo, rng.hi]}.get,
                                        f"purge({prefix!r})")

        def erase(tx):
            tx.read_ranges[(rng.lo, rng.hi)] = None  # a write racing into it conflicts
            present = [k for k, _v in eng.reader.scan(rng.lo, rng.hi, False, tx.snapshot)]
            had_history = [k for k, _v in eng.state.scan(rng.lo, rng.hi, db="hkeys")]
            # (and the keys whose history is still unapplied: ``hkeys`` lists a key only
            # once applied, so one written and deleted just before the purge was erased
            # but left out of ``keys_erased`` — a purge reported 0 keys erased, audit 60)
            had_history += eng.memtable.keys_in_range(rng.lo, rng.hi)
            tx.write_stored((k, None) for k in present)
            tx.commit_body.update({"purge": prefix, "purge_range": [rng.lo, rng.hi]})
            return tx, present, had_history

        # a write into the prefix committed first: run again, erasing it too
        meta = {"purge": prefix if isinstance(prefix, str) else prefix.hex()}
        with eng.erasure_lock:  # (the applier's checkpoint must not erase it meanwhile)
            return self._purge(eng, prefix, erase, meta, progress)

    def _purge(self, eng: "Engine", prefix: Any, erase: Callable, meta: dict,
               progress: Callable[[int, int], None] | None) -> dict:
        try:
            tx, present, had_history = eng.pipeline.held_out_on_conflict(
                lambda: self.run(erase, retries=PURGE_RETRIES, backoff=0.001, meta=meta))
        except TransactionTooLarge as e:
            raise TransactionTooLarge(
                f"purge({prefix!r}) deletes more keys than one transaction may write "
                f"({e}); nothing was purged: purge narrower prefixes first") from e
        needles = sorted(set(present) | set(had_history))
        done = {"txid": tx.id, "lsn": tx.lsn, "keys_deleted": len(present),
                "keys_erased": len(needles)}
        kw = {} if progress is None else {"progress": progress}  # (as before when unasked)
        try:  # (committed: whatever fails from here on fails the erasure, not the purge)
            eng.drain()
            if eng.failure is not None:  # (the applier failed: the purge is not in LMDB)
                eng.check_writable()
            out = (eng.erase_old_bytes(needles, **kw) if self.before_erase is None
                   else eng.erase_old_bytes(needles, after_rotate=self.before_erase, **kw))
        except Exception as e:
            raise _erasure_owed(eng, prefix, done, e) from e
        except BaseException as e:  # an interrupt (Ctrl-C) once committed: it stays an
            # interrupt (never turned into an error a caller's ``except`` swallows), but it
            # says the purge stands — `walstore purge` reported "interrupted", exit 130, as
            # if nothing was purged, when the keys were gone (audit 60)
            e.purge_committed = dict(done, erasure_owed=True)  # type: ignore[attr-defined]
            if hasattr(e, "add_note"):  # (Python 3.11+)
                e.add_note(f"purge({prefix!r}) had committed (txid {done['txid']}): its "
                           f"keys are gone from every API; erasing their old bytes is "
                           f"owed (store.checkpoint() or the next writable open)")
            raise
        out.update(done)
        return out


def _erasure_owed(eng: "Engine", prefix: Any, done: dict, e: Exception) -> ErasureOwed:
    """The error of a purge that committed but whose apply or erasure failed (``e``): says
    so, with the purge's report (``erasure_owed``: True) and ``e``'s errno.  It raised
    ``e`` itself before (a StateWriteError, a raw OSError from the LMDB swap...), which
    read as a purge that failed: a caller retried, or recorded the data as not erased."""
    read_only = eng.failure is not None or getattr(eng.wal, "failed", None) is not None
    code = e.errno if isinstance(e, OSError) else None
    return ErasureOwed(
        f"purge({prefix!r}) committed (txid {done['txid']}): its keys are gone from every "
        f"API and the purge stands, but erasing their old bytes from the store's files "
        f"failed ({type_and_message(e)}); the erasure is owed: "
        + ("the store turned read-only, and reopening it finishes the erasure"
           if read_only else "store.checkpoint() or the next writable open finishes it"),
        dict(done, erasure_owed=True), code)
