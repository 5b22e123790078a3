"""The workloads (what each row measures and states), the sizes of a quick and a full run,
and the targets (issue 15's table, issue 10's two rows, issue 14's LangGraph figures).

Every row says its key space and value size.  Writes use fresh values; multi-put rows say
whether keys are distinct or overwritten.  Reads say where they read from.
"""
from __future__ import annotations

import random
import time
from functools import partial
from typing import Callable, Sequence

from . import graphs, longrun
from .data import MB, VALUE_BYTES, distinct_items, overwrite_items
from .spec import Context, Item, Part, Profile, Sample, Target, Workload, threaded, timed

LOAD_BATCH = 10_000                   # untimed loads: puts per transaction


def _singles(items: Sequence[Item]) -> list[list[Item]]:
    return [[item] for item in items]


def _chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _check(ctx: Context, item: Item) -> None:
    """The item reads back (a peer that cannot read, the bare loop, is not asked)."""
    if not hasattr(ctx.peer, "get"):
        return
    got = ctx.peer.get(item[0])
    if got != item[1]:
        raise RuntimeError(f"{ctx.system}: a written key reads back as {got!r:.40}")


# --------------------------------------------------------------------------- bodies

def commits(ctx: Context, count: int, puts: int = 1, start: int = 0,
            whole: bool = False) -> Sample:
    """``count`` transactions of ``puts`` new distinct keys each (keys numbered from
    ``start``), one thread; every transaction timed.  ops = puts.  ``whole``: all
    ``count``, whatever the time budget (a row that must run long enough)."""
    batches = _chunks(distinct_items(count * puts, ctx.value_bytes, start), puts)
    write = ctx.peer.write
    sample = timed(lambda i: write(batches[i]), count, 1e9 if whole else ctx.budget,
                   ops_per_step=puts, latencies=True)
    _check(ctx, batches[0][0])
    return sample


def thread_commits(ctx: Context, count: int, threads: int) -> Sample:
    """Single-put commits of new distinct keys from ``threads`` threads at once."""
    batches = _singles(distinct_items(count, ctx.value_bytes))

    def make_step():                   # runs in the worker thread (its own connection)
        write = ctx.peer.thread_writer()
        return lambda i: write(batches[i])

    sample = threaded(make_step, count, threads, ctx.budget)
    _check(ctx, batches[0][0])
    return sample


def bulk_load(ctx: Context, items: list[Item]) -> Sample:
    """All of items in one transaction through the system's bulk call (timed whole,
    commit included); reports which call was used."""
    start = time.perf_counter()
    method = ctx.peer.bulk(items)
    seconds = time.perf_counter() - start
    last: dict[bytes, bytes] = dict(items)
    _check(ctx, items[-1])
    return Sample(len(items), seconds, extra={"method": method, "distinct_keys": len(last)})


def point_reads(ctx: Context, keys: int, reads: int, reopen: bool) -> Sample:
    """Load ``keys`` distinct keys (untimed), then read random existing keys outside any
    transaction.  reopen: close and reopen first, so reads come from the files (for
    walstore: from LMDB, not the overlay of recent commits); else load with transactions
    of 100 puts and read at once (fresh commits)."""
    items = distinct_items(keys, ctx.value_bytes)
    if reopen:
        for batch in _chunks(items, LOAD_BATCH):
            ctx.peer.bulk(batch)
        ctx.peer.reopen()
    else:
        for batch in _chunks(items, 100):
            ctx.peer.write(batch)
    rng = random.Random(4)
    wanted = [items[rng.randrange(keys)] for _ in range(reads)]
    _check(ctx, wanted[0])
    get = ctx.peer.get
    keys_wanted = [k for k, _ in wanted]
    return timed(lambda i: get(keys_wanted[i]), reads, ctx.budget)


def savepoint_txns(ctx: Context, count: int) -> Sample:
    """Each transaction: put, savepoint, put, roll back to the savepoint, commit."""
    keep = distinct_items(count, ctx.value_bytes)
    discard = distinct_items(count, ctx.value_bytes, start=count)
    write = ctx.peer.savepoint_write
    sample = timed(lambda i: write(keep[i], discard[i]), count, ctx.budget, latencies=True)
    _check(ctx, keep[0])
    if ctx.peer.get(discard[0][0]) is not None:
        raise RuntimeError(f"{ctx.system}: a rolled-back put is visible")
    return sample


