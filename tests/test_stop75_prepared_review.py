"""Review of stop 75's hold of a prepared (in-doubt) transaction on the scopes it works for
(tests/test_prepared_in_scope_vs_undo.py): what that change missed.

- A PREPARE written before walstore recorded ``fence`` holds the scopes its actions were
  declared in, read from their rows, at a writable open (``Engine``); a read-only handle
  built its holds from the PREPARE rows alone and held none of them: ``walstore rewind
  --dry-run`` (read-only) returned a plan, exit 0, that the real rewind then refused —
  what audit 58 fixed for keys, back for these scopes.
- ``works_for`` kept each scope once with a ``not in`` over a list: a transaction whose
  20,000 actions were each declared in their own scope (one per user of a batch) took
  4.6 s to prepare (0.05 s before stop 75), and every open while it stayed in doubt
  4.8 s (0.7 s), the scopes compared pairwise, twice at the prepare.
- A rewind or purge refused by that hold was found out by its commit alone: the rewind
  planned twice, the second time holding every other writer out (the gate), the purge ran
  six times; an OpenAI session's rewind retries a ConflictError 8 times.  Now refused
  before it plans (the commit still checks, for a prepare landing meanwhile).
- A scope given as a str subclass (an ``enum.StrEnum`` member) was compared by exact
  type: held after a reopen (the log records its text), not before.
"""
from __future__ import annotations

import pytest

import walstore
from walstore.engine.conflicts import Prepared

GID = "g-review"


def _old_prepare(monkeypatch, s, scope: str) -> None:
    """A transaction booking in ``scope`` (declared on its action alone), prepared with a
    PREPARE as walstore wrote it before stop 75: no ``fence``."""
    body = Prepared.body

    def old_body(self):
        out = body(self)
        out.pop("fence", None)
        return out
    with monkeypatch.context() as m:
        m.setattr(Prepared, "body", old_body)
        tx = s.transaction()
        with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                       scope=scope) as act:
            act.result = "booked"
        tx.put("outside/k", "prepared")   # (no key of the scope: key holds do not meet it)
        tx.prepare(GID)


def test_a_read_only_dry_run_holds_an_older_prepares_action_scopes(tmp_path, monkeypatch):
    """The read-only dry run (``walstore rewind --dry-run``) agrees with the real rewind
    and the writable dry run: refused, naming the gid.  Before: a plan."""
    path = str(tmp_path / "store")
    with walstore.open(path, durability="full") as s:
        with s.transaction(scope="app/u1/") as t:
            t.put("app/u1/item", "before")
        s.restore_point("p")
        with s.transaction(scope="app/u1/") as t:
            t.put("app/u1/item", "after")
        _old_prepare(monkeypatch, s, "app/u1/")
        assert "fence" not in s._engine.views.prepared_summaries(dict)[0]
    with walstore.open(path, readonly=True) as ro:
        with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
            ro.rewind("p", scope="app/", dry_run=True)
        assert ro.rewind("p", scope="app/u2/", dry_run=True).empty()
    with walstore.open(path, durability="full") as s:
        for dry in (True, False):
            with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
                s.rewind("p", scope="app/", dry_run=dry)
        assert s.get("app/u1/item") == "after" and s.prepared() == [GID]


class _Counted(str):
    """A scope that counts how often it is compared."""
    compared = 0

    def __eq__(self, other):
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_preparing_many_actions_each_in_its_own_scope_compares_no_scope_pairwise(tmp_path):
    """1,000 actions, one scope each: the prepare notes 1,000 scopes (the PREPARE's
    ``fence``, the prepared set's holds) without comparing them pairwise (before: ~1
    million comparisons; 20,000 actions took 4.6 s where 0.05 s did)."""
    n = 1000
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        s.compensator("cancel")(lambda a: None)
        point = s.restore_point("p")
        tx = s.transaction()
        for i in range(n):
            with tx.action("book", compensate="cancel", scope=_Counted(f"u/{i:05d}/")) as a:
                a.result = i
        _Counted.compared = 0
        tx.prepare(GID)
        assert _Counted.compared < n
        assert s._engine.prepared.works[GID] == tuple(f"u/{i:05d}/" for i in range(n))
        with pytest.raises(walstore.ConflictError, match=f"'u/00000/'.*{GID!r}"):
            s.rewind(point)
        tx.rollback()


