"""Kill -9 torture: a real writer process, SIGKILLed at random moments, over many rounds.

``tools/writer.py`` commits transactions (transfers between ten accounts that keep the
total constant, with savepoint rollbacks, nested savepoints and whole rollbacks mixed in;
several threads; small segments and checkpoints so kills land inside commit, apply,
checkpoint and segment rotation) and prints ``ACK <txid> <json>`` after each commit.
This tool (and tests/test_crash.py, which imports its harness) kills it with SIGKILL,
reopens the store (recovery), and checks: every commit acknowledged before the kill is
present with its exact values, no partial transaction or rolled-back write is visible, the
invariant holds, and ``verify`` passes before and after recovery.

    python tools/crashtest.py --rounds 200      # prints rounds, acks checked, commits lost
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

WRITER = ROOT / "tools" / "writer.py"
ACCOUNTS = [f"acct/{i}" for i in range(10)]
TOTAL = 10_000
SMALL_SEGMENT = 65536


class Writer:
    """tools/writer.py in a subprocess; collects its stdout lines as they come."""

    def __init__(self, store: Path, *args: str, umask: int | None = None,
                 seconds: float = 60) -> None:
        self.stderr_path = store.parent / f"writer-{time.monotonic_ns()}.err"
        self._stderr = open(self.stderr_path, "wb")
        preexec = (lambda: os.umask(umask)) if umask is not None else None
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(store), "--seconds", str(seconds), *args],
            stdout=subprocess.PIPE, stderr=self._stderr, preexec_fn=preexec, cwd=str(ROOT))
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            buf += chunk
            *done, buf = buf.split(b"\n")
            with self._cond:
                self.lines.extend(line.decode() for line in done)  # only complete lines
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pred, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return pred(self.lines)
                self._cond.wait(left)
            return True

    def wait_acks(self, n: int, timeout: float = 20.0) -> None:
        ok = self.wait_for(lambda ls: sum(1 for x in ls if x.startswith("ACK ")) >= n, timeout)
        if not ok:
            raise AssertionError(f"writer gave fewer than {n} ACKs: {self.lines[-5:]}\n"
                                 f"{self.stderr()}")

    def wait_line(self, prefix: str, timeout: float = 20.0) -> str:
        ok = self.wait_for(lambda ls: any(x.startswith(prefix) for x in ls), timeout)
        if not ok:
            raise AssertionError(f"writer never printed {prefix!r}: {self.lines[-5:]}\n"
                                 f"{self.stderr()}")
        return next(x for x in self.lines if x.startswith(prefix))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        self._reader.join(timeout=20)
        self._stderr.close()

    def finish(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=20)
        self._stderr.close()
        return rc

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def acks(self) -> list[tuple[int, int, dict]]:
        """(txid, lsn, writes) of every ACK line."""
        out = []
        for line in self.lines:
            if line.startswith("ERROR"):
                raise AssertionError(f"the writer reported an error: {line}\n{self.stderr()}")
            if line.startswith("ACK "):
                _, txid, doc = line.split(" ", 2)
                d = json.loads(doc)
                out.append((int(txid), d["lsn"], d["writes"]))
        return out


def kill_at_random(store: Path, rng: random.Random, *args: str, early: bool = False,
                   **kw) -> Writer:
    """Run a writer and SIGKILL it at a random moment (``early``: maybe before any ACK,
    possibly during its own open/recovery)."""
    w = Writer(store, *args, **kw)
    try:
        if early:
            time.sleep(rng.uniform(0.05, 0.6))
        else:
            w.wait_acks(rng.randint(1, 40))
            time.sleep(rng.uniform(0.0, 0.25))
    finally:
        w.kill()
    return w


# ---- checking a store against what was acknowledged -----------------------------------------
class Ledger:
    """Everything the writers acknowledged, across rounds, in commit order."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, int, int, dict]] = []  # (round, lsn, txid, writes)

    def add(self, round_no: int, acks) -> None:
        for txid, lsn, writes in acks:
            self.acks.append((round_no, lsn, txid, writes))
        self.acks.sort()

    def latest(self) -> dict:
        """key -> (round, lsn, txid, value) of the newest acknowledged write."""
        out = {}
        for r, lsn, txid, writes in self.acks:
            for k, v in writes.items():
                out[k] = (r, lsn, txid, v)
        return out


def snapshot(store) -> dict:
    return dict(store.scan())


