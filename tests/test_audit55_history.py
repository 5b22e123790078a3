"""Findings of stop 55 in history, retention, restore points, views and purge (contract,
"Action rollback").  Crash cases use real processes killed with -9 (the child sends
itself SIGKILL at the chosen point)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import walstore

from store_support import cli_env

MARKER = "FORGET-ME-55h"

# the purge's commit durable, its apply never run: the child kills itself first
PURGE_KILLED_BEFORE_APPLY = textwrap.dedent(r"""
    import os, signal, sys
    import walstore
    from walstore.engine import apply as A
    orig = A.Applier.apply
    def apply(self, events, *a, **k):
        if any(e.type == A._T.COMMIT and isinstance(e.body, dict) and "purge" in e.body
               for e in events):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, events, *a, **k)
    A.Applier.apply = apply
    s = walstore.open(sys.argv[1])
    s.purge("conv/1/")
""")


def test_a_view_made_before_a_purge_never_returns_the_purged_keys_afterwards(tmp_path):
    # Before: an at() view took the list of purges LMDB did not hold yet when it was
    # made, never again.  A read-only store's view made before a writer's purge whose
    # apply a kill -9 cut short (the purge committed: every new view, history and get
    # hid the keys) went on returning the erased values from get, `in` and scan.
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        for i in range(4):
            with s.transaction() as tx:
                tx.put(f"conv/1/m{i % 2}", f"{MARKER}-{i}")
                tx.put("keep", i)
        s.restore_point("before")
        s.checkpoint()
    with walstore.open(path, readonly=True) as r:
        view = r.at("before")
        assert view.get("conv/1/m0") == f"{MARKER}-2"  # (read before the purge)
        p = subprocess.run([sys.executable, "-c", PURGE_KILLED_BEFORE_APPLY, path],
                           capture_output=True, text=True, timeout=120, env=cli_env())
        assert p.returncode == -9, p.stderr
        # (the view's first read: nothing else of the reader has read the log since)
        assert view.get("conv/1/m0") is None
        assert r.get("conv/1/m0") is None
        assert r.at("before").get("conv/1/m0") is None
        assert "conv/1/m1" not in view
        assert list(view.scan()) == [("keep", 3)]
        assert view.get("keep") == 3


# the writer's own view: the purge commits, its apply meets a file size limit (LMDB cannot
# grow), the store turns read-only with the purge in the MemTable alone
WRITER_VIEW_PURGE_APPLY_FAILS = textwrap.dedent(r"""
    import json, os, resource, signal, sys, time
    import walstore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (EFBIG instead)
    path, marker = sys.argv[1], sys.argv[2]
    s = walstore.open(path, durability="none", segment_size=8 << 20)
    for i in range(40):
        with s.transaction() as tx:
            for j in range(50):
                tx.put(f"conv/{i}-{j}", marker + "z" * 200)
            tx.put("o", i)
    s.restore_point("rp")
    view = s.at("rp")
    out = {"before": view.get("conv/0-0") is not None}
    s.checkpoint()
    time.sleep(0.5)  # (the WAL's spare segment is made: the log itself needs no growth)
    size = os.path.getsize(os.path.join(path, "db", "data.mdb"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    try:
        s.purge("conv/")
    except walstore.WalstoreError as e:
        out["purge"] = type(e).__name__
    out["at"] = view.get("conv/0-0")
    out["in"] = "conv/0-1" in view
    out["at_scan"] = [k for k, _v in view.scan(prefix="conv/")]
    out["o"] = view.get("o")
    print(json.dumps(out), flush=True)
    os._exit(0)
""")


def test_a_writers_view_made_before_a_purge_whose_apply_failed_hides_the_keys(tmp_path):
    # Before: the writer's at() view made before the purge kept returning the purged
    # values once the purge's apply failed (LMDB still holds the range's past), though
    # history(), a new at() and get() of the same process hid them.
    path = str(tmp_path / "s")
    p = subprocess.run([sys.executable, "-c", WRITER_VIEW_PURGE_APPLY_FAILS, path, MARKER],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["before"] and out["purge"] == "ErasureOwed", out
    assert out["at"] is None and out["in"] is False and out["at_scan"] == [], out
    assert out["o"] == 39, out


# retention trims in batches of 2 commits; the writer kills itself after the first batch
# (the horizon recorded, most rows below it not deleted yet)
TRIM_KILLED_MIDWAY = textwrap.dedent(r"""
    import os, signal, sys
    import walstore
    from walstore.agent import retention as R
    from walstore.engine import apply as A
    R.TRIM_BATCH = 2
    path = sys.argv[1]
    with walstore.open(path, durability="full") as s:  # (no retention: all kept)
        for i in range(12):
            with s.transaction() as tx:
                tx.put("k", i)
                tx.put(f"a{i % 4}", i)
    orig = A.Applier.trim_history
    def trim(self, *a, **k):
        r = orig(self, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
        return r
    A.Applier.trim_history = trim
    s = walstore.open(path, durability="full", retain_transactions=2)
    s.checkpoint()
""")


def _versions(s, key):
    return [(v.txid, v.value) for v in s.history(key)]


def test_history_lists_only_retained_versions_after_a_trim_killed_midway(tmp_path):
    # Before: a trim a kill -9 cut short leaves the rows of commits below the recorded
    # horizon until the next checkpoint (a writable open that redoes nothing does not
    # trim): history() listed all of them, versions of transactions that log(), at() and
    # txn_info() call trimmed, where a finished trim lists the newest version below the
    # horizon alone.  Now history() stops there, whatever rows a trim has yet to delete.
    path = str(tmp_path / "s")
    p = subprocess.run([sys.executable, "-c", TRIM_KILLED_MIDWAY, path],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == -9, p.stderr
    finished = [(12, 11), (11, 10), (10, 9)]  # (what the finished trim leaves: below)
    for readonly in (True, False):
        with walstore.open(path, readonly=readonly, retain_transactions=2) as s:
            assert [i.txid for i in s.log()] == [12, 11]
            assert _versions(s, "k") == finished
            assert _versions(s, "a1") == [(10, 9)]
            assert [v.txid for v in s.history("k", limit=2)] == [12, 11]
            assert _versions(s, "a3") == [(12, 11), (8, 7)]
    with walstore.open(path, retain_transactions=2) as s:
        s.checkpoint()  # (the trim finished: the same answers)
        assert _versions(s, "k") == finished and _versions(s, "a1") == [(10, 9)]


TRIM_OF_FILES_KILLED_MIDWAY = textwrap.dedent(r"""
    import os, signal, sys
    import walstore
    from walstore.agent import retention as R
    from walstore.engine import apply as A
    R.TRIM_BATCH = 2
    path, root = sys.argv[1], sys.argv[2]
    with walstore.open(path, durability="full") as s:
        ws = s.workspace(root)
        for i in range(12):
            with s.transaction() as tx:  # (the first batch of the trim: none of "f")
                tx.put("k", i)
                if i >= 2:
                    tx.files(ws).write("f", b"v%d" % i)
    orig = A.Applier.trim_history
    def trim(self, *a, **k):
        r = orig(self, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
        return r
    A.Applier.trim_history = trim
    s = walstore.open(path, durability="full", retain_transactions=2)
    s.checkpoint()
""")


def test_walstore_files_lists_only_retained_versions_after_a_trim_killed_midway(tmp_path):
    # Before: as history() of a key, `walstore files` listed every file version a trim
    # cut short by kill -9 had not deleted yet (all 10 versions of a path the trim had
    # not reached, under retain_transactions=2); now what a finished trim keeps:
    # versions at or after the horizon and the newest below it.
    from click.testing import CliRunner
    from walstore.cli import main as cli
    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    p = subprocess.run([sys.executable, "-c", TRIM_OF_FILES_KILLED_MIDWAY, path, str(root)],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert p.returncode == -9, p.stderr

    def listed() -> list[int]:
        out = CliRunner().invoke(cli, ["files", path, "--json"])
        assert out.exit_code == 0, out.output
        [ws] = json.loads(out.output)["workspaces"]
        [f] = ws["files"]
        return [v["txid"] for v in f["versions"]]
    assert listed() == [12, 11, 10]
    with walstore.open(path, retain_transactions=2) as s:
        s.checkpoint()  # (the trim finished: the same list)
    assert listed() == [12, 11, 10]


def test_an_iter_history_consumed_after_a_purge_returns_no_erased_version(tmp_path):
    # Before: iter_history read its first chunk of rows at its first version; a caller
    # that went on consuming it after purge() had returned got every other erased
    # version (the values included) from that chunk.  A key the purge left alone
    # streams on whole.
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        for i in range(5):
            with s.transaction() as tx:
                tx.put("c/a", f"{MARKER}-{i}")
                tx.put("keep", i)
        erased, kept = s.iter_history("c/a"), s.iter_history("keep")
        assert next(erased).value == f"{MARKER}-4" and next(kept).value == 4
        s.purge("c/")
        assert list(erased) == []
        assert [v.value for v in kept] == [3, 2, 1, 0]
        assert s.history("c/a") == []
