"""A plain commit waits in the MemTable with its body packed (nothing for the garbage
collector to scan), and its record on disk is what it always was."""
from __future__ import annotations

import gc

import msgpack
import pytest

import walstore
from walstore.codec import encode_key, pack, unpack
from walstore.log.reader import LogReader
from walstore.engine import tables
from walstore.log.records import PLAIN_FIELDS, Event, extend_map, with_writes


@pytest.mark.parametrize("n", [0, 1, 13, 14, 15, 16, 300, 65535, 65536])
def test_with_writes_is_the_map_with_w_last(n):
    body = {f"f{i}": i for i in range(n)}
    writes = [[b"k", b"v"], [b"gone", None]]
    got = with_writes(pack(body), pack(writes))
    assert got == pack(dict(body, w=writes))  # byte for byte, every map header size
    assert msgpack.unpackb(got, raw=False) == dict(body, w=writes)


def test_with_writes_refuses_what_is_not_a_map():
    with pytest.raises(ValueError):
        with_writes(pack([1, 2]), pack([]))


@pytest.mark.parametrize("n", [0, 1, 12, 13, 15, 16, 300, 65533, 65534])
def test_extend_map_is_the_merged_map_at_every_header_size(n):
    body = {f"f{i}": i for i in range(n)}
    extra = {"lsn": 7, "end": 9, "w": [[b"k", None]]}
    got = extend_map(pack(body), extra)
    assert got == pack(dict(body, **extra))  # byte for byte: the same entries, in order
    with pytest.raises(ValueError):
        extend_map(pack([1]), extra)


@pytest.mark.parametrize("scope", [None, b"conv-1", "agents/a/"])
def test_a_plain_commits_txns_row_is_the_row_of_its_decoded_body(scope):
    body = {"ts": 1733000000.25, "meta": {"agent": "a", "n": [1, 2]}, "tx": 41}
    if scope is not None:
        body["scope"] = scope
    writes = ((b"k1", pack(1)), (b"gone", None))
    packed = Event(100, 180, 1, 41, pack(body), writes)
    decoded = Event(100, 180, 1, 41, dict(body), writes)
    assert packed.packed_body is not None and decoded.packed_body is None
    assert (unpack(tables.plain_txn_row(packed, packed.packed_body))
            == unpack(pack(tables.txn_row(decoded))))


@pytest.mark.parametrize("fields", [9, 12, 13, 20])
def test_plain_txn_row_joins_any_map_it_is_given(fields):
    body = {f"x{i}": i for i in range(fields)}  # (past a fixmap's room: the general path)
    ev = Event(100, 180, 1, 41, pack(body), ((b"k", None),))
    row = unpack(tables.plain_txn_row(ev, ev.packed_body))
    assert row == dict(body, lsn=100, end=180, w=[[b"k", None]])


def _unapplied(store, txid):
    mt = store._engine.memtable
    return next(e for e in mt.events if e.txid == txid and e.type == 1)  # (its COMMIT)


def test_a_plain_commit_waits_packed_and_reads_back(tmp_path):
    with walstore.open(tmp_path / "s", apply_interval=3600, apply_batch=10**6) as s:
        tx = s.transaction(meta={"agent": "a", "nested": {"step": [1, 2]}}, scope=b"conv-1")
        tx.put(b"k", {"v": 1})
        tx.put(b"k2", "x")
        tx.commit()
        e = _unapplied(s, tx.id)
        assert type(e._body) is bytes and not gc.is_tracked(e._body)
        assert e.body["meta"] == {"agent": "a", "nested": {"step": [1, 2]}}
        assert e.body["tx"] == tx.id and e.body["scope"] == b"conv-1"
        assert e.body.keys() <= PLAIN_FIELDS
        assert e.field("meta")["agent"] == "a" and e.field("compensate", ()) == ()
        assert e.field("gid") is None
        gc.collect()  # tuples of atomics leave the collector's lists at a collection
        gc.collect()  # (the outer one at the next, when it was listed before its items)
        assert not gc.is_tracked(e.writes)
        # what readers of the unapplied commit see: its log row, its values
        info = s.log(limit=1)[0]
        assert info.meta["nested"] == {"step": [1, 2]} and info.txid == tx.id
        assert info.scope == b"conv-1"
        assert s.get(b"k") == {"v": 1}
        s._engine.drain()
        assert e.body["meta"]["agent"] == "a"  # (still decodable once applied)
        after = s.log(limit=1)[0]  # its txns row, written from the packed body
        for f in ("txid", "lsn", "timestamp", "meta", "keys", "actions", "scope"):
            assert getattr(after, f) == getattr(info, f), f
    # the record on disk: the same map it always was, ``tx`` then ``w`` last
    payloads = [unpack(r.payload) for r in LogReader(str(tmp_path / "s" / "wal"), None)
                .records() if r.type == 1]
    body = next(b for b in payloads if b.get("tx") == tx.id)
    assert list(body)[-2:] == ["tx", "w"]
    assert sorted(map(tuple, body["w"])) == [(encode_key(b"k"), pack({"v": 1})),
                                             (encode_key(b"k2"), pack("x"))]


