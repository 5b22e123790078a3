"""A child process for tests/test_commit_point_findings.py: it stops at a chosen moment of
a commit or a compensation path and waits (up to 60 s) for the test's SIGKILL.

    python commit_point_child.py MODE STORE LEDGER CALLS MARKER

Every charge goes through ``tests/agent_scripts/ws_ledger.py`` (an idempotency-keyed
payment ledger); every compensator call is noted in CALLS.  Action args carry the ledger
and calls paths (``ws_ledger_handlers.refund`` can compensate them after the crash).

``fsync-unknown``
    A transaction charges 40 in an action and writes ``paid/<key>``; the WAL's next
    fdatasync fails with EIO (tools/faults.py), so ``commit()`` meets the failure at the
    commit record's fsync.  Prints ``UNKNOWN <json>`` (the error type, the action, and
    where the commit record was written: path, offset, size), then ``CHECKED <json>``
    (what the store says now: refunds, pending compensations, whether it still takes
    writes), and waits.
``rollback-prepared-WHICH-WHEN`` (WHICH: ``newer`` | ``older``; WHEN: ``before`` | ``after``)
    A transaction runs two charging actions (40, then 2), writes ``paid/<key>`` for each,
    and is prepared as gid ``g``; ``rollback_prepared("g")`` compensates them newest first:
    the WHICH one's compensator writes MARKER and blocks, before or after its refund (so
    ``newer-before`` stops right after the decision, before any compensation ran).
    Prints ``PREPARED <json>`` first.
"""
from __future__ import annotations

import errno
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TESTS, "agent_scripts"))
sys.path.insert(0, os.path.dirname(TESTS))  # the repository: tools.faults

import walstore  # noqa: E402
import ws_ledger  # noqa: E402
from action_child import say as say_words, wait_forever  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402


def say(word: str, doc) -> None:
    say_words(word, json.dumps(doc, sort_keys=True))


def main() -> None:
    mode, store_path, ledger, calls, marker = sys.argv[1:6]
    block = {"id": None, "before": mode.endswith("-before")}

    def refund(action) -> None:
        ws_ledger.note_call(calls, action)
        blocking = action.id == block["id"]
        if blocking and block["before"]:
            open(marker, "w").close()
            wait_forever()
        ws_ledger.refund(ledger, action.key)
        if blocking:
            open(marker, "w").close()
            wait_forever()

    store = walstore.open(store_path, durability="full", compensators={"refund": refund})
    args = lambda amount: {"ledger": ledger, "calls": calls, "amount": amount}  # noqa: E731

    def charge(tx, amount: int):
        with tx.action("charge", args=args(amount), compensate="refund") as act:
            act.result = ws_ledger.charge(ledger, act.key, amount)
        tx.put(f"paid/{act.key}", amount)
        return act

    if mode == "fsync-unknown":
        with store.transaction() as tx:  # an earlier commit that must stay as it is
            charge(tx, 7)
        tx = store.transaction(meta={"step": "pay"})
        act = charge(tx, 40)
        fb = FaultBackend()
        with installed(fb):
            since = fb.now()
            fb.fail("fdatasync", errno.EIO, path="*.wal")
            try:
                tx.commit()
                error = None
            except walstore.WalstoreError as e:
                error = type(e).__name__
            writes = [c for c in fb.calls_to("pwrite", path="*.wal", after=since)
                      if c.error is None]
            last = writes[-1]
            say("UNKNOWN", {"error": error, "txid": tx.id, "id": act.id, "key": act.key,
                            "tx_state": tx.state, "path": last.path, "offset": last.offset,
                            "size": last.size, "writes": len(writes)})
            try:
                with store.transaction() as t2:
                    t2.put("after", 1)
                takes_writes = True
            except walstore.ReadOnlyError:
                takes_writes = False
            say("CHECKED", {"refunds": ws_ledger.count(ledger, "refund", act.key),
                            "calls": len(ws_ledger.records(calls)),
                            "pending": [a.id for a in store.pending_compensations()],
                            "visible": store.get(f"paid/{act.key}"),
                            "takes_writes": takes_writes})
            wait_forever()
    elif mode.startswith("rollback-prepared-"):
        tx = store.transaction(meta={"step": "prepared"})
        a1 = charge(tx, 40)
        a2 = charge(tx, 2)
        tx.prepare("g")
        block["id"] = a2.id if mode.split("-")[2] == "newer" else a1.id
        say("PREPARED", {"txid": tx.id, "a1": [a1.id, a1.key], "a2": [a2.id, a2.key]})
        store.rollback_prepared("g")
        say("NOT-REACHED", {})
        wait_forever()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
