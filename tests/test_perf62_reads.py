"""Point reads kept flat (stop 62): ``Store.get`` writes out ``encode_key``'s common case,
the empty-overlay test and the read gate's fast path (``LmdbState.get_value``), so each of
its branches is checked here against the functions it writes out: every key kind and bad
key, the overlay and LMDB, a read inside a read, a thread's first read, a read meeting a
map resize (``gate.paused``), LMDB failing or the read interrupted inside the gate (the
slot left as found), values the strict decoder refuses."""
from __future__ import annotations

import threading
import time

import lmdb
import pytest

import walstore
from walstore.codec import encode_key, unpack_value

IDLE = dict(durability="none", apply_interval=3600.0)  # the applier waits: the overlay holds


def _slow_get(s, key, default=None):
    """What ``Store.get`` writes out, through the functions themselves."""
    eng = s._engine
    eng.check_open()
    k = encode_key(key)
    if k in eng.memtable.versions:
        v = eng.reader.latest(k)
    else:
        v = eng.state.get(k)
    return default if v is None else unpack_value(v)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - compared
        return (type(e), str(e))


KEYS = [b"k", b"x" * 500, "k", "t" * 500, "ключ", "é" * 250, bytearray(b"ba"),
        memoryview(b"mv"), b"\x00\xff"]
BAD_KEYS = [b"", "", b"x" * 501, "t" * 501, "é" * 251, "\ud800", 7, None, (b"k",)]


@pytest.mark.parametrize("overlay", [False, True])
def test_every_key_kind_reads_as_the_slow_path(tmp_path, overlay):
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        with s.transaction() as tx:
            for i, key in enumerate(KEYS):
                tx.put(bytes(key) if not isinstance(key, str) else key, {"i": i})
        if not overlay:
            s.checkpoint()
            assert not s._engine.memtable.versions
        else:
            assert s._engine.memtable.versions
        for i, key in enumerate(KEYS):
            assert s.get(key) == {"i": i} == _slow_get(s, key)
            assert s[key] == {"i": i} and key in s
        for key in (b"absent", "absent"):
            assert s.get(key) is None and s.get(key, "d") == "d" == _slow_get(s, key, "d")
        for key in BAD_KEYS:
            got, want = _outcome(s.get, key), _outcome(encode_key, key)
            assert got == want and got[0] in (TypeError, ValueError), (key, got)
            assert _outcome(s.__contains__, key) == want
    finally:
        s.close()


def test_overlay_then_lmdb_then_overlay(tmp_path):
    """The empty-overlay test: a read after the overlay empties reads LMDB, one after
    commits fill it again reads them (deletes too), never a value in between."""
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        with s.transaction() as tx:
            tx.put(b"a", 1)
            tx.put("b", 2)
        assert s.get(b"a") == 1 and s.get("b") == 2
        s.checkpoint()
        assert not s._engine.memtable.versions
        assert s.get(b"a") == 1 and s.get("b") == 2
        with s.transaction() as tx:
            tx.put(b"a", 3)
            tx.delete("b")
        assert s._engine.memtable.versions
        assert s.get(b"a") == 3 and s.get("b") is None and s.get("b", 0) == 0
        s.checkpoint()
        assert s.get(b"a") == 3 and s.get("b", 0) == 0
    finally:
        s.close()


