"""Kill soak of a LangGraph run on walstore's checkpointer (stop 78, h6): a real child
process runs a graph whose nodes book, is SIGKILLed at a random moment, and the thread is
resumed in a new process -- whose first run undoes what the killed step committed and
nothing records (``WalstoreSaver._undo_on_resume``) -- until the graph finishes; then the
outside ledger is compared with the finished graph's state.

    PYTHONPATH=. python tools/langgraph_kill_soak.py [--rounds 100] [--seed 1]
        [--only ROUND ...] [--out F] [--json] [-v] [--no-undo]

Each round (its own store and ledger, its choices drawn from ``--seed`` and its number):

* the graph: ``linear`` (3-4 nodes in a row), ``parallel`` (two branches, one of one
  node, one of one or two, then a join), ``subgraph`` (a node that is a compiled
  subgraph of two booking nodes, or a node that invokes one, between two booking
  nodes), ``interrupt`` (a node that calls ``interrupt()`` and books after its answer,
  between two booking nodes; the child answers with ``Command(resume=)`` itself) or
  ``functional`` (an ``@entrypoint`` calling ``@task``s: two in a row, or two at once,
  then a third); durability sync/async/exit; invoke, or ainvoke with async nodes (the
  booking in the loop or in a worker thread); sometimes a finished first run on the
  thread before; small sleeps in the nodes, or none;
* every booking node (and ``@task``) books in a walstore transaction whose action
  appends ``book <thread> <node> <round> <id> <pid>`` to the ledger (fsynced: the outside
  world) and whose compensator, registered at open in every process, appends ``cancel
  <thread> <node> <round> <id> <key> <pid>``;
* the parent kills the child (SIGKILL) after a random delay, or once the ledger has a
  random number of new lines; sometimes it kills the RESUMING child too (mid-resume,
  mid-undo: its compensator may sleep before it appends), then resumes again, in a
  child or in this process: ``invoke(None)`` (``Command(resume=)`` for an interrupted
  thread; the round's input when the killed run's input was never saved) until the
  thread's state says the round's run finished;
* the checks: every node of every run ran once by the final state, the bookings standing
  in the ledger (booked, not cancelled) are exactly those the state records, nothing is
  cancelled twice (but a compensation whose process was killed right after it, which
  recovery runs again with the same idempotency key: counted, CONTRACT), and
  ``walstore verify`` finds no error and nothing owed after the last close.

A disagreement a documented limit (docs/GUIDE.md, LangGraph, "Still by hand") explains
would be counted as such (``documented``); none is left: a process killed before its
thread had any checkpoint (a new thread's first run under durability="exit") was one
until stop 79, when the first run on the empty thread began undoing such work
(``WalstoreSaver._undo_on_fresh_start``).  Exit status 1 for any disagreement, a crash
of a resume, a child stuck, or a verify problem.  ``--no-undo``
runs the savers with ``undo_on_resume=False``: the checks then find the killed steps'
bookings standing beside the resumed ones'.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, TypedDict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.kill_soak_support import Child as Child_  # noqa: E402
from tools.kill_soak_support import (append, first_kill,  # noqa: E402,F401
                                     ledger_problems, lines_in, read_ledger)

THREAD = "t"
CONFIG = {"configurable": {"thread_id": THREAD}}
CHILD_WAIT = 90.0      # a child's budget to reach READY or finish (never in a good round)
KINDS = ("linear", "parallel", "subgraph", "interrupt", "functional")


# -- the world and the graph (imported by the children and by an in-process resume) --

def compensators(path: str, pause: float = 0.0) -> dict[str, Callable]:
    """The "cancel" compensator: the booking's cancellation in the ledger (after
    ``pause``: a window for a kill mid-undo)."""
    def cancel(action: Any) -> None:
        if pause:
            time.sleep(pause)
        a = action.args
        append(path, f"cancel {a['thread']} {a['node']} {a['rnd']} {a['bid']} "
                     f"{action.key} {os.getpid()}")
    return {"cancel": cancel}


def _add_new(a: list, b: list) -> list:
    """``a`` and the items of ``b`` not in it (a subgraph node's output repeats its
    input's items)."""
    return a + [x for x in b if x not in a]


class State(TypedDict):
    rnd: int
    ran: Annotated[list, _add_new]


def book(store: Any, path: str, node: str, rnd: int) -> str:
    """Book ``node`` of run ``rnd`` in a walstore transaction begun in the node (it
    belongs to the node's thread) and in the ledger; the booking's id."""
    bid = f"{node}.{rnd}.{uuid.uuid4().hex[:8]}"
    with store.transaction() as tx:
        tx.put(f"bk/{bid}", True)
        with tx.action("book", args={"thread": THREAD, "node": node, "rnd": rnd,
                                     "bid": bid}, compensate="cancel") as act:
            append(path, f"book {THREAD} {node} {rnd} {bid} {os.getpid()}")
            act.result = {"ok": True}
    return bid


def node_names(spec: dict) -> list[str]:
    """The booking nodes (``@task``s) one run of ``spec``'s graph books in, once each."""
    kind = spec["kind"]
    if kind == "linear":
        return [f"n{i}" for i in range(spec["length"])]
    if kind == "parallel":
        return ["a1", *(["a2"] if spec["long_branch"] else []), "b1", "join"]
    if kind == "subgraph":
        return ["pre", "s1", "s2", "post"]
    if kind == "interrupt":
        return ["plan", "ask", "final"]
    return ["f1", "f2", "f3"]


def build(store: Any, path: str, spec: dict, **saver_options: Any) -> tuple[Any, Any]:
    """(graph, saver) of ``spec``."""
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import interrupt
    from walstore.integrations.langgraph import WalstoreSaver

    saver = WalstoreSaver(store, **saver_options)
    pause, inline = spec["pause"], spec["inline"]

    def held(name: str) -> None:
        """(``spec["hold"]``, the focused tests': after ``name``'s booking committed,
        say so in ``<ledger>.held`` and wait to be killed)"""
        if spec.get("hold") == name:
            append(path + ".held", name)
            time.sleep(120)

    def make(name: str, before: Callable | None = None) -> Callable:
        if spec["call"] == "invoke":
            def node(s: dict) -> dict:
                if before is not None:
                    before()
                time.sleep(pause)
                bid = book(store, path, name, s["rnd"])
                time.sleep(pause)
                held(name)
                return {"ran": [bid]}
            return node

        async def anode(s: dict) -> dict:
            if before is not None:
                before()
            await asyncio.sleep(pause)
            if inline:
                bid = book(store, path, name, s["rnd"])
            else:
                bid = await asyncio.to_thread(book, store, path, name, s["rnd"])
            await asyncio.sleep(pause)
            await asyncio.to_thread(held, name)
            return {"ran": [bid]}
        return anode

    kind = spec["kind"]
    if kind == "functional":
        from langgraph.func import entrypoint, task

        def make_task(name: str) -> Any:
            if spec["call"] == "invoke":
                def body(rnd: int) -> str:
                    time.sleep(pause)
                    return book(store, path, name, rnd)
            else:
                async def body(rnd: int) -> str:   # type: ignore[misc]
                    await asyncio.sleep(pause)
                    if inline:
                        return book(store, path, name, rnd)
                    return await asyncio.to_thread(book, store, path, name, rnd)
            body.__name__ = name
            return task(body)
        f1, f2, f3 = (make_task(n) for n in ("f1", "f2", "f3"))
        together = spec["together"]
        if spec["call"] == "invoke":
            @entrypoint(checkpointer=saver)
            def trip(inp: dict, *, previous: Any = None) -> dict:
                prev = list((previous or {}).get("ran", []))
                if together:
                    a, b = f1(inp["rnd"]), f2(inp["rnd"])
                    got = [a.result(), b.result()]
                else:
                    got = [f1(inp["rnd"]).result(), f2(inp["rnd"]).result()]
                return {"rnd": inp["rnd"], "ran": prev + got + [f3(inp["rnd"]).result()]}
        else:
            @entrypoint(checkpointer=saver)
            async def trip(inp: dict, *, previous: Any = None) -> dict:  # type: ignore[misc]
                prev = list((previous or {}).get("ran", []))
                if together:
                    got = list(await asyncio.gather(f1(inp["rnd"]), f2(inp["rnd"])))
                else:
                    got = [await f1(inp["rnd"]), await f2(inp["rnd"])]
                return {"rnd": inp["rnd"], "ran": prev + got + [await f3(inp["rnd"])]}
        return trip, saver

    b = StateGraph(State)
    if kind == "linear":
        names = node_names(spec)
        for n in names:
            b.add_node(n, make(n))
        b.add_edge(START, names[0])
        for x, y in zip(names, names[1:]):
            b.add_edge(x, y)
        b.add_edge(names[-1], END)
    elif kind == "parallel":
        for n in node_names(spec):
            b.add_node(n, make(n))
        b.add_edge(START, "a1")
        b.add_edge(START, "b1")
        last_a = "a2" if spec["long_branch"] else "a1"
        if spec["long_branch"]:
            b.add_edge("a1", "a2")
        b.add_edge([last_a, "b1"], "join")
        b.add_edge("join", END)
    elif kind == "subgraph":
        inner = StateGraph(State)
        inner.add_node("s1", make("s1"))
        inner.add_node("s2", make("s2"))
        inner.add_edge(START, "s1")
        inner.add_edge("s1", "s2")
        inner.add_edge("s2", END)
        sub = inner.compile()
        b.add_node("pre", make("pre"))
        b.add_node("post", make("post"))
        if spec["sub_as_node"]:
            b.add_node("sub", sub)
        elif spec["call"] == "invoke":
            b.add_node("sub", lambda s: {"ran": sub.invoke({"rnd": s["rnd"], "ran": []})[
                "ran"]})
        else:
            async def call_sub(s: dict) -> dict:
                return {"ran": (await sub.ainvoke({"rnd": s["rnd"], "ran": []}))["ran"]}
            b.add_node("sub", call_sub)
        b.add_edge(START, "pre")
        b.add_edge("pre", "sub")
        b.add_edge("sub", "post")
        b.add_edge("post", END)
    elif kind == "interrupt":
        # (books AFTER interrupt(): LangGraph runs an interrupted node again from its
        # start, so a booking before it would be made again, as documented)
        b.add_node("plan", make("plan"))
        b.add_node("ask", make("ask", before=lambda: interrupt("confirm?")))
        b.add_node("final", make("final"))
        b.add_edge(START, "plan")
        b.add_edge("plan", "ask")
        b.add_edge("ask", "final")
        b.add_edge("final", END)
    else:
        raise ValueError(kind)
    return b.compile(checkpointer=saver), saver


def invoke(graph: Any, spec: dict, inp: Any) -> Any:
    if spec["call"] == "invoke":
        return graph.invoke(inp, CONFIG, durability=spec["durability"])
    return asyncio.run(graph.ainvoke(inp, CONFIG, durability=spec["durability"]))


def next_input(graph: Any, rnd: int) -> tuple[str, Any]:
    """What resumes the thread towards the end of run ``rnd``: ("done", None), ("none",
    None), ("answer", Command) or ("input", the run's input: its input was never
    saved)."""
    from langgraph.types import Command
    st = graph.get_state(CONFIG)
    if st.tasks:   # (a task with its writes saved is in ``tasks``, not in ``next``)
        if st.interrupts:
            return "answer", Command(resume="yes")
        return "none", None
    if (st.values or {}).get("rnd") == rnd:
        return "done", None
    return "input", {"rnd": rnd, "ran": []}


def resume(graph: Any, spec: dict, rnd: int, steps: list | None = None) -> None:
    """Resume the thread until run ``rnd`` finished (``steps``: what each call was)."""
    for _ in range(8):
        what, inp = next_input(graph, rnd)
        if steps is not None:
            steps.append(what)
        if what == "done":
            return
        invoke(graph, spec, inp)
    raise RuntimeError(f"run {rnd} never finished: {steps}")


def undo_records(saver: Any) -> list[dict]:
    return [{"undone": list(u.undone), "kept": list(u.kept), "left": list(u.left)}
            for u in saver.resume_undos]


def child(mode: str, spec: dict, store_path: str, path: str) -> None:
    """A child process: "run" (a first run when ``spec["warm"]``, READY, then the
    round's run, answering an interrupt itself) or "resume" (READY, then ``resume``)."""
    import walstore
    pause = spec["undo_pause"] if mode == "resume" else 0.0
    store = walstore.open(store_path, compensators=compensators(path, pause))
    graph, saver = build(store, path, spec, undo_on_resume=spec.get("undo", True))
    rnd = spec["rnd"]
    if mode == "run":
        if spec["warm"]:
            invoke(graph, spec, {"rnd": rnd - 1, "ran": []})
            resume(graph, spec, rnd - 1)
        print("READY", flush=True)
        invoke(graph, spec, {"rnd": rnd, "ran": []})
        resume(graph, spec, rnd)   # (the interrupt's answer, in this process)
        print("DONE run", flush=True)
    else:
        print("READY", flush=True)
        steps: list = []
        resume(graph, spec, rnd, steps)
        print("DONE " + json.dumps({"steps": steps, "undos": undo_records(saver)}),
              flush=True)
    store.close()


# -- the parent --

class Child(Child_):
    """This file in ``--child`` mode, in a subprocess (``kill_soak_support.Child``)."""

    def __init__(self, mode: str, spec: dict, store_path: str, path: str) -> None:
        super().__init__(__file__, mode, spec, store_path, path, CHILD_WAIT)


_WARNED = re.compile(rb"its node transactions ([0-9, ]+) were reverted")


def warned_undos(err: bytes) -> list[dict]:
    """The resume undos a child's saver logged (WARNING, on stderr): they are told as
    they are made, a child killed later included."""
    return [{"undone": [int(t) for t in m.group(1).split(b",")], "kept": [], "left": []}
            for m in _WARNED.finditer(err)]


def kill_at(c: Child, how: tuple, path: str) -> dict:
    """Kill ``c`` as ``how`` says: ("delay", seconds) after READY, ("lines", n,
    seconds) that long after the ledger has n lines more than at READY, or ("held",)
    once it holds where ``spec["hold"]`` says.  What happened."""
    if not c.ready.wait(CHILD_WAIT) or c.proc.poll() is not None and "READY" not in c.lines:
        c.kill()
        return {"killed": False, "stuck": "READY" not in c.lines, "rc": c.proc.returncode}
    base = lines_in(path)
    if how[0] == "held":   # (the focused tests': the child holds after a booking)
        while c.proc.poll() is None and not os.path.exists(path + ".held"):
            time.sleep(0.005)
    elif how[0] == "delay":
        deadline = time.monotonic() + how[1]
        while time.monotonic() < deadline and c.proc.poll() is None:
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    else:
        while c.proc.poll() is None and lines_in(path) < base + how[1]:
            time.sleep(0.001)
        if len(how) > 2 and how[2]:   # (a moment more: the booking's commit lands)
            time.sleep(how[2])
    at = lines_in(path) - base
    killed = c.kill()
    return {"killed": killed, "lines_after_ready": at, "rc": c.proc.returncode}


def draw(seed: int, rnd_no: int) -> dict:
    rng = random.Random(f"{seed}-{rnd_no}")
    kind = rng.choice(KINDS)
    call = rng.choice(["invoke", "ainvoke"])
    spec = {
        "kind": kind, "call": call, "durability": rng.choice(["sync", "async", "exit"]),
        "length": rng.choice([3, 4]), "long_branch": rng.random() < 0.5,
        "sub_as_node": rng.random() < 0.6, "together": rng.random() < 0.5,
        "inline": rng.random() < 0.5,
        "pause": rng.choice([0.0, 0.0, 0.003, 0.02]),
        "undo_pause": rng.choice([0.0, 0.0, 0.01, 0.05]),
        "warm": rng.random() < 0.4,
    }
    spec["rnd"] = 2 if spec["warm"] else 1
    n = len(node_names(spec)) * (2 if spec["warm"] else 1)
    after = [0.0, 0.0, 0.001, 0.005, 0.02, 0.05]
    spec["kill1"] = (("delay", round(rng.uniform(0.0, 0.25 + n * (0.02 + 2 * spec["pause"])), 4))
                     if rng.random() < 0.4 else
                     ("lines", rng.randint(1, len(node_names(spec))), rng.choice(after)))
    spec["kill2"] = None if rng.random() < 0.6 else (
        ("delay", round(rng.uniform(0.0, 0.3), 4)) if rng.random() < 0.4
        else ("lines", rng.randint(1, 3), rng.choice(after)))
    spec["final_in_process"] = rng.random() < 0.4
    return spec


def in_process_resume(spec: dict, store_path: str, path: str) -> dict:
    import walstore
    store = walstore.open(store_path, compensators=compensators(path))
    try:
        graph, saver = build(store, path, spec, undo_on_resume=spec.get("undo", True))
        steps: list = []
        resume(graph, spec, spec["rnd"], steps)
        return {"steps": steps, "undos": undo_records(saver), "in_process": True}
    finally:
        store.close()


def final_state(spec: dict, store_path: str, path: str) -> dict:
    import walstore
    store = walstore.open(store_path, readonly=True)
    try:
        graph, _saver = build(store, path, spec)
        st = graph.get_state(CONFIG)
        return {"values": st.values, "tasks": [t.name for t in st.tasks]}
    finally:
        store.close()


def judge(spec: dict, out: dict, ledger: list[list[str]], state: dict) -> list[str]:
    """The disagreements of a finished round (kinds; an empty list: it agrees)."""
    problems: list[str] = []
    ran = list((state.get("values") or {}).get("ran", []))
    if state.get("tasks"):
        problems.append("not-finished")
    booked = {w[4]: w for w in ledger if w[0] == "book"}
    cancels = collections.defaultdict(list)
    for i, w in enumerate(ledger):
        if w[0] == "cancel":
            cancels[w[4]].append((i, w))
    rec = collections.Counter(ran)
    if any(v > 1 for v in rec.values()):
        problems.append("recorded-twice")
    counts = collections.Counter((b.split(".")[1], b.split(".")[0]) for b in ran)
    for r in range(1, spec["rnd"] + 1):
        for n in node_names(spec):
            if counts[(str(r), n)] != 1:
                problems.append(f"node-ran-{counts[(str(r), n)]}x")
    return problems + ledger_problems(out, ledger, rec, booked, cancels, pid_at=6,
                                      key_at=5)


def documented(spec: dict, out: dict, problems: list[str]) -> str | None:
    """The documented limit that explains ``problems``, if one does (none now: the one
    there was, a run killed before its thread's first checkpoint, is undone since stop
    79 by the next run on the empty thread)."""
    return None


def round_(seed: int, rnd_no: int, root: str, undo: bool = True) -> dict:
    from walstore.ops.verify import verify_store
    spec = draw(seed, rnd_no)
    spec["undo"] = undo
    d = tempfile.mkdtemp(dir=root)
    store_path, path = os.path.join(d, "s"), os.path.join(d, "ledger")
    out: dict = {"round": rnd_no, "seed": seed, "spec": spec, "kills": 0,
                 "killed_pids": [], "resumes": [], "undos": []}
    try:
        c = Child("run", spec, store_path, path)
        if not first_kill(out, c, kill_at, tuple(spec["kill1"]), path):
            return out
        out["no_head_at_resume"] = _no_head(spec, store_path, path)
        if spec["kill2"] is not None:
            c2 = Child("resume", spec, store_path, path)
            k2 = kill_at(c2, tuple(spec["kill2"]), path)
            out["kill2"] = k2
            if k2["killed"]:
                out["kills"] += 1
                out["killed_pids"].append(c2.proc.pid)
            elif c2.proc.returncode != 0:
                out["crash"] = (f"resume child exit {c2.proc.returncode}: "
                                + c2.err.decode()[-2000:])
                return out
            if c2.done():
                out["resumes"].append(c2.done())
            out["undos"] += warned_undos(c2.err)
        if spec["final_in_process"]:
            try:
                out["resumes"].append(in_process_resume(spec, store_path, path))
            except Exception:  # noqa: BLE001
                out["crash"] = "in-process resume: " + traceback.format_exc()[-2000:]
                return out
        else:
            c3 = Child("resume", spec, store_path, path)
            rc = c3.finish()
            if rc != 0:
                out["crash"] = f"resume child exit {rc}: " + c3.err.decode()[-2000:]
                return out
            out["resumes"].append(c3.done())
            out["undos"] += warned_undos(c3.err)
        out["undos"] = [u for r in out["resumes"] if r.get("in_process")
                        for u in r["undos"] if u["undone"]] + out["undos"]
        state = final_state(spec, store_path, path)
        ledger = read_ledger(path)
        out["ledger"] = [" ".join(w) for w in ledger]
        problems = judge(spec, out, ledger, state)
        rep = verify_store(store_path)
        if rep.errors or rep.pending_compensations or rep.in_doubt:
            problems.append("verify")
            out["verify"] = {"errors": [str(e) for e in rep.errors],
                             "pending": len(rep.pending_compensations)}
        out["problems"] = problems
        out["limit"] = documented(spec, out, problems) if problems else None
        out["cancels"] = sum(1 for w in ledger if w[0] == "cancel")
        return out
    except Exception:  # noqa: BLE001
        out["crash"] = traceback.format_exc()[-3000:]
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _no_head(spec: dict, store_path: str, path: str) -> bool:
    """After the first kill: the thread has no checkpoint of the round's run and none
    before it (a new run from the input, nothing to undo from)."""
    import walstore
    if not os.path.exists(store_path):
        return True
    store = walstore.open(store_path, readonly=True)
    try:
        _graph, saver = build(store, path, spec)
        return not list(saver.list(CONFIG, limit=1))
    finally:
        store.close()


def verdict(o: dict) -> str:
    if "crash" in o:
        return "crash"
    if not o.get("problems"):
        return "agree"
    return o["limit"] or "DISAGREE"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill soak of a LangGraph run on walstore")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--only", type=int, nargs="+", help="run these round numbers only")
    ap.add_argument("--out", default=None, help="append each round as a JSON line")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--no-undo", action="store_true",
                    help="savers with undo_on_resume=False (what the undo buys: the "
                         "killed step's bookings then stand beside the resumed step's)")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "SPEC", "STORE", "LEDGER"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], json.loads(a.child[1]), a.child[2], a.child[3])
        return 0
    root = tempfile.mkdtemp(prefix="lg_kill_soak_")
    rounds = a.only or range(a.rounds)
    totals: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    bad = 0
    try:
        with open(a.out or os.devnull, "a") as f:
            for n in rounds:
                o = round_(a.seed, n, root, not a.no_undo)
                f.write(json.dumps(o, default=repr) + "\n")
                f.flush()
                v = verdict(o)
                totals["rounds"] += 1
                totals["kills"] += o["kills"]
                totals["second_kills"] += int(bool((o.get("kill2") or {}).get("killed")))
                totals["undos"] += len(o.get("undos", ()))
                totals["undone_txns"] += sum(len(u["undone"]) for u in o.get("undos", ()))
                totals["cancels"] += o.get("cancels", 0)
                totals["recompensated"] += o.get("recompensated", 0)
                kinds[v if v != "DISAGREE" else "DISAGREE:" + "+".join(o["problems"])] += 1
                if v in ("crash", "DISAGREE"):
                    bad += 1
                if v != "agree" or a.verbose:
                    print("ROUND", n, v, json.dumps({k: o.get(k) for k in (
                        "spec", "kill1", "kill2", "no_head_at_resume", "resumes", "problems",
                        "live", "recorded", "ledger", "verify", "crash")}, default=repr),
                        flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {"seed": a.seed, **totals, "verdicts": dict(kinds), "unexplained": bad}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"seed {a.seed}: {totals['rounds']} rounds, {totals['kills']} kills "
              f"({totals['second_kills']} of a resuming process), {totals['undos']} resume "
              f"undos ({totals['undone_txns']} transactions), {totals['cancels']} "
              f"cancellations ({totals['recompensated']} run again after a kill); "
              + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
              + f"; {bad} matching no documented limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
