"""Smoke test of the benchmark harness: it runs and reports.  No timing assertions."""
import json

from walstore.benchmark import render_markdown, run_benchmarks


def test_quick_benchmark_runs_and_reports() -> None:
    progress: list[str] = []
    results = run_benchmarks(quick=True, workloads=["txn-100", "savepoint"], repeats=1,
                             progress=progress.append, scale=0.05)

    assert [w["id"] for w in results["workloads"]] == ["txn-100", "savepoint"]
    assert results["meta"]["machine"]["nproc"] >= 1
    for w in results["workloads"]:
        rows = {row["system"]: row for row in w["systems"]}
        assert {"walstore", "sqlite-full", "lmdb-sync"} <= rows.keys()
        for row in rows.values():
            assert row["error"] is None, f"{w['id']} {row['system']}: {row['error']}"
            assert 0 < row["min"] <= row["median"] <= row["max"]
            assert row["samples"][0]["ops"] > 0
        assert rows["sqlite-full"]["ratio_vs_sqlite"] == 1.0
        assert rows["walstore"]["ratio_vs_sqlite"] > 0
        assert w["targets"] and all(t["met"] in (True, False) for t in w["targets"])
    json.dumps(results, allow_nan=False)
    assert "| txn-100: " in render_markdown(results)
    assert progress
