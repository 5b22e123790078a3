"""Audit 52: restore and the shipper's options.  Real stores, real files, moto's real S3
server over HTTP (or file://), the real CLI; no mocks."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from test_replication_support import make_s3_replica, replica, s3_endpoint  # noqa: F401

import walstore
from walstore.cli import main as cli_main


def run_cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def _shipped(path: str, rep, n: int = 3, **extra) -> None:
    with walstore.open(path, replicate_to=rep.url, replicate_options=rep.opts(**extra)) as s:
        for i in range(n):
            with s.transaction() as tx:
                tx.put(f"k{i}", i)
        s.sync_replica(timeout=60)


# ---- 1. a DEST inside the source store's directory, or inside a file:// replica ---------

def test_restore_into_the_store_directory_is_refused_before_anything(replica, tmp_path):
    """Before: accepted; the copy (its own STORE, wal/, db/) landed inside the source
    store's directory, where the store's purge and sweeps own every file."""
    src = str(tmp_path / "src")
    _shipped(src, replica)
    before = sorted(os.listdir(src))
    for dest in (os.path.join(src, "copy"), os.path.join(src, "wal", "copy"),
                 os.path.join(src, "deeper", "copy")):
        with pytest.raises(walstore.ReplicationError, match="inside the store at"):
            walstore.restore(replica.url, dest, replicate_options=replica.opts())
        assert not os.path.exists(dest)
    assert sorted(os.listdir(src)) == before  # nothing made, not even a parent or scratch
    r = run_cli("restore", replica.url, os.path.join(src, "copy"), *replica.cli_args())
    assert r.exit_code == 2, r.output  # (a usage error, as init and backup refuse one)
    assert "inside the store" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    # beside it is fine
    walstore.restore(replica.url, str(tmp_path / "beside"), replicate_options=replica.opts())
    with walstore.open(str(tmp_path / "beside")) as c:
        assert c.get("k2") == 2


def test_restore_into_the_file_replica_directory_is_refused(tmp_path):
    rep_dir = tmp_path / "replica"
    url = f"file://{rep_dir}"
    opts = {"interval": 0.05, "max_backoff": 0.5}
    with walstore.open(str(tmp_path / "src"), replicate_to=url, replicate_options=opts) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=60)
    before = sorted(p for p, _d, _f in os.walk(rep_dir))
    for dest in (rep_dir / "copy", rep_dir / "snapshots" / "copy"):
        with pytest.raises(walstore.ReplicationError, match="inside the replica's directory"):
            walstore.restore(url, str(dest), replicate_options=opts)
    assert sorted(p for p, _d, _f in os.walk(rep_dir)) == before
    r = run_cli("restore", url, rep_dir / "copy")
    assert r.exit_code == 1 and "inside the replica's directory" in r.output, r.output


# ---- 2. a lease_ttl the shipping rounds cannot keep renewed -----------------------------

def test_a_lease_ttl_shorter_than_three_intervals_is_refused(tmp_path):
    """The lease is renewed by the rounds only.  Before: ``interval=1, lease_ttl=0.5``
    (or the CLI's ``--interval 900`` under the default 600 s ttl) was taken, and the lease
    lapsed between every two rounds: a second shipper of the store took it over."""
    from walstore.replication import InProcessSource, Shipper
    url = f"file://{tmp_path / 'rep'}"
    path = str(tmp_path / "s")
    for opts in ({"interval": 1.0, "lease_ttl": 0.5}, {"interval": 900.0, "lease_ttl": 600},
                 {"interval": 1.0, "lease_ttl": 2.9}):
        with pytest.raises(ValueError) as e:
            walstore.open(path, replicate_to=url, replicate_options=opts)
        assert "lease_ttl" in str(e.value) and "interval" in str(e.value), e.value
        assert not os.path.exists(path)  # refused before the store was touched
    with walstore.open(path) as s:
        with pytest.raises(ValueError, match="lease_ttl .* interval"):
            Shipper(InProcessSource(s), url, {"interval": 1.0, "lease_ttl": 0.5})
    assert not os.path.exists(tmp_path / "rep")
    # a lease_ttl not given follows a long interval (three rounds)
    from walstore.replication.options import ReplicateOptions
    assert ReplicateOptions.from_any({"interval": 900}).lease_ttl == 2700
    assert ReplicateOptions.from_any({"interval": 1}).lease_ttl == 600
    # exactly 3 intervals is fine; a restore or a follower takes no lease: not checked
    with walstore.open(path, replicate_to=url,
                       replicate_options={"interval": 0.2, "lease_ttl": 0.6}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=60)
    walstore.restore(url, str(tmp_path / "r"), replicate_options={"interval": 900.0})


def test_cli_replicate_with_a_long_interval_takes_a_lease_of_three_rounds(tmp_path):
    """``walstore replicate`` has no flag for lease_ttl: a long ``--interval`` takes a
    lease lasting three rounds (not refused, and not the default 600 s lapsing between
    rounds of 900 s)."""
    import signal
    import subprocess
    import sys
    import time

    import msgpack
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    url = f"file://{tmp_path / 'rep'}"
    p = subprocess.Popen([sys.executable, "-m", "walstore", "replicate", path, url,
                          "--interval", "900"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        lease = tmp_path / "rep" / "lease"
        deadline = time.monotonic() + 120
        while not (lease.exists() and (tmp_path / "rep" / "manifest").exists()):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        doc = msgpack.unpackb(lease.read_bytes(), raw=False)
        assert doc["expires"] - doc["renewed"] >= 2700 - 1, doc
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---- 3. a damaged or missing newest snapshot: an older one and the WAL stand in ----------

def _manifest(rep) -> dict:
    from walstore.replication.manifest import decode
    return decode(rep.read("manifest"), "test")


def _with_snapshots(path: str, rep) -> tuple[dict, list[dict]]:
    """A store shipped in rounds, a snapshot after each (snapshot_interval 0), until the
    replica lists two snapshots of it; returns its rows and, read after it was closed
    (no round adds one later), the snapshots the manifest lists."""
    import time
    s = walstore.open(path, replicate_to=rep.url,
                      replicate_options=rep.opts(snapshot_interval=0))
    try:
        deadline = time.monotonic() + 120
        r = 0
        while True:
            with s.transaction() as tx:
                for i in range(20):
                    tx.put(f"r{r}-{i}", {"round": r, "i": i})
            r += 1
            s.sync_replica(timeout=60)
            time.sleep(0.1)  # (a snapshot is taken by a round after the WAL shipped)
            snaps = [x for x in _manifest(rep)["snapshots"] if x["k"]]
            if r >= 3 and len({x["lsn"] for x in snaps}) >= 2:
                break
            assert time.monotonic() < deadline, snaps
        s.sync_replica(timeout=60)
        want = dict(s.scan())
    finally:
        s.close()
    return want, [x for x in _manifest(rep)["snapshots"] if x["k"]]


def _rows(path: str) -> dict:
    with walstore.open(path, readonly=True) as c:
        return dict(c.scan())


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_newest_snapshot_is_stood_in_for_by_an_older_one(replica, tmp_path,
                                                                  damage):
    """Before: the newest snapshot's object damaged (a byte flipped) or missing made every
    restore to the end refuse ("is damaged" / "missing"), though an older snapshot and the
    WAL after it, sound in the replica, give the same state."""
    want, snaps = _with_snapshots(str(tmp_path / "src"), replica)
    newest = max(snaps, key=lambda x: x["lsn"])
    t = replica.target()
    try:
        if damage == "missing":
            t.delete(newest["k"])
        else:
            body = bytearray(t.get(newest["k"], 1 << 30)[0])
            body[len(body) // 2] ^= 0xFF
            t.delete(newest["k"])
            t.put(newest["k"], bytes(body))
    finally:
        t.close()
    got = walstore.restore(replica.url, str(tmp_path / "r"), replicate_options=replica.opts())
    assert [k["key"] for k in got["snapshots_skipped"]] == [newest["k"]]
    assert ("missing" if damage == "missing" else "damaged") in \
        got["snapshots_skipped"][0]["error"]
    assert got["snapshot_lsn"] < newest["lsn"]
    assert _rows(str(tmp_path / "r")) == want
    r = run_cli("restore", replica.url, tmp_path / "cli", *replica.cli_args())
    assert r.exit_code == 0, r.output
    assert f"snapshot LSN {newest['lsn']} skipped" in r.output and newest["k"] in r.output
    assert _rows(str(tmp_path / "cli")) == want


def test_a_stand_in_whose_state_differs_from_the_skipped_digest_is_refused(tmp_path):
    """The older snapshot and the WAL must rebuild the state the skipped snapshot recorded
    (its digest in the manifest): a manifest whose digest for it differs refuses the
    restore, nothing at DEST."""
    import msgpack
    from test_replication_support import Replica
    rep = Replica("file", f"file://{tmp_path}/replica", {"interval": 0.05, "max_backoff": 0.5})
    _want, snaps = _with_snapshots(str(tmp_path / "src"), rep)
    newest = max(snaps, key=lambda x: x["lsn"])
    os.remove(tmp_path / "replica" / newest["k"])
    mpath = tmp_path / "replica" / "manifest"
    doc = msgpack.unpackb(mpath.read_bytes(), raw=False, strict_map_key=False)
    for x in doc["snapshots"]:
        if x["k"] == newest["k"]:
            x["st"] = "0" * 64
    mpath.write_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(walstore.ReplicationError, match="differs from the digest"):
        walstore.restore(rep.url, str(tmp_path / "r"), replicate_options=rep.opts())
    assert not os.path.exists(tmp_path / "r")


# ---- 4. max_backoff below interval: failed rounds retried in a busy loop ----------------

def test_failed_rounds_are_not_retried_sooner_than_interval(s3_endpoint, tmp_path):  # noqa: F811
    """``max_backoff`` may be 0 to a day, ``interval`` above 0: with ``max_backoff`` below
    ``interval`` the backoff after a failed round was ``min(max_backoff, ...)``, 0 for
    ``max_backoff=0``: a failing server got rounds in a busy loop (hundreds of requests a
    second at ``interval`` 0.5 s), though a failed round is retried no sooner than
    ``interval`` after it (docs/REPLICATION.md)."""
    import sys
    import time
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tools.replsweep import FaultProxy
    rep = make_s3_replica(s3_endpoint)
    host, port = s3_endpoint.rsplit("/", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)), rep.url.split("/", 3)[3] + "/")
    s = walstore.open(str(tmp_path / "s"), replicate_to=rep.url,
                      replicate_options=rep.opts(endpoint_url=proxy.url, interval=0.5,
                                                 max_backoff=0, max_attempts=1))
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=60)
        proxy.rule = lambda label: "500"  # every request from now on
        with s.transaction() as tx:
            tx.put("b", 2)
        time.sleep(0.5)
        n0 = len(proxy.requests)
        time.sleep(1.5)  # (the busy loop made hundreds a second)
        n = len(proxy.requests) - n0
        assert s.replication().last_error, s.replication()
        # at most one failed round (one request: the first fails) per 0.5 s, with slack
        assert n <= 8, f"{n} requests in 1.5 s against a failing server"
        proxy.rule = None
        s.sync_replica(timeout=60)
    finally:
        s.close()
        proxy.close()


def test_a_follower_does_not_poll_a_failing_server_sooner_than_interval(s3_endpoint,  # noqa: F811
                                                                        tmp_path):
    """The follower's backoff had the same ``min(max_backoff, ...)``: 0 with
    ``max_backoff=0``, a failing server polled in a busy loop."""
    import sys
    import threading
    import time
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tools.replsweep import FaultProxy
    rep = make_s3_replica(s3_endpoint)
    _shipped(str(tmp_path / "src"), rep, n=2)
    host, port = s3_endpoint.rsplit("/", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)), rep.url.split("/", 3)[3] + "/")
    stop = threading.Event()
    errors: list = []
    ready = threading.Event()

    def on_round(info):
        ready.set()
        if info.get("error"):
            errors.append(time.monotonic())

    opts = rep.opts(endpoint_url=proxy.url, max_backoff=0, max_attempts=1)
    t = threading.Thread(target=walstore.replication.follow,
                         args=(rep.url, str(tmp_path / "f"), opts),
                         kwargs={"stop": stop, "interval": 0.5, "on_round": on_round},
                         daemon=True)
    t.start()
    try:
        assert ready.wait(120)
        proxy.rule = lambda label: "500"
        time.sleep(2.0)  # (the busy loop made hundreds a second)
        n = len(errors)
        assert 1 <= n <= 8, f"{n} failed rounds in 2 s"
    finally:
        stop.set()
        t.join(60)
        proxy.close()


# ---- 5. a snapshot whose content is not the state the manifest recorded -----------------

def test_a_snapshot_holding_another_state_is_caught_by_restore_and_verify(tmp_path):
    """The newest snapshot's rows changed (a sound LMDB file; its size and sha256 in the
    manifest made to match, as a replica tampered with together with its manifest, or a
    bad copy uploaded under a recomputed sha): every restore to the end returned the
    changed value, and ``replicas --verify`` passed every check (the state digest the
    manifest recorded for the snapshot was compared only with a state rebuilt from the
    snapshot before it, never with the snapshot's own rows)."""
    import hashlib
    import json

    import lmdb
    import msgpack
    from test_replication_support import Replica
    rep = Replica("file", f"file://{tmp_path}/replica", {"interval": 0.05, "max_backoff": 0.5})
    want, snaps = _with_snapshots(str(tmp_path / "src"), rep)
    newest = max(snaps, key=lambda x: x["lsn"])
    obj = tmp_path / "replica" / newest["k"]
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.mdb").write_bytes(obj.read_bytes())
    env = lmdb.open(str(work), max_dbs=32, subdir=True)
    data = env.open_db(b"data", create=False)
    with env.begin(write=True) as txn:
        k, v = next(iter(txn.cursor(db=data)))
        txn.put(k, v[:-1] + bytes([v[-1] ^ 1]), db=data)  # one value, one bit
    env.close()
    body = (work / "data.mdb").read_bytes()
    obj.write_bytes(body)
    mpath = tmp_path / "replica" / "manifest"
    doc = msgpack.unpackb(mpath.read_bytes(), raw=False, strict_map_key=False)
    for x in doc["snapshots"]:
        if x["k"] == newest["k"]:
            x["n"], x["sha"] = len(body), hashlib.sha256(body).hexdigest()
    mpath.write_bytes(msgpack.packb(doc, use_bin_type=True))

    r = run_cli("replicas", rep.url, "--verify", "--json")
    assert r.exit_code == 1, r.output
    bad = [c for c in json.loads(r.output)["verify"]["checks"] if not c["ok"]]
    assert any(c["check"] == "every snapshot" and newest["k"] in json.dumps(c) for c in bad), bad
    got = walstore.restore(rep.url, str(tmp_path / "r"), replicate_options=rep.opts())
    assert [k["key"] for k in got["snapshots_skipped"]] == [newest["k"]]
    assert "state digest" in got["snapshots_skipped"][0]["error"]
    assert _rows(str(tmp_path / "r")) == want


def test_no_stand_in_across_a_hole(tmp_path):
    """The snapshot the shipper took after a hole is missing: no older snapshot can stand
    in (the WAL from it would cross the hole); refused naming the snapshot and the hole,
    nothing at DEST.  A point before the hole still restores."""
    from walstore import LSN
    from walstore.replication import DirectorySource, Shipper
    url = f"file://{tmp_path}/rep"
    path = str(tmp_path / "src")
    s = walstore.open(path, segment_size=64 * 1024)
    try:
        with s.transaction() as tx:
            tx.put("start", 1)
        sh = Shipper(DirectorySource(path), url, {"interval": 0.05})
        sh.ship_once()
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 500)
        s.checkpoint()  # trims the segments the shipper never read: a hole
        with s.transaction() as tx:
            tx.put("late", 1)
        sh.ship_once()
        sh.ship_once()
        sh.stop()
    finally:
        s.close()
    import msgpack
    doc = msgpack.unpackb((tmp_path / "rep" / "manifest").read_bytes(), raw=False,
                          strict_map_key=False)
    (hole,) = doc["holes"]
    fresh = max((x for x in doc["snapshots"] if x["k"]), key=lambda x: x["lsn"])
    assert fresh["lsn"] >= hole["b"]
    os.remove(tmp_path / "rep" / fresh["k"])
    with pytest.raises(walstore.ReplicationError) as e:
        walstore.restore(url, str(tmp_path / "r"))
    assert fresh["k"] in str(e.value) and "missing" in str(e.value)
    assert f"LSN {hole['a']}..{hole['b']}" in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "r")
    got = walstore.restore(url, str(tmp_path / "before"), to=LSN(hole["a"] - 1))
    assert got["cut_lsn"] == hole["a"] and got["snapshots_skipped"] == []
    assert _rows(str(tmp_path / "before")) == {"start": 1}


