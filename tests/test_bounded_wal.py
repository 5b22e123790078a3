"""The WAL stays bounded under load that never pauses: automatic checkpoints run while the
applier is busy, not only when it catches up (a sustained writer once kept the applier in
its batch loop forever, so no checkpoint ran and the log grew with every commit).

Memory and the WAL stay bounded when the applier falls behind (CONTRACT 4, promise 5):
the unapplied backlog is bounded in estimated bytes, not only in events (with 1 MiB values,
or 300 small puts per commit, 50,000 events were gigabytes of MemTable and hundreds of MiB
of WAL past ``checkpoint_bytes``)."""
from __future__ import annotations

import os

import walstore


def _wal_bytes(path: str) -> int:
    """Bytes of the WAL directory's files (a checkpoint may remove one meanwhile)."""
    wal = os.path.join(path, "wal")
    total = 0
    for name in os.listdir(wal):
        try:
            total += os.path.getsize(os.path.join(wal, name))
        except FileNotFoundError:
            pass
    return total


def test_checkpoints_trim_the_wal_while_commits_never_pause(tmp_path):
    path = str(tmp_path / "s")
    # committers held to 1,000 unapplied events, the applier taking 200 at a time: it
    # always finds a full batch while commits keep coming (a sustained load it only just
    # keeps up with); what the WAL must keep is the unapplied events (~170 KB) and up to
    # a checkpoint interval (64 KiB) in 64 KiB segments
    with walstore.open(path, durability="normal", apply_batch=200, max_unapplied=1000,
                       checkpoint_bytes=64 * 1024, segment_size=64 * 1024) as st:
        peak = 0
        value = os.urandom(100)
        for i in range(20_000):
            with st.transaction() as tx:
                tx.put(f"k{i % 500:03d}", value)
            if i % 1000 == 999:
                peak = max(peak, _wal_bytes(path))
        written = st._engine.wal.written_lsn
        # ~3.5 MB of log written; checkpoints every 64 KiB keep a few segments at most
        assert written > 3_000_000
        assert peak < 1_000_000, (peak, written)
        assert dict(st.scan(prefix="k")) == {f"k{i:03d}": value for i in range(500)}
    with walstore.open(path) as st:
        assert len(dict(st.scan(prefix="k"))) == 500


def test_disk_use_stays_bounded_when_large_values_outrun_the_applier(tmp_path):
    """200 KiB values, committed as fast as one thread can: LMDB's writes of them (and of
    its history index) are slower than appending them to the WAL, so without a byte bound
    the backlog, and the WAL behind it, grew with every commit."""
    from walstore.engine.memtable import footprint
    path = str(tmp_path / "s")
    bound, ckpt, seg = 4 << 20, 1 << 20, 1 << 20
    value = os.urandom(200 << 10)  # (five to a segment: little of one is left unused)
    with walstore.open(path, durability="none", max_unapplied_bytes=bound,
                       checkpoint_bytes=ckpt, segment_size=seg) as st:
        mt = st._engine.memtable
        peak_memory = peak_log = peak_wal = 0
        for i in range(300):  # 60 MB of values: 14 times the bound
            with st.transaction() as tx:
                tx.put(f"k{i % 8}", value)
            with mt.lock:
                held = list(mt.events)
                memory, log = mt.memory, mt.log_bytes
            assert memory == sum(footprint(e) for e in held)  # (kept as events come and go)
            peak_memory, peak_log = max(peak_memory, memory), max(peak_log, log)
            if i % 5 == 4:
                peak_wal = max(peak_wal, _wal_bytes(path))
        one_commit = footprint(held[-1])
        # a committer waits while the backlog is at the bound: it passes it by one commit
        assert peak_log <= peak_memory <= bound + one_commit, (peak_memory, peak_log)
        # the WAL keeps the backlog at the last checkpoint, a checkpoint interval (noticed
        # by the applier within half a backlog), what came in while the next checkpoint
        # applied (the backlog again), and whole segments: the oldest, the newest, the spare
        limit = 3 * (bound + one_commit) + ckpt + 3 * seg
        assert peak_wal <= limit, (peak_wal, limit)
        assert st.stats()["wal_end_lsn"] > 300 * len(value)
        assert st.get("k7") == value
    with walstore.open(path) as st:
        assert st.get("k0") == value


