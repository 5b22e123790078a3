"""Audit 67, the lead's own findings (each test's docstring says what was seen before).

- a record appended to a WAL its store had closed failed as WalWriteError ("could not
  write the WAL record: Bad file descriptor"): a disk error, which turns a store
  read-only, for a log that was only let go (stop 66's closing note, noticed then).
"""
from __future__ import annotations

import pytest

import walstore
from walstore.codec import pack
from walstore.log.format import RecordType


@pytest.mark.parametrize("buffered", [False, True])
def test_store_closed_is_what_a_write_to_a_closed_log_raises(tmp_path, buffered):
    """Before: WalWriteError (EBADF) from ``append``; a buffered record went to
    ``_flush``, which voided it as a failed write.  Now StoreClosed either way, and the
    store's files are as the close left them (the reopened store has its commit)."""
    s = walstore.open(str(tmp_path / "s"))
    with s.transaction() as tx:
        tx.put("k", 1)
    wal = s._engine.wal
    s.close()
    payload = pack({"tx": 99, "w": [[b"sx", pack(2)]]})
    with pytest.raises(walstore.StoreClosed):
        if buffered:
            wal._crowded = True  # (as when other threads were committing)
            wal.append_grouped(RecordType.WRITES, payload)
            with wal.lock:
                wal._flush()
        else:
            wal.append(RecordType.WRITES, payload)
    assert wal.voided_records == 0
    with walstore.open(str(tmp_path / "s")) as again:
        assert again.get("k") == 1
