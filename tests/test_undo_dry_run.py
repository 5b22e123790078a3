"""``rewind``/``revert`` with ``dry_run``: a plan, read from one snapshot, that changes
nothing and takes no write path (walstore.agent.undo, ``_PlanSnapshot``).

A probe found that the planner began the undo's write transaction even for a dry run: the
CLI's ``walstore rewind --dry-run`` opened the store to write, so while an agent process
held it open the operator's question "what would a rewind do?" failed with StoreLocked,
and a read-only store refused the dry run (ReadOnlyError).  Here the agent is a real
process (agent_scripts/dryrun_writer.py) holding the store open; the dry runs run in
other processes, and their plan is checked against what the real rewind then did.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import walstore

from line_process import LineProcess

SCRIPTS = Path(__file__).resolve().parent / "agent_scripts"
ROOT = Path(__file__).resolve().parents[1]


def _wal_segments(path) -> dict[str, bytes]:
    """The WAL's segments, byte for byte (not the spare segment its thread zero-fills)."""
    wal = os.path.join(str(path), "wal")
    return {n: Path(wal, n).read_bytes() for n in sorted(os.listdir(wal)) if n.endswith(".wal")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, env=env, timeout=120)


class Agent(LineProcess):
    """agent_scripts/dryrun_writer.py: the agent process holding the store open."""

    def __init__(self, store: str, ws: str) -> None:
        super().__init__(SCRIPTS / "dryrun_writer.py", store, ws)


