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
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402
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


def record_workload(workdir: str, commits: int = 120, seed: int = 0,
                    lie_about_dir_fsync: bool = False) -> Recording:
    """Run transfers (with savepoint rollbacks) under a recording backend."""
    rnd = random.Random(seed)
    live = os.path.join(workdir, "live")
    opts = dict(durability="full", segment_size=16 * 1024, apply_batch=10**9,
                apply_interval=3600.0, checkpoint_bytes=1 << 40)
    with walstore.open(live, **opts) as s:
        with s.transaction() as tx:
            for a in ACCOUNTS:
                tx.put(a, TOTAL // len(ACCOUNTS))
    store = walstore.open(live, **opts)
    base = os.path.join(workdir, "base")
    shutil.copytree(live, base)
    fb = FaultBackend(record=True)
    rec = Recording(base, os.path.join(live, "wal"), fb.events)
    with installed(fb):
        for _ in range(commits):
            txid, writes = _one_transfer(store, rnd)
            if txid is not None:
                rec.acks.append((fb.mark("ack", txid).seq, txid, writes))
    store._drop_like_a_crash()
    if lie_about_dir_fsync:  # a broken engine: as if directories were never fsynced
        rec.events = [e for e in rec.events if e.op != "fsync_dir"]
    return rec


def _one_transfer(store, rnd: random.Random):
    src, dst = rnd.sample(ACCOUNTS, 2)
    amount = rnd.randint(1, 20)
    with store.transaction(meta={"transfer": amount}) as tx:
        a, b = tx.get(src), tx.get(dst)
        with tx.savepoint("noise") as sp:
            tx.put(src, -999_999)          # garbage that must never be seen
            tx.rollback_to(sp)
        pad = "p" * rnd.choice((10, 300, 3000))  # varied sizes: records span sectors
        writes = {src: a - amount, dst: b + amount, f"t/{tx.id}": {"amount": amount, "pad": pad}}
        for k, v in writes.items():
            tx.put(k, v)
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
def check_image(rec: Recording, wal_files: dict[str, bytes], acked: list, dest: str) -> dict:
    """Materialize, recover and check one image; returns findings."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(rec.base, dest, ignore=shutil.ignore_patterns("wal"))
    os.makedirs(os.path.join(dest, "wal"), mode=0o700)
    for name, data in wal_files.items():
        with open(os.path.join(dest, "wal", name), "wb") as f:
            f.write(data)
    out = {"lost": [], "errors": []}
    try:
        store = walstore.open(dest)
    except walstore.WalstoreError as e:
        out["errors"].append(f"recovery failed: {e}")
        out["lost"] = [t for _s, t, _w in acked]
        return out
    with store:
        state = dict(store.scan())
    for _seq, txid, writes in acked:
        if state.get(f"t/{txid}") != writes[f"t/{txid}"]:
            out["lost"].append(txid)
    balances = [state.get(a) for a in ACCOUNTS]
    if None in balances or sum(balances) != TOTAL or any(b < -10_000 for b in balances):
        out["errors"].append(f"invariant broken: balances {balances}")
    report = verify_store(dest)
    if not report.ok:
        out["errors"].extend(report.errors)
    return out


def run(images: int, seed: int = 0, commits: int = 120, lie_about_dir_fsync: bool = False,
        workdir: str | None = None) -> dict:
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="walstore-powerloss-")
    rnd = random.Random(seed)
    try:
        rec = record_workload(workdir, commits, seed, lie_about_dir_fsync)
        summary = {"images": 0, "acks_checked": 0, "lost_commits": 0, "broken_images": 0,
                   "by_variant": {v: 0 for v in VARIANTS}, "examples": []}
        points = sorted(rnd.sample(range(len(rec.events) + 1),
                                   min(images, len(rec.events) + 1)))
        points += [rnd.randint(0, len(rec.events)) for _ in range(images - len(points))]
        for i, point in enumerate(sorted(points)):
            model = _FileModel(rec)
            for ev in rec.events[:point]:
                model.replay(ev)
            variant = VARIANTS[i % len(VARIANTS)]
            limit = rec.events[point - 1].seq if point else -1  # the crash comes after it
            acked = [a for a in rec.acks if a[0] <= limit]
            found = check_image(rec, model.image(variant, rnd), acked,
                                os.path.join(workdir, "image"))
            summary["images"] += 1
            summary["by_variant"][variant] += 1
            summary["acks_checked"] += len(acked)
            summary["lost_commits"] += len(found["lost"])
            if found["lost"] or found["errors"]:
                summary["broken_images"] += 1
                if len(summary["examples"]) < 3:
                    summary["examples"].append({"point": point, "variant": variant, **found})
        return summary
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="power-loss images of a recorded workload")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--commits", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = run(args.images, args.seed, args.commits)
    print(f"power-loss images: {s['images']} ({s['by_variant']}), acknowledged commits "
          f"checked: {s['acks_checked']}, commits lost: {s['lost_commits']}, broken images: "
          f"{s['broken_images']}")
    for ex in s["examples"]:
        print("  example:", ex)
    sys.exit(1 if s["lost_commits"] or s["broken_images"] else 0)


if __name__ == "__main__":
    main()
