"""Shared fixtures: a store path in the test's temp dir, and a scratch store on it.

(A test module may define its own ``path`` / ``store``; pytest prefers the module's.)
"""
from __future__ import annotations

import os

import pytest

import walstore


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def store(path):
    s = walstore.open(path, durability="none")
    yield s
    s.close()


def pytest_configure(config):
    """Compile walstore (and these tests' helpers) to bytecode once, in the controlling
    process, before any test starts.  Hundreds of tests start a real child process (a
    writer to kill -9, the CLI) that imports walstore from this checkout; where bytecode
    is not written on import (PYTHONDONTWRITEBYTECODE=1, as on CI's machines) every one
    of them compiled the whole package again from source: 0.5-0.8 s of CPU per child
    instead of 0.2 s — minutes of the suite's run.  Nothing is compiled where the files
    cannot be written (a read-only checkout): the children compile as before."""
    if hasattr(config, "workerinput"):  # (a pytest-xdist worker: the controller did it)
        return
    if hasattr(config.option, "loadscopereorder"):  # (files in _slowest_first's order)
        config.option.loadscopereorder = False
    import compileall
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.dirname(os.path.abspath(walstore.__file__)), here):
        try:
            compileall.compile_dir(folder, quiet=2, workers=1)
        except OSError:
            pass
    seconds = whole_run_seconds()
    if config.getoption("numprocesses", None) and seconds:
        # the controller runs no test: the hook below never arms its watchdog here
        import faulthandler
        import sys
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)


def whole_run_seconds() -> int:
    """The controller of a pytest-xdist run (``-n``) still running after this many seconds
    prints its threads' stacks and ends (exit status 1): at stop 72 a worker lost to a
    segmentation fault left the controller waiting for ever with every worker idle, which
    on CI holds the run until CI's own limit (90 minutes) and prints nothing.  The suite
    runs in 8-15 minutes: 2700; not with WALSTORE_SLOW=1 (the whole sweeps: 0, never);
    WALSTORE_RUN_SECONDS sets it (0: never; unset or empty: 2700).  (WALSTORE_SLOW=0 left
    it unarmed too, and an empty WALSTORE_RUN_SECONDS ended the session at this file's
    import, a ValueError's traceback.)"""
    if os.environ.get("WALSTORE_SLOW") == "1":
        return 0
    raw = os.environ.get("WALSTORE_RUN_SECONDS", "").strip() or "2700"
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < 10 ** 7:
        raise pytest.UsageError(f"WALSTORE_RUN_SECONDS={raw!r}: give the seconds a whole "
                                f"-n run may take (0: no limit)")
    return int(seconds)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (the longest interrupt sweeps) run only with WALSTORE_SLOW=1:
    CI stays within its budget; docs/GUIDE.md ("Interrupts") says how to run them.
    The files are put in the order of ``slow_files.txt`` (see ``_slowest_first``)."""
    _slowest_first(config, items)
    if os.environ.get("WALSTORE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long: run with WALSTORE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _slowest_first(config, items) -> None:
    """Order the collected tests file by file, the slowest files first (``slow_files.txt``,
    measured), the rest by their number of tests; within a file, as collected.  With
    ``--dist loadfile`` pytest-xdist hands out files in this order (its own reordering, by
    test count, is turned off in ``pytest_configure``): by test count, the few-test files
    that take a minute ran last, one worker busy with them while the others idled.  Every
    worker sorts alike (xdist checks that their collections match)."""
    listed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_files.txt")
    rank: dict[str, int] = {}
    try:
        with open(listed) as f:
            for line in f:
                fields = line.split()
                if fields and not fields[0].startswith("#") and len(fields) == 2:
                    rank.setdefault(os.path.basename(fields[1]), len(rank))
    except OSError:
        return
    counts: dict[str, int] = {}
    for item in items:
        name = item.nodeid.split("::", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    first_seen = {name: i for i, name in enumerate(counts)}

    def key(pair):
        i, item = pair
        name = item.nodeid.split("::", 1)[0]
        base = os.path.basename(name)
        if base in rank:
            return (0, rank[base], 0, first_seen[name], i)
        return (1, 0, -counts[name], first_seen[name], i)

    items[:] = [item for _i, item in sorted(enumerate(items), key=key)]


@pytest.fixture
def passed(monkeypatch):
    """Events passed over by ``MemTable.events_of`` (each call passes over them all):
    the scaling tests count a lookup's cost in these, never in seconds."""
    from walstore.engine.memtable import MemTable
    n = [0]
    real = MemTable.events_of

    def counted(self, types, upto=None):
        n[0] += len(self.events)
        return real(self, types, upto)
    monkeypatch.setattr(MemTable, "events_of", counted)
    return n


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(size)``: a tmpfs of ``size`` ("8m", "16m") mounted under the test's
    directory (0700), unmounted after the test; the test is skipped where mounting is not
    permitted (a real full disk and a real read-only file system, for fault tests)."""
    import subprocess
    mounted = []

    def mount(size: str):
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                                "tmpfs", str(mnt)], capture_output=True, text=True,
                               timeout=30)
        except (FileNotFoundError, PermissionError) as e:
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt
    yield mount
    for mnt in mounted:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# a test still running after this many seconds ends its process (see the hook below)
HUNG_TEST_SECONDS = 360


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The last resort against a hung test: faulthandler's watchdog, a C thread that needs
    no GIL, prints every thread's stack and ends the worker's process once a test has run
    HUNG_TEST_SECONDS (pytest-xdist then reports that test failed and goes on with a new
    worker).  pytest-timeout (300 s) runs Python code in a thread of its own, which a
    process deadlocked while holding the GIL never runs: at stop 68 and 69 a worker asleep
    in such a deadlock (CPython gh-106883 under sys._current_frames()) held CI until its
    90 minutes ran out, printing nothing."""
    import faulthandler
    import sys
    faulthandler.dump_traceback_later(HUNG_TEST_SECONDS, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
