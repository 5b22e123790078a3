"""Read-only processes beside a writer, and serializable OCC across threads.

Readers are real processes (``walstore.open(path, readonly=True)`` in a child, driven over
stdin/stdout by twophase_scripts/reader.py, or checking invariants on their own in
twophase_scripts/pair_reader.py) while the writer keeps the store open and commits.  The
contract: readers "see every commit acknowledged before their read", never a partial
transaction, and cannot write.
"""
from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import walstore

from line_process import LineProcess

SCRIPTS = Path(__file__).resolve().parent / "twophase_scripts"


def _open(path, **kw):
    kw.setdefault("durability", "full")
    return walstore.open(str(path), **kw)


class Reader(LineProcess):
    """twophase_scripts/reader.py: one read-only walstore process, one command per line."""

    def __init__(self, path) -> None:
        super().__init__(SCRIPTS / "reader.py", str(path), quit_timeout=30)


@pytest.fixture
def reader_factory():
    readers: list[Reader] = []

    def make(path) -> Reader:
        r = Reader(path)
        readers.append(r)
        return r
    yield make
    for r in readers:
        r.close()


def _unapplied_writer(path):
    """A writer whose commits stay in the WAL (the applier waits a minute between rounds)."""
    return _open(path, apply_interval=60, apply_batch=100_000, max_unapplied=1_000_000)


# ---- what a reader sees --------------------------------------------------------------------

def test_reader_sees_acknowledged_commits_not_yet_in_lmdb(tmp_path, reader_factory):
    w = _unapplied_writer(tmp_path / "s")
    try:
        with w.transaction() as tx:
            tx.put("k", "applied")
        w.checkpoint()
        with w.transaction() as tx:
            tx.put("k", "in the wal only")
            tx.put("fresh", [1, 2])
        with w.transaction() as tx:
            tx.delete("fresh")
            tx.put("other", {"x": 1})
        assert w.stats()["applied_lsn"] < tx.lsn  # really not applied to LMDB yet
        r = reader_factory(tmp_path / "s")  # the writer is still open and did not close
        assert r("get", "k") == "in the wal only"
        assert r("get", "fresh") is None  # the later delete wins
        assert r("get", "other") == {"x": 1}
        assert r("scan") == {"k": "in the wal only", "other": {"x": 1}}
    finally:
        w.close()


def test_reader_history_and_past_views_include_commits_not_yet_in_lmdb(tmp_path):
    """``history(key)`` and ``at(point).scan()`` of a read-only store beside a writer whose
    last commits are in the WAL only: they list those versions and keys too (they read
    LMDB's history indexes alone and missed them until the writer applied)."""
    w = _unapplied_writer(tmp_path / "s")
    try:
        with w.transaction() as tx:
            tx.put("k", 0)
            tx.put("a", 1)
        w.checkpoint()
        txids = [tx.id]
        for i in (1, 2):
            with w.transaction() as tx:
                tx.put("k", i)
                tx.put(f"new{i}", i)
            txids.append(tx.id)
        with w.transaction() as tx:
            tx.delete("a")
        txids.append(tx.id)
        assert w.stats()["applied_lsn"] < tx.lsn  # really not applied to LMDB yet
        with walstore.open(str(tmp_path / "s"), readonly=True) as r:
            assert [(v.txid, v.value) for v in r.history("k")] == [
                (txids[2], 2), (txids[1], 1), (txids[0], 0)]
            assert [(v.txid, v.deleted) for v in r.history("a")] == [
                (txids[3], True), (txids[0], False)]
            assert dict(r.at(txids[2]).scan()) == {"k": 2, "a": 1, "new1": 1, "new2": 2}
            assert dict(r.at(txids[1]).scan()) == {"k": 1, "a": 1, "new1": 1}
            assert list(r.at(txids[3]).scan(reverse=True)) == [
                ("new2", 2), ("new1", 1), ("k", 2)]
            assert [v.value for v in r.history("k")] == [v.value for v in w.history("k")]
    finally:
        w.close()


