"""Damaged WALs, one named test per kind of damage, on segment files written by a real store.

How the stores are made: a child process opens a store with ``durability="full"`` and small
segments, commits one key per transaction, prints ``[txid, lsn]`` of every commit, and then
either closes the store or dies with ``os._exit`` (a crash: no checkpoint, nothing applied to
LMDB, the ``open`` flag left set).  The applier is slowed right down so that a crash leaves
LMDB empty and every commit only in the WAL, which makes the expected outcome exact.

Each test copies one of those stores, damages bytes on disk, then asserts:
- what the segment reader sees (records and LSNs, how the scan ended: clean / torn / corrupt);
- what recovery does in each mode (the records it read, the problem it reports, the exact
  bytes moved to ``quarantine/`` and the note beside them, what it gave up);
- the state the reopened store serves, key by key.

The record layout of the undamaged files is read with an independent parser (``walk``:
``struct`` and crcmod's CRC-32C, per the format in walstore/log/format.py), not with the engine's
reader, so that "the records before the damage" is not defined by the code under test.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import crcmod.predefined
import lmdb
import msgpack
import pytest
from click.testing import CliRunner

import walstore
from walstore.log import format as framing
from walstore.cli import main as cli_main
from walstore.log.format import MAX_PAYLOAD, RecordType, encode_record, segment_salt
from walstore.log.reader import SegmentReader
from walstore.log.segment import segment_name
from walstore.ops.verify import verify_store

SEG_SIZE = 64 * 1024
N_COMMITS = 200
VALUE_SIZE = 1000
HDR = 64   # segment header size (documented)
RHDR = 28  # record header size (documented)
SEAL = 12  # record type ending a rotated segment (documented)

_crc = crcmod.predefined.mkPredefinedCrcFun("crc-32c")


def value_of(i: int) -> str:
    return "v" * VALUE_SIZE + str(i)


def key_of(i: int) -> str:
    return f"k{i:04d}"


# ---- building real stores in a child process ---------------------------------------------

_WRITER = r"""
import json, os, sys
import walstore
a = json.loads(sys.argv[1])
s = walstore.open(a["path"], durability=a["durability"], segment_size=a["segment_size"],
                  apply_interval=3600.0, apply_batch=10**6, max_unapplied=10**7,
                  checkpoint_bytes=1 << 40)
out = []
for i in range(a["n"]):
    with s.transaction(meta={"i": i}) as tx:
        tx.put("k%04d" % i, "v" * a["value_size"] + str(i))
    out.append([tx.id, tx.lsn])
sys.stdout.write(json.dumps(out))
sys.stdout.flush()
if a["close"]:
    s.close()
