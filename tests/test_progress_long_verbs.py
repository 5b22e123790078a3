"""Progress of the long verbs that showed none (CONTRACT 3: "Human output is short,
aligned, and shows progress on long work"): `replicate --once` (the WAL and file content
it ships, a snapshot's upload), `purge` (the rewrite of LMDB at its checkpoint) and
`restore` (the snapshot's download, which its progress did not count).  Each runs the
real CLI as a process on a store past the size from which progress is shown (32 MiB:
walstore.cli.output.PROGRESS_MIN_BYTES), stderr a pipe (a line each); under --json the
output stays one JSON document and nothing is said on stderr.  Each test fails on the
code before the change (no progress line at all)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import walstore
from walstore.cli.output import PROGRESS_MIN_BYTES

from store_support import CLI, cli_env
from test_replication_support import make_s3_replica, s3_endpoint  # noqa: F401

MiB = 1 << 20
VALUES = PROGRESS_MIN_BYTES // MiB + 4  # values of a MiB: past the progress threshold


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True,
                       text=True, env=cli_env(), timeout=timeout)
    assert r.returncode == 0, (args, r.returncode, r.stderr)
    return r


def _no_constants(token: str):
    raise AssertionError(f"non-RFC-8259 JSON constant {token}")


def strict(text: str):
    return json.loads(text, parse_constant=_no_constants)


def shown(stderr: str, label: str) -> list[str]:
    """The progress lines of ``label`` (a line each: stderr is no terminal)."""
    assert "\r" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.startswith(f"{label}:")]


def checkpointed_store(path: str, prefix: str = "k") -> None:
    """VALUES MiB in LMDB (checkpointed: a large snapshot), little WAL left behind it."""
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40)
    for i in range(VALUES):
        with s.transaction() as tx:
            tx.put(f"{prefix}{i}", os.urandom(MiB))
    s.checkpoint()
    s.close()


def test_replicate_once_shows_the_wal_it_ships(tmp_path):
    """A store with VALUES MiB of WAL not yet in LMDB (its writer died): `replicate
    --once` shipped it all without a word."""
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40,
                      segment_size=16 * MiB)
    for i in range(VALUES):
        with s.transaction() as tx:
            tx.put(f"k{i % 4}", os.urandom(MiB))
    s._drop_like_a_crash()  # (the WAL stays: nothing trims it, LMDB stays small)
    r = run_cli("replicate", path, f"file://{tmp_path}/rep1", "--once")
    lines = shown(r.stderr, "replicate")
    assert len(lines) >= 5 and "(100%)" in lines[-1], r.stderr  # (per MiB, not at the end)
    assert "replicate" not in r.stdout.replace("replica at", "") and \
        r.stdout.startswith("shipped ")
    js = run_cli("replicate", path, f"file://{tmp_path}/rep2", "--once", "--json")
    doc = strict(js.stdout)
    assert doc["bytes"] >= PROGRESS_MIN_BYTES and js.stderr == "", js.stderr


def test_replicate_once_shows_the_snapshot_it_uploads(tmp_path):
    """The first round of a new replica uploads a snapshot of LMDB (VALUES MiB here) and
    little WAL: its upload is shown on a line of its own."""
    path = str(tmp_path / "s")
    checkpointed_store(path)
    r = run_cli("replicate", path, f"file://{tmp_path}/rep1", "--once")
    lines = shown(r.stderr, "replicate snapshot")
    assert len(lines) >= 5 and "(100%)" in lines[-1], r.stderr
    assert "snapshot at LSN" in r.stdout
    js = run_cli("replicate", path, f"file://{tmp_path}/rep2", "--once", "--json")
    assert strict(js.stdout)["snapshot"] is not None and js.stderr == "", js.stderr


def test_restore_counts_the_snapshot_download(tmp_path):
    """A replica whose snapshot is large and WAL small: `restore` counted only the WAL
    (below the threshold: nothing shown) while the snapshot's download took the time."""
    path = str(tmp_path / "s")
    checkpointed_store(path)
    url = f"file://{tmp_path}/rep"
    run_cli("replicate", path, url, "--once", "--json")
    r = run_cli("restore", url, str(tmp_path / "r1"))
    lines = shown(r.stderr, "restore")
    assert len(lines) >= 5 and "(100%)" in lines[-1], r.stderr
    # the snapshot is counted: the first lines come before any WAL object is read
    total = float(lines[-1].split("/")[1].split()[0]) * 1e6
    assert total >= VALUES * MiB, lines
    assert "restore:" not in r.stdout
    js = run_cli("restore", url, str(tmp_path / "r2"), "--json")
    assert strict(js.stdout)["snapshot_lsn"] > 0 and js.stderr == "", js.stderr
    with walstore.open(str(tmp_path / "r2"), readonly=True) as c:
        assert len(c.get(f"k{VALUES - 1}")) == MiB


