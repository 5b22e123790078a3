"""Findings of stop 55 in the agent layer (contract, "Action rollback", "External side
effects" and "Two-phase commit"), each named after the promise it broke."""
from __future__ import annotations

import pytest

import walstore


def _charge(store, key="k", comp="refund", result="ch"):
    """Commit one transaction writing ``key`` with one action compensated by ``comp``."""
    with store.transaction() as tx:
        tx.put(key, 1)
        with tx.action("charge", args=1, compensate=comp) as act:
            act.result = result
    return tx.id, act.id


# ---- a revert whose compensation fails says that the revert itself committed ----------

def test_revert_with_failing_compensation_says_the_revert_committed(tmp_path):
    # Before: CompensationFailed read "compensation failed for action(s) [...]; kept as
    # 'failed'", the words a rolled-back transaction's failure uses: nothing told the
    # user the revert itself had committed (the state IS reverted), so state and world
    # could be taken to disagree either way.  Now the message says so, and
    # ``e.committed`` is True beside ``e.undo`` (the undoing transaction's TxnInfo).
    def refund(action):
        raise RuntimeError("refund api down")
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        txid, aid = _charge(s)
        with pytest.raises(walstore.CompensationFailed) as info:
            s.revert(txid)
        e = info.value
        assert e.committed is True
        assert e.undo is not None and e.undo.txid == s.log(limit=1)[0].txid
        assert f"COMMITTED (transaction {e.undo.txid}" in str(e)
        assert s.get("k") is None
        assert s.get_action(aid).state == "failed"
        # a rollback's failure is not an undo that committed
        tx = s.transaction()
        with tx.action("charge", args=2, compensate="refund"):
            pass
        with pytest.raises(walstore.CompensationFailed) as info:
            tx.rollback()
        assert info.value.committed is False and info.value.undo is None
        assert "COMMITTED" not in str(info.value)


# ---- a needs-redo action can be marked redone by hand --------------------------------

def _needs_redo(tmp_path, ran: list):
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"refund": lambda a: ran.append(a.id)})
    txid, aid = _charge(s)
    r1 = s.revert(txid)
    r2 = s.revert(r1.txid, force=True)
    assert s.get_action(aid).state == "needs-redo" and s.get("k") == 1
    assert "then `walstore resolve` it" in s.get_action(aid).error  # (says how to clear it)
    return s, txid, aid, r1, r2


def test_needs_redo_action_can_be_resolved_as_redone_by_hand(tmp_path):
    # Before: store.resolve (and `walstore resolve`) refused a needs-redo action ("only
    # pending or failed compensations can be resolved"): an operator who charged again by
    # hand had no way to say so, and the mark stayed for ever.  Now it reads committed
    # again, with the note.
    ran: list = []
    s, txid, aid, r1, r2 = _needs_redo(tmp_path, ran)
    with s:
        a = s.resolve(aid, note="charged again by hand, ticket 7")
        assert a.state == "committed"
        got = s.get_action(aid)
        assert (got.state, got.error) == ("committed", "charged again by hand, ticket 7")
        assert aid not in [x.id for x in s.pending_compensations()]
        with pytest.raises(walstore.WalstoreError, match="committed"):
            s.resolve(aid)  # (nothing left to resolve)
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        assert s.get_action(aid).state == "committed"  # (durable)


def test_cli_resolve_clears_a_needs_redo_mark(tmp_path):
    from click.testing import CliRunner
    from walstore.cli import main
    ran: list = []
    s, txid, aid, r1, r2 = _needs_redo(tmp_path, ran)
    s.close()
    out = CliRunner().invoke(main, ["resolve", str(tmp_path / "s"), aid])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == f"action {aid} marked redone by hand (state: committed)"
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        assert s.get_action(aid).state == "committed"


