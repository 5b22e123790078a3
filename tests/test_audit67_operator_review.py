"""Review of the operator-verb changes of probe-audit67 (test_audit67_operator): each
change tried against what it must not do.

Findings (each test's docstring says what was seen before its fix):
- revert's new "was undone already" refusal was said of a transaction a *scoped* undo
  had taken back only in part (its keys outside the scope still stood): the operator
  was told there was nothing left to revert;
- and it was not said after a rewind, or a cascade revert, that undid the transaction
  together with a later one: the old advice ("use cascade=True") came back;
- `rollback-prepared` interrupted as its store closed did not say the compensations it
  left owed; in a copy, interrupted once decided, it named `walstore recover` as running
  the refunds it holds (never run there);
- a backup into a mount point interrupted while moving its copy up left DEST half
  filled, said interrupted, and the next backup refused DEST;
- a backup that finished a purge's erasure in its staged copy shipped that open's
  16 MiB spare segment.
Found right: the staged copy's writable open touches none of the source's workspace
files nor its ledger, and a purge erased between the backup's hold and its snapshot
leaves none of its bytes in the copy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import walstore
from store_support import ctrl_c_reaches_it, files_with
from test_audit67_operator import (HANDLERS, PURGE_KILLED_AFTER_COMMIT, _env, assert_agree,
                                   charged_store, cli, ws_ledger)
from walstore.errors import RevertConflict


@pytest.mark.parametrize("undo", ["rewind", "revert"])
def test_a_revert_after_a_scoped_undo_is_never_told_nothing_is_left(store, undo):
    """T wrote a/x and b/y; a revert or rewind scoped to "a/" took a/x back, b/y stood.
    An unscoped revert of T then said "transaction T was undone already ... nothing is
    left to revert" (RevertConflict), b/y still holding T's value.  It is not said of a
    transaction undone in part: the revert goes on as before that change did."""
    with store.transaction() as tx:
        tx.put("base", 0)
    with store.transaction() as tx:
        tx.put("a/x", 1)
        tx.put("b/y", 1)
    t = tx.id
    if undo == "rewind":
        store.rewind(t - 1, scope="a/")
    else:
        store.revert(t, scope="a/")
    assert dict(store.scan()) == {"base": 0, "b/y": 1}
    try:
        store.revert(t)
    except RevertConflict as e:
        assert "undone already" not in str(e), e
    else:
        assert dict(store.scan()) == {"base": 0}


@pytest.mark.parametrize("undo", ["rewind", "cascade"])
def test_a_revert_of_what_a_rewind_or_cascade_undid_says_it_was_undone(store, undo):
    """T and then W wrote k (T also own); a rewind to before T (or a cascade revert of T) undid both
    as transaction U.  A revert of W said "W was undone already, by [U]", but a revert
    of T said "cannot be reverted alone: later transactions [U, W] changed the same keys
    (use cascade=True)" — W being undone by U as well; the advice committed an undo of
    all three.  It says T was undone already, by U."""
    with store.transaction() as tx:
        tx.put("base", 0)
    with store.transaction() as tx:
        tx.put("k", 1)
        tx.put("own", 1)  # (a rewind lists T among those it undid: not all shadowed by W)
    t = tx.id
    with store.transaction() as tx:
        tx.put("k", 2)
    u = (store.rewind(t - 1) if undo == "rewind" else store.revert(t, cascade=True)).txid
    for txid in (t, t + 1):
        with pytest.raises(RevertConflict, match=rf"transaction {txid} was undone already, "
                                                 rf"by transaction\(s\) \[{u}\]"):
            store.revert(txid)
    assert dict(store.scan()) == {"base": 0}
    assert [i.txid for i in store.log(limit=1)] == [u]


def test_a_revert_of_a_reverted_revert_is_not_undone_already(store):
    """T reverted by U, U reverted by V (T's value back): T stands, and a revert of it
    is not refused as undone already (found right: the later writers [V, U] named)."""
    with store.transaction() as tx:
        tx.put("k", 1)
    t = tx.id
    u = store.revert(t).txid
    store.revert(u)
    assert store.get("k") == 1
    with pytest.raises(RevertConflict) as e:
        store.revert(t)
    assert "undone already" not in str(e.value), e.value


# The CLI, sent SIGINT (Ctrl-C) at its first LMDB write made by Store.close() once the
# GID was decided: the command's store closing, its answer not printed yet.
INTERRUPTED_AS_IT_CLOSES = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
class CtrlC(fileio.OSBackend):
    decided = sent = False
    def fault_point(self, name):
        self.decided = self.decided or name == "rollback_prepared.decided"
    def lmdb_io(self, op, path):
        f = sys._getframe()
        while f is not None and not (f.f_code.co_name == "close"
                                     and f.f_code.co_filename.endswith("store.py")):
            f = f.f_back
        if self.decided and not self.sent and f is not None:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
fileio.set_backend(CtrlC())
main(sys.argv[1:])
"""


def test_a_rollback_prepared_interrupted_as_it_closes_says_what_is_owed(tmp_path):
    """`rollback-prepared` without --handlers leaves the refund owed (its answer lists it,
    exit 1).  A Ctrl-C as its store closed, the rollback decided, said only "rolled
    back g1, then was interrupted (Ctrl-C)": the refund owed unsaid, as the interrupt
    inside the rollback says it.  It says 1 compensation is owed and how to run it."""
    path, ledger, acked = charged_store(tmp_path, 2, "prepare")
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_AS_IT_CLOSES, "rollback-prepared",
                        path, "g1"], capture_output=True, text=True, env=_env(), timeout=60,
                       preexec_fn=ctrl_c_reaches_it)
    assert r.returncode == 130, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == (
        f"walstore: rollback-prepared: rolled back g1, then was interrupted (Ctrl-C); 1 "
        f"compensation(s) not run yet are owed: `walstore recover {path} --handlers "
        f"MODULE` runs them"), r.stderr
    rec = cli("recover", path, "--handlers", HANDLERS, "--json")
    assert rec.returncode == 0 and json.loads(rec.stdout)["compensated"] == ["3.1"], rec
    assert_agree(path, ledger, acked)


