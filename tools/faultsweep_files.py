"""Fault sweep for file workspaces: one fault at a time at every I/O call of a files workload.

This tool owns the proof that the files on disk in a workspace, the store's state and an
outside ledger of side effects agree after any single I/O fault (contract "Reversible
files", section 2 "the commit point", section 4 promise 6).  It is ``tools/faultsweep.py``
(whose counting run, one run per fault, reopen and checks of keys, actions, ledger,
foreign exceptions, fsync rules and ``verify`` it reuses) with a workload of file
transactions (``FilesWorkload``) in a workspace built fresh for each run, and two more
checks on the reopened store (``FilesWorkload.check_reopened``):

- the workspace, walked by ``tests/files_support.tree_state`` (type, mode, content hash,
  symlink target, empty directories; never walstore's code), is byte-exact the tree the
  visible commits make (``expected_tree``: the initial tree plus each visible, not undone
  transaction's operations replayed on a model; every transaction works in a directory
  of its own, so the order and the undone ones do not matter); no file conflict is
  reported and no file undo is left owed (nothing changed the tree behind walstore's
  back); the reopened store takes a new file write;
- a failed fsync of the blob store is never followed by another fsync of it in that
  process, and one of a workspace file fails only its operation (not the store), instead
  of the log's rule (nothing acknowledged after it).

The workload, each transaction charging the ledger through an action with a ``refund``
compensation: a commit of every operation kind (overwrite with a new mode, a write that
creates parents, delete, rename, mkdir, chmod, symlink, rmtree of an empty and a full
directory); one that rolls back (an exception); one with ``rollback_to`` a savepoint; a
``watch()`` of a real subprocess creating, appending to, deleting, chmod-ing files, making
a directory and a symlink; a commit then ``revert``-ed; a restore point, two commits and a
``rewind`` to it; a checkpoint (the blob store's gc); a transaction left in flight, then a
crash (the store dropped as a killed process would) and a reopen whose recovery puts its
files back and refunds its charge; a last commit, a close.

Sites: the file calls of ``walstore.fileio`` and the files package's ``mkdir``, ``rmdir``,
``symlink``, ``chmod`` and ``fchmod`` (``FilesFaultBackend``), ENOSPC and EIO each; every
LMDB commit and sync; every fault point hit.

    python tools/faultsweep_files.py                    # every fault, prints the totals
    python tools/faultsweep_files.py --stride 5 --jobs 2
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import walstore  # noqa: E402
from files_support import Dir, File, Link, age, build, describe_differences, tree_state  # noqa: E402
from tools.faults import Call, FaultBackend, real_path  # noqa: E402
from tools.faultsweep import (Abandon, Op, Workload, _phase_end, check_fsync_failure,  # noqa: E402
                              main)

Tree = dict[bytes, tuple]
FileStep = tuple  # ("write", path, data, mode|None) | ("delete", path) | ("rename", a, b)
#                   | ("mkdir", path, mode|None) | ("rmtree", path) | ("chmod", path, mode)
#                   | ("symlink", path, target)


class FilesFaultBackend(FaultBackend):
    """A FaultBackend that also sees (and can fail) the files package's directory,
    symlink and mode calls (``walstore.files.fsops``: sites ``mkdir``, ``rmdir``,
    ``symlink``, ``chmod``, ``fchmod``).

    Its syncs are logged and can fail as FaultBackend's, but a sync that is not failed
    only checks its descriptor (or opens and closes its directory) instead of waiting for
    the disk (``real_syncs = False``): the sweep's crash is a killed process's, whose
    page cache survives, so what a run leaves and every check of it are the same; the
    ~200 real fsyncs of a run were two thirds of its time."""

    real_syncs = False

    def _sync(self, op: str, fd: int | None, path: str | None, real) -> None:
        if not self.real_syncs:
            real = ((lambda: os.fstat(fd)) if fd is not None else
                    (lambda: os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY)))
                    if op == "fsync_dir" else (lambda: os.stat(path)))
        super()._sync(op, fd, path, real)

    def _dir_call(self, op: str, path: Any, real: Callable[[], None],
                  fd: int | None = None) -> None:
        p = None if path is None else real_path(os.fsdecode(path))
        call = Call(0, op, p, fd=fd)
        rule = self._check(op, (p,), call)
        if rule is not None:
            self._raise(rule, p)
        try:
            real()
        except OSError as e:
            call.error = e.errno
            raise

    def mkdir(self, path, mode: int) -> None:
        self._dir_call("mkdir", path, lambda: os.mkdir(path, mode))

    def rmdir(self, path) -> None:
        self._dir_call("rmdir", path, lambda: os.rmdir(path))

    def symlink(self, target, path) -> None:
        self._dir_call("symlink", path, lambda: os.symlink(target, path))

    def chmod(self, path, mode: int) -> None:
        self._dir_call("chmod", path, lambda: os.chmod(path, mode))

    def fchmod(self, fd: int, mode: int) -> None:
        self._dir_call("fchmod", self.path_of(fd), lambda: os.fchmod(fd, mode), fd)


# ---- the model of a tree -------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()
FILE_DEFAULT, DIR_DEFAULT = 0o666 & ~UMASK, 0o777 & ~UMASK


def _b(path: str | bytes) -> bytes:
    return os.fsencode(path)


def _file(data: bytes, mode: int) -> tuple:
    return ("file", mode, len(data), hashlib.sha256(data).hexdigest())


def _parents(tree: Tree, path: bytes) -> None:
    """Missing parents of ``path`` made as ``write``/``rename``/``mkdir`` make them."""
    parts = path.split(b"/")[:-1]
    for i in range(1, len(parts) + 1):
        tree.setdefault(b"/".join(parts[:i]), ("dir", DIR_DEFAULT))


def _subtree(tree: Tree, path: bytes) -> list[bytes]:
    return [p for p in tree if p == path or p.startswith(path + b"/")]


def apply_step(tree: Tree, step: FileStep) -> None:
    """What one operation does to the model (as tree_state shows it)."""
    op, path = step[0], _b(step[1])
    if op == "write":
        data = step[2].encode() if isinstance(step[2], str) else step[2]
        old = tree.get(path)
        mode = step[3] if step[3] is not None else old[1] if old else FILE_DEFAULT
        _parents(tree, path)
        tree[path] = _file(data, mode)
    elif op == "delete":
        del tree[path]
    elif op == "rename":
        dst = _b(step[2])
        _parents(tree, dst)
        for p in _subtree(tree, path):
            tree[dst + p[len(path):]] = tree.pop(p)
    elif op == "mkdir":
        _parents(tree, path)
        tree[path] = ("dir", step[2] if step[2] is not None else DIR_DEFAULT)
    elif op == "rmtree":
        for p in _subtree(tree, path):
            del tree[p]
    elif op == "chmod":
        tree[path] = (tree[path][0], step[2]) + tree[path][2:]
    elif op == "symlink":
        _parents(tree, path)
        tree[path] = ("symlink", _b(step[2]))
    else:
        raise ValueError(f"unknown step {op}")


def run_step(f, step: FileStep) -> None:
    """The same operation through ``tx.files(ws)``."""
    op = step[0]
    if op == "write":
        f.write(step[1], step[2], mode=step[3])
    elif op == "delete":
        f.delete(step[1])
    elif op == "rename":
        f.rename(step[1], step[2])
    elif op == "mkdir":
        f.mkdir(step[1], mode=step[2])
    elif op == "rmtree":
        f.rmtree(step[1])
    elif op == "chmod":
        f.chmod(step[1], step[2])
    elif op == "symlink":
        f.symlink(step[1], step[2])


def model_of(spec: dict) -> Tree:
    """The model of the tree ``files_support.build(root, spec)`` makes."""
    tree: Tree = {}
    for rel, what in spec.items():
        p = _b(rel)
        _parents(tree, p)
        if isinstance(what, Dir):
            tree[p] = ("dir", what.mode)
        elif isinstance(what, Link):
            tree[p] = ("symlink", _b(what.target))
        else:
            f = what if isinstance(what, File) else File(what)
            data = f.content.encode() if isinstance(f.content, str) else f.content
            tree[p] = _file(data, f.mode)
    return tree


# ---- the workload --------------------------------------------------------------------------
INITIAL = {
    "keep.txt": "never touched\n",
    "c1/a.txt": File("a v1\n", 0o644), "c1/b.txt": "b v1\n", "c1/old.txt": "old\n",
    "c1/run.sh": File("#!/bin/sh\necho run\n", 0o755), "c1/empty": Dir(0o750),
    "c1/full/x.txt": "x\n", "c1/full/deeper/y.txt": "y\n", "c1/link": Link("a.txt"),
    "rb/r.txt": "r v1\n", "rb/s.txt": "s v1\n",
    "sp/s.txt": "s v1\n", "sp/t.txt": "t v1\n",
    "w/edit.txt": "edit v1\n", "w/gone.txt": "gone\n", "w/mode.sh": File("#!/bin/sh\n", 0o755),
    "rev/v.txt": "v v1\n",
    "rw1/p.txt": "p v1\n", "rw2/q.txt": File("q v1\n", 0o600),
    "lost/l.txt": "l v1\n", "lost/m.txt": "m v1\n",
    "c3/z.txt": "z v1\n",
}
BIG = bytes(range(256)) * 48  # 12 KiB: several writes

C1: list[FileStep] = [
    ("write", "c1/a.txt", "a v2, longer than before\n", 0o600),
    ("write", "c1/new/deep/n.txt", BIG, None),
    ("delete", "c1/old.txt"),
    ("rename", "c1/b.txt", "c1/moved/b2.txt"),
    ("mkdir", "c1/made", 0o711),
    ("chmod", "c1/run.sh", 0o700),
    ("symlink", "c1/ln", "a.txt"),
    ("rmtree", "c1/empty"),
    ("rmtree", "c1/full"),
    ("delete", "c1/link"),
]
RB: list[FileStep] = [("write", "rb/r.txt", "r v2\n", None), ("delete", "rb/s.txt"),
                      ("mkdir", "rb/d", None), ("write", "rb/d/new.txt", "new\n", 0o640)]
SP_BEFORE: list[FileStep] = [("write", "sp/s.txt", "s v2\n", None)]
SP_UNDONE: list[FileStep] = [("write", "sp/t.txt", "t v2\n", None), ("delete", "sp/s.txt"),
                             ("mkdir", "sp/gone", None)]
SP_AFTER: list[FileStep] = [("mkdir", "sp/after", 0o700), ("rename", "sp/t.txt", "sp/t2.txt")]
WATCH_SCRIPT = ("echo new > w/fresh.txt; echo more >> w/edit.txt; rm w/gone.txt; "
                "chmod 700 w/mode.sh; mkdir w/newdir; ln -s edit.txt w/lnk")
WATCH: list[FileStep] = [("write", "w/fresh.txt", "new\n", None),
                         ("write", "w/edit.txt", "edit v1\nmore\n", None),
                         ("delete", "w/gone.txt"), ("chmod", "w/mode.sh", 0o700),
                         ("mkdir", "w/newdir", None), ("symlink", "w/lnk", "edit.txt")]
REV_T: list[FileStep] = [("write", "rev/v.txt", "v v2\n", 0o640), ("write", "rev/n.txt", BIG, None)]
RW1: list[FileStep] = [("write", "rw1/p.txt", "p v2\n", None), ("mkdir", "rw1/sub", None),
                       ("symlink", "rw1/sub/l", "../p.txt")]
RW2: list[FileStep] = [("rename", "rw2/q.txt", "rw2/q2.txt"), ("chmod", "rw2/q2.txt", 0o644)]
LOST: list[FileStep] = [("write", "lost/l.txt", "l v2\n", None), ("delete", "lost/m.txt"),
                        ("write", "lost/sub/new.txt", BIG, None)]
C3: list[FileStep] = [("write", "c3/z.txt", "z v2\n", None), ("write", "c3/y.txt", "y\n", None),
                      ("rename", "c3/z.txt", "c3/z2.txt")]


@dataclass
class FileOp(Op):
    """An Op (tools/faultsweep.py) whose commit also leaves file operations."""

    files: list = field(default_factory=list)  # FileSteps it leaves when visible


class FilesWorkload(Workload):
    """The files workload (see the module docstring); ``ops`` as faultsweep's."""

    backend = FilesFaultBackend

    def __init__(self, path: str, ledger: str, clock: Callable[[], int] = lambda: 0) -> None:
        super().__init__(path, ledger, clock)
        self.root = os.path.join(os.path.dirname(path), "ws")
        self.ws: Any = None

    def run(self) -> None:
        build(self.root, INITIAL)
        age(self.root)
        super().run()

    def phase_one(self, s) -> None:
        self.plain_step("register", lambda: setattr(self, "ws", s.workspace(self.root)))
        self.files_tx(s, "c1", 10, C1)
        self.files_tx(s, "rb", 11, RB, abandon=True)
        self.savepoint_tx(s, "sp")
        self.watch_tx(s, "watch", 13)
        self.files_tx(s, "rev-t", 14, REV_T)
        self.files_revert(s, "rev", "rev-t")
        self.plain_step("rp", lambda: s.restore_point("rp"))
        self.files_tx(s, "rw1", 15, RW1)
        self.files_tx(s, "rw2", 16, RW2)
        self.rewind(s, "rew", "rp", ("rw1", "rw2"))
        self.plain_step("checkpoint", s.checkpoint)
        self.files_loser(s, "lost", 17)

    def phase_two(self, s) -> None:
        self.files_tx(s, "c3", 18, C3)

    # ---- steps ------------------------------------------------------------------------------
    def plain_step(self, label: str, fn: Callable[[], Any]) -> None:
        """A step that commits nothing of the model's (its exceptions classified, as an
        Op's: a foreign one is reported)."""
        self._attempt(Op(label, "step", commits=False), fn)

    def _files(self, tx):
        return tx.files(self.ws if self.ws is not None else self.root)

    def files_tx(self, s, label: str, amount: int, steps: list, abandon: bool = False) -> None:
        """A charge, ``steps`` and a key; commits (or, ``abandon``: raises, rolls back)."""
        op = FileOp(label, "rollback" if abandon else "commit", {f"files/{label}": amount},
                    files=[] if abandon else steps)

        def run() -> None:
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, amount)
                f = self._files(tx)
                for st in steps:
                    run_step(f, st)
                tx.put(f"files/{label}", amount)
                if abandon:
                    self._charge(tx, amount + 100)
                    raise Abandon()
        self._attempt(op, run)

    def savepoint_tx(self, s, label: str) -> None:
        """Steps, a savepoint, a charge and steps rolled back to it, steps, commit."""
        op = FileOp(label, "commit", {f"files/{label}": 12}, files=SP_BEFORE + SP_AFTER)

        def run() -> None:
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, 12)
                f = self._files(tx)
                for st in SP_BEFORE:
                    run_step(f, st)
                sp = tx.savepoint("plan-b")
                self._charge(tx, 112)
                for st in SP_UNDONE:
                    run_step(f, st)
                tx.rollback_to(sp)
                for st in SP_AFTER:
                    run_step(f, st)
                tx.put(f"files/{label}", 12)
        self._attempt(op, run)

    def watch_tx(self, s, label: str, amount: int) -> None:
        """A charge, then a real subprocess changing the tree inside ``watch()``."""
        op = FileOp(label, "commit", {f"files/{label}": amount}, files=WATCH)

        def run() -> None:
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, amount)
                with self._files(tx).watch():
                    subprocess.run(["sh", "-c", WATCH_SCRIPT], cwd=self.root, check=True)
                tx.put(f"files/{label}", amount)
        self._attempt(op, run)

    def files_revert(self, s, label: str, target: str) -> None:
        if self.by_label[target].txid is None:  # its transaction never began: no revert
            return
        self.revert(s, label, target)

    def files_loser(self, s, label: str, amount: int) -> None:
        """A charge and file changes, never committed: the crash makes it a loser."""
        op = FileOp(label, "loser")

        def run() -> None:
            tx = s.transaction(meta={"op": label})
            op.txid = tx.id
            self._in_flight = tx  # kept referenced until the crash
            self._charge(tx, amount)
            f = self._files(tx)
            for st in LOST:
                run_step(f, st)
            tx.put(f"files/{label}", amount)
        self._attempt(op, run)

    # ---- checks -----------------------------------------------------------------------------
    def expected_tree(self, visible: set[str]) -> Tree:
        """The initial tree with the operations of every visible commit not undone by a
        visible undo (each transaction has a directory of its own: order-free)."""
        undone = {t for op in self.ops if op.label in visible and op.kind == "undo"
                  for t in op.undoes}
        tree = model_of(INITIAL)
        for op in self.ops:
            if (op.label in visible and op.label not in undone and op.kind == "commit"
                    and isinstance(op, FileOp)):
                for st in op.files:
                    apply_step(tree, st)
        return tree

    def check_reopened(self, store, out: dict) -> None:
        errors = out["errors"]
        visible = {i.meta.get("op") for i in store.log() if isinstance(i.meta, dict)}
        diffs = describe_differences(tree_state(self.root), self.expected_tree(visible))
        if diffs:
            errors.append(f"the workspace is not the tree of the visible commits: {diffs[:4]}")
        conflicts = store.file_conflicts()
        if conflicts:
            errors.append(f"file conflicts though nothing changed the tree behind walstore's "
                          f"back: {conflicts[:2]}")
        owed = store._files.owed_rows()
        if owed:
            errors.append(f"file undo still owed after the reopen: {len(owed)} row(s)")
        try:
            with store.transaction() as tx:
                tx.files(self.root).write("after-fault.txt", "ok\n")
        except walstore.WalstoreError as e:
            errors.append(f"a file write after reopening failed: {type(e).__name__}: {e}")
        else:
            with open(os.path.join(self.root, "after-fault.txt"), "rb") as fh:
                if fh.read() != b"ok\n":
                    errors.append("a file write after reopening left other bytes")

    def check_failed_sync(self, fb: FaultBackend, rule, site: str, out: dict) -> None:
        """The log's and LMDB's rule for their own files.  For the blob store's (its
        failure is final until a reopen): no content stored again in that process (no
        fsync of a blob's temp) and the failed path never synced again (the gc's fsync of
        a directory it removed blobs from is not a retry).  For a workspace file: only
        its operation (or commit) fails, as the tree and the actions show."""
        failed = rule.failed_calls[0]
        path = failed.path or ""
        blobs = os.path.join(self.path, "files") + os.sep
        if path.startswith((os.path.realpath(self.root) + os.sep, self.root + os.sep)):
            return
        if not path.startswith(blobs):
            check_fsync_failure(self, fb, rule, site, out)
            return
        end = _phase_end(self, failed.seq)
        again = [c for c in fb.calls_to(("fsync", "fdatasync", "fsync_dir"), after=failed.seq)
                 if c.seq < end and (c.path == path or c.op != "fsync_dir"
                                     and (c.path or "").startswith(blobs))]
        if again:
            out["errors"].append(f"the blob store synced again ({len(again)}x: "
                                 f"{sorted({c.op for c in again})}) after a failed {site} of "
                                 f"{os.path.basename(path)}")


if __name__ == "__main__":
    main(FilesWorkload, __doc__)
