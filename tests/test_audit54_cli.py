"""Audit 54 of the command line (CONTRACT section 3: exit status, one-line errors, one
``--json`` document): regressions found by probing with real CLI processes.

Each test failed on the code before its fix (see the commit naming it):

- a reader of stdout that went away (``walstore verify S | head -1``) turned every exit
  status into 0: `prepared` with a transaction in doubt, `verify` listing it, `recover`
  leaving a refund owed all said "nothing to act on" to ``pipefail``/``PIPESTATUS``;
- a failing ``--json`` command whose stdout reader went away printed nothing at all, not
  even its one line on stderr, and exited 1 whatever the error (a usage error too): the
  error document's write raised BrokenPipeError past the CLI's error path into click's,
  which exits 1 without a word;
- `replicate --json` (no ``--once``) stopped by Ctrl-C or SIGTERM printed no document;
- an ``--endpoint-url`` whose host the S3 client refuses (``h_st``, a space, non-ASCII)
  and an ``s3://`` URL that is not UTF-8 passed the checks: exit 1 with the client's bare
  "Invalid endpoint" / "UnicodeEncodeError" (``open`` made the store first, or opened
  one that never shipped);
- a `backup` refused because the source's LMDB could not be opened left its staging
  directory (``DEST.incomplete-backup-PID-...``) beside DEST;
- `rewind --dry-run` printed every key and txid of its plan on one line (180 KB for
  20,000 keys), `rewind` every txid it undid;
- `restore --follow` showed no progress of its first restore into an empty DEST;
- a ``--handlers`` module exiting at import (``sys.exit``, argparse) ended `recover` with
  its status (0, nothing recovered), no line, no --json document; a compensator calling
  ``sys.exit(3)`` ended `recover` mid-way with status 3;
- `verify` showed no progress while it walked LMDB's pages and decoded its rows;
- under a UTF-8 locale (stdout errors "strict") human output of a non-UTF-8 file name,
  and under a latin-1 locale of any non-ASCII key, failed as "undecodable data", exit 1;
- a running `replicate` whose stderr reader went away stopped shipping, exit 0.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import walstore

from store_support import CLI, cli_env


def run_to_a_gone_reader(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI as a real process whose stdout is a pipe nobody reads any more (its
    read end closed before the child starts: every write fails with EPIPE, as under
    ``| head -1`` once head has exited).  Returns (exit status, stderr)."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], stdout=w,
                              stderr=subprocess.PIPE, text=True, env=cli_env(),
                              timeout=timeout)
    finally:
        os.close(w)
    return proc.returncode, proc.stderr


@pytest.fixture
def in_doubt(tmp_path) -> str:
    """A store holding one prepared (in-doubt) transaction, closed cleanly."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        tx = s.transaction()
        tx.put("k", 1)
        tx.prepare("g1")
    return path


CRASH_CHILD = """
import os, sys, walstore
s = walstore.open(sys.argv[1])
tx = s.transaction()
with tx.action("charge", args={"amount": 5}, compensate="refund") as act:
    act.result = {"charge": 1}
tx.put("x", 1)
print("READY", flush=True)
sys.stdin.read()  # (killed here, the transaction open)
"""


def crashed_with_a_charge(path: str) -> None:
    """A writer killed -9 (a real process) with a charge in an open transaction: the
    next open rolls it back and, with no compensator, leaves its refund owed."""
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, path], env=cli_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


# ---- a problem found stays exit 1 when stdout's reader went away ---------------------------
@pytest.mark.parametrize("args", [["prepared"], ["prepared", "--json"], ["verify"],
                                  ["verify", "--json"]])
def test_a_problem_found_exits_1_even_when_the_reader_of_stdout_went_away(in_doubt, args):
    """CONTRACT 3: exit 1 for "in-doubt transactions that need a decision".  With stdout
    read by a reader that stopped (``walstore prepared S | head -1``), the BrokenPipe
    path exited 0: a script under ``set -o pipefail`` read a store with a transaction in
    doubt as settled."""
    code, err = run_to_a_gone_reader(args[0], in_doubt, *args[1:])
    assert code == 1, err
    assert "Traceback" not in err


