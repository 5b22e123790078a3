"""Two-phase commit: tx.prepare(gid), in-doubt transactions, their CLI (CONTRACT.md section 2).

A prepared transaction is durable as soon as ``prepare`` returns: a real child process
prepares and is killed with SIGKILL, and the parent checks what a later session sees — the
gid in doubt, its writes invisible, its keys held against conflicting transactions, and
``commit_prepared`` / ``rollback_prepared`` deciding it (from the API and the CLI).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli

SCRIPTS = Path(__file__).resolve().parent / "twophase_scripts"
GID = "pay-42"


def _open(path, **kw):
    kw.setdefault("durability", "full")
    return walstore.open(str(path), **kw)


def _seed(path) -> None:
    with _open(path) as s:
        with s.transaction() as tx:
            tx.put("acct/a", 100)
            tx.put("acct/b", 7)
            tx.put("ro/key", "read-only")
            tx.put("gone", "still here")


def _prepare_in_child(path, gid=GID, at="after-prepare") -> str:
    """Run prepare_and_die.py; check it died by SIGKILL at the right moment."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "prepare_and_die.py"), str(path), gid,
                           "--at", at], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.fixture
def crashed(tmp_path):
    """A store whose writer prepared GID and was killed -9 right after prepare returned."""
    path = tmp_path / "store"
    _seed(path)
    out = _prepare_in_child(path)
    assert "PREPARED" in out
    return path


def _state(s) -> dict:
    return {k: s.get(k) for k in ("acct/a", "acct/b", "ro/key", "gone", "new/key")}


BEFORE = {"acct/a": 100, "acct/b": 7, "ro/key": "read-only", "gone": "still here",
          "new/key": None}
AFTER = {"acct/a": 150, "acct/b": 7, "ro/key": "read-only", "gone": None,
         "new/key": {"from": "prepared"}}


# ---- durability of prepare -----------------------------------------------------------------

def test_prepare_survives_sigkill_in_doubt_and_invisible(crashed):
    with _open(crashed) as s:
        assert s.last_recovery.in_doubt == [GID]
        assert s.prepared() == [GID]
        assert s.decision(GID) == "prepared"
        assert _state(s) == BEFORE
        assert dict(s.scan(prefix="new/")) == {}
        tx = s.transaction()  # inside a transaction too (it may not commit: see below)
        assert tx.get("new/key") is None and tx.get("acct/a") == 100
        tx.rollback()
    # recovery is repeatable: a second and third open find the same in-doubt transaction
    for _ in range(2):
        with _open(crashed) as s:
            assert s.prepared() == [GID]
            assert _state(s) == BEFORE


def test_prepare_durable_when_killed_before_its_lmdb_row(tmp_path):
    """Killed after the PREPARE record is fsynced, before the LMDB row: the WAL suffices."""
    path = tmp_path / "store"
    _seed(path)
    out = _prepare_in_child(path, at="before-prepared-row")
    assert "PREPARE-LOGGED" in out and "PREPARED" not in out.replace("PREPARE-LOGGED", "")
    with _open(path) as s:
        assert s.prepared() == [GID]
        assert _state(s) == BEFORE
        with pytest.raises(walstore.ConflictError):
            with s.transaction() as tx:
                tx.put("new/key", "intruder")
        s.commit_prepared(GID)
        assert _state(s) == AFTER
    with _open(path) as s:
        assert s.prepared() == [] and _state(s) == AFTER


CONFLICTS = {
    "read a written key": lambda tx: (tx.get("acct/a"), tx.put("other", 1)),
    "read-only txn reading a written key": lambda tx: tx.get("new/key"),
    "membership test of a written key": lambda tx: ("gone" in tx),
    "blind write of a written key": lambda tx: tx.put("acct/a", 0),
    "delete of a written key": lambda tx: tx.delete("new/key"),
    "write of a key it only read": lambda tx: tx.put("ro/key", "changed"),
    "write into a range it scanned": lambda tx: tx.put("range/new", 1),
    "scan of a range holding a key it wrote": lambda tx: (list(tx.scan(prefix="new/")),
                                                          tx.put("other", 1)),
}


