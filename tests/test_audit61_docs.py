"""Audit 61: the documentation run as written (README.md, docs/*.md).

Every fenced ``python`` block of README.md and docs/*.md is run by a test, here or in
``tests/test_audit55_docs.py`` (README's three), with only the outside world the text
around it names supplied (a payments API, a project whose ``make test`` fails, a store
``path``, an S3 server: moto's, reached through the standard ``AWS_ENDPOINT_URL`` the
docs promise every client honours); the attribute names a block's comments list
(``# .shipped_lsn, .lag_seconds, ...``) are checked on the objects it returns; and
REPLICATION.md's walkthrough (``$ walstore replicas ...``, ``restore``) is run against a
replica the blocks made, each line it shows matched against the real output.  A new
python block in any of these pages fails ``test_every_python_block_is_run`` until a
test runs it (or lists it here as not runnable, saying why): the docs cannot drift from
the code unseen.

Findings (each test here failed before its fix):

- docs/FILES.md's "In the store" block called ``f.delete(p)``, ``f.rename(a, b)``,
  ``f.mkdir(p, ...)``, ``f.symlink(p, target)``, ``f.chmod(p, m)`` and
  ``store.at(point)`` with names it never set: copied, it stopped at a ``NameError``, and
  with any values given, at ``f.chmod`` (``ValueError``: a symlink has no mode of its
  own); it now names real paths and makes its own point, and runs to its end;
- ``store.options`` (public, undocumented) was the running store's own ``Options``, read
  live by the applier and never validated again, where GUIDE promises that changing the
  options after open does not reach the running store: ``store.options.apply_batch = 0``
  left every commit unapplied until, at ``max_unapplied``, committers waited for ever (a
  300-commit loop with ``max_unapplied=100`` hung: killed by ``timeout 20``), and
  ``apply_interval = "x"`` killed the applier thread with a traceback, nothing reported;
  it is now a copy (GUIDE says so);
- README promises every edge of the Python API is in GUIDE, but ``store.get_action``,
  ``store.refresh``, ``store.closed``, ``store.compensators`` and
  ``walstore.HistoricalView`` were in no page;
- RECOVERY.md: a directory named ``spare.tmp`` in ``wal/`` "refuses every open", but a
  read-only open of a cleanly closed store reads it as usual (it removes no temp file);
  the page now names the opens it refuses;
- examples/langgraph_agent.py printed its dry-run plan as one 4,700-character JSON line
  of Python byte reprs; it now says what the plan undoes and which compensations run;
- an ``Action`` read back (``actions()``, ``get_action``, ``log()``'s actions, the one a
  revert's compensator is given) shared its ``args``/``result`` dicts with the unapplied
  events in memory, and the intent's and result's events shared them with the
  transaction's own ``Action``: changed in place (a dashboard reformatting a listing, a
  compensator), every later read, the compensation's arguments and the row LMDB got
  changed with them, the WAL saying otherwise; they are now copies;
- ``restore --to NAME`` of a name a whole replica (history from LSN 0) never saw said the
  point "was dropped by the replica's retention, or was made before replication to it
  began", neither of which can be; that note is now given only past LSN 0;
- the COMMIT's row of an action was made of the very ``act.args``/``act.result`` the
  caller holds: ``act.result`` changed after the commit reached the row LMDB applied
  (after a reopen too), and ``act.args`` changed in the body reached the COMMIT, where
  GUIDE says both are fixed (at entry, at the body's end); the row is now made of
  walstore's own recorded copies, taken at entry and at the body's end;
- ``WalstoreSaver("state.db")`` (or ``None``) raised a bare ``AttributeError``, where
  WalstoreStore and WalstoreSession say to pass ``walstore.open(path)`` (TypeError);
  so did ``walstore.atomic(a, "path")`` (after ``a``'s transaction began) and
  ``walstore.resolve_atomic("path")``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import walstore

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MIB = 1 << 20


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def block(page: str, first_line_start: str) -> str:
    found = [b for b in python_blocks(ROOT / page) if b.startswith(first_line_start)]
    assert len(found) == 1, (page, first_line_start, len(found))
    return found[0]


def commented_names(text: str, line_start: str) -> list[str]:
    """The ``.name`` attributes a block's comment lists on the line beginning
    ``line_start`` (``# .shipped_lsn, .lag_seconds`` -> those names)."""
    line = next(ln for ln in text.splitlines() if ln.startswith(line_start))
    return re.findall(r"\.([a-z_]+)", line.split("#", 1)[1])


# (page, how the block begins) -> the test that runs it
RUN_BY = {
    ("README.md", "import walstore"): "test_audit55_docs.py::test_readme_tour_runs_as_written",
    ("README.md", '@store.compensator("refund")'):
        "test_audit55_docs.py::test_readme_agent_layer_block_runs_as_written",
    ("README.md", 'ws = store.workspace("/srv/agent/repo"'):
        "test_audit55_docs.py::test_readme_files_block_undoes_a_failed_make_test",
    ("GUIDE.md", '@store.compensator("refund")'): "test_guide_agent_layer_block",
    ("GUIDE.md", 'ws = store.workspace("/srv/agent/repo"'): "test_guide_files_block",
    ("GUIDE.md", "store = walstore.open(path, replicate_to="):
        "test_replication_blocks_and_walkthrough",
    ("REPLICATION.md", "store = walstore.open(path, replicate_to="):
        "test_replication_blocks_and_walkthrough",
    ("REPLICATION.md", "walstore.restore(url, dest, to=None"): "test_restore_signature_block",
    ("FILES.md", 'ws = store.workspace("/srv/agent/repo"'): "test_files_md_block",
}


def test_every_python_block_is_run():
    seen = set()
    for page in PAGES:
        for text in python_blocks(page):
            key = next(((p, s) for (p, s) in RUN_BY if p == page.name and text.startswith(s)),
                       None)
            assert key is not None, (
                f"{page.name}: a python block no test runs; run it in {Path(__file__).name}"
                f" and name it in RUN_BY:\n{text}")
            seen.add(key)
            runner = RUN_BY[key]
            file, _, name = runner.rpartition("::")
            source = (ROOT / "tests" / (file or Path(__file__).name)).read_text()
            assert f"def {name}(" in source, runner
    assert seen == set(RUN_BY), set(RUN_BY) - seen


class Payments:
    """The payment API the agent-layer blocks call (charges kept in memory)."""

    def __init__(self) -> None:
        self.charges: dict[str, int] = {}
        self.refunded: list[str] = []

    def charge(self, amount: int, idempotency_key: str) -> dict:
        self.charges[idempotency_key] = amount
        return {"charge_id": "ch-" + idempotency_key}

    def refund(self, charge_id: str, idempotency_key: str) -> None:
        assert charge_id == "ch-" + idempotency_key
        self.refunded.append(idempotency_key)


def test_guide_agent_layer_block(tmp_path):
    text = block("docs/GUIDE.md", '@store.compensator("refund")')
    payments = Payments()
    seen = []
    with walstore.open(str(tmp_path / "s")) as store:
        env = {"store": store, "payments": payments}
        exec(compile(text, "GUIDE-agent-layer", "exec"), env)
        act_key = env["act"].key
        assert payments.charges == {act_key: 40}
        # "# action.args, .result, .key, .id, .state": what the compensator is given
        names = commented_names(text, "def refund(action):")
        assert set(names) >= {"args", "result", "key", "id", "state"}, names
        refund = env["refund"]

        @store.compensator("refund")
        def refund_and_look(action):
            seen.append({n: getattr(action, n) for n in names})
            refund(action)

        store.revert(env["tx"].id)
    assert payments.refunded == [act_key]
    assert seen[0]["args"] == {"amount": 40} and seen[0]["key"] == act_key
    assert seen[0]["result"] == {"charge_id": "ch-" + act_key}


@pytest.mark.skipif(shutil.which("make") is None, reason="the block runs make")
def test_guide_files_block(tmp_path):
    text = block("docs/GUIDE.md", 'ws = store.workspace("/srv/agent/repo"')
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "old.py").write_text("def old(): ...\n")
    (repo / "notes.txt").write_text("notes\n")
    (repo / "Makefile").write_text("test:\n\techo ran > report.txt\n\texit 2\n")
    tree = lambda: {str(p.relative_to(repo)): (p.is_dir() or p.read_bytes())  # noqa: E731
                    for p in sorted(repo.rglob("*"))}
    before = tree()
    deployed: list[int] = []
    text = text.replace('"/srv/agent/repo"', repr(str(repo)))
    body, last = text.rstrip("\n").rsplit("\n", 1)
    assert last.startswith('store.at("before-refactor")')
    with walstore.open(str(tmp_path / "s")) as store:
        store.compensator("undeploy")(lambda action: deployed.remove(action.args["build"]))
        store.restore_point("before-refactor")
        env = {"store": store, "subprocess": subprocess, "deploy": deployed.append}
        with pytest.raises(RuntimeError, match="tests failed"):
            exec(compile(body, "GUIDE-files", "exec"), env)
        # "files, keys and the deploy roll back"
        assert deployed == []
        assert tree() == before
        assert eval(compile(last, "GUIDE-files-last", "eval"), env) == b"def old(): ...\n"


