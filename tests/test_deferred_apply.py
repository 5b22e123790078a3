"""Deferred apply: LMDB is written when commits pause, or when the backlog is big, never
beside every burst of commits (an LMDB commit's page flush delays the WAL fsyncs of the
commits running beside it).  What must hold either way: reads see every commit, nothing is
lost to a kill -9 with a large backlog, memory and the log stay bounded, and a hot key
overwritten thousands of times in the backlog costs its reads and the applier no more
than its live versions."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import walstore
from walstore.engine.memtable import MemTable
from walstore.log.format import RecordType
from walstore.log.records import Event


def _stats(st):
    return st.stats()


def test_a_burst_of_commits_is_not_applied_until_commits_pause(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="normal", apply_interval=0.3) as st:
        applied0 = _stats(st)["applied_lsn"]
        deadline = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < deadline:  # commits never pause for 0.3 s
            with st.transaction() as tx:
                tx.put(f"k{i}", b"v" * 100)
            i += 1
            time.sleep(0.01)
        s = _stats(st)
        assert s["unapplied_events"] >= min(i, 50), s
        assert s["applied_lsn"] == applied0, "LMDB was written during the burst"
        assert st.get("k0") == b"v" * 100 and st.get(f"k{i - 1}") == b"v" * 100
        # the pause: within a few intervals everything is in LMDB
        end = time.monotonic() + 10
        while _stats(st)["unapplied_events"] and time.monotonic() < end:
            time.sleep(0.05)
        s = _stats(st)
        assert s["unapplied_events"] == 0 and s["applied_lsn"] > applied0
        assert st.get(f"k{i - 1}") == b"v" * 100


def test_a_backlog_of_apply_batch_events_is_applied_while_commits_go_on(tmp_path):
    """apply_interval is an hour, so only the backlog trigger can make the applier write
    LMDB here (however slowly the machine schedules it, it must, and without a pause)."""
    with walstore.open(str(tmp_path / "s"), durability="none", apply_batch=500,
                       apply_interval=3600) as st:
        for i in range(5000):
            with st.transaction() as tx:
                tx.put(f"k{i}", b"x")
        end = time.monotonic() + 20
        while _stats(st)["applied_lsn"] == 0 and time.monotonic() < end:
            time.sleep(0.01)
        s = _stats(st)
        assert s["applied_lsn"] > 0 and s["unapplied_events"] < 5000, s
        assert list(st.keys("k")) == sorted(f"k{i}" for i in range(5000))
    with walstore.open(str(tmp_path / "s2"), durability="none", apply_batch=10_000,
                       apply_interval=3600) as st:  # below the backlog: nothing applied
        for i in range(2000):
            with st.transaction() as tx:
                tx.put(f"k{i}", b"x")
        time.sleep(0.3)
        assert _stats(st)["unapplied_events"] >= 2000


def test_memtable_drop_cuts_a_hot_keys_chain_once_per_batch():
    mt = MemTable()
    events = []
    lsn = 0
    for i in range(10):
        e = Event(lsn=lsn, end=lsn + 10, type=RecordType.COMMIT, txid=i + 1,
                  body={}, writes=[(b"hot", b"%d" % i)] + ([(b"cold", b"c")] if i == 3 else []))
        lsn += 10
        mt.add(e)
        events.append(e)
    mt.publish(lsn)
    assert mt.log_bytes == 100 and len(mt.versions[b"hot"]) == 10
    mt.drop_applied(events[:6])
    assert [v for _l, v in mt.versions[b"hot"]] == [b"6", b"7", b"8", b"9"]
    assert b"cold" not in mt.versions  # all its versions were in the batch
    assert mt.log_bytes == 40 and len(mt) == 4
    assert mt.visible(b"hot", 75) == (True, b"7")
    mt.drop_applied(events[6:])
    assert not mt.versions and mt.log_bytes == 0


def test_a_hot_key_overwritten_in_a_big_backlog(tmp_path):
    """20,000 overwrites of one key wait in the MemTable, then are applied: the value and
    the key's history are exact (the chain is cut per batch, never rescanned per event)."""
    with walstore.open(str(tmp_path / "s"), durability="none", apply_batch=10**6,
                       apply_interval=3600, max_unapplied=10**6) as st:
        for i in range(20_000):
            with st.transaction() as tx:
                tx.put("counter", i)
        assert _stats(st)["unapplied_events"] >= 20_000
        assert st.get("counter") == 19_999
        st.checkpoint()
        assert _stats(st)["unapplied_events"] == 0
        assert st.get("counter") == 19_999
        assert st.at(walstore.LSN(_stats(st)["applied_lsn"])).get("counter") == 19_999


