"""The Applier: the only code that writes LMDB.

LMDB holds what the log says, nothing else.  ``apply`` puts a batch of log events (in LSN
order) into ONE LMDB transaction together with the ``applied`` LSN, so REDO from
``applied`` is idempotent; the background applier thread and recovery's REDO both call
it.  The few writes that are not log events are bookkeeping of the engine's own life
(the clean-shutdown flag, where a salvaged log starts, the history horizon and the
trimming it allows, erasure of purged keys) and live here too, so one module answers
"what writes LMDB, and when".

Invariants: events are applied in LSN order, exactly once per LMDB state (an event below
``applied`` is never applied again); the data, its history rows, the transaction log row,
action rows (and the ``owed`` index of those in flight or owed, with its stamp), 2PC rows
and the rows of reversible files (workspaces, the file steps of uncommitted transactions,
file versions, conflicts) of one event commit in the same LMDB transaction.
"""
from __future__ import annotations

import bisect
import functools
import itertools
from typing import Callable, Iterable
import operator
import struct

import msgpack

from ..codec import pack
from ..log.format import RecordType
from ..log.records import Event
from . import tables
from .lmdb_state import LmdbState, from_u64, u64

# meta row: msgpack [[lo, hi], ...]: purge ranges whose old bytes are not erased yet
ERASE_OWED = b"erase_owed"
# meta row: msgpack [[lsn, lo, hi], ...]: the newest KEEP_RECENT_PURGES purges, oldest first
RECENT_PURGES = b"recent_purges"
KEEP_RECENT_PURGES = 64
# a txns row's ``undone_by`` keeps the newest this many undos (one is what a later revert
# needs to meet as a later writer; unbounded, 300 rewinds past one row cost seconds each)
UNDONE_BY_KEPT = 8

_pack_u64 = struct.Struct(">Q").pack  # (the layout of ``u64`` and ``tables.txid_key``)
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_NONES = itertools.repeat(None)
_pack_u16 = struct.Struct(">H").pack  # (``tables.hist_prefix`` written out)

PREPARED_PREFIX = b"p:"
DECISION_PREFIX = b"d:"
_T = RecordType


