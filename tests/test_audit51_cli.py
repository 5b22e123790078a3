"""Audit 51 (the command line as an operator uses it; the replication verbs): regressions
found by probing section 3 ("Command line", "Replication", "Errors") with real processes.

Each test failed before its fix (see the commit naming it):

- a replica manifest's time that is no time (NaN, infinite, out of range): `replicas`
  said "an unexpected error", `restore --to TIME` a usage error; `--json` exited 0;
- `replicas --verify` said ok of a restore point past the replica's end, and of a WAL
  object whose listed commit txid/time range (x0, x1, t0, t1) is not its commits';
- `replicas`, `restore` and `verify` printed names from the replica/log raw (newlines,
  ESC/OSC sequences);
- `restore` gave a bytes purge prefix as {"hex": ...} / 'bytes 00ff';
- `dump --json` interrupted by Ctrl-C left no JSON document;
- values nesting past ~480 levels (the store takes ~1,024) could not be shown."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import walstore

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("WALSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def one_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("walstore: "), p.stderr
    return lines[0]


def interrupted_with_a_slow_reader(argv: list, env: dict, wait: float = 1.5
                                   ) -> tuple[int, str, str]:
    """Run ``walstore *argv``, read one byte (it has begun its document), stop reading
    until it blocks on the full pipe (its kernel wait channel says so: ``pipe_write``;
    where /proc does not tell, for ``wait`` seconds, which it blocks within even on a
    loaded machine), then send SIGINT, as an operator's Ctrl-C on ``walstore ... |
    slow-consumer`` would; (exit code, all of stdout, stderr).  The child gets SIGINT's
    default disposition: a parent that ignores it, as a test runner's worker may, passes
    SIG_IGN on, and Python then installs no KeyboardInterrupt handler (in CI a dump ran
    to its end, exit 0)."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "-m", "walstore", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = os.read(p.stdout.fileno(), 1)
        end = time.monotonic() + wait
        while time.monotonic() < end and not _blocked_writing_a_pipe(p.pid):
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    return p.returncode, (first + out).decode(), err.decode()


def _blocked_writing_a_pipe(pid: int) -> bool:
    """Is process ``pid`` blocked writing to a pipe now (a full one: its reader stopped)?
    False where /proc does not say (no wait channel shown)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().endswith("pipe_write")
    except OSError:
        return False


def _no_constants(name: str):
    raise ValueError(f"not RFC 8259 JSON: {name}")


def strict(text: str):
    return json.loads(text, parse_constant=_no_constants)


# ---- a damaged replica manifest's times ----------------------------------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A file:// replica of a store with a few commits and a restore point (a template:
    each test tampers with a copy)."""
    base = tmp_path_factory.mktemp("shipped")
    rep = base / "rep"
    # (interval 30 s: the ship is the sync_replica below, one WAL object holding the three
    # commits the tests expect; at 0.05 s a loaded CI machine shipped the first commit
    # alone, stop 81)
    with walstore.open(str(base / "src"), replicate_to=f"file://{rep}",
                       replicate_options={"interval": 30.0}) as s:
        for i in range(3):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.restore_point("rp")
        s.sync_replica(timeout=30)
    return rep


def _set(path: list, value):
    def edit(doc: dict) -> None:
        d = doc
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
    return edit


TAMPERED_TIMES = {
    "complete_to": (_set(["complete_to"], math.nan), "complete_to"),
    "complete_to-huge": (_set(["complete_to"], 1e300), "complete_to"),
    "updated": (_set(["updated"], math.nan), "updated"),
    "snapshot-ts": (_set(["snapshots", 0, "ts"], math.inf), "snapshots[0].ts"),
    "point-ts": (_set(["points", "rp", "ts"], 1e300), "points['rp'].ts"),
    "last_commit-ts": (_set(["last_commit", "ts"], 6e47), "last_commit.ts"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_TIMES))
def test_a_manifest_time_that_is_no_time_is_said_as_damage_naming_the_field(
        shipped, tmp_path, case):
    """A manifest is untrusted input: "a damaged or tampered one is a ReplicationError
    naming the field; on the CLI, exit 1" (docs/REPLICATION.md).  Its times were checked
    only for being numbers: a NaN, an infinite or an out-of-range time (one flipped bit
    in a file:// replica's manifest makes 3.3e28 of complete_to) passed, and then
    `walstore replicas URL` failed with "OverflowError: timestamp out of range for
    platform time_t (an unexpected error; `walstore --debug` shows where)" while
    `replicas --json` of the same replica exited 0 as if nothing were wrong, and
    `restore --to TIME` said "cannot convert float NaN to integer" as a usage error
    (exit 2) naming no manifest."""
    edit, field = TAMPERED_TIMES[case]
    rep = tmp_path / "rep"
    shutil.copytree(shipped, rep)
    doc = msgpack.unpackb((rep / "manifest").read_bytes(), raw=False, strict_map_key=False)
    edit(doc)
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    url = f"file://{rep}"

    p = run("replicas", url)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    line = one_line(p)
    assert "manifest" in line and "damaged" in line and field in line, line
    assert "unexpected" not in line

    p = run("replicas", url, "--json")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    err = strict(p.stdout)["error"]
    assert err["type"] == "ReplicationError" and field in err["message"], err

    dest = tmp_path / "dest"
    p = run("restore", url, str(dest), "--to", "2026-01-01T00:00:00Z")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    line = one_line(p)
    assert "manifest" in line and "damaged" in line and field in line, line
    assert not dest.exists()


