"""Audit 60, reversible files at the edges of close, threads and processes.

Findings (each test named below fails on the code before its fix):

- ``store.close()`` while another thread was inside a ``with tx.files(ws).watch():``
  block (a tool writing files): close did not wait for the block and closed the log
  under it.  The block's end could not be logged, so its changes stayed on disk after a
  clean close, and the next open put them back as after a crash — every path the tool
  wrote reported ``watch-undone`` and copied to ``quarantine/`` (11 copies for a tool
  writing 11 files) (``test_close_waits_for_a_watch_in_another_thread``).  close() now
  waits (ACTION_BODY_WAIT_S, as for action bodies) for the file operations and watch()
  blocks other threads are inside, and refuses new ones from other threads (StoreClosed,
  nothing logged or changed: ``test_a_file_operation_begun_elsewhere_once_close_began_
  is_refused``).  ``test_close_rolls_back_its_own_transaction_once_another_threads_
  watch_ended`` guards the closing thread's own transaction whose watch another thread
  runs (passed before too: its rollback waits for the workspace's lock).
- Another thread's ``tx.rollback()`` racing ``close()``: the log closed between its ABORT
  and its undo, and the rollback returned normally with no file put back
  (``test_a_rollback_in_another_thread_racing_close_never_returns_with_files_left``).
- A watch() block close() stopped waiting for stored the changed files' contents in the
  closed store's blobs after close() returned
  (``test_a_watch_close_stopped_waiting_for_writes_nothing_into_the_closed_store``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import walstore

TOOL = ("import sys\n"
        "root, tag = sys.argv[1], sys.argv[2]\n"
        "open(root + '/a.txt', 'w').write('changed by ' + tag + '\\n')\n"
        "for i in range(5):\n"
        "    open(root + '/%s%d.txt' % (tag, i), 'w').write(tag)\n")


def _tool(root: str, tag: str) -> None:
    subprocess.run([sys.executable, "-c", TOOL, root, tag], check=True)


def _tree(root: str) -> dict:
    out = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def _wait_closing(store, closer: threading.Thread) -> None:
    while store._closing is None and closer.is_alive():
        time.sleep(0.001)


def _setup(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("orig\n")
    store = walstore.open(str(tmp_path / "s"), durability="full")
    return store, store.workspace(str(root)), str(root)


def test_close_waits_for_a_watch_in_another_thread(tmp_path):
    store, ws, root = _setup(tmp_path)
    before = _tree(root)
    in_watch, outcome, wrote = threading.Event(), [], []

    def agent() -> None:
        try:
            with store.transaction() as tx:
                with tx.files(ws).watch():
                    _tool(root, "x")
                    in_watch.set()
                    while store._closing is None:  # (the tool runs on once close began)
                        time.sleep(0.001)
                    _tool(root, "y")
                    # (its own write inside the block is part of what close() waits for)
                    tx.files(ws).write("inner.txt", "inner\n")
                    wrote.append(True)
            outcome.append("committed")
        except walstore.WalstoreError as e:
            outcome.append(type(e).__name__)

    worker = threading.Thread(target=agent)
    worker.start()
    assert in_watch.wait(30)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(30)
    worker.join(30)
    assert not closer.is_alive() and not worker.is_alive()
    assert wrote == [True]
    after_close = _tree(root)
    again = walstore.open(str(tmp_path / "s"))
    try:
        report = again.last_recovery
        # the block's end was logged: whatever the outcome, no guess as after a crash
        assert report.watch_saved == []
        assert [p.kind for p in report.problems] == []
        assert not os.path.exists(tmp_path / "s" / "quarantine" / "files")
        if outcome == ["committed"]:
            assert _tree(root) == after_close and b"changed by y\n" == after_close["a.txt"]
            assert after_close["inner.txt"] == b"inner\n"
        else:
            assert _tree(root) == before
    finally:
        again.close()


def test_close_rolls_back_its_own_transaction_once_another_threads_watch_ended(tmp_path):
    store, ws, root = _setup(tmp_path)
    before = _tree(root)
    tx = store.transaction()
    tx.put("k", "v")
    tx.files(ws).write("mine.txt", "by the closing thread\n")  # (its effects began here)
    in_watch, done = threading.Event(), threading.Event()

    def helper() -> None:
        with tx.files(ws).watch():
            _tool(root, "x")
            in_watch.set()
            while store._closing is None:
                time.sleep(0.001)
            _tool(root, "y")
        done.wait(30)  # (the thread outlives the close)

    worker = threading.Thread(target=helper)
    worker.start()
    assert in_watch.wait(30)
    try:
        store.close()
        # close() rolled its own transaction back: the tool's files are back now
        assert tx.state != "active"
        assert _tree(root) == before
    finally:
        done.set()
        worker.join(30)
    again = walstore.open(str(tmp_path / "s"))
    try:
        assert again.get("k") is None
        assert again.last_recovery.losers == [] and again.last_recovery.watch_saved == []
        assert _tree(root) == before
    finally:
        again.close()


@pytest.mark.parametrize("op", ["write", "watch"])
def test_a_file_operation_begun_elsewhere_once_close_began_is_refused(tmp_path, op):
    store, ws, root = _setup(tmp_path)
    before = _tree(root)
    in_watch, release, refused = threading.Event(), threading.Event(), []

    def holder() -> None:  # keeps close() waiting while the other thread tries
        try:
            with store.transaction() as tx:
                with tx.files(ws).watch():
                    in_watch.set()
                    release.wait(30)
        except walstore.WalstoreError:
            pass

    def late() -> None:
        tx = store.transaction()
        try:
            if op == "write":
                tx.files(ws).write("late.txt", "late\n")
            else:
                with tx.files(ws).watch():
                    _tool(root, "late")
            refused.append(None)
        except walstore.StoreClosed as e:
            refused.append(e)

    h = threading.Thread(target=holder)
    h.start()
    assert in_watch.wait(30)
    closer = threading.Thread(target=store.close)
    closer.start()
    _wait_closing(store, closer)
    t = threading.Thread(target=late)
    t.start()
    t.join(30)
    release.set()
    for th in (h, closer):
        th.join(30)
    assert isinstance(refused[0], walstore.StoreClosed), refused
    assert _tree(root) == before  # nothing of the late one was made
    again = walstore.open(str(tmp_path / "s"))
    try:
        assert again.last_recovery.watch_saved == [] and _tree(root) == before
    finally:
        again.close()


@pytest.mark.parametrize("delay", [0.0, 0.003])
def test_a_rollback_in_another_thread_racing_close_never_returns_with_files_left(tmp_path,
                                                                                 delay):
    """Another thread's ``tx.rollback()`` of a transaction that changed files, while the
    main thread closes the store: close() did not wait for it, the log closed between its
    ABORT and its undo, and the undo — finding the store unwritable — put no file back
    and returned normally: 'rolled back', every file still the rolled-back one's until
    the next open (60 of 60 files; 3 runs of 3 failed).  close() now waits for
    such a rollback (as for compensations, CLOSE_WAIT_S), and one that still finds the
    store closed raises StoreClosed saying its files go back at the next open."""
    root = tmp_path / "ws"
    root.mkdir()
    n = 60
    for i in range(n):
        (root / f"f{i}").write_text(f"orig{i}")
    path = str(tmp_path / "s")
    store = walstore.open(path, durability="full")
    ws = store.workspace(str(root))
    ready, outcome = threading.Event(), []

    def agent() -> None:
        tx = store.transaction()
        try:
            for i in range(n):
                tx.files(ws).write(f"f{i}", f"new{i}")
            ready.set()
            tx.rollback()
            outcome.append("rolled back")
        except walstore.StoreClosed as e:
            outcome.append(e)

    worker = threading.Thread(target=agent)
    worker.start()
    assert ready.wait(60)
    time.sleep(delay)
    store.close()
    worker.join(60)
    changed = [i for i in range(n) if (root / f"f{i}").read_text() != f"orig{i}"]
    if outcome == ["rolled back"]:  # said so: then its files are back now
        assert changed == []
    else:
        assert isinstance(outcome[0], walstore.StoreClosed), outcome
    again = walstore.open(path)
    try:
        assert [i for i in range(n) if (root / f"f{i}").read_text() != f"orig{i}"] == []
        assert again.last_recovery.problems == [] and again.last_recovery.file_conflicts == []
    finally:
        again.close()


def test_a_watch_close_stopped_waiting_for_writes_nothing_into_the_closed_store(
        tmp_path, monkeypatch):
    """A watch() block still running when close() stops waiting for it (an agent's long
    tool): its end took the snapshot anyway, storing the changed files' contents as
    blobs in the store directory after close() had returned and released the store (2
    files written there, with another process free to open it).  Now its end sees the
    store closed first and raises StoreClosed, writing nothing; the next open puts the
    block's changes back as after a crash."""
    import walstore.store as store_module
    monkeypatch.setattr(store_module, "ACTION_BODY_WAIT_S", 0.2)  # (the tool outlasts it)
    store, ws, root = _setup(tmp_path)
    before = _tree(root)
    in_watch, proceed, outcome = threading.Event(), threading.Event(), []

    def agent() -> None:
        try:
            with store.transaction() as tx:
                with tx.files(ws).watch():
                    in_watch.set()
                    proceed.wait(30)
                    _tool(root, "late")
            outcome.append("committed")
        except walstore.StoreClosed as e:
            outcome.append(e)

    worker = threading.Thread(target=agent)
    worker.start()
    assert in_watch.wait(30)
    with pytest.warns(RuntimeWarning, match="watch"):
        store.close()
    sdir = tmp_path / "s"
    files_then = {p for p in sdir.rglob("*") if p.is_file()}
    proceed.set()
    worker.join(30)
    assert isinstance(outcome[0], walstore.StoreClosed)
    assert {p for p in sdir.rglob("*") if p.is_file()} - files_then == set()
    again = walstore.open(str(sdir))
    try:
        assert _tree(root) == before
    finally:
        again.close()
