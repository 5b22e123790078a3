"""`walstore verify` hashes the file content the store refers to (CONTRACT section 3:
``walstore verify PATH [--json]  # every checksum``).

A probe (probe-disk) found verify only stat-ed each referenced blob of files/blobs: a store
whose before-image blob had a bit flipped, was truncated or held another blob's content,
or whose watch manifest blob was damaged, verified clean (exit 0) while
``at(point).files(ws).read``, rewind and revert raised CorruptionError ("blob content
does not match its sha256").  Now each damaged blob is listed by its sha256 and its path
(exit 1), in the human output and in ``--json``, and a watch's saved manifest must load.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import walstore

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

ONE, TWO = b"version one\n", b"version two\n"
MISMATCH = "content does not match its sha256"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)


def _blob(src: str, digest: str) -> Path:
    return Path(src) / "files" / "blobs" / digest[:2] / digest[2:]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored(src: str) -> set[str]:
    blobs = Path(src) / "files" / "blobs"
    return {d.name + f.name for d in blobs.iterdir() if len(d.name) == 2
            for f in d.iterdir()}


def _is_manifest(path: Path) -> bool:
    first = next(iter(msgpack.Unpacker(io.BytesIO(path.read_bytes()), raw=False)), None)
    return isinstance(first, dict) and "v" in first and "root" in first


def _store(tmp_path: Path) -> tuple[str, str, Path]:
    """A store whose workspace wrote a.txt twice (a restore point between: its history
    refers to both versions' blobs), then watched a block that changed a.txt and made
    b.txt (a saved manifest).  (store path, the manifest's sha256, the workspace)."""
    src, repo = str(tmp_path / "src"), tmp_path / "repo"
    repo.mkdir()
    with walstore.open(src) as s:
        ws = s.workspace(str(repo))
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", ONE)
        s.restore_point("p1")
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", TWO)
        before = _stored(src)
        with s.transaction() as tx:
            with tx.files(ws).watch():
                (repo / "a.txt").write_bytes(b"version three\n")
                (repo / "b.txt").write_bytes(b"bee\n")
    manifests = [d for d in _stored(src) - before if _is_manifest(_blob(src, d))]
    assert len(manifests) == 1, manifests
    return src, manifests[0], repo


def _verify_fails_naming(src: str, digest: str, reason: str = MISMATCH) -> str:
    """verify (human and --json) exits 1 listing the blob ``digest`` with ``reason``;
    returns its error line."""
    path = str(_blob(src, digest))
    r = _cli("verify", src, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert not rep["ok"], rep
    named = [e for e in rep["errors"] if f"sha256:{digest}" in e]
    assert len(named) == 1, rep["errors"]
    assert path in named[0] and reason in named[0], named
    r = _cli("verify", src)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"error: {named[0]}" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("problem(s) found"), r.stdout
    return named[0]


def test_an_intact_store_with_file_versions_and_a_watch_verifies_clean(tmp_path):
    src, _manifest, _repo = _store(tmp_path)
    r = _cli("verify", src, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["errors"] == [] and rep["blobs_checked"] >= 4, rep
    r = _cli("verify", src)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("ok"), r.stdout


def test_a_flipped_bit_in_a_before_image_blob_is_named(tmp_path):
    src, _manifest, _repo = _store(tmp_path)
    p = _blob(src, _sha(ONE))
    data = bytearray(p.read_bytes())
    data[3] ^= 1
    p.write_bytes(bytes(data))
    line = _verify_fails_naming(src, _sha(ONE))
    assert "a file version or undo needs it" in line
    with walstore.open(src, readonly=True) as s:  # (what the store's own read says)
        with pytest.raises(walstore.CorruptionError, match="does not match its sha256"):
            s.at("p1").files(s.workspaces()[0]).read("a.txt")


def test_a_truncated_blob_is_named(tmp_path):
    src, _manifest, _repo = _store(tmp_path)
    p = _blob(src, _sha(ONE))
    os.truncate(p, 5)
    _verify_fails_naming(src, _sha(ONE))


def test_a_blob_holding_another_blobs_content_is_named(tmp_path):
    src, _manifest, _repo = _store(tmp_path)
    _blob(src, _sha(ONE)).write_bytes(_blob(src, _sha(TWO)).read_bytes())
    _verify_fails_naming(src, _sha(ONE))
    r = _cli("verify", src, "--json")  # (the blob whose content was copied is sound)
    assert not any(f"sha256:{_sha(TWO)}" in e for e in json.loads(r.stdout)["errors"])


def test_a_corrupted_watch_manifest_blob_is_named(tmp_path):
    src, manifest, _repo = _store(tmp_path)
    p = _blob(src, manifest)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))
    line = _verify_fails_naming(src, manifest)
    assert "watch's saved manifest" in line, line


def test_a_watch_manifest_blob_of_garbage_is_named(tmp_path):
    src, manifest, _repo = _store(tmp_path)
    _blob(src, manifest).write_bytes(b"\xc1" * 64)  # (0xc1: never valid msgpack)
    line = _verify_fails_naming(src, manifest)
    assert "watch's saved manifest" in line, line


def test_every_damaged_blob_is_listed_not_only_the_first(tmp_path):
    src, manifest, _repo = _store(tmp_path)
    os.truncate(_blob(src, _sha(ONE)), 0)
    os.truncate(_blob(src, _sha(TWO)), 1)
    os.truncate(_blob(src, manifest), 3)
    r = _cli("verify", src, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = json.loads(r.stdout)["errors"]
    for d in (_sha(ONE), _sha(TWO), manifest):
        assert sum(f"sha256:{d}" in e and MISMATCH in e for e in errors) == 1, (d, errors)
    assert len(errors) == 3, errors


def test_a_manifest_that_hashes_right_but_does_not_load_is_named(tmp_path, monkeypatch):
    """A referenced manifest blob whose content is sound but not a manifest (here: a file
    version's blob the store is made to take for one) is a problem of its own."""
    from walstore.ops import backup, verify
    src, _manifest, _repo = _store(tmp_path)
    real = backup.referenced_blobs

    def referenced(root, manifests=None):
        refs = real(root, manifests) if manifests is not None else real(root)
        if manifests is not None:
            manifests.add(_sha(ONE))
        return refs
    monkeypatch.setattr(backup, "referenced_blobs", referenced)
    rep = verify.verify_store(src)
    named = [e for e in rep.errors if f"sha256:{_sha(ONE)}" in e]
    assert not rep.ok and len(named) == 1 and len(rep.errors) == 1, rep.errors
    assert "does not load as a watch's saved manifest" in named[0], named
    assert MISMATCH not in named[0], named


def test_verify_reports_the_bytes_it_hashes_as_progress(tmp_path):
    src, _manifest, _repo = _store(tmp_path)
    from walstore.ops.verify import verify_store
    calls = []
    rep = verify_store(src, blob_progress=lambda done, total: calls.append((done, total)))
    assert rep.ok, rep.errors
    sizes = sum(_blob(src, d).stat().st_size for d in _stored(src))  # (all referenced)
    assert rep.blob_bytes_hashed == sizes and calls[-1] == (sizes, sizes), calls
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:])), calls


