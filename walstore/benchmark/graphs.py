"""LangGraph graphs (scripted, no model) and the per-invoke workloads that run them against
WalstoreSaver and langgraph-checkpoint-sqlite's SqliteSaver / AsyncSqliteSaver, with
LangGraph's InMemorySaver beside them as the ceiling (no disk: what LangGraph itself costs).

``turn_graph`` is a ReAct turn: the human's message, the agent's reply with a tool call,
the tool's result, the agent's answer (four messages per turn, state growing over turns).
``SIZE_GRAPHS`` (``chat``, ``scratch``) are the graphs of bench/langgraph_size.py.
LangGraph is imported only inside the functions: without it this module still imports and
the rows say they were skipped.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import statistics
import time
from typing import Annotated, Any, Callable, TypedDict

from .data import allocated_bytes, MB
from .spec import Context, Sample

# Message text as compressible as English prose, not more: zlib shrinks a 2,000-character
# message to ~46% (English prose: ~44%; the old word salad of 24 words: 25%, which
# flattered WalstoreSaver's compression in every on-disk comparison).  The ~170 commonest
# English words, then 4,000 made-up words of 1-3 syllables, drawn with Zipf frequencies
# (1/(rank + 2.7)); a fifth of the words repeat one used shortly before, as the topic
# words of real text do; sentences with capitals, commas and full stops.
COMMON_WORDS = (
    "the of and to a in is that it for was on as with be by at this are from or an have "
    "not but which they he we you their all has had one been were there can its more if "
    "will would when so what about into than them only other some time new could these "
    "two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used "
    "take three agent tool call result plan price city night key value").split()
_ONSETS = "b c d f g h l m n p r s t w br ch cl st th tr sh pl gr".split()
_NUCLEI = "a e i o u a e i o ea ou".split()
_CODAS = ("", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "d", "m")
_SUFFIXES = ("", "", "", "", "s", "ed", "ing", "er", "ly", "tion")
REPEAT_RECENT = 0.2


def _made_up_words(n: int, seed: int = 2024) -> list[str]:
    rng = random.Random(seed)
    seen, out = set(COMMON_WORDS), []
    while len(out) < n:
        word = "".join((rng.choice(_ONSETS) if i == 0 or rng.random() < 0.7 else "")
                       + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                       for i in range(rng.choice((1, 2, 2, 3)))) + rng.choice(_SUFFIXES)
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


VOCABULARY = [*COMMON_WORDS, *_made_up_words(4_000)]
_CUMULATIVE = list(itertools.accumulate(1 / (rank + 2.7) for rank in range(len(VOCABULARY))))


_LANGGRAPH = ("langgraph", "skipped: langgraph not installed")
_SQLITE = ("langgraph.checkpoint.sqlite", "skipped: langgraph-checkpoint-sqlite not installed")
REQUIRES_SYNC = (_LANGGRAPH, _SQLITE)
REQUIRES_ASYNC = (_LANGGRAPH, _SQLITE, ("aiosqlite", "skipped: aiosqlite not installed"))


def text(rng: random.Random, n_chars: int) -> str:
    """n_chars of made-up prose whose compressibility is English prose's (see
    VOCABULARY)."""
    parts: list[str] = []
    recent: list[str] = []
    size = sentence = 0
    while size <= n_chars:             # joined: size - 1 characters, at least n_chars
        if recent and rng.random() < REPEAT_RECENT:
            word = rng.choice(recent)
        else:
            word = rng.choices(VOCABULARY, cum_weights=_CUMULATIVE)[0]
            if len(word) > 4:
                recent.append(word)
        if sentence == 0:
            word = word.capitalize()
        sentence += 1
        if sentence > 4 and rng.random() < 0.12:
            word += "."
            sentence = 0
        elif rng.random() < 0.06:
            word += ","
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)[:n_chars]


def _state(name: str, **channels: Any) -> type:
    """A TypedDict state schema (functional form: its annotations are objects, which
    LangGraph can read even though the class is made inside a function)."""
    return TypedDict(name, channels)  # type: ignore[operator]


# --------------------------------------------------------------------------- graphs

def turn_graph(seed: int = 7) -> Any:
    """One conversational turn of a ReAct agent (a StateGraph, not compiled)."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import add_messages

    rng = random.Random(seed)

    def agent(s: dict) -> dict:
        if isinstance(s["messages"][-1], ToolMessage):
            return {"messages": [AIMessage(text(rng, 200))]}
        call = {"name": "search", "args": {"q": text(rng, 40)},
                "id": f"call-{len(s['messages'])}"}
        return {"messages": [AIMessage(text(rng, 150), tool_calls=[call])]}

    def tools(s: dict) -> dict:
        call_id = s["messages"][-1].tool_calls[0]["id"]
        return {"messages": [ToolMessage(text(rng, 400), tool_call_id=call_id)]}

    def route(s: dict) -> str:
        return "tools" if getattr(s["messages"][-1], "tool_calls", None) else END

    b = StateGraph(_state("TurnState", messages=Annotated[list, add_messages]))
    b.add_node("agent", agent)
    b.add_node("tools", tools)
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", route)
    b.add_edge("tools", "agent")
    return b


