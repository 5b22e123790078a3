"""Views of the materialized tables that include what LMDB does not hold yet.

A query (``store.actions()``, ``restore_points()``, ``log()``, a 2PC decision) must see
every published event, but the applier may not have put the newest ones into LMDB.  Each
view reads LMDB and folds the MemTable's events on top with the very transitions the
applier uses (:mod:`walstore.engine.tables`), so a view and LMDB after the next apply can
never disagree.  The same views serve read-only stores, whose MemTable a follower fills
from the writer's WAL.
"""
from __future__ import annotations

import itertools
from bisect import bisect_right
from typing import Any, Callable, Iterator

from ..log.format import RecordType
from ..log.records import Event
from .apply import DECISION_PREFIX, PREPARED_PREFIX, owed_index_current
from .conflicts import Prepared
from .lmdb_state import SCAN_CHUNK, LmdbState, from_u64, read_chunk, u64
from .memtable import MemTable, root_parents, ws_root
from . import tables

_T = RecordType
MAX_ACTION_ID_BYTES = 480  # an action id is "<txid>.<seq>"; LMDB keys stop at 511 bytes
_ACTION_TYPES = frozenset({_T.ACTION_INTENT, _T.ACTION_RESULT, _T.COMMIT, _T.ABORT,
                           _T.ROLLBACK_PREPARED, _T.COMPENSATED})


def _event_lsn(e: Event) -> int:
    return e.lsn


