"""Views that fold the MemTable's unapplied events over LMDB's rows stay right when the
applier lands between the two reads.

The applier commits a batch to LMDB and then drops those events from the MemTable.  A
view that read LMDB first (or read LMDB at two moments: a scan, then lookups while it
folded) and the events after could miss an event that was in neither place when it
looked.  Each test here makes the applier land at exactly that moment: right before the
view takes its events.
"""
from __future__ import annotations

import os

import walstore
from walstore.engine.memtable import MemTable


def _apply_just_before_the_events_are_taken(monkeypatch, store):
    """Every time a view takes the MemTable's events, the applier first moves everything
    published into LMDB (and drops it from the MemTable), as a background apply might."""
    eng = store._engine
    real = MemTable.events_of

    def events_of(self, types, upto=None):
        if self is eng.memtable:
            eng.apply_published()
        return real(self, types, upto)
    monkeypatch.setattr(MemTable, "events_of", events_of)


def test_an_owed_compensation_stays_listed_while_the_applier_runs(tmp_path, monkeypatch):
    """A revert whose compensation has not run yet (as when an interrupt lands between the
    undo's commit and the compensator): ``pending_compensations()`` listed it only when the
    applier had not moved the undo's commit in between its reads (202 misses in 300)."""
    s = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=60,
                      compensators={"refund": lambda a: None})
    monkeypatch.setattr(s._saga, "compensate", lambda *a, **k: [])  # (not run yet)
    with s.transaction() as tx:
        with tx.action("charge", args={"n": 1}, compensate="refund"):
            pass
        tx.put("paid", True)
    s._engine.drain()
    s.revert(tx.id)  # (its commit stays in the MemTable: apply_interval is a minute)
    _apply_just_before_the_events_are_taken(monkeypatch, s)
    owed = s.pending_compensations()
    assert [a.id for a in owed] == [f"{tx.id}.1"], [a.as_dict() for a in s.actions()]
    assert s.get_action(f"{tx.id}.1").state == "pending"
    s.close()


def test_a_restore_point_never_vanishes_while_the_applier_runs(tmp_path, monkeypatch):
    """``points()`` (what retention keeps, what rewind finds) read LMDB, then the events."""
    s = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=60)
    with s.transaction() as tx:
        tx.put("a", 1)
    s.restore_point("before-b")
    _apply_just_before_the_events_are_taken(monkeypatch, s)
    assert "before-b" in s.restore_points()
    s.close()


def test_the_blob_gc_keeps_the_blobs_of_steps_the_applier_moves_meanwhile(tmp_path,
                                                                          monkeypatch):
    """The gc read the fsteps table, then the unapplied events: a file write applied in
    between had its blobs in neither, and they were removed (its undo then impossible)."""
    (tmp_path / "ws").mkdir()
    s = walstore.open(str(tmp_path / "s"), durability="none", apply_interval=60)
    ws = s.workspace(str(tmp_path / "ws"))
    with s.transaction() as tx:
        tx.files(ws).write("f", b"first version " * 100)
    s._engine.drain()
    with s.transaction() as tx:
        tx.files(ws).write("f", b"second version " * 100)
    files = s._files
    monkeypatch.setattr(files, "_gc_due", lambda: True)
    _apply_just_before_the_events_are_taken(monkeypatch, s)
    files.gc()
    monkeypatch.undo()
    s.revert(tx.id)  # needs the first version's blob
    assert (tmp_path / "ws" / "f").read_bytes() == b"first version " * 100
    s.close()
    assert os.listdir(tmp_path / "ws") == ["f"]
