"""A rewind must undo every commit of its range, including one that lands while it plans.

A commit of actions alone (a booking: no key written) landing between the rewind's
snapshot and its commit was in neither its plan (taken at the snapshot) nor its
validation (which guarded only the keys of its scope): the rewind committed, said the
state was as of the point, and the booking stood, never compensated (a LangGraph run
racing a rewind of its thread: the resume booked Oslo a second time).  The rewind's
validation now counts such a commit as a conflict (its scope tag, its actions' scopes,
any commit at all for an unscoped rewind), and the retry plans it in.
"""
from __future__ import annotations

import threading

import pytest

import walstore


def _store(tmp_path, world: list):
    return walstore.open(tmp_path / "s", durability="none", compensators={
        "cancel": lambda a: world.append(("cancel", a.args["city"]))})


def _book(store, world: list, city: str, **kw) -> None:
    scope = kw.pop("tx_scope", None)
    with store.transaction(scope=scope) as tx:
        with tx.action("book", args={"city": city}, compensate="cancel", **kw) as act:
            world.append(("book", city))
            act.result = {"ok": True}


def _standing(world: list) -> list:
    left = [c for k, c in world if k == "book"]
    for _k, c in (x for x in world if x[0] == "cancel"):
        left.remove(c)
    return sorted(left)


@pytest.mark.parametrize("how", ["tagged", "declared", "unscoped"])
def test_a_booking_committed_while_a_rewind_plans_is_compensated(tmp_path, how):
    from tools.faults import FaultBackend, installed
    world: list = []
    store = _store(tmp_path, world)
    try:
        scope = None if how == "unscoped" else "a/"
        with store.transaction(scope=scope) as tx:
            tx.put("a/plan", ["Paris"])
        point = tx.id
        _book(store, world, "Paris", tx_scope=scope)
        fired = []

        def racing_booking(_name):
            if fired:
                return
            fired.append(1)
            kw = {"tx_scope": "a/"} if how == "tagged" else \
                {"scope": "a/"} if how == "declared" else {}
            t = threading.Thread(target=_book, args=(store, world, "Oslo"), kwargs=kw)
            t.start()
            t.join(30)
        fb = FaultBackend()
        fb.at_point("undo.planned", racing_booking)
        with installed(fb):
            info = store.rewind(point, scope=scope)
        assert fired and info is not None
        # the booking of the range and the one that raced it: both compensated
        assert _standing(world) == [], world
        assert sorted(c for k, c in world if k == "cancel") == ["Oslo", "Paris"]
        assert {a.args["city"]: a.state for a in store.actions()} == {
            "Paris": "compensated", "Oslo": "compensated"}
        assert store.get("a/plan") == ["Paris"]
    finally:
        store.close()


def test_another_scopes_booking_while_a_scoped_rewind_plans_stands(tmp_path):
    """The guard is the scope's: a booking of another scope racing the rewind is left
    alone (it may make the first attempt conflict; the retry passes it over)."""
    from tools.faults import FaultBackend, installed
    world: list = []
    store = _store(tmp_path, world)
    try:
        with store.transaction(scope="a/") as tx:
            tx.put("a/plan", ["Paris"])
        point = tx.id
        _book(store, world, "Paris", tx_scope="a/")
        fired = []

        def racing_booking(_name):
            if not fired:
                fired.append(1)
                t = threading.Thread(target=_book, args=(store, world, "Rome"),
                                     kwargs={"tx_scope": "b/"})
                t.start()
                t.join(30)
        fb = FaultBackend()
        fb.at_point("undo.planned", racing_booking)
        with installed(fb):
            store.rewind(point, scope="a/")
        assert _standing(world) == ["Rome"]
        assert {a.args["city"]: a.state for a in store.actions()} == {
            "Paris": "compensated", "Rome": "committed"}
    finally:
        store.close()


@pytest.mark.parametrize("other", ["rewind", "rewind-unscoped", "purge", "revert",
                                   "rewind-other-scope"])
def test_an_undo_fenced_transaction_conflicts_with_a_rewind_of_its_scope(tmp_path, other):
    """``Transaction.undo_fence`` (set by a scope provider, LangGraph's for a node's
    transactions): a rewind reaching into its scope, or a purge across it, committed after
    it began makes its commit conflict though it read nothing the undo changed (its
    booking compensated); a revert, or another scope's rewind, does not."""
    world: list = []
    store = _store(tmp_path, world)
    try:
        with store.transaction(scope="a/") as tx:
            tx.put("a/x", 1)
        point = tx.id
        with store.transaction(scope="a/") as tx:
            tx.put("a/x", 2)
            tx.put("b/y", 2)
        later = tx.id
        with store.transaction(scope="b/") as tx:
            tx.put("b/z", 1)
        node = store.transaction(scope="a/")
        node.undo_fence = "a/"
        _ = node.snapshot
        with node.action("book", args={"city": "Oslo"}, compensate="cancel") as act:
            world.append(("book", "Oslo"))
            act.result = {"ok": True}
        if other == "rewind":
            store.rewind(point, scope="a/")
        elif other == "rewind-unscoped":
            store.rewind(point)
        elif other == "purge":
            store.purge("a/")
        elif other == "revert":
            store.revert(later)
        else:
            store.rewind(point, scope="b/")
        if other in ("revert", "rewind-other-scope"):
            node.commit()
            assert _standing(world) == ["Oslo"]
        else:
            with pytest.raises(walstore.ConflictError, match="works for scope"):
                node.commit()
            assert _standing(world) == [], world  # (compensated, nothing committed)
    finally:
        store.close()