def test_the_cli_shows_hashing_progress_on_stderr_for_large_content(tmp_path):
    """Above the size the log walk's progress starts at (32 MB): lines on stderr, never in
    ``--json``."""
    src, repo = str(tmp_path / "src"), tmp_path / "repo"
    repo.mkdir()
    big = os.urandom(1 << 20) * 34
    with walstore.open(src) as s:
        ws = s.workspace(str(repo))
        with s.transaction() as tx:
            tx.files(ws).write("big.bin", big)
    r = _cli("verify", src)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify file content:" in r.stderr and "(100%)" in r.stderr, r.stderr
    assert f"{len(big)}" in r.stdout, r.stdout  # (blob bytes hashed)
    r = _cli("verify", src, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["blob_bytes_hashed"] == len(big)


def test_the_blob_gc_collects_nothing_while_a_saved_manifest_does_not_load(tmp_path):
    """A damaged manifest's blobs were not in the gc's referenced set, so the content only
    it named was collected as garbage (helper-179's finding); now the gc skips its run and
    says why, and verify names the manifest."""
    import hashlib
    import walstore
    root = tmp_path / "ws"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}.txt").write_text(f"content {i}\n")
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            with tx.files(ws).watch():
                (root / "f0.txt").write_text("changed\n")
        manifests = set()
        s._files.referenced(manifests)
    assert manifests
    blobs = os.path.join(path, "files", "blobs")
    unchanged = hashlib.sha256(b"content 3\n").hexdigest()
    kept = os.path.join(blobs, unchanged[:2], unchanged[2:])
    assert os.path.exists(kept)
    for d in manifests:  # a flipped bit in each saved manifest
        p = os.path.join(blobs, d[:2], d[2:])
        raw = bytearray(open(p, "rb").read())
        raw[len(raw) // 2] ^= 1
        with open(p, "wb") as f:
            f.write(bytes(raw))
    with walstore.open(path) as s:
        out = s._files.gc()
        assert "skipped" in str(out.get("blobs_gc", "")), out
    assert os.path.exists(kept)  # (collected as garbage before)
