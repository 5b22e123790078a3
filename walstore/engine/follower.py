"""A read-only store following its writer: the WAL tail LMDB does not hold yet.

A read-only process never writes a byte.  Before each read it takes in the records the
writer appended since the last read (``LogFollower``, one header check when nothing is
new) and queues their events in its own MemTable, published up to where it has read.
Reads then work exactly as in the writer (:mod:`walstore.engine.snapshot`): as of the
follower's position, from its MemTable first, then from LMDB, whose history makes any
later apply by the writer invisible to a snapshot.  So a read sees every commit logged
before it began, and never part of one — even when a checkpoint trims segments the
follower had not read (their events are in LMDB by then).

Events LMDB already holds are dropped from the MemTable as the writer applies them, so a
long-lived reader stays bounded.  A record whose payload does not decode ends the read
(it is the writer's recovery's business, never a reader's guess).
"""
from __future__ import annotations

import threading

from ..log import records
from ..log.reader import LogFollower
from .lmdb_state import LmdbState
from .memtable import MemTable


class Follower:
    def __init__(self, wal_dir: str, store_id: bytes, state: LmdbState,
                 memtable: MemTable) -> None:
        self.state = state
        self.memtable = memtable
        self.log = LogFollower(wal_dir, store_id, state.applied_lsn())
        self._assembler = records.CommitAssembler()
        self.lock = threading.Lock()

    def catch_up(self) -> None:
        with self.lock:
            applied = self.state.applied_lsn()
            mt = self.memtable
            for rec in self.log.poll(applied):
                try:
                    ev = self._assembler.feed(rec.type, rec.lsn, rec.end_lsn,
                                              records.decode(rec.payload), len(rec.payload))
                except ValueError:
                    break
                if ev is not None and ev.end > applied:
                    with mt.lock:
                        mt.add(ev)
            mt.publish(max(self.log.position, applied))
            with mt.lock:
                prune = []
                for ev in mt.events:
                    if ev.end > applied:
                        break
                    prune.append(ev)
                if prune:
                    mt.drop_applied(prune)

    def close(self) -> None:
        with self.lock:
            self.log.close()