@pytest.mark.parametrize("how", sorted(CONFLICTS))
def test_prepared_keys_are_held_after_the_crash(crashed, how):
    with _open(crashed) as s:
        tx = s.transaction()
        CONFLICTS[how](tx)
        with pytest.raises(walstore.ConflictError) as ei:
            tx.commit()
        assert GID in str(ei.value)
        assert tx.state == "rolled back"
        assert _state(s) == BEFORE and s.get("other") is None
        # a transaction touching none of its keys is not held up
        with s.transaction() as ok:
            ok.put("acct/b", ok.get("acct/b") + 1)
        assert s.get("acct/b") == 8
        # store.run retries, but a hold is not a transient conflict: it still fails
        with pytest.raises(walstore.ConflictError):
            s.run(lambda t: t.put("acct/a", 1), retries=2, backoff=0.0001)
        assert s.prepared() == [GID]


def test_commit_prepared_after_crash_makes_writes_visible(crashed):
    with _open(crashed) as s:
        t_old = s.transaction()  # read before the decision: its snapshot predates it
        t_old.get("new/key")
        lsn = s.commit_prepared(GID)
        assert isinstance(lsn, int) and lsn > 0
        assert s.prepared() == [] and s.decision(GID) == "commit"
        assert _state(s) == AFTER
        assert s.log(limit=1)[0].meta == {"who": "child"}
        # the keys and the scanned range are free again
        with s.transaction() as tx:
            tx.put("acct/a", tx.get("acct/a") + 1)
            tx.put("range/1", 1)
        assert s.get("acct/a") == 151
        # a transaction whose snapshot predates the commit and read the key conflicts
        t_old.put("x", 1)
        with pytest.raises(walstore.ConflictError):
            t_old.commit()
        with pytest.raises(KeyError):
            s.commit_prepared(GID)
        with pytest.raises(KeyError):
            s.rollback_prepared(GID)
    with _open(crashed) as s:
        assert s.prepared() == [] and s.decision(GID) == "commit"
        assert s.get("new/key") == {"from": "prepared"} and s.get("acct/a") == 151


def test_rollback_prepared_after_crash_discards_writes(crashed):
    with _open(crashed) as s:
        s.rollback_prepared(GID)
        assert s.prepared() == [] and s.decision(GID) == "abort"
        assert _state(s) == BEFORE
        with s.transaction() as tx:  # released: keys and the scanned range
            tx.put("new/key", "mine")
            tx.put("ro/key", "mine too")
            tx.put("range/1", "in range")
        assert s.get("new/key") == "mine"
    with _open(crashed) as s:
        assert s.prepared() == []
        assert s.get("new/key") == "mine" and s.get("acct/a") == 100 and s.get("gone")


def test_prepared_survives_clean_close_and_holds_keys(tmp_path):
    path = tmp_path / "store"
    _seed(path)
    s = _open(path)
    tx = s.transaction()
    tx.put("acct/a", 1)
    tx.prepare("g-clean")
    assert tx.gid == "g-clean" and tx.state == "active"
    with pytest.raises(walstore.TransactionClosed):
        tx.put("acct/b", 2)  # a prepared transaction takes no more writes
    s.close()
    with _open(path) as s:
        assert s.last_recovery.in_doubt == ["g-clean"]
        assert s.prepared() == ["g-clean"] and s.get("acct/a") == 100
        with pytest.raises(walstore.ConflictError):
            with s.transaction() as t:
                t.put("acct/a", 5)
        s.checkpoint()  # a checkpoint must not lose the in-doubt transaction
    with _open(path) as s:
        assert s.prepared() == ["g-clean"]
        s.commit_prepared("g-clean")
        assert s.get("acct/a") == 1


