"""Kill soak of an OpenAI Agents SDK turn on walstore's WalstoreSession (stop 79, h5): a
real child process runs the SDK's real Runner (a scripted model, offline) on a session
whose tools book, is SIGKILLed at a random moment, and a new process does what
docs/GUIDE.md (OpenAI Agents SDK, "A turn killed mid-tool") says a user does after a
crash -- resume the RunState it saved, or retry the request -- its first use of the
session undoing the killed turn's work that no saved item records
(``WalstoreSession._settle_restart``, ``session.restart_undo``), until the turn is done;
then the outside ledger is compared with the session's items.

    PYTHONPATH=. python tools/openai_kill_soak.py [--rounds 100] [--seed 1]
        [--only ROUND ...] [--shape SHAPE] [--out F] [--json] [-v]

Each round (its own store, durability "full", and ledger; its choices drawn from
``--seed`` and its number):

* the turn's shape: ``one`` (one tool call, then the answer), ``several`` (three calls in
  one model response: the SDK runs them concurrently), ``steps`` (a call per response,
  two steps), ``stop_first`` (``tool_use_behavior="stop_on_first_tool"``, one or two
  calls: the turn ends with a tool output) or ``approval`` (a booking and a
  ``needs_approval`` tool in one response: the run pauses, the child saves
  ``result.to_state().to_json()`` under ``session.key("pending")`` in the store, approves
  and resumes, in process from the RunState or from the JSON) or ``held`` (the same with
  output guardrails and ``stop_on_first_tool``: the SDK saves the paused step only at the
  resume, so a resume after a restart finds its booking undone and is refused, as
  documented: the turn is run anew); ``Runner.run``,
  ``Runner.run_streamed`` or ``Runner.run_sync``; sync tools or async ones (booking on
  the loop or in a worker thread); sometimes a finished booking turn before;
* every tool books in a walstore transaction whose action, declared in the session's
  scope, appends ``book <bid> <pid>`` to the ledger (fsynced: the outside world) and
  whose compensator, registered at open in every process, appends ``cancel <bid> <key>
  <pid>``; the tool's output names the booking (``booked <bid>``);
* the parent kills the child (SIGKILL) after a random delay, or once the ledger has a
  random number of new lines; then, the first killed, sometimes a resuming child
  killed too (its compensator maybe slow: a kill mid-undo), then a last one that must
  finish: each resumes the saved RunState when there is one (refused with
  ``ConflictError``, a documented case: it deletes it and retries the request), else
  retries the request unless the session shows the turn done;
* the checks: the turn is done (the last request followed by its answer, or by its tool
  output for ``stop_first``; no RunState pending); every booking a tool output in the
  session records is booked once and standing; nothing stands that no item records;
  nothing is cancelled twice (but a compensation whose process was killed right after
  it, which recovery runs again with the same idempotency key: counted, CONTRACT); and
  ``walstore verify`` finds no error and nothing owed.

A disagreement a documented limit explains would be counted as such (``documented``);
none of the GUIDE's limits applies to these turns (one session, one process at a time, no
concurrent turn, no compaction).  Exit status 1 for any other disagreement, a crash of a
resume, a child stuck, or a verify problem.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.kill_soak_support import Child as Child_  # noqa: E402
from tools.kill_soak_support import (append, first_kill,  # noqa: E402,F401
                                     ledger_problems, lines_in, read_ledger)

SESSION = "u"
CHILD_WAIT = 90.0      # a child's budget to reach READY or finish (never in a good round)
SHAPES = ("one", "several", "steps", "stop_first", "approval", "held")
STOPPING = ("stop_first", "held")   # (the turn ends with a tool output)
CALLS = ("run", "streamed", "sync")


# -- the world, the model and the agent (imported by the children) --

def compensators(path: str, pause: float = 0.0) -> dict[str, Callable]:
    """The "cancel" compensator: the booking's cancellation in the ledger (after
    ``pause``: a window for a kill mid-undo)."""
    def cancel(action: Any) -> None:
        if pause:
            time.sleep(pause)
        append(path, f"cancel {action.args['bid']} {action.key} {os.getpid()}")
    return {"cancel": cancel}


def book(store: Any, session: Any, path: str, what: str) -> str:
    """A booking: a transaction whose action, in the session's scope, books in the
    ledger; its id."""
    bid = f"{what}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with store.transaction(meta={"tool": f"book {what}"}) as tx:
        with tx.action("book", args={"what": what, "bid": bid}, compensate="cancel",
                       scope=session.scope) as act:
            append(path, f"book {bid} {os.getpid()}")
            act.result = {"bid": bid}
        tx.put(session.key(f"bookings/{bid}"), "confirmed")
    return bid


def request(rnd: int) -> str:
    return f"book trip {rnd}"


def script(ex: Any, spec: dict, tag: str) -> list:
    """The model's responses for one run of the round's turn from its start (call ids
    unique to ``tag``: a process and a run)."""
    n = iter(range(1000))

    def c(tool: str, what: str) -> Any:
        return ex.call(tool, {"what": what}, f"{tag}_{next(n)}")
    shape = spec["shape"]
    done = [ex.say("done", f"{tag}_{next(n)}")]
    if shape == "one":
        return [[c("book_hotel", "a")], done]
    if shape == "several":
        return [[c("book_hotel", "a"), c("book_hotel", "b"), c("book_car", "c")], done]
    if shape == "steps":
        return [[c("book_hotel", "a")], [c("book_car", "b")], done]
    if shape == "stop_first":
        return [[c("book_hotel", "a")] + ([c("book_car", "b")] if spec["two"] else [])]
    if shape == "approval":
        return [[c("book_hotel", "a"), c("pay", "p")], done]
    if shape == "held":   # (stop_on_first_tool: the resumed step ends the turn)
        return [[c("book_hotel", "a"), c("pay", "p")]]
    raise ValueError(shape)


def model_class(ex: Any) -> type:
    """The example's ScriptedModel, streaming too (one completed event per response)."""
    from openai.types.responses import Response, ResponseCompletedEvent

    class Model(ex.ScriptedModel):
        async def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            output = (await self.get_response(*args, **kwargs)).output
            yield ResponseCompletedEvent(
                type="response.completed", sequence_number=0,
                response=Response(id="r", created_at=0, model="scripted",
                                  object="response", output=output, tools=[],
                                  parallel_tool_calls=True, tool_choice="auto"))
    return Model