class Views:
    def __init__(self, state: LmdbState, memtable: MemTable) -> None:
        self.state = state
        self.memtable = memtable

    def _events(self, types: frozenset, include_unpublished: bool = False) -> list[Event]:
        mt = self.memtable
        return mt.events_of(types, None if include_unpublished else mt.published)

    # ---- actions ------------------------------------------------------------------------
    # Every view takes the MemTable's events *before* it reads LMDB, and reads LMDB from
    # one read transaction: the applier commits LMDB and only then drops what it applied,
    # so each event is seen in the list or in the snapshot or both, and the transitions
    # (walstore.engine.tables) leave a row that already holds an event as it is.  Reading
    # LMDB first (or at two moments) hid an event applied in between: ``actions()`` showed
    # an owed compensation as committed, 202 times in 300 reverts beside the applier.

    def _fold_actions(self, events: list[Event], txn) -> dict[str, dict]:
        """The rows ``events`` change, over the rows LMDB holds in ``txn``."""
        changed = tables.ActionRows()  # (each transaction's rows found alone)
        table = self.state.actions
        file = self.state.data_file

        def get_row(aid: str) -> dict | None:
            return changed[aid] if aid in changed else _action(txn, table, aid, file)

        def rows_of_txid(txid: int) -> list[dict]:
            rows = {r["id"]: r for r in self._lmdb_rows_of(txid, txn)}
            rows.update(changed.items_of(txid))
            return list(rows.values())

        for e in events:
            for row in tables.action_changes(e, get_row, rows_of_txid):
                changed[row["id"]] = row
        return changed

    def _lmdb_rows_of(self, txid: int, txn) -> list[dict]:
        prefix = tables.action_prefix(txid)
        file = self.state.data_file
        return [tables.unpack_row(v, "actions", k, file)
                for k, v in _all(txn, self.state.actions, prefix, prefix[:-1] + b"/")]

    def action_row(self, aid: str, include_unpublished: bool = False) -> dict | None:
        """Action ``aid``'s row, folding only the unapplied events that concern it: the
        parts of those that name it (``MemTable.by_action``) and the ends (ABORT,
        ROLLBACK_PREPARED) of the transactions its row can belong to.  The same row as
        folding every unapplied action event (``_fold_actions``), at a cost that does not
        grow with the others: a compensation reads its action's row before it runs, and
        folding them all made N compensations (a rollback, a rewind) cost N^2."""
        mt = self.memtable
        upto = None if include_unpublished else mt.published
        own = _own_txid(aid)
        with mt.lock:
            parts = list(mt.by_action.get(aid, ()))
            txids = {own} if own is not None else set()
            for e in parts:
                txids.add(e.txid)
                for a in e.field("actions", ()):  # (a commit's row of it: may set "tx")
                    tx = a.get("tx")
                    if type(tx) is int:
                        txids.add(tx)
            ends = [e for t in txids for e in mt.ends.get(t, ())]
        events = sorted(parts + ends, key=_lsn) if ends else parts
        if upto is not None:
            events = [e for e in events if e.end <= upto]
        with self.state.read() as txn:
            stored = _action(txn, self.state.actions, aid, self.state.data_file)
            row = self._fold_one(aid, stored, events, txids) if events else stored
        if row is _UNSURE:  # its row names a transaction whose end was not taken: the
            return self._folded_row(aid, include_unpublished)  # full fold
        return row

    def _folded_row(self, aid: str, include_unpublished: bool) -> dict | None:
        """Action ``aid``'s row folding every unapplied action event: the events read
        first, LMDB after (the applier drops events only once LMDB holds them)."""
        events = self._events(_ACTION_TYPES, include_unpublished)
        with self.state.read() as txn:
            changed = self._fold_actions(events, txn)
            return changed[aid] if aid in changed else _action(txn, self.state.actions, aid,
                                                               self.state.data_file)

    @staticmethod
    def _fold_one(aid: str, stored: dict | None, events: list[Event], txids: set):
        """Action ``aid``'s row after ``events`` (those that concern it, in LSN order)
        over ``stored``, its LMDB row; _UNSURE when its row ever belongs to a transaction
        not in ``txids`` (whose ABORT would change it: not among ``events``).  The other
        rows ``action_changes`` reads are left out (its row does not depend on them)."""
        changed: dict[str, dict] = {}

        def get_row(x: str) -> dict | None:
            if x in changed:
                return changed[x]
            return stored if x == aid else None

        def rows_of_txid(txid: int) -> list[dict]:
            # of what _fold_actions gives (LMDB's rows of ``txid``, then the changed ones
            # of it), the row of ``aid`` alone
            row = changed.get(aid)
            if row is not None and row.get("tx") == txid:
                return [row]
            if stored is not None and aid.startswith(f"{txid}."):
                return [stored]
            return []

        if stored is not None and not _known(stored.get("tx"), txids):
            return _UNSURE
        for e in events:
            for row in tables.action_changes(e, get_row, rows_of_txid):
                changed[row["id"]] = row
            mine = changed.get(aid)
            if mine is not None and not _known(mine.get("tx"), txids):
                return _UNSURE
        return changed[aid] if aid in changed else stored

    def action_rows(self) -> dict[str, dict]:
        events = self._events(_ACTION_TYPES)
        with self.state.read() as txn:
            file = self.state.data_file
            rows = {k.decode(): tables.unpack_row(v, "actions", k, file)
                    for k, v in _all(txn, self.state.actions, b"", None)}
            rows.update(self._fold_actions(events, txn))
        return rows

    def action_rows_newest_first(self) -> Iterator[dict]:
        """The rows of ``action_rows``, newest first (intent LSN, then txid and sequence:
        ``actions.newest_first``), held a chunk at a time: one pass keeps a sort key per
        action (not its row: a listing of 100,000 actions held every row and its Action),
        then the rows are read again ``SCAN_CHUNK`` at a time, each chunk in a short read
        transaction of its own.  Not one snapshot: a row trimmed meanwhile is left out, one
        changed is given as it is then.  The unapplied events are folded once (memory
        bounded as the MemTable is)."""
        events = self._events(_ACTION_TYPES)
        st = self.state
        order: list[tuple[int, int, int, str]] = []
        with st.read() as txn:
            file = st.data_file
            folded = self._fold_actions(events, txn)
            after = None
            while True:
                chunk = read_chunk(txn, st.actions, b"", None, False, after)
                for k, v in chunk:
                    aid = k.decode()
                    if aid not in folded:
                        order.append(_newest_key(aid, tables.unpack_row(v, "actions", k,
                                                                        file)))
                if len(chunk) < SCAN_CHUNK:
                    break
                after = chunk[-1][0]
        order += (_newest_key(aid, row) for aid, row in folded.items())
        order.sort(reverse=True)
        for i in range(0, len(order), SCAN_CHUNK):
            part = order[i:i + SCAN_CHUNK]
            with st.read() as txn:
                file = st.data_file
                rows = [folded.get(aid) or _action(txn, st.actions, aid, file)
                        for *_, aid in part]
            txn = None  # (freed, with its LMDB reader slot, before the yields)
            yield from (r for r in rows if r is not None)

    def owed_rows(self) -> dict[str, dict]:
        """The rows of every action in flight, pending or failed (others may be among
        them: callers filter by state), at a cost that grows with those, not with every
        action recorded: the LMDB rows the ``owed`` table names (``tables.
        OWED_INDEX_STATES``; the applier keeps it in the transaction that writes the rows)
        and the unapplied events folded over them.  A row folded into one of those states
        is among the fold's; one that was in one in LMDB and is unchanged is in the
        table.  When the table is not exact (``apply.owed_index_current``: a store written
        without it), every row, as ``action_rows``."""
        events = self._events(_ACTION_TYPES)
        st = self.state
        with st.read() as txn:
            file = st.data_file
            if owed_index_current(txn, st):
                rows = {}
                for k, _v in _all(txn, st.owed, b"", None):
                    if k == tables.OWED_STAMP:
                        continue
                    aid = bytes(k).decode("utf-8", "replace")
                    row = _action(txn, st.actions, aid, file)
                    if row is not None:
                        rows[aid] = row
            else:
                rows = {k.decode(): tables.unpack_row(v, "actions", k, file)
                        for k, v in _all(txn, st.actions, b"", None)}
            rows.update(self._fold_actions(events, txn))
        return rows

    def action_rows_of(self, txid: int) -> list[dict]:
        events = self._events(_ACTION_TYPES)
        with self.state.read() as txn:
            rows = {r["id"]: r for r in self._lmdb_rows_of(txid, txn)}
            rows.update({a: r for a, r in self._fold_actions(events, txn).items()
                         if r.get("tx") == txid})
        return list(rows.values())

    # ---- restore points -----------------------------------------------------------------
    def _point_events(self, name: str | None = None) -> list[Event]:
        """The published RESTORE_POINT events here (of ``name`` alone when given), each
        name's in LSN order: read from ``MemTable.points``, not from a pass over every
        unapplied event (an agent dropping the point of each past turn beside writers
        passed over the whole backlog per drop)."""
        mt = self.memtable
        upto = mt.published
        with mt.lock:  # (copies in C: nothing else runs under the journal lock here)
            if name is None:
                events = list(itertools.chain.from_iterable(mt.points.values()))
            else:
                events = list(mt.points.get(name, ()))
        return [e for e in events if e.end <= upto]

    def points(self) -> dict[str, dict]:
        events = self._point_events()  # (first: the events before LMDB, see above)
        file = self.state.data_file
        out = {k.decode("utf-8"): tables.unpack_row(v, "points", k, file)
               for k, v in self.state.scan(b"", None, db="points")}
        for e in events:  # (each name's in LSN order: its newest decides)
            name = str(e.body.get("name", ""))
            row = _point_row(e)
            if row is None:
                out.pop(name, None)
            else:
                out[name] = row
        return out

    def point(self, name: str) -> dict | None:
        """Restore point ``name``'s row (None: there is none): its LMDB row and the
        unapplied events naming it, as ``points()`` gives it, without reading the others
        (resolving a name read every point kept: an agent naming one per turn paid for all
        its past turns on each ``at``)."""
        events = self._point_events(name)
        try:
            key = name.encode("utf-8")
        except UnicodeEncodeError:
            key = b""  # (no row is named so: points() decodes every key as UTF-8)
        out = None
        if key and len(key) <= 511:  # (LMDB keys stop there: MDB_BAD_VALSIZE)
            raw = self.state.get(key, "points")
            if raw is not None:
                out = tables.unpack_row(raw, "points", key, self.state.data_file)
        for e in events:
            out = _point_row(e)
        return out

    # ---- the transaction log ------------------------------------------------------------
    def txn_row(self, txid: int) -> dict | None:
        mt = self.memtable
        e = mt.commits.get(txid)  # (its own entry: not a pass over every event here)
        if e is not None and e.end <= mt.published:
            return tables.txn_row(e)
        key = tables.txid_key(txid)
        raw = self.state.get(key, "txns")
        return None if raw is None else tables.unpack_row(raw, "txns", key,
                                                          self.state.data_file)

    def undoers_of(self, txid: int, row: dict) -> set[int]:
        """The undos (revert, rewind) that undid transaction ``txid``: its ``txns`` row's
        ``undone_by`` (``row``; the applier notes each) and those of the commits not
        applied yet whose ``reverts`` name it."""
        out = set(row.get("undone_by") or ())
        mt = self.memtable
        with mt.lock:  # (a copy: the applier drops, committers add, as this reads)
            undos = list(mt.undos)
        published = mt.published
        for e in undos:
            if e.end <= published and txid in (e.field("reverts") or ()):
                out.add(e.txid)
        return out

    def commits_after(self, lsn: int, oldest_first: bool = False) -> Iterator[dict]:
        """Rows of the commits with LSN > ``lsn``, newest first (unapplied ones first), or
        ``oldest_first`` (LMDB's, then the unapplied ones: every unapplied LSN lies above
        every applied one; one applied while this walks is skipped in LMDB and given in
        its place among the unapplied, which were listed first).  Lazy: a caller that
        stops early reads no further."""
        unapplied = self._unapplied_commits_after(lsn)
        seen = {e.txid for e in unapplied}
        if not oldest_first:
            for e in reversed(unapplied):
                yield tables.txn_row(e)
        st = self.state
        for _raw, txid_raw in st.scan(u64(lsn + 1), None, reverse=not oldest_first,
                                      db="bylsn"):
            txid = from_u64(txid_raw, 0, "bylsn", _raw, st)
            if txid in seen:
                continue
            raw = st.get(txid_raw, "txns")
            if raw is not None:
                yield tables.unpack_row(raw, "txns", txid_raw, st.data_file)
        if oldest_first:
            for e in unapplied:
                yield tables.txn_row(e)

    def _unapplied_commits_after(self, lsn: int) -> list[Event]:
        """The published unapplied COMMIT events with LSN > ``lsn``, oldest first: the
        tail of ``MemTable.commits`` (txid -> COMMIT, entered in LSN order), copied in C
        and cut by a bisect — a pass over every unapplied event in Python made each
        ``store.log(limit=10)`` pay for the whole backlog (2.4 ms beside 32,000)."""
        mt = self.memtable
        upto = mt.published
        with mt.lock:
            commits = list(mt.commits.values())
        i = bisect_right(commits, lsn, key=_event_lsn)
        return [e for e in commits[i:] if e.end <= upto]

    # ---- reversible files ---------------------------------------------------------------
    def workspace_rows(self) -> dict[bytes, dict]:
        """Registered workspaces (root -> row), unapplied registrations and manifests
        folded in."""
        st = self.state
        events = self._workspace_events()  # (first: above)
        out = {k: tables.unpack_row(v, "workspaces", k, st.data_file)
               for k, v in st.scan(b"", None, db="workspaces")} \
            if st.workspaces is not None else {}
        for e in events:
            key = e.body.get("root") if e.type == _T.WORKSPACE else e.body.get("ws")
            out[key] = tables.workspace_row(e, out.get(key))
        return out

    def _workspace_events(self, root: bytes | None = None) -> list[Event]:
        """The published WORKSPACE and WATCH_BEGIN events here (of ``root`` alone when
        given), each root's in LSN order: from ``MemTable.roots``, not a pass over every
        unapplied event."""
        mt = self.memtable
        upto = mt.published
        with mt.lock:  # (copies in C)
            if root is None:
                events = list(itertools.chain.from_iterable(mt.roots.values()))
            else:
                events = list(mt.roots.get(root, ()))
        return [e for e in events if e.end <= upto]

    def workspace_row(self, root: bytes) -> dict | None:
        """The row of the workspace registered at ``root`` (None: none is), as
        ``workspace_rows()`` gives it, without reading the others (registering or looking
        up one workspace read every workspace's row: N registrations cost N^2)."""
        events = self._workspace_events(root)  # (first: the events before LMDB)
        st = self.state
        out = None
        if st.workspaces is not None and isinstance(root, bytes) and 0 < len(root) <= 511:
            raw = st.get(root, "workspaces")
            if raw is not None:
                out = tables.unpack_row(raw, "workspaces", root, st.data_file)
        for e in events:
            out = tables.workspace_row(e, out)
        return out

    def workspace_overlapping(self, root: bytes) -> bytes | None:
        """A registered workspace root other than ``root`` that lies under it or above it
        (``other`` starts with ``root`` + "/", or ``root`` with ``other`` + "/"), or None:
        the parents of ``root`` looked up and the roots under it scanned (rows are never
        removed, so reading them in several transactions misses none)."""
        mt = self.memtable
        upto = mt.published
        parents = root_parents(root)
        with mt.lock:  # (first: the events before LMDB; the roots near ``root`` alone)
            events = [e for p in parents for e in mt.roots.get(p, ())]
            if root in mt.under_roots:  # (one lies below: which, found by a pass)
                below = root + b"/"
                events += [e for r, es in mt.roots.items()
                           if isinstance(r, bytes) and r.startswith(below) for e in es]
        for e in events:
            if e.end <= upto:
                return ws_root(e)
        st = self.state
        if st.workspaces is None:
            return None
        if len(root) < 511:  # (a longer one has no registered root under it: LMDB keys
            it = st.scan(root + b"/", root + b"0", db="workspaces")  # stop at 511 bytes)
            try:
                first = next(it, None)
            finally:
                it.close()
            if first is not None:
                return first[0]
        for parent in parents:
            if len(parent) <= 511 and st.get(parent, "workspaces") is not None:
                return parent
        return None

    def unapplied_file_events(self) -> list[Event]:
        """FILE_STEPS and WATCH_BEGIN events not in LMDB yet (published or not): what a
        garbage collection of the blob store must count as references too."""
        return self._events(frozenset({_T.FILE_STEPS, _T.WATCH_BEGIN}), True)

    # ---- two-phase commit ---------------------------------------------------------------
    def decision(self, gid: str, synced: int | None = None) -> str | None:
        """"commit" or "abort" once the decision's record is published (durable, under
        durability="full"), "prepared" while it is logged and not yet published (its fsync
        under way, or failed: in doubt until the next open decides — a coordinator must
        not act on a decision that may not survive), None when ``gid`` has none.
        ``synced``: the WAL's synced LSN, under durability="normal" (a decision is
        published there at its append, before its forced fsync): "prepared" until then."""
        mt = self.memtable
        published = mt.published
        with mt.lock:  # (its own decisions here, ``MemTable.decided``: a pass over every
            events = mt.decided.get(gid)  # unapplied event made each 2PC prepare, which
            e = events[-1] if events else None  # asks under the journal lock, cost the
        if e is not None:                       # backlog: 20,000 in a row took 54 s)
            if e.end > published or (synced is not None and e.end > synced):
                return "prepared"
            return "commit" if e.type == _T.COMMIT else "abort"
        raw = self.state.get(DECISION_PREFIX + gid.encode(), "twophase")
        return None if raw is None else raw.decode()

    def prepared_summaries(self, summarize: Callable[[dict], Any]) -> list:
        """``summarize(row)`` of every prepared row, in one pass: the log's PREPARE and
        decision events (what is not applied yet) over LMDB's rows, streamed.  Nothing
        but the summaries is kept: a dict of every prepared row held each prepared
        transaction's whole write set at once (a listing of thousands in doubt asked it
        once per gid: 2,000 took 34 s)."""
        st = self.state
        events = self._events(frozenset({_T.PREPARE, _T.COMMIT, _T.ROLLBACK_PREPARED}))
        latest: dict[str, Event] = {}  # (the log's last word on each gid it names)
        for e in events:
            gid = e.field("gid")
            if gid:
                latest[gid] = e
        out = []
        for k, v in st.scan(PREPARED_PREFIX, b"p;", db="twophase"):
            row = tables.unpack_row(v, "twophase", k, st.data_file)
            if row["gid"] not in latest:
                out.append(summarize(row))
        for gid, e in latest.items():
            if e.type == _T.PREPARE:
                out.append(summarize(dict(e.body, w=[[k, v] for k, v in e.writes or ()])))
        return out

    def prepared_holds(self) -> list[Prepared]:
        """Every prepared transaction as a prepared set keeps it (``Prepared``, keys
        only): a writer's at open (``Engine``), a read-only handle's for an undo's dry run
        (``agent.undo``).  One whose PREPARE predates ``fence`` (stop 75) gets the scopes
        its actions were declared in from their rows — at both: the read-only dry run
        read none, and returned a plan the real rewind refused (stop 75's review)."""
        out = self.prepared_summaries(lambda row: Prepared.from_row(row).keys_only())
        for p in out:
            if p.fence is None and p.actions:
                p.fence = tuple(r["scope"] for r in self.action_rows_of(p.txid)
                                if isinstance(r.get("scope"), (str, bytes)))
        return out

    def prepared_row(self, gid: str, include_unpublished: bool = False,
                     prepare_only: bool = False) -> dict | None:
        """The prepared row of ``gid`` (None: not prepared), without building the
        others: the log's last word on it, else LMDB's row.
        ``include_unpublished``: the log's records whose fsync is under way count too (a
        writer's own: its prepared set has the gid from the PREPARE's append).
        ``prepare_only``: its PREPARE's row even when a decision follows in the log (a
        writer whose prepared set holds the gid: a decision whose fsync failed, in doubt
        again; one another thread is making, which the pipeline refuses)."""
        st = self.state
        mt = self.memtable
        upto = None if include_unpublished else mt.published
        with mt.lock:  # (its own events here: ``MemTable.prepares`` and ``decided``; a
            # pass over every event here cost each decision the backlog)
            named = list(mt.prepares.get(gid, ()))
            if not prepare_only:
                named += mt.decided.get(gid, ())
        named = [e for e in named if upto is None or e.end <= upto]
        last = max(named, key=_lsn) if named else None
        if last is not None:
            if last.type != _T.PREPARE:
                return None
            return dict(last.body, w=[[k, v] for k, v in last.writes or ()])
        key = PREPARED_PREFIX + gid.encode()
        raw = st.get(key, "twophase")
        return None if raw is None else tables.unpack_row(raw, "twophase", key, st.data_file)


