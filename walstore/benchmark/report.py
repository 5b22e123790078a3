"""A run's result as Markdown (targets table, then one table of every row), as strict JSON
(RFC 8259: no NaN or Infinity), and as a PNG chart (targets, commit latency, ratios, each
ratio drawn so that right is better).

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


def _beside(t: dict[str, Any]) -> str:
    """A target's ratio against its second, unjudged baseline ("" when it has none)."""
    if t.get("beside_measured") is None:
        return ""
    return f"; {fmt_ratio(t['beside_measured'])} vs {t['beside_used']}, not judged"


def _verdict(row: dict[str, Any]) -> str:
    """The row's met / not met, with each target's own ratio and baseline: a target may
    be judged against another row's system (8 threads against SQLite's single-thread
    best), and a verdict printed beside a ratio it was not computed from read as if
    1.80x had met a 2.5x goal.  A target left unjudged says why (too few samples)."""
    unjudged = [t["why_not_measured"] for t in row["targets"]
                if t.get("measured") is not None and t["met"] is None
                and t.get("why_not_measured")]
    verdict = fmt_met(row["met"], measured=bool(row["targets"]))
    if row["met"] is None and unjudged:
        verdict = unjudged[0]
    judged = [f"{fmt_ratio(t['measured'])} vs {t['baseline']} {t['op']} {t['goal']}x"
              f"{_beside(t)}" for t in row["targets"] if t.get("measured") is not None]
    return f"{verdict} ({'; '.join(judged)})" if judged else verdict


def fmt_samples(row: dict[str, Any]) -> str:
    """Per-operation samples per round behind a row's latency columns (the fewest of
    any round when rounds differ)."""
    lat = row.get("latency_ms") or {}
    n = lat.get("n_min", lat.get("n_per_round"))
    return "-" if n is None else f"{int(n):,}"


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
        if t["measured"] is not None:
            measured = fmt_ratio(t["measured"])
            if t.get("beside_measured") is not None:
                measured += (f" ({fmt_ratio(t['beside_measured'])} vs "
                             f"`{t['beside_used']}`, not judged)")
        else:
            measured = _cell(t["why_not_measured"] or "-")
        met = fmt_met(t["met"])
        if t["met"] is None and t["measured"] is not None:
            met = _cell(t["why_not_measured"] or "not measured")
        elif t.get("samples"):
            met += " (" + ", ".join(f"{s}: {n:,}" if n is not None else f"{s}: -"
                                    for s, n in t["samples"].items()) + " samples)"
        lines.append(f"| {_cell(t['figure'])} | {t['source']} | `{t['row']}` / "
                     f"`{baseline}`{metric} | {measured} | {t['op']} {t['goal']:g}x | "
                     f"{met} |")
    met_n = sum(1 for t in targets if t["met"])
    unmeasured = sum(1 for t in targets if t["met"] is None)
    lines += ["", f"Targets met: {met_n} of {len(targets)} ({unmeasured} not judged in this "
              "run: not run, or a latency percentile from too few samples or against a "
              "noisy disk's own tail)."]
    return lines


