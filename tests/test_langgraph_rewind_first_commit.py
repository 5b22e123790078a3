"""saver.rewind when the store's very first commit is work of a step after the checkpoint
(``durability="async"``): that commit is undone in the rewind's own transaction
(``store.rewind(include=)``), so a kill -9 anywhere leaves both or neither.  Before, the
rewind went to that commit and then reverted it in a second transaction: a kill between
the two left that commit's work standing beside a thread rewound to before it (here the
input's pending write, LangGraph's first commit: the thread at its first checkpoint had
nothing left to run, ``next == ()``; a booking there would have stood uncompensated).
Real process, real files; the child is
tests/findings_scripts/langgraph_rewind_first_commit_child.py."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph")

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

SCRIPTS = Path(__file__).parent / "findings_scripts"
sys.path.insert(0, str(SCRIPTS))
from langgraph_rewind_first_commit_child import graph_of, open_store  # noqa: E402


def standing(world: str) -> list[str]:
    """The bookings the world file still has (each cancel takes one back)."""
    left: list[str] = []
    for line in Path(world).read_text().splitlines():
        kind, city = line.split(" ", 1)
        if kind == "book":
            left.append(city)
        else:
            left.remove(city)  # (a cancel of nothing booked: ValueError)
    return sorted(left)


def test_a_rewind_over_the_stores_first_commit_is_one_transaction_under_kill(tmp_path):
    path, world, marker = (str(tmp_path / n) for n in ("s", "world", "marker"))
    child = subprocess.run([sys.executable, str(SCRIPTS / "langgraph_rewind_first_commit_child.py"),
                            path, world, marker], timeout=120, capture_output=True, text=True,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert child.returncode in (0, -9), child.stderr  # (-9: killed at a second undo)

    store = open_store(path, world)  # (recovery runs what is owed)
    try:
        assert standing(world) == []  # Paris (the first commit) and Rome both cancelled
        assert {a.args["city"]: a.state for a in store.actions()} == {
            "Paris": "compensated", "Rome": "compensated"}
        saver = WalstoreSaver(store)
        graph = graph_of(store, saver, world, threading.Event())
        config = {"configurable": {"thread_id": "t"}}
        head = graph.get_state(config)
        assert head.metadata["step"] == -1 and head.next == ("__start__",)
        first = store.log(oldest_first=True, limit=1)[0]
        rewinds = [i for i in store.log() if "rewound_to" in i.extra]
        assert len(rewinds) == 1 and {first.txid, *(a.txid for a in store.actions())} <= \
            set(rewinds[0].extra["reverts"])  # (one transaction undid them all)
        graph.invoke(None, config, durability="sync")  # the run again: each booked once
        assert standing(world) == ["Paris", "Rome"]
        assert child.returncode == 0 and os.path.exists(marker)  # (no second undo began)
    finally:
        store.close()


def test_rewind_include_undoes_a_transaction_at_or_before_the_point(tmp_path):
    cancelled: list = []
    store = walstore.open(str(tmp_path / "s"), compensators={
        "cancel": lambda a: cancelled.append(a.args["n"])})
    try:
        def step(n, key, value):
            with store.transaction() as tx:
                tx.put(key, value)
                with tx.action("book", args={"n": n}, compensate="cancel") as act:
                    act.result = n
            return tx.id
        t1 = step(1, b"a", 1)
        t2 = step(2, b"b", 2)
        t3 = step(3, b"c", 3)
        point = store.txn_info(t2).lsn
        plan = store.rewind(walstore.LSN(point), include=[t1], dry_run=True).as_dict()
        assert sorted(plan["txids"]) == [t1, t3]
        assert sorted(c["txid"] for c in plan["compensations"]) == [t1, t3]
        info = store.rewind(walstore.LSN(point), include=[t1])
        assert sorted(info.extra["reverts"]) == [t1, t3]
        assert sorted(cancelled) == [1, 3]
        assert store.get(b"a") is None and store.get(b"b") == 2 and store.get(b"c") is None
        # a transaction between an included one and the point that wrote what it wrote
        # is kept, so the include is refused (nothing changes)
        t4 = step(4, b"d", 4)
        t5 = step(5, b"d", 5)
        t6 = step(6, b"e", 6)
        with pytest.raises(walstore.RevertConflict):
            store.rewind(walstore.LSN(store.txn_info(t5).lsn), include=[t4])
        assert store.get(b"d") == 5 and store.get(b"e") == 6 and sorted(cancelled) == [1, 3]
        with pytest.raises(walstore.UnknownPoint):
            store.rewind(walstore.LSN(store.txn_info(t5).lsn), include=[9999])
        with pytest.raises(TypeError):
            store.rewind(walstore.LSN(0), include=7)
        with pytest.raises(ValueError):
            store.rewind(walstore.LSN(0), include=[t6], keep=[t6])
        store.purge(b"p/")
        purge = store.log(limit=1)[0]
        assert "purge" in purge.extra
        purge = purge.txid
        t7 = step(7, b"f", 7)
        with pytest.raises(walstore.RevertConflict):
            store.rewind(walstore.LSN(store.txn_info(t7).lsn), include=[purge])
        assert store.get(b"e") == 6 and store.get(b"f") == 7 and sorted(cancelled) == [1, 3]
    finally:
        store.close()
