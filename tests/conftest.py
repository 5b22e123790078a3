"""Shared fixtures: a store path in the test's temp dir, and a scratch store on it.

(A test module may define its own ``path`` / ``store``; pytest prefers the module's.)
"""
from __future__ import annotations

import os

import pytest

import walstore


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def store(path):
    s = walstore.open(path, durability="none")
    yield s
    s.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (the longest interrupt sweeps) run only with WALSTORE_SLOW=1:
    CI stays within its budget; docs/GUIDE.md ("Interrupts") says how to run them."""
    if os.environ.get("WALSTORE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long: run with WALSTORE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def passed(monkeypatch):
    """Events passed over by ``MemTable.events_of`` (each call passes over them all):
    the scaling tests count a lookup's cost in these, never in seconds."""
    from walstore.engine.memtable import MemTable
    n = [0]
    real = MemTable.events_of

    def counted(self, types, upto=None):
        n[0] += len(self.events)
        return real(self, types, upto)
    monkeypatch.setattr(MemTable, "events_of", counted)
    return n
