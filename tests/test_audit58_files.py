"""Adversarial audit of reversible files (audit 58): what the audits 50-55 did not try.

- A transaction that changed a directory's mode together with paths inside it — an
  agent's ``chmod a-w d`` after writing ``d/g`` (a release directory made read-only),
  or ``chmod u+w d`` of a read-only directory before editing in it — could not be
  reverted or rewound by a process without CAP_DAC_OVERRIDE (any non-root user): the
  undo's order (``watch.undo_order``: removals deepest first, then the rest shallowest
  first) put the directory's mode back in the middle, so the removal of ``d/g`` met the
  read-only ``d`` (or the re-creation of a removed file met the directory made
  read-only again first): ``PermissionError``, nothing reverted, where the rollback of
  the same transaction (newest first) worked.  Now a directory's mode that gives its
  owner write or search permission back goes first, one that takes them away last.
  ``test_revert_and_rewind_of_a_directory_made_read_only_with_changes_inside``.
- A second copy of one path in a transaction's quarantine (``quarantine/files/tx<N>/``:
  a ``rollback_to`` and then the rollback each found the path changed by another
  process) takes a numbered suffix, and for a 255-byte name (NAME_MAX) ``<name>.1`` was
  too long: the copy failed with ENAMETOOLONG, the undo stayed owed, every later change
  of that path was refused with ConflictError and every open reported
  ``file-undo-failed``, failing the same way each time.  Now the end of a long name gives
  way to the suffix.
  ``test_a_second_copy_of_a_255_byte_name_in_quarantine_does_not_leave_the_undo_owed``.
- A path a transaction changed twice (``v1``, then ``v2``) and another process changed
  since: its rollback (or the open after a kill -9) undid it step by step and found a
  conflict at each step — two conflicts for one path, the first (what
  ``FileConflictError`` and ``walstore recover`` list first) keeping the transaction's
  own uncommitted ``v1`` at ``quarantine/files/tx<N>/<path>``, where the docs send the
  user for walstore's version; the committed content went to ``<path>.1``.  Now one
  conflict per path, keeping the version the undo would have put back (the oldest
  before-image in the batch).
  ``test_a_path_written_twice_and_then_changed_by_another_process_is_one_conflict``,
  ``test_the_open_after_a_kill_reports_one_conflict_per_path_with_the_committed_version``
  (``test_audit53_files``'s expectation of the extra copies changed with it).
- A directory the undone change made, filled and then made read-only (``mkdir`` and
  writes then ``chmod 555``; a watched build's ``chmod 555 out``) could not be emptied
  without CAP_DAC_OVERRIDE: its revert, the rollback of the watch and the recovery of a
  killed watch (``file-undo-failed`` at every open) failed with PermissionError; and a
  read-only tree a transaction removed could not be made anew by a revert (each
  directory made with its mode 0o555 before its files), nor one whose mode went from
  one read-only mode to another (0o555 -> 0o755, edited, -> 0o500) be reverted.  The
  docs listed the watch case as missing.  Now the undo opens such a directory first (a step of its own) and makes
  one anew writable, giving it its mode last.
  ``test_a_directory_made_and_filled_then_made_read_only_is_undone_as_a_user``,
  ``test_a_read_only_tree_removed_is_put_back_by_a_revert_as_a_user``,
  ``test_the_recovery_of_a_watch_killed_after_it_made_a_read_only_directory``.
- The everyday form, ``chmod u+w ro; write ro/y; delete ro/x; chmod u-w ro``: ``ro`` ends
  in its mode of before, the revert's plan dropped it as "already there", and the
  revert or rewind of the transaction failed with PermissionError as a user.  Now it is
  kept as a passage: opened first, closed last, not listed in the plan's files.
  ``test_a_read_only_directory_opened_edited_and_closed_again_is_reverted_as_a_user``;
  the same inside a watch (its rollback, and a revert of its commit):
  ``test_a_watched_open_edit_close_of_a_read_only_directory_is_undone_as_a_user``
  (only for a process that permission bits stop: root's watch logs no such step, which
  would make it a later writer of the directory:
  ``test_a_watch_in_a_read_only_directory_by_root_is_no_later_writer_of_it``).
  The new opening and closing steps under kill -9 (every third seam call of a user's
  revert through all three kinds of read-only directory, reopened as the user):
  ``test_kill_at_every_step_of_a_users_revert_through_read_only_directories``.
- A revert refused because a later transaction changed the same file said "later
  transactions [N] changed the same keys" (no key in either): now "keys or files".
  ``test_a_later_writer_of_a_file_is_named_as_such``.
- A file operation the OS refused (a read-only or immutable directory) raised an error
  whose file name was ``/proc/self/fd/14/g`` (its pinned parent's descriptor,
  meaningless once the process is gone), a temp name there, or a bare ``b'g'`` (a
  removal relative to a directory descriptor), and a refused rename read "cannot rename
  to 'moved' 'd/f' in workspace ..."; ``tx.files(ws).read(p)`` of a file its user cannot
  read said only "[Errno 13] Permission denied: b'secret'", naming neither the path nor
  the workspace.  Now each names the path in the workspace ("cannot rename 'd/f' to
  'moved'", "cannot read 'd/secret' in workspace ...").
  ``test_a_refused_file_operation_names_the_workspace_path_not_a_descriptor``,
  ``test_reading_an_unreadable_file_names_it``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import walstore  # noqa: F401

from files_support import build, tree_state


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _unprivileged(script: str, *args: str, timeout: float = 120) -> str:
    """Run ``script`` as root without the capabilities that bypass permission bits
    (as an ordinary user would be); its stdout."""
    got = subprocess.run(["setpriv", "--inh-caps=-all",
                          "--bounding-set=-dac_override,-dac_read_search,-fowner",
                          sys.executable, "-c", script, *args],
                         capture_output=True, text=True, env=_child_env(), timeout=timeout)
    assert got.returncode == 0, got.stderr[-3000:]
    return got.stdout


needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                   reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")

READ_ONLY_UNDO = r"""
import json, os, sys, walstore
sys.path.insert(0, sys.argv[3])
from files_support import tree_state
store = walstore.open(sys.argv[1], durability="none")
ws = store.workspace(sys.argv[2])
how = sys.argv[4]
before = tree_state(sys.argv[2])
store.restore_point("p")
with store.transaction() as tx:
    f = tx.files(ws)
    f.write("d/g", "new\n")           # a file made in d, then d made read-only
    f.chmod("d", 0o500)
    f.chmod("m", 0o755)               # a read-only directory opened, then edited in
    f.write("m/c", "c\n")
    f.delete("m/b")
    f.chmod("m/n", 0o755)
    f.write("m/n/x", "x\n")
