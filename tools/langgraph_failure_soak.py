"""Failure soak of walstore's LangGraph saver in ONE process (stop 80, h3): no kills (the
kill soaks cover those) -- nodes that raise, stop at ``interrupt()`` or are retried by
their ``RetryPolicy``, and the moves a user makes next, in a process that stays up.

    PYTHONPATH=. python tools/langgraph_failure_soak.py [--rounds 100] [--seed 1]
        [--only ROUND ...] [--json] [--out F] [-v]

Each round draws a small ``StateGraph``: 2-3 parallel branches from START (one of them,
sometimes, a subgraph of one or two nodes, half of those with a ``RetryPolicy`` of
their own that runs the subgraph again whole when an inner node raises -- drawn from a
stream of its own, so a round's other draws are as before stop 81), sometimes a node
``after`` following them.
Every node books: a walstore transaction (no scope: the node's thread) with an action
``book`` whose compensator "cancel" appends to an fsynced ledger (the outside world);
an idempotent node books only when its key (``k/NODE/TURN``, written in the booking's
transaction) says it has not.  Each node has a behaviour on its first run(s):
``ok``, ``raise_before`` / ``raise_after`` (raises once, before / after its booking),
``int_before`` / ``int_after`` (``interrupt()`` before / after its booking, until
answered), ``retry_before`` / ``retry_after`` (a ``RetryPolicy`` whose first 1-2
attempts raise, before / after booking).  The round sends the first input, then 1-4
random moves: ``none`` (``invoke(None)``), ``resume`` (``Command(resume=...)`` answering
every pending interrupt), ``input`` (new input: the next turn), ``update``
(``update_state(values, as_node=NODE)`` then ``invoke(None)``), ``refail`` (a node
armed to raise once more, then ``invoke(None)`` or new input); each call by invoke,
stream or ainvoke, durability sync/async (exit sometimes).  Then it drives the thread
to its end (answers interrupts, resumes errors).

Checks, per round: the thread finished; every booking id the final state records is
live (booked, not cancelled) exactly once in the ledger; nothing cancelled twice;
``verify_store`` clean; nothing else live, EXCEPT what docs/GUIDE.md documents as left,
each excused by name and counted (``excused``):

* ``interrupt``: a booking made by a node run that then stopped at ``interrupt()``
  (GUIDE: "A task stopped at ``interrupt()`` is not [reverted]: LangGraph's documented
  semantics stand (it runs again from its start on the answer: book after
  ``interrupt()``, or book only when a key says it has not)").  Only the booking of
  that very run (noted as the ``GraphInterrupt`` left the node), and only when the
  final state does not record it.
* ``exit-input``: new input sent under ``durability="exit"`` to a head whose step is
  unfinished (GUIDE: "Under ``durability="exit"``, which saves no input checkpoint, ...
  nothing is refunded: resume with ``None`` first, or rewind").  Only the bookings live
  just before that input that the head's values did not record (the step's work).

Exit status 1 on any disagreement or crash.  ``--json``: one JSON line per round on
stdout (else only disagreeing rounds, or every round with ``-v``), then a summary line.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import operator
import os
import random
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

from tools.kill_soak_support import append, read_ledger  # noqa: E402

THREAD = "t"
CONFIG = {"configurable": {"thread_id": THREAD}}
BEHAVIOURS = ("ok", "raise_before", "raise_after", "int_before", "int_after",
              "retry_before", "retry_after")
INNER = ("ok", "raise_before", "raise_after", "int_before", "int_after")
MOVES = ("none", "resume", "input", "update", "refail")
CALLS = ("invoke", "stream", "ainvoke")


class Boom(Exception):
    """A node's planned failure."""


class State(TypedDict, total=False):
    log: Annotated[list, operator.add]
    turn: int


