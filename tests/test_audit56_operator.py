"""Audit 56 of the operator's side (CONTRACT section 3, the command line; section 4,
promise 8 and docs/FORMAT.md, what is read from disk): hostile records and damaged
files met by `walstore recover`, `verify` and the read verbs as real CLI processes.

Findings (each test named below fails on the code before its fix):

- A record whose CRC holds (crafted, or a writer's bug: no crash or bit flip makes one)
  but whose fields have types no walstore writes — a COMMIT's ``actions`` a str or a
  list of ints, its ``gid`` an int, an ACTION_RESULT without an ``id``, an intent whose
  id is not ``<txid>.<n>``, a ``purge`` without its key range — made `walstore recover`
  (and every writable open) fail mid-apply with "TypeError: string indices must be
  integers" / "AttributeError: 'int' object has no attribute 'encode'" / "ValueError:
  invalid literal for int()" (an unexpected error, exit 1, LMDB half-written in a
  rolled-back apply), while `walstore verify` said "ok", exit 0, or crashed the same way.
  Every reader of the log checks those fields when it decodes the record now
  (``records.check_fields``, in the one ``CommitAssembler``): strict recovery refuses it
  as a bad payload naming file, offset and LSN, the salvage modes give it up like any
  other bad payload, and verify lists it, exit 1
  (``test_a_crc_valid_record_with_wrongly_typed_fields_is_refused_not_a_crash``).
- A CRC-valid RESTORE_POINT without a name (or one of more than 511 bytes, or a gid
  LMDB cannot hold as a key) made every recovery fail in LMDB: "writing LMDB failed:
  mdb_put: MDB_BAD_VALSIZE ...; nothing was lost: every commit is in the log; open it
  again once the cause is gone [EIO]" — the cause never goes, and `verify` said ok.
  They are bad payloads now, refused with their place like the others
  (``test_a_record_whose_name_lmdb_cannot_hold_is_refused_with_its_place``).
- The same of the reversible-file records: a CRC-valid WORKSPACE whose ``root`` is an
  int or missing, FILE_STEPS whose ``ws``/``steps`` are ints or whose steps are not
  ``[path, before, after]`` entry rows, a WATCH_BEGIN/WATCH_END/FILE_RESTORED/
  FILE_CONFLICT with an int where a root, an LSN list or a conflict row belongs: recover
  failed with "TypeError: a bytes-like object is required", "key must be given", "'int'
  object is not iterable", ... (an unexpected error), verify said ok or crashed alike.
  Checked and refused as bad payloads now
  (``test_a_crc_valid_file_record_with_wrongly_typed_fields_is_refused_not_a_crash``).
- `walstore dump` decoded such records as fine (exit 0) while recovery and verify
  refuse them; it marks them BAD-PAYLOAD (exit 1) like the other bad payloads
  (``test_dump_marks_what_recovery_refuses_as_a_bad_payload``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import walstore
from walstore.codec import pack
from walstore.log.format import RecordType, encode_record, segment_salt
from walstore.log.reader import LogReader

from store_support import CLI, cli_env


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)


WRITER = """
import sys, walstore
s = walstore.open(sys.argv[1])
for i in range(3):
    with s.transaction() as tx:
        tx.put("k%d" % i, i)
