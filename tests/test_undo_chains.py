"""Undoing undos, to any depth: the recorded state and the compensated world never disagree.

An action charged by T, refunded by R = revert(T): every later undo either takes T's
state away again or brings it back.  Bringing it back while the world stays refunded
raises RevertConflict naming the action unless ``force=True`` (then it reads
``needs-redo``); taking it away clears that mark (``compensated``).  A probe found the
"unredo" (an undo that cleared the mark) ignored: reverting it brought the charged state
back silently, the action left ``compensated``.  Also: a rewind's plan and writes are
only keys whose value changes, a revert writes every key of what it undoes, and either
is a later writer of the transactions it undid (``undone_by``)."""
from __future__ import annotations

import random

import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    refunds: list[str] = []
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"refund": lambda a: refunds.append(a.id)})
    s.refunds = refunds  # type: ignore[attr-defined]
    yield s
    s.close()


def charge(store) -> tuple[int, str]:
    with store.transaction() as tx:
        tx.put("order/1", "charged")
        with tx.action("charge", compensate="refund"):
            pass
    return tx.id, store.actions()[0].id


def agrees(store, aid: str) -> None:
    """The state says charged exactly when the action is not refunded in the world."""
    state = store.get_action(aid).state
    charged = store.get("order/1") == "charged"
    assert state in ("committed", "compensated", "needs-redo"), state
    assert charged == (state in ("committed", "needs-redo")), (charged, state)
    assert store.refunds == ([] if state == "committed" else [aid])


def test_a_chain_of_reverts_alternates_needs_redo_and_compensated(store):
    """revert(T), then revert of the newest undo, ten levels deep: each level that brings
    the charge back refuses without force (naming the action, nothing changed) and marks
    it needs-redo when forced; each level that takes it away makes it compensated."""
    t, aid = charge(store)
    last = store.revert(t)
    assert store.get_action(aid).state == "compensated"
    agrees(store, aid)
    for level in range(10):
        brings_back = level % 2 == 0  # (reverting R, an unredo, ...)
        if brings_back:
            with pytest.raises(walstore.RevertConflict) as e:
                store.revert(last.txid)
            assert e.value.actions == [aid]
            assert store.get("order/1") is None
            assert store.get_action(aid).state == "compensated"
            with pytest.raises(walstore.RevertConflict):
                store.revert(last.txid, dry_run=True)
            plan = store.revert(last.txid, dry_run=True, force=True)
            assert plan.needs_redo == [aid] and plan.unredo == [] and plan.keys == ["order/1"]
            last = store.revert(last.txid, force=True)
            assert last.extra.get("redo") == [aid]
            assert store.get_action(aid).state == "needs-redo"
        else:
            plan = store.revert(last.txid, dry_run=True)
            assert plan.unredo == [aid] and plan.needs_redo == [] and plan.keys == ["order/1"]
            last = store.revert(last.txid)
            assert last.extra.get("unredo") == [aid]
            assert store.get_action(aid).state == "compensated"
        agrees(store, aid)
    assert store.refunds == [aid]


def test_reverting_a_cascade_that_cleared_a_needs_redo_mark_refuses(store):
    """The probe's torture variant: T charged, R = revert(T), F = revert(R, force=True)
    (needs-redo); C = revert(T, cascade=True) undoes F, R and T (compensated, the state
    refunded).  Reverting C brings the charge back: RevertConflict unless forced."""
    t, aid = charge(store)
    r = store.revert(t)
    store.revert(r.txid, force=True)
    c = store.revert(t, cascade=True)
    assert c.extra.get("unredo") == [aid] and store.get("order/1") is None
    agrees(store, aid)
    with pytest.raises(walstore.RevertConflict) as e:
        store.revert(c.txid)
    assert e.value.actions == [aid] and store.get_action(aid).state == "compensated"
    back = store.revert(c.txid, force=True)
    assert store.get_action(aid).state == "needs-redo"
    agrees(store, aid)
    store.revert(back.txid)
    assert store.get_action(aid).state == "compensated"
    agrees(store, aid)


def test_rewinds_across_a_chain_end_as_the_point_was(store):
    """Restore points along a chain of undos; a rewind to each one leaves the action as
    the state at that point says: charged back from refunded needs force (needs-redo);
    already charged (needs-redo) stays so with nothing to do; refunded is compensated."""
    store.restore_point("before")
    t, aid = charge(store)
    store.restore_point("p0")                          # charged, committed
    last = store.revert(t)
    store.restore_point("p1")                          # refunded
    last = store.revert(last.txid, force=True)
    store.restore_point("p2")                          # charged again: needs-redo
    last = store.revert(last.txid)
    store.restore_point("p3")                          # refunded (the mark cleared)
    store.revert(last.txid, force=True)                # now: charged, needs-redo
    for point in ("p0", "p2"):  # charged then and now: nothing changes, nothing refused
        assert store.rewind(point) is None
        assert store.get_action(aid).state == "needs-redo"
    store.rewind("p3")
    assert store.get_action(aid).state == "compensated"
    agrees(store, aid)
    assert store.rewind("p1") is None  # refunded then and now
    with pytest.raises(walstore.RevertConflict) as e:
        store.rewind("p2")
    assert e.value.actions == [aid] and store.get("order/1") is None
    store.rewind("p0", force=True)
    assert store.get_action(aid).state == "needs-redo"
    agrees(store, aid)
    store.rewind("before")  # before the charge: its state gone, the mark cleared
    assert store.get("order/1") is None
    assert store.get_action(aid).state == "compensated"
    agrees(store, aid)


