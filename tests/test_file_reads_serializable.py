"""A transaction's reads of workspace files are validated at commit, as its key reads are.

Found by the agent model (tests/test_agent_model.py, FilesModel): a transaction that read
a path (``files.read``, ``files.exists``) and decided on it committed after another
transaction had changed that path and committed — a key deleted because its mirror file
"did not exist" while it did; a config file read, then written back, overwrote the other
transaction's committed change (a lost update).  Now a commit (or prepare) conflicts when
a path it read changed since, and so does a change of such a path in the transaction."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import walstore


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "cfg").write_text("v1\n")
    store = walstore.open(str(tmp_path / "s"), durability="none")
    ws = store.workspace(str(root))
    yield store, ws, root
    store.close()


def test_a_read_then_a_write_over_a_commit_between_them_conflicts(env):
    store, ws, root = env
    t1 = store.transaction()
    seen = t1.files(ws).read("cfg")
    with store.transaction() as t2:
        t2.files(ws).write("cfg", "v2\n")
    with pytest.raises(walstore.ConflictError, match="read .*cfg"):
        t1.files(ws).write("cfg", seen + b"mine\n")  # (would drop v2: a lost update)
    assert (root / "cfg").read_text() == "v2\n"  # nothing was changed
    t1.rollback()
    assert (root / "cfg").read_text() == "v2\n"


def test_a_commit_after_a_read_of_a_path_changed_since_conflicts(env):
    store, ws, root = env
    t1 = store.transaction()
    assert not t1.files(ws).exists("lock")
    t1.put("decided", "no lock, go ahead")
    with store.transaction() as t2:
        t2.files(ws).write("lock", "t2\n")
    with pytest.raises(walstore.ConflictError, match="lock"):
        t1.commit()
    assert store.get("decided") is None and t1.state == "rolled back"


def test_a_dirty_read_commits_only_behind_the_writer(env):
    store, ws, root = env
    # the writer still open: the reader's commit conflicts (what it read may yet go)
    t2 = store.transaction()
    t2.files(ws).write("cfg", "v2\n")
    t1 = store.transaction()
    assert t1.files(ws).read("cfg") == b"v2\n"
    t1.put("saw", "v2")
    with pytest.raises(walstore.ConflictError, match="has not ended"):
        t1.commit()
    # the writer rolled back: what the reader read never existed
    t3 = store.transaction()
    assert t3.files(ws).read("cfg") == b"v2\n"
    t2.rollback()
    assert (root / "cfg").read_text() == "v1\n"
    t3.put("saw", "v2")
    with pytest.raises(walstore.ConflictError):
        t3.commit()
    # the writer committed first: the reader commits after it (serial: writer, reader)
    t4 = store.transaction()
    t4.files(ws).write("cfg", "v3\n")
    t5 = store.transaction()
    assert t5.files(ws).read("cfg") == b"v3\n"
    t4.commit()
    t5.put("saw", "v3")
    t5.commit()
    assert store.get("saw") == "v3"


def test_own_changes_and_unrelated_commits_do_not_conflict(env):
    store, ws, root = env
    (root / "other").write_text("x\n")
    t1 = store.transaction()
    f = t1.files(ws)
    assert f.read("cfg") == b"v1\n"
    f.write("cfg", "v1\nmine\n")
    f.write("cfg", "v1\nmine\nagain\n")  # (its own path: no conflict with itself)
    assert f.read("cfg") == b"v1\nmine\nagain\n"
    assert not f.exists("new")
    with f.watch():  # a process of its own changes what it read
        subprocess.run([sys.executable, "-c", "open('new','w').write('made\\n');"
                        "open('cfg','a').write('by make\\n')"], cwd=root, check=True)
    with store.transaction() as t2:  # another path, committed meanwhile
        t2.files(ws).write("other", "y\n")
    t1.commit()
    assert (root / "cfg").read_text() == "v1\nmine\nagain\nby make\n"
    assert (root / "new").read_text() == "made\n"


def test_a_change_by_another_process_after_the_read_conflicts(env):
    store, ws, root = env
    t1 = store.transaction()
    t1.files(ws).read("cfg")
    subprocess.run([sys.executable, "-c", "open('cfg','w').write('stranger, longer\\n')"],
                   cwd=root, check=True)
    t1.put("k", 1)
    with pytest.raises(walstore.ConflictError):
        t1.commit()


def test_prepare_validates_the_paths_read(env):
    store, ws, root = env
    t1 = store.transaction()
    t1.files(ws).read("cfg")
    t1.put("k", 1)
    with store.transaction() as t2:
        t2.files(ws).write("cfg", "v2\n")
    with pytest.raises(walstore.ConflictError):
        t1.prepare("g1")
    assert store.prepared() == []


def test_concurrent_read_modify_write_of_one_file_loses_no_update(env):
    """Two threads append to one file by read-then-write in store.run: every append is
    there at the end (without validation, one overwrote the other's committed append)."""
    store, ws, root = env
    per_thread = 40
    errors: list = []

    def append(tag: str) -> None:
        try:
            for i in range(per_thread):
                def step(tx, line=f"{tag}{i}\n"):
                    f = tx.files(ws)
                    f.write("cfg", f.read("cfg") + line.encode())
                store.run(step, retries=10_000)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=append, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    lines = (root / "cfg").read_text().splitlines()
    assert lines[0] == "v1" and len(lines) == 1 + 2 * per_thread
    assert sorted(lines[1:]) == sorted(f"{t}{i}" for t in "ab" for i in range(per_thread))


def test_a_dropped_reader_lets_go_of_its_paths_at_once(env):
    """A transaction that read a path holds no reference cycle through its check: dropped
    (garbage, never ended), its changes are put back by the next change of its paths at
    once, not after a collector run (a claimant still referenced counts as live)."""
    import gc
    store, ws, root = env
    gc.disable()
    try:
        t = store.transaction()
        f = t.files(ws)
        f.read("cfg")
        f.write("q", "dropped\n")
        del f, t
        with store.transaction() as t2:
            t2.files(ws).write("q", "mine\n")  # (no ConflictError: the dropped one is gone)
    finally:
        gc.enable()
    assert (root / "q").read_text() == "mine\n"
