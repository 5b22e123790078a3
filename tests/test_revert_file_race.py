"""A revert never puts a file back over a later committed walstore write of it.

probe-undorace (stop 43): a transaction W writing the same file as T, committed after
``revert(T)`` took its snapshot, was not seen by the revert's plan (its file history
ends at the snapshot) nor by its validation (keys only): ``revert(T, force=True)`` put
T's before-image over W's committed content, and without ``force`` the revert raised
"changed behind walstore's back ... use force=True" about a committed walstore change
(free-running: 7-54 in 300-400 rounds).  Now a commit that changed files after the
snapshot makes the revert conflict (at its plan, or at commit: ``guard_files``), and it
plans again after it: W is a later writer, RevertConflict names it, as for a key.
"""
from __future__ import annotations

import threading

import pytest

import walstore


def _writer_of_f_at(store, ws, later: list):
    """A fault-point effect: once, in another thread, a transaction that writes f.txt
    and commits (its txid noted in ``later``)."""
    def racer(_name):
        if later:
            return

        def w():
            with store.transaction() as wtx:
                wtx.files(ws).write("f.txt", "W\n")
            later.append(wtx.id)
        th = threading.Thread(target=w)
        th.start()
        th.join(30)
    return racer


@pytest.mark.parametrize("where", ["undo.resolved", "undo.planned"])
@pytest.mark.parametrize("force", [False, True])
def test_a_revert_racing_a_later_write_of_its_file_names_it(tmp_path, where, force):
    from tools.faults import FaultBackend, installed
    store = walstore.open(tmp_path / "s", durability="none")
    root = tmp_path / "ws"
    root.mkdir()
    ws = store.workspace(str(root))
    try:
        with store.transaction() as tx:
            tx.files(ws).write("f.txt", "before\n")
        with store.transaction() as tx:
            tx.files(ws).write("f.txt", "T\n")
        t = tx.id
        later: list = []
        fb = FaultBackend()
        fb.at_point(where, _writer_of_f_at(store, ws, later))
        with installed(fb):
            with pytest.raises(walstore.RevertConflict) as err:
                store.revert(t, force=force)
        assert later and err.value.txids == later
        assert (root / "f.txt").read_text() == "W\n"
        assert store.at(walstore.LSN(int(store.log(limit=1)[0].lsn) + 1)).files(ws).read(
            "f.txt") == b"W\n"
        # and with cascade the revert undoes both, newest first
        info = store.revert(t, cascade=True, force=force)
        assert info is not None and (root / "f.txt").read_text() == "before\n"
    finally:
        store.close()


def test_a_rewind_racing_a_later_write_of_its_file_plans_it_in(tmp_path):
    """(review43) The same race for a rewind: a file commit after its snapshot was taken
    for a change behind walstore's back; the rewind now conflicts, plans again and undoes
    it too (it is after the point)."""
    from tools.faults import FaultBackend, installed
    store = walstore.open(tmp_path / "s", durability="none")
    root = tmp_path / "ws"
    root.mkdir()
    ws = store.workspace(str(root))
    try:
        with store.transaction() as tx:
            tx.files(ws).write("f.txt", "before\n")
        store.restore_point("P")
        with store.transaction() as tx:
            tx.files(ws).write("f.txt", "T\n")
        later: list = []
        fb = FaultBackend()
        fb.at_point("undo.resolved", _writer_of_f_at(store, ws, later))
        with installed(fb):
            info = store.rewind("P")
        assert later and later[0] in info.extra["reverts"]
        assert (root / "f.txt").read_text() == "before\n"
    finally:
        store.close()
