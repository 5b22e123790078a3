"""Audit 54 of the integrations: WalstoreSaver, WalstoreStore, WalstoreSession, the
``transaction`` package join, and the examples.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import asyncio
import os
import tracemalloc

import pytest

pytest.importorskip("langgraph")

from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402

# (``store``: conftest's, a durability="none" store in the test's directory)


# ---- WalstoreSaver: alist --------------------------------------------------------------
def _fill_thread(saver: WalstoreSaver, thread: str, n: int, size: int) -> None:
    """n checkpoints in a line, each holding a fresh channel value of ``size`` bytes."""
    head = None
    for i in range(n):
        c = empty_checkpoint()
        c["channel_values"] = {"blob": os.urandom(size // 2).hex()}
        c["channel_versions"] = {"blob": i + 1}
        conf = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        if head is not None:
            conf["configurable"]["checkpoint_id"] = head
        head = saver.put(conf, c, {"step": i}, {"blob": i + 1})["configurable"]["checkpoint_id"]


def test_alist_streams_the_thread_as_list_does(tmp_path):
    """``alist`` decoded every checkpoint of the thread (channel values and all) in a
    worker thread before yielding the first: an ``async for`` that stopped after one (as
    ``aget_state_history`` read until a match) peaked at 8 MB beside 40 checkpoints of
    100 KB and 33 MB beside 160 (tracemalloc), where ``list`` held one.  It now streams a
    few at a time; its rows and order are ``list``'s, and closing it early is clean."""
    async def first(saver):
        async for t in saver.alist({"configurable": {"thread_id": "t"}}):
            return t

    peaks = []
    for n in (20, 80):
        saver = WalstoreSaver.from_path(str(tmp_path / f"s{n}"), durability="none")
        try:
            _fill_thread(saver, "t", n, 100_000)
            tracemalloc.start()
            try:
                got = asyncio.run(first(saver))
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            newest = next(iter(saver.list({"configurable": {"thread_id": "t"}})))
            assert got.config == newest.config
        finally:
            saver.close()
    # before: ~2 MB and ~8 MB (every checkpoint held); now about one checkpoint's worth
    assert peaks[1] < 1_500_000 and peaks[1] < peaks[0] + 500_000, peaks

    saver = WalstoreSaver.from_path(str(tmp_path / "order"), durability="none")
    try:
        _fill_thread(saver, "t", 70, 100)
        conf = {"configurable": {"thread_id": "t"}}

        async def listed(**kw):
            return [t.config["configurable"]["checkpoint_id"]
                    async for t in saver.alist(conf, **kw)]

        async def closed_early():
            rows = saver.alist(conf)
            ids = [(await rows.__anext__()).config["configurable"]["checkpoint_id"]
                   for _ in range(3)]
            await rows.aclose()
            return ids
        want = [t.config["configurable"]["checkpoint_id"] for t in saver.list(conf)]
        assert len(want) == 70
        assert asyncio.run(listed()) == want
        assert asyncio.run(listed(limit=33)) == want[:33]
        assert asyncio.run(listed(filter={"step": 5})) == [want[-6]]
        assert asyncio.run(closed_early()) == want[:3]
    finally:
        saver.close()


def test_listing_a_whole_history_holds_no_more_than_a_checkpoint_at_a_time(tmp_path):
    """``list`` (and ``alist``, ``get_state_history``) kept, in the memo that spares
    re-reading a version two checkpoints share, every channel version it had read: a
    whole history of a growing ``messages`` list held each step's rebuilt list at once
    (160 checkpoints of one 1 KB message more each: 13 MB, quadratic in the thread's
    length; the newest value is 0.16 MB).  The memo now keeps the versions of the
    checkpoint just read; the values listed are the same."""
    def fill(saver):
        head, msgs, version = None, [], None
        for i in range(160):
            msgs = msgs + [os.urandom(500).hex()]
            version = saver.get_next_version(version)
            c = empty_checkpoint()
            c["channel_values"] = {"messages": msgs, "fixed": "same"}
            c["channel_versions"] = {"messages": version, "fixed": "0000000001.0"}
            conf = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
            if head is not None:
                conf["configurable"]["checkpoint_id"] = head
            head = saver.put(conf, c, {"step": i},
                             {"messages": version} if i else c["channel_versions"]
                             )["configurable"]["checkpoint_id"]

    saver = WalstoreSaver.from_path(str(tmp_path / "s"), durability="none")
    try:
        fill(saver)
        conf = {"configurable": {"thread_id": "t"}}

        async def alisted():
            return [len(t.checkpoint["channel_values"]["messages"])
                    async for t in saver.alist(conf)]
        tracemalloc.start()
        try:
            lengths = []
            for t in saver.list(conf):
                assert t.checkpoint["channel_values"]["fixed"] == "same"
                lengths.append(len(t.checkpoint["channel_values"]["messages"]))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert lengths == list(range(160, 0, -1))
        assert peak < 4_000_000, peak  # before: ~13.5 MB
        assert asyncio.run(alisted()) == lengths
    finally:
        saver.close()


