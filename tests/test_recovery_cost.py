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


def _leaf_holding(path: str, dbname: bytes, key: bytes) -> tuple[int, int, int]:
    """(page number, page size, the DB's page count) of the leaf of ``dbname`` holding
    ``key`` (read with the checker's own page reader)."""
    from walstore.engine import lmdb_check as lc
    fd = os.open(path, os.O_RDONLY)
    try:
        m0, m1 = lc._read_metas(fd)
        newest = m1 if m0.txnid < m1.txnid else m0
        pages = lc._Pages(fd, newest.psize, lc._file_size(fd), newest.last_pg)
        pages.budget = 1 << 62
        found: list = []
        lc._walk_tree(pages, newest, "main DB", newest.main, True,
                      bytearray(newest.last_pg // 8 + 1), found)
        (db,) = [d for _label, d, _m, name in found if name == dbname]
        stack = [db.root]
        while stack:
            pgno = stack.pop()
            page, flags, nkeys = pages.btree(pgno, "x")
            for off, low, nflags, ksize in pages.nodes(page, pgno, nkeys):
                if flags & lc.P_LEAF:
                    if page[off + lc.NODE_HEADER: off + lc.NODE_HEADER + ksize] == key:
                        return pgno, newest.psize, db.pages
                else:
                    stack.append(lc._child(pages, low, nflags, pgno, "x", 0))
        raise AssertionError(f"{key!r} not in {dbname!r}")
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["revert", "loser"])
def test_a_damaged_action_leaf_an_undo_or_a_loser_rewrites_is_refused_not_a_signal(
        tmp_path, how):
    """Two paths the page check missed at first (probe 56): REDO of an undo's COMMIT that
    names an old transaction's action (``compensate``), and a loser's ABORT, write action
    rows anywhere in a big ``actions`` table; the open also reads that table whole to find
    what is owed.  A damaged leaf there killed the open with SIGBUS; the open checks the
    table whole now: CorruptionError naming data.mdb."""
    path = str(tmp_path / "s")
    tail = ("s.compensators['refund'] = lambda a: os.kill(os.getpid(), 9)\n"
            "print(ids[700], flush=True)\ns.revert(int(ids[700].split('.')[0]))\n"
            if how == "revert" else
            "tx = s.transaction()\n"
            "with tx.action('charge', args={'pad': 'L'}, compensate='refund') as act:\n"
            "    pass\nprint(act.id, flush=True)\ns.checkpoint()\n"
            "os.kill(os.getpid(), 9)\n")
    code = ("import os, sys, walstore\n"
            "s = walstore.open(sys.argv[1], durability='none',\n"
            "                  compensators={'refund': lambda a: None})\nids = []\n"
            "for i in range(1500):\n"
            "    tx = s.transaction()\n"
            "    with tx.action('charge', args={'pad': 'x' * 300}, compensate='refund') as a:\n"
            "        ids.append(a.id)\n"
            "    tx.put('k%05d' % i, i)\n    tx.commit()\n"
            "s.checkpoint()\n" + tail)
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    data = os.path.join(path, "db", "data.mdb")
    pgno, psize, db_pages = _leaf_holding(data, b"actions", r.stdout.split()[0].encode())
    assert db_pages > 64  # (a big table: only paths were checked in it)
    with open(data, "r+b") as f:  # node 0's offset now points ~40 KiB past its page
        f.seek(pgno * psize + 17)
        f.write(b"\xa0")
    r = subprocess.run([sys.executable, "-c", "import sys, walstore\n"
                        "walstore.open(sys.argv[1], compensators={'refund': print})", path],
                       capture_output=True, text=True)
    assert r.returncode == 1, (r.returncode, r.stderr[-800:])  # (not -7: SIGBUS)
    assert "CorruptionError" in r.stderr and "data.mdb" in r.stderr, r.stderr[-800:]
