"""Scoped undo (``rewind``/``revert`` with ``scope=``) keeps other agents' work: their
action-only transactions are not compensated, and a key the undone range wrote outside
the scope that another agent wrote later is never overwritten (RevertConflict, nothing
changes).  Rewinding twice to one point is harmless.  (Probe findings: each of these
changed the outside world or another agent's state before the fix.)"""
from __future__ import annotations

import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    ledger: list[str] = []
    s = walstore.open(str(tmp_path / "s"), durability="none")
    s.ledger = ledger  # type: ignore[attr-defined]

    @s.compensator("undo")
    def undo(action):
        ledger.append(f"undo {action.args['what']}")
    yield s
    s.close()


def act(tx, what: str, scope=None):
    with tx.action("do", args={"what": what}, compensate="undo", scope=scope):
        pass


def states(store) -> dict[str, str]:
    return {a.args["what"]: a.state for a in store.actions()}


@pytest.mark.parametrize("how", ["tagged", "declared"])
def test_a_scoped_undo_leaves_other_agents_action_only_transactions_alone(store, how):
    store.restore_point("p0")
    with store.transaction(scope="agents/a/") as tx:
        act(tx, "A1")
    if how == "tagged":
        with store.transaction(scope="agents/b/") as tx:
            act(tx, "B1")
    else:  # an untagged transaction whose action is declared in B's scope
        with store.transaction() as tx:
            act(tx, "B1", scope="agents/b/")
    with store.transaction() as tx:  # nobody's: neither tagged nor declared
        act(tx, "N1")
    plan = store.rewind("p0", scope="agents/a/", dry_run=True)
    assert [a.args["what"] for a in plan.compensations] == ["A1"]
    assert store.ledger == []
    store.rewind("p0", scope="agents/a/")
    assert store.ledger == ["undo A1"]
    assert states(store) == {"A1": "compensated", "B1": "committed", "N1": "committed"}
    b_tx = [a.txid for a in store.actions() if a.args["what"] == "B1"][0]
    assert store.revert(b_tx, scope="agents/a/") is None  # nothing of A's in it
    assert store.ledger == ["undo A1"] and states(store)["B1"] == "committed"


@pytest.mark.parametrize("later", ["other-scope", "unscoped"])
@pytest.mark.parametrize("verb", ["rewind", "revert", "dry-run"])
def test_a_key_another_agent_wrote_later_is_never_overwritten(store, later, verb):
    """A's transaction (tagged A) wrote ``hotel/rooms_left`` outside A's prefix; B (or an
    untagged writer) wrote it later.  Undoing A would put B's work back to A's earlier
    value: RevertConflict naming B's transaction, and nothing changes (no compensation,
    no commit)."""
    with store.transaction() as tx:
        tx.put("hotel/rooms_left", 10)
    store.restore_point("p")
    with store.transaction(scope="A/") as tx:
        act(tx, "book-A")
        tx.put("hotel/rooms_left", 9)
        tx.put("A/booking", 1)
    with store.transaction(scope="B/" if later == "other-scope" else None) as tx:
        tx.put("hotel/rooms_left", 8)
        tx.put("B/booking", 1)
    b_txid = tx.id
    a_txid = b_txid - 1
    end = store.stats()["wal_end_lsn"]
    with pytest.raises(walstore.RevertConflict) as e:
        if verb == "revert":
            store.revert(a_txid, scope="A/")
        else:
            store.rewind("p", scope="A/", dry_run=verb == "dry-run")
    assert b_txid in e.value.txids
    assert store.get("hotel/rooms_left") == 8 and store.get("A/booking") == 1
    assert store.ledger == [] and states(store) == {"book-A": "committed"}
    assert store.stats()["wal_end_lsn"] == end
    # an unscoped rewind undoes both agents' work: it goes through
    store.rewind("p")
    assert store.get("hotel/rooms_left") == 10 and store.get("A/booking") is None
    assert store.get("B/booking") is None and store.ledger == ["undo book-A"]


def test_a_later_write_inside_the_scope_is_part_of_the_scope(store):
    """In-scope keys go back whoever wrote them (the scope is the agent's own)."""
    store.restore_point("p")
    with store.transaction(scope="A/") as tx:
        tx.put("A/x", 1)
    with store.transaction(scope="B/") as tx:
        tx.put("A/x", 2)  # B wrote into A's prefix
        tx.put("B/y", 1)
    store.rewind("p", scope="A/")
    assert store.get("A/x") is None and store.get("B/y") == 1


