"""A prepared (in-doubt) transaction working for a scope, and a rewind or purge of it (stop 75).

The undo fence (``tx.undo_fence``) was checked at the prepare only, and the prepared set
ignored fences and scopes: a transaction prepared before a rewind of a scope it works for
(its own ``scope=``, a scope one of its actions was declared in, its fence) and committed
after it stood, its booking ``committed`` and never compensated, beside a scope the rewind
said was as of the point (an OpenAI session's tool, a LangGraph node, the Zope
integration's prepare-then-commit).  Now such a rewind (unscoped, or scoped to a prefix
of the scope; a dry run, and one with nothing to undo, too) or a purge across the scope is
refused while the transaction is in doubt: ConflictError naming its gid, nothing changed,
nothing compensated; after the decision it goes through.  The PREPARE record carries the
scopes (``fence``), so this holds after a SIGKILL too.  A revert is held by keys only, as
before: it undoes the transactions it names, and would not undo the prepared one had that
committed first.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import walstore

SCRIPTS = Path(__file__).resolve().parent / "twophase_scripts"
ROOT = Path(__file__).resolve().parent.parent
GID = "g-in-doubt"


def _booked(store):
    return sorted((a.args["what"], a.state) for a in store.actions())


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


# ---- an OpenAI Agents session -------------------------------------------------------------

@pytest.mark.parametrize("decision", ["commit", "rollback"])
def test_a_session_rewind_waits_for_a_prepared_tool_booking_of_the_session(store, decision):
    """A tool's transaction books in the session's scope and is prepared; another task
    rewinds the session to before the turn.  Before: the rewind went through and the
    tool's commit after it stood — 'oslo' booked for good beside a conversation rewound
    past it.  Now the rewind is refused (nothing changed, nothing compensated); once the
    booking is decided the rewind goes through, and the booking ends compensated once:
    by the rewind (committed) or by the rollback (rolled back)."""
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(f"cancel {a.args['what']}"))

    async def go():
        s = WalstoreSession("u", store)
        await s.add_items([{"role": "user", "content": "hi"}])
        await s.restore_point("p")
        await s.get_items()
        await s.add_items([{"role": "user", "content": "book oslo"}])

        def tool():
            tx = store.transaction()
            with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                           scope=s.scope) as act:
                world.append("book oslo")
                act.result = "oslo"
            tx.put(s.scope + "tool/booked", "oslo")
            tx.prepare(GID)
            return tx
        tx = await asyncio.to_thread(tool)
        with pytest.raises(walstore.ConflictError, match=f"{GID!r}.*decide it first"):
            await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        assert world == ["book oslo"]
        assert [i["content"] for i in await s.get_items()] == ["hi", "book oslo"]
        assert store.prepared() == [GID]
        await asyncio.to_thread(tx.commit if decision == "commit" else tx.rollback)
        assert await asyncio.create_task(WalstoreSession("u", store).rewind("p"))
        assert [i["content"] for i in await s.get_items()] == ["hi"]
    asyncio.run(go())
    assert world == ["book oslo", "cancel oslo"]
    assert _booked(store) == [("oslo", "compensated")]
    assert store.get(WalstoreSession("u", store).scope + "tool/booked") is None


# ---- the core: rewind and purge against each way of working for a scope ---------------------

def _prepare(store, works: str, scope: str = "app/u1/"):
    """A transaction working for ``scope`` as ``works`` says, prepared as GID."""
    tx = store.transaction(scope=scope if works == "scope" else None)
    if works == "fence":
        tx.undo_fence = scope
    elif works == "fence-tuple":
        tx.undo_fence = ("elsewhere/", scope)
    if works == "fence" or works == "fence-tuple":
        tx.snapshot
    with tx.action("book", args={"what": "prepared"}, compensate="cancel",
                   scope=scope if works == "action" else None) as act:
        act.result = "ok"
    tx.put("outside/prepared", 1)   # (no key of the scope: the key holds do not meet it)
    tx.prepare(GID)
    return tx


WORKS = ["scope", "fence", "fence-tuple", "action"]


@pytest.mark.parametrize("undo", ["scoped", "prefix", "unscoped", "nothing-to-undo", "dry-run"])
@pytest.mark.parametrize("works", WORKS)
def test_a_rewind_into_a_scope_a_prepared_transaction_works_for_waits_for_its_decision(
        store, works, undo):
    world: list[str] = []
    store.compensator("cancel")(lambda a: world.append(a.args["what"]))
    with store.transaction(scope="app/u1/") as tx:
        tx.put("app/u1/item", "before")
    point = store.restore_point("p")
    if undo != "nothing-to-undo":
        with store.transaction(scope="app/u1/") as tx:
            tx.put("app/u1/item", "after")
            with tx.action("book", args={"what": "later"}, compensate="cancel",
                           scope="app/u1/") as act:
                act.result = "ok"
    tx = _prepare(store, works)
    scope = {"scoped": "app/u1/", "prefix": "app/", "unscoped": None}.get(undo, "app/u1/")
    last = store.log()[0].txid
    with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for: decide it first"):
        store.rewind(point, scope=scope, dry_run=undo == "dry-run")
    assert store.log()[0].txid == last and world == []   # (nothing changed or ran)
    assert store.get("app/u1/item") == ("before" if undo == "nothing-to-undo" else "after")
    assert store.prepared() == [GID]
    tx.commit()
    store.rewind(point, scope=scope)    # decided: the rewind takes it back with the rest
    assert store.get("app/u1/item") == "before"
    # (its booking compensated when the rewind takes it: declared in the scope, or the
    # transaction tagged with it, or an unscoped rewind; fenced alone, it wrote nothing
    # of the scope and the rewind leaves it be)
    assert ("prepared" in world) == (works in ("action", "scope") or scope is None)


@pytest.mark.parametrize("works", WORKS)
def test_a_purge_across_a_scope_a_prepared_transaction_works_for_waits_for_it(store, works):
    """The purge's range holds the scope: refused while it is in doubt (before: it went
    through, and the commit after it left a booking of the erased scope standing)."""
    with store.transaction() as tx:
        tx.put("app/u1/item", "x")
    tx = _prepare(store, works)
    with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for: decide it first"):
        store.purge("app/")
    assert store.get("app/u1/item") == "x"
    tx.rollback()
    assert store.purge("app/")["keys_deleted"] == 1


def test_a_revert_is_held_by_the_keys_of_a_prepared_transaction_only(store):
    """A revert undoes the transactions it names: the prepared one would not be among them
    had it committed first, unless it wrote or read a key the revert puts back — and those
    keys are held (refused, as before).  So a revert of other work of the scope goes
    through and the prepared transaction's commit stands, as in the order "it, then the
    revert".  (Decided at stop 75; it passed before the change too.)"""
    with store.transaction(scope="app/u1/") as t:
        t.put("app/u1/item", "turn")
    turn = store.log()[0].txid
    with store.transaction(scope="app/u1/") as t:
        t.put("app/u1/read", "r")
    read = store.log()[0].txid
    tx = store.transaction(scope="app/u1/")
    tx.undo_fence = "app/u1/"
    tx.get("app/u1/read")
    tx.put("app/u1/tool", "booked")
    tx.prepare(GID)
    with pytest.raises(walstore.ConflictError, match="held by prepared"):
        store.revert(read)                  # (a key it read: held)
    store.revert(turn, scope="app/u1/")     # (not its work: goes through)
    tx.commit()
    assert (store.get("app/u1/item"), store.get("app/u1/tool")) == (None, "booked")


