"""Concurrency soak: many threads on one store, with a watchdog for hangs.

Reader threads sum fifty accounts key by key inside snapshot transactions (and count them
by scans, and read through ``store.get`` and ``store.at``), writer threads move money
between accounts (with savepoint rollbacks) and add blobs of 100 B to 3 KiB, and a
maintenance thread checkpoints, reads ``stats``, sets restore points and reads history;
the LMDB map starts at 256 KiB, so it grows many times under the readers.  Checked:
every snapshot sums to the constant total, every scan sees every account, no thread
raises anything but ConflictError, the run keeps making progress (a watchdog dumps every
thread's stack and exits 2 when any thread finished nothing for ``--stall`` seconds: this is
how a hang in py-lmdb's write abort under busy readers was found), and after close the
store reopens, verifies, and still sums to the total.

    python tools/soak.py --seconds 300 --readers 4 --writers 2     # exit 0: clean
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore.errors import ConflictError, RevertConflict  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

ACCOUNTS = [f"acct/{i:03d}" for i in range(50)]
TOTAL = 100 * len(ACCOUNTS)
# blobs are overwritten in a bounded key space: a purge's scans stay short (py-lmdb
# releases the GIL at every cursor step, so a scan of 100,000 keys beside six busy
# threads can take minutes: each step may wait out the 5 ms switch interval)
BLOB_KEYS = 5_000
# ... and written by one commit in four: a purge erases every version of its prefix since
# the last purge and scrubs the key names from the log rows of the transactions that wrote
# them, a few LMDB calls per version, each beside six busy threads a wait for the GIL (the
# convoy): with a blob in every commit one purge took over 30 s in a 600 s run
BLOB_SHARE = 0.25
REPORT_STALL = 2.0  # a thread that finishes nothing for this long is reported, with stacks


class Soak:
    """One soak run: the store, its threads, their counters and the errors they saw."""

    def __init__(self, path: str, durability: str, seed: int) -> None:
        self.path = path
        self.store = walstore.open(path, durability=durability, map_size=1 << 18)
        with self.store.transaction() as tx:
            tx.update({a: 100 for a in ACCOUNTS})
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.counts = {"snapshots": 0, "scans": 0, "commits": 0, "conflicts": 0,
                       "checkpoints": 0, "history_reads": 0, "reverts": 0, "rewinds": 0,
                       "undo_conflicts": 0, "purges": 0}
        self.progress: dict[str, int] = {}  # thread name -> operations finished
        self.seed = seed
        self.go = threading.Event()  # set once every thread is started

    # ---- the threads ---------------------------------------------------------------------
    def _loop(self, body, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        me = threading.current_thread().name
        self.progress[me] = 0
        self.go.wait()  # (a start beside running readers waits for the GIL: starting all
        try:            # threads first keeps the first ones from starving the last)
            while not self.stop.is_set():
                body(rng)
                self.progress[me] += 1
        except Exception:  # noqa: BLE001 - every unexpected error is the finding
            self.errors.append(traceback.format_exc())
            self.stop.set()

    def reader(self, rng: random.Random) -> None:
        store = self.store
        tx = store.transaction()
        try:
            total = sum(tx.get(a) for a in ACCOUNTS)
            if total != TOTAL:
                self.errors.append(f"a snapshot summed to {total}, not {TOTAL}")
            if rng.random() < 0.2:
                seen = sum(1 for _ in tx.scan(prefix="acct/", reverse=rng.random() < 0.5))
                if seen != len(ACCOUNTS):
                    self.errors.append(f"a scan saw {seen} accounts, not {len(ACCOUNTS)}")
                self.counts["scans"] += 1
        finally:
            tx.rollback()
        store.get(rng.choice(ACCOUNTS))
        self.counts["snapshots"] += 1

    def writer(self, rng: random.Random) -> None:
        a, b = rng.sample(ACCOUNTS, 2)
        amount = rng.randrange(1, 20)
        try:
            with self.store.transaction() as tx:
                tx.put(a, tx.get(a) - amount)
                sp = tx.savepoint()
                tx.put(b, -10**9)  # rolled back below: never visible
                tx.rollback_to(sp)
                tx.put(b, tx.get(b) + amount)
                if rng.random() < BLOB_SHARE:
                    tx.put(f"blob/{rng.randrange(BLOB_KEYS)}",
                           os.urandom(rng.choice((100, 3000))))
            self.counts["commits"] += 1
        except ConflictError:
            self.counts["conflicts"] += 1

    def maintenance(self, rng: random.Random) -> None:
        time.sleep(0.05)
        r = rng.random()
        store = self.store
        if r < 0.4:
            store.checkpoint()
            self.counts["checkpoints"] += 1
        elif r < 0.55:
            store.stats()
        elif r < 0.7:  # undo a recent transaction, or everything since a restore point
            try:
                if r < 0.65:
                    recent = store.log(limit=20)
                    if recent:
                        store.revert(rng.choice(recent).txid)
                        self.counts["reverts"] += 1
                else:
                    points = store.restore_points()
                    if points:
                        store.rewind(rng.choice(sorted(points)))
                        self.counts["rewinds"] += 1
            except (ConflictError, RevertConflict):
                self.counts["undo_conflicts"] += 1
        elif r < 0.72:
            try:  # erases blobs under the writers (a compacting checkpoint)
                store.purge("blob/")
                self.counts["purges"] += 1
            except ConflictError:  # a writer added a blob since it read the prefix
                self.counts["undo_conflicts"] += 1
        else:
            point = store.restore_point(f"soak-{rng.randrange(8)}")
            view = store.at(point)
            total = sum(view.get(a) for a in ACCOUNTS)
            if total != TOTAL:
                self.errors.append(f"store.at(restore point) summed to {total}")
            store.history(rng.choice(ACCOUNTS))
            self.counts["history_reads"] += 1

    # ---- the run -------------------------------------------------------------------------
    def run(self, seconds: float, readers: int, writers: int, stall: float,
            min_commits: int = 0) -> dict:
        """Run for ``seconds``, and on (up to ten times as long) until ``min_commits``
        commits are in: a slow machine gets the same amount of work, not less."""
        bodies = [self.reader] * readers + [self.writer] * writers + [self.maintenance]
        threads = [threading.Thread(target=self._loop, args=(body, n), daemon=True,
                                    name=f"soak-{body.__name__}-{n}")
                   for n, body in enumerate(bodies)]
        map0 = self.store.stats()["lmdb_map_size"]
        for t in threads:
            t.start()
        start = time.monotonic()
        self.go.set()
        last: dict[str, tuple[int, float]] = {}  # thread -> (count, when it last moved)
        longest = 0.0
        stalls: list[dict] = []  # the first few waits of REPORT_STALL s or more, with stacks
        while not self.stop.is_set():
            elapsed = time.monotonic() - start
            if elapsed >= seconds and (self.counts["commits"] >= min_commits
                                       or elapsed >= 10 * seconds):
                break
            time.sleep(0.2)
            now = time.monotonic()
            for name, count in list(self.progress.items()):
                seen, since = last.get(name, (-1, now))
                if count != seen:
                    last[name] = (count, now)
                    continue
                longest = max(longest, now - since)
                if now - since >= REPORT_STALL and len(stalls) < 3 and not any(
                        s["thread"] == name and s["since"] == since for s in stalls):
                    stalls.append({"thread": name, "since": since, "counts": dict(self.counts),
                                   "stacks": _stacks()})
                if now - since > stall:  # every thread must keep going, not just some
                    sys.stderr.write(f"soak: {name} finished nothing for {stall:.0f} s; "
                                     f"stacks:\n")
                    faulthandler.dump_traceback(all_threads=True)
                    os._exit(2)
        self.stop.set()
        for t in threads:
            t.join(60)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.errors.append(f"threads did not stop: {stuck}")
        map_end = self.store.stats()["lmdb_map_size"]
        self.store.close()
        report = verify_store(self.path)
        reopened = walstore.open(self.path)
        try:
            total = sum(reopened.get(a) for a in ACCOUNTS)
        finally:
            reopened.close()
        if total != TOTAL:
            self.errors.append(f"after reopen the accounts sum to {total}")
        if report.errors:
            self.errors.append(f"verify failed: {report.errors[:3]}")
        return {"seconds": round(time.monotonic() - start, 1), **self.counts,
                "map_growth": round(map_end / map0, 1), "longest_stall_s": round(longest, 2),
                "stalls": [{k: v for k, v in s.items() if k != "since"} for s in stalls],
                "errors": self.errors[:5], "ok": not self.errors}


def _stacks() -> dict[str, list[str]]:
    """Where every thread is (the innermost frames of each), to say why one stalled."""
    frames = sys._current_frames()
    out = {}
    for t in threading.enumerate():
        f = frames.get(t.ident)
        if f is not None and t is not threading.current_thread():
            out[t.name] = [f"{fs.filename.rsplit('/', 2)[-1]}:{fs.lineno} {fs.name}"
                           for fs in traceback.extract_stack(f)[-8:]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--min-commits", type=int, default=0,
                    help="go on past --seconds (up to 10x) until this many commits are in")
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--durability", default="normal", choices=("full", "normal", "none"))
    ap.add_argument("--stall", type=float, default=30, help="seconds without progress = hang")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="where to make the store (default: a temporary directory)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.dir:  # (a --dir not made yet is made, 0700, as the store's own are)
        os.makedirs(args.dir, mode=0o700, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walstore-soak-", dir=args.dir)
    soak = Soak(os.path.join(base, "store"), args.durability, args.seed)
    out = soak.run(args.seconds, args.readers, args.writers, args.stall, args.min_commits)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
