"""An undo made on the store itself cuts off a LangGraph thread's runs in flight (stop 76).

``saver.rewind`` and ``saver.delete_thread`` cut off the thread's runs in flight (their
later saves and node transactions refused: test_langgraph_cut_off_runs.py), but an undo
made directly on the store did not (probe h2, stop 76): a run in its "Rome" step, Rome
booked, then ``store.rewind(point, scope=saver.thread_scope(t))`` by another caller
(refunding Rome), and the run saved ``booked ['Paris', 'Rome']`` after it — the state and
the world disagreed.  The same for an unscoped ``store.rewind``, one scoped to a prefix
around threads or to a scope inside one, and ``store.purge`` of the thread.  Now the
saver watches every rewind and purge of its store
(``walstore.agent.scope.register_undo_watcher``) and marks the threads it reaches as
``saver.rewind`` marks its own.  A ``store.revert`` of the thread's work cuts off no run
(the lead's decision, stop 76: reverting a node's transaction leaves the thread's
checkpoints saying what the node returned whatever the saver does, and cutting the run
off left its step's booking standing with no checkpoint; to undo a thread's steps,
rewind the thread).  Orderings are forced with events, on real stores and real
threads, with LangGraph's own StateGraph.
"""
from __future__ import annotations

import contextvars
import threading

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402
from walstore.agent.scope import register_undo_watcher  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

from test_langgraph_findings import Plan, booking_store, plan_graph, standing  # noqa: E402

WAIT_S = 30


class Held:
    """A plan graph on ``store`` whose step booking ``city`` waits, once booked, for
    ``release`` (``booked`` set then; ``then()`` after it); its run in a thread
    (``start``: ``inp`` the graph's input, or a plan), its errors and result kept."""

    def __init__(self, store, world: list, saver: WalstoreSaver, city: str = "Rome",
                 then=None) -> None:
        self.booked, self.release = threading.Event(), threading.Event()
        self.errors: list = []
        self.result: list = []
        self.saver = saver

        def book(s: Plan) -> dict:
            here = s["plan"][0]
            book_noted(store, world, here)
            if here == city:
                self.booked.set()
                assert self.release.wait(WAIT_S)
                if then is not None:
                    then()
            return {"plan": s["plan"][1:], "booked": [here]}
        self.graph = plan_graph(saver, book)

    def start(self, thread_id: str, inp, durability: str = "sync",
              wait: bool = True) -> threading.Thread:
        config = {"configurable": {"thread_id": thread_id}}
        if isinstance(inp, list):
            inp = {"plan": inp, "booked": []}

        def run() -> None:
            try:
                self.result.append(self.graph.invoke(inp, config, durability=durability))
            except Exception as e:  # noqa: BLE001  (the run cut off)
                self.errors.append(e)
        th = threading.Thread(target=run)
        th.start()
        if wait:
            assert self.booked.wait(WAIT_S)
        return th

    def state(self, thread_id: str):
        return self.graph.get_state({"configurable": {"thread_id": thread_id}})

    def finish(self, th: threading.Thread) -> list[str]:
        self.release.set()
        th.join(WAIT_S * 2)
        assert not th.is_alive()
        return [type(e).__name__ for e in self.errors]


def book_noted(store, world: list, city: str) -> None:
    """A node's booking (``book_in``'s) that also notes it in a key of its own."""
    with store.transaction() as tx:
        tx.put(f"booking/{city}", True)
        with tx.action("book", args={"city": city}, compensate="cancel") as act:
            world.append(("book", city))
            act.result = {"ok": True}


def booking_of(store, city: str) -> int:
    return next(a.txid for a in store.actions() if a.args["city"] == city)


