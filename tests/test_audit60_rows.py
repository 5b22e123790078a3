"""Rows of a VALID LMDB file whose values decode but are no row walstore writes (probe-audit60).

``tests/test_lmdb_row_damage.py`` covers bytes that do not decode.  Here the bytes are
sound msgpack of the wrong shape: a str where a map belongs, an LSN that is a str, a
history row ``[txid]``, a restore point that is a list.  Before: ``store.log()``,
``at()``, ``history()``, ``actions()``, ``rewind(dry_run=True)`` and ``walstore log``
raised a raw TypeError / AttributeError / IndexError ("'str' object has no attribute
'get'"), and ``walstore verify`` said ok.  Now every row is checked as it is decoded
(``tables.unpack_row``): a CorruptionError naming the table and the row, ``verify``
lists it (exit 1), and nothing is compensated or written on the basis of such a row.

Real files: a store is built through the public API and closed, then one row is replaced
with the ``lmdb`` package; every reader runs in a child process with a timeout.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import msgpack
import pytest

import walstore
from walstore.engine.lmdb_state import TABLES

ROOT = str(Path(__file__).resolve().parents[1])
ENV = dict(os.environ, PYTHONPATH=ROOT)

BUILD = textwrap.dedent("""
    import os, sys, walstore
    path, root = sys.argv[1], sys.argv[2]
    s = walstore.open(path, durability="none", compensators={"refund": lambda a: None})
    with s.transaction(meta={"agent": "a"}) as tx:
        tx.put("k1", "v1"); tx.put("k2", {"x": 1})
    s.restore_point("rp1")
    with s.transaction() as tx:                                  # txid 2
        tx.put("k1", "v1b")
        with tx.action("charge", args={"n": 1}, compensate="refund") as a:
            a.result = {"id": "c1"}
    ws = s.workspace(root)
    with s.transaction() as tx:                                  # txid 3
        tx.files(ws).write("a.txt", "hello")
    tx = s.transaction(); tx.put("p", 1); tx.prepare("g1")
    s.close()
""")

# every public reader of the rows, each alone: "ok", "W:<walstore error>: <message>",
# or "X:<any other exception>" (what must never happen)
READERS = textwrap.dedent("""
    import json, resource, sys, walstore
    path, root = sys.argv[1], sys.argv[2]
    out = []
    def run(name, fn):
        try:
            r = fn()
            if hasattr(r, "__iter__") and not isinstance(r, (str, bytes, dict)):
                list(r)
            out.append([name, "ok"])
        except walstore.WalstoreError as e:
            out.append([name, f"W:{type(e).__name__}: {e}"])
        except BaseException as e:
            out.append([name, f"X:{type(e).__name__}: {e}"])
    calls = []
    s = walstore.open(path, durability="none",
                      compensators={"refund": lambda a: calls.append(a.id)})
    run("get", lambda: [s.get("k1"), list(s.scan())])
    run("history", lambda: [list(s.history("k1")), list(s.history("k2"))])
    run("log", lambda: [(t.txid, t.keys, t.actions, t.meta) for t in s.log()])
    run("actions", lambda: [(a.id, a.state) for a in s.actions()])
    run("get_action", lambda: s.get_action("2.1"))
    run("pending", lambda: s.pending_compensations())
    run("prepared", lambda: s.prepared())
    run("at", lambda: [s.at("rp1").get("k1"), s.at(2).get("k1"), list(s.at(1).scan())])
    run("at_files", lambda: s.at(3).files(root).read("a.txt"))
    run("rewind_dry", lambda: s.rewind("rp1", dry_run=True))
    run("revert", lambda: s.revert(2))
    run("close", lambda: s.close())
    # (VmHWM, this process's own peak: ru_maxrss survives exec, and read in a child of a
    # test worker grown to 500 MB it said 501)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"results": out, "compensated": calls, "peak_mb": hwm >> 10}))