os._exit(0)
"""


class Rec(NamedTuple):
    offset: int      # file offset of the record header
    lsn: int
    length: int
    type: int
    synced_lsn: int
    end: int         # file offset just past the record
    payload: bytes


class Seg(NamedTuple):
    start: int
    path: Path
    recs: list
    data_end: int  # file offset just past the last record (a rotated segment's SEAL)


def walk(path: Path) -> tuple[bytes, int, list[Rec], int]:
    """Independent parser of one segment: (store id, start LSN, valid records in order,
    the file offset where the valid records end)."""
    data = path.read_bytes()
    magic, version, hsize, _r, sid, start, _created, _pad = struct.unpack_from(
        "<8sHHI16sQQ12s", data, 0)
    assert magic == b"WALSTSEG" and version == 1 and hsize == HDR
    assert struct.unpack_from("<I", data, 60)[0] == _crc(data[:60])
    salt = _crc(sid + struct.pack("<Q", start))
    recs, off = [], HDR
    while off + RHDR <= len(data):
        crc, length, rtype, flags, rmagic, lsn, synced = struct.unpack_from("<IIBB2sQQ", data, off)
        end = off + RHDR + length
        if rmagic != b"WR" or end > len(data) or _crc(data[off + 4:end], salt) != crc:
            break
        assert lsn == start + off - HDR and flags == 0
        if rtype != SEAL:  # the record that ends a rotated segment: not a commit
            recs.append(Rec(off, lsn, length, rtype, synced, end, data[off + RHDR:end]))
        off = end
    return sid, start, recs, off


@dataclass
class Built:
    root: Path
    store_id: bytes
    commits: list            # [(txid, lsn)] in commit order; commit i wrote key_of(i)
    images: dict | None = None  # segment path -> its bytes before the test damaged anything

    @property
    def wal(self) -> Path:
        return self.root / "wal"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def segments(self) -> list[Seg]:
        out = []
        for p in sorted(self.wal.glob("*.wal")):
            sid, start, recs, data_end = walk(p)
            assert sid == self.store_id and p.name == segment_name(start)
            out.append(Seg(start, p, recs, data_end))
        return out

    def index_of_lsn(self, lsn: int) -> int:
        return [l for _t, l in self.commits].index(lsn)

    def txid_at(self, lsn: int) -> int:
        return self.commits[self.index_of_lsn(lsn)][0]

    def image(self, seg: Seg) -> bytes:
        return self.images[str(seg.path)]

    def clone(self, dest: Path) -> "Built":
        shutil.copytree(self.root, dest)
        images = {str(p): p.read_bytes() for p in (dest / "wal").glob("*.wal")}
        return Built(dest, self.store_id, list(self.commits), images)


def build_store(root: Path, *, close: bool, durability: str = "full", n: int = N_COMMITS) -> Built:
    args = {"path": str(root), "n": n, "value_size": VALUE_SIZE, "segment_size": SEG_SIZE,
            "durability": durability, "close": close}
    res = subprocess.run([sys.executable, "-c", _WRITER, json.dumps(args)], capture_output=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr.decode()
    commits = [tuple(c) for c in json.loads(res.stdout)]
    store_id = bytes.fromhex(json.loads((root / "STORE").read_text())["store_id"])
    images = {str(p): p.read_bytes() for p in (root / "wal").glob("*.wal")}
    return Built(root, store_id, commits, images)


@pytest.fixture(scope="module")
def killed_tpl(tmp_path_factory) -> Built:
    b = build_store(tmp_path_factory.mktemp("killed") / "store", close=False)
    segs = b.segments()
    # the shape the tests below rely on: several full segments, a partly filled last one,
    # nothing but COMMIT records, and every record's synced LSN = the end of the one before
    # (durability="full": each commit was fsynced before the next was written)
    assert len(segs) >= 4 and len(segs[-1].recs) >= 15 and all(len(s.recs) >= 40 for s in segs[:-1])
    recs = [r for s in segs for r in s.recs]
    assert [r.lsn for r in recs] == [l for _t, l in b.commits]
    assert all(r.type == RecordType.COMMIT for r in recs)
    for prev, cur in zip(recs, recs[1:]):  # (+ a SEAL record where a segment ended)
        assert cur.synced_lsn - (prev.lsn + RHDR + prev.length) in (0, RHDR + 1)
    assert lmdb_applied(b.root) == (0, 0)
    return b


@pytest.fixture(scope="module")
def other_tpl(tmp_path_factory) -> Built:
    return build_store(tmp_path_factory.mktemp("other") / "store", close=False)


@pytest.fixture(scope="module")
def closed_tpl(tmp_path_factory) -> Built:
    return build_store(tmp_path_factory.mktemp("closed") / "store", close=True)


@pytest.fixture
def killed(killed_tpl, tmp_path) -> Built:
    return killed_tpl.clone(tmp_path / "store")


@pytest.fixture
def closed(closed_tpl, tmp_path) -> Built:
    return closed_tpl.clone(tmp_path / "store")


# ---- helpers --------------------------------------------------------------------------------

def open_store(b: Built, mode: str = "strict") -> walstore.Store:
    return walstore.open(str(b.root), options=walstore.Options(recovery_mode=mode,
                                                               segment_size=SEG_SIZE))


def state_of(store: walstore.Store) -> dict:
    return dict(store.scan())


def expected_state(indices) -> dict:
    return {key_of(i): value_of(i) for i in indices}


def lmdb_applied(root: Path) -> tuple[int, int]:
    """(applied LSN, number of data keys), read straight from LMDB, read-only."""
    env = lmdb.open(str(root / "db"), readonly=True, lock=False, max_dbs=32, subdir=True)
    try:
        meta = env.open_db(b"meta", create=False)
        data = env.open_db(b"data", create=False)
        with env.begin() as txn:
            raw = txn.get(b"applied", db=meta)
            return (struct.unpack(">Q", raw)[0] if raw else 0), txn.stat(data)["entries"]
    finally:
        env.close()


def file_digests(root: Path) -> dict:
    out = {}
    for sub in ("wal", "quarantine"):
        d = root / sub
        if d.exists():
            for p in sorted(d.iterdir()):
                out[f"{sub}/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def flip_bit(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def reframe(b: Built, seg: Seg, rec: Rec, *, rtype: int | None = None,
            payload: bytes | None = None) -> None:
    """Rewrite a record in place with a valid CRC: only what we change is wrong."""
    payload = rec.payload if payload is None else payload
    assert len(payload) == rec.length
    data = encode_record(segment_salt(b.store_id, seg.start), rec.type if rtype is None else rtype,
                         rec.lsn, rec.synced_lsn, payload)
    write_at(seg.path, rec.offset, data)


def nonzero_end(data: bytes, start: int) -> int:
    """Offset just past the last non-zero byte at or after ``start``."""
    return start + len(data[start:].rstrip(b"\x00"))


def quarantined(b: Built, seg_path: Path, offset: int) -> tuple[bytes, dict]:
    """(bytes, note) of the one quarantine file holding a cut of ``seg_path`` at ``offset``."""
    names = [p.name for p in b.quarantine.iterdir()
             if p.name.startswith(f"{seg_path.name}@{offset}.") and p.name.endswith(".bin")]
    assert len(names) == 1, sorted(p.name for p in b.quarantine.iterdir())
    note = json.loads((b.quarantine / (names[0] + ".json")).read_text())
    return (b.quarantine / names[0]).read_bytes(), note


def dropped(b: Built, seg_path: Path) -> tuple[bytes, dict]:
    names = [p.name for p in b.quarantine.iterdir()
             if p.name.startswith(f"{seg_path.name}.") and p.name.endswith(".bin")]
    assert len(names) == 1, sorted(p.name for p in b.quarantine.iterdir())
    note = json.loads((b.quarantine / (names[0] + ".json")).read_text())
    return (b.quarantine / names[0]).read_bytes(), note


def quarantine_bins(b: Built) -> list[str]:
    if not b.quarantine.exists():
        return []
    return sorted(p.name for p in b.quarantine.iterdir() if p.name.endswith(".bin"))


def read_segment(path: Path, store_id: bytes, start: int) -> tuple[list, object]:
    reader = SegmentReader(str(path), store_id, start)
    assert reader.header_error is None
    recs = list(reader.records())
    return recs, reader.end


def assert_cut(b: Built, rep, seg: Seg, off: int, cut: bytes, *, kind: str, action: str,
               reason: str) -> None:
    """The report names the cut and quarantine/ holds exactly ``cut`` with a matching note."""
    lsn = seg.start + off - HDR
    probs = [p for p in rep.problems if p.file == str(seg.path) and p.offset == off]
    assert len(probs) == 1, rep.problems
    p = probs[0]
    assert (p.kind, p.lsn, p.bytes, p.action) == (kind, lsn, len(cut), action)
    assert p.reason.startswith(reason), p.reason
    data, note = quarantined(b, seg.path, off)
    assert data == cut
    assert p.quarantined == str(b.quarantine / quarantined_name(b, seg.path, off))
    assert note["file"] == str(seg.path)
    assert (note["offset"], note["lsn"], note["bytes"]) == (off, lsn, len(cut))
    assert (note["kind"], note["action"]) == (kind, action)
    assert note["reason"].startswith(reason)


def quarantined_name(b: Built, seg_path: Path, offset: int) -> str:
    return next(p.name for p in b.quarantine.iterdir()
                if p.name.startswith(f"{seg_path.name}@{offset}.") and p.name.endswith(".bin"))


def run_cli(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


# =========================================================================================
# 1. One named test per damage case
# =========================================================================================

def test_damage_bad_crc_bitflip_in_last_record_is_torn_tail(killed: Built) -> None:
    segs = killed.segments()
    seg, last = segs[-1], segs[-1].recs[-1]
    flip_bit(seg.path, last.offset + RHDR + 100)
    damaged = seg.path.read_bytes()

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert [r.lsn for r in recs] == [r.lsn for r in seg.recs[:-1]]
    assert (end.kind, end.offset, end.lsn, end.reason) == ("torn", last.offset, last.lsn,
                                                           "record checksum mismatch")
    assert end.damaged_end == last.end and end.next_valid is None

    with open_store(killed) as s:  # strict (default): a torn tail is a normal crash outcome
        rep = s.last_recovery
        assert rep.records == N_COMMITS - 1 and rep.redone == N_COMMITS - 1
        assert rep.torn_bytes == last.end - last.offset
        assert rep.end_lsn == last.lsn and rep.given_up_records == 0
        assert [p.kind for p in rep.problems] == ["torn-tail"]
        assert_cut(killed, rep, seg, last.offset, damaged[last.offset:last.end], kind="torn-tail",
                   action="cut", reason="record checksum mismatch")
        assert state_of(s) == expected_state(range(N_COMMITS - 1))
    assert quarantine_bins(killed) == [quarantined_name(killed, seg.path, last.offset)]


def test_damage_bad_crc_bitflip_in_middle_is_corrupt(killed: Built) -> None:
    segs = killed.segments()
    seg = segs[1]
    bad, nxt = seg.recs[30], seg.recs[31]
    flip_bit(seg.path, bad.offset + RHDR + 7)

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert [r.lsn for r in recs] == [r.lsn for r in seg.recs[:30]]
    assert (end.kind, end.offset, end.lsn) == ("corrupt", bad.offset, bad.lsn)
    assert end.reason == "record checksum mismatch"
    assert end.next_valid.lsn == nxt.lsn and end.next_valid.synced_lsn == nxt.synced_lsn > bad.lsn
    assert end.damaged_end == seg.data_end

    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(seg.path), bad.offset, bad.lsn)
    assert e.reason.startswith("corrupt-record: record checksum mismatch")
    assert f"a valid record at LSN {nxt.lsn} follows" in e.reason
    assert not killed.quarantine.exists() and lmdb_applied(killed.root) == (0, 0)


def test_damage_bad_length_field_in_middle_is_corrupt(killed: Built) -> None:
    seg = killed.segments()[2]
    bad, nxt = seg.recs[20], seg.recs[21]
    write_at(seg.path, bad.offset + 4, struct.pack("<I", bad.length + 1))

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert len(recs) == 20 and recs[-1].lsn == seg.recs[19].lsn
    assert (end.kind, end.offset, end.reason) == ("corrupt", bad.offset, "record checksum mismatch")
    assert end.next_valid.offset == nxt.offset

    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(seg.path), bad.offset, bad.lsn)
    assert ei.value.reason.startswith("corrupt-record: record checksum mismatch")
    assert not killed.quarantine.exists()


def test_damage_bad_length_field_in_last_record_is_torn_tail(killed: Built) -> None:
    seg = killed.segments()[-1]
    last = seg.recs[-1]
    huge = 1 << 20  # below MAX_PAYLOAD, beyond the file
    write_at(seg.path, last.offset + 4, struct.pack("<I", huge))
    damaged = seg.path.read_bytes()
    avail = len(damaged) - last.offset - RHDR

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert [r.lsn for r in recs] == [r.lsn for r in seg.recs[:-1]]
    assert (end.kind, end.offset) == ("torn", last.offset)
    assert end.reason == f"truncated record payload ({avail} of {huge} bytes)"

    with open_store(killed) as s:
        rep = s.last_recovery
        assert rep.records == N_COMMITS - 1 and rep.torn_bytes == last.end - last.offset
        assert_cut(killed, rep, seg, last.offset, damaged[last.offset:last.end], kind="torn-tail",
                   action="cut", reason="truncated record payload")
        assert state_of(s) == expected_state(range(N_COMMITS - 1))


@pytest.mark.parametrize("where", ["header", "payload"])
def test_damage_truncated_segment_file_is_corruption_not_a_torn_tail(killed: Built, where) -> None:
    """A crash never shortens a preallocated segment (it overwrites zeros): a file shorter
    than the size its header recorded was truncated by something else.  Strict recovery
    refuses it; tolerate-tail cuts it and gives the file back its size."""
    seg = killed.segments()[-1]
    last = seg.recs[-1]
    keep = last.offset + (12 if where == "header" else RHDR + last.length // 2)
    made = seg.path.stat().st_size
    original = seg.path.read_bytes()
    with open(seg.path, "r+b") as f:
        f.truncate(keep)

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert len(recs) == len(seg.recs) - 1
    assert (end.kind, end.offset, end.lsn) == ("truncated", last.offset, last.lsn)
    assert f"{keep} bytes long but was made {made} bytes long" in end.reason

    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(seg.path), last.offset, last.lsn)
    assert ei.value.reason.startswith("truncated: ") and not killed.quarantine.exists()
    assert verify_store(str(killed.root)).errors

    with open_store(killed, "tolerate-tail") as s:
        rep = s.last_recovery
        assert [(p.kind, p.offset) for p in rep.problems] == [("corrupt-record", last.offset)]
        assert rep.given_up_records == 0 and rep.end_lsn == last.lsn
        assert state_of(s) == expected_state(range(N_COMMITS - 1))
        with s.transaction() as tx:  # the log goes on after the cut
            tx.put("after", 1)
    assert seg.path.stat().st_size == made and quarantine_bins(killed)
    kept = b"".join((killed.quarantine / n).read_bytes() for n in quarantine_bins(killed))
    assert original[last.offset:keep] in kept
    with open_store(killed) as s:
        assert s.last_recovery.problems == [] and s.get("after") == 1
        assert state_of(s) == {**expected_state(range(N_COMMITS - 1)), "after": 1}


def all_file_bytes(root: Path) -> dict:
    """Every file of the store (the lock files aside: each open takes them), by content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("LOCK", "lock.mdb")}