class Applier:
    """Writes LMDB on behalf of the log (see the module docstring)."""

    def __init__(self, state: LmdbState) -> None:
        self.state = state
        # purges applied so far (counted once their LMDB transaction committed): a streamed
        # scan holding rows read before one must not yield what it erased
        # (``StateReader.purge_epoch``); ``on_purge`` tells read-only processes (PURGES)
        self.purges_applied = 0
        self.on_purge: "Callable[[], None] | None" = None
        self.plain = False  # whether the last ``apply`` was of plain commits alone

    # ---- log events --------------------------------------------------------------------
    def apply(self, events: list[Event], applied_end: int) -> None:
        """Apply ``events`` (LSN order) and set ``applied`` to ``applied_end``.  A purge ends
        its own LMDB transaction (what it erases must not include later writes)."""
        start = 0
        # (plain commits alone: no purge; ``plain`` tells the engine's drop of the batch)
        self.plain = dict not in map(type, map(_BODY, events))
        if self.plain:
            self._apply(events, applied_end, True)
            return
        for i, e in enumerate(events):
            if type(e._body) is not dict:  # (``e.packed_body is not None`` written out)
                continue  # a plain commit (no purge): its body stays packed (see _apply)
            e.thaw()  # (a body kept packed while it waited: decoded once, here)
            if e.type == _T.COMMIT and "purge" in e.body and i + 1 < len(events):
                self._apply(events[start:i + 1], e.end)
                start = i + 1
        self._apply(events[start:], applied_end)

    def _apply(self, events: list[Event], applied_end: int, plain: bool = False) -> None:
        """``apply`` of ``events`` in one LMDB transaction (``plain``: they are all plain
        commits, the caller looked)."""
        st = self.state
        erased: list = []  # the purges of the batch (the LMDB transaction's last attempt)

        def body(txn) -> None:
            latest: dict[bytes, bytes | None] = {}
            hist_rows, bylsn_rows, txn_rows, new_keys = _Rows(), _Rows(), _Rows(), _Rows()
            actions = tables.ActionRows()  # (each transaction's rows found alone)
            max_txid = -1
            deletes = False  # whether ``latest`` holds a delete
            sorted_latest = False  # ``latest`` is one big commit's writes, in key order
            purges = []  # commits that purge (a purge ends its batch: see ``apply``)
            undone: list[tuple[int, int]] = []  # (txid, the undo that undid it)
            # whether ``inflight`` may hold a row (exact: its count, then every put below);
            # a plain commit looks its txid up there only then (most batches: never)
            inflight_rows = txn.stat(st.inflight)["entries"] > 0
            data = st.data
            alone = None  # a bulk commit's sorted writes, put into ``data`` as they are
            last = events[-1] if events else None
            packer = None  # (the runs' Packer: see _plain_run)
            # the key order of ``latest`` (an index list) when a run found it: valid while
            # no key joins ``latest`` after (a value replaced keeps its key's place)
            data_order = None
            for e in _segments(events, plain):
                if type(e) is list:  # a run of plain commits, a column at a time
                    if packer is None:
                        packer = _new_packer()
                    was_empty = not latest
                    top, gone, wrote, order = _plain_run(
                        txn, st, e, latest, packer, inflight_rows, hist_rows, bylsn_rows,
                        txn_rows, new_keys)
                    if was_empty:  # (then ``latest`` holds the run's keys in its order)
                        data_order = order  # (a range: in key order)
                    if top > max_txid:
                        max_txid = top
                    deletes = gone or deletes
                    sorted_latest = sorted_latest and not wrote
                    continue
                if e.txid > max_txid:
                    max_txid = e.txid
                t = e.type
                if t == _T.COMMIT:
                    lsn_raw = _pack_u64(e.lsn)    # (``u64`` and ``tables.txid_key``
                    txid_raw = _pack_u64(e.txid)  # written out: two calls per event)
                    bylsn_rows.append((lsn_raw, txid_raw))
                    # a history row per key: (key, lsn) -> [txid, value before]; a key new
                    # to the store has the same row each time (a bulk load: all of them)
                    none_row = pack([e.txid, None])
                    if len(e.writes) >= SORTED_PUT_ROWS:  # (the same, a column at a time)
                        sorted_latest = not latest  # (then ``latest`` is in key order)
                        gone, alone = _history_rows(txn, st, e, latest, lsn_raw, none_row,
                                                    hist_rows, new_keys, e is last)
                        deletes = gone or deletes
                    else:
                        sorted_latest = sorted_latest and not e.writes
                        for k, v in e.writes:
                            before = latest[k] if k in latest else txn.get(k, None, data)
                            # (positional: no keyword parsing in py-lmdb, 0.16 against 0.28
                            # µs a get)
                            if before is None:
                                hist_rows.append((_pack_u16(len(k)) + k + lsn_raw, none_row))
                                new_keys.append((k, b""))
                            else:
                                hist_rows.append((_pack_u16(len(k)) + k + lsn_raw,
                                                  pack([e.txid, before])))
                            if v is None:
                                deletes = True
                        latest.update(e.writes)  # (after the loop: one event's keys are
                        # distinct)
                    packed = e._body  # (``e.packed_body`` written out: every commit)
                    if type(packed) is not dict:  # plain: no gid, actions, files or purge
                        txn_rows.append((txid_raw, tables.plain_txn_row(e, packed)))
                        if inflight_rows and txn.delete(txid_raw, db=st.inflight):
                            _commit_files(txn, st, e)  # (it logged records it undid itself)
                        continue
                    txn_rows.append((txid_raw, pack(tables.txn_row(e))))
                    if "reverts" in e.body:  # an undo: its txids learn who undid them
                        undone.extend((t, e.txid) for t in e.body["reverts"])
                    if "purge" in e.body:
                        purges.append(e)
                    gid = e.body.get("gid")
                    if gid:
                        self._decide(txn, gid, b"commit")
                    if txn.delete(txid_raw, db=st.inflight):
                        _commit_files(txn, st, e)  # (only a txn that logged records)
                    if _ACTION_FIELDS.isdisjoint(e.body):
                        continue  # a commit that names no action changes no action row
                elif t in (_T.ABORT, _T.ROLLBACK_PREPARED):
                    if txn.delete(tables.txid_key(e.txid), db=st.inflight):
                        # it logged intents (or file steps): its action rows outlive it,
                        # and no commit row leads retention to them (``aended``)
                        txn.put(u64(e.lsn), tables.txid_key(e.txid), db=st.aended)
                    if t == _T.ROLLBACK_PREPARED and e.body.get("gid"):
                        self._decide(txn, e.body["gid"], b"abort")
                elif t == _T.ACTION_INTENT:
                    txn.put(tables.txid_key(e.txid), b"", db=st.inflight)
                    inflight_rows = True
                elif t == _T.PREPARE:
                    row = dict(e.body, w=[[k, v] for k, v in e.writes])
                    txn.put(PREPARED_PREFIX + str(e.body["gid"]).encode(), pack(row),
                            db=st.twophase)
                elif t in _FILE_EVENTS:
                    _apply_file_event(txn, st, e)
                    inflight_rows = True  # (FILE_STEPS and WATCH_BEGIN put one)
                elif t == _T.RESTORE_POINT:
                    name = str(e.body.get("name", "")).encode("utf-8")
                    if e.body.get("drop"):
                        txn.delete(name, db=st.points)
                    else:
                        txn.put(name, pack({"lsn": e.lsn, "ts": e.body.get("ts", 0.0)}),
                                db=st.points)
                if t in _ACTION_EVENTS:
                    for row in tables.action_changes(e, _row_getter(txn, st, actions),
                                                     _rows_of_txid(txn, st, actions)):
                        actions[row["id"]] = row
            if alone is not None:  # (then ``latest`` is empty: see _history_rows)
                _put_in_order(txn, st.data, lambda: alone, alone[0][0])
                _put_rows(txn, st.hist, hist_rows)
            elif latest:
                if deletes:
                    _put_rows(txn, st.data, [(k, v) for k, v in latest.items()
                                             if v is not None])
                    for k, v in latest.items():
                        if v is None:
                            txn.delete(k, db=st.data)
                elif sorted_latest:  # (no list, no sort: dict items in key order)
                    _put_in_order(txn, st.data, latest.items, next(iter(latest)))
                else:  # (columns: no tuple per row for the collector: see _Rows)
                    _put_columns(txn, st.data, list(latest), list(latest.values()),
                                 order=(data_order if data_order is not None
                                        and len(data_order) == len(latest) else None))
                _put_rows(txn, st.hist, hist_rows)
            if bylsn_rows:  # every commit, with or without key writes (actions only)
                txn.cursor(db=st.bylsn).putmulti(bylsn_rows.rows())
            if txn_rows:
                txn.cursor(db=st.txns).putmulti(txn_rows.rows())
            for t, by in undone:  # (after the rows: one may be of this batch)
                _note_undone(txn, st, t, by)
            if new_keys:
                _put_rows(txn, st.hkeys, new_keys, overwrite=False)
            if actions:
                txn.cursor(db=st.actions).putmulti(
                    [(aid.encode(), pack(row)) for aid, row in actions.items()])
                owed_db = st.owed  # (the index of rows in flight or owed, kept exact in
                for aid, row in actions.items():  # the same LMDB transaction)
                    if row.get("state") in tables.OWED_INDEX_STATES:
                        txn.put(aid.encode(), b"", db=owed_db)
                    else:
                        txn.delete(aid.encode(), db=owed_db)
            for e in purges:
                _erase_range(txn, st, e.body["purge_range"])
                txn.put(b"last_purge", u64(e.lsn), db=st.meta)  # for conflict checks
                # and which ranges the newest purges erased, for old snapshots' reads
                # (engine.snapshot: a read outside them is still exact)
                raw = txn.get(RECENT_PURGES, db=st.meta)
                recent = (_meta_row(raw, RECENT_PURGES, st) if raw else []
                          )[-(KEEP_RECENT_PURGES - 1):]
                recent.append([e.lsn] + list(e.body["purge_range"]))
                txn.put(RECENT_PURGES, pack(recent), db=st.meta)
                # the erasure of its old bytes (WAL segments, LMDB free pages, quarantine)
                # is owed until a compacting checkpoint is done: a crash before it must
                # not forget it (Engine.erase_old_bytes, run at the next open)
                raw = txn.get(ERASE_OWED, db=st.meta)
                owed = _meta_row(raw, ERASE_OWED, st) if raw else []
                owed.append(list(e.body["purge_range"]))
                txn.put(ERASE_OWED, pack(owed), db=st.meta)
            _advance_owed_stamp(txn, st, applied_end)
            txn.put(b"applied", u64(applied_end), db=st.meta)
            if max_txid >= 0 and from_u64(txn.get(b"next_txid", db=st.meta), 0, "meta",
                                          b"next_txid", st) <= max_txid:
                txn.put(b"next_txid", u64(max_txid + 1), db=st.meta)
            erased[:] = purges

        st.write(body)
        if erased:
            self.purges_applied += len(erased)
            if self.on_purge is not None:
                self.on_purge()

    def _decide(self, txn, gid: str, decision: bytes) -> None:
        st = self.state
        txn.delete(PREPARED_PREFIX + gid.encode(), db=st.twophase)
        txn.put(DECISION_PREFIX + gid.encode(), decision, db=st.twophase)

    # ---- the engine's own bookkeeping ---------------------------------------------------
    def set_meta(self, name: bytes, value: int, **more: int) -> None:
        """Set meta ``name`` (and each of ``more``, by its str name) in one LMDB commit."""
        pairs = [(name, value)] + [(k.encode(), v) for k, v in more.items()]
        # (the map size noted again with a new ``txid_reserved``: lmdb_state.MAP_SIZE_AT)
        note = any(k == b"txid_reserved" for k, _v in pairs)

        def put(txn) -> None:
            for k, v in pairs:
                if k == b"applied":  # (no event: the owed index stays as exact as it was)
                    _advance_owed_stamp(txn, self.state, v)
                txn.put(k, u64(v), db=self.state.meta)
            if note:
                self.state.put_map_note(txn)
        self.state.write(put)

    def build_owed_index(self) -> int:
        """Build the ``owed`` table from every action row (one scan), in one LMDB
        transaction with its stamp (``tables.OWED_STAMP``): for a store whose index is not
        exact (``owed_index_current``: written before the table, or since by a walstore
        without it).  A writable open calls it once; returns the number of ids indexed."""
        st = self.state
        count = [0]

        def body(txn) -> None:
            count[0] = 0
            txn.drop(st.owed, delete=False)
            cur = txn.cursor(db=st.actions)
            puts = []
            for k, v in cur.iternext():
                row = tables.unpack_row(v, "actions", k, st.data_file)
                if row.get("state") in tables.OWED_INDEX_STATES:
                    puts.append((bytes(k), b""))
            if puts:
                txn.cursor(db=st.owed).putmulti(puts)
            count[0] = len(puts)
            applied = txn.get(b"applied", None, st.meta)
            if applied is not None:
                txn.put(tables.OWED_STAMP, applied, db=st.owed)
        st.write(body)
        return count[0]

    def erased(self, ranges: list) -> None:
        """The erasure owed for these purge ranges is done (see ``ERASE_OWED``)."""
        st = self.state

        def put(txn) -> None:
            raw = txn.get(ERASE_OWED, db=st.meta)
            left = [r for r in (_meta_row(raw, ERASE_OWED, st) if raw else [])
                    if r not in ranges]
            if left:
                txn.put(ERASE_OWED, pack(left), db=st.meta)
            else:
                txn.delete(ERASE_OWED, db=st.meta)
        st.write(put)

    def trim_history(self, commits: list[tuple[int, int]], horizon: int) -> None:
        """Delete the history of ``commits`` [(lsn, txid)] below ``horizon`` (each key keeps
        its newest version below the horizon, so views at or after it stay exact, unless
        it is a deletion nothing follows: then none, and the key leaves ``hkeys``) and the
        rows of their settled actions."""
        st = self.state

        trimmed = {txid for _lsn, txid in commits}

        def retained(txid) -> bool:
            return (isinstance(txid, int) and txid not in trimmed
                    and txn_ref[0].get(tables.txid_key(txid), db=st.txns) is not None)
        txn_ref: list = [None]

        def body(txn) -> None:
            txn_ref[0] = txn
            for lsn, txid in commits:
                tkey = tables.txid_key(txid)
                raw = txn.get(tkey, db=st.txns)
                row = ({"w": []} if raw is None
                       else tables.unpack_row(raw, "txns", tkey, st.data_file))
                for key, _unused in row.get("w", []):
                    _drop_older_versions(txn, st, key, lsn)  # (an earlier trim's survivor)
                    newer = _next_version(txn, st, key, lsn)
                    if newer is not None and newer < horizon:
                        txn.delete(tables.hist_key(key, lsn), db=st.hist)
                    elif newer is None and txn.get(key, db=st.data) is None:
                        # the newest version, a deletion, below the horizon: the key is
                        # absent at every retained point, and a read as of one finds that
                        # with no version as with this one (no version at or after the
                        # point: the data row, absent); kept, every short-lived key left
                        # a row here and in ``hkeys`` for good (a store of scratch keys
                        # grew without bound under retention)
                        txn.delete(tables.hist_key(key, lsn), db=st.hist)
                        txn.delete(key, db=st.hkeys)
                # every action row of the transaction, not only those its COMMIT names:
                # the ones a rollback to a savepoint took out (compensated before the
                # commit) share its id prefix and are found only so
                if _trim_actions(txn, st, txid, retained):
                    txn.put(u64(lsn), tables.txid_key(txid), db=st.aended)  # (revisited)
                for aid in row.get("compensate", ()):  # an undo trimmed: the rows it kept
                    araw = txn.get(str(aid).encode(), db=st.actions)
                    if araw is None:
                        continue
                    own = int(str(aid).partition(".")[0] or -1)
                    arow = tables.unpack_row(araw, "actions", str(aid).encode(), st.data_file)
                    if arow.get("state") in tables.FINAL_STATES and not retained(own):
                        txn.delete(str(aid).encode(), db=st.actions)
                _trim_files(txn, st, lsn, txid, horizon)
                txn.delete(tables.txid_key(txid), db=st.txns)
                txn.delete(u64(lsn), db=st.bylsn)
        st.write(body)

    def trim_ended_actions(self, start: int, horizon: int, batch: int) -> int | None:
        """Delete the settled action rows of the transactions ``aended`` lists from LSN
        ``start`` to ``horizon`` (rolled back, or trimmed while a row was still owed or
        kept for an undo), at most ``batch`` transactions in one LMDB transaction; a
        transaction leaves the list once no row of it is left.  Returns where the next
        batch starts (None: the list is done below ``horizon``)."""
        st = self.state
        if next(iter(st.scan(u64(start), u64(horizon), db="aended")), None) is None:
            return None  # (most checkpoints: nothing listed, no LMDB commit)
        nxt: list = [None]

        def retained(txid) -> bool:
            return (isinstance(txid, int)
                    and txn_ref[0].get(tables.txid_key(txid), db=st.txns) is not None)
        txn_ref: list = [None]

        def body(txn) -> None:
            txn_ref[0], nxt[0] = txn, None
            done, seen = [], 0
            for raw, txid_raw in _rows(txn, st.aended, u64(start), u64(horizon)):
                if seen >= batch:
                    nxt[0] = from_u64(raw, 0, "aended", None, st)
                    break
                seen += 1
                txid = from_u64(txid_raw, 0, "aended", raw, st)
                if not _trim_actions(txn, st, txid, retained):
                    done.append(raw)
            for raw in done:
                txn.delete(raw, db=st.aended)
        st.write(body)
        return nxt[0]


