"""The operator's command line, through click's CliRunner (and a real process where the
point is another process): init, put/get/delete/scan, log, dump, stats, verify,
checkpoint, backup (while a writer is running), demo; exit codes 0/1/2 and --json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, code: int = 0):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    return r


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "s")
    run("init", path)
    return path


def test_init_creates_a_store_and_refuses_twice(tmp_path):
    path = str(tmp_path / "s")
    assert "created store" in run("init", path).output
    assert (tmp_path / "s" / "STORE").is_file()
    run("init", path, code=2)


def test_init_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "other.txt").write_text("hello")
    r = run("init", str(tmp_path), code=2)
    assert "not empty" in r.output


def test_put_get_delete_scan_round_trip(store_path):
    run("put", store_path, "agent/plan", '{"steps": [1, 2], "ok": true}')
    run("put", store_path, "agent/name", '"planner"')
    run("put", store_path, "hex:00ff", "42")  # a bytes key written as hex
    assert json.loads(run("get", store_path, "agent/plan").output) == {"steps": [1, 2], "ok": True}
    assert json.loads(run("get", store_path, "hex:00ff").output) == 42
    doc = json.loads(run("scan", store_path, "--prefix", "agent/", "--json").output)
    assert [i["key"] for i in doc["items"]] == ["agent/name", "agent/plan"]
    human = run("scan", store_path).output.splitlines()
    assert human[0].split() == ["KEY", "VALUE"] and len(human) == 4
    run("delete", store_path, "agent/name")
    run("get", store_path, "agent/name", code=1)
    run("delete", store_path, "agent/name", code=1)
    with walstore.open(store_path) as s:
        assert s.get("agent/name") is None and s.get(b"\x00\xff") == 42


def test_put_rejects_bad_json_with_usage_error(store_path):
    r = run("put", store_path, "k", "{not json", code=2)
    assert "JSON" in r.output


def test_commands_on_a_path_that_is_not_a_store_exit_2(tmp_path):
    for args in (["get", str(tmp_path), "k"], ["stats", str(tmp_path)], ["log", str(tmp_path)],
                 ["verify", str(tmp_path)], ["dump", str(tmp_path)],
                 ["recover", str(tmp_path)], ["checkpoint", str(tmp_path)]):
        r = run(*args, code=2)
        assert "not a walstore store" in r.output or "not a" in r.output


def test_log_lists_transactions_newest_first_with_meta(store_path):
    with walstore.open(store_path) as s:
        for i in range(3):
            with s.transaction(meta={"step": i}) as tx:
                tx.put("k", i)
    doc = json.loads(run("log", store_path, "--json").output)
    assert [t["meta"] for t in doc["transactions"]] == [{"step": 2}, {"step": 1}, {"step": 0}]
    assert set(doc["transactions"][0]) >= {"txid", "lsn", "timestamp", "meta", "keys"}
    r = run("log", store_path, "--limit", "2")
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["TXID", "LSN", "TIME"] and len(lines) == 3
    # a cut list says so (on stderr), a whole one does not
    assert "older ones with --limit N" in r.stderr
    assert "older" not in run("log", store_path, "--limit", "3").stderr
    assert json.loads(run("log", store_path, "--json", "--limit", "2").stdout)["more"] is True
    assert json.loads(run("log", store_path, "--json").stdout)["more"] is False


def test_log_json_shows_the_tags_of_a_commit(store_path):
    # (an integration's tags on a COMMIT -- the OpenAI session's "openai-run" -- were in
    # the log but not in ``walstore log --json``: an operator could not tell such work)
    from walstore.agent.scope import add_commit_tag
    with walstore.open(store_path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
            add_commit_tag(tx, "openai-run")
        with s.transaction() as tx:
            tx.put("k", 2)
    doc = json.loads(run("log", store_path, "--json").output)
    assert [t["tags"] for t in doc["transactions"]] == [[], ["openai-run"]]


def test_dump_shows_records_from_an_lsn(store_path):
    with walstore.open(store_path) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        lsn = tx.lsn
        with s.transaction() as tx:
            tx.put("b", {"x": b"\x01"})
    recs = json.loads(run("dump", store_path, "--json").output)["records"]
    commits = [r for r in recs if r["type"] == "COMMIT"]
    assert [w["key"] for r in commits for w in r["payload"]["w"]] == ["a", "b"]
    assert commits[1]["payload"]["w"][0]["value"] == {"x": {"base64": "AQ=="}}
    later = json.loads(run("dump", store_path, "--from", str(lsn + 1), "--json").output)
    assert all(r["lsn"] > lsn for r in later["records"])
    assert "COMMIT" in run("dump", store_path).output


def test_stats_json_has_stable_keys(store_path):
    run("put", store_path, "a", "1")
    doc = json.loads(run("stats", store_path, "--json").output)
    for key in ("path", "store_id", "keys", "applied_lsn", "wal_segments", "lmdb_map_size"):
        assert key in doc
    assert doc["keys"] == 1


def test_verify_ok_then_finds_damage(store_path):
    with walstore.open(store_path, segment_size=65536) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"k{i}", "v" * 200)
    doc = json.loads(run("verify", store_path, "--json").output)
    assert doc["ok"] and doc["records"] > 300
    # flip a byte inside the first record of the first segment: durable data damaged
    first = sorted((Path(store_path) / "wal").glob("*.wal"))[0]
    with open(first, "r+b") as f:
        f.seek(64 + 40)
        b = f.read(1)
        f.seek(64 + 40)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run("verify", store_path, code=1)
    assert "problem" in r.output


def test_checkpoint_trims_the_wal(tmp_path):
    path = str(tmp_path / "s")
    s = walstore.open(path, segment_size=65536, checkpoint_bytes=1 << 40)
    for i in range(400):
        with s.transaction() as tx:
            tx.put(f"k{i}", "v" * 300)
    segs_before = len(list((tmp_path / "s" / "wal").glob("*.wal")))
    s._drop_like_a_crash()
    doc = json.loads(run("checkpoint", path, "--json").output)
    # the recovery at open checkpoints after its REDO; then `checkpoint` itself: together
    # they leave the active segment (and at most the one before)
    assert segs_before > 2 and doc["applied_lsn"] == doc["keep_lsn"]
    assert len(list((tmp_path / "s" / "wal").glob("*.wal"))) <= 2


def test_backup_while_a_writer_process_runs_is_consistent(tmp_path):
    """Backup from another process while tools/writer.py commits: the copy opens, verifies,
    and holds every transaction whose ACK came before the backup started."""
    path = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "writer.py"), str(path),
                             "--mode", "fill", "--seconds", "20", "--segment-size", "65536",
                             "--checkpoint-bytes", "150000"],
                            stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked.append(json.loads(line.split(" ", 2)[2]))
            if len(acked) >= 150:
                break
        before = list(acked)
        r = subprocess.run([sys.executable, "-m", "walstore", "backup", str(path),
                            str(tmp_path / "copy"), "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    with walstore.open(str(tmp_path / "copy")) as copy:
        state = dict(copy.scan())
    for a in before:
        for k, v in a["writes"].items():
            assert state.get(k) == v, f"backup lacks acknowledged {k}"
    from walstore.ops.verify import verify_store
    assert verify_store(str(tmp_path / "copy")).ok


def test_backup_refuses_a_non_empty_destination(store_path, tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("x")
    run("backup", store_path, str(tmp_path / "dest"), code=2)


def test_demo_runs_end_to_end_touching_nothing_of_the_users(tmp_path):
    env = dict(os.environ)
    mine = {"project/app.py": "my app\n", "staging.txt": "my release\n",
            "payments.jsonl": "{}\n"}  # the names the demo's agents use, beside PATH
    for rel, text in mine.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    r = subprocess.run([sys.executable, "-m", "walstore", "demo", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Every acknowledged step survived" in r.stdout
    assert "Done" in r.stdout
    assert {rel: (tmp_path / rel).read_text() for rel in mine} == mine
    assert (tmp_path / "demo-demo-files" / "payments.jsonl").exists()
    again = subprocess.run([sys.executable, "-m", "walstore", "demo", str(tmp_path / "new")],
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0  # (a second demo beside the first: its own side directory)
    (tmp_path / "third-demo-files").mkdir()
    taken = subprocess.run([sys.executable, "-m", "walstore", "demo", str(tmp_path / "third")],
                           capture_output=True, text=True, timeout=120, env=env)
    assert taken.returncode == 2 and "third-demo-files" in taken.stderr
    assert not (tmp_path / "third").exists()


def test_usage_errors_exit_2():
    run("log", code=2)
    run("no-such-command", code=2)
    run("recover", "x", "--mode", "bogus", code=2)


def test_get_on_a_store_locked_by_a_writer_still_reads(store_path):
    """Read-only commands work while another process holds the writer lock."""
    holder = subprocess.Popen([sys.executable, "-c",
                               "import walstore,sys,time; s=walstore.open(sys.argv[1]);"
                               "tx=s.transaction(); tx.put('live', 7); tx.commit();"
                               "print('READY', flush=True); time.sleep(30)", store_path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "READY"
        assert json.loads(run("get", store_path, "live").output) == 7
        r = run("put", store_path, "x", "1", code=1)
        assert "locked by process" in r.output and str(holder.pid) in r.output
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)


def test_verify_while_a_writer_commits_and_checkpoints_finds_no_error(tmp_path):
    """verify is read-only and may run beside a live writer (in this process: they share
    one LMDB environment): segments trimmed under it and a moving tail are not errors."""
    import threading
    from walstore.ops.verify import verify_store
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", segment_size=65536, checkpoint_bytes=200000)
    stop = threading.Event()

    def writer():
        # (paced: unpaced, the writer outran verify, whose full reads grew with the
        # history it wrote; on a slow CI host the pair fed each other for minutes and the
        # test process reached 2.6 GB)
        i = 0
        while not stop.is_set():
            with s.transaction() as tx:
                tx.put(f"k{i % 500}", "x" * 200)
            i += 1
            if i % 20 == 0:
                time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        reports = [verify_store(path) for _ in range(8)]
    finally:
        stop.set()
        t.join()
        s.close()
    assert all(r.ok for r in reports), [r.errors for r in reports if not r.ok][:1]
    assert sum(r.records for r in reports) > 0


def _crashed_store(path, n: int = 600) -> None:
    """A store killed after LMDB applied everything: several WAL segments kept."""
    subprocess.run([sys.executable, "-c", f"""
