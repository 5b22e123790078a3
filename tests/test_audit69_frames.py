"""Audit 69 and stop 73: asking whether an action body runs in another thread must never
hang or crash the process, and must answer right.

``close()``, a commit and a rollback ask whether a ``with tx.action(...)`` body is still
running.  That used to be read off the body's thread's stack: ``sys._current_frames()``
and a walk through ``f_back``.  On CPython 3.11 the first deadlocked the process under a
garbage collection (gh-106883: a collection started inside ``_PyThread_CurrentFrames``
finalized a ``threading.local`` that takes the same lock; seen in a CI-like run), and the
walk, which lets the GIL go between its steps, raced the other thread pushing and popping
frames and once crashed a test worker with a segmentation fault (stop 72).  walstore now
asks the body's frame alone, in one C call (``frame.clear()`` refuses an executing frame
and empties a finished one: ``actions._frame_executing``); the body's own thread walks its
own stack (nothing races it there), leaving the frame's locals to a traceback it holds.
The frame is the one running the block, also when the action is entered through an
``ExitStack`` or a wrapper's ``__enter__`` (``actions._block_frame``).
"""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading

import pytest

import walstore
from walstore.agent import actions
from walstore.agent.actions import ActionScope

from store_support import cli_env

CYCLES_WITH_THREAD_LOCALS = """
import gc, sys, threading
from walstore.agent import actions
stop = threading.Event()
box = []
def run():
    box.append(sys._getframe())
    stop.wait()
t = threading.Thread(target=run)
t.start()
while not box:
    pass
enabled = gc.isenabled()
gc.set_threshold(1, 1, 1)  # (a collection at nearly every allocation)
answers = set()
for i in range(3000):
    a = [threading.local()]  # (a cycle whose collection finalizes a thread-local)
    a.append(a)
    del a
    answers.add(actions._body_running((t.ident, box[0])))
print("DONE", gc.isenabled() == enabled, answers == {True})
stop.set()
t.join()
print("ENDED", actions._body_running((t.ident, box[0])))
"""