_ACTION_FIELDS = frozenset({"actions", "crossed", "compensate", "redo", "unredo"})  # tables.action_changes
_FILE_EVENTS = frozenset({_T.WORKSPACE, _T.FILE_STEPS, _T.WATCH_BEGIN, _T.WATCH_END,
                          _T.FILE_RESTORED, _T.FILE_CONFLICT})


def _history_rows(txn, st, e: Event, latest: dict, lsn_raw: bytes, none_row: bytes,
                  hist_rows: list, new_keys: list, last: bool) -> tuple[bool, list | None]:
    """The history rows and new keys of a commit's many writes (what the per-key loop in
    ``Applier._apply`` makes, built column by column in C loops, in key order); whether
    it deletes; and its writes in key order when the caller is to put them into ``data``
    itself (``last``: the batch's last event, nothing in ``latest`` and no delete: a
    bulk load), else None and ``latest`` updated.  The rows go straight to their tables
    (order does not matter there: distinct (key, LSN) rows, and new-key marks put
    without overwrite) when they are in table order already — the keys all one length,
    as a bulk load's usually are: the history table orders by length first — through
    lazy ``zip``s, so no list of a row per key is built (each a tuple the garbage
    collector would scan); else they join ``hist_rows`` / ``new_keys`` for ``_put_rows``.

    Each pass over the sorted writes touches 100,000 objects in an order unrelated to
    where they lie in memory (~15-40 ms each for a 100,000-key load, cache misses): what
    needs no order (deletes, key lengths) is read before the sort, a key range LMDB holds
    nothing in is not looked up key by key, and a bulk load's writes go to ``data`` from
    the sorted list, not through ``latest``."""
    deletes = None in map(_second, e.writes)  # (before the sort: in memory order)
    one_length = len(set(map(len, map(_first, e.writes)))) == 1
    writes = sorted(e.writes, key=_first)
    keys = list(map(_first, writes))
    data = st.data
    if latest:
        befores = [latest[k] if k in latest else txn.get(k, None, data) for k in keys]
    else:
        cur = txn.cursor(db=data)
        if not cur.set_range(keys[0]) or cur.key() > keys[-1]:
            befores = None  # nothing stored in the keys' range: every key is new
        else:
            befores = list(map(txn.get, keys, _NONES, itertools.repeat(data)))
    txid = e.txid
    if one_length:  # (one length: history keys sort as the keys do, one prefix)
        prefix = _pack_u16(len(keys[0]))
        hkeys = list(map(b"".join, zip(itertools.repeat(prefix), keys,
                                       itertools.repeat(lsn_raw))))
    else:
        hkeys = [_pack_u16(len(k)) + k + lsn_raw for k in keys]
    if befores is None:
        hvals = fresh = None
    else:
        hvals = [none_row if b is None else pack([txid, b]) for b in befores]
        fresh = (list(itertools.compress(keys, map(operator.is_, befores, _NONES)))
                 if None in befores else [])
    if one_length:
        _put_in_order(txn, st.hist, (lambda: zip(hkeys, itertools.repeat(none_row)))
                      if hvals is None else (lambda: zip(hkeys, hvals)), hkeys[0])
        if fresh is None:
            fresh = keys
        if fresh:
            _put_in_order(txn, st.hkeys, lambda: zip(fresh, itertools.repeat(b"")), fresh[0],
                          overwrite=False)
    else:
        hist_rows.extend(zip(hkeys, itertools.repeat(none_row) if hvals is None else hvals))
        new_keys.extend(zip(keys if fresh is None else fresh, itertools.repeat(b"")))
    if last and not latest and not deletes:
        return False, writes
    latest.update(writes)  # (one event's keys are distinct)
    return deletes, None


