"""Audit 67: every durable non-commit record (``Engine.log_event(..., durable=True)``) whose
wait for the disk goes wrong — its fdatasync fails (EIO, ENOSPC: ``walstore.fileio``'s
seam, ``tools.faults.FaultBackend``) or a Ctrl-C lands in it — then the store reopened,
with the record kept (the page cache) or lost (its bytes zeroed: a power loss).

Checked for each: what the caller was told against what the reopened store holds (told
"failed": not found done, unless the error said "unknown"), the outside world against the
state (an action's body, a payment ledger — ``tests/agent_scripts/ws_ledger.py`` — and a
workspace's files), the store read-only after the failure with a walstore error, never a
raw OSError.  The sites: the action intent (its body never runs; its compensation, owed,
runs once at the reopen, a no-op refund), the ABORT and the COMPENSATED record of a
rollback (the refund made once, one COMPENSATED record), the 2PC decisions (already
CommitOutcomeUnknown, ``test_audit67_integrations`` / ``test_audit58_twophase``), the
restore point (fixed in 57fb02e), and the reversible files' records below.

Findings (each fixed, its test below):

- walstore/agent/files.py ``_watch``: a Ctrl-C in the wait for the WATCH_BEGIN record's
  fsync (a real SIGINT, held off by ``walstore.signals`` to the sync's end) raised before
  the open watch joined the transaction: the rollback did not know it, its record stayed
  owed, and the next open — even after a clean close — put the workspace back to the tree
  as the block began, a later COMMITTED file change included (the intent's twin was
  fixed with ``log_event(appended=...)``; now so is the watch's);
- the same record's failed fsync: the transaction's error was the log's plain LogFailed,
  nothing said that the reopen would put back every change made in the workspace since
  (a user's edit made after the error, by hand, was undone by the reopen); now the open
  watch is the transaction's, and its rollback says so, naming the workspace;
- ``Files.workspace``: a registration whose WORKSPACE record's fsync failed raised the
  plain LogFailed, and the reopen found the workspace registered: CommitOutcomeUnknown;
- ``AgentHooks._undo``: a rollback whose files were put back, and the fsync of the
  FILE_RESTORED record saying so failed, raised the plain LogFailed ("the unsynced
  commits are unknown"), the caller's own exception replaced by words about commits:
  now it says the files were put back and what the next open does;
- ``Files.log_steps`` (a file operation, a revert's files): the FILE_STEPS record's twin of
  the watch's: a Ctrl-C in its wait left steps the transaction did not know, owed, and
  the next open put back their before-images over what it found (a file deleted by hand
  after the interrupted, never made, delete came back); and the WATCH_END's: a Ctrl-C in
  its wait left the open watch the transaction's effect and its changes' steps in none,
  undone again by the next open (a file the block had made, made again by hand, deleted);
- ``walstore.open`` (engine and store): the open's own records (the losers' ABORTs) whose
  fsync failed came out as the log's LogFailed, "the store is now read-only ... (reopen
  the store)", a ReadOnlyError without errno from an open that returned no store: now a
  StoreIOError with its errno, as a close's.
"""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

import walstore
from tests.test_compensation_crash import compensated_records
from tools.faults import FaultBackend, installed
import ws_ledger  # noqa: E402  (tests/agent_scripts, put on the path by the import above)
import ws_ledger_handlers  # noqa: E402

OPTS = dict(durability="full", apply_interval=3600.0,
            compensators=ws_ledger_handlers.COMPENSATORS)


