"""Smoke test of the benchmark harness: a tiny run of every workload reports every row
with its key space, value size, ratio and met/not-met fields, and every target as met or
not.  It checks the shape of the report, never the numbers (no timing assertions)."""
import gc
import json
import sys
import types

import pytest

from walstore.benchmark import render_json, render_markdown, run_benchmarks

ROW_FIELDS = ("system", "key_space", "value_size", "median", "latency_ms", "ratio",
              "ratio_baseline", "targets", "met", "error")
EXPECTED = {"put-1t", "put-8t", "normal", "txn-100", "bulk", "bulk-overwrite", "reads",
            "reads-fresh", "savepoint", "tail-2k", "held-open", "lg-sync", "lg-sync-state",
            "lg-async", "lg-async-state", "steady"}


@pytest.fixture(autouse=True)
def _young_collections_between_measurements(monkeypatch):
    """The harness's full ``gc.collect()`` before each measurement (timing hygiene in its
    own small process) collects only the youngest generation here: these tests check the
    report's shape, never its numbers, and a full collection of a pytest worker's heap
    took 0.2 s each, 50 a tiny run: most of the smoke test's time."""
    from walstore.benchmark import runner
    monkeypatch.setattr(runner, "gc", types.SimpleNamespace(collect=lambda: gc.collect(0)))


def test_tiny_benchmark_reports_every_row(tmp_path) -> None:
    progress: list[str] = []
    results = run_benchmarks(quick=True, repeats=1, progress=progress.append, scale=0.005,
                             directory=str(tmp_path))

    parts = {p["id"]: p for p in results["parts"]}
    assert EXPECTED <= parts.keys()
    assert any(i.startswith("recovery-") for i in parts)
    assert {"bare", "bare-paced", "python-floor"} <= {r["system"]
                                                      for r in parts["put-1t"]["rows"]}
    # the paced loop's pace is walstore's own commit time in this run, and stated
    assert results["meta"]["bare_pace_us"]["100"] > 0
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
        if target["met"] is None:          # skipped, or a percentile from too few samples
            assert target["why_not_measured"].startswith(("skipped: ", "too few samples")), \
                target
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


def test_a_rows_verdict_shows_the_ratio_and_baseline_it_was_judged_on() -> None:
    """put-8t is judged against put-1t's single-thread SQLite; its row printed "1.80x vs
    sqlite-full | met" (the ratio against its own 8-thread SQLite) for a >= 2.5x goal.
    The verdict cell now carries the target's own ratio and baseline."""
    from walstore.benchmark import workloads as W
    from walstore.benchmark.report import part_rows
    from walstore.benchmark.runner import evaluate, judge_rows, sample_summary, summarize_part
    from walstore.benchmark.spec import Sample

    ws = {w.id: w for w in W.all_workloads(W.QUICK)}

    def rounds(rate):
        return [sample_summary(Sample(int(rate), 1.0, [1e-3] * 10))]
    p1 = summarize_part(ws["put-1t"].parts[0], ws["put-1t"],
                        {"walstore": rounds(1000), "sqlite-full": rounds(1000),
                         "lmdb-sync": rounds(500), "bare": rounds(1200), "bare-paced": rounds(900),
                         "python-floor": rounds(1100)}, {}, 1)
    p8 = summarize_part(ws["put-8t"].parts[0], ws["put-8t"],
                        {"walstore": rounds(2700), "sqlite-full": rounds(1500),
                         "sqlite-full-per-thread": rounds(400), "lmdb-sync": rounds(500)},
                        {}, 1)
    parts = {"put-1t": p1, "put-8t": p8}
    for t in W.TARGETS:
        evaluate(t, parts)
    judge_rows([p1, p8])
    row = part_rows(p8)[0]
    assert "1.80x vs sqlite-full" in row            # the row's own ratio, as before
    assert "met (2.70x vs put-1t/sqlite-full >= 2.5x" in row  # and what the verdict used
    assert "1.80x vs put-8t/sqlite-full, not judged" in row  # and SQLite's best 8-thread


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_a_number_of_rounds_that_is_not_one_or_more_is_refused(repeats) -> None:
    """``--repeats -1`` exited 0 with empty rows and 0 silently became the default."""
    from walstore.benchmark import run_benchmarks
    with pytest.raises(ValueError, match="rounds"):
        run_benchmarks(quick=True, workloads=["put-1t"], repeats=repeats,
                       progress=lambda m: None)


def test_the_held_open_rows_preload_is_applied_before_the_timing(tmp_path) -> None:
    """held-open timed a close that applied the 70,000 untimed preload keys (90% of the
    row's time: a shared term that pulled the ratio toward 1.0).  The preload is settled
    (applied, checkpointed) first: after ``settle`` nothing is left for the close."""
    from walstore.benchmark.peers import WalstorePeer
    peer = WalstorePeer(tmp_path / "s", "normal", hold_open=True)
    try:
        for i in range(20):
            peer.write([(f"k{i}-{j}".encode(), b"v" * 100) for j in range(500)])
        peer.settle()
        stats = peer.store.stats()
        assert stats["unapplied_events"] == 0, stats
        assert stats["applied_lsn"] == stats["published_lsn"], stats
    finally:
        peer.close()


def test_the_python_floor_writes_framed_records_durably(tmp_path) -> None:
    """The floor row does what its label says: each commit one CRC-checked record, in
    order, in its preallocated file (a floor that skipped work would flatter nothing but
    mislead the reader about what a store must pay)."""
    import struct

    from walstore.benchmark.peers import PythonFloorPeer
    from walstore.log.format import crc32c
    import msgpack
    peer = PythonFloorPeer(tmp_path, 100)
    for i in range(5):
        peer.write([(b"k%d" % i, b"v" * 100)])
    peer.close()
    data = open(tmp_path / "floor.log", "rb").read()
    assert len(data) == PythonFloorPeer.PREALLOCATED
    at = 0
    for i in range(5):
        crc, length, txid = struct.unpack_from("<IIQ", data, at)
        payload = data[at + 16:at + 16 + length]
        assert crc == crc32c(payload, crc32c(data[at + 4:at + 16]))
        assert msgpack.unpackb(payload) == [i + 1, [[b"k%d" % i, b"v" * 100]]]
        at += 16 + length
    assert data[at:at + 16] == bytes(16)
