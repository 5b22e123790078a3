"""Smoke test of the benchmark harness: a tiny run of every workload reports every row
with its key space, value size, ratio and met/not-met fields, and every target as met or
not.  It checks the shape of the report, never the numbers (no timing assertions)."""
import json
import sys

from walstore.benchmark import render_json, render_markdown, run_benchmarks

ROW_FIELDS = ("system", "key_space", "value_size", "median", "latency_ms", "ratio",
              "ratio_baseline", "targets", "met", "error")
EXPECTED = {"put-1t", "put-8t", "normal", "txn-100", "bulk", "bulk-overwrite", "reads",
            "reads-fresh", "savepoint", "tail-2k", "held-open", "lg-sync", "lg-sync-state",
            "lg-async", "lg-async-state", "steady"}


def test_tiny_benchmark_reports_every_row(tmp_path) -> None:
    progress: list[str] = []
    results = run_benchmarks(quick=True, repeats=1, progress=progress.append, scale=0.005,
                             directory=str(tmp_path))

    parts = {p["id"]: p for p in results["parts"]}
    assert EXPECTED <= parts.keys()
    assert any(i.startswith("recovery-") for i in parts)
    assert "bare" in {r["system"] for r in parts["put-1t"]["rows"]}
    for part in parts.values():
        assert part["key_space"] and part["value_size"]
        for row in part["rows"]:
            assert all(f in row for f in ROW_FIELDS), (part["id"], row.keys())
            assert row["key_space"] and row["value_size"]
            if row["error"]:            # only an optional extra may be missing
                assert row["error"].startswith("skipped: "), (part["id"], row["error"])
                continue
            assert row["median"] is not None and row["median"] > 0
            assert row["met"] in (True, False, None)
            if part["baseline"]:
                assert row["ratio"] is not None, (part["id"], row["system"])
            if part["latency"]:
                assert set(row["latency_ms"]) >= {"p50", "p99", "p99.9"}
    for target in results["targets"]:
        assert target["met"] in (True, False, None)
        if target["met"] is None:
            assert target["why_not_measured"].startswith("skipped: "), target
        else:
            assert target["measured"] is not None and target["goal"] > 0
    assert parts["bulk"]["rows"][0]["extra"]["method"]
    assert json.loads(render_json(results))["schema"] == 2
    markdown = render_markdown(results)
    assert "## Targets" in markdown and "| **put-1t**: " in markdown
    assert progress


def test_langgraph_rows_say_skipped_without_langgraph(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "langgraph", None)      # import langgraph fails
    results = run_benchmarks(quick=True, workloads=["lg-sync"], repeats=1,
                             progress=lambda _msg: None, scale=0.005,
                             directory=str(tmp_path))

    parts = {p["id"]: p for p in results["parts"]}
    assert set(parts) == {"put-1t", "lg-sync", "lg-sync-state"}   # put-1t always runs
    for part_id in ("lg-sync", "lg-sync-state"):
        for row in parts[part_id]["rows"]:
            assert row["error"] == "skipped: langgraph not installed"
            assert row["key_space"] and row["value_size"] and row["met"] is None
    sync = next(t for t in results["targets"] if t["row"] == "lg-sync/walstore-saver")
    assert sync["met"] is None and sync["why_not_measured"].startswith("skipped: ")
    assert "skipped: langgraph not installed" in render_markdown(results)
