"""Audit 71: the CLI verbs that read the log, the file history and the in-doubt
transactions (`log`, `files`, `diff`, `prepared`, each with --json) beside a live writer,
over damaged WAL segments, in a read-only directory.

- A read-only store beside a live writer read its log tail up to the first record that
  did not check and stopped there for good, as at a record the writer was still copying
  in: a durable record damaged in place (bytes flipped in the middle of the live segment,
  acknowledged commits behind it) made every read-only open show the state before it,
  exit 0 (`walstore log` listed 145 transactions of a writer hundreds past them), while
  `walstore verify` at the same moment said "corrupt ... a valid record follows".  The
  writer's shared mark (VISIBLE) says how far it published: bytes short of it that do not
  read as a record, read again, are damage, and the reads now say so (CorruptionError).
  The same of a segment whose header was damaged (the follower waited at it for good),
  of a record zeroed (read as the writer's end), and of a segment deleted (a hole the
  follower waited at).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest
from store_support import cli_env
from test_cli_hardening import proc_one_line, run_proc

WRITER = (  # (64 KiB segments, nothing applied nor trimmed: the log is all tail)
    "import sys, walstore\n"
    "s = walstore.open(sys.argv[1], durability='full', apply_interval=60,\n"
    "                  segment_size=64 * 1024, checkpoint_bytes=1 << 30)\n"
    "i = 0\n"
    "while True:\n"
    "    with s.transaction(meta={'i': i}) as t:\n"
    "        t.put(f'k{i % 50}', {'i': i, 'pad': 'x' * 200})\n"
    "    i += 1\n"
    "    if i == 600:\n"
    "        print('committed', flush=True)\n")


def _flip(path: str, where: str) -> None:
    """Damage the second segment: 4 bytes flipped 30% into its used part ("record") or
    in its header ("header"), or 512 bytes there zeroed ("zeros": a lost write), or the
    segment gone ("missing"; "missing-first": the one LMDB's applied LSN lies in)."""
    seg = sorted(glob.glob(os.path.join(path, "wal", "0*.wal")))[where != "missing-first"]
    if where.startswith("missing"):
        os.unlink(seg)
        return
    with open(seg, "r+b") as f:
        data = f.read()
        off = 8 if where == "header" else int(len(data.rstrip(b"\0")) * 0.3)
        f.seek(off)
        f.write(bytes(512) if where == "zeros"
                else bytes(b ^ 0xFF for b in data[off:off + 4]))


@pytest.mark.parametrize("where", ["record", "header", "zeros", "missing",
                                   "missing-first"])
def test_no_damaged_durable_record_is_read_as_a_live_writers_tail(tmp_path, where):
    """Before the fix `walstore log --json` beside the writer exited 0, listing the
    transactions before the damage only (176 of 800); after the writer was killed the
    same command said CorruptionError."""
    path = str(tmp_path / "s")
    w = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE,
                         text=True, env=cli_env())
    try:
        assert w.stdout.readline().strip() == "committed"
        for _ in range(3):  # (the healthy store beside it, committing flat out: read)
            r = run_proc("log", path, "--json")
            assert r.returncode == 0, r.stderr
            assert len(json.loads(r.stdout)["transactions"]) == 20
        _flip(path, where)
        time.sleep(0.2)  # (the writer goes on committing past the damage)
        for verb in (["log", path], ["prepared", path], ["scan", path]):
            r = run_proc(*verb, "--json")
            assert r.returncode == 1, (verb, r.stdout[:300], r.stderr)
            assert "corrupt" in proc_one_line(r)
            assert ("gap:" in r.stderr) == where.startswith("missing"), r.stderr
            doc = json.loads(r.stdout)
            assert doc["error"]["type"] == "CorruptionError", doc
    finally:
        w.kill()
        w.wait()
        w.stdout.close()