@pytest.mark.parametrize("where", ["middle", "last"])
@pytest.mark.parametrize("what", ["type", "flags"])
def test_whole_record_of_unknown_type_or_flags_is_a_newer_writers_refused(
        killed: Built, where: str, what: str) -> None:
    """A record whose CRC checks but whose type (or flags) this code does not know was
    written whole by a newer walstore: every mode, read-only opens, verify and the CLI
    refuse it with NotAStore naming it, and change nothing.  (It was taken for damage: a
    torn tail, cut to quarantine/ and zeroed, at the end of the log: what the newer
    walstore wrote was destroyed by a deployment rollback.)"""
    seg = killed.segments()[1] if where == "middle" else killed.segments()[-1]
    bad = seg.recs[10] if where == "middle" else seg.recs[-1]
    if what == "type":
        reframe(killed, seg, bad, rtype=200)
        named = "a record of type 200"
    else:
        data = encode_record(segment_salt(killed.store_id, seg.start), bad.type, bad.lsn,
                             bad.synced_lsn, bad.payload)
        data = bytearray(data)
        data[9] = 0x04
        salt = segment_salt(killed.store_id, seg.start)
        struct.pack_into("<I", data, 0, framing.crc32c(bytes(data[4:]), salt))
        write_at(seg.path, bad.offset, bytes(data))
        named = f"a record of type {int(RecordType.COMMIT)} with flags 4"
    before = all_file_bytes(killed.root)
    message = (f"the log holds {named} (LSN {bad.lsn}, file {seg.path}, offset {bad.offset}) "
               f"written by a newer walstore")

    with pytest.raises(walstore.NotAStore) as ei:
        read_segment(seg.path, killed.store_id, seg.start)
    assert str(ei.value).startswith(message) and "upgrade walstore" in str(ei.value)
    for mode in ("strict", "tolerate-tail", "point-in-time", "skip-corrupt"):
        with pytest.raises(walstore.NotAStore) as ei:
            open_store(killed, mode)
        assert str(ei.value).startswith(message), (mode, str(ei.value))
        assert all_file_bytes(killed.root) == before, mode
    with pytest.raises(walstore.NotAStore, match="newer walstore"):
        walstore.open(str(killed.root), readonly=True)
    with pytest.raises(walstore.NotAStore, match="newer walstore"):
        verify_store(str(killed.root))
    for cmd in (["recover", str(killed.root)], ["verify", str(killed.root)],
                ["recover", str(killed.root), "--mode", "skip-corrupt"]):
        res = run_cli(*cmd)
        assert res.exit_code == 2 and "newer walstore" in res.output, (cmd, res.output)
    assert all_file_bytes(killed.root) == before
    assert not killed.quarantine.exists()


def test_damage_segment_from_another_store_in_middle(killed: Built, other_tpl: Built) -> None:
    segs = killed.segments()
    foreign = other_tpl.segments()[0].path
    victim = segs[2]
    shutil.copyfile(foreign, victim.path)  # another store's segment, under our name
    foreign_bytes = foreign.read_bytes()

    reader = SegmentReader(str(victim.path), killed.store_id, victim.start)
    assert reader.header_error == "segment belongs to another store (store id differs)"

    before = file_digests(killed.root)
    for mode in ("strict", "tolerate-tail"):  # not the last segment: both refuse
        with pytest.raises(walstore.CorruptionError) as ei:
            open_store(killed, mode)
        e = ei.value
        assert (e.file, e.offset, e.lsn) == (str(victim.path), 0, victim.start)
        assert e.reason == "bad-segment: segment belongs to another store (store id differs)"
    assert file_digests(killed.root) == before and lmdb_applied(killed.root) == (0, 0)

    # point-in-time: keep what precedes it, move it and everything after to quarantine
    kept = len(segs[0].recs) + len(segs[1].recs)
    with open_store(killed, "point-in-time") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(kept))
        assert rep.records == kept and rep.end_lsn == victim.start
        # the foreign segment's records are not ours to give up; the last segment's are
        assert rep.given_up_records == len(segs[3].recs)
        assert rep.given_up_txids == [killed.txid_at(r.lsn) for r in segs[3].recs]
        kinds = [(p.kind, p.file) for p in rep.problems]
        assert ("bad-segment", str(victim.path)) in kinds
        assert ("dropped-segment", str(victim.path)) in kinds
        assert ("dropped-segment", str(segs[3].path)) in kinds
    data, note = dropped(killed, victim.path)
    assert data == foreign_bytes and note["action"] == "dropped"
    assert "another store" in note["reason"]
    data, note = dropped(killed, segs[3].path)
    assert data == killed.image(segs[3])
    assert note["reason"] == "after the point-in-time cut"
    assert not victim.path.exists() and not segs[3].path.exists()


def test_damage_segment_from_another_store_as_last_segment(killed: Built, other_tpl: Built
                                                           ) -> None:
    segs = killed.segments()
    last = segs[-1]
    foreign = other_tpl.segments()[-1].path
    shutil.copyfile(foreign, last.path)

    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(last.path), 0, last.start)
    assert "another store" in ei.value.reason

    # tolerate-tail gives up the last segment (and says so); everything before it stays
    kept = sum(len(s.recs) for s in segs[:-1])
    with open_store(killed, "tolerate-tail") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(kept))
        assert rep.end_lsn == last.start
        assert [p.kind for p in rep.problems] == ["bad-segment", "dropped-segment"]
    data, _note = dropped(killed, last.path)
    assert data == foreign.read_bytes()


def test_damage_zero_filled_tail_is_a_clean_end(killed: Built) -> None:
    """Zeros where the last records were: the preallocated file's normal look; nothing to cut."""
    seg = killed.segments()[-1]
    first_zero = seg.recs[-3]
    write_at(seg.path, first_zero.offset, bytes(seg.data_end - first_zero.offset))

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert [r.lsn for r in recs] == [r.lsn for r in seg.recs[:-3]]
    assert (end.kind, end.offset, end.lsn) == ("clean", first_zero.offset, first_zero.lsn)

    with open_store(killed) as s:
        rep = s.last_recovery
        assert rep.records == N_COMMITS - 3 and rep.torn_bytes == 0 and rep.problems == []
        assert rep.end_lsn == first_zero.lsn
        assert state_of(s) == expected_state(range(N_COMMITS - 3))
    assert quarantine_bins(killed) == []


def test_damage_zero_filled_sector_inside_last_record_is_torn(killed: Built) -> None:
    """A torn sector write: the record's first bytes landed, a 512-byte sector of it did not."""
    seg = killed.segments()[-1]
    last = seg.recs[-1]
    sector = (last.offset // 512 + 1) * 512
    assert last.offset + RHDR < sector < last.end
    write_at(seg.path, sector, bytes(min(512, last.end - sector)))
    damaged = seg.path.read_bytes()
    cut_end = nonzero_end(damaged, last.offset)

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert len(recs) == len(seg.recs) - 1
    assert (end.kind, end.offset, end.reason) == ("torn", last.offset, "record checksum mismatch")
    assert end.damaged_end == cut_end

    with open_store(killed) as s:
        rep = s.last_recovery
        assert rep.torn_bytes == cut_end - last.offset
        assert_cut(killed, rep, seg, last.offset, damaged[last.offset:cut_end], kind="torn-tail",
                   action="cut", reason="record checksum mismatch")
        assert state_of(s) == expected_state(range(N_COMMITS - 1))


def test_damage_zero_filled_records_at_end_of_middle_segment_is_a_gap(killed: Built) -> None:
    """Zeros where durable records were, in a segment that is not the last: records are missing."""
    segs = killed.segments()
    seg, nxt = segs[1], segs[2]
    gone = seg.recs[-2]
    write_at(seg.path, gone.offset, bytes(seg.data_end - gone.offset))  # the SEAL too

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert end.kind == "clean" and end.lsn == gone.lsn
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(nxt.path), 0, nxt.start)
    assert e.reason == (f"gap: segment starts at LSN {nxt.start} but the previous one ends at "
                        f"{gone.lsn}: a segment is missing or damaged")


def test_damage_zeroed_sector_in_middle_is_corrupt(killed: Built) -> None:
    seg = killed.segments()[0]
    target = seg.recs[20]
    sector = (target.offset // 4096) * 4096 + 4096  # a 4 KiB page inside the log that never landed
    write_at(seg.path, sector, bytes(4096))
    first_bad = next(r for r in seg.recs if r.end > sector)
    after = next(r for r in seg.recs if r.offset >= sector + 4096)

    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert [r.lsn for r in recs] == [r.lsn for r in seg.recs if r.end <= sector]
    assert (end.kind, end.offset) == ("corrupt", first_bad.offset)
    assert end.next_valid.offset == after.offset

    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.offset, ei.value.lsn) == (first_bad.offset, first_bad.lsn)


