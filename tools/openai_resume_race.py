"""Randomised races of an OpenAI Agents human-in-the-loop resume (``RunState``) against
undos of its ``WalstoreSession``, checked against an outside ledger (stop 77, h5).

    PYTHONPATH=. python tools/openai_resume_race.py [--iterations 300] [--seed 1]
        [--mode mixed|seq|conc] [--only SEED ...] [-v]

Each iteration: a fresh store; "hi", restore point "p", then the SDK's real Runner, driven
by a model that answers by its input, pauses on "book rome": ``book_hotel`` books at once,
``pay`` waits for approval (both book in the session's scope, compensation "cancel",
each booking a new id in the ledger and a key ``session.key("bookings/<id>")``; held
iterations add an output guardrail and ``stop_on_first_tool``, so the SDK holds the
paused response back until the resume).  Then, in random order — one after another
(``seq``) or in threads started at random moments (``conc``) — a resume (approve or
reject; the RunState object or its JSON; in the pausing task, in a fresh ``asyncio.run``
or another thread), 0-2 undos by another caller (``session.rewind``, ``store.rewind``
scoped to the session, ``pop_items(1-4)``, ``clear_session``, a branch from before the
turn, ``erase``), maybe a second resume, maybe a new ``Runner.run``.  Then the checks:

* every booking standing in the ledger is recorded by a ``function_call_output``
  "booked <id>" in some branch (excused: its item was removed by ``pop_items`` or
  ``clear_session``, or it was made before an ``erase`` ended), and every such item's
  booking stands; its key stands iff it does; nothing is compensated twice; the
  approved ``pay`` stands once at most;
* no ``function_call_output`` without its call earlier in its branch, none twice;
* sequential iterations: a resume with nothing undone saves; a resume after an undo of
  the paused turn, or after a resume that saved, is refused;
* the session takes a new run afterwards.

A problem matching a documented limit (docs/GUIDE.md, OpenAI sessions) is counted as
such: two resumes of one RunState at once; a held response resumed from JSON after a
rewind or erase; a held response resumed after a pop, clear or another caller's branch
(the items cannot tell, and the SDK's read at the start of the resumed run moves it to
the current branch).  Exit status 1 when any other problem was seen.  Found with it:
a refused resume's revert said "failed" for work the rewind had compensated, and a
JSON resumed again after its answer was popped booked twice (both fixed, stop 77).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import walstore
from agents import (Agent, GuardrailFunctionOutput, ModelResponse, RunConfig, RunState,
                    Runner, Usage, function_tool, output_guardrail)
from agents.exceptions import ModelBehaviorError, UserError
from agents.models.interface import Model
from openai.types.responses import (ResponseFunctionToolCall, ResponseOutputMessage,
                                    ResponseOutputText)

from walstore.integrations.openai_agents import WalstoreSession

WAIT_S = 60   # (a safety net for a hang)
UNDOS = ("rewind", "storerewind", "pop", "clear", "branch", "erase")

_ids = iter(range(1, 10 ** 12))
_ids_lock = threading.Lock()


def _next_id() -> int:
    with _ids_lock:
        return next(_ids)


def say(text: str) -> ResponseOutputMessage:
    n = _next_id()
    return ResponseOutputMessage(id=f"msg_{n}", type="message", role="assistant",
                                 status="completed",
                                 content=[ResponseOutputText(type="output_text", text=text,
                                                             annotations=[])])


def call(tool: str, args: dict) -> ResponseFunctionToolCall:
    n = _next_id()
    return ResponseFunctionToolCall(id=f"fc_{n}", call_id=f"call_{n}", type="function_call",
                                    name=tool, arguments=json.dumps(args))


def _get(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


class Jitter:
    """Random short pauses (none half the time) in the tools and the model."""

    def __init__(self, seed: int, level: float) -> None:
        self.rng, self.lock, self.level = random.Random(seed), threading.Lock(), level

    def _delay(self) -> float:
        with self.lock:
            r = self.rng.random()
        return 0.0 if r < 0.5 else r * self.level

    def sync(self) -> None:
        time.sleep(self._delay())

    async def aio(self) -> None:
        await asyncio.sleep(self._delay())


class InputModel(Model):
    """Answers by the last input item: "book rome" -> book_hotel and pay; "book oslo" ->
    book_hotel; a tool output -> "done"; else "ok".  Shared by concurrent runs."""

    def __init__(self, jitter: Jitter) -> None:
        self.jitter = jitter

    async def get_response(self, system_instructions, input, model_settings, tools,
                           output_schema, handoffs, tracing, *, previous_response_id=None,
                           conversation_id=None, prompt=None) -> ModelResponse:
        await self.jitter.aio()
        items = input if isinstance(input, list) else [{"role": "user", "content": input}]
        last = items[-1]
        out: list[Any] = [say("ok")]
        if _get(last, "role") == "user":
            text = _get(last, "content")
            text = text if isinstance(text, str) else json.dumps(text, default=str)
            if "book rome" in text:
                out = [call("book_hotel", {"city": "rome"}), call("pay", {"city": "rome"})]
            elif "book oslo" in text:
                out = [call("book_hotel", {"city": "oslo"})]
        elif _get(last, "type") == "function_call_output":
            out = [say("done")]
        return ModelResponse(output=out, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class Ledger:
    """The outside world: bookings by id, confirmed or cancelled, and cancels counted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, str] = {}
        self.what: dict[str, str] = {}
        self.cancels: collections.Counter = collections.Counter()
        self.n = 0

    def book(self, what: str) -> str:
        with self.lock:
            self.n += 1
            bid = f"B{self.n}"
            self.status[bid] = "confirmed"
            self.what[bid] = what
            return bid

    def cancel(self, bid: str) -> None:
        with self.lock:
            self.cancels[bid] += 1
            self.status[bid] = "cancelled"


