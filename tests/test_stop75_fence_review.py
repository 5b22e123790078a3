"""Review of stop 75's LangGraph scope guard and tuple undo fences (helper h2).

Found, each failing on the code before its fix:
- the scope guard took a transaction already fenced for its node's thread as checked
  (``fenced_for``), but ``fence_node_transaction`` sets the fence BEFORE its checks: a
  node's ``tx.action(..., scope=thread scope)`` (or ``tx.files(ws)``) refused for a run a
  rewind or delete cut off left the fence behind, the transaction open, and the same
  call tried again in that transaction passed unchecked: the cut-off run booked after the
  rewind, and the booking stood (the rewind committed before the transaction's snapshot,
  so the fence alone never saw it).
"""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.saver import StaleCheckpointError  # noqa: E402

from test_langgraph_cut_off_runs import _start_run  # noqa: E402
from test_langgraph_findings import (Plan, booking_store, plan_graph,  # noqa: E402
                                     standing)


@pytest.mark.parametrize("how", ["rewind", "delete"])
def test_a_refused_scoped_action_tried_again_in_its_transaction_is_refused_again(
        tmp_path, how):
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    reached, removed = threading.Event(), threading.Event()
    tries: list = []

    def book(s: Plan) -> dict:
        city = s["plan"][0]
        if city == "Paris":
            with store.transaction() as tx:
                with tx.action("book", args={"city": city}, compensate="cancel") as act:
                    world.append(("book", city))
                    act.result = {"ok": True}
            return {"plan": s["plan"][1:], "booked": [city]}
        tx = store.transaction(scope="app/")   # (the app's own work, not the thread's)
        reached.set()
        assert removed.wait(30)
        for _ in range(2):   # (the caller tries again, in the same transaction)
            try:
                with tx.action("book", args={"city": city}, compensate="cancel",
                               scope=saver.thread_scope("a")) as act:
                    world.append(("book", city))
                    act.result = {"ok": True}
                tries.append("booked")
            except StaleCheckpointError:
                tries.append("refused")
        tx.put(f"app/{city}", "tried")
        tx.commit()
        return {"plan": s["plan"][1:], "booked": [city]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="sync")
    c1 = graph.get_state(config)
    th, errors = _start_run(graph, {"plan": ["Rome"]}, config, durability="sync")
    assert reached.wait(30)
    if how == "rewind":
        assert saver.rewind(c1.config) is not None
    else:
        saver.delete_thread("a")
    removed.set()
    th.join(60)
    assert [type(e).__name__ for e in errors] == ["StaleCheckpointError"]
    assert tries == ["refused", "refused"]   # (before: ["refused", "booked"])
    assert "Rome" not in standing(world), world
    assert store.get("app/Rome") == "tried"   # (the app's own work stands)
    store.close()


def test_an_async_rewind_finds_a_node_booking_that_named_its_threads_scope(
        tmp_path, monkeypatch):
    """GUIDE: inside a node, ``scope=saver.thread_scope(tid)`` is taken as an unannotated
    transaction, stamped with its step: under ``durability="async"`` a booking that
    committed before its step's checkpoint was saved is found by a rewind to that
    checkpoint and compensated (the GUIDE said such work "names no step" and stayed)."""
    from test_langgraph_findings import hold_save, saved_at
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    rome_booked = threading.Event()
    hold_save(monkeypatch, 1, rome_booked)

    def book(s: Plan) -> dict:
        city = s["plan"][0]
        with store.transaction(scope=saver.thread_scope("a")) as tx:
            with tx.action("book", args={"city": city}, compensate="cancel") as act:
                world.append(("book", city))
                act.result = {"ok": True}
        if city == "Rome":
            rome_booked.set()
        return {"plan": s["plan"][1:], "booked": [city]}
    graph = plan_graph(saver, book)
    config = {"configurable": {"thread_id": "a"}}
    graph.invoke({"plan": ["Paris", "Rome"], "booked": []}, config, durability="async")
    monkeypatch.undo()
    target = next(h for h in graph.get_state_history(config)
                  if h.values.get("booked") == ["Paris"])
    rome = next(a for a in store.actions() if a.args["city"] == "Rome")
    assert store.txn_info(rome.txid).lsn < saved_at(store, target.config)  # (the order)
    saver.rewind(target.config)
    assert standing(world) == ["Paris"]
    store.close()


def test_an_undo_fence_set_by_hand_as_a_list_fences_each_scope(tmp_path):
    """``tx.undo_fence`` is a plain attribute: a list of scopes set by hand was taken as
    one scope that no rewind reaches, so the commit after a rewind of one of them went
    through; now each is fenced (ConflictError), as a tuple's are."""
    import walstore
    store = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        with store.transaction(scope="b/") as tx:
            tx.put("b/x", 1)
        point = store.restore_point("p")
        with store.transaction(scope="b/") as tx:
            tx.put("b/x", 2)
        tx = store.transaction()
        tx.undo_fence = ["a/", "b/"]
        tx.snapshot
        store.rewind(point, scope="b/")
        tx.put("c/y", 1)
        with pytest.raises(walstore.ConflictError, match="works for scope 'b/'"):
            tx.commit()
    finally:
        store.close()
