"""Audit of the input edges of WalstoreStore (LangGraph memory) and WalstoreSession (OpenAI
Agents SDK), against LangGraph's InMemoryStore and the SDK's SQLiteSession (audit50).

Findings: a namespace label or key holding a lone surrogate escaped as a bare
UnicodeEncodeError naming nothing, at put and at get/search/delete alike; so did a
session id; a read on a read-only store (readonly=True, a replica, a store turned
read-only by a failed fsync) raised ReadOnlyError for every item with a TTL, the read's
answer lost, because the read's TTL refresh is a write.  A guard: negative ``limit`` and
``offset`` answer exactly as InMemoryStore (Python slice bounds), which they already did.
"""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langgraph.store.base")
pytest.importorskip("agents")

from langgraph.store.base import PutOp  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreStore  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402

from test_langgraph_store import Reference, outcome  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


# ---- WalstoreStore ------------------------------------------------------------------------
@pytest.mark.parametrize("what, call", [
    ("namespace label", lambda m: m.put(("a", "x\ud800"), "k", {"v": 1})),
    ("namespace label", lambda m: m.get(("x\ud800",), "k")),
    ("namespace label", lambda m: m.delete(("x\ud800",), "k")),
    ("namespace label", lambda m: m.search(("x\ud800",))),
    ("namespace label", lambda m: m.list_namespaces(prefix=("x\ud800",))),
    ("namespace label", lambda m: asyncio.run(m.aput(("x\ud800",), "k", {"v": 1}))),
    ("key", lambda m: m.put(("a",), "k\ud800", {"v": 1})),
    ("key", lambda m: m.get(("a",), "k\ud800")),
    ("key", lambda m: m.batch([PutOp(("a",), "k\ud800", None)])),
])
def test_a_label_or_key_that_is_not_utf8_is_a_value_error_naming_it(store, what, call):
    # (audit50: a bare UnicodeEncodeError from the key's encoding, naming neither the
    # label or key nor the problem)
    memory = WalstoreStore(store)
    memory.put(("a",), "k", {"v": 1})
    with pytest.raises(ValueError) as e:
        call(memory)
    assert not isinstance(e.value, UnicodeError)
    assert what in str(e.value) and "UTF-8" in str(e.value), str(e.value)
    assert [(i.namespace, i.key, i.value) for i in memory.search(())] == [(("a",), "k",
                                                                          {"v": 1})]


def test_a_read_only_store_reads_items_with_a_ttl(tmp_path):
    # (audit50: the read's TTL refresh is a write: get and search raised ReadOnlyError for
    # every item with a TTL on a store opened readonly=True, and the answer was lost)
    path = str(tmp_path / "store")
    writer = walstore.open(path, durability="full")
    memory = WalstoreStore(writer)
    memory.put(("users", "ana"), "prefs", {"seat": "window"}, ttl=30)
    memory.put(("users", "ana"), "plain", {"seat": "aisle"})
    expiry = writer.get(memory.keys.item(("users", "ana"), "prefs"))["e"]
    writer.close()

    reader = walstore.open(path, readonly=True)
    try:
        ro = WalstoreStore(reader, ttl={"default_ttl": None, "refresh_on_read": True})
        assert ro.get(("users", "ana"), "prefs").value == {"seat": "window"}
        assert [i.key for i in ro.search(("users",))] == ["plain", "prefs"]
        assert asyncio.run(ro.aget(("users", "ana"), "prefs")).value == {"seat": "window"}
        assert ro.list_namespaces() == [("users", "ana")]
        # nothing was renewed: the item keeps the expiry its writer gave it
        assert reader.get(memory.keys.item(("users", "ana"), "prefs"))["e"] == expiry
        with pytest.raises(walstore.ReadOnlyError):  # a write still says why it cannot
            ro.put(("users", "ana"), "prefs", {"seat": "middle"})
    finally:
        reader.close()


def test_negative_limit_and_offset_answer_as_in_memory_store(store):
    # A guard, not a fix: InMemoryStore slices its matches with the bounds as given
    # (Python slice semantics for negative ones); WalstoreStore answers the same, with and
    # without a filter (whose scan never stops early), for search and list_namespaces.
    ours, ref = WalstoreStore(store), Reference()
    for s in (ours, ref):
        for ns in [("a",), ("a", "b"), ("b",), ("c", "d")]:
            for k in ["k1", "k2", "k3"]:
                s.put(ns, k, {"n": len(k), "tag": k})
    for limit in (-5, -1, 0, 2, 50):
        for offset in (-5, -1, 0, 2, 50):
            for call in (lambda s: s.search((), limit=limit, offset=offset),
                         lambda s: s.search((), filter={"tag": "k2"}, limit=limit,
                                            offset=offset),
                         lambda s: s.list_namespaces(limit=limit, offset=offset),
                         lambda s: s.list_namespaces(max_depth=1, limit=limit,
                                                     offset=offset)):
                assert outcome(lambda: call(ours)) == outcome(lambda: call(ref)), \
                    (limit, offset)


# ---- WalstoreSession ----------------------------------------------------------------------
@pytest.mark.parametrize("session_id", ["x\ud800", "x\ud800" * 100])
def test_a_session_id_that_is_not_utf8_is_a_value_error_naming_it(store, session_id):
    # (audit50: quote()'s bare UnicodeEncodeError escaped the constructor, naming neither
    # the argument nor the problem, as branch names did before probe-oai)
    with pytest.raises(ValueError) as e:
        WalstoreSession(session_id, store)
    assert not isinstance(e.value, UnicodeError)
    assert "session_id" in str(e.value) and "UTF-8" in str(e.value), str(e.value)


def test_a_namespace_that_is_not_utf8_is_a_value_error_naming_it(store):
    # (audit50: the ValueError named the session's first item key, not the namespace)
    with pytest.raises(ValueError) as e:
        WalstoreSession("u", store, namespace="oa\ud800/")
    assert str(e.value).startswith("namespace ") and "UTF-8" in str(e.value), str(e.value)


# ---- WalstoreSaver ---------------------------------------------------------------------
@pytest.mark.parametrize("field", ["thread_id", "checkpoint_ns"])
def test_a_checkpoint_key_part_that_is_not_utf8_is_a_value_error_naming_it(store, field):
    """(helper's note, fixed) a lone surrogate in a thread id made get_tuple and put fail
    with a bare UnicodeEncodeError naming nothing (SqliteSaver's sqlite3 raises one too):
    now a ValueError saying which parts of a key must be text, nothing written."""
    from walstore.integrations.langgraph import WalstoreSaver
    saver = WalstoreSaver(store)
    conf = {"thread_id": "t", "checkpoint_ns": "", field: "x\ud800"}
    with pytest.raises(ValueError, match="not valid UTF-8.*thread id") as e:
        saver.get_tuple({"configurable": conf})
    assert not isinstance(e.value, UnicodeError)
    assert list(store.scan()) == []
