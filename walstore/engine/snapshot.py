"""Reads of committed state, latest or *as of* an LSN: the snapshots of transactions.

A snapshot is a number: the LSN P at which it was taken (the publication watermark then).
The state as of P is every commit whose record lies below P.  Such a commit is either
still in the MemTable (not yet applied) or already in LMDB.  So a read as of P:

1. takes the newest MemTable version of the key below P, if there is one; else
2. reads LMDB in one short read transaction: when LMDB's ``applied`` is at or below P,
   its ``data`` row is the value as of P; when commits after P were applied meanwhile,
   the key's first history version at or after P holds the value it had before, i.e. as
   of P (its before-image); no such version: the ``data`` row is still the one.
   (``LmdbState.applied_bound``, read once the LMDB transaction began, answers "at or
   below P" without reading ``applied`` when this process is the one writing LMDB.)

Nothing is held between reads: a snapshot pins no LMDB pages, no reader slot, no WAL, no
memory, however long a transaction stays open, nor does a scan waiting between two rows
(py-lmdb keeps a read transaction's reader slot until the object is freed: no generator
keeps one bound across a yield, nor an error's frames once it leaves, ``let_go``).  The
price is paid by the old snapshot alone (history lookups), and its defined limit is the
history horizon: a snapshot older than the retained history raises ``SnapshotTooOld`` (a
ConflictError).

Scans are streamed a chunk per short read transaction (16 rows first, then 64, then 256:
a caller after the first row or two reads little); chunks read after commits past P
were applied are corrected with the keys those commits changed (found through the
``bylsn`` and ``txns`` indexes), so the whole scan shows the state as of P, never part of
a commit.  In a read-only store each chunk after the first follows the writer's LMDB
first, as does each row it takes from the MemTable (``StateReader.follow``), so a purge
the writer applied meanwhile is met here as in the writer.
"""
from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from typing import Any, Callable, Iterator

from ..errors import ConflictError
from .apply import KEEP_RECENT_PURGES, RECENT_PURGES
from .lmdb_state import (SCAN_CHUNK, SCAN_CHUNK_BYTES, LmdbState, chunk_ended, from_u64,
                         iter_rows, let_go, read_chunk, u64)
from .keyindex import KeyIndex
from .memtable import MemTable
from . import tables

# the commits applied since a snapshot that a scan of it walks per LMDB read transaction
# (to correct its rows: ``_changed_since``), as a commit's validation does (conflicts)
WALK_ROWS = 4096
FIRST_CHUNK = 16  # rows of a scan's first LMDB read; each next one 4x, up to SCAN_CHUNK


class SnapshotTooOld(ConflictError):
    """A snapshot is older than the retained history (it cannot be read exactly any more):
    a transaction's (retry the transaction) or a streamed ``store.scan``'s (retry the
    scan).  ``at``: the snapshot's LSN; ``horizon``: the history horizon it fell behind,
    or ``purge``: the LSN of the purge that erased what it would read (the other None)."""

    at: int | None = None
    horizon: int | None = None
    purge: int | None = None

    @classmethod
    def of(cls, at: int, whose: str, retry: str, horizon: int | None = None,
           purge: int | None = None) -> "SnapshotTooOld":
        if horizon is not None:
            msg = (f"{whose} snapshot (LSN {at}) is older than the retained history "
                   f"(horizon LSN {horizon}); {retry}")
        else:
            # (a purge whose record begins at the snapshot's LSN is after it: "at or
            # after"; a scan's ``retry`` says "not one state" itself)
            tail = retry if "one state" in retry else \
                f"what it would read is not one state any more: {retry}"
            msg = (f"a purge (LSN {purge}), at or after {whose} snapshot (LSN {at}), "
                   f"erased history it would read; {tail}")
        e = cls(msg)
        e.at, e.horizon, e.purge = at, horizon, purge
        return e


