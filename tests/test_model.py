"""Model-based test: walstore against a dict model, with savepoints, checkpoints and crashes.

A hypothesis RuleBasedStateMachine drives put, delete, savepoint, rollback_to, release,
commit, rollback, checkpoint and crash-and-reopen (the store is dropped without close,
as a killed process leaves it; reopening runs recovery) and checks after every step that
the store agrees with the model: reads inside the open transaction see the model's
pending state; reads outside see the committed state.  At teardown ``verify`` must pass.
"""
from __future__ import annotations

import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule)

import walstore
from walstore.ops.verify import verify_store

KEYS = st.sampled_from(["a", "b", "c", "d", b"e", "f/1", "f/2"])
NAMES = st.sampled_from(["s1", "s2", "s3"])


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="walstore-model-")
        self.path = self.dir + "/store"
        self.store = walstore.open(self.path, durability="none", segment_size=8192)
        self.committed: dict = {}
        self.tx = None
        self.pending: dict = {}
        self.savepoints: list[tuple[str, dict]] = []  # (name, pending copy at that point)
        self.counter = 0

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    # ---- transaction lifecycle ---------------------------------------------------------
    @precondition(lambda self: self.tx is None)
    @rule()
    def begin(self) -> None:
        self.tx = self.store.transaction()
        self.pending = dict(self.committed)
        self.savepoints = []

    @precondition(lambda self: self.tx is not None)
    @rule(key=KEYS)
    def put(self, key) -> None:
        value = {"n": self.fresh(), "k": str(key)}
        self.tx.put(key, value)
        self.pending[key] = value

    @precondition(lambda self: self.tx is not None)
    @rule(key=KEYS)
    def delete(self, key) -> None:
        self.tx.delete(key)
        self.pending.pop(key, None)

    @precondition(lambda self: self.tx is not None)
    @rule(name=NAMES)
    def savepoint(self, name) -> None:
        self.tx.savepoint(name)
        self.savepoints.append((name, dict(self.pending)))

    def _index(self, name):
        for i in range(len(self.savepoints) - 1, -1, -1):
            if self.savepoints[i][0] == name:
                return i
        return None

    @precondition(lambda self: self.tx is not None)
    @rule(name=NAMES)
    def rollback_to(self, name) -> None:
        i = self._index(name)
        if i is None:
            try:
                self.tx.rollback_to(name)
            except ValueError:
                return
            raise AssertionError("rollback_to an unknown savepoint did not raise")
        self.tx.rollback_to(name)
        self.pending = dict(self.savepoints[i][1])
        del self.savepoints[i + 1:]

    @precondition(lambda self: self.tx is not None)
    @rule(name=NAMES)
    def release(self, name) -> None:
        i = self._index(name)
        if i is None:
            try:
                self.tx.release(name)
            except ValueError:
                return
            raise AssertionError("release of an unknown savepoint did not raise")
        self.tx.release(name)
        del self.savepoints[i:]

    @precondition(lambda self: self.tx is not None)
    @rule()
    def commit(self) -> None:
        self.tx.commit()
        self.committed = dict(self.pending)
        self.tx = None

    @precondition(lambda self: self.tx is not None)
    @rule()
    def rollback(self) -> None:
        self.tx.rollback()
        self.tx = None

    # ---- store-level events ------------------------------------------------------------
    @precondition(lambda self: self.tx is None)
    @rule()
    def checkpoint(self) -> None:
        self.store.checkpoint()

    @rule()
    def crash_and_reopen(self) -> None:
        self.store.sync()  # durability="none": a process crash keeps what reached the OS
        self.store._drop_like_a_crash()
        self.tx = None
        self.store = walstore.open(self.path, durability="none", segment_size=8192)

    @precondition(lambda self: self.tx is None)
    @rule()
    def clean_reopen(self) -> None:
        self.store.close()
        self.store = walstore.open(self.path, durability="none", segment_size=8192)

    # ---- agreement ---------------------------------------------------------------------
    @invariant()
    def committed_state_agrees(self) -> None:
        assert dict(self.store.scan()) == self.committed

    @invariant()
    def transaction_view_agrees(self) -> None:
        if self.tx is not None:
            assert dict(self.tx.scan()) == self.pending
            for k in ("a", b"e", "f/2"):
                assert self.tx.get(k) == self.pending.get(k)

    def teardown(self) -> None:
        try:
            if self.tx is not None:
                self.tx.rollback()
            self.store.close()
            report = verify_store(self.path)
            assert report.ok, report.errors
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


StoreModel.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestStoreModel = StoreModel.TestCase
