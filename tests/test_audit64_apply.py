"""Audit of stop 63's applier (the column-at-a-time apply of runs of plain commits,
``apply._plain_run``) and the MemTable's plain drop (``MemTable._drop_plain``): what a
user reads through the API — values, scans, ``at``, history, the log, a conflict —
is the same before a batch is applied (from the MemTable), after it (from LMDB), after a
reopen, after a kill -9 and REDO, and after an LMDB write that failed; and the rows it
writes are the event-by-event loop's, byte for byte, for streams of many shapes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walstore
from walstore.codec import pack
from store_support import cli_env
from test_perf63_apply import _apply_both  # (the event loop against the column apply)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.faults import FaultBackend, installed  # noqa: E402

# keys of several lengths: one byte, short, a length where msgpack's bin header changes
# (255/256: a txns row's "w" is joined only below 256), and the longest allowed (500)
KEYS = [b"a", b"k1", b"k2", b"k3", b"q" * 255, b"r" * 256, b"z" * 500]
VALUES = [b"", b"v", "text", 7, None, [1, 2], b"x" * 3000]
DELETE = object()


def _open(path, **kw):
    return walstore.open(str(path), durability="none", apply_interval=86400,
                         apply_batch=10 ** 9, max_unapplied=10 ** 6,
                         compensators={"undo": lambda *a, **k: None}, **kw)


def _views(s, points, keys=KEYS):
    """Everything a user reads that the applier's rows make: values, a scan, the state
    at each point, the history of ``keys``, the log."""
    out = {
        "get": {k: s.get(k, "<absent>") for k in keys},
        "scan": list(s.scan()),
        "history": {k: [(v.txid, v.lsn, v.value, v.deleted) for v in s.history(k)]
                    for k in keys},
        "log": [(t.txid, t.lsn, sorted(t.keys), t.meta, t.actions, t.scope)
                for t in s.log()],
    }
    # (last: ``at`` applies what is unapplied first; the reads above took the MemTable's)
    out["at"] = {p: dict(s.at(walstore.LSN(p)).scan()) for p in points}
    return out


WRITE = st.tuples(st.sampled_from(KEYS),
                  st.one_of(st.sampled_from(VALUES), st.just(DELETE)))
OPS = st.one_of(
    # a plain commit: puts and deletes, a key written twice in it, keys in any order
    st.tuples(st.just("plain"), st.lists(WRITE, min_size=1, max_size=6)),
    st.tuples(st.just("plain"), st.lists(WRITE, min_size=1, max_size=1)),
    st.tuples(st.just("action"), WRITE),
    st.tuples(st.just("scoped"), WRITE),
    st.tuples(st.just("point"),),
    st.tuples(st.just("2pc"), WRITE, st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("apply"), st.integers(1, 7)),
    st.tuples(st.just("checkpoint"),),
    st.tuples(st.just("reopen"),),
    st.tuples(st.just("stale"), st.sampled_from(KEYS), WRITE, st.integers(0, 7)),
    st.tuples(st.just("rewind"), st.integers(0, 5)),
)


def _write(tx, k, v):
    if v is DELETE:
        tx.delete(k)
    else:
        tx.put(k, v)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=30))
def test_state_and_views_are_the_same_before_and_after_the_plain_apply(tmp_path_factory,
                                                                       ops):
    """Random sequences of plain commits (puts, deletes, a key written twice in one
    commit, deletes of keys never written, long keys, empty and large values) between
    commits that are not plain (an action, a scope, a two-phase commit, a rewind) and
    restore points, applied in small batches (so a batch holds runs of plain commits
    between other events), checkpoints and reopens: the values and every point's state
    are the model's; the views (history, log) read the same from the MemTable as from
    LMDB after a drain and after a reopen; a transaction that read a key before a plain
    commit wrote it, applied before it commits, conflicts (and one that read another key
    does not)."""
    path = tmp_path_factory.mktemp("model64") / "s"
    s = _open(path)
    model: dict = {}
    points: list[int] = []
    states: dict[int, dict] = {}  # point LSN -> the model then
    gids = 0
    try:
        for op in ops:
            kind = op[0]
            if kind == "plain":
                with s.transaction() as tx:
                    for k, v in op[1]:
                        _write(tx, k, v)
                for k, v in op[1]:
                    if v is DELETE:
                        model.pop(k, None)
                    else:
                        model[k] = v
            elif kind in ("action", "scoped"):
                (k, v), = op[1:]
                with s.transaction(meta={"op": kind},
                                   scope=k[:1] if kind == "scoped" else None) as tx:
                    if kind == "action":
                        with tx.action("step", args={"k": k}, compensate="undo") as act:
                            act.result = 1
                    _write(tx, k, v)
                if v is DELETE:
                    model.pop(k, None)
                else:
                    model[k] = v
            elif kind == "point":
                lsn = int(s.restore_point("p%d" % len(points)))
                points.append(lsn)
                states[lsn] = dict(model)
            elif kind == "2pc":
                (k, v), commit, applied = op[1:]
                gid = "g%d" % gids
                gids += 1
                tx = s.transaction()
                _write(tx, k, v)
                tx.prepare(gid)
                s._engine.apply_published(limit=applied or None)
                if commit:
                    s.commit_prepared(gid)
                    if v is DELETE:
                        model.pop(k, None)
                    else:
                        model[k] = v
                else:
                    s.rollback_prepared(gid)
            elif kind == "apply":
                s._engine.apply_published(limit=op[1])
            elif kind == "checkpoint":
                s.checkpoint()
            elif kind == "reopen":
                s.close()
                s = _open(path)
            elif kind == "stale":
                read, (k, v), applied = op[1:]
                stale = s.transaction()
                stale.get(read)  # its snapshot: before the commit below
                with s.transaction() as tx:
                    _write(tx, k, v)
                if v is DELETE:
                    model.pop(k, None)
                else:
                    model[k] = v
                s._engine.apply_published(limit=applied or None)
                stale.put(b"stale-wrote", 1)
                if read == k:
                    with pytest.raises(walstore.ConflictError):
                        stale.commit()
                else:
                    stale.commit()
                    model[b"stale-wrote"] = 1
            elif kind == "rewind" and points:
                to = points[op[1] % len(points)]
                s.rewind(walstore.LSN(to), force=True)
                model = dict(states[to])
            got = {k: s.get(k, "<absent>") for k in KEYS}
            assert got == {k: model.get(k, "<absent>") for k in KEYS}, op
        assert dict(s.scan()) == model
        before = _views(s, points)  # (what was unapplied read from the MemTable)
        s._engine.drain()
        assert not s._engine.memtable.events
        assert _views(s, points) == before
        for p in points:
            assert dict(s.at(walstore.LSN(p)).scan()) == states[p]
        assert _views(s, points) == before
        s.close()
        s = _open(path)
        assert _views(s, points) == before
    finally:
        s.close()


def test_reads_never_miss_a_commit_while_plain_batches_leave_the_memtable(tmp_path):
    """Readers beside an applier that applies plain batches of one to a few commits and
    drops them from the MemTable (the plain drop): a latest read never goes back, a
    transaction's two reads of a pair written in one commit agree, as do a scan's, a view
    at a commit's LSN reads that commit, and increments by two writers (read, then
    write) lose none."""
    s = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=0.001,
                      apply_batch=3)
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    stop = threading.Event()
    errors: list = []
    done = [0, 0]  # increments committed by each writer
    lsns: list = []  # (LSN of the pair's commit, its value)

    def pairs():
        for i in range(1, 1500):
            with s.transaction() as tx:
                tx.put(b"a", i)
                tx.put(b"b", i)
            lsns.append((int(tx.lsn) + 1, i))

    def increments(n):
        for _ in range(300):
            def inc(tx):
                tx.put(b"count", tx.get(b"count", 0) + 1)
            s.run(inc, retries=1000)
            done[n] += 1

    def reader():
        seen = 0
        try:
            while not stop.is_set():
                v = s.get(b"a", 0)
                assert v >= seen, (v, seen)
                seen = v
                tx = s.transaction()
                try:
                    assert tx.get(b"a") == tx.get(b"b")
                finally:
                    tx.rollback()
                pair = dict(s.scan(start=b"a", end=b"c"))  # (one state: both or neither)
                assert pair.get(b"a") == pair.get(b"b"), pair
                if lsns:
                    lsn, i = lsns[len(lsns) // 2]
                    assert s.at(walstore.LSN(lsn)).get(b"a") == i
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=pairs)] + [
        threading.Thread(target=increments, args=(n,)) for n in range(2)]
    try:
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
    finally:
        sys.setswitchinterval(old_switch)
        stop.set()
    try:
        assert not errors, errors[0]
        assert s.get(b"count") == sum(done) == 600
        assert s.get(b"a") == s.get(b"b") == 1499
    finally:
        s.close()


CHILD = """
import sys, walstore
s = walstore.open(sys.argv[1], durability="normal", apply_interval=0.001, apply_batch=5,
                  compensators={"undo": lambda *a, **k: None})