def test_files_md_block(tmp_path):
    text = block("docs/FILES.md", 'ws = store.workspace("/srv/agent/repo"')
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("notes\n")
    (repo / "a.txt").write_text("a\n")
    (repo / "Makefile").write_text("test:\n\tmkdir -p build && echo ok > build/out\n"
                                   "\techo ran > test.log\n\techo done > made.txt\n")
    text = text.replace('"/srv/agent/repo"', repr(str(repo)))
    with walstore.open(str(tmp_path / "s")) as store:
        env = {"store": store, "subprocess": subprocess}
        exec(compile(text, "FILES-in-the-store", "exec"), env)
        assert sorted(p.name for p in repo.iterdir()) == [
            "Makefile", "b.txt", "build", "latest", "made.txt", "src", "test.log"]
        assert os.readlink(repo / "latest") == "b.txt"
        assert (repo / "b.txt").stat().st_mode & 0o777 == 0o600
        # "w.changes after the block": the watched make's change, its ignored ones not
        assert [c.path for c in env["w"].changes] == [b"made.txt"]
        view = store.at(env["point"]).files(env["ws"])
        assert view.read("notes.txt") == b"notes\n"
        # "# .entry(p), .exists(p), .stream(p) (1 MiB chunks)"
        names = commented_names(text, 'store.at(point).files(ws).read("notes.txt")')
        assert names == ["entry", "exists", "stream"]
        assert view.entry("notes.txt").kind == "file" and view.exists("a.txt")
        assert not view.exists("b.txt")
        with store.transaction() as tx:
            tx.files(env["ws"]).write("big.bin", os.urandom(2 * MIB + 5))
        now = store.at(store.restore_point("after-big")).files(env["ws"])
        assert [len(c) for c in now.stream("big.bin")] == [MIB, MIB, 5]
        assert store.workspaces() == [env["ws"]] and store.file_conflicts() == []


