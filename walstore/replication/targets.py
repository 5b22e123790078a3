"""Object stores replication writes to: S3-compatible (boto3) and ``file:///dir``.

Owns the one small interface the shipper, lease, restore and follower use
(:class:`ObjectStore`: get / download / put with If-None-Match or If-Match / delete /
list / cleanup of interrupted uploads / the locations enclosing one; ``WatchedTarget``
names the request in progress), its errors, URL
parsing with the bucket-name and endpoint checks (before any request), the replica's
layout (``REPLICA_DIRS``: the keys a replica owns under its URL), and the one-shot mode
of an operator's command (:func:`one_shot_requests`: a server never reached is not
retried).

Invariants:
- only complete objects are ever visible under their name (S3 does that for a PUT or a
  completed multipart upload; ``file://`` writes a temp file, fsyncs it, and links or
  renames it into place);
- conditional writes are real: ``put(if_none_match=True)`` fails with
  :class:`PreconditionFailed` when the key exists, ``put(if_match=etag)`` when it changed
  or no longer exists;
- a replica's cleanup touches only its own layout, never a replica at a URL under it;
- credentials come only from the standard AWS chain (environment, config files, roles):
  a URL carrying any is refused, and no message or stored document ever holds one;
- every length read from an object is bounded before it is allocated (``max_bytes``).
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import fcntl
import hashlib
import io
import ipaddress
import os
import re
import threading
import time
import uuid
from typing import BinaryIO, Callable, Iterator, Protocol, Union
from urllib.parse import urlsplit

from ..errors import ReplicationError
from ..fileio import remove_quietly
from . import source as _fs

Body = Union[bytes, BinaryIO]
MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024


class TargetError(ReplicationError):
    """An object store request failed; ``transient`` tells whether retrying may help."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class ManifestTooLarge(TargetError):
    """A manifest the shipper would write is larger than ``max_manifest_bytes``, the
    bound every reader of it (a restore, the next shipper) refuses past: it is not
    written (the replica keeps its last one, under the bound), and the round fails until
    retention trims it or the bound is raised.  Not transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class PreconditionFailed(TargetError):
    """A conditional write lost: the key exists (If-None-Match) or changed (If-Match)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


# inside one_shot_requests: [whether the server has answered a request of the command]
# (one list for every client the command makes); None outside
_ONE_SHOT: contextvars.ContextVar[list | None] = contextvars.ContextVar("walstore_one_shot",
                                                                       default=None)


@contextlib.contextmanager
def one_shot_requests() -> Iterator[None]:
    """An operator's one-shot command runs inside it (the CLI's ``replicas``, ``restore``
    without ``--follow``, ``replicate --once``).  An ``s3://`` target made inside gives up
    at once on a connection that cannot be made (nothing listening, an unknown host, a
    connect timeout) while the server has never answered the command: no retry of the
    client's, and the error is not transient (walstore's own retries stop too).  Those retries, 5 of
    walstore's times 3 of the client's with their backoff, took 10-13 s before the
    one-line error of a mistyped endpoint or a server that is down.  Once the server has
    answered any of the command's clients, a refused connection (it restarts
    mid-restore) is retried as ever, by those made after too (a restore's attempt again,
    an object dropped meanwhile, makes a new one: never answered itself, it gave up at
    once); and outside this (the shipper, a follower, the library's ``restore``)
    always."""
    token = _ONE_SHOT.set([False])
    try:
        yield
    finally:
        _ONE_SHOT.reset(token)


def one_shot() -> list | None:
    """Inside :func:`one_shot_requests`, the command's answered flag (``[bool]``, shared
    by its clients); None outside."""
    return _ONE_SHOT.get()


class ObjectStore(Protocol):
    url: str                    # for messages: never carries credentials
    requests: collections.Counter

    def get(self, key: str, max_bytes: int, if_none_match: str | None = None
            ) -> tuple[bytes, str] | None: ...
    def download(self, key: str, f: BinaryIO, max_bytes: int) -> tuple[int, str] | None: ...
    def put(self, key: str, body: Body, *, if_none_match: bool = False,
            if_match: str | None = None, progress: Callable[[int], None] | None = None
            ) -> str: ...
    # (``progress``: called with the bytes of ``body`` sent so far, per MiB or per part;
    # passed only when a caller asks for progress: a store without it still works)
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...
    def cleanup_uploads(self) -> int: ...
    def close(self) -> None: ...


