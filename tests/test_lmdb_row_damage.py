"""Damage inside a row's bytes in LMDB's data file (its pages sound) is a CorruptionError
naming the table and the key, its cause chained: at open (an ``actions`` row in flight or
owed), at the read that needs the row (``get``, ``scan``, ``history``, ``log``,
``actions``), in ``walstore verify`` (which
lists every such row, history before-images too) and on the command line (one line, a
non-zero exit).  Found by a probe (2026-12-02): a raw ValueError / UnicodeDecodeError /
msgpack FormatError escaped ``walstore.open``, ``store.log()`` and the CLI ("an unexpected
error"), and ``walstore verify`` called a store with a damaged history row ok.

Real files: the store is made and closed, then bytes of one msgpack value are overwritten
in place with plain file writes (every copy LMDB keeps of them); the CLI runs in a
subprocess.  A store crashed with a compensation owed and a damaged settled ``actions`` row:
its open reads only the rows in flight or owed, so the owed compensation runs once and the
damage is met where the row is read (and by ``verify``)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import walstore


def _make(path: Path) -> None:
    s = walstore.open(str(path), durability="none")
    with s.transaction(meta={"note": "MARKERTXN0"}) as tx:
        tx.put("k1", "MARKERDATA")
        tx.put("k2", "MARKERHIST")
    with s.transaction() as tx:
        tx.put("k2", "newer")
        with tx.action("charge", args={"a": "MARKERACTN"}, compensate="refund"):
            pass
    s.close()


def _damage(path: Path, marker: bytes, how: str) -> int:
    """Overwrite every copy of ``marker`` in db/data.mdb: ``utf8`` makes the string invalid
    UTF-8, ``header`` makes the byte before it (its msgpack header) 0xc1, never used."""
    f = path / "db" / "data.mdb"
    data = bytearray(f.read_bytes())
    n, i = 0, data.find(marker)
    while i >= 0:
        if how == "utf8":
            data[i:i + 2] = b"\xff\xfe"
        else:
            data[i - 1] = 0xC1
        n += 1
        i = data.find(marker, i + 1)
    with open(f, "r+b") as fh:  # (in place: LMDB's pages and checksums-free layout stay)
        fh.write(data)
    return n


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=120)


def _assert_row_error(e: BaseException, table: str, key_text: str, store: Path) -> None:
    assert isinstance(e, walstore.CorruptionError), repr(e)
    msg = str(e)
    assert f"LMDB table {table!r}" in msg and key_text in msg and "does not decode" in msg, msg
    assert e.file == str(store.resolve() / "db" / "data.mdb")
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    assert root is not e and not isinstance(root, walstore.WalstoreError), repr(root)


# (marker, table, the text naming the row, what reads it)
CASES = {
    "data": (b"MARKERDATA", "data", "key 'k1'"),
    "hist": (b"MARKERHIST", "hist", "key 'k2' at LSN"),
    "txns": (b"MARKERTXN0", "txns", "txid 1"),
    "actions": (b"MARKERACTN", "actions", "action '2.1'"),
}


@pytest.mark.parametrize("how", ["utf8", "header"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_row_is_a_corruption_error_naming_table_and_key(tmp_path, case, how):
    marker, table, key_text = CASES[case]
    path = tmp_path / "s"
    _make(path)
    assert _damage(path, marker, how) >= 1
    if case == "actions":  # an open reads the rows in flight or owed (the ``owed``
        for _ in range(2):  # index), not a settled one: met at the read that needs it
            with walstore.open(str(path), durability="none") as s:
                assert s.pending_compensations() == []
                for read in (lambda: s.actions(), lambda: s.get_action("2.1")):
                    with pytest.raises(walstore.CorruptionError) as e:
                        read()
                    _assert_row_error(e.value, table, key_text, path)
        with walstore.open(str(path), readonly=True) as ro:  # (reads, owes nothing)
            with pytest.raises(walstore.CorruptionError) as e:
                ro.actions()
        _assert_row_error(e.value, table, key_text, path)
    else:
        readers = {"data": [lambda s: s.get("k1"), lambda s: s["k1"], lambda s: list(s.scan()),
                            lambda s: s.transaction().get("k1")],
                   "hist": [lambda s: s.history("k2")],
                   "txns": [lambda s: s.log()]}[case]
        with walstore.open(str(path), durability="none") as s:
            for read in readers:
                with pytest.raises(walstore.CorruptionError) as e:
                    read(s)
                _assert_row_error(e.value, table, key_text, path)
            if case != "data":
                assert s.get("k1") == "MARKERDATA"  # (the rest of the store reads)

    r = _cli("verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    errors = json.loads(r.stdout)["errors"]
    assert any(key_text in err and (table == "data" or f"LMDB table {table!r}" in err)
               for err in errors), errors

    command = {"data": ["get", str(path), "k1"], "hist": ["history", str(path), "k2"],
               "txns": ["log", str(path)], "actions": ["actions", str(path)]}[case]
    r = _cli(*command)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert len(lines) == 1 and "corruption" in lines[0] and key_text in lines[0], lines
    assert "unexpected error" not in lines[0], lines[0]


CHILD = textwrap.dedent("""
    import sys, time, walstore
    s = walstore.open(sys.argv[1], durability="full")
    tx = s.transaction()
    tx.put("k", 1)
    with tx.action("charge", args={"n": "inflight"}, compensate="refund"):
        print("ready", flush=True)
        time.sleep(60)