@pytest.mark.parametrize("undo", ["rewind-other", "rewind-inside", "rewind-sibling-prefix",
                                  "rewind-bytes", "purge-other", "revert-other"])
@pytest.mark.parametrize("works", WORKS)
def test_undos_of_unrelated_scopes_go_through(store, works, undo):
    """Only a rewind reaching into the scope (or a purge across it) waits: another scope's,
    a scope inside it, 'app/u10/' beside 'app/u1/', the bytes scope b'app/u1/' (other
    keys) are not its business."""
    with store.transaction(scope="app/u2/") as t:
        t.put("app/u2/x", 1)
    point = store.restore_point("p")
    for prefix in ("app/u2/", "app/u1/sub/", "app/u10/"):
        with store.transaction(scope=prefix) as t:
            t.put(prefix + "x", 2)
    with store.transaction(scope=b"app/u1/") as t:
        t.put(b"app/u1/x", 2)
    other = store.log()[3].txid   # (newest first: the one in app/u2/)
    tx = _prepare(store, works)
    if undo == "purge-other":
        store.purge("app/u2/")
    elif undo == "revert-other":
        store.revert(other)
    else:
        scope = {"rewind-other": "app/u2/", "rewind-inside": "app/u1/sub/",
                 "rewind-sibling-prefix": "app/u10/", "rewind-bytes": b"app/u1/"}[undo]
        assert store.rewind(point, scope=scope) is not None
    tx.commit()


