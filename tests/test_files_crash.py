"""Reversible files survive kill -9: real processes, real files, real SIGKILL.

``tests/agent_scripts/files_child.py`` runs an agent's file transaction against a store
(durability "full") under a seam backend that halts it before its Nth I/O call; the test
kills it there (``SIGKILL`` to its process group), reopens the store, and checks the tree
with ``files_support.tree_state`` (its own walk: type, mode, content, symlink target,
empty directories, stray temp names):

- at EVERY seam call of a file transaction (before-images into the blob store, the
  FILE_STEPS records, each temp file's write, fsync, rename, directory fsync, the commit
  record): after reopen the tree is exactly the pre-transaction tree with the key absent,
  or exactly the committed tree with the key present; never a mix, never a stray temp;
  once ``commit()`` returned, always the committed one;
- the same for a transaction whose ``watch()``ed subprocess edits the tree, and for a kill
  INSIDE the watched subprocess (its process group dies with it): the tree returns to its
  state before the watch;
- at every seam call of a ROLLBACK (paths changed twice and moved away; and one with
  actions logged between a file's creation and its deletion or move: each compensation,
  in the rollback or at the next open, finds its file as the action left it), and of the
  RECOVERY of a crash (a crash while undoing a crash): the next open still ends with
  the pre-transaction tree, and reports no conflict (walstore's own intermediate states
  are not a stranger's).

Every seam call with ``WALSTORE_SLOW=1``; CI kills at every third (``STRIDE``), the first
and the last always among them.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import walstore  # noqa: E402
from files_support import Dir, File, Link, assert_tree_equal, build, tree_state  # noqa: E402

CHILD = HERE / "agent_scripts" / "files_child.py"

# Each kill is a child process (~0.3 s of imports): CI kills before every STRIDE-th seam
# call, the first and the last always among them (and right after the last); with
# WALSTORE_SLOW=1 before every one (README, "Reliability": the long runs).
STRIDE = 1 if os.environ.get("WALSTORE_SLOW") == "1" else 3


def kill_points(calls: int) -> list[int]:
    """The seam calls a sweep kills before: every one, or every STRIDE-th in CI."""
    return sorted({1, calls} | set(range(1, calls + 1, STRIDE)))
ROOT = HERE.parent

SPEC = {
    "README.md": "hello\n",
    "src/app.py": File("print('v1')\n", 0o644),
    "src/run.sh": File("#!/bin/sh\n", 0o755),
    "conf/app.toml": "debug = false\n",
    "conf/old.toml": "x = 1\n",
    "link": Link("src/app.py"),
    "docs/a/b.txt": "deep\n",
    "docs/a/c/": Dir(0o700),
}


def setup(base: Path) -> tuple[str, str]:
    """A fresh workspace and a store that has it registered."""
    ws, store = base / "ws", base / "store"
    build(ws, {k.rstrip("/"): v for k, v in SPEC.items()})
    with walstore.open(str(store)) as s:
        s.workspace(str(ws))
    # Every blob fan-out directory made now: a watch's manifest is a blob whose hash
    # (timestamps in it) lands in a new fan-out directory in some runs and not in others,
    # one more directory fsync; the kill-at-every-call tests need the same calls each run.
    blobs = store / "files" / "blobs"
    for i in range(256):
        os.makedirs(blobs / f"{i:02x}", mode=0o700, exist_ok=True)
    return str(store), str(ws)


def run_child(spec: dict, timeout: float = 60, until: str | None = None,
              child: Path = CHILD) -> dict:
    """Run files_child.py; kill -9 its process group when it halts (STOP / HELD) or when
    ``until`` (a file path) appears.  Returns what it printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(child), json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    out = {"lines": [], "stopped": None, "committed": False, "calls": None, "killed": False}
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    exited = False  # (seen ended before the last select: what it printed was read by then)
    while True:
        if until is not None and os.path.exists(until):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"child timed out: {out['lines']} {proc.stderr.read()[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.05))
        if not ready:
            if exited:
                break
            # (ended: its last lines may still sit in the pipe -- a break here lost a
            # "CALLS n" written just before it exited; the next select reads them)
            exited = proc.poll() is not None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        halted = False
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            out["lines"].append(text)
            if text.startswith("STOP "):
                out["stopped"] = text[5:]
                halted = True
            elif text == "HELD":
                halted = True
            elif text.startswith("COMMITTED"):
                out["committed"] = True
            elif text.startswith("CALLS "):
                out["calls"] = int(text.split()[1])
        if halted:
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and any watched subprocess
        out["killed"] = True
    proc.wait()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"child failed ({proc.returncode}): {err.decode()[-3000:]}")
    return out


def reopen_state(store: str, ws: str) -> tuple[dict, object]:
    with walstore.open(store) as s:
        done = s.get("done")
        assert not s.last_recovery.file_conflicts, s.last_recovery.file_conflicts
    return tree_state(ws), done


def committed_tree(base: Path, job: str) -> dict:
    store, ws = setup(base)
    got = run_child({"store": store, "ws": ws, "job": job})
    assert got["committed"], got
    return tree_state(ws), got["calls"]


