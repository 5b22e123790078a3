"""What the agent layer does for each transaction: the ``TransactionHooks`` the engine's
Transaction calls at the points that involve the outside world (actions, their
compensation, two-phase commit).  One object per store, joining the Saga and 2PC."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .actions import ActionScope, Saga
from .twophase import TwoPhase

if TYPE_CHECKING:
    from ..engine.transaction import Transaction


class AgentHooks:
    def __init__(self, saga: Saga, twophase: TwoPhase) -> None:
        self.saga = saga
        self.twophase = twophase

    def start_action(self, tx: "Transaction", name: str, args: Any, compensate: str | None,
                     scope: Any) -> ActionScope:
        return ActionScope(self.saga, tx, self.saga.new_action(tx, name, args, compensate,
                                                                scope))

    def commit_body(self, tx: "Transaction") -> dict:
        return self.saga.commit_fields(tx)

    def undo_actions(self, tx: "Transaction", actions: list, cause: BaseException | None) -> None:
        self.saga.undo_actions(tx, actions, cause)

    def end_without_commit(self, tx: "Transaction", cause: BaseException | None) -> None:
        self.saga.end_without_commit(tx, cause)

    def prepare(self, tx: "Transaction", gid: str) -> None:
        self.twophase.prepare(tx, gid)

    def commit_prepared(self, gid: str) -> int:
        return self.twophase.commit_prepared(gid)

    def rollback_prepared(self, gid: str) -> None:
        self.twophase.rollback_prepared(gid)
