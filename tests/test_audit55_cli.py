"""Audit 55 of the command line (CONTRACT section 3: ``--json`` one document of stable
keys, exit status, one-line errors): regressions found by probing with real CLI
processes.  Each test failed on the code before its fix (see the commit naming it):

- `recover --json` printed one document shape on success and another on a refusal;
- `walstore --json stats PATH` (the flag before the verb) was click's "No such option",
  with no JSON document;
- `walstore demo PATH | head -3` (or Ctrl-C) left PATH-demo-files and half a store, and
  the next `walstore demo PATH` refused;
- `replicate` / `restore --follow` called in-process kept their SIGINT/SIGTERM handlers;
- `replicas --json` had no `verify` key without --verify; `dump --json` damage entries
  lacked a record's keys;
- the recovery (or read-only judging) an unclean store's open runs showed no progress in
  `put`, `get`, ...; and recovery's progress stopped short of 100%;
- a --json error document stdout could not take (``> /dev/full``) printed a traceback,
  and a failed write of the output was said as the store's failure;
- a key starting with "-" was shown as -x, which does not paste back;
- `restore --handlers` without --compensate (and --interval/--apply-every without
  --follow) were ignored without a word."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import walstore

from store_support import CLI, cli_env, ctrl_c_reaches_it


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=timeout)


def _crashed_store_with_damage(path: str, at: int = 100) -> None:
    """A store whose writer died with five commits in its log, one record's byte flipped
    (a valid record follows: strict recovery refuses)."""
    code = ("import os, sys, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "for i in range(5):\n"
            "    with s.transaction() as tx: tx.put('k%d' % i, i)\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, path], check=True, env=cli_env())
    seg = os.path.join(path, "wal", sorted(os.listdir(os.path.join(path, "wal")))[0])
    with open(seg, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_recover_json_has_one_shape_recovered_or_refused(tmp_path):
    """`recover --json` printed a recovery report on success and another document on a
    refusal (no `records`, `redone`, `pending_actions`...; the success had no `refused`,
    `reason`, `file`...): a script met a KeyError on one of them."""
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    with walstore.open(good) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    _crashed_store_with_damage(bad)
    ok, refused = cli("recover", good, "--json"), cli("recover", bad, "--json")
    assert ok.returncode == 0 and refused.returncode == 1, (ok.stderr, refused.stderr)
    a, b = json.loads(ok.stdout), json.loads(refused.stdout)
    assert sorted(a) == sorted(b)
    assert a["recovered"] is True and a["refused"] is False and a["reason"] is None
    assert a["file"] is None and a["rebuilt_state"] is None
    assert b["recovered"] is False and b["refused"] is True and b["reason"]
    assert b["file"].endswith(".wal") and b["pending_actions"] == []
    assert b["problems"][0]["kind"] == "refused"


def test_json_before_the_verb_is_the_verbs_json(tmp_path):
    """`walstore --json stats PATH` was click's "No such option '--json'", exit 2, with
    nothing on stdout: a script asking for a document got none."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    before, after = cli("--json", "stats", path), cli("stats", path, "--json")
    assert before.returncode == after.returncode == 0, before.stderr
    assert sorted(json.loads(before.stdout)) == sorted(json.loads(after.stdout))
    # a verb without --json, and the flag with no verb: usage errors, each a document
    for args in (("--json", "get", path, "k"), ("--json",), ("--json", "--bad", "stats")):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert json.loads(r.stdout)["error"]["type"] == "UsageError", args


def _demo_until(path: str, marker: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CLI, "demo", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), preexec_fn=ctrl_c_reaches_it)
    for line in proc.stdout:
        if line.startswith(marker):
            return proc
    proc.kill()
    raise AssertionError(f"the demo never printed {marker!r}: {proc.stderr.read()}")


def test_a_demo_whose_reader_goes_away_leaves_nothing_behind(tmp_path):
    """`walstore demo PATH | head -3` left PATH-demo-files (and, later in the story, half
    a store): the next `walstore demo PATH` refused, "PATH-demo-files exists"."""
    path = str(tmp_path / "d")
    proc = _demo_until(path, "== 4.")
    proc.stdout.close()  # (the reader goes away, as head's exit does)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert "Traceback" not in proc.stderr.read()
    assert not os.path.lexists(path) and not os.path.lexists(path + "-demo-files")
    # an empty directory the user gave stays, empty
    os.mkdir(path)
    proc = _demo_until(path, "== 2.")
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert os.listdir(path) == [] and not os.path.lexists(path + "-demo-files")


