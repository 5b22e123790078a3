"""A child process for test_files_crash.py: an agent's file transaction (or a recovery),
stopped before its Nth I/O call through walstore's seam so the test can kill -9 it there.

    files_child.py SPEC_JSON

SPEC: ``store``, ``ws`` (the workspace root, registered by the parent), ``job``
(``"tx"``: a transaction of file operations and a key, then commit; ``"hold"``: the
same operations, then ``HELD`` and sleep, never committing; ``"rollback"``: the same
operations, then ``rollback()``, whose calls alone are counted; ``"rollback_action"``:
the same, plus files created, an action logged (compensator ``undeploy``: appends what
it finds at the action's ``path`` to ``seen``, a JSON-lines file outside the workspace),
then those files deleted or moved away, then ``rollback()``; ``"watch"``: a transaction
whose watched subprocess edits the tree, then commit; ``"recover"``: just open the
store, i.e. run recovery), ``stop`` (N: halt before the Nth seam call counted
after the store is open; 0: never), ``hang`` (``"watch"`` only: the watched subprocess
writes ``<ws>/../inside`` half way and sleeps, for a kill inside it), ``after`` (halt
right after the call instead).

Prints ``STOP <op> <path>`` when halted (then sleeps until killed), ``COMMITTED <txid>``
once ``commit()`` returned, and ``CALLS <n>`` at the end (how many seam calls it made).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from walstore import fileio  # noqa: E402

WATCHED = """
set -e
echo 'print("built")' > src/app.py
mkdir -p build && echo obj > build/a.o
rm conf/old.toml
{hang}
mv docs/a docs/renamed
chmod 600 src/run.sh
"""


class Stopper(fileio.OSBackend):
    """Counts the main thread's seam calls once armed; halts before (or right after)
    call number ``stop``."""

    def __init__(self, stop: int, after: bool = False) -> None:
        self.stop = stop
        self.after = after
        self.n = 0
        self.armed = False

    def _at(self, op: str, path, real):
        if not self.armed or threading.current_thread() is not threading.main_thread():
            return real()  # (the WAL's spare-segment thread: not the transaction's steps)
        self.n += 1
        if self.n == self.stop and not self.after:
            self._halt(op, path)
        out = real()
        if self.n == self.stop and self.after:
            self._halt(op, path)
        return out

    @staticmethod
    def _halt(op: str, path) -> None:
        sys.stdout.write(f"STOP {op} {path}\n")
        sys.stdout.flush()
        time.sleep(600)

    def open(self, path, flags, mode):
        return self._at("open", path, lambda: super(Stopper, self).open(path, flags, mode))

    def pwrite(self, fd, data, offset):
        return self._at("pwrite", fd, lambda: super(Stopper, self).pwrite(fd, data, offset))

    def fsync(self, fd):
        return self._at("fsync", fd, lambda: super(Stopper, self).fsync(fd))

    def fdatasync(self, fd):
        return self._at("fdatasync", fd, lambda: super(Stopper, self).fdatasync(fd))

    def fsync_dir(self, path):
        return self._at("fsync_dir", path, lambda: super(Stopper, self).fsync_dir(path))

    def rename(self, src, dst):
        return self._at("rename", f"{src} -> {dst}",
                        lambda: super(Stopper, self).rename(src, dst))

    def unlink(self, path):
        return self._at("unlink", path, lambda: super(Stopper, self).unlink(path))


def undeploy(seen: str | None, root: str):
    """The compensator of ``rollback_action``: note what the action's file is now."""
    def compensate(action) -> None:
        path = os.path.join(root, action.args["path"])
        found = open(path, "rb").read().hex() if os.path.lexists(path) else None
        if seen is not None:
            with open(seen, "a") as out:
                out.write(json.dumps({"path": action.args["path"], "found": found}) + "\n")
    return compensate


def main() -> None:
    spec = json.loads(sys.argv[1])
    backend = Stopper(spec.get("stop", 0), spec.get("after", False))
    fileio.set_backend(backend)
    if spec["job"] == "recover":
        backend.armed = True
        walstore.open(spec["store"]).close()
        print(f"CALLS {backend.n}", flush=True)
        return
    # the applier never runs by itself (an hour's pause): its WAL sync can cover the
    # transaction's own, which would make the count of seam calls differ between runs
    rolls_back = spec["job"] in ("rollback", "rollback_action")
    store = walstore.open(spec["store"], apply_interval=3600,
                          compensators={"undeploy": undeploy(spec.get("seen"), spec["ws"])})
    ws = store.workspace(spec["ws"])
    backend.armed = not rolls_back
    tx = store.transaction(meta={"job": spec["job"]})
    f = tx.files(ws)
    if spec["job"] in ("tx", "hold", "rollback", "rollback_action"):
        f.write("src/app.py", "print('v2')\n")             # an existing file
        f.write("src/new/mod.py", "NEW = 1\n", mode=0o600)  # parents created
        f.delete("conf/old.toml")
        f.rename("docs/a", "docs/moved")                    # a directory
        f.symlink("link", "conf/app.toml")                  # replaces a symlink
        f.write("src/app.py", "print('v3')\n")             # a path changed twice
        f.rename("src/app.py", "src/main.py")               # ... and moved away
        if spec["job"] == "rollback_action":  # created, used by an action, then gone
            f.write("scratch/out.txt", "artifact\n")
            with tx.action("deploy", args={"path": "scratch/out.txt"}, compensate="undeploy"):
                pass
            f.delete("scratch/out.txt")
            f.write("dist/app.bin", b"\x00bin")
            with tx.action("deploy", args={"path": "dist/app.bin"}, compensate="undeploy"):
                pass
            f.rename("dist/app.bin", "old/app.bin")
    else:
        hang = ""
        if spec.get("hang"):
            marker = os.path.join(os.path.dirname(ws.root), "inside")
            hang = f"touch {marker}; sleep 600"
        with f.watch():
            subprocess.run(["sh", "-c", WATCHED.format(hang=hang)], cwd=ws.root, check=True)
    tx.put("done", spec["job"])
    if rolls_back:
        backend.armed = True
        tx.rollback()
        print("ROLLED BACK", flush=True)
        print(f"CALLS {backend.n}", flush=True)
        os._exit(0)
    if spec["job"] == "hold":
        print("HELD", flush=True)
        time.sleep(600)
    tx.commit()
    print(f"COMMITTED {tx.id}", flush=True)
    backend.armed = False
    print(f"CALLS {backend.n}", flush=True)
    os._exit(0)  # like a crash right after the commit: no close, no checkpoint


if __name__ == "__main__":
    main()
