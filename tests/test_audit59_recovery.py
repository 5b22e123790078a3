"""Audit 59: recovery and the operator's command line under damage (CONTRACT section 4,
promises 3, 4, 8 and 9; section 3's CLI rules; docs/RECOVERY.md, docs/CLI.md), as real
processes: a writer killed with SIGKILL, the damage made by hand in its files, `walstore`
run as a real CLI process, a real small file system (tmpfs) for a full disk.

Findings (each test named below fails on the code before its fix):

- `walstore recover --mode skip-corrupt` on an almost full disk: the copy of the salvaged
  log into quarantine/ (``shutil.copyfile``) failed with ENOSPC and left its partial
  ``*.salvaged.*.bin.tmp`` behind for good, mode 0644 (every file of a store is 0600),
  the error line naming the WAL segment it read, not the file it could not write; run
  again (space freed, or after a kill -9 between the copy and the seal), each run took a
  new stamp and copied the whole log again: a retried recovery needed a log's worth more
  room at every try.  The copy is made 0600, streamed, removed when it fails (the error
  names it), and a run finds the earlier run's identical copy instead of making another
  (``test_skip_corrupt_on_a_full_disk_leaves_no_partial_copy_and_retries_converge``,
  ``test_skip_corrupt_killed_after_its_copy_does_not_copy_the_log_again``).
- `walstore recover --mode tolerate-tail` refusing damage outside the last segment (a
  missing middle segment) said "choose what to give up with --mode tolerate-tail |
  point-in-time | skip-corrupt": the mode that had just refused; and a store whose wal/
  directory is gone (every mode refuses it) was told to choose a mode too.  A refusal now
  offers only the modes that give up more than the one refused, and a missing log says no
  mode applies (``test_a_refused_recovery_offers_only_modes_that_can_help``).
- `walstore recover --json` refused for LMDB's sake (db/data.mdb missing, damaged, or
  another store's) printed only ``{"error": ...}``, where a refusal for the log's sake
  prints the one shape of `recover --json` (``refused``, ``reason``, ``file``, ...): a
  script reading ``doc["refused"]`` met a KeyError for this damage alone.  It prints the
  recover shape, refused, the options in its problem's reason, and the one error line on
  stderr (``test_recover_json_refused_for_lmdb_damage_is_the_recover_shape``).
- Progress of `recover`, `verify` and `backup` was counted per WAL segment: on a 56 MB
  log of 16 MiB segments the lines jumped 9% -> 39% -> 69% (backup 20% -> 47%), and a
  log of 1 GiB segments said nothing for minutes, where docs/CLI.md promises a line each
  time another 5% is done.  The walks report every MiB inside a segment too (one
  comparison per record, nothing without a progress callback)
  (``test_progress_of_recover_verify_backup_moves_inside_a_segment``).
- A crashed store whose ``LOCK`` is a directory (its ``STORE`` sound): `recover`, `put`
  and every writable verb said "cannot open or create a store at PATH: Is a directory
  (PATH/LOCK) (Is a directory [EISDIR]: PATH/LOCK)", exit 2 — a usage error, "not a
  store" — while `verify` read it as the store it is.  An entry of a store's directory
  that cannot be opened is an I/O error naming it, exit 1, its cause said once; a path
  that is no store stays exit 2 (``test_a_store_whose_lock_is_a_directory_is_exit_1``).
- `walstore recover --handlers MOD --json`: what a compensator (or the module, at its
  import) wrote to file descriptor 1 — ``os.write(1, ...)``, or a program it ran that
  inherited stdout, ``subprocess.run(["curl", ...])``, the usual refund — went into the
  JSON document, which no script could parse; only ``sys.stdout`` was pointed at stderr.
  Descriptor 1 is pointed at stderr too while the module is imported and while a
  compensator runs (``test_recover_json_stays_one_document_when_a_compensator_writes_to_fd_1``).
- A compensator that failed with a long message (an HTTP error body: the store keeps up
  to 4 KB of it) made the LAST ERROR cell of `recover`, `actions --pending` and `verify`'s
  "needs a decision" line 4 KB wide, where human output is short (a value in a table
  row is cut at 200 characters).  The error is cut there, saying how long it is
  (``--json`` keeps it whole) (``test_a_long_compensation_error_is_cut_in_human_output``).
- A crashed store with a torn tail whose ``quarantine`` had become a file: `verify` said
  "ok" (exit 0) and "the next open recovers it", while every recovery failed on it
  ("exists and is not a directory": the torn bytes cannot be kept).  `verify` reports
  it (exit 1) (``test_verify_reports_a_quarantine_that_is_not_a_directory``).
"""
from __future__ import annotations