@pytest.mark.parametrize("job", ["tx", "watch"])
def test_kill_at_every_step_of_a_file_transaction(tmp_path, job):
    pre = None
    post, calls = committed_tree(tmp_path / "count", job)
    assert calls and calls > 10
    outcomes = {"pre": 0, "post": 0}
    ops = set()
    # before every call, and right after the last one (the commit record's sync)
    for n, after in [(n, False) for n in kill_points(calls)] + [(calls, True)]:
        base = tmp_path / f"n{n}{'a' if after else ''}"
        store, ws = setup(base)
        pre = pre or tree_state(ws)
        got = run_child({"store": store, "ws": ws, "job": job, "stop": n, "after": after})
        assert got["stopped"], (n, got)
        ops.add(got["stopped"].split()[0])
        tree, done = reopen_state(store, ws)
        if done is None:
            assert_tree_equal(tree, pre, f"after kill -9 before call {n} ({got['stopped']})")
            outcomes["pre"] += 1
        else:
            assert done == job
            assert_tree_equal(tree, post, f"after kill -9 before call {n} ({got['stopped']})")
            outcomes["post"] += 1
        if after:
            assert done == job, "a durable commit record must survive"
        assert not os.listdir(os.path.join(store, "files", "blobs", "tmp"))
    assert outcomes["pre"] and outcomes["post"], outcomes
    assert {"open", "pwrite", "fsync", "rename", "fsync_dir", "fdatasync"} <= ops, ops


def test_kill_inside_the_watched_subprocess(tmp_path):
    store, ws = setup(tmp_path)
    pre = tree_state(ws)
    marker = str(tmp_path / "inside")
    got = run_child({"store": store, "ws": ws, "job": "watch", "hang": True}, until=marker)
    assert got["killed"] and not got["committed"]
    assert tree_state(ws) != pre                 # the subprocess had changed things
    tree, done = reopen_state(store, ws)
    assert done is None
    assert_tree_equal(tree, pre, "after kill -9 inside the watched subprocess")


def kill_at_every_call(tmp_path: Path, job: str, prepare, what: str) -> None:
    """Count the seam calls of ``job`` (on a store ``prepare(base)`` made: (store, ws,
    the tree to expect)), then kill -9 it before each one: the next open must end with
    that tree, the key absent, and no conflict."""
    store, ws, pre = prepare(tmp_path / "count")
    calls = run_child({"store": store, "ws": ws, "job": job})["calls"]
    assert_tree_equal(tree_state(ws), pre, f"after an undisturbed {what}")
    assert calls and calls > 5
    for n in kill_points(calls):
        store, ws, pre = prepare(tmp_path / f"k{n}")
        got = run_child({"store": store, "ws": ws, "job": job, "stop": n})
        assert got["stopped"], (n, got)
        tree, done = reopen_state(store, ws)
        assert done is None
        assert_tree_equal(tree, pre, f"after a kill -9 of the {what} before call {n} "
                                     f"({got['stopped']})")


def test_kill_at_every_step_of_a_rollback(tmp_path):
    """A crash in the middle of undoing (paths changed twice, moved): the next open
    finishes the undo, never reporting walstore's own intermediate states as conflicts."""
    def fresh(base: Path) -> tuple[str, str, dict]:
        store, ws = setup(base)
        return store, ws, tree_state(ws)
    kill_at_every_call(tmp_path, "rollback", fresh, "rollback")


def test_kill_at_every_step_of_a_rollback_with_compensations_between(tmp_path):
    """Files created, an action logged, then the files deleted or moved away: every
    compensation — in the rollback, or at the next open after a kill -9 at any step of it
    — finds its file as the action left it (the later delete or move undone first), and
    the next open ends with the pre-transaction tree, no conflict."""
    from agent_scripts.files_child import undeploy
    want = {"scratch/out.txt": b"artifact\n".hex(), "dist/app.bin": b"\x00bin".hex()}

    def check_seen(seen: Path, what: str) -> None:
        rows = [json.loads(line) for line in seen.read_text().splitlines()] \
            if seen.exists() else []
        for r in rows:
            assert r["found"] == want[r["path"]], (what, rows)

    store, ws = setup(tmp_path / "count")
    pre = tree_state(ws)
    seen = tmp_path / "count" / "seen.jsonl"
    got = run_child({"store": store, "ws": ws, "job": "rollback_action", "seen": str(seen)})
    calls = got["calls"]
    assert calls and calls > 5
    assert_tree_equal(tree_state(ws), pre, "after an undisturbed rollback")
    check_seen(seen, "undisturbed")
    assert len(seen.read_text().splitlines()) == 2
    for n in kill_points(calls):
        base = tmp_path / f"k{n}"
        store, ws = setup(base)
        seen = base / "seen.jsonl"
        got = run_child({"store": store, "ws": ws, "job": "rollback_action", "stop": n,
                         "seen": str(seen)})
        assert got["stopped"], (n, got)
        with walstore.open(store, compensators={"undeploy": undeploy(str(seen), ws)}) as s:
            assert not s.last_recovery.file_conflicts, s.last_recovery.file_conflicts
            assert s.get("done") is None
            assert {a.state for a in s.actions()} == {"compensated"}, s.actions()
        what = f"after a kill -9 of the rollback before call {n} ({got['stopped']})"
        assert_tree_equal(tree_state(ws), pre, what)
        check_seen(seen, what)


def test_kill_at_every_step_of_the_recovery_of_a_crash(tmp_path):
    def crashed(base: Path) -> tuple[str, str, dict]:
        store, ws = setup(base)
        pre = tree_state(ws)
        got = run_child({"store": store, "ws": ws, "job": "hold"})
        assert got["killed"] and tree_state(ws) != pre
        return store, ws, pre
    kill_at_every_call(tmp_path, "recover", crashed, "recovery")
