"""Audit 68, bounds: what is read from disk in the places added since audit 53 (replica
manifests with ``holes``/``pg``, file-workspace records and the manifests of workspace
trees, LangGraph blobs) is bounded before allocation; damage there is said as damage.

Found right (read, and probed with crafted files): a replica manifest is read whole only
under ``max_manifest_bytes`` and decoded by ``msgpack.unpackb`` (counts bounded by its
bytes), a WAL object's header by ``MAX_OBJECT_HEADER`` and each record by
``MAX_PAYLOAD``, a snapshot's download by its listed size and ``MAX_SNAPSHOT_BYTES``, a
LangGraph blob's inflated size by ``MAX_INFLATED``, a watch manifest streams through an
``Unpacker`` whose buffer is 16 MiB (msgpack 1.1 allocates no declared count up front:
5-byte maps and arrays declaring 8-16 M entries decode under a 300 MiB address-space
limit).  What was wrong is tested below.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import walstore

ROOT = Path(__file__).resolve().parents[1]

_WATCHING = textwrap.dedent("""
    import subprocess, sys, time, walstore
    s = walstore.open(sys.argv[1])
    w = s.workspace(sys.argv[2])
    tx = s.transaction()
    with tx.files(w).watch():
        subprocess.run(["sh", "-c", "echo new > new.txt; rm a.txt"], cwd=sys.argv[2],
                       check=True)
        print("READY", flush=True)
        time.sleep(60)
""")


def test_damage_said_as_damage_a_watch_manifest_blob_damaged_names_its_file(tmp_path):
    """A writer killed inside a watch() leaves the watch's manifest (the tree as it
    began, a blob) for the next open to put the workspace back from.  That blob damaged
    (its first byte), the open's problem said "ValueError: blob 1a2b... is not a
    manifest": the manifest is parsed as it streams in, and the parse failed before the
    blob's sha256 check at its end — no word of damage, no file named.  Now a manifest
    that does not parse is read to its end first: "CorruptionError: blob content does not
    match its sha256 ... (file .../files/blobs/xx/...)"; the undo stays owed as before."""
    store, ws = tmp_path / "s", tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")
    child = subprocess.Popen([sys.executable, "-c", _WATCHING, str(store), str(ws)],
                             stdout=subprocess.PIPE, cwd=str(ROOT),
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout.readline().strip() == b"READY"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    damaged = []
    for path in glob.glob(str(store / "files" / "blobs" / "*" / "*")):
        with open(path, "r+b") as f:
            if f.read(4)[1:4] == b"\xa1v\x01":  # (a manifest: {"v": 1, ...})
                f.seek(0)
                f.write(b"\x01")
                damaged.append(path)
    assert damaged
    with walstore.open(str(store)) as s:
        problems = [p for p in s.last_recovery.problems if p.kind == "file-undo-failed"]
        assert len(problems) == 1, s.last_recovery.problems
        assert "does not match its sha256" in problems[0].reason, problems[0].reason
        assert any(p in problems[0].reason for p in damaged), problems[0].reason
    assert sorted(os.listdir(ws)) == ["new.txt"]  # (owed: nothing put back from damage)
