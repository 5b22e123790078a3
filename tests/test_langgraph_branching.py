"""WalstoreSaver against SqliteSaver on a realistic graph, and fork-vs-race fencing.

The graph: a planner, a ``Send`` fan-out of quote workers, a ReAct-like subgraph (agent and
tools looping, one tool asking the user through ``interrupt``), a human approval
``interrupt`` and a booking step.  The same script (resumes with ``Command(resume=)``,
``update_state``, ``get_state_history``, new input and ``Command(resume=)`` sent to older
checkpoints, i.e. forks) runs against both savers; every observation must be identical.
"""
from __future__ import annotations

import operator
import sqlite3
import threading
import time
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.graph.message import add_messages  # noqa: E402
from langgraph.types import Command, Send, interrupt  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import StaleCheckpointError, WalstoreSaver  # noqa: E402


# ---- the graph ----------------------------------------------------------------------------
class Trip(TypedDict, total=False):
    messages: Annotated[list, add_messages]
    cities: list[str]
    quotes: Annotated[list, operator.add]
    approved: bool
    log: Annotated[list, operator.add]


class Quote(TypedDict):
    city: str


class Chat(TypedDict, total=False):
    messages: Annotated[list, add_messages]


PRICES = {"Paris": 120, "Rome": 95, "Oslo": 180, "Lisbon": 80}


def react_subgraph() -> Any:
    """agent <-> tools until the agent stops calling tools; ``ask_user`` interrupts."""
    def agent(state: Chat) -> dict:
        calls = [m for m in state["messages"] if isinstance(m, ToolMessage)]
        n = len(calls)
        if n == 0:
            call = {"name": "ask_user", "args": {"q": "seat preference?"}, "id": "call-1"}
        elif n == 1:
            call = {"name": "weather", "args": {"city": "Paris"}, "id": "call-2"}
        else:
            return {"messages": [AIMessage(f"plan ready after {n} tools", id="ai-final")]}
        return {"messages": [AIMessage(f"thinking {n}", id=f"ai-{n}", tool_calls=[call])]}

    def tools(state: Chat) -> dict:
        call = state["messages"][-1].tool_calls[0]
        if call["name"] == "ask_user":
            result = f"user said: {interrupt({'ask': call['args']['q']})}"
        else:
            result = f"sunny in {call['args']['city']}"
        return {"messages": [ToolMessage(result, tool_call_id=call["id"],
                                         id=f"tool-{call['id']}")]}

    g = StateGraph(Chat)
    g.add_node("agent", agent)
    g.add_node("tools", tools)
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", lambda s: "tools" if s["messages"][-1].tool_calls
                            else END)
    g.add_edge("tools", "agent")
    return g.compile()


def trip_graph() -> StateGraph:
    def plan(state: Trip) -> dict:
        text = state["messages"][-1].content
        return {"cities": [c for c in PRICES if c in text], "log": ["planned"]}

    def quote(state: Quote) -> dict:
        return {"quotes": [f"{state['city']}: {PRICES[state['city']]}"]}

    def approve(state: Trip) -> dict:
        answer = interrupt({"question": "book these?", "quotes": state["quotes"]})
        return {"approved": answer == "yes", "log": [f"approval: {answer}"]}

    def book(state: Trip) -> dict:
        done = [f"booked {c}" for c in state["cities"]] if state["approved"] else ["no booking"]
        return {"log": done}

    g = StateGraph(Trip)
    g.add_node("plan", plan)
    g.add_node("quote", quote)
    g.add_node("assistant", react_subgraph())
    g.add_node("approve", approve)
    g.add_node("book", book)
    g.add_edge(START, "plan")
    g.add_conditional_edges("plan", lambda s: [Send("quote", {"city": c}) for c in s["cities"]],
                            ["quote"])
    g.add_edge("quote", "assistant")
    g.add_edge("assistant", "approve")
    g.add_edge("approve", "book")
    g.add_edge("book", END)
    return g


# ---- observations (ids normalised: checkpoint ids differ between savers) -------------------
def _values(values: dict) -> dict:
    out = dict(values)
    if "messages" in out:
        out["messages"] = [(type(m).__name__, m.content, m.id) for m in out["messages"]]
    if "__interrupt__" in out:  # interrupt ids derive from checkpoint ids
        out["__interrupt__"] = [i.value for i in out["__interrupt__"]]
    return out


def _tasks(snapshot) -> list:
    return sorted((t.name, tuple(repr(i.value) for i in t.interrupts), repr(t.result))
                  for t in snapshot.tasks)


def observe_state(graph, config) -> tuple:
    s = graph.get_state(config, subgraphs=True)
    sub = [(t.name, _values(t.state.values) if t.state is not None and
            hasattr(t.state, "values") else None) for t in s.tasks]
    return (_values(s.values), s.next, _tasks(s), sorted(sub, key=repr),
            s.metadata["step"], s.metadata["source"])


