"""The command line as an operator meets it after a crash and on a bad day (probe-cli2):
a writing verb that recovers a crashed store as it opens says what the recovery did and
exits 1 when a compensation became owed; progress lines that cannot be written never
fail the work; an in-flight action is not called owed; a dry run of a rewind that would
undo nothing lists nothing, as the rewind itself then says "nothing to undo".  Real
processes: a writer killed with SIGKILL, the CLI run as a process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import walstore
from store_support import CLI, cli_env


def run_cli(*args: str, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], env=cli_env(), text=True,
                          stdout=subprocess.PIPE, stderr=stderr, timeout=120)


def store_with(path: str, *transactions: dict) -> None:
    """A store at ``path`` with each mapping committed as one transaction, closed."""
    with walstore.open(path) as s:
        for items in transactions:
            with s.transaction() as tx:
                tx.update(items)


def crash_inside_a_charge(path: str) -> None:
    """A writer charges inside a transaction and is killed before it commits."""
    code = (f"import os, signal, walstore\n"
            f"s = walstore.open({path!r})\n"
            f"with s.transaction() as t0: t0.put('kept', 1)\n"
            f"tx = s.transaction(); tx.put('order', 1)\n"
            f"with tx.action('charge', args={{'amount': 40}}, compensate='refund') as a:\n"
            f"    a.result = {{'charge_id': 'ch_1'}}\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=60)
    assert p.returncode == -9


@pytest.mark.parametrize("verb", [("put", "k", "1"), ("delete", "kept"), ("checkpoint",),
                                  ("purge", "zzz/", "--yes")])
def test_a_writing_verb_that_recovered_the_store_says_so_and_exits_1(tmp_path, verb):
    path = str(tmp_path / "s")
    crash_inside_a_charge(path)
    r = run_cli(verb[0], path, *verb[1:])
    assert r.returncode == 1, (r.stdout, r.stderr)
    warning = [l for l in r.stderr.splitlines() if "was not shut down cleanly" in l]
    assert len(warning) == 1 and "1 compensation(s) owed" in warning[0], r.stderr
    assert "Traceback" not in r.stderr
    with walstore.open(path, readonly=True) as s:  # (the verb's own work was done)
        assert [a.state for a in s.actions()] == ["pending"]
        assert s.get("order") is None
        if verb[0] == "put":
            assert s.get("k") == 1


def test_a_writing_verb_after_a_clean_crash_says_nothing_and_exits_0(tmp_path):
    """A writer killed between transactions: recovery only redoes commits — nothing to
    say, nothing owed."""
    path = str(tmp_path / "s")
    code = (f"import os, signal, walstore\n"
            f"s = walstore.open({path!r})\n"
            f"with s.transaction() as tx: tx.put('a', 1)\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=60)
    r = run_cli("put", path, "b", "2")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with walstore.open(path, readonly=True) as s:
        assert (s.get("a"), s.get("b")) == (1, 2)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("verb", ["verify", "backup", "checkpoint"])
def test_progress_that_cannot_be_written_never_fails_the_work(tmp_path, verb):
    """stderr on a full disk: `verify` failed a healthy store, `backup` made no copy."""
    path = str(tmp_path / "s")
    code = (f"import os, signal, walstore\n"  # (killed: its 40 MB of log stay to walk)
            f"s = walstore.open({path!r}, durability='none')\n"
            f"for i in range(0, 40_000, 2_000):\n"
            f"    with s.transaction() as tx:\n"
            f"        tx.update((f'k{{j:06d}}', 'x' * 1_000) for j in range(i, i + 2_000))\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=120)
    args = [verb, path] + ([str(tmp_path / "copy")] if verb == "backup" else [])
    with open("/dev/full", "w") as full:
        r = run_cli(*args, stderr=full)
    assert r.returncode == 0, r.stdout
    if verb == "backup":
        with walstore.open(str(tmp_path / "copy"), readonly=True) as c:
            assert c.get("k039999") == "x" * 1_000


def test_an_in_flight_action_is_not_called_owed(tmp_path):
    path = str(tmp_path / "s")
    code = (f"import sys, walstore\n"
            f"s = walstore.open({path!r})\n"
            f"tx = s.transaction(); tx.put('a', 1)\n"
            f"with tx.action('charge', args={{}}, compensate='refund') as a:\n"
            f"    a.result = {{'id': 7}}\n"
            f"print('ready', flush=True); sys.stdin.read()\n")
    writer = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "ready"
        r = run_cli("actions", path, "--json")
        (action,) = json.loads(r.stdout)["actions"]
        assert action["in_flight"] is True and action["reason"] is None, action
    finally:
        writer.kill()
        writer.wait()


def test_a_dry_run_that_would_undo_nothing_lists_nothing(tmp_path):
    """After a rewind, a rewind to an earlier point whose keys all end as they began:
    the dry run listed the first rewind among the transactions undone, the rewind then
    said "nothing to undo"."""
    path = str(tmp_path / "s")
    store_with(path, {"a": 1}, {"a": 2, "b": 1}, {"c": 1})
    with walstore.open(path) as s:
        s.rewind(walstore.LSN(5))
        plan = s.rewind(walstore.LSN(0), dry_run=True)
        assert plan.txids == [] and plan.empty()
        assert s.rewind(walstore.LSN(0)) is None
    dry = json.loads(run_cli("rewind", path, "--to", "lsn:0", "--dry-run", "--json").stdout)
    real = json.loads(run_cli("rewind", path, "--to", "lsn:0", "--json").stdout)
    assert dry["plan"]["txids"] == real["reverted"] == []


def test_human_tables_cut_long_values_and_say_so(tmp_path):
    """`scan` printed a 200 KB value whole in one table row; `--json` still has it."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("big", "x" * 200_000)
            tx.put("tab\tkey", 1)
    r = run_cli("scan", path)
    assert r.returncode == 0
    assert max(len(line) for line in r.stdout.splitlines()) < 400, r.stdout[:500]
    assert "200,002 chars" in r.stdout and "tab\\tkey" in r.stdout
    doc = json.loads(run_cli("scan", path, "--json").stdout)
    assert {i["key"]: i["value"] for i in doc["items"]}["big"] == "x" * 200_000


