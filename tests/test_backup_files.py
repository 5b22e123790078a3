"""`walstore backup` copies the reversible files' content (CONTRACT section 3: ``backup
PATH DEST  # consistent online copy``; section 4.10, reversible files).

A probe (probe57) found a backup copied only db/ and wal/: the copy verified clean and
`walstore files COPY --at p1` listed a file version, but reading it raised CorruptionError
("this store keeps no file content (no files/blobs directory)") and rewind('p1') failed.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import walstore

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)


def test_a_backup_reads_and_rewinds_the_file_versions_of_its_restore_points(tmp_path):
    src, repo, dest = str(tmp_path / "src"), tmp_path / "repo", str(tmp_path / "bk")
    repo.mkdir()
    with walstore.open(src) as s:
        ws = s.workspace(str(repo))
        for i, text in enumerate([b"version one\n", b"version two\n" * 1000]):
            with s.transaction() as tx:
                tx.files(ws).write("a.txt", text)
                tx.files(ws).write(f"only{i}.txt", text)
            s.restore_point(f"p{i + 1}")
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", b"version three\n")
            tx.files(ws).delete("only0.txt")
    r = _cli("backup", src, dest)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(src)  # the copy must not lean on the source's content store
    r = _cli("verify", dest)
    assert r.returncode == 0, r.stdout + r.stderr
    for dirpath, dirs, files in os.walk(os.path.join(dest, "files")):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o600, f
    with walstore.open(dest, readonly=True) as c:
        ws2 = c.workspaces()[0]
        assert c.at("p1").files(ws2).read("a.txt") == b"version one\n"
        assert c.at("p2").files(ws2).read("a.txt") == b"version two\n" * 1000
    with walstore.open(dest) as c:
        ws2 = c.workspaces()[0]
        assert c.at("p2").files(ws2).read("only0.txt") == b"version one\n"
        c.rewind("p1")
    assert (repo / "a.txt").read_bytes() == b"version one\n"
    assert (repo / "only0.txt").read_bytes() == b"version one\n"
    assert not (repo / "only1.txt").exists()


# commits n = 1, 2, ...: file f{n % 5} gets content(n); every third commit a rolled-back
# write of 64 KiB (garbage for the blob gc); restore point rp{n} every 10 commits, rp{n-30}
# dropped then (retention's horizon moves: old versions' blobs go too)
WRITER = r"""
import os, sys, walstore
def content(n): return (f"{n:08d}" * 8192).encode()
s = walstore.open(sys.argv[1], durability="normal",
                  options=walstore.Options(segment_size=65536, checkpoint_bytes=65536,
                                           retain_transactions=20))
ws = s.workspace(sys.argv[2])
n = 0
while True:
    n += 1
    with s.transaction() as tx:
        tx.files(ws).write(f"f{n % 5}.txt", content(n))
        tx.put("n", n)
    if n % 3 == 0:
        try:
            with s.transaction() as tx:
                tx.files(ws).write(f"f{n % 5}.txt", os.urandom(65536))
                raise KeyError("roll back")
        except KeyError:
            pass
    if n % 10 == 0:
        s.restore_point(f"rp{n}")
        if n > 30:
            s.drop_restore_point(f"rp{n - 30}")
        print(n, flush=True)
"""


def _content(n: int) -> bytes:
    return (f"{n:08d}" * 8192).encode()


def test_backups_beside_a_writer_changing_files_read_every_restore_point(tmp_path):
    src, repo = str(tmp_path / "src"), tmp_path / "repo"
    repo.mkdir()
    w = subprocess.Popen([sys.executable, "-c", WRITER, src, str(repo)],
                         stdout=subprocess.PIPE, text=True, env=ENV)
    copies = []
    try:
        for line in w.stdout:
            if int(line) >= 200:
                break
        for i in range(4):
            for _line in w.stdout:  # (the writer goes on: read what it says)
                break
            dest = str(tmp_path / f"bk{i}")
            r = _cli("backup", src, dest)
            assert r.returncode == 0, r.stderr
            copies.append(dest)
        assert w.poll() is None  # the writer ran all along
    finally:
        w.kill()
        w.wait()
    for dest in copies:
        r = _cli("verify", dest)
        assert r.returncode == 0, r.stdout + r.stderr
        with walstore.open(dest) as c:
            ws = c.workspaces()[0]
            points = c.restore_points()
            assert points, dest
            for name in points:
                n = int(name[2:])
                view = c.at(name).files(ws)
                for k in range(5):
                    m = max(j for j in range(1, n + 1) if j % 5 == k)
                    assert view.read(f"f{k}.txt") == _content(m), (dest, name, k)
            assert c.get("n") >= 200


def _two_file_versions(src: str, repo: Path) -> None:
    """A store at ``src`` whose workspace ``repo`` wrote a.txt twice, a restore point
    between (its history refers to both versions' blobs)."""
    repo.mkdir()
    with walstore.open(src) as s:
        ws = s.workspace(str(repo))
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", b"version one\n")
        s.restore_point("p1")
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", b"version two\n")


def test_verify_names_referenced_file_content_missing_from_the_store(tmp_path):
    src, repo = str(tmp_path / "src"), tmp_path / "repo"
    _two_file_versions(src, repo)
    r = _cli("verify", src, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    blobs = Path(src) / "files" / "blobs"
    gone = blobs / "db" / "cdb1f658e3f2220d1c09474ff99a91b2b19a0bf81e6cde1a3814d5bc35c6d9"
    gone.unlink()  # (sha256 of b"version one\n")
    r = _cli("verify", src)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sha256:dbcdb1f658e3f2220d1c09474ff99a91b2b19a0bf81e6cde1a3814d5bc35c6d9 is " \
           "missing" in r.stdout


def test_verify_names_file_content_missing_with_the_whole_files_directory(tmp_path):
    """A copy lacking files/ entirely (what ``walstore backup`` copied before it copied
    blobs) verified ok with 0 blobs checked — the check ran only when files/ existed —
    while reading its file history raised CorruptionError (found by an upgrade probe with
    a backup made by the older code).  A store that never used files still verifies."""
    src, repo = tmp_path / "src", tmp_path / "repo"
    _two_file_versions(str(src), repo)
    shutil.rmtree(src / "files")
    r = _cli("verify", str(src), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert not rep["ok"] and rep["blobs_checked"] == 2
    assert any("refers to 2 blob(s) of file content but has no content store" in e
               for e in rep["errors"]), rep["errors"]
    plain = str(tmp_path / "plain")
    with walstore.open(plain) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    assert not os.path.exists(os.path.join(plain, "files"))
    r = _cli("verify", plain, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["blobs_checked"] == 0 and rep["warnings"] == [], rep