def test_a_demo_interrupted_mid_crash_story_leaves_nothing_behind(tmp_path):
    """Ctrl-C while the demo's worker process runs: exit 130, no worker, no files."""
    for attempt in range(5):
        path = str(tmp_path / f"d{attempt}")
        proc = _demo_until(path, "== 6.")
        proc.send_signal(2)
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0 and "Inspect it yourself" in out:
            # the whole rest of the story ran before the signal landed (a loaded machine
            # descheduled this test between the line and the signal: seen once in CI):
            # not the case under test, try again
            continue
        assert proc.returncode == 130, err
        assert "demo interrupted (Ctrl-C)" in err and "Traceback" not in err
        assert not os.path.lexists(path) and not os.path.lexists(path + "-demo-files")
        return
    raise AssertionError("the demo finished before the Ctrl-C in every attempt")


def test_replicate_called_in_process_gives_back_the_signal_handlers(tmp_path):
    """`main(["replicate", ...], standalone_mode=False)` returned with its own SIGINT and
    SIGTERM handlers still installed: the caller's Ctrl-C after it only set the dead
    command's stop flag (no KeyboardInterrupt), and SIGTERM no longer ended it."""
    import signal
    import threading

    from walstore.cli import main

    path = str(tmp_path / "s")
    walstore.open(path).close()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def stop_it() -> None:  # (SIGTERM once the command's handler is in place)
        for _ in range(6000):
            if signal.getsignal(signal.SIGTERM) is not before[1]:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(0.01)
    t = threading.Thread(target=stop_it)
    t.start()
    try:
        main(["replicate", path, (tmp_path / "replica").as_uri()], standalone_mode=False)
    finally:
        t.join()
        now = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert now == before


