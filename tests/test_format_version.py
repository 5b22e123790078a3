"""The store format version (docs/FORMAT.md, "Format versions"), on real stores and files.

A probe of upgrades and downgrades found the version stayed 1 through changes an older
walstore misreads (new record types, a new PREPARE payload, the COMMIT's ``crossed``
key): the code of the day before opened a store the current code wrote, ignored
``crossed`` as an unknown key and lost an owed compensation; and a whole record of a type
the reader did not know (a newer walstore's) at the log's end was cut as a torn tail
(zeroed: what the newer version wrote, destroyed).  Now STORE says version 2 (released
older code refuses it: "this walstore reads version 1"), a version 1 store is marked 2 by
the first writable open (never by a read-only one), a larger version is refused, and a
whole record of an unknown type or flags is refused with nothing changed.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.log.format import (SEGMENT_HEADER_SIZE, check_record, crc32c, encode_record,
                                 segment_salt)

ROOT = Path(__file__).resolve().parents[1]


def store_doc(root: Path) -> dict:
    return json.loads((root / "STORE").read_text())


def set_version(root: Path, version) -> None:
    doc = store_doc(root)
    doc["version"] = version
    (root / "STORE").write_text(json.dumps(doc))


def all_file_bytes(root: Path) -> dict:
    """Every file of the store (the lock files aside: every open takes them)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("LOCK", "lock.mdb")}


def cli(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def make_store(root: Path, n: int = 3) -> None:
    with walstore.open(str(root)) as s:
        for i in range(n):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)


