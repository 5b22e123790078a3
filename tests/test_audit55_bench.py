"""Audit 55, the benchmark harness: every throughput counts what the system defers to its
close, the children and files a run makes do not outlive it.  Shape and accounting only:
no timing assertions."""
import pytest

from walstore.benchmark.spec import Context


def _lg_ctx(tmp_path, system):
    return Context(system, tmp_path, budget=1.0, value_bytes=0)


@pytest.mark.parametrize("system", ["walstore-saver", "sqlite-saver"])
def test_langgraph_invoke_rows_count_the_savers_close(tmp_path, system) -> None:
    """The LangGraph rows are isolated (the body opens its saver), so the harness never
    timed their close: WalstoreSaver's deferred apply at close was left out of invokes/s
    while every other row counts it.  The body now times the close into the row."""
    pytest.importorskip("langgraph.checkpoint.sqlite")
    from walstore.benchmark.graphs import invoke_sync
    out = invoke_sync(_lg_ctx(tmp_path, system), threads=2, turns=2, state_reads=2)
    sample = out["lg-sync"]
    assert "close_ms" in sample.extra, sample.extra
    assert sample.seconds >= sample.extra["timed_s"] + sample.extra["close_ms"] / 1000 - 1e-3


@pytest.mark.parametrize("system", ["walstore-saver-async", "async-sqlite-saver"])
def test_langgraph_ainvoke_rows_count_the_savers_close(tmp_path, system) -> None:
    pytest.importorskip("aiosqlite")
    from walstore.benchmark.graphs import invoke_async
    out = invoke_async(_lg_ctx(tmp_path, system), threads=2, turns=2, concurrency=2,
                       state_reads=2)
    sample = out["lg-async"]
    assert "close_ms" in sample.extra, sample.extra
    assert sample.seconds >= sample.extra["timed_s"] + sample.extra["close_ms"] / 1000 - 1e-3