i = 0
while True:
    i += 1
    with s.transaction() as tx:
        if i % 50 == 0:  # not plain: an action amid the runs
            with tx.action("step", args={"i": i}, compensate="undo") as act:
                act.result = i
        tx.put(b"k%d" % (i % 37), i)
        tx.put(b"n%04d" % i, b"v" * (i % 300))
        if i % 7 == 0:
            tx.delete(b"k%d" % ((i * 3) % 37))
            tx.delete(b"never%d" % i)
        tx.put(b"last", i)
    if i % 40 == 0:
        s.restore_point("p%d" % i)
    print(i, flush=True)
"""


def _model_after(j: int) -> dict:
    m: dict = {}
    for i in range(1, j + 1):
        m[b"k%d" % (i % 37)] = i
        m[b"n%04d" % i] = b"v" * (i % 300)
        if i % 7 == 0:
            m.pop(b"k%d" % ((i * 3) % 37), None)
        m[b"last"] = i
    return m


def test_acknowledged_plain_commits_survive_kill_9_and_redo(tmp_path):
    """A writer whose applier applies plain batches of a few commits as it goes, killed
    -9: after recovery (REDO of the rest, event by event) the state is the model's after
    some commit at or after the last acknowledged one, the log and history agree with
    it, and they read the same after a drain and after a clean reopen."""
    path = str(tmp_path / "s")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                             text=True, env=cli_env())
    acked = 0
    try:
        deadline = time.monotonic() + 20
        while acked < 700 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert acked >= 100
    s = walstore.open(path, durability="none")
    try:
        j = s.get(b"last")
        assert j >= acked
        report = s.last_recovery  # (the live applier applied some, REDO the rest)
        assert report.unclean and report.applied_before > 0 and report.redone > 0, report
        assert dict(s.scan()) == _model_after(j)
        log = s.log()
        assert len([t for t in log if b"last" in t.keys]) == j
        assert [v.value for v in s.history(b"last")] == list(range(j, 0, -1))
        names = s.restore_points()
        points = [int(p) for p in names.values()]
        keys = [b"last"] + [b"k%d" % i for i in range(37)]
        views = _views(s, points, keys)
        s._engine.drain()
        assert _views(s, points, keys) == views
        for i in range(40, j + 1, 40):
            if "p%d" % i in names:
                assert dict(s.at("p%d" % i).scan()) == _model_after(i)
    finally:
        s.close()
    with walstore.open(path, durability="none") as s:
        assert _views(s, points, keys) == views


def test_an_lmdb_commit_failing_after_a_plain_batch_loses_nothing(tmp_path):
    """A plain batch applied and dropped, the next one's LMDB commit failing (the fault
    seam): the store turns read-only; every acknowledged commit still reads (values, the
    state at a point, each key's history — part from LMDB, part from the MemTable — and
    the log), and after a reopen too, with the action committed amid the plain commits
    in the state and the action log alike."""
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="normal", apply_interval=86400, apply_batch=10 ** 9,
                      max_unapplied=10 ** 6, compensators={"undo": lambda *a, **k: None})
    model: dict = {}
    history: dict = {}  # key -> [(txid, value, deleted)], newest first
    point = None
    for i in range(300):
        with s.transaction() as tx:
            k = b"k%d" % (i % 50)
            if i % 11 == 0:
                tx.delete(k)
                model.pop(k, None)
            else:
                tx.put(k, i)
                model[k] = i
            if i == 150:
                with tx.action("step", args={}, compensate="undo") as act:
                    act.result = 1
        history.setdefault(k, []).insert(0, (tx.id, model.get(k), k not in model))
        if i == 120:
            point, at_point = s.restore_point("p"), dict(model)
    views = _views(s, [], [])  # (values, a scan, the log: from the MemTable)
    assert s._engine.apply_published(limit=100) == 100  # a plain batch, dropped
    fb = FaultBackend()

    def histories(s):
        return {k: [(v.txid, v.value, v.deleted) for v in s.history(k)] for k in history}
    with installed(fb):
        fb.fail_lmdb("commit", times=None)
        with pytest.raises(walstore.StoreIOError, match="read-only"):
            s.checkpoint()
        with pytest.raises(walstore.ReadOnlyError):
            with s.transaction() as tx:
                tx.put(b"after", 1)
        assert s._engine.memtable.events  # (what the failed batch held is still there)
        assert _views(s, [], []) == views
        assert histories(s) == history
        assert dict(s.at("p").scan()) == at_point
        s.close()  # (it failed already: closing says nothing more)
    with walstore.open(path, durability="none",
                       compensators={"undo": lambda *a, **k: None}) as s:
        assert _views(s, [], []) == views
        assert histories(s) == history
        assert dict(s.at("p").scan()) == at_point
        assert [a.state for a in s.actions()] == ["committed"]


LSN_STARTS = [0, 100, 120, 250, 65_000, (1 << 32) - 5_000, (1 << 32) - 20, 1 << 40]


def _stream(rng, lsn: int, txid: int, shape: str, dels: float | None = None) -> list:
    """Events as the journal makes them (plain commits' bodies packed), of ``shape``:
    "scatter" (single puts of distinct one-length keys, the one-sort path), "rising"
    (keys in order), "hot" (few keys written again and again, deletes), "long" (keys
    around the 256 bytes where a txns row's "w" is no longer joined), "mixed" (commits
    that are not plain, restore points, many-write commits)."""
    from walstore.log.format import RecordType
    from walstore.log.records import Event
    out = []
    # (distinct keys in random order, at most one a commit: 700; shuffling all 100,000
    # for each stream was half of this test's time)
    pool = rng.sample(range(100_000), 700)
    nxt = [rng.randrange(1000)]
    if dels is None:  # (the share of writes that delete)
        dels = rng.choice([0, 0.1, 0.5])

    def key():
        if shape == "scatter":
            return b"k%06d" % pool.pop()
        if shape == "rising":
            nxt[0] += rng.randrange(1, 3)
            return b"r%09d" % nxt[0]
        if shape == "hot":
            return b"h%d" % rng.randrange(5)
        if shape == "long":
            n = rng.choice([1, 249, 250, 251, 253, 300, 480])
            return b"L" * n + b"%d" % rng.randrange(9)
        return b"m" * rng.randrange(4) + b"%d" % rng.randrange(rng.choice([10, 3000]))
    for i in range(rng.choice([50, 300, 700])):
        if shape == "mixed" and rng.random() < 0.03:
            end = lsn + rng.randrange(20, 60)
            out.append(Event(lsn, end, RecordType.RESTORE_POINT, -1,
                             {"name": "p%d" % i, "ts": 1.0}))
            lsn = end
            continue
        n = (rng.choice([0, 1, 2, 3, 10, 70, 300]) if shape in ("mixed", "hot", "long")
             and rng.random() < 0.5 else 1)
        writes = {}
        for _ in range(n):
            writes[key()] = None if rng.random() < dels else pack(
                rng.choice([b"", b"v%d" % i, "s", 5, b"x" * rng.randrange(3000)]))
        txid += rng.randrange(1, 3)
        body = {"tx": txid, "ts": 1.5 + i, "meta": rng.choice([None, {"a": i}, "m"])}
        if rng.random() < 0.2:
            body["scope"] = b"k"
        end = lsn + rng.randrange(30, 400) + 10 * len(writes)
        plain = shape != "mixed" or rng.random() < 0.9
        out.append(Event(lsn, end, RecordType.COMMIT, txid, pack(body) if plain else body,
                         tuple(writes.items())))
        lsn = end
    return out


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), start=st.sampled_from(LSN_STARTS),
       shape=st.sampled_from(["scatter", "rising", "hot", "long", "mixed", "scatter+mixed",
                              "rising+mixed"]),
       seeded=st.sampled_from([None, "scatter", "hot", "mixed"]), cuts=st.integers(0, 4))
def test_the_column_apply_writes_what_the_event_loop_writes(tmp_path_factory, seed, start,
                                                            shape, seeded, cuts):
    """Streams of events of several shapes (LSNs and txids where msgpack's int forms
    change, 2**32 included; keys of one length scattered or rising, long keys, hot keys,
    deletes, restore points and commits that are not plain between the runs), onto an
    LMDB holding another stream or nothing, in a few batches: every table byte for byte
    as the event-by-event loop writes it."""
    import random
    rng = random.Random(seed)
    first = _stream(rng, start, 1, seeded) if seeded else []
    txid = (first[-1].txid + 1) if first else rng.choice([1, (1 << 32) - 3])
    joined = shape.endswith("+mixed")  # (a run's key order, then keys joining after it)
    later = _stream(rng, first[-1].end if first else start, txid, shape.split("+")[0],
                    0 if joined else None)
    if joined:
        from walstore.log.format import RecordType
        from walstore.log.records import Event
        end = later[-1].end
        later.append(Event(end, end + 30, RecordType.RESTORE_POINT, -1, {"name": "run"}))
        later += _stream(rng, end + 30, later[-2].txid + 1, "mixed", 0)
    at = sorted(rng.sample(range(1, len(later)), min(cuts, len(later) - 1)))
    batches = [later[a:b] for a, b in zip([0] + at, at + [len(later)])]
    with pytest.MonkeyPatch.context() as mp:
        slow, fast = _apply_both(tmp_path_factory.mktemp("both"), mp, first, batches)
    assert fast == slow