def test_replicas_verify_fails_a_restore_point_past_the_replicas_end(shipped, tmp_path):
    """`replicas --verify` checks "every restore point's LSN against the record the WAL
    holds there"; one the manifest put past the end of the replica's WAL (damage: the
    shipper lists only points it shipped) was skipped as "before the WAL retained", so
    verify said "restore points: ok", exit 0, of a point no restore can reach (`restore
    --to rp` then failed: "the replica's WAL ends at LSN 683, before LSN 2492")."""
    rep = tmp_path / "rep"
    shutil.copytree(shipped, rep)
    doc = msgpack.unpackb((rep / "manifest").read_bytes(), raw=False, strict_map_key=False)
    doc["points"]["rp"]["lsn"] = doc["position"] + 1000
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    p = run("replicas", f"file://{rep}", "--verify", "--json")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    checks = {c["check"]: c for c in strict(p.stdout)["verify"]["checks"]}
    assert not checks["restore points"]["ok"], checks["restore points"]
    assert "'rp'" in checks["restore points"]["error"], checks["restore points"]
    p = run("restore", f"file://{rep}", str(tmp_path / "dest"), "--to", "rp")
    assert p.returncode == 1 and not (tmp_path / "dest").exists(), (p.stdout, p.stderr)


@pytest.mark.parametrize("field,delta", [("x0", 64), ("x1", -1), ("t0", 1.0), ("t1", -0.5)])
def test_replicas_verify_fails_a_wal_entry_whose_txids_or_times_are_not_its_commits(
        shipped, tmp_path, field, delta):
    """The manifest lists, per WAL object, its first/last commit txid (x0, x1) and time
    (t0, t1): a restore to a txid or a time picks the object by them.  `replicas --verify`
    read every record of every object but never held them against these: with x0 off
    (a flipped bit: 1 -> 65) verify said ok, exit 0, and then `restore --to tx:2` said
    "transaction 2 is not among the commits the replica's WAL holds", exit 2, of a
    transaction it holds."""
    rep = tmp_path / "rep"
    shutil.copytree(shipped, rep)
    doc = msgpack.unpackb((rep / "manifest").read_bytes(), raw=False, strict_map_key=False)
    entry = doc["wal"][0]
    assert entry["x0"] is not None and entry["x1"] - entry["x0"] >= 2  # (3 commits in it)
    entry[field] += delta
    (rep / "manifest").write_bytes(msgpack.packb(doc, use_bin_type=True))
    p = run("replicas", f"file://{rep}", "--verify", "--json")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    checks = {c["check"]: c for c in strict(p.stdout)["verify"]["checks"]}
    wal = checks["every WAL object"]
    assert not wal["ok"] and entry["k"] in wal["error"], wal


def test_replicas_and_restore_escape_control_characters_from_the_replica(tmp_path):
    """Human output is one line per row, every control character escaped (as the tables
    of `files`, `actions`, `log` are since audit 48).  `replicas` and `restore` printed
    what the replica holds raw: a restore point named "rp\\nevil" split its row in two,
    and an action's name or compensator holding an OSC sequence ("\\x1b]0;title\\x07":
    sets the terminal's title) reached the terminal from `restore`'s "pending
    compensation" line.  Names come from the replica: input walstore does not control."""
    src, rep = str(tmp_path / "src"), f"file://{tmp_path}/rep"
    s = walstore.open(src, replicate_to=rep, replicate_options={"interval": 0.05})
    try:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.restore_point("rp\nevil\x0b")
        tx = s.transaction()  # (in flight at the cut: its action is listed as pending)
        tx.put("j", 2)
        with tx.action("charge\x07\nx", args={}, compensate="refund\x1b]0;t\x07") as act:
            act.result = 1
        s.sync_replica(timeout=30)
        shown = run("replicas", rep)
        restored = run("restore", rep, str(tmp_path / "dest"))
        tx.rollback()
    finally:
        s.close()
    assert shown.returncode == 0, (shown.stdout, shown.stderr)
    assert restored.returncode == 1, (restored.stdout, restored.stderr)  # (one owed)
    for p in (shown, restored):
        assert not any(c in p.stdout for c in "\x07\x0b\x1b"), repr(p.stdout)
    points = [ln for ln in shown.stdout.splitlines() if ln.startswith("point ")]
    assert len(points) == 1 and "rp\\nevil\\u000b" in points[0], shown.stdout
    assert "evil" not in shown.stdout.replace(points[0], "")
    pend = [ln for ln in restored.stdout.splitlines() if "pending compensation" in ln]
    assert len(pend) == 1 and "charge\\u0007\\nx" in pend[0], restored.stdout