def test_prepare_in_process_then_commit_or_rollback_through_the_transaction(tmp_path):
    with _open(tmp_path / "s") as s:
        t1 = s.transaction()
        t1.put("k1", "v1")
        t1.prepare("g1")
        assert s.get("k1") is None and s.prepared() == ["g1"]
        assert t1.commit() is not None
        assert s.get("k1") == "v1" and s.prepared() == [] and t1.state == "committed"
        t2 = s.transaction()
        t2.put("k2", "v2")
        t2.prepare("g2")
        t2.rollback()
        assert s.get("k2") is None and s.prepared() == [] and s.decision("g2") == "abort"
        with pytest.raises(ValueError):  # preparing twice
            t3 = s.transaction()
            t3.put("k3", 1)
            t3.prepare("g3")
            t3.prepare("g3b")
        t3.rollback()


def test_prepare_validates_first(tmp_path):
    """prepare is phase one: a transaction that read stale data cannot prepare."""
    with _open(tmp_path / "s") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        t = s.transaction()
        t.get("k")
        t.put("k2", 1)
        with s.transaction() as other:
            other.put("k", 2)
        with pytest.raises(walstore.ConflictError):
            t.prepare("g-stale")
        assert s.prepared() == [] and s.decision("g-stale") is None
        t.rollback()


def test_gid_reuse_is_refused(tmp_path):
    path = tmp_path / "s"
    with _open(path) as s:
        t = s.transaction()
        t.put("a", 1)
        t.prepare("dup")
        t2 = s.transaction()
        t2.put("b", 1)
        with pytest.raises(walstore.WalstoreError):  # while in doubt
            t2.prepare("dup")
        assert t2.gid is None
        t.commit()
        with pytest.raises(walstore.WalstoreError):  # after commit
            t2.prepare("dup")
        t2.prepare("dup-2")
        t2.rollback()
        t3 = s.transaction()
        t3.put("c", 1)
        with pytest.raises(walstore.WalstoreError):  # after rollback
            t3.prepare("dup-2")
        t3.rollback()
    with _open(path) as s:  # decisions are remembered by a later session
        for gid in ("dup", "dup-2"):
            t = s.transaction()
            t.put("d", 1)
            with pytest.raises(walstore.WalstoreError):
                t.prepare(gid)
            t.rollback()
        assert s.get("a") == 1 and s.get("b") is None and s.get("d") is None


@pytest.mark.parametrize("gid", ["", None, 42, "x" * 201])
def test_bad_gid_is_refused(tmp_path, gid):
    with _open(tmp_path / "s") as s:
        t = s.transaction()
        t.put("a", 1)
        with pytest.raises(TypeError):
            t.prepare(gid)
        assert s.prepared() == []
        t.rollback()


@pytest.mark.parametrize("gid", [5, None, b"gid", "", "x" * 600, "\ud800"])
def test_decision_checks_its_gid_as_prepared_details_does(tmp_path, gid):
    """decision(5) raised AttributeError ('int' object has no attribute 'encode') and a
    600-byte gid, one no prepare can have, answered None: refused like prepared_details
    and commit_prepared (TypeError; ValueError for text that is not UTF-8)."""
    with _open(tmp_path / "s") as s:
        for call in (s.decision, s.prepared_details, s.commit_prepared):
            with pytest.raises((TypeError, ValueError), match="gid"):
                call(gid)
        t = s.transaction()
        t.put("a", 1)
        with pytest.raises((TypeError, ValueError), match="gid"):
            t.prepare(gid)
        t.prepare("ok")
        assert s.decision("ok") == "prepared" and s.prepared() == ["ok"]


