"""Kill -9 at every step of every compensation path: recorded exactly once, never forgotten.

Contract section 2, "Action rollback" and "External side effects"; issue 10, finding 3 and
"Proof": compensations are recorded exactly once on every path — rollback, rollback_to,
revert, rewind, rollback_prepared, commit_prepared, recovery — under crashes at every
step.  A real child process (``agent_scripts/compensation_child.py``) runs one path
against a store and a JSON-lines payment ledger (``ws_ledger``: charges and refunds keyed
by the action's idempotency key) and SIGKILLs itself at one step: before the decision
record (ABORT, the undo's claiming COMMIT, ROLLBACK_PREPARED, the prepared COMMIT,
recovery's ABORT), after it is durable, inside a compensator after its refund, after a
COMPENSATED record.  Recovery's own compensation run is killed the same way: a first
child leaves a transaction with two charges in flight, a second one recovers and is
killed inside it.

After each kill the parent reopens the store, first without the compensator (every
compensation still owed is listed, nothing runs), then with it, and checks: each action
is ``committed`` or ``compensated`` as the path and step decide; each compensated action
has exactly one COMPENSATED record (state compensated) in the WAL and the ledger shows
exactly one refund of its charge; the compensator ran in the parent exactly for the
actions whose COMPENSATED record had not reached the log, once each; committed state is
what it should be; nothing is left in flight, pending or in doubt (an in-doubt prepared
transaction is then decided by the parent, and checked the same way); a second open
changes nothing; ``verify`` passes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import walstore
from walstore.engine.layout import Layout
from walstore.log.segment import list_segments
from walstore.ops.inspect import iter_wal
from walstore.ops.verify import verify_store

SCRIPTS = Path(__file__).resolve().parent / "agent_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ws_ledger  # noqa: E402
import ws_ledger_handlers  # noqa: E402

CHILD = SCRIPTS / "compensation_child.py"
DECISION = ["before-decision", "after-decision"]
TWO_COMPENSATIONS = ["effect:1", "recorded:1", "effect:2", "recorded:2"]
MATRIX = {
    "rollback": DECISION + TWO_COMPENSATIONS,
    "rollback_to": TWO_COMPENSATIONS + ["after-commit"],
    "revert": DECISION + TWO_COMPENSATIONS,
    "rewind": DECISION + TWO_COMPENSATIONS,
    "rollback_prepared": DECISION + TWO_COMPENSATIONS,
    "commit_prepared": DECISION,
    "recover": DECISION + TWO_COMPENSATIONS,
}
CASES = [(p, s) for p, steps in MATRIX.items() for s in steps]


# ---- the crash ---------------------------------------------------------------------------------
@dataclass
class Crash:
    store: str
    ledger: str
    calls: str
    setup: dict
    killed: str


def _child(tmp: Path, path: str, step: str) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, str(CHILD), str(tmp / "store"), str(tmp / "ledger.jsonl"),
                        str(tmp / "calls.jsonl"), path, step],
                       capture_output=True, text=True, timeout=90)
    lines = p.stdout.splitlines()
    assert p.returncode == -signal.SIGKILL, (f"{path}/{step}: exit {p.returncode}, "
                                             f"stdout {lines[-3:]}, stderr {p.stderr[-2000:]}")
    setups = [json.loads(x[len("SETUP "):]) for x in lines if x.startswith("SETUP ")]
    assert lines and lines[-1].startswith("KILLED"), lines
    return (setups[0] if setups else {}), lines[-1]


def crash(tmp: Path, path: str, step: str) -> Crash:
    if path == "recover":
        setup, _ = _child(tmp, "loser", "-")
        _, killed = _child(tmp, "recover", step)
    else:
        setup, killed = _child(tmp, path, step)
    return Crash(str(tmp / "store"), str(tmp / "ledger.jsonl"), str(tmp / "calls.jsonl"),
                 setup, killed)


# ---- what each path and step must leave ---------------------------------------------------------
@dataclass
class Expected:
    final: dict = field(default_factory=dict)     # action id -> committed | compensated
    present: dict = field(default_factory=dict)   # key -> value
    absent: list = field(default_factory=list)
    in_doubt: str | None = None                   # gid left prepared by the kill
    decide: str | None = None                     # how the parent then decides it


def expected(path: str, step: str, setup: dict) -> Expected:
    e = Expected({setup["baseline"]: "committed"}, {"committed": 7})
    undone = step != "before-decision"  # the decision record reached the log
    if path in ("rollback", "recover"):
        e.final.update({i: "compensated" for i in setup["owed"]})
        e.absent.append("rb/x" if path == "rollback" else "lost/x")
    elif path == "rollback_to":
        committed = step == "after-commit"
        e.final[setup["kept"]] = "committed" if committed else "compensated"
        e.final.update({i: "compensated" for i in setup["crossed"]})
        if committed:
            e.present.update({"rt/kept": 1, "rt/after": 1})
        else:
            e.absent += ["rt/kept", "rt/after"]
        e.absent.append("rt/dropped")
    elif path in ("revert", "rewind"):
        e.final.update({i: "compensated" if undone else "committed" for i in setup["undone"]})
        keys = {"rv/x": 42} if path == "revert" else {"rw/1": 40, "rw/2": 2}
        if undone:
            e.absent += list(keys)
        else:
            e.present.update(keys)
    elif path in ("rollback_prepared", "commit_prepared"):
        rollback = path == "rollback_prepared"
        e.final.update({i: "compensated" if rollback else "committed" for i in setup["ids"]})
        if rollback:
            e.absent.append("prb/x")
        else:
            e.present["pc/x"] = 1
        if not undone:
            e.in_doubt, e.decide = setup["gid"], ("rollback" if rollback else "commit")
    else:
        raise AssertionError(path)
    return e


# ---- checks ------------------------------------------------------------------------------------
def compensated_records(store: str) -> Counter:
    """COMPENSATED records with state compensated, per action id, in the whole WAL."""
    layout = Layout(store)
    assert [s for s, _p in list_segments(layout.wal)] == [0], "the log is not whole"
    return Counter(r["payload"]["id"] for r in iter_wal(store)
                   if r["type"] == "COMPENSATED" and r["payload"].get("state") == "compensated")


def check_settled(s, c: Crash, e: Expected) -> None:
    """Every action is what the path and step decide, once, on the ledger too."""
    actions = {a.id: a for a in s.actions()}
    assert sorted(actions) == sorted(e.final), "an action appeared or vanished"
    charges = Counter(r["key"] for r in ws_ledger.records(c.ledger) if r["op"] == "charge")
    refunds = Counter(r["key"] for r in ws_ledger.records(c.ledger) if r["op"] == "refund")
    records = compensated_records(c.store)
    for aid, want in e.final.items():
        a = actions[aid]
        assert (a.state, a.in_flight) == (want, False), (aid, a)
        assert charges[a.key] == 1, (aid, "charge")
        assert refunds[a.key] == (want == "compensated"), (aid, refunds[a.key], "refunds")
        assert records[aid] == (want == "compensated"), (aid, records[aid], "COMPENSATED records")
    assert s.pending_compensations() == []
    assert s.prepared() == []
    for k, v in e.present.items():
        assert s.get(k) == v, k
    for k in e.absent:
        assert k not in s, k
    committed_amounts = sum(c.setup["actions"][i]["amount"] for i, w in e.final.items()
                            if w == "committed")
    assert ws_ledger.balance(c.ledger) == committed_amounts


def calls_in(c: Crash, pid: int) -> Counter:
    return Counter(x["id"] for x in ws_ledger.records(c.calls) if x["pid"] == pid)


@pytest.mark.parametrize("path,step", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_kill9_at_every_step_of_every_compensation_path(tmp_path, path, step):
    c = crash(tmp_path, path, step)
    e = expected(path, step, c.setup)
    recorded = compensated_records(c.store)
    assert max(recorded.values(), default=0) <= 1, recorded
    # owed now: to be compensated, and its COMPENSATED record never reached the log
    owed = sorted(i for i, w in e.final.items() if w == "compensated" and not recorded[i])
    ledger_after_crash = ws_ledger.records(c.ledger)
    me = os.getpid()

    # 1. without the compensator: every owed compensation is listed, nothing runs
    with walstore.open(c.store) as s:
        if e.in_doubt:
            assert s.prepared() == [e.in_doubt]
            assert s.pending_compensations() == []  # in doubt: nothing owed yet
            assert all(s.get_action(i).in_flight for i in c.setup["ids"])
        else:
            assert sorted(a.id for a in s.pending_compensations()) == owed
            assert not any(a.in_flight for a in s.actions())
    assert ws_ledger.records(c.ledger) == ledger_after_crash

    # 2. with it: settled, each owed compensation run here exactly once
    with walstore.open(c.store, compensators=dict(ws_ledger_handlers.COMPENSATORS)) as s:
        if e.in_doubt:
            assert s.prepared() == [e.in_doubt]
            assert calls_in(c, me) == Counter()
            if e.decide == "rollback":
                s.rollback_prepared(e.in_doubt)
            else:
                s.commit_prepared(e.in_doubt)
        check_settled(s, c, e)
    assert calls_in(c, me) == Counter(owed), "compensations run by recovery, not once each"

    # 3. a second open does nothing more
    before = (ws_ledger.records(c.ledger), ws_ledger.records(c.calls))
    with walstore.open(c.store, compensators=dict(ws_ledger_handlers.COMPENSATORS)) as s:
        assert s.last_recovery.compensated == []
        check_settled(s, c, e)
    assert (ws_ledger.records(c.ledger), ws_ledger.records(c.calls)) == before
    rep = verify_store(c.store)
    assert rep.ok, rep.errors


def test_the_matrix_kills_where_it_says(tmp_path):
    """The kill points are real: a kill after the decision finds the decision in the log,
    a kill before it does not (revert: the claiming COMMIT; rollback: the ABORT)."""
    for path, rtype in (("revert", "COMMIT"), ("rollback", "ABORT")):
        counts = {}
        for step in DECISION:
            c = crash(tmp_path / f"{path}-{step}", path, step)
            counts[step] = sum(1 for r in iter_wal(c.store) if r["type"] == rtype)
        assert counts["after-decision"] == counts["before-decision"] + 1, (path, counts)
