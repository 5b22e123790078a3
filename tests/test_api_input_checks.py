"""Bad input meets a TypeError/ValueError at the call, naming the problem, and changes
nothing (CONTRACT, section 2 and "Errors"): the cases probe-api42 found leaking a foreign
exception, a message that named nothing, or accepted by their truth."""
from __future__ import annotations

import os
import subprocess
import sys

import msgpack
import pytest

import walstore


@pytest.fixture
def store(tmp_path):
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        yield s


def test_a_store_path_that_is_not_utf8_is_refused_before_anything_is_made(tmp_path):
    path = os.path.join(str(tmp_path), os.fsdecode(b"st\xffore"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        walstore.open(path)
    assert not os.path.exists(path)  # (it was a half-made store that never opened)


def test_store_paths_empty_nul_bytes_and_wrong_types(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        walstore.open("")
    assert os.listdir(tmp_path) == []  # (not a store made in the current directory)
    with pytest.raises(ValueError, match="NUL"):
        walstore.open(str(tmp_path / "a\0b"))
    with pytest.raises(TypeError, match="str or an os.PathLike"):
        walstore.open(5)
    with walstore.open(os.fsencode(str(tmp_path / "b")), durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    with walstore.open(str(tmp_path / "b"), durability="none") as s:
        assert s.get("k") == 1  # (the bytes path named this store)


@pytest.mark.parametrize("value", [
    msgpack.Timestamp(1, 0), msgpack.ExtType(5, b"x"), [1, {"a": msgpack.Timestamp(2, 0)}],
    {"k": [msgpack.ExtType(1, b"")]}])
def test_msgpack_extension_types_are_refused_at_put(store, value):
    with store.transaction() as tx:
        with pytest.raises(TypeError, match="extension type|Timestamp"):
            tx.put("k", value)
        with pytest.raises(TypeError, match="extension type|Timestamp"):
            tx.update({"a": 1, "b": value})
    with pytest.raises(TypeError, match="extension type|Timestamp"):
        store.transaction(meta={"when": value})
    assert store.get("k") is None and store.get("a") is None


def test_bytes_that_look_like_a_timestamp_header_are_stored(store):
    """The check looks for a Timestamp's header bytes first: bytes holding them are data."""
    value = {"t": b"\xd7\xff" * 10, "u": [b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x0c\xff"]}
    with store.transaction() as tx:
        tx.put("k", value)
    assert store.get("k") == value


def test_action_args_holding_an_extension_type_are_refused_before_the_body(store):
    ran = []
    with store.transaction() as tx:
        with pytest.raises(TypeError, match="extension type"):
            with tx.action("charge", args={"x": msgpack.ExtType(2, b"")}):
                ran.append(1)
    assert ran == [] and store.actions() == []


def test_text_that_is_not_utf8_is_named_in_the_error(store, tmp_path):
    bad = "x\ud800"
    with pytest.raises(ValueError, match="restore point name .* not valid UTF-8"):
        store.restore_point(bad)
    with store.transaction() as tx:
        with pytest.raises(ValueError, match="action name .* not valid UTF-8"):
            with tx.action(bad):
                pass
        with pytest.raises(ValueError, match="compensator name .* not valid UTF-8"):
            with tx.action("a", compensate=bad):
                pass
    for kw in ("prefix", "start", "end"):
        with pytest.raises(ValueError, match="scan bound .* not valid UTF-8"):
            list(store.scan(**{kw: bad}))
    root = tmp_path / "ws"
    root.mkdir()
    ws = store.workspace(str(root))
    with store.transaction() as tx:
        with pytest.raises(ValueError, match="'a.txt' is not valid UTF-8"):
            tx.files(ws).write("a.txt", bad)
    assert store.restore_points() == {} and not (root / "a.txt").exists()


def test_flags_and_counts_of_the_wrong_type_are_refused(store, tmp_path):
    with pytest.raises(TypeError, match="reverse must be a bool"):
        list(store.scan(reverse="no"))
    with store.transaction() as tx:
        with pytest.raises(TypeError, match="reverse must be a bool"):
            list(tx.scan(reverse=1))
        with pytest.raises(TypeError, match="savepoint name"):
            tx.savepoint(5)
        with pytest.raises(TypeError, match="savepoint name"):
            tx.savepoint(b"x")
        tx.savepoint(None)
        tx.savepoint("fine")
    with pytest.raises(TypeError, match="readonly must be True or False"):
        walstore.open(str(tmp_path / "s"), readonly="no")
    with pytest.raises(TypeError, match="create must be True or False"):
        walstore.open(str(tmp_path / "new"), create="no")
    assert not (tmp_path / "new").exists()
    with store.transaction() as tx:
        tx.put("k", 1)
    txid = store.log(limit=1)[0].txid
    with pytest.raises(TypeError, match="cascade must be True or False"):
        store.revert(txid, cascade="yes")
    with pytest.raises(TypeError, match="dry_run must be True or False"):
        store.rewind(txid, dry_run="no")
    assert store.get("k") == 1  # (nothing undone)
    with pytest.raises(TypeError, match="limit"):
        store.log(limit=True)
    with pytest.raises(TypeError, match="limit"):
        store.log(limit="3")
    with pytest.raises(ValueError, match="retries"):
        store.run(lambda tx: None, retries=-1)
    with pytest.raises(TypeError, match="retries"):
        store.run(lambda tx: None, retries="3")


def test_a_replica_url_without_a_scheme_is_shown_as_given(tmp_path):
    p = subprocess.run([sys.executable, "-m", "walstore", "replicas", "bogus"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "://bogus" not in p.stderr and "bogus" in p.stderr


def test_an_empty_compensator_name_is_refused_before_the_action_runs(store):
    """``compensate=""`` names no compensator (``store.compensator("")`` and
    ``open(compensators={"": f})`` refuse it), yet ``tx.action`` took it and a rollback
    then marked the action ``resolved``, "it declares no compensation": the side effect
    the caller meant to have compensated stayed, and nothing was owed or listed."""
    ran = []
    tx = store.transaction()
    with pytest.raises(ValueError, match="compensate"):
        with tx.action("charge", compensate=""):
            ran.append("body")
    assert ran == []  # the body never ran
    assert store.actions() == []  # no intent was logged
    tx.rollback()


def test_the_flags_of_actions_and_retry_compensations_are_bools(store):
    """``store.actions(pending="no")`` took the flag by its truth: it answered with the
    owed actions only (none here) for a store holding a committed action — a listing
    that silently left actions out; ``retry_compensations(include_held=...)`` too (an
    inherited, held compensation run on a truthy "no")."""
    with store.transaction() as tx:
        with tx.action("charge"):
            pass
    with pytest.raises(TypeError, match="pending must be True or False"):
        store.actions(pending="no")
    with pytest.raises(TypeError, match="include_held must be True or False"):
        store.retry_compensations(include_held="no")
    assert [a.name for a in store.actions(pending=False)] == ["charge"]
    assert store.actions(pending=True) == [] and store.retry_compensations() == []


def test_a_kept_txid_that_never_committed_is_an_unknown_point(store):
    """``rewind(include=)`` refused a txid that never committed; ``keep=`` took it and
    kept nothing (a typo meant the transaction meant to be kept was undone)."""
    point = store.restore_point("p")
    with store.transaction() as tx:
        tx.put("a", 1)
    with pytest.raises(walstore.UnknownPoint, match="999"):
        store.rewind(point, keep=[tx.id, 999])
    assert store.get("a") == 1  # nothing changed
    assert store.rewind(point, keep=[tx.id]) is None  # (kept: nothing left to undo)
    assert store.get("a") == 1


def test_an_action_without_compensation_after_rollback_and_after_revert(store):
    """(README, action states) rolled back it never committed: ``resolved``, nothing owed;
    its committed transaction reverted, its effect still stands in the world: ``committed``,
    never listed pending, while a declared compensation of the same transaction runs."""
    refunds = []
    store.compensator("refund")(lambda a: refunds.append(a.id))
    tx = store.transaction()
    with tx.action("notify") as rolled:
        pass
    tx.rollback()
    with store.transaction() as tx:
        tx.put("k", 1)
        with tx.action("notify") as kept:
            pass
        with tx.action("charge", compensate="refund") as charged:
            pass
    store.revert(tx.id)
    assert store.get_action(rolled.id).state == "resolved"
    assert store.get_action(kept.id).state == "committed"
    assert store.get_action(charged.id).state == "compensated" and refunds == [charged.id]
    assert store.pending_compensations() == [] and store.get("k") is None


def test_scan_bounds_are_checked_at_the_call_not_at_the_first_next(tmp_path):
    """store.scan, tx.scan and at().scan were generators: a bad bound raised only when the
    first row was asked for, far from the mistake (audit48).  They raise at the call now;
    what is read still begins at the first ``next``."""
    with walstore.open(str(tmp_path / "s")) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        point = s.log()[0].txid
        tx = s.transaction()
        for scan in (s.scan, tx.scan, s.at(point).scan):
            with pytest.raises(TypeError):
                scan(prefix=5)
            with pytest.raises(TypeError):
                scan(reverse="yes")
            assert list(scan(prefix="a")) == [("a", 1)]
        with pytest.raises(TypeError):
            s.keys(prefix=1.5)
        rows = tx.scan()
        tx.rollback()
        with pytest.raises(walstore.WalstoreError):
            tx.scan()
        with pytest.raises(walstore.WalstoreError):
            next(rows)  # (made before the rollback, read after it: refused too)


def test_an_empty_action_name_is_a_value_error_as_every_empty_name(tmp_path):
    """``tx.action("")`` raised a bare TypeError; an empty name elsewhere (a restore
    point, a scope, a compensator) is ``EmptyArgumentError``, a ValueError too (audit48)."""
    with walstore.open(str(tmp_path / "s")) as s:
        tx = s.transaction()
        with pytest.raises(ValueError, match="non-empty"):
            tx.action("")
        with pytest.raises(TypeError):
            tx.action(5)
        tx.rollback()
        assert s.actions() == []
