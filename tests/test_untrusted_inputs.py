"""What walstore takes from places it does not control, found by a security probe: a
replica's objects (a tampered snapshot, a damaged manifest), the credentials a user put in
a replica or endpoint URL by mistake, and the current directory (a planted module).

Real processes, real files, a ``file://`` replica (and moto's S3 server where boto3 is the
point); the children run as the ``walstore`` console script does: the repository root on
``sys.path``, never the current directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import walstore
from walstore.errors import ReplicationError

ROOT = str(Path(__file__).resolve().parents[1])
# The console script of this checkout: its own directory (here the repository root) on
# sys.path, not the current directory (``python -m`` would put that first).
SCRIPT = [sys.executable, "-c",
          "import sys\nsys.path[:] = [p for p in sys.path if p != '']\n"
          f"sys.path.insert(0, {ROOT!r})\nfrom walstore.cli import main\nsys.exit(main())"]


def walstore_cli(*args: str, cwd: str | None = None, env: dict | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def walstore_cli_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same command run in this process (click's runner: the CLI's own code, output
    and exit status, without a child's ~0.5 s of imports), as a CompletedProcess; an
    exception escaping the CLI fails the test."""
    from click.testing import CliRunner

    from walstore.cli import main as cli_main
    res = CliRunner().invoke(cli_main, list(args), env=env, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("walstore: "), r.stderr
    return lines[0]


def _read_manifest(rep: str) -> dict:
    with open(os.path.join(rep, "manifest"), "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


def _write_manifest(rep: str, doc: dict) -> None:
    with open(os.path.join(rep, "manifest"), "wb") as f:
        f.write(msgpack.packb(doc, use_bin_type=True))


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> str:
    """A file:// replica with WAL objects and a snapshot of a non-empty store (copied per
    test before it is damaged)."""
    base = tmp_path_factory.mktemp("replica")
    rep = str(base / "rep")
    s = walstore.open(str(base / "src"), replicate_to="file://" + rep,
                      replicate_options={"interval": 0.05, "snapshot_interval": 0.0})
    try:
        for i in range(30):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 200)
        s.sync_replica(timeout=30)
        s.checkpoint()  # LMDB applied to the end: the next snapshot holds the rows
        s._shipper.ship_once()
        with s.transaction() as tx:
            tx.put("last", 1)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    assert any(snap["k"] and snap["lsn"] > 0 for snap in _read_manifest(rep)["snapshots"])
    return rep


def _copy(replica: str, tmp_path) -> str:
    rep = str(tmp_path / "rep")
    shutil.copytree(replica, rep)
    return rep


# ---- 1. a tampered snapshot: never handed to LMDB (SIGBUS) ----------------------------------
def test_a_truncated_snapshot_with_a_matching_manifest_is_named_never_a_sigbus(replica,
                                                                               tmp_path):
    """The newest snapshot cut to its two meta pages + 100 bytes, its size and sha256 in
    the manifest updated to match: `restore`, `replicas --verify` and `restore --follow`
    died with SIGBUS (no message) when LMDB mapped it."""
    rep = _copy(replica, tmp_path)
    doc = _read_manifest(rep)
    snap = max((s for s in doc["snapshots"] if s["k"]), key=lambda s: s["lsn"])
    path = os.path.join(rep, snap["k"])
    with open(path, "rb") as f:
        data = f.read()[:2 * 4096 + 100]
    with open(path, "wb") as f:
        f.write(data)
    snap["n"], snap["sha"] = len(data), hashlib.sha256(data).hexdigest()
    _write_manifest(rep, doc)
    url = "file://" + rep

    # (since audit 52 a restore stands the older snapshot and the WAL after it in for
    # the unreadable one, checked against its state digest, and says so)
    r = walstore_cli("restore", url, str(tmp_path / "dest"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    skip = [ln for ln in r.stdout.splitlines() if f"snapshot LSN {snap['lsn']} skipped" in ln]
    assert skip and snap["k"] in skip[0] and "truncated" in skip[0], r.stdout
    import threading
    stop = threading.Event()
    walstore.replication.follow(url, str(tmp_path / "follow"), stop=stop,
                                on_round=lambda _r: stop.set())
    walstore.open(str(tmp_path / "follow"), readonly=True).close()
    r = walstore_cli("replicas", url, "--verify", "--json")
    assert r.returncode == 1, (r.returncode, r.stderr)
    failed = [c for c in json.loads(r.stdout)["verify"]["checks"] if not c["ok"]]
    assert failed and all(snap["k"] in c["error"] for c in failed)
    got = walstore.restore(url, str(tmp_path / "api"))  # (on the old code, this process died)
    assert [k["key"] for k in got["snapshots_skipped"]] == [snap["k"]]
    assert "not a sound LMDB file" in got["snapshots_skipped"][0]["error"]
    assert got["snapshot_lsn"] < snap["lsn"]


# ---- 4. a damaged manifest: a ReplicationError naming the field -----------------------------
def _wal0(d, **kw):
    d["wal"][0].update(kw)


DAMAGES = {
    "wal entry not a map": (lambda d: d["wal"].__setitem__(0, 5), "wal[0] is 5, not a map"),
    "identity not a map": (lambda d: d.update(identity="hello"), "identity is 'hello'"),
    "position not an LSN": (lambda d: d.update(position="abc"), "position is 'abc'"),
    "wal key outside": (lambda d: _wal0(d, k="../../../etc/passwd"), "wal[0].k is"),
    "wal key in another dir": (lambda d: _wal0(d, k="snapshots/x"), "wal[0].k is"),
    "wal entry lacks n": (lambda d: d["wal"][0].pop("n"), "wal[0] lacks 'n'"),
    "wal range reversed": (lambda d: _wal0(d, a=d["wal"][0]["b"] + 1), "wal[0] covers"),
    "points a list": (lambda d: d.update(points=[1]), "points is [1], not a map"),
    "point not a map": (lambda d: d.update(points={"p": 3}), "points['p'] is 3"),
    "snapshot key outside": (lambda d: [s.update(k="snapshots/../../x") for s in
                                        d["snapshots"] if s["k"]], ".k is"),
    "snapshot lsn a str": (lambda d: d["snapshots"][0].update(lsn="1"), "snapshots[0].lsn"),
    "hole a list": (lambda d: d.update(holes=[[1, 2]]), "holes[0] is [1, 2]"),
    "trash key outside": (lambda d: d.update(trash=[["../x", 1.0]]), "trash[0] is"),
    "open not a map": (lambda d: d.update(open=[1]), "open is [1]"),
    "open txid a str": (lambda d: d.update(open={"1": 2}), "open has '1': 2"),
    "store id a str": (lambda d: d.update(store_id="x"), "store_id is 'x'"),
    "writer a list": (lambda d: d.update(writer=[]), "writer is []"),
    "wal a map": (lambda d: d.update(wal={}), "wal is {}, not a list"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_manifest_is_a_replication_error_naming_the_field(replica, tmp_path,
                                                                     damage):
    """Fields of the wrong type, a missing one, an object key outside the replica: raw
    TypeError / ValueError / KeyError / AttributeError from walstore.restore(), and the
    CLI exited 2 (usage) for most of them."""
    change, words = DAMAGES[damage]
    rep = _copy(replica, tmp_path)
    doc = _read_manifest(rep)
    change(doc)
    _write_manifest(rep, doc)
    url = "file://" + rep
    with pytest.raises(ReplicationError) as e:
        walstore.restore(url, str(tmp_path / "api"))
    assert "manifest" in str(e.value) and "is damaged" in str(e.value) \
        and words in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "api")
    for args in (["restore", url, str(tmp_path / "cli")], ["replicas", url],
                 ["replicas", url, "--verify", "--json"]):
        r = (walstore_cli if args[0] == "restore" else walstore_cli_here)(*args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_the_manifests_walstore_writes_pass_the_check(replica):
    from walstore.replication.manifest import decode
    with open(os.path.join(replica, "manifest"), "rb") as f:
        doc = decode(f.read(), "here")
    assert doc["wal"] and doc["snapshots"]


# ---- 2. credentials in a URL: refused, never shown ------------------------------------------
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # (AWS secret keys often hold a '/')
PIECES = ("wJalrXUtnFEMI", "K7MDENG", "bPxRfiCYEXAMPLEKEY")
BAD_URLS = [f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@mybucket/prefix",
            f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@mybucket:99999/prefix",
            f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@my_bucket!/prefix",
            f"file://AKIAIOSFODNN7EXAMPLE:{SECRET}@localhost/tmp/rep"]
BAD_ENDPOINTS = [f"http://AKIAIOSFODNN7EXAMPLE:{SECRET}@127.0.0.1:9000",
                 f"AKIAIOSFODNN7EXAMPLE:{SECRET}@127.0.0.1:9000",
                 f"https://AKIAIOSFODNN7EXAMPLE:{SECRET.replace('/', '')}@s3.example.com",
                 f"http://AKIAIOSFODNN7EXAMPLE:{SECRET}@127.0.0.1:9000/?a=b"]


def _no_secret(text: str) -> None:
    assert not any(p in text for p in PIECES), text


def _aws_env(**kw: str) -> dict:
    return dict(os.environ, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
                AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", **kw)


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_replica_url_with_credentials_is_refused_without_showing_them(url, tmp_path):
    """A secret with a '/' ends the URL's authority for urlsplit: no user info seen, so
    the refusal was skipped and the bucket-name error printed the whole URL; a port out
    of range raised a raw ValueError."""
    store = str(tmp_path / "s")
    walstore.open(store).close()
    with pytest.raises(ReplicationError) as e:
        walstore.open(str(tmp_path / "api"), replicate_to=url)
    _no_secret(str(e.value))
    assert "user info" in str(e.value)
    with pytest.raises(ReplicationError) as e:
        walstore.restore(url, str(tmp_path / "api-dest"))
    _no_secret(str(e.value))
    env = _aws_env()
    for args in (["replicate", store, url, "--once"], ["restore", url, str(tmp_path / "d")],
                 ["restore", url, str(tmp_path / "f"), "--follow"], ["replicas", url],
                 ["replicas", url, "--verify"]):
        for extra in ([], ["--json"]):
            if "--follow" in args and extra:
                continue
            # (one real child per URL: the console script's path; the rest in-process)
            run = walstore_cli if args[0] == "replicate" and not extra else walstore_cli_here
            r = run(*args, *extra, env=env)
            assert r.returncode in (1, 2), (args, r.returncode, r.stderr)
            assert "user info" in r.stderr and "Traceback" not in r.stderr, r.stderr
            _no_secret(r.stdout + r.stderr)


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_an_endpoint_url_with_credentials_is_refused_without_showing_them(endpoint,
                                                                          tmp_path):
    """``--endpoint-url`` / AWS_ENDPOINT_URL with user info: shown whole when its secret
    held a '/' (as "an invalid port"), or by repr() when it had no scheme."""
    store = str(tmp_path / "s")
    walstore.open(store).close()
    with pytest.raises(ReplicationError) as e:
        walstore.open(str(tmp_path / "api"), replicate_to="s3://mybucket/p",
                      replicate_options={"endpoint_url": endpoint}).close()
    _no_secret(str(e.value))
    url = "s3://mybucket/p"
    for args in (["replicate", store, url, "--once"], ["restore", url, str(tmp_path / "d")],
                 ["replicas", url, "--json"]):
        for how in ("flag", "env"):
            run = walstore_cli if args[0] == "replicate" and how == "env" else walstore_cli_here
            if how == "flag":
                r = run(*args, "--endpoint-url", endpoint, env=_aws_env())
            else:
                r = run(*args, env=_aws_env(AWS_ENDPOINT_URL=endpoint))
            assert r.returncode in (1, 2), (args, how, r.returncode, r.stderr)
            assert "endpoint URL" in r.stderr and "Traceback" not in r.stderr, r.stderr
            _no_secret(r.stdout + r.stderr)


def test_an_at_sign_in_a_replica_prefix_is_not_user_info(tmp_path):
    """The stricter user-info check still takes an '@' inside a path (no ':' before it)."""
    from walstore.replication.targets import check_url, display_url
    check_url("s3://mybucket/agents/a@b")
    check_url(f"file://{tmp_path}/a@b")
    assert display_url("s3://mybucket/agents/a@b") == "s3://mybucket/agents/a@b"
    with walstore.open(str(tmp_path / "s"), replicate_to=f"file://{tmp_path}/r@1",
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=30)
    walstore.restore(f"file://{tmp_path}/r@1", str(tmp_path / "d"))
    with walstore.open(str(tmp_path / "d")) as d:
        assert d.get("a") == 1


# ---- 3. `walstore demo`: nothing from the current directory ---------------------------------
PLANT = '''
import os, sys, importlib
open({marker!r}, "a").write("planted %s ran in pid %d: %r\\n" % (__name__, os.getpid(),
                                                                  sys.argv))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != {here!r}]
del sys.modules[__name__]
_real = importlib.import_module(__name__)
sys.modules[__name__] = _real
globals().update(_real.__dict__)
'''


def _plant(where: Path, module: str) -> Path:
    marker = where / "PLANTED-RAN"
    (where / f"{module}.py").write_text(PLANT.format(marker=str(marker), here=str(where)))
    return marker


def test_demo_children_never_import_from_the_current_directory(tmp_path):
    """`walstore demo` started its worker and `walstore recover` with ``python -m``: the
    current directory first on their sys.path, so a msgpack.py there ran."""
    cwd = tmp_path / "untrusted"
    cwd.mkdir()
    marker = _plant(cwd, "msgpack")
    r = walstore_cli("demo", str(tmp_path / "demo"), cwd=str(cwd), timeout=300)
    assert not marker.exists(), marker.read_text()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Every acknowledged step survived" in r.stdout


# ---- 5. --handlers: the named module from the current directory, nothing else ---------------
def test_handlers_leave_the_current_directory_off_sys_path(tmp_path, monkeypatch):
    from walstore.cli.common import load_handlers
    (tmp_path / "cwdhandlers_x1.py").write_text("COMPENSATORS = {'f': print}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    try:
        assert {n: f.__wrapped__ for n, f in load_handlers("cwdhandlers_x1").items()} == \
                {"f": print}  # (each compensator wrapped: a sys.exit in it fails it)
        assert sys.path == before
        load_handlers("walstore.demo_payments")  # (found elsewhere: cwd never searched)
        assert sys.path == before
    finally:
        sys.modules.pop("cwdhandlers_x1", None)


def test_restore_handlers_do_not_make_boto3_come_from_the_current_directory(tmp_path):
    """`restore --compensate --handlers myhandlers` put the current directory first on
    sys.path for the rest of the command: boto3 (imported afterwards, for the s3://
    replica) was a planted boto3.py there."""
    support = pytest.importorskip("test_replication_support")
    moto_server = support.moto_server
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = _aws_env()
        env.pop("AWS_ENDPOINT_URL", None)
        rep = support.boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="x", aws_secret_access_key="y")
        rep.create_bucket(Bucket="walstore-handlers-cwd")
        url = "s3://walstore-handlers-cwd/x"
        r = subprocess.run([sys.executable, "-c",
                            "import sys, walstore\ns = walstore.open(sys.argv[1], "
                            "replicate_to=sys.argv[2], replicate_options={'endpoint_url': "
                            "sys.argv[3], 'interval': 0.05})\nwith s.transaction() as tx:\n"
                            "    tx.put('a', 1)\ns.sync_replica(timeout=30)\ns.close()\n",
                            str(tmp_path / "src"), url, endpoint], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        cwd = tmp_path / "work"
        cwd.mkdir()
        (cwd / "myhandlers.py").write_text("COMPENSATORS = {}\n")
        marker = _plant(cwd, "boto3")
        r = walstore_cli("restore", url, str(tmp_path / "dest"), "--endpoint-url", endpoint,
                         "--compensate", "--handlers", "myhandlers", cwd=str(cwd), env=env)
        assert not marker.exists(), marker.read_text()
        assert r.returncode == 0, r.stderr
        with walstore.open(str(tmp_path / "dest")) as d:
            assert d.get("a") == 1
    finally:
        server.stop()


def test_a_snapshots_applied_row_of_the_wrong_length_is_named(replica, tmp_path):
    """A snapshot whose ``meta/applied`` is 3 bytes (the manifest's size and sha256 made to
    match): `restore` said "undecodable data (error: unpack requires a buffer of 8
    bytes)", naming no row (a review of the u64-row fix: this read was left raw)."""
    import lmdb
    rep = _copy(replica, tmp_path)
    doc = _read_manifest(rep)
    snap = max((s for s in doc["snapshots"] if s["k"]), key=lambda s: s["lsn"])
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(rep, snap["k"]), work / "data.mdb")
    env = lmdb.open(str(work), max_dbs=32, subdir=True)
    meta = env.open_db(b"meta", create=False)  # (before the write txn: it takes one)
    with env.begin(write=True) as txn:
        txn.put(b"applied", b"abc", db=meta)
    env.close()
    data = (work / "data.mdb").read_bytes()
    with open(os.path.join(rep, snap["k"]), "wb") as f:
        f.write(data)
    snap["n"], snap["sha"] = len(data), hashlib.sha256(data).hexdigest()
    _write_manifest(rep, doc)
    url = "file://" + rep
    # (since audit 52 the older snapshot and the WAL after it stand in, and the report
    # names the skipped one and why)
    got = walstore.restore(url, str(tmp_path / "api"))
    err = got["snapshots_skipped"][0]["error"]
    assert "'applied'" in err and "u64" in err, got["snapshots_skipped"]
    r = walstore_cli_here("restore", url, str(tmp_path / "cli"))
    assert r.returncode == 0 and "'applied'" in r.stdout and "unpack requires" not in r.stdout
