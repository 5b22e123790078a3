"""A ReAct-style tool-calling agent on walstore's LangGraph integration, SIGKILLed mid-run
in a real child process and resumed as docs/GUIDE.md says a user does after a crash
(stop 79, h4; tools/langgraph_react_kill_soak.py is the random driver, whose child mode
and graphs these reuse): LangGraph's prebuilt ``create_react_agent`` (version "v2": a
``Send`` task per tool call) or a ``StateGraph`` of a model node, ``ToolNode`` (one task
running the step's tool calls in parallel worker threads) and ``tools_condition``; a
scripted chat model answering with several tool calls at once; ``WalstoreSaver`` and
``WalstoreStore`` (each booking noted in memory).  The checks: each booking the final
messages record is live exactly once in the fsynced ledger, nothing else is live, nothing
is cancelled twice, and ``walstore verify`` is clean.

- Found here: a resume sending NEW input (not ``None``) to a head whose killed step had a
  parallel task with its outcome saved (a ``Send`` tool call of create_react_agent v2,
  a branch) kept that task's booking (``_undo_on_resume``: LangGraph does not run it
  again) -- but new input makes LangGraph discard the head's pending writes and run the
  graph from the input, so the booking stood with nothing recording it, and the task
  booked again.  ``WalstoreSaver._undo_discarded`` now reverts it when the run's input
  checkpoint is saved on that head (durability "sync", "async").
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest

pytest.importorskip("langgraph.prebuilt")

import walstore  # noqa: E402
from tools import langgraph_react_kill_soak as soak  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_langgraph_resume_after_kill import CONFIG, build, cancel_into, killed  # noqa: E402,I001
from test_langgraph_resume_after_kill import live as live_in  # noqa: E402


def spec(**over) -> dict:
    base = {"shape": "toolnode", "call": "invoke", "durability": "sync",
            "async_tools": False, "memory": True, "pause": 0.0, "warm": False, "turn": 0,
            "turns": [[["i0", "i1"], ["i2"]]], "kill2": None}
    return {**base, **over}


def killed_then_resumed(tmp_path: Path, sp: dict, held: str) -> tuple[list, list, list]:
    """The soak's run child killed where ``sp["kill"]`` holds (``held``), then the turn
    resumed here; (the final messages, the ledger, the saver's resume undos)."""
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    c = soak.Child("run", sp, store_path, path)
    got = soak.kill_child(c, sp["kill"], path)
    assert got["killed"] and got["held"] == held, (got, c.err.decode()[-2000:])
    store = walstore.open(store_path, compensators=soak.compensators(path))
    try:
        graph, saver = soak.build(store, path, sp)
        steps: list = []
        soak.resume(graph, sp, sp["turn"], steps)
        undos = list(saver.resume_undos)
    finally:
        store.close()
    msgs, memory = soak.final(sp, store_path, path)
    ledger = soak.read_ledger(path)
    assert soak.judge(sp, ledger, msgs, memory, {c.proc.pid}) == [], (ledger, steps)
    rep = verify_store(store_path)
    assert not (rep.errors or rep.pending_compensations or rep.in_doubt)
    return msgs, ledger, undos


def live(ledger: list) -> collections.Counter:
    cancelled = {w[1] for w in ledger if w[0] == "cancel"}
    return collections.Counter(w[2] for w in ledger if w[0] == "book" and w[1] not in cancelled)


def test_a_toolnode_step_killed_between_its_parallel_tools_is_undone_and_run_once(
        tmp_path):
    # ToolNode runs i0 and i1 in worker threads of ONE task: killed with i0 booked and
    # i1 not yet, the task saved nothing -- the resume refunds i0 (its transaction,
    # begun in ToolNode's pool thread, belongs to the thread) and runs both again
    sp = spec(kill=["between", "i1", "i0"])
    _msgs, ledger, undos = killed_then_resumed(tmp_path, sp, "between i0 i1")
    assert [w[1].split(".")[0] for w in ledger if w[0] == "cancel"] == ["i0"]
    assert live(ledger) == {"i0": 1, "i1": 1, "i2": 1}
    assert len(undos) == 1 and undos[0].undone


def test_a_react_v2_call_killed_after_its_sibling_saved_keeps_the_sibling(tmp_path):
    # create_react_agent v2 sends each tool call as its own task: i0's task finished and
    # its writes were saved, i1 held before booking -- the resume keeps i0's booking
    # (LangGraph does not run it again) and runs i1 alone; nothing is cancelled
    sp = spec(shape="react_v2", call="stream", kill=["between", "i1", "i0"])
    msgs, ledger, _undos = killed_then_resumed(tmp_path, sp, "between i0 i1")
    assert [w for w in ledger if w[0] == "cancel"] == []
    assert live(ledger) == {"i0": 1, "i1": 1, "i2": 1}
    assert sum(w[0] == "book" for w in ledger) == 3


def test_an_astream_agent_killed_inside_a_tool_after_its_booking_is_undone(tmp_path):
    # astream under durability="async", an async tool booking in asyncio.to_thread
    # (the soak runs sync tools in the async run too): killed in i1 after its booking
    # committed, the resume refunds the step's bookings and the step runs whole once
    sp = spec(call="astream", durability="async", async_tools=True, kill=["tool", "i1"])
    _msgs, ledger, undos = killed_then_resumed(tmp_path, sp, "tool i1")
    assert "i1" in [w[1].split(".")[0] for w in ledger if w[0] == "cancel"]
    assert live(ledger) == {"i0": 1, "i1": 1, "i2": 1}
    assert undos and undos[0].undone


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_new_input_after_a_kill_undoes_the_parallel_task_whose_outcome_was_saved(
        tmp_path, durability):
    # killed in "slow" once "fast" (beside it) booked and its writes were saved on the
    # head: a plain resume keeps fast's booking (LangGraph applies its saved writes), but
    # new input discards them and runs fast again -- its first booking must be refunded
    store_path, path = killed(tmp_path, "parallel", durability)
    store = walstore.open(store_path, compensators={"cancel": cancel_into(path)})
    try:
        graph, saver = build(store, path, "parallel")
        assert {t.name for t in graph.get_state(CONFIG).tasks if t.result} == {"fast"}
        out = graph.invoke({"log": ["again"]}, CONFIG, durability=durability)
        recorded = [v for v in out["log"] if "-" in v]
        assert sorted(b.split("-")[0] for b in recorded) == ["fast", "slow"]
        assert sorted(live_in(path)) == sorted(recorded)   # (was: the first fast's too)
        assert [u.kept for u in saver.resume_undos][-1] == ()
    finally:
        store.close()
    rep = verify_store(store_path)
    assert not (rep.errors or rep.pending_compensations or rep.in_doubt)
