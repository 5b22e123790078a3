"""The Journal: every record of a live store is appended here, and only here.

It joins the WAL writer and the MemTable so that what is in one is in the other, in the
same order: ``append`` writes the record and queues its event under one lock; the event
becomes visible (``publish``) once the record is durable (durability="full": the group
commit's fsync leader publishes everything its fsync covered) or written to the OS
("normal", "none").  It also knows the store's durability: ``make_durable`` is what a
commit waits for; ``force_durable`` is what an intent or a decision record waits for
before an external effect may follow it (fsync under "full" and "normal", nothing under
"none").

Under "full", a commit that takes no hold (``buffered=True``) and arrives while the group
commit's leader is fsyncing is a *buffered* record: the leader writes it with the others
in one write before its next fsync.  If that write fails, the WAL voids the records it
did not write and calls ``_void``, which drops their events from the MemTable's tail
(they were never published); their committers get WalWriteError from ``make_durable``:
nothing committed.

Invariants: LSN order of WAL records == order of MemTable events == publication order;
an event is published only when everything below it is (the watermark is a prefix); the
WAL's buffered records are the MemTable's newest events.
"""
from __future__ import annotations

import threading
from ..codec import pack, pack_two
from ..errors import TransactionTooLarge
from ..log import records
from ..log.format import MAX_PAYLOAD, RecordType
from ..log.records import Event
from ..log.writer import WriteAheadLog
from ..signals import deferred
from .memtable import MemTable

CHUNK_BYTES = 4 * 1024 * 1024  # a commit's writes are split into WAL records of about this
SMALL_COMMIT = 1  # a commit of this many writes is one record unless that passes MAX_PAYLOAD
_NO_WRITES = pack([])


def _split(packed_body: bytes, writes: list) -> tuple[list, bytes]:
    """(the WRITES chunks, the final record's payload) of a commit or prepare: its body
    and the last chunk of its writes; every write in a chunk when the body beside them
    would pass the record limit (a 16 MiB value beside large action args or results: the
    commit failed, after the action's side effect ran).  Each part within its own limit
    (MAX_VALUE_BYTES, MAX_META_BYTES, MAX_ACTION_BYTES...) makes a final record within it."""
    if len(writes) <= SMALL_COMMIT:
        chunks, last = [], writes  # (pairs pack as arrays, tuples or lists alike)
    else:
        chunks = records.chunk_writes(writes, CHUNK_BYTES)
        last = chunks.pop()
    payload = records.with_writes(packed_body, pack(last))
    if len(payload) > MAX_PAYLOAD and last:
        chunks.append(last)
        payload = records.with_writes(packed_body, _NO_WRITES)
    return chunks, payload


class CommitAppended(Exception):
    """An error once a COMMIT record was appended (``append_commit``; the error is
    ``__cause__``): the commit is not "nothing committed" — its outcome is unknown."""


