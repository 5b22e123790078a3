"""The one WAL writer: appends, rotation, group-commit fsync, trimming.

Owns the directory ``<store>/wal`` once recovery has positioned it.  The log is one LSN
space cut into segments; an LSN is a byte position in that space (segment headers
excluded).

Invariants:
- records are appended in LSN order, one thread at a time (``append`` holds ``lock``;
  callers that must keep something else in LSN order hold it around the append);
- ``synced_lsn`` only grows, and every byte below it has been fdatasynced;
- rotation activates the spare (prepared off the commit path by ``prepare_spare``, once
  the segment in use is half written: ``_spare_at``; an open that writes little zero-fills
  no spare) as the next segment, durably, then ends the old segment with a SEAL record
  and fsyncs it in full: only the last segment can hold a torn tail, and a missing newest segment is
  detectable (a sealed segment with no successor);
- after an fsync error the log is *failed*: nothing is written or synced again, every
  later call raises ``LogFailed`` (a retried fsync can lie: FACTS.md);
- a write error (ENOSPC, EIO) fails only the record(s) not wholly written
  (``WalWriteError``): the end is not advanced past them, so the next record overwrites
  the partial bytes;
- *buffered* appends (commit records under durability="full" arriving while a leader
  fsyncs, ``append_grouped``) are kept in memory and written, all of them in one
  ``pwrite``, by the group commit's leader right before its next fsync (or by the next
  plain append or rotation, before its own record): the buffer is always the log's
  tail, so a reader never finds a hole before a valid record.  The leader's write runs
  outside ``lock`` (its place reserved under it; committers buffer behind it
  meanwhile; a plain append, flush or rotation waits for it first).  When that write
  fails, the records it did not wholly write, and any buffered behind them, are
  *voided*: the end moves back to the last whole record, ``on_void`` (the journal)
  drops their events, and each one's ``Appended`` ticket says so to the committer
  waiting on it (``sync_to`` raises WalWriteError: nothing committed, exactly as a
  plain append's write error).  Flushing takes ``lock``: nobody may wait in
  ``sync_to`` holding it;
- a rotation syncs the old segment's records before the new segment becomes durable
  (a batch it just wrote, lost to a power loss beside a durable successor, would leave
  a gap that recovery refuses);
- segments are removed only when wholly below the trim point, never the active one.
"""
from __future__ import annotations

import errno
import os
import threading
import time

from .. import fileio
from ..fileio import pwrite_all
from ..errors import ReadOnlyError, StoreClosed, StoreIOError, WalstoreError, type_and_message
from ..signals import deferred, start_thread
from .format import (RECORD_HEADER_SIZE, SEAL_PAYLOAD, SEAL_RECORD_SIZE, SEGMENT_HEADER_SIZE,
                     RecordType, encode_record)
from .segment import (FsyncFailed, NoRoomForSpare, SegmentWriter, Spare,
                      create_segment_fitting, list_segments, segment_name)

LOST_LEAD_S = 1.0  # a waiter looks this often whether the group commit's lead was lost

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
FIRST_SEGMENT_SIZE = 1024 * 1024  # a new store's first segment; later ones grow fourfold
SEGMENT_GROWTH = 4
SEAL_ROOM = 64  # bytes kept free at the end of every segment for its SEAL record
_NEVER = 1 << 64  # (``_spare_at`` once the spare was asked for: no LSN reaches it)
CHAIN_FSYNCS = 2  # a group-commit leader fsyncs up to this many more times for waiters


class WalWriteError(WalstoreError, OSError):
    """Writing a record failed (disk full, I/O error); nothing of it counts as logged."""


class Appended:
    """A buffered record's ticket: where it lies and, once its write failed, the error
    (``voided``: nothing of it was logged, and its LSNs go to the records appended next)."""

    __slots__ = ("lsn", "end", "error")

    def __init__(self, lsn: int, end: int) -> None:
        self.lsn = lsn
        self.end = end
        self.error: OSError | None = None

    def raise_voided(self) -> None:
        e = self.error
        raise WalWriteError(getattr(e, "errno", None),
                            f"could not write the WAL record: "
                            f"{getattr(e, 'strerror', None) or e} (nothing of it was logged)"
                            ) from e


def _others_voided(error: BaseException, n: int) -> WalWriteError:
    """The error of a failed write of the buffer, for whoever was to write next (a plain
    append, a buffered one that needed the room, a rotation; a leader ignores it): the
    buffered records are other commits', and the caller's own record was never written
    (it said only "could not write 2 buffered WAL record(s)", and a committer could not
    tell that its commit was not among them, nor that nothing of it was logged)."""
    return WalWriteError(getattr(error, "errno", None),
                         f"could not write {n} WAL record(s) other commits buffered ahead "
                         f"of this one ({getattr(error, 'strerror', None) or error}): "
                         f"nothing of this one was logged either")


class _Write:
    """A group commit leader's write of the buffer, outside ``lock`` (``_write_buffer``):
    its records, where it starts, and, once ``done`` is released, its error (or None)."""

    __slots__ = ("buffer", "writer", "start", "size", "error", "done")

    def __init__(self, buffer: list, writer: SegmentWriter, start: int, size: int) -> None:
        self.buffer = buffer
        self.writer = writer
        self.start = start
        self.size = size
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