def part_rows(part: dict[str, Any]) -> list[str]:
    """Markdown rows of one part: its title, key space and value size on the first."""
    lines = []
    for i, row in enumerate(part["rows"]):
        head = [f"**{part['id']}**: {part['title']}", part["key_space"], part["value_size"]] \
            if i == 0 else ["", "", ""]
        if row["error"]:
            cells = [*head, row["system"], _cell(row["error"]), *[""] * 8]
        else:
            lat = row["latency_ms"] or {}
            ratio = fmt_ratio(row["ratio"])
            if row["ratio"] is not None:
                on = "" if row["ratio_on"] == "rate" else f" {row['ratio_on']}"
                ratio = f"{ratio}{on} vs {row['ratio_baseline']}"
            cells = [*head, row["system"], f"{fmt_rate(row['median'])} {part['unit']}",
                     f"{fmt_rate(row['min'])}–{fmt_rate(row['max'])}",
                     fmt_ms(lat.get("p50")), fmt_ms(lat.get("p99")),
                     fmt_ms(lat.get("p99.9")), fmt_samples(row), ratio,
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
    paces = ", ".join(f"{v} µs for a {int(k):,} B value"
                      for k, v in meta.get("bare_pace_us", {}).items())
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
        "lower is better). Targets are computed from these ratios; a latency-percentile "
        "target is judged only from enough samples per round (10,000 for p99.9: "
        "`samples/round`), else it says too few samples, and is met only against a "
        "baseline whose own tail is a quiet disk's (its p99.9 at most 6x its median), "
        "else it says a noisy disk. The bare loop writes "
        f"records of walstore's framed size ({records or 'not run'}); "
        f"the paced bare loop spins before each one as long as walstore takes for such a "
        f"commit without its fsync ({paces or 'not run'}): on a disk whose fsync is slower "
        f"after a busy pause (PROFILE.md, 31st round) it is the limit for a writer busy "
        f"that long between syncs; the targets stay against the plain bare loop. "
        f"Total time {meta['seconds']} s. Trust ratios, not absolute numbers.", "",
        *(["A quick run: short loops on fresh stores, so first-use costs (files growing, "
           "the first checkpoints) weigh more than in a full run. Quote a full run.", ""]
          if meta["mode"].startswith("quick") else []),
        "## Targets", "", *targets_table(results["targets"]), "",
        "## Rows", "",
        "| row | key space | value size | system | median | min–max | p50 ms | p99 ms "
        "| p99.9 ms | samples/round | ratio | met | notes |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|---|---|---|"]
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
    """Each target's measured ratio (green met, red not met, gray not judged), | marks
    the goal; a latency target's label says lower is better."""
    ts = [t for t in results["targets"] if t["measured"] is not None]
    ax.set_title("Targets: measured ratio (green met, red not met, gray not judged: too few "
                 "samples; | = goal; latency targets: lower is better)")
    if not ts:
        _not_run(ax)
        return
    for y, t in enumerate(ts):
        color = "tab:gray" if t["met"] is None else "tab:green" if t["met"] else "tab:red"
        ax.barh(y, t["measured"], color=color)
        ax.plot([t["goal"]], [y], marker="|", markersize=14, color="black")
    labels = [t["figure"] if t["metric"] == "rate" else
              f"{t['figure']} ({t['metric']}: lower is better)" for t in ts]
    ax.set_yticks(range(len(ts)), labels, fontsize=7)
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


def better_factor(row: dict[str, Any]) -> float:
    """A row's ratio turned so that above 1 is better and below 1 worse, whatever it is
    on: a throughput ratio as it is, a latency ratio (lower is better) inverted.  3x the
    baseline's p99.9 is 0.33x "better", drawn leftward like a throughput loss."""
    ratio = row["ratio"]
    return ratio if row.get("ratio_on", "rate") == "rate" else 1.0 / ratio


def ratio_label(part_id: str, row: dict[str, Any]) -> str:
    """The panel's label of a row: latency rows say the ratio was inverted, and on what."""
    label = f"{part_id} · {row['system']}"
    on = row.get("ratio_on", "rate")
    return label if on == "rate" else f"{label} ({on} latency, inverted)"


def ratio_panel(ax: Any, results: dict[str, Any]) -> None:
    """Every row's ratio against its baseline (log), oriented so that right is better for
    every row: throughput ratios as they are, latency ratios (lower is better) inverted,
    hatched and labelled so.  Walstore red, peers gray."""
    rows = [(ratio_label(p["id"], r), r) for p in results["parts"] for r in p["rows"]
            if r["ratio"] and r["system"] != r["ratio_baseline"]]
    ax.set_title("x better than the row's baseline (right = better; latency rows, hatched:\n"
                 "baseline's percentile / the row's, so a slower tail is drawn leftward)")
    if not rows:
        _not_run(ax)
        return
    for y, (_label, r) in enumerate(rows):
        color = "tab:red" if r["system"].startswith("walstore") else "tab:gray"
        latency = r.get("ratio_on", "rate") != "rate"
        ax.barh(y, better_factor(r) - 1.0, left=1.0, color=color,
                hatch="//" if latency else None, edgecolor="black" if latency else color)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("x better (throughput: row / baseline; latency: baseline / row)")
    _log_x(ax, [1 / 32, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32])


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
