"""The reversible-files library (walstore/files/), on real files, without the engine.

What is proven here:
- paths: escapes (absolute, ``..``, symlinks on the way, inside or outside the root) are
  ValueError and nothing outside the root changes; names with newlines and non-UTF-8
  bytes work everywhere;
- ignore: the gitignore matcher agrees with real git (``git ls-files --ignored`` and
  ``git check-ignore`` in a temp repository) on hand-picked and random patterns;
- entries: what a path is, never following a symlink; rows survive msgpack;
- blobs: streamed (a sparse 1 GiB file under tracemalloc), durable order (temp, fsync,
  rename, dir fsync), deduplicated (a second put writes nothing), reflink attempted with a
  clean fallback, verified reads, gc, 0600/0700;
- apply: every primitive, parents created and reported, nothing half-done on errors
  (permission denied for real, with ``chattr +i``), restore over every before/after pair,
  conflicts keep both versions, and a kill -9 of a real child at every seam call of an
  apply leaves old or new content (never a mix) and removable temp names;
- watch: manifests, incremental cost counted in hashed files/bytes, racy files re-hashed,
  diff kinds, a real subprocess's changes put back (symlink swap, file replaced by a
  directory), recovery from a saved manifest;
- plans: every primitive planned (before-images stored, tree untouched), applied as
  planned, undone and redone from its logged steps alone.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from walstore import fileio  # noqa: E402
from walstore.errors import CorruptionError  # noqa: E402
from walstore.files import apply, watch  # noqa: E402
from walstore.files.blobs import EMPTY_SHA256, BlobStore  # noqa: E402
from walstore.files.entries import (CHUNK, Entry, FileBusyError, UnsupportedFileType,  # noqa
                                    read_entry)
from walstore.files.ignore import IgnoreRules  # noqa: E402
from walstore.files.paths import TEMP_PREFIX, Workspace  # noqa: E402
from walstore.files.watch import Manifest, diff, snapshot, undo_order  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from files_support import (Dir, File, Immutable, Link, TreeSnapshot, age,  # noqa: E402
                           assert_tree_equal, build, tree_state)

WEIRD = b"we\nird \xff\xfe name.txt"   # a newline and bytes that are not UTF-8
SUPPORT = Path(__file__).resolve().parent / "files_support.py"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def ws(tmp_path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(str(root))


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path / "store" / "blobs"))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory next to the workspace that nothing may ever touch."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(b"do not touch")
    return d


# =========================================================================================
# paths
# =========================================================================================
class TestPaths:
    def test_normalization(self, ws):
        assert ws.rel("a//b/./c") == b"a/b/c"
        assert ws.rel("a/../b") == b"b"
        assert ws.rel(Path("x") / "y") == b"x/y"
        assert ws.rel(b"a/" + WEIRD) == b"a/" + WEIRD
        assert ws.rel(os.fsdecode(WEIRD)) == WEIRD
        assert ws.rel(".", allow_root=True) == b""

    @pytest.mark.parametrize("bad", ["/etc/passwd", "..", "../x", "a/../../x", "a/b/../../..",
                                     "", ".", "a\0b"])
    def test_escapes_and_nonsense_raise_valueerror(self, ws, bad):
        with pytest.raises(ValueError):
            ws.rel(bad)

    def test_absolute_path_inside_the_root_is_refused_too(self, ws):
        with pytest.raises(ValueError, match="absolute"):
            ws.rel(os.path.join(ws.root, "a"))

    def test_not_a_path(self, ws):
        with pytest.raises(TypeError):
            ws.rel(3)

    def test_root_is_realpathed(self, tmp_path):
        real = tmp_path / "real"
        real.mkdir()
        (tmp_path / "via").symlink_to(real)
        w = Workspace(str(tmp_path / "via") + "/./")
        assert w.root == os.path.realpath(str(real))
        with pytest.raises(ValueError):
            Workspace(str(tmp_path / "missing"))
        (tmp_path / "f").write_text("x")
        with pytest.raises(ValueError):
            Workspace(str(tmp_path / "f"))
        with pytest.raises(ValueError):
            Workspace("/")

    def test_symlink_on_the_way_is_refused_inside_or_outside(self, ws, outside):
        build(ws.root, {"real/f": "x", "in": Link("real"), "out": Link(str(outside))})
        for p in ("in/f", "out/secret.txt", "out/new", "in/new/deeper"):
            with pytest.raises(ValueError, match="symlink"):
                ws.resolve(p)
        # the last component may be a symlink: it is operated on, never through
        assert ws.resolve("out")[0] == b"out"

    def test_file_on_the_way(self, ws):
        build(ws.root, {"f": "x"})
        with pytest.raises(NotADirectoryError):
            ws.resolve("f/g")

    def test_missing_parents_are_reported_shallowest_first(self, ws):
        build(ws.root, {"a": Dir()})
        assert ws.check_parents(b"a/b/c/d") == [b"a/b", b"a/b/c"]


    def test_walstores_own_directory_inside_the_tree_is_excluded(self, tmp_path):
        root = tmp_path / "repo"
        build(str(root), {"src/a.c": "a", ".walstore/blobs/x": "blob"})
        w = Workspace(str(root), exclude=[str(root / ".walstore"), "/elsewhere"])
        assert w.exclude == {b".walstore"}
        for p in (".walstore", ".walstore/blobs/x", "src/../.walstore/y"):
            with pytest.raises(ValueError, match="walstore's own"):
                w.rel(p)
        assert set(snapshot(w).records) == {b"src", b"src/a.c"}
        assert w.ignored(b".walstore/blobs", True)


class TestNothingOutsideTheRoot:
    """Every mutating call refuses escapes before touching anything."""

    def test_every_primitive_refuses(self, ws, outside, blobs):
        build(ws.root, {"link": Link(str(outside)), "d": Dir(), "f": "x"})
        before_out = TreeSnapshot(outside)
        before_ws = TreeSnapshot(ws.root)
        attempts = [
            lambda p: apply.write_file(ws, p, b"pwned"),
            lambda p: apply.make_dir(ws, p),
            lambda p: apply.make_symlink(ws, p, "/etc/passwd"),
            lambda p: apply.delete(ws, p),
            lambda p: apply.rmtree(ws, p),
            lambda p: apply.set_mode(ws, p, 0o777),
            lambda p: apply.rename(ws, "f", p),
            lambda p: apply.rename(ws, p, "g"),
            lambda p: apply.restore(ws, p, Entry.absent(), None, blobs),
            lambda p: apply.ensure_parents(ws, p),
        ]
        for attempt in attempts:
            for p in ("link/secret.txt", "link/new/x", "../outside/secret.txt",
                      str(outside / "secret.txt"), "d/../../outside/secret.txt"):
                with pytest.raises(ValueError):
                    attempt(p)
        before_out.assert_same(what="outside the workspace")
        before_ws.assert_same(what="the workspace")


# =========================================================================================
# ignore patterns
# =========================================================================================
class TestIgnoreUnit:
    @pytest.mark.parametrize("patterns,path,is_dir,expected", [
        (["*.o"], b"a/b/x.o", False, True),
        (["*.o"], b"x.c", False, False),
        (["/build"], b"build", True, True),
        (["/build"], b"src/build", True, False),
        (["build/"], b"src/build", True, True),
        (["build/"], b"src/build", False, False),        # a file named build
        (["build/"], b"src/build/x.c", False, True),     # under an ignored dir
        (["doc/*.txt"], b"doc/a.txt", False, True),
        (["doc/*.txt"], b"doc/sub/a.txt", False, False),
        (["doc/**/*.txt"], b"doc/sub/deep/a.txt", False, True),
        (["doc/**/*.txt"], b"doc/a.txt", False, True),
        (["**/foo"], b"a/b/foo", False, True),
        (["foo/**"], b"foo/a/b", False, True),
        (["foo/**"], b"foo", True, False),
        (["a?c"], b"abc", False, True),
        (["a?c"], b"a/c", False, False),
        (["[a-c]x"], b"bx", False, True),
        (["[!a-c]x"], b"bx", False, False),
        (["[^a-c]x"], b"dx", False, True),
        (["[[:digit:]]*"], b"7up", False, True),
        (["*", "!keep"], b"keep", False, False),
        (["dir/", "!dir/keep"], b"dir/keep", False, True),  # cannot re-include
        (["\\#hash"], b"#hash", False, True),
        (["#comment"], b"#comment", False, False),
        (["\\!bang"], b"!bang", False, True),
        (["trail   "], b"trail", False, True),
        (["trail\\ "], b"trail ", False, True),
        (["a[bc"], b"a[bc", False, False),                 # unclosed: matches nothing
        (["*.txt"], WEIRD, False, True),
        (["*\xff*"], b"x\xffy", False, False),             # the str pattern is UTF-8 ...
        ([b"*\xff*"], b"x\xffy", False, True),             # ... bytes patterns are bytes
    ])
    def test_cases(self, patterns, path, is_dir, expected):
        assert IgnoreRules(patterns).ignored(path, is_dir) is expected

    def test_a_multiline_string_and_types(self):
        rules = IgnoreRules("# build output\n*.o\n\nbuild/\n")
        assert [p.source for p in rules.patterns] == [b"*.o", b"build/"]
        with pytest.raises(TypeError):
            IgnoreRules([3])


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-c", "core.quotepath=off", *args], cwd=repo, input=stdin,
                          capture_output=True, check=True).stdout


GIT_TREE = ["a.o", "a.c", "b/a.o", "b/c/d.txt", "build/x", "src/build/y", "src/build.c",
            "doc/a.txt", "doc/x/b.txt", "doc/x/y/c.txt", "foo", "x/foo/bar", "y/foo",
            "abc", "a-c", "bx", "dx", "7up", ".hidden", "a b", "x[1]", "keep/k", "keep/n",
            "deep/a/b/c/d/e", "z/foo.txt", "z/bar.TXT", "dir.d/f", "q/**literal"]
GIT_TREE_DIRS_ONLY = ["emptyish/sub/f"]
HAND_PATTERNS = [
    ["*.o"], ["/a.o"], ["build/"], ["/build/"], ["build"], ["doc/*.txt"], ["doc/**/*.txt"],
    ["**/foo"], ["foo/**"], ["x/**/bar"], ["a?c"], ["[a-c]x"], ["[!a-c]x"], ["[^ab]x"],
    ["[[:digit:]]*"], ["*", "!*.c"], ["*", "!*/"], ["b/", "!b/a.o"], ["keep/*", "!keep/k"],
    ["\\#x", "#y"], [".*"], ["a\\ b"], ["a b"], ["x\\[1]"], ["x[1]"], ["deep/**/e"],
    ["**/c/**"], ["*.TXT"], ["*.[Tt][Xx][Tt]"], ["dir.d/"], ["q/\\*\\*literal"],
    ["**"], ["/**/d"], ["z/*", "!z/foo.txt"], ["*/"], ["[]a]bc"], ["[!]]x"], ["a[b-]c"],
    ["doc/x/", "!doc/x/b.txt"], ["doc/*", "!doc/x"], ["f*", "!foo"], ["*[[:upper:]]*"],
    ["d**/[!a]"], ["de**/e"], ["a\\"], ["[[:bogus:]]*"], ["*.o\r"],
]


def _random_pattern(rng: random.Random) -> str:
    atoms = ["a", "b", "c", "x", "foo", "doc", "build", "*", "**", "?", "[a-c]", "[!a]",
             ".o", ".txt", "d", "e", "k", "1", "[[:alpha:]]", "\\", "[", "]", "-", "!", " ",
             "[]", "[!]", "[a-]", "\\*", "[[:bogus:]]", "[:", "***"]
    comps = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 3)))
             for _ in range(rng.randint(1, 3))]
    p = "/".join(comps)
    if rng.random() < 0.2:
        p = "/" + p
    if rng.random() < 0.2:
        p += "/"
    if rng.random() < 0.25:
        p = "!" + p
    return p


def _tree_paths() -> list[str]:
    return GIT_TREE + GIT_TREE_DIRS_ONLY


@pytest.fixture(scope="module")
def git_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("gitrepo")
    _git(repo, "init", "-q")
    for p in _tree_paths():
        f = repo / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    return repo


def _git_ignored_files(repo: Path, patterns: list[str]) -> set[bytes]:
    (repo / ".git" / "info" / "exclude").write_text("\n".join(patterns) + "\n")
    out = _git(repo, "ls-files", "-z", "--others", "--ignored", "--exclude-standard")
    return {p for p in out.split(b"\0") if p}


class TestIgnoreVersusGit:
    """Ground truth: what git itself ignores, file by file (a file is ignored when a parent
    directory is, which exercises directory patterns and negation too)."""

    def _compare(self, repo: Path, patterns: list[str]) -> None:
        truth = _git_ignored_files(repo, patterns)
        rules = IgnoreRules(patterns)
        mine = {os.fsencode(p) for p in _tree_paths()
                if rules.ignored(os.fsencode(p), False)}
        assert mine == truth, (f"patterns {patterns!r}: only git ignores "
                               f"{sorted(truth - mine)}, only walstore {sorted(mine - truth)}")

    def test_hand_picked_patterns(self, git_repo):
        for patterns in HAND_PATTERNS:
            self._compare(git_repo, patterns)

    def test_random_patterns(self, git_repo):
        rng = random.Random(12)
        for _ in range(150):
            self._compare(git_repo, [_random_pattern(rng) for _ in range(rng.randint(1, 4))])

    def test_directories_with_check_ignore(self, git_repo):
        dirs = ["b", "b/c", "build", "src/build", "doc/x", "doc/x/y", "x/foo", "keep",
                "deep/a/b", "emptyish", "emptyish/sub", "dir.d"]
        for patterns in HAND_PATTERNS + [["b/c/"], ["emptyish/*/"], ["/deep/a/"]]:
            (git_repo / ".git" / "info" / "exclude").write_text("\n".join(patterns) + "\n")
            res = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-z"],
                                 cwd=git_repo, input="\0".join(dirs).encode(),
                                 capture_output=True, check=False)  # 1: none ignored
            assert res.returncode in (0, 1), res.stderr
            truth = {p.rstrip(b"/") for p in res.stdout.split(b"\0") if p}
            rules = IgnoreRules(patterns)
            mine = {os.fsencode(d) for d in dirs if rules.ignored(os.fsencode(d), True)}
            assert mine == truth, f"patterns {patterns!r}: git {sorted(truth)}, " \
                                  f"walstore {sorted(mine)}"


# =========================================================================================
# entries
# =========================================================================================
class TestEntries:
    def test_kinds_never_following_symlinks(self, ws, outside):
        build(ws.root, {"f": File(b"hello", 0o640), "d": Dir(0o750), "l": Link("f"),
                        "out": Link(str(outside)), "dangling": Link("nowhere"),
                        WEIRD: b"weird"})
        a = ws.abspath
        assert read_entry(a(b"f")) == Entry(
            "file", 0o640, 5, sha(b"hello"), None, os.getuid(), os.getgid())
        assert read_entry(a(b"d")).same(Entry.dir(0o750))
        assert read_entry(a(b"l")).same(Entry.symlink(b"f"))
        assert read_entry(a(b"out")).same(Entry.symlink(os.fsencode(outside)))
        assert read_entry(a(b"dangling")).same(Entry.symlink("nowhere"))
        assert read_entry(a(b"missing")) == Entry.absent()
        assert read_entry(a(WEIRD)).sha256 == sha(b"weird")
        assert read_entry(a(b"f"), hash=False).sha256 is None

    def test_special_files_are_refused(self, ws):
        os.mkfifo(ws.abspath(b"fifo"))
        with pytest.raises(UnsupportedFileType):
            read_entry(ws.abspath(b"fifo"))

    def test_same_ignores_ownership_not_content_or_mode(self):
        a = Entry.file(0o644, 3, sha(b"abc"), uid=1, gid=1)
        assert a.same(Entry.file(0o644, 3, sha(b"abc"), uid=2, gid=2))
        assert not a.same(Entry.file(0o600, 3, sha(b"abc")))
        assert not a.same(Entry.file(0o644, 3, sha(b"abd")))
        assert not a.same(Entry.dir(0o644))
        assert not Entry.symlink("a").same(Entry.symlink("b"))
        assert Entry.absent().same(Entry.absent())

    def test_rows_round_trip_through_msgpack(self):
        for e in (Entry.absent(), Entry.file(0o4755, 1 << 40, sha(b"x"), 0, 0),
                  Entry.dir(0o1777), Entry.symlink(b"t\n\xff"), Entry.dir(0o700, 5, 6)):
            row = msgpack.unpackb(msgpack.packb(e.to_row(), use_bin_type=True), raw=False)
            assert Entry.from_row(row) == e

    @pytest.mark.parametrize("row", [[], ["z"], ["a", 1], ["f", 0o644, -1, sha(b""), None,
                                     None], ["f", 0o644, 1, "xyz", None, None],
                                     ["d", 0o70000, None, None], ["l", "str", None, None],
                                     ["l", b"", None, None], ["d", True, None, None],
                                     ["f", 0o644, 1, sha(b""), -1, None], "f", None])
    def test_malformed_rows_are_valueerror(self, row):
        with pytest.raises(ValueError):
            Entry.from_row(row)

    def test_a_file_that_keeps_changing_is_busy(self, ws, monkeypatch):
        from walstore.files import entries
        build(ws.root, {"log": "x" * 100})
        real = entries.hash_fd

        def growing(fd, buf=None):
            with open(ws.abspath(b"log"), "ab") as f:
                f.write(b"more")
            return real(fd, buf)
        monkeypatch.setattr(entries, "hash_fd", growing)
        with pytest.raises(FileBusyError, match="kept changing"):
            read_entry(ws.abspath(b"log"))


# =========================================================================================
# blobs
# =========================================================================================
def _read_all(blobs: BlobStore, digest: str) -> bytes:
    return b"".join(blobs.get(digest))


class TestBlobs:
    def test_put_get_and_layout_permissions(self, blobs, tmp_path):
        src = tmp_path / "src"
        src.write_bytes(b"content")
        got = blobs.put_file(str(src))
        assert got.digest == sha(b"content") and got.size == 7 and got.written == 7
        assert _read_all(blobs, got.digest) == b"content"
        p = blobs.path(got.digest)
        assert p == os.path.join(blobs.dir, got.digest[:2], got.digest[2:])
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        for d in (blobs.dir, blobs.tmp, os.path.dirname(p)):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert list(blobs) == [got.digest]
        assert blobs.put_bytes(b"").digest == EMPTY_SHA256
        assert _read_all(blobs, EMPTY_SHA256) == b""

    def test_durable_before_named(self, blobs, tmp_path):
        """temp file written, fsynced, renamed to its hash, then its directory fsynced."""
        src = tmp_path / "src"
        src.write_bytes(os.urandom(3 * CHUNK + 5))   # the multi-chunk (two-pass) path
        fb = FaultBackend(record=True)
        with installed(fb):
            got = blobs.put_file(str(src))
        ops = [(e.op, e.path, e.dst) for e in fb.events if e.op != "pwrite"]
        tmp = ops[0][1]
        assert ops[0][0] == "open" and tmp.startswith(blobs.tmp)
        final = blobs.path(got.digest)
        assert ops[1:] == [("fsync", tmp, None), ("rename", tmp, final),
                           ("fsync_dir", os.path.dirname(final), None)] or \
            ops[1:] == [("fsync", tmp, None), ("fsync_dir", blobs.dir, None),
                        ("rename", tmp, final), ("fsync_dir", os.path.dirname(final), None)]
        writes = fb.writes()
        assert sum(len(w.data) for w in writes) == 3 * CHUNK + 5
        assert all(w.path == tmp for w in writes)
        assert got.method in ("stream", "clone")
        assert blobs.verify(got.digest)

    def test_second_put_of_the_same_content_writes_nothing(self, blobs, tmp_path):
        for size in (10, 3 * CHUNK + 1):
            data = os.urandom(size)
            a, b = tmp_path / "a", tmp_path / "b"
            a.write_bytes(data)
            b.write_bytes(data)
            blobs.put_file(str(a))
            fb = FaultBackend()
            with installed(fb):
                again = blobs.put_file(str(b))
                again2 = blobs.put_bytes(data)
            assert again.written == 0 and again.method == "dedup"
            assert again2.written == 0
            assert fb.calls == [], f"a duplicate put made seam calls: {fb.calls}"
            assert os.listdir(blobs.tmp) == []

    def test_put_chunks_and_dedup(self, blobs):
        got = blobs.put_chunks([b"ab", b"", b"cd"])
        assert got.digest == sha(b"abcd") and got.written == 4
        assert blobs.put_chunks(iter([b"abcd"])).written == 0
        assert os.listdir(blobs.tmp) == []

    def test_symlink_is_never_followed(self, blobs, tmp_path):
        (tmp_path / "real").write_bytes(b"x")
        (tmp_path / "link").symlink_to(tmp_path / "real")
        with pytest.raises(OSError) as e:
            blobs.put_file(str(tmp_path / "link"))
        assert e.value.errno == errno.ELOOP

    def test_sparse_gib_file_in_bounded_memory(self, blobs, tmp_path, ws):
        big = tmp_path / "sparse"
        with open(big, "wb") as f:
            f.seek(300 << 20)
            f.write(b"island")
            f.truncate(1 << 30)
        expected = hashlib.sha256()
        zeros = bytes(CHUNK)
        left = 300 << 20
        while left:
            expected.update(zeros[:min(left, CHUNK)])
            left -= min(left, CHUNK)
        expected.update(b"island")
        left = (1 << 30) - (300 << 20) - 6
        while left:
            n = min(left, CHUNK)
            expected.update(zeros[:n])
            left -= n
        tracemalloc.start()
        try:
            got = blobs.put_file(str(big))
            applied = apply.write_blob(ws, "restored", blobs, got.digest)
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got.digest == expected.hexdigest() and got.size == 1 << 30
        assert peak < 8 << 20, f"peak traced memory {peak} bytes for a 1 GiB file"
        # holes stay holes, in the blob and in the restored file
        assert os.stat(blobs.path(got.digest)).st_blocks * 512 < 4 << 20
        restored = ws.abspath(b"restored")
        assert os.stat(restored).st_size == 1 << 30
        assert os.stat(restored).st_blocks * 512 < 4 << 20
        assert applied.after.sha256 == got.digest
        with open(restored, "rb") as f:
            f.seek(300 << 20)
            assert f.read(6) == b"island"

    def test_corruption_is_detected_on_the_way_out(self, blobs, ws):
        d = blobs.put_bytes(b"precious content").digest
        build(ws.root, {"f": "current"})
        p = blobs.path(d)
        os.chmod(p, 0o600)
        with open(p, "r+b") as f:
            f.write(b"X")
        with pytest.raises(CorruptionError) as e:
            _read_all(blobs, d)
        assert e.value.file == p
        assert not blobs.verify(d)
        snap = TreeSnapshot(ws.root)
        with pytest.raises(CorruptionError):
            apply.write_blob(ws, "f", blobs, d)
        snap.assert_same(what="a corrupt blob must not reach the workspace")
        with pytest.raises(CorruptionError, match="missing"):
            apply.write_blob(ws, "f", blobs, sha(b"never stored"))
        snap.assert_same()

    def test_gc_keeps_the_referenced(self, blobs):
        keep = {blobs.put_bytes(b"keep %d" % i).digest for i in range(5)}
        drop = {blobs.put_bytes(b"drop %d" % i).digest for i in range(7)}
        res = blobs.gc(keep)
        assert (res.removed, res.kept) == (7, 5)
        assert set(blobs) == keep
        assert not any(blobs.has(d) for d in drop)
        assert blobs.put_bytes(b"drop 1").written == 6  # stored again after a gc

    def test_stray_temps_removed(self, blobs):
        with open(os.path.join(blobs.tmp, "123-0-dead"), "wb") as f:
            f.write(b"half")
        assert [os.path.basename(p) for p in blobs.remove_temps()] == ["123-0-dead"]
        assert os.listdir(blobs.tmp) == []

    def test_a_failed_put_leaves_no_temp(self, blobs, tmp_path):
        src = tmp_path / "src"
        src.write_bytes(os.urandom(2 * CHUNK))
        fb = FaultBackend()
        fb.fail("pwrite", errno.ENOSPC, nth=2)
        with installed(fb), pytest.raises(OSError) as e:
            blobs.put_file(str(src))
        assert e.value.errno == errno.ENOSPC
        assert os.listdir(blobs.tmp) == [] and list(blobs) == []

    def test_batch_names_blobs_only_once_all_are_durable(self, blobs, tmp_path):
        fb = FaultBackend(record=True)
        with installed(fb):
            with blobs.batch():
                digests = [blobs.put_bytes(b"blob %d" % i).digest for i in range(20)]
                assert blobs.put_bytes(b"blob 3").written == 0   # dedup inside a batch
                assert all(blobs.has(d) for d in digests)
                assert list(blobs) == []                          # nothing named yet
                with pytest.raises(FileNotFoundError):
                    _read_all(blobs, digests[0])
        ops = [e.op for e in fb.events if e.op != "pwrite"]
        first_rename = ops.index("rename")
        assert ops[:first_rename].count("fsync") == 20            # every temp durable ...
        assert "fsync" not in ops[first_rename:]                  # ... before any name
        assert ops[-1] == "fsync_dir"
        assert sorted(blobs) == sorted(digests)
        assert all(_read_all(blobs, d) == b"blob %d" % i for i, d in enumerate(digests))
        with pytest.raises(RuntimeError), blobs.batch():
            blobs.put_bytes(b"never named")
            raise RuntimeError("the snapshot failed")
        assert not blobs.has(sha(b"never named")) and os.listdir(blobs.tmp) == []

    def test_reflink_where_offered_and_a_clean_fallback(self, tmp_path):
        src = tmp_path / "src"
        src.write_bytes(os.urandom(2 * CHUNK + 3))
        data = src.read_bytes()

        class Cloning(fileio.OSBackend):
            cloned = 0

            def clone(self, s, d):  # a file system with reflinks, emulated by a copy
                Cloning.cloned += 1
                os.sendfile(d, s, 0, os.fstat(s).st_size)
        b1 = BlobStore(str(tmp_path / "b1"))
        with installed(Cloning()):
            got = b1.put_file(str(src))
            again = b1.put_file(str(src))
        assert got.method == "clone" and got.written == len(data)
        assert Cloning.cloned == 1, "known content must not even be cloned"
        assert again.method == "dedup" and os.listdir(b1.tmp) == []
        assert _read_all(b1, got.digest) == data

        class NoClones(fileio.OSBackend):
            def clone(self, s, d):
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        b2 = BlobStore(str(tmp_path / "b2"))
        with installed(NoClones()):
            got2 = b2.put_file(str(src))
        assert got2.method == "stream" and got2.digest == got.digest
        assert b2._clone_ok is False and os.listdir(b2.tmp) == []
        with installed(NoClones()), pytest.raises(OSError, match="cannot clone"):
            BlobStore(str(tmp_path / "b3"), copy="clone").put_file(str(src))
        b4 = BlobStore(str(tmp_path / "b4"), copy="copy_range")
        got4 = b4.put_file(str(src))
        assert got4.method == "copy_range" and _read_all(b4, got4.digest) == data
        # and on this machine's own file system, whatever it offers
        got5 = BlobStore(str(tmp_path / "b5")).put_file(str(src))
        assert got5.digest == got.digest and got5.method in ("clone", "stream")

    def test_a_file_changing_during_put_is_retried_then_busy(self, blobs, tmp_path,
                                                             monkeypatch):
        from walstore.files import blobs as blobs_mod
        src = tmp_path / "src"
        src.write_bytes(b"v0" * 100)
        real = blobs_mod.iter_content
        calls = {"n": 0}

        def changing(fd, buf=None):
            calls["n"] += 1
            if calls["n"] <= 2:  # changes during the first try only
                with open(src, "ab") as f:
                    f.write(b"+")
            yield from real(fd, buf)
        monkeypatch.setattr(blobs_mod, "iter_content", changing)
        got = blobs.put_file(str(src))
        assert got.digest == sha(src.read_bytes())
        assert _read_all(blobs, got.digest) == src.read_bytes()
        calls["n"] = -100  # now it changes on every read
        with pytest.raises(FileBusyError):
            blobs.put_file(str(src))


# =========================================================================================
# apply: the primitives
# =========================================================================================
def _umask() -> int:
    return apply._get_umask()


class TestApplyPrimitives:
    def test_write_creates_parents_and_reports_them(self, ws):
        got = apply.write_file(ws, "a/b/c.txt", "héllo\n")
        assert got.created == [b"a", b"a/b"]
        assert got.after.same(Entry.file(0o666 & ~_umask(), 7, sha("héllo\n".encode())))
        assert_tree_equal(ws.root, {
            b"a": ("dir", 0o777 & ~_umask()), b"a/b": ("dir", 0o777 & ~_umask()),
            b"a/b/c.txt": ("file", 0o666 & ~_umask(), 7, sha("héllo\n".encode()))})

    def test_overwrite_keeps_the_mode_unless_given(self, ws):
        build(ws.root, {"f": File(b"old", 0o751)})
        apply.write_file(ws, "f", b"new")
        assert stat.S_IMODE(os.stat(ws.abspath(b"f")).st_mode) == 0o751
        got = apply.write_file(ws, "f", b"newer", mode=0o600)
        assert got.created == [] and got.after.mode == 0o600
        assert stat.S_IMODE(os.stat(ws.abspath(b"f")).st_mode) == 0o600

    def test_write_order_is_temp_fsync_rename_dirfsync(self, ws):
        fb = FaultBackend(record=True)
        with installed(fb):
            apply.write_file(ws, "f", b"data")
        ops = [e.op for e in fb.events]
        assert ops == ["open", "pwrite", "fsync", "rename", "fsync_dir"]
        tmp = fb.events[0].path
        assert os.path.basename(os.fsencode(tmp)).startswith(TEMP_PREFIX)
        assert os.path.dirname(tmp) == ws.root
        assert fb.events[3].dst == os.path.join(ws.root, "f")
        assert fb.events[4].path == ws.root
        fb2 = FaultBackend(record=True)
        with installed(fb2):
            apply.write_file(ws, "g", b"data", durable=False)
        assert [e.op for e in fb2.events] == ["open", "pwrite", "rename"]

    def test_write_over_a_directory_or_special_file_is_refused(self, ws):
        build(ws.root, {"d/x": "x"})
        with pytest.raises(IsADirectoryError):
            apply.write_file(ws, "d", b"x")
        os.mkfifo(ws.abspath(b"fifo"))
        with pytest.raises(UnsupportedFileType):
            apply.write_file(ws, "fifo", b"x")

    def test_set_mode(self, ws):
        build(ws.root, {"f": File("x", 0o644), "d": Dir(0o755), "l": Link("f")})
        assert apply.set_mode(ws, "f", 0o4750).after.mode == 0o4750
        assert apply.set_mode(ws, "d", 0o700).after.mode == 0o700
        with pytest.raises(ValueError, match="symlink"):
            apply.set_mode(ws, "l", 0o600)
        with pytest.raises(ValueError):
            apply.set_mode(ws, "f", 0o10000)
        with pytest.raises(FileNotFoundError):
            apply.set_mode(ws, "missing", 0o600)

    def test_make_dir_has_its_exact_mode_at_once(self, ws):
        old = os.umask(0o077)
        try:
            got = apply.make_dir(ws, "p/q", 0o755)
        finally:
            os.umask(old)
        assert got.created == [b"p"] and got.after.same(Entry.dir(0o755))
        assert stat.S_IMODE(os.stat(ws.abspath(b"p/q")).st_mode) == 0o755
        with pytest.raises(FileExistsError):
            apply.make_dir(ws, "p/q")
        assert not any(n.startswith(TEMP_PREFIX) for n in os.listdir(ws.abspath(b"p")))

    def test_symlinks(self, ws, outside):
        build(ws.root, {"f": "x", "d": Dir()})
        got = apply.make_symlink(ws, "f", str(outside / "secret.txt"))
        assert got.after.same(Entry.symlink(os.fsencode(outside / "secret.txt")))
        assert (outside / "secret.txt").read_bytes() == b"do not touch"
        apply.make_symlink(ws, "new/l", b"target\xff")
        assert os.readlink(ws.abspath(b"new/l")) == b"target\xff"
        with pytest.raises(IsADirectoryError):
            apply.make_symlink(ws, "d", "x")
        with pytest.raises(ValueError):
            apply.make_symlink(ws, "z", "")

    def test_delete(self, ws):
        build(ws.root, {"f": "x", "l": Link("f"), "e": Dir(), "full/x": "y"})
        assert apply.delete(ws, "f").kind == "file"
        assert apply.delete(ws, "l").kind == "symlink"
        assert apply.delete(ws, "e").kind == "dir"
        with pytest.raises(OSError) as e:
            apply.delete(ws, "full")
        assert e.value.errno == errno.ENOTEMPTY and "full" in str(e.value)
        with pytest.raises(FileNotFoundError):
            apply.delete(ws, "f")
        assert set(tree_state(ws.root)) == {b"full", b"full/x"}

    def test_rename(self, ws):
        build(ws.root, {"a.txt": "A", "dir/x": "X", "dst": "old"})
        got = apply.rename(ws, "a.txt", "deep/er/b.txt")
        assert got.created == [b"deep", b"deep/er"]
        assert (Path(ws.root) / "deep/er/b.txt").read_bytes() == b"A"
        apply.rename(ws, "deep/er/b.txt", "dst")            # over a file
        assert (Path(ws.root) / "dst").read_bytes() == b"A"
        apply.rename(ws, "dir", "moved")
        assert (Path(ws.root) / "moved/x").read_bytes() == b"X"
        for src, dst, err in [("moved", "moved/inside", ValueError), ("dst", "dst", ValueError),
                              ("nope", "x", FileNotFoundError),
                              ("dst", "moved", IsADirectoryError)]:
            with pytest.raises(err):
                apply.rename(ws, src, dst)

    def test_rmtree_children_before_parents_never_through_links(self, ws, outside):
        build(ws.root, {"t/a/b/c": "c", "t/a/d": Dir(), "t/f": "f", "t/out": Link(str(outside)),
                        "keep": "k"})
        removed, kept = apply.rmtree(ws, "t")
        assert kept == []
        assert set(removed) == {b"t", b"t/a", b"t/a/b", b"t/a/b/c", b"t/a/d", b"t/f", b"t/out"}
        for i, r in enumerate(removed):
            assert not any(other.startswith(r + b"/") for other in removed[i + 1:]), \
                f"{r} removed before its children"
        assert set(tree_state(ws.root)) == {b"keep"}
        assert (outside / "secret.txt").read_bytes() == b"do not touch"

    def test_rmtree_with_expected_keeps_what_is_new_or_changed(self, ws):
        build(ws.root, {"t/a/x": "x", "t/b/y": "y", "t/z": "z"})
        captured = {rel: read_entry(ws.abspath(rel)) for rel in
                    (b"t", b"t/a", b"t/a/x", b"t/b", b"t/b/y", b"t/z")}
        build(ws.root, {"t/a/stranger": "s"})           # appeared after the capture
        (Path(ws.root) / "t/z").write_bytes(b"zz")       # changed after the capture
        removed, kept = apply.rmtree(ws, "t", expected=captured)
        assert set(kept) == {b"t/a/stranger", b"t/a", b"t/z", b"t"}
        assert set(removed) == {b"t/a/x", b"t/b/y", b"t/b"}
        assert set(tree_state(ws.root)) == {b"t", b"t/a", b"t/a/stranger", b"t/z"}

    def test_weird_names_everywhere(self, ws, blobs):
        d = b"dir\nwith newline\xff"
        got = apply.write_file(ws, d + b"/" + WEIRD, b"x")
        assert got.created == [d]
        apply.make_symlink(ws, d + b"/link\n", WEIRD)
        apply.rename(ws, d + b"/" + WEIRD, WEIRD)
        apply.set_mode(ws, WEIRD, 0o600)
        state = tree_state(ws.root)
        assert state[WEIRD] == ("file", 0o600, 1, sha(b"x"))
        assert state[d + b"/link\n"] == ("symlink", WEIRD)
        assert apply.restore(ws, WEIRD, Entry.absent(), None, blobs) is None
        apply.rmtree(ws, d)
        assert tree_state(ws.root) == {}


class TestNothingHalfDone:
    """Errors are the OS's own, name the path, and leave no trace of the attempt."""

    def test_permission_denied_for_real(self, ws, blobs):
        build(ws.root, {"ro/f": File(b"old", 0o644), "ro/d": Dir(), "ok": Dir()})
        d = blobs.put_bytes(b"before").digest
        snap = TreeSnapshot(ws.root)
        with Immutable(ws.abspath(b"ro")):
            calls = [lambda: apply.write_file(ws, "ro/f", b"new"),
                     lambda: apply.write_file(ws, "ro/new/deeper/f", b"new"),
                     lambda: apply.make_dir(ws, "ro/x/y"),
                     lambda: apply.make_symlink(ws, "ro/l", "t"),
                     lambda: apply.delete(ws, "ro/f"),
                     lambda: apply.rename(ws, "ro/f", "ok/f"),
                     lambda: apply.rename(ws, "ok", "ro/ok"),
                     lambda: apply.rmtree(ws, "ro/d"),
                     lambda: apply.restore(ws, "ro/f", Entry.file(0o644, 6, d), None, blobs),
                     lambda: apply.restore(ws, "ro/f", Entry.absent(), None, blobs)]
            for call in calls:
                with pytest.raises(PermissionError) as e:
                    call()
                assert "ro" in str(e.value) and ws.root in str(e.value)
                snap.assert_same(what="after a permission error")

    def test_a_late_failure_removes_the_parents_it_created(self, ws):
        build(ws.root, {"keep": "k"})
        snap = TreeSnapshot(ws.root)
        fb = FaultBackend()
        fb.fail("rename", errno.EACCES, path=f"*{TEMP_PREFIX.decode()}*", nth=3)
        with installed(fb), pytest.raises(PermissionError, match="n1/n2/f"):
            apply.write_file(ws, "n1/n2/f", b"x")   # renames 1, 2: the parents; 3: the file
        snap.assert_same(what="after the file's rename failed")
        with pytest.raises(OSError) as e:
            apply.write_file(ws, "p1/p2/" + "x" * 300, b"x")  # name too long, at the rename
        assert e.value.errno == errno.ENAMETOOLONG
        snap.assert_same(what="after ENAMETOOLONG")

    def test_disk_full_while_writing(self, ws):
        build(ws.root, {"f": "old"})
        snap = TreeSnapshot(ws.root)
        fb = FaultBackend()
        fb.fail("pwrite", errno.ENOSPC, partial=2)
        with installed(fb), pytest.raises(OSError) as e:
            apply.write_file(ws, "f", b"new content")
        assert e.value.errno == errno.ENOSPC and "'f'" in str(e.value)
        snap.assert_same()


