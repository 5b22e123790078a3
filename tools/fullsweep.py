"""Full-disk sweep: a real writer process runs out of space on a real (tmpfs) disk.

This tool owns the proof of contract section 4, promise 6 ("a disk full fails the
transaction in hand with a clear error and leaves every earlier commit intact") on a REAL
full disk.  tools/faultsweep.py injects ENOSPC at one walstore I/O call at a time, through
walstore's own seam (walstore/fileio.py); LMDB's page writes never pass through that seam,
and a real full disk hits every writer at once: WAL segment creation, the background spare
fill, the applier's LMDB commits and map growth, checkpoints, quarantine and temp files.

For each of ``--levels`` fill levels (bytes left free, spread from ~0 to ``--max-free``,
jittered by ``--seed``) and each of two modes, it mounts one small tmpfs (as root; exit 2
when mounting is not permitted; always unmounted), creates a store on it, fills the rest
with a file until only that much is free, and runs a writer in a REAL subprocess
(``--writer``, the agent-like workload of ``SweepWorkload``: durable transactions of puts
of 100 B .. 64 KiB values, actions charging an outside ledger with ``compensate="refund"``,
savepoints and ``rollback_to``, rollbacks, ``revert`` and ``rewind``, checkpoints; small
segments and ``checkpoint_bytes`` so the applier, rotation, the spare and trimming run).
The ledger (tests/agent_scripts/ws_ledger.py) and the writer's record of every attempted
operation and its outcome (fsynced before the writer goes on) live on a normal disk.
At the first error the writer notes it, then

- mode ``stop``: tries a few more operations (refused cleanly, or acknowledged?);
- mode ``free``: deletes the fill file and goes on in the same process without reopening
  (the store may recover by itself or refuse until reopened: either is right);

and ends by a clean ``close()`` or by ``kill -9`` of itself (alternately; runs also
alternate 1 and 4 MiB segments, and LMDB's default map or a 2 MiB one that must grow).
Then the sweep runs ``walstore recover --json`` before the fill is deleted: a closed store
on the disk as full as the writer left it (it must recover, or refuse in one line, exit
1, no traceback); a killed writer's with 3 MiB free (``--recover-room``; every other
level: one segment's size and 256 KiB, room for a spare or for recovery's LMDB writes,
not both), plus room for the segment recovery may have to start (four times the last
one: the CLI opens with the default segment_size) — it must recover.  Then it deletes
the fill, runs ``walstore recover --json`` again, opens the store with the ``refund``
compensator registered and checks (the checks of tools/faultsweep.py,
``_check_open_store``): every acknowledged commit is visible with its values, nothing is
visible that reported a failure or never ran, the state is what the visible commits and
undos make it, ``store.actions()`` agrees with the ledger exactly (visible transactions'
actions committed and not refunded; every charge of one not visible refunded once or
listed pending; no charge without its action); then ``walstore verify`` passes, no
``*.tmp`` file but the spare is left in the store, no CLI printed a traceback, the writer
exited as it should (0 after close, SIGKILL), and every error the writer saw was a
walstore error (a StoreIOError carrying an errno; never a bare lmdb.Error / OSError /
struct.error) with a one-line message that names the cause (ENOSPC, no space, bytes
free).  A writer that ran ``MAX_OPS`` operations without an error is reported as such (the
disk never filled: the totals count the runs that did).

``--workload files`` runs tools/faultsweep_files.py's file transactions instead
(``FilesSweepWorkload``), with the workspace (``mnt/ws``) beside the store on the same
tmpfs: an agent's repository and its state on one disk.  In cycles, each under ``k<c>/``
of the workspace: a seed transaction makes faultsweep_files' initial tree and two bulk
files (1 KiB .. 512 KiB), a transaction overwrites one and deletes the other (their
before-images fill the blob store), then in turn faultsweep_files' C1 (write, delete,
rename, mkdir, rmtree, chmod, symlink), a rollback, a savepoint and ``rollback_to``, a
``watch()`` of a real ``sh`` changing the tree (the tool failing on the full disk: the
agent gives up, a rollback that must put its changes back), a commit then ``revert``-ed,
a restore point, two commits and a ``rewind``, a checkpoint (the blob gc); each charges
the ledger through an action.  A writer ending by kill leaves a file transaction in flight
(recovery must put its files back).  Both modes, the same recoveries; then, besides the
checks above: faultsweep_files' ``check_reopened`` (the workspace, walked by
tests/files_support.tree_state, byte for byte the tree the visible, not undone commits
make from an empty one, applied in the order they ran; no file conflict; no file undo
owed; a new file write works), no blob temp file (``files/blobs/tmp``) and no walstore
temp name in the workspace (the tree check), nothing on the tmpfs but ``store`` and
``ws``, nothing in the writer's TMPDIR.  The first error's site is then also
``workspace`` (a file of the workspace) or ``blobs`` (the store's blob store).

Per level it prints a line on stderr (``--json``: one JSON document on stdout at the end,
else the totals); exit 1 when a problem was found, 2 when it cannot run.

    python tools/fullsweep.py                          # 24 levels x 2 modes, ~0 .. 12 MiB
    python tools/fullsweep.py --levels 40 --seed 7 --json
    python tools/fullsweep.py --workload files --levels 30 --seed 65
"""
from __future__ import annotations

import argparse
import base64
import errno
import faulthandler
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tools.faultsweep import Abandon, Op, Workload, _check_open_store, acknowledged  # noqa: E402
from tools import faultsweep_files as ffiles  # noqa: E402
import ws_ledger  # noqa: E402  (tools.faultsweep put tests/agent_scripts on the path)
import walstore  # noqa: E402
from walstore.log.segment import SPARE_MIN_HEADROOM  # noqa: E402
from walstore import fileio  # noqa: E402

