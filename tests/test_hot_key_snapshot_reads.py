"""A transaction reading a hot key at its snapshot pays for finding one version, not for
every version committed since (counted, never timed).  ``MemTable.visible`` walked the
key's unapplied chain back from the newest version to the snapshot: an agent's
long-running transaction re-reading a key that other writers keep changing paid, on each
read, for every version committed after it began (up to the whole backlog: 2,000 reads
beside 16,000 newer versions took 0.57 s, now 8 ms).  It takes the newest version when it
is visible, else bisects the chain (in LSN order)."""
from __future__ import annotations

import walstore
from walstore.codec import encode_key

IDLE = dict(durability="none", apply_interval=3600.0)  # the applier waits: all unapplied


class Chain(list):
    """A version chain counting the versions looked at."""

    looked = 0

    def __getitem__(self, i):
        Chain.looked += 1
        return super().__getitem__(i)

    def __reversed__(self):
        for v in super().__reversed__():
            Chain.looked += 1
            yield v

    def __iter__(self):
        for v in super().__iter__():
            Chain.looked += 1
            yield v


def _reads(path, newer: int, reads: int = 50) -> int:
    s = walstore.open(path, **IDLE)
    try:
        with s.transaction() as t:
            t.put("hot", -1)
        tx = s.transaction()
        assert tx.get("hot") == -1  # (its snapshot taken)
        for i in range(newer):
            with s.transaction() as t:
                t.put("hot", i)
        mt = s._engine.memtable
        k = encode_key("hot")
        assert len(mt.versions[k]) == newer + 1  # (all unapplied: the first one too)
        mt.versions[k] = Chain(mt.versions[k])
        Chain.looked = 0
        for _ in range(reads):
            assert tx.get("hot") == -1  # its snapshot's version, every time
        looked = Chain.looked
        tx.rollback()
        assert s.get("hot") == newer - 1  # (and the newest for a new reader)
        with s.transaction() as t:
            assert t.get("hot") == newer - 1
        return looked
    finally:
        s.close()


def test_reading_a_hot_key_at_an_old_snapshot_looks_at_few_versions(tmp_path):
    small = _reads(str(tmp_path / "a"), 200)
    big = _reads(str(tmp_path / "b"), 3200)
    # before: each read walked every version after the snapshot (50 reads x 3,200: 160,000)
    assert big <= 50 * 20, (small, big)
    assert big <= 2 * small + 100, (small, big)


def test_a_snapshot_between_versions_reads_the_one_before_it(tmp_path):
    s = walstore.open(str(tmp_path / "s"), **IDLE)
    try:
        txs = []
        for i in range(40):
            with s.transaction() as t:
                t.put("hot", i)
            tx = s.transaction()
            tx.get("other")  # (snapshot: after the i-th version)
            txs.append(tx)
        for i, tx in enumerate(txs):
            assert tx.get("hot") == i
            tx.rollback()
    finally:
        s.close()
