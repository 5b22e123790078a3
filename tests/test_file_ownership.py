"""Who owns a path, at the edges: a transaction rolling back, an undo (revert, rewind)
beside open and prepared transactions, a second transaction in the thread that runs a
watch(), a savepoint taken inside a watch, and a crashed watch whose tree someone edited
before the store was reopened.  Each case ended with the files on disk and the store's
record disagreeing (or a version lost) before the fix; real files, and a real kill -9
for the crash."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import walstore


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "x.txt").write_text("orig")
    store = walstore.open(str(tmp_path / "s"), durability="full")
    ws = store.workspace(str(root))
    yield store, ws, root, tmp_path
    if not store.closed:
        store.close()


def text(root, rel: str) -> str | None:
    p = root / rel
    return p.read_text() if p.exists() else None


def test_a_rolling_back_transaction_keeps_its_paths_until_they_are_back(setup):
    """T1 wrote x.txt, then ran an action; its rollback compensates first (slowly) and
    puts x.txt back after.  While it does, T4 must not take x.txt over: the claim lasts
    until T1's undo is done (it used to end when T1's state changed: T4 wrote x.txt, T1's
    undo met a "stranger" and quarantined its own before-image, and T4's rollback then
    restored T1's uncommitted content — a version no transaction committed)."""
    store, ws, root, tmp = setup
    in_comp, go = threading.Event(), threading.Event()

    @store.compensator("refund")
    def refund(action):
        in_comp.set()
        go.wait(10)

    t1 = store.transaction()
    t1.files(ws).write("x.txt", "T1 uncommitted")
    with t1.action("charge", compensate="refund"):
        pass
    errors = []

    def roll():
        try:
            t1.rollback()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    th = threading.Thread(target=roll)
    th.start()
    assert in_comp.wait(10)
    t4 = store.transaction()
    with pytest.raises(walstore.ConflictError, match="x.txt"):
        t4.files(ws).write("x.txt", "T4")
    assert text(root, "x.txt") == "T1 uncommitted"  # nothing changed by T4
    go.set()
    th.join(10)
    assert errors == [] and text(root, "x.txt") == "orig"
    t4.files(ws).write("x.txt", "T4")  # T1's undo is done: the path is free
    t4.rollback()
    assert text(root, "x.txt") == "orig"
    assert store.file_conflicts() == [] and not (tmp / "s" / "quarantine").exists()


