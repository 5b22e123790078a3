"""Audit 58, history: revert / rewind / at / restore points / history / retention and
purge (contract, "Action rollback"), as a demanding user of long histories: trims,
rewinds across trimmed ranges, reverts of overwritten keys, odd restore point names,
rewinds beside committing threads, and real processes killed with SIGKILL mid-undo.

Findings (each test named below fails on the code before its fix):

- `walstore restore URL DEST --to " name"` stripped the spaces around a restore point
  name: a point really named " name" could not be restored to from the CLI, and when a
  point "name" existed too, the restore silently cut at that other point.  A name is a
  name exactly as given now (only a time is read with surrounding spaces ignored)
  (``test_restore_to_a_restore_point_name_with_spaces_is_that_point``).
- ``store.at(LSN(end))``, the end of the log (a point accepted: "0 to the end of the
  log"), resolved to the boundary ``end``; the next commit's record begins exactly there,
  so "at or below the boundary" took it in: a view made there changed under its reader
  when a later commit landed (``get`` said 1, then 2; ``scan`` listed a key written after
  the view was made).  A point at the end of a non-empty log is fixed at ``end - 1`` (the
  same state: no record begins in between) when it is resolved
  (``test_a_view_at_the_end_of_the_log_does_not_change_when_a_commit_lands``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import walstore

from store_support import CLI, cli_env


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)


def test_restore_to_a_restore_point_name_with_spaces_is_that_point(tmp_path):
    path, replica = str(tmp_path / "s"), tmp_path / "replica"
    url = replica.as_uri()
    with walstore.open(path, replicate_to=url) as s:
        for value, name in ((1, "name"), (2, " name"), (3, "name "), (4, " 7")):
            with s.transaction() as tx:
                tx.put("a", value)
            s.restore_point(name)
        with s.transaction() as tx:
            tx.put("a", 5)
        s.sync_replica(timeout=30)
    for i, (name, value) in enumerate((("name", 1), (" name", 2), ("name ", 3), (" 7", 4))):
        dest = str(tmp_path / f"d{i}")
        p = cli("restore", url, dest, "--to", name)
        assert p.returncode == 0, (name, p.stderr)
        with walstore.open(dest, readonly=True) as r:
            assert r.get("a") == value, name
            assert set(r.restore_points()) <= {"name", " name", "name ", " 7"}
    p = cli("restore", url, str(tmp_path / "dx"), "--to", "  name")
    assert p.returncode == 2, p.stderr
    assert "no restore point named '  name'" in p.stderr


def test_a_view_at_the_end_of_the_log_does_not_change_when_a_commit_lands(tmp_path):
    # Before: a point at the end of the log (LSN(end): accepted, "0 to the end of the
    # log") resolved to the boundary `end`, and the next commit's record begins exactly
    # there: "at or below the boundary", it became part of the point.  A view made there
    # read the commit made after it (1, then 2), and its scan listed a key written later.
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        end = walstore.LSN(s.stats()["published_lsn"])
        view = s.at(end)
        assert view.get("k") == 1 and list(view.scan()) == [("k", 1)]
        with s.transaction() as tx:
            tx.put("k", 2)
            tx.put("new", 1)
        assert tx.lsn == end  # (the next record begins where the log ended)
        assert view.get("k") == 1 and "new" not in view
        assert list(view.scan()) == [("k", 1)]
