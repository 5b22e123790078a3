"""An operator's one-shot command against an S3 endpoint where nothing listens
(``walstore/replication/targets.py``'s ``one_shot_requests``): ``replicas``, ``restore``
and ``replicate --once`` make one connection attempt and fail with the one-line error;
they made 15 (walstore's 5 attempts times the client's 3, with their backoff: 10-13 s).
A client outside one-shot use (the shipper, a follower, the library) retries a refused
connection as before, and so does a one-shot client once the server has answered it (a
restart mid-restore).  The CLI runs in a subprocess, its connection attempts counted by
a wrapper of ``socket.connect`` in that process; the S3 server is moto's, over HTTP.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from test_replication_support import FAKE_ENV, Proxy, make_s3_replica, s3_endpoint  # noqa: F401

import walstore
from store_support import CLI, cli_env
from walstore.replication import open_target
from walstore.replication.options import ReplicateOptions
from walstore.replication.targets import TargetError, one_shot_requests

# the CLI, its connection attempts to port DEAD_PORT counted into the file COUNT_FILE
COUNTED_CLI = r"""
import atexit, os, socket
_connect, _port, _tried = socket.socket.connect, int(os.environ["DEAD_PORT"]), []
def connect(self, address, *a):
    if isinstance(address, tuple) and address[1] == _port:
        _tried.append(address)
    return _connect(self, address, *a)
socket.socket.connect = connect
atexit.register(lambda: open(os.environ["COUNT_FILE"], "w").write(str(len(_tried))))
""" + CLI


def _dead_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # (nothing listens there now)
    return port


@pytest.mark.parametrize("verb", ["replicas", "restore", "replicate --once"])
def test_a_one_shot_verb_tries_a_refused_connection_once(verb, tmp_path):
    port = _dead_port()
    dead = f"http://127.0.0.1:{port}"
    url = "s3://walstore-nothing-there/agents/a1"
    if verb == "replicas":
        args = ["replicas", url]
    elif verb == "restore":
        args = ["restore", url, str(tmp_path / "dest")]
    else:
        walstore.open(str(tmp_path / "s")).close()
        args = ["replicate", str(tmp_path / "s"), url, "--once"]
    count = tmp_path / "connects"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", COUNTED_CLI, *args, "--endpoint-url", dead],
                       capture_output=True, text=True, timeout=120,
                       env={**cli_env(), **FAKE_ENV, "DEAD_PORT": str(port),
                            "COUNT_FILE": str(count)})
    print(f"{verb}: {time.monotonic() - t0:.2f} s")  # (shown with -s; never asserted)
    assert r.returncode == 1, r.stderr
    key = "lease" if verb.startswith("replicate") else "manifest"
    assert r.stderr == (f"walstore: GET {url}/{key}: EndpointConnectionError: cannot reach "
                        f"the server at {dead}\n"), r.stderr
    assert r.stdout == ""
    assert count.read_text() == "1"  # (15 for replicas and restore, 3 for replicate --once)
    assert not (tmp_path / "dest").exists()


def test_a_refused_connection_is_retried_outside_one_shot_use_or_once_answered(
        s3_endpoint):  # noqa: F811
    rep = make_s3_replica(s3_endpoint)
    dead = f"http://127.0.0.1:{_dead_port()}"
    # the shipper's and a follower's client (and the library's): retried, transient
    _refused(open_target(rep.url, ReplicateOptions.from_any(
        rep.opts(endpoint_url=dead, max_attempts=2))), attempts=2, transient=True)
    # a one-shot client (a `restore` under way) whose server answered, then went away
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    with one_shot_requests():
        t = open_target(rep.url, ReplicateOptions.from_any(
            rep.opts(endpoint_url=f"http://127.0.0.1:{proxy.port}", max_attempts=2)))
    try:
        assert t.get("manifest", 1 << 20) is None  # (answered: 404)
        proxy.close()  # (its port refuses connections now)
        before = sum(t.requests.values())
        with pytest.raises(TargetError, match="cannot reach the server|broke off") as e:
            t.get("manifest", 1 << 20)
        assert e.value.transient and sum(t.requests.values()) - before == 2, t.requests
    finally:
        t.close()
        proxy.close()


def test_a_client_made_after_the_server_answered_the_command_retries_too(
        s3_endpoint):  # noqa: F811
    """A one-shot command makes a second client after the server answered its first (a
    restore's attempt again, an object it needed dropped meanwhile by the replica's
    writer: ``restore``'s ``_ObjectGone`` retry opens a new target): the server answered
    this command, so its restart then is retried.  The new client, never answered
    itself, gave up at once, and the restore failed on a server restarting."""
    rep = make_s3_replica(s3_endpoint)
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    opts = ReplicateOptions.from_any(rep.opts(endpoint_url=f"http://127.0.0.1:{proxy.port}",
                                              max_attempts=2))
    try:
        with one_shot_requests():
            first = open_target(rep.url, opts)
            try:
                assert first.get("manifest", 1 << 20) is None  # (answered: 404)
            finally:
                first.close()
            proxy.close()  # (its port refuses connections now: a restart)
            second = open_target(rep.url, opts)
            try:
                with pytest.raises(TargetError, match="cannot reach the server") as e:
                    second.get("manifest", 1 << 20)
                assert e.value.transient and sum(second.requests.values()) == 2, \
                    (e.value.transient, second.requests)
            finally:
                second.close()
        with one_shot_requests():  # (another command: never answered, tried once)
            third = open_target(rep.url, opts)
            try:
                with pytest.raises(TargetError, match="cannot reach the server") as e:
                    third.get("manifest", 1 << 20)
                assert not e.value.transient and sum(third.requests.values()) == 1
            finally:
                third.close()
    finally:
        proxy.close()


def test_a_one_shot_client_gives_up_on_a_connect_timeout_too(monkeypatch):
    """A host that drops the connection's packets (here: a listener whose accept queue is
    full, so the kernel ignores further SYNs) times the connection out: a one-shot
    command tries it once, not 15 times of ``connect_timeout`` each; outside one-shot use
    it is retried as before."""
    for name, value in FAKE_ENV.items():
        monkeypatch.setenv(name, value)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    held = []
    try:
        for _ in range(4):  # (fill the accept queue: what the kernel still completes)
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(listener.getsockname())
            held.append(c)
        time.sleep(0.2)
        url = "s3://walstore-nothing-there/agents/a1"
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        opts = ReplicateOptions.from_any({"endpoint_url": endpoint, "connect_timeout": 0.3,
                                          "max_attempts": 2})
        with one_shot_requests():
            t = open_target(url, opts)
        _refused(t, attempts=1, transient=False)
        _refused(open_target(url, opts), attempts=2, transient=True)
    finally:
        for c in held:
            c.close()
        listener.close()


def _refused(t, attempts: int, transient: bool) -> None:
    """``t``'s GET of the manifest fails "cannot reach the server" after ``attempts``
    requests, its error transient (retried by walstore) or not; ``t`` closed."""
    try:
        with pytest.raises(TargetError, match="cannot reach the server") as e:
            t.get("manifest", 1 << 20)
        assert e.value.transient is transient and sum(t.requests.values()) == attempts, (
            e.value.transient, t.requests)
    finally:
        t.close()
