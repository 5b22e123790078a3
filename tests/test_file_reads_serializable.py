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


# ---- a prepared transaction's file reads, held until its decision ----------------------
# (stop 50) the reads were checked at prepare only: between the prepare and its decision
# another transaction could change a path the prepared one had decided on and commit —
# then commit_prepared committed a decision on a version that no longer existed.  Now
# what it read (paths, and directories it listed) is held, as its read keys are, and the
# PREPARE record names it, so a reopened store (after a crash too) holds it again.

def test_a_path_a_prepared_transaction_read_cannot_change_until_its_decision(env):
    store, ws, root = env
    t1 = store.transaction()
    assert t1.files(ws).read("cfg") == b"v1\n"
    t1.put("decided-on", "v1")
    t1.prepare("g-read")
    t2 = store.transaction()
    with pytest.raises(walstore.ConflictError, match="cfg.*read and has not ended"):
        t2.files(ws).write("cfg", "v2\n")
    with pytest.raises(walstore.ConflictError, match="cfg"):
        t2.files(ws).delete("cfg")
    t2.rollback()
    assert (root / "cfg").read_text() == "v1\n"
    store.commit_prepared("g-read")
    with store.transaction() as t3:  # decided: nothing held any more
        t3.files(ws).write("cfg", "v3\n")
    assert (root / "cfg").read_text() == "v3\n"


def test_a_directory_above_a_path_read_is_held_too(env):
    store, ws, root = env
    (root / "conf").mkdir()
    (root / "conf" / "app.ini").write_text("x=1\n")
    t1 = store.transaction()
    t1.files(ws).read("conf/app.ini")
    t1.prepare("g-dir")
    t2 = store.transaction()
    with pytest.raises(walstore.ConflictError, match="conf"):
        t2.files(ws).rename("conf", "conf.old")
    with pytest.raises(walstore.ConflictError, match="conf"):
        t2.files(ws).rmtree("conf")
    t2.files(ws).write("elsewhere.txt", "fine\n")  # what it did not read stays free
    t2.commit()
    store.rollback_prepared("g-dir")
    with store.transaction() as t3:
        t3.files(ws).rename("conf", "conf.old")
    assert (root / "conf.old" / "app.ini").read_text() == "x=1\n"


def test_a_watch_changing_a_held_path_is_refused_and_put_back(env):
    store, ws, root = env
    t1 = store.transaction()
    t1.files(ws).read("cfg")
    t1.prepare("g-watch")
    t2 = store.transaction()
    with pytest.raises(walstore.ConflictError, match="cfg"):
        with t2.files(ws).watch():
            (root / "cfg").write_text("changed by a tool\n")
    assert (root / "cfg").read_text() == "v1\n"
    store.commit_prepared("g-watch")


def test_a_failed_prepare_holds_nothing(env):
    store, ws, root = env
    t1 = store.transaction()
    t1.files(ws).read("cfg")
    with pytest.raises(TypeError, match="gid"):
        t1.prepare(b"not a str")
    t1.rollback()
    with store.transaction() as t2:
        t2.files(ws).write("cfg", "v2\n")
    assert (root / "cfg").read_text() == "v2\n"


