"""Restore a store from its replica, keep a follower current, and inspect a replica.

Owns :func:`restore` (newest snapshot at or before the target, then the WAL objects the
manifest lists, checked contiguous by LSN and CRC, cut exactly at the target), the
restored log writer (:class:`RestoredLog`: segment files named by start LSN, records
re-framed under a new salt where a restored segment starts somewhere the original did
not, a SEAL written only once its successor exists, as the writer's rotation does),
:func:`follow` (a read-only copy that keeps applying new WAL objects, its rounds retried
with backoff through transient target errors, stopped by a local write failing: a full
DEST said as such, ``local_error``), the blobs a copy's history names
(:class:`_BlobFetcher`: never a LIST of ``blobs/``), and
:func:`replicas` (listing, and ``--verify``: every object the manifest lists read back
and checked, one at a time, its restore points against the WAL, then a full restore and a
state digest).

Targets: ``None`` (everything), an int (a txid: its commit), ``walstore.LSN(n)`` (the
records at or before log position n), a str (a restore point name), or an aware
``datetime`` (the last commit at or before it).  A restore point name is resolved in the
replica's history, as a txid, an LSN or a time is: a point the source dropped later still
names the position it was made at (the restored copy holds it, alive, as the source did
then); a name the replica never saw is ``UnknownRestorePoint`` (a
``walstore.UnknownPoint``).  The manifest's LSN for a point is checked against the WAL
(the record there must make that point) before anything is restored; a manifest whose
WAL objects reach past its position is refused as damaged.  The restored log holds
exactly the records up to the cut; transactions in flight there are losers when the store
opens (their actions listed as pending, never run automatically: see ``origin`` below).
The report lists them (``in_flight_txids``, a transaction whose only effects are file changes
included) and their file effects (``owed_file_effects``): a copy does not undo those (held),
so the files on disk may still hold what the restored state does not.

The restored ``STORE`` file carries ``"origin": {"kind": "restore", "from": <URL without
credentials>, "lineage": <new uuid hex>, "parent_lineage", "cut", "compensate"}``: a new
lineage, so the restored store may replicate to a new URL without clashing.
Nothing is visible at ``dest`` until the restore is complete (built beside it, renamed);
of restores racing to one ``dest`` one rename lands, the others raise ``ReplicationError``
("exists and is not empty"), and a follower's copy is locked before it appears (the loser of
followers started together is refused with ``StoreLocked``).
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import lmdb
import msgpack

from ..codec import DECODE_ERRORS
from .. import fileio
from ..errors import (CorruptionError, PointTypeError, ReplicationError, UnknownRestorePoint,
                      WalstoreError, os_errors_wrapped)
from ..log.format import LSN
from ..engine.apply import KEEP_RECENT_PURGES
from ..files.blobs import BlobStore
from ..signals import Flag
from ..engine.layout import (FORMAT_VERSION, check_version, enclosing_store, identity_bytes,
                              store_path)
from . import logformat, source as _src
from .manifest import MANIFEST_KEY, Manifest, decode
from .options import DAY, ReplicateOptions
from .shipper import BLOB_PREFIX, _end_unrestorable, remove_scratch, sweep_dead_scratch
from .targets import NOT_MODIFIED, ObjectStore, TargetError, display_url, open_target

RESTORE_TEMP = "walstore-restore-"  # + pid + "-": a restore's fetched objects
FOLLOW_TEMP = "walstore-follow-"    # + pid + "-": a follower's
VERIFY_TEMP = "walstore-verify-"    # + pid + "-": `replicas --verify`'s objects and copies

MAX_SNAPSHOT_BYTES = 1 << 40
MAX_BLOB_BYTES = 1 << 40
FIRST_SIZE = 1 << 20
# a follower's first preallocated file while the source's segment size is not known yet
# (doubling from here, up to it once known): 1 MiB for a source of 64 KiB segments kept
# DEST's WAL over its bound until the first apply trimmed it
FOLLOW_FIRST_SIZE = 64 << 10
SEGMENT_SIZE = 16 << 20
# a follower applies its log to LMDB (and trims it) whenever this many bytes were appended
# since it last did, whatever ``apply_every`` says: the WAL a follower holds stays bounded
# when it has a large backlog to catch up on, or is restarted before a long REDO finishes
APPLY_STEP = 4 << 20


# ---- the restored log -----------------------------------------------------------------
class RestoredLog:
    """Writes records into segment files of a restored store's ``wal/``.

    A new file starts where the original log started a segment (its records are copied
    byte for byte), at the first record written, at a SEAL record's end, and when the
    current file is full (``prealloc``: files are created at their full size, as a
    follower's readers need — they map a segment once, at the size its header records;
    otherwise they grow and only the last is padded).

    A preallocated file is sized to what it will hold, never a fixed 16 MiB: the rest of
    its source segment where the replica's manifest shows that segment ended (``know``:
    the next segment's start is its SEAL's end), else the largest whole source segment
    seen (the source's own segment size, as near as the replica tells it), at most
    ``SEGMENT_SIZE``.  A source of 64 KiB segments made a follower 16 MiB files, one per
    source segment (a follower's disk 70-90x the source's and replica's; probe 57).

    A SEAL is written the way the writer's rotation writes it: the records before it
    made durable, its successor created (durably) where it ends, then the SEAL written
    and synced.  A sealed file therefore always has its successor, whenever the process
    stops (a follower killed or interrupted there leaves a crash image ``verify`` and
    ``open`` accept: at worst an unsealed file ending one SEAL short of its successor).
    """

    def __init__(self, wal_dir: str, store_id: bytes, prealloc: bool) -> None:
        self.dir = wal_dir
        self.store_id = store_id
        self.prealloc = prealloc
        self.start = -1
        self.fd = -1
        self.salt = 0
        self.offset = 0
        self.size = 0
        self.end = None       # LSN after the last record written
        self.next_size = FOLLOW_FIRST_SIZE if prealloc else FIRST_SIZE
        self.bytes = 0
        self.seg_ends: dict[int, int] = {}  # source segment start -> its end (SEAL's end)
        self.seg_size = 0  # the largest whole source segment seen, header included

    def know(self, wal: list[dict]) -> None:
        """Learn where source segments ended from the manifest's WAL entries (in LSN
        order): an entry followed, with no gap, by one starting a new segment."""
        for e, nxt in zip(wal, wal[1:]):
            if nxt["seg"] != e["seg"] and e["b"] == nxt["a"] == nxt["seg"] > e["seg"]:
                self.seg_ends[e["seg"]] = nxt["seg"]
                self.seg_size = max(self.seg_size,
                                    logformat.HEADER_SIZE + nxt["seg"] - e["seg"])
        if self.start >= 0:  # (only the current file's segment and later are needed)
            self.seg_ends = {s: n for s, n in self.seg_ends.items() if n > self.start}

    @classmethod
    def resume(cls, wal_dir: str, store_id: bytes) -> "RestoredLog":
        """Continue the last segment file of an existing restored log."""
        log = cls(wal_dir, store_id, prealloc=True)
        segs = [(int(n[:20]), n) for n in os.listdir(wal_dir)
                if len(n) == 24 and n.endswith(".wal") and n[:20].isdigit()]
        if not segs:
            return log
        start, name = max(segs)
        path = os.path.join(wal_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        salt = logformat.salt(store_id, start)
        off, lsn = logformat.HEADER_SIZE, start
        after_seal = False
        for rec in logformat.iter_records(data, off, lsn, salt, len(data)):
            off, lsn, after_seal = off + rec.size, rec.end, rec.type == logformat.SEAL
        log.start, log.salt, log.offset, log.size, log.end = start, salt, off, len(data), lsn
        # the doubling goes on from the file it continues, until ``know`` learns the
        # source's segment size (it was 16 MiB at once: every follower — ``follow``
        # resumes the log its restore wrote — whose replica showed no segment's end yet
        # made its next file 16 MiB for a source of 256 KiB segments, and on a disk with
        # 600 KB free stopped, "16777216 needed": audit 66)
        log.next_size = min(SEGMENT_SIZE, max(FOLLOW_FIRST_SIZE, 2 * len(data)))
        if after_seal:  # sealed with no successor (left by an older follower): make it now
            log._open_new(lsn, 0, lsn)
            return log
        log.fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        return log

    def append(self, lsn: int, raw: bytes, seg: int, rtype: int) -> None:
        if self.end is not None and lsn != self.end:
            raise ReplicationError(f"restored log is at LSN {self.end}, next record is at {lsn}")
        need = len(raw)
        if (self.fd < 0 or (lsn == seg and self.start != seg)
                or (self.prealloc and self.offset + need > self.size)):
            self._roll(lsn, need, seg)
        data = raw if self.start == seg else logformat.reframe(raw, self.salt)
        if rtype == logformat.SEAL:
            self._seal(data, lsn)
        else:
            try:
                _pwrite(self.fd, data, self.offset)
            except OSError as e:
                raise self._named(e, self.start, need) from e
            self.offset += need
        self.end = lsn + need
        self.bytes += need

    def _named(self, e: OSError, start: int, need: int | None = None) -> OSError:
        """``e`` naming the segment file at ``start`` (a write or sync of the restored log
        failing with no file said: "[Errno 28] No space left on device", which a
        follower printed as it was, whether DEST's disk or the temp directory's was full),
        and on a full disk the bytes ``need``ed and free (``local_error``)."""
        return local_error(e, os.path.join(self.dir, f"{start:020d}.wal"), need)

    def _seal(self, data: bytes, lsn: int) -> None:
        """Write a SEAL at ``lsn`` in the writer's order (see the class docstring) and go
        on in its successor."""
        os.fdatasync(self.fd)  # (the records before it: no gap before a durable successor)
        fd, offset = self.fd, self.offset
        self.fd = -1
        start = self.start
        try:
            self._open_new(lsn + len(data), 0, lsn + len(data))
        except BaseException:
            self.fd = fd
            raise
        try:
            fileio.fault_point("restore.seal")  # (tests: stopped between the two)
            _pwrite(fd, data, offset)
            os.fsync(fd)
        except OSError as e:
            raise self._named(e, start) from e
        finally:
            os.close(fd)

    def start_at(self, lsn: int) -> None:
        """An empty log beginning at ``lsn`` (the snapshot's LSN): a store whose LMDB is
        applied up to an LSN must have its log begin there — no segment at all reads as
        segments lost (a gap)."""
        self._roll(lsn, 0, None)
        self.end = lsn

    def roll(self) -> None:
        """Go on in a new file at the log's end: the current one is closed as it is
        (unsealed, its records ending where the new file begins, as a full preallocated
        file is left), wholly behind the end, so a trim can remove it (a purge's erasure:
        its records hold the purged bytes).  Later records of the same source segment are
        re-framed under the new file's salt."""
        if self.end is not None and self.fd >= 0 and self.start < self.end:
            self._roll(self.end, 0, None)

    def _roll(self, lsn: int, need: int, seg: int | None) -> None:
        self._close_file()
        self._open_new(lsn, need, seg)

    def _open_new(self, lsn: int, need: int, seg: int | None) -> None:
        """A new file at ``lsn`` for records of the source segment starting at ``seg``."""
        size = logformat.HEADER_SIZE
        if self.prealloc:
            end = self.seg_ends.get(seg) if seg is not None else None
            if end is not None and end > lsn:  # the rest of a segment known to have ended
                size = logformat.HEADER_SIZE + end - lsn
            elif self.seg_size:
                size = min(self.next_size, self.seg_size)
            else:
                size = self.next_size
            size = max(size, logformat.HEADER_SIZE + need)
        try:
            path = _src.new_segment_file(self.dir, self.store_id, lsn, size)
        except OSError as e:
            raise self._named(e, lsn, size) from e
        self.next_size = min(SEGMENT_SIZE, self.next_size * 2)
        self.fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self.start, self.salt = lsn, logformat.salt(self.store_id, lsn)
        self.offset, self.size = logformat.HEADER_SIZE, size

    def sync(self) -> None:
        if self.fd >= 0:
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                raise self._named(e, self.start) from e

    def finish(self) -> None:
        """Leave room for the restored store's own appends, make everything durable."""
        if self.fd >= 0 and not self.prealloc:
            room = max(FIRST_SIZE, self.offset // FIRST_SIZE * FIRST_SIZE + FIRST_SIZE)
            try:
                os.ftruncate(self.fd, room)
            except OSError as e:
                raise self._named(e, self.start) from e
        self._close_file()
        _src.fsync_dir(self.dir)

    def _close_file(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise self._named(e, self.start) from e
            fd, self.fd = self.fd, -1
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # out of room on a local disk (or quota)


def local_error(e: OSError, path: str, need: int | None = None) -> OSError:
    """``e``, an OS error writing the local file ``path`` (a restore's or a follower's:
    DEST's segments and blobs, the objects fetched into the temp directory), naming that
    file when it names none, and when the disk is out of room (ENOSPC, EDQUOT) saying how
    many bytes its file system has free and, when known, how many were ``need``ed: "No
    space left on device (4096 bytes free there, 262144 needed)" — a full DEST is told
    from a full temp directory, and from the replica's own errors."""
    name = e.filename if e.filename is not None else path
    if e.errno is None:  # (a new error all the same: its callers raise it ``from e``, and
        return OSError(f"{e}: {name}")  # ``e`` returned was made its own cause)
    if e.errno not in ROOM_ERRNOS:  # (a new error: raised ``from e``, never from itself)
        return OSError(e.errno, e.strerror, name, None, e.filename2)
    free = fileio.free_bytes(os.path.dirname(os.path.abspath(os.fsdecode(name))))
    said = [f"{free} bytes free there" if free is not None else None,
            f"{need} needed" if need is not None else None]
    detail = ", ".join(x for x in said if x)
    strerror = e.strerror or os.strerror(e.errno)
    return OSError(e.errno, f"{strerror} ({detail})" if detail else strerror, name, None,
                   e.filename2)


class _Sink:
    """The local file a download writes into, its write errors kept (``error``): a target
    takes any failure of a download for the request's (S3: a transient "GET ...:
    OSError", retried for ever; a ``file://`` replica's OS errors are retried as its
    mount's), and a follower on a full disk retried the same blob for ever, its message
    naming the replica's object, never the disk that was full.  ``download_into`` lets the
    local error out instead."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def download_into(tgt: ObjectStore, key: str, f, max_bytes: int):
    """``tgt.download(key, f, max_bytes)``; writing ``f`` failing (a full disk, EIO) is
    that OSError, not the target's error for the request (see ``_Sink``)."""
    sink = _Sink(f)
    try:
        return tgt.download(key, sink, max_bytes)
    except Exception as e:
        if sink.error is not None:
            raise sink.error from None
        if isinstance(e, OSError) and not isinstance(e, WalstoreError):
            # the replica's own read (a file:// replica's disk: EIO): let out raw, it was
            # taken for a local write's and named DEST's file ("Input/output error:
            # DEST/files/blobs/..."): audit 66.  Not retried, as before (a follower's
            # target, _ReplicaReads, retries them: it never lets one reach here)
            raise TargetError(f"downloading {key} of the replica "
                              f"{display_url(getattr(tgt, 'url', '?'))} failed: "
                              f"{e.strerror or e}"
                              + (f" ({e.filename})" if e.filename else ""), False) from e
        raise


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ---- fetching objects -----------------------------------------------------------------
class _ObjectGone(ReplicationError):
    """A WAL object the manifest read lists is missing: damage (a hole), unless the
    replica's writer dropped it since (merged into a larger one, or past retention, and
    deleted ``delete_grace`` later): see ``_dropped_since``."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _dropped_since(tgt: ObjectStore, opts: ReplicateOptions, key: str) -> bool | None:
    """Does the replica's manifest now no longer list object ``key`` (a WAL object or a
    snapshot: its writer compacted or retained it away since the manifest that listed
    it was read)?  None (falsy) when the manifest could not be read: it cannot tell."""
    try:
        m = Manifest.load(tgt, opts.max_manifest_bytes)
    except ReplicationError:
        return None
    if m is None:
        return None
    return all(e["k"] != key for e in m.wal) and all(sn["k"] != key for sn in m.snapshots)


GONE_RETRIES = 5  # restores begun again from a fresh manifest when its objects were dropped


class _Fetcher:
    """Downloads WAL objects into a private temp dir (once each) and reads them back."""

    def __init__(self, target: ObjectStore, store_id: bytes, tmp: str) -> None:
        self.target = target
        self.store_id = store_id
        self.tmp = tmp
        self.files: dict[str, str] = {}
        self.bytes = 0

    def path(self, entry: dict) -> str:
        key = entry["k"]
        if key not in self.files:
            p = os.path.join(self.tmp, f"obj-{len(self.files)}")
            try:
                with open(p, "wb") as f:
                    got = _retry(lambda: self._download(key, f, entry["n"]))
            except OSError as e:  # (the temp directory's disk full: named, never retried)
                fileio.remove_quietly(p)
                raise local_error(e, p, entry["n"]) from e
            if got is None:
                raise _ObjectGone(
                    f"hole in the replica's WAL: object {self.target.url}/{key} (LSN "
                    f"{entry['a']}..{entry['b']}) is listed in the manifest but missing", key)
            if got[0] != entry["n"]:
                raise ReplicationError(f"WAL object {key} is {got[0]} bytes, the manifest "
                                       f"says {entry['n']}")
            self.bytes += got[0]
            self.files[key] = p
        return self.files[key]

    def _download(self, key, f, n):
        f.seek(0)
        f.truncate()
        return download_into(self.target, key, f, n)

    def records(self, entry: dict):
        """(lsn, type, raw, synced) of one object, every check done as they stream."""
        key = entry["k"]
        with open(self.path(entry), "rb") as f:
            try:
                head, _hs = logformat.read_object_header(f)
                if (head["seg"], head["first"], head["end"]) != (entry["seg"], entry["a"],
                                                                  entry["b"]):
                    raise ValueError("its header does not match the manifest")
                yield from logformat.iter_object_records(f, head, self.store_id, key)
            except ValueError as e:
                raise ReplicationError(f"WAL object {self.target.url}/{key} is damaged: {e}"
                                       ) from None

    def drop(self, entry: dict) -> None:
        p = self.files.pop(entry["k"], None)
        if p:
            os.unlink(p)


def _retry(fn, attempts: int = 5):
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except ReplicationError as e:
            if not getattr(e, "transient", False) or i == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2


# ---- targets ------------------------------------------------------------------------
class TimeText(_dt.datetime):
    """A time the command line read from ``--to TEXT``, keeping ``text``: a restore point
    the replica holds under exactly that name is restored to instead (see ``_resolve``)."""
    text: str = ""

    @classmethod
    def of(cls, when: _dt.datetime, text: str) -> "TimeText":
        t = cls(when.year, when.month, when.day, when.hour, when.minute, when.second,
                when.microsecond, tzinfo=when.tzinfo, fold=when.fold)
        t.text = text
        return t


def _past_end_note(m: Manifest) -> str:
    """What a snapshot past the replica's WAL's end holds, for a refusal of a target
    between the two (its commits, points and times are restorable only all together)."""
    past = m.base_past_end()
    if past is None:
        return ""
    tx = (past.get("lc") or {}).get("tx")
    return (f"; the replica's snapshot at LSN {past['lsn']}, past its WAL's end, holds the "
            f"commits after it{f' (up to transaction {tx})' if tx is not None else ''}: a "
            f"restore of everything restores that snapshot, and they are not restorable one "
            f"by one until its writer ships the WAL to it")


def _resolve(m: Manifest, fetch: _Fetcher, to: Any) -> tuple[int | None, str]:
    """The boundary LSN B (records with LSN <= B are kept; None: everything)."""
    end = m.end()
    if to is None:
        return None, "everything"
    settle = getattr(to, "settle", None)  # (a point the command line spelled tx:N, lsn:N
    if settle is not None:                 # or name:NAME: walstore.cli.output.settle_point)
        to = settle(m.doc["points"])
    if isinstance(to, TimeText) and to.text in m.doc["points"]:
        # (``--to NAME`` of a point named by its ISO time, as agents name them, restored
        # the state at that time, another one, exit 0, while ``rewind --to NAME`` read
        # the point, and ``replicas`` shows names as ``restore --to`` takes them back)
        to = to.text
    if isinstance(to, LSN):
        if to < 0 or to >= end:
            raise UnknownRestorePoint(f"LSN {int(to)} is not in the replica (it ends at LSN "
                                      f"{end})", to)
        return int(to), f"LSN {int(to)}"
    if isinstance(to, bool):
        raise PointTypeError("a restore target is a txid, walstore.LSN, a restore point name "
                             "or an aware datetime, not a bool", to)
    if isinstance(to, int):
        for e in reversed(m.wal):
            if e["x0"] is not None and e["x0"] <= to <= e["x1"]:
                for lsn, rtype, raw, _s in fetch.records(e):
                    if rtype == logformat.COMMIT and logformat.summarize(
                            rtype, raw[logformat.RECORD_HEADER_SIZE:]).get("tx") == to:
                        return lsn, f"transaction {to}"
        # (a hole's lost commits are not known by txid: it is named, as a restore needing
        # it is refused naming it, never as if the transaction had not committed)
        lost = "".join(f"; the replica lost LSN {h['a']}..{h['b']} ({h['reason']}): a "
                       f"transaction committed there cannot be restored"
                       for h in m.doc["holes"])
        held = (f"LSN {m.wal[0]['a']}..{end}" if m.wal else f"none: it ends at LSN {end}")
        raise UnknownRestorePoint(f"transaction {to} is not among the commits the replica's "
                                  f"WAL holds ({held}){lost}{m.history_note()}"
                                  f"{_past_end_note(m)}", to)
    if isinstance(to, str):
        p = m.doc["points"].get(to)
        if p is None:
            known = ", ".join(sorted(m.doc["points"])) or "none"
            first = min((s["lsn"] for s in m.snapshots), default=None)
            # (a replica whose history begins at LSN 0 dropped nothing: a name it never
            # saw was told it "was dropped by the replica's retention, or was made before
            # replication to it began", neither of which can be — audit 61)
            since = ("" if first is None or first == 0 else
                     f"; the replica's history begins at LSN {first}: a point from before "
                     f"it was dropped by the replica's retention, or was made before "
                     f"replication to it began, and is not restorable from it (a restore "
                     f"of everything may still hold it among the copy's restore points, "
                     f"from the source's history: read it there with store.at(name))")
            raise UnknownRestorePoint(f"no restore point named {to!r} in the replica "
                                      f"(known: {known}){since}", to)
        past = m.base_past_end()
        if p["lsn"] >= end and past is not None and p["lsn"] < past["lsn"]:
            # (named in a snapshot past the WAL's end: audit 68 review; it failed "the
            # replica's WAL ends at LSN D, before LSN P+1".  A point past the end that no
            # such snapshot holds is the manifest's damage, said by _check_point_record,
            # exit 1 — not a usage error)
            raise UnknownRestorePoint(f"restore point {to!r} (LSN {p['lsn']}) lies past the "
                                      f"replica's WAL's end (LSN {end}){_past_end_note(m)}",
                                      to)
        _check_point_record(m, fetch, to, p["lsn"])
        if isinstance(p.get("dropped"), int):  # (history: see the module docstring)
            return p["lsn"], f"restore point {to!r} (dropped later, at LSN {p['dropped']})"
        return p["lsn"], f"restore point {to!r}"
    if isinstance(to, _dt.datetime):
        if to.tzinfo is None or to.utcoffset() is None:
            raise ValueError("a restore time must be timezone-aware (e.g. 2026-05-01T12:00Z)")
        _refuse_past_complete(m, to)
        return _cut_at_time(m, fetch, to)
    raise PointTypeError(f"a restore target is a txid, walstore.LSN, a restore point name or "
                         f"an aware datetime, not {type(to).__name__}", to)


def _point_mismatch(name: str, lsn: int, rtype: int | None, info: dict) -> str | None:
    """Why the record at ``lsn`` (``rtype``, its summary ``info``; None: no record starts
    there) is not the making of restore point ``name``; None when it is."""
    if rtype is None:
        return "no record of the replica's WAL starts there"
    if rtype != logformat.RESTORE_POINT:
        return f"the record there is of type {rtype}, not a restore point"
    if info.get("drop"):
        return f"the record there drops restore point {info.get('name')!r}"
    if info.get("name") != name:
        return f"the record there makes restore point {info.get('name')!r}"
    return None


def _check_point_record(m: Manifest, fetch: _Fetcher, name: str, lsn: int) -> None:
    """The manifest's LSN for restore point ``name`` must be where the WAL logged that
    point (a RESTORE_POINT record of that name): a damaged or tampered manifest restored
    another state silently, or a copy lacking the very point it was restored to.  A point
    no listed WAL object reaches is left to the plan (no restore can reach it either)."""
    entry = next((e for e in m.wal if e["a"] <= lsn < e["b"]), None)
    if entry is None:
        return
    rtype, info = None, {}
    for r_lsn, r_type, raw, _s in fetch.records(entry):
        if r_lsn == lsn:
            rtype = r_type
            info = logformat.summarize(r_type, raw[logformat.RECORD_HEADER_SIZE:])
            break
        if r_lsn > lsn:
            break
    why = _point_mismatch(name, lsn, rtype, info)
    if why is not None:
        raise ReplicationError(f"the replica's manifest puts restore point {name!r} at LSN "
                               f"{lsn}, but {why}: the manifest is damaged; nothing restored")


def _refuse_past_complete(m: Manifest, to: _dt.datetime) -> None:
    """A time after the one the replica is known complete up to (``complete_to``) is
    refused, as a txid or LSN past its end is: a commit logged before ``to`` may not have
    been shipped (acknowledged while the server failed), and the cut would silently be a
    prefix of what the source held at ``to`` (it was: exit 0, commit missing, probe-repl2).
    A manifest without the field (an older walstore wrote it) is not checked."""
    complete = m.complete_to
    # (compared at the microsecond its datetime shows, as every stamp is: the time this
    # message names, or `walstore replicas` shows, is accepted; the shipper's complete_to
    # lies a microsecond below the time it vouches for, so rounding up stays inside it)
    if complete is None or _micros(to) <= _stamp_micros(complete):
        return
    when = _dt.datetime.fromtimestamp(complete, _dt.timezone.utc)
    raise UnknownRestorePoint(
        f"{to.isoformat()} is after the time the replica is known complete up to "
        f"({when.isoformat()}, {max(0.0, to.timestamp() - complete):.1f} s earlier): a "
        f"commit logged between them may not be in the replica yet; restore to a time at "
        f"or before {when.isoformat()}, or to the replica's end (no target), or sync the "
        f"source and wait for its shipper (an idle one renews this time every "
        f"complete_every seconds)", to)


def _cut_at_time(m: Manifest, fetch: _Fetcher, to: _dt.datetime) -> tuple[int, str]:
    """The boundary of a restore to a time: every record logged at or before it.  From the
    last commit stamped at or before ``to``, the records after it are kept up to the first
    one stamped later (commits, intents, restore points and prepares carry the time they
    were logged): a restore point made, or an action begun, after that commit and before
    ``to`` is in the copy, as in the source at that time.  A record with no stamp (an
    action's result) lying between is kept; nothing stamped later is, nor the WRITES chunks
    just before a later one (appended with it), nor file steps logged later (FILE_STEPS and
    WATCH_BEGIN carry ``ts``: unstamped, a transaction begun after ``to`` that touched a file
    was restored as in flight at it, its file change owed: probe-repl44; logs written before
    the stamp keep those records as before).  With no
    commit at or before ``to``, the cut starts at the first stamped record if it is at or
    before ``to`` (a restore point made on a fresh store before its first commit: the copy
    holds it, as a restore to its name does); when nothing is, the time names no state
    the replica has: ``UnknownRestorePoint`` (an ``UnknownPoint``, exit 2 on the CLI), as
    a txid or a time past the replica's end is (it was a plain ``ReplicationError``,
    exit 1, probe-docs).

    Stamps are compared with ``to`` at a datetime's resolution, the microsecond (a stamp
    read as the datetime ``datetime.fromtimestamp`` makes of it): a commit's own time
    (``TxnInfo.timestamp`` as a datetime) includes that commit.  (Full-precision float
    stamps against ``to.timestamp()`` left it out whenever its stamp had digits past the
    microsecond.)"""
    t = _micros(to)
    # The cut is a prefix of the log: it ends before the first record stamped later than
    # ``to``.  Commit stamps are the wall clock's, which may step back (NTP, a VM restored
    # from a snapshot): the search for where to start never passes the first WAL object
    # holding a commit stamped later (``t1``).  Sought from the last object whose first
    # commit is at or before ``to``, it started in an object logged after a step back
    # (its stamps an hour early) and the copy held the commits stamped after ``to``
    # before it (audit 67); a commit after the cut stamped at or before ``to`` (the
    # stamps went back) leaves no prefix that is the state at ``to``: refused, see
    # _refuse_stamps_back.
    limit = next((i for i, e in enumerate(m.wal)
                  if e["t1"] is not None and _stamp_micros(e["t1"]) > t), len(m.wal) - 1)
    first = next((i for i in range(limit, -1, -1)
                  if m.wal[i]["t0"] is not None and _stamp_micros(m.wal[i]["t0"]) <= t),
                 None)
    # no commit at or before ``to``: the records logged before the first commit (a restore
    # point made on a fresh store, an action begun) may still be; from the WAL's first
    # record, any stamped one at or before ``to`` starts the cut (it was refused)
    any_stamp = first is None
    seen = False  # a commit (any_stamp: a stamped record) at or before ``t`` met
    kept = None  # the last record met, once the scan started
    before_chunks, in_chunks = None, False  # the record kept before a run of WRITES chunks
    prev_end = None  # where the entry before ``e`` ended (a gap after it: a hole)
    for i, e in enumerate(m.wal[first or 0:], start=first or 0):
        if prev_end is not None and e["a"] > prev_end:
            # the cut is not decided before a hole: the records the replica lost there
            # may be stamped at or before ``to`` (the first one after it is later, or
            # unstamped).  Cut before it, the copy was a silent prefix of the source's
            # state at ``to`` (exit 0, every commit of the hole missing)
            raise ReplicationError(f"{m.gap_message(prev_end, e['a'])}; the records it "
                                   f"lost may be logged at or before {to.isoformat()}, so "
                                   f"no restore to that time is exact; nothing restored")
        prev_end = e["b"]
        records = fetch.records(e)
        for lsn, rtype, raw, _s in records:
            ts = logformat.summarize(rtype, raw[logformat.RECORD_HEADER_SIZE:]).get("ts")
            stamped = isinstance(ts, (int, float)) and not isinstance(ts, bool)
            if stamped and _stamp_micros(ts) > t:
                # (the stamps going back after it — the clock stepped — leave no prefix
                # that is the state at ``to``: refused, see there)
                _refuse_stamps_back(m, to, lsn, ts, records, i)
                if seen:
                    # a large commit's WRITES chunks are appended with it, under one
                    # lock: they are as late as it is (kept, the copy took a transaction
                    # begun after ``to`` for one in flight at it)
                    cut = before_chunks if in_chunks else kept
                    return cut, f"the last record at or before {to.isoformat()}"
                if any_stamp:
                    break  # (the first stamped record is later: nothing is at or before)
                raise UnknownRestorePoint(  # (a commit at or before ``to`` follows, t0:
                    # refused above; kept should the manifest's t0 be wrong)
                    f"{to.isoformat()} names no state of the replica: the record at LSN "
                    f"{lsn} is stamped later ({_iso(ts)}) and comes before every commit "
                    f"at or before it (the source's clock stepped back); restore to a "
                    f"txid or a walstore.LSN instead", to)
            if stamped and (any_stamp or rtype == logformat.COMMIT):
                seen = True
            elif any_stamp and not seen:
                continue  # (nothing is kept before the first stamped record)
            if rtype == logformat.WRITES:
                if not in_chunks:
                    before_chunks, in_chunks = kept, True
            elif rtype != logformat.SEAL:  # (a large write set spans segments)
                in_chunks = False
            kept = lsn
        else:
            continue
        break
    if not seen:
        raise UnknownRestorePoint(f"{to.isoformat()} is before the first commit the replica "
                                  f"holds (and before any restore point or action logged "
                                  f"ahead of it): it names no state the replica has"
                                  f"{m.history_note()}", to)
    return kept, f"the last record at or before {to.isoformat()}"


def _refuse_stamps_back(m: Manifest, to: _dt.datetime, lsn: int, ts: float, rest: Iterator,
                        index: int) -> None:
    """UnknownRestorePoint when a commit after the record at ``lsn`` (stamped ``ts``, later
    than ``to``: where the cut ends) is stamped at or before ``to``: the rest of its WAL
    object (``rest``, the records after it) and the first commit of every later object
    (the manifest's ``t0``) are looked at.  The stamps then went back (the source's clock
    stepped back, or ran ahead and was set right): the log holds states on both sides of
    ``to`` in either order, and no prefix of it is the state at that time.  The prefix
    before ``lsn`` was restored, exit 0 (a clock a day ahead for a minute: a restore to
    now held nothing committed since that minute: audit 67)."""
    t = _micros(to)
    back = None
    for r_lsn, r_type, raw, _s in rest:
        if r_type == logformat.COMMIT:
            r_ts = logformat.summarize(r_type, raw[logformat.RECORD_HEADER_SIZE:]).get("ts")
            if isinstance(r_ts, (int, float)) and not isinstance(r_ts, bool) \
                    and _stamp_micros(r_ts) <= t:
                back = f"the commit at LSN {r_lsn} is stamped {_iso(r_ts)}"
                break
    if back is None:
        later = next((e for e in m.wal[index + 1:] if e["t0"] is not None
                      and _stamp_micros(e["t0"]) <= t), None)
        if later is None:
            return
        back = (f"a commit from LSN {later['a']} on is stamped {_iso(later['t0'])}")
    raise UnknownRestorePoint(
        f"{to.isoformat()} names no one state of the replica: the record at LSN {lsn} is "
        f"stamped later ({_iso(ts)}), but {back}, at or before it — the source's clock "
        f"stepped back (or ran ahead and was set right), so the log holds states from "
        f"both sides of that time; restore to a txid or a walstore.LSN instead", to)


def _iso(ts: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return repr(ts)


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_MICRO = _dt.timedelta(microseconds=1)


def _micros(when: _dt.datetime) -> int:
    """An aware datetime as whole microseconds since the epoch (exact)."""
    return (when - _EPOCH) // _MICRO


def _stamp_micros(ts: float) -> int:
    """A record's float stamp as the microsecond its datetime shows (rounded as
    ``datetime.fromtimestamp`` rounds it)."""
    try:
        return _micros(_dt.datetime.fromtimestamp(ts, _dt.timezone.utc))
    except (OverflowError, OSError, ValueError):  # (a stamp no datetime holds)
        return round(ts * 1_000_000)


# ---- restore ------------------------------------------------------------------------
def load_manifest(target: ObjectStore, opts: ReplicateOptions) -> Manifest:
    m = _retry(lambda: Manifest.load(target, opts.max_manifest_bytes))
    if m is None:
        raise ReplicationError(f"no replica at {target.url} (no manifest)")
    return m


@os_errors_wrapped  # (a full disk, EIO: a StoreIOError, never a raw OSError)
def restore(url: str, dest: str, to: Any = None, replicate_options: Any = None, *,
            compensate: bool = False, follow: bool = False, target: ObjectStore | None = None,
            progress: Callable[[int, int], None] | None = None,
            _snapshot: dict | None = None, _cut_end: int | None = None,
            _locks: list | None = None, _scratch: bool = False) -> dict:
    """Rebuild a store at ``dest`` (absent or empty) from the replica at ``url``.

    ``_locks`` (the follower's): DEST's writer lock is taken in the staging directory
    before it is renamed into place, and appended to ``_locks`` (the caller releases it).

    A WAL object the manifest listed that is gone when it is fetched, and no longer
    listed by the replica's manifest now, was dropped by its live writer meanwhile
    (compaction merged it, retention passed it; deleted ``delete_grace`` later): the
    restore begins again from the manifest now (up to ``GONE_RETRIES`` times).  A restore
    longer than ``delete_grace`` (600 s) of a replica being written failed near its end
    with "hole in the replica's WAL ... listed in the manifest but missing"."""
    for attempt in range(GONE_RETRIES):
        try:
            return _restore_from(url, dest, to, replicate_options, compensate=compensate,
                                 follow=follow, target=target, progress=progress,
                                 _snapshot=_snapshot, _cut_end=_cut_end, _locks=_locks,
                                 _scratch=_scratch)
        except _ObjectGone as e:
            if attempt == GONE_RETRIES - 1 or _snapshot is not None:
                raise  # (a stand-in's or verify's check: its caller's manifest decides)
            opts = ReplicateOptions.from_any(replicate_options)
            tgt = target if target is not None else open_target(url, opts)
            try:
                if not _dropped_since(tgt, opts, e.key):
                    raise  # (still listed: damage, a hole)
            finally:
                if target is None:
                    tgt.close()
    raise AssertionError("unreachable")


def _restore_from(url: str, dest: str, to: Any = None, replicate_options: Any = None, *,
                  compensate: bool = False, follow: bool = False,
                  target: ObjectStore | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  _snapshot: dict | None = None, _cut_end: int | None = None,
                  _locks: list | None = None, _scratch: bool = False) -> dict:
    """One attempt of ``restore``, from the manifest as it is now."""
    t_start = time.monotonic()
    lock = None
    opts = ReplicateOptions.from_any(replicate_options)
    # checked as open() checks a store path: "" restored into the current directory
    # (open("") is refused), and a bytes DEST, which open() takes, failed with a raw
    # "startswith first arg must be bytes"
    dest = os.path.abspath(store_path(dest))
    if os.path.islink(dest):  # (checked first: the whole download was wasted, then the
        # rename into place failed with a raw ENOTDIR — a link, dangling or to a directory)
        raise ReplicationError(f"restore destination {dest} is a symbolic link (to "
                               f"{os.readlink(dest)}): name a directory that is not a link "
                               f"(the finished copy is renamed into place); nothing was done")
    if not _scratch:  # (verify's and the stand-in check's own copies, in the temp
        _refuse_dest_inside(url, dest)  # directory, whatever the replica's path)
    staging = f".{fileio.scratch_stem(os.path.basename(dest))}.restoring-"
    inside = fileio.stage_inside(dest)  # (see below)
    if inside:  # (what a killed restore staged inside DEST, before DEST is checked)
        sweep_dead_scratch(dest, staging)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        from ..ops.backup import what_dest_holds
        taken = _DestTaken(f"restore destination {dest} exists and is not empty"
                           + what_dest_holds(dest, "restore"))
        taken.usage = True  # (found before anything was done: the command line's usage
        raise taken         # error, exit 2, as backup's; a race lost later is not)
    tgt = target if target is not None else open_target(url, opts)
    parent = os.path.dirname(dest)
    _src.make_dir(parent) if not os.path.isdir(parent) else None
    # scratch named by pid: a restore killed mid-way left a full-size staging directory
    # beside DEST (and a fetch directory in /tmp) for good; the next restore removes them.
    # Beside DEST, renamed over it; inside an empty DEST that is a mount point (a rename
    # over it failed with a raw EBUSY) or whose parent cannot be written, moved up
    if inside:
        parent = dest
    sweep_dead_scratch(parent, staging)
    sweep_dead_scratch(tempfile.gettempdir(), RESTORE_TEMP)
    stage = tempfile.mkdtemp(prefix=f"{staging}{os.getpid()}-", dir=parent)
    tmp = tempfile.mkdtemp(prefix=f"{RESTORE_TEMP}{os.getpid()}-")
    try:
        m = load_manifest(tgt, opts)
        # a replica of a newer walstore's store is refused before anything is fetched
        ident = m.doc.get("identity")
        check_version(ident.get("version") if isinstance(ident, dict) else None,
                      f"the replica {display_url(url)}")
        store_id = m.doc["store_id"]
        past = _end_mismatch(m)
        if past is not None and m.wal[-1]["b"] > m.end():
            # a position lowered (damage, tampering) made a restore of everything a silent
            # prefix of the replica, the objects listed past it ignored (verify's check)
            raise ReplicationError(f"the replica's manifest is damaged: {past} (objects are "
                                   f"listed past its position); nothing restored")
        fetch = _Fetcher(tgt, store_id, tmp)
        if _cut_end is not None:
            boundary, what = None, f"end LSN {_cut_end}"
            cut_goal = _cut_end
        else:
            boundary, what = _resolve(m, fetch, to)
            cut_goal = m.end() if boundary is None else boundary + 1
        if _snapshot is not None:
            snap, start = _snapshot, m.wal_start_for(_snapshot["lsn"])
            chain = m.chain(start, cut_goal) if start is not None else None
            if chain is None:
                raise ReplicationError(f"snapshot at LSN {snap['lsn']} is not usable")
            plans = iter([(snap, chain, start)])
        else:
            # everything, from a replica whose newest snapshot lies past its WAL's end:
            # that snapshot, as it is (Manifest.base_past_end; a follower still waits for
            # the WAL to reach it: it starts at the WAL's end when a plan reaches it)
            past = (None if boundary is not None or _cut_end is not None
                    else m.base_past_end())
            reaches = past is not None and m.reaches_end()
            if past is not None and follow and reaches:
                past, reaches = None, False
            if past is not None and follow:  # (it said "no restore can cross" the hole)
                raise ReplicationError(
                    f"the replica's WAL ends at LSN {m.end()}, below its newest snapshot "
                    f"(LSN {past['lsn']}): a follower appends the WAL after its copy's end, "
                    f"and none reaches that snapshot yet (its writer ships it in its next "
                    f"round: follow then); `walstore restore` without --follow restores "
                    f"the snapshot as it is; nothing restored")
            # (one damaged or missing: the next older past the WAL's end, then the WAL's
            # end, as before it was listed)
            bases = [] if past is None else [(b, [], b["lsn"]) for b in m.bases_past_end()]
            plans = m.plans(cut_goal) if past is None else iter(bases)
            if reaches:
                plans = itertools.chain(bases, m.plans(cut_goal))
        # the snapshot
        os.chmod(stage, _src.DIR_MODE)
        db = os.path.join(stage, "db")
        wal = os.path.join(stage, "wal")
        _src.make_dir(wal)
        # A snapshot whose object is missing or damaged is stood in for by the next older
        # one the WAL reaches the cut from (the same state: the WAL from there is the
        # history between them), checked below against the skipped one's state digest.
        # (Before, one damaged newest snapshot made every restore refuse, an older
        # snapshot and the WAL after it sound in the replica.)
        skipped: list[dict] = []
        for snap, chain, start in plans:
            shutil.rmtree(db, ignore_errors=True)
            _src.make_dir(db)
            # ``progress``: the bytes downloaded, the snapshot's first (per MiB), then the
            # WAL objects' (per object); the snapshot was not counted, and the download of
            # a large one showed nothing
            snap_n = snap["n"] if snap["k"] is not None else 0
            total = snap_n + sum(e["n"] for e in chain)
            try:
                if snap["k"] is not None:
                    _download_snapshot(tgt, snap, os.path.join(db, "data.mdb"),
                                       None if not progress else
                                       (lambda n: progress(min(n, snap_n), total)))
                    if progress:
                        progress(snap_n, total)
                    applied = _src.read_applied(db)
                else:  # the empty store at LSN 0
                    _src.create_empty_db(db)
                    applied = 0
                if applied != snap["lsn"]:
                    raise ReplicationError(f"snapshot {snap['k']} holds LSN {applied}, the "
                                           f"manifest says {snap['lsn']}")
            except (ReplicationError, CorruptionError) as e:
                if _snapshot is not None:
                    raise
                skipped.append({"snap": snap, "error": str(e)})
                continue
            break
        else:
            first = skipped[0]["error"] if skipped else "no snapshot"
            why = getattr(m, "plan_error", None)
            raise ReplicationError(f"{first}; no older snapshot from which the WAL reaches "
                                   f"the target could stand in for it ({len(skipped)} "
                                   f"tried{'; ' + str(why) if why is not None else ''}); "
                                   f"nothing restored")
        if skipped:  # (a snapshot past the WAL's end has no WAL to stand in for it)
            _check_stand_in(url, tgt, opts, tmp, snap, [k["snap"] for k in skipped
                                                        if k["snap"]["lsn"] <= m.end()])
        # the WAL, cut at the target
        log = RestoredLog(wal, store_id, prealloc=follow)
        log.know(m.wal)
        flight = _InFlight()
        flight.seed(db, applied)
        replayed_purge = False  # (a purge in the restored log: its erasure is owed)
        done = snap_n
        try:
            for e in chain:
                for lsn, rtype, raw, _s in fetch.records(e):
                    if boundary is not None and lsn > boundary:
                        break
                    if _cut_end is not None and lsn + len(raw) > _cut_end:
                        break
                    log.append(lsn, raw, e["seg"], rtype)
                    flight.see(lsn, rtype, raw)
                    if not follow and logformat.is_purge(rtype, raw):
                        replayed_purge = True
                fetch.drop(e)
                done += e["n"]
                if progress:
                    progress(done, total)
            if log.end is None:  # no WAL after the snapshot (it sits at the replica's end,
                log.start_at(applied)  # or at the cut): the log starts, empty, where it does
            log.finish()
        finally:
            log.close()
        cut = log.end if log.end is not None else applied
        if cut < applied:
            cut = applied
        if _cut_end is not None and cut != _cut_end:
            raise ReplicationError(f"the replica's WAL does not end a record at LSN {_cut_end}")
        _src.prepare_restored_db(db, cut, _points_at(m, cut))
        identity = dict(m.doc["identity"])
        identity["version"] = FORMAT_VERSION  # (this walstore wrote the copy: checked above)
        identity["origin"] = {"kind": "restore", "from": display_url(url),
                              "lineage": uuid.uuid4().hex, "parent_lineage": m.doc["lineage"],
                              "cut": cut, "restored": time.time(), "compensate": bool(compensate),
                              "follow": bool(follow)}
        _src.write_file_atomic(os.path.join(stage, "STORE"), identity_bytes(identity))
        # the blobs the restored history refers to (its file tables, read through a
        # read-only open of the staged copy), not every blob the replica ever received
        blobs = _fetch_referenced_blobs(tgt, stage)
        # a purge the replica holds after the cut erases here too, and one in the restored
        # log finishes its erasure (its old segments removed, LMDB compacted), before DEST
        # exists: no file of DEST ever holds the erased bytes (they stayed in DEST's first
        # segment until its first writable open, and a cut before the purge brought the
        # erased keys back for good)
        # (and a restore of everything that fell back from a snapshot past the WAL's end
        # to an older state: the purges only that snapshot's ``pg`` records — they came
        # back, audit 68 review 5)
        fell_back = (_cut_end is None and not follow
                     and any(s["lsn"] > max(cut, m.end()) for s in m.snapshots))
        purged = (_purges_after(m, fetch, cut, [k["snap"] for k in skipped])
                  if boundary is not None or fell_back else [])
        if purged or replayed_purge:
            _apply_purges(stage, purged)
        if _locks is not None:  # (a follower: DEST's lock is held from the moment it exists)
            from ..engine.layout import Layout, ProcessLock
            lock = ProcessLock(Layout(stage))
        try:  # (any failure from here on releases the lock: the caller never gets it)
            _src.fsync_dir(stage)
            fileio.fault_point("restore.install")  # (tests: concurrent restores meet here)
            _install(stage, dest)
            stage = None
            _src.fsync_dir(parent)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            _locks.append(lock)
        return {"url": display_url(url), "dest": dest, "target": what, "snapshot_lsn": applied,
                "snapshots_skipped": [{"lsn": k["snap"]["lsn"], "key": k["snap"]["k"],
                                       "error": k["error"]} for k in skipped],
                "start_lsn": start, "cut_lsn": cut, "wal_objects": len(chain),
                "wal_bytes": log.bytes, "downloaded_bytes": fetch.bytes + snap["n"],
                "blobs_fetched": blobs.fetched, "blobs_missing": sorted(blobs.missing),
                "in_flight_txids": sorted(flight.opened),
                "purges_applied": [p if isinstance(p, str) else {"hex": p.hex()}
                                   for p in purged],
                "owed_file_effects": flight.owed_files(held=not compensate),
                "lineage": identity["origin"]["lineage"],
                "seconds": round(time.monotonic() - t_start, 3)}
    finally:
        remove_scratch(tmp)
        if stage is not None:
            remove_scratch(stage)
        if target is None:
            tgt.close()


def _check_stand_in(url: str, tgt: ObjectStore, opts: ReplicateOptions, tmp: str,
                    base: dict, skipped: list[dict]) -> None:
    """The restore stands in ``base`` (and the WAL after it) for the ``skipped``
    snapshots, which it could not read: the newest of them whose state digest the manifest
    recorded is rebuilt from ``base`` (a restore cut exactly at its LSN, opened) and
    compared; a mismatch refuses the restore (the WAL between them is not the history the
    skipped snapshot captured)."""
    ref = max((s for s in skipped if s.get("st")), key=lambda s: s["lsn"], default=None)
    if ref is None:
        return
    from .. import open as open_store
    where = os.path.join(tmp, "stand-in")
    try:
        restore(url, where, None, opts, target=tgt, _snapshot=base, _cut_end=ref["lsn"],
                _scratch=True)
        open_store(where).close()
        got = _src.state_digest(os.path.join(where, "db"))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if got["sha256"] != ref["st"]:
        raise ReplicationError(f"snapshot {ref['k']} (LSN {ref['lsn']}) could not be read, and "
                               f"the state rebuilt at its LSN from the snapshot at LSN "
                               f"{base['lsn']} and the WAL after it differs from the digest "
                               f"the manifest recorded for it; nothing restored")


def _purges_after(m: Manifest, fetch: _Fetcher, cut: int,
                  skipped: list | None = None) -> list:
    """The prefixes of the purges the replica holds after ``cut``, oldest first.  A purge
    is a user's right to be forgotten: a restore to a point before it must not bring the
    erased keys back (in the source, ``at`` that point shows them gone).  The shipper
    marks each WAL object with its purges (``pg``); an object shipped before the marks
    were kept is downloaded and read.  A hole after the cut lists the purges committed in
    the range it lost (its ``pg``, from the source's record of them): a purge whose
    erasure trimmed the log while the replica was down is in no WAL object, and a restore
    to a point before it brought the erased keys back.  A hole whose purges the source
    could not tell (``pg`` nil) refuses the restore (ReplicationError) rather than risk
    it."""
    found: list[tuple[int, Any]] = []
    for h in m.doc["holes"]:
        if h["b"] <= cut or "pg" not in h:  # (no ``pg``: recorded by an older walstore)
            continue
        if h["pg"] is None:
            raise ReplicationError(
                f"the replica lost LSN {h['a']}..{h['b']} ({h['reason']}), after the cut at "
                f"LSN {cut}, and which purges were committed in it is not known (the "
                f"source keeps a record of its newest {KEEP_RECENT_PURGES} purges only, and "
                f"when the hole was found more had been made since it began, or that "
                f"record could not be read): a restore to a point before it could bring "
                f"back keys a purge erased; nothing restored (restore to a point after LSN "
                f"{h['b']})")
        found += [(lsn, p) for lsn, p in h["pg"] if lsn >= cut]
    for snap in m.snapshots:  # (past the WAL's end: the purges only it holds, audit 68)
        if snap["lsn"] <= max(m.end(), cut) or "pg" not in snap:
            continue
        if snap["pg"] is None:
            # (the restore of everything itself, fallen back from it: "a restore of
            # everything restores the snapshot" said the very restore that could not)
            hint = (" (the restore of everything fell back from that snapshot: it could "
                    "not be restored)" if skipped and any(k is snap for k in skipped) else
                    " (a restore of everything restores the snapshot)")
            raise ReplicationError(
                f"the replica's snapshot at LSN {snap['lsn']} lies past its WAL's end (LSN "
                f"{m.end()}), and which purges were committed between them is not known "
                f"(the source keeps a record of its newest {KEEP_RECENT_PURGES} purges "
                f"only): a restore to a point before it could bring back keys a purge "
                f"erased; nothing restored{hint}")
        found += [(lsn, p) for lsn, p in snap["pg"] if lsn >= cut]
    for e in m.wal:
        if e["b"] <= cut:
            continue
        if "pg" in e:
            found += [(lsn, p) for lsn, p in e["pg"] if lsn >= cut]
            continue
        for lsn, rtype, raw, _s in fetch.records(e):
            prefix = logformat.purge_prefix_of(rtype, raw) if lsn >= cut else None
            if prefix is not None:
                found.append((lsn, prefix))
        fetch.drop(e)
    found.sort(key=lambda x: x[0])
    return list(dict.fromkeys(p for _lsn, p in found))


def _apply_purges(stage: str, prefixes: list) -> None:
    """Purge ``prefixes`` in the staged copy: its first writable open (recovery's REDO
    and the losers' ABORTs; the debts it inherited — compensations and file effects of
    the transactions in flight at the cut — held, as a copy's first open holds them, or
    with ``--compensate`` left owed, untouched, for DEST's first open to undo newest
    first with its handlers; and the erasure a replayed purge owes finished), then
    ``purge``, which erases and compacts as in any store."""
    from ..store import Store

    class _Staged(Store):
        def _settle_recovery(self) -> None:
            """Left to DEST's first open.  Settled here, a ``--compensate`` copy's files
            were put back inside ``restore`` (the workspace changed before DEST existed,
            even when the install then failed) and before the compensations, which only
            DEST's open with the handlers runs: an action newer than a file change was
            compensated after the change was undone, not newest first as on rollback
            (audit 52).  Owed rows stay owed.  A copy without ``--compensate`` holds them
            here as before (this open clears the copy's origin: DEST's open would undo
            what it did not hold)."""
            origin = self._engine.origin
            if origin is None or not origin.get("compensate"):
                super()._settle_recovery()

    with _Staged(stage, durability="full") as store:
        for prefix in prefixes:
            store.purge(prefix)


def _refuse_dest_inside(url: str, dest: str) -> None:
    """A DEST inside a store's directory (the source's, or any store's) or inside the
    ``file://`` replica's directory is refused before anything is done: a copy in there
    is swept, trimmed or purged by what owns that directory (a store's purge promises
    its bytes in no file of its directory; a replica's objects are its own), and it put
    a second store's segments and LMDB under the first's.  Both were accepted."""
    from urllib.parse import urlsplit
    from .targets import check_url
    check_url(url)  # (a NUL in it named, as open_target names it: realpath raised raw)
    real = os.path.realpath(dest)
    p = urlsplit(url) if isinstance(url, str) else None
    if p is not None and p.scheme == "file" and p.path:
        rep = os.path.realpath(p.path)
        if os.path.commonpath([rep, real]) in (rep, real):
            raise ReplicationError(f"restore destination {dest} lies inside the replica's "
                                   f"directory {rep} (or holds it): restore into a "
                                   f"directory of its own; nothing was done")
    outer = enclosing_store(dest)
    if outer is not None:
        raise ReplicationError(f"restore destination {dest} lies inside the store at "
                               f"{outer}: restore into a directory of its own; nothing "
                               f"was done")


class _DestTaken(ReplicationError):
    """DEST is not empty (another restore or follower got there first)."""


def _install(stage: str, dest: str) -> None:
    """Rename the complete ``stage`` to ``dest`` (absent or an empty directory, which the
    rename replaces atomically).  Two restores racing to one DEST: exactly one rename
    wins, the other raises ``_DestTaken`` (an rmdir of DEST before the rename made the
    loser fail with a raw ENOTEMPTY, or ENOENT when both removed it)."""
    def taken() -> _DestTaken:
        return _DestTaken(f"restore destination {dest} exists and is not empty (another "
                          f"restore or follower filled it meanwhile)")
    if os.path.dirname(stage) == dest:  # (staged inside DEST: see ``restore``)
        fileio.move_up(stage, dest, taken)
        return
    try:
        os.rename(stage, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(dest) \
                and os.listdir(dest):
            raise taken() from None
        raise


MAX_LISTED_PATHS = 100  # paths listed per owed file effect (``paths_total`` counts all)


class _InFlight:
    """The transactions in flight at the restored log's end (what the restored store's
    recovery rolls back with an ABORT), and the file effects they leave owed, tracked
    record by record as the engine's ``inflight`` and ``fsteps`` tables are: a FILE_STEPS
    or WATCH_BEGIN is an effect, a WATCH_END replaces its WATCH_BEGIN (the watch's changes
    were logged as FILE_STEPS), a FILE_RESTORED (not held) means undone, the transaction's
    end takes them all.  A restored copy does not undo a loser's file effects (the
    workspace on this machine is not the one they changed; FILE_RESTORED ``held``): they
    are reported owed, so the files on disk and the restored state are never silently
    out of step.  A prepared (in-doubt) transaction's effects wait for its decision."""

    def __init__(self) -> None:
        self.opened: dict[int, int] = {}
        self.prepared: set[int] = set()
        self.files: dict[int, dict[int, dict]] = {}

    def seed(self, db_dir: str, applied: int) -> None:
        """What the snapshot's LMDB holds in flight at ``applied``: a transaction whose
        opening records lie before the replay's start is known only there — the base a
        hole (or a new replica of a trimmed log) took, its ``open`` empty: the opening
        records were trimmed before they were shipped.  (The report said nothing in
        flight and no file effect owed, exit 0, while the restored store rolled the
        transaction back and the workspace kept its change: audit 67.)  The records
        replayed after it move these on as they do the others."""
        opened, prepared, files = _src.read_in_flight(db_dir)
        for tx in opened:
            self.opened.setdefault(tx, applied)
        self.prepared |= prepared
        for tx, effects in files.items():
            if tx not in self.opened:
                continue
            mine = self.files.setdefault(tx, {})
            for lsn, e in effects.items():
                paths = e["paths"]
                mine[lsn] = {"ws": e["ws"], "op": e["op"],
                             "n": None if e["op"] == "watch" else len(paths),
                             "paths": paths[:MAX_LISTED_PATHS]}

    def see(self, lsn: int, rtype: int, raw: bytes) -> None:
        body = memoryview(raw)[logformat.RECORD_HEADER_SIZE:]
        if rtype in logformat.OPENING or rtype in logformat.ENDING:
            tx = logformat.summarize(rtype, body).get("tx")
            if isinstance(tx, int):
                if rtype in logformat.OPENING:
                    self.opened.setdefault(tx, lsn)
                    if rtype == logformat.PREPARE:
                        self.prepared.add(tx)
                else:
                    self.opened.pop(tx, None)
                    self.prepared.discard(tx)
                    self.files.pop(tx, None)
        if rtype not in logformat.FILE_RECORDS:
            return
        f = logformat.file_record(rtype, body)
        tx = f.get("tx")
        if not isinstance(tx, int) or tx not in self.opened:
            return
        effects = self.files.setdefault(tx, {})
        if rtype == logformat.FILE_STEPS:
            paths = f.get("paths") or []
            effects[lsn] = {"ws": f.get("ws"), "op": f.get("op"), "n": len(paths),
                            "paths": paths[:MAX_LISTED_PATHS]}
        elif rtype == logformat.WATCH_BEGIN:
            effects[lsn] = {"ws": f.get("ws"), "op": "watch", "n": None, "paths": []}
        elif rtype == logformat.WATCH_END and isinstance(f.get("begin"), int):
            effects.pop(f["begin"], None)
        elif rtype == logformat.FILE_RESTORED and not f.get("held"):
            for undone in f.get("effects") or ():
                if isinstance(undone, int):
                    effects.pop(undone, None)

    def owed_files(self, held: bool) -> list[dict]:
        """The file effects of the transactions in flight (not prepared), oldest first:
        ``held`` (the restored copy keeps them owed, never undone) or, with
        ``compensate``, undone in the workspace at the restored store's first open."""
        out = []
        for tx, effects in self.files.items():
            if tx not in self.opened or tx in self.prepared:
                continue
            for lsn, e in effects.items():
                ws = e["ws"]
                root = os.fsdecode(ws) if isinstance(ws, (bytes, str)) else None
                paths = [os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(p)))
                         for p in e["paths"] if isinstance(p, (bytes, str))] if root else []
                out.append({"txid": tx, "lsn": lsn, "workspace": root, "op": e["op"],
                            "paths": paths, "paths_total": e["n"], "held": held})
        return sorted(out, key=lambda d: d["lsn"])