class World:
    """One iteration's store, ledger and agent.  Even seeds keep one WalstoreSession for
    the tools; odd ones make one per booking (no session object lives between calls)."""

    def __init__(self, path: str, seed: int, held: bool, jitter_level: float) -> None:
        self.store = walstore.open(path, durability="none")
        self.ledger = Ledger()
        self.erased: list[int] = []    # (the ledger's count as each erase ended)
        self.jitter = jitter = Jitter(seed + 7, jitter_level)
        store, ledger = self.store, self.ledger
        store.compensator("cancel")(lambda a: ledger.cancel(a.result))
        kept = WalstoreSession("u", store) if seed % 2 == 0 else None
        self._kept = kept

        def book(what: str) -> str:
            s = kept or WalstoreSession("u", store)
            jitter.sync()
            with store.transaction() as tx:
                with tx.action("book", args={}, compensate="cancel", scope=s.scope) as act:
                    bid = act.result = ledger.book(what)
                    jitter.sync()
                tx.put(s.key(f"bookings/{bid}"), "confirmed")
            jitter.sync()
            return bid

        @function_tool
        def book_hotel(city: str) -> str:
            """Book a hotel.

            Args:
                city: where.
            """
            return f"booked {book('hotel')}"

        @function_tool(needs_approval=True)
        def pay(city: str) -> str:
            """Pay for it.

            Args:
                city: where.
            """
            return f"booked {book('pay')}"

        kw: dict[str, Any] = {}
        if held:
            @output_guardrail
            async def fine(ctx, agent, output):
                return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)
            kw = {"output_guardrails": [fine], "tool_use_behavior": "stop_on_first_tool"}
        self.agent = Agent(name="trip", instructions="Book.", model=InputModel(jitter),
                           tools=[book_hotel, pay], **kw)
        self.config = RunConfig(tracing_disabled=True)


def texts(item: dict) -> str:
    t = item.get("content") or item.get("arguments") or item.get("output")
    if isinstance(t, list):
        t = " ".join(c.get("text", "") for c in t if isinstance(c, dict))
    return t if isinstance(t, str) else json.dumps(t, default=str)


def booked_in(item: Any) -> str | None:
    """The booking id a "booked <id>" tool output records, or None."""
    if isinstance(item, dict) and item.get("type") == "function_call_output":
        out = item.get("output")
        out = out if isinstance(out, str) else json.dumps(out, default=str)
        if out.startswith("booked "):
            return out.split()[1]
    return None


class Op:
    def __init__(self, kind: str, where: str, **kw: Any) -> None:
        self.kind, self.where, self.kw = kind, where, kw
        self.outcome: str | None = None
        self.error: str | None = None
        self.start = self.end = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.outcome and self.outcome.startswith("ok"))

    def __repr__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kw.items())
        return f"{self.kind}[{self.where}{',' + extra if extra else ''}]"


