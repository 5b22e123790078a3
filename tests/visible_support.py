"""Test support: an fsync of the WAL held until the test lets it go (a slow disk, under
the test's control) — tests/test_visible_mark.py and findings_scripts/visible_writer.py."""
from __future__ import annotations

import os
import threading

from walstore.fileio import OSBackend


def _is_wal(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".wal")
    except OSError:
        return False


class FsyncGate(OSBackend):
    """While held, every fdatasync of a WAL segment waits in the call (after the record
    was written: it is whole in the page cache) until ``release``."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        self.entered.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def fdatasync(self, fd: int) -> None:
        if not self._open.is_set() and _is_wal(fd):
            self.entered.set()
            self._open.wait()
        os.fdatasync(fd)
