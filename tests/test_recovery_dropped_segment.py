"""A segment given up whole is counted: what it held is named in the recovery report.

One flipped bit in the magic of the last WAL segment's header made tolerate-tail,
point-in-time and skip-corrupt drop the whole segment, every acknowledged commit in it,
while the report said ``given_up_records: 0, given_up_txids: []`` (only a
``dropped-segment`` problem named the file), although the records behind the damaged
header were whole (probe-disk, dropped_segment_not_in_given_up.py).  README: each mode
"reports what it gave up"; CONTRACT 4.3: "say what they gave up".  The records behind a
damaged header are now read best-effort by the log reader (as this store's segment at the
position its name says) and counted; what cannot be read is counted as
``given_up_unreadable_bytes``.

Real processes: a writer killed with SIGKILL after acknowledged commits (a small
``segment_size``, so several segments), recovery by ``walstore recover`` (its ``--json``
document and its human output).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import walstore
from store_support import cli_env

N = 300
MODES = ("tolerate-tail", "point-in-time", "skip-corrupt")

_WRITER = r"""
import os, signal, sys
import walstore
s = walstore.open(sys.argv[1], segment_size=8192, apply_interval=86400,
                  apply_batch=10**9, checkpoint_bytes=1 << 40)
for i in range(int(sys.argv[2])):
    with s.transaction() as tx:
        tx.put("k%04d" % i, "v" * 40 + str(i))
    sys.stdout.write("%d %d\n" % (i, tx.id))  # acknowledged: the commit returned
    sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def key_of(i: int) -> str:
    return f"k{i:04d}"


def value_of(i: int) -> str:
    return "v" * 40 + str(i)


