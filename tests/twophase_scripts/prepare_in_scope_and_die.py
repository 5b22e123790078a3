"""Child for tests/test_prepared_in_scope_vs_undo.py: prepare a transaction that works for
scopes, then die by SIGKILL.

usage: prepare_in_scope_and_die.py STORE GID [--old-record]

The transaction is begun with ``scope="tag/u1/"``, fenced against undo of ``"fence/u1/"``
(``tx.undo_fence``, as an integration's guard sets it), runs a booking action declared in
``"act/u1/"`` (compensator "cancel", registered by the parent) and writes ``outside/k`` alone.  ``--old-record`` writes its PREPARE without the ``fence`` field, as a
walstore from before it did (the open then reads the action's scope from its row).
"""
import os
import signal
import sys

import walstore
from walstore.engine.conflicts import Prepared


def main() -> None:
    path, gid = sys.argv[1], sys.argv[2]
    if "--old-record" in sys.argv[3:]:
        body = Prepared.body

        def old_body(self):
            out = body(self)
            out.pop("fence", None)
            return out
        Prepared.body = old_body
    store = walstore.open(path, durability="full")
    tx = store.transaction(scope="tag/u1/", meta={"who": "child"})
    tx.undo_fence = "fence/u1/"
    tx.snapshot
    with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                   scope="act/u1/") as act:
        act.result = "booked"
    tx.put("outside/k", "prepared")  # (no key of those scopes: key holds do not meet them)
    tx.prepare(gid)
    print("PREPARED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
