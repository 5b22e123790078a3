"""Bad input and bad state meet walstore's own errors, never an OSError, an lmdb.Error
dressed as corruption, or the wrong transaction (found by an adversarial probe of the
contract, 2026-12-01): opening paths that cannot be a store, a closed store's undo and
views, action ids LMDB cannot look up, a log position passed where a txid is meant, and
the command line's usage errors and JSON tags."""
from __future__ import annotations

import errno
import json
import math
import os

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main


def cli(*args: str, code: int = 0):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    return r


def _store(path, n: int = 3) -> walstore.Store:
    s = walstore.open(str(path), durability="none")
    for i in range(1, n + 1):
        with s.transaction() as tx:
            tx.put(f"k{i}", i)
    return s


# ---- opening ------------------------------------------------------------------------------
def test_a_path_that_cannot_hold_a_store_is_not_a_store(tmp_path):
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile" / "sub", tmp_path / "afile" / "a" / "b"):
        with pytest.raises(walstore.NotAStore, match="Not a directory"):
            walstore.open(str(path), durability="none")
    os.chmod(tmp_path, 0o500)  # no write permission: creating the store directory fails
    try:
        if os.geteuid() != 0:  # (root writes anyway)
            with pytest.raises(walstore.StoreIOError, match="Permission denied") as e:
                walstore.open(str(tmp_path / "new"), durability="none")
            assert isinstance(e.value, OSError) and e.value.errno == errno.EACCES
    finally:
        os.chmod(tmp_path, 0o700)


def test_a_store_file_that_is_a_directory_is_refused_read_only_too(tmp_path):
    _store(tmp_path / "s").close()
    os.remove(tmp_path / "s" / "STORE")
    os.mkdir(tmp_path / "s" / "STORE")
    for kw in ({"readonly": True}, {}):
        with pytest.raises(walstore.NotAStore):
            walstore.open(str(tmp_path / "s"), durability="none", **kw)


@pytest.mark.parametrize("size", [2 ** 80, 2 ** 64, (1 << 46) + 1])
def test_a_map_size_beyond_any_address_space_is_a_value_error_leaving_nothing(tmp_path, size):
    with pytest.raises(ValueError, match="map_size"):
        walstore.open(str(tmp_path / "m"), map_size=size)
    assert not (tmp_path / "m").exists()


# ---- a closed store ------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"segment_size": 1 << 20}, 5, "strict"])
def test_options_that_are_not_an_options_object_are_a_type_error_leaving_nothing(tmp_path,
                                                                                 options):
    """open(path, options=<a dict>) raised AttributeError after it had created and locked
    the store directory; a TypeError naming options= now, before any file is touched."""
    path = tmp_path / "s"
    with pytest.raises(TypeError, match="options= takes a walstore.Options"):
        walstore.open(str(path), options=options)
    assert not path.exists()
    with walstore.open(str(path), options=walstore.Options(segment_size=1 << 20)) as s:
        assert s.options.segment_size == 1 << 20


def test_a_closed_stores_undo_and_views_raise_store_closed_not_corruption(tmp_path):
    s = _store(tmp_path / "s")
    s.restore_point("rp")
    view = s.at(2)
    s.close()
    calls = [lambda: s.revert(1), lambda: s.revert(1, dry_run=True), lambda: s.rewind("rp"),
             lambda: s.rewind("rp", dry_run=True), lambda: view.get("k1"),
             lambda: list(view.scan())]
    for call in calls:
        with pytest.raises(walstore.StoreClosed):
            call()
    with walstore.open(str(tmp_path / "s"), durability="none") as again:
        assert [again.get(f"k{i}") for i in (1, 2, 3)] == [1, 2, 3]  # nothing changed


# ---- action ids ----------------------------------------------------------------------------
@pytest.mark.parametrize("aid", ["", "x" * 600, "\ud800", None, 5])
def test_an_action_id_that_names_nothing_is_a_key_error(tmp_path, aid):
    with _store(tmp_path / "s") as s:
        for call in (s.get_action, s.resolve):
            with pytest.raises(KeyError, match="no action with id"):
                call(aid)


