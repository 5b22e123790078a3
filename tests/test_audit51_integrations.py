"""Audit 51 of the integrations: WalstoreStore (LangGraph long-term memory) and
WalstoreSession (OpenAI Agents SDK), compared with LangGraph's InMemoryStore/SqliteStore
and the SDK's SQLiteSession for the same call sequences.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong.  Findings: a filtered (or offset) ``search`` and ``list_namespaces`` held
every match of the namespace/store in memory to return one page, and ``max_depth``
visited every namespace it folded; ``list_branches`` held every item of every branch
to count them; a non-str item key in a raw GetOp/PutOp escaped as AttributeError; a
path (SQLiteSession's second argument) or None given as the store raised "cannot
create weak reference" or AttributeError at first use.
"""
from __future__ import annotations

import asyncio
import tracemalloc

import pytest

pytest.importorskip("langgraph.store.base")
pytest.importorskip("agents")

from langgraph.store.base import (GetOp, ListNamespacesOp, MatchCondition, PutOp,  # noqa: E402
                                  SearchOp)
from langgraph.store.memory import InMemoryStore  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreStore  # noqa: E402
from walstore.integrations.langgraph.keys import MemoryKeys  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402


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


@pytest.fixture
def namespaces_read(monkeypatch):
    """Namespaces the listing visits (one item key parsed per namespace found)."""
    n = [0]
    real = MemoryKeys.parse_item

    def counted(self, key):
        n[0] += 1
        return real(self, key)
    monkeypatch.setattr(MemoryKeys, "parse_item", counted)
    return n


def test_list_namespaces_holds_the_page_and_skips_what_max_depth_folds(tmp_path,
                                                                      namespaces_read):
    """list_namespaces gathered every matching namespace of the store into a set (and,
    with max_depth, a second one) before slicing the page: memory grew with the number of
    namespaces whatever the ``limit`` (20,000 users' namespaces: ~11 MB for 10 answers),
    and ``max_depth=1`` visited every namespace under each first label to answer
    ``[("users",)]`` (2.3 s for 20,000).  Now only the page is held, and the namespaces
    under an answer's first ``max_depth`` labels are skipped.  Answers are InMemoryStore's
    (hashed long labels, which sort out of key order, and negative bounds included)."""
    store = walstore.open(str(tmp_path / "store"), durability="none")
    memory = WalstoreStore(store)
    reference = InMemoryStore()
    ops = [PutOp(("users", f"u{i:05d}", "memories"), "k", {"i": i}) for i in range(3000)]
    ops += [PutOp(("users", f"u{i:05d}"), "profile", {"i": i}) for i in range(0, 3000, 7)]
    ops += [PutOp(("users", "L" * 120 + str(i), "memories"), "k", {"i": i}) for i in range(3)]
    ops += [PutOp(("a" * 130,), "k", {}), PutOp(("docs", "x", "y", "z"), "k", {}),
            PutOp(("docs",), "k", {}), PutOp(("zz", "a"), "k", {})]
    for start in range(0, len(ops), 1000):
        memory.batch(ops[start:start + 1000])
        reference.batch(ops[start:start + 1000])

    def both(**kw):
        return memory.list_namespaces(**kw), reference.list_namespaces(**kw)

    for kw in ({}, {"limit": 10}, {"limit": 5, "offset": 2998}, {"max_depth": 1},
               {"max_depth": 2, "limit": 7}, {"max_depth": 0}, {"max_depth": 3, "limit": 4},
               {"prefix": ("users",), "max_depth": 2, "limit": 3, "offset": 3000},
               {"prefix": ("users", "*"), "max_depth": 1}, {"suffix": ("memories",),
                                                            "max_depth": 2, "limit": 3},
               {"prefix": ("docs",), "max_depth": 2}, {"max_depth": -1, "limit": 4},
               {"limit": -2}, {"offset": -3, "limit": 2}, {"max_depth": 1, "offset": -1},
               {"limit": 0}):
        ours, ref = both(**kw)
        assert ours == ref, kw
    suffix = [MatchCondition("suffix", ("memories",))]
    assert (memory.batch([ListNamespacesOp(tuple(suffix), 1, 10, 0)])
            == reference.batch([ListNamespacesOp(tuple(suffix), 1, 10, 0)]))

    namespaces_read[0] = 0
    assert memory.list_namespaces(max_depth=1) == [("a" * 130,), ("docs",), ("users",),
                                                   ("zz",)]
    assert namespaces_read[0] <= 10, namespaces_read[0]   # was 3,433: every namespace

    store.close()   # (reopened: the rows are read from LMDB, as in a store's usual life)
    with walstore.open(str(tmp_path / "store"), durability="none") as store:
        memory = WalstoreStore(store)
        memory.list_namespaces(limit=1)
        _, peak = _peak(lambda: memory.list_namespaces(limit=10))
        # (was ~1.26 MB: every namespace held; ~0.46 MB now, the read set of the scans)
        assert peak < 750_000, peak


