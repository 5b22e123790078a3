"""CONTRACT 4.4: recovery's cost grows with the WAL since the last checkpoint, not with the
store's size.  After a kill -9, opening checked every page of LMDB's trees in Python
(lmdb_check.walk_lmdb_data_file) before REDO: 0.06 s for 1,000 keys, 2.7 s for 400,000
(probe53).  Now it checks the pages REDO touches; these tests count them (no timing)."""
import os
import subprocess
import sys

import pytest

import walstore
from walstore.errors import CorruptionError
from walstore.engine import lmdb_check


def _crashed_store(path: str, n: int) -> None:
    """``n`` keys, a checkpoint, a 3-commit tail, then kill -9 (a real process)."""
    code = f'''
import os, walstore
s = walstore.open({path!r}, durability="none")
for b in range(0, {n}, 10000):
    with s.transaction() as tx:
        tx.update(("k%08d" % i, i) for i in range(b, min(b + 10000, {n})))
s.checkpoint()
for i in range(3):
    with s.transaction() as tx:
        tx.put("k%08d" % (i * 7919 % {n}), "tail")
        tx.put("tail%d" % i, 1)
s.sync()
os.kill(os.getpid(), 9)
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr


def _checked(path: str) -> tuple[int, int]:
    s = walstore.open(path)
    try:
        rep = s.last_recovery
        assert rep is not None and rep.redone == 3
        return rep.lmdb_pages_checked, s.get("tail2")
    finally:
        s.close()


def test_recovery_checks_pages_by_the_tail_not_by_the_store_size(tmp_path):
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    _crashed_store(small, 1_000)
    _crashed_store(big, 200_000)
    pages = os.path.getsize(os.path.join(big, "db", "data.mdb")) // 4096
    small_checked, v1 = _checked(small)
    big_checked, v2 = _checked(big)
    assert v1 == v2 == 1
    # the old open walked every page of the trees (thousands here); now: the small
    # tables whole, and per big tree its paths (a few pages per key and level)
    assert pages > 2_000
    assert 0 < small_checked < 200
    assert big_checked < small_checked + 200, (small_checked, big_checked, pages)
    print("pages checked:", small_checked, big_checked, "of", pages)


def test_a_damaged_leaf_on_the_redo_path_is_refused_not_a_signal(tmp_path):
    """The leaf REDO writes a tail key into, damaged in a big store (its tree is checked by
    paths, not whole): CorruptionError naming data.mdb, and no process dies of a signal."""
    big = str(tmp_path / "big")
    _crashed_store(big, 100_000)
    data = os.path.join(big, "db", "data.mdb")
    # a leaf holding the first tail key (in data, hist or hkeys: REDO touches all three)
    with open(data, "rb") as f:
        raw = f.read()
    at = raw.find(b"k%08d" % 0, 2 * 4096)
    assert at > 0
    page = at // 4096
    with open(data, "r+b") as f:
        f.seek(page * 4096 + 16)
        f.write(b"\xff" * 40)  # the node offsets: LMDB would read outside the map
    code = f"import walstore; walstore.open({big!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "CorruptionError" in r.stderr and "data.mdb" in r.stderr
    with pytest.raises(CorruptionError):
        lmdb_check.walk_lmdb_data_file(data)


def test_redo_after_skipping_the_applied_records_of_the_segment(tmp_path):
    """Recovery no longer parses the write lists of the records LMDB applied (the current
    segment starts with what the checkpoint applied: big chunked commits, parsed and thrown
    away on every crash, twice in strict mode).  A chunked commit (WRITES records) in the
    tail, after a chunked commit before the checkpoint in the same segment, is REDOne
    whole, in every mode."""
    path = str(tmp_path / "s")
    code = f'''
import os, walstore
s = walstore.open({path!r}, durability="none")
big = b"x" * 150_000
with s.transaction() as tx:
    tx.update(("a%04d" % i, big) for i in range(40))   # 6 MB: WRITES + COMMIT records
s.checkpoint()
with s.transaction() as tx:
    tx.update(("t%04d" % i, bytes([i]) * 150_000) for i in range(40))
    tx.put("a0005", "changed")
with s.transaction() as tx:
    tx.delete("a0007")
s.sync()
os.kill(os.getpid(), 9)
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    import shutil
    for mode in ("strict", "tolerate-tail", "skip-corrupt"):
        d = str(tmp_path / mode)
        shutil.copytree(path, d)
        (seg,) = [n for n in os.listdir(os.path.join(d, "wal")) if n.endswith(".wal")]
        s = walstore.open(d, options=walstore.Options(recovery_mode=mode))
        try:
            rep = s.last_recovery
            assert rep.redone == 2 and not rep.problems, rep
            # the segment holds the applied chunked commit too: read, not parsed
            assert int(seg[:-4]) < 6_000_000 < rep.applied_before, (seg, rep)
            assert rep.records >= 5, rep  # 2 applied, 3 REDOne (chunks, commits)
            assert s.get("t0039") == bytes([39]) * 150_000 and s.get("t0000") == bytes(150_000)
            assert s.get("a0005") == "changed" and s.get("a0007") is None
            assert s.get("a0039") == b"x" * 150_000
            assert sum(1 for _ in s.scan("t")) == 40
        finally:
            s.close()