def chat_graph(steps: int) -> Any:
    """An agent loop whose ``messages`` grow by an assistant turn and a tool result per
    step, for ``steps`` steps."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import add_messages

    rng = random.Random(7)

    def agent(s: dict) -> dict:
        n = s["step"] + 1
        call = {"name": "search", "args": {"q": text(rng, 40)}, "id": f"call-{n}"}
        return {"messages": [AIMessage(text(rng, 300), id=f"ai-{n}", tool_calls=[call])],
                "step": n}

    def tools(s: dict) -> dict:
        n = s["step"]
        return {"messages": [ToolMessage(text(rng, 600), tool_call_id=f"call-{n}",
                                         id=f"tool-{n}")]}

    b = StateGraph(_state("ChatState", messages=Annotated[list, add_messages], step=int))
    b.add_node("agent", agent)
    b.add_node("tools", tools)
    b.add_edge(START, "agent")
    b.add_edge("agent", "tools")
    b.add_conditional_edges("tools", lambda s: END if s["step"] >= steps else "agent")
    return b


def chat_input() -> dict:
    from langchain_core.messages import HumanMessage
    return {"messages": [HumanMessage("Plan a trip: three cities, book hotels.", id="h0")],
            "step": 0}


def scratch_graph(steps: int) -> Any:
    """A loop that rewrites a 2,000-char ``scratchpad`` each step and appends a short line
    to a ``log`` list: most of each step's state is new."""
    import operator

    from langgraph.graph import END, START, StateGraph

    rng = random.Random(11)

    def think(s: dict) -> dict:
        n = s["step"] + 1
        return {"scratchpad": text(rng, 2000), "log": [f"step {n}: {text(rng, 40)}"],
                "step": n}

    b = StateGraph(_state("ScratchState", scratchpad=str,
                          log=Annotated[list, operator.add], step=int))
    b.add_node("think", think)
    b.add_edge(START, "think")
    b.add_conditional_edges("think", lambda s: END if s["step"] >= steps else "think")
    return b


def scratch_input() -> dict:
    return {"scratchpad": "", "log": [], "step": 0}


SIZE_GRAPHS: dict[str, tuple[Callable[[int], Any], Callable[[], dict]]] = {
    "chat": (chat_graph, chat_input), "scratch": (scratch_graph, scratch_input)}


# --------------------------------------------------------------------------- workloads

def _config(thread: int) -> dict:
    return {"configurable": {"thread_id": f"conversation-{thread}"}}


def _human(rng: random.Random) -> dict:
    from langchain_core.messages import HumanMessage
    return {"messages": [HumanMessage(text(rng, 100))]}


def _check_state(values: dict, turns: int, system: str) -> None:
    if len(values.get("messages", ())) != 4 * turns:
        raise RuntimeError(f"{system}: a thread holds {len(values.get('messages', ()))} "
                           f"messages after {turns} turns, not {4 * turns}")


