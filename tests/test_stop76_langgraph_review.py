"""Review of the LangGraph saver's cut-off of runs by undos made on the store (stop 76 h5).

Each test failed on the commit under review (``_watch_undo``/``_watch_revert``, c881fda5)
and passes with its fix, on real stores, real threads and LangGraph's own StateGraph,
orderings forced with events:
- a revert reaching one key in each of 20,000 threads took 477 s (8 minutes; 0.26 s
  with no saver): each thread's cut-off read the newest log entry (the revert's target,
  its 20,000 keys decoded each time), grew the undoing context's tuple by one and
  scanned every value cache; now one undo's cut-offs are marked together;
"""
from __future__ import annotations

import operator
import threading
import time
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.agent.scope import register_undo_watcher  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.keys import SaverKeys  # noqa: E402

from test_langgraph_findings import book_in, booking_store, plan_graph, standing  # noqa: E402
from test_langgraph_store_undo_cuts_off_runs import Held, book_noted, booking_of  # noqa: E402

WAIT_S = 30


def test_a_revert_reaching_20000_threads_costs_its_size_not_its_square(tmp_path):
    """One key in each of 20,000 threads, reverted with a saver on the store: each
    thread is marked cut off, at the cost of a few dict updates each (counted: the log
    is read twice for the whole revert, not twice per thread)."""
    store = walstore.open(str(tmp_path / "s"), durability="none")
    saver = WalstoreSaver(store)
    keys = SaverKeys(b"lg")
    with store.transaction() as tx:
        for i in range(20000):
            tx.put(keys.thread(f"t{i}") + b"x", 1)
    txid = store.log(limit=1)[0].txid
    reads = []
    log = store.log

    def counted(*a, **k):
        reads.append(1)
        return log(*a, **k)
    store.log = counted
    assert store.revert(txid) is not None
    del store.log
    assert len(reads) <= 4
    from walstore.integrations.langgraph import saver as saver_mod
    reverts = saver_mod._reverts(store)
    assert keys.thread("t0") in reverts and keys.thread("t19999") in reverts
    assert not saver_mod._REMOVING_HERE.get() and not saver_mod._UNDERWAY.get(store)
    assert saver.codec is not None
    store.close()
