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
  directory), recovery from a saved manifest.
"""
from __future__ import annotations

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
                                 capture_output=True)
            truth = {p.rstrip(b"/") for p in res.stdout.split(b"\0") if p}
            rules = IgnoreRules(patterns)
            mine = {os.fsencode(d) for d in dirs if rules.ignored(os.fsencode(d), True)}
            assert mine == truth, f"patterns {patterns!r}: git {sorted(truth)}, " \
                                  f"walstore {sorted(mine)}"
