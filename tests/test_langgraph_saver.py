"""WalstoreSaver: LangGraph's official conformance suite, write fencing, size, undo.

Needs the ``langgraph`` extra (langgraph, langgraph-checkpoint-conformance,
pytest-asyncio); the whole module is skipped without them.
"""
from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, TypedDict

import msgpack
import pytest

pytest.importorskip("langgraph.checkpoint.base")
conformance = pytest.importorskip("langgraph.checkpoint.conformance")
pytest.importorskip("pytest_asyncio")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.graph.message import add_messages  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import (StaleCheckpointError, StateTypeError,  # noqa: E402
                                             WalstoreSaver)

ROOT = Path(__file__).resolve().parent.parent
ALL_CAPABILITIES = {"put", "put_writes", "get_tuple", "list", "delete_thread",
                    "delete_for_runs", "copy_thread", "prune"}


@pytest.fixture
def saver(tmp_path):
    s = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


def run_config(loaded: dict, put_result: dict) -> dict:
    """The config LangGraph passes to a run's next put: the loaded config's keys, with the
    checkpoint id of the run's last put."""
    return {"configurable": {**loaded["configurable"], **put_result["configurable"]}}


def cfg(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> dict:
    c = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns}}
    if checkpoint_id:
        c["configurable"]["checkpoint_id"] = checkpoint_id
    return c


def checkpoint(**values) -> dict:
    c = empty_checkpoint()
    c["channel_values"] = dict(values)
    c["channel_versions"] = {k: 1 for k in values}
    return c


# ---- the official conformance suite -------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("durability", ["full", "none"])
async def test_conformance_suite_passes_every_capability(tmp_path, durability):
    made = []

    @conformance.checkpointer_test(name=f"WalstoreSaver-{durability}")
    async def factory():
        saver = WalstoreSaver.from_path(str(tmp_path / f"store-{len(made)}"),
                                        durability=durability)
        made.append(saver)
        try:
            yield saver
        finally:
            saver.close()

    report = await conformance.validate(factory)
    failures = {name: r.failures for name, r in report.results.items() if r.failures}
    assert report.passed_all_base(), failures
    assert set(report.results) == ALL_CAPABILITIES
    for name in ALL_CAPABILITIES:  # the optional three too: detected and passed
        result = report.results[name]
        assert result.detected and result.passed is True and result.tests_failed == 0, \
            (name, result.failures)
    assert report.conformance_level() == "FULL"
    assert len(made) == len(ALL_CAPABILITIES)  # a fresh saver per capability suite


# ---- write fencing ------------------------------------------------------------------------
def test_racing_writers_exactly_one_wins_per_parent(saver):
    """Writers that loaded the thread's head race to extend it: one wins each round, the
    others are fenced, however their puts interleave in time."""
    saver.put(cfg("t"), checkpoint(x=0), {"source": "input", "step": -1}, {"x": 1})
    writers = 8
    parent_id = None
    for rnd in range(10):
        loaded = saver.get_tuple(cfg("t")).config  # what a run does: load the latest
        parent_id = loaded["configurable"]["checkpoint_id"]
        barrier = threading.Barrier(writers)
        won, lost, other = [], [], []

        def write(i):
            c = checkpoint(x=f"round {rnd} writer {i}")
            c["channel_versions"] = {"x": saver.get_next_version(rnd + 1, None)}
            barrier.wait()
            try:
                saver.put(loaded, c, {"source": "loop", "step": rnd}, c["channel_versions"])
                won.append(c["id"])
            except StaleCheckpointError:
                lost.append(i)
            except BaseException as e:  # pragma: no cover - reported below
                other.append(e)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not other
        assert len(won) == 1 and len(lost) == writers - 1, (rnd, won, lost)
        head = saver.get_tuple(cfg("t"))
        assert head.checkpoint["id"] == won[0]
        assert head.parent_config["configurable"]["checkpoint_id"] == parent_id
    chain = list(saver.list(cfg("t")))
    assert len(chain) == 11  # no forks: one straight line of winners
    for newer, older in zip(chain, chain[1:]):
        assert newer.parent_config["configurable"]["checkpoint_id"] == older.checkpoint["id"]


