"""watch()'s change monitor (walstore/files/monitor.py): a monitored snapshot equals a full
walk, costs what changed, falls back to the full walk when inotify cannot be trusted.

Real files, real subprocesses making the changes inside ``watch()``; the monitored
manifest the store keeps is compared with a fresh full walk, and rollbacks with a copy.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import walstore
from walstore.files import Workspace
from walstore.files.monitor import FULL_WALK_ENV, available
from walstore.files.watch import snapshot

from files_support import TreeSnapshot, assert_tree_equal, tree_state

pytestmark = pytest.mark.skipif(not available(), reason="inotify (Linux) only")

IGNORE = ["*.log", "build/"]

# the subprocess that changes the tree: a JSON list of [op, args...] on argv
CHANGER = r"""
import json, os, shutil, sys
root, ops = sys.argv[1], json.loads(sys.argv[2])
os.chdir(root)


def run(op, *a):
    if op == "write":
        with open(a[0], "w") as f: f.write(a[1])
    elif op == "append":
        with open(a[0], "a") as f: f.write(a[1])
    elif op == "rm":
        os.unlink(a[0])
    elif op == "rmtree":
        shutil.rmtree(a[0])
    elif op == "mv":
        os.rename(a[0], a[1])
    elif op == "mkdir":
        os.makedirs(a[0], exist_ok=True)
    elif op == "chmod":
        os.chmod(a[0], int(a[1], 8))
    elif op == "symlink":
        os.symlink(a[1], a[0])
    elif op == "link":
        os.link(a[0], a[1])
    elif op == "file_to_dir":
        os.unlink(a[0]); os.mkdir(a[0])
        with open(os.path.join(a[0], "inside"), "w") as f: f.write(a[1])
    elif op == "many":
        for i in range(int(a[1])):
            with open(os.path.join(a[0], "m%d" % i), "w") as f: f.write(str(i))


for op in ops:
    try:
        run(*op)
    except OSError:
        pass  # (a random op that cannot be done here: a dir moved into itself, ...)
"""


def change(root: str, ops: list) -> None:
    subprocess.run([sys.executable, "-c", CHANGER, root, json.dumps(ops)], check=True)


def kept_manifest(s: walstore.Store, root: str):
    """The manifest the store keeps for the workspace (the monitored one, read only)."""
    return s._files._manifests[os.fsencode(os.path.realpath(root))]


def assert_same_as_full_walk(m, root: str) -> None:
    full = snapshot(Workspace(root, IGNORE), None)
    assert m.records.keys() == full.records.keys(), (
        sorted(m.records.keys() ^ full.records.keys())[:10])
    bad = [(k, m.records[k], full.records[k]) for k in m.records
           if m.records[k] != full.records[k]]
    assert not bad, bad[:3]


def tracked_state(root: str) -> dict:
    """The tree's state less its ignored paths (a rollback leaves those alone)."""
    return {rel: v for rel, v in tree_state(root).items()
            if not (rel == b"build" or rel.startswith(b"build/") or rel.endswith(b".log"))}


def _tree(root: str) -> tuple[list[str], list[str]]:
    files, dirs = [], []
    for d, dns, fns in os.walk(root):
        rd = os.path.relpath(d, root)
        if rd.startswith("build") or rd.startswith("store"):
            continue
        for n in fns:
            if not n.endswith(".log"):
                files.append(os.path.normpath(os.path.join(rd, n)))
        for n in dns:
            if not os.path.islink(os.path.join(d, n)) and not (rd == "." and n == "build"):
                dirs.append(os.path.normpath(os.path.join(rd, n)))
    return sorted(files), sorted(dirs)


