"""Audit 53 (the documentation read as a demanding new user would, each claim run):
regressions of the code-side discrepancies found.

Each finding's tests failed before its fix (see the commit naming it; the guard that
human output keeps a handler's print on stdout passed before too):

- ``--json`` prints one strict JSON document on stdout (README, "Command line"; the
  contract's "one JSON document, for scripts"), but a ``--handlers`` module's compensator
  (or the module's import) that printed, as a logging refund does, wrote its text into
  stdout beside the document: ``recover --handlers M --json`` gave a script
  ``REFUND ...`` then the document, which no JSON parser reads;
- a value (or meta, or action args) of exactly 1,025 levels of lists packs but does not
  read back: ``put`` refused it with a ``TypeError`` saying "it would not read back ();
  dict keys must be str, bytes, ..." (a list of lists holds no dict), where one level more
  said "it nests too deeply", a ``ValueError`` (README: a bad value is refused at ``put``,
  naming the problem);
- README ("Command line", progress): "In the library: ... ``restore(..., progress=)``",
  but ``walstore.restore`` took no ``progress`` (a ``TypeError``): only the internal
  ``walstore.replication.restore`` did."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import walstore

from test_audit52_cli import env  # noqa: E402  (a CLI child: this checkout first)


def run(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=120, env=env(), cwd=cwd)


CRASH = textwrap.dedent("""
    import os, sys, walstore
    s = walstore.open(sys.argv[1])
    s.run(lambda tx: tx.put("a", 1))
    tx = s.transaction()
    tx.put("b", 2)
    with tx.action("charge", args={"n": 1}, compensate="refund") as act:
        act.result = {"charge_id": 7}
    os._exit(9)   # killed before the commit: the charge is owed a refund
""")

HANDLERS = textwrap.dedent("""
    print("handlers module imported")
    def refund(action):
        print("REFUND", action.id, action.result)
    COMPENSATORS = {"refund": refund}
""")


def crashed_store(tmp_path: Path) -> str:
    path = str(tmp_path / "s")
    r = subprocess.run([sys.executable, "-c", CRASH, path], env=env(), timeout=120)
    assert r.returncode == 9
    (tmp_path / "loud_handlers.py").write_text(HANDLERS)
    return path


def test_recover_json_with_printing_handlers_is_one_document(tmp_path):
    path = crashed_store(tmp_path)
    r = run("recover", path, "--handlers", str(tmp_path / "loud_handlers.py"), "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)  # the document alone: nothing else on stdout
    assert doc["compensated"] == ["2.1"]
    assert "REFUND 2.1" in r.stderr and "handlers module imported" in r.stderr


def test_revert_json_with_printing_handlers_is_one_document(tmp_path):
    path = str(tmp_path / "s")
    subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, walstore
        with walstore.open(sys.argv[1], compensators={"refund": lambda a: None}) as s:
            with s.transaction() as tx:
                tx.put("k", 1)
                with tx.action("charge", compensate="refund") as act:
                    act.result = {"charge_id": 7}
        """), path], check=True, env=env(), timeout=120)
    (tmp_path / "loud_handlers.py").write_text(HANDLERS)
    r = run("revert", path, "1", "--handlers", "loud_handlers", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout, r.stderr)
    json.loads(r.stdout)
    assert "REFUND 1.1" in r.stderr


def test_handlers_print_to_stdout_without_json(tmp_path):
    """Human output is unchanged: a handler's print stays on stdout there."""
    path = crashed_store(tmp_path)
    r = run("recover", path, "--handlers", str(tmp_path / "loud_handlers.py"))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "REFUND 2.1" in r.stdout


def nested(levels: int) -> list:
    v: list = []
    for _ in range(levels - 1):
        v = [v]
    return v


@pytest.mark.parametrize("levels", [1025, 1026, 3000])
def test_too_deep_a_value_is_named_as_such(tmp_path, levels):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        for what, call in [("value for key 'k'", lambda: tx.put("k", nested(levels))),
                           ("value for key 'd'", lambda: tx.put("d", {"a": nested(levels - 1)})),
                           ("transaction meta", lambda: s.transaction(meta=nested(levels))),
                           ("args of action 'a'",
                            lambda: tx.action("a", args=nested(levels)).__enter__())]:
            with pytest.raises(ValueError) as e:
                call()
            assert what in str(e.value) and "nests too deeply" in str(e.value), e.value
            assert "dict keys" not in str(e.value)
        tx.put("ok", nested(1024))  # (1,024 levels of lists: stored, and read back)
        tx.commit()
        v, depth = s.get("ok"), 0
        while v:  # (== recurses past Python's limit at this depth)
            v, depth = v[0], depth + 1
        assert v == [] and depth == 1023


def test_walstore_restore_takes_progress(tmp_path):
    src = str(tmp_path / "src")
    url = (tmp_path / "replica").as_uri()
    with walstore.open(src, durability="none", replicate_to=url) as s:
        s.run(lambda tx: tx.put("k", b"x" * 100_000))
        s.sync_replica(timeout=60)
    calls: list = []
    report = walstore.restore(url, str(tmp_path / "dest"),
                              progress=lambda done, total: calls.append((done, total)))
    assert report
    assert calls and all(0 <= d <= t for d, t in calls), calls
    with walstore.open(str(tmp_path / "dest")) as d:
        assert d.get("k") == b"x" * 100_000