def agent_for(store: Any, session: Any, path: str, spec: dict, model: Any) -> Any:
    from agents import Agent, function_tool
    pause = spec["pause"]

    def tool(name: str, approval: bool = False) -> Any:
        if spec["tools"] == "sync":
            def run(what: str) -> str:
                time.sleep(pause)
                return f"booked {book(store, session, path, what)}"
        else:
            async def run(what: str) -> str:   # type: ignore[misc]
                await asyncio.sleep(pause)
                if spec["tools"] == "inline":
                    return f"booked {book(store, session, path, what)}"
                return f"booked {await asyncio.to_thread(book, store, session, path, what)}"
        run.__name__ = name
        run.__doc__ = "Book it.\n\nArgs:\n    what: what.\n"
        return function_tool(run, needs_approval=True) if approval else function_tool(run)
    kw: dict = {}
    if spec["shape"] in STOPPING:
        kw["tool_use_behavior"] = "stop_on_first_tool"
    if spec["shape"] == "held":   # (the SDK holds the paused step back from the session)
        from agents import GuardrailFunctionOutput, output_guardrail

        @output_guardrail
        async def fine(ctx: Any, agent: Any, output: Any) -> Any:
            return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)
        kw["output_guardrails"] = [fine]
    return Agent(name="travel", instructions="Book.", model=model,
                 tools=[tool("book_hotel"), tool("book_car"), tool("pay", True)], **kw)


def run_turn(agent: Any, inp: Any, session: Any, how: str) -> Any:
    """One ``Runner`` call as ``how`` says (from sync code)."""
    from agents import RunConfig, Runner
    config = RunConfig(tracing_disabled=True)
    if how == "sync":
        return Runner.run_sync(agent, inp, session=session, run_config=config)
    if how == "run":
        return asyncio.run(Runner.run(agent, inp, session=session, run_config=config))

    async def streamed() -> Any:
        result = Runner.run_streamed(agent, inp, session=session, run_config=config)
        async for _event in result.stream_events():
            pass
        return result
    return asyncio.run(streamed())


def put(store: Any, key: str, value: Any) -> None:
    with store.transaction() as tx:
        if value is None:
            tx.delete(key)
        else:
            tx.put(key, value)