def test_memory_stays_bounded_when_many_puts_per_commit_outrun_the_applier(tmp_path):
    """Transactions of 300 small puts with the default options: each unapplied put holds
    ~200 B of memory for ~14 B of log, so neither the event bound (50,000) nor the
    applier's 32 MiB of log came near before the heap reached gigabytes.  What is held
    stays within ``max_unapplied_bytes`` (64 MiB) and one commit, counting 100 B a put."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as st:
        mt = st._engine.memtable
        bound = 64 << 20  # (the default max_unapplied_bytes)
        peak = 0
        for n in range(3000):  # 900,000 puts: ~180 MB held if nothing bounds them
            with st.transaction() as tx:
                for i in range(300):
                    tx.put(f"k{i:04d}", n)
            if n % 20 == 19:
                with mt.lock:
                    held = list(mt.events)
                puts = sum(len(e.writes) for e in held if e.writes is not None)
                assert 100 * puts <= bound + 100 * 300, (n, puts)
                peak = max(peak, puts)
        with mt.lock:
            held = list(mt.events)
            memory, log = mt.memory, mt.log_bytes
        puts = sum(len(e.writes) for e in held if e.writes is not None)
        assert log + 100 * puts <= memory <= bound + 100_000  # (a commit: ~61 KB)
        assert peak > 1000  # (the applier was behind: the backlog was there to bound)
        assert st._engine.options.max_unapplied_bytes == bound
        assert st.get("k0299") == 2999


def test_a_committed_transaction_kept_by_its_caller_holds_none_of_its_writes(tmp_path):
    """An agent keeps ``tx`` after its commit (a thread idle until its next step): the
    transaction's commit request kept every write it made (16 MiB here) for as long."""
    import gc
    import tracemalloc
    with walstore.open(str(tmp_path / "s"), durability="none") as st:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tx = st.transaction()
            for i in range(16):
                tx.put(f"big{i}", os.urandom(1 << 20))
            tx.commit()
            st.checkpoint()  # (the MemTable's copy goes to LMDB)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert tx.state == "committed"
        assert held < 2 << 20, held  # (was ~16.8 MB)
        assert len(st.get("big15")) == 1 << 20


def test_large_transactions_count_their_chunks_in_the_backlog(tmp_path):
    """A transaction of more than 4 MiB of puts is logged as WRITES chunks and a COMMIT;
    its MemTable event holds every write but counted only the COMMIT record's bytes, so
    ``max_unapplied_bytes`` let several times its bound pile up unapplied (24 MiB commits
    under a 16 MiB bound: 144 MiB unapplied, 420 MiB of WAL).  The event now counts all
    its records span, in its log bytes (the applier's trigger) and its memory (the
    committers' bound), entering and leaving alike; a read-only store that follows such
    a tail counts it the same way."""
    from walstore.engine.memtable import footprint
    path = str(tmp_path / "s")
    bound, ckpt, seg = 2 << 20, 1 << 20, 1 << 20
    value = os.urandom(256 << 10)
    slack = 64 << 10  # (CHECKPOINT and SEAL records among the unapplied log)
    with walstore.open(path, durability="none", max_unapplied_bytes=bound,
                       checkpoint_bytes=ckpt, segment_size=seg) as st:
        eng = st._engine
        mt = eng.memtable
        peak_unapplied = one_commit = 0
        for n in range(12):  # 5 MiB a commit (one chunk of 15 puts, 5 in the COMMIT)
            with st.transaction() as tx:
                for i in range(20):
                    tx.put(f"k{i:02d}", value)
            with mt.lock:
                held = list(mt.events)
                memory, log = mt.memory, mt.log_bytes
                unapplied = eng.wal.written_lsn - eng.applied_lsn
            assert memory == sum(footprint(e) for e in held)
            # every unapplied byte of log is some event's (but for a record or two)
            assert log >= unapplied - slack, (n, log, unapplied)
            if held:
                one_commit = max(one_commit, footprint(held[-1]))
                assert held[-1].end - held[-1].start > 20 * len(value)
            peak_unapplied = max(peak_unapplied, unapplied)
        # committers wait while the backlog is at the bound: it passes it by one commit
        assert peak_unapplied <= bound + one_commit + slack, (peak_unapplied, one_commit)
        eng.drain()
        with mt.lock:  # drained: the estimate is back to nothing
            assert (len(mt.events), mt.memory, mt.log_bytes) == (0, 0, 0)
        assert st.get("k19") == value
    # a read-only store following the writer's unapplied tail counts it alike (a writer
    # that applies nothing meanwhile: the one above applied its tail whenever commits
    # paused for apply_interval, and under a loaded machine the reader found none)
    with walstore.open(path, durability="none", max_unapplied_bytes=256 << 20,
                       apply_interval=3600, apply_batch=10 ** 9, checkpoint_bytes=1 << 40,
                       segment_size=seg) as st:
        for _n in range(2):
            with st.transaction() as tx:
                for i in range(20):
                    tx.put(f"k{i:02d}", value)
        with walstore.open(path, readonly=True) as ro:
            ro.get("k00")
            rmt = ro._engine.memtable
            with rmt.lock:
                tail = list(rmt.events)
            assert len(tail) == 2 and rmt.log_bytes == sum(e.end - e.start for e in tail)
            assert rmt.log_bytes > 20 * len(value) * len(tail)
            assert rmt.memory == sum(footprint(e) for e in tail)
