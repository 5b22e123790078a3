#!/usr/bin/env python3
"""Run walstore's benchmark suite against its peers and write the results.

A full run writes ``bench/results/latest.md`` (machine, targets, every row),
``latest.json`` (the whole result, every round) and ``latest.png`` (a chart, when
matplotlib is installed: ``pip install walstore[bench]``).  A ``--quick`` run writes
``quick.*`` and a run of chosen workloads (with ``--quick`` or not) ``partial.*`` instead,
so ``latest.*`` only ever holds a full run and ``quick.*`` a whole quick one.  The
measuring itself lives in ``walstore.benchmark``.

    python bench/run.py [--quick] [--workloads put-1t,reads] [--repeats N] [--out DIR]
                        [--dir TMPDIR] [--json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from walstore.benchmark import (render_json, render_markdown, render_png,  # noqa: E402
                                run_benchmarks)


def output_stem(quick: bool, workloads: list[str] | None) -> str:
    """The result files' name: ``partial`` for chosen workloads (quick or not: a partial
    run never replaces a whole one), else ``quick`` or ``latest``."""
    if workloads:
        return "partial"
    return "quick" if quick else "latest"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the same workloads, smaller: about a minute")
    parser.add_argument("--workloads", help="comma-separated workload ids (put-1t always "
                        "runs: it carries the physical-limit row)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per workload")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where the result files go")
    parser.add_argument("--dir", help="where the stores are made (default: the system's "
                        "temporary directory); pick the disk you want measured")
    parser.add_argument("--json", action="store_true", help="print the JSON result")
    args = parser.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    names = args.workloads.split(",") if args.workloads else None
    try:
        results = run_benchmarks(quick=args.quick, workloads=names, repeats=args.repeats,
                                 progress=log, directory=args.dir)
    except ValueError as exc:          # unknown workload name, --dir not a writable dir
        parser.error(str(exc))
    except KeyboardInterrupt:          # one line, as walstore bench says it (the run's
        print("bench: interrupted (Ctrl-C); no result written", file=sys.stderr)
        return 130                     # directories are removed as it unwinds)
    stem = output_stem(args.quick, names)
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(results)
    text = render_json(results)
    (args.out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    (args.out / f"{stem}.json").write_text(text + "\n", encoding="utf-8")
    log(render_png(results, args.out / f"{stem}.png"))
    print(text if args.json else markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
