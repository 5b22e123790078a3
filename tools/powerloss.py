"""Power-loss images of a recorded walstore workload, and their checks.

A workload runs against a real store with ``tools.faults.FaultBackend(record=True)`` under
walstore's file I/O: every write, fsync, rename and directory fsync of the WAL is
recorded, and every acknowledged commit is marked.  From that recording this module
builds *crash images*: the store's files as a power loss at some moment could leave them.

The crash model (after ALICE, OSDI'14, and LazyFS):
- a write is durable once an fsync/fdatasync of its file has *returned* after it;
- a create, rename or unlink is durable once an fsync of its directory returned after it;
- anything not durable may be lost, survive, or survive in part: the image keeps a random
  prefix of the unsynced writes (``prefix``), a random subset of their 512-byte sectors,
  reordered across files (``torn``), none of them (``synced``), or all (``all``, a process
  crash), and a random prefix of the unsynced directory operations (a new segment whose
  directory entry was not synced may be missing).

The LMDB side is held still during the recording (the applier is off), so its files in
the base snapshot are exactly what a power loss leaves of them.  Each image is recovered
(``walstore.open``) and checked: every commit acknowledged before the crash moment is
present with its values, the workload's invariant holds (no partial transaction), and
``verify`` passes.

    python tools/powerloss.py --images 500        # prints images, acks checked, commits lost
    python tools/powerloss.py --files --images 300 --commits 40   # workspace files too

The second workload (``--files``, ``run_files``) is reversible files: see the section
"workspace files" below.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import random
import shutil
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed, real_path  # noqa: E402
from walstore import fileio  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

ACCOUNTS = [f"acct/{c}" for c in "abcde"]
TOTAL = 1000
SECTOR = 512
VARIANTS = ("synced", "prefix", "torn", "all")


@dataclass
class Recording:
    base: str                 # snapshot of the store when recording began
    wal_dir: str              # the live WAL directory path the events name
    events: list              # tools.faults.Event, in sequence order
    acks: list = field(default_factory=list)  # (seq, txid, {key: value})
    # (seq, txid, gid, {key: value}): a PREPARE acknowledged (``tx.prepare`` returned);
    # forced durable under "full" and "normal" (an fsync, as a 2PC decision is)
    prepares: list = field(default_factory=list)
    forced: set = field(default_factory=set)  # txids committed by commit_prepared
    # (seq, txid, idempotency key): an action's body ran (its intent was forced durable
    # first, under "full" and "normal"): the outside world was changed
    effects: list = field(default_factory=list)


def record_workload(workdir: str, commits: int = 120, seed: int = 0,
                    lie_about_dir_fsync: bool = False, threads: int = 1,
                    durability: str = "full", twophase: bool = False,
                    actions: bool = False) -> Recording:
    """Run transfers (with savepoint rollbacks) under a recording backend; with
    ``threads`` > 1, that many threads commit at once (the group commit writes their
    records in shared writes: a torn one tears several commits; ConflictErrors are
    expected and not counted).  ``twophase``: every third transfer is prepared
    (``tx.prepare``), then decided by ``commit_prepared`` (PREPARE and its decision are
    forced durable, under "normal" too).  ``actions``: each transfer also runs an action
    ("charge", compensated by "refund") whose body is the outside world's change."""
    rnd = random.Random(seed)
    live = os.path.join(workdir, "live")
    opts = dict(durability="full", segment_size=16 * 1024, apply_batch=10**9,
                apply_interval=3600.0, checkpoint_bytes=1 << 40)
    with walstore.open(live, **opts) as s:  # (the base: made durable by its close)
        with s.transaction() as tx:
            for a in ACCOUNTS:
                tx.put(a, TOTAL // len(ACCOUNTS))
    if durability != "full":  # ("normal": its flusher's syncs are recorded too)
        opts.update(durability=durability, sync_interval=0.002)
    store = walstore.open(live, **opts)
    _spare_settled(store)
    base = os.path.join(workdir, "base")
    shutil.copytree(live, base)
    fb = FaultBackend(record=True)
    rec = Recording(base, os.path.join(live, "wal"), fb.events)
    def committer(rnd: random.Random, n: int) -> None:
        for _ in range(n):
            try:
                if twophase and rnd.random() < 1 / 3:
                    txid, writes = _one_prepared_transfer(store, rnd, rec, fb)
                    rec.forced.add(txid)
                else:
                    txid, writes = _one_transfer(store, rnd, rec if actions else None, fb)
            except walstore.ConflictError:
                continue
            rec.acks.append((fb.mark("ack", txid).seq, txid, writes))  # (list.append: atomic)

    with installed(fb):
        if threads <= 1:
            committer(rnd, commits)
        else:
            workers = [threading.Thread(target=committer, args=(
                random.Random(seed * 1000 + t), commits // threads)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    rec.acks.sort(key=lambda a: a[0])
    store._drop_like_a_crash()
    if lie_about_dir_fsync:  # a broken engine: as if directories were never fsynced
        rec.events = [e for e in rec.events if e.op != "fsync_dir"]
    return rec


def _spare_settled(store, timeout: float = 60.0) -> None:
    """Have the log's background thread make its spare segment file and wait until it is
    made (an open makes it once half a segment is written; asked for here at once).  The
    base snapshot is copied from the live directory: a spare copied half zero-filled (a loaded machine's spare thread still at work), then activated during
    the recording, made the image's segment shorter than its header says it was made, a
    "truncated" log the engine never left (its zero fill was fsynced before activation,
    outside the recording): one image in a loaded run of the suite failed so."""
    wal = store._engine.wal
    wal.request_spare()
    wal._await_spare(timeout)
    if wal.needs_spare():
        raise RuntimeError("the store's spare segment was not ready in time")


def _one_transfer(store, rnd: random.Random, rec: Recording | None = None, fb=None):
    src, dst = rnd.sample(ACCOUNTS, 2)
    amount = rnd.randint(1, 20)
    with store.transaction(meta={"transfer": amount}) as tx:
        if rec is not None:  # (the intent is logged, and forced, before the body runs)
            with tx.action("charge", args={"amount": amount}, compensate="refund") as act:
                rec.effects.append((fb.mark("effect", tx.id).seq, tx.id, act.key))
                act.result = {"charged": amount}
        a, b = tx.get(src), tx.get(dst)
        with tx.savepoint("noise") as sp:
            tx.put(src, -999_999)          # garbage that must never be seen
            tx.rollback_to(sp)
        pad = "p" * rnd.choice((10, 300, 3000))  # varied sizes: records span sectors
        writes = {src: a - amount, dst: b + amount, f"t/{tx.id}": {"amount": amount, "pad": pad}}
        for k, v in writes.items():
            tx.put(k, v)
    return tx.id, writes


def _one_prepared_transfer(store, rnd: random.Random, rec: Recording, fb):
    src, dst = rnd.sample(ACCOUNTS, 2)
    amount = rnd.randint(1, 20)
    tx = store.transaction(meta={"transfer": amount, "2pc": True})
    try:
        a, b = tx.get(src), tx.get(dst)
        pad = "q" * rnd.choice((10, 300, 3000))
        writes = {src: a - amount, dst: b + amount, f"t/{tx.id}": {"amount": amount, "pad": pad}}
        for k, v in writes.items():
            tx.put(k, v)
        gid = f"g{tx.id}"
        tx.prepare(gid)
    except BaseException:
        tx.rollback()
        raise
    rec.prepares.append((fb.mark("prepared", tx.id).seq, tx.id, gid, writes))
    store.commit_prepared(gid)
    return tx.id, writes


# ---- building images -------------------------------------------------------------------
class _FileModel:
    """Durable and pending state of the WAL directory, replayed event by event."""

    def __init__(self, rec: Recording) -> None:
        self.contents: dict[int, bytearray] = {}
        self.pending_writes: dict[int, list] = {}
        self.names: dict[str, int] = {}        # live namespace: path -> file id
        self.durable_names: dict[str, int] = {}
        self.pending_dir: list = []            # (seq, op, path, dst, fid)
        self._ids = 0
        for name in sorted(os.listdir(rec.wal_dir.replace(os.path.dirname(rec.wal_dir),
                                                          rec.base))):
            fid = self._new_id()
            with open(os.path.join(rec.base, "wal", name), "rb") as f:
                self.contents[fid] = bytearray(f.read())
            path = os.path.join(rec.wal_dir, name)
            self.names[path] = self.durable_names[path] = fid

    def _new_id(self) -> int:
        self._ids += 1
        self.pending_writes[self._ids] = []
        return self._ids

    def replay(self, ev) -> None:
        op = ev.op
        if op == "open":
            fid = self._new_id()
            self.contents[fid] = bytearray()
            self.names[ev.path] = fid
            self.pending_dir.append((ev.seq, "create", ev.path, None, fid))
        elif op == "pwrite" and ev.path in self.names:
            self.pending_writes[self.names[ev.path]].append((ev.seq, ev.offset, ev.data))
        elif op in ("fsync", "fdatasync") and ev.done_seq is not None and ev.path in self.names:
            self._make_writes_durable(self.names[ev.path], ev.seq)
        elif op == "rename" and ev.path in self.names:
            fid = self.names.pop(ev.path)
            self.names[ev.dst] = fid
            self.pending_dir.append((ev.seq, "rename", ev.path, ev.dst, fid))
        elif op == "unlink":
            fid = self.names.pop(ev.path, None)
            self.pending_dir.append((ev.seq, "unlink", ev.path, None, fid))
        elif op == "fsync_dir" and ev.done_seq is not None:
            keep = [d for d in self.pending_dir if d[0] > ev.seq]
            for d in self.pending_dir:
                if d[0] < ev.seq:
                    _apply_dir_op(self.durable_names, d)
            self.pending_dir = keep

    def _make_writes_durable(self, fid: int, sync_seq: int) -> None:
        keep = []
        for w in self.pending_writes[fid]:
            if w[0] < sync_seq:
                _write(self.contents[fid], w[1], w[2])
            else:
                keep.append(w)
        self.pending_writes[fid] = keep

    def image(self, variant: str, rnd: random.Random) -> dict[str, bytes]:
        """name -> bytes of the WAL directory after a power loss now."""
        contents = {fid: bytearray(b) for fid, b in self.contents.items()}
        pending = sorted((w + (fid,) for fid, ws in self.pending_writes.items() for w in ws))
        if variant == "all":
            chosen = pending
        elif variant == "prefix":
            chosen = pending[:rnd.randint(0, len(pending))]
        elif variant == "torn":
            chosen = [t for w in pending for t in _sectors(w) if rnd.random() < 0.5]
            rnd.shuffle(chosen)  # reordered, even across files
        else:
            chosen = []
        for _seq, off, data, fid in chosen:
            _write(contents[fid], off, data)
        names = dict(self.durable_names)
        n_dir = len(self.pending_dir) if variant == "all" else rnd.randint(0, len(self.pending_dir))
        for d in self.pending_dir[:n_dir]:
            _apply_dir_op(names, d)
        return {os.path.basename(p): bytes(contents[fid]) for p, fid in names.items()
                if fid is not None}


def _apply_dir_op(names: dict, d) -> None:
    _seq, op, path, dst, fid = d
    if op == "create":
        names[path] = fid
    elif op == "rename":
        names.pop(path, None)
        names[dst] = fid
    elif op == "unlink":
        names.pop(path, None)


def _write(buf: bytearray, off: int, data: bytes) -> None:
    if len(buf) < off + len(data):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off:off + len(data)] = data


def _sectors(w):
    seq, off, data, fid = w
    out = []
    pos = 0
    while pos < len(data):
        cut = min(len(data), (off + pos) // SECTOR * SECTOR + SECTOR - off)
        out.append((seq, off + pos, data[pos:cut], fid))
        pos = cut
    return out


# ---- checking images -------------------------------------------------------------------
def check_image(rec: Recording, wal_files: dict[str, bytes], acked: list, dest: str,
                prepared: tuple = (), effects: tuple = ()) -> dict:
    """Materialize, recover and check one image; returns findings."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(rec.base, dest, ignore=shutil.ignore_patterns("wal"))
    os.makedirs(os.path.join(dest, "wal"), mode=0o700)
    for name, data in wal_files.items():
        with open(os.path.join(dest, "wal", name), "wb") as f:
            f.write(data)
    out = {"lost": [], "errors": []}
    refunded: list[str] = []
    try:
        store = walstore.open(dest, compensators={"refund": lambda a: refunded.append(a.key)})
    except walstore.WalstoreError as e:
        out["errors"].append(f"recovery failed: {e}")
        out["lost"] = [t for _s, t, _w in acked]
        return out
    with store:
        state = dict(store.scan())
        in_doubt = set(store.prepared())
        pending = {a.key for a in store.pending_compensations()}
    for _seq, txid, key in effects:
        # a charge that ran: its transaction committed, or it was refunded (or is owed)
        committed = f"t/{txid}" in state
        if committed and key in refunded:
            out["errors"].append(f"transaction {txid} committed, yet its charge was refunded")
        elif not committed and key not in refunded and key not in pending:
            out["errors"].append(f"transaction {txid} is not committed and its charge "
                                 f"{key} was neither refunded nor listed")
    for _seq, txid, gid, writes in prepared:
        # a PREPARE acknowledged: committed since, or still in doubt, never forgotten
        if state.get(f"t/{txid}") != writes[f"t/{txid}"] and gid not in in_doubt:
            out["lost"].append(txid)
    if in_doubt:  # (decide them, so verify judges the rest: in doubt is exit 1)
        with walstore.open(dest) as s2:
            for gid in in_doubt:
                s2.rollback_prepared(gid)
    for _seq, txid, writes in acked:
        if state.get(f"t/{txid}") != writes[f"t/{txid}"]:
            out["lost"].append(txid)
    balances = [state.get(a) for a in ACCOUNTS]
    if None in balances or sum(balances) != TOTAL or any(b < -10_000 for b in balances):
        out["errors"].append(f"invariant broken: balances {balances}")
    report = verify_store(dest)
    if report.errors:
        out["errors"].extend(report.errors)
    return out


def _covered_by_a_sync(rec: Recording, ack_seq: int, limit: int) -> bool:
    """Under durability "normal"/"none" a commit is owed to survive a power loss only once
    an fsync of a WAL segment that began after its acknowledgement has returned before the
    crash (the flusher's, or a rotation's of the segment holding it)."""
    return any(e.op in ("fsync", "fdatasync") and e.seq > ack_seq and e.done_seq is not None
               and e.done_seq <= limit and e.path.endswith(".wal")
               for e in rec.events)


def run(images: int, seed: int = 0, commits: int = 120, lie_about_dir_fsync: bool = False,
        workdir: str | None = None, threads: int = 1, durability: str = "full",
        twophase: bool = False, actions: bool = False) -> dict:
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="walstore-powerloss-")
    rnd = random.Random(seed)
    try:
        rec = record_workload(workdir, commits, seed, lie_about_dir_fsync, threads,
                              durability, twophase, actions)
        summary = _summary(acks=len(rec.acks), shared_writes=_shared_writes(rec),
                           prepares=len(rec.prepares), effects=len(rec.effects))
        # half the images right after a directory fsync (a new segment just became
        # durable: what the old one holds then is what a rotation got right or wrong),
        # the rest anywhere
        after_dir = [i + 1 for i, e in enumerate(rec.events) if e.op == "fsync_dir"]
        points = rnd.sample(after_dir, min(len(after_dir), images // 2))
        rest = images - len(points)
        points += rnd.sample(range(len(rec.events) + 1), min(rest, len(rec.events) + 1))
        points += [rnd.randint(0, len(rec.events)) for _ in range(images - len(points))]
        for i, point in enumerate(sorted(points)):
            model = _FileModel(rec)
            for ev in rec.events[:point]:
                model.replay(ev)
            variant = VARIANTS[i % len(VARIANTS)]
            limit = rec.events[point - 1].seq if point else -1  # the crash comes after it
            acked = [a for a in rec.acks if a[0] <= limit]
            prepared = [p for p in rec.prepares if p[0] <= limit]
            effects = [e for e in rec.effects if e[0] <= limit] if durability != "none" else []
            if durability != "full":  # (2PC's PREPARE and decision: forced, but by "none")
                acked = [a for a in acked if _covered_by_a_sync(rec, a[0], limit)
                         or (a[1] in rec.forced and durability == "normal")]
                if durability == "none":
                    prepared = [p for p in prepared if _covered_by_a_sync(rec, p[0], limit)]
            found = check_image(rec, model.image(variant, rnd), acked,
                                os.path.join(workdir, "image"), prepared, effects)
            _tally(summary, point, variant, acked, found)
        return summary
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def _shared_writes(rec: Recording) -> int:
    """WAL writes that carried more than one record (a group commit's batch)."""
    n = 0
    for e in rec.events:
        if e.op == "pwrite" and e.data and len(e.data) > 28:
            length = int.from_bytes(e.data[4:8], "little")
            n += len(e.data) > 28 + length and e.data[28 + length + 10:28 + length + 12] == b"WR"
    return n


def _summary(**extra) -> dict:
    return dict({"images": 0, "acks_checked": 0, "lost_commits": 0, "broken_images": 0,
                 "by_variant": {v: 0 for v in VARIANTS}, "examples": []}, **extra)


def _tally(summary: dict, point: int, variant: str, acked: list, found: dict) -> None:
    """Count one checked image into ``summary`` (a few broken ones kept as examples)."""
    summary["images"] += 1
    summary["by_variant"][variant] += 1
    summary["acks_checked"] += len(acked)
    summary["lost_commits"] += len(found["lost"])
    if found["lost"] or found["errors"]:
        summary["broken_images"] += 1
        if len(summary["examples"]) < 3:
            summary["examples"].append({"point": point, "variant": variant, **found})


# ---- workspace files: reversible-file transactions -------------------------------------
# A second workload: transactions of file operations on a registered workspace (and a
# key "ver" = the transaction's number), some rolled back (whole, or to a savepoint).
# Everything walstore writes outside LMDB is recorded — the WAL, the blob store, the
# workspace's temp files, renames, directories, symlinks and modes (mkdir / rmdir /
# symlink / chmod / fchmod through walstore.files.fsops) — and replayed into a model of
# the file system: data is durable once its file is fsynced; namespace and mode changes
# form one ordered journal, durable up to an fsync_dir that returned after them (as on
# ext4), and an image keeps a random prefix of the rest.  Each image is recovered and the
# workspace must be EXACTLY the tree committed by the transaction the recovered store
# names (``ver``): the pre-transaction tree or the committed one, never a mix; and never
# older than the last acknowledged commit.


class TreeRecorder(FaultBackend):
    """A recording FaultBackend that also sees the files package's directory, symlink and
    mode calls (``walstore.files.fsops``)."""

    def mkdir(self, path, mode):
        os.mkdir(path, mode)
        self._event(op="mkdir", path=real_path(os.fsdecode(path)), flags=mode)

    def rmdir(self, path):
        os.rmdir(path)
        self._event(op="rmdir", path=real_path(os.fsdecode(path)))

    def symlink(self, target, path):
        os.symlink(target, path)
        self._event(op="symlink", path=real_path(os.fsdecode(path)), data=os.fsencode(target))

    def chmod(self, path, mode):
        p = real_path(os.fsdecode(path))
        os.chmod(path, mode)
        self._event(op="chmod", path=p, flags=mode)

    def fchmod(self, fd, mode):
        os.fchmod(fd, mode)  # (the fd's file from the kernel: fds are reused)
        self._event(op="chmod", path=os.readlink(f"/proc/self/fd/{fd}"), flags=mode)


@dataclass
class _Inode:
    kind: str                 # file | dir | symlink
    mode: int
    target: bytes = b""


class _TreeModel:
    """Durable and pending state of the modeled directories (see the section comment)."""

    def __init__(self, roots: dict[str, str], more: tuple[str, ...] = ()) -> None:
        """``roots``: live directory -> its copy at the base moment; ``more``: live
        directories that did not exist then (modeled from empty)."""
        self.roots = list(roots) + list(more)
        self.inodes: dict[int, _Inode] = {}
        self.data: dict[int, bytearray] = {}
        self.pending_writes: dict[int, list] = {}
        self.names: dict[str, int] = {}        # live namespace
        self.durable: dict[str, int] = {}      # durable namespace
        self.dmode: dict[int, int] = {}        # durable modes
        self.journal: list = []                # pending (seq, op, path, dst, ino, mode)
        self._ids = itertools.count(1)
        for live, base in roots.items():       # live path -> its copy at the base moment
            self._load(live, base)

    def _load(self, live: str, base: str) -> None:
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                rel = live + p[len(base):]
                if stat.S_ISLNK(st.st_mode):
                    ino = self._new("symlink", 0, os.fsencode(os.readlink(p)))
                elif stat.S_ISDIR(st.st_mode):
                    ino = self._new("dir", stat.S_IMODE(st.st_mode))
                else:
                    ino = self._new("file", stat.S_IMODE(st.st_mode))
                    with open(p, "rb") as f:
                        self.data[ino] = bytearray(f.read())
                self.names[rel] = self.durable[rel] = ino
                self.dmode[ino] = self.inodes[ino].mode

    def _new(self, kind: str, mode: int, target: bytes = b"") -> int:
        ino = next(self._ids)
        self.inodes[ino] = _Inode(kind, mode, target)
        self.data[ino] = bytearray()
        self.pending_writes[ino] = []
        self.dmode[ino] = mode
        return ino

    def covers(self, path: str | None) -> bool:
        return path is not None and any(path == r or path.startswith(r + "/")
                                        for r in self.roots)

    def replay(self, ev) -> None:
        op, path = ev.op, ev.path
        if op == "mark" or (op != "syncfs" and not self.covers(path)):
            return
        if op == "open":
            if path in self.names and not ev.flags & os.O_TRUNC:
                return
            if path in self.names:  # truncated: a new content from here (a simplification)
                ino = self.names[path]
                self.pending_writes[ino].append((ev.seq, 0, None))
                return
            ino = self._new("file", fileio.FILE_MODE)
            self.names[path] = ino
            self.journal.append((ev.seq, "link", path, None, ino, None))
        elif op == "mkdir":
            ino = self._new("dir", ev.flags)
            self.names[path] = ino
            self.journal.append((ev.seq, "link", path, None, ino, None))
        elif op == "symlink":
            ino = self._new("symlink", 0, ev.data)
            self.names[path] = ino
            self.journal.append((ev.seq, "link", path, None, ino, None))
        elif op == "pwrite" and path in self.names:
            self.pending_writes[self.names[path]].append((ev.seq, ev.offset, ev.data))
        elif op == "chmod" and path in self.names:
            ino = self.names[path]
            self.inodes[ino].mode = ev.flags
            self.journal.append((ev.seq, "chmod", path, None, ino, ev.flags))
        elif op in ("fsync", "fdatasync") and ev.done_seq is not None and path in self.names:
            ino = self.names[path]
            self._writes_durable(ino, ev.seq)
            if op == "fsync":  # an inode's own mode goes with its fsync
                for j in [j for j in self.journal if j[1] == "chmod" and j[4] == ino
                          and j[0] < ev.seq]:
                    self.dmode[ino] = j[5]
                    self.journal.remove(j)
        elif op == "rename" and path in self.names:
            _move(self.names, path, ev.dst)
            self.journal.append((ev.seq, "rename", path, ev.dst, None, None))
        elif op in ("unlink", "rmdir"):
            self.names.pop(path, None)
            self.journal.append((ev.seq, "unlink", path, None, None, None))
        elif op == "syncfs" and ev.done_seq is not None:
            # the whole file system (the workload's directories share one): every write,
            # mode and name change made before it is durable
            for ino in self.pending_writes:
                self._writes_durable(ino, ev.seq)
            self._journal_durable(ev.seq)
        elif op == "fsync_dir" and ev.done_seq is not None:
            # the journal commits in order: every metadata change made before this sync
            self._journal_durable(ev.seq)

    def _writes_durable(self, ino: int, seq: int) -> None:
        """The inode's writes made before ``seq`` reach its durable content."""
        keep = []
        for w in self.pending_writes[ino]:
            if w[0] < seq:
                _write_or_truncate(self.data[ino], w[1], w[2])
            else:
                keep.append(w)
        self.pending_writes[ino] = keep

    def _journal_durable(self, seq: int) -> None:
        """Every metadata change made before ``seq`` is durable, in order."""
        keep = []
        for j in self.journal:
            if j[0] < seq:
                _journal_apply(self.durable, self.dmode, j)
            else:
                keep.append(j)
        self.journal = keep

    def image(self, variant: str, rnd: random.Random) -> dict[str, tuple]:
        """path -> ("file", mode, bytes) | ("dir", mode) | ("symlink", target)."""
        data = {i: bytearray(b) for i, b in self.data.items()}
        pending = sorted((w[0], w[1], w[2], i) for i, ws in self.pending_writes.items()
                         for w in ws)
        if variant == "all":
            chosen = pending
        elif variant == "prefix":
            chosen = pending[:rnd.randint(0, len(pending))]
        elif variant == "torn":
            chosen = [t for w in pending for t in (_sectors(w) if w[2] is not None else [w])
                      if rnd.random() < 0.5]
            rnd.shuffle(chosen)
        else:
            chosen = []
        for _seq, off, chunk, ino in chosen:
            _write_or_truncate(data[ino], off, chunk)
        names, modes = dict(self.durable), dict(self.dmode)
        n = len(self.journal) if variant == "all" else rnd.randint(0, len(self.journal))
        for j in self.journal[:n]:
            _journal_apply(names, modes, j)
        out = {}
        for path, ino in names.items():
            node = self.inodes[ino]
            if node.kind == "file":
                out[path] = ("file", modes[ino], bytes(data[ino]))
            elif node.kind == "dir":
                out[path] = ("dir", modes[ino])
            else:
                out[path] = ("symlink", node.target)
        return out


def _write_or_truncate(buf: bytearray, off: int, data: bytes | None) -> None:
    if data is None:
        del buf[off:]
    else:
        _write(buf, off, data)


def _move(names: dict, src: str, dst: str) -> None:
    """A rename in a namespace: ``src`` and everything under it go to ``dst`` (whatever
    was at ``dst`` is replaced)."""
    for p in [p for p in names if p == dst or p.startswith(dst + "/")]:
        if p == dst:
            del names[p]
    moved = {p: names.pop(p) for p in [p for p in names if p == src
                                        or p.startswith(src + "/")]}
    for p, ino in moved.items():
        names[dst + p[len(src):]] = ino


def _journal_apply(names: dict, modes: dict, j) -> None:
    _seq, op, path, dst, ino, mode = j
    if op == "link":
        names[path] = ino
    elif op == "rename":
        if path in names:
            _move(names, path, dst)
    elif op == "unlink":
        names.pop(path, None)
    elif op == "chmod":
        modes[ino] = mode


def _materialize(image: dict[str, tuple], live_root: str, dest_root: str) -> None:
    """Write the image's paths under ``live_root`` at ``dest_root`` (parents first)."""
    shutil.rmtree(dest_root, ignore_errors=True)
    os.makedirs(dest_root)
    for path in sorted(p for p in image if p.startswith(live_root + "/")):
        kind = image[path]
        out = dest_root + path[len(live_root):]
        if not os.path.isdir(os.path.dirname(out)):
            continue  # its directory did not survive: neither does it
        if kind[0] == "dir":
            os.mkdir(out)
        elif kind[0] == "symlink":
            os.symlink(kind[1], out)
        else:
            with open(out, "wb") as f:
                f.write(kind[2])
    for path in sorted((p for p in image if p.startswith(live_root + "/")), reverse=True):
        kind = image[path]
        out = dest_root + path[len(live_root):]
        if kind[0] in ("dir", "file") and os.path.lexists(out):
            os.chmod(out, kind[1])


def _tree(root: str) -> dict[str, tuple]:
    """A workspace as tests/files_support.tree_state sees it (type, mode, content hash,
    symlink target; empty directories included)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = p[len(root) + 1:]
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode),
                                hashlib.sha256(f.read()).hexdigest())
    return out


FILES_OPTS = dict(durability="full", segment_size=64 * 1024, apply_batch=10**9,
                  apply_interval=3600.0, checkpoint_bytes=1 << 40)
FILES_TREE = {"README.md": b"hello\n", "src/app.py": b"print('v1')\n",
              "src/lib/util.py": b"def f(): pass\n", "conf/app.toml": b"debug = 0\n",
              "docs/guide.md": b"# guide\n"}


@dataclass
class FilesRecording:
    base_store: str
    base_ws: str
    live_store: str
    ws: str
    events: list
    trees: dict                                # "ver" -> the committed tree
    acks: list = field(default_factory=list)  # (seq, ver)
    synced: list = field(default_factory=list)  # seqs of the marks after store.sync()


def record_files_workload(workdir: str, txns: int = 30, seed: int = 0,
                          lie_about_file_fsync: bool = False,
                          durability: str = "full", sync_each: bool = False,
                          lie_about_syncfs: bool = False) -> FilesRecording:
    """``sync_each``: ``store.sync()`` after every commit, a "synced" mark after it (the
    points where, under durability "none", the log and the workspace must agree)."""
    rnd = random.Random(seed)
    live, ws = os.path.join(workdir, "live"), os.path.join(workdir, "ws")
    for rel, data in FILES_TREE.items():
        os.makedirs(os.path.dirname(os.path.join(ws, rel)), exist_ok=True)
        with open(os.path.join(ws, rel), "wb") as f:
            f.write(data)
    with walstore.open(live, **FILES_OPTS) as s:  # registered, blob store made, applied
        w = s.workspace(ws)
        with s.transaction() as tx:
            tx.files(w).write("README.md", "hello\n")
            tx.put("ver", 0)
    opts = dict(FILES_OPTS)
    if durability != "full":  # (see record_workload)
        opts.update(durability=durability, sync_interval=0.002)
    store = walstore.open(live, **opts)
    w = store.workspace(ws)
    _spare_settled(store)
    base_store, base_ws = os.path.join(workdir, "base-store"), os.path.join(workdir, "base-ws")
    shutil.copytree(live, base_store, symlinks=True)
    shutil.copytree(ws, base_ws, symlinks=True)
    fb = TreeRecorder(record=True)
    rec = FilesRecording(base_store, base_ws, live, ws, fb.events, {0: _tree(ws)})
    with installed(fb):
        for ver in range(1, txns + 1):
            tx = store.transaction(meta={"ver": ver})
            f = tx.files(w)
            for _ in range(rnd.randint(1, 3)):
                _one_file_op(f, ws, rnd, ver)
            if rnd.random() < 0.3:
                sp = tx.savepoint()
                _one_file_op(f, ws, rnd, ver)
                tx.rollback_to(sp)
            if rnd.random() < 0.2:
                tx.rollback()
                continue
            tx.put("ver", ver)
            tx.commit()
            rec.trees[ver] = _tree(ws)
            rec.acks.append((fb.mark("ack", ver).seq, ver))
            if sync_each:
                store.sync()
                rec.synced.append(fb.mark("synced", ver).seq)
    store._drop_like_a_crash()
    if lie_about_syncfs:  # a broken engine: sync() never syncs the workspace
        rec.events = [e for e in rec.events if e.op != "syncfs"]
    if lie_about_file_fsync:  # a broken engine: the workspace's files never fsynced
        rec.events = [e for e in rec.events if not (e.op == "fsync" and e.path
                                                    and e.path.startswith(ws + "/"))]
    return rec


def _one_file_op(f, ws: str, rnd: random.Random, ver: int) -> None:
    """A random operation valid on the workspace as it is now."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(ws):
        rel = os.path.relpath(dirpath, ws)
        dirs += [os.path.normpath(os.path.join(rel, d)) for d in dirnames]
        files += [os.path.normpath(os.path.join(rel, n)) for n in filenames
                  if not os.path.islink(os.path.join(dirpath, n))]
    pick = rnd.random()
    size = rnd.choice((10, 700, 5000))
    data = f"v{ver} ".encode() + os.urandom(size // 2).hex().encode()
    if pick < 0.35 and files:
        f.write(rnd.choice(files), data)
    elif pick < 0.5:
        f.write(f"new/d{ver}/n{rnd.randint(0, 9)}.txt", data, mode=rnd.choice((0o600, 0o644)))
    elif pick < 0.6 and files:
        f.delete(rnd.choice(files))
    elif pick < 0.7 and files:
        f.rename(rnd.choice(files), f"moved/m{ver}-{rnd.randint(0, 99)}.txt")
    elif pick < 0.78:
        f.mkdir(f"made/k{ver}-{rnd.randint(0, 99)}", mode=0o750)
    elif pick < 0.85 and dirs:
        f.rmtree(rnd.choice(dirs))
    elif pick < 0.92:
        f.symlink(f"ln{ver}-{rnd.randint(0, 9)}", rnd.choice(files or ["README.md"]))
    elif files:
        f.chmod(rnd.choice(files), rnd.choice((0o600, 0o640, 0o755)))


def check_files_image(rec: FilesRecording, image: dict, acked: list, dest: str) -> dict:
    """Materialize one image (the workspace at its registered path), recover, check."""
    out = {"lost": [], "errors": []}
    for sub in ("wal", "files", "quarantine"):
        _materialize(image, os.path.join(rec.live_store, sub), os.path.join(dest, sub))
    shutil.copytree(os.path.join(rec.base_store, "db"), os.path.join(dest, "db"),
                    dirs_exist_ok=True)
    for name in ("STORE", "LOCK"):
        shutil.copy(os.path.join(rec.base_store, name), os.path.join(dest, name))
    _materialize(image, rec.ws, rec.ws)
    try:
        store = walstore.open(dest)
    except walstore.WalstoreError as e:
        out["errors"].append(f"recovery failed: {e}")
        return out
    with store:
        ver = store.get("ver")
        conflicts = store.last_recovery.file_conflicts
    last_acked = acked[-1][1] if acked else 0
    if ver is None or ver < last_acked:
        out["lost"].append(last_acked)
    if conflicts:
        out["errors"].append(f"file conflicts after recovery: {conflicts[:2]}")
    got = _tree(rec.ws)
    want = rec.trees.get(ver)
    if want is None or got != want:
        diff = sorted(set(got.items()) ^ set((want or {}).items()))[:4]
        out["errors"].append(f"the workspace is not the tree committed by ver {ver}: {diff}")
    report = verify_store(dest)
    if report.errors:
        out["errors"].extend(report.errors)
    return out


def run_files(images: int, seed: int = 0, txns: int = 30, workdir: str | None = None,
              lie_about_file_fsync: bool = False, durability: str = "full",
              after_syncs: bool = False, lie_about_syncfs: bool = False) -> dict:
    """``after_syncs``: the workload calls ``store.sync()`` after each commit and the
    images are taken right after those calls returned (under durability "none" the only
    points where the log and the workspace are owed to agree)."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="walstore-powerloss-files-")
    rnd = random.Random(seed)
    try:
        rec = record_files_workload(workdir, txns, seed, lie_about_file_fsync, durability,
                                    sync_each=after_syncs, lie_about_syncfs=lie_about_syncfs)
        summary = _summary(trees_checked=0, events=len(rec.events), commits=len(rec.acks))
        if after_syncs:
            at = {e.seq: i for i, e in enumerate(rec.events)}
            after = [at[q] + 1 for q in rec.synced if q in at]
            points = sorted(rnd.sample(after, min(images, len(after))))
        else:
            points = sorted(rnd.sample(range(len(rec.events) + 1),
                                       min(images, len(rec.events) + 1)))
        roots = {rec.ws: rec.base_ws}
        for sub in ("wal", "files", "quarantine"):
            if os.path.isdir(os.path.join(rec.base_store, sub)):
                roots[os.path.join(rec.live_store, sub)] = os.path.join(rec.base_store, sub)
        model = _TreeModel(roots, more=(os.path.join(rec.live_store, "quarantine"),))
        done = 0
        for i, point in enumerate(points):
            for ev in rec.events[done:point]:
                model.replay(ev)
            done = point
            variant = VARIANTS[i % len(VARIANTS)]
            limit = rec.events[point - 1].seq if point else -1
            acked = [a for a in rec.acks if a[0] <= limit]
            if durability != "full":
                acked = [a for a in acked if _covered_by_a_sync(rec, a[0], limit)]
            found = check_files_image(rec, model.image(variant, rnd), acked,
                                      os.path.join(workdir, f"image{i}"))
            shutil.rmtree(os.path.join(workdir, f"image{i}"), ignore_errors=True)
            summary["trees_checked"] += 1
            _tally(summary, point, variant, acked, found)
        return summary
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="power-loss images of a recorded workload")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--commits", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="committing threads (their records share the group commit's "
                         "writes)")
    ap.add_argument("--durability", choices=("full", "normal", "none"), default="full",
                    help="the recorded store's durability (\"normal\": an image owes only "
                         "the commits an fsync started after their acknowledgement covered)")
    ap.add_argument("--twophase", action="store_true",
                    help="every third transfer is prepared, then commit_prepared (a "
                         "PREPARE acknowledged must be committed or in doubt in an image)")
    ap.add_argument("--actions", action="store_true",
                    help="each transfer runs an action (an intent forced durable before its "
                         "body): a charge that ran is committed or refunded in every image")
    ap.add_argument("--files", action="store_true",
                    help="the reversible-files workload (a workspace's files, the blob "
                         "store and the WAL); --commits is its number of transactions")
    args = ap.parse_args()
    if args.files:
        s = run_files(args.images, args.seed, args.commits)
        print(f"power-loss images (workspace files): {s['images']} ({s['by_variant']}), "
              f"{s['events']} recorded I/O events, {s['commits']} commits; acknowledged "
              f"commits checked: {s['acks_checked']}, commits lost: {s['lost_commits']}, "
              f"trees checked: {s['trees_checked']}, broken images: {s['broken_images']}")
    else:
        s = run(args.images, args.seed, args.commits, threads=args.threads,
                durability=args.durability, twophase=args.twophase, actions=args.actions)
        print(f"power-loss images: {s['images']} ({s['by_variant']}), acknowledged commits "
              f"checked: {s['acks_checked']}, commits lost: {s['lost_commits']}, broken "
              f"images: {s['broken_images']}; {args.threads} thread(s), {s['acks']} commits, "
              f"{s['shared_writes']} WAL writes carrying several records")
    for ex in s["examples"]:
        print("  example:", ex)
    sys.exit(1 if s["lost_commits"] or s["broken_images"] else 0)


if __name__ == "__main__":
    main()
