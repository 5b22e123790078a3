"""An LSN moved by a number of bytes is still an LSN (a log position), never a txid.

``store.rewind(tx.lsn - 1)`` reads as "rewind to just before this commit"; while ``LSN - 1``
was a plain int it named the *transaction* with that number: the rewind undid (and
compensated) whatever came after some unrelated txid, or raised UnknownPoint.  The
distance between two LSNs stays a plain int."""
from __future__ import annotations

import pytest

import walstore
from walstore import LSN


@pytest.fixture
def store(tmp_path):
    refunds: list[str] = []
    s = walstore.open(str(tmp_path / "s"), durability="none",
                      compensators={"refund": lambda a: refunds.append(a.id)})
    s.refunds = refunds  # type: ignore[attr-defined]
    yield s
    s.close()


def test_lsn_arithmetic_keeps_the_kind():
    a = LSN(1000)
    assert type(a + 1) is LSN and a + 1 == 1001
    assert type(1 + a) is LSN and type(a - 1) is LSN and a - 1 == 999
    assert type(a - LSN(400)) is int and a - LSN(400) == 600  # a distance
    assert type(2000 - a) is int
    assert type(a * 2) is int and type(a + True) is int  # (only an int moves a position)


def test_rewind_to_just_before_a_commit_undoes_that_commit_and_no_other(store):
    txs = []
    for i in range(60):  # txids 1..60; the LSNs are byte positions, far larger
        with store.transaction() as tx:
            tx.put(f"k{i}", i)
        txs.append(tx)
    with store.transaction() as tx:
        tx.put("order", "charged")
        with tx.action("charge", compensate="refund"):
            pass
    charge = tx
    with store.transaction() as tx:
        tx.put("after", 1)
    before = charge.lsn - 1
    assert type(before) is LSN
    assert store.at(before).get("order") is None
    assert store.at(before).get("k59") == 59  # (the commit just before it is there)
    info = store.rewind(charge.lsn - 1)
    assert set(info.keys) == {"order", "after"}
    assert store.get("order") is None and store.get("k0") == 0 and store.get("k59") == 59
    assert len(store.refunds) == 1


def test_log_since_an_lsn_moved_by_bytes_stays_an_lsn(store):
    for i in range(4):
        with store.transaction() as tx:
            tx.put(f"k{i}", i)
    second = store.log(oldest_first=True)[1]
    newer = store.log(since=second.lsn + 1)  # (as an int: "after txid 64", which never was)
    assert [t.txid for t in newer] == [4, 3]


def test_files_json_names_the_kind_of_its_point(tmp_path):
    """``walstore files --at lsn:N --json`` and ``--at tx:N`` echoed the same bare number
    as "at": a script could not tell which it had asked for."""
    import json

    from click.testing import CliRunner

    from walstore.cli import main

    root = tmp_path / "ws"
    root.mkdir()
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            tx.files(ws).write("a.txt", "one")
        s.restore_point("p1")
    runner = CliRunner()
    seen = {}
    for point in ("tx:1", "lsn:0", "1", "p1"):
        r = runner.invoke(main, ["files", path, "--at", point, "--json"])
        assert r.exit_code == 0, r.output
        seen[point] = json.loads(r.output)["at"]
    assert seen == {"tx:1": "tx:1", "lsn:0": "lsn:0", "1": "tx:1", "p1": "p1"}
    r = runner.invoke(main, ["files", path, "--json"])
    assert json.loads(r.output)["at"] is None
