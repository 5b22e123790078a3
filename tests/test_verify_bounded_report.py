"""`walstore verify` on a store with more damage than a report should hold: it names the
first MAX_LISTED problems and counts the rest (memory and output grew with the damage:
one string per damaged row, every one printed)."""
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
