"""Audit 71, review of the read-only follower's damage check (a stop short of the live
writer's shared mark, read again, is CorruptionError): false alarms beside a healthy
writer.

- A read-only store whose LMDB handle was on a data file the writer's purge had swapped
  out (the swap lands between ``refresh``'s ``replaced()`` look and the follower's read)
  judged the segments trimmed since by the old file's ``applied`` LSN, frozen at the
  swap: every segment the writer trimmed past it read as missing, and the healthy store
  raised "gap: ... the segment holding it is missing ... damaged since" (seen once a
  minute by a long-lived reader beside a writer committing, purging and checkpointing
  flat out, 64 KiB segments).
"""
from __future__ import annotations

import subprocess
import sys

from store_support import cli_env

WRITER = (  # (64 KiB segments; applies and trims only when told)
    "import sys, walstore\n"
    "s = walstore.open(sys.argv[1], durability='full', segment_size=64 * 1024,\n"
    "                  checkpoint_bytes=1 << 30, apply_interval=60)\n"
    "i = 0\n"
    "for line in sys.stdin:\n"
    "    cmd = line.split()\n"
    "    if cmd[0] == 'commit':\n"
    "        for _ in range(int(cmd[1])):\n"
    "            with s.transaction() as t:\n"
    "                t.put(f'k{i % 50}', f'v{i}' + 'x' * 300)\n"
    "            i += 1\n"
    "    elif cmd[0] == 'purge':\n"
    "        s.purge('k1')\n"
    "    elif cmd[0] == 'checkpoint':\n"
    "        s.checkpoint()\n"
    "    print('ok', flush=True)\n")


class Writer:
    """A live writer process taking one command a line (``commit N``, ``purge``,
    ``checkpoint``), each answered once done."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=cli_env())

    def do(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", command

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def test_no_trimmed_segment_reads_as_missing_to_a_reader_on_a_swapped_out_file(tmp_path):
    """Before the fix the follower's read raised CorruptionError ("gap: segment starts at
    LSN 306480 but the log read reaches only LSN 110500 ...") beside the healthy writer;
    the next read, which follows the new data file, read on."""
    import walstore
    path = str(tmp_path / "s")
    w = Writer(path)
    try:
        w.do("commit 300")
        with walstore.open(path, readonly=True) as r:
            assert r.get("k49").startswith("v299")
            w.do("purge")  # (its compaction swaps the data file in)
            w.do("commit 600")  # (several segments)
            w.do("checkpoint")  # (trimmed past what the swapped-out file was applied to)
            # the window: ``refresh`` looked (not replaced yet), then the swap and the trim
            r.engine.follower.catch_up()  # (before the fix: CorruptionError, "gap")
            assert r.get("k49").startswith("v899")  # (the next read follows the new file)
    finally:
        w.close()
