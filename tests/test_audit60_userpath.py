"""Audit 60: the path a new user walks (README.md, docs/*.md, examples/*.py, ``walstore
demo``, ``walstore --help``, the OpenAI Agents session), each claim run as written.

- ``walstore demo > /dev/full`` said "No space left on device (store PATH)": it blamed the
  store's disk for a failed write of its narration to stdout (every other verb says
  "writing its output to stdout failed"), and the store it named had been removed;
- ``walstore demo -- -x`` (a PATH beginning with ``-``) failed at its step 7, exit 1: its
  ``walstore recover PATH`` child read the path as an option; and the commands it prints
  last ("Inspect it yourself: walstore log PATH") did not paste back for a PATH with a
  space (two arguments) or a leading ``-`` (an option);
- the commands the error lines and the library suggest (`walstore recover PATH`, `walstore
  actions PATH --pending`, ...) wrote PATH as given: for a store "my store" the hint ran
  on two arguments;
- without the ``walstore[s3]`` extra (no boto3, as after ``pip install .``),
  ``walstore.open(p, replicate_to="s3://...")``, ``walstore.restore`` and the replica
  verbs raised a bare ``ModuleNotFoundError: No module named 'boto3'`` (the CLI: "an
  unexpected error"), and the open had created the store first;
- likewise ``WalstoreSession(...)`` without the Agents SDK and ``import
  walstore.integrations.transaction`` without the transaction package raised a bare
  ``No module named ...`` naming no extra (LangGraph's says ``pip install
  'walstore[langgraph]'``);
- ``walstore --help``, ``--version`` and every ``VERB --help`` into a full stdout
  (``> /dev/full``) printed a 36-line traceback, exit 1, and into a closed pipe exited 1
  (a verb's output: 0, quietly);
- ``WALSTORE_DEBUG=false`` (or ``no``, ``off``) turned the tracebacks on;
- an error whose line cannot be written (``2>/dev/full``) exited 1 whatever it was: a
  usage error (a path that is not a store, an unknown verb, a malformed key) is 2;
- ``walstore bench`` and ``walstore demo`` ended by SIGTERM (``timeout``, a cancelled CI
  job) died where they stood: the bench left its scratch store (20 MB of the row under
  way) in TMPDIR, the demo its store, ``PATH-demo-files`` and its worker process; they
  now clean up as on Ctrl-C, one line, exit 143;
- the examples: each given a path that is a file ended in a traceback
  (NotADirectoryError, FileExistsError); ``coding_agent_files.py`` ran again over a kept
  WORK_DIR (the other two refuse), and the command it printed last ("see also: walstore
  diff ... --from start") showed "no key changed / no file changed" (the revert had
  brought the state back to the start);
- ``WalstoreSession.rewind("nope")`` and ``drop_restore_point("nope")`` raised
  ``UnknownPoint: no restore point named 'oa/u1/nope'``: the store's internal name alone,
  never given by the caller (``restore_points()`` lists the session's points without it);
- ``walstore --help`` per verb: ``recover --help`` showed reStructuredText's double
  backquotes (````--rebuild-state````), ``restore`` and ``replicas`` listed ``--json``
  with no words (every other verb: "One JSON document on stdout."), ``restore --to``
  left out the bare TXID CLI.md names (and which it takes), ``--interval`` its default;
- docs/REPLICATION.md's synopsis of ``restore`` left out ``--interval`` and
  ``--apply-every`` (CLI.md and the command have them);
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import walstore

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd, stdout=subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WALSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "walstore", *args], cwd=cwd, env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_demo_into_a_full_stdout_says_stdout_failed_not_the_store(tmp_path):
    with open("/dev/full", "w") as full:
        r = cli("demo", "st", cwd=tmp_path, stdout=full)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "writing its output to stdout failed" in lines[0], lines[0]
    assert "No space left on device" in lines[0]
    assert "(store " not in lines[0]                  # the store's disk is not the problem
    assert "removed" in lines[0]                      # and says what became of the store
    assert not (tmp_path / "st").exists() and not (tmp_path / "st-demo-files").exists()


def example(name: str, *args: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name, args", [
    ("coding_agent_files.py", ("afile",)),
    ("openai_agent_retract.py", ("afile",)),
    ("langgraph_agent.py", ("--dir", "afile")),
])
def test_an_example_given_a_file_refuses_in_one_line(tmp_path, name, args):
    needs = {"openai_agent_retract.py": "agents", "langgraph_agent.py": "langgraph"}.get(name)
    if needs and not _importable(needs):
        pytest.skip(f"needs {needs}")
    (tmp_path / "afile").write_text("mine\n")
    r = example(name, *args, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_coding_agent_example_hint_shows_attempt_2_and_a_second_run_is_refused(tmp_path):
    r = example("coding_agent_files.py", "work", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hint = r.stdout.strip().splitlines()[-1]
    assert hint.lstrip().startswith("see also: walstore diff "), hint
    argv = hint.split("see also: walstore ", 1)[1].split("   (")[0].split()
    d = cli(*argv, cwd=tmp_path)
    assert d.returncode == 0, d.stderr
    assert "no key changed" not in d.stdout and "no file changed" not in d.stdout, d.stdout
    assert "coder/attempt" in d.stdout and "calc.py" in d.stdout, d.stdout
    # a second run in the kept directory is refused, changing nothing
    before = sorted(p.name for p in (tmp_path / "work").iterdir())
    with walstore.open(tmp_path / "work" / "agent-state", readonly=True) as s:
        commits = len(s.log())
    again = example("coding_agent_files.py", "work", cwd=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    assert "not an empty directory" in again.stderr
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == before
    with walstore.open(tmp_path / "work" / "agent-state", readonly=True) as s:
        assert len(s.log()) == commits


def test_session_unknown_point_is_named_as_the_caller_named_it(tmp_path):
    pytest.importorskip("agents")
    import asyncio

    from walstore.integrations.openai_agents import WalstoreSession

    async def go(store):
        s = WalstoreSession("u1", store)
        await s.add_items([{"role": "user", "content": "hi"}])
        await s.restore_point("p1")
        for call in (lambda: s.rewind("nope"), lambda: s.rewind("nope", dry_run=True),
                     lambda: s.drop_restore_point("nope"),
                     lambda: WalstoreSession("u2", store).rewind("p1")):
            with pytest.raises(walstore.UnknownPoint) as e:
                await call()
            assert isinstance(e.value, KeyError)
            text = str(e.value)
            # the caller's name first (the store's internal one only in parentheses)
            assert re.match(r"session 'u[12]' has no restore point named '(nope|p1)' \(", text), text
        # the other point forms still name what was given; the session's point still works
        with pytest.raises(walstore.UnknownPoint, match="999"):
            await s.rewind(999)
        assert list(await s.restore_points()) == ["p1"]
        await s.add_items([{"role": "user", "content": "more"}])
        await s.rewind("p1")
        assert await s.get_items() == [{"role": "user", "content": "hi"}]

    with walstore.open(tmp_path / "s") as store:
        asyncio.run(go(store))


def test_every_verbs_help_is_plain_text_and_names_its_json_flag():
    from click.testing import CliRunner

    from walstore.cli import main
    runner = CliRunner()
    for name, command in sorted(main.commands.items()):
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "``" not in r.output, (name, r.output)        # reST markup shown as is
        for param in command.params:
            if "--json" in getattr(param, "opts", ()):
                assert param.help, f"{name} --json has no help text"
    r = runner.invoke(main, ["restore", "--help"])
    assert "TXID" in r.output and "(1)" in r.output, r.output


def plain_blocks(text: str) -> list[str]:
    """The fenced blocks of a page with no language (```), each as its text."""
    blocks, current, fence = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, current = line.strip(), []
            else:
                if fence == "```":
                    blocks.append("\n".join(current))
                fence, current = None, None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_synopsis_line_in_the_docs_names_the_flags_the_verb_takes():
    """A ``walstore VERB ...`` line (with its continuation lines) in a synopsis block of
    any page names exactly the flags that verb takes."""
    import click

    from walstore.cli import main
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for block in plain_blocks(page.read_text()):
            usages: dict[str, str] = {}
            current = None
            for line in block.splitlines():
                if line.startswith("$"):
                    current = None       # a walkthrough's command, not a synopsis
                    continue
                found = list(re.finditer(r"walstore ([a-z][a-z-]*) ((?:(?!walstore ).)*)", line))
                for m in found:
                    current = m.group(1)
                    usages[current] = usages.get(current, "") + m.group(2)
                if not found and current and line.startswith(" "):
                    usages[current] += line
                elif not found:
                    current = None
            for verb, usage in usages.items():
                if verb not in main.commands or "[" not in usage:
                    continue
                cmd = main.commands[verb]
                flags = {o for p in cmd.params if isinstance(p, click.Option)
                         for o in p.opts if o.startswith("--")}
                written = set(re.findall(r"--[a-z][a-z-]*", usage))
                assert written == flags, (page.name, verb, written ^ flags)
                checked += 1
    assert checked >= 3 * len(main.commands) // 2


def test_demo_of_a_path_with_a_dash_and_a_space_finishes_and_its_hints_paste_back(tmp_path):
    import shlex
    r = cli("demo", "--", "-my store", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr)
    lines = r.stdout.splitlines()
    hints = lines[lines.index("Inspect it yourself:") + 1:]
    assert len(hints) == 6, hints
    for hint in hints:
        argv = shlex.split(hint)
        assert argv[0] == "walstore", hint
        done = cli(*argv[1:], cwd=tmp_path)
        assert done.returncode == 0, (hint, done.stderr)


def _hinted_command(text: str) -> list[str]:
    import shlex
    m = re.search(r"`(walstore [^`]+)`", text)
    assert m, text
    return shlex.split(m.group(1))


def test_suggested_commands_quote_a_path_with_a_space(tmp_path):
    store = tmp_path / "my store"
    r = cli("init", "my store", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # damaged: every verb's line ends with "`walstore recover PATH` shows the options"
    import shutil
    shutil.rmtree(store / "wal")
    g = cli("get", "my store", "k", cwd=tmp_path)
    assert g.returncode == 1 and len(g.stderr.strip().splitlines()) == 1, g.stderr
    assert _hinted_command(g.stderr) == ["walstore", "recover", "my store"], g.stderr
    # the library's NeedsRecovery names the command too
    crashed = tmp_path / "-crashed st"
    code = ("import os, sys, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "with s.transaction() as tx: tx.put('k', 1)\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(crashed)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    with pytest.raises(walstore.NeedsRecovery) as e:
        walstore.open(crashed, recover="manual")
    argv = _hinted_command(str(e.value))
    assert argv[:2] == ["walstore", "recover"] and os.path.samefile(argv[2], crashed), argv
    # and the CLI's own: a verb that does not recover says to run recover first
    d = cli("revert", "./-crashed st", "1", cwd=tmp_path)
    assert d.returncode == 1, d.stderr
    argv = _hinted_command(d.stderr)
    assert argv[:2] == ["walstore", "recover"], d.stderr
    assert not argv[2].startswith("-") and os.path.samefile(tmp_path / argv[2], crashed), argv


NO_BOTO3 = """
import sys
sys.modules["boto3"] = None          # as on a machine without the walstore[s3] extra
import os, walstore
out = []
for call in (lambda: walstore.open("st", replicate_to="s3://bucket/a1"),
             lambda: walstore.restore("s3://bucket/a1", "dest")):
    try:
        call()
        out.append("no error")
    except walstore.ReplicationError as e:
        out.append("ReplicationError: " + str(e))
    except BaseException as e:
        out.append(type(e).__name__ + ": " + str(e))
out.append("exists: %s %s" % (os.path.exists("st"), os.path.exists("dest")))
print("\\n".join(out))
"""

CLI_NO_BOTO3 = """
import sys
sys.modules["boto3"] = None
from walstore.cli import main
sys.argv = ["walstore"] + sys.argv[1:]
main()
"""


def test_without_boto3_s3_replicas_are_refused_naming_the_extra(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", NO_BOTO3], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ReplicationError: ") and "walstore[s3]" in lines[0], lines
    assert lines[1].startswith("ReplicationError: ") and "walstore[s3]" in lines[1], lines
    assert lines[2] == "exists: False False", lines      # nothing created
    assert cli("init", "st", cwd=tmp_path).returncode == 0
    for argv in (["replicas", "s3://bucket/a1"], ["restore", "s3://bucket/a1", "dest"],
                 ["replicate", "st", "s3://bucket/a1", "--once"]):
        c = subprocess.run([sys.executable, "-c", CLI_NO_BOTO3, *argv], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
        assert c.returncode == 1, (argv, c.stderr)
        err = c.stderr.strip().splitlines()
        assert len(err) == 1 and "walstore[s3]" in err[0], (argv, c.stderr)
        assert "unexpected" not in err[0] and "Traceback" not in c.stderr


NO_EXTRAS = """
import sys
sys.modules["agents"] = None
sys.modules["transaction"] = None
import walstore
out = []
try:
    from walstore.integrations.openai_agents import WalstoreSession
    with walstore.open("st") as store:
        WalstoreSession("u", store)
    out.append("no error")
except ImportError as e:
    out.append(str(e))
try:
    import walstore.integrations.transaction
    out.append("no error")
except ImportError as e:
    out.append(str(e))
print("\\n".join(out))
"""


def test_integrations_without_their_extra_name_it():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", NO_EXTRAS], cwd=d, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert r.returncode == 0, r.stderr
    session, txn = r.stdout.splitlines()
    assert "pip install 'walstore[openai-agents]'" in session, session
    assert "pip install 'walstore[transaction]'" in txn, txn


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["get", "--help"], ["demo", "-h"]])
def test_help_and_version_into_a_full_or_closed_stdout(tmp_path, argv):
    with open("/dev/full", "w") as full:
        r = cli(*argv, cwd=tmp_path, stdout=full)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == ["walstore: writing its output to stdout failed: No space left on "
                     "device [ENOSPC]"], r.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "walstore", *argv], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                   # the reader is gone at once
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0, err
    assert err == b"", err


@pytest.mark.parametrize("value, traceback", [("1", True), ("yes", True), ("0", False),
                                              ("", False), ("false", False), ("off", False),
                                              ("No", False)])
def test_walstore_debug_off_values_show_no_traceback(tmp_path, value, traceback):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WALSTORE_DEBUG=value)
    r = subprocess.run([sys.executable, "-m", "walstore", "get", "missing", "k"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert ("Traceback" in r.stderr) == traceback, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("walstore: get failed: ")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv, code", [(["get", "missing", "k"], 2), (["nosuchverb"], 2),
                                        (["get", "st", "hex:zz"], 2), (["get", "st"], 2),
                                        (["get", "st", "absent"], 1)])
