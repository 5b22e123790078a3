"""The shipper: continuous replication of one store to one replica URL.

Owns the shipping round (:meth:`Shipper.ship_once`) and the background thread that runs
it every ``interval`` seconds, the start (the replica checked — its store, lineage,
history, no replica in another's object space — before the lease is taken; the manifest
fenced under the new lease before orphans are collected), the status
(:class:`ReplicationStatus`), ``sync`` (wait until a given LSN is shipped; naming the
request waiting when it times out), the manifest's ``complete_to`` (the time up to which
the replica holds every commit), periodic snapshots, compaction of small WAL objects into
larger ones, retention, the collection of orphans (only keys of its own naming), and the
WAL trim pin.

A round: renew the lease when due; read the durable frontier; for every segment from the
shipped position, cut the CRC-checked records below the frontier into one immutable WAL
object (If-None-Match), then write the manifest (If-Match).  The position (and
``shipped_lsn``) advances only after both are complete.  Nothing new: no request at all,
except a lease renewal every ``lease_ttl / 3`` seconds.

Invariants: the shipper never writes a byte of the store (the pin is a request to the
engine); it never blocks a commit (it holds no store lock: once a round the source
passes through the journal lock, acquiring and releasing it with nothing done under it,
``Source.complete_mark``; the LMDB snapshot is a read transaction); any failure only
grows the lag, and the next round resumes from the
position in the manifest; a lost lease stops shipping for good and says so.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from .. import clock
from ..errors import ReplicationError, type_and_message
from ..files.blobs import BlobStore
from ..log.reader import FileBytes
from ..signals import Flag
from . import logformat, source as _src
from .lease import LEASE_KEY, MAX_LEASE_BYTES, Lease, LeaseLost, Refused, _pid_alive, \
    describe, holder_info
from .manifest import MANIFEST_KEY, Manifest, decode as decode_manifest
from .options import ReplicateOptions
from .targets import (NOT_MODIFIED, REPLICA_DIRS, ManifestTooLarge, ObjectStore,
                      PreconditionFailed, TargetError, WatchedTarget, display_url,
                      open_target)

IN_MEMORY_OBJECT = 8 << 20   # WAL objects up to this size are built in memory, larger spooled
SAVE_EVERY = 5.0             # a long round writes the manifest at least this often
RETENTION_EVERY = 60.0
MAX_STAMP_WALK = 4096  # records read to find the oldest unshipped stamp (write-set chunks
#                       carry none): past it the lag counts from when it was noticed
SNAPSHOT_BACKOFF_MAX = 300.0  # between attempts after failed snapshots (see _snapshot_due)
STALL_REPORTED = 10.0        # a request unanswered this long shows in ``last_error``


@dataclass
class ReplicationStatus:
    """What ``store.replication()`` returns."""

    url: str
    state: str                 # starting | running | stopped | lease-lost | refused | failed
    shipped_lsn: int           # every record below it is in the replica (0: nothing yet;
    # before the replica's manifest is read — the server not reached since the open — the
    # position the last shipper recorded in the store: a lower bound, state "starting")
    durable_lsn: int           # the local durable frontier last seen
    lag_bytes: int
    lag_seconds: float
    last_error: str | None
    last_shipped_at: float | None = None
    snapshots: int = 0
    requests: dict = field(default_factory=dict)


TEMP_PREFIX = "walstore-ship-"  # + pid + "-": a shipper's scratch directory


def _sweep_stale_temps() -> None:
    """Remove scratch directories that shippers killed mid-snapshot left behind (an LMDB
    copy each: hundreds of MB): see ``sweep_dead_scratch``."""
    sweep_dead_scratch(tempfile.gettempdir(), TEMP_PREFIX)


# this process's scratch directories whose removal failed (``remove_scratch``): swept
# by the next ``sweep_dead_scratch`` of their parent although this process lives on
_ABANDONED: set[str] = set()


def remove_scratch(path: str) -> None:
    """Remove a scratch directory this process made and uses no more (a backup's or a
    restore's staging copy, a shipper's temp directory).  When that fails — at the
    descriptor limit (EMFILE: ``rmtree`` opens every directory it empties), EIO — it is
    remembered, and the next sweep of its parent (the next backup or restore to the same
    place) removes it: a live process's scratch is otherwise never swept, and a backup
    that failed at the limit left its partial copy, data and all, beside DEST for as long
    as the process ran."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _ABANDONED.add(os.path.abspath(path))


