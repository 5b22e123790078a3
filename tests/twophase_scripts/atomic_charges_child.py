"""Child for tests/test_audit69_twophase.py: an atomic group whose participants each charge
the JSON-lines ledger (tests/agent_scripts/ws_ledger.py), SIGKILLed at STEP.

usage: atomic_charges_child.py STORE_A STORE_B LEDGER CALLS STEP

Steps:
  prepared        both transactions prepared (one charge each, a key each), no decision
  decided         the coordinator (a) committed — the decision — b still prepared
  resolve-effect  (on stores a "prepared" child left) ``resolve_atomic(a, b)``, killed
                  inside its first compensator, after its refund, before its record
Prints ``GID <gid>`` (first two steps) and ``STEP <name>`` as it dies; ``NOT KILLED`` and
exit 3 when the kill point is never reached.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "agent_scripts"))

import walstore  # noqa: E402
import ws_ledger  # noqa: E402
import ws_ledger_handlers  # noqa: E402


def die(step: str) -> None:
    print(f"STEP {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    pa, pb, ledger, calls, step = sys.argv[1:6]

    def refund(action) -> None:
        ws_ledger_handlers.refund(action)
        if step == "resolve-effect":
            die(step)

    comp = {"refund": refund}
    a = walstore.open(pa, durability="full", compensators=comp)
    b = walstore.open(pb, durability="full", compensators=comp)
    if step == "resolve-effect":
        walstore.resolve_atomic(a, b)
    else:
        group = walstore.atomic(a, b)
        print(f"GID {group.gid}", flush=True)
        ta, tb = group.__enter__()
        for tx, key, amount in ((ta, "a/x", 40), (tb, "b/x", 2)):
            with tx.action("charge", args={"ledger": ledger, "calls": calls,
                                           "amount": amount}, compensate="refund") as act:
                act.result = ws_ledger.charge(ledger, act.key, amount)
            tx.put(key, "new")
        ta.prepare(group.gid)
        tb.prepare(group.gid)
        if step == "prepared":
            die(step)
        ta.commit()  # (the decision)
        die(step)
    print("NOT KILLED", flush=True)
    sys.exit(3)


if __name__ == "__main__":
    main()
