"""Upgrading: stores written by older walstores, opened by this one (audit 61).

Probed with the code of walstore 0.1.0 (79f03ed), the first 0.2.0 commits with reversible
files (b700756), the last store format version 1 (425d08a) and a version 2 walstore
before the ``owed`` table (91770e8): stores using every feature, and stores whose writer
was killed mid-load with actions in flight, opened by this walstore.  What broke is
tested here on stores that hold the old shapes, written directly (no old code needed).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli_main
from walstore.log.records import RecordType


def cli(*args: str):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def legacy_point(store: walstore.Store, name: str) -> None:
    """A RESTORE_POINT record as walstore 0.1.0 wrote one (``{"name", "ts"}``): 0.1.0 let
    a point be named ``tx:N`` or ``lsn:N`` (it refused only all-digit names)."""
    store._engine.log_event(RecordType.RESTORE_POINT, {"name": name, "ts": time.time()},
                            durable=True)


def store_with_legacy_points(root: Path) -> None:
    with walstore.open(str(root)) as s:
        for i in range(8):
            with s.transaction() as tx:
                tx.put("k", i)
            if i == 5:
                legacy_point(s, "tx:2")
                legacy_point(s, "lsn:1")
        assert set(s.restore_points()) == {"tx:2", "lsn:1"}


def test_a_legacy_point_named_like_a_txid_is_never_silently_taken_for_it(tmp_path):
    """A 0.1.0 store's restore point 'tx:2' (the state k=5): `diff --from tx:2` showed the
    state of transaction 2 (k=1), exit 0, and `rewind --to tx:2` rewound there; the point
    itself could not be named on the command line at all.  Now the spelling is refused
    as ambiguous (exit 2, both readings named) and ``name:tx:2`` names the point."""
    root = tmp_path / "s"
    store_with_legacy_points(root)
    r = cli("diff", root, "--from", "tx:2")
    assert r.exit_code == 2, r.output
    assert "ambiguous" in r.output and "name:tx:2" in r.output
    r = cli("diff", root, "--from", "name:tx:2", "--json")
    assert r.exit_code == 0, r.output
    assert [(k["key"], k["before"]) for k in json.loads(r.stdout)["keys"]] == [("k", 5)]
    r = cli("diff", root, "--from", "2", "--json")  # bare digits: the transaction
    assert [(k["key"], k["before"]) for k in json.loads(r.stdout)["keys"]] == [("k", 1)]
    for args in (("rewind", root, "--to", "tx:2", "--dry-run"),
                 ("rewind", root, "--to", "lsn:1", "--dry-run"),
                 ("files", root, "--at", "tx:2"),
                 ("diff", root, "--from", "2", "--to", "lsn:1")):
        r = cli(*args)
        assert r.exit_code == 2 and "ambiguous" in r.output, (args, r.output)
    r = cli("rewind", root, "--to", "lsn:01", "--dry-run", "--json")  # (the LSN, spelled
    assert r.exit_code == 0, r.output                                 # as the error says)
    r = cli("rewind", root, "--to", "name:lsn:1", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    r = cli("rewind", root, "--to", "name:tx:2")
    assert r.exit_code == 0, r.output
    with walstore.open(str(root)) as s:
        assert s.get("k") == 5
        assert s.log(limit=1)[0].meta == {"rewind": "tx:2"}  # (the Python API: a str is a
        s.drop_restore_point("tx:2")                          # name, as it always was)
    r = cli("diff", root, "--from", "tx:2", "--json")  # (no such point now: the txid)
    assert r.exit_code == 0, r.output


def test_name_prefix_keeps_a_point_literally_named_name_colon(tmp_path):
    """``name:X`` is the point X; a point named 'name:x' itself (a name this walstore
    gives too) is still reached by its own spelling when no point 'x' exists."""
    root = tmp_path / "s"
    with walstore.open(str(root)) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.restore_point("name:x")
        with s.transaction() as tx:
            tx.put("k", 2)
    r = cli("diff", root, "--from", "name:x", "--json")
    assert r.exit_code == 0, r.output
    assert [k["before"] for k in json.loads(r.stdout)["keys"]] == [1]
    with walstore.open(str(root)) as s:
        s.restore_point("x")
    r = cli("diff", root, "--from", "name:x")
    assert r.exit_code == 2 and "name:name:x" in r.output, r.output
    r = cli("diff", root, "--from", "name:name:x", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["keys"][0]["before"] == 1


def test_restore_from_a_replica_holding_a_legacy_point_name(tmp_path):
    """`restore --to tx:2` restored transaction 2's state, exit 0, from a replica whose
    0.1.0 writer had named a restore point 'tx:2'; `replicas` listed it as 'tx:2', which
    pasted back named the transaction."""
    root, rep = tmp_path / "s", tmp_path / "rep"
    with walstore.open(str(root), replicate_to=rep.as_uri()) as s:
        for i in range(8):
            with s.transaction() as tx:
                tx.put("k", i)
            if i == 5:
                legacy_point(s, "tx:2")
        s.sync_replica(timeout=30)
    r = cli("replicas", rep.as_uri())
    assert "name:tx:2" in r.output, r.output
    r = cli("restore", rep.as_uri(), tmp_path / "d1", "--to", "tx:2")
    assert r.exit_code == 2 and "ambiguous" in r.output, r.output
    assert not (tmp_path / "d1").exists()
    r = cli("restore", rep.as_uri(), tmp_path / "d2", "--to", "name:tx:2")
    assert r.exit_code == 0, r.output
    with walstore.open(str(tmp_path / "d2")) as d:
        assert d.get("k") == 5


def test_a_scoped_undo_over_an_action_0_1_0_declared_in_scope_empty(tmp_path, monkeypatch):
    """walstore 0.1.0 let ``tx.action(..., scope="")`` through (its action scope was not
    checked; '' is around every str scope).  Every scoped rewind or revert of an upgraded
    store over such an action raised EmptyArgumentError "a scope is a non-empty key
    prefix (str or bytes), not ''" — the caller had passed scope='a/' — and changed
    nothing, for as long as the action was retained.  The actions are logged here with
    0.1.0's check (only the type of a scope), the undo runs with this walstore's code."""
    import walstore.agent.scope as scope_mod
    root = tmp_path / "s"
    ran: list[str] = []
    with monkeypatch.context() as m:
        def check_scope_0_1_0(scope):
            if scope is None or isinstance(scope, (str, bytes)):
                return scope
            raise TypeError("a scope is a key prefix (str or bytes) or None")
        m.setattr(scope_mod, "check_scope", check_scope_0_1_0)
        with walstore.open(str(root), compensators={"refund": ran.append}) as s:
            with s.transaction() as tx:
                tx.put("a/x", 0)
                tx.put("b/x", 0)
            s.restore_point("start")
            with s.transaction() as tx:
                tx.put("a/x", 1)
                with tx.action("charge", compensate="refund", scope="") as act:
                    act.result = 1
            with s.transaction() as tx:
                tx.put("b/x", 1)
                with tx.action("mail", compensate="refund", scope="") as act:
                    act.result = 2
            mail_txid = tx.id
            assert {a.scope for a in s.actions()} == {""}
    with walstore.open(str(root), compensators={"refund": lambda a: ran.append(a.id)}) as s:
        plan = s.rewind("start", scope="a/", dry_run=True)
        assert [a.name for a in plan.compensations] == ["charge"]
        s.rewind("start", scope="a/")
        assert (s.get("a/x"), s.get("b/x")) == (0, 1)
        s.revert(mail_txid, scope="b/")
        assert (s.get("a/x"), s.get("b/x")) == (0, 0)
        assert sorted(a.state for a in s.actions()) == ["compensated", "compensated"]
    assert len(ran) == 2


def test_a_session_with_a_long_id_written_by_0_1_0_is_still_read(tmp_path):
    """walstore 0.1.0 named every WalstoreSession by its percent-encoded id; since
    fe4414d one encoded past 160 characters is named by its digest.  A conversation 0.1.0
    stored under such an id read as empty after the upgrade (get_items() [] with its items
    in the store, its restore point unknown), and the next turn began it anew.  The keys
    and the point are written here in 0.1.0's layout (``oa/<quote(id)>/i/main/<seq>``, a
    restore point named ``oa/<quote(id)>/<name>``), as its session wrote them."""
    import asyncio
    from urllib.parse import quote

    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession

    sid = "user:" + "x" * 200
    old = f"oa/{quote(sid, safe='')}/"
    root = tmp_path / "s"
    with walstore.open(str(root)) as s:
        with s.transaction() as tx:
            tx.put(f"{old}i/main/{1:020d}", {"role": "user", "content": "hi"})
        legacy_point(s, old + "t1")
        with s.transaction() as tx:
            tx.put(f"{old}i/main/{2:020d}", {"role": "assistant", "content": "hello"})

    async def run(s):
        sess = WalstoreSession(sid, s)
        assert sess.scope == old
        assert [i["content"] for i in await sess.get_items()] == ["hi", "hello"]
        await sess.rewind("t1")
        assert [i["content"] for i in await sess.get_items()] == ["hi"]
        await sess.add_items([{"role": "user", "content": "again"}])
        assert [i["content"] for i in await WalstoreSession(sid, s).get_items()] == \
            ["hi", "again"]
        short = WalstoreSession("user:" + "y" * 200, s)  # (a new long id: its digest)
        assert short.scope.startswith("oa/#")

    with walstore.open(str(root)) as s:
        asyncio.run(run(s))
        with s.transaction() as tx:  # the session stored under both names: refused
            tx.put(f"oa/#{__import__('hashlib').sha256(sid.encode()).hexdigest()}/head",
                   "main")
        with pytest.raises(walstore.WalstoreError, match="stored twice"):
            WalstoreSession(sid, s)


_NOTE_CHILD = """
import os, sys, walstore
from walstore.log.records import RecordType
def down(a):
    raise RuntimeError("refund API down")