def _put_in_order(txn, db, rows, first: bytes, overwrite: bool = True) -> None:
    """Put the rows ``rows()`` yields (in key order, distinct keys, ``first`` the first
    key) into ``db``: appended (MDB_APPEND) when they all sort after the table's last key,
    else put one by one.  Without ``overwrite`` a repeated key is skipped, appended or
    not; with it, an append that fell short (a row that did not sort after the one
    before: LMDB compares keys as Python does, so only a caller's bug) puts them all
    again, ``rows()`` called anew."""
    cur = txn.cursor(db=db)
    if not cur.last() or cur.key() < first:
        _consumed, added = cur.putmulti(rows(), overwrite=overwrite, append=True)
        if added == _consumed or not overwrite:
            return
    cur.putmulti(rows(), overwrite=overwrite)


SORTED_PUT_ROWS = 256  # from this many rows a batch is put in key order (see _put_rows)

_BODY = operator.attrgetter("_body")
_WRITES = operator.attrgetter("writes")
_LSN = operator.attrgetter("lsn")
_TXID = operator.attrgetter("txid")
_END = operator.attrgetter("end")
_REST = operator.itemgetter(slice(1, None))
# a plain body's fixmap header (n entries) -> the header of the ``txns`` row's (n + 3:
# ``lsn``, ``end``, ``w`` join it, as in ``tables.plain_txn_row``)
_FIXMAP_HEADS = {0x80 + n: bytes((0x83 + n,)) for n in range(13)}
_LSN_KEY = b"\xa3lsn"  # ("lsn" packed: a fixstr of 3)
# a Packer as ``codec.pack``'s (the same bytes), one per LMDB transaction of the applier:
# its bound ``pack`` goes into C ``map``s, and its buffer goes with it
_new_packer = functools.partial(msgpack.Packer, use_bin_type=True, datetime=False)


