"""History retention: how much of the past ``log``, ``history``, ``at``, ``revert`` and
``rewind`` can reach, trimmed at checkpoints.

``Options.retain_transactions`` (keep the newest N transactions) and ``retain_seconds``
(keep the last S seconds) set a horizon LSN; restore points pin it below themselves.
Trimming deletes, in batches, the history rows of commits below the horizon (each key
keeps its newest version below it, so views at or after the horizon stay exact, unless
that version is a deletion nothing follows: then the key, absent at every retained point,
keeps no row at all, nor does a workspace path left absent), their ``txns``/``bylsn`` rows
and their settled action rows (every row of the transaction; an action still owed keeps
its row); the horizon is recorded, and a point before it raises HistoryTrimmed.
Transactions that ended without committing (``aended``) are no points and carry no
history an undo or a view reads: their settled rows go below a horizon of their own,
where rollbacks count toward ``retain_transactions`` as commits do (kept: the newest N
transactions, committed or not, and those of the last S seconds) and restore points do
not pin; else an agent that mostly rolls back grew its store one row per rollback
between commits.  Default: keep everything.

A checkpoint's search for the horizon costs what was added since the previous one, not
what is kept: the first young commit (``retain_seconds``) and the Nth newest
(``retain_transactions``, ``_NthNewest``) are moved on from where the last trim left
them; after an open, the first trim walks them once.
"""
from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from .. import clock
from ..engine import tables
from ..engine.lmdb_state import from_u64, u64

if TYPE_CHECKING:
    from ..engine.engine import Engine

TRIM_BATCH = 1000


class Retention:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        # ``retain_seconds``: the LSN of the first commit found young at the last trim
        # (0: none yet).  Every commit before it was older than that trim's cutoff, so
        # older than any later one's: the next search starts there.  It walked every
        # ``txns`` row from the oldest each checkpoint, and a restore point pins what it
        # walks: 20,000 pinned commits took ~0.15 s a checkpoint, growing with them.
        self._young_from = 0
        # ``retain_transactions``: the Nth newest commit (and the Nth newest transaction
        # that ended, ``aended`` merged in), found by one walk of N rows, then moved on by
        # the rows added since (``_NthNewest``): every checkpoint walked the N newest rows
        # of both (a million transactions retained: ~3 s a checkpoint, for ever)
        self._nth: dict[str, _NthNewest] = {}

    def trim(self) -> dict:
        """A checkpoint hook: trim what the retention options allow."""
        opts = self.engine.options
        if opts.retain_transactions is None and opts.retain_seconds is None:
            return {"history_trimmed": 0}
        st = self.engine.state
        with self.engine.history_pins.lock:  # (from reading the pins to recording the
            old, horizon, ended = self._move_horizon(st)  # horizon: walstore.engine.pins)
        trimmed = 0
        while horizon > old:
            batch = self._oldest_commits(old, horizon)
            if not batch:
                break
            self.engine.applier.trim_history(batch, horizon)
            trimmed += len(batch)
            old = batch[-1][0] + 1
        self._trim_ended_actions(max(horizon, ended))
        return {"history_trimmed": trimmed}

    def _move_horizon(self, st) -> tuple[int, int, int]:
        """Record the new horizon (never past a restore point or an undo in flight);
        returns (the lowest LSN whose history rows may still need trimming, the horizon,
        the rollbacks' horizon).  Nothing to trim: the first two are equal."""
        horizon, ended = self._horizon()
        pins = [p["lsn"] for p in self.engine.views.points().values()]
        held = self.engine.history_pins.lowest()  # undos in flight
        if held is not None:
            pins.append(held)
        if pins:
            horizon = min(horizon, min(pins))
        old = st.meta_int(b"horizon")
        # rows below the recorded horizon are a trim a crash cut short (the horizon moves
        # first): they are trimmed now, from the oldest
        first = next(iter(st.scan(b"", None, db="bylsn")), None)
        left = from_u64(first[0], 0, "bylsn", None, st) if first is not None else None
        if horizon <= old and (left is None or left >= old):
            return old, old, max(old, ended)
        horizon = max(horizon, old)
        if left is not None:
            old = min(old, left)
        # The horizon moves first, in its own LMDB transaction, then history goes: a
        # reader (an old snapshot, an ``at()`` view, an undo planning from a point) that
        # reads while rows are deleted must find the point trimmed, never a later
        # version's before-image in place of a deleted one (a rewind beside a trim
        # restored values no point ever had).  ``trimmed_txid_max``: a txid above it was
        # never trimmed, so an unknown one there never committed (UnknownPoint, not
        # HistoryTrimmed: see History); set with the horizon, from the commits below it.
        top = st.meta_int(b"trimmed_txid_max", 0)
        for raw, txid in st.scan(u64(old), u64(horizon), db="bylsn"):
            top = max(top, from_u64(txid, 0, "bylsn", raw, st))
        self.engine.applier.set_meta(b"horizon", horizon, trimmed_txid_max=top)
        return old, horizon, ended

    def _trim_ended_actions(self, horizon: int) -> None:
        """The settled action rows no trimmed commit reached: those of transactions that
        rolled back below ``horizon`` (no commit row leads to them; ``horizon`` is the
        larger of the history's and the rollbacks' own, see ``_horizon``), and those still
        owed, or kept for a retained undo, when their commit was trimmed (settled since).
        ``aended`` lists them, and loses a transaction once no row of it is left, so the
        cost is the rows trimmed plus one look at each transaction whose actions are
        still owed."""
        start: int | None = 0
        while start is not None:
            start = self.engine.applier.trim_ended_actions(start, horizon, TRIM_BATCH)

    def _oldest_commits(self, lo: int, hi: int) -> list[tuple[int, int]]:
        st = self.engine.state
        out = []
        for raw, txid in st.scan(u64(lo), u64(hi), db="bylsn"):
            out.append((from_u64(raw, 0, "bylsn", None, st),
                        from_u64(txid, 0, "bylsn", raw, st)))
            if len(out) >= TRIM_BATCH:
                break
        return out

    def _horizon(self) -> tuple[int, int]:
        """The history horizon (before restore points pin it), and the rollbacks' one:
        an ``aended`` row below it is trimmed (its settled rows).  For the rollbacks
        ``retain_transactions`` counts every transaction that ended, committed or not
        (``bylsn`` and ``aended`` merged, newest first): counting commits only, the rows
        of any number of rollbacks after the Nth newest commit were kept.  The rollbacks'
        horizon is never below the history's (more rows counted), and restore points do
        not pin it: a rolled-back transaction is no point, and no view or undo reads its
        rows (an owed one is kept by the trim itself).  ``aended`` also lists trimmed
        commits that kept a row; they lie below the recorded horizon, trimmed as
        before."""
        opts = self.engine.options
        st = self.engine.state
        applied = st.applied_lsn()
        candidates, ended = [applied], [applied]
        if opts.retain_transactions is not None:
            n = opts.retain_transactions
            if not self._nth or self._nth["bylsn"].n != n:
                self._nth = {"bylsn": _NthNewest(n, ("bylsn",)),
                             "ended": _NthNewest(n, ("bylsn", "aended"))}
            candidates.append(self._nth["bylsn"].lsn(st))
            ended.append(self._nth["ended"].lsn(st))
        if opts.retain_seconds is not None:
            # (never later than the monotonic clock counts: a forward jump of the wall
            # clock trimmed the whole history at once: audit 67, walstore.clock)
            cutoff = clock.deleting_now() - opts.retain_seconds
            first_young = applied
            for raw, txid in st.scan(u64(min(self._young_from, applied)), None, db="bylsn"):
                row = st.get(txid, "txns")
                if row is not None and tables.unpack_row(row, "txns", txid, st.data_file
                                                         ).get("ts", 0) >= cutoff:
                    first_young = from_u64(raw, 0, "bylsn", None, st)
                    break
            self._young_from = first_young
            candidates.append(first_young)
            ended.append(first_young)
        return min(candidates), min(ended)