# The CLI, sent SIGINT (Ctrl-C) as the backup moves its complete copy up into DEST (a
# mount point's root: staged inside it), at the first entry moved.
INTERRUPTED_MOVING_UP = r"""
import os, signal, sys
from walstore import fileio
from walstore.cli import main
dest = os.path.abspath(sys.argv[3])
class CtrlC(fileio.OSBackend):
    sent = False
    def rename(self, src, dst):
        super().rename(src, dst)
        if not self.sent and os.path.dirname(os.path.abspath(dst)) == dest:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
fileio.set_backend(CtrlC())
main(sys.argv[1:])
"""


def test_a_backup_into_a_mount_point_interrupted_moving_up_leaves_dest_whole_or_empty(
        tmp_path, mount_tmpfs):
    """Ctrl-C as a backup into an empty mount point moved its copy up (entry by entry,
    STORE last) left DEST holding some of the copy and no STORE: "backup interrupted
    (Ctrl-C)" (docs/CLI.md: DEST stays as it was), and the backup run again refused
    DEST as not empty.  The move is one step, as the rename beside it is (c20c4bf): the
    Ctrl-C lands after it, DEST holds the backup and the line says so."""
    path, ledger, acked = charged_store(tmp_path)
    dest = str(mount_tmpfs("64m"))
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_MOVING_UP, "backup", path, dest],
                       capture_output=True, text=True, env=_env(), timeout=60,
                       preexec_fn=ctrl_c_reaches_it)
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip() == (f"walstore: backup interrupted (Ctrl-C) once its copy was "
                                f"complete: {dest} holds the backup"), r.stderr
    assert_agree(dest, ledger, acked)