# ---- torn versus corrupt: the synced-LSN rule ---------------------------------------------

SID = bytes(range(16))


def _synthetic_segment(path: Path, third_synced: int) -> tuple[list, int]:
    """Three records; the middle one damaged; the third says ``synced_lsn=third_synced``."""
    salt = segment_salt(SID, 0)
    body, lsn, lsns = b"", 0, []
    for synced in (0, 0, third_synced):
        rec = encode_record(salt, RecordType.COMMIT, lsn, synced, msgpack.packb({"tx": 1}))
        lsns.append(lsn)
        body += rec
        lsn += len(rec)
    img = bytearray(framing.encode_segment_header(SID, 0, 0) + body + bytes(256))
    bad_off = HDR + lsns[1]
    img[bad_off + RHDR] ^= 0xFF  # damage the second record's payload
    path.write_bytes(bytes(img))
    return lsns, bad_off


@pytest.mark.parametrize("delta,kind", [(-1, "torn"), (0, "torn"), (1, "corrupt")])
def test_classify_by_synced_lsn_of_the_next_valid_record(tmp_path, delta: int, kind: str) -> None:
    """A valid record behind a bad one makes it corrupt only if it proves the bad one durable."""
    bad_lsn = RHDR + len(msgpack.packb({"tx": 1}))  # the first record's size
    lsns, bad_off = _synthetic_segment(tmp_path / segment_name(0), bad_lsn + delta)
    assert lsns[1] == bad_lsn
    recs, end = read_segment(tmp_path / segment_name(0), SID, 0)
    assert [r.lsn for r in recs] == [0]
    assert (end.kind, end.offset, end.lsn) == (kind, bad_off, bad_lsn)
    assert end.next_valid is not None and end.next_valid.lsn == lsns[2]


def test_classify_unsynced_records_behind_a_bad_one_are_a_torn_tail(tmp_path) -> None:
    """durability="none": nothing was fsynced, so damage with valid records behind it is torn."""
    b = build_store(tmp_path / "store", close=False, durability="none", n=30)
    seg = b.segments()[0]
    assert all(r.synced_lsn == 0 for r in seg.recs)
    bad = seg.recs[12]
    flip_bit(seg.path, bad.offset + RHDR + 3)
    damaged = seg.path.read_bytes()

    recs, end = read_segment(seg.path, b.store_id, seg.start)
    assert len(recs) == 12
    assert (end.kind, end.offset) == ("torn", bad.offset)
    assert end.next_valid.lsn == seg.recs[13].lsn

    with open_store(b) as s:
        rep = s.last_recovery
        cut = damaged[bad.offset:seg.data_end]
        assert rep.torn_bytes == len(cut) and rep.records == 12
        assert_cut(b, rep, seg, bad.offset, cut, kind="torn-tail", action="cut",
                   reason="record checksum mismatch")
        assert state_of(s) == expected_state(range(12))


# =========================================================================================
# 2. Recovery modes on a corrupt middle
# =========================================================================================

@pytest.mark.parametrize("which", ["killed", "closed"])
def test_strict_refuses_corrupt_middle_and_changes_nothing(request, which: str) -> None:
    b: Built = request.getfixturevalue(which)
    segs = b.segments()
    seg = segs[1] if which == "killed" else segs[-1]
    bad, nxt = seg.recs[10], seg.recs[11]
    flip_bit(seg.path, bad.offset + RHDR + 50)
    before_files, before_lmdb = file_digests(b.root), lmdb_applied(b.root)

    for _attempt in range(2):  # refusing twice is the same refusal
        with pytest.raises(walstore.CorruptionError) as ei:
            open_store(b)
        e = ei.value
        assert (e.file, e.offset, e.lsn) == (str(seg.path), bad.offset, bad.lsn)
        assert e.reason == ("corrupt-record: record checksum mismatch; a valid record at LSN "
                            f"{nxt.lsn} follows, written after this one was durable")
        assert str(seg.path) in str(e) and f"offset {bad.offset}" in str(e)
        assert file_digests(b.root) == before_files
        assert lmdb_applied(b.root) == before_lmdb
        assert not b.quarantine.exists()


def test_tolerate_tail_cuts_corruption_in_last_segment(killed: Built) -> None:
    segs = killed.segments()
    seg = segs[-1]
    bad = seg.recs[10]
    flip_bit(seg.path, bad.offset + RHDR + 9)
    damaged = seg.path.read_bytes()
    behind = seg.recs[11:]
    bad_i = killed.index_of_lsn(bad.lsn)

    with open_store(killed, "tolerate-tail") as s:
        rep = s.last_recovery
        assert rep.records == bad_i and rep.end_lsn == bad.lsn
        assert rep.given_up_records == len(behind)
        assert rep.given_up_txids == [killed.txid_at(r.lsn) for r in behind]
        assert_cut(killed, rep, seg, bad.offset, damaged[bad.offset:seg.data_end],
                   kind="corrupt-record", action="cut", reason="record checksum mismatch")
        assert state_of(s) == expected_state(range(bad_i))
        assert s.last_recovery.torn_bytes == 0


def test_tolerate_tail_refuses_corruption_in_earlier_segment(killed: Built) -> None:
    seg = killed.segments()[-2]
    bad = seg.recs[5]
    flip_bit(seg.path, bad.offset + RHDR + 9)
    before = file_digests(killed.root)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed, "tolerate-tail")
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(seg.path), bad.offset, bad.lsn)
    assert file_digests(killed.root) == before and lmdb_applied(killed.root) == (0, 0)


def test_tolerate_tail_refuses_damaged_last_record_of_earlier_segment(killed: Built) -> None:
    """Bad last record of a segment that is not the last: no valid record follows *in that
    file*, but a later segment exists, so the bytes were durable: corruption, not a torn tail."""
    segs = killed.segments()
    seg = segs[1]
    bad = seg.recs[-1]
    flip_bit(seg.path, bad.offset + RHDR + 9)
    for mode in ("strict", "tolerate-tail"):
        with pytest.raises(walstore.CorruptionError) as ei:
            open_store(killed, mode)
        assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(seg.path), bad.offset,
                                                                  bad.lsn)
        assert ("a later segment exists" in ei.value.reason  # or its SEAL, written after it
            or "written after this one was durable" in ei.value.reason)


@pytest.mark.parametrize("kept", [2, 12, 28])
def test_damage_torn_seal_of_a_rotated_segment_is_an_interrupted_rotation(killed: Built,
                                                                          kept: int) -> None:
    """A rotation writes the old segment's SEAL after its successor is durable; a power loss
    can tear that one small write (its sectors land apart) as it can omit it.  In the
    SEAL's own slot, right before the successor's start, that is an interrupted rotation:
    nothing is missing, the bytes are cut (kept in quarantine), every commit is there.
    (Found by tools/powerloss.py --threads 8: a torn image refused as corrupt.)"""
    segs = killed.segments()
    seg, nxt = segs[1], segs[2]
    seal_size = RHDR + 1
    seal_at = seg.data_end - seal_size
    last = seg.recs[-1]
    assert seal_at == last.end and nxt.start == last.lsn + (last.end - last.offset) + seal_size
    write_at(seg.path, seal_at + kept, bytes(seal_size - kept))  # the rest never landed
    recs, end = read_segment(seg.path, killed.store_id, seg.start)
    assert end.kind == "torn" and end.offset == seal_at
    with open_store(killed) as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(N_COMMITS))
        assert [d.kind for d in rep.problems] == ["stale-bytes"]
        assert "torn SEAL" in rep.problems[0].reason
    with open_store(killed) as s:  # and again: harmless
        assert state_of(s) == expected_state(range(N_COMMITS))


def test_point_in_time_keeps_exact_prefix_and_quarantines_the_rest(killed: Built) -> None:
    segs = killed.segments()
    seg = segs[1]
    bad = seg.recs[30]
    flip_bit(seg.path, bad.offset + RHDR + 11)
    damaged = seg.path.read_bytes()
    bad_i = killed.index_of_lsn(bad.lsn)
    after = seg.recs[31:] + [r for s in segs[2:] for r in s.recs]

    with open_store(killed, "point-in-time") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(bad_i))
        assert rep.records == bad_i and rep.redone == bad_i and rep.end_lsn == bad.lsn
        assert rep.given_up_records == len(after)
        assert rep.given_up_txids == [killed.txid_at(r.lsn) for r in after]
        assert_cut(killed, rep, seg, bad.offset, damaged[bad.offset:seg.data_end],
                   kind="corrupt-record", action="cut", reason="record checksum mismatch")
        drops = [p for p in rep.problems if p.kind == "dropped-segment"]
        assert [p.file for p in drops] == [str(x.path) for x in segs[2:]]
        assert all(p.action == "dropped" and p.bytes == SEG_SIZE for p in drops)
        # the store goes on from the cut
        with s.transaction() as tx:
            tx.put("after-cut", True)
        lsn_after = tx.lsn
    assert lsn_after >= bad.lsn
    for later in segs[2:]:
        assert not later.path.exists()
        data, note = dropped(killed, later.path)
        assert data == killed.image(later)
        assert (note["file"], note["reason"], note["action"]) == (
            str(later.path), "after the point-in-time cut", "dropped")
    with open_store(killed) as s:
        assert s.last_recovery.problems == []
        assert state_of(s) == {**expected_state(range(bad_i)), "after-cut": True}


