"""Atomic commit across several stores: ``walstore.atomic(a, b, ...)``.

The first store is the coordinator.  On exit of the ``with`` block every store's
transaction is prepared (each PREPARE durable) under one gid that names the coordinator;
then the coordinator commits its own prepared transaction — that COMMIT record, durable,
is the decision — and the others commit theirs.  A failure before the decision (a prepare
refused, or the decision's COMMIT itself not written: a full disk, a closed store) rolls
every participant back, compensating, the coordinator first (its ROLLBACK_PREPARED is then
the decision); only ``CommitOutcomeUnknown`` from the decision's fsync leaves them in
doubt, for ``resolve_atomic`` after the next open.
An interrupt (Ctrl-C, a raising timer) stops neither loop: every participant is still
rolled back, or committed after the decision, and the first interrupt is raised after.

After a crash at any step, ``walstore.resolve_atomic(a, b, ...)`` (the same stores, in any
order: the gid names its coordinator) ends every in-doubt transaction of an atomic group
the way the coordinator decided:
committed where the coordinator committed, rolled back otherwise (presumed abort: a
coordinator that never logged its decision never told anyone "committed").  It decides the
coordinator first, durably (a coordinator still in doubt is rolled back, and one that a
live ``atomic`` commits meanwhile is found committed — its COMMIT waited for until durable;
one whose fsync failed leaves the group in doubt, "outcome unknown"), and only then the
others: a group being committed while it runs ends all one way.
"""
from __future__ import annotations

import uuid
from typing import Any

from ..errors import CommitOutcomeUnknown, UnknownGid, WalstoreError
from ..engine.transaction import ACTIVE, ROLLED_BACK

GID_PREFIX = "atomic-"


def _check_stores(stores: tuple, who: str) -> None:
    """TypeError naming the argument that is not an open store (a path, None): it raised
    a bare AttributeError ("'str' object has no attribute 'transaction'"), ``atomic``
    after the stores before it had begun their transactions (audit 61)."""
    from ..store import Store  # (the facade imports this module)
    for i, s in enumerate(stores, 1):
        if not isinstance(s, Store):
            hint = (" (pass walstore.open(path), not the path)"
                    if isinstance(s, (str, bytes)) or hasattr(s, "__fspath__") else "")
            raise TypeError(f"{who} takes walstore stores, as walstore.open() returns; its "
                            f"argument {i} is {type(s).__name__}{hint}")


