"""The blob gc's cost follows what changed, not everything it keeps: a kept blob is
stat-ed by the first gc only (its content, hence its size, never changes), and a saved
watch() manifest's blob list is read once (the one just saved from memory), not loaded
back at every gc — within a bound (``MANIFEST_REFS_KEPT``), past which the oldest are
loaded again when asked.  What the gc keeps stays exact either way."""
from __future__ import annotations

import os

import walstore
from walstore.agent import files as files_mod
from walstore.files import BlobStore, Manifest


def test_a_kept_blob_is_stat_ed_once_and_the_kept_bytes_stay_exact(tmp_path, monkeypatch):
    b = BlobStore(str(tmp_path / "blobs"))
    first = {b.put_bytes(b"x" * n).digest: n for n in range(1, 41)}
    r = b.gc(first)
    assert (r.kept, r.kept_bytes, r.removed) == (40, sum(first.values()), 0)
    more = {b.put_bytes(b"y" * n).digest: n for n in range(1, 11)}
    stats = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (stats.append(p), real(p, *a, **k))[1])
    keep = dict(list(first.items())[:20]) | more
    r = b.gc(keep)
    assert (r.kept, r.kept_bytes) == (30, sum(keep.values()))
    assert r.removed == 20 and r.freed == sum(list(first.values())[20:])
    # the 10 new kept blobs and the 20 removed ones: not the 20 kept from before
    assert len(stats) == 30, len(stats)
    stats.clear()
    r = b.gc(keep)
    assert (r.kept, r.kept_bytes, r.removed, len(stats)) == (30, sum(keep.values()), 0, 0)
    assert sorted(b) == sorted(keep)


def _tree(root, n):
    for i in range(n):
        d = os.path.join(root, "d%d" % (i % 5))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%d" % i), "w") as f:
            f.write("content %d" % i)


def _watches(s, ws, root, n, path):
    for i in range(n):
        with s.transaction() as tx:
            with tx.files(ws).watch():
                with open(os.path.join(root, path), "w") as f:
                    f.write("change %d" % i)


def _from_blobs(files) -> set:
    """What the gc keeps, every manifest list loaded back from its blob (no cache)."""
    saved = dict(files._manifest_refs), files._manifest_refs_count
    files._manifest_refs.clear()
    files._manifest_refs_count = 0
    try:
        return files.referenced()
    finally:
        files._manifest_refs.clear()
        files._manifest_refs.update(saved[0])
        files._manifest_refs_count = saved[1]


def test_saved_manifests_are_not_loaded_back(tmp_path, monkeypatch):
    root = str(tmp_path / "ws")
    _tree(root, 60)
    loads = []
    real_load = Manifest.load.__func__
    monkeypatch.setattr(Manifest, "load", classmethod(
        lambda cls, blobs, d: (loads.append(d), real_load(cls, blobs, d))[1]))
    with walstore.open(str(tmp_path / "s")) as s:
        ws = s.workspace(root)
        _watches(s, ws, root, 6, "d0/f0")
        files = s._files
        for _ in range(2):
            refs = files.referenced()
            assert loads == []  # each manifest's list came from memory when it was saved
            assert refs == _from_blobs(files)  # and it is the list its blob holds
            assert loads  # (that one did load them)
            loads.clear()
            s.checkpoint()  # (the gc among its steps: what is referenced then is kept)
            assert all(files.blobs.has(d) for d in files.referenced())
            assert loads == []


def test_past_the_bound_the_oldest_manifest_lists_are_loaded_again(tmp_path, monkeypatch):
    monkeypatch.setattr(files_mod, "MANIFEST_REFS_KEPT", 1)
    root = str(tmp_path / "ws")
    _tree(root, 30)
    with walstore.open(str(tmp_path / "s")) as s:
        ws = s.workspace(root)
        _watches(s, ws, root, 4, "d1/f1")
        files = s._files
        assert len(files._manifest_refs) == 1  # (the bound: one list, the newest)
        refs = files.referenced()
        assert len(files._manifest_refs) == 1
        assert refs == _from_blobs(files)  # the same blobs kept, bound or none
        s.checkpoint()
        assert all(files.blobs.has(d) for d in files.referenced())


def test_a_saved_manifest_packs_what_changed_and_saves_the_same_bytes(tmp_path):
    """``Manifest.save`` reuses the packed rows of records it (or the manifest it was
    built from) saved before — the same Record object packs the same — and packs the rest:
    the blob is byte for byte what packing every row gives, and a changed, added or
    removed path is in it as it is now."""
    from walstore.files.watch import snapshot
    root = str(tmp_path / "ws")
    _tree(root, 80)
    with walstore.open(str(tmp_path / "s")) as s:
        ws = s.workspace(root)
        blobs = s._files.blobs
        m0 = snapshot(ws, blobs)
        d0 = m0.save(blobs)
        assert len(m0.packed_rows) == len(m0.records)
        with open(os.path.join(root, "d0", "f0"), "w") as f:
            f.write("changed")
        os.remove(os.path.join(root, "d1", "f1"))
        with open(os.path.join(root, "d2", "new"), "w") as f:
            f.write("new")
        m1 = snapshot(ws, blobs, previous=m0)
        assert m1.packed_rows is m0.packed_rows  # (inherited, read only)
        d1 = m1.save(blobs)
        loaded = Manifest.load(blobs, d1)
        assert loaded.records == m1.records
        assert loaded.records[b"d0/f0"].size == len("changed")
        assert b"d1/f1" not in loaded.records and b"d2/new" in loaded.records
        # the same bytes as a save that packs every row afresh
        m1.packed_rows = {}
        assert m1.save(blobs) == d1
        assert Manifest.load(blobs, d0).records == m0.records
        assert loaded.save(blobs) == d1  # (a loaded manifest packs all and agrees)