def test_undoing_the_forced_revert_after_a_redo_by_hand_compensates_again(tmp_path):
    # The world is charged again (by hand); reverting the forced revert takes the charged
    # state away once more, so the refund must run (else the state read "not charged"
    # beside a standing charge).
    ran: list = []
    s, txid, aid, r1, r2 = _needs_redo(tmp_path, ran)
    with s:
        s.resolve(aid)
        plan = s.revert(r2.txid, dry_run=True)
        assert [a.id for a in plan.compensations] == [aid]
        ran.clear()
        s.revert(r2.txid)
        assert ran == [aid]
        assert s.get("k") is None and s.get_action(aid).state == "compensated"


def test_rewinds_over_a_redo_by_hand_compensate_once_or_not_at_all(tmp_path):
    ran: list = []
    s, txid, aid, r1, r2 = _needs_redo(tmp_path, ran)
    with s:
        s.resolve(aid)
        ran.clear()
        # undoing the revert and its forced reversal together: charged before, charged
        # after (by hand): nothing to compensate, no needs-redo mark, no refusal
        s.revert(r1.txid, cascade=True)
        assert ran == [] and s.get("k") == 1
        assert s.get_action(aid).state == "committed"
        # undoing everything back before the charge: its refund runs once
        s.rewind(walstore.LSN(s.txn_info(txid).lsn - 1))
        assert ran == [aid] and s.get("k") is None
        assert s.get_action(aid).state == "compensated"


# ---- `walstore actions` does not claim "no compensator" for one cut short by kill -9 ---

_KILLED_MID_REFUND = r"""
import sys, threading, walstore
def refund(action):
    print("refunding", flush=True)
    threading.Event().wait()          # (killed here, mid-compensation)
s = walstore.open(sys.argv[1], compensators={"refund": refund})
with s.transaction() as tx:
    tx.put("k", 1)
    with tx.action("charge", args=1, compensate="refund") as act:
        act.result = "ch1"
s.revert(tx.id)
"""


