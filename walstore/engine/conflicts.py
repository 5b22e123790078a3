"""Serializable validation at commit (optimistic concurrency) and the holds of prepared
(two-phase) transactions.

A transaction T with snapshot P conflicts when anything it read or scanned was written by
a commit at or after P.  Those commits are found where they are, with no window of
recent commits kept in memory:

- applied to LMDB: the key's history rows (one seek: is there a version at or after P?)
  and, for scanned ranges, the commits applied since P (``bylsn`` + ``txns`` rows);
- not yet applied: the MemTable's versions and commit events.

``check`` runs in two steps so that the long part never holds the commit lock: first,
without the lock, against LMDB as it is (applied up to A); then, under the lock, against
the MemTable and whatever LMDB applied after A.  The cost therefore grows with what T
itself read and with the commits since its own snapshot, never with other transactions,
and a transaction open for hours makes no other commit slower.

``PreparedSet`` holds what prepared transactions read and wrote: a transaction may not
write their keys or into their scanned ranges, read a key they wrote, or scan a range
holding one of their writes, until they are decided (serializability across the prepare);
nor may a rewind reach into a scope one works for, or a purge cross one (``check_undo``).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field, replace
from typing import Any

from ..codec import decode_key, encode_prefix
from ..errors import ConflictError, WalstoreError
from .lmdb_state import LmdbState, from_u64, iter_rows, u64
from .keyindex import KeyIndex
from .memtable import MemTable
from .snapshot import WALK_ROWS, _check_horizon
from . import tables


@dataclass
class ReadSet:
    """What a transaction read: its snapshot LSN, keys, and scanned ranges [lo, hi)."""

    snapshot: int
    keys: set = field(default_factory=set)
    ranges: list = field(default_factory=list)
    # the ranges that count against prepared transactions' holds (None: ``ranges``); an
    # undo guards its whole scope against racing commits, but a prepared transaction on a
    # key it does not restore is not in its way (Transaction.guard_ranges)
    held_ranges: list | None = None
    # the scopes an undo guards whole (Transaction.guard_scopes): a commit since the
    # snapshot that belongs to one (tagged with it, or running an action declared in it),
    # or that may (file changes, moves of action states), conflicts though it wrote no key
    # in the ranges; ``None`` in the list guards every commit (an unscoped rewind)
    scopes: list | None = None
    # the scope this transaction works for (Transaction.undo_fence), or a tuple of them:
    # a rewind of one (or of a scope holding it, or unscoped) or a purge across one
    # committed since the snapshot conflicts, whatever it read (a node's booking begun
    # before a rewind of its thread committed after it, and stood beside a thread
    # rewound past its step)
    fence: Any = None
    # an undo restoring files (Transaction.guard_files): a commit since the snapshot that
    # changed files conflicts (a later walstore writer of a path it puts back)
    files: bool = False
    # ``ranges`` merged for lookups, made by the first walk that needs it and kept for
    # the next ones (``ConflictChecker._walk``: one per WALK_ROWS commits)
    merged: Any = field(default=None, repr=False, compare=False)

    def __bool__(self) -> bool:
        return bool(self.keys or self.ranges or self.scopes or self.fence is not None
                    or self.files)


def _in_ranges(key: bytes, ranges) -> bool:
    return any(key >= lo and (hi is None or key < hi) for lo, hi in ranges)


class RangeSet:
    """Key ranges [lo, hi) (``hi`` None: no bound) merged and sorted once, so a key is
    tested against all of them by one bisect: a transaction that scanned 10,000 ranges
    tested each key written since its snapshot against every one (10,000 commits since:
    a 7 s commit, under the commit lock)."""

    __slots__ = ("los", "his")

    def __init__(self, ranges) -> None:
        los: list[bytes] = []
        his: list[bytes | None] = []
        for lo, hi in sorted(ranges, key=lambda r: r[0]):
            if los and (his[-1] is None or lo <= his[-1]):  # overlaps or touches the last
                if his[-1] is not None and (hi is None or hi > his[-1]):
                    his[-1] = hi
            elif hi is None or lo < hi:  # (an empty range holds nothing)
                los.append(lo)
                his.append(hi)
        self.los, self.his = los, his

    def __contains__(self, key: bytes) -> bool:
        i = bisect_right(self.los, key) - 1
        return i >= 0 and (self.his[i] is None or key < self.his[i])

    def __bool__(self) -> bool:
        return bool(self.los)


class ConflictChecker:
    def __init__(self, state: LmdbState, memtable: MemTable) -> None:
        self.state = state
        self.memtable = memtable

    def check_applied(self, txid: int, reads: ReadSet) -> int:
        """Step one (no lock): commits in LMDB.  Returns the LMDB applied LSN checked.

        When ``LmdbState.applied_bound`` has not passed the snapshot, LMDB holds no commit
        this validation must see, so it is not read at all (the bound is returned as the
        LSN checked: step two re-reads LMDB from there if commits are applied meanwhile)."""
        st = self.state
        bound = st.applied_bound
        if bound is not None and bound <= reads.snapshot:
            return bound
        with st.read() as txn:
            applied = from_u64(txn.get(b"applied", db=st.meta), 0, "meta", b"applied", st)
            resume = (self._check_lmdb(txn, txid, reads, reads.snapshot, applied)
                      if applied > reads.snapshot else None)
        if applied > reads.snapshot:
            self._seek_keys_in_pieces(txid, reads, reads.snapshot)
        self._walk_rest(txid, reads, resume, applied)
        return applied

    def _seek_keys_in_pieces(self, txid: int, reads: ReadSet, since: int) -> None:
        """``_seek_keys``, WALK_ROWS keys per short read transaction (one over every key
        of a big read set kept a map resize, and every reader and committer behind it,
        waiting for them all — probe-audit55)."""
        st = self.state
        keys = list(reads.keys)
        for i in range(0, len(keys), WALK_ROWS):
            with st.read() as txn:
                _check_horizon(txn, st, reads.snapshot)  # (a trim may have run meanwhile)
                self._seek_keys(txn, txid, keys[i:i + WALK_ROWS], since)

    def check_recent(self, txid: int, reads: ReadSet, checked: int, applied_now: int) -> None:
        """Step two (under the commit lock): the MemTable, and LMDB past ``checked``."""
        p = reads.snapshot
        mt = self.memtable
        stale = _written_since(mt, reads.keys, p)
        if not stale:
            ranged = None  # (built at the first commit with writes: none, no cost)
            for e in mt.commits_since(p):
                if reads.ranges and e.writes:
                    if ranged is None:
                        ranged = RangeSet(reads.ranges)
                    hit = next((k for k, _v in e.writes if k in ranged), None)
                    if hit is not None:
                        stale.append(hit)
                        break
                hit = _purge_hit(e.field("purge_range"), reads)
                if hit is not None:
                    stale.append(hit)
                    break
                if reads.scopes:
                    _check_scopes(txid, e.txid, e.field, reads.scopes)
                if reads.fence is not None:
                    _check_fence(txid, e.txid, e.field, reads.fence)
                if reads.files:
                    _check_files(txid, e.txid, e.field)
        if stale:
            _raise(txid, stale)
        if applied_now > checked:
            self._check_lmdb_since(txid, reads, max(p, checked))

    def _check_lmdb_since(self, txid: int, reads: ReadSet, since: int) -> None:
        """Step two's LMDB part: the commits applied since step one read LMDB (with LSN
        at or after ``since``), walked, the keys read tested against what each wrote.
        (A seek of each key's history here held the commit lock for as long as the read
        set was big: 200,000 keys read, ~1 s for every commit of the process, whenever
        the applier had moved between the steps — probe-audit55.)  Only when those
        commits outnumber the keys read is a seek per key the cheaper way for the keys."""
        st = self.state
        with st.read() as txn:
            applied = from_u64(txn.get(b"applied", db=st.meta), 0, "meta", b"applied", st)
            _check_horizon(txn, st, reads.snapshot)
            purged_since = from_u64(txn.get(b"last_purge", db=st.meta), -1, "meta",
                                    b"last_purge", st) >= since
        walk = (reads.ranges or purged_since or reads.scopes or reads.fence is not None
                or reads.files)
        keys = reads.keys or None
        left = None if walk else len(keys or ())  # (rows the walk may read; None: all)
        resume: int | None = since
        while resume is not None and left != 0:
            with st.read() as txn:
                _check_horizon(txn, st, reads.snapshot)
                resume, n = self._walk(txn, txid, reads, resume, applied, keys,
                                       WALK_ROWS if left is None else min(left, WALK_ROWS))
            if left is not None:
                left -= n
        if resume is not None and keys:  # (more commits than keys: a seek per key)
            self._seek_keys_in_pieces(txid, reads, since)

    def _seek_keys(self, txn, txid: int, keys, since: int) -> None:
        """ConflictError when one of ``keys`` has a version at or after ``since`` in LMDB."""
        cur = txn.cursor(db=self.state.hist)
        for k in keys:
            if cur.set_range(tables.hist_key(k, since)) and tables.is_version_of(
                    cur.key(), tables.hist_prefix(k)):
                _raise(txid, [k])

    def _check_lmdb(self, txn, txid: int, reads: ReadSet, since: int, upto: int
                    ) -> int | None:
        """The first WALK_ROWS commits applied with LSN in [since, upto), checked in
        ``txn`` (the keys read: ``_seek_keys_in_pieces``, after); returns the LSN the walk
        over those commits goes on from (``_walk_rest``: after ``txn`` ends), None when it
        is done."""
        st = self.state
        _check_horizon(txn, st, reads.snapshot)
        purged_since = from_u64(txn.get(b"last_purge", db=st.meta), -1, "meta",
                                b"last_purge", st) >= since
        if (reads.ranges or purged_since or reads.scopes or reads.fence is not None
                or reads.files):
            return self._walk(txn, txid, reads, since, upto)[0]
        return None

    def _walk_rest(self, txid: int, reads: ReadSet, resume: int | None, upto: int) -> None:
        """The walk ``_check_lmdb`` began, on from ``resume``: WALK_ROWS commits per short
        read transaction.  (A map resize waits until no reader is inside LMDB: one read
        transaction over every commit since an old snapshot — a transaction held open for
        hours — kept the resize, and every reader and committer behind it, waiting for
        the whole validation — probe-audit55.)"""
        st = self.state
        while resume is not None:
            with st.read() as txn:
                _check_horizon(txn, st, reads.snapshot)  # (a trim may have run meanwhile)
                resume = self._walk(txn, txid, reads, resume, upto)[0]

    def _walk(self, txn, txid: int, reads: ReadSet, since: int, upto: int,
              keys: set | None = None, limit: int = WALK_ROWS) -> tuple[int | None, int]:
        """The commits applied with LSN in [since, upto), at most ``limit`` of them, against
        the ranges, purges, scopes, fence and files of ``reads`` (and what they wrote
        against ``keys``); returns the LSN to go on from (None when none is left) and how
        many were read.  The ``bylsn`` rows are read one at a time (a list
        of them all held ~150 bytes per commit since the snapshot: a million commits,
        150 MiB — probe-audit55)."""
        st = self.state
        ranged = reads.merged  # (built at the first commit with writes)
        n = 0
        for lsn_raw, txid_raw in iter_rows(txn, st.bylsn, u64(since), u64(upto)):
            if n == limit:
                return from_u64(lsn_raw, 0, "bylsn", None, st), n
            n += 1
            raw = txn.get(txid_raw, db=st.txns)
            if raw is None:
                continue
            # (the commit path: the row's shape is checked by using it, in a try that
            # costs nothing — a full check per row doubled the decode of a big one)
            row = tables.unpack_row(raw, "txns", txid_raw, st.data_file, shape=False)
            try:
                hit = None
                if keys and row.get("w"):
                    hit = next((k for k, _n in row["w"] if k in keys), None)
                if hit is None and reads.ranges and row.get("w"):
                    if ranged is None:
                        ranged = reads.merged = RangeSet(reads.ranges)
                    hit = next((k for k, _n in row["w"] if k in ranged), None)
                hit = hit or _purge_hit(row.get("purge_range"), reads)
                if hit is None:
                    if reads.scopes:
                        _check_scopes(txid, row.get("tx"), row.get, reads.scopes)
                    if reads.fence is not None:
                        _check_fence(txid, row.get("tx"), row.get, reads.fence)
                    if reads.files:
                        _check_files(txid, row.get("tx"), row.get)
            except WalstoreError:
                raise
            except (TypeError, ValueError, AttributeError) as e:
                raise tables.row_damaged("txns", txid_raw, e, st.data_file) from e
            if hit is not None:
                _raise(txid, [hit])
        return None, n


def _written_since(mt: MemTable, keys: set, p: int) -> list[bytes]:
    """The keys of ``keys`` that a commit still in the MemTable, with LSN at or after
    ``p``, wrote: from those commits' writes while they wrote fewer keys than ``keys``
    holds, else a lookup per key.  (Under the commit lock: a lookup per key read cost
    every other commit the wait for 200,000 lookups, ~70 ms, whatever was new —
    probe-audit55.)  The caller holds the journal lock: nothing enters or leaves."""
    if not keys:
        return []
    budget = len(keys)
    hits: list[bytes] = []
    for e in mt.commits_since(p):
        writes = e.writes
        if writes:
            budget -= len(writes)
            if budget < 0:
                return [k for k in keys if mt.last_write(k) >= p]
            hits.extend(k for k, _v in writes if k in keys)
    return list(dict.fromkeys(hits))  # (each once: a key several of them wrote)


def _purge_hit(rng: tuple | list | None, reads: ReadSet) -> bytes | None:
    """A purge erased the history of its range ``rng`` (lo, hi), so it conflicts by range:
    with any key read in it and any range scanned across it."""
    if not rng:
        return None
    lo, hi = rng
    for k in reads.keys:
        if _in_ranges(k, [(lo, hi)]):
            return k
    for rlo, rhi in reads.ranges:
        if (hi is None or rlo < hi) and (rhi is None or (lo < rhi and rlo < rhi)):
            return lo  # (an empty range, start past end, holds nothing: no overlap)
    return None


# the COMMIT fields that move action states or change files: a commit holding one may
# reach into a guarded scope without writing a key there (an undo's compensations, a
# workspace declared in the scope), so it conflicts with every guarded scope
_REACHING = ("files", "compensate", "redo", "unredo")  # (all kept in ``txns`` rows too)


def _check_scopes(txid: int, other: Any, field, scopes: list) -> None:
    """ConflictError when the commit whose COMMIT fields ``field(name, default)`` gives
    belongs to, or may reach into, one of the guarded ``scopes`` (see ReadSet.scopes).
    A scope matches as ``ScopeRange.same`` does: a tag or declared scope starting with it,
    of the same type."""
    def inside(declared: Any) -> bool:
        return any(s is None or (declared is not None and type(declared) is type(s)
                                 and declared.startswith(s)) for s in scopes)
    why = None
    if None in scopes:
        why = "committed"
    elif inside(field("scope", None)):
        why = "committed in its scope"
    elif any(isinstance(a, dict) and inside(a.get("scope")) for a in field("actions", ()) or ()):
        why = "ran an action declared in its scope"
    elif any(field(f, None) for f in _REACHING):
        why = "changed files or action states"
    if why is not None:
        raise ConflictError(f"transaction {txid} guards {_scopes_shown(scopes)}, and "
                            f"transaction {other} {why} after it started; nothing was "
                            f"written", [])


def _check_fence(txid: int, other: Any, field, fence: Any) -> None:
    """ConflictError when the commit whose COMMIT fields ``field(name, default)`` gives
    is a rewind reaching into scope ``fence`` (unscoped, or scoped to a prefix of it) or a
    purge whose range holds the scope's start (see ReadSet.fence); a tuple fence: into
    any of its scopes."""
    if isinstance(fence, (tuple, list)):  # (work for several scopes: a tool booking in
        for one in fence:  # two sessions' fenced only the first, and the second's rewind
            _check_fence(txid, other, field, one)  # let its booking stand: stop 75)
        return
    what = _undo_reaches(field, fence)
    if what is not None:
        raise ConflictError(f"transaction {txid} works for scope {fence!r}, which "
                            f"transaction {other} {what} after it started; nothing was "
                            f"written", [])


def _undo_reaches(field, scope: Any) -> str | None:
    """"rewound" when the commit whose COMMIT fields ``field(name, default)`` gives is a
    rewind reaching into ``scope`` (unscoped, or scoped to a prefix of it), "purged" when
    it is a purge whose range holds the scope's start; else None.  The one rule of undo
    fences (``_check_fence``) and of the scopes prepared transactions work for
    (``PreparedSet.check_undo``)."""
    if field("rewound_to", None) is not None:
        undone = field("scope", None)
        # (a str scope and a bytes one never meet; a str subclass — an enum.StrEnum
        # member, which check_scope takes and the log records as its text — is a str: by
        # exact type, one held in memory let a rewind of its text through, which the same
        # store reopened refused — stop 75's review)
        kind = str if isinstance(scope, str) else bytes if isinstance(scope, bytes) else None
        if undone is None or (kind is not None and isinstance(undone, kind)
                              and scope.startswith(undone)):
            return "rewound"
        return None
    rng = field("purge_range", None)
    if rng:
        lo = encode_prefix(scope)
        if lo >= rng[0] and (rng[1] is None or lo < rng[1]):
            return "purged"
    return None


def _check_files(txid: int, other: Any, field) -> None:
    """ConflictError when the commit whose COMMIT fields ``field`` gives changed files
    (see ReadSet.files)."""
    if field("files", None):
        raise ConflictError(f"transaction {txid} restores files, and transaction {other} "
                            f"changed files after it started; nothing was written", [])


def _scopes_shown(scopes: list) -> str:
    return ("the whole store" if None in scopes
            else "scope " + ", ".join(repr(s) for s in scopes))


def _raise(txid: int, stale: list) -> None:
    names = [_show(k) for k in stale[:5]]
    raise ConflictError(f"transaction {txid} read {names} which another transaction wrote "
                        f"after it started; nothing was written", names)


def _show(k: bytes) -> Any:
    try:
        return decode_key(k)
    except ValueError:
        return k


@dataclass
class Prepared:
    """A prepared (in-doubt) transaction: its PREPARE record's content."""

    gid: str
    txid: int
    writes: list            # [(key, value|None)]
    read_keys: list
    read_ranges: list
    meta: Any = None
    actions: list = field(default_factory=list)  # ids of its actions
    ts: float = 0.0
    extra: dict = field(default_factory=dict)
    scope: Any = None
    # the rows of its actions, when only its PREPARE row holds them (written by walstore
    # 0.1.0, which logged no intents of a prepared transaction's actions and kept whole
    # action rows in the row's ``actions``): agent.twophase records them at the decision
    legacy_actions: list = field(default_factory=list)
    # False: ``writes`` holds the keys only (each value None): the one ``PreparedSet``
    # keeps (see ``keys_only``); the values are read from the PREPARE's row when needed
    values: bool = True
    # the scopes it works for besides ``scope``: its undo fence(s) and the scopes its
    # actions were declared in (a tuple); a rewind reaching into one of those or into
    # ``scope``, or a purge across one, is refused while it is in doubt
    # (``PreparedSet.check_undo``).  None: a PREPARE written before walstore recorded it
    # (the open reads its actions' scopes from their rows)
    fence: tuple | None = None

    def keys_only(self) -> "Prepared":
        """This transaction without its written values: what the prepared set keeps.
        (It kept every in-doubt transaction's values in memory, from the prepare, and
        from every open for as long as they stayed in doubt: 300 in doubt writing 1 MiB
        each, 530 MB of anonymous memory at open — audit 58.)  The holds need the keys
        only; ``commit_prepared`` and ``prepared_details`` read the values from the row."""
        if not self.values:
            return self
        return replace(self, writes=[(k, None) for k, _v in self.writes], values=False)

    def body(self) -> dict:
        """The PREPARE record's payload (without ``w``: the writes go beside it)."""
        return {"gid": self.gid, "tx": self.txid, "r": list(self.read_keys),
                "rr": [list(r) for r in self.read_ranges], "meta": self.meta,
                "actions": list(self.actions), "ts": self.ts, "extra": self.extra,
                "scope": self.scope, "fence": list(self.fence or ())}

    @classmethod
    def from_row(cls, row: dict) -> "Prepared":
        """A PREPARE row (or record body) as decoded; its ``actions`` are action ids, or
        (a row written by walstore 0.1.0) whole action rows: ids, and those rows."""
        listed = list(row.get("actions", []))
        legacy = [dict(a) for a in listed if isinstance(a, dict)]
        ids = [str(a["id"]) if isinstance(a, dict) else a for a in listed]
        fence = row.get("fence")
        if fence is not None or legacy:  # (0.1.0's action rows say their scopes)
            fence = works_for(None, fence, [a.get("scope") for a in legacy])
        return cls(row["gid"], row["tx"], [tuple(w[:2]) for w in row.get("w", [])],
                   list(row.get("r", [])), [tuple(r) for r in row.get("rr", [])],
                   row.get("meta"), ids, row.get("ts", 0.0),
                   dict(row.get("extra") or {}), row.get("scope"), legacy, fence=fence)

    @property
    def written(self) -> set:
        return {k for k, _v in self.writes}


