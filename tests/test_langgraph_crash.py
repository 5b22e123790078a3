"""LangGraph runs killed with SIGKILL: a rewind after the restart still finds what the
killed step's nodes committed (real processes, real files, real graphs).

The child is tests/findings_scripts/langgraph_async_crash_child.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.base")
pytest.importorskip("langgraph.store.base")

import walstore  # noqa: E402

SCRIPTS = Path(__file__).parent / "findings_scripts"
sys.path.insert(0, str(SCRIPTS))
from langgraph_async_crash_child import build  # noqa: E402


def test_a_rewind_after_a_kill_undoes_the_work_of_a_step_that_never_got_a_checkpoint(
        tmp_path):
    # (probe-lgstore: durability="async"; the run was killed in node ``second``, whose
    # step never got a checkpoint, after it put a memory item and after the background
    # save of the checkpoint it built on landed, so that save's commit came after the
    # node's.  After the restart rewind(latest) kept the item — the thread said "second
    # has not run", memory said it had — since the only link from the node's
    # transaction to its step was in the killed process's memory)
    store_path, world, marker = (str(tmp_path / n) for n in ("s", "world", "marker"))
    child = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "langgraph_async_crash_child.py"),
         store_path, world, marker],
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert child.poll() is None, f"the child exited with {child.returncode}"
            assert time.monotonic() < deadline, "the child never reached ``second``"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    cancelled: list = []
    store = walstore.open(store_path, compensators={
        "cancel": lambda a: cancelled.append(a.args["city"])})
    try:
        graph, saver, memory = build(store)
        config = {"configurable": {"thread_id": "t1"}}
        head = graph.get_state(config)
        assert head.next == ("second",) and head.values == {"log": ["remembered"]}
        assert sorted(i.key for i in memory.search(("mem",))) == ["fact", "second"]
        booking = list(store.actions())[0]
        saved = saver.checkpoint_lsn(head.config)
        assert store.txn_info(booking.txid).lsn < saved  # (the order played)

        to, keep = saver.rewind_plan(head.config)
        assert booking.txid not in keep and to < store.txn_info(booking.txid).lsn
        saver.rewind(head.config)
        assert sorted(i.key for i in memory.search(("mem",))) == ["fact"]
        assert cancelled == ["Rome"]
        after = graph.get_state(config)
        assert after.config["configurable"]["checkpoint_id"] == \
            head.config["configurable"]["checkpoint_id"]
        assert after.values == head.values and after.next == ("second",)
        # the node transactions name their step in the meta they logged
        metas = [store.txn_info(booking.txid).meta]
        assert metas[0]["meta"] == "booking" and "langgraph_step" in metas[0]

        graph.invoke(None, config, durability="sync")  # (the step runs once more)
        assert sorted(i.key for i in memory.search(("mem",))) == ["fact", "second"]
        assert graph.get_state(config).values == {"log": ["remembered", "second"]}
        assert cancelled == ["Rome"]
    finally:
        store.close()
