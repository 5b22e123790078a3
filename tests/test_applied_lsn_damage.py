"""LMDB's ``applied`` LSN must lie where an apply can leave it: at a record's end, and not
past a commit LMDB does not hold.  A single flipped bit in that meta row, still a u64,
made the writable open skip acknowledged commits for good with no problem reported, or a
read-only open hide the whole unapplied tail, while verify said ok (probe-disk42).  Now
recovery (writable, read-only, ``walstore recover``) refuses in every mode, naming it, and
verify reports it."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import lmdb
import pytest

import walstore

CHILD = r'''
import os, signal, sys, walstore
s = walstore.open(sys.argv[1], segment_size=8192)
for i in range(40):
    with s.transaction() as tx:
        tx.put(f"early{i:02d}", i)
s.checkpoint()
for i in range(20):
    with s.transaction() as tx:
        tx.put(f"late{i:02d}", i)
os.kill(os.getpid(), signal.SIGKILL)
'''


def _boundaries(store: str) -> set[int]:
    """Every record's end LSN (walked with the format of docs/FORMAT.md: 28-byte record
    headers after a 64-byte segment header)."""
    out = set()
    wal = os.path.join(store, "wal")
    for f in sorted(os.listdir(wal)):
        if not f.endswith(".wal"):
            continue
        b = open(os.path.join(wal, f), "rb").read()
        start, off = int(f[:20]), 64
        while off + 28 <= len(b):
            length, typ = struct.unpack_from("<IB", b, off + 4)
            if typ == 0:
                break
            off += 28 + length
            out.add(start + off - 64)
    return out


def _meta(store: str, value: int | None = None) -> int:
    env = lmdb.open(os.path.join(store, "db"), max_dbs=64, lock=False)
    try:
        with env.begin(write=value is not None) as t:
            db = env.open_db(b"meta", txn=t, create=False)
            if value is not None:
                t.put(b"applied", struct.pack(">Q", value), db=db)
            return struct.unpack(">Q", t.get(b"applied", db=db))[0]
    finally:
        env.close()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("applied") / "s")
    subprocess.run([sys.executable, "-c", CHILD, path], check=False)
    applied, bounds = _meta(path), _boundaries(path)
    assert applied in bounds
    end = max(bounds)
    up = next(applied ^ (1 << k) for k in range(3, 20)
              if applied + 300 < applied ^ (1 << k) < end and applied ^ (1 << k) not in bounds)
    down = next(applied ^ (1 << k) for k in range(3, 20)
                if applied ^ (1 << k) < applied and applied ^ (1 << k) not in bounds)
    return path, up, down


def _flipped(crashed, tmp_path, which):
    path, up, down = crashed
    dst = str(tmp_path / which)
    shutil.copytree(path, dst)
    _meta(dst, up if which == "up" else down)
    return dst


@pytest.mark.parametrize("which", ["up", "down"])
def test_an_applied_lsn_off_a_record_boundary_is_refused_and_reported(crashed, tmp_path, which):
    path = _flipped(crashed, tmp_path, which)
    for readonly in (False, True):
        with pytest.raises(walstore.CorruptionError, match="applied-damaged"):
            walstore.open(path, readonly=readonly, create=False)
    for mode in ("strict", "tolerate-tail", "point-in-time", "skip-corrupt"):
        p = subprocess.run([sys.executable, "-m", "walstore", "recover", path, "--mode", mode,
                            "--json"], capture_output=True, text=True)
        assert p.returncode != 0 and "applied" in (p.stdout + p.stderr), (mode, p.stdout,
                                                                          p.stderr)
    v = subprocess.run([sys.executable, "-m", "walstore", "verify", path],
                       capture_output=True, text=True)
    assert v.returncode == 1 and "applied LSN" in v.stdout + v.stderr
    _meta(path, _meta(crashed[0]))  # the row put right: everything is there
    with walstore.open(path) as s:
        assert [s.get(f"late{i:02d}") for i in range(20)] == list(range(20))


def test_the_undamaged_store_recovers_every_acknowledged_commit(crashed, tmp_path):
    dst = str(tmp_path / "intact")
    shutil.copytree(crashed[0], dst)
    with walstore.open(dst, readonly=True, create=False) as r:
        assert [r.get(f"late{i:02d}") for i in range(20)] == list(range(20))
    with walstore.open(dst) as s:
        assert [s.get(f"late{i:02d}") for i in range(20)] == list(range(20))
        assert s.last_recovery.problems == []


@pytest.mark.parametrize("version", ["2", 1e300, True, None])
def test_a_store_file_whose_version_is_not_an_integer_is_named_as_damage(tmp_path, version):
    import json
    path = str(tmp_path / "s")
    walstore.open(path, durability="none").close()
    doc = json.load(open(os.path.join(path, "STORE")))
    doc["version"] = version
    with open(os.path.join(path, "STORE"), "w") as f:
        f.write(json.dumps(doc))
    with pytest.raises(walstore.NotAStore, match="damaged .*version is not an integer"):
        walstore.open(path)


def test_a_commit_of_actions_alone_without_a_bylsn_row_is_no_damage(tmp_path):
    """Walstores before 4481ba1 wrote no ``bylsn`` row for a commit of actions alone in an
    apply batch without key writes; such a store (format version 1, still opened) must not
    read as an applied LSN past a commit LMDB does not hold (review42: every open of it
    was refused as applied-damaged)."""
    path = str(tmp_path / "s")
    with walstore.open(path, compensators={"refund": lambda a: None}) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        with s.transaction() as tx:
            with tx.action("charge", compensate="refund"):
                pass
        s.checkpoint()
        lsn = int(s.log(limit=1)[0].lsn)
    env = lmdb.open(os.path.join(path, "db"), max_dbs=64, lock=False)
    with env.begin(write=True) as t:  # the row an older walstore did not write
        assert t.delete(struct.pack(">Q", lsn), db=env.open_db(b"bylsn", txn=t, create=False))
    env.close()
    for readonly in (True, False):
        with walstore.open(path, readonly=readonly, create=False,
                           compensators={"refund": lambda a: None}) as s:
            assert s.get("k") == 1 and [a.name for a in s.actions()] == ["charge"]