class LogFailed(ReadOnlyError):
    """An fsync of the log failed: the log takes no more writes (reopen to recover)."""


class WriteAheadLog:
    """Appends to the active segment and makes them durable.  Thread-safe."""

    def __init__(self, wal_dir: str, store_id: bytes, segment_start: int, offset: int,
                 segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        self.dir = wal_dir
        self.store_id = store_id
        self.segment_size = segment_size
        self.lock = threading.RLock()      # appends and rotation
        self._sync_lock = threading.Lock()  # one fsync (or rotation) at a time
        self._sync_mutex = threading.Lock()  # guards the group commit's state below
        self._syncing = False               # a leader is fsyncing
        # the idents of the threads whose lead is taken and not yet entered: each is taken
        # out by whoever comes first, its thread entering ``_lead`` or a waiter taking the
        # lead as lost (see _lead_is_lost)
        self._unentered: set[int] = set()
        self._leader: int | None = None     # the thread that took the lead
        self._lead_taken = 0.0              # when (time.monotonic())
        self._waiters: list[tuple] = []  # (lsn, its wake-up lock, its Appended or None)
        self._crowded = False  # the last round had waiters: commits go through the buffer
        self.after_sync = None  # called by the fsync leader with the new synced LSN
        self.on_void = None     # called (holding ``lock``) with the first voided LSN
        self._buffer: list[tuple[bytes, Appended]] = []  # buffered records, in LSN order
        self._buffered_bytes = 0
        self._writing: _Write | None = None  # the leader's write of a batch, outside lock
        self.buffered_records = 0  # records that went through the buffer
        self.voided_records = 0    # buffered records whose write failed
        self.writer = SegmentWriter(os.path.join(wal_dir, segment_name(segment_start)), store_id,
                                    segment_start, offset)
        self.written_lsn = self.writer.end_lsn
        self.synced_lsn = self.written_lsn
        self.failed: BaseException | None = None
        self.bytes_since_checkpoint = 0
        self.fsyncs = 0
        self.rotations = 0
        self.spare = Spare(wal_dir)
        # held while the spare is made or used (an RLock: walstore.signals enters it as itself)
        self._spare_lock = threading.RLock()
        self._spare_cond = threading.Condition(self._spare_lock)
        # the spare is asked for once the log's end passes ``_spare_at`` (half the
        # segment in use; at once when the open finds it half written) and again after
        # each rotation: an open that writes little -- a CLI verb, a short-lived agent,
        # a test -- zero-fills and fsyncs no spare (4 MiB for a young store, more later:
        # stop 82 measured its open and close 14% of a test run's time) and its close
        # waits for no fill; a segment's second half leaves the background thread the
        # time to make it before rotation needs it.  A first record past the half (a
        # bulk commit) finds none ready: its rotation makes the segment inline, counted
        # in ``inline_preallocations``, as one that outran the spare's fill always did.
        w = self.writer
        self._spare_at = w.start_lsn + (w.size - SEGMENT_HEADER_SIZE) // 2
        self._spare_wanted = w.end_lsn >= self._spare_at
        if self._spare_wanted:
            self._spare_at = _NEVER
        self._spare_thread: threading.Thread | None = None
        self._spare_stop = False
        self.inline_preallocations = 0  # rotations that had to zero-fill on the commit path
        self.small_segments = 0  # ... of which made smaller than asked: the disk nearly full
        self.spare_error: str | None = None  # the last unexpected error making a spare

    # ---- appending ---------------------------------------------------------------------
    def append(self, rtype: int, payload: bytes) -> tuple[int, int]:
        """Append one record, written at once (after the buffer); returns (lsn, end_lsn).
        Not yet durable: see ``sync_to``."""
        with self.lock:
            if self.failed is not None:
                self.check_usable()
            if self._buffer or self._writing is not None:
                self._flush()
            need = RECORD_HEADER_SIZE + len(payload)
            w = self.writer
            if need + SEAL_ROOM > w.size - w.offset:  # (``room()``: every commit asks)
                self._rotate(need)
                w = self.writer
            lsn = w.start_lsn + w.offset - SEGMENT_HEADER_SIZE  # (``w.end_lsn``)
            data = encode_record(w.salt, rtype, lsn, self.synced_lsn, payload)  # (``frame``)
            size = len(data)  # (== need)
            try:
                pwrite_all(w.fd, data, w.offset)  # (``w.write_at_end`` written out)
                w.offset += size
            except OSError as e:
                if w.fd < 0:  # (closed: ``close`` holds ``lock``, so no number reused)
                    raise self._closed_error() from e
                w.scrub(size)  # best effort: no stale half record behind the end
                raise WalWriteError(e.errno, f"could not write the WAL record: {e.strerror or e}"
                                    ) from e
            self.written_lsn = end = lsn + size  # (== w.end_lsn)
            self.bytes_since_checkpoint += size
            if end >= self._spare_at:
                self._spare_due()
            return lsn, end

    def append_grouped(self, rtype: int, payload: bytes) -> tuple[int, int, Appended | None]:
        """Append a record its caller will wait for with ``sync_to`` (a commit): while a
        group commit leader is fsyncing, the record waits in the buffer and the leader's
        next round writes it with the others' (see the module doc); otherwise nothing
        would share the write, and it is written at once, as ``append`` does — unless the
        last group commit round had waiters (``_crowded``: other threads are committing),
        when it is buffered all the same and its own lead writes it outside ``lock``
        (written at once it held the journal's lock across the pwrite, and the committers
        arriving meanwhile slept on it).  Returns (lsn, end, ticket); the ticket (None
        when written at once) goes to ``sync_to``."""
        if not (self._syncing or self._buffer or self._waiters or self._crowded):  # (read
            # without the mutex: either answer is correct; a lead being handed over leaves
            # waiters)
            lsn, end = self.append(rtype, payload)
            return lsn, end, None
        ticket = self._append_buffered(rtype, payload)
        return ticket.lsn, ticket.end, ticket

    def _append_buffered(self, rtype: int, payload: bytes) -> Appended:
        with self.lock:
            self.check_usable()
            need = RECORD_HEADER_SIZE + len(payload)
            if need + SEAL_ROOM > self.writer.room() - self._buffered_bytes:
                self._flush()
                if need + SEAL_ROOM > self.writer.room():
                    self._rotate(need)
            lsn = self.written_lsn
            data = self.writer.frame(rtype, payload, self.synced_lsn, lsn)
            ticket = Appended(lsn, lsn + len(data))
            self._buffer.append((data, ticket))
            self._buffered_bytes += len(data)
            self.written_lsn = ticket.end
            self.bytes_since_checkpoint += len(data)
            self.buffered_records += 1
            if ticket.end >= self._spare_at:
                self._spare_due()
            return ticket

    def _flush(self) -> None:
        """Write the buffered records in one write (caller holds ``lock``).  When it fails,
        the records not wholly written are voided (see the module doc) and WalWriteError
        is raised.  A leader's write in flight (``_write_buffer``) ends first."""
        if self._writing is not None:
            self._await_write()
        if not self._buffer:
            return
        if self.writer.fd < 0:  # closed: the records stay buffered, never voided as failed
            raise self._closed_error()
        buffer, self._buffer = self._buffer, []
        self._buffered_bytes = 0
        data = b"".join(d for d, _t in buffer) if len(buffer) > 1 else buffer[0][0]
        start = self.writer.offset
        try:
            self.writer.write_at_end(data)
            return
        except OSError as e:
            error = e
        written = getattr(error, "written", 0)  # bytes the failed write did put down
        whole = 0
        kept = 0
        for d, _t in buffer:
            if whole + len(d) > written:
                break
            whole += len(d)
            kept += 1
        self.writer.offset = start + whole  # whole records stay: they were written
        self.writer.scrub(len(data) - whole)  # best effort: no stale half record behind
        voided = buffer[kept:]
        for _d, ticket in voided:
            ticket.error = error
        self.voided_records += len(voided)
        self.bytes_since_checkpoint -= len(data) - whole
        self.written_lsn = self.writer.end_lsn
        if self.on_void is not None:
            self.on_void(voided[0][1].lsn)
        raise _others_voided(error, len(voided)) from error

    def _write_buffer(self) -> None:
        """The group commit leader's write of the buffer: its records taken and their
        place reserved under ``lock``, written outside it, settled under it again.  Held
        across the write, ``lock`` (the journal's) made every committer arriving
        meanwhile sleep on it, and the write gave the GIL away while holding it: 0.2-0.5
        blocked appends per commit at 8 threads.  Whoever needs the end meanwhile (a
        plain append, a flush, a rotation: ``_flush``) waits for the write first, holding
        ``lock``; the write itself takes no lock.  When it fails, the records it did not
        wholly write are voided, and so are those buffered behind them meanwhile (their
        LSNs follow: none of them was written), and WalWriteError is raised."""
        with self.lock:
            if self._writing is not None:  # (not ours: a lead lost in its write)
                self._await_write()
            if not self._buffer or self.failed is not None:
                # (failed since the leader looked — another thread's fsync: the spare's, a
                # rotation's, a trim's — often between two rounds: nothing is written
                # again; the records stay buffered, as close() leaves them, and the
                # round's fsync is refused next: their committers are told "unknown".
                # Written, the log took them after it had stopped: audit 66)
                return
            buffer, self._buffer = self._buffer, []
            w = self.writer
            wr = _Write(buffer, w, w.offset, self._buffered_bytes)
            self._buffered_bytes = 0
            w.offset += wr.size  # reserved: appends and room() count it written
            self._writing = wr
        try:
            data = b"".join(d for d, _t in buffer) if len(buffer) > 1 else buffer[0][0]
            pwrite_all(wr.writer.fd, data, wr.start)
        except BaseException as e:  # (an OSError; anything else voids the batch too)
            wr.error = e
        finally:
            wr.done.release()
        with self.lock:
            if self._writing is wr:  # (else settled by an append that waited for it)
                self._settle(wr)

    def _await_write(self) -> None:
        """Wait for the leader's write in flight and settle it (caller holds ``lock``; the
        write takes no lock, so it ends)."""
        wr = self._writing
        with wr.done:
            pass
        self._settle(wr)

    def _settle(self, wr: _Write) -> None:
        """A finished ``_write_buffer`` (caller holds ``lock``): done, or its failure's
        records voided (see ``_write_buffer``) and WalWriteError raised."""
        self._writing = None
        error = wr.error
        if error is None:
            return
        written = getattr(error, "written", 0) if isinstance(error, OSError) else 0
        whole = 0
        kept = 0
        for d, _t in wr.buffer:
            if whole + len(d) > written:
                break
            whole += len(d)
            kept += 1
        w = wr.writer
        w.offset = wr.start + whole  # whole records stay: they were written
        w.scrub(wr.size - whole)  # best effort: no stale half record behind the end
        behind = self._buffer  # buffered meanwhile: after the failed ones, never written
        self._buffer = []
        self._buffered_bytes = 0
        voided = wr.buffer[kept:] + behind
        for _d, ticket in voided:
            ticket.error = error
        self.voided_records += len(voided)
        self.bytes_since_checkpoint -= wr.size - whole + sum(len(d) for d, _t in behind)
        self.written_lsn = w.end_lsn
        if self.on_void is not None:
            self.on_void(voided[0][1].lsn)
        raise _others_voided(error, len(voided)) from error

    def next_segment_size(self, need: int = 0) -> int:
        """Segments grow: four times the last one, up to segment_size (a small store
        keeps small files, a busy one rotates rarely).  Fourfold, not twofold: each
        rotation and each zero-fill of the next spare costs a commit running beside it a
        wait for the disk, and a young store reaches 16 MiB segments in two of them
        instead of four (10,000 2 KiB commits into a new store: p99.9 0.36-0.57 ms
        instead of 0.66-1.19 ms)."""
        return max(min(self.segment_size, SEGMENT_GROWTH * self.writer.size),
                   SEGMENT_HEADER_SIZE + need + SEAL_ROOM)

    def _rotate(self, need: int) -> None:
        """Make the old segment's records durable, activate the next segment, then seal
        the old one (in that order: a sealed segment without a successor is proof that a
        segment went missing; a crash in between leaves an unsealed segment ending
        SEAL_RECORD_SIZE short of its successor, which readers accept — and nothing
        else short: records written to the old segment but not yet synced, e.g. a group
        commit's batch flushed just now, would leave a gap before a durable successor)."""
        self._flush()  # (the caller holds ``lock``)
        old = self.writer
        if old.fd < 0:  # closed (``close``, under ``lock``): a purge close() left running
            # rotated it after, and made a segment in a store let go (another process's
            # by then), its old segment trimmed (audit 66)
            raise self._closed_error()
        size = self.next_segment_size(need)
        with self._sync_lock:  # held throughout, so sync_to never sees a closing writer
            if self.failed is not None:  # (a leader's fsync failed while this waited for
                self.check_usable()       # the lock: never fsync the segment again)
            if self.synced_lsn < old.end_lsn:
                self._fsync(old)
            seal_lsn = old.end_lsn
            seal = old.frame(RecordType.SEAL, SEAL_PAYLOAD, self.synced_lsn, seal_lsn)
            start = seal_lsn + len(seal)  # the log goes on where the SEAL record ends
            try:
                self._await_spare()
                with self._spare_lock:
                    if self.failed is not None:  # (the spare's fsync failed while this
                        self.check_usable()  # waited for it: nothing is written or synced
                        # again — it went on to make the segment inline, seal, fsync and
                        # switch, and the commit's record was written after the failure)
                    path = None
                    if self.spare.size >= size:
                        try:
                            path = self.spare.activate(self.store_id, start)
                        except FileNotFoundError:  # (spare.tmp removed behind the store's
                            pass  # back: made inline, as with none — it failed the commit)
                    if path is None:
                        self.inline_preallocations += 1
                        path, made = create_segment_fitting(  # (a nearly full disk: a
                            self.dir, self.store_id, start, size,  # smaller one)
                            SEGMENT_HEADER_SIZE + need + SEAL_ROOM)
                        if made < size:
                            self.small_segments += 1
            except FsyncFailed as e:
                self.failed = e.__cause__ or e
                raise LogFailed(f"fsync failed while creating a WAL segment ({e}); the "
                                f"store is now read-only (reopen it to recover)") from e
            except OSError as e:
                raise WalWriteError(e.errno, f"could not create a new WAL segment: "
                                             f"{e.strerror or e}") from e
            try:
                writer = SegmentWriter(path, self.store_id, start, SEGMENT_HEADER_SIZE)
            except OSError as e:  # no file may claim LSNs the old segment goes on holding
                self._withdraw(path, e)
                raise WalWriteError(e.errno, f"could not open the new WAL segment: "
                                             f"{e.strerror or e}") from e
            # the new segment takes the appends before the old one's SEAL is written, and
            # so before anything else can fail: switched after the publication, one that
            # raised (a MemoryError) left the old writer appending behind its SEAL — the
            # next commit was acknowledged there, and the next open refused the log (a gap
            # before the new segment); switched after the SEAL's fsync, so did a
            # MemoryError out of that fsync, or Ctrl-C in it (a purge's rotation)
            self.written_lsn = start
            self.writer = writer
            try:
                old.write_at_end(seal)
            except OSError:
                pass  # unsealed: the shape of an interrupted rotation, which readers accept
            try:
                self._fsync(old)
            finally:
                old.close()
            self.rotations += 1
            if self.after_sync is not None:
                self.after_sync(start)  # durable: visible before it counts as synced
            with self._sync_mutex:
                self.synced_lsn = max(self.synced_lsn, start)
                wake = self._take_covered()
            for x in wake:  # (outside the mutex, as a leader's wake-ups)
                x[1].release()
        # only now: the spare's size follows the new segment's (asked for earlier, a young
        # store's spare came out one size short, and every rotation zero-filled inline)
        self._spare_at = _NEVER  # (a store that rotated writes: the next one at once)
        self._want_spare()

    def _withdraw(self, path: str, cause: OSError) -> None:
        """Remove a just-made segment that will not be used (durably); if even that fails,
        the log stops (LogFailed), so no record is ever written behind its start."""
        try:
            fileio.unlink(path)
            fileio.fsync_dir(self.dir)
        except OSError as e:
            self.failed = e
            raise LogFailed(f"could neither open nor remove the new WAL segment {path} "
                            f"({cause}; {e}); the store is now read-only") from e

    # ---- the spare: the next segment, preallocated off the commit path -------------------
    def start_spare_thread(self) -> None:
        """Start the thread that keeps a spare ready (at once, and after each rotation)."""
        thread = threading.Thread(target=self._spare_loop, name="walstore-spare", daemon=True)
        start_thread(thread)  # (kept only once started: ``close`` joins it)
        self._spare_thread = thread

    def _spare_loop(self) -> None:
        while True:
            with self._spare_lock:
                while not self._spare_wanted and not self._spare_stop:
                    self._spare_cond.wait()
                if self._spare_stop:
                    return
            try:
                self.prepare_spare()
            except (NoRoomForSpare, FsyncFailed):  # no room for a spare: the next rotation
                pass  # preallocates inline (a failed fsync: prepare_spare stopped the log)
            except OSError as e:  # (EIO, EACCES: the same, and said in stats()'s
                # background_errors — passed over in silence, audit 65; ENOSPC in the fill
                # is the disk filling meanwhile, as NoRoomForSpare: not an error)
                if e.errno != errno.ENOSPC:
                    self.spare_error = f"{type_and_message(e)}"
            except Exception as e:  # (a MemoryError at a memory limit): the same — the
                # thread lives on for the next one.  It died of it, ``_spare_wanted``
                # stayed set, and every later rotation waited _await_spare's 5 s for a
                # spare nobody made, holding the log's locks (every commit waited too)
                self.spare_error = f"{type_and_message(e)}"
            finally:  # (whatever ended the attempt: no rotation waits for it any more)
                with self._spare_lock:
                    self._spare_wanted = False
                    self._spare_cond.notify_all()

    def _spare_due(self) -> None:
        """The log's end passed half the first segment of this open (caller holds
        ``lock``): the spare is made from now on, in the background."""
        self._spare_at = _NEVER
        self._want_spare()

    def request_spare(self) -> None:
        """Have the spare thread make the spare now (in the background), as the log's end
        passing half its segment would: for a caller about to write a lot (and tests of
        the spare).  Nothing when one of the next segment's size is ready.  Never waits
        for a fill under way (it holds ``_spare_lock`` throughout): asked while one ran,
        this waited for the whole fill holding ``lock``, and every commit with it (h1,
        stop 83)."""
        with self.lock:
            self._spare_at = _NEVER
        if not self._spare_wanted:  # (wanted: asked for already, or being made now)
            self._want_spare()

    def _want_spare(self) -> None:
        with self._spare_lock:
            self._spare_wanted = True
            self._spare_cond.notify_all()

    def _await_spare(self, timeout: float = 5.0) -> None:
        """A rotation right after another waits for the spare being made, rather than
        zero-filling a second file on the commit path."""
        if self._spare_thread is None:
            return
        with self._spare_lock:
            self._spare_cond.wait_for(lambda: not self._spare_wanted or self._spare_stop,
                                      timeout)

    def needs_spare(self) -> bool:
        """True when the next rotation would have to preallocate on the commit path."""
        return self.failed is None and self.spare.size < self.next_segment_size()

    def prepare_spare(self) -> None:
        """Preallocate the next segment's file (the spare thread calls this)."""
        with self._spare_lock:
            if self.needs_spare():
                try:
                    self.spare.prepare(self.next_segment_size())
                except FsyncFailed as e:  # the log stops (never retry an fsync) at once,
                    self.failed = e.__cause__ or e  # before any other I/O: a commit that
                    self.spare.discard()            # starts after the failure is refused
                    raise

    def rotate(self) -> int:
        """Start a new segment now (sealing the current one); returns its start LSN."""
        # no asynchronous signal inside (walstore.signals): a commit's rotation runs in
        # the commit's section, this one (a purge's, a salvage's) in its caller's thread,
        # often the main one: Ctrl-C between the new segment's creation and the switch
        # to it left the old segment taking the appends, past the new one's start
        with deferred(), self.lock:
            self.check_usable()
            self._rotate(0)
            return self.writer.start_lsn

    # ---- durability --------------------------------------------------------------------
    def sync_to(self, lsn: int, ticket: Appended | None = None) -> None:
        """Return once every byte below ``lsn`` is durable (and, through ``after_sync``,
        published); concurrent callers share fsyncs.  With the ``ticket`` of a buffered
        record: WalWriteError when its write failed (voided: nothing of it was logged).

        Group commit: one caller at a time is the leader: it writes the buffered records
        and fsyncs everything written so far; the others wait, each on its own lock, and
        the leader wakes exactly those its fsync covered (or whose record it voided).
        While callers it did not cover are waiting, it fsyncs again at once (up to
        CHAIN_FSYNCS more times) instead of leaving the disk idle until one of them wakes
        up to lead; then it hands the lead to the oldest of them.  Raises LogFailed when
        the fsync fails (the bytes' fate is unknown until recovery), and also when the log
        failed while this caller waited (another thread's fsync, e.g. the spare's): a
        commit is acknowledged only by a log that had not failed when its sync returned.

        ``synced_lsn`` moves only after ``after_sync`` ran for it, here and in rotation: a
        caller that finds its bytes synced finds them published too (read-your-writes).
        Never call it holding ``lock`` (the leader takes it to write the buffer).
        """
        if self.synced_lsn >= lsn and self.failed is None and ticket is None:
            return
        # no asynchronous signal inside (walstore.signals): an interrupt between taking
        # the lead (``_syncing``) and handing it on, or holding the mutex, left every
        # later commit of the process waiting for ever
        with deferred():
            self._sync_to(lsn, ticket)

    def sync_to_in_section(self, lsn: int, ticket: Appended | None = None) -> None:
        """``sync_to`` for a caller already inside a ``deferred()`` section (the commit
        pipeline's: every durable commit comes here; a nested section costs two calls)."""
        if self.synced_lsn >= lsn and self.failed is None and ticket is None:
            return
        self._sync_to(lsn, ticket)

    def _sync_to(self, lsn: int, ticket: Appended | None) -> None:
        mutex = self._sync_mutex
        me = None  # this caller's wake-up lock, made on its first wait
        ident = threading.get_ident()
        while True:  # (one pass, unless it waited, or led a round that did not cover ``lsn``)
            with mutex:  # (``with``: no interrupt between taking the mutex and the guard)
                # read before the ticket: a void (``_settle``, under ``lock``, not this
                # mutex) sets the tickets' error first, then moves the end back; read
                # after it, a record voided in between passed for "beyond the end"
                done = self.synced_lsn >= lsn or lsn > self.written_lsn
                if ticket is not None and ticket.error is not None:
                    self._abandon(me)  # (a lead handed to us goes on to the next one)
                    ticket.raise_voided()
                if self.failed is not None:
                    self.check_usable()  # (raises)
                if done:
                    return  # (beyond the end: what it waited for was voided)
                lead = not self._syncing or self._lead_is_lost(ident)
                if lead:
                    self._syncing, self._leader = True, ident
                    self._lead_taken = time.monotonic()
                    self._unentered.add(ident)
                else:
                    if me is None:
                        if self.lock._is_owned():  # the leader may need it for the buffer
                            raise RuntimeError("WriteAheadLog.sync_to would wait holding "
                                               "the WAL's lock (a deadlock)")
                        me = threading.Lock()
                        me.acquire()
                    self._waiters.append((lsn, me, ticket))
            if lead:
                if self._lead(lsn, ident) and (ticket is None or ticket.error is None):
                    return  # (what the loop's next pass would find: no second mutex round)
                continue
            # waits outside the mutex: a leader waking the waiters its fsync covered never
            # finds one of them blocked on the mutex it holds
            try:
                # released by a leader (covered, the lead, or failed); a timeout looks
                # whether the lead was lost (see _lead_is_lost)
                woken = me.acquire(timeout=LOST_LEAD_S)
            except BaseException:  # (an interrupt): never strand the waiters
                with mutex:
                    self._abandon(me)
                raise
            if woken:
                if (self.synced_lsn >= lsn and self.failed is None
                        and (ticket is None or ticket.error is None)):
                    return  # covered (the usual wake-up): what the mutex round would find
                continue  # the lead handed over, a failure, or its record voided
            with mutex:
                mine = any(w[1] is me for w in self._waiters)
                if mine:
                    self._waiters = [w for w in self._waiters if w[1] is not me]
            if not mine:  # a leader took the entry: it releases ``me`` (has, or will: a
                me.acquire()  # round's wake-ups run after its mutex); consume it, or the
                # next wait would return at once and queue ``me`` twice

    def _lead_is_lost(self, ident: int) -> bool:
        """A lead taken and not led (its thread interrupted, KeyboardInterrupt, between
        taking it and entering ``_lead``, or inside ``_lead``'s hand-over): the thread
        that holds it, syncing again, is not leading (it is here), so it takes it again
        at once; another thread does when the lead was never entered, after LOST_LEAD_S,
        by taking the leader out of ``_unentered``: a thread that only stalled that long
        (a GC pause, the GIL held by another thread's long C call) then finds itself
        taken out, and does not lead.  (It was a flag the leader set on entering: set
        after a waiter's test, both led at once, and one's round fsynced, published and
        acknowledged the other's batch before it was written.)  (Caller holds the
        mutex.)"""
        if self._leader == ident:
            return True
        if time.monotonic() - self._lead_taken <= LOST_LEAD_S:
            return False
        try:  # (one C call: atomic with the leader's own, entering ``_lead``)
            self._unentered.remove(self._leader)
        except KeyError:
            return False  # entered: being led
        return True

    def _take_covered(self) -> list:
        """The waiters a rotation's fsync covered, taken off ``_waiters`` for the caller
        to wake, and, when no leader is at work and waiters are left, the first of them
        to lead.  Before, a rotation woke no one: a waiter handed the lead that the
        rotation covered returned without leading, and the next waiter sat out its timed
        wait (LOST_LEAD_S, 1 s) with its record durable.  (Caller holds the mutex.)"""
        waiters = self._waiters
        if not waiters:
            return []
        synced, wake, rest = self.synced_lsn, [], []
        for x in waiters:
            gone = x[2] is not None and x[2].error is not None
            (wake if x[0] <= synced or gone else rest).append(x)
        if rest and not self._syncing:
            wake.append(rest.pop(0))  # (the next leader)
        self._waiters = rest
        return wake

    def _abandon(self, me: threading.Lock | None) -> None:
        """A waiter leaves (caller holds the mutex): forget its entry; if a leader had
        already woken it to lead, wake the next waiter instead."""
        mine = [w for w in self._waiters if w[1] is me] if me is not None else []
        if mine:
            self._waiters = [w for w in self._waiters if w[1] is not me]
        elif not self._syncing and self._waiters:
            self._waiters.pop(0)[1].release()

    def _lead(self, lsn: int, ident: int) -> bool:
        """The leader's loop (see ``sync_to``); ``_syncing`` is ours until it returns.
        ``ident``: this thread's (see _lead_is_lost).  ``lsn``: the leader's own; when it is
        not written yet, another thread is writing the buffer that holds it (``_flush``
        empties the buffer first): taking ``lock`` waits for that write, so the round
        covers it.  Returns whether its last round synced (and published) up to ``lsn``
        with the log not failed: the caller is done (a buffered record's ticket may still
        say it was voided); False at once when the lead was taken as lost before this
        thread entered it (see _lead_is_lost).

        The waiters a round covered are woken outside the mutex, and, when the leader
        fsyncs again for others, only after it wrote the buffer for that fsync, right
        before the fsync: woken earlier they took the GIL while the leader's ``pwrite``
        had let it go, and the next fsync started only when they had all run."""
        rounds = 0
        try:
            self._unentered.remove(ident)  # entered: no waiter takes the lead as lost now
        except KeyError:
            return False  # taken as lost while this thread stalled: the caller waits
        wake: list = []  # taken off ``_waiters``: released before this returns, always
        try:
            while True:
                done = None
                more = covered = False
                try:
                    w = self.writer  # (``w.end_lsn`` below written out)
                    if self._buffer or w.start_lsn + w.offset - SEGMENT_HEADER_SIZE < lsn:
                        try:
                            self._write_buffer()
                        except WalWriteError:
                            pass  # voided: their waiters are woken below and raise
                    if wake:  # the last round's: they run while this round's fsync does
                        wake, woken = [], wake
                        for x in woken:
                            x[1].release()
                    with self._sync_lock:
                        if self.failed is not None:  # (failed while this round waited for
                            self.check_usable()  # the lock, e.g. a rotation's fsync: a
                            # retried fsync can lie, and on its success the round moved
                            # ``synced_lsn`` and published what the failure left unknown)
                        writer = self.writer
                        target = writer.start_lsn + writer.offset - SEGMENT_HEADER_SIZE
                        self._fsync(writer)  # (target: ``end_lsn`` written out)
                    if self.after_sync is not None:
                        self.after_sync(target)  # e.g. publish the batch once, for everyone
                    # only now: a publication that raised (a MemoryError) ends the round as
                    # a failed one (every waiter woken, the lead let go, ``synced_lsn``
                    # kept: not published); counted done, it ended as a chaining round
                    # whose exception left the lead taken, and every commit waited for ever
                    done = target
                finally:
                    with self._sync_mutex:
                        if done is not None and done > self.synced_lsn:
                            self.synced_lsn = done
                        waiters = self._waiters
                        self._crowded = bool(waiters)
                        failed = done is None or self.failed is not None
                        covered = not failed and done >= lsn
                        if waiters:
                            if failed:
                                wake, self._waiters = wake + waiters, []  # LogFailed
                            else:
                                synced = self.synced_lsn
                                rest = []
                                for x in waiters:  # covered, or its record voided: may go
                                    gone = x[2] is not None and x[2].error is not None
                                    (wake if x[0] <= synced or gone else rest).append(x)
                                self._waiters = rest
                                more = bool(rest) and rounds < CHAIN_FSYNCS
                                if rest and not more:
                                    wake.append(rest.pop(0))  # the next leader
                        if not more:
                            self._syncing = False
                if not more:
                    return covered
                rounds += 1
        finally:
            for x in wake:  # (outside the mutex: see ``_sync_to``'s wait)
                x[1].release()

    def sync(self) -> None:
        self.sync_to(self.written_lsn)  # (the leader writes the buffer first)

    def _fsync(self, writer: SegmentWriter) -> None:
        try:
            writer.sync()
            self.fsyncs += 1
        except (OSError, ValueError) as e:  # (ValueError: a closed writer's descriptor, -1)
            if writer.fd < 0:  # closed by ``close`` (under the fsync lock, which we hold)
                if self.synced_lsn >= writer.end_lsn:
                    return  # which made all of it durable first: nothing left to sync
                raise LogFailed("the WAL was closed before these records were made "
                                "durable (the store was let go without a clean close); "
                                "their outcome is unknown until recovery") from e
            if not isinstance(e, OSError):
                raise
            self.failed = e
            raise LogFailed(f"fsync of the WAL failed ({e.strerror or e}); the store is now "
                            f"read-only, the unsynced commits are unknown until recovery "
                            f"(reopen the store)") from e

    def _closed_error(self) -> StoreClosed:
        """What a write to a closed log raises: the store let go, not a disk error (a plain
        EBADF read as WalWriteError, which turns a store read-only)."""
        return StoreClosed(f"the WAL of {os.path.dirname(self.dir)} is closed: nothing more "
                           f"is written to it")

    def check_usable(self) -> None:
        if self.failed is not None:
            raise LogFailed(f"the store turned read-only after a WAL error: {self.failed}")

    # ---- trimming ----------------------------------------------------------------------
    def trim_below(self, lsn: int) -> list[str]:
        """Remove segments whose every record lies below ``lsn``; returns removed paths.

        Appends go on meanwhile (unlinking a big file can take milliseconds): only the
        active segment's start is read under the lock, and the active segment only moves
        forward, so what is removable stays removable.  StoreIOError when the directory
        cannot be listed or a segment removed (the log goes on); LogFailed when the
        directory's fsync fails (as any fsync of the log's)."""
        with self.lock:
            active = self.writer.start_lsn
            try:
                segs = list_segments(self.dir)
            except OSError as e:  # (the directory gone or unreadable under the store)
                raise StoreIOError(e.errno, f"cannot list the WAL directory to trim it: "
                                            f"{e.strerror or e}; nothing was removed",
                                   e.filename) from e
        removed = []
        error: OSError | None = None
        for (start, path), (next_start, _) in zip(segs, segs[1:]):
            if next_start <= lsn and start < active:
                try:
                    fileio.unlink(path)
                except OSError as e:  # (an unwritable directory, EROFS, EIO): stop here;
                    error = e          # what is left is trimmed by a later checkpoint
                    break
                removed.append(path)
        if removed:
            try:
                fileio.fsync_dir(self.dir)
            except OSError as e:  # as a failed fsync of the log: never retried, the log
                self.failed = e    # stops (it escaped raw, and the store went on writing)
                raise LogFailed(f"fsync of the WAL directory failed after removing old "
                                f"segments ({e.strerror or e}); the store is now read-only "
                                f"(reopen it to recover)") from e
        if error is not None:
            raise StoreIOError(error.errno, f"could not remove an old WAL segment: "
                                            f"{error.strerror or error} ({len(removed)} "
                                            f"removed before it; the rest stay until a later "
                                            f"checkpoint)", error.filename) from error
        return removed

    def disk_bytes(self) -> int:
        total = 0
        for _s, path in list_segments(self.dir):
            try:
                total += os.path.getsize(path)
            except FileNotFoundError:
                pass  # (trimmed meanwhile)
        return total

    def close(self, sync: bool = False) -> None:
        """Let the log go.  ``sync``: what was written is made durable first (a store's
        close, whatever cut its checkpoint short; never a crash's drop).  The descriptor
        is closed under the fsync lock: a leader's fsync in flight ends first, and one
        that comes after finds the writer closed (``_fsync``).  Closed under it, the
        fsync failed on the closed descriptor and its commits were told "outcome
        unknown" (EBADF) for records the next open found; its number taken by a file
        opened meanwhile, the fsync synced that file and they returned, never synced
        (audit 66: close() cut short by its checkpoint's LMDB error)."""
        with self._spare_lock:
            self._spare_stop = True
            self._spare_cond.notify_all()
        if self._spare_thread is not None and self._spare_thread is not threading.current_thread():
            self._spare_thread.join()
        with self.lock:
            try:
                if self.failed is None:
                    self._flush()  # (nothing is buffered once every committer returned)
                elif self._writing is not None:  # (its descriptor stays open until then)
                    self._await_write()
                # (failed: nothing is written again — the records still buffered are the
                # commits a failed fsync left unknown; written here, after the failure, a
                # log said to take no more writes took them at close)
            except WalWriteError:
                pass
            with self._sync_lock:
                try:
                    if sync and self.failed is None and self.synced_lsn < self.writer.end_lsn:
                        self._sync_at_close()
                except Exception:  # (LogFailed: the log failed, its waiters are told so;
                    pass  # a MemoryError publishing: they find it closed unsynced, the
                    # same) — the store lets go all the same: never left locked
                finally:
                    self.writer.close()

    def _sync_at_close(self) -> None:
        """``close``'s fsync of what was written (caller holds ``lock`` and the fsync
        lock): published, ``synced_lsn`` moved and the waiters it covered woken, as a
        rotation's fsync does."""
        writer = self.writer
        target = writer.end_lsn
        self._fsync(writer)
        if self.after_sync is not None:
            self.after_sync(target)
        with self._sync_mutex:
            self.synced_lsn = max(self.synced_lsn, target)
            wake = self._take_covered()
        for x in wake:  # (outside the mutex, as a leader's wake-ups)
            x[1].release()
