"""Audit 51 (the command line as an operator uses it; the replication verbs): regressions
found by probing section 3 ("Command line", "Replication", "Errors") with real processes.

Each test failed before its fix (see the commit naming it)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import walstore

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("WALSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def one_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("walstore: "), p.stderr
    return lines[0]


def _no_constants(name: str):
    raise ValueError(f"not RFC 8259 JSON: {name}")


def strict(text: str):
    return json.loads(text, parse_constant=_no_constants)


# ---- a damaged replica manifest's times ----------------------------------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A file:// replica of a store with a few commits and a restore point (a template:
    each test tampers with a copy)."""
    base = tmp_path_factory.mktemp("shipped")
    rep = base / "rep"
    with walstore.open(str(base / "src"), replicate_to=f"file://{rep}",
                       replicate_options={"interval": 0.05}) as s:
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.restore_point("rp")
        s.sync_replica(timeout=30)
    return rep


def _set(path: list, value):
    def edit(doc: dict) -> None:
        d = doc
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
    return edit


TAMPERED_TIMES = {
    "complete_to": (_set(["complete_to"], math.nan), "complete_to"),
    "complete_to-huge": (_set(["complete_to"], 1e300), "complete_to"),
    "updated": (_set(["updated"], math.nan), "updated"),
    "snapshot-ts": (_set(["snapshots", 0, "ts"], math.inf), "snapshots[0].ts"),
    "point-ts": (_set(["points", "rp", "ts"], 1e300), "points['rp'].ts"),
    "last_commit-ts": (_set(["last_commit", "ts"], 6e47), "last_commit.ts"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_TIMES))
def test_a_manifest_time_that_is_no_time_is_said_as_damage_naming_the_field(
        shipped, tmp_path, case):
    """A manifest is untrusted input: "a damaged or tampered one is a ReplicationError
    naming the field; on the CLI, exit 1" (docs/REPLICATION.md).  Its times were checked
    only for being numbers: a NaN, an infinite or an out-of-range time (one flipped bit
    in a file:// replica's manifest makes 3.3e28 of complete_to) passed, and then
    `walstore replicas URL` failed with "OverflowError: timestamp out of range for
    platform time_t (an unexpected error; `walstore --debug` shows where)" while
    `replicas --json` of the same replica exited 0 as if nothing were wrong, and
    `restore --to TIME` said "cannot convert float NaN to integer" as a usage error
    (exit 2) naming no manifest."""
    edit, field = TAMPERED_TIMES[case]
    rep = tmp_path / "rep"
    shutil.copytree(shipped, rep)
    doc = msgpack.unpackb((rep / "manifest").read_bytes(), raw=False, strict_map_key=False)
    edit(doc)
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    url = f"file://{rep}"

    p = run("replicas", url)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    line = one_line(p)
    assert "manifest" in line and "damaged" in line and field in line, line
    assert "unexpected" not in line

    p = run("replicas", url, "--json")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    err = strict(p.stdout)["error"]
    assert err["type"] == "ReplicationError" and field in err["message"], err

    dest = tmp_path / "dest"
    p = run("restore", url, str(dest), "--to", "2026-01-01T00:00:00Z")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    line = one_line(p)
    assert "manifest" in line and "damaged" in line and field in line, line
    assert not dest.exists()


def test_replicas_verify_fails_a_restore_point_past_the_replicas_end(shipped, tmp_path):
    """`replicas --verify` checks "every restore point's LSN against the record the WAL
    holds there"; one the manifest put past the end of the replica's WAL (damage: the
    shipper lists only points it shipped) was skipped as "before the WAL retained", so
    verify said "restore points: ok", exit 0, of a point no restore can reach (`restore
    --to rp` then failed: "the replica's WAL ends at LSN 683, before LSN 2492")."""
    rep = tmp_path / "rep"
    shutil.copytree(shipped, rep)
    doc = msgpack.unpackb((rep / "manifest").read_bytes(), raw=False, strict_map_key=False)
    doc["points"]["rp"]["lsn"] = doc["position"] + 1000
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    p = run("replicas", f"file://{rep}", "--verify", "--json")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    checks = {c["check"]: c for c in strict(p.stdout)["verify"]["checks"]}
    assert not checks["restore points"]["ok"], checks["restore points"]
    assert "'rp'" in checks["restore points"]["error"], checks["restore points"]
    p = run("restore", f"file://{rep}", str(tmp_path / "dest"), "--to", "rp")
    assert p.returncode == 1 and not (tmp_path / "dest").exists(), (p.stdout, p.stderr)


@pytest.mark.parametrize("field,delta", [("x0", 64), ("x1", -1), ("t0", 1.0), ("t1", -0.5)])
def test_replicas_verify_fails_a_wal_entry_whose_txids_or_times_are_not_its_commits(
        shipped, tmp_path, field, delta):
    """The manifest lists, per WAL object, its first/last commit txid (x0, x1) and time
    (t0, t1): a restore to a txid or a time picks the object by them.  `replicas --verify`
    read every record of every object but never held them against these: with x0 off
    (a flipped bit: 1 -> 65) verify said ok, exit 0, and then `restore --to tx:2` said
    "transaction 2 is not among the commits the replica's WAL holds", exit 2, of a
    transaction it holds."""
    rep = tmp_path / "rep"
    shutil.copytree(shipped, rep)
    doc = msgpack.unpackb((rep / "manifest").read_bytes(), raw=False, strict_map_key=False)
    entry = doc["wal"][0]
    assert entry["x0"] is not None and entry["x1"] - entry["x0"] >= 2  # (3 commits in it)
    entry[field] += delta
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    p = run("replicas", f"file://{rep}", "--verify", "--json")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    checks = {c["check"]: c for c in strict(p.stdout)["verify"]["checks"]}
    wal = checks["every WAL object"]
    assert not wal["ok"] and entry["k"] in wal["error"], wal