def _segments(events: list, plain: bool = False) -> "Iterable":
    """``events`` in order, each stretch of consecutive plain commits (body packed: no
    gid, actions, files or purge; fewer than SORTED_PUT_ROWS writes) as one list, for
    ``_plain_run``.  A batch of nothing else (the usual one) is one list, found in C."""
    if not events:
        return ()
    if ((plain or dict not in map(type, map(_BODY, events)))
            and max(map(len, map(_WRITES, events))) < SORTED_PUT_ROWS):
        return (events if type(events) is list else list(events),)
    return _mixed_segments(events)


def _mixed_segments(events):
    run: list = []
    for e in events:
        if type(e._body) is not dict and len(e.writes) < SORTED_PUT_ROWS:
            run.append(e)
            continue
        if run:
            yield run
            run = []
        yield e
    if run:
        yield run


# msgpack's form of a non-negative int by its bit length: (marker, bytes that follow;
# 0-7 bits: a positive fixint, the int itself)
_UINT_FORMS = ((b"", 1),) * 8 + ((b"\xcc", 1),) + ((b"\xcd", 2),) * 8 + (
    (b"\xce", 4),) * 16 + ((b"\xcf", 8),) * 32
# the "w" of a txns row of one write whose key (bytes) is n < 256 long, up to the key:
# "w", an array of one [key, None] pair, the key's bin 8 header
_ONE_W_HEADS = tuple(b"\xa1w\x91\x92\xc4" + bytes((n,)) for n in range(256))
_END_KEY = b"\xa3end"
_LEN_U16 = tuple(map(_pack_u16, range(1024)))  # (``_pack_u16`` of a short key's length)
_NIL = b"\xc0"


_UINT_LIMITS = (1 << 7, 1 << 8, 1 << 16, 1 << 32)  # where msgpack's form of an int changes


def _joined_rows(run, lsns, keys, longest, heads, bodies, txid_raws, txn_rows) -> bool:
    """The ``txns`` rows of a run of one-write plain commits joined from their parts in
    one C ``join`` each, no msgpack call: the body's fixmap (``heads``, then the body),
    ``lsn`` and ``end`` packed as msgpack packs them (the run cut where their form
    changes: both rise with the LSN), and a "w" of the one key, under 256 bytes long
    (else False: not done, the caller packs them)."""
    ends = list(map(_END, run))
    if lsns[0] < 0 or ends[-1] >= 1 << 64 or longest >= 256:
        return False
    n = len(run)
    cuts = sorted({0, n}.union(*(map(bisect.bisect_left, (lsns, ends),
                                     (t, t)) for t in _UINT_LIMITS)))
    rep = itertools.repeat
    rows: list = []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        lmark, lsize = _UINT_FORMS[lsns[a].bit_length()]
        emark, esize = _UINT_FORMS[ends[a].bit_length()]
        part = (lambda x: x) if (a, b) == (0, n) else operator.itemgetter(slice(a, b))
        rows += map(b"".join, zip(
            part(heads), map(_REST, part(bodies)), rep(_LSN_KEY + lmark),
            map(int.to_bytes, part(lsns), rep(lsize), rep("big")), rep(_END_KEY + emark),
            map(int.to_bytes, part(ends), rep(esize), rep("big")),
            map(_ONE_W_HEADS.__getitem__, map(len, part(keys))), part(keys), rep(_NIL)))
    txn_rows.add(txid_raws, rows)
    return True


def _plain_run(txn, st, run: list, latest: dict, packer, inflight_rows: bool,
               hist_rows: list, bylsn_rows: list, txn_rows: list, new_keys: list
               ) -> tuple[int, bool, bool, list | None]:
    """The rows of a run of plain commits (``_segments``), as ``Applier._apply``'s loop
    makes them event by event, built a column at a time in C ``map``s: the ``bylsn``
    row, a history row per write ((key, lsn) -> [txid, value before]) and a new-key mark
    for a key the store did not hold, the ``txns`` row (``tables.plain_txn_row``'s bytes:
    the packed body's fixmap joined by ``lsn``, ``end`` and ``w``), ``latest`` updated;
    the ``inflight`` row's delete (and the files' rows) when that table may hold one.
    Returns (the highest txid, whether a write deletes, whether any write was made, the
    order of its keys when it sorted them, else None).
    A single-put commit cost the applier ~44k instructions event by event (PROFILE.md,
    round 33)."""
    lsns = list(map(_LSN, run))
    txids = list(map(_TXID, run))
    lsn_raws = list(map(_pack_u64, lsns))
    txid_raws = list(map(_pack_u64, txids))
    bylsn_rows.add(lsn_raws, txid_raws)
    order = None  # the key order of the run's keys, when one sort serves three tables
    ws = list(map(_WRITES, run))
    pairs = list(itertools.chain.from_iterable(ws))
    deletes = one = False
    keys: list = []
    longest = 0
    if pairs:
        keys = list(map(_first, pairs))
        longest = max(map(len, keys))
        counts = list(map(len, ws))
        one = counts.count(1) == len(counts)  # one write each (the common commit)
        if one:
            lsn_of, txid_of = lsn_raws, txids
        else:
            lsn_of = list(itertools.chain.from_iterable(
                map(itertools.repeat, lsn_raws, counts)))
            txid_of = list(itertools.chain.from_iterable(
                map(itertools.repeat, txids, counts)))
        data = st.data
        distinct = len(set(keys)) == len(keys)
        if distinct and len(keys) >= SORTED_PUT_ROWS and min(map(len, keys)) == longest:
            # keys of one length, distinct: their order is that of their history keys
            # (one prefix), of their data rows and of their new-key marks (a range:
            # in order already)
            order = (range(len(keys))
                     if all(map(operator.lt, keys, itertools.islice(keys, 1, None)))
                     else sorted(range(len(keys)), key=keys.__getitem__))
        if distinct and latest.keys().isdisjoint(keys):
            cur = txn.cursor(db=data)
            if not cur.set_range(min(keys)) or cur.key() > max(keys):
                befores = None  # nothing stored in the keys' range: every key is new
            else:
                befores = list(map(txn.get, keys, _NONES, itertools.repeat(data)))
        else:  # a key written again: each write's value before is the one before it
            befores = []
            for k, v in pairs:
                befores.append(latest[k] if k in latest else txn.get(k, None, data))
                latest[k] = v
        hist_rows.add(list(map(b"".join, zip(
            map((_LEN_U16.__getitem__ if longest < len(_LEN_U16) else _pack_u16),
                map(len, keys)),
            keys, lsn_of))),
                      list(map(packer.pack, zip(txid_of, _NONES if befores is None
                                                else befores))), order)
        fresh = (keys if befores is None else
                 list(itertools.compress(keys, map(operator.is_, befores, _NONES))))
        new_keys.add(fresh, [b""] * len(fresh), order if befores is None else None)
        # (a packed value is never empty: only a delete is false)
        deletes = not all(map(_second, pairs)) and None in map(_second, pairs)
        latest.update(pairs)  # (in LSN order: the newest write of a key stays)
    bodies = list(map(_BODY, run))
    heads = list(map(_FIXMAP_HEADS.get, map(_first, bodies)))
    if None in heads:  # (never: a plain body is a fixmap of at most four fields)
        txn_rows.add(txid_raws, list(map(tables.plain_txn_row, run, bodies)))
    elif one and _joined_rows(run, lsns, keys, longest, heads, bodies, txid_raws,
                              txn_rows):
        pass
    else:
        wlists = (zip(zip(keys, _NONES)) if one else  # ((key, None),) each
                  map(tuple, map(zip, map(map, itertools.repeat(_first), ws),
                                 itertools.repeat(_NONES))))
        # (lsn, "end", end, "w", w) packed is a fixarray of 5 then what follows "lsn" in
        # the row's map: its header byte goes, "lsn" comes in front
        tails = map(packer.pack, zip(lsns, itertools.repeat("end"), map(_END, run),
                                     itertools.repeat("w"), wlists))
        txn_rows.add(txid_raws, list(map(b"".join, zip(
            heads, map(_REST, bodies), itertools.repeat(_LSN_KEY), map(_REST, tails)))))
    if inflight_rows:
        inflight = st.inflight
        for e, raw in zip(run, txid_raws):
            if txn.delete(raw, db=inflight):
                _commit_files(txn, st, e)  # (it logged records it undid itself)
    return max(txids), deletes, bool(pairs), order