committed = tree_state(sys.argv[2])
txid = tx.id
out = {}
if how == "revert":
    info = store.revert(txid)
else:
    info = store.rewind("p")
out["undone"] = tree_state(sys.argv[2]) == before
store.revert(info.txid, force=True)   # and the revert of the revert brings it back
out["redone"] = tree_state(sys.argv[2]) == committed
store.close()
print(json.dumps(out))
"""


@needs_setpriv
@pytest.mark.parametrize("how", ["revert", "rewind"])
def test_revert_and_rewind_of_a_directory_made_read_only_with_changes_inside(tmp_path, how):
    root = str(tmp_path / "ws")
    build(root, {"d/f": "f\n", "m/b": "b\n", "m/n/a": "a\n"})
    os.chmod(os.path.join(root, "m/n"), 0o555)
    os.chmod(os.path.join(root, "m"), 0o555)
    before = tree_state(root)
    got = json.loads(_unprivileged(READ_ONLY_UNDO, str(tmp_path / "store"), root,
                                   os.path.dirname(__file__), how))
    assert got == {"undone": True, "redone": True}
    with walstore.open(str(tmp_path / "store")) as s:
        assert not s.last_recovery.file_conflicts
    os.chmod(os.path.join(root, "d"), 0o755)  # (what the redo made read-only again)
    assert tree_state(root)[b"m"] == ("dir", 0o755)
    assert before[b"m"] == ("dir", 0o555)


def test_a_second_copy_of_a_255_byte_name_in_quarantine_does_not_leave_the_undo_owed(tmp_path):
    """A conflict keeps walstore's version at ``quarantine/files/tx<N>/<path>``, and a
    second one of the same path in the same transaction (a ``rollback_to`` found the
    path changed by another process, the transaction wrote it again, and its rollback
    found it changed again) takes a numbered suffix, ``<name>.1``.  For a name of 255
    bytes (NAME_MAX) that name was too long: the copy could not be made, the undo failed
    and stayed owed — every later change of the path in the workspace was refused with
    ConflictError ("could not be put back ... File name too long"), and every open
    reported ``file-undo-failed``.  Now a suffixed name keeps within NAME_MAX (the end of
    the name gives way to the suffix)."""
    root = str(tmp_path / "ws")
    name = "n" * 255
    build(root, {name: "committed\n"})
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with pytest.raises(walstore.FileConflictError):
            with s.transaction() as tx:
                f = tx.files(ws)
                sp = tx.savepoint("sp")
                f.write(name, "mine 1\n")
                with open(os.path.join(root, name), "w") as out:
                    out.write("theirs 1\n")
                with pytest.raises(walstore.FileConflictError):
                    tx.rollback_to(sp)
                f.write(name, "mine 2\n")
                with open(os.path.join(root, name), "w") as out:
                    out.write("theirs 2\n")
                tx.rollback()
        kept = sorted(os.listdir(os.path.join(str(tmp_path / "store"), "quarantine", "files",
                                              f"tx{tx.id}")))
        assert len(kept) == 2 and all(len(k) <= 255 for k in kept), kept
        with s.transaction() as tx2:  # the path is the stranger's now: no undo owed
            tx2.files(ws).write(name, "next\n")
    with walstore.open(str(tmp_path / "store")) as s:
        assert not [p for p in s.last_recovery.problems if p.kind == "file-undo-failed"]
    with open(os.path.join(root, name)) as f:
        assert f.read() == "next\n"


def test_a_path_written_twice_and_then_changed_by_another_process_is_one_conflict(tmp_path):
    """A transaction wrote a file twice (``v1``, then ``v2``) and another process then
    changed it: the rollback (newest first) found the path in neither of the second
    write's images, a conflict keeping that write's before-image — ``v1``, the
    transaction's own uncommitted bytes — at ``quarantine/files/tx<N>/<path>``, the place
    the docs name; then the first write's undo found it a conflict again and kept the
    committed content at ``<path>.1``.  Two conflicts for one path, the first (what
    ``FileConflictError`` and ``walstore recover`` show first) pointing the user at a
    version that never was committed.  The same at the open after a kill -9.  Now one
    conflict per path: walstore's version is the one the undo would have put back (the
    oldest before-image), kept at ``tx<N>/<path>``."""
    root = str(tmp_path / "ws")
    build(root, {"conf.toml": "committed\n"})
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with pytest.raises(walstore.FileConflictError) as got:
            with s.transaction() as tx:
                tx.files(ws).write("conf.toml", "v1\n")
                tx.files(ws).write("other", "x\n")
                tx.files(ws).write("conf.toml", "v2\n")
                with open(os.path.join(root, "conf.toml"), "w") as out:
                    out.write("theirs\n")
                tx.rollback()
        conflicts = got.value.conflicts
        assert len(conflicts) == 1, conflicts
        saved = conflicts[0]["saved_as"]
        assert saved == os.path.join(str(tmp_path / "store"), "quarantine", "files",
                                     f"tx{tx.id}", "conf.toml")
        with open(saved) as f:
            assert f.read() == "committed\n"
        assert [c["saved_as"] for c in s.file_conflicts()] == [saved]
    with open(os.path.join(root, "conf.toml")) as f:
        assert f.read() == "theirs\n"
    assert not os.path.exists(os.path.join(root, "other"))


CRASHED_WRITER = r"""
import os, sys, walstore
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2])
tx = store.transaction()
tx.files(ws).write("conf.toml", "v1\n")
tx.files(ws).write("conf.toml", "v2\n")
with open(os.path.join(sys.argv[2], "conf.toml"), "w") as out:
    out.write("theirs\n")
