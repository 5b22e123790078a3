"""Reading the past: points, the transaction log, versions of a key, views ``at`` a point
(keys, and files through :mod:`walstore.agent.filehistory`), and restore points.

Points (``resolve``) are strict: an ``int`` is a txid (it must have committed), a
``walstore.LSN`` a log position (0 .. the end of the log), a ``str`` a restore point
name.  Anything that names nothing raises ``UnknownPoint`` (a KeyError) naming it; a
point older than the retained history raises ``HistoryTrimmed``.  The boundary of a point
is an LSN B: commits at or below B are "in", later ones "after"; the state as of B is the
state as of LSN B + 1 in :mod:`walstore.engine.snapshot`'s terms.

Costs grow with what is read (index lookups by key, by LSN, by txid), never with the age
of the store: ``hist`` rows per key, ``bylsn`` and ``txns`` rows per transaction.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ..codec import Key, decode_key, encode_key, unpack_value, utf8
from ..errors import (CorruptionError, EmptyArgumentError, HistoryTrimmed, PointTypeError,
                      ReadOnlyError, TrimmedOrUnknownPoint, UnknownPoint, shown)
from ..log.format import RecordType
from ..log.records import MAX_TXID as LOGGED_TXID_LIMIT
from ..engine import tables
from ..engine.lmdb_state import SCAN_CHUNK, from_u64, read_chunk
from ..engine.snapshot import SnapshotTooOld, purged_since
from ..engine.transaction import scan_bounds
from .txlog import LSN, TxnInfo, info_from_row

# records that change a workspace's files (their body names it: ``ws``)
_FILE_RECORDS = frozenset({RecordType.FILE_STEPS, RecordType.WATCH_BEGIN,
                           RecordType.WATCH_END, RecordType.FILE_CONFLICT})

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from .filehistory import HistoricalFiles
    from .files import Files


@dataclass(frozen=True)
class Version:
    """One version of a key: what transaction ``txid`` (commit at ``lsn``) set it to."""

    txid: int
    lsn: int
    value: Any
    deleted: bool


class HistoricalView:
    """Read-only state as of a point (``store.at(point)``)."""

    def __init__(self, history: "History", boundary: int) -> None:
        self._history = history
        self.lsn = LSN(boundary)
        # what must stay alive while the view is used (the Store facade that made it, as
        # a transaction's ``keepalive``: a store the program dropped is closed by its
        # __del__); the view's whole life
        self.keepalive: Any = None

    def _erased(self) -> list[tuple[bytes, bytes | None]]:
        """The ranges of purges after the point that LMDB does not hold yet (a read-only
        store beside, or after, a writer that died before applying one; a writer whose
        apply of one failed): the view reads nothing in them.  Taken at each read, a
        read-only store's log read first (as ``store.get`` reads it): taken once, when
        the view was made, a view made before such a purge went on returning the erased
        values after every other API hid them (probe-audit55)."""
        eng = self._history.engine
        if eng.follower is not None:
            eng.refresh()
        return [(lo, hi) for lsn, lo, hi in self._history.unapplied_purges()
                if lsn > self.lsn]

    def _value(self, k: bytes, erased: list | None = None) -> bytes | None:
        if erased is None:
            erased = self._erased()
        if erased and any(lo <= k and (hi is None or k < hi) for lo, hi in erased):
            return None
        eng = self._history.engine
        if eng.follower is not None:  # a read-only store: a purge its writer applied since
            eng.follow_state()        # the view was made is read from LMDB (absent)
        try:
            return eng.reader.as_of(k, self.lsn + 1)
        except SnapshotTooOld:  # trimmed while this view was in use: the point is gone
            raise self._trimmed() from None

    def _trimmed(self) -> HistoryTrimmed:
        return HistoryTrimmed(f"the history of LSN {int(self.lsn)} was trimmed while this "
                              f"view of it was in use (retention); it is older than the "
                              f"retained history now")

    def _check_retained(self) -> None:
        """HistoryTrimmed when retention moved the horizon past this view's point."""
        horizon = self._history.engine.state.meta_int(b"horizon")
        if horizon and self.lsn < horizon:  # (0: nothing trimmed; -1: an empty log's LSN 0)
            raise self._trimmed()

    def get(self, key: Key, default: Any = None) -> Any:
        k = encode_key(key)
        v = self._value(k)
        return default if v is None else self._decode(k, v)

    def __getitem__(self, key: Key) -> Any:
        k = encode_key(key)
        v = self._value(k)
        if v is None:
            raise KeyError(key)
        return self._decode(k, v)

    def _decode(self, k: bytes, v: bytes) -> Any:
        try:
            return unpack_value(v)
        except CorruptionError as e:
            raise tables.row_damaged(tables.AS_OF, k, e,
                                     self._history.engine.state.data_file) from e

    def __iter__(self) -> Iterator[Any]:
        """Not iterable: ``for k in x`` fell back to ``x[0]``, ``x[1]`` ... (Python's old
        protocol, as ``__getitem__`` is defined) and raised a KeyError or "key must be str
        or bytes, not int: 0"; iterate ``scan()`` instead (probe-audit51)."""
        raise TypeError(f"a view of a past point (store.at) is not iterable; iterate its scan() (key, value pairs "
                        f"in key order), e.g. for key, value in x.scan(prefix=...)")

    def __contains__(self, key: Key) -> bool:
        return self._value(encode_key(key)) is not None

    def files(self, ws: Any) -> "HistoricalFiles":
        """A workspace's files as they were at the point: ``read(path)`` (bytes;
        FileNotFoundError when absent then), ``entry(path)``, ``exists(path)``."""
        h = self._history
        if h.files is None:
            raise ValueError("this store has no reversible files")
        from .filehistory import HistoricalFiles
        workspace = h.files.resolve_ws(ws, register=False, gone_ok=True)
        # (unchecked, it read the tree as it is now: a crashed transaction's
        # never-committed bytes as a commit's)
        h.check_file_history(workspace)
        return HistoricalFiles(h.file_history, workspace, self.lsn)

    def scan(self, prefix: Key | None = None, start: Key | None = None, end: Key | None = None,
             reverse: bool = False) -> Iterator[tuple[Key, Any]]:
        """Every key that existed at the point, in order: walks the keys with history in
        the range (``hkeys``), so it costs what the range holds, not the log's length.
        Bad bounds raise here, at the call."""
        return self._scan(*scan_bounds(prefix, start, end, reverse), reverse)

    def _scan(self, lo: bytes, hi: bytes | None, reverse: bool
              ) -> Iterator[tuple[Key, Any]]:
        eng = self._history.engine
        erased = self._erased()  # (once: each key's read then follows the LMDB state)
        if eng.follower is not None:
            eng.follow_state()  # (as ``_value``: the MemTable's keys without applied ones)
        # keys with history in LMDB, and keys only the MemTable holds yet (a read-only
        # store's view of the writer's WAL tail; a writer's ``at`` drained it)
        fresh = [k for k in eng.memtable.keys_in_range(lo, hi) if k in eng.memtable.versions]
        # a trim drops the history index rows of keys no retained point holds (one deleted
        # after this view's point): checked before and after the walk, so a range whose
        # keys a trim took raises HistoryTrimmed as a get of them does (it read as empty)
        self._check_retained()
        keys = eng.state.scan(lo, hi, reverse, db="hkeys")
        if fresh:
            keys = _merged(keys, fresh[::-1] if reverse else fresh, reverse)
        for k, _v in keys:
            v = self._value(k, erased)
            if v is not None:
                yield decode_key(k), self._decode(k, v)
        self._check_retained()


