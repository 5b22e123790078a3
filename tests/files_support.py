"""Test support for reversible files: tree equality, tree building, a kill -9 child.

This module owns what every file test needs and nothing of walstore's: it reads trees
with its own code (``os.lstat``, ``os.readlink``, ``hashlib``), so a bug in
``walstore.files`` cannot hide itself behind the helper that checks it.

- ``tree_state(root)``: rel path (bytes) -> ``("file", mode, size, sha256)`` |
  ``("dir", mode)`` | ``("symlink", target)``; every directory is listed, so empty ones
  count; symlinks are never followed.
- ``assert_tree_equal(root, expected)``: a readable list of differences on failure.
- ``TreeSnapshot(root)``: ``snap.assert_same()`` later (or ``assert_same(other_root)``).
- ``build(root, spec)``: make a tree from ``{path: content | Dir(mode) | Link(target) |
  File(content, mode)}``.
- ``Immutable(path)``: permission denied even for root (``chattr +i``; ``chmod`` when not
  root), undone on exit.
- ``python files_support.py child OP ARGS...``: runs one ``walstore.files.apply`` operation
  with a fileio backend that stops (announces itself on stdout, then sleeps) before or
  after a chosen seam call, so the test can kill -9 it at exactly that point.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


@dataclass(frozen=True)
class Link:
    target: str | bytes


@dataclass(frozen=True)
class File:
    content: bytes | str
    mode: int = 0o644


def _sha(path: bytes) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def tree_state(root: str | bytes, skip_prefix: bytes | None = None) -> dict[bytes, tuple]:
    """Every path under ``root`` (excluded) -> its state (see the module docstring).
    ``skip_prefix``: names starting with it are left out (e.g. walstore's temp names)."""
    rootb = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    stack = [b""]
    while stack:
        d = stack.pop()
        for name in os.listdir(rootb + b"/" + d if d else rootb):
            if skip_prefix is not None and name.startswith(skip_prefix):
                continue
            rel = d + b"/" + name if d else name
            p = rootb + b"/" + rel
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISLNK(m):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(m):
                out[rel] = ("dir", stat.S_IMODE(m))
                stack.append(rel)
            elif stat.S_ISREG(m):
                out[rel] = ("file", stat.S_IMODE(m)) + _sha(p)
            else:
                out[rel] = ("special", stat.S_IFMT(m))
    return out


def describe_differences(actual: dict, expected: dict) -> list[str]:
    lines = []
    for rel in sorted(actual.keys() | expected.keys()):
        a, e = actual.get(rel), expected.get(rel)
        if a == e:
            continue
        name = os.fsdecode(rel)
        if a is None:
            lines.append(f"missing   {name!r}: expected {e}")
        elif e is None:
            lines.append(f"unexpected {name!r}: {a}")
        else:
            lines.append(f"differs   {name!r}: {a} != expected {e}")
    return lines


def assert_tree_equal(root: str | bytes | dict, expected: dict, what: str = "tree",
                      skip_prefix: bytes | None = None) -> None:
    actual = root if isinstance(root, dict) else tree_state(root, skip_prefix)
    diffs = describe_differences(actual, expected)
    assert not diffs, f"{what} differs:\n  " + "\n  ".join(diffs[:40])


class TreeSnapshot:
    """The state of a tree now, to compare with later."""

    def __init__(self, root: str | bytes) -> None:
        self.root = root
        self.state = tree_state(root)

    def assert_same(self, root: str | bytes | None = None, what: str = "tree") -> None:
        assert_tree_equal(self.root if root is None else root, self.state, what)

    def same(self, root: str | bytes | None = None) -> bool:
        return tree_state(self.root if root is None else root) == self.state


def build(root: str | bytes, spec: dict) -> None:
    """Create the paths of ``spec`` under ``root`` (parents as needed, 0o755)."""
    rootb = os.fsencode(root)
    for rel in sorted(spec, key=lambda r: os.fsencode(r)):
        what = spec[rel]
        p = rootb + b"/" + os.fsencode(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if isinstance(what, Dir):
            os.makedirs(p, exist_ok=True)
            os.chmod(p, what.mode)
        elif isinstance(what, Link):
            os.symlink(os.fsencode(what.target), p)
        else:
            f = what if isinstance(what, File) else File(what)
            data = f.content.encode() if isinstance(f.content, str) else f.content
            with open(p, "wb") as fh:
                fh.write(data)
            os.chmod(p, f.mode)


def age(root: str | bytes, seconds: int = 3600) -> None:
    """Set every file's and directory's mtime ``seconds`` in the past (as a checked-out
    tree has): no path is then "racy" for a manifest."""
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                st = os.lstat(p)
                t = st.st_mtime_ns - seconds * 1_000_000_000
                os.utime(p, ns=(t, t), follow_symlinks=False)


@contextlib.contextmanager
def Immutable(path: str | bytes):
    """Make ``path`` refuse changes even to root (``chattr +i``), or, not being root,
    read-only (``chmod a-w``); undone on exit."""
    p = os.fsencode(path)
    if os.geteuid() == 0:
        try:
            subprocess.run(["chattr", "+i", p], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            import pytest
            pytest.skip(f"root, and chattr +i does not work here ({e}): no way to deny")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", p], check=True)
    else:
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        os.chmod(p, mode & ~0o222)
        try:
            yield
        finally:
            os.chmod(p, mode)


# ---- the kill -9 child ------------------------------------------------------------------
def child_main(argv: list[str]) -> None:
    """``child SPEC_JSON``: SPEC has ``root``, ``blobs``, ``op`` and its args, ``stop`` =
    [n, "before"|"after"] (n counts seam calls from 1; 0: never stop; "count" mode prints
    the number of calls made).  At the stop point the child prints ``STOP <op>`` and
    sleeps until killed."""
    sys.path.insert(0, str(ROOT))
    import time

    from walstore import fileio
    from walstore.files import BlobStore, Entry, Workspace, apply

    spec = json.loads(argv[0])
    ws = Workspace(spec["root"])
    blobs = BlobStore(spec["blobs"]) if spec.get("blobs") else None
    stop_n, when = spec.get("stop", [0, "before"])

    class Stopper(fileio.OSBackend):
        n = 0

        def _at(self, op: str, real):
            Stopper.n += 1
            if Stopper.n == stop_n and when == "before":
                self._halt(op)
            out = real()
            if Stopper.n == stop_n and when == "after":
                self._halt(op)
            return out

        @staticmethod
        def _halt(op: str) -> None:
            sys.stdout.write(f"STOP {op}\n")
            sys.stdout.flush()
            time.sleep(600)

        def open(self, path, flags, mode):
            return self._at("open", lambda: super(Stopper, self).open(path, flags, mode))

        def pwrite(self, fd, data, offset):
            return self._at("pwrite", lambda: super(Stopper, self).pwrite(fd, data, offset))

        def fsync(self, fd):
            return self._at("fsync", lambda: super(Stopper, self).fsync(fd))

        def fsync_dir(self, path):
            return self._at("fsync_dir", lambda: super(Stopper, self).fsync_dir(path))

        def rename(self, src, dst):
            return self._at("rename", lambda: super(Stopper, self).rename(src, dst))

        def unlink(self, path):
            return self._at("unlink", lambda: super(Stopper, self).unlink(path))

    fileio.set_backend(Stopper())
    op, args = spec["op"], spec.get("args", {})
    path = os.fsencode(args["path"]) if "path" in args else None
    if op == "write":
        apply.write_file(ws, path, args["data"].encode("latin-1"), args.get("mode"))
    elif op == "write_blob":
        apply.write_blob(ws, path, blobs, args["digest"], args.get("mode"))
    elif op == "symlink":
        apply.make_symlink(ws, path, args["target"])
    elif op == "mkdir":
        apply.make_dir(ws, path, args.get("mode"))
    elif op == "restore":
        before = Entry.from_row(_row(args["before"]))
        apply.restore(ws, path, before, None, blobs, None)
    else:
        raise SystemExit(f"unknown op {op}")
    sys.stdout.write(f"DONE {Stopper.n}\n")
    sys.stdout.flush()


def _row(row: list) -> list:
    """JSON has no bytes: a symlink target travels as latin-1 text."""
    if row and row[0] == "l":
        return [row[0], row[1].encode("latin-1")] + row[2:]
    return row


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
    else:
        raise SystemExit("usage: files_support.py child SPEC_JSON")