@pytest.mark.parametrize("how", ["scoped", "unscoped", "around-threads"])
@pytest.mark.parametrize("durability", ["sync", "exit"])
def test_a_store_rewind_reaching_the_thread_cuts_off_its_run_in_flight(
        tmp_path, how, durability):
    """The probe: Paris's step saved, Rome booked in the next step, then another caller
    rewinds the store to Paris's checkpoint (Rome refunded).  Before: the run saved
    ``['Paris', 'Rome']`` beside the refund."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    if durability == "exit":   # (no step checkpoint: Paris is a run of its own)
        held.graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="exit")
        th = held.start("a", ["Rome", "Oslo"], durability)
    else:
        th = held.start("a", ["Paris", "Rome", "Oslo"], durability)
    head = held.state("a")
    assert head.values["booked"] == ["Paris"]
    point = saver.rewind_point(head.config)
    scope = {"scoped": saver.thread_scope("a"), "unscoped": None,
             "around-threads": b"lg"}[how]
    assert store.rewind(point, scope=scope) is not None
    assert standing(world) == ["Paris"]          # (Rome refunded)
    assert held.finish(th) == ["StaleCheckpointError"]
    assert held.state("a").values["booked"] == standing(world) == ["Paris"], world
    # the thread goes on from where the rewind left it
    held.graph.invoke({"plan": ["Nice"]}, config, durability="sync")
    assert sorted(held.state("a").values["booked"]) == standing(world) == ["Nice", "Paris"]
    store.close()


def test_a_store_purge_of_the_thread_cuts_off_its_run_in_flight(tmp_path):
    """``store.purge(thread prefix)`` while the run is in Rome's step: the run saves
    nothing into the erased thread (as after ``saver.delete_thread``)."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    th = held.start("a", ["Paris", "Rome", "Oslo"], "exit")
    store.purge(saver.thread_scope("a"))
    assert held.finish(th) == ["StaleCheckpointError"]
    assert "Oslo" not in standing(world)         # (its node was refused)
    assert held.state("a").values == {}
    assert list(store.scan(prefix=saver.thread_scope("a"))) == []
    store.close()


def test_only_the_threads_the_undo_reaches_are_cut_off(tmp_path):
    """Runs of threads "a" and "b" in flight; a rewind scoped to "a" cuts off "a"'s
    alone: "b"'s run saves all its steps."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    a, b = Held(store, world, saver, "Rome"), Held(store, world, saver, "Lima")
    tha = a.start("a", ["Paris", "Rome", "Oslo"])
    thb = b.start("b", ["Quito", "Lima", "Cusco"])
    point = saver.rewind_point(a.state("a").config)
    assert store.rewind(point, scope=saver.thread_scope("a")) is not None
    assert b.finish(thb) == []
    assert a.finish(tha) == ["StaleCheckpointError"]
    assert b.state("b").values["booked"] == ["Quito", "Lima", "Cusco"]
    assert a.state("a").values["booked"] == ["Paris"]
    assert standing(world) == ["Cusco", "Lima", "Paris", "Quito"]
    store.close()


@pytest.mark.parametrize("reverted", ["Paris", "Rome"])
def test_a_revert_of_the_threads_booking_cuts_off_no_run(tmp_path, reverted):
    """Run 1 booked Paris; run 2 of the same thread is in Rome's step (Rome booked) when
    another caller reverts a booking of the thread: Paris's (run 1's), or Rome's (the
    running step's own).  The run is not cut off: it saves every step, each of its
    bookings made once, and the revert's refund ran once.  (With the revert watcher of
    c881fda5 the run was refused, "a store.revert undid work of the thread", and its
    unsaved step's booking refunded by the saver.)"""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    config = {"configurable": {"thread_id": "a"}}
    held.graph.invoke({"plan": ["Paris"], "booked": []}, config, durability="sync")
    th = held.start("a", ["Rome", "Oslo"])
    assert store.revert(booking_of(store, reverted)) is not None
    assert held.finish(th) == []
    assert held.state("a").values["booked"] == ["Paris", "Rome", "Oslo"]
    for city in ("Paris", "Rome", "Oslo"):
        assert world.count(("book", city)) == 1, world
    assert [w for w in world if w[0] == "cancel"] == [("cancel", reverted)], world
    assert standing(world) == sorted({"Paris", "Rome", "Oslo"} - {reverted})
    store.close()