# ---- a log position is not a txid ----------------------------------------------------------
def test_revert_refuses_a_log_position_and_changes_nothing(tmp_path):
    with _store(tmp_path / "s", n=40) as s:
        lsn = s.txn_info(2).lsn
        assert isinstance(lsn, walstore.LSN) and int(lsn) > 2
        before = dict(s.scan())
        for dry in (True, False):
            with pytest.raises(TypeError, match="log position"):
                s.revert(lsn, dry_run=dry)
        assert dict(s.scan()) == before
        s.revert(2)  # the txid itself still works
        assert s.get("k2") is None and s.get("k3") == 3


# ---- the command line ----------------------------------------------------------------------
def test_an_empty_or_oversized_key_on_the_command_line_is_a_usage_error(tmp_path):
    path = str(tmp_path / "s")
    _store(path).close()
    for args in (["get", path, ""], ["history", path, ""], ["delete", path, ""],
                 ["purge", path, "", "--yes"], ["rewind", path, "--to", "1", "--scope", "",
                                                "--dry-run"], ["put", path, "", "1"],
                 ["get", path, "x" * 600], ["resolve", path, ""]):
        r = cli(*args, code=2)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("walstore: ")
    assert json.loads(cli("get", path, "k1").stdout) == 1  # nothing was deleted or purged
    assert "k3" in cli("scan", path, "--prefix", "").stdout  # '' is every key there