def test_long_lived_reader_sees_later_commits(tmp_path, reader_factory):
    """Readers see every commit acknowledged before their read (not only before open)."""
    w = _unapplied_writer(tmp_path / "s")
    try:
        with w.transaction() as tx:
            tx.put("k", 1)
        r = reader_factory(tmp_path / "s")
        assert r("get", "k") == 1
        for i in range(2, 6):
            with w.transaction() as tx:  # acknowledged (fsynced) before the read below
                tx.put("k", i)
                tx.put(f"n/{i}", i)
            assert r("get", "k") == i
            assert r("scan", "n/") == {f"n/{j}": j for j in range(2, i + 1)}
        w.checkpoint()  # now applied to LMDB and the WAL trimmed
        with w.transaction() as tx:
            tx.delete("n/2")
        assert r("get", "n/2") is None and r("get", "k") == 5
    finally:
        w.close()
    # and after the writer closed cleanly
    assert r("get", "k") == 5 and r("get", "n/3") == 3


def test_reader_does_not_see_prepared_writes_until_committed(tmp_path, reader_factory):
    w = _unapplied_writer(tmp_path / "s")
    try:
        with w.transaction() as tx:
            tx.put("k", "old")
        tp = w.transaction()
        tp.put("k", "prepared")
        tp.prepare("g-r")
        r = reader_factory(tmp_path / "s")
        assert r("get", "k") == "old"
        tp.commit()
        assert r("get", "k") == "prepared"
        t2 = w.transaction()
        t2.put("k", "rolled back")
        t2.prepare("g-r2")
        assert r("get", "k") == "prepared"
        t2.rollback()
        assert r("get", "k") == "prepared"
    finally:
        w.close()


def test_readonly_store_refuses_writes(tmp_path, reader_factory):
    w = _open(tmp_path / "s")
    with w.transaction() as tx:
        tx.put("k", 1)
    try:
        r = reader_factory(tmp_path / "s")
        for cmd in (("put", "k"), ("delete", "k"), ("checkpoint",)):
            assert r(*cmd)["error"] == "ReadOnlyError", cmd
        assert r("begin") == "ok"
        assert r("txput", "k")["error"] == "ReadOnlyError"
        assert r("rollback") == "rolled back"
        assert r("get", "k") == 1
    finally:
        w.close()
    # in process too, with the writer closed
    with walstore.open(str(tmp_path / "s"), readonly=True) as ro:
        with pytest.raises(walstore.ReadOnlyError):
            with ro.transaction() as tx:
                tx.put("k", 2)
        with pytest.raises(walstore.ReadOnlyError):
            ro.checkpoint()
        assert ro.get("k") == 1
    with _open(tmp_path / "s") as w:
        assert w.get("k") == 1


def test_reader_of_a_crash_between_a_rotation_and_its_seal_reads_the_whole_log(tmp_path):
    # (probe 32: the writer killed after activating the next segment, before the old one's
    # SEAL — a crash image readers accept — made every read-only open spin for ever: the
    # follower closed the old segment without moving past where its SEAL would end)
    from walstore.log.segment import list_segments
    from walstore.log.format import SEAL_RECORD_SIZE
    from walstore.log.format import SEGMENT_HEADER_SIZE
    path = str(tmp_path / "s")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import time, walstore
s = walstore.open({path!r}, segment_size=64 * 1024, apply_interval=86400,
                  apply_batch=10 ** 6, max_unapplied=10 ** 6)
for i in range(60):
    with s.transaction() as tx:
        tx.put(f"k{{i}}", "x" * 2000)