def draw(seed: int, n: int) -> dict:
    """Round ``n`` of ``seed``: the graph, the behaviours, the moves (JSON-able)."""
    rng = random.Random(f"{seed}-{n}")
    k = rng.randint(2, 3)
    nodes: dict[str, dict] = {}
    sub = rng.random() < 0.35
    for i in range(k):
        name = f"b{i}"
        if sub and i == k - 1:
            inner = {f"s{j}": {"beh": rng.choice(INNER), "idem": rng.random() < 0.4}
                     for j in range(rng.randint(1, 2))}
            nodes[name] = {"sub": inner}
        else:
            nodes[name] = {"beh": rng.choice(BEHAVIOURS), "idem": rng.random() < 0.4,
                           "fails": rng.randint(1, 2)}
    after = rng.random() < 0.5
    if after:
        nodes["after"] = {"beh": rng.choice(BEHAVIOURS), "idem": rng.random() < 0.4,
                          "fails": rng.randint(1, 2)}
    moves = []
    for _ in range(rng.randint(1, 4)):
        m = rng.choice(MOVES)
        mv: dict[str, Any] = {"move": m, "call": rng.choice(CALLS),
                              "durability": rng.choice(["sync", "async", "sync", "async",
                                                        "exit"])}
        if m == "update":
            mv["as_node"] = rng.choice(sorted(nodes))
        if m == "refail":
            flat = [x for x, v in nodes.items() if "sub" not in v]
            mv["node"] = rng.choice(flat)
            mv["when"] = rng.choice(["before", "after"])
            mv["then"] = rng.choice(["none", "input"])
        moves.append(mv)
    if sub:   # (stop 81; its own stream: the draws above stay each round's as before)
        extra = random.Random(f"{seed}-{n}-sub-retry")
        if extra.random() < 0.5:
            nodes[f"b{k - 1}"]["retry"] = extra.randint(1, 2)
    return {"nodes": nodes, "moves": moves, "first": {
        "call": rng.choice(CALLS), "durability": rng.choice(["sync", "async", "exit"])}}