def lose_unsynced(fb: FaultBackend) -> int:
    """Zero the WAL bytes written after the last fsync of their file that succeeded (a
    power loss after the failed one; ``fb`` recorded); returns how many writes were lost."""
    synced: dict[str, int] = {}
    for ev in fb.syncs():
        if ev.done_seq is not None and ev.path:
            synced[ev.path] = max(synced.get(ev.path, 0), ev.seq)
    lost = [w for w in fb.writes("*.wal") if w.seq > synced.get(w.path, 0)]
    for w in lost:
        fd = os.open(w.path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\0" * len(w.data), w.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    return len(lost)


def reopen_after(s, fb: FaultBackend, lose: bool):
    """The store dropped as a crash leaves it (``lose``: its unsynced WAL bytes gone too)
    and opened again."""
    path = s.path
    s._drop_like_a_crash()
    if lose:
        assert lose_unsynced(fb) >= 1
    return walstore.open(path, **OPTS)


def assert_read_only(s) -> None:
    with pytest.raises(walstore.ReadOnlyError, match="reopen"):
        with s.transaction() as tx:
            tx.put("after", 1)


@pytest.fixture
def ledger(tmp_path):
    return {"ledger": str(tmp_path / "ledger.jsonl"), "calls": str(tmp_path / "calls.jsonl"),
            "amount": 5}


def charge(tx, args, ran: list):
    with tx.action("charge", args=args, compensate="refund") as act:
        ran.append(act.key)
        act.result = ws_ledger.charge(args["ledger"], act.key, args["amount"])
    return act


def calls_of(args) -> list:
    return ws_ledger.records(args["calls"])


# ---- actions: the intent, the ABORT, the COMPENSATED record -----------------------------------
@pytest.mark.parametrize("lose", [False, True], ids=["kept", "lost"])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_action_whose_intent_fsync_failed_never_runs_and_is_settled_once(tmp_path, ledger,
                                                                        lose, err):
    """The intent's fsync fails: the body must not run (write-ahead), the caller is told
    the compensation is owed to the reopen, and the reopen settles it once (a refund of a
    charge never made changes nothing), whether the intent reached the disk or not."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    fb = FaultBackend(record=True)
    ran: list = []
    with installed(fb), pytest.raises(walstore.ReadOnlyError, match="when the store is reopened"):
        with s.transaction() as tx:
            tx.put("k", 1)
            fb.fail("fdatasync", err, path="*.wal")
            charge(tx, ledger, ran)
    assert ran == [] and ws_ledger.records(ledger["ledger"]) == []
    assert_read_only(s)
    s = reopen_after(s, fb, lose)
    try:
        assert s.get("k") is None
        assert s.pending_compensations() == []
        assert [a.state for a in s.actions()] in ([], ["compensated"])
        assert len(calls_of(ledger)) <= 1
    finally:
        s.close()
    with walstore.open(s.path, **OPTS) as s2:  # (a second open runs nothing)
        assert s2.pending_compensations() == []
    assert ws_ledger.records(ledger["ledger"]) == []
    assert len(calls_of(ledger)) <= 1


@pytest.mark.parametrize("lose", [False, True], ids=["kept", "lost"])
@pytest.mark.parametrize("record", ["ABORT", "COMPENSATED"])
def test_rollback_whose_record_fsync_failed_refunds_once_and_records_once(tmp_path, ledger,
                                                                         lose, record):
    """A rollback after a charge: the ABORT's fsync fails (no compensation may run now: the
    reopen runs it) or the COMPENSATED record's (the refund ran: "whether its outcome was
    recorded is unknown").  After the reopen: refunded exactly once on the ledger, one
    COMPENSATED record, the action compensated, nothing owed, the key never committed."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    fb = FaultBackend(record=True)
    ran: list = []
    expected = (walstore.ReadOnlyError if record == "ABORT" else walstore.CompensationFailed)
    with installed(fb), pytest.raises(expected, match="reopened|next open"):
        with s.transaction() as tx:
            tx.put("k", 1)
            charge(tx, ledger, ran)
            fb.fail("fdatasync", errno.EIO, path="*.wal", nth=1 if record == "ABORT" else 2)
            raise ValueError("the agent gave up")
    refunds_now = ws_ledger.count(ledger["ledger"], "refund", ran[0])
    assert refunds_now == (0 if record == "ABORT" else 1)
    assert_read_only(s)
    s = reopen_after(s, fb, lose)
    try:
        assert s.get("k") is None
        assert [a.state for a in s.actions()] == ["compensated"]
        assert s.pending_compensations() == []
    finally:
        s.close()
    assert ws_ledger.count(ledger["ledger"], "refund", ran[0]) == 1
    assert ws_ledger.balance(ledger["ledger"]) == 0
    assert compensated_records(s.path) == {f"{tx.id}.1": 1}
    # the compensator ran at most once more, and only when its record was lost
    assert len(calls_of(ledger)) == (1 if record == "ABORT" or not lose else 2)


