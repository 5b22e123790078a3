"""The saver's value cache (``blobs.ValueCache``): the next invoke of a thread reads its
head blob, not its delta chain, and what comes back is always what the store holds.

Every test compares a caching saver with a saver over the SAME store whose cache is off
(``value_cache_bytes=0``): equal values at every checkpoint of every thread, after
rewinds, erasure, forks, writes by another saver, caller-chosen versions and eviction.
"""
from __future__ import annotations

import copy
import operator
from typing import Annotated, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.blobs import ValueCache  # noqa: E402


class S(TypedDict):
    log: Annotated[list, operator.add]
    n: int


def graph(saver):
    def step(s: dict) -> dict:
        return {"log": [f"turn {s['n']} " + "x" * 40], "n": s["n"] + 1}
    b = StateGraph(S)
    b.add_node("step", step)
    b.add_edge(START, "step")
    b.add_edge("step", END)
    return b.compile(checkpointer=saver)


def cfg(tid: str) -> dict:
    return {"configurable": {"thread_id": tid}}


def every_state(saver, tid: str) -> list:
    """(checkpoint id, channel values) of every checkpoint of the thread, newest first."""
    return [(t.config["configurable"]["checkpoint_id"], t.checkpoint["channel_values"])
            for t in saver.list(cfg(tid))]


@pytest.fixture
def pair(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="none")
    cached = WalstoreSaver(store)
    plain = WalstoreSaver(store, value_cache_bytes=0)
    yield store, cached, plain
    store.close()


def test_the_next_invoke_hits_the_cache_and_reads_what_the_store_holds(pair):
    store, cached, plain = pair
    g = graph(cached)
    for turn in range(30):
        for tid in ("a", "b"):
            g.invoke({"log": [f"human {turn}"], "n": turn}, cfg(tid))
    values = cached.codec.values
    hits_before = values.hits
    for tid in ("a", "b"):
        got = cached.get_tuple(cfg(tid))
        assert got.checkpoint["channel_values"] == plain.get_tuple(cfg(tid)).checkpoint[
            "channel_values"]
        assert len(got.checkpoint["channel_values"]["log"]) == 60
    assert values.hits >= hits_before + 2          # the heads came from the cache
    assert plain.codec.values.hits == 0 and plain.codec.values.bytes == 0
    for tid in ("a", "b"):                          # every older checkpoint too
        assert every_state(cached, tid) == every_state(plain, tid)


def test_a_chain_stops_at_the_cached_version_written_by_another_saver(pair):
    """Another saver appends deltas to the thread (it shares the delta bases, not the
    value cache): the caching saver's head is now a link in the middle of the chain; it
    rebuilds the new head from there, correctly."""
    store, cached, plain = pair
    for turn in range(3):
        graph(cached).invoke({"log": ["h"], "n": 0}, cfg("t"))
    writer = copy.copy(cached)
    writer.codec = copy.copy(cached.codec)   # (the same delta-base cache)
    writer.codec.values = ValueCache(0)
    other = graph(writer)
    for turn in range(1, 6):
        other.invoke({"log": [f"h{turn}"], "n": turn}, cfg("t"))
    mine, theirs = cached.codec.values, plain.codec.values
    misses, links, plain_links = mine.misses, mine.links, theirs.links
    got = cached.get_tuple(cfg("t")).checkpoint["channel_values"]
    assert got == plain.get_tuple(cfg("t")).checkpoint["channel_values"]
    assert len(got["log"]) == 16 and mine.misses == misses + 1
    # the walk stopped at the cached link; the cacheless saver walked to the base
    assert 0 < mine.links - links < theirs.links - plain_links
    hits = mine.hits
    assert cached.get_tuple(cfg("t")).checkpoint["channel_values"] == got
    assert mine.hits == hits + 1 and mine.links - links < theirs.links - plain_links
    assert every_state(cached, "t") == every_state(plain, "t")


def test_rewind_and_delete_thread_drop_the_threads_cached_values(pair):
    store, cached, plain = pair
    g = graph(cached)
    for turn in range(6):
        for tid in ("a", "b"):
            g.invoke({"log": [f"human {turn}"], "n": turn}, cfg(tid))
    target = list(cached.list(cfg("a")))[5].config  # an older checkpoint of thread a
    cached.rewind(target)
    scope_a = cached.thread_scope("a")
    assert not [k for k in cached.codec.values._entries if k[0].startswith(scope_a)]
    assert cached.get_tuple(cfg("a")).checkpoint == plain.get_tuple(cfg("a")).checkpoint
    g.invoke({"log": ["after the rewind"], "n": 99}, cfg("a"))
    assert every_state(cached, "a") == every_state(plain, "a")
    assert every_state(cached, "b") == every_state(plain, "b")
    cached.delete_thread("b")
    assert not [k for k in cached.codec.values._entries
                if k[0].startswith(cached.thread_scope("b"))]
    assert cached.get_tuple(cfg("b")) is None


def test_a_fork_from_an_older_checkpoint_reads_right_on_both_branches(pair):
    store, cached, plain = pair
    g = graph(cached)
    for turn in range(5):
        g.invoke({"log": [f"human {turn}"], "n": turn}, cfg("t"))
    older = list(cached.list(cfg("t")))[4].config
    g.invoke({"log": ["forked"], "n": 50}, older)   # a branch with its own versions
    g.invoke({"log": ["again"], "n": 51}, cfg("t"))
    assert every_state(cached, "t") == every_state(plain, "t")
    head = cached.get_tuple(cfg("t")).checkpoint["channel_values"]["log"]
    assert head[-2:] == ["again", "turn 51 " + "x" * 40]


def test_versions_the_caller_chose_are_never_cached(pair):
    """A caller's own versions (ints here, reused for different values) may not be unique,
    so nothing is cached for them: each read is what the store holds now."""
    store, cached, plain = pair
    for i, value in enumerate((["a"], ["a", "b"], ["x"])):
        cp = empty_checkpoint()
        cp["channel_values"] = {"log": value}
        cp["channel_versions"] = {"log": 1}  # the same version each time
        conf = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        cached.put(conf, cp, {"step": i}, {"log": 1})
        assert cached.get_tuple(cfg("t")).checkpoint["channel_values"] == {"log": value}
    assert cached.codec.values.bytes == 0 and not cached.codec.values._entries


def test_the_cache_stays_within_its_bound(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="none")
    try:
        bound = 8 << 10
        cached = WalstoreSaver(store, value_cache_bytes=bound)
        plain = WalstoreSaver(store, value_cache_bytes=0)
        g = graph(cached)
        for turn in range(8):
            for t in range(20):
                g.invoke({"log": [f"human {turn} " + "y" * 30], "n": turn}, cfg(f"t{t}"))
                assert cached.codec.values.bytes <= bound
        entries = cached.codec.values._entries
        assert 0 < len(entries) < 20   # evicted, least recently used first
        newest_scope = list(entries)[-1][0]
        assert newest_scope.startswith(cached.thread_scope("t19"))
        for t in range(20):
            assert every_state(cached, f"t{t}") == every_state(plain, f"t{t}")
        with pytest.raises(ValueError):
            WalstoreSaver(store, value_cache_bytes=-1)
    finally:
        store.close()