def test_a_commit_that_does_more_keeps_its_body_decoded(tmp_path):
    with walstore.open(tmp_path / "s", apply_interval=3600, apply_batch=10**6) as s:
        refunds = []
        s.compensator("refund")(lambda a: refunds.append(a.args))
        with s.transaction() as tx:
            with tx.action("charge", {"amount": 5}, compensate="refund") as act:
                act.result = "ok"
            tx.put(b"paid", True)
        e = _unapplied(s, tx.id)
        assert type(e._body) is dict and e.field("actions") == e.body["actions"]
        # a revert commits ``compensate`` (claims the MemTable tracks until applied)
        s.revert(tx.id)
        undo = next(ev for ev in s._engine.memtable.events
                    if ev.type == 1 and ev.field("compensate"))
        assert type(undo._body) is dict
        assert refunds == [{"amount": 5}] and s.get(b"paid") is None
        with pytest.raises(walstore.RevertConflict):
            s.revert(tx.id)  # claimed once: never compensated twice
        assert refunds == [{"amount": 5}]


def test_events_built_by_hand_or_by_the_log_reader_take_a_dict():
    e = Event(lsn=1, end=2, type=1, txid=3, body={"compensate": ["3.1"], "ts": 1.0})
    assert e.field("compensate") == ["3.1"] and e.thaw() is e.body
    p = Event(1, 2, 1, 3, pack({"ts": 2.0, "tx": 3}))
    assert p.field("ts") == 2.0 and p.field("purge_range") is None
    assert p.thaw() == {"ts": 2.0, "tx": 3} and type(p._body) is dict
    assert "ts" in repr(p)


@pytest.mark.parametrize("apart", [False, True])
def test_a_plain_commit_whose_intent_was_rolled_back_leaves_no_in_flight_row(tmp_path, apart):
    """A transaction that ran an action, rolled it back to a savepoint (compensated), then
    committed plain writes: its COMMIT is plain, yet its intent left an ``inflight`` row,
    which the applier must delete (else the next recovery takes it for a loser), whether
    the intent was applied in an earlier LMDB batch (``apart``) or in the same one."""
    runs = []
    s = walstore.open(tmp_path / "s", apply_interval=3600, apply_batch=10**6)
    s.compensator("undo")(lambda a: runs.append(a.id))
    with s.transaction() as tx:
        sp = tx.savepoint("a")
        with tx.action("x", compensate="undo") as act:
            act.result = 1
        tx.rollback_to(sp)
        if apart:
            s._engine.drain()  # the intent reaches LMDB before the commit is logged
            assert list(s._engine.state.scan(b"", None, db="inflight"))
        tx.put("k", 1)
    assert runs == ["%d.1" % tx.id]
    assert _unapplied(s, tx.id).packed_body is not None  # (plain)
    s._engine.drain()
    assert list(s._engine.state.scan(b"", None, db="inflight")) == []
    s._engine.drop_like_a_crash()
    with walstore.open(tmp_path / "s") as again:
        again.compensator("undo")(lambda a: runs.append(a.id))
        assert again.get("k") == 1 and again.pending_compensations() == []
        assert runs == ["%d.1" % tx.id]  # never compensated twice