print("ready", flush=True)
import time; time.sleep(600)
"""


def test_the_open_after_a_kill_reports_one_conflict_per_path_with_the_committed_version(
        tmp_path):
    root = str(tmp_path / "ws")
    build(root, {"conf.toml": "committed\n"})
    store = str(tmp_path / "store")
    walstore.open(store).close()
    proc = subprocess.Popen([sys.executable, "-c", CRASHED_WRITER, store, root],
                            stdout=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
        proc.stdout.close()
    with walstore.open(store) as s:
        found = s.last_recovery.file_conflicts
        assert len(found) == 1, found
        with open(found[0]["saved_as"]) as f:
            assert f.read() == "committed\n"
    with open(os.path.join(root, "conf.toml")) as f:
        assert f.read() == "theirs\n"


MADE_READ_ONLY = r"""
import json, os, subprocess, sys, walstore
sys.path.insert(0, sys.argv[3])
from files_support import tree_state
root = sys.argv[2]
store = walstore.open(sys.argv[1], durability="none")
ws = store.workspace(root)
how = sys.argv[4]
before = tree_state(root)
out = {}
WATCHED = "mkdir -p out/sub && echo a > out/sub/a && echo b > out/b && chmod 555 out/sub out"
if how == "ops":           # a directory made, filled, made read-only; reverted
    with store.transaction() as tx:
        f = tx.files(ws)
        f.mkdir("out")
        f.write("out/sub/a", "a\n")
        f.write("out/b", "b\n")
        f.chmod("out/sub", 0o555)
        f.chmod("out", 0o555)
        f.chmod("ro", 0o755)          # from one read-only mode to another, edited between
        f.write("ro/y", "y\n")
        f.delete("ro/x")
        f.chmod("ro", 0o500)
    committed = tree_state(root)
    info = store.revert(tx.id)
    out["undone"] = tree_state(root) == before
    store.revert(info.txid, force=True)
    out["redone"] = tree_state(root) == committed
