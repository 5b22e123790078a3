"""The replica's manifest: the one object that says what a replica holds.

Owns its document (msgpack, key ``manifest`` under the replica URL), the check of its
structure when it is read (a replica is untrusted input: every field used has its type,
every object key lies in the replica's layout), its conditional
save (If-None-Match for the first, If-Match on the etag last written after that: a
writer that lost the replica to another can never overwrite its manifest), and the
planning a restore does from it without listing anything: which snapshot, which WAL
objects, where the replay starts, and where a hole makes a target unreachable.

Document (short keys, sizes bounded by compaction and retention)::

    v, store_id (bytes16), lineage, identity (the STORE document), created, updated, seq,
    writer   {id, host, pid, path}            who wrote this version
    position the shipped LSN: every record below it is in a WAL object listed here
    open     {txid: first LSN} transactions in flight at ``position``
    wal      [{k, seg, a, b, n, lv, t0, t1, x0, x1, om}]  WAL objects in LSN order:
             key, segment start (CRC salt), LSN range [a, b), bytes, level (0 shipped,
             >0 merged), first/last commit time, min/max commit txid, and ``om``: the
             lowest first-LSN of the transactions in flight at ``a`` (None: none)
    snapshots [{k, lsn, n, sha, st, keys, ts, lc, pg}]  LMDB copies by applied LSN, their
             sha256, and the state digest (sha256 over sorted data rows) for ``replicas
             --verify``; ``k`` None: the empty store at LSN 0 (a replica that holds the
             whole log); ``lc`` its newest commit; ``pg`` (one taken past the position)
             the purges between that position and it (nil: not known)
    holes    [{a, b, reason, ts, pg}]  LSN ranges the replica lost (the shipper fell
             behind a trimmed WAL); a restore to a point inside one is refused by name;
             ``pg`` the purges committed in the range (as a WAL object's; nil: not known,
             a restore to a point before the hole is refused; absent in older manifests)
    points   {name: {lsn, ts, dropped}}  restore points seen in the log
    trash    [[key, ts]]  objects no longer listed, deleted after a grace period
    last_commit {ts, tx}
    complete_to  a time: the replica holds every commit stamped at or before it (the
             shipper's round noted it with the log's end and then shipped up to that end);
             a restore to a later time is refused.  Absent (nil) in a manifest an older
             walstore wrote: no such check (see docs/REPLICATION.md)
"""
from __future__ import annotations

import math
import time

import msgpack

from ..codec import DECODE_ERRORS
from ..errors import ReplicationError
from .targets import REPLICA_DIRS, ManifestTooLarge, ObjectStore, PreconditionFailed, \
    TargetError, in_replica_layout

MANIFEST_KEY = "manifest"
FORMAT = 1


def _lc_of(snap: dict) -> bool:
    """Whether a snapshot's entry records its newest commit (``lc``), at or below its LSN."""
    lc = snap.get("lc")
    return (isinstance(lc, dict) and isinstance(lc.get("lsn"), int)
            and isinstance(lc.get("tx"), int) and lc["lsn"] <= snap["lsn"])


