"""`walstore verify` on damaged stores: more damage than a report should hold (it names
the first MAX_LISTED problems and counts the rest: memory and output grew with the damage,
one string per damaged row, every one printed), and a store that lost its STORE file."""
from __future__ import annotations

import json

import lmdb
from click.testing import CliRunner

import walstore
from walstore.cli import main as walstore_cli
from walstore.ops.verify import MAX_LISTED, verify_store


def _damage_every_row(path: str) -> int:
    env = lmdb.open(f"{path}/db", max_dbs=32, subdir=True)
    try:
        data = env.open_db(b"data", create=False)
        with env.begin(write=True, db=data) as txn:
            keys = [k for k, _v in txn.cursor()]
            for k in keys:
                txn.put(k, b"\xc1")  # (never valid msgpack)
        return len(keys)
    finally:
        env.close()


def test_verify_lists_a_bounded_number_of_problems_and_counts_the_rest(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        with s.transaction() as tx:
            tx.update((f"k{i:05d}", i) for i in range(MAX_LISTED + 500))
    damaged = _damage_every_row(path)
    assert damaged >= MAX_LISTED + 500
    rep = verify_store(path)
    assert not rep.ok
    assert len(rep.errors) == MAX_LISTED
    assert rep.errors.total >= damaged and rep.errors.omitted == rep.errors.total - MAX_LISTED

    res = CliRunner().invoke(walstore_cli, ["verify", path, "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert len(doc["errors"]) == MAX_LISTED and doc["errors_omitted"] >= 500
    assert not doc["ok"]

    res = CliRunner().invoke(walstore_cli, ["verify", path])
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert sum(1 for x in lines if x.startswith("error: ")) == MAX_LISTED + 1
    assert f"and {rep.errors.omitted} more problem(s)" in res.output
    assert f"{rep.errors.total} problem(s) found" in res.output


def test_a_store_whose_store_file_is_lost_is_damage_not_a_wrong_path(tmp_path):
    """A store directory (log segments, LMDB's data file) without its STORE file is a
    damaged store: exit 1 and a message saying so — not exit 2 and "not a walstore store",
    which told the operator they had typed the wrong path."""
    import os
    import pytest
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        s.run(lambda tx: tx.put("a", 1))
    os.remove(os.path.join(path, "STORE"))
    for args in (["verify", path], ["verify", path, "--json"], ["get", path, "a"]):
        res = CliRunner().invoke(walstore_cli, args)
        assert res.exit_code == 1, (args, res.output)
        assert "STORE file is missing" in res.output and "damaged" in res.output
    with pytest.raises(walstore.NotAStore, match="STORE file is missing"):
        walstore.open(path)
    # a directory that holds no store is still a usage error, exit 2
    empty = tmp_path / "e"
    (empty / "wal").mkdir(parents=True)
    res = CliRunner().invoke(walstore_cli, ["verify", str(empty)])
    assert res.exit_code == 2 and "not a walstore store" in res.output


OWED_FILE_CHILD = r"""
import sys, time, walstore
s = walstore.open(sys.argv[1])
tx = s.transaction()
tx.files(s.workspace(sys.argv[2])).write("a.txt", "hello\n")
print("ready", flush=True)
time.sleep(100)
"""


def test_verify_lists_a_file_undo_left_owed(tmp_path):
    """A crashed transaction's file changes whose undo failed (its workspace root gone):
    `walstore recover` lists them owed, exit 1; `verify` said "ok", exit 0.  Now it
    lists them under "needs a decision", exit 1, until an open puts them back."""
    import subprocess
    import sys
    path, root = str(tmp_path / "s"), tmp_path / "root"
    root.mkdir()
    p = subprocess.Popen([sys.executable, "-c", OWED_FILE_CHILD, path, str(root)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        p.kill()
        p.wait()
    assert (root / "a.txt").exists()
    root.rename(tmp_path / "gone")
    res = CliRunner().invoke(walstore_cli, ["recover", path])
    assert res.exit_code == 1 and "file-undo-failed" in res.output
    rep = verify_store(path)
    assert not rep.errors and not rep.settled and not rep.ok
    assert rep.owed_file_undos == [{"txid": rep.owed_file_undos[0]["txid"],
                                    "workspace": str(root), "changes": 1}]
    res = CliRunner().invoke(walstore_cli, ["verify", path])
    assert res.exit_code == 1 and "file undo owed" in res.output
    doc = json.loads(CliRunner().invoke(walstore_cli, ["verify", path, "--json"]).output)
    assert doc["owed_file_undos"] and doc["settled"] is False
    (tmp_path / "gone").rename(root)  # the root back: the next open puts the file back
    with walstore.open(path):
        pass
    assert not (root / "a.txt").exists()
    rep = verify_store(path)
    assert rep.ok and rep.owed_file_undos == []
