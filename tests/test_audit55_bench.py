"""Audit 55, the benchmark harness: every throughput counts what the system defers to its
close, the children and files a run makes do not outlive it.  Shape and accounting only:
no timing assertions."""
import pytest

from walstore.benchmark.spec import Context


def _lg_ctx(tmp_path, system):
    return Context(system, tmp_path, budget=1.0, value_bytes=0)


@pytest.mark.parametrize("system", ["walstore-saver", "sqlite-saver"])
def test_langgraph_invoke_rows_count_the_savers_close(tmp_path, system) -> None:
    """The LangGraph rows are isolated (the body opens its saver), so the harness never
    timed their close: WalstoreSaver's deferred apply at close was left out of invokes/s
    while every other row counts it.  The body now times the close into the row."""
    pytest.importorskip("langgraph.checkpoint.sqlite")
    from walstore.benchmark.graphs import invoke_sync
    out = invoke_sync(_lg_ctx(tmp_path, system), threads=2, turns=2, state_reads=2)
    sample = out["lg-sync"]
    assert "close_ms" in sample.extra, sample.extra
    assert sample.seconds >= sample.extra["timed_s"] + sample.extra["close_ms"] / 1000 - 1e-3


@pytest.mark.parametrize("system", ["walstore-saver-async", "async-sqlite-saver"])
def test_langgraph_ainvoke_rows_count_the_savers_close(tmp_path, system) -> None:
    pytest.importorskip("aiosqlite")
    from walstore.benchmark.graphs import invoke_async
    out = invoke_async(_lg_ctx(tmp_path, system), threads=2, turns=2, concurrency=2,
                       state_reads=2)
    sample = out["lg-async"]
    assert "close_ms" in sample.extra, sample.extra
    assert sample.seconds >= sample.extra["timed_s"] + sample.extra["close_ms"] / 1000 - 1e-3


def test_the_steady_rows_rate_counts_the_stores_close(tmp_path) -> None:
    """The steady run's commits/s left out the child's store.close() (durability
    "normal": the apply of the deferred backlog and the last sync happen there)."""
    from walstore.benchmark.longrun import steady_state
    sample = steady_state(Context("walstore-normal", tmp_path, 1.0, 100), commits=400,
                          budget=30.0)
    assert "close_ms" in sample.extra, sample.extra
    assert sample.seconds >= sample.extra["timed_s"] + sample.extra["close_ms"] / 1000 - 1e-3


def _children_running(marker: str) -> list[int]:
    import os
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and b"child_main" in cmd and state != b"Z":
            found.append(int(pid))
    return found


def test_an_interrupted_run_leaves_no_child_running(tmp_path) -> None:
    """Ctrl-C (a KeyboardInterrupt in the parent) while a benchmark child runs left the
    child alive: the build-wal child sleeps an hour waiting to be killed, and run_child's
    cleanup only cancelled the timer that would have killed it."""
    import os
    import signal
    import threading

    from walstore.benchmark.longrun import run_child
    marker = str(tmp_path / "store-interrupt")
    main = threading.get_ident()
    stop = threading.Event()

    def interrupt_once_started() -> None:
        while not stop.is_set():
            # the child has started its work (it made the store) and the parent waits
            if os.path.isdir(marker) and _children_running(marker):
                signal.pthread_kill(main, signal.SIGINT)
                return
            stop.wait(0.01)

    watcher = threading.Thread(target=interrupt_once_started)
    # a test runner's worker (pytest-xdist's) may ignore SIGINT: the signal would never
    # become the KeyboardInterrupt under test, and the wait would last the child's hour
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            # not crash_after_report: the parent waits on a child that never exits
            run_child(["build-wal", marker, 1 << 30, 3600], timeout=3600)
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    left = _children_running(marker)
    for pid in left:                  # (do not leave it behind even when the test fails)
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_the_preallocated_logs_are_private_files(tmp_path) -> None:
    """The bare loop's and the Python floor's files were created 0644 (the codebase's rule:
    files 0600): the benchmark's own files follow it too."""
    import os

    from walstore.benchmark.peers import BarePeer, PythonFloorPeer
    for peer, name in ((BarePeer(tmp_path, 100), "bare.log"),
                       (PythonFloorPeer(tmp_path, 100), "floor.log")):
        peer.close()
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600, name


def test_a_missing_run_directory_is_refused_before_anything_runs(tmp_path) -> None:
    """bench/run.py --dir with a typo ran every workload, each system failing its mkdtemp
    ("error: FileNotFoundError" in every row), exited 0 and wrote the all-error result
    files over the previous ones.  The directory is checked first: a usage error (exit
    2), no result file written."""
    import subprocess
    import sys
    from pathlib import Path

    from walstore.benchmark import run_benchmarks
    missing = str(tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="no-such-dir"):
        run_benchmarks(quick=True, workloads=["put-1t"], repeats=1,
                       progress=lambda m: None, scale=0.001, directory=missing)
    out = tmp_path / "out"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "bench" / "run.py"), "--quick",
                           "--workloads", "put-1t", "--repeats", "1", "--dir", missing,
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("how", ["cli", "script"])
def test_ctrl_c_during_a_run_prints_no_traceback_and_leaves_no_directory(tmp_path, how):
    """Ctrl-C in the middle of a measurement: one line, no traceback, a non-zero exit,
    and the run's fresh directories removed."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    runs = tmp_path / "runs"
    runs.mkdir()
    env = dict(os.environ, TMPDIR=str(runs),
               PYTHONPATH=os.pathsep.join(p for p in (str(root),
                                                      os.environ.get("PYTHONPATH")) if p))
    if how == "cli":
        argv = [sys.executable, "-m", "walstore", "bench", "--quick", "--json"]
    else:
        argv = [sys.executable, str(root / "bench" / "run.py"), "--quick", "--json",
                "--workloads", "put-1t", "--out", str(tmp_path / "out")]
    from store_support import ctrl_c_reaches_it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=ctrl_c_reaches_it)
    try:
        first = proc.stderr.readline()          # the first progress line: measuring
        assert first.startswith("put-1t"), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, None), (proc.returncode, err[-800:])
    assert "Traceback" not in err, err[-1500:]
    assert out.strip() == "" or out.strip().startswith("{")
    assert not [p.name for p in runs.iterdir() if p.name.startswith("walstore-bench-")]