s = walstore.open(sys.argv[1], compensators={"refund": down})
for i in range(2):
    try:
        with s.transaction() as tx:
            with tx.action("charge", args={"i": i}, compensate="refund") as act:
                act.result = i
            raise ValueError("boom")
    except walstore.CompensationFailed:
        pass
notes = {"1.1": {"ticket": 42, "by": "ops"}, "2.1": 1234}
for a in s.pending_compensations():  # (walstore 0.1.0's resolve(id, note): its COMPENSATED
    s._engine.log_event(RecordType.COMPENSATED, {  # record, the note logged as given)
        "id": a.id, "state": "resolved", "error": notes[a.id], "attempts": a.attempts},
        a.txid, durable=True)
if sys.argv[2] == "kill":
    os._exit(9)
s.close()
"""


@pytest.mark.parametrize("end", ["close", "kill"])
def test_a_resolve_note_0_1_0_logged_as_a_dict_or_int_does_not_make_the_store_corrupt(
        tmp_path, end):
    """walstore 0.1.0 (and 0.2.0 until 70cb304) logged ``store.resolve(id, note)``'s note
    in the action's ``error`` whatever its type (``note={"ticket": 42}``, ``note=1234``).
    Since the record and row shape checks (8bb58ad, 46156a2) such a store could not be
    opened at all: CorruptionError "bad-payload: ... field 'error' is not a str" from
    every open (strict recovery, cleanly closed or not), `walstore actions` and `verify`
    reporting damage.  Now a resolved action's error may be any value a walstore logged,
    read as text.  The store is written by a real process (killed in one case) with the
    record in 0.1.0's shape."""
    import subprocess
    import sys
    root = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", _NOTE_CHILD, str(root), end],
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == (9 if end == "kill" else 0)
    r = cli("verify", root)
    assert r.exit_code == 0, r.output
    r = cli("actions", root, "--json")
    assert r.exit_code == 0, r.output
    errors = {a["id"]: (a["state"], a["error"]) for a in json.loads(r.stdout)["actions"]}
    assert errors == {"1.1": ("resolved", "{'ticket': 42, 'by': 'ops'}"),
                      "2.1": ("resolved", "1234")}
    with walstore.open(str(root)) as s:
        assert sorted((a.id, a.state, a.error) for a in s.actions()) == [
            ("1.1", "resolved", "{'ticket': 42, 'by': 'ops'}"), ("2.1", "resolved", "1234")]
        assert s.pending_compensations() == []
        with s.transaction() as tx:
            tx.put("after", 1)
    r = cli("verify", root)
    assert r.exit_code == 0, r.output