def plan(rng: random.Random, mode: str) -> tuple[bool, str, list[Op], list[float], float]:
    held = rng.random() < 0.3
    how = rng.choice(["seq", "seq", "conc"])
    how = how if mode == "mixed" else mode   # (a seed plans the same ops in every mode)
    decision = rng.choice(["approve", "reject"])
    ops = [Op("resume", rng.choice(["task", "fresh", "thread"]),
              form=rng.choice(["obj", "json"]), decision=decision)]
    for undo in rng.sample(list(UNDOS) + ["rewind", "none", "none", "none"],
                           rng.choice([1, 1, 2])):
        if undo == "none":
            continue
        kw: dict[str, Any] = {}
        if undo == "pop":
            kw["n"] = rng.randint(1, 4)
        if undo == "branch":
            kw["back"] = rng.random() < 0.5
        ops.append(Op(undo, rng.choice(["task", "thread"]), **kw))
    if rng.random() < 0.4:
        ops.append(Op("resume", rng.choice(["task", "fresh", "thread"]),
                      form=rng.choice(["obj", "json"]),
                      decision=rng.choice([decision, decision, "approve", "reject"])))
    if rng.random() < 0.4:
        ops.append(Op("newrun", rng.choice(["task", "thread"]),
                      text=rng.choice(["hello", "book oslo"])))
    for o in ops:
        if rng.random() < 0.2:
            o.kw["gc"] = True
    rng.shuffle(ops)
    delays = [rng.choice([0, 0, 0.0005, 0.002, 0.01]) for _ in ops]
    return held, how, ops, delays, rng.choice([0.0005, 0.002, 0.01])


async def run_op(w: World, op: Op, box: dict, session: WalstoreSession) -> None:
    if op.kw.get("gc"):
        gc.collect()
    op.start = time.monotonic()
    try:
        if op.kind == "resume":
            if op.kw["form"] == "obj":
                state = box["state"]
            else:
                state = await RunState.from_json(w.agent, box["json"])
            for item in state.get_interruptions():
                (state.approve if op.kw["decision"] == "approve" else state.reject)(item)
            r = await Runner.run(w.agent, state, session=session, run_config=w.config)
            op.outcome = f"ok:{r.final_output}"
            return
        if op.kind == "rewind":
            await session.rewind("p")
        elif op.kind == "storerewind":
            await asyncio.to_thread(w.store.rewind, session.scope + "p", scope=session.scope)
        elif op.kind == "erase":
            await session.erase()
            w.erased.append(w.ledger.n)
        elif op.kind == "pop":
            op.kw["popped"] = len(await session.pop_items(op.kw["n"]))
        elif op.kind == "clear":
            await session.clear_session()
        elif op.kind == "branch":
            await session.create_branch_from_turn(2, "alt")
            if op.kw["back"]:
                await session.switch_to_branch("main")
        elif op.kind == "newrun":
            r = await Runner.run(w.agent, op.kw["text"], session=session, run_config=w.config)
            op.outcome = f"ok:{r.final_output}"
            return
        op.outcome = "ok"
    except walstore.ConflictError as e:
        msg = str(e)
        tags = [t for t, said in (("reverted", "was reverted"), ("undone-already",
                                                                 "undone already"),
                                  ("revert-failed", "failed for")) if said in msg]
        op.outcome = "Conflict" + (f"({','.join(tags)})" if tags else "")
        op.error = msg
    except (walstore.UnknownPoint, ValueError, UserError, ModelBehaviorError) as e:
        # (a rewind after an erase; a branch from a turn a clear removed; the SDK's own
        # refusals of a RunState object resumed twice)
        op.outcome, op.error = type(e).__name__, str(e)
    except Exception as e:   # noqa: BLE001
        op.outcome, op.error = f"UNEXPECTED {type(e).__name__}", traceback.format_exc()
    finally:
        op.end = time.monotonic()


