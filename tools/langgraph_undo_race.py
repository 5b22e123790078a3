"""Randomised races of a LangGraph run against undos (stop 77, h6), checked against an
outside ledger: the saver's cut-off runs and the undo of their unsaved steps.  Each
iteration: a fresh store, a StateGraph of 2-4 booking nodes (some in parallel), each a
store transaction with an action whose compensation writes to the ledger; the run
(invoke/ainvoke, durability sync/async/exit) is held at a random point (a node
before/after booking, a checkpoint save, a task's pending writes) or left free, and
another caller rewinds/purges/reverts/does nothing; the run finishes or is refused, is
optionally resumed, and the ledger is compared with the thread's latest checkpoint.

usage: python tools/langgraph_undo_race.py [--n 300] [--seed0 0] [--only SEED ...] [--out F]

Exit status 1 when an iteration crashed, got stuck, compensated twice, or disagreed
with the ledger in a way no documented limit explains (DISAGREE); 0 otherwise.
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
import threading
import time
import traceback
import uuid
from typing import Annotated, TypedDict

import walstore
from langgraph.graph import END, START, StateGraph
from walstore.integrations.langgraph import StaleCheckpointError, WalstoreSaver

WAIT = 20.0


class S(TypedDict):
    rnd: int
    booked: Annotated[list, operator.add]


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list = []

    def book(self, name: str, inst: str) -> None:
        with self.lock:
            self.events.append(("book", name, inst))

    def cancel(self, name: str, inst: str) -> None:
        with self.lock:
            self.events.append(("cancel", name, inst))

    def standing(self) -> collections.Counter:
        with self.lock:
            ev = list(self.events)
        booked = {i: n for k, n, i in ev if k == "book"}
        cancelled = {i for k, n, i in ev if k == "cancel"}
        return collections.Counter(n for i, n in booked.items()
                                   if i not in cancelled and not n.endswith("@9"))

    def doubles(self) -> list:
        with self.lock:
            ev = list(self.events)
        c = collections.Counter(i for k, n, i in ev if k == "cancel")
        booked = {i for k, n, i in ev if k == "book"}
        return [i for i, x in c.items() if x > 1 or i not in booked]


class Gate:
    """Holds the run once, where ``where`` says, until released."""

    def __init__(self, where) -> None:
        self.where = where
        self.reached, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.fired = False
        self.counts: collections.Counter = collections.Counter()

    def hit(self, where) -> None:
        if self.where is None:
            return
        with self.lock:
            if where[0] == "put":
                self.counts["put"] += 1
                match = self.where[0] == "put" and self.counts["put"] == self.where[1]
            else:
                match = where == self.where
            if not match or self.fired:
                return
            self.fired = True
        self.reached.set()
        self.release.wait(WAIT)


class HSaver(WalstoreSaver):
    gate: Gate | None = None

    def put(self, config, checkpoint, metadata, new_versions):
        if self.gate is not None:
            self.gate.hit(("put", None))
        return super().put(config, checkpoint, metadata, new_versions)

    def put_writes(self, config, writes, task_id, task_path=""):
        if self.gate is not None:
            for ch, v in writes:
                if ch == "booked" and v:
                    self.gate.hit(("writes", v[0].split("@")[0]))
        return super().put_writes(config, writes, task_id, task_path)


def disrupt(dk, rng, store, saver, config, scope, start_lsn, rnd, rp):
    """One undo by another caller; (its result, its target)."""
    target = None
    try:
        sc = rng.choice([scope, None, b"lg"])
        if dk.startswith(("rewind-lsn", "rewind-txid")):
            log = store.log()
            if dk.endswith("-main"):
                log = [i for i in log if int(i.lsn) >= start_lsn] or log
            pick = rng.choice(log)
            to = pick.lsn if dk.startswith("rewind-lsn") else pick.txid
            target = (int(to), (pick.meta or {}).get("langgraph") if isinstance(
                pick.meta, dict) else None, repr(sc))
            r = store.rewind(to, scope=sc)
        elif dk == "rewind-rp":
            if "rp0" in store.restore_points() and rng.random() < 0.4:
                point = "rp0"
            else:
                point = rp
                store.restore_point(point)
                with store.transaction(scope=scope) as tx:
                    tx.put("side/note", rp)
            target = (point, repr(sc))
            r = store.rewind(point, scope=sc)
        elif dk == "saver-rewind":
            tups = list(saver.list(config))
            if not tups:
                r = "no-checkpoint"
            else:
                t = rng.choice(tups)
                target = (t.metadata.get("step"), t.config["configurable"]["checkpoint_id"])
                r = saver.rewind(t.config, dry_run=False)
        elif dk == "purge":
            r = store.purge(scope)
        elif dk == "delete":
            r = saver.delete_thread(config["configurable"]["thread_id"])
        elif dk == "revert":
            acts = [a for a in store.actions() if a.args.get("name", "").endswith(
                f"@{rnd}")] or store.actions()
            if acts:
                a = rng.choice(acts)
                target = a.args["name"]
                r = store.revert(a.txid)
            else:
                r = "no-action"
        else:
            r = None
        return ("none" if r is None else r if isinstance(r, str) else "done"), target
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}", target


def build(saver, store, ledger, gate, layers, kinds, subs=()):
    def book(name: str) -> None:
        inst = uuid.uuid4().hex[:10]
        with store.transaction() as tx:
            tx.put(f"bk/{name}/{inst}", True)
            with tx.action("book", args={"name": name, "inst": inst},
                           compensate="cancel") as act:
                ledger.book(name, inst)
                act.result = {"ok": True}

    def make(n: str, kind: str):
        if kind == "sync":
            def node(s):
                name = f"{n}@{s['rnd']}"
                gate.hit(("node", n, "before"))
                book(name)
                gate.hit(("node", n, "after"))
                return {"booked": [name]}
            return node

        async def anode(s):
            name = f"{n}@{s['rnd']}"
            await asyncio.to_thread(gate.hit, ("node", n, "before"))
            if kind == "async-loop":
                book(name)
            else:
                await asyncio.to_thread(book, name)
            await asyncio.to_thread(gate.hit, ("node", n, "after"))
            return {"booked": [name]}
        return anode

    def make_sub(n: str, kind: str):
        # a node that runs a subgraph of two booking steps (its own checkpoints, in the
        # namespace "n:<task id>"; its node transactions judged by the parent's task)
        sb = StateGraph(S)
        sb.add_node("a", make(f"{n}.a", kind))
        sb.add_node("b", make(f"{n}.b", kind))
        sb.add_edge(START, "a")
        sb.add_edge("a", "b")
        sb.add_edge("b", END)
        sub = sb.compile()
        if kind == "sync":
            def node(s):
                return {"booked": sub.invoke({"rnd": s["rnd"], "booked": []})["booked"]}
            return node

        async def anode(s):
            r = await sub.ainvoke({"rnd": s["rnd"], "booked": []})
            return {"booked": r["booked"]}
        return anode

    b = StateGraph(S)
    for layer in layers:
        for n in layer:
            b.add_node(n, make_sub(n, kinds[n]) if n in subs else make(n, kinds[n]))
    for n in layers[0]:
        b.add_edge(START, n)
    for a, c in zip(layers, layers[1:]):
        for x in a:
            for y in c:
                b.add_edge(x, y)
    for n in layers[-1]:
        b.add_edge(n, END)
    return b.compile(checkpointer=saver)


def recorded(graph, saver, config) -> collections.Counter:
    """The bookings the thread's latest state records: its head checkpoint's values with
    the pending writes of its next tasks applied (LangGraph's get_state does that: the
    tasks a resume takes as done)."""
    return collections.Counter(graph.get_state(config).values.get("booked", []))


def iteration(seed: int, root: str) -> dict:
    rng = random.Random(seed)
    d = tempfile.mkdtemp(dir=root)
    ledger = Ledger()
    store = walstore.open(os.path.join(d, "s"), durability="none", compensators={
        "cancel": lambda a: ledger.cancel(a.args["name"], a.args["inst"])})
    out: dict = {"seed": seed}
    try:
        saver = HSaver(store)
        k = rng.randint(2, 4)
        names = [f"n{i}" for i in range(k)]
        layers, i = [], 0
        while i < k:
            w = 2 if (k - i >= 2 and rng.random() < 0.4) else 1
            layers.append(names[i:i + w])
            i += w
        mode = rng.choice(["invoke", "ainvoke"])
        kinds = {n: ("sync" if mode == "invoke" else
                     rng.choice(["sync", "async-thread", "async-loop"])) for n in names}
        durability = rng.choice(["sync", "async", "exit"])
        subs = {n for n in names if rng.random() < 0.2}
        both = rng.random() < 0.3   # a second thread "v" in flight beside "t"
        out.update(layers=layers, mode=mode, kinds=kinds, durability=durability,
                   subs=sorted(subs), both=both)
        holdable = [x for n in names for x in ([f"{n}.a", f"{n}.b"] if n in subs else [n])]
        tid = "t"
        config = {"configurable": {"thread_id": tid}}
        scope = saver.thread_scope(tid)
        warm = rng.random() < 0.6
        idle = Gate(None)
        saver.gate = idle
        graph = build(saver, store, ledger, idle, layers, {n: "sync" for n in names}, subs)
        if warm:
            graph.invoke({"rnd": 1, "booked": []}, config, durability="sync")
        if rng.random() < 0.3:   # another thread's history, for unscoped rewinds
            graph.invoke({"rnd": 9, "booked": []}, {"configurable": {"thread_id": "u"}},
                         durability="sync")
        if rng.random() < 0.5:
            store.restore_point("rp0")
        rnd = 2 if warm else 1
        out["rnd"] = rnd
        hk = rng.choice(["node-before", "node-after", "node-after", "put", "writes", "free"])
        if hk.startswith("node"):
            where = ("node", rng.choice(holdable), hk.split("-")[1])
        elif hk == "put":
            where = ("put", rng.randint(1, len(layers) + 1))
        elif hk == "writes":
            where = ("writes", rng.choice(holdable))
        else:
            where = None
        out["hold"] = where
        gate = Gate(where)
        saver.gate = gate
        start_lsn = int(store.log(limit=1)[0].lsn) if store.log(limit=1) else 0
        graph = build(saver, store, ledger, gate, layers, kinds, subs)
        res: dict = {}
        config_v = {"configurable": {"thread_id": "v"}}

        def run(cfg=config, r=rnd, key="run") -> None:
            try:
                inp = {"rnd": r, "booked": []}
                if mode == "invoke":
                    graph.invoke(inp, cfg, durability=durability)
                else:
                    asyncio.run(graph.ainvoke(inp, cfg, durability=durability))
                res[key] = "ok"
            except Exception as e:  # noqa: BLE001
                res[key] = type(e).__name__
                res[key + "_msg"] = str(e)[:300]
            res[key + "_end"] = time.monotonic()
        th = threading.Thread(target=run)
        th.start()
        th_v = None
        if both:
            th_v = threading.Thread(target=run, args=(config_v, 7, "run_v"))
            th_v.start()
        if where is not None:
            while not gate.reached.wait(0.01):
                if not th.is_alive():
                    break
        else:
            time.sleep(rng.uniform(0, 0.06))
        out["in_flight"] = th.is_alive()
        kinds_all = ["rewind-lsn", "rewind-lsn-main", "rewind-txid-main", "rewind-txid",
                     "rewind-rp", "rewind-rp", "saver-rewind", "saver-rewind", "purge",
                     "delete", "revert", "none"]
        dk = rng.choice(kinds_all)
        out["disrupt"] = dk
        out["log_at"] = [(int(i.lsn), i.txid, repr(i.meta)[:90]) for i in store.log()]
        t0 = time.monotonic()
        out["disrupt_result"], out["target"] = disrupt(dk, rng, store, saver, config, scope,
                                                       start_lsn, rnd, "rp1")
        out["disrupt_s"] = round(time.monotonic() - t0, 3)
        second = None
        if rng.random() < 0.35:   # another undo racing the run's refused save
            second = rng.choice(["revert", "rewind-rp", "saver-rewind", "rewind-lsn-main",
                                 "delete"])
            delay = rng.uniform(0, 0.02)
        out["second"] = second
        gate.release.set()
        if second is not None:
            time.sleep(delay)
            out["second_t0"] = time.monotonic()
            out["second_result"], out["second_target"] = disrupt(
                second, rng, store, saver, config, scope, start_lsn, rnd, "rp2")
        th.join(WAIT * 3)
        if th_v is not None:
            th_v.join(WAIT * 3)
        if th.is_alive() or (th_v is not None and th_v.is_alive()):
            out["stuck"] = True
            return out
        out.update(res)
        out["after_run"] = (dict(recorded(graph, saver, config) + (recorded(
            graph, saver, config_v) if both else collections.Counter())),
            dict(ledger.standing()))
        if rng.random() < 0.6:
            saver.gate = idle
            g2 = build(saver, store, ledger, idle, layers, {n: "sync" for n in names}, subs)
            try:
                g2.invoke(None, config, durability="sync")
                if both:
                    g2.invoke(None, config_v, durability="sync")
                out["resume"] = "ok"
            except Exception as e:  # noqa: BLE001
                out["resume"] = f"{type(e).__name__}: {str(e)[:200]}"
        rec, stand = recorded(graph, saver, config), ledger.standing()
        if both:
            rec += recorded(graph, saver, config_v)
        out["final"] = (dict(rec), dict(stand))
        out["agree"] = rec == stand
        out["agree_after_run"] = out["after_run"][0] == out["after_run"][1]
        out["doubles"] = ledger.doubles()
        out["events"] = list(ledger.events)
        out["log_end"] = [(int(i.lsn), i.txid, repr(i.meta)[:90]) for i in store.log()]
        out["actions"] = [(a.txid, a.args.get("name")) for a in store.actions()]
        return out
    except Exception as e:  # noqa: BLE001
        out["crash"] = traceback.format_exc()
        return out
    finally:
        try:
            store.close()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(d, ignore_errors=True)


def finished_split(o: dict) -> bool:
    """A store.rewind to a raw point (LSN, txid, restore point) that left a booking of a
    run no longer in flight (the warm-up round, or the main run finished before the
    undo) whose step's checkpoint it took back: not what the cut-off run's undo covers."""
    if not any((k or "").startswith("rewind-") for k in (o.get("disrupt"), o.get("second"))):
        return False
    rec, stand = (collections.Counter(x) for x in o["final"])
    diff = {n for n in set(rec) | set(stand) if rec[n] != stand[n]}
    if any(rec[n] > stand[n] for n in diff):
        return False   # (recorded but not standing: never what a split leaves)
    # a thread's run that was cut off (refused) must leave nothing unrecorded; one that
    # returned saved all it did before the undo, the warm-up rounds were done before
    cut = set()
    if o.get("in_flight") and o.get("run") != "ok":
        cut.add(o["rnd"])
    if o.get("in_flight") and o.get("both") and o.get("run_v") != "ok":
        cut.add(7)
    return all(int(n.split("@")[1]) not in cut for n in diff)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--only", type=int, nargs="+")
    ap.add_argument("--out", default=None, help="append each iteration as a JSON line")
    a = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="lg_undo_race_")
    seeds = a.only or range(a.seed0, a.seed0 + a.n)
    kinds: collections.Counter = collections.Counter()
    bad = 0
    with open(a.out or os.devnull, "a") as f:
        for seed in seeds:
            o = iteration(seed, root)
            f.write(json.dumps(o, default=repr) + "\n")
            f.flush()
            erase = (o.get("disrupt") in ("purge", "delete") and o.get(
                "disrupt_result") in ("done", "none")) or (o.get("second") == "delete" and o.get(
                "second_result") in ("done", "none"))
            verdict = ("crash" if "crash" in o else "stuck" if o.get("stuck") else
                       "double" if o.get("doubles") else
                       "agree" if o.get("agree") else
                       "erase-disagree" if erase else
                       "revert-disagree" if "revert" in (o.get("disrupt"), o.get("second")) else
                       "finished-step-split" if finished_split(o) else "DISAGREE")
            kinds[(o.get("disrupt") + ("+" + o["second"] if o.get("second") else ""),
                   o.get("run"), verdict)] += 1
            if verdict in ("crash", "stuck", "double", "DISAGREE"):
                bad += 1
            if verdict not in ("agree", "erase-disagree", "revert-disagree"):
                print("SEED", seed, verdict, json.dumps({k: o.get(k) for k in (
                    "layers", "mode", "durability", "hold", "in_flight", "disrupt", "target",
                    "disrupt_result", "second", "second_target", "second_result", "subs", "both",
                    "run", "run_msg", "run_v", "resume", "after_run", "final",
                    "doubles", "crash")}, default=repr), flush=True)
    for k, v in sorted(kinds.items(), key=repr):
        print(v, *k)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{len(seeds)} iterations, {bad} matching no documented limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