def test_restore_signature_block(tmp_path):
    """REPLICATION.md, "Restore": ``walstore.restore(url, dest, to=None,
    replicate_options=None)   # returns a summary dict``."""
    import inspect
    text = block("docs/REPLICATION.md", "walstore.restore(url, dest, to=None")
    call = text.split("#")[0].strip()
    params = inspect.signature(walstore.restore).parameters
    for name, default in re.findall(r"(\w+)=(\w+)", call):
        assert repr(params[name].default) == default, name
    with walstore.open(str(tmp_path / "s"), replicate_to=f"file://{tmp_path}/rep") as store:
        with store.transaction() as tx:
            tx.put("k", 1)
        store.sync_replica(timeout=30)
    env = {"walstore": walstore, "url": f"file://{tmp_path}/rep", "dest": str(tmp_path / "d")}
    summary = eval(compile(call, "REPLICATION-restore", "eval"), env)
    assert isinstance(summary, dict) and summary["dest"] == str(tmp_path / "d")
    with walstore.open(str(tmp_path / "d")) as restored:
        assert restored.get("k") == 1


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server, reached as the docs' blocks reach S3: through the standard
    ``AWS_ENDPOINT_URL`` (the blocks name no endpoint)."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "AKIADOCSTEST0000001", "AWS_SECRET_ACCESS_KEY": "docs/secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3
    bucket = "docs-" + uuid.uuid4().hex[:12]
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield bucket
    server.stop()