# =========================================================================================
# apply: restore and conflicts
# =========================================================================================
STATES = {
    "absent": None,
    "file": File(b"file A\n", 0o644),
    "file-mode": File(b"file A\n", 0o600),
    "file-B": File(b"B" * 5000, 0o755),
    "empty": File(b"", 0o640),
    "dir": Dir(0o750),
    "dir-mode": Dir(0o700),
    "symlink": Link("target-1"),
    "symlink-2": Link(b"target-\xff"),
}


def _put_state(root: str, rel: str, what) -> None:
    p = os.path.join(root, rel)
    if os.path.lexists(p):
        if os.path.isdir(p) and not os.path.islink(p):
            os.rmdir(p)
        else:
            os.unlink(p)
    if what is not None:
        build(root, {rel: what})


def _entry_now(ws: Workspace, rel: bytes) -> Entry:
    return read_entry(ws.abspath(rel))


class TestRestore:
    @pytest.mark.parametrize("before", list(STATES))
    @pytest.mark.parametrize("after", list(STATES))
    def test_every_before_over_every_after(self, ws, blobs, before, after):
        """Put ``before`` back over walstore's ``after``: byte-exact, idempotent."""
        build(ws.root, {"sib": "sibling"})
        _put_state(ws.root, "p", STATES[before])
        want = tree_state(ws.root)
        b = _entry_now(ws, b"p")
        if b.is_file:
            blobs.put_file(ws.abspath(b"p"))
        _put_state(ws.root, "p", STATES[after])
        a = _entry_now(ws, b"p")
        assert apply.restore(ws, "p", b, a, blobs, quarantine=None) is None
        assert_tree_equal(ws.root, want, f"{after} -> {before}", skip_prefix=None)
        assert apply.restore(ws, "p", b, a, blobs) is None      # again: nothing to do
        assert_tree_equal(ws.root, want)

    @pytest.mark.skipif(os.geteuid() != 0, reason="ownership is restored only as root")
    def test_ownership_is_restored_as_root(self, ws, blobs):
        d = blobs.put_bytes(b"owned").digest
        f = Entry.file(0o640, 5, d, uid=1234, gid=2345)
        assert apply.restore(ws, "f", f, None, blobs) is None
        assert apply.restore(ws, "d", Entry.dir(0o750, 1234, 2345), None, blobs) is None
        assert apply.restore(ws, "l", Entry.symlink("t", 1234, 2345), None, blobs) is None
        for n in (b"f", b"d", b"l"):
            st = os.lstat(ws.abspath(n))
            assert (st.st_uid, st.st_gid) == (1234, 2345), n
        build(ws.root, {"g": "x"})
        os.chown(ws.abspath(b"g"), 1234, 2345)
        e = read_entry(ws.abspath(b"g"))
        os.chown(ws.abspath(b"g"), 0, 0)
        apply.restore(ws, "g", e, None, blobs)   # same content and mode: ownership only?
        assert os.stat(ws.abspath(b"g")).st_uid == 0, "ownership alone is not a change"

    def test_restore_into_a_missing_parent(self, ws, blobs):
        d = blobs.put_bytes(b"x").digest
        assert apply.restore(ws, "gone/deep/f", Entry.file(0o600, 1, d), Entry.absent(),
                             blobs) is None
        assert (Path(ws.root) / "gone/deep/f").read_bytes() == b"x"

    def test_conflict_keeps_both(self, ws, blobs, tmp_path):
        q = str(tmp_path / "store" / "quarantine")
        build(ws.root, {"f": File(b"walstore before", 0o640)})
        before = _entry_now(ws, b"f")
        blobs.put_file(ws.abspath(b"f"))
        apply.write_file(ws, "f", b"walstore after")
        after = _entry_now(ws, b"f")
        (Path(ws.root) / "f").write_bytes(b"a stranger's edit")
        st = apply.restore_status(ws, "f", before, after)
        assert st.state == "conflict" and st.current.sha256 == sha(b"a stranger's edit")
        c = apply.restore(ws, "f", before, after, blobs, q)
        assert c is not None and c.path == b"f" and "behind walstore's back" in c.reason
        assert (Path(ws.root) / "f").read_bytes() == b"a stranger's edit"   # theirs stays
        assert c.saved_as == os.path.join(q, "f")
        assert Path(c.saved_as).read_bytes() == b"walstore before"          # ours is kept
        assert stat.S_IMODE(os.stat(c.saved_as).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(q).st_mode) == 0o700
        assert c.before.mode == 0o640                 # the record still knows the real mode
        again = apply.restore(ws, "f", before, after, blobs, q)
        assert again.saved_as == os.path.join(q, "f.1")
        row = msgpack.unpackb(msgpack.packb(c.to_row(), use_bin_type=True), raw=False)
        assert apply.FileConflict.from_row(row) == c
        # forced: the before-image wins
        assert apply.restore(ws, "f", before, None, blobs) is None
        assert (Path(ws.root) / "f").read_bytes() == b"walstore before"

    def test_conflicts_of_every_kind(self, ws, blobs, tmp_path):
        q = str(tmp_path / "q")
        # walstore created a file; a stranger replaced it by a symlink: nothing to save
        build(ws.root, {"new": Link("x")})
        c = apply.restore(ws, "new", Entry.absent(), Entry.file(0o644, 1, sha(b"1")), blobs, q)
        assert c is not None and c.saved_as is None and os.path.islink(ws.abspath(b"new"))
        # walstore made a directory, a stranger put a file in it: the directory stays
        build(ws.root, {"made/theirs": "t"})
        made = _entry_now(ws, b"made")
        c = apply.restore(ws, "made", Entry.absent(), made, blobs, q)
        assert c is not None and "holds files" in c.reason
        assert (Path(ws.root) / "made/theirs").read_bytes() == b"t"
        # a symlink before-image is kept as a symlink, a dir as a dir
        build(ws.root, {"s": "stranger", "d": "stranger"})
        c1 = apply.restore(ws, "s", Entry.symlink(b"/etc/passwd"), Entry.absent(), blobs, q)
        c2 = apply.restore(ws, "d", Entry.dir(0o755), Entry.absent(), blobs, q)
        assert os.readlink(c1.saved_as) == "/etc/passwd"
        assert os.path.isdir(c2.saved_as) and not os.path.islink(c2.saved_as)
        assert (Path(ws.root) / "s").read_bytes() == b"stranger"

    def test_status_classes(self, ws, blobs):
        build(ws.root, {"f": "x"})
        x = _entry_now(ws, b"f")
        assert apply.restore_status(ws, "f", x, None).state == "done"
        assert apply.restore_status(ws, "f", Entry.absent(), x).state == "apply"
        assert apply.restore_status(ws, "f", Entry.absent(), Entry.dir(0o755)).state == \
            "conflict"
        assert apply.restore_status(ws, "f", Entry.absent(), None).state == "apply"