import os
import signal
import stat
import shutil
import subprocess
import sys
import time

import pytest

from store_support import CLI, cli_env

WRITER = r"""
import sys, time, walstore
path, n = sys.argv[1], int(sys.argv[2])
s = walstore.open(path)
for i in range(n):
    with s.transaction() as tx:
        tx.put(f"k{i:03d}", {"i": i, "pad": "x" * 100})
if len(sys.argv) > 3:  # a loser: an action whose transaction never commits
    tx = s.transaction()
    tx.put("loser", 1)
    with tx.action("charge", args={"amount": 40}, compensate=sys.argv[3]) as act:
        act.result = {"charge_id": "c1"}
print("READY", flush=True)
time.sleep(600)
"""


def cli(*args, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env=env or cli_env(),
                          timeout=timeout)


def crashed_store(path: str, n: int = 30, compensate: str | None = None) -> None:
    """A store of ``n`` commits (and a loser's action when ``compensate``) whose writer
    was killed with SIGKILL while it had the store open."""
    args = [sys.executable, "-c", WRITER, path, str(n)] + ([compensate] if compensate else [])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert p.stdout.readline().strip() == "READY"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


def records(path: str) -> list[dict]:
    import json
    p = cli("dump", path, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["records"]


def corrupt_record(path: str, index: int) -> dict:
    """Flip a byte inside the payload of the ``index``-th record (a corrupt middle:
    valid records follow it)."""
    rec = records(path)[index]
    with open(rec["file"], "r+b") as f:
        f.seek(rec["offset"] + 28 + 5)
        b = f.read(1)
        f.seek(rec["offset"] + 28 + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    return rec


def modes_in(root) -> list[tuple[str, int]]:
    """Every file under ``root`` whose mode is not 0600 (and dir not 0700)."""
    bad = []
    for d, dirs, files in os.walk(root):
        for name in dirs:
            m = stat.S_IMODE(os.lstat(os.path.join(d, name)).st_mode)
            if m != 0o700:
                bad.append((os.path.join(d, name), oct(m)))
        for name in files:
            m = stat.S_IMODE(os.lstat(os.path.join(d, name)).st_mode)
            if m != 0o600:
                bad.append((os.path.join(d, name), oct(m)))
    return bad


def scan_keys(path: str) -> list:
    import json
    p = cli("scan", path, "--json")
    assert p.returncode == 0, p.stderr
    return [i["key"] for i in json.loads(p.stdout)["items"]]


# ---- skip-corrupt's copy of the salvaged log ----------------------------------------------

def test_skip_corrupt_on_a_full_disk_leaves_no_partial_copy_and_retries_converge(
        tmp_path, mount_tmpfs):
    src = str(tmp_path / "src")
    crashed_store(src, 30)
    corrupt_record(src, 10)
    mnt = mount_tmpfs("4m")
    path = str(mnt / "s")
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("spare.tmp"))
    # fill the disk so the quarantine copy of the 1 MiB segment cannot be made
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(mnt / "fill", "wb") as f:
        f.write(b"\0" * (free - 400 * 1024))
    p = cli("recover", path, "--mode", "skip-corrupt")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "No space left on device" in p.stderr
    assert "quarantine" in p.stderr, p.stderr  # names the file it could not write
    q = os.path.join(path, "quarantine")
    assert not [n for n in os.listdir(q) if n.endswith(".tmp")], os.listdir(q)
    assert modes_in(path) == []
    os.unlink(mnt / "fill")
    subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
    for _ in range(2):  # (the second run: a recovered store, nothing copied again)
        p = cli("recover", path, "--mode", "skip-corrupt")
        assert p.returncode in (0, 1), (p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
    copies = [n for n in os.listdir(q) if ".salvaged." in n]
    assert len(copies) == 1 and copies[0].endswith(".bin"), copies
    assert modes_in(path) == []
    p = cli("verify", path)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert len(scan_keys(path)) == 29  # (the corrupt commit is the one given up)


def test_skip_corrupt_killed_after_its_copy_does_not_copy_the_log_again(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (it kills the recovery at a chosen syscall)")
    src = str(tmp_path / "src")
    crashed_store(src, 30)
    corrupt_record(src, 10)
    path = str(tmp_path / "s")
    q = os.path.join(path, "quarantine")
    # kill -9 the recovery at its Nth rename, for the first N after which the salvaged
    # log's copy is in quarantine/ (and the log not sealed yet: the old segment is there)
    for n in range(1, 12):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(src, path)
        r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename",
                            "-e", f"inject=rename:signal=SIGKILL:when={n}",
                            sys.executable, "-c", CLI, "recover", path, "--mode",
                            "skip-corrupt"], capture_output=True, text=True, env=cli_env(),
                           timeout=120)
        assert r.returncode in (-9, 137), (n, r.returncode, r.stderr[-2000:])
        if os.path.isdir(q) and any(x.endswith(".bin") and ".salvaged." in x
                                    for x in os.listdir(q)):
            break
    else:
        pytest.fail("no rename left the salvaged copy in quarantine/")
    assert os.path.exists(os.path.join(path, "wal", "00000000000000000000.wal"))
    time.sleep(1.1)  # (a new second: a new stamp, as a rerun minutes later has)
    p = cli("recover", path, "--mode", "skip-corrupt")
    assert p.returncode in (0, 1), (p.stdout, p.stderr)
    copies = [x for x in os.listdir(q) if ".salvaged." in x]
    assert len(copies) == 1, copies
    assert modes_in(path) == []
    assert cli("verify", path).returncode == 0
    assert len(scan_keys(path)) == 29


def test_torn_tail_cut_on_a_full_disk_names_the_file_and_leaves_no_temp(tmp_path,
                                                                         mount_tmpfs):
    src = str(tmp_path / "src")
    crashed_store(src, 30)
    last = records(src)[-1]
    with open(last["file"], "r+b") as f:  # a torn tail: a write cut short after the end
        f.seek(last["offset"] + 28 + last["length"] + 10)
        f.write(os.urandom(3000))
    mnt = mount_tmpfs("4m")
    path = str(mnt / "s")
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("spare.tmp"))
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(mnt / "fill", "wb") as f:
        f.write(b"\0" * free)
    p = cli("recover", path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "No space left on device" in p.stderr and "quarantine/" in p.stderr, p.stderr
    q = os.path.join(path, "quarantine")
    assert not [n for n in os.listdir(q) if n.endswith(".tmp")], os.listdir(q)
    os.unlink(mnt / "fill")
    p = cli("recover", path)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "torn-tail" in p.stdout and "bytes cut ->" in p.stdout
    cut = [n for n in os.listdir(q) if n.endswith(".bin")]
    assert len(cut) == 1 and 3000 <= os.path.getsize(os.path.join(q, cut[0])) <= 3100
    assert modes_in(path) == [] and len(scan_keys(path)) == 30


def test_a_refused_recovery_offers_only_modes_that_can_help(tmp_path):
    src = str(tmp_path / "src")
    crashed_store(src, 30)
    seg = records(src)[0]["file"]
    # a second segment: a store of the next commits (its first segment is 1 MiB)
    path = str(tmp_path / "s")
    code = (f"import walstore\ns = walstore.open({path!r})\n"
            "for i in range(100):\n"
            "    with s.transaction() as tx: tx.put(f'b{i}', 'y' * 60000)\n"
            "import os; os._exit(0)\n")  # (no close: crashed, three segments kept)
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), timeout=120)
    segs = sorted(os.listdir(os.path.join(path, "wal")))
    segs = [n for n in segs if n.endswith(".wal")]
    assert len(segs) >= 3, segs
    os.unlink(os.path.join(path, "wal", segs[1]))  # a segment missing in the middle
    p = cli("recover", path)
    assert p.returncode == 1 and "recovery refused: gap" in p.stdout, p.stdout
    assert "--mode tolerate-tail | point-in-time | skip-corrupt" in p.stdout
    p = cli("recover", path, "--mode", "tolerate-tail")
    assert p.returncode == 1 and "recovery refused: gap" in p.stdout, p.stdout
    assert p.stdout.strip().splitlines()[-1].endswith("--mode point-in-time | skip-corrupt")
    assert "tolerate-tail |" not in p.stdout
    shutil.rmtree(os.path.join(src, "wal"))  # the log is gone: no mode can cut it
    for mode in ("strict", "skip-corrupt"):
        p = cli("recover", src, "--mode", mode)
        assert p.returncode == 1 and "the store's log is missing" in p.stdout, p.stdout
        assert "choose what to give up" not in p.stdout, p.stdout
        assert "no --mode applies" in p.stdout
    assert not os.path.exists(seg)


