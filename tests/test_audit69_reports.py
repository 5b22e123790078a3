"""Audit 69: what compensations and operator verbs report.

An exception with no message said "Type: " (a Ctrl-C: "KeyboardInterrupt: "); the
compensated row of an action whose body raised dropped what it raised; a second
``retry_compensations()`` beside a first (or beside the rollback running them) listed the
compensation the first was running as owed; a failed file operation whose undo met more
than 5 changed paths named 5 and not how many more; a failed ``walstore backup`` named
its staging directory; ``walstore stats`` said the largest map any writer ever had, not
the writer's.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

import walstore
from tests.store_support import cli_env
from tools.faults import FaultBackend, installed
from walstore.cli import main
from walstore.errors import type_and_message


def _charge_that_raises(s, exc: BaseException) -> None:
    """One transaction whose action ``charge`` (compensator ``refund``) raises ``exc`` in
    its body: the transaction rolls back and the refund runs."""
    with pytest.raises(type(exc)):
        with s.transaction() as tx:
            with tx.action("charge", args={"amount": 40}, compensate="refund"):
                raise exc


# ---- 1. an exception with no message -------------------------------------------------------
def test_no_report_says_an_empty_message_as_type_colon():
    """The one helper: "Type: message", or the type alone (no trailing colon)."""
    assert type_and_message(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert type_and_message(RuntimeError("down")) == "RuntimeError: down"

    class Broken(Exception):
        def __str__(self):
            raise ValueError("no")
    assert type_and_message(Broken()) == "Broken: (its message could not be read)"


def test_no_report_says_an_action_interrupted_by_ctrl_c_as_keyboardinterrupt_colon(tmp_path):
    """A Ctrl-C in the charge's body, and a refund that keeps failing with a bare
    ``RuntimeError()``.  Before the fix CompensationFailed said "... failed after 3 tries:
    RuntimeError: ; ... because of KeyboardInterrupt: " and the row's error
    "RuntimeError: "; now the type alone."""
    def refund(action):
        raise RuntimeError()
    s = walstore.open(str(tmp_path / "s"), durability="none", compensators={"refund": refund})
    try:
        with pytest.raises(walstore.CompensationFailed) as got:
            with s.transaction() as tx:
                with tx.action("charge", compensate="refund"):
                    raise KeyboardInterrupt
        text = str(got.value)
        assert "because of KeyboardInterrupt" in text, text
        assert "KeyboardInterrupt: " not in text and "RuntimeError: " not in text, text
        (a,) = s.actions()
        assert (a.state, a.error) == ("failed", "RuntimeError")
    finally:
        s.close()
    r = CliRunner().invoke(main, ["actions", str(tmp_path / "s")])
    assert "RuntimeError" in r.stdout and "RuntimeError: " not in r.stdout, r.stdout


# ---- 2. the compensated row of an action whose body raised -------------------------------
def test_compensated_action_still_says_what_its_body_raised(tmp_path):
    """The body raised (the card was declined), the transaction rolled back, the refund ran.
    Before the fix the row read ``compensated`` with ``error`` None, in the API, in
    `walstore actions` and its --json: what the body raised was lost (the ABORT's
    "its transaction rolled back" replaced it, and the compensation's record cleared it).
    Now ``error`` says it again, after a reopen too; a refund that failed once first, or
    a Ctrl-C in the body, as well."""
    tries = []

    def refund(action):
        tries.append(action.id)
        if len(tries) == 1:
            raise OSError("the payment API timed out")
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", compensators={"refund": refund})
    try:
        _charge_that_raises(s, ValueError("card declined"))
        _charge_that_raises(s, KeyboardInterrupt())
        with s.transaction() as tx:  # (a plain rollback: nothing raised, nothing said)
            with tx.action("charge", compensate="refund"):
                pass
            tx.rollback()
        errors = {a.id: (a.state, a.error) for a in s.actions()}
    finally:
        s.close()
    want = {"1.1": ("compensated", "ValueError: card declined"),
            "2.1": ("compensated", "KeyboardInterrupt"), "3.1": ("compensated", None)}
    assert errors == want
    with walstore.open(path, readonly=True) as s:
        assert {a.id: (a.state, a.error) for a in s.actions()} == want
        assert s.get_action("1.1").error == "ValueError: card declined"
    r = CliRunner().invoke(main, ["actions", path, "--json"])
    docs = {d["id"]: d for d in json.loads(r.stdout)["actions"]}
    assert docs["1.1"]["error"] == "ValueError: card declined"
    r = CliRunner().invoke(main, ["actions", path])
    assert "ValueError: card declined" in r.stdout, r.stdout


CHARGE_THEN_KILLED = """
import os, signal, sys
import walstore
s = walstore.open(sys.argv[1], durability="full")
tx = s.transaction()
try:
    with tx.action("charge", compensate="refund"):
        raise ValueError("card declined")
except ValueError:
    pass
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_compensated_after_a_crash_still_says_what_its_body_raised(tmp_path):
    """The body raised and was caught inside the transaction, and the writer was killed
    (-9) before the transaction ended; the next open's recovery runs the refund.  Before
    the fix the row read ``compensated``, error None; now what the body raised."""
    path = str(tmp_path / "s")
    r = subprocess.run([sys.executable, "-c", CHARGE_THEN_KILLED, path], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    with walstore.open(path, compensators={"refund": lambda a: None}) as s:
        (a,) = s.actions()
        assert (a.state, a.error) == ("compensated", "ValueError: card declined")


# ---- 3. retry_compensations beside a compensation running --------------------------------
def _owed_refund(tmp_path, started: threading.Event, go: threading.Event):
    """A store with one refund owed (its compensator registered after open), whose run
    holds until ``go``."""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    _charge_that_raises(s, ValueError("declined"))  # (no compensator yet: owed)

    def refund(action):
        started.set()
        assert go.wait(10)
    with pytest.warns(RuntimeWarning):
        s.compensator("refund")(refund)
    (owed,) = s.pending_compensations()
    return s, owed


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # (said by the test)
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def _retry_while_held(s, started, go, first) -> dict:
    """``first`` run in a thread until a compensation it runs is held (``started``);
    meanwhile this thread's ``retry_compensations()`` lists nothing owed; then the held
    one goes on (``go``).  Returns what ``first`` returned or raised (``_in_thread``)."""
    a, out = _in_thread(first)
    assert started.wait(10)
    try:
        assert s.retry_compensations() == []
    finally:
        go.set()
        a.join(10)
    return out


def test_retry_compensations_does_not_list_one_another_thread_is_running_as_owed(tmp_path):
    """Thread A's ``retry_compensations()`` runs the refund (held on an Event); thread B's
    meanwhile.  Before the fix B returned the refund A was running as still owed; now it
    is left out (running is not owed: `walstore actions --pending` leaves out one a live
    writer runs), and A's returns nothing owed once it ran."""
    started, go = threading.Event(), threading.Event()
    s, owed = _owed_refund(tmp_path, started, go)
    try:
        out = _retry_while_held(s, started, go, s.retry_compensations)
        assert out == {"value": []}
        assert s.get_action(owed.id).state == "compensated"
    finally:
        go.set()
        s.close()


def test_retry_compensations_beside_the_rollback_running_them_lists_none_owed(tmp_path):
    """A rollback runs its refund (held on an Event); another thread's
    ``retry_compensations()`` meanwhile listed the refund as owed (its row reads pending
    from the ABORT on).  Now it is left out."""
    started, go = threading.Event(), threading.Event()

    def refund(action):
        started.set()
        assert go.wait(10)
    s = walstore.open(str(tmp_path / "s"), durability="none", compensators={"refund": refund})
    try:
        def rolled_back():
            _charge_that_raises(s, ValueError("declined"))
        out = _retry_while_held(s, started, go, rolled_back)
        assert "error" not in out, out
        assert [x.state for x in s.actions()] == ["compensated"]
    finally:
        go.set()
        s.close()


def test_retry_compensations_still_lists_one_that_failed_while_it_looked(tmp_path):
    """The refund thread A runs fails for good while thread B's retry waits: B's answer
    (read after A's outcome) lists it owed (``failed``), not left out as running."""
    started, go = threading.Event(), threading.Event()
    s = walstore.open(str(tmp_path / "s"), durability="none")
    _charge_that_raises(s, ValueError("declined"))

    def refund(action):
        started.set()
        assert go.wait(10)
        raise RuntimeError("down")
    with pytest.warns(RuntimeWarning):
        s.compensator("refund")(refund)
    try:
        a, out = _in_thread(s.retry_compensations)
        assert started.wait(10)
        go.set()
        a.join(10)
        assert [x.state for x in out["value"]] == ["failed"]
        assert [x.state for x in s.retry_compensations()] == ["failed"]
    finally:
        go.set()
        s.close()


# ---- 4. a failed file change whose undo met many changed paths -----------------------------
class StrangerAtRmdir(FaultBackend):
    """``rmtree`` of ``d`` removed its files; then another process writes each of them
    again, and removing ``d`` itself fails (EIO): the undo finds every file changed."""

    armed = 0

    def rmdir(self, path: str) -> None:
        path = os.fsdecode(path)
        if self.armed and path.endswith(os.sep + "d"):
            self.armed = 0
            for i in range(17):
                with open(os.path.join(path, f"f{i:02}.txt"), "w") as out:
                    out.write("stranger\n")
            raise OSError(errno.EIO, "injected", path)
        os.rmdir(path)


def test_a_refused_commit_says_how_many_paths_changed_behind_walstores_back(tmp_path):
    """17 paths changed behind walstore's back under a failed ``rmtree``: the commit is
    refused naming 5 of them.  Before the fix it did not say there were 12 more."""
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    for i in range(17):
        (root / "d" / f"f{i:02}.txt").write_text("mine\n")
    s = walstore.open(str(tmp_path / "s"), durability="none")
    try:
        ws = s.workspace(str(root))
        fb = StrangerAtRmdir()
        with installed(fb), pytest.raises(walstore.WalstoreError) as got:
            with s.transaction() as tx:
                fb.armed = 1
                with pytest.raises(OSError):
                    tx.files(ws).rmtree("d")
                tx.put("k", 1)
        text = str(got.value)
        assert "could not be put back" in text, text
        assert "and 12 more changed behind walstore's back" in text, text
    finally:
        s.close()


# ---- 5. a failed backup names DEST, not its staging directory -------------------------------
@pytest.mark.parametrize("op,pattern", [("open", "*incomplete-backup-*"),
                                        ("pwrite", "*incomplete-backup-*"),
                                        ("rename", "*STORE.tmp")])
def test_a_failed_backup_names_its_destination_not_the_staging_directory(tmp_path, op,
                                                                         pattern):
    """A full disk met by the copy: the error named DEST.incomplete-backup-<pid>-xxxx/...
    (a directory the user never asked for, removed by then), once more in the chained OS
    error.  Now one line naming DEST (the file under it) and what failed."""
    src, dest = str(tmp_path / "s"), str(tmp_path / "dest")
    with walstore.open(src, durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    fb = FaultBackend()
    fb.fail(op, error=errno.ENOSPC, path=pattern, times=None)
    with installed(fb):
        r = CliRunner().invoke(main, ["backup", src, dest])
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "incomplete-backup" not in line, line
    assert dest in line and "No space left on device" in line and "backup" in line, line
    assert not os.path.exists(dest)
    assert [n for n in os.listdir(tmp_path) if "incomplete" in n] == []


# ---- 6. walstore stats: the writer's map, not the largest one any writer had ---------------
def test_stats_of_a_store_says_its_writers_map_size(tmp_path):
    """The store was opened once with the default map (64 GiB); its writer now runs with
    8 MiB.  Before the fix `walstore stats` said 64 GiB: the size LMDB records in
    ``data.mdb`` only ever grows ("persist any increases"), so it is the largest map any
    writer committed with, not this writer's."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    w = walstore.open(path, durability="none", map_size=8 << 20)
    try:
        with w.transaction() as tx:
            tx.put("k", 1)
        w.checkpoint()
        mine = w.stats()["lmdb_map_size"]
        r = CliRunner().invoke(main, ["stats", path, "--json"])
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["lmdb_map_size"] == mine == 8 << 20
    finally:
        w.close()