def random_ops(rng: random.Random, root: str, outside: str, k: int) -> list:
    ops = []
    files, dirs = _tree(root)
    files = [f for f in files if not os.path.islink(os.path.join(root, f))]
    for _ in range(rng.randint(1, 8)):
        k += 1
        where = rng.choice(dirs + ["."])
        new = os.path.normpath(os.path.join(where, f"n{k}"))
        choice = rng.randrange(14)
        if choice == 0 or not files:
            ops.append(["write", new, f"new {k}"])
            files.append(new)
        elif choice == 1:
            ops.append(["append", rng.choice(files), f" more {k}"])
        elif choice == 2:
            f = rng.choice(files)
            ops.append(["rm", f])
            files.remove(f)
        elif choice == 3:
            f = rng.choice(files)
            ops.append(["mv", f, new])
            files[files.index(f)] = new
        elif choice == 4:
            ops.append(["mkdir", new])
            ops.append(["write", new + "/x", "x"])
        elif choice == 5 and dirs:
            d = rng.choice(dirs)
            ops.append(["rmtree", d])
            return ops  # (the lists are stale after it)
        elif choice == 6 and dirs:
            ops.append(["mv", rng.choice(dirs), new])
            return ops
        elif choice == 7:
            ops.append(["chmod", rng.choice(files), rng.choice(["600", "755", "644"])])
        elif choice == 8:
            ops.append(["symlink", new, rng.choice(files)])
        elif choice == 9:
            ops.append(["link", rng.choice(files), new])
        elif choice == 10:
            # a hard link OUTSIDE the tree, written through at once and in later rounds
            f = rng.choice(files)
            out = os.path.join(outside, f"o{k}")
            ops.append(["link", os.path.join(root, f), out])
            ops.append(["append", out, f" outside {k}"])
        elif choice == 11:
            f = rng.choice(files)
            ops.append(["file_to_dir", f, f"was a file {k}"])
            return ops
        elif choice == 12:
            ops.append(["write", os.path.join(rng.choice(["build", "."]), f"i{k}.log"), "log"])
        else:
            outs = sorted(os.listdir(outside))
            if outs:
                ops.append(["append", os.path.join(outside, rng.choice(outs)), f" o{k}"])
    return ops


@pytest.mark.parametrize("seed", [20261203, 7, 99])
def test_monitored_watch_equals_full_walk_and_rolls_back_exactly(tmp_path, seed):
    root, outside = str(tmp_path / "ws"), str(tmp_path / "outside")
    os.makedirs(root + "/a/b")
    os.makedirs(root + "/build")
    os.mkdir(outside)
    for i in range(30):
        with open(f"{root}/{['a', 'a/b', '.'][i % 3]}/f{i}", "w") as f:
            f.write(f"file {i}\n")
    rng = random.Random(seed)
    k = 0
    modes = []
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root, ignore=IGNORE)
        for rnd in range(40):
            roll_back = rnd % 4 == 3
            copy = str(tmp_path / f"copy{rnd}")
            if roll_back:
                shutil.copytree(root, copy, symlinks=True)
                before = tracked_state(root)
            ops = random_ops(rng, root, outside, k)
            k += 20
            try:
                with s.transaction() as tx:
                    with tx.files(ws).watch():
                        change(root, ops)
                    m1 = kept_manifest(s, root)
                    modes.append(m1.stats.mode)
                    assert_same_as_full_walk(m1, root)
                    if roll_back:
                        raise RuntimeError("roll back")
            except RuntimeError:
                pass
            if roll_back:
                assert_tree_equal(tracked_state(root), before)
                assert_tree_equal(tracked_state(root), tracked_state(copy))
                # the rollback's own writes are events too: the next round sees them
                shutil.rmtree(copy)
        assert modes.count("incremental") >= 30, modes


