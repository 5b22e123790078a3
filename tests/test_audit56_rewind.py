"""Audit 56, rewind: restore points, rewind, revert, history/at() views, retention, purge,
backup/copy/restore and their interplay with workspaces and actions.

Findings (each test named below fails on the code before its fix):

- ``store.log()``, ``store.txn_info()`` and ``walstore log --json`` listed each action of a
  transaction as it was at its commit (``state: committed``) for ever: after a rewind (or
  revert) had run the action's compensation — ``store.actions()`` said ``compensated`` —
  the log still said the charge stood, so a script reading the log believed the outside
  world held an effect walstore had undone.  The actions listed are read as they stand
  now (state, error, attempts, result)
  (``test_the_log_says_an_action_a_rewind_compensated_is_compensated``).
- A revert or rewind that had to put a file back under a directory swapped for a symlink
  (or a file) behind walstore's back read the path as "absent, as walstore left it" and
  went ahead: it committed, ran the compensations of what it undid, then could not put
  the file back (walstore never goes through a symlink) and raised FileConflictError
  after the fact — the state said undone, the file said otherwise, and the refund had
  run.  Its dry run said all was well.  Such a path is a RevertConflict naming it now,
  in the plan, before anything changes, unless the undo puts the parent back as a
  directory itself
  (``test_an_undo_whose_path_lies_under_a_parent_swapped_for_a_symlink_is_refused``).
- A directory an undo had to remove (the undone transaction made it) holding a file put
  there by another process: the dry run said all was well, and the undo planned, logged
  and began putting files back, then rolled back at its end with "file(s) changed while
  transaction N was putting them back" — of a file there long before it began.  The
  plan finds it now, RevertConflict naming the directory as changed behind walstore's
  back, dry run included (names the workspace ignores are still removed with it)
  (``test_a_directory_to_remove_holding_a_strangers_file_is_refused_by_the_plan``).
  So is one holding an ignored name older than the change that made the directory (the
  put-back keeps those: a watched ``mv src dst`` carried ``__pycache__`` along), which
  rolled back at the end the same way
  (``test_a_directory_to_remove_holding_an_older_ignored_name_is_refused_by_the_plan``).
- Under ``retain_seconds``, every checkpoint looked for the first young commit from the
  oldest ``txns`` row on, and a restore point pins every commit after it: each
  checkpoint re-read the whole pinned history (20,000 pinned commits: ~0.15 s a
  checkpoint, growing with them, for as long as the point is kept).  The search starts
  where the previous one found a young commit now (what was old then is old still)
  (``test_a_checkpoint_under_retain_seconds_does_not_reread_the_history_a_point_pins``).
"""
from __future__ import annotations

import json
import subprocess
import sys

import walstore

from store_support import CLI, cli_env


def _charged_store(path):
    s = walstore.open(path, durability="none")
    refunds = []
    s.compensator("refund")(lambda a: refunds.append(a.args["n"]))
    with s.transaction() as tx:
        tx.put("balance", 100)
    s.restore_point("start")
    with s.transaction() as tx:
        tx.put("balance", 60)
        with tx.action("charge", args={"n": 40}, compensate="refund") as act:
            act.result = {"charge_id": "ch_1"}
    return s, refunds


