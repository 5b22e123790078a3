"""Audit 68, a second pass over compensations, scans and read-only readers (last probed at
stops 55-60: tests/test_audit55_scans.py, test_audit56_saga.py, test_audit60_saga.py,
test_audit60_readers.py), with real processes killed (SIGKILL) and real files.

Coverage (each test asserts behaviour that could fail):

- a writer killed inside a compensator twice in a row, at different steps: inside a live
  rollback's compensation (its refund made and fsynced, not recorded), then inside the
  next open's recovery (before the older refund's effect): every refund is made once in
  the outside world (the idempotency key honoured), newest first, each recorded once, and
  a further open runs nothing
  (``test_compensations_killed_in_a_rollback_then_in_recovery_run_once_each``);
- compensators raising BaseException subclasses (KeyboardInterrupt, SystemExit,
  GeneratorExit): the rollback ends, the compensation stays owed, unrecorded, and
  ``retry_compensations`` runs it once
  (``test_a_compensator_raising_a_base_exception_leaves_it_owed_and_runs_once_later``);
- a compensator that opens a transaction with an action of its own, and one that calls
  ``retry_compensations`` and ``resolve`` on itself
  (``test_a_compensator_calling_back_into_the_store``);
- two threads' ``retry_compensations`` with ``resolve`` racing them, a slow compensator
  (``test_two_threads_retrying_and_a_resolve_run_each_compensation_at_most_once``);
- a live writer's purge seen from a read-only process holding a scan, a transaction's
  scan and a view of the past, then checkpoint, close and a new writer
  (``test_a_readers_open_scans_and_views_never_show_a_purged_key``);
- store.scan and tx.scan as snapshots (a sum kept constant by every commit) beside two
  committing threads, checkpoints and a map made to grow
  (``test_scans_beside_commits_checkpoints_and_map_growth_are_snapshots``);
- scan bounds at the 500-byte key limit and of \\xff bytes, both directions.

Findings (each test named below fails on the code before its fix):

- A compensator raising StopIteration was recorded failed with walstore's own
  "IndexError: list index out of range"
  (``test_a_compensator_raising_stopiteration_is_recorded_as_its_own_failure``).
- A prepared transaction decided through the store (``commit_prepared`` /
  ``rollback_prepared``) still read "active" and its reads (a half-read scan too) went on
  showing its write set; a write said it "is prepared"
  (``test_a_prepared_transaction_decided_by_the_store_reads_no_more``).
- close() beside one rollback whose compensator hangs warned of "2 rollback(s)"
  (``test_close_beside_a_hung_compensator_counts_its_rollback_once``).
- A purge of keys a streaming scan had already passed stopped it (SnapshotTooOld) once
  its rows were in LMDB
  (``test_a_purge_of_keys_a_scan_already_passed_does_not_stop_it``).
"""
from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import walstore

# ---- kill -9 inside compensators ---------------------------------------------------------
_AGENT = textwrap.dedent("""
    import json, os, signal, sys
    import walstore
    path, ledger, step, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

    def world(line):  # the outside world: an fsynced ledger
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def done(key):
        return os.path.exists(ledger) and ("refund " + key) in open(ledger).read().split("\\n")

    def refund(action):
        world("call " + action.key)
        if kill_at == "before:" + str(action.args):
            os.kill(os.getpid(), signal.SIGKILL)
        if not done(action.key):  # (the payment system honours the idempotency key)
            world("refund " + action.key)
        if kill_at == "after:" + str(action.args):
            os.kill(os.getpid(), signal.SIGKILL)

    store = walstore.open(path, compensators={"refund": refund})
    if step == "agent":
        tx = store.transaction()
        tx.put("order", "placed")
        for n in (1, 2, 3):
            with tx.action("charge", args=n, compensate="refund") as act:
                world("charge " + act.key)
                act.result = n
        tx.rollback()
    store.close()
    print("done", flush=True)
""")