def test_a_lost_runs_booking_reverted_by_hand_is_not_reported_left_standing(tmp_path):
    """Run A of thread "a" booked Rome and waits in its node; run B of the thread builds
    on the same checkpoint and saves first, so A's save loses the race and the saver
    reverts A's node transactions.  Another caller had reverted A's Rome booking by hand
    meanwhile: the refusal neither reports it "NOT undone" (before stop 76 it did: the
    saver's revert of it was refused, a later writer, the hand revert, naming it) nor
    refunds it twice."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    th = held.start("a", ["Rome"])
    held.graph.invoke({"plan": ["Lima"], "booked": []},
                      {"configurable": {"thread_id": "a"}}, durability="sync")
    assert store.revert(booking_of(store, "Rome")) is not None
    assert held.finish(th) == ["StaleCheckpointError"]
    message = str(held.errors[0])
    assert "moved on" in message and "NOT undone" not in message, message
    assert world.count(("cancel", "Rome")) == 1, world
    assert standing(world) == ["Lima"]
    assert held.state("a").values["booked"] == ["Lima"]
    store.close()


_REFUSING = threading.Event()


def _refuse_rewinds(store, scope):
    """An undo watcher that refuses every rewind while ``_REFUSING`` is set."""
    if _REFUSING.is_set():
        raise PermissionError("no rewind today")


def test_an_undo_that_fails_before_its_commit_cuts_off_nothing_one_failing_after_does(
        tmp_path):
    """A rewind to a point that does not exist, and a rewind refused by another undo
    watcher, change nothing: the run in flight goes on and saves every step.  A rewind
    whose compensation fails after its commit (CompensationFailed, ``committed``) cuts
    the next run off as one that returned."""
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver, "Rome")
    th = held.start("a", ["Paris", "Rome", "Oslo"])
    with pytest.raises(walstore.errors.UnknownPoint):
        store.rewind(10 ** 9, scope=saver.thread_scope("a"))
    point = saver.rewind_point(held.state("a").config)
    register_undo_watcher(_refuse_rewinds)   # (after the saver's: told after it)
    _REFUSING.set()
    try:
        with pytest.raises(PermissionError):
            store.rewind(point, scope=saver.thread_scope("a"))
    finally:
        _REFUSING.clear()
    assert held.finish(th) == []
    assert held.state("a").values["booked"] == ["Paris", "Rome", "Oslo"]
    assert standing(world) == ["Oslo", "Paris", "Rome"]

    lima = Held(store, world, saver, "Lima")
    th = lima.start("a", ["Lima", "Cusco"])
    head = lima.state("a")

    @store.compensator("cancel")
    def cancel(action):
        raise RuntimeError("payment provider down")
    with pytest.raises(walstore.CompensationFailed) as e:
        store.rewind(saver.rewind_point(head.config), scope=saver.thread_scope("a"))
    assert e.value.committed
    assert lima.finish(th) == ["StaleCheckpointError"]
    assert "Cusco" not in standing(world)
    assert lima.state("a").values["booked"] == ["Paris", "Rome", "Oslo"]
    store.close()


IN_COMPENSATOR: contextvars.ContextVar[bool] = contextvars.ContextVar("in_comp",
                                                                     default=False)


def test_the_rewinds_own_compensator_runs_a_graph_on_the_thread_unhindered(tmp_path,
                                                                          monkeypatch):
    """The compensator of a ``store.rewind`` that cut the run off runs the graph on the
    thread (a fork from the checkpoint before the undone step: no race with the run in
    flight): its node transaction and its saves, in LangGraph's worker threads carrying
    the compensator's context, never wait for the rewind they work for; the run in
    flight is cut off (before, it saved its step)."""
    from walstore.integrations.langgraph import saver as saver_mod
    waits: list[bool] = []

    class Spy(threading.Condition):
        def wait(self, timeout=None):
            waits.append(IN_COMPENSATOR.get())
            return super().wait(timeout)
    monkeypatch.setattr(saver_mod, "_UNDERWAY_DONE", Spy(threading.Lock()))
    store, world = booking_store(tmp_path)
    saver = WalstoreSaver(store)
    held = Held(store, world, saver)
    fork: list = []

    @store.compensator("cancel")
    def cancel(action):
        world.append(("cancel", action.args["city"]))
        token = IN_COMPENSATOR.set(True)
        try:   # (books a refund voucher on a fork of the thread)
            held.graph.invoke({"plan": [f"voucher {action.args['city']}"]}, fork[0],
                              durability="sync")
        finally:
            IN_COMPENSATOR.reset(token)
    th = held.start("a", ["Paris", "Rome", "Oslo"])
    head = held.state("a")
    fork.append(head.parent_config)
    assert store.rewind(saver.rewind_point(head.config),
                        scope=saver.thread_scope("a")) is not None
    assert True not in waits
    assert held.finish(th) == ["StaleCheckpointError"]
    assert held.state("a").values["booked"] == ["voucher Rome"]
    assert standing(world) == ["Paris", "voucher Rome"]
    store.close()