def test_the_log_says_an_action_a_rewind_compensated_is_compensated(tmp_path):
    path = str(tmp_path / "s")
    s, refunds = _charged_store(path)
    charged = s.log(limit=1)[0]
    assert [a["state"] for a in charged.actions] == ["committed"]
    s.rewind("start")
    assert refunds == [40] and s.get("balance") == 100
    assert [a.state for a in s.actions()] == ["compensated"]
    info = s.txn_info(charged.txid)
    assert [a["state"] for a in info.actions] == ["compensated"]
    assert info.actions[0]["result"] == {"charge_id": "ch_1"}
    logged = {i.txid: i for i in s.log()}
    assert [a["state"] for a in logged[charged.txid].actions] == ["compensated"]
    s.close()
    p = subprocess.run([sys.executable, "-c", CLI, "log", path, "--json"],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == 0, p.stderr
    rows = {t["txid"]: t for t in json.loads(p.stdout)["transactions"]}
    assert [a["state"] for a in rows[charged.txid]["actions"]] == ["compensated"]


def _workspace_with_a_deleted_file(tmp_path, outside):
    """A store whose last commit deleted ``e/y`` (and charged), ``e`` then swapped for a
    symlink to ``outside`` behind walstore's back."""
    import os
    repo = tmp_path / "repo"
    repo.mkdir()
    s = walstore.open(str(tmp_path / "s"), durability="none")
    refunds = []
    s.compensator("refund")(lambda a: refunds.append(a.args["n"]))
    ws = s.workspace(str(repo))
    with s.transaction() as tx:
        tx.files(ws).write("e/y", "mine")
        tx.put("k", 0)
    s.restore_point("p")
    with s.transaction() as tx:
        tx.files(ws).delete("e/y")
        tx.put("k", 1)
        with tx.action("charge", args={"n": 1}, compensate="refund"):
            pass
    os.rmdir(repo / "e")
    os.symlink(outside, repo / "e")
    return s, refunds, repo


def test_an_undo_whose_path_lies_under_a_parent_swapped_for_a_symlink_is_refused(tmp_path):
    import os
    outside = tmp_path / "outside"
    outside.mkdir()
    s, refunds, repo = _workspace_with_a_deleted_file(tmp_path, str(outside))
    last = s.log(limit=1)[0].txid
    want = [str(repo / "e" / "y")]
    for undo in (lambda **kw: s.revert(last, **kw), lambda **kw: s.rewind("p", **kw)):
        for dry_run in (True, False):
            try:
                undo(dry_run=dry_run)
            except walstore.RevertConflict as e:
                assert e.paths == want, e.paths
            else:
                raise AssertionError("the undo was not refused")
    # nothing changed: no undo committed, nothing compensated, nothing written outside
    assert s.log(limit=1)[0].txid == last
    assert refunds == [] and s.get("k") == 1
    assert [a.state for a in s.actions()] == ["committed"]
    assert os.listdir(outside) == [] and os.path.islink(repo / "e")
    assert s.file_conflicts() == []
    # the parent put back by hand: the undo goes through
    os.unlink(repo / "e")
    os.mkdir(repo / "e")
    s.rewind("p")
    assert (repo / "e" / "y").read_text() == "mine" and refunds == [1] and s.get("k") == 0
    s.close()


def test_a_directory_to_remove_holding_a_strangers_file_is_refused_by_the_plan(tmp_path):
    import os
    repo = tmp_path / "repo"
    repo.mkdir()
    s = walstore.open(str(tmp_path / "s"), durability="none")
    refunds = []
    s.compensator("refund")(lambda a: refunds.append(a.args["n"]))
    ws = s.workspace(str(repo), ignore=["__pycache__/"])
    with s.transaction() as tx:
        tx.put("k", 0)
    s.restore_point("p")
    with s.transaction() as tx:
        tx.files(ws).write("d/x", "x")
        tx.files(ws).write("e/x", "x")
        tx.put("k", 1)
        with tx.action("charge", args={"n": 1}, compensate="refund"):
            pass
    (repo / "d" / "stranger.txt").write_text("not walstore's")
    (repo / "e" / "__pycache__").mkdir()  # (ignored: removed with e, no conflict)
    last = s.log(limit=1)[0].txid
    want = [str(repo / "d")]
    for undo in (lambda **kw: s.revert(last, **kw), lambda **kw: s.rewind("p", **kw)):
        for dry_run in (True, False):  # (the dry run said all was well)
            try:
                undo(dry_run=dry_run)
            except walstore.RevertConflict as e:
                assert e.paths == want, e.paths
                assert "behind walstore's back" in str(e), str(e)
            else:
                raise AssertionError("the undo was not refused")
    assert s.log(limit=1)[0].txid == last and refunds == [] and s.get("k") == 1
    assert sorted(os.listdir(repo / "d")) == ["stranger.txt", "x"]
    os.remove(repo / "d" / "stranger.txt")
    s.rewind("p")
    assert sorted(os.listdir(repo)) == [] and refunds == [1] and s.get("k") == 0
    s.close()


def test_a_checkpoint_under_retain_seconds_does_not_reread_the_history_a_point_pins(
        tmp_path, monkeypatch):
    import time
    from walstore.engine.lmdb_state import LmdbState
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      options=walstore.Options(retain_seconds=0.3))
    s.restore_point("old")  # (pins every commit after it)
    for i in range(400):
        with s.transaction() as tx:
            tx.put(f"k{i % 7}", i)
    time.sleep(0.5)
    with s.transaction() as tx:
        tx.put("x", 0)
    s.checkpoint()  # (the first trim looks at them all: nothing was seen young yet)
    reads = []
    orig = LmdbState.get

    def get(self, key, db=b"data"):
        if db == "txns":
            reads.append(key)
        return orig(self, key, db)
    monkeypatch.setattr(LmdbState, "get", get)
    for n in range(3):
        with s.transaction() as tx:
            tx.put("x", n + 1)
        reads.clear()
        s.checkpoint()
        assert len(reads) < 20, len(reads)  # (400 before: every pinned commit, each time)
    monkeypatch.undo()
    assert s.at("old").get("k0") is None and s.get("k0") == 399
    s.drop_restore_point("old")
    time.sleep(0.5)
    with s.transaction() as tx:
        tx.put("x", 9)
    s.checkpoint()
    assert [i.txid for i in s.log()] == [tx.id]  # (the young one only: the rest trimmed)
    assert s.get("k0") == 399 and s.get("x") == 9
    s.close()


def test_a_directory_to_remove_holding_an_older_ignored_name_is_refused_by_the_plan(tmp_path):
    import os
    import time
    repo = tmp_path / "repo"
    (repo / "src" / "__pycache__").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("a")
    (repo / "src" / "__pycache__" / "a.pyc").write_text("c")
    s = walstore.open(str(tmp_path / "s"), durability="none")
    ws = s.workspace(str(repo), ignore=["__pycache__/"])
    with s.transaction() as tx:
        tx.put("k", 0)
    s.restore_point("p")
    time.sleep(0.1)  # (the cache is older than the move, by more than the ctime slack)
    with s.transaction() as tx:
        with tx.files(ws).watch():  # (the cache moves along, its ctime unchanged)
            subprocess.run(["mv", str(repo / "src"), str(repo / "dst")], check=True)
        tx.put("k", 1)
    for dry_run in (True, False):
        try:
            s.rewind("p", dry_run=dry_run)
        except walstore.RevertConflict as e:
            assert e.paths == [str(repo / "dst")], e.paths
            assert "behind walstore's back" in str(e), str(e)
        else:
            raise AssertionError("the rewind was not refused")
    assert os.listdir(repo) == ["dst"] and s.get("k") == 1
    s.close()