print("done", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "done"
    finally:
        writer.kill()
        writer.wait()
    segs = list_segments(str(tmp_path / "s" / "wal"))
    assert len(segs) >= 2
    (old, old_path), (new, _p) = segs[-2], segs[-1]
    with open(old_path, "r+b") as f:  # the SEAL not written yet: the image of a kill a
        f.seek(new - SEAL_RECORD_SIZE - old + SEGMENT_HEADER_SIZE)  # step earlier
        f.write(b"\0" * SEAL_RECORD_SIZE)
    check = subprocess.run([sys.executable, "-c", f"""
import walstore
s = walstore.open({path!r}, readonly=True)
print(sum(1 for i in range(60) if s.get(f"k{{i}}") == "x" * 2000), len(s.log(limit=100)))
"""], capture_output=True, text=True, timeout=60)
    assert check.stdout.split() == ["60", "60"], (check.stdout, check.stderr[-2000:])


def test_readonly_open_of_a_missing_store_creates_nothing(tmp_path):
    with pytest.raises(walstore.NotAStore):
        walstore.open(str(tmp_path / "none"), readonly=True)
    assert not (tmp_path / "none").exists()


def _start_pair_readers(path, mode: str, n: int, seconds: float):
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "pair_reader.py"), str(path), mode,
                               str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    return procs


