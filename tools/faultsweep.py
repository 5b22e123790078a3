"""I/O fault sweep: ENOSPC and EIO at every file-I/O call of a workload, one at a time.

A fixed workload (commits with rotation into new segments, a checkpoint, more commits)
runs once under ``tools.faults.FaultBackend`` to count its calls of each kind (pwrite,
fsync, fdatasync, fsync_dir, open, rename, unlink).  Then, for every call number n and
both errnos, it runs again with the n-th call failing and checks the promises of
contract section 4.6:

- the operation in hand fails with an error (never silently, never a crash of the process);
- after an fsync-type failure the store is read-only: every later commit raises
  ReadOnlyError, and no fsync is retried on the failed descriptor;
- after a write failure (ENOSPC) the store carries on once the fault is gone;
- every commit acknowledged before (and after) the fault survives a reopen, and
  ``verify`` passes.

    python tools/faultsweep.py            # prints faults injected, acks checked, lost
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402
from tools.faults import FaultBackend, installed  # noqa: E402
from walstore.ops.verify import verify_store  # noqa: E402

SITES = ("pwrite", "fsync", "fdatasync", "fsync_dir", "open", "rename", "unlink")
SYNC_OPS = ("fsync", "fdatasync", "fsync_dir")
OPTS = dict(durability="full", segment_size=16 * 1024, checkpoint_bytes=1 << 40,
            apply_interval=3600.0)


def workload(path: str, acked: dict, clock=lambda: 0) -> None:
    """Commits (rotating segments), a checkpoint, more commits; records what was acked
    (key -> (value, ``clock()`` when the commit returned))."""
    store = walstore.open(path, **OPTS)
    try:
        for i in range(30):
            _commit(store, f"a{i}", "x" * (i * 37 % 900), acked, clock)
        try:
            store.checkpoint()
        except (walstore.WalstoreError, OSError):
            pass
        for i in range(20):
            _commit(store, f"b{i}", i, acked, clock)
    finally:
        try:
            store.close()
        except walstore.WalstoreError:
            store._drop_like_a_crash()


def _commit(store, key: str, value, acked: dict, clock=lambda: 0) -> None:
    try:
        with store.transaction() as tx:
            tx.put(key, value)
        acked[key] = (value, clock())
    except (walstore.WalstoreError, OSError):
        pass  # the transaction in hand failed: that is allowed, it was not acknowledged


def count_calls(root: str) -> dict[str, int]:
    fb = FaultBackend()
    with installed(fb):
        workload(os.path.join(root, "count"), {})
    return {op: len(fb.calls_to(op)) for op in SITES}


def one_fault(root: str, op: str, nth: int, err: int) -> dict:
    path = os.path.join(root, f"f-{op}-{nth}-{err}")
    fb = FaultBackend()
    rule = fb.fail(op, err, nth=nth)
    acked: dict = {}
    crashed = None
    with installed(fb):
        try:
            workload(path, acked, fb.now)
        except (walstore.WalstoreError, OSError) as e:  # e.g. the open itself failed
            crashed = e
    out = {"fired": rule.fired, "lost": [], "errors": [], "open_failed": crashed is not None}
    if rule.fired and op in SYNC_OPS:
        failed_at = _failed_seq(fb, op)
        retried = [c for c in fb.calls_to(op) if c.seq > failed_at and
                   c.fd is not None and c.fd == _failed_fd(fb, op)]
        if retried:
            out["errors"].append(f"fsync retried on the failed descriptor ({len(retried)}x)")
        late = [k for k, (_v, t) in acked.items() if t > failed_at]
        if late:
            out["errors"].append(f"commits acknowledged after an fsync failure: {late[:3]}")
    if not os.path.exists(os.path.join(path, "STORE")):
        return out  # the fault hit store creation: nothing was acknowledged
    try:
        with walstore.open(path) as s:
            state = dict(s.scan())
            _commit(s, "after-fault", 1, acked)  # the store carries on after reopening
    except walstore.WalstoreError as e:
        out["errors"].append(f"reopen failed: {e}")
        out["lost"] = list(acked)
        return out
    out["lost"] = [k for k, (v, _t) in acked.items() if k != "after-fault" and state.get(k) != v]
    rep = verify_store(path)
    if not rep.ok:
        out["errors"] += rep.errors
    shutil.rmtree(path, ignore_errors=True)
    return out


def _failed_seq(fb: FaultBackend, op: str) -> int:
    failed = [c for c in fb.calls_to(op) if c.injected]
    return failed[0].seq if failed else 1 << 62


def _failed_fd(fb: FaultBackend, op: str):
    failed = [c for c in fb.calls_to(op) if c.injected]
    return failed[0].fd if failed else None


def sweep(root: str, stride: int = 1, progress=None) -> dict:
    counts = count_calls(root)
    summary = {"calls": counts, "faults": 0, "fired": 0, "lost": 0, "broken": []}
    for op, n in counts.items():
        for nth in range(1, n + 1, stride):
            for err in (errno.ENOSPC, errno.EIO):
                res = one_fault(root, op, nth, err)
                summary["faults"] += 1
                summary["fired"] += bool(res["fired"])
                summary["lost"] += len(res["lost"])
                if res["lost"] or res["errors"]:
                    summary["broken"].append({"op": op, "nth": nth, "errno": err, **res})
        if progress:
            progress(f"  {op}: {n} call sites swept")
    return summary


def main() -> None:
    root = tempfile.mkdtemp(prefix="walstore-faultsweep-")
    try:
        s = sweep(root, progress=print)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"I/O faults injected: {s['faults']} ({s['fired']} fired; ENOSPC and EIO at every "
          f"call of {s['calls']}), acknowledged commits lost: {s['lost']}, broken: "
          f"{len(s['broken'])}")
    for b in s["broken"][:5]:
        print("  ", b)
    sys.exit(1 if s["broken"] else 0)


if __name__ == "__main__":
    main()
