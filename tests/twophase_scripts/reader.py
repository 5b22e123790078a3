"""A read-only walstore process driven line by line on stdin (tests/test_readers.py).

usage: reader.py STORE   then commands, one per line, each answered by one JSON line:
  get KEY | scan [PREFIX] | begin | txget KEY | txscan PREFIX | commit | rollback
  put KEY | delete KEY | txput KEY | checkpoint | prepared | quit
Errors come back as {"error": ClassName, "msg": ...}.  Prints READY once open.
"""
import json
import sys

import walstore


def main() -> None:
    store = walstore.open(sys.argv[1], readonly=True)
    print("READY", flush=True)
    tx = None
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "quit":
                break
            if cmd == "get":
                out = store.get(args[0])
            elif cmd == "scan":
                out = dict(store.scan(prefix=args[0] if args else None))
            elif cmd == "begin":
                tx = store.transaction()
                out = "ok"
            elif cmd == "txget":
                out = tx.get(args[0])
            elif cmd == "txscan":
                out = dict(tx.scan(prefix=args[0]))
            elif cmd == "commit":
                tx.commit()
                out = "committed"
            elif cmd == "rollback":
                tx.rollback()
                out = "rolled back"
            elif cmd == "put":
                with store.transaction() as t:
                    t.put(args[0], 1)
                out = "written"
            elif cmd == "delete":
                with store.transaction() as t:
                    t.delete(args[0])
                out = "written"
            elif cmd == "txput":
                tx.put(args[0], 1)
                out = "buffered"
            elif cmd == "checkpoint":
                store.checkpoint()
                out = "checkpointed"
            elif cmd == "prepared":
                out = store.prepared()
            else:
                out = {"error": "usage", "msg": cmd}
        except Exception as e:  # reported to the parent, which decides
            out = {"error": type(e).__name__, "msg": str(e)}
        print(json.dumps(out), flush=True)
    store.close()


if __name__ == "__main__":
    main()