def test_a_backup_that_finished_a_purges_erasure_holds_no_spare_segment(tmp_path):
    """A backup made while a purge's erasure was owed finishes it in its staged copy by
    opening it (510ac4e): that open's background spare segment (wal/spare.tmp, 16 MiB of
    zeros by default) went into the backup — 16 MiB more than the source's copy holds,
    in every such backup (a backup never held one before).  It is left out; the copy
    opens and verifies as before, and its first writable open makes its own."""
    path, ledger, acked = charged_store(tmp_path)
    w = subprocess.run([sys.executable, "-c", PURGE_KILLED_AFTER_COMMIT, path],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert w.returncode == -signal.SIGKILL, w.stderr
    dest = str(tmp_path / "bk")
    r = cli("backup", path, dest, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert sorted(os.listdir(os.path.join(dest, "wal"))) == [
        n for n in sorted(os.listdir(os.path.join(dest, "wal"))) if n.endswith(".wal")]
    assert files_with(dest, b"ev/ws-") == []
    v = cli("verify", dest, "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], (v.stdout, v.stderr)
    with walstore.open(dest) as c:
        assert list(c.scan(prefix="ev/")) == []
        assert set(acked) <= {i.txid for i in c.log(limit=None)}


# A writer that holds secret keys, then purges them (erasure and all) when told to, and
# stays alive until told to close.
PURGE_WHEN_TOLD = r"""
import os, sys, time, walstore
path, gate = sys.argv[1], sys.argv[2]
with walstore.open(path) as s:
    for i in range(3):
        with s.transaction() as tx:
            tx.put(f"sec/{i}", "secret-%d" % i)
    with s.transaction() as tx:
        tx.put("keep", 1)
    print("READY", flush=True)
    while not os.path.exists(gate + ".purge"):
        time.sleep(0.01)
    s.purge("sec/")
    open(gate + ".purged", "w").close()
    while not os.path.exists(gate + ".end"):
        time.sleep(0.01)
"""

# The CLI, its backup letting that writer purge once it holds the WAL segments and before
# it takes LMDB's snapshot: the whole erasure falls between the two.
PURGED_BETWEEN_HOLD_AND_SNAPSHOT = r"""
import os, sys, time
from walstore import fileio
from walstore.cli import main
gate = sys.argv[1]
class PurgeNow(fileio.OSBackend):
    done = False
    def fault_point(self, name):
        if name == "backup.segments_held" and not self.done:
            self.done = True
            open(gate + ".purge", "w").close()
            while not os.path.exists(gate + ".purged"):
                time.sleep(0.01)
fileio.set_backend(PurgeNow())
main(sys.argv[2:])
"""


def test_a_purge_erased_between_the_backups_hold_and_snapshot_leaves_none_in_it(tmp_path):
    """Found right.  The backup holds the WAL segments (the purged keys' bytes among
    them), then a live writer's purge runs its whole erasure (new segment, old ones
    removed, LMDB compacted, the erasure no longer owed), then the snapshot: the purge's
    COMMIT lies below the snapshot's LSN, so the copied log's check (``item.lsn >=
    applied``) does not count it — yet the copy holds none of the purged bytes: the
    backup's LMDB handle is the one opened before the compaction's swap, which still
    owes the erasure, and the staged copy finishes it."""
    path, gate = str(tmp_path / "s"), str(tmp_path / "gate")
    w = subprocess.Popen([sys.executable, "-c", PURGE_WHEN_TOLD, path, gate],
                         stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert w.stdout.readline().strip() == "READY"
        dest = str(tmp_path / "bk")
        r = subprocess.run([sys.executable, "-c", PURGED_BETWEEN_HOLD_AND_SNAPSHOT, gate,
                            "backup", path, dest, "--json"], capture_output=True, text=True,
                           env=_env(), timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert os.path.exists(gate + ".purged")
    finally:
        open(gate + ".end", "w").close()
        assert w.wait(timeout=60) == 0
    assert files_with(dest, b"secret-") == []
    with walstore.open(dest, readonly=True) as c:
        assert dict(c.scan()) == {"keep": 1}


# A live writer: a charge and a file write in a transaction still open (thread T), a
# watch() still open with a file changed under it (thread W), and a purge whose COMMIT
# is durable, held there (the erasure owed) until the gate opens; then all commit.
BUSY_WRITER = r"""
import os, sys, threading, time, walstore, ws_ledger
from walstore import fileio
path, ledger, root, root2, gate = sys.argv[1:6]
def wait_gate():
    while not os.path.exists(gate):
        time.sleep(0.01)
class HoldPurge(fileio.OSBackend):
    armed = False
    def fault_point(self, name):
        if (self.armed and name == "commit.after_durable"
                and threading.current_thread() is threading.main_thread()):
            self.armed = False
            print("PURGED", flush=True)
            wait_gate()
backend = HoldPurge()
fileio.set_backend(backend)
def refund(a):
    ws_ledger.refund(a.args["ledger"], a.key)
s = walstore.open(path, compensators={"refund": refund})
ws, ws2 = s.workspace(root), s.workspace(root2)
with s.transaction() as tx:
    tx.files(ws).write("a.txt", "v1\n")
for i in range(3):
    with s.transaction() as tx:
        tx.put(f"sec/{i}", "secret-%d" % i)
started = [threading.Event(), threading.Event()]
def charge():
    with s.transaction() as tx:
        with tx.action("charge", args={"ledger": ledger, "amount": 7},
                       compensate="refund") as a:
            a.result = ws_ledger.charge(ledger, a.key, 7)
        tx.files(ws).write("a.txt", "T\n")
        started[0].set()
        wait_gate()
def watch():
    with s.transaction() as tx:
        with tx.files(ws2).watch():
            with open(os.path.join(root2, "w.txt"), "w") as f:
                f.write("W\n")
            started[1].set()
            wait_gate()
threads = [threading.Thread(target=charge), threading.Thread(target=watch)]
for t, e in zip(threads, started):
    t.start()
    e.wait()
backend.armed = True
s.purge("sec/")
for t in threads:
    t.join()
s.close()
"""


def _tree(*roots: str) -> dict:
    return {os.path.join(d, n): open(os.path.join(d, n), "rb").read()
            for r in roots for d, _sub, names in os.walk(r) for n in names}


def test_a_backup_finishing_an_erasure_never_touches_the_sources_files_or_ledger(tmp_path):
    """Found right.  The backup opens its staged copy writable when a purge's erasure is
    owed (510ac4e); the copy's workspaces are the source's real directories and its
    in-flight transactions the source's live ones.  With a charge and a file write in
    flight, a watch() open over a changed file and a purge durable but not erased, the
    backup changes no file of the source's workspaces and refunds nothing; the source's
    transactions then commit (one charge, no refund, its files as written) and the copy
    holds the charge as a held debt that its first open with the compensator leaves."""
    path, ledger = str(tmp_path / "s"), str(tmp_path / "ledger")
    root, root2, gate = (str(tmp_path / n) for n in ("root", "root2", "gate"))
    os.makedirs(root)
    os.makedirs(root2)
    w = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, path, ledger, root, root2, gate],
                         stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert w.stdout.readline().strip() == "PURGED"
        before, charges = _tree(root, root2), ws_ledger.records(ledger)
        assert before == {os.path.join(root, "a.txt"): b"T\n",
                          os.path.join(root2, "w.txt"): b"W\n"} and len(charges) == 1
        dest = str(tmp_path / "bk")
        r = cli("backup", path, dest, "--json")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert _tree(root, root2) == before and ws_ledger.records(ledger) == charges
    finally:
        open(gate, "w").close()
        assert w.wait(timeout=60) == 0
    assert _tree(root, root2) == before and ws_ledger.records(ledger) == charges
    assert files_with(dest, b"secret-") == []
    refunds = []
    with walstore.open(dest, compensators={"refund": refunds.append}) as c:
        (a,) = c.actions()
        assert (a.key, a.state, a.held) == (charges[0]["key"], "pending", True)
        assert "sec/0" not in dict(c.scan())
    assert refunds == [] and _tree(root, root2) == before


def test_a_backup_finishing_an_erasure_keeps_the_sources_in_doubt_charge_held(tmp_path):
    """Found right.  A charge prepared (g1, in doubt) in the source, then a purge killed
    after its commit: the backup opens its staged copy to erase; g1 stays in doubt in
    DEST, and rolling it back there (with the compensator given) holds the refund as
    the source's debt, never runs it."""
    path, ledger, acked = charged_store(tmp_path, 2, "prepare")
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.put("sec/x", "secret-x")
    s.close()
    w = subprocess.run([sys.executable, "-c", PURGE_KILLED_AFTER_COMMIT.replace(
        's.purge("ev/")', 's.purge("sec/")'), path], capture_output=True, text=True,
        env=_env(), timeout=60)
    assert w.returncode == -signal.SIGKILL, w.stderr
    dest = str(tmp_path / "bk")
    r = cli("backup", path, dest)
    assert r.returncode == 0, r.stderr
    assert files_with(dest, b"secret-x") == []
    rb = cli("rollback-prepared", dest, "g1", "--handlers", HANDLERS)
    assert rb.returncode == 1 and "held compensations" in rb.stdout, (rb.stdout, rb.stderr)
    assert [r["op"] for r in ws_ledger.records(ledger)] == ["charge"] * 3


def test_a_rollback_prepared_of_a_copys_inherited_gid_interrupted_names_no_recover(tmp_path):
    """In a backup, g1 was prepared in the source: rolling it back holds its refund
    (never run here; `walstore resolve` once handled where it ran).  A Ctrl-C once it
    was decided said "1 compensation(s) not run yet are owed: `walstore recover DEST
    --handlers MODULE` runs them" — that recover runs none (it lists the refund held).
    It says the refund is held and never run here."""
    path, ledger, acked = charged_store(tmp_path, 2, "prepare")
    dest = str(tmp_path / "bk")
    assert cli("backup", path, dest).returncode == 0
    r = cli("rollback-prepared", dest, "g1", "--handlers", HANDLERS,
            killed_at="rollback_prepared.decided", sig="SIGINT")
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == (
        "walstore: rollback-prepared: rolled back g1, then was interrupted (Ctrl-C); 1 held "
        "compensation(s), owed in the source store when it was copied, are never run here "
        "(`walstore resolve` once handled where they ran)"), r.stderr
    rec = cli("recover", dest, "--handlers", HANDLERS, "--json")
    assert json.loads(rec.stdout)["compensated"] == [], rec.stdout
    assert [r["op"] for r in ws_ledger.records(ledger)] == ["charge"] * 3