def test_rewinding_twice_to_one_point_is_harmless(store):
    """The tool's action was declared in the session's scope and wrote a key outside it:
    the first rewind compensates it; the second (a retried call) finds nothing to do —
    it used to raise RevertConflict (the first rewind's compensation taken for one it
    would bring back)."""
    store.restore_point("p")
    with store.transaction() as tx:
        act(tx, "tool", scope="sess/1/")
        tx.put("sess/1/item", "t1")
        tx.put("outside/log", "t1")
    assert store.rewind("p", scope="sess/1/") is not None
    assert store.ledger == ["undo tool"]
    assert store.rewind("p", scope="sess/1/") is None
    assert store.ledger == ["undo tool"] and states(store) == {"tool": "compensated"}


@pytest.mark.parametrize("how", ["declared", "tagged"])
def test_a_declared_actions_outside_keys_stay_a_tagged_transactions_return(store, how):
    """As the README says: declaring an action in a scope makes the action the scope's,
    not its transaction's other keys — a scoped rewind compensates it, puts back the
    keys inside the scope and leaves those outside.  A transaction begun with ``scope=``
    is the scope's wholly: its outside keys return with its compensation."""
    store.restore_point("p")
    with store.transaction(scope="sess/1/" if how == "tagged" else None) as tx:
        act(tx, "charge", scope="sess/1/" if how == "declared" else None)
        tx.put("sess/1/paid", True)
        tx.put("ledger/line", "charged")
    store.rewind("p", scope="sess/1/")
    assert store.ledger == ["undo charge"] and states(store) == {"charge": "compensated"}
    assert store.get("sess/1/paid") is None
    assert store.get("ledger/line") == ("charged" if how == "declared" else None)


@pytest.mark.parametrize("how", ["revert", "rewind"])
def test_undoing_a_forced_revert_clears_its_needs_redo_mark(store, how):
    """T charged; R = revert(T) refunded; F = revert(R, force=True) brought the state back
    and marked the action needs-redo.  Undoing F (revert, or a rewind to before it) puts
    the state back to the refunded one: the action is ``compensated`` again, never a
    stale needs-redo (nothing runs: no second refund)."""
    with store.transaction() as tx:
        act(tx, "charge")
        tx.put("paid", 1)
    store.restore_point("after-charge")
    r = store.revert(tx.id)
    assert store.ledger == ["undo charge"] and store.get("paid") is None
    store.restore_point("after-refund")
    f = store.revert(r.txid, force=True)
    assert states(store) == {"charge": "needs-redo"} and store.get("paid") == 1
    if how == "revert":
        store.revert(f.txid)
    else:
        plan = store.rewind("after-refund", dry_run=True)
        assert plan.unredo == [store.actions()[0].id]
        store.rewind("after-refund")
    assert store.get("paid") is None and states(store) == {"charge": "compensated"}
    assert store.ledger == ["undo charge"]


def test_a_forced_undo_of_a_refund_and_its_reversal_leaves_needs_redo(store):
    """T charged; R = revert(T) refunded; F = revert(R, force=True) marked it needs-redo.
    A forced rewind to just after T undoes both R and F: the state is charged, the world
    refunded — needs-redo (the plan had listed it for both needs-redo and its clearing,
    and the clearing won: 'compensated' while the state said charged)."""
    with store.transaction() as tx:
        act(tx, "charge")
        tx.put("paid", 1)
    store.restore_point("p1")
    r = store.revert(tx.id)
    store.revert(r.txid, force=True)
    store.rewind("p1", force=True)
    assert store.get("paid") == 1 and states(store) == {"charge": "needs-redo"}
    assert store.ledger == ["undo charge"]


