"""Audit 56, replication to S3 and restore from it (moto's server over HTTP, no mocks;
real processes for the CLI).

Findings (each test named below fails on the code before its fix):

- A replica URL holding a ``#`` (or a ``?`` with nothing after it) was cut there by the
  URL parser and taken without a word: ``file:///r/rep#1`` shipped to ``/r/rep``,
  ``s3://b/agents/a1#x`` to ``b/agents/a1`` (another location than the one named; two
  URLs differing after the ``#`` named one replica), and ``walstore restore`` read from
  the cut location.  It is refused now, naming the character, before the store or the
  replica is touched
  (``test_a_replica_url_with_a_fragment_is_refused_not_cut_short``).
- An AWS profile that does not exist (``AWS_PROFILE``) or a config file the client
  cannot parse (``AWS_CONFIG_FILE``) escaped ``walstore.open(replicate_to=...)`` and
  ``walstore.restore`` as botocore's own ``ProfileNotFound`` / ``ConfigParseError`` (the
  contract: no other exception type escapes), and the CLI called it "an unexpected
  error".  The session is made inside the client set-up's guard now: a
  ``ReplicationError`` naming the cause, one line, exit 1.  A credential process that
  printed nothing left the message ending in ``": "``; it ends at the error's name now
  (``test_a_bad_aws_profile_or_config_file_is_a_replication_error``).
- An upload the server already held (an earlier attempt landed, its answer lost; the
  client's retry met If-None-Match) was compared with the object by downloading the
  object whole into memory and hashing a copy of it: a file version of N bytes (blobs
  are GiBs at times) took 2N of RAM in the shipper.  The download is hashed as it
  streams now (``test_a_blob_found_uploaded_already_is_compared_in_bounded_memory``).
- A request that could not reach the server said only "cannot reach the server", never
  which: an endpoint taken from ``AWS_ENDPOINT_URL`` (or a config file) and forgotten
  there could not be told from the intended one.  And a server that took the connection
  and never answered (a read timeout) was said to be unreachable too.  The message names
  the endpoint now (without user info), and a read timeout says the server did not answer
  within ``read_timeout``
  (``test_a_server_that_cannot_be_reached_or_does_not_answer_is_named``).
- ``walstore replicas --verify`` downloads every snapshot and restores a full copy into
  a temp directory that was named without its pid: killed (-9, the OOM killer) it stayed
  in ``$TMPDIR`` for good, a store's size each time, as no sweep knew its name (a
  restore's and a follower's scratch are swept once their process is gone).  It is named
  ``walstore-verify-<pid>-...`` now and swept like those
  (``test_a_killed_verify_leaves_no_scratch_copy_behind``).
- ``sync_replica`` timing out before its shipper had ever read the replica's manifest
  (the server unreachable since the open) said the replica "holds the log up to LSN 0,
  N bytes short": false of a replica holding nearly all of it, an operator told the
  replica was empty.  It says the replica was not reached yet and its position is not
  known (``test_a_sync_before_the_replica_was_ever_reached_claims_no_position``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

import walstore
from store_support import CLI, cli_env


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env={**cli_env(), **env},
                          timeout=timeout)


# (a CLI process's sleeps cut to 10 ms at most: retries against a server that is not there)
_SHORT_SLEEPS = ("import time\n_sleep = time.sleep\n"
                 "time.sleep = lambda s: _sleep(min(s, 0.01))\n")


def test_a_replica_url_with_a_fragment_is_refused_not_cut_short(s3_endpoint, tmp_path):  # noqa: F811,E501
    replica = make_s3_replica(s3_endpoint)
    rep = tmp_path / "rep"
    for url, opts in ((f"file://{rep}#1", {"interval": 0.05}),
                      (f"file://{rep}?", {"interval": 0.05}),
                      (replica.url + "#x", replica.opts())):
        path = str(tmp_path / "src")
        with pytest.raises(walstore.ReplicationError, match="#|[?]"):
            walstore.open(path, replicate_to=url, replicate_options=opts)
        assert not os.path.exists(path)
        assert not rep.exists()
        assert replica.keys() == []
    # a restore from such a URL does not read the cut location's replica
    with walstore.open(str(tmp_path / "s2"), replicate_to=f"file://{rep}",
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica(timeout=30)
    r = cli("restore", f"file://{rep}#old", tmp_path / "dest")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "#" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "dest").exists()


def test_a_bad_aws_profile_or_config_file_is_a_replication_error(s3_endpoint, tmp_path,  # noqa: F811,E501
                                                                   monkeypatch):
    replica = make_s3_replica(s3_endpoint)
    with walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                       replicate_options=replica.opts()) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica(timeout=30)
    bad_cfg = tmp_path / "config"
    bad_cfg.write_text("[default\nregion = us-east-1\n")
    for var, value, cause in (("AWS_PROFILE", "no-such-profile", "ProfileNotFound"),
                              ("AWS_CONFIG_FILE", str(bad_cfg), "ConfigParseError")):
        with monkeypatch.context() as mp:
            mp.setenv(var, value)
            with pytest.raises(walstore.ReplicationError, match=cause):
                walstore.open(str(tmp_path / "other"), replicate_to=replica.url + "-2",
                              replicate_options=replica.opts())
            with pytest.raises(walstore.ReplicationError, match=cause):
                walstore.restore(replica.url, str(tmp_path / "d"), None, replica.opts())
            assert not (tmp_path / "d").exists()
        walstore.open(str(tmp_path / "other")).close()  # (not left locked)
        for args in (("replicas", replica.url), ("restore", replica.url, tmp_path / "d2")):
            r = cli(*args, *replica.cli_args(), **{var: value})
            assert r.returncode == 1, (r.returncode, r.stderr)
            assert cause in r.stderr and "unexpected" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "Traceback" not in r.stderr
    # a credential process that fails saying nothing: the message does not end in ": "
    proc_cfg = tmp_path / "proc"
    proc_cfg.write_text("[default]\ncredential_process = /bin/false\n")
    env = {k: v for k, v in cli_env().items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    r = subprocess.run([sys.executable, "-c", CLI, "replicas", replica.url,
                        *replica.cli_args()], capture_output=True, text=True,
                       env={**env, "AWS_CONFIG_FILE": str(proc_cfg)}, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "CredentialRetrievalError" in r.stderr, r.stderr
    assert not r.stderr.rstrip("\n").endswith(":"), r.stderr


_BLOB_CHILD = r"""
import gc, hashlib, os, sys, tracemalloc
import boto3, walstore
path, ws_dir, url, endpoint, bucket, key_prefix = sys.argv[1:7]
opts = {"endpoint_url": endpoint, "interval": 3600, "max_backoff": 0.5}
os.mkdir(ws_dir)
s = walstore.open(path, replicate_to=url, replicate_options=opts)
ws = s.workspace(ws_dir)
with s.transaction() as tx:
    tx.files(ws).write("first.txt", "first\n")
