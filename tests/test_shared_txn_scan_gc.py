"""A scan of a transaction shared by threads copies its write set in one step that runs no
Python code.

The pass over a small write set was ``list(writes.items())``: one tuple per item, and a
garbage collection that one of them set off can run Python code (a finalizer, a
generator's ``finally``) and let another thread in mid-pass — its ``rollback_to`` took a
key out and the scan raised ``RuntimeError: dictionary changed size during iteration``
(seen once in CI, in ``test_audit51_core``'s 1.5 s race).  Here the other thread's step
runs deterministically where such a switch can happen: in a ``gc.callbacks`` hook, with
the collection threshold at 1, at the n-th collection inside the write-set pass, for
every n the pass reaches.
"""
from __future__ import annotations

import gc
import sys

import walstore
from walstore.codec import encode_key


def _step_at_collection(tx, n: int, inside: set, work):
    """``work()`` while, at the n-th collection inside a frame named in ``inside`` (within
    the 3 frames below the collection), another thread's step takes key r/039 out of
    ``tx``'s write set; (whether the step ran, what ``work`` returned)."""
    victim = encode_key("r/039")
    fired, seen = [], []

    def other_thread(phase, info):
        if phase != "start" or fired:
            return
        if not inside & {sys._getframe(d).f_code.co_name for d in range(1, 4)}:
            return
        seen.append(phase)
        if len(seen) == n and victim in tx._writes:
            fired.append(True)
            tx._writes.pop(victim, None)

    threshold = gc.get_threshold()
    gc.collect()
    gc.callbacks.append(other_thread)
    gc.set_threshold(1, 1, 1)
    try:
        out = work()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(other_thread)
    return bool(fired), out


def _scan_with_a_step_at_collection(s, n: int) -> tuple[bool, list]:
    """Scan a 40-key write set while, at the n-th collection inside the write-set pass,
    another thread's step takes a key out; (whether the step ran, the keys scanned)."""
    tx = s.transaction()
    for i in range(40):
        tx.put(f"r/{i:03}", i)
    try:
        return _step_at_collection(tx, n, {"_writes_in"},
                                   lambda: [k for k, _v in tx.scan(prefix="r/")])
    finally:
        tx.rollback()


def test_a_write_set_changed_during_a_collection_mid_scan_is_no_foreign_error(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        ran = 0
        for n in range(1, 16):
            fired, keys = _scan_with_a_step_at_collection(s, n)  # (before: RuntimeError)
            ran += fired
            assert keys[:39] == [f"r/{i:03}" for i in range(39)]
            assert len(keys) in ((39, 40) if fired else (40,))  # (before or after the step)
        assert ran >= 1  # (the step ran inside the pass at least once)


def test_a_write_set_changed_mid_count_of_its_size_is_no_foreign_error(tmp_path):
    # The write set's exact size (counted once a large transaction's upper bound passes
    # the limit's trigger) was a generator over ``writes.items()``: another thread's
    # ``rollback_to`` between two of its steps raised RuntimeError out of ``put``.  The
    # count now runs over a copy taken in one step.
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        ran = 0
        for n in range(1, 12):
            tx = s.transaction()
            for i in range(40):
                tx.put(f"r/{i:03}", "v" * 50)
            tx._write_trigger = 1000  # (the count's trigger, as a 480 MiB write set's)
            fired, _ = _step_at_collection(  # (before: RuntimeError, dictionary changed size)
                tx, n, {"_count_exactly", "<genexpr>"}, lambda: tx.put("r/new", "x"))
            ran += bool(fired)
            assert tx.get("r/new") == "x"
            tx.rollback()
        assert ran >= 1