def _held_by(gid: str, e: ConflictError) -> ConflictError:
    """``e`` marked as held off by prepared transaction ``gid`` (``e.held_by``): no retry
    clears it until the transaction is decided (a session's rewind retried it 8 times,
    ~1.3 s, before saying so)."""
    e.held_by = gid  # type: ignore[attr-defined]
    return e


def works_for(scope: Any, fence: Any, action_scopes=()) -> tuple:
    """The scopes a transaction works for, each once, in order: ``scope`` (its own), its
    undo fence (one scope, or a tuple or list of them) and ``action_scopes`` (those its
    actions were declared in); None is left out."""
    fences = fence if isinstance(fence, (tuple, list)) else (fence,)
    # (a dict keeps each once, in order: a list's ``not in`` compared every pair, and a
    # transaction with 20,000 actions each in its own scope took 4.6 s to prepare, and as
    # long at every open while it stayed in doubt — stop 75's review)
    out = dict.fromkeys(s for s in (scope, *fences, *action_scopes) if s is not None)
    return tuple(out)


class PreparedSet:
    """The in-doubt transactions of this store and the keys and ranges they hold.

    Every commit asks ``check`` while anything is prepared, so its cost grows with what
    the committing transaction wrote, read and scanned, never with what the prepared ones
    hold: their keys are indexed (``_held``: written or read; ``_written``; ``_order``,
    the written keys in order for scanned ranges), their read ranges kept apart
    (``_ranged``).  (Each commit rebuilt the written-key set of every prepared transaction
    and compared its reads with each: one in-doubt bulk load of 40,000 keys made every
    other commit take 30 ms, 2,000 single puts a minute.)  Changed under the journal lock
    (``add``, ``remove``), as ``check`` reads it."""

    def __init__(self) -> None:
        self.by_gid: dict[str, Prepared] = {}
        # key -> the gids holding it (several: prepared transactions that read the same
        # key; one gid per key lost the others' holds when it ended)
        self._held: dict[bytes, set[str]] = {}
        self._written: dict[bytes, set[str]] = {}  # key -> the gids that wrote it
        self._order = KeyIndex()  # the keys of ``_written``, in order
        self._ranged: dict[str, RangeSet] = {}  # gid -> its read ranges (those with some)
        self._txids: dict[int, int] = {}  # txid -> its prepared gids (how many)
        # gid -> the scopes it works for (``works_for``; those with some): asked by undos
        # alone (``check_undo``), never by the other commits
        self.works: dict[str, tuple] = {}

    def __contains__(self, gid: str) -> bool:
        return gid in self.by_gid

    def __bool__(self) -> bool:
        return bool(self.by_gid)

    def add(self, p: Prepared) -> None:
        p = p.keys_only()  # (the values stay in the log and LMDB: see Prepared.keys_only)
        self.by_gid[p.gid] = p
        written = p.written
        for k in written | set(p.read_keys):
            self._held.setdefault(k, set()).add(p.gid)
        for k in written:
            gids = self._written.get(k)
            if gids is None:
                gids = self._written[k] = set()
                self._order.add(k)
            gids.add(p.gid)
        if p.read_ranges:
            self._ranged[p.gid] = RangeSet(p.read_ranges)
        scopes = works_for(p.scope, p.fence)
        if scopes:
            self.works[p.gid] = scopes
        self._txids[p.txid] = self._txids.get(p.txid, 0) + 1

    def remove(self, gid: str) -> Prepared:
        p = self.by_gid.pop(gid)
        written = p.written
        for k in written | set(p.read_keys):
            holders = self._held.get(k)
            if holders is not None:
                holders.discard(gid)
                if not holders:
                    del self._held[k]
        for k in written:
            gids = self._written.get(k)
            if gids is not None:
                gids.discard(gid)
                if not gids:
                    del self._written[k]
                    self._order.discard(k)
        self._ranged.pop(gid, None)
        self.works.pop(gid, None)
        n = self._txids.get(p.txid, 0) - 1
        if n > 0:
            self._txids[p.txid] = n
        else:
            self._txids.pop(p.txid, None)
        return p

    def txids(self) -> set[int]:
        return set(self._txids)

    def holds_txid(self, txid: int) -> bool:
        """Is transaction ``txid`` prepared (in doubt) here?  (No copy of the set.)"""
        return txid in self._txids

    def check(self, txid: int, pairs, reads: ReadSet | None, mine: str | None = None,
              who: str | None = None) -> None:
        """ConflictError when the transaction (its writes as ``(key, value)`` pairs, and
        its reads) collides with a prepared one: it writes a key one holds (wrote or
        read) or into a range one scanned, reads a key one wrote, or scans a range holding
        one's write.  Nothing prepared: no cost (every commit comes here)."""
        if not self.by_gid:
            return
        writes = [k for k, _v in pairs]
        held = self._held
        out = [(k, g) for k in writes if k in held for g in sorted(held[k]) if g != mine]
        if reads is not None:
            written = self._written
            # the smaller side walked (under the commit lock: a lookup per key read made
            # every commit with a big read set wait while anything was prepared —
            # probe-audit55)
            keys = reads.keys if len(reads.keys) <= len(written) else \
                [k for k in written if k in reads.keys]
            for k in keys:
                gids = written.get(k)
                if gids:
                    out += [(k, g) for g in sorted(gids) if g != mine]
            ranges = reads.ranges if reads.held_ranges is None else reads.held_ranges
            for lo, hi in ranges or ():
                for k in self._order.range(lo, hi):
                    out += [(k, g) for g in sorted(written.get(k, ())) if g != mine]
        if writes:
            for gid, read_ranges in self._ranged.items():
                if gid != mine:
                    out += [(k, gid) for k in writes if k in read_ranges]
        if out:
            names = list(dict.fromkeys(_show(k) for k, _g in out))[:5]  # (once each)
            gids = sorted({g for _k, g in out})
            raise ConflictError(f"{who or f'transaction {txid}'} touches {names}, held by "
                                f"prepared (in-doubt) transaction(s) {gids}", names)

    def check_undo(self, field, who: str) -> None:
        """ConflictError when the commit whose COMMIT fields ``field(name, default)`` gives
        is a rewind reaching into a scope a prepared transaction works for (its own, its
        undo fence's, one of its actions was declared in; unscoped, or scoped to a prefix
        of it), or a purge across one: the rule of undo fences (``_check_fence``).  Had
        it committed first, the undo would have undone it (and compensated its actions);
        committed after, its work would stand in a scope the undo said was as of the
        point, or erased (a booking of a rewound session's turn, never compensated).  Its
        commit is promised (prepared): the undo waits for the decision instead.  Asked of
        undos and purges alone (``CommitPipeline``, ``Undo``)."""
        for gid, scopes in self.works.items():
            for scope in scopes:
                if _undo_reaches(field, scope) is not None:
                    raise _held_by(gid, ConflictError(
                        f"{who} reaches into scope {scope!r}, which prepared (in-doubt) "
                        f"transaction {gid!r} works for: decide it first "
                        f"(commit_prepared or rollback_prepared; from a shell `walstore "
                        f"commit-prepared` or `rollback-prepared`); nothing was changed",
                        []))
