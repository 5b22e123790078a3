"""A child process for test_files_dropped.py: a transaction changes files and is dropped
(garbage-collected, never committed nor rolled back) while the store stays open; a second
transaction then changes one of the same paths and commits — stopped before its Nth seam
call (``files_child.Stopper``, counted from the second transaction on) so the test can
kill -9 it there.

    dropped_child.py SPEC_JSON

SPEC: ``store``, ``ws`` (registered by the parent), ``stop`` (0: never), ``after``.
Prints ``STOP <op> <path>`` when halted, ``COMMITTED <txid>`` once ``commit()`` returned,
``CALLS <n>`` at the end.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402
from files_child import Stopper  # noqa: E402


def main() -> None:
    spec = json.loads(sys.argv[1])
    warnings.simplefilter("ignore")
    backend = Stopper(spec.get("stop", 0), spec.get("after", False))
    fileio.set_backend(backend)
    store = walstore.open(spec["store"], apply_interval=3600)
    ws = store.workspace(spec["ws"])
    tx1 = store.transaction()
    f = tx1.files(ws)
    f.write("src/app.py", "LEAKED-UNCOMMITTED\n")
    f.write("conf/app.toml", "LEAKED = true\n")
    f.delete("conf/old.toml")
    f.mkdir("leaked/dir")
    del f, tx1
    gc.collect()
    backend.armed = True
    tx2 = store.transaction()
    tx2.files(ws).write("src/app.py", "print('tx2')\n")
    tx2.put("done", "tx2")
    tx2.commit()
    print(f"COMMITTED {tx2.id}", flush=True)
    backend.armed = False
    print(f"CALLS {backend.n}", flush=True)
    os._exit(0)  # like a crash right after the commit: no close, no checkpoint


if __name__ == "__main__":
    main()
