"""Review of the operator-verb changes of probe-audit67 (test_audit67_operator): each
change tried against what it must not do.

Findings (each test's docstring says what was seen before its fix):
- revert's new "was undone already" refusal was said of a transaction a *scoped* undo
  had taken back only in part (its keys outside the scope still stood): the operator
  was told there was nothing left to revert;
- and it was not said after a rewind, or a cascade revert, that undid the transaction
  together with a later one: the old advice ("use cascade=True") came back.
"""
from __future__ import annotations

import pytest

from walstore.errors import RevertConflict


@pytest.mark.parametrize("undo", ["rewind", "revert"])
def test_a_revert_after_a_scoped_undo_is_never_told_nothing_is_left(store, undo):
    """T wrote a/x and b/y; a revert or rewind scoped to "a/" took a/x back, b/y stood.
    An unscoped revert of T then said "transaction T was undone already ... nothing is
    left to revert" (RevertConflict), b/y still holding T's value.  It is not said of a
    transaction undone in part: the revert goes on as before that change did."""
    with store.transaction() as tx:
        tx.put("base", 0)
    with store.transaction() as tx:
        tx.put("a/x", 1)
        tx.put("b/y", 1)
    t = tx.id
    if undo == "rewind":
        store.rewind(t - 1, scope="a/")
    else:
        store.revert(t, scope="a/")
    assert dict(store.scan()) == {"base": 0, "b/y": 1}
    try:
        store.revert(t)
    except RevertConflict as e:
        assert "undone already" not in str(e), e
    else:
        assert dict(store.scan()) == {"base": 0}


@pytest.mark.parametrize("undo", ["rewind", "cascade"])
def test_a_revert_of_what_a_rewind_or_cascade_undid_says_it_was_undone(store, undo):
    """T and then W wrote k (T also own); a rewind to before T (or a cascade revert of T) undid both
    as transaction U.  A revert of W said "W was undone already, by [U]", but a revert
    of T said "cannot be reverted alone: later transactions [U, W] changed the same keys
    (use cascade=True)" — W being undone by U as well; the advice committed an undo of
    all three.  It says T was undone already, by U."""
    with store.transaction() as tx:
        tx.put("base", 0)
    with store.transaction() as tx:
        tx.put("k", 1)
        tx.put("own", 1)  # (a rewind lists T among those it undid: not all shadowed by W)
    t = tx.id
    with store.transaction() as tx:
        tx.put("k", 2)
    u = (store.rewind(t - 1) if undo == "rewind" else store.revert(t, cascade=True)).txid
    for txid in (t, t + 1):
        with pytest.raises(RevertConflict, match=rf"transaction {txid} was undone already, "
                                                 rf"by transaction\(s\) \[{u}\]"):
            store.revert(txid)
    assert dict(store.scan()) == {"base": 0}
    assert [i.txid for i in store.log(limit=1)] == [u]


def test_a_revert_of_a_reverted_revert_is_not_undone_already(store):
    """T reverted by U, U reverted by V (T's value back): T stands, and a revert of it
    is not refused as undone already (found right: the later writers [V, U] named)."""
    with store.transaction() as tx:
        tx.put("k", 1)
    t = tx.id
    u = store.revert(t).txid
    store.revert(u)
    assert store.get("k") == 1
    with pytest.raises(RevertConflict) as e:
        store.revert(t)
    assert "undone already" not in str(e.value), e.value