class _BlobFetcher:
    """Downloads the replica's blobs (reversible files' content) that a copy's history
    names into its blob store under ``root``, those it lacks only, each checked against
    its digest.  Never LISTs: the names come from the copy's file tables (a restore) or
    the records a follower appends; a name the replica does not hold is kept in
    ``missing`` (the copy's ``walstore verify`` names what needs it)."""

    def __init__(self, tgt: ObjectStore, root: str) -> None:
        self.tgt = tgt
        self.root = root
        self.dir = os.path.join(root, "files", "blobs")
        self.names = BlobStore(self.dir, readonly=True)  # (its layout only: no directory)
        self.fetched = 0
        self.missing: set[str] = set()

    def fetch(self, digests) -> list[str]:
        """Fetch those of ``digests`` the copy lacks (a dict: digest -> size, when the
        records give it); returns the ones fetched."""
        sizes = digests if isinstance(digests, dict) else {}
        got = []
        for digest in sorted(set(digests)):
            try:
                path = self.names.path(digest)
            except ValueError:
                continue  # (not a blob's name)
            if digest in self.missing or os.path.exists(path):
                continue
            if self._one(digest, path, sizes.get(digest)):
                got.append(digest)
        return got

    def fetch_named(self, records) -> None:
        """The blobs named by ``records`` ((lsn, type, raw, synced), a follower's new
        ones): a FILE_STEPS's before- and after-images, a WATCH_BEGIN's manifest and the
        content that manifest lists, a FILE_CONFLICT's before-image."""
        named = blobs_named(records)
        manifests = {d for d, n in named.items() if n is None}
        self.fetch(named)
        for d in manifests:
            self.fetch(_manifest_digests(self.names, d))

    def _one(self, digest: str, path: str, size: int | None = None) -> bool:
        """Download blob ``digest`` to ``path``: into the blob store's ``tmp/`` (where a
        put in progress lives: the store's open removes what a crash left there, and so
        does a follower's start, ``sweep_blob_temps``), synced, renamed to its name, its
        directory synced (then the record naming it is appended: a power loss never
        leaves DEST's history naming a blob whose name was not durable).  A follower
        killed mid-download left ``<sha>.part`` in a fan-out directory for good (audit
        66).  Writing it failing (DEST's disk full, EIO) is an OSError naming ``path``
        (and on a full disk the bytes free and the blob's ``size``): a local error, never
        retried as the replica's are — the follower stops, as on any other write to DEST
        failing (see ``follow``), and the temp file is removed."""
        key = BLOB_PREFIX + digest
        tmp = os.path.join(self.dir, "tmp", f"{os.getpid()}-fetch-{digest}")
        try:
            for d in (os.path.join(self.root, "files"), self.dir,
                      os.path.join(self.dir, "tmp"), os.path.dirname(path)):
                if not os.path.isdir(d):
                    _src.make_dir(d)
            with os.fdopen(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600),
                           "w+b") as f:
                got = _retry(lambda: _download_checked(self.tgt, key, f))
                if got is None:
                    self.missing.add(digest)
                    return False
                if got != digest:
                    raise ReplicationError(f"blob {key} of the replica does not match its "
                                           f"name")
                f.flush()
                os.fsync(f.fileno())
            fileio.fault_point("restore.blob")  # (tests: stopped before it is named)
            os.rename(tmp, path)
            _src.fsync_dir(os.path.dirname(path))
        except OSError as e:
            fileio.remove_quietly(tmp)  # (first: the room said is the room there is)
            raise local_error(e, path, size) from e
        finally:
            fileio.remove_quietly(tmp)
        self.fetched += 1
        return True


