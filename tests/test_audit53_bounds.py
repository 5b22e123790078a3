"""Audit 53 (resource bounds at scale: what grows without bound, or costs more than it
should, as a store ages or is used hard): regressions found by measuring, each scaled down
to the smallest size that still shows the growth, asserting a growth ratio (never a time).

Each test failed before its fix (see the commit naming it):

- `walstore diff --from A --to B` read every commit logged after A, up to the end of the
  log, however old B was: a diff between two points of the past cost the store's age
  since them, not what changed between them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import walstore
from walstore.cli import _engine
from walstore.engine.views import Views

ROOT = Path(__file__).resolve().parent.parent


def _commits_read(monkeypatch, store, start, end) -> int:
    """How many commit rows ``changes_between`` (what `walstore diff` runs) takes."""
    seen = [0]
    real = Views.commits_after

    def counting(self, *a, **k):
        for row in real(self, *a, **k):
            seen[0] += 1
            yield row
    monkeypatch.setattr(Views, "commits_after", counting)
    try:
        doc = _engine.changes_between(store, start, end)
    finally:
        monkeypatch.setattr(Views, "commits_after", real)
    assert [d["key"] for d in doc["keys"]] == ["k1", "k2"]
    return seen[0]


def test_a_diff_between_two_past_points_reads_what_lies_between_not_the_store_since(
        tmp_path, monkeypatch):
    store = walstore.open(str(tmp_path / "s"), durability="none")
    with store:
        txids = []
        for i in range(4):
            with store.transaction() as tx:
                tx.put(f"k{i}", i)
            txids.append(tx.id)
        store.checkpoint()  # (the old ones in LMDB, as in an aged store)

        def more(n):
            for i in range(n):
                with store.transaction() as tx:
                    tx.put("later", i)
            store.checkpoint()
        more(50)
        small = _commits_read(monkeypatch, store, txids[0], txids[2])
        more(150)
        big = _commits_read(monkeypatch, store, txids[0], txids[2])
    # the diff covers two commits (k1, k2); what it reads must not grow with the 200
    # commits logged after its end (it read 52, then 202)
    assert big == small, (small, big)
    assert small <= 4, small


# ---- walstore actions: every action streamed ------------------------------------------
_PEAK = """\
import sys, tracemalloc
tracemalloc.start()
from walstore.cli import main
tracemalloc.reset_peak()  # (the command's own peak, not the imports')
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stderr.write("PEAK %d\\n" % tracemalloc.get_traced_memory()[1])
"""


def _cli_peak(args: list[str]) -> int:
    """tracemalloc's peak of a walstore command run in a process of its own (its output
    thrown away: a listing's text is not what is measured)."""
    r = subprocess.run([sys.executable, "-c", _PEAK, *args], env=_env(), text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    return int(r.stderr.rsplit("PEAK ", 1)[1].split()[0])


def _env() -> dict:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    e.pop("WALSTORE_DEBUG", None)
    return e


def _actions(store, n: int) -> None:
    for _ in range(n // 50):
        with store.transaction() as tx:
            for i in range(50):
                with tx.action("charge", args={"i": i, "pad": "x" * 200},
                               compensate="refund") as act:
                    act.result = {"ok": i}


def test_walstore_actions_lists_every_action_in_memory_that_does_not_hold_them(tmp_path):
    path = str(tmp_path / "s")
    peaks = {}
    with walstore.open(path, durability="none") as store:
        for n in (1000, 4000):
            _actions(store, n - len(store.actions()))
            store.checkpoint()
            peaks[n] = {flag: _cli_peak(["actions", path, *flag.split()])
                        for flag in ("--json", "")}
    for flag in ("--json", ""):
        grew = peaks[4000][flag] - peaks[1000][flag]
        # every action held as an Action, its document and its row (~3-6 KB each: 3,000
        # more actions grew the peak by 9-18 MB); now a sort key each (~160 B)
        assert grew < 3000 * 1024, (flag, peaks)


def test_walstore_actions_streamed_lists_what_store_actions_lists_in_its_order(tmp_path):
    path = str(tmp_path / "s")
    store = walstore.open(path, durability="none", apply_interval=86400)
    with store:
        _actions(store, 600)  # (more than a chunk of rows)
        store.checkpoint()
        early = store.transaction()  # an older txid logging its action later
        early.put("e", 1)
        with store.transaction() as tx:
            with tx.action("unapplied", compensate="refund"):
                pass
        with early.action("late", compensate="refund"):
            pass
        early.commit()
        try:
            with store.transaction() as tx:
                with tx.action("rolled-back", compensate="refund"):
                    pass
                raise RuntimeError
        except RuntimeError:
            pass
        want = [(a.id, a.state) for a in store.actions()]
        assert [(a.id, a.state) for a in store.iter_actions()] == want
        assert want[0][1] == "pending" and want[1][0].startswith(f"{early.id}.")
        assert int(want[2][0].partition(".")[0]) > early.id
    r = subprocess.run([sys.executable, "-m", "walstore", "actions", path, "--json"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = [(a["id"], a["state"]) for a in json.loads(r.stdout)["actions"]]
    with walstore.open(path, readonly=True) as store:
        assert got == [(a.id, a.state) for a in store.actions()]
    assert len(got) == 603


# ---- walstore diff: the changed keys' values streamed ---------------------------------
def test_walstore_diff_holds_one_changed_value_at_a_time_not_all(tmp_path):
    path = str(tmp_path / "s")
    peaks = {}
    with walstore.open(path, durability="none") as store:
        with store.transaction() as tx:
            tx.put("a", 1)
        first = tx.id
        for n in (50, 200):
            with store.transaction() as tx:
                for i in range(n - len(list(store.scan(prefix="k")))):
                    tx.put(f"k{n:04d}{i:04d}", "v" * 100_000)
            peaks[n] = {flag: _cli_peak(["diff", path, "--from", str(first), *flag.split()])
                        for flag in ("--json", "")}
    for flag in ("--json", ""):
        grew = peaks[200][flag] - peaks[50][flag]
        # every changed key's values held (and the document's text): 150 more values of
        # 100 KB grew the peak by 45-90 MB; now one value at a time
        assert grew < 5 * 1024 * 1024, (flag, peaks)
    r = subprocess.run([sys.executable, "-m", "walstore", "diff", path, "--from", str(first),
                        "--json"], env=_env(), capture_output=True, text=True, timeout=120)
    doc = json.loads(r.stdout)
    assert list(doc) == ["from_lsn", "to_lsn", "keys", "files"] and doc["files"] == []
    assert len(doc["keys"]) == 200 and doc["keys"][0]["after"] == "v" * 100_000
    assert [k["key"] for k in doc["keys"]] == sorted(k["key"] for k in doc["keys"])


# ---- walstore files: workspaces, paths and versions streamed --------------------------
def test_walstore_files_lists_any_number_of_versions_in_memory_that_does_not_hold_them(
        tmp_path):
    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    peaks = {}
    with walstore.open(path, durability="none") as store:
        ws = store.workspace(str(root))
        done = 0
        for n in (400, 1600):
            for j in range(done // 10, n // 10):
                with store.transaction() as tx:
                    f = tx.files(ws)
                    for i in range(10):
                        f.write(f"f{i:02d}.txt", f"c{j}")
            done = n
            peaks[n] = {flag: _cli_peak(["files", path, *flag.split()])
                        for flag in ("--json", "")}
    for flag in ("--json", ""):
        grew = peaks[1600][flag] - peaks[400][flag]
        # every version's document held (~4 KB each under --json: 1,200 more versions
        # grew the peak by ~5 MB); now one at a time
        assert grew < 1024 * 1024, (flag, peaks)
    r = subprocess.run([sys.executable, "-m", "walstore", "files", path, "--json"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    doc = json.loads(r.stdout)
    (w,) = doc["workspaces"]
    assert doc["at"] is None and w["root"] == str(root) and len(w["files"]) == 10
    assert [len(f["versions"]) for f in w["files"]] == [160] * 10
    assert w["files"][0]["versions"][0]["txid"] > w["files"][0]["versions"][1]["txid"]
    r = subprocess.run([sys.executable, "-m", "walstore", "files", path], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines()[2].split()[-2:] == ["160", str(
        w["files"][0]["versions"][0]["txid"])]