class Manifest:
    def __init__(self, doc: dict, etag: str | None = None) -> None:
        self.doc = doc
        self.etag = etag

    @classmethod
    def new(cls, store_id: bytes, lineage: str, identity: dict) -> "Manifest":
        now = time.time()
        return cls({"v": FORMAT, "store_id": store_id, "lineage": lineage,
                    "identity": identity, "created": now, "updated": now, "seq": 0,
                    "writer": None, "position": None, "open": {}, "wal": [],
                    "snapshots": [], "holes": [], "points": {}, "trash": [],
                    "last_commit": None, "complete_to": None})

    @classmethod
    def load(cls, target: ObjectStore, max_bytes: int) -> "Manifest | None":
        got = target.get(MANIFEST_KEY, max_bytes)
        if got is None:
            return None
        return cls(decode(got[0], target.url), got[1])

    # ---- fields ------------------------------------------------------------------------
    @property
    def wal(self) -> list[dict]:
        return self.doc["wal"]

    @property
    def snapshots(self) -> list[dict]:
        return self.doc["snapshots"]

    @property
    def position(self) -> int | None:
        return self.doc["position"]

    @property
    def open(self) -> dict[int, int]:
        return self.doc["open"]

    def encode(self) -> bytes:
        return msgpack.packb(self.doc, use_bin_type=True)

    def save(self, target: ObjectStore, writer: dict, max_bytes: int | None = None) -> None:
        """Write this version conditionally; PreconditionFailed when another writer did.
        ``max_bytes``: the readers' bound (``max_manifest_bytes``): a larger manifest is
        not written (ManifestTooLarge): one was, and then no restore, and no shipper of the
        next open, could read the replica again."""
        self.doc["seq"] += 1
        self.doc["updated"] = time.time()
        self.doc["writer"] = writer
        data = self.encode()
        if max_bytes is not None and len(data) > max_bytes:
            self.doc["seq"] -= 1  # (not written: the next save is the next version)
            raise ManifestTooLarge(
                f"the replica's manifest would be {len(data):,} bytes, over max_manifest_bytes "
                f"({max_bytes:,}), the bound its readers refuse past: not written (the replica "
                f"keeps its last manifest; nothing ships past it). It lists "
                f"{len(self.doc['points']):,} restore point(s), dropped ones kept for "
                f"restores to times before the drop, {len(self.doc['wal']):,} WAL object(s) "
                f"and {len(self.doc['snapshots']):,} snapshot(s) within retention: shorten "
                f"retention, or raise max_manifest_bytes (for restores too)")
        try:
            if self.etag is None:
                self.etag = target.put(MANIFEST_KEY, data, if_none_match=True)
            else:
                self.etag = target.put(MANIFEST_KEY, data, if_match=self.etag)
        except PreconditionFailed:
            # A lost response to a write that did land looks the same: check the content.
            # (One larger than ours is another's: the bound is not an error here.  It
            # failed the round "larger than the N byte bound", not a transient error,
            # when a previous writer's late PUT had landed: probe-repl2.)
            try:
                got = target.get(MANIFEST_KEY, len(data) + 1)
            except TargetError as e:
                if e.transient:
                    self.doc["seq"] -= 1
                    raise
                got = None
            if got is not None and got[0] == data:
                self.etag = got[1]
                return
            self.doc["seq"] -= 1
            raise
        except BaseException:
            self.doc["seq"] -= 1
            raise

    # ---- planning ----------------------------------------------------------------------
    def index_at(self, lsn: int) -> int | None:
        """Index of the WAL entry holding ``lsn`` (a <= lsn < b), by bisection."""
        wal = self.wal
        lo, hi = 0, len(wal)
        while lo < hi:
            mid = (lo + hi) // 2
            if wal[mid]["b"] <= lsn:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(wal) and wal[lo]["a"] <= lsn < wal[lo]["b"]:
            return lo
        return None

    def wal_start_for(self, applied: int) -> int | None:
        """Where the WAL must be replayed from on top of a snapshot at ``applied``: the
        transactions in flight there began earlier (None: not known yet)."""
        i = self.index_at(applied)
        if i is not None:
            e = self.wal[i]
            return e["a"] if e["om"] is None else min(e["a"], e["om"])
        if self.position is not None and applied == self.position:
            return min([applied] + list(self.open.values()))
        return None

    def hole_at(self, lsn: int) -> dict | None:
        for h in self.doc["holes"]:
            if h["a"] <= lsn < h["b"]:
                return h
        return None

    def chain(self, start: int, end: int) -> list[dict]:
        """The WAL entries covering [start, end), contiguous; a gap raises, naming it."""
        if end <= start:
            return []
        i = self.index_at(start)
        if i is None:
            raise ReplicationError(self.gap_message(start, start + 1))
        out = []
        pos = start
        while pos < end:
            if i >= len(self.wal):
                if self.hole_at(pos) is not None:  # (named: it said only "the replica's
                    raise ReplicationError(self.gap_message(pos, end))  # WAL ends at ...")
                raise ReplicationError(f"the replica's WAL ends at LSN {pos}, before LSN {end}")
            e = self.wal[i]
            if e["a"] > pos:
                raise ReplicationError(self.gap_message(pos, e["a"]))
            out.append(e)
            pos = e["b"]
            i += 1
        return out

    def gap_message(self, a: int, b: int) -> str:
        """The error for LSN a..b missing: the recorded hole holding ``a`` named, if any."""
        h = self.hole_at(a)
        if h is not None:
            return (f"hole in the replica's WAL: LSN {h['a']}..{h['b']} is missing "
                    f"({h.get('reason', 'lost')}); no restore can cross it")
        return f"hole in the replica's WAL: no WAL object holds LSN {a}..{b}"

    def plan(self, cut: int) -> tuple[dict, list[dict], int]:
        """(snapshot, WAL entries, replay start) for a restore whose log ends at ``cut``:
        the newest snapshot at or before it from which the WAL reaches the cut."""
        return next(iter(self.plans(cut)))

    def plans(self, cut: int):
        """Every plan ``plan`` could make, newest snapshot first (a restore falls back to
        the next when a snapshot's object is missing or damaged); raises, as ``plan``
        does, when there is none."""
        first_error = None
        found = False
        for snap in sorted(self.snapshots, key=lambda s: s["lsn"], reverse=True):
            if snap["lsn"] > cut:
                continue
            start = self.wal_start_for(snap["lsn"])
            if start is None:
                if self.hole_at(snap["lsn"]) is not None:
                    first_error = first_error or ReplicationError(
                        self.gap_message(snap["lsn"], snap["lsn"] + 1))
                continue
            try:
                chain = self.chain(start, cut)
            except ReplicationError as e:
                first_error = first_error or e
                self.plan_error = e  # (why an older snapshot cannot stand in: a hole)
                continue
            found = True
            yield snap, chain, start
        if found:
            return
        if first_error is not None:
            raise first_error
        raise ReplicationError(f"the replica has no snapshot at or before LSN {cut} from which "
                               f"its WAL reaches that point{self.history_note(cut - 1)}")

    def base_past_end(self) -> dict | None:
        """The newest snapshot past the replica's WAL end that a restore of everything
        restores as it is; else None.  It holds every commit up to its LSN (LMDB applies
        in log order), and it is listed only once its PUT landed (a restore checks its
        size, sha256 and state digest).  Two shapes leave one: a round that met a hole
        took one and the WAL was never shipped to it (walstores before stop 67 stopped the
        round at the frontier read before the hole; a writer may die between the
        snapshot's manifest write and the WAL after it) — no plan reaches the end, and
        every such restore was refused ("no restore can cross" the hole); and a round's
        ordinary snapshot, of LMDB applied past the WAL the round read, its writer dead
        before its next round — the WAL reaches its own end from an older snapshot, and a
        restore of everything gave the state there, the commits the snapshot holds past
        it lost (audit 68).  In that second shape only a snapshot that records its newest
        commit (``lc``: the history a writer taking the replica over is checked against)."""
        bases = self.bases_past_end()
        return bases[0] if bases else None

    def bases_past_end(self) -> list[dict]:
        """The snapshots ``base_past_end`` may restore, newest first: a restore falls back
        to the next when one is missing or damaged (it fell back to the WAL's end, the
        commits an older snapshot past it holds lost: audit 68 review)."""
        if self.position is None:
            return []
        past = [s for s in self.snapshots if s["lsn"] > self.position]
        if past and self.reaches_end():
            past = [s for s in past if s["k"] is not None and s.get("sha") and _lc_of(s)]
        return sorted(past, key=lambda s: s["lsn"], reverse=True)

    def reaches_end(self) -> bool:
        """Whether a plan (a snapshot and the WAL after it) reaches the replica's end."""
        try:
            next(iter(self.plans(self.end())))
        except ReplicationError:
            return False
        return True

    def history_note(self, lsn: int | None = None) -> str:
        """Where the replica's history begins (its oldest snapshot), and why nothing before
        it is restorable, when ``lsn`` (None: any) lies before it: refusals of a txid, a
        time or an LSN from before it said only that the replica's WAL did not hold it
        ("LSN 0..N" of an empty WAL), as if the replica had never had it."""
        first = min((s["lsn"] for s in self.snapshots), default=None)
        if first is None or first == 0 or (lsn is not None and lsn >= first):
            return ""
        return (f"; the replica's history begins at LSN {first}: what was logged before it "
                f"was dropped by the replica's retention, or before replication to it began, "
                f"and is not restorable from it")

    def end(self) -> int:
        return self.position if self.position is not None else 0

    @property
    def complete_to(self) -> float | None:
        """The time up to which the replica holds every commit (None: not recorded)."""
        return self.doc.get("complete_to")

    # ---- retention ---------------------------------------------------------------------
    def retention(self, now: float, keep_seconds: float, keep_count: int) -> list[str]:
        """Drop snapshots past retention (keeping ``keep_count``), and the WAL, holes and
        points only they needed; returns the keys to move to the trash."""
        snaps = sorted(self.snapshots, key=lambda s: s["lsn"])
        usable = [s for s in snaps if self.wal_start_for(s["lsn"]) is not None]
        if not usable:
            return []
        keep = [s for s in usable if s["ts"] >= now - keep_seconds] or []
        for s in usable[-keep_count:]:
            if s not in keep:
                keep.append(s)
        keep.sort(key=lambda s: s["lsn"])
        oldest = keep[0]
        floor = self.wal_start_for(oldest["lsn"])
        dropped = [s for s in snaps if s["lsn"] < oldest["lsn"]]
        trash = [s["k"] for s in dropped if s["k"] is not None]
        self.doc["snapshots"] = [s for s in snaps if s["lsn"] >= oldest["lsn"]]
        old_wal = [e for e in self.wal if e["b"] <= floor]
        trash += [e["k"] for e in old_wal]
        self.doc["wal"] = [e for e in self.wal if e["b"] > floor]
        self.doc["holes"] = [h for h in self.doc["holes"] if h["b"] > floor]
        self.doc["points"] = {n: p for n, p in self.doc["points"].items()
                              if p["lsn"] >= oldest["lsn"]}
        return trash

    def to_trash(self, keys: list[str], now: float) -> None:
        self.doc["trash"].extend([k, now] for k in keys)