def _put_columns(txn, db, keys: list, vals: list, overwrite: bool = True,
                 order: list | None = None) -> None:
    """``_put_rows`` of the rows ``zip(keys, vals)`` (the same puts, in the same order),
    sorted by an index list, the rows made as LMDB takes them: no list of a tuple per
    row survives to be scanned by the garbage collector.  ``order``: that index list,
    found already (a ``range``: the keys are in order), exact: with ``overwrite=False``
    an append out of order would skip its row."""
    if len(keys) < SORTED_PUT_ROWS:
        txn.cursor(db=db).putmulti(zip(keys, vals), overwrite=overwrite)
        return
    if type(order) is range or (
            order is None and all(map(operator.lt, keys, itertools.islice(keys, 1, None)))):
        # in key order already (keys written in rising order, a usual load): no sort
        _put_in_order(txn, db, lambda: zip(keys, vals), keys[0], overwrite)
        return
    if order is None:
        order = sorted(range(len(keys)), key=keys.__getitem__)  # (stable, as sorted(rows))
    _put_in_order(txn, db, lambda: zip(map(keys.__getitem__, order),
                                       map(vals.__getitem__, order)),
                  keys[order[0]], overwrite)


class _Rows:
    """The rows of one table an apply batch gathers: (key, value) tuples from the loop
    over events, and whole columns (a list of keys, a list of values) from the runs of
    plain commits (``_plain_run``), kept as columns: a batch of 20,000 single-put commits
    kept ~80,000 row tuples alive until its puts, and the collections they set off
    (full ones, over every event waiting in the MemTable) cost ~20% of the apply."""

    __slots__ = ("tuples", "cols", "append", "extend")

    def __init__(self) -> None:
        self.tuples: list = []
        self.cols: list = []
        self.append = self.tuples.append
        self.extend = self.tuples.extend

    def add(self, keys: list, vals: list, order: list | None = None) -> None:
        """A column of keys and one of values (``order``: their key order, if known)."""
        self.cols.append((keys, vals, order))

    def __bool__(self) -> bool:
        return bool(self.tuples) or any(k for k, _v, _o in self.cols)

    def __len__(self) -> int:
        return len(self.tuples) + sum(len(k) for k, _v, _o in self.cols)

    def rows(self):
        """Every row, those of the loop first (the tables' keys are distinct, but in
        ``hkeys``, put without overwrite: a key there twice is one row either way)."""
        if not self.cols:
            return self.tuples
        return itertools.chain(self.tuples, *(zip(k, v) for k, v, _o in self.cols))

    def columns(self) -> tuple[list, list, list | None]:
        """(keys, values, their key order or None)."""
        if not self.tuples and len(self.cols) == 1:
            return self.cols[0]
        keys = list(map(_first, self.tuples))
        vals = list(map(_second, self.tuples))
        for k, v, _o in self.cols:
            keys += k
            vals += v
        return keys, vals, None


def _put_rows(txn, db, rows, overwrite: bool = True) -> None:
    """Put (key, value) ``rows`` (distinct keys, but with ``overwrite=False``) into ``db``.
    Many rows go in key order, and appended (MDB_APPEND: no search, full pages) when they
    all sort after the table's last key, as a bulk load into a new store or a new key
    range does: 100,000 rows into three tables, 0.40 s unsorted, 0.30 s sorted (the sort
    included), 0.28 s appended."""
    if type(rows) is _Rows:
        if not rows.cols:
            rows = rows.tuples
        else:
            keys, vals, order = rows.columns()
            _put_columns(txn, db, keys, vals, overwrite, order)
            return
    if len(rows) < SORTED_PUT_ROWS:
        txn.cursor(db=db).putmulti(rows, overwrite=overwrite)
        return
    rows = sorted(rows, key=_first)
    _put_in_order(txn, db, lambda: rows, rows[0][0], overwrite)