def test_bringing_back_an_action_whose_compensation_is_still_owed_is_refused(tmp_path):
    """revert(T) with no compensator registered leaves the refund owed (pending).  Undoing
    that revert (forced or not) would have to tell a refund about to run from one that
    never will: refused (RevertConflict naming it), nothing changed — it used to mark the
    never-refunded action needs-redo (an operator would charge twice)."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            act(tx, "charge")
            tx.put("paid", 1)
        r = s.revert(tx.id)
        assert states(s) == {"charge": "pending"}
        for force in (False, True):
            with pytest.raises(walstore.RevertConflict, match="still owed"):
                s.revert(r.txid, force=force)
        assert states(s) == {"charge": "pending"} and s.get("paid") is None


def test_a_forced_scoped_rewind_never_overwrites_another_agents_file(tmp_path):
    """A transaction tagged with scope A changed shared.txt (a workspace outside the
    scope); agent B changed it later.  A scoped rewind of A — forced too — refuses
    (RevertConflict naming B's transaction) and changes nothing; it used to put A's
    earlier version over B's committed one (force is for strangers, not for agents)."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "shared.txt").write_text("s0")
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        ws = s.workspace(str(root))
        s.restore_point("p")
        with s.transaction(scope="agents/a/") as tx:
            tx.files(ws).write("shared.txt", "s-by-a")
            tx.put("agents/a/x", 1)
        with s.transaction(scope="agents/b/") as tb:
            tb.files(ws).write("shared.txt", "s-by-b")
        for force in (False, True):
            with pytest.raises(walstore.RevertConflict) as e:
                s.rewind("p", scope="agents/a/", force=force)
            assert tb.id in e.value.txids
        assert (root / "shared.txt").read_text() == "s-by-b" and s.get("agents/a/x") == 1


@pytest.mark.parametrize("scope", ["", b""])
def test_an_action_declared_in_an_empty_scope_is_refused_like_every_scope(store, scope):
    """``tx.action(..., scope="")`` was accepted and stored, though no scoped undo can
    name an empty prefix (``transaction(scope="")`` and ``rewind(scope="")`` refuse it):
    the declaration silently did nothing.  Refused at the call, before any intent."""
    with store.transaction() as tx:
        with pytest.raises(TypeError, match="non-empty"):
            tx.action("do", args={"what": "x"}, compensate="undo", scope=scope)
        tx.put("k", 1)
    assert list(store.actions()) == []
    assert store.get("k") == 1

def test_a_scope_longer_than_any_key_is_refused_at_the_call(store):
    """A scope is a key prefix and a key has at most 500 bytes; a 10 MiB scope was taken
    and stored in every commit record and ``txns`` row, a 40 MiB one refused only at
    commit by a bare record-size error.  Refused at ``transaction()`` and
    ``tx.action(scope=)``, naming the limit; 500 bytes (UTF-8) is still a scope."""
    for scope in ("s" * 501, b"s" * (10 << 20), "é" * 251):
        with pytest.raises(ValueError, match="limit is 500 bytes"):
            store.transaction(scope=scope)
    with store.transaction() as tx:
        with pytest.raises(ValueError, match="limit is 500 bytes"):
            tx.action("do", args={"what": "x"}, compensate="undo", scope="s" * 501)
        tx.put("k", 1)
    assert list(store.actions()) == []
    with store.transaction(scope="é" * 250) as tx:
        tx.put("é" * 250, 1)
    assert store.log()[0].scope == "é" * 250


def test_reverting_a_scoped_rewind_leaves_the_scope_rewindable(store):
    """The revert of a scoped rewind (the documented way to undo it, no scope given)
    belongs to the rewind's scope: a later rewind of that scope takes it wholly.  It was
    untagged, and its writes outside the prefix (a key the scope's transaction wrote
    there) made it another agent's later work: the next scoped rewind raised
    RevertConflict."""
    store.restore_point("p")
    with store.transaction(scope="sess/1/") as tx:
        act(tx, "tool")
        tx.put("sess/1/item", "t1")
        tx.put("memory/fact", "t1")  # written by the session, outside its prefix
    rewind = store.rewind("p", scope="sess/1/")
    assert store.get("memory/fact") is None and store.ledger == ["undo tool"]
    store.revert(rewind.txid, force=True)  # the rewind undone: the state is back
    assert store.get("memory/fact") == "t1" and store.get("sess/1/item") == "t1"
    assert store.txn_info(store.log(limit=1)[0].txid).scope == "sess/1/"
    store.rewind("p", scope="sess/1/")
    assert store.get("memory/fact") is None and store.get("sess/1/item") is None


def test_a_scoped_undo_of_a_forced_undo_keeps_the_mark_of_an_action_outside_the_scope(store):
    """A transaction tagged "a/" charges a/c and writes b/k; revert, then a forced revert
    of that (a/c back, the charge needs-redo).  Reverting that forced undo scoped to "b/"
    puts only b/k back: a/c stays charged, so the mark stays.  It was cleared
    ("compensated") with the charge standing in the state and refunded in the world
    (probe-undo)."""
    with store.transaction(scope="a/") as tx:
        tx.put("a/c", 10)
        act(tx, "charge")
        tx.put("b/k", 1)
    v = store.revert(tx.id)
    w = store.revert(v.txid, force=True)
    assert states(store) == {"charge": "needs-redo"} and store.get("a/c") == 10
    plan = store.revert(w.txid, scope="b/", force=True, dry_run=True)
    assert plan.keys == ["b/k"] and plan.unredo == [] and plan.needs_redo == []
    x = store.revert(w.txid, scope="b/", force=True)
    assert "unredo" not in x.extra
    assert store.get("a/c") == 10 and store.get("b/k") is None
    assert states(store) == {"charge": "needs-redo"} and store.ledger == ["undo charge"]


@pytest.mark.parametrize("force", [False, True])
def test_a_scoped_rewind_brings_back_nothing_of_an_action_outside_the_scope(store, force):
    """An untagged transaction charges a/c (declared in "a/") and writes b/k; a rewind
    refunds it.  Rewinding "b/" to just after it brings b/k back and nothing of the
    charge: no RevertConflict naming it, no needs-redo mark (forced, it read needs-redo
    with a/c absent and the world refunded: an operator would charge again; probe-undo)."""
    store.restore_point("start")
    with store.transaction() as tx:
        tx.put("a/c", 10)
        act(tx, "charge", scope="a/")
        tx.put("b/k", 1)
    store.restore_point("after")
    store.rewind("start")
    assert states(store) == {"charge": "compensated"}
    store.rewind("after", scope="b/", force=force)
    assert store.get("b/k") == 1 and store.get("a/c") is None
    assert states(store) == {"charge": "compensated"} and store.ledger == ["undo charge"]


def test_an_action_resolved_by_hand_is_resolved_again_when_its_needs_redo_is_undone(tmp_path):
    """A refund that failed, resolved by hand with a note; a forced revert of the revert
    marks it needs-redo; undoing that forced revert ends it as it was: "resolved", its
    note back.  It read "compensated" (a compensator that never succeeded) with the note
    gone (probe-undo)."""
    def refund(action):
        raise RuntimeError("payments API down")
    s = walstore.open(str(tmp_path / "s"), durability="none", compensators={"refund": refund})
    try:
        with s.transaction() as tx:
            tx.put("c/1", 10)
            with tx.action("charge", compensate="refund") as a:
                pass
        with pytest.raises(walstore.CompensationFailed):
            s.revert(tx.id)
        v = s.log(limit=1)[0]
        s.resolve(a.id, note="refunded by hand, ticket 42")
        w = s.revert(v.txid, force=True)
        assert s.get_action(a.id).state == "needs-redo" and s.get("c/1") == 10
        s.revert(w.txid)
        got = s.get_action(a.id)
        assert (got.state, s.get("c/1")) == ("resolved", None)
        assert "ticket 42" in (got.error or "")
        s.close()
        s = walstore.open(str(tmp_path / "s"), durability="none",
                          compensators={"refund": refund})
        assert s.get_action(a.id).state == "resolved"  # (the same, folded from the log)
    finally:
        s.close()


@pytest.mark.parametrize("force", [False, True])
def test_a_scoped_undo_whose_actions_history_was_trimmed_refuses_and_changes_nothing(
        tmp_path, force):
    """A rewind R undid T (a charge writing b/charge) and a later a/x, refunding the
    charge; retention then trimmed T.  A revert of R scoped to "a/" cannot tell where the
    charge's state lies any more: it was taken as inside the scope — refused as bringing
    the charge back, or forced marked needs-redo with b/charge still refunded
    (probe-review).  It refuses now (HistoryTrimmed), nothing changed, forced or not."""
    refunds = []
    s = walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=2,
                      compensators={"refund": lambda a: refunds.append(a.id)})
    try:
        s.restore_point("start")
        with s.transaction() as tx:
            tx.put("b/charge", 40)
            with tx.action("charge", compensate="refund") as act:
                pass
        s.restore_point("mid")  # (pins what came after T: R and its revert stay possible)
        with s.transaction() as tx:
            tx.put("a/x", 1)
        r = s.rewind("start")
        s.drop_restore_point("start")
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"z/{i}", i)
        s.checkpoint()  # (T's history trimmed)
        before = dict(s.scan())
        with pytest.raises(walstore.HistoryTrimmed):
            s.revert(r.txid, scope="a/", cascade=True, force=force)
        assert dict(s.scan()) == before and s.get("b/charge") is None
        assert refunds == [act.id]
        assert [a.state for a in s.actions() if a.id == act.id] in ([], ["compensated"])
    finally:
        s.close()