# ---- files: the workspace's registration --------------------------------------------------------
@pytest.mark.parametrize("lose", [False, True], ids=["kept", "lost"])
def test_workspace_whose_registration_fsync_failed_is_an_unknown_outcome(tmp_path, lose):
    """``store.workspace(root)`` whose WORKSPACE record's fsync fails.  Before the fix:
    the log's plain LogFailed, and the reopen found the workspace registered, by a caller
    told it failed.  Now CommitOutcomeUnknown naming the workspace; the reopen decides."""
    root = tmp_path / "ws"
    root.mkdir()
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    fb = FaultBackend(record=True)
    fb.fail("fdatasync", errno.EIO, path="*.wal")
    with installed(fb), pytest.raises(walstore.CommitOutcomeUnknown,
                                      match="registration of workspace") as raised:
        s.workspace(str(root))
    assert "unknown until the store is reopened" in str(raised.value)
    assert_read_only(s)
    s = reopen_after(s, fb, lose)
    with s:
        found = [w.root for w in s.workspaces()]
    assert found == ([] if lose else [str(root)])


# ---- files: a watch() whose begin's record is not known durable --------------------------------
class CtrlCAfterWalSync(FaultBackend):
    """A real SIGINT sent right after the WAL's ``armed``-th fdatasync from now: walstore
    holds it off (``walstore.signals``) to the end of the sync's section, as a Ctrl-C
    typed while the process waits for the disk."""

    armed = 0

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        if self.armed and (self.path_of(fd) or "").endswith(".wal"):
            self.armed -= 1
            if not self.armed:
                os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this process (a test runner's worker may
    ignore it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def workspace_with(tmp_path: Path, s) -> tuple[Path, walstore.Workspace]:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("old\n")
    return root, s.workspace(str(root))


def test_watch_interrupted_in_its_begin_fsync_never_puts_back_a_later_commit(tmp_path, ctrl_c):
    """A Ctrl-C while ``f.watch()`` waits for its WATCH_BEGIN record's fsync.  Before the
    fix the interrupt came out before the open watch joined the transaction: the rollback
    did not know it, its record stayed owed, and the next open — after a clean close —
    put the workspace back to the tree as the block began: a later transaction's COMMITTED
    write of a.txt was gone from the disk (the store saying it was committed)."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSync()
    block_ran = []
    with installed(fb), pytest.raises(KeyboardInterrupt):
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.armed = 1
            with f.watch():
                block_ran.append(True)
                (root / "a.txt").write_text("watched\n")
    assert block_ran == [] and (root / "a.txt").read_text() == "old\n"
    with s.transaction() as tx:
        tx.files(ws).write("a.txt", "committed later\n")
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert (root / "a.txt").read_text() == "committed later\n"
        assert s.last_recovery is None or not s.last_recovery.watch_saved
        with s.transaction() as tx:  # (no watch left owed: the workspace is free)
            with tx.files(ws).watch():
                (root / "b.txt").write_text("b\n")
    assert (root / "b.txt").read_text() == "b\n"


def test_watch_interrupted_in_its_end_fsync_is_undone_once(tmp_path, ctrl_c):
    """A Ctrl-C while a watch() block's end waits for its WATCH_END record's fsync: the
    transaction rolls back and puts the tree back.  Before the fix the open watch was still
    the transaction's effect, its changes' FILE_STEPS in none: the rollback recorded the
    begin only, the steps stayed owed, and the next open — after a clean close — undid
    them again over what it found: new.txt, made again by hand as the block had made it
    (outside any transaction), was deleted."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSync()
    with installed(fb), pytest.raises(KeyboardInterrupt):
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.armed = 2  # (1: WATCH_BEGIN's, 2: WATCH_END's)
            with f.watch():
                (root / "a.txt").write_text("watched\n")
                (root / "new.txt").write_text("made\n")
    assert_watch_undone_once(s, root)


def assert_watch_undone_once(s, root, opts: dict = OPTS) -> None:
    """After a rolled-back watch that wrote a.txt and made new.txt: the tree is put back;
    new.txt, made again by hand (outside walstore), is still there after a clean close
    and reopen (``opts``), a.txt "old", and the reopen reports no file conflict."""
    assert (root / "a.txt").read_text() == "old\n" and not (root / "new.txt").exists()
    (root / "new.txt").write_text("made\n")  # by hand, outside walstore
    s.close()
    with walstore.open(s.path, **opts) as s:
        assert (root / "new.txt").read_text() == "made\n"
        assert (root / "a.txt").read_text() == "old\n"
        report = s.last_recovery
        assert report is None or not report.file_conflicts, report.file_conflicts


def test_file_change_interrupted_in_its_steps_fsync_is_not_done_by_the_next_open(tmp_path,
                                                                                 ctrl_c):
    """A Ctrl-C while ``f.delete("a.txt")`` waits for its FILE_STEPS record's fsync: the
    delete is never made, the transaction rolls back.  Before the fix the steps were in
    the log but in no effect of the transaction: owed, never settled by the rollback, and
    the next open — after a clean close — put back their before-image: a.txt, deleted by
    hand since (outside any transaction), was there again, and no conflict was reported."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = CtrlCAfterWalSync()
    with installed(fb), pytest.raises(KeyboardInterrupt):
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.armed = 1
            f.delete("a.txt")
    assert (root / "a.txt").read_text() == "old\n"  # (never deleted: write-ahead)
    (root / "a.txt").unlink()  # by hand, outside walstore
    with s.transaction() as tx:
        tx.put("k", 1)
    s.close()
    with walstore.open(s.path, **OPTS) as s:
        assert not (root / "a.txt").exists()
        assert s.get("k") == 1


@pytest.mark.parametrize("lose", [False, True], ids=["kept", "lost"])
def test_watch_whose_begin_fsync_failed_says_the_reopen_puts_the_workspace_back(tmp_path, lose):
    """``f.watch()`` whose WATCH_BEGIN record's fsync fails: the block never runs.  Before
    the fix the transaction raised the log's plain LogFailed ("the unsynced commits are
    unknown"), nothing said that the reopen, finding the watch begun and never ended,
    puts back every change made in the workspace since — as the reopen did to an edit
    made by hand after the error.  Now the rollback names the workspace and says so; the
    reopen keeps the version it found aside (and, with the record lost, changes nothing)."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = FaultBackend(record=True)
    block_ran = []
    with installed(fb), pytest.raises(walstore.ReadOnlyError) as raised:
        with s.transaction() as tx:
            f = tx.files(ws)
            fb.fail("fdatasync", errno.EIO, path="*.wal")
            with f.watch():
                block_ran.append(True)
    assert block_ran == []
    said = str(raised.value)
    assert f"a watch() of {str(root)!r}" in said and "put back" in said, said
    assert "reopened" in said and "quarantine" in said, said
    assert_read_only(s)
    (root / "a.txt").write_text("edited after the error\n")  # (the user did not listen)
    s = reopen_after(s, fb, lose)
    with s:
        if lose:
            assert (root / "a.txt").read_text() == "edited after the error\n"
        else:  # put back, as said, the version found kept aside
            assert (root / "a.txt").read_text() == "old\n"
            saved = s.last_recovery.watch_saved
            assert [Path(x["saved_as"]).read_text() for x in saved] == [
                "edited after the error\n"]


# ---- files: a rollback's record of the files put back ------------------------------------------
@pytest.mark.parametrize("lose", [False, True], ids=["kept", "lost"])
def test_rollback_whose_files_record_fsync_failed_says_the_files_are_back(tmp_path, lose):
    """A rollback put a.txt back, then the fsync of its FILE_RESTORED record failed.
    Before the fix: the log's plain LogFailed, "the unsynced commits are unknown until
    recovery", the caller's own exception replaced by words about commits and nothing
    about its files.  Now it says they were put back; the reopen finds a.txt as the
    rollback left it, the record kept or lost, with no conflict."""
    s = walstore.open(str(tmp_path / "s"), **OPTS)
    root, ws = workspace_with(tmp_path, s)
    fb = FaultBackend(record=True)
    with installed(fb), pytest.raises(walstore.ReadOnlyError) as raised:
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "new\n")
            fb.fail("fdatasync", errno.EIO, path="*.wal", nth=2)  # (1: the ABORT's)
            raise ValueError("the agent gave up")
    said = str(raised.value)
    assert "file change(s) were put back" in said and "unsynced commits" not in said, said
    chain, e = [], raised.value
    while e is not None:
        chain.append(type(e))
        e = e.__cause__ or e.__context__
    assert ValueError in chain  # (the caller's own error is kept in the chain)
    assert (root / "a.txt").read_text() == "old\n"
    assert_read_only(s)
    s = reopen_after(s, fb, lose)
    with s:
        assert (root / "a.txt").read_text() == "old\n"
        report = s.last_recovery
        assert report is None or not (report.file_conflicts or report.watch_saved), report