def walstore_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WALSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "walstore", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def shown_line_pattern(line: str) -> str:
    """A regex for an output line a walkthrough shows: its figures, ids and times stand
    for any, ``...`` for anything, runs of spaces for any."""
    out = []
    for tok in re.split(r"(\s+|[0-9a-f]{4}\.\.\.|\.\.\.|\d+(?:\.\d+)?)", line.strip()):
        if not tok:
            continue
        if tok.isspace():
            out.append(r"\s+")
        elif tok.endswith("...") and len(tok) > 3:
            out.append(r"[0-9a-f]+")
        elif tok == "...":
            out.append(r".*")
        elif re.fullmatch(r"\d+(?:\.\d+)?", tok):
            out.append(r"\d+(?:\.\d+)?")
        else:
            out.append(re.escape(tok))
    return "".join(out)


def test_replication_blocks_and_walkthrough(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"s3://{s3}/agents/a1"
    for page, tag in (("docs/GUIDE.md", "g"), ("docs/REPLICATION.md", "r")):
        text = block(page, "store = walstore.open(path, replicate_to=")
        text = text.replace("s3://bucket/agents/a1", f"{url}-{tag}")
        text = text.replace('"/srv/agent-a1"', repr(str(tmp_path / f"srv-agent-a1-{tag}")))
        first, rest = text.split("\n", 1)
        env = {"walstore": walstore, "path": str(tmp_path / f"a1-{tag}")}
        exec(compile(first, page, "exec"), env)
        store = env["store"]
        try:
            # the state the restore's point names, and a commit after it
            with store.transaction() as tx:
                tx.put("agents/a1/plan", "v1")
            store.restore_point("before-deploy")
            with store.transaction() as tx:
                tx.put("agents/a1/plan", "v2 (the bad deploy)")
            exec(compile(rest, page, "exec"), env)
            # "# .shipped_lsn, .lag_seconds, .lag_bytes, .last_error[, .state]"
            status = store.replication()
            for name in commented_names(text, "store.replication()"):
                assert hasattr(status, name), (page, name)
            assert status.last_error is None and status.lag_bytes == 0
        finally:
            store.close()
        with walstore.open(str(tmp_path / f"srv-agent-a1-{tag}")) as restored:
            assert restored.get("agents/a1/plan") == "v1"

    # REPLICATION.md's walkthrough, as written, against the replica the block made
    doc = (ROOT / "docs" / "REPLICATION.md").read_text()
    walk = re.search(r"```\n(\$ walstore replicas s3://bucket/agents/a1\n.*?)```", doc, re.S)
    assert walk, "the walkthrough is gone"
    steps: list[tuple[str, list[str]]] = []
    for line in walk.group(1).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:].split("#")[0].strip(), []))
        else:
            steps[-1][1].append(line)
    assert [cmd.split()[1] for cmd, _ in steps] == ["replicas", "restore", "replicas"]
    for cmd, shown in steps:
        argv = cmd.replace("s3://bucket/agents/a1", f"{url}-r").replace(
            "/srv/a1", str(tmp_path / "a1-restored")).split()[1:]
        r = walstore_cli(*argv, cwd=tmp_path)
        assert r.returncode == 0, (cmd, r.stderr)
        out = r.stdout.splitlines()
        for doc_line in shown:
            want = shown_line_pattern(doc_line.replace("s3://bucket/agents/a1", f"{url}-r")
                                      .replace("/srv/a1", str(tmp_path / "a1-restored")))
            assert any(re.match(r"\s*" + want, o) for o in out), (cmd, doc_line, r.stdout)
        if "--verify" in argv:
            assert all(o.endswith(": ok") for o in out if o.startswith("verify")), r.stdout
    with walstore.open(str(tmp_path / "a1-restored")) as restored:
        assert restored.get("agents/a1/plan") == "v1"