def test_actions_listing_of_a_refund_killed_mid_compensation(tmp_path):
    # Before: `walstore actions` (which runs nothing and loads no handlers) said
    # reason "no-compensator", "no compensator registered for 'refund'" — of a refund
    # whose writer had it registered and was killed while running it.  Whether one is
    # registered is known only to a process that registers it: the listing now says
    # "not-run" (not run yet, or cut short by a crash) and names the compensator.
    import json
    import subprocess
    import sys
    from click.testing import CliRunner
    from walstore.cli import main
    path = str(tmp_path / "s")
    p = subprocess.Popen([sys.executable, "-c", _KILLED_MID_REFUND, path],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "refunding"
    finally:
        p.kill()
        p.wait()
    out = CliRunner().invoke(main, ["actions", path, "--pending", "--json"])
    assert out.exit_code == 1, out.output
    (row,) = json.loads(out.output)["actions"]
    assert (row["state"], row["compensate"], row["reason"]) == ("pending", "refund", "not-run")
    out = CliRunner().invoke(main, ["actions", path])
    line = next(x for x in out.output.splitlines() if x.startswith(row["id"] + " "))
    assert "no compensator registered" not in line
    assert "cut short by a crash" in line and "'refund'" in line
    # the process that runs it (registered) settles it once
    ran: list = []
    with walstore.open(path, compensators={"refund": lambda a: ran.append(a.id)}) as s:
        assert ran == [row["id"]] and s.get_action(row["id"]).state == "compensated"


# ---- a dry run says which compensations would be left pending -------------------------

def test_dry_run_plan_says_which_compensations_would_be_left_pending(tmp_path):
    # Before: the plan listed every compensation of the undone transactions alike, also
    # those whose compensator is not registered here: the real undo leaves them pending
    # (owed, not run), and nothing in the plan said so.
    import json
    from click.testing import CliRunner
    from walstore.cli import main
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none",
                       compensators={"refund": lambda a: None}) as s:
        s.restore_point("start")
        _charge(s, "a", "refund")
        _charge(s, "b", "unregistered")
        plan = s.rewind("start", dry_run=True)
        ids = [a.id for a in plan.compensations]
        assert len(ids) == 2
        unreg = next(a.id for a in plan.compensations if a.compensate == "unregistered")
        assert plan.left_pending == [unreg]
        rows = {r["id"]: r["runs"] for r in plan.as_dict()["compensations"]}
        assert rows == {i: i != unreg for i in ids}
        assert plan.as_dict()["left_pending"] == [unreg]
    # the command line: without --handlers nothing would run
    out = CliRunner().invoke(main, ["rewind", path, "--to", "start", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)["plan"]
    assert {c["runs"] for c in doc["compensations"]} == {False}
    assert sorted(doc["left_pending"]) == sorted(ids)
    # and the plan is what the undo does
    with walstore.open(path, durability="none",
                       compensators={"refund": lambda a: None}) as s:
        s.rewind("start")
        assert [a.id for a in s.pending_compensations()] == [unreg]


# ---- a compensator calling retry_compensations() does not run the older ones early ----

def test_compensator_calling_retry_compensations_keeps_lifo_order(tmp_path):
    # Before: the rollback reserves its actions' compensations for its thread, so another
    # thread's retry_compensations leaves them to it (audit54) — but a compensator calling
    # store.retry_compensations() on the rollback's own thread ran the older ones at once,
    # inside the newest's compensation and before the file changes between them were put
    # back (the older refund saw the file as the rolled-back transaction left it).  Now
    # a call from inside a compensator leaves what an outer undo of its thread reserved.
    import os
    root = str(tmp_path / "ws")
    os.mkdir(root)
    seen: list = []
    retried: list = []
    s = None

    def refund(action):
        with open(os.path.join(root, "f")) as f:
            seen.append((action.args, f.read()))
        if action.args == 3:
            retried.append(sorted(a.id for a in s.retry_compensations()))
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"refund": refund})
    with s:
        ws = s.workspace(root)
        tx = s.transaction()
        f = tx.files(ws)
        for n in (1, 2, 3):
            f.write("f", f"v{n}")
            with tx.action("charge", args=n, compensate="refund"):
                pass
        tx.rollback()
        assert seen == [(3, "v3"), (2, "v2"), (1, "v1")]
        # (the nested call ran none of them: all three were still the rollback's to run,
        # in its turn; since audit 69 it does not list them as owed either — the rollback
        # runs them, as another thread's call beside it does not: Saga.owed_now)
        assert retried == [[]]
        assert [a.state for a in s.actions()] == ["compensated"] * 3
        assert not os.path.exists(os.path.join(root, "f"))


def test_redo_by_hand_racing_the_undo_that_clears_the_mark_is_compensated(tmp_path):
    # resolve (redone by hand) landing between the plan of an undo that clears the
    # needs-redo mark (reverting the forced revert) and its commit: the undo, planned
    # against the mark, takes the charged state away while the world is charged again —
    # the action must come out owed and be compensated, not stay "committed".
    import threading
    from tools.faults import FaultBackend, installed
    ran: list = []
    s, txid, aid, r1, r2 = _needs_redo(tmp_path, ran)
    with s:
        fired: list = []

        def resolve_meanwhile(_name):
            if fired:
                return
            fired.append(1)
            t = threading.Thread(target=s.resolve, args=(aid, "charged again by hand"))
            t.start()
            t.join(30)
            assert not t.is_alive()
        fb = FaultBackend()
        fb.at_point("undo.planned", resolve_meanwhile)
        ran.clear()
        with installed(fb):
            s.revert(r2.txid)
        assert fired
        assert s.get("k") is None
        assert ran == [aid] and s.get_action(aid).state == "compensated"