def test_replicas_json_has_the_same_keys_with_and_without_verify(tmp_path):
    """`replicas --json` had no `verify` key without --verify: a script reading
    doc["verify"] met a KeyError on the one form and not the other."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    url = (tmp_path / "replica").as_uri()
    assert cli("replicate", path, url, "--once").returncode == 0
    plain, checked = cli("replicas", url, "--json"), cli("replicas", url, "--json", "--verify")
    assert plain.returncode == checked.returncode == 0, (plain.stderr, checked.stderr)
    a, b = json.loads(plain.stdout), json.loads(checked.stdout)
    assert sorted(a) == sorted(b) and a["verify"] is None and b["verify"]["ok"] is True


def test_a_writing_verb_shows_the_progress_of_the_recovery_its_open_runs(tmp_path):
    """`put` (also `delete`, `resolve`, `commit-prepared`, `rollback-prepared`) on a store
    not shut down cleanly recovers it as it opens: a walk of the whole log since the last
    checkpoint, which ran without a word however large (CONTRACT 3: progress on long
    work; `checkpoint` and `purge` showed it)."""
    from walstore.cli.output import PROGRESS_MIN_BYTES
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40,
                      segment_size=16 << 20)
    blob = os.urandom((1 << 20) - 200)
    for i in range(PROGRESS_MIN_BYTES // (1 << 20) + 4):
        with s.transaction() as tx:
            tx.put(f"k{i % 8}", blob)
    s._drop_like_a_crash()  # (unclean: the next writable open recovers the whole log)
    r = cli("put", path, "x", "1")
    assert r.returncode == 0, r.stderr
    shown = [ln for ln in r.stderr.splitlines() if ln.startswith("recover:")]
    assert shown and "(100%)" in shown[-1], r.stderr
    assert r.stdout.startswith("committed"), r.stdout
    # a read-only verb's open judges the crashed log as recovery would: shown too
    path2 = str(tmp_path / "s2")
    s = walstore.open(path2, durability="none", checkpoint_bytes=1 << 40,
                      segment_size=16 << 20)
    for i in range(PROGRESS_MIN_BYTES // (1 << 20) + 4):
        with s.transaction() as tx:
            tx.put(f"k{i % 8}", blob)
    s._drop_like_a_crash()
    r = cli("get", path2, "k1")
    assert r.returncode == 0, r.stderr
    shown = [ln for ln in r.stderr.splitlines() if ln.startswith("check log:")]
    assert shown and "(100%)" in shown[-1], r.stderr
    r = cli("scan", path2, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def _to_dev_full(*args: str) -> subprocess.CompletedProcess:
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, "-c", CLI, *args], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=cli_env(), timeout=60)


def test_output_that_cannot_be_written_is_said_as_such_never_a_traceback(tmp_path):
    """Stdout on a full disk (``> /dev/full``): a failing --json command whose error
    document could not be written printed a traceback and exited 1 (a usage error: 2);
    and a write failure was said as the store's ("put failed: No space left on device
    (store PATH)") for a put that had committed."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    r = _to_dev_full("stats", str(tmp_path / "missing"), "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    r = _to_dev_full("put", path, "k", "5")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert "stdout" in line and "ENOSPC" in line and "(store" not in line, line
    with walstore.open(path, readonly=True) as s:
        assert s.get("k") == 5  # (it committed: the line says what failed)


def test_a_key_starting_with_a_dash_is_shown_so_that_it_pastes_back(tmp_path):
    """`scan` showed the key "-x" as -x, which pasted back (`walstore get S -x`) is an
    option to click: "No such option: -x", exit 2 (docs/CLI.md: any key shown can be
    pasted back)."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("-x", 1)
    r = cli("scan", path)
    assert r.returncode == 0, r.stderr
    shown = r.stdout.splitlines()[1].split()[0]
    back = cli("get", path, shown)
    assert back.returncode == 0 and back.stdout.strip() == "1", (shown, back.stderr)


def test_dump_json_records_have_one_shape_damage_included(tmp_path):
    """`dump --json` wrote a damage pseudo-record (CORRUPT, TORN, GAP, ...) without the
    keys of a record (end_lsn, synced_lsn, payload; a GAP without offset): a script
    reading r["payload"] of each record met a KeyError at the first damage."""
    path = str(tmp_path / "s")
    _crashed_store_with_damage(path, at=250)  # (two commits before it)
    r = cli("dump", path, "--json")
    assert r.returncode == 1, r.stderr  # (damage met)
    recs = json.loads(r.stdout)["records"]
    kinds = {x["type"] for x in recs}
    assert "COMMIT" in kinds and kinds - {"COMMIT", "CHECKPOINT"}, kinds
    assert len({tuple(sorted(x)) for x in recs}) == 1, recs
    assert all(x["payload"] is None for x in recs if x["type"] not in ("COMMIT", "CHECKPOINT"))


def test_restore_refuses_an_option_of_another_mode_instead_of_ignoring_it(tmp_path):
    """`restore URL DEST --handlers MOD` without --compensate restored, ran no
    compensation (the user named the module to run them) and exited 0; `--interval` and
    `--apply-every` without --follow were ignored too.  Each is a usage error now, DEST
    untouched."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    url = (tmp_path / "replica").as_uri()
    assert cli("replicate", path, url, "--once").returncode == 0
    dest = tmp_path / "copy"
    for extra in (["--handlers", "walstore.demo_payments"], ["--apply-every", "5"],
                  ["--interval", "2"], ["--follow", "--handlers", "walstore.demo_payments"]):
        r = cli("restore", url, str(dest), *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and not dest.exists(), (extra, r.stderr)
    r = cli("restore", url, str(dest), "--compensate", "--handlers", "walstore.demo_payments")
    assert r.returncode == 0, r.stderr


def test_the_cli_called_in_process_leaves_the_callers_interpreter_as_it_was(tmp_path,
                                                                            monkeypatch):
    """`main([...], standalone_mode=False)` left the caller's stdout writing lone
    surrogates where it had raised (errors "strict" became "surrogateescape") and its
    recursion limit raised to 3000."""
    import io

    from walstore.cli import main

    path = str(tmp_path / "s")
    walstore.open(path).close()
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        main(["stats", path], standalone_mode=False)
        assert sys.getrecursionlimit() == 1000
    finally:
        sys.setrecursionlimit(before)
    assert out.errors == "strict"


def test_scan_with_a_limit_says_whether_more_keys_follow(tmp_path):
    """`scan --limit N` showing N keys did not say whether there were others (`log` and
    `history` do: `more`, and a line on stderr)."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            for k in ("a", "b", "c"):
                tx.put(k, 1)
    cut, whole = cli("scan", path, "--limit", "2", "--json"), cli("scan", path, "--json")
    assert json.loads(cut.stdout)["more"] is True and len(json.loads(cut.stdout)["items"]) == 2
    assert json.loads(whole.stdout)["more"] is False
    r = cli("scan", path, "--limit", "2")
    assert r.returncode == 0 and "more" in r.stderr and len(r.stdout.splitlines()) == 3
    assert cli("scan", path, "--limit", "3").stderr == ""