@pytest.fixture(scope="module")
def killed_tpl(tmp_path_factory) -> tuple[Path, dict]:
    """A store whose writer was killed (SIGKILL) after N acknowledged commits; the txid of
    each acknowledged commit by its index."""
    root = tmp_path_factory.mktemp("dropseg") / "store"
    p = subprocess.run([sys.executable, "-c", _WRITER, str(root), str(N)],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    acked = {int(i): int(t) for i, t in (line.split() for line in p.stdout.splitlines())}
    assert sorted(acked) == list(range(N))
    assert len(segments(root)) >= 4, segments(root)  # (a middle segment to drop too)
    return root, acked


@pytest.fixture
def killed(killed_tpl, tmp_path) -> tuple[Path, dict]:
    root, acked = killed_tpl
    dest = tmp_path / "store"
    shutil.copytree(root, dest)
    return dest, acked


def segments(root: Path) -> list[Path]:
    return sorted(p for p in (root / "wal").iterdir() if p.name.endswith(".wal"))


def flip_magic_bit(seg: Path) -> None:
    with open(seg, "r+b") as f:
        f.seek(3)
        b = f.read(1)
        f.seek(3)
        f.write(bytes([b[0] ^ 1]))


def recover(root: Path, mode: str, as_json: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "walstore", "recover", str(root), "--mode", mode]
    return subprocess.run(args + (["--json"] if as_json else []), capture_output=True,
                          text=True, env=cli_env(), timeout=300)


def visible(root: Path) -> dict[int, object]:
    with walstore.open(str(root), readonly=True) as s:
        return {i: s.get(key_of(i)) for i in range(N)}


def lost_txids(root: Path, acked: dict) -> tuple[list[int], list[int]]:
    """(indices of the acknowledged commits no longer visible, their txids); every commit
    still visible holds its own value."""
    seen = visible(root)
    lost = [i for i in range(N) if seen[i] is None]
    assert all(seen[i] == value_of(i) for i in range(N) if i not in lost)
    return lost, [acked[i] for i in lost]


def dropped_problem(doc: dict, seg: Path) -> dict:
    drops = [p for p in doc["problems"] if p["kind"] == "dropped-segment"]
    assert [p["file"] for p in drops] == [str(seg)], doc["problems"]
    assert ("bad-segment", str(seg)) in [(p["kind"], p["file"]) for p in doc["problems"]]
    return drops[0]


@pytest.mark.parametrize("mode", MODES)
def test_last_segment_with_a_damaged_header_names_what_it_gave_up(killed, mode) -> None:
    root, acked = killed
    last = segments(root)[-1]
    flip_magic_bit(last)

    p = recover(root, mode)
    assert p.returncode == 1, p.stderr  # damage was found
    doc = json.loads(p.stdout)
    lost, txids = lost_txids(root, acked)

    # the store is the prefix before the dropped segment
    assert lost and lost == list(range(lost[0], N)), lost
    # and the report names exactly the acknowledged commits it no longer holds
    assert doc["given_up_records"] > 0
    assert doc["given_up_records"] == len(lost)
    assert sorted(doc["given_up_txids"]) == sorted(txids)
    assert len(doc["given_up_txids"]) == len(set(doc["given_up_txids"]))
    assert doc["given_up_unreadable_bytes"] == 0
    drop = dropped_problem(doc, last)
    assert f"{len(lost)} valid records given up" in drop["reason"], drop
    assert "read behind its damaged header" in drop["reason"], drop
    assert not last.exists() and Path(drop["quarantined"]).exists()

    # a second recovery finds nothing more to give up
    again = json.loads(recover(root, mode).stdout)
    assert again["given_up_records"] == 0 and again["given_up_txids"] == []


def test_human_output_says_what_the_dropped_segment_held(killed) -> None:
    root, acked = killed
    last = segments(root)[-1]
    flip_magic_bit(last)
    p = recover(root, "tolerate-tail", as_json=False)
    assert p.returncode == 1, p.stderr
    lost, txids = lost_txids(root, acked)
    assert lost
    assert f"gave up {len(lost)} valid records behind the damage" in p.stdout, p.stdout
    assert f"records of txids {txids[0]}, " in p.stdout, p.stdout
    assert "dropped-segment: bad segment magic (read behind its damaged header" in p.stdout


def test_middle_segment_with_a_damaged_header_skip_corrupt(killed) -> None:
    """skip-corrupt drops a middle segment whose header is damaged and goes on with the
    next: the report names the commits of the hole."""
    root, acked = killed
    middle = segments(root)[1]
    flip_magic_bit(middle)

    p = recover(root, "skip-corrupt")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    lost, txids = lost_txids(root, acked)
    assert lost and lost == list(range(lost[0], lost[-1] + 1)) and lost[-1] < N - 1, lost
    assert doc["given_up_records"] == len(lost)
    assert sorted(doc["given_up_txids"]) == sorted(txids)
    assert doc["given_up_unreadable_bytes"] == 0
    assert f"{len(lost)} valid records given up" in dropped_problem(doc, middle)["reason"]


def damage_every_record(seg: Path) -> int:
    """Flip the header's magic bit and bits of every non-zero byte behind it (no record's
    CRC holds any more); returns how many bytes lie behind the header up to its last
    non-zero one."""
    flip_magic_bit(seg)
    data = bytearray(seg.read_bytes())
    for off in range(64, len(data)):
        if data[off]:
            data[off] ^= 0x5A
    seg.write_bytes(bytes(data))
    return len(bytes(data[64:]).rstrip(b"\x00"))


@pytest.mark.parametrize("mode", MODES)
def test_nothing_readable_behind_a_damaged_header_is_said(killed, mode) -> None:
    """Header and records damaged: nothing can be named, and the report says how many bytes
    were given up unread instead of reporting 0 given up."""
    root, acked = killed
    last = segments(root)[-1]
    written = damage_every_record(last)

    p = recover(root, mode)
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    lost, _txids = lost_txids(root, acked)
    assert lost and lost == list(range(lost[0], N))
    assert doc["given_up_records"] == 0 and doc["given_up_txids"] == []
    assert doc["given_up_unreadable_bytes"] == written > 0
    drop = dropped_problem(doc, last)
    assert f"{written} bytes no valid record could be read from" in drop["reason"], drop


def test_nothing_readable_human_output(killed) -> None:
    root, _acked = killed
    written = damage_every_record(segments(root)[-1])
    p = recover(root, "point-in-time", as_json=False)
    assert p.returncode == 1, p.stderr
    assert (f"gave up {written} bytes of dropped segments that no valid record could be "
            f"read from") in p.stdout, p.stdout
