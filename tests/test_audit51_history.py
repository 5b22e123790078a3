"""Findings of stop 51 in history, retention and purge, each named after the promise it
broke (contract, "Action rollback").  Crash cases use real processes killed with -9 (the
child sends itself SIGKILL at the chosen point: a purge's commit durable but not applied,
a trim's horizon recorded but no row deleted); the full-disk case a real small tmpfs."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli

from store_support import cli_env

MARKER = "FORGET-ME-51c2"


# ---- purge: no API returns the keys, a read-only open after a crash included ------------

PURGE_KILLED_BEFORE_APPLY = textwrap.dedent(r"""
    import os, signal, sys
    import walstore
    from walstore.engine import apply as A
    orig = A.Applier.apply
    def apply(self, events, *a, **k):  # kill -9 once the purge's commit is durable,
        if any(e.type == A._T.COMMIT and isinstance(e.body, dict) and "purge" in e.body
               for e in events):                                 # before its apply
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, events, *a, **k)
    A.Applier.apply = apply
    s = walstore.open(sys.argv[1])
    with s.transaction() as tx:  # (not applied either: the log's tail, in no LMDB row)
        tx.put("conv/1/late", sys.argv[2] + "-late")
        tx.put("keep/late", 1)
    s.purge("conv/1/")
""")


def _purge_killed_before_its_apply(tmp_path) -> tuple[str, dict]:
    path = str(tmp_path / "s")
    txids = {}
    with walstore.open(path) as s:
        for i in range(6):
            with s.transaction() as tx:
                tx.put(f"conv/1/m{i % 2}", f"{MARKER}-{i}")
                tx.put(f"keep/{i % 3}", i)
            txids[i] = tx.id
        s.restore_point("before")
        s.checkpoint()  # (those rows are in LMDB)
    p = subprocess.run([sys.executable, "-c", PURGE_KILLED_BEFORE_APPLY, path, MARKER],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == -9, p.stderr
    return path, txids


def test_no_api_returns_purged_keys_log_txn_info_diff_after_a_purge_killed_before_apply(
        tmp_path):
    # Before: a read-only open of a store whose writer was killed after the purge's commit
    # was durable but before it was applied hid the keys from get/history/at, yet
    # store.log() and txn_info() listed their names in TxnInfo.keys (and .extra), and
    # `walstore diff --json` printed the purged values.
    path, txids = _purge_killed_before_its_apply(tmp_path)
    with walstore.open(path, readonly=True) as r:
        assert r.get("conv/1/m0") is None and r.history("conv/1/m0") == []
        for info in r.log():
            assert not [k for k in info.keys if k.startswith("conv/1/")], info
            assert MARKER not in repr(info.extra) and "conv/1/m" not in repr(info.extra)
        assert r.txn_info(txids[0]).keys == ("keep/0",)
        assert r.get("keep/late") == 1  # (the rest of the log's tail is as it was)
        assert [i.keys for i in r.log(limit=2)][1] == ("keep/late",)
    for args in (["diff", path, "--from", "lsn:0", "--json"],
                 ["diff", path, "--from", "before", "--json"],
                 ["log", path, "--json"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        assert MARKER not in out.output and "conv/1/" not in out.output.replace(
            '"purge": "conv/1/"', ""), (args, out.output)
    doc = json.loads(CliRunner().invoke(cli, ["diff", path, "--from", "lsn:0",
                                              "--json"]).output)
    assert {k["key"] for k in doc["keys"]} == {"keep/0", "keep/1", "keep/2", "keep/late"}
    with walstore.open(path) as s:  # (the writer's open applies and erases it)
        assert [k for i in s.log() for k in i.keys if k.startswith("conv/")] == []


# ---- retention: a point trimmed while a view of it is in use raises, never empties -------

def test_a_view_trimmed_while_in_use_raises_history_trimmed_from_scan_never_an_empty_range(
        tmp_path):
    # Before: get() and `in` of the view raised HistoryTrimmed, but view.scan(prefix=...)
    # of a range whose keys retention trimmed out of the history index (a key deleted
    # after the point, nothing following: it keeps no row) returned [] — the range read
    # as empty at a point where it held a key.
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=2) as s:
        with s.transaction() as tx:
            tx.put("d/1", "was here")
            tx.put("e", 0)
        with s.transaction() as tx:
            tx.put("e", 1)
        view = s.at(tx.id)
        assert list(view.scan(prefix="d/")) == [("d/1", "was here")]
        with s.transaction() as tx:
            tx.delete("d/1")
        for i in range(4):
            with s.transaction() as tx:
                tx.put("e", 10 + i)
        s.checkpoint()  # (trims: the view's point is older than the horizon now)
        with pytest.raises(walstore.HistoryTrimmed):
            view.get("d/1")
        with pytest.raises(walstore.HistoryTrimmed):
            list(view.scan(prefix="d/"))
        with pytest.raises(walstore.HistoryTrimmed):
            list(view.scan(prefix="nothing-here/"))
        with pytest.raises(walstore.HistoryTrimmed):
            list(view.scan(prefix="d/", reverse=True))
        fresh = s.at(s.log(limit=1)[0].txid)  # (a retained point's view reads as before)
        assert list(fresh.scan(prefix="d/")) == [] and fresh.get("e") == 13


# ---- retention: the log lists only retained transactions, after a trim a crash cut short --

TRIM_KILLED = textwrap.dedent(r"""
    import os, signal, sys
    import walstore
    from walstore.engine import apply as A
    def die(self, commits, horizon):  # kill -9 once the horizon moved, before any row goes
        os.kill(os.getpid(), signal.SIGKILL)
    s = walstore.open(sys.argv[1], retain_transactions=3)
    for i in range(10):
        with s.transaction(meta={"i": i}) as tx:
            tx.put("k", i)
    A.Applier.trim_history = die
    s.checkpoint()  # (applies every commit, then trims: the open after the kill redoes none)