def test_a_scoped_rewind_leaves_another_agents_unchanged_key_alone(store):
    """Agent a's tagged transactions hold a shared key and release it (0 -> 1 -> 0); a
    rewind of scope "a/" undoes them and the key ends as it began.  The rewind wrote it
    anyway, so agent b's open transaction that read it conflicted, and a revert of the
    rewind had to cascade into b's later work (probe-langgraph).  Outside the scope such a
    key is not written now."""
    with store.transaction() as tx:
        tx.put("inv/held", 0)
    store.restore_point("p")
    for v in (1, 0):
        with store.transaction(scope="a/") as tx:
            tx.put("a/step", v)
            tx.put("inv/held", v)
    b = store.transaction()
    assert b.get("inv/held") == 0
    r = store.rewind("p", scope="a/")
    assert "inv/held" not in r.keys and store.get("a/step") is None
    b.put("b/booked", 1)
    b.commit()  # (conflicted when the rewind wrote inv/held)
    with store.transaction() as tx:
        tx.put("inv/held", 5)
    store.revert(r.txid)  # (no cascade into b's work)
    assert store.get("a/step") == 0 and store.get("inv/held") == 5


def test_a_revert_after_a_scoped_rewind_meets_the_rewind_through_undone_by(store):
    """T (tagged "a/") holds inv/held and runs an action; W (tagged "a/") releases it.
    A rewind of "a/" undoes both, compensating T's action, and leaves inv/held as it
    began (outside the scope: not written).  `revert(W)` found no later writer and put
    inv/held back to "held" with the hold compensated (probe-review3).  W's row names the
    rewind (``undone_by``): RevertConflict, nothing changed; a cascade asks for force."""
    with store.transaction() as tx:
        tx.put("inv/held", 0)
    store.restore_point("p")
    with store.transaction(scope="a/") as t:
        t.put("a/step", 1)
        t.put("inv/held", 1)
        act(t, "hold")
    with store.transaction(scope="a/") as w:
        w.put("inv/held", 0)
    r = store.rewind("p", scope="a/")
    assert "inv/held" not in r.keys and states(store) == {"hold": "compensated"}
    with pytest.raises(walstore.RevertConflict) as e:
        store.revert(w.id)
    assert r.txid in e.value.txids
    with pytest.raises(walstore.RevertConflict):
        store.revert(w.id, cascade=True)
    assert store.get("inv/held") == 0 and states(store) == {"hold": "compensated"}
    assert store.ledger == ["undo hold"]