def turn(store: Any, session: Any, path: str, spec: dict, rnd: int, tag: str,
         steps: list) -> None:
    """The round's turn from its request, in this process: a pause for approval saved in
    the store (``pending``), approved and resumed."""
    from agents import RunState
    ex = _ex()
    model = model_class(ex)(script(ex, spec, tag))
    agent = agent_for(store, session, path, spec, model)
    steps.append("request")
    result = run_turn(agent, request(rnd), session, spec["call"])
    while getattr(result, "interruptions", None):
        state = result.to_state()
        js = state.to_json()
        put(store, session.key("pending"), json.dumps(js))
        steps.append("paused")
        if spec["from_json"]:
            state = asyncio.run(RunState.from_json(agent, js))
        for item in state.get_interruptions():
            state.approve(item)
        result = run_turn(agent, state, session, spec["call"])
        put(store, session.key("pending"), None)
        steps.append("resumed")


def resume_pending(store: Any, session: Any, path: str, spec: dict, tag: str,
                   steps: list) -> None:
    """The RunState saved in the store, approved and resumed (a refusal: ConflictError,
    the pending state deleted, the request to be retried)."""
    from agents import RunState
    from walstore import ConflictError
    js = json.loads(store.get(session.key("pending")))
    ex = _ex()
    model = model_class(ex)(script(ex, spec, tag)[1:])   # (after the pause)
    agent = agent_for(store, session, path, spec, model)
    state = asyncio.run(RunState.from_json(agent, js))
    for item in state.get_interruptions():
        state.approve(item)
    try:
        result = run_turn(agent, state, session, spec["call"])
    except ConflictError as e:
        steps.append("resume-refused: " + str(e).splitlines()[0][:200])
        put(store, session.key("pending"), None)
        return
    assert not getattr(result, "interruptions", None)
    put(store, session.key("pending"), None)
    steps.append("resumed-saved")


_EX: list = []


def _ex() -> Any:
    if not _EX:
        import importlib.util
        sp = importlib.util.spec_from_file_location(
            "openai_agent_retract", ROOT / "examples" / "openai_agent_retract.py")
        ex = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(ex)
        _EX.append(ex)
    return _EX[0]


def turn_done(items: list, spec: dict, rnd: int) -> bool:
    """The session shows the round's turn done: its last request followed by the
    answer (by a tool output for ``stop_first``), nothing after."""
    users = [i for i, it in enumerate(items) if it.get("role") == "user"]
    if not users or items[users[-1]].get("content") != request(rnd):
        return False
    last = items[-1]
    if spec["shape"] in STOPPING:
        return last.get("type") == "function_call_output" and last is not items[users[-1]]
    return last.get("role") == "assistant" and last.get("type", "message") == "message"


def recorded(items: list) -> list[str]:
    """The bookings the session's tool outputs record."""
    out = []
    for it in items:
        if it.get("type") == "function_call_output":
            text = it.get("output")
            if isinstance(text, str) and text.startswith("booked "):
                out.append(text.split()[1])
    return out


def child(mode: str, spec: dict, store_path: str, path: str) -> None:
    """A child process: "run" (a finished booking turn first when ``spec["warm"]``, READY,
    then the round's turn) or "resume" (READY, then: the pending RunState resumed, else
    the request retried unless the session shows the turn done; until it is)."""
    import walstore
    from walstore.integrations.openai_agents import WalstoreSession
    pause = spec["undo_pause"] if mode == "resume" else 0.0
    store = walstore.open(store_path, durability="full",
                          compensators=compensators(path, pause))
    session = WalstoreSession(SESSION, store)
    rnd = spec["rnd"]
    steps: list = []
    tag = f"p{os.getpid()}"
    if mode == "run":
        if spec["warm"]:
            turn(store, session, path, {**spec, "shape": "one"}, rnd - 1, tag + "w", [])
        print("READY", flush=True)
        turn(store, session, path, spec, rnd, tag, steps)
        print("DONE " + json.dumps({"steps": steps}), flush=True)
    else:
        print("READY", flush=True)
        for k in range(4):
            if store.get(session.key("pending")) is not None:
                resume_pending(store, session, path, spec, f"{tag}r{k}", steps)
                continue
            if spec["look"] or k:
                items = asyncio.run(session.get_items())
                if turn_done(items, spec, rnd):
                    steps.append("done")
                    break
            turn(store, session, path, spec, rnd, f"{tag}t{k}", steps)
            if spec["look"]:
                continue
            steps.append("done?")
            break
        u = session.restart_undo
        print("DONE " + json.dumps({"steps": steps, "undo": None if u is None else {
            "reverted": list(u.reverted), "already": list(u.already),
            "failed": list(u.failed)}}), flush=True)
    store.close()