def _finish_readers(procs) -> list[tuple[int, int, int, list[str]]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        lines = out.strip().splitlines()
        _, reads, bad, seen = lines[-1].split()
        results.append((int(reads), int(bad), int(seen), [x for x in lines if x.startswith("BAD")]))
    return results


def _write_while(path_store, mode: str, procs, stop_after: float):
    """Commit as fast as possible until every reader process ended or the time is up."""
    i = 0
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        i += 1
        with path_store.transaction() as tx:
            if mode == "log":
                tx.put("ctr", i)
                tx.put(f"log/{i}", 1)
            else:
                tx.put("pair/a", i)
                tx.put("pair/b", i)
        if i % 97 == 0:
            path_store.checkpoint()
    return i


def test_many_readers_never_see_a_partial_pair(tmp_path):
    """4 reader processes scan while the writer commits pairs and applies them to LMDB."""
    w = _open(tmp_path / "s", apply_batch=1, apply_interval=0.001, segment_size=256 * 1024)
    try:
        with w.transaction() as tx:
            tx.put("pair/a", 0)
            tx.put("pair/b", 0)
        procs = _start_pair_readers(tmp_path / "s", "pair", 4, 2.5)
        commits = _write_while(w, "pair", procs, 10)
        results = _finish_readers(procs)
    finally:
        w.close()
    assert commits > 20
    for reads, bad, seen, lines in results:
        assert bad == 0, lines
        assert reads > 50 and seen > 2  # really read while the writer committed


def test_many_readers_never_see_part_of_a_commit_with_fresh_keys(tmp_path):
    """Each commit i writes ctr=i and a new key log/i: a scan must see them together."""
    w = _open(tmp_path / "s", apply_batch=1, apply_interval=0.001, segment_size=256 * 1024)
    try:
        with w.transaction() as tx:
            tx.put("ctr", 0)
        procs = _start_pair_readers(tmp_path / "s", "log", 4, 6)
        _write_while(w, "log", procs, 15)
        results = _finish_readers(procs)
    finally:
        w.close()
    assert all(bad == 0 for _r, bad, _s, _l in results), [l for *_x, l in results]


def test_reader_scan_racing_an_apply_sees_whole_commits(tmp_path):
    w = _unapplied_writer(tmp_path / "s")
    r = None
    try:
        with w.transaction() as tx:
            tx.put("ctr", 0)
        w.checkpoint()
        r = walstore.open(str(tmp_path / "s"), readonly=True)  # beside the writer, in process
        with w.transaction() as tx:
            tx.put("ctr", 1)
            tx.put("log/1", 1)
        assert dict(r.scan()) == {"ctr": 1, "log/1": 1}  # from the reader's WAL overlay
        state = r._engine.state
        real = state.read
        moved = []

        @contextlib.contextmanager
        def read_after_the_writer_moved():
            if not moved:
                moved.append(True)
                with w.transaction() as tx2:
                    tx2.put("ctr", 2)
                    tx2.put("log/2", 1)
                w.checkpoint()  # applied to LMDB before the reader reads its first chunk
            with real() as txn:
                yield txn
        state.read = read_after_the_writer_moved
        seen = dict(r.scan())
        del state.read
        assert moved
        assert seen in ({"ctr": 1, "log/1": 1}, {"ctr": 2, "log/1": 1, "log/2": 1}), seen
    finally:
        if r is not None:
            r.close()
        w.close()


def test_readonly_transaction_is_serializable(tmp_path, reader_factory):
    w = _unapplied_writer(tmp_path / "s")
    try:
        with w.transaction() as tx:
            tx.put("pair/a", 1)
            tx.put("pair/b", 1)
        r = reader_factory(tmp_path / "s")
        assert r("begin") == "ok"
        a = r("txget", "pair/a")
        with w.transaction() as tx:
            tx.put("pair/a", 2)
            tx.put("pair/b", 2)
        b = r("txget", "pair/b")
        outcome = r("commit")
        assert a == b or outcome != "committed", (a, b, outcome)
    finally:
        w.close()


def test_many_readers_with_transactions_never_see_a_partial_pair(tmp_path):
    w = _open(tmp_path / "s", apply_batch=1, apply_interval=0.001)
    try:
        with w.transaction() as tx:
            tx.put("pair/a", 0)
            tx.put("pair/b", 0)
        procs = _start_pair_readers(tmp_path / "s", "txpair", 3, 5)
        _write_while(w, "pair", procs, 12)
        results = _finish_readers(procs)
    finally:
        w.close()
    assert all(bad == 0 for _r, bad, _s, _l in results), [l for *_x, l in results]


# ---- OCC serializability across threads ------------------------------------------------------

def test_bank_transfers_with_audits_and_two_phase_transfers(tmp_path):
    """8 transfer threads (store.run; one in three transfers goes through prepare and
    commit_prepared) and 2 audit threads: every committed audit sees the constant total."""
    s = _open(tmp_path / "bank", apply_batch=16, apply_interval=0.005)
    accounts = [f"acct/{i}" for i in range(8)]
    with s.transaction() as tx:
        for a in accounts:
            tx.put(a, 50)
    total = 50 * len(accounts)
    done = threading.Event()
    moved: list[tuple[str, str, int]] = []
    moved_lock = threading.Lock()
    audits: list[int] = []
    errors: list[BaseException] = []

    def transfer(i: int) -> None:
        rng = random.Random(i)
        n = 0
        for _ in range(30):
            src, dst = rng.sample(accounts, 2)
            amount = rng.randint(1, 30)
            two_phase = rng.random() < 0.33

            def move(tx):
                a, b = tx.get(src), tx.get(dst)
                if a < amount:
                    return False
                tx.put(src, a - amount)
                tx.put(dst, b + amount)
                if two_phase:
                    nonlocal n
                    n += 1
                    tx.prepare(f"t{i}-{n}")
                    time.sleep(0.0005)  # held while in doubt: others must not slip in
                return True
            try:
                if s.run(move, retries=100, backoff=0.0002):
                    with moved_lock:
                        moved.append((src, dst, amount))
            except walstore.ConflictError:
                pass  # gave up: nothing was written

    def audit(i: int) -> None:
        while not done.is_set():
            try:
                if i % 2:
                    got = s.run(lambda tx: sum(v for _k, v in tx.scan(prefix="acct/")),
                                retries=0)
                else:
                    got = s.run(lambda tx: sum(tx[a] for a in accounts), retries=0)
            except walstore.ConflictError:
                continue
            except BaseException as e:
                errors.append(e)
                return
            audits.append(got)
            outside = sum(s.get(a) for a in accounts)  # not atomic: no assertion on it
            assert outside >= 0

    def guarded(fn, i):
        try:
            fn(i)
        except BaseException as e:
            errors.append(e)

    auditors = [threading.Thread(target=guarded, args=(audit, i)) for i in range(2)]
    workers = [threading.Thread(target=guarded, args=(transfer, i)) for i in range(8)]
    for t in auditors + workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    done.set()
    for t in auditors:
        t.join(timeout=60)
    try:
        assert not any(t.is_alive() for t in auditors + workers)
        assert not errors, errors
        assert audits and set(audits) == {total}, sorted(set(audits))
        assert len(moved) > 20
        expected = {a: 50 for a in accounts}
        for src, dst, amount in moved:
            expected[src] -= amount
            expected[dst] += amount
        assert dict(s.scan(prefix="acct/")) == expected
        assert s.prepared() == []
    finally:
        s.close()
    with _open(tmp_path / "bank") as s:
        assert dict(s.scan(prefix="acct/")) == expected


# ---- the writer grows the map under a read-only process's reader threads -------------------

def test_two_readers_remapping_at_once_do_not_wait_on_each_other():
    """Two reader threads of a read-only process find the map resized at once and both
    remap through ReadGate.exclusive from inside the gate: before, each waited for the
    other to leave the gate (a deadlock)."""
    from walstore.engine.lmdb_state import ReadGate
    gate = ReadGate()
    both_inside = threading.Barrier(2)
    ran: list[int] = []

    def reader(n):
        slot = gate.enter()
        try:
            both_inside.wait(5)
            gate.exclusive(lambda: ran.append(n))
        finally:
            gate.leave(slot)

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(ran) == [0, 1]


def test_exclusive_from_a_reader_waits_for_the_other_readers():
    from walstore.engine.lmdb_state import ReadGate
    gate = ReadGate()
    inside, leave = threading.Event(), threading.Event()
    order: list[str] = []

    def other():
        slot = gate.enter()
        inside.set()
        leave.wait(5)
        order.append("other left")
        gate.leave(slot)

    t = threading.Thread(target=other, daemon=True)
    t.start()
    assert inside.wait(5)
    slot = gate.enter()
    threading.Timer(0.2, leave.set).start()
    gate.exclusive(lambda: order.append("remapped"))
    gate.leave(slot)
    t.join(5)
    assert order == ["other left", "remapped"]


class ReaderThreads:
    """``n`` daemon threads, each calling ``step(i, rng)`` until ``stop`` is set; the first
    exception of a thread is kept in ``errors`` and ends that thread."""

    def __init__(self, n: int, step) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = [0] * n
        self.threads = [threading.Thread(target=self._run, args=(i, step), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, step) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            try:
                step(i, rng)
                self.reads[i] += 1
            except BaseException as e:
                self.errors.append(repr(e)[:300])
                return

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors[:3]
        assert all(self.reads), self.reads


def test_reader_threads_beside_a_writer_process_growing_the_map(tmp_path):
    """A read-only store with four reader threads (point reads, scans, snapshot
    transactions) while a writer process grows LMDB's map from 256 KiB many times over,
    so the readers find it resized (MapResizedError) and remap, through the read gate:
    every read succeeds and sees whole commits (each commit writes one generation to all
    keys of a group)."""
    path = str(tmp_path / "s")
    s = walstore.open(path, map_size=256 * 1024)
    s.close()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, walstore
s = walstore.open({path!r}, map_size=256 * 1024)
sys.stdin.readline()  # the readers are reading
for gen in range(1, 400):
    with s.transaction() as tx:
        for j in range(10):
            tx.put("g%d/%d" % (gen % 7, j), (gen, os.urandom(1500).hex()))
    if gen % 40 == 0:
        s.checkpoint()
print(s.stats()["lmdb_map_size"])
s.close()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    r = walstore.open(path, readonly=True, map_size=256 * 1024)  # the writer's size
    gate = r._engine.state.gate
    remaps = []
    real_exclusive = gate.exclusive

    def exclusive(fn):  # count the remaps the readers did
        remaps.append(1)
        real_exclusive(fn)

    gate.exclusive = exclusive

    def step(n, rng):
        g = rng.randrange(7)
        if n == 0:
            r.get(f"g{g}/{rng.randrange(10)}")
        elif n == 1:
            gens = {v[0] for _k, v in r.scan(prefix=f"g{g}/")}
            assert len(gens) <= 1, gens  # one commit wrote the whole group
        else:
            with r.transaction() as tx:
                gens = {tx.get(f"g{g}/{j}", (0,))[0] for j in range(10)}
                assert len(gens) == 1, gens

    readers = ReaderThreads(4, step)
    out, _ = writer.communicate("go\n", timeout=240)
    readers.finish()
    assert writer.returncode == 0
    assert int(out.strip()) >= 64 * 256 * 1024  # the map grew many times over
    assert remaps, "no reader ever found the map resized"
    r.close()


def test_reads_beside_compactions_never_use_a_swapped_out_table_handle(tmp_path):
    """A purge compacts LMDB and swaps the environment: every table handle of the process
    is replaced.  A read that took a handle before the swap and began its transaction after
    it failed with 'Database handle belongs to another environment' (a false
    CorruptionError; found by the soak once purges landed under load).  Here reader
    threads read through every kind of call (point reads of the data and index tables,
    history, the log, actions, restore points) while the main thread compacts 40 times."""
    s = walstore.open(str(tmp_path / "s"), durability="normal")
    for i in range(50):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
            with tx.action("note", args={"i": i}):
                pass
    s.restore_point("p")

    def step(n, rng):
        i = rng.randrange(50)
        if n == 0:
            assert s.get(f"k{i}") == i
            s.stats()
        elif n == 1:
            assert s.history(f"k{i}")
            assert len(s.log(limit=5)) == 5
        else:
            assert s.restore_points()
            assert s.actions()

    readers = ReaderThreads(3, step)
    try:
        for _ in range(40):
            s._engine.state.compact()
            if readers.errors:
                break
    finally:
        readers.finish()
    s.close()


def test_readonly_transaction_ids_never_equal_a_writers_or_each_others(tmp_path):
    """CONTRACT 2: ``tx.id`` is unique.  A read-only process handed out 1, 2, 3 ... the
    very ids the writer had committed (probe-engine).  Its ids now lie above every id a
    writer can hand out (2**63 + pid * 2**40 + n): apart from the writer's before and
    after, from other read-only processes' and from other read-only handles' of the same
    process."""
    path = tmp_path / "s"
    w = walstore.open(str(path))
    used = []
    for i in range(3):
        with w.transaction() as tx:
            tx.put("k", i)
        used.append(tx.id)
    script = f"""
import walstore
r = walstore.open({str(path)!r}, readonly=True)
ids = [r.transaction().id for _ in range(3)]
with r.transaction() as tx:
    assert tx.get("k") == 2
    ids.append(tx.id)
r.close()
print(*ids)
"""
    children = [[int(x) for x in subprocess.run([sys.executable, "-c", script], check=True,
                                                capture_output=True, text=True).stdout.split()]
                for _ in range(2)]
    r1 = walstore.open(str(path), readonly=True)
    r2 = walstore.open(str(path), readonly=True)
    mine = [r1.transaction().id, r2.transaction().id, r1.transaction().id]
    for i in range(3):
        with w.transaction() as tx:
            tx.put("k", i)
        used.append(tx.id)
    logged = [t.txid for t in w.log()]
    r1.close(), r2.close(), w.close()
    ro = children[0] + children[1] + mine
    assert len(set(ro)) == len(ro), ro
    assert not set(ro) & (set(used) | set(logged)), (ro, used)
    assert min(ro) > 1 << 63 and max(ro) < 1 << 64