def sweep_blob_temps(root: str) -> None:
    """Remove what a killed follower's blob downloads left in the store at ``root`` (its
    lock held: nothing else writes there): the blob store's ``tmp/``, and the
    ``<sha>.part`` files an older walstore's follower left in the fan-out directories."""
    blobs = os.path.join(root, "files", "blobs")
    if not os.path.isdir(blobs):
        return
    for sub in os.listdir(blobs):
        d = os.path.join(blobs, sub)
        if sub == "tmp" or (len(sub) == 2 and os.path.isdir(d)):
            for name in os.listdir(d):
                if sub == "tmp" or name.endswith(".part"):
                    fileio.remove_quietly(os.path.join(d, name))


def blobs_named(records) -> dict[str, int | None]:
    """The blobs the file records among ``records`` ((lsn, type, raw, synced)) name:
    digest -> size (None: a watch's manifest, whose size no record gives)."""
    out: dict[str, int | None] = {}
    for _lsn, rtype, raw, _s in records:
        if rtype not in (logformat.FILE_STEPS, logformat.WATCH_BEGIN, logformat.FILE_CONFLICT):
            continue
        try:
            doc = msgpack.unpackb(bytes(raw[logformat.RECORD_HEADER_SIZE:]), raw=False,
                                  strict_map_key=False)
        except DECODE_ERRORS:
            continue  # (recovery judges a record that does not parse)
        if not isinstance(doc, dict):
            continue
        rows = [r for step in doc.get("steps") or ()
                if isinstance(step, (list, tuple)) and len(step) == 3 for r in step[1:]]
        if isinstance(doc.get("conflict"), dict):
            rows.append(doc["conflict"].get("before"))
        for row in rows:
            d = _row_digest(row)
            if d:
                out[d] = row[2] if isinstance(row[2], int) else None
        if isinstance(doc.get("manifest"), str):
            out.setdefault(doc["manifest"], None)
    return out


