"""Audit 48 of the command line (CONTRACT section 3), reversible files and the OpenAI
Agents session: each test a deviation found by a probe of real CLI processes, failing on
the code before its fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import walstore

from store_support import CLI, cli_env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a real process of this checkout (stdout a pipe, as a script reads it)."""
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True,
                          text=True, errors="surrogateescape", env=cli_env(),
                          timeout=timeout)


def _no_constants(token: str):
    raise AssertionError(f"non-RFC-8259 JSON constant {token}")


def strict(text: str):
    return json.loads(text, parse_constant=_no_constants)


# ---- dump: keys in the command line's syntax, one line per record ------------------------
def test_dump_shows_keys_as_the_command_line_writes_them_one_line_per_record(tmp_path):
    """`walstore dump` printed a record's keys with ``str()``: the bytes key b"\\x00\\x01" as
    ``b'\\x00\\x01'``, the str key "hex:00" as ``hex:00`` (which, pasted back, names the
    bytes key b"\\x00"), and a key or restore point name holding a newline split the
    record's line in two, the second reading like a record of its own.  Every other
    human output writes keys as KEY arguments take them (README, Command line, Keys)."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("line1\nFAKE  COMMIT", 1)
            tx.put(b"\x00\x01", 2)
            tx.put("hex:00", 3)
            tx.put("plain", 4)
        s.restore_point("rp\nx")
    r = run_cli("dump", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    commit = [ln for ln in lines if " COMMIT " in ln]
    assert len(commit) == 1, lines
    assert "str:hex:00" in commit[0] and "hex:0001" in commit[0], commit[0]
    assert "plain" in commit[0] and 'json:"line1\\nFAKE  COMMIT"' in commit[0], commit[0]
    assert "b'" not in r.stdout
    # every line is a record: LSN first (nothing split off a key or a name)
    for ln in lines:
        assert ln.split()[0].isdigit(), ln
    point = [ln for ln in lines if "RESTORE_POINT" in ln]
    assert len(point) == 1 and "rp\\nx" in point[0], lines
    # what the line shows pastes back: the str key "hex:00" is found as str:hex:00
    assert run_cli("get", path, "str:hex:00").stdout.strip() == "3"
    assert run_cli("get", path, "hex:0001").stdout.strip() == "2"
    # --json is unchanged: the payload carries the keys, tagged
    doc = strict(run_cli("dump", path, "--json").stdout)
    (rec,) = [x for x in doc["records"] if x["type"] == "COMMIT"]
    assert {"base64": "AAE="} in [w["key"] for w in rec["payload"]["w"]]


# ---- file history of a workspace whose root is gone --------------------------------------
def _store_with_file_history(tmp_path):
    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "one\n")
            tx.put("k", 1)
        s.restore_point("rp")
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "two\n")
            tx.put("k", 2)
    return path, root


def test_file_history_reads_when_the_workspace_root_is_gone(tmp_path):
    """A store whose workspace root no longer exists here (a copy restored or backed up
    onto another machine, whose history the README says it "reads"; the tree deleted
    since): `walstore files` exited 2 ("workspace root ... does not exist", a usage
    error for a store the user named rightly), `walstore diff` exited 1 with "an
    unexpected error", and ``store.at(p).files(ws)`` and ``store.workspaces()`` raised
    ValueError, though the history they read is in the store."""
    import shutil
    path, root = _store_with_file_history(tmp_path)
    shutil.rmtree(root)

    r = run_cli("files", path, "--json")
    assert r.returncode == 0, r.stderr
    (w,) = strict(r.stdout)["workspaces"]
    (f,) = w["files"]
    assert (f["path"], len(f["versions"])) == ("a.txt", 2)
    r = run_cli("files", path, "--workspace", str(root))
    assert r.returncode == 0 and "a.txt" in r.stdout, r.stderr
    r = run_cli("diff", path, "--from", "rp", "--json")
    assert r.returncode == 0, r.stderr
    doc = strict(r.stdout)
    assert [k["key"] for k in doc["keys"]] == ["k"]
    assert [(x["path"], x["kind"]) for x in doc["files"]] == [(str(root / "a.txt"),
                                                                "modified")]

    with walstore.open(path) as s:
        (ws,) = s.workspaces()
        assert ws.root == str(root)
        assert s.at("rp").files(ws).read("a.txt") == b"one\n"
        assert s.at("rp").files(str(root)).read("a.txt") == b"one\n"
        try:  # a path walstore never changed: absent, as the tree now says
            s.at("rp").files(ws).read("never.txt")
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("read of an absent path did not raise FileNotFoundError")
        # changing files there still fails, and creates nothing (no root is made anew)
        with s.transaction() as tx:
            try:
                tx.files(ws).write("b.txt", "x")
            except (OSError, ValueError):
                pass
            else:
                raise AssertionError("a write into a missing root succeeded")
            tx.rollback()
    assert not root.exists()

    # a root that is a file now: the history reads too, and nothing writes through it
    root.write_text("not a directory")
    assert run_cli("files", path).returncode == 0
    assert run_cli("diff", path, "--from", "rp").returncode == 0
    with walstore.open(path) as s:
        assert s.at("rp").files(str(root)).read("a.txt") == b"one\n"
        with s.transaction() as tx:
            try:
                tx.files(s.workspaces()[0]).write("b.txt", "x")
            except (OSError, ValueError):
                pass
            else:
                raise AssertionError("a write through a root that is a file succeeded")
            tx.rollback()
    assert root.read_text() == "not a directory"


# ---- restore shows progress on long work ---------------------------------------------------
def test_restore_shows_progress_on_stderr_only(tmp_path):
    """`walstore restore` of a replica holding a large WAL (replayed into DEST, then
    redone by the open) printed nothing until it ended (CONTRACT 3: human output shows
    progress on long work; `backup`, `recover`, `replicas --verify` do).  It shows the
    bytes replayed on stderr now, and --json stays one document with nothing on stderr."""
    path, url = str(tmp_path / "src"), f"file://{tmp_path}/replica"
    s = walstore.open(path, durability="none", replicate_to=url,
                      replicate_options={"snapshot_interval": 3600, "interval": 0.2})
    try:
        with s.transaction() as tx:
            tx.put("first", 1)
        s.sync_replica(60)  # (its snapshot: at the start; what follows is WAL only)
        for i in range(36):  # 36 MiB: above the size from which progress is shown
            with s.transaction() as tx:
                tx.put(f"k{i}", os.urandom(1 << 20))
        s.sync_replica(120)
    finally:
        s.close()
    text = run_cli("restore", url, str(tmp_path / "r1"))
    assert text.returncode == 0, text.stderr
    assert "restore:" in text.stderr and "(100%)" in text.stderr, text.stderr
    assert "restore:" not in text.stdout
    js = run_cli("restore", url, str(tmp_path / "r2"), "--json")
    assert js.returncode == 0, js.stderr
    doc = strict(js.stdout)
    assert doc["cut_lsn"] > 36 << 20
    assert js.stderr == "", js.stderr
    with walstore.open(str(tmp_path / "r2"), readonly=True) as r:
        assert len(r.get("k35")) == 1 << 20


# ---- an empty PATH or DEST is a usage error -------------------------------------------------
def test_an_empty_path_or_dest_is_a_usage_error(tmp_path):
    """An empty PATH reached ``walstore.open``, whose ValueError every command said as
    "an unexpected error" with exit 1 (`commit-prepared` as "bad GID"); `backup` and
    `restore` took an empty DEST for the current directory ("exists and is not empty"),
    and `demo ''` ran.  CONTRACT 3: a usage error is exit 2, one line; under --json the
    error document."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    for args in (["init", ""], ["get", "", "k"], ["put", "", "k", "1"], ["stats", ""],
                 ["commit-prepared", "", "g"], ["rewind", "", "--to", "1"],
                 ["backup", path, ""], ["demo", ""],
                 ["restore", f"file://{tmp_path}/rep", ""],
                 ["replicate", "", f"file://{tmp_path}/rep", "--once"]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        (line,) = r.stderr.splitlines()
        assert "must not be empty" in line and "unexpected" not in line, (args, line)
        assert r.stdout == "", (args, r.stdout)
    r = run_cli("verify", "", "--json")
    assert r.returncode == 2, r.stderr
    err = strict(r.stdout)["error"]
    assert (err["exit"], err["type"]) == (2, "UsageError")
    assert not (tmp_path / "rep").exists()