def test_recover_leaving_a_refund_owed_exits_1_when_the_reader_went_away(tmp_path):
    """`walstore recover S | head -1` after a kill -9 with a charge in flight: recovery
    rolled the transaction back and left its refund owed (no compensator), which is exit
    1; with the reader gone it said 0."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    crashed_with_a_charge(path)
    code, err = run_to_a_gone_reader("recover", path)
    assert code == 1, err
    with walstore.open(path, readonly=True) as s:  # (the recovery itself was done)
        assert [a.name for a in s.pending_compensations()] == ["charge"]
        assert "x" not in s


def test_a_healthy_listing_still_exits_0_when_the_reader_went_away(tmp_path):
    """The other side: nothing found, a reader gone mid-output is exit 0, no word."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.update((f"k{i:05d}", i) for i in range(3000))
    for args in (["scan", path], ["verify", path], ["prepared", path, "--json"]):
        code, err = run_to_a_gone_reader(*args)
        assert (code, err) == (0, ""), args


# ---- a --json failure keeps its line and exit status when the reader went away ------------
def test_a_json_failure_keeps_its_line_and_exit_status_when_the_reader_went_away(tmp_path):
    """A failing ``--json`` command prints its error document on stdout and its one line
    on stderr.  With stdout's reader gone, the document's write raised BrokenPipeError
    into click, which exited 1 and said nothing: a missing store, a malformed point, a
    file given as PATH (usage errors, exit 2) all became a silent exit 1."""
    missing = str(tmp_path / "nothing-here")
    code, err = run_to_a_gone_reader("stats", missing, "--json")
    assert code == 2
    assert err.startswith("walstore: stats failed: ") and missing in err
    assert len(err.strip().splitlines()) == 1

    store = str(tmp_path / "s")
    walstore.open(store).close()
    code, err = run_to_a_gone_reader("rewind", store, "--to", "lsn:-1", "--json")
    assert code == 2
    assert err.strip() == ("walstore: bad point 'lsn:-1': after 'lsn:' comes a "
                           "non-negative number")

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    code, err = run_to_a_gone_reader("scan", str(a_file), "--json")  # (click's own usage)
    assert code == 2
    assert "is a file" in err and "Traceback" not in err

    code, err = run_to_a_gone_reader("revert", store, "99", "--json")  # (names nothing)
    assert code == 2
    assert err.startswith("walstore: revert failed: ") and "99" in err


# ---- replicate --json (no --once): one document at its stop -----------------------------
def _sigterm_when(args: list, bound: float, ready) -> tuple[int, str, str]:
    """Run ``walstore ARGS``, read its stderr until a line ``ready(line)`` says so, stop it
    with SIGTERM as an operator would; (exit status, stdout, the whole stderr).  ``bound``
    seconds bound the wait for that line (killed then), never its pace."""
    import signal
    import threading

    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    guard = threading.Timer(bound, proc.kill)
    guard.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if ready(line):
                break
        else:
            raise AssertionError(f"walstore {args[0]} never printed the line awaited: "
                                 f"{''.join(seen)[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, "".join(seen) + err


def test_replicate_json_stopped_by_a_signal_prints_one_document(tmp_path):
    """README: `walstore replicate ... [--json]`, and every ``--json`` command prints one
    document.  Running (no ``--once``) and stopped as it is meant to stop (Ctrl-C or
    SIGTERM, exit 0), it printed nothing on stdout: a script's ``json.loads`` of it
    failed.  Now it says where the replica stands, as `restore --follow --json` does."""
    import json

    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    url = (tmp_path / "replica").as_uri()
    code, out, err = _sigterm_when(  # (a status line once the store is shipped: no lag)
        ["replicate", path, url, "--json", "--interval", "0.5"], 60,
        lambda line: line.startswith("shipped LSN") and " lag 0 B " in line)
    assert code == 0, err
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["stopped"] is True and doc["url"] == url and doc["state"] == "stopped"
    assert doc["shipped_lsn"] > 0 and doc["lag_bytes"] == 0
    with walstore.open(path, readonly=True) as s:
        assert doc["shipped_lsn"] == s.stats()["wal_end_lsn"]


# ---- an S3 endpoint or URL no client can use: a usage error before anything is made -------
def run_cli(*args: str | bytes) -> subprocess.CompletedProcess:
    """The CLI as a real process; ``bytes`` arguments reach it as argv bytes (not UTF-8)."""
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True,
                          text=True, errors="surrogateescape", env=cli_env(), timeout=60)


