"""``store.log(limit=...)`` costs what it returns, not the unapplied backlog: its newest
commits come from the tail of the MemTable's commit index (cut by a bisect), where a pass
over every unapplied event made each call pay for all of them (2.4 ms a call beside
32,000; the LangGraph saver's rewind makes ~30 such calls).  Counted, not timed; and the
listing is the same as before, applied and unapplied commits together."""
from __future__ import annotations

import walstore
from walstore.engine import memtable

HOLD = dict(apply_interval=86400, apply_batch=10 ** 9, max_unapplied=10 ** 6,
            max_unapplied_bytes=1 << 40)


def test_log_beside_a_backlog_reads_no_pass_over_it(tmp_path, monkeypatch):
    with walstore.open(str(tmp_path / "s"), durability="none", **HOLD) as s:
        for i in range(300):
            with s.transaction(meta={"i": i}) as tx:
                tx.put(f"a/{i}", i)
        s.checkpoint()  # (these 300 in LMDB)
        for i in range(300, 3300):
            with s.transaction(meta={"i": i}) as tx:
                tx.put(f"a/{i}", i)
        passes = []
        real = memtable.MemTable.events_of

        def counting(self, types, upto=None):
            passes.append(len(self.events))
            return real(self, types, upto)
        monkeypatch.setattr(memtable.MemTable, "events_of", counting)
        newest = s.log(limit=10)
        assert [i.meta["i"] for i in newest] == list(range(3299, 3289, -1))
        assert passes == []  # (was a pass over the 3,000 unapplied events a call)
        mid = newest[-1].lsn
        since = s.log(limit=5, since=walstore.LSN(int(mid)), oldest_first=True)
        assert [i.meta["i"] for i in since] == [3291, 3292, 3293, 3294, 3295]
        across = s.log(limit=400)  # unapplied ones, then LMDB's, no txid twice
        assert [i.meta["i"] for i in across] == list(range(3299, 2899, -1))
        every = s.log(oldest_first=True)
        assert [i.meta["i"] for i in every] == list(range(3300))