MiB = 1024 * 1024
TMPFS_SIZE = 48 * MiB
# small segments and checkpoints: rotations, spares, checkpoints and trims all happen
# within a few megabytes; the applier writes LMDB in the background as it does by default
OPTS = dict(durability="full", segment_size=1 * MiB, checkpoint_bytes=256 * 1024)
SEGMENT_SIZES = (1 * MiB, 4 * MiB)  # (runs alternate: trimmed often; a spare as big as CI's)
RECOVER_ROOM = 3 * MiB  # a killed writer's store is recovered with this much free, or
SPARE_ROOM = 256 * 1024  # (every other one) with a segment's size and this much: room for a
# spare, or for recovery's LMDB writes, not for both; and in both cases with room for the
# segment recovery may have to start beside that (its last one full): `walstore recover`
# opens with the default segment_size, so four times the last one (next_segment_size)
CLI_SEGMENT_SIZE = 16 * MiB
MAX_OPS = 3000          # a run that never fills the disk stops here
AFTER = {"stop": 4, "free": 10}  # operations tried after the first error, per mode
WRITER_TIMEOUT = 90.0   # seconds: longer is a hang (the writer's stacks are dumped)
CLI_TIMEOUT = 60.0
NO_SPACE_WORDS = ("no space", "bytes free", "enospc", "disk is full", "disk full")


class CannotRun(Exception):
    """The sweep cannot run here (no tmpfs): exit 2."""