def _row_digest(row: Any) -> str | None:
    """The content digest of a file-state row (``["f", ..., digest]``), if any."""
    if isinstance(row, (list, tuple)) and len(row) > 3 and row[0] == "f" \
            and isinstance(row[3], str):
        return row[3]
    return None


def _manifest_digests(names: BlobStore, digest: str) -> set[str]:
    """The content a watch's manifest (a blob, already fetched) lists."""
    from ..files import Manifest as WatchManifest
    try:
        return WatchManifest.load(names, digest).digests()
    except (ValueError, OSError, CorruptionError):
        return set()


def _fetch_referenced_blobs(tgt: ObjectStore, root: str) -> _BlobFetcher:
    """A restored copy's blobs: those its history refers to (what its own blob gc keeps:
    ``Files.referenced``, read through a read-only open of the copy), fetched until none
    is new (a watch manifest's content is known once the manifest is there)."""
    from ..ops.backup import referenced_blobs
    fetcher = _BlobFetcher(tgt, root)
    while fetcher.fetch(referenced_blobs(root)):
        pass
    return fetcher


def _download_checked(tgt: ObjectStore, key: str, f) -> str | None:
    """The sha256 of blob ``key`` downloaded into ``f``; None: the replica lacks it."""
    f.seek(0)
    f.truncate()
    if download_into(tgt, key, f, MAX_BLOB_BYTES) is None:
        return None
    f.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _points_at(m: Manifest, cut: int) -> dict[str, dict | None]:
    """Restore points the manifest knows: alive at the cut -> {lsn, ts}; else None."""
    out: dict[str, dict | None] = {}
    for name, p in m.doc["points"].items():
        alive = p["lsn"] < cut and (p.get("dropped") is None or p["dropped"] >= cut)
        out[name] = {"lsn": p["lsn"], "ts": p.get("ts") or 0.0} if alive else None
    return out


