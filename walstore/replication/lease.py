"""One writer per replica URL: the lease object.

Owns the ``lease`` object (msgpack ``{holder: {id, host, pid, path, store_id, lineage},
expires, renewed}``), taken with If-None-Match (none yet) or If-Match on the etag read
(an expired lease, or one left by a dead process of the same store on this host), renewed
with If-Match, and released on a clean stop by writing it expired (If-Match), or, by a
writer refused after it took it, by writing back the document it replaced (same bytes,
same etag: the holder renews on).  :meth:`Lease.check` refuses a live holder without
writing.  A lease that cannot be renewed because another holder wrote it, or deleted it,
is *lost*: the shipper stops.  The holder's own document under an etag it never saw (a
renewal whose answer was lost) is still its own, expired or not (expired, it is renewed
with If-Match on that etag before anything more is shipped: see ``adopt_if_mine``).
Safety never rests on clocks alone: the manifest is written with If-Match too, so a
writer whose lease expired while it slept cannot overwrite a successor's manifest.
When a renewal is due is counted on the elapsed clock (``clock.elapsed``); the expiry
written is the wall clock's, which other hosts compare.  (Counted on the wall clock, a
step back of D put the next renewal off by D, the lease expiring meanwhile for every other
host under a live holder: audit 68.)
"""
from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import msgpack

from .. import clock
from ..codec import DECODE_ERRORS
from ..errors import ReplicationError
from .targets import ObjectStore, PreconditionFailed, TargetError

LEASE_KEY = "lease"
MAX_LEASE_BYTES = 64 * 1024
# holder ids of this process's leases not released yet (taken, not let go): a lease held
# under this pid by an id not here was left by an earlier shipper of this process (closed
# while the server was unreachable), never by a running one
LIVE_IDS: set[str] = set()


class LeaseLost(ReplicationError):
    """Another writer holds the replica now; this one must stop shipping."""


class Refused(ReplicationError):
    """This writer may not replicate to this URL (another holds it, or it holds another
    store's replica): nothing was shipped."""