def test_verify_escapes_control_characters_in_what_needs_a_decision(tmp_path):
    """`verify`'s "needs a decision: compensation owed: action 1.1 (NAME, compensator
    ...)" printed the action's name raw: a name holding a newline split the line (the
    second half looking like a line of its own) and a BEL/ESC reached the terminal, where
    `actions` and `recover` show the same name escaped."""
    path = str(tmp_path / "s")
    code = ("import sys, time, walstore\n"
            "s = walstore.open(sys.argv[1])\n"
            "tx = s.transaction(); tx.put('k', 1)\n"
            "with tx.action('charge\\x07\\nx', args={}, compensate='refund') as a:\n"
            "    a.result = 1\n"
            "print('ready', flush=True); time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    w = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert w.stdout.readline().strip() == "ready"
    finally:
        w.kill()  # (kill -9: the action's transaction never commits)
        w.wait()
    p = run("verify", path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "\x07" not in p.stdout, repr(p.stdout)
    owed = [ln for ln in p.stdout.splitlines() if ln.startswith("needs a decision")]
    assert len(owed) == 1 and "charge\\u0007\\nx" in owed[0], p.stdout
    assert not any(ln.startswith("x, compensator") for ln in p.stdout.splitlines())


def test_restore_shows_a_bytes_purge_prefix_as_the_command_line_writes_bytes_keys(tmp_path):
    """`restore` lists the purges after its cut it applied (`purges_applied`).  A bytes
    prefix came out of `--json` as {"hex": "00ff"} where every bytes key of the CLI's JSON
    is {"base64": ...}, and in the human line as "purge of 'bytes 00ff'", exactly what a
    str prefix "bytes 00ff" shows; now {"base64": "AP8="} and hex:00ff (the key syntax
    every command takes)."""
    src, rep = str(tmp_path / "src"), f"file://{tmp_path}/rep"
    with walstore.open(src, replicate_to=rep, replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put(b"\x00\xffa", 1)
            tx.put("kept", 2)
        s.restore_point("before")
        s.purge(b"\x00\xff")
        s.sync_replica(timeout=30)
    p = run("restore", rep, str(tmp_path / "d1"), "--to", "before", "--json")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert strict(p.stdout)["purges_applied"] == [{"base64": "AP8="}], p.stdout
    p = run("restore", rep, str(tmp_path / "d2"), "--to", "before")
    assert p.returncode == 0, (p.stdout, p.stderr)
    (line,) = [ln for ln in p.stdout.splitlines() if "purge of" in ln]
    assert "hex:00ff" in line and "bytes 00ff" not in line, line


def test_dump_json_interrupted_mid_stream_is_still_one_json_document(tmp_path):
    """`dump --json` streams its records (bounded memory); a failure mid-way closes the
    document with "error" so what was printed stays valid JSON.  Ctrl-C (a
    KeyboardInterrupt, no Exception) went past that: stdout ended in the middle of the
    list, no document at all, exit 130.  Here the reader stops reading (the pipe fills,
    dump blocks on its write) and SIGINT comes then, as an operator's Ctrl-C on
    `walstore dump --json | slow-consumer` would."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(3000):  # (~650 KiB of JSON: far past a pipe's buffer)
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
    code, out, err = interrupted_with_a_slow_reader(
        ["dump", path, "--json"], dict(os.environ, PYTHONPATH=str(ROOT)))
    assert code == 130, (code, err)
    doc = strict(out)
    assert doc["records"] and "interrupted" in doc["error"], doc.get("error")
    assert "Traceback" not in err


def test_a_deeply_nested_value_the_store_took_reads_back_through_every_command(tmp_path):
    """The store takes values nesting about 1,000 levels deep (msgpack's bound), and `put`
    parses as deep; but the commands that show a value rendered it recursively within
    Python's default recursion limit: from about 480 levels `get`, `scan`, `history` and
    `dump` failed with "RecursionError: maximum recursion depth exceeded (an unexpected
    error ...)", exit 1, of a value `walstore put` had just committed (probe: 500 levels)."""
    deep: list = []
    for _ in range(999):
        deep = [deep]
    nested: dict = {"leaf": 1}
    for _ in range(999):
        nested = {"a": nested}
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("deep", deep)
            tx.put("nested", nested)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))  # (this process parses the 1,000 levels back)
    try:
        for args in (["get", path, "deep"], ["get", path, "nested"],
                     ["scan", path, "--json"], ["history", path, "deep", "--json"],
                     ["dump", path, "--json"], ["scan", path]):
            p = run(*args)
            assert p.returncode == 0, (args, p.stderr)
            assert "Recursion" not in p.stderr + p.stdout
            if args[0] == "get":
                assert strict(p.stdout) == (deep if args[2] == "deep" else nested)
            elif "--json" in args:
                strict(p.stdout)
        p = run("put", path, "again", json.dumps(deep))  # (and it pastes back)
        assert p.returncode == 0, p.stderr
    finally:
        sys.setrecursionlimit(old)
