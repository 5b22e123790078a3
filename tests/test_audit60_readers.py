"""Audit 60: readers and isolation across threads and processes.

- py-lmdb keeps an aborted read transaction's reader slot until the Python object is
  freed, and the streamed reads (``store.scan``, ``tx.scan``, ``store.at(p).scan``,
  ``iter_history``, ``iter_actions``) kept their last chunk's transaction bound in the
  generator's frame while it waited at a yield: each unfinished iterator held one of the
  1,024 slots every process of the store shares.  A read-only process holding 1,024 of
  them made every read and every commit of the writer fail (StoreIOError "too many LMDB
  read transactions", 100 of 100 transactions), where the docs promise that nothing is
  held between reads (``test_unfinished_iterators_hold_no_lmdb_reader_slot``).
- The reader slots of a process killed inside its reads stayed taken: LMDB frees them only
  when asked, which the writer did once, at its open.  With the table full of them every
  read and commit of the live writer failed until it was reopened; a full table is now
  checked for dead processes' slots before the read is refused
  (``test_reader_slots_of_a_killed_process_are_freed_not_failing_every_read``).
- An exception kept by the caller (a ConflictError in a list, a retry loop's last error)
  kept every frame it came through alive, the read transactions in them too: 512 kept
  ConflictErrors held every slot.  The frames walstore's errors leave are cleared on the
  way out (``test_kept_conflict_errors_hold_no_lmdb_reader_slot``); a streamed scan's
  SnapshotTooOld held its generator's
  (``test_kept_snapshot_too_old_of_a_scan_holds_no_lmdb_reader_slot``), and a refused
  ``tx.prepare``'s ConflictError its validation's
  (``test_kept_conflict_errors_of_prepare_hold_no_lmdb_reader_slot``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import traceback

import walstore

HELD = 1100  # more unfinished iterators than LMDB has reader slots (1,024)

_HOLDER = textwrap.dedent("""
    import sys, time, walstore
    path, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = walstore.open(path, readonly=True)
    lsn = s.log(limit=1)[0].lsn
    make = {
        "scan": lambda: s.scan(prefix="k/"),
        "txscan": lambda: s.transaction().scan(prefix="k/"),
        "atscan": lambda: s.at(walstore.LSN(lsn)).scan(prefix="k/"),
        "history": lambda: s.iter_history("k/0001"),
        "actions": lambda: s.iter_actions(),
    }[kind]
    held = []
    try:
        for _ in range(n):
            it = make()
            next(it)
            held.append(it)
    except walstore.WalstoreError as e:
        print("failed", len(held), type(e).__name__, flush=True)
    else:
        print("held", len(held), flush=True)
    sys.stdin.readline()  # (holds them until the parent is done)