def test_a_scoped_revert_is_not_refused_for_another_scopes_rewind(store):
    """An untagged U writes a/x and b/x; a rewind of "a/" undoes only a/x.  A revert of U
    scoped to "b/" was refused naming that rewind (U's row says the rewind undid it),
    though the rewind touched nothing in "b/" (probe-review4).  An undo scoped elsewhere
    is no later writer of a scoped revert's range."""
    store.restore_point("p")
    with store.transaction() as u:
        u.put("a/x", 1)
        u.put("b/x", 1)
    store.rewind("p", scope="a/")
    assert store.get("a/x") is None and store.get("b/x") == 1
    store.revert(u.id, scope="b/")
    assert store.get("b/x") is None and store.get("a/x") is None


def test_a_revert_of_a_transaction_whose_keys_were_purged_meets_no_undo(tmp_path):
    """T charges, W deletes the key, a rewind undoes both, then a purge erases every key W
    wrote: revert(W) was refused naming the rewind, a writer of nothing left (probe-review4);
    with nothing left of W to guard, it finds nothing to do."""
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"undo": lambda a: None})
    try:
        s.restore_point("p")
        with s.transaction() as t:
            t.put("order/1", "charged")
            act(t, "charge")
        with s.transaction() as w:
            w.delete("order/1")
        s.rewind("p")
        s.purge("order/")
        assert s.revert(w.id) is None
    finally:
        s.close()


