"""``watch.diff`` compares only the paths whose records are not the same objects in both
manifests; these tests hold it to a reference that compares every path of the union."""
from __future__ import annotations

import random

import pytest

from walstore.files.entries import DIR, FILE, SYMLINK, Entry
from walstore.files.ignore import IgnoreRules
from walstore.files.watch import Change, Manifest, Record, _classify, diff


def reference_diff(old: Manifest, new: Manifest, ignore=None) -> list[Change]:
    """Every path of both manifests' union, their entries classified by value (what the
    diff reported before it skipped shared records; the records here have one size per
    content hash, as real ones do)."""
    out = []
    if old.top is not None and new.top is not None and old.top.mode != new.top.mode:
        out.append(Change(b"", "mode", old.top.entry(), new.top.entry()))
    for rel in sorted(set(old.records) | set(new.records)):
        before, after = old.entry(rel), new.entry(rel)
        kind = _classify(before, after)
        if kind is not None and not (ignore and ignore.ignored(
                rel, DIR in (before.kind, after.kind))):
            out.append(Change(rel, kind, before, after))
    return out


_SIZE_OF = {"a" * 64: 1, "b" * 64: 2, "c" * 64: 3}  # (one size per content hash)


def _record(rng: random.Random) -> Record:
    kind = rng.choice([FILE, FILE, FILE, DIR, SYMLINK])
    sha = rng.choice(list(_SIZE_OF)) if kind == FILE else None
    return Record(kind, rng.choice([0o644, 0o600, 0o755]) if kind != SYMLINK else 0,
                  _SIZE_OF[sha] if kind == FILE else 0, rng.randrange(10**9),
                  rng.randrange(10**9), rng.randrange(10**6), 1, 0, 0, sha,
                  rng.choice([b"t1", b"t2"]) if kind == SYMLINK else None)


def _copy(r: Record) -> Record:
    return Record(r.kind, r.mode, r.size, r.mtime_ns, r.ctime_ns, r.ino, r.dev, r.uid,
                  r.gid, r.sha256, r.target)


def _manifest(records: dict, top: Record | None) -> Manifest:
    return Manifest(b"/w", records, 0, 0, top=top)


@pytest.mark.parametrize("seed", range(60))
def test_diff_equals_a_comparison_of_every_path(seed):
    rng = random.Random(seed)
    n = rng.choice([0, 1, 5, 50, 400])
    old = {f"p{i:04d}".encode(): _record(rng) for i in range(n)}
    new = dict(old)  # an incremental snapshot: the unexamined paths keep their objects
    for rel in list(old):
        roll = rng.random()
        if roll < 0.08:
            del new[rel]
        elif roll < 0.16:
            new[rel] = _record(rng)  # re-examined: perhaps changed, perhaps equal
        elif roll < 0.24:
            new[rel] = _copy(old[rel])  # re-examined, unchanged: equal, not the same object
    for i in range(rng.randrange(4)):
        new[f"q{i}".encode()] = _record(rng)
    if rng.random() < 0.3:  # a full walk: no record shared at all
        new = {rel: _copy(r) for rel, r in new.items()}
    top_old = _record(rng) if rng.random() < 0.8 else None
    top_new = (_copy(top_old) if top_old is not None and rng.random() < 0.5
               else _record(rng))
    a, b = _manifest(old, top_old), _manifest(new, top_new)
    ignore = IgnoreRules([b"p00*"]) if rng.random() < 0.3 else None
    got = diff(a, b, ignore)
    assert got == reference_diff(a, b, ignore)
    assert diff(b, a, ignore) == reference_diff(b, a, ignore)  # either direction
    assert diff(a, a) == []


def test_a_path_gone_from_a_manifest_whose_other_records_are_shared_is_deleted():
    """The shortcut that skips looking for paths only in ``old`` must not skip them when
    as many paths were added as removed."""
    rng = random.Random(7)
    old = {b"a": _record(rng), b"b": _record(rng)}
    new = {b"a": old[b"a"], b"c": _record(rng)}
    got = [(c.path, c.kind) for c in diff(_manifest(old, None), _manifest(new, None))]
    assert got == [(b"b", "deleted"), (b"c", "created")]
    assert all(isinstance(c.before, Entry) for c in diff(_manifest(old, None),
                                                          _manifest(new, None)))
