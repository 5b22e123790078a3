"""Benchmark harness: walstore against SQLite, raw LMDB and (if installed) rocksdict.

Owns issue 4's measurements: the peer adapters, the workload definitions, one generic
runner that interleaves the systems of a workload (A B C A B C ...) for several repetitions,
each in a fresh temporary directory, the child-process workloads (crash recovery, steady
state), the ratio targets, and the Markdown rendering of a result.  ``walstore bench`` and
``bench/run.py`` call :func:`run_benchmarks` and :func:`render_markdown`; the rest of the
engine never imports this module, and it uses walstore only through the public API (plus the
``open`` tuning keywords and ``Store.last_recovery`` report where present).

Every write carries a fresh value (SQLite skips rewriting an unchanged page, which fakes its
speed).  Keys are 20 bytes, values 100 bytes.  Results are plain JSON-able dicts (never
pickled).  The machine is shared and noisy: ratios within one run are what hold, absolute
numbers are context.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

KEY_BYTES = 20
VALUE_BYTES = 100
KEYSPACE = 10_000             # keys that single-put workloads upsert over
MB = 1 << 20
HEAP_BOUND_MB = 128           # "bounded memory" for recovery: heap growth below this
STEADY_JUDGED = 500_000       # commits a steady run needs before flatness is judged

Item = tuple[bytes, bytes]
Progress = Callable[[str], object]


# --------------------------------------------------------------------------- data

_PAD = b"v" * (VALUE_BYTES - 20)


def make_key(i: int) -> bytes:
    """The i-th key: exactly KEY_BYTES bytes."""
    return b"key:%016d" % i


def make_value(seq: int) -> bytes:
    """A VALUE_BYTES value that differs for every seq (no write repeats a value)."""
    return b"%020d" % seq + _PAD


def make_items(n: int, keyspace: int = KEYSPACE, start: int = 0) -> list[Item]:
    """n upserts spread over keyspace keys (a prime stride), each with a fresh value."""
    return [(make_key((s * 7919) % keyspace), make_value(s)) for s in range(start, start + n)]


def chunk(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------- adapters

class Adapter(Protocol):
    """One open store of one system.  ``write`` must be safe to call from many threads."""

    def write(self, items: Sequence[Item]) -> None: ...            # one transaction
    def get(self, key: bytes) -> bytes | None: ...                  # outside a transaction
    def savepoint_write(self, keep: Item, discard: Item) -> None: ...
    def close(self) -> None: ...


class SqliteAdapter:
    """stdlib sqlite3 in WAL mode.  One connection shared by all threads under a lock: its
    fastest multi-thread setup here (a connection per thread, waiting on busy_timeout,
    measured 20-50% slower)."""

    UPSERT = "INSERT INTO kv(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"

    def __init__(self, path: Path, synchronous: str) -> None:
        self._db = sqlite3.connect(path / "kv.sqlite", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv(k TEXT PRIMARY KEY, v BLOB)")
        self._lock = threading.Lock()

    def write(self, items: Sequence[Item]) -> None:
        rows = [(k.decode(), v) for k, v in items]
        with self._lock:
            if len(rows) == 1:                    # autocommit: SQLite's cheapest single put
                self._db.execute(self.UPSERT, rows[0])
                return
            self._db.execute("BEGIN")
            self._db.executemany(self.UPSERT, rows)
            self._db.execute("COMMIT")

    def get(self, key: bytes) -> bytes | None:    # autocommit read, single-threaded use
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key.decode(),)).fetchone()
        return None if row is None else row[0]

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(self.UPSERT, (keep[0].decode(), keep[1]))
            self._db.execute("SAVEPOINT retry")
            self._db.execute(self.UPSERT, (discard[0].decode(), discard[1]))
            self._db.execute("ROLLBACK TO retry")
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class LmdbAdapter:
    """Raw py-lmdb; a savepoint is a nested write transaction that is aborted."""

    def __init__(self, path: Path, **flags: bool) -> None:
        import lmdb
        self._env = lmdb.open(str(path / "lmdb"), map_size=4 << 30, **flags)

    def write(self, items: Sequence[Item]) -> None:
        with self._env.begin(write=True) as txn:
            for k, v in items:
                txn.put(k, v)

    def get(self, key: bytes) -> bytes | None:    # a new read transaction per get
        with self._env.begin() as txn:
            return txn.get(key)

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(*keep)
            child = self._env.begin(write=True, parent=txn)
            child.put(*discard)
            child.abort()

    def close(self) -> None:
        self._env.close()


class RocksAdapter:
    """rocksdict in raw (bytes-only, no pickle) mode, WAL fsynced on every write."""

    def __init__(self, path: Path) -> None:
        import rocksdict
        self._rocks = rocksdict
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = rocksdict.Rdict(str(path / "rocks"), options)
        write_options = rocksdict.WriteOptions()
        write_options.sync = True
        self._db.set_write_options(write_options)

    def write(self, items: Sequence[Item]) -> None:
        if len(items) == 1:
            self._db.put(*items[0])
            return
        batch = self._rocks.WriteBatch(raw_mode=True)
        for k, v in items:
            batch.put(k, v)
        self._db.write(batch)

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        raise NotImplementedError("rocksdict has no savepoints")

    def close(self) -> None:
        self._db.close()


class WalstoreAdapter:
    """walstore through its public API only."""

    def __init__(self, path: Path, durability: str) -> None:
        import walstore
        self._store = walstore.open(str(path / "store"), durability=durability)

    def write(self, items: Sequence[Item]) -> None:
        with self._store.transaction() as tx:
            for k, v in items:
                tx.put(k, v)

    def get(self, key: bytes) -> bytes | None:
        return self._store.get(key)

    def savepoint_write(self, keep: Item, discard: Item) -> None:
        with self._store.transaction() as tx:
            tx.put(*keep)
            sp = tx.savepoint("retry")
            tx.put(*discard)
            tx.rollback_to(sp)

    def close(self) -> None:
        self._store.close()


@dataclass(frozen=True)
class System:
    name: str
    label: str
    module: str                       # what must import for the system to run
    open: Callable[[Path], Adapter]
    optional: bool = False            # left out silently (noted in meta) when missing


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("walstore", 'walstore durability="full"', "walstore",
           partial(WalstoreAdapter, durability="full")),
    System("walstore-normal", 'walstore durability="normal"', "walstore",
           partial(WalstoreAdapter, durability="normal")),
    System("sqlite-full", "sqlite3 WAL, synchronous=FULL", "sqlite3",
           partial(SqliteAdapter, synchronous="FULL")),
    System("sqlite-normal", "sqlite3 WAL, synchronous=NORMAL", "sqlite3",
           partial(SqliteAdapter, synchronous="NORMAL")),
    System("lmdb-sync", "py-lmdb sync=True", "lmdb",
           partial(LmdbAdapter, sync=True, metasync=True)),
    System("lmdb-metasync0", "py-lmdb sync=True, metasync=False", "lmdb",
           partial(LmdbAdapter, sync=True, metasync=False)),
    System("lmdb-nosync", "py-lmdb sync=False", "lmdb", partial(LmdbAdapter, sync=False)),
    System("rocksdict", "rocksdict, sync=True", "rocksdict", RocksAdapter, optional=True),
)}


def unavailable(system: System) -> str | None:
    """Why the system cannot run here, or None."""
    try:
        module = importlib.import_module(system.module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run"
        return f"cannot import {system.module}: {type(exc).__name__}: {exc}"
    if system.module == "walstore" and not hasattr(module, "open"):
        return "walstore.open is missing"
    return None


# --------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class Sample:
    """One timed measurement: ops done in seconds, plus workload-specific numbers."""
    ops: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Target:
    """A goal from issue 4 for one system of a workload.  Exactly one of: a ratio of
    medians against ``baseline``; an absolute ``minimum`` median rate; or ``flag``, an
    extra that must be true in every run."""
    system: str
    text: str
    baseline: str | None = None
    ratio: float | None = None
    minimum: float | None = None
    flag: str | None = None


@dataclass(frozen=True)
class Context:
    system: str
    directory: Path
    budget: float                     # seconds: a timed loop stops early past this
    adapter: Adapter | None = None    # None for isolated (child-process) workloads

    @property
    def db(self) -> Adapter:
        if self.adapter is None:
            raise RuntimeError("an isolated workload has no adapter")
        return self.adapter


@dataclass(frozen=True)
class Workload:
    id: str
    group: str
    title: str
    unit: str
    systems: tuple[str, ...]
    baseline: str | None              # the SQLite system ratios are taken against
    body: Callable[[Context], Sample]
    targets: tuple[Target, ...] = ()
    isolated: bool = False            # body runs child processes itself; no adapter
    max_repeats: int | None = None


def timed(step: Callable[[int], object], count: int, budget: float,
          ops_per_step: int = 1) -> Sample:
    """Call step(0..count-1); stop early once budget seconds have passed."""
    start = time.perf_counter()
    deadline = start + budget
    done = 0
    while done < count:
        end = min(count, done + 16)
        for i in range(done, end):
            step(i)
        done = end
        if time.perf_counter() > deadline:
            break
    return Sample(done * ops_per_step, time.perf_counter() - start)


def write_txns(ctx: Context, txns: int, puts_per_txn: int) -> Sample:
    """txns transactions of puts_per_txn fresh upserts each; ops = puts."""
    db, batches = ctx.db, chunk(make_items(txns * puts_per_txn), puts_per_txn)
    return timed(lambda i: db.write(batches[i]), len(batches), ctx.budget, puts_per_txn)


def threaded_puts(ctx: Context, txns: int, threads: int) -> Sample:
    """Single-put transactions from several threads at once (group commit)."""
    db, batches = ctx.db, chunk(make_items(txns), 1)
    done = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        barrier.wait()
        try:
            for batch in batches[t::threads]:
                db.write(batch)
                done[t] += 1
                if time.perf_counter() > deadline:
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    start = time.perf_counter()
    deadline = start + ctx.budget
    barrier.wait()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return Sample(sum(done), time.perf_counter() - start)


def point_reads(ctx: Context, keys: int, reads: int) -> Sample:
    """Load keys (untimed), then read random existing keys outside any transaction."""
    db = ctx.db
    for batch in chunk([(make_key(i), make_value(i)) for i in range(keys)], 10_000):
        db.write(batch)
    rng = random.Random(4)
    wanted = [make_key(rng.randrange(keys)) for _ in range(reads)]
    if db.get(wanted[0]) is None:
        raise RuntimeError(f"{ctx.system}: a loaded key reads back as absent")
    return timed(lambda i: db.get(wanted[i]), reads, ctx.budget)


def savepoint_txns(ctx: Context, txns: int) -> Sample:
    """Each transaction: put, savepoint, put, roll back to the savepoint, commit."""
    db, keep, discard = ctx.db, make_items(txns), make_items(txns, start=txns)
    return timed(lambda i: db.savepoint_write(keep[i], discard[i]), txns, ctx.budget)


# --------------------------------------------------------------------------- child processes

_CHILD_BOOT = ("import sys; from walstore.benchmark import child_main; "
               "sys.exit(child_main(sys.argv[1:]))")


def run_child(args: Sequence[object], timeout: float, crash_after_report: bool = False
              ) -> dict[str, Any]:
    """Run a :func:`child_main` command in a fresh interpreter and return the JSON object
    it prints.  With crash_after_report the child is SIGKILLed as soon as it has reported,
    so nothing it would do on a clean shutdown (close, checkpoint) happens."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_BOOT, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            line = proc.stdout.readline()
            if crash_after_report:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            timer.cancel()
            proc.stdout.close()
        if not line:
            err.seek(0)
            lines = err.read().strip().splitlines() or [f"exit status {proc.returncode}"]
            raise RuntimeError(f"child {args[0]!r} failed: {lines[-1]}")
    return json.loads(line)


