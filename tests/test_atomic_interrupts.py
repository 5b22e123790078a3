"""Interrupts (Ctrl-C, a raising timer) in the ends of a 2PC transaction and of
``walstore.atomic``: the undo a decision owes runs, and every participant is finished.

Found by a probe: an interrupt in ``rollback_prepared`` after its ROLLBACK_PREPARED (the
gid out of the prepared set) and before the undo left the state rolled back while the
file held the prepared content, its path claimed (ConflictError for every later writer),
``decision(gid)`` reading "prepared" and the charge neither refunded nor owed, until
the store was closed and reopened; ``Atomic._rollback_all`` caught only ``Exception``, so
a KeyboardInterrupt from one participant's compensator left the others open (their
charges not refunded, their files changed and claimed) until ``close()``; and an
interrupt among the participants' commits after the decision left the rest prepared.
Each child is a real process (the interrupt must not reach pytest).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from test_interrupt_points import HOOK  # (the sweep's interrupter)


def run(code: str, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-4000:])
    return r.stdout


ROLLBACK_ALL = r'''
import os, sys, walstore
base = sys.argv[1]
calls = []

def refund(a):
    calls.append(a.args["store"])
    if len(calls) == 1:
        raise KeyboardInterrupt("Ctrl-C during the refund call")

stores, wss = [], []
for n in "abc":
    s = walstore.open(f"{base}/{n}", compensators={"refund": refund})
    os.makedirs(f"{base}/{n}.ws")
    wss.append(s.workspace(f"{base}/{n}.ws"))
    stores.append(s)
g = walstore.atomic(*stores)
try:
    with g as txs:
        for n, t, w in zip("abc", txs, wss):
            with t.action("charge", args={"store": n}, compensate="refund"):
                pass
            t.files(w).write("f", b"after")
            t.put("v", "after")
        raise RuntimeError("agent gave up")
except KeyboardInterrupt as e:
    assert "refund call" in str(e), e
else:
    raise AssertionError("the interrupt was not raised")
for n, s, t, w in zip("abc", stores, g.txs, wss):
    acts = [a.state for a in s.actions()]
    # every participant rolled back, its file put back, its path free; its charge
    # refunded exactly once, or (the one whose refund the interrupt cut) owed
    assert t.state == "rolled back", (n, t.state)
    assert not os.path.exists(f"{base}/{n}.ws/f"), n
    assert s.get("v") is None, n
    assert acts == (["pending"] if n == "a" else ["compensated"]), (n, acts)
    with s.transaction() as t2:
        t2.files(w).write("f", b"next")
assert calls == ["a", "b", "c"], calls
for s in stores:
    s.close()
for n in "abc":  # (the owed one runs at the next open, once)
    walstore.open(f"{base}/{n}", compensators={"refund": refund}).close()
assert calls == ["a", "b", "c", "a"], calls
print("ok")
'''


def test_an_interrupt_in_one_participants_rollback_does_not_stop_the_others(tmp_path):
    assert run(ROLLBACK_ALL, str(tmp_path)).strip() == "ok"


SIGINT_AFTER_DECISION = r'''
import os, signal, sys, walstore
from walstore.engine import conflicts
base, durability = sys.argv[1], sys.argv[2]
refunds = []
s = walstore.open(f"{base}/s", durability=durability,
                  compensators={"refund": lambda a: refunds.append(a.id)})
os.makedirs(f"{base}/ws")
ws = s.workspace(f"{base}/ws")
with s.transaction() as tx:
    tx.files(ws).write("f", b"before")
    tx.put("v", "before")
tx = s.transaction()
with tx.action("charge", args={}, compensate="refund"):
    pass
tx.files(ws).write("f", b"after")
tx.put("v", "after")
tx.prepare("g1")

# a real SIGINT just after the gid left the prepared set, in the ROLLBACK_PREPARED's
# section: its handler runs at the next point it can
orig = conflicts.PreparedSet.remove
def remove(self, gid):
    r = orig(self, gid)
    conflicts.PreparedSet.remove = orig
    signal.raise_signal(signal.SIGINT)
    return r
conflicts.PreparedSet.remove = remove
interrupted = False
try:
    s.rollback_prepared("g1")
except KeyboardInterrupt:
    interrupted = True
assert s.get("v") == "before"
assert open(f"{base}/ws/f", "rb").read() == b"before"  # (put back, now)
assert s.prepared() == [] and s.decision("g1") == "abort", (s.prepared(), s.decision("g1"))
acts = s.actions()
if interrupted:
    # the interrupt came before the compensation: it is owed, listed, run once
    assert [a.state for a in acts] == ["pending"] and not refunds, (acts, refunds)
    assert [a.id for a in s.pending_compensations()] == [acts[0].id]
    s.retry_compensations()
else:  # (CPython ran the handler where it ignores exceptions — a weakref or GC
    # callback: "Exception ignored"; it happened once in a CI run): nothing cut short
    assert [a.state for a in acts] == ["compensated"], acts
assert refunds == [acts[0].id], refunds
with s.transaction() as t2:  # (the path is not claimed any more)
    t2.files(ws).write("f", b"next")
s.close()
s = walstore.open(f"{base}/s", compensators={"refund": lambda a: refunds.append(a.id)})
assert s.get("v") == "before" and open(f"{base}/ws/f", "rb").read() == b"next"
assert len(refunds) == 1, refunds
s.close()
print("ok")
'''


def test_a_sigint_after_the_rollback_prepared_decision_still_puts_the_file_back(tmp_path):
    for durability in ("none", "full"):
        assert run(SIGINT_AFTER_DECISION, str(tmp_path / durability),
                   durability).strip() == "ok"


ATOMIC_SWEEP = HOOK + r'''
import os, walstore
base, mode, stride, maxk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = "ab"
refunds = {n: [] for n in names}
charges = {n: [] for n in names}

def mk_refund(n):
    def refund(a):  # (named so: the interrupter tells a point inside the compensator)
        refunds[n].append(a.args["k"])
    return refund

stores, wss = [], []
for n in names:
    s = walstore.open(f"{base}/{n}", durability="none", compensators={"refund": mk_refund(n)})
    os.makedirs(f"{base}/{n}.ws")
    wss.append(s.workspace(f"{base}/{n}.ws"))
    with s.transaction() as tx:
        tx.files(wss[-1]).write("f", b"init")
        tx.put("v", "init")
    stores.append(s)

G = [None]

def step(k):
    G[0] = g = walstore.atomic(*stores)
    with g as txs:
        for n, tx, w in zip(names, txs, wss):
            with tx.action("charge", args={"k": k}, compensate="refund"):
                charges[n].append(k)
            tx.put("v", f"c{k}")
            tx.files(w).write("f", b"c%d" % k)
        if mode == "rollback":
            raise RuntimeError("agent gave up")

def step_caught(k):
    try:
        step(k)
    except RuntimeError:
        pass

bad, k = [], 0
while True:
    faulthandler.dump_traceback_later(150, exit=True)  # (per point: a hang, not a long sweep)
    seen = {n: len(refunds[n]) for n in names}
    G[0] = None
    where = interrupted(k, step_caught, k)
    g = G[0]
    states = [t.state for t in g.txs] if g is not None and g.txs else []
    prepared = [n for n, s in zip(names, stores) if g is not None and g.gid in s.prepared()]
    decided = stores[0].decision(g.gid) if g is not None else None
    # no participant is left behind by the group's own end: all still open (the
    # interrupt came before the group's exit ran, or inside its body) or none
    if "active" in states and set(states) != {"active"}:
        bad.append((k, where, "left open", states))
    if decided == "commit" and prepared:
        bad.append((k, where, "committed, left prepared", prepared))
    if decided != "commit" and decided is not None and prepared:
        # (one whose tx.prepare an interrupt cut short after its PREPARE was appended
        # counts as prepared too: it had no gid, was rolled back as a plain transaction
        # and its PREPARE stayed in doubt, its keys held, until a resolve_atomic)
        bad.append((k, where, "rolled back, left prepared", prepared))
    if not where and mode == "commit":
        break
    for t in (g.txs if g is not None else []):  # (the documented limit: an exit that
        if t.state == "active" and t.gid is None:  # never ran leaves them all open)
            t.rollback()
    walstore.resolve_atomic(*stores)  # (a coordinator interrupted before its decision)
    paid = [s.get("v") == f"c{k}" for s in stores]
    if len(set(paid)) != 1:
        bad.append((k, where, "mixed", paid))
    for n, s, w in zip(names, stores, wss):
        disk = open(f"{base}/{n}.ws/f", "rb").read()
        if disk != s.get("v").encode():
            bad.append((k, where, "file disagrees", n, disk, s.get("v")))
        new = refunds[n][seen[n]:]
        owed = [a for a in s.pending_compensations() if a.args["k"] == k]
        if paid[0] and (new or owed):
            bad.append((k, where, "paid and refunded", n))
        if (not paid[0] and k in charges[n] and len(new) + len(owed) != 1
                and not at["in_compensator"]):
            bad.append((k, where, "refunds", n, new, len(owed)))
        for a in owed:
            s.resolve(a.id)
        with s.transaction() as tx:  # (the path is free; in line for the next point)
            tx.files(w).write("f", s.get("v").encode())
    if not where or k + stride > maxk:
        break
    k += stride
for s in stores:
    s.close()
print(k, len(bad))
for b in bad[:20]:
    print(*b)
'''


def test_an_interrupt_at_any_point_of_an_atomic_group(tmp_path):
    """Every 37th point of ``walstore.atomic(a, b)`` with an action and a file in each,
    committing (1,500 points: all of them) and rolling back (the body raises: through
    the coordinator's rollback into the participant's, all of them: ~1,550 points since
    a compensation reads its own action's events alone — its path grew with the history
    before, and the sweep stopped at 3,000), seconds; with WALSTORE_SLOW=1 every point of
    the commit and every 7th of the rollback."""
    slow = os.environ.get("WALSTORE_SLOW") == "1"
    for mode, stride, maxk, least in (
            ("commit", "1" if slow else "37", "100000", 1000),
            ("rollback", "7" if slow else "37", "12000" if slow else "3000", 1000)):
        out = run(ATOMIC_SWEEP, str(tmp_path / mode), mode, stride, maxk, timeout=1800)
        first, *problems = out.strip().splitlines()
        points, nbad = map(int, first.split())
        assert points > least, points
        assert nbad == 0, (mode, problems)