def test_superseded_writer_is_refused_but_an_explicit_fork_is_not(saver):
    """The langgraph issue 8796 scenario: two workers load the same head, one writes; the
    other is fenced even though the puts never overlap.  Addressing an older checkpoint
    explicitly (time travel) is a fork, as in SqliteSaver."""
    root = saver.put(cfg("t"), checkpoint(x=1), {"source": "input", "step": -1}, {"x": 1})
    worker_a = saver.get_tuple(cfg("t")).config
    worker_b = saver.get_tuple(cfg("t")).config
    a = saver.put(worker_a, checkpoint(x=2), {"source": "loop", "step": 0}, {"x": 2})
    with pytest.raises(StaleCheckpointError) as ei:
        saver.put(worker_b, checkpoint(x=3), {"source": "loop", "step": 0}, {"x": 3})
    assert isinstance(ei.value, walstore.ConflictError)
    assert ei.value.head == a["configurable"]["checkpoint_id"]
    assert ei.value.parent == root["configurable"]["checkpoint_id"]
    assert [t.checkpoint["id"] for t in saver.list(cfg("t"))] == [
        a["configurable"]["checkpoint_id"], root["configurable"]["checkpoint_id"]]
    # the winning run goes on from its own put (LangGraph keeps the loaded config's keys)
    a2 = saver.put(run_config(worker_a, a), checkpoint(x=5), {"source": "loop", "step": 1},
                   {"x": 5})
    assert saver.get_tuple(a2).parent_config["configurable"]["checkpoint_id"] == \
        a["configurable"]["checkpoint_id"]
    # time travel: the root addressed explicitly is a fork, allowed
    explicit = saver.get_tuple(root).config
    fork = saver.put(explicit, checkpoint(x=4), {"source": "input", "step": 0}, {"x": 4})
    assert saver.get_tuple(cfg("t")).checkpoint["id"] == fork["configurable"]["checkpoint_id"]
    assert saver.get_tuple(fork).parent_config["configurable"]["checkpoint_id"] == \
        root["configurable"]["checkpoint_id"]
    # a user config kept from an earlier get_state (a latest-load) and then used to address
    # that checkpoint explicitly forks too: LangGraph merges the explicit load's config in
    kept = saver.get_tuple(cfg("t")).config
    saver.put(cfg("t"), checkpoint(x=7), {"source": "update", "step": 9}, {"x": 7})
    merged = {"configurable": {**kept["configurable"],
                               **saver.get_tuple(kept).config["configurable"]}}
    saver.put(merged, checkpoint(x=8), {"source": "input", "step": 9}, {"x": 8})
    # and fencing=False turns the check off
    saver.fencing = False
    saver.put(worker_b, checkpoint(x=6), {"source": "loop", "step": 0}, {"x": 6})


class Log(TypedDict):
    log: Annotated[list, operator.add]


def test_two_graph_runs_on_one_thread_one_is_fenced_off(saver):
    import time

    def slow(state: Log) -> dict:
        time.sleep(0.3)
        return {"log": [f"{threading.current_thread().name} done"]}

    b = StateGraph(Log)
    b.add_node("slow", slow)
    b.add_edge(START, "slow")
    b.add_edge("slow", END)
    graph = b.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "shared"}}
    graph.invoke({"log": ["start"]}, config)
    results: dict = {}

    def run(name):
        try:
            results[name] = graph.invoke({"log": [name]}, config)
        except walstore.ConflictError as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(f"w{i}",), name=f"w{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [n for n, r in results.items() if isinstance(r, dict)]
    fenced = [n for n, r in results.items() if isinstance(r, walstore.ConflictError)]
    assert len(ok) == 1 and len(fenced) == 1, results
    history = list(graph.get_state_history(config))
    for newer, older in zip(history, history[1:]):  # one straight line, no fork
        assert newer.parent_config["configurable"]["checkpoint_id"] == \
            older.config["configurable"]["checkpoint_id"]
    final = graph.get_state(config).values["log"]
    # the winner's work is in the thread; the fenced-off run's never got in (its input may
    # have, when the winner started after it and built on it: a line, not a fork)
    assert f"{ok[0]} done" in final and f"{fenced[0]} done" not in final


# ---- behaviour of real graphs -------------------------------------------------------------
class Chat(TypedDict):
    messages: Annotated[list, add_messages]
    step: int


