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
    outside = tmp_path / "s.outside"

    def note(line):
        with open(outside, "a") as f:
            f.write(line + "\n")
    # the same refund at the next open: a compensation an interrupt cut short (a dropped
    # transaction's, rolled back by the collector while the next one's timer ran) is owed
    # and runs there (README: "runs again at the next open"); a no-op here once read as
    # "compensated, never refunded"
    with walstore.open(str(tmp_path / "s"),
                       compensators={"refund": lambda a: note("UNDO " + a.key)}) as s:
        assert s.pending_compensations() == []
        lines = outside.read_text().split()
        done = {lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "DO"}
        undone = [lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "UNDO"]
        assert len(undone) == len(set(undone))  # each refund once
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
        def interrupted(*args):
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


# ---- a review of the fixes above (a probe, the same session) ------------------------------
def test_a_handler_that_commits_leaves_the_main_threads_signals_unblocked(tmp_path):
    """A handler pending when a section begins runs before it (the section's call of
    ``walstore.signals._CHECK_SIGNALS``, PyErr_CheckSignals); one that committed nested a
    second section, which overwrote the saved mask with the blocked one: Ctrl-C was dead
    from then on."""
    import signal
    import walstore.signals as sig
    s = walstore.open(str(tmp_path / "s"), durability="none")
    pending = sig._CHECK_SIGNALS

    def a_handler_runs_here():
        sig._CHECK_SIGNALS = pending
        with s.transaction() as tx:  # what a SIGALRM handler recording a tick does
            tx.put("tick", 1)
    sig._CHECK_SIGNALS = a_handler_runs_here
    try:
        with s.transaction() as tx:
            tx.put("k", 1)
    finally:
        sig._CHECK_SIGNALS = pending
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()
    assert (s.get("tick"), s.get("k")) == (1, 1)
    s.close()


