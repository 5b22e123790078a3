"""Kill soak of a ReAct-style tool-calling agent on walstore's LangGraph integration
(stop 79, h4): LangGraph's prebuilt pieces -- ``create_react_agent`` (version "v2": each
tool call its own ``Send`` task, or "v1": one ``ToolNode`` task running the step's calls
in parallel threads), or a ``StateGraph`` of a model node, ``ToolNode`` and
``tools_condition`` over a ``messages`` state -- driven by a scripted chat model (a
tiny ``BaseChatModel`` whose answer is a function of the messages: AIMessages with one
or several tool calls, then a final answer), checkpointer ``WalstoreSaver(store)`` and
``store=WalstoreStore(store)`` (each booking tool also notes its booking in memory).
A real child process runs the agent and is SIGKILLed at a random moment; the thread is
then resumed as docs/GUIDE.md's LangGraph section says a user does after a crash (reopen,
``graph.invoke(None, config)`` while the thread has a next step, or re-send the turn's
input when the thread never saved it), possibly killed again, until the turn finished.

    PYTHONPATH=. python tools/langgraph_react_kill_soak.py [--rounds 50] [--seed 1]
        [--only ROUND ...] [--out F] [-v]

Kill points (``spec["kill"]``): ``tool`` (inside a tool, after its booking committed),
``between`` (in a parallel step, a tool holding before its booking once another tool of
the step booked -- and, "react_v2", once that tool's task's writes were saved: a
resume keeps it and runs the held call alone), ``model`` (inside the model call of a
given turn), ``put`` / ``put_writes`` (the child kills itself right after the n-th
checkpoint / pending-writes save returned), ``delay`` (a random delay), ``lines`` (once
the ledger has n lines).
Durability sync/async/exit; invoke, stream, ainvoke, astream (async tools or sync tools
in the async run); sometimes a finished first turn on the thread before.

Checks, per round: the final state's last message is the scripted final answer, every
scripted tool call has exactly one ToolMessage, each booking the ToolMessages record is
live (booked, not cancelled) exactly once in the ledger, nothing live that the state does
not record, nothing cancelled twice (bar a compensation whose process was killed right
after it, run again by recovery under the same idempotency key), every recorded booking
noted in memory, and ``walstore verify`` clean.  Exit status 1 on any disagreement,
a crash, or a stuck child.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable

from langgraph.prebuilt import InjectedStore
from langgraph.store.base import BaseStore

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.kill_soak_support import Child as Child_  # noqa: E402
from tools.kill_soak_support import append, lines_in, read_ledger  # noqa: E402,F401

THREAD = "t"
CONFIG = {"configurable": {"thread_id": THREAD}}
CHILD_WAIT = 90.0
SHAPES = ("react_v2", "react_v1", "toolnode")
CALLS = ("invoke", "stream", "ainvoke", "astream")


def compensators(path: str) -> dict[str, Callable]:
    def cancel(action: Any) -> None:
        append(path, f"cancel {action.args['bid']} {action.key} {os.getpid()}")
    return {"cancel": cancel}


def script(spec: dict, turn: int) -> list[list[str]]:
    """The tool calls of turn ``turn``: a list of steps, each the items booked at once."""
    return spec["turns"][turn]


def wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if time.monotonic() > deadline:
            sys.exit(f"never saw {what}")
        time.sleep(0.005)


def build(store: Any, path: str, spec: dict, kill: list | None = None,
          **saver_options: Any) -> tuple[Any, Any]:
    """(graph, saver) of ``spec``; ``kill``: the child's kill point, held or self-made."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.tools import tool
    from walstore.integrations.langgraph import WalstoreSaver, WalstoreStore

    saver = WalstoreSaver(store, **saver_options)
    memory = WalstoreStore(store)
    kill = kill or ["none"]

    def hold(where: str) -> None:
        append(path + ".held", where)
        time.sleep(120)   # (killed here)

    class Scripted(BaseChatModel):
        """Answers from the messages: turn = HumanMessages so far, step = AIMessages
        since the last HumanMessage; the step's tool calls, then the final answer."""

        @property
        def _llm_type(self) -> str:
            return "scripted"

        def bind_tools(self, tools: Any, **kwargs: Any) -> "Scripted":
            return self

        def _generate(self, messages: list, stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:
            turn = sum(isinstance(m, HumanMessage) for m in messages) - 1
            last_h = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
            step = sum(isinstance(m, AIMessage) for m in messages[last_h:])
            if kill[0] == "model" and kill[1] == turn and kill[2] == step:
                hold(f"model {turn} {step}")
            steps = script(spec, turn)
            if step < len(steps):
                msg = AIMessage(content="", tool_calls=[
                    {"name": "book", "args": {"item": item},
                     "id": f"call-{turn}-{step}-{i}", "type": "tool_call"}
                    for i, item in enumerate(steps[step])])
            else:
                msg = AIMessage(content=f"done {turn}")
            return ChatResult(generations=[ChatGeneration(message=msg)])

    def do_book(item: str, mem: Any) -> str:
        if kill[0] == "between" and kill[1] == item:   # (another tool of the step booked)
            other = kill[2]
            # (committed, not only written to the ledger: the ledger line comes from
            # the action's body, before its commit -- a kill between was recovery's to
            # compensate, and a test expecting the resume's undo failed under load)
            wait_for(lambda: any(w[0] == "book" and w[2] == other
                                 and store.get(f"bk/{w[1]}") is not None
                                 for w in read_ledger(path)), f"{other}'s booking")
            if spec["shape"] == "react_v2" and spec["durability"] != "exit":
                # (each call its own task: other's writes saved; "exit" saves no step
                # checkpoint to find them on)
                from langgraph.config import get_config
                built_on = get_config()["configurable"]["checkpoint_map"][""]
                at = {"configurable": {"thread_id": THREAD, "checkpoint_ns": "",
                                       "checkpoint_id": built_on}}

                def saved() -> bool:
                    t = saver.get_tuple(at)
                    return t is not None and any(
                        getattr(m, "content", "").startswith(other + ".")
                        for _t, ch, v in t.pending_writes if ch == "messages"
                        for m in (v if isinstance(v, list) else [v]))
                wait_for(saved, f"{other}'s saved writes")
            hold(f"between {other} {item}")
        time.sleep(spec["pause"])
        bid = f"{item}.{uuid.uuid4().hex[:8]}"
        with store.transaction() as tx:
            tx.put(f"bk/{bid}", True)
            with tx.action("book", args={"bid": bid, "item": item},
                           compensate="cancel") as act:
                append(path, f"book {bid} {item} {os.getpid()}")
                act.result = {"ok": True}
        if spec["memory"]:
            mem.put(("trip", THREAD), item, {"bid": bid})
        if kill[0] == "tool" and kill[1] == item:
            hold(f"tool {item}")
        time.sleep(spec["pause"])
        return bid

    if spec["async_tools"]:
        @tool
        async def book(item: str, mem: Annotated[BaseStore, InjectedStore()]) -> str:
            """Book ``item``; the booking's id."""
            return await asyncio.to_thread(do_book, item, mem)
    else:
        @tool
        def book(item: str,  # type: ignore[misc]
                 mem: Annotated[BaseStore, InjectedStore()]) -> str:
            """Book ``item``; the booking's id."""
            return do_book(item, mem)

    if kill[0] in ("put", "put_writes"):
        name, count = kill[0], [0]
        orig = getattr(saver, name)
        aorig = getattr(saver, "a" + name)

        def after() -> None:
            count[0] += 1
            if count[0] == kill[1]:
                append(path + ".held", f"{name} {count[0]}")
                os.kill(os.getpid(), signal.SIGKILL)

        def wrapped(*a: Any, **k: Any) -> Any:
            r = orig(*a, **k)
            after()
            return r

        async def awrapped(*a: Any, **k: Any) -> Any:
            r = await aorig(*a, **k)
            after()
            return r
        setattr(saver, name, wrapped)
        setattr(saver, "a" + name, awrapped)

    model = Scripted()
    shape = spec["shape"]
    if shape.startswith("react"):
        import warnings
        from langgraph.prebuilt import create_react_agent
        warnings.filterwarnings("ignore", message="create_react_agent has been moved")
        graph = create_react_agent(model, [book], checkpointer=saver, store=memory,
                                   version=shape[-2:])
    else:
        from langgraph.graph import START, MessagesState, StateGraph
        from langgraph.prebuilt import ToolNode, tools_condition

        if spec["call"] in ("ainvoke", "astream"):
            async def agent(state: MessagesState) -> dict:
                return {"messages": [await model.ainvoke(state["messages"])]}
        else:
            def agent(state: MessagesState) -> dict:  # type: ignore[misc]
                return {"messages": [model.invoke(state["messages"])]}
        b = StateGraph(MessagesState)
        b.add_node("agent", agent)
        b.add_node("tools", ToolNode([book]))
        b.add_edge(START, "agent")
        b.add_conditional_edges("agent", tools_condition)
        b.add_edge("tools", "agent")
        graph = b.compile(checkpointer=saver, store=memory)
    return graph, saver


def run(graph: Any, spec: dict, inp: Any) -> None:
    d, call = spec["durability"], spec["call"]
    if call == "invoke":
        graph.invoke(inp, CONFIG, durability=d)
    elif call == "stream":
        for _ in graph.stream(inp, CONFIG, durability=d, stream_mode="updates"):
            pass
    elif call == "ainvoke":
        asyncio.run(graph.ainvoke(inp, CONFIG, durability=d))
    else:
        async def go() -> None:
            async for _ in graph.astream(inp, CONFIG, durability=d, stream_mode="values"):
                pass
        asyncio.run(go())


def human(turn: int) -> dict:
    from langchain_core.messages import HumanMessage
    return {"messages": [HumanMessage(content=f"plan trip {turn}", id=f"h{turn}")]}


def next_input(graph: Any, turn: int) -> tuple[str, Any]:
    """("done", None), ("none", None): resume, or ("input", the turn's input)."""
    from langchain_core.messages import AIMessage, HumanMessage
    st = graph.get_state(CONFIG)
    msgs = (st.values or {}).get("messages", [])
    if st.tasks:   # (a task whose writes were saved is in ``tasks``, not in ``next``)
        return "none", None
    turns = sum(isinstance(m, HumanMessage) for m in msgs)
    if turns == turn + 1 and msgs and isinstance(msgs[-1], AIMessage) \
            and not msgs[-1].tool_calls:
        return "done", None
    if turns == turn:
        return "input", human(turn)
    raise RuntimeError(f"thread in an unexpected state: {turns} turns, next {st.next}, "
                       f"last {msgs[-1]!r}, metadata {st.metadata}")


def resume(graph: Any, spec: dict, turn: int, steps: list) -> None:
    for _ in range(8):
        what, inp = next_input(graph, turn)
        steps.append(what)
        if os.environ.get("REACT_SOAK_DEBUG"):
            st = graph.get_state(CONFIG)
            print("DEBUG", what, st.next, st.metadata, file=sys.stderr, flush=True)
        if what == "done":
            return
        run(graph, spec, inp)
    raise RuntimeError(f"turn {turn} never finished: {steps}")


def child(mode: str, spec: dict, store_path: str, path: str) -> None:
    import walstore
    store = walstore.open(store_path, compensators=compensators(path))
    turn = spec["turn"]
    if mode == "run":
        if spec["warm"]:   # (a finished first turn, no kill point armed)
            g0, _ = build(store, path, spec)
            resume(g0, spec, 0, [])
        graph, saver = build(store, path, spec, spec["kill"])
        print("READY", flush=True)
        run(graph, spec, human(turn))
        print("DONE run", flush=True)
    else:
        graph, saver = build(store, path, spec)
        print("READY", flush=True)
        steps: list = []
        resume(graph, spec, turn, steps)
        print("DONE " + json.dumps({"steps": steps, "undos": [
            {"undone": list(u.undone), "kept": list(u.kept), "left": list(u.left)}
            for u in saver.resume_undos]}), flush=True)
    store.close()


class Child(Child_):
    """This file in ``--child`` mode, in a subprocess (``kill_soak_support.Child``)."""

    def __init__(self, mode: str, spec: dict, store_path: str, path: str) -> None:
        super().__init__(__file__, mode, spec, store_path, path, CHILD_WAIT)

    def kill(self) -> bool:
        """SIGKILL it; did it end killed (by this, or by itself at a self-made kill
        point)?"""
        super().kill()
        return self.proc.returncode == -signal.SIGKILL


def kill_child(c: Child, kill: list, path: str) -> dict:
    """Kill ``c`` at its kill point (held, self-made, after a delay or ledger lines)."""
    if not c.ready.wait(CHILD_WAIT) or "READY" not in c.lines:
        c.kill()
        return {"killed": False, "stuck": True}
    base = lines_in(path)
    deadline = time.monotonic() + CHILD_WAIT
    if kill[0] in ("tool", "between", "model", "put", "put_writes"):
        while c.proc.poll() is None and not open(path + ".held", "a+").seek(0, 2) \
                and time.monotonic() < deadline:
            time.sleep(0.003)
    elif kill[0] == "delay":
        end = time.monotonic() + kill[1]
        while time.monotonic() < end and c.proc.poll() is None:
            time.sleep(0.002)
    elif kill[0] == "lines":
        while c.proc.poll() is None and lines_in(path) < base + kill[1] \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(kill[2])
    held = open(path + ".held").read().strip() if os.path.exists(path + ".held") else None
    killed = c.kill()
    return {"killed": killed, "held": held, "rc": c.proc.returncode}


def draw(seed: int, n: int) -> dict:
    rng = random.Random(f"{seed}-{n}")
    items = iter(f"i{k}" for k in range(100))

    def turn_script() -> list[list[str]]:
        return [[next(items) for _ in range(rng.choice([1, 2, 2, 3]))]
                for _ in range(rng.choice([1, 2, 2, 3]))]
    warm = rng.random() < 0.3
    turns = [turn_script(), turn_script()] if warm else [turn_script()]
    spec = {"shape": rng.choice(SHAPES), "call": rng.choice(CALLS),
            "durability": rng.choice(["sync", "async", "exit"]),
            "async_tools": False, "memory": rng.random() < 0.7,
            "pause": rng.choice([0.0, 0.0, 0.002, 0.01]), "warm": warm,
            "turn": 1 if warm else 0, "turns": turns}
    spec["async_tools"] = spec["call"] in ("ainvoke", "astream") and rng.random() < 0.5
    cur = turns[spec["turn"]]
    flat = [i for s in cur for i in s]
    multi = [s for s in cur if len(s) > 1]
    kinds = ["tool", "model", "put", "put_writes", "delay", "lines"] + (
        ["between"] * 2 if multi else [])
    k = rng.choice(kinds)
    if k == "tool":
        spec["kill"] = ["tool", rng.choice(flat)]
    elif k == "between":
        s = rng.choice(multi)
        a, b = rng.sample(s, 2)
        spec["kill"] = ["between", b, a]
    elif k == "model":
        spec["kill"] = ["model", spec["turn"], rng.randint(0, len(cur))]
    elif k in ("put", "put_writes"):
        spec["kill"] = [k, rng.randint(1, 2 * len(cur) + 2)]
    elif k == "delay":
        spec["kill"] = ["delay", round(rng.uniform(0.0, 0.15), 4)]
    else:
        spec["kill"] = ["lines", rng.randint(1, len(flat)),
                        rng.choice([0.0, 0.001, 0.005, 0.02])]
    spec["kill2"] = None if rng.random() < 0.7 else ["delay", round(rng.uniform(0, 0.2), 4)]
    return spec


def judge(spec: dict, ledger: list[list[str]], msgs: list, memory: dict,
          killed: set) -> list[str]:
    from langchain_core.messages import AIMessage, ToolMessage
    problems: list[str] = []
    if not msgs or not isinstance(msgs[-1], AIMessage) or msgs[-1].tool_calls \
            or msgs[-1].content != f"done {spec['turn']}":
        problems.append("not-finished")
    want = collections.Counter(f"call-{t}-{s}-{i}" for t in range(spec["turn"] + 1)
                               for s, st in enumerate(spec["turns"][t])
                               for i, _ in enumerate(st))
    got = collections.Counter(m.tool_call_id for m in msgs if isinstance(m, ToolMessage))
    if got != want:
        problems.append("tool-messages-wrong")
    rec = collections.Counter(m.content for m in msgs if isinstance(m, ToolMessage))
    if any(v > 1 for v in rec.values()):
        problems.append("recorded-twice")
    booked = collections.Counter(w[1] for w in ledger if w[0] == "book")
    cancels = collections.defaultdict(list)
    for i, w in enumerate(ledger):
        if w[0] == "cancel":
            cancels[w[1]].append((i, w))
    live = {b for b in booked if b not in cancels}
    if set(rec) - set(booked):
        problems.append("recorded-never-booked")
    if set(rec) & set(cancels):
        problems.append("recorded-but-cancelled")
    if live - set(rec):
        problems.append("live-unrecorded")
    for bid, cs in cancels.items():
        if len(cs) > 1:
            ok = all(int(w[3]) in killed and w[2] == cs[-1][1][2]
                     and max(j for j, x in enumerate(ledger) if x[-1] == w[3]) == i
                     for (i, w) in cs[:-1])
            if not ok:
                problems.append("cancelled-twice")
    if spec["memory"]:
        for m in msgs:
            if isinstance(m, ToolMessage):
                item = m.content.split(".")[0]
                if memory.get(item) != m.content:
                    problems.append("memory-disagrees")
                    break
    return problems


def final(spec: dict, store_path: str, path: str) -> tuple[list, dict]:
    import walstore
    store = walstore.open(store_path, readonly=True)
    try:
        graph, _ = build(store, path, spec)
        msgs = (graph.get_state(CONFIG).values or {}).get("messages", [])
        from walstore.integrations.langgraph import WalstoreStore
        mem = {it.key: it.value["bid"] for it in
               WalstoreStore(store).search(("trip", THREAD), limit=1000)}
        return msgs, mem
    finally:
        store.close()


def round_(seed: int, n: int, root: str) -> dict:
    from walstore.ops.verify import verify_store
    spec = draw(seed, n)
    d = tempfile.mkdtemp(dir=root)
    store_path, path = os.path.join(d, "s"), os.path.join(d, "ledger")
    out: dict = {"round": n, "spec": spec, "killed_pids": [], "resumes": []}
    try:
        c = Child("run", spec, store_path, path)
        k = kill_child(c, spec["kill"], path)
        out["kill1"] = k
        if k.get("stuck"):
            out["crash"] = "run child never READY: " + c.err.decode()[-2000:]
            return out
        if k["killed"]:
            out["killed_pids"].append(c.proc.pid)
        elif c.proc.returncode != 0:
            out["crash"] = f"run child exit {c.proc.returncode}: " + c.err.decode()[-2000:]
            return out
        if os.path.exists(path + ".held"):
            os.unlink(path + ".held")
        if spec["kill2"]:
            c2 = Child("resume", spec, store_path, path)
            k2 = kill_child(c2, spec["kill2"], path)
            out["kill2"] = k2
            if k2["killed"]:
                out["killed_pids"].append(c2.proc.pid)
            elif c2.proc.returncode != 0:
                out["crash"] = f"resume child exit {c2.proc.returncode}: " + c2.err.decode()[-2000:]
                return out
        c3 = Child("resume", spec, store_path, path)
        rc = c3.finish()
        if rc != 0:
            out["crash"] = f"resume child exit {rc}: " + c3.err.decode()[-2000:]
            return out
        out["resumes"].append(c3.done())
        msgs, mem = final(spec, store_path, path)
        ledger = read_ledger(path)
        out["ledger"] = [" ".join(w) for w in ledger]
        out["messages"] = [(type(m).__name__, getattr(m, "tool_call_id", None),
                            m.content) for m in msgs]
        out["problems"] = judge(spec, ledger, msgs, mem, set(out["killed_pids"]))
        rep = verify_store(store_path)
        if rep.errors or rep.pending_compensations or rep.in_doubt:
            out["problems"].append("verify")
            out["verify"] = [str(e) for e in rep.errors]
        out["cancels"] = sum(1 for w in ledger if w[0] == "cancel")
        return out
    except Exception:  # noqa: BLE001
        out["crash"] = traceback.format_exc()[-3000:]
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill soak of a ReAct agent on walstore")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--only", type=int, nargs="+")
    ap.add_argument("--out", default=None, help="append each round as a JSON line")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", message="create_react_agent has been moved")
    if a.child:
        child(a.child[0], json.loads(a.child[1]), a.child[2], a.child[3])
        return 0
    root = tempfile.mkdtemp(prefix="lg_react_soak_")
    totals: collections.Counter = collections.Counter()
    points: collections.Counter = collections.Counter()
    bad = 0
    try:
        with open(a.out or os.devnull, "a") as f:
            for n in a.only or range(a.rounds):
                o = round_(a.seed, n, root)
                f.write(json.dumps(o, default=repr) + "\n")
                f.flush()
                v = "crash" if "crash" in o else (
                    "agree" if not o["problems"] else "DISAGREE:" + "+".join(o["problems"]))
                totals[v] += 1
                totals["kills"] += len(o["killed_pids"])
                totals["cancels"] += o.get("cancels", 0)
                if (o.get("kill1") or {}).get("killed"):
                    points[o["spec"]["kill"][0]] += 1
                if v != "agree":
                    bad += 1
                if v != "agree" or a.verbose:
                    print("ROUND", n, v, json.dumps({k: o.get(k) for k in (
                        "spec", "kill1", "kill2", "resumes", "problems", "ledger",
                        "messages", "verify", "crash")}, default=repr), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"seed {a.seed}: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
          + "; kill points hit: " + ", ".join(f"{k} {v}" for k, v in sorted(points.items()))
          + f"; {bad} not agreeing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
