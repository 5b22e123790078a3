"""Reversible files: the cost of watching a `make`-like subprocess, against git as the
undo mechanism (issue 12).

One tree of N files (default 20,000, in directories of 50, 0.5-4 KiB of text each,
mtimes an hour old as after a checkout) is made twice: one copy for walstore's library
(``walstore.files``), one for git.  Each round runs the same subprocess, which touches 50
files (appends to 40, deletes 5, creates 5 build outputs), and undoes it:

- walstore: a manifest snapshot before (incremental: the before-images of everything
  the subprocess may touch are in the blob store), one after, ``diff``, then
  ``restore_changes`` (the rollback);
- git: ``git add -A && git commit`` before (a checkpoint of a possibly dirty tree),
  ``git status --porcelain`` after, then ``git stash -u`` or ``git reset --hard && git
  clean -fd`` (the rollback).

The same rounds run through a store too (``store:`` rows): ``tx.files(ws).watch()``
around the subprocess and ``tx.rollback()``, with their durable records (durability
"full").

It also measures the first snapshot against the initial ``git add -A && git commit``,
and the growth of walstore's blob store vs ``.git`` per edited MiB (then the same edit
again: deduplicated).  Times are medians over the rounds; ratios are walstore / git
(below 1: walstore is cheaper).  Short by default; prints a markdown table.

    python bench/files.py [--files N] [--rounds R] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from walstore.files import BlobStore, Workspace, diff, restore_changes, snapshot  # noqa: E402

TOUCHED = 50
MAKE = r"""
import os, sys
root, r = sys.argv[1], int(sys.argv[2])
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "src"))
               for f in fs)