def _run_agent(tmp_path, step: str, kill_at: str) -> int:
    p = subprocess.run([sys.executable, "-c", _AGENT, str(tmp_path / "s"),
                        str(tmp_path / "ledger"), step, kill_at],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr[-2000:]
    return p.returncode


def test_compensations_killed_in_a_rollback_then_in_recovery_run_once_each(tmp_path):
    # the rollback: the newest refund recorded, the middle one made, killed unrecorded
    assert _run_agent(tmp_path, "agent", "after:2") == -signal.SIGKILL
    # the next open's recovery: the middle one again (same key), then killed before the
    # oldest one's effect
    assert _run_agent(tmp_path, "reopen", "before:1") == -signal.SIGKILL
    assert _run_agent(tmp_path, "reopen", "") == 0
    lines = open(tmp_path / "ledger").read().splitlines()
    charges = [ln.split()[1] for ln in lines if ln.startswith("charge ")]
    refunds = [ln.split()[1] for ln in lines if ln.startswith("refund ")]
    calls = collections.Counter(ln.split()[1] for ln in lines if ln.startswith("call "))
    k1, k2, k3 = charges
    assert refunds == [k3, k2, k1]  # each once, newest first
    assert calls == {k3: 1, k2: 2, k1: 2}  # (run again only where no outcome was recorded)
    seen: list = []
    with walstore.open(str(tmp_path / "s"),
                       compensators={"refund": lambda a: seen.append(a.id)}) as s:
        assert seen == []  # nothing owed any more
        assert s.get("order") is None
        got = [(a.args, a.state, a.key) for a in s.actions()]
        assert got == [(3, "compensated", k3), (2, "compensated", k2), (1, "compensated", k1)]
        assert s.pending_compensations() == []


# ---- compensators that raise, or call back into the store --------------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_a_compensator_raising_a_base_exception_leaves_it_owed_and_runs_once_later(
        tmp_path, exc):
    calls: list = []

    def refund(action):
        calls.append(action.id)
        if len(calls) == 1:
            raise exc()

    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        tx = s.transaction()
        tx.put("k", 1)
        with tx.action("charge", compensate="refund") as act:
            act.result = 1
        with pytest.raises(exc):
            tx.rollback()
        assert tx.state == "rolled back" and s.get("k") is None
        (owed,) = s.pending_compensations()
        assert (owed.id, owed.state, owed.attempts) == (act.id, "pending", 0)
        assert s.retry_compensations() == []
        assert calls == [act.id, act.id]
        assert s.get_action(act.id).state == "compensated"
        assert s.retry_compensations() == [] and len(calls) == 2


def test_a_compensator_calling_back_into_the_store(tmp_path):
    opened: list = []
    notified: list = []

    def refund(action):
        s = opened[0]
        with s.transaction() as t:
            t.put("refunded/" + action.id, action.result)
            with t.action("notify", compensate="unnotify") as act:
                act.result = action.id
        # (its own compensation is running: resolving it by hand is refused)
        with pytest.raises(walstore.WalstoreError, match="compensation is running now"):
            s.resolve(action.id)
        s.retry_compensations()  # (nested: runs nothing of the rollback's)

    with walstore.open(str(tmp_path / "s"), durability="none", compensators={
            "refund": refund, "unnotify": lambda a: notified.append(a.id)}) as s:
        opened.append(s)
        tx = s.transaction()
        for n in (1, 2):
            with tx.action("charge", compensate="refund") as act:
                act.result = n
        tx.rollback()
        states = {a.id: (a.name, a.state) for a in s.actions()}
        assert states == {f"{tx.id}.1": ("charge", "compensated"),
                          f"{tx.id}.2": ("charge", "compensated"),
                          f"{tx.id + 1}.1": ("notify", "committed"),
                          f"{tx.id + 2}.1": ("notify", "committed")}
        assert dict(s.scan(prefix="refunded/")) == {f"refunded/{tx.id}.1": 1,
                                                    f"refunded/{tx.id}.2": 2}
        assert notified == []


def test_two_threads_retrying_and_a_resolve_run_each_compensation_at_most_once(tmp_path):
    runs: collections.Counter = collections.Counter()

    def slow(action):
        runs[action.id] += 1
        time.sleep(0.1)

    with walstore.open(str(tmp_path / "s"), durability="full") as s:
        for n in range(4):
            tx = s.transaction()
            with tx.action("charge", args=n, compensate="slow"):
                pass
            tx.rollback()  # (no compensator yet: owed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s.compensator("slow")(slow)
        errors: list = []

        def retry():
            try:
                s.retry_compensations()
            except walstore.WalstoreError as e:  # pragma: no cover (a finding)
                errors.append(e)

        ts = [threading.Thread(target=retry) for _ in range(2)]
        for t in ts:
            t.start()
        time.sleep(0.03)
        resolved = None
        try:
            resolved = s.resolve("1.1", note="by hand").state
        except walstore.WalstoreError as e:
            assert "running now" in str(e)
        for t in ts:
            t.join(20)
        assert errors == []
        assert all(n == 1 for n in runs.values()), runs
        states = {a.id: a.state for a in s.actions()}
        if resolved == "resolved":
            assert "1.1" not in runs and states.pop("1.1") == "resolved"
        assert set(states.values()) == {"compensated"}
        assert set(runs) == set(states)
        assert s.pending_compensations() == []


