"""A savepoint's cost does not grow with the transaction's earlier effects (counted, never
timed).  ``tx.savepoint()`` looked at every effect of the transaction for one a savepoint
is taken inside of (an open ``watch()``: ``blocks_inner_rollback``), so an agent loop
taking a savepoint per step around an action paid for every earlier action: N steps
asked N^2/2 effects (16,000 steps of ``savepoint / action / release`` in one transaction:
24 s, 20 of them in that test).  It now looks only at the effects noted as such when they
joined the transaction (``Transaction.note_inner_blocker``), and a savepoint taken inside
a watch still refuses a rollback to it, the watch running or ended."""
from __future__ import annotations

import pytest

import walstore
from walstore.agent.actions import Action


@pytest.fixture
def asked(monkeypatch):
    """How many times an action was asked whether a savepoint is taken inside it."""
    n = [0]

    def inner(self):
        n[0] += 1
        return None
    monkeypatch.setattr(Action, "blocks_inner_rollback", property(inner), raising=False)
    return n


def _steps(path, n, asked, roll_back_every=0):
    s = walstore.open(path, durability="none", compensators={"refund": lambda a: None})
    try:
        with s.transaction() as tx:
            for i in range(n):
                sp = tx.savepoint("step")
                with tx.action("charge", args={"i": i}, compensate="refund") as a:
                    a.result = i
                tx.put(f"k{i}", i)
                if roll_back_every and i % roll_back_every == 0:
                    tx.rollback_to(sp)
                tx.release(sp)
        kept = [i for i in range(n) if not (roll_back_every and i % roll_back_every == 0)]
        assert sorted(a.result for a in s.actions() if a.state == "committed") == kept
        return asked[0]
    finally:
        s.close()


@pytest.mark.parametrize("roll_back_every", [0, 3])
def test_a_savepoint_per_action_asks_no_earlier_action(tmp_path, asked, roll_back_every):
    small = _steps(str(tmp_path / "a"), 50, asked, roll_back_every)
    asked[0] = 0
    big = _steps(str(tmp_path / "b"), 400, asked, roll_back_every)
    # before: every savepoint asked every earlier action (400 steps: ~80,000 asks; with
    # one step in three rolled back, ~53,000); none now
    assert big <= 400 and big <= 10 * max(small, 1), (small, big)


def test_savepoints_beside_a_watch_still_know_they_are_inside_it(tmp_path):
    """The noted open watch is found while it runs (a savepoint taken then is inside it,
    the watch running or ended), forgotten once it ended (a savepoint taken after the
    block is not), and a rollback to a savepoint before it undoes the block."""
    root = tmp_path / "ws"
    root.mkdir()
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"refund": lambda a: None})
    try:
        ws = s.workspace(str(root))
        tx = s.transaction()
        for i in range(20):  # earlier actions, each between its own savepoint
            with tx.savepoint("step"):
                with tx.action("charge", args={"i": i}, compensate="refund"):
                    pass
        before = tx.savepoint("before")
        with tx.files(ws).watch():
            (root / "a.txt").write_text("a")
            inside = tx.savepoint("inside")
            assert inside.inside and len(tx._inner_blockers) == 1
            with pytest.raises(walstore.WalstoreError, match="inside a watch"):
                tx.rollback_to(inside)
        with pytest.raises(walstore.WalstoreError, match="inside a watch"):
            tx.rollback_to(inside)  # (the watch ended: still refused)
        after = tx.savepoint("after")
        assert after.inside == () and tx._inner_blockers == []  # (the ended one forgotten)
        tx.files(ws).write("b.txt", "b")
        tx.rollback_to(after)
        assert not (root / "b.txt").exists() and (root / "a.txt").exists()
        tx.rollback_to(before)  # before the watch: the block's change is undone
        assert not (root / "a.txt").exists()
        tx.commit()
        assert len([a for a in s.actions() if a.state == "committed"]) == 20
    finally:
        s.close()
