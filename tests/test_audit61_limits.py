"""Process resource limits other than disk space and address space (audit 61).

Each case runs in a real child process that meets a real limit after walstore is imported
and the store is open, as a process in a tight container would: the descriptor limit
(RLIMIT_NOFILE lowered, the free descriptor numbers filled, so the next ``open`` meets
EMFILE) or a thread that cannot start (RLIMIT_NPROC, for a process that runs as root
after dropping to an unprivileged user; otherwise ``Thread.start`` made to fail in the
child only).  Afterwards the limit is lifted and the store is checked against the child's
ledger of acknowledged commits, and by ``walstore verify``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import walstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In the child: ``clamp(free)`` leaves exactly ``free`` descriptor numbers the process
# may still open; ``release()`` gives them back and lifts the limit.
FDLIB = textwrap.dedent("""
    import os, resource
    _held = []
    _SOFT, _HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
    def clamp(free=0):
        release()
        top = max(int(x) for x in os.listdir("/proc/self/fd")) + 17
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, _HARD))
        while True:
            try:
                _held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        for _ in range(free):
            os.close(_held.pop())
    def release():
        while _held:
            os.close(_held.pop())
        resource.setrlimit(resource.RLIMIT_NOFILE, (_SOFT, _HARD))
    def ledger_note(ledger, kind, key):  # the outside world's record: fsynced, appended
        import json
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, (json.dumps([kind, key]) + "\\n").encode())
        os.fsync(fd)
        os.close(fd)
    def tasks_of_this_user():  # RLIMIT_NPROC counts every task (thread) of the real user
        n = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        st = f.read()
                    if int(st.split("\\nUid:")[1].split()[0]) == os.getuid():
                        n += int(st.split("\\nThreads:")[1].split()[0])
                except (OSError, IndexError, ValueError):
                    pass
        return n
""")


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", FDLIB + textwrap.dedent(code), *args],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _verify(path: str) -> None:
    r = subprocess.run([sys.executable, "-m", "walstore", "verify", path],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr


def _state(path: str) -> dict:
    with walstore.open(path) as s:
        return {k: v for k, v in s.scan()}


THREAD_LIMIT = """
    import json, os, resource, sys, threading, time
    import walstore, walstore.cli
    path, nth, replicate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "replicate"

    def replica():
        return {"replicate_to": "file://" + os.path.join(os.path.dirname(path), "replica")
                } if replicate else {}
    # (three threads: spare, applier, flusher; and once replicating: every module it
    # imports is loaded before the process changes user)
    s = walstore.open(path, durability="normal", **replica())
    with s.transaction() as tx:
        tx.put("a", 1)
    s.close()
    if os.geteuid() == 0:  # a real limit: root is exempt from RLIMIT_NPROC, nobody is not
        # (a user of this process's own, not nobody: RLIMIT_NPROC counts every task of the
        # user, and other tests' processes dropped to nobody at the same time changed the
        # count between the count and the thread — a full run's flake)
        UID = 61000 + os.getpid() % 4000
        import shutil, tempfile
        where = tempfile.mkdtemp(prefix="walstore-audit61-")  # (pytest's are root's, 0700)
        os.chmod(where, 0o700)
        for name in os.listdir(os.path.dirname(path)):
            shutil.move(os.path.join(os.path.dirname(path), name), where)
        path = os.path.join(where, "s")
        for dirpath, dirs, files in os.walk(where):
            for n in dirs + files + [""]:
                os.chown(os.path.join(dirpath, n), UID, UID)
        os.setgid(UID)
        os.setuid(UID)
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        def limit():  # the user's tasks so far (this process's threads), (nth - 1) more
            # (the first store's threads ended first: one still ending when counted left
            # the limit a thread too loose once it was gone, and the open succeeded — CI)
            for t in threading.enumerate():
                if t is not threading.main_thread():
                    t.join(10)
            deadline = time.monotonic() + 5
            while (len(os.listdir("/proc/self/task")) > threading.active_count()
                   and time.monotonic() < deadline):
                time.sleep(0.01)  # (a thread threading no longer lists, still exiting)
            resource.setrlimit(resource.RLIMIT_NPROC, (tasks_of_this_user() + nth - 1, hard))
        def lift():
            resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
        real = "RLIMIT_NPROC"
    else:
        start = threading.Thread.start
        calls = [0]
        def failing(self):
            calls[0] += 1
            if calls[0] >= nth:
                raise RuntimeError("can't start new thread")
            return start(self)
        def limit():
            threading.Thread.start = failing
        def lift():
            threading.Thread.start = start
        real = "patched"
    import tempfile
    tempfile.tempdir = os.path.dirname(path)  # (the shipper's scratch directory goes here)
    extra = replica()
    limit()
    out = {"real": real}
    try:
        s = walstore.open(path, durability="normal", **extra)
        out["opened"] = True
        s.close()
    except Exception as e:
        out["error"] = [type(e).__name__, isinstance(e, walstore.WalstoreError), str(e)]
    out["threads"] = sorted(t.name for t in threading.enumerate())
    out["scratch"] = [n for n in os.listdir(os.path.dirname(path))
                      if n.startswith(f"walstore-ship-{os.getpid()}-")]
    lift()
    with walstore.open(path, durability="normal") as s:  # in this same process
        out["a"] = s.get("a")
        with s.transaction() as tx:
            tx.put("b", 2)
    out["path"] = path
    print(json.dumps(out))