elif how == "watch-rollback":
    with store.transaction() as tx:
        with tx.files(ws).watch():
            subprocess.run(["sh", "-c", WATCHED], cwd=root, check=True)
        tx.rollback()
    out["undone"] = tree_state(root) == before
elif how == "watch-revert":
    with store.transaction() as tx:
        with tx.files(ws).watch():
            subprocess.run(["sh", "-c", WATCHED], cwd=root, check=True)
    store.revert(tx.id)
    out["undone"] = tree_state(root) == before
store.close()
print(json.dumps(out))
"""


@needs_setpriv
@pytest.mark.parametrize("how", ["ops", "watch-rollback", "watch-revert"])
def test_a_directory_made_and_filled_then_made_read_only_is_undone_as_a_user(tmp_path, how):
    """A directory the undone change MADE (an ``mkdir`` then writes in it, or a watched
    ``mkdir -p out/sub && ... && chmod 555 out/sub out``, a build output) and then made
    read-only: its contents must go before it, and without CAP_DAC_OVERRIDE nothing can
    be removed from a directory without owner write permission — the revert, or the
    rollback of the watch, failed with PermissionError (the docs listed it as missing).
    Now the undo opens it first (logged as a step of its own: a mode change), then
    empties and removes it."""
    root = str(tmp_path / "ws")
    build(root, {"keep": "k\n", "ro/x": "x\n"})
    os.chmod(os.path.join(root, "ro"), 0o555)
    before = tree_state(root)
    got = json.loads(_unprivileged(MADE_READ_ONLY, str(tmp_path / "store"), root,
                                   os.path.dirname(__file__), how))
    assert got and all(got.values()), got
    if how != "ops":
        assert tree_state(root) == before


@needs_setpriv
def test_a_read_only_tree_removed_is_put_back_by_a_revert_as_a_user(tmp_path):
    """The other way: a transaction removed a read-only tree (``rmtree``, with privileges),
    and a revert without them makes it anew: each directory made with its mode (0o555) could not
    take its files (PermissionError).  Now it is made writable by its owner, filled, and
    given its mode last."""
    root = str(tmp_path / "ws")
    store = str(tmp_path / "store")
    build(root, {"ro/sub/a": "a\n", "ro/b": "b\n", "keep": "k\n"})
    os.chmod(os.path.join(root, "ro/sub"), 0o555)
    os.chmod(os.path.join(root, "ro"), 0o555)
    before = tree_state(root)
    with walstore.open(store, durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as tx:
            tx.files(ws).rmtree("ro")
    assert b"ro" not in tree_state(root)
    script = (r"import sys, walstore" "\n"
              r"s = walstore.open(sys.argv[1], durability='none')" "\n"
              r"s.revert(int(sys.argv[2])); s.close()")
    _unprivileged(script, store, str(tx.id))
    assert tree_state(root) == before


KILLED_IN_WATCH = r"""
import os, subprocess, sys, walstore
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2])
tx = store.transaction()
with tx.files(ws).watch():
    subprocess.run(["sh", "-c", "mkdir -p out/sub && echo a > out/sub/a && "
                    "chmod 555 out/sub out && echo ready && sleep 600"], cwd=sys.argv[2])