""")


def test_recovery_settles_what_is_owed_past_a_damaged_settled_row(tmp_path):
    """Crashed with a compensation owed, and another (settled) action's row damaged.  The
    open reads the rows in flight or owed (the ``owed`` index: CONTRACT 4.4, recovery's
    cost is the WAL's, not the store's), never the damaged one: the owed compensation
    runs, once; the damaged row is a CorruptionError naming it at the reads that need it
    (``get_action``, ``actions()``, ``walstore actions``) and ``walstore verify`` lists
    it.  (Before the index every open read every action row, and refused.)"""
    path = tmp_path / "s"
    _make(path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _damage(path, b"MARKERACTN", "header") >= 1
    calls = []
    for _ in range(2):
        with walstore.open(str(path), durability="none",
                           compensators={"refund": lambda a: calls.append(a.id)}) as s:
            assert s.get("k") is None and s.pending_compensations() == []
            for read in (lambda: s.get_action("2.1"), lambda: s.actions()):
                with pytest.raises(walstore.CorruptionError) as e:
                    read()
                _assert_row_error(e.value, "actions", "action '2.1'", path)
    assert len(calls) == 1 and calls[0] != "2.1"

    r = _cli("verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert any("action '2.1'" in err for err in json.loads(r.stdout)["errors"])

    r = _cli("actions", str(path))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert len(lines) == 1 and "corruption" in lines[0] and "action '2.1'" in lines[0]


# ---- u64 rows: ``bylsn``'s keys and txids, ``meta``'s counters ---------------------------
# Found by a review probe (2026-12-02): a u64 row of 3 bytes in place of 8 escaped as a raw
# struct.error ("unpack requires a buffer of 8 bytes") from ``walstore.open`` (``meta``'s
# ``next_txid``), ``store.log()`` (a ``bylsn`` txid), and ``walstore verify`` said ok.

def _shrink_u64(path: Path, key: bytes, value: bytes = b"", part: str = "value") -> int:
    """Make every copy in db/data.mdb of the LMDB leaf node ``key`` -> (an 8-byte ``value``,
    or any when b"") hold a 3-byte value (``part`` "value": the node's data size) or a
    3-byte key ("key": its key size) in place of 8, in place: the rest of the page as it
    was."""
    f = path / "db" / "data.mdb"
    data = bytearray(f.read_bytes())
    node = struct.pack("=HHHH", 8, 0, 0, len(key)) + key + value
    n, i = 0, data.find(node)
    while i >= 0:
        if part == "value":
            data[i:i + 2] = struct.pack("=H", 3)
        else:
            data[i + 6:i + 8] = struct.pack("=H", 3)
        n += 1
        i = data.find(node, i + 1)
    with open(f, "r+b") as fh:
        fh.write(data)
    return n


def _first_commit(path: Path) -> tuple[int, int]:
    with walstore.open(str(path), durability="none") as s:
        first = s.log()[-1]
    return int(first.lsn), first.txid


def _assert_u64_error(e: BaseException, table: str, key_text: str, what: str,
                      store: Path) -> None:
    _assert_row_error(e, table, key_text, store)
    assert f"{what} is 3 bytes where a u64 (8) belongs" in str(e), str(e)
    assert isinstance(e.__cause__, struct.error), repr(e.__cause__)


def _assert_verify_lists(path: Path, table: str, key_text: str, what: str) -> None:
    r = _cli("verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    errors = json.loads(r.stdout)["errors"]
    assert any(f"LMDB table {table!r}" in err and key_text in err and
               f"{what} is 3 bytes" in err for err in errors), errors
    r = _cli("verify", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert key_text in r.stdout + r.stderr, (r.stdout, r.stderr)


def _assert_cli_one_line(command: list, key_text: str) -> None:
    r = _cli(*command)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert len(lines) == 1 and "corruption" in lines[0] and key_text in lines[0], lines
    assert "unexpected error" not in lines[0], lines[0]


def test_a_damaged_bylsn_txid_is_a_corruption_error_naming_the_row(tmp_path):
    path = tmp_path / "s"
    _make(path)
    lsn, txid = _first_commit(path)
    assert _shrink_u64(path, struct.pack(">Q", lsn), struct.pack(">Q", txid)) >= 1
    key_text = f"LSN {lsn}"
    with walstore.open(str(path), durability="none") as s:
        with pytest.raises(walstore.CorruptionError) as e:
            s.log()
        _assert_u64_error(e.value, "bylsn", key_text, "its value", path)
        assert s.get("k1") == "MARKERDATA"
    _assert_verify_lists(path, "bylsn", key_text, "its value")
    _assert_cli_one_line(["log", str(path)], key_text)


def test_a_damaged_bylsn_key_is_a_corruption_error_and_verify_lists_it(tmp_path):
    path = tmp_path / "s"
    _make(path)
    lsn, txid = _first_commit(path)
    assert _shrink_u64(path, struct.pack(">Q", lsn), struct.pack(">Q", txid), "key") >= 1
    key_text = repr(struct.pack(">Q", lsn)[:3])  # (a key that is no LSN: its bytes)
    s = walstore.open(str(path), durability="none", retain_transactions=1)
    with pytest.raises(walstore.CorruptionError) as e:
        s.checkpoint()  # (retention reads the oldest commit's LSN)
    _assert_u64_error(e.value, "bylsn", key_text, "its key", path)
    with pytest.raises(walstore.CorruptionError) as e:
        s.close()  # (its checkpoint meets the row again; the store is let go all the same)
    _assert_u64_error(e.value, "bylsn", key_text, "its key", path)
    walstore.open(str(path), durability="none").close()  # (no retention: nothing reads it)
    _assert_verify_lists(path, "bylsn", key_text, "its key")


@pytest.mark.parametrize("name", ["next_txid", "applied"])
def test_a_damaged_meta_counter_is_a_corruption_error_naming_it(tmp_path, name):
    path = tmp_path / "s"
    _make(path)
    assert _shrink_u64(path, name.encode()) >= 1
    key_text = f"the row of {name!r}"
    for _ in range(2):  # (every open reads it; the failed one left nothing half done)
        with pytest.raises(walstore.CorruptionError) as e:
            walstore.open(str(path), durability="none")
        _assert_u64_error(e.value, "meta", key_text, "its value", path)
    _assert_verify_lists(path, "meta", key_text, "its value")
    _assert_cli_one_line(["checkpoint", str(path)], key_text)


# ---- keys made of parts: ``hist``, ``fsteps``, ``fversions``, ``fchanges`` ------------------
# Left alone at stop 34: a key of these tables whose parts do not add up to its length (a
# length prefix damaged in place) raised a raw struct.error from the code that split it,
# and ``walstore verify`` did not look at them.

def test_a_damaged_history_key_is_listed_by_verify(tmp_path):
    from walstore.codec import encode_key
    path = tmp_path / "s"
    _make(path)
    ek = encode_key("k2")
    prefix = struct.pack(">H", len(ek)) + ek
    f = path / "db" / "data.mdb"
    data = bytearray(f.read_bytes())
    n, i = 0, data.find(prefix)
    while i >= 0:  # (the length prefix says 7 bytes of key: its parts no longer add up)
        data[i:i + 2] = struct.pack(">H", len(ek) + 5)
        n += 1
        i = data.find(prefix, i + 1)
    assert n >= 1
    with open(f, "r+b") as fh:
        fh.write(data)
    r = _cli("verify", str(path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    errors = json.loads(r.stdout)["errors"]
    assert any("LMDB table 'hist'" in e and "does not decode" in e and
               "parts do not add up" in e for e in errors), errors
    with walstore.open(str(path), durability="none") as s:  # (the rest reads)
        assert s.get("k1") == "MARKERDATA"


@pytest.mark.parametrize("table", ["hist", "fsteps", "fversions", "fchanges"])
def test_every_split_of_a_key_made_of_parts_refuses_bytes_that_do_not_add_up(table):
    """Whatever bytes a damaged key holds, its split gives its parts or raises
    CorruptionError naming the table: never struct.error or parts that do not fill it."""
    import random

    from walstore.engine import tables
    split = tables.MULTIPART_KEYS[table]
    good = {"hist": tables.hist_key(b"\x01key", 7), "fsteps": tables.fsteps_key(3, 9),
            "fversions": tables.fversion_key(b"ws", b"a/b.txt", 11),
            "fchanges": tables.fchange_key(5, b"ws", b"a/b.txt")}[table]
    assert split(good)  # (a sound key splits)
    rng = random.Random(table)
    refused = 0
    for _ in range(3000):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 3)):  # a byte changed, cut off or added
            how = rng.randrange(3)
            if how == 0 and raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            elif how == 1 and raw:
                del raw[rng.randrange(len(raw)):]
            else:
                raw += bytes([rng.randrange(256)])
        try:
            parts = split(bytes(raw))
        except walstore.CorruptionError as e:
            assert f"LMDB table {table!r}" in str(e) and "does not decode" in str(e)
            refused += 1
            continue
        if table == "hist":
            assert tables.hist_key(*parts) == bytes(raw)
        elif table == "fsteps":
            assert tables.fsteps_key(*parts) == bytes(raw)
        elif table == "fversions":
            assert tables.fversion_key(*parts) == bytes(raw)
        else:
            assert tables.fchange_key(*parts) == bytes(raw)
    assert refused > 100
