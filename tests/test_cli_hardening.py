"""The hardened command line (issue 11): one error path (one stderr line, exit 1, usage
exit 2, never a traceback unless --debug), strict RFC 8259 JSON, hex:/b64:/str: keys,
points, recover/actions detail, refusals (demo, backup, --handlers), and the CLI on a full
and a read-only file system (real mounts, real processes; skipped where mounting is not
permitted)."""
from __future__ import annotations

import ast
import base64
import errno
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

import walstore
from walstore.cli import main
from walstore.cli import _engine
from walstore.cli.output import jsonable, json_text, parse_key, parse_point, show_key

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------------
def cli(*args: str, code: int = 0, env: dict | None = None):
    r = CliRunner().invoke(main, list(args), env=env)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    return r


def one_line(r) -> str:
    """The failure's single stderr line (and nothing else on stderr)."""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("walstore: ")
    assert "Traceback" not in r.output
    return lines[0]


def _no_constants(token: str):
    raise AssertionError(f"non-RFC-8259 JSON constant {token}")


def strict(text: str):
    return json.loads(text, parse_constant=_no_constants)


def decode(doc):
    """The inverse of the CLI's JSON rendering (the documented tag rule)."""
    if isinstance(doc, dict):
        if len(doc) == 1:
            (tag, v), = doc.items()
            if tag == "base64":
                return base64.b64decode(v)
            if tag == "float":
                return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[v]
            if tag == "map":
                return {decode(k): decode(x) for k, x in v}
        return {k: decode(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [decode(v) for v in doc]
    return doc


def run_proc(*args: str, check_code: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("WALSTORE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "walstore.cli", *args], capture_output=True,
                       text=True, timeout=120, env=env)
    if check_code is not None:
        assert p.returncode == check_code, (p.returncode, p.stdout, p.stderr)
    return p


def proc_one_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("walstore: "), p.stderr
    return lines[0]


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "s")
    cli("init", path)
    return path


# ---- 1. a package ---------------------------------------------------------------------------
def test_cli_is_a_package_and_the_old_modules_are_gone():
    import walstore.cli as pkg
    assert Path(pkg.__file__) == ROOT / "walstore" / "cli" / "__init__.py"
    for old in ("cli.py", "cli_commands.py", "cli_agent.py"):
        assert not (ROOT / "walstore" / old).exists()
    assert 'walstore = "walstore.cli:main"' in (ROOT / "pyproject.toml").read_text()
    names = set(main.commands)
    assert names >= {"init", "recover", "verify", "stats", "log", "dump", "get", "put",
                     "delete", "scan", "history", "revert", "rewind", "actions", "resolve",
                     "prepared", "commit-prepared", "rollback-prepared", "checkpoint",
                     "backup", "bench", "demo"}


def test_python_dash_m_walstore_cli_runs():
    p = run_proc("--help", check_code=0)
    assert "Usage: walstore" in p.stdout and "recover" in p.stdout


def test_only_the_engine_module_imports_walstore_internals():
    """Everything beyond the public API comes through walstore/cli/_engine.py."""
    offenders = []
    for f in sorted((ROOT / "walstore" / "cli").glob("*.py")):
        if f.name == "_engine.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                    node.level >= 2 or (node.module or "").startswith("walstore.")):
                offenders.append(f"{f.name}: from {'.' * node.level}{node.module}")
            if isinstance(node, ast.Import):
                offenders += [f"{f.name}: import {a.name}" for a in node.names
                              if a.name.startswith("walstore.")]
    assert offenders == []


# ---- 2. one error path -----------------------------------------------------------------------
@pytest.mark.parametrize("err,name", [(errno.ENOSPC, "ENOSPC"), (errno.EROFS, "EROFS"),
                                      (errno.EIO, "EIO")])
def test_os_errors_are_one_line_naming_the_file_and_exit_1(store_path, monkeypatch, err, name):
    bad = os.path.join(store_path, "wal", "0000000000000000.wal")

    def boom(*a, **k):
        raise OSError(err, os.strerror(err), bad)
    monkeypatch.setattr(walstore, "open", boom)
    for args in (["put", store_path, "k", "1"], ["get", store_path, "k"],
                 ["scan", store_path], ["checkpoint", store_path]):
        line = one_line(cli(*args, code=1))
        assert line.startswith(f"walstore: {args[0]} failed: ")
        assert os.strerror(err) in line and f"[{name}]" in line and bad in line


def test_os_error_without_a_file_names_the_store(store_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(walstore, "open", boom)
    line = one_line(cli("put", store_path, "k", "1", code=1))
    assert os.path.abspath(store_path) in line and "ENOSPC" in line


@pytest.mark.parametrize("exc,expect", [
    (lmdb.Error("mdb_txn_commit: Input/output error"), "LMDB: mdb_txn_commit"),
    (lmdb.MapFullError("mdb_put: MDB_MAP_FULL"), "LMDB: mdb_put"),
    (struct.error("unpack requires a buffer of 8 bytes"), "undecodable data (error: unpack"),
    (msgpack.ExtraData(1, b"x"), "undecodable data (ExtraData"),
    (walstore.ReadOnlyError("the store is read-only after an fsync error"), "read-only after"),
    (RuntimeError("something odd"), "RuntimeError: something odd"),
])
def test_every_error_is_one_line_exit_1(store_path, monkeypatch, exc, expect):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(walstore, "open", boom)
    line = one_line(cli("stats", store_path, code=1))
    assert line.startswith("walstore: stats failed: ") and expect in line
    if isinstance(exc, lmdb.Error):
        assert os.path.join(os.path.abspath(store_path), "db") in line


def test_corruption_names_the_file_and_points_to_recover(store_path, monkeypatch):
    def boom(*a, **k):
        raise walstore.CorruptionError("bad checksum", file="/x/wal/1.wal", offset=64, lsn=9)
    monkeypatch.setattr(walstore, "open", boom)
    line = one_line(cli("get", store_path, "k", code=1))
    assert "corruption: bad checksum" in line and "/x/wal/1.wal" in line
    assert f"walstore recover {store_path}" in line


def test_a_wrapped_os_error_shows_its_cause(store_path, monkeypatch):
    def boom(*a, **k):
        try:
            raise OSError(errno.EIO, "Input/output error", "/x/db/data.mdb")
        except OSError as e:
            raise walstore.WalstoreError("cannot apply to LMDB") from e
    monkeypatch.setattr(walstore, "open", boom)
    line = one_line(cli("put", store_path, "k", "1", code=1))
    assert "cannot apply to LMDB" in line and "[EIO]: /x/db/data.mdb" in line


def test_multi_line_messages_become_one_line(store_path, monkeypatch):
    def boom(*a, **k):
        raise walstore.WalstoreError("first\nsecond\nthird")
    monkeypatch.setattr(walstore, "open", boom)
    assert "first second third" in one_line(cli("get", store_path, "k", code=1))


def test_debug_flag_and_env_show_the_traceback(store_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("deep down")
    monkeypatch.setattr(walstore, "open", boom)
    r = CliRunner().invoke(main, ["--debug", "get", store_path, "k"])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "deep down" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("walstore: get failed: RuntimeError")
    r = CliRunner().invoke(main, ["get", store_path, "k"], env={"WALSTORE_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback" in r.stderr and "deep down" in r.stderr
    r = CliRunner().invoke(main, ["get", store_path, "k"], env={"WALSTORE_DEBUG": "0"})
    assert r.exit_code == 1 and "Traceback" not in r.stderr


def test_not_a_store_is_a_one_line_usage_error(tmp_path):
    for args in (["get", str(tmp_path), "k"], ["scan", str(tmp_path)],
                 ["verify", str(tmp_path)], ["recover", str(tmp_path)],
                 ["dump", str(tmp_path)], ["history", str(tmp_path), "k"],
                 ["rewind", str(tmp_path), "--to", "p"]):
        line = one_line(cli(*args, code=2))
        assert "not a walstore store" in line


def test_a_damaged_lmdb_file_is_one_line_in_every_command(store_path):
    """Random bytes for data.mdb (real processes: a crash would be a signal, not a line)."""
    cli("put", store_path, "k", "1")
    data = os.path.join(store_path, "db", "data.mdb")
    size = os.path.getsize(data)
    with open(data, "wb") as f:
        f.write(os.urandom(size))
    for args in (["get", store_path, "k"], ["scan", store_path], ["stats", store_path],
                 ["log", store_path], ["actions", store_path],
                 ["recover", store_path], ["put", store_path, "k", "2"],
                 ["checkpoint", store_path], ["history", store_path, "k"]):
        p = run_proc(*args, check_code=1)
        line = proc_one_line(p)
        assert line.startswith((f"walstore: {args[0]} failed: LMDB: ",
                                f"walstore: {args[0]} failed: corruption: "))
        assert os.path.join(store_path, "db") in line
    # verify's job is to find it: its report says so (and --json is a document), exit 1
    p = run_proc("verify", store_path, check_code=1)
    assert p.stderr == "" and "Traceback" not in p.stdout
    errors = [x for x in p.stdout.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and os.path.join(store_path, "db") in errors[0]
    doc = json.loads(run_proc("verify", store_path, "--json", check_code=1).stdout)
    assert doc["ok"] is False and os.path.join(store_path, "db") in doc["errors"][0]


# ---- 3. strict JSON ------------------------------------------------------------------------
def test_json_output_is_strict_for_non_finite_floats_bytes_and_bytes_keyed_maps(store_path):
    value = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 1.5,
             "blob": b"\x00\xff", "mixed": {b"\x00\xff": 1, "AP8=": 2, "hex:00ff": 3}}
    with walstore.open(store_path) as s:
        with s.transaction(meta={"score": math.nan}) as tx:
            tx.put("v", value)
            tx.put(b"\x00\xff", "bytes key")
            tx.put("hex:00ff", "str key")
    got = strict(cli("get", store_path, "v").stdout)
    assert got["nan"] == {"float": "nan"} and got["inf"] == {"float": "inf"}
    assert got["ninf"] == {"float": "-inf"} and got["ok"] == 1.5
    assert got["blob"] == {"base64": "AP8="}
    assert got["mixed"] == {"map": [[{"base64": "AP8="}, 1], ["AP8=", 2], ["hex:00ff", 3]]}
    decoded = decode(got)
    assert math.isnan(decoded.pop("nan")) and decoded.pop("inf") == math.inf
    assert decoded == {k: v for k, v in value.items() if k not in ("nan", "inf")}

    items = strict(cli("scan", store_path, "--json").stdout)["items"]
    keys = [i["key"] for i in items]
    assert {"base64": "AP8="} in keys and "hex:00ff" in keys and "v" in keys
    hist = strict(cli("history", store_path, "hex:00ff", "--json").stdout)
    assert hist["key"] == {"base64": "AP8="} and hist["versions"][0]["value"] == "bytes key"
    log = strict(cli("log", store_path, "--json").stdout)["transactions"][0]
    assert log["meta"] == {"score": {"float": "nan"}}
    assert sorted(log["keys"], key=json.dumps) == sorted(
        [{"base64": "AP8="}, "hex:00ff", "v"], key=json.dumps)
    strict(cli("dump", store_path, "--json").stdout)
    strict(cli("stats", store_path, "--json").stdout)
    strict(cli("verify", store_path, "--json").stdout)


def test_a_str_keyed_map_that_looks_like_a_tag_is_escaped():
    for d in ({"base64": "AP8="}, {"float": "nan"}, {"map": []}):
        out = jsonable(d)
        assert out == {"map": [[k, v] for k, v in d.items()]}
        assert decode(out) == d
    assert jsonable({"base64": "x", "other": 1}) == {"base64": "x", "other": 1}
    assert jsonable(b"\x01") != jsonable({"base64": "AQ=="})


def test_json_text_refuses_what_slipped_through():
    with pytest.raises(ValueError):
        json_text(math.nan)
    with pytest.raises(TypeError):
        jsonable(object())


_leaf = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
         | st.floats(allow_nan=False) | st.text() | st.binary())
_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8) | st.binary(max_size=4) | st.integers(-5, 5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_rendering_is_unambiguous_and_round_trips(value):
    text = json_text(jsonable(value))
    assert decode(strict(text)) == value


def test_put_refuses_non_json_constants_as_a_usage_error(store_path):
    for bad in ("NaN", "Infinity", "[1, -Infinity]", "{not json"):
        line = one_line(cli("put", store_path, "k", bad, code=2))
        assert "VALUE must be JSON" in line
    cli("get", store_path, "k", code=1)


def test_put_refuses_a_number_beyond_a_floats_range(store_path):
    """`put PATH k 1e400` stored Infinity (json reads an overflowing number as inf), though
    VALUE is strict JSON refusing NaN/Infinity (probe pr-docs): a one-line usage error."""
    for bad in ("1e400", "-1e400", "[1, 2e999]", '{"a": 1.5e309}'):
        line = one_line(cli("put", store_path, "k", bad, code=2))
        assert "VALUE must be JSON" in line and "beyond a float's range" in line
    cli("get", store_path, "k", code=1)
    p = run_proc("put", store_path, "k", "1e400", check_code=2)  # the real entry, once
    assert "beyond a float's range" in proc_one_line(p)
    cli("put", store_path, "k", "1.5e308")
    assert strict(cli("get", store_path, "k").stdout) == 1.5e308


def test_a_negative_number_that_get_printed_pastes_back_into_put(store_path):
    """README: what `get` printed pastes back into `put` as the same value; `put PATH k -5`
    failed "No such option '-5'" (probe pr-docs).  A negative number is a VALUE, before or
    after --tagged; a mistyped option beside it is still named as one.  (In process: the
    parsing is click's; one real process checks the console entry at the end.)"""
    for i, value in enumerate((-5, -0.5, -1.5e300, -7)):
        cli("put", store_path, f"k{i}", str(value))
        printed = cli("get", store_path, f"k{i}").stdout.strip()
        cli("put", store_path, f"t{i}", printed, "--tagged")
        cli("put", store_path, f"u{i}", "--tagged", printed)
        for key in (f"k{i}", f"t{i}", f"u{i}"):
            assert strict(cli("get", store_path, key).stdout) == value
    for args, wrong in ((["-5", "--tagd"], "--tagd"), (["--bogus", "-5"], "--bogus"),
                        (["-x"], "-x")):
        r = cli("put", store_path, "k", *args, code=2)
        assert f"No such option '{wrong}'" in r.stderr, r.stderr
    r = cli("put", store_path, "k", "-5", "--tagged=x", code=2)
    assert "does not take a value" in r.stderr
    assert strict(cli("get", store_path, "k0").stdout) == -5
    for word in ("-05", "-5x", "-0x10", "-1,2"):  # (not JSON: click said "No such option")
        assert "VALUE must be JSON" in one_line(cli("put", store_path, "k", word, code=2))
    run_proc("put", store_path, "k9", "-9", check_code=0)  # the real entry point, once
    assert strict(run_proc("get", store_path, "k9", check_code=0).stdout) == -9


def test_put_of_an_unstorable_value_is_a_usage_error(store_path):
    line = one_line(cli("put", store_path, "k", str(2**70), code=2))
    assert "cannot put 'k'" in line


# ---- 4. naming keys -------------------------------------------------------------------------
def test_parse_and_show_key_are_inverse():
    assert parse_key("hex:00ff") == b"\x00\xff" == parse_key("b64:AP8=")
    assert parse_key("str:hex:00ff") == "hex:00ff" and parse_key("0x00ff") == "0x00ff"
    assert parse_key("str:str:x") == "str:x" and parse_key("plain") == "plain"
    assert parse_key("hex:") == b"" and parse_key("HEX:00") == "HEX:00"
    for k in ("hex:00ff", "str:x", "b64:AP8=", "plain", "0xzz", b"\x00\xff", b"", "a b"):
        assert parse_key(show_key(k)) == k


def test_bytes_and_str_keys_round_trip_through_put_get_scan_history(store_path):
    cli("put", store_path, "hex:00ff", '"bytes"')
    cli("put", store_path, "str:hex:00ff", '"str hex"')
    cli("put", store_path, "0x00ff", '"str 0x"')
    cli("put", store_path, "b64:AAE=", '"bytes 2"')
    with walstore.open(store_path) as s:
        assert s[b"\x00\xff"] == "bytes" and s["hex:00ff"] == "str hex"
        assert s["0x00ff"] == "str 0x" and s[b"\x00\x01"] == "bytes 2"
    assert strict(cli("get", store_path, "b64:AP8=").stdout) == "bytes"
    assert strict(cli("get", store_path, "str:hex:00ff").stdout) == "str hex"
    human = cli("scan", store_path).stdout.splitlines()[1:]
    shown = {line.split()[0]: strict(line.split(None, 1)[1]) for line in human}
    assert shown == {"0x00ff": "str 0x", "hex:0001": "bytes 2", "hex:00ff": "bytes",
                     "str:hex:00ff": "str hex"}
    for key, value in shown.items():  # what is shown pastes back
        assert strict(cli("get", store_path, key).stdout) == value
        versions = strict(cli("history", store_path, key, "--json").stdout)["versions"]
        assert [v["value"] for v in versions] == [value]
    items = strict(cli("scan", store_path, "--json").stdout)["items"]
    assert {json.dumps(i["key"]): i["value"] for i in items} == {
        '"0x00ff"': "str 0x", '{"base64": "AAE="}': "bytes 2", '{"base64": "AP8="}': "bytes",
        '"hex:00ff"': "str hex"}
    cli("delete", store_path, "hex:00ff")
    with walstore.open(store_path) as s:
        assert b"\x00\xff" not in s and s["hex:00ff"] == "str hex"


def test_prefix_takes_the_key_syntax(store_path):
    cli("put", store_path, "hex:0001", "1")
    cli("put", store_path, "hex:0102", "2")
    cli("put", store_path, "str:hex:00", "3")
    items = strict(cli("scan", store_path, "--prefix", "hex:00", "--json").stdout)["items"]
    assert [i["key"] for i in items] == [{"base64": "AAE="}]
    items = strict(cli("scan", store_path, "--prefix", "str:hex:", "--json").stdout)["items"]
    assert [i["key"] for i in items] == ["hex:00"]


def test_an_empty_but_typed_prefix_keeps_its_type_as_the_api_does(store_path):
    """``--prefix str:`` is the str prefix '' (every str key, as ``store.scan(prefix="")``)
    and ``hex:``/``b64:`` the bytes prefix b'' (every bytes key, as ``prefix=b""``); a bare
    '' is no prefix, every key.  (Both typed ones listed str and bytes keys alike:
    probe-docs.)  The verbs whose prefix erases or limits an undo refuse an empty one, typed
    or not, as the core does (EmptyArgumentError): exit 2, nothing changed."""
    cli("put", store_path, "text", "1")
    cli("put", store_path, "hex:0072", "2")
    with walstore.open(store_path) as s:
        api_str = [k for k, _ in s.scan(prefix="")]
        api_bytes = [k for k, _ in s.scan(prefix=b"")]
    assert api_str == ["text"] and api_bytes == [b"\x00r"]

    def keys(*prefix: str) -> list:
        return [i["key"] for i in strict(cli("scan", store_path, *prefix, "--json").stdout)["items"]]
    assert keys("--prefix", "str:") == keys("--prefix", 'json:""') == ["text"]
    assert keys("--prefix", "hex:") == keys("--prefix", "b64:") == [{"base64": "AHI="}]
    assert keys("--prefix", "") == keys() == [{"base64": "AHI="}, "text"]
    for empty in ("", "str:", "hex:", "b64:"):
        assert "bad key" in one_line(cli("purge", store_path, empty, "--yes", code=2))
        assert "bad key" in one_line(cli("rewind", store_path, "--to", "tx:1", "--scope",
                                         empty, code=2))
    with walstore.open(store_path) as s:
        assert s["text"] == 1 and s[b"\x00r"] == 2


@pytest.mark.parametrize("bad", ["hex:zz", "hex:0", "hex:00 ff", "b64:AP8", "b64:!!!!",
                                 "b64:AP8=\n"])
def test_malformed_bytes_keys_are_usage_errors_everywhere(store_path, bad):
    for args in (["get", store_path, bad], ["put", store_path, bad, "1"],
                 ["delete", store_path, bad], ["history", store_path, bad],
                 ["scan", store_path, "--prefix", bad],
                 ["rewind", store_path, "--to", "p", "--scope", bad]):
        line = one_line(cli(*args, code=2))
        assert "bad key" in line and f"str:{bad.strip()}" in line
    with walstore.open(store_path) as s:
        assert list(s.scan()) == []  # nothing was written as a str key


# ---- 5. recover and actions name what is owed ------------------------------------------------
@pytest.fixture
def crashed_with_actions(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    s = walstore.open(path)
    tx = s.transaction()
    tx.put("order", "placed")
    with tx.action("charge", args={"amount": 40}, compensate="refund") as a1:
        a1.result = {"charge_id": "c1"}
    with tx.action("book", args={"room": 7}, compensate="cancel") as a2:
        pass
    s._drop_like_a_crash()
    (tmp_path / "ws_hard_failing.py").write_text(
        "def refund(action):\n    raise RuntimeError('gateway down')\n"
        "COMPENSATORS = {'refund': refund}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return path, a1, a2


def test_recover_lists_each_pending_action_in_detail(crashed_with_actions):
    path, a1, a2 = crashed_with_actions
    doc = strict(cli("recover", path, "--json", code=1).stdout)
    assert sorted(doc["pending_compensations"]) == sorted([a1.id, a2.id])
    rows = {r["id"]: r for r in doc["pending_actions"]}
    assert rows[a1.id]["name"] == "charge" and rows[a1.id]["compensate"] == "refund"
    assert rows[a2.id]["name"] == "book" and rows[a2.id]["compensate"] == "cancel"
    assert {r["state"] for r in rows.values()} == {"pending"}
    assert {r["reason"] for r in rows.values()} == {"no-compensator"}
    # a compensator that keeps failing is told apart from one never registered
    doc = strict(cli("recover", path, "--handlers", "ws_hard_failing", "--json", code=1).stdout)
    rows = {r["id"]: r for r in doc["pending_actions"]}
    assert (rows[a1.id]["state"], rows[a1.id]["reason"]) == ("failed", "failed")
    assert "RuntimeError: gateway down" in rows[a1.id]["error"]
    assert (rows[a2.id]["state"], rows[a2.id]["reason"]) == ("pending", "no-compensator")
    out = cli("recover", path, code=1).stdout
    line1 = next(x for x in out.splitlines() if x.startswith(a1.id + " "))
    line2 = next(x for x in out.splitlines() if x.startswith(a2.id + " "))
    assert "charge" in line1 and "refund" in line1 and "failed" in line1
    assert "gateway down" in line1
    assert "book" in line2 and "cancel" in line2 and "no compensator registered" in line2
    header = next(x for x in out.splitlines() if x.startswith("ID "))
    assert header.split() == ["ID", "TXID", "NAME", "COMPENSATOR", "STATE", "LAST", "ERROR"]
    assert line1.index("charge") == header.index("NAME") == line2.index("book")


def test_actions_shows_the_same_detail(crashed_with_actions):
    path, a1, a2 = crashed_with_actions
    cli("recover", path, "--handlers", "ws_hard_failing", code=1)
    doc = strict(cli("actions", path, "--pending", "--json", code=1).stdout)
    rows = {r["id"]: r for r in doc["actions"]}
    # (a listing cannot know what the application registers: not-run, audit55)
    assert (rows[a1.id]["reason"], rows[a2.id]["reason"]) == ("failed", "not-run")
    assert rows[a1.id]["result"] == {"charge_id": "c1"}
    out = cli("actions", path, code=0).stdout
    assert "failed after" in out and "with compensator 'cancel' registered" in out
    cli("resolve", path, a1.id)
    cli("resolve", path, a2.id)
    doc = strict(cli("actions", path, "--json").stdout)
    assert {r["state"] for r in doc["actions"]} == {"resolved"}
    assert {r["reason"] for r in doc["actions"]} == {None}


# ---- 6. demo ---------------------------------------------------------------------------------
def test_demo_refuses_an_existing_non_empty_path(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(_engine, "run_demo", lambda p: ran.append(p) or 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "user-data").write_text("precious")
    (tmp_path / "afile").write_text("x")
    for p in (tmp_path / "full", tmp_path / "afile"):
        line = one_line(cli("demo", str(p), code=2))
        assert "exists and is not an empty directory" in line
    assert ran == [] and (tmp_path / "full" / "user-data").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    cli("demo", str(tmp_path / "empty"))
    cli("demo", str(tmp_path / "new"))
    assert ran == [str(tmp_path / "empty"), str(tmp_path / "new")]


def test_demo_refuses_an_existing_store(store_path):
    cli("put", store_path, "mine", "1")
    one_line(cli("demo", store_path, code=2))
    assert strict(cli("scan", store_path, "--json").stdout)["items"] == [
        {"key": "mine", "value": 1}]


# ---- 7. --handlers ----------------------------------------------------------------------------
def test_handlers_module_without_compensators_is_a_usage_error(store_path, tmp_path,
                                                               monkeypatch):
    (tmp_path / "ws_hard_list.py").write_text("COMPENSATORS = ['refund']\n")
    (tmp_path / "ws_hard_raises.py").write_text("raise RuntimeError('broken module')\n")
    (tmp_path / "ws_hard_notcallable.py").write_text("COMPENSATORS = {'refund': 3}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {"json": "has no COMPENSATORS dict", "ws_hard_list": "has no COMPENSATORS dict",
             "ws_hard_missing": "cannot import it (ModuleNotFoundError",
             "ws_hard_raises": "cannot import it (RuntimeError: broken module)",
             "ws_hard_notcallable": "must map names (str) to functions"}
    for module, expect in cases.items():
        for args in (["recover", store_path], ["rewind", store_path, "--to", "tx:1"],
                     ["revert", store_path, "1"], ["rollback-prepared", store_path, "g"]):
            line = one_line(cli(*args, "--handlers", module, code=2))
            assert f"--handlers {module}:" in line and expect in line


# ---- 8. backup --------------------------------------------------------------------------------
def test_backup_refuses_its_own_source_or_a_place_inside_it(store_path, tmp_path):
    cli("put", store_path, "k", "1")
    os.symlink(os.path.join(store_path, "wal"), tmp_path / "link")
    for dest in (store_path, store_path + "/", os.path.join(store_path, "copy"),
                 os.path.join(store_path, "wal", "deeper", "copy"), str(tmp_path / "link"),
                 os.path.join(store_path, "..", "s")):
        line = one_line(cli("backup", store_path, dest, code=2))
        assert "is the store" in line and "lies inside it" in line
    assert sorted(os.listdir(store_path)) == sorted(["LOCK", "PURGES", "STORE", "VISIBLE", "db",
                                                     "wal"])
    doc = strict(cli("backup", store_path, store_path + "2", "--json").stdout)  # a sibling
    assert doc
    with walstore.open(store_path + "2") as copy:
        assert copy["k"] == 1


# ---- 9. points ------------------------------------------------------------------------------
def test_parse_point():
    assert parse_point("tx:5") == 5 and type(parse_point("tx:5")) is int
    assert parse_point("lsn:7") == 7 and isinstance(parse_point("lsn:7"), walstore.LSN)
    assert parse_point("12") == 12 and type(parse_point("12")) is int
    assert parse_point("before-refactor") == "before-refactor"
    assert parse_point("-3") == "-3" and parse_point("txt:1") == "txt:1"


@pytest.mark.parametrize("bad", ["tx:", "tx:x", "tx:-1", "lsn:", "lsn:1.5", "lsn: 3", ""])
def test_malformed_points_are_usage_errors(store_path, bad):
    line = one_line(cli("rewind", store_path, "--to", bad, code=2))
    assert "point" in line


def test_unknown_point_is_a_usage_error_in_one_line(store_path):
    cli("put", store_path, "k", "1")
    line = one_line(cli("rewind", store_path, "--to", "no-such-point", code=2))
    assert line.startswith("walstore: rewind failed: ") and "no-such-point" in line
    with walstore.open(store_path) as s:
        assert s["k"] == 1 and len(s.log()) == 1


def test_rewind_to_tx_and_lsn_points(store_path):
    with walstore.open(store_path) as s:
        with s.transaction() as t1:
            t1.put("a", 1)
        with s.transaction() as t2:
            t2.put("b", 2)
        with s.transaction() as t3:
            t3.put("c", 3)
    doc = strict(cli("rewind", store_path, "--to", f"tx:{t2.id}", "--json").stdout)
    assert doc["reverted"] == [t3.id]
    doc = strict(cli("rewind", store_path, "--to", f"lsn:{t1.lsn}", "--json").stdout)
    assert t2.id in doc["reverted"] and t1.id not in doc["reverted"]
    with walstore.open(store_path) as s:
        assert dict(s.scan()) == {"a": 1}


class _Plan:
    def __init__(self) -> None:
        self.transactions = [7, 5]
        self.keys = [b"\x00\xff", "agents/a/x"]
        self.compensations = [{"id": "7.1", "name": "charge", "compensate": "refund"}]


def test_rewind_passes_scope_and_dry_run(store_path, monkeypatch):
    calls = []
    real = walstore.Store.rewind

    def rewind(self, to, meta=None, scope=None, dry_run=False):
        calls.append({"to": to, "scope": scope, "dry_run": dry_run})
        if dry_run:
            return _Plan()
        return real(self, to, meta=meta)
    monkeypatch.setattr(walstore.Store, "rewind", rewind)
    cli("put", store_path, "agents/a/x", "1")
    doc = strict(cli("rewind", store_path, "--to", "lsn:0", "--scope", "agents/a/",
                     "--dry-run", "--json").stdout)
    assert calls[-1] == {"to": 0, "scope": "agents/a/", "dry_run": True}
    assert isinstance(calls[-1]["to"], walstore.LSN)
    assert doc == {"dry_run": True, "plan": {
        "transactions": [7, 5], "keys": [{"base64": "AP8="}, "agents/a/x"],
        "compensations": [{"id": "7.1", "name": "charge", "compensate": "refund"}]}}
    out = cli("rewind", store_path, "--to", "tx:1", "--scope", "hex:00", "--dry-run").stdout
    assert calls[-1] == {"to": 1, "scope": b"\x00", "dry_run": True}
    assert "nothing was changed" in out and "hex:00ff, agents/a/x" in out
    assert any(x.split() == ["7.1", "charge", "refund"] for x in out.splitlines())
    with walstore.open(store_path) as s:
        assert s["agents/a/x"] == 1  # a dry run changed nothing

    seen = []
    monkeypatch.setattr(walstore.Store, "rewind",
                        lambda self, to, **kw: seen.append(kw) or real(self, to))
    cli("rewind", store_path, "--to", "tx:1")
    assert seen == [{"scope": None, "dry_run": False}]  # no flags: the defaults


# ---- 10. human output --------------------------------------------------------------------------
def test_human_tables_are_aligned_and_one_row_per_line(store_path):
    with walstore.open(store_path) as s:
        with s.transaction() as tx:
            tx.put("a", "multi\nline")
            tx.put("a-much-longer-key", 1)
            tx.put(b"\x01", [1, 2])
    lines = cli("scan", store_path).stdout.splitlines()
    assert len(lines) == 4
    col = lines[0].index("VALUE")
    assert all(len(x) > col and x[col - 2:col] == "  " and x[col] != " " for x in lines[1:])


def test_progress_only_for_large_walks(capsys):
    from walstore.cli.output import PROGRESS_MIN_BYTES, progress_printer
    show = progress_printer("verify")
    show(10, 100)
    assert capsys.readouterr().err == ""
    for done in range(0, PROGRESS_MIN_BYTES + 1, PROGRESS_MIN_BYTES // 4):
        show(done, PROGRESS_MIN_BYTES)
    err = capsys.readouterr().err
    assert "verify:" in err and "(100%)" in err and err.endswith("\n")


# ---- a full disk and a read-only file system (real mounts) ---------------------------------
@pytest.fixture
def tmpfs(mount_tmpfs):
    """A 16 MiB tmpfs (a real full disk, remountable read-only; skipped where not permitted)."""
    return mount_tmpfs("16m")


def test_full_disk_gives_one_line_errors_and_keeps_earlier_commits(tmpfs):
    store = str(tmpfs / "s")
    run_proc("init", store, check_code=0)
    run_proc("put", store, "before", '"kept"', check_code=0)
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    for args in (["put", store, "after", '"x"'], ["recover", store],
                 ["init", str(tmpfs / "t")]):
        p = run_proc(*args, check_code=1)
        line = proc_one_line(p)
        assert line.startswith(f"walstore: {args[0]} failed: ")
        assert "No space left on device [ENOSPC]" in line and str(tmpfs) in line
    os.unlink(filler)
    run_proc("recover", store, check_code=0)
    assert strict(run_proc("get", store, "before", check_code=0).stdout) == "kept"
    run_proc("get", store, "after", check_code=1)


def test_read_only_file_system_gives_one_line_errors(tmpfs):
    store = str(tmpfs / "s")
    run_proc("init", store, check_code=0)
    run_proc("put", store, "k", '"v"', check_code=0)
    r = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {r.stderr.strip()}")
    for args in (["put", store, "k2", "1"], ["recover", store], ["checkpoint", store],
                 ["init", str(tmpfs / "t")], ["delete", store, "k"]):
        p = run_proc(*args, check_code=1)
        line = proc_one_line(p)
        assert line.startswith(f"walstore: {args[0]} failed: ")
        assert "Read-only file system [EROFS]" in line and str(tmpfs) in line
    # reading still works on a read-only file system
    assert strict(run_proc("get", store, "k", check_code=0).stdout) == "v"


# ---- a failing --json command still prints one JSON document ----------------------------
def test_a_failing_json_command_prints_one_error_document(store_path, tmp_path):
    """Scripts parse stdout: under --json a failure is {"error": {...}} there too (the one
    line stays on stderr), with the same exit status; a command that already printed its
    document (verify finding damage) prints no second one."""
    missing = str(tmp_path / "nope")
    for args, code, kind in ([("verify", missing, "--json"), 2, "NotAStore"],
                             [("stats", missing, "--json"), 2, "NotAStore"],
                             [("actions", missing, "--json"), 2, "NotAStore"],
                             [("dump", missing, "--json"), 2, "NotAStore"],
                             [("log", store_path, "--json", "--limit", "-1"), 2,
                              "UsageError"],
                             [("history", store_path, "hex:0", "--json"), 2, "UsageError"],
                             [("rewind", store_path, "--to", "lsn:-1", "--json"), 2,
                              "UsageError"]):
        r = CliRunner().invoke(main, list(args))
        assert r.exit_code == code, (args, r.output)
        assert "Traceback" not in r.output
        doc = json.loads(r.stdout)
        if kind == "UsageError":  # click's own, or a malformed key/point: before the run
            assert doc["error"]["exit"] == 2 and doc["error"]["type"] == kind, doc
            continue
        assert doc["error"]["exit"] == code and doc["error"]["type"] == kind, doc
        assert doc["error"]["command"] == args[0] and "nope" in doc["error"]["message"]
        assert "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the same command without --json prints nothing on stdout
    r = CliRunner().invoke(main, ["verify", missing])
    assert r.exit_code == 2 and r.stdout == ""
    # a good run after a failed one in the same process is unaffected
    ok = CliRunner().invoke(main, ["stats", store_path, "--json"])
    assert ok.exit_code == 0 and "error" not in json.loads(ok.stdout)


# ---- an undo that leaves compensations owed exits 1 and names them ----------------------
HANDLERS_MODULE = '''
import json
def refund(action):
    with open(action.args["ledger"], "a") as f:
        f.write(json.dumps({"refund": action.id}) + "\\n")
COMPENSATORS = {"refund": refund}
'''


@pytest.mark.parametrize("verb", ["revert", "rewind", "rollback-prepared"])
def test_an_undo_leaving_compensations_owed_exits_1_naming_them(store_path, tmp_path, verb):
    """Without the compensator (no --handlers) the undo commits but the refund stays
    owed: exit 1 and the action listed (human and --json); with --handlers it runs and
    the command exits 0.  (It used to print success and exit 0.)"""
    ledger = tmp_path / "ledger.jsonl"

    def charged_store(gid=None):
        s = walstore.open(store_path)
        if verb == "rewind":
            s.restore_point("p")
        tx = s.transaction()
        with tx.action("charge", args={"ledger": str(ledger)}, compensate="refund"):
            pass
        tx.put("paid", 1)
        if gid:
            tx.prepare(gid)
        else:
            tx.commit()
        txid = tx.id
        s.close()
        return txid
    gid = "g1" if verb == "rollback-prepared" else None
    txid = charged_store(gid)
    args = {"revert": ["revert", store_path, str(txid)],
            "rewind": ["rewind", store_path, "--to", "p"],
            "rollback-prepared": ["rollback-prepared", store_path, "g1"]}[verb]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert f"{txid}.1" in r.stdout and "pending compensations" in r.stdout
    with walstore.open(store_path) as s:
        assert [a.id for a in s.pending_compensations()] == [f"{txid}.1"]
        for a in s.pending_compensations():
            s.resolve(a.id)
    if verb == "rollback-prepared":
        return
    # with the compensator: it runs, exit 0, nothing owed (JSON says so)
    mod = tmp_path / "refunds_mod.py"
    mod.write_text(HANDLERS_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        txid = charged_store()
        args = {"revert": ["revert", store_path, str(txid)],
                "rewind": ["rewind", store_path, "--to", "p"]}[verb]
        r = CliRunner().invoke(main, args + ["--handlers", "refunds_mod", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["pending_actions"] == []
        assert f'"refund": "{txid}.1"' in ledger.read_text()
    finally:
        sys.path.remove(str(tmp_path))


def test_an_open_failing_on_a_full_disk_lets_go_of_the_lock(tmpfs):
    """A new store's open on a full disk fails (StoreIOError, ENOSPC) after taking the
    writer lock: the lock must be let go, so the same process opens the store once space
    is freed (it stayed StoreLocked 'by another process', naming nobody, for the life of
    the process)."""
    path = str(tmpfs / "new")
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\1" * (1 << 20))
        except OSError:
            pass
    with pytest.raises(walstore.WalstoreError):
        walstore.open(path)
    filler.unlink()
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    with walstore.open(path) as s:
        assert s.get("k") == 1


# ---- a dry run or a refusal changes nothing, even on a crashed store ---------------------------
@pytest.fixture
def crashed_mid_action(tmp_path, monkeypatch):
    """A store whose writer crashed inside an action (its transaction a loser, its refund
    owed), with a restore point before it, and a --handlers module that logs each refund."""
    path = str(tmp_path / "s")
    ledger = tmp_path / "refunds.log"
    (tmp_path / "crash_refunds.py").write_text(
        f"def refund(action):\n    with open({str(ledger)!r}, 'a') as f:\n"
        f"        f.write(action.id + '\\n')\nCOMPENSATORS = {{'refund': refund}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = walstore.open(path)
    with s.transaction() as tx:
        tx.put("a", 1)
    s.restore_point("p")
    with s.transaction() as tx:
        tx.put("a", 2)
    tx = s.transaction()
    tx.put("a", 3)
    with tx.action("charge", args={}, compensate="refund") as act:
        pass
    s._drop_like_a_crash()
    return path, ledger, tx.id, act.id


def test_a_dry_run_or_a_refused_verb_on_a_crashed_store_runs_no_compensation(
        crashed_mid_action):
    """`rewind --dry-run --handlers M` recovered the store first, running the crashed
    transaction's refund for real, then printed "dry run: nothing was changed"; a refused
    `revert 999 --handlers M` did the same and exited 2; `walstore recover` then reported
    a clean store with no losers, so the operator never saw the refund.  `revert` and
    `rewind` (also --dry-run) now refuse a store that needs recovery (exit 1, naming
    `walstore recover`, which reports what it runs); the other verbs refuse what an
    argument names before their open recovers."""
    path, ledger, loser, action = crashed_mid_action
    line = one_line(cli("rewind", path, "--to", "p", "--dry-run", "--handlers",
                        "crash_refunds", code=1))
    assert "not shut down cleanly" in line and f"walstore recover {path}" in line
    doc = strict(cli("rewind", path, "--to", "p", "--dry-run", "--json", code=1).stdout)
    assert doc["error"]["type"] == "NeedsRecovery"
    for args in (["revert", path, "999"], ["revert", path, "2"], ["rewind", path, "--to", "p"],
                 ["rewind", path, "--to", "no-such-point"]):
        line = one_line(cli(*args, "--handlers", "crash_refunds", code=1))
        assert f"walstore recover {path}" in line and "nothing was changed" in line
    cli("resolve", path, "9.9", code=2)
    cli("commit-prepared", path, "no-such-gid", code=2)
    cli("rollback-prepared", path, "no-such-gid", "--handlers", "crash_refunds", code=2)
    assert not ledger.exists()  # no refund ran
    doc = strict(cli("recover", path, "--handlers", "crash_refunds", "--json").stdout)
    assert doc["losers"] == [loser] and doc["compensated"] == [action]  # recover saw it
    assert ledger.read_text() == f"{action}\n"
    # recovered: the dry run plans, and changes nothing
    doc = strict(cli("rewind", path, "--to", "p", "--dry-run", "--handlers", "crash_refunds",
                     "--json").stdout)
    assert doc["dry_run"] is True and doc["plan"]["keys"] == ["a"]
    with walstore.open(path) as s:
        assert s["a"] == 2


def test_revert_and_the_2pc_verbs_report_the_class_of_what_names_nothing(tmp_path):
    """`revert --json` of an unknown or trimmed txid said "type": "UsageError" with no
    "revert failed:" prefix, where `rewind` said UnknownPoint / TrimmedOrUnknownPoint for
    the same txid (README: ``type`` is the exception's class); `resolve`,
    `commit-prepared` and `rollback-prepared` lacked the prefix too.  Exit 2 stays."""
    path = str(tmp_path / "s")
    with walstore.open(path, retain_transactions=2) as s:
        for i in range(10):
            with s.transaction() as tx:
                tx.put("k", i)
        s.checkpoint()
    for txid, kind in (("3", "TrimmedOrUnknownPoint"), ("999", "UnknownPoint")):
        r = cli("revert", path, txid, "--json", code=2)
        err = strict(r.stdout)["error"]
        assert err["type"] == kind and err["exit"] == 2
        assert err["message"].startswith("revert failed: ")
        rewound = strict(cli("rewind", path, "--to", f"tx:{txid}", "--json", code=2).stdout)
        assert rewound["error"]["type"] == kind
    for args in (["resolve", path, "9.9"], ["commit-prepared", path, "no-such-gid"],
                 ["rollback-prepared", path, "no-such-gid"]):
        line = one_line(cli(*args, code=2))
        assert line.startswith(f"walstore: {args[0]} failed: "), line


def test_files_and_diff_on_a_crashed_store_do_not_say_no_file_changed(tmp_path):
    """A writer killed after a committed file write that LMDB did not hold yet: `walstore
    files` and `diff` (read-only) said no file changed, reading the file history without
    the check ``store.at(p).files(ws)`` makes.  They refuse the same way (ReadOnlyError:
    not readable yet, exit 1); after recovery they list it."""
    path, ws = str(tmp_path / "s"), tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("original\n")
    child = ("import sys, time, walstore\n"
             "s = walstore.open(sys.argv[1], apply_interval=60)\n"
             "w = s.workspace(sys.argv[2])\n"
             "with s.transaction() as tx: tx.files(w).write('a.txt', 'committed\\n')\n"
             "s.restore_point('after')\n"
             "print('committed', flush=True); time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    p = subprocess.Popen([sys.executable, "-c", child, path, str(ws)],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "committed"
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    for args in (["files", path, "--at", "after"], ["files", path],
                 ["diff", path, "--from", "lsn:0", "--to", "after"]):
        r = cli(*args, "--json", code=1)
        assert strict(r.stdout)["error"]["type"] == "ReadOnlyError"
        assert "not readable" in one_line(r)
    cli("recover", path)
    doc = strict(cli("files", path, "--at", "after", "--json").stdout)
    assert [f["path"] for w in doc["workspaces"] for f in w["files"]] == ["a.txt"]
    doc = strict(cli("diff", path, "--from", "lsn:0", "--to", "after", "--json").stdout)
    assert [f["path"] for f in doc["files"]] == [str(ws / "a.txt")]


@pytest.mark.parametrize("command", ["verify", "recover", "stats"])
def test_a_damaged_store_file_is_a_problem_found_not_a_usage_error(store_path, tmp_path,
                                                                    command):
    """A torn STORE file in a store's directory exited 2 (usage) like a path that names no
    store; damage is exit 1.  A directory holding no store at all stays 2."""
    ident = os.path.join(store_path, "STORE")
    text = open(ident).read()
    with open(ident, "w") as f:
        f.write(text[:len(text) // 2])
    r = cli(command, store_path, code=1)
    assert "STORE is damaged" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    cli(command, str(tmp_path / "other"), code=2)


def _console_script() -> list[str]:
    """The installed ``walstore`` script (its own directory on sys.path, not the current
    one), else the same through ``python -I`` (no current directory on sys.path)."""
    script = os.path.join(os.path.dirname(sys.executable), "walstore")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-I", "-c", "import sys; from walstore.cli import main; "
            "sys.exit(main())"]


@pytest.mark.parametrize("how", ["module", "file"])
def test_handlers_module_in_the_current_directory_is_found(tmp_path, how):
    """``walstore recover store --handlers myhandlers`` run where myhandlers.py lives: the
    console script could not import it (only ``python -m walstore`` could), so the
    compensation a killed writer owed stayed owed and the command exited 2."""
    (tmp_path / "myhandlers.py").write_text(
        "def unsend(a):\n    open('ran.txt', 'a').write(a.id + '\\n')\n"
        "COMPENSATORS = {'unsend': unsend}\n")
    code = ("import os, walstore\ns = walstore.open('store')\ntx = s.transaction()\n"
            "tx.put('x', 1)\nwith tx.action('email', compensate='unsend'):\n    pass\n"
            "os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == -9
    r = subprocess.run([*_console_script(), "recover", "store"], cwd=tmp_path,
                       capture_output=True, text=True)  # (no handlers: the refund is owed)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[-1] == "recovered; not settled: 1 compensation(s) owed"
    handlers = "myhandlers" if how == "module" else "./myhandlers.py"
    r = subprocess.run([*_console_script(), "recover", "store", "--handlers", handlers],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "ran.txt").read_text().split()) == 1
    with walstore.open(str(tmp_path / "store")) as s:
        assert [a.state for a in s.actions()] == ["compensated"]


def test_dump_takes_lsn_colon_n_and_actions_json_name_the_txid(tmp_path):
    """``dump --from lsn:N`` was a usage error (every other point argument takes it); the
    JSON of an action said ``tx`` where the Python ``Action`` and ``log --json`` say txid."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        tx = s.transaction()
        tx.put("k", 1)
        with tx.action("mail", compensate="unmail"):
            pass
        tx.commit()
        second = s.log()[-1].lsn
    whole = strict(cli("dump", path, "--json").output)["records"]
    tail = strict(cli("dump", path, "--from", f"lsn:{second}", "--json").output)["records"]
    assert tail == strict(cli("dump", path, "--from", str(second), "--json").output)["records"]
    assert 0 < len(tail) < len(whole)
    assert "not a log position" in one_line(cli("dump", path, "--from", "lsn:x", code=2))
    (act,) = strict(cli("actions", path, "--json").output)["actions"]
    assert act["txid"] == act["tx"] == tx.id


@settings(max_examples=60, deadline=None)
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4) | st.integers(0, 9),
                      kids, max_size=3), max_leaves=8))
@example(value={"0": None, "": None})  # (get sorts map keys: not the order put gave)
@example(value=-1)  # (a VALUE that looks like an option)
def test_get_output_pastes_back_through_put_tagged(tmp_path_factory, value):
    """``get`` prints bytes as {"base64": ...}; ``put`` stored that as a dict, and no form
    put a bytes value (or a map with int keys) from the command line: ``put --tagged``
    reads ``get``'s output back to the same value."""
    path = str(tmp_path_factory.mktemp("s") / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("v", value)
        stored = s.get("v")
    printed = cli("get", path, "v").output.strip()
    cli("put", "--tagged", path, "w", "--", printed)  # (-- : "-1" is no option)
    with walstore.open(path) as s:
        back = s.get("w")
    assert _same(back, stored), (back, stored)


def _same(a, b) -> bool:
    """Equal values, a NaN equal to a NaN and -0.0 told from 0.0 (a map's order aside:
    --json writes keys sorted)."""
    if isinstance(a, float) and isinstance(b, float):
        return repr(a) == repr(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_json_failure_names_the_exceptions_class(tmp_path, monkeypatch):
    """README: under --json a failure's ``type`` is the exception's class.  `replicas` and
    `restore` (every failure through the replication verbs' fail()), and `revert` /
    `rewind` "reverted, but <CompensationFailed>" said ``"type": null`` (probe pr-docs)."""
    missing, store = f"file://{tmp_path}/norepl", str(tmp_path / "s")
    rep = f"file://{tmp_path}/rep"
    (tmp_path / "bad_refunds.py").write_text(
        "def refund(action):\n    raise RuntimeError('the bank is down')\n"
        "COMPENSATORS = {'refund': refund}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with walstore.open(store, replicate_to=rep) as s:
        for i in range(3):
            with s.transaction() as tx:
                tx.put("k", i)
                with tx.action("charge", args={}, compensate="refund"):
                    pass
        s.sync_replica(timeout=60)
    cases = [
        (["replicas", missing], 1, "ReplicationError"),
        (["replicas", "file:relative/dir"], 2, "ReplicationError"),
        (["restore", missing, str(tmp_path / "d1")], 1, "ReplicationError"),
        (["restore", rep, str(tmp_path / "d2"), "--to", "no-such-point"], 2,
         "UnknownRestorePoint"),
        (["restore", rep, str(tmp_path / "d3"), "--follow", "--to", "tx:1"], 2, "UsageError"),
        (["restore", rep, store], 2, "ReplicationError"),  # DEST taken: a usage error (exit 2)
        (["replicate", str(tmp_path / "nope"), rep, "--once"], 2, "NotAStore"),
        (["replicate", store, rep, "--once", "--retention", "-1"], 2, "ValueError"),
        (["revert", store, "3", "--handlers", "bad_refunds"], 1, "CompensationFailed"),
        (["rewind", store, "--to", "tx:1", "--handlers", "bad_refunds"], 1,
         "CompensationFailed"),
    ]
    for args, code, kind in cases:
        r = cli(*args, "--json", code=code)
        err = strict(r.stdout)["error"]
        assert (err["type"], err["exit"]) == (kind, code), (args, err)
        assert err["command"] == args[0] and err["message"] == one_line(r)[len("walstore: "):]
        if kind == "CompensationFailed":  # (the undo committed; its compensation failed)
            assert ", but " in err["message"] and "the bank is down" in err["message"]


# ---- Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_is_one_line_exit_130_and_a_json_document(store_path, monkeypatch, as_json):
    """Ctrl-C of a verb: click said "Aborted!", exit 1 (`verify`'s "damage found"), with no
    JSON document under --json, and the open progress line took the next output on it
    (probe probe-ops).  Now one line after the progress line, exit 130, and the error
    document with type KeyboardInterrupt."""
    def interrupted_walk(path, progress=None, blob_progress=None, *lmdb_phases):
        if progress is not None:
            progress(40 << 20, 100 << 20)  # (a large log, 40% read)
        raise KeyboardInterrupt

    monkeypatch.setattr(_engine, "verify", interrupted_walk)
    r = cli("verify", store_path, *(["--json"] if as_json else []), code=130)
    lines = r.stderr.lstrip("\r").splitlines()  # (a progress line begins with a \r)
    assert lines[-1] == "walstore: verify interrupted (Ctrl-C)", r.stderr
    assert "Aborted" not in r.output
    if as_json:
        assert strict(r.stdout) == {"error": {"command": "verify", "exit": 130, "type":
                                              "KeyboardInterrupt",
                                              "message": "verify interrupted (Ctrl-C)"}}
    else:
        assert len(lines) == 2 and "( 40%)" in lines[0], r.stderr  # (the progress, ended)
        assert r.stdout == ""


def test_backup_and_checkpoint_show_progress_on_a_large_store(tmp_path):
    """`backup` of a 2 GB store and `checkpoint` of an unclean one ran for tens of seconds
    without a word (CONTRACT 3: progress on long work; probe probe-ops).  Both show it now,
    on stderr, when the bytes pass the progress threshold, and end its line."""
    from walstore.cli.output import PROGRESS_MIN_BYTES
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40,
                      segment_size=16 << 20)
    blob = os.urandom((1 << 20) - 200)
    for i in range(PROGRESS_MIN_BYTES // (1 << 20) + 4):
        with s.transaction() as tx:
            tx.put(f"k{i % 8}", blob)
    s._drop_like_a_crash()  # (unclean: the next writable open recovers the whole log)
    r = cli("backup", path, str(tmp_path / "copy"))
    assert "\r" not in r.stderr  # (stderr no terminal: a line each, no carriage returns)
    shown = r.stderr.splitlines()
    assert shown and shown[-1].startswith("backup:") and "(100%)" in shown[-1], r.stderr
    assert r.stdout.strip()  # (its summary, on stdout)
    r = cli("checkpoint", path)
    assert "recover:" in r.stderr and r.stderr.endswith("\n"), r.stderr
    r = cli("checkpoint", path, "--json")  # (a document only: no progress under --json)
    assert r.stderr == "" and strict(r.stdout)


def test_a_progress_that_is_not_callable_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="progress= is a callable"):
        walstore.open(str(tmp_path / "s"), progress=123)
    assert not (tmp_path / "s").exists()