def _samples(part: str, invoke: list[float], seconds: float, state: list[float],
             ctx: Context, turns: int, closing: float) -> dict[str, Sample]:
    # The saver's close counts in invokes/s, as every other row counts its system's close
    # (measure_once): these rows open their saver themselves, so the harness never timed
    # it, and WalstoreSaver's deferred apply at close was left out of its rate.
    extra = {"mean_ms": round(statistics.fmean(invoke) * 1000, 3), "turns": turns,
             "disk_mb": round(allocated_bytes(ctx.directory) / MB, 1),
             "close_ms": round(closing * 1000, 1), "timed_s": round(seconds, 4)}
    return {part: Sample(len(invoke), seconds + closing, invoke, extra),
            f"{part}-state": Sample(len(state), sum(state), state,
                                    {"mean_ms": round(statistics.fmean(state) * 1000, 3)})}


def invoke_sync(ctx: Context, threads: int, turns: int, state_reads: int
                ) -> dict[str, Sample]:
    """``turns`` rounds of one turn on each of ``threads`` conversation threads, one
    caller, LangGraph's default durability; each invoke timed.  Then get_state of random
    threads."""
    clock, rng = time.perf_counter, random.Random(5)
    with contextlib.ExitStack() as stack:
        if ctx.system == "walstore-saver":
            from walstore.integrations.langgraph import WalstoreSaver
            saver = stack.enter_context(WalstoreSaver.from_path(
                str(ctx.directory / "store"), durability="full"))
        elif ctx.system == "memory-saver":  # (the ceiling: no disk at all)
            from langgraph.checkpoint.memory import InMemorySaver
            saver = InMemorySaver()
        else:
            from langgraph.checkpoint.sqlite import SqliteSaver
            saver = stack.enter_context(SqliteSaver.from_conn_string(
                str(ctx.directory / "checkpoints.sqlite")))
        graph = turn_graph().compile(checkpointer=saver)
        invoke: list[float] = []
        start = clock()
        for _turn in range(turns):
            for t in range(threads):
                message, config = _human(rng), _config(t)
                t0 = clock()
                graph.invoke(message, config)
                invoke.append(clock() - t0)
        seconds = clock() - start
        state: list[float] = []
        for _ in range(state_reads):
            config = _config(rng.randrange(threads))
            t0 = clock()
            snapshot = graph.get_state(config)
            state.append(clock() - t0)
            _check_state(snapshot.values, turns, ctx.system)
        t0 = clock()
        stack.close()
        closing = clock() - t0
    return _samples("lg-sync", invoke, seconds, state, ctx, turns, closing)


def invoke_async(ctx: Context, threads: int, turns: int, concurrency: int,
                 state_reads: int) -> dict[str, Sample]:
    """The same conversations through ainvoke, ``concurrency`` of them at once (each
    conversation's turns in order); each ainvoke timed.  Then aget_state of random
    threads, one at a time."""
    return asyncio.run(_invoke_async(ctx, threads, turns, concurrency, state_reads))


async def _invoke_async(ctx: Context, threads: int, turns: int, concurrency: int,
                        state_reads: int) -> dict[str, Sample]:
    clock, rng = time.perf_counter, random.Random(5)
    async with contextlib.AsyncExitStack() as stack:
        if ctx.system == "walstore-saver-async":
            from walstore.integrations.langgraph import WalstoreSaver
            saver = await stack.enter_async_context(WalstoreSaver.from_path(
                str(ctx.directory / "store"), durability="full"))
        elif ctx.system == "memory-saver-async":  # (the ceiling: no disk at all)
            from langgraph.checkpoint.memory import InMemorySaver
            saver = InMemorySaver()
        else:
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
            saver = await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(
                str(ctx.directory / "checkpoints.sqlite")))
        graph = turn_graph().compile(checkpointer=saver)
        invoke: list[float] = []

        async def conversations(mine: range) -> None:
            for _turn in range(turns):
                for t in mine:
                    message, config = _human(rng), _config(t)
                    t0 = clock()
                    await graph.ainvoke(message, config)
                    invoke.append(clock() - t0)

        start = clock()
        await asyncio.gather(*(conversations(range(w, threads, concurrency))
                               for w in range(min(concurrency, threads))))
        seconds = clock() - start
        state: list[float] = []
        for _ in range(state_reads):
            config = _config(rng.randrange(threads))
            t0 = clock()
            snapshot = await graph.aget_state(config)
            state.append(clock() - t0)
            _check_state(snapshot.values, turns, ctx.system)
        t0 = clock()
        await stack.aclose()
        closing = clock() - t0
    return _samples("lg-async", invoke, seconds, state, ctx, turns, closing)
