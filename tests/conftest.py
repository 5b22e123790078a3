"""Shared fixtures: a store path in the test's temp dir, and a scratch store on it.

(A test module may define its own ``path`` / ``store``; pytest prefers the module's.)
"""
from __future__ import annotations

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
