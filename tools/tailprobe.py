"""Why were some commits slow?  The slowest durable commits of a run, and what ran beside each.

A p99.9 is a count of bad moments, and each has a cause: the disk answering one fdatasync
late, a segment rotation's extra syncs, a pass of Python's cyclic garbage collector, an
LMDB commit flushing its pages beside the WAL's fdatasync, the applier's Python holding
the GIL when the committer's fdatasync returned, the background zero-fill of the next WAL
segment.  This tool runs ``--commits`` single-put commits (``--value-bytes`` of random
bytes each, a new key each, durability "full" unless told) into a new store, timing each,
and records beside them:

- every fsync, fdatasync, directory fsync and spare write-back walstore did, with the
  thread that did it: through walstore's own file-I/O seam (``walstore.fileio.set_backend``,
  the seam the fault tools use; a timing backend changes no behaviour);
- each LMDB write transaction of the applier, split where its commit (the page flush)
  begins (``LmdbState.write`` wrapped for the run);
- each pass of the garbage collector (``gc.callbacks``), with its generation.

Then each of the slowest commits (``--top``, default a tenth of a percent of the run and at
least 10) is given the causes that overlap it: ``rotation`` (the committing thread synced
more than once), ``lmdb-flush``, ``applier-python``, ``spare-fill``, ``gc-gen0/1/2``; with
none of those, ``slow-fsync`` when its own fdatasync took over 3x the run's median (the
disk), and ``cpu`` when its time outside its syncs was over 3x the run's median (Python
work on the commit path itself, a dict growing, say, or waiting for a core or the GIL).

    python tools/tailprobe.py --commits 10000 --value-bytes 2048          # a burst
    python tools/tailprobe.py --commits 60000 --value-bytes 2048 --json   # LMDB written too
    python tools/tailprobe.py --commits 60000 --set max_unapplied_bytes=1073741824  # or not

What it found on this project's machines is in bench/results/PROFILE.md (34th round).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402
from walstore.engine import lmdb_state  # noqa: E402

CAUSES = ("rotation", "lmdb-flush", "applier-python", "spare-fill", "gc-gen0", "gc-gen1",
          "gc-gen2", "slow-fsync", "cpu")
_now = time.perf_counter_ns


@dataclass
class Timeline:
    """What happened during the run, as (start_ns, end_ns, ...) intervals."""
    syncs: list = field(default_factory=list)        # (start, end, thread ident, kind)
    fills: list = field(default_factory=list)        # (start, end): spare write-backs
    lmdb: list = field(default_factory=list)         # (start, commit start, end)
    gcs: list = field(default_factory=list)          # (start, end, generation)
    commits: list = field(default_factory=list)      # (start, end)


class _TimingBackend(fileio.OSBackend):
    """The real calls, each sync and write-back timestamped with its thread."""

    def __init__(self, timeline: Timeline) -> None:
        self.t = timeline

    def _timed(self, kind: str, call, *args):
        start = _now()
        try:
            return call(*args)
        finally:
            self.t.syncs.append((start, _now(), threading.get_ident(), kind))

    def fsync(self, fd: int) -> None:
        self._timed("fsync", super().fsync, fd)

    def fdatasync(self, fd: int) -> None:
        self._timed("fdatasync", super().fdatasync, fd)

    def fsync_dir(self, path: str) -> None:
        self._timed("fsync_dir", super().fsync_dir, path)

    def write_back(self, fd: int, offset: int, length: int) -> bool:
        start = _now()
        try:
            return super().write_back(fd, offset, length)
        finally:
            self.t.fills.append((start, _now()))


def _overlaps(intervals, a: int, b: int) -> list:
    return [iv for iv in intervals if iv[0] < b and iv[1] > a]


def attribute(t: Timeline, main: int, top: int) -> list[dict]:
    """The ``top`` slowest commits of ``t``, slowest first, each with its causes."""
    own = sorted((s for s in t.syncs if s[2] == main), key=lambda s: s[0])
    durations = sorted(s[1] - s[0] for s in own) or [0]
    median_sync = durations[len(durations) // 2]
    outside = sorted(_outside_syncs(t.commits, own)) or [0]
    median_cpu = outside[len(outside) // 2]
    flushes = [(c, e) for _, c, e in t.lmdb]
    pythons = [(s, c) for s, c, _ in t.lmdb]
    slowest = sorted(range(len(t.commits)), key=lambda i: t.commits[i][0] - t.commits[i][1])
    rows = []
    for i in slowest[:top]:
        a, b = t.commits[i]
        mine = [s for s in _overlaps(own, a, b) if s[0] >= a and s[1] <= b]
        causes = []
        if len(mine) > 1:
            causes.append("rotation")
        if _overlaps(flushes, a, b):
            causes.append("lmdb-flush")
        if _overlaps(pythons, a, b):
            causes.append("applier-python")
        if _overlaps(t.fills, a, b):
            causes.append("spare-fill")
        causes += sorted({f"gc-gen{g[2]}" for g in _overlaps(t.gcs, a, b)})
        synced = sum(s[1] - s[0] for s in mine)
        if not causes:  # nothing else of walstore's beside it: the disk, or the CPU
            last = mine[-1][1] - mine[-1][0] if mine else 0
            if last > 3 * median_sync:
                causes.append("slow-fsync")
            if (b - a) - synced > 3 * median_cpu or last <= 3 * median_sync:
                causes.append("cpu")
        rows.append({"commit": i, "us": round((b - a) / 1000), "own_syncs_us":
                     [round((s[1] - s[0]) / 1000) for s in mine],
                     "outside_syncs_us": round(((b - a) - synced) / 1000), "causes": causes})
    return rows


def _outside_syncs(commits: list, own: list) -> list[int]:
    """Per commit: its time not spent in its own thread's syncs (own sorted by start)."""
    out, j = [], 0
    for a, b in commits:
        while j < len(own) and own[j][0] < a:
            j += 1
        synced, k = 0, j
        while k < len(own) and own[k][0] < b:
            synced += own[k][1] - own[k][0]
            k += 1
        out.append((b - a) - synced)
    return out


