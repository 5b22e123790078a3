"""Replication restore: ``replicas --verify`` reads every object the manifest lists (not
only the newest chain), and a restore cut inside a transaction whose only effects are file
changes reports it in flight with its file effects owed.  Real processes (a writer killed
with SIGKILL, the CLI), real files, a ``file://`` replica (nothing here is about S3)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import walstore
from walstore.replication.manifest import Manifest
from walstore.replication.options import ReplicateOptions
from walstore.replication.targets import open_target


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=300)


def _replica_with_history(tmp_path) -> tuple[str, str]:
    """A replica holding several WAL objects and snapshots, and an early restore point."""
    rep = str(tmp_path / "rep")
    url = "file://" + rep
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05, "snapshot_interval": 0.0,
                                         "compact_fanout": 1000})
    try:
        for i in range(40):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 50)
            if i == 5:
                s.restore_point("early")
            if i % 10 == 0:
                s.sync_replica(timeout=30)
                s.checkpoint()  # LMDB applied to the end: the next snapshot is a new one
                s._shipper.ship_once()
        s.sync_replica(timeout=30)
    finally:
        s.close()
    return rep, url


def _manifest(url: str) -> Manifest:
    t = open_target(url, ReplicateOptions.from_any(None))
    try:
        return Manifest.load(t, 1 << 26)
    finally:
        t.close()


def _verify(url: str) -> tuple[int, dict]:
    r = _cli("replicas", url, "--verify", "--json")
    return r.returncode, json.loads(r.stdout)["verify"]


def _old_wal_object(url: str) -> str:
    """A WAL object the newest snapshot's chain does not read."""
    m = _manifest(url)
    newest = max((s for s in m.snapshots if m.wal_start_for(s["lsn"]) is not None),
                 key=lambda s: s["lsn"])
    start = m.wal_start_for(newest["lsn"])
    old = [e["k"] for e in m.wal if e["b"] <= start]
    assert len(old) >= 2, "the history should leave WAL objects below the newest chain"
    return old[1]


def test_verify_reads_every_wal_object_not_only_the_newest_chain(tmp_path):
    rep, url = _replica_with_history(tmp_path)
    assert _verify(url)[0] == 0
    key = _old_wal_object(url)
    victim = os.path.join(rep, key)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x40
    os.chmod(victim, 0o600)
    with open(victim, "wb") as f:
        f.write(bytes(data))
    code, doc = _verify(url)
    assert code == 1 and not doc["ok"]
    bad = [c for c in doc["checks"] if not c["ok"]]
    assert [c["check"] for c in bad] == ["every WAL object"], bad
    assert bad[0]["failures"][0]["object"] == key and key in bad[0]["error"]
    assert "checksum" in bad[0]["error"]
    text = _cli("replicas", url, "--verify")
    assert text.returncode == 1 and key in text.stdout and "FAILED" in text.stdout


def test_verify_names_a_deleted_old_wal_object(tmp_path):
    rep, url = _replica_with_history(tmp_path)
    key = _old_wal_object(url)
    os.unlink(os.path.join(rep, key))
    code, doc = _verify(url)
    assert code == 1 and not doc["ok"]
    bad = [c for c in doc["checks"] if not c["ok"]]
    assert [c["check"] for c in bad] == ["every WAL object"], bad
    assert key in bad[0]["error"] and "missing" in bad[0]["error"]


def test_verify_names_a_deleted_oldest_snapshot(tmp_path):
    rep, url = _replica_with_history(tmp_path)
    m = _manifest(url)
    snaps = sorted((s for s in m.snapshots if s["k"] is not None), key=lambda s: s["lsn"])
    assert len(snaps) >= 3
    key = snaps[0]["k"]
    os.unlink(os.path.join(rep, key))
    code, doc = _verify(url)
    assert code == 1 and not doc["ok"]
    bad = [c for c in doc["checks"] if not c["ok"]]
    assert [c["check"] for c in bad] == ["every snapshot"], bad
    assert key in bad[0]["error"]


