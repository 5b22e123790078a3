"""Audit 53 (resource bounds at scale: what grows without bound, or costs more than it
should, as a store ages or is used hard): regressions found by measuring, each scaled down
to the smallest size that still shows the growth, asserting a growth ratio (never a time).

Each test failed before its fix (see the commit naming it):

- `walstore diff --from A --to B` read every commit logged after A, up to the end of the
  log, however old B was: a diff between two points of the past cost the store's age
  since them, not what changed between them."""
from __future__ import annotations

import walstore
from walstore.cli import _engine
from walstore.engine.views import Views


def _commits_read(monkeypatch, store, start, end) -> int:
    """How many commit rows ``changes_between`` (what `walstore diff` runs) takes."""
    seen = [0]
    real = Views.commits_after

    def counting(self, *a, **k):
        for row in real(self, *a, **k):
            seen[0] += 1
            yield row
    monkeypatch.setattr(Views, "commits_after", counting)
    try:
        doc = _engine.changes_between(store, start, end)
    finally:
        monkeypatch.setattr(Views, "commits_after", real)
    assert [d["key"] for d in doc["keys"]] == ["k1", "k2"]
    return seen[0]


def test_a_diff_between_two_past_points_reads_what_lies_between_not_the_store_since(
        tmp_path, monkeypatch):
    store = walstore.open(str(tmp_path / "s"), durability="none")
    with store:
        txids = []
        for i in range(4):
            with store.transaction() as tx:
                tx.put(f"k{i}", i)
            txids.append(tx.id)
        store.checkpoint()  # (the old ones in LMDB, as in an aged store)

        def more(n):
            for i in range(n):
                with store.transaction() as tx:
                    tx.put("later", i)
            store.checkpoint()
        more(50)
        small = _commits_read(monkeypatch, store, txids[0], txids[2])
        more(150)
        big = _commits_read(monkeypatch, store, txids[0], txids[2])
    # the diff covers two commits (k1, k2); what it reads must not grow with the 200
    # commits logged after its end (it read 52, then 202)
    assert big == small, (small, big)
    assert small <= 4, small
