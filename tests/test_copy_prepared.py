"""CONTRACT 4.10 for two-phase commit: a copy (``backup``, ``restore``) never runs the
compensations of a transaction its source had prepared (in doubt) when it was copied.

Rolling such a transaction back in the copy (``store.rollback_prepared``, ``walstore
rollback-prepared``) rolls back its state as usual, but its side effects are the source's
(which decides its fate, maybe committing it later): its actions are listed pending and
``held`` (never run automatically, also not at a later open), its file changes are held
too (not put back: the workspace is the source's).  The fact is durable: it holds after
the copy is reopened and after a writer of the copy is killed.  A transaction prepared in
the copy itself after its first open keeps the normal behaviour (its rollback compensates).

Real files and processes: ``walstore backup``, ``walstore restore`` from a ``file://``
replica and ``walstore rollback-prepared`` run as child processes; writers of the copy are
killed with SIGKILL; the outside world is an idempotency-keyed payment ledger
(tests/agent_scripts/ws_ledger.py) with a log of compensator calls.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import walstore

TESTS = Path(__file__).resolve().parent
LEDGER_SCRIPTS = TESTS / "agent_scripts"
if str(LEDGER_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(LEDGER_SCRIPTS))

import ws_ledger  # noqa: E402
import ws_ledger_handlers  # noqa: E402

COMPS = dict(ws_ledger_handlers.COMPENSATORS)  # "refund": the ledger refund, noted in calls


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS.parent), str(LEDGER_SCRIPTS)] + ([env["PYTHONPATH"]]
                                                    if env.get("PYTHONPATH") else []))
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m walstore ARGS`` in a child process (``--handlers ws_ledger_handlers``
    importable)."""
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, env=_env(), timeout=300)