def test_actions_json_renders_nan_and_bytes_as_tags_once(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none", compensators={"c": lambda a: None}) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
            with tx.action("act", args={"n": math.nan, "b": b"\x01"}, compensate="c"):
                pass
    log_args = json.loads(cli("log", path, "--json").stdout)["transactions"][0]["actions"][0]
    acts = json.loads(cli("actions", path, "--json").stdout)["actions"]
    assert acts[0]["args"] == {"b": {"base64": "AQ=="}, "n": {"float": "nan"}}
    assert log_args["args"] == acts[0]["args"]


# ---- damage the verbs must name (found by a probe of the maintenance verbs) --------------
@pytest.mark.parametrize("gone", ["db", "wal"])
def test_a_missing_db_or_wal_directory_is_corruption_not_not_a_store(tmp_path, gone):
    path = str(tmp_path / "s")
    _store(path).close()
    import shutil
    shutil.rmtree(os.path.join(path, gone))
    for ro in (False, True):
        with pytest.raises(walstore.CorruptionError) as e:
            walstore.open(path, readonly=ro)
        assert e.value.file == os.path.join(path, gone)
    r = cli("verify", path, "--json", code=1)
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and gone + "/" in doc["errors"][0]


def test_verify_json_is_a_document_when_lmdb_cannot_be_opened(tmp_path):
    path = str(tmp_path / "s")
    _store(path).close()
    open(os.path.join(path, "db", "data.mdb"), "wb").close()  # truncated to nothing
    doc = json.loads(cli("verify", path, "--json", code=1).stdout)
    assert doc["ok"] is False and "data.mdb" in doc["errors"][0]


def test_dump_exits_1_when_it_shows_damage(tmp_path):
    path = str(tmp_path / "s")
    s = walstore.open(path)  # (durable: later records prove the damaged one was durable)
    for i in range(5):
        s.run(lambda tx: tx.put(f"k{i}", i))
    s._engine.drop_like_a_crash()
    cli("dump", path)  # healthy: 0
    seg = sorted(os.listdir(os.path.join(path, "wal")))[0]
    with open(os.path.join(path, "wal", seg), "r+b") as f:  # a bit flipped in the first
        f.seek(64 + 40)                                     # record's payload, records follow
        b = f.read(1)
        f.seek(64 + 40)
        f.write(bytes([b[0] ^ 0x01]))
    r = cli("dump", path, code=1)
    assert "CORRUPT" in r.stdout
    doc = json.loads(cli("dump", path, "--json", code=1).stdout)
    assert any(rec["type"] == "CORRUPT" for rec in doc["records"])


@pytest.mark.parametrize("compensators", [{"refund": "not-a-function"}, {1: print},
                                          [("refund", print)]])
def test_a_compensator_that_cannot_be_called_is_refused_at_open(tmp_path, compensators):
    """It was accepted, and failed only when a rollback needed it, after the side effect:
    three tries, CompensationFailed, the action left ``failed``."""
    path = str(tmp_path / "s")
    with pytest.raises(TypeError, match="nothing was opened"):
        walstore.open(path, compensators=compensators)
    assert not os.path.exists(path)
    with walstore.open(path) as s:
        with pytest.raises(TypeError, match="callable"):
            s.compensator("refund")("not-a-function")
        assert "refund" not in s.compensators


def test_resolving_an_unknown_action_is_a_walstore_error_and_a_key_error(tmp_path):
    """It was a bare KeyError: ``except walstore.WalstoreError`` let it through, unlike
    ``commit_prepared`` of an unknown gid (UnknownGid is both)."""
    from walstore.errors import UnknownAction
    with walstore.open(str(tmp_path / "s")) as s:
        for call in (lambda: s.resolve("9.9"), lambda: s.resolve("")):
            with pytest.raises(UnknownAction) as e:
                call()
            assert isinstance(e.value, walstore.WalstoreError)
            assert isinstance(e.value, KeyError)
            assert str(e.value).startswith("no action with id")
    r = CliRunner().invoke(main, ["resolve", str(tmp_path / "s"), "9.9"])
    assert r.exit_code in (1, 2) and "no action with id '9.9'" in r.output, r.output


# ---- every error the docs name is a public name ---------------------------------------------
# Exceptions the docs name that live elsewhere, on purpose: name -> where users get it.
_DOCUMENTED_ELSEWHERE = {
    "StaleCheckpointError": "walstore.integrations.langgraph",  # (an optional extra)
    "MapFullError": "lmdb",  # (LMDB's own, in a narrative of what the soak found)
    "TargetError": "walstore.replication.targets",  # (quoted in an error message's text)
    "UsageError": "click",  # (the CLI's --json ``type`` of a usage error)
    "CancelledError": "asyncio",
}


def test_every_error_class_the_docs_name_is_importable_from_walstore():
    """README named SnapshotTooOld, WalWriteError and UnknownGid as errors users meet
    (retry, a failed commit, a GID decided by another caller) but ``walstore.<Name>`` did
    not exist, so ``except walstore.SnapshotTooOld`` raised AttributeError (probe pr-docs).
    Every exception class README and docs/ name in backticks is ``walstore.<Name>`` (or the
    dotted path they spell, or one of the few documented as living elsewhere)."""
    import builtins
    import importlib
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted(
        (root / "docs").glob("*.md"))])
    ours = {c.__name__ for m in list(sys.modules.values())
            if (getattr(m, "__name__", "") or "").startswith("walstore")
            for c in vars(m).values()
            if isinstance(c, type) and issubclass(c, BaseException)}
    missing = []
    for dotted in sorted(set(re.findall(r"`((?:walstore\.)?(?:[a-z_]+\.)*[A-Z]\w+)`", text))):
        name = dotted.rsplit(".", 1)[-1]
        if "." in dotted and not dotted.startswith("walstore."):
            continue  # (another package's, spelled with its module: `lmdb.Error`)
        if isinstance(getattr(builtins, name, None), type) or name in _DOCUMENTED_ELSEWHERE:
            continue
        if not (name in ours or name.endswith("Error")):
            continue  # (not an exception: a class or constant the docs name)
        if dotted.count(".") > 1:  # (a spelled-out path: it must resolve)
            module, _, attr = dotted.rpartition(".")
            if not hasattr(importlib.import_module(module), attr):
                missing.append(dotted)
            continue
        if not (hasattr(walstore, name) and name in walstore.__all__):
            missing.append(name)
    assert not missing, f"documented errors that are not public names of walstore: {missing}"
    for name in ("SnapshotTooOld", "WalWriteError", "UnknownGid"):
        assert issubclass(getattr(walstore, name), walstore.WalstoreError)
    assert issubclass(walstore.SnapshotTooOld, walstore.ConflictError)
    assert issubclass(walstore.WalWriteError, OSError)
    assert issubclass(walstore.UnknownGid, walstore.UnknownPoint)