def test_recover_json_refused_for_lmdb_damage_is_the_recover_shape(tmp_path):
    import json
    path = str(tmp_path / "s")
    crashed_store(path, 10, compensate="refund")
    ok = str(tmp_path / "ok")
    shutil.copytree(path, ok)
    os.unlink(os.path.join(path, "db", "data.mdb"))
    r = cli("recover", path, "--json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["refused"] is True and doc["recovered"] is False, doc
    assert doc["file"].endswith("data.mdb") and "missing" in doc["reason"]
    assert "--rebuild-state" in doc["problems"][0]["reason"]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "--rebuild-state" in r.stderr
    good = cli("recover", ok, "--json")
    assert good.returncode == 1  # (the loser's action is owed: no compensator)
    assert sorted(json.loads(good.stdout)) == sorted(doc)
    assert not os.path.exists(os.path.join(path, "db", "data.mdb"))  # nothing changed


BIG_WRITER = r"""
import sys, time, walstore
s = walstore.open(sys.argv[1], durability="none")
for i in range(400):
    with s.transaction() as tx:
        tx.put(f"k{i}", "y" * 100_000)
print("READY", flush=True)
time.sleep(600)
"""


def _percents(stderr: str, label: str) -> list[int]:
    import re
    return [int(m) for m in re.findall(label + r":.*\(\s*(\d+)%\)", stderr)]


def test_progress_of_recover_verify_backup_moves_inside_a_segment(tmp_path):
    path = str(tmp_path / "s")
    p = subprocess.Popen([sys.executable, "-c", BIG_WRITER, path], stdout=subprocess.PIPE,
                         text=True, env=cli_env())
    try:
        assert p.stdout.readline().strip() == "READY"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    segs = [n for n in os.listdir(os.path.join(path, "wal")) if n.endswith(".wal")]
    assert len(segs) >= 4  # (1, 4, 16, 16 MiB...)
    for args, label in ((("verify", path), "verify"),
                        (("backup", path, str(tmp_path / "copy")), "backup"),
                        (("recover", path), "recover")):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr[-2000:])
        pcts = _percents(r.stderr, label)
        assert pcts and pcts[-1] == 100, r.stderr
        # the log ends before its last segment's preallocated zeros: the last step may
        # jump to 100%; every other is at most 10% (a line each 5%, a MiB at a time)
        steps = [b - a for a, b in zip(pcts[:-1], pcts[1:-1])]
        assert steps and max(steps) <= 10, (label, pcts)