# -- the parent --

class Child(Child_):
    """This file in ``--child`` mode, in a subprocess (``kill_soak_support.Child``)."""

    def __init__(self, mode: str, spec: dict, store_path: str, path: str) -> None:
        super().__init__(__file__, mode, spec, store_path, path, CHILD_WAIT)


def kill_at(c: Child, how: tuple, path: str) -> dict:
    """Kill ``c`` as ``how`` says: ("delay", seconds) after READY, or ("lines", n,
    seconds) that long after the ledger has n lines more than at READY."""
    if not c.ready.wait(CHILD_WAIT) or c.proc.poll() is not None and "READY" not in c.lines:
        c.kill()
        return {"killed": False, "stuck": "READY" not in c.lines, "rc": c.proc.returncode}
    base = lines_in(path)
    if how[0] == "delay":
        deadline = time.monotonic() + how[1]
        while time.monotonic() < deadline and c.proc.poll() is None:
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    else:
        while c.proc.poll() is None and lines_in(path) < base + how[1]:
            time.sleep(0.001)
        if how[2]:
            time.sleep(how[2])
    at = lines_in(path) - base
    killed = c.kill()
    return {"killed": killed, "lines_after_ready": at, "rc": c.proc.returncode}


def draw(seed: int, rnd_no: int, shape: str | None = None) -> dict:
    """Round ``rnd_no``'s choices (``shape``: that shape whatever was drawn)."""
    rng = random.Random(f"{seed}-{rnd_no}")
    spec = {
        "shape": rng.choice(SHAPES[:5]), "call": rng.choice(CALLS),
        "tools": rng.choice(["sync", "inline", "thread"]), "two": rng.random() < 0.5,
        "from_json": rng.random() < 0.5, "warm": rng.random() < 0.4,
        "look": rng.random() < 0.5,
        "pause": rng.choice([0.0, 0.0, 0.003, 0.02]),
        "undo_pause": rng.choice([0.0, 0.0, 0.01, 0.05]),
    }
    spec["rnd"] = 2 if spec["warm"] else 1
    after = [0.0, 0.0, 0.001, 0.005, 0.02, 0.05]
    n = {"one": 1, "several": 3, "steps": 2, "approval": 2}.get(spec["shape"],
                                                                 1 + spec["two"])
    spec["kill1"] = (("delay", round(rng.uniform(0.0, 0.15 + 2 * n * spec["pause"]), 4))
                     if rng.random() < 0.4 else ("lines", rng.randint(1, n), rng.choice(after)))
    spec["kill2"] = None if rng.random() < 0.6 else (
        ("delay", round(rng.uniform(0.0, 0.4), 4)) if rng.random() < 0.4
        else ("lines", rng.randint(1, 3), rng.choice(after)))
    if spec["shape"] == "approval" and rng.random() < 0.4:
        spec["shape"] = "held"
    spec["shape"] = shape or spec["shape"]
    return spec


def final_state(store_path: str) -> dict:
    """The session's items and the pending RunState, read from a read-only open (which
    undoes nothing)."""
    import walstore
    from walstore.integrations.openai_agents import WalstoreSession
    store = walstore.open(store_path, readonly=True)
    try:
        s = WalstoreSession(SESSION, store)
        return {"items": asyncio.run(s.get_items()),
                "pending": store.get(s.key("pending")) is not None}
    finally:
        store.close()


def judge(spec: dict, out: dict, ledger: list[list[str]], state: dict) -> list[str]:
    """The disagreements of a finished round (kinds; an empty list: it agrees)."""
    problems: list[str] = []
    items = state["items"]
    if state["pending"]:
        problems.append("pending-left")
    if not turn_done(items, spec, spec["rnd"]):
        problems.append("not-done")
    rec = collections.Counter(recorded(items))
    booked = collections.Counter(w[1] for w in ledger if w[0] == "book")
    cancels = collections.defaultdict(list)
    for i, w in enumerate(ledger):
        if w[0] == "cancel":
            cancels[w[1]].append((i, w))
    if any(v > 1 for v in rec.values()):
        problems.append("recorded-twice")
    if any(v > 1 for v in booked.values()):
        problems.append("booked-twice")
    return problems + ledger_problems(out, ledger, rec, booked, cancels, pid_at=3,
                                      key_at=2)


