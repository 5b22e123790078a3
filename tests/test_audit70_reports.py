"""Audit 70: what stop 69's report review noticed and left alone.

``pending_compensations()`` lists a compensation another thread of the process is
running, as owed until it ends (pinned here: it was left out for a while, and a caller
waiting for nothing owed went on with a refund in flight); a damaged ``map_size`` meta row failed
`walstore stats` outright; a walstore that never notes its map (one older than the note)
left a stale note that `walstore stats` said as the writer's map; a backup that met
damage in its staged copy named the staging directory; a failed backup said "backup
failed: writing the backup failed (...)".
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading

import lmdb
import pytest
from click.testing import CliRunner

import walstore
from tests.test_audit67_operator import PURGE_KILLED_AFTER_COMMIT, _env, charged_store
from tests.test_audit69_reports import _in_thread, _owed_refund
from tests.store_support import cli_env, without_root_privilege
from tools.faults import FaultBackend, installed
from walstore.cli import main
from walstore.engine.lmdb_check import check_lmdb_data_file


def _meta_rows(path: str, rows: dict | None = None, names=()) -> dict:
    """Read the ``meta`` rows ``names`` of the store at ``path`` (no writer running), or
    write ``rows`` (name -> raw bytes, None: delete) as a foreign program would."""
    env = lmdb.open(os.path.join(path, "db"), max_dbs=64, lock=False)
    try:
        with env.begin(write=rows is not None) as t:
            db = env.open_db(b"meta", txn=t, create=False)
            for name, raw in (rows or {}).items():
                if raw is None:
                    t.delete(name, db=db)
                else:
                    t.put(name, raw, db=db)
            return {n: t.get(n, db=db) for n in names}
    finally:
        env.close()


def _stats(path: str, *more: str):
    return CliRunner().invoke(main, ["stats", path, *more])


# ---- 1. pending_compensations() beside a compensation running in another thread ----------
def test_pending_compensations_lists_one_another_thread_is_running_until_it_ends(tmp_path):
    """Thread A's ``retry_compensations()`` runs the refund (held on an Event); meanwhile
    ``pending_compensations()`` in thread B must still list it: the refund is under way,
    not done, and a caller waiting until nothing is owed (a dashboard, a shutdown
    hook) must not go on before it ends.  Audit 70 first left it out (as
    ``retry_compensations`` does, which leaves it to A): B read ``[]`` with the refund in
    flight; the lead put it back.  While it runs, ``resolve`` refuses it and a second
    retry leaves it to A; once A ends, nothing is owed."""
    started, go = threading.Event(), threading.Event()
    s, owed = _owed_refund(tmp_path, started, go)
    try:
        a, out = _in_thread(s.retry_compensations)
        assert started.wait(10)
        try:
            listed = [(x.id, x.state) for x in s.pending_compensations()]
            with pytest.raises(walstore.WalstoreError, match="running now"):
                s.resolve(owed.id)
            second = [x.id for x in s.retry_compensations()]
        finally:
            go.set()
            a.join(10)
        assert listed == [(owed.id, "pending")], listed
        assert second == [], second
        assert out == {"value": []}
        assert s.pending_compensations() == []
        assert s.get_action(owed.id).state == "compensated"
    finally:
        go.set()
        s.close()


# ---- 2. a damaged map_size note ------------------------------------------------------------
def test_stats_of_a_store_whose_map_size_note_is_damaged_still_reports(tmp_path):
    """The ``map_size`` meta row is 3 bytes.  `walstore stats` failed ("stats failed:
    corruption: ... 'map_size' ..."), no figure said, where `walstore verify` goes on past
    it.  Now the figures (``lmdb_map_size`` the one data.mdb records), one line on stderr
    naming the row, exit 1 (damage found); --json one document."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none", map_size=8 << 20) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    _meta_rows(path, {b"map_size": b"abc"})
    recorded = check_lmdb_data_file(os.path.join(path, "db", "data.mdb")).map_size
    r = _stats(path)
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'map_size'" in r.stderr and "data.mdb" in r.stderr, r.stderr
    assert "wal_end_lsn" in r.stdout and "lmdb_map_size" in r.stdout, r.stdout
    r = _stats(path, "--json")
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["lmdb_map_size"] == recorded and doc["keys"] == 1, doc
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- 6. a note no writer of this version made since --------------------------------------
def test_stats_does_not_say_a_note_an_older_writer_left_stale_as_the_writers_map(tmp_path):
    """This walstore's writer ran with 8 MiB and noted it; then a walstore older than the
    note (stop 68: same format version, never writes ``map_size``) ran with 16 MiB — made
    here as its open leaves LMDB: a writer's open and close, the note rows put back as
    they were.  `walstore stats` said 8 MiB, the stale note, as the writer's map.  Now a
    note whose stamp is not the store's ``txid_reserved`` is not said: the size data.mdb
    records (here the older writer's 16 MiB); a writer of this version notes its map
    again."""
    path = str(tmp_path / "s")
    names = (b"map_size", b"map_size_at")
    with walstore.open(path, durability="none", map_size=8 << 20) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    assert json.loads(_stats(path, "--json").stdout)["lmdb_map_size"] == 8 << 20
    note = _meta_rows(path, names=names)
    with walstore.open(path, durability="none", map_size=16 << 20) as s:  # ("older")
        with s.transaction() as tx:
            tx.put("k", 2)
    _meta_rows(path, note)  # (as the older writer left them: untouched)
    r = _stats(path, "--json")
    assert r.exit_code == 0, (r.exit_code, r.stderr)
    assert json.loads(r.stdout)["lmdb_map_size"] == 16 << 20
    with walstore.open(path, durability="none", map_size=12 << 20) as s:
        with s.transaction() as tx:
            tx.put("k", 3)
        assert json.loads(_stats(path, "--json").stdout)["lmdb_map_size"] == 12 << 20
    assert json.loads(_stats(path, "--json").stdout)["lmdb_map_size"] == 12 << 20