def rss_mb(kind: str = "VmRSS") -> float:
    """Current resident set size of this process: VmRSS (all), RssAnon (heap: what a leak
    grows) or RssFile (mapped file pages, such as LMDB's map: reclaimable cache)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def disk_mb(path: Path) -> float:
    """Allocated bytes of every file under path (preallocated WAL segments count in full)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:      # a segment trimmed while we walk
                pass
    return total / MB


def _child_build_wal(path: str, target_bytes: str, budget: str) -> dict[str, Any]:
    """Write single-put transactions with durability="none" until the WAL holds
    target_bytes (by commit LSN, a byte position) or budget seconds pass.  Checkpoints
    are pushed beyond the target, so all of it is WAL since the last checkpoint."""
    import walstore
    target, deadline = int(target_bytes), time.monotonic() + float(budget)
    store = walstore.open(path, durability="none", checkpoint_bytes=2 * target + 64 * MB)
    seq = written = 0
    while written < target and time.monotonic() < deadline:
        with store.transaction() as tx:
            tx.put(make_key(seq % KEYSPACE), make_value(seq))
        seq += 1
        if seq % 256 == 0:
            lsn = getattr(tx, "lsn", None)
            written = lsn if isinstance(lsn, int) else int(disk_mb(Path(path) / "wal") * MB)
    return {"txns": seq, "wal_bytes": written, "last_seq": seq - 1}


