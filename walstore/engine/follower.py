"""A read-only store following its writer: the WAL tail LMDB does not hold yet.

A read-only process never writes a byte.  Before each read it takes in the records the
writer appended since the last read (``LogFollower``, one header check when nothing is
new) and queues their events in its own MemTable, published up to where it has read.
Reads then work exactly as in the writer (:mod:`walstore.engine.snapshot`): as of the
follower's position, from its MemTable first, then from LMDB, whose history makes any
later apply by the writer invisible to a snapshot.  So a read sees every commit logged
before it began, and never part of one — even when a checkpoint trims segments the
follower had not read (their events are in LMDB by then).

It never shows more than the writer does.  The WAL holds more: a record is whole in the
page cache once written, while under durability="full" the writer publishes it only after
its fsync (never, after an fsync error: the commit raised CommitOutcomeUnknown).  So every
record read is queued, but published only up to the writer's own watermark, which it
shares in ``<store>/VISIBLE`` (:mod:`walstore.engine.visible`); events past it wait,
unpublished, until the mark passes them.  (It published all it read: a read-only process
showed a commit whose fsync failed, or was still running, and acted on it while the writer
hid it; a power loss then erased it.)  The mark is read after the log, so it covers only
records that were there before it was read.  A new writer generation (a writer opened
since) voids the events past the follower's own mark and reads them again: they may be a
crashed writer's tail that the new writer's recovery cut and overwrote.  No VISIBLE file
(a store whose writers predate it): everything read is published, as before.  When the
process opened the store with no writer alive (the open judged the log:
``Engine._open_readonly``), the mark it found is a dead writer's: in the boot it was made
in it bounds as any mark (a torn pair taken as the mark word stored), from an earlier
boot it bounds nothing — the log is all on disk, the mark what a power loss left
(probe-disk42: a stale or torn mark hid acknowledged commits from every read-only open).

Events LMDB already holds are dropped from the MemTable as the writer applies them, so a
long-lived reader stays bounded.  Reads at a snapshot taken earlier (a transaction's later
reads, an ``at`` view's, a streamed scan's next chunks and MemTable rows) read no log but
still follow a data file the writer swapped in and drop what it applied
(``forget_applied``): what a purge erased meanwhile is then answered by LMDB, as in the
writer, never from a stale MemTable version or an old file.  A record whose payload does
not decode ends the read (it is the writer's recovery's business, never a reader's guess).
"""
from __future__ import annotations

import threading
import time

from ..errors import CorruptionError
from ..log import records
from ..log.reader import LogFollower
from .lmdb_state import LmdbState
from .memtable import MemTable
from .visible import MarkReader


RESTARTS = 3  # new writer generations met within one catch-up before it gives up for now
DAMAGE_LOOKS = 3  # looks again (20, 40, 60 ms apart) at a stop short of the mark: damage?