# ---- values ------------------------------------------------------------------------------
def make_value(key: str, size: int) -> str:
    """The value the writer puts under ``key`` (regenerated by the checker from its size)."""
    unit = key + "|"
    return (unit * (size // len(unit) + 1))[:size]


def _encode_writes(writes: dict) -> dict:
    return {k: ({"gen": len(v)} if isinstance(v, str) and v == make_value(k, len(v)) else v)
            for k, v in writes.items()}


def _decode_writes(writes: dict) -> dict:
    return {k: (make_value(k, v["gen"]) if isinstance(v, dict) and "gen" in v else v)
            for k, v in writes.items()}


def describe_error(e: BaseException) -> dict:
    """What the writer records of an exception: its type, whether it is a walstore error,
    its errno and file, and those of each exception in its cause chain."""
    chain, seen, cur = [], set(), e
    while cur is not None and id(cur) not in seen and len(chain) < 8:
        seen.add(id(cur))
        chain.append({"type": f"{type(cur).__module__}.{type(cur).__qualname__}",
                      "errno": getattr(cur, "errno", None) if isinstance(
                          getattr(cur, "errno", None), int) else None,
                      "filename": str(getattr(cur, "filename", None) or "") or None,
                      "message": str(cur)[:400]})
        cur = cur.__cause__ or cur.__context__
    msg = str(e)
    return {"type": type(e).__name__, "walstore": isinstance(e, walstore.WalstoreError),
            "storeio": isinstance(e, walstore.StoreIOError),
            "readonly": isinstance(e, walstore.ReadOnlyError),
            "errno": chain[0]["errno"], "filename": chain[0]["filename"],
            "message": msg[:600], "one_line": "\n" not in msg.strip(), "chain": chain}


def error_site(info: dict) -> str:
    """Where the disk ran out, by the files and words the error and its causes name:
    ``wal`` (a segment, the spare), ``lmdb`` (data.mdb), ``workspace`` (a file of the
    files workload's workspace), ``blobs`` (the store's blob store: before-images,
    manifests) or ``other``."""
    text = " ".join(f"{c['filename'] or ''} {c['message']}" for c in info["chain"]).lower()
    if "data.mdb" in text or "mdb_" in text or "lmdb" in text:
        return "lmdb"
    if "/ws/" in text or "workspace" in text:
        return "workspace"
    if "/files/" in text or "blob" in text:
        return "blobs"
    if "/wal/" in text or ".wal" in text or "segment" in text or "spare" in text:
        return "wal"
    return "other"


# ---- the writer (a subprocess) ------------------------------------------------------------------
class StopRun(Exception):
    """The writer has tried its operations after the first error."""


class SweepWorkload(Workload):
    """tools/faultsweep.py's workload steps (put, pay, rollback, savepoint, revert,
    rewind), each attempt recorded (fsynced) on the normal disk as it ends."""

    def __init__(self, spec: dict) -> None:
        self._n = 0
        super().__init__(spec["store"], spec["ledger"], clock=self._tick)
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        self.rec = open(spec["record"], "a", encoding="utf-8")
        self.first_error: dict | None = None
        self.after = 0  # operations tried since the first error
        self.spare = os.path.join(spec["store"], "wal", "spare.tmp")
        self.spare_seen = False

    def _tick(self) -> int:
        self._n += 1
        return self._n

    def record(self, doc: dict) -> None:
        self.rec.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
        self.rec.flush()
        os.fsync(self.rec.fileno())

    def _attempt(self, op: Op, fn) -> Any:
        box: dict = {}

        def run():
            try:
                return fn()
            except BaseException as e:  # noqa: BLE001 - noted, re-raised
                box["e"] = e
                raise
        result = super()._attempt(op, run)
        e = box.get("e")
        self.record({"op": {"label": op.label, "kind": op.kind, "txid": op.txid,
                            "writes": _encode_writes(op.writes), "undoes": list(op.undoes),
                            "outcome": op.outcome, "commits": op.commits, "error": op.error,
                            "foreign": op.foreign,
                            "files": [_encode_step(st) for st in getattr(op, "files", ())]},
                     "exc": None if e is None or isinstance(e, Abandon) else describe_error(e)})
        self.ended(e if not isinstance(e, Abandon) else None, op.label)
        return result

    def stepped(self, label: str, fn) -> Any:
        """A step that commits nothing of the model's (checkpoint, restore point)."""
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - recorded, checked by the sweep
            self.record({"step": label, "exc": describe_error(e)})
            self.ended(e, label)
            return None
        self.record({"step": label, "exc": None})
        self.ended(None, label)
        return result

    def ended(self, e: BaseException | None, label: str) -> None:
        if self.first_error is None and not self.spare_seen:  # (the fill still in place)
            try:
                size = os.stat(self.spare).st_size
            except OSError:
                pass
            else:
                self.spare_seen = True
                self.record({"spare": size, "free": _free(self.spec["store"]), "at": label})
        if self.first_error is not None:
            self.after += 1
            if self.after >= AFTER[self.spec["mode"]]:
                raise StopRun()
        elif e is not None:
            self.first_error = {"label": label, **describe_error(e)}
            if self.spec["mode"] == "free":
                os.unlink(self.spec["fill"])
                self.record({"freed": True, "free_after": _free(self.spec["store"])})

    def puts(self, s, label: str) -> None:
        op = Op(label, "commit")
        for i in range(self.rng.randint(1, 4)):
            key = f"{label}/{i}"
            op.writes[key] = make_value(key, self.size())

        def run():
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                for k, v in op.writes.items():
                    tx.put(k, v)
        self._attempt(op, run)

    def size(self) -> int:
        """100 B .. 64 KiB, log-uniform (most small, some large)."""
        return int(100 * (655.36 ** self.rng.random()))

    def acked(self, label: str) -> bool:
        op = self.by_label.get(label)
        return op is not None and acknowledged(op)

    def cycle(self, s, c: int) -> None:
        for j in range(self.rng.randint(1, 3)):
            self.puts(s, f"p{c}.{j}")
        self.pay(s, f"pay{c}", 10 + c)
        if c % 3 == 0:
            self.rollback(s, f"rb{c}", (1, 2))
        if c % 3 == 1:
            self.savepoint(s, f"sp{c}")
        if c % 4 == 0:
            self.stepped(f"checkpoint{c}", s.checkpoint)
        if c % 5 == 2 and self.acked(f"pay{c}"):
            self.revert(s, f"rev{c}", f"pay{c}")
        if c % 6 == 3 and self.stepped(f"rp{c}", lambda: s.restore_point(f"rp{c}")) is not None:
            self.pay(s, f"pr{c}", 100 + c)
            self.puts(s, f"q{c}")
            self.rewind(s, f"rew{c}", f"rp{c}", (f"pr{c}", f"q{c}"))


def _free(path: str) -> int | None:
    try:
        st = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def writer_main(spec: dict) -> None:
    """The writer process: open, cycles until the first error and a few operations
    after it (or MAX_OPS), then close or kill -9 itself."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # (the sweep's hang report)
    w = (FilesSweepWorkload if spec.get("workload") == "files" else SweepWorkload)(spec)
    s = None
    try:
        s = walstore.open(spec["store"], compensators=w.compensators(),
                          map_size=spec.get("map_size"),
                          **{**OPTS, "segment_size": spec["segment_size"]})
    except Exception as e:  # noqa: BLE001 - recorded, checked by the sweep
        w.record({"step": "open", "exc": describe_error(e)})
        if spec["end"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return
    try:
        c = 0
        while w._n < MAX_OPS:
            w.cycle(s, c)
            c += 1
    except StopRun:
        pass
    if spec["end"] == "kill" and isinstance(w, FilesSweepWorkload):
        w.in_flight_at_kill(s)
    w.record({"end": spec["end"], "first_error": w.first_error})
    if spec["end"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        s.close()
    except Exception as e:  # noqa: BLE001 - recorded, checked by the sweep
        w.record({"step": "close", "exc": describe_error(e)})


# ---- the files workload (``--workload files``) ----------------------------------------------
class Gen(bytes):
    """Generated file content, recorded as its tag and size (regenerated by the checker)."""

    tag: tuple = ()


def gen_bytes(tag: str, size: int) -> Gen:
    g = Gen(make_value(tag, size).encode())
    g.tag = (tag, size)
    return g


def _encode_step(step: tuple) -> list:
    out: list = []
    for x in step:
        if isinstance(x, Gen):
            out.append({"gen": list(x.tag)})
        elif isinstance(x, (bytes, bytearray)):
            out.append({"b64": base64.b64encode(bytes(x)).decode()})
        else:
            out.append(x)
    return out


def _decode_step(step: list) -> tuple:
    return tuple(gen_bytes(*x["gen"]) if isinstance(x, dict) and "gen" in x else
                 base64.b64decode(x["b64"]) if isinstance(x, dict) else x for x in step)


def _prefixed(prefix: str, steps: list) -> list:
    """``steps`` (tools/faultsweep_files.py's) moved under ``prefix`` (a symlink's target
    is relative: kept)."""
    out = []
    for st in steps:
        st = list(st)
        st[1] = prefix + st[1]
        if st[0] == "rename":
            st[2] = prefix + st[2]
        out.append(tuple(st))
    return out


def _seed_steps(prefix: str) -> list:
    """faultsweep_files' INITIAL tree as operations under ``prefix``."""
    steps = []
    for rel, what in ffiles.INITIAL.items():
        if isinstance(what, ffiles.Dir):
            steps.append(("mkdir", prefix + rel, what.mode))
        elif isinstance(what, ffiles.Link):
            steps.append(("symlink", prefix + rel, what.target))
        elif isinstance(what, ffiles.File):
            steps.append(("write", prefix + rel, what.content, what.mode))
        else:
            steps.append(("write", prefix + rel, what, None))
    return steps


def expected_files_tree(ops: list, visible: set) -> dict:
    """The workspace the visible commits make, from an empty one: every visible file
    transaction not undone by a visible undo, in the order they ran (a cycle's seed comes
    before the transactions that change its tree; an undone one's directory is changed by
    no later transaction)."""
    undone = {t for op in ops if op.label in visible and op.kind == "undo" for t in op.undoes}
    tree: dict = {}
    for op in ops:
        if (op.label in visible and op.label not in undone and op.kind == "commit"
                and isinstance(op, ffiles.FileOp)):
            for st in op.files:
                ffiles.apply_step(tree, st)
    return tree


class FilesCheck(ffiles.FilesWorkload):
    """The checker's view of a files run: faultsweep_files' checks of the reopened store
    (the workspace byte for byte, no conflict, no undo owed, a new file write) with the
    tree of this workload (cycles seeded from an empty workspace)."""

    def expected_tree(self, visible: set[str]) -> dict:
        return expected_files_tree(self.ops, visible)


class FilesSweepWorkload(SweepWorkload, ffiles.FilesWorkload):
    """tools/faultsweep_files.py's file transactions, repeated in cycles until the disk is
    full: cycle ``c`` works under ``k<c>/`` of the workspace (mnt/ws, beside the store):
    a seed transaction makes faultsweep_files' initial tree there and two bulk files
    (1 KiB .. 512 KiB); then a transaction overwriting one and deleting the other (their
    before-images: the blob store), and in turn its C1 (every operation kind), a rollback,
    a savepoint and ``rollback_to``, a ``watch()`` of a real ``sh`` changing the tree, a
    commit then ``revert``-ed, a restore point, two commits and a ``rewind``, a checkpoint
    (the blob gc); each charges the ledger through an action.  A writer ending by kill
    leaves a file transaction in flight."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.tool_failures: list = []

    def size(self) -> int:
        """1 KiB .. 512 KiB, log-uniform."""
        return int(1024 * (512 ** self.rng.random()))

    def seeded(self, c: int) -> bool:
        return self.acked(f"seed{c}")

    def cycle(self, s, c: int) -> None:
        if c == 0:
            self.stepped("register", lambda: setattr(self, "ws", s.workspace(self.root)))
        p = f"k{c}/"
        bulk = [("write", p + "bulk/a.bin", gen_bytes(f"{p}a", self.size()), None),
                ("write", p + "bulk/b.bin", gen_bytes(f"{p}b", self.size()), 0o600)]
        self.files_tx(s, f"seed{c}", 1000 + c, _seed_steps(p) + bulk)
        if not self.seeded(c):
            return
        self.files_tx(s, f"bulk{c}", 2000 + c, [
            ("write", p + "bulk/a.bin", gen_bytes(f"{p}a2", self.size()), 0o640),
            ("delete", p + "bulk/b.bin"),
            ("write", p + "bulk/c.bin", gen_bytes(f"{p}c", self.size()), None)])
        if c % 2 == 0:
            self.files_tx(s, f"c1.{c}", 10, _prefixed(p, ffiles.C1))
        if c % 3 == 0:
            self.files_tx(s, f"rb{c}", 11, _prefixed(p, ffiles.RB), abandon=True)
        if c % 3 == 1:
            self.savepoint_files(s, f"sp{c}", p)
        if c % 3 == 2:
            self.watch_files(s, f"watch{c}", p)
        if c % 4 == 1:
            self.files_tx(s, f"rev-t{c}", 14, _prefixed(p, ffiles.REV_T))
            if self.acked(f"rev-t{c}"):
                self.revert(s, f"rev{c}", f"rev-t{c}")
        if c % 4 == 3 and self.stepped(f"rp{c}", lambda: s.restore_point(f"rp{c}")) is not None:
            self.files_tx(s, f"rw1.{c}", 15, _prefixed(p, ffiles.RW1))
            self.files_tx(s, f"rw2.{c}", 16, _prefixed(p, ffiles.RW2))
            self.rewind(s, f"rew{c}", f"rp{c}", (f"rw1.{c}", f"rw2.{c}"))
        if c % 5 == 4:
            self.stepped(f"checkpoint{c}", s.checkpoint)

    def savepoint_files(self, s, label: str, p: str) -> None:
        """faultsweep_files' savepoint transaction under ``p``."""
        before, undone, after = (_prefixed(p, ffiles.SP_BEFORE), _prefixed(p, ffiles.SP_UNDONE),
                                 _prefixed(p, ffiles.SP_AFTER))
        op = ffiles.FileOp(label, "commit", {f"files/{label}": 12}, files=before + after)

        def run() -> None:
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, 12)
                f = self._files(tx)
                for st in before:
                    ffiles.run_step(f, st)
                sp = tx.savepoint("plan-b")
                self._charge(tx, 112)
                for st in undone:
                    ffiles.run_step(f, st)
                tx.rollback_to(sp)
                for st in after:
                    ffiles.run_step(f, st)
                tx.put(f"files/{label}", 12)
        self._attempt(op, run)

    def watch_files(self, s, label: str, p: str) -> None:
        """A charge, then a real ``sh`` changing ``p/w`` inside ``watch()``.  The tool
        itself may fail on the full disk: then the agent gives up (a rollback, which must
        put back what the tool did change)."""
        op = ffiles.FileOp(label, "commit", {f"files/{label}": 13},
                           files=_prefixed(p, ffiles.WATCH))

        def run() -> None:
            with s.transaction(meta={"op": label}) as tx:
                op.txid = tx.id
                self._charge(tx, 13)
                with self._files(tx).watch():
                    # (-e: a command of the tool failing on the full disk fails the tool;
                    # without it the script went on and exited 0 with an empty w/fresh.txt
                    # — what watch() rightly committed, not what the model expects)
                    r = subprocess.run(["sh", "-ec", ffiles.WATCH_SCRIPT], capture_output=True,
                                       text=True, cwd=os.path.join(self.root, p))
                if r.returncode != 0:
                    op.kind, op.files = "rollback", []
                    self.tool_failures.append(r.stderr.strip()[:200])
                    self.record({"tool_failed": label, "stderr": r.stderr.strip()[:200]})
                    raise Abandon()
                tx.put(f"files/{label}", 13)
        self._attempt(op, run)

    def in_flight_at_kill(self, s) -> None:
        """A file transaction left in flight by the kill: recovery must put its files
        back and refund its charge (the newest seeded cycle's ``lost/``)."""
        seeded = [int(op.label[4:]) for op in self.ops
                  if op.label.startswith("seed") and acknowledged(op)]
        if seeded:
            self.files_loser_at(s, "lost", f"k{max(seeded)}/")

    def files_loser_at(self, s, label: str, p: str) -> None:
        op = ffiles.FileOp(label, "loser")

        def run():
            tx = s.transaction(meta={"op": label})
            op.txid = tx.id
            self._in_flight = tx
            self._charge(tx, 17)
            f = self._files(tx)
            for st in _prefixed(p, ffiles.LOST):
                ffiles.run_step(f, st)
            tx.put(f"files/{label}", 17)
        try:
            self._attempt(op, run)
        except StopRun:
            pass


# ---- the tmpfs ---------------------------------------------------------------------------
def mount(mnt: str, size: int) -> None:
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                            mnt], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CannotRun(f"cannot mount a tmpfs at {mnt}: {e}") from e
    if r.returncode != 0:
        raise CannotRun(f"mounting a tmpfs is not permitted here "
                        f"({r.stderr.strip() or r.returncode}); the sweep needs root "
                        f"(or CAP_SYS_ADMIN)")