def test_store_options_is_a_copy_changing_it_never_reaches_the_running_store(tmp_path):
    """GUIDE, "Opening a store": changing the options after open does not reach the
    running store.  ``store.options`` was the running store's own object, read live by
    the applier and never validated again: ``apply_batch = 0`` left every commit
    unapplied, and at ``max_unapplied`` committers waited for ever (a child process, so a
    hang fails the test instead of the suite)."""
    code = (
        "import sys, walstore\n"
        "s = walstore.open(sys.argv[1], durability='none', max_unapplied=100)\n"
        "s.options.apply_batch = 0\n"
        "s.options.apply_interval = 'x'\n"
        "assert s.options.apply_batch == 20_000 and s.options.apply_interval == 0.1\n"
        "for i in range(300):\n"
        "    with s.transaction() as tx:\n"
        "        tx.put(f'k{i}', i)\n"
        "s.close()\n"
        "print('committed 300')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "committed 300\n", r.stderr
    assert "Traceback" not in r.stderr, r.stderr       # the applier thread lived
    with walstore.open(str(tmp_path / "s"), durability="normal", sync_interval=0.5) as s:
        assert s.get("k299") == 299
        copy = s.options
        assert isinstance(copy, walstore.Options) and copy.sync_interval == 0.5
        assert s.options is not copy                    # each read: a fresh copy


def test_every_public_name_of_store_and_walstore_is_in_the_docs():
    """README: "Every option, limit, error and edge of the Python API is in the user's
    guide" — ``store.get_action``, ``store.refresh``, ``store.closed``,
    ``store.compensators`` and ``walstore.HistoricalView`` were in no page (each public
    name of ``Store`` must appear as `` `name`` or ``.name``, each class ``walstore``
    exports as a word)."""
    from walstore.store import Store
    text = "".join(p.read_text() for p in PAGES)
    missing = [n for n in dir(Store)
               if not n.startswith("_") and not re.search(rf"[`.]{n}\b", text)]
    missing += [n for n in dir(walstore) if n[:1].isupper() and n not in ("Any", "Callable")
                and not re.search(rf"\b{n}\b", text)]
    assert missing == []


def test_get_action_refresh_and_closed_do_what_the_guide_says(tmp_path):
    with walstore.open(str(tmp_path / "s")) as store:
        with store.transaction() as tx:
            with tx.action("charge", args={"amount": 40}) as act:
                act.result = {"charge_id": "c1"}
        assert store.get_action(act.id) == store.actions()[0]
        with pytest.raises(walstore.UnknownAction) as ei:
            store.get_action("99.1")
        assert isinstance(ei.value, KeyError)
        with pytest.raises(walstore.UnknownAction) as ei:
            store.get_action(1.1)
        assert isinstance(ei.value, TypeError)
        reader = walstore.open(str(tmp_path / "s"), readonly=True)
        assert reader.get("k") is None
        with store.transaction() as tx:
            tx.put("k", 1)
        reader.refresh()
        assert reader.get("k") == 1
        reader.close()
        assert reader.closed and not store.closed
    assert store.closed


def test_a_directory_named_spare_tmp_refuses_the_opens_recovery_md_names(tmp_path):
    """RECOVERY.md said such a directory "refuses every open": a read-only open of a
    cleanly closed store read it as usual (it removes no temp file), and rightly so."""
    p = str(tmp_path / "s")
    with walstore.open(p) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    spare = tmp_path / "s" / "wal" / "spare.tmp"
    if spare.exists():
        spare.unlink()
    spare.mkdir()
    with walstore.open(p, readonly=True) as ro:
        assert ro.get("k") == 1
    with pytest.raises(walstore.CorruptionError, match="spare.tmp is a directory"):
        walstore.open(p)
    assert spare.is_dir()
    text = (ROOT / "docs" / "RECOVERY.md").read_text()
    assert "refuses every writable open" in text and "refuses every open" not in text


def test_the_langgraph_examples_dry_run_line_is_readable(tmp_path):
    """examples/langgraph_agent.py printed its dry-run plan as ``json.dumps(...,
    default=str)``: one 4,700-character line, 36 of its keys Python reprs of bytes
    (``"b'lg\\\\x00\\\\xa6trip-1b...'"``); it now says what the plan holds and which
    compensations would run, newest first, as its docstring tells."""
    pytest.importorskip("langgraph")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "langgraph_agent.py"),
                        "--dir", str(tmp_path / "w")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "dry run, nothing changed yet" in ln)
    assert len(line) < 300 and "\\x" not in line, line
    assert line.endswith("compensations that would run, newest first: "
                         "cancel_hotel H-003 (Oslo), cancel_hotel H-002 (Rome)"), line