def observe_history(graph, config) -> list:
    history = list(graph.get_state_history(config))
    index = {h.config["configurable"]["checkpoint_id"]: i for i, h in enumerate(history)}
    return [(_values(h.values), h.next, h.metadata["step"], h.metadata["source"],
             index.get((h.parent_config or {}).get("configurable", {}).get("checkpoint_id")),
             _tasks(h)) for h in history]


def script(saver) -> list:
    """Drive the graph through resumes, forks and state edits; record what a user sees."""
    graph = trip_graph().compile(checkpointer=saver)
    seen: list = []
    cfg = {"configurable": {"thread_id": "trip"}}
    out = graph.invoke({"messages": [HumanMessage("visit Paris and Rome", id="h1")]}, cfg)
    seen.append(("first run", _values(out), observe_state(graph, cfg)))
    out = graph.invoke(Command(resume="window"), cfg)          # the subgraph's interrupt
    seen.append(("seat answered", _values(out), observe_state(graph, cfg)))
    at_approval = graph.get_state(cfg).config
    out = graph.invoke(Command(resume="yes"), cfg)
    seen.append(("approved", _values(out), observe_state(graph, cfg)))
    seen.append(("history 1", observe_history(graph, cfg)))

    # resume an OLDER interrupt differently: a fork from the approval checkpoint
    older = next(h for h in graph.get_state_history(cfg)
                 if h.config["configurable"]["checkpoint_id"] ==
                 at_approval["configurable"]["checkpoint_id"])
    out = graph.invoke(Command(resume="no"), older.config)
    seen.append(("older interrupt resumed", _values(out), observe_state(graph, cfg)))

    # new input sent to an older checkpoint (right after planning): another fork
    planned = next(h for h in graph.get_state_history(cfg) if h.metadata["step"] == 1
                   and h.metadata["source"] == "loop")
    out = graph.invoke({"messages": [HumanMessage("Oslo instead", id="h2")]}, planned.config)
    seen.append(("input to older checkpoint", _values(out), observe_state(graph, cfg)))
    out = graph.invoke(Command(resume="aisle"), cfg)
    seen.append(("fork resumed", _values(out), observe_state(graph, cfg)))

    # update_state on a past checkpoint, then run on from the edit
    edited = graph.update_state(planned.config, {"cities": ["Lisbon"]}, as_node="plan")
    out = graph.invoke(None, edited)
    seen.append(("edited past", _values(out), observe_state(graph, cfg)))
    out = graph.invoke(Command(resume="middle"), cfg)
    out = graph.invoke(Command(resume="yes"), cfg)
    seen.append(("edited past finished", _values(out), observe_state(graph, cfg)))
    seen.append(("history 2", observe_history(graph, cfg)))

    # a second thread is independent
    cfg2 = {"configurable": {"thread_id": "other"}}
    graph.invoke({"messages": [HumanMessage("Rome only", id="h3")]}, cfg2)
    seen.append(("other thread", observe_state(graph, cfg2), observe_state(graph, cfg)))
    return seen


def test_realistic_graph_matches_sqlite_saver_observation_for_observation(tmp_path):
    sqlite_saver = pytest.importorskip("langgraph.checkpoint.sqlite")
    conn = sqlite3.connect(str(tmp_path / "sqlite.db"), check_same_thread=False)
    theirs = script(sqlite_saver.SqliteSaver(conn))
    with WalstoreSaver.from_path(str(tmp_path / "store"), durability="none") as saver:
        ours = script(saver)
    assert len(ours) == len(theirs) == 11
    for mine, ref in zip(ours, theirs):
        assert mine == ref, mine[0]
    parents = [h[4] for h in ours[9][1] if h[4] is not None]
    branch_points = {p for p in parents if parents.count(p) > 1}
    # the forks: the approval checkpoint got a second child (older interrupt resumed); the
    # planning checkpoint three children (the run, new input sent to it, the edit)
    assert sorted(parents.count(p) for p in branch_points) == [2, 3]
    final_log = ours[8][1]["log"]
    assert final_log[-1] == "booked Lisbon"


# ---- fencing with real graphs ---------------------------------------------------------------
class Counter(TypedDict):
    log: Annotated[list, operator.add]


def slow_graph(saver, delay: float = 0.3):
    def slow(state: Counter) -> dict:
        time.sleep(delay)
        return {"log": [f"{threading.current_thread().name} done"]}

    b = StateGraph(Counter)
    b.add_node("slow", slow)
    b.add_edge(START, "slow")
    b.add_edge("slow", END)
    return b.compile(checkpointer=saver)