@pytest.mark.parametrize("op", [PutOp(("a",), 5, {"x": 1}), PutOp(("a",), None, {"x": 1}),
                                PutOp(("a",), 5, None), GetOp(("a",), 5),
                                GetOp(("a",), b"k")],
                         ids=["put-int", "put-none", "delete-int", "get-int", "get-bytes"])
def test_an_item_key_that_is_not_a_str_is_a_type_error_naming_it(store, op):
    """A GetOp or PutOp built with a key that is not a str (``batch`` takes ops as they
    come; only ``put``/``get`` pass the key through ``str()``) raised AttributeError
    ("'int' object has no attribute 'encode'") from the key's encoding: a foreign error
    type naming neither the key nor the problem."""
    memory = WalstoreStore(store)
    memory.put(("a",), "5", {"x": 0})
    with pytest.raises(TypeError, match=r"key must be a str, not (int|NoneType|bytes)"):
        memory.batch([op])
    assert memory.get(("a",), "5").value == {"x": 0}    # nothing written


def test_a_search_bound_that_is_not_an_int_is_refused_as_in_memory_store(store):
    """(A guard for the paged search above: a float ``limit`` or ``offset`` is a
    TypeError, as InMemoryStore's slice raises, not a page of 2.0 items.)"""
    memory = WalstoreStore(store)
    reference = InMemoryStore()
    for m in (memory, reference):
        m.put(("a",), "k", {"x": 1})
    for limit, offset in ((2.0, 0), (2, 1.0)):
        for filt in (None, {"x": 1}):
            with pytest.raises(TypeError):
                memory.batch([SearchOp(("a",), filt, limit, offset)])
            with pytest.raises(TypeError):
                reference.batch([SearchOp(("a",), filt, limit, offset)])


# ---- WalstoreSession ----------------------------------------------------------------------
def test_list_branches_counts_without_holding_the_conversation(tmp_path):
    """list_branches built a list of every item of every branch to report two counts per
    branch: a 20,000-item conversation of 1 KiB items held ~26 MB for an answer of a few
    numbers (AdvancedSQLiteSession counts in SQL).  Now the items are counted as read."""
    path = str(tmp_path / "store")
    pad = "x" * 2048

    async def fill():
        with walstore.open(path, durability="none") as store:
            s = WalstoreSession("big", store)
            for b in range(3):
                await s.add_items([{"role": "user", "content": f"{b}.{i}", "pad": pad}
                                   if i % 2 == 0 else
                                   {"role": "assistant", "content": "ok", "pad": pad}
                                   for i in range(1000)])
            await s.create_branch_from_turn(1001, "late")   # holds 2,000 items
            await s.switch_to_branch("main")

    async def listing():
        with walstore.open(path, durability="none") as store:
            s = WalstoreSession("big", store)
            await s.list_branches()      # (warm: imports, caches)
            tracemalloc.start()
            try:
                got = await s.list_branches()
                return got, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    asyncio.run(fill())
    branches, peak = asyncio.run(listing())
    assert [(b["branch_id"], b["message_count"], b["user_turns"], b["is_current"])
            for b in branches] == [("main", 3000, 1500, True), ("late", 2000, 1000, False)]
    assert peak < 2_000_000, peak    # (was ~13 MB: all 5,000 items held)


@pytest.mark.parametrize("given", ["agent-state.db", None, b"state"], ids=["path", "none", "bytes"])
def test_a_path_or_none_given_for_the_store_is_a_type_error_naming_it(tmp_path, given):
    """SQLiteSession's second argument is a database path: ``WalstoreSession("u-42",
    "agent-state.db")`` raised "TypeError: cannot create weak reference to 'str' object"
    (naming neither the argument nor what to pass), and ``WalstoreStore("path")`` was
    accepted and raised AttributeError ("'str' object has no attribute 'transaction'")
    at its first call.  Both now refuse at construction, naming walstore.open."""
    with pytest.raises(TypeError, match=r"WalstoreSession needs a walstore\.Store"):
        WalstoreSession("u-42", given)
    with pytest.raises(TypeError, match=r"WalstoreStore needs a walstore\.Store"):
        WalstoreStore(given)
    with walstore.open(str(tmp_path / "s"), durability="none") as store:   # still taken
        assert asyncio.run(WalstoreSession("u-42", store).get_items()) == []
        assert WalstoreStore(store).search(("a",)) == []
    with walstore.open(str(tmp_path / "s"), readonly=True) as reader:
        assert WalstoreStore(reader).search(("a",)) == []