class World:
    """One round's store, ledger, graph and what the nodes did (``interrupted``: the
    bookings of node runs that stopped at ``interrupt()`` after booking)."""

    def __init__(self, spec: dict, d: str) -> None:
        import walstore
        self.spec = spec
        self.store_path, self.path = os.path.join(d, "s"), os.path.join(d, "ledger")
        self.store = walstore.open(self.store_path, compensators={
            "cancel": lambda a: append(self.path, f"cancel {a.args['id']}")})
        self.armed: dict[str, list] = {}   # node -> [when, failures left]
        self.interrupted: dict[str, str] = {}   # bid -> node
        self.exit_input: dict[str, str] = {}   # bid -> "exit-input"
        self.runs: collections.Counter = collections.Counter()
        for name, v in spec["nodes"].items():
            for nn, nv in (v["sub"].items() if "sub" in v else [(name, v)]):
                b = nv["beh"]
                if b.startswith("raise_"):
                    self.armed[nn] = [b.split("_")[1], 1]
                elif b.startswith("retry_"):
                    self.armed[nn] = [b.split("_")[1], nv["fails"]]
        self.graph = self.build()

    def book(self, node: str, idem: bool, turn: int) -> str:
        key = f"k/{node}/{turn}"
        with self.store.transaction(meta="booking") as tx:
            if idem:
                got = tx.get(key)
                if got:
                    return got
            bid = f"{node}-{uuid.uuid4().hex[:8]}"
            with tx.action("book", args={"id": bid}, compensate="cancel") as act:
                append(self.path, f"book {bid}")
                act.result = {"ok": True}
            if idem:
                tx.put(key, bid)
        return bid

    def node(self, name: str, v: dict) -> Callable:
        from langgraph.errors import GraphInterrupt
        from langgraph.types import interrupt

        def fail(when: str) -> None:
            a = self.armed.get(name)
            if a and a[0] == when and a[1] > 0:
                a[1] -= 1
                raise Boom(f"{name} {when}")

        def run(state: State) -> dict:
            self.runs[name] += 1
            beh = v["beh"]
            fail("before")
            if beh == "int_before":
                interrupt(f"{name}?")
            bid = self.book(name, v["idem"], state.get("turn", 0))
            fail("after")
            if beh == "int_after":
                try:
                    interrupt(f"{name}?")
                except GraphInterrupt:
                    self.interrupted[bid] = name
                    raise
            return {"log": [bid]}
        return run

    def build(self) -> Any:
        from langgraph.graph import END, START, StateGraph
        from langgraph.types import RetryPolicy
        from walstore.integrations.langgraph import WalstoreSaver
        self.saver = WalstoreSaver(self.store)
        b = StateGraph(State)

        def add(g: Any, name: str, v: dict) -> None:
            kw = {}
            if v["beh"].startswith("retry_"):
                kw["retry_policy"] = RetryPolicy(max_attempts=v["fails"] + 1,
                                                 initial_interval=0.0, jitter=False,
                                                 retry_on=Boom)
            g.add_node(name, self.node(name, v), **kw)
        nodes = self.spec["nodes"]
        for name, v in nodes.items():
            if name == "after":
                continue
            if "sub" in v:
                inner = StateGraph(State)
                prev = START
                for nn, nv in v["sub"].items():
                    add(inner, nn, nv)
                    inner.add_edge(prev, nn)
                    prev = nn
                inner.add_edge(prev, END)
                kw = {}
                if v.get("retry"):   # (the subgraph retried whole when an inner node raises)
                    kw["retry_policy"] = RetryPolicy(max_attempts=v["retry"] + 1,
                                                     initial_interval=0.0, jitter=False,
                                                     retry_on=Boom)
                b.add_node(name, inner.compile(), **kw)
            else:
                add(b, name, v)
            b.add_edge(START, name)
            if "after" in nodes:
                b.add_edge(name, "after")
            else:
                b.add_edge(name, END)
        if "after" in nodes:
            add(b, "after", nodes["after"])
            b.add_edge("after", END)
        return b.compile(checkpointer=self.saver)

    def call(self, inp: Any, how: str, durability: str) -> str:
        """Run the graph once; "ok", "boom" (a planned failure ended it)."""
        g = self.graph
        try:
            if how == "invoke":
                g.invoke(inp, CONFIG, durability=durability)
            elif how == "stream":
                for _ in g.stream(inp, CONFIG, durability=durability):
                    pass
            else:
                asyncio.run(g.ainvoke(inp, CONFIG, durability=durability))
        except Boom:
            return "boom"
        return "ok"

    def note_exit_input(self) -> None:
        """New input under ``durability="exit"`` about to be sent: when the head's step
        is unfinished, the bookings live now that the head's values do not record (its
        step's work: finished branches' outcomes, a failed task's) are left by rule."""
        st = self.graph.get_state(CONFIG)
        if not st.next:
            return
        # (the head's own channel values: ``get_state`` shows the finished tasks'
        # saved outcomes applied, which the new input discards)
        tup = self.saver.get_tuple(CONFIG)
        rec = set((tup.checkpoint.get("channel_values") or {}).get("log", [])) \
            if tup else set()
        ledger = read_ledger(self.path)
        cancelled = {x[1] for x in ledger if x[0] == "cancel"}
        for x in ledger:
            if x[0] == "book" and x[1] not in cancelled and x[1] not in rec:
                self.exit_input.setdefault(x[1], "exit-input")

    def answer(self) -> Any:
        """``Command(resume=...)`` answering every pending interrupt (None: none)."""
        from langgraph.types import Command
        st = self.graph.get_state(CONFIG)
        ids = [i.id for t in st.tasks for i in t.interrupts]
        return Command(resume={i: "yes" for i in ids}) if ids else None


def judge(w: World, out: dict) -> list[str]:
    ledger = read_ledger(w.path)
    out["ledger"] = [" ".join(x) for x in ledger]
    booked = collections.Counter(x[1] for x in ledger if x[0] == "book")
    cancelled = collections.Counter(x[1] for x in ledger if x[0] == "cancel")
    st = w.graph.get_state(CONFIG)
    rec = set(st.values.get("log", []))
    out["recorded"] = sorted(rec)
    problems = []
    if st.next:
        problems.append("not-finished")
    if any(v > 1 for v in booked.values()):
        problems.append("booked-twice")
    if rec - set(booked):
        problems.append("recorded-never-booked")
    if rec & set(cancelled):
        problems.append("recorded-but-cancelled")
    if any(v > 1 for v in cancelled.values()):
        problems.append("cancelled-twice")
    live = {b for b in booked if b not in cancelled}
    excused = {b: "interrupt" for b in live - rec if b in w.interrupted}
    excused.update({b: why for b, why in w.exit_input.items()
                    if b in live - rec and b not in excused})
    out["excused"] = excused
    out["live_unrecorded"] = sorted(live - rec - set(excused))
    if out["live_unrecorded"]:
        problems.append("live-unrecorded")
    return problems