def test_a_new_store_is_format_version_2(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    doc = store_doc(tmp_path / "s")
    assert doc["format"] == "walstore" and doc["version"] == 2
    assert stat.S_IMODE((tmp_path / "s" / "STORE").stat().st_mode) == 0o600
    r = cli("init", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    assert store_doc(tmp_path / "c")["version"] == 2


def test_a_version_1_store_is_marked_2_by_a_writable_open_only(tmp_path: Path) -> None:
    root = tmp_path / "s"
    make_store(root)
    doc = store_doc(root)
    doc["version"] = 1
    doc["keys"] = "cabcdef01234"  # (every other key is kept as it was)
    (root / "STORE").write_text(json.dumps(doc))
    os.chmod(root / "STORE", 0o600)
    v1 = (root / "STORE").read_bytes()

    with walstore.open(str(root), readonly=True) as s:  # read-only: never rewritten
        assert [s.get(f"k{i}") for i in range(3)] == [0, 1, 2]
    r = cli("get", str(root), "k1")
    assert r.exit_code == 0 and "1" in r.output, r.output
    assert cli("verify", str(root)).exit_code == 0
    assert (root / "STORE").read_bytes() == v1

    with walstore.open(str(root)) as s:
        assert store_doc(root) == dict(doc, version=2)  # (before anything is written)
        assert [s.get(f"k{i}") for i in range(3)] == [0, 1, 2]
        with s.transaction() as tx:
            tx.put("after", 1)
    assert store_doc(root) == dict(doc, version=2)
    assert stat.S_IMODE((root / "STORE").stat().st_mode) == 0o600
    assert not (root / "STORE.tmp").exists()
    with walstore.open(str(root)) as s:
        assert s.get("after") == 1 and store_doc(root)["version"] == 2


def test_a_crashed_version_1_store_is_recovered_then_marked_2(tmp_path: Path) -> None:
    root = tmp_path / "s"
    child = ("import os, sys, walstore\n"
             "s = walstore.open(sys.argv[1], durability='full')\n"
             "for i in range(5):\n"
             "    with s.transaction() as tx: tx.put(f'k{i}', i)\n"
             "os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", child, str(root)], cwd=str(ROOT))
    assert r.returncode == 9
    set_version(root, 1)
    with walstore.open(str(root), readonly=True) as s:
        assert s.get("k4") == 4
    assert store_doc(root)["version"] == 1
    with walstore.open(str(root)) as s:
        assert [s.get(f"k{i}") for i in range(5)] == list(range(5))
    assert store_doc(root)["version"] == 2


@pytest.mark.parametrize("version", [3, 99])
def test_a_store_of_a_newer_version_is_refused_and_left_alone(tmp_path: Path,
                                                               version: int) -> None:
    root = tmp_path / "s"
    make_store(root)
    set_version(root, version)
    before = all_file_bytes(root)
    msg = f"has store format version {version}: it was written by a newer walstore"
    for kw in ({}, {"readonly": True}, {"create": False}):
        with pytest.raises(walstore.NotAStore, match=msg + r".*upgrade walstore"):
            walstore.open(str(root), **kw)
    for cmd in (("get", str(root), "k1"), ("verify", str(root)), ("recover", str(root)),
                ("backup", str(root), str(tmp_path / "bk"))):
        r = cli(*cmd)
        assert r.exit_code == 2 and "written by a newer walstore" in r.output, (cmd, r.output)
    assert all_file_bytes(root) == before
    assert not (tmp_path / "bk").exists()


@pytest.mark.parametrize("version", [0, "2", None, True])
def test_a_store_of_an_unknown_version_is_refused(tmp_path: Path, version) -> None:
    root = tmp_path / "s"
    make_store(root)
    set_version(root, version)
    # (a version that is no integer is damage, named as such since stop 42: probe-disk42)
    match = (r"reads versions 1 to 2" if type(version) is int
             else r"damaged .*version is not an integer")
    with pytest.raises(walstore.NotAStore, match=match):
        walstore.open(str(root))
    assert store_doc(root)["version"] == version


def append_record(root: Path, rtype: int, flags: int = 0) -> tuple[Path, int, bytes]:
    """A whole record (valid CRC, the right LSN) at the end of the log: what a newer
    walstore's writer puts there."""
    sid = bytes.fromhex(store_doc(root)["store_id"])
    seg = sorted((root / "wal").glob("*.wal"))[-1]
    start = int(seg.name[:-4])
    salt = segment_salt(sid, start)
    buf = seg.read_bytes()
    off = SEGMENT_HEADER_SIZE
    while True:
        h, why = check_record(buf, off, salt, start + off - SEGMENT_HEADER_SIZE, len(buf))
        if why:
            break
        off += 28 + h.length
    lsn = start + off - SEGMENT_HEADER_SIZE
    rec = bytearray(encode_record(salt, rtype, lsn, lsn, msgpack.packb({"tx": 99})))
    rec[9] = flags
    rec[0:4] = crc32c(bytes(rec[4:]), salt).to_bytes(4, "little")
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(rec)
    return seg, off, bytes(rec)


@pytest.mark.parametrize("rtype,flags", [(19, 0), (250, 0), (1, 0x80)])
@pytest.mark.parametrize("store_version", [1, 2])
def test_a_whole_record_of_a_newer_walstore_at_the_end_is_refused(
        tmp_path: Path, rtype: int, flags: int, store_version: int) -> None:
    """The probe's repro6: a closed store, then a whole record of a type 19 (or flags)
    at the end of its log.  It was cut into quarantine/ and zeroed at the next open; now
    every reader refuses it, naming it, and no byte of any file changes (a version 1
    STORE stays 1: the open was refused)."""
    root = tmp_path / "s"
    make_store(root)
    set_version(root, store_version)
    seg, off, rec = append_record(root, rtype, flags)
    before = all_file_bytes(root)
    named = f"type {rtype}" + (f" with flags {flags}" if flags else "")
    msg = rf"the log holds a record of {named} \(LSN \d+, file {seg}, offset {off}\) " \
          rf"written by a newer walstore.*upgrade walstore"
    for kw in ({}, {"readonly": True},
               {"options": walstore.Options(recovery_mode="tolerate-tail")},
               {"options": walstore.Options(recovery_mode="skip-corrupt")}):
        with pytest.raises(walstore.NotAStore, match=msg):
            walstore.open(str(root), **kw)
    for cmd in (("get", str(root), "k1"), ("recover", str(root)), ("verify", str(root)),
                ("dump", str(root)), ("backup", str(root), str(tmp_path / "bk"))):
        r = cli(*cmd)
        assert r.exit_code == 2 and "written by a newer walstore" in r.output, (cmd, r.output)
    assert all_file_bytes(root) == before
    assert seg.read_bytes()[off:off + len(rec)] == rec
    assert not (root / "quarantine").exists() and not (tmp_path / "bk").exists()


def test_a_segment_header_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    make_store(root)
    seg = sorted((root / "wal").glob("*.wal"))[-1]
    head = bytearray(seg.read_bytes()[:SEGMENT_HEADER_SIZE])
    head[8:10] = (2).to_bytes(2, "little")
    head[60:64] = crc32c(bytes(head[:60])).to_bytes(4, "little")
    with open(seg, "r+b") as f:
        f.write(head)
    before = all_file_bytes(root)
    for mode in ("strict", "tolerate-tail", "skip-corrupt"):
        with pytest.raises(walstore.NotAStore, match="unsupported segment format version 2: "
                                                     "the segment was written by a newer"):
            walstore.open(str(root), options=walstore.Options(recovery_mode=mode))
    assert all_file_bytes(root) == before and not (root / "quarantine").exists()


def test_backups_and_restores_carry_version_2(tmp_path: Path) -> None:
    src = tmp_path / "src"
    url = f"file://{tmp_path / 'rep'}"
    make_store(src)
    set_version(src, 1)
    r = cli("backup", str(src), str(tmp_path / "bk"))  # (a version 1 source, not opened)
    assert r.exit_code == 0, r.output
    assert store_doc(src)["version"] == 1 and store_doc(tmp_path / "bk")["version"] == 2
    with walstore.open(str(tmp_path / "bk")) as s:
        assert s.get("k2") == 2

    with walstore.open(str(src), replicate_to=url) as s:
        with s.transaction() as tx:
            tx.put("k9", 9)
        s.sync_replica()
    manifest = tmp_path / "rep" / "manifest"
    walstore.restore(url, str(tmp_path / "r1"))
    assert store_doc(tmp_path / "r1")["version"] == 2

    doc = msgpack.unpackb(manifest.read_bytes(), raw=False, strict_map_key=False)
    doc["identity"]["version"] = 1  # (a replica an older walstore's shipper made)
    manifest.write_bytes(msgpack.packb(doc))
    walstore.restore(url, str(tmp_path / "r2"))
    assert store_doc(tmp_path / "r2")["version"] == 2
    with walstore.open(str(tmp_path / "r2")) as s:
        assert s.get("k9") == 9

    doc["identity"]["version"] = 3  # a newer walstore's replica: refused, nothing made
    manifest.write_bytes(msgpack.packb(doc))
    with pytest.raises(walstore.NotAStore, match="has store format version 3: it was "
                                                 "written by a newer walstore"):
        walstore.restore(url, str(tmp_path / "r3"))
    assert not (tmp_path / "r3").exists()


def test_a_refused_open_of_a_version_1_store_leaves_it_version_1(tmp_path: Path) -> None:
    # (review: a damaged action row refused the writable open only after STORE had been
    # rewritten as version 2, so the older walstore a user falls back to refused it too)
    root = tmp_path / "s"
    with walstore.open(str(root), durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
            with tx.action("charge", args={"a": "MARKERACTN"}, compensate="refund"):
                pass
    set_version(root, 1)
    data = bytearray((root / "db" / "data.mdb").read_bytes())
    at = data.find(b"MARKERACTN")
    assert at > 0
    while at > 0:  # (every copy: LMDB's older pages may hold one too)
        data[at - 1] = 0xC1  # (that string's msgpack header: a byte msgpack never uses)
        at = data.find(b"MARKERACTN", at + 1)
    (root / "db" / "data.mdb").write_bytes(bytes(data))
    with pytest.raises(walstore.CorruptionError, match="actions"):
        walstore.open(str(root), compensators={"refund": lambda a: None})
    assert store_doc(root)["version"] == 1


def test_a_backup_refused_for_a_newer_record_names_the_source_segment(tmp_path: Path) -> None:
    """The review probe's repro6: the backup checks the log on its copy, so the refusal
    named the copy's segment (bk/wal/...), removed with the copy on the failure; the
    user was sent to a file that does not exist.  It names the source's segment now, in
    one line (the CLI and the Python call alike)."""
    from walstore.ops.backup import backup
    root = tmp_path / "s"
    make_store(root)
    seg, off, _rec = append_record(root, 99)
    bk = tmp_path / "bk"
    with pytest.raises(walstore.NotAStore) as ei:
        backup(str(root), str(bk))
    msg = str(ei.value)
    assert f"file {seg}, offset {off}" in msg and str(bk) not in msg, msg
    assert msg.startswith(f"backup of {root} refused: ") and "\n" not in msg
    r = cli("backup", str(root), str(bk))
    assert r.exit_code == 2 and f"file {seg}, offset {off}" in r.output, r.output
    assert str(bk) not in r.output and len(r.output.strip().splitlines()) == 1
    assert not bk.exists()


def test_a_replica_an_older_walstore_made_is_marked_with_this_version(tmp_path: Path) -> None:
    # (review: an existing replica's manifest kept "version 1" after its store was
    # upgraded, so an older walstore restored it and misread what this one shipped)
    import msgpack
    rep = tmp_path / "rep"

    def ship(key: str) -> dict:
        """Commit ``key`` with replication on; the replica's manifest after."""
        with walstore.open(str(tmp_path / "s"), replicate_to=f"file://{rep}",
                           replicate_options={"interval": 0.05}) as s:
            with s.transaction() as tx:
                tx.put(key, 1)
            s.sync_replica(timeout=30)
        return msgpack.unpackb((rep / "manifest").read_bytes(), raw=False,
                               strict_map_key=False)

    doc = ship("a")
    assert doc["identity"]["version"] == 2
    doc["identity"]["version"] = 1  # (as an older walstore wrote it)
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    set_version(tmp_path / "s", 1)
    assert ship("b")["identity"]["version"] == 2
