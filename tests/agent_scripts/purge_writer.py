"""A child process for test_readonly_purge.py: the writer process beside a test's
read-only store, purging while the reader holds a transaction, a view or a scan.

    python purge_writer.py STORE OPTIONS_JSON

Opens the store with the options (``walstore.open(STORE, **OPTIONS)``), prints ``READY``
and serves one command per line on stdin, answering one JSON line each:

``put KEY JSON``     one transaction putting the value: ``{"lsn": ...}``
``checkpoint``       ``{"applied": ...}`` (LMDB's applied LSN after it)
``purge PREFIX``     ``store.purge(PREFIX)``: ``{"lsn": ...}`` once it returned
``pause_swap S``     the next compaction waits between renaming its data file in and
                     renaming its lock file in, after creating ``STORE.midswap`` (the
                     test's cue), until the test removes that file (at most S seconds):
                     ``{}``
``quit``             close the store and exit
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402

store_path = sys.argv[1]
options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
pause = {"s": 0.0}
_rename = fileio.rename


def rename(src: str, dst: str) -> None:
    _rename(src, dst)
    if pause["s"] and dst.endswith("data.mdb") and ".compact" in src:
        cue = Path(store_path + ".midswap")
        cue.write_text("data.mdb renamed in")
        end = time.monotonic() + pause["s"]
        while cue.exists() and time.monotonic() < end:
            time.sleep(0.01)
        pause["s"] = 0.0


fileio.rename = rename
s = walstore.open(store_path, **options)
print("READY", flush=True)
for line in sys.stdin:
    parts = line.split(None, 2)
    if not parts:
        continue
    cmd = parts[0]
    if cmd == "quit":
        break
    if cmd == "put":
        with s.transaction() as tx:
            tx.put(parts[1], json.loads(parts[2]))
        out = {"lsn": tx.lsn}
    elif cmd == "checkpoint":
        s.checkpoint()
        out = {"applied": s._engine.state.applied_lsn()}
    elif cmd == "purge":
        out = {"lsn": s.purge(parts[1])["lsn"]}
    elif cmd == "pause_swap":
        pause["s"] = float(parts[1])
        out = {}
    else:
        out = {"error": f"unknown command {cmd!r}"}
    print(json.dumps(out), flush=True)
s.close()
