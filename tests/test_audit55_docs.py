"""Audit 55 (README.md, docs/CLI.md, docs/GUIDE.md read as promises, each claim run):
executable checks of the claims no test covered yet.

- the README's code blocks run as written (the tour, the agent layer, reversible files),
  against this checkout, with only the outside world they name (``payments``, a project
  with a failing ``make test``) supplied;
- ``walstore.open``'s signature and defaults are what README and GUIDE write (they
  wrote ``**options``, where ``options=`` takes a ``walstore.Options`` and the tuning
  fields are ``**tuning``), and the option defaults GUIDE lists;
- the command synopsis in README and CLI.md is the same, and names exactly the verbs,
  arguments and flags the command line takes;
- every relative link in README.md and docs/*.md names a file (and heading) that exists
  (CLI.md said "see Retention" and "``dry_run=True`` above", neither of which is in CLI.md);
- the set-up commands: the extras README installs exist, and ``.ci/run`` runs the README's
  test command; README stays under 320 lines.
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

import walstore

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tour = python_blocks(README)[0]
    assert 'walstore.open("agent-state")' in tour
    exec(compile(tour, "README-tour", "exec"), {})
    assert capsys.readouterr().out == "10 [('orders/1', {'widgets': 4})]\n"
    # the store the tour made: 0700 directories, 0600 files, as README says
    for dirpath, dirnames, filenames in os.walk(tmp_path / "agent-state"):
        assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
        for name in filenames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o600, name


class Payments:
    """The payment API the README's agent-layer block calls (a ledger in memory)."""

    def __init__(self):
        self.ledger: dict[str, int] = {}

    def charge(self, amount, idempotency_key):
        self.ledger[idempotency_key] = amount
        return {"charge_id": "ch-" + idempotency_key}

    def refund(self, charge_id, idempotency_key):
        assert charge_id == "ch-" + idempotency_key
        del self.ledger[idempotency_key]


def test_readme_agent_layer_block_runs_as_written(tmp_path):
    block = python_blocks(README)[1]
    payments = Payments()
    with walstore.open(str(tmp_path / "s")) as store:
        env = {"store": store, "payments": payments}
        exec(compile(block, "README-agent-layer", "exec"), env)
        # the charge was made, then the revert of its transaction refunded it, once
        assert payments.ledger == {}
        assert store.actions(pending=True) == []
        charge = store.log(limit=10)[-1].actions[0]
        assert charge["name"] == "charge" and charge["compensate"] == "refund"


@pytest.mark.skipif(shutil.which("make") is None, reason="the README's block runs make")
def test_readme_files_block_undoes_a_failed_make_test(tmp_path, monkeypatch):
    block = python_blocks(README)[2]
    repo = tmp_path / "repo"
    (repo / "config").mkdir(parents=True)
    (repo / "config" / "app.toml").write_text("replicas = 1\n")
    # `make test` writes a report, then fails
    (repo / "Makefile").write_text("test:\n\techo ran > report.txt\n\texit 3\n")
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    block = block.replace('"/srv/agent/repo"', repr(str(repo)))
    with walstore.open(str(tmp_path / "s")) as store:
        with pytest.raises(subprocess.CalledProcessError):     # "fails: all undone"
            exec(compile("import subprocess\n" + block, "README-files", "exec"),
                 {"store": store})
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before


def test_open_signature_is_the_documented_one():
    params = inspect.signature(walstore.open).parameters
    documented = {"durability": "full", "create": True, "readonly": False, "recover": "auto",
                  "compensators": None, "map_size": None, "progress": None, "options": None}
    for name, default in documented.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    assert params["tuning"].kind is inspect.Parameter.VAR_KEYWORD
    for text in (README, (ROOT / "docs" / "GUIDE.md").read_text()):
        assert "**options)" not in text
        assert "options=None" in text and "**tuning)`" in text


def test_option_defaults_are_the_guides():
    o = walstore.Options()
    assert (o.segment_size, o.sync_interval, o.checkpoint_bytes, o.apply_batch,
            o.apply_interval, o.max_unapplied, o.max_unapplied_bytes) == (
        16 << 20, 0.2, 64 << 20, 20_000, 0.1, 50_000, 64 << 20)
    assert o.recovery_mode == "strict"


def test_tuning_options_reach_the_store_and_unknown_ones_are_refused(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="normal", sync_interval=0.1) as s:
        assert s.stats()["durability"] == "normal"
    with pytest.raises(TypeError, match="unknown option"):
        walstore.open(str(tmp_path / "s"), bogus=1)