"""


def test_an_open_whose_background_thread_cannot_start_fails_cleanly_and_lets_the_store_go(
        tmp_path):
    """The open used to let ``Thread.start``'s bare RuntimeError out, with the spare thread
    (when it was the applier that could not start) left running and the store still locked
    by this process: every later open in it raised StoreLocked naming itself."""
    for nth in (1, 2, 3):
        path = str(tmp_path / f"d{nth}" / "s")
        os.makedirs(os.path.dirname(path))
        out = _run_thread_limit(path, nth, "")
        assert "opened" not in out, out
        name, is_ours, msg = out["error"]
        assert is_ours and name == "StoreIOError", out
        assert "cannot start a background thread" in msg and "can't start new thread" in msg
        assert out["threads"] == ["MainThread"], out  # nothing of the failed open runs on
        assert out["a"] == 1
        assert _state(path) == {"a": 1, "b": 2}
        _verify(path)


def test_an_open_whose_replication_thread_cannot_start_raises_replication_error(tmp_path):
    """``open(replicate_to=...)`` whose shipper thread could not start let the bare
    RuntimeError out, and the shipper's scratch directory stayed behind."""
    path = str(tmp_path / "d" / "s")
    os.makedirs(os.path.dirname(path))
    out = _run_thread_limit(path, 4, "replicate")  # (the 4th: after spare, applier, flusher)
    assert "opened" not in out, out
    name, is_ours, msg = out["error"]
    assert is_ours and name == "ReplicationError", out
    assert "cannot start the replication thread" in msg and "can't start new thread" in msg
    assert out["threads"] == ["MainThread"], out
    assert out["scratch"] == [], out
    assert out["a"] == 1
    assert _state(path) == {"a": 1, "b": 2}
    _verify(path)


def _run_thread_limit(path: str, nth: int, mode: str) -> dict:
    out = _child(THREAD_LIMIT, path, str(nth), mode)
    if out["path"] != path:  # (moved where the unprivileged user could reach it): back
        where = os.path.dirname(out["path"])
        for name in os.listdir(where):
            shutil.move(os.path.join(where, name), os.path.dirname(path))
        os.rmdir(where)
    return out


BACKGROUND_CHECKPOINT = """
    import json, sys, time, walstore
    path = sys.argv[1]
    s = walstore.open(path, checkpoint_bytes=64 * 1024, apply_interval=0.05)
    acked = {}
    for i in range(20):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
        acked[f"k{i}"] = i
    s.checkpoint()
    eng = s._engine
    while eng.wal._spare_wanted:  # (the spare thread holds a descriptor while it works:
        time.sleep(0.02)          # closed after the clamp, it would leave one free)
    clamp(0)  # no descriptor left: the applier's checkpoint cannot list wal/ to trim it
    with s.transaction() as tx:  # (a commit needs no new descriptor: it is acknowledged)
        tx.put("big", "y" * 100_000)  # past checkpoint_bytes: the applier checkpoints
    acked["big"] = "y" * 100_000
    for _ in range(400):  # until the applier has met the limit (or stopped the store)
        if eng.background_errors or eng.stopped_by is not None:
            break
        time.sleep(0.05)
    out = {"readonly_during": s.readonly}
    try:
        with s.transaction() as tx:
            tx.put("during", 1)
        acked["during"] = 1
        out["during"] = "ok"
    except walstore.WalstoreError as e:
        out["during"] = f"{type(e).__name__}: {e}"
    release()
    with s.transaction() as tx:
        tx.put("after", 2)
    acked["after"] = 2
    out["background_errors"] = s.stats()["background_errors"]
    out["checkpoint"] = s.checkpoint()["applied_lsn"] > 0
    s.close()
    out["acked"] = acked
    print(json.dumps(out))
"""