def _watch_heap(stop: threading.Event, peak: list[float]) -> None:
    """Keep peak[0] at the highest RssAnon seen, sampling every 5 ms until stop."""
    while not stop.wait(0.005):
        peak[0] = max(peak[0], rss_mb("RssAnon"))


def _child_recover(path: str, last_seq: str) -> dict[str, Any]:
    """Time walstore.open on a crashed store (recovery) and check the last commit.  Peak
    RSS counts mapped WAL and LMDB pages; the heap (RssAnon) peak is sampled apart."""
    import walstore
    try:
        walstore.open(path, recover="manual").close()
        needed = False
    except walstore.NeedsRecovery:
        needed = True
    base, heap = rss_mb(), [rss_mb("RssAnon")]
    base_heap, stop = heap[0], threading.Event()
    watcher = threading.Thread(target=_watch_heap, args=(stop, heap), daemon=True)
    watcher.start()
    start = time.perf_counter()
    store = walstore.open(path)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    seq = int(last_seq)
    verified = store.get(make_key(seq % KEYSPACE)) == make_value(seq)
    report = getattr(store, "last_recovery", None)
    store.close()
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base,
            "peak_heap_mb": max(heap[0], rss_mb("RssAnon")), "base_heap_mb": base_heap,
            "needed_recovery": needed, "verified": verified,
            "report": report.as_dict() if report is not None else {}}