def sweep_dead_scratch(base: str, prefix: str) -> None:
    """Remove the directories under ``base`` named ``<prefix><pid>-...`` whose process is
    no longer alive (ours by owner; never a symlink), and unnamed older ones (no pid in
    the name) more than a day old: what a killed shipper, restore or follower left; and
    this process's own that ``remove_scratch`` could not remove."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
            continue
        mine = os.path.abspath(path)
        if mine in _ABANDONED:
            remove_scratch(path)
            if not os.path.lexists(path):
                _ABANDONED.discard(mine)
            continue
        pid_part = name[len(prefix):].split("-", 1)[0]
        if pid_part.isdigit() and "-" in name[len(prefix):]:
            if _pid_alive(int(pid_part)):
                continue
        elif time.time() - st.st_mtime < 86400:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _since(stamp: float) -> float:
    """A record's wall-clock ``stamp`` as an instant of ``clock.elapsed()`` (the boot
    clock, which counts a suspend, where there is one; else the monotonic clock): its age
    now, never below 0 (a stamp ahead of the clock: logged before a step back), taken
    from that clock's now.  An age counted from it later is immune to steps of the wall
    clock since, and counts a suspend (on ``time.monotonic``, a commit that waited
    through two hours of sleep showed a lag of a second: audit 67 review)."""
    return clock.elapsed() - max(0.0, time.time() - stamp)


def wal_key(a: int, b: int, level: int) -> str:
    return f"wal/{a:020d}-{b:020d}-L{level}"


def snapshot_key(lsn: int) -> str:
    return f"snapshots/{lsn:020d}-{uuid.uuid4().hex[:8]}.mdb"


_OWN_KEY = re.compile(r"wal/\d{20}-\d{20}-L\d+|snapshots/\d{20}-[0-9a-f]{8}\.mdb")


def is_own_key(key: str) -> bool:
    """Whether ``key`` has the form of a WAL object or snapshot a shipper writes (only
    those are ever collected as orphans)."""
    return _OWN_KEY.fullmatch(key) is not None


class Shipper:
    def __init__(self, source: _src.Source, url: str, options: Any = None,
                 target: ObjectStore | None = None) -> None:
        self.source = source
        self.opts = ReplicateOptions.from_any(options)
        self.opts.check_lease()  # (before anything is touched: see check_lease)
        if hasattr(source, "pin_limit"):  # the source bounds its pin itself (see _pin)
            source.pin_limit = self.opts.max_pin_bytes
        self.url = display_url(url)
        _refuse_replica_inside(url, source.path)
        self.target = WatchedTarget(target if target is not None
                                    else open_target(url, self.opts))
        self.token = uuid.uuid4().hex
        self.holder = holder_info(self.token, source.path, source.store_id, source.lineage,
                                  inproc=getattr(source, "holds_store_lock", False))
        self.lease = Lease(self.target, self.holder, self.opts.lease_ttl)
        self._lease_lock = threading.Lock()  # (_hold_lease: blob upload threads share it)
        self.manifest: Manifest | None = None
        self.state = "starting"
        self.last_error: str | None = None
        self.shipped = 0
        self.last_shipped_at: float | None = None
        self._durable = 0
        self._blobs_up: set[str] | None = None  # blob digests known to be in the replica
        # local blobs whose bytes do not match their names (damaged on the source's disk):
        # digest -> (size, mtime_ns) when found, never uploaded (``_ship_blobs``)
        self._damaged_blobs: dict[str, tuple[int, int]] = {}
        # WAL objects of the replica compaction could not read (damaged or missing, their
        # local segment gone): key -> why.  Left out of every merge, reported by status()
        self._unmergeable: dict[str, str] = {}
        self._blob_lock = threading.Lock()  # (blob uploads run on several threads)
        # (the instant, on clock.elapsed(), the oldest unshipped record was
        # logged — see _since; lag_seconds counted on the wall clock went to -3600 s when
        # it stepped back an hour, +3600 s forward: audit 67)
        self._behind_since: float | None = None
        # (clock.elapsed()) when the durable frontier was last read by a round that then shipped
        # all of it: whatever is unshipped was logged after, so lag_seconds is never more
        # than the time since (a commit stamped by a clock a day behind, set right since,
        # showed a lag of a day: audit 67)
        self._caught_up: float | None = None
        self._round = threading.Lock()
        self._cond_lock = threading.RLock()  # (entered as itself: walstore.signals)
        self._cond = threading.Condition(self._cond_lock)
        self._wake = Flag()
        self._stop = Flag()
        self._thread: threading.Thread | None = None
        self._first = Flag()
        self._start_error: Exception | None = None
        self._started = False
        self._last_retention: float | None = None  # (clock.elapsed() then)
        self._snapshot_retry_at = 0.0  # (time.monotonic(): a step of the wall clock
        # moved a retry by as much)
        self._snapshot_error: str | None = None  # the last snapshot failed (until one works)
        self._snapshot_failures = 0
        self._unsaved = False  # the manifest changed in memory, its write failed (see _save)
        self._saved_position: int | None = None  # the position the replica's manifest holds
        # why no restore can reach the end of the replica's saved manifest (None: one
        # can): no snapshot the WAL reaches it from, past a hole or at all (see sync)
        self._saved_unbased: str | None = None
        self._failed_rounds = 0  # rounds failed in a row (see _round_error)
        self._complete_pending: list[tuple[float, int]] = []  # see _complete_candidate
        self._complete_saved: float | None = None  # complete_to in the replica's manifest
        self._complete_wanted = 0.0  # the newest sync's call time (see sync)
        # the progress of the round in flight (``ship_once``'s callbacks; None: not asked)
        self._shown: _Shown | None = None
        self._snapshot_shown: Callable[[int, int], None] | None = None
        _sweep_stale_temps()
        self._tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, wait: float = 5.0) -> "Shipper":
        """Ship in a background thread.  The lease is taken first, waiting up to ``wait``
        seconds: a second writer is refused here (ReplicationError naming the holder).
        A server that does not answer in time does not fail the start: the thread keeps
        trying, and a refusal found later stops it with state "refused"."""
        self._first = Flag()
        thread = threading.Thread(target=self._run, name="walstore-replication", daemon=True)
        try:
            thread.start()  # (signals not blocked: it runs boto3, which may start a
            # credential process, and a child inherits its thread's mask: walstore.signals)
        except RuntimeError as e:  # "can't start new thread": a thread or process limit.
            # (It escaped raw from open(replicate_to=...), and the shipper's temp directory
            # stayed behind.)  Nothing was taken yet: no lease, no pin.
            self.state = "failed"
            self.last_error = f"the replication thread could not start: {e}"
            self.close()
            raise ReplicationError(f"cannot start the replication thread for {self.url} "
                                   f"({e}): the process is at a thread or process limit "
                                   f"(RLIMIT_NPROC, a cgroup's pids.max) or out of "
                                   f"memory") from e
        self._thread = thread
        self._first.wait(wait)
        if self.state == "refused" or (self._start_error is not None
                                       and not getattr(self._start_error, "transient", True)):
            self.stop(release=False)
            raise self._start_error
        return self

    def stop(self, release: bool = True, wait: float = 5.0) -> None:
        """Stop shipping and release the lease; waits up to ``wait`` seconds for a round in
        flight (a hung server does not hold up the store's close)."""
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(wait)
        if self.state not in ("lease-lost", "refused", "failed"):
            self.state = "stopped"
        with self._cond_lock:
            self._cond.notify_all()
        if release and self.state != "refused" and (t is None or not t.is_alive()):
            self.lease.release()
        elif release:  # a round still hung on the server: this process lets go anyway (a
            from .lease import LIVE_IDS  # reopen here may take it over; the stale round's
            LIVE_IDS.discard(self.holder["id"])  # writes then fail their If-Match)
        if t is None or not t.is_alive():
            self.close()

    def close(self) -> None:
        self.target.close()
        remove_scratch(self._tmp)

    def _run(self) -> None:
        """The thread: rounds until stopped.  An error that escapes them (a bug of ours,
        never a server's: those are retried) stops shipping with state "failed" and says
        why in ``last_error`` (the thread died of an OverflowError while ``replication()``
        said "running", no error, and ``sync_replica`` blamed a slow round)."""
        try:
            self._rounds()
        except BaseException as e:
            self.state = "failed"
            self.last_error = f"the replication thread stopped: {type_and_message(e)}"
            self._unpin()
            self._first.set()
            with self._cond_lock:
                self._cond.notify_all()
            if not isinstance(e, Exception):
                raise

    def _rounds(self) -> None:
        delay = self.opts.interval
        while not self._stop.is_set():
            failed = False
            try:
                self.ship_once()
                self.last_error = None
                self._failed_rounds = 0
                delay = self.opts.interval
            except (LeaseLost, Refused) as e:
                self.state = "lease-lost" if isinstance(e, LeaseLost) else "refused"
                self.last_error, self._start_error = str(e), e
                self._unpin()  # (stopped for good: nothing will ship what the pin keeps)
                with self._cond_lock:
                    self._cond.notify_all()
                return
            except Exception as e:  # anything else: retry with backoff; commits go on
                if not self._started:
                    self._start_error = e
                # (never sooner than ``interval``: a ``max_backoff`` below it, 0 allowed,
                # made the backoff 0 and a failing server got rounds in a busy loop)
                delay = min(self.opts.max_backoff, max(self.opts.interval, delay * 2))
                delay = max(self.opts.interval, delay * (0.5 + random.random()))
                self.last_error = self._round_error(e, delay)
                failed = True
                self._repin()  # (a failed round moves no position; the frontier moved on)
                with self._cond_lock:
                    self._cond.notify_all()
            finally:
                self._first.set()
            self._pause(delay, failed)

    def _round_error(self, e: Exception, delay: float) -> str:
        """``last_error`` after a failed round.  An error the target does not mark
        transient (an object that exists with other content, a refused request) is said to
        be one, with the rounds it failed in a row: every round meets it again and nothing
        ships past it until it is resolved (it read as one more passing error while every
        later commit stayed unshipped: probe-repl)."""
        self._failed_rounds += 1
        msg = f"{type_and_message(e)}"
        if getattr(e, "transient", None) is False or (
                isinstance(e, ReplicationError) and not isinstance(e, TargetError)):
            msg += (f" (not a transient error: {self._failed_rounds} round(s) in a row "
                    f"failed, nothing ships past LSN {self.shipped} until it is resolved; "
                    f"retrying in {delay:.1f} s)")
        return msg

    def _pause(self, delay: float, backoff: bool) -> None:
        """Wait ``delay`` seconds before the next round.  A wake (``sync``'s request) ends
        a plain interval at once; a backoff after a failed round it only shortens, to
        ``interval`` after the failure: a sync asks for one prompt attempt and
        can never turn the retries into a busy loop (a waiting sync woke the shipper on
        each failure it was told of and cut every backoff short: thousands of PUTs a
        second against a failing target).  ``stop`` ends any wait."""
        start = time.monotonic()
        deadline = start + delay
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self._wake.wait(left):
                continue  # (the time is up: the loop ends)
            self._wake.clear()
            if self._stop.is_set() or not backoff:
                break
            deadline = min(deadline, start + self.opts.interval)

    def _ensure_started(self) -> None:
        if self._started:
            return
        src = self.source
        # The replica is checked before the lease is touched: a store refused here (the
        # replica holds another store, or another history of this one) must take over no
        # lease.  It did: the rightful writer, stalled past the lease's ttl, then found its
        # renewal failing and stopped for good ("lease-lost" to a store that was refused),
        # and nobody shipped the replica any more.
        self.lease.check()  # (a live writer is named first, as before)
        m = Manifest.load(self.target, self.opts.max_manifest_bytes)
        if m is not None:
            self._check_replica(m)
        else:
            self._refuse_nested()
        self.lease.acquire()
        try:  # again under the lease (a writer may have written it meanwhile)
            m = self._reload(m)
            if m is None:
                m = Manifest.new(src.store_id, src.lineage, src.identity)
            else:
                self._check_replica(m)
            self._mark_version(m)
            if m.etag is not None:
                m = self._fence(m)
        except Refused:
            self.lease.release(give_back=True)  # (the holder it was taken from keeps it)
            raise
        self.manifest = m
        self.shipped = m.position or 0
        self._saved_position = m.position
        self._saved_unbased = _end_unrestorable(m)
        self._complete_saved = m.doc.get("complete_to")
        self.target.cleanup_uploads()  # we hold the lease: leftovers of a writer cut short
        self._collect_orphans()  # (against the manifest the fence wrote: see _fence)
        self._started = True
        self.state = "running"

    def _mark_version(self, m: Manifest) -> None:
        """The replica carries the store's format version: a replica an older walstore
        made is marked with this one's before the first manifest this shipper writes
        lists any record of it (a review: an older walstore restored such a replica,
        still "version 1", and committed 230 of a chunked PREPARE's 3,000 keys)."""
        src = self.source
        ident = m.doc.get("identity") or {}
        if isinstance(src.identity.get("version"), int) and (
                not isinstance(ident.get("version"), int)
                or ident["version"] < src.identity["version"]):
            m.doc["identity"] = dict(ident, version=src.identity["version"])

    def _fence(self, m: Manifest) -> Manifest:
        """Write the manifest read under the new lease back (If-Match on its etag) before
        anything is collected: its etag changes, so a manifest PUT of the previous writer
        still in flight (killed, or closed while its round hung on the server: its
        If-Match is on the etag read here, since taking the lease changes only the
        lease's etag) fails when it lands late.  When such a PUT lands first, the write
        here fails: the manifest it wrote is read again (checked as the first was) and
        fenced in turn.  Without this the orphan collection deleted the WAL objects that
        pending PUT listed, the PUT then landed — a manifest listing deleted objects, no
        restore to its end — and this writer's next write failed its If-Match: stopped
        for good as "lease-lost" to a dead process (probe-repl2)."""
        for _ in range(5):
            try:
                m.save(self.target, self.holder, self.opts.max_manifest_bytes)
                return m
            except PreconditionFailed:
                self._still_holding("the manifest changed while this writer fenced it")
                got = Manifest.load(self.target, self.opts.max_manifest_bytes)
                if got is None:
                    raise LeaseLost(f"the manifest of {self.url} was deleted while this "
                                    f"writer took the replica over; nothing was shipped") \
                        from None
                self._check_replica(got)
                self._mark_version(got)
                m = got
        raise ReplicationError(f"the manifest of {self.url} keeps changing while this writer "
                               f"holds the lease (a previous writer's requests still "
                               f"landing?); retrying")

    def _still_holding(self, why: str) -> None:
        """LeaseLost (naming the holder) unless the lease is still this writer's: a
        manifest write that failed its If-Match under a lease still held was a request of
        a previous writer landing late (a dead process's, or one this process closed),
        never a live second writer's (that one would have taken the lease first)."""
        cur = self.lease.read()
        if cur is not None and (cur[1] == self.lease.etag
                                and cur[0]["holder"].get("id") == self.token
                                or self.lease.adopt_if_mine(cur)):
            return  # (adopted: a renewal of ours landed with its answer lost)
        who = describe(cur[0]["holder"]) if cur is not None else "nobody (the lease is gone)"
        raise LeaseLost(f"{why}, and the lease of {self.url} is now held by {who}; "
                        f"shipping stopped")

    def _reload(self, m: Manifest | None) -> Manifest | None:
        """The replica's manifest now; ``m`` itself when it did not change (not read again:
        it may be tens of MB)."""
        if m is None or m.etag is None:
            return Manifest.load(self.target, self.opts.max_manifest_bytes)
        got = self.target.get(MANIFEST_KEY, self.opts.max_manifest_bytes, if_none_match=m.etag)
        if got is None:
            return None
        if got == NOT_MODIFIED:
            return m
        return Manifest(decode_manifest(got[0], self.target.url), got[1])

    def _refuse_nested(self) -> None:
        """A new replica is refused at a URL in another replica's object space (its
        ``wal/``, ``snapshots/``, ``blobs/``), or when another replica lies in its own:
        a replica's listing of those is recursive (a replica under another's ``wal/`` was
        swept away by its orphan collection, and restore reads ``blobs/``).  Replicas side
        by side, or one beside another's objects (``s3://b/r`` and ``s3://b/r/v2``), are
        fine."""
        enclosing = getattr(self.target, "enclosing", None)
        for outer, rel in (enclosing() if enclosing is not None else ()):
            if rel.split("/", 1)[0] not in REPLICA_DIRS:
                continue
            h = _replica_holder(outer, LEASE_KEY)
            if h is not None:
                raise Refused(f"replica URL {self.url} lies in the {rel.split('/', 1)[0]}/ of "
                              f"the replica at {outer.url} (of store {h.get('path', '?')}), "
                              f"among its objects: give this replica a URL outside it; "
                              f"nothing was shipped")
        for d in REPLICA_DIRS:
            for i, (key, _size) in enumerate(self.target.list(d + "/")):
                if i >= NESTED_LIST_BOUND:
                    break
                if key.endswith("/" + LEASE_KEY):
                    h = _replica_holder(self.target, key)
                    if h is not None:
                        raise Refused(
                            f"replica URL {self.url} holds another replica among its "
                            f"objects, at {self.url}/{key[:-len(LEASE_KEY) - 1]} (of store "
                            f"{h.get('path', '?')}): give this replica a URL that has none "
                            f"under its {d}/; nothing was shipped")

    def _check_replica(self, m: Manifest) -> None:
        """Refused unless the replica holds this store (its id and lineage) and this log's
        past (see ``_check_same_history``)."""
        src = self.source
        if m.doc["store_id"] != src.store_id or m.doc["lineage"] != src.lineage:
            raise Refused(
                f"{self.url} holds the replica of store {m.doc['store_id'].hex()} (lineage "
                f"{m.doc['lineage']}); this store is {src.store_id.hex()} (lineage "
                f"{src.lineage}): replicate it to a new URL")
        if m.position is not None:
            self._check_same_history(m)

    def _check_same_history(self, m: Manifest) -> None:
        """The replica must be this log's past: a store directory rolled back to an older
        copy (a disk snapshot), or a copy of it elsewhere, shares the store id and lineage
        but not the history after the copy — shipping it would splice two histories into
        one replica.  Refused when the replica is ahead of the local log, or when the
        replica's last commit is not the local log's record at that LSN (checked while
        the local log still holds it)."""
        src = self.source
        durable = src.durable_lsn()
        why = None
        if durable < m.position:
            why = (f"the replica holds this store's log up to LSN {m.position}, but the log "
                   f"here ends at LSN {durable}")
        else:
            last = m.doc.get("last_commit") or {}
            found, digest = _local_commit_at(src, last.get("lsn"))
            if found is not None and (found != last.get("tx") or (
                    last.get("h") is not None and digest != last["h"])):
                why = (f"the replica's last commit (transaction {last.get('tx')} at LSN "
                       f"{last.get('lsn')}) is not the record at that LSN here ("
                       + (f"transaction {found}" if found != last.get("tx")
                          else "the same transaction id with other content") + ")")
            elif found is None and isinstance(last.get("tx"), int):  # (log trimmed here:
                at = src.commit_lsn(last["tx"])                      # the history tells)
                if at is not False and at != last.get("lsn"):
                    why = (f"the replica's last commit is transaction {last['tx']} at LSN "
                           f"{last.get('lsn')}; here it " + ("never committed" if at is None
                                                             else f"committed at LSN {at}"))
        if why is None:
            why = self._snapshot_not_here(m)
        if why is not None:
            raise Refused(f"{self.url} does not hold this store's history: {why} (the store "
                          f"directory was rolled back to an older copy, or it is a copy of "
                          f"the store that wrote the replica); replicate it to a new URL")

    def _snapshot_not_here(self, m: Manifest) -> str | None:
        """Why a snapshot past the replica's position is not of this log (None: each is,
        or cannot be told).  It holds commits the replica's WAL does not: a store put back
        to an older copy taken before it goes on with other commits at the same LSNs, and
        a restore based on the snapshot spliced the two histories (audit 68 review)."""
        for s in m.snapshots:
            lc = s.get("lc")
            if s["lsn"] <= m.position or not isinstance(lc, dict) \
                    or not isinstance(lc.get("lsn"), int) or not isinstance(lc.get("tx"), int):
                continue
            found, digest = _local_commit_at(self.source, lc["lsn"])
            if found is None:  # (log trimmed here: the history tells)
                at = self.source.commit_lsn(lc["tx"])
                same = at is False or at == lc["lsn"]
            else:
                same = found == lc["tx"] and (lc.get("h") is None or digest == lc["h"])
            if not same:
                return (f"its snapshot at LSN {s['lsn']} ({s['k']}), past its position, holds "
                        f"transaction {lc['tx']} at LSN {lc['lsn']}, which is not this log's "
                        f"commit there")
        return None

    def _collect_orphans(self) -> None:
        """Objects the manifest never listed (an upload whose manifest write failed): only
        keys of this shipper's own naming (``wal_key``, ``snapshot_key``).  Listing is
        recursive: anything else under ``wal/`` or ``snapshots/`` is not ours (another
        store's replica at a URL under this one's was deleted here without a word)."""
        m = self.manifest
        known = {e["k"] for e in m.wal} | {s["k"] for s in m.snapshots}
        known |= {k for k, _t in m.doc["trash"]}
        for prefix in ("wal/", "snapshots/"):
            for key, _size in list(self.target.list(prefix)):
                if key not in known and is_own_key(key):
                    self.target.delete(key)

    # ---- status and sync ---------------------------------------------------------------
    def status(self) -> ReplicationStatus:
        try:
            durable = max(self._durable, self.source.durable_lsn())
        except Exception:
            durable = self._durable
        self._durable = durable
        base = self.shipped
        if not self._started:
            # the replica's position is known once its manifest is read: before that it
            # said shipped_lsn 0 (and a lag of the whole log, aged from the log's first
            # record) of a replica holding all but the last commits — a store reopened
            # while the server is down.  Now the position the last shipper recorded in
            # the store (the replica holds at least that: a lower bound, an int as ever
            # for a caller comparing it), the lag counted from there (an outage since
            # the reopen still shows the age of what is left unshipped)
            base = max(base, self._recorded_position())
        shipped = base
        lag = max(0, durable - base)
        if lag and self._behind_since is None:
            self._behind_since = _since(self._oldest_unshipped_stamp(time.time(), durable,
                                                                     base))
        lag_s = 0.0 if not lag or self._behind_since is None else \
            clock.elapsed() - self._behind_since
        if lag and self._caught_up is not None:
            lag_s = min(lag_s, clock.elapsed() - self._caught_up)
        m = self.manifest
        error = self.last_error or self._snapshot_error
        if error is None and self._damaged_blobs:
            names = sorted(self._damaged_blobs)
            error = (f"{len(names)} local blob(s) damaged, their bytes not matching their "
                     f"names ({', '.join(d[:12] for d in names[:4])}"
                     f"{', ...' if len(names) > 4 else ''}): not shipped (the replica's "
                     f"restores of points naming them report them missing); `walstore "
                     f"verify` names them")
        bad = {k: why for k, why in self._unmergeable.items()
               if m is not None and any(e["k"] == k for e in m.wal)}
        if error is None and bad:
            first = min(bad)
            error = (f"{len(bad)} WAL object(s) of the replica cannot be read (e.g. {first}: "
                     f"{bad[first]}), their local segment gone: left as they are, not "
                     f"compacted; a restore that replays them fails (`walstore replicas "
                     f"--verify` checks the replica)")
        if error is None and self._saved_unbased is not None:  # (a snapshot to come)
            error = f"no restore can reach the replica's end yet: {self._saved_unbased}"
        if error is None and self.target.waiting_for() >= STALL_REPORTED:
            error = f"waiting on the server: {self.target.waiting()}"
        return ReplicationStatus(self.url, self.state, shipped, durable, lag, lag_s,
                                 error, self.last_shipped_at,
                                 len(m.snapshots) if m else 0, dict(self.target.requests))

    def _recorded_position(self) -> int:
        """The replica's position as the last shipper recorded it in the store (0: none
        recorded, or a source outside the writer)."""
        try:
            pos = getattr(self.source, "recorded_position", lambda: None)()
        except Exception:  # noqa: BLE001 - a status never fails
            pos = None
        return pos if isinstance(pos, int) and pos > 0 else 0

    def _oldest_unshipped_stamp(self, default: float, durable: int,
                                start: int | None = None) -> float:
        """When the oldest record not shipped yet was logged: the stamp of the first
        stamped record (a commit, an intent, a restore point) from ``shipped`` on, below
        ``durable``, read through the one WAL reader (``walstore.log.reader``'s
        SegmentReader, from that record's offset); ``default`` when none is found within
        MAX_STAMP_WALK records or the log cannot be read (a source that is no store
        directory, a segment trimmed meanwhile).  ``lag_seconds`` counts from it: counted
        from the moment the lag was first noticed (a round's start, or the first
        ``replication()`` call), a commit left unshipped for seconds between rounds showed
        a lag of ~0 s, and a partly shipped round restarted the clock (probe6).  Read only
        when the clock (re)starts, never per commit."""
        from ..log.reader import SegmentReader
        try:
            pos, seen = self.shipped if start is None else start, 0
            segs = sorted(self.source.segments())
            store_id = self.source.store_id
            first = max((i for i, (start, _p) in enumerate(segs) if start <= pos), default=0)
            for start, path in segs[first:]:
                if start >= durable:
                    break
                reader = SegmentReader(path, store_id, start)
                if reader.header_error is not None:
                    break
                # (stopping at the last record below ``durable``: the reader judges the
                # segment's end only when it reaches it, a live writer's tail)
                for rec in reader.records(reader.offset_of(max(pos, start))):
                    seen += 1
                    ts = logformat.summarize(rec.type, rec.payload).get("ts")
                    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                        return min(float(ts), default)
                    if seen >= MAX_STAMP_WALK or rec.end_lsn >= durable:
                        return default
        except Exception:  # noqa: BLE001 - a status never fails: the lag counts from now
            pass
        return default

    def sync(self, lsn: int, timeout: float = 30.0, vouch: bool = True) -> int:
        """Wait until everything below ``lsn`` is shipped and (``vouch``) the replica's
        manifest says so up to the time of this call (``complete_to`` at or after it: a
        restore to a time up to the call is accepted; an idle shipper writes it only once
        per ``complete_every``).  ReplicationError naming the cause when that does not
        happen within ``timeout`` seconds.

        With ``vouch``, also until a restore can reach the end of the replica's manifest:
        it lists a snapshot its WAL reaches the end from (past every hole it records).  A
        snapshot that failed (the server refusing ``snapshots/``, or down when a hole was
        found) backs off while the WAL ships on — a sync returned, the source was lost,
        and every restore of the replica's end was refused ("no restore can cross it", or
        "no snapshot ... from which its WAL reaches"): the commits it had vouched for were
        gone.  Such a sync asks for one prompt snapshot attempt."""
        deadline = time.monotonic() + timeout
        called = time.time() if vouch else 0.0
        with self._cond_lock:
            self._complete_wanted = max(self._complete_wanted, called)
        if vouch and self._saved_unbased is not None:
            self._snapshot_retry_at = 0.0  # (one prompt attempt, as a wake is one round)
        self._wake.set()  # once: one prompt round (see _pause); it stays set until then
        with self._cond_lock:
            while self.shipped < lsn or (vouch and (not self._complete_saved_past(called)
                                                    or self._saved_unbased is not None)):
                if self.state in ("lease-lost", "refused", "failed"):
                    raise ReplicationError(f"cannot sync the replica: {self.last_error}")
                if self.state == "stopped":
                    raise ReplicationError(f"replication to {self.url} is stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    waiting = self.target.waiting()
                    cause = self.last_error or (
                        f"waiting on the server: {waiting}" if waiting is not None
                        else "shipping is still in progress")
                    unrestorable = self._saved_unbased
                    if self.shipped >= lsn and vouch and unrestorable is not None:
                        raise ReplicationError(
                            f"replica {self.url} holds the log up to LSN {lsn}, but no "
                            f"restore can reach it yet after {timeout:g} s ({unrestorable}): "
                            f"{self._snapshot_error or cause}")
                    if self.shipped >= lsn:
                        raise ReplicationError(
                            f"replica {self.url} holds the log up to LSN {lsn}, but its "
                            f"manifest does not say so yet (complete_to not written after "
                            f"{timeout:g} s): {cause}")
                    if not self._started:  # (the replica's position is not known:
                        # it said "holds the log up to LSN 0", of a replica holding more)
                        raise ReplicationError(
                            f"replica {self.url} not reached yet: its manifest was not "
                            f"read, so how much of the log up to LSN {lsn} it holds is "
                            f"not known after {timeout:g} s: {cause}")
                    raise ReplicationError(
                        f"replica {self.url} holds the log up to LSN {self.shipped}, "
                        f"{lsn - self.shipped} bytes short of LSN {lsn} after {timeout:g} s: "
                        f"{cause}")
                self._cond.wait(min(left, 0.25))
        return self.shipped

    def _complete_saved_past(self, t: float) -> bool:
        """Does the replica's manifest vouch for every commit stamped up to ``t``?"""
        return self._complete_saved is not None and self._complete_saved >= t - 1e-6

    def _advanced(self, position: int) -> None:
        with self._cond_lock:
            self.shipped = position
            self.last_shipped_at = time.time()
            self.last_error = None  # (shipped: a sync returning now saw the old failure)
            self._cond.notify_all()

    # ---- a round -----------------------------------------------------------------------
    def ship_once(self, progress: Callable[[int, int], None] | None = None,
                  snapshot_progress: Callable[[int, int], None] | None = None) -> dict:
        """One shipping round; returns what it did.  Raises on failure (the background
        thread retries with backoff; a cron-style caller runs it again later).

        ``progress(done, total)``: the bytes of WAL and file content shipped so far this
        round, of those to ship as the round began (after each MiB an upload sends, or
        each part or object a server takes); ``snapshot_progress(done, total)``: a
        snapshot's bytes uploaded, of its size (once its LMDB copy is made).  None (the
        default): nothing is counted."""
        with self._round:
            self._shown = None if progress is None else _Shown(progress)
            self._snapshot_shown = snapshot_progress
            try:
                return self._ship_once()
            finally:
                self._shown = self._snapshot_shown = None

    def _ship_once(self) -> dict:
        """The round, under ``_round`` (see ship_once)."""
        if self.state == "lease-lost":
            raise LeaseLost(self.last_error or "the lease was lost")
        if self.state == "refused":
            raise self._start_error
        self._ensure_started()
        m = self.manifest
        t0, m0 = time.time(), clock.elapsed()
        self._hold_lease()
        if self._unsaved:  # an earlier round changed the manifest but could not save
            self._save()   # it (its objects are up): save it first, then go on
            self._advanced(m.position)
        self._complete_candidate()  # (before the frontier is read: see there)
        durable = self.source.durable_lsn()
        self._durable = max(self._durable, durable)
        if durable > self.shipped and self._behind_since is None:
            self._behind_since = _since(self._oldest_unshipped_stamp(t0, durable))
        summary = {"objects": 0, "bytes": 0, "snapshot": None, "compacted": 0,
                   "deleted": 0}
        shipped_before = self.shipped
        if m.position is None:
            self._begin(summary)
        if self._shown is not None:  # (the WAL from the replica's position on)
            self._shown.grow(max(0, durable - m.position))
        self._ship_blobs(summary)  # (after ``durable`` was read: see _ship_blobs)
        self._ship_wal(durable, summary)
        if self._snapshot_due():
            self._snapshot_or_back_off(summary)
        self._compact(summary)
        self._retain(summary)
        self._refresh_complete_to()
        self._pin(durable)
        if self.shipped >= self._durable:
            self._behind_since = None
            self._caught_up = m0  # (before the frontier was read: see __init__)
        elif self._behind_since is not None and self.shipped > shipped_before:
            # progress, not caught up: the clock restarts at the oldest record still
            # unshipped (a round without progress leaves the clock running: the lag grows)
            self._behind_since = max(self._behind_since,
                                     _since(self._oldest_unshipped_stamp(t0, self._durable)))
        summary["position"] = self.shipped
        return summary

    def _save(self) -> None:
        """Write the manifest.  Until a write succeeds it stays ``_unsaved``: the next round
        saves it before anything else (the in-memory manifest is ahead of the replica's,
        so a round that found nothing new to ship would otherwise never write it)."""
        self._unsaved = True
        self._note_complete()
        try:
            self._save_once()
        except ManifestTooLarge:
            # retention first (it runs later in a round, and this save comes first in the
            # next one: a manifest retention would bring under the bound stayed unsaved
            # for good); what it drops goes to the trash, deleted only after this save
            m, now = self.manifest, clock.deleting_now()
            m.to_trash(m.retention(now, self.opts.retention_seconds,
                                   self.opts.retain_snapshots), now)
            self._save_once()  # (still too large: ManifestTooLarge, the round fails)
        self._unsaved = False
        self._saved_position = self.manifest.position
        self._saved_unbased = _end_unrestorable(self.manifest)
        self._complete_saved = self.manifest.doc.get("complete_to")

    def _save_once(self) -> None:
        try:
            self.manifest.save(self.target, self.holder, self.opts.max_manifest_bytes)
        except PreconditionFailed:
            got = Manifest.load(self.target, self.opts.max_manifest_bytes)
            if got is not None and (got.doc.get("writer") or {}).get("id") == self.token:
                self.manifest.etag = got.etag  # our own earlier write landed unanswered
                self.manifest.save(self.target, self.holder, self.opts.max_manifest_bytes)
                return
            if got is None:  # (on S3 an If-Match on a missing key: 404, taken as lost)
                raise LeaseLost(f"the manifest of {self.url} was deleted under this writer; "
                                f"shipping stopped") from None
            who = got.doc.get("writer") or {}
            # Written by another writer.  A live one took the lease first: lost.  With the
            # lease still ours, it was a request of a writer before us landing late (the
            # fence at the start makes that rare: an If-None-Match PUT of a first manifest
            # can still land): this writer's manifest is the replica's (every object it
            # lists is up), written over it.  (It stopped for good as "lease-lost",
            # naming a dead process or its own pid: probe-repl2.)
            self._still_holding(f"the manifest of {self.url} was written by another writer "
                                f"(process {who.get('pid', '?')} on host "
                                f"{who.get('host', '?')})")
            self.manifest.etag = got.etag
            self.manifest.save(self.target, self.holder, self.opts.max_manifest_bytes)

    # ---- how far a time restore may go -------------------------------------------------
    def _complete_candidate(self) -> None:
        """Note (time, log end) at the start of a round: every commit stamped at or before
        that time lies below that end, so once the replica's position reaches the end, the
        replica holds every commit stamped up to the time (the manifest's ``complete_to``:
        a restore to a later time is refused, see restore.py).  The source says the pair
        (``complete_mark``: exact in the writer's process, with a slack from another)."""
        mark = self.source.complete_mark()
        if mark is None:
            return
        t, end = mark
        t -= 1e-6  # (a stamp is compared at the microsecond: see restore._cut_at_time)
        pending = self._complete_pending
        if len(pending) >= 2:
            pending.pop()  # (the oldest waiting and the newest are enough)
        pending.append((t, end))

    def _note_complete(self) -> None:
        """``complete_to`` in the manifest (in memory) from the noted candidates the
        position has reached; written with the next save."""
        m = self.manifest
        pos = m.position
        if pos is None:
            return
        reached = [t for t, end in self._complete_pending if end <= pos]
        if not reached:
            return
        self._complete_pending = [c for c in self._complete_pending if c[1] > pos]
        t = max(reached)
        if t > (m.doc.get("complete_to") or 0.0):
            m.doc["complete_to"] = t

    def _refresh_complete_to(self) -> None:
        """A round that wrote no manifest (nothing new to ship) still moves ``complete_to``
        on: in memory every round, in the replica when it is ``complete_every`` seconds
        past the one written (one manifest PUT per that period while idle; 0: at every
        idle round, as often as ``interval``), or when a ``sync`` waits for it."""
        self._note_complete()
        now_to = self.manifest.doc.get("complete_to")
        if now_to is None or self._unsaved:
            return
        wanted = self._complete_wanted  # (a sync waits for the replica to vouch for it)
        if self._complete_saved is None or now_to - self._complete_saved >= \
                self.opts.complete_every or (
                    now_to >= wanted - 1e-6 and not self._complete_saved_past(wanted)):
            self._save()
            with self._cond_lock:
                self._cond.notify_all()

    def _begin(self, summary: dict) -> None:
        """A new replica: ship from the first local segment, with a snapshot."""
        segs = self.source.segments()
        if not segs:
            raise ReplicationError(f"store {self.source.path} has no WAL segment to ship")
        self.manifest.doc["position"] = segs[0][0]
        self.manifest.doc["open"] = {}
        # pinned from here at once: the log (and the blobs its file records name: the gc
        # keeps those of the WAL a pin holds) stays until this round has shipped it
        self._pin(self.source.durable_lsn())
        if segs[0][0] == 0:  # the whole log is here: the empty store is a base too
            self.manifest.snapshots.append({"k": None, "lsn": 0, "n": 0, "sha": None,
                                            "st": hashlib.sha256().hexdigest(), "keys": 0,
                                            "ts": time.time()})
        self._snapshot(summary)

    # ---- reversible files' content ------------------------------------------------------
    def _ship_blobs(self, summary: dict) -> None:
        """Upload the blob store's content not in the replica yet (``blobs/<sha256>``,
        immutable: the digest names the bytes).  A file step's blobs are durable before its
        record is logged, so every blob a record up to the durable LSN read before this
        call names is here now: the WAL shipped after it never names a blob the replica
        lacks (restored copies read file history, undo and rewind files; without the
        blobs every historical read said "missing from the content store")."""
        root = os.path.join(self.source.path, "files", "blobs")
        if not os.path.isdir(root):
            return
        if self._blobs_up is None:
            self._blobs_up = {k[len(BLOB_PREFIX):] for k, _n in self.target.list(BLOB_PREFIX)}
        blobs = BlobStore(root, readonly=True)  # (its names only: it makes no directory)
        todo = [d for d in blobs if d not in self._blobs_up]
        present = set(todo)  # (a damaged blob the gc removed since is no longer reported)
        self._damaged_blobs = {d: v for d, v in self._damaged_blobs.items() if d in present}
        if not todo:
            return
        if self._shown is not None:  # (their sizes: only when progress is shown)
            self._shown.grow(sum(_file_size(blobs.path(d)) for d in todo))
        # several at once (``blob_uploads``): one at a time, each a round trip, the WAL
        # waited behind them — at ~200 file commits/s the replica stood still for ~7 s
        # (probe-repl44).  Every upload ends before this returns (the WAL shipped after
        # names only blobs the replica has); the first failure is raised after the rest
        # ended, those that landed counted
        # (after a failure none begins: trying every blob, each with the client's retries
        # and timeouts, kept a failing round going for minutes in an outage: review44)
        failed = threading.Event()
        workers = max(1, min(self.opts.blob_uploads, len(todo)))
        if workers == 1:
            errors = [self._ship_blob(blobs, d, summary, failed) for d in todo]
        else:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(workers, thread_name_prefix="walstore-blob-upload") as ex:
                errors = list(ex.map(lambda d: self._ship_blob(blobs, d, summary, failed),
                                     todo))
        for e in errors:
            if e is not None:
                raise e

    def _ship_blob(self, blobs: BlobStore, digest: str, summary: dict,
                   failed: threading.Event) -> BaseException | None:
        """Upload one blob (``_ship_blobs``); the exception it failed with, else None (also
        when it was not tried: the store stopping, or another upload of the round failed)."""
        if self._stop.is_set() or failed.is_set():
            return None
        try:
            f = open(blobs.path(digest), "rb")
        except FileNotFoundError:
            return None  # collected meanwhile: no retained record names it
        try:
            st = os.fstat(f.fileno())
            n = st.st_size
            # the name is the content's hash, and the replica's object is immutable: bytes
            # damaged on this disk uploaded under it could never be replaced, and every
            # restore naming them failed ("does not match its name", keys and all)
            if self._damaged_blobs.get(digest) == (n, st.st_mtime_ns) or _sha256(f) != digest:
                f.close()
                self._damaged_blobs[digest] = (n, st.st_mtime_ns)
                return None  # (not shipped: restores of points naming it say it is missing)
            self._damaged_blobs.pop(digest, None)
            self._upload_immutable(BLOB_PREFIX + digest, f)  # (closes f)
        except Exception as e:  # noqa: BLE001 - raised by _ship_blobs once all ended
            failed.set()
            f.close()
            return e
        with self._blob_lock:
            self._blobs_up.add(digest)
            summary["objects"] += 1
            summary["bytes"] += n
            if self._shown is not None:
                self._shown.step(n)
        return None

    def _pin(self, durable: int) -> None:
        """Pin the WAL from the replica's position, up to ``max_pin_bytes`` behind the
        durable frontier.  Past that the source lets the WAL go (a hole may follow); the
        position stays recorded for the blob gc (see below).  The source also
        applies the bound itself at every checkpoint (``pin_limit``): a round that fails,
        hangs on a server or never runs again cannot hold the WAL past it (it did: the pin
        was set only at the end of a successful round, and an outage of 70 s grew the WAL
        to 6 times the bound)."""
        m = self.manifest
        pos = m.position if m is not None else None
        # from the position the replica HOLDS: a round moves the position in memory as its
        # objects go up, and the manifest naming them is written after; until that write
        # lands the replica stands where the last one put it (the pin used the position in
        # memory: with manifest writes failing, checkpoints trimmed the log past the saved
        # position, and a writer killed then reopened to a hole)
        if pos is not None and self._saved_position is not None:
            pos = min(pos, self._saved_position)
        # past the bound the source lets the WAL go itself (``bounded_pin``: a hole may
        # follow), but the position stays recorded: the records still on disk from there
        # are shipped, and the blob gc keeps the content they name (released here, the gc
        # removed it and the replica's history named content it never got: probe-repl44)
        self.source.retain_from(pos)

    def _repin(self) -> None:
        """The pin again after a failed round, against the frontier now."""
        if self.manifest is None or self.manifest.position is None:
            return
        try:
            self._pin(self.source.durable_lsn())
        except Exception:  # noqa: BLE001 - the source bounds its pin at checkpoints anyway
            pass

    def _unpin(self) -> None:
        """Shipping stopped for good (lease lost, refused, failed): the WAL is no longer
        kept for it (the pin stayed until close, and no checkpoint trimmed any more)."""
        try:
            self.source.retain_from(None)
        except Exception:  # noqa: BLE001 - never fails the store
            pass

    # ---- WAL objects -------------------------------------------------------------------
    def _ship_wal(self, durable: int, summary: dict) -> None:
        m = self.manifest
        last_save = time.monotonic()
        dirty = False
        taken = 0 if summary["snapshot"] is None else 1  # full snapshots this round
        while m.position < durable and not self._stop.is_set():
            pos = m.position
            segs = self.source.segments()
            if not segs or pos < segs[0][0]:
                if summary["snapshot"] is not None and segs:
                    # a hole again, in a round that shipped a snapshot already (a writer
                    # trimming faster than the round ships): two full LMDB copies a round
                    # at most — one per hole was without bound (audit 68).  A snapshot of
                    # this round at or past the hole's end is a base past it already; else
                    # the hole waits for the next round (the replica stands where it is)
                    # when a restore reaches it there — when none does (its only base, the
                    # last hole's snapshot, lies past it: a round stopping there left the
                    # replica unrestorable until the next round, hours away for a cron
                    # `replicate --once`: audit 68) a second snapshot is shipped, and the
                    # round on to it.  Two suffice for what one snapshot leaves: the
                    # first hole's snapshot overtaken by a second trim; a third trim
                    # overtaking the second's too ends the round unrestorable, saying so
                    if max(x["lsn"] for x in m.snapshots) >= segs[0][0]:
                        self._hole(pos, segs, summary, snapshot=False)
                        dirty = True
                        continue
                    if taken >= 2 or _end_unrestorable(m) is None:
                        break
                before = summary["snapshot"]
                self._hole(pos, segs, summary)
                if summary["snapshot"] != before:  # (a base past the hole: ship on to it)
                    durable = self._reach_hole_base(durable)
                    taken += 1
                dirty = True
                continue
            i = max(j for j, (s, _p) in enumerate(segs) if s <= pos)
            start, path = segs[i]
            nxt = segs[i + 1][0] if i + 1 < len(segs) else None
            limit = durable if nxt is None else min(durable, nxt)
            try:
                built = self._build(start, path, pos, limit, self.opts.max_object_bytes)
            except FileNotFoundError:
                continue  # trimmed while we looked: the next pass sees the hole
            if built is None and nxt is not None and nxt - pos == logformat.SEAL_RECORD_SIZE:
                built = self._missing_seal(start, pos, nxt)
            if built is None:
                raise ReplicationError(
                    f"the local WAL of {self.source.path} has no valid record at LSN {pos} "
                    f"(segment {os.path.basename(path)}) although LSN {durable} is durable; "
                    f"run `walstore verify`")
            body, entry, state = built
            shown = self._shown
            self._upload_immutable(entry["k"], body, None if shown is None else
                                   shown.within(entry["b"] - entry["a"]))
            if shown is not None:
                shown.step(entry["b"] - entry["a"])
            m.wal.append(entry)
            m.doc["position"] = entry["b"]
            m.doc["open"], m.doc["points"], m.doc["last_commit"] = state
            summary["objects"] += 1
            summary["bytes"] += entry["n"]
            dirty = True
            if time.monotonic() - last_save >= SAVE_EVERY:
                self._save()
                self._advanced(m.position)
                last_save, dirty = time.monotonic(), False
        if dirty:
            self._save()
            self._advanced(m.position)

    def _reach_hole_base(self, durable: int) -> int:
        """Where the round ships to after a hole: on to the fresh snapshot ``_hole`` took,
        the replica's only base past the hole.  That snapshot is of LMDB now, and the writer
        logs (and syncs) a record before it applies it, so the frontier read again reaches
        it.  (The round stopped at the frontier it had read before the hole, below the
        snapshot when the writer went on meanwhile: no restore reached the replica's end
        until the next round — a `replicate --once` beside a live writer exited 1, and
        every restore of the replica failed, in between.)  Up to the snapshot only, and
        for two snapshots a round at most (``_ship_wal``): a writer trimming faster than
        the round ships makes a hole again meanwhile, and a round chasing each new hole's
        snapshot never ended (a full LMDB copy each: 58 GB of snapshots in minutes, audit
        67); such a round ends at its target unrestorable, as before, saying so, and the
        next round begins again."""
        newest = max((s["lsn"] for s in self.manifest.snapshots), default=0)
        if newest <= durable:
            return durable
        now = max(durable, min(newest, self.source.durable_lsn()))
        self._durable = max(self._durable, now)
        if self._shown is not None:
            self._shown.grow(now - durable)
        return now

    def _missing_seal(self, seg: int, pos: int, nxt: int):
        """The SEAL record a rotation cut short, as a WAL object of its own.

        A rotation makes the next segment durable first and then ends the old one with a
        SEAL record; a writer killed in between leaves the old segment's records ending
        exactly one SEAL short of its successor (which the log reader accepts).  The
        replica's WAL must stay contiguous, so the shipper frames the SEAL the writer
        would have written (same salt, LSN and empty body) and ships that; it carries no
        state.  (The shipper stopped there for good: "no valid record at LSN ...".)"""
        m = self.manifest
        store_id = self.source.store_id
        seal = logformat.seal_record(logformat.salt(store_id, seg), pos)
        assert len(seal) == nxt - pos
        body = logformat.encode_object_header(store_id, self.source.lineage, seg, pos, nxt,
                                              1) + seal
        entry = {"k": wal_key(pos, nxt, 0), "seg": seg, "a": pos, "b": nxt, "n": len(body),
                 "lv": 0, "t0": None, "t1": None, "x0": None, "x1": None,
                 "om": min(m.open.values()) if m.open else None, "pg": []}
        return body, entry, (dict(m.open), {k: dict(v) for k, v in m.doc["points"].items()},
                             m.doc["last_commit"])

    def _build(self, seg: int, path: str, pos: int, limit: int, max_bytes: int,
               level: int = 0):
        """A WAL object of the valid records of one segment in [pos, limit), at most
        ``max_bytes`` (at least one record); None when there is no valid record at pos.
        Returns (body, manifest entry, (open, points, last_commit) after it)."""
        m = self.manifest
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= logformat.HEADER_SIZE:
                return None
            # (pread, a window at a time, never mapped: a segment cut under a mapping
            # killed the writer's process with SIGBUS; CONTRACT 4.9)
            mm = FileBytes(f.fileno(), size)
            store_id, hstart, _pre = logformat.read_segment_header(
                mm[:logformat.HEADER_SIZE])
            if store_id != self.source.store_id or hstart != seg:
                raise ReplicationError(f"segment {path} does not belong to this log")
            salt = logformat.salt(store_id, seg)
            off0 = pos - seg + logformat.HEADER_SIZE
            opened = dict(m.open)
            points = {k: dict(v) for k, v in m.doc["points"].items()}
            last = m.doc["last_commit"]
            om = min(opened.values()) if opened else None
            t0 = t1 = x0 = x1 = None
            purges: list = []  # [LSN, prefix] of each purge's commit in it
            end, n = pos, 0
            for rec in logformat.iter_records(mm, off0, pos, salt, len(mm)):
                if rec.end > limit or (n and rec.end - pos > max_bytes):
                    break
                end, n = rec.end, n + 1
                erased = logformat.purge_prefix(rec.type, mm, rec)
                if erased is not None:
                    purges.append([rec.lsn, erased])
                info = logformat.summarize(rec.type, logformat.payload(mm, rec))
                tx = info.get("tx")
                if rec.type in logformat.OPENING and isinstance(tx, int):
                    opened.setdefault(tx, rec.lsn)
                elif rec.type in logformat.ENDING and isinstance(tx, int):
                    opened.pop(tx, None)
                if rec.type == logformat.COMMIT and isinstance(tx, int):
                    ts = info.get("ts") if isinstance(info.get("ts"), (int, float)) else None
                    if ts is not None:
                        t0 = ts if t0 is None else min(t0, ts)
                        t1 = ts if t1 is None else max(t1, ts)
                    x0 = tx if x0 is None else min(x0, tx)
                    x1 = tx if x1 is None else max(x1, tx)
                    last = {"ts": ts, "tx": tx, "lsn": rec.lsn,
                            "h": _record_digest(logformat.payload(mm, rec))}
                elif rec.type == logformat.RESTORE_POINT and isinstance(info.get("name"), str):
                    name = info["name"]
                    if info.get("drop"):
                        if name in points:
                            points[name]["dropped"] = rec.lsn
                    else:
                        points[name] = {"lsn": rec.lsn, "ts": info.get("ts"), "dropped": None}
            if n == 0:
                return None
            head = logformat.encode_object_header(store_id, self.source.lineage, seg, pos,
                                                  end, n)
            a, b = off0, off0 + (end - pos)
            total = len(head) + (b - a)
            if total <= IN_MEMORY_OBJECT:
                got = mm[a:b]
                if len(got) != b - a:
                    raise ReplicationError(f"segment {path} was cut short while read")
                body: Any = head + got
            else:
                body = tempfile.TemporaryFile(dir=self._tmp)
                body.write(head)
                for o in range(a, b, 1 << 20):
                    got = mm[o:min(b, o + (1 << 20))]
                    if len(got) != min(b, o + (1 << 20)) - o:
                        body.close()
                        raise ReplicationError(f"segment {path} was cut short while read")
                    body.write(got)
                body.seek(0)
        entry = {"k": wal_key(pos, end, level), "seg": seg, "a": pos, "b": end, "n": total,
                 "lv": level, "t0": t0, "t1": t1, "x0": x0, "x1": x1, "om": om, "pg": purges}
        return body, entry, (opened, points, last)

    def _listed(self, key: str) -> bool:
        """Whether the manifest (in memory) names ``key``: a WAL object, a snapshot, or
        one in the trash (a restore of an older manifest may still read it)."""
        m = self.manifest
        return any(e["k"] == key for e in m.wal) or \
            any(x["k"] == key for x in m.snapshots) or \
            any(k == key for k, _t in m.doc["trash"])

    def _hold_lease(self) -> None:
        """Renew the lease when due; LeaseLost when another writer took it.  Called at the
        start of a round and before every object written or deleted in it: renewed only at
        a round's start, a writer stalled mid-round past the ttl (a pause, a hung link) went
        on uploading WAL objects into the replica of the writer that took the lease over,
        until its next manifest save (audit 55).  (One request still in flight across the
        stall can land late: the manifest's If-Match keeps it out of the successor's
        manifest.)"""
        with self._lease_lock:
            if self.lease.etag is None or self.lease.renew_due():  # (None: released, and
                self.lease.renew()  # renew says so: LeaseLost)

    def _upload_immutable(self, key: str, body, sent: Callable[[int], None] | None = None
                          ) -> None:
        """Upload ``body`` (bytes or an open file, closed after) as ``key``, which must
        not exist yet; one that exists with the same bytes is our own earlier upload whose
        answer was lost, and counts as done.  ``sent``: the target's progress hook (passed
        only when given: a target of the caller's own need not take it)."""
        start = None if isinstance(body, (bytes, bytearray)) else body.tell()
        kw = {} if sent is None else {"progress": sent}
        try:
            self._hold_lease()
            self.target.put(key, body, if_none_match=True, **kw)
        except PreconditionFailed:
            # Exists: our own earlier upload whose answer was lost?  Same bytes, then.
            # (The upload read a file body to its end: compare from where it began.  It
            # measured 0 bytes and hashed none, every round failed "larger than the 0 byte
            # bound" for good, and nothing shipped after it: probe-repl, repro2.)
            if start is not None:
                body.seek(start)
            mine = _sha256(body)
            # (hashed as it streams in: it was read whole into memory, a blob of GiBs
            # whose upload's answer was lost took its size in RAM, twice: audit 56)
            got = _HashingSink()
            size = _size(body)
            try:
                same = self.target.download(key, got, size) is not None and \
                    got.hexdigest() == mine
            except TargetError as e:
                if e.transient:
                    raise
                same = False  # (larger than ours: other content)
            if not same:
                if not is_own_key(key) or self._listed(key):  # (a blob: damage, said)
                    raise ReplicationError(f"object {self.url}/{key} exists with other "
                                           f"content; is another writer using this URL?"
                                           ) from None
                # A WAL object or snapshot not in our manifest: an orphan, e.g. the PUT of
                # a writer whose lease we took, hung in a partition and landed after our
                # start-up sweep, its WAL gone another way.  Every round failed here for
                # good, lease held and lag growing, until a restart swept it (audit 55).
                # Under a lease still ours (else LeaseLost, naming the live writer) it is
                # written over.
                self._still_holding(f"object {self.url}/{key} exists with other content")
                if start is not None:
                    body.seek(start)
                self.target.put(key, body, **kw)
        finally:
            if not isinstance(body, (bytes, bytearray)):
                body.close()

    def _hole(self, pos: int, segs: list, summary: dict, snapshot: bool = True) -> None:
        """The WAL from ``pos`` was trimmed before it was shipped: note the hole, take a
        fresh snapshot (unless ``snapshot`` is false: one at or past the hole's end is
        there), and ship on from the first local segment."""
        m = self.manifest
        if not segs:
            raise ReplicationError(f"store {self.source.path} has no WAL segment to ship")
        first = segs[0][0]
        # the purges committed in the lost range, as the WAL objects' ``pg`` marks list
        # theirs (None: the source cannot tell): a purge whose erasure trimmed the log
        # while the replica was down lies in the hole, and a restore to a point before it
        # brought the erased keys back (restore._purges_after found no record of it)
        hole_purges = getattr(self.source, "purges_between", lambda a, b: None)(pos, first)
        m.doc["holes"].append({"a": pos, "b": first, "ts": time.time(), "pg": hole_purges,
                               "reason": "the local WAL was trimmed before it was shipped "
                                         "(replication fell behind by more than the pin allows)"})
        m.doc["position"] = first
        m.doc["open"] = {}
        if snapshot:
            self._snapshot_or_back_off(summary)
        self._save()

    # ---- snapshots ---------------------------------------------------------------------
    def _snapshot_due(self) -> bool:
        m = self.manifest
        newest = max(m.snapshots, key=lambda s: s["lsn"]) if m.snapshots else None
        if self._snapshot_error is not None and newest is not None \
                and m.position <= newest["lsn"]:
            # a base at the replica's position already (the failed attempt's manifest
            # write landed, its answer lost): the failure no longer matters — kept, it
            # stayed in ``last_error`` for good on an idle store (replsweep)
            self._snapshot_failures, self._snapshot_error = 0, None
        if self._snapshot_error is not None and time.monotonic() < self._snapshot_retry_at:
            return False  # (backing off after a failed snapshot)
        if newest is None:
            return True
        if m.position <= newest["lsn"] or time.monotonic() < self._snapshot_retry_at:
            return False
        if self._snapshot_error is not None or any(h["b"] > newest["lsn"]
                                                   for h in m.doc["holes"]):
            return True  # (a failed one is retried; a hole wants a base past it)
        # (a newest snapshot stamped ahead of the clock — taken before it stepped back — is
        # due: its age negative, none was taken until the clock caught up, an hour for a
        # step of an hour, restores replaying ever more WAL: audit 67)
        age = time.time() - newest["ts"]
        return (age >= self.opts.snapshot_interval or age < 0
                or m.position - newest["lsn"] >= self.opts.snapshot_wal_bytes)

    def _snapshot_or_back_off(self, summary: dict) -> None:
        """A snapshot; when it fails (a bucket policy refusing ``snapshots/``, an object
        size limit, a full disk for the LMDB copy) the round goes on — WAL shipping,
        compaction, retention, the pin — and the failure stays in ``replication()``'s
        ``last_error`` until a snapshot succeeds; attempts back off (each is a full LMDB
        copy).  It failed the round after its WAL part, every round: the pin stayed where
        it was, nothing was compacted or retained, and ``last_error`` was cleared by the
        WAL part's progress."""
        try:
            self._snapshot(summary)
        except (LeaseLost, Refused):
            raise
        except Exception as e:  # noqa: BLE001 - reported, retried later
            self._snapshot_failures += 1
            wait = min(SNAPSHOT_BACKOFF_MAX,
                       self.opts.interval * 2 ** min(self._snapshot_failures, 16))
            self._snapshot_retry_at = time.monotonic() + wait * (0.5 + random.random() / 2)
            self._snapshot_error = f"a snapshot failed ({type_and_message(e)}); the WAL " \
                                   f"ships on, the next attempt in {wait:.1f} s"
            summary["snapshot_error"] = self._snapshot_error
            return
        self._snapshot_failures, self._snapshot_error = 0, None

    def _snapshot(self, summary: dict) -> None:
        m = self.manifest
        d = tempfile.mkdtemp(dir=self._tmp)
        try:
            applied = self.source.snapshot(d)
            if any(s["lsn"] == applied for s in m.snapshots):  # LMDB has not moved yet
                self._snapshot_retry_at = time.monotonic() + min(60.0,
                                                                 self.opts.snapshot_interval)
                return
            # the blobs its file tables name: LMDB ran past the WAL this round read, and
            # the blobs went up when it began (a file committed meanwhile was in the
            # snapshot, its content not in the replica: a restore of it, the writer gone
            # before its next round, reported it missing — audit 68 review)
            self._ship_blobs(summary)
            digest = _src.state_digest(d)
            path = os.path.join(d, "data.mdb")
            size = os.path.getsize(path)
            shown = self._snapshot_shown
            kw = {} if shown is None else {"progress": lambda n: shown(min(n, size), size)}
            if shown is not None:
                shown(0, size)
            with open(path, "rb") as f:
                sha = _sha256(f)
                f.seek(0)
                key = snapshot_key(applied)
                self._hold_lease()
                try:
                    self.target.put(key, f, if_none_match=True, **kw)
                except PreconditionFailed:
                    # the key is this attempt's own (a random id): the client's retry met
                    # its first attempt, which landed with its answer lost (a PUT lands
                    # whole or not at all) — it was reported as a failed snapshot, the
                    # object left behind unlisted (replsweep)
                    pass
            entry = {"k": key, "lsn": applied, "n": size, "sha": sha,
                     "st": digest["sha256"], "keys": digest["keys"], "ts": time.time()}
            # the history it holds (its newest commit, the record's digest): a snapshot
            # past the position is checked against the log of a writer taking the replica
            # over (``_check_same_history``)
            lc = _src.last_commit(d)
            if lc is not None:
                tx, h = _local_commit_at(self.source, lc[0])
                entry["lc"] = {"lsn": lc[0], "tx": lc[1], "h": h if tx == lc[1] else None}
            if m.position is not None and applied > m.position:
                # the purges it holds past the WAL shipped (as a hole's ``pg``; None: the
                # source cannot tell): with its writer gone before the WAL with them was
                # shipped, it was the replica's only record of them, and a restore to a
                # point before them brought the erased keys back (audit 68 review)
                entry["pg"] = getattr(self.source, "purges_between",
                                      lambda a, b: None)(m.position, applied)
            m.snapshots.append(entry)
            oldest = min(s["lsn"] for s in m.snapshots)
            for name, p in digest["points"].items():  # named in WAL the shipper never saw,
                if p["lsn"] >= oldest:  # restorable (below: retention dropped them; they
                    # came back with every snapshot, listed where no restore could reach)
                    m.doc["points"].setdefault(name, {"lsn": p["lsn"], "ts": p.get("ts"),
                                                      "dropped": None})
            self._save()
            self._advanced(m.position)
            summary["snapshot"] = applied
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # ---- compaction and retention ------------------------------------------------------
    def _compact(self, summary: dict) -> None:
        """Merge one run of ``compact_fanout`` adjacent objects of one level and segment."""
        m = self.manifest
        fan = self.opts.compact_fanout
        wal = m.wal
        bad = self._unmergeable
        run = 1
        for i in range(1, len(wal)):
            a, b = wal[i - 1], wal[i]
            same = (a["seg"] == b["seg"] and a["lv"] == b["lv"] and a["b"] == b["a"]
                    and a["k"] not in bad and b["k"] not in bad)
            run = run + 1 if same else 1
            if run == fan:
                group = wal[i - fan + 1:i + 1]
                break
        else:
            return
        if sum(e["n"] for e in group) > self.opts.max_object_bytes:
            return
        seg, lo, hi, level = group[0]["seg"], group[0]["a"], group[-1]["b"], group[0]["lv"] + 1
        try:
            body = self._merged_body(group, seg, lo, hi)
        except _Unreadable as e:
            # (a damaged or missing object, its local segment gone, failed every round
            # with a bare "ValueError: WAL object header checksum mismatch" after the WAL
            # shipped: retention, the local WAL's pin and complete_to never moved on.  It
            # is left out of merges now, and said in the status)
            bad[e.key] = e.why
            return
        n = _size(body)
        self._upload_immutable(wal_key(lo, hi, level), body)
        merged = {"k": wal_key(lo, hi, level), "seg": seg, "a": lo, "b": hi, "n": n,
                  "lv": level, "t0": _agg(min, group, "t0"), "t1": _agg(max, group, "t1"),
                  "x0": _agg(min, group, "x0"), "x1": _agg(max, group, "x1"),
                  "om": group[0]["om"]}
        if all("pg" in e for e in group):  # (one unmarked, shipped by an older walstore:
            merged["pg"] = [p for e in group for p in e["pg"]]  # the merge is unmarked)
        at = wal.index(group[0])
        wal[at:at + len(group)] = [merged]
        m.to_trash([e["k"] for e in group], time.time())
        self._save()
        summary["compacted"] += len(group)

    def _merged_body(self, group: list, seg: int, lo: int, hi: int):
        """The merged object's bytes: from the local segment while it is there (checked
        record by record), else from the replica's own objects."""
        path = dict(self.source.segments()).get(seg)
        try:
            built = path and self._build(seg, path, lo, hi, hi - lo + 1, group[0]["lv"] + 1)
            if built and built[1]["b"] == hi:
                return built[0]
        except (OSError, ReplicationError, ValueError):
            pass
        out = tempfile.TemporaryFile(dir=self._tmp)
        out.write(logformat.encode_object_header(self.source.store_id, self.source.lineage,
                                                 seg, lo, hi, 0))
        try:
            for e in group:
                with tempfile.TemporaryFile(dir=self._tmp) as f:
                    if self.target.download(e["k"], f, e["n"]) is None:
                        raise _Unreadable(e["k"], f"missing from {self.url}")
                    f.seek(0)
                    try:
                        head, _hs = logformat.read_object_header(f)
                        for _lsn, _t, raw, _s in logformat.iter_object_records(
                                f, head, self.source.store_id, e["k"]):
                            out.write(raw)
                    except ValueError as damage:
                        raise _Unreadable(e["k"], f"damaged: {damage}") from damage
        except BaseException:
            out.close()
            raise
        out.seek(0)
        return out

    def _retain(self, summary: dict) -> None:
        # (timed on the elapsed clock: on the deleting one, which follows a step back, no
        # retention ran for as long as the step after one: audit 68)
        tick = clock.elapsed()
        if self._last_retention is not None and tick - self._last_retention < RETENTION_EVERY:
            return
        self._last_retention = tick
        now = clock.deleting_now()  # (a forward jump of the clock trims nothing: see there)
        m = self.manifest
        dropped = m.retention(now, self.opts.retention_seconds, self.opts.retain_snapshots)
        m.to_trash(dropped, now)
        due = [k for k, t in m.doc["trash"] if t <= now - self.opts.delete_grace]
        if not dropped and not due:
            return
        if dropped:
            # saved before anything is deleted: with ``delete_grace`` 0 an object was
            # deleted while the saved manifest still listed it, and a failed save left
            # restores reading a manifest that named deleted objects (replsweep)
            self._save()
        if not due:
            return
        for key in due:
            self._hold_lease()
            self.target.delete(key)
        gone = set(due)
        m.doc["trash"] = [[k, t] for k, t in m.doc["trash"] if k not in gone]
        self._save()
        summary["deleted"] += len(due)


class _Unreadable(Exception):
    """A WAL object of the replica that compaction cannot read (``key``, ``why``)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


BLOB_PREFIX = "blobs/"


NESTED_LIST_BOUND = 100_000  # keys a new replica's URL is searched for a replica under it


def _end_unrestorable(m: Manifest) -> str | None:
    """Why no restore can reach the end of ``m`` (the plan a restore of everything makes:
    a snapshot its WAL reaches the end from); None when one can, or nothing is shipped
    yet.  No I/O: the manifest's lists only."""
    if m.position is None:
        return None
    try:
        next(iter(m.plans(m.end())))
    except ReplicationError as e:
        return str(e)
    return None


def _replica_holder(target: ObjectStore, key: str) -> dict | None:
    """The holder named by the lease document at ``key`` of ``target``, None when there
    is none there (or no lease document: anything else named so is not a replica's)."""
    try:
        got = target.get(key, MAX_LEASE_BYTES)
        if got is None:
            return None
        doc = msgpack.unpackb(got[0], raw=False, strict_map_key=False)
    except TargetError as e:
        if e.transient:
            raise  # (the round retries)
        return None
    except Exception:  # unreadable, not msgpack: not a replica's lease
        return None
    if isinstance(doc, dict) and isinstance(doc.get("holder"), dict) and "expires" in doc:
        return doc["holder"]
    return None


def _refuse_replica_inside(url: str, store_path: str) -> None:
    """A ``file://`` replica inside the store's own directory (or the store inside it)
    is refused: a purge's promise — its bytes in no file of the store directory after
    the next checkpoint — cannot hold with the replica's copy of them in there."""
    from urllib.parse import urlsplit
    p = urlsplit(url) if isinstance(url, str) else None
    if p is None or p.scheme != "file":
        return
    rep = os.path.realpath(p.path)
    root = os.path.realpath(store_path)
    if os.path.commonpath([rep, root]) in (rep, root):
        raise ReplicationError(f"replica {display_url(url)} and store {store_path} lie one "
                               f"inside the other; put the replica in a directory of its "
                               f"own (nothing was started)")


def _record_digest(payload) -> str:
    """A short digest of a record's payload (the manifest's ``last_commit.h``)."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def _local_commit_at(src: _src.Source, lsn: Any) -> tuple[int | None, str | None]:
    """(txid, payload digest) of the local log's COMMIT record at ``lsn``; txid -1 when
    another record (or none) is there; (None, None) when the local log no longer holds
    that LSN."""
    if not isinstance(lsn, int):
        return None, None
    segs = src.segments()
    starts = [s for s, _p in segs if s <= lsn]
    if not starts:
        return None, None
    start = max(starts)
    path = dict(segs)[start]
    try:
        with open(path, "rb") as f:
            mm = FileBytes(f.fileno(), os.fstat(f.fileno()).st_size)  # (pread: no SIGBUS)
            store_id, hstart, _pre = logformat.read_segment_header(mm[:logformat.HEADER_SIZE])
            off = lsn - start + logformat.HEADER_SIZE
            rec, _why = logformat.check_record(mm, off, logformat.salt(store_id, hstart), lsn,
                                               len(mm))
            if rec is None or rec.type != logformat.COMMIT:
                return -1, None
            body = bytes(logformat.payload(mm, rec))
            tx = logformat.summarize(rec.type, body).get("tx")
    except (OSError, ValueError):
        return None, None
    return (tx if isinstance(tx, int) else -1), _record_digest(body)


def _agg(fn, group: list, key: str):
    vals = [e[key] for e in group if e[key] is not None]
    return fn(vals) if vals else None


class _Shown:
    """A round's progress (``ship_once``): bytes shipped of the bytes to ship, the total
    grown as the round learns it (never below what was done).  Steps come from the blob
    upload threads too: one at a time."""

    def __init__(self, fn: Callable[[int, int], None]) -> None:
        self.fn = fn
        self.done = 0
        self.total = 0
        self._lock = threading.Lock()

    def grow(self, n: int) -> None:
        with self._lock:
            self.total += n

    def step(self, n: int) -> None:
        with self._lock:
            self.done += n
            self.total = max(self.total, self.done)
            self.fn(self.done, self.total)

    def within(self, n: int) -> Callable[[int], None]:
        """The target's hook for one upload of ``n`` bytes counted: its bytes sent so far
        shown on top of what is done (the step after it counts them for good)."""
        def sent(k: int) -> None:
            with self._lock:
                if k < n:  # (its last MiB: the step after the upload shows it)
                    self.fn(self.done + k, max(self.total, self.done + k))
        return sent


class _HashingSink:
    """A file a download writes into that keeps only the sha256 of what it was given."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._n = 0

    def write(self, data) -> int:
        self._h.update(data)
        self._n += len(data)
        return len(data)

    def tell(self) -> int:
        return self._n

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # (collected meanwhile: not uploaded)


def _size(body) -> int:
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    pos = body.tell()
    end = body.seek(0, 2)
    body.seek(pos)
    return end - pos


def _sha256(body) -> str:
    if isinstance(body, (bytes, bytearray)):
        return hashlib.sha256(body).hexdigest()
    pos = body.tell()
    h = hashlib.sha256()
    while True:
        chunk = body.read(1 << 20)
        if not chunk:
            break
        h.update(chunk)
    body.seek(pos)
    return h.hexdigest()