def test_a_background_checkpoint_at_the_descriptor_limit_does_not_turn_the_store_read_only(
        tmp_path):
    """The applier's checkpoint that could not list ``wal/`` (EMFILE) stopped the store: every
    later commit raised ReadOnlyError until it was reopened, while ``checkpoint()`` meeting
    the same error left it writable (the trim's own promise: "the log goes on").  Now it is
    recorded in ``background_errors`` and tried again later."""
    path = str(tmp_path / "s")
    out = _child(BACKGROUND_CHECKPOINT, path)
    assert out["readonly_during"] is False, out
    assert out["during"] == "ok", out
    errors = out["background_errors"]
    assert errors and "Too many open files" in errors[0] and "checkpoint" in errors[0], out
    assert out["checkpoint"]
    assert _state(path) == out["acked"]
    _verify(path)


PACKER_AFTER_MEMORY_ERROR = """
    import json, os, resource, sys, walstore
    path = sys.argv[1]
    s = walstore.open(path)
    big = os.urandom(1 << 20) * 6  # 6 MiB: a value msgpack packs into a ~12 MiB buffer
    def vsize():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    out = {"memory_errors": 0, "acked": {}, "bad": []}
    for step, margin in enumerate(range(4, 40, 2)):  # MiB of address space left to grow
        tx = s.transaction()
        resource.setrlimit(resource.RLIMIT_AS, (vsize() + (margin << 20), hard))
        try:  # (the limit around the put alone: its packing is what meets it)
            tx.put(f"big{step}", big)
            packed = True
        except MemoryError:
            out["memory_errors"] += 1
            packed = False
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if packed:
            tx.commit()
            out["acked"][f"big{step}"] = len(big)
        else:
            tx.rollback()
        try:  # the next commit of the same thread, with room again
            with s.transaction() as tx:
                tx.put(f"small{step}", step)
            out["acked"][f"small{step}"] = step
            if s.get(f"small{step}") != step:
                out["bad"].append(f"small{step}: read back {s.get(f'small{step}')!r}")
        except Exception as e:
            out["bad"].append(f"small{step}: {type(e).__name__}: {e}"[:300])
    s.close()
    print(json.dumps(out))
"""


def test_a_memory_error_packing_a_value_does_not_spoil_the_next_commit(tmp_path):
    """msgpack's Packer keeps a finished output in its buffer when making its bytes fails
    (MemoryError), and the thread's Packer, reused, put it in front of the next packing:
    in a child at its address-space limit (set after walstore was imported and the store
    opened, as a container's memory limit meets a running agent), the put of a 6 MiB
    value failed with MemoryError, and the next commit of the thread — with room again —
    was acknowledged with its value's row undecodable (CorruptionError "does not decode":
    the 6 MiB before it), or refused as too large.  Now a packing error drops the Packer."""
    path = str(tmp_path / "s")
    out = _child(PACKER_AFTER_MEMORY_ERROR, path)
    assert out["memory_errors"] >= 1, out  # (the limit was met)
    assert out["bad"] == [], out["bad"]
    with walstore.open(path) as s:
        for k, v in out["acked"].items():
            got = s.get(k)
            assert (len(got) if k.startswith("big") else got) == v, k
        assert sorted(k for k, _ in s.scan()) == sorted(out["acked"])
    _verify(path)


AFTER_THE_COMMIT_POINT = """
    import json, os, sys, walstore
    path, ledger = sys.argv[1], sys.argv[2]
    s = walstore.open(path, compensators={
        "refund": lambda a: ledger_note(ledger, "refund", a.key)})
    tx = s.transaction()
    with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
        ledger_note(ledger, "charge", act.key)
        act.result = {"charged": 40}
    tx.put("paid", 40)
    fired = []
    def hook(frame, event, arg):  # a MemoryError as the committed transaction is finished
        if (event == "call" and not fired and frame.f_code.co_name == "_finish"
                and frame.f_back.f_code.co_name == "_commit"):
            fired.append(1)
            sys.setprofile(None)
            raise MemoryError("no memory left (injected)")
    sys.setprofile(hook)
    try:
        tx.commit()
        out = {"commit": "returned", "lsn": tx.lsn}
    except BaseException as e:
        out = {"commit": f"{type(e).__name__}: {e}"}
    sys.setprofile(None)
    out.update(fired=bool(fired), state=tx.state, action=s.get_action(act.id).state,
               background_errors=s.stats()["background_errors"], key=act.key)
    s.close()
    print(json.dumps(out))
"""