@pytest.mark.parametrize("undo", ["rewind", "purge"])
def test_a_rewind_or_purge_a_prepared_transaction_holds_off_plans_nothing_and_stalls_no_writer(
        tmp_path, monkeypatch, undo):
    """Refused by the commit's check alone, a rewind planned twice, the second time with
    every other writer held out (``held_out_on_conflict``: the gate), and a purge ran six
    times, the last under the gate; an OpenAI session's rewind retries a ConflictError 8
    times, so every commit of the store stalled 9 times over for a refusal known before
    the plan.  Now it is refused before it plans: no plan, no gate."""
    from walstore.agent.undo import Undo
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        with s.transaction(scope="app/u1/") as t:
            t.put("app/u1/item", "before")
        point = s.restore_point("p")
        for i in range(20):
            with s.transaction(scope="app/u1/") as t:
                t.put(f"app/u1/k{i}", i)
        tx = s.transaction(scope="app/u1/")
        tx.put("outside/k", 1)
        tx.prepare(GID)
        ran: list[str] = []
        gate = s._engine.pipeline.gate
        monkeypatch.setattr(gate, "hold", lambda *a, **k: ran.append("gate") or 1 / 0)
        plan = Undo._plan
        monkeypatch.setattr(Undo, "_plan",
                            lambda self, *a, **k: ran.append("plan") or plan(self, *a, **k))
        with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for: decide it"):
            s.rewind(point, scope="app/") if undo == "rewind" else s.purge("app/")
        assert ran == []
        assert s.get("app/u1/k0") == 0 and s.prepared() == [GID]
        monkeypatch.undo()
        tx.commit()
        if undo == "rewind":
            s.rewind(point, scope="app/")
            assert s.get("app/u1/k0") is None and s.get("outside/k") is None
        else:
            assert s.purge("app/")["keys_deleted"] == 21


@pytest.mark.parametrize("works", ["scope", "fence", "action"])
def test_a_scope_given_as_a_str_enum_is_held_as_its_text_is(tmp_path, works):
    """A scope given as an ``enum.StrEnum`` member (a str subclass: ``check_scope`` takes
    it, and the log records its text) was compared by exact type: the prepared set,
    holding the member, let a rewind of its text's prefix through, and the transaction
    committed after it stood — its booking never compensated — where the same store
    reopened (the PREPARE's text) refused that rewind."""
    import enum

    class Scopes(enum.StrEnum):
        U1 = "app/u1/"

    world: list[str] = []
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        s.compensator("cancel")(lambda a: world.append(a.args["what"]))
        with s.transaction(scope="app/u1/") as t:
            t.put("app/u1/item", "before")
        point = s.restore_point("p")
        with s.transaction(scope="app/u1/") as t:
            t.put("app/u1/item", "after")
        tx = s.transaction(scope=Scopes.U1 if works == "scope" else None)
        if works == "fence":
            tx.undo_fence = Scopes.U1
            tx.snapshot
        with tx.action("book", args={"what": "oslo"}, compensate="cancel",
                       scope=Scopes.U1 if works == "action" else None) as act:
            act.result = "booked"
        tx.put("outside/k", 1)
        tx.prepare(GID)
        for scope in ("app/", Scopes.U1):
            with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
                s.rewind(point, scope=scope)
        with pytest.raises(walstore.ConflictError, match=f"{GID!r} works for"):
            s.purge("app/")
        tx.commit()
        s.rewind(point, scope="app/")
        assert s.get("app/u1/item") == "before"
        assert world == (["oslo"] if works != "fence" else [])