def test_a_redone_action_outlives_its_transactions_trim_while_the_marking_revert_is_kept(tmp_path):
    # Redone by hand (committed again), the row of an action whose own transaction
    # retention then trims must stay while the forced revert that marked it is retained:
    # reverting that revert takes the charged state away and must compensate it (the row
    # was deleted with its transaction, and the revert put the keys back to "not charged"
    # beside a charge standing, compensating nothing).
    ran: list = []
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none", retain_transactions=2,
                       compensators={"refund": lambda a: ran.append(a.id)}) as s:
        txid, aid = _charge(s)
        r1 = s.revert(txid)
        r2 = s.revert(r1.txid, force=True)
        s.resolve(aid, note="charged again by hand")
        s.checkpoint()
        with pytest.raises(walstore.HistoryTrimmed):
            s.txn_info(txid)  # (the charge's own: trimmed)
        assert s.txn_info(r2.txid).txid == r2.txid     # (the marking revert: kept)
        assert s.get_action(aid).state == "committed"
        ran.clear()
        s.revert(r2.txid)
        assert s.get("k") is None
        assert ran == [aid] and s.get_action(aid).state == "compensated"


def test_rollback_prepared_with_failing_compensation_says_the_rollback_is_decided(tmp_path):
    # Before: CompensationFailed said only that the compensation failed, as if
    # rollback_prepared itself had failed; retried, it met UnknownGid — the rollback was
    # decided (durable) before the compensation ran.  Now the message says so.
    def refund(action):
        raise RuntimeError("refund api down")
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as s:
        tx = s.transaction()
        tx.put("k", 1)
        with tx.action("charge", args=1, compensate="refund"):
            pass
        tx.prepare("g")
        with pytest.raises(walstore.CompensationFailed) as info:
            s.rollback_prepared("g")
        assert "rollback of gid 'g' is decided" in str(info.value)
        assert info.value.committed is False
        assert s.prepared() == [] and s.get("k") is None
        assert [a.state for a in s.pending_compensations()] == ["failed"]


@pytest.mark.parametrize("seed", range(0, 40, 8))
def test_state_and_world_agree_across_undo_chains_with_redos_by_hand(tmp_path, seed):
    # Random chains of reverts (forced, cascading), rewinds and redos by hand (resolve of
    # a needs-redo action after charging again) over one charge: after every step the
    # action's state, the charged key and the outside world agree — committed: charged
    # and charged; compensated: neither; needs-redo: the key charged, the world not.
    import random
    for seed in range(seed, seed + 8):
        rnd = random.Random(seed)
        world = {"charged": 0}

        def refund(action):
            world["charged"] -= 1
        s = walstore.open(str(tmp_path / f"s{seed}"), durability="none",
                          compensators={"refund": refund})
        with s:
            with s.transaction() as tx:
                tx.put("k", 1)
                with tx.action("charge", compensate="refund") as act:
                    world["charged"] += 1
            undos: list = []
            trace: list = []
            for step in range(rnd.randint(2, 9)):
                op = rnd.choice(["revert", "revert", "force", "resolve", "rewind",
                                 "cascade", "other"])
                try:
                    if op == "other":
                        with s.transaction() as t:
                            t.put(f"o{step}", step)
                    elif op == "resolve":
                        if s.get_action(act.id).state != "needs-redo":
                            continue
                        world["charged"] += 1  # (charged again by hand)
                        s.resolve(act.id)
                    elif op == "rewind":
                        r = s.rewind(rnd.choice([i.txid for i in s.log()]),
                                     force=rnd.random() < 0.5)
                        if r:
                            undos.append(r.txid)
                    else:
                        r = s.revert(rnd.choice(undos + [tx.id]), force=op == "force",
                                     cascade=op == "cascade")
                        if r:
                            undos.append(r.txid)
                    trace.append(op)
                except walstore.RevertConflict:
                    trace.append(op + "!")
                state, key = s.get_action(act.id).state, s.get("k") == 1
                assert (state, key, world["charged"]) in {
                    ("committed", True, 1), ("compensated", False, 0),
                    ("needs-redo", True, 0)}, (seed, trace, state, key, world)
