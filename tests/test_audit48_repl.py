"""Audit 48 (replication, integrations, durability): regressions found by probing the
contract's "Replication: beyond one machine", "Integrations" and section 4 promises.

Each test failed before its fix (see the commit naming it)."""
from __future__ import annotations

import os

import pytest

import walstore
from walstore.replication.options import ReplicateOptions

from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401


def _one_key_replica(tmp_path) -> str:
    """A file:// replica of a store holding one committed key, shipped; its URL."""
    rep = f"file://{tmp_path}/rep"
    with walstore.open(str(tmp_path / "src"), replicate_to=rep,
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("k", "v")
        s.sync_replica(timeout=30)
    return rep


def test_s3_bytes_body_over_multipart_threshold_ships(s3_endpoint, tmp_path):  # noqa: F811
    """A lease or manifest (sent as bytes) larger than ``multipart_threshold`` went the
    multipart way, which reads its body as a stream: ``bytes.read`` raised
    AttributeError, so every round failed ("multipart upload ...: AttributeError") and
    nothing ever shipped.  A replica whose manifest grew past the threshold (restore
    points accumulate in it) stopped shipping the same way."""
    rep = make_s3_replica(s3_endpoint)
    opts = rep.opts(interval=0.05, max_backoff=0.5, multipart_threshold=400)
    src = str(tmp_path / "src")
    with walstore.open(src, replicate_to=rep.url, replicate_options=opts) as s:
        for i in range(5):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 300)
            s.restore_point(f"p{i}")
        s.sync_replica(timeout=30)
        status = s.replication()
        assert status.state == "running" and status.last_error is None, status
        want = list(s.scan())
    assert len(rep.read("manifest")) > 400  # (it did go the multipart way)
    dest = str(tmp_path / "dest")
    walstore.restore(rep.url, dest, to="p3", replicate_options=rep.opts())
    with walstore.open(dest) as r:
        assert list(r.scan()) == want[:4]


@pytest.mark.parametrize("name,value", [
    ("addressing_style", "bogus"), ("connect_timeout", 0), ("connect_timeout", -1),
    ("read_timeout", 0), ("read_timeout", float("inf")), ("multipart_threshold", -1),
    ("max_object_bytes", 0), ("max_object_bytes", -1), ("max_manifest_bytes", 0),
    ("delete_grace", -1), ("max_pin_bytes", -1), ("snapshot_wal_bytes", -1)])
def test_replicate_option_out_of_range_is_a_value_error_naming_it(tmp_path, name, value):
    """"A value an option does not take is a ValueError naming it" (docs/REPLICATION.md).
    These were accepted: ``addressing_style="bogus"`` then escaped ``walstore.open`` as
    botocore's InvalidS3AddressingStyleError (no foreign exception may escape), a
    timeout of 0 was refused only when the S3 client was built ("cannot set up the S3
    client", and never for file://), ``multipart_threshold=-1`` made every round fail,
    ``max_manifest_bytes=0`` every manifest write, and negative sizes and grace periods
    were taken as given."""
    with pytest.raises(ValueError, match=name):
        ReplicateOptions.from_any({name: value})
    for url in ("s3://walstore-bucket/p", f"file://{tmp_path}/rep"):
        with pytest.raises(ValueError, match=name):
            walstore.open(str(tmp_path / "src"), replicate_to=url,
                          replicate_options={name: value})
        with pytest.raises(ValueError, match=name):
            walstore.restore(url, str(tmp_path / "dest"), replicate_options={name: value})


@pytest.mark.parametrize("value", [[1], "interval=1", 5])
def test_replicate_options_not_a_mapping_is_named(tmp_path, value):
    """``replicate_options=[1]`` raised ``cannot convert dictionary update sequence
    element #0 to a sequence``, naming neither the argument nor what it takes."""
    with pytest.raises(TypeError, match="replicate_options"):
        ReplicateOptions.from_any(value)


