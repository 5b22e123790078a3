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
    CI stays within its budget; README's Reliability section says how to run them."""
    if os.environ.get("WALSTORE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long: run with WALSTORE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
