"""Agent-layer soak: many threads charging, conflicting, reverting and rewinding at once,
killed with SIGKILL at random moments; after every kill the outside world and the store
must agree.

The agent model (``tests/test_agent_model.py``) checks the agent layer one step at a time
in one thread; this tool checks the same agreement under concurrency and real kills.  A
child process (``--child``) runs ``--threads`` threads on one store, each an agent's ("a/"
or "b/": its keys, its workspace declared in its scope), each looping over:

- a charge: a transaction that reads and bumps a shared counter (so transactions
  conflict), charges an outside ledger inside ``tx.action(..., compensate="refund")``
  and writes the charge's evidence key ``<agent>ev/<action key>`` and a file of that name
  in its workspace (reversible files: undone with the key), in a transaction tagged with
  the agent's scope half the time; sometimes a second charge
  inside a savepoint that is rolled back, sometimes an exception (a rollback), sometimes
  prepared and then committed or rolled back by its gid (two-phase commit);
- a revert of a recent transaction (cascade and force now and then: a forced revert of a
  revert marks actions ``needs-redo``), a restore point, a rewind to one — scoped to the
  thread's agent now and then;
- counter bumps of both agents in one transaction (no scope holds all of it).

The ledger is a file of ``C <key>`` / ``R <key>`` lines appended with one ``write`` each
(a kill never tears one): a charge and a refund per idempotency key at most count (a
repeat is declined, as a payment API declines a reused key).  The parent kills the child
after a random time, reopens the store with the same compensator (recovery refunds the
charges of transactions that did not commit), decides what the kill left in doubt, and
checks, for every action the store knows:

- its key was charged and refunded at most once each (net 0 or 1), and no process asked
  to refund what it had refunded itself (a compensation run twice; only recovery may
  ask again, for a refund whose record a kill cut off — the contract's at-least-once);
- ``committed``: charged, not refunded, its evidence key present;
- ``compensated``: net 0, its evidence absent; ``needs-redo``: net 0, evidence present;
- nothing ``pending``/``failed`` (the refund service never fails here), nothing in flight;
- every charge in the ledger belongs to an action the store knows (nothing forgotten),
  and every evidence key to a committed or needs-redo action;
- each workspace's files are exactly its agent's evidence keys (nothing recovery had to
  set aside as a conflict);
- every charge transaction whose commit returned before the kill (``ACK`` lines) is in
  the log (its later undo, if any, is a transaction of its own);
- ``verify`` passes.

    python tools/agentsoak.py --rounds 20 --threads 4      # exit 0: clean
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

AGENTS = ("a/", "b/")  # two agents: their keys, workspaces and scopes
COUNTERS = [f"n/{i}" for i in range(3)]
EXPECTED = (walstore.ConflictError, walstore.RevertConflict)


class Ledger:
    """The outside world: charges and refunds by idempotency key, in an append-only file
    that outlives the process (one ``write`` of a short line per effect)."""

    def __init__(self, path: str, repeats_are_bugs: bool = False) -> None:
        self.path = path
        # the child: nothing was owed when it opened (the parent's check recovered the
        # store), so a refund asked again there is a compensation run twice; written down
        # (``X <key>``) for the check, the process being killed before it could say so
        self.repeats_are_bugs = repeats_are_bugs
        self.lock = threading.Lock()
        self.charged: set[str] = set()
        self.refunded: set[str] = set()
        self.repeats = 0  # refunds asked again of a refunded key (declined)
        for op, key in read_ledger(path):
            if op != "X":
                (self.charged if op == "C" else self.refunded).add(key)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def charge(self, key: str) -> dict:
        with self.lock:
            if key not in self.charged:
                os.write(self.fd, f"C {key}\n".encode())
                self.charged.add(key)
        return {"charge_id": key}

    def refund(self, action) -> None:
        with self.lock:
            if action.key in self.refunded:
                self.repeats += 1
                if self.repeats_are_bugs:
                    os.write(self.fd, f"X {action.key}\n".encode())
                return
            if action.key not in self.charged:
                return  # (an intent whose body never charged: declined, nothing moves)
            os.write(self.fd, f"R {action.key}\n".encode())
            self.refunded.add(action.key)

    def close(self) -> None:
        os.close(self.fd)


def read_ledger(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [tuple(line.split()) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def open_store(path: str, ledger: Ledger) -> walstore.Store:
    return walstore.open(path, durability="full", segment_size=65536,
                         compensators={"refund": ledger.refund})


def workspaces(store: walstore.Store, path: str) -> dict:
    """Each agent's workspace, declared in its scope."""
    out = {}
    for agent in AGENTS:
        os.makedirs(ws_dir(path, agent), mode=0o700, exist_ok=True)
        out[agent] = store.workspace(ws_dir(path, agent), scope=agent)
    return out


