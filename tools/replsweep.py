"""Network fault sweep for S3 replication: one fault at a time on every request a replicating
store makes.

This tool owns the proof that replication to S3 keeps its promise under network faults: a
replica never claims (in its manifest, ``complete_to``, a ``sync_replica`` that returned or a
restore's success) something it does not hold, and a restore gives exactly the source's state
at the point.  Faults are injected on the wire, never by mocking boto3: a moto S3 server (its
real HTTP server, as ``tests/test_replication_support.py`` starts it) sits behind
:class:`FaultProxy`, a TCP proxy that speaks enough HTTP/1.1 to count requests across
keep-alive connections and, for the n-th request, do one of (``KINDS``):

- ``reset``     reset the connection before the request is forwarded (it never lands);
- ``drop``      forward it, then reset the connection instead of answering (it landed);
- ``500``       answer 500 InternalError without forwarding;
- ``503``       answer 503 SlowDown without forwarding;
- ``delay``     forward it, hold the answer past the client's read timeout (it landed);
- ``late``      hold the request past the read timeout, then forward it: it lands after the
                client gave up (and maybe after its retry);
- ``truncate``  forward it, send half of the answer (half its body, or half its head when it
                has no body), then close.

The workload (:class:`Workload`) is fixed: a store replicating through the proxy (rounds
driven by ``sync_replica``; ``snapshot_interval`` 0, retention 0 with 4 snapshots kept,
``delete_grace`` 0 and ``compact_fanout`` 3 so snapshots, compaction, retention and deletes
all happen) does key commits, reversible file writes (blobs), a wait for one lease renewal,
a restore point, a purge, a checkpoint that trims segments, ``sync_replica`` calls, a close
and a reopen of the same store (the lease taken over from the released one), more commits
and a last sync.  Rounds run only when a sync asks (``interval`` 0.5 s is longer than any
gap between syncs), so the healthy run's request sequence repeats exactly.

It runs once healthy to count the requests of each kind (PUT wal / snapshot / blob /
manifest / lease, GET, LIST, DELETE, conditional writes), then once per (request number,
fault kind).  After each run it checks, against the replica read directly (not through the
proxy):

(a) every ``sync_replica`` that returned had its promise hold when it returned: the
    manifest's position at or past the durable LSN at the call and ``complete_to`` at or past
    the call's time; and a restore to the last commit before it gives the state then;
(b) ``replicas(url, verify=True)`` (``walstore replicas URL --verify``) passes;
(c) a restore to the end equals the source (keys, and file history read through
    ``at(txid).files(ws)`` for a sample of txids), and restores to the restore point and to
    the txids before each phase's last sync equal the source at those points (a point
    retention dropped may be refused, by name, as ``UnknownRestorePoint``), but for the
    keys of the purge the replica holds after them, which stay erased;
(d) ``replication()`` recovers without a reopen: after the phase's last sync, state
    "running" and no ``last_error``; never "failed", "lease-lost" or "refused"; a sync that
    raised named a cause;
(e) nothing but a walstore error escaped the public API.

    python tools/replsweep.py                      # every request, every kind
    python tools/replsweep.py --stride 5 --kinds reset drop late
    python tools/replsweep.py --only 17:drop -v    # one case, with what it saw
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import walstore  # noqa: E402
from test_replication_support import FAKE_ENV, Replica, make_s3_replica  # noqa: E402
from walstore.replication import replicas, restore  # noqa: E402
from walstore.replication.manifest import Manifest  # noqa: E402

KINDS = ("reset", "drop", "500", "503", "delay", "late", "truncate")
READ_TIMEOUT = 1.0          # the client's, per request (``delay``/``late`` wait past it)
HOLD = READ_TIMEOUT + 0.6   # how long ``delay`` and ``late`` hold
SYNC_TIMEOUT = 20.0         # a sync given this long against one faulted request
SETTLE = 8.0                # how long replication() may take to recover after a phase
LEASE_TTL = 6.0             # renewed every 2 s: the workload waits for one renewal


# ---- the proxy ---------------------------------------------------------------------------------
@dataclass
class Request:
    """One HTTP request seen by the proxy."""

    n: int
    method: str
    key: str            # the object key relative to the replica prefix ("" for bucket ops)
    label: str          # "PUT wal if-none-match", "LIST", ...
    fault: str | None = None


def classify(method: str, target: str, headers: dict[str, str], prefix: str) -> tuple[str, str]:
    """(key, label) of a request: the kind of object it names and whether it is conditional."""
    parts = urlsplit(target)
    path = unquote(parts.path).lstrip("/")
    _bucket, _, full = path.partition("/")
    key = full[len(prefix):] if prefix and full.startswith(prefix) else full
    query = parts.query
    if method == "GET" and "list-type=" in query:
        what = "LIST"
    elif "uploads" in query and not key:
        what = f"{method} uploads"
    else:
        head = key.split("/", 1)[0]
        kind = {"wal": "wal", "snapshots": "snapshot", "blobs": "blob", "manifest": "manifest",
                "lease": "lease"}.get(head, "other")
        what = f"{method} {kind}"
        if "uploadId=" in query or "uploads" in query:
            what += " multipart"
    if "if-match" in headers:
        what += " if-match"
    elif "if-none-match" in headers:
        what += " if-none-match"
    return key, what


class _Stream:
    """A buffered reader over a socket (enough HTTP/1.1 for S3's requests and answers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        """Bytes up to and including the blank line; None at a clean EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                if self.buf:
                    raise ConnectionError("EOF inside an HTTP head")
                return None
        i = self.buf.index(b"\r\n\r\n") + 4
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("EOF inside an HTTP body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("EOF inside a chunked body")
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def chunked(self) -> bytes:
        """A chunked body, framing included (forwarded as it came)."""
        out = b""
        while True:
            size_line = self.line()
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers up to the blank line
                    t = self.line()
                    out += t
                    if t == b"\r\n":
                        return out
            out += self.exact(size + 2)

    def rest(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    hdrs: dict[str, str] = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs


def _body(stream: _Stream, hdrs: dict[str, str], until_close: bool) -> bytes:
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        return stream.chunked()
    if "content-length" in hdrs:
        return stream.exact(int(hdrs["content-length"]))
    return stream.rest() if until_close else b""


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dead middlebox does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


_ERROR_BODY = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>"
               "<Message>injected by replsweep</Message><RequestId>0</RequestId></Error>")


def _error_response(status: int, code: str) -> bytes:
    body = _ERROR_BODY.format(code=code).encode()
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def close_quietly(*socks: socket.socket | None) -> None:
    """Close each socket given (None skipped), whatever errors closing raises."""
    for s in socks:
        if s is not None:
            try:
                s.close()
            except OSError:
                pass


class FaultProxy:
    """A TCP proxy in front of an S3 server that parses HTTP/1.1 requests (several per
    keep-alive connection), numbers them from 1, records each (``requests``), and applies
    ``plan`` (request number -> a kind of ``KINDS``) to the request of that number, and to
    up to ``repeat`` requests right after it that repeat it (the same method and target:
    the client's own retries; botocore's ``max_attempts`` N makes N + 1 attempts, so a
    fault on one attempt alone never reaches walstore unless ``repeat`` covers them).
    ``prefix``: the replica's key prefix in the bucket (for the labels).  ``rule``, when
    set, is asked about every request the plan leaves alone: label -> a kind, or None."""

    def __init__(self, upstream: tuple[str, int], prefix: str = "", hold: float = HOLD,
                 repeat: int = 0) -> None:
        self.upstream = upstream
        self.prefix = prefix
        self.hold = hold
        self.repeat = repeat  # the client's retries of a faulted request faulted too
        self._sticky: list | None = None
        self.plan: dict[int, str] = {}
        self.rule: Callable[[str], str | None] | None = None
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.closed = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._socks: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True, name="replsweep-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fired(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.fault]

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _track(self, s: socket.socket) -> socket.socket:
        with self.lock:
            self._socks.add(s)
        return s

    def _upstream(self) -> tuple[socket.socket, _Stream]:
        u = self._track(socket.create_connection(self.upstream))
        return u, _Stream(u)

    def _serve(self, c: socket.socket) -> None:
        self._track(c)
        cs = _Stream(c)
        up: tuple[socket.socket, _Stream] | None = None
        try:
            while not self.closed:
                head = cs.head()
                if head is None:
                    return
                first, hdrs = _headers(head)
                method, target = first.split(" ")[:2]
                if hdrs.get("expect", "").lower() == "100-continue":
                    c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(ln for ln in head.split(b"\r\n")
                                        if not ln.lower().startswith(b"expect:"))
                body = _body(cs, hdrs, until_close=False)
                key, label = classify(method, target, hdrs, self.prefix)
                with self.lock:
                    n = len(self.requests) + 1
                    fault = self.plan.get(n)
                    ident = (method, target)
                    if fault is not None:
                        self._sticky = [ident, fault, self.repeat]
                    elif self._sticky is not None and self._sticky[0] == ident \
                            and self._sticky[2] > 0:
                        fault = self._sticky[1]  # the client's own retry of it
                        self._sticky[2] -= 1
                    else:
                        self._sticky = None
                        if self.rule is not None:
                            fault = self.rule(label)
                    self.requests.append(Request(n, method, key, label, fault))
                if fault == "reset":
                    _reset(c)
                    return
                if fault in ("500", "503"):
                    c.sendall(_error_response(int(fault), "InternalError" if fault == "500"
                                              else "SlowDown"))
                    return
                if fault == "late":
                    time.sleep(self.hold)  # the client gives up; the request lands after
                if up is None:
                    up = self._upstream()
                u, us = up
                u.sendall(head + body)
                rhead = us.head()
                if rhead is None:
                    raise ConnectionError("the server closed the connection")
                status_line, rh = _headers(rhead)
                status = int(status_line.split(" ")[1])
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                closing = rh.get("connection", "").lower() == "close" or \
                    status_line.startswith("HTTP/1.0")
                rbody = b"" if no_body else _body(us, rh, until_close=closing)
                if closing:
                    u.close()
                    up = None
                if fault == "drop":
                    _reset(c)
                    return
                if fault in ("delay", "late"):
                    if fault == "delay":
                        time.sleep(self.hold)
                    c.close()
                    return
                if fault == "truncate":
                    c.sendall(rhead + rbody[: len(rbody) // 2] if rbody
                              else rhead[: len(rhead) // 2])
                    _reset(c)
                    return
                c.sendall(rhead + rbody)
                if closing:
                    return
        except (OSError, ValueError, IndexError):
            pass
        finally:
            close_quietly(c, up[0] if up else None)

    def close(self) -> None:
        self.closed = True
        with self.lock:
            socks, self._socks = self._socks, set()
        close_quietly(self.listener, *socks)


# ---- the S3 server ------------------------------------------------------------------------------
class S3Server:
    """moto's real S3 server on a free port (as the tests' ``s3_endpoint`` fixture)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer
        os.environ.update(FAKE_ENV)
        os.environ.pop("AWS_ENDPOINT_URL", None)
        import logging
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (a line per request)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.stop()


# ---- the workload -------------------------------------------------------------------------------
STORE_OPTS = dict(segment_size=64 * 1024, checkpoint_bytes=1 << 40, apply_interval=0.05)


def replicate_opts(proxy_url: str, attempts: int) -> dict:
    return {"endpoint_url": proxy_url, "interval": 0.5, "max_backoff": 0.2,
            "snapshot_interval": 0.0, "retention_seconds": 0.0, "retain_snapshots": 4,
            "delete_grace": 0.0, "compact_fanout": 3, "complete_every": 3600.0,
            "lease_ttl": LEASE_TTL, "connect_timeout": READ_TIMEOUT, "read_timeout": READ_TIMEOUT,
            "max_attempts": attempts}


@dataclass
class Sync:
    """One ``sync_replica`` call: what it promised, and how it ended."""

    label: str
    called: float              # time.time() at the call
    durable: int               # the log's end at the call
    txid: int                  # the last commit before it
    returned: bool = False
    error: str | None = None
    position: int | None = None      # the manifest's, read right after it returned
    complete_to: float | None = None


@dataclass
class Outcome:
    """What one run of the workload did."""

    states: dict[int, dict] = field(default_factory=dict)   # txid -> keys after it
    files: dict[int, dict] = field(default_factory=dict)    # txid -> {path: bytes | None}
    ends: dict[int, int] = field(default_factory=dict)      # txid -> the log's end after it
    syncs: list[Sync] = field(default_factory=list)
    point_txid: int | None = None        # the last commit before the restore point
    final: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)          # broken promises
    notes: list[str] = field(default_factory=list)           # what happened, not broken
    statuses: list[tuple[str, str | None]] = field(default_factory=list)
    reported: bool = False           # replication() showed an error at some point
    foreign: list[str] = field(default_factory=list)


class StatusWatch:
    """Samples ``store.replication()`` every few ms (state and last_error transitions)."""

    def __init__(self, store: walstore.Store, out: Outcome) -> None:
        self.store, self.out = store, out
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        last = None
        while not self.stop.wait(0.003):
            try:
                st = self.store.replication()
            except Exception:  # noqa: BLE001 - closed meanwhile
                return
            now = (st.state, st.last_error)
            if now != last:
                self.out.statuses.append(now)
                last = now
            if st.last_error:
                self.out.reported = True

    def close(self) -> None:
        self.stop.set()
        self.t.join(2)


class Workload:
    """The fixed workload: two opens of one store replicating to ``rep`` through the proxy."""

    def __init__(self, root: str, rep: Replica, opts: dict) -> None:
        self.root, self.rep, self.opts = root, rep, opts
        self.path = os.path.join(root, "src")
        self.ws_dir = os.path.join(root, "ws")
        os.makedirs(self.ws_dir, exist_ok=True)
        self.out = Outcome()
        self.keys: dict[str, Any] = {}
        self.files: dict[str, bytes | None] = {"a.txt": None, "big.bin": None, "c.txt": None}
        self.txid = 0

    # -- steps --
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one public call; a non-walstore exception is recorded as foreign."""
        try:
            return fn()
        except walstore.WalstoreError:
            raise
        except Exception as e:
            self.out.foreign.append(f"{what}: {type(e).__name__}: {e}")
            raise

    def commit(self, store: walstore.Store, writes: dict, files: dict | None = None,
               ws=None) -> None:
        def run():
            with store.transaction() as tx:
                for k, v in writes.items():
                    tx.put(k, v)
                for p, data in (files or {}).items():
                    f = tx.files(ws)
                    if data is None:
                        f.delete(p)
                    else:
                        f.write(p, data)
                return tx.id
        self.txid = self._call("commit", run)
        self.keys.update(writes)
        self.files.update(files or {})
        self.out.states[self.txid] = dict(self.keys)
        self.out.files[self.txid] = dict(self.files)
        self.out.ends[self.txid] = store.stats()["wal_end_lsn"]

    def sync(self, store: walstore.Store, label: str) -> None:
        s = Sync(label, time.time(), store.stats()["wal_end_lsn"], self.txid)
        self.out.syncs.append(s)
        try:
            self._call("sync_replica", lambda: store.sync_replica(timeout=SYNC_TIMEOUT))
        except walstore.ReplicationError as e:
            s.error = str(e)
            return
        s.returned = True
        m = load_direct(self.rep)  # (read at once: what the replica says now)
        if m is not None:
            s.position, s.complete_to = m.position, m.doc.get("complete_to")

    def open(self) -> walstore.Store:
        return self._call("open", lambda: walstore.open(
            self.path, replicate_to=self.rep.url, replicate_options=self.opts, **STORE_OPTS))

    def settle(self, store: walstore.Store, phase: str) -> None:
        """(d): replication() back to running with no error, without a reopen."""
        deadline = time.monotonic() + SETTLE
        while True:
            st = store.replication()
            if st.state == "running" and st.last_error is None and st.lag_bytes == 0:
                return
            if st.state != "running" or time.monotonic() > deadline:
                self.out.errors.append(
                    f"(d) {phase}: replication() did not recover: state {st.state}, lag "
                    f"{st.lag_bytes} bytes, last_error {st.last_error!r}")
                return
            time.sleep(0.05)

    def run(self) -> Outcome:
        out = self.out
        s = None
        try:
            for phase, name in ((self.phase_a, "first open"), (self.phase_b, "reopen")):
                s = self.open()
                watch = StatusWatch(s, out)
                try:
                    phase(s)
                    self.settle(s, name)
                finally:
                    watch.close()
                self._call("close", s.close)
            s = None
        except walstore.WalstoreError as e:
            out.notes.append(f"workload stopped: {type(e).__name__}: {e}")
            out.errors.append(f"(d) the workload failed with one faulted request: "
                              f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - recorded as foreign by _call, or ours
            if not out.foreign:
                out.errors.append(f"workload error: {traceback.format_exc()}")
        finally:
            if s is not None:
                try:
                    s.close()
                except Exception:  # noqa: BLE001
                    pass
        return out

    def phase_a(self, s: walstore.Store) -> None:
        ws = s.workspace(self.ws_dir)
        self.commit(s, {f"k{i}": i for i in range(5)}, {"a.txt": b"version one\n"}, ws)
        self.sync(s, "first")
        self.commit(s, {"tmp/x": "secret-x", "tmp/y": "secret-y"},
                    {"big.bin": os.urandom(48 * 1024), "a.txt": b"version two\n"}, ws)
        for i in range(6):
            self.commit(s, {f"bulk{i}": "v" * 6000})
        self.sync(s, "bulk")
        self.commit(s, {"k1": "one"}, {"c.txt": b"c\n"}, ws)
        self.sync(s, "small")
        self.commit(s, {"k2": "two"})
        time.sleep(LEASE_TTL / 3 + 0.1)  # the next round renews the lease first
        self.sync(s, "before point")
        self._call("restore_point", lambda: s.restore_point("rp"))
        self.out.point_txid = self.txid
        self.commit(s, {"k3": "three"}, {"c.txt": None}, ws)
        self._call("purge", lambda: s.purge("tmp/"))
        self.keys = {k: v for k, v in self.keys.items() if not k.startswith("tmp/")}
        for i in range(6):
            self.commit(s, {f"late{i}": "w" * 6000})
        self._call("checkpoint", s.checkpoint)
        self.sync(s, "after purge")

    def phase_b(self, s: walstore.Store) -> None:
        ws = s.workspaces()[0]
        self.commit(s, {"k4": "four"}, {"a.txt": b"version three\n"}, ws)
        self.sync(s, "reopened")
        self.commit(s, {"k5": "five"})
        self.sync(s, "last")


# ---- the checks --------------------------------------------------------------------------------
def load_direct(rep: Replica) -> Manifest | None:
    t = rep.target()
    try:
        return Manifest.load(t, 1 << 26)
    finally:
        t.close()


def rows_of(store) -> dict:
    return dict(store.scan())


def check(work: Workload, out: Outcome, scratch: str) -> None:
    """(a), (b), (c) against the replica read directly (the proxy is out of the way)."""
    rep = work.rep
    direct = rep.options  # (endpoint: moto itself)
    # (a) every sync that returned held its promise when it returned
    for sy in out.syncs:
        if not sy.returned:
            if not sy.error:
                out.errors.append(f"(d) sync {sy.label!r} raised naming no cause")
            continue
        if sy.position is None or sy.position < sy.durable:
            out.errors.append(f"(a) sync {sy.label!r} returned, but the replica's manifest "
                              f"position is {sy.position} < the durable LSN {sy.durable} at "
                              f"its call")
        if sy.complete_to is None or sy.complete_to < sy.called - 1e-6:
            out.errors.append(f"(a) sync {sy.label!r} returned, but complete_to "
                              f"{sy.complete_to} is before its call {sy.called}")
    # (b) verify
    try:
        rep_report = replicas(rep.url, verify=True, replicate_options=direct)
        v = rep_report["verify"]
        if not v["ok"]:
            bad = [f"{c['check']}: {c.get('error')}" for c in v["checks"] if not c["ok"]]
            out.errors.append(f"(b) replicas --verify fails: {bad}")
    except Exception as e:  # noqa: BLE001
        out.errors.append(f"(b) replicas --verify raised {type(e).__name__}: {e}")
    m = load_direct(rep)
    # (c) restores: the end, the restore point, the txid before each returned sync
    targets: list[tuple[str, Any, dict, dict | None]] = [("end", None, out.final, None)]
    # (c) also: a point the replica holds must restore; legit refusals are only those
    # retention dropped (``_retention_dropped``)
    if out.point_txid is not None:
        targets.append(("point rp", "rp", out.states[out.point_txid],
                        out.files[out.point_txid]))
    last_of_phase = [sy for sy in out.syncs if sy.label in ("after purge", "last")]
    for sy in last_of_phase:
        if sy.returned and sy.txid in out.states:
            targets.append((f"tx {sy.txid} (sync {sy.label})", sy.txid, out.states[sy.txid],
                            out.files[sy.txid]))
    for i, (what, to, want, files) in enumerate(targets):
        dest = os.path.join(scratch, f"restore-{i}")
        try:
            r = restore(rep.url, dest, to=to, replicate_options=direct)
        except walstore.UnknownRestorePoint as e:
            if to is not None and _retention_dropped(m, to, out):
                out.notes.append(f"restore to {what}: dropped by retention")
                continue
            out.errors.append(f"(c) restore to {what} refused: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            out.errors.append(f"(c) restore to {what} raised {type(e).__name__}: {e}")
            continue
        if r.get("blobs_missing"):
            out.errors.append(f"(c) restore to {what}: blobs missing {r['blobs_missing']}")
        # a purge the replica holds after the cut is applied by the restore: the point's
        # keys under it stay erased (and once the last sync returned, the replica holds
        # the purge: a restore before it must apply it)
        purged = [p for p in r.get("purges_applied", ()) if isinstance(p, str)]
        if (to is not None and "tmp/" not in purged and out.syncs and out.syncs[-1].returned
                and any(k.startswith("tmp/") for k in want)):
            out.errors.append(f"(c) restore to {what} brought back keys purged after it")
        want = {k: v for k, v in want.items() if not any(k.startswith(p) for p in purged)}
        try:
            with walstore.open(dest) as c:
                got = rows_of(c)
                if got != want:
                    diff = sorted(set(got.items()) ^ set(want.items()))[:6]
                    out.errors.append(f"(c) restore to {what}: keys differ from the source "
                                      f"(symmetric difference {diff})")
                if files is not None:
                    _check_files(c, files, f"restore to {what}", None, out)
                else:  # the end: the file history of a sample of txids
                    for tx in _sample(sorted(out.files)):
                        _check_files(c, out.files[tx], f"restore to the end, at tx {tx}", tx,
                                     out)
        except Exception as e:  # noqa: BLE001
            out.errors.append(f"(c) restore to {what}: the copy failed to open or read: "
                              f"{type(e).__name__}: {e}")
        shutil.rmtree(dest, ignore_errors=True)


def _sample(txids: list[int]) -> list[int]:
    return sorted({txids[0], txids[len(txids) // 2], txids[-1]} if txids else set())


def _check_files(c, files: dict, what: str, tx: int | None, out: Outcome) -> None:
    ws = c.workspaces()[0]
    view = c.at(tx).files(ws) if tx is not None else None
    for p, data in files.items():
        try:
            if view is not None:
                got = view.read(p) if view.exists(p) else None
            else:
                full = os.path.join(ws.root, p)
                got = open(full, "rb").read() if os.path.exists(full) else None
        except Exception as e:  # noqa: BLE001
            out.errors.append(f"(c) {what}: {p} unreadable: {type(e).__name__}: {e}")
            continue
        if tx is not None and got != data:
            out.errors.append(f"(c) {what}: {p} is {_short(got)}, the source had {_short(data)}")


def _short(b: bytes | None) -> str:
    return "absent" if b is None else f"{len(b)} bytes {b[:16]!r}"


def _retention_dropped(m: Manifest | None, to: Any, out: Outcome) -> bool:
    """Whether a refused restore target lies before the replica's retained history: the log's
    end after its commit is at or before the start of the oldest retained snapshot's chain
    (the replica may not reach it; anything later it must)."""
    if m is None or not m.snapshots:
        return False
    tx = out.point_txid if to == "rp" else to
    if tx not in out.ends:
        return False
    oldest = min(s["lsn"] for s in m.snapshots if m.wal_start_for(s["lsn"]) is not None)
    return out.ends[tx] <= oldest


# ---- one run, the sweep -------------------------------------------------------------------------
@dataclass
class RunResult:
    nth: int | None
    kind: str | None
    requests: list[Request]
    errors: list[str]
    notes: list[str]
    fired: list[str]
    reported: bool
    seconds: float


def one_run(server: S3Server, scratch: str, nth: int | None = None, kind: str | None = None,
            attempts: int = 1, verbose: bool = False, single: bool = False) -> RunResult:
    """The workload with request ``nth`` faulted as ``kind`` (None: healthy), then the checks."""
    t0 = time.monotonic()
    root = tempfile.mkdtemp(prefix="run-", dir=scratch)
    rep = make_s3_replica(server.endpoint)
    host, port = server.endpoint.rsplit(":", 1)
    prefix = rep.url.split("/", 3)[3] + "/"
    proxy = FaultProxy((host.split("//")[1], int(port)), prefix,
                       repeat=0 if single else attempts)
    if nth is not None and kind is not None:
        proxy.plan[nth] = kind
    work = Workload(root, rep, replicate_opts(proxy.url, attempts))
    try:
        out = work.run()
        proxy.plan.clear()
        requests = list(proxy.requests)
    finally:
        proxy.close()
    # the source as it is at the end (reopened without replication)
    try:
        with walstore.open(work.path, **STORE_OPTS) as s:
            out.final = rows_of(s)
        if out.final != work.keys:
            out.errors.append(f"the source's keys differ from what the workload committed: "
                              f"{sorted(set(out.final.items()) ^ set(work.keys.items()))[:6]}")
    except Exception as e:  # noqa: BLE001
        out.errors.append(f"the source failed to reopen: {type(e).__name__}: {e}")
    check(work, out, root)
    for f in out.foreign:
        out.errors.append(f"(e) a foreign exception escaped {f}")
    for st, err in out.statuses:
        if st in ("failed", "lease-lost", "refused"):
            out.errors.append(f"(d) replication() went {st}: {err}")
            break
    fired = [f"#{r.n} {r.label} {r.fault}" for r in requests if r.fault]
    if verbose:
        for sy in out.syncs:
            print(f"    sync {sy.label}: returned={sy.returned} error={sy.error}")
        for st in out.statuses:
            print(f"    status {st}")
        for n in out.notes:
            print(f"    note {n}")
    shutil.rmtree(root, ignore_errors=True)
    return RunResult(nth, kind, requests, out.errors, out.notes, fired, out.reported,
                     time.monotonic() - t0)


def count(server: S3Server, scratch: str, attempts: int = 1) -> RunResult:
    r = one_run(server, scratch, attempts=attempts)
    if r.errors:
        raise SystemExit("the healthy run is broken:\n  " + "\n  ".join(r.errors))
    return r


def sweep(server: S3Server, scratch: str, stride: int = 1, kinds=KINDS, attempts: int = 1,
          start: int = 1, only: list[tuple[int, str]] | None = None,
          progress: Callable[[str], None] | None = None, verbose: bool = False,
          single: bool = False, rotate: bool = False) -> dict:
    """Every kind at every ``stride``-th request (from ``start``) of the healthy run's
    sequence (``rotate``: one kind each, in turn); ``only``: just these (n, kind);
    ``single``: the client's retries of the faulted request go through (else they fail
    alike, and walstore sees the fault).
    Returns the totals and every broken case."""
    t0 = time.monotonic()
    base = count(server, scratch, attempts)
    if rotate:
        cases = rotated(len(base.requests), stride, start, tuple(kinds))
    else:
        cases = only or [(n, k) for n in range(start, len(base.requests) + 1, stride)
                         for k in kinds]
    s = {"requests": len(base.requests), "by_label": Counter(r.label for r in base.requests),
         "sequence": [r.label for r in base.requests], "runs": 0, "fired": 0,
         "reported": 0, "unfired": [], "broken": [], "by_kind": Counter(),
         "count_seconds": base.seconds, "seconds": 0.0, "notes": Counter()}
    for n, kind in cases:
        r = one_run(server, scratch, n, kind, attempts, verbose, single)
        s["runs"] += 1
        s["by_kind"][kind] += 1
        s["fired"] += bool(r.fired)
        s["reported"] += r.reported
        for note in r.notes:
            s["notes"][note.split(":")[0]] += 1
        if not r.fired:
            s["unfired"].append(f"#{n} {kind}")
        if r.errors:
            hit = r.fired[0] if r.fired else f"#{n} {kind} (not fired)"
            s["broken"].append({"nth": n, "kind": kind, "hit": hit, "errors": r.errors})
        if progress:
            label = base.requests[n - 1].label if n <= len(base.requests) else "?"
            progress(f"  #{n:3d} {label:<28} {kind:<8} {'BROKEN' if r.errors else 'ok':6} "
                     f"{r.seconds:4.1f}s" + (f"  {r.errors[0][:150]}" if r.errors else ""))
    s["seconds"] = time.monotonic() - t0
    return s


def rotated(requests: int, stride: int, first: int = 1, kinds=KINDS) -> list[tuple[int, str]]:
    """Every ``stride``-th request from ``first``, each with one kind of ``kinds``, in turn
    (a short sweep touching many kinds and request types: the CI stride)."""
    return [(n, kinds[i % len(kinds)])
            for i, n in enumerate(range(first, requests + 1, stride))]


def report(s: dict) -> str:
    lines = [f"requests per healthy run: {s['requests']} ("
             + ", ".join(f"{k} {v}" for k, v in sorted(s["by_label"].items())) + ")",
             f"runs: {s['runs']} (" + ", ".join(f"{k} {v}" for k, v in s["by_kind"].items())
             + f"), fired: {s['fired']}, a failure shown by replication(): {s['reported']}, "
             f"broken: {len(s['broken'])}; {s['seconds']:.0f} s (healthy run "
             f"{s['count_seconds']:.1f} s)"]
    if s["notes"]:
        lines.append("notes: " + ", ".join(f"{k} x{v}" for k, v in s["notes"].items()))
    if s["unfired"]:
        lines.append(f"unfired (the run made fewer requests): {', '.join(s['unfired'][:20])}")
    for b in s["broken"]:
        lines.append(f"  BROKEN {b['hit']}: " + " | ".join(e[:300] for e in b["errors"][:4]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stride", type=int, default=1, help="every Nth request")
    ap.add_argument("--start", type=int, default=1, help="the first request number faulted")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--attempts", type=int, default=1,
                    help="the client's max_attempts (1: every fault reaches walstore)")
    ap.add_argument("--only", nargs="*", default=None, help="N:KIND cases only")
    ap.add_argument("--rotate", action="store_true",
                    help="one kind per request, the kinds in turn (the CI stride)")
    ap.add_argument("--single", action="store_true",
                    help="fault one attempt only (the client's retry goes through)")
    ap.add_argument("--count", action="store_true", help="only the healthy counting run")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="walstore-replsweep-")
    server = S3Server()
    try:
        if args.count:
            r = count(server, scratch, args.attempts)
            for q in r.requests:
                print(f"  #{q.n:3d} {q.label:<30} {q.key}")
            print(f"{len(r.requests)} requests, {r.seconds:.1f} s: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(Counter(
                      q.label for q in r.requests).items())))
            return
        only = None
        if args.only:
            only = [(int(x.split(":")[0]), x.split(":")[1]) for x in args.only]
        s = sweep(server, scratch, args.stride, args.kinds, args.attempts, args.start, only,
                  progress=lambda m: print(m, flush=True), verbose=args.verbose,
                  single=args.single, rotate=args.rotate)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(report(s))
    sys.exit(1 if s["broken"] else 0)


if __name__ == "__main__":
    main()
