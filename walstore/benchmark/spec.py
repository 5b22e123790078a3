"""The benchmark's vocabulary: what a sample, a row, a workload, a target and a run's sizes
are, and the two timing loops every workload uses (one caller, several threads).

Owns no policy: which workloads exist and what they aim for is in ``workloads.py``, how they
are run and summarized in ``runner.py``.  Everything here is plain data (JSON-able once
summarized, never pickled).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

Item = tuple[bytes, bytes]
Progress = Callable[[str], object]


@dataclass(frozen=True)
class Sample:
    """One timed measurement of one system: ``ops`` done in ``seconds``; per-op latencies
    (seconds) when the row reports percentiles; workload-specific notes in ``extra``."""
    ops: int
    seconds: float
    latencies: Sequence[float] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Context:
    """What a workload body gets for one measurement: the system's name, a fresh empty
    directory, the time budget of a timed loop, and the open peer (None when the workload
    opens what it measures itself)."""
    system: str
    directory: Path
    budget: float
    value_bytes: int
    peer: Any = None


@dataclass(frozen=True)
class Part:
    """One group of rows in the table: what one measurement of a workload yields.  Every
    row states its key space and value size.  ``baseline`` names the systems a row's ratio
    is taken against (the best of them); ``ratio_on`` is "rate" (higher is better) or a
    latency percentile such as "p99.9" (lower is better)."""
    id: str
    title: str
    unit: str
    key_space: str
    value_size: str
    baseline: tuple[str, ...] = ()
    ratio_on: str = "rate"
    latency: bool = False             # report p50 / p99 / p99.9 columns
    value_bytes: int | None = None


@dataclass(frozen=True)
class Workload:
    """Systems measured the same way, interleaved in every round.  ``body`` returns one
    Sample (for a single part) or {part id: Sample}.  ``requires`` names modules the
    workload cannot run without, with the reason shown when one is missing."""
    id: str
    systems: tuple[str, ...]
    body: Callable[[Context], "Sample | dict[str, Sample]"]
    parts: tuple[Part, ...]
    value_bytes: int = 0
    isolated: bool = False            # the body opens what it measures (no peer)
    requires: tuple[tuple[str, str], ...] = ()   # (module, "skipped: ... not installed")
    max_rounds: int | None = None


@dataclass(frozen=True)
class Target:
    """A goal, as a ratio of two rows of one run: ``row`` (part id, system) against the best
    of ``baseline`` (part id, systems) on ``metric`` ("rate" or a latency percentile);
    met when ``measured op goal``.  Computed from the run, never written down."""
    figure: str
    source: str
    row: tuple[str, str]
    baseline: tuple[str, tuple[str, ...]]
    op: str                           # ">=" or "<="
    goal: float
    metric: str = "rate"
    # a second baseline the ratio is also shown against, never judged: the target's own
    # baseline may not be the fastest peer (8 threads vs SQLite's single thread, when
    # SQLite's own 8-thread rows are faster)
    beside: tuple[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class Profile:
    """Sizes of one run (counts are upper bounds: a timed loop stops at its budget)."""
    mode: str
    repeats: int
    budget: float                     # seconds per timed loop
    commits: int                      # 1-thread single-put commits (durable rows)
    tail_commits: int                 # the 2 KiB latency row
    threads: int
    thread_commits: int
    normal_commits: int
    txn100_txns: int
    bulk_keys: int
    overwrite_keys: int               # key space of the overwrite-heavy bulk row
    read_keys: int
    reads: int
    fresh_keys: int
    held_keys: int                    # distinct keys written before the held-open timing
    held_commits: int
    lg_threads: int
    lg_turns: int
    lg_concurrency: int
    lg_state_reads: int
    lg_repeats: int
    recovery_bytes: tuple[int, ...]
    recovery_budget: float
    steady_commits: int
    steady_budget: float
    steady_tuning: tuple[tuple[str, int], ...] = ()
    sustained_commits: int = 0        # the 2 KiB latency row long enough for LMDB writes

    def scaled(self, factor: float) -> Profile:
        """Every count multiplied by factor (at least 2); repeats and budgets kept."""
        if factor == 1.0:
            return self
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("repeats", "lg_repeats", "threads", "lg_concurrency") or \
                    not isinstance(value, int) or isinstance(value, bool):
                continue
            changes[f.name] = max(2, int(value * factor))
        changes["recovery_bytes"] = tuple(max(4096, int(b * factor))
                                          for b in self.recovery_bytes)
        changes["steady_commits"] = max(200, changes["steady_commits"])
        changes["mode"] = f"{self.mode} x{factor:g}"
        return replace(self, **changes)


def percentile_rank(n: int, q: float) -> int:
    """The nearest-rank method's 1-based rank of percentile q (0..100) among n values:
    ceil(q/100 * n), computed exactly (q as the decimal it is written as: in floating
    point 99.9/100*1000 is 999.0000000000001, which made p99.9 of 1,000 samples the
    maximum)."""
    exact = Fraction(str(q)) * n / 100
    return min(n, max(1, math.ceil(exact)))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence."""
    return sorted_values[percentile_rank(len(sorted_values), q) - 1]


def samples_needed(q: float) -> int:
    """The fewest samples for which percentile q is not simply the largest one: the
    nearest rank is below n only from n = ceil(100 / (100 - q)) on (1,000 for p99.9)."""
    if q >= 100:
        return 1
    return math.ceil(Fraction(100) / (Fraction(100) - Fraction(str(q))))


def timed(step: Callable[[int], object], count: int, budget: float, *,
          ops_per_step: int = 1, latencies: bool = False) -> Sample:
    """Call step(0..count-1), each timed when latencies is set; stop early once budget
    seconds have passed."""
    clock = time.perf_counter
    lat: list[float] = []
    start = clock()
    deadline = start + budget
    done = 0
    while done < count:
        end = min(count, done + 16)
        if latencies:
            for i in range(done, end):
                t0 = clock()
                step(i)
                lat.append(clock() - t0)
        else:
            for i in range(done, end):
                step(i)
        done = end
        if clock() > deadline:
            break
    return Sample(done * ops_per_step, clock() - start, lat)


def threaded(make_step: Callable[[], Callable[[int], object]], count: int, threads: int,
             budget: float) -> Sample:
    """Steps 0..count-1 shared out round-robin to ``threads`` threads, all released at
    once; each thread calls make_step() first (its own connection, say).  Every step is
    timed; the run stops early once budget seconds have passed."""
    clock = time.perf_counter
    lats: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(t: int) -> None:
        try:
            step = make_step()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
            mine = lats[t]
            for i in range(t, count, threads):
                t0 = clock()
                step(i)
                t1 = clock()
                mine.append(t1 - t0)
                if t1 > deadline[0]:
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    deadline[0] = clock() + budget
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = clock()
    for w in workers:
        w.join()
    seconds = clock() - start
    if errors:
        raise errors[0]
    merged = [x for mine in lats for x in mine]
    return Sample(len(merged), seconds, merged)
