"""The replica's trim pin stands at the position the replica HOLDS (its saved manifest), not
at the shipper's position in memory.

A round uploads WAL objects and moves its manifest's position in memory before it saves the
manifest.  When the save fails (the server refuses manifest writes, the link drops between
the last object and the manifest), the replica's position stays where the last saved
manifest put it.  The pin (and the position recorded in the store for its next open) used
the position in memory: checkpoints trimmed the segments from the saved position on, and a
writer killed -9 before a manifest write went through reopened to a replica whose position
pointed below the first local segment — a hole, with acknowledged commits a restore could
not give back.

Faults go on the wire (``tools/replsweep.FaultProxy`` in front of moto's real S3 server):
every manifest PUT is answered 503 while WAL objects go through.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_replication_support import make_s3_replica, rows, s3_endpoint  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tools.replsweep import FaultProxy  # noqa: E402

import walstore  # noqa: E402
from walstore.replication.manifest import Manifest  # noqa: E402

WRITER = r"""
import sys, walstore
path, url, endpoint, checkpoint = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
opts = {"endpoint_url": endpoint, "interval": 3600, "max_backoff": 0.2,
        "connect_timeout": 2, "read_timeout": 2, "max_attempts": 1}
s = walstore.open(path, replicate_to=url, replicate_options=opts, segment_size=64 * 1024,
                  apply_interval=3600)

def commit(n, start):
    for i in range(start, start + n):
        with s.transaction() as tx:
            tx.put(f"k{i:06d}", "v" * 500)

commit(40, 0)
s.sync_replica(timeout=60)  # (rounds run only when a sync asks: interval 3600)
print("synced", flush=True)
sys.stdin.readline()  # the test now refuses manifest writes
commit(600, 40)  # ~330 KB of log: five segments
try:  # a round asked for: its WAL objects go up, its manifest write is refused
    s.sync_replica(timeout=0.01)
    print("unexpected: synced", flush=True)
except walstore.ReplicationError:
    pass
print("asked", flush=True)
sys.stdin.readline()  # (the test saw the round's manifest write refused: the WAL went up)
if checkpoint:
    s.checkpoint()  # trims below the pin
commit(100, 640)
print("done", flush=True)
sys.stdin.readline()  # (killed here)
"""


def _run(endpoint, tmp_path, checkpoint):
    rep = make_s3_replica(endpoint)
    host, port = endpoint.split("//")[1].rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), rep.url.split("/", 3)[3] + "/")
    path = str(tmp_path / "src")
    p = subprocess.Popen([sys.executable, "-c", WRITER, path, rep.url, proxy.url,
                          "1" if checkpoint else "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "synced"
        proxy.rule = lambda label: "503" if label.startswith("PUT manifest") else None
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "asked"
        # (the round's WAL objects are up, its position moved in memory, when it writes its
        # manifest: waited for, not a sync's 8 s timeout)
        deadline = time.monotonic() + 120
        while True:
            with proxy.lock:
                if any(r.label.startswith("PUT manifest") and r.fault
                       for r in proxy.requests):
                    break
            assert time.monotonic() < deadline, "no manifest write came"
            time.sleep(0.02)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done"
        with proxy.lock:
            wal_puts = sum(1 for r in proxy.requests
                           if r.label.startswith("PUT wal") and r.fault is None)
        assert wal_puts >= 1  # objects went up past the saved position
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        proxy.close()
    saved = Manifest.load(rep.target(), 1 << 26).position
    with walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts()) as s:
        s.sync_replica(timeout=60)
        expect = rows(s)
    m = Manifest.load(rep.target(), 1 << 26)
    assert m.doc["holes"] == [], (saved, m.doc["holes"])
    walstore.restore(rep.url, str(tmp_path / "r"), replicate_options=rep.options)
    with walstore.open(str(tmp_path / "r")) as r:
        assert rows(r) == expect and len(expect) == 740


def test_checkpoints_keep_the_log_from_the_position_the_replica_saved(s3_endpoint, tmp_path):
    """Checkpoints in the writer while manifest writes fail, then kill -9: no hole."""
    _run(s3_endpoint, tmp_path, checkpoint=True)


def test_recovery_keeps_the_log_from_the_position_the_replica_saved(s3_endpoint, tmp_path):
    """No checkpoint in the writer: recovery's checkpoint at the reopen trims by the
    position recorded in the store, which must be the saved one."""
    _run(s3_endpoint, tmp_path, checkpoint=False)