class Follower:
    def __init__(self, wal_dir: str, store_id: bytes, state: LmdbState,
                 memtable: MemTable, marks: MarkReader | None = None,
                 dead: tuple[int, bool] | None = None, first: tuple | None = None) -> None:
        """``dead``: (the generation in VISIBLE, was it made in an earlier boot) when the
        store was opened with no writer alive (see ``_bound``); ``first``: VISIBLE as read
        then (read here when not given)."""
        self.state = state
        self.memtable = memtable
        self.marks = marks
        # the generation before the first read of the log (see ``_bound``)
        if first is None and marks is not None:
            first = marks.read()
        self._generation = first[0] if first is not None else None
        self._dead = dead
        self._held = False  # records past the writer's mark were read (waiting for it)
        self._mark_read = 0  # the writer's mark the last ``_short_of_mark`` read
        self.log = LogFollower(wal_dir, store_id, state.applied_lsn())
        self._assembler = records.CommitAssembler()
        self.lock = threading.Lock()

    def catch_up(self) -> None:
        with self.lock:
            applied = self.state.applied_lsn()
            mt = self.memtable
            upto = self._read_bounded(applied)
            if upto is not None and self.log.blocked is not None and self._short_of_mark():
                # the read stopped short of what the writer published (at bytes that are
                # no record, zeros too, at a segment whose header fails, or at a hole in
                # the chain of segments): read again at
                # once (the writer appended meanwhile: it moves on), then looked at 3 times
                # more (a record being copied in is whole by then); damage stays put (it
                # was read as a record not yet whole, for good: every read showed the
                # state before it, exit 0, while verify said "corrupt" — audit 71)
                stuck = self.log.position
                for look in range(DAMAGE_LOOKS + 1):
                    if look:
                        time.sleep(0.02 * look)
                        applied = self.state.applied_lsn()  # (a segment trimmed meanwhile)
                    upto = self._read_bounded(applied)
                    if (upto is None or self.log.position != stuck
                            or self.log.blocked is None or not self._short_of_mark()):
                        break
                else:
                    # (not when ``applied`` was read from a data file the writer's
                    # compaction swapped out since: frozen, it made the segments trimmed
                    # since read as missing, a healthy store as a gap — audit 71 review;
                    # the next refresh follows the new file, and judges)
                    if not self.state.replaced():
                        mt.publish(max(upto, mt.published, applied))
                        kind, reason, path, offset, lsn = self.log.blocked
                        raise CorruptionError(
                            f"{kind}: {reason}; the writer published the log past it "
                            f"(up to LSN {self._mark_read}): written whole, damaged "
                            f"since", file=path, offset=offset, lsn=lsn)
            mt.publish(max(upto if upto is not None else mt.published, applied))
            self._drop_applied(applied)

    def _read_bounded(self, applied: int) -> int | None:
        """``_read`` then ``_bound`` (again, up to RESTARTS times, while a new writer
        begins)."""
        upto = None
        for _ in range(RESTARTS):
            self._read(applied)
            upto = self._bound()
            if upto is not None:
                break
        return upto

    def _short_of_mark(self) -> bool:
        """Did this writer (the generation followed) publish the log past where the
        follower's read stopped?  Records below its mark were written whole before it
        was shared.  Not the mark of a writer dead when the store was opened (the open
        judged its log as strict recovery would; and after a power loss its mark, never
        fsynced, may lie past the log on disk).  The mapped mark first (no file read:
        every catch-up that read to a stop asks, nearly all — one mapped read, ~1 us, where
        a read-only ``get`` is ~25 us), then, when short, the file looked at again (a
        stat: a VISIBLE made anew)."""
        if self.marks is None:
            return False
        for recheck in (False, True):
            got = self.marks.read(recheck=recheck)
            if got is None or got[1] is None or got[0] != self._generation \
                    or got[1] <= self.log.position:
                return False
            if self._dead is not None and got[0] == self._dead[0]:
                return False  # (the open judged a dead writer's log, as recovery would)
            self._mark_read = got[1]
        return True

    def forget_applied(self) -> None:
        """Drop the events LMDB holds now, reading no log and publishing nothing (before a
        read at a snapshot already taken: ``Engine.follow_state``)."""
        if not self.memtable.events:
            return  # (nothing to drop: no LMDB read)
        with self.lock:
            self._drop_applied(self.state.applied_lsn())

    def _drop_applied(self, applied: int) -> None:
        mt = self.memtable
        with mt.lock:
            prune = []
            for ev in mt.events:
                if ev.end > applied:
                    break
                prune.append(ev)
            if prune:
                mt.drop_applied(prune)

    def _read(self, applied: int) -> None:
        """Queue the events of the records appended since the last read."""
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

    def _bound(self) -> int | None:
        """How far the follower may publish now: what it read, up to the writer's shared
        mark; None when a new writer began (the log is to be read again from the
        follower's own mark)."""
        pos = self.log.position
        if self.marks is None or (pos <= self.memtable.published and not self._held):
            return pos  # nothing read past what is shown (no file read: the common read)
        # (a stat: is VISIBLE still the file mapped?  One deleted or replaced since — a new
        # writer makes it anew — left this reader on the old inode's mark, past the new
        # writer's log end, and it showed commits that writer never acknowledged, one whose
        # fsync then failed among them: probe-readers42.  Only reads that found records
        # past what is shown come here)
        got = self.marks.read(recheck=True)
        if got is None:  # no VISIBLE file: as before it existed
            self._generation = None
            self._held = False
            return pos
        generation, mark = got
        if self._dead is not None and generation == self._dead[0]:  # (the writer that had
            if self._dead[1]:  # died before this open) of an earlier boot: the log it
                self._held = False  # left is on disk, its mark what a power loss left
                return pos
            if mark is None:  # torn: it died between its two stores, the mark stored
                stored = self.marks.stored_mark()  # first is a publication whose fsync
                if stored is not None:             # had returned
                    mark = stored
        if generation != self._generation:
            self._generation = generation
            self._restart()
            return None
        if mark is None:  # no consistent mark (a writer killed mid-store): nothing new
            self._held = True
            return self.memtable.published
        self._held = mark < pos
        return min(pos, mark)

    def _restart(self) -> None:
        """A new writer: forget the events past the published mark and read the log again
        from the end of the last event kept (records before it are final: published, or
        applied; what lies between is no event, or a chunk of an event forgotten here)."""
        mt = self.memtable
        with mt.lock:
            mt.void_from(mt.published)
            restart = self.state.applied_lsn()
            if mt.events:
                restart = max(restart, mt.events[-1].end)
        self.log.restart(restart)
        self._assembler = records.CommitAssembler()
        self._held = False

    def close(self) -> None:
        with self.lock:
            self.log.close()
            if self.marks is not None:
                self.marks.close()