# ---- readers beside a live writer's purge -------------------------------------------------
_READER = textwrap.dedent("""
    import json, sys, walstore
    r = walstore.open(sys.argv[1], readonly=True)
    held = {}
    def run(c):
        op = c["op"]
        if op == "get":
            return r.get(c["k"])
        if op == "scan":
            it = r.scan(prefix=c["p"]); held[c["n"]] = it; return next(it)[0]
        if op == "txscan":
            it = r.transaction().scan(prefix=c["p"]); held[c["n"]] = it; return next(it)[0]
        if op == "at":
            held[c["n"]] = v = r.at(c["pt"]); return v.get(c["k"])
        if op == "rest":
            return [k for k, _v in held[c["n"]]]
        if op == "atget":
            return [held[c["n"]].get(c["k"]), [k for k, _ in held[c["n"]].scan(prefix=c["p"])]]
        if op == "all":
            return [[k for k, _v in r.scan(prefix=c["p"])],
                    [v.value for v in r.history(c["k"])]]
    for line in sys.stdin:
        try:
            out = {"ok": run(json.loads(line))}
        except walstore.WalstoreError as e:
            out = {"err": type(e).__name__}
        print(json.dumps(out), flush=True)
""")


def test_a_readers_open_scans_and_views_never_show_a_purged_key(tmp_path):
    path = str(tmp_path / "s")
    w = walstore.open(path, durability="full")
    for i in range(3):
        with w.transaction() as tx:
            tx.update({f"secret/{j:03d}": f"pw{i}" for j in range(100)})
            tx.put("pub", i)
    w.restore_point("before")
    w.checkpoint()
    rd = subprocess.Popen([sys.executable, "-c", _READER, path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)

    def ask(**c):
        rd.stdin.write(json.dumps(c) + "\n")
        rd.stdin.flush()
        return json.loads(rd.stdout.readline())

    try:
        assert ask(op="get", k="secret/001") == {"ok": "pw2"}
        assert ask(op="scan", p="secret/", n="s") == {"ok": "secret/000"}
        assert ask(op="txscan", p="secret/", n="t") == {"ok": "secret/000"}
        assert ask(op="at", pt="before", k="secret/001", n="v") == {"ok": "pw2"}
        w.purge("secret/")
        for step in ("purged", "checkpointed", "closed", "new writer"):
            assert ask(op="get", k="secret/001") == {"ok": None}, step
            assert ask(op="atget", n="v", k="secret/002", p="secret/") == {"ok": [None, []]}
            assert ask(op="all", p="secret/", k="secret/003") == {"ok": [[], []]}, step
            if step == "purged":  # (the scans met the purge: one state no more)
                assert ask(op="rest", n="s") == {"err": "SnapshotTooOld"}
                assert ask(op="rest", n="t") == {"err": "SnapshotTooOld"}
                w.checkpoint()
            elif step == "checkpointed":
                w.close()
            elif step == "closed":
                w = walstore.open(path)
                with w.transaction() as tx:
                    tx.put("pub", 99)
        assert ask(op="get", k="pub") == {"ok": 99}
    finally:
        rd.stdin.close()
        rd.wait(30)
        w.close()


# ---- scans ---------------------------------------------------------------------------------
def test_scans_beside_commits_checkpoints_and_map_growth_are_snapshots(tmp_path):
    """Every commit moves value between keys (deleting and creating some): the total
    over ``k/`` is the same in every state, so any scan that is not one state shows it."""
    n_keys, total = 1500, 1500 * 1000
    s = walstore.open(str(tmp_path / "s"), durability="none", map_size=1 << 20)
    with s.transaction() as tx:
        tx.update({f"k/{i:05d}": 1000 for i in range(n_keys)})
    stop = threading.Event()
    errors: list = []

    def writer(seed: int) -> None:
        r = random.Random(seed)
        n = 0
        while not stop.is_set():
            try:
                with s.transaction() as tx:
                    a, b = (f"k/{r.randrange(n_keys * 3):05d}" for _ in range(2))
                    va = tx.get(a)
                    if va is None or a == b:
                        continue
                    amt = r.randrange(1, va + 1)
                    tx.put(b, (tx.get(b) or 0) + amt)
                    if amt == va:
                        tx.delete(a)
                    else:
                        tx.put(a, va - amt)
                    tx.put(f"pad/{r.randrange(10 ** 6)}", "x" * r.randrange(2000))
            except walstore.ConflictError:
                pass
            except Exception as e:  # pragma: no cover (a finding)
                errors.append(e)
                return
            n += 1
            if n % 50 == 0:
                s.checkpoint()

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    try:
        deadline, scans = time.monotonic() + 4, 0
        while time.monotonic() < deadline:
            rev = scans % 2 == 1
            rows = []
            for row in s.scan(prefix="k/", reverse=rev):
                rows.append(row)
                if len(rows) % 200 == 0:
                    time.sleep(0.002)  # (commits land while it streams)
            keys = [k for k, _v in rows]
            assert keys == sorted(keys, reverse=rev) and len(set(keys)) == len(keys)
            assert sum(v for _k, v in rows) == total
            tx = s.transaction()
            assert sum(v for _k, v in tx.scan(prefix="k/", reverse=not rev)) == total
            tx.rollback()
            scans += 1
    finally:
        stop.set()
        for t in ts:
            t.join(20)
    assert errors == []
    assert s.stats()["lmdb_map_size"] > 1 << 20  # (it grew under the open scans)
    s.close()


def test_scan_bounds_at_the_key_limit_and_of_ff_bytes(store):
    big = [b"\xff" * 500, b"\xff" * 499, b"\xff" * 499 + b"\xfe", "a" * 500, "a" * 499 + "b"]
    with store.transaction() as tx:
        for k in big:
            tx.put(k, len(k))
    with pytest.raises(ValueError, match="501 bytes"):
        store.transaction().put(b"\xff" * 501, 1)
    keys = lambda **kw: [k for k, _v in store.scan(**kw)]  # noqa: E731
    assert keys(prefix=b"\xff" * 500) == [b"\xff" * 500]
    assert keys(prefix=b"\xff" * 499, reverse=True) == [
        b"\xff" * 500, b"\xff" * 499 + b"\xfe", b"\xff" * 499]
    assert keys(prefix=b"\xff" * 501) == []
    assert keys(end=b"\xff" * 500, reverse=True) == [b"\xff" * 499 + b"\xfe", b"\xff" * 499]
    assert keys(prefix="", reverse=True) == ["a" * 499 + "b", "a" * 500]
    assert keys(start="a" * 600) == ["a" * 499 + "b"]
    assert len(keys(prefix=b"")) == 3
    store.checkpoint()
    tx = store.transaction()
    assert [k for k, _v in tx.scan(prefix=b"\xff" * 499, reverse=True)] == [
        b"\xff" * 500, b"\xff" * 499 + b"\xfe", b"\xff" * 499]
    tx.rollback()


# ---- findings ------------------------------------------------------------------------------
def _charge_rolled_back_failing(s):
    """A transaction with one action "charge" (compensated by "refund") rolled back, its
    compensation failing (CompensationFailed raised): the action and that error."""
    tx = s.transaction()
    with tx.action("charge", compensate="refund") as act:
        act.result = 1
    with pytest.raises(walstore.CompensationFailed) as e:
        tx.rollback()
    return act, e.value


def test_a_compensator_raising_stopiteration_is_recorded_as_its_own_failure(tmp_path):
    """A compensator whose bug raised StopIteration (a ``next()`` on an exhausted
    iterator) was recorded failed with walstore's own error, "IndexError: list index out
    of range" (the C call that notes the compensator's return took the StopIteration for
    its end, and the empty result was indexed): the action's error and CompensationFailed
    sent its reader looking for an IndexError that no code of theirs raised."""
    calls: list = []

    def refund(action):
        calls.append(action.id)
        return next(iter(()))  # (the compensator's bug)

    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        act, failed = _charge_rolled_back_failing(s)
        assert "StopIteration" in str(failed) and "IndexError" not in str(failed)
        got = s.get_action(act.id)
        assert (got.state, got.attempts) == ("failed", 3) and len(calls) == 3
        assert got.error.startswith("StopIteration") and "refund" in got.error, got.error


@pytest.mark.parametrize("decide", ["commit_prepared", "rollback_prepared"])
def test_a_prepared_transaction_decided_by_the_store_reads_no_more(tmp_path, decide):
    """A transaction prepared, then decided through ``store.commit_prepared(gid)`` or
    ``store.rollback_prepared(gid)`` (a coordinator's call, another thread's): its object
    still said ``state == "active"``, and ``tx.get``/``tx.scan`` (a half-read scan too)
    went on reading its own write set as if it were there — after ``rollback_prepared``
    rows the store never held, and never will.  As after ``tx.rollback()``/``commit()``
    (audit 55), its reads raise TransactionClosed, and its state says how it ended."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.update({f"k{i}": i for i in range(5)})
        tx = s.transaction()
        tx.put("k2", "prepared")
        tx.put("k9", "prepared")
        rows = tx.scan(prefix="k")
        assert next(rows) == ("k0", 0)
        tx.prepare("g1")
        assert tx.get("k2") == "prepared"  # (in doubt: it still reads its writes)
        getattr(s, decide)("g1")
        ended = "committed" if decide == "commit_prepared" else "rolled back"
        with pytest.raises(walstore.TransactionClosed, match=ended):
            tx.put("k3", "late")  # (it said "is prepared as 'g1'" of it)
        with pytest.raises(walstore.TransactionClosed, match=ended):
            next(rows)
        with pytest.raises(walstore.TransactionClosed, match=ended):
            tx.get("k2")
        with pytest.raises(walstore.TransactionClosed, match=ended):
            tx.scan(prefix="k")
        assert tx.state == ended
        assert s.get("k9") == ("prepared" if ended == "committed" else None)
        if ended == "committed":
            assert tx.lsn is not None


def test_close_beside_a_hung_compensator_counts_its_rollback_once(tmp_path, monkeypatch):
    """close() beside one rollback whose compensator hangs: its warning said "2
    rollback(s) ... are still running in other threads" (the rollback counted at its
    ABORT and again at its undo, nested).  It says 1; the compensation is named, runs
    again at the next open (same key), and the hung one's own record is refused."""
    import walstore.store as store_module
    monkeypatch.setattr(store_module, "CLOSE_WAIT_S", 0.3)
    path = str(tmp_path / "s")
    gate, started = threading.Event(), threading.Event()
    runs: list = []

    def hang(action):
        runs.append(action.id)
        started.set()
        gate.wait(20)

    s = walstore.open(path, durability="none", compensators={"refund": hang})
    tx = s.transaction()
    with tx.action("charge", compensate="refund") as act:
        act.result = 1
    outcome: list = []

    def roll_back():
        try:
            tx.rollback()
        except walstore.CompensationFailed as e:
            outcome.append(str(e))

    t = threading.Thread(target=roll_back)
    t.start()
    try:
        assert started.wait(10)
        with pytest.warns(RuntimeWarning) as seen:
            s.close()
        (msg,) = [str(w.message) for w in seen]
        assert "1 rollback(s)" in msg and f"compensation(s) ['{act.id}']" in msg, msg
    finally:
        gate.set()
        t.join(20)
    assert outcome and "could not be recorded" in outcome[0]
    with walstore.open(path, compensators={"refund": lambda a: runs.append(a.id)}) as s2:
        assert runs == [act.id, act.id]
        assert s2.get_action(act.id).state == "compensated"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["store", "tx"])