def test_a_memory_error_after_the_commit_point_does_not_report_the_commit_as_failed(
        tmp_path):
    """A MemoryError raised while a committed transaction was finished in memory (after its
    COMMIT was durable) came out of ``commit()``: the caller was told the commit failed
    while it stood, the charge with it (a caller retrying what failed charges twice).
    Now commit() returns its LSN, the error listed in ``background_errors``."""
    path, ledger = str(tmp_path / "s"), str(tmp_path / "ledger")
    out = _child(AFTER_THE_COMMIT_POINT, path, ledger)
    assert out["fired"], out
    assert out["commit"] == "returned" and out["lsn"], out
    assert out["state"] == "committed" and out["action"] == "committed", out
    assert any("MemoryError" in e for e in out["background_errors"]), out
    with walstore.open(path, compensators={"refund": lambda a: None}) as s:
        assert s.get("paid") == 40
        assert s.pending_compensations() == []
        assert [a.state for a in s.actions()] == ["committed"]
    with open(ledger) as f:
        assert [json.loads(line)[0] for line in f] == ["charge"]  # never refunded
    _verify(path)


SPARE_THREAD = """
    import json, sys, threading, time, walstore
    path = sys.argv[1]
    calls = []
    def hook(frame, event, arg):  # in walstore's threads: the 2nd spare fails (no memory;
        # the hook is unset in the thread that raised)
        if (event == "call" and frame.f_code.co_name == "prepare"
                and frame.f_code.co_filename.endswith("segment.py")):
            calls.append(1)
            if len(calls) == 2:
                raise MemoryError("no memory for the spare (injected)")
    threading.setprofile(hook)
    s = walstore.open(path, segment_size=1 << 20)
    threading.setprofile(None)
    wal = s._engine.wal
    wal.request_spare()  # (the first spare: made once half a segment is written, else)
    while wal._spare_wanted or not wal.spare.size:
        time.sleep(0.01)
    with s.transaction() as tx:
        tx.put("a", 1)
    wal.rotate()  # uses the first spare, and asks the thread for the next: it fails
    for _ in range(200):
        if not wal._spare_wanted:
            break
        time.sleep(0.05)
    out = {"calls": len(calls), "alive": wal._spare_thread.is_alive(),
           "wanted": wal._spare_wanted}
    wal.rotate()  # no spare: made inline, at once (it waited 5 s for one nobody made)
    for _ in range(200):  # and the thread makes the next one
        if not wal._spare_wanted and wal.spare.size:
            break
        time.sleep(0.05)
    out.update(inline=wal.inline_preallocations, spare=wal.spare.size,
               errors=s.stats()["background_errors"])
    with s.transaction() as tx:
        tx.put("b", 2)
    s.close()
    print(json.dumps(out))
"""


def test_the_spare_thread_survives_an_error_that_is_not_an_os_error(tmp_path):
    """The thread that preallocates the next WAL segment caught only OSError: a MemoryError
    (here raised in its call of ``Spare.prepare``) ended it silently, ``_spare_wanted``
    stayed set, and every later rotation waited 5 s for a spare no one would make, holding
    the log's locks.  Now the thread lives on, the rotation preallocates inline at once,
    and the error is listed in ``background_errors``."""
    path = str(tmp_path / "s")
    out = _child(SPARE_THREAD, path)
    assert out["calls"] >= 2, out
    assert out["alive"] and not out["wanted"], out
    assert out["inline"] == 1 and out["spare"] > 0, out  # (the thread made the next one)
    assert any("WAL spare: MemoryError" in e for e in out["errors"]), out
    assert _state(path) == {"a": 1, "b": 2}
    _verify(path)


