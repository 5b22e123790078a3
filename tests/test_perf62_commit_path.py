"""The commit path's stop-62 cuts keep their promises.

- A put under a savepoint logs its before-image without a signal section: an interrupt
  between the undo entry and its key's note in the level leaves one entry too many, which
  must be harmless — a rollback to the savepoint (or to an outer one, after a release
  merged the levels) still puts back the value from before the level.
- The group commit's leader tells its caller whether its round covered it: commits of
  many threads, each waiting on another's fsync or leading one, are all durable and
  visible when they return (read-your-writes), and a reopen finds every one.
"""
from __future__ import annotations

import sys
import threading

import pytest

import walstore


def _interrupt_after_the_entry(tx, key, value):
    """``tx.put(key, value)`` with a KeyboardInterrupt raised right after the undo log's
    append inside ``_keep_before`` (where a signal handler could run: a C call's return),
    before the key is noted in the level."""
    undo = tx._undo
    fired = []

    def hook(frame, event, arg):
        if (not fired and event == "c_return" and frame.f_code.co_name == "_keep_before"
                and getattr(arg, "__name__", "") == "append"
                and getattr(arg, "__self__", None) is undo):
            fired.append(len(undo))
            raise KeyboardInterrupt("after the undo entry")

    sys.setprofile(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            tx.put(key, value)
    finally:
        sys.setprofile(None)
    assert fired, "the hook never reached the undo log's append"


@pytest.mark.parametrize("durability", ["full", "none"])
def test_an_interrupt_between_a_before_image_and_its_note_is_harmless(tmp_path, durability):
    s = walstore.open(str(tmp_path / "s"), durability=durability)
    with s.transaction() as tx:
        tx.put("k", "committed")
    with s.transaction() as tx:
        tx.put("k", "before")
        sp = tx.savepoint("a")
        _interrupt_after_the_entry(tx, "k", "first")
        assert tx.get("k") == "before"  # (the put itself never happened)
        # written again at the same level: the key was not noted, so a second entry is
        # logged (holding "before" again); one more write adds none
        tx.put("k", "second")
        tx.put("k", "third")
        assert len(tx._undo) == 2  # (the duplicate entry this test is about)
        tx.rollback_to(sp)
        assert tx.get("k") == "before"
        # the level is empty again; once more, through a release into an outer level
        outer = tx.savepoint("outer")
        inner = tx.savepoint("inner")
        _interrupt_after_the_entry(tx, "k", "x")
        tx.put("k", "y")
        tx.release(inner)
        tx.put("k", "z")
        tx.rollback_to(outer)
        assert tx.get("k") == "before"
        tx.put("n", 1)
    assert s.get("k") == "before" and s.get("n") == 1
    s.close()
    s = walstore.open(str(tmp_path / "s"), durability=durability)
    assert s.get("k") == "before"
    s.close()


def test_a_new_key_interrupted_after_its_entry_is_taken_out_by_the_rollback(tmp_path):
    s = walstore.open(str(tmp_path / "s"))
    with s.transaction() as tx:
        sp = tx.savepoint()
        _interrupt_after_the_entry(tx, "new", 1)
        tx.put("new", 2)
        tx.rollback_to(sp)
        assert tx.get("new") is None
        tx.put("other", 1)
    assert s.get("new") is None and s.get("other") == 1
    s.close()


def test_commits_of_many_threads_are_visible_and_durable_when_they_return(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="full")
    errors, lost = [], []
    start = threading.Barrier(8)

    def writer(t):
        try:
            start.wait()
            for i in range(150):
                with s.transaction() as tx:
                    tx.put(f"{t}/{i}", i)
                if s.get(f"{t}/{i}") != i:  # read-your-writes on return
                    lost.append((t, i))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and not lost
    wal = s._engine.wal
    assert wal.synced_lsn == wal.written_lsn  # every acknowledged commit synced
    assert not wal._syncing and not wal._waiters  # the lead handed back, nobody left
    assert wal.fsyncs < 8 * 150  # (some commits shared an fsync)
    s.close()
    s = walstore.open(str(tmp_path / "s"))
    assert all(s.get(f"{t}/{i}") == i for t in range(8) for i in range(150))
    s.close()