def synopsis(text: str) -> str:
    block = re.search(r"```\n(walstore init PATH .*?)```", text, re.S)
    assert block, "no command synopsis"
    return block.group(1)


def test_readme_and_cli_md_synopses_are_one_and_name_what_the_cli_takes():
    cli_md = (ROOT / "docs" / "CLI.md").read_text()
    assert synopsis(README) == synopsis(cli_md)
    text = synopsis(README)
    from walstore.cli import main
    assert isinstance(main, click.Group)
    # each "walstore VERB ..." of the synopsis, its continuation lines included
    usages: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        for m in re.finditer(r"walstore (--debug|[a-z-]+)((?:(?!walstore ).)*)", line):
            current = m.group(1)
            usages[current] = usages.get(current, "") + m.group(2)
        if "walstore " not in line and current:
            usages[current] += line
    assert set(usages) - {"--debug"} == set(main.commands)
    for verb, usage in usages.items():
        if verb == "--debug":
            continue
        cmd = main.commands[verb]
        flags = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts
                 if o.startswith("--")}
        written = set(re.findall(r"--[a-z][a-z-]*", usage))
        assert written == flags, (verb, written ^ flags)
        arguments = [p.name.upper() for p in cmd.params
                     if isinstance(p, click.Argument) and p.required]
        bare = [w for w in re.findall(r"(?<![-\w\[|])([A-Z][A-Z_]+)(?![\w\]])", usage.split("[")[0].split("--")[0])]
        assert bare == [a if a != "VALUE" else "JSON" for a in arguments], (verb, bare)
    assert "--debug" in {o for p in main.params for o in p.opts}


def heading_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, frag = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                bad.append((page.name, link))
            elif frag and target.suffix == ".md":
                slugs = {heading_slug(h) for h in
                         re.findall(r"^#+\s+(.*)$", target.read_text(), re.M)}
                if frag not in slugs:
                    bad.append((page.name, link))
    assert bad == []
    cli_md = (ROOT / "docs" / "CLI.md").read_text()
    assert "see Retention;" not in cli_md and "`dry_run=True` above" not in cli_md


