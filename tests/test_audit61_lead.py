"""Stop 61, the lead's own findings: the API created a store inside another store's
directory (the CLI refused it); a revert or rewind that left compensations owed for want
of a compensator returned without a word."""
import os
import warnings

import pytest

import walstore


def test_the_api_refuses_a_store_inside_another_stores_directory(tmp_path) -> None:
    """``walstore init STORE/sub`` was refused, ``walstore.open("STORE/sub")`` made a
    store among the outer store's files, which its backup, restore and purge know
    nothing of.  Refused now, nothing made; the outer store opens as before."""
    outer = tmp_path / "outer"
    walstore.open(str(outer)).close()
    before = sorted(os.listdir(outer))
    for inner in (outer / "sub", outer / "wal" / "x", outer / "db" / "y" / "z"):
        with pytest.raises(walstore.NotAStore, match="lies inside the store"):
            walstore.open(str(inner))
        assert not inner.exists()
    assert sorted(os.listdir(outer)) == before
    with walstore.open(str(outer)) as s:
        assert s.get("k") is None
    # beside it (a sibling) is fine, as is a store reached through a symlink to outside
    walstore.open(str(tmp_path / "sibling")).close()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", outer.parent / "link")
    walstore.open(str(outer.parent / "link")).close()


def _charge(store, n: int) -> None:
    with store.transaction() as tx:
        tx.put(f"order/{n}", n)
        with tx.action("charge", args={"n": n}, compensate="refund") as act:
            act.result = {"charge": n}


def test_an_undo_that_leaves_compensations_owed_says_so(tmp_path) -> None:
    """No compensator registered for an undone action: the undo commits and the action
    stays pending (CONTRACT: listed, resolved by hand) — and now a RuntimeWarning at the
    caller's line names the actions and what to do; with a compensator, none."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        _charge(s, 1)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            info = s.revert(1)
        assert info is not None and s.get("order/1") is None
        msgs = [w for w in got if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "no compensator is registered for 'refund'" in str(
            msgs[0].message)
        assert msgs[0].filename == __file__  # (at the caller's line)
        assert [a.state for a in s.pending_compensations()] == ["pending"]
        s.restore_point("p")
        _charge(s, 2)
        plan = s.rewind("p", dry_run=True)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            s.rewind("p")
        msgs = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and all(a in msgs[0] for a in plan.left_pending)
    refunds = []
    with walstore.open(path, compensators={"refund": lambda a: refunds.append(a.args)}) as s:
        s.retry_compensations()
        assert sorted(r["n"] for r in refunds) == [1, 2]
        s.restore_point("q")
        _charge(s, 3)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            s.rewind("q")
        assert not [w for w in got if issubclass(w.category, RuntimeWarning)]
        assert sorted(r["n"] for r in refunds) == [1, 2, 3]
        assert s.pending_compensations() == []


def test_values_with_non_string_map_keys_read_back_on_every_path(tmp_path) -> None:
    """A read tries msgpack's defaults first (no keyword parsing: ~56 ns a read) and
    decodes a value whose maps have other keys (ints, floats, None) leniently after:
    the same value either way, fresh (the overlay) and reopened (LMDB), through every
    reader; a damaged value is still a CorruptionError naming its row."""
    values = {"ints": {1: "a", 2: [{3: 4}]}, "mixed": {"s": {1.5: None}, b"b": {None: 1}},
              "plain": {"a": [1, 2]}, "bytes": b"\x00\xc1", "nested": [[{7: 8}]]}
    path = str(tmp_path / "s")
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.update(values)
    point = s.restore_point("p")
    for store_open in (lambda: s, lambda: walstore.open(path)):
        st = store_open()
        for k, v in values.items():
            assert st.get(k) == v and st[k] == v
        assert dict(st.scan()) == values
        with st.transaction() as tx:
            assert {k: tx.get(k) for k in values} == values
        assert {k: st.at(point).get(k) for k in values} == values
        st.close()
