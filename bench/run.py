#!/usr/bin/env python3
"""Run walstore's benchmark suite against its peers and write the results.

Writes ``bench/results/latest.md`` (machine header and table), ``latest.json`` (the full
result, including every run) and ``latest.png`` (a chart, when matplotlib is installed:
``pip install walstore[bench]``).  The measuring itself lives in ``walstore.benchmark``.

    python bench/run.py [--quick] [--workloads put-1t,reads] [--repeats N] [--out DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from walstore.benchmark import render_markdown, run_benchmarks  # noqa: E402


def not_run(ax: Any) -> None:
    ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def ratio_panel(ax: Any, results: dict[str, Any]) -> None:
    """Bars from 1.0 to each median ratio vs SQLite (log scale); | marks a target."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    bars: list[tuple[str, float, str, float | None]] = []
    for w in results["workloads"]:
        goals = {t["system"]: t["goal"] for t in w["targets"]
                 if t["baseline"] == w["baseline"] and t["goal"]}
        for row in w["systems"]:
            if row["ratio_vs_sqlite"] is not None and row["system"] != w["baseline"]:
                color = "tab:red" if row["system"].startswith("walstore") else "tab:gray"
                bars.append((f"{w['id']} · {row['system']}", row["ratio_vs_sqlite"], color,
                             goals.get(row["system"])))
    ax.set_title("Ratio vs SQLite (walstore in red)")
    if not bars:
        not_run(ax)
        return
    for y, (_label, ratio, color, goal) in enumerate(bars):
        ax.barh(y, ratio - 1.0, left=1.0, color=color)
        if goal:
            ax.plot([goal], [y], marker="|", markersize=14, color="black")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("median throughput / SQLite median (log; 1 = SQLite; | = target)")


def recovery_panel(ax: Any, results: dict[str, Any]) -> None:
    """REDO records/s against WAL size, with the 100k records/s target."""
    points = [(row["extra"].get("wal_mb", 0.0), row["median"])
              for w in results["workloads"] if w["group"] == "recovery"
              for row in w["systems"] if row["median"] is not None]
    ax.set_title("Recovery")
    if not points:
        not_run(ax)
        return
    sizes, rates = zip(*sorted(points))
    ax.plot(sizes, rates, marker="o", color="tab:red", label="walstore")
    ax.axhline(100_000, color="black", linestyle="--", linewidth=0.8, label="target")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("WAL since last checkpoint (MB)")
    ax.set_ylabel("REDO records/s")
    ax.legend(fontsize=7)


def steady_panel(ax: Any, results: dict[str, Any]) -> None:
    """RSS and WAL disk use over the steady run."""
    ax.set_xlabel("commits")
    ax.set_ylabel("MB")
    ax.set_title("Steady state")
    runs = [(row["system"], row["series"]) for w in results["workloads"]
            for row in w["systems"] if (row.get("series") or {}).get("commits")]
    names = {"rss_mb": "RSS", "anon_mb": "heap RSS", "wal_mb": "WAL disk",
             "dir_mb": "store disk"}
    for system, series in runs:
        for key, name in names.items():
            if key in series:
                ax.plot(series["commits"], series[key], label=f"{system} {name}")
    if runs:
        ax.legend(fontsize=7)
    else:
        not_run(ax)


def chart(results: dict[str, Any], path: Path) -> str:
    """Write the PNG chart; say what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart (pip install walstore[bench])"
    fig = plt.figure(figsize=(12, 9), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2))
    ratio_panel(fig.add_subplot(grid[0, :]), results)
    recovery_panel(fig.add_subplot(grid[1, 0]), results)
    steady_panel(fig.add_subplot(grid[1, 1]), results)
    m = results["meta"]["machine"]
    fig.suptitle(f"walstore benchmark ({results['meta']['mode']}): {m['nproc']} CPUs "
                 f"{m['cpu']}, Python {m['python']}, SQLite {m['sqlite']}, {m['date']}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--workloads", help="comma-separated workload ids or groups")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per workload")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--json", action="store_true", help="print the JSON result")
    args = parser.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    names = args.workloads.split(",") if args.workloads else None
    try:
        results = run_benchmarks(quick=args.quick, workloads=names, repeats=args.repeats,
                                 progress=log)
    except ValueError as exc:          # unknown workload name
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(results)
    (args.out / "latest.md").write_text(markdown, encoding="utf-8")
    (args.out / "latest.json").write_text(json.dumps(results, indent=1) + "\n",
                                          encoding="utf-8")
    log(chart(results, args.out / "latest.png"))
    print(json.dumps(results) if args.json else markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
