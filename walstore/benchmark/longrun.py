"""The workloads that run walstore in child processes: REDO recovery after SIGKILL for a
given WAL size, and a steady run that samples memory and disk use (issue 4's long runs).

A child is ``python -c "from walstore.benchmark import child_main; ..."``: it prints one
JSON line.  These rows have no peer (nothing to take a ratio against); their judgements
(bounded heap, flat disk) are notes of the row.  They use the ``open`` tuning keywords
``checkpoint_bytes`` / ``segment_size`` and ``Store.last_recovery`` where the engine has
them.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from .data import MB, VALUE_BYTES, allocated_bytes, make_key, make_value
from .spec import Context, Part, Profile, Sample, Workload

KEYSPACE = 10_000                     # keys the children's single-put commits upsert over
HEAP_BOUND_MB = 128                   # "bounded memory" for recovery: heap growth below this
STEADY_JUDGED = 500_000               # commits a steady run needs before flatness is judged
_CHILD_BOOT = ("import sys; from walstore.benchmark import child_main; "
               "sys.exit(child_main(sys.argv[1:]))")


def run_child(args: Sequence[object], timeout: float, crash_after_report: bool = False
              ) -> dict[str, Any]:
    """Run a :func:`child_main` command in a fresh interpreter and return the JSON object
    it prints.  With crash_after_report the child is SIGKILLed as soon as it has reported,
    so nothing it would do on a clean shutdown (close, checkpoint) happens."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_BOOT, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        timer = threading.Timer(timeout, proc.kill)
        try:
            timer.start()
            line = proc.stdout.readline()
            if crash_after_report:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            timer.cancel()
            # An interrupt (Ctrl-C) or an error here must not leave the child running: a
            # build-wal child writes up to its target, then sleeps an hour to be killed.
            if proc.poll() is None:
                proc.kill()
                proc.wait()
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


def disk_mb(path: Path) -> float:
    return allocated_bytes(path) / MB


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
            written = int(lsn) if isinstance(lsn, int) else int(disk_mb(Path(path) / "wal") * MB)
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    return {"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base,
            "peak_heap_mb": max(heap[0], rss_mb("RssAnon")), "base_heap_mb": base_heap,
            "needed_recovery": needed, "verified": verified,
            "report": report.as_dict() if hasattr(report, "as_dict") else {}}


def _child_steady(path: str, durability: str, commits: str, budget: str, tuning: str
                  ) -> dict[str, Any]:
    """Single-put commits over a bounded key space; sample RSS and disk use 50 times.
    tuning: JSON object of engine options (quick runs shrink the checkpoint cycle)."""
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
    store.close()   # counted, as every row counts its close: the deferred apply is here
    closing = time.perf_counter() - start - seconds
    return {"commits": done, "seconds": seconds, "closing": closing, "series": series}


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
             "heap_growth_mb": round(heap_growth, 1),
             "bounded_memory": heap_growth < HEAP_BOUND_MB,
             "needed_recovery": rec["needed_recovery"], "verified": rec["verified"]}
    report = rec["report"]                # the engine's own recovery report, when it has one
    for key in ("records", "redone"):
        if key in report:
            extra[key] = report[key]
    if not rec["verified"]:
        raise RuntimeError(f"after recovery the last commit (seq {built['last_seq']}) is missing")
    return Sample(built["txns"], rec["seconds"], extra=extra)


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
    report = run_child(["steady", ctx.directory / "store", "normal", commits, budget,
                        json.dumps(tuning or {})], timeout=budget + 120)
    series = report["series"]
    extra = flatness(series)
    if report["commits"] < STEADY_JUDGED:
        extra["flat"] = f"not judged (fewer than {STEADY_JUDGED:,} commits)"
    extra.update(close_ms=round(report["closing"] * 1000, 1),
                 timed_s=round(report["seconds"], 4))
    return Sample(report["commits"], report["seconds"] + report["closing"], extra=extra,
                  series=series)


def workloads(p: Profile) -> list[Workload]:
    """Recovery for each WAL size of p, then the steady run."""
    value = f"{VALUE_BYTES} B"
    keys = f"{KEYSPACE:,} keys, single-put commits (overwrites)"
    suite = []
    for size in p.recovery_bytes:
        label = f"{size / MB:g}MB" if size < 1024 * MB else f"{size / (1024 * MB):g}GB"
        part = Part(f"recovery-{label}", f"REDO recovery after SIGKILL, {label} of WAL",
                    "records/s", keys, value)
        suite.append(Workload(part.id, ("walstore",),
                              partial(recovery, wal_bytes=size, budget=p.recovery_budget),
                              (part,), isolated=True,
                              max_rounds=3 if size < 512 * MB else 1))
    tuned = "".join(f", {k}={v:,}" for k, v in p.steady_tuning)
    part = Part("steady", f'steady run, up to {p.steady_commits:,} commits, "normal"{tuned}',
                "commits/s", keys, value)
    suite.append(Workload("steady", ("walstore-normal",),
                          partial(steady_state, commits=p.steady_commits,
                                  budget=p.steady_budget, tuning=dict(p.steady_tuning)),
                          (part,), isolated=True, max_rounds=1))
    return suite