def test_an_error_line_stderr_cannot_take_keeps_its_exit_status(tmp_path, argv, code):
    assert cli("init", "st", cwd=tmp_path).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "walstore", *argv], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=full, timeout=60)
    assert r.returncode == code, argv
    assert cli(*argv, cwd=tmp_path).returncode == code     # as with a stderr that works


def _procs_naming(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_sigterm_ends_demo_and_bench_through_their_cleanup(tmp_path):
    import signal
    import time
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "walstore", "demo", "st"], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("== 6."):          # the worker process is running now
            break
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert err.strip().splitlines() == ["walstore: demo terminated (SIGTERM)"], err
    assert not (tmp_path / "st").exists() and not (tmp_path / "st-demo-files").exists()
    deadline = time.monotonic() + 10
    while _procs_naming(str(tmp_path / "st-demo-files")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _procs_naming(str(tmp_path / "st-demo-files")) == []     # no worker left

    b = subprocess.Popen([sys.executable, "-m", "walstore", "bench", "--quick"], cwd=tmp_path,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in b.stderr:
        if line.lstrip().startswith("1/2"):   # a row is being measured
            break
    b.send_signal(signal.SIGTERM)
    err = b.stderr.read()
    assert b.wait(timeout=120) == 143, err
    assert "walstore: bench terminated (SIGTERM)" in err
    assert sorted(os.listdir(tmp_path / "scratch")) == []           # no scratch store left
