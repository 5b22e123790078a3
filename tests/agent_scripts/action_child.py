"""A child process for the action crash tests: it gets SIGKILLed at a chosen moment.

    python action_child.py STORE LEDGER CALLS MODE MARKER

Every mode first commits one transaction ``committed`` whose action charged the ledger
(printed ``COMMITTED <txid> <action id> <key>``), then stops at its kill point and waits
(up to 60 s) for a SIGKILL:

``intent``        a first action charged 5; then inside a second ``tx.action(...)``,
                  before its body charges anything
                  (``INTENT <txid> <action id> <key> <first id> <first key>``);
``body``          the body charged the ledger and set ``act.result``, the transaction has
                  not committed (``BODY <txid> <action id> <key> <result json>``);
``compensation``  a transaction with two charging actions rolls back: the newer one is
                  compensated, then the older one's compensator refunds, writes MARKER
                  and blocks (``ACTIONS <txid> <id1> <key1> <id2> <key2>`` first);
``rewind``        a restore point (after ``committed``), then two committed transactions
                  with one charging action each, then ``rewind`` to the point: the newer
                  action is compensated, the older one's compensator refunds, writes
                  MARKER and blocks (``REWIND <txid1> <id1> <key1> <txid2> <id2> <key2>``);
``droppoint``     restore points ``gone`` and ``kept``, a commit, ``drop_restore_point("gone")``
                  (``DROPPED <json list of the remaining names>``).
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import walstore  # noqa: E402
import ws_ledger  # noqa: E402


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def wait_forever() -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)
    sys.exit(5)  # nobody killed us: the test is broken


def main() -> None:
    store_path, ledger, calls, mode, marker = sys.argv[1:6]
    block = {"id": None}

    def refund(action) -> None:
        ws_ledger.note_call(calls, action)
        ws_ledger.refund(ledger, action.key)
        if action.id == block["id"]:
            with open(marker, "w") as f:
                f.write(action.id)
            wait_forever()

    store = walstore.open(store_path, compensators={"refund": refund})
    args = lambda amount: {"ledger": ledger, "calls": calls, "amount": amount}  # noqa: E731

    def charging_tx(key: str, amount: int, commit: bool = True):
        tx = store.transaction(meta={"step": key})
        with tx.action("charge", args=args(amount), compensate="refund") as act:
            act.result = ws_ledger.charge(ledger, act.key, amount)
        tx.put(key, amount)
        if commit:
            tx.commit()
        return tx, act

    tx, act = charging_tx("committed", 7)
    say("COMMITTED", tx.id, act.id, act.key)

    if mode == "intent":
        tx = store.transaction()
        tx.put("uncommitted", 1)
        with tx.action("reserve", args=args(5), compensate="refund") as first:
            first.result = ws_ledger.charge(ledger, first.key, 5)
        with tx.action("charge", args=args(40), compensate="refund") as act:
            say("INTENT", tx.id, act.id, act.key, first.id, first.key)
            wait_forever()
    elif mode == "body":
        tx, act = charging_tx("uncommitted", 40, commit=False)
        say("BODY", tx.id, act.id, act.key, json.dumps(act.result, sort_keys=True))
        wait_forever()
    elif mode == "compensation":
        tx = store.transaction()
        with tx.action("charge", args=args(40), compensate="refund") as a1:
            a1.result = ws_ledger.charge(ledger, a1.key, 40)
        with tx.action("charge", args=args(2), compensate="refund") as a2:
            a2.result = ws_ledger.charge(ledger, a2.key, 2)
        tx.put("uncommitted", 1)
        block["id"] = a1.id
        say("ACTIONS", tx.id, a1.id, a1.key, a2.id, a2.key)
        tx.rollback()
        say("NOT REACHED")
        wait_forever()
    elif mode == "rewind":
        store.restore_point("before")
        t1, a1 = charging_tx("after/1", 40)
        t2, a2 = charging_tx("after/2", 2)
        block["id"] = a1.id
        say("REWIND", t1.id, a1.id, a1.key, t2.id, a2.id, a2.key)
        store.rewind("before")
        say("NOT REACHED")
        wait_forever()
    elif mode == "droppoint":
        store.restore_point("gone")
        store.restore_point("kept")
        charging_tx("after-points", 1)
        store.drop_restore_point("gone")
        say("DROPPED", json.dumps(sorted(store.restore_points())))
        wait_forever()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