class TestStrayTemps:
    def test_recognised_and_removed(self, ws):
        def t(tag: bytes) -> bytes:  # walstore's exact form: <pid hex>-<12 hex digits>
            return TEMP_PREFIX + b"%x-" % (0x100 + len(tag)) + tag.hex().encode().ljust(12, b"0")
        build(ws.root, {"a/real": "r", "b/c/real": "r"})
        names = [b"a/" + t(b"1x"), b"b/c/" + t(b"2y"), t(b"3z")]
        for n in names:
            with open(ws.abspath(n), "wb") as f:
                f.write(b"half")
        os.symlink("t", ws.abspath(b"a/" + t(b"link")))
        os.mkdir(ws.abspath(b"b/" + t(b"dir")))
        os.mkdir(ws.abspath(b"b/" + t(b"full")))
        build(ws.root, {"b/" + t(b"full").decode() + "/x": "someone's"})
        # a name that only starts like them is not walstore's: kept
        build(ws.root, {"a/" + (TEMP_PREFIX + b"notes").decode(): "the user's"})
        assert apply.remove_stray_temps(ws, ["a"]) == sorted(
            [b"a/" + t(b"1x"), b"a/" + t(b"link")])
        gone = apply.remove_stray_temps(ws)
        assert set(gone) == {b"b/c/" + t(b"2y"), t(b"3z"), b"b/" + t(b"dir")}
        assert os.path.exists(ws.abspath(b"b/" + t(b"full") + b"/x"))
        assert os.path.exists(ws.abspath(b"a/" + TEMP_PREFIX + b"notes"))