""")


def _fill(path: str) -> None:
    with walstore.open(path, durability="none") as s:
        for b in range(3):  # (history and actions to iterate)
            with s.transaction() as tx:
                tx.update({f"k/{i:04d}": f"v{b}" * 20 for i in range(600)})
                with tx.action("noop", args={"b": b}) as act:
                    act.result = b
        s.checkpoint()


def test_unfinished_iterators_hold_no_lmdb_reader_slot(tmp_path):
    path = str(tmp_path / "s")
    _fill(path)
    with walstore.open(path, durability="none") as s:
        for kind in ("scan", "txscan", "atscan", "history", "actions"):
            child = subprocess.Popen([sys.executable, "-c", _HOLDER, path, kind, str(HELD)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
            try:
                said = child.stdout.readline().strip()
                assert said == f"held {HELD}", (kind, said)
                # the writer reads LMDB (the keys are applied) and commits, beside them
                for i in range(20):
                    with s.transaction() as tx:
                        tx.put(f"k/{i:04d}", tx.get(f"k/{i + 300:04d}"))
                    s.checkpoint()
                assert s.get("k/0599") == "v2" * 20
            finally:
                child.stdin.close()
                child.wait(timeout=60)


_SLOT_TAKER = textwrap.dedent("""
    import os, signal, sys, lmdb
    # a process killed inside its reads: its reader slots stay taken in lock.mdb
    env = lmdb.open(sys.argv[1], readonly=True, max_dbs=32, max_readers=1024, lock=True)
    held = []
    try:
        while True:
            held.append(env.begin())
    except lmdb.ReadersFullError:
        pass
    print(len(held), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_reader_slots_of_a_killed_process_are_freed_not_failing_every_read(tmp_path):
    """A process killed with LMDB reader slots taken left them taken: LMDB frees them only
    when asked (``reader_check``), which a writer did once, at its open.  Every read and
    commit of the live writer then failed with StoreIOError ("too many LMDB read
    transactions"), 100 of 100, and so did every read-only open, until the writer was
    reopened.  Now a full reader table is checked for dead processes' slots first."""
    path = str(tmp_path / "s")
    _fill(path)
    with walstore.open(path, durability="none") as s:
        assert s.get("k/0001") == "v2" * 20
        taker = subprocess.run([sys.executable, "-c", _SLOT_TAKER, os.path.join(path, "db")],
                               capture_output=True, text=True, timeout=60)
        assert taker.returncode == -signal.SIGKILL, taker.stderr[-2000:]
        assert int(taker.stdout) > 1000  # (the writer's own slots: the rest)
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k/{i:04d}", tx.get(f"k/{i + 300:04d}"))
            s.checkpoint()
        assert s.get("k/0599") == "v2" * 20
        with walstore.open(path, readonly=True) as r:
            assert r.get("k/0001") == "v2" * 20
            assert len(list(r.scan(prefix="k/"))) == 600


def test_kept_conflict_errors_hold_no_lmdb_reader_slot(tmp_path):
    """An exception kept by the caller kept alive every frame it came through, and in them
    the LMDB read transactions (py-lmdb frees a slot only with the object): 512 kept
    ConflictErrors from commits (two slots each: the validation's reads), or 1,024
    SnapshotTooOld / HistoryTrimmed from reads, took every slot of the store, and every
    read and commit failed (StoreIOError)."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none", retain_transactions=1) as s:
        with s.transaction() as tx:
            tx.update({"a": 0, "b": 0})
        kept: list[Exception] = []
        for i in range(HELD):
            tx = s.transaction()
            tx.get("a")
            view = s.at(s.log(limit=1)[0].txid) if i % 3 == 2 else None
            for j in range(2):
                with s.transaction() as other:
                    other.update({"a": i, "b": j})
            s.checkpoint()  # (applied and trimmed: the validation and the reads go to LMDB)
            try:
                if i % 3 == 0:
                    tx.put("c", i)
                    tx.commit()  # ConflictError: "a" changed (its snapshot was trimmed)
                elif i % 3 == 1:
                    tx.get("b")  # SnapshotTooOld: retention trimmed the snapshot's history
                else:
                    view.get("a")  # HistoryTrimmed
            except (walstore.ConflictError, walstore.HistoryTrimmed) as e:
                kept.append(e)
            finally:
                if tx.state == "active":
                    tx.rollback()
        assert len(kept) == HELD
        with s.transaction() as tx:
            tx.put("after", tx.get("a"))
        assert s.get("after") == HELD - 1 and s.get("b") == 1
        # (the tracebacks still say where they came from)
        assert "snapshot.py" in "".join(traceback.format_exception(kept[1]))


def test_kept_snapshot_too_old_of_a_scan_holds_no_lmdb_reader_slot(tmp_path):
    """The same for a transaction's scan whose snapshot retention trimmed: the scan's
    generator frame kept its read transaction in the SnapshotTooOld it raised (1,024 kept,
    every read failed)."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=1) as s:
        with s.transaction() as tx:
            tx.update({"a": 0, "b": 0})
        kept: list[Exception] = []
        for i in range(HELD):
            tx = s.transaction()
            tx.get("a")
            rows = tx.scan()
            for j in range(2):
                with s.transaction() as other:
                    other.update({"a": i, "b": j})
            s.checkpoint()
            try:
                list(rows)
            except walstore.ConflictError as e:
                kept.append(e)
            tx.rollback()
        assert len(kept) == HELD
        assert dict(s.scan()) == {"a": HELD - 1, "b": 1}


def test_kept_conflict_errors_of_prepare_hold_no_lmdb_reader_slot(tmp_path):
    """``tx.prepare(gid)`` validates as a commit does: its ConflictError, kept, held the
    validation's read transactions (two slots each) until 512 of them failed every read."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.update({"a": 0})
        kept: list[Exception] = []
        for i in range(600):
            tx = s.transaction()
            tx.get("a")
            with s.transaction() as other:
                other.put("a", i)
            s.checkpoint()
            tx.put("b", i)
            try:
                tx.prepare(f"g{i}")
            except walstore.ConflictError as e:
                kept.append(e)
        assert len(kept) == 600 and s.prepared() == []
        with s.transaction() as tx:
            tx.put("after", tx.get("a"))
        assert s.get("after") == 599
