"""Audit 59, replication and restore as an operator meets them (moto's S3 server run as a
real process, ``moto_server``; the command line run as real processes; no mocks).

Findings (each test named below fails on the code before its fix):

- A restore point whose name reads as a time (an agent naming its points by their ISO
  timestamps) was restored by ``walstore restore --to NAME`` to that *time*, not to the
  point: another state, exit 0, while ``walstore rewind --to NAME`` (and ``replicas``,
  which shows names "as ``restore --to`` takes them back") read it as the point.  A
  ``--to`` text naming a restore point the replica holds is that point now; a time is
  still a time when no point has that exact name
  (``test_restore_to_a_point_whose_name_reads_as_a_time_restores_the_point``).
- ``walstore restore --compensate`` whose compensation raised (retried, then ``failed``)
  printed "pending compensation ..." without its state or error, and advised "rerun with
  --compensate --handlers MODULE" (a rerun into DEST is refused: not empty); without
  ``--compensate`` the same advice could not be followed either.  The failure is printed
  with its error (``--json``: ``error``), and the advice names what works: ``walstore
  recover DEST --handlers MODULE`` after a ``--compensate``, an empty destination without
  (``test_restore_compensate_says_which_compensation_failed_and_how_to_retry``,
  ``test_restore_without_compensate_gives_advice_that_can_be_followed``).
- A restore to a txid, a time or an LSN from before the replica's oldest snapshot (its
  retention dropped what came before, or replication began later) was refused as if the
  replica had never held it: "not among the commits the replica's WAL holds (LSN 0..N)"
  of a WAL retention had emptied (it holds nothing from 0), "before the first commit the
  replica holds", "no snapshot at or before LSN 1".  Each says where the replica's
  history begins and why now, as a restore point's refusal did
  (``test_a_point_retention_dropped_is_refused_naming_retention_not_as_never_held``).
- One writer per replica rested on the server enforcing If-None-Match / If-Match, and
  nothing checked that it did: behind a server that ignores them (an S3-compatible server
  without conditional writes; here a proxy removing the headers in front of moto), of 4
  stores started together at one new replica 3 took the lease and shipped, each
  ``sync_replica`` returning, one replica holding one store's commits.  Having taken the
  lease, an ``s3://`` writer now PUTs it again with If-None-Match and with If-Match on a
  wrong etag; either taken, it lets the lease go and is refused, naming the server
  (``test_a_server_ignoring_conditional_writes_is_refused_not_shared``).
- A process that closed its store while the server was unreachable (the lease could not
  be released) and lived on kept every other process from opening that very store with
  ``replicate_to=`` for the whole lease (600 s): ``open`` raised "being written by another
  writer".  The lease now says whether its holder shipped from inside the store's writer
  process (``inproc``); one that did is taken over by a writer of the same store, path and
  host that holds the store's lock (an external shipper is still refused)
  (``test_a_store_closed_during_an_outage_can_be_reopened_by_another_process``).
"""
from __future__ import annotations

import datetime as dt
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

import walstore
from store_support import CLI, cli_env