def _download_snapshot(tgt: ObjectStore, snap: dict, path: str,
                       progress: Callable[[int], None] | None = None) -> None:
    """``progress``: called with the bytes downloaded so far, per MiB at most."""
    def once():
        with open(path, "wb") as f:
            os.fchmod(f.fileno(), _src.FILE_MODE)
            out = f if progress is None else _Counted(f, progress)
            return download_into(tgt, snap["k"], out, min(snap["n"], MAX_SNAPSHOT_BYTES))
    try:
        got = _retry(once)
    except OSError as e:  # (the staging directory's disk full: named, never retried;
        fileio.remove_quietly(path)  # its part gone first, so the room said is there)
        raise local_error(e, path, snap["n"]) from e
    if got is None:
        raise _ObjectGone(f"snapshot {tgt.url}/{snap['k']} (LSN {snap['lsn']}) is listed "
                          f"in the manifest but missing", snap["k"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
        os.fsync(f.fileno())
    if got[0] != snap["n"] or h.hexdigest() != snap["sha"]:
        raise ReplicationError(f"snapshot {tgt.url}/{snap['k']} is damaged (size or sha256 "
                               f"differs from the manifest)")
    try:  # (size and sha256 as listed, the manifest may lie too: LMDB must never map it)
        _src.check_snapshot_file(path)
    except CorruptionError as e:
        raise ReplicationError(f"snapshot {tgt.url}/{snap['k']} (LSN {snap['lsn']}) is not "
                               f"a sound LMDB file: {e.reason}") from None
    # its rows against the state digest the manifest recorded for it (taken from the very
    # copy the shipper uploaded): a snapshot holding another state, its size and sha256
    # listed to match, was restored silently and passed `replicas --verify`
    if snap.get("st"):
        try:
            got = _src.state_digest(os.path.dirname(path))["sha256"]
        except (CorruptionError, lmdb.Error) as e:
            raise ReplicationError(f"snapshot {tgt.url}/{snap['k']} (LSN {snap['lsn']}) is "
                                   f"not a sound LMDB file: {e}") from None
        if got != snap["st"]:
            raise ReplicationError(f"snapshot {tgt.url}/{snap['k']} (LSN {snap['lsn']}) does "
                                   f"not hold the state the manifest recorded for it (its "
                                   f"state digest differs)")


class _Counted:
    """A file a download writes into, its bytes counted: ``progress(bytes so far)`` each
    time another MiB is in (the targets write in chunks of at most a MiB)."""

    def __init__(self, f, progress: Callable[[int], None]) -> None:
        self._f, self._progress = f, progress
        self._n = self._shown = 0

    def write(self, data) -> int:
        n = self._f.write(data)
        self._n += len(data)
        if self._n - self._shown >= 1 << 20:
            self._shown = self._n
            self._progress(self._n)
        return n

    def __getattr__(self, name: str):
        return getattr(self._f, name)


# ---- follow -------------------------------------------------------------------------
def check_apply_every(apply_every: Any) -> None:
    """ValueError unless ``apply_every`` is a number of seconds from 0 (every round) to a
    day (``--apply-every``)."""
    if isinstance(apply_every, bool) or not isinstance(apply_every, (int, float)) \
            or not 0 <= apply_every <= DAY:  # (NaN fails both comparisons)
        raise ValueError(f"apply_every must be a number of seconds from 0 (every round) "
                         f"to {DAY:g} (a day), not {apply_every!r}")


@os_errors_wrapped  # (a full disk, EIO: a StoreIOError, never a raw OSError)
def follow(url: str, dest: str, replicate_options: Any = None, *,
           stop: "threading.Event | Flag | None" = None, interval: float | None = None,
           apply_every: float = 30.0, on_round: Callable[[dict], None] | None = None,
           target: ObjectStore | None = None,
           progress: Callable[[int, int], None] | None = None) -> None:
    """Keep ``dest`` a current read-only copy of the replica until ``stop`` is set.
    ``progress(done, total)``: the first restore into an empty ``dest``, as
    :func:`restore` counts it (`restore --follow` of a large replica said nothing until
    its first round).

    New WAL objects are appended to its log as whole records (readers opening it with
    ``walstore.open(dest, readonly=True)`` see whole commits only) and applied to its
    LMDB every ``apply_every`` seconds (REDO only, nothing is compensated), and whenever
    ``APPLY_STEP`` bytes were appended since the last time (a backlog in bounded steps);
    segment files wholly applied are removed after each.  A round that appended a purge
    applies at its end and erases what the writer's purge checkpoint erases (the log's
    files holding records before it, LMDB's free pages: see ``_follow_rounds``).

    A local write failing — DEST's disk full under a segment, a blob or LMDB's apply, the
    temp directory's under a fetched object — is never retried as the replica's errors
    are: a ``StoreIOError`` naming the file (on a full disk the bytes free there and
    needed: ``local_error``) stops the follower, DEST left sound (whole records, no temp
    file); run again with room, it goes on from DEST's position."""
    opts = ReplicateOptions.from_any(replicate_options)
    # checked as the ``interval`` option is (a NaN or negative one polled in a busy loop,
    # 0 took the default without a word), and ``apply_every`` likewise (a NaN or inf one
    # never applied on time, a negative or a str one was taken as given)
    interval = ReplicateOptions.from_any(opts, interval=interval).interval
    check_apply_every(apply_every)
    # (a ``stop`` without ``is_set``, an ``on_round`` not callable: the whole replica was
    # restored into DEST first, then the first round failed with a bare AttributeError /
    # "'int' object is not callable"; refused here, before anything is done)
    if stop is not None and not callable(getattr(stop, "is_set", None)):
        raise TypeError(f"stop must be a threading.Event (or anything with is_set()) or "
                        f"None, not {type(stop).__name__}")
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be a callable taking each round's report, or "
                        f"None, not {type(on_round).__name__}")
    stop = stop if stop is not None else Flag()
    tgt = target if target is not None else open_target(url, opts)
    # the follower is DEST's one writer: its lock keeps a writer open (or a second
    # follower) out — StoreLocked — while it appends and applies.  A DEST it restores is
    # locked before it appears (in the staging directory), so of followers started
    # together on an empty DEST the one whose restore lands follows, and every other is
    # refused by that lock (its own restore finds DEST filled and is dropped)
    locks: list = []
    missing: list[str] = []  # what the restore below could not fetch (the first round says)
    try:
        if not os.path.exists(dest) or not os.listdir(dest):
            try:
                missing = restore(url, dest, None, opts, follow=True, target=tgt,
                                  _locks=locks, progress=progress)["blobs_missing"]
            except _DestTaken:
                pass  # another follower (or restore) got there first: its lock decides
        store_id, identity = _src.read_identity(dest)
        origin = identity.get("origin") or {}
        if origin.get("settled"):  # (its first writable open marks it: Layout.clear_origin)
            raise ReplicationError(
                f"{dest} has been opened as a store since it was restored (`walstore "
                f"restore` without --follow opens it to report what is owed; a program may "
                f"have promoted it): that open ended what was in flight at the cut and "
                f"wrote records of its own, so its log is no longer a prefix of the "
                f"replica's, and following would append the replica's records after them; "
                f"restore into a new directory with --follow to follow {display_url(url)}")
        if not locks:
            from ..engine.layout import Layout, ProcessLock
            locks.append(ProcessLock(Layout(dest)))
        try:
            _follow_rounds(url, dest, tgt, opts, stop, interval, apply_every, on_round,
                           store_id, origin, missing)
        except _Stranded as e:
            for lock in locks:  # (the purges open DEST as a store: it takes the lock)
                lock.release()
            locks.clear()
            _apply_stranded_purges(dest, e)
    finally:
        for lock in locks:
            lock.release()
        if target is None:
            tgt.close()


class _ReplicaReads:
    """A follower's target: an ``OSError`` reading the replica (a ``file://`` replica on a
    mount gone for a moment, an NFS hiccup: EIO, ESTALE, ENOTDIR) is a transient
    ``TargetError`` naming the replica, retried with backoff as an unreachable S3 server
    is (it escaped as a StoreIOError and the follower, meant to run for weeks, stopped for
    good).  Everything else is the wrapped target's."""

    def __init__(self, target: ObjectStore, url: str) -> None:
        self._target = target
        self._url = url

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def _failed(self, what: str, key: str, e: OSError) -> TargetError:
        return TargetError(f"{what} {key} of the replica {display_url(self._url)} failed: "
                           f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else ""),
                           True)

    def get(self, key: str, max_bytes: int, if_none_match: str | None = None):
        try:
            return self._target.get(key, max_bytes, if_none_match=if_none_match)
        except OSError as e:
            raise self._failed("reading", key, e) from e

    def download(self, key: str, f, max_bytes: int):
        try:
            return self._target.download(key, f, max_bytes)
        except OSError as e:
            raise self._failed("downloading", key, e) from e


