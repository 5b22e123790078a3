#!/usr/bin/env python3
"""README's headline performance table, made from ONE stored result file (the rows of
record) and nothing else, so that every figure in it comes from the file it names.

    python bench/readme_table.py bench/results/stop33-rows.json [--readme README.md]
                                 [--check]

rewrites the block between the ``rows-of-record`` markers in README.md (``--check``: exit
1 when the block differs from what the file gives, writing nothing).  Publishing a new run
is this one command with the new file.  Targets are re-judged from the file's rows with
today's rules (``walstore.benchmark.runner.evaluate``: a latency percentile from too few
samples is not judged, nor met against a noisy disk's own tail; 8 threads is shown
against SQLite's best 8-thread row too).  The
one figure not from the file is the spread of each latency-ratio row over every stored
run in the same directory, labelled so.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from walstore.benchmark.report import fmt_ms, fmt_rate, fmt_ratio  # noqa: E402
from walstore.benchmark.runner import (evaluate, judge_rows, latency_samples,  # noqa: E402
                                       samples_for_verdict)
from walstore.benchmark.workloads import TARGETS  # noqa: E402

BEGIN = "<!-- rows-of-record:begin"
END = "<!-- rows-of-record:end -->"


def _rel(path: Path) -> str:
    full = path.resolve()
    return full.relative_to(ROOT).as_posix() if full.is_relative_to(ROOT) else str(path)


def _rejudged(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    parts = copy.deepcopy(results["parts"])
    for part in parts:
        for row in part["rows"]:
            row["targets"] = []
    by_id = {p["id"]: p for p in parts}
    targets = [evaluate(t, by_id) for t in TARGETS]
    judge_rows(parts)
    return parts, targets


def _latency(row: dict[str, Any]) -> str:
    lat = row.get("latency_ms") or {}
    if "p99.9" not in lat:
        return ""
    n = lat.get("n_min", lat.get("n_per_round"))
    count = f", {int(n):,} samples/round" if n is not None else ""
    return f", p99.9 {fmt_ms(lat['p99.9'])} ms{count}"


def enough_samples(part: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether a latency-ratio row of a stored run had the samples per round a verdict
    on its percentile needs (both it and the baseline row it was divided by)."""
    needed = samples_for_verdict(part.get("ratio_on", "rate"))
    base = next((r for r in part["rows"] if r.get("system") == row.get("ratio_baseline")),
                None)
    counts = [latency_samples(r) for r in (row, base) if r is not None]
    return len(counts) == 2 and all(c is not None and c >= needed for c in counts)


def spread(results_dir: Path, part_id: str, system: str) -> list[float]:
    """The row's ratio in every stored result file of results_dir that has it, from
    enough samples per round (a quick run's p99.9 is not counted)."""
    out = []
    for f in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        for part in data.get("parts", []) if isinstance(data, dict) else []:
            if part.get("id") != part_id:
                continue
            out += [r["ratio"] for r in part["rows"]
                    if r.get("system") == system and r.get("ratio") is not None
                    and enough_samples(part, r)]
    return out


def _verdict(row: dict[str, Any]) -> str:
    why = [t["why_not_measured"] for t in row["targets"]
           if t["met"] is None and t.get("why_not_measured")]
    if row["met"] is None:
        return why[0] if why else "–"
    return "yes" if row["met"] else "no"


def table(path: Path) -> str:
    """The README block for the result file at path (its .md sibling is the one named)."""
    results = json.loads(path.read_text(encoding="utf-8"))
    parts, _targets = _rejudged(results)
    meta, m = results["meta"], results["meta"]["machine"]
    rel = _rel(path.with_suffix(".md"))
    lines = [
        f"{BEGIN}: made by `python bench/readme_table.py {_rel(path)}` from that one "
        "file; to publish a new run, keep its result in bench/results/ and run "
        "the command with the new file: nothing else to edit. -->",
        f"Every figure in this table is from [`{rel}`]({rel}) ({meta['mode']} run, "
        f"{meta['repeats']} rounds, {m['date'][:10]}; {m['nproc']} CPUs, {m['cpu']}; "
        f"Python {m['python']}, SQLite {m['sqlite']}, {m['lmdb']}, walstore {m['walstore']}; "
        f"files under {m['directory']}), except the spread over stored runs, which says so. "
        "Throughput counts each system's close; ratios are against the best of the row's "
        "baseline systems in that same run; targets are re-judged from its rows "
        "(`bench/readme_table.py`).",
        "",
        "| workload (key space; value size) | walstore | peers | ratio | target | met |",
        "|---|--:|---|---|---|---|"]
    for part in parts:
        rows = [r for r in part["rows"] if not r.get("error")]
        subjects = [r for r in rows if r["system"].startswith("walstore")
                    and r["system"] not in part["baseline"]]
        for row in subjects:
            peers = "; ".join(f"{r['system']} {fmt_rate(r['median'])}/s{_latency(r)}"
                              for r in rows if r is not row)
            on = "" if part["ratio_on"] == "rate" else f" ({part['ratio_on']})"
            ratios = [f"{fmt_ratio(row['ratio'])}{on} vs {row['ratio_baseline']}"] \
                if row["ratio"] is not None else []
            for t in row["targets"]:
                if t["measured"] is not None and \
                        t["baseline"] != f"{part['id']}/{row['ratio_baseline']}":
                    ratios.append(f"{fmt_ratio(t['measured'])} vs {t['baseline']}")
                if t.get("beside_measured") is not None:
                    why = ("the bare loop paced by walstore's own commit time"
                           if t["beside_used"].endswith("/bare-paced")
                           else "SQLite's best at this row's threads")
                    ratios.append(f"{fmt_ratio(t['beside_measured'])} vs "
                                  f"{t['beside_used']} ({why}; not the target's baseline)")
            if part["ratio_on"] != "rate":
                seen = spread(path.parent, part["id"], row["system"])
                if len(seen) > 1:
                    goal = next((t["goal"] for t in row["targets"]), None)
                    within = "" if goal is None else \
                        f", <= {goal:g}x in {sum(x <= goal for x in seen)} of {len(seen)}"
                    ratios.append(
                        f"spread over the {len(seen)} stored runs in bench/results with "
                        "enough samples (several machines and versions): "
                        f"{fmt_ratio(min(seen))}–{fmt_ratio(max(seen))}"
                        f", median {fmt_ratio(statistics.median(seen))}{within}")
            goals = "; ".join(f"{t['op']} {t['goal']:g}x vs {t['baseline']}"
                              for t in row["targets"]) or "–"
            title = f"{part['title']} ({part['key_space']}; {part['value_size']})"
            lines.append(
                f"| {title} | {row['system']} {fmt_rate(row['median'])} {part['unit']}"
                f"{_latency(row)} | {peers} | {'; '.join(ratios) or '–'} | {goals} | "
                f"{_verdict(row)} |")
    lines.append(END)
    return "\n".join(line.replace("\n", " ") for line in lines) + "\n"


def replace_block(readme: str, block: str) -> str:
    start = readme.index(BEGIN)
    end = readme.index(END, start) + len(END) + 1
    return readme[:start] + block + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="the rows of record (a .json result)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when README's block is not what the file gives")
    args = parser.parse_args(argv)
    readme = args.readme.read_text(encoding="utf-8")
    new = replace_block(readme, table(args.result))
    if args.check:
        return 0 if new == readme else 1
    args.readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
