"""docs/FORMAT.md describes what a real store holds (probe pr-docs, 2026-12-02): the LMDB
`meta` rows a store writes (``txid_reserved`` and ``recent_purges`` were not listed), a
segment bigger than ``segment_size`` (a record larger than it gets a segment of its own
size; FORMAT.md said segments grow "up to segment_size"), and FILE_STEPS rows whose
uid/gid are nil (the after-image of what walstore writes itself).  Each check reads a real
store's files and the document."""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import lmdb

import walstore
from walstore.ops.inspect import iter_wal

FORMAT = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()


def _segment_sizes(path: str) -> dict[str, int]:
    """Each WAL segment's preallocated size, as its header records it (offset 48)."""
    sizes = {}
    for name in os.listdir(os.path.join(path, "wal")):
        if name.endswith(".wal"):
            with open(os.path.join(path, "wal", name), "rb") as f:
                sizes[name] = struct.unpack_from("<Q", f.read(64), 48)[0]
    return sizes


def _busy_store(tmp_path: Path) -> tuple[str, dict[str, int]]:
    """A store that has done most things: commits, a record bigger than segment_size, a
    restore point, a purge, a file write, a checkpoint, a reopen; and its segments' sizes
    just after the big record."""
    path, ws = str(tmp_path / "s"), tmp_path / "ws"
    ws.mkdir()
    with walstore.open(path, segment_size=1 << 20) as s:
        with s.transaction() as tx:
            tx.put("small", 1)
        with s.transaction() as tx:
            tx.put("big", os.urandom(3 << 20))
        sizes = _segment_sizes(path)
        s.restore_point("p")
        with s.transaction() as tx:
            tx.put("gone/1", "x")
        s.purge("gone/")
        w = s.workspace(str(ws))
        with s.transaction() as tx:
            tx.files(w).write("sub/a.txt", "hello\n")
        s.checkpoint()
    walstore.open(path).close()
    return path, sizes


def test_every_meta_row_a_store_writes_is_documented(tmp_path):
    path, _ = _busy_store(tmp_path)
    env = lmdb.open(os.path.join(path, "db"), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as t:
            keys = {k.decode() for k, _ in t.cursor(db=env.open_db(b"meta", txn=t))}
    finally:
        env.close()
    documented = set(re.findall(r"^\| `meta` \| `(\w+)` \|", FORMAT, re.M))
    assert {"txid_reserved", "recent_purges", "applied", "next_txid"} <= keys
    assert keys <= documented, f"meta rows docs/FORMAT.md does not list: {keys - documented}"


def test_a_segment_may_exceed_segment_size_and_the_format_says_so(tmp_path):
    _, sizes = _busy_store(tmp_path)
    assert max(sizes.values()) > 1 << 20, sizes  # (the 3 MiB value's record got its own)
    section = FORMAT.split("## Segment files", 1)[1].split("\n## ", 1)[0]
    assert "may exceed `segment_size`" in section
    assert "header records the size" in section


def test_file_steps_rows_walstore_wrote_have_nil_owner_and_the_format_says_so(tmp_path):
    path, _ = _busy_store(tmp_path)
    steps = [step for r in iter_wal(path) if r["type"] == "FILE_STEPS"
             for step in r["payload"]["steps"]]
    after = {bytes(p): row for p, _before, row in steps}
    assert after[b"sub/a.txt"][0] == "f" and after[b"sub/a.txt"][-2:] == [None, None]
    assert after[b"sub"][0] == "d" and after[b"sub"][-2:] == [None, None]
    row = next(line for line in FORMAT.splitlines() if line.startswith("| 14 | FILE_STEPS"))
    assert "`uid`/`gid` are nil" in row