step = max(1, len(files) // 50)
pick = files[r % step::step][:45]
for p in pick[:40]:
    with open(p, "a") as f:
        f.write("// rebuilt in round %d\n" % r)
for p in pick[40:45]:
    os.unlink(p)
os.makedirs(os.path.join(root, "build"), exist_ok=True)
for i in range(5):
    with open(os.path.join(root, "build", "out%d.o" % i), "w") as f:
        f.write("object %d of round %d\n" % (i, r))
"""


def make_tree(root: str, n: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    total = 0
    for i in range(n):
        d = os.path.join(root, "src", f"d{i // 50:04d}")
        if i % 50 == 0:
            os.makedirs(d, exist_ok=True)
        data = rng.randbytes(rng.randint(256, 2048)).hex().encode() + b"\n"
        with open(os.path.join(d, f"f{i:05d}.c"), "wb") as f:
            f.write(data)
        total += len(data)
    old = time.time() - 3600
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (old, old))
    return total


def run_make(root: str, r: int) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", MAKE, root, str(r)], check=True)
    return time.perf_counter() - t


def git(root: str, *args: str) -> None:
    subprocess.run(["git", "-c", "gc.auto=0", *args], cwd=root, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def git_out(root: str, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True).stdout


def du(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def bench_walstore(root: str, store: str, rounds: int) -> dict:
    ws = Workspace(root)
    blobs = BlobStore(os.path.join(store, "blobs"))
    res: dict = {"pre": [], "post": [], "rollback": [], "make": [], "hashed": [],
                 "changes": []}
    m, res["first"] = timed(snapshot, ws, blobs)
    res["first_files"] = m.stats.hashed_files
    for r in range(rounds):
        m0, t_pre = timed(snapshot, ws, blobs, previous=m)
        res["make"].append(run_make(root, r))
        t = time.perf_counter()
        m1 = snapshot(ws, blobs, previous=m0)
        changes = diff(m0, m1)
        t_post = time.perf_counter() - t
        conflicts, t_back = timed(restore_changes, ws, changes, blobs,
                                  os.path.join(store, "quarantine"))
        assert not conflicts, conflicts
        assert len(changes) >= TOUCHED, len(changes)
        res["pre"].append(t_pre)
        res["post"].append(t_post)
        res["rollback"].append(t_back)
        res["hashed"].append(m1.stats.hashed_files + m0.stats.hashed_files)
        res["changes"].append(len(changes))
        m = m1
    res["blobs"] = blobs
    res["ws"] = ws
    res["last"] = m
    return res


def bench_store(root: str, store_dir: str, rounds: int) -> dict:
    """The same rounds through a store (durability "full"): ``tx.files(ws).watch()``
    around the subprocess (before: manifest snapshot + save + a durable WATCH_BEGIN;
    after: snapshot + diff + FILE_STEPS + a durable WATCH_END), then ``tx.rollback()``
    (a durable ABORT, the undo, a durable FILE_RESTORED).  The first transaction's watch
    pays the first snapshot."""
    import walstore
    res: dict = {"pre": [], "post": [], "rollback": [], "changes": []}
    store = walstore.open(store_dir, durability="full")
    try:
        ws = store.workspace(root)
        with store.transaction() as tx:
            t = time.perf_counter()
            with tx.files(ws).watch():
                res["first"] = time.perf_counter() - t
        for r in range(rounds):
            tx = store.transaction()
            cm = tx.files(ws).watch()
            t = time.perf_counter()
            w = cm.__enter__()
            res["pre"].append(time.perf_counter() - t)
            run_make(root, r)
            t = time.perf_counter()
            cm.__exit__(None, None, None)
            res["post"].append(time.perf_counter() - t)
            t = time.perf_counter()
            tx.rollback()
            res["rollback"].append(time.perf_counter() - t)
            res["changes"].append(len(w.changes))
            assert len(w.changes) >= TOUCHED, len(w.changes)
    finally:
        store.close()
    return res


def bench_git(root: str, rounds: int) -> dict:
    res: dict = {"pre": [], "post": [], "stash": [], "reset": []}
    t = time.perf_counter()
    git(root, "init", "-q")
    git(root, "-c", "user.email=b@x", "-c", "user.name=b", "add", "-A")
    git(root, "-c", "user.email=b@x", "-c", "user.name=b", "commit", "-q", "-m", "init")
    res["first"] = time.perf_counter() - t
    for variant in ("stash", "reset"):
        for r in range(rounds):
            t = time.perf_counter()
            git(root, "add", "-A")
            git(root, "-c", "user.email=b@x", "-c", "user.name=b", "commit", "-q",
                "--allow-empty", "-m", f"checkpoint {r}")
            res["pre"].append(time.perf_counter() - t)
            run_make(root, r)
            t = time.perf_counter()
            out = git_out(root, "status", "--porcelain", "-uall")
            res["post"].append(time.perf_counter() - t)
            assert len(out.splitlines()) >= TOUCHED
            t = time.perf_counter()
            if variant == "stash":
                git(root, "stash", "push", "-u", "-q")
            else:
                git(root, "reset", "--hard", "-q")
                git(root, "clean", "-fdq")
            res[variant].append(time.perf_counter() - t)
            assert git_out(root, "status", "--porcelain") == b""
    return res


def growth(w: dict, git_root: str, files: int) -> dict:
    """Blob store vs .git growth for ~1 MiB of edits (16 files x 64 KiB of text), then
    the same content written again elsewhere (dedup)."""
    rng = random.Random(99)
    edits = [rng.randbytes(32 * 1024).hex().encode() for _ in range(16)]
    edited = sum(len(e) for e in edits)
    out = {"edited": edited}
    ws, blobs = w["ws"], w["blobs"]
    targets = [f"src/d{(i * 7) % (files // 50):04d}/big{i}.c" for i in range(16)]
    again = [f"src/d{(i * 11) % (files // 50):04d}/copy{i}.c" for i in range(16)]
    for label, paths in (("first", targets), ("again", again)):
        for root in (ws.root, git_root):
            for p, data in zip(paths, edits):
                with open(os.path.join(root, p), "wb") as f:
                    f.write(data)
        before = blobs.disk_usage()
        w["last"] = snapshot(ws, blobs, previous=w["last"])
        out[f"walstore_{label}"] = blobs.disk_usage() - before
        before = du(os.path.join(git_root, ".git"))
        git(git_root, "add", "-A")
        git(git_root, "-c", "user.email=b@x", "-c", "user.name=b", "commit", "-q", "-m", label)
        out[f"git_{label}"] = du(os.path.join(git_root, ".git")) - before
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args()
    base = args.keep or tempfile.mkdtemp(prefix="walstore-bench-files-")
    os.makedirs(base, exist_ok=True)
    try:
        wroot, groot = os.path.join(base, "ws"), os.path.join(base, "git")
        size = make_tree(wroot, args.files)
        shutil.copytree(wroot, groot, copy_function=shutil.copy2, symlinks=True)
        print(f"tree: {args.files:,} files, {size / 2**20:.1f} MiB; {args.rounds} rounds; "
              f"a subprocess touching {TOUCHED} files", flush=True)
        w = bench_walstore(wroot, os.path.join(base, "store"), args.rounds)
        st = bench_store(wroot, os.path.join(base, "agent-store"), args.rounds)
        g = bench_git(groot, args.rounds)
        gr = growth(w, groot, args.files)
        med = statistics.median
        w_over = med(a + b for a, b in zip(w["pre"], w["post"]))
        g_over = med(a + b for a, b in zip(g["pre"], g["post"]))
        rows = [
            ("first snapshot / initial add+commit", w["first"], g["first"]),
            ("before the subprocess (snapshot / add -A + commit)", med(w["pre"]), med(g["pre"])),
            ("after it (snapshot + diff / status)", med(w["post"]), med(g["post"])),
            ("watch overhead (before + after)", w_over, g_over),
            ("rollback (restore_changes / stash -u)", med(w["rollback"]), med(g["stash"])),
            ("rollback (restore_changes / reset --hard + clean -fd)", med(w["rollback"]),
             med(g["reset"])),
            ("store: first watch() / initial add+commit", st["first"], g["first"]),
            ("store: watch() overhead (enter + exit) / add+commit + status",
             med(a + b for a, b in zip(st["pre"], st["post"])), g_over),
            ("store: tx.rollback() of the watch / stash -u", med(st["rollback"]),
             med(g["stash"])),
            ("store: tx.rollback() of the watch / reset --hard + clean -fd",
             med(st["rollback"]), med(g["reset"])),
        ]
        print()
        print("| measure | walstore.files | git | walstore / git |")
        print("|---|---:|---:|---:|")
        for name, a, b in rows:
            print(f"| {name} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {a / b:.2f} |")
        mib = gr["edited"] / 2**20
        for label, what in (("first", "edited content"), ("again", "the same content again")):
            a, b = gr[f"walstore_{label}"] / mib, gr[f"git_{label}"] / mib
            print(f"| store growth per edited MiB ({what}) | {a / 2**20:.2f} MiB | "
                  f"{b / 2**20:.2f} MiB | {a / b:.2f} |" if b else
                  f"| store growth per edited MiB ({what}) | {a / 2**20:.2f} MiB | "
                  f"{b / 2**20:.2f} MiB | - |")
        print()
        print(f"subprocess alone: {med(w['make']) * 1000:.0f} ms; files hashed per round "
              f"(before + after snapshots): {w['hashed']}; changes per round: "
              f"{w['changes']}; first snapshot hashed {w['first_files']:,} files")
        print("walstore stores content uncompressed (sha256-addressed, deduplicated); git "
              "stores zlib-compressed objects. Edits are hex text (compressible about 2x).")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