# =========================================================================================
# kill -9 in the middle of an apply
# =========================================================================================
def _child(spec: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(SUPPORT), "child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _line(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    import select
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError("the child said nothing in time")
    line = proc.stdout.readline().decode()
    if not line:
        proc.wait()
        raise AssertionError(f"the child ended early: {proc.stderr.read().decode()[-2000:]}")
    return line.strip()


BIG = bytes(range(256)) * (10 * 1024) + b"tail"   # 2.5 MiB: several chunks through a blob
KILL_CASES = {
    # name: (initial tree, op, args, parents the op creates)
    "overwrite": ({"d/f": File(b"old content\n" * 1000, 0o640), "d/g": "sibling"},
                  "write", {"path": "d/f", "data": "new content\n" * 900}, []),
    "new-with-parents": ({"keep": "k"}, "write",
                         {"path": "n1/n2/f", "data": "fresh", "mode": 0o600}, ["n1", "n1/n2"]),
    "restore-big-blob": ({"d/f": File(b"small current", 0o600)}, "restore",
                         {"path": "d/f", "before": ["f", 0o644, len(BIG), sha(BIG), None, None]},
                         []),
    "symlink-over-file": ({"l": "a file"}, "symlink", {"path": "l", "target": "elsewhere"}, []),
    "mkdir": ({"keep": "k"}, "mkdir", {"path": "m/n", "mode": 0o751}, ["m"]),
}


class TestKillNine:
    """A real child process runs one apply; the test kills it with SIGKILL while it is
    stopped before or after each seam call (open, pwrite, fsync, rename, fsync_dir, ...).
    Afterwards the path holds the old content or the new, never a mix; parents the op
    created are the only other difference (the engine undoes them: their before-image is
    absence); stray temp names are recognised and removed."""

    @pytest.mark.parametrize("case", list(KILL_CASES))
    def test_old_or_new_never_a_mix(self, tmp_path, case):
        tree, op, args, parents = KILL_CASES[case]
        blobs = BlobStore(str(tmp_path / "blobs"))
        blobs.put_bytes(BIG)

        def fresh(name: str) -> Path:
            root = tmp_path / name
            root.mkdir()
            build(str(root), tree)
            age(str(root))
            return root

        # a full run: how many seam calls, and the new state
        done_root = fresh("done")
        old_state = tree_state(str(done_root))
        proc = _child({"root": str(done_root), "blobs": blobs.dir, "op": op, "args": args})
        line = _line(proc)
        proc.wait()
        assert line.startswith("DONE"), line
        n_calls = int(line.split()[1])
        new_state = tree_state(str(done_root))
        assert new_state != old_state and n_calls >= 2
        allowed = [old_state, new_state]
        for k in range(1, len(parents) + 1):  # old + the first k created parents
            partial = dict(old_state)
            for p in parents[:k]:
                partial[p.encode()] = new_state[p.encode()]
            allowed.append(partial)

        seen = set()
        for n in range(1, n_calls + 1):
            for when in ("before", "after"):
                root = fresh(f"run-{n}-{when}")
                proc = _child({"root": str(root), "blobs": blobs.dir, "op": op, "args": args,
                               "stop": [n, when]})
                line = _line(proc)
                assert line.startswith("STOP"), line
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL
                seen.add(f"{when} {line.split()[1]}")
                state = tree_state(str(root), skip_prefix=TEMP_PREFIX)
                assert state in allowed, (
                    f"killed {when} seam call {n} ({line}): a state that is neither old "
                    f"nor new:\n" + "\n".join(f"  {os.fsdecode(k)!r}: {v}" for k, v in
                                             sorted(state.items())))
                w = Workspace(str(root))
                apply.remove_stray_temps(w)
                assert tree_state(str(root)) == state, "a temp name survived the cleanup"
                # what the engine's recovery does: put the before-images back
                for p in reversed(parents + [args["path"]]):
                    orig = old_state.get(p.encode())
                    entry = _state_entry(orig)
                    if entry.is_file:
                        _ensure_blob(blobs, tree, p)
                    apply.restore(w, p, entry, None, blobs)
                assert_tree_equal(str(root), old_state, f"{case}: recovered after {line}")
        assert {"before rename", "after rename"} <= seen
        assert any(s.endswith("fsync_dir") for s in seen)


def _state_entry(state: tuple | None) -> Entry:
    if state is None:
        return Entry.absent()
    if state[0] == "file":
        return Entry.file(state[1], state[2], state[3])
    if state[0] == "dir":
        return Entry.dir(state[1])
    return Entry.symlink(state[1])


def _ensure_blob(blobs: BlobStore, tree: dict, rel: str) -> None:
    what = tree[rel]
    data = what.content if isinstance(what, File) else what
    blobs.put_bytes(data.encode() if isinstance(data, str) else data)


# =========================================================================================
# watch: manifests and diffs
# =========================================================================================
def _tree_of(n_files: int, size: int = 200) -> dict:
    return {f"src/m{i // 50}/f{i}.c": os.urandom(size) for i in range(n_files)}


class TestManifest:
    def test_first_snapshot_stores_every_tracked_file(self, ws, blobs):
        build(ws.root, {"a/x.c": "x", "a/y.o": "obj", "build/out": "o", "l": Link("a/x.c"),
                        "e": Dir(0o700), WEIRD: b"w"})
        ws2 = Workspace(ws.root, ignore=["*.o", "build/"])
        m = snapshot(ws2, blobs)
        assert set(m.records) == {b"a", b"a/x.c", b"l", b"e", WEIRD}
        assert all(blobs.has(d) for d in m.digests())
        assert m.entry(b"l").same(Entry.symlink(b"a/x.c"))
        assert m.entry(b"e").same(Entry.dir(0o700))
        assert m.entry(b"nope") == Entry.absent()
        assert m.stats.hashed_files == 2 and m.stats.stored_files == 2

    def test_incremental_cost_grows_with_what_changed(self, ws, blobs):
        build(ws.root, _tree_of(400))
        age(ws.root)
        m0 = snapshot(ws, blobs)
        assert m0.stats.hashed_files == 400 and m0.stats.racy == 0
        m1 = snapshot(ws, blobs, previous=m0)
        assert (m1.stats.hashed_files, m1.stats.hashed_bytes, m1.stats.reused) == (0, 0, 400)
        assert m1.stats.walked == m0.stats.walked
        changed = [f"src/m{i // 50}/f{i}.c" for i in (3, 77, 301)]
        for c in changed:
            (Path(ws.root) / c).write_bytes(b"edited " + c.encode())
        fb = FaultBackend()
        with installed(fb):
            m2 = snapshot(ws, blobs, previous=m1)
        assert m2.stats.hashed_files == 3
        assert m2.stats.hashed_bytes == sum(len(b"edited " + c.encode()) for c in changed)
        assert m2.stats.stored_files == 3 and m2.stats.reused == 397
        assert len(fb.calls_to("pwrite")) == 3          # the store grew by the edits only
        assert [c.path for c in diff(m1, m2)] == sorted(c.encode() for c in changed)
        # edits in the snapshot's own clock tick are "racy": re-hashed once more, no more
        racy = {p for p, r in m2.records.items() if m2.is_racy(r)}
        assert racy <= {c.encode() for c in changed} and m2.stats.racy == len(racy)
        m3 = snapshot(ws, blobs, previous=m2)
        assert m3.stats.hashed_files == len(racy) and m3.stats.stored_files == 0
        assert diff(m2, m3) == []

    def test_racy_files_are_rehashed_even_with_identical_metadata(self, ws, blobs):
        """A file whose mtime falls in the snapshot's own clock tick (or later) may change
        again without its metadata changing: such a file is never trusted by metadata."""
        build(ws.root, {"old": "o", "hot": "h", "recent": "r"})
        age(ws.root)
        later = time.time_ns() + 5_000_000_000   # at or after any tick of this snapshot
        os.utime(ws.abspath(b"hot"), ns=(later, later))
        (Path(ws.root) / "recent").write_text("r2")
        time.sleep(0.1)                           # well before the next snapshot's tick
        m0 = snapshot(ws, blobs)
        assert m0.tick_dev == os.stat(ws.root).st_dev   # the file system's own clock
        assert m0.is_racy(m0.records[b"hot"]) and not m0.is_racy(m0.records[b"old"])
        assert not m0.is_racy(m0.records[b"recent"]), "a 0.1 s old edit is not racy"
        m1 = snapshot(ws, blobs, previous=m0)       # nothing changed at all
        assert (m1.stats.hashed_files, m1.stats.reused) == (1, 2)
        # without a tick on the same file system: the conservative wall-clock window
        m2 = snapshot(ws, None, previous=m1)
        assert m2.tick_dev is None and m2.is_racy(m2.records[b"recent"])
        assert m2.stats.hashed_files == 1                # m1's own tick decides for m1
        m3 = snapshot(ws, None, previous=m2)
        assert m3.stats.hashed_files == 2                # hot and recent, by m2's window

    def test_a_tool_restoring_mtimes_is_still_seen(self, ws, blobs):
        build(ws.root, {"f": "aaaa"})
        age(ws.root)
        m0 = snapshot(ws, blobs)
        st = os.stat(ws.abspath(b"f"))
        (Path(ws.root) / "f").write_bytes(b"bbbb")                  # same size
        os.utime(ws.abspath(b"f"), ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
        m1 = snapshot(ws, blobs, previous=m0)
        assert [(c.path, c.kind) for c in diff(m0, m1)] == [(b"f", "modified")]

    def test_a_gced_blob_is_stored_again(self, ws, blobs):
        build(ws.root, {"f": "content"})
        age(ws.root)
        m0 = snapshot(ws, blobs)
        blobs.gc(set())
        m1 = snapshot(ws, blobs, previous=m0)
        assert m1.stats.stored_files == 1 and blobs.has(m1.records[b"f"].sha256)

    def test_save_and_load(self, ws, blobs):
        build(ws.root, {**_tree_of(30), "l": Link(b"t\xff"), WEIRD: "w", "d": Dir(0o711)})
        m = snapshot(ws, blobs)
        m2 = Manifest.load(blobs, m.save(blobs))
        assert m2.records == m.records
        assert (m2.taken_ns, m2.racy_ns, m2.root) == (m.taken_ns, m.racy_ns, m.root)
        with pytest.raises(ValueError):
            Manifest.load(blobs, blobs.put_bytes(msgpack.packb({"v": 99})).digest)

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
    def test_an_unreadable_file_is_a_clear_error(self, ws, blobs):
        build(ws.root, {"secret": File("s", 0o000)})
        with pytest.raises(PermissionError, match="secret.*ignore it"):
            snapshot(ws, blobs)

    def test_special_files_are_skipped_and_listed(self, ws, blobs):
        build(ws.root, {"f": "x"})
        os.mkfifo(ws.abspath(b"pipe"))
        m = snapshot(ws, blobs)
        assert set(m.records) == {b"f"} and m.stats.skipped == [b"pipe"]

    def test_temp_names_are_never_tracked(self, ws, blobs):
        build(ws.root, {"f": "x", (TEMP_PREFIX + b"1-0123456789ab").decode(): "half",
                        (TEMP_PREFIX + b"notes").decode(): "the user's"})
        assert set(snapshot(ws, blobs).records) == {b"f", TEMP_PREFIX + b"notes"}


class TestDiff:
    def test_every_kind(self, ws, blobs):
        build(ws.root, {"mod": "1", "del": "d", "mode": File("m", 0o644), "dmode": Dir(0o755),
                        "link": Link("a"), "retype": "was a file", "ren/a": "moving",
                        "ign.o": "x"})
        w = Workspace(ws.root, ignore=["*.o"])
        m0 = snapshot(w, blobs)
        (Path(ws.root) / "mod").write_text("2")
        os.unlink(ws.abspath(b"del"))
        os.chmod(ws.abspath(b"mode"), 0o600)
        os.chmod(ws.abspath(b"dmode"), 0o700)
        os.unlink(ws.abspath(b"link"))
        os.symlink("b", ws.abspath(b"link"))
        os.unlink(ws.abspath(b"retype"))
        os.mkdir(ws.abspath(b"retype"))
        os.rename(ws.abspath(b"ren/a"), ws.abspath(b"ren/b"))
        (Path(ws.root) / "new").write_text("n")
        (Path(ws.root) / "ign.o").write_text("changed but ignored")
        (Path(ws.root) / "new.o").write_text("new but ignored")
        m1 = snapshot(w, blobs, previous=m0)
        got = {(os.fsdecode(c.path), c.kind) for c in diff(m0, m1)}
        assert got == {("mod", "modified"), ("del", "deleted"), ("mode", "mode"),
                       ("dmode", "mode"), ("link", "symlink"), ("retype", "type"),
                       ("ren/a", "deleted"), ("ren/b", "created"), ("new", "created")}
        ch = {c.path: c for c in diff(m0, m1)}
        assert ch[b"mod"].before.sha256 == sha(b"1") and ch[b"mod"].after.sha256 == sha(b"2")
        assert ch[b"ren/b"].before == Entry.absent()
        # a diff can also filter by other patterns
        assert {c.path for c in diff(m0, m1, IgnoreRules(["re*"]))} == \
            {b"mod", b"del", b"mode", b"dmode", b"link", b"new"}

    def test_undo_order(self):
        f, d, a = Entry.file(0o644, 1, sha(b"x")), Entry.dir(0o755), Entry.absent()
        C = watch.Change
        changes = [C(b"n", "created", a, d), C(b"n/x", "created", a, f),
                   C(b"g", "deleted", d, a), C(b"g/y", "deleted", f, a),
                   C(b"t", "type", f, d), C(b"t/z", "created", a, f),
                   C(b"m", "modified", f, f)]
        order = [c.path for c in undo_order(changes)]
        assert order.index(b"n/x") < order.index(b"n")      # remove children first
        assert order.index(b"t/z") < order.index(b"t")
        assert order.index(b"g") < order.index(b"g/y")      # re-create parents first
        assert order.index(b"t") < order.index(b"g")        # removals before re-creations


# =========================================================================================
# watch: real subprocesses
# =========================================================================================
SCRIPT = r"""
set -e
cd "$1"
echo edited >> src/app.c
rm src/old.c
mv src/keep.h src/renamed.h
chmod 700 run.sh
mkdir -p build/obj && echo obj > build/obj/app.o
echo new > src/new.c
rm conf && mkdir conf && echo inner > conf/inner.txt
rm -r data && ln -s "$2" data
ln -sfn other link
mkdir emptydir
printf 'x\nweird' > "$(printf 'we\nird')"
"""


class TestWatchSubprocess:
    def _tree(self) -> dict:
        return {"src/app.c": "int main;\n", "src/old.c": "old\n", "src/keep.h": "h\n",
                "run.sh": File("#!/bin/sh\n", 0o755), "conf": "a=1\n",
                "data/d1.txt": "precious 1", "data/sub/d2.txt": "precious 2",
                "link": Link("target"), "ign.log": "log", "deep/e": Dir(0o711)}

    def test_a_subprocess_is_put_back_exactly(self, ws, blobs, outside, tmp_path):
        build(ws.root, self._tree())
        w = Workspace(ws.root, ignore=["*.log"])
        before_ws = tree_state(ws.root)
        before_out = TreeSnapshot(outside)
        m0 = snapshot(w, blobs)
        subprocess.run(["sh", "-c", SCRIPT, "sh", ws.root, str(outside)], check=True)
        m1 = snapshot(w, blobs, previous=m0)
        changes = diff(m0, m1)
        kinds = {(os.fsdecode(c.path), c.kind) for c in changes}
        assert ("data", "type") in kinds and ("data/sub/d2.txt", "deleted") in kinds
        assert ("conf", "type") in kinds and ("conf/inner.txt", "created") in kinds
        assert ("run.sh", "mode") in kinds and ("link", "symlink") in kinds
        assert not any(p.startswith("data/") and k != "deleted" for p, k in kinds)
        conflicts = watch.restore_changes(w, changes, blobs, str(tmp_path / "q"))
        assert conflicts == []
        assert_tree_equal(ws.root, before_ws, "the workspace after undoing the subprocess")
        before_out.assert_same(what="the directory the swapped-in symlink pointed to")

    def test_before_images_exist_before_the_subprocess_runs(self, ws, blobs, tmp_path):
        build(ws.root, {**_tree_of(60, 3000), "x/y": Link("z")})
        age(ws.root)
        before = tree_state(ws.root)
        m0 = snapshot(ws, blobs)
        subprocess.run(["sh", "-c", 'cd "$1" && rm -rf ./* && echo gone > README', "sh",
                        ws.root], check=True)
        m1 = snapshot(ws, blobs, previous=m0)
        assert watch.restore_changes(ws, diff(m0, m1), blobs, None) == []
        assert_tree_equal(ws.root, before)

    def test_a_killed_watch_is_undone_from_the_saved_manifest(self, ws, blobs):
        """What recovery does after a crash inside ``watch()``: load the manifest saved
        when the watch began, compare with the tree, restore every difference (any current
        state is the watched processes' own)."""
        build(ws.root, {**_tree_of(100, 500), "cfg": "a=1"})
        age(ws.root)
        before = tree_state(ws.root)
        digest = snapshot(ws, blobs).save(blobs)
        script = ('cd "$1"; for i in $(seq 0 49); do echo changed >> src/m0/f$i.c; done; '
                  'rm cfg; mkdir cfg; echo started; sleep 600')
        proc = subprocess.Popen(["sh", "-c", script, "sh", ws.root],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"started\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        m0 = Manifest.load(blobs, digest)
        now = snapshot(ws, None, previous=m0)       # hashing only: nothing stored
        assert now.stats.hashed_files == 50
        assert len(diff(m0, now)) == 51
        assert watch.restore_changes(ws, diff(m0, now), blobs, None, check=False) == []
        assert_tree_equal(ws.root, before)

    def test_a_stranger_after_the_watch_is_a_conflict(self, ws, blobs, tmp_path):
        build(ws.root, {"f": "v0", "g": "g0"})
        m0 = snapshot(ws, blobs)
        (Path(ws.root) / "f").write_text("v1 by the watched process")
        (Path(ws.root) / "g").write_text("g1 by the watched process")
        m1 = snapshot(ws, blobs, previous=m0)
        (Path(ws.root) / "f").write_text("v2 by a stranger, later")
        q = str(tmp_path / "q")
        conflicts = watch.restore_changes(ws, diff(m0, m1), blobs, q)
        assert [c.path for c in conflicts] == [b"f"]
        assert (Path(ws.root) / "f").read_text() == "v2 by a stranger, later"
        assert Path(conflicts[0].saved_as).read_text() == "v0"
        assert (Path(ws.root) / "g").read_text() == "g0"

    def test_symlink_swapped_in_during_the_restore_is_refused(self, ws, blobs, outside):
        """If a parent directory is a symlink when a child is restored, the child is not
        written through it: reported, and nothing outside changes."""
        build(ws.root, {"d/f": "x"})
        m0 = snapshot(ws, blobs)
        (Path(ws.root) / "d/f").write_text("y")
        m1 = snapshot(ws, blobs, previous=m0)
        os.unlink(ws.abspath(b"d/f"))
        os.rmdir(ws.abspath(b"d"))
        os.symlink(str(outside), ws.abspath(b"d"))   # after the watch, by someone else
        snap = TreeSnapshot(outside)
        conflicts = watch.restore_changes(ws, diff(m0, m1), blobs, None)
        assert [c.path for c in conflicts] == [b"d/f"] and "symlink" in conflicts[0].reason
        snap.assert_same(what="outside the workspace")


# =========================================================================================
# plans: before-images first, then the change, then undo (and redo) from the steps alone
# =========================================================================================
from walstore.files import plan  # noqa: E402

PLAN_TREE = {"src/app.py": File(b"print('v1')\n", 0o644), "src/lib/util.py": "u = 1\n",
             "src/lib/empty": Dir(0o750), "src/link": Link("app.py"), "old.txt": "old",
             "bin/run": File(b"#!/bin/sh\n", 0o755), "e": Dir(0o700), WEIRD: b"weird"}

PLAN_OPS = {
    "write-new-deep": (lambda ws, b: plan.plan_write(ws, "n1/n2/new.txt", "fresh", b),
                       lambda ws: apply.write_file(ws, "n1/n2/new.txt", "fresh")),
    "overwrite": (lambda ws, b: plan.plan_write(ws, "src/app.py", b"print('v2')\n", b),
                  lambda ws: apply.write_file(ws, "src/app.py", b"print('v2')\n")),
    "write-mode": (lambda ws, b: plan.plan_write(ws, "old.txt", "x", b, mode=0o600),
                   lambda ws: apply.write_file(ws, "old.txt", "x", mode=0o600)),
    "over-symlink": (lambda ws, b: plan.plan_write(ws, "src/link", "now a file", b),
                     lambda ws: apply.write_file(ws, "src/link", "now a file")),
    "mkdir": (lambda ws, b: plan.plan_mkdir(ws, "build/out", b, 0o711),
              lambda ws: apply.make_dir(ws, "build/out", 0o711)),
    "symlink": (lambda ws, b: plan.plan_symlink(ws, "old.txt", b"elsewhere\xff", b),
                lambda ws: apply.make_symlink(ws, "old.txt", b"elsewhere\xff")),
    "mode": (lambda ws, b: plan.plan_mode(ws, "bin/run", 0o700, b),
             lambda ws: apply.set_mode(ws, "bin/run", 0o700)),
    "delete-file": (lambda ws, b: plan.plan_delete(ws, WEIRD, b),
                    lambda ws: apply.delete(ws, WEIRD)),
    "delete-dir": (lambda ws, b: plan.plan_delete(ws, "e", b),
                   lambda ws: apply.delete(ws, "e")),
    "rename-file": (lambda ws, b: plan.plan_rename(ws, "old.txt", "archive/2024/old.txt", b),
                    lambda ws: apply.rename(ws, "old.txt", "archive/2024/old.txt")),
    "rename-over": (lambda ws, b: plan.plan_rename(ws, "old.txt", "src/app.py", b),
                    lambda ws: apply.rename(ws, "old.txt", "src/app.py")),
    "rename-dir": (lambda ws, b: plan.plan_rename(ws, "src", "moved/src", b),
                   lambda ws: apply.rename(ws, "src", "moved/src")),
    "rename-dir-onto-empty": (lambda ws, b: plan.plan_rename(ws, "src/lib", "e", b),
                              lambda ws: apply.rename(ws, "src/lib", "e")),
    "rmtree": (lambda ws, b: plan.plan_rmtree(ws, "src", b), None),
}


class TestPlans:
    @pytest.mark.parametrize("op", list(PLAN_OPS))
    def test_plan_apply_undo_redo(self, ws, blobs, tmp_path, op):
        build(ws.root, PLAN_TREE)
        state0 = tree_state(ws.root)
        make_plan, do = PLAN_OPS[op]
        steps = make_plan(ws, blobs)
        assert tree_state(ws.root) == state0, "planning changed the tree"
        rows = msgpack.unpackb(msgpack.packb([s.to_row() for s in steps], use_bin_type=True),
                               raw=False)
        steps = [watch.Change.from_row(r) for r in rows]  # what the engine would read back
        for s in steps:   # every content a step refers to is stored
            for e in (s.before, s.after):
                assert not e.is_file or blobs.has(e.sha256)
        if do is None:
            removed, kept = apply.rmtree(ws, "src", expected={s.path: s.before for s in steps})
            assert kept == []
        else:
            got = do(ws)
            if isinstance(got, apply.Applied):   # what the engine compares after the apply
                planned = [c for c in steps if c.path == got.path][-1].after
                if got.after.sha256 is None and got.after.is_file:  # a rename: not re-read
                    planned = dataclasses.replace(planned, sha256=None)
                assert got.after.same(planned)
        for s in steps:    # the plan said what happened, path by path
            now = read_entry(ws.abspath(s.path))
            if not any(o.path == s.path for o in steps if o is not s and
                       steps.index(o) > steps.index(s)):
                assert now.same(s.after), f"{s.path}: {now.describe()} != {s.after.describe()}"
        state1 = tree_state(ws.root)
        assert state1 != state0
        q = str(tmp_path / "q")
        assert plan.undo_steps(ws, steps, blobs, q) == []
        assert_tree_equal(ws.root, state0, f"after undoing {op}")
        assert plan.undo_steps(ws, steps, blobs, q) == []          # twice: harmless
        assert_tree_equal(ws.root, state0)
        for s in steps:    # redo (a revert of the revert) from the steps alone
            assert apply.restore(ws, s.path, s.after, s.before, blobs, q) is None
        assert_tree_equal(ws.root, state1, f"after redoing {op}")

    def test_capture_stores_exactly_what_it_describes(self, ws, blobs):
        build(ws.root, {"f": File(b"x" * (3 * CHUNK), 0o604), "l": Link("f"), "d": Dir(0o710)})
        e = plan.capture(ws, "f", blobs)
        assert e.same(Entry.file(0o604, 3 * CHUNK, sha(b"x" * (3 * CHUNK))))
        assert blobs.verify(e.sha256)
        assert plan.capture(ws, "l", blobs).same(Entry.symlink("f"))
        assert plan.capture(ws, "d", blobs).same(Entry.dir(0o710))
        assert plan.capture(ws, "none", blobs) == Entry.absent()

    def test_a_full_disk_while_keeping_a_before_image_names_the_file(self, ws, blobs):
        build(ws.root, {"sub/f": File(b"y" * 100, 0o644)})
        fb = FaultBackend()
        fb.fail("pwrite", errno.ENOSPC)
        with installed(fb), pytest.raises(OSError) as e:
            plan.capture(ws, "sub/f", blobs)
        assert e.value.errno == errno.ENOSPC
        assert "'sub/f'" in str(e.value) and ws.root in str(e.value)
        assert list(blobs) == [] and os.listdir(blobs.tmp) == []

    def test_refusals_match_the_primitives(self, ws, blobs):
        build(ws.root, {"d/x": "x", "f": "f", "e": Dir()})
        for call, err in [(lambda: plan.plan_write(ws, "d", "x", blobs), IsADirectoryError),
                          (lambda: plan.plan_mkdir(ws, "f", blobs), FileExistsError),
                          (lambda: plan.plan_symlink(ws, "d", "t", blobs), IsADirectoryError),
                          (lambda: plan.plan_mode(ws, "nope", 0o600, blobs), FileNotFoundError),
                          (lambda: plan.plan_delete(ws, "nope", blobs), FileNotFoundError),
                          (lambda: plan.plan_delete(ws, "d", blobs), OSError),
                          (lambda: plan.plan_rename(ws, "f", "d", blobs), IsADirectoryError),
                          (lambda: plan.plan_rename(ws, "d", "d/sub", blobs), ValueError),
                          (lambda: plan.plan_rmtree(ws, "nope", blobs), FileNotFoundError),
                          (lambda: plan.plan_write(ws, "../x", "x", blobs), ValueError)]:
            with pytest.raises(err):
                call()

    def test_a_stranger_between_apply_and_undo_is_a_conflict(self, ws, blobs, tmp_path):
        build(ws.root, {"cfg": "a=1"})
        steps = plan.plan_write(ws, "cfg", "a=2", blobs)
        apply.write_file(ws, "cfg", "a=2")
        (Path(ws.root) / "cfg").write_text("a=3 by hand")
        q = str(tmp_path / "q")
        conflicts = plan.undo_steps(ws, steps, blobs, q)
        assert [c.path for c in conflicts] == [b"cfg"]
        assert (Path(ws.root) / "cfg").read_text() == "a=3 by hand"
        assert Path(conflicts[0].saved_as).read_text() == "a=1"
        assert plan.undo_steps(ws, steps, blobs, q, check=False) == []   # forced
        assert (Path(ws.root) / "cfg").read_text() == "a=1"