_UNSURE = object()  # (Views._fold_one: fold them all instead)


def _point_row(e: Event) -> dict | None:
    """The ``points`` row a RESTORE_POINT event leaves (None: it dropped the point)."""
    return None if e.body.get("drop") else {"lsn": e.lsn, "ts": e.body.get("ts", 0.0)}


def _known(tx, txids: set) -> bool:
    """Are the ends of the transaction a row names (``tx``) among those taken?  (None:
    it names none, so no end concerns it.)"""
    return tx is None or (type(tx) is int and tx in txids)


def _lsn(e: Event) -> int:
    return e.lsn


def _own_txid(aid: str) -> int | None:
    """The txid T with ``aid`` starting with ``"T."`` (an id is ``"<txid>.<seq>"``)."""
    head, dot, _ = aid.partition(".")
    if dot and head.isdigit() and head.isascii():
        t = int(head)
        if str(t) == head:
            return t
    return None


def _all(txn, table, lo: bytes, hi: bytes | None) -> list[tuple[bytes, bytes]]:
    """Every row of ``table`` with lo <= key < hi, read in ``txn`` (one snapshot)."""
    out: list[tuple[bytes, bytes]] = []
    after = None
    while True:
        chunk = read_chunk(txn, table, lo, hi, False, after)
        out += chunk
        if len(chunk) < SCAN_CHUNK:
            return out
        after = chunk[-1][0]


def _newest_key(aid: str, row: dict) -> tuple[int, int, int, str]:
    """Action ``aid``'s place in a listing sorted descending: newest first, as
    ``actions.newest_first`` orders them (intent LSN, then txid and sequence)."""
    txid, _, seq = aid.partition(".")
    return (row.get("lsn", 0), int(txid), int(seq or 0), aid)


def _action(txn, table, aid: str, file: str | None = None) -> dict | None:
    """Action ``aid``'s row in ``txn`` (None when there is none, or no such id)."""
    try:
        key = aid.encode()
    except UnicodeEncodeError:
        return None  # (an id is "<txid>.<seq>": no such text names one)
    if not key or len(key) > MAX_ACTION_ID_BYTES or table is None:
        return None  # (nor can LMDB look it up: MDB_BAD_VALSIZE)
    raw = txn.get(key, None, table)
    return None if raw is None else tables.unpack_row(raw, "actions", key, file)