def _child_steady(path: str, durability: str, commits: str, budget: str, tuning: str
                  ) -> dict[str, Any]:
    """Single-put commits over a bounded key space; sample RSS and disk use 50 times.
    tuning: JSON object of engine Options (quick runs shrink the checkpoint cycle)."""
    import walstore
    store = walstore.open(path, durability=durability, **json.loads(tuning))
    total, every = int(commits), max(1, int(commits) // 50)
    samplers: dict[str, Callable[[], float]] = {
        "rss_mb": rss_mb, "anon_mb": partial(rss_mb, "RssAnon"),
        "wal_mb": partial(disk_mb, Path(path) / "wal"), "dir_mb": partial(disk_mb, Path(path))}
    series: dict[str, list[float]] = {k: [] for k in ("commits", *samplers)}
    start = time.perf_counter()
    deadline = start + float(budget)
    done = 0
    while done < total:
        with store.transaction() as tx:
            tx.put(make_key(done % KEYSPACE), make_value(done))
        done += 1
        if done % every == 0:
            series["commits"].append(done)
            for key, sample in samplers.items():
                series[key].append(sample())
            if time.perf_counter() > deadline:
                break
    seconds = time.perf_counter() - start
    store.close()
    return {"commits": done, "seconds": seconds, "series": series}


CHILD_COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "build-wal": _child_build_wal, "recover": _child_recover, "steady": _child_steady}


def child_main(argv: list[str]) -> int:
    """Entry point of the benchmark's child processes: print one JSON line.  build-wal then
    waits to be killed, leaving its WAL un-checkpointed as a crash would."""
    command, *args = argv
    print(json.dumps(CHILD_COMMANDS[command](*args)), flush=True)
    if command == "build-wal":
        time.sleep(3600)
    return 0


def recovery(ctx: Context, wal_bytes: int, budget: float) -> Sample:
    """Build a WAL of wal_bytes in a child (for at most budget seconds), SIGKILL it, then
    time recovery in another child."""
    store = ctx.directory / "store"
    built = run_child(["build-wal", store, wal_bytes, budget], budget + 120,
                      crash_after_report=True)
    rec = run_child(["recover", store, built["last_seq"]], timeout=budget * 4 + 120)
    heap_growth = rec["peak_heap_mb"] - rec["base_heap_mb"]
    extra = {"wal_mb": round(built["wal_bytes"] / MB, 1), "commits": built["txns"],
             "peak_rss_mb": round(rec["peak_rss_mb"], 1),
             "rss_growth_mb": round(rec["peak_rss_mb"] - rec["base_rss_mb"], 1),
             "heap_growth_mb": round(heap_growth, 1),
             "bounded_memory": heap_growth < HEAP_BOUND_MB,
             "needed_recovery": rec["needed_recovery"], "verified": rec["verified"]}
    report = rec["report"]                # the engine's own RecoveryReport, when it has one
    if "records" in report:
        extra["wal_records"] = report["records"]
    if "redone" in report:
        extra["redone"] = report["redone"]
    if report.get("seconds"):                 # the recovery pass alone, without open's rest
        extra["pass_rate"] = round(report.get("records", built["txns"]) / report["seconds"])
    if not rec["verified"]:
        raise RuntimeError(f"after recovery the last commit (seq {built['last_seq']}) is missing")
    return Sample(built["txns"], rec["seconds"], extra)