def test_skip_corrupt_keeps_commits_after_skipped_region(killed: Built) -> None:
    segs = killed.segments()
    seg = segs[1]
    bad = seg.recs[30]
    flip_bit(seg.path, bad.offset + RHDR + 11)
    damaged = seg.path.read_bytes()
    bad_i = killed.index_of_lsn(bad.lsn)

    with open_store(killed, "skip-corrupt") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(i for i in range(N_COMMITS) if i != bad_i)
        assert rep.records == N_COMMITS - 1 and rep.redone == N_COMMITS - 1
        assert rep.end_lsn == segs[-1].data_end - HDR + segs[-1].start
        assert_cut(killed, rep, seg, bad.offset, damaged[bad.offset:bad.end],
                   kind="corrupt-record", action="skipped", reason="record checksum mismatch")
        assert [p.kind for p in rep.problems] == ["corrupt-record"]


def test_skip_corrupt_skips_several_regions(killed: Built) -> None:
    segs = killed.segments()
    bads = [segs[0].recs[5], segs[1].recs[40], segs[2].recs[0]]
    for r in bads:
        seg = next(s for s in segs if r in s.recs)
        flip_bit(seg.path, r.offset + RHDR + 1)
    damaged = {str(s.path): s.path.read_bytes() for s in segs}
    bad_is = {killed.index_of_lsn(r.lsn) for r in bads}
    with open_store(killed, "skip-corrupt") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(i for i in range(N_COMMITS) if i not in bad_is)
        assert sorted((p.lsn, p.bytes, p.action) for p in rep.problems) == sorted(
            (r.lsn, r.end - r.offset, "skipped") for r in bads)
    for r in bads:
        seg = next(s for s in segs if r in s.recs)
        data, note = quarantined(killed, seg.path, r.offset)
        assert data == damaged[str(seg.path)][r.offset:r.end]
        assert (note["action"], note["offset"]) == ("skipped", r.offset)
    # the salvaged log (holes and all) is not kept as the live WAL: no old segment remains
    # there — but every one of them is kept, whole, in quarantine/ (nothing is deleted by
    # recovery: the earlier segments used to go with the checkpoint's trim)
    assert not any(s.path.exists() for s in segs)
    qdir = killed.root / "quarantine"
    for seg in segs:
        kept = list(qdir.glob(f"{seg.path.name}.salvaged.*.bin"))
        assert len(kept) == 1 and kept[0].read_bytes() == damaged[str(seg.path)], seg.path
    with open_store(killed) as s:
        assert s.last_recovery.problems == []
        assert state_of(s) == expected_state(i for i in range(N_COMMITS) if i not in bad_is)


def _bad_payload(length: int) -> bytes:
    """A msgpack value of exactly ``length`` bytes that is not a map (a valid-CRC bad payload)."""
    for n in range(length, 0, -1):
        p = msgpack.packb(["x" * n])
        if len(p) == length:
            return p
    raise AssertionError(length)


def test_strict_refuses_valid_crc_bad_payload(killed: Built) -> None:
    seg = killed.segments()[1]
    bad = seg.recs[30]
    reframe(killed, seg, bad, payload=_bad_payload(bad.length))
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(seg.path), bad.offset, bad.lsn)
    assert ei.value.reason.startswith("bad-payload: ")


BAD_PAYLOAD = "record of type 1 has a valid checksum but a bad payload"


def _forged(rec: Rec, change: str) -> bytes:
    """The record's own COMMIT payload with one thing made impossible, the first write's
    value resized so the payload keeps its length (only what we change is wrong)."""
    for m in range(0, 4 * rec.length):
        body = msgpack.unpackb(rec.payload, raw=False)
        k, _v = body["w"][0]
        if change == "txid":
            body["tx"] = (1 << 64) - 1
        if change == "key-tag":
            body["w"][0][0] = b"z" + k[1:]
        body["w"][0][1] = (b"\xc1" + b"x" * m if change == "value"  # (0xc1: never msgpack)
                           else msgpack.packb("v" * m))
        packed = msgpack.packb(body, use_bin_type=True)
        if len(packed) == rec.length:
            return packed
    raise AssertionError(change)


@pytest.mark.parametrize("change", ["txid", "key-tag"])
def test_strict_refuses_an_impossible_txid_or_key_before_applying_it(killed: Built,
                                                                     change: str) -> None:
    """A valid CRC around a payload no writer makes (found by a probe: a txid of 2**64-1
    escaped as struct.error from the applier, a key with an unknown tag was REDOne into
    LMDB and broke every scan later)."""
    seg = killed.segments()[1]
    bad = seg.recs[30]
    reframe(killed, seg, bad, payload=_forged(bad, change))
    before = file_digests(killed.root)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(seg.path), bad.offset, bad.lsn)
    assert ei.value.reason.startswith("bad-payload: ")
    assert file_digests(killed.root) == before and lmdb_applied(killed.root) == (0, 0)
    assert not verify_store(str(killed.root)).ok


def test_an_undecodable_value_is_named_by_verify_and_reads_raise_corruption(killed: Built
                                                                            ) -> None:
    """Recovery checks a commit's structure, txid and keys, not each value's encoding (it
    would cost every REDO a decode per value); verify does, and a read of such a value
    raises CorruptionError, never msgpack's own exception."""
    seg = killed.segments()[1]
    bad = seg.recs[30]
    reframe(killed, seg, bad, payload=_forged(bad, "value"))
    v = verify_store(str(killed.root))
    assert not v.ok and any(f"record at LSN {bad.lsn}" in e and "does not decode" in e
                            for e in v.errors), v.errors
    with open_store(killed) as s:
        with pytest.raises(walstore.CorruptionError, match="does not decode"):
            dict(s.scan())


def test_tolerate_tail_cuts_bad_payload_in_last_segment(killed: Built) -> None:
    """Regression (was a bug): tolerate-tail skipped a valid-CRC bad payload like skip-corrupt,
    applied the commits behind it and quarantined nothing; the next strict open refused."""
    seg = killed.segments()[-1]
    bad = seg.recs[10]
    reframe(killed, seg, bad, payload=_bad_payload(bad.length))
    damaged = seg.path.read_bytes()
    bad_i = killed.index_of_lsn(bad.lsn)
    behind = seg.recs[11:]
    with open_store(killed, "tolerate-tail") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(bad_i))
        assert rep.end_lsn == bad.lsn
        # the bad record itself passed its checksum, so it counts as a given-up record too;
        # its txid cannot be read, so only the commits behind it are named
        assert rep.given_up_records == len(behind) + 1
        assert rep.given_up_txids == [killed.txid_at(r.lsn) for r in behind]
        assert_cut(killed, rep, seg, bad.offset, damaged[bad.offset:seg.data_end],
                   kind="corrupt-record", action="cut", reason=BAD_PAYLOAD)
    with open_store(killed) as s:
        assert s.last_recovery.problems == []
        assert state_of(s) == expected_state(range(bad_i))


def test_point_in_time_bad_payload_quarantines_rest_of_segment(killed: Built) -> None:
    """Regression (was a bug): point-in-time stopped at a valid-CRC bad payload without cutting,
    quarantining or counting the rest of that segment; the writer resumed over those records
    and the next strict open refused."""
    segs = killed.segments()
    seg = segs[1]
    bad = seg.recs[30]
    reframe(killed, seg, bad, payload=_bad_payload(bad.length))
    damaged = seg.path.read_bytes()
    bad_i = killed.index_of_lsn(bad.lsn)
    after = seg.recs[31:] + [r for s in segs[2:] for r in s.recs]
    with open_store(killed, "point-in-time") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(bad_i))
        assert rep.given_up_records == len(after) + 1  # + the bad record (valid checksum)
        assert rep.given_up_txids == [killed.txid_at(r.lsn) for r in after]
        assert_cut(killed, rep, seg, bad.offset, damaged[bad.offset:seg.data_end],
                   kind="corrupt-record", action="cut", reason=BAD_PAYLOAD)
        assert [p.file for p in rep.problems if p.kind == "dropped-segment"] == [
            str(x.path) for x in segs[2:]]
    with open_store(killed) as s:
        assert s.last_recovery.problems == []
        assert state_of(s) == expected_state(range(bad_i))