def test_changes_through_links_that_no_directory_event_names(tmp_path):
    """A write through a hard link made OUTSIDE the workspace (in the same block), and
    through a second name of an in-tree file, reach no event of the file's directory:
    the monitor watches each file's own inode too."""
    root, outside = str(tmp_path / "ws"), str(tmp_path / "outside")
    os.makedirs(root + "/d")
    os.mkdir(outside)
    for name in ("out", "d/a", "quiet"):
        with open(f"{root}/{name}", "w") as f:
            f.write(name)
    before = tracked_state(root)
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root, ignore=IGNORE)
        with s.transaction() as tx:  # (arms the monitor)
            with tx.files(ws).watch():
                pass
        with pytest.raises(RuntimeError):
            with s.transaction() as tx:
                with tx.files(ws).watch() as w:
                    change(root, [["link", f"{root}/out", f"{outside}/g"],
                                  ["append", f"{outside}/g", " via outside"],
                                  ["link", "d/a", "b"], ["append", "b", " via b"]])
                m1 = kept_manifest(s, root)
                assert m1.stats.mode == "incremental"
                assert sorted(str(c) .split()[-1] for c in w.changes) == ["b", "d/a", "out"]
                assert_same_as_full_walk(m1, root)
                raise RuntimeError("roll back")
        assert_tree_equal(tracked_state(root), before)
        # later rounds: the inode stays watched, a write through ``g`` alone is seen
        with s.transaction() as tx:
            with tx.files(ws).watch() as w:
                change(root, [["link", f"{root}/out", f"{outside}/h"],
                              ["append", f"{outside}/h", " later"]])
        assert [str(c).split()[-1] for c in w.changes] == ["out"]
        with s.transaction() as tx:
            with tx.files(ws).watch() as w:
                change(root, [["append", f"{outside}/h", " and again"]])
        assert [str(c).split()[-1] for c in w.changes] == ["out"]
        assert_same_as_full_walk(kept_manifest(s, root), root)


def test_one_file_change_in_20000_files_examines_a_few_paths(tmp_path):
    root = str(tmp_path / "ws")
    for d in range(100):
        os.makedirs(f"{root}/d{d}")
        for i in range(200):
            with open(f"{root}/d{d}/f{i}", "w") as f:
                f.write(f"{d}/{i}")
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        costs = []
        for rnd in range(3):
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    begin = kept_manifest(s, root).stats
                    change(root, [["append", f"d{rnd}/f{rnd}", " changed"]])
                end = kept_manifest(s, root).stats
            costs.append((begin.mode, begin.walked, end.mode, end.walked))
        assert costs[0][:2] == ("full", 20100)  # the first snapshot in a process
        for b_mode, b_walked, e_mode, e_walked in [costs[0][2:] * 2] + costs[1:]:
            assert (b_mode, e_mode) == ("incremental", "incremental"), costs
            assert b_walked <= 4 and e_walked <= 4, costs