@pytest.mark.parametrize("endpoint", ["http://h_st:9000", "http://h st:9000",
                                      "http://-minio:9000", "http://h\u00e9st:9000",
                                      b"http://h\xffst:9000"])
def test_an_endpoint_host_the_s3_client_refuses_is_a_usage_error(tmp_path, endpoint):
    """README: an ``--endpoint-url`` that cannot work is a usage error (exit 2).  One whose
    host is no DNS name or IP address (an underscore, a space, a leading '-', a non-ASCII
    or non-UTF-8 name) passed the check and the S3 client refused it when it was made:
    "cannot set up the S3 client ...: ValueError: Invalid endpoint", exit 1 — and
    ``walstore.open(replicate_to=...)`` raised it after it had created the store."""
    r = run_cli("replicas", "s3://bucket/agents", "--endpoint-url", endpoint)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("walstore: endpoint URL ") and "host name" in r.stderr
    assert "Invalid endpoint" not in r.stderr and len(r.stderr.splitlines()) == 1
    path = tmp_path / "s"
    shown = endpoint if isinstance(endpoint, str) else os.fsdecode(endpoint)
    with pytest.raises(walstore.ReplicationError, match="endpoint URL"):
        walstore.open(str(path), replicate_to="s3://bucket/agents",
                      replicate_options={"endpoint_url": shown})
    assert not path.exists()  # (refused before the store was touched)


def test_an_s3_url_that_is_not_utf8_is_a_usage_error(tmp_path):
    """An S3 URL whose prefix is not UTF-8 (argv bytes): object keys are UTF-8, so no
    request could be made.  `replicas` failed with "GET ...: UnicodeEncodeError", exit 1,
    and ``walstore.open(replicate_to=...)`` opened and shipped nothing, ever (every round:
    "UnicodeEncodeError")."""
    r = run_cli("replicas", b"s3://bucket/agents\xff", "--endpoint-url",
                "http://127.0.0.1:9")
    assert r.returncode == 2, r.stderr
    assert "not valid UTF-8" in r.stderr and "UnicodeEncodeError" not in r.stderr
    path = tmp_path / "s"
    with pytest.raises(walstore.ReplicationError, match="not valid UTF-8"):
        walstore.open(str(path), replicate_to="s3://bucket/agents\udcff",
                      replicate_options={"endpoint_url": "http://127.0.0.1:9"})
    assert not path.exists()


# ---- a refused backup leaves nothing beside DEST -----------------------------------------
def test_a_backup_refused_for_a_damaged_lmdb_leaves_no_staging_directory(tmp_path):
    """`walstore backup SRC DEST` of a store whose LMDB data file is missing (or not a
    file) fails, exit 1, one line naming it — and left ``DEST.incomplete-backup-PID-...``
    beside DEST, one more empty directory at every try: the staging directory was made
    before LMDB was opened, outside the block that removes it."""
    src = str(tmp_path / "src")
    with walstore.open(src) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    os.remove(os.path.join(src, "db", "data.mdb"))
    backups = tmp_path / "backups"
    backups.mkdir()
    for _ in range(2):
        r = run_cli("backup", src, str(backups / "copy"))
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("walstore: backup failed: ") and "data.mdb" in r.stderr
    assert os.listdir(backups) == []