CRASHED_WRITER = """
    import os, sys, walstore
    path, root = sys.argv[1], sys.argv[2]
    s = walstore.open(path)
    ws = s.workspace(root)
    with s.transaction() as tx:
        tx.put("a", 1)
        tx.files(ws).write("f.txt", "F0")
    tx = s.transaction()
    tx.files(ws).write("f.txt", "F1")
    tx.files(ws).write("g/new.txt", "N")
    with tx.action("charge", compensate="refund") as act:
        act.result = {"charged": 1}
    tx.put("b", 2)
    os.kill(os.getpid(), 9)  # the transaction in flight: recovery undoes it at the next open
"""

OPEN_AT_THE_LIMIT = """
    import json, os, shutil, sys, walstore
    crashed, root, work = sys.argv[1], sys.argv[2], sys.argv[3]
    pristine = root + ".crashed"
    shutil.copytree(root, pristine, symlinks=True)
    out = {"errors": [], "opened_at": None}
    for free in range(0, 24):  # every descriptor the recovering open takes, one by one
        path = os.path.join(work, f"s{free}")
        shutil.copytree(crashed, path)
        shutil.rmtree(root)
        shutil.copytree(pristine, root, symlinks=True)  # (registered by its path)
        clamp(free)
        try:
            walstore.open(path, compensators={"refund": lambda a: None}).close()
            opened = True
        except Exception as e:
            opened = False
            error = [type(e).__name__, isinstance(e, walstore.WalstoreError), str(e)[:300]]
        release()
        if opened:
            out["opened_at"] = free
            break
        out["errors"].append(error)
        with walstore.open(path, compensators={"refund": lambda a: None}) as s:  # lifted
            got = ({k: v for k, v in s.scan()}, [a.state for a in s.actions()],
                   sorted(os.listdir(root)), open(os.path.join(root, "f.txt")).read())
        if got != ({"a": 1}, ["compensated"], ["f.txt"], "F0"):
            out.setdefault("bad", []).append([free, repr(got)])
    print(json.dumps(out))
"""


def test_a_recovering_open_at_the_descriptor_limit_raises_only_walstore_errors(tmp_path):
    """A crashed writer's store (a file transaction with an action in flight) opened with
    0, 1, 2, ... descriptors free: every open that fails raises a walstore error, and the
    open once the limit is lifted recovers it whole (the transaction undone, its file
    changes put back, its charge compensated).  With 8 free, the settling of the files
    layer listed the before-image store's temp directory and the bare OSError (EMFILE,
    ``files/blobs/tmp``) escaped ``walstore.open``."""
    crashed, root = str(tmp_path / "crashed"), str(tmp_path / "ws")
    os.makedirs(root)
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASHED_WRITER), crashed, root],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == -9, r.stderr[-2000:]
    work = str(tmp_path / "work")
    os.makedirs(work)
    out = _child(OPEN_AT_THE_LIMIT, crashed, root, work)
    assert out["opened_at"] is not None and len(out["errors"]) == out["opened_at"], out
    raw = [e for e in out["errors"] if not e[1]]
    assert raw == [], raw
    assert all("Too many open files" in e[2] for e in out["errors"]), out["errors"]
    assert "bad" not in out, out["bad"]


BACKUP_AT_THE_LIMIT = """
    import json, os, sys, walstore
    from walstore.ops.backup import backup
    path, base = sys.argv[1], sys.argv[2]
    root = path + ".ws"
    os.makedirs(root)
    s = walstore.open(path)  # (a live writer: an online backup)
    ws = s.workspace(root)
    for i in range(5):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
            tx.files(ws).write(f"d{i}/f{i}.txt", f"F{i}")
    def staged():
        return sorted(n for n in os.listdir(base) if ".incomplete-backup-" in n)
    out = {"failed": [], "left_by_a_failure": []}
    for free in range(0, 14):  # a backup to its own DEST at each count of free descriptors
        dest = os.path.join(base, f"copy{free}")
        clamp(free)
        try:
            backup(path, dest)
        except Exception as e:
            out["failed"].append(free)
        release()
        out["left_by_a_failure"] += staged()
    for free in out["failed"]:  # each again, the limit lifted: its DEST's leftovers go
        backup(path, os.path.join(base, f"copy{free}"))
    out["after"] = staged()
    s.close()
    out["copies"] = sorted(n for n in os.listdir(base))
    out["states"] = []
    for name in out["copies"]:
        with walstore.open(os.path.join(base, name), readonly=True) as b:
            out["states"].append({k: v for k, v in b.scan()})
    print(json.dumps(out))
"""