def unmount(mnt: str) -> None:
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def clear(mnt: str) -> None:
    for name in os.listdir(mnt):
        p = os.path.join(mnt, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def fill_to(mnt: str, keep: int) -> int:
    """Fill the tmpfs at ``mnt`` with ``mnt/fill`` until ``keep`` bytes (or fewer, by less
    than a page) are free; returns the bytes free."""
    path = os.path.join(mnt, "fill")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        free = _free(mnt) or 0
        if free > keep:
            os.posix_fallocate(fd, os.fstat(fd).st_size, free - keep)
        while (_free(mnt) or 0) > keep:  # (rounding: a page at a time)
            os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    return _free(mnt) or 0


# ---- one run -----------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                              text=True, timeout=CLI_TIMEOUT, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, e.stdout or "", f"TIMEOUT after "
                                           f"{CLI_TIMEOUT} s (a hang)")


def _check_cli(what: str, r: subprocess.CompletedProcess, problems: list, ok=(0,)) -> None:
    if "Traceback (most recent call last)" in (r.stderr or ""):
        problems.append(f"{what}: printed a traceback: {r.stderr.strip().splitlines()[-1][:300]}")
    elif r.returncode == -1:
        problems.append(f"{what}: {r.stderr}")
    elif r.returncode not in ok:
        problems.append(f"{what}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[:400]}")


