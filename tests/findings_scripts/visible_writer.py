"""A writer process whose WAL fsync the test can hold (tests/test_visible_mark.py).

usage: visible_writer.py STORE DURABILITY   then one command per line, one JSON line back:
  put KEY JSON [PAD]   commit KEY=JSON (and pad="x"*PAD); answers the log's end after it
  end                  the log's end (the LSN the next record gets)
  checkpoint           apply everything and checkpoint; answers the log's end after it
  held KEY JSON [PAD]  hold the WAL's fsyncs, start that commit in a thread, answer once
                       its fsync is waiting (commit() has not returned); the test kills
                       the process then (kill -9), or sends ``release``
  release              let the held fsync go; answers once the commit returned
Prints READY once open.
"""
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402
from visible_support import FsyncGate  # noqa: E402


def main() -> None:
    gate = FsyncGate()
    fileio.set_backend(gate)
    store = walstore.open(sys.argv[1], durability=sys.argv[2])
    print("READY", flush=True)
    worker = None

    def commit(key, raw, pad):
        with store.transaction() as tx:
            tx.put(key, json.loads(raw))
            if pad:
                tx.put("pad", "x" * int(pad))

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            break
        if cmd == "put":
            commit(*args, *([None] * (3 - len(args))))
            out = store.stats()["wal_end_lsn"]
        elif cmd == "checkpoint":
            store.checkpoint()
            out = store.stats()["wal_end_lsn"]
        elif cmd == "end":
            out = store.stats()["wal_end_lsn"]
        elif cmd == "held":
            gate.hold()
            worker = threading.Thread(target=commit,
                                      args=(*args, *([None] * (3 - len(args)))))
            worker.start()
            gate.entered.wait()
            out = "held"
        elif cmd == "release":
            gate.release()
            worker.join()
            out = "released"
        else:
            out = {"error": "usage", "msg": cmd}
        print(json.dumps(out), flush=True)
    gate.release()
    store.close()


if __name__ == "__main__":
    main()