@pytest.mark.parametrize("force", [False, True])
def test_a_scoped_rewind_over_an_unscoped_rewind_that_refunded_the_scopes_charge(
        store, force):
    """T (tagged "order/") charges order/1; W (untagged) moves it to archive/1; an
    unscoped rewind R refunds the charge and writes only archive/1 (order/1 ends as it
    began).  Rewinding "order/" to between T and W brings the charged order/1 back.  R
    wrote nothing in the scope, so the scoped rewind passed over it and never saw its
    compensation move: it committed with the refund standing, no RevertConflict, and
    forced no needs-redo mark (review-undo's model checker).  Now R is undone partly (its
    move only): RevertConflict naming the charge, nothing changed; forced, needs-redo,
    R listed in ``reverts`` — and reverting that clears the mark."""
    store.restore_point("p0")
    with store.transaction(scope="order/") as t:
        t.put("order/1", "charged")
        act(t, "charge")
    store.restore_point("p1")
    with store.transaction() as w:
        w.delete("order/1")
        w.put("archive/1", "charged")
    r = store.rewind("p0")
    assert r.keys == ("archive/1",) and states(store) == {"charge": "compensated"}
    before = dict(store.scan())
    if not force:
        with pytest.raises(walstore.RevertConflict) as e:
            store.rewind("p1", scope="order/")
        assert e.value.actions == [f"{t.id}.1"]
        assert dict(store.scan()) == before and store.get("order/1") is None
        assert states(store) == {"charge": "compensated"} and store.ledger == ["undo charge"]
        return
    plan = store.rewind("p1", scope="order/", force=True, dry_run=True)
    assert plan.needs_redo == [f"{t.id}.1"] and plan.keys == ["order/1"]
    u = store.rewind("p1", scope="order/", force=True)
    assert store.get("order/1") == "charged" and store.get("archive/1") is None
    assert states(store) == {"charge": "needs-redo"} and store.ledger == ["undo charge"]
    assert r.txid in u.extra["reverts"] and u.extra["redo"] == [f"{t.id}.1"]
    store.revert(u.txid)
    assert store.get("order/1") is None and states(store) == {"charge": "compensated"}
    assert store.ledger == ["undo charge"]


@pytest.mark.parametrize("force", [False, True])
def test_a_scoped_revert_of_an_unscoped_rewind_leaves_another_scopes_refund_alone(
        store, force):
    """T (untagged) charges a/c/1: its action's state lies in "a/".  The charge is
    cancelled, b/n/0 written, and an unscoped rewind R to before T refunds the charge
    but writes only b/n/0 (a/c/1 ends as it began).  R's keys all lie in "b/", so a
    "b/" revert of R took it wholly and brought back a/'s action with nothing of it:
    refused naming it, forced marked needs-redo, and that revert (tagged "b/") was later
    taken wholly by a "b/" rewind past it, which cleared the mark while an unscoped
    rewind had brought the charged a/c/1 back: a charged key whose action reads
    compensated (the undo model checker's seed 128).  Now R is undone partly (its
    move of a/'s action is not the scope's): the revert moves no mark, and the mark
    stays with the charge."""
    store.restore_point("p0")
    with store.transaction() as t:
        t.put("a/c/1", "charged")
        act(t, "charge")
    aid = f"{t.id}.1"
    store.restore_point("pA")
    with store.transaction() as c:
        c.delete("a/c/1")
    with store.transaction() as n:
        n.put("b/n/0", 1)
    r = store.rewind("p0")
    assert r.keys == ("b/n/0",) and r.extra["compensate"] == [aid]
    assert states(store) == {"charge": "compensated"} and store.ledger == ["undo charge"]
    store.restore_point("pB")
    plan = store.revert(r.txid, scope="b/", force=force, dry_run=True)
    assert plan.needs_redo == [] and plan.unredo == [] and plan.keys == ["b/n/0"]
    s = store.revert(r.txid, scope="b/", force=force)
    assert s.scope == "b/" and "redo" not in s.extra and store.get("b/n/0") == 1
    assert store.get("a/c/1") is None and states(store) == {"charge": "compensated"}
    u = store.rewind("pA", force=True)  # the charged a/c/1 back: needs-redo
    assert u.extra["redo"] == [aid]
    assert store.get("a/c/1") == "charged" and states(store) == {"charge": "needs-redo"}
    store.rewind("pB", scope="b/", force=True)  # past the "b/" revert: no mark of a/'s
    assert store.get("a/c/1") == "charged" and states(store) == {"charge": "needs-redo"}
    assert store.get("b/n/0") is None and store.ledger == ["undo charge"]