def _dest_applied(dest: str) -> int:
    """DEST's applied LSN, read through the process's shared LMDB environment (as every
    open of it is: ``_src.read_applied``'s own environment raised a raw lmdb.Error, "The
    environment ... is already open in this process", to a follower started beside a
    reader of DEST in the same process: audit 66)."""
    from ..engine.lmdb_state import LmdbState
    state = LmdbState(os.path.join(dest, "db"), readonly=True)
    try:
        return state.applied_lsn()
    finally:
        state.close()


def _follow_rounds(url: str, dest: str, tgt: ObjectStore, opts: ReplicateOptions,
                   stop: "threading.Event | Flag", interval: float, apply_every: float,
                   on_round: Callable[[dict], None] | None, store_id: bytes, origin: dict,
                   missing: list[str] = ()) -> None:
    """The follower's loop (``follow``, which holds DEST's lock).

    The log is applied to LMDB and trimmed every ``apply_every`` seconds, and also as soon
    as ``APPLY_STEP`` bytes were appended since the last time (within a round, between
    records): a large backlog is caught up in bounded steps, each REDO short and each
    followed by a trim, so the WAL DEST holds stays within about ``APPLY_STEP`` plus a
    segment (a follower that appended its whole backlog first, then REDO'd it in one go,
    held all of it until then, and one restarted more often than that REDO took never
    trimmed at all; probe 57).

    A round failing with a transient error (``transient`` on the target's error: the
    server unreachable, 5xx, throttling) is reported to ``on_round`` (``error``,
    ``retry_in``) and retried after a backoff doubling from ``interval`` to
    ``max_backoff``; the follower stops only on a permanent error (it stopped on the first
    failed request: a network blip ended a follower meant to run for weeks).

    A round that copied records naming blobs the replica lacks (its content never reached
    the replica) says so: ``blobs_missing`` in the round's ``on_round`` dict, those not
    reported before (the first round also those the restore could not fetch); the records
    are appended all the same (DEST's `walstore verify` names what needs them).

    A purge (``Store.purge``) reaching DEST: the round that appended its commit applies at
    its end, whatever ``apply_every`` says, and that apply does the erasure the writer's
    purge checkpoint does (``redo_into_lmdb``): the segment files holding records before
    the purge removed (the current one first ended at the log's end: ``RestoredLog.roll``),
    then LMDB rewritten without its free pages (the writer's compaction and its swap, which
    DEST's readers follow).  Until then DEST's LMDB held the purged rows (readers hid them
    by the log on top) for up to ``apply_every``, and the purged bytes in its free pages
    and log for as long as it ran.  The SEAL and CHECKPOINT the source's purge checkpoint
    logs after the purge carry nothing to redo: the apply moves past them to the log's
    end (``redo_into_lmdb``), so the file the SEAL ends goes in that round (the applied
    LSN stayed at the SEAL's start, that file was never wholly applied, and a source gone
    idle after a purge left its bytes in DEST for good).  Should a transaction still open
    in the log keep the whole log from being applied, the files holding the purge's bytes
    go at the first apply that reaches the log's end: while the erasure is owed every
    round applies, idle ones included."""
    tgt = _ReplicaReads(tgt, url)  # (its read errors are retried: see there)
    wal_dir = os.path.join(dest, "wal")
    log = RestoredLog.resume(wal_dir, store_id)
    if log.end is None:  # restored without a WAL record: the log goes on at the cut
        log.end = origin.get("cut")
    etag = None
    last_apply = 0.0
    applied_since = 1  # a restored log is applied to LMDB in the first round
    # what an earlier run left unapplied counts toward the first step
    unapplied = max(0, (log.end or 0) - _dest_applied(dest))

    # a purge's erasure: the log DEST holds keeps purged bytes in the files that begin
    # below this LSN (0: none) until they go (see ``drop_log``)
    erase_below = 0
    purge_seen = False  # a purge appended since the last apply: apply at the round's end

    def drop_log(keep: int) -> None:
        """Remove the segment files wholly below ``keep``; while a purge's erasure is owed
        and the whole log is applied, the current file first ends where it is (``roll``),
        so none holding a record before the purge stays."""
        nonlocal erase_below
        if erase_below and keep >= log.end and log.start < erase_below:
            log.roll()
        _trim(wal_dir, keep, log.start)
        if erase_below and min(_starts(wal_dir), default=log.start) >= erase_below:
            erase_below = 0

    def erase(keep: int) -> None:  # (redo_into_lmdb: a purge's erasure, the log first)
        nonlocal erase_below
        erase_below = max(erase_below, keep)
        drop_log(keep)

    def apply() -> None:
        nonlocal applied_since, last_apply, unapplied, purge_seen
        log.sync()
        keep = _src.redo_into_lmdb(dest, erase)
        drop_log(keep)
        applied_since, unapplied, last_apply = 0, 0, time.monotonic()
        purge_seen = False

    sweep_dead_scratch(tempfile.gettempdir(), FOLLOW_TEMP)
    sweep_blob_temps(dest)  # (a killed follower's download: see _BlobFetcher._one)
    tmp = tempfile.mkdtemp(prefix=f"{FOLLOW_TEMP}{os.getpid()}-")
    fetch = _Fetcher(tgt, store_id, tmp)
    blobs = _BlobFetcher(tgt, dest)
    blobs.missing.update(missing)
    reported: set[str] = set()

    def one_round(info: dict) -> None:
        nonlocal etag
        got = tgt.get(MANIFEST_KEY, opts.max_manifest_bytes, if_none_match=etag)
        if got is not None and got != NOT_MODIFIED:
            m = Manifest(decode(got[0], tgt.url), got[1])
            if m.doc["store_id"] != store_id or \
                    m.doc["lineage"] != origin.get("parent_lineage"):
                raise ReplicationError(f"{display_url(url)} now holds another store's "
                                       f"replica; the follower stops")
            if log.end is not None and m.end() > log.end:
                try:
                    _check_retained(m, log.end, dest, url)
                    chain = m.chain(log.end, m.end())
                except ReplicationError as e:
                    # DEST cannot go on from its position (a hole, or retention dropped
                    # what it needs): the follower stops, and DEST stays a copy readers
                    # read.  The purges the source made past its position must not stay
                    # readable there (it served keys a purge in the hole had erased at
                    # the source): ``follow`` applies those the replica knows of
                    raise _Stranded(e, _stranded_purges(m, fetch, log.end, e)) from e
                log.know(m.wal)
                try:
                    _append_chain(chain, info)
                except _ObjectGone as e:
                    # dropped by the writer since this manifest was read (merged, retained;
                    # deleted ``delete_grace`` later): the next round reads the manifest
                    # now and goes on from DEST's position (a follower whose round outlasted
                    # the grace stopped for good: "hole in the replica's WAL")
                    dropped = _dropped_since(tgt, opts, e.key)
                    if dropped:
                        e.transient = True
                    if dropped is not False:
                        raise  # (dropped; or the manifest unreadable now: cannot tell)
                    # still listed: missing for good (damage, a lifecycle rule), as is a
                    # damaged object below; stranded as at a hole (see above)
                    raise _Stranded(e, _stranded_purges(m, fetch, log.end, e)) from e
                except ReplicationError as e:
                    if isinstance(e, TargetError) or getattr(e, "transient", False):
                        raise  # (a request refused or failing: not the replica's damage)
                    raise _Stranded(e, _stranded_purges(m, fetch, log.end, e)) from e
            etag = got[1]

    def _append_chain(chain: list[dict], info: dict) -> None:
        """Append the records of ``chain`` (the manifest's WAL from DEST's position to its
        end)."""
        for e in chain:
            # the blobs this object's records name, before the records (a reader
            # of DEST never sees a file step whose content is not there yet): a
            # first pass over the object, only what it names (no LIST)
            start = log.end
            blobs.fetch_named(r for r in fetch.records(e) if r[0] >= start)
            for lsn, rtype, raw, _s in fetch.records(e):
                if lsn < log.end:
                    continue
                if unapplied >= APPLY_STEP:
                    apply()  # (a bounded step of a backlog)
                log.append(lsn, raw, e["seg"], rtype)
                info["appended"] += len(raw)
                _count(len(raw))
                if logformat.is_purge(rtype, raw):
                    _purge_appended()
            log.sync()
            fetch.drop(e)

    def _count(n: int) -> None:
        nonlocal applied_since, unapplied
        applied_since += n
        unapplied += n

    def _purge_appended() -> None:
        nonlocal purge_seen
        purge_seen = True

    delay = 0.0
    try:
        while not stop.is_set():
            info: dict = {"position": log.end, "appended": 0}
            try:
                one_round(info)
                delay = 0.0
            except ReplicationError as e:
                # a transient failure (the target unreachable, a 5xx, throttling: what the
                # target layer marks transient) is retried with capped exponential backoff,
                # as the shipper's rounds are; anything else (another store's replica,
                # damage, a hole, DEST's position gone from the replica) stops the follower
                if not getattr(e, "transient", False):
                    raise
                for entry in list(fetch.files):
                    fetch.drop({"k": entry})
                # (never sooner than ``interval``: a ``max_backoff`` below it polled a
                # failing server in a busy loop, as the shipper did)
                delay = max(interval, min(opts.max_backoff, delay * 2))
                info.update(position=log.end, error=str(e), retry_in=round(delay, 3))
                if on_round:
                    on_round(info)
                stop.wait(delay)
                continue
            if erase_below or (applied_since and (time.monotonic() - last_apply >= apply_every
                                                  or unapplied >= APPLY_STEP or purge_seen)):
                apply()  # (a purge: now, not ``apply_every`` later; an erasure still owed:
                #          every round, idle ones too, until it is done; see the docstring)
            info["position"] = log.end
            if blobs.missing - reported:
                info["blobs_missing"] = sorted(blobs.missing - reported)
                reported |= blobs.missing
            if on_round:
                on_round(info)
            stop.wait(interval)
    finally:
        log.close()
        remove_scratch(tmp)