"""


@needs_setpriv
def test_the_recovery_of_a_watch_killed_after_it_made_a_read_only_directory(tmp_path):
    """kill -9 of the agent while its watched build had made ``out/sub/a`` and made
    ``out/sub`` and ``out`` read-only: the open (recovery, which puts the tree back as
    before the watch) failed without CAP_DAC_OVERRIDE; the undo stayed owed
    (``file-undo-failed``) at every open."""
    root = str(tmp_path / "ws")
    store = str(tmp_path / "store")
    build(root, {"keep": "k\n"})
    before = tree_state(root)
    walstore.open(store).close()
    proc = subprocess.Popen(["setpriv", "--inh-caps=-all",
                             "--bounding-set=-dac_override,-dac_read_search,-fowner",
                             sys.executable, "-c", KILLED_IN_WATCH, store, root],
                            stdout=subprocess.PIPE, text=True, env=_child_env(),
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.killpg(proc.pid, 9)  # SIGKILL, the watched shell with it
        proc.wait(timeout=30)
        proc.stdout.close()
    assert b"out/sub/a" in tree_state(root)
    script = (r"import json, sys, walstore" "\n"
              r"s = walstore.open(sys.argv[1])" "\n"
              r"print(json.dumps([p.kind for p in s.last_recovery.problems])); s.close()")
    kinds = json.loads(_unprivileged(script, store))
    assert "file-undo-failed" not in kinds and "file-conflict" not in kinds, kinds
    assert tree_state(root) == before


@pytest.mark.parametrize("op", ["delete", "rename", "write", "rmtree", "chmod"])
def test_a_refused_file_operation_names_the_workspace_path_not_a_descriptor(tmp_path, op):
    """An operation the OS refused (a directory that cannot be changed: read-only to a
    user, immutable to root) raised an error naming ``/proc/self/fd/14/g`` (the pinned
    parent's descriptor, meaningless once the process is gone), a temp name there, or a
    bare ``b'g'``; and a refused rename read "cannot rename to 'b' 'a/f' in workspace
    ...".  Now the error names the path in the workspace, and a rename says what it
    moved where."""
    from files_support import Immutable
    root = str(tmp_path / "ws")
    build(root, {"d/f": "f\n", "d/sub/g": "g\n"})
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as tx:
            f = tx.files(ws)
            target = {"rmtree": "d/sub", "chmod": "d/sub/g"}.get(op, "d")
            target = os.path.join(root, target)
            with Immutable(target):
                with pytest.raises(OSError) as got:
                    if op == "delete":
                        f.delete("d/f")
                    elif op == "rename":
                        f.rename("d/f", "moved")
                    elif op == "write":
                        f.write("d/new", "x\n")
                    elif op == "rmtree":
                        f.rmtree("d/sub")
                    else:
                        f.chmod("d/sub/g", 0o600)
            tx.rollback()
    err = got.value
    assert "/proc/self/fd" not in str(err), str(err)
    assert isinstance(err.filename, str) and err.filename.startswith(root), err.filename
    assert "b'" not in str(err), str(err)
    if op == "rename":
        assert "cannot rename 'd/f' to 'moved' in workspace" in str(err), str(err)


UNREADABLE = r"""
import sys, walstore
s = walstore.open(sys.argv[1], durability="none")
ws = s.workspace(sys.argv[2])
with s.transaction() as tx:
    try:
        tx.files(ws).read("d/secret")
    except PermissionError as e:
        print(e.filename)
        print(str(e))
"""


@needs_setpriv
def test_reading_an_unreadable_file_names_it(tmp_path):
    """``tx.files(ws).read(p)`` of a file its user cannot read said only
    "[Errno 13] Permission denied: b'secret'": no workspace, no path (the file was opened
    relative to its pinned parent's descriptor)."""
    root = str(tmp_path / "ws")
    build(root, {"d/secret": "s\n"})
    os.chmod(os.path.join(root, "d/secret"), 0o000)
    name, text = _unprivileged(UNREADABLE, str(tmp_path / "store"), root).splitlines()
    assert name == os.path.join(root, "d/secret")
    assert "cannot read 'd/secret' in workspace" in text and "b'" not in text, text


OPENED_AND_CLOSED = r"""
import json, sys, walstore
sys.path.insert(0, sys.argv[3])
from files_support import tree_state
root = sys.argv[2]
store = walstore.open(sys.argv[1], durability="none")
ws = store.workspace(root)
before = tree_state(root)
store.restore_point("p")
with store.transaction() as tx:
    f = tx.files(ws)
    f.chmod("ro", 0o755); f.write("ro/y", "y\n"); f.delete("ro/x"); f.chmod("ro", 0o555)
    f.chmod("ro/deep", 0o755); f.write("ro/deep/w", "w\n"); f.chmod("ro/deep", 0o555)
committed = tree_state(root)
out = {"plan": store.revert(tx.id, dry_run=True).files}
info = store.revert(tx.id) if sys.argv[4] == "revert" else store.rewind("p")
out["undone"] = tree_state(root) == before
store.revert(info.txid, force=True)
out["redone"] = tree_state(root) == committed
out["conflicts"] = store.file_conflicts()
store.close()
print(json.dumps(out))
"""


@needs_setpriv
@pytest.mark.parametrize("how", ["revert", "rewind"])
def test_a_read_only_directory_opened_edited_and_closed_again_is_reverted_as_a_user(
        tmp_path, how):
    """The everyday form: ``chmod u+w ro; write ro/y; delete ro/x; chmod u-w ro`` (a
    read-only directory opened for an edit and closed again).  ``ro`` ends in its mode
    of before, so the revert's plan dropped it ("already there"), and without
    CAP_DAC_OVERRIDE the revert or rewind could not remove ``ro/y`` nor put ``ro/x``
    back in it: PermissionError.  Now such a directory stays in the undo as a passage,
    opened first and closed last (not listed among the plan's files)."""
    root = str(tmp_path / "ws")
    build(root, {"ro/x": "x\n", "ro/deep/z": "z\n"})
    os.chmod(os.path.join(root, "ro/deep"), 0o555)
    os.chmod(os.path.join(root, "ro"), 0o555)
    got = json.loads(_unprivileged(OPENED_AND_CLOSED, str(tmp_path / "store"), root,
                                   os.path.dirname(__file__), how))
    assert got["plan"] == [os.path.join(root, p) for p in ("ro/deep/w", "ro/x", "ro/y")]
    assert got["undone"] and got["redone"] and not got["conflicts"], got


WATCHED_OPEN_CLOSE = r"""
import json, subprocess, sys, walstore
sys.path.insert(0, sys.argv[3])
from files_support import tree_state
root = sys.argv[2]
store = walstore.open(sys.argv[1], durability="none")
ws = store.workspace(root)
before = tree_state(root)
CMD = "chmod u+w ro && echo y > ro/y && rm ro/x && chmod u-w ro"
out = {}
with store.transaction() as tx:
    with tx.files(ws).watch() as w:
        subprocess.run(["sh", "-c", CMD], cwd=root, check=True)
    out["changes"] = sorted(c.path.decode() for c in w.changes)
    tx.rollback()
out["rolled_back"] = tree_state(root) == before
with store.transaction() as tx:
    with tx.files(ws).watch():
        subprocess.run(["sh", "-c", CMD], cwd=root, check=True)
store.revert(tx.id)
out["reverted"] = tree_state(root) == before
out["conflicts"] = store.file_conflicts()
store.close()
print(json.dumps(out))
"""


@needs_setpriv
def test_a_watched_open_edit_close_of_a_read_only_directory_is_undone_as_a_user(tmp_path):
    """The same inside a watch: ``chmod u+w ro && echo y > ro/y && rm ro/x && chmod u-w
    ro`` leaves ``ro`` as it was, so no step named it, and its rollback (or a revert of
    the commit) could not remove ``ro/y`` without CAP_DAC_OVERRIDE: PermissionError (the
    docs listed it as missing).  Now the watch's undo opens and closes ``ro`` around
    what it puts back in it (``watch.passages``); the block's changes are still just the
    two files."""
    root = str(tmp_path / "ws")
    build(root, {"ro/x": "x\n", "keep": "k\n"})
    os.chmod(os.path.join(root, "ro"), 0o555)
    got = json.loads(_unprivileged(WATCHED_OPEN_CLOSE, str(tmp_path / "store"), root,
                                   os.path.dirname(__file__)))
    assert got["changes"] == ["ro/x", "ro/y"]
    assert got["rolled_back"] and got["reverted"] and not got["conflicts"], got


def test_a_watch_in_a_read_only_directory_by_root_is_no_later_writer_of_it(tmp_path):
    """The passages are for processes that permission bits stop: root's watch writing
    into a read-only directory logs no step of it, so a revert of the older transaction
    that made the directory read-only is not refused naming the watch as a later writer
    of the directory (it changed only a file in it)."""
    if not __import__("walstore.files.apply", fromlist=["x"]).overrides_modes():
        pytest.skip("needs CAP_DAC_OVERRIDE")
    root = str(tmp_path / "ws")
    build(root, {"ro/x": "x\n"})
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as t1:
            t1.files(ws).chmod("ro", 0o555)
        with s.transaction() as t2:
            with t2.files(ws).watch():
                subprocess.run(["sh", "-c", "echo y > ro/y"], cwd=root, check=True)
        s.revert(t1.id)
        assert tree_state(root)[b"ro"] == ("dir", 0o755)
        assert tree_state(root)[b"ro/y"][0] == "file"


RO_CHILD = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
sys.path.insert(0, os.path.join(spec["here"], "agent_scripts"))
import walstore
from walstore import fileio
from files_child import Stopper
if spec["job"] == "setup":
    s = walstore.open(spec["store"]); ws = s.workspace(spec["ws"])
    with s.transaction() as tx:
        f = tx.files(ws)
        f.mkdir("out"); f.write("out/sub/a", "a\n"); f.write("out/b", "b\n")
        f.chmod("out/sub", 0o555); f.chmod("out", 0o555)
        f.chmod("ro", 0o755); f.write("ro/y", "y\n"); f.delete("ro/x"); f.chmod("ro", 0o555)
        f.chmod("r5", 0o755); f.write("r5/q", "q\n"); f.chmod("r5", 0o500)
        tx.put("k", 1)
    print(json.dumps({"txid": tx.id})); s.close(); sys.exit(0)
if spec["job"] == "check":
    s = walstore.open(spec["store"])
    print(json.dumps({"k": s.get("k"), "conf": s.last_recovery.file_conflicts,
                      "probs": [p.kind for p in s.last_recovery.problems]}))
    s.close(); sys.exit(0)
b = Stopper(spec.get("stop", 0)); fileio.set_backend(b)
s = walstore.open(spec["store"], apply_interval=3600)
b.armed = True
s.revert(spec["txid"])
print("COMMITTED", flush=True); print(f"CALLS {b.n}", flush=True); os._exit(0)
"""

UNPRIVILEGED = ["setpriv", "--inh-caps=-all",
                "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@needs_setpriv
def test_kill_at_every_step_of_a_users_revert_through_read_only_directories(
        tmp_path, monkeypatch):
    """kill -9 of a user's revert of the read-only cases above (a directory made, filled
    and made read-only; one opened, edited and closed; one from 0o555 to 0o500) before
    its seam calls (every third, the first and last among them): the next open, as the
    user, ends with the committed tree (the revert not committed) or the tree before
    the transaction (committed), no conflict, nothing owed — the opening and closing
    steps are walstore's own, undone and recovered like any other."""
    import test_files_crash as tfc
    here = os.path.dirname(os.path.abspath(__file__))
    child = tmp_path / "ro_child.py"
    child.write_text(RO_CHILD)
    wrapper = tmp_path / "python-as-user"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(UNPRIVILEGED) + " "
                       + sys.executable + ' "$@"\n')
    wrapper.chmod(0o755)

    def as_user(spec: dict) -> dict:
        got = subprocess.run([str(wrapper), str(child), json.dumps(dict(spec, here=here))],
                             capture_output=True, text=True, env=_child_env(), timeout=120)
        assert got.returncode == 0, got.stderr[-2000:]
        return json.loads(got.stdout)

    def prep(base):
        ws = base / "ws"
        build(str(ws), {"keep": "k\n", "ro/x": "x\n", "r5/p": "p\n"})
        os.chmod(ws / "ro", 0o555)
        os.chmod(ws / "r5", 0o555)
        pre = tree_state(str(ws))
        txid = as_user({"job": "setup", "store": str(base / "store"), "ws": str(ws)})["txid"]
        return str(base / "store"), str(ws), pre, tree_state(str(ws)), txid

    monkeypatch.setattr(sys, "executable", str(wrapper))  # (run_child's children: as the user)
    store, ws, pre, post, txid = prep(tmp_path / "count")
    spec = {"job": "revert", "store": store, "ws": ws, "txid": txid, "here": here}
    calls = tfc.run_child(dict(spec), child=child)["calls"]
    assert calls and calls > 10
    assert tree_state(ws) == pre
    outcomes = {"reverted": 0, "not": 0}
    for n in tfc.kill_points(calls):
        store, ws, pre, post, txid = prep(tmp_path / f"k{n}")
        got = tfc.run_child({"job": "revert", "store": store, "ws": ws, "txid": txid,
                             "stop": n, "here": here}, child=child)
        assert got["stopped"], (n, got)
        after = as_user({"job": "check", "store": store})
        assert not after["conf"] and set(after["probs"]) <= {"torn-tail"}, (n, after)
        reverted = after["k"] is None
        outcomes["reverted" if reverted else "not"] += 1
        assert tree_state(ws) == (pre if reverted else post), (n, got["stopped"])
    assert outcomes["not"], outcomes