# ---- the open's own records: the losers' ABORTs, the settle's -----------------------------------
def test_open_whose_recovery_records_fail_to_sync_is_a_store_io_error_and_settles_once(tmp_path):
    """A crash leaves a transaction with two charges in flight; the next open fails the
    WAL's Nth fdatasync (N = 1, 2, ...: the segment's, the losers' ABORTs', the settle's
    COMPENSATED records').  Before the fix the ABORTs' failed fsync came out of
    ``walstore.open`` as the log's LogFailed, "the store is now read-only ... (reopen the
    store)": a ReadOnlyError, no errno, from an open that returned no store.  Now a
    StoreIOError with its errno, as a close's; and whatever the N, the open after it
    refunds each charge exactly once, nothing left owed."""
    seen = set()
    for nth in range(1, 7):
        d = tmp_path / f"n{nth}"
        d.mkdir()
        args = {"ledger": str(d / "ledger.jsonl"), "calls": str(d / "calls.jsonl"),
                "amount": 5}
        s = walstore.open(str(d / "s"), **OPTS)
        tx = s.transaction().__enter__()
        keys: list = []
        charge(tx, args, keys)
        charge(tx, dict(args, amount=7), keys)
        s._drop_like_a_crash()
        fb = FaultBackend()
        rule = fb.fail("fdatasync", errno.EIO, path="*.wal", nth=nth)
        try:
            with installed(fb):
                walstore.open(s.path, **OPTS).close()
        except walstore.CompensationFailed as e:  # (a COMPENSATED record's: it says so)
            assert "whether the outcome of compensation(s)" in str(e)
            seen.add("compensation")
        except walstore.StoreIOError as e:
            assert e.errno == errno.EIO and "opening the store at" in str(e), str(e)
            assert not isinstance(e, walstore.ReadOnlyError)
            seen.add("open")
        assert rule.fired == 1, nth
        with walstore.open(s.path, **OPTS) as s:
            assert s.pending_compensations() == []
            assert sorted(a.state for a in s.actions()) == ["compensated"] * 2
        for key in keys:
            assert ws_ledger.count(args["ledger"], "refund", key) == 1, (nth, key)
        assert ws_ledger.balance(args["ledger"]) == 0
    assert seen == {"open", "compensation"}