# ---- WalstoreStore: TTL ------------------------------------------------------------------
def test_a_ttl_sweep_holds_the_scopes_of_the_expired_items_not_their_values(store):
    """``sweep_ttl`` read the whole record of each expired item of a batch (up to 512,
    each up to 16 MiB) to learn the scope its writer recorded, and held them all: 80
    expired items of 500 KB peaked at 41 MB.  It now keeps the scope only; the items
    are swept as before."""
    from walstore.integrations.langgraph import WalstoreStore
    memory = WalstoreStore(store)
    for i in range(80):
        memory.put(("m",), f"k{i}", {"blob": os.urandom(250_000).hex()}, ttl=0)
    memory.put(("m",), "kept", {"x": 1})
    tracemalloc.start()
    try:
        swept = memory.sweep_ttl()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert swept == 80
    assert [i.key for i in memory.search(("m",))] == ["kept"]
    assert peak < 8_000_000, peak  # before: ~41 MB


# ---- WalstoreSession ---------------------------------------------------------------------
def test_sessions_that_are_gone_leave_nothing_behind(store):
    """Each session id ever opened on a store kept its writer lock in a module dict for
    the store's lifetime: a server opening one WalstoreSession per conversation kept
    ~190 bytes per id for good (20,000 ids: 3.5 MB; 80,000: 19 MB).  The locks are now
    held by the session objects (two of one session still share theirs)."""
    import gc

    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession
    a, b = WalstoreSession("u", store), WalstoreSession("u", store)
    assert a._lock is b._lock and WalstoreSession("v", store)._lock is not a._lock
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            WalstoreSession(f"user-{i}", store)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert retained < 500_000, retained  # before: ~3.5 MB
    assert a._lock is WalstoreSession("u", store)._lock


# ---- reads of big items (the store's scans) ----------------------------------------------
def test_reading_the_first_of_many_big_items_holds_a_few_of_them(store):
    """A snapshot scan read LMDB in chunks of rows (16, then 64, then 256) whatever their
    size, so ``WalstoreStore.search(ns, limit=1)`` over items of 2 MiB held 16 of them
    (34 MB, tracemalloc) and a session's ``get_items(1)`` the same (items up to 16 MiB:
    up to 4 GiB for a chunk of 256).  A chunk now also stops at 8 MiB of values."""
    from walstore.integrations.langgraph import WalstoreStore
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession
    memory = WalstoreStore(store)
    session = WalstoreSession("big", store)
    for i in range(20):
        memory.put(("big",), f"k{i:02d}", {"b": os.urandom(2 << 20)})
    asyncio.run(session.add_items([{"role": "user", "content": os.urandom(1 << 20).hex()}
                                   for _ in range(20)]))
    store.checkpoint()  # (the items in LMDB, where scans read chunks)

    def peak_of(fn):
        tracemalloc.start()
        try:
            out = fn()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    found, peak = peak_of(lambda: memory.search(("big",), limit=1))
    assert [i.key for i in found] == ["k00"]
    assert peak < 16_000_000, peak  # before: ~34 MB
    items, peak = peak_of(lambda: asyncio.run(session.get_items(1)))
    assert len(items) == 1
    assert peak < 16_000_000, peak  # before: ~34 MB
    assert len(list(store.scan(prefix="oa/big/"))) == 20