def _run_bytes(*args: bytes) -> subprocess.CompletedProcess:
    """The CLI with arguments that are not valid UTF-8 (argv holds bytes)."""
    return subprocess.run([sys.executable.encode(), b"-c", CLI.encode(), *args],
                          capture_output=True, env=cli_env(), timeout=120)


def test_a_store_path_that_is_not_utf8_is_a_usage_error(tmp_path):
    """A PATH that is not valid UTF-8 (LMDB takes a store's path as UTF-8 text:
    ``walstore.open`` refuses it before any I/O) was said as "an unexpected error",
    exit 1, by every command, and `demo` printed its first section before failing."""
    odd = os.fsencode(str(tmp_path)) + b"/st\xff"
    for args in ([b"init", odd], [b"put", odd, b"k", b"1"], [b"verify", odd],
                 [b"demo", odd + b"-demo"], [b"backup", os.fsencode(str(tmp_path)), odd]):
        r = _run_bytes(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        (line,) = r.stderr.splitlines()
        assert b"not valid UTF-8" in line and b"unexpected" not in line, (args, line)
        assert r.stdout == b"", (args, r.stdout)
    assert not os.path.lexists(odd)


def test_the_json_error_message_is_always_a_string(tmp_path):
    """Under --json a failure's document is ``{"error": {"command", "message", "exit",
    "type"}}`` with ``message`` the error's text; a message naming a URL or file that
    is not valid UTF-8 (as argv gives it) became ``{"base64": ...}`` there, an object
    where a script reads a string."""
    url = b"file://" + os.fsencode(str(tmp_path)) + b"/rep\xff"
    r = _run_bytes(b"replicas", url, b"--json")
    assert r.returncode == 1, r.stderr
    err = strict(r.stdout.decode("utf-8"))["error"]
    assert isinstance(err["message"], str), err
    assert "no replica" in err["message"] and "\\udcff" in err["message"], err
    assert (err["exit"], err["type"]) == (1, "ReplicationError")


# ---- human output: control characters never reach the terminal ------------------------------
def test_tables_escape_every_control_character(tmp_path):
    """A file or action name holding an ESC sequence (``\\x1b[2J`` clears the screen) or
    a vertical tab reached the terminal from the tables of `files`, `diff` and `actions`
    (only \\r, \\n and \\t were escaped), breaking the alignment CONTRACT 3 promises and
    acting on the terminal; `rewind --dry-run` already wrote them escaped.  ``color=True``:
    as on a terminal, where click strips nothing."""
    from click.testing import CliRunner
    from walstore.cli import main
    path, root = str(tmp_path / "s"), tmp_path / "ws"
    root.mkdir()
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        s.restore_point("rp")
        with s.transaction() as tx:
            tx.files(ws).write("a\x1b[2Jb", "x")
            tx.files(ws).write("v\x0bt", "y")
            with tx.action("na\x1b[31mme", args={}, compensate="c\x0bx") as a:
                a.result = 1
    for args in (["files", path], ["diff", path, "--from", "rp"], ["actions", path],
                 ["rewind", path, "--to", "rp", "--dry-run"]):
        r = CliRunner().invoke(main, args, color=True)
        assert r.exit_code == 0, (args, r.output)
        assert "\x1b" not in r.output and "\x0b" not in r.output, (args, r.output)
        assert "\\u001b" in r.output, (args, r.output)
    rows = CliRunner().invoke(main, ["files", path], color=True).output.splitlines()
    assert len(rows) == 4, rows  # the workspace, the header, a row per path
    cols = {len(ln.split("  file ")[0]) for ln in rows[2:]}
    assert len(cols) == 1, rows  # aligned


def test_an_error_line_escapes_control_characters(tmp_path):
    """An error is ONE line on stderr (CONTRACT 3); a \\r or a vertical tab in what the
    user typed (here a ``--handlers`` module name) reached the terminal raw inside it
    (a \\r sends the cursor back and what follows overwrites the start of the line)."""
    path = str(tmp_path / "s")
    walstore.open(path).close()
    r = run_cli("recover", path, "--handlers", "x\ry\x0bz")
    assert r.returncode == 2, r.stderr
    assert "\r" not in r.stderr and "\x0b" not in r.stderr, repr(r.stderr)
    (line,) = r.stderr.splitlines()
    assert line.startswith("walstore: --handlers x\\ry\\u000bz: cannot import it"), line


def test_an_undo_refused_for_a_workspace_root_gone_is_said_as_its_cause(tmp_path):
    """`rewind` (also --dry-run) and `revert` of transactions that changed files in a
    workspace whose root is gone (a copy on another machine) are refused, nothing
    changed; the CLI said "ValueError: ... (an unexpected error; `walstore --debug`
    shows where)", as it says of a bug.  Now: "<command> failed: <the cause>", exit 1."""
    import shutil
    path, root = _store_with_file_history(tmp_path)
    shutil.rmtree(root)
    for args in (["rewind", path, "--to", "rp", "--dry-run"], ["rewind", path, "--to", "rp"],
                 ["revert", path, "2"]):
        r = run_cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        (line,) = r.stderr.splitlines()
        assert line == (f"walstore: {args[0]} failed: workspace root {str(root)!r} does not "
                        f"exist"), line
    r = run_cli("rewind", path, "--to", "rp", "--json")
    err = strict(r.stdout)["error"]
    assert (err["exit"], err["type"]) == (1, "ValueError")
    assert run_cli("get", path, "k").stdout.strip() == "2"  # nothing changed
    assert not root.exists()


# ---- a transaction in doubt in a workspace whose root is gone ----------------------------
def test_a_prepared_transaction_in_a_workspace_gone_blocks_nothing_else(tmp_path):
    """A transaction prepared (in doubt) in workspace A whose root is gone (deleted; a
    copy on another machine), the store reopened: every ``tx.files`` change in ANOTHER
    workspace raised ValueError naming A (the in-doubt claims are loaded at the first
    file operation and read A's effects through a check of A's live root), and
    ``rollback_prepared`` logged its decision and then raised that ValueError: the
    transaction was rolled back, its compensations did not run, and `walstore
    rollback-prepared` said "bad GID 'g1': workspace root ... does not exist", exit 2.
    Now it rolls back as a live rollback does (a path it created is absent already)."""
    import shutil
    path, a, b = str(tmp_path / "s"), tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with walstore.open(path) as s:
        wa = s.workspace(str(a))
        s.workspace(str(b))
        tx = s.transaction()
        tx.files(wa).write("new.txt", "prepared\n")
        tx.put("k", 1)
        with tx.action("charge", args={}, compensate="refund") as act:
            act.result = 1
        tx.prepare("g1")
    shutil.rmtree(a)
    with walstore.open(path) as s:
        with s.transaction() as tx:  # another workspace: not A's business
            tx.files(str(b)).write("b.txt", "B")
        assert (b / "b.txt").read_text() == "B"
        assert s.prepared() == ["g1"]
    r = run_cli("rollback-prepared", path, "g1", "--handlers",
                str(_handlers_module(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "rolled back g1", r.stdout
    with walstore.open(path) as s:
        assert s.prepared() == [] and s.get("k") is None
        assert s.pending_compensations() == []
        assert [x.state for x in s.actions()] == ["compensated"]
        assert not (s.last_recovery and [p for p in s.last_recovery.problems
                                         if p.kind == "file-undo-failed"])
    assert not a.exists()


def _handlers_module(tmp_path) -> object:
    mod = tmp_path / "audit48_handlers.py"
    mod.write_text("COMPENSATORS = {'refund': lambda action: None}\n")
    return mod


# ---- a registered root reached through a symlink since -------------------------------------
def test_a_root_reached_through_a_symlink_since_is_refused_after_a_reopen(tmp_path):
    """README: a root replaced by a symlink (or reached through one) is refused live, and
    nothing outside a registered root is written.  A directory on the way to the root
    swapped for a symlink between two opens was not: the reopened store adopted the
    directory found there as the root, and ``tx.files(ws)`` wrote through the symlink
    into the other tree; naming the root by its path (``tx.files("/p/ws")``) resolved the
    symlink, registered its target as a new workspace and wrote there too (also after
    the root itself became a symlink, in the same process).  The history still reads."""
    path = str(tmp_path / "s")
    (tmp_path / "p" / "ws").mkdir(parents=True)
    (tmp_path / "other" / "ws").mkdir(parents=True)
    root = str(tmp_path / "p" / "ws")
    with walstore.open(path) as s:
        ws = s.workspace(root)
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "one")
        s.restore_point("rp")
    os.rename(tmp_path / "p", tmp_path / "p_old")
    os.symlink(tmp_path / "other", tmp_path / "p")
    with walstore.open(path) as s:
        for target in (s.workspaces()[0], root):
            with s.transaction() as tx:
                try:
                    tx.files(target).write("b.txt", "B")
                except ValueError as e:
                    assert "no longer the directory registered" in str(e), e
                else:
                    raise AssertionError(f"wrote through a symlink ({target!r})")
                tx.rollback()
        try:
            s.workspace(root)
        except ValueError:
            pass
        else:
            raise AssertionError("registering the root through a symlink succeeded")
        assert [w.root for w in s.workspaces()] == [root]  # nothing registered anew
        assert s.at("rp").files(root).read("a.txt") == b"one"
    assert os.listdir(tmp_path / "other" / "ws") == []
    r = run_cli("files", path, "--workspace", root)
    assert r.returncode == 0 and "a.txt" in r.stdout, r.stderr

    # the root itself replaced by a symlink, in one process: the path form is refused too
    path2, root2 = str(tmp_path / "s2"), tmp_path / "ws2"
    root2.mkdir()
    (tmp_path / "elsewhere").mkdir()
    with walstore.open(path2) as s:
        s.workspace(str(root2))
        os.rename(root2, tmp_path / "moved")
        os.symlink(tmp_path / "elsewhere", root2)
        with s.transaction() as tx:
            try:
                tx.files(str(root2)).write("b.txt", "B")
            except ValueError:
                pass
            else:
                raise AssertionError("wrote through the root's symlink")
            tx.rollback()
        assert [w.root for w in s.workspaces()] == [str(root2)]
    assert os.listdir(tmp_path / "elsewhere") == []