def chat_builder(steps: int, size: int = 400) -> StateGraph:
    def agent(state: Chat) -> dict:
        n = state["step"] + 1
        return {"messages": [AIMessage(f"thought {n} " + "x" * size, id=f"ai-{n}",
                                       tool_calls=[{"name": "look", "args": {"n": n},
                                                    "id": f"c{n}"}])],
                "step": n}

    def tools(state: Chat) -> dict:
        n = state["step"]
        return {"messages": [ToolMessage(f"result {n} " + "y" * size, tool_call_id=f"c{n}",
                                         id=f"tool-{n}")]}

    b = StateGraph(Chat)
    b.add_node("agent", agent)
    b.add_node("tools", tools)
    b.add_edge(START, "agent")
    b.add_edge("agent", "tools")
    b.add_conditional_edges("tools", lambda s: END if s["step"] >= steps else "agent")
    return b


def history_of(saver, steps: int = 20) -> list:
    graph = chat_builder(steps, size=50).compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "chat"}}
    graph.invoke({"messages": [HumanMessage("hi", id="h")], "step": 0}, config)
    old = next(s for s in graph.get_state_history(config) if s.metadata["step"] == 7)
    graph.update_state(old.config, {"step": steps - 3})   # time travel: a fork
    graph.invoke(None, config)
    return [(s.metadata["step"], s.metadata["source"], s.values, s.next)
            for s in graph.get_state_history(config)]


def test_graph_history_matches_the_in_memory_saver_including_forks(saver):
    ours = history_of(saver)
    theirs = history_of(InMemorySaver())
    assert ours == theirs
    assert len(ours) > 40


def test_state_survives_reopen_prune_and_delete_for_runs(tmp_path):
    path = str(tmp_path / "store")
    saver = WalstoreSaver.from_path(path, durability="full")
    graph = chat_builder(30, size=100).compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "t", "run_id": "r1"}}
    graph.invoke({"messages": [HumanMessage("hi", id="h")], "step": 0}, config)
    before = graph.get_state(config).values
    saver.close()
    saver = WalstoreSaver.from_path(path, durability="full")  # fresh process state
    graph = chat_builder(30, size=100).compile(checkpointer=saver)
    assert graph.get_state(config).values == before
    # prune keeps the newest checkpoint and the delta bases its values are rebuilt from
    saver.prune(["t"])
    assert len(list(saver.list(cfg("t")))) == 1
    assert graph.get_state(config).values == before
    assert len(before["messages"]) == 61
    saver.delete_for_runs(["r1"])
    assert saver.get_tuple(cfg("t")) is None
    assert list(saver.store.scan(prefix=b"lg")) == []  # nothing left behind
    saver.close()


def test_long_thread_ids_and_namespaces_are_hashed_into_keys(saver):
    thread = "t" * 300
    ns = "child:" + "n" * 400
    stored = saver.put(cfg(thread, ns=ns), checkpoint(v="x"), {"source": "input", "step": -1},
                       {"v": 1})
    saver.put_writes(stored, [("v", "w")], "task-" + "k" * 200)
    tup = saver.get_tuple(cfg(thread, ns=ns))
    assert tup.checkpoint["channel_values"] == {"v": "x"}
    assert tup.pending_writes[0][2] == "w"
    listed = list(saver.list(None))
    assert [(t.config["configurable"]["thread_id"], t.config["configurable"]["checkpoint_ns"])
            for t in listed] == [(thread, ns)]
    saver.copy_thread(thread, "copy")
    assert saver.get_tuple(cfg("copy", ns=ns)).checkpoint["channel_values"] == {"v": "x"}
    saver.delete_thread(thread)
    assert saver.get_tuple(cfg(thread, ns=ns)) is None
    assert saver.get_tuple(cfg("copy", ns=ns)) is not None


class PicklingSerde:
    """A serde that would pickle (like JsonPlusSerializer(pickle_fallback=True))."""

    def dumps_typed(self, obj):
        return "pickle", b"not really a pickle"

    def loads_typed(self, data):  # pragma: no cover - must never be reached
        raise AssertionError("loads_typed called on a pickle")


def test_pickle_is_refused_on_write_and_on_read(saver):
    with pytest.raises(ValueError, match="pickle_fallback"):
        WalstoreSaver(saver.store, serde=JsonPlusSerializer(pickle_fallback=True))
    unsafe = WalstoreSaver(saver.store, serde=PicklingSerde(), key_prefix=b"unsafe")
    with pytest.raises(TypeError, match="pickle"):
        unsafe.put(cfg("t"), checkpoint(v=1), {"source": "input", "step": -1}, {"v": 1})
    assert list(saver.store.scan(prefix=b"unsafe")) == []
    # a pickled value planted in the store is never unpickled
    stored = saver.put(cfg("t"), checkpoint(v=1), {"source": "input", "step": -1}, {"v": 1})
    key = saver.keys.at("t", "").blob("v", 1)
    with saver.store.transaction() as tx:
        tx.put(key, ["pickle", b"cos\nsystem\n(S'echo pwned'\ntR."])
    with pytest.raises(ValueError, match="unpickle"):
        saver.get_tuple(stored)