# ---- 3. damage met in the staged copy names the source, not the staging directory ----------
@pytest.mark.parametrize("row", [b"horizon", b"wal_start"])
def test_a_backup_refused_for_damage_names_the_source_not_the_staging_directory(tmp_path,
                                                                                row):
    """A meta row of the source is 3 bytes, which the copy's own open (the check of the
    file content it refers to) reads.  The error named
    "DEST.incomplete-backup-<pid>-xxxx/db/data.mdb", a directory the user never asked for
    and removed by then; `walstore verify SRC` names the row in SRC/db/data.mdb.  Now
    the backup is said refused, naming the source's data file."""
    src, dest = str(tmp_path / "s"), str(tmp_path / "dest")
    with walstore.open(src, durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    _meta_rows(src, {row: b"abc"})
    r = CliRunner().invoke(main, ["backup", src, dest])
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "incomplete-backup" not in line, line
    assert f"backup of {src} refused" in line, line
    assert os.path.join(src, "db", "data.mdb") in line and repr(row.decode()) in line, line
    assert not os.path.exists(dest)
    assert [n for n in os.listdir(tmp_path) if "incomplete" in n] == []


# ---- 4. "backup failed: writing the backup failed (...)" -----------------------------------
def backup_owing_an_erasure(tmp_path, op: str, pattern: str):
    """`walstore backup` of a store that owes a purge's erasure (its writer killed -9
    between the purge's commit and its compacting checkpoint: the backup finishes it in
    its staged copy), every ``op`` on a path matching ``pattern`` failing with ENOSPC.
    (The CLI's result, DEST.)"""
    path, _ledger, _acked = charged_store(tmp_path)
    w = subprocess.run([sys.executable, "-c", PURGE_KILLED_AFTER_COMMIT, path],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert w.returncode == -signal.SIGKILL, w.stderr
    dest = str(tmp_path / "bk")
    fb = FaultBackend()
    fb.fail(op, error=errno.ENOSPC, path=pattern, times=None)
    with installed(fb):
        return CliRunner().invoke(main, ["backup", path, dest]), dest


@pytest.mark.parametrize("op,pattern", [
    ("rename", "*incomplete-backup-*/db.compact/data.mdb"),
    ("open", "*incomplete-backup-*/db.compact/*")])
def test_a_failed_backup_says_what_failed_once(tmp_path, op, pattern):
    """The backup finishes in its copy the erasure a purge owed (its writer killed -9
    after the purge's commit), and the disk is full.  It said "backup failed: writing the
    backup failed (rewriting the LMDB data file ... failed: [Errno 28] No space left on
    device: '<dest>/db.compact/data.mdb' ...; nothing was swapped, and the erasure stays
    owed: the next checkpoint or writable open tries again); the partial copy was removed
    [ENOSPC]: <dest>/db.compact/data.mdb": "backup failed" twice, the path three times,
    and advice about a copy that no longer exists.  Now what failed, once."""
    r, dest = backup_owing_an_erasure(tmp_path, op, pattern)
    line = r.stderr.strip()
    assert r.exit_code == 1 and len(line.splitlines()) == 1, (r.exit_code, line)
    said = line.replace(str(tmp_path), "TMP")  # (the test's name holds "failed")
    assert said.count("failed") == 2, line  # ("backup failed: writing ... failed (...)")
    assert "writing the backup failed" not in line, line
    assert "writing the backup's LMDB copy without the bytes a purge erased failed (No " \
           "space left on device); the partial copy was removed" in line, line
    assert "stays owed" not in line and "[Errno" not in line, line
    assert line.count(dest) == 1 and "incomplete-backup" not in line, line
    assert not os.path.exists(dest)


# ---- probe: a backup into a directory it may not write -------------------------------------
def test_a_backup_into_an_unwritable_directory_names_no_staging_directory(tmp_path):
    """`walstore backup SRC RO/bk`, RO not writable (run as a user the mode bits apply
    to).  The line ended "[EACCES]: RO (Permission denied [EACCES]:
    RO/bk.incomplete-backup-<pid>-xxxx)": the chained OS error of the staging
    directory's mkdir, a name the user never asked for (and that was never made).  Now
    RO, once."""
    src, ro = str(tmp_path / "s"), tmp_path / "ro"
    with walstore.open(src, durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    ro.mkdir()
    ro.chmod(0o555)
    os.chmod(tmp_path, 0o755)
    try:
        r = subprocess.run(without_root_privilege() + [
            sys.executable, "-m", "walstore", "backup", src, str(ro / "bk")],
            capture_output=True, text=True, env=cli_env(), timeout=60)
    finally:
        ro.chmod(0o755)
    line = r.stderr.strip()
    assert r.returncode == 1 and len(line.splitlines()) == 1, (r.returncode, line)
    assert "incomplete-backup" not in line, line
    assert "(Permission denied)" in line and line.endswith(f"[EACCES]: {ro}"), line
    assert line.count("Permission denied") == 1, line
    assert os.listdir(ro) == []
