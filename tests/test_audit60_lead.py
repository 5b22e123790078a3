"""Audit 60 (the lead): what a read-only store's follower did with a segment cut under it.

- A read-only store follows its writer's log: before each read it takes in the records
  appended since the last one (``LogFollower``).  It mapped the segment it was in, and a
  segment truncated under it (a hand at the file, a tool, a new writer's recovery cutting
  a torn tail) killed the read-only process with SIGBUS at its next read — CONTRACT 4.9:
  never a SIGBUS.  It reads with ``pread`` now, a window per poll, and a segment shorter
  than it was reads as a record not yet whole
  (``test_a_segment_cut_under_a_read_only_store_is_no_sigbus``).
- Replication read segments through mmap as well: the tail of a store read from outside
  its writer (``DirectorySource``, what `walstore replicate` ships), the shipper's WAL
  objects, the inert-tail check and a commit's digest.  A segment cut while it read died
  of SIGBUS (a loop of reads beside a thread cutting and restoring the segment: exit 135
  within the first reads).  They read through ``FileBytes`` now; a cut segment is a
  ``CorruptionError`` or a short read, and a WAL object is never built from bytes that
  were cut away meanwhile
  (``test_replication_reading_a_segment_cut_under_it_is_no_sigbus``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import walstore

_READER = r"""
import sys, walstore
s = walstore.open(sys.argv[1], readonly=True)
print("first", s.get("k0000"), s.get("k0199"), flush=True)
sys.stdin.readline()
print("again", s.get("k0000"), s.get("k0199"), s.get("k9999"), flush=True)
s.close()
print("closed", flush=True)
"""


_CUTTER = r"""
import os, sys, threading, walstore
from walstore.replication.source import DirectorySource
path = sys.argv[1]
wal = os.path.join(path, "wal")
seg = os.path.join(wal, sorted(n for n in os.listdir(wal) if n.endswith(".wal"))[-1])
full = os.path.getsize(seg)
data = open(seg, "rb").read()
src = DirectorySource(path, fsync=False)
stop = False
def cutter():
    fd = os.open(seg, os.O_WRONLY)
    while not stop:  # cut the segment, then give it back its bytes
        os.ftruncate(fd, 4096)
        os.ftruncate(fd, full)
        os.pwrite(fd, data[4096:], 4096)
    os.close(fd)
t = threading.Thread(target=cutter)
t.start()
refused = 0
try:
    for i in range(1500):
        src._tail = None  # (read the segment from its start again)
        try:
            src.durable_lsn()
        except walstore.WalstoreError:
            refused += 1  # (a cut segment is damage: refused, named)
finally:
    stop = True
    t.join()
