"""Asynchronous interrupts and fork at the commit point (an adversarial probe, 2026-12-01):
a KeyboardInterrupt from a real timer signal while transactions with actions commit never
compensates a transaction that committed, never wedges the group commit; an interrupted
close() can be finished; an interrupted read never leaves the read gate counting it; a
forked child cannot write through its parent's store.  Each runs in a child process with
a deadline, so a hang fails the test instead of the suite."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import walstore


def run_child(code: str, *args: str, timeout: float = 120) -> str:
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the child hung: {e.stdout!r} {e.stderr!r}") from None
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    return r.stdout


def test_timer_interrupts_never_compensate_a_committed_transaction(tmp_path):
    """SIGALRM at random moments (0.1-3 ms) raising KeyboardInterrupt while durable
    transactions with an action commit: the previous code compensated a committed one
    within the first ten (the interrupt landed in the fsync wait)."""
    out = run_child("""
        import os, sys, random, signal, walstore
        path, outside = sys.argv[1], sys.argv[1] + ".outside"
        def note(line):
            fd = os.open(outside, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, (line + "\\n").encode()); os.close(fd)
        def tick(sig, frame):
            raise KeyboardInterrupt("tick")
        signal.signal(signal.SIGALRM, tick)
        s = walstore.open(path, compensators={"refund": lambda a: note("UNDO " + a.key)})
        rng = random.Random(1)
        interrupted = 0
        for i in range(600):
            try:
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.003))
                    with s.transaction() as tx:
                        tx.put(f"k{i}", i)
                        with tx.action("charge", args={"i": i}, compensate="refund") as a:
                            note("DO " + a.key)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                interrupted += 1
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        s.close()
        print("interrupted", interrupted)
    """, str(tmp_path / "s"), timeout=300)
    assert int(out.split()[-1]) > 0  # (the timer did interrupt)
    lines = (tmp_path / "s.outside").read_text().split()
    done = {lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "DO"}
    undone = [lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "UNDO"]
    assert len(undone) == len(set(undone))  # each refund once
    with walstore.open(str(tmp_path / "s"), compensators={"refund": lambda a: None}) as s:
        acts = {a.key: a for a in s.actions()}
        for key in done:
            a = acts.get(key)
            if a is None:
                assert key in undone  # its intent never reached the log ... and was refunded?
                continue
            committed = s.get(f"k{a.args['i']}") == a.args["i"]
            assert (a.state == "committed") == committed, (key, a.state, committed)
            assert (key in undone) == (a.state == "compensated"), (key, a.state)


def test_an_interrupted_group_commit_lead_is_taken_again(tmp_path):
    """An interrupt between taking the group commit's lead and leading left the lead
    taken for good: the next commit waited for ever.  Now the record's fate is still
    decided (the wait goes on), the commit stands, and the store goes on."""
    out = run_child("""
        import sys, walstore
        s = walstore.open(sys.argv[1])
        wal = s._engine.wal
        lead = wal._lead
        def interrupted(lsn):
            wal._lead = lead
            raise KeyboardInterrupt("just after taking the lead")
        wal._lead = interrupted
        tx = s.transaction()
        tx.put("a", 1)
        try:
            tx.commit()
        except KeyboardInterrupt:
            print("interrupted", tx.state)
        with s.transaction() as tx2:
            tx2.put("b", 2)
        print(s.get("a"), s.get("b"))
        s.close()
    """, str(tmp_path / "s"), timeout=60)
    assert out.split() == ["interrupted", "committed", "1", "2"]
    with walstore.open(str(tmp_path / "s")) as s:
        assert (s.get("a"), s.get("b")) == (1, 2)


def test_an_interrupted_close_can_be_finished(tmp_path):
    out = run_child("""
        import sys, walstore
        path = sys.argv[1]
        s = walstore.open(path, durability="none")
        with s.transaction() as tx:
            tx.put("k", 1)
        eng = s._engine
        stop = eng._stop_threads
        def interrupted():
            stop()
            raise KeyboardInterrupt("while close() waited for the applier")
        eng._stop_threads = interrupted
        try:
            s.close()
        except KeyboardInterrupt:
            print("interrupted")
        eng._stop_threads = stop
        s.close()
        with walstore.open(path) as again:
            print(again.get("k"))
    """, str(tmp_path / "s"), timeout=60)
    assert out.split() == ["interrupted", "1"]


def test_an_interrupted_read_leaves_the_read_gate(tmp_path):
    out = run_child("""
        import sys, threading, walstore
        s = walstore.open(sys.argv[1], map_size=1 << 20)
        with s.transaction() as tx:
            tx.put("a", 1)
        s.close()
        s = walstore.open(sys.argv[1], map_size=1 << 20)
        gate = s._engine.state.gate
        step_in = gate.step_in
        def interrupted(slot):
            step_in(slot)
            gate.step_in = step_in
            raise KeyboardInterrupt("during a read")
        gate.step_in = interrupted
        try:
            s.history("a")
        except KeyboardInterrupt:
            print("interrupted")
        closer = threading.Thread(target=s.close)
        closer.start()
        closer.join(30)
        print("hung" if closer.is_alive() else "closed")
    """, str(tmp_path / "s"), timeout=60)
    assert out.split() == ["interrupted", "closed"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_cannot_write_through_its_parents_store(tmp_path):
    out = run_child("""
        import os, sys, walstore
        s = walstore.open(sys.argv[1])
        with s.transaction() as tx:
            tx.put("k", 0)
        pid = os.fork()
        if pid == 0:
            try:
                with s.transaction() as tx:
                    tx.put("child", 1)
                code = 3
            except walstore.StoreClosed as e:
                code = 0 if "forked" in str(e) else 4
            try:
                walstore.open(sys.argv[1])
                code = 5
            except walstore.StoreLocked:
                pass
            s.close()  # (nothing: the parent's)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        with s.transaction() as tx:
            tx.put("parent", 1)
        s.close()
        print(os.waitstatus_to_exitcode(status))
    """, str(tmp_path / "s"), timeout=60)
    assert out.split() == ["0"]
    with walstore.open(str(tmp_path / "s")) as s:
        assert s.get("parent") == 1 and s.get("child") is None
        assert [t.txid for t in s.log()] == sorted({t.txid for t in s.log()}, reverse=True)