def test_kill_9_with_a_deferred_backlog_loses_no_acknowledged_commit(tmp_path):
    """A real writer process commits durably (its backlog never applied: it never pauses),
    prints each acknowledged key, and is killed -9; reopening REDOes every one."""
    path = str(tmp_path / "s")
    code = textwrap.dedent(f"""
        import sys, walstore
        st = walstore.open({path!r}, durability="full", apply_interval=3600,
                           apply_batch=10**6, max_unapplied=10**6)
        i = 0
        while True:
            with st.transaction() as tx:
                tx.put("k%06d" % i, i)
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = -1
    try:
        for line in proc.stdout:
            acked = int(line)
            if acked >= 1500:
                break
    finally:
        proc.kill()
        proc.wait()
    assert acked >= 1500
    with walstore.open(path) as st:
        assert st.last_recovery is not None and st.last_recovery.redone >= acked
        for i in range(0, acked + 1):
            assert st.get("k%06d" % i) == i


def test_a_scan_shows_its_start_while_its_unapplied_keys_move_to_lmdb(tmp_path):
    """A scan reads the MemTable's values of a chunk only when it gets there: keys that
    were unapplied when it began, applied (and overwritten) while it runs, still show
    the state as of its start, in order, every key once."""
    with walstore.open(str(tmp_path / "s"), durability="none", apply_interval=3600) as st:
        with st.transaction() as tx:
            tx.update((f"k{i:03d}", "a") for i in range(200))
        st.checkpoint()  # in LMDB: the scan reads it in chunks of 16, 64, 256
        with st.transaction() as tx:  # unapplied: the MemTable
            tx.update((f"k{i:03d}", "b") for i in range(0, 200, 2))
            tx.put("k050x", "new")
            tx.delete("k101")
        assert st.stats()["unapplied_events"] > 0
        want = [(f"k{i:03d}", "b" if i % 2 == 0 else "a") for i in range(200) if i != 101]
        want.insert(51, ("k050x", "new"))
        for reverse in (False, True):
            it = st.scan(prefix="k", reverse=reverse)
            got = [next(it) for _ in range(20)]
            st.checkpoint()  # the MemTable's versions leave for LMDB mid-scan ...
            with st.transaction() as tx:  # ... and are overwritten there
                tx.update((f"k{i:03d}", "c") for i in range(200))
                tx.delete("k050x")
            st.checkpoint()
            got += list(it)
            assert got == (want[::-1] if reverse else want)
            with st.transaction() as tx:  # back to the start for the other direction
                tx.update(want)
                tx.delete("k101")
            st.checkpoint()
            with st.transaction() as tx:
                tx.update((f"k{i:03d}", "b") for i in range(0, 200, 2))
            assert st.stats()["unapplied_events"] > 0


def test_scans_interleaved_with_partial_applies_match_a_model(tmp_path):
    """Random commits; scans (forward, reverse, prefix or range) read a row or a few,
    then part of the MemTable moves to LMDB (a batch, dropped 64 events at a time) and
    more commits land, then the scan goes on: every scan yields exactly the model's
    state when it began."""
    import random
    rng = random.Random(11)
    model: dict[str, str] = {}
    keys = [f"k{i:03d}" for i in range(300)]
    with walstore.open(str(tmp_path / "s"), durability="none", apply_interval=3600) as st:
        eng = st._engine

        def commit_some(n):
            for _ in range(n):
                with st.transaction() as tx:
                    for k in rng.sample(keys, rng.randint(1, 8)):
                        if rng.random() < 0.2:
                            tx.delete(k)
                            model.pop(k, None)
                        else:
                            v = f"v{rng.randrange(10**6)}"
                            tx.put(k, v)
                            model[k] = v

        commit_some(300)
        eng.apply_published(limit=150)  # LMDB holds some, the MemTable the rest
        for _round in range(60):
            commit_some(rng.randint(1, 40))
            reverse = rng.random() < 0.5
            if rng.random() < 0.5:
                prefix = rng.choice(["k", "k0", "k1", "k2", "k15"])
                it = st.scan(prefix=prefix, reverse=reverse)
                want = sorted(((k, v) for k, v in model.items() if k.startswith(prefix)),
                              reverse=reverse)
            else:
                lo, hi = sorted(rng.sample(keys, 2))
                it = st.scan(start=lo, end=hi, reverse=reverse)
                want = sorted(((k, v) for k, v in model.items() if lo <= k < hi),
                              reverse=reverse)
            got = [row for _i, row in zip(range(rng.choice([1, 3, 20, 80])), it)]
            eng.apply_published(limit=rng.choice([1, 50, 200, 2000]))
            commit_some(rng.randint(0, 20))
            got += list(it)
            assert got == want, f"round {_round}"


def _record_batches(st) -> list[tuple[str, int]]:
    """(thread name, log bytes) of each LMDB commit the store's applier makes from now."""
    spans: list[tuple[str, int]] = []
    applier = st._engine.applier
    real_apply = applier.apply

    def apply(events, applied_end):
        spans.append((threading.current_thread().name, applied_end - events[0].lsn))
        return real_apply(events, applied_end)
    applier.apply = apply
    return spans


def test_the_applier_checkpoint_writes_lmdb_in_small_batches_a_waiting_one_in_big(tmp_path):
    """An LMDB commit's sync delays every WAL fsync issued beside it for as long as it
    lasts: the applier's own checkpoint (commits may be running) applies its backlog in
    the applier's usual ~1 MiB batches, not one 16 MiB batch of several hundred ms; a
    checkpoint or close someone waits for takes the big ones (fewer syncs)."""
    from walstore.engine import engine as engine_mod
    value = b"v" * 1024
    with walstore.open(str(tmp_path / "s"), durability="none", checkpoint_bytes=8 << 20,
                       apply_batch=10 ** 9, apply_interval=0.3) as st:
        spans = _record_batches(st)
        for i in range(9000):  # ~9.5 MiB of log: over checkpoint_bytes, in well under 0.3 s
            with st.transaction() as tx:
                tx.put(f"k{i}", value)
        end = time.monotonic() + 30
        while st.stats()["unapplied_events"] and time.monotonic() < end:
            time.sleep(0.05)
        background = [n for who, n in spans if who != threading.current_thread().name]
        assert background and sum(background) > 8 << 20, spans
        assert max(background) <= engine_mod.APPLY_BATCH_BYTES + 4096, spans
    with walstore.open(str(tmp_path / "s")) as st:
        assert st.get("k8999") == value
    # nothing wakes this store's applier (an hour's interval, no backlog or checkpoint
    # trigger): the explicit checkpoint drains alone, in big batches
    with walstore.open(str(tmp_path / "s2"), durability="none", checkpoint_bytes=1 << 40,
                       apply_batch=10 ** 9, apply_interval=3600) as st:
        spans = _record_batches(st)
        for i in range(9000):
            with st.transaction() as tx:
                tx.put(f"j{i}", value)
        st.checkpoint()
        assert len(spans) == 1 and spans[0][1] > 8 << 20, spans
        assert st.stats()["unapplied_events"] == 0