def test_purge_shows_the_rewrite_of_lmdb(tmp_path):
    """`purge --yes` of a large store rewrites LMDB at its checkpoint (row by row): it ran
    without a word."""
    for name, as_json in (("s1", False), ("s2", True)):
        path = str(tmp_path / name)
        checkpointed_store(path, prefix="p/")
        with walstore.open(path) as s:  # (a key the purge keeps)
            with s.transaction() as tx:
                tx.put("keep", 1)
        r = run_cli("purge", path, "p/", "--yes", *(["--json"] if as_json else []))
        if as_json:
            doc = strict(r.stdout)
            assert doc["keys_erased"] == VALUES and r.stderr == "", r.stderr
        else:
            lines = shown(r.stderr, "purge")
            assert len(lines) >= 2 and "(100%)" in lines[-1], r.stderr
            assert r.stdout.startswith(f"purged {VALUES} key(s)") and "purge:" not in r.stdout
        with walstore.open(path, readonly=True) as s:
            assert s.get("keep") == 1 and s.get("p/0") is None


def test_progress_lines_come_at_every_5_percent_passed(capsys):
    """Steps that never meet a multiple of 5% exactly (a MiB of 42 MB: 2.49%) showed
    only 0% and 100%; a line comes each time another 5% is passed."""
    from walstore.cli.output import progress_printer
    show = progress_printer("replicate")
    total = 42 * 10**6
    for done in range(0, total, MiB):
        show(done, total)
    show(total, total)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 20 and "(100%)" in lines[-1], lines


def test_ship_once_progress_to_s3_per_object_and_per_part(tmp_path, s3_endpoint):
    """The library's hooks against a real S3 server (moto's): WAL objects in single PUTs
    and a snapshot above the multipart threshold, its parts counted one by one; every
    call (done, total) with done never going back, ending at the total."""
    from walstore.replication import DirectorySource, Shipper
    path = str(tmp_path / "s")
    checkpointed_store(path)
    s = walstore.open(path, durability="none", checkpoint_bytes=1 << 40)
    for i in range(4):  # (WAL past LMDB, not trimmed: objects of 8 MiB at most)
        with s.transaction() as tx:
            tx.put(f"w{i}", os.urandom(4 * MiB))
    s._drop_like_a_crash()
    replica = make_s3_replica(s3_endpoint, multipart_threshold=8 * MiB, part_size=5 * MiB,
                              max_object_bytes=8 * MiB)
    wal, snap = [], []
    shipper = Shipper(DirectorySource(path), replica.url, replica.options)
    try:
        summary = shipper.ship_once(progress=lambda d, t: wal.append((d, t)),
                                    snapshot_progress=lambda d, t: snap.append((d, t)))
    finally:
        shipper.stop()
    assert summary["snapshot"] is not None
    size = snap[-1][1]
    assert size >= VALUES * MiB and snap[0] == (0, size) and snap[-1] == (size, size)
    assert len(snap) >= 1 + size // (5 * MiB)  # (a call per part)
    assert [d for d, _t in snap] == sorted(d for d, _t in snap)
    assert wal and wal[-1][0] == wal[-1][1] >= 16 * MiB, wal
    assert [d for d, _t in wal] == sorted(d for d, _t in wal)
