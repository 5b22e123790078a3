"""The WAL stays bounded under load that never pauses: automatic checkpoints run while the
applier is busy, not only when it catches up (a sustained writer once kept the applier in
its batch loop forever, so no checkpoint ran and the log grew with every commit)."""
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
