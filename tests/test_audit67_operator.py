"""The operator verbs in anger (probe-audit67): a real writer process charges an outside,
fsynced ledger (``agent_scripts/ws_ledger.py``, refunded by ``ws_ledger_handlers``) in
each transaction; then a verb runs as a real `walstore` process, is killed (SIGKILL at a
named fault point of its own, or SIGINT), run again, and the store, `walstore verify`
and the ledger must agree: every visible charge committed, every undone one refunded
exactly once, every acknowledged commit kept, and each run's answer saying what it did
or why it did not."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import walstore
from store_support import cli_env, ctrl_c_reaches_it, files_with

SCRIPTS = Path(__file__).resolve().parent / "agent_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ws_ledger  # noqa: E402

HANDLERS = str(SCRIPTS / "ws_ledger_handlers.py")

# The writer: N transactions, each charging the ledger in an action (refund: its
# compensator) and writing its evidence key ev/<action key>; "ACK txid" once each commit
# returned.
WRITER = r"""
import sys, walstore, ws_ledger
path, ledger, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def refund(a):
    ws_ledger.refund(a.args["ledger"], a.key)
with walstore.open(path, compensators={"refund": refund}) as s:
    for i in range(n):
        with s.transaction(meta={"i": i}) as tx:
            with tx.action("charge", args={"ledger": ledger, "calls": ledger + ".calls",
                                           "amount": i + 1}, compensate="refund") as a:
                a.result = ws_ledger.charge(ledger, a.key, i + 1)
            tx.put(f"ev/{a.key}", i + 1)
        print("ACK", tx.id, flush=True)
    if sys.argv[4:] == ["prepare"]:  # then a charge prepared as gid g1, left in doubt
        tx = s.transaction()
        with tx.action("charge", args={"ledger": ledger, "amount": 99},
                       compensate="refund") as a:
            a.result = ws_ledger.charge(ledger, a.key, 99)
        tx.put(f"ev/{a.key}", 99)
        tx.prepare("g1")
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
"""

# The CLI, sent a signal (SIGKILL, SIGINT) at the named fault point's first passage.
SIGNALLED_AT = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
point, sig = sys.argv[1], getattr(signal, sys.argv[2])
class SignalAt(fileio.OSBackend):
    sent = False
    def fault_point(self, name):
        if name == point and not self.sent:
            self.sent = True
            os.kill(os.getpid(), sig)
fileio.set_backend(SignalAt())
main(sys.argv[3:])
"""


def _env() -> dict:
    env = cli_env()
    env["PYTHONPATH"] = str(SCRIPTS) + os.pathsep + env["PYTHONPATH"]
    return env