def test_setup_commands_name_what_exists():
    lines = re.search(r"```sh\n(.*?)```", README, re.S).group(1).splitlines()
    assert lines[0] == "python -m pip install . && walstore demo"
    install, test = lines[1].split(" && ")
    extras = re.search(r'"\.\[(.*)\]"', install).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{re.escape(extra)} = \[", pyproject, re.M), extra
    assert 'walstore = "walstore.cli:main"' in pyproject
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert f'python -m pip install --quiet ".[{",".join(extras)}]"' in ci
    assert test in ci
    assert len(README.splitlines()) < 320


def test_files_the_readme_names_exist():
    named = set(re.findall(r"`((?:tests|tools|bench|walstore|\.ci|examples)/[\w./-]*\w)`", README))
    named |= set(re.findall(r"\]\(((?:tests|tools|bench|examples)/[\w./-]*)\)", README))
    assert "tests/test_exit.py" in named and "tools/agentmodel.py" in named
    assert [p for p in sorted(named) if not (ROOT / p).exists()] == []
    # "The rows of record (PROFILE.md, HISTORY.md)": they live in bench/results/
    assert "(PROFILE.md, HISTORY.md)" not in README
    for name in ("PROFILE.md", "HISTORY.md"):
        assert (ROOT / "bench" / "results" / name).exists()
    # the "How it works" tree: every module and package it names is there
    tree = re.search(r"```\nwalstore/\n(.*?)```", README, re.S).group(1)
    for line in tree.splitlines():
        m = re.match(r"  (\w+(?:\.py|/))\s", line)
        if m:
            assert (ROOT / "walstore" / m.group(1).rstrip("/")).exists(), m.group(1)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_what_get_prints_pastes_back_with_put_tagged(tmp_path):
    """CLI.md: "`put --tagged` reads them back (what `get` printed pastes back as the same
    value: bytes, NaN, int-keyed maps, a negative number)"; a str-keyed map that looks
    like a tag is written in the `map` form."""
    import math
    path = str(tmp_path / "s")
    value = {"b": b"\x00\xff", "n": float("nan"), "i": float("-inf"),
             "m": {1: "one", b"k": 2}, "tag": {"base64": "x"}, "f": {"float": "nan"},
             "l": [1, -5, 2.5, None, True], "big": 2**64 - 1, "neg": -2**63}
    with walstore.open(path) as s:
        s.run(lambda tx: tx.put("v", value))
    printed = cli("get", path, "v")
    assert printed.returncode == 0, printed.stderr
    assert '"tag": {"map": [["base64", "x"]]}' in printed.stdout
    assert '"f": {"map": [["float", "nan"]]}' in printed.stdout
    pasted = cli("put", path, "w", printed.stdout.strip(), "--tagged")
    assert pasted.returncode == 0, pasted.stderr
    assert cli("put", path, "neg", "-5").returncode == 0
    with walstore.open(path, readonly=True) as s:
        back = s.get("w")
        assert math.isnan(back.pop("n"))
        assert back == {k: v for k, v in value.items() if k != "n"}
        assert s.get("neg") == -5


def test_log_shows_the_newest_20_by_default_and_says_there_are_more(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        for i in range(23):
            s.run(lambda tx: tx.put(f"k{i:02}", i))
    shown = cli("log", path)
    assert shown.returncode == 0
    rows = shown.stdout.splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == list(range(23, 3, -1))
    assert "the newest 20 shown" in shown.stderr
    doc = cli("log", path, "--json")
    import json
    parsed = json.loads(doc.stdout)
    assert len(parsed["transactions"]) == 20 and parsed["more"] is True


def test_open_makes_directories_0700_and_refuses_what_cannot_be_a_store(tmp_path):
    """GUIDE, "Opening a store": an empty directory given is made 0700; missing parents
    are created 0700; a file in the way, or no store with create=False or readonly=True,
    is NotAStore; map_size is 64 KiB to 64 TiB (ValueError)."""
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    os.chmod(empty, 0o755)
    walstore.open(str(empty)).close()
    assert os.stat(empty).st_mode & 0o777 == 0o700
    walstore.open(str(tmp_path / "p" / "q" / "r")).close()
    for part in ("p", "p/q", "p/q/r"):
        assert os.stat(tmp_path / part).st_mode & 0o777 == 0o700, part
    (tmp_path / "afile").write_text("")
    for path, kw in ((tmp_path / "afile", {}), (tmp_path / "none1", {"create": False}),
                     (tmp_path / "none2", {"readonly": True})):
        with pytest.raises(walstore.NotAStore):
            walstore.open(str(path), **kw)
        assert path.name == "afile" or not path.exists()
    for size in (64 * 1024 - 1, 64 * 2**40 + 1):
        with pytest.raises(ValueError, match="map_size"):
            walstore.open(str(tmp_path / "m"), map_size=size)
    with walstore.open(str(tmp_path / "m"), map_size=64 * 1024) as s:
        assert s.stats()["lmdb_map_size"] == 64 * 1024
    with walstore.open(str(tmp_path / "d")) as s:       # "reserves 64 GiB" without map_size
        assert s.stats()["lmdb_map_size"] == 64 * 2**30


def test_a_transaction_prepared_before_a_crash_is_in_doubt_exit_1_then_decided(tmp_path):
    """README: 2PC "in doubt across crashes"; CLI.md: exit 1 for in-doubt transactions,
    `commit-prepared PATH GID` decides one."""
    path = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import os, sys, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "tx = s.transaction(); tx.put('x', 1); tx.prepare('g1')\n"
            "os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code, path], env=env,
                          timeout=120).returncode == 9
    listed = cli("prepared", path)
    assert listed.returncode == 1 and "g1" in listed.stdout
    decided = cli("commit-prepared", path, "g1")
    assert decided.returncode == 0, decided.stderr
    assert cli("get", path, "x").stdout.strip() == "1"
    assert cli("prepared", path).returncode == 0


def test_a_key_named_in_an_error_pastes_back(tmp_path):
    """CLI.md: keys are shown so "any key shown can be pasted back"; `get` and `delete`
    of an absent key named it by the repr of its shown form, which doubled the
    backslashes of a json:"..." key (`key 'json:"x\\\\ny"' not found`): pasted back, that
    names another key."""
    path = str(tmp_path / "s")
    assert cli("init", path).returncode == 0
    for verb in ("get", "delete"):
        r = cli(verb, path, "x\ny")
        assert r.returncode == 1
        shown = re.fullmatch(r"walstore: key '(.*)' not found\n", r.stderr).group(1)
        assert shown == 'json:"x\\ny"'
        assert cli("put", path, shown, "7").returncode == 0
        with walstore.open(path, readonly=True) as s:
            assert s.get("x\ny") == 7
        assert cli("delete", path, shown).returncode == 0


def test_errors_are_one_line_and_clicks_usage_errors_are_as_cli_md_says(tmp_path):
    r = cli("get", str(tmp_path / "nothing"), "k")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("walstore: ")
    assert "Traceback" not in r.stderr
    r = cli("get")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: ") and lines[-1] == "Error: Missing argument 'PATH'."
    assert "usage line, a hint and `Error: ...`" in (ROOT / "docs" / "CLI.md").read_text()


def test_sections_named_in_quotes_exist_in_the_same_page():
    """`see "X"` and `"X" below` name a heading (or a bold lead-in) of the page they are
    in (GUIDE said "Recovery" below, and RECOVERY.md see "Two-phase commit": neither page
    has such a section; both now link the page that does)."""
    bad = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        named = re.findall(r'see "([A-Z][^"]*)"', text)
        named += re.findall(r'"([A-Z][A-Za-z ,-]*)"\s+(?:below|above)', text)
        for section in named:
            section = " ".join(section.split())      # (a name may wrap across lines)
            if not re.search(rf"^(#+ .*|\*\*){re.escape(section)}", text, re.M):
                bad.append((page.name, section))
    assert bad == []


def test_points_of_the_wrong_type_and_empty_names_raise_what_guide_says(tmp_path):
    """GUIDE, "Points are strict": another type's UnknownPoint is also a TypeError
    (PointTypeError); an empty restore point name, purge prefix or scope= is an
    EmptyArgumentError (ValueError and TypeError); revert of an LSN is a PointTypeError
    (GUIDE said "that error", the EmptyArgumentError it had just named)."""
    from walstore.errors import EmptyArgumentError, PointTypeError
    with walstore.open(str(tmp_path / "s")) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        assert isinstance(tx.lsn + 1, walstore.LSN) and type(tx.lsn - tx.lsn) is int
        for point in (1.0, True, None, b"x"):
            with pytest.raises(PointTypeError) as e:
                s.at(point)
            assert isinstance(e.value, TypeError) and isinstance(e.value, walstore.UnknownPoint)
        for call in (lambda: s.restore_point(""), lambda: s.purge(""),
                     lambda: s.rewind(1, scope="")):
            with pytest.raises(EmptyArgumentError) as e:
                call()
            assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)
        with pytest.raises(PointTypeError):
            s.revert(tx.lsn)
        assert s.get("a") == 1
    assert "raises `PointTypeError` too" in (ROOT / "docs" / "GUIDE.md").read_text()