class _Stranded(Exception):
    """A follower cannot go on from DEST's position: ``error`` says why, ``purges`` are the
    prefixes the replica knows the source purged past that position (``follow`` applies
    them to DEST, then raises ``error``)."""

    def __init__(self, error: ReplicationError, purges: list) -> None:
        super().__init__(str(error))
        self.error, self.purges = error, purges


def _stranded_purges(m: Manifest, fetch: "_Fetcher", position: int,
                     why: ReplicationError) -> list:
    """The purges past a stranded follower's ``position`` (``_purges_after``); when the
    replica does not know them all (a hole whose ``pg`` is nil), a ReplicationError saying
    that DEST may still hold keys purged at the source."""
    try:
        return _purges_after(m, fetch, position)
    except ReplicationError as e:
        if getattr(e, "transient", False):
            raise  # (reading an object failed for now: the round is retried)
        raise ReplicationError(
            f"{why}; and DEST may still hold keys the source purged past its position "
            f"(LSN {position}): {e}; restore anew into a new DEST") from why


def _apply_stranded_purges(dest: str, stranded: _Stranded) -> None:
    """Apply ``stranded.purges`` to DEST (DEST's lock released by the caller: the purge
    opens DEST as a store, which takes it), then raise the follower's error."""
    err = stranded.error
    if not stranded.purges:
        raise err
    shown = ", ".join(repr(p) for p in stranded.purges)
    try:
        _apply_purges(dest, stranded.purges)
    except WalstoreError as e:
        raise ReplicationError(f"{err}; the source's purges past DEST's position ({shown}) "
                               f"could not be applied to DEST: {e}") from err
    raise ReplicationError(f"{err}; the source's purges past DEST's position ({shown}) were "
                           f"applied to DEST, which can no longer be followed") from err


def _check_retained(m: Manifest, position: int, dest: str, url: str) -> None:
    """A follower's position below the first WAL object the replica still lists, with no
    hole recorded there: retention dropped what DEST needs next (the follower was stopped
    longer than the replica keeps history).  Not a hole in the replica: it is sound, DEST
    is too old to follow it."""
    first = m.wal[0]["a"] if m.wal else m.end()
    if position < first and m.hole_at(position) is None:
        raise ReplicationError(
            f"{dest}'s position (LSN {position}) is older than what the replica at "
            f"{display_url(url)} retains (its WAL now begins at LSN {first}: retention "
            f"removed the history in between while the follower was stopped); DEST cannot "
            f"catch up, and may hold keys the source purged in that history (the replica "
            f"keeps no record of them): restore anew into a new DEST with --follow")


def _starts(wal_dir: str) -> list[int]:
    """The start LSNs of a follower's segment files."""
    return [int(n[:20]) for n in os.listdir(wal_dir) if n.endswith(".wal") and n[:20].isdigit()]


def _trim(wal_dir: str, keep: int, current: int) -> None:
    """Remove a follower's segment files wholly below ``keep`` (never the current one)."""
    names = sorted(n for n in os.listdir(wal_dir) if n.endswith(".wal") and n[:20].isdigit())
    starts = [int(n[:20]) for n in names]
    for (s, n), nxt in zip(zip(starts, names), starts[1:]):
        if nxt <= keep and s != current:
            os.unlink(os.path.join(wal_dir, n))
    _src.fsync_dir(wal_dir)


