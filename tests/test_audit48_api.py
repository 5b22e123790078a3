"""Audit 48 of the Python API (CONTRACT section 2): regressions found by probing the
promises with edge values and wrong inputs, one test each (each failed before its fix)."""
from __future__ import annotations

import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    yield s
    s.close()


# ---- Transactions, savepoints: the with form ----------------------------------------------
def test_a_savepoint_block_whose_compensation_fails_chains_the_cause_and_ends(store):
    """``with tx.savepoint(...)``: an exception inside rolls back to it; when a compensation
    of an action taken inside then fails, CompensationFailed chains the exception that made
    the block roll back and names it (as a ``with`` transaction's does), and the block's
    savepoint is gone with the block: a later ``rollback_to`` of its name outside the
    block must not undo the transaction's later writes (it did, silently)."""
    @store.compensator("refund")
    def refund(action):
        raise RuntimeError("payments API down")

    tx = store.transaction()
    tx.put("k", 0)
    with pytest.raises(walstore.CompensationFailed) as err:
        with tx.savepoint("plan-a"):
            tx.put("k", 1)
            with tx.action("charge", compensate="refund") as act:
                act.result = {"charge": 1}
            raise KeyError("out of stock")
    assert isinstance(err.value.__cause__, KeyError)
    assert "out of stock" in str(err.value)
    assert tx.get("k") == 0  # rolled back to the savepoint
    assert [a.state for a in store.pending_compensations()] == ["failed"]
    tx.put("k", 5)
    with pytest.raises(ValueError):
        tx.rollback_to("plan-a")  # (the block's savepoint ended with the block)
    assert tx.get("k") == 5
    tx.commit()
    assert store["k"] == 5


def test_a_savepoint_block_still_re_raises_and_releases_without_actions(store):
    with store.transaction() as tx:
        tx.put("k", 0)
        with pytest.raises(KeyError):
            with tx.savepoint("s"):
                tx.put("k", 1)
                raise KeyError("x")
        assert tx.get("k") == 0
        with pytest.raises(ValueError):
            tx.rollback_to("s")
    assert store["k"] == 0


# ---- Reads: scan bounds of str and bytes keys ---------------------------------------------
def _mixed(store):
    with store.transaction() as tx:
        for k in ("a", "a/1", "a/2", "b"):
            tx.put(k, k)
        tx.put(b"a/3", 3)
        tx.put(b"\xff", 4)
    return tx.id


def test_a_scan_bound_names_its_own_key_type(store):
    """str and bytes keys are distinct and never ordered against each other: a str bound
    scans str keys, a bytes bound bytes keys (``scan(end="m")`` yielded every bytes key
    too, ``scan(start=b"a")`` every str key after the bytes ones) — in store.scan,
    tx.scan and an at() view alike."""
    txid = _mixed(store)
    with store.transaction() as tx:
        readers = [store.scan, tx.scan, store.at(txid).scan]
        for scan in readers:
            assert list(scan(end="m")) == [("a", "a"), ("a/1", "a/1"), ("a/2", "a/2"),
                                           ("b", "b")]
            assert list(scan(end="b", reverse=True)) == [("a/2", "a/2"), ("a/1", "a/1"),
                                                         ("a", "a")]
            assert list(scan(start=b"a")) == [(b"a/3", 3), (b"\xff", 4)]
            assert list(scan(start=b"a", reverse=True)) == [(b"\xff", 4), (b"a/3", 3)]
            assert list(scan(end="")) == []
            assert list(scan(prefix=b"")) == [(b"a/3", 3), (b"\xff", 4)]
            # no bound: every key, bytes keys first (as before)
            assert [k for k, _v in scan()] == [b"a/3", b"\xff", "a", "a/1", "a/2", "b"]