def test_asking_whether_an_action_body_runs_never_deadlocks_the_process():
    try:
        r = subprocess.run([sys.executable, "-c", CYCLES_WITH_THREAD_LOCALS], env=cli_env(),
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process deadlocked (60 s)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["DONE", "True", "True", "ENDED", "False"], (r.stdout,
                                                                            r.stderr)


CHURNING_STACKS = """
import sys, threading
import walstore
from walstore.agent import actions
s = walstore.open(sys.argv[1])
tx = s.transaction()
stop = threading.Event()
inside = threading.Event()
def deep(n):  # frames pushed and popped all the time under the body
    return 0 if n == 0 else 1 + deep(n - 1)
def agent():
    with tx.action("charge", compensate=None) as act:
        inside.set()
        while not stop.is_set():
            deep(40)
            sum(deep(i % 7) for i in range(20))
t = threading.Thread(target=agent)
t.start()
inside.wait()
act = tx.effects[0]
running = set()
for i in range(100000):
    running.add(act.blocks_commit is not None)
stop.set()
t.join()
tx.commit()
print("RUNNING", running == {True}, "AFTER", act.blocks_commit is None, tx.state)
s.close()
"""


def test_a_body_running_in_another_thread_is_asked_about_safely(tmp_path):
    """100,000 questions from one thread while another runs the body, pushing and popping
    frames without pause: every answer says "running", none crashes the process; once
    the block is left, nothing blocks the commit."""
    r = subprocess.run([sys.executable, "-c", CHURNING_STACKS, str(tmp_path / "s")],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["RUNNING", "True", "AFTER", "True", "committed"], (
        r.stdout, r.stderr[-2000:])


def test_a_body_whose_exit_was_cut_short_blocks_nothing(tmp_path):
    """A block whose exit never ran (an interrupt cut it short: ``_body`` left set) no
    longer refuses the commit once its frame has finished, in this thread or another;
    while its frame still executes it does."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        tx = s.transaction()
        scope = tx.action("charge", compensate=None)

        def enter_and_skip_the_exit():
            act = scope.__enter__()  # (the with statement's entry, its exit never run)
            assert act.blocks_commit is not None  # (this frame executes: running)
            return act

        act = enter_and_skip_the_exit()
        assert act._body is not None  # (left set, as an interrupt in the exit leaves it)
        assert act.blocks_commit is None and act.blocks_rollback is None
        out: list = []
        t = threading.Thread(target=lambda: out.append(act.blocks_commit))
        t.start()
        t.join()
        assert out == [None]
        tx.commit()
        assert tx.state == "committed"
    finally:
        s.close()


def test_a_body_suspended_in_a_coroutine_still_counts_as_running(tmp_path):
    """Suspended at an ``await`` the coroutine's frame is on no stack, and its body still
    runs: the commit waits (asked without touching the coroutine: it goes on after)."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        tx = s.transaction()
        seen: list = []

        async def body(gate: asyncio.Event):
            with tx.action("charge", compensate=None) as act:
                await gate.wait()
                seen.append("resumed")
            return act

        async def main():
            gate = asyncio.Event()
            task = asyncio.ensure_future(body(gate))
            await asyncio.sleep(0)
            act = tx.effects[0]
            seen.append(act.blocks_commit is not None)
            gate.set()
            await task
            seen.append(act.blocks_commit is None)

        asyncio.run(main())
        assert seen == [True, "resumed", True]
        tx.commit()
    finally:
        s.close()


def _assert_the_commit_waits(tx, act) -> None:
    """Inside ``act``'s body: a commit here is refused, and another thread is told the
    body still runs."""
    with pytest.raises(walstore.WalstoreError, match="still running"):
        tx.commit()
    out: list = []
    t = threading.Thread(target=lambda: out.append(act.blocks_commit))
    t.start()
    t.join()
    assert out[0] is not None


class _Wrapper:
    """A program's own context manager around an action (its ``__enter__`` returns before
    the block runs)."""

    def __init__(self, tx) -> None:
        self.scope = tx.action("charge", compensate=None)

    def __enter__(self):
        return self.scope.__enter__()

    def __exit__(self, *exc):
        return self.scope.__exit__(*exc)


def test_a_body_entered_through_an_exit_stack_or_a_wrapper_blocks_the_commit(tmp_path):
    """Entered by ``ExitStack.enter_context`` or a wrapper's ``__enter__``, the body was
    judged ended at once (the frame that called ``__enter__`` had returned): a commit from
    inside it, from another thread, or from another task at an ``await`` went through,
    and the COMMIT said result=None for a charge the body then made."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        for enter in ("exit stack", "wrapper"):
            tx = s.transaction()
            with contextlib.ExitStack() as stack:
                act = (stack.enter_context(tx.action("charge", compensate=None))
                       if enter == "exit stack" else stack.enter_context(_Wrapper(tx)))
                _assert_the_commit_waits(tx, act)
                act.result = {"charge": enter}
            tx.commit()
            assert [a.result for a in s.actions() if a.txid == tx.id] == [{"charge": enter}]

        async def main():
            tx = s.transaction()
            told: list = []

            async def other_task():
                try:
                    tx.commit()
                    told.append("committed")
                except walstore.WalstoreError as e:
                    told.append(str(e))

            async with contextlib.AsyncExitStack() as stack:
                act = stack.enter_context(tx.action("charge", compensate=None))
                await asyncio.ensure_future(other_task())
                act.result = {"charge": "async"}
            assert len(told) == 1 and "still running" in told[0], told
            tx.commit()
            return tx.id

        txid = asyncio.run(main())
        assert [a.result for a in s.actions() if a.txid == txid] == [{"charge": "async"}]
    finally:
        s.close()


def _enter_charge(stack: contextlib.ExitStack, tx):
    """A program's helper entering an action on a stack it was given (its frame ends
    before the block runs)."""
    return stack.enter_context(tx.action("charge", compensate=None))


def test_a_body_entered_by_a_helper_on_an_exit_stack_blocks_the_commit(tmp_path):
    """``return stack.enter_context(tx.action(...))`` in a helper: the helper's frame was
    taken for the block, ended at once, so a commit inside the stack's ``with`` (this
    thread or another) went through and the COMMIT said result=None (stop 73, left
    alone; stop 74).  The block is the ``with`` holding the stack, two calls up too."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        def step(stack, tx):  # (a frame between: the stack passed down twice)
            return _enter_charge(stack, tx)

        for depth in (1, 2):
            tx = s.transaction()
            with contextlib.ExitStack() as stack:
                act = _enter_charge(stack, tx) if depth == 1 else step(stack, tx)
                _assert_the_commit_waits(tx, act)
                act.result = {"charge": depth}
            assert act.blocks_commit is None
            tx.commit()
            assert [a.result for a in s.actions() if a.txid == tx.id] == [{"charge": depth}]
    finally:
        s.close()