class WatchedTarget:
    """An object store whose request in progress can be named: ``waiting()`` says which
    request (operation and key) has been waiting how long for its answer (a ``sync``
    that timed out against a server accepting connections and never answering said only
    "shipping is still in progress", and ``replication().last_error`` was None:
    probe-repl2).  Everything else is the wrapped store's."""

    def __init__(self, target: ObjectStore) -> None:
        self._target = target
        # thread ident -> (operation, key, since): blobs upload on several threads at once
        # (one slot, a hung upload was hidden once any other request ended: review44)
        self._pending: dict[int, tuple[str, str, float]] = {}

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def _call(self, op: str, key: str, fn, *args, **kw):
        me = threading.get_ident()
        self._pending[me] = (op, key, time.monotonic())
        try:
            return fn(*args, **kw)
        finally:
            self._pending.pop(me, None)

    def _oldest(self) -> tuple[str, str, float] | None:
        """The request waiting longest now, None when none is."""
        waiting = list(self._pending.values())  # (a copy: other threads add and remove)
        return min(waiting, key=lambda p: p[2]) if waiting else None

    def get(self, key: str, max_bytes: int, if_none_match: str | None = None):
        return self._call("GET", key, self._target.get, key, max_bytes, if_none_match)

    def download(self, key: str, f: BinaryIO, max_bytes: int, *args):
        return self._call("GET", key, self._target.download, key, f, max_bytes, *args)

    def put(self, key: str, body: Body, **kw) -> str:
        return self._call("PUT", key, self._target.put, key, body, **kw)

    def delete(self, key: str) -> None:
        return self._call("DELETE", key, self._target.delete, key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        it = iter(self._call("LIST", prefix, self._target.list, prefix))
        while True:
            try:
                item = self._call("LIST", prefix, next, it)
            except StopIteration:
                return
            yield item

    def cleanup_uploads(self) -> int:
        return self._call("LIST", "(unfinished uploads)", self._target.cleanup_uploads)

    def waiting(self) -> str | None:
        """The request waiting for its answer now ("a PUT of URL/KEY sent 12.0 s ago has
        had no answer yet"), None when none is."""
        got = self._oldest()
        if got is None:
            return None
        op, key, since = got
        return (f"a {op} of {self._target.url}/{key} sent {time.monotonic() - since:.1f} s "
                f"ago has had no answer yet")

    def waiting_for(self) -> float:
        """How long the request in progress has waited (0: none)."""
        got = self._oldest()
        return 0.0 if got is None else time.monotonic() - got[2]


REPLICA_DIRS = ("wal", "snapshots", "blobs")  # a replica's objects: these, manifest, lease


def in_replica_layout(key: str) -> bool:
    """Whether ``key`` (relative to a replica URL) is where a replica's own objects live:
    ``manifest``, ``lease``, or one level under ``wal/``, ``snapshots/``, ``blobs/``.
    Anything deeper belongs to something else (another replica at a URL under this one)."""
    head, _, rest = key.partition("/")
    if not rest:
        return head in ("manifest", "lease")
    return head in REPLICA_DIRS and "/" not in rest


NOT_MODIFIED = ("", "")  # get(..., if_none_match=etag) when the object did not change


def display_url(url: str) -> str:
    """The URL without user info, query or fragment (what messages and documents show);
    never the text before an ``@`` (user info whose secret holds a ``/`` is not user info
    to ``urlsplit``: it showed the whole URL, secret included)."""
    if not isinstance(url, str):
        return f"<a {type(url).__name__}>"
    if _has_userinfo(url):
        return _shown(url)
    p = urlsplit(url)
    if not p.scheme:  # (no scheme: shown as written, less any query or fragment; it
        return _shown(p.netloc + p.path)  # read "://bogus" for "bogus")
    host = p.hostname or ""
    try:
        port = p.port
    except ValueError:  # (not a number, or above 65535): shown as written
        host = p.netloc
    else:
        if port:
            host += f":{port}"
    return f"{p.scheme}://{host}{p.path}"


def _shown(text: str) -> str:
    """``text`` (a URL as given, maybe unparseable) safe to show: no query or fragment,
    nothing before its last ``@`` (user info, whatever it holds), control characters
    escaped."""
    text = text.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" in rest:
        rest = "<user info>@" + rest.rpartition("@")[2]
    out = f"{scheme}{sep}{rest}"
    return out if out.isprintable() else repr(out)


def _has_userinfo(url: str, anywhere: bool = False) -> bool:
    """Whether ``url`` carries user info, also where ``urlsplit`` misses it: a secret with
    a ``/`` (AWS secret keys often have one) ends its authority early, so ``s3://KEY:SE/
    CRET@bucket/p`` parsed as bucket ``KEY:SE``, no user info.  User info: an ``@`` in the
    part before the first ``/`` after ``scheme://``, or an ``@`` later when that part has
    a ``:`` (``KEY:SE``: no bucket name has one).  ``anywhere``: any ``@`` before the query
    (an endpoint URL has no use for one)."""
    text = url.split("?", 1)[0].split("#", 1)[0]
    rest = text.partition("://")[2] if "://" in text else text
    if "@" not in rest:
        return False
    head = rest.split("/", 1)[0]
    return anywhere or "@" in head or ":" in head


def check_url(url: str) -> None:
    """ReplicationError unless ``url`` names a replica walstore can use (no I/O, nothing
    imported): what ``open`` checks before it touches the store."""
    _parse(url)


def _parse(url: str):
    if not isinstance(url, str):
        raise ReplicationError(f"a replica URL is a str, not {type(url).__name__}")
    if "\0" in url:  # (no directory or object key holds one: open() created the store,
        # then failed with a bare "ValueError: embedded null byte" naming nothing)
        raise ReplicationError(f"replica URL {_shown(url)} contains a NUL character")
    if _has_userinfo(url):
        raise ReplicationError(f"replica URL {_shown(url)} carries user info; credentials "
                               f"come only from the standard AWS chain (environment, config "
                               f"files, roles), never the URL")
    p = urlsplit(url)
    if p.username or p.password or p.query:
        raise ReplicationError(f"replica URL {display_url(url)} carries user info or query "
                               f"parameters; credentials come only from the standard AWS "
                               f"chain (environment, config files, roles), never the URL")
    if "#" in url or "?" in url:  # (a fragment, or an empty query: ``urlsplit`` cut the
        # path there, and ``file:///r/rep#1`` shipped to /r/rep, ``s3://b/a#1`` to b/a,
        # silently another location than the one named: audit 56)
        raise ReplicationError(f"replica URL {display_url(url)}... holds a "
                               f"{'#' if '#' in url else '?'}: a URL ends its path there "
                               f"(a fragment or query); name a directory or prefix "
                               f"without '#' or '?'")
    if p.scheme == "file":  # (an empty or relative path meant the current directory)
        if p.netloc not in ("", "localhost") or not p.path.startswith("/") or \
                p.path.strip("/") == "":
            raise ReplicationError(f"file URL {display_url(url)} must be file:///absolute/dir "
                                   f"(a directory other than /)")
    elif p.scheme == "s3":
        if not p.netloc:
            raise ReplicationError(f"s3 URL {display_url(url)} names no bucket")
        if not _utf8(url):  # (object keys are UTF-8 text: a prefix holding bytes that are
            # not, as argv gives them, was taken, and every request of the shipper then
            # failed with a bare "UnicodeEncodeError", nothing ever shipped)
            raise ReplicationError(f"s3 URL {_shown(url)} is not valid UTF-8 text (S3 "
                                   f"object keys are UTF-8)")
        why = _bad_bucket(p.netloc)
        if why:
            raise ReplicationError(f"s3 URL {_shown(f's3://{p.netloc}{p.path}')}: "
                                   f"{_shown(p.netloc)!r} is not a valid bucket name: {why} "
                                   f"(a bucket name is 3 to 255 letters, digits, '.', '-' "
                                   f"and '_', starting and ending with a letter or digit)")
    else:
        raise ReplicationError(f"unsupported replica URL {display_url(url)}: use "
                               f"s3://bucket/prefix or file:///dir")
    return p


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates: bytes argv held that are
    not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# a host name an S3 client takes (botocore's rule: labels of letters, digits and '-', not
# beginning or ending with '-', up to 63 characters each), else an IP address literal
_HOST_LABELS = re.compile(r"((?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _bad_host(host: str) -> bool:
    """Whether the client would refuse ``host`` (an endpoint URL's, as urlsplit gives
    it) with its bare "ValueError: Invalid endpoint" (`h_st`, a space, a non-ASCII or
    non-UTF-8 name, `-h`)."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
        return False
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return len(host) > 255 or not _HOST_LABELS.fullmatch(name)


_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _bad_bucket(name: str) -> str | None:
    """What is wrong with a bucket name, None when nothing: S3's rules (3 to 63 lowercase
    letters, digits, '.' and '-', starting and ending with a letter or digit), widened to
    what S3-compatible servers and older S3 buckets also use (uppercase letters and '_',
    up to 255 characters: the client's own bound)."""
    bad = sorted(set(name) - _BUCKET_CHARS)
    if bad:
        return "it has " + ", ".join(repr(c) for c in bad)
    if not 3 <= len(name) <= 255:
        return f"it is {len(name)} characters long"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "it does not start and end with a letter or digit"
    return None


def check_endpoint(endpoint: str | None) -> None:
    """ReplicationError unless ``endpoint`` (an S3 endpoint URL; None: the default) is an
    ``http://`` or ``https://`` URL with a host and nothing but a path after it (no I/O):
    a bad one failed on the first request as a bare "EndpointResolutionError" or an
    unexpected "ValueError: Invalid endpoint"."""
    if endpoint is None:
        return
    if not isinstance(endpoint, str):
        raise ReplicationError(f"endpoint URL must be a str, not {type(endpoint).__name__}")
    if _has_userinfo(endpoint.strip(), anywhere=True):
        raise ReplicationError(f"endpoint URL {_shown(endpoint.strip())} carries user info "
                               f"(credentials come only from the standard AWS chain)")
    shown = _shown(endpoint.strip())
    try:
        p = urlsplit(endpoint.strip())
    except ValueError as e:  # ("http://[::1": urllib's bare "Invalid IPv6 URL" escaped)
        raise ReplicationError(f"endpoint URL {shown!r} is not a URL: {e} (e.g. "
                               f"https://s3.example.com or http://127.0.0.1:9000)") from None
    try:
        port_ok = p.port is None or 0 < p.port
    except ValueError:  # (not a number, or above 65535)
        port_ok = False
    if not (p.scheme and p.netloc):  # (no URL at all: quoted)
        shown = repr(shown)
    if p.scheme not in ("http", "https") or not p.hostname:
        why = "is not an http:// or https:// URL with a host"
    elif not _utf8(endpoint) or any(c in endpoint for c in "\t\r\n") \
            or _bad_host(p.hostname):
        # (the S3 client refused it only when it was made: "cannot set up the S3 client
        # ...: ValueError: Invalid endpoint", exit 1, after open() had created the store)
        why = ("has a host name that is no DNS name (letters, digits, '-' and '.') or IP "
               "address")
    elif not port_ok:
        why = "has an invalid port"
    elif p.username or p.password or p.query or p.fragment:
        why = ("carries user info, a query or a fragment (credentials come only from the "
               "standard AWS chain)")
    else:
        return
    raise ReplicationError(f"endpoint URL {shown} {why} (e.g. https://s3.example.com or "
                           f"http://127.0.0.1:9000)")


def _no_s3_client(e: BaseException | None = None) -> ReplicationError:
    why = f" ({e})" if e is not None else ""
    return ReplicationError(f"s3:// replicas need boto3, which is not installed{why}: "
                            f"pip install 'walstore[s3]'")


def check_s3_client() -> None:
    """ReplicationError unless boto3 (the ``walstore[s3]`` extra) can be imported; found,
    not imported (``walstore.open(replicate_to="s3://...")`` asks before it creates or
    touches the store: it created the store, then failed)."""
    import importlib.util
    if importlib.util.find_spec("boto3") is None:
        raise _no_s3_client()


def open_target(url: str, options=None) -> ObjectStore:
    """The object store a replica URL names: ``s3://bucket/prefix`` or ``file:///dir``."""
    p = _parse(url)
    if p.scheme == "file":
        return FileTarget(p.path)
    try:
        from .s3 import S3Target  # boto3 is imported only here (the walstore[s3] extra)
    except ImportError as e:  # (a bare "No module named 'boto3'" escaped walstore.open,
        # restore and every replica verb: "an unexpected error")
        if getattr(e, "name", None) not in ("boto3", "botocore") and \
                not str(getattr(e, "name", "") or "").startswith(("boto3.", "botocore.")):
            raise
        raise _no_s3_client(e) from e
    return S3Target(p.netloc, p.path.strip("/"), options)


def _bounded_read(stream, max_bytes: int, what: str) -> bytes:
    buf = bytearray()
    while True:
        chunk = stream.read(min(1 << 20, max_bytes + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise TargetError(f"{what} is larger than the {max_bytes} byte bound", False)


class FileTarget:
    """A replica in a local (or mounted) directory; objects are files, 0600 in 0700 dirs.

    The etag of an object is the sha256 (hex, 32 chars) of its bytes.  Conditional writes
    hold ``<root>/.lock`` (flock): If-None-Match links the temp file into place (EEXIST:
    lost), If-Match compares the current etag and renames over it.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"
        self.requests: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad object key {key!r}")
        return os.path.join(self.root, *parts)

    def get(self, key, max_bytes, if_none_match=None):
        self.requests["GET"] += 1
        try:
            with open(self._path(key), "rb") as f:
                data = _bounded_read(f, max_bytes, f"object {key}")
        except FileNotFoundError:
            return None
        etag = _etag(data)
        if if_none_match is not None and etag == if_none_match:
            return NOT_MODIFIED
        return data, etag

    def download(self, key, f, max_bytes):
        self.requests["GET"] += 1
        h = hashlib.sha256()
        n = 0
        try:
            with open(self._path(key), "rb") as src:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > max_bytes:
                        raise TargetError(f"object {key} is larger than {max_bytes} bytes", False)
                    h.update(chunk)
                    f.write(chunk)
        except FileNotFoundError:
            return None
        return n, h.hexdigest()[:32]

    def put(self, key, body, *, if_none_match=False, if_match=None, progress=None):
        self.requests["PUT"] += 1
        sent = 0
        path = self._path(key)
        d = os.path.dirname(path)
        _fs.make_dir(d, own=False)  # (the replica's folder may be the user's: mode kept)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}")
        h = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     _fs.FILE_MODE)
        try:
            stream = io.BytesIO(body) if isinstance(body, (bytes, bytearray)) else body
            while True:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                sent += len(chunk)
                if progress is not None:
                    progress(sent)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            remove_quietly(tmp)
            raise
        os.close(fd)
        etag = h.hexdigest()[:32]
        try:
            with self._lock, _FileLock(os.path.join(self.root, ".lock")):
                if if_none_match:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise PreconditionFailed(f"object {key} already exists") from None
                elif if_match is not None:
                    try:
                        with open(path, "rb") as f:
                            current = hashlib.sha256(f.read()).hexdigest()[:32]
                    except FileNotFoundError:
                        raise PreconditionFailed(f"object {key} does not exist") from None
                    if current != if_match:
                        raise PreconditionFailed(f"object {key} changed (If-Match)")
                    os.rename(tmp, path)
                else:
                    os.rename(tmp, path)
                _fs.fsync_dir(d)
        finally:
            remove_quietly(tmp)
        return etag

    def delete(self, key):
        self.requests["DELETE"] += 1
        remove_quietly(self._path(key))

    def list(self, prefix):
        self.requests["LIST"] += 1
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in sorted(files):
                if name.startswith(".tmp-") or name == ".lock":
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                try:
                    yield rel, os.path.getsize(full)
                except FileNotFoundError:
                    continue

    def cleanup_uploads(self):
        """Remove temp files of uploads cut short (they were never visible): only in this
        replica's own directories, never in another replica's under them."""
        n = 0
        for d in (self.root, *(os.path.join(self.root, x) for x in REPLICA_DIRS)):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith(".tmp-"):
                    remove_quietly(os.path.join(d, name))
                    n += 1
        return n

    def enclosing(self) -> list[tuple["FileTarget", str]]:
        """The directories enclosing this one, innermost first: (a target there, this
        one's path relative to it)."""
        out, d = [], os.path.dirname(self.root)
        while True:
            out.append((FileTarget(d), os.path.relpath(self.root, d).replace(os.sep, "/")))
            if d == os.path.dirname(d):
                return out
            d = os.path.dirname(d)

    def close(self):
        pass


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class _FileLock:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                          _fs.FILE_MODE)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                return self
            except OSError as e:  # pragma: no cover - EINTR
                if e.errno != errno.EINTR:
                    os.close(self.fd)
                    raise
                time.sleep(0.001)

    def __exit__(self, *exc):
        os.close(self.fd)
