"""Test support: looking at a store from outside — which files of a directory hold some
bytes (an erasure's proof), one key of a copy read through a read-only open, and the
CLI run as a real process of this checkout (tests/test_purge.py,
test_replication_pitr.py, test_replication_follow_*.py), or as a process the store's mode
bits deny writes (the read-only opens); a commit recording its outcome
and a background thread run beside worker threads (the concurrency tests); a writer's
segment filled to its end, and a restore point held racing close() (the shared mark's
tests); a real
writer process killed -9 at the line it prints, and its store reopened shipping on (the
crash tests of a replica)."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys

import walstore


def files_with(root: str, needle: bytes) -> list[str]:
    """The files under ``root`` (relative paths) whose bytes contain ``needle``; a file
    removed while the walk runs is passed over."""
    out = []
    for d, _ds, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            try:
                with open(p, "rb") as f:
                    if needle in f.read():
                        out.append(os.path.relpath(p, root))
            except OSError:
                pass  # (removed meanwhile)
    return out


def get_readonly(dest: str, key: str):
    """``key`` of the store at ``dest`` read through a read-only open; None when it is
    absent or the store cannot be opened yet (a follower's first round)."""
    try:
        with walstore.open(dest, readonly=True) as c:
            return c.get(key)
    except walstore.WalstoreError:
        return None


CLI = "import sys\nfrom walstore.cli import main\nmain(sys.argv[1:])\n"


def ctrl_c_reaches_it() -> None:
    """``preexec_fn`` of a child a test will Ctrl-C: a test runner's worker (pytest-xdist's)
    may ignore SIGINT, a child inherits SIG_IGN, and Python then keeps ignoring it (no
    KeyboardInterrupt ever): the child gets the default disposition back."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env() -> dict:
    """The environment of a CLI process: this checkout's walstore first on its path."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(walstore.__file__)))
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    return env


# The capabilities by which root reads and writes whatever the mode bits say
_DAC_CAPS = "-dac_override,-dac_read_search"


def without_root_privilege() -> list[str]:
    """The command prefix that runs a program as a user to whom a store's mode bits apply:
    none when the tests run as another user than root; under root, root without the two
    capabilities by which it ignores mode bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH),
    still the owner of what the tests made, so the OWNER's bits apply (0444 files and 0555
    directories: readable, not writable).  Not another user such as nobody: a CI machine's
    interpreter and checkout may lie under /root (0700), where nobody cannot even start
    Python.  Skips the test where setpriv is missing or may not drop them."""
    import shutil
    if os.getuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        import pytest
        pytest.skip("running as root without setpriv: no process to whom the modes apply")
    pre = ["setpriv", f"--inh-caps={_DAC_CAPS}", f"--bounding-set={_DAC_CAPS}"]
    probe = subprocess.run(pre + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        import pytest
        pytest.skip(f"setpriv may not drop root's capabilities here: {probe.stderr.strip()}")
    return pre


def commit_recording_outcome(s, key, value, outcome: dict) -> None:
    """Commit ``key = value`` in its own transaction; ``outcome[key]`` is "ok" or the
    exception it raised (a thread's target in the group-commit tests)."""
    try:
        with s.transaction() as tx:
            tx.put(key, value)
        outcome[key] = "ok"
    except BaseException as e:  # noqa: BLE001 - the test sorts them out
        outcome[key] = e


def fill_to_the_segment_end(w, room: int = 8 << 10) -> None:
    """Commit 2 KB values into writer ``w`` until its WAL segment has less than ``room``
    bytes left (the next bigger commit rotates)."""
    wal = w._engine.wal
    i = 0
    while wal.writer.room() > room:
        with w.transaction() as tx:
            tx.put(f"fill{i}", "v" * 2000)
        i += 1


def writer_and_reader(path: str, durability: str):
    """A writer at ``path`` (one commit: ``k`` = 1) and a read-only store opened beside
    it that read that commit and lists no restore point: (writer, reader); the caller
    closes both."""
    import walstore

    w = walstore.open(path, durability=durability)
    with w.transaction() as tx:
        tx.put("k", 1)
    r = walstore.open(path, readonly=True)
    assert r.get("k") == 1 and r.restore_points() == {}
    return w, r


def restore_point_racing_close(w, name: str = "p"):
    """A thread making restore point ``name`` in writer ``w``, held past its writable
    check, before its append (``log_event`` waits for room there, always), as a thread
    that began before another one's close() is.  Returns (thread, go, told) once it is
    held: ``go.set()`` lets it on; ``told`` gets "made" or the error's type name."""
    import threading

    eng = w._engine
    held, go = threading.Event(), threading.Event()
    room = eng.wait_for_room

    def paused():
        held.set()
        assert go.wait(5)
        room()

    eng.wait_for_room = paused
    told: list = []

    def make_point():
        try:
            w.restore_point(name)
            told.append("made")
        except walstore.WalstoreError as e:
            told.append(type(e).__name__)

    t = threading.Thread(target=make_point)
    t.start()
    assert held.wait(5)
    return t, go, told


def run_beside(workers: list, background, stop) -> None:
    """Start the ``background`` thread, then the ``workers``; once every worker has
    finished, set ``stop`` (the event the background thread's loop watches) and join it."""
    background.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    background.join()


def kill_at_saved_snapshot(script: str, *args: str) -> None:
    """Run ``script`` (python -c, this checkout on PYTHONPATH) with ``args`` until it prints
    "SNAPSHOT SAVED", then kill it -9 (a real writer dying at that point) and reap it."""
    p = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        line = p.stdout.readline()
        assert line.startswith("SNAPSHOT SAVED"), line + p.stderr.read()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


@contextlib.contextmanager
def shipping_on_after_the_kill(path: str, url: str):
    """The killed writer's store at ``path`` reopened shipping to ``url`` (taking the
    replica over), one commit more ("after the kill") synced to it without an error."""
    with walstore.open(path, replicate_to=url, replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("after the kill", 1)
        s.sync_replica(30)
        assert s.replication().last_error is None, s.replication().last_error
        yield s


def current_frame_of(ident: int):
    """Thread ``ident``'s current frame (None: no such thread), read with the garbage
    collector held off: CPython 3.11's ``sys._current_frames()`` holds the runtime's lock
    of thread states while it builds its dict, and a collection that allocation starts
    finalizes objects that take that lock again -- the process deadlocked (CPython
    gh-106883, fixed in 3.12).  (Tests only: walstore itself never reads another
    thread's frames.)"""
    enabled = gc.isenabled()
    try:
        gc.disable()
        return sys._current_frames().get(ident)
    finally:
        if enabled:
            gc.enable()