def run(commits: int, value_bytes: int, durability: str = "full", directory: str | None = None,
        top: int | None = None, options: dict | None = None) -> dict:
    """Run the workload and return the report (see the module docstring); ``options``:
    the store's tuning options (``walstore.options.Options``), passed to ``open``."""
    if commits < 1 or value_bytes < 0:
        raise ValueError("--commits must be at least 1 and --value-bytes at least 0")
    t = Timeline()
    main = threading.get_ident()
    if directory:  # (a --dir not made yet is made, 0700, as the store's own are)
        os.makedirs(directory, mode=0o700, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walstore-tailprobe-", dir=directory)
    previous = fileio.set_backend(_TimingBackend(t))
    real_write = lmdb_state.LmdbState.write
    real_lmdb_io = fileio.lmdb_io
    commit_start: dict[int, int] = {}

    def lmdb_io(op: str, path: str) -> None:
        if op == "commit":
            commit_start[threading.get_ident()] = _now()
        real_lmdb_io(op, path)

    def write(self, fn) -> None:  # (the applier's LMDB transactions, timed)
        start = _now()
        commit_start.pop(threading.get_ident(), None)
        try:
            return real_write(self, fn)
        finally:
            end = _now()
            t.lmdb.append((start, commit_start.pop(threading.get_ident(), end), end))

    gc_start: list[int] = [0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = _now()
        else:
            t.gcs.append((gc_start[0], _now(), info["generation"]))

    fileio.lmdb_io, lmdb_state.LmdbState.write = lmdb_io, write  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)
    try:
        store = walstore.open(os.path.join(base, "store"), durability=durability,
                              **(options or {}))
        try:
            items = [(b"k%010d" % i, os.urandom(value_bytes)) for i in range(commits)]
            for k, v in items:
                a = _now()
                with store.transaction() as tx:
                    tx.put(k, v)
                t.commits.append((a, _now()))
            rotations = store.stats().get("wal_rotations")
        finally:
            store.close()
    finally:
        gc.callbacks.remove(on_gc)
        fileio.lmdb_io, lmdb_state.LmdbState.write = real_lmdb_io, real_write  # type: ignore
        fileio.set_backend(previous)
        shutil.rmtree(base, ignore_errors=True)
    lat = sorted((b - a) / 1000 for a, b in t.commits)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1)

    if top is None:
        top = max(10, commits // 1000)
    slow = attribute(t, main, min(top, commits))
    return {"commits": commits, "value_bytes": value_bytes, "durability": durability,
            "p50_us": pct(0.5), "p99_us": pct(0.99), "p99.9_us": pct(0.999),
            "max_us": round(lat[-1], 1), "rotations": rotations,
            "lmdb_commits": len(t.lmdb),
            "lmdb_flush_ms": round(sum(e - c for _, c, e in t.lmdb) / 1e6, 1),
            "applier_python_ms": round(sum(c - s for s, c, _ in t.lmdb) / 1e6, 1),
            "gc_passes": dict(Counter(f"gen{g[2]}" for g in t.gcs)),
            "causes_of_slowest": dict(Counter(c for row in slow for c in row["causes"])),
            "slowest": slow}


def _options(pairs: list[str]) -> dict:
    """``NAME=VALUE`` pairs as open()'s options (an int, else a float, else the string)."""
    out: dict = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes OPTION=VALUE, not {pair!r}")
        for kind in (int, float):
            try:
                out[name] = kind(raw)
                break
            except ValueError:
                continue
        else:
            out[name] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--value-bytes", type=int, default=2048)
    ap.add_argument("--durability", choices=("full", "normal", "none"), default="full")
    ap.add_argument("--top", type=int, default=None,
                    help="how many of the slowest commits to explain (default: 0.1%%, >= 10)")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a store option for the run, e.g. max_unapplied_bytes=536870912 "
                         "(repeatable; see walstore/options.py)")
    ap.add_argument("--dir", default=None, help="where the store is made (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = run(args.commits, args.value_bytes, args.durability, args.dir, args.top,
                     _options(args.set))
    except (ValueError, TypeError, walstore.WalstoreError, OSError) as e:
        print(f"tailprobe: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['commits']} commits of {report['value_bytes']} B ({report['durability']}): "
          f"p50 {report['p50_us']} us, p99 {report['p99_us']} us, p99.9 {report['p99.9_us']} "
          f"us, max {report['max_us']} us; {report['rotations']} rotations, "
          f"{report['lmdb_commits']} LMDB commits ({report['lmdb_flush_ms']} ms flushing, "
          f"{report['applier_python_ms']} ms of applier Python), GC passes "
          f"{report['gc_passes']}")
    print("causes among the slowest:", report["causes_of_slowest"])
    for row in report["slowest"]:
        print(f"  #{row['commit']:>7} {row['us']:>7} us  own syncs {row['own_syncs_us']} us, "
              f"{row['outside_syncs_us']} us outside them: {', '.join(row['causes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