class _NthNewest:
    """The LSN of the ``n``th newest row of LSN-keyed ``tables`` (merged; 0: fewer rows).

    The first call walks the newest ``n`` rows; later ones only the rows added since the
    last (commits and rollbacks are applied in log order: new rows lie above every row
    counted), moving the answer up by as many rows.  A row at or above the answer is
    never deleted (a trim deletes below the horizon, which is at most the answer; a purge
    keeps the rows), so that count stays exact; should the answer's own row be gone, or
    the rows counted while fewer than ``n`` reach ``n`` (a trim may have deleted some of
    those), the rows are walked again from the newest."""

    def __init__(self, n: int, tables_: tuple[str, ...]) -> None:
        self.n = n
        self.tables = tables_
        self.top: int | None = None  # the newest row counted (None: not walked yet)
        self.nth = 0                 # the answer
        self.count = 0               # rows counted (at most ``n``; exact when nth)

    def _rows(self, st, lo: int | None, reverse: bool):
        scans = [st.scan(b"" if lo is None else u64(lo), None, reverse=reverse, db=t)
                 for t in self.tables]
        rows = scans[0] if len(scans) == 1 else heapq.merge(*scans, key=_first,
                                                            reverse=reverse)
        return ((from_u64(raw, 0, "/".join(self.tables), None, st), raw) for raw, _v in rows)

    def lsn(self, st) -> int:
        if self.top is not None and (self.nth == 0 or any(
                st.get(u64(self.nth), t) is not None for t in self.tables)):
            added, last = 0, self.top
            for last, _raw in self._rows(st, self.top + 1, False):
                added += 1
            if not added:
                return self.nth
            if self.nth:
                k = added
                for lsn, _raw in self._rows(st, self.nth + 1, False):
                    k -= 1
                    if k == 0:
                        self.nth, self.top = lsn, last
                        return self.nth
            elif self.count + added < self.n:
                self.count += added
                self.top = last
                return 0
        # the walk from the newest
        self.top, self.nth, self.count = None, 0, 0
        for lsn, _raw in self._rows(st, None, True):
            if self.top is None:
                self.top = lsn
            self.count += 1
            if self.count >= self.n:
                self.nth = lsn
                break
        if self.top is None:
            self.top = -1
        return self.nth


def _first(row: tuple) -> bytes:
    return row[0]
