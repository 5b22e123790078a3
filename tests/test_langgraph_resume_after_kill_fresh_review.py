"""Review (stop 79, h3) of ``WalstoreSaver._undo_on_fresh_start``: a run killed (SIGKILL)
before its thread had any checkpoint is undone by the next open's first run on the empty
thread, from the thread's fresh-start mark.  Real children (the kill soak's graph, in a
child of this file), real files, the outside ledger fsynced.

- With history retention (``retain_transactions``), the position the mark begins at can
  be trimmed while the killed run's node transactions are still kept: the walk of the
  log from it raised HistoryTrimmed, which was taken for "nothing to find" -- the killed
  run's bookings stood and the run booked again.
- Two runs starting on the empty thread at once (threads, asyncio) were to undo it once,
  the second waiting for the first under the thread's gate -- but ``with
  earlier.gate(prefix).lock`` let the gate go the moment its lock was read (a weak
  dictionary holds it), so each caller made its own: both walked and reverted, split the
  undo in two records and wrote the mark twice (``_undo_on_resume`` the same: three
  runs resuming one head split the killed step's undo in three records).
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")

import walstore  # noqa: E402
from tools import langgraph_kill_soak as soak  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_langgraph_resume_after_kill_soak import killed_in as soak_killed_in  # noqa: E402
from test_langgraph_resume_after_kill_soak import live_by_node, spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _child(spec_: dict, store_path: str, path: str, before: int, options: dict,
           hold_put: str = "") -> None:
    """(the child) ``before`` commits outside any thread, then the soak graph's run on
    its new thread, held (and killed) where ``spec_["hold"]`` says; ``hold_put``: every
    ``saver.put`` waits to be killed ("quiet"), saying so first ("held")."""
    if hold_put:
        from walstore.integrations.langgraph import WalstoreSaver

        def put(self, *args, **kwargs):
            if hold_put == "held":
                soak.append(path + ".held", "put")
            time.sleep(120)
        WalstoreSaver.put = put
    store = walstore.open(store_path, compensators=soak.compensators(path), **options)
    for i in range(before):
        with store.transaction() as tx:
            tx.put(f"other/{i}", i)
    graph, _saver = soak.build(store, path, spec_)
    soak.invoke(graph, spec_, {"rnd": spec_["rnd"], "ran": []})


def killed(tmp_path: Path, spec_: dict, node: str, before: int = 0,
           options: dict | None = None, hold_put: str = "") -> tuple[str, str]:
    """A child of this file that ran ``spec_``'s graph on a new thread, SIGKILLed in
    ``node`` once its booking committed, or in ``saver.put`` (``hold_put``: see
    ``_child``) (store, ledger)."""
    store_path, path = str(tmp_path / "s"), str(tmp_path / "ledger")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "PYTHONDONTWRITEBYTECODE": "1"}
    arg = json.dumps([{**spec_, "hold": node}, store_path, path, before, options or {},
                      hold_put])
    proc = subprocess.Popen([sys.executable, __file__, arg], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not os.path.exists(path + ".held"):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return store_path, path


def test_a_fresh_start_mark_older_than_the_retained_history_still_finds_the_killed_run(
        tmp_path):
    # (the mark begins at the commit before it, here one of 5 others; 3 transactions
    # are kept: the mark's and the two bookings'.  The walk from the trimmed position
    # raised HistoryTrimmed and found nothing: n0 and n1 were booked twice)
    opts = {"retain_transactions": 3}
    store_path, path = killed(tmp_path, spec(), "n1", before=5, options=opts)
    store = walstore.open(store_path, compensators=soak.compensators(path), **opts)
    try:
        store.checkpoint()   # (the trim: a checkpoint of the new open, before the run)
        graph, saver = soak.build(store, path, spec())
        assert list(saver.list(soak.CONFIG)) == []
        soak.resume(graph, spec(), 1)
        assert live_by_node(path) == {"n0": 1, "n1": 1, "n2": 1}
        (undo,) = saver.resume_undos
        assert undo.checkpoint_id is None and len(undo.undone) == 2
    finally:
        store.close()


@pytest.mark.parametrize("kind,durability,call,node,hold_put", [
    ("linear", "async", "ainvoke", "n1", "quiet"),
    ("functional", "exit", "invoke", "", "held"),
    ("subgraph", "async", "invoke", "s1", "quiet"),
])
def test_a_first_run_killed_before_its_first_save_landed_is_undone(
        tmp_path, kind, durability, call, node, hold_put):
    # (not covered before: the fresh-start undo under "async", whose saves run behind
    # the steps -- here held, so the bookings commit before the thread's first save --
    # and of a functional-API run, whose @tasks all booked before its exit save)
    sp = spec(kind=kind, durability=durability, call=call)
    store_path, path = killed(tmp_path, sp, node, hold_put=hold_put)
    killed_bookings = [w[4] for w in soak.read_ledger(path)]
    assert killed_bookings
    store = walstore.open(store_path, compensators=soak.compensators(path))
    try:
        graph, saver = soak.build(store, path, sp)
        assert list(saver.list(soak.CONFIG)) == []
        soak.resume(graph, sp, 1)
        assert live_by_node(path) == {n: 1 for n in soak.node_names(sp)}
        cancels = collections.Counter(w[4] for w in soak.read_ledger(path)
                                      if w[0] == "cancel")
        assert sorted(cancels) == sorted(killed_bookings)
        assert set(cancels.values()) == {1}
        (undo,) = saver.resume_undos
        assert undo.checkpoint_id is None and undo.left == ()
    finally:
        store.close()


@pytest.mark.parametrize("how", ["threads", "asyncio"])
def test_two_runs_starting_on_the_empty_thread_at_once_undo_it_once(tmp_path, how):
    # (the compensations sleep: the first run is inside its undo as the others come.
    # Before, each run made its own gate: two ResumeUndo records of one txid each, two
    # or three fresh-start marks written)
    sp = spec(call="ainvoke") if how == "asyncio" else spec()
    store_path, path = killed(tmp_path, sp, "n1")
    store = walstore.open(store_path, compensators=soak.compensators(path, 0.1))
    try:
        graph, saver = soak.build(store, path, sp)
        opened = store.log(limit=1)[0].lsn
        lost: list[str] = []

        def run() -> None:
            try:
                graph.invoke({"rnd": 1, "ran": []}, soak.CONFIG, durability="exit")
            except walstore.ConflictError as e:   # (StaleCheckpointError: one wins)
                lost.append(type(e).__name__)

        if how == "threads":
            runs = [threading.Thread(target=run) for _ in range(3)]
            for t in runs:
                t.start()
            for t in runs:
                t.join()
        else:
            async def arun() -> None:
                try:
                    await graph.ainvoke({"rnd": 1, "ran": []}, soak.CONFIG,
                                        durability="exit")
                except walstore.ConflictError as e:
                    lost.append(type(e).__name__)

            async def three() -> None:
                await asyncio.gather(arun(), arun(), arun())
            asyncio.run(three())
        (undo,) = saver.resume_undos
        assert undo.checkpoint_id is None and len(undo.undone) == 2
        marks = [i for i in store.log(since=opened) if i.meta.get("langgraph") == "fresh_start"]
        assert len(marks) == 1
        ledger = soak.read_ledger(path)
        cancels = collections.Counter(w[4] for w in ledger if w[0] == "cancel")
        assert all(n == 1 for n in cancels.values())
        assert {w[4] for w in ledger[:2]} <= set(cancels)   # (the killed run's, once)
        assert len(lost) == 2
    finally:
        store.close()


def test_two_runs_resuming_a_head_at_once_undo_the_killed_step_once(tmp_path):
    # (the same gate, _undo_on_resume's: killed in s2 of a subgraph the node invokes,
    # the killed step's node transactions are several.  Before, three runs resuming at
    # once each reverted some: three ResumeUndo records, (14, 12, 11, 10), (16,), (15, 13))
    sp = spec(kind="subgraph", durability="sync", sub_as_node=False)
    store_path, path = soak_killed_in(tmp_path, sp, "s2")
    store = walstore.open(store_path, compensators=soak.compensators(path, 0.1))
    try:
        graph, saver = soak.build(store, path, sp)
        assert list(saver.list(soak.CONFIG))   # (a head: judged by _undo_on_resume)
        lost: list[str] = []

        def run() -> None:
            try:
                graph.invoke(None, soak.CONFIG, durability="sync")
            except walstore.ConflictError as e:   # (StaleCheckpointError: one wins)
                lost.append(type(e).__name__)
        runs = [threading.Thread(target=run) for _ in range(3)]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
        (undo,) = saver.resume_undos
        assert undo.checkpoint_id is not None and len(undo.undone) > 1
        cancels = collections.Counter(w[4] for w in soak.read_ledger(path)
                                      if w[0] == "cancel")
        assert set(cancels.values()) == {1} and len(lost) == 2
    finally:
        store.close()


if __name__ == "__main__":
    _child(*json.loads(sys.argv[1]))