def test_a_purge_of_keys_a_scan_already_passed_does_not_stop_it(tmp_path, reverse, kind):
    """A purge of keys a streaming scan had already yielded (and so no row left for it
    to read) stopped the scan with SnapshotTooOld ("retry the scan") once the rows were in
    LMDB — the walk of the commits since the snapshot checked the whole range, not what
    is left of it — while the same scan over rows still in memory went on, as the scan's
    own rule says (SnapshotTooOld only when the purge erased keys in what is left).  A
    scan over a store whose older entries are purged now and then could fail every try.
    A purge ahead of it still stops it."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.update({f"{c}/{i:03d}": i for c in "abmyz" for i in range(100)})
        s.checkpoint()
        passed, ahead = ("z/", "a/") if reverse else ("a/", "z/")
        for purge, stops in ((passed, False), (ahead, True)):
            tx = s.transaction()
            rows = (tx if kind == "tx" else s).scan(reverse=reverse)
            head = [next(rows)[0]]
            while not head[-1].startswith("m/"):  # (past a/ and b/, or z/ and y/)
                head.append(next(rows)[0])
            s.purge(purge)
            if stops:
                with pytest.raises(walstore.ConflictError, match="purge"):
                    list(rows)
            else:
                rest = [k for k, _v in rows]
                assert len(head) + len(rest) == 500  # (one state: the snapshot's)
                assert rest[0] == ("m/098" if reverse else "m/001")
                assert not any(k.startswith(purge) for k in rest)
            tx.rollback()
