"""A transaction does not commit or prepare while one of its ``with tx.action(...)``
bodies still runs (probe-2pc44): the action's result is not known yet.  Prepared there,
then committed, the action read ``committed`` with ``result=None`` for good (after a
reopen too) and a later revert's compensator could not tell which charge to refund;
committed there, the COMMIT carried ``result=None`` (the store said so until a reopen).
Refused before anything is decided: the transaction stays active, nothing compensated."""
from __future__ import annotations

import pytest

import walstore


@pytest.mark.parametrize("end", ["prepare", "commit"])
def test_an_end_inside_a_running_action_body_is_refused_and_changes_nothing(tmp_path, end):
    refunds: list = []
    path = str(tmp_path / "s")
    store = walstore.open(path, compensators={"refund": lambda a: refunds.append(a.result)})
    tx = store.transaction()
    tx.put("acct/a", 1)
    with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
        with pytest.raises(walstore.WalstoreError, match="still running"):
            tx.prepare("G") if end == "prepare" else tx.commit()
        assert tx.state == "active" and refunds == []  # (nothing decided, nothing undone)
        act.result = {"charge_id": "ch_123"}
    if end == "prepare":
        tx.prepare("G")
        store.commit_prepared("G")
    else:
        tx.commit()
    assert store.actions()[0].result == {"charge_id": "ch_123"}
    store.close()
    store = walstore.open(path, compensators={"refund": lambda a: refunds.append(a.result)})
    try:
        (action,) = store.actions()
        assert action.state == "committed" and action.result == {"charge_id": "ch_123"}
        store.revert(tx.id)
        assert refunds == [{"charge_id": "ch_123"}]
    finally:
        store.close()


def test_an_end_from_another_thread_waits_for_no_body_of_this_one(tmp_path):
    # (the check reads the body's thread's stack: a body that ended, whichever thread
    # entered it, blocks nothing)
    import threading
    store = walstore.open(str(tmp_path / "s"))
    try:
        tx = store.transaction()
        done = threading.Event()

        def run():
            with tx.action("charge", args={}) as act:
                act.result = 1
            done.set()
        t = threading.Thread(target=run)
        t.start()
        t.join()
        assert done.is_set()
        tx.commit()
        assert store.actions()[0].result == 1
    finally:
        store.close()


def test_a_prepare_while_an_async_action_body_waits_is_refused(tmp_path):
    # (review44: a body in a coroutine suspended at an await is on no thread's stack:
    # another task's prepare was accepted, and the action's result was lost for good)
    import asyncio
    store = walstore.open(str(tmp_path / "s"), compensators={"refund": lambda a: None})
    try:
        tx = store.transaction()
        tx.put("k", 1)
        refused: list = []

        async def body(started: asyncio.Event) -> None:
            with tx.action("charge", args={}, compensate="refund") as act:
                started.set()
                await asyncio.sleep(0.05)  # (the payment API)
                act.result = {"charge_id": "ch_1"}

        async def preparer(started: asyncio.Event) -> None:
            await started.wait()
            try:
                tx.prepare("G")
            except walstore.WalstoreError as e:
                refused.append(e)

        async def main() -> None:
            started = asyncio.Event()
            await asyncio.gather(body(started), preparer(started))
        asyncio.run(main())
        assert refused and "still running" in str(refused[0])
        tx.prepare("G")  # (the body ended)
        store.commit_prepared("G")
        assert store.actions()[0].result == {"charge_id": "ch_1"}
    finally:
        store.close()
