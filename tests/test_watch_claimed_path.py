"""A watch() never takes over a path another transaction changed and has not ended.

probe-undorace (stop 43): T2 wrote w0 and stayed open; a watched process rewrote w0; the
watching transaction claimed it at the watch's end unchecked, both committed, and the
store's latest view of w0 was T2's bytes while the disk held the process's.  A change of
a path another live transaction holds is refused (``ConflictError``) anywhere else; a
watch's is found only at its end, after the fact, so the block's changes are put back
(the other transaction's bytes with them) and ConflictError says so.
"""
from __future__ import annotations

import walstore
import pytest


def test_a_watch_that_changed_a_path_an_open_transaction_holds_conflicts(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    store = walstore.open(tmp_path / "s", durability="none")
    try:
        ws = store.workspace(str(root))
        with store.transaction() as tx:
            tx.files(ws).write("w0.txt", "base\n")
            tx.files(ws).write("other.txt", "base\n")
        t2 = store.transaction()
        t2.files(ws).write("w0.txt", "T2\n")  # T2 holds w0 until it ends
        w = store.transaction()
        with pytest.raises(walstore.ConflictError, match="put back"):
            with w.files(ws).watch():  # (a tool another agent runs)
                (root / "w0.txt").write_text("tool\n")
                (root / "other.txt").write_text("tool\n")
                (root / "new.txt").write_text("tool\n")
        # the block's changes are back: T2's bytes, the other file, no new file
        assert (root / "w0.txt").read_text() == "T2\n"
        assert (root / "other.txt").read_text() == "base\n"
        assert not (root / "new.txt").exists()
        w.commit()  # (nothing of the watch is in it)
        t2.commit()
        latest = store.at(store.log(limit=1)[0].txid).files(ws)
        assert latest.read("w0.txt") == (root / "w0.txt").read_bytes() == b"T2\n"
        assert latest.read("other.txt") == b"base\n"
        store.close()
        store = walstore.open(tmp_path / "s", durability="none")  # (nothing owed)
        assert (root / "w0.txt").read_text() == "T2\n"
    finally:
        store.close()
