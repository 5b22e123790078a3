"""Audit 53 of the integrations: WalstoreSaver, WalstoreStore and WalstoreSession against
LangGraph's InMemorySaver/SqliteSaver/InMemoryStore and the SDK's SQLiteSession on the same
calls.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import re
from typing import Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


# ---- WalstoreSaver: state types ----------------------------------------------------------
class _PatternState(TypedDict):
    pattern: Any
    n: int


def _pattern_graph(checkpointer):
    def step(state):
        return {"n": state["n"] + 1}
    builder = StateGraph(_PatternState)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_edge("step", END)
    return builder.compile(checkpointer=checkpointer)


def test_a_compiled_regex_in_the_state_comes_back_as_one(store):
    """A ``re.Pattern`` in the graph state was accepted at ``put`` (LangGraph encodes it
    as a call of ``re.compile``, which is in its safe set, so the write-time check let it
    through) and then refused at every read ("a stored value names re.compile, which is
    not a class in module 're'"): the thread's head could no longer be loaded, the next
    ``invoke`` of the thread failed.  InMemorySaver and SqliteSaver give the pattern
    back.  The safe set's one entry that is a function is now called as LangGraph does."""
    config = {"configurable": {"thread_id": "t"}}
    pattern = re.compile(r"ab+c", re.IGNORECASE)
    for saver in (InMemorySaver(), WalstoreSaver(store)):
        graph = _pattern_graph(saver)
        graph.invoke({"pattern": pattern, "n": 0}, config)
        state = graph.get_state(config).values
        assert type(state["pattern"]) is re.Pattern
        assert (state["pattern"].pattern, state["pattern"].flags) == (pattern.pattern,
                                                                      pattern.flags)
        again = graph.invoke({"n": 10}, config)   # a new turn loads the thread's head
        assert again["n"] == 11 and again["pattern"] == pattern
