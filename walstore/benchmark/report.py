"""A run's result as Markdown (targets table, then one table of every row), as strict JSON
(RFC 8259: no NaN or Infinity), and as a PNG chart (targets, commit latency, ratios).

Reads only the dict ``run_benchmarks`` returns; measures nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.4f}x"


def fmt_met(met: bool | None, measured: bool = True) -> str:
    if met is None:
        return "not measured" if measured else "-"
    return "met" if met else "**not met**"


def _verdict(row: dict[str, Any]) -> str:
    """The row's met / not met, with each target's own ratio and baseline: a target may
    be judged against another row's system (8 threads against SQLite's single-thread
    best), and a verdict printed beside a ratio it was not computed from read as if
    1.80x had met a 2.5x goal."""
    verdict = fmt_met(row["met"], measured=bool(row["targets"]))
    judged = [f"{fmt_ratio(t['measured'])} vs {t['baseline']} {t['op']} {t['goal']}x"
              for t in row["targets"] if t.get("measured") is not None]
    return f"{verdict} ({'; '.join(judged)})" if judged else verdict


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _notes(extra: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}"
                     for k, v in extra.items())


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| figure | source | row / baseline | measured | target | met |",
             "|---|---|---|--:|---|---|"]
    for t in targets:
        metric = "" if t["metric"] == "rate" else f" ({t['metric']})"
        baseline = t["baseline_used"] or t["baseline"]
        measured = fmt_ratio(t["measured"]) if t["met"] is not None else \
            _cell(t["why_not_measured"] or "-")
        lines.append(f"| {_cell(t['figure'])} | {t['source']} | `{t['row']}` / "
                     f"`{baseline}`{metric} | {measured} | {t['op']} {t['goal']:g}x | "
                     f"{fmt_met(t['met'])} |")
    met = sum(1 for t in targets if t["met"])
    unmeasured = sum(1 for t in targets if t["met"] is None)
    lines += ["", f"Targets met: {met} of {len(targets)} ({unmeasured} not measured in this "
              "run)."]
    return lines


def part_rows(part: dict[str, Any]) -> list[str]:
    """Markdown rows of one part: its title, key space and value size on the first."""
    lines = []
    for i, row in enumerate(part["rows"]):
        head = [f"**{part['id']}**: {part['title']}", part["key_space"], part["value_size"]] \
            if i == 0 else ["", "", ""]
        if row["error"]:
            cells = [*head, row["system"], _cell(row["error"]), *[""] * 7]
        else:
            lat = row["latency_ms"] or {}
            ratio = fmt_ratio(row["ratio"])
            if row["ratio"] is not None:
                on = "" if row["ratio_on"] == "rate" else f" {row['ratio_on']}"
                ratio = f"{ratio}{on} vs {row['ratio_baseline']}"
            cells = [*head, row["system"], f"{fmt_rate(row['median'])} {part['unit']}",
                     f"{fmt_rate(row['min'])}–{fmt_rate(row['max'])}",
                     fmt_ms(lat.get("p50")), fmt_ms(lat.get("p99")),
                     fmt_ms(lat.get("p99.9")), ratio,
                     _verdict(row),
                     _cell(_notes({"ops/round": row["ops_per_round"], **row["extra"]}))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The result as Markdown: the machine, how it was measured, the targets, the rows."""
    meta, m = results["meta"], results["meta"]["machine"]
    rounds = sorted({p["rounds"] for p in results["parts"]})
    records = ", ".join(f"{v} B for a {int(k):,} B value"
                        for k, v in meta.get("bare_record_bytes", {}).items())
    lines = [
        f"# walstore benchmark ({meta['mode']})", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, {m['lmdb']}, "
        f"SQLite {m['sqlite']}, langgraph {m['langgraph']}, langgraph-checkpoint-sqlite "
        f"{m['langgraph_checkpoint_sqlite']}, walstore {m['walstore']}; {m['platform']}; "
        f"files under {m['directory']}; {m['date']}.", "",
        f"How: in each round every system of a row runs once, in a rotating order, each in "
        f"a fresh directory, writing fresh random values; {meta['repeats']} rounds "
        f"(rows run {', '.join(map(str, rounds))} rounds: LangGraph and long runs fewer). "
        "Throughput counts each system's close too (work deferred past the last operation: "
        "walstore's apply to LMDB, SQLite's checkpoint; `close_ms` in the notes) and is the "
        "median over rounds (min–max beside it); latency columns (ms) are "
        "per-operation percentiles of each round, median over rounds. A ratio is the row "
        "against the best of its baseline systems in this same run (for a latency ratio, "
        "lower is better). Targets are computed from these ratios. The bare loop writes "
        f"records of walstore's framed size ({records or 'not run'}). "
        f"Total time {meta['seconds']} s. Trust ratios, not absolute numbers.", "",
        *(["A quick run: short loops on fresh stores, so first-use costs (files growing, "
           "the first checkpoints) weigh more than in a full run. Quote a full run.", ""]
          if meta["mode"].startswith("quick") else []),
        "## Targets", "", *targets_table(results["targets"]), "",
        "## Rows", "",
        "| row | key space | value size | system | median | min–max | p50 ms | p99 ms "
        "| p99.9 ms | ratio | met | notes |",
        "|---|---|---|---|--:|--:|--:|--:|--:|---|---|---|"]
    for part in results["parts"]:
        lines += part_rows(part)
    lines += ["", "Systems:", ""]
    used = {row["system"] for p in results["parts"] for row in p["rows"]}
    lines += [f"- `{name}`: {label}" for name, label in meta["systems"].items() if name in used]
    return "\n".join(lines) + "\n"