class Lease:
    def __init__(self, target: ObjectStore, holder: dict, ttl: float) -> None:
        self.target = target
        self.holder = holder
        self.ttl = ttl
        self.etag: str | None = None
        self.renewed = 0.0  # elapsed clock (clock.elapsed) at the last renewal
        self._prior: bytes | None = None  # the lease document this one replaced, if any
        self._last_raw: bytes | None = None  # the bytes the last read found
        self._last_body: bytes | None = None  # the document last made (see _check_enforced)

    def _doc(self, expires: float) -> bytes:
        now = time.time()
        self._last_body = msgpack.packb({"holder": self.holder, "expires": expires,
                                         "renewed": now}, use_bin_type=True)
        return self._last_body

    def read(self) -> tuple[dict, str] | None:
        got = self._read_raw()
        if got is None:
            return None
        try:
            doc = msgpack.unpackb(got[0], raw=False, strict_map_key=False)
            if not isinstance(doc, dict) or not isinstance(doc.get("holder"), dict):
                raise ValueError("not a lease")
            exp = doc.get("expires", 0)
            # (an expiry that is not a finite number is damage too: a string or None made
            # every comparison a TypeError, each round failing for good; NaN was never
            # expired, every writer refused for good: audit 55)
            if isinstance(exp, bool) or not isinstance(exp, (int, float)) or \
                    not math.isfinite(exp):
                raise ValueError("not a lease")
        except DECODE_ERRORS:
            doc = {"holder": {"id": "?"}, "expires": 0}  # damaged: treat as expired
        return doc, got[1]

    def _read_raw(self) -> tuple[bytes, str] | None:
        got = self.target.get(LEASE_KEY, MAX_LEASE_BYTES)
        self._last_raw = got[0] if got is not None else None
        return got

    def acquire(self) -> None:
        """Take the lease or raise ReplicationError naming its holder."""
        for _ in range(3):
            cur = self.read()
            prior = self._last_raw
            try:
                if cur is None:
                    self.etag = self.target.put(LEASE_KEY, self._doc(time.time() + self.ttl),
                                                if_none_match=True)
                else:
                    doc, etag = cur
                    if not self._may_take(doc):
                        raise self._refusal(doc)
                    self.etag = self.target.put(LEASE_KEY, self._doc(time.time() + self.ttl),
                                                if_match=etag)
                self._prior = prior
                self.renewed = clock.elapsed()
                LIVE_IDS.add(self.holder["id"])
            except PreconditionFailed:
                continue  # raced with another taker: look again
            self._check_enforced()
            return
        raise ReplicationError(f"could not take the lease of {self.target.url}: it keeps "
                               f"changing under us (another writer is starting)")

    def _check_enforced(self) -> None:
        """The server must refuse a PUT with If-None-Match on the lease (it exists now) and
        one with If-Match on an etag it does not have: one writer per replica rests on it.
        A server that ignores the conditions (an S3-compatible one without conditional
        writes) let every store racing at a replica take the lease and ship, each told by
        ``sync_replica`` that its commits were in the replica, one replica for them all
        (audit 59).  Each probe sends the very bytes the lease holds (a server that writes
        them anyway changes nothing, its etag included).  Checked where the conditions are
        the server's (``S3Target.server_conditions``); ``file://`` enforces its own."""
        if not getattr(self.target, "server_conditions", False) or self._last_body is None:
            return
        for cond, kw in (("If-None-Match: *", {"if_none_match": True}),
                         ("If-Match on another etag", {"if_match": '"' + "0" * 32 + '"'})):
            try:
                self.target.put(LEASE_KEY, self._last_body, **kw)
            except PreconditionFailed:
                continue  # refused, as it must be
            self.release()
            raise Refused(f"the server at {getattr(self.target, 'server', '?')} ignores "
                          f"conditional writes (a PUT of {self.target.url}/{LEASE_KEY} with "
                          f"{cond} succeeded; it must fail): walstore cannot hold one writer "
                          f"per replica there, so it does not replicate to it; use a server "
                          f"that honours If-None-Match and If-Match on PUT")

    def check(self) -> None:
        """Refused (naming the holder) when another writer holds the lease; writes
        nothing (a writer checks this, and the replica, before it takes the lease)."""
        cur = self.read()
        if cur is not None and not self._may_take(cur[0]):
            raise self._refusal(cur[0])

    def _refusal(self, doc: dict) -> Refused:
        return Refused(f"replica {self.target.url} is being written by another writer: "
                       f"{describe(doc['holder'])}, lease valid for "
                       f"{max(0, doc.get('expires', 0) - time.time()):.0f} s more; "
                       f"one writer per replica URL")

    def _may_take(self, doc: dict) -> bool:
        h = doc["holder"]
        if h.get("id") == self.holder["id"] or doc.get("expires", 0) < time.time():
            return True
        same_store = (h.get("host") == self.holder["host"]
                      and _same_path(h.get("path"), self.holder["path"])
                      and h.get("store_id") == self.holder["store_id"])
        if same_store and h.get("pid") == os.getpid():  # this process's own, let go of (a
            return h.get("id") not in LIVE_IDS        # close during an outage) unless live
        if same_store and h.get("inproc") is True and self.holder.get("inproc") is True:
            # The holder shipped from inside this store's writer process, and this shipper
            # runs inside the writer that holds the store's lock now: that store was closed
            # (during an outage: the lease could not be released), whether its process
            # lives on or not; a round of it still hung fails its If-Match writes.  (A
            # process that closed its store and lived on kept every other process from
            # opening it with replicate_to= for the whole ttl: audit 59.  An external
            # shipper, holding no store lock, is not inproc: it is still refused.)
            return True
        return same_store and not _pid_alive(h.get("pid"))

    def renew_due(self) -> bool:
        return clock.elapsed() - self.renewed >= self.ttl / 3

    def renew(self) -> None:
        if self.etag is None:  # (released: If-Match None was an unconditional PUT, over
            # the lease of whoever took it since: a round run after a stop did it)
            raise LeaseLost(f"the lease of {self.target.url} was released (the shipper "
                            f"was stopped); shipping stopped")
        try:
            self.etag = self.target.put(LEASE_KEY, self._doc(time.time() + self.ttl),
                                        if_match=self.etag)
            self.renewed = clock.elapsed()
        except PreconditionFailed:
            cur, gone = self._read_lost()
            if cur is not None and self.adopt_if_mine(cur):
                return  # (an earlier renewal landed, its answer lost: still ours)
            raise self._lost(cur, gone) from None

    def _read_lost(self) -> tuple[tuple[dict, str] | None, str]:
        """The lease document after a write of ours on it failed its If-Match, and what
        to say when there is none.  A read that failed transiently (a reset, a 5xx, a
        timeout) raises: the round fails and the next one looks again (it was taken for
        a deleted lease, "lost to nobody": shipping stopped for good, its pin dropped,
        though the document was most likely this writer's own, renewed with its answer
        lost)."""
        try:
            return self.read(), "the lease was deleted"
        except TargetError as e:  # (the bucket went with it: NoSuchBucket)
            if e.transient:
                raise
            return None, f"the lease is gone: {e}"

    def _lost(self, cur: tuple[dict, str] | None, gone: str) -> LeaseLost:
        who = describe(cur[0]["holder"]) if cur else f"nobody ({gone})"
        return LeaseLost(f"lost the lease of {self.target.url} to {who}; shipping stopped")

    def adopt_if_mine(self, cur: tuple[dict, str]) -> bool:
        """True, taking ``cur``'s etag, when the lease document ``cur`` (from ``read``) is
        this holder's own: a renewal whose answer was lost (a reset, a read timeout) landed
        all the same, so the etag it returned was never seen and the next If-Match failed
        — taken for a lost lease, shipping stopped for good, its pin dropped, and a
        checkpoint trimmed WAL the replica never got (a hole: replsweep).

        Expired (the writer stalled past the ttl after that renewal), it is still ours:
        a taker writes its own holder, and none did.  But another writer may be taking it
        over now, with the etag read here: it is renewed at once, with If-Match on that
        etag, before this writer ships anything more.  Whichever of the two writes lands
        first holds the lease; the other fails its If-Match.  Lost that way, LeaseLost
        naming the taker.  (An expired document of its own was refused: the writer
        stopped for good, "lease-lost" to itself, while a writer that had seen its etag
        renewed the same expired lease with If-Match and shipped on.)"""
        doc, etag = cur
        if doc["holder"].get("id") != self.holder["id"] or self.etag is None:
            return False  # (None: released, written expired by this holder: never again)
        if self._adopt_live(cur):
            return True
        self.etag = etag
        self.renewed = clock.elapsed() - self.ttl  # (due, should this renewal fail in transit)
        try:
            self.etag = self.target.put(LEASE_KEY, self._doc(time.time() + self.ttl),
                                        if_match=etag)
        except PreconditionFailed:
            cur, gone = self._read_lost()
            if cur is not None and self._adopt_live(cur):
                return True  # (this renewal landed, its answer lost: a retry met it)
            raise self._lost(cur, gone) from None
        self.renewed = clock.elapsed()
        return True

    def _adopt_live(self, cur: tuple[dict, str]) -> bool:
        """``adopt_if_mine`` of a document of this holder's that has not expired: its etag
        taken, and the time it was written as the last renewal."""
        doc, etag = cur
        if doc["holder"].get("id") != self.holder["id"] or \
                doc.get("expires", 0) <= time.time():
            return False
        self.etag = etag
        # (when it landed, as far as the wall clock tells, on the elapsed clock)
        self.renewed = clock.elapsed() - max(0.0, time.time() - (doc["expires"] - self.ttl))
        return True

    def release(self, give_back: bool = False) -> None:
        """Let go of the lease: write it expired; with ``give_back`` (a writer refused
        after it took the lease), write back the document it replaced, byte for byte: the
        same bytes have the same etag, so the holder it was taken from (stalled past the
        ttl) renews it as if nothing happened."""
        LIVE_IDS.discard(self.holder["id"])
        if self.etag is None:
            return
        body = self._prior if give_back and self._prior is not None else self._doc(0.0)
        try:
            self.target.put(LEASE_KEY, body, if_match=self.etag)
        except Exception:
            pass  # it expires by itself
        self.etag = None
        self._prior = None


def _same_path(a: Any, b: str) -> bool:
    """One store directory, however it was spelled (a writer that opened it through a
    symlink, killed, blocked the next writer opening it by its real path for the whole
    lease)."""
    if not isinstance(a, str):
        return False
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def holder_info(token: str, path: str, store_id: bytes, lineage: str,
                inproc: bool = False) -> dict:
    """``inproc``: the shipper runs inside the store's writer process (``replicate_to=``),
    which holds the store's lock while it ships (see ``Lease._may_take``)."""
    return {"id": token, "host": socket.gethostname(), "pid": os.getpid(), "path": path,
            "store_id": store_id.hex(), "lineage": lineage, "inproc": bool(inproc)}


def describe(h: dict) -> str:
    return (f"process {h.get('pid', '?')} on host {h.get('host', '?')} replicating store "
            f"{h.get('path', '?')}")


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
