"""The agent-layer model checker, searched longer than CI does.

``tests/test_agent_model.py`` holds hypothesis state machines that drive two agents
through transactions, charges against an outside ledger (refunds as compensations),
savepoints, conflicts, two-phase commit, restore points, reverts, rewinds, outages of the
refund service, checkpoints and crashes, and check after every step that the recorded
state and the ledger agree (variants: files mirrored in workspaces, disk faults under
durability="full", history retention, copies restored from a replica).  CI runs a few
dozen examples of each; this runs as many as asked, over several seeds, one process per
seed, and prints each seed's outcome (a failure prints hypothesis's minimal example).

    python tools/agentmodel.py --examples 1500 --seeds 1,2 --only Fault   # exit 0: clean
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("Agent", "Files", "Fault", "Retention", "Scope", "Replica")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=1000,
                    help="examples per state machine and seed (CI: 15-60)")
    ap.add_argument("--seeds", default="1", help="comma-separated hypothesis seeds")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated models, of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="seeds run at once")
    args = ap.parse_args(argv)
    if args.examples < 1:
        ap.error("--examples must be at least 1")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds takes integers separated by commas, not {args.seeds!r}")
    if not seeds:
        ap.error("--seeds names no seed")
    only = [m.strip() for m in (args.only or ",".join(MODELS)).split(",") if m.strip()]
    unknown = [m for m in only if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    selector = " or ".join(f"Test{m}Model" for m in only)
    env = dict(os.environ, WALSTORE_MODEL_EXAMPLES=str(args.examples))
    pending = list(seeds)
    running: list[tuple[int, subprocess.Popen, float, Any]] = []
    failed = 0
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            seed = pending.pop(0)
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
                   "-p", "no:cacheprovider", str(ROOT / "tests" / "test_agent_model.py"),
                   "-k", selector, f"--hypothesis-seed={seed}"]
            out = tempfile.TemporaryFile("w+")  # (not a pipe: a long failure report
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,  # would fill it)
                                    stdout=out, stderr=subprocess.STDOUT)
            running.append((seed, proc, time.monotonic(), out))
            print(f"seed {seed}: started ({args.examples} examples of {', '.join(only)})",
                  flush=True)
        done = [r for r in running if r[1].poll() is not None]
        if not done:
            time.sleep(0.5)
            continue
        for seed, proc, started, out in done:
            running.remove((seed, proc, started, out))
            took = time.monotonic() - started
            if proc.returncode == 0:
                print(f"seed {seed}: clean in {took:.0f} s", flush=True)
            else:
                failed += 1
                out.seek(0)
                print(f"seed {seed}: FAILED (exit {proc.returncode}) in {took:.0f} s\n"
                      f"{out.read()}", flush=True)
            out.close()
    print(f"{len(seeds)} seed(s), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