def documented(spec: dict, out: dict, problems: list[str]) -> str | None:
    """The documented limit that explains ``problems``, if one does (none of the GUIDE's
    applies to these turns)."""
    return None


def round_(seed: int, rnd_no: int, root: str, shape: str | None = None) -> dict:
    from walstore.ops.verify import verify_store
    spec = draw(seed, rnd_no, shape)
    d = tempfile.mkdtemp(dir=root)
    store_path, path = os.path.join(d, "s"), os.path.join(d, "ledger")
    out: dict = {"round": rnd_no, "seed": seed, "spec": spec, "kills": 0,
                 "killed_pids": [], "resumes": [], "undos": []}
    try:
        c = Child("run", spec, store_path, path)
        if not first_kill(out, c, kill_at, tuple(spec["kill1"]), path):
            return out
        if spec["kill2"] is not None and out["kill1"]["killed"]:
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
            out["undo_warnings"] = c2.err.count(b"was undone at the session's first use")
        c3 = Child("resume", {**spec, "look": True}, store_path, path)
        rc = c3.finish()
        if rc != 0:
            out["crash"] = f"resume child exit {rc}: " + c3.err.decode()[-2000:]
            return out
        out["resumes"].append(c3.done())
        out["undo_warnings"] = (out.get("undo_warnings", 0)
                                + c3.err.count(b"was undone at the session's first use"))
        out["undos"] = [r["undo"] for r in out["resumes"] if r and r.get("undo")]
        state = final_state(store_path)
        ledger = read_ledger(path)
        out["ledger"] = [" ".join(w) for w in ledger]
        out["items"] = [f"{it.get('type') or it.get('role')}: "
                        f"{it.get('content') or it.get('arguments') or it.get('output')}"
                        for it in state["items"]]
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


def verdict(o: dict) -> str:
    if "crash" in o:
        return "crash"
    if not o.get("problems"):
        return "agree"
    return o["limit"] or "DISAGREE"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill soak of an OpenAI Agents SDK turn on "
                                             "walstore's WalstoreSession")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--only", type=int, nargs="+", help="run these round numbers only")
    ap.add_argument("--out", default=None, help="append each round as a JSON line")
    ap.add_argument("--shape", choices=SHAPES, help="every round of this shape")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "SPEC", "STORE", "LEDGER"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], json.loads(a.child[1]), a.child[2], a.child[3])
        return 0
    root = tempfile.mkdtemp(prefix="oa_kill_soak_")
    rounds = a.only or range(a.rounds)
    totals: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    bad = 0
    try:
        with open(a.out or os.devnull, "a") as f:
            for n in rounds:
                o = round_(a.seed, n, root, a.shape)
                f.write(json.dumps(o, default=repr) + "\n")
                f.flush()
                v = verdict(o)
                totals["rounds"] += 1
                totals["kills"] += o["kills"]
                totals["second_kills"] += int(bool((o.get("kill2") or {}).get("killed")))
                totals["undos"] += o.get("undo_warnings", 0)
                totals["undone_txns"] += sum(len(u["reverted"]) for u in o.get("undos", ()))
                totals["cancels"] += o.get("cancels", 0)
                totals["recompensated"] += o.get("recompensated", 0)
                kinds[v if v != "DISAGREE" else "DISAGREE:" + "+".join(o["problems"])] += 1
                if v in ("crash", "DISAGREE"):
                    bad += 1
                if v != "agree" or a.verbose:
                    print("ROUND", n, v, json.dumps({k: o.get(k) for k in (
                        "spec", "kill1", "kill2", "resumes", "problems", "live", "recorded",
                        "items", "ledger", "verify", "crash")}, default=repr), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {"seed": a.seed, **totals, "verdicts": dict(kinds), "unexplained": bad}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"seed {a.seed}: {totals['rounds']} rounds, {totals['kills']} kills "
              f"({totals['second_kills']} of a resuming process), {totals['undos']} restart "
              f"undos ({totals['undone_txns']} transactions reverted, last resume's), "
              f"{totals['cancels']} cancellations ({totals['recompensated']} run again "
              "after a kill); " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
              + f"; {bad} matching no documented limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