def _apply_file_event(txn, st, e: Event) -> None:
    """Reversible files: registrations, write-ahead steps, their undo, conflicts (see
    :mod:`walstore.engine.tables` for the rows).  Rows are put at once, so a COMMIT later
    in the same batch finds its transaction's steps."""
    t, b = e.type, e.body
    if t == _T.WORKSPACE:
        root = b.get("root")
        old = txn.get(root, db=st.workspaces)
        old = None if old is None else tables.unpack_row(old, "workspaces", root, st.data_file)
        txn.put(root, pack(tables.workspace_row(e, old)), db=st.workspaces)
    elif t in (_T.FILE_STEPS, _T.WATCH_BEGIN):
        txn.put(tables.txid_key(e.txid), b"", db=st.inflight)
        txn.put(tables.fsteps_key(e.txid, e.lsn), pack(tables.fsteps_row(e)), db=st.fsteps)
        if t == _T.WATCH_BEGIN:
            ws = b.get("ws")
            old = txn.get(ws, db=st.workspaces)
            old = None if old is None else tables.unpack_row(old, "workspaces", ws,
                                                             st.data_file)
            txn.put(ws, pack(tables.workspace_row(e, old)), db=st.workspaces)
    elif t == _T.WATCH_END:  # its changes are FILE_STEPS rows now: the manifest row goes
        txn.delete(tables.fsteps_key(e.txid, int(b.get("begin", -1))), db=st.fsteps)
    elif t == _T.FILE_RESTORED:
        for lsn in b.get("effects") or ():
            key = tables.fsteps_key(e.txid, int(lsn))
            if b.get("held"):
                raw = txn.get(key, db=st.fsteps)
                if raw is not None:
                    row = tables.unpack_row(raw, "fsteps", key, st.data_file)
                    txn.put(key, pack(dict(row, held=True)), db=st.fsteps)
            else:
                txn.delete(key, db=st.fsteps)
    elif t == _T.FILE_CONFLICT:
        txn.put(u64(e.lsn), pack({"tx": e.txid, "ws": b.get("ws"), "effect": b.get("effect"),
                                  "conflict": b.get("conflict"), "ts": b.get("ts", 0.0)}),
                db=st.fconflicts)


def _commit_files(txn, st, e: Event) -> None:
    """A COMMIT: the steps of its live file effects (``files``: their LSNs) become the
    versions of the paths they changed; every ``fsteps`` row of the transaction goes (the
    effects it undid itself were restored before it committed)."""
    prefix = tables.fsteps_prefix(e.txid)
    cur = txn.cursor(db=st.fsteps)
    if not cur.set_range(prefix) or not cur.key().startswith(prefix):
        return
    live = {int(x) for x in e.body.get("files") or ()}
    rows, doomed = [], []
    while cur.key().startswith(prefix):
        doomed.append(cur.key())
        if tables.split_fsteps_key(cur.key())[1] in live:
            rows.append(tables.unpack_row(cur.value(), "fsteps", cur.key(), st.data_file))
        if not cur.next():
            break
    began = tables.steps_began(rows)
    for (ws, path), (before, after) in tables.collapse_steps(rows).items():
        txn.put(tables.fversion_key(ws, path, e.lsn), pack([e.txid, before, after]),
                db=st.fversions)
        since = began.get((ws, path))
        txn.put(tables.fchange_key(e.txid, ws, path),
                b"" if since is None else u64(since), db=st.fchanges)
    for k in doomed:
        txn.delete(k, db=st.fsteps)


_ACTION_EVENTS = frozenset({_T.ACTION_INTENT, _T.ACTION_RESULT, _T.COMMIT, _T.ABORT,
                            _T.ROLLBACK_PREPARED, _T.COMPENSATED})


def owed_index_current(txn, st) -> bool:
    """Is the ``owed`` table exact in ``txn`` (its stamp is ``meta`` ``applied``: every
    action row in flight, pending or failed is in it)?  False for a store without the
    table (an older store read by a read-only process) or one written without keeping it
    (before the table existed, or since, by an older walstore): readers then scan every
    action row."""
    if st.owed is None:
        return False
    return txn.get(tables.OWED_STAMP, None, st.owed) == txn.get(b"applied", None, st.meta)


def _advance_owed_stamp(txn, st, applied_end: int) -> None:
    """In the LMDB transaction that moves ``applied`` to ``applied_end``, before it does:
    the ``owed`` table's stamp follows when the table was exact (its stamp was the old
    ``applied``; this transaction kept it), else it stays behind (not exact: built at the
    next writable open)."""
    if owed_index_current(txn, st):
        txn.put(tables.OWED_STAMP, u64(applied_end), db=st.owed)


def _row_getter(txn, st, pending: tables.ActionRows):
    def get(aid: str) -> dict | None:
        if aid in pending:
            return pending[aid]
        key = aid.encode()
        raw = txn.get(key, db=st.actions)
        return None if raw is None else tables.unpack_row(raw, "actions", key, st.data_file)
    return get


def _rows_of_txid(txn, st, pending: tables.ActionRows):
    def rows(txid: int) -> list[dict]:
        prefix = tables.action_prefix(txid)
        found = {}
        cur = txn.cursor(db=st.actions)
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                key = cur.key()
                found[key.decode()] = tables.unpack_row(cur.value(), "actions", key,
                                                        st.data_file)
                if not cur.next():
                    break
        for aid, row in pending.items_of(txid):
            found[aid] = row
        return list(found.values())
    return rows


def _trim_actions(txn, st, txid: int, retained) -> bool:
    """Delete the settled action rows of ``txid`` (below the horizon: its commit trimmed,
    or its rollback); whether any row of it is left.  Settled: ``committed``,
    ``resolved``, or ``compensated`` unless by an undo still ``retained`` (that row stays
    while the undo can be reverted, which marks it needs-redo), ``committed`` unless
    redone by hand after a forced revert still ``retained`` marked it needs-redo (that
    revert's undo compensates it).  An action still owed (in flight, pending, failed,
    needs-redo) keeps its row."""
    prefix = tables.action_prefix(txid)
    doomed, left = [], False
    for k, v in _rows(txn, st.actions, prefix, None):
        if not k.startswith(prefix):
            break
        arow = tables.unpack_row(v, "actions", k, st.data_file)
        state = arow.get("state")
        if (state == tables.RESOLVED
                or (state == tables.COMMITTED and not retained(arow.get("marked_by")))
                or (state == tables.COMPENSATED and not retained(arow.get("undone_by")))):
            doomed.append(k)
        else:
            left = True
    for k in doomed:
        txn.delete(k, db=st.actions)
    return left