def test_a_later_writer_of_a_file_is_named_as_such(tmp_path):
    """A revert refused because a later transaction changed the same FILE said "later
    transactions [2] changed the same keys": the user looked for keys that neither
    transaction wrote.  Now "the same keys or files"."""
    root = str(tmp_path / "ws")
    build(root, {"d/f": "f\n"})
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as t1:
            t1.files(ws).rename("d", "e")
        with s.transaction() as t2:
            t2.files(ws).write("e/f", "later\n")
        with pytest.raises(walstore.RevertConflict) as got:
            s.revert(t1.id)
        assert got.value.txids == [t2.id]
        assert "changed the same keys or files" in str(got.value), str(got.value)


def test_live_reads_follow_a_final_symlink_inside_and_past_reads_never_do(tmp_path):
    root = str(tmp_path / "ws")
    build(root, {"d/f": "f\n"})
    with walstore.open(str(tmp_path / "store"), durability="none") as s:
        ws = s.workspace(root)
        with s.transaction() as tx:
            tx.files(ws).symlink("l", "d/f")
            tx.files(ws).symlink("ld", "d")
            tx.files(ws).symlink("out", "/etc/hostname")
            assert tx.files(ws).read("l") == b"f\n"
            assert tx.files(ws).listdir("ld") == ["f"]
            with pytest.raises(ValueError):
                tx.files(ws).read("out")
        with pytest.raises(ValueError):
            s.at(tx.id).files(ws).read("l")
        with pytest.raises(ValueError):
            s.at(tx.id).files(ws).read("ld/f")