# ---- after a SIGKILL ---------------------------------------------------------------------

def _prepare_in_child(path, *args) -> None:
    # (this checkout first on the child's path: a walstore installed in the interpreter
    # would be imported instead, and an older one logs no ``fence``)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "prepare_in_scope_and_die.py"),
                           str(path), GID, *args], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert "PREPARED" in proc.stdout


@pytest.mark.parametrize("case", ["commit", "rollback", "old-record"])
def test_the_hold_survives_a_sigkill_until_the_transaction_is_decided(tmp_path, case):
    """A real process prepares a transaction (begun in 'tag/u1/', fenced for 'fence/u1/',
    booking in 'act/u1/') and is killed with SIGKILL.  Reopened, every rewind reaching into
    one of those scopes (and a purge across one) is refused until ``commit_prepared`` or
    ``rollback_prepared`` decides it; other scopes' go through.  ``old-record``: a PREPARE
    written without the ``fence`` field (an older walstore) still reads, and the scope of
    its action (from the action's row) holds too."""
    path = tmp_path / "store"
    with walstore.open(str(path), durability="full") as s:
        with s.transaction() as t:
            for prefix in ("tag/u1/", "fence/u1/", "act/u1/", "other/"):
                t.put(prefix + "k", "before")
        s.restore_point("p")
        with s.transaction(scope="other/") as t:
            t.put("other/k", "after")
    _prepare_in_child(path, *(["--old-record"] if case == "old-record" else []))
    world: list[str] = []
    with walstore.open(str(path), durability="full") as s:
        s.compensator("cancel")(lambda a: world.append(a.args["what"]))
        assert s.prepared() == [GID]
        reaching = ["tag/u1/", "tag/", "act/u1/", None]
        if case != "old-record":   # (an old record says nothing of its fence)
            reaching.append("fence/u1/")
        for scope in reaching:
            with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
                s.rewind("p", scope=scope)
        with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
            s.purge("act/")
        assert s.rewind("p", scope="other/") is not None
        assert world == [] and s.get("tag/u1/k") == "before"
        if case == "rollback":
            s.rollback_prepared(GID)
            assert world == ["oslo"]
        else:
            s.commit_prepared(GID)
            assert s.get("outside/k") == "prepared"
        assert s.rewind("p", scope="act/u1/") is not None or case == "rollback"
        assert world == ["oslo"]          # (compensated once: by the rewind or the rollback)
        assert [st for _w, st in _booked(s)] == ["compensated"]


@pytest.mark.parametrize("fence", ["", 5, ("app/u1/", b"")])
def test_a_fence_that_is_no_scope_is_refused_at_the_prepare_nothing_logged(tmp_path, fence):
    """The fence is logged with the PREPARE now, and a record reader refuses one that is
    no scope: set by hand to '' it made the row unreadable and the store unopenable
    (CorruptionError at every open).  The prepare is refused instead, the transaction left
    open; the store reopens with nothing in doubt."""
    path = str(tmp_path / "store")
    with walstore.open(path, durability="full") as s:
        tx = s.transaction()
        tx.undo_fence = fence
        tx.put("k", 1)
        with pytest.raises((TypeError, ValueError), match="undo fence .* no scope"):
            tx.prepare(GID)
        assert s.prepared() == []
        tx.rollback()
    with walstore.open(path, durability="full") as s:
        assert s.prepared() == [] and s.get("k") is None


def test_a_read_only_dry_run_sees_the_scopes_of_a_transaction_in_doubt(tmp_path):
    """``walstore rewind --dry-run`` opens read-only: its holds are built from the PREPARE
    rows, the scopes included (a plan the real rewind refuses was returned before)."""
    path = str(tmp_path / "store")
    with walstore.open(path, durability="full") as s:
        with s.transaction(scope="app/u1/") as t:
            t.put("app/u1/item", "before")
        s.restore_point("p")
        _prepare(s, "fence")
    with walstore.open(path, readonly=True) as ro:
        with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
            ro.rewind("p", scope="app/", dry_run=True)
        assert ro.rewind("p", scope="app/u2/", dry_run=True).empty()
