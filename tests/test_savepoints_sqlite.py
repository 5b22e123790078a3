"""Savepoints behave like SQLite's (CONTRACT.md section 2, FACTS.md "Savepoints").

The core is a differential test: hypothesis generates random sequences of savepoint /
rollback_to / release / put / delete / get over a small key space and a small set of
(repeatable) savepoint names, and runs each sequence against walstore and against stdlib
sqlite3 (BEGIN; SAVEPOINT x; ROLLBACK TO x; RELEASE x).  Reads are compared after every
step, and the committed (or rolled back) contents at the end.  Hand-written cases below
pin the individual rules.
"""
from __future__ import annotations

import itertools
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walstore

KEYS = ["k0", "k1", "k2", "k3"]
NAMES = ["a", "b", "c"]  # lower case only: SQLite compares savepoint names case-insensitively


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for every hypothesis example; each example works in its own key prefix."""
    s = walstore.open(str(tmp_path_factory.mktemp("sp") / "store"), durability="none")
    yield s
    s.close()


# ---- the differential test ---------------------------------------------------------------

op_strategy = st.one_of(
    st.tuples(st.just("savepoint"), st.sampled_from(NAMES)),
    st.tuples(st.just("rollback_to"), st.sampled_from(NAMES)),
    st.tuples(st.just("release"), st.sampled_from(NAMES)),
    st.tuples(st.just("put"), st.sampled_from(KEYS)),
    st.tuples(st.just("put"), st.sampled_from(KEYS)),  # writes twice as likely
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
)

_example_ids = itertools.count()


class SqliteModel:
    def __init__(self, initial: dict[str, int]) -> None:
        self.db = sqlite3.connect(":memory:", isolation_level=None)  # we issue BEGIN ourselves
        self.db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER)")
        self.db.executemany("INSERT INTO kv VALUES (?, ?)", sorted(initial.items()))
        self.db.execute("BEGIN")  # so that RELEASE of the outermost savepoint never commits

    def get(self, k):
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()
        return None if row is None else row[0]

    def contents(self) -> list[tuple[str, int]]:
        return [tuple(r) for r in self.db.execute("SELECT k, v FROM kv ORDER BY k")]


def _compare_reads(tx, model: SqliteModel, ns: str, history: list) -> None:
    for k in KEYS:
        assert tx.get(ns + k) == model.get(k), (k, history)
        assert (ns + k in tx) == (model.get(k) is not None), (k, history)
    got = [(k[len(ns):], v) for k, v in tx.scan(prefix=ns)]
    assert got == model.contents(), history


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.dictionaries(st.sampled_from(KEYS), st.integers(-5, 5), max_size=4),
       ops=st.lists(op_strategy, max_size=40),
       commit=st.booleans())
def test_savepoints_match_sqlite(shared_store, initial, ops, commit):
    store = shared_store
    ns = f"ex{next(_example_ids):06d}/"
    with store.transaction() as tx:
        for k, v in initial.items():
            tx.put(ns + k, v)
    model = SqliteModel(initial)
    fresh = itertools.count(1000)
    tx = store.transaction()
    history: list = []
    for op, arg in ops:
        history.append((op, arg))
        if op == "savepoint":
            tx.savepoint(arg)
            model.db.execute(f'SAVEPOINT "{arg}"')
        elif op in ("rollback_to", "release"):
            sql = "ROLLBACK TO" if op == "rollback_to" else "RELEASE"
            try:
                model.db.execute(f'{sql} "{arg}"')
            except sqlite3.OperationalError as e:
                assert "no such savepoint" in str(e)
                # SQLite rejects it: walstore must reject it too, and change nothing
                with pytest.raises(ValueError, match=arg):
                    getattr(tx, op)(arg)
                history[-1] = (op, arg, "rejected")
            else:
                getattr(tx, op)(arg)
        elif op == "put":
            v = next(fresh)
            tx.put(ns + arg, v)
            model.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (arg, v))
        elif op == "delete":
            tx.delete(ns + arg)
            model.db.execute("DELETE FROM kv WHERE k = ?", (arg,))
        elif op == "get":
            assert tx.get(ns + arg) == model.get(arg), history
        _compare_reads(tx, model, ns, history)

    if commit:
        tx.commit()
        model.db.execute("COMMIT")
    else:
        tx.rollback()
        model.db.execute("ROLLBACK")
    assert tx.state != "active"
    final = [(k[len(ns):], v) for k, v in store.scan(prefix=ns)]
    assert final == model.contents(), history
    if not commit:
        assert dict(final) == initial
    model.db.close()


# ---- hand-written cases ------------------------------------------------------------------

def test_rollback_to_keeps_the_savepoint_usable(store):
    with store.transaction() as tx:
        tx.put("before", 0)
        sp = tx.savepoint("sp")
        tx.put("x", 1)
        tx.put("before", 10)
        tx.rollback_to(sp)
        assert tx.get("x") is None and tx.get("before") == 0
        assert sp.active
        tx.put("x", 2)
        tx.delete("before")
        tx.rollback_to(sp)  # a second time, to the same savepoint
        assert tx.get("x") is None and tx.get("before") == 0
        tx.rollback_to("sp")  # and by name, with nothing to undo
        assert sp.active
        tx.put("x", 3)
        tx.release(sp)
        assert not sp.active
    assert store.get("x") == 3 and store.get("before") == 0


def test_rollback_to_outer_invalidates_inner(store):
    tx = store.transaction()
    outer = tx.savepoint("outer")
    tx.put("a", 1)
    inner = tx.savepoint("inner")
    tx.put("b", 2)
    innermost = tx.savepoint("innermost")
    tx.put("c", 3)
    tx.rollback_to(outer)
    assert outer.active and not inner.active and not innermost.active
    assert [tx.get(k) for k in "abc"] == [None, None, None]
    for bad in (inner, innermost):
        with pytest.raises(ValueError):
            tx.rollback_to(bad)
        with pytest.raises(ValueError):
            tx.release(bad)
    with pytest.raises(ValueError):
        tx.rollback_to("inner")
    with pytest.raises(ValueError):
        tx.release("innermost")
    tx.put("d", 4)
    tx.rollback_to(outer)  # still usable
    assert tx.get("d") is None
    tx.put("e", 5)
    tx.commit()
    assert dict(store.scan()) == {"e": 5}


def test_release_pops_newer_savepoints_and_keeps_writes(store):
    tx = store.transaction()
    tx.put("base", 0)
    a = tx.savepoint("a")
    tx.put("k", 1)
    b = tx.savepoint("b")
    tx.put("k", 2)
    c = tx.savepoint("c")
    tx.put("j", 3)
    tx.release(b)
    assert a.active and not b.active and not c.active
    assert tx.get("k") == 2 and tx.get("j") == 3  # writes kept
    with pytest.raises(ValueError):
        tx.rollback_to(c)
    with pytest.raises(ValueError):
        tx.rollback_to("b")
    # the writes made under the released savepoints now belong to ``a``
    tx.rollback_to(a)
    assert tx.get("k") is None and tx.get("j") is None and tx.get("base") == 0
    tx.put("k", 9)
    tx.release("a")
    assert not a.active
    tx.commit()
    assert dict(store.scan()) == {"base": 0, "k": 9}


def test_release_of_last_savepoint_keeps_writes_for_later_savepoints(store):
    tx = store.transaction()
    tx.savepoint("a")
    tx.put("k", 1)
    tx.release("a")
    sp = tx.savepoint("a")
    tx.put("k", 2)
    tx.rollback_to(sp)
    assert tx.get("k") == 1  # the value written before this savepoint, not "absent"
    tx.commit()
    assert store.get("k") == 1


def test_repeated_names_resolve_innermost(store):
    tx = store.transaction()
    first = tx.savepoint("x")
    tx.put("k", 1)
    second = tx.savepoint("x")
    tx.put("k", 2)
    tx.rollback_to("x")  # the innermost "x"
    assert tx.get("k") == 1
    assert first.active and second.active
    tx.put("k", 3)
    tx.release("x")  # pops only the innermost "x"
    assert first.active and not second.active
    assert tx.get("k") == 3
    tx.rollback_to("x")  # now the outer one
    assert tx.get("k") is None
    tx.release("x")
    with pytest.raises(ValueError):
        tx.release("x")
    tx.rollback()
    assert "k" not in store


def test_with_savepoint_rolls_back_and_reraises(store):
    with store.transaction() as tx:
        tx.put("kept", 1)
        with pytest.raises(RuntimeError, match="plan a failed"):
            with tx.savepoint("try-plan-a") as sp:
                tx.put("kept", 2)
                tx.put("plan", "a")
                tx.delete("kept")
                raise RuntimeError("plan a failed")
        assert not sp.active  # rolled back to and released
        with pytest.raises(ValueError):
            tx.rollback_to("try-plan-a")
        assert tx.get("kept") == 1 and tx.get("plan") is None
        with tx.savepoint("try-plan-b") as spb:
            tx.put("plan", "b")
        assert not spb.active  # released on normal exit ...
        assert tx.get("plan") == "b"  # ... and its writes kept
    assert dict(store.scan()) == {"kept": 1, "plan": "b"}


def test_nested_with_savepoints(store):
    with store.transaction() as tx:
        with tx.savepoint("outer"):
            tx.put("o", 1)
            with pytest.raises(KeyError):
                with tx.savepoint("inner"):
                    tx.put("i", 1)
                    tx.put("o", 2)
                    raise KeyError("inner")
            assert tx.get("o") == 1 and tx.get("i") is None
            tx.put("after", 1)
        # an exception inside the outer block undoes its inner (released) work too
        with pytest.raises(ZeroDivisionError):
            with tx.savepoint("outer2"):
                with tx.savepoint("inner2"):
                    tx.put("x", 1)
                tx.put("y", 1)
                1 / 0
        assert tx.get("x") is None and tx.get("y") is None
    assert dict(store.scan()) == {"o": 1, "after": 1}


def test_exception_in_savepoint_block_propagates_to_transaction(store):
    with pytest.raises(ValueError, match="boom"):
        with store.transaction() as tx:
            tx.put("a", 1)
            with tx.savepoint("s"):
                tx.put("b", 2)
                raise ValueError("boom")
    assert list(store.scan()) == []
    assert tx.state != "active"


def test_failed_savepoint_operations_change_nothing(store):
    tx = store.transaction()
    a = tx.savepoint("a")
    tx.put("k", 1)
    b = tx.savepoint("b")
    tx.put("k", 2)
    for bad in ("nope", "c"):
        with pytest.raises(ValueError):
            tx.rollback_to(bad)
        with pytest.raises(ValueError):
            tx.release(bad)
    with pytest.raises(TypeError):
        tx.rollback_to(3)
    assert a.active and b.active and tx.get("k") == 2
    tx.rollback_to(b)
    assert tx.get("k") == 1
    tx.rollback_to(a)
    assert tx.get("k") is None
    tx.rollback()


def test_savepoint_of_another_transaction_is_rejected(store):
    t1 = store.transaction()
    t2 = store.transaction()
    sp1 = t1.savepoint("s")
    t2.savepoint("s")
    t2.put("k", 1)
    with pytest.raises(ValueError):
        t2.rollback_to(sp1)
    with pytest.raises(ValueError):
        t2.release(sp1)
    assert t2.get("k") == 1 and sp1.active
    t1.rollback()
    t2.commit()
    assert store.get("k") == 1


def test_savepoints_after_the_transaction_ended(store):
    tx = store.transaction()
    sp = tx.savepoint("s")
    tx.put("k", 1)
    tx.commit()
    assert not sp.active
    with pytest.raises(walstore.TransactionClosed):
        tx.savepoint("t")
    with pytest.raises(walstore.TransactionClosed):
        tx.rollback_to(sp)
    with pytest.raises(walstore.TransactionClosed):
        tx.release("s")
    # leaving a ``with`` savepoint after the transaction ended is harmless
    tx2 = store.transaction()
    with tx2.savepoint("s"):
        tx2.put("k", 2)
        tx2.commit()
    assert store.get("k") == 2


def test_deep_nesting(store):
    tx = store.transaction()
    sps = []
    for i in range(200):
        sps.append(tx.savepoint(f"s{i}"))
        tx.put("depth", i)
        tx.put(f"d{i}", i)
    tx.rollback_to(sps[100])
    assert tx.get("depth") == 99 and tx.get("d100") is None and tx.get("d99") == 99
    assert sps[100].active and not any(sp.active for sp in sps[101:])
    tx.release(sps[50])
    assert all(sp.active for sp in sps[:50]) and not any(sp.active for sp in sps[50:])
    tx.rollback_to(sps[10])
    assert tx.get("depth") == 9
    tx.commit()
    assert store.get("depth") == 9
    assert [k for k, _ in store.scan(prefix="d") if k != "depth"] == sorted(
        f"d{i}" for i in range(10))


def test_rollback_to_undoes_deletes_of_committed_keys(store):
    with store.transaction() as tx:
        tx.put("c", "committed")
    with store.transaction() as tx:
        sp = tx.savepoint()  # unnamed savepoints work with the object
        tx.delete("c")
        assert "c" not in tx
        tx.rollback_to(sp)
        assert tx["c"] == "committed"
        tx.put("c", "changed")
        tx.release(sp)
    assert store["c"] == "changed"
