"""Audit 54, transaction semantics: savepoints, read-your-writes, scans of mixed keys,
``tx.update``, OCC conflicts and phantoms, against a plain in-memory model.

Findings (each test named below fails on the code before its fix):

- A savepoint's undo log took an entry per write, not per key: each rewrite of a key
  under a savepoint kept the value it replaced alive until the savepoint went, so 200
  rewrites of a 1 MiB value held 200 MiB for a 1 MiB write set (past every bound of the
  transaction), and an outer savepoint around a loop of ``savepoint / put / release``
  grew the log by an entry a step. Now one entry per key and savepoint level
  (``test_rewrites_under_a_savepoint_keep_one_before_image``,
  ``test_a_savepoint_per_step_under_an_outer_one_keeps_one_before_image``).
- A transaction kept every scan's range, the same range once per scan: an agent
  polling one prefix 100,000 times held 14 MiB and its PREPARE logged (and its prepared
  row kept) 100,000 ranges, past whose record limit ~1.6 million polls made prepare fail.
  Each range is kept once now (``test_polling_one_prefix_keeps_its_range_once``).
- ``tx.update(iterable)`` packed the whole iterable before the write-set bound
  (480 MiB) refused it: an update from a multi-GiB stream held all of it in memory
  first (an endless one never returned). It now stops reading at the pair that passes
  the bound (``test_an_update_from_a_stream_past_the_bound_stops_reading_it``).
- An exception leaving a ``with tx.savepoint()`` block in which the transaction was
  prepared came out as TransactionClosed ("prepared ...; nothing was undone"), the
  block's own exception only its context; now the block re-raises it and leaves the
  prepared transaction in doubt, as the ``with`` transaction's end does
  (``test_a_savepoint_block_around_a_prepare_re_raises_its_own_exception``).

The model test (``test_transactions_agree_with_a_dict_model``) guards the semantics the
fix touches: nested savepoints, rollback to outer ones, release, read-your-writes, scans
of str and bytes keys both ways, updates with a bad item, and another transaction's
commits (conflicts, phantoms included).
"""
from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walstore
from walstore.errors import ConflictError

MIB = 1 << 20