# ---- human output stays short: long lists show their first 20 ----------------------------
def test_rewind_lines_show_the_first_20_of_a_long_list(tmp_path):
    """CONTRACT 3: "Human output is short".  `rewind --dry-run` printed every key that
    would change, and every txid undone, joined on one line (a plan over 20,000 keys:
    one line of 180 KB), and `rewind` its "undoing transactions [...]" the same way;
    `recover` already showed the first 20.  ``--json`` still lists them all."""
    import json

    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(60):
            with s.transaction() as tx:
                tx.put(f"key-{i:03d}", i)
    doc = json.loads(run_cli("rewind", path, "--to", "lsn:0", "--dry-run", "--json").stdout)
    txids, keys = doc["plan"]["txids"], doc["plan"]["keys"]  # (--json: every one)
    assert len(txids) >= 59 and len(keys) == len(txids)
    r = run_cli("rewind", path, "--to", "lsn:0", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    for name in ("txids", "keys"):
        assert f"({len(txids) - 20} more; --json lists them all)" in lines[name], lines[name]
        assert len(lines[name]) < 400

    r = run_cli("rewind", path, "--to", "lsn:0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("committed txid 61 ") and len(r.stdout) < 400
    assert "undoing transactions [60, 59, " in r.stdout
    assert f"({len(txids) - 20} more;" in r.stdout
    with walstore.open(path, readonly=True) as s:
        assert len(list(s.scan())) == 60 - len(txids)


# ---- restore --follow shows the progress of its first restore ------------------------------
def test_restore_follow_shows_the_progress_of_its_first_restore(tmp_path):
    """CONTRACT 3: progress on long work.  `restore --follow` into an empty DEST restores
    the whole replica first (the snapshot's download, the WAL after it) and said nothing
    but "following ... (Ctrl-C stops)" until its first round, however large the replica;
    `restore` without --follow shows that same work (test_progress_long_verbs)."""
    from test_progress_long_verbs import checkpointed_store, shown

    path = str(tmp_path / "s")
    checkpointed_store(path)  # (past the size from which progress is shown)
    url = (tmp_path / "replica").as_uri()
    assert run_cli("replicate", path, url, "--once", "--json").returncode == 0
    code, _out, err = _sigterm_when(  # (before the fix no progress line ever came)
        ["restore", url, str(tmp_path / "copy"), "--follow", "--interval", "0.5"], 30,
        lambda line: line.startswith("restore:") and "(100%)" in line)
    assert code == 0, err
    lines = shown(err, "restore")
    assert len(lines) >= 5 and "(100%)" in lines[-1], seen
    with walstore.open(str(tmp_path / "copy"), readonly=True) as c:
        assert c.get("k0") is not None


# ---- a --handlers module that exits at import is a usage error ------------------------------
@pytest.mark.parametrize("body", ["import sys\nsys.exit(0)\n",
                                  "import argparse\n"
                                  "argparse.ArgumentParser().parse_args(['--bogus'])\n"])
def test_a_handlers_module_exiting_at_import_is_a_usage_error(tmp_path, body):
    """`--handlers MODULE` that cannot be imported is a usage error (README).  One that
    exits while it is imported (``sys.exit()``, or argparse on its own argv: an
    application module) went past the check (SystemExit is no Exception): `recover`
    exited with the module's status — 0, having recovered nothing — and under --json
    printed no document."""
    import json

    path = str(tmp_path / "s")
    walstore.open(path).close()
    crashed_with_a_charge(path)
    module = tmp_path / "app_handlers.py"
    module.write_text(body)
    for extra in ([], ["--json"]):
        r = run_cli("recover", path, "--handlers", str(module), *extra)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "--handlers" in r.stderr and "SystemExit" in r.stderr
        if extra:
            assert json.loads(r.stdout)["error"]["exit"] == 2
    with walstore.open(path, readonly=True) as s:  # (nothing was done: still to recover)
        assert s.needs_recovery()


def test_a_compensator_calling_sys_exit_is_a_failed_compensation(tmp_path):
    """`recover --handlers M` whose refund calls ``sys.exit(3)``: the SystemExit went
    through the compensation's retries and ended the command with status 3 (walstore
    gives 0, 1 or 2), nothing said, the store still needing recovery.  It is a failure of
    that compensation now: retried, escalated, the action listed owed (failed), exit 1."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    crashed_with_a_charge(path)
    module = tmp_path / "exiting_refund.py"
    module.write_text("import sys\ndef refund(action):\n    sys.exit(3)\n"
                      "COMPENSATORS = {'refund': refund}\n")
    r = run_cli("recover", path, "--handlers", str(module))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "sys.exit(3)" in r.stdout and "recovered; not settled" in r.stdout
    with walstore.open(path, readonly=True) as s:
        assert not s.needs_recovery()
        (owed,) = s.pending_compensations()
        assert owed.name == "charge" and owed.state == "failed"
        assert "sys.exit(3)" in owed.error


# ---- verify shows the progress of its LMDB checks -----------------------------------------
def test_verify_shows_progress_while_it_checks_lmdb(tmp_path):
    """CONTRACT 3: progress on long work.  `verify` showed progress for the log's walk
    and the file content it hashes only; a checkpointed store (LMDB large, WAL short)
    was walked page by page and decoded row by row without a word: 3.5 s for 760 MB of
    LMDB here, seconds a GB.  Both now show lines of their own on stderr (never under
    --json), past the usual 32 MiB."""
    from walstore.cli.output import PROGRESS_MIN_BYTES

    from test_progress_long_verbs import shown

    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40)
    rows, size = 0, 1000
    while rows * size < PROGRESS_MIN_BYTES * 1.2:  # (past the threshold, in LMDB)
        with s.transaction() as tx:
            tx.update((f"k{rows + i:07d}", os.urandom(size)) for i in range(4000))
        rows += 4000
    s.checkpoint()
    s.close()
    r = run_cli("verify", path)
    assert r.returncode == 0, r.stderr
    pages, decoded = shown(r.stderr, "verify LMDB pages"), shown(r.stderr, "verify LMDB rows")
    assert len(pages) >= 5 and "(100%)" in pages[-1], r.stderr
    assert len(decoded) >= 5 and "(100%)" in decoded[-1], r.stderr
    assert "verify" not in r.stdout.replace("keys checked", "")
    js = run_cli("verify", path, "--json")
    assert js.returncode == 0 and js.stderr == "", js.stderr


# ---- human output under a strict (UTF-8 locale) or non-UTF-8 stdout ------------------------
def test_human_output_shows_non_utf8_names_under_a_utf8_locale(tmp_path):
    """Under a UTF-8 locale (en_US.UTF-8) Python's stdout is UTF-8 with errors "strict"
    (only the C locale gives "surrogateescape"): `files`, `diff` and `rewind --dry-run`
    of a workspace holding a file whose name is not UTF-8 failed as "undecodable data
    (UnicodeEncodeError ...)", exit 1, as if the store were damaged.  Under a latin-1
    locale `scan` failed so on any non-ASCII key.  PYTHONIOENCODING stands in for the
    locale here (this machine has C.UTF-8 only, which Python coerces)."""
    ws_root = tmp_path / "ws"
    ws_root.mkdir()
    path = str(tmp_path / "s")
    bad = os.fsdecode(b"bad\xffname.txt")
    with walstore.open(path) as s:
        ws = s.workspace(str(ws_root))
        with s.transaction() as tx:
            tx.files(ws).write(bad, "x")
            tx.put("\u65e5\u672c", "v")
    strict_utf8 = dict(cli_env(), PYTHONIOENCODING="utf-8")
    for args in (["files", path], ["diff", path, "--from", "lsn:0"],
                 ["rewind", path, "--to", "lsn:0", "--dry-run"]):
        r = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True,
                           env=strict_utf8, timeout=60)
        assert r.returncode == 0, (args, r.stderr)
        assert b"bad\xffname.txt" in r.stdout, args  # (the name's own bytes, as ls shows)
    r = subprocess.run([sys.executable, "-c", CLI, "scan", path], capture_output=True,
                       env=dict(cli_env(), PYTHONIOENCODING="latin-1"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"\\u65e5\\u672c" in r.stdout


# ---- a long-running verb whose stderr reader went away goes on -----------------------------
def test_replicate_goes_on_when_the_reader_of_its_status_lines_went_away(tmp_path):
    """`walstore replicate PATH URL 2>&1 | logger`, the logger gone: the first status line
    on stderr raised BrokenPipeError, which ended the shipper with exit 0 — replication
    stopped without a word.  Its status lines are dropped now, as progress lines are
    (README: a closed stderr is never the command's failure), and it ships on."""
    import json
    import signal
    import time

    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    replica = tmp_path / "replica"
    r, w = os.pipe()
    os.close(r)  # (stderr: a pipe nobody reads any more)
    try:
        proc = subprocess.Popen([sys.executable, "-c", CLI, "replicate", path,
                                 replica.as_uri(), "--json", "--interval", "0.2"],
                                stdout=subprocess.PIPE, stderr=w, text=True, env=cli_env())
    finally:
        os.close(w)
    try:
        deadline = time.monotonic() + 30  # (waiting on the replica, bounded; the old code
        while (proc.poll() is None and not (replica / "manifest").exists()  # exited here)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        time.sleep(1.5)  # (not a synchronisation: status lines come once a second, and
        # nothing outside the process shows one was tried; this lets one or two fail)
        assert proc.poll() is None, "the shipper ended when its stderr reader went away"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    doc = json.loads(out)
    with walstore.open(path, readonly=True) as s:
        assert doc["shipped_lsn"] == s.stats()["wal_end_lsn"] and doc["lag_bytes"] == 0