def test_point_in_time_on_closed_store_reports_only_what_it_gave_up(closed: Built) -> None:
    """Regression (was a bug): with LMDB already holding the commits behind the damage,
    point-in-time listed them in given_up_txids although the recovered state keeps them."""
    seg = closed.segments()[-1]
    bad = seg.recs[10]
    flip_bit(seg.path, bad.offset + RHDR + 11)
    with open_store(closed, "point-in-time") as s:
        rep = s.last_recovery
        kept = state_of(s)
        kept_txids = {closed.commits[int(k[1:])][0] for k in kept}
        assert kept == expected_state(range(N_COMMITS))  # LMDB had applied everything
        assert not set(rep.given_up_txids) & kept_txids, rep.given_up_txids
        # only the closing CHECKPOINT record behind the damage is given up: every commit
        # behind it is in LMDB already
        assert seg.recs[-1].type == RecordType.CHECKPOINT and seg.recs[-1].lsn >= bad.lsn
        assert rep.given_up_records == 1 and rep.given_up_txids == []


# ---- the command line ------------------------------------------------------------------------

def test_cli_recover_exit_codes_on_corrupt_middle(killed: Built) -> None:
    seg = killed.segments()[1]
    bad = seg.recs[30]
    flip_bit(seg.path, bad.offset + RHDR + 11)
    bad_i = killed.index_of_lsn(bad.lsn)

    res = run_cli("recover", str(killed.root), "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["refused"] is True and doc["recovered"] is False
    assert (doc["file"], doc["offset"], doc["lsn"]) == (str(seg.path), bad.offset, bad.lsn)
    # (a recovery report's keys too: a script reading doc["clean"] met a KeyError)
    assert doc["clean"] is False and doc["mode"] == "strict"
    (p,) = doc["problems"]
    assert (p["action"], p["file"], p["offset"], p["lsn"]) == (
        "refused", str(seg.path), bad.offset, bad.lsn)
    assert not killed.quarantine.exists()

    res = run_cli("recover", str(killed.root), "--mode", "point-in-time", "--json")
    assert res.exit_code == 1  # corruption was found (and given up)
    doc = json.loads(res.stdout)
    assert doc["mode"] == "point-in-time" and doc["end_lsn"] == bad.lsn
    assert doc["given_up_records"] == N_COMMITS - bad_i - 1
    assert {p["kind"] for p in doc["problems"]} == {"corrupt-record", "dropped-segment"}

    res = run_cli("recover", str(killed.root), "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["problems"] == [] and doc["given_up_records"] == 0 and doc["torn_bytes"] == 0

    with open_store(killed) as s:
        assert state_of(s) == expected_state(range(bad_i))


def test_cli_recover_skip_corrupt_then_clean(killed: Built) -> None:
    seg = killed.segments()[-1]
    bad = seg.recs[3]
    flip_bit(seg.path, bad.offset + RHDR + 11)
    bad_i = killed.index_of_lsn(bad.lsn)
    res = run_cli("recover", str(killed.root), "--mode", "skip-corrupt", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [(p["kind"], p["offset"], p["action"], p["bytes"]) for p in doc["problems"]] == [
        ("corrupt-record", bad.offset, "skipped", bad.end - bad.offset)]
    assert doc["records"] == N_COMMITS - 1
    res = run_cli("recover", str(killed.root), "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["problems"] == []
    with open_store(killed) as s:
        assert state_of(s) == expected_state(i for i in range(N_COMMITS) if i != bad_i)


def test_cli_recover_torn_tail_only_exits_0(killed: Built) -> None:
    seg = killed.segments()[-1]
    last = seg.recs[-1]
    write_at(seg.path, last.offset + RHDR + 10, bytes(last.end - last.offset - RHDR - 10))
    # (the torn tail ends at its last non-zero byte, the rest reads as the segment's zero
    # fill: the payload's 10th byte, a commit's timestamp or id, was 0 about one run in
    # 256 — torn_bytes RHDR + 9)
    write_at(seg.path, last.offset + RHDR + 9, b"\xa5")
    res = run_cli("recover", str(killed.root), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["torn_bytes"] == RHDR + 10
    assert [(p["kind"], p["offset"], p["action"]) for p in doc["problems"]] == [
        ("torn-tail", last.offset, "cut")]
    assert doc["records"] == N_COMMITS - 1
    res = run_cli("recover", str(killed.root))
    assert res.exit_code == 0 and "recovered cleanly" in res.stdout


def test_verify_reports_torn_tail_as_warning_and_corrupt_middle_as_error(killed: Built) -> None:
    segs = killed.segments()
    last = segs[-1].recs[-1]
    flip_bit(segs[-1].path, last.offset + RHDR + 2)
    v = verify_store(str(killed.root))
    assert v.ok and v.records == N_COMMITS - 1
    assert len(v.warnings) == 1 and f"offset {last.offset}" in v.warnings[0]

    mid = segs[1].recs[30]
    flip_bit(segs[1].path, mid.offset + RHDR + 2)
    before = file_digests(killed.root)
    v = verify_store(str(killed.root))
    assert not v.ok
    assert any(e.startswith(f"{segs[1].path}: corrupt at offset {mid.offset} (LSN {mid.lsn})")
               for e in v.errors), v.errors
    assert file_digests(killed.root) == before and lmdb_applied(killed.root) == (0, 0)


def test_stale_bytes_behind_a_sealed_segment_are_cut_not_refused(killed: Built) -> None:
    """Leftovers of a failed write behind the last record of a segment that was then sealed by
    a rotation: the next segment starts exactly at that record's end, so nothing of the log is
    missing.  Recovery cuts them (into quarantine) instead of calling them corruption."""
    segs = killed.segments()
    sealed = segs[1]
    junk_at = sealed.data_end
    write_at(sealed.path, junk_at, b"\x11" * 200)
    with open_store(killed) as s:
        rep = s.last_recovery
        assert_cut(killed, rep, sealed, junk_at, b"\x11" * 200, kind="stale-bytes",
                   action="cut", reason="bad record magic")
        assert [p.kind for p in rep.problems] == ["stale-bytes"]
        assert rep.given_up_records == 0
        assert state_of(s) == expected_state(range(N_COMMITS))


# =========================================================================================
# 3. Missing, duplicated, reordered segments
# =========================================================================================

def test_every_segment_missing_after_lmdb_applied_some_is_refused(tmp_path) -> None:
    """LMDB's applied LSN is evidence the log reached it; a live log always keeps its active
    segment.  No segment at all is a missing log (the commits not yet applied are gone),
    never a clean empty one: strict recovery refuses, verify reports it, and a salvaging
    mode opens what LMDB holds.  (Found by a probe: it used to open as a silent prefix.)"""
    root = str(tmp_path / "s")
    s = walstore.open(root)
    for i in range(10):
        s.run(lambda tx: tx.put(f"a{i}", i))
    s.checkpoint()
    for i in range(10):
        s.run(lambda tx: tx.put(f"b{i}", i))
    s._engine.drop_like_a_crash()
    for name in os.listdir(os.path.join(root, "wal")):
        os.remove(os.path.join(root, "wal", name))
    with pytest.raises(walstore.CorruptionError, match="no WAL segment exists") as ei:
        walstore.open(root)
    assert ei.value.file == os.path.join(root, "wal")
    v = verify_store(root)
    assert not v.ok and any("no WAL segment exists" in e for e in v.errors), v.errors
    with walstore.open(root, options=walstore.Options(recovery_mode="skip-corrupt")) as r:
        assert sorted(k for k, _ in r.scan()) == [f"a{i}" for i in range(10)]
        assert [p.kind for p in r.last_recovery.problems] == ["gap"]


def test_missing_middle_segment_strict_refuses(killed: Built) -> None:
    segs = killed.segments()
    os.unlink(segs[1].path)
    before = file_digests(killed.root)
    for mode in ("strict", "tolerate-tail"):
        with pytest.raises(walstore.CorruptionError) as ei:
            open_store(killed, mode)
        e = ei.value
        assert (e.file, e.offset, e.lsn) == (str(segs[2].path), 0, segs[2].start)
        assert e.reason == (f"gap: segment starts at LSN {segs[2].start} but the previous one ends "
                            f"at {segs[1].start}: a segment is missing or damaged")
    assert file_digests(killed.root) == before and lmdb_applied(killed.root) == (0, 0)


def test_missing_first_segment_strict_refuses(killed: Built) -> None:
    segs = killed.segments()
    os.unlink(segs[0].path)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(segs[1].path), 0, segs[1].start)
    assert e.reason.startswith(f"gap: the WAL begins at LSN {segs[1].start} but LMDB is applied "
                               f"only up to 0")


def test_missing_middle_segment_point_in_time_keeps_prefix(killed: Built) -> None:
    segs = killed.segments()
    os.unlink(segs[1].path)
    n0 = len(segs[0].recs)
    later = [r for s in segs[2:] for r in s.recs]
    with open_store(killed, "point-in-time") as s:
        rep = s.last_recovery
        assert state_of(s) == expected_state(range(n0))
        assert rep.end_lsn == segs[1].start
        assert rep.given_up_records == len(later)
        assert rep.given_up_txids == [killed.txid_at(r.lsn) for r in later]
        assert [p.kind for p in rep.problems] == ["gap", "dropped-segment", "dropped-segment"]
    for s_ in segs[2:]:
        assert dropped(killed, s_.path)[0] == killed.image(s_)


def test_missing_segment_before_last_tolerate_tail_refuses(killed: Built) -> None:
    """Regression (was a bug): tolerate-tail accepted the gap because it was reported against
    the last segment, and applied that segment's commits after the hole."""
    segs = killed.segments()
    os.unlink(segs[-2].path)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed, "tolerate-tail")
    assert (ei.value.file, ei.value.offset, ei.value.lsn) == (str(segs[-1].path), 0,
                                                              segs[-1].start)
    assert ei.value.reason.startswith("gap: ")
    assert not killed.quarantine.exists() and lmdb_applied(killed.root) == (0, 0)


def test_duplicated_segment_after_end_strict_refuses(killed: Built) -> None:
    segs = killed.segments()
    end_lsn = segs[-1].start + segs[-1].data_end - HDR
    dup = killed.wal / segment_name(end_lsn)
    shutil.copyfile(segs[1].path, dup)  # a copy of segment 1 under the next start-LSN name
    before = file_digests(killed.root)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(dup), 0, end_lsn)
    assert e.reason == (f"bad-segment: segment header says start LSN {segs[1].start} but the file "
                        f"is named for {end_lsn}")
    assert file_digests(killed.root) == before


def test_duplicated_segment_inside_the_log_strict_refuses(killed: Built) -> None:
    segs = killed.segments()
    dup_start = segs[1].start + 1000
    dup = killed.wal / segment_name(dup_start)
    shutil.copyfile(segs[1].path, dup)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(dup), 0, dup_start)
    assert e.reason == (f"gap: segment starts at LSN {dup_start} but the previous one ends at "
                        f"{segs[2].start}: a segment is missing or damaged")


def test_reordered_segments_strict_refuses(killed: Built) -> None:
    segs = killed.segments()
    a, b = segs[1], segs[2]
    tmp = killed.wal / "swap"
    os.rename(a.path, tmp)
    os.rename(b.path, a.path)
    os.rename(tmp, b.path)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(a.path), 0, a.start)
    assert e.reason == (f"bad-segment: segment header says start LSN {b.start} but the file is "
                        f"named for {a.start}")