def test_a_refused_revert_gives_the_command_lines_advice(tmp_path):
    path = str(tmp_path / "s")
    store_with(path, {"a": 1}, {"a": 2})
    r = run_cli("revert", path, "1")
    assert r.returncode == 1 and "use --cascade" in r.stderr and "cascade=True" not in r.stderr


def test_follow_with_json_prints_one_document_when_stopped(tmp_path):
    import signal
    import time
    path, rep = str(tmp_path / "s"), f"file://{tmp_path}/rep"
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    assert run_cli("replicate", path, rep, "--once").returncode == 0
    p = subprocess.Popen([sys.executable, "-c", CLI, "restore", rep, str(tmp_path / "copy"),
                          "--follow", "--interval", "0.2", "--json"], env=cli_env(),
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not os.path.exists(tmp_path / "copy") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    doc = json.loads(out)
    assert doc["stopped"] is True and doc["rounds"] >= 1, (doc, err)


def test_recover_lists_file_conflicts_an_earlier_open_recorded(tmp_path):
    """A writer killed inside a file transaction, a stranger then edits the path, and the
    application's open (recover="auto") records the conflict: `walstore recover` said
    "recovered cleanly" with no word of it."""
    base, root = tmp_path, tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("original")
    code = (f"import sys, walstore\n"
            f"s = walstore.open({str(base / 'store')!r}); ws = s.workspace({str(root)!r})\n"
            f"tx = s.transaction(); tx.files(ws).write('a.txt', 'walstore-version')\n"
            f"print('ready', flush=True); sys.stdin.read()\n")
    writer = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == "ready"
    writer.kill()
    writer.wait()
    (root / "a.txt").write_text("stranger")
    with walstore.open(str(base / "store")) as s:
        assert len(s.file_conflicts()) == 1
    r = run_cli("recover", str(base / "store"))
    assert "a.txt" in r.stdout and "recovered cleanly" not in r.stdout, r.stdout
    doc = json.loads(run_cli("recover", str(base / "store"), "--json").stdout)
    (c,) = doc["file_conflicts_recorded_earlier"]
    assert c["path"].endswith("a.txt") and c["saved_as"]
    assert (root / "a.txt").read_text() == "stranger"


def test_verify_exits_1_while_a_compensation_is_owed_or_a_transaction_is_in_doubt(tmp_path):
    """CONTRACT 3: exit 1 for pending compensations and in-doubt transactions.  `walstore
    verify` said "ok", exit 0, of a store whose killed writer left a charge owed its
    refund and a prepared transaction in doubt (stop 48); it lists them now, and says ok
    once they are decided."""
    path = str(tmp_path / "s")
    code = (f"import os, walstore\n"
            f"s = walstore.open({path!r})\n"
            f"p = s.transaction(); p.put('held', 1); p.prepare('g1')\n"
            f"tx = s.transaction(); tx.put('order', 1)\n"
            f"with tx.action('charge', args={{'amount': 40}}, compensate='refund') as a:\n"
            f"    a.result = {{'charge_id': 'ch_1'}}\n"
            f"os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=60)
    before = run_cli("verify", path)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "not shut down cleanly" in before.stdout
    assert "transaction g1:" in before.stdout and "charge" in before.stdout and "refund" in before.stdout
    assert "no damage found; 2 thing(s) need a decision" in before.stdout
    assert run_cli("recover", path).returncode == 1  # (nothing registered for 'refund')
    doc = run_cli("verify", path, "--json")
    assert doc.returncode == 1
    rep = json.loads(doc.stdout)
    assert rep["errors"] == [] and rep["ok"] is False and rep["settled"] is False
    assert rep["needs_recovery"] is False and rep["in_doubt"] == ["g1"]
    [owed] = rep["pending_compensations"]
    assert owed["name"] == "charge" and owed["compensate"] == "refund"
    assert owed["result"] == {"charge_id": "ch_1"}
    assert run_cli("resolve", path, owed["id"]).returncode == 0
    assert run_cli("verify", path).returncode == 1  # (g1 still in doubt)
    assert run_cli("rollback-prepared", path, "g1").returncode == 0
    after = run_cli("verify", path, "--json")
    assert after.returncode == 0, after.stdout
    rep = json.loads(after.stdout)
    assert rep["ok"] and rep["settled"] and not rep["in_doubt"]
    assert not rep["pending_compensations"]


def test_verify_beside_a_live_writer_does_not_call_its_open_action_owed(tmp_path):
    """A live writer's action whose transaction is still open is in flight, not owed:
    verify beside it stays ok."""
    path = str(tmp_path / "s")
    s = walstore.open(path)
    try:
        tx = s.transaction()
        with tx.action("charge", args={}, compensate="refund") as a:
            a.result = 1
        out = run_cli("verify", path, "--json")
        assert out.returncode == 0, out.stdout
        rep = json.loads(out.stdout)
        assert rep["ok"] and rep["pending_compensations"] == []
        assert rep["needs_recovery"] is False
        tx.commit()
    finally:
        s.close()


def test_stats_human_output_shows_nothing_as_a_dash_not_python(tmp_path):
    """`walstore stats` printed Python's ``None`` and ``[]`` (audit48): nothing is ``-``."""
    path = str(tmp_path / "s")
    store_with(path, {"a": 1})
    out = run_cli("stats", path)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines())
    assert lines["failure"].strip() == "-" and lines["background_errors"].strip() == "-"
    assert "None" not in out.stdout and "[]" not in out.stdout
    doc = json.loads(run_cli("stats", path, "--json").stdout)
    assert doc["failure"] is None and doc["background_errors"] == []