def _blocked_mask(thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        line = next(x for x in f if x.startswith("SigBlk:"))
    return int(line.split()[1], 16)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_only_walstores_own_threads_block_signals(tmp_path):
    """A process started from a thread inherits its signal mask: the replication shipper
    (boto3 may start a credential process) must not block SIGCHLD and the rest."""
    import threading
    s = walstore.open(str(tmp_path / "s"), replicate_to=(tmp_path / "replica").as_uri())
    try:
        threads = {t.name: t for t in threading.enumerate()}
        assert _blocked_mask(threads["walstore-applier"]) != 0
        assert _blocked_mask(threads["walstore-replication"]) == 0
    finally:
        s.close()


def test_a_lead_lost_inside_its_hand_over_is_taken_again_by_its_thread(tmp_path):
    s = walstore.open(str(tmp_path / "s"))
    wal = s._engine.wal
    with s.transaction() as tx:
        tx.put("a", 1)
    import threading
    # an interrupt inside _lead's hand-over: still "syncing", entered (not in _unentered), this
    # thread named the leader, nobody leading
    wal._syncing, wal._leader = True, threading.get_ident()
    done = []
    t = threading.Thread(target=lambda: done.append(s.get("a")))
    t.start()
    t.join(5)
    with s.transaction() as tx:  # the same thread syncs again: it takes the lead back
        tx.put("b", 2)
    assert s.get("b") == 2 and done == [1]
    s.close()


def test_waiters_timing_out_as_they_are_woken_are_never_woken_twice(tmp_path, monkeypatch):
    """A waiter whose timed wait (LOST_LEAD_S) ran out as a leader released it queued its
    lock twice; the next leader released it twice (RuntimeError in a committed
    transaction's commit, then a wedge).  LOST_LEAD_S scaled down to make the race
    frequent: 16 committers, fsyncs of 1-4 ms, a 2 ms lead timeout."""
    import random
    import threading
    import time
    from walstore import fileio
    import walstore.log.writer as writer
    monkeypatch.setattr(writer, "LOST_LEAD_S", 0.002)

    class SlowSync(fileio.OSBackend):
        def fdatasync(self, fd):
            time.sleep(random.uniform(0.001, 0.004))
            os.fdatasync(fd)
    s = walstore.open(str(tmp_path / "s"))
    old = fileio.set_backend(SlowSync())
    errors: list = []

    def worker(w):
        end = time.monotonic() + 4
        i = 0
        while time.monotonic() < end and not errors:
            i += 1
            try:
                with s.transaction() as tx:
                    tx.put(f"w{w}/{i}", i)
            except Exception as e:  # noqa: BLE001 - any error fails the test
                errors.append(repr(e))
    try:
        ts = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not [t for t in ts if t.is_alive()], "the group commit wedged"
        assert errors == []
    finally:
        fileio.set_backend(old)
    s.close()


def test_a_trim_cut_short_is_finished_by_the_next_checkpoint(tmp_path):
    """The horizon moves before history is deleted; a kill -9 in between left the rows
    below it for good (later trims started from the recorded horizon)."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        for i in range(60):
            with s.transaction() as tx:
                tx.put("k", i)
    s = walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=5)
    st = s._engine.state
    newest = [int.from_bytes(raw, "big") for raw, _t in st.scan(b"", None, db="bylsn")]
    s._engine.applier.set_meta(b"horizon", newest[-5])  # as if killed right after it
    s.checkpoint()
    left = [int.from_bytes(raw, "big") for raw, _t in st.scan(b"", None, db="bylsn")]
    assert len(left) <= 6 and min(left) >= newest[-6], left
    s.close()


def test_file_errors_cross_a_process_boundary(tmp_path):
    import pickle
    s = walstore.open(str(tmp_path / "s"), durability="none")
    (tmp_path / "ws" / "d").mkdir(parents=True)
    ws = s.workspace(str(tmp_path / "ws"))
    tx = s.transaction()
    with pytest.raises(FileExistsError) as info:
        tx.files(ws).mkdir("d")
    tx.rollback()
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, FileExistsError) and isinstance(again, walstore.StoreIOError)
    assert again.errno == info.value.errno
    s.close()


def test_interrupts_at_a_sections_start_never_leave_signals_blocked(tmp_path):
    """A handler that raised inside the section's start (the mask set, its result not yet
    kept) left the signals blocked and the section counted open: every later section was
    then a no-op and Ctrl-C dead.  A 20-300 µs timer over 5 s of commits."""
    out = run_child("""
        import faulthandler, signal, sys, time, random, walstore, walstore.signals as S
        faulthandler.dump_traceback_later(90, exit=True)  # (a hang says where, on stderr)
        s = walstore.open(sys.argv[1], durability="none")
        armed = [True]
        def tick(*a):
            if armed[0]:
                raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, tick)
        rnd = random.Random(3)
        bad = interrupts = n = 0
        end = time.time() + 5
        while time.time() < end:
            armed[0] = True
            try:
                signal.setitimer(signal.ITIMER_REAL, rnd.uniform(0.00002, 0.0003))
                with s.transaction() as tx:
                    tx.put("k", n)
            except KeyboardInterrupt:
                interrupts += 1
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            n += 1
            if signal.pthread_sigmask(signal.SIG_BLOCK, []) or S._DEFERRED.depth:
                bad += 1
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                S._DEFERRED.depth = 0
        s.close()
        print(interrupts, bad)
    """, str(tmp_path / "s"), timeout=120)
    interrupts, bad = map(int, out.split())
    assert interrupts > 0 and bad == 0, (interrupts, bad)


def test_an_interrupt_right_after_the_commit_returns_leaves_it_committed(tmp_path, monkeypatch):
    """The bytecodes between the pipeline's return and the transaction's finish were
    outside the commit's ``try``: an interrupt landing there left the transaction
    "active" although its record was durable, and the caller's natural rollback()
    compensated the charge (a probe: 11-20 in 50,000 timer-interrupted commits)."""
    from walstore.engine.pipeline import CommitPipeline
    refunds = []
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refunds.append})
    real = CommitPipeline.commit
    armed = [True]

    def commit_then_interrupt(self, req):
        out = real(self, req)
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt  # (as a SIGINT handler would, just after the return)
        return out
    monkeypatch.setattr(CommitPipeline, "commit", commit_then_interrupt)
    tx = s.transaction()
    with tx.action("charge", args={"amount": 5}, compensate="refund"):
        pass
    tx.put("paid", True)
    with pytest.raises(KeyboardInterrupt):
        tx.commit()
    assert tx.state == "committed" and tx.lsn is not None
    with pytest.raises(walstore.TransactionClosed):
        tx.rollback()
    assert refunds == [] and s.get("paid") is True
    s.close()
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refunds.append})
    assert s.get("paid") is True and refunds == []
    assert [a.state for a in s.actions()] != ["compensated"]
    s.close()


def test_a_commit_interrupted_after_its_point_of_no_return_is_never_rolled_back(tmp_path):
    """The same, when the interrupt lands in the handler itself (the transaction still
    "active" when it escapes): rollback() and a with-block's exit see that the request
    committed and finish it as committed; commit() again writes nothing twice."""
    from walstore.engine.pipeline import CommitRequest
    refunds = []
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refunds.append})

    def committed_but_active(key, amount):
        """What an interrupt escaping commit() between its point of no return and its
        finish leaves: a committed request, the transaction still active."""
        tx = s.transaction()
        with tx.action("charge", args={"amount": amount}, compensate="refund"):
            pass
        tx.put(key, True)
        req = CommitRequest(tx.id, list(tx._writes.items()), tx.meta, None,
                            tx._hooks.commit_body(tx))
        s._engine.pipeline.commit(req)
        tx._request = req
        assert tx.state == "active" and req.committed
        return tx, req
    tx, req = committed_but_active("paid", 5)
    lsn = tx.commit()  # finishes it; no second record
    assert tx.state == "committed" and lsn == req.lsn
    tx2, _req2 = committed_but_active("paid2", 7)
    with pytest.raises(walstore.TransactionClosed, match="already committed"):
        tx2.rollback()
    assert tx2.state == "committed" and refunds == []
    assert s.get("paid") is True and s.get("paid2") is True
    assert len([t for t in s.log() if t.txid in (tx.id, tx2.id)]) == 2
    s.close()


def test_an_interrupt_inside_a_read_of_the_log_comes_out_as_itself(tmp_path, monkeypatch):
    """Ctrl-C while a large log was read (``walstore.open``'s recovery, ``verify``): the
    read's frame held a view of the segment's map while the interrupt unwound, and the
    map's close raised BufferError ("exported pointers exist") in its place — the
    program's ``except KeyboardInterrupt`` never ran, and the CLI said "an unexpected
    error" (probe probe-ops).  Here the interrupt is raised inside each kind of read, a
    view of the map held in the raising frame, as a signal handler would."""
    from walstore.log import reader as log_reader
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
    (seg,) = [os.path.join(path, "wal", n) for n in os.listdir(os.path.join(path, "wal"))
              if n.endswith(".wal")]
    start = int(os.path.basename(seg).split(".")[0], 16)
    real_check = log_reader.check_record

    def interrupted(mm, *args, **kw):
        view = memoryview(mm)  # (held by this frame as the interrupt unwinds)
        raise KeyboardInterrupt(f"Ctrl-C with {len(view)} bytes in view")

    monkeypatch.setattr(log_reader, "check_record", interrupted)
    seg_reader = log_reader.SegmentReader(seg, None, start)
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C with"):
        list(seg_reader.records())
    follower = log_reader.LogFollower(os.path.join(path, "wal"), seg_reader.store_id, start)
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C with"):
        list(follower.poll(1 << 40))
    follower.close()  # (and its map is let go without an error)
    monkeypatch.setattr(log_reader, "check_record", real_check)
    with walstore.open(path, durability="none") as s:  # (nothing was left held)
        assert s.get("k19") == 19
