"""``tx.action(...)`` used without ``with`` says so at once.

``tx.action()`` returns a context manager whose entry logs the durable intent (CONTRACT:
write-ahead for side effects).  Used as ``act = tx.action(...)``, nothing is logged, and
``act.result = charge(...)`` was silently kept on the context manager: the transaction
committed with no intent, no result and nothing to compensate — a charge the store never
heard of.  Reading or setting an action's field on it now raises AttributeError naming
the ``with`` form.
"""
from __future__ import annotations

import pytest

import walstore


def test_an_action_used_without_with_refuses_its_fields(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        act = tx.action("charge", args={"amount": 40}, compensate="refund")
        with pytest.raises(AttributeError, match="with tx.action"):
            act.result = {"charge_id": "ch_1"}  # (before: silently kept, nothing logged)
        with pytest.raises(AttributeError, match="act.key"):
            act.key
        assert not hasattr(act, "result") and not hasattr(act, "no_such_thing")
        with act as a:  # the with form works as before, on the same object
            a.result = {"charge_id": "ch_2"}
        tx.commit()
        [row] = [a for a in s.actions() if a.name == "charge"]
        assert row.result == {"charge_id": "ch_2"} and row.state == "committed"
