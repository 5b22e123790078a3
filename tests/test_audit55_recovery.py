"""Audit 55, recovery: on-disk damage, salvage modes, verify.

Real processes: a writer killed with SIGKILL after acknowledged commits (a small
``segment_size``, so several segments), then ``walstore verify`` / ``walstore recover``
as an operator runs them.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import walstore
from store_support import cli_env
from walstore.ops.verify import verify_store

N = 300

_WRITER = r"""
import os, signal, sys
import walstore
s = walstore.open(sys.argv[1], segment_size=8192, apply_interval=86400,
                  apply_batch=10**9, checkpoint_bytes=1 << 40)
for i in range(int(sys.argv[2])):
    with s.transaction() as tx:
        tx.put("k%04d" % i, "v" * 40 + str(i))
sys.stdout.write("done\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def killed_tpl(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a55rec") / "store"
    p = subprocess.run([sys.executable, "-c", _WRITER, str(root), str(N)],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == -signal.SIGKILL and p.stdout == "done\n", p.stderr
    assert len(segments(root)) >= 4
    return root


@pytest.fixture
def killed(killed_tpl, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(killed_tpl, dest)
    return dest


def segments(root: Path) -> list[Path]:
    return sorted(p for p in (root / "wal").iterdir() if p.name.endswith(".wal"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, env=cli_env(), timeout=120)


def test_a_directory_named_spare_tmp_is_refused_by_name_and_verify_lists_it(killed) -> None:
    """A directory in wal/ where the spare belongs failed every open with a bare EISDIR
    from recovery's temp-file cleanup (after REDO had run), while `verify` said "ok"."""
    spare = killed / "wal" / "spare.tmp"
    if spare.exists():
        spare.unlink()
    spare.mkdir()
    (spare / "x").write_bytes(b"operator's")

    v = cli("verify", str(killed))
    assert v.returncode == 1, v.stdout + v.stderr
    assert f"{spare}: spare.tmp is a directory" in v.stdout

    r = cli("recover", str(killed))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "stray-file: spare.tmp is a directory" in r.stdout
    assert "move it out of wal/" in r.stdout and "no --mode applies" in r.stdout
    with pytest.raises(walstore.CorruptionError) as ei:
        walstore.open(str(killed))
    assert ei.value.file == str(spare)
    assert (spare / "x").read_bytes() == b"operator's"  # nothing removed
    # nothing was redone either: the refusal comes before anything changes
    assert verify_store(str(killed)).applied_lsn == 0

    shutil.rmtree(spare)
    with walstore.open(str(killed)) as s:  # moved away: the store opens, every commit there
        assert s.get("k%04d" % (N - 1)) == "v" * 40 + str(N - 1)


@pytest.mark.parametrize("mode", ["strict", "point-in-time", "skip-corrupt"])
def test_a_renamed_segment_is_named_by_verify_and_recovery(killed, mode) -> None:
    """A segment renamed by an operator (X.wal -> X.wal.bak) was silently ignored: verify
    and recovery reported a gap beside the very file that fills it, never naming it."""
    seg = segments(killed)[2]
    bak = seg.with_name(seg.name + ".bak")
    seg.rename(bak)

    rep = verify_store(str(killed))
    named = [e for e in rep.errors if e.startswith(f"{bak}:")]
    assert len(named) == 1, rep.errors
    assert f"its name is {seg.name}" in named[0]
    v = cli("verify", str(killed), "--json")
    assert v.returncode == 1
    assert any(str(bak) in e for e in json.loads(v.stdout)["errors"])

    r = cli("recover", str(killed), "--mode", mode, "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    if mode == "strict":  # (refused for the gap; the stray is named in the problems)
        assert doc["refused"] and "gap" in doc["reason"]
        return
    stray = [p for p in doc["problems"] if p["kind"] == "stray-file"]
    assert [(p["file"], p["action"]) for p in stray] == [(str(bak), "left")], doc["problems"]
    assert bak.exists()  # left where it was, as evidence


_ACTION_WRITER = r"""
import os, signal, sys
import walstore
s = walstore.open(sys.argv[1], compensators={"refund": lambda a: None})
with s.transaction() as tx:
    tx.put("a", 1)
tx = s.transaction().__enter__()
with tx.action("charge", {"amount": 5}, compensate="refund") as act:
    act.result = {"charge_id": "ch_1"}
sys.stdout.write(act.id + " " + act.key + "\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)  # (its transaction never commits)
"""


def test_an_action_whose_intent_was_lost_keeps_its_idempotency_key(tmp_path) -> None:
    """skip-corrupt over a damaged ACTION_INTENT whose ACTION_RESULT survives owes the
    action (it ran) but listed it with key "": the idempotency key, the one thing the
    operator told to "settle it by hand" can ask the payment system about, was dropped
    although it is made from the action's id and the store's key namespace."""
    root = tmp_path / "store"
    p = subprocess.run([sys.executable, "-c", _ACTION_WRITER, str(root)],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    aid, key = p.stdout.split()
    seg = segments(root)[0]
    data = bytearray(seg.read_bytes())
    at = data.find(b"refund")  # (only the intent names its compensator)
    assert at > 0 and data.find(b"refund", at + 1) < 0
    data[at] ^= 0xFF
    seg.write_bytes(bytes(data))

    r = cli("recover", str(root), "--mode", "skip-corrupt", "--json")
    assert r.returncode == 1, r.stderr  # a compensation is owed
    assert aid in json.loads(r.stdout)["pending_compensations"]
    a = cli("actions", str(root), "--json")
    owed = [x for x in json.loads(a.stdout)["actions"] if x["id"] == aid]
    assert len(owed) == 1, a.stdout
    assert owed[0]["key"] == key
    assert key in owed[0]["error"]
    with walstore.open(str(root), readonly=True) as s:
        (act,) = [a for a in s.actions(pending=True) if a.id == aid]
        assert act.key == key and act.result == {"charge_id": "ch_1"}


def test_the_segment_behind_another_stores_is_not_said_to_begin_the_wal(killed, tmp_path) -> None:
    """Another store's segment in the middle of the log: verify (and recovery) then said
    of the next segment "the WAL begins at LSN X but LMDB is applied only up to 0: log
    records are missing", of a log whole from LSN 0."""
    other = tmp_path / "other"
    walstore.open(str(other), segment_size=8192).close()
    seg, after = segments(killed)[2], segments(killed)[3]
    head = (other / "wal" / segments(other)[0].name).read_bytes()[:64]
    data = bytearray(seg.read_bytes())
    data[:64] = head  # (its own records behind another store's header)
    seg.write_bytes(bytes(data))

    rep = verify_store(str(killed))
    assert not [e for e in rep.errors if "the WAL begins" in e], rep.errors
    named = [e for e in rep.errors if e.startswith(f"{after}:")]
    assert len(named) == 1 and f"behind {seg.name}" in named[0], rep.errors
    r = cli("recover", str(killed), "--mode", "skip-corrupt", "--json")
    assert r.returncode == 1, r.stderr
    reasons = [p["reason"] for p in json.loads(r.stdout)["problems"]]
    assert not [x for x in reasons if "the WAL begins" in x], reasons


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_directory_named_like_a_segment_is_a_bad_segment(killed, kind) -> None:
    """A FIFO under the next segment's name made `verify` and every recovery that read it
    block forever in open() (`backup` too); a directory raised EISDIR out of both (verify
    "failed", a bare errno, naming no damage).  Each is a bad segment now: named,
    refused by strict and by backup, dropped (to quarantine/, not opened) by a salvage
    mode."""
    import os
    end = verify_store(str(killed)).wal_end_lsn
    bad = killed / "wal" / f"{end:020d}.wal"
    os.mkfifo(bad) if kind == "fifo" else bad.mkdir()
    what = "a FIFO" if kind == "fifo" else "a directory"

    v = cli("verify", str(killed))  # (cli's timeout guards the hang it was)
    assert v.returncode == 1, v.stdout + v.stderr
    assert f"{bad}: the segment's name leads to {what}, not a file" in v.stdout
    b = cli("backup", str(killed), str(killed.parent / "copy"))  # (it blocked too)
    assert b.returncode == 1 and f"file {bad}" in b.stderr, b.stderr
    assert not (killed.parent / "copy").exists()

    r = cli("recover", str(killed), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["refused"], r.stdout + r.stderr
    assert json.loads(r.stdout)["file"] == str(bad)

    r = cli("recover", str(killed), "--mode", "skip-corrupt", "--json")
    assert r.returncode == 1, r.stderr
    drops = [p for p in json.loads(r.stdout)["problems"] if p["kind"] == "dropped-segment"]
    assert [p["file"] for p in drops] == [str(bad)]
    assert not os.path.lexists(bad) and os.path.lexists(drops[0]["quarantined"])
    with walstore.open(str(killed)) as s:  # every commit still there
        assert s.get("k%04d" % (N - 1)) == "v" * 40 + str(N - 1)


def test_a_fifo_in_place_of_the_store_file_is_damage_not_a_hang(killed) -> None:
    """A FIFO where STORE belongs made every open, `verify`, `recover` and `backup` block
    forever in open() (the identity is the first thing each reads)."""
    import os
    ident = killed / "STORE"
    ident.unlink()
    os.mkfifo(ident)
    for args in (["verify", str(killed)], ["recover", str(killed)],
                 ["backup", str(killed), str(killed.parent / "copy")]):
        r = cli(*args)  # (cli's timeout guards the hang it was)
        assert r.returncode == 1, (args, r.stdout, r.stderr)  # damage, not a usage error
        assert f"{ident} is not a regular file" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(walstore.NotAStore):
        walstore.open(str(killed), readonly=True)
    with pytest.raises(walstore.NotAStore):
        walstore.open(str(killed))


def test_lmdb_enospc_in_the_background_turns_the_store_read_only_until_reopened(tmp_path):
    """An LMDB write the applier makes failing with ENOSPC (a full disk; MDB_MAP_FULL
    grows the map instead): a defined state, now in docs/GUIDE.md — the next write raises
    ReadOnlyError saying to reopen, reads go on, and the reopen holds every acknowledged
    commit (the log has them; REDO applies them)."""
    import errno
    from tools.faults import FaultBackend, installed
    path = str(tmp_path / "s")
    acked = []
    with installed(FaultBackend()) as faults:
        s = walstore.open(path, apply_batch=1, apply_interval=0.001)
        try:
            with s.transaction() as tx:
                tx.put("first", 0)
            faults.fail_lmdb("commit", error=errno.ENOSPC, times=None)
            with pytest.raises(walstore.ReadOnlyError) as ei:
                for i in range(100_000):  # (until the applier's failed write lands)
                    with s.transaction() as tx:
                        tx.put(f"n{i}", i)
                    acked.append(i)
            assert "No space left on device" in str(ei.value)
            assert "reopen it to recover" in str(ei.value)
            assert s.readonly and s.get("first") == 0  # reads go on
        finally:
            s.close()
        faults.clear()
    with walstore.open(path) as s:
        assert s.get("first") == 0 and [s.get(f"n{i}") for i in acked] == acked


_PREPARED_WRITER = r"""
import os, signal, sys
import walstore
s = walstore.open(sys.argv[1], compensators={"refund": lambda a: None})
with s.transaction() as tx:
    tx.put("a", 1)
tx = s.transaction().__enter__()
with tx.action("charge", {"amount": 5}, compensate="refund") as act:
    act.result = {"charge_id": "ch_1"}
tx.put("b", 2)
tx.prepare("g1")
sys.stdout.write(act.id + "\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)  # (in doubt)
"""


@pytest.mark.parametrize("decision", ["rollback", "commit-then-revert"])
def test_undoing_a_prepared_transaction_whose_intent_was_lost_owes_the_action(
        tmp_path, decision) -> None:
    """A prepared transaction's ACTION_INTENT damaged, its ACTION_RESULT whole (the charge
    ran): skip-corrupt makes the action's row from the result, compensator unknown (the
    PREPARE names the action by id only).  Rolling the transaction back then settled it
    "resolved: it declares no compensation"; committing it and reverting that commit left
    it "committed" — either way the charge stood, nothing owed, `verify` ok.  It is owed
    (pending) now."""
    root = tmp_path / "store"
    p = subprocess.run([sys.executable, "-c", _PREPARED_WRITER, str(root)],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    aid = p.stdout.strip()
    seg = segments(root)[0]
    data = bytearray(seg.read_bytes())
    at = data.find(b"refund")  # (only the intent names its compensator)
    assert at > 0 and data.find(b"refund", at + 1) < 0
    data[at] ^= 0xFF
    seg.write_bytes(bytes(data))
    r = cli("recover", str(root), "--mode", "skip-corrupt", "--json")
    assert json.loads(r.stdout)["in_doubt"] == ["g1"], r.stdout + r.stderr

    ran = []
    with walstore.open(str(root), compensators={"refund": ran.append}) as s:
        if decision == "rollback":
            s.rollback_prepared("g1")
        else:
            s.commit_prepared("g1")
            (txid,) = {a.txid for a in s.actions()}
            s.revert(txid)
            assert s.get("b") is None  # (the revert undid the writes ...)
        assert [a.id for a in s.pending_compensations()] == [aid]  # (... and owes this)
        (act,) = [a for a in s.actions() if a.id == aid]
        assert act.state == "pending"
        if decision == "rollback":
            assert "ACTION_INTENT record was lost" in act.error
    assert ran == []  # (what compensates it is unknown: never guessed)
    v = cli("verify", str(root))
    assert v.returncode == 1 and f"action {aid}" in v.stdout


def test_a_fifo_in_place_of_the_blob_gc_lock_does_not_hang_verify_or_backup(tmp_path):
    """`verify` and `backup` take files/gc.lock shared to hold the writer's blob gc off;
    a FIFO there blocked both forever in open()."""
    import os
    root = tmp_path / "store"
    with walstore.open(str(root)) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    (root / "files").mkdir(exist_ok=True)
    os.mkfifo(root / "files" / "gc.lock")
    v = cli("verify", str(root))  # (cli's timeout guards the hang it was)
    assert v.returncode == 0 and v.stdout.rstrip().endswith("ok"), v.stdout + v.stderr
    b = cli("backup", str(root), str(tmp_path / "copy"))
    assert b.returncode == 0, b.stderr
    with walstore.open(str(tmp_path / "copy"), readonly=True) as c:
        assert c.get("a") == 1


def test_a_fifo_in_place_of_the_lock_file_does_not_hang_readers(tmp_path):
    """Whether a writer lives is asked of LOCK (a shared flock); a FIFO there made
    `verify`, `get` and every read-only open block forever in open()."""
    import os
    root = tmp_path / "store"
    with walstore.open(str(root)) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    (root / "LOCK").unlink(missing_ok=True)
    os.mkfifo(root / "LOCK")
    v = cli("verify", str(root))  # (cli's timeout guards the hang it was)
    assert v.returncode == 0 and v.stdout.rstrip().endswith("ok"), v.stdout + v.stderr
    g = cli("get", str(root), "a")
    assert g.returncode == 0 and g.stdout.strip() == "1", g.stdout + g.stderr
    with walstore.open(str(root), readonly=True) as r:
        assert r.get("a") == 1