def _recover_ok(r: subprocess.CompletedProcess) -> bool:
    """Exit 1 from `recover --json` is a success when it reports pending compensations or
    in-doubt transactions (the store was recovered; someone must decide)."""
    if r.returncode == 0:
        return True
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return False
    return bool(r.returncode == 1 and isinstance(doc, dict) and doc.get("recovered")
                and (doc.get("pending_actions") or doc.get("in_doubt")))


def run_writer(spec: dict, timeout: float) -> tuple[int, str, bool]:
    err_path = spec["record"] + ".stderr"
    with open(err_path, "wb") as err:
        env = dict(os.environ, TMPDIR=spec["tmpdir"]) if spec.get("tmpdir") else None
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--writer",
                              json.dumps(spec)], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                             env=env)
        hung = False
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            hung = True
            p.send_signal(signal.SIGUSR1)  # its threads' stacks, on its stderr
            time.sleep(1.0)
            p.kill()
            p.wait()
    with open(err_path, encoding="utf-8", errors="replace") as f:
        return p.returncode, f.read(), hung


def one_run(mnt: str, work: str, level: int, mode: str, end: str, seed: int,
            map_size: int | None, timeout: float = WRITER_TIMEOUT,
            segment_size: int = SEGMENT_SIZES[0], recover_room: int = RECOVER_ROOM,
            workload: str = "kv") -> dict:
    """Store on the tmpfs, ``level`` bytes left free, the writer in ``mode`` ending by
    ``end``; then recover (a closed store: on the full disk, may refuse in one line; a
    killed one: with ``recover_room`` free, must recover), then freed, and every check.
    Returns the run's
    result: ``problems`` (empty: all promises held), ``acks``, ``first`` (the first
    error: site, type, errno), ``after`` (what the operations after it did)."""
    clear(mnt)
    run = os.path.join(work, f"run-{level}-{mode}")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    store = os.path.join(mnt, "store")
    walstore.open(store, **{**OPTS, "segment_size": segment_size}).close()
    fileio.remove_quietly(os.path.join(store, "wal", "spare.tmp"))  # (if one was made on
    # the empty disk: an open makes it once half a segment is written)
    if workload == "files":  # (the agent's repository beside its state, on one disk)
        os.mkdir(os.path.join(mnt, "ws"), 0o700)
        os.makedirs(os.path.join(run, "tmp"))
    wal = sum(os.path.getsize(p) for p in glob.glob(os.path.join(store, "wal", "*")))
    free = fill_to(mnt, level)
    spec = {"store": store, "ledger": os.path.join(run, "ledger.jsonl"),
            "record": os.path.join(run, "record.jsonl"), "fill": os.path.join(mnt, "fill"),
            "mode": mode, "end": end, "seed": seed, "map_size": map_size,
            "segment_size": segment_size, "workload": workload,
            "tmpdir": os.path.join(run, "tmp") if workload == "files" else None}
    res: dict = {"workload": workload, "level": level, "free": free, "mode": mode, "end": end,
                 "seed": seed,
                 "most_free": free + wal,  # (trims give back at most the WAL's first bytes)
                 "map_size": map_size, "segment_size": segment_size, "problems": [],
                 "acks": 0, "ops": 0, "first": None,
                 "after": {}, "recover_full": None, "notes": []}
    problems = res["problems"]
    rc, stderr, hung = run_writer(spec, timeout)
    if hung:
        problems.append(f"the writer hung (> {timeout:.0f} s); its stacks: "
                        + " | ".join(stderr.strip().splitlines()[-12:])[:1500])
    elif end == "kill" and rc != -signal.SIGKILL or end == "close" and rc != 0:
        problems.append(f"the writer exited {rc} (expected "
                        f"{'SIGKILL' if end == 'kill' else 0}): "
                        + " | ".join(stderr.strip().splitlines()[-4:])[:600])
    if "Traceback (most recent call last)" in stderr and not hung:
        problems.append("the writer printed a traceback: "
                        + stderr.strip().splitlines()[-1][:300])
    recs = []
    with open(spec["record"], encoding="utf-8") as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    check_errors(recs, res)
    if workload == "files":  # (how the file transaction the kill left in flight went)
        lost = [r for r in recs if "op" in r and r["op"]["label"] == "lost"]
        res["in_flight"] = (None if not lost else "changed files" if lost[0]["exc"] is None
                            else f"failed: {lost[0]['exc']['type']}")
        res["tool_failures"] = sum(1 for r in recs if "tool_failed" in r)
    if os.path.exists(os.path.join(store, "STORE")):
        recover_on_full_disk(mnt, store, end, recover_room, res)
    os.unlink(spec["fill"]) if os.path.exists(spec["fill"]) else None
    check_store(spec, recs, res)
    if workload == "files":
        check_outside(mnt, spec, res)
    shutil.rmtree(run, ignore_errors=True)
    return res


