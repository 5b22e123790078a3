"""Audit stop 53, the engine core and recovery: what the earlier stops left uncovered.

Recovery modes on deliberately damaged logs (a real store, its writer killed with
``os._exit`` so LMDB is behind the log, then one file damaged the way a disk or an
operator damages it), run as a user runs them: ``walstore recover --mode ...`` and
``walstore.open(path, recovery_mode=...)``.  Each mode either recovers, saying what it
gave up, or refuses with a walstore error; never an unexpected error from inside.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

import walstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
N = 400  # commits, of ~540 bytes of log each: 3+ segments of 64 KiB


def _killed_store(path: str) -> None:
    """A store whose writer committed N keys (a checkpoint after 300) and died without
    closing: LMDB holds the first ~300, the log all of them, over several segments."""
    script = f"""
import os, walstore
s = walstore.open({path!r}, segment_size=1 << 16)
for i in range({N}):
    with s.transaction() as tx:
        tx.put('k%d' % i, 'v' * 500)
    if i == 300:
        s.checkpoint()
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], env=ENV, check=True, timeout=120)


def _segments(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "wal", "0*.wal")))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], env=ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["point-in-time", "skip-corrupt"])
def test_a_first_segment_truncated_to_nothing_is_given_up_by_the_salvage_modes(tmp_path, mode):
    """Seen: ``walstore recover --mode point-in-time`` (and skip-corrupt) on a store whose
    first segment was truncated to 0 bytes failed with "ValueError: cannot mmap an empty
    file (an unexpected error)": counting what the dropped segment held mapped the empty
    file.  Now the segment is dropped (quarantined) and the recovery says so."""
    path = str(tmp_path / "s")
    _killed_store(path)
    first = _segments(path)[0]
    with open(first, "r+b") as f:
        f.truncate(0)
    strict = _cli("recover", path)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    r = _cli("recover", path, "--mode", mode, "--json")
    assert "unexpected error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, r.stderr  # (damage was found: exit 1, and it recovered)
    doc = json.loads(r.stdout)
    kinds = {p["kind"]: p["action"] for p in doc["problems"]}
    assert kinds.get("dropped-segment") == "dropped", doc["problems"]
    assert not os.path.exists(first)  # (moved to quarantine, not deleted)
    assert any(os.path.basename(first) in q
               for q in os.listdir(os.path.join(path, "quarantine")))
    assert _cli("verify", path).returncode == 0
    with walstore.open(path) as s:  # (a normal open now: nothing left to recover)
        assert s.get("k0") == "v" * 500  # (LMDB's part is kept)


def test_a_first_segment_truncated_to_nothing_through_the_api(tmp_path):
    """The same through ``walstore.open(..., recovery_mode=...)``: a walstore outcome,
    never a ValueError from inside the reader."""
    path = str(tmp_path / "s")
    _killed_store(path)
    with open(_segments(path)[0], "r+b") as f:
        f.truncate(0)
    with pytest.raises(walstore.CorruptionError):
        walstore.open(path)
    with walstore.open(path, recovery_mode="point-in-time") as s:
        assert any(p.kind == "dropped-segment" for p in s.last_recovery.problems)
        assert s.get("k0") == "v" * 500


@pytest.mark.parametrize("mode", ["point-in-time", "skip-corrupt"])
def test_a_stray_segment_named_past_any_lsn_is_dropped_not_a_struct_error(tmp_path, mode):
    """Seen: a file ``wal/99999999999999999999.wal`` (a segment's name, an LSN no 64-bit
    log reaches) holding garbage: strict recovery refused it (a gap), but point-in-time
    and skip-corrupt failed with "undecodable data (error: argument out of range)", a
    struct.error from reading it behind its bad header as this store's segment at that
    position.  It cannot be one: it is dropped (quarantined) unread, and said so."""
    path = str(tmp_path / "s")
    _killed_store(path)
    stray = os.path.join(path, "wal", "99999999999999999999.wal")
    with open(stray, "wb") as f:
        f.write(os.urandom(100))
    assert _cli("recover", path).returncode == 1
    r = _cli("recover", path, "--mode", mode, "--json")
    assert "Traceback" not in r.stderr and "out of range" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert ("dropped-segment", "dropped") in {(p["kind"], p["action"]) for p in doc["problems"]}
    assert not os.path.exists(stray)
    assert _cli("verify", path).returncode == 0
    with walstore.open(path) as s:
        assert s.get("k%d" % (N - 1)) == "v" * 500  # (the log before it is all kept)