def test_open_progress_reaches_the_whole_log(tmp_path):
    """GUIDE: `progress(done, total)` is called as an unclean store's recovery reads its
    log (bytes). It was called at each segment's end with the bytes of the segments
    before it: one segment's log reported (0, total) and nothing more, and a longer one
    never reached its total."""
    path = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import os, sys, walstore\n"
            "s = walstore.open(sys.argv[1], segment_size=1 << 20)\n"
            "for i in range(60):\n"
            "    s.run(lambda tx: tx.put(f'k{i}', b'v' * 50_000))\n"
            "os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code, path], env=env,
                          timeout=120).returncode == 9
    assert len(os.listdir(os.path.join(path, "wal"))) > 2
    calls = []
    with walstore.open(path, progress=lambda done, total: calls.append((done, total))) as s:
        assert s.get("k59") == b"v" * 50_000
    assert len(calls) > 1
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert all(d <= t for d, t in calls)
    assert calls[-1][0] == calls[-1][1] > 0


def test_backup_and_restore_into_a_dest_that_is_not_empty_are_both_usage_errors(tmp_path):
    """CLI.md: exit 2 for a usage error such as "an `init` PATH that is ... a directory
    that is not empty"; `backup` into a DEST that is not empty exited 2, `restore` into
    one exited 1, as if the replica had a problem. Both are 2 now, DEST left alone (the
    loser of two restores racing for one empty DEST stays exit 1:
    tests/test_replication_follow.py)."""
    src = str(tmp_path / "src")
    url = f"file://{tmp_path}/replica"
    with walstore.open(src, replicate_to=url) as s:
        s.run(lambda tx: tx.put("a", 1))
        s.sync_replica()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    for args in (("backup", src, str(taken)), ("restore", url, str(taken))):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().endswith("exists and is not empty"), r.stderr
        assert os.listdir(taken) == ["mine.txt"]
    assert "DEST that exists and is not empty" in (ROOT / "docs" / "CLI.md").read_text()