def test_scan_bounds_of_both_key_types_are_refused(store):
    """``scan(prefix="a/", start=b"a/2")`` silently ignored its start (it yielded "a/1"):
    bounds of both types name no range, a TypeError naming them."""
    txid = _mixed(store)
    with store.transaction() as tx:
        for scan in (store.scan, tx.scan, store.at(txid).scan):
            for kw in (dict(prefix="a/", start=b"a/2"), dict(start="a", end=b"z"),
                       dict(prefix=b"a", end="b"), dict(prefix=bytearray(b"a"), start="a")):
                with pytest.raises(TypeError, match="all str or all bytes"):
                    list(scan(**kw))
            assert list(scan(prefix=bytearray(b"a"), start=b"a/")) == [(b"a/3", 3)]


# ---- Action rollback: a dry run is the plan the undo carries out --------------------------
def test_a_revert_dry_run_that_would_change_nothing_lists_no_transaction(store):
    """``revert(t)`` that changes nothing commits nothing and returns None; its dry run
    listed ``t`` as undone all the same (a rewind's said so already): a caller acting on
    ``plan.txids`` then met None.  Here: a transaction whose keys were all purged, and one
    that only ran an action declaring no compensation."""
    with store.transaction() as tx:
        tx.put("user/1", "secret")
    purged = tx.id
    store.purge("user/")
    with store.transaction() as tx:
        with tx.action("note", compensate=None) as act:
            act.result = 1
    noted = tx.id
    for txid in (purged, noted):
        plan = store.revert(txid, dry_run=True)
        assert plan.empty() and plan.txids == []
        assert store.revert(txid) is None
    with store.transaction() as tx:
        tx.put("k", 1)
    plan = store.revert(tx.id, dry_run=True)  # (one that changes something: listed)
    assert plan.txids == [tx.id] and plan.keys == ["k"]
    assert store.revert(tx.id).extra["reverts"] == [tx.id]


def test_txn_info_never_takes_a_log_position_for_a_txid(store):
    """``store.txn_info(info.lsn)`` answered with the TxnInfo of whichever transaction had
    that number as its txid (revert refuses an LSN for this reason): a PointTypeError
    (an UnknownPoint and a TypeError, as ``txn_info("x")``'s TypeError)."""
    for i in range(70):
        with store.transaction() as tx:
            tx.put("k", i)
    # a transaction whose commit LSN is another committed transaction's txid
    info = next(i for i in store.log() if 1 <= int(i.lsn) <= tx.id and int(i.lsn) != i.txid)
    assert store.txn_info(int(info.lsn)).txid == int(info.lsn)  # (that txid exists)
    for lsn in (info.lsn, tx.lsn):
        with pytest.raises(walstore.UnknownPoint) as err:
            store.txn_info(lsn)
        assert isinstance(err.value, TypeError) and "log position" in str(err.value)
    with pytest.raises(TypeError):
        store.txn_info("1")


# ---- External side effects: a compensation is done only when its body ran -----------------
async def _async_refund(action):  # pragma: no cover - its body is what never ran
    raise AssertionError("never reached")


def _generator_refund(action):  # pragma: no cover
    yield action


def test_an_async_or_generator_compensator_is_refused_when_registered(tmp_path):
    """An ``async def`` compensator was called, its coroutine dropped ("never awaited"),
    and the action recorded ``compensated`` with no refund made: refused at registration,
    by ``walstore.open(compensators=)`` (nothing opened) and by ``store.compensator``."""
    path = str(tmp_path / "s")
    for fn in (_async_refund, _generator_refund):
        with pytest.raises(TypeError, match="refund"):
            walstore.open(path, compensators={"refund": fn})
    assert not (tmp_path / "s").exists()
    with walstore.open(path, durability="none") as store:
        for fn in (_async_refund, _generator_refund):
            with pytest.raises(TypeError):
                store.compensator("refund")(fn)
        assert "refund" not in store.compensators


