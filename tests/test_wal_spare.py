"""Rotation never zero-fills on the commit path: the spare thread prepares the next
segment at the size the *new* segment's successor will need.  (It used to be asked for
before the new segment was in place, so in a young store, whose segments grow from
1 MiB, every spare came out one size short and every rotation preallocated inline: a
5-18 ms commit each time.)"""
from __future__ import annotations

import os

import walstore


def test_a_young_stores_rotations_all_use_the_spare(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="full") as st:
        value = os.urandom(4096)
        for i in range(6000):  # ~25 MiB of log: segments of 1, 4, 16, 16 MiB
            with st.transaction() as tx:
                tx.put(f"k{i}", value)
        s = st.stats()
        assert s["wal_rotations"] >= 3, s
        assert s["wal_inline_preallocations"] == 0, s
        assert st.get("k5999") == value