def slope_per_100k(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 2 or len(set(xs)) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope * 100_000


def flatness(series: dict[str, list[float]]) -> dict[str, Any]:
    """End values and slopes (MB per 100k commits, over the second half) of a steady run,
    and whether heap RSS and WAL disk use stay flat: the second half's peak within 10% +
    4 MB (heap) or 25% + 1 MB (WAL, a sawtooth of checkpoints) of the first half's peak.
    Total RSS also counts LMDB's mapped pages, which grow with the data file."""
    half = len(series["commits"]) // 2
    if half < 2:
        raise RuntimeError("steady run too short: fewer than 4 samples")
    out: dict[str, Any] = {}
    for name in ("rss_mb", "anon_mb", "wal_mb", "dir_mb"):
        out[f"{name}_end"] = round(series[name][-1], 1)
        out[f"{name[:-3]}_mb_per_100k"] = round(
            slope_per_100k(series["commits"][half:], series[name][half:]), 2)
    anon, wal = series["anon_mb"], series["wal_mb"]
    out["wal_mb_max"] = round(max(wal), 1)
    out["flat"] = (max(anon[half:]) <= max(anon[:half]) * 1.10 + 4
                   and max(wal[half:]) <= max(wal[:half]) * 1.25 + 1)
    return out


def steady_state(ctx: Context, commits: int, budget: float,
                 tuning: dict[str, int] | None = None) -> Sample:
    """A long run of single-put commits in a child: RSS and WAL disk use over time."""
    durability = "normal" if ctx.system.endswith("-normal") else "full"
    report = run_child(["steady", ctx.directory / "store", durability, commits, budget,
                        json.dumps(tuning or {})], timeout=budget + 120)
    series = report["series"]
    return Sample(report["commits"], report["seconds"], flatness(series), series)


# --------------------------------------------------------------------------- the suite

@dataclass(frozen=True)
class Profile:
    """Sizes of one run of the suite (counts are upper bounds: budget cuts loops short)."""
    repeats: int
    budget: float                     # seconds per timed measurement
    single_puts: int
    threads: int
    thread_puts: int
    txn100_txns: int
    bulk_puts: int
    read_keys: int
    reads: int
    savepoints: int
    recovery_bytes: tuple[int, ...]
    recovery_budget: float            # seconds to build one WAL
    steady_commits: int
    steady_budget: float
    steady_tuning: tuple[tuple[str, int], ...] = ()   # engine Options for the steady run

    def scaled(self, factor: float) -> Profile:
        """Every count multiplied by factor (at least 1); repeats and budgets kept."""
        counts = ("single_puts", "thread_puts", "txn100_txns", "bulk_puts", "read_keys",
                  "reads", "savepoints", "steady_commits")
        changes: dict[str, Any] = {n: max(1, int(getattr(self, n) * factor)) for n in counts}
        changes["recovery_bytes"] = tuple(max(4096, int(b * factor))
                                          for b in self.recovery_bytes)
        changes["steady_commits"] = max(200, changes["steady_commits"])
        return replace(self, **changes)


QUICK = Profile(repeats=3, budget=0.6, single_puts=2_000, threads=8, thread_puts=3_000,
                txn100_txns=200, bulk_puts=100_000, read_keys=20_000, reads=100_000,
                savepoints=2_000, recovery_bytes=(1 * MB, 4 * MB), recovery_budget=10.0,
                steady_commits=120_000, steady_budget=6.0,
                steady_tuning=(("checkpoint_bytes", 2 * MB), ("segment_size", MB)))
FULL = Profile(repeats=5, budget=10.0, single_puts=10_000, threads=8, thread_puts=16_000,
               txn100_txns=1_000, bulk_puts=100_000, read_keys=100_000, reads=500_000,
               savepoints=5_000, recovery_bytes=(10 * MB, 100 * MB, 1024 * MB),
               recovery_budget=900.0, steady_commits=1_000_000, steady_budget=900.0)

DURABLE = ("walstore", "sqlite-full", "lmdb-sync", "lmdb-metasync0", "rocksdict")


def ratio_target(x: float, baseline: str, system: str = "walstore") -> Target:
    return Target(system, f">= {x:g}x {baseline}", baseline=baseline, ratio=x)


def all_workloads(p: Profile) -> list[Workload]:
    """Issue 4's workloads, sized by p, in the order they run."""
    return in_process_workloads(p) + child_process_workloads(p)


def in_process_workloads(p: Profile) -> list[Workload]:
    """Workloads (1)-(7): every system through its Adapter in this process."""
    return [
        Workload("put-1t", "put-1t", "durable single-put txns, 1 thread", "commits/s",
                 DURABLE, "sqlite-full", partial(write_txns, txns=p.single_puts,
                                                 puts_per_txn=1),
                 (ratio_target(1.3, "sqlite-full"),)),
        Workload("put-8t", "put-8t", f"durable single-put txns, {p.threads} threads",
                 "commits/s", DURABLE, "sqlite-full",
                 partial(threaded_puts, txns=p.thread_puts, threads=p.threads),
                 (ratio_target(2.5, "sqlite-full"),)),
        Workload("txn-100", "txn-100", "100 puts per txn (durable)", "puts/s", DURABLE,
                 "sqlite-full", partial(write_txns, txns=p.txn100_txns, puts_per_txn=100),
                 (ratio_target(1.3, "sqlite-full"),)),
        Workload("bulk", "bulk", f"bulk load, {p.bulk_puts:,} puts in one txn", "puts/s",
                 DURABLE, "sqlite-full",
                 partial(write_txns, txns=1, puts_per_txn=p.bulk_puts),
                 (ratio_target(1.5, "sqlite-full"),)),
        Workload("reads", "reads", "point reads of random existing keys, outside a txn",
                 "reads/s", ("walstore", "sqlite-full", "lmdb-sync", "rocksdict"),
                 "sqlite-full", partial(point_reads, keys=p.read_keys, reads=p.reads),
                 (ratio_target(3.0, "sqlite-full"), ratio_target(0.5, "lmdb-sync"))),
        Workload("savepoint", "savepoint", "txn: put, savepoint, put, rollback-to, commit",
                 "txns/s", ("walstore", "sqlite-full", "lmdb-sync"), "sqlite-full",
                 partial(savepoint_txns, txns=p.savepoints),
                 (ratio_target(1.0, "sqlite-full"),)),
        Workload("normal", "normal", 'single-put txns, durability="normal"', "commits/s",
                 ("walstore-normal", "sqlite-normal", "lmdb-nosync"), "sqlite-normal",
                 partial(write_txns, txns=p.single_puts * 4, puts_per_txn=1),
                 (ratio_target(1.2, "sqlite-normal", "walstore-normal"),)),
    ]


def child_process_workloads(p: Profile) -> list[Workload]:
    """Workloads (8) recovery per WAL size and (9) steady state: walstore in children."""
    suite: list[Workload] = []
    for size in p.recovery_bytes:
        label = f"{size / MB:g}MB" if size < 1024 * MB else f"{size / (1024 * MB):g}GB"
        targets = [Target("walstore", ">= 100k REDO records/s", minimum=100_000)]
        if size == max(p.recovery_bytes):
            targets.append(Target("walstore", f"heap growth < {HEAP_BOUND_MB} MB",
                                  flag="bounded_memory"))
        suite.append(Workload(
            f"recovery-{label}", "recovery", f"REDO recovery after SIGKILL, {label} of WAL",
            "records/s", ("walstore",), None,
            partial(recovery, wal_bytes=size, budget=p.recovery_budget),
            tuple(targets), isolated=True, max_repeats=3 if size < 512 * MB else 1))
    tuned = "".join(f", {k}={v:,}" for k, v in p.steady_tuning)
    long_enough = p.steady_commits >= STEADY_JUDGED   # shorter runs are still warming up
    suite.append(Workload(
        "steady", "steady", f'steady run, up to {p.steady_commits:,} commits, "normal"{tuned}'
        + ("" if long_enough else " (too short to judge flatness)"),
        "commits/s", ("walstore-normal",), None,
        partial(steady_state, commits=p.steady_commits, budget=p.steady_budget,
                tuning=dict(p.steady_tuning)),
        (Target("walstore-normal", "flat heap RSS and WAL disk", flag="flat"),)
        if long_enough else (), isolated=True, max_repeats=1))
    return suite


def select(suite: list[Workload], names: Sequence[str] | None) -> list[Workload]:
    """The workloads whose id or group is named (all when names is None)."""
    if names is None:
        return suite
    known = {w.id for w in suite} | {w.group for w in suite}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; known: {sorted(known)}")
    return [w for w in suite if w.id in names or w.group in names]


# --------------------------------------------------------------------------- runner

def measure_once(w: Workload, system: str, budget: float) -> Sample:
    """One measurement of one system in a fresh temporary directory, removed afterwards.
    The close is timed apart (close_ms): work a system defers past its last commit."""
    directory = Path(tempfile.mkdtemp(prefix=f"walstore-bench-{w.id}-"))
    try:
        if w.isolated:
            return w.body(Context(system, directory, budget))
        adapter = SYSTEMS[system].open(directory)
        try:
            sample = w.body(Context(system, directory, budget, adapter))
        finally:
            start = time.perf_counter()
            adapter.close()
        close_ms = round((time.perf_counter() - start) * 1000, 1)
        return replace(sample, extra={**sample.extra, "close_ms": close_ms})
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_workload(w: Workload, profile: Profile, repeats: int, progress: Progress
                 ) -> dict[str, Any]:
    """Run every system of w, interleaved (A B C A B C ...), and summarize."""
    systems, skipped, errors = [], [], {}
    for name in w.systems:
        why = unavailable(SYSTEMS[name])
        if why and SYSTEMS[name].optional:
            skipped.append(name)
            continue
        systems.append(name)
        if why:
            errors[name] = f"error: {why}"
    samples: dict[str, list[Sample]] = {name: [] for name in systems}
    rounds = min(repeats, w.max_repeats or repeats)
    progress(f"{w.id}: {w.title} ({', '.join(systems)}; {rounds} rounds)")
    for rnd in range(1, rounds + 1):
        for name in systems:
            if name in errors:
                continue
            try:
                sample = measure_once(w, name, profile.budget)
            except Exception as exc:  # noqa: BLE001 - reported in the result, run goes on
                errors[name] = f"error: {type(exc).__name__}: {exc}"
                progress(f"  {rnd}/{rounds} {name:<16} {errors[name]}")
                continue
            samples[name].append(sample)
            progress(f"  {rnd}/{rounds} {name:<16} {sample.rate:>14,.0f} {w.unit}")
    return summarize(w, samples, errors, skipped)


def _combine(values: list[Any]) -> Any:
    """One number for a note over all runs: all() of flags, else the median."""
    if all(isinstance(v, bool) for v in values):
        return all(values)
    middle = statistics.median(values)
    return int(middle) if float(middle).is_integer() else round(middle, 3)


def system_row(name: str, samples: list[Sample], error: str | None) -> dict[str, Any]:
    rates = [s.rate for s in samples] if error is None else []
    keys = samples[0].extra.keys() if samples else ()
    return {
        "system": name, "label": SYSTEMS[name].label, "error": error,
        "median": statistics.median(rates) if rates else None,
        "min": min(rates) if rates else None, "max": max(rates) if rates else None,
        "ratio_vs_sqlite": None,
        "extra": {k: _combine([s.extra[k] for s in samples]) for k in keys},
        "samples": [{"ops": s.ops, "seconds": s.seconds, "rate": s.rate, "extra": s.extra}
                    for s in samples],
        "series": samples[-1].series if samples else {},
    }


def evaluate(target: Target, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether target is met: met is None when it could not be measured."""
    row = rows.get(target.system)
    out: dict[str, Any] = {"system": target.system, "text": target.text,
                           "baseline": target.baseline,
                           "goal": target.ratio if target.minimum is None else target.minimum,
                           "measured": None, "met": None}
    if row is None or row["median"] is None:
        return out
    if target.flag is not None:
        out["met"] = bool(row["extra"].get(target.flag))
    elif target.minimum is not None:
        out["measured"] = row["median"]
        out["met"] = row["median"] >= target.minimum
    else:
        base = rows.get(target.baseline or "")
        if base is not None and base["median"]:
            out["measured"] = row["median"] / base["median"]
            out["met"] = out["measured"] >= (target.ratio or 0.0)
    return out


def summarize(w: Workload, samples: dict[str, list[Sample]], errors: dict[str, str],
              skipped: list[str]) -> dict[str, Any]:
    rows = {name: system_row(name, runs, errors.get(name)) for name, runs in samples.items()}
    base = rows.get(w.baseline or "")
    for row in rows.values():
        if base and base["median"] and row["median"] is not None:
            row["ratio_vs_sqlite"] = row["median"] / base["median"]
    return {"id": w.id, "group": w.group, "title": w.title, "unit": w.unit,
            "baseline": w.baseline, "systems": list(rows.values()),
            "targets": [evaluate(t, rows) for t in w.targets], "skipped": skipped}


def _version(module: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure
        return "not importable"
    return str(getattr(mod, "__version__", "unknown"))


def machine_info() -> dict[str, Any]:
    """What the numbers ran on: CPUs, CPU model, Python, peer versions, date."""
    import lmdb
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
        "python": platform.python_version(), "platform": platform.platform(),
        "lmdb": f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}",
        "sqlite": sqlite3.sqlite_version, "rocksdict": _version("rocksdict"),
        "walstore": _version("walstore"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_benchmarks(quick: bool = False, workloads: list[str] | None = None,
                   repeats: int | None = None, progress: Progress = print, *,
                   scale: float = 1.0) -> dict[str, Any]:
    """Run the suite (or the named workloads / groups) and return a JSON-able result.

    quick: small sizes, 2 rounds, well under a minute.  repeats: rounds per workload
    (systems interleaved within a round).  scale: multiply every count (tests use tiny
    sizes).  A system that fails is reported as "error: ..." and the run goes on.
    """
    profile = QUICK if quick else FULL
    if scale != 1.0:
        profile = profile.scaled(scale)
    rounds = repeats or profile.repeats
    chosen = select(all_workloads(profile), workloads)
    started = time.perf_counter()
    results = [run_workload(w, profile, rounds, progress) for w in chosen]
    return {"schema": 1,
            "meta": {"machine": machine_info(), "mode": "quick" if quick else "full",
                     "repeats": rounds, "scale": scale,
                     "seconds": round(time.perf_counter() - started, 1),
                     "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES,
                     "systems": {s.name: s.label for s in SYSTEMS.values()}},
            "workloads": results}


# --------------------------------------------------------------------------- rendering

def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _fmt_extra(extra: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}"
                     for k, v in extra.items())


def _fmt_target(t: dict[str, Any]) -> tuple[str, str]:
    if t["met"] is None:
        return t["text"], "n/a"
    measured = "" if t["measured"] is None else (
        f" ({t['measured']:.2f}x)" if t["baseline"] else f" ({fmt_rate(t['measured'])})")
    return t["text"], ("yes" if t["met"] else "**no**") + measured


def workload_rows(w: dict[str, Any]) -> list[str]:
    """Markdown table rows of one workload result."""
    lines = []
    for i, row in enumerate(w["systems"]):
        mine = [_fmt_target(t) for t in w["targets"] if t["system"] == row["system"]]
        name = f"{w['id']}: {w['title']}" if i == 0 else ""
        if row["error"]:
            cells = [name, row["system"], row["error"].replace("|", "/"), "", "", "", "", ""]
        else:
            ratio = row["ratio_vs_sqlite"]
            cells = [name, row["system"], f"{fmt_rate(row['median'])} {w['unit']}",
                     f"{fmt_rate(row['min'])}–{fmt_rate(row['max'])}",
                     "-" if ratio is None else f"{ratio:.2f}x",
                     "; ".join(t for t, _ in mine), "; ".join(m for _, m in mine),
                     _fmt_extra(row["extra"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The result as Markdown: a header naming the machine, one table, a target tally."""
    meta, m = results["meta"], results["meta"]["machine"]
    lines = [
        f"# walstore benchmark ({meta['mode']})", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['lmdb']}, "
        f"SQLite {m['sqlite']}, rocksdict {m['rocksdict']}, walstore {m['walstore']}; "
        f"{m['platform']}; {m['date']}.", "",
        f"Systems run interleaved, {meta['repeats']} rounds, each run in a fresh temporary "
        f"directory; {meta['key_bytes']}-byte keys, {meta['value_bytes']}-byte fresh values. "
        f"Median, min–max over rounds; ratio of medians vs the workload's SQLite "
        f"configuration. Total time {meta['seconds']} s. Trust ratios, not absolute numbers.",
        "", "| workload | system | median | min–max | ratio vs SQLite | target | met? | notes |",
        "|---|---|--:|--:|--:|---|---|---|"]
    for w in results["workloads"]:
        lines += workload_rows(w)
    targets = [t for w in results["workloads"] for t in w["targets"]]
    met = sum(1 for t in targets if t["met"])
    lines += ["", f"Targets met: {met} of {len(targets)}"
              f" ({sum(1 for t in targets if t['met'] is None)} not measured)."]
    skipped = sorted({s for w in results["workloads"] for s in w["skipped"]})
    if skipped:
        lines.append(f"Not installed, left out: {', '.join(skipped)}.")
    lines.append("")
    lines += [f"- `{name}`: {label}" for name, label in meta["systems"].items()]
    return "\n".join(lines) + "\n"
