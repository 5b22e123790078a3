"""Opacity: no transaction ever observes a state that no sequence of commits produced.

Writer threads move money between accounts (the total never changes), every transfer
through ``store.run`` (a commit that conflicts is retried, never lost, never applied
twice).  Meanwhile, across thousands of transactions, readers sum the accounts key by key
(``get`` in a loop with a pause half way), by ``scan`` (both directions), both mixed in one
transaction, and with ``store.scan`` outside a transaction — in this process and in a
read-only store in another process (tests/findings_scripts/opacity_reader.py) — and
auditor transactions sum them, run an action on the total they saw and record it.  Every
total is taken inside its transaction, before the transaction ends (read-only ones too,
and ones whose commit then conflicts): not one may differ from the constant.  Afterwards:
every transfer committed exactly once, the balances are the start plus the committed
transfers, and every audit action was run on the constant total.
"""
from __future__ import annotations

import json
import random
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import walstore

SCRIPTS = Path(__file__).resolve().parent / "findings_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import opacity_reader  # noqa: E402  (the readers' reads, shared with the child process)
from opacity_reader import READS, account, read_once  # noqa: E402

ACCOUNTS = 12
START = 1000
TOTAL = ACCOUNTS * START
WRITERS = 6
TRANSFERS = 80          # per writer at least; writers go on until the readers are done
READERS = 3
MIN_READS = 1000        # per reader thread in this process
MIN_CHILD_READS = 1500  # in the read-only process
DEADLINE = 120          # seconds: a hang guard, not a timing assertion


def _child_line(proc: subprocess.Popen, word: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"the reader process printed no {word!r} in {timeout}s")
        chunk = proc.stdout.readline()
        if not chunk:
            raise AssertionError(f"the reader process exited ({proc.wait()}) before "
                                 f"{word!r}: {proc.stderr.read().decode()[-3000:]}")
        line += chunk
    head, _, rest = line.decode().strip().partition(" ")
    assert head == word, line
    return rest


def test_no_transaction_ever_observes_an_impossible_total(tmp_path):
    path = str(tmp_path / "store")
    store = walstore.open(path, durability="full")
    with store.transaction() as tx:
        tx.update({account(i): START for i in range(ACCOUNTS)})
    child_done, child_stop = tmp_path / "child-done", tmp_path / "child-stop"
    child = subprocess.Popen(
        [sys.executable, opacity_reader.__file__, path, str(ACCOUNTS), str(TOTAL),
         str(MIN_CHILD_READS), str(child_done), str(child_stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _child_line(child, "READY", 60)
        result = _run(store, child_done)
        child_stop.touch()
        child_result = json.loads(_child_line(child, "DONE", DEADLINE))
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    assert result["errors"] == [], result["errors"]
    # not one impossible total, in this process or the other one
    assert result["bad"] == [], result["bad"][:5]
    assert child_result["bad"] == 0, child_result
    assert result["reads"] >= READERS * MIN_READS, result["reads"]
    assert child_result["txs"] >= MIN_CHILD_READS, child_result
    assert all(n > 0 for n in child_result["kinds"].values()), child_result
    assert result["reads"] + result["audits"] + child_result["txs"] >= 4500  # thousands

    # every conflicting transfer was retried by store.run until it committed, exactly once
    transfers = result["transfers"]
    assert len(transfers) >= WRITERS * TRANSFERS
    assert result["attempts"] > len(transfers), "no transfer ever conflicted: no proof"
    logged = [i.meta for i in store.log() if isinstance(i.meta, dict) and "transfer" in i.meta]
    assert sorted(m["transfer"] for m in logged) == sorted(t[0] for t in transfers)
    expected = {account(i): START for i in range(ACCOUNTS)}
    for _tid, src, dst, amount in transfers:
        expected[account(src)] -= amount
        expected[account(dst)] += amount
    assert dict(store.scan(prefix="acct/")) == expected
    assert sum(expected.values()) == TOTAL

    # every audit action ran on the constant total (committed or rolled back on conflict)
    audits = [a for a in store.actions() if a.name == "audit"]
    assert audits and all(a.args["total"] == TOTAL for a in audits)
    assert any(a.state == "committed" for a in audits)
    store.close()


def _run(store: walstore.Store, child_done: Path) -> dict:
    """Writers, readers and auditors in threads until every minimum is met."""
    deadline = time.monotonic() + DEADLINE
    lock = threading.Lock()
    out = {"errors": [], "bad": [], "reads": 0, "audits": 0, "attempts": 0,
           "transfers": [], "readers_done": 0}
    writers_done = threading.Event()

    def guarded(fn):
        def run(*args):
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                with lock:
                    out["errors"].append(f"{fn.__name__}: {type(e).__name__}: {e}")
        return run

    def all_readers_done() -> bool:
        with lock:
            here = out["readers_done"] == READERS
        return here and child_done.exists()

    @guarded
    def writer(w: int) -> None:
        rng = random.Random(w)
        n = attempts = 0
        done = []
        while (n < TRANSFERS or not all_readers_done()) and time.monotonic() < deadline:
            src, dst = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 50)
            tid = f"{w}.{n}"

            def transfer(tx) -> None:
                nonlocal attempts
                attempts += 1
                a, b = tx.get(account(src)), tx.get(account(dst))
                time.sleep(0.0002)  # a writer that thinks: others commit meanwhile
                tx.put(account(src), a - amount)
                tx.put(account(dst), b + amount)
            store.run(transfer, retries=30, backoff=0.0002,
                      meta={"transfer": tid, "src": src, "dst": dst, "amount": amount})
            done.append((tid, src, dst, amount))
            n += 1
        with lock:
            out["attempts"] += attempts
            out["transfers"] += done

    @guarded
    def reader(r: int) -> None:
        rng = random.Random(100 + r)
        n = 0
        bad = []
        while n < MIN_READS and time.monotonic() < deadline:
            kind = READS[(n + r) % len(READS)]
            seen: list = []
            try:
                read_once(store, kind, ACCOUNTS, rng, seen)
            except walstore.ConflictError:
                pass  # a read-only commit whose reads changed: what it saw still counts
            n += 1
            bad += [(kind, total, problem) for total, problem in seen
                    if total != TOTAL or problem]
        with lock:
            out["reads"] += n
            out["bad"] += bad
            out["readers_done"] += 1

    @guarded
    def auditor() -> None:
        n = 0
        bad = []

        def audit(tx) -> None:
            nonlocal n
            n += 1  # every attempt is a transaction whose total counts
            total = sum(tx.get(account(i)) for i in range(ACCOUNTS))
            if total != TOTAL:  # checked inside, before the action runs on it
                bad.append(("audit", total, None))
            with tx.action("audit", args={"total": total}) as act:
                act.result = total
            tx.put("audit/last", total)
        while not writers_done.is_set() and time.monotonic() < deadline:
            try:
                store.run(audit, retries=3, backoff=0.0001, meta={"audit": n})
            except walstore.ConflictError:
                pass  # an auditor may give up under contention; writers may not
        with lock:
            out["audits"] += n
            out["bad"] += bad

    threads = ([threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
               + [threading.Thread(target=reader, args=(r,)) for r in range(READERS)])
    audit_thread = threading.Thread(target=auditor)
    for t in threads + [audit_thread]:
        t.start()
    for t in threads:
        t.join(DEADLINE + 30)
    writers_done.set()
    audit_thread.join(60)
    if any(t.is_alive() for t in threads + [audit_thread]):
        out["errors"].append("a thread did not finish")
    if time.monotonic() >= deadline:
        out["errors"].append(f"not done within {DEADLINE}s")
    return out
