"""Audit 51 of the integrations: WalstoreStore (LangGraph long-term memory) and
WalstoreSession (OpenAI Agents SDK), compared with LangGraph's InMemoryStore/SqliteStore
and the SDK's SQLiteSession for the same call sequences.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong.
"""
from __future__ import annotations

import tracemalloc

import pytest

pytest.importorskip("langgraph.store.base")

from langgraph.store.base import PutOp  # noqa: E402
from langgraph.store.memory import InMemoryStore  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreStore  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


# ---- WalstoreStore ------------------------------------------------------------------------
def _fill(memory, n, pad):
    for start in range(0, n, 1000):
        memory.batch([PutOp(("docs",), f"k{i:06d}", {"type": "fact", "i": i, "text": pad})
                      for i in range(start, min(n, start + 1000))])


def _peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_filtered_search_holds_only_the_page_it_returns(store):
    """search(filter=..., limit=3) kept every matching item of the namespace in memory
    (their decoded values) before slicing the page: 4,000 items of 4 KiB took ~20 MB of
    peak memory for a 3-item answer (and an ``offset`` kept every skipped item too).  A
    search with a filter now stops, as one without does, at ``offset + limit`` matches,
    and keeps only the page.  The answers are still InMemoryStore's."""
    memory = WalstoreStore(store)
    reference = InMemoryStore()
    pad = "x" * 4096
    _fill(memory, 4000, pad)
    for i in range(4000):
        reference.put(("docs",), f"k{i:06d}", {"type": "fact", "i": i, "text": pad})

    def page(m, **kw):
        return [(it.namespace, it.key, it.value["i"]) for it in m.search(("docs",), **kw)]

    for kw in ({"filter": {"type": "fact"}, "limit": 3},
               {"filter": {"i": {"$gte": 10}}, "limit": 3, "offset": 3000},
               {"filter": {"type": "fact"}, "limit": 0},
               {"filter": {"i": {"$lt": 5}}, "limit": 10},
               {"filter": {"type": "fact"}, "limit": -1, "offset": 3998},
               {"filter": {"type": "fact"}, "limit": 2, "offset": -3}):
        assert page(memory, **kw) == page(reference, **kw), kw

    # bounded by the page, not by the 16 MB of matching values
    _, peak = _peak(lambda: memory.search(("docs",), filter={"type": "fact"}, limit=3))
    assert peak < 5_000_000, peak
    _, peak = _peak(lambda: memory.search(("docs",), filter={"type": "fact"}, limit=3,
                                          offset=3500))
    assert peak < 5_000_000, peak
    _, peak = _peak(lambda: memory.search(("docs",), limit=3, offset=3500))
    assert peak < 5_000_000, peak
