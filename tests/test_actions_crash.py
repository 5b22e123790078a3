"""Crash tests for intents and compensations, with real processes and a real "external system".

``tests/agent_scripts/action_child.py`` runs an agent against a store and a JSON-lines
payment ledger (``ws_ledger``: charges and refunds keyed by idempotency key; repeating a
key changes nothing).  The test SIGKILLs it at a chosen moment:

- between the durable intent and the body (nothing charged yet),
- between the body (charged) and the commit,
- in the middle of a rollback's compensation (refund done, not yet recorded),
- in the middle of a rewind's compensation (the rewind committed, one refund recorded,
  the next one done but not recorded),

then reopens the store with the compensator registered (``walstore.open(...,
compensators=...)``), or without it (the actions stay pending; ``walstore recover`` exits 1
and lists them; ``walstore recover --handlers ws_ledger_handlers`` runs them).  Every time:
the uncommitted (or rewound) charges are refunded exactly once, the committed charge is
untouched, the compensator sees the same idempotency key as the body, and a second
recovery does nothing more.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.ops.inspect import iter_wal

SCRIPTS = Path(__file__).resolve().parent / "agent_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ws_ledger  # noqa: E402
import ws_ledger_handlers  # noqa: E402

CHILD = SCRIPTS / "action_child.py"
HANDLERS = "ws_ledger_handlers"


# ---- the child process -----------------------------------------------------------------------
class Child:
    """action_child.py in a subprocess; lines read with deadlines, killed with SIGKILL."""

    def __init__(self, tmp: Path, mode: str) -> None:
        self.store = tmp / "store"
        self.ledger = tmp / "ledger.jsonl"
        self.calls = tmp / "calls.jsonl"
        self.marker = tmp / "marker"
        self.stderr_path = tmp / "child.err"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(self.store), str(self.ledger), str(self.calls),
             mode, str(self.marker)], stdout=subprocess.PIPE, stderr=self._err)
        self._buf = b""

    def line(self, prefix: str, words: int = -1, timeout: float = 20) -> list[str]:
        """The next stdout line, which must start with ``prefix``; returns its words
        after the prefix (``words``: at most that many, the last one keeps its spaces)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"child printed no {prefix!r} line in {timeout}s; "
                            f"stderr: {self.stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait()
                    pytest.fail(f"child exited ({self.proc.returncode}) before {prefix!r}; "
                                f"stderr: {self.stderr()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        parts = raw.decode().split(" ", words)
        assert parts[0] == prefix, f"expected {prefix!r}, child said {raw!r}"
        return parts[1:]

    def wait_file(self, path: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{path.name} never appeared; stderr: {self.stderr()}")
            time.sleep(0.005)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self._err.close()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-2000:]
        except OSError:
            return ""

    def calls_by(self, pid: int | None = None, not_pid: int | None = None) -> list[dict]:
        out = ws_ledger.records(str(self.calls))
        if pid is not None:
            out = [c for c in out if c["pid"] == pid]
        if not_pid is not None:
            out = [c for c in out if c["pid"] != not_pid]
        return out


class Crash:
    """What a crashed child did: the committed action, and the actions owed a compensation."""

    def __init__(self, child: Child, committed: list[str]) -> None:
        self.child = child
        self.path = str(child.store)
        self.ledger = str(child.ledger)
        self.committed_txid = int(committed[0])
        self.committed_id = committed[1]
        self.committed_key = committed[2]
        self.owed: list[dict] = []  # {"id", "key", "txid", "result"} still to compensate now
        self.done_by_child: list[dict] = []  # compensated (and recorded) before the kill
        self.loser_txids: list[int] = []
        self.rewound_keys: list[str] = []


def crash(tmp_path: Path, mode: str) -> Crash:
    child = Child(tmp_path, mode)
    committed = child.line("COMMITTED")
    c = Crash(child, committed)
    try:
        if mode == "intent":
            txid, aid, key, id0, key0 = child.line("INTENT")
            # write-ahead for side effects: another process already sees the intent,
            # and the body has not charged anything yet
            intents = [r for r in iter_wal(c.path) if r["type"] == "ACTION_INTENT"]
            assert [r["payload"]["id"] for r in intents][-1] == aid
            assert intents[-1]["payload"]["key"] == key
            assert intents[-1]["payload"]["compensate"] == "refund"
            assert ws_ledger.count(c.ledger, "charge", key) == 0
            assert ws_ledger.balance(c.ledger, key0) == 5
            # newest first: the action whose body never ran (result unknown), then the first
            c.owed = [{"id": aid, "key": key, "txid": int(txid), "result": None},
                      {"id": id0, "key": key0, "txid": int(txid),
                       "result": {"charge_id": key0, "amount": 5}}]
            c.loser_txids = [int(txid)]
        elif mode == "body":
            txid, aid, key, result = child.line("BODY", 4)
            assert ws_ledger.balance(c.ledger, key) == 40
            c.owed = [{"id": aid, "key": key, "txid": int(txid), "result": json.loads(result)}]
            c.loser_txids = [int(txid)]
        elif mode == "compensation":
            txid, id1, key1, id2, key2 = child.line("ACTIONS")
            child.wait_file(child.marker)
            # the child refunded both (the older refund not yet recorded) and blocks
            assert ws_ledger.balance(c.ledger, key1) == 0
            assert ws_ledger.balance(c.ledger, key2) == 0
            assert [x["id"] for x in child.calls_by(pid=child.proc.pid)] == [id2, id1]
            c.owed = [{"id": id1, "key": key1, "txid": int(txid)}]
            c.done_by_child = [{"id": id2, "key": key2, "txid": int(txid)}]
            # not a loser: the rollback's ABORT was durable before any compensation ran;
            # what it owed is simply still owed (pending) after the kill
            c.loser_txids = []
        elif mode == "rewind":
            t1, id1, key1, t2, id2, key2 = child.line("REWIND")
            child.wait_file(child.marker)
            assert [x["id"] for x in child.calls_by(pid=child.proc.pid)] == [id2, id1]
            c.owed = [{"id": id1, "key": key1, "txid": int(t1)}]
            c.done_by_child = [{"id": id2, "key": key2, "txid": int(t2)}]
            c.rewound_keys = ["after/1", "after/2"]
        else:
            raise AssertionError(mode)
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL, child.stderr()
    return c


MODES = ["intent", "body", "compensation", "rewind"]


def check_committed_untouched(c: Crash, store) -> None:
    assert store.get("committed") == 7
    assert ws_ledger.count(c.ledger, "charge", c.committed_key) == 1
    assert ws_ledger.count(c.ledger, "refund", c.committed_key) == 0
    assert store.get_action(c.committed_id).state == "committed"
    assert c.committed_txid in [i.txid for i in store.log()]


def check_all_compensated_once(c: Crash, store) -> None:
    for a in c.owed + c.done_by_child:
        assert ws_ledger.balance(c.ledger, a["key"]) == 0, ws_ledger.records(c.ledger)
        assert ws_ledger.count(c.ledger, "refund", a["key"]) <= 1
        assert store.get_action(a["id"]).state == "compensated"
    assert store.pending_compensations() == []
    assert store.get("uncommitted") is None
    for k in c.rewound_keys:
        assert store.get(k) is None
    # the only money left on the ledger is the committed charge
    assert ws_ledger.balance(c.ledger) == 7


def check_recovery_calls(c: Crash, calls: list[dict]) -> None:
    """Recovery compensated exactly the owed actions, once each, newest first, with their
    stable keys."""
    assert [x["id"] for x in calls] == [a["id"] for a in c.owed]
    for a in c.owed:
        (call,) = [x for x in calls if x["id"] == a["id"]]
        assert call["key"] == a["key"]
        assert call["txid"] == a["txid"]
        if "result" in a:  # result unknown (None) when the body never ran
            assert call["result"] == a["result"]


# ---- reopening with the compensator registered ---------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_kill9_then_open_with_compensators_compensates_exactly_once(tmp_path, mode):
    c = crash(tmp_path, mode)
    me = os.getpid()
    with walstore.open(c.path, compensators=dict(ws_ledger_handlers.COMPENSATORS)) as store:
        report = store.last_recovery
        for t in c.loser_txids:
            assert t in report.losers
        assert c.committed_txid not in report.losers
        assert sorted(report.compensated) == sorted(a["id"] for a in c.owed)
        assert report.pending_compensations == []
        check_recovery_calls(c, c.child.calls_by(pid=me))
        check_all_compensated_once(c, store)
        check_committed_untouched(c, store)
    # a second recovery (and a third, through the CLI) does nothing more
    before = (ws_ledger.records(c.ledger), c.child.calls_by())
    with walstore.open(c.path, compensators=dict(ws_ledger_handlers.COMPENSATORS)) as store:
        assert store.last_recovery.compensated == []
        assert store.last_recovery.losers == []
        check_all_compensated_once(c, store)
        check_committed_untouched(c, store)
    assert (ws_ledger.records(c.ledger), c.child.calls_by()) == before


# ---- reopening without it: pending, listed, then `walstore recover --handlers` --------------
@pytest.fixture
def handlers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(SCRIPTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


@pytest.mark.parametrize("mode", MODES)
def test_kill9_without_compensator_leaves_pending_then_cli_recover_handlers(
        tmp_path, mode, handlers_on_path):
    c = crash(tmp_path, mode)
    owed_ids = sorted(a["id"] for a in c.owed)
    ledger_after_crash = ws_ledger.records(c.ledger)

    with walstore.open(c.path) as store:  # no compensator registered
        report = store.last_recovery
        for t in c.loser_txids:
            assert t in report.losers
        assert report.compensated == []
        assert sorted(report.pending_compensations) == owed_ids
        pending = store.pending_compensations()
        assert sorted(a.id for a in pending) == owed_ids
        for a in c.owed:
            (p,) = [x for x in pending if x.id == a["id"]]
            assert p.state == "pending" and p.key == a["key"] and p.txid == a["txid"]
            assert p.compensate == "refund" and p.name in ("charge", "reserve")
            if "result" in a:
                assert p.result == a["result"]
        for a in c.done_by_child:
            assert store.get_action(a["id"]).state == "compensated"
        assert store.get("uncommitted") is None
        check_committed_untouched(c, store)
    assert ws_ledger.records(c.ledger) == ledger_after_crash  # nothing ran
    assert c.child.calls_by(not_pid=c.child.proc.pid) == []

    runner = CliRunner()
    # `walstore recover PATH` lists them and exits 1 (twice: listing changes nothing)
    for _ in range(2):
        r = runner.invoke(cli_main, ["recover", c.path])
        assert r.exit_code == 1, r.output
        for aid in owed_ids:
            assert aid in r.output
    r = runner.invoke(cli_main, ["actions", c.path, "--pending", "--json"])
    assert r.exit_code == 1, r.output
    assert sorted(a["id"] for a in json.loads(r.stdout)["actions"]) == owed_ids
    assert ws_ledger.records(c.ledger) == ledger_after_crash

    # `walstore recover PATH --handlers MODULE` runs them (in a real process: the CLI)
    p = subprocess.run([sys.executable, "-m", "walstore", "recover", c.path, "--handlers",
                        HANDLERS, "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert sorted(doc["compensated"]) == owed_ids
    assert doc["pending_compensations"] == []
    check_recovery_calls(c, c.child.calls_by(not_pid=c.child.proc.pid))

    with walstore.open(c.path) as store:
        check_all_compensated_once(c, store)
        check_committed_untouched(c, store)

    # a second recovery does nothing more
    before = (ws_ledger.records(c.ledger), c.child.calls_by())
    r = runner.invoke(cli_main, ["recover", c.path, "--handlers", HANDLERS, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["compensated"] == []
    r = runner.invoke(cli_main, ["actions", c.path, "--pending", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["actions"] == []
    assert (ws_ledger.records(c.ledger), c.child.calls_by()) == before


def test_kill9_in_intent_then_resolve_by_hand(tmp_path, handlers_on_path):
    """With no compensator at all, an operator resolves the pending actions by hand."""
    c = crash(tmp_path, "intent")
    ids = [a["id"] for a in c.owed]
    runner = CliRunner()
    r = runner.invoke(cli_main, ["recover", c.path, "--json"])
    assert r.exit_code == 1
    assert sorted(json.loads(r.stdout)["pending_compensations"]) == sorted(ids)
    r = runner.invoke(cli_main, ["resolve", c.path, ids[0], "--note", "checked by hand"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_main, ["recover", c.path, "--json"])
    assert r.exit_code == 1  # one is still owed
    assert json.loads(r.stdout)["pending_compensations"] == [ids[1]]
    r = runner.invoke(cli_main, ["resolve", c.path, ids[1]])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_main, ["recover", c.path])
    assert r.exit_code == 0, r.output
    with walstore.open(c.path, compensators=dict(ws_ledger_handlers.COMPENSATORS)) as store:
        assert [store.get_action(i).state for i in ids] == ["resolved", "resolved"]
        assert store.get_action(ids[0]).error == "checked by hand"
        assert store.pending_compensations() == []
        assert store.last_recovery.compensated == []  # resolved: never compensated later
    assert c.child.calls_by(not_pid=c.child.proc.pid) == []


def test_actions_pending_right_after_a_crash_reports_the_owed_compensations(tmp_path):
    c = crash(tmp_path, "intent")
    r = CliRunner().invoke(cli_main, ["actions", c.path, "--pending", "--json"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    if "actions" in doc:
        assert {a["id"] for a in c.owed} <= {a["id"] for a in doc["actions"]}


def test_kill9_after_drop_restore_point_keeps_it_dropped(tmp_path):
    child = Child(tmp_path, "droppoint")
    try:
        child.line("COMMITTED")
        (names,) = child.line("DROPPED", 1)
        assert json.loads(names) == ["kept"]
    finally:
        child.kill()
    with walstore.open(str(child.store)) as store:
        assert sorted(store.restore_points()) == ["kept"]
        with pytest.raises(KeyError):
            store.rewind("gone")
        assert store.at("kept").get("after-points") is None
        assert store.get("after-points") == 1