def _loaded(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    with s.transaction() as tx:
        tx.put(b"k", "v")
        tx.put("ints", {1: 2})  # (not a string map key: the strict decoder refuses it)
    s.close()
    return walstore.open(str(tmp_path / "s"), durability="none")


def test_values_the_strict_decoder_refuses(tmp_path):
    s = _loaded(tmp_path)
    try:
        assert s.get("ints") == {1: 2} == s["ints"] == _slow_get(s, "ints")
    finally:
        s.close()


def _slot(s):
    return s._engine.state.gate.slot()


def test_a_read_inside_a_read_takes_the_gates_own_path(tmp_path):
    s = _loaded(tmp_path)
    try:
        gate = s._engine.state.gate
        seen = []

        def inside():
            seen.append(_slot(s).depth)
            return s.get(b"k")

        assert gate.call(inside) == "v"
        assert seen == [1]
        slot = _slot(s)
        assert (slot.depth, slot.inside) == (0, False)
        assert s.get(b"k") == "v" and (slot.depth, slot.inside) == (0, False)
    finally:
        s.close()


def test_a_threads_first_read_makes_its_slot(tmp_path):
    s = _loaded(tmp_path)
    try:
        gate = s._engine.state.gate
        out = []

        def reader():
            out.append(getattr(gate._local, "slot", None))
            out.append(s.get(b"k"))
            out.append(s.get(b"k"))
            slot = gate._local.slot
            out.append((slot.depth, slot.inside, slot in gate._slots))

        t = threading.Thread(target=reader)
        t.start()
        t.join(30)
        assert out == [None, "v", "v", (0, False, True)]
    finally:
        s.close()


def test_a_read_waits_out_a_map_resize(tmp_path):
    """A reader that meets ``paused`` steps out (its slot not inside while the exclusive
    section runs) and reads once the section is over."""
    s = _loaded(tmp_path)
    try:
        gate = s._engine.state.gate
        started, release = threading.Event(), threading.Event()
        inside_during, results = [], []

        def section():
            started.set()
            release.wait(30)
            inside_during.extend(x.inside for x in list(gate._slots)
                                 if x.thread is not threading.current_thread())

        resizer = threading.Thread(target=gate.exclusive, args=(section,))
        resizer.start()
        assert started.wait(30) and gate.paused

        def reader():
            _slot(s)
            results.append(s.get(b"k"))

        r = threading.Thread(target=reader)
        r.start()
        time.sleep(0.2)
        assert results == []  # (waiting: no read inside LMDB during the section)
        release.set()
        resizer.join(30)
        r.join(30)
        assert results == ["v"] and not any(inside_during)
        # ``paused`` with no section running (the slow path waits for it to clear), met
        # by a thread's first read (no slot yet) and by one with its slot (the fast path
        # steps in, finds it, steps out)
        done = []

        def read(make_slot):
            if make_slot:
                _slot(s)
            done.append(s.get(b"k"))

        try:
            gate.paused = True
            threads = [threading.Thread(target=read, args=(m,)) for m in (False, True)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            assert done == []
            assert not any(x.inside for x in list(gate._slots))
            with gate._cond_lock:
                gate.paused = False
                gate._cond.notify_all()
            for t in threads:
                t.join(30)
            assert done == ["v", "v"]
        finally:
            gate.paused = False
        slot = _slot(s)
        assert (slot.depth, slot.inside) == (0, False)
    finally:
        s.close()


class _FailingTxn:
    def __init__(self, exc, log):
        self._exc, self._log = exc, log

    def get(self, *args):
        self._log.append("get")
        raise self._exc

    def abort(self):
        self._log.append("abort")


class _FailingEnv:
    def __init__(self, real, exc, log):
        self._real, self._exc, self._log = real, exc, log

    def begin(self, *args, **kw):
        return _FailingTxn(self._exc, self._log)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("exc", [lmdb.CorruptedError("damaged page"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_read_leaves_the_gate_as_found(tmp_path, exc):
    s = _loaded(tmp_path)
    st = s._engine.state
    real = st.env
    log: list[str] = []
    try:
        _slot(s)
        st.env = _FailingEnv(real, exc, log)
        want_type = walstore.CorruptionError if isinstance(exc, lmdb.Error) else type(exc)
        for read in (s.get, s.__getitem__):  # (the written-out path and get_value)
            with pytest.raises(want_type) as info:
                read(b"k")
            if want_type is walstore.CorruptionError:
                assert info.value.file == st.data_file and "damaged page" in str(info.value)
            slot = _slot(s)
            assert (slot.depth, slot.inside) == (0, False)
        assert log == ["get", "abort"] * 2  # (the transaction ended every time)
    finally:
        st.env = real
    ran = []
    st.gate.exclusive(lambda: ran.append(1))  # (no slot left inside: not waiting forever)
    assert ran == [1] and s.get(b"k") == "v"
    s.close()


def test_a_closed_store_read(tmp_path):
    s = _loaded(tmp_path)
    s.close()
    for read in (s.get, s.__getitem__, s.__contains__):
        with pytest.raises(walstore.StoreClosed):
            read(b"k")


def test_a_read_only_store_reads_what_the_writer_committed(tmp_path):
    path = str(tmp_path / "s")
    w = walstore.open(path, durability="none")
    try:
        with w.transaction() as tx:
            tx.put(b"k", 1)
        w.checkpoint()
        r = walstore.open(path, readonly=True)
        try:
            assert r.get(b"k") == 1
            with w.transaction() as tx:
                tx.put(b"k", 2)
                tx.put("new", 3)
            deadline = time.monotonic() + 30
            while r.get(b"k") != 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert r.get(b"k") == 2 and r.get("new") == 3 and r.get("x", 0) == 0
        finally:
            r.close()
    finally:
        w.close()


@pytest.mark.parametrize("overlay", [False, True])
def test_transaction_reads_every_key_kind_as_encode_key(tmp_path, overlay):
    """``tx.get`` writes out the same key case and decoder try; its snapshot read skips
    the overlay when it is empty."""
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        with s.transaction() as tx:
            for i, key in enumerate(KEYS):
                tx.put(bytes(key) if not isinstance(key, str) else key, {"i": i})
            tx.put("ints", {1: 2})
        if not overlay:
            s.checkpoint()
        with s.transaction() as tx:
            for i, key in enumerate(KEYS):
                assert tx.get(key) == {"i": i} == tx[key] and key in tx
            assert tx.get("ints") == {1: 2} and tx.get(b"absent", 5) == 5
            for key in BAD_KEYS:
                got, want = _outcome(tx.get, key), _outcome(encode_key, key)
                assert got == want and got[0] in (TypeError, ValueError), (key, got)
            assert encode_key(b"k") in tx.read_keys
    finally:
        s.close()


def test_a_snapshot_read_beside_newer_commits_in_the_overlay_and_in_lmdb(tmp_path):
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        with s.transaction() as tx:
            tx.put(b"a", 1)
        s.checkpoint()
        held = s.transaction()
        assert held.get(b"a") == 1  # (its snapshot taken: the overlay empty)
        with s.transaction() as tx:
            tx.put(b"a", 2)
        assert held.get(b"a") == 1  # (a newer version in the overlay: not seen)
        s.checkpoint()
        assert not s._engine.memtable.versions
        assert held.get(b"a") == 1 and s.get(b"a") == 2  # (LMDB's history: not seen)
        held.rollback()
    finally:
        s.close()