def held_open(ctx: Context, keys: int, count: int) -> Sample:
    """``keys`` distinct keys written first (transactions of 1,000, untimed, with the
    held transaction, if any, already open, then applied and checkpointed), then
    ``count`` timed single-put commits of new keys.  The same for both systems; only the held transaction differs."""
    start = time.perf_counter()
    for batch in _chunks(distinct_items(keys, ctx.value_bytes), 1_000):
        ctx.peer.write(batch)
    settle = getattr(ctx.peer, "settle", None)
    if settle is not None:  # the preload applied and checkpointed before the timing: the
        settle()            # close counted in the rate is then the timed commits' own
    preload = time.perf_counter() - start  # (its apply was 90% of the row's time)
    sample = commits(ctx, count, start=keys)
    held = getattr(ctx.peer, "held", None)
    extra = {"distinct_keys_written": keys + sample.ops, "preload_s": round(preload, 2),
             "held_open": held is not None}
    return Sample(sample.ops, sample.seconds, sample.latencies, extra)


# --------------------------------------------------------------------------- the suite

def _workload(id: str, systems: tuple[str, ...], body: Callable[[Context], Sample],
              part: Part) -> Workload:
    """A workload of one part, run with the part's value size."""
    return Workload(id, systems, body, (part,), value_bytes=part.value_bytes or 0)


def _part(id: str, title: str, unit: str, key_space: str, value_bytes: int = VALUE_BYTES,
          **kw) -> Part:
    return Part(id, title, unit, key_space, f"{value_bytes:,} B, fresh random",
                value_bytes=value_bytes, **kw)


DURABLE = ("walstore", "sqlite-full", "lmdb-sync")
FULL_SQLITE = ("sqlite-full",)


