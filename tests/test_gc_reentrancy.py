"""A store dropped without close() is closed by the garbage collector (Store.__del__),
which may run in the middle of another store's open on the same thread: that must not
deadlock (the LMDB registry's lock is taken by both)."""
from __future__ import annotations

import gc
import threading

import walstore
from walstore.engine import lmdb_state


def test_a_dropped_store_finalized_during_another_open_does_not_deadlock(tmp_path,
                                                                         monkeypatch):
    real_check = lmdb_state.check_lmdb_files
    collected = []

    def check_then_collect(*args, **kwargs):  # runs inside LmdbState's registry lock
        real_check(*args, **kwargs)
        collected.append(gc.collect())

    outcome: list = []

    def scenario() -> None:
        gc.disable()
        try:
            dropped = walstore.open(str(tmp_path / "dropped"))
            dropped.cycle = dropped  # only the collector can free it
            del dropped
            monkeypatch.setattr(lmdb_state, "check_lmdb_files", check_then_collect)
            with walstore.open(str(tmp_path / "second")) as st:
                with st.transaction() as tx:
                    tx.put("k", 1)
                outcome.append(st.get("k"))
        finally:
            gc.enable()

    worker = threading.Thread(target=scenario, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "opening a store deadlocked while the collector " \
                                  "finalized a dropped one"
    assert outcome == [1]
    assert collected and collected[0] > 0
    # the dropped store let go of its writer lock: it opens again
    with walstore.open(str(tmp_path / "dropped")) as again:
        assert again.get("k") is None