boto3 = pytest.importorskip("boto3")

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "AKIAAUDIT59KEYID0001",
            "AWS_SECRET_ACCESS_KEY": "audit59/Secret+DoNotLeak0123456789",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoProcess:
    """moto's S3 server in its own process (``moto_server``): killed and started again by
    tests that need the server gone for a while (its state goes with it)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable),
                                                          "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture(scope="module")
def moto():
    if shutil.which("moto_server") is None and not os.path.exists(
            os.path.join(os.path.dirname(sys.executable), "moto_server")):
        pytest.skip("moto_server not installed")
    saved = {k: os.environ.get(k) for k in FAKE_ENV}
    os.environ.update(FAKE_ENV)
    m = MotoProcess()
    m.start()
    yield m
    m.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class StripProxy:  # noqa: D101
    """A TCP proxy that removes If-Match / If-None-Match from every request head: an
    S3-compatible server that ignores conditional writes, as older ones do."""
    STRIP = (b"if-match:", b"if-none-match:")

    def __init__(self, upstream):
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.stripped = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        u = None
        try:
            u = socket.create_connection(self.upstream)
            buf = b""
            while True:  # one request after another on this connection
                while b"\r\n\r\n" not in buf:
                    r, _, _ = select.select([c, u], [], [], 30)
                    if not r:
                        return
                    if u in r:
                        data = u.recv(65536)
                        if not data:
                            return
                        c.sendall(data)
                    if c in r:
                        data = c.recv(65536)
                        if not data:
                            return
                        buf += data
                head, rest = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                kept = [ln for ln in lines if not ln.lower().startswith(self.STRIP)]
                self.stripped += len(lines) - len(kept)
                u.sendall(b"\r\n".join(kept) + b"\r\n\r\n")
                length = 0
                for ln in kept[1:]:
                    k, _, v = ln.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                # the body goes through as it is; the response comes back as it is
                body, buf = rest[:length], rest[length:]
                u.sendall(body)
                need = length - len(body)
                while True:  # the rest of the body up, the answer down
                    r, _, _ = select.select([c, u], [], [], 30)
                    if not r:
                        return
                    if u in r:
                        data = u.recv(65536)
                        if not data:
                            return
                        c.sendall(data)
                    if c in r:
                        data = c.recv(65536)
                        if not data:
                            return
                        if need > 0:
                            u.sendall(data[:need])
                            buf += data[need:]
                            need -= min(need, len(data))
                        else:
                            buf += data
                            if b"\r\n\r\n" in buf:
                                break
        except OSError:
            pass
        finally:
            for s in (c, u):
                try:
                    s and s.close()
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.listener.close()


def new_bucket(endpoint: str) -> str:
    b = "audit59-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=b)
    return b


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True,
                          text=True, env=cli_env(), timeout=timeout)


# ---- a restore point whose name reads as a time --------------------------------------------

def test_restore_to_a_point_whose_name_reads_as_a_time_restores_the_point(moto, tmp_path):
    url = f"s3://{new_bucket(moto.url)}/agents/a1"
    opts = {"endpoint_url": moto.url, "interval": 0.05, "max_backoff": 0.5}
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        name = dt.datetime.now(dt.timezone.utc).isoformat()  # the agent's naming
        time.sleep(0.01)
        with s.transaction() as tx:
            tx.put("a", 2)
        s.restore_point(name)
        with s.transaction() as tx:
            tx.put("a", 3)
        s.sync_replica(30)
        assert s.at(name).get("a") == 2
    # rewind --to reads it as the point; so must restore --to
    dest = tmp_path / "d"
    p = cli("restore", url, dest, "--to", name, "--endpoint-url", moto.url)
    assert p.returncode == 0, p.stderr
    assert "restore point" in p.stdout, p.stdout
    with walstore.open(str(dest)) as r:
        assert r.get("a") == 2
        assert name in r.restore_points()
    # the same time spelt another way (no point has that name) is still a time
    when = name.replace("+00:00", "Z")
    dest2 = tmp_path / "d2"
    p = cli("restore", url, dest2, "--to", when, "--endpoint-url", moto.url)
    assert p.returncode == 0, p.stderr
    with walstore.open(str(dest2)) as r:
        assert r.get("a") == 1
    # the Python API keeps its types: a str is a name, a datetime a time
    walstore.restore(url, str(tmp_path / "d3"), to=name, replicate_options=opts)
    with walstore.open(str(tmp_path / "d3")) as r:
        assert r.get("a") == 2


# ---- restore --compensate: a compensation that fails --------------------------------------

HANDLERS = '''
def refund(action):
    raise RuntimeError("payments API is down")

def release(action):
    pass

COMPENSATORS = {"refund": refund, "release": release}
'''


def _store_with_an_action_in_flight_at(path: str, url: str, opts: dict) -> None:
    with walstore.open(path, replicate_to=url, replicate_options=opts,
                       compensators={"refund": lambda a: None,
                                     "release": lambda a: None}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        tx = s.transaction()
        tx.put("order", 1)
        with tx.action("hold", args={"n": 1}, compensate="release") as act:
            act.result = 1
        with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
            act.result = {"charge_id": "ch_1"}
        s.restore_point("mid")
        tx.commit()
        s.sync_replica(30)


def test_restore_compensate_says_which_compensation_failed_and_how_to_retry(moto, tmp_path):
    url = f"s3://{new_bucket(moto.url)}/agents/a1"
    opts = {"endpoint_url": moto.url, "interval": 0.05, "max_backoff": 0.5}
    _store_with_an_action_in_flight_at(str(tmp_path / "src"), url, opts)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "audit59_handlers.py").write_text(HANDLERS)
    env = {**cli_env()}
    env["PYTHONPATH"] = str(tmp_path / "h") + os.pathsep + env["PYTHONPATH"]
    dest = tmp_path / "d"
    p = subprocess.run([sys.executable, "-c", CLI, "restore", url, str(dest), "--to", "mid",
                        "--compensate", "--handlers", "audit59_handlers", "--endpoint-url",
                        moto.url], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    out = p.stdout + p.stderr
    # the failure and its cause are named; the advice is one that can be followed (a
    # rerun of the restore into DEST is refused: DEST is not empty)
    assert "payments API is down" in out, out
    assert "failed" in out, out
    assert "rerun with --compensate" not in out, out
    assert f"walstore recover {dest}" in out, out
    p = subprocess.run([sys.executable, "-c", CLI, "restore", url, str(tmp_path / "dj"),
                        "--to", "mid", "--compensate", "--handlers", "audit59_handlers",
                        "--endpoint-url", moto.url, "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    import json
    doc = json.loads(p.stdout)
    (failed,) = doc["pending_compensations"]
    assert failed["name"] == "charge" and failed["state"] == "failed"
    assert "payments API is down" in failed["error"]


def test_restore_without_compensate_gives_advice_that_can_be_followed(moto, tmp_path):
    url = f"s3://{new_bucket(moto.url)}/agents/a1"
    opts = {"endpoint_url": moto.url, "interval": 0.05, "max_backoff": 0.5}
    _store_with_an_action_in_flight_at(str(tmp_path / "src"), url, opts)
    dest = tmp_path / "d"
    p = cli("restore", url, dest, "--to", "mid", "--endpoint-url", moto.url)
    assert p.returncode == 1, p.stderr
    # "rerun with --compensate" into DEST is refused (not empty): the advice names an
    # empty destination
    assert "empty" in p.stderr, p.stderr
    again = cli("restore", url, dest, "--to", "mid", "--compensate", "--endpoint-url",
                moto.url)
    assert again.returncode == 2 and "not empty" in again.stderr


# ---- retention: a refusal says where the replica's history begins -------------------------

def test_a_point_retention_dropped_is_refused_naming_retention_not_as_never_held(moto,
                                                                                  tmp_path):
    url = f"s3://{new_bucket(moto.url)}/agents/a1"
    opts = {"endpoint_url": moto.url, "interval": 0.05, "max_backoff": 0.5,
            "snapshot_interval": 0, "retention_seconds": 0, "retain_snapshots": 1,
            "delete_grace": 0}
    path = str(tmp_path / "src")
    with walstore.open(path, replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        first = s.log()[0]
        for i in range(3):
            with s.transaction() as tx:
                tx.put("a", i + 2)
            s.sync_replica(30)
    # a new shipper runs retention in its first round (then at most once a minute)
    with walstore.open(path, replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("a", 9)
        s.sync_replica(30)
    from walstore.replication import replicas
    assert min(x["lsn"] for x in replicas(url, replicate_options=opts)["snapshots"]) > 0
    when = dt.datetime.fromtimestamp(first.timestamp, dt.timezone.utc)
    for to in (first.txid, when, walstore.LSN(0)):
        with pytest.raises(walstore.ReplicationError) as e:
            walstore.restore(url, str(tmp_path / "r"), to=to, replicate_options=opts)
        msg = str(e.value)
        assert "history begins at LSN" in msg and "retention" in msg, msg
        assert "LSN 0.." not in msg, msg
        assert not (tmp_path / "r").exists()
    # the command line says it too (exit 2: --to names nothing the replica holds)
    p = cli("restore", url, tmp_path / "r", "--to", f"tx:{first.txid}", "--endpoint-url",
            moto.url)
    assert p.returncode == 2 and "retention" in p.stderr, p.stderr


# ---- a server that ignores conditional writes ---------------------------------------------

def test_a_server_ignoring_conditional_writes_is_refused_not_shared(moto, tmp_path):
    """One writer per replica rests on the server refusing a PUT with If-None-Match on an
    object that exists, and with If-Match on another etag.  A server that ignores them
    (an S3-compatible server without conditional writes) let every racing store take
    the lease and ship: several stores' sync_replica returned, one replica.  The lease
    is checked to be enforced when taken; a server that does not is refused, naming it."""
    proxy = StripProxy(("127.0.0.1", moto.port))
    try:
        url = f"s3://{new_bucket(moto.url)}/agents/a1"
        opts = {"endpoint_url": proxy.url, "interval": 0.05, "max_backoff": 0.5}
        with pytest.raises(walstore.ReplicationError, match="conditional") as e:
            walstore.open(str(tmp_path / "s1"), replicate_to=url, replicate_options=opts)
        assert "If-None-Match" in str(e.value) or "If-Match" in str(e.value)
        assert proxy.stripped > 0
        # the lease it wrote is let go of: through a server that honours the conditions
        # (moto itself) the store replicates at once
        with walstore.open(str(tmp_path / "s1"), replicate_to=url,
                           replicate_options=dict(opts, endpoint_url=moto.url)) as s:
            with s.transaction() as tx:
                tx.put("a", 1)
            s.sync_replica(30)
        # the command line: one line, exit 1
        walstore.open(str(tmp_path / "s2")).close()
        p = cli("replicate", tmp_path / "s2", f"s3://{new_bucket(moto.url)}/x", "--once",
                "--endpoint-url", proxy.url)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert "conditional" in p.stderr and "Traceback" not in p.stderr
    finally:
        proxy.close()


# ---- a store closed during an outage, reopened by another process -------------------------

CLOSER = '''
import sys, time, walstore
path, url, endpoint = sys.argv[1:4]
opts = {"endpoint_url": endpoint, "interval": 0.05, "max_backoff": 0.5, "read_timeout": 1,
        "max_attempts": 1}
s = walstore.open(path, replicate_to=url, replicate_options=opts)
with s.transaction() as tx:
    tx.put("a", 1)
s.sync_replica(30)
print("synced", flush=True)
sys.stdin.readline()  # the server is unreachable now
s.close()             # (the lease cannot be released)
print("closed", flush=True)
sys.stdin.readline()  # this process lives on, the store closed
'''


def test_a_store_closed_during_an_outage_can_be_reopened_by_another_process(moto, tmp_path):
    """A process that closed its store while the server was unreachable (its lease not
    released) and lives on (a service handing the store to a worker process) kept every
    other process from opening that very store with replicate_to= for the whole lease
    (600 s): open raised "being written by another writer", naming the process that had
    closed it.  The opener holds the store's lock, so a holder that shipped from inside the
    store's writer process (the lease says so) has closed it: it is taken over at once.
    An external shipper (`walstore replicate`, which holds no store lock) is still
    refused, as is a live writer of another store."""
    from test_replication_support import Proxy
    proxy = Proxy(("127.0.0.1", moto.port))
    url = f"s3://{new_bucket(moto.url)}/agents/a1"
    path = str(tmp_path / "src")
    p1 = subprocess.Popen([sys.executable, "-c", CLOSER, path, url, proxy.url],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=cli_env())
    try:
        assert p1.stdout.readline().strip() == "synced"
        proxy.pause()
        p1.stdin.write("\n")
        p1.stdin.flush()
        assert p1.stdout.readline().strip() == "closed"
        proxy.resume()
        assert p1.poll() is None  # alive, its store closed
        opts = {"endpoint_url": moto.url, "interval": 0.05, "max_backoff": 0.5}
        with walstore.open(path, replicate_to=url, replicate_options=opts) as s:
            with s.transaction() as tx:
                tx.put("a", 2)
            s.sync_replica(30)
            assert s.replication().state == "running"
            # while it ships, an external shipper of the same store is refused
            p = cli("replicate", path, url, "--once", "--endpoint-url", moto.url)
            assert p.returncode == 1 and "another writer" in p.stderr, p.stderr
        dest = str(tmp_path / "r")
        walstore.restore(url, dest, replicate_options=opts)
        with walstore.open(dest) as r:
            assert r.get("a") == 2
    finally:
        p1.kill()
        p1.wait(30)
        proxy.close()