def test_verify_and_a_stand_in_work_with_the_temp_directory_inside_a_file_replica(tmp_path):
    """The refusal of a DEST inside the replica's directory is for the user's DEST: the
    copies ``replicas --verify`` and a restore's stand-in check make in the temp directory
    are not refused when that directory lies inside the replica's (TMPDIR under it)."""
    import subprocess
    import sys
    from test_replication_support import Replica
    rep = Replica("file", f"file://{tmp_path}/replica", {"interval": 0.05, "max_backoff": 0.5})
    _want, snaps = _with_snapshots(str(tmp_path / "src"), rep)
    newest = max(snaps, key=lambda x: x["lsn"])
    os.remove(tmp_path / "replica" / newest["k"])
    tmpdir = tmp_path / "replica" / "scratch"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    r = subprocess.run([sys.executable, "-m", "walstore", "restore", rep.url,
                        str(tmp_path / "r")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"snapshot LSN {newest['lsn']} skipped" in r.stdout
    r = subprocess.run([sys.executable, "-m", "walstore", "replicas", rep.url, "--verify",
                        "--json"], env=env, capture_output=True, text=True)
    import json
    checks = {c["check"]: c["ok"] for c in json.loads(r.stdout)["verify"]["checks"]}
    assert checks["restore everything"] and checks["state digest"], checks
    assert not checks["every snapshot"]  # (the missing one is named there)