def test_concurrent_file_writers_under_run_conflict_and_retry_never_corrupt(setup):
    """Three threads, each `store.run` writing the same path and a key: every failure is
    a ConflictError that run() retries; at the end the file holds the last committed
    transaction's content and no file conflict was recorded."""
    store, ws, root, _ = setup
    stop = threading.Event()
    problems: list = []
    done = []

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1

            def step(tx, n=n, i=i):
                tx.files(ws).write("x.txt", f"{n}-{i}")
                tx.put("x", f"{n}-{i}")
            try:
                store.run(step, retries=50, backoff=0.0005)
                done.append(1)
            except walstore.ConflictError:
                pass  # ran out of retries: fine, nothing written
            except Exception as e:
                problems.append(e)
                return
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    threading.Event().wait(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert problems == [] and done
    assert text(root, "x.txt") == store.get("x")
    assert store.file_conflicts() == []


@pytest.mark.parametrize("holder", ["open", "prepared"])
@pytest.mark.parametrize("undo", ["rewind", "revert", "rewind-force"])
def test_an_undo_cannot_take_a_path_an_open_or_prepared_transaction_holds(setup, holder,
                                                                           undo):
    """A rewind or revert that would put x.txt back while an open (or prepared)
    transaction has changed it: ConflictError, nothing changes (with force=True too: force
    is about strangers, not about transactions still running).  Before, the undo
    restored x.txt under the holder, which then committed: the store said v1, the disk
    said orig."""
    store, ws, root, _ = setup
    store.restore_point("p")
    with store.transaction() as t0:
        t0.files(ws).write("x.txt", "v0")
    t = store.transaction()
    t.files(ws).write("x.txt", "v1")
    if holder == "prepared":
        t.prepare("g1")
    log_before = [i.txid for i in store.log()]
    with pytest.raises(walstore.ConflictError, match="x.txt"):
        if undo == "revert":
            store.revert(t0.id)
        else:
            store.rewind("p", force=undo == "rewind-force")
    assert text(root, "x.txt") == "v1"
    assert [i.txid for i in store.log()] == log_before  # nothing committed
    if holder == "prepared":
        store.commit_prepared("g1")
    else:
        t.commit()
    assert text(root, "x.txt") == "v1"
    latest = store.log(limit=1)[0].txid
    assert store.at(latest).files(ws).read("x.txt") == b"v1"
    store.rewind("p")  # nothing holds it now
    assert text(root, "x.txt") == "orig"


def test_a_view_of_a_committed_point_never_reads_an_open_transactions_files(setup):
    # (a path with no committed version was read "as it is now": the bytes an open
    # transaction wrote in place, which it may still roll back)
    store, ws, root, _tmp = setup
    with store.transaction() as tx:
        tx.put("a", 1)
    point = tx.id
    tx = store.transaction()
    tx.files(ws).write("new.txt", "uncommitted")
    tx.files(ws).write("x.txt", "changed")  # never changed by walstore before: "orig"
    tx.files(ws).mkdir("d")
    view = store.at(point).files(ws)
    for _round in ("open", "rolled back"):
        with pytest.raises(FileNotFoundError):
            view.read("new.txt")
        assert not view.exists("new.txt") and not view.exists("d")
        assert view.read("x.txt") == b"orig" and view.entry("x.txt").is_file
        if _round == "open":
            tx.rollback()
    assert text(root, "x.txt") == "orig" and text(root, "new.txt") is None
    tx = store.transaction()  # committed: the view of the earlier point reads its history
    tx.files(ws).write("x.txt", "committed")
    tx.commit()
    assert store.at(point).files(ws).read("x.txt") == b"orig"
    assert store.at(tx.id).files(ws).read("x.txt") == b"committed"


def test_a_second_transaction_in_a_watching_thread_is_refused(setup):
    """T1 watches the workspace; the same thread begins T2 and changes a file there (or
    reverts a transaction that did).  The change would land in T1's watch diff and T1's
    rollback would undo work T2 committed; it is refused before anything changes.
    Another thread waits for the watch instead (unchanged)."""
    store, ws, root, _ = setup
    with store.transaction() as t0:
        t0.files(ws).write("y.txt", "t0")
    t1 = store.transaction()
    with t1.files(ws).watch():
        subprocess.run([sys.executable, "-c", "open('p.txt','w').write('t1 process')"],
                       cwd=str(root), check=True)
        t2 = store.transaction()
        with pytest.raises(walstore.WalstoreError, match="watch"):
            t2.files(ws).write("t2.txt", "committed by t2")
        t2.put("t2", "done")
        t2.commit()
        with pytest.raises(walstore.WalstoreError, match="watch"):
            store.revert(t0.id)
        with pytest.raises(walstore.WalstoreError, match="watch"):
            with store.transaction() as t3:
                with t3.files(ws).watch():
                    pass
    assert text(root, "t2.txt") is None and text(root, "y.txt") == "t0"
    t1.rollback()
    assert text(root, "p.txt") is None and text(root, "y.txt") == "t0"
    assert store.get("t2") == "done"
    with store.transaction() as t4:  # the watch ended: the workspace is free again
        t4.files(ws).write("t2.txt", "t4")
    assert text(root, "t2.txt") == "t4"


@pytest.mark.parametrize("when", ["inside", "after"])
def test_rollback_to_a_savepoint_taken_inside_a_watch_is_refused(setup, when):
    """The watched processes' changes after the savepoint cannot be told from those
    before it: rolling back to it (while the watch runs, or after it ended) is refused
    and nothing is undone; a savepoint taken before the watch still works."""
    store, ws, root, _ = setup
    tx = store.transaction()
    outer = tx.savepoint("before-watch")
    tx.put("k", "before")
    err = None
    with tx.files(ws).watch():
        subprocess.run([sys.executable, "-c", "open('a.txt','w').write('before sp')"],
                       cwd=str(root), check=True)
        sp = tx.savepoint("inside-watch")
        subprocess.run([sys.executable, "-c",
                        "open('b.txt','w').write('after sp'); open('x.txt','w').write('chg')"],
                       cwd=str(root), check=True)
        tx.put("k", "after-sp")
        if when == "inside":
            with pytest.raises(walstore.WalstoreError, match="inside a watch") as e:
                tx.rollback_to(sp)
            err = e
    if when == "after":
        with pytest.raises(walstore.WalstoreError, match="inside a watch") as e:
            tx.rollback_to(sp)
        err = e
    assert err is not None and tx.get("k") == "after-sp" and text(root, "b.txt") == "after sp"
    tx.rollback_to(outer)  # before the watch: all of it is undone
    assert text(root, "a.txt") is None and text(root, "b.txt") is None
    assert text(root, "x.txt") == "orig" and tx.get("k") is None
    tx.commit()


CRASHED_WATCH_CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, walstore
    d = sys.argv[1]
    s = walstore.open(os.path.join(d, "s"))
    ws = s.workspace(os.path.join(d, "ws"))
    tx = s.transaction()
    w = tx.files(ws).watch()
    w.__enter__()
    subprocess.run([sys.executable, "-c", "open('a.txt','w').write('by the watched process')"],
                   cwd=os.path.join(d, "ws"), check=True)
    print("READY", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_crashed_watch_is_put_back_and_what_was_found_is_kept(tmp_path):
    """kill -9 inside a watch(); before the store is reopened someone edits b.txt and
    creates c.txt (walstore cannot tell them from the watched process's work).  The open
    puts the tree back to its state before the watch, as promised — and keeps every
    version it found under quarantine/files/tx<N>/watch/, listed in the recovery report
    (``watch_saved``; a ``watch-undone`` problem, a normal crash outcome) and by
    ``walstore recover``.  Before, b.txt's edit and c.txt were destroyed silently."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("a-orig")
    (root / "b.txt").write_text("b-orig")
    walstore.open(str(tmp_path / "s")).close()
    with walstore.open(str(tmp_path / "s")) as s:
        s.workspace(str(root))
    child = tmp_path / "child.py"
    child.write_text(CRASHED_WATCH_CHILD)
    p = subprocess.run([sys.executable, str(child), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and "READY" in p.stdout, p.stderr
    (root / "b.txt").write_text("the user's edit after the crash")
    (root / "c.txt").write_text("the user's new file")
    with walstore.open(str(tmp_path / "s")) as s:
        rep = s.last_recovery
        assert text(root, "a.txt") == "a-orig" and text(root, "b.txt") == "b-orig"
        assert text(root, "c.txt") is None
        saved = {os.path.basename(w["path"]): w["saved_as"] for w in rep.watch_saved}
        assert set(saved) == {"a.txt", "b.txt", "c.txt"}
        kept = {k: open(v).read() for k, v in saved.items()}
        assert kept == {"a.txt": "by the watched process",
                        "b.txt": "the user's edit after the crash",
                        "c.txt": "the user's new file"}
        assert all(v.startswith(str(tmp_path / "s" / "quarantine")) for v in saved.values())
        assert {p.kind for p in rep.problems} >= {"watch-undone"}
        assert s.file_conflicts() == []
    # a second open finds nothing more to do; `walstore recover` exits 0 (normal outcome)
    out = subprocess.run([sys.executable, "-m", "walstore", "recover", str(tmp_path / "s"),
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["watch_saved"] == []


def test_dotdot_after_a_symlink_is_refused(setup):
    """``lnk/../x.txt`` with lnk -> a/b: the OS resolves it to a/x.txt, a lexical
    normalization to x.txt — another file.  walstore never follows a symlink on the way,
    so it refuses it (ValueError), changing nothing; ``..`` after a real directory works."""
    store, ws, root, _ = setup
    (root / "a" / "b").mkdir(parents=True)
    (root / "lnk").symlink_to("a/b")
    with store.transaction() as tx:
        f = tx.files(ws)
        with pytest.raises(ValueError, match="symlink"):
            f.write("lnk/../x.txt", "wrong file")
        f.write("a/b/../y.txt", "fine")
    assert text(root, "x.txt") == "orig" and text(root, "a/y.txt") == "fine"
    assert not (root / "a" / "x.txt").exists()


def test_before_images_stay_bounded_by_retention_under_automatic_checkpoints(tmp_path):
    """64 KiB written per transaction, retain_transactions=20, automatic checkpoints only:
    the blob store must stay near what retention keeps.  Checkpoints were triggered by log
    bytes alone (~300 per transaction here) and the blob gc skipped whenever a file
    operation held the lock: the store grew by the whole 37 MB written.  Blob bytes now
    count toward the checkpoint, and the file path collects once the horizon moved."""
    root = tmp_path / "ws"
    root.mkdir()

    def blob_bytes() -> int:
        total = 0
        for d, _dirs, names in os.walk(tmp_path / "s" / "files"):
            total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
        return total
    peak = 0
    with walstore.open(str(tmp_path / "s"), durability="none", retain_transactions=20,
                       checkpoint_bytes=4 << 20) as s:
        ws = s.workspace(str(root))
        for i in range(600):
            with s.transaction() as tx:
                tx.files(ws).write(f"f{i % 5}.bin", os.urandom(64 * 1024))
            if i % 50 == 49:
                peak = max(peak, blob_bytes())
    assert peak < 16 << 20, f"blob store peaked at {peak >> 20} MiB (37 MiB written)"
