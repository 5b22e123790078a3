"""An interrupt at every point where a signal handler could run, one point per transaction.

CPython runs a handler (KeyboardInterrupt for Ctrl-C, a program's SIGALRM timeout) in the
main thread at a function's start and right after a call into C returns.  A profile hook
sees exactly those moments ("call" and "c_return" events), so raising KeyboardInterrupt
from it at the k-th one, for k = 0, 1, 2, ... until a transaction runs through without
one, walks an interrupt over every such point of a transaction's path (keys, actions,
savepoints, reverts, and files in a workspace) — except where the
main thread's signals are blocked (``walstore.signals.deferred``), where no handler runs.
In CI each sweep visits a deterministic sample: every distinct site of the path (a
"call" or "c_return" at one file:line, at its first point from where the last
interrupt landed), and at least every 9th point between (GAP); every point with
WALSTORE_SLOW=1 (the sweeps took 3-4 times as long; a revert's path has ~1,100 points at
~420 sites).

After each interrupt: the store still commits (a lock left held hangs it: the child's
watchdog then prints every thread's stack), the signal mask is clean, and the state and
the outside world (a list of charges and refunds) agree.

Found with it: the applier's wake-up ``Condition`` entered by the main thread — an
interrupt right after its lock was taken left it held, and the applier, then ``close()``,
waited for ever (the random SIGALRM storm of test_interrupts hung 2 runs in 6 of the full
suite); ``actions()`` reading LMDB and the MemTable at two moments (an owed
compensation shown as committed); a rollback finished before its ABORT was recorded (its
actions neither compensated nor owed); a file's descriptor closed twice (EBADF, or
another thread's file closed); and a rollback's file put-backs stopped by the interrupt
(the file left as the rolled-back transaction wrote it while the state said otherwise);
and (mode "savepoint-commit": the program catches the interrupt of a ``rollback_to`` and
commits) actions a rollback to a savepoint took out, then an interrupt kept from their
compensation — neither compensated nor owed; and (mode "file-rollback-prepared") a
``rollback_prepared`` interrupted between its ROLLBACK_PREPARED and its undo: the state
rolled back, the file as the prepared transaction wrote it, its path claimed for good,
``decision()`` reading "prepared" and the charge neither refunded nor owed, until a reopen.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# every point (WALSTORE_SLOW=1) takes several times a CI sample's time: the sweeps'
# watchdog (HOOK) allows 900 s then, their parents wait this much longer
SLOW_EXTRA_S = 800 if os.environ.get("WALSTORE_SLOW") == "1" else 0

HOOK = r'''
# ---- the sweep's interrupter (shared by both child programs) ----
import faulthandler, os, signal, sys, threading, walstore.signals as S
# (a hang prints where, on stderr; every point, WALSTORE_SLOW=1, beside other work
# takes longer: an oldscan sweep of 4,737 points was cut at 150 s, not hung)
faulthandler.dump_traceback_later(900 if os.environ.get("WALSTORE_SLOW") == "1" else 150,
                                  exit=True)
MAIN = threading.get_ident()
at = {"k": -1, "n": 0, "where": None, "in_compensator": False, "landed": -1}
# which points are interrupted: GAP 0, every one (WALSTORE_SLOW=1); else (CI) from the
# k-th point on, the first whose site ("call"/"c_return", file:line) no earlier run was
# interrupted at, or the GAP-th after k, whichever comes first -- every distinct site of
# the path (as it is reached: a path that changes from run to run is followed), its first
# point, and points at most GAP+1 apart everywhere else
GAP, SEEN = 0, set()

def hook(frame, event, arg):
    if at["k"] < 0 or at["where"] or threading.get_ident() != MAIN or S._DEFERRED.depth:
        return
    if event not in ("call", "c_return") or signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return  # (a handler runs at neither other events nor while signals are blocked)
    if at["n"] >= at["k"]:
        where = f"{event} {frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        if not GAP or where not in SEEN or at["n"] - at["k"] >= GAP:
            SEEN.add(where)
            at["where"], at["landed"] = where, at["n"]
            at["in_compensator"] = frame.f_code.co_name == "refund"
            raise KeyboardInterrupt(where)
    at["n"] += 1

def interrupted(k, fn, *args):
    """Run fn(*args) with an interrupt at its k-th point (GAP: at the first chosen one
    from its k-th on, ``at["landed"]``); where it landed (None: fn ran through, every
    point from the k-th on was passed)."""
    at.update(k=k, n=0, where=None, in_compensator=False, landed=-1)
    sys.setprofile(hook)
    try:
        fn(*args)
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
        at["k"] = -1
    return at["where"]
'''

SWEEP = HOOK + r'''
import time, walstore
path, mode, durability = sys.argv[1], sys.argv[2], sys.argv[3]
GAP = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # (0: every point)
refunds, charges = [], []

def opener():
    # the applier wakes for every commit and a segment fills in a few: the wake-up, the
    # spare's hand-over and the rotation are on the swept path too
    return walstore.open(path, durability=durability, apply_batch=1, apply_interval=0.001,
                         segment_size=8192, checkpoint_bytes=64 * 1024,
                         compensators={"refund": lambda a: refunds.append(a.args["k"])})

s = opener()
ws = None
if mode.startswith("file-"):
    import os
    os.makedirs(path + ".ws", mode=0o700)
    ws = s.workspace(path + ".ws")
    with s.transaction() as tx:
        tx.files(ws).write("f", b"r-1")
        tx.put("v", b"r-1")

def on_disk():
    import os
    f = os.path.join(path + ".ws", "f")
    return open(f, "rb").read() if os.path.exists(f) else None

def charge(tx, k):
    with tx.action("charge", args={"k": k}, compensate="refund"):
        charges.append(k)

TX, UNDONE = [None], [None]

def setup(k):
    if mode in ("commit-prepared", "rollback-prepared", "file-rollback-prepared"):
        tx = s.transaction()  # (decided by gid below: the coordinator's side)
        charge(tx, k)
        tx.put("paid", k)
        if ws is not None:  # (and a file: its undo puts it back)
            tx.files(ws).write("f", b"p%d" % k)
            tx.put("v", b"p%d" % k)
        tx.prepare(f"g{k}")
    if mode == "file-revert":
        with s.transaction() as tx:
            tx.files(ws).write("f", b"r%d" % k)
            tx.put("v", b"r%d" % k)
        UNDONE[0] = tx.id
    if mode == "revert":
        with s.transaction() as tx:
            charge(tx, k)
            tx.put("paid", k)
        UNDONE[0] = tx.id

def step(k):
    if mode == "put":
        with s.transaction() as tx:
            tx.put("k", k)
    elif mode == "action":
        TX[0] = tx = s.transaction()
        with tx:
            charge(tx, k)
            tx.put("paid", k)
    elif mode == "rollback":
        TX[0] = tx = s.transaction()
        charge(tx, k)
        tx.put("paid", k)
        tx.rollback()
    elif mode in ("savepoint", "savepoint-commit"):
        TX[0] = tx = s.transaction()
        with tx:
            tx.put("a", k)
            sp = tx.savepoint()
            charge(tx, k)
            tx.put("paid", k)
            try:
                tx.rollback_to(sp)
            except KeyboardInterrupt:
                if mode == "savepoint":
                    raise  # (savepoint-commit: the program catches it and commits)
    elif mode in ("revert", "file-revert"):
        s.revert(UNDONE[0])
    elif mode == "prepare":
        TX[0] = tx = s.transaction()
        charge(tx, k)
        tx.put("paid", k)
        tx.prepare(f"g{k}")
    elif mode == "commit-prepared":
        s.commit_prepared(f"g{k}")
    elif mode in ("rollback-prepared", "file-rollback-prepared"):
        s.rollback_prepared(f"g{k}")
    elif mode == "file-commit":
        TX[0] = tx = s.transaction()
        with tx:
            tx.files(ws).write("f", b"c%d" % k)
            tx.put("v", b"c%d" % k)
    elif mode == "file-rollback":
        TX[0] = tx = s.transaction()
        tx.files(ws).write("f", b"x%d" % k)
        tx.put("v", b"x%d" % k)
        tx.rollback()

bad, k, runs = [], 0, 0
while True:
    runs += 1
    setup(k)
    TX[0] = None
    seen = len(refunds)
    where = interrupted(k, step, k)
    if not where:
        break  # the transaction ran through: every point was visited
    tx = TX[0]
    gid = f"g{k}"
    if mode in ("prepare", "commit-prepared", "rollback-prepared",
                "file-rollback-prepared") and gid in s.prepared():
        # (the decision not reached: the coordinator's natural next step, once more)
        if mode == "commit-prepared":
            s.commit_prepared(gid)
        else:
            s.rollback_prepared(gid)
    elif tx is not None and tx.state == "active":
        # the interrupt landed at the very start of the with block's __exit__ (or of
        # rollback()), before any line of it: the transaction is still open, and its
        # rollback compensates as always
        tx.rollback()
    new = refunds[seen:]
    # owed: a compensation recorded as owed and listed (the interrupt landed after the
    # record that owes it, before it ran or before its outcome was recorded): the record
    # tells the truth, and recovery or the operator runs it (at least once, by its key)
    owed = [a for a in s.pending_compensations() if a.args["k"] == k]
    undone = bool(new or owed)
    if len(new) > 1:  # (a refund with no charge is the Saga's answer to an intent whose
        bad.append((k, where, "refunds", new))  # body may or may not have run: allowed)
    if mode in ("action", "rollback", "savepoint", "savepoint-commit", "prepare",
                "commit-prepared", "rollback-prepared", "file-rollback-prepared"):
        paid = s.get("paid") == k
        if paid and undone:
            bad.append((k, where, "paid and refunded", new, len(owed)))
        if k in charges and not paid and not undone:
            bad.append((k, where, "charged, not paid, never refunded nor owed"))
        if mode in ("rollback", "savepoint", "prepare", "rollback-prepared",
                    "file-rollback-prepared") and paid:
            bad.append((k, where, "a rolled-back write stands"))
        if mode == "commit-prepared" and not paid:
            bad.append((k, where, "a committed write is missing"))
        if mode == "file-rollback-prepared":
            if s.decision(gid) != "abort":
                bad.append((k, where, "decision", s.decision(gid)))
            if on_disk() != s.get("v"):  # (put back at once: the state says rolled back)
                bad.append((k, where, "on disk", on_disk(), "recorded", s.get("v")))
            try:  # (its path is not claimed any more)
                with s.transaction() as tx:
                    tx.files(ws).write("f", s.get("v"))
            except walstore.ConflictError as e:
                bad.append((k, where, "path still claimed", str(e)[:80]))
    elif mode == "revert":
        reverted = s.get("paid") != k
        if reverted != undone:
            bad.append((k, where, "reverted" if reverted else "not reverted", new, len(owed)))
    elif mode.startswith("file-"):
        if on_disk() != s.get("v"):  # (the file and the state say the same)
            bad.append((k, where, "on disk", on_disk(), "recorded", s.get("v")))
            with s.transaction() as tx:  # (in line again for the next point)
                tx.files(ws).write("f", s.get("v"))
    if signal.pthread_sigmask(signal.SIG_BLOCK, []) or S._DEFERRED.depth:
        bad.append((k, where, "signals left blocked"))
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        S._DEFERRED.depth = 0
    with s.transaction() as tx:  # the store goes on
        tx.put("alive", k)
    time.sleep(0.002)  # (the applier's wake-up flag resets)
    last, k = k, at["landed"] + 1
import warnings
with warnings.catch_warnings(record=True) as closing:
    warnings.simplefilter("always")
    s.close()
for w in closing:  # (nothing is left running: an entry's count left behind by an
    # interrupt as the entry ended had close() wait 5 s for it, then warn of actions
    # "still running in other threads")
    bad.append(("close", "warned", str(w.message)[:200]))
s = opener()
assert s.get("alive") == last, s.get("alive")
s.close()
print(k, len(bad), runs)
for b in bad[:20]:
    print(*b)
'''


# In CI a sweep interrupts every distinct site of the path and at least every GAP+1-th
# point (HOOK's GAP); every point with WALSTORE_SLOW=1
GAP = "0" if os.environ.get("WALSTORE_SLOW") == "1" else "8"


@pytest.mark.parametrize("mode,durability", [
    ("put", "none"), ("put", "full"), ("action", "none"), ("action", "full"),
    ("rollback", "none"), ("savepoint", "none"), ("savepoint-commit", "none"),
    ("revert", "none"), ("revert", "full"),
    pytest.param("file-commit", "none", marks=pytest.mark.slow),
    pytest.param("file-rollback", "none", marks=pytest.mark.slow),
    pytest.param("file-revert", "none", marks=pytest.mark.slow),
    ("prepare", "none"), ("commit-prepared", "none"), ("rollback-prepared", "none"),
    ("file-rollback-prepared", "none"),
    pytest.param("file-rollback-prepared", "full", marks=pytest.mark.slow)])
def test_an_interrupt_at_any_point_of_a_transaction(tmp_path, mode, durability):
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(SWEEP),
                            str(tmp_path / "s"), mode, durability, GAP],
                           capture_output=True, text=True, timeout=240 + SLOW_EXTRA_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the sweep hung: {e.stdout!r} {e.stderr!r}") from None
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    first, *problems = r.stdout.strip().splitlines()
    points, nbad, runs = map(int, first.split())
    assert points > 20, points  # (the hook did walk the path)
    assert nbad == 0, problems


CLOSE_SWEEP = HOOK + r'''
import walstore
base, mode, GAP = sys.argv[1], sys.argv[2], int(sys.argv[3])

refunds = []
def refund(a):
    refunds.append(a.args["k"])

bad, k, runs = [], 0, 0
while True:
    runs += 1
    path = f"{base}/{k}"
    s = walstore.open(path, compensators={"refund": refund})
    with s.transaction() as tx:
        tx.put("a", 1)
    if mode == "open-transaction":  # close() rolls it back: compensates, newest first
        tx = s.transaction()
        with tx.action("charge", args={"k": k}, compensate="refund"):
            pass
        tx.put("paid", k)
    where = interrupted(k, s.close)
    if not where:
        break
    try:
        s.close()  # an interrupted close() is finished by a second one
        s = walstore.open(path, compensators={"refund": refund})
    except Exception as e:
        bad.append((k, where, "close again, reopen", repr(e)))
        k = at["landed"] + 1
        continue
    if s.get("a") != 1:
        bad.append((k, where, "lost a commit"))
    if mode == "open-transaction":
        n = refunds.count(k)
        # exactly once, unless the interrupt landed inside the compensator itself (after
        # its side effect, before it returned: it did not finish, so it runs again)
        if s.get("paid") == k or s.pending_compensations() or not (
                n == 1 or (n == 2 and at["in_compensator"])):
            bad.append((k, where, "paid", s.get("paid"), "refunds", n,
                        len(s.pending_compensations())))
    s.close()
    k = at["landed"] + 1
print(k, len(bad), runs)
for b in bad[:20]:
    print(*b)
'''


@pytest.mark.parametrize("mode", ["plain",
                                  pytest.param("open-transaction", marks=pytest.mark.slow)])
def test_an_interrupt_at_any_point_of_close(tmp_path, mode):
    """Found with it: ``close()`` marked the store released before letting go of the WAL,
    LMDB and the process lock: an interrupt in between left the store locked by this
    process, and a second ``close()`` found nothing left to do (StoreLocked on reopen,
    for 42 of 299 points); a compensation that returned just as the interrupt came was
    not recorded and ran again at the next open.  (In CI: every distinct site of close's
    path and every 9th point, see the module's docstring; every point with
    WALSTORE_SLOW=1.)"""
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(CLOSE_SWEEP),
                            str(tmp_path), mode, GAP], capture_output=True, text=True,
                           timeout=240 + SLOW_EXTRA_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the sweep hung: {e.stdout!r} {e.stderr!r}") from None
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    first, *problems = r.stdout.strip().splitlines()
    points, nbad, runs = map(int, first.split())
    assert points > 100, points
    assert nbad == 0, problems