def _trim_files(txn, st, lsn: int, txid: int, horizon: int) -> None:
    """The file history of a trimmed commit: its ``fchanges`` rows, and every version of
    the paths it changed below the horizon except the newest (which views at or after
    the horizon read), that one too when it left the path absent and nothing follows."""
    prefix = tables.fsteps_prefix(txid)  # fchanges keys start with the txid too
    cur = txn.cursor(db=st.fchanges)
    doomed = []
    if cur.set_range(prefix):
        while cur.key().startswith(prefix):
            doomed.append(cur.key())
            if not cur.next():
                break
    for raw in doomed:
        _t, ws, path = tables.split_fchange_key(raw)
        vprefix = tables.fpath_prefix(ws, path)
        below = [k for k, _v in _rows(txn, st.fversions, vprefix,
                                      tables.fversion_key(ws, path, horizon))
                 if tables.is_fversion_of(k, vprefix)]
        for k in below[:-1]:  # only the newest below the horizon is ever read again
            txn.delete(k, db=st.fversions)
        if below and _left_absent(txn, st, below[-1], vprefix):
            txn.delete(below[-1], db=st.fversions)
        txn.delete(raw, db=st.fchanges)


def _left_absent(txn, st, newest_below: bytes, vprefix: bytes) -> bool:
    """Did the newest version of a path below the horizon, ``newest_below``, leave it
    absent, with no version after it?  Then no retained point needs it: the path was
    absent at all of them, which a view reads as it reads a path walstore never changed
    (as it is now: absent, unless something outside walstore made it since); kept, every
    short-lived file left a row for good (a workspace of scratch files grew the store
    without bound under retention)."""
    cur = txn.cursor(db=st.fversions)
    if cur.set_key(newest_below) and cur.next() and tables.is_fversion_of(cur.key(), vprefix):
        return False
    raw = txn.get(newest_below, db=st.fversions)
    after = (tables.unpack_row(raw, "fversions", newest_below, st.data_file)[2]
             if raw is not None else None)
    return isinstance(after, (list, tuple)) and tuple(after) == (tables.ABSENT_ROW,)


def _drop_older_versions(txn, st, key: bytes, lsn: int) -> None:
    """Delete the versions of ``key`` before ``lsn`` (a trim reaching ``lsn``'s commit is
    past them all: the one an earlier trim kept as the newest below ITS horizon would
    otherwise stay forever, and ``history`` would show it with the next version's
    before-image as its value)."""
    cur = txn.cursor(db=st.hist)
    prefix = tables.hist_prefix(key)
    doomed = []
    if cur.set_range(tables.hist_key(key, 0)):
        for k in cur.iternext(keys=True, values=False):
            if not tables.is_version_of(k, prefix) or tables.split_hist_key(k)[1] >= lsn:
                break
            doomed.append(k)
    for k in doomed:
        txn.delete(k, db=st.hist)


def _next_version(txn, st, key: bytes, lsn: int) -> int | None:
    """The LSN of the version of ``key`` after ``lsn`` (None: ``lsn``'s is the newest)."""
    cur = txn.cursor(db=st.hist)
    if not cur.set_range(tables.hist_key(key, lsn + 1)):
        return None
    k = cur.key()
    if not tables.is_version_of(k, tables.hist_prefix(key)):
        return None
    return tables.split_hist_key(k)[1]


def _erase_range(txn, st, purge_range: list) -> None:
    """Purge: every key in [lo, hi) and every trace of it in LMDB: data rows, history rows
    (versions and their before-images), the ``hkeys`` index, and its name in the log rows
    of the transactions that wrote it.  (The bytes of freed pages go with the compaction at
    the purge's checkpoint.)"""
    lo, hi = purge_range
    doomed = [k for k, _v in _rows(txn, st.hkeys, lo, hi)] + [
        k for k, _v in _rows(txn, st.data, lo, hi)]
    txids: dict[int, set] = {}
    for k in set(doomed):
        prefix = tables.hist_prefix(k)
        versions = list(_rows(txn, st.hist, prefix, prefix + b"\xff" * 9))
        for raw, row in versions:
            if tables.is_version_of(raw, prefix):
                txid = tables.unpack_row(row, "hist", raw, st.data_file)[0]
                txids.setdefault(txid, set()).add(k)
                txn.delete(raw, db=st.hist)
        txn.delete(k, db=st.hkeys)
        txn.delete(k, db=st.data)
    for txid, keys in txids.items():
        raw = txn.get(tables.txid_key(txid), db=st.txns)
        if raw is not None:
            row = tables.unpack_row(raw, "txns", tables.txid_key(txid), st.data_file)
            row["w"] = [w for w in row.get("w", []) if w[0] not in keys]
            txn.put(tables.txid_key(txid), pack(row), db=st.txns)


def _note_undone(txn, st: LmdbState, txid: int, by: int) -> None:
    """Add undo ``by`` to the ``undone_by`` of transaction ``txid``'s ``txns`` row (kept
    while the row is: a later revert of ``txid`` meets ``by`` as a later writer of all
    its keys — ``Undo._later_writers`` — though ``by`` wrote none of those that ended as
    they began).  A row trimmed already: nothing."""
    key = tables.txid_key(txid)
    raw = txn.get(key, db=st.txns)
    if raw is None:
        return
    row = tables.unpack_row(raw, "txns", key, st.data_file)
    got = row.get("undone_by") or []
    if by not in got:  # (the newest UNDONE_BY_KEPT: a row rewound past again and again
        row["undone_by"] = (list(got) + [by])[-UNDONE_BY_KEPT:]  # grew with each rewind)
        txn.put(key, pack(row), db=st.txns)


def _meta_row(raw: bytes, name: bytes, st) -> list:
    """A list-valued ``meta`` row (``RECENT_PURGES``, ``ERASE_OWED``), decoded."""
    return tables.unpack_row(raw, "meta", name, st.data_file)


def _rows(txn, db, lo: bytes, hi: bytes | None):
    cur = txn.cursor(db=db)
    ok = cur.set_range(lo)
    while ok:
        k = cur.key()
        if hi is not None and k >= hi:
            return
        yield k, cur.value()
        ok = cur.next()