# ---- inspection ---------------------------------------------------------------------
@os_errors_wrapped  # (a full disk, EIO: a StoreIOError, never a raw OSError)
def replicas(url: str, verify: bool = False, replicate_options: Any = None,
             target: ObjectStore | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """What the replica at ``url`` holds; ``verify``: read every object it lists (every
    record's CRC, every snapshot's sha256, the WAL contiguous), restore it into a temporary
    directory and compare state digests with those the manifest recorded (``progress``:
    bytes checked so far, of the bytes the manifest lists)."""
    opts = ReplicateOptions.from_any(replicate_options)
    tgt = target if target is not None else open_target(url, opts)
    try:
        m = load_manifest(tgt, opts)
        now = time.time()
        d = m.doc
        past_end = m.base_past_end()
        report = {
            "url": display_url(url), "store_id": d["store_id"].hex(), "lineage": d["lineage"],
            "updated": d["updated"], "age_seconds": round(now - d["updated"], 3),
            "writer": {k: (d.get("writer") or {}).get(k) for k in ("host", "pid", "path")},
            "position": m.end(),
            "snapshots": [{"lsn": s["lsn"], "time": s["ts"], "bytes": s["n"], "keys": s["keys"],
                           "restorable": m.wal_start_for(s["lsn"]) is not None
                           or s is past_end}
                          for s in sorted(m.snapshots, key=lambda s: s["lsn"])],
            "wal": {"first": m.wal[0]["a"] if m.wal else m.end(), "end": m.end(),
                    "objects": len(m.wal), "bytes": sum(e["n"] for e in m.wal)},
            "holes": [{"from": h["a"], "to": h["b"], "reason": h["reason"]} for h in d["holes"]],
            "restore_points": [{"name": n, "lsn": p["lsn"], "time": p.get("ts"),
                                "dropped": p.get("dropped") is not None,
                                "dropped_lsn": p.get("dropped"),
                                # (named in a snapshot past the WAL's end: in a restore
                                # of everything only)
                                "past_wal_end": p["lsn"] >= m.end()}
                               for n, p in sorted(d["points"].items(), key=lambda x: x[1]["lsn"])],
            "last_commit": d.get("last_commit"),
            "lag_seconds": round(now - d["updated"], 3),
            # every commit stamped up to it is in the replica (a time restore past it is
            # refused); None: a replica written before walstore recorded it
            "complete_to": d.get("complete_to"),
            # why no restore reaches the replica's end (None: one does); complete_to alone
            # vouched for a replica whose end no restore reached (a hole's snapshot past
            # its end, or failed): `replicas` said "complete" of it (audit 67)
            # (a snapshot past the WAL's end that a restore of everything restores:
            # Manifest.base_past_end)
            "end_unrestorable": None if past_end is not None else _end_unrestorable(m),
        }
        # what a restore of everything gives (None: no restore reaches the end); a
        # snapshot past the WAL's end holds commits the WAL does not: restorable only
        # all together, as that snapshot (no point, txid or time between the two)
        lc = d.get("last_commit") or {}
        report["restore_everything"] = (
            None if report["end_unrestorable"] is not None else
            {"lsn": m.end(), "txid": lc.get("tx"), "past_wal_end": False} if past_end is None
            else {"lsn": past_end["lsn"], "txid": (past_end.get("lc") or {}).get("tx"),
                  "past_wal_end": True, "wal_end": m.end(), "wal_end_txid": lc.get("tx"),
                  "not_restorable_individually": {"from_lsn": m.end(),
                                                  "to_lsn": past_end["lsn"]}})
        if verify:
            report["verify"] = _verify(url, m, tgt, opts, progress)
        return report
    finally:
        if target is None:
            tgt.close()


MAX_NAMED = 10  # damaged objects named in a check's error (``failures`` lists them all)


def _verify(url: str, m: Manifest, tgt: ObjectStore, opts: ReplicateOptions,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Every object the manifest lists read back and checked, one at a time (the WAL
    contiguous from its first object to the replica's position, every WAL object's header
    and every record's CRC and LSN, every restore point's LSN against the record the WAL
    holds there, every snapshot's size, sha256 and applied LSN); then a
    full restore (the newest chain, opened), and the newest snapshot's state rebuilt from
    the one before it (or itself) and compared by digest.  A restore reads only the newest
    chain: damage in an older object or snapshot is found only by the first checks."""
    import walstore
    checks = []
    ok = True
    total = sum(e["n"] for e in m.wal) + sum(s["n"] for s in m.snapshots if s["k"] is not None)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    named: dict[str, tuple[int | None, str]] = {}  # blob -> (size, what names it first)
    # (named with the pid and swept once that process is gone, as a restore's: it holds
    # every snapshot and a full restored copy, and a `replicas --verify` killed (-9, the
    # OOM killer) left it in the temp directory for good: audit 56)
    sweep_dead_scratch(tempfile.gettempdir(), VERIFY_TEMP)
    with tempfile.TemporaryDirectory(prefix=f"{VERIFY_TEMP}{os.getpid()}-") as tmp:
        at: dict[int, tuple[int, dict] | None] = {}  # records where points are put
        for check in (_check_continuity(m),
                      _check_wal_objects(m, tgt, tmp, step, named, at, opts),
                      _check_points(m, at),
                      _check_snapshots(m, tgt, tmp, step, named, opts),
                      _check_blobs(tgt, named)):
            ok = ok and check["ok"]
            checks.append(check)
        try:
            r = restore(url, os.path.join(tmp, "full"), None, opts, target=tgt, _scratch=True)
            s = walstore.open(os.path.join(tmp, "full"))
            s.close()
            checks.append({"check": "restore everything", "ok": True, "cut_lsn": r["cut_lsn"],
                           "wal_objects": r["wal_objects"],
                           "snapshots_skipped": r["snapshots_skipped"]})
        except Exception as e:
            ok = False
            checks.append({"check": "restore everything", "ok": False, "error": str(e)})
        snaps = sorted((s for s in m.snapshots if m.wal_start_for(s["lsn"]) is not None),
                       key=lambda s: s["lsn"])
        if snaps:
            newest = snaps[-1]
            base = snaps[-2] if len(snaps) > 1 else newest
            where = os.path.join(tmp, "digest")
            try:
                restore(url, where, None, opts, target=tgt, _snapshot=base,
                        _cut_end=newest["lsn"], _scratch=True)
                s = walstore.open(where)
                s.close()
                got = _src.state_digest(os.path.join(where, "db"))
                same = got["sha256"] == newest["st"]
                ok = ok and same
                checks.append({"check": "state digest", "ok": same, "lsn": newest["lsn"],
                               "base_snapshot_lsn": base["lsn"], "expected": newest["st"],
                               "got": got["sha256"], "keys": got["keys"]})
            except Exception as e:
                if isinstance(e, _ObjectGone) and _dropped_since(tgt, opts, e.key):
                    # (the live writer dropped what it needs since the manifest was read:
                    # not damage; the check is skipped, and says why)
                    checks.append({"check": "state digest", "ok": True, "skipped":
                                   f"{e.key} was dropped by the replica's writer since "
                                   f"the manifest was read"})
                else:
                    ok = False
                    checks.append({"check": "state digest", "ok": False, "error": str(e)})
    return {"ok": ok, "checks": checks}


def _named(check: dict, failures: list[dict]) -> dict:
    if failures:
        check["ok"] = False
        shown = "; ".join(f["error"] for f in failures[:MAX_NAMED])
        more = len(failures) - MAX_NAMED
        check["error"] = shown + (f"; and {more} more" if more > 0 else "")
        check["failures"] = failures
    return check


def _end_mismatch(m: Manifest) -> str | None:
    """Why the manifest's WAL objects and its position disagree (the last object must end
    at the position); None when they agree."""
    if m.wal and m.wal[-1]["b"] != m.end():
        return (f"the replica's WAL objects end at LSN {m.wal[-1]['b']}, its position is "
                f"LSN {m.end()}")
    return None


def _check_continuity(m: Manifest) -> dict:
    """The WAL objects listed follow one another with no gap (a hole the manifest records
    is one too: no restore crosses it) up to the replica's position, and every snapshot
    the WAL already reaches can be replayed from."""
    failures = []
    named: set[int] = set()  # the recorded holes a gap's message named
    pos = None
    for e in m.wal:
        if pos is not None and e["a"] > pos:
            h = m.hole_at(pos)
            named.add(id(h)) if h is not None else None
            failures.append({"object": e["k"], "error": m.gap_message(pos, e["a"])})
        elif pos is not None and e["a"] < pos:
            failures.append({"object": e["k"], "error": f"WAL object {e['k']} overlaps LSN "
                             f"{e['a']}..{pos} of the object before it"})
        pos = e["b"]
    why = _end_mismatch(m)
    if why is not None:
        failures.append({"object": None, "error": why})
    for h in m.doc["holes"]:
        if id(h) not in named:
            failures.append({"object": None, "error": m.gap_message(h["a"], h["b"])})
    for snap in m.snapshots:
        start = m.wal_start_for(snap["lsn"])
        if start is None:
            continue  # (not yet restorable: listed as such)
        try:
            m.chain(start, m.end())
        except ReplicationError as e:
            failures.append({"object": snap["k"], "error": f"snapshot at LSN {snap['lsn']}: "
                             f"{e}"})
    return _named({"check": "WAL contiguous", "ok": True, "objects": len(m.wal),
                   "from": m.wal[0]["a"] if m.wal else m.end(), "to": m.end()}, failures)


def _check_wal_objects(m: Manifest, tgt: ObjectStore, tmp: str,
                       step: Callable[[int], None],
                       named: dict[str, tuple[int | None, str]],
                       at: dict[int, tuple[int, dict] | None] | None = None,
                       opts: ReplicateOptions | None = None) -> dict:
    """Every WAL object downloaded (one at a time, into ``tmp``) and streamed: its header
    against the manifest, every record's CRC and LSN under its segment's salt.  The blobs
    its file records name go into ``named`` (those a restore can reach: from where the
    oldest restorable snapshot's replay begins); the records at the LSNs the manifest gives
    its restore points (made or dropped) into ``at`` (LSN -> type, summary).  An object
    missing that the manifest now no longer lists was dropped by the live writer since
    (``dropped_since_read``), not damage."""
    opts = opts if opts is not None else ReplicateOptions()
    dropped: list[str] = []
    wanted = {v for p in m.doc["points"].values() for v in (p["lsn"], p.get("dropped"))
              if isinstance(v, int)}
    fetch = _Fetcher(tgt, m.doc["store_id"], tmp)
    starts = [m.wal_start_for(sn["lsn"]) for sn in m.snapshots]
    lo = min((a for a in starts if a is not None), default=None)
    failures = []
    for e in m.wal:
        purges: list = []
        # its commits' txids and times, as the shipper lists them (x0, x1, t0, t1): a
        # restore to a txid or a time picks the object by them (not checked, a damaged
        # x0 made `restore --to tx:N` refuse a txid the replica holds, verify said ok)
        seen = {"x0": None, "x1": None, "t0": None, "t1": None}
        try:
            for r in fetch.records(e):
                erased = logformat.purge_prefix_of(r[1], r[2])
                if erased is not None:
                    purges.append([r[0], erased])
                if r[1] == logformat.COMMIT:
                    _note_commit(seen, logformat.summarize(
                        r[1], r[2][logformat.RECORD_HEADER_SIZE:]))
                if at is not None and r[0] in wanted:
                    at[r[0]] = (r[1], logformat.summarize(
                        r[1], r[2][logformat.RECORD_HEADER_SIZE:]))
                if lo is not None and r[0] >= lo and r[1] in _FILE_NAMING:
                    for d, n in blobs_named([r]).items():
                        named.setdefault(d, (n, f"the record at LSN {r[0]} ({e['k']})"))
            if "pg" in e and [list(p) for p in e["pg"]] != purges:
                # (a mark missing, a restore to a point before that purge would bring
                # its erased keys back)
                failures.append({"object": e["k"], "error": f"WAL object {e['k']} holds the "
                                 f"purges {purges}, its manifest marks {e['pg']}"})
            wrong = [k for k in seen if e[k] != seen[k]]
            if wrong:
                failures.append({"object": e["k"], "error": f"WAL object {e['k']} holds "
                                 f"commits {seen}, its manifest entry says "
                                 f"{ {k: e[k] for k in seen} }"})
        except ReplicationError as err:
            if isinstance(err, _ObjectGone) and _dropped_since(tgt, opts, e["k"]):
                # (merged or retained away by the live writer since the manifest was read,
                # deleted ``delete_grace`` later: no damage — a verify longer than the
                # grace of a replica being written reported such objects as holes)
                dropped.append(e["k"])
            else:
                failures.append({"object": e["k"], "error": str(err)})
            if at is not None:  # (unread past the damage: judged by this check, not by
                for lsn in wanted:  # _check_points)
                    if e["a"] <= lsn < e["b"]:
                        at.setdefault(lsn, None)
        finally:
            fetch.drop(e)
        step(e["n"])
    return _named({"check": "every WAL object", "ok": True, "objects": len(m.wal),
                   "bytes": fetch.bytes, "dropped_since_read": dropped}, failures)


def _note_commit(seen: dict, info: dict) -> None:
    """Fold a COMMIT record's txid and time into ``seen`` (x0, x1, t0, t1) as the
    shipper folds them into an object's manifest entry."""
    tx = info.get("tx")
    if not isinstance(tx, int):
        return
    ts = info.get("ts") if isinstance(info.get("ts"), (int, float)) else None
    if ts is not None:
        seen["t0"] = ts if seen["t0"] is None else min(seen["t0"], ts)
        seen["t1"] = ts if seen["t1"] is None else max(seen["t1"], ts)
    seen["x0"] = tx if seen["x0"] is None else min(seen["x0"], tx)
    seen["x1"] = tx if seen["x1"] is None else max(seen["x1"], tx)


def _check_points(m: Manifest, at: dict[int, tuple[int, dict] | None]) -> dict:
    """Every restore point the manifest lists, where its WAL still holds it, is where the
    WAL logged it: the record at its LSN makes that point (a restore to it is refused
    otherwise), the record at its ``dropped`` LSN drops it."""
    failures = []
    for name, p in sorted(m.doc["points"].items()):
        for lsn, dropping in ((p["lsn"], False), (p.get("dropped"), True)):
            if isinstance(lsn, int) and lsn >= m.end():
                # (the shipper lists only points it shipped: one past the replica's end
                # was skipped as "before the WAL retained", and verify said ok of a point
                # no restore reaches)
                what = "dropped" if dropping else "made"
                failures.append({"object": None, "error": f"restore point {name!r}: the "
                                 f"manifest says it was {what} at LSN {lsn}, past the "
                                 f"replica's end (LSN {m.end()})"})
                continue
            if not isinstance(lsn, int) or not any(e["a"] <= lsn < e["b"] for e in m.wal):
                continue  # (before the WAL retained, or not dropped)
            if lsn in at and at[lsn] is None:
                continue  # (its object is damaged: ``every WAL object`` says so)
            rtype, info = at.get(lsn, (None, {}))
            if dropping:
                ok = rtype == logformat.RESTORE_POINT and info.get("drop") and \
                    info.get("name") == name
                why = None if ok else "the record there does not drop it"
            else:
                why = _point_mismatch(name, lsn, rtype, info)
            if why is not None:
                what = "dropped" if dropping else "made"
                failures.append({"object": None, "error": f"restore point {name!r}: the "
                                 f"manifest says it was {what} at LSN {lsn}, but {why}"})
    return _named({"check": "restore points", "ok": True, "points": len(m.doc["points"])},
                  failures)


def _check_snapshots(m: Manifest, tgt: ObjectStore, tmp: str,
                     step: Callable[[int], None],
                     named: dict[str, tuple[int | None, str]],
                     opts: ReplicateOptions | None = None) -> dict:
    """Every snapshot downloaded (one at a time): size and sha256 as the manifest says, an
    LMDB environment applied up to the LSN it is listed at.  The blobs its file tables
    name (what a copy restored from it keeps) go into ``named``.  One missing that the
    manifest now no longer lists was retained away since (``dropped_since_read``)."""
    opts = opts if opts is not None else ReplicateOptions()
    dropped: list[str] = []
    failures = []
    n = 0
    for snap in sorted(m.snapshots, key=lambda s: s["lsn"]):
        if snap["k"] is None:
            continue  # the empty store at LSN 0: no object
        n += 1
        db = os.path.join(tmp, f"snapshot-{n}")
        _src.make_dir(db)
        try:
            _download_snapshot(tgt, snap, os.path.join(db, "data.mdb"))
            applied = _src.read_applied(db)
            if applied != snap["lsn"]:
                raise ReplicationError(f"snapshot {tgt.url}/{snap['k']} holds LSN {applied}, "
                                       f"the manifest says {snap['lsn']}")
            for d, size in _src.snapshot_blob_refs(db).items():
                named.setdefault(d, (size, f"snapshot {snap['k']}"))
        except Exception as err:
            if isinstance(err, _ObjectGone) and _dropped_since(tgt, opts, snap["k"]):
                dropped.append(snap["k"])  # (retained away since: see _check_wal_objects)
            else:
                failures.append({"object": snap["k"], "error": str(err)})
        finally:
            shutil.rmtree(db, ignore_errors=True)
        step(snap["n"])
    return _named({"check": "every snapshot", "ok": True, "snapshots": n,
                   "dropped_since_read": dropped}, failures)


_FILE_NAMING = frozenset({logformat.FILE_STEPS, logformat.WATCH_BEGIN, logformat.FILE_CONFLICT})


def _check_blobs(tgt: ObjectStore, named: dict[str, tuple[int | None, str]]) -> dict:
    """Every blob the retained history names (its WAL objects' file records, its
    snapshots' file tables) is in ``blobs/``, of the size its record gives: one listing of
    ``blobs/``, nothing downloaded.  (A replica whose history named content it never
    received verified clean, and a restore of those points could not read their files.)
    The content a watch's manifest lists is not checked here (it takes the manifest's
    download); a restore fetches it and lists what it lacks in ``blobs_missing``."""
    have = {k[len(BLOB_PREFIX):]: n for k, n in tgt.list(BLOB_PREFIX)}
    failures = []
    for d in sorted(named):
        size, where = named[d]
        if d not in have:
            failures.append({"object": BLOB_PREFIX + d,
                             "error": f"blob {d} is missing from the replica (named by "
                                      f"{where}: the file content of that point is lost)"})
        elif size is not None and have[d] != size:
            failures.append({"object": BLOB_PREFIX + d,
                             "error": f"blob {d} holds {have[d]} bytes, {where} says {size}"})
    return _named({"check": "every blob named", "ok": True, "blobs": len(named)}, failures)
