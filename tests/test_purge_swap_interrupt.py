"""Ctrl-C during the swap of a purge's rewritten LMDB file leaves the store readable.

The swap closes this process's LMDB environment, renames the rewritten data file and a
fresh lock file in, and reopens.  A KeyboardInterrupt landing between the close and the
reopen left the environment closed: every later read of the store raised (LMDB "closed"
errors wrapped as CorruptionError) until it was reopened.  The swap now runs with
asynchronous signals held off (walstore.signals.deferred): the interrupt arrives just after.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402

from store_support import files_with  # noqa: E402

MARKER = b"SWAPINT-91c2"


@pytest.mark.parametrize("which", ["data.mdb", "lock.mdb"])
def test_an_interrupt_inside_the_lmdb_swap_leaves_the_store_readable(tmp_path, monkeypatch,
                                                                     which):
    path = str(tmp_path / "s")
    s = walstore.open(path)
    try:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"conv/{i % 3}", f"{MARKER.decode()}-{i}")
                tx.put(f"keep/{i}", i)
        real = fileio._backend.rename
        fired = []

        def rename(src, dst):
            real(src, dst)
            if src.endswith(os.path.join("db.compact", which)) and not fired:
                fired.append(dst)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, right after this rename

        monkeypatch.setattr(fileio._backend, "rename", rename)
        # (Python's own Ctrl-C handler: a pytest-xdist worker ignores SIGINT)
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                s.purge("conv/")
        finally:
            signal.signal(signal.SIGINT, old)
        monkeypatch.undo()
        assert fired
        # the store reads on, and the swap finished: the purge stands, its bytes are gone
        assert s.get("keep/7") == 7 and s.get("conv/1") is None
        assert [k for k, _v in s.scan(prefix="keep/")][:2] == ["keep/0", "keep/1"]
        with s.transaction() as tx:
            tx.put("after", 1)
    finally:
        s.close()
    with walstore.open(path) as s:
        assert s.get("after") == 1 and s.get("keep/19") == 19 and s.get("conv/2") is None
        assert s._engine.erase_owed() == []
    assert files_with(path, MARKER) == []