def _merged(rows: Iterator[tuple[bytes, Any]], extra: list[bytes], reverse: bool
            ) -> Iterator[tuple[bytes, Any]]:
    """``rows`` (key order) with the keys ``extra`` (the same order) merged in, each once."""
    i = 0
    for k, v in rows:
        while i < len(extra) and (extra[i] > k if reverse else extra[i] < k):
            yield extra[i], None
            i += 1
        if i < len(extra) and extra[i] == k:
            i += 1
        yield k, v
    for x in extra[i:]:
        yield x, None


def hide_purged(row: dict, purges: list[tuple[int, bytes, bytes | None]]) -> dict:
    """A ``txns`` row without the names of the keys a later purge erased, when LMDB does
    not hold that purge yet (``purges``: ``History.unapplied_purges``, a read-only store's
    alone; applying one erases the names from the rows, ``apply._erase_range``).  A
    read-only open after a writer was killed between a purge's commit and its apply
    listed them in ``TxnInfo.keys`` (and ``walstore diff`` showed their values)."""
    w = row.get("w")
    if not purges or not w:
        return row
    lsn = row["lsn"]
    kept = [x for x in w if not any(p > lsn and lo <= x[0] and (hi is None or x[0] < hi)
                                    for p, lo, hi in purges)]
    return row if len(kept) == len(w) else {**row, "w": kept}