def ws_dir(path: str, agent: str) -> str:
    return f"{path}.ws-{agent[0]}"


# ---- the child: threads doing agent work until killed ---------------------------------
def child(path: str, threads: int, seed: int, seconds: float) -> None:
    ledger = Ledger(path + ".ledger", repeats_are_bugs=True)
    store = open_store(path, ledger)
    spaces = workspaces(store, path)
    points: list[str] = list(store.restore_points())  # (earlier rounds' too)
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    outcomes: dict[str, int] = {}  # (counted loosely: a look at the mix, not a check)

    def charge_tx(rng: random.Random, tid: int, agent: str) -> None:
        tx = store.transaction(meta={"thread": tid},
                               scope=agent if rng.random() < 0.5 else None)
        ws = spaces[agent]
        try:
            key = agent + rng.choice(COUNTERS)
            tx.put(key, (tx.get(key) or 0) + 1)
            with tx.action("charge", args={"amount": 1}, compensate="refund") as act:
                act.result = ledger.charge(act.key)
            tx.put(f"{agent}ev/{act.key}", 1)
            tx.files(ws).write(act.key, f"charged {act.key}\n")
            if rng.random() < 0.3:
                sp = tx.savepoint("try")
                with tx.action("charge", args={"amount": 2}, compensate="refund") as a2:
                    a2.result = ledger.charge(a2.key)
                tx.put(f"{agent}ev/{a2.key}", 1)
                tx.files(ws).write(a2.key, f"charged {a2.key}\n")
                if rng.random() < 0.5:
                    tx.rollback_to(sp)
            r = rng.random()
            if r < 0.1:
                raise RuntimeError("the agent changed its mind")
            if r < 0.25:
                gid = f"g-{os.getpid()}-{tid}-{rng.getrandbits(40)}"
                tx.prepare(gid)
                if rng.random() < 0.5:
                    store.commit_prepared(gid)
                    print(f"ACK {tx.id}", flush=True)
                else:
                    store.rollback_prepared(gid)
                return
            tx.commit()
            print(f"ACK {tx.id}", flush=True)
        except RuntimeError:
            tx.rollback()
        except EXPECTED:
            if tx.state == "active":
                tx.rollback()

    def revert(rng: random.Random, agent: str) -> None:
        log = store.log(limit=30)
        if log:
            store.revert(rng.choice(log).txid, cascade=rng.random() < 0.3,
                         force=rng.random() < 0.2,
                         scope=agent if rng.random() < 0.3 else None)

    def rewind(rng: random.Random, agent: str) -> None:
        with lock:
            if not points:
                return
            to = rng.choice(points)
        store.rewind(to, force=rng.random() < 0.3,
                     scope=agent if rng.random() < 0.5 else None)

    def restore_point(rng: random.Random, tid: int) -> None:
        name = f"p-{os.getpid()}-{tid}-{rng.getrandbits(32)}"
        store.restore_point(name)
        with lock:
            points.append(name)

    def bump(rng: random.Random) -> None:
        with store.transaction() as tx:  # (both agents' counters: no scope is all of it)
            for agent in AGENTS:
                key = agent + rng.choice(COUNTERS)
                tx.put(key, (tx.get(key) or 0) + 1)

    def work(tid: int) -> None:
        rng = random.Random(seed * 1000 + tid)
        agent = AGENTS[tid % len(AGENTS)]
        while time.monotonic() < stop:
            r = rng.random()
            op = ("charge" if r < 0.55 else "revert" if r < 0.7 else "rewind" if r < 0.72
                  else "restore_point" if r < 0.76 else "bump")
            try:
                if op == "charge":
                    charge_tx(rng, tid, agent)
                elif op == "revert":
                    revert(rng, agent)
                elif op == "rewind":
                    rewind(rng, agent)
                elif op == "restore_point":
                    restore_point(rng, tid)
                else:
                    bump(rng)
                outcomes[op + " ok"] = outcomes.get(op + " ok", 0) + 1
            except EXPECTED as e:
                name = f"{op} {type(e).__name__}"
                outcomes[name] = outcomes.get(name, 0) + 1
        print("DONE", tid, flush=True)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    print("STARTED", flush=True)  # (first: a thread's ACK line came before it, and the
    for t in ts:                  # parent took the child for one that did not start)
        t.start()
    for t in ts:
        t.join()
    print("OUTCOMES", json.dumps(outcomes, sort_keys=True), flush=True)  # (if not killed)
    store.close()
    ledger.close()


