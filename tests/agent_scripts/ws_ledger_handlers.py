"""Compensators for ``walstore recover --handlers ws_ledger_handlers`` (and the tests).

The action's args carry where the ledger and the call log live, so this module has no
global state: ``{"ledger": PATH, "calls": PATH, "amount": n}``.
"""
from __future__ import annotations

import ws_ledger


def refund(action) -> None:
    ws_ledger.note_call(action.args.get("calls"), action)
    ws_ledger.refund(action.args["ledger"], action.key)


COMPENSATORS = {"refund": refund}