def all_workloads(p: Profile) -> list[Workload]:
    """Every workload, sized by p, in the order they run."""
    lg_size = (f"{p.lg_threads} conversation threads x {p.lg_turns} turns "
               "(each turn: human, AI with a tool call, tool result, AI answer)")
    lg_values = "messages of 100-400 chars; the state grows by 4 messages per turn"
    return [
        _workload("put-1t", DURABLE + ("bare", "bare-paced", "python-floor"),
                  partial(commits, count=p.commits),
                  _part("put-1t", "durable single-put commits, 1 thread", "commits/s",
                        f"up to {p.commits:,} distinct keys (a new key per commit)",
                        baseline=FULL_SQLITE, latency=True)),
        _workload("put-8t", ("walstore", "sqlite-full", "sqlite-full-per-thread",
                             "lmdb-sync"),
                  partial(thread_commits, count=p.thread_commits, threads=p.threads),
                  _part("put-8t", f"durable single-put commits, {p.threads} threads",
                        "commits/s", f"up to {p.thread_commits:,} distinct keys "
                        "(a new key per commit)",
                        baseline=("sqlite-full", "sqlite-full-per-thread"), latency=True)),
        _workload("normal", ("walstore-normal", "sqlite-normal"),
                  partial(commits, count=p.normal_commits),
                  _part("normal", 'single-put commits, durability="normal"', "commits/s",
                        f"up to {p.normal_commits:,} distinct keys (a new key per commit)",
                        baseline=("sqlite-normal",), latency=True)),
        _workload("txn-100", DURABLE, partial(commits, count=p.txn100_txns, puts=100),
                  _part("txn-100", "durable transactions of 100 puts", "puts/s",
                        f"up to {p.txn100_txns * 100:,} distinct keys",
                        baseline=FULL_SQLITE, latency=True)),
        _workload("bulk", DURABLE,
                  lambda ctx: bulk_load(ctx, distinct_items(p.bulk_keys, ctx.value_bytes)),
                  _part("bulk", f"bulk load, {p.bulk_keys:,} puts in one durable "
                        "transaction", "puts/s",
                        f"{p.bulk_keys:,} distinct keys into an empty store",
                        baseline=FULL_SQLITE)),
        _workload("bulk-overwrite", DURABLE,
                  lambda ctx: bulk_load(ctx, overwrite_items(p.bulk_keys, p.overwrite_keys,
                                                             ctx.value_bytes)),
                  _part("bulk-overwrite", f"overwrite-heavy bulk, {p.bulk_keys:,} puts in "
                        "one durable transaction", "puts/s",
                        f"{p.overwrite_keys:,} keys, each written "
                        f"{p.bulk_keys // max(1, p.overwrite_keys)} times in the transaction",
                        baseline=FULL_SQLITE)),
        _workload("reads", DURABLE,
                  partial(point_reads, keys=p.read_keys, reads=p.reads, reopen=True),
                  _part("reads", "point reads, reopened store, outside a transaction",
                        "reads/s", f"random existing keys of {p.read_keys:,} distinct keys "
                        "loaded, then the store closed and reopened",
                        baseline=FULL_SQLITE)),
        _workload("reads-fresh", DURABLE,
                  partial(point_reads, keys=p.fresh_keys, reads=p.reads, reopen=False),
                  _part("reads-fresh", "point reads of fresh commits, outside a transaction",
                        "reads/s", f"random keys of {p.fresh_keys:,} distinct keys "
                        "committed (100 per transaction) just before", baseline=FULL_SQLITE)),
        _workload("savepoint", DURABLE, partial(savepoint_txns, count=p.commits),
                  _part("savepoint", "durable txn: put, savepoint, put, rollback-to, commit",
                        "txns/s", f"up to {2 * p.commits:,} distinct keys (half rolled back)",
                        baseline=FULL_SQLITE, latency=True)),
        _workload("tail-2k", ("walstore", "bare", "bare-paced"), partial(commits, count=p.tail_commits),
                  _part("tail-2k", "commit latency, durable single-put commits, 2 KiB values",
                        "commits/s", f"up to {p.tail_commits:,} distinct keys",
                        value_bytes=2048, baseline=("bare",), ratio_on="p99.9",
                        latency=True)),
        _workload("tail-sustained", ("walstore", "bare"),
                  partial(commits, count=p.sustained_commits, whole=True),
                  _part("tail-sustained", "commit latency, durable single-put commits, 2 KiB "
                        f"values, {p.sustained_commits:,} in a row "
                        f"({p.sustained_commits * 2 // 1024} MiB of values: walstore writes "
                        "LMDB and checkpoints during the run)",
                        "commits/s", f"up to {p.sustained_commits:,} distinct keys",
                        value_bytes=2048, baseline=("bare",), ratio_on="p99.9",
                        latency=True)),
        _workload("held-open", ("walstore-normal", "walstore-normal-held"),
                  partial(held_open, keys=p.held_keys, count=p.held_commits),
                  _part("held-open", 'single-put commits, durability="normal", with one '
                        "transaction held open (begun, read a key, never finished) vs none",
                        "commits/s", f"{p.held_keys:,} distinct keys written first, then up "
                        f"to {p.held_commits:,} commits of new keys",
                        baseline=("walstore-normal",), latency=True)),
        Workload("lg-sync", ("walstore-saver", "sqlite-saver", "memory-saver"),
                 partial(graphs.invoke_sync, threads=p.lg_threads, turns=p.lg_turns,
                         state_reads=p.lg_state_reads),
                 (Part("lg-sync", "LangGraph invoke (its default durability), one caller", "invokes/s",
                       lg_size, lg_values, baseline=("sqlite-saver",), latency=True),
                  Part("lg-sync-state", "LangGraph get_state after the run", "calls/s",
                       f"random threads of the {p.lg_threads}", lg_values,
                       baseline=("sqlite-saver",), latency=True)),
                 isolated=True, requires=graphs.REQUIRES_SYNC, max_rounds=p.lg_repeats),
        Workload("lg-async", ("walstore-saver-async", "async-sqlite-saver", "memory-saver-async"),
                 partial(graphs.invoke_async, threads=p.lg_threads, turns=p.lg_turns,
                         concurrency=p.lg_concurrency, state_reads=p.lg_state_reads),
                 (Part("lg-async", f"LangGraph ainvoke (its default durability), "
                       f"{p.lg_concurrency} conversations at once", "invokes/s", lg_size, lg_values,
                       baseline=("async-sqlite-saver",), latency=True),
                  Part("lg-async-state", "LangGraph aget_state after the run", "calls/s",
                       f"random threads of the {p.lg_threads}", lg_values,
                       baseline=("async-sqlite-saver",), latency=True)),
                 isolated=True, requires=graphs.REQUIRES_ASYNC, max_rounds=p.lg_repeats),
        *longrun.workloads(p),
    ]