def test_a_compensator_returning_an_awaitable_is_a_failed_compensation(store, recwarn):
    """A callable registration cannot tell (an object with an ``async def __call__``) that
    returns a coroutine instead of running is not a compensation done: retried, then
    ``failed``, still owed, CompensationFailed — never ``compensated``."""
    class Refunder:
        async def __call__(self, action):  # pragma: no cover - never awaited
            raise AssertionError("never reached")

    store.compensator("refund")(Refunder())
    tx = store.transaction()
    with tx.action("charge", compensate="refund") as act:
        act.result = {"charge": 1}
    with pytest.raises(walstore.CompensationFailed, match="coroutine"):
        tx.rollback()
    [action] = store.pending_compensations()
    assert action.state == "failed" and action.attempts == 3
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_resolve_note_that_is_not_utf8_is_refused_naming_it(store):
    """A note with a lone surrogate failed inside the record's packing with a bare
    UnicodeEncodeError naming nothing; it is refused up front, as every other name or
    text that is not UTF-8, and nothing changes."""
    tx = store.transaction()
    with tx.action("charge", compensate="nobody-registered") as act:
        act.result = 1
    tx.rollback()
    with pytest.raises(ValueError, match="resolve note .* is not valid UTF-8") as err:
        store.resolve(act.id, note="refunded \ud800")
    assert not isinstance(err.value, UnicodeError)
    assert store.get_action(act.id).state == "pending"
    assert store.resolve(act.id, note="refunded by hand").state == "resolved"


def test_a_savepoint_of_another_transaction_is_refused_naming_its_own(store):
    """``tx2.rollback_to(sp_of_tx1)`` said ``sp`` was "no longer active (released, or
    discarded...)" while it was active in its own transaction: the refusal names the
    transaction it belongs to, and neither transaction changes."""
    tx1, tx2 = store.transaction(), store.transaction()
    tx1.put("k", 1)
    sp = tx1.savepoint("a")
    tx1.put("k", 2)
    tx2.put("k", 3)
    for verb in (tx2.rollback_to, tx2.release):
        with pytest.raises(ValueError, match=f"belongs to transaction {tx1.id}, not to "
                                             f"transaction {tx2.id}"):
            verb(sp)
    assert sp.active and tx1.get("k") == 2 and tx2.get("k") == 3
    tx1.rollback_to(sp)
    assert tx1.get("k") == 1
    tx1.rollback()
    tx2.rollback()


def test_a_compensator_that_schedules_a_task_is_done_once(store):
    """A Task or Future a compensator schedules runs by itself: its return is the
    compensator's word that the compensation is under way (done once, never retried as a
    failure, which would schedule it again)."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        scheduled = []

        async def refund_later(action):
            scheduled.append(action.id)

        store.compensator("refund")(lambda action: loop.create_task(refund_later(action)))
        tx = store.transaction()
        with tx.action("charge", compensate="refund") as act:
            act.result = 1
        tx.rollback()
        loop.run_until_complete(asyncio.sleep(0))
        assert scheduled == [act.id]
        assert store.get_action(act.id).state == "compensated"
    finally:
        loop.close()


def test_recover_handlers_with_an_async_compensator_is_a_usage_error(tmp_path, monkeypatch):
    """``walstore recover --handlers MODULE`` whose COMPENSATORS holds an ``async def``:
    a usage error naming it (exit 2), as a non-callable one is — not "recover failed ...
    an unexpected error"."""
    from click.testing import CliRunner
    from walstore.cli import main

    path = str(tmp_path / "s")
    walstore.open(path).close()
    (tmp_path / "asynchandlers48.py").write_text(
        "async def refund(action):\n    pass\n\nCOMPENSATORS = {'refund': refund}\n")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["recover", path, "--handlers", "asynchandlers48"])
    assert r.exit_code == 2, r.output
    assert "'refund' is an async function" in r.output
    assert "unexpected" not in r.output


def test_registering_a_compensator_on_a_closed_store_raises_store_closed(tmp_path):
    """Every public method of a closed store raises StoreClosed; ``store.compensator``
    registered a compensator that could never run, without a word."""
    store = walstore.open(str(tmp_path / "s"), durability="none")
    store.close()
    with pytest.raises(walstore.StoreClosed):
        store.compensator("refund")(lambda action: None)
    assert "refund" not in store.compensators
