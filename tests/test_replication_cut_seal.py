"""A writer killed between the two halves of a WAL rotation: the replica stays whole.

Rotation makes the next segment durable first and only then writes the old segment's
SEAL record (29 bytes).  A kill -9 in between leaves the old segment's records ending
exactly one SEAL short of its successor — a log the reader accepts.  The shipper used to
stop there for good ("no valid record at LSN ... although LSN ... is durable", every
round): nothing after the cut reached the replica.  It now ships the SEAL the writer
never wrote, so the replica's WAL objects stay contiguous and restore and verify pass.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from test_replication_support import replica, rows, s3_endpoint  # noqa: F401

import walstore
from walstore.log.format import SEGMENT_HEADER_SIZE as HEADER_SIZE, RecordType
from walstore.log.format import SEAL_RECORD_SIZE
from walstore.log.segment import list_segments
from walstore.replication import replicas
from walstore.replication.manifest import Manifest


def _cut_the_seal(path: str) -> int:
    """Zero the SEAL record ending the first segment, as a kill between the successor's
    creation and the SEAL's write leaves it; returns the SEAL's LSN."""
    segs = list_segments(os.path.join(path, "wal"))
    assert len(segs) >= 2
    (start, first), (nxt, _second) = segs[0], segs[1]
    seal_lsn = nxt - SEAL_RECORD_SIZE
    off = seal_lsn - start + HEADER_SIZE
    with open(first, "r+b") as f:
        f.seek(off)
        head = f.read(SEAL_RECORD_SIZE)
        assert head[8] == int(RecordType.SEAL)  # (u32 CRC, u32 length, u8 type)
        f.seek(off)
        f.write(b"\0" * SEAL_RECORD_SIZE)
        f.flush()
        os.fsync(f.fileno())
    return seal_lsn


WRITER = r"""
import json, sys, walstore
path, url, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
s = walstore.open(path, segment_size=64 * 1024, checkpoint_bytes=1 << 30, replicate_to=url,
                  replicate_options={**opts, "interval": 3600})
with s.transaction() as tx:
    tx.put("first", 1)
s.sync_replica(timeout=30)  # the replica's position: before the rotations below
for i in range(300):  # ~150 KB of log: at least two rotations
    with s.transaction() as tx:
        tx.put(f"a{i:04d}", "v" * 400)
print("ready", flush=True)
import time; time.sleep(600)
"""


def test_the_replica_crosses_a_seal_the_writer_never_wrote(replica, tmp_path):  # noqa: F811
    path = str(tmp_path / "src")
    p = subprocess.Popen([sys.executable, "-c", WRITER, path, replica.url,
                          json.dumps(replica.options)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    seal_lsn = _cut_the_seal(path)  # as if the kill had landed inside the rotation
    with walstore.open(path, replicate_to=replica.url,
                       replicate_options=replica.opts()) as s:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"b{i:04d}", i)
        s.sync_replica(timeout=30)
        expect = rows(s)
    m = Manifest.load(replica.target(), 1 << 26)
    assert m.doc["holes"] == []
    wal = sorted(m.wal, key=lambda e: e["a"])
    assert all(x["b"] == y["a"] for x, y in zip(wal, wal[1:]))
    assert any(e["a"] <= seal_lsn < e["b"] for e in wal)
    walstore.restore(replica.url, str(tmp_path / "r"), replicate_options=replica.options)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expect and len(expect) == 321
    report = replicas(replica.url, verify=True, replicate_options=replica.options)
    assert report["verify"]["ok"], report["verify"]