class Journal:
    def __init__(self, wal: WriteAheadLog, memtable: MemTable, durability: str) -> None:
        self.wal = wal
        self.memtable = memtable
        self.durability = durability
        self.waits_for_durability = durability == "full"  # does make_durable do anything?
        self.lock = wal.lock  # appends, MemTable entry, and the commit pipeline's validation
        self._publish_lock = threading.Lock()
        if durability == "full":
            wal.after_sync = self.publish
            wal.on_void = self._void
            # (``make_durable`` is the WAL's sync itself: one call less on every commit;
            # the pipeline calls it inside its deferred() section)
            self.make_durable = wal.sync_to_in_section

    # ---- appending (callers may hold ``lock`` around validation + append) ---------------
    def append(self, rtype: int, body: dict, txid: int = -1) -> Event:
        """Append one record that is an event (not a commit) and queue it.  Signals held
        off across the three steps (walstore.signals): an interrupt between the WAL's
        append and the MemTable's left a record in the log that no view, nor the
        applier, knew of — a compensation's outcome read "needs-redo" (or "pending")
        while the log said otherwise, and once later records were applied past it, the
        next open's REDO, starting from the applied LSN, never read it."""
        with deferred(), self.lock:
            lsn, end = self.wal.append(rtype, pack(body))
            event = Event(lsn, end, rtype, txid, body, None)
            self.memtable.add(event)
            self._publish_written(end)
            return event

    def append_plain(self, rtype: int, body: dict) -> tuple[int, int]:
        """Append a record that is not an event (CHECKPOINT)."""
        with self.lock:
            return self.wal.append(rtype, pack(body))

    def append_commit(self, txid: int, writes: list, body: dict, buffered: bool = False
                      ) -> Event:
        """Append a commit: its WRITES chunks (if large) and its COMMIT, contiguous.
        ``body``: the COMMIT's fields but ``tx`` and ``w`` (this call owns it: ``tx`` is
        added).  ``buffered``: the COMMIT may wait in the WAL's buffer for the group
        commit's leader (under "full" only; the caller must be able to lose it to a write
        error after this returns, i.e. it took no hold that outlives the MemTable event)."""
        body["tx"] = txid
        if len(writes) <= SMALL_COMMIT:  # (the common commit: ``_split`` written out)
            packed_body, packed_writes = pack_two(body, writes)
            chunks, payload = (), records.with_writes(packed_body, packed_writes)
            if len(payload) > MAX_PAYLOAD:
                chunks, payload = _split(packed_body, writes)
        else:
            packed_body = pack(body)
            chunks, payload = _split(packed_body, writes)
        appended = False
        try:
            with self.lock:  # (usually held already: the pipeline validates under it)
                start = self._append_chunks(txid, chunks) if chunks else None
                if buffered and self.durability == "full":
                    lsn, end, ticket = self.wal.append_grouped(RecordType.COMMIT, payload)
                else:
                    (lsn, end), ticket = self.wal.append(RecordType.COMMIT, payload), None
                appended = True
                event = Event(lsn, end, RecordType.COMMIT, txid,  # (see Event: plain,
                              packed_body if body.keys() <= records.PLAIN_FIELDS  # packed)
                              else body, tuple(writes), ticket, start)
                self.memtable.add(event, body.get("compensate", ()))
                if not self.waits_for_durability:  # (``_publish_written`` written out)
                    self.memtable.publish(event.end)
                return event
        except Exception as e:
            if appended:  # (a MemoryError after the append): the record is in the log
                raise CommitAppended(e) from e
            raise

    def append_prepare(self, txid: int, writes: list, body: dict) -> Event:
        """Append a PREPARE: its writes chunked as a commit's are (WRITES records just
        before it), so any write set a commit takes can be prepared."""
        packed_body = pack(body)
        if len(packed_body) > MAX_PAYLOAD - 64:  # (its writes all in chunks, still too big)
            raise TransactionTooLarge(
                f"transaction {txid} cannot be prepared: its PREPARE record would carry "
                f"{len(packed_body):,} bytes besides its writes (mostly the keys and ranges "
                f"it read, {len(body.get('r', ())):,} keys, which a prepared transaction "
                f"keeps to validate against), at most {MAX_PAYLOAD - 64:,}: read fewer keys "
                f"(a scan counts as one range) or commit it without prepare; nothing was "
                f"written, the transaction is still open")
        chunks, payload = _split(packed_body, writes)
        with self.lock:
            start = self._append_chunks(txid, chunks)
            lsn, end = self.wal.append(RecordType.PREPARE, payload)
            event = Event(lsn, end, RecordType.PREPARE, txid, body, list(writes), None, start)
            self.memtable.add(event)
            self._publish_written(end)
            return event

    def _append_chunks(self, txid: int, chunks) -> int | None:
        """Append a large write set's WRITES records (the caller holds ``lock``, and its
        COMMIT or PREPARE follows at once); the first one's LSN (the event spans its chunks
        too), or None when there are none."""
        start = None
        for chunk in chunks:
            first, _end = self.wal.append(RecordType.WRITES, pack({"tx": txid, "w": chunk}))
            if start is None:
                start = first
        return start

    # ---- durability and visibility ------------------------------------------------------
    def make_durable(self, end: int, ticket=None) -> None:
        """What ``commit()`` waits for: the fsync under "full" (LogFailed if it fails;
        WalWriteError if the buffered record's write failed: nothing committed).  Under
        "full" the instance's own (``__init__``): the WAL's ``sync_to_in_section``, for a
        caller inside a ``deferred()`` section."""
        if self.durability == "full":
            self.wal.sync_to(end, ticket)

    def force_durable(self, end: int, ticket=None) -> None:
        """What must precede an external effect (intents, decisions): an fsync unless the
        store runs without any (durability="none")."""
        if self.durability != "none":
            self.wal.sync_to(end, ticket)
            if self.durability != "full":
                self.publish(self.wal.synced_lsn)

    def sync_all(self) -> None:
        """Make everything written durable and visible (checkpoints, close)."""
        self.wal.sync()
        self.publish(self.wal.synced_lsn)

    def _void(self, lsn: int) -> None:
        """The WAL voided its buffered records from ``lsn`` on (it holds ``lock``)."""
        self.memtable.void_from(lsn)

    def _publish_written(self, end: int) -> None:
        """An append just wrote up to ``end`` (the caller holds ``lock``): under "normal"
        and "none" it is visible at once."""
        if self.durability != "full":
            self.memtable.publish(end)  # (``lock`` is this durability's publication lock)

    def publish(self, upto: int) -> None:
        """Move the watermark up to ``upto`` (never down).  Under "full" the fsync leader
        publishes without ``lock`` (appenders keep appending meanwhile), so publishers
        serialize on their own lock; otherwise on ``lock``, which every append holds."""
        with (self._publish_lock if self.durability == "full" else self.lock):
            self.memtable.publish(upto)

    @property
    def published(self) -> int:
        return self.memtable.published