# ---- the parent: kill, recover, check ---------------------------------------------------
def check(path: str, rng: random.Random, acked: set[int] = frozenset()) -> dict:
    """Reopen (recovery), decide what is in doubt, and check agreement; the findings.
    ``acked``: the txids whose commit returned in the child before the kill."""
    ledger = Ledger(path + ".ledger")
    problems: list[str] = []
    with open_store(path, ledger) as store:
        committed = {i.txid for i in store.log()}
        for txid in sorted(acked - committed)[:10]:
            problems.append(f"transaction {txid}: its commit returned, then it was lost")
        for gid in store.prepared():  # (in doubt at the kill: decided now, either way)
            if rng.random() < 0.5:
                store.commit_prepared(gid)
            else:
                store.rollback_prepared(gid)
        state = {k[len(agent) + 3:]: agent for agent in AGENTS
                 for k, _v in store.scan(prefix=agent + "ev/")}  # action key -> agent
        actions = store.actions()
        known = {a.key for a in actions}
        counts: dict[tuple[str, str], int] = {}
        for op, key in read_ledger(path + ".ledger"):
            counts[(op, key)] = counts.get((op, key), 0) + 1
        for (op, key), n in counts.items():
            if op == "X":
                problems.append(f"{key}: refunded again by the process that refunded it "
                                f"({n} time(s)): a compensation ran twice")
            elif n > 1:
                problems.append(f"{key}: {op} written {n} times")
            if key not in known:
                problems.append(f"{key}: in the ledger ({op}) but no action has it")
        for a in actions:
            net = int(a.key in ledger.charged) - int(a.key in ledger.refunded)
            shown = a.key in state
            if a.key in ledger.refunded and a.key not in ledger.charged:
                problems.append(f"{a.id}: refunded, never charged")
            if a.in_flight:
                problems.append(f"{a.id}: in flight after recovery")
            elif a.state == "committed" and not (net == 1 and shown):
                problems.append(f"{a.id}: committed, net {net}, evidence {shown}")
            elif a.state == "compensated" and not (net == 0 and not shown):
                problems.append(f"{a.id}: compensated, net {net}, evidence {shown}")
            elif a.state == "needs-redo" and not (net == 0 and shown):
                problems.append(f"{a.id}: needs-redo, net {net}, evidence {shown}")
            elif a.state in ("pending", "failed", "resolved"):
                problems.append(f"{a.id}: {a.state} ({a.error})")
        by_key = {a.key: a for a in actions}
        for k, agent in state.items():
            a = by_key.get(k)
            if a is None or a.state not in ("committed", "needs-redo"):
                problems.append(f"{agent}ev/{k}: evidence of an action that is "
                                f"{'unknown' if a is None else a.state}")
        files = {(agent, n) for agent in AGENTS for n in os.listdir(ws_dir(path, agent))}
        wanted = {(agent, k) for k, agent in state.items()}
        for name in sorted(files ^ wanted)[:10]:
            what = "a file without its key" if name in files else "a key without its file"
            problems.append(f"{name}: {what}")
        states: dict[str, int] = {}
        for a in actions:
            states[a.state] = states.get(a.state, 0) + 1
    ledger.close()
    report = verify_store(path)
    if not report.ok:
        problems.append(f"verify: {report.errors[:3]} in doubt {report.in_doubt[:3]} "
                        f"owed {report.pending_compensations[:3]}")
    return {"problems": problems, "actions": len(actions), "states": states,
            "repeats": ledger.repeats}


