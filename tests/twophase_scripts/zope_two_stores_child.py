"""Child for tests/test_audit51_twophase.py: two walstore stores in one ``transaction``
transaction, SIGKILLed between their finishes.

usage: zope_two_stores_child.py STORE_A STORE_B

A foreign resource sorts between the two walstore data managers (``walstore:<A>`` <
``walstore:<A>~`` < ``walstore:<B>``); its ``tpc_finish`` prints the gids and kills the
process: A has committed, B is prepared (in doubt).
"""
import os
import signal
import sys

import transaction

import walstore
from walstore.integrations.transaction import join


class KillBetweenFinishes:
    def __init__(self, key: str, txs) -> None:
        self.key = key
        self.txs = txs
        self.transaction_manager = transaction.manager

    def abort(self, txn) -> None:
        pass

    tpc_abort = abort

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass

    def tpc_vote(self, txn) -> None:
        pass

    def tpc_finish(self, txn) -> None:
        a, b = self.txs
        print(f"A {a.state} {a.gid}", flush=True)
        print(f"B {b.state} {b.gid}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def sortKey(self) -> str:
        return self.key


def main() -> None:
    pa, pb = sys.argv[1], sys.argv[2]
    a = walstore.open(pa, durability="full")
    b = walstore.open(pb, durability="full")
    transaction.begin()
    ta, tb = join(a), join(b)
    ta.put("order/1", "paid")
    tb.put("stock/1", 0)
    killer = KillBetweenFinishes(f"walstore:{a.path}~", (ta, tb))
    assert f"walstore:{a.path}" < killer.sortKey() < f"walstore:{b.path}"
    transaction.get().join(killer)
    transaction.commit()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