def decode(data: bytes, where: str) -> dict:
    """The manifest document in ``data``, its structure checked: every field restore,
    ``replicas`` and the shipper read has its type, and every object key it lists lies in
    the replica's own layout.  A damaged or tampered one is a ReplicationError naming the
    field (it was a raw TypeError / KeyError / AttributeError from deep in a restore, and
    a key such as ``wal/../../x`` named a file outside the replica)."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except DECODE_ERRORS as e:
        raise ReplicationError(f"the manifest at {where} is damaged: {e}") from None
    if not isinstance(doc, dict) or doc.get("v") != FORMAT:
        raise ReplicationError(f"the manifest at {where} is not a walstore manifest of "
                               f"format {FORMAT}")
    for k in ("wal", "snapshots", "holes", "points", "trash", "open"):
        if k not in doc:
            raise ReplicationError(f"the manifest at {where} lacks {k!r}")
    try:
        _check(doc)
    except _Bad as e:
        raise ReplicationError(f"the manifest at {where} is damaged: {e}") from None
    return doc


class _Bad(Exception):
    pass


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _lsn(v) -> bool:
    return _int(v) and v >= 0


# The times a manifest holds are ``time.time()`` stamps: finite and within what a
# datetime shows (1970 .. 9999).  A NaN, an infinite or an out-of-range one (a flipped
# bit) passed as "a number", and `walstore replicas` then failed as "an unexpected
# error" (OverflowError / ValueError from showing it), `restore --to TIME` as a usage
# error ("cannot convert float NaN to integer"), while `replicas --json` exited 0.
_LAST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z


def _time(v) -> bool:
    return _num(v) and math.isfinite(v) and 0 <= v <= _LAST_TIME


def _opt(check):
    return lambda v: v is None or check(v)


def _str(v) -> bool:
    return isinstance(v, str)


def _key_in(*dirs: str):
    """An object key one level under one of ``dirs`` (``wal/<name>``), nothing else."""
    def ok(v) -> bool:
        if not isinstance(v, str) or not in_replica_layout(v):
            return False
        head, _, name = v.partition("/")
        return head in dirs and name not in ("", ".", "..")
    return ok


# field -> (check, what it must be); the entries of lists and maps below.
_TOP = {"store_id": (lambda v: isinstance(v, bytes) and len(v) == 16, "16 bytes"),
        "lineage": (_str, "a str"), "identity": (lambda v: isinstance(v, dict), "a map"),
        "created": (_time, "a time"), "updated": (_time, "a time"),
        "seq": (_int, "an integer"), "writer": (_opt(lambda v: isinstance(v, dict)),
                                                "a map or nil"),
        "position": (_opt(_lsn), "an LSN or nil"),
        "last_commit": (_opt(lambda v: isinstance(v, dict)), "a map or nil")}
_WAL = {"k": (_key_in("wal"), "a WAL object key of this replica (wal/NAME)"),
        "seg": (_lsn, "an LSN"), "a": (_lsn, "an LSN"), "b": (_lsn, "an LSN"),
        "n": (_lsn, "a size"), "lv": (_lsn, "a level"), "t0": (_opt(_time), "a time or nil"),
        "t1": (_opt(_time), "a time or nil"), "x0": (_opt(_int), "a txid or nil"),
        "x1": (_opt(_int), "a txid or nil"), "om": (_opt(_lsn), "an LSN or nil")}
_SNAP = {"k": (_opt(_key_in("snapshots")), "a snapshot key of this replica "
                                            "(snapshots/NAME) or nil"),
         "lsn": (_lsn, "an LSN"), "n": (_lsn, "a size"), "sha": (_opt(_str), "a str or nil"),
         "st": (_opt(_str), "a str or nil"), "keys": (_lsn, "a count"),
         "ts": (_time, "a time")}
_HOLE = {"a": (_lsn, "an LSN"), "b": (_lsn, "an LSN"), "reason": (_str, "a str"),
         "ts": (_time, "a time")}
_POINT = {"lsn": (_lsn, "an LSN"), "ts": (_opt(_time), "a time or nil"),
          "dropped": (_opt(_lsn), "an LSN or nil")}


def _shown(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields(d, spec: dict, name: str) -> None:
    if not isinstance(d, dict):
        raise _Bad(f"{name} is {_shown(d)}, not a map")
    for k, (ok, what) in spec.items():
        if k not in d:
            raise _Bad(f"{name or 'it'} lacks {k!r}")
        if not ok(d[k]):
            raise _Bad(f"{name + '.' if name else ''}{k} is {_shown(d[k])}, not {what}")


def _list(doc: dict, field: str) -> list:
    v = doc[field]
    if not isinstance(v, list):
        raise _Bad(f"{field} is {_shown(v)}, not a list")
    return v


def _purge_marks(v, a: int, b: int) -> bool:
    """``v`` lists purges as ``[[LSN in [a, b), prefix], ...]`` (a WAL object's or a
    hole's ``pg``)."""
    return isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and _lsn(p[0]) and a <= p[0] < b
        and isinstance(p[1], (str, bytes)) and p[1] for p in v)


