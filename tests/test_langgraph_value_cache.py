"""The saver's value cache (``blobs.ValueCache``): the next invoke of a thread reads its
head blob, not its delta chain, and what comes back is always what the store holds.

Every test compares a caching saver with a saver over the SAME store whose cache is off
(``value_cache_bytes=0``): equal values at every checkpoint of every thread, after
rewinds, erasure, forks, writes by another saver, caller-chosen versions and eviction.
"""
from __future__ import annotations

import copy
import operator
from typing import Annotated, Any, TypedDict

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


def converse(saver, turns: int, tids, pad: str = "", check: Any = None) -> Any:
    """``turns`` invokes of each thread, round robin (``check()`` after each one);
    returns the graph."""
    g = graph(saver)
    for turn in range(turns):
        for tid in tids:
            g.invoke({"log": [f"human {turn} {pad}"], "n": turn}, cfg(tid))
            if check is not None:
                check()
    return g


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
    converse(cached, 30, ("a", "b"))
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
    writer.codec = copy.copy(cached.codec)   # (the same delta bases ...
    writer.codec.values = ValueCache()       # ... and, for now, the same cached bytes)
    writer.codec.values._entries.update(cached.codec.values._entries)
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
    g = converse(cached, 6, ("a", "b"))
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
        def within() -> None:
            assert cached.codec.values.bytes <= bound
        converse(cached, 8, [f"t{t}" for t in range(20)], "y" * 30, within)
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


def full_copies(saver, tid: str) -> int:
    """How many of the thread's ``log`` versions are stored whole (not appended items)."""
    versions = {t.checkpoint["channel_versions"]["log"] for t in saver.list(cfg(tid))
                if "log" in t.checkpoint["channel_versions"]}
    return sum(not isinstance(saver.store.get(saver.keys.at(tid, "").blob("log", v)), dict)
               for v in versions)


@pytest.mark.parametrize("bound", [0, 4608, 32 << 20])
def test_lists_are_stored_as_deltas_whether_the_base_is_cached_or_evicted(tmp_path, bound):
    """The next put checks that a list extends its base against the cached bytes of the
    base (a memcmp) or, when the cache is off or dropped them, against the base's digest
    (kept at eviction): either way a growing list is stored as appended items."""
    store = walstore.open(str(tmp_path / "store"), durability="none")
    try:
        cached = WalstoreSaver(store, value_cache_bytes=bound)
        plain = WalstoreSaver(store, value_cache_bytes=0)
        converse(cached, 6, [f"t{t}" for t in range(6)], "w" * 60)
        assert [full_copies(cached, f"t{t}") for t in range(6)] == [1] * 6  # the first
        if bound == 4608:
            assert len(cached.codec.values._entries) < 6  # (some bases were evicted)
        for t in range(6):
            assert every_state(cached, f"t{t}") == every_state(plain, f"t{t}")
    finally:
        store.close()


def test_a_base_evicted_before_the_next_put_still_gets_a_delta(tmp_path):
    """A writer that puts without reading through the caching saver: thread a's base is
    evicted by other threads' values before a's next put, which still stores a delta,
    checked against the digest taken at eviction."""
    store = walstore.open(str(tmp_path / "store"), durability="none")
    try:
        saver = WalstoreSaver(store, value_cache_bytes=4096)
        plain = WalstoreSaver(store, value_cache_bytes=0)  # reads, leaving saver's cache be
        heads: dict = {}
        logs: dict = {}

        def put(tid: str, item: str) -> str:
            logs.setdefault(tid, []).append(item + " " + "z" * 300)
            conf = heads.get(tid, {"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
            prev = plain.get_tuple(conf) if tid in heads else None
            version = saver.get_next_version(
                prev.checkpoint["channel_versions"]["log"] if prev else None)
            cp = empty_checkpoint()
            cp["channel_values"] = {"log": list(logs[tid])}
            cp["channel_versions"] = {"log": version}
            heads[tid] = saver.put(conf, cp, {"step": len(logs[tid])}, {"log": version})
            return version

        put("a", "a0")
        put("a", "a1")
        for other in "bcdefg":  # push a's newest value out of the cache
            put(other, other)
        assert not [k for k in saver.codec.values._entries
                    if k[0].startswith(saver.thread_scope("a"))]
        version = put("a", "a2")
        stored = store.get(saver.keys.at("a", "").blob("log", version))
        assert isinstance(stored, dict), "a full copy: the evicted base's digest was lost"
        assert plain.get_tuple(cfg("a")).checkpoint["channel_values"]["log"] == logs["a"]
    finally:
        store.close()


def test_the_cache_bound_is_what_its_entries_really_take():
    """Many small entries (one per conversation): the bytes the cache counts must be
    about what Python allocates for them (it counted value bytes + 64, and 4 MiB of
    "cache" took 22 MiB).  (A 1 MiB cache, 25,000 puts: ten times what fills it; with
    the old count it takes 3.5 times its bound, 0.9 now.)"""
    import os
    import tracemalloc
    from walstore.integrations.langgraph.blobs import ValueCache
    bound = 1 << 20
    cache = ValueCache(bound)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(25_000):
            typed = ("msgpack", os.urandom(16))
            cache.put(b"lg/ckpt/thread-%08d/ns/" % i, "messages", "%010d.%012x" % (5, i),
                      ("msgpack", typed[1]), typed)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.bytes <= bound and len(cache._entries) > 1000
    assert used <= 1.5 * bound, f"{used >> 20} MiB for a {bound >> 20} MiB cache"
