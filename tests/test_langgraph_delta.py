"""DeltaChannel support: ``get_delta_channel_history`` answers as InMemorySaver does, in one
transaction with two range reads, and ``prune`` keeps the chains delta values need."""
from __future__ import annotations

from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")
delta = pytest.importorskip("langgraph.channels.delta")

from langgraph.checkpoint.base import BaseCheckpointSaver  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402


def extend(state: list, writes: list) -> list:
    out = list(state)
    for w in writes:
        out.extend(w)
    return out


def delta_builder(stop: int, snapshot_frequency: int = 3) -> StateGraph:
    S = TypedDict("S", {"log": Annotated[list, delta.DeltaChannel(
        extend, snapshot_frequency=snapshot_frequency)], "n": int})

    def step(s: dict) -> dict:
        return {"log": [f"s{s['n']}"], "n": s["n"] + 1}

    b = StateGraph(S)
    b.add_node("step", step)
    b.add_edge(START, "step")
    b.add_conditional_edges("step", lambda s: END if s["n"] >= stop else "step")
    return b


def drive(saver) -> Any:
    """Step by step (interrupts), a fork by update_state from an older checkpoint."""
    graph = delta_builder(9).compile(checkpointer=saver, interrupt_before=["step"])
    cfg = {"configurable": {"thread_id": "t"}}
    graph.invoke({"log": ["start"], "n": 0}, cfg)
    for _ in range(5):
        graph.invoke(None, cfg)
    older = [h for h in graph.get_state_history(cfg)][3]
    graph.update_state(older.config, {"log": ["edited"]})
    for _ in range(3):
        graph.invoke(None, cfg)
    return graph, cfg


def observed(saver, graph, cfg) -> list:
    out = []
    for h in graph.get_state_history(cfg):
        hist = saver.get_delta_channel_history(config=h.config, channels=["log", "n", "nope"])
        out.append((h.values, {ch: ([(w[1], w[2]) for w in e["writes"]], e.get("seed", "-"))
                               for ch, e in hist.items()}))
    return out


def test_delta_history_matches_in_memory_saver_at_every_checkpoint(tmp_path):
    ref = InMemorySaver()
    ours = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    expected = observed(ref, *drive(ref))
    got = observed(ours, *drive(ours))
    assert got == expected
    assert any(entry["log"][1] != "-" for _v, entry in got)   # some seeds were found
    assert any(entry["log"][0] for _v, entry in got)          # and writes replayed
    ours.close()


class Counting:
    """A store proxy counting transactions, scans and gets."""

    def __init__(self, store) -> None:
        self.store, self.counts = store, {"transaction": 0, "scan": 0, "get": 0}

    def transaction(self, meta=None, **kw):
        self.counts["transaction"] += 1
        return CountingTx(self.store.transaction(meta=meta, **kw), self.counts)

    def __getattr__(self, name):
        return getattr(self.store, name)


class CountingTx:
    def __init__(self, tx, counts) -> None:
        self.tx, self.counts = tx, counts

    def __enter__(self):
        self.tx.__enter__()
        return self

    def __exit__(self, *exc):
        return self.tx.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.tx, name)

    def scan(self, *a, **kw):
        self.counts["scan"] += 1
        return self.tx.scan(*a, **kw)

    def get(self, *a, **kw):
        self.counts["get"] += 1
        return self.tx.get(*a, **kw)


@pytest.mark.parametrize("steps", [10, 40])
def test_delta_history_is_one_transaction_with_two_range_reads(tmp_path, steps):
    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    graph = delta_builder(steps, snapshot_frequency=1000).compile(checkpointer=saver)
    cfg = {"configurable": {"thread_id": "t"}, "recursion_limit": 10 * steps}
    graph.invoke({"log": ["start"], "n": 0}, cfg)
    head = graph.get_state(cfg).config
    real = saver.store
    saver.store = counting = Counting(real)
    ours = saver.get_delta_channel_history(config=head, channels=["log"])
    assert counting.counts["transaction"] == 1 and counting.counts["scan"] == 2
    assert counting.counts["get"] <= steps + 3  # the target, and a blob probe per version
    walked = Counting(real)
    saver.store = walked
    theirs = BaseCheckpointSaver.get_delta_channel_history(saver, config=head, channels=["log"])
    assert walked.counts["transaction"] > steps  # the default: a get_tuple per ancestor
    saver.store = real
    assert [(w[1], w[2]) for w in ours["log"]["writes"]] == \
        [(w[1], w[2]) for w in theirs["log"]["writes"]]
    assert len(ours["log"]["writes"]) == steps + 1  # the input and one per step
    saver.close()


def test_prune_keeps_the_delta_chain_of_the_kept_checkpoint(tmp_path):
    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    graph = delta_builder(11, snapshot_frequency=4).compile(checkpointer=saver,
                                                            interrupt_before=["step"])
    cfg = {"configurable": {"thread_id": "t"}}
    graph.invoke({"log": ["start"], "n": 0}, cfg)
    for _ in range(6):  # the head is 2 updates past a snapshot
        graph.invoke(None, cfg)
    before = graph.get_state(cfg).values
    total = len(list(saver.list(cfg)))
    counters = graph.get_state(cfg).metadata.get("counters_since_delta_snapshot")
    assert counters and counters["log"][0] > 0  # the head is no snapshot itself
    saver.prune(["t"])
    kept = len(list(saver.list(cfg)))
    assert 1 < kept < total
    assert graph.get_state(cfg).values == before  # not emptied
    graph.invoke(None, cfg)
    assert graph.get_state(cfg).values["log"] == before["log"] + [f"s{before['n']}"]
    saver.close()