class Atomic:
    def __init__(self, *stores, meta: Any = None) -> None:
        if not stores:
            raise TypeError("walstore.atomic needs at least one store")
        _check_stores(stores, "walstore.atomic")
        if len({id(s) for s in stores}) != len(stores):
            raise ValueError("each store may take part only once")
        self.stores = stores
        self.meta = meta
        self.txs: list = []
        self.gid = self._new_gid()
        self._rolled_back = False  # _rollback_all ran to its end
        self._finished = False  # _finish_participants ran to its end
        self._used = False  # entered before: the next ``with`` is a group of its own

    def _new_gid(self) -> str:
        return f"{GID_PREFIX}{self.stores[0].store_id.hex()}-{uuid.uuid4().hex}"

    def __enter__(self) -> tuple:
        if self._used:
            # each ``with`` of one group object is a group of its own: a fresh gid and
            # fresh progress.  (The flags of the last use stayed set: after a use that
            # rolled back, a later use whose prepare failed skipped the rollback of every
            # participant — one left prepared, in doubt, holding its keys, its charges
            # not refunded — while the caller got the ConflictError as if all rolled
            # back; and a gid prepared once was "already used" — audit 58.)
            self.gid = self._new_gid()
            self._rolled_back = self._finished = False
        self._used = True
        self.txs = [s.transaction(meta=self.meta) for s in self.stores]
        return tuple(self.txs)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            problem = self._roll_back_every_one(exc)
            if problem is not None:
                raise problem
            return False
        self.commit()
        return False

    def commit(self) -> None:
        try:
            for tx in self.txs:
                tx.prepare(self.gid)
        except BaseException as e:
            problem = self._roll_back_every_one(e)
            if problem is not None:
                raise problem
            raise
        interrupt = None
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
                problem = self._roll_back_every_one(e)
                if problem is not None:
                    raise problem
                raise
            interrupt = e  # (committed after all: an interrupt after it, raised below)
        # every other participant commits, even across interrupts (see _finish_participants)
        problem = None
        while not self._finished:
            try:
                problem = self._finish_participants(interrupt)
            except Exception:
                raise
            except BaseException as e:  # (landed before its loop could catch it)
                interrupt = interrupt or e
        if problem is not None:
            raise problem

    def _roll_back_every_one(self, cause: BaseException) -> BaseException | None:
        """``_rollback_all(cause)`` to its end, even when an interrupt lands before its
        loop could catch it; returns what to raise (None: nothing went wrong)."""
        problem = interrupt = None
        while not self._rolled_back:
            try:
                problem = self._rollback_all(cause, interrupt)
            except Exception:
                raise
            except BaseException as e:
                interrupt = interrupt or e
        return problem

    def _coordinator_committed(self) -> bool:
        try:
            return self.stores[0].decision(self.gid) == "commit"
        except WalstoreError:  # (closed: its commit did not run, nothing was written)
            return False

    def _finish_participants(self, interrupt: BaseException | None = None
                             ) -> BaseException | None:
        """Commit every other participant: the decision (the coordinator's COMMIT) is
        durable, so each one left prepared only holds its keys and paths until a
        resolve_atomic or a reopen.  An interrupt (Ctrl-C, a raising timer) among them
        does not stop the rest (it left them prepared): the participant it cut short is
        committed again — or found committed — and the first interrupt (``interrupt``,
        one that came after the decision, or one here) is returned, to be raised once
        every participant is finished, the others' failures noted on it; else the error
        naming the participants that could not finish (or None)."""
        errors: list[WalstoreError] = []
        todo = list(zip(self.stores[1:], self.txs[1:]))
        while todo:
            try:
                while todo:
                    store, tx = todo[0]
                    if tx.state == ACTIVE:
                        try:
                            tx.commit()
                        except WalstoreError as e:  # decided already: resolve_atomic
                            try:                      # finishes it later
                                committed = store.decision(self.gid) == "commit"
                            except WalstoreError:
                                committed = False
                            if not committed:  # (else committed meanwhile: resolve_atomic,
                                errors.append(e)  # or this loop before an interrupt)
                    del todo[0]
            except Exception:
                raise
            except BaseException as e:  # an interrupt: the participants still go on
                interrupt = interrupt or e
        problem = None
        if errors:
            text = (f"atomic group {self.gid} committed at the coordinator but "
                    f"{len(errors)} participant(s) failed to finish; run "
                    f"walstore.resolve_atomic on the same stores: {errors[0]}")
            if interrupt is None:
                problem = WalstoreError(text)
            elif hasattr(interrupt, "add_note"):  # (Python 3.11+)
                interrupt.add_note(text)
        self._finished = True
        return interrupt if interrupt is not None else problem

    def _rollback_all(self, cause: BaseException, interrupt: BaseException | None = None
                      ) -> BaseException | None:
        """Roll every participant back, each one even when another's rollback fails (a
        failed compensation of the first left the others prepared, holding their keys,
        their charges not refunded, and named by no error) or is interrupted (Ctrl-C in a
        compensator, a raising timer: it stopped the loop, and the others stayed open or
        prepared, their charges not refunded and their files changed, until
        ``close()``); a participant an interrupt left active (before its decision) is
        rolled back again.  Returns what to raise: the first interrupt (``interrupt``,
        one that came before this could catch it, or one here), else the first error,
        the others named in it; None when every rollback went through.  Each is rolled
        back as its own ``with`` block is on ``cause``: a CompensationFailed chains it."""
        problems: list[tuple[int, BaseException]] = []
        interrupts = [] if interrupt is None else [(-1, interrupt)]
        todo = list(enumerate(self.txs))
        while todo:
            try:
                while todo:
                    i, tx = todo[0]
                    if tx.state == ACTIVE:
                        try:
                            tx.rollback_on(cause)
                        except UnknownGid as e:
                            if tx.state != ROLLED_BACK:  # (else: rolled back by another
                                problems.append((i, e))    # caller, resolve_atomic: the
                        except Exception as e:              # same decision)
                            problems.append((i, e))
                    del todo[0]
            except Exception:
                raise
            except BaseException as e:  # an interrupt: the others are still rolled back
                interrupts.append((todo[0][0] if todo else -1, e))
        problems[:0] = interrupts
        first = problems[0][1] if problems else None
        if len(problems) > 1 and hasattr(first, "add_note"):  # (Python 3.11+)
            others = "; ".join(f"store {self.stores[i].path}: {e!r}" if i >= 0
                               else repr(e) for i, e in problems[1:])
            first.add_note(f"the rollback of atomic group {self.gid} also failed or was "
                           f"interrupted in {len(problems) - 1} other case(s): {others}")
        self._rolled_back = True
        return first


