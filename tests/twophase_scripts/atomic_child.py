"""Child for tests/test_atomic_crash.py: ``with walstore.atomic(a, b)``, SIGKILLed at STEP.

usage: atomic_child.py STORE_A STORE_B STEP VALUE

Steps (in the order the coordinator reaches them):
  in-body            inside the with block, before any prepare
  a-prepared         right after a's PREPARE is durable
  b-prepared         right after b's PREPARE is durable (both in doubt, no decision)
  a-commit-written   a's decision COMMIT record appended, before its fsync
  a-commit-synced    a's decision COMMIT fsynced, before the decision row is stored
  a-committed        a's tx.commit() returned (the decision is logged)
  b-committed        b's tx.commit() returned (all done)
  none               no crash: prints DONE
Prints the gid as ``GID <gid>`` once it is known and ``STEP <name>`` when it dies.
"""
import os
import signal
import sys

import walstore
from walstore.engine.transaction import Transaction


def main() -> None:
    pa, pb, step, value = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    a = walstore.open(pa, durability="full")
    b = walstore.open(pb, durability="full")
    names = {id(a._engine): "a", id(b._engine): "b"}

    def die(at: str) -> None:
        if at == step:
            print(f"STEP {at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    real_prepare, real_commit = Transaction.prepare, Transaction.commit

    deciding = []  # set once every participant is prepared: a's next sync is the decision's

    def prepare(self, gid):
        real_prepare(self, gid)
        die(f"{names[id(self._engine)]}-prepared")
        if names[id(self._engine)] == "b":
            deciding.append(True)

    def commit(self):
        lsn = real_commit(self)
        die(f"{names[id(self._engine)]}-committed")
        return lsn

    Transaction.prepare, Transaction.commit = prepare, commit

    journal = a._engine.journal  # the coordinator's only commit is the group's decision
    real_force_durable = journal.force_durable  # (a prepared transaction's COMMIT is forced)

    def force_durable(end, *rest):  # the coordinator's COMMIT (the decision) is written ...
        if deciding:
            die("a-commit-written")
        real_force_durable(end, *rest)
        if deciding:
            die("a-commit-synced")  # ... and durable, nothing else done yet
    journal.force_durable = force_durable

    group = walstore.atomic(a, b, meta={"step": step})
    print(f"GID {group.gid}", flush=True)
    with group as (ta, tb):
        ta.put("a/x", value)
        ta.put("a/y", value)
        ta.delete("a/gone")
        tb.put("b/x", value)
        tb.put("b/total", tb.get("b/total") + 1)
        die("in-body")
    print("DONE", flush=True)
    a.close()
    b.close()


if __name__ == "__main__":
    main()