def run_round(path: str, threads: int, rng: random.Random, min_s: float,
              max_s: float) -> dict:
    seed = rng.getrandbits(30)
    proc = subprocess.Popen([sys.executable, __file__, "--child", path, "--threads",
                             str(threads), "--seed", str(seed), "--seconds", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    line = proc.stdout.readline()
    if b"STARTED" not in line:
        proc.kill()
        _out, err = proc.communicate()
        raise SystemExit(f"the child did not start: {line!r} {err.decode()[-2000:]}")
    time.sleep(rng.uniform(min_s, max_s))
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    acked = {int(w[1]) for w in (ln.split() for ln in out.decode().splitlines())
             if len(w) == 2 and w[0] == "ACK"}
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the child ended by itself ({proc.returncode}): "
                         f"{err.decode()[-3000:]}")
    got = check(path, rng, acked)
    got["acked"] = len(acked)
    return got


def soak(rounds: int, threads: int, seed: int, directory: str | None = None,
         min_s: float = 0.3, max_s: float = 2.5, verbose: bool = True) -> dict:
    rng = random.Random(seed)
    if directory:  # (a --dir not made yet is made, 0700, as the store's own are)
        os.makedirs(directory, mode=0o700, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walstore-agentsoak-", dir=directory)
    path = os.path.join(base, "store")
    total = {"rounds": 0, "actions": 0, "problems": [], "states": {}, "repeats": 0,
             "acked": 0}
    for i in range(rounds):
        got = run_round(path, threads, rng, min_s, max_s)
        total["rounds"] += 1
        total["actions"] = got["actions"]
        total["states"] = got["states"]
        total["repeats"] += got["repeats"]
        total["acked"] += got["acked"]
        total["problems"] += [f"round {i + 1}: {p}" for p in got["problems"]]
        if verbose:
            print(f"round {i + 1}: {got['actions']} actions so far {got['states']}, "
                  f"{len(got['problems'])} problem(s)", flush=True)
        if got["problems"]:
            break
    total["store"] = path
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description="agent-layer soak under SIGKILL")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=600, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads, args.seed, args.seconds)
        return
    print(f"seed {args.seed}", flush=True)
    total = soak(args.rounds, args.threads, args.seed, args.dir, verbose=not args.json)
    if args.json:
        print(json.dumps(total, indent=2))
    else:
        print(f"{total['rounds']} kill rounds, {total['acked']} acknowledged commits and "
              f"{total['actions']} actions checked, {len(total['problems'])} problem(s); "
              f"refunds recovery asked again (declined): {total['repeats']}")
        for p in total["problems"][:20]:
            print("  " + p)
    sys.exit(1 if total["problems"] else 0)


if __name__ == "__main__":
    main()