import os, time, walstore
s = walstore.open({str(path)!r}, segment_size=16384, checkpoint_bytes=1 << 30)
for i in range({n}):
    with s.transaction() as tx:
        tx.put(f"k{{i:05d}}", {{"v": i, "pad": "x" * 200}})
s._engine.drain()
os._exit(0)
"""], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_backup_checks_every_byte_it_copies_below_the_applied_lsn_too(tmp_path):
    """Damage in a segment LMDB already applied was copied unchecked: backup exited 0 and
    its copy was refused by every open (CorruptionError).  It refuses now, naming it."""
    src, dest = tmp_path / "src", tmp_path / "copy"
    _crashed_store(src)
    segs = sorted((src / "wal").glob("*.wal"))
    assert len(segs) > 4
    with open(segs[3], "r+b") as f:  # a byte inside its first record
        f.seek(64 + 100)
        b = f.read(1)
        f.seek(64 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = subprocess.run([sys.executable, "-m", "walstore", "backup", str(src), str(dest)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert segs[3].name in r.stderr and "offset 64" in r.stderr, r.stderr
    assert not dest.exists()


@pytest.mark.parametrize("payload", [{"tx": 50, "ts": 1.0, "meta": None, "w": "x"}, [1, 2, 3],
                                     {"tx": 2**64 - 1, "ts": 1.0, "meta": None, "w": []}],
                         ids=["w-not-a-list", "payload-a-list", "txid-out-of-range"])
def test_dump_reports_a_bad_payload_as_damage_like_verify(store_path, payload):
    """A record with a valid checksum but a payload recovery refuses: dump died with "an
    unexpected error" (no file, offset, LSN) or printed it and exited 0."""
    import msgpack
    from walstore.log.format import encode_record, segment_salt
    for i in range(3):
        run("put", store_path, f"k{i}", str(i))
    recs = json.loads(run("dump", store_path, "--json").output)["records"]
    last = recs[-1]
    start = int(os.path.basename(last["file"])[:20])
    sid = bytes.fromhex(json.load(open(os.path.join(store_path, "STORE")))["store_id"])
    rec = encode_record(segment_salt(sid, start), 1, last["end_lsn"], last["end_lsn"],
                        msgpack.packb(payload))
    with open(last["file"], "r+b") as f:
        f.seek(last["offset"] + 28 + last["length"])
        f.write(rec)
    run("verify", store_path, code=1)
    out = run("dump", store_path, code=1).output
    line = out.strip().splitlines()[-1]
    assert "BAD-PAYLOAD" in line and last["file"] in line and str(last["end_lsn"]) in line, out
    assert f"offset {last['offset'] + 28 + last['length']}" in line, out