def test_an_action_read_back_is_the_callers_own_copy(tmp_path):
    """GUIDE: an action's args are fixed when ``tx.action()`` is entered and its result
    when the body ends.  The ``Action`` objects ``actions()``, ``get_action`` and
    ``log()`` gave (and compensators were given at a revert) shared their ``args`` and
    ``result`` dicts with the unapplied events in memory: a dashboard reformatting
    ``a.args["amount"] = "40 EUR"`` in place changed what every later read showed, what
    the refund was given (``charge_id`` "shown", not the charge's), and the row LMDB got
    from the event (still so after a reopen), the WAL saying otherwise."""
    p = str(tmp_path / "s")
    got = []
    with walstore.open(p) as store:
        store.compensator("refund")(lambda a: got.append((a.args, a.result)))
        with store.transaction() as tx:
            with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
                act.result = {"charge_id": "c1"}
        for a in store.actions():
            a.args["amount"] = "40 EUR"
            a.result["charge_id"] = "shown"
        store.get_action(act.id).args["amount"] = 0
        store.log()[0].actions[0]["args"]["amount"] = -1
        assert store.actions()[0].args == {"amount": 40}
        assert store.log()[0].actions[0]["result"] == {"charge_id": "c1"}
        store.revert(tx.id)
    assert got == [({"amount": 40}, {"charge_id": "c1"})]
    with walstore.open(p) as store:
        assert (store.actions()[0].args, store.actions()[0].result) == (
            {"amount": 40}, {"charge_id": "c1"})


def test_a_compensator_changing_its_action_changes_nothing_recorded(tmp_path):
    """A compensator given the transaction's own Action at a rollback, changing
    ``action.args`` in place, changed the intent's event in memory, so the row the
    applier wrote said ``{"amount": "refunded"}`` while the WAL's ACTION_INTENT said
    ``{"amount": 42}`` (LMDB no longer a function of the log; a reopen showed the
    former)."""
    p = str(tmp_path / "s")
    with walstore.open(p) as store:
        @store.compensator("refund")
        def refund(action):
            action.args["amount"] = "refunded"
            action.result["charge_id"] = None
        with pytest.raises(RuntimeError):
            with store.transaction() as tx:
                with tx.action("charge", args={"amount": 42}, compensate="refund") as act:
                    act.result = {"charge_id": "c3"}
                raise RuntimeError("the plan failed")
        assert store.actions()[0].args == {"amount": 42}
        assert store.actions()[0].result == {"charge_id": "c3"}
        assert store.actions()[0].state == "compensated"
    with walstore.open(p) as store:
        assert store.actions()[0].args == {"amount": 42}
        assert store.actions()[0].result == {"charge_id": "c3"}
    r = walstore_cli("dump", p, "--json", cwd=tmp_path)
    import json
    intents = [rec["payload"]["args"] for rec in json.loads(r.stdout)["records"]
               if rec["type"] == "ACTION_INTENT"]
    assert intents == [{"amount": 42}]


