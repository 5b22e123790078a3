"""``walstore demo``: an agent's story, end to end, narrated for a newcomer.

It runs real things: transactions on a real store, a savepoint rolled back after a failed
step, a child process killed with SIGKILL in the middle of its work, ``walstore recover``
as an operator would run it, and a check that every step the child was told was committed
survived.  Returns the exit status (0 when every check held).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import walstore

TOTAL_BUDGET = 100


def say(text: str = "") -> None:
    print(textwrap.fill(text, 88) if text else "", flush=True)


def step(n: int, title: str) -> None:
    print(f"\n== {n}. {title}", flush=True)


def run_demo(path: str | None = None) -> int:
    path = path or os.path.join(tempfile.mkdtemp(prefix="walstore-demo-"), "agent-state")
    step(1, "An agent keeps its world state in walstore")
    say(f"The planner agent opens its store at {path} (durability='full': a commit returns "
        f"only once it is on disk).")
    with walstore.open(path) as store:
        with store.transaction(meta={"agent": "planner", "step": "setup"}) as tx:
            tx.put("inventory/widgets", 10)
            tx.put("budget/available", TOTAL_BUDGET)
            tx.put("budget/spent", 0)
            tx.put("plan/steps_done", 0)
        say(f"Setup committed as transaction {tx.id} at log position {tx.lsn}: "
            f"{dict(store.scan())}")
        _savepoint_story(store)
    acked = _crash_story(path)
    return _recovery_story(path, acked)


def _savepoint_story(store: walstore.Store) -> None:
    step(2, "A failed step is rolled back to a savepoint, the rest of the work is kept")
    with store.transaction(meta={"agent": "planner", "step": "reserve"}) as tx:
        tx.put("plan/goal", "ship an order")
        try:
            with tx.savepoint("plan-a"):
                left = tx.get("inventory/widgets") - 25
                tx.put("inventory/widgets", left)
                say(f"Plan A reserves 25 widgets inside savepoint 'plan-a'; stock would be {left}.")
                if left < 0:
                    raise ValueError("not enough widgets for plan A")
        except ValueError as e:
            say(f"Plan A failed ({e}); the savepoint undid its writes: stock is back to "
                f"{tx.get('inventory/widgets')}.")
        with tx.savepoint("plan-b"):
            tx.put("inventory/widgets", tx.get("inventory/widgets") - 4)
            tx.put("orders/1", {"widgets": 4, "state": "reserved"})
        say("Plan B reserves 4 widgets and records the order; the transaction commits both "
            "the goal and plan B, nothing of plan A.")
    say(f"Committed state: widgets={store['inventory/widgets']}, order={store['orders/1']}, "
        f"goal={store['plan/goal']!r}.")


def _crash_story(path: str) -> list[dict]:
    step(3, "A worker process spends the budget step by step, and is killed mid-work")
    say("A child process runs the agent's loop: each step moves 1 unit of budget from "
        "'available' to 'spent' in one transaction, and prints ACK once commit() returned. "
        "We kill it with SIGKILL (no cleanup, no close) after 40 acknowledgements.")
    proc = subprocess.Popen([sys.executable, "-m", "walstore.demo", "--worker", path],
                            stdout=subprocess.PIPE, text=True)
    acked: list[dict] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("ACK "):
            acked.append(json.loads(line[4:]))
        if len(acked) >= 40 or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    say(f"Killed process {proc.pid} after it acknowledged {len(acked)} steps "
        f"(the last was step {acked[-1]['step'] if acked else None}).")
    return acked


def _recovery_story(path: str, acked: list[dict]) -> int:
    step(4, "The operator runs `walstore recover`")
    out = subprocess.run([sys.executable, "-m", "walstore", "recover", path],
                         capture_output=True, text=True)
    print(textwrap.indent(out.stdout.strip(), "    "), flush=True)
    if out.returncode != 0:
        say(f"recover exited {out.returncode}: {out.stderr.strip()}")
        return 1
    step(5, "Checking the state after the crash")
    with walstore.open(path) as store:
        done = store["plan/steps_done"]
        available, spent = store["budget/available"], store["budget/spent"]
        last_acked = acked[-1]["step"] if acked else 0
        ok_acked = done >= last_acked
        ok_total = available + spent == TOTAL_BUDGET and spent == done
        say(f"Steps done: {done} (last acknowledged: {last_acked}); budget available "
            f"{available} + spent {spent} = {available + spent}.")
        say(("Every acknowledged step survived" if ok_acked else "LOST acknowledged steps!")
            + ("; no step is half-applied: the totals add up." if ok_total
               else "; the totals do NOT add up!"))
    from .verify import verify_store
    rep = verify_store(path)
    say(f"`walstore verify`: {rep.records} WAL records and {rep.lmdb_keys} keys checked: "
        f"{'ok' if rep.ok else rep.errors}.")
    good = ok_acked and ok_total and rep.ok
    step(6, "Done" if good else "FAILED")
    say(f"Inspect it yourself: walstore log {path}; walstore dump {path}; walstore stats {path}")
    return 0 if good else 1


def _worker(path: str) -> None:
    """The child: spend the budget one durable step at a time, ACK after each commit."""
    store = walstore.open(path)
    while True:
        with store.transaction(meta={"agent": "worker"}) as tx:
            n = tx.get("plan/steps_done") + 1
            if tx.get("budget/available") <= 0:
                break
            tx.put("plan/steps_done", n)
            tx.put("budget/available", tx.get("budget/available") - 1)
            tx.put("budget/spent", tx.get("budget/spent") + 1)
        print("ACK " + json.dumps({"step": n, "txid": tx.id}), flush=True)
        time.sleep(0.005)
    store.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else None))