class StateReader:
    """Reads committed state for the engine, its transactions and read-only followers."""

    def __init__(self, state: LmdbState, memtable: MemTable) -> None:
        self.state = state
        self.memtable = memtable
        # a read-only engine's ``follow_state``, called before each chunk of a streamed
        # scan after the first and before each MemTable row it yields: the writer's purge
        # or compaction while the caller holds the scan is met as in the writer
        # (SnapshotTooOld), not read from a stale MemTable version or a swapped-out file
        self.follow: Callable[[], None] | None = None
        # changes whenever a purge was applied to LMDB (the writer's applier count; a
        # read-only store's, the writer's shared in <store>/PURGES, or None without that
        # file: a scan then meets a purge at its next chunk): a streamed scan compares it
        # before each row it yields, so rows it read before a purge that the purge erased
        # are never yielded after it (they were, up to a chunk's 256)
        self.purge_epoch: Callable[[], Any] | None = None

    # ---- point reads --------------------------------------------------------------------
    def latest(self, key: bytes) -> bytes | None:
        """The newest committed value (the common, fastest path)."""
        mt = self.memtable
        vs = mt.versions.get(key)
        if vs is not None:
            published = mt.published
            for lsn, v in reversed(vs):
                if lsn < published:
                    return v
        return self.state.get(key)

    def as_of(self, key: bytes, at: int, purges: bool = False) -> bytes | None:
        """The value of ``key`` as of LSN ``at`` (see the module docstring).  ``purges``:
        raise SnapshotTooOld when a purge applied after ``at`` may have erased what this
        reads (a transaction's reads must be one state that existed; a view of the past
        reads a purged key as absent, which is what a purge promises)."""
        mt = self.memtable
        if mt.versions:  # (an empty overlay, as after a reopen: no call, no hash of ``key``)
            found, v = mt.visible(key, at)
            if found:
                return v
        st = self.state
        return st.run_read(lmdb_value_as_of, st, key, at, purges)

    # ---- scans --------------------------------------------------------------------------
    def scan(self, lo: bytes, hi: bytes | None, reverse: bool, at: int | None = None,
             purges: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of the state as of ``at`` (default: now) in [lo, hi), in order.

        The MemTable's keys in the range are listed once, in order; each LMDB chunk is
        merged with just those of them its key interval covers, and their values are
        looked up as they are yielded: a caller after the first row or two (the head of a
        conversation) pays for what it reads, not for every unapplied key in the range.
        A purge applied after ``at`` while the scan streams: SnapshotTooOld (with
        ``purges``; the purge erased history the rest of the scan would need).

        ``at`` None (a plain ``store.scan``, no transaction): the snapshot is taken at the
        first row asked for, and a SnapshotTooOld says so, in a scan's words (retention
        trimming the history the rest needs while the caller holds the scan: retry the
        scan).  The scan does not pin history: a reader that pauses could hold retention
        (and the store's growth) for as long as it likes."""
        if hi is not None and lo >= hi:
            # (start past end: nothing to read — a purge across its bounds made it a
            # SnapshotTooOld, "what it would read" being nothing — probe-audit55)
            return iter(())
        if at is None:
            return self._scan_now(lo, hi, reverse, purges)
        return self._scan(lo, hi, reverse, at, purges)

    def _scan_now(self, lo: bytes, hi: bytes | None, reverse: bool, purges: bool
                  ) -> Iterator[tuple[bytes, bytes]]:
        at = self.memtable.published
        try:
            yield from self._scan(lo, hi, reverse, at, purges)
        except SnapshotTooOld as e:
            if e.at != at:  # (not this scan's own snapshot: as it is)
                raise
            why = ("retention trimmed it while the scan streamed (a checkpoint under "
                   "retain_transactions / retain_seconds), so " if e.horizon is not None
                   else "")
            raise SnapshotTooOld.of(
                at, "this store.scan's", f"{why}the rows it yielded and the rest would not "
                f"be one state: retry the scan (nothing was changed)",
                horizon=e.horizon, purge=e.purge) from e

    def _scan(self, lo: bytes, hi: bytes | None, reverse: bool, at: int, purges: bool
              ) -> Iterator[tuple[bytes, bytes]]:
        mt = self.memtable
        drops = mt.drops  # (before the keys are listed: see keys_in_range)
        over = mt.keys_in_range(lo, hi)  # ascending; the unmerged ones are over[first:last]
        first, last = 0, len(over)
        # the keys not yet passed that LMDB commits since ``at`` changed: their values as
        # of ``at`` are read per chunk (``_fixes_in``); keys, not values, kept between
        # chunks (every such value was held from the first chunk on: the first row of
        # a scan of an old snapshot over 20,000 rewritten 1 KiB values took 22 MiB —
        # probe-audit55)
        changed = KeyIndex()
        covered = at  # LMDB commits with LSN in [at, covered) are accounted for in changed
        after: bytes | None = None
        st = self.state
        limit = FIRST_CHUNK  # (a caller that wants the first row or two reads few)
        follow = self.follow
        epoch = self.purge_epoch if purges else None
        seen = epoch() if epoch is not None else None
        while True:
            if follow is not None and after is not None:
                follow()  # (outside the read: a reopen waits for readers to leave)
            try:
                with st.read() as txn:
                    applied = st.applied_past(txn, covered)
                    if applied is not None:
                        more = _changed_since(txn, st, covered, applied, lo, hi, at, changed,
                                              purges, after, reverse)
                        if more is not None:
                            # (the rest of the walk in the next read transaction: one over
                            # every commit since an old snapshot kept a map resize, and every
                            # reader and committer behind it, waiting — probe-audit55)
                            covered = more
                            continue
                        covered = applied
                    chunk = read_chunk(txn, st.data, lo, hi, reverse, after, limit,
                                       SCAN_CHUNK_BYTES)
                    final = chunk_ended(chunk, limit, SCAN_CHUNK_BYTES)
                    edge = None if final else chunk[-1][0]
                    fixed, cut = _fixes_in(txn, st, changed, lo, after, edge, reverse, at,
                                           purges, limit)
                    if cut is not None:  # (more changed keys than a chunk's worth: the
                        edge, final = cut, False  # chunk ends at the last one taken)
                        chunk = [r for r in chunk if (r[0] >= cut if reverse else r[0] <= cut)]
            except BaseException as e:  # (a SnapshotTooOld kept by the caller kept this
                txn = None               # frame, and the read transaction in it:
                let_go(e)                # see lmdb_state.let_go)
                raise
            # py-lmdb keeps an aborted read transaction's reader slot until the object is
            # freed: bound here while the scan waits at a yield, each unfinished scan held
            # one of the slots every process shares (1,024 of them held made every read
            # and commit of the store fail — probe-audit60)
            txn = None
            limit = min(limit * 4, SCAN_CHUNK)
            if reverse:  # this chunk covers the MemTable keys from ``edge`` up
                cut = first if edge is None else bisect_left(over, edge, first, last)
                mine, last = over[cut:last][::-1], cut
            else:  # ... and those up to ``edge``
                cut = last if edge is None else bisect_right(over, edge, first, last)
                mine, first = over[first:cut], cut
            rows = chunk if not mine and not fixed else \
                self._merged(chunk, fixed, mine, reverse, at, drops)  # (LMDB rows alone:
            if epoch is None:                                         # never a deletion)
                yield from rows
            else:
                for row in rows:
                    if epoch() != seen:  # a purge applied since: what it erased stops here
                        seen = self._purge_met(epoch, at, row[0], lo, hi, reverse)
                    yield row
            if final:
                return
            del chunk, rows  # (let go before the next is read: two chunks were held at once)
            after = edge

    def _purge_met(self, epoch: Callable[[], Any], at: int, key: bytes, lo: bytes,
                   hi: bytes | None, reverse: bool) -> Any:
        """A purge was applied while a scan as of ``at`` streams, about to yield ``key``:
        SnapshotTooOld when it erased keys in what is left of the scan (from ``key`` on),
        else the new epoch (the scan goes on)."""
        if self.follow is not None:
            self.follow()  # (a read-only store: the file the writer's compaction swapped in)
        now = epoch()
        rest = (key, hi) if not reverse else (lo, key + b"\x00")
        st = self.state
        st.run_read(_check_horizon, st, at, True, *rest)
        return now

    def _merged(self, chunk: list, fixed: list, mine: list[bytes], reverse: bool, at: int,
                drops: int) -> Iterator[tuple[bytes, bytes]]:
        """One chunk's rows, corrected by ``fixed`` and overlaid with the MemTable keys
        ``mine`` (newest first wins: MemTable, then fixes, then the LMDB row)."""
        rows = dict(chunk)
        rows.update(fixed)
        mt = self.memtable
        visible = mt.visible
        follow = self.follow
        if follow is not None and self.purge_epoch is not None \
                and self.purge_epoch() is not None:
            follow = None  # (the writer's purge count is there: ``_scan`` checks it a row)
        for k, overlaid in _in_order(sorted(rows, reverse=reverse), mine, reverse):
            if not overlaid:
                v = rows[k]
            else:
                if follow is not None:
                    # a read-only store: what its writer applied (a purge) since the keys
                    # were listed leaves the MemTable now, as the writer's applier does
                    # there (``drops`` below)
                    follow()
                found, v = visible(k, at)
                if not found:
                    # no version here below ``at``: its value is in LMDB, i.e. ``rows``,
                    # unless versions left for LMDB after the keys were listed (this
                    # chunk may be older than their apply): then read it anew
                    v = rows.get(k) if mt.drops == drops else self.as_of(k, at, True)
            if v is not None:
                yield k, v


def _in_order(rows: list[bytes], mine: list[bytes], reverse: bool
              ) -> Iterator[tuple[bytes, bool]]:
    """The keys of two lists in one scan order, each once: ``(key, in mine)``.  Both
    lists are in that order already, so this merges them lazily — a scan that stops
    after its first row costs nothing per key of a large MemTable (sorting their union
    did: 300,000 keys committed, not yet applied, made the first row take 0.1 s)."""
    i = j = 0
    n, m = len(rows), len(mine)
    while i < n and j < m:
        a, b = rows[i], mine[j]
        if a == b:
            yield b, True
            i += 1
            j += 1
        elif (a < b) != reverse:
            yield a, False
            i += 1
        else:
            yield b, True
            j += 1
    for k in itertools.islice(rows, i, None):
        yield k, False
    for k in itertools.islice(mine, j, None):
        yield k, True


def _in_interval(k: bytes, after: bytes | None, edge: bytes | None, reverse: bool) -> bool:
    """Is ``k`` in the key interval one chunk covers: past ``after``, up to ``edge``."""
    if reverse:
        return (after is None or k < after) and (edge is None or k >= edge)
    return (after is None or k > after) and (edge is None or k <= edge)


def lmdb_value_as_of(txn, st: LmdbState, key: bytes, at: int, purges: bool = False
                     ) -> bytes | None:
    """``key``'s stored value as of LSN ``at`` in LMDB alone (no MemTable), inside the
    read transaction ``txn`` of ``st``: when LMDB is applied past ``at``, the version its
    history holds at ``at`` (SnapshotTooOld when ``at`` is below the retention horizon;
    ``purges``: or a purge applied since may have erased it), else, or with no such
    version, its current row; None: absent.  (``walstore verify`` reads it too.)"""
    if st.applied_past(txn, at) is not None:
        _check_horizon(txn, st, at, purges, key, key + b"\x00")
        cur = txn.cursor(db=st.hist)
        if cur.set_range(tables.hist_key(key, at)) and tables.is_version_of(
                cur.key(), tables.hist_prefix(key)):
            return tables.unpack_row(cur.value(), "hist", cur.key(), st.data_file)[1]
    return txn.get(key, None, st.data)  # (positional: py-lmdb parses keywords slowly)


def _check_horizon(txn, st: LmdbState, at: int, purges: bool = False, lo: bytes = b"",
                   hi: bytes | None = None) -> None:
    horizon = from_u64(txn.get(b"horizon", db=st.meta), 0, "meta", b"horizon", st)
    if at < horizon:
        raise SnapshotTooOld.of(at, "this transaction's", "retry it", horizon=horizon)
    if purges:
        purge = from_u64(txn.get(b"last_purge", db=st.meta), 0, "meta", b"last_purge", st)
        if purge >= at and purged_since(txn, st, at, lo, hi):
            raise SnapshotTooOld.of(at, "this", "retry it", purge=purge)


def purged_since(txn, st: LmdbState, at: int, lo: bytes, hi: bytes | None) -> bool:
    """Did a purge applied after snapshot ``at`` erase keys in [lo, hi) (``hi`` None: to
    the end)?  The newest purges' ranges are kept (apply.RECENT_PURGES); a snapshot older
    than all of them cannot tell: yes."""
    raw = txn.get(RECENT_PURGES, db=st.meta)
    recent = tables.unpack_row(raw, "meta", RECENT_PURGES, st.data_file) if raw else []
    if len(recent) >= KEEP_RECENT_PURGES and recent[0][0] >= at:
        return True  # (older purges after ``at`` may have fallen out of the list)
    for lsn, plo, phi in recent:
        if lsn >= at and (phi is None or lo < phi) and (hi is None or plo < hi):
            return True
    return False


def _fixes_in(txn, st: LmdbState, changed: KeyIndex, lo: bytes, after: bytes | None,
              edge: bytes | None, reverse: bool, at: int, purges: bool, limit: int
              ) -> tuple[list[tuple[bytes, bytes | None]], bytes | None]:
    """The keys of ``changed`` in one chunk's interval (past ``after``, up to ``edge``),
    with their values as of ``at``, taken out of ``changed``: at most ``limit`` of them
    and about SCAN_CHUNK_BYTES of values (keys deleted since ``at`` are in no LMDB row,
    so no chunk of rows bounds them).  Returns them and, when it stopped short of the
    interval's end, the last key taken (the chunk then ends there), else None."""
    if not len(changed):
        return [], None
    if reverse:
        keys = changed.range(lo if edge is None else edge, after)[::-1]
    else:
        keys = changed.range(lo if after is None else after + b"\x00",
                             None if edge is None else edge + b"\x00")
    fixed: list[tuple[bytes, bytes | None]] = []
    size = 0
    for k in keys:
        v = lmdb_value_as_of(txn, st, k, at, purges)
        fixed.append((k, v))
        changed.discard(k)
        size += 0 if v is None else len(v)
        if (len(fixed) >= limit or size >= SCAN_CHUNK_BYTES) and len(fixed) < len(keys):
            return fixed, k
    return fixed, None


def _changed_since(txn, st: LmdbState, since: int, upto: int, lo: bytes, hi: bytes | None,
                   at: int, changed: KeyIndex, purges: bool = True,
                   after: bytes | None = None, reverse: bool = False) -> int | None:
    """Add to ``changed`` every key in [lo, hi) not yet passed (past ``after``) changed by
    a commit applied with LSN in [since, upto), of the first WALK_ROWS of those commits;
    returns the LSN to go on from (in another read transaction), None when none is
    left.  A purge since ``at`` raises SnapshotTooOld when it erased keys not yet passed
    only (as ``Snapshot._purge_met``): one of the keys already yielded stopped the scan
    once they were in LMDB (audit 68)."""
    if after is None:
        _check_horizon(txn, st, at, purges, lo, hi)
    elif reverse:
        _check_horizon(txn, st, at, purges, lo, after)
    else:
        _check_horizon(txn, st, at, purges, after + b"\x00", hi)
    # (a row at a time: a list of every commit since an old snapshot held ~150 bytes per
    # commit, a million commits 150 MiB, for one scan — probe-audit55)
    n = 0
    for lsn_raw, txid_raw in iter_rows(txn, st.bylsn, u64(since), u64(upto)):
        if n == WALK_ROWS:
            return from_u64(lsn_raw, 0, "bylsn", None, st)
        n += 1
        row = txn.get(txid_raw, db=st.txns)
        if row is None:
            continue
        for k, _none in tables.unpack_row(row, "txns", txid_raw, st.data_file).get("w", ()):
            if k >= lo and (hi is None or k < hi) and _in_interval(k, after, None, reverse):
                changed.add(k)
    return None