def recover_on_full_disk(mnt: str, store: str, end: str, room: int, res: dict) -> None:
    """`walstore recover` before the fill is deleted.  A closed store, on the disk as full
    as the writer left it: recovered, or refused in one line (exit 1, no traceback).  A
    killed writer's, with ``room`` bytes made free (the CI failure of stop 64: 3 MB free,
    and the spare thread took them from LMDB): it must recover."""
    problems = res["problems"]
    if end == "kill":
        fill = os.path.join(mnt, "fill")
        if os.path.exists(fill):
            os.truncate(fill, max(0, os.path.getsize(fill) - max(0, room - (_free(mnt) or 0))))
    free = _free(mnt) or 0
    r = cli("recover", "--json", store)
    where = f"with {free} bytes free"
    owed = _file_undo_owed_for_space(r)
    res["recover_full"] = ("ok" if _recover_ok(r) else "recovered, a file undo owed (no space)"
                           if owed else f"refused: {(r.stderr or '').strip()[:300]}"
                           ) + f" ({where})"
    if "Traceback (most recent call last)" in (r.stderr or ""):
        problems.append(f"`walstore recover` {where} printed a traceback: "
                        + r.stderr.strip().splitlines()[-1][:300])
    elif _recover_ok(r) or owed:
        return
    elif end == "kill" and free >= room:
        problems.append(f"`walstore recover` {where} failed: exit {r.returncode}: "
                        f"{(r.stderr or r.stdout).strip()[:400]}")
    elif r.returncode != 1 or len(r.stderr.strip().splitlines()) != 1:
        problems.append(f"`walstore recover` {where}: exit {r.returncode}, stderr "
                        f"{r.stderr.strip()[:400]!r} (not one line, exit 1)")


def _file_undo_owed_for_space(r: subprocess.CompletedProcess) -> bool:
    """`recover --json` exit 1 that recovered the store but could not put back a file
    change for lack of space (a files run's rollback that failed on the full disk): every
    problem a "file-undo-failed" kept owed for the next open, one naming the full disk — what
    a recovery on a still full disk may rightly report (the sweep then frees the disk and
    checks that the next recovery put everything back)."""
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return False
    probs = doc.get("problems") if isinstance(doc, dict) else None
    return bool(r.returncode == 1 and doc.get("recovered") and probs and all(
        p.get("kind") == "file-undo-failed" and p.get("action") == "owed" for p in probs)
        and any(w in str(p.get("reason", "")).lower() for w in NO_SPACE_WORDS
                for p in probs))  # (the others: "not put back yet", undo newest first)