MAX_TXID = LOGGED_TXID_LIMIT - 1  # 2**63 - 1: the log holds no larger transaction id


def check_limit(limit: int | None) -> None:
    """``limit`` of ``log`` and ``history``: a non-negative int, or None for no bound."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise TypeError(f"limit must be a non-negative int or None, not {limit!r:.80}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a non-negative int or None, not {limit!r}")


def check_txid(txid: int) -> int:
    """A txid walstore could have given (1 .. 2**63 - 1: a writer counts from 1, and a
    record with a txid of 2**63 or more is refused as corruption, see FORMAT.md), else
    UnknownPoint naming it.  (The message said 2**64 - 1, which no commit can have.)"""
    if not 1 <= txid <= MAX_TXID:
        raise UnknownPoint(f"txid {txid} names no transaction (txids run from 1 to "
                           f"{MAX_TXID}, 2**63 - 1)", txid)
    return txid


class History:
    def __init__(self, engine: "Engine", files: "Files | None" = None) -> None:
        self.engine = engine
        self.files = files
        self.file_history = None
        if files is not None:
            from .filehistory import FileHistory
            self.file_history = FileHistory(files)

    # ---- points -------------------------------------------------------------------------
    def resolve(self, point: Any) -> int:
        """The boundary LSN of ``point`` (see the module docstring)."""
        eng = self.engine
        eng.refresh()
        if isinstance(point, bool):
            raise PointTypeError("a point is a txid (int), a walstore.LSN or a restore point "
                                 "name (str), not a bool", point)
        if isinstance(point, LSN):
            end = eng.memtable.published
            if point < 0 or point > end:
                raise UnknownPoint(f"LSN {int(point)} names no position of this log (it "
                                   f"ends at LSN {end})", point)
            boundary = int(point)
            horizon = eng.state.meta_int(b"horizon")
            if boundary == end and (not horizon or end - 1 >= horizon):
                # the end of the log: no record begins there YET, so the state as of it
                # is the state now — but the next commit's record begins exactly there
                # and ("at or below the boundary") became part of the point: a view
                # ``at(LSN(end))`` changed under its reader when a commit landed.  No
                # record begins in (end - 1, end] now: the point is fixed at end - 1,
                # the same state, for good (-1 in an empty log: before everything).
                # (Not when the horizon is at the end, that history trimmed: the point
                # stays the end.)
                boundary = end - 1
        elif isinstance(point, int):
            check_txid(point)
            row = eng.views.txn_row(point)
            if row is None:
                self._raise_unknown_txid(point)
            boundary = row["lsn"]
        elif isinstance(point, str):
            p = eng.views.point(point)
            if p is None:
                raise UnknownPoint(f"no restore point named {shown(point)}", point)
            boundary = p["lsn"]
        else:
            raise PointTypeError(f"a point is a txid (int), a walstore.LSN or a restore point "
                                 f"name (str), not {type(point).__name__}", point)
        horizon = eng.state.meta_int(b"horizon")
        if horizon and boundary < horizon:  # (0: nothing trimmed)
            raise HistoryTrimmed(f"point {point!r} (LSN {boundary}) is older than the retained "
                                 f"history (horizon LSN {horizon})")
        return boundary

    def _raise_unknown_txid(self, txid: int) -> None:
        st = self.engine.state
        horizon = st.meta_int(b"horizon")
        if horizon:
            # a txid above every trimmed one never committed; at or below it, it may have
            # been trimmed (stores trimmed before that was recorded: below the next txid)
            top = st.meta_int(b"trimmed_txid_max", -1)
            if txid <= top if top >= 0 else txid < st.meta_int(b"next_txid"):
                raise TrimmedOrUnknownPoint(
                    f"transaction {txid} is unknown (it never committed) or older than the "
                    f"retained history (horizon LSN {horizon})", txid)
        raise UnknownPoint(f"no committed transaction with txid {txid}", txid)

    # ---- the log ------------------------------------------------------------------------
    def txn_info(self, txid: int) -> TxnInfo:
        if isinstance(txid, bool) or not isinstance(txid, int):
            raise TypeError(f"a txid is an int, not {type(txid).__name__}")
        if isinstance(txid, LSN):  # a log position (TxnInfo.lsn, tx.lsn), never taken for
            # the txid of the same number, as revert refuses it (it answered with that
            # other transaction's TxnInfo — probe-audit48); a TypeError as before
            raise PointTypeError(f"txn_info takes a txid (int), not a log position "
                                 f"({txid!r}); the transaction committed there is in "
                                 f"store.log(since=...) (TxnInfo.txid)", txid)
        check_txid(txid)
        self.engine.refresh()
        row = self.engine.views.txn_row(int(txid))
        if row is None:
            self._raise_unknown_txid(int(txid))
        horizon = self.engine.state.meta_int(b"horizon")
        if row["lsn"] < horizon:  # (a trim under way, or one a crash cut short, has not
            # deleted its row yet: trimmed all the same, as ``resolve`` says of it)
            raise HistoryTrimmed(f"transaction {txid} (LSN {row['lsn']}) is older than the "
                                 f"retained history (horizon LSN {horizon})")
        return info_from_row(self._live_actions(hide_purged(row, self.unapplied_purges())))

    def _live_actions(self, row: dict) -> dict:
        """``row`` with its actions as they stand now: the commit's row keeps each action as
        it was at the commit (``state: committed``), so ``log()``, ``txn_info`` and
        ``walstore log --json`` went on saying ``committed`` of an action a rewind or revert
        had compensated (or marked ``needs-redo``) while ``store.actions()`` said
        ``compensated``.  One action-row read per action listed: costs what it returns."""
        acts = row.get("actions")
        if not acts:
            return row
        views = self.engine.views
        live = []
        for a in acts:
            cur = views.action_row(str(a.get("id"))) if isinstance(a, dict) else None
            if cur is not None:
                a = dict(a)
                for f in ("state", "error", "attempts", "result"):
                    if f in cur:
                        a[f] = cur[f]
                if a.get("state") == tables.IN_FLIGHT:
                    a["state"] = "pending"
            live.append(a)
        return {**row, "actions": live}

    def log(self, limit: int | None = None, since: Any = None,
            oldest_first: bool = False) -> list[TxnInfo]:
        """Committed transactions, newest first in commit order, after ``since`` (a point,
        resolved as ``at`` and ``rewind`` resolve it: a txid that never committed, or an
        LSN past the end, raises UnknownPoint; one older than the retained history,
        HistoryTrimmed — a txid was read as "the larger txids", which past a trim left the
        trimmed transactions out without a word).  Reads the LSN index backwards: costs
        what it returns.  ``oldest_first``: the ``limit`` oldest after ``since`` instead,
        oldest first (page on with ``since=LSN(last.lsn)``)."""
        return list(self.iter_log(limit, since, oldest_first))

    def iter_log(self, limit: int | None = None, since: Any = None,
                 oldest_first: bool = False) -> Iterator[TxnInfo]:
        """``log``, read as it is consumed (the CLI streams it: ``walstore log --limit
        1000000`` held every row first).  Arguments are checked at the call."""
        check_limit(limit)
        if not isinstance(oldest_first, bool):
            raise TypeError(f"oldest_first must be a bool, not {oldest_first!r}")
        self.engine.refresh()
        boundary = -1 if since is None else self.resolve(since)
        # the retained commits alone: those at or after the horizon (the rows of older
        # ones outlive it while a trim deletes them, or after a crash cut one short until
        # the next checkpoint; listed, they were points that every other call refused)
        boundary = max(boundary, self.engine.state.meta_int(b"horizon") - 1)
        return self._log(boundary, limit, oldest_first)

    def _log(self, boundary: int, limit: int | None, oldest_first: bool
             ) -> Iterator[TxnInfo]:
        purges = self.unapplied_purges()
        if limit == 0:
            return
        n = 0
        for row in self.engine.views.commits_after(boundary, oldest_first):
            yield info_from_row(self._live_actions(hide_purged(row, purges) if purges
                                                   else row))
            n += 1
            if limit is not None and n >= limit:
                return

    # ---- versions and views -------------------------------------------------------------
    def versions(self, key: Key, limit: int | None = None) -> list[Version]:
        """Every retained version of ``key``, newest first; ``limit``: the newest
        ``limit`` alone (reading no further)."""
        return list(self.iter_versions(key, limit))

    def iter_versions(self, key: Key, limit: int | None = None) -> Iterator[Version]:
        """The versions of ``key``, newest first, read lazily from the history index (a
        chunk of rows per short read transaction): a caller that stops early reads no
        further, and one that streams them holds one version at a time (``versions`` was a
        list of every version: a key with a million versions held whole in memory, and
        ``walstore history`` had no way to ask for fewer).  ``key`` and ``limit`` are
        checked here, at the call; the WAL tail not in LMDB yet is taken here too."""
        check_limit(limit)
        eng = self.engine
        k = encode_key(key)
        eng.drain()
        newer = self.unapplied_versions(k)  # (a read-only store: the writer's WAL tail)
        # erased, LMDB not told yet: versions at or below the newest such purge are gone
        cut = self._unapplied_cut(k)
        return self._versions(k, newer, cut, limit)

    def _versions(self, k: bytes, newer: list[Version], cut: int, limit: int | None
                  ) -> Iterator[Version]:
        left = limit
        for v in newer:
            cut = max(cut, self._unapplied_cut(k))  # (a purge read since the call)
            if left == 0 or v.lsn <= cut:
                return
            yield v
            left = None if left is None else left - 1
        if left == 0:
            return
        # (LMDB may hold some of the unapplied ones by now: each version once)
        oldest = newer[-1].lsn if newer else None
        st = self.engine.state
        prefix = tables.hist_prefix(k)
        hi = prefix + b"\xff" * 9
        # the newest version set the current value: it and the first chunk of history
        # rows are read in ONE read transaction.  Read apart (the value, then the rows),
        # beside a writer applying a new version of the key between the two, the newest
        # row was shown with the value it replaced (a reader's history showed txid 5155
        # holding what txid 5153 wrote).  Later chunks only ever lose their oldest rows
        # (a trim) or all of them (a purge): the rows already read stay a true chain.
        with st.read() as txn:
            after = txn.get(k, None, st.data)
            chunk = read_chunk(txn, st.hist, prefix, hi, True, None)
            # below the horizon a finished trim keeps a key's newest version alone; rows
            # a trim has yet to delete (under way, or cut short by a crash until the next
            # checkpoint) are not listed either: they were versions of transactions that
            # log(), at() and txn_info() call trimmed (probe-audit55)
            horizon = from_u64(txn.get(b"horizon", None, st.meta), 0, "meta", b"horizon",
                               st)
            read_at = from_u64(txn.get(b"applied", None, st.meta), 0, "meta", b"applied", st)
        txn = None  # (freed, with its LMDB reader slot, before the yields)
        # a purge since these rows were read erased them: what is left is not yielded (a
        # caller that consumed the iterator after purge() returned got the erased values
        # from the chunk read before it; probe-audit55)
        epoch = self.engine.reader.purge_epoch
        seen = epoch() if epoch is not None else None
        rows = chunk if len(chunk) < SCAN_CHUNK else itertools.chain(
            chunk, st.scan(prefix, chunk[-1][0], reverse=True, db="hist"))
        after_row = ("data", k)  # (where ``after`` was read: named if it does not decode)
        for raw, row in rows:
            if not tables.is_version_of(raw, prefix):
                continue
            _k, lsn = tables.split_hist_key(raw)
            txid, before = tables.unpack_row(row, "hist", raw, st.data_file)
            if oldest is None or lsn < oldest:
                cut = max(cut, self._unapplied_cut(k))
                if lsn <= cut:
                    return
                if epoch is not None and epoch() != seen:
                    seen = epoch()
                    if self._purged_since(k, read_at):
                        return
                try:
                    value = None if after is None else unpack_value(after)
                except CorruptionError as e:
                    raise tables.row_damaged(*after_row, e, st.data_file) from e
                yield Version(txid, LSN(lsn), value, after is None)
                if lsn < horizon:
                    return
                if left is not None:
                    left -= 1
                    if left == 0:
                        return
            after, after_row = before, ("hist", raw)

    def _unapplied_cut(self, k: bytes) -> int:
        """The LSN of the newest purge of ``k`` LMDB does not hold yet (-1: none)."""
        return max((lsn for lsn, lo, hi in self.unapplied_purges()
                    if lo <= k and (hi is None or k < hi)), default=-1)

    def _purged_since(self, k: bytes, at: int) -> bool:
        """Did a purge applied at or after LSN ``at`` erase ``k``?"""
        eng = self.engine
        if eng.follower is not None:
            eng.follow_state()  # (the file a writer's purge swapped in)
        st = eng.state

        def read(txn) -> bool:
            last = from_u64(txn.get(b"last_purge", None, st.meta), 0, "meta",
                            b"last_purge", st)
            return last >= at and purged_since(txn, st, at, k, k + b"\x00")
        return st.run_read(read)

    def unapplied_purges(self) -> list[tuple[int, bytes, bytes | None]]:
        """(LSN, lo, hi) of the visible purges LMDB does not hold yet: a read-only
        store's (its writer's log tail), and a writer's whose apply of one failed (the
        store turned read-only: the purge is committed, LMDB still holds the range's
        past) or is under way (a writer drains a purge before it returns, and recovery
        applies one before open returns); until LMDB holds it, the purged range's past
        stays in LMDB's history and no view may show it.  (Read-only stores alone were
        asked: a writer whose apply failed went on showing the purged values.)"""
        mt = self.engine.memtable
        if not mt.purges:  # (the common case: none here, nothing read)
            return []
        with mt.lock:  # (its purges' own index: a pass over every event here cost the
            events = [e for e in mt.purges if e.lsn < mt.published]  # backlog per call)
        out = []
        for e in events:
            rng = e.field("purge_range")
            if rng:
                out.append((e.lsn, bytes(rng[0]), None if rng[1] is None else bytes(rng[1])))
        return out

    def check_file_history(self, workspace: Any) -> None:
        """ReadOnlyError when the file history of ``workspace`` is not readable yet (see
        ``unapplied_file_records``): every reader of it asks (``at(p).files``, the CLI's
        ``files`` and ``diff``, which said "no file changed" after a crash)."""
        pending = self.unapplied_file_records(workspace.root_b)
        if pending:
            raise ReadOnlyError(
                f"the file history of workspace {workspace.root!r} is not readable from "
                f"this read-only store yet: {pending} file record(s) in the log are not "
                f"applied (the writer applies them; after a crash, a writable open's "
                f"recovery does)")

    def unapplied_file_records(self, ws_root: bytes) -> int:
        """How many records LMDB does not hold yet changed files of workspace ``ws_root``
        (file steps, watches, restores; committed or not): only a read-only store meets
        them (a writer drains before it reads file history).  The file history of those
        commits is not readable yet, and the tree may hold an unfinished transaction's
        changes (after a crash, until a writable open's recovery puts them back)."""
        eng = self.engine
        if not eng.readonly:
            return 0
        mt = eng.memtable
        with mt.lock:
            events = list(mt.events)
        return sum(1 for e in events
                   if e.type in _FILE_RECORDS and e.field("ws") == ws_root
                   or e.type == RecordType.COMMIT and e.field("files"))

    def check_file_commits_readable(self, after: int, upto: int) -> None:
        """ReadOnlyError when a commit with LSN in (``after``, ``upto``) changed files and
        LMDB does not hold it yet: only a read-only store meets one (the writer applies it
        when its commits pause); the file history of those commits is not readable, so an
        undo's plan (a dry run beside a writer) would leave their paths out."""
        eng = self.engine
        if not eng.readonly:
            return
        mt = eng.memtable
        with mt.lock:
            events = list(mt.events)
        pending = [e.txid for e in events if e.type == RecordType.COMMIT and e.field("files")
                   and after < e.lsn < upto]
        if pending:
            raise ReadOnlyError(
                f"the file history of transaction(s) {pending} is not readable from this "
                f"read-only store yet: the writer has not applied them (it does when its "
                f"commits pause); try again in a moment; nothing was changed")

    def unapplied_versions(self, k: bytes, below: int | None = None) -> list[Version]:
        """Versions of ``k`` visible but not in LMDB yet, newest first (those with LSN
        below ``below`` alone, when given): a read-only store's MemTable holds the writer's
        WAL tail (a writer's drain leaves none).  Each version's txid is looked up by its
        LSN (``MemTable.txids_at``): a map of every event here, built per key, made a
        cascade planned beside writers of its keys cost its keys times the backlog."""
        mt = self.engine.memtable
        chain = mt.versions.get(k)
        if not chain:
            return []
        upto = mt.published if below is None else min(below, mt.published)
        visible = [(lsn, v) for lsn, v in list(chain) if lsn < upto]
        if not visible:
            return []
        txids = mt.txids_at([lsn for lsn, _v in visible])
        return [Version(txids.get(lsn, -1), LSN(lsn),
                        None if v is None else unpack_value(v), v is None)
                for lsn, v in reversed(visible)]

    def at(self, point: Any) -> HistoricalView:
        self.engine.drain()
        return HistoricalView(self, self.resolve(point))

    # ---- restore points -----------------------------------------------------------------
    def restore_point(self, name: str) -> LSN:
        if not isinstance(name, str) or not name:
            raise (EmptyArgumentError if isinstance(name, str) else TypeError)(
                "a restore point name must be a non-empty str")
        # (ASCII digits alone: the command line reads [0-9]+ as a txid; "٣" or "²" are
        # names there, and were refused with the false claim that they would not be)
        if (name.isascii() and name.isdigit()) or name.startswith(("tx:", "lsn:")):
            raise ValueError(f"a restore point name must not be all digits or begin with "
                             f"'tx:' or 'lsn:' ({name!r} would read as a txid or an LSN on "
                             f"the command line)")
        size = len(utf8(name, "restore point name"))
        if size > 400:
            raise ValueError(f"a restore point name is at most 400 bytes of UTF-8 "
                             f"({size} given)")
        event = self.engine.log_event(RecordType.RESTORE_POINT,
                                      {"name": name, "ts": time.time()})
        self._durable(event, f"restore point {shown(name)}", "whether it was made")
        return LSN(event.lsn)

    def _durable(self, event: Any, what: str, unknown: str) -> None:
        """Wait for a restore point's record (or its drop's) to be durable; a failed fsync
        is CommitOutcomeUnknown, as for a commit record: the record is written, the next
        open may find it.  (A ``durable=True`` log_event raised the log's plain LogFailed,
        and the next open found the point made, pinning the history it needs, by a
        caller told it failed; or dropped, by one told it was not: audit 67.)"""
        eng = self.engine
        # (txid None: a restore point is no transaction; -1 named one no transaction has)
        eng.pipeline.durable_or_unknown(eng.journal.force_durable, event, None, what, unknown)

    def restore_points(self) -> dict[str, LSN]:
        self.engine.refresh()
        return {n: LSN(p["lsn"]) for n, p in self.engine.views.points().items()}

    def drop_restore_point(self, name: str) -> None:
        if not isinstance(name, str):  # (a list: a bare "unhashable type" TypeError)
            raise PointTypeError(f"a restore point name is a str, not "
                                 f"{type(name).__name__}", name)
        if self.engine.views.point(name) is None:
            raise UnknownPoint(f"no restore point named {shown(name)}", name)
        event = self.engine.log_event(RecordType.RESTORE_POINT,
                                      {"name": name, "drop": True, "ts": time.time()})
        self._durable(event, f"the drop of restore point {shown(name)}",
                      "whether it was dropped")