def _cut_the_exit_short() -> None:
    """The next ``ActionScope.__exit__`` raises KeyboardInterrupt as it is called."""
    def interrupt_the_exit(frame, event, arg):
        if event == "call" and frame.f_code is ActionScope.__exit__.__code__:
            sys.setprofile(None)
            raise KeyboardInterrupt("in the exit")
    sys.setprofile(interrupt_the_exit)


class _Agent:
    """A program keeping its exit stack in an attribute (no frame holds it)."""

    def __init__(self, tx) -> None:
        self.tx, self.stack = tx, contextlib.ExitStack()

    def charge(self):
        return _enter_charge(self.stack, self.tx)


def test_a_body_on_an_exit_stack_ends_when_the_stack_takes_its_exit(tmp_path):
    """The body of an action entered on an exit stack runs while the stack holds its exit
    (stop 74, h5's review of the first rule, which took the outermost frame holding the
    stack: an exit an interrupt cut short left the action refusing every rollback for as
    long as a caller holding the stack ran, and for good when a coroutine held it).  A
    stack kept in an attribute is followed too."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        def step(stack, tx):
            with stack:
                act = _enter_charge(stack, tx)
                act.result = {"charge": 1}
                _cut_the_exit_short()

        tx = s.transaction()
        stack = contextlib.ExitStack()  # (held here, for as long as this test runs)
        with pytest.raises(KeyboardInterrupt):
            step(stack, tx)
        tx.rollback()  # (refused "still running" by the first rule)

        async def holder(tx):
            with contextlib.ExitStack() as stack:
                act = _enter_charge(stack, tx)
                act.result = {"charge": 2}
                _cut_the_exit_short()
        tx = s.transaction()
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(holder(tx))
        tx.rollback()  # (refused for good by the first rule)

        tx = s.transaction()
        agent = _Agent(tx)
        act = agent.charge()
        _assert_the_commit_waits(tx, act)
        act.result = {"charge": 3}
        agent.stack.close()
        tx.commit()
        assert [a.result for a in s.actions() if a.txid == tx.id] == [{"charge": 3}]
    finally:
        sys.setprofile(None)
        s.close()


def test_a_rollback_in_the_bodys_thread_keeps_the_interrupted_frames_locals(tmp_path):
    """An interrupt cut the block's exit short; the program catches it and rolls back in
    the same thread, the interrupt's traceback in hand (a REPL's ``sys.last_traceback``,
    a post-mortem debugger): asking whether the body still ran emptied that frame's
    locals (``frame.clear()``)."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        txs: list = []

        def interrupt_the_exit(frame, event, arg):
            if event == "call" and frame.f_code is ActionScope.__exit__.__code__:
                sys.setprofile(None)
                raise KeyboardInterrupt("in the exit")

        def agent_step():
            tx = s.transaction()
            txs.append(tx)
            plan = {"amount": 40}
            with tx.action("charge", compensate=None) as act:
                act.result = dict(plan)
                sys.setprofile(interrupt_the_exit)

        try:
            agent_step()
        except KeyboardInterrupt as e:
            tb = e.__traceback__
            while tb.tb_frame.f_code is not agent_step.__code__:
                tb = tb.tb_next
            frame = tb.tb_frame
        sys.setprofile(None)
        tx = txs[0]
        assert tx.effects[0]._body is not None  # (the exit never ran)
        tx.rollback()  # (the frame has finished: nothing blocks it)
        assert tx.state == "rolled back"
        assert frame.f_locals["plan"] == {"amount": 40}
        assert frame.f_locals["act"].result == {"amount": 40}
    finally:
        s.close()