def test_copy_thread_holds_a_step_of_the_source_not_all_of_it(tmp_path):
    """``copy_thread`` read the whole source thread (every checkpoint, blob and pending
    write, values and all) into memory before writing the first copy transaction: 240
    checkpoints of 100 KB peaked at 32.6 MB (a long thread: all of it).  It now keeps a
    snapshot transaction open and reads each copy step's values as it writes it (what
    plans the steps is kept: keys, checkpoint records, delta bases); the copy is the same,
    one transaction per checkpoint, and rewinds to any of its checkpoints as before."""
    saver = WalstoreSaver.from_path(str(tmp_path / "s"), durability="none",
                                    max_unapplied_bytes=1 << 20)
    try:
        head = None
        for i in range(240):
            c = empty_checkpoint()
            c["channel_values"] = {"blob": os.urandom(100_000)}
            c["channel_versions"] = {"blob": i + 1}
            conf = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
            if head is not None:
                conf["configurable"]["checkpoint_id"] = head
            head = saver.put(conf, c, {"step": i}, {"blob": i + 1})
            head = head["configurable"]["checkpoint_id"]
        tracemalloc.start()
        try:
            saver.copy_thread("t", "u")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16_000_000, peak  # before: ~32.6 MB
        src = list(saver.list({"configurable": {"thread_id": "t"}}))
        dst = list(saver.list({"configurable": {"thread_id": "u"}}))
        assert [t.checkpoint["id"] for t in dst] == [t.checkpoint["id"] for t in src]
        assert all(a.checkpoint["channel_values"] == b.checkpoint["channel_values"]
                   for a, b in zip(src, dst))
        mid = dst[100].config
        saver.rewind(mid)
        assert saver.get_tuple({"configurable": {"thread_id": "u"}}).checkpoint["id"] \
            == mid["configurable"]["checkpoint_id"]
        assert len(list(saver.list({"configurable": {"thread_id": "t"}}))) == 240
    finally:
        saver.close()


def test_a_page_of_every_threads_checkpoints_holds_the_page(tmp_path):
    """``list(None, limit=k)`` (every thread's checkpoints, newest first) held every
    checkpoint record of the store to sort them, whatever ``k``: 2,000 threads of three
    checkpoints peaked at 7.8 MB for one row (1,000: 3.8 MB).  It now keeps the ``k`` newest that pass the
    filter; the rows and their order are the full sort's (``before``, ``filter``, a
    namespace, and copied threads sharing checkpoint ids included)."""
    saver = WalstoreSaver.from_path(str(tmp_path / "s"), durability="none")
    try:
        def fill(first: int, n: int) -> None:
            for t in range(first, first + n):
                head = None
                for i in range(3):
                    c = empty_checkpoint()
                    c["channel_values"] = {"x": i}
                    c["channel_versions"] = {"x": i + 1}
                    conf = {"configurable": {"thread_id": f"t{t}", "checkpoint_ns": ""}}
                    if head is not None:
                        conf["configurable"]["checkpoint_id"] = head
                    head = saver.put(conf, c, {"step": i, "even": t % 2 == 0, "pad": "p" * 300},
                                     {"x": i + 1})["configurable"]["checkpoint_id"]

        def peak(n: int) -> int:
            saver.store.checkpoint()  # (applied: the unapplied keys' index is not measured)
            tracemalloc.start()
            try:
                assert len(list(saver.list(None, limit=1))) == 1
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        fill(0, 250)
        small = peak(250)
        fill(250, 750)
        big = peak(1000)
        assert big < small + 1_000_000, (small, big)  # before: ~1 MB and ~3.8 MB

        saver.copy_thread("t7", "copy-of-t7")  # (checkpoint ids shared with t7)
        every = [(t.config["configurable"]["thread_id"], t.checkpoint["id"])
                 for t in saver.list(None)]
        assert len(every) == 1001 * 3
        assert [r[1] for r in every] == sorted((r[1] for r in every), reverse=True)
        for kw in ({"limit": 5}, {"limit": 4, "filter": {"even": True}},
                   {"limit": 3, "filter": {"step": 0}},
                   {"limit": 6, "before": {"configurable": {"checkpoint_id": every[40][1]}}}):
            got = [(t.config["configurable"]["thread_id"], t.checkpoint["id"])
                   for t in saver.list(None, **kw)]
            want = [(t.config["configurable"]["thread_id"], t.checkpoint["id"])
                    for t in saver.list(None, **{k: v for k, v in kw.items() if k != "limit"})]
            assert got == want[:kw["limit"]], kw
        ids_of_t7 = {t.checkpoint["id"] for t in saver.list({"configurable": {"thread_id": "t7"}})}
        both = [r for r in every if r[1] in ids_of_t7]
        got = [(t.config["configurable"]["thread_id"], t.checkpoint["id"])
               for t in saver.list({"configurable": {"checkpoint_ns": ""}},
                                   filter={"step": 2}, limit=10**6)]
        assert [r for r in got if r[1] in ids_of_t7] == [r for r in both
                                                       if r[1] == max(ids_of_t7)]
    finally:
        saver.close()