def _strict(value: Any) -> Any:
    """value with every non-finite float replaced by {"float": "nan"|"inf"|"-inf"}."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def render_json(results: dict[str, Any], indent: int | None = 1) -> str:
    """Strict RFC 8259 JSON of the result."""
    return json.dumps(_strict(results), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------- the chart

def _not_run(ax: Any) -> None:
    ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_x(ax: Any, ticks: list[float]) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def targets_panel(ax: Any, results: dict[str, Any]) -> None:
    """Each target's measured ratio (green met, red not met), | marks the goal."""
    ts = [t for t in results["targets"] if t["measured"] is not None]
    ax.set_title("Targets: measured ratio (green met, red not met; | = goal)")
    if not ts:
        _not_run(ax)
        return
    for y, t in enumerate(ts):
        ax.barh(y, t["measured"], color="tab:green" if t["met"] else "tab:red")
        ax.plot([t["goal"]], [y], marker="|", markersize=14, color="black")
    ax.set_yticks(range(len(ts)), [t["figure"] for t in ts], fontsize=7)
    ax.invert_yaxis()
    _log_x(ax, [0.125, 0.25, 0.5, 1, 2, 4, 8, 16])


def latency_panel(ax: Any, results: dict[str, Any]) -> None:
    """p50 - p99.9 of every row with latency columns; walstore red, the bare loop black."""
    rows = [(f"{p['id']} · {r['system']}", r) for p in results["parts"] if p["latency"]
            and not p["id"].startswith("lg-") for r in p["rows"] if r["latency_ms"]]
    ax.set_title("Commit latency, ms: p50 (o), p99 (|), p99.9 (x)")
    if not rows:
        _not_run(ax)
        return
    for y, (_label, r) in enumerate(rows):
        lat = r["latency_ms"]
        color = "black" if r["system"] == "bare" else \
            "tab:red" if r["system"].startswith("walstore") else "tab:gray"
        ax.plot([lat["p50"], lat["p99.9"]], [y, y], color=color, linewidth=1)
        ax.plot([lat["p50"]], [y], "o", [lat["p99"]], [y], "|", [lat["p99.9"]], [y], "x",
                color=color, markersize=6)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=6)
    ax.invert_yaxis()
    _log_x(ax, [0.01, 0.1, 1, 10, 100, 1000])


def ratio_panel(ax: Any, results: dict[str, Any]) -> None:
    """Every row's ratio against its baseline (log), walstore red."""
    rows = [(f"{p['id']} · {r['system']}", r) for p in results["parts"] for r in p["rows"]
            if r["ratio"] is not None and r["system"] != r["ratio_baseline"]]
    ax.set_title("Ratio vs the row's baseline (tail-2k: p99.9, lower is better)")
    if not rows:
        _not_run(ax)
        return
    for y, (_label, r) in enumerate(rows):
        color = "tab:red" if r["system"].startswith("walstore") else "tab:gray"
        ax.barh(y, r["ratio"] - 1.0, left=1.0, color=color)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    _log_x(ax, [0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32])


def render_png(results: dict[str, Any], path: str | Path) -> str:
    """Write the chart to path; say what happened (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart (pip install walstore[bench])"
    fig = plt.figure(figsize=(13, 12), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(2, 3))
    targets_panel(fig.add_subplot(grid[0, :]), results)
    latency_panel(fig.add_subplot(grid[1, 0]), results)
    ratio_panel(fig.add_subplot(grid[1, 1]), results)
    m = results["meta"]["machine"]
    fig.suptitle(f"walstore benchmark ({results['meta']['mode']}): {m['nproc']} CPUs "
                 f"{m['cpu']}, Python {m['python']}, SQLite {m['sqlite']}, {m['date']}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