print("ok", refused)
"""


def test_replication_reading_a_segment_cut_under_it_is_no_sigbus(tmp_path):
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        for i in range(3000):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 200)
    p = subprocess.run([sys.executable, "-c", _CUTTER, path], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "ok", p.stdout


def _segment_in_use(path: str) -> str:
    wal = os.path.join(path, "wal")
    names = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))
    return os.path.join(wal, names[-1])


def test_a_segment_cut_under_a_read_only_store_is_no_sigbus(tmp_path):
    path = str(tmp_path / "store")
    s = walstore.open(path)
    try:
        for i in range(200):  # (a few commits: held in the log, LMDB not written yet)
            with s.transaction() as tx:
                tx.put(f"k{i:04d}", "v" * 100)
        seg = _segment_in_use(path)
        assert os.path.getsize(seg) > 64 << 10
        p = subprocess.Popen([sys.executable, "-c", _READER, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = p.stdout.readline().split()
            assert first == ["first", "v" * 100, "v" * 100], (first, p.stderr.read())
            os.truncate(seg, 4096)  # (under the follower: past it, a mapping's pages
            p.stdin.write("go\n")   # raise SIGBUS when touched)
            p.stdin.flush()
            out, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode != -signal.SIGBUS, "the read-only store was killed by SIGBUS"
        assert p.returncode == 0, err
        lines = out.splitlines()
        # what it had read stays shown (those commits were acknowledged), nothing new
        assert lines == ["again " + "v" * 100 + " " + "v" * 100 + " None", "closed"], out
    finally:
        try:
            s.close()
        except walstore.WalstoreError:
            pass  # (the writer's own segment was cut under it: not this test's question)


# --- the bench: a tail ratio against a noisy disk's own tail ---------------------------

def _tail_target():
    from walstore.benchmark.workloads import TARGETS
    return next(t for t in TARGETS if t.row == ("tail-2k", "walstore"))


def _tail_parts(walstore_p999: float, bare_p50: float, bare_p999: float) -> dict:
    def row(system, p50, p999):
        return {"system": system, "median": 1000.0, "targets": [],
                "latency_ms": {"p50": p50, "p99.9": p999, "n_min": 10_000}}
    return {"tail-2k": {"rows": [row("walstore", 0.17, walstore_p999),
                                 row("bare", bare_p50, bare_p999)]}}


def test_a_tail_target_is_not_met_against_a_noisy_disks_own_tail():
    from walstore.benchmark.runner import evaluate
    target = _tail_target()
    quiet = evaluate(target, _tail_parts(0.40, 0.066, 0.22))  # (bare: 3.3x its median)
    assert quiet["met"] is True and abs(quiet["measured"] - 0.40 / 0.22) < 1e-9
    noisy = evaluate(target, _tail_parts(1.21, 0.066, 0.618))  # (stop 59: 9.4x)
    assert noisy["met"] is None, noisy
    assert "noisy disk" in noisy["why_not_measured"]
    assert abs(noisy["measured"] - 1.21 / 0.618) < 1e-9  # (the ratio is still shown)
    missed = evaluate(target, _tail_parts(2.0, 0.066, 0.618))  # (3.2x: a miss stands)
    assert missed["met"] is False, missed


def test_the_stored_run_that_met_the_tail_in_a_noisy_hour_is_not_judged_met():
    import json
    from walstore.benchmark.runner import evaluate
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "bench", "results", "stop59-rows.json")) as f:
        results = json.load(f)
    parts = {p["id"]: p for p in results["parts"]}
    for p in parts.values():
        for r in p["rows"]:
            r["targets"] = []
    stored = next(t for t in results["targets"] if t["row"] == "tail-2k/walstore")
    assert stored["met"] is True  # (as that run judged it: 1.96x, "met")
    now = evaluate(_tail_target(), parts)
    assert now["met"] is None and "noisy disk" in now["why_not_measured"], now


# --- purge: a Ctrl-C after the purge committed (noticed by helper h2) ------------------

def _store_with_secrets(path: str) -> None:
    with walstore.open(path) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"user/{i}", "secret" * 20)
                tx.put(f"keep/{i}", i)


def test_an_interrupt_after_the_purge_committed_says_the_purge_stands(tmp_path):
    path = str(tmp_path / "s")
    _store_with_secrets(path)

    def progress(done, total):  # (the LMDB rewrite, after the commit: Ctrl-C here)
        raise KeyboardInterrupt

    with walstore.open(path) as s:
        try:
            s.purge("user/", progress=progress)
        except KeyboardInterrupt as e:  # (still an interrupt: never an error to swallow)
            done = e.purge_committed
        else:
            raise AssertionError("the interrupt was swallowed")
        assert done["keys_erased"] == 300 and done["erasure_owed"] is True
        assert s.get("user/1") is None and s.get("keep/1") == 1
        assert [t.txid for t in s.log(limit=1)] == [done["txid"]]


_PURGE_CLI = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # (as at a terminal: a parent
# that ignores SIGINT, a test runner's worker, passes SIG_IGN on, and Python keeps it)
from walstore.engine.engine import Engine
real = Engine.erase_old_bytes
def interrupted(self, *a, **k):  # a real SIGINT, delivered as the erasure begins
    os.kill(os.getpid(), signal.SIGINT)
    return real(self, *a, **k)
Engine.erase_old_bytes = interrupted
from walstore.cli import main
sys.argv = ["walstore", "purge", sys.argv[1], "user/", "--yes"] + sys.argv[2:]
main()
"""


def test_walstore_purge_interrupted_after_the_commit_says_it_committed(tmp_path):
    path = str(tmp_path / "s")
    _store_with_secrets(path)
    p = subprocess.run([sys.executable, "-c", _PURGE_CLI, path], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 130, (p.stdout, p.stderr)
    assert "committed (transaction" in p.stderr and "owed" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    with walstore.open(path) as s:  # (the open finishes the owed erasure)
        assert s.get("user/1") is None and s.get("keep/1") == 1
    j = subprocess.run([sys.executable, "-c", _PURGE_CLI, path, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert j.returncode == 130, (j.stdout, j.stderr)  # (nothing left under the prefix:
    # the purge commits again, and is interrupted again as its erasure begins)
    import json as _json
    doc = _json.loads(j.stdout)
    assert "committed (transaction" in str(doc), doc


def test_an_interrupted_rewrite_leaves_no_half_made_copy(tmp_path):
    path = str(tmp_path / "s")
    _store_with_secrets(path)
    seen = []

    def progress(done, total):  # (mid-copy: the copy's directory exists now)
        seen.append(os.path.isdir(os.path.join(path, "db.compact")))
        raise KeyboardInterrupt

    with walstore.open(path) as s:
        try:
            s.purge("user/", progress=progress)
        except KeyboardInterrupt:
            pass
        assert seen == [True]
        # (a half-made copy of up to the data file's size stayed until the next erasure)
        assert not os.path.exists(os.path.join(path, "db.compact"))