ALWAYS = "put-1t"                     # carries the physical-limit row: in every run

TARGETS: tuple[Target, ...] = (
    Target("durable 1-put commits vs the bare pwrite+fdatasync loop", "issue 15",
           ("put-1t", "walstore"), ("put-1t", ("bare",)), ">=", 0.95,
           beside=("put-1t", ("bare-paced",))),
    Target("8 threads durable vs SQLite FULL single-thread", "issue 15",
           ("put-8t", "walstore"), ("put-1t", ("sqlite-full",)), ">=", 2.5,
           beside=("put-8t", ("sqlite-full", "sqlite-full-per-thread"))),
    Target('durability="normal" vs SQLite NORMAL', "issue 15",
           ("normal", "walstore-normal"), ("normal", ("sqlite-normal",)), ">=", 1.5),
    Target("bulk 100k distinct keys vs SQLite executemany", "issue 15",
           ("bulk", "walstore"), ("bulk", ("sqlite-full",)), ">=", 1.5),
    Target("point reads (reopened) vs SQLite autocommit", "issue 15",
           ("reads", "walstore"), ("reads", ("sqlite-full",)), ">=", 3.0),
    Target("point reads (reopened) vs raw LMDB, txn per get", "issue 15",
           ("reads", "walstore"), ("reads", ("lmdb-sync",)), ">=", 0.4),
    Target("savepoint-rollback txn vs SQLite", "issue 15",
           ("savepoint", "walstore"), ("savepoint", ("sqlite-full",)), ">=", 1.3),
    Target("p99.9 commit latency, durable, 2 KiB values, vs the bare loop",
           "issue 15, issue 10", ("tail-2k", "walstore"), ("tail-2k", ("bare",)), "<=", 2.0,
           metric="p99.9", beside=("tail-2k", ("bare-paced",))),
    Target("p99.9 commit latency, sustained: LMDB written and checkpoints during the run",
           "issue 10", ("tail-sustained", "walstore"), ("tail-sustained", ("bare",)), "<=",
           2.0, metric="p99.9"),
    Target("commit throughput, one transaction held open vs none (within 1.2x)",
           "issue 10", ("held-open", "walstore-normal-held"),
           ("held-open", ("walstore-normal",)), ">=", round(1 / 1.2, 3)),
    Target("LangGraph sync invoke vs SqliteSaver (latency at most 1.0x)", "issue 14",
           ("lg-sync", "walstore-saver"), ("lg-sync", ("sqlite-saver",)), ">=", 1.0),
    Target("LangGraph async invoke vs AsyncSqliteSaver (3x faster)", "issue 14",
           ("lg-async", "walstore-saver-async"), ("lg-async", ("async-sqlite-saver",)),
           ">=", 3.0),
)

QUICK = Profile(
    mode="quick", repeats=2, budget=0.5, commits=2_000, tail_commits=3_000, threads=8,
    thread_commits=3_000, normal_commits=8_000, txn100_txns=100, bulk_keys=100_000,
    overwrite_keys=10_000, read_keys=20_000, reads=100_000, fresh_keys=5_000,
    held_keys=70_000, held_commits=3_000, lg_threads=6, lg_turns=4, lg_concurrency=3,
    lg_state_reads=30, lg_repeats=2, recovery_bytes=(2 * MB,), recovery_budget=10.0,
    steady_commits=60_000, steady_budget=4.0,
    steady_tuning=(("checkpoint_bytes", 2 * MB), ("segment_size", MB)),
    sustained_commits=20_000)
FULL = Profile(
    mode="full", repeats=5, budget=10.0, commits=10_000, tail_commits=10_000, threads=8,
    thread_commits=16_000, normal_commits=50_000, txn100_txns=1_000, bulk_keys=100_000,
    overwrite_keys=10_000, read_keys=100_000, reads=500_000, fresh_keys=20_000,
    held_keys=100_000, held_commits=20_000, lg_threads=200, lg_turns=50, lg_concurrency=50,
    lg_state_reads=1_000, lg_repeats=3, recovery_bytes=(10 * MB, 100 * MB, 1024 * MB),
    recovery_budget=900.0, steady_commits=1_000_000, steady_budget=900.0,
    sustained_commits=60_000)