def test_a_crafted_store_cannot_make_the_saver_call_code(saver, monkeypatch):
    """LangGraph's default serde rebuilds any module.callable named in the data (here
    os.getpid); the saver's serde refuses, loudly, and never calls it."""
    import ormsgpack
    call = ormsgpack.packb(ormsgpack.Ext(1, ormsgpack.packb(["os", "getpid", []])))
    assert JsonPlusSerializer().loads_typed(("msgpack", call)) == os.getpid()  # the risk
    stored = saver.put(cfg("t"), checkpoint(v=1), {"source": "input", "step": -1}, {"v": 1})
    with saver.store.transaction() as tx:
        tx.put(saver.keys.at("t", "").blob("v", 1), ["msgpack", call])
    calls = []
    monkeypatch.setattr(os, "getpid", lambda: calls.append(1) or 4242)
    with pytest.raises(StateTypeError, match="os.getpid"):
        saver.get_tuple(stored)
    assert calls == []


# ---- size -----------------------------------------------------------------------------------
def test_storage_grows_with_what_changed_not_with_the_state(tmp_path):
    """A step stores only new channel versions; a grown list stores only its new items."""
    steps = 150
    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    graph = chat_builder(steps).compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "size"}, "recursion_limit": 10 * steps}
    graph.invoke({"messages": [HumanMessage("hi", id="h")], "step": 0}, config)
    snapshots = list(saver.list(cfg("size")))
    assert len(snapshots) == 2 * steps + 2
    # what a saver storing every channel's full value per checkpoint writes (SqliteSaver)
    serde = JsonPlusSerializer()
    full = sum(len(serde.dumps_typed(t.checkpoint)[1]) for t in snapshots)
    # what walstore keeps under the saver's keys
    live = sum(len(k) + len(msgpack.packb(v, use_bin_type=True))
               for k, v in saver.store.scan())
    messages = sum(len(serde.dumps_typed(m)[1])
                   for m in snapshots[0].checkpoint["channel_values"]["messages"])
    assert full > 5_000_000  # the quadratic baseline is real (28 MB here)
    assert live < full / 25, (live, full)  # 1/60 here
    assert live < 4 * messages, (live, messages)  # linear in the conversation (2.4x here)
    # and the LMDB file holds it compactly too (history index included)
    saver.store.checkpoint()
    lmdb_bytes = sum(f.stat().st_blocks * 512 for f in (tmp_path / "store" / "db").iterdir())
    assert lmdb_bytes < full / 5, (lmdb_bytes, full)
    saver.close()


CRASH_CHILD = r"""
import sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from test_langgraph_saver import chat_builder, HumanMessage
from walstore.integrations.langgraph import WalstoreSaver

saver = WalstoreSaver.from_path(sys.argv[1], durability="full")
graph = chat_builder(40, size=200).compile(checkpointer=saver)
config = {"configurable": {"thread_id": "crash"}, "recursion_limit": 1000}
for event in graph.stream({"messages": [HumanMessage("hi", id="h")], "step": 0}, config,
                          stream_mode="updates", durability="sync"):
    print("update", flush=True)
print("finished", flush=True)
"""


def test_killed_mid_run_the_thread_reloads_and_resumes_to_the_same_end(tmp_path):
    import signal
    path = str(tmp_path / "store")
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, path, str(ROOT / "tests"),
                              str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    seen = 0
    for line in child.stdout:
        seen += line.startswith("update")
        if seen >= 25:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    saver = WalstoreSaver.from_path(path, durability="full")  # recovers the store
    chain = list(saver.list(cfg("crash")))
    assert len(chain) >= 20
    for newer, older in zip(chain, chain[1:]):  # every checkpoint whole, one line
        assert newer.parent_config["configurable"]["checkpoint_id"] == older.checkpoint["id"]
        assert len(newer.checkpoint["channel_values"]["messages"]) >= \
            len(older.checkpoint["channel_values"].get("messages", []))
    graph = chat_builder(40, size=200).compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "crash"}, "recursion_limit": 1000}
    resumed = graph.invoke(None, config)
    reference = chat_builder(40, size=200).compile(checkpointer=InMemorySaver()).invoke(
        {"messages": [HumanMessage("hi", id="h")], "step": 0},
        {"configurable": {"thread_id": "ref"}, "recursion_limit": 1000})
    assert resumed == reference
    saver.close()


