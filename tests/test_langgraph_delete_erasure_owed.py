"""``WalstoreSaver.delete_thread`` whose purge committed but whose erasure failed
(``walstore.ErasureOwed``): the thread is gone, so the saver's codec forgets what it cached
of it all the same.

Before, ``codec.forget(prefix)`` came after ``store.purge(prefix)`` and was skipped when
the purge raised: the thread's cached values and delta bases outlived its purge (a
``ValueCache`` entry under the erased thread's scope, the state a new thread of the same
id would be read against).  The fault is real: ``tools.faults.FaultBackend`` fails the
WAL's fresh segment the erasure rotates to (ENOSPC).
"""
from __future__ import annotations

import errno
import os
import sys

import pytest

pytest.importorskip("langgraph.checkpoint.base")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tools.faults import FaultBackend, installed  # noqa: E402

import walstore  # noqa: E402
from test_langgraph_value_cache import cfg, converse, every_state, pair  # noqa: E402,F401


def test_a_delete_thread_whose_erasure_failed_still_forgets_the_thread(pair):
    store, cached, plain = pair
    converse(cached, 4, ("a", "b"))
    scope_b = cached.thread_scope("b")
    assert [k for k in cached.codec.values._entries if k[0].startswith(scope_b)]
    fb = FaultBackend()
    with installed(fb):
        rule = fb.fail("open", errno.ENOSPC, path="*.wal")
        with pytest.raises(walstore.ErasureOwed):
            cached.delete_thread("b")
    assert rule.fired == 1
    # the purge committed: the thread is gone, and nothing of it stays cached
    assert cached.get_tuple(cfg("b")) is None
    assert not [k for k in cached.codec.values._entries if k[0].startswith(scope_b)]
    # a new thread of the same id starts afresh, and reads as a cacheless saver reads it
    converse(cached, 2, ("b",))
    assert every_state(cached, "b") == every_state(plain, "b")
    assert len(every_state(cached, "b")) > 0
    store.checkpoint()  # (finishes the owed erasure)