def cli(*args: str, killed_at: str | None = None,
        sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    pre = ["-c", SIGNALLED_AT, killed_at, sig] if killed_at else ["-m", "walstore"]
    return subprocess.run([sys.executable, *pre, *args], capture_output=True, text=True,
                          env=_env(), timeout=60, preexec_fn=ctrl_c_reaches_it)


def charged_store(tmp_path, n: int = 4, *then: str) -> tuple[str, str, list[int]]:
    """(store, ledger, acknowledged txids): the writer's work, its process ended
    (``then`` "prepare": killed with a charge prepared as g1)."""
    path, ledger = str(tmp_path / "s"), str(tmp_path / "ledger")
    w = subprocess.run([sys.executable, "-c", WRITER, path, ledger, str(n), *then],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert w.returncode == (-signal.SIGKILL if then else 0), w.stderr
    return path, ledger, [int(x.split()[1]) for x in w.stdout.splitlines()]


def assert_agree(path: str, ledger: str, acked: list[int]) -> None:
    """`verify` passes, and the store and the ledger agree (see the module's doc)."""
    v = cli("verify", path, "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], (v.stdout, v.stderr)
    recs = ws_ledger.records(ledger)
    ops = Counter((r["op"], r["key"]) for r in recs)
    with walstore.open(path, readonly=True) as s:
        assert set(acked) <= {i.txid for i in s.log(limit=None)}
        actions = {a.key: a for a in s.actions()}
        assert {r["key"] for r in recs} <= set(actions)
        for key, a in actions.items():
            shown = s.get(f"ev/{key}") is not None
            want = {"committed": (1, 0, True), "compensated": (1, 1, False)}[a.state]
            assert (ops["charge", key], ops["refund", key], shown) == want, (a, ops)


def recover_refunds_once(path: str, ledger: str, acked: list[int], action: str) -> None:
    """`walstore recover --handlers` succeeds, the store and the ledger then agree, and
    ``action``'s compensation ran (its state "compensated")."""
    rec = cli("recover", path, "--handlers", HANDLERS, "--json")
    assert rec.returncode == 0, (rec.stdout, rec.stderr)
    assert_agree(path, ledger, acked)
    with walstore.open(path, readonly=True) as s:
        assert s.get_action(action).state == "compensated"


def test_a_revert_run_again_says_it_was_undone_already_not_use_cascade(tmp_path):
    """A `revert` killed after its commit (its refund not run), then run again as an
    operator does: it refuses the crashed store (run `recover`), `recover --handlers`
    runs the refund once, and the revert run again then said "transaction 2 cannot be
    reverted alone: later transactions [5] changed the same keys or files (use --cascade
    to revert them too)" — 5 being its own revert; following that advice committed an
    undo of both.  It says the transaction was undone already, and by which."""
    path, ledger, acked = charged_store(tmp_path)
    r = cli("revert", path, "2", "--handlers", HANDLERS, killed_at="commit.after_durable")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    again = cli("revert", path, "2", "--handlers", HANDLERS)
    assert again.returncode == 1 and "walstore recover" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    rec = cli("recover", path, "--handlers", HANDLERS, "--json")
    assert rec.returncode == 0, (rec.stdout, rec.stderr)
    assert json.loads(rec.stdout)["compensated"] == ["2.1"]
    again = cli("revert", path, "2", "--handlers", HANDLERS, "--json")
    assert again.returncode == 1, (again.stdout, again.stderr)
    error = json.loads(again.stdout)["error"]
    assert error["type"] == "RevertConflict", error
    assert "undone already, by transaction(s) [5]" in error["message"], error
    assert "--cascade" not in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    with walstore.open(path, readonly=True) as s:
        assert [i.txid for i in s.log()][:2] == [5, 4]  # (nothing more committed)
    assert_agree(path, ledger, acked)


# The CLI, sent SIGINT (Ctrl-C) at its first LMDB commit once the restore's staged copy
# was renamed into place: in the open that recovers DEST.
INTERRUPTED_IN_FIRST_OPEN = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
class CtrlC(fileio.OSBackend):
    installed = False
    def fault_point(self, name):
        self.installed = self.installed or name == "restore.install"
    def lmdb_io(self, op, path):
        if self.installed:
            self.installed = False
            os.kill(os.getpid(), signal.SIGINT)
fileio.set_backend(CtrlC())
main(sys.argv[1:])
"""


def test_a_restore_interrupted_once_dest_is_restored_says_so(tmp_path):
    """Ctrl-C in the open that recovers a restored DEST (the copy complete, renamed
    into place) said "restore interrupted (Ctrl-C)", as of a copy cut short, and the
    restore run again refused DEST ("exists and is not empty", exit 2).  It says DEST
    was restored and that `walstore recover DEST` finishes it, exit 130, its --json
    document parseable; that recover does, and DEST holds the source's state."""
    path, ledger, acked = charged_store(tmp_path)
    url, dest = (tmp_path / "rep").as_uri(), str(tmp_path / "dest")
    r = cli("replicate", path, url, "--once")
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_IN_FIRST_OPEN, "restore", url,
                        dest, "--json"], capture_output=True, text=True, env=_env(),
                       timeout=60, preexec_fn=ctrl_c_reaches_it)
    assert r.returncode == 130, (r.returncode, r.stderr)
    error = json.loads(r.stdout)["error"]
    assert error["type"] == "KeyboardInterrupt" and error["exit"] == 130, error
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"after {dest} was restored" in line and f"walstore recover {dest}" in line, line
    again = cli("restore", url, dest)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    rec = cli("recover", dest)
    assert rec.returncode == 0, (rec.stdout, rec.stderr)
    assert_agree(dest, ledger, acked)
    with walstore.open(path, readonly=True) as s, walstore.open(dest, readonly=True) as c:
        assert dict(c.scan()) == dict(s.scan())


# The CLI, sent SIGINT (Ctrl-C) as it syncs the directory holding DEST: the backup's last
# step, its complete copy just renamed into place.
INTERRUPTED_AT_LAST_SYNC = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
parent = os.path.dirname(os.path.abspath(sys.argv[3]))
class CtrlC(fileio.OSBackend):
    def fsync_dir(self, path):
        super().fsync_dir(path)
        if os.path.abspath(path) == parent:
            os.kill(os.getpid(), signal.SIGINT)
fileio.set_backend(CtrlC())
main(sys.argv[1:])
"""


def test_a_backup_interrupted_once_its_copy_is_in_place_says_dest_holds_it(tmp_path):
    """Ctrl-C at a backup's last step (its complete copy renamed into place, the parent
    directory being synced) said "backup interrupted (Ctrl-C)" — and docs/CLI.md that an
    interrupted backup leaves DEST as it was — while DEST held the complete backup (the
    rename not yet synced when the interrupt came between the two), and the backup run
    again refused DEST as not empty.  The rename and its sync are one step now, and the
    line says DEST holds the backup (exit 130, a --json document)."""
    path, ledger, acked = charged_store(tmp_path)
    dest = str(tmp_path / "bk")
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_AT_LAST_SYNC, "backup", path, dest,
                        "--json"], capture_output=True, text=True, env=_env(), timeout=60,
                       preexec_fn=ctrl_c_reaches_it)
    assert r.returncode == 130, (r.returncode, r.stderr)
    error = json.loads(r.stdout)["error"]
    assert error["type"] == "KeyboardInterrupt", error
    line = r.stderr.strip()
    assert line == (f"walstore: backup interrupted (Ctrl-C) once its copy was complete: "
                    f"{dest} holds the backup"), line
    assert_agree(dest, ledger, acked)
    with walstore.open(path, readonly=True) as s, walstore.open(dest, readonly=True) as c:
        assert dict(c.scan()) == dict(s.scan())


# A writer SIGKILLed right after its purge's commit is durable: the purge stands, its
# erasure (the old bytes' removal, LMDB's compaction) owed to the next open.
PURGE_KILLED_AFTER_COMMIT = r"""
import os, signal, sys, walstore
from walstore import fileio
class KillAfterCommit(fileio.OSBackend):
    armed = False
    def fault_point(self, name):
        if self.armed and name == "commit.after_durable":
            os.kill(os.getpid(), signal.SIGKILL)