def check_errors(recs: list, res: dict) -> None:
    """Every error the writer saw: a walstore error, one line, naming the cause."""
    problems = res["problems"]
    first = None
    after: dict = {"acked": 0, "refused": 0}
    for r in recs:
        if "op" in r or "step" in r:
            res["ops"] += "op" in r
            exc = r.get("exc")
            what = r["op"]["label"] if "op" in r else r["step"]
            if first is not None:
                if exc is None:
                    after["acked"] += 1
                else:
                    after["refused"] += 1
                    after.setdefault("types", set()).add(exc["type"])
            if exc is None:
                continue
            res.setdefault("sites", set()).add(error_site(exc))
            if first is None:
                first = {"at": what, "site": error_site(exc), "type": exc["type"],
                         "errno": errno.errorcode.get(exc["errno"] or 0, exc["errno"]),
                         "message": exc["message"][:300]}
            if not exc["walstore"]:
                problems.append(f"{what}: a foreign exception escaped the API: "
                                f"{exc['type']}: {exc['message'][:300]}")
                continue
            if not exc["one_line"]:
                problems.append(f"{what}: a {exc['type']} of more than one line: "
                                f"{exc['message'][:300]!r}")
            if exc["storeio"] and not exc["errno"]:
                problems.append(f"{what}: a StoreIOError without an errno: {exc['message'][:300]}")
            text = " ".join(c["message"] for c in exc["chain"]).lower()
            names = (any(w in text for w in NO_SPACE_WORDS)
                     or any(c["errno"] == errno.ENOSPC for c in exc["chain"]))
            if not names:
                problems.append(f"{what}: {exc['type']} does not name the full disk (ENOSPC, "
                                f"no space, bytes free): {exc['message'][:300]}")
        elif "freed" in r:
            res["notes"].append(f"freed ({r['free_after']} bytes free)")
        elif "spare" in r:  # (the spare is a speed-up: never made from the disk's last room)
            seg = res["segment_size"]
            need = seg + max(seg, SPARE_MIN_HEADROOM)
            if res["most_free"] < need:
                problems.append(f"a {r['spare']}-byte WAL spare was made from a nearly full "
                                f"disk (seen after {r['at']} with {r['free']} bytes free; "
                                f"at most {res['most_free']} were ever free, and a spare "
                                f"needs {need})")
    res["first"] = first
    res["sites"] = sorted(res.get("sites", ()))  # (a list: the --json document's)
    if "types" in after:
        after["types"] = sorted(after["types"])
    res["after"] = after


def check_store(spec: dict, recs: list, res: dict) -> None:
    """Recover by the CLI, reopen with the compensator, faultsweep's checks, verify."""
    problems = res["problems"]
    store = spec["store"]
    if not os.path.exists(os.path.join(store, "STORE")):
        problems.append("the store is gone")
        return
    r = cli("recover", "--json", store)
    if not _recover_ok(r) or "Traceback (most recent call last)" in (r.stderr or ""):
        problems.append(f"`walstore recover` after freeing the disk: exit {r.returncode}: "
                        f"{(r.stderr or r.stdout).strip()[:400]}")
    files = spec.get("workload") == "files"
    w = (FilesCheck if files else Workload)(store, spec["ledger"])
    for rec in recs:
        if "op" in rec:
            d = rec["op"]
            op = (ffiles.FileOp if files else Op)(
                d["label"], d["kind"], _decode_writes(d["writes"]), tuple(d["undoes"]),
                txid=d["txid"], outcome=d["outcome"], commits=d["commits"],
                error=d["error"], foreign=d["foreign"])
            if files:
                op.files = [_decode_step(st) for st in d.get("files", ())]
            w.ops.append(op)
            w.by_label[op.label] = op
    out: dict = {"lost": [], "errors": [], "acks": 0, "pending": 0, "in_doubt": 0}
    try:
        s = walstore.open(store, compensators=w.compensators(), **OPTS)
    except walstore.WalstoreError as e:
        problems.append(f"reopen after recovery failed: {type(e).__name__}: {e}")
        return
    try:
        _check_open_store(w, s, out)
        if files:  # (the workspace byte for byte; no conflict; no undo owed; a new write)
            w.check_reopened(s, out)
    finally:
        s.close()
    res["acks"] = out["acks"]
    res["pending"] = out["pending"]
    if out["lost"]:
        problems.append(f"acknowledged commits lost: {out['lost'][:6]}")
    problems.extend(out["errors"])
    r = cli("verify", store)
    _check_cli("`walstore verify`", r, problems)
    left = [os.path.relpath(p, store) for p in glob.glob(os.path.join(store, "**", "*.tmp"),
                                                          recursive=True)
            if os.path.basename(p) != "spare.tmp"]  # (the next segment, kept by a close)
    left += [os.path.relpath(p, store) for p in glob.glob(os.path.join(store, "files", "tmp", "*"))]
    if left:
        problems.append(f"temporary files left in the store: {left[:6]}")


def check_outside(mnt: str, spec: dict, res: dict) -> None:
    """The files workload wrote nothing beside the store and the workspace on its disk, and
    nothing in the writer's TMPDIR (the workspace's own temp files: its tree check)."""
    stray = sorted(set(os.listdir(mnt)) - {"store", "ws"})
    if stray:
        res["problems"].append(f"written outside the store and the workspace root: {stray[:6]}")
    left = os.listdir(spec["tmpdir"])
    if left:
        res["problems"].append(f"files left in the writer's TMPDIR: {left[:6]}")
    q = os.path.join(spec["store"], "quarantine")
    if os.path.isdir(q) and any(files for _, _, files in os.walk(q)):
        res["notes"].append("quarantined copies (a conflict)")