def test_runs_racing_on_the_head_are_fenced_but_forks_of_older_checkpoints_are_not(tmp_path):
    saver = WalstoreSaver.from_path(str(tmp_path / "store"), durability="none")
    graph = slow_graph(saver)
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke({"log": ["start"]}, config)
    first = graph.get_state(config).config
    graph.invoke({"log": ["second"]}, config)
    head_id = graph.get_state(config).config["configurable"]["checkpoint_id"]

    results: dict = {}

    def run(name, cfg, inputs):
        try:
            results[name] = graph.invoke(inputs, cfg)
        except walstore.ConflictError as e:
            results[name] = e

    # two runs on the head: one is fenced (SqliteSaver would keep both, losing one)
    heads = [threading.Thread(target=run, args=(f"head{i}", config, {"log": [f"h{i}"]}),
                              name=f"head{i}") for i in range(2)]
    # two forks from the same OLDER checkpoint, at the same time: both are branches (they
    # start once the head runs have loaded the thread: a run that loads the thread after a
    # fork's first checkpoint would continue that fork, the newest checkpoint then)
    forks = [threading.Thread(target=run, args=(f"fork{i}", first, {"log": [f"f{i}"]}),
                              name=f"fork{i}") for i in range(2)]
    for t in heads:
        t.start()
    time.sleep(0.1)
    for t in forks:
        t.start()
    for t in heads + forks:
        t.join()
    fenced = [n for n, r in results.items() if isinstance(r, StaleCheckpointError)]
    assert len(fenced) == 1 and fenced[0].startswith("head"), results
    assert all(isinstance(results[f"fork{i}"], dict) for i in range(2)), results
    for i in range(2):  # each fork continued from the first turn, on its own branch
        assert results[f"fork{i}"]["log"] == ["start", "MainThread done", f"f{i}",
                                              f"fork{i} done"]
    winner = next(n for n in results if n.startswith("head") and n not in fenced)
    log = results[winner]["log"]
    # the winner's work is in the thread and the fenced run's is not (its input may be,
    # when the winner loaded the thread after it: then a line, not a fork)
    assert log[:4] == ["start", "MainThread done", "second", "MainThread done"]
    assert log[-2:] == [f"h{winner[-1]}", f"{winner} done"] and f"{fenced[0]} done" not in log
    history = list(graph.get_state_history(config))
    children: dict = {}
    for h in history:
        parent = (h.parent_config or {}).get("configurable", {}).get("checkpoint_id")
        children.setdefault(parent, []).append(h.metadata["source"])
    # the head got exactly one child (the winner's input); the older checkpoint three
    assert children[head_id] == ["input"]
    assert children[first["configurable"]["checkpoint_id"]] == ["input"] * 3
    saver.close()


@pytest.mark.parametrize("undo", ["rewind", "delete_thread"])
def test_a_run_in_flight_cannot_bring_back_what_rewind_or_delete_undid(tmp_path, undo):
    """A run of a thread is inside its node when the thread is rewound (or deleted); its
    next put builds on a checkpoint the thread no longer has.  It is fenced
    (StaleCheckpointError) instead of making the undone line the head again (found by a
    probe: the rewind was silently cancelled, a deleted conversation came back)."""
    import operator
    import threading
    from typing import Annotated, TypedDict

    from langgraph.graph import END, START, StateGraph

    import walstore
    from walstore.integrations.langgraph import StaleCheckpointError, WalstoreSaver

    class S(TypedDict):
        msgs: Annotated[list, operator.add]
        n: int

    block, inside, release = [False], threading.Event(), threading.Event()

    def step(state: S):
        if block[0]:
            inside.set()
            release.wait(10)
        return {"msgs": [f"step{state.get('n', 0) + 1}"], "n": state.get("n", 0) + 1}

    with walstore.open(str(tmp_path / "s")) as store:
        saver = WalstoreSaver(store)
        g = StateGraph(S)
        g.add_node("step", step)
        g.add_edge(START, "step")
        g.add_edge("step", END)
        graph = g.compile(checkpointer=saver)
        cfg = {"configurable": {"thread_id": "t"}}
        graph.invoke({"msgs": ["u1"]}, cfg)
        old = graph.get_state(cfg)
        graph.invoke({"msgs": ["u2"]}, cfg)
        block[0] = True
        out: dict = {}

        def run():
            try:
                out["result"] = graph.invoke({"msgs": ["u3"]}, cfg)
            except Exception as e:  # noqa: BLE001 - the outcome is the point
                out["error"] = e
        t = threading.Thread(target=run)
        t.start()
        assert inside.wait(10)
        if undo == "rewind":
            saver.rewind(old.config)
        else:
            saver.delete_thread("t")
        release.set()
        t.join(20)
        assert isinstance(out.get("error"), StaleCheckpointError), out
        st = graph.get_state(cfg)
        if undo == "rewind":
            assert st.values == {"msgs": ["u1", "step1"], "n": 1}
            assert st.config["configurable"]["checkpoint_id"] == \
                old.config["configurable"]["checkpoint_id"]
        else:
            assert st.values == {} and list(graph.get_state_history(cfg)) == []