class World:
    """A source store, its payment ledger and the log of compensator calls."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = str(tmp / "source")
        self.ledger = str(tmp / "ledger.jsonl")
        self.calls = str(tmp / "calls.jsonl")

    def charge(self, tx, amount: int) -> walstore.Action:
        args = {"ledger": self.ledger, "calls": self.calls, "amount": amount}
        with tx.action("charge", args=args, compensate="refund") as act:
            act.result = ws_ledger.charge(self.ledger, act.key, amount)
        tx.put(f"paid/{act.key}", amount)
        return act

    def refunds(self) -> list[dict]:
        return [r for r in ws_ledger.records(self.ledger) if r["op"] == "refund"]

    def calls_made(self) -> list[dict]:
        return ws_ledger.records(self.calls)


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


def _prepare_in_source(w: World, gid: str = "g1", root: str | None = None):
    """The source: a committed charge, then a transaction that charges, writes a key
    (and a file in ``root``) and is prepared as ``gid``; left in doubt, the source open.
    Returns (source, the prepared transaction's action)."""
    source = walstore.open(w.path, compensators=COMPS)
    ws = source.workspace(root) if root is not None else None
    with source.transaction() as tx:
        tx.put("base", 1)
    tx = source.transaction(meta={"step": "prepared in the source"})
    act = w.charge(tx, 40)
    tx.put("base", 2)
    if ws is not None:
        tx.files(ws).write("a.txt", "prepared\n")
    tx.prepare(gid)
    return source, act


def _assert_held(copy: walstore.Store, act: walstore.Action) -> None:
    """The inherited action is owed, held, not run; the state is rolled back."""
    got = copy.get_action(act.id)
    assert got.state == "pending" and got.held, got
    assert "source" in (got.error or ""), got.error
    assert [a.id for a in copy.pending_compensations()] == [act.id]
    assert copy.get(f"paid/{act.key}") is None
    assert copy.get("base") == 1
    assert copy.prepared() == []
    assert copy.decision("g1") == "abort"


def test_backup_rollback_prepared_holds_the_inherited_compensation(w):
    """``walstore backup`` of a source with a prepared charge; the copy rolls it back:
    the refund never runs (not at the rollback, not at a reopen, not by a plain retry),
    the action is listed pending and held; the source commits it afterwards and the
    ledger holds one charge and no refund."""
    source, act = _prepare_in_source(w)
    dest = str(w.tmp / "copy")
    out = cli("backup", w.path, dest)
    assert out.returncode == 0, out.stdout + out.stderr

    with walstore.open(dest, compensators=COMPS) as copy:
        assert copy.prepared() == ["g1"]
        assert copy.get(f"paid/{act.key}") is None  # (in doubt: not visible)
        copy.rollback_prepared("g1")
        _assert_held(copy, act)
        assert copy.retry_compensations() == copy.pending_compensations()  # held: not run
    assert w.refunds() == [] and w.calls_made() == []
    for _ in range(2):  # reopened: recovery's settle does not run it either
        with walstore.open(dest, compensators=COMPS) as copy:
            _assert_held(copy, act)
    assert w.refunds() == [] and w.calls_made() == []

    # the source decides its fate: committed there, the charge stands
    source.commit_prepared("g1")
    assert source.get(f"paid/{act.key}") == 40
    source.close()
    assert [r["op"] for r in ws_ledger.records(w.ledger)] == ["charge"]

    # an operator settles the held debt knowingly
    with walstore.open(dest, compensators=COMPS) as copy:
        assert copy.resolve(act.id, "committed in the source").state == "resolved"
        assert copy.pending_compensations() == []


def test_backup_rollback_prepared_cli_lists_the_held_action(w):
    """``walstore rollback-prepared COPY GID --handlers MODULE`` on a backup (its first
    open, too): exit 1 naming the action as owed, nothing refunded; ``walstore actions
    --pending`` and ``walstore recover`` list it."""
    source, act = _prepare_in_source(w)
    source.close()  # (left in doubt)
    dest = str(w.tmp / "copy")
    out = cli("backup", w.path, dest)
    assert out.returncode == 0, out.stdout + out.stderr
    out = cli("rollback-prepared", dest, "g1", "--handlers", "ws_ledger_handlers")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rolled back" in out.stdout and act.id in out.stdout, out.stdout
    out = cli("actions", dest, "--pending")
    assert out.returncode == 1 and act.id in out.stdout, out.stdout + out.stderr
    out = cli("recover", dest, "--handlers", "ws_ledger_handlers")
    assert out.returncode == 1 and act.id in out.stdout, out.stdout + out.stderr
    # (the header said "need a compensator, --handlers MODULE", which never runs a held one)
    assert "held compensations (owed in the source store" in out.stdout, out.stdout
    assert "--handlers MODULE" not in out.stdout, out.stdout
    assert w.refunds() == [] and w.calls_made() == []
    with walstore.open(dest, compensators=COMPS) as copy:
        _assert_held(copy, act)


KILLED_COPY = textwrap.dedent("""
    import os, sys, signal
    import walstore, ws_ledger_handlers
    dest, step = sys.argv[1], sys.argv[2]
    s = walstore.open(dest, compensators=dict(ws_ledger_handlers.COMPENSATORS))
    if step == "rollback":
        s.rollback_prepared("g1")
    print("READY", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("step", ["first-open", "rollback"])
def test_inherited_survives_a_killed_writer_of_the_copy(w, step):
    """A writer of the copy killed (SIGKILL) after its first open, or after the
    rollback: the next open (recovery) still holds the inherited debt, and a rollback
    then runs no compensation."""
    source, act = _prepare_in_source(w)
    dest = str(w.tmp / "copy")
    out = cli("backup", w.path, dest)
    assert out.returncode == 0, out.stdout + out.stderr
    source.close()
    p = subprocess.run([sys.executable, "-c", KILLED_COPY, dest, step], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and "READY" in p.stdout, p.stdout + p.stderr
    with walstore.open(dest, compensators=COMPS) as copy:
        assert copy.last_recovery is not None
        if step == "first-open":
            assert copy.prepared() == ["g1"]
            copy.rollback_prepared("g1")
        _assert_held(copy, act)
    with walstore.open(dest, compensators=COMPS) as copy:
        _assert_held(copy, act)
    assert w.refunds() == [] and w.calls_made() == []


def test_a_transaction_prepared_in_the_copy_still_compensates(w):
    """The copy's own prepared transactions (after its first open; also across a
    reopen) are rolled back as anywhere: their compensation runs."""
    source, act = _prepare_in_source(w)
    dest = str(w.tmp / "copy")
    out = cli("backup", w.path, dest)
    assert out.returncode == 0, out.stdout + out.stderr
    source.close()
    w2 = World(w.tmp)
    with walstore.open(dest, compensators=COMPS) as copy:
        tx = copy.transaction()
        own = w2.charge(tx, 7)
        tx.prepare("own-1")
        copy.rollback_prepared("own-1")
        assert copy.get_action(own.id).state == "compensated"
        tx = copy.transaction()
        later = w2.charge(tx, 9)
        tx.prepare("own-2")
    assert [r["key"] for r in w.refunds()] == [own.key]
    with walstore.open(dest, compensators=COMPS) as copy:  # reopened, still in doubt
        assert copy.prepared() == ["g1", "own-2"]
        copy.rollback_prepared("own-2")
        assert copy.get_action(later.id).state == "compensated"
        copy.rollback_prepared("g1")  # the inherited one: held
        _assert_held(copy, act)
    assert sorted(r["key"] for r in w.refunds()) == sorted([own.key, later.key])
    assert act.key not in [c["key"] for c in w.calls_made()]


def test_backup_rollback_prepared_leaves_the_sources_files(w):
    """A prepared transaction that changed a file: the copy's rollback does not put it
    back (the workspace is the source's, which may still commit it); the change is held,
    not undone at a reopen either."""
    root = str(w.tmp / "ws")
    os.makedirs(root)
    with open(os.path.join(root, "a.txt"), "w") as f:
        f.write("before\n")
    source, act = _prepare_in_source(w, root=root)
    dest = str(w.tmp / "copy")
    out = cli("backup", w.path, dest)
    assert out.returncode == 0, out.stdout + out.stderr
    a_txt = os.path.join(root, "a.txt")
    with walstore.open(dest, compensators=COMPS) as copy:
        copy.rollback_prepared("g1")
        with open(a_txt) as f:
            assert f.read() == "prepared\n"  # (not put back: the source's workspace)
        _assert_held(copy, act)
    with walstore.open(dest, compensators=COMPS) as copy:
        _assert_held(copy, act)
    with open(a_txt) as f:
        assert f.read() == "prepared\n"
    source.commit_prepared("g1")
    source.close()
    with open(a_txt) as f:
        assert f.read() == "prepared\n"
    assert w.refunds() == [] and w.calls_made() == []


REPLICATED_SOURCE = textwrap.dedent("""
    import sys, time
    import walstore, ws_ledger
    path, url, ledger, calls = sys.argv[1:5]
    s = walstore.open(path, replicate_to=url, replicate_options={"interval": 0.05})
    with s.transaction() as tx:
        tx.put("base", 1)
    tx = s.transaction()
    args = {"ledger": ledger, "calls": calls, "amount": 40}
    with tx.action("charge", args=args, compensate="refund") as act:
        act.result = ws_ledger.charge(ledger, act.key, 40)
    tx.put("paid/" + act.key, 40)
    tx.put("base", 2)
    tx.prepare("g1")
    s.sync_replica(timeout=60)
    print("READY", act.id, act.key, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("compensate", [False, True])
def test_restore_rollback_prepared_holds_the_inherited_compensation(w, compensate):
    """``walstore restore`` from a ``file://`` replica of a source (killed) with a
    prepared charge: rolling it back in the restored store runs no refund, the action
    held; with ``--compensate`` (the source machine is gone, run what it owed) the
    rollback compensates as anywhere."""
    url = "file://" + str(w.tmp / "rep")
    p = subprocess.Popen([sys.executable, "-c", REPLICATED_SOURCE, w.path, url, w.ledger,
                          w.calls], stdout=subprocess.PIPE, env=_env(), text=True)
    try:
        line = p.stdout.readline().split()
        assert line and line[0] == "READY", line
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    aid, key = line[1], line[2]
    dest = str(w.tmp / "restored")
    args = ["restore", url, dest] + (["--compensate", "--handlers", "ws_ledger_handlers"]
                                     if compensate else [])
    out = cli(*args)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    with walstore.open(dest, compensators=COMPS) as copy:
        assert copy.prepared() == ["g1"]
        copy.rollback_prepared("g1")
        got = copy.get_action(aid)
        assert copy.get(f"paid/{key}") is None and copy.get("base") == 1
        if compensate:
            assert got.state == "compensated"
        else:
            assert got.state == "pending" and got.held
    with walstore.open(dest, compensators=COMPS) as copy:
        assert copy.get_action(aid).state == ("compensated" if compensate else "pending")
    assert [r["key"] for r in w.refunds()] == ([key] if compensate else [])
