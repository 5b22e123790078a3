"""Test support for replication: a real S3 server (moto's), replica fixtures for s3:// and
file://, a pausable TCP proxy, and helpers comparing stores.  No mock of boto3 anywhere:
every S3 request goes over HTTP to the server.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import uuid

import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

import walstore  # noqa: E402
from walstore.replication import open_target  # noqa: E402

SECRET_KEY_ID = "AKIAREPLTESTKEYID0001"
SECRET_KEY = "replsecret/Zq9SECRETVALUEdonotleak"
FAKE_ENV = {"AWS_ACCESS_KEY_ID": SECRET_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_endpoint():
    os.environ.update(FAKE_ENV)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Replica:
    """One replica location: ``url``, ``options`` (with the endpoint for s3), and raw
    access to its objects for tests that damage or inspect them."""

    def __init__(self, kind: str, url: str, options: dict) -> None:
        self.kind, self.url, self.options = kind, url, options

    def opts(self, **kw) -> dict:
        return {**self.options, **kw}

    def target(self):
        from walstore.replication.options import ReplicateOptions
        return open_target(self.url, ReplicateOptions.from_any(self.options))

    def keys(self, prefix: str = "") -> list[str]:
        t = self.target()
        try:
            return sorted(k for k, _n in t.list(prefix))
        finally:
            t.close()

    def read(self, key: str) -> bytes:
        t = self.target()
        try:
            return t.get(key, 1 << 30)[0]
        finally:
            t.close()

    def delete(self, key: str) -> None:
        t = self.target()
        try:
            t.delete(key)
        finally:
            t.close()

    def cli_args(self) -> list[str]:
        return ["--endpoint-url", self.options["endpoint_url"]] if self.kind == "s3" else []


def make_s3_replica(endpoint: str, **extra) -> Replica:
    bucket = "walstore-" + uuid.uuid4().hex[:12]
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    c.create_bucket(Bucket=bucket)
    return Replica("s3", f"s3://{bucket}/agents/a1",
                   {"endpoint_url": endpoint, "interval": 0.05, "max_backoff": 0.5, **extra})


@pytest.fixture(params=["s3", "file"])
def replica(request, tmp_path):
    if request.param == "s3":
        return make_s3_replica(request.getfixturevalue("s3_endpoint"))
    return Replica("file", f"file://{tmp_path}/replica", {"interval": 0.05, "max_backoff": 0.5})


def rows(view) -> list:
    return list(view.scan())


def open_restored(path: str):
    return walstore.open(path)


class Proxy:
    """A TCP proxy in front of a server: ``pause()`` stops forwarding (requests hang, as
    behind a dead link), ``resume()`` drops the stuck connections and forwards again,
    ``cut_above(n)`` drops any connection once it carried more than n bytes upstream
    (an upload interrupted mid-body), ``cut_replies(above, left)`` breaks off the next
    ``left`` replies once each carried ``above`` bytes back (a download cut mid-body, the
    server's side: half the last chunk forwarded)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.running = threading.Event()
        self.running.set()
        self.cut: int | None = None
        self.cuts = 0
        self.reply_above, self.replies_left, self.replies_cut = 0, 0, 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, c: socket.socket, u: socket.socket) -> None:
        up_bytes = down_bytes = 0
        try:
            while not self.closed:
                r, _, _ = select.select([c, u], [], [], 0.1)
                if not self.running.is_set():
                    continue  # paused: nothing moves
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is c:
                        up_bytes += len(data)
                        if self.cut is not None and up_bytes > self.cut:
                            u.sendall(data[: max(0, len(data) - 1024)])
                            self.cuts += 1
                            return
                        u.sendall(data)
                        continue
                    down_bytes += len(data)
                    with self.lock:
                        cut = self.replies_left > 0 and down_bytes > self.reply_above
                        if cut:
                            self.replies_left -= 1
                            self.replies_cut += 1
                    if cut:
                        c.sendall(data[: len(data) // 2])
                        return
                    c.sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket drop_all closed
            pass
        finally:
            for s in (c, u):
                try:
                    s.close()
                except OSError:
                    pass

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.drop_all()
        self.running.set()

    def cut_above(self, n: int | None) -> None:
        self.cut = n

    def cut_replies(self, above: int, left: int) -> None:
        with self.lock:
            self.reply_above, self.replies_left = above, left

    def drop_all(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.drop_all()


def follower_thread(replica: Replica, dest: str, stop, rounds: list, apply_every: float
                    ) -> threading.Thread:
    """A ``restore --follow`` of ``replica`` into ``dest`` in a thread (not started):
    ``rounds`` collects each round's info; set ``stop`` to end it."""
    from walstore.replication import follow
    return threading.Thread(target=follow, args=(replica.url, dest, replica.options),
                            kwargs={"stop": stop, "interval": 0.05,
                                    "apply_every": apply_every, "on_round": rounds.append})


def one_shipped_commit(path: str, url: str, options) -> walstore.Store:
    """A store at ``path`` replicating to ``url`` with one commit (a = 1) shipped."""
    s = walstore.open(path, replicate_to=url, replicate_options=options)
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
    except BaseException:
        s.close()
        raise
    return s


def behind_proxy(s3_endpoint: str, path: str, **extra):
    """(proxy, replica, store): a store at ``path`` replicating to moto through a
    pausable proxy (one attempt a request, long reads), with one commit shipped."""
    host, port = s3_endpoint.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    rep = make_s3_replica(s3_endpoint)
    s = one_shipped_commit(path, rep.url, rep.opts(endpoint_url=proxy.url, max_attempts=1,
                                                    read_timeout=120, **extra))
    return proxy, rep, s

