"""Audit 60, saga: the Saga layer, 2PC and the ``transaction`` integration at the edges
of the commit point.

Findings (each test named below fails on the code before its fix):

- ``store.close()`` while another thread was inside a ``with tx.action(...)`` body: close
  waited for compensations and undo calls running elsewhere, not for action bodies, and
  closed the log under the body.  The body's result could not be logged (its ``with``
  exit raised StoreClosed), so the next open compensated the charge with
  ``action.result is None`` (the refund could not tell which charge to undo) — after a
  clean close, not a crash.  close() now waits (within its CLOSE_WAIT_S, as for
  compensations) for action bodies running in other threads to leave their block, so
  the result is logged first
  (``test_close_waits_for_an_action_body_in_another_thread_so_its_result_is_kept``;
  the closing thread's own transaction, whose body another thread ran, was refused its
  rollback and left to the next open, refunded with ``result=None`` too:
  ``test_close_rolls_back_its_own_transaction_once_another_threads_body_left``).
  And an action another thread entered once close() had begun: its intent was logged
  before the log closed, its body ran, and its result was lost the same way (7 runs in
  15 of an agent loop closed under it).  Such an action is refused now (StoreClosed, its
  body never runs), and one already being entered is waited for
  (``test_an_agent_loop_closed_under_it_never_loses_a_result``).
"""
from __future__ import annotations

import threading
import time
import warnings

import walstore


def test_close_waits_for_an_action_body_in_another_thread_so_its_result_is_kept(tmp_path):
    path = str(tmp_path / "s")
    refunds: list = []
    store = walstore.open(path, durability="none",
                          compensators={"refund": lambda a: refunds.append(a.result)})
    in_body, closing = threading.Event(), threading.Event()
    outcome: list = []

    def agent() -> None:
        try:
            with store.transaction() as tx:
                tx.put("order", "placed")
                with tx.action("charge", compensate="refund") as act:
                    in_body.set()
                    # the charge is being made meanwhile: it ends once close() has
                    # begun, and after the log closed if close() does not wait for it
                    closing.wait(10)
                    deadline = time.monotonic() + 1.0
                    while not store.closed and time.monotonic() < deadline:
                        time.sleep(0.01)
                    act.result = {"charge_id": "ch_42"}
            outcome.append("committed")
        except walstore.WalstoreError as e:
            outcome.append(type(e).__name__)

    worker = threading.Thread(target=agent)
    worker.start()
    assert in_body.wait(10)

    closer = threading.Thread(target=store.close)
    closer.start()
    while store._closing is None and closer.is_alive():  # (close() has begun)
        time.sleep(0.001)
    closing.set()
    closer.join(20)
    worker.join(20)
    assert not closer.is_alive() and not worker.is_alive()

    again = walstore.open(path, durability="none",
                          compensators={"refund": lambda a: refunds.append(a.result)})
    try:
        (action,) = again.actions()
        if outcome == ["committed"]:  # its commit landed before the log closed
            assert again.get("order") == "placed"
            assert action.state == "committed" and refunds == []
        else:  # not committed: compensated once, knowing which charge to refund
            assert again.get("order") is None
            assert action.state == "compensated"
            assert refunds == [{"charge_id": "ch_42"}]
        assert action.result == {"charge_id": "ch_42"}
    finally:
        again.close()


def test_close_rolls_back_its_own_transaction_once_another_threads_body_left(tmp_path):
    """The closing thread's own open transaction, whose second action's body another
    thread runs: close() refused to roll it back under the running body (a warning) and
    left it to the next open, which refunded that action with result=None.  Now the body
    leaves first and close() rolls the transaction back, each refund told its charge."""
    path = str(tmp_path / "s")
    refunds: list = []
    store = walstore.open(path, durability="none",
                          compensators={"refund": lambda a: refunds.append((a.id, a.result))})
    tx = store.transaction()
    tx.put("order", "placed")
    with tx.action("reserve", compensate="refund") as act:
        act.result = "seat-1"
    in_body, done = threading.Event(), threading.Event()

    def helper() -> None:
        with tx.action("charge", compensate="refund") as act:
            in_body.set()
            time.sleep(0.3)  # (the charge is being made when close() comes)
            act.result = "ch_42"
        done.wait(10)  # (the thread outlives the close)

    worker = threading.Thread(target=helper)
    worker.start()
    assert in_body.wait(10)
    store.close()
    done.set()
    worker.join(10)
    assert refunds == [(f"{tx.id}.2", "ch_42"), (f"{tx.id}.1", "seat-1")]
    again = walstore.open(path, durability="none",
                          compensators={"refund": lambda a: refunds.append((a.id, a.result))})
    try:
        assert again.get("order") is None
        assert [(a.state, a.result) for a in again.actions()] == [
            ("compensated", "ch_42"), ("compensated", "seat-1")]
        assert len(refunds) == 2  # nothing ran again
    finally:
        again.close()


def test_an_agent_loop_closed_under_it_never_loses_a_result(tmp_path):
    """A thread runs transactions with an action each, in a loop, while the main thread
    closes the store: every charge made is either committed or refunded knowing its
    result, at close or at the next open."""
    for round_ in range(8):
        path = str(tmp_path / f"s{round_}")
        charged: dict = {}
        refunds: list = []
        store = walstore.open(path, durability="none",
                              compensators={"refund": lambda a: refunds.append(a.result)})
        started = threading.Event()

        def agent() -> None:
            i = 0
            while True:
                i += 1
                try:
                    with store.transaction() as tx:
                        tx.put("step", i)
                        with tx.action("charge", compensate="refund") as act:
                            charged[act.id] = i  # the charge, made
                            act.result = i
                except walstore.WalstoreError:
                    return
                started.set()

        worker = threading.Thread(target=agent)
        worker.start()
        assert started.wait(10)
        time.sleep(0.002 * round_)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            store.close()
        worker.join(10)
        assert not worker.is_alive()
        again = walstore.open(path, durability="none",
                              compensators={"refund": lambda a: refunds.append(a.result)})
        try:
            seen = {a.id: (a.state, a.result) for a in again.actions()}
            lost = {aid: seen.get(aid) for aid, i in charged.items()
                    if seen.get(aid, (None, None))[1] != i}
            assert lost == {}, f"round {round_}: charges whose result was lost: {lost}"
            assert None not in refunds
        finally:
            again.close()