backend = KillAfterCommit()
fileio.set_backend(backend)
s = walstore.open(sys.argv[1])
backend.armed = True
s.purge("ev/")
"""


def test_a_backup_after_a_purge_holds_none_of_its_erased_bytes(tmp_path):
    """A backup made after a purge committed, its erasure still owed in the source (a
    writer killed between the purge's commit and its compacting checkpoint; a purge
    running beside the backup hit the same window): the copy showed none of the purged
    keys, yet its WAL segment and data.mdb held their bytes until its first writable
    open (a backup kept cold never had one).  The backup finishes the erasure in its
    staged copy, before DEST exists, as a restore does."""
    path, ledger, acked = charged_store(tmp_path)
    w = subprocess.run([sys.executable, "-c", PURGE_KILLED_AFTER_COMMIT, path],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert w.returncode == -signal.SIGKILL, w.stderr
    assert files_with(path, b"ev/ws-")  # (the source owes the erasure: its next open)
    dest = str(tmp_path / "bk")
    r = cli("backup", path, dest, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert files_with(dest, b"ev/ws-") == []
    v = cli("verify", dest, "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], (v.stdout, v.stderr)
    with walstore.open(dest, readonly=True) as c:
        assert list(c.scan(prefix="ev/")) == []
        assert {a.state for a in c.actions()} == {"committed"}
        assert set(acked) <= {i.txid for i in c.log(limit=None)}


def test_a_revert_interrupted_after_its_commit_says_it_committed(tmp_path):
    """Ctrl-C once a revert's undo committed (its refund not run yet; most of a revert's
    time is its compensations) said "revert interrupted (Ctrl-C)", as before the
    commit: the operator could not tell the state was reverted, nor that a refund was
    owed (`purge` says so since audit 60).  It says what committed and what is owed,
    exit 130, its --json document parseable; `recover --handlers` then refunds once."""
    path, ledger, acked = charged_store(tmp_path)
    r = cli("revert", path, "2", "--handlers", HANDLERS, "--json",
            killed_at="commit.after_durable", sig="SIGINT")
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert json.loads(r.stdout)["error"]["type"] == "KeyboardInterrupt"
    assert r.stderr.strip() == (
        f"walstore: revert committed (transaction 5, undoing transactions [2]), then was "
        f"interrupted (Ctrl-C); 1 compensation(s) not run yet are owed: `walstore recover "
        f"{path} --handlers MODULE` runs them"), r.stderr
    recover_refunds_once(path, ledger, acked, "2.1")


def test_a_rollback_prepared_interrupted_once_decided_says_it_rolled_back(tmp_path):
    """Ctrl-C once `rollback-prepared` had decided (its ROLLBACK durable, the refund
    not run yet) said "rollback-prepared interrupted (Ctrl-C)", as before the decision.
    It says the gid was rolled back and the refund is owed, exit 130; `recover
    --handlers` then refunds once."""
    path, ledger, acked = charged_store(tmp_path, 4, "prepare")
    r = cli("rollback-prepared", path, "g1", "--handlers", HANDLERS,
            killed_at="rollback_prepared.decided", sig="SIGINT")
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == (
        f"walstore: rollback-prepared: rolled back g1, then was interrupted (Ctrl-C); 1 "
        f"compensation(s) not run yet are owed: `walstore recover {path} --handlers "
        f"MODULE` runs them"), r.stderr
    recover_refunds_once(path, ledger, acked, "5.1")
    with walstore.open(path, readonly=True) as s:
        assert s.prepared() == []