def test_a_store_whose_lock_is_a_directory_is_exit_1(tmp_path):
    import json
    path = str(tmp_path / "s")
    crashed_store(path, 5)
    os.unlink(os.path.join(path, "LOCK"))
    os.mkdir(os.path.join(path, "LOCK"))
    for args in (("recover", path), ("put", path, "a", "1")):
        r = cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert lines[0].endswith("Is a directory [EISDIR]: " + os.path.join(path, "LOCK"))
        assert lines[0].count("Is a directory") == 1, lines[0]
    r = cli("recover", path, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["type"] == "StoreIOError"
    r = cli("recover", str(tmp_path / "nowhere" / "x"))  # (no store: a usage error still)
    assert r.returncode == 2, r.stderr
    os.rmdir(os.path.join(path, "LOCK"))  # (the entry put right: the store recovers)
    r = cli("recover", path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert len(scan_keys(path)) == 5


LOUD_HANDLERS = r"""
import os, subprocess, sys
os.write(1, b"module imported (fd 1)\n")
def refund(action):
    subprocess.run([sys.executable, "-c", "print('refund sent by a subprocess')"],
                   check=True)
    os.write(1, b"refund written to fd 1\n")
    print("refund printed")
COMPENSATORS = {"refund": refund}
"""


def test_recover_json_stays_one_document_when_a_compensator_writes_to_fd_1(tmp_path):
    import json
    path = str(tmp_path / "s")
    crashed_store(path, 5, compensate="refund")
    handlers = tmp_path / "loud_fd_handlers.py"
    handlers.write_text(LOUD_HANDLERS)
    r = cli("recover", path, "--handlers", str(handlers), "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)  # one document, nothing beside it
    assert doc["recovered"] is True and doc["losers"] == [6] and doc["compensated"] == ["6.1"]
    for line in ("module imported (fd 1)", "refund sent by a subprocess",
                 "refund written to fd 1", "refund printed"):
        assert line in r.stderr, r.stderr
    r = cli("recover", path, "--json")  # (the next run: settled, one document again)
    assert r.returncode == 0 and json.loads(r.stdout)["pending_actions"] == []


FAILING_HANDLERS = r"""
def refund(action):
    raise RuntimeError("payment API said: " + "<html>" * 2000)
COMPENSATORS = {"refund": refund}
"""


def test_a_long_compensation_error_is_cut_in_human_output(tmp_path):
    import json
    path = str(tmp_path / "s")
    crashed_store(path, 5, compensate="refund")
    handlers = tmp_path / "failing_handlers.py"
    handlers.write_text(FAILING_HANDLERS)
    r = cli("recover", path, "--handlers", str(handlers))
    assert r.returncode == 1, (r.stdout, r.stderr)
    outs = [r.stdout, cli("actions", path, "--pending").stdout, cli("verify", path).stdout]
    for out in outs:
        assert "payment API said" in out and "chars; --json shows it whole" in out, out[:500]
        assert max(len(line) for line in out.splitlines()) <= 600, out[:300]
    doc = json.loads(cli("actions", path, "--pending", "--json").stdout)
    assert len(doc["actions"][0]["error"]) > 1000  # (whole under --json)


def test_verify_reports_a_quarantine_that_is_not_a_directory(tmp_path):
    import json
    path = str(tmp_path / "s")
    crashed_store(path, 5)
    last = records(path)[-1]
    with open(last["file"], "r+b") as f:  # a torn tail: recovery must keep its bytes
        f.seek(last["offset"] + 28 + last["length"] + 10)
        f.write(os.urandom(500))
    q = os.path.join(path, "quarantine")
    with open(q, "w") as f:
        f.write("not a directory\n")
    r = cli("recover", path)
    assert r.returncode == 1 and "quarantine" in r.stderr, (r.stdout, r.stderr)
    r = cli("verify", path)
    assert r.returncode == 1, r.stdout
    assert "quarantine/ is not a directory" in r.stdout
    doc = json.loads(cli("verify", path, "--json").stdout)
    assert doc["ok"] is False and any("quarantine" in e for e in doc["errors"])
    os.unlink(q)  # (put right: verify is clean of it, recovery cuts and keeps the tail)
    assert cli("verify", path).returncode == 0
    r = cli("recover", path)
    assert r.returncode == 0 and "torn-tail" in r.stdout, (r.stdout, r.stderr)