def test_a_name_a_whole_replica_never_saw_is_not_blamed_on_retention(tmp_path):
    """REPLICATION.md: a point from before the replica's oldest snapshot is refused saying
    where its history begins and that retention drops such points; "a name the replica
    never saw is UnknownRestorePoint".  A replica holding its store's whole history (it
    begins at LSN 0) said of a name never made that it "was dropped by the replica's
    retention, or was made before replication to it began"."""
    url = f"file://{tmp_path}/rep"
    with walstore.open(str(tmp_path / "s"), replicate_to=url) as store:
        with store.transaction() as tx:
            tx.put("k", 1)
        store.restore_point("before-deploy")
        store.sync_replica(timeout=30)
    with pytest.raises(walstore.UnknownRestorePoint) as ei:
        walstore.restore(url, str(tmp_path / "d"), to="nope")
    msg = str(ei.value)
    assert "no restore point named 'nope' in the replica (known: before-deploy)" in msg
    assert "retention" not in msg and "history begins" not in msg, msg
    r = walstore_cli("restore", url, str(tmp_path / "d"), "--to", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "retention" not in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


def test_act_changed_after_its_body_changes_nothing_recorded(tmp_path):
    """GUIDE: an action's args are fixed when ``tx.action()`` is entered and its result
    when the body ends.  The COMMIT's row was made of the very ``act.args`` and
    ``act.result`` objects the caller holds, and the MemTable kept it until the applier
    wrote LMDB from it: ``act.result["charge_id"] = ...`` after the commit reached the
    row (still so after a reopen; the WAL's COMMIT said ``c1``), and ``act.args`` changed
    inside the body reached the COMMIT (its ACTION_INTENT said otherwise)."""
    p = str(tmp_path / "s")
    with walstore.open(p) as store:
        with store.transaction() as tx:
            with tx.action("charge", args={"amount": 40}) as act:
                act.args["changed_in_the_body"] = True
                act.result = {"charge_id": "c1"}
        act.result["charge_id"] = "changed after the commit"
        act.args["amount"] = 0
        assert store.actions()[0].args == {"amount": 40}
        assert store.actions()[0].result == {"charge_id": "c1"}
        assert store.log()[0].actions[0]["args"] == {"amount": 40}
    with walstore.open(p) as store:
        assert (store.actions()[0].args, store.actions()[0].result) == (
            {"amount": 40}, {"charge_id": "c1"})


def test_the_langgraph_saver_given_a_path_says_what_to_pass():
    """GUIDE: a path or None given where a ``walstore.Store`` belongs is a TypeError
    saying to pass ``walstore.open(path)`` (WalstoreSession, WalstoreStore);
    ``WalstoreSaver("state.db")`` raised a bare AttributeError ("'str' object has no
    attribute 'scan'"), an error type the API promises never escapes."""
    pytest.importorskip("langgraph")
    from walstore.integrations.langgraph import WalstoreSaver
    with pytest.raises(TypeError, match=r"pass walstore\.open\(path\), not the path"):
        WalstoreSaver("state.db")
    with pytest.raises(TypeError, match="needs a walstore.Store"):
        WalstoreSaver(None)


def test_atomic_and_resolve_atomic_given_a_path_say_so_before_anything_begins(tmp_path):
    """``walstore.atomic(a, "b")`` raised a bare AttributeError ("'str' object has no
    attribute 'transaction'"), after ``a``'s transaction had begun; ``resolve_atomic``
    likewise ("... no attribute 'store_id'"): the API promises only walstore errors, or
    a TypeError/ValueError naming a bad argument."""
    with walstore.open(str(tmp_path / "a")) as a:
        with pytest.raises(TypeError, match=r"argument 2 is str \(pass walstore\.open"):
            with walstore.atomic(a, str(tmp_path / "b")):
                pass
        with pytest.raises(TypeError, match="argument 2 is NoneType"):
            with walstore.atomic(a, None):
                pass
        with pytest.raises(TypeError, match="argument 1 is str"):
            walstore.resolve_atomic("a")
        with a.transaction() as tx:             # nothing was left begun on ``a``
            tx.put("k", 1)
        assert a.get("k") == 1 and walstore.resolve_atomic(a) == {}