def _held_while(fn) -> int:
    """Bytes still allocated (traced) after ``fn()`` returns, against before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_rewrites_under_a_savepoint_keep_one_before_image(store):
    with store.transaction() as t:
        t.put("state", b"first")
    tx = store.transaction()
    sp = tx.savepoint("outer")

    def rewrite():
        for i in range(60):
            tx.put("state", b"%03d" % i + b"x" * MIB)  # a fresh 1 MiB value each time
    held = _held_while(rewrite)
    # the write set holds one value; the log one before-image (b"first"'s absence from
    # the write set): 60 MiB were held before
    assert held < 8 * MIB, f"{held / MIB:.1f} MiB held for a 1 MiB write set"
    assert tx.get("state").startswith(b"059")
    tx.rollback_to(sp)
    assert tx.get("state") == b"first"
    tx.put("state", b"second")
    tx.commit()
    assert store.get("state") == b"second"


def test_a_savepoint_per_step_under_an_outer_one_keeps_one_before_image(store):
    tx = store.transaction()
    tx.put("state", b"start")
    outer = tx.savepoint("run")

    def steps():
        for i in range(60):
            with tx.savepoint("step"):  # released at the block's end
                tx.put("state", b"%03d" % i + b"y" * MIB)
    held = _held_while(steps)
    assert held < 8 * MIB, f"{held / MIB:.1f} MiB held for a 1 MiB write set"
    # a step rolled back inside the loop still goes back to the step before it
    inner = tx.savepoint("step")
    tx.put("state", b"bad")
    tx.rollback_to(inner)
    assert tx.get("state").startswith(b"059")
    tx.rollback_to(outer)
    assert tx.get("state") == b"start"
    tx.commit()
    assert store.get("state") == b"start"


def test_polling_one_prefix_keeps_its_range_once(store):
    with store.transaction() as t:
        t.put("inbox/1", "hello")
    tx = store.transaction()

    def poll(times=20_000):
        for _ in range(times):  # an agent waiting for its inbox, in one transaction
            assert [k for k, _v in tx.scan(prefix="inbox/")] == ["inbox/1"]
    poll(50)  # (the first scans' one-time allocations, not counted)
    held = _held_while(poll)
    assert held < 512 * 1024, f"{held / MIB:.1f} MiB held by 20,000 scans of one range"
    tx.put("seen", 1)
    tx.prepare("poller")
    assert len(store.prepared_details("poller").read_ranges) == 1
    # the range still holds: a phantom into it cannot commit while it is in doubt
    with pytest.raises(ConflictError):
        with store.transaction() as other:
            other.put("inbox/2", "late")
    tx.commit()
    store.run(lambda t: t.put("inbox/2", "late"))
    assert [k for k, _v in store.scan(prefix="inbox/")] == ["inbox/1", "inbox/2"]


def test_a_range_scanned_many_times_still_meets_a_phantom(store):
    tx = store.transaction()
    for _ in range(3):
        assert list(tx.scan(prefix="jobs/")) == []
    store.run(lambda t: t.put("jobs/7", "new"))  # a phantom in the scanned range
    tx.put("jobs/summary", 0)
    with pytest.raises(ConflictError):
        tx.commit()
    assert store.get("jobs/summary") is None


def test_a_savepoint_block_around_a_prepare_re_raises_its_own_exception(store):
    class CoordinatorSaidNo(Exception):
        pass
    with pytest.raises(CoordinatorSaidNo):
        with store.transaction() as tx:
            with tx.savepoint("vote"):
                tx.put("k", 1)
                tx.prepare("g1")
                raise CoordinatorSaidNo()
    assert store.prepared() == ["g1"] and tx.state == "active"  # in doubt, held
    with pytest.raises(ValueError, match="no active savepoint"):
        tx.release("vote")  # the block's savepoint ended with the block
    store.rollback_prepared("g1")
    assert store.get("k") is None and store.decision("g1") == "abort"


SMALL = 100_000  # a write-set bound a test can pass in a blink


@pytest.fixture
def small_bound(monkeypatch):
    from walstore.engine import transaction as t
    monkeypatch.setattr(t, "MAX_TXN_WRITE_BYTES", SMALL)
    monkeypatch.setattr(t.Transaction, "_write_trigger", SMALL)
    return SMALL


def test_an_update_from_a_stream_past_the_bound_stops_reading_it(small_bound, store):
    tx = store.transaction()
    tx.put("before", 1)
    read = [0]

    def rows():  # 20 times the bound (a bulk load of a big export, say)
        for i in range(5_000):
            read[0] += 1
            yield f"row/{i:05}", "v" * 400
    with pytest.raises(walstore.TransactionTooLarge, match="this update"):
        tx.update(rows())
    assert read[0] <= SMALL // 400 + 1, f"read {read[0]} rows of a stream past the bound"
    assert [k for k, _v in tx.scan()] == ["before"]  # nothing of the update was made
    # a key repeated far past the bound is one pair: not refused
    tx.update(("same", "w" * 400) for _ in range(2_000))
    tx.update({f"ok/{i}": i for i in range(100)})
    tx.commit()
    assert store.get("same") == "w" * 400 and store.get("ok/99") == 99


# ---- the model ------------------------------------------------------------------------
KEYS = ["a", "a/1", "a/2", "b", "\u00e9", "\U0001f600", b"a", b"a/1", b"\x00", b"\xff"]
BOUNDS = [(None, None, None), ("a", None, None), (None, "a/1", "b"), (None, "b", None),
          (b"a", None, None), (None, b"\x00", b"\xff"), (b"\xff", None, None)]
BAD_ITEMS = [(1, 2), ("k", object()), ("x",), (b"", 1)]
_DEL = object()

OPS = st.one_of(
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    st.tuples(st.just("scan"), st.sampled_from(BOUNDS), st.booleans()),
    st.tuples(st.just("put"), st.sampled_from(KEYS)),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("update"), st.lists(st.sampled_from(KEYS), max_size=4),
              st.one_of(st.none(), st.sampled_from(BAD_ITEMS)), st.booleans()),
    st.tuples(st.just("savepoint"), st.sampled_from(["s1", "s2", "s3"])),
    st.tuples(st.just("rollback_to"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 9)),
    st.tuples(st.just("other"), st.sampled_from(KEYS), st.booleans()),
)


def _order(k):
    return (0, k) if isinstance(k, bytes) else (1, k.encode())


def _inside(k, prefix, start, end) -> bool:
    kind = next((type(b) for b in (prefix, start, end) if b is not None), None)
    if kind is not None and type(k) is not kind:
        return False  # (a bound names its own type's keys)
    return ((prefix is None or k.startswith(prefix)) and (start is None or k >= start)
            and (end is None or k < end))


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    s = walstore.open(str(tmp_path_factory.mktemp("model") / "s"), durability="none")
    yield s
    s.close()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=40))
def test_transactions_agree_with_a_dict_model(model_store, ops):
    store = model_store
    committed = dict(store.scan())
    counter = [0]

    def fresh():
        counter[0] += 1
        return {"n": counter[0]}
    tx = store.transaction()
    own: dict = {}                 # the transaction's writes (_DEL: a delete)
    snap = None                    # committed state at its first read of the store
    reads, ranges, since = set(), [], set()  # keys and ranges read; keys others wrote
    sps: list = []                 # (name, Savepoint, own at that point)

    def view():
        v = dict(committed if snap is None else snap)
        for k, x in own.items():
            if x is _DEL:
                v.pop(k, None)
            else:
                v[k] = x
        return v
    for op in ops:
        kind = op[0]
        if kind == "get":
            if op[1] not in own and snap is None:
                snap = dict(committed)
            if op[1] not in own:
                reads.add(op[1])
            assert tx.get(op[1], "absent") == view().get(op[1], "absent")
        elif kind == "scan":
            bounds, reverse = op[1], op[2]
            if snap is None:
                snap = dict(committed)
            ranges.append(bounds)
            want = sorted(((k, x) for k, x in view().items() if _inside(k, *bounds)),
                          key=lambda kv: _order(kv[0]), reverse=reverse)
            assert list(tx.scan(*bounds, reverse=reverse)) == want
        elif kind == "put":
            own[op[1]] = fresh()
            tx.put(op[1], own[op[1]])
        elif kind == "delete":
            own[op[1]] = _DEL
            tx.delete(op[1])
        elif kind == "update":
            items = [(k, fresh()) for k in op[1]]
            if op[2] is not None:  # a bad item anywhere: refused, nothing of it made
                items.insert(len(items) // 2, op[2])
                with pytest.raises((TypeError, ValueError)):
                    tx.update(iter(items) if op[3] else items)
            else:
                tx.update(dict(items) if op[3] else iter(items))
                own.update(items)
        elif kind == "savepoint":
            sps.append((op[1], tx.savepoint(op[1]), dict(own)))
        elif kind == "rollback_to" and sps:
            i = op[1] % len(sps)
            if op[2]:  # by name: the innermost of that name
                i = max(j for j, s in enumerate(sps) if s[0] == sps[i][0])
                tx.rollback_to(sps[i][0])
            else:
                tx.rollback_to(sps[i][1])
            own = dict(sps[i][2])
            del sps[i + 1:]
        elif kind == "release" and sps:
            i = op[1] % len(sps)
            tx.release(sps[i][1])
            del sps[i:]
        elif kind == "other":
            with store.transaction() as o:
                if op[2]:
                    value = fresh()
                    o.put(op[1], value)
                    committed[op[1]] = value
                else:
                    o.delete(op[1])
                    committed.pop(op[1], None)
            if snap is not None:
                since.add(op[1])
    stale = any(k in reads or any(_inside(k, *b) for b in ranges) for k in since)
    if stale:
        with pytest.raises(ConflictError):
            tx.commit()
    else:
        tx.commit()
        for k, x in own.items():
            if x is _DEL:
                committed.pop(k, None)
            else:
                committed[k] = x
    assert list(store.scan()) == sorted(committed.items(), key=lambda kv: _order(kv[0]))