def iteration(seed: int, base: str, mode: str = "mixed") -> dict[str, Any]:
    held, how, ops, delays, level = plan(random.Random(seed), mode)
    path = tempfile.mkdtemp(dir=base)
    w = World(path + "/s", seed, held, level)
    box: dict[str, Any] = {}
    paused = threading.Event()
    done = [threading.Event() for _ in ops]
    out = {"seed": seed, "held": held, "mode": how, "ops": ops, "problems": [],
           "ledger": {}}

    def trigger(i: int) -> None:
        if how == "seq":
            assert (done[i - 1] if i else paused).wait(WAIT_S), "trigger timeout"
        else:
            assert paused.wait(WAIT_S)
            time.sleep(delays[i])

    async def pausing_task() -> None:
        s = WalstoreSession("u", w.store)
        await s.add_items([{"role": "user", "content": "hi"}])
        await s.restore_point("p")
        r = await Runner.run(w.agent, "book rome", session=s, run_config=w.config)
        assert [i.name for i in r.interruptions] == ["pay"], r.interruptions
        box["state"] = r.to_state()
        box["json"] = box["state"].to_json()
        paused.set()
        mine = [i for i, op in enumerate(ops) if op.where == "task"]
        if how == "conc":
            mine.sort(key=lambda i: delays[i])
        for i in mine:
            if how == "seq":
                await asyncio.to_thread(trigger, i)
            else:
                await asyncio.sleep(delays[i])
            try:
                await run_op(w, ops[i], box, s)
            finally:
                done[i].set()

    def thread_op(i: int) -> None:
        try:
            trigger(i)
            asyncio.run(run_op(w, ops[i], box, WalstoreSession("u", w.store)))
        finally:
            done[i].set()

    failed: list[str] = []

    def first_thread() -> None:
        try:
            asyncio.run(pausing_task())
        except BaseException:   # noqa: BLE001
            failed.append(traceback.format_exc())
            paused.set()

    threads = [threading.Thread(target=first_thread)]
    threads += [threading.Thread(target=thread_op, args=(i,))
                for i, op in enumerate(ops) if op.where != "task"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
        if t.is_alive():
            out["problems"].append("HANG (threads left running; store left open)")
            return out
    if failed:
        out["problems"].append("the pause failed: " + failed[0])
    else:
        out["problems"] += [f"{o!r}: {o.error}" for o in ops
                            if o.outcome and o.outcome.startswith("UNEXPECTED")]
        out["problems"] += check(w)
        if how == "seq":
            out["problems"] += expectations(held, ops)
        out["problems"] += final_run(w)
        out["problems"] += check(w)
    out["ledger"] = dict(w.ledger.status)
    w.store.close()
    shutil.rmtree(path, ignore_errors=True)
    return out


def final_run(w: World) -> list[str]:
    async def go() -> tuple[Any, list]:
        s = WalstoreSession("u", w.store)
        r = await Runner.run(w.agent, "final", session=s, run_config=w.config)
        return r.final_output, await s.get_items()
    try:
        said, items = asyncio.run(go())
    except Exception:   # noqa: BLE001
        return ["the new run afterwards failed: " + traceback.format_exc().splitlines()[-1]]
    if said != "ok" or texts(items[-1]) != "ok":
        return [f"the new run afterwards said {said!r}, saved {items[-1]!r} last"]
    return []


def branches(w: World) -> dict[str, list]:
    s = WalstoreSession("u", w.store)

    async def go() -> dict[str, list]:
        out = {b["branch_id"]: await s.get_items(branch=b["branch_id"])
               for b in await s.list_branches()}
        out.setdefault("main", await s.get_items(branch="main"))
        return out
    return asyncio.run(go())


def excused(w: World) -> set[str]:
    """Bookings whose "booked" item a pop_items or clear_session removed (the store's
    history of the session's item keys)."""
    ops: dict[int, Any] = {}
    keys: set[str] = set()
    prefix = WalstoreSession("u", w.store).scope + "i/"
    for info in w.store.log():
        ops[info.txid] = info.meta.get("op") if isinstance(info.meta, dict) else None
        keys.update(k for k in info.keys if isinstance(k, str) and k.startswith(prefix))
    out = set()
    for k in keys:
        versions = list(reversed(w.store.history(k)))
        for a, b in zip(versions, versions[1:]):
            value = json.loads(a.value) if isinstance(a.value, bytes) else a.value
            bid = None if a.deleted else booked_in(value)
            if bid and ops.get(b.txid) in ("pop_items", "clear_session"):
                out.add(bid)
    return out


def check(w: World) -> list[str]:
    problems = []
    recorded = set()
    for name, items in branches(w).items():
        calls: set[str] = set()
        outputs: collections.Counter = collections.Counter()
        for item in items:
            if item.get("type") == "function_call":
                calls.add(item.get("call_id"))
            elif item.get("type") == "function_call_output":
                cid = item.get("call_id")
                if cid not in calls:
                    problems.append(f"output {texts(item)!r} on {name} answers no call "
                                    f"before it ({cid})")
                outputs[cid] += 1
                if outputs[cid] == 2:
                    problems.append(f"two outputs for {cid} on {name}")
            bid = booked_in(item)
            if bid:
                recorded.add(bid)
                if w.ledger.status.get(bid) != "confirmed":
                    problems.append(f"an item on {name} says booked {bid}, the ledger "
                                    f"{w.ledger.status.get(bid)}")
    s = WalstoreSession("u", w.store)
    erased = {f"B{i}" for last in w.erased for i in range(1, last + 1)}
    excuses = None
    paid = [b for b, st in w.ledger.status.items() if st == "confirmed" and
            w.ledger.what[b] == "pay"]
    if len(paid) > 1:
        problems.append(f"the paused turn's pay booked {len(paid)} times, all standing: "
                        f"{paid}")
    for bid, status in w.ledger.status.items():
        if w.ledger.cancels[bid] > 1:
            problems.append(f"{bid} cancelled {w.ledger.cancels[bid]} times")
        key = w.store.get(s.key(f"bookings/{bid}"))
        if (key is not None) != (status == "confirmed") and bid not in erased:
            problems.append(f"{bid} {status}, its key {key!r}")
        if status == "confirmed" and bid not in recorded and bid not in erased:
            excuses = excused(w) if excuses is None else excuses
            if bid not in excuses:
                problems.append(f"{bid} stands, no item records it")
    return problems


def expectations(held: bool, ops: list[Op]) -> list[str]:
    """One after another: a resume with nothing undone saves; after an undo of the
    paused turn, or after a resume that saved, it is refused.  (A RunState object
    resumed after its resume ended is no resume: the SDK runs on from where it ended.)"""
    out = []
    undone: str | None = None
    popped = False   # (a pop may or may not reach the paused calls: no expectation)
    resumed: str | None = None
    for o in ops:
        if o.kind in ("rewind", "storerewind", "erase", "clear") and o.ok:
            undone = undone or o.kind
        elif o.kind == "branch" and o.ok and not o.kw["back"]:
            undone = undone or "branch"
        elif o.kind == "pop" and o.ok and o.kw["popped"]:
            popped = True
        elif o.kind != "resume":
            continue
        elif popped and resumed is None:
            pass
        elif undone is None and resumed is None and not o.ok:
            out.append(f"EXPECT {o!r} to save (nothing undone): {o.outcome} {o.error}")
        elif resumed is not None and o.ok and not (resumed == "obj" and o.kw["form"] == "obj"):
            out.append(f"EXPECT {o!r} refused (a resume saved before), got {o.outcome}")
        elif undone is not None and resumed is None and o.ok:
            out.append(f"EXPECT {o!r} refused after {undone}, got {o.outcome}")
        if o.kind == "resume" and o.ok:
            resumed = resumed or o.kw["form"]
    return out


def known_limits(result: dict[str, Any]) -> list[str]:
    """The documented limits a problem iteration matches (GUIDE, OpenAI sessions)."""
    ops, held = result["ops"], result["held"]
    resumes = [o for o in ops if o.kind == "resume"]
    kinds = {o.kind for o in ops if o.ok}
    out = []
    if len(resumes) == 2 and all(o.start for o in resumes) and \
            resumes[0].start < resumes[1].end and resumes[1].start < resumes[0].end:
        out.append("two resumes at once")
    if held and any(o.kw["form"] == "json" for o in resumes) and \
            kinds & {"rewind", "storerewind", "erase"}:
        out.append("held response from JSON after a rewind or erase")
    if held and kinds & {"pop", "clear", "branch"}:
        out.append("held response after a pop, clear or branch")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=["mixed", "seq", "conc"], default="mixed")
    ap.add_argument("--only", type=int, nargs="*", help="run these seeds only")
    ap.add_argument("-v", action="store_true", help="print every iteration")
    a = ap.parse_args(argv)
    base = tempfile.mkdtemp(prefix="openai_resume_race_")
    outcomes: collections.Counter = collections.Counter()
    limits: collections.Counter = collections.Counter()
    new = 0
    seeds = a.only or range(a.seed, a.seed + a.iterations)
    began = time.monotonic()
    try:
        for seed in seeds:
            r = iteration(seed, base, a.mode)
            for o in r["ops"]:
                outcomes[f"{o.kind}: {(o.outcome or 'not run').split(':')[0]}"] += 1
            line = (f"seed {seed} held={r['held']} mode={r['mode']} "
                    f"ops={[(repr(o), o.outcome) for o in r['ops']]} ledger={r['ledger']}")
            if r["problems"]:
                known = known_limits(r)
                limits.update(known or ["NEW"])
                new += not known
                print(("known: " + "; ".join(known) if known else "NEW") + " | " + line,
                      flush=True)
                for p in r["problems"]:
                    print("    " + p[:2000], flush=True)
            elif a.v:
                print("ok | " + line, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = len(list(seeds))
    print(f"{n} iterations in {time.monotonic() - began:.0f} s: "
          f"{sum(limits.values())} with problems, {new} matching no documented limit")
    for k, v in sorted(limits.items()):
        print(f"  {v:5d}  {k}")
    print("outcomes:")
    for k, v in sorted(outcomes.items()):
        print(f"  {v:5d}  {k}")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
