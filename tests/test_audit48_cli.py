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