def test_a_backup_failed_at_the_descriptor_limit_leaves_no_partial_copy_behind(tmp_path):
    """A backup that failed at the descriptor limit removed its staging copy with
    ``rmtree(ignore_errors=True)`` while the limit still held: that failed silently, and the
    partial copy ``<dest>.incomplete-backup-<pid>-*`` stayed beside DEST for as long as the
    process ran (the next backup to DEST sweeps only dead processes' copies).  Now the
    next backup to DEST removes it."""
    path, base = str(tmp_path / "s"), str(tmp_path / "copies")
    os.makedirs(base)
    out = _child(BACKUP_AT_THE_LIMIT, path, base)
    assert out["failed"], out  # (whether one left its copy depends on the descriptors'
    assert out["after"] == [], out  # layout: the case is met for sure below)
    assert out["copies"] == sorted(f"copy{i}" for i in range(14)), out
    assert all(st == {f"k{i}": i for i in range(5)} for st in out["states"]), out
    _verify(os.path.join(base, f"copy{out['failed'][-1]}"))


SCRATCH_AT_THE_LIMIT = """
    import json, os, sys
    from walstore.replication.shipper import remove_scratch, sweep_dead_scratch
    base = sys.argv[1]
    stage = os.path.join(base, f"copy.incomplete-backup-{os.getpid()}-x")
    deep = os.path.join(stage, "files", "blobs", "ab", "cd")
    os.makedirs(deep)
    open(os.path.join(deep, "blob"), "w").close()
    clamp(0)
    remove_scratch(stage)  # what a backup's (or restore's) failure does, at the limit
    release()
    out = {"left": os.path.exists(stage)}
    sweep_dead_scratch(base, "copy.incomplete-backup-")  # the next backup to DEST
    out["after"] = os.path.exists(stage)
    print(json.dumps(out))
"""


def test_a_scratch_copy_that_could_not_be_removed_at_the_limit_goes_at_the_next_sweep(
        tmp_path):
    """The mechanism behind the test above, met for sure: a staging copy whose removal met
    EMFILE stays (``rmtree`` needs a descriptor per level), and the next sweep of its
    parent — which skipped every live process's copies — removes it."""
    out = _child(SCRATCH_AT_THE_LIMIT, str(tmp_path))
    assert out == {"left": True, "after": False}, out


TTL_SWEEPER = """
    import json, os, resource, sys, threading
    import walstore
    from walstore.integrations.langgraph import WalstoreStore
    path = sys.argv[1]

    s = walstore.open(path)
    store = WalstoreStore(s, ttl={"default_ttl": 1, "sweep_interval_minutes": 1})
    if os.geteuid() == 0:  # a real limit (root is exempt from RLIMIT_NPROC; nobody is not)
        UID = 61000 + os.getpid() % 4000  # (see THREAD_LIMIT)
        os.setgid(UID)
        os.setuid(UID)
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks_of_this_user(), hard))
        def lift():
            resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    else:
        start = threading.Thread.start
        def failing(self):
            raise RuntimeError("can't start new thread")
        threading.Thread.start = failing
        def lift():
            threading.Thread.start = start
    out = {}
    try:
        future = store.start_ttl_sweeper()
        out["start"] = "started"
    except Exception as e:
        out["start"] = [type(e).__name__, isinstance(e, walstore.WalstoreError), str(e)]
    lift()
    try:
        out["stop"] = store.stop_ttl_sweeper(5)
    except Exception as e:
        out["stop"] = f"{type(e).__name__}: {e}"
    future = store.start_ttl_sweeper()  # with threads again
    out["again"] = [t.name for t in threading.enumerate() if t.name == "walstore-ttl-sweeper"]
    out["stop_again"] = store.stop_ttl_sweeper(5)
    print(json.dumps(out))
"""


def test_a_ttl_sweeper_that_cannot_start_leaves_the_store_able_to_stop_and_restart_it(
        tmp_path):
    """``WalstoreStore.start_ttl_sweeper()`` whose thread could not start raised the bare
    RuntimeError and kept the unstarted thread: ``stop_ttl_sweeper()`` then raised
    "cannot join thread before it is started".  Now: StoreIOError (EAGAIN) naming the
    cause, and the sweeper can be stopped and started again."""
    pytest.importorskip("langgraph")
    out = _child(TTL_SWEEPER, str(tmp_path / "s"))  # (the store open before any limit)
    name, is_ours, msg = out["start"]
    assert is_ours and name == "StoreIOError" and "can't start new thread" in msg, out
    assert out["stop"] is True, out
    assert out["again"] == ["walstore-ttl-sweeper"] and out["stop_again"] is True, out


