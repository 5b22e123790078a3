"""Audit 58 (probe3): two-phase commit and the coordinator (CONTRACT section 2, "Two-phase
commit"), as a demanding user coordinating several stores: prepares killed at each step,
decisions recovered, in-doubt transactions resolved from the CLI, many held at once.

Findings (each test named below fails on the code before its fix):

- Every in-doubt transaction's written values stayed in memory for as long as it was in
  doubt: the prepared set (which needs only the keys, for the holds) kept the whole write
  set of each, from the prepare on, and every writable open loaded all of them at once
  (a dict of every prepared row).  300 in doubt writing 1 MiB each: an open took 530 MB
  of anonymous memory before it returned.  The prepared set keeps keys now; the values
  stay in the log and LMDB and are read, one transaction at a time, by
  ``commit_prepared`` and ``prepared_details``
  (``test_an_open_holds_no_in_doubt_values_in_memory``,
  ``test_a_writer_holds_no_values_of_what_it_prepared``).

Real stores, real child processes; nothing of walstore is mocked.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import tracemalloc

import walstore

MIB = 1 << 20


def _value(i: int) -> bytes:
    return bytes([i % 251]) * MIB


def _open_in_child(path) -> dict:
    """Open the store in a fresh process: the memory Python holds once the open returned
    (and its peak during the open), and what it sees in doubt."""
    code = textwrap.dedent(f"""
        import json, tracemalloc, walstore
        tracemalloc.start()
        store = walstore.open({str(path)!r})
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(json.dumps({{"held": held, "peak": peak, "in_doubt": len(store.prepared())}}))
        store.close()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_open_holds_no_in_doubt_values_in_memory(tmp_path):
    path = tmp_path / "store"
    n = 120  # 120 MiB of values in doubt
    with walstore.open(str(path), durability="none") as s:
        for i in range(n):
            tx = s.transaction()
            tx.put(f"k/{i}", _value(i))
            tx.put(f"small/{i}", i)
            tx.prepare(f"g{i}")
    seen = _open_in_child(path)
    assert seen["in_doubt"] == n
    # (before: the open kept every value, 120 MiB, and held them all at once in a dict)
    assert seen["held"] < 10 * MIB and seen["peak"] < 30 * MIB, seen
    # the values are all still there for the decisions, before and after a reopen
    with walstore.open(str(path)) as s:
        assert len(s.prepared_details("g3").writes) == 2
        for i in range(0, n, 2):
            s.commit_prepared(f"g{i}")
    with walstore.open(str(path)) as s:
        for i in range(1, n, 2):
            s.rollback_prepared(f"g{i}")
        assert s.prepared() == []
        for i in (0, 2, n - 2):
            assert s.get(f"k/{i}") == _value(i) and s.get(f"small/{i}") == i
        for i in (1, n - 1):
            assert s.get(f"k/{i}") is None and s.get(f"small/{i}") is None


def test_a_writer_holds_no_values_of_what_it_prepared(tmp_path):
    path = tmp_path / "store"
    n = 40
    with walstore.open(str(path), durability="none") as s:
        tracemalloc.start()
        try:
            for i in range(n):
                tx = s.transaction()
                tx.put(f"k/{i}", _value(i))
                tx.prepare(f"g{i}")
                del tx
            s.checkpoint()  # (applied: the log's events leave memory)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert held < 10 * MIB, held  # (before: every value, 40 MiB)
        # the decisions still commit the values (and the holds still hold)
        for i in range(n):
            s.commit_prepared(f"g{i}")
        assert all(s.get(f"k/{i}") == _value(i) for i in range(n))