def check_transfer_state(state: dict, ledger: Ledger, txn_lsn: dict) -> None:
    """The invariants of writer.py's transfer mode, and every ACK present."""
    # no garbage from rolled-back savepoints or transactions
    junk = [k for k in state if isinstance(k, str) and k.startswith("junk/")]
    assert not junk, f"rolled-back writes are visible: {junk[:5]}"
    # (the garbage account value is {"bal": -1, "tx": -1}; a real balance may be -1 too)
    bad = [k for k, v in state.items() if v == "GARBAGE" or (isinstance(v, dict) and
                                                             v.get("tx") == -1)]
    assert not bad, f"rolled-back values are visible: {bad[:5]}"
    if ledger.acks:
        assert all(a in state for a in ACCOUNTS), "acknowledged accounts are missing"
    if ACCOUNTS[0] in state:
        # the invariant: money is only moved, never created or lost (no partial transfer)
        total = sum(state[a]["bal"] for a in ACCOUNTS)
        assert total == TOTAL, f"total is {total}, not {TOTAL}: a transaction was torn"
        for a in ACCOUNTS:
            owner = state[a]["tx"]
            rec = state.get(f"t/{owner}")
            assert rec is not None and a in rec["keys"], (
                f"{a} was written by transaction {owner} whose other writes are missing")
    # every acknowledged commit is there
    for r, lsn, txid, writes in ledger.acks:
        assert txid in txn_lsn, f"acknowledged transaction {txid} is missing from store.log()"
        for k, v in writes.items():
            if k.startswith("t/"):  # written once, never overwritten: exact value
                assert state.get(k) == v, f"ACKed {k} = {v} but the store has {state.get(k)}"
    for k, (r, lsn, txid, v) in ledger.latest().items():
        have = state.get(k)
        assert have is not None, f"ACKed key {k} (transaction {txid}) is missing"
        if have == v:
            continue
        # overwritten since: only by a commit after the acknowledged one
        newer = have.get("tx") if isinstance(have, dict) else None
        assert newer is not None and newer in txn_lsn and newer != txid, (
            f"{k}: ACKed {v} (transaction {txid}), store has {have}")
        assert txn_lsn[newer] > lsn, (
                f"{k}: store has the value of transaction {newer} (LSN {txn_lsn[newer]}), "
            f"older than the ACKed transaction {txid} (LSN {lsn})")


def check_fill_state(state: dict, ledger: Ledger) -> None:
    for k, (r, lsn, txid, v) in ledger.latest().items():
        assert state.get(k) == v, f"ACKed {k} (transaction {txid}) = {v}, store has {state.get(k)}"
    for k, v in state.items():
        assert isinstance(v, dict) and v.get("key") == k, f"{k} holds a foreign value {v!r}"


def reopen_and_check(path: Path, ledger: Ledger, mode: str = "transfer", **open_kw) -> dict:
    """Verify the crashed store, recover it by opening, check everything, close, verify."""
    before = verify_store(str(path))
    assert not before.errors, f"verify after the kill, before recovery: {before.errors}"
    with walstore.open(str(path), **open_kw) as s:
        state = snapshot(s)
        txn_lsn = {i.txid: i.lsn for i in s.log()}
        report = s.last_recovery
        for _r, lsn, txid, _w in ledger.acks:
            assert txn_lsn.get(txid) == lsn, (
                f"transaction {txid}: ACKed at LSN {lsn}, log() says {txn_lsn.get(txid)}")
    assert report is not None and not report.losers, f"unexpected losers: {report.losers}"
    assert all(p.kind == "torn-tail" for p in report.problems), report.problems
    if mode == "transfer":
        check_transfer_state(state, ledger, txn_lsn)
    else:
        check_fill_state(state, ledger)
    after = verify_store(str(path))
    assert not after.errors, f"verify after recovery: {after.errors}"
    assert not after.warnings, after.warnings
    return state


def torture(rounds: int, seed: int, path: Path, progress=print) -> dict:
    """Run kill rounds against one store; returns the counts (raises on a broken promise)."""
    rng = random.Random(seed)
    ledger = Ledger()
    for round_no in range(rounds):
        threads = str(1 + round_no % 4)
        early = round_no % 5 == 4
        w = kill_at_random(path, rng, "--threads", threads, "--segment-size", str(SMALL_SEGMENT),
                           "--checkpoint-bytes", "200000", early=early)
        ledger.add(round_no, w.acks())
        if (path / "STORE").exists():
            reopen_and_check(path, ledger)
        if progress and (round_no + 1) % 10 == 0:
            progress(f"  round {round_no + 1}/{rounds}: {len(ledger.acks)} acknowledged commits "
                     f"checked so far, 0 lost")
    return {"rounds": rounds, "acks_checked": len(ledger.acks), "lost": 0, "seed": seed}


def main() -> None:
    ap = argparse.ArgumentParser(description="kill -9 torture of a real walstore writer")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--dir", default=None, help="where to put the store (default: a temp dir)")
    args = ap.parse_args()
    path = Path(args.dir or tempfile.mkdtemp(prefix="walstore-crashtest-")) / "store"
    try:
        s = torture(args.rounds, args.seed, path)
    except AssertionError as e:
        print(f"PROMISE BROKEN (seed {args.seed}): {e}")
        sys.exit(1)
    print(f"kill rounds: {s['rounds']}, acknowledged commits checked: {s['acks_checked']}, "
          f"commits lost: {s['lost']} (seed {s['seed']})")


if __name__ == "__main__":
    main()