def test_sigkill_after_commit_prepared_keeps_the_commit(crashed):
    """commit_prepared under durability=full is durable: kill -9 right after it."""
    code = ("import os, signal, sys, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "s.commit_prepared(sys.argv[2])\n"
            "print('COMMITTED', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(crashed), GID],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "COMMITTED" in proc.stdout, proc.stderr
    with _open(crashed) as s:
        assert s.prepared() == [] and _state(s) == AFTER and s.decision(GID) == "commit"


# ---- the command line ----------------------------------------------------------------------

def test_cli_recover_lists_in_doubt_and_exits_1(crashed):
    r = CliRunner().invoke(cli, ["recover", str(crashed)])
    assert r.exit_code == 1, r.output
    assert GID in r.output
    r = CliRunner().invoke(cli, ["recover", str(crashed), "--json"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.output)
    assert doc["in_doubt"] == [GID]
    # recovering did not decide anything
    with _open(crashed) as s:
        assert s.prepared() == [GID] and _state(s) == BEFORE


def test_cli_prepared_json_and_commit_prepared(crashed):
    r = CliRunner().invoke(cli, ["prepared", str(crashed), "--json"])
    assert r.exit_code == 1, r.output  # in-doubt transactions need a decision
    doc = json.loads(r.output)
    assert [p["gid"] for p in doc["prepared"]] == [GID]
    r = CliRunner().invoke(cli, ["prepared", str(crashed)])
    assert GID in r.output
    r = CliRunner().invoke(cli, ["commit-prepared", str(crashed), GID])
    assert r.exit_code == 0, r.output
    with _open(crashed) as s:
        assert _state(s) == AFTER and s.prepared() == []
    r = CliRunner().invoke(cli, ["prepared", str(crashed), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["prepared"] == []
    r = CliRunner().invoke(cli, ["recover", str(crashed), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["in_doubt"] == []


def test_cli_human_output_shows_a_gid_with_a_newline_as_a_json_string(tmp_path):
    """A gid holding a newline split `recover`'s list of in-doubt gids into two lines
    that each named nothing, and the `prepared` table's row: shown as a JSON string now,
    in every human output that names it (--json gives it as it is)."""
    path, gid = tmp_path / "store", "pay\n42"
    _seed(path)
    assert "PREPARED" in _prepare_in_child(path, gid)
    r = CliRunner().invoke(cli, ["recover", str(path)])
    assert r.exit_code == 1 and r.output.splitlines()[-2].endswith(': "pay\\n42"'), r.output
    r = CliRunner().invoke(cli, ["prepared", str(path)])
    assert r.output.splitlines()[1].startswith('"pay\\n42"  '), r.output
    assert json.loads(CliRunner().invoke(cli, ["prepared", str(path), "--json"]).output
                      )["prepared"][0]["gid"] == gid
    r = CliRunner().invoke(cli, ["commit-prepared", str(path), gid])
    assert r.exit_code == 0 and r.output.startswith('committed "pay\\n42" at LSN'), r.output


def test_cli_rollback_prepared(crashed):
    r = CliRunner().invoke(cli, ["rollback-prepared", str(crashed), GID])
    assert r.exit_code == 0, r.output
    with _open(crashed) as s:
        assert _state(s) == BEFORE and s.prepared() == [] and s.decision(GID) == "abort"


@pytest.mark.parametrize("verb", ["commit-prepared", "rollback-prepared"])
def test_cli_unknown_gid_is_a_usage_error(crashed, verb):
    r = CliRunner().invoke(cli, [verb, str(crashed), "no-such-gid"])
    assert r.exit_code == 2, r.output
    assert "no-such-gid" in r.output
    with _open(crashed) as s:  # the real one is untouched
        assert s.prepared() == [GID] and _state(s) == BEFORE


def test_cli_prepared_on_a_missing_store_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(cli, ["prepared", str(tmp_path / "nope")])
    assert r.exit_code == 2, r.output


def test_walstore_command_lists_in_doubt(crashed):
    """The installed `walstore` entry point, as an operator runs it."""
    proc = subprocess.run([sys.executable, "-m", "walstore", "prepared", str(crashed), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert [p["gid"] for p in json.loads(proc.stdout)["prepared"]] == [GID]


# ---- engine bugs found while writing these tests ---------------------------------------------

def test_prepared_scan_and_live_scan_cannot_write_skew(tmp_path):
    with _open(tmp_path / "s") as s:
        tp = s.transaction()
        assert list(tp.scan(prefix="x/")) == []   # tp sees no x/
        tp.put("y/1", "from tp")
        tp.prepare("g-skew")
        to = s.transaction()
        assert list(to.scan(prefix="y/")) == []   # to sees no y/ (tp's write is invisible)
        to.put("x/1", "from to")
        committed = []
        try:
            to.commit()
            committed.append("to")
        except walstore.ConflictError:
            pass
        s.commit_prepared("g-skew")
        committed.append("tp")
        # Both saw an empty range the other wrote into: no serial order explains that.
        assert committed == ["tp"], "both committed: write skew"


def test_txid_of_an_in_doubt_transaction_is_never_reused(tmp_path):
    path = tmp_path / "s"
    kw = dict(durability="none", segment_size=65536)
    s = _open(path, **kw)
    early = [s.transaction() for _ in range(50)]  # lower txids, committed after the prepare
    tp = s.transaction()
    tp.put("held", "P")
    tp.prepare("g-old")
    for i, t in enumerate(early):
        t.put(f"e/{i}", "x" * 2000)  # enough to move to a new WAL segment
        t.commit()
    s.close()
    _open(path, **kw).close()  # a session that checkpoints: the PREPARE segment is trimmed
    with _open(path, **kw) as s:
        assert s.prepared() == ["g-old"]
        with s.transaction() as tx:
            tx.put("new", 1)
        assert tx.id != tp.id, f"txid {tx.id} reused"
        s.commit_prepared("g-old")
        assert {i.txid for i in s.log()} >= {tx.id, tp.id}
        assert any(i.keys == ("new",) for i in s.log())


def test_rollback_to_on_a_prepared_transaction_is_refused(tmp_path):
    """Prepared, the write set is fixed: ``rollback_to`` was accepted, ran the refund and
    hid k2 from ``tx.get`` — and ``commit()`` then committed k2 from the prepared record
    anyway.  Now refused (TransactionClosed), nothing undone, nothing compensated."""
    refunds = []
    with walstore.open(str(tmp_path / "s"), compensators={"refund": refunds.append}) as s:
        tx = s.transaction()
        tx.put("k", 1)
        sp = tx.savepoint("sp")
        with tx.action("charge", compensate="refund"):
            pass
        tx.put("k2", 2)
        tx.prepare("g1")
        with pytest.raises(walstore.errors.TransactionClosed, match="prepared"):
            tx.rollback_to(sp)
        assert refunds == [] and tx.get("k2") == 2
        tx.commit()
        assert s.get("k") == 1 and s.get("k2") == 2
        assert [a.state for a in s.actions()] == ["committed"]


def test_prepared_lists_beside_a_running_writer_and_bad_gids_are_usage_errors(tmp_path):
    """``walstore prepared`` only reads: it works while an agent holds the store (it needed
    the writer lock, and appended to the log) and exits 1 naming the in-doubt gid; a GID
    walstore never gives is a usage error (exit 2), not an internal one."""
    path = str(tmp_path / "s")
    s = walstore.open(path)
    try:
        tx = s.transaction()
        tx.put("k", 1)
        tx.prepare("g-live")
        end = s.stats()["wal_end_lsn"]
        r = CliRunner().invoke(cli, ["prepared", path, "--json"])
        assert r.exit_code == 1, r.output
        assert [p["gid"] for p in json.loads(r.stdout)["prepared"]] == ["g-live"]
        assert s.stats()["wal_end_lsn"] == end
    finally:
        s.close()
    for verb in ("commit-prepared", "rollback-prepared"):
        for gid in ("", "x" * 300):
            r = CliRunner().invoke(cli, [verb, path, gid])
            assert r.exit_code == 2 and "bad GID" in r.output, r.output


def test_a_rewind_is_not_blocked_by_a_prepared_transaction_on_keys_it_leaves_alone(tmp_path):
    """An unscoped rewind guards its whole range against racing commits; a prepared
    (in-doubt) transaction on a key the rewind does not restore is not in its way — it
    was refused (ConflictError naming the prepared gid) while its dry run said it would
    go.  A rewind that would restore a held key is still refused."""
    with walstore.open(str(tmp_path / "s")) as s:
        with s.transaction() as tx:
            tx.put("held", 0)
        s.restore_point("start")
        with s.transaction() as tx:
            tx.put("a", 1)
        def prepared(key: str, value: int, gid: str) -> None:
            t = s.transaction()
            t.put(key, value)
            t.prepare(gid)
        prepared("c", 3, "g1")
        assert s.rewind("start", dry_run=True).keys == ["a"]
        s.rewind("start")
        assert s.get("a") is None and s.prepared() == ["g1"]
        s.commit_prepared("g1")
        assert s.get("c") == 3
        s.restore_point("p2")
        with s.transaction() as tx:
            tx.put("held", 1)
        prepared("held", 2, "g2")
        with pytest.raises(walstore.ConflictError, match="g2"):
            s.rewind("p2")  # would put 'held' back under g2
        assert s.get("held") == 1
        s.rollback_prepared("g2")


# ---- probe 33: holds, races on one gid, the decision's durability ---------------------------
def test_a_prepared_transaction_keeps_its_hold_when_another_holding_the_key_ends(tmp_path):
    # (one gid per held key: the second prepare took the key's hold over, and its end
    # released it, so a writer overwrote what the first had read before it committed)
    s = _open(tmp_path / "s", durability="none")
    with s.transaction() as tx:
        tx.put("k", 1)
    holders = []
    for gid in ("g1", "g2"):
        tx = s.transaction()
        tx.put(f"x-{gid}", tx.get("k") + 100)
        tx.prepare(gid)
        holders.append(tx)
    s.rollback_prepared("g2")
    with pytest.raises(walstore.ConflictError), s.transaction() as tx:
        tx.put("k", 2)  # g1 still holds what it read
    s.commit_prepared("g1")
    with s.transaction() as tx:
        tx.put("k", 2)  # free now
    assert s.get("k") == 2 and s.get("x-g1") == 101 and s.get("x-g2") is None
    s.close()


@pytest.mark.parametrize("race", ["commit+rollback", "commit+commit", "rollback+rollback"])
def test_one_gid_decided_by_two_threads_at_once_is_decided_once(tmp_path, race):
    # (the gid was looked up outside the journal lock: both decisions were logged — a
    # rollback returned while the commit stood, a transaction committed twice — and the
    # loser got a bare KeyError)
    import threading
    refunds = []
    first, second = race.split("+")
    for trial in range(25):
        s = _open(tmp_path / f"s{trial}", durability="none",
                  compensators={"refund": refunds.append})
        tx = s.transaction()
        tx.put("paid", True)
        with tx.action("charge", compensate="refund"):
            pass
        tx.prepare("g")
        n0 = len(refunds)
        barrier = threading.Barrier(2)
        got: dict = {}

        def decide(name, how):
            barrier.wait()
            try:
                (s.commit_prepared if how == "commit" else s.rollback_prepared)("g")
                got[name] = "ok"
            except walstore.WalstoreError as e:
                got[name] = type(e).__name__
        threads = [threading.Thread(target=decide, args=(i, how))
                   for i, how in enumerate((first, second))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(got.values()) == ["UnknownGid", "ok"], got
        committed = s.get("paid") is True
        assert committed == (s.decision("g") == "commit")
        assert len(refunds) - n0 == (0 if committed else 1)
        assert [i.txid for i in s.log()].count(tx.id) == (1 if committed else 0)
        s.close()
        s = _open(tmp_path / f"s{trial}", durability="none",
                  compensators={"refund": refunds.append})
        assert (s.get("paid") is True) == committed and s.prepared() == []
        assert len(refunds) - n0 == (0 if committed else 1)
        s.close()


def test_rollback_of_a_transaction_whose_gid_another_caller_committed_says_committed(tmp_path):
    s = _open(tmp_path / "s", durability="none")
    tx = s.transaction()
    tx.put("k", 1)
    tx.prepare("g")
    s.commit_prepared("g")
    with pytest.raises(walstore.UnknownPoint):
        tx.rollback()
    assert tx.state == "committed" and s.get("k") == 1
    s.close()


def test_the_decision_of_a_prepared_transaction_is_durable_under_normal(tmp_path):
    # (its COMMIT waited for nothing under "normal": an atomic group's coordinator then
    # committed the participants, and a power loss kept their commits but not the
    # decision — resolve_atomic presumed abort: the stores disagreed)
    from tools.faults import FaultBackend, installed
    s = _open(tmp_path / "s", durability="normal", sync_interval=30)
    tx = s.transaction()
    tx.put("k", 1)
    tx.prepare("g")
    fb = FaultBackend(record=True)
    with installed(fb):
        s.commit_prepared("g")
        synced = [e for e in fb.events if e.op in ("fsync", "fdatasync")]
    assert synced, "the decision returned before its record was synced"
    with s.transaction() as t:  # a plain commit under "normal" still waits for none
        t.put("j", 1)
    s.close()


def test_an_atomic_groups_rollback_reaches_every_participant_when_one_fails(tmp_path):
    # (the first participant's failed compensation stopped the loop: the second stayed
    # prepared, holding its keys, its charge not refunded, named by no error)
    import walstore.agent.actions as wactions
    refunded = []

    def refund_down(action):
        raise RuntimeError("payments API down")
    a = _open(tmp_path / "a", durability="none", compensators={"refund": refund_down})
    b = _open(tmp_path / "b", durability="none", compensators={"refund": refunded.append})
    c = _open(tmp_path / "c", durability="none")
    with c.transaction() as t:
        t.put("c/k", 1)
    saved, wactions.COMPENSATION_BACKOFF = wactions.COMPENSATION_BACKOFF, 0.0
    try:
        with pytest.raises(walstore.CompensationFailed):
            with walstore.atomic(a, b, c) as (ta, tb, tc):
                with ta.action("charge", compensate="refund"):
                    pass
                with tb.action("charge", compensate="refund"):
                    pass
                tb.put("b/x", 1)
                tc.put("c/k", tc.get("c/k") + 1)
                with c.transaction() as other:
                    other.put("c/k", 99)  # c's prepare conflicts: the group rolls back
    finally:
        wactions.COMPENSATION_BACKOFF = saved
    assert a.prepared() == b.prepared() == c.prepared() == []
    assert len(refunded) == 1 and [x.state for x in b.actions()] == ["compensated"]
    assert [x.state for x in a.pending_compensations()] == ["failed"]  # owed, listed
    with b.transaction() as t:
        t.put("b/x", 2)  # no hold left
    for s in (a, b, c):
        s.close()


# ---- stores written by walstore 0.1.0 -------------------------------------------------------
def _prepared_by_0_1_0(path) -> int:
    """A store whose prepared transaction ``g1`` holds an action the way walstore 0.1.0
    (834c32b) kept it: no intent record and no ``actions`` row, the whole action row inside
    the ``twophase`` table's ``p:g1`` row.  Built with this version (prepare, checkpoint,
    close), then that row is rewritten in LMDB to 0.1.0's form.  Returns the txid."""
    import lmdb
    import msgpack
    with _open(path) as s:
        with s.transaction() as tx:
            tx.put("x", 1)
        tx = s.transaction()
        tx.put("prep", "in-doubt")
        tx.prepare("g1")
        txid = s.prepared_details("g1").txid
        s.checkpoint()
    env = lmdb.open(str(path / "db"), max_dbs=64)
    try:
        db = env.open_db(b"twophase", create=False)
        with env.begin(write=True, db=db) as t:
            row = msgpack.unpackb(t.get(b"p:g1"), raw=False)
            assert row["actions"] == []
            row["actions"] = [{
                "id": f"{txid}.1", "tx": txid, "name": "charge", "args": {"amount": 9},
                "result": {"charged": 9}, "key": f"ws-old-{txid}.1", "compensate": "refund",
                "state": "pending", "error": None, "attempts": 0, "ts": 1.0, "lsn": 40}]
            t.put(b"p:g1", msgpack.packb(row, use_bin_type=True))
    finally:
        env.close()
    return txid


def test_rollback_prepared_of_a_0_1_0_prepared_transaction_compensates_its_action(tmp_path):
    """walstore 0.1.0 kept a prepared transaction's actions as whole rows in its
    ``p:<gid>`` row; read as action ids, ``rollback_prepared`` compensated nothing and
    listed nothing (the charge stayed, unsaid) and ``commit_prepared`` raised a bare
    TypeError (found by an upgrade probe with a store written by 0.1.0's code)."""
    path = tmp_path / "s"
    txid = _prepared_by_0_1_0(path)
    refunded = []
    with _open(path, compensators={"refund": refunded.append}) as s:
        assert s.prepared() == ["g1"]
        assert s.prepared_details("g1").actions == [f"{txid}.1"]
        s.rollback_prepared("g1")
        assert [(a.key, a.args, a.result) for a in refunded] == [
            (f"ws-old-{txid}.1", {"amount": 9}, {"charged": 9})]
        assert [(a.id, a.state) for a in s.actions()] == [(f"{txid}.1", "compensated")]
        assert s.pending_compensations() == [] and s.get("prep") is None
        assert s.decision("g1") == "abort"
    with _open(path, compensators={"refund": refunded.append}) as s:
        assert len(refunded) == 1 and s.prepared() == []
        assert [(a.id, a.state) for a in s.actions()] == [(f"{txid}.1", "compensated")]


def test_commit_prepared_of_a_0_1_0_prepared_transaction_records_its_action(tmp_path):
    path = tmp_path / "s"
    txid = _prepared_by_0_1_0(path)
    with _open(path, compensators={"refund": lambda a: None}) as s:
        s.commit_prepared("g1")
        assert s.get("prep") == "in-doubt" and s.decision("g1") == "commit"
        assert [(a.id, a.state, a.key) for a in s.actions()] == [
            (f"{txid}.1", "committed", f"ws-old-{txid}.1")]
    with _open(path) as s:
        assert [(a.id, a.state) for a in s.actions()] == [(f"{txid}.1", "committed")]


def test_a_prepare_of_more_than_a_records_worth_of_writes_survives_sigkill(tmp_path):
    """A PREPARE carried every write in one record, so writes totalling more than 32 MiB
    (three 12 MiB values, each within the 16 MiB limit) could never be prepared, though
    the same transaction commits (a COMMIT's writes are chunked).  A PREPARE is chunked
    now too: the child prepares such a transaction and is killed; recovery reads the
    chunks back, the transaction is in doubt with all its writes, and commits."""
    path = tmp_path / "s"
    code = ("import os, signal, sys, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "tx = s.transaction()\n"
            "for i in range(3):\n"
            "    tx.put(f'doc{i}', bytes([65 + i]) * (12 << 20))\n"
            "tx.prepare(sys.argv[2])\n"
            "print('PREPARED', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path), "big"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "PREPARED" in proc.stdout, proc.stderr
    with _open(path) as s:
        assert s.prepared() == ["big"]
        assert sorted(k for k, _v in s.prepared_details("big").writes) == [
            "doc0", "doc1", "doc2"]
        assert s.get("doc0") is None  # (in doubt: invisible)
        s.commit_prepared("big")
    with _open(path) as s:
        assert s.prepared() == [] and s.decision("big") == "commit"
        assert [s.get(f"doc{i}") for i in range(3)] == [
            bytes([65 + i]) * (12 << 20) for i in range(3)]