def round_(seed: int, n: int, root: str) -> dict:
    from walstore.ops.verify import verify_store
    spec = draw(seed, n)
    d = tempfile.mkdtemp(dir=root)
    out: dict = {"round": n, "spec": spec, "trace": []}
    w = None
    try:
        w = World(spec, d)
        turn = 0
        f = spec["first"]
        out["trace"].append(["first", w.call({"log": [], "turn": 0}, f["call"],
                                             f["durability"])])
        for mv in spec["moves"]:
            m, how, dur = mv["move"], mv["call"], mv["durability"]
            if m == "resume":
                cmd = w.answer()
                r = w.call(cmd, how, dur)
            elif m == "input" or (m == "refail" and mv["then"] == "input"):
                if m == "refail":
                    w.armed[mv["node"]] = [mv["when"], 1]
                if dur == "exit":
                    w.note_exit_input()
                turn += 1
                r = w.call({"log": [], "turn": turn}, how, dur)
            elif m == "update":
                w.graph.update_state(CONFIG, {"log": []}, as_node=mv["as_node"])
                r = w.call(None, how, dur)
            else:
                if m == "refail":
                    w.armed[mv["node"]] = [mv["when"], 1]
                r = w.call(None, how, dur)
            out["trace"].append([m, r])
        for _ in range(12):   # (to the end: answer, resume)
            st = w.graph.get_state(CONFIG)
            if not st.next:
                break
            cmd = w.answer()
            out["trace"].append(["finish", w.call(cmd, "invoke", "sync")])
        out["problems"] = judge(w, out)
        out["undos"] = len(w.saver.resume_undos)
        out["undo_records"] = [
            {k: getattr(u, k) for k in ("checkpoint_id", "undone", "left", "discarded",
                                        "superseded", "rerun")}
            for u in w.saver.resume_undos]
        out["cancels"] = sum(1 for x in out["ledger"] if x.startswith("cancel"))
        w.store.close()
        w = None
        rep = verify_store(os.path.join(d, "s"))
        if rep.errors or rep.pending_compensations or rep.in_doubt:
            out["problems"].append("verify")
            out["verify"] = [str(e) for e in rep.errors]
        return out
    except Exception:  # noqa: BLE001
        out["crash"] = traceback.format_exc()[-3000:]
        return out
    finally:
        if w is not None:
            try:
                w.store.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="in-process failure soak of walstore's "
                                             "LangGraph saver")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--only", type=int, nargs="+")
    ap.add_argument("--json", action="store_true", help="one JSON line per round")
    ap.add_argument("--out", default=None, help="append each round as a JSON line")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    import logging
    logging.getLogger("walstore").setLevel(logging.ERROR)
    root = tempfile.mkdtemp(prefix="lg_failure_soak_")
    totals: collections.Counter = collections.Counter()
    bad = 0
    try:
        with open(a.out or os.devnull, "a") as f:
            for n in a.only or range(a.rounds):
                o = round_(a.seed, n, root)
                f.write(json.dumps(o, default=repr) + "\n")
                v = "crash" if "crash" in o else (
                    "agree" if not o["problems"] else "DISAGREE:" + "+".join(o["problems"]))
                totals[v] += 1
                totals["cancels"] += o.get("cancels", 0)
                totals["undos"] += o.get("undos", 0)
                for why in (o.get("excused") or {}).values():
                    totals["excused:" + why] += 1
                if v != "agree":
                    bad += 1
                if a.json:
                    print(json.dumps({"verdict": v, **o}, default=repr), flush=True)
                elif v != "agree" or a.verbose:
                    print("ROUND", n, v, json.dumps({k: o.get(k) for k in (
                        "spec", "trace", "problems", "ledger", "recorded", "undo_records",
                        "live_unrecorded", "excused", "verify", "crash")},
                        default=repr), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {"seed": a.seed, "rounds": sum(v for k, v in totals.items()
                                             if k == "agree" or k == "crash"
                                             or k.startswith("DISAGREE")),
               "not_agreeing": bad, **dict(sorted(totals.items()))}
    print(json.dumps({"summary": summary}) if a.json else
          f"seed {a.seed}: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
          + f"; {bad} not agreeing", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
