"""Atomic commit across several stores: ``walstore.atomic(a, b, ...)``.

The first store is the coordinator.  On exit of the ``with`` block every store's
transaction is prepared (each PREPARE durable) under one gid that names the coordinator;
then the coordinator commits its own prepared transaction — that COMMIT record, durable,
is the decision — and the others commit theirs.  A failure before the decision rolls every
prepared transaction back.

After a crash at any step, ``walstore.resolve_atomic(a, b, ...)`` (same stores, same
order) ends every in-doubt transaction of an atomic group the way the coordinator decided:
committed where the coordinator committed, rolled back otherwise (presumed abort: a
coordinator that never logged its decision never told anyone "committed").
"""
from __future__ import annotations

import uuid
from typing import Any

from ..errors import WalstoreError
from ..engine.transaction import ACTIVE

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
            self._rollback_all()
            return False
        self.commit()
        return False

    def commit(self) -> None:
        try:
            for tx in self.txs:
                tx.prepare(self.gid)
        except BaseException:
            self._rollback_all()
            raise
        self.txs[0].commit()  # the decision
        errors = []
        for tx in self.txs[1:]:
            try:
                tx.commit()
            except WalstoreError as e:  # decided already: resolve_atomic finishes it later
                errors.append(e)
        if errors:
            raise WalstoreError(f"atomic group {self.gid} committed at the coordinator but "
                                f"{len(errors)} participant(s) failed to finish; run "
                                f"walstore.resolve_atomic on the same stores: {errors[0]}")

    def _rollback_all(self) -> None:
        """Roll every participant back, each one even when another's rollback fails (a
        failed compensation of the first left the others prepared, holding their keys,
        their charges not refunded, and named by no error); the first error is raised
        after, the others named in it."""
        errors: list[tuple[int, BaseException]] = []
        for i, tx in enumerate(self.txs):
            if tx.state == ACTIVE:
                try:
                    tx.rollback()
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
    """Finish in-doubt atomic groups led by ``stores[0]``; returns {gid: outcome}."""
    coordinator = stores[0]
    prefix = f"{GID_PREFIX}{coordinator.store_id.hex()}-"
    gids = sorted({g for s in stores for g in s.prepared() if g.startswith(prefix)})
    outcomes: dict[str, str] = {}
    for gid in gids:
        commit = coordinator.decision(gid) == "commit"
        for store in stores:
            if gid in store.prepared():
                if commit:
                    store.commit_prepared(gid)
                else:
                    store.rollback_prepared(gid)
        outcomes[gid] = "committed" if commit else "rolled back"
    return outcomes