""")


def _py(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("rows")
    path, root = d / "s", d / "ws"
    root.mkdir()
    r = _py("-c", BUILD, str(path), str(root))
    assert r.returncode == 0, r.stderr
    return path, root


def _copy(built, tmp_path) -> tuple[Path, Path]:
    path, root = built
    dest = tmp_path / "s"
    shutil.copytree(path, dest)
    return dest, root


def _put_row(path: Path, table: str, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(path / "db"), max_dbs=64, subdir=True, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(TABLES[table], txn=txn, create=False)
            assert txn.get(key, db=db) is not None, (table, key)  # (a row walstore wrote)
            txn.put(key, value, db=db)
    finally:
        env.close()


def _hist_key(path: Path, key: str) -> bytes:
    """The key of ``key``'s newest ``hist`` row that holds a before-image."""
    env = lmdb.open(str(path / "db"), max_dbs=64, subdir=True, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(TABLES["hist"], txn=txn, create=False)
            rows = [bytes(k) for k, v in txn.cursor(db=db)
                    if k[2:-8] == b"s" + key.encode() and msgpack.unpackb(v)[1] is not None]
    finally:
        env.close()
    return rows[-1]


P = msgpack.packb
TXID2 = struct.pack(">Q", 2)
# (table, row key (or a function of the store), bad value, the text naming the row,
#  the readers that must meet it as that row's CorruptionError)
CASES = {
    "txns-str": ("txns", TXID2, P("x"), "txid 2", {"log", "revert"}),
    "txns-lsn-str": ("txns", TXID2, P({"tx": 2, "lsn": "y", "end": 9, "w": []}), "txid 2",
                     {"log", "at", "revert"}),
    "txns-w-int": ("txns", TXID2, P({"tx": 2, "lsn": 0, "end": 9, "w": 5}), "txid 2",
                   {"log", "revert"}),
    "hist-short": ("hist", lambda p: _hist_key(p, "k1"), P([2]), "key 'k1' at LSN",
                   {"history", "at", "revert"}),
    "hist-int": ("hist", lambda p: _hist_key(p, "k1"), P(7), "key 'k1' at LSN",
                 {"history", "at", "revert"}),
    "points-list": ("points", b"rp1", P([1, 2, 3]), "'rp1'", {"at", "rewind_dry"}),
    "points-lsn-neg": ("points", b"rp1", P({"lsn": -1, "ts": 0.0}), "'rp1'",
                       {"at", "rewind_dry"}),
    "actions-str": ("actions", b"2.1", P("x"), "action '2.1'",
                    {"actions", "get_action", "log", "revert"}),
    "actions-wrong-types": ("actions", b"2.1", P({"id": 3, "tx": "x", "state": 5}),
                            "action '2.1'", {"actions", "get_action", "log", "revert"}),
    "fversions-dict": ("fversions", None, P({}), "", {"at_files"}),
    "twophase-str": ("twophase", b"p:g1", P("x"), "'p:g1'", set()),
}


def _fversions_key(path: Path) -> bytes:
    env = lmdb.open(str(path / "db"), max_dbs=64, subdir=True, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(TABLES["fversions"], txn=txn, create=False)
            return [bytes(k) for k, _v in txn.cursor(db=db) if b"a.txt" in k][-1]
    finally:
        env.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_row_of_the_wrong_shape_is_a_corruption_error_naming_it(built, tmp_path, case):
    table, key, value, key_text, readers = CASES[case]
    path, root = _copy(built, tmp_path)
    if table == "fversions":
        key = _fversions_key(path)
    elif callable(key):
        key = key(path)
    _put_row(path, table, key, value)

    if table == "twophase":  # (every open reads the prepared rows: the open refuses)
        r = _py("-c", "import sys, walstore\nwalstore.open(sys.argv[1])", str(path))
        assert r.returncode == 1 and "walstore.errors.CorruptionError" in r.stderr, r.stderr
        assert f"LMDB table {table!r}" in r.stderr and key_text in r.stderr, r.stderr
    else:
        r = _py("-c", READERS, str(path), str(root))
        assert r.returncode == 0, r.stderr[-2000:]
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        results = dict(doc["results"])
        escaped = {n: o for n, o in results.items() if o.startswith("X:")}
        assert not escaped, escaped  # (only walstore errors escape the public API)
        for name in readers:
            o = results[name]
            assert o.startswith("W:CorruptionError") and f"LMDB table {table!r}" in o \
                and key_text in o and "not a row walstore writes" in o, (name, o)
        if "revert" in readers:  # (refused: its compensation never ran on a bad row)
            assert doc["compensated"] == [], doc
        assert doc["peak_mb"] < 400, doc["peak_mb"]

    r = _py("-m", "walstore", "verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    errors = json.loads(r.stdout)["errors"]
    assert any(f"LMDB table {table!r}" in e and key_text in e and
               "not a row walstore writes" in e for e in errors), errors


def test_the_cli_names_the_row_in_one_line(built, tmp_path):
    path, _root = _copy(built, tmp_path)
    _put_row(path, "txns", TXID2, P({"tx": 2, "lsn": "y", "end": 9, "w": []}))
    for args in (["log", str(path)], ["log", str(path), "--json"],
                 ["rewind", str(path), "--to", "tx:1", "--dry-run"]):
        r = _py("-m", "walstore", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stdout, r.stderr)
        assert "corruption" in lines[0] and "LMDB table 'txns'" in lines[0] \
            and "txid 2" in lines[0] and "unexpected error" not in lines[0], lines


def test_the_rows_walstore_writes_pass_the_check(built, tmp_path):
    """Every row of a store written through the public API (history, actions, files,
    a prepared transaction, a restore point) passes: verify finds no error (its exit 1
    is the transaction left in doubt)."""
    path, _root = _copy(built, tmp_path)
    r = _py("-m", "walstore", "verify", str(path), "--json")
    assert json.loads(r.stdout)["errors"] == [], (r.stdout, r.stderr)
    from walstore.engine import tables
    env = lmdb.open(str(path / "db"), max_dbs=64, subdir=True, readonly=True, lock=False)
    seen = set()
    try:
        with env.begin() as txn:
            for table in tables.ROW_CHECKS:
                if not isinstance(table, str):
                    continue
                db = env.open_db(TABLES[table], txn=txn, create=False)
                for k, v in txn.cursor(db=db):
                    if table == "twophase" and not k.startswith(b"p:"):
                        continue
                    tables.unpack_row(bytes(v), table, bytes(k))
                    seen.add(table)
    finally:
        env.close()
    assert {"txns", "actions", "points", "hist", "fversions", "workspaces",
            "twophase"} <= seen, seen


# ---- LMDB's applied LSN past every byte of the log ----------------------------------------
# Found by this probe: a ``meta`` ``applied`` row of 8 bytes reading as a number past the
# end of the WAL.  A writable open and ``verify`` refuse it; a read-only open (``walstore
# get``, every read-only CLI verb) showed the LMDB state and exited 0 — and for a number
# past 2**63 raised a raw OverflowError from the follower's ``os.pread`` ("an unexpected
# error").  Now the read-only open refuses what its last segment's size already proves.

def _set_applied(path: Path, value: int) -> None:
    _put_row(path, "meta", b"applied", struct.pack(">Q", value))


@pytest.mark.parametrize("value", [(1 << 64) - 1, (1 << 63) + 12345, 1 << 40])
def test_an_applied_lsn_past_the_end_of_the_log_is_refused_by_a_read_only_open(
        built, tmp_path, value):
    path, _root = _copy(built, tmp_path)
    _set_applied(path, value)
    for readonly in (True, False):
        with pytest.raises(walstore.CorruptionError) as e:
            walstore.open(str(path), readonly=readonly)
        assert str(value) in str(e.value), str(e.value)
    r = _py("-m", "walstore", "get", str(path), "k1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, (r.stdout, r.stderr)
    assert "corruption" in lines[0] and str(value) in lines[0] \
        and "unexpected error" not in lines[0], lines
    r = _py("-m", "walstore", "verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert any(str(value) in e for e in json.loads(r.stdout)["errors"]), r.stdout


def test_a_log_read_past_2_to_the_63_reads_nothing(tmp_path):
    """The WAL's reader at an offset no file reaches: nothing, never an OverflowError
    (the follower of a store whose applied LSN is damaged reads there)."""
    from walstore.log.reader import FileBytes
    f = tmp_path / "seg"
    f.write_bytes(b"x" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        fb = FileBytes(fd, 100)
        for off in ((1 << 63) + 5, (1 << 64) + 7, 100, 10 ** 30):
            buf, i = fb.span(off, 28)
            assert buf[i:i + 28] == b""
        buf, i = fb.span(90, 28)  # (and what is there, still)
        assert buf[i:i + 28] == b"x" * 10
    finally:
        os.close(fd)


def _append_records(path: Path, bodies: list[tuple[int, dict]]) -> int:
    """Frame ``bodies`` with the log's own encoder after the last record of the newest
    segment of the (closed) store at ``path``; returns the LSN of the first."""
    from walstore.engine.layout import Layout
    from walstore.log.format import SEGMENT_HEADER_SIZE, encode_record, segment_salt
    from walstore.log.reader import LogReader
    store_id = Layout(str(path)).read_identity()
    reader = LogReader(str(path / "wal"), store_id)
    for _ in reader.walk():
        pass
    lsn = first = reader.end_lsn
    seg = sorted((path / "wal").glob("*.wal"))[-1]
    start = int(seg.name.split(".")[0])
    with open(seg, "r+b") as f:
        for rtype, body in bodies:
            rec = encode_record(segment_salt(store_id, start), rtype, lsn, lsn, P(body))
            f.seek(lsn - start + SEGMENT_HEADER_SIZE)
            f.write(rec)
            lsn += len(rec)
    return first


# ---- a salvage mode's given-up records are not REDOne as actions unless they are ones ----
# Found by the row checks above (tests/test_audit56_operator.py intent-id-x): recovery in
# a salvage mode REDOes the actions of given-up records (their intents were durable, so
# they may have run: ``Recovery._owe_given_up``) — including the bad payload it cut the
# log at.  A crafted ACTION_INTENT whose id is "x" became an owed action row "x" in LMDB,
# which no reader takes (every open after the recovery refused).  Now a given-up record
# whose fields fail ``records.check_fields`` is counted as given up, never REDOne.

def test_a_cut_bad_payload_is_not_redone_as_an_owed_action(built, tmp_path):
    from walstore.log.format import RecordType as T
    path, _root = _copy(built, tmp_path)
    _append_records(path, [(T.ACTION_INTENT, {"tx": 50, "id": "x", "name": "n",
                                              "compensate": "refund"})])
    r = _py("-m", "walstore", "recover", str(path), "--mode", "tolerate-tail", "--json")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["refused"] is not True, r.stdout
    env = lmdb.open(str(path / "db"), max_dbs=64, subdir=True, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(TABLES["actions"], txn=txn, create=False)
            assert txn.get(b"x", db=db) is None
    finally:
        env.close()
    calls = []
    with walstore.open(str(path), durability="none",
                       compensators={"refund": lambda a: calls.append(a.id)}) as s:
        assert [a.id for a in s.actions()] == ["2.1"] and s.get("k1") == "v1b"
    assert calls == []


# ---- WAL records whose CRC holds but whose fields have the wrong type ---------------------
# Found by this probe (records framed with the log's own ``encode_record`` after the end of
# a closed store's log): an ACTION_INTENT whose ``compensate`` is an int, a COMPENSATED
# whose ``attempts`` is a str, a RESTORE_POINT whose ``ts`` is a str, a PREPARE whose ``r``
# is an int, a COMMIT whose ``rewound_to`` is a str passed recovery's checks and were
# REDOne into LMDB rows no reader could take: the open that applied them failed, and every
# open after it (before the row checks: raw TypeErrors).  Now ``records.check_fields``
# refuses them as the bad payloads they are: strict recovery names the record (file,
# offset, LSN) and changes nothing; ``skip-corrupt`` skips it.

def _bad_records():
    from walstore.log.format import RecordType as T
    return {
        "intent-compensate-int": [(T.ACTION_INTENT, {"tx": 50, "id": "50.1", "name": "n",
                                                     "args": None, "compensate": 7,
                                                     "key": "k", "ts": 1.0}),
                                  (T.ABORT, {"tx": 50})],
        "compensated-attempts-str": [(T.COMPENSATED, {"id": "2.1", "state": "compensated",
                                                      "attempts": "x"})],
        "compensated-state-unknown": [(T.COMPENSATED, {"id": "2.1", "state": "bogus"})],
        "restore-point-ts-str": [(T.RESTORE_POINT, {"name": "r2", "ts": "x"})],
        "prepare-r-int": [(T.PREPARE, {"gid": "g2", "tx": 50, "w": [], "r": 5, "rr": [],
                                       "extra": {}, "ts": 1.0, "meta": None,
                                       "actions": []})],
        "commit-rewound-to-str": [(T.COMMIT, {"tx": 50, "ts": 1.0, "meta": None, "w": [],
                                              "rewound_to": "x"})],
        "commit-action-tx-str": [(T.COMMIT, {"tx": 50, "ts": 1.0, "meta": None, "w": [],
                                             "actions": [{"id": "50.1", "tx": "q"}]})],
        # (stop 78: a str, not a list of str -- ``"openai-run" in tags`` matched a part)
        "commit-tags-str": [(T.COMMIT, {"tx": 50, "ts": 1.0, "meta": None, "w": [],
                                        "tags": "openai-run"})],
    }


@pytest.mark.parametrize("case", ["intent-compensate-int", "compensated-attempts-str",
                                  "compensated-state-unknown", "restore-point-ts-str",
                                  "prepare-r-int", "commit-rewound-to-str",
                                  "commit-action-tx-str", "commit-tags-str"])
def test_a_wal_record_with_fields_of_the_wrong_type_is_a_bad_payload(built, tmp_path, case):
    path, _root = _copy(built, tmp_path)
    lsn = _append_records(path, _bad_records()[case])
    data = (path / "db" / "data.mdb").read_bytes()
    for _ in range(2):  # (refused, and nothing applied: the next open refuses the same)
        with pytest.raises(walstore.CorruptionError) as e:
            walstore.open(str(path), durability="none")
        assert "bad payload" in str(e.value) and e.value.lsn == lsn, str(e.value)
        assert e.value.file and e.value.file.endswith(".wal"), e.value.file
    assert (path / "db" / "data.mdb").read_bytes() == data
    r = _py("-m", "walstore", "verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert any(f"LSN {lsn}" in e for e in json.loads(r.stdout)["errors"]), r.stdout
    r = _py("-m", "walstore", "recover", str(path), "--mode", "skip-corrupt")
    assert "Traceback" not in r.stderr, r.stderr
    with walstore.open(str(path), durability="none") as s:  # (the rest reads)
        assert s.get("k1") == "v1b" and [t.txid for t in s.log()][-1] == 1
        s.actions(), s.prepared(), s.at("rp1").get("k1")


def test_the_log_and_the_rows_know_the_same_action_states():
    from walstore.engine import tables
    from walstore.log import records
    assert records.ACTION_STATES == tables._ACTION_STATES


def test_a_damaged_row_met_by_the_commits_range_walk_is_a_corruption_error(tmp_path):
    """The commit of a transaction that scanned reads the rows of the commits applied to
    LMDB since its snapshot (``ConflictChecker._walk``, on the commit path: it decodes
    them without the row check and uses them inside a try).  A row there that is no
    row walstore writes is the row's CorruptionError, and nothing is committed."""
    path = tmp_path / "s"
    s = walstore.open(str(path), durability="none")
    try:
        with s.transaction() as tx:
            tx.put("p/a", 1)
        tx = s.transaction()
        assert [k for k, _v in tx.scan(prefix="p/")] == ["p/a"]
        with s.transaction() as other:
            other.put("q/x", 1)
        txid = s.log()[0].txid
        s.checkpoint()  # (applied: the walk reads it from LMDB)
        code = textwrap.dedent(f"""
            import lmdb, msgpack, struct
            env = lmdb.open({str(path / 'db')!r}, max_dbs=64, subdir=True, map_size=1 << 30)
            with env.begin(write=True) as t:
                db = env.open_db(b'txns', txn=t, create=False)
                k = struct.pack('>Q', {txid})
                assert t.get(k, db=db) is not None
                t.put(k, msgpack.packb({{'tx': {txid}, 'lsn': 5, 'end': 9, 'w': 5}}), db=db)
        """)
        r = _py("-c", code)  # (another process: LMDB's own locks let it write meanwhile)
        assert r.returncode == 0, r.stderr
        tx.put("p/b", 2)
        with pytest.raises(walstore.CorruptionError) as e:
            tx.commit()
        assert "LMDB table 'txns'" in str(e.value) and f"txid {txid}" in str(e.value)
        assert s.get("p/b") is None
    finally:
        s.close()