""")


@pytest.mark.parametrize("readonly", [False, True])
def test_log_lists_only_retained_transactions_after_a_trim_killed_midway(tmp_path, readonly):
    # Before: kill -9 after a trim recorded its horizon but before it deleted the rows
    # below it; the next open (which redid nothing, so did not trim) listed all 10
    # transactions in log() and txn_info(), though at(txid) and log(since=...) of the
    # 7 older than the horizon raised HistoryTrimmed: paging with log(oldest_first=True)
    # then since=LSN(last.lsn), as documented, failed on the first page.
    path = str(tmp_path / "s")
    p = subprocess.run([sys.executable, "-c", TRIM_KILLED, path], capture_output=True,
                       text=True, timeout=120, env=cli_env())
    assert p.returncode == -9, p.stderr
    with walstore.open(path, retain_transactions=3, readonly=readonly) as s:
        log = s.log()
        assert [i.meta["i"] for i in log] == [9, 8, 7]
        for info in log:
            assert s.at(info.txid).get("k") == info.meta["i"]
        first = s.log(limit=1, oldest_first=True)[0]
        assert first.meta["i"] == 7
        assert [i.meta["i"] for i in s.log(since=walstore.LSN(first.lsn))] == [9, 8]
        with pytest.raises(walstore.HistoryTrimmed):
            s.txn_info(log[-1].txid - 1)  # (its row is still there: trimmed all the same)
    out = CliRunner().invoke(cli, ["log", path, "--json"])
    assert [t["meta"]["i"] for t in json.loads(out.output)["transactions"]] == [9, 8, 7]


# ---- purge on a full disk: a walstore error, and the half-made copy is not left behind ----

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only: skipped where nothing can be mounted)."""
    import os
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_purge_whose_erasure_meets_a_full_disk_raises_a_walstore_error_and_frees_its_copy(
        small_disk):
    # Before: the purge's LMDB rewrite ran out of room and a raw lmdb.Error
    # ("mdb_txn_commit: Input/output error") left store.purge(); the half-written copy
    # (db.compact/) stayed, filling the disk to the last block, and every later writable
    # open (which retries the owed erasure) raised the same raw lmdb.Error.
    import os
    path = os.path.join(small_disk, "s")
    s = walstore.open(path, durability="none", segment_size=65536)
    try:
        i = 0
        while True:
            with s.transaction() as tx:
                for j in range(10):
                    tx.put(f"keep/{i}-{j}", "x" * 400)
                tx.put("conv/a", f"{MARKER}-{i}")
            i += 1
            if i % 20 == 0:
                s.checkpoint()
                st = os.statvfs(small_disk)
                if st.f_bavail * st.f_frsize < 700_000:
                    break
        with pytest.raises(walstore.WalstoreError) as err:
            s.purge("conv/")
        assert isinstance(err.value, OSError) and err.value.errno is not None, err.value
        assert not os.path.exists(os.path.join(path, "db.compact"))
        st = os.statvfs(small_disk)  # (its half-made copy went: the disk is not full)
        assert st.f_bavail * st.f_frsize > 300_000
        assert s.get("conv/a") is None and s.history("conv/a") == []  # (it committed)
        with s.transaction() as tx:  # and the store goes on
            tx.put("after", 1)
    finally:
        s.close()
    with pytest.raises(walstore.WalstoreError):  # the owed erasure still cannot run:
        walstore.open(path)                       # said so, as a walstore error
    assert not os.path.exists(os.path.join(path, "db.compact"))
    with walstore.open(path, readonly=True) as r:
        assert r.get("after") == 1 and r.get("conv/a") is None
    subprocess.run(["mount", "-o", "remount,size=16m", small_disk], check=True)
    with walstore.open(path) as s:  # room again: the open finishes the erasure
        assert s.get("after") == 1
    from store_support import files_with
    assert files_with(path, MARKER.encode()) == []


