"""A file operation's steps are logged as FILE_STEPS records of STEP_CHUNK steps each, and
one record holds at most MAX_PAYLOAD (32 MiB) bytes.  A step is up to ~9 KB (a 499-byte
path, two symlink rows with 4,095-byte targets), so 4,000 of them passed the limit: a
watch in which a tool re-pointed 4,000 such symlinks failed with a bare "record payload
of 34,592,082 bytes exceeds the 33,554,432 limit" (and its changes were put back).  The
records are cut by bytes too now.  The record limit (and the byte cut) are lowered here
to keep the test small; the relation between them is what is checked."""
from __future__ import annotations

import os

import walstore
from walstore.agent import files as agent_files
from walstore.log import format as log_format


def test_a_watch_of_many_long_symlink_changes_is_logged_within_the_record_limit(
        tmp_path, monkeypatch):
    monkeypatch.setattr(log_format, "MAX_PAYLOAD", 2 << 20)
    monkeypatch.setattr(agent_files, "STEP_CHUNK_BYTES", 512 << 10, raising=False)
    ws_dir = tmp_path / "w"
    sub = "d/" + "s" * 200
    os.makedirs(ws_dir / sub)
    names = [f"{sub}/{i:05d}" + "n" * 200 for i in range(400)]  # 400 x ~8.6 KB: 3.4 MB
    for n in names:
        os.symlink("a" * 4000, ws_dir / n)
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        ws = s.workspace(str(ws_dir))
        with s.transaction() as tx:
            with tx.files(ws).watch():
                for n in names:
                    os.unlink(ws_dir / n)
                    os.symlink("b" * 4000, ws_dir / n)
            assert len(tx.effects[-1].lsns) >= 7  # (3.4 MB of rows, cut at 512 KiB)
    assert all(os.readlink(ws_dir / n) == "b" * 4000 for n in names)
    with walstore.open(path, durability="none") as s:  # (reopened: the records read back)
        s.revert(tx.id)
    assert all(os.readlink(ws_dir / n) == "a" * 4000 for n in names)