def test_renamed_last_segment_strict_refuses(killed: Built) -> None:
    segs = killed.segments()
    last = segs[-1]
    renamed = killed.wal / segment_name(last.start + 64)
    os.rename(last.path, renamed)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    e = ei.value
    assert (e.file, e.offset, e.lsn) == (str(renamed), 0, last.start + 64)
    assert e.reason.startswith(f"gap: segment starts at LSN {last.start + 64} but the previous "
                               f"one ends at {last.start}")


# =========================================================================================
# 4. Recovery twice
# =========================================================================================

def _damage_torn(b: Built) -> None:
    last = b.segments()[-1].recs[-1]
    flip_bit(b.segments()[-1].path, last.offset + RHDR + 1)


def _damage_truncated(b: Built) -> None:
    seg = b.segments()[-1]
    with open(seg.path, "r+b") as f:
        f.truncate(seg.recs[-1].offset + 20)


def _damage_tail_corrupt(b: Built) -> None:
    seg = b.segments()[-1]
    flip_bit(seg.path, seg.recs[5].offset + RHDR + 1)


def _damage_mid_corrupt(b: Built) -> None:
    seg = b.segments()[1]
    flip_bit(seg.path, seg.recs[30].offset + RHDR + 1)


def _damage_missing(b: Built) -> None:
    os.unlink(b.segments()[2].path)


def _damage_bad_payload_mid(b: Built) -> None:
    seg = b.segments()[1]
    reframe(b, seg, seg.recs[30], payload=_bad_payload(seg.recs[30].length))


def _damage_bad_payload_tail(b: Built) -> None:
    seg = b.segments()[-1]
    reframe(b, seg, seg.recs[5], payload=_bad_payload(seg.recs[5].length))


def _damage_foreign_segment(b: Built) -> None:
    segs = b.segments()
    write_at(segs[2].path, 16, bytes(16))  # another store id (and so a bad header CRC)


@pytest.mark.parametrize("damage,mode", [
    (_damage_torn, "strict"),
    (_damage_truncated, "tolerate-tail"),
    (_damage_tail_corrupt, "tolerate-tail"),
    (_damage_mid_corrupt, "point-in-time"),
    (_damage_mid_corrupt, "skip-corrupt"),
    (_damage_missing, "point-in-time"),
    (_damage_missing, "skip-corrupt"),
    (_damage_tail_corrupt, "skip-corrupt"),
    (_damage_tail_corrupt, "point-in-time"),
    (_damage_bad_payload_mid, "point-in-time"),
    (_damage_bad_payload_mid, "skip-corrupt"),
    (_damage_bad_payload_tail, "tolerate-tail"),
    (_damage_bad_payload_tail, "skip-corrupt"),
    (_damage_foreign_segment, "point-in-time"),
    (_damage_foreign_segment, "skip-corrupt"),
], ids=["torn/strict", "truncated/tolerate-tail", "tail-corrupt/tolerate-tail",
        "mid-corrupt/point-in-time", "mid-corrupt/skip-corrupt", "missing/point-in-time",
        "missing/skip-corrupt", "tail-corrupt/skip-corrupt", "tail-corrupt/point-in-time",
        "bad-payload-mid/point-in-time", "bad-payload-mid/skip-corrupt",
        "bad-payload-tail/tolerate-tail", "bad-payload-tail/skip-corrupt",
        "bad-segment/point-in-time", "bad-segment/skip-corrupt"])
def test_recovery_twice_gives_same_state_and_nothing_to_cut(killed: Built, damage, mode) -> None:
    damage(killed)
    with open_store(killed, mode) as s:
        first = state_of(s)
        assert s.last_recovery.problems  # the damage was seen
        if mode == "skip-corrupt" and damage in (_damage_bad_payload_mid,
                                                 _damage_bad_payload_tail):
            assert s.last_recovery.given_up_records >= 1  # (the skipped record: stop 42)
    q1 = file_digests(killed.root)
    q1 = {k: v for k, v in q1.items() if k.startswith("quarantine/")}
    v = verify_store(str(killed.root))
    assert v.ok and v.warnings == [], (v.errors, v.warnings)
    for again in (mode, "strict"):
        with open_store(killed, again) as s:
            rep = s.last_recovery
            assert rep.problems == [] and rep.torn_bytes == 0
            assert rep.given_up_records == 0 and rep.redone == 0 and rep.losers == []
            assert state_of(s) == first
        q2 = {k: v for k, v in file_digests(killed.root).items() if k.startswith("quarantine/")}
        assert q2 == q1


def test_skip_corrupt_in_last_segment_second_recovery_finds_nothing(killed: Built) -> None:
    """Regression (was a bug): skip-corrupt zeroed the skipped region in place; in the last
    segment (never trimmed) every later recovery found that hole followed by valid records:
    strict refused the store for good and skip-corrupt re-quarantined the zeros."""
    seg = killed.segments()[-1]
    bad = seg.recs[5]
    flip_bit(seg.path, bad.offset + RHDR + 1)
    bad_i = killed.index_of_lsn(bad.lsn)
    with open_store(killed, "skip-corrupt") as s:
        assert state_of(s) == expected_state(i for i in range(N_COMMITS) if i != bad_i)
    for again in ("skip-corrupt", "strict"):
        with open_store(killed, again) as s:
            assert s.last_recovery.problems == []
            assert state_of(s) == expected_state(i for i in range(N_COMMITS) if i != bad_i)


# =========================================================================================
# 5. Bounded allocations
# =========================================================================================

def test_length_0xffffffff_in_real_segment_is_a_bound_error(killed: Built) -> None:
    segs = killed.segments()
    seg = segs[1]
    bad, nxt = seg.recs[20], seg.recs[21]
    write_at(seg.path, bad.offset + 4, struct.pack("<I", 0xFFFFFFFF))
    bound = f"record length 4294967295 exceeds the {MAX_PAYLOAD} byte bound"

    reader = SegmentReader(str(seg.path), killed.store_id, seg.start)
    tracemalloc.start()
    try:
        n = sum(1 for _ in reader.records())
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 20
    assert (reader.end.kind, reader.end.offset, reader.end.reason) == ("corrupt", bad.offset, bound)
    assert reader.end.next_valid.lsn == nxt.lsn
    assert peak < 1 << 20

    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.offset, ei.value.lsn) == (bad.offset, bad.lsn)
    assert ei.value.reason.startswith(f"corrupt-record: {bound}")


def test_length_0xffffffff_in_last_record_is_cut_as_torn(killed: Built) -> None:
    seg = killed.segments()[-1]
    last = seg.recs[-1]
    write_at(seg.path, last.offset + 4, struct.pack("<I", 0xFFFFFFFF))
    damaged = seg.path.read_bytes()
    with open_store(killed) as s:
        assert_cut(killed, s.last_recovery, seg, last.offset, damaged[last.offset:last.end],
                   kind="torn-tail", action="cut", reason="record length 4294967295 exceeds")
        assert state_of(s) == expected_state(range(N_COMMITS - 1))