print("READY", flush=True)
sys.stdin.read()
"""


def killed_store(path: str) -> None:
    """A store whose writer was killed (SIGKILL) after three acknowledged commits."""
    p = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert p.stdout.readline().strip() == "READY"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)


def append_record(path: str, rtype: int, payload: bytes) -> tuple[str, int, int]:
    """Append one whole record (its CRC right, salted as the store's own) at the end of
    the log: (segment file, offset, LSN)."""
    with open(os.path.join(path, "STORE")) as f:
        sid = bytes.fromhex(json.load(f)["store_id"])
    log = LogReader(os.path.join(path, "wal"), sid)
    for _ in log.walk():
        pass
    seg = os.path.join(path, "wal", "%020d.wal" % log.end_segment)
    rec = encode_record(segment_salt(sid, log.end_segment), rtype, log.end_lsn,
                        log.end_lsn, payload)
    with open(seg, "r+b") as f:
        f.seek(log.end_offset)
        f.write(rec)
    return seg, log.end_offset, log.end_lsn


_C = {"tx": 99, "ts": 1.0, "meta": {}, "w": [[b"sz", pack(1)]]}
HOSTILE = {
    "commit-actions-str": (RecordType.COMMIT, dict(_C, actions="x"), "actions"),
    "commit-actions-ints": (RecordType.COMMIT, dict(_C, actions=[1, 2]), "actions"),
    "commit-gid-int": (RecordType.COMMIT, dict(_C, gid=5), "gid"),
    "commit-compensate-ints": (RecordType.COMMIT, dict(_C, compensate=[1]), "compensate"),
    "commit-reverts-str": (RecordType.COMMIT, dict(_C, reverts="x"), "reverts"),
    "commit-purge-no-range": (RecordType.COMMIT, dict(_C, purge="p/"), "purge"),
    "intent-id-x": (RecordType.ACTION_INTENT, {"tx": 99, "id": "x", "name": "n"},
                    "action id"),
    "result-no-id": (RecordType.ACTION_RESULT, {"tx": 99}, "action id"),
    "compensated-id-int": (RecordType.COMPENSATED, {"id": 5, "state": "compensated"},
                           "action id"),
    "prepare-gid-int": (RecordType.PREPARE, {"tx": 99, "gid": 5, "w": []}, "gid"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_crc_valid_record_with_wrongly_typed_fields_is_refused_not_a_crash(tmp_path, case):
    rtype, body, word = HOSTILE[case]
    path = str(tmp_path / "s")
    killed_store(path)
    seg, offset, lsn = append_record(path, rtype, pack(body))
    before = {n: open(os.path.join(path, "wal", n), "rb").read()
              for n in os.listdir(os.path.join(path, "wal"))}

    v = cli("verify", path, "--json")
    assert v.returncode == 1, (v.stdout, v.stderr)
    doc = json.loads(v.stdout)
    assert any(f"record at LSN {lsn}" in e and word in e for e in doc["errors"]), doc
    assert "unexpected" not in v.stderr

    r = cli("recover", path, "--json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "unexpected" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["refused"] is True and doc["file"] == seg
    assert doc["offset"] == offset and doc["lsn"] == lsn
    assert "bad payload" in doc["reason"] and word in doc["reason"], doc["reason"]
    after = {n: open(os.path.join(path, "wal", n), "rb").read()
             for n in os.listdir(os.path.join(path, "wal"))}
    assert after == before  # (a refusal changes nothing)

    # the operator's way out: give the crafted record up, keep every acknowledged commit
    t = cli("recover", path, "--mode", "tolerate-tail", "--json")
    assert t.returncode in (0, 1), t.stderr
    assert "unexpected" not in t.stderr
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") for i in range(3)] == [0, 1, 2]
        assert s.get("z") is None


LMDB_CANNOT = {
    "restore-point-no-name": (RecordType.RESTORE_POINT, {"ts": 1.0}, "restore point"),
    "restore-point-empty-name": (RecordType.RESTORE_POINT, {"name": "", "ts": 1.0},
                                 "restore point"),
    "restore-point-600-bytes": (RecordType.RESTORE_POINT, {"name": "r" * 600, "ts": 1.0},
                                "restore point"),
    "prepare-gid-600-bytes": (RecordType.PREPARE, {"tx": 99, "gid": "g" * 600, "w": []},
                              "gid"),
}


@pytest.mark.parametrize("case", sorted(LMDB_CANNOT))
def test_a_record_whose_name_lmdb_cannot_hold_is_refused_with_its_place(tmp_path, case):
    rtype, body, word = LMDB_CANNOT[case]
    path = str(tmp_path / "s")
    killed_store(path)
    seg, offset, lsn = append_record(path, rtype, pack(body))
    v = cli("verify", path, "--json")
    assert v.returncode == 1, (v.stdout, v.stderr)
    assert any(f"record at LSN {lsn}" in e and word in e
               for e in json.loads(v.stdout)["errors"]), v.stdout
    r = cli("recover", path)
    assert r.returncode == 1
    assert "MDB_BAD_VALSIZE" not in r.stderr and "once the cause is gone" not in r.stderr
    assert f"offset {offset}, LSN {lsn})" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert "bad payload" in r.stdout + r.stderr
    t = cli("recover", path, "--mode", "tolerate-tail")
    assert t.returncode in (0, 1) and "MDB_BAD_VALSIZE" not in t.stderr, t.stderr
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("case", ["commit-gid-int", "intent-id-x", "commit-actions-str",
                                  "restore-point-no-name"])
def test_dump_marks_what_recovery_refuses_as_a_bad_payload(tmp_path, case):
    rtype, body, word = {**HOSTILE, **LMDB_CANNOT}[case]
    path = str(tmp_path / "s")
    killed_store(path)
    _seg, _offset, lsn = append_record(path, rtype, pack(body))
    d = cli("dump", path, "--json")
    assert d.returncode == 1, (d.stdout[-500:], d.stderr)
    recs = json.loads(d.stdout)["records"]
    bad = [r for r in recs if r["lsn"] == lsn]
    assert bad and bad[0]["type"] == "BAD-PAYLOAD", bad
    assert word in bad[0]["summary"]
    assert [r["type"] for r in recs].count("COMMIT") == 3  # (the good ones as they were)


_WS = b"/nonexistent-ws"
FILE_HOSTILE = {
    "workspace-root-int": (RecordType.WORKSPACE, {"root": 5, "ignore": 5}, "root"),
    "workspace-empty": (RecordType.WORKSPACE, {}, "root"),
    "file-steps-ints": (RecordType.FILE_STEPS, {"tx": 99, "ws": 5, "op": 5, "steps": 5},
                        "ws"),
    "file-steps-bad-rows": (RecordType.FILE_STEPS, {"tx": 99, "ws": _WS, "op": "write",
                                                    "steps": [[1, 2, 3]]}, "step"),
    "watch-begin-ws-int": (RecordType.WATCH_BEGIN, {"tx": 99, "ws": 5, "manifest": 5},
                           "ws"),
    "watch-end-begin-str": (RecordType.WATCH_END, {"tx": 99, "ws": _WS, "begin": "x",
                                                   "n": "y"}, "begin"),
    "file-restored-effects-int": (RecordType.FILE_RESTORED, {"tx": 99, "effects": 5},
                                  "effects"),
    "file-conflict-int": (RecordType.FILE_CONFLICT, {"tx": 99, "ws": _WS, "effect": 1,
                                                     "conflict": 5}, "conflict"),
}


@pytest.mark.parametrize("case", sorted(FILE_HOSTILE))
def test_a_crc_valid_file_record_with_wrongly_typed_fields_is_refused_not_a_crash(tmp_path,
                                                                                 case):
    rtype, body, word = FILE_HOSTILE[case]
    path = str(tmp_path / "s")
    killed_store(path)
    seg, offset, lsn = append_record(path, rtype, pack(body))
    v = cli("verify", path, "--json")
    assert v.returncode == 1 and "unexpected" not in v.stderr, (v.stdout, v.stderr)
    assert any(f"record at LSN {lsn}" in e and word in e
               for e in json.loads(v.stdout)["errors"]), v.stdout
    r = cli("recover", path, "--json")
    assert r.returncode == 1 and "unexpected" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["refused"] and (doc["file"], doc["offset"], doc["lsn"]) == (seg, offset, lsn)
    assert "bad payload" in doc["reason"] and word in doc["reason"], doc["reason"]
    t = cli("recover", path, "--mode", "tolerate-tail")
    assert t.returncode in (0, 1) and "unexpected" not in t.stderr, t.stderr
    with walstore.open(path) as s:
        assert [s.get(f"k{i}") for i in range(3)] == [0, 1, 2]