s.sync_replica(60)  # (the shipper has listed blobs/: it does not know of the next)
content = os.urandom(24 << 20)
digest = hashlib.sha256(content).hexdigest()
# the earlier upload that landed with its answer lost: the same bytes under the name
boto3.client("s3", endpoint_url=endpoint).put_object(
    Bucket=bucket, Key=key_prefix + "/blobs/" + digest, Body=content)
with s.transaction() as tx:
    tx.files(ws).write("big.bin", content)
del content
gc.collect()
tracemalloc.start()
s.sync_replica(120)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
st = s.replication()
s.close()
print(peak, st.last_error, digest)
"""


def test_a_blob_found_uploaded_already_is_compared_in_bounded_memory(s3_endpoint,  # noqa: F811
                                                                      tmp_path):
    replica = make_s3_replica(s3_endpoint)
    bucket, _, prefix = replica.url[len("s3://"):].partition("/")
    r = subprocess.run([sys.executable, "-c", _BLOB_CHILD, str(tmp_path / "src"),
                        str(tmp_path / "ws"), replica.url, s3_endpoint, bucket, prefix],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    peak, err, digest = r.stdout.split()
    assert err == "None", r.stdout
    assert int(peak) < 8 << 20, f"the shipper's sync took {int(peak) >> 20} MiB"
    walstore.restore(replica.url, str(tmp_path / "copy"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "copy")) as c:
        data = c.at(c.log()[0].txid).files(c.workspaces()[0]).read("big.bin")
        assert hashlib.sha256(data).hexdigest() == digest


def test_a_server_that_cannot_be_reached_or_does_not_answer_is_named(s3_endpoint,  # noqa: F811
                                                                      tmp_path, monkeypatch):
    import socket
    from urllib.parse import urlsplit
    from test_replication_support import Proxy
    replica = make_s3_replica(s3_endpoint)
    with walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                       replicate_options=replica.opts()) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica(timeout=30)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # (nothing listens there now)
    # (the endpoint from the env; the CLI's retries of a refused connection, walstore's
    # 5 x botocore's 3 with their backoff, slept 10-13 s before the one line: this child
    # sleeps at most 10 ms at a time.  The one-shot verbs try it once now:
    # test_s3_one_shot.py)
    r = subprocess.run([sys.executable, "-c", _SHORT_SLEEPS + CLI, "replicas", replica.url],
                       capture_output=True, text=True, timeout=60,
                       env={**cli_env(), "AWS_ENDPOINT_URL": dead})
    assert r.returncode == 1, r.stderr
    assert f"cannot reach the server at {dead}" in r.stderr, r.stderr
    u = urlsplit(s3_endpoint)
    proxy = Proxy((u.hostname, u.port))
    try:
        proxy.pause()  # (connections taken, never answered)
        # (restore's 5 attempts of the manifest, each timed out, 10 ms apart, not 0.2-1.6 s)
        import types
        restore_module = sys.modules["walstore.replication.restore"]
        short = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                         if not k.startswith("__")})
        short.sleep = lambda s: time.sleep(min(s, 0.01))
        monkeypatch.setattr(restore_module, "time", short)
        with pytest.raises(walstore.ReplicationError) as e:
            walstore.restore(replica.url, str(tmp_path / "d"), None,
                             replica.opts(endpoint_url=proxy.url, read_timeout=0.3,
                                          max_attempts=1))
        assert "did not answer within the read timeout (0.3 s)" in str(e.value), e.value
        assert proxy.url in str(e.value) and "cannot reach" not in str(e.value)
        assert not (tmp_path / "d").exists()
    finally:
        proxy.close()


class _StallWal:
    """A TCP proxy to the S3 server that forwards everything until a request for a
    ``/wal/`` object comes, then holds that connection (no byte moves either way)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket
        import threading
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stalled = threading.Event()
        self.closed = False
        self.socks: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, c, u) -> None:
        import select
        try:
            while True:
                r, _, _ = select.select([c, u], [], [], 0.1)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is c and data.startswith(b"GET ") and b"/wal/" in data.split(b"\r\n")[0]:
                        self.stalled.set()
                        while not self.closed:  # (held: no answer ever comes)
                            import time
                            time.sleep(0.1)
                        return
                    (u if s is c else c).sendall(data)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def test_a_killed_verify_leaves_no_scratch_copy_behind(s3_endpoint, tmp_path):  # noqa: F811
    import signal
    import time
    from urllib.parse import urlsplit
    replica = make_s3_replica(s3_endpoint)
    with walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                       replicate_options=replica.opts()) as s:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 1000)
        s.sync_replica(timeout=30)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**cli_env(), "TMPDIR": str(scratch)}
    u = urlsplit(s3_endpoint)
    proxy = _StallWal((u.hostname, u.port))
    p = subprocess.Popen([sys.executable, "-c", CLI, "replicas", replica.url, "--verify",
                          "--endpoint-url", proxy.url], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proxy.stalled.wait(60), "the verify never asked for a WAL object"
        left = [n for n in os.listdir(scratch) if n.startswith("walstore-verify-")]
        assert left, os.listdir(scratch)  # (its scratch, made before the WAL is read)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        proxy.close()
    assert [n for n in os.listdir(scratch) if n.startswith("walstore-verify-")] == left
    # the next verify (another process) sweeps what the dead one left
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", CLI, "replicas", replica.url, "--verify",
                        *replica.cli_args()], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 120
    assert [n for n in os.listdir(scratch) if n.startswith("walstore-verify-")] == []


def test_a_sync_before_the_replica_was_ever_reached_claims_no_position(s3_endpoint,  # noqa: F811
                                                                       tmp_path):
    import socket
    replica = make_s3_replica(s3_endpoint)
    path = str(tmp_path / "src")
    with walstore.open(path, replicate_to=replica.url, replicate_options=replica.opts()) as s:
        for i in range(10):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.sync_replica(timeout=30)
        shipped = s.replication().shipped_lsn
    assert shipped > 0
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with walstore.open(path, replicate_to=replica.url,
                       replicate_options=replica.opts(endpoint_url=dead, max_attempts=1,
                                                      connect_timeout=0.5)) as s:
        with s.transaction() as tx:
            tx.put("late", 1)
        with pytest.raises(walstore.ReplicationError) as e:
            s.sync_replica(timeout=1.5)
        msg = str(e.value)
        assert "up to LSN 0" not in msg, msg
        assert "not reached yet" in msg and "cannot reach the server" in msg, msg