def atomic(*stores, meta: Any = None) -> Atomic:
    """``with walstore.atomic(a, b) as (ta, tb): ...`` commits on all stores or none."""
    return Atomic(*stores, meta=meta)


def resolve_atomic(*stores) -> dict[str, str]:
    """Finish the in-doubt atomic groups coordinated by one of ``stores``; returns
    {gid: outcome}.

    A group's gid names its coordinator (the first store given to ``walstore.atomic``),
    so the stores may be given in any order.  (Only groups led by ``stores[0]`` were
    looked at: ``resolve_atomic(b, a)`` returned {} and left every store in doubt,
    holding its keys — audit 58.)  A group whose coordinator is not among ``stores`` is
    left in doubt: without it, what was decided cannot be known.  The coordinator is
    decided first, durably (rolled back when still in doubt, or found committed when a
    live ``atomic`` committed it meanwhile), then every other store follows that
    decision: a group being committed while this runs never ends mixed.  A coordinator
    whose decision another caller is making durable is waited for; one whose decision's
    fsync failed (its outcome unknown until its next open) leaves every participant in
    doubt, the group's outcome "outcome unknown" (resolve again after reopening it)."""
    if not stores:
        raise TypeError("walstore.resolve_atomic needs at least one store (the coordinator "
                        "of each group, as given first to walstore.atomic, among them)")
    _check_stores(stores, "walstore.resolve_atomic")
    leaders: dict[str, Any] = {}
    for store in stores:
        leaders.setdefault(store.store_id.hex(), store)
    gids = sorted({g for s in stores for g in s.prepared()
                   if _coordinator_of(g, leaders) is not None})
    outcomes: dict[str, str] = {}
    for gid in gids:
        coordinator = _coordinator_of(gid, leaders)
        commit = _decide_coordinator(coordinator, gid)
        if commit is None:  # (the coordinator's decision failed its fsync: what it
            outcomes[gid] = "outcome unknown"  # decided is for its next open to say;
            continue                           # every participant stays in doubt)
        for store in stores:
            if store is coordinator:
                continue
            # (asked per gid, not `gid in store.prepared()`: that list sorts every gid
            # in doubt, so a crash that left G groups cost G x G)
            if store.decision(gid) != "prepared":
                continue
            try:
                if commit:
                    store.commit_prepared(gid)
                else:
                    store.rollback_prepared(gid)
            except UnknownGid:  # (decided meanwhile by the live atomic, which follows the
                # coordinator too; read once durable: its COMMIT's fsync under way read
                # "prepared", and this raised beside a group ending all one way — audit 68;
                # "unknown": that fsync failed, the participant in doubt until its reopen)
                if store.settled_decision(gid) not in (
                        "commit" if commit else "abort", "unknown"):
                    raise
        outcomes[gid] = "committed" if commit else "rolled back"
    return outcomes


def coordinator_id(gid: str) -> str | None:
    """The store id (hex) of the store that coordinates the atomic group ``gid``
    (``atomic-<its store id>-<uuid>``); None: not an atomic group's gid."""
    if not gid.startswith(GID_PREFIX):
        return None
    return gid[len(GID_PREFIX):].split("-", 1)[0] or None


def _coordinator_of(gid: str, leaders: dict[str, Any]) -> Any:
    """The store among ``leaders`` (store id in hex -> store) that coordinates the atomic
    group ``gid``; None: not an atomic group's, or its coordinator is not given."""
    return leaders.get(coordinator_id(gid))


def _decide_coordinator(coordinator, gid: str) -> bool | None:
    """Commit is the decision?  (None: its outcome is unknown.)  A coordinator still in
    doubt is rolled back first (durably: its ROLLBACK_PREPARED is then the decision, and an
    error there stops everything); one that another caller decided meanwhile answers with
    that decision (read once, before, a live ``atomic`` could commit it just after, and its
    participants were rolled back beside its commit) once it is durable: a decision whose
    fsync is under way is waited for (it read "prepared", taken for "roll back", under
    durability="full", and "commit" before that fsync — which could fail — under "normal":
    audit 68), and one whose fsync failed is None: the participants stay in doubt."""
    if coordinator.decision(gid) == "prepared":  # (in doubt, or its decision in flight)
        try:
            coordinator.rollback_prepared(gid)
            return False
        except UnknownGid:
            pass  # (decided by another caller a moment before: that decision stands)
    decided = coordinator.settled_decision(gid)
    if decided == "unknown" or decided == "prepared":  # ("prepared": back in doubt)
        return None
    return decided == "commit"
