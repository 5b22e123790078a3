"""Atomic commit across several stores: ``walstore.atomic(a, b, ...)``.

The first store is the coordinator.  On exit of the ``with`` block every store's
transaction is prepared (each PREPARE durable) under one gid that names the coordinator;
then the coordinator commits its own prepared transaction — that COMMIT record, durable,
is the decision — and the others commit theirs.  A failure before the decision (a prepare
refused, or the decision's COMMIT itself not written: a full disk, a closed store) rolls
every participant back, compensating, the coordinator first (its ROLLBACK_PREPARED is then
the decision); only ``CommitOutcomeUnknown`` from the decision's fsync leaves them in
doubt, for ``resolve_atomic`` after the next open.

After a crash at any step, ``walstore.resolve_atomic(a, b, ...)`` (same stores, same
order) ends every in-doubt transaction of an atomic group the way the coordinator decided:
committed where the coordinator committed, rolled back otherwise (presumed abort: a
coordinator that never logged its decision never told anyone "committed").  It decides the
coordinator first, durably (a coordinator still in doubt is rolled back, and one that a
live ``atomic`` commits meanwhile is found committed), and only then the others: a group
being committed while it runs ends all one way.
"""
from __future__ import annotations

import uuid
from typing import Any

from ..errors import CommitOutcomeUnknown, UnknownGid, WalstoreError
from ..engine.transaction import ACTIVE, ROLLED_BACK

GID_PREFIX = "atomic-"


class Atomic:
    def __init__(self, *stores, meta: Any = None) -> None:
        if not stores:
            raise TypeError("walstore.atomic needs at least one store")
        if len({id(s) for s in stores}) != len(stores):
            raise ValueError("each store may take part only once")
        self.stores = stores
        self.meta = meta
        self.txs: list = []
        self.gid = f"{GID_PREFIX}{stores[0].store_id.hex()}-{uuid.uuid4().hex}"

    def __enter__(self) -> tuple:
        self.txs = [s.transaction(meta=self.meta) for s in self.stores]
        return tuple(self.txs)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._rollback_all(exc)
            return False
        self.commit()
        return False

    def commit(self) -> None:
        try:
            for tx in self.txs:
                tx.prepare(self.gid)
        except BaseException as e:
            self._rollback_all(e)
            raise
        try:
            self.txs[0].commit()  # the decision
        except CommitOutcomeUnknown:
            raise  # (the COMMIT may be on disk: every participant stays in doubt)
        except BaseException as e:
            if not self._coordinator_committed():
                # nothing committed (the COMMIT was not written, or the coordinator was
                # decided "abort" by resolve_atomic meanwhile): roll every participant back,
                # compensating, the coordinator first — left prepared, they held their
                # keys and their charges until a resolve_atomic or a reopen
                self._rollback_all(e)
                raise
            self._finish_participants()  # (committed after all: an interrupt after it)
            raise
        self._finish_participants()

    def _coordinator_committed(self) -> bool:
        try:
            return self.stores[0].decision(self.gid) == "commit"
        except WalstoreError:  # (closed: its commit did not run, nothing was written)
            return False

    def _finish_participants(self) -> None:
        errors = []
        for store, tx in zip(self.stores[1:], self.txs[1:]):
            try:
                tx.commit()
            except WalstoreError as e:  # decided already: resolve_atomic finishes it later
                try:
                    if store.decision(self.gid) == "commit":
                        continue  # (committed meanwhile by a resolve_atomic)
                except WalstoreError:
                    pass
                errors.append(e)
        if errors:
            raise WalstoreError(f"atomic group {self.gid} committed at the coordinator but "
                                f"{len(errors)} participant(s) failed to finish; run "
                                f"walstore.resolve_atomic on the same stores: {errors[0]}")

    def _rollback_all(self, cause: BaseException) -> None:
        """Roll every participant back, each one even when another's rollback fails (a
        failed compensation of the first left the others prepared, holding their keys,
        their charges not refunded, and named by no error); the first error is raised
        after, the others named in it.  Each is rolled back as its own ``with`` block is
        on ``cause``: a CompensationFailed chains it."""
        errors: list[tuple[int, BaseException]] = []
        for i, tx in enumerate(self.txs):
            if tx.state == ACTIVE:
                try:
                    tx.__exit__(type(cause), cause, cause.__traceback__)
                except UnknownGid as e:
                    if tx.state != ROLLED_BACK:  # (else: rolled back by another caller,
                        errors.append((i, e))      # resolve_atomic: the same decision)
                except Exception as e:
                    errors.append((i, e))
        if errors:
            first = errors[0][1]
            if len(errors) > 1 and hasattr(first, "add_note"):  # (Python 3.11+)
                others = "; ".join(f"store {self.stores[i].path}: {e}" for i, e in errors[1:])
                first.add_note(f"the rollback of atomic group {self.gid} also failed in "
                               f"{len(errors) - 1} other participant(s): {others}")
            raise first


def atomic(*stores, meta: Any = None) -> Atomic:
    """``with walstore.atomic(a, b) as (ta, tb): ...`` commits on all stores or none."""
    return Atomic(*stores, meta=meta)


def resolve_atomic(*stores) -> dict[str, str]:
    """Finish in-doubt atomic groups led by ``stores[0]``; returns {gid: outcome}.

    The coordinator is decided first, durably (rolled back when still in doubt, or found
    committed when a live ``atomic`` committed it meanwhile), then every other store
    follows that decision: a group being committed while this runs never ends mixed."""
    if not stores:
        raise TypeError("walstore.resolve_atomic needs at least one store (the coordinator "
                        "first, as given to walstore.atomic)")
    coordinator = stores[0]
    prefix = f"{GID_PREFIX}{coordinator.store_id.hex()}-"
    gids = sorted({g for s in stores for g in s.prepared() if g.startswith(prefix)})
    outcomes: dict[str, str] = {}
    for gid in gids:
        commit = _decide_coordinator(coordinator, gid)
        for store in stores[1:]:
            if gid not in store.prepared():
                continue
            try:
                if commit:
                    store.commit_prepared(gid)
                else:
                    store.rollback_prepared(gid)
            except UnknownGid:  # (decided meanwhile by the live atomic, which follows the
                if store.decision(gid) != ("commit" if commit else "abort"):  # coordinator
                    raise                                                     # too)
        outcomes[gid] = "committed" if commit else "rolled back"
    return outcomes


def _decide_coordinator(coordinator, gid: str) -> bool:
    """Commit is the decision?  A coordinator still in doubt is rolled back first (durably:
    its ROLLBACK_PREPARED is then the decision, and an error there stops everything); one
    that another caller decided meanwhile answers with that decision (read once, before,
    a live ``atomic`` could commit it just after, and its participants were rolled back
    beside its commit)."""
    if coordinator.decision(gid) == "prepared":
        try:
            coordinator.rollback_prepared(gid)
            return False
        except UnknownGid:
            pass  # (decided by another caller a moment before: that decision stands)
    return coordinator.decision(gid) == "commit"