def test_queue_overflow_falls_back_to_a_full_walk_and_stays_exact(tmp_path):
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        queue = int(f.read())
    root = str(tmp_path / "ws")
    os.makedirs(root + "/many")
    with open(root + "/keep", "w") as f:
        f.write("keep")
    before = TreeSnapshot(root)
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as tx:  # (arms the monitor)
            with tx.files(ws).watch():
                pass
        with pytest.raises(RuntimeError):
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    # each file: IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE at least
                    change(root, [["many", "many", str(queue // 2)], ["rm", "keep"]])
                m1 = kept_manifest(s, root)
                assert m1.stats.mode == "full"
                assert "overflow" in m1.stats.full_walk_reason
                assert len(m1.records) == queue // 2 + 1
                assert_same_as_full_walk(m1, root)
                raise RuntimeError("roll back")
        before.assert_same()


def test_escape_hatch_forces_the_full_walk(tmp_path, monkeypatch):
    monkeypatch.setenv(FULL_WALK_ENV, "1")
    root = str(tmp_path / "ws")
    os.makedirs(root)
    with open(root + "/f", "w") as f:
        f.write("f")
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        for rnd in range(3):
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    change(root, [["append", "f", str(rnd)]])
                m1 = kept_manifest(s, root)
                assert m1.stats.mode == "walk" and m1.stats.walked == 1
                assert_same_as_full_walk(m1, root)
        assert not s._files._monitors


def _inotify_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                n += 1
        except OSError:
            pass
    return n


def test_no_inotify_descriptor_leaks_over_50_open_close_cycles(tmp_path):
    root = str(tmp_path / "ws")
    os.makedirs(root)
    baseline_fds, baseline_inotify = len(os.listdir("/proc/self/fd")), _inotify_fds()
    for cycle in range(50):
        with walstore.open(str(tmp_path / "store"), durability="none") as s:
            ws = s.workspace(root)
            for _ in range(2):
                with s.transaction() as tx:
                    with tx.files(ws).watch():
                        change(root, [["write", f"f{cycle}", "x"]])
            assert _inotify_fds() == baseline_inotify + 1
        assert _inotify_fds() == baseline_inotify
    assert len(os.listdir("/proc/self/fd")) <= baseline_fds


def test_a_tree_past_the_watch_budget_is_walked_and_lets_its_watches_go(tmp_path,
                                                                         monkeypatch):
    """One inotify watch per directory and per tracked path: a tree that would take
    more than a quarter of the user's fs.inotify.max_user_watches is walked instead (an
    editor's or a build tool's watcher fails when the user's budget is spent), and the
    watches taken before the budget ran out are let go at once."""
    from walstore.files import monitor
    monkeypatch.setattr(monitor, "_budget", 20)
    root = str(tmp_path / "ws")
    os.makedirs(root + "/d")
    for i in range(40):
        with open(f"{root}/d/f{i}", "w") as f:
            f.write(str(i))
    before = TreeSnapshot(root)
    baseline = _inotify_fds()
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        for rnd in range(2):
            with pytest.raises(RuntimeError):
                with s.transaction() as tx:
                    with tx.files(ws).watch():
                        change(root, [["append", "d/f3", "more"], ["rm", "d/f7"]])
                    m1 = kept_manifest(s, root)
                    assert m1.stats.mode in ("full", "walk"), m1.stats.mode
                    assert "max_user_watches" in m1.stats.full_walk_reason
                    assert_same_as_full_walk(m1, root)
                    assert _inotify_fds() == baseline  # (let go, not held for nothing)
                    raise RuntimeError("roll back")
            before.assert_same()


@pytest.mark.parametrize("when", ["between", "inside"])
def test_a_parent_moved_aside_and_made_anew_is_a_new_root(tmp_path, when):
    """No inotify event names a workspace whose PARENT was moved aside and made anew (the
    watches follow the old directories): the monitor kept the old records, the watch
    saw no change and the rollback left every one (probe-monitor).  The root's identity
    is compared before each snapshot: another directory there, a full walk."""
    base = str(tmp_path)
    root = base + "/p/ws"
    os.makedirs(root + "/src")
    with open(root + "/a.txt", "w") as f:
        f.write("AAAA\n")
    with open(root + "/src/m.py", "w") as f:
        f.write("print(1)\n")

    def swap():
        os.rename(base + "/p", base + "/p_old")
        shutil.copytree(base + "/p_old/ws", root, symlinks=True)

    with walstore.open(base + "/store", durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as tx:  # (arms the monitor)
            with tx.files(ws).watch():
                pass
        if when == "between":
            swap()
        before = TreeSnapshot(root)
        with pytest.raises(RuntimeError):
            with s.transaction() as tx:
                with tx.files(ws).watch() as w:
                    if when == "inside":
                        swap()
                    change(root, [["write", "a.txt", "BBBB\n"], ["write", "new.txt", "n"],
                                  ["rm", "src/m.py"]])
                assert {c.path for c in w.changes} >= {b"a.txt", b"new.txt", b"src/m.py"}
                m1 = kept_manifest(s, root)
                if when == "inside":  # (between: the watch's begin walked it all)
                    assert m1.stats.mode == "full", m1.stats
                    assert "another directory" in m1.stats.full_walk_reason
                assert_same_as_full_walk(m1, root)
                raise RuntimeError("roll back")
        before.assert_same()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounts need root and unshare")
def test_a_file_system_mounted_inside_the_workspace_is_seen(tmp_path):
    """mount(2) sends no inotify event: a tmpfs mounted on a directory of the workspace
    inside a watch, and files made in it, were not seen (the directory's watch stays on
    the covered one) and the rollback left them (probe-monitor).  The mounts at or under
    the root are compared before each snapshot.  Run in a private mount namespace."""
    script = r"""
import os, subprocess, sys
sys.path[:0] = sys.argv[2:]
import walstore
from files_support import TreeSnapshot
base = sys.argv[1]
root = base + "/ws"
os.makedirs(root + "/cache")
open(root + "/a.txt", "w").write("AAAA\n")
with walstore.open(base + "/store", durability="none") as s:
    ws = s.workspace(root)
    with s.transaction() as tx:
        with tx.files(ws).watch():
            pass
    before = TreeSnapshot(root)
    try:
        with s.transaction() as tx:
            with tx.files(ws).watch() as w:
                subprocess.run(["mount", "-t", "tmpfs", "none", root + "/cache"], check=True)
                open(root + "/cache/new.txt", "w").write("n")
            assert any(c.path == b"cache/new.txt" for c in w.changes), w.changes
            m = s._files._manifests[os.fsencode(os.path.realpath(root))]
            assert m.stats.mode == "full" and "mounted" in m.stats.full_walk_reason, m.stats
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    # (the rollback removed new.txt from the tmpfs; what stays is the mount itself, a
    # thing no rollback of files undoes: the tree seen through it must be as before)
    subprocess.run(["umount", root + "/cache"], check=True)
    before.assert_same()
print("OK")
"""
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                          script, str(tmp_path), here, os.path.dirname(here)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0 and "unshare failed" in res.stderr:
        pytest.skip("no mount namespace here")
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_changes_in_more_directories_than_open_files_allowed(tmp_path):
    """An incremental snapshot kept one open fd per directory it examined until the
    round ended: a watched process changing a file in each of more directories than
    RLIMIT_NOFILE allows made the watch's end fail with EMFILE, and the rollback threw
    the work away (probe-review40).  It keeps at most MAX_OPEN_DIRS open now.  A child
    process under a soft limit of 256, changing files in 400 directories."""
    script = r"""
import os, resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import walstore
base = sys.argv[1]
tree = os.path.join(base, "tree")
for i in range(400):
    os.makedirs(os.path.join(tree, f"d{i:03d}"))
    open(os.path.join(tree, f"d{i:03d}", "f.txt"), "w").write("v0\n")
with walstore.open(os.path.join(base, "store"), durability="none") as s:
    ws = s.workspace(tree)
    with s.transaction() as tx:  # (arms the monitor)
        with tx.files(ws).watch():
            pass
    change = ("import os, sys\n"
              "for d in sorted(os.listdir(sys.argv[1])):\n"
              "    open(os.path.join(sys.argv[1], d, 'f.txt'), 'w').write('v1\\n')\n")
    with s.transaction() as tx:
        with tx.files(ws).watch() as w:
            subprocess.run([sys.executable, "-c", change, tree], check=True)
    assert len(w.changes) == 400, len(w.changes)
    m = s._files._manifests[os.fsencode(os.path.realpath(tree))]
    assert m.stats.mode == "incremental", m.stats
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a path another user cannot read")
def test_an_ignored_path_the_user_cannot_read_keeps_snapshots_incremental(tmp_path):
    """For a user who cannot read an ignored path (a root-only lost+found), the watch of
    its inode failed with EACCES and every snapshot after was a full walk
    (probe-review40).  A forked child running as nobody."""
    import tempfile
    nobody = 65534
    base = tempfile.mkdtemp(prefix="walstore-test-")  # (pytest's tmp_path is root's 0700)
    os.chmod(base, 0o755)
    _cleanup = base
    tree = os.path.join(base, "tree")
    for d in range(5):
        os.makedirs(os.path.join(tree, f"d{d}"))
        for i in range(20):
            with open(os.path.join(tree, f"d{d}", f"f{i}.txt"), "w") as f:
                f.write("x\n")
    for root, dirs, files in os.walk(base):
        for n in dirs + files:
            os.chown(os.path.join(root, n), nobody, nobody)
    os.chown(base, nobody, nobody)
    lost = os.path.join(tree, "lost+found")
    os.mkdir(lost, 0o700)  # (root's, as on an ext4 mount point)
    import walstore.files.monitor  # noqa: F401 (imported while still root: the child
    import walstore.files.watch  # noqa: F401  may not read the virtualenv as nobody)
    import ctypes.util  # noqa: F401
    import encodings.idna  # noqa: F401
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)
            s = walstore.open(os.path.join(base, "store"), durability="none")
            ws = s.workspace(tree, ignore=["lost+found/"])
            modes = []
            for i in range(3):
                with s.transaction() as tx:
                    with tx.files(ws).watch():
                        with open(os.path.join(tree, "d0", "f0.txt"), "w") as f:
                            f.write(f"round {i}\n")
                    modes.append(kept_manifest(s, tree).stats.mode)
            s.close()
            code = 0 if modes[1:] == ["incremental", "incremental"] else 3
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    shutil.rmtree(_cleanup, ignore_errors=True)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_watch_budget_is_the_whole_process_s(tmp_path, monkeypatch):
    """The budget was per monitor: four workspaces could take the user's whole limit.
    The process's monitors share it: a second workspace that would pass it is walked."""
    from walstore.files import monitor
    monkeypatch.setattr(monitor, "_budget", 50)
    roots = []
    for name in ("one", "two"):
        root = str(tmp_path / name)
        os.makedirs(root)
        for i in range(30):
            with open(f"{root}/f{i}", "w") as f:
                f.write(str(i))
        roots.append(root)
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        modes = []
        for root in roots:
            ws = s.workspace(root)
            for _ in range(2):
                with s.transaction() as tx:
                    with tx.files(ws).watch():
                        change(root, [["append", "f3", "more"]])
                m = kept_manifest(s, root)
                assert_same_as_full_walk(m, root)
            modes.append((m.stats.mode, m.stats.full_walk_reason or ""))
        assert modes[0] == ("incremental", "")
        assert modes[1][0] != "incremental" and "max_user_watches" in modes[1][1], modes


def test_the_blob_gc_between_watches_keeps_snapshots_incremental(tmp_path):
    """Any blob the gc removed made the next snapshot a full walk, and a store's inline
    gc runs every few watches of a large tree (every manifest it saves is written
    content): a full walk every fourth watch or so.  The gc keeps every blob the
    monitor's base names (an in-memory manifest), so the base stays good: the snapshots
    after a gc are incremental, equal a full walk, and every blob their records name is
    there."""
    root = str(tmp_path / "ws")
    os.makedirs(root)
    for i in range(30):
        with open(f"{root}/f{i}", "w") as f:
            f.write(str(i))
    with walstore.open(str(tmp_path / "store"), durability="none",
                       retain_transactions=1) as s:
        ws = s.workspace(root)
        removed = 0
        for rnd in range(6):
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    begin = kept_manifest(s, root)  # (the watch's first snapshot)
                    change(root, [["write", f"f{rnd}", f"round {rnd}"]])
            if rnd:  # (after the gc of the round before)
                assert begin.stats.mode == "incremental", (rnd, begin.stats)
            had = set(s._files.blobs)
            s.checkpoint()  # (its hook runs the blob gc: retention moved the horizon)
            removed += len(had - set(s._files.blobs))
            m = kept_manifest(s, root)
            assert_same_as_full_walk(m, root)
            assert all(s._files.blobs.has(r.sha256) for r in m.records.values()
                       if r.sha256 is not None)
        assert removed > 0  # (the gc did remove blobs between the watches)
        before = TreeSnapshot(root)
        with pytest.raises(RuntimeError):
            with s.transaction() as tx:
                with tx.files(ws).watch():
                    change(root, [["write", "f1", "last"], ["rm", "f2"]])
                raise RuntimeError("roll back")
        before.assert_same()