@pytest.mark.parametrize("seed", range(6))
def test_random_undos_of_undos_keep_state_and_world_agreeing(store, seed):
    """Random reverts (cascading or not, forced or not, scoped or not) and rewinds to
    random points along the history: after each, the state and the action agree, the
    refund ran at most once, and an unforced undo never brought the charge back."""
    rng = random.Random(seed)
    points = ["start"]
    store.restore_point("start")
    t, aid = charge(store)
    for step in range(40):
        charged_before = store.get("order/1") == "charged"
        force = rng.random() < 0.5
        scope = rng.choice([None, "order/"])
        txids = [i.txid for i in store.log()]
        try:
            if rng.random() < 0.5:
                store.revert(rng.choice(txids), cascade=rng.random() < 0.5, force=force,
                             scope=scope)
            else:
                store.rewind(rng.choice(points), force=force, scope=scope)
        except walstore.RevertConflict:
            assert (store.get("order/1") == "charged") == charged_before
        if not force and not charged_before:
            assert store.get("order/1") != "charged", step
        agrees(store, aid)
        points.append(f"p{step}")
        store.restore_point(points[-1])


def test_a_revert_writes_a_key_that_ends_as_it_began_so_a_later_revert_meets_it(store):
    """A cascade that undoes T and W ends a key as it began: the revert still writes it.
    Dropped from the revert's writes (as a rewind drops it), `revert(W)` afterwards found no
    later writer and brought back T's value: with T's charge refunded, the state said
    charged, the action compensated (probe-review, a regression of the fix that made
    reverts drop unchanged keys)."""
    refunds = []
    store.compensators["refund"] = lambda a: refunds.append(a.id)
    with store.transaction() as t:
        t.put("order/1", "charged")
        with t.action("charge", compensate="refund") as act:
            pass
    with store.transaction() as w:
        w.delete("order/1")
    u = store.revert(t.id, cascade=True)
    assert sorted(u.extra["reverts"]) == sorted([t.id, w.id]) and refunds == [act.id]
    assert list(u.keys) == ["order/1"]  # (written, though it ends as it began: absent)
    with pytest.raises(walstore.RevertConflict) as e:
        store.revert(w.id)
    assert u.txid in e.value.txids
    assert store.get("order/1") is None
    assert store.get_action(act.id).state == "compensated" and refunds == [act.id]

def test_a_later_revert_meets_the_rewind_that_undid_its_transaction(store):
    """The same as a revert's, for a rewind: T charges, W deletes the key, a rewind to
    before T undoes both (T's charge refunded) and leaves the key as it began, unwritten.
    `revert(W)` then found no later writer and brought T's "charged" back with the refund
    standing (left alone at stop 35).  W's row now says the rewind undid it
    (``undone_by``): the rewind is a later writer of W's keys; a second rewind to the
    point does nothing."""
    store.restore_point("p")
    t, aid = charge(store)
    with store.transaction() as w:
        w.delete("order/1")
    plan = store.rewind("p", dry_run=True)
    assert plan.keys == [] and [a.id for a in plan.compensations] == [aid]
    r = store.rewind("p")
    assert sorted(r.extra["reverts"]) == sorted([t, w.id]) and store.refunds == [aid]
    assert list(r.keys) == []  # (it ends as it began: not written)
    assert store.rewind("p") is None  # (nothing to do: nothing written)
    with pytest.raises(walstore.RevertConflict) as e:
        store.revert(w.id)
    assert r.txid in e.value.txids
    assert store.get("order/1") is None
    agrees(store, aid)
    with pytest.raises(walstore.RevertConflict) as e:  # cascading: undoing the rewind
        store.revert(w.id, cascade=True)
    assert e.value.actions == [aid]
    agrees(store, aid)


def test_drop_restore_point_of_a_name_that_is_not_a_str_is_a_point_type_error(store):
    """A list raised a bare "unhashable type" TypeError, an int or None an UnknownPoint
    that was not a TypeError (probe-retention); every other point API says
    PointTypeError (an UnknownPoint and a TypeError)."""
    store.restore_point("a")
    for bad in (["x"], 5, None, b"a"):
        with pytest.raises(walstore.UnknownPoint) as e:
            store.drop_restore_point(bad)
        assert isinstance(e.value, TypeError)
    assert "a" in store.restore_points()