def test_what_a_prepared_transaction_read_is_held_after_a_kill(tmp_path):
    """A real writer reads a file and lists a directory, prepares, and is killed with
    SIGKILL; the next open still holds both until the decision."""
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "cfg").write_text("v1\n")
    (root / "d" / "one").write_text("1\n")
    code = ("import os, signal, sys, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "ws = s.workspace(sys.argv[2])\n"
            "t = s.transaction()\n"
            "assert t.files(ws).read('cfg') == b'v1\\n'\n"
            "assert t.files(ws).listdir('d') == ['one']\n"
            "t.put('plan', 'from v1 and [one]')\n"
            "t.prepare('g-killed')\n"
            "print('PREPARED', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and "PREPARED" in proc.stdout, proc.stderr
    with walstore.open(str(tmp_path / "s")) as store:
        assert store.prepared() == ["g-killed"]
        ws = store.workspace(str(root))
        t2 = store.transaction()
        with pytest.raises(walstore.ConflictError, match="cfg"):
            t2.files(ws).write("cfg", "v2\n")
        with pytest.raises(walstore.ConflictError, match="two|d"):
            t2.files(ws).write("d/two", "2\n")  # a new name in the listed directory
        with pytest.raises(walstore.ConflictError, match="one"):
            t2.files(ws).delete("d/one")
        t2.files(ws).write("d2/free", "ok\n")
        t2.commit()
        store.commit_prepared("g-killed")
        assert store.get("plan") == "from v1 and [one]"
        with store.transaction() as t3:
            t3.files(ws).write("cfg", "v2\n")
            t3.files(ws).write("d/two", "2\n")
    assert (root / "cfg").read_text() == "v2\n" and (root / "d" / "two").exists()


# ---- listdir is a read too ---------------------------------------------------------------
# (stop 50) ``listdir`` was not validated: a transaction that listed a directory, decided
# on its names ("no report yet: write one"), committed after another transaction had added
# or removed a name there.  The names seen are checked at commit (what the files hold is
# not part of a listing), but for the names of paths the transaction changed itself.

def test_a_name_added_after_a_listing_conflicts_at_commit(env):
    store, ws, root = env
    (root / "out").mkdir()
    t1 = store.transaction()
    assert t1.files(ws).listdir("out") == []
    t1.put("next-report", "report-1")
    with store.transaction() as t2:
        t2.files(ws).write("out/report-1", "theirs\n")
    with pytest.raises(walstore.ConflictError, match="listed .*out"):
        t1.commit()
    assert store.get("next-report") is None


def test_a_name_removed_by_another_process_after_a_listing_conflicts(env):
    store, ws, root = env
    (root / "out").mkdir()
    (root / "out" / "a").write_text("a\n")
    t1 = store.transaction()
    assert t1.files(ws).listdir("out") == ["a"]
    t1.put("count", 1)
    (root / "out" / "a").unlink()  # (not through walstore)
    with pytest.raises(walstore.ConflictError, match="out"):
        t1.commit()


def test_own_changes_and_changed_contents_do_not_conflict_with_a_listing(env):
    store, ws, root = env
    (root / "out").mkdir()
    (root / "out" / "a").write_text("a\n")
    t1 = store.transaction()
    assert t1.files(ws).listdir("out") == ["a"]
    t1.files(ws).write("out/b", "mine\n")
    t1.files(ws).delete("out/a")
    assert t1.files(ws).listdir("out") == ["b"]
    (root / "cfg").write_text("elsewhere\n")
    with store.transaction() as t2:
        t2.files(ws).write("unrelated/x", "x\n")
    t1.commit()
    t3 = store.transaction()
    assert t3.files(ws).listdir("out") == ["b"]
    with store.transaction() as t4:  # the content of a listed name: not part of a listing
        t4.files(ws).write("out/b", "changed content\n")
    t3.commit()


def test_a_name_taken_between_a_listing_and_own_write_conflicts_at_the_write(env):
    store, ws, root = env
    (root / "out").mkdir()
    t1 = store.transaction()
    assert "report" not in t1.files(ws).listdir("out")
    with store.transaction() as t2:
        t2.files(ws).write("out/report", "theirs\n")
    with pytest.raises(walstore.ConflictError, match="out"):
        t1.files(ws).write("out/report", "mine\n")  # (would overwrite theirs, unseen)
    assert (root / "out" / "report").read_text() == "theirs\n"
    t1.rollback()


def test_a_listing_that_saw_an_uncommitted_name_commits_only_behind_it(env):
    store, ws, root = env
    (root / "out").mkdir()
    t2 = store.transaction()
    t2.files(ws).write("out/pending", "t2\n")
    t1 = store.transaction()
    assert t1.files(ws).listdir("out") == ["pending"]
    t1.put("saw", "pending")
    with pytest.raises(walstore.ConflictError, match="has not ended"):
        t1.commit()
    t2.rollback()


def test_a_revert_or_rewind_over_a_held_path_is_refused_before_any_compensation(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    refunds = []
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": lambda a: refunds.append(a.id)}) as store:
        ws = store.workspace(str(root))
        with store.transaction() as t:
            with t.action("charge", compensate="refund"):
                pass
            t.files(ws).write("f", "1\n")
            t.put("k", 1)
        reader = store.transaction()
        reader.files(ws).read("f")
        reader.prepare("g-held")
        for undo in (lambda: store.revert(t.id), lambda: store.rewind(walstore.LSN(1))):
            with pytest.raises(walstore.ConflictError, match="read and has not ended"):
                undo()
            assert refunds == [] and store.get("k") == 1
            assert (root / "f").read_text() == "1\n"
        store.commit_prepared("g-held")
        store.revert(t.id)
        assert refunds == [f"{t.id}.1"] and not (root / "f").exists()


def test_an_os_error_checking_the_reads_fails_the_commit_as_a_store_error(env, monkeypatch):
    """(stop 50) EIO or EACCES from the lstat or listing a commit's check makes left as a
    bare OSError out of ``commit()`` (CONTRACT: no OSError escapes the API); now a
    StoreIOError, the transaction rolled back, the store usable."""
    import errno
    import os
    store, ws, root = env
    (root / "d").mkdir()
    for how in ("read", "listdir"):
        t1 = store.transaction()
        if how == "read":
            t1.files(ws).read("cfg")
        else:
            t1.files(ws).listdir("d")
        t1.put("k", how)
        real_lstat, real_open = os.lstat, os.open
        bad = os.fsencode(str(root))

        def failing(fn):
            def call(path, *a, **kw):
                if os.fsencode(path).startswith(bad):
                    raise OSError(errno.EIO, "Input/output error", path)
                return fn(path, *a, **kw)
            return call
        monkeypatch.setattr(os, "lstat", failing(real_lstat))
        monkeypatch.setattr(os, "open", failing(real_open))
        with pytest.raises(walstore.StoreIOError, match="Input/output error"):
            t1.commit()
        monkeypatch.undo()
        assert t1.state == "rolled back" and store.get("k") is None
    with store.transaction() as t2:
        t2.put("k", "after")
    assert store.get("k") == "after"


def test_walstore_prepared_json_counts_what_it_holds(env):
    import json
    from click.testing import CliRunner
    from walstore.cli import main as cli
    store, ws, root = env
    (root / "d").mkdir()
    t1 = store.transaction()
    t1.files(ws).read("cfg")
    t1.files(ws).exists("nope")
    t1.files(ws).listdir("d")
    t1.put("k", 1)
    t1.prepare("g-json")
    r = CliRunner().invoke(cli, ["prepared", store.path, "--json"])
    (row,) = json.loads(r.output)["prepared"]
    assert (row["gid"], row["files_read"], row["dirs_listed"]) == ("g-json", 2, 1)
    store.rollback_prepared("g-json")