# ---- the sweep ---------------------------------------------------------------------------
def levels_for(n: int, max_free: int, seed: int) -> list[int]:
    """``n`` free-byte levels from ~0 to ``max_free``, each jittered by up to 64 KiB."""
    rng = random.Random(seed)
    step = max_free / max(1, n - 1)
    return [max(0, min(max_free, int(i * step) + rng.randrange(0, 64 * 1024)))
            for i in range(n)]


def sweep(levels: list[int], seed: int, work: str, modes=("stop", "free"),
          progress=None, timeout: float = WRITER_TIMEOUT,
          recover_room: int = RECOVER_ROOM, workload: str = "kv") -> dict:
    t0 = time.monotonic()
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, mode=0o700, exist_ok=True)
    mount(mnt, TMPFS_SIZE)
    runs = []
    try:
        k = 0
        for i, level in enumerate(levels):
            for m, mode in enumerate(modes):
                end = ("close", "kill")[(i + m) % 2]  # (each mode ends both ways in turn)
                map_size = (None, 2 * MiB)[(k // 2) % 2]  # (map growth on every other pair)
                segment_size = SEGMENT_SIZES[(k // 4) % 2]  # (with the map: 4 pairs)
                room = (recover_room, segment_size + SPARE_ROOM)[(i // 2) % 2] + min(
                    CLI_SEGMENT_SIZE, 4 * segment_size)
                res = one_run(mnt, work, level, mode, end, seed * 1000 + k, map_size, timeout,
                              segment_size, room, workload)
                k += 1
                runs.append(res)
                if progress:
                    progress(line(res))
    finally:
        unmount(mnt)
    return summarize(runs, time.monotonic() - t0, seed)


def line(res: dict) -> str:
    f = res["first"]
    first = (f"first error at {f['at']}: {f['site']} {f['type']} {f['errno']}" if f
             else "no error (the disk never filled)")
    a = res["after"]
    return (f"  free {res['free'] / MiB:6.2f} MiB {res['mode']:<4} {res['end']:<5} "
            f"map {'default' if res['map_size'] is None else res['map_size'] // MiB} "
            f"seg {res['segment_size'] // MiB}: "
            f"{res['ops']} ops, {res['acks']} acks; {first}; after it {a.get('acked', 0)} "
            f"acked, {a.get('refused', 0)} refused; recover before freeing: "
            f"{(res['recover_full'] or '-')[:90]}; "
            + (f"in flight at the kill: {res.get('in_flight')}; tool failures: "
               f"{res.get('tool_failures', 0)}; " if res.get("workload") == "files" else "")
            + (f"PROBLEMS {len(res['problems'])}: {res['problems'][0][:300]}"
               if res["problems"] else "ok"))


def summarize(runs: list, seconds: float, seed: int) -> dict:
    sites: dict = {}
    every: dict = {}  # (the runs in which any error came from a site, the first or later)
    for r in runs:
        if r["first"]:
            sites[r["first"]["site"]] = sites.get(r["first"]["site"], 0) + 1
        for site in r.get("sites", ()):
            every[site] = every.get(site, 0) + 1
    return {"seed": seed, "runs": len(runs), "levels": len({r["level"] for r in runs}),
            "acks": sum(r["acks"] for r in runs), "ops": sum(r["ops"] for r in runs),
            "filled": sum(1 for r in runs if r["first"]), "first_error_sites": sites,
            "error_sites": every,
            "problems": sum(len(r["problems"]) for r in runs),
            "seconds": round(seconds, 1), "runs_detail": runs}


def report(s: dict) -> str:
    lines = [f"levels: {s['levels']}, runs: {s['runs']} ({s['filled']} hit the full disk; "
             f"first errors: " + ", ".join(f"{k} {v}" for k, v in sorted(
                 s["first_error_sites"].items())) + f"), operations: {s['ops']}, acknowledged "
             f"commits checked: {s['acks']}, problems: {s['problems']}; {s['seconds']:.0f} s "
             f"(seed {s['seed']})"]
    for r in s["runs_detail"]:
        for p in r["problems"]:
            lines.append(f"  PROBLEM free {r['free']} {r['mode']} {r['end']}: {p[:600]}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--writer":
        writer_main(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", type=int, default=24, help="fill levels (default 24)")
    ap.add_argument("--max-free", type=float, default=12.0, help="MiB free at the top level")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--modes", nargs="*", default=["stop", "free"], choices=["stop", "free"])
    ap.add_argument("--timeout", type=float, default=WRITER_TIMEOUT,
                    help="seconds a writer may run before it counts as hung")
    ap.add_argument("--recover-room", type=float, default=RECOVER_ROOM / MiB,
                    help="MiB free when a killed writer's store is recovered (default 3)")
    ap.add_argument("--workload", default="kv", choices=["kv", "files"],
                    help="kv (default): keys, actions, undos; files: file transactions in a "
                         "workspace on the same disk (tools/faultsweep_files.py's)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args()
    levels = levels_for(args.levels, int(args.max_free * MiB), args.seed)
    work = tempfile.mkdtemp(prefix="walstore-fullsweep-")
    try:
        s = sweep(levels, args.seed, work, tuple(args.modes),
                  progress=lambda m: print(m, file=sys.stderr, flush=True), timeout=args.timeout,
                  recover_room=int(args.recover_room * MiB), workload=args.workload)
    except CannotRun as e:
        print(f"fullsweep: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(s, default=sorted))
    else:
        print(report(s))
    sys.exit(1 if s["problems"] else 0)


if __name__ == "__main__":
    main()
