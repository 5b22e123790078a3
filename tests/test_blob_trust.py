"""A put of content already stored writes nothing: it trusts the blob there.  That blob's
directory entry must be durable, or a power loss can drop the only before-image of a
file walstore then changes (probe-review40):

- a batch's flush that failed half-way (ENOSPC making a fan-out directory) left the
  blobs it had named without their directories' fsync, and later puts trusted them;
- a writer killed between naming a blob and fsyncing its directory left one a reopened
  store trusted.

Each test runs a real process that only observes ``os.rename``/``os.fsync`` (injecting
one ENOSPC into ``os.mkdir`` for the first), and checks that every blob a committed
file operation trusted had its directory fsynced after it was named."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

OBSERVE = r"""
import errno, hashlib, json, os, sys
events = []
_mkdir, _rename, _fsync = os.mkdir, os.rename, os.fsync
def _logged_rename(a, b, *x, **k):
    _rename(a, b, *x, **k)
    events.append(["rename", os.fsdecode(b)])
def _logged_fsync(fd):
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        where = ""
    _fsync(fd)
    if os.path.isdir(where):
        events.append(["fsync_dir", where])
os.rename, os.fsync = _logged_rename, _logged_fsync
def digest_of(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
"""


def _trusted_unsynced(events: list, blobs_dir: str, digest: str) -> bool:
    """Was blob ``digest`` named and its directory never fsynced after (in ``events``)?"""
    path = os.path.join(blobs_dir, digest[:2], digest[2:])
    named = [i for i, (op, p) in enumerate(events) if op == "rename" and p == path]
    if not named:
        return False
    return not any(op == "fsync_dir" and p == os.path.dirname(path)
                   for op, p in events[named[-1] + 1:])


def test_a_failed_batch_flush_leaves_no_blob_trusted_unsynced(tmp_path):
    code = OBSERVE + r"""
import walstore
base = sys.argv[1]
tree, store = os.path.join(base, "tree"), os.path.join(base, "store")
os.mkdir(tree)
for i in range(12):
    open(os.path.join(tree, f"f{i:02d}.txt"), "w").write(f"content number {i}\n")
s = walstore.open(store, durability="full")
ws = s.workspace(tree)
with s.transaction() as tx:
    tx.put("k", 1)
blobs = os.path.join(store, "files", "blobs")
made = [0]
def _full_disk_mkdir(p, mode=0o777, *a, **k):
    q = os.fsdecode(p)
    if os.path.dirname(q) == blobs and len(os.path.basename(q)) == 2:
        made[0] += 1
        if made[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", q)
    return _mkdir(p, mode, *a, **k)
os.mkdir = _full_disk_mkdir
try:
    with s.transaction() as tx:
        with tx.files(ws).watch():
            pass
    raise SystemExit("no failure was injected")
except walstore.StoreIOError:
    pass
os.mkdir = _mkdir
digests = {}
for i in range(12):
    name = f"f{i:02d}.txt"
    digests[name] = digest_of(os.path.join(tree, name))
    with s.transaction() as tx:  # (its before-image: stored already, or stored now)
        tx.files(ws).write(name, "overwritten\n")
s.close()
print(json.dumps({"events": events, "digests": digests, "blobs": blobs}))
"""
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    bad = [n for n, d in out["digests"].items()
           if _trusted_unsynced(out["events"], out["blobs"], d)]
    assert not bad, f"committed over before-images whose directory was never fsynced: {bad}"


def test_a_reopened_store_trusts_a_blob_only_once_its_directory_is_synced(tmp_path):
    tree, store = str(tmp_path / "tree"), str(tmp_path / "store")
    os.mkdir(tree)
    with open(os.path.join(tree, "a.txt"), "w") as f:
        f.write("the before-image\n")
    # a writer killed right after naming a.txt's blob (before its directory's fsync)
    killer = OBSERVE + r"""
import walstore
tree, store = sys.argv[1], sys.argv[2]
s = walstore.open(store, durability="full")
ws = s.workspace(tree)
with s.transaction() as tx:
    tx.put("k", 1)
blobs = os.path.join(store, "files", "blobs")
want = digest_of(os.path.join(tree, "a.txt"))
def _killed_after_naming(fd):
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        where = ""
    if where == os.path.join(blobs, want[:2]):
        os.kill(os.getpid(), 9)
    return _logged_fsync(fd)
os.fsync = _killed_after_naming
tx = s.transaction()
tx.files(ws).write("a.txt", "changed\n")
"""
    res = subprocess.run([sys.executable, "-c", killer, tree, store], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    reopen = OBSERVE + r"""
import walstore
tree, store = sys.argv[1], sys.argv[2]
with walstore.open(store, durability="full") as s:  # (recovery puts a.txt back)
    assert open(os.path.join(tree, "a.txt")).read() == "the before-image\n"
    events.clear()
    with s.transaction() as tx:  # (a.txt's before-image: the blob the killed one named)
        tx.files(s.workspace(tree)).write("a.txt", "written after the reopen\n")
print(json.dumps({"events": events, "digest": digest_of(os.path.join(tree, "a.txt")),
                  "blobs": os.path.join(store, "files", "blobs")}))
"""
    res = subprocess.run([sys.executable, "-c", reopen, tree, store], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    import hashlib
    before = hashlib.sha256(b"the before-image\n").hexdigest()
    sub = os.path.join(out["blobs"], before[:2])
    assert ["fsync_dir", sub] in out["events"], \
        "the reopened store trusted a blob whose directory it never fsynced"