def _dry_run(store: str, *extra: str) -> dict:
    r = _cli("rewind", store, "--to", "p", *extra, "--dry-run", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["dry_run"] is True
    return doc["plan"]


def _same(plan: dict, did: dict) -> None:
    """The plan is what the real rewind did: the transactions it undid, the keys it wrote,
    the files it put back, the compensations it claimed and ran (newest first)."""
    assert plan["txids"] == did["reverts"]
    assert plan["keys"] == did["keys"]
    assert plan["files"] == did["files"]
    ids = [c["id"] for c in plan["compensations"]]
    assert ids == did["compensate"] == did["refunds"]


def test_cli_dry_run_beside_the_agent_holding_the_store(tmp_path):
    store, ws = str(tmp_path / "s"), str(tmp_path / "ws")
    os.mkdir(ws)
    agent = Agent(store, ws)
    try:
        wal = _wal_segments(store)
        scoped = _dry_run(store, "--scope", "agents/a/")
        whole = _dry_run(store)
        assert _wal_segments(store) == wal  # the dry runs appended nothing
        assert scoped["scope"] == "agents/a/"
        assert scoped["keys"] == ["agents/a/x", "agents/a/z"]
        assert len(whole["txids"]) == 3 and whole["files"] and whole["compensations"]
        # the agent holds the store: a real rewind from the CLI is still refused
        r = _cli("rewind", store, "--to", "p", "--json")
        assert r.returncode != 0 and "StoreLocked" in r.stdout
        _same(scoped, agent("rewind", "p", "agents/a/"))
        again = _dry_run(store)  # after the scoped rewind: it is undone too now, and
        # the scoped transaction it undid already is not listed (nothing of it changes)
        assert again["txids"][0] not in whole["txids"] and len(again["txids"]) == 3
        assert again["txids"][1:] == whole["txids"][:2]
        _same(again, agent("rewind", "p"))
        last = _dry_run(store)  # as of p already: nothing would change
        assert (last["keys"], last["files"], last["compensations"]) == ([], [], [])
    finally:
        agent.close()


def test_api_dry_run_on_a_read_only_store_beside_a_writer_with_an_unapplied_tail(tmp_path):
    """A read-only store plans from LMDB and the writer's WAL tail: a cascading revert's
    later writers that LMDB does not hold yet are in its plan (the same plan as the
    writer's own)."""
    path = str(tmp_path / "s")
    w = walstore.open(path, apply_interval=60, apply_batch=100_000, max_unapplied=1_000_000)
    try:
        w.compensator("refund")(lambda a: None)
        with w.transaction() as tx:
            tx.put("k", 0)
        first = tx.id
        w.checkpoint()
        for i in (1, 2):
            with w.transaction(scope="agents/a/") as tx:
                tx.put("k", i)
                tx.put(f"agents/a/{i}", i)
                with tx.action("charge", args=i, compensate="refund") as act:
                    act.result = i
        assert w.stats()["applied_lsn"] < tx.lsn  # the tail is not in LMDB
        wal = _wal_segments(path)
        # (registering what the writer registers: a plan says which compensations this
        # process would run, audit55)
        with walstore.open(path, readonly=True, compensators={"refund": lambda a: None}) as r:
            got = r.revert(first, cascade=True, dry_run=True).as_dict()
            assert len(got["txids"]) == 3 and len(got["compensations"]) == 2
            assert got == w.revert(first, cascade=True, dry_run=True).as_dict()
            got = r.rewind(first, scope="agents/a/", dry_run=True).as_dict()
            assert got == w.rewind(first, scope="agents/a/", dry_run=True).as_dict()
            assert got["keys"] == ["agents/a/1", "agents/a/2", "k"]
            with pytest.raises(walstore.ReadOnlyError):
                r.rewind(first)  # (only the dry run reads)
        assert _wal_segments(path) == wal
    finally:
        w.close()


def test_dry_run_on_the_writer_takes_no_write_path(tmp_path):
    """On the open store, a dry run begins no transaction: no txid spent, nothing logged,
    and an open transaction of the owner on the same keys commits as if it never ran."""
    s = walstore.open(str(tmp_path / "s"))
    try:
        with s.transaction() as tx:
            tx.put("agents/a/k", 0)
        s.restore_point("p")
        with s.transaction() as tx:
            tx.put("agents/a/k", 1)
        owner = s.transaction()
        owner.put("agents/a/k", owner.get("agents/a/k") + 1)
        wal = _wal_segments(s.path)
        plans = []
        t = threading.Thread(target=lambda: plans.extend(
            [s.rewind("p", dry_run=True), s.revert(tx.id, dry_run=True),
             s.rewind("p", scope="agents/a/", dry_run=True)]))
        t.start()
        t.join()
        assert [p.keys for p in plans] == [["agents/a/k"]] * 3
        assert _wal_segments(s.path) == wal
        owner.commit()
        assert s.get("agents/a/k") == 2
        with s.transaction() as after:
            after.put("x", 1)
        assert after.id == owner.id + 1  # the dry runs began no transaction (spent no txid)
    finally:
        s.close()


def test_read_only_dry_run_refuses_a_tail_with_unapplied_file_history(tmp_path):
    """A commit of the writer's WAL tail changed files: their history is not readable from
    a read-only store until the writer applies it; the dry run says so (ReadOnlyError)
    rather than give a plan that leaves those paths out."""
    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    w = walstore.open(path, apply_interval=60, apply_batch=100_000, max_unapplied=1_000_000)
    try:
        ws = w.workspace(str(root))
        with w.transaction() as tx:
            tx.put("k", 0)
        w.checkpoint()
        with w.transaction() as tx2:
            tx2.files(ws).write("f.txt", "x")
        with walstore.open(path, readonly=True) as r:
            with pytest.raises(walstore.ReadOnlyError, match="not applied"):
                r.rewind(tx.id, dry_run=True)
            w.checkpoint()
            assert r.rewind(tx.id, dry_run=True).files == [str(root.resolve() / "f.txt")]
    finally:
        w.close()


def test_cli_dry_run_still_refuses_a_crashed_store(tmp_path):
    """Opened read-only, the dry run still refuses a store that needs recovery (no writer
    alive): recovery may change what the undo would do."""
    path = str(tmp_path / "s")
    code = ("import os, walstore\n"
            f"s = walstore.open({path!r})\n"
            "with s.transaction() as tx: tx.put('k', 1)\n"
            "s.restore_point('p')\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(
        os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    r = _cli("rewind", path, "--to", "p", "--dry-run", "--json")
    assert r.returncode == 1 and "NeedsRecovery" in r.stdout and "walstore recover" in r.stdout