def test_a_files_view_trimmed_while_in_use_raises_history_trimmed_never_absent_or_corrupt(
        tmp_path):
    # Before: store.at(p).files(ws) kept after retention trimmed p answered from what
    # was left: a file that existed at p (deleted since) read as "did not exist"
    # (FileNotFoundError) and exists() said False, and a file whose old content the
    # blob gc removed raised CorruptionError ("the stored content ... is damaged").
    root = tmp_path / "ws"
    root.mkdir()
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=2) as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            tx.files(ws).write("f.txt", "v1")
            tx.files(ws).write("g.txt", "g1")
        files = s.at(tx.id).files(ws)
        with s.transaction() as tx:
            tx.files(ws).write("f.txt", "v2")
            tx.files(ws).delete("g.txt")
        assert files.read("f.txt") == b"v1" and files.exists("g.txt")
        for i in range(5):
            with s.transaction() as tx:
                tx.files(ws).write("f.txt", f"v{3 + i}")
        s.checkpoint()  # (trims the view's point; the blob gc drops v1's content)
        for call in (lambda: files.read("f.txt"), lambda: files.read("g.txt"),
                     lambda: files.exists("g.txt"), lambda: files.entry("f.txt"),
                     lambda: b"".join(files.stream("f.txt"))):
            with pytest.raises(walstore.HistoryTrimmed):
                call()
        now = s.at(tx.id).files(ws)  # (a retained point reads as before)
        assert now.read("f.txt") == b"v7" and not now.exists("g.txt")


# ---- purge: a purge whose apply failed is still a purge to every read of that process ----

PURGE_APPLY_FAILS = textwrap.dedent(r"""
    import json, os, resource, signal, sys, time
    import walstore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (EFBIG instead)
    path, marker = sys.argv[1], sys.argv[2]
    s = walstore.open(path, durability="none", segment_size=8 << 20)
    for i in range(40):
        with s.transaction() as tx:
            for j in range(50):
                tx.put(f"conv/{i}-{j}", marker + "z" * 200)
            tx.put("o", i)
    first = tx.id - 39
    s.restore_point("rp")
    s.checkpoint()
    time.sleep(0.5)  # (the WAL's spare segment is made: the log itself needs no growth)
    size = os.path.getsize(os.path.join(path, "db", "data.mdb"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # LMDB cannot grow: the
    out = {}                                                   # purge's apply fails
    try:
        s.purge("conv/")
    except walstore.WalstoreError as e:
        out["purge"] = type(e).__name__
    out["history"] = [v.value for v in s.history("conv/0-0")]
    out["at"] = s.at("rp").get("conv/0-0")
    out["at_scan"] = [k for k, _v in s.at("rp").scan(prefix="conv/")]
    out["log"] = [k for i in s.log() for k in i.keys if k.startswith("conv/")]
    out["txn_info"] = list(s.txn_info(first).keys)
    print(json.dumps(out), flush=True)
    os._exit(0)
""")


def test_no_api_of_the_writer_returns_purged_keys_when_the_purges_apply_failed(tmp_path):
    # Before: the purge committed (durable; every later open shows it) but applying it to
    # LMDB failed (no room to grow the file) and the store turned read-only; the same
    # process then still returned the purged values from history() and at(point) (get
    # and scan, of a point before the purge) and their names from log() and txn_info():
    # only a read-only store hid a purge LMDB did not hold yet.
    path = str(tmp_path / "s")
    p = subprocess.run([sys.executable, "-c", PURGE_APPLY_FAILS, path, MARKER],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # (the apply failed; since audit 52 a purge that committed says so: ErasureOwed)
    assert out["purge"] == "ErasureOwed", out
    assert out["history"] == [] and out["at"] is None and out["at_scan"] == [], out
    assert out["log"] == [] and out["txn_info"] == ["o"], out
    with walstore.open(path) as s:  # (it was committed: the next open applies it)
        assert s.history("conv/0-0") == [] and s.get("o") == 39
    from store_support import files_with
    assert files_with(path, MARKER.encode()) == []
