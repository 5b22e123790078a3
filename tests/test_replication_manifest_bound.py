"""The shipper never writes a manifest larger than ``max_manifest_bytes``, the bound every
reader of it refuses past (bounds audit, helper-197).  Restore points accumulate in the
manifest (a dropped one too, for restores to times before the drop) until retention
passes them: past the bound the manifest was written all the same, and then no restore
could read the replica, and the store itself no longer opened with ``replicate_to=``
(its shipper refused the manifest it had written).  Now the save is refused
(``ManifestTooLarge``, not transient: the replica keeps its last manifest, the round
fails saying why) after retention was given its chance to trim it."""
from __future__ import annotations

import os
import time

import pytest

import walstore
from walstore.replication.manifest import MANIFEST_KEY

BOUND = 16 * 1024
NAME = "p" * 300


def _open(src, url, **opts):
    o = {"max_manifest_bytes": BOUND, "interval": 0.05, **opts}
    return walstore.open(src, replicate_to=url, replicate_options=o)


def test_a_manifest_past_the_bound_is_not_written_and_everything_still_opens(tmp_path):
    src, rep, dest = (str(tmp_path / n) for n in ("src", "rep", "dest"))
    os.makedirs(rep)
    url = "file://" + rep
    s = _open(src, url)
    with s.transaction() as tx:
        tx.put("k", 1)
    s.restore_point("first")
    s.sync_replica(timeout=30)
    for i in range(80):  # ~25 KB of names: past the bound
        s.restore_point(f"{NAME}{i:04}")
    with s.transaction() as tx:
        tx.put("k", 2)
    deadline = time.monotonic() + 60  # (a round failed on it: waited for, then a short
    while "max_manifest_bytes" not in (s.replication().last_error or ""):  # sync, which
        assert time.monotonic() < deadline, s.replication()  # every round fails, is
        time.sleep(0.02)  # waited out: 0.5 s, not 5)
    with pytest.raises(walstore.ReplicationError, match="max_manifest_bytes"):
        s.sync_replica(timeout=0.5)
    assert "max_manifest_bytes" in (s.replication().last_error or "")
    s.close()
    assert os.path.getsize(os.path.join(rep, MANIFEST_KEY)) <= BOUND
    s = _open(src, url)  # (the open refused the manifest its own shipper had written)
    assert s.get("k") == 2
    s.close()
    walstore.restore(url, dest, to="first",
                     replicate_options={"max_manifest_bytes": BOUND})
    with walstore.open(dest) as r:
        assert r.get("k") == 1


def test_retention_is_given_its_chance_before_the_save_is_refused(tmp_path):
    src, rep = str(tmp_path / "src"), str(tmp_path / "rep")
    os.makedirs(rep)
    url = "file://" + rep
    s = _open(src, url, retention_seconds=0.0, retain_snapshots=1, snapshot_interval=0.0)
    with s.transaction() as tx:
        tx.put("k", 1)
    for i in range(80):
        s.restore_point(f"{NAME}{i:04}")
        s.drop_restore_point(f"{NAME}{i:04}")  # (kept in the manifest until retention)
        with s.transaction() as tx:
            tx.put("k", i)
        s.sync_replica(timeout=30)  # every round's snapshot lets retention trim the points
    assert os.path.getsize(os.path.join(rep, MANIFEST_KEY)) <= BOUND
    assert s.replication().last_error is None
    s.close()


def test_a_refused_save_leaves_the_manifest_version_as_it_was(tmp_path):
    """A save refused for its size wrote nothing: the manifest's ``seq`` stays the
    written one's (it was bumped before the check and never given back)."""
    from walstore.replication.manifest import Manifest, ManifestTooLarge
    from walstore.replication.targets import open_target
    rep = str(tmp_path / "rep")
    os.makedirs(rep)
    target = open_target("file://" + rep)
    m = Manifest.new(b"s" * 16, "lineage", {})
    m.save(target, {"pid": 1})
    seq = m.doc["seq"]
    m.doc["points"] = [{"name": NAME + str(i)} for i in range(200)]
    with pytest.raises(ManifestTooLarge):
        m.save(target, {"pid": 1}, max_bytes=BOUND)
    assert m.doc["seq"] == seq