IN_FLIGHT_FILES = r"""
import sys, time, walstore
url, path, root = sys.argv[1:4]
s = walstore.open(path, replicate_to=url, replicate_options={"interval": 0.05})
ws = s.workspace(root)
with s.transaction() as tx:
    tx.files(ws).write("a.txt", "v1\n")
tx = s.transaction()
tx.__enter__()
tx.files(ws).write("a.txt", "v2-in-flight\n")
s.sync_replica(timeout=30)
print("READY", flush=True)
time.sleep(120)
"""


def test_restore_cut_inside_a_file_only_transaction_lists_its_file_effects(tmp_path):
    url = "file://" + str(tmp_path / "rep")
    root = str(tmp_path / "ws")
    os.makedirs(root)
    p = subprocess.Popen([sys.executable, "-c", IN_FLIGHT_FILES, url, str(tmp_path / "src"),
                          root], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("READY")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    a_txt = os.path.join(root, "a.txt")
    # a copy elsewhere: the in-flight transaction is listed, its file change owed (held)
    r = _cli("restore", url, str(tmp_path / "r1"), "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(doc["in_flight_txids"]) == 1
    tx = doc["in_flight_txids"][0]
    owed = doc["owed_file_effects"]
    assert [(e["txid"], e["workspace"], e["paths"], e["held"]) for e in owed] == \
        [(tx, os.path.realpath(root), [os.path.join(os.path.realpath(root), "a.txt")], True)]
    assert doc["pending_compensations"] == []
    with open(a_txt) as f:
        assert f.read() == "v2-in-flight\n"  # (held: never undone by a copy)
    with walstore.open(str(tmp_path / "r1")) as s:
        assert tx not in [i.txid for i in s.log()]
    text = _cli("restore", url, str(tmp_path / "r2"))
    assert text.returncode == 1
    assert f"owed file effect of transaction {tx}" in text.stdout and "a.txt" in text.stdout
    assert "--compensate" in text.stderr
    # --compensate on the machine with the workspace: put back, nothing owed
    r = _cli("restore", url, str(tmp_path / "r3"), "--compensate", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert doc["in_flight_txids"] == [tx] and doc["owed_file_effects"] == []
    with open(a_txt) as f:
        assert f.read() == "v1\n"


def test_a_finished_file_transaction_is_not_in_flight(tmp_path):
    url = "file://" + str(tmp_path / "rep")
    root = str(tmp_path / "ws")
    os.makedirs(root)
    with walstore.open(str(tmp_path / "src"), replicate_to=url,
                       replicate_options={"interval": 0.05}) as s:
        ws = s.workspace(root)
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "v1\n")
        try:
            with s.transaction() as tx:
                tx.files(ws).write("b.txt", "rolled back\n")
                raise KeyError("roll back")
        except KeyError:
            pass
        with s.transaction() as tx:  # undone by rollback_to, then committed
            sp = tx.savepoint()
            tx.files(ws).write("c.txt", "undone\n")
            tx.rollback_to(sp)
            tx.put("k", 1)
        s.sync_replica(timeout=30)
        time.sleep(0.1)
    report = walstore.restore(url, str(tmp_path / "r"))
    assert report["in_flight_txids"] == [] and report["owed_file_effects"] == []


def test_a_destination_that_is_a_symbolic_link_is_refused_before_anything_is_fetched(
        tmp_path):
    # (probe-repl44: the up-front check followed the link and accepted an empty directory
    # behind it; the restore fetched and staged everything, then the rename into place
    # failed with a raw ENOTDIR — a dangling link the same)
    url = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=url,
                      replicate_options={"interval": 0.05})
    try:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    (tmp_path / "vol").mkdir()
    for name, to in (("to-empty-dir", tmp_path / "vol"), ("dangling", tmp_path / "gone")):
        link = tmp_path / name
        link.symlink_to(to)
        res = _cli("restore", url, str(link))
        assert res.returncode == 1 and "symbolic link" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert link.is_symlink() and os.readlink(link) == str(to)
        assert not [n for n in os.listdir(tmp_path) if ".restoring-" in n]
    assert os.listdir(tmp_path / "vol") == []