def _check(doc: dict) -> None:
    _fields(doc, _TOP, "")
    if not _opt(_time)(doc.get("complete_to")):  # (optional: older manifests lack it)
        raise _Bad(f"complete_to is {_shown(doc['complete_to'])}, not a time or nil")
    last = doc["last_commit"]
    if last is not None:  # (`walstore replicas` shows its time and txid)
        if not _opt(_time)(last.get("ts")):
            raise _Bad(f"last_commit.ts is {_shown(last['ts'])}, not a time or nil")
        if not _opt(_int)(last.get("tx")):
            raise _Bad(f"last_commit.tx is {_shown(last['tx'])}, not a txid or nil")
    for i, e in enumerate(_list(doc, "wal")):
        _fields(e, _WAL, f"wal[{i}]")
        if not e["seg"] <= e["a"] <= e["b"]:
            raise _Bad(f"wal[{i}] covers LSN {e['a']}..{e['b']} of segment {e['seg']}")
        if "pg" in e and not _purge_marks(e["pg"], e["a"], e["b"]):
            # (optional: objects shipped before it was kept carry no marks)
            raise _Bad(f"wal[{i}].pg is {_shown(e['pg'])}, not [[an LSN in it, a prefix], ...]")
    for i, e in enumerate(_list(doc, "snapshots")):
        _fields(e, _SNAP, f"snapshots[{i}]")
        if e["k"] is not None and not isinstance(e["sha"], str):
            raise _Bad(f"snapshots[{i}].sha is nil for snapshot {e['k']}")
        # (optional: the purges between the position it was taken at and it; nil: not
        # known — a restore reads them: untrusted input, as a hole's)
        if e.get("pg") is not None and not _purge_marks(e["pg"], 0, e["lsn"]):
            raise _Bad(f"snapshots[{i}].pg is {_shown(e['pg'])}, not [[an LSN below it, a "
                       f"prefix], ...] or nil")
    for i, e in enumerate(_list(doc, "holes")):
        _fields(e, _HOLE, f"holes[{i}]")
        # (optional: holes recorded before it was kept carry none; nil: the source could
        # not tell which purges the lost range held)
        if e.get("pg") is not None and not _purge_marks(e["pg"], e["a"], e["b"]):
            raise _Bad(f"holes[{i}].pg is {_shown(e['pg'])}, not [[an LSN in it, a prefix], "
                       f"...] or nil")
    for i, e in enumerate(_list(doc, "trash")):
        if not (isinstance(e, list) and len(e) == 2 and _key_in(*REPLICA_DIRS)(e[0])
                and _time(e[1])):
            raise _Bad(f"trash[{i}] is {_shown(e)}, not [an object key of this replica, "
                       f"a time]")
    for field in ("points", "open"):
        if not isinstance(doc[field], dict):
            raise _Bad(f"{field} is {_shown(doc[field])}, not a map")
    for name, p in doc["points"].items():
        if not isinstance(name, str):
            raise _Bad(f"points has the name {_shown(name)}, not a str")
        _fields(p, _POINT, f"points[{name!r}]")
    for tx, lsn in doc["open"].items():
        if not (_int(tx) and _lsn(lsn)):
            raise _Bad(f"open has {_shown(tx)}: {_shown(lsn)}, not txid: LSN")