APPLIER_MEMORY_ERROR = """
    import json, sys, threading, time, walstore
    path = sys.argv[1]
    fired = []
    def hook(frame, event, arg):  # in walstore's threads: the applier's first LMDB apply
        if (event == "call" and not fired and frame.f_code.co_name == "apply"
                and frame.f_code.co_filename.endswith("apply.py")):
            fired.append(1)
            raise MemoryError()  # (as the allocator raises it: no message)
    threading.setprofile(hook)
    s = walstore.open(path, apply_interval=0.05)
    threading.setprofile(None)
    with s.transaction() as tx:
        tx.put("a", 1)
    for _ in range(200):
        if s._engine.stopped_by is not None:
            break
        time.sleep(0.05)
    out = {"fired": bool(fired)}
    try:
        with s.transaction() as tx:
            tx.put("b", 2)
        out["commit"] = "committed"
    except walstore.ReadOnlyError as e:
        out["commit"] = str(e)
    out["failure"] = s.stats()["failure"]
    s.close()
    print(json.dumps(out))
"""


def test_a_memory_error_in_the_applier_is_named_by_the_read_only_store(tmp_path):
    """A MemoryError in the background applier stops the store (read-only until reopened,
    as any failure of LMDB's writer), but the store named it by its message, which a
    MemoryError usually lacks: commits were refused with "turned read-only after an error
    ()" and ``stats()['failure']`` was ''.  Now the type is named."""
    path = str(tmp_path / "s")
    out = _child(APPLIER_MEMORY_ERROR, path)
    assert out["fired"], out
    assert "after an error (MemoryError)" in out["commit"], out
    assert out["failure"] == "MemoryError", out
    assert _state(path) == {"a": 1}
    _verify(path)


REVERT_COMPENSATIONS = """
    import json, os, sys, walstore
    path, ledger = sys.argv[1], sys.argv[2]
    s = walstore.open(path, compensators={
        "refund": lambda a: ledger_note(ledger, "refund", a.key)})
    with s.transaction() as tx:
        tx.put("paid", 40)
        with tx.action("charge", compensate="refund") as act:
            ledger_note(ledger, "charge", act.key)
            act.result = {"charged": 40}
    fired = []
    def hook(frame, event, arg):  # a MemoryError as the committed revert compensates
        if (event == "call" and not fired and frame.f_code.co_name == "_compensate"
                and frame.f_code.co_filename.endswith("actions.py")):
            fired.append(1)
            sys.setprofile(None)
            raise MemoryError("no memory left (injected)")
    sys.setprofile(hook)
    try:
        s.revert(tx.id)
        out = {"revert": "returned"}
    except BaseException as e:
        out = {"revert": type(e).__name__, "msg": str(e),
               "committed": getattr(e, "committed", None),
               "ids": getattr(e, "action_ids", None)}
    sys.setprofile(None)
    out.update(fired=bool(fired), paid=s.get("paid"), id=act.id)
    s.close()
    print(json.dumps(out))
"""


def test_a_memory_error_running_a_committed_reverts_compensations_says_it_committed(
        tmp_path):
    """A MemoryError in walstore's own code while a committed revert ran its compensations
    escaped ``revert()`` bare, as though the revert had failed, while it stood (the state
    reverted, the refund owed).  Now it is the CompensationFailed a failing compensator
    gets there: ``committed`` True, the owed actions named; the next open compensates
    them, once."""
    path, ledger = str(tmp_path / "s"), str(tmp_path / "ledger")
    out = _child(REVERT_COMPENSATIONS, path, ledger)
    assert out["fired"], out
    assert out["revert"] == "CompensationFailed" and out["committed"] is True, out
    assert out["ids"] == [out["id"]] and "COMMITTED" in out["msg"], out
    assert out["paid"] is None, out  # reverted
    def refund(action):
        with open(ledger, "a") as f:
            f.write(json.dumps(["refund", action.key]) + "\n")
    with walstore.open(path, compensators={"refund": refund}) as s:  # the next open
        assert s.get("paid") is None
        assert [a.state for a in s.actions()] == ["compensated"]
    with open(ledger) as f:
        assert [json.loads(line)[0] for line in f] == ["charge", "refund"]  # once
    _verify(path)