def _resync_filler(size: int, used: int, pattern: str) -> bytes:
    """Garbage after a bad record that looks like record headers, each claiming a long payload.

    "periodic": a 12-byte block repeated (header magic every 12 bytes, LSN fields wrong);
    "positioned": one 28-byte header every 28 bytes, each carrying the LSN of its own position
    (so a cheap LSN check does not rule it out), claiming half the file as its payload.
    """
    if pattern == "periodic":
        block = b"\x01\x02\x03\x04" + struct.pack("<I", 100_000) + b"\x01\x00WR"
        return block * ((size - used) // len(block))
    out = bytearray()
    off = used
    while off + RHDR <= size:
        out += struct.pack("<IIBB2sQQ", 0x12345678, size // 2, 1, 0, b"WR", off - HDR, 0)
        off += RHDR
    return bytes(out)


@pytest.mark.parametrize("pattern", ["periodic", "positioned"])
def test_resync_scan_after_damage_costs_linear_checksum_work(tmp_path, monkeypatch,
                                                             pattern: str) -> None:
    """Regression (was a bug): the resync scan behind a bad record checksummed every candidate
    over its full claimed length, quadratic in the segment size (hours for a crafted 16 MiB
    segment).  The work must stay within a small multiple of max(file size, 1 MiB)."""
    size = 1 << 20
    salt = segment_salt(SID, 0)
    good = encode_record(salt, RecordType.COMMIT, 0, 0, msgpack.packb({"tx": 1}))
    head = framing.encode_segment_header(SID, 0, 0) + good + b"\xff" * 28
    path = tmp_path / segment_name(0)
    path.write_bytes(head + _resync_filler(size, len(head), pattern))
    reader = SegmentReader(str(path), SID, 0)

    real = framing.crc32c
    work = [0]

    def counting_crc(data, crc=0):
        work[0] += len(data)
        # real checksums for small inputs (the one valid record); big candidates are garbage
        return real(data, crc) if len(data) <= 4096 else (real(bytes(data[:16]), crc) ^ 1)

    monkeypatch.setattr(framing, "crc32c", counting_crc)
    recs = list(reader.records())
    assert [r.lsn for r in recs] == [0]
    assert reader.end.offset == HDR + len(good) and reader.end.kind in ("torn", "corrupt")
    assert work[0] <= 8 * size, f"{work[0]} bytes checksummed for a {size}-byte segment"


# =========================================================================================
# 6. A refusal changes nothing
# =========================================================================================

def test_strict_refusal_after_a_long_prefix_leaves_lmdb_unchanged(killed: Built,
                                                                  monkeypatch) -> None:
    # a log longer than one REDO batch, emulated by a small batch (the default is 2000 commits)
    import walstore.engine.recovery as recovery_mod
    monkeypatch.setattr(recovery_mod, "REDO_BATCH", 50)
    seg = killed.segments()[2]
    bad = seg.recs[30]
    flip_bit(seg.path, bad.offset + RHDR + 1)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.offset, ei.value.lsn) == (bad.offset, bad.lsn)
    assert lmdb_applied(killed.root) == (0, 0)


def test_strict_refusal_after_stale_bytes_leaves_wal_unchanged(killed: Built) -> None:
    segs = killed.segments()
    sealed = segs[1]
    # the leftovers of a failed write behind the last record of a sealed segment
    write_at(sealed.path, sealed.data_end, b"\x11" * 200)
    bad = segs[3].recs[5]
    flip_bit(segs[3].path, bad.offset + RHDR + 1)
    before = file_digests(killed.root)
    with pytest.raises(walstore.CorruptionError) as ei:
        open_store(killed)
    assert (ei.value.file, ei.value.offset) == (str(segs[3].path), bad.offset)
    assert file_digests(killed.root) == before
    assert not killed.quarantine.exists()


# ---- an action whose intent is lost (skip-corrupt), records of a cut transaction --------

_IN_FLIGHT_CHARGE = """
import os, sys, time, threading, walstore
s = walstore.open(sys.argv[1], apply_interval=86400, apply_batch=10**9, max_unapplied=10**9)
for i in range(20):
    with s.transaction() as tx: tx.put(f"a{i}", i)
ev = threading.Event()
def agent():
    tx = s.transaction(); tx.__enter__()
    with tx.action("charge", args={"amt": 40}, compensate="refund") as a:
        a.result = "ch_1"
    tx.put("order", "charged"); ev.set(); time.sleep(100)
threading.Thread(target=agent, daemon=True).start(); ev.wait()
for i in range(50):
    with s.transaction() as tx: tx.put(f"b{i}", i)
os._exit(0)
"""


def _charge_in_flight(path: Path) -> list[dict]:
    """A store killed with a transaction in flight whose action ran; its records."""
    subprocess.run([sys.executable, "-c", _IN_FLIGHT_CHARGE, str(path)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    r = CliRunner().invoke(cli_main, ["dump", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)["records"]


def _flip(rec: dict, at: int) -> None:
    with open(rec["file"], "r+b") as f:
        f.seek(rec["offset"] + at)
        b = f.read(1)
        f.seek(rec["offset"] + at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_skip_corrupt_lists_an_action_whose_intent_was_lost_but_whose_result_survives(tmp_path):
    """The charge ran (its ACTION_RESULT survives) but its ACTION_INTENT was damaged: the
    transaction was no loser and the action was listed nowhere.  Now the transaction is
    a loser and the action is owed (pending, with its result), never silently dropped."""
    path = tmp_path / "s"
    recs = _charge_in_flight(path)
    intent = next(r for r in recs if r["type"] == "ACTION_INTENT")
    result = next(r for r in recs if r["type"] == "ACTION_RESULT")
    _flip(intent, 40)
    r = CliRunner().invoke(cli_main, ["recover", str(path), "--mode", "skip-corrupt", "--json"])
    rep = json.loads(r.output)
    txid = result["payload"]["tx"]
    assert txid in rep["losers"], rep
    owed = {a["id"]: a for a in rep["pending_actions"]}
    assert result["payload"]["id"] in owed, rep
    assert owed[result["payload"]["id"]]["result"] == "ch_1"
    assert owed[result["payload"]["id"]]["state"] == "pending"
    with walstore.open(str(path)) as s:
        assert [a.id for a in s.pending_compensations()] == [result["payload"]["id"]]


def test_point_in_time_names_every_transaction_whose_records_were_cut(tmp_path):
    """A cut that gives up a transaction's intent (no COMMIT of it behind the cut) named
    only the cut COMMITs in given_up_txids."""
    path = tmp_path / "s"
    recs = _charge_in_flight(path)
    intent = next(r for r in recs if r["type"] == "ACTION_INTENT")
    commits = [r for r in recs if r["type"] == "COMMIT" and r["lsn"] < intent["lsn"]]
    _flip(commits[-3], 40)
    r = CliRunner().invoke(cli_main, ["recover", str(path), "--mode", "point-in-time", "--json"])
    rep = json.loads(r.output)
    assert intent["payload"]["tx"] in rep["given_up_txids"], rep


_DIVERGE = """
import os, sys, time, walstore
path, tag, start, n, pad = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
s = walstore.open(path, apply_interval=0.05)
for i in range(start, start + n):
    with s.transaction() as tx: tx.put(f"k{i:05d}", {"who": tag, "pad": "x" * pad})
time.sleep(0.5); os._exit(0)
"""


def test_a_segment_from_a_backup_of_the_store_is_not_taken_for_its_own(tmp_path):
    """A backup keeps the store id, so its segments validate in the source: one copied
    over the store's own (the histories diverged, LMDB applied the store's) was REDOne
    and open served a mix of both histories.  The record at LMDB's last applied commit
    must be that commit: every recovery mode refuses, changing nothing."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    S, B = tmp_path / "S", tmp_path / "B"

    def go(p, tag, start, n, pad):
        subprocess.run([sys.executable, "-c", _DIVERGE, str(p), tag, str(start), str(n),
                        str(pad)], check=True, env=env)
    go(S, "S", 0, 50, 100)
    assert CliRunner().invoke(cli_main, ["backup", str(S), str(B)]).exit_code == 0
    go(S, "S", 50, 100, 100)
    go(B, "B", 50, 70, 333)
    seg = sorted(p.name for p in (S / "wal").glob("*.wal"))[-1]
    shutil.copy(B / "wal" / seg, S / "wal" / seg)
    before = file_digests(S)
    for mode in ("strict", "tolerate-tail", "point-in-time", "skip-corrupt"):
        with pytest.raises(walstore.CorruptionError, match="foreign-log"):
            walstore.open(str(S), recovery_mode=mode)
        assert file_digests(S) == before, mode
    with pytest.raises(walstore.CorruptionError, match="foreign-log"):
        walstore.open(str(S), readonly=True)