@pytest.mark.parametrize("length", [230, 250, 255])
def test_restore_and_backup_to_a_long_destination_name(tmp_path, length):
    """A destination whose name is valid (up to 255 bytes, as ``walstore.open`` takes)
    but long: the staging directory beside it was named ``.<name>.restoring-<pid>-<rnd>``
    (``<name>.incomplete-backup-...`` for a backup), past NAME_MAX, and the restore
    failed with ``StoreIOError: File name too long`` (the backup likewise)."""
    import subprocess
    import sys
    rep = f"file://{tmp_path}/rep"
    src = str(tmp_path / "src")
    with walstore.open(src, replicate_to=rep, replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("k", "v")
        s.sync_replica(timeout=30)
    dest = str(tmp_path / ("d" * length))
    walstore.restore(rep, dest)
    with walstore.open(dest) as r:
        assert list(r.scan()) == [("k", "v")]
    backup = str(tmp_path / ("b" * length))
    res = subprocess.run([sys.executable, "-m", "walstore", "backup", src, backup],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with walstore.open(backup) as b:
        assert list(b.scan()) == [("k", "v")]
    assert sorted(os.listdir(tmp_path)) == sorted(["rep", "src", "d" * length, "b" * length])


def test_scratch_stem_keeps_short_names_and_bounds_long_ones():
    from walstore import fileio
    assert fileio.scratch_stem("dest") == "dest"
    long = "é" * 120  # 240 bytes
    stem = fileio.scratch_stem(long)
    assert len(os.fsencode(stem)) + 64 <= fileio.NAME_MAX
    assert stem == fileio.scratch_stem(long) != fileio.scratch_stem(long[:-1] + "e")


def test_restore_dest_is_checked_as_a_store_path(tmp_path, monkeypatch):
    """``walstore.restore(url, "")`` restored into the current directory (when empty)
    where ``walstore.open("")`` is refused ("." names it); a bytes DEST, which
    ``walstore.open`` takes, failed with ``TypeError: startswith first arg must be
    bytes``; the CLI's ``walstore restore URL ""`` did the same as the first."""
    import subprocess
    import sys
    rep = _one_key_replica(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(ValueError, match="must not be empty"):
        walstore.restore(rep, "")
    res = subprocess.run([sys.executable, "-m", "walstore", "restore", rep, ""],
                         capture_output=True, text=True, timeout=120, cwd=str(cwd))
    assert res.returncode == 2 and "empty" in res.stderr, (res.returncode, res.stderr)
    assert os.listdir(cwd) == []
    with pytest.raises(ValueError, match="NUL"):
        walstore.restore(rep, str(tmp_path / "a\0b"))
    dest = os.fsencode(str(tmp_path / "bytes-dest"))
    assert walstore.restore(rep, dest)["dest"] == os.fsdecode(dest)
    with walstore.open(dest) as r:
        assert list(r.scan()) == [("k", "v")]


@pytest.mark.parametrize("flag,value", [
    ("--apply-every", "nan"), ("--apply-every", "-1"), ("--apply-every", "inf")])
def test_follow_apply_every_out_of_range_is_a_usage_error(tmp_path, flag, value):
    """``walstore restore URL DEST --follow --apply-every nan`` (or -1, inf) was taken
    and the follower ran, never applying on time: "A value an option does not take is a
    ValueError naming it, and on the CLI a one-line usage error naming the flag (exit
    2)"; ``--interval`` was checked, ``--apply-every`` not."""
    import subprocess
    import sys
    rep = _one_key_replica(tmp_path)
    dest = str(tmp_path / "dest")
    res = subprocess.run([sys.executable, "-m", "walstore", "restore", rep, dest, "--follow",
                          "--interval", "0.1", f"{flag}={value}"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert flag in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists(dest)


@pytest.mark.parametrize("kw", [{"interval": -1.0}, {"interval": float("nan")},
                                {"interval": 0}, {"apply_every": float("nan")},
                                {"apply_every": -1}, {"apply_every": "5"}])
def test_follow_api_checks_interval_and_apply_every(tmp_path, kw):
    """``walstore.replication.follow(url, dest, interval=-1)`` (or NaN) polled in a busy
    loop, ``interval=0`` took the default without a word, and ``apply_every`` was never
    checked: each is a ValueError naming it, before anything is restored."""
    from walstore.replication import follow
    rep = f"file://{tmp_path}/rep"
    with walstore.open(str(tmp_path / "src"), replicate_to=rep,
                       replicate_options={"interval": 0.05}) as s:
        s.sync_replica(timeout=30)
    dest = str(tmp_path / "dest")
    with pytest.raises(ValueError, match=next(iter(kw))):
        follow(rep, dest, **kw)
    assert not os.path.exists(dest)


class _PlainClass:  # (not a dataclass: LangGraph's encoding cannot store it)
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("value,named", [(_PlainClass(), "_PlainClass"),
                                         (complex(1, 2), "builtins.complex"),
                                         (2 ** 70, "int"), ({"deep": [-(2 ** 64)]}, "int")])
def test_saver_put_of_an_unstorable_value_names_the_type_and_the_recipe(tmp_path, value,
                                                                         named):
    """A state value LangGraph's encoding cannot store was refused at ``put`` with
    ormsgpack's own words: "Type is not msgpack serializable: _PlainClass" (no recipe),
    "Integer exceeds 64-bit range" (not even the type).  The contract: refused loudly at
    put, "naming the type and the allowed_types recipe"; nothing is stored."""
    pytest.importorskip("langgraph")
    from langgraph.checkpoint.base import empty_checkpoint
    from walstore.integrations.langgraph import WalstoreSaver
    from walstore.integrations.langgraph.serde import StateTypeError
    with walstore.open(str(tmp_path / "st")) as s:
        saver = WalstoreSaver(s)
        cp = empty_checkpoint()
        version = saver.get_next_version(None)
        cp["channel_values"] = {"v": value}
        cp["channel_versions"] = {"v": version}
        with pytest.raises(StateTypeError) as e:
            saver.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, cp, {},
                      {"v": version})
        assert named in str(e.value)
        assert "allowed_types" in str(e.value) or "str(n)" in str(e.value)
        assert saver.get_tuple({"configurable": {"thread_id": "t"}}) is None