# ---- the example -------------------------------------------------------------------------
def test_example_agent_runs_and_undoes_its_bookings(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "langgraph_agent.py"),
                          "--dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "retrying with the same idempotency key" in text
    assert "compensation: cancelled H-003 (Oslo)" in text
    assert text.index("cancelled H-003 (Oslo)") < text.index("cancelled H-002 (Rome)")
    summary = json.loads(text.strip().splitlines()[-1])
    ours = summary["walstore"]
    ledger = json.loads((tmp_path / "hotel.json").read_text())
    status = {b["city"]: b["status"] for b in ledger["bookings"].values()}
    assert status == {"Paris": "booked", "Rome": "cancelled", "Oslo": "cancelled",
                      "Lisbon": "booked"}
    assert len(ledger["bookings"]) == 4  # the Rome retry did not book twice
    assert ours["active"] == ["Paris", "Lisbon"]
    assert ours["actions"] == {"Paris": "committed", "Rome": "compensated",
                               "Oslo": "compensated", "Lisbon": "committed"}
    assert [b.split(":")[0] for b in ours["booked_in_state"]] == ["Paris", "Lisbon"]
    # the memories the undone bookings wrote were undone with them
    assert ours["memories_after_rewind"] == ["Paris"]
    assert ours["memories"] == ["Lisbon", "Paris"]
    assert summary["plain"]["active"] == ["Paris", "Rome", "Oslo", "Lisbon"]
    assert os.path.isdir(tmp_path / "store")


# ---- checkpoints written by walstore 0.1.x ---------------------------------------------------
def _old_key(letter: bytes, *parts: str, tail: bytes = b"") -> bytes:
    """A key of walstore 0.1.x's saver layout (834c32b and before): ``lg`` + one letter +
    self-delimiting parts (msgpack str) + a tail, e.g. ``lgc <thread> <ns> <checkpoint id>``."""
    return b"lg" + letter + b"".join(msgpack.packb(p) for p in parts) + tail


def test_checkpoints_of_the_0_1_layout_are_refused_loudly_not_read_as_none(tmp_path):
    """The key layout changed (``lgc...`` to ``lg\\x00...``, c58a9bd); a saver over a store
    whose threads 0.1.0 wrote saw no checkpoint at all (get_tuple None, list empty) and the
    next invoke started the thread over, silently (found by an upgrade probe running
    0.1.0's code).  Now the saver refuses at construction, naming the problem and the ways
    out; the keys are written here in 0.1.0's layout (as its saver wrote them for thread
    "t1", namespace "")."""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        with s.transaction() as tx:
            tx.put(b"lgcat", "an application key beside the saver's: not a checkpoint")
        WalstoreSaver(s)  # (fine)
        with s.transaction() as tx:
            tx.put(_old_key(b"c", "t1", "", tail=b"1f1ee041-1138-6f93"), {"c": b"x"})
            tx.put(_old_key(b"h", "t1", ""), b"1f1ee041-1138-6f93")
            tx.put(_old_key(b"b", "t1", "", "n", "00001.0"), b"x")
        with pytest.raises(walstore.WalstoreError,
                           match=r"(?s)written by walstore 0\.1\.x \(thread 't1'.*does not "
                                 r"read.*Nothing was changed.*store\.purge"):
            WalstoreSaver(s)
        assert len(list(s.scan(prefix=b"lg"))) == 4
        WalstoreSaver(s, key_prefix=b"lg2")  # another prefix leaves them where they are
        for letter in b"cbhwr":
            s.purge(b"lg" + bytes([letter]))
        saver = WalstoreSaver(s)  # erased: the default prefix works again
        assert saver.get_tuple({"configurable": {"thread_id": "t1"}}) is None
    finally:
        s.close()
    with pytest.raises(walstore.WalstoreError, match="walstore 0.1.x"):
        path = str(tmp_path / "t")
        with walstore.open(path, durability="none") as t:
            with t.transaction() as tx:
                tx.put(_old_key(b"c", "t" * 40, "sub", tail=b"1ef"), {"c": b"x"})
        WalstoreSaver.from_path(path, durability="none")
    with walstore.open(path, durability="none") as t:  # (from_path closed what it opened)
        assert len(list(t.scan())) == 1
