"""Intents and compensations (contract section 2, "External side effects").

``tx.action(name, args=..., compensate=...)`` makes an intent durable before its body runs;
``act.key`` is a stable idempotency key; compensations run newest first when the
transaction rolls back (exception, ``rollback()``, ``rollback_to`` a savepoint taken before
the action); a compensator that keeps raising is retried, then marked ``failed``, kept
pending and ``CompensationFailed`` is raised; actions whose compensator is not registered
stay ``pending`` until compensated or ``resolve``d.  Crash behaviour is in
test_actions_crash.py; revert/rewind in test_agent_history.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import walstore
import walstore.agent.actions as wactions
from walstore.cli import main as cli_main
from walstore.ops.inspect import iter_wal


class Recorder:
    """A compensator that records what it saw (id, key, args, result), in call order."""

    def __init__(self) -> None:
        self.seen: list[walstore.Action] = []

    def __call__(self, action) -> None:
        self.seen.append(walstore.Action(**{k: getattr(action, k) for k in (
            "id", "txid", "name", "args", "result", "key", "compensate", "state")}))

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.seen]


def wal_records(path: str, rtype: str) -> list[dict]:
    return [r for r in iter_wal(path) if r["type"] == rtype]


# ---- intents -------------------------------------------------------------------------------
def test_intent_is_fsynced_and_visible_to_another_process_before_the_body(path):
    with walstore.open(path, durability="full") as store:
        store.compensator("refund")(lambda a: None)
        with store.transaction() as tx:
            tx.put("order", 1)
            with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
                # another process (the CLI) sees the intent, before the body did anything
                p = subprocess.run([sys.executable, "-m", "walstore", "dump", path, "--json"],
                                   capture_output=True, text=True, timeout=60)
                assert p.returncode == 0, p.stderr
                recs = json.loads(p.stdout)["records"]
                intents = [r for r in recs if r["type"] == "ACTION_INTENT"]
                assert len(intents) == 1
                body = intents[0]["payload"]
                assert body["id"] == act.id and body["key"] == act.key
                assert body["tx"] == tx.id and body["name"] == "charge"
                assert body["args"] == {"amount": 40} and body["compensate"] == "refund"
                assert not [r for r in recs if r["type"] in ("ACTION_RESULT", "COMMIT")]
                # and it is on stable storage, not only written
                assert store.stats()["wal_synced_lsn"] >= intents[0]["end_lsn"]
                act.result = {"charge_id": "ch_1"}
        results = wal_records(path, "ACTION_RESULT")
        assert [r["payload"]["result"] for r in results] == [{"charge_id": "ch_1"}]
        assert results[0]["lsn"] > intents[0]["lsn"]


def test_action_ids_and_keys_are_distinct_and_stable(path, tmp_path):
    rec = Recorder()
    with walstore.open(path, durability="none", compensators={"undo": rec}) as store:
        keys = []
        with pytest.raises(RuntimeError):
            with store.transaction() as tx:
                for i in range(3):
                    with tx.action("step", args={"i": i}, compensate="undo") as act:
                        k1 = act.key
                        act.result = i
                    assert act.key == k1  # does not change when the action ends
                    keys.append((act.id, act.key, tx.id))
                raise RuntimeError("fail the plan")
        assert len({k for _i, k, _t in keys}) == 3
        assert len({i for i, _k, _t in keys}) == 3
        assert all(isinstance(k, str) and k for _i, k, _t in keys)
        # the compensator saw the very same ids and keys (and args, result)
        assert sorted((a.id, a.key, a.txid) for a in rec.seen) == sorted(keys)
        assert {a.key: a.result for a in rec.seen} == {k: i for i, (_a, k, _t) in
                                                       enumerate(keys)}
        assert {a.key: a.args for a in rec.seen} == {k: {"i": i} for i, (_a, k, _t) in
                                                     enumerate(keys)}
        for a in store.actions():
            assert (a.id, a.key) in {(i, k) for i, k, _t in keys}
    # another store never hands out the same idempotency key
    with walstore.open(str(tmp_path / "other"), durability="none") as other:
        with other.transaction() as tx:
            for _ in range(3):
                with tx.action("step") as act:
                    assert act.key not in {k for _i, k, _t in keys}


# ---- rollback runs compensations newest first -------------------------------------------------
def three_actions(tx) -> list[walstore.Action]:
    acts = []
    for name in ("reserve", "charge", "email"):
        with tx.action(name, args={"n": name}, compensate="undo") as act:
            act.result = f"{name}-done"
        acts.append(act)
    tx.put("plan", "started")
    return acts


def test_exception_rolls_back_and_compensates_newest_first(store):
    rec = Recorder()
    store.compensator("undo")(rec)
    with pytest.raises(ValueError, match="plan failed"):
        with store.transaction() as tx:
            acts = three_actions(tx)
            raise ValueError("plan failed")
    assert rec.ids == [a.id for a in reversed(acts)]
    assert [a.name for a in rec.seen] == ["email", "charge", "reserve"]
    assert [a.result for a in rec.seen] == ["email-done", "charge-done", "reserve-done"]
    assert store.get("plan") is None
    for a in acts:
        got = store.get_action(a.id)
        assert got.state == "compensated" and got.attempts == 1
    assert store.pending_compensations() == []
    assert store.log() == []


def test_explicit_rollback_compensates_newest_first_and_records_durably(path):
    rec = Recorder()
    with walstore.open(path, durability="full", compensators={"undo": rec}) as store:
        tx = store.transaction()
        acts = three_actions(tx)
        assert rec.ids == []  # nothing is compensated before the rollback
        tx.rollback()
        assert rec.ids == [a.id for a in reversed(acts)]
        done = wal_records(path, "COMPENSATED")
        assert [r["payload"]["id"] for r in done] == rec.ids
        assert all(r["payload"]["state"] == "compensated" for r in done)
        assert store.stats()["wal_synced_lsn"] >= done[-1]["end_lsn"]
        with pytest.raises(walstore.TransactionClosed):
            tx.put("x", 1)


def test_rollback_to_savepoint_before_actions_compensates_them_newest_first(store):
    rec = Recorder()
    store.compensator("undo")(rec)
    with store.transaction() as tx:
        with tx.action("keep", compensate="undo") as kept:
            pass
        sp = tx.savepoint("try-plan-a")
        acts = three_actions(tx)
        tx.rollback_to(sp)
        assert rec.ids == [a.id for a in reversed(acts)]
        assert tx.get("plan") is None
        # sp stays usable: a second attempt after it, rolled back again
        with tx.action("retry", compensate="undo") as retry:
            pass
        tx.rollback_to("try-plan-a")
        assert rec.ids == [a.id for a in reversed(acts)] + [retry.id]
        tx.put("plan", "b")
    assert kept.id not in rec.ids
    (info,) = store.log()
    assert [a["id"] for a in info.actions] == [kept.id]
    assert [r["state"] for r in info.actions] == ["committed"]
    assert store.get("plan") == "b"


def test_rollback_to_savepoint_taken_after_the_action_does_not_compensate_it(store):
    rec = Recorder()
    store.compensator("undo")(rec)
    with store.transaction() as tx:
        with tx.action("before", compensate="undo") as before:
            pass
        sp = tx.savepoint()
        tx.put("x", 1)
        with tx.action("after", compensate="undo") as after:
            pass
        tx.rollback_to(sp)
        assert rec.ids == [after.id]
        tx.rollback_to(sp)  # again: nothing more to compensate
        assert rec.ids == [after.id]
    (info,) = store.log()
    assert [a["id"] for a in info.actions] == [before.id]


def test_nested_savepoints_outer_rollback_compensates_inner_ones_newest_first(store):
    rec = Recorder()
    store.compensator("undo")(rec)
    with store.transaction() as tx:
        outer = tx.savepoint("outer")
        with tx.action("a1", compensate="undo") as a1:
            pass
        tx.savepoint("inner")
        with tx.action("a2", compensate="undo") as a2:
            pass
        with pytest.raises(KeyError):
            with tx.savepoint("ctx"):
                with tx.action("a3", compensate="undo") as a3:
                    pass
                raise KeyError("inner step failed")
        assert rec.ids == [a3.id]  # the savepoint context rolled back its own action
        tx.release("inner")  # released: its action now belongs to "outer"
        tx.rollback_to(outer)
        assert rec.ids == [a3.id, a2.id, a1.id]
    assert store.log() == []  # nothing written, nothing committed


def test_failing_compensator_is_retried_then_failed_pending_and_raised(store):
    attempts: list[str] = []
    good = Recorder()

    @store.compensator("flaky")
    def flaky(action):
        attempts.append(action.key)
        raise ConnectionError("payments API down")

    store.compensator("undo")(good)
    with pytest.raises(walstore.CompensationFailed) as ei:
        with store.transaction() as tx:
            with tx.action("first", compensate="undo") as first:
                pass
            with tx.action("charge", compensate="flaky") as bad:
                act_key = bad.key
            with tx.action("last", compensate="undo") as last:
                pass
            raise RuntimeError("plan failed")
    assert isinstance(ei.value, walstore.WalstoreError)
    assert ei.value.action_ids == [bad.id]
    assert bad.id in str(ei.value)
    # retried (bounded), always with the same idempotency key
    assert len(attempts) == wactions.COMPENSATION_RETRIES > 1
    assert set(attempts) == {act_key}
    # the others were compensated anyway, newest first
    assert good.ids == [last.id, first.id]
    # escalated: marked failed, kept pending, with the error
    (p,) = store.pending_compensations()
    assert p.id == bad.id and p.state == "failed" and p.key == act_key
    assert p.attempts == wactions.COMPENSATION_RETRIES
    assert "payments API down" in p.error
    assert store.log() == []
    # handled by hand
    r = store.resolve(bad.id, note="refunded by phone")
    assert r.state == "resolved"
    assert store.pending_compensations() == []
    assert store.get_action(bad.id).state == "resolved"
    with pytest.raises(walstore.WalstoreError):
        store.resolve(bad.id)  # only pending or failed actions can be resolved
    with pytest.raises(KeyError):
        store.resolve("999.1")


def test_compensator_that_recovers_on_retry_is_compensated(store):
    calls = []

    @store.compensator("wobbly")
    def wobbly(action):
        calls.append(action.key)
        if len(calls) < 2:
            raise TimeoutError("try again")

    tx = store.transaction()
    with tx.action("charge", compensate="wobbly") as act:
        pass
    tx.rollback()  # no exception: the second attempt worked
    assert calls == [act.key, act.key]
    got = store.get_action(act.id)
    assert got.state == "compensated" and got.attempts == 2
    assert store.pending_compensations() == []


def test_failed_compensation_in_rollback_to_raises_and_transaction_goes_on(store):
    @store.compensator("broken")
    def broken(action):
        raise OSError("disk gone")

    with store.transaction() as tx:
        sp = tx.savepoint()
        with tx.action("charge", compensate="broken") as act:
            pass
        with pytest.raises(walstore.CompensationFailed):
            tx.rollback_to(sp)
        tx.put("after", 1)
    assert store.get("after") == 1
    assert [a.id for a in store.pending_compensations()] == [act.id]
    assert store.pending_compensations()[0].state == "failed"
    assert store.log()[0].actions == ()


def test_an_interrupt_in_a_rollback_tos_compensation_leaves_the_rest_owed(path):
    # (probe 32: the crossed actions were dropped from the transaction before their
    # compensations ran; an interrupt in one, caught, then a commit, left them in flight
    # for good: never compensated, never listed, never run by the next open)
    refunds: list[str] = []
    hit = [True]

    def refund(action):
        if hit[0]:
            hit[0] = False
            raise KeyboardInterrupt  # Ctrl-C inside the refund call
        refunds.append(action.args)

    with walstore.open(path, durability="none", compensators={"refund": refund}) as store:
        tx = store.transaction()
        with tx.action("charge", args="keep", compensate="refund"):
            pass
        sp = tx.savepoint()
        with tx.action("charge", args="b1", compensate="refund") as b1:
            pass
        with tx.action("charge", args="b2", compensate="refund") as b2:
            pass
        tx.put("paid", "b")
        with pytest.raises(KeyboardInterrupt):
            tx.rollback_to(sp)  # b2's refund interrupted before it ran; b1 not reached
        assert tx.get("paid") is None
        tx.put("plan", "a")
        tx.commit()
        assert refunds == []
        owed = {a.id: a for a in store.pending_compensations()}
        assert set(owed) == {b1.id, b2.id}
        assert all(a.state == "pending" and not a.in_flight for a in owed.values())
        assert {a.args: a.state for a in store.actions()} == {
            "keep": "committed", "b1": "pending", "b2": "pending"}
    with walstore.open(path, durability="none", compensators={"refund": refund}) as store:
        assert sorted(refunds) == ["b1", "b2"]  # the next open ran each once
        assert store.pending_compensations() == []
        assert store.get("plan") == "a" and store.get("paid") is None
    with walstore.open(path, durability="none", compensators={"refund": refund}) as store:
        assert sorted(refunds) == ["b1", "b2"]


def test_a_rollback_inside_an_actions_body_is_refused(store):
    # (probe 32: it compensated the action before its body had acted; the body then
    # acted, and the charge stood while the store said "compensated")
    refunds = []
    store.compensators["refund"] = refunds.append
    tx = store.transaction()
    tx.put("a", 1)
    sp = tx.savepoint()
    with tx.action("charge", compensate="refund") as act:
        with pytest.raises(walstore.WalstoreError, match="still running"):
            tx.rollback_to(sp)
        with pytest.raises(walstore.WalstoreError, match="still running"):
            tx.rollback()
        act.result = "ch_1"
    assert refunds == [] and tx.state == "active"
    tx.rollback_to(sp)  # out of the body: allowed, and compensates
    assert [a.result for a in refunds] == ["ch_1"]
    tx.commit()
    assert store.get_action(act.id).state == "compensated" and store.get("a") == 1
    tx = store.transaction()
    with pytest.raises(RuntimeError):
        with tx:
            with tx.action("charge", compensate="refund") as act2:
                raise RuntimeError("the provider said no")  # an error in the body still
    assert store.get_action(act2.id).state == "compensated"  # rolls back as always


def test_an_action_whose_block_exit_was_cut_short_does_not_block_rollbacks(store):
    # (an interrupt at the very start of the with block's __exit__ never ran it: the
    # action must not refuse rollbacks for ever once its block is gone)
    refunds = []
    store.compensators["refund"] = refunds.append
    tx = store.transaction()
    sp = tx.savepoint()

    def enter_and_leave_without_exit():
        return tx.action("charge", compensate="refund").__enter__()
    act = enter_and_leave_without_exit()
    tx.rollback_to(sp)  # allowed: the frame that ran the with block has returned
    assert [a.id for a in refunds] == [act.id]
    enter_and_leave_without_exit()
    tx.rollback()
    assert len(refunds) == 2


# ---- unregistered compensators: pending, listed, resolvable --------------------------------------
def test_action_without_registered_compensator_is_left_pending_and_listed(path):
    with walstore.open(path, durability="none") as store:
        tx = store.transaction()
        with tx.action("book", args={"room": 7}, compensate="cancel") as act:
            act.result = {"booking": "b-7"}
        with tx.action("note") as plain:  # compensate=None: nothing is owed
            pass
        tx.rollback()  # no exception: nothing to call yet
        (p,) = store.pending_compensations()
        assert (p.id, p.txid, p.name, p.args, p.result, p.key, p.compensate, p.state) == (
            act.id, tx.id, "book", {"room": 7}, {"booking": "b-7"}, act.key, "cancel",
            "pending")
        assert "cancel" in p.error
        assert plain.id not in [a.id for a in store.pending_compensations()]
    runner = CliRunner()
    r = runner.invoke(cli_main, ["actions", path, "--pending", "--json"])
    assert r.exit_code == 1, r.output
    (row,) = json.loads(r.stdout)["actions"]
    assert row["id"] == act.id and row["state"] == "pending" and row["key"] == act.key
    assert row["compensate"] == "cancel" and row["result"] == {"booking": "b-7"}
    r = runner.invoke(cli_main, ["actions", path, "--pending"])
    assert r.exit_code == 1 and act.id in r.output
    # registering the compensator later pays the debt on open
    seen = Recorder()
    with walstore.open(path, durability="none", compensators={"cancel": seen}) as store:
        assert seen.ids == [act.id] and seen.seen[0].key == act.key
        assert store.pending_compensations() == []
        assert store.get_action(act.id).state == "compensated"
    r = runner.invoke(cli_main, ["actions", path, "--pending", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["actions"] == []


def test_resolve_through_the_cli(path):
    with walstore.open(path, durability="none") as store:
        tx = store.transaction()
        with tx.action("book", compensate="cancel") as act:
            pass
        tx.rollback()
    runner = CliRunner()
    r = runner.invoke(cli_main, ["resolve", path, act.id, "--note", "done by hand"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_main, ["actions", path, "--json"])
    assert r.exit_code == 0
    (row,) = json.loads(r.stdout)["actions"]
    assert row["state"] == "resolved"
    r = runner.invoke(cli_main, ["resolve", path, act.id])
    assert r.exit_code == 1  # nothing left to resolve
    r = runner.invoke(cli_main, ["resolve", path, "12345.1"])
    assert r.exit_code == 2
    with walstore.open(path, durability="none", compensators={"cancel": Recorder()}) as store:
        assert store.compensators["cancel"].ids == []  # resolved: never compensated


def test_a_resolve_note_is_bounded_and_a_longer_one_refused_before_anything_runs(path):
    """A resolve note was kept whole in the action's row (a 100 MB note, 100 MB in LMDB and
    the WAL): it is bounded as an error text is, and a longer one refused, by the API and
    the CLI (exit 2, before the open's recovery runs anything), the action still owed."""
    from walstore.agent.actions import MAX_ERROR_BYTES
    with walstore.open(path, durability="none") as store:
        tx = store.transaction()
        with tx.action("book", compensate="cancel") as act:
            pass
        tx.rollback()
        with pytest.raises(ValueError, match="at most 4,096 bytes"):
            store.resolve(act.id, "é" * (MAX_ERROR_BYTES // 2 + 1))
        assert store.get_action(act.id).state == "pending"
    r = CliRunner().invoke(cli_main, ["resolve", path, act.id, "--note", "x" * 5000])
    assert r.exit_code == 2 and "at most 4,096 bytes" in r.stderr, r.output
    with walstore.open(path, durability="none") as store:
        assert store.get_action(act.id).state == "pending"
        note = "é" * (MAX_ERROR_BYTES // 2)  # exactly the bound
        assert store.resolve(act.id, note).error == note
        assert store.get_action(act.id).state == "resolved"


def test_an_action_id_that_is_not_a_str_is_a_type_error_and_resolves_nothing(path):
    """``resolve(1.10)`` was str()ed to '1.1' and resolved that other action, 1.10 still owed
    (probe probe-agree); ``resolve(None)`` said "no action with id None"."""
    with walstore.open(path, durability="none") as store:
        tx = store.transaction()
        for i in range(10):
            with tx.action(f"charge{i}", compensate="refund"):
                pass
        tx.rollback()  # (no compensator: all ten owed)
        for bad in (1.10, 1.1, None, 11, b"1.1"):
            for call in (store.resolve, store.get_action):
                with pytest.raises(TypeError, match="an action id is a str") as e:
                    call(bad)
                assert isinstance(e.value, walstore.errors.UnknownAction)  # (a KeyError)
        assert {a.state for a in store.actions()} == {"pending"}
        act = store.get_action("1.10")
        assert store.resolve(act).id == "1.10"  # (an Action names itself)
        assert store.get_action("1.10").state == "resolved"
        assert store.get_action("1.1").state == "pending"


# ---- committed transactions ----------------------------------------------------------------
def test_txninfo_actions_lists_the_actions_of_a_committed_transaction(path):
    with walstore.open(path, durability="none") as store:
        with store.transaction(meta={"step": 1}) as tx:
            with tx.action("charge", args={"amount": 40}, compensate="refund") as a1:
                a1.result = {"charge_id": "c1"}
            with tx.action("notify", args=["ops"]) as a2:
                a2.result = True
            tx.put("order", "paid")
        (info,) = store.log()
        assert info.txid == tx.id
        rows = list(info.actions)
        assert [r["id"] for r in rows] == [a1.id, a2.id]
        assert [r["name"] for r in rows] == ["charge", "notify"]
        assert rows[0]["args"] == {"amount": 40} and rows[0]["result"] == {"charge_id": "c1"}
        assert rows[0]["key"] == a1.key and rows[0]["compensate"] == "refund"
        assert rows[1]["compensate"] is None and rows[1]["result"] is True
        assert all(r["state"] == "committed" for r in rows)
        assert store.pending_compensations() == []
    with walstore.open(path, durability="none") as store:
        assert [r["id"] for r in store.txn_info(tx.id).actions] == [a1.id, a2.id]
        assert {a.id: a.state for a in store.actions()} == {a1.id: "committed",
                                                            a2.id: "committed"}
    r = CliRunner().invoke(cli_main, ["actions", path, "--json"])
    assert r.exit_code == 0
    assert {a["id"] for a in json.loads(r.stdout)["actions"]} == {a1.id, a2.id}


def test_actions_query_sees_a_just_committed_action(store):
    with store.transaction() as tx:
        with tx.action("charge", compensate="refund") as act:
            pass
    assert act.id in [a.id for a in store.actions()]
    assert store.get_action(act.id).state == "committed"


# ---- registration ----------------------------------------------------------------------------
def test_compensators_registered_by_decorator_and_by_open(path):
    by_open, by_decorator = Recorder(), Recorder()
    with walstore.open(path, durability="none", compensators={"a": by_open}) as store:
        assert store.compensator("b")(by_decorator) is by_decorator  # returns the function
        with pytest.raises(TypeError):
            store.compensator("")
        tx = store.transaction()
        with tx.action("x", compensate="a") as x:
            pass
        with tx.action("y", compensate="b") as y:
            pass
        tx.rollback()
    assert by_open.ids == [x.id] and by_decorator.ids == [y.id]


def test_bad_action_arguments_fail_with_typeerror_before_the_intent(path):
    with walstore.open(path, durability="none") as store:
        with store.transaction() as tx:
            with pytest.raises(TypeError, match="args"):
                tx.action("charge", args={"when": object()}, compensate="refund")
            with pytest.raises(TypeError, match="args"):
                tx.action("charge", args={1j: 2})
            with pytest.raises(TypeError):
                tx.action("", args=None)
            with pytest.raises(TypeError):
                tx.action("charge", compensate=42)
            tx.put("still", "usable")
        assert wal_records(path, "ACTION_INTENT") == []
        assert store.get("still") == "usable"
        assert store.log()[0].actions == ()


def test_unpackable_result_fails_with_typeerror_and_is_still_compensated(path):
    rec = Recorder()
    with walstore.open(path, durability="none", compensators={"undo": rec}) as store:
        with pytest.raises(TypeError, match="result of action 'charge'"):
            with store.transaction() as tx:
                with tx.action("charge", compensate="undo") as act:
                    act.result = {"receipt": object()}
        # the effect happened, so it must be compensated once and recorded as such
        assert rec.ids == [act.id]
        assert store.get_action(act.id).state == "compensated"
        assert store.pending_compensations() == []
        with store.transaction() as tx2:
            tx2.put("next", 1)
    assert [r["payload"]["tx"] for r in wal_records(path, "ABORT")] == [tx.id]


def test_a_large_value_beside_large_action_args_commits(path):
    """A 15 MiB value (limit 16 MiB) and an action's 18 MiB args, each accepted alone,
    made a COMMIT record past the 32 MiB record limit: the commit failed with a bare
    record-size error after the action's side effect ran (and was compensated).  The
    writes go into WRITES chunks when the COMMIT would not hold them: it commits."""
    rec = Recorder()
    args = {"doc": b"z" * (18 << 20)}
    with walstore.open(path, durability="none", compensators={"refund": rec}) as store:
        with store.transaction() as tx:
            tx.put("report", b"x" * (15 << 20))
            with tx.action("charge", args=args, compensate="refund") as act:
                act.result = 2
        assert rec.ids == []
    with walstore.open(path) as store:  # (recovery reads the chunked commit back)
        assert store.get("report") == b"x" * (15 << 20)
        a = store.get_action(act.id)
        assert (a.state, a.args, a.result) == ("committed", args, 2)


def test_actions_past_the_transactions_record_limit_are_refused_before_their_body(path):
    """An action's row (its args and result) goes into its transaction's COMMIT, so what a
    transaction's actions log together is bounded (MAX_ACTION_BYTES, 24 MiB): args that
    would pass it are refused at ``tx.action()`` with ValueError naming the action, before
    the intent and the body; a result that would is not recorded (ValueError, as for a
    result msgpack cannot store), and the action, whose effect happened, is compensated."""
    rec = Recorder()
    ran = []
    with walstore.open(path, durability="none", compensators={"refund": rec}) as store:
        with store.transaction() as tx:
            with pytest.raises(ValueError, match=r"action 'charge'.*did not run"):
                tx.action("charge", args=b"a" * (25 << 20), compensate="refund")
            with tx.action("charge", args=b"a" * (13 << 20), compensate="refund") as first:
                ran.append(first.id)
            with pytest.raises(ValueError, match=r"action 'ship'.*24 MiB"):
                with tx.action("ship", args=b"b" * (12 << 20), compensate="refund"):
                    ran.append("ship")  # (never: refused before the body)
            tx.put("k", 1)
        assert ran == [first.id]
        assert [a.name for a in store.actions()] == ["charge"]
        assert [r["payload"]["name"] for r in wal_records(path, "ACTION_INTENT")] == [
            "charge"]
        with pytest.raises(ValueError, match="result of action 'sign'"):
            with store.transaction() as tx:
                with tx.action("sign", args=b"c" * (20 << 20), compensate="refund") as act:
                    act.result = b"r" * (5 << 20)
        assert rec.ids == [act.id]
        a = store.get_action(act.id)
        assert (a.result, a.state) == (None, "compensated")


MAX_ERROR_BYTES = 4096  # (wactions.MAX_ERROR_BYTES; README, the limits)


def test_a_failed_actions_error_text_is_bounded_and_counted(path):
    """The review probe's repro3: 12 actions whose bodies raised ~3 MiB messages (an API's
    response body in the exception), each caught, then a put: the COMMIT carried every
    error text whole and the commit failed with a bare record-size error (the transaction
    lost, its effects done).  The error text recorded is now at most MAX_ERROR_BYTES
    (4 KiB) plus how much was cut, and counted in the transaction's MAX_ACTION_BYTES."""
    big = "upstream said: " + "x" * (3 << 20)
    with walstore.open(path, durability="none", compensators={"refund": Recorder()}) as s:
        with s.transaction() as tx:
            for i in range(12):
                before = tx.action_bytes
                with pytest.raises(RuntimeError):
                    with tx.action("call_api", {"i": i}, compensate="refund"):
                        raise RuntimeError(big)
                assert MAX_ERROR_BYTES < tx.action_bytes - before <= MAX_ERROR_BYTES + 512
            tx.put("progress", "handled 12 failures")
        assert s.get("progress") == "handled 12 failures"
        acts = s.actions()
        assert len(acts) == 12 and {a.state for a in acts} == {"committed"}
        for a in acts:
            assert a.error.startswith("RuntimeError: upstream said: xxx")
            assert a.error.endswith(" bytes cut)")
            assert len(a.error.encode()) <= MAX_ERROR_BYTES + 64
    with walstore.open(path, readonly=True) as s:  # (what the log says: the same)
        assert all(a.error.endswith(" bytes cut)") for a in s.actions())
    assert all(len(r["payload"]["error"]) <= MAX_ERROR_BYTES + 64
               for r in wal_records(path, "ACTION_RESULT"))


def test_a_compensators_huge_error_still_ends_in_compensation_failed(path):
    """The review probe's t_c4: a compensator raising a > 32 MiB message made the rollback
    raise a bare ValueError (the COMPENSATED record too big) in place of the user's
    exception and CompensationFailed, the action left 'pending'.  Now its error text is
    bounded: CompensationFailed from the user's exception, the action 'failed'."""
    calls = []

    def refund(action) -> None:
        calls.append(action.id)
        raise RuntimeError("R" * (40 << 20))
    with walstore.open(path, durability="none", compensators={"refund": refund}) as s:
        with pytest.raises(walstore.CompensationFailed) as ei:
            with s.transaction() as tx:
                with tx.action("charge", {"amt": 5}, compensate="refund") as act:
                    act.result = {"id": 1}
                raise KeyError("boom")
        assert isinstance(ei.value.__cause__, KeyError)
        assert len(str(ei.value)) < 2 * MAX_ERROR_BYTES
        assert calls == [act.id] * wactions.COMPENSATION_RETRIES
        a = s.get_action(act.id)
        assert a.state == "failed" and a.error.startswith("RuntimeError: RRR")
        assert a.error.endswith(" bytes cut)")
        assert len(a.error.encode()) <= MAX_ERROR_BYTES + 64
    with walstore.open(path, durability="none") as s:  # (no compensator: still owed)
        a = s.get_action(act.id)
        assert a.state == "failed" and a.error.endswith(" bytes cut)")


def test_rollback_to_a_savepoint_gives_back_its_actions_bytes(path):
    """The review probe's repro4: a retry loop (savepoint, an action with 9 MiB of args,
    rollback_to) was refused at its third attempt for MAX_ACTION_BYTES, though the
    actions a rollback to a savepoint takes out are not in the COMMIT (only their ids).
    Their bytes are given back now; those of the actions kept still count (one that began
    before the savepoint and set its result after it too)."""
    rec = Recorder()
    with walstore.open(path, durability="none", compensators={"undo": rec}) as s:
        with s.transaction() as tx:
            with tx.action("kept", b"k" * (6 << 20), compensate="undo") as kept:
                inner = tx.savepoint()  # (taken while "kept" runs; its result comes after)
                kept.result = b"r" * (6 << 20)
            tx.rollback_to(inner)
            ran = []
            for attempt in range(3):
                sp = tx.savepoint()
                with tx.action("upload", {"blob": "A" * (9 << 20), "n": attempt},
                               compensate="undo") as a:
                    a.result = "ok"
                ran.append(a.id)
                tx.rollback_to(sp)
            assert 12 << 20 < tx.action_bytes < (12 << 20) + 4096
            with pytest.raises(ValueError, match=r"action 'big'.*24 MiB"):  # (kept counts)
                tx.action("big", b"b" * (13 << 20), compensate="undo")
            tx.put("done", 1)
        assert rec.ids == ran and len(ran) == 3
        assert s.get("done") == 1
        states = {a.id: a.state for a in s.actions()}
        assert states[kept.id] == "committed"
        assert [states[i] for i in ran] == ["compensated"] * 3


# ---- other ways a transaction ends without committing -------------------------------------------
def test_conflict_at_commit_compensates_the_actions(store):
    rec = Recorder()
    store.compensator("undo")(rec)
    t1 = store.transaction()
    t1.get("stock")
    with store.transaction() as t2:
        t2.put("stock", 0)
    with t1.action("charge", compensate="undo") as act:
        pass
    t1.put("order", 1)
    with pytest.raises(walstore.ConflictError):
        t1.commit()
    assert rec.ids == [act.id]
    assert store.get_action(act.id).state == "compensated"
    assert store.get("order") is None


def test_store_run_compensates_each_conflicting_attempt(store):
    rec = Recorder()
    store.compensator("undo")(rec)
    attempts: list[str] = []

    def plan(tx):
        tx.get("stock")
        with tx.action("reserve", compensate="undo") as act:
            attempts.append(act.id)
        if len(attempts) == 1:  # someone else changes what we read: conflict at commit
            with store.transaction() as other:
                other.put("stock", 5)
        tx.put("reserved", True)
        return act.id

    done = store.run(plan)
    assert len(attempts) == 2 and done == attempts[1]
    assert rec.ids == [attempts[0]]  # the failed attempt compensated, the winner not
    assert [r["id"] for r in store.log()[0].actions] == [attempts[1]]


def _dangling_then_let_go(path, rec, let_go):
    """A transaction that ran an action and stays open while three others commit; then
    ``let_go(store)`` (a close, or a crash).  Returns (tx, act)."""
    store = walstore.open(path, durability="none", compensators={"undo": rec})
    tx = store.transaction()
    with tx.action("dangling", compensate="undo") as act:
        pass
    for i in range(3):
        with store.transaction() as other:
            other.put(f"k{i}", i)
    store.checkpoint()
    let_go(store)
    return tx, act


def test_transaction_left_open_at_close_is_compensated_at_the_close(path):
    """A close rolls the open transaction back, as a rollback would (its compensation
    runs once, there); the next open has nothing left to undo."""
    rec = Recorder()
    tx, act = _dangling_then_let_go(path, rec, lambda s: s.close())
    assert rec.ids == [act.id] and rec.seen[0].key == act.key
    with walstore.open(path, durability="none", compensators={"undo": rec}) as store:
        assert tx.id not in store.last_recovery.losers
        assert rec.ids == [act.id]
        assert store.get_action(act.id).state == "compensated"
        assert [store.get(f"k{i}") for i in range(3)] == [0, 1, 2]


def test_transaction_left_open_at_a_crash_is_compensated_on_next_open(path):
    rec = Recorder()
    tx, act = _dangling_then_let_go(path, rec, lambda s: s._drop_like_a_crash())
    assert rec.ids == []
    with walstore.open(path, durability="none", compensators={"undo": rec}) as store:
        assert tx.id in store.last_recovery.losers
        assert rec.ids == [act.id] and rec.seen[0].key == act.key
        assert store.get_action(act.id).state == "compensated"
        assert [store.get(f"k{i}") for i in range(3)] == [0, 1, 2]


def test_resolve_is_refused_while_the_compensation_runs_and_stops_a_later_one(tmp_path):
    """Found by a probe: an operator's resolve during a slow compensator succeeded, both
    undid the effect (two refunds), and the compensator's record overwrote 'resolved'."""
    import threading
    inside, release, runs = threading.Event(), threading.Event(), []

    def slow_refund(action):
        runs.append(action.id)
        inside.set()
        assert release.wait(10)

    with walstore.open(str(tmp_path / "s"), compensators={"refund": slow_refund}) as s:
        tx = s.transaction()
        with tx.action("charge", {"amount": 5}, compensate="refund") as act:
            act.result = "c1"
        t = threading.Thread(target=tx.rollback)
        t.start()
        assert inside.wait(10)
        with pytest.raises(walstore.WalstoreError, match="running now"):
            s.resolve(act.id)
        release.set()
        t.join(10)
        assert runs == [act.id] and s.get_action(act.id).state == "compensated"
        with pytest.raises(walstore.WalstoreError):
            s.resolve(act.id)  # settled: nothing to resolve
    with walstore.open(str(tmp_path / "s"), compensators={"refund": slow_refund}) as s:
        assert runs == [act.id] and s.get_action(act.id).state == "compensated"


def test_a_store_closed_under_a_transaction_says_its_compensations_are_owed(tmp_path):
    """The store is let go under a transaction that ran an action (here as a crash lets
    it go; a close rolls such a transaction back itself: test_close_rolls_back.py): its
    rollback cannot record anything, so the error names the compensations the next open
    runs (found by a probe: a bare LMDB 'closed' error, nothing said)."""
    runs = []
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": lambda a: runs.append(a.id)})
    tx = s.transaction()
    with tx.action("charge", {"amount": 5}, compensate="refund") as act:
        act.result = "c1"
    s._drop_like_a_crash()
    with pytest.raises(walstore.StoreClosed, match=r"\['1\.1'\] run when the store is reopened"):
        tx.rollback()
    assert runs == [] and tx.state == "rolled back"
    with walstore.open(str(tmp_path / "s"),
                       compensators={"refund": lambda a: runs.append(a.id)}) as again:
        assert runs == [act.id] and again.get_action(act.id).state == "compensated"


def test_a_copys_new_actions_get_keys_its_source_never_issued(tmp_path):
    """A backup or a restore keeps the store id and the txid counter: a new action in the
    copy got the idempotency key of a different action of the source (the source's $100
    charge and the copy's $7 one shared ``ws-<id>-<txid>.1``: a payment API honouring the
    key takes the new charge for the old one).  A copy names its keys with a token of its
    own from its first open; the actions it inherited keep their recorded keys, and the
    source's keys do not change."""
    import subprocess
    import sys
    src = str(tmp_path / "src")
    with walstore.open(src) as s:
        with s.transaction() as tx:
            with tx.action("charge", args={"amount": 1}, compensate=None):
                pass
        inherited = s.actions()[0].key
    out = subprocess.run([sys.executable, "-m", "walstore", "backup", src,
                          str(tmp_path / "copy")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    keys = {}
    for name in ("src", "copy"):
        with walstore.open(str(tmp_path / name)) as s:
            with s.transaction() as tx:
                with tx.action("charge", args={"amount": 100 if name == "src" else 7},
                               compensate=None) as act:
                    pass
            keys[name] = (tx.id, act.key)
            assert inherited in [a.key for a in s.actions()]
    assert keys["src"][0] == keys["copy"][0]            # the same txid ...
    assert keys["src"][1] != keys["copy"][1]            # ... never the same key
    assert keys["src"][1].startswith(inherited.rsplit("-", 1)[0])  # the source's unchanged
    with walstore.open(str(tmp_path / "copy")) as s:    # stable across reopens of the copy
        with s.transaction() as tx:
            with tx.action("charge", compensate=None) as act:
                pass
        assert act.key.rsplit("-", 1)[0] == keys["copy"][1].rsplit("-", 1)[0]


@pytest.mark.parametrize("how", ["rollback_to", "savepoint block raises"])
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_savepoints_compensator_sees_the_result_its_action_set(tmp_path, how, durability):
    """The contract's own compensator (``refund(action.result["charge_id"])``) after a
    rollback to a savepoint: it was handed ``result None`` (the action's row, read before
    the result's record was published, replaced the result in hand), so it failed three
    times, or (reading None as "nothing charged") recorded ``compensated`` over a charge
    that stood."""
    charges: dict[str, str] = {}

    def refund(action):
        charges[action.result["charge_id"]] = "refunded"

    with walstore.open(str(tmp_path / "s"), durability=durability,
                       compensators={"refund": refund}) as s:
        for n in range(5):
            tx = s.transaction()
            tx.put("before", n)
            sp = tx.savepoint("sp") if how == "rollback_to" else None
            try:
                with (s_ := (tx.savepoint("blk") if sp is None else _nothing())):
                    with tx.action("charge", compensate="refund") as act:
                        charges[f"ch-{n}"] = "charged"
                        act.result = {"charge_id": f"ch-{n}"}
                    if sp is None:
                        raise RuntimeError("the step after the charge failed")
            except RuntimeError:
                pass
            if sp is not None:
                tx.rollback_to(sp)
            tx.commit()
            del s_
        assert charges == {f"ch-{n}": "refunded" for n in range(5)}
        assert {a.state for a in s.actions()} == {"compensated"}
        assert all(a.result["charge_id"].startswith("ch-") for a in s.actions())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("how", ["revert", "rewind"])
def test_an_undos_commit_is_on_disk_before_its_compensations_run(tmp_path, how):
    """durability="normal": revert() and rewind() ran the refund while their claiming
    COMMIT was written but not fsynced (commit() under "normal" returns before the fsync);
    a power loss then left the charge standing in the recovered store beside a refund
    that ran (probe 54: 2 power-loss images in 192).  Now the decision is durable first,
    as an ABORT is: when the refund runs, the log is synced up to what was written."""
    seen = []

    def refund(action):
        wal = store._engine.wal
        seen.append((wal.synced_lsn, wal.written_lsn))

    store = walstore.open(str(tmp_path / "s"), durability="normal", sync_interval=60,
                          compensators={"refund": refund})
    with store:
        store.restore_point("before")
        with store.transaction() as tx:
            tx.put("order", 1)
            with tx.action("charge", compensate="refund"):
                pass
        if how == "revert":
            store.revert(tx.id)
        else:
            store.rewind("before")
        assert store.get("order") is None
        (synced, written), = seen
        assert synced >= written, (synced, written)


def test_one_action_scope_is_entered_once(tmp_path):
    """A second ``with`` on one ``tx.action(...)`` logged a second intent under the same
    id and idempotency key (two side effects, one action row): refused now, nothing
    logged, and a rollback compensates the one side effect once (audit48)."""
    refunds = []
    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refunds.append})
    try:
        tx = s.transaction()
        scope = tx.action("charge", args={"amount": 5}, compensate="refund")
        with scope as act:
            act.result = "ch_1"
        with pytest.raises(walstore.WalstoreError, match="entered already"):
            with scope:
                raise AssertionError("the body of a second entry must not run")
        assert [a.id for a in s.actions()] == [act.id]
        tx.rollback()
        assert [a.result for a in refunds] == ["ch_1"]
        assert [a.state for a in s.actions()] == ["compensated"]
    finally:
        s.close()


def test_a_revert_whose_compensation_fails_names_the_undo_that_stands(tmp_path):
    """A revert commits, then compensates: when the compensation keeps failing the caller
    got CompensationFailed and nothing naming the undo that committed (audit48); its
    ``undo`` is that transaction's TxnInfo now."""
    def refund(action):
        raise RuntimeError("payments down")

    s = walstore.open(str(tmp_path / "s"), compensators={"refund": refund})
    try:
        with s.transaction() as tx:
            tx.put("order", 1)
            with tx.action("charge", compensate="refund") as act:
                act.result = "ch_1"
        with pytest.raises(walstore.CompensationFailed) as info:
            s.revert(tx.id)
        undo = info.value.undo
        assert undo is not None and undo.txid == s.log()[0].txid != tx.id
        assert s.get("order") is None
        assert [a.state for a in s.actions()] == ["failed"]
    finally:
        s.close()