def test_recover_offers_what_its_hint_promises_when_lmdb_is_lost(tmp_path):
    """Every command's hint said "`walstore recover PATH` shows the options" for a lost
    LMDB data file, and recover only repeated the error.  It names the options now, and
    --rebuild-state rebuilds LMDB from a WAL whole from LSN 0 (the old state kept)."""
    path = tmp_path / "s"
    _crashed_store(path, n=50)
    os.remove(path / "db" / "data.mdb")
    r = run("stats", str(path), code=1)
    assert "shows the options" in r.output
    r = run("recover", str(path), code=1)
    assert "--rebuild-state" in r.output and "backup" in r.output, r.output
    assert not (path / "db" / "data.mdb").exists()  # nothing changed
    r = run("recover", str(path), "--rebuild-state")
    assert "rebuilt from the log" in r.output, r.output
    assert [p.name.startswith("db.damaged.") for p in (path / "quarantine").iterdir()] == [True]
    with walstore.open(str(path)) as s:
        assert s.get("k00049") == {"v": 49, "pad": "x" * 200}
    run("verify", str(path))


def test_recover_says_only_a_backup_helps_when_the_log_cannot_rebuild_lmdb(tmp_path):
    path = tmp_path / "s"
    with walstore.open(str(path), segment_size=16384, checkpoint_bytes=65536) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.put(f"k{i:05d}", {"pad": "x" * 200})
    assert min(p.name for p in (path / "wal").glob("*.wal")) != "0" * 20 + ".wal"
    with open(path / "db" / "data.mdb", "r+b") as f:  # zeroed
        f.write(bytes(os.path.getsize(path / "db" / "data.mdb")))
    r = run("recover", str(path), code=1)
    assert "--rebuild-state" not in r.output and "backup or a replica" in r.output, r.output
    r = run("recover", str(path), "--rebuild-state", code=1)
    assert "cannot be rebuilt" in r.output and "nothing was changed" in r.output, r.output
    assert not (path / "quarantine").exists() or not list((path / "quarantine").iterdir())
