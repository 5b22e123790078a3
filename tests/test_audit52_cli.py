"""Audit 52 (the command line and the read APIs behind it: `history`, `log`, `scan`,
`stats`, `init`): regressions found by probing with real processes and real files.

Each test failed before its fix (see the commit naming it):

- `Store.history(key)` and `walstore history` read every version of a key into memory,
  with no way to ask for fewer (no ``limit=``, no ``--limit``);
- `scan --json`, `log --json` and `history --json` cut by Ctrl-C left half a JSON
  document (built whole, then written: the interrupt came while it was written);
- `walstore init PATH` (and `backup`/`restore` DEST, `demo` PATH) made a store inside another
  store's directory (its WAL or LMDB directory, or beside them);
- `walstore stats` showed the read-only handle it opened (durability "full", its own
  64 GiB map, ``readonly`` true, 0 fsyncs) as the store's figures;
- every other `--json` document (`actions`, `files`, `diff`, ...) cut by Ctrl-C too;
- `scan --limit` past sys.maxsize failed (a regression of this audit's streaming);
- `history` beside a writer applying paired the newest version with the value it
  replaced (the value and the history rows read in two read transactions)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import walstore
from test_audit51_cli import (interrupted_with_a_slow_reader, one_line,  # noqa: E402
                             strict)  # (the same checks)

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    e.pop("WALSTORE_DEBUG", None)
    return e


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=120, env=env())


# ---- history: bounded ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def versions_store(tmp_path_factory) -> str:
    """A store whose key "h" has 40 versions (one a delete), and a key "one" with one."""
    path = str(tmp_path_factory.mktemp("hist") / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(40):
            with s.transaction() as tx:
                if i == 20:
                    tx.delete("h")
                else:
                    tx.put("h", {"i": i})
        with s.transaction() as tx:
            tx.put("one", 1)
    return path


def test_history_takes_a_limit_the_newest_versions_first(versions_store):
    """`Store.history(key)` had no bound: a key with a million versions came back whole
    (a list of every version). ``limit=N`` gives the newest N, as ``log(limit=N)``."""
    with walstore.open(versions_store, readonly=True) as s:
        every = s.history("h")
        assert len(every) == 40 and every[0].value == {"i": 39}
        assert s.history("h", limit=5) == every[:5]
        assert s.history("h", limit=40) == every
        assert s.history("h", limit=1000) == every
        assert s.history("h", limit=0) == []
        assert s.history("h", limit=None) == every
        assert s.history("absent", limit=3) == []
        assert list(s.iter_history("h", limit=25)) == every[:25]  # (streamed)
        for bad, exc in ((-1, ValueError), (True, TypeError), ("3", TypeError), (2.0, TypeError)):
            with pytest.raises(exc):
                s.history("h", limit=bad)


def test_history_limit_reads_the_unapplied_tail_and_lmdb_alike(tmp_path):
    """A read-only store beside a writer whose commits are not in LMDB yet: the newest
    versions come from the writer's log tail, the older ones from LMDB; a limit cuts
    across both the same as the full list does."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as w:  # (the first ten in LMDB)
        for i in range(10):
            with w.transaction() as tx:
                tx.put("k", i)
    w = walstore.open(path, durability="none", apply_interval=86400)  # (the next ones
    try:                                                              # stay in the log)
        for i in range(10, 16):
            with w.transaction() as tx:
                tx.put("k", i)
        with walstore.open(path, readonly=True) as r:
            from walstore.codec import encode_key
            assert r._engine.memtable.versions.get(encode_key("k"))  # (the log tail)
            every = r.history("k")
            assert [v.value for v in every] == list(range(15, -1, -1))
            for n in (1, 3, 6, 7, 12, 16, 20):
                assert r.history("k", limit=n) == every[:n], n
    finally:
        w.close()


def test_history_beside_a_writer_applying_never_pairs_a_version_with_anothers_value(
        tmp_path):
    """`history` read the key's current value, then (another read transaction) the
    newest history rows: a writer applying a new version of the key between the two made
    the newest version show the value it had replaced (a reader's history said txid 5155
    held what txid 5153 wrote: the state recorded and what is shown disagreed).  Both
    are read in one read transaction now.  A writer process commits ``k = txid - 1`` as
    fast as it can, applying each at once; a reader checks every version it is shown
    (a race: on the code before, 2 of 3 runs of 10 s failed)."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        with s.transaction() as tx:
            tx.put("k", 0)  # (txid 1)
    code = (f"import time, walstore\n"
            f"s = walstore.open({path!r}, durability='none', apply_interval=0.001, "
            f"apply_batch=1)\n"
            f"i, end = 1, time.monotonic() + 10\n"
            f"while time.monotonic() < end:\n"
            f"    with s.transaction() as tx: tx.put('k', i)\n"
            f"    i += 1\n"
            f"    if i % 2: s._engine.drain()  # (applied now, in this thread)\n"
            f"s.close()\n")
    writer = subprocess.Popen([sys.executable, "-c", code], env=env())
    wrong, seen = [], 0
    try:
        with walstore.open(path, readonly=True) as r:
            while writer.poll() is None:
                for v in r.history("k", limit=1):
                    seen += 1
                    if v.value != v.txid - 1:
                        wrong.append(v)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert seen > 1000 and not wrong, (seen, wrong[:5])


def test_walstore_history_takes_limit_and_says_when_there_are_older_ones(versions_store):
    """`walstore history` had no --limit (every version, always); ``--limit N`` shows the
    newest N and says, as `log` does, that there are older ones (JSON ``more``)."""
    p = run("history", versions_store, "h", "--limit", "5", "--json")
    assert p.returncode == 0, p.stderr
    doc = strict(p.stdout)
    assert doc["key"] == "h" and doc["more"] is True
    assert [v["value"] for v in doc["versions"]] == [{"i": i} for i in range(39, 34, -1)]
    doc = strict(run("history", versions_store, "h", "--limit", "40", "--json").stdout)
    assert len(doc["versions"]) == 40 and doc["more"] is False
    doc = strict(run("history", versions_store, "h", "--json").stdout)  # (no limit: all)
    assert len(doc["versions"]) == 40 and doc["more"] is False
    assert sum(v["deleted"] for v in doc["versions"]) == 1
    doc = strict(run("history", versions_store, "absent", "--json").stdout)
    assert doc == {"key": "absent", "versions": [], "more": False}
    p = run("history", versions_store, "h", "--limit", "3")
    assert p.returncode == 0, p.stderr
    rows = p.stdout.splitlines()
    assert rows[0].split() == ["TXID", "LSN", "VALUE"] and len(rows) == 4
    assert "newest 3" in p.stderr and "Traceback" not in p.stderr
    p = run("history", versions_store, "one", "--limit", "3")
    assert len(p.stdout.splitlines()) == 2 and p.stderr == ""
    p = run("history", versions_store, "h", "--limit", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_listings_longer_than_a_page_are_whole_and_aligned(tmp_path):
    """`scan`, `log` and `history` print their tables a page at a time now: every row is
    there, in order, and the columns stay aligned."""
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(1203):
            with s.transaction() as tx:
                tx.put(f"k{i:05d}", i)
                tx.put("h", i)
    p = run("scan", path, "--prefix", "k")
    assert p.returncode == 0, p.stderr
    rows = p.stdout.splitlines()
    assert len(rows) == 1204 and rows[1].split() == ["k00000", "0"]
    assert [r.split()[0] for r in rows[1:]] == [f"k{i:05d}" for i in range(1203)]
    assert len({r.index(r.split()[1], len(r.split()[0])) for r in rows[1:]}) == 1
    p = run("history", path, "h")
    assert [r.split()[2] for r in p.stdout.splitlines()[1:]] == [
        str(i) for i in range(1202, -1, -1)]
    p = run("log", path, "--limit", "1203")
    assert len(p.stdout.splitlines()) == 1204 and p.stderr == ""
    doc = strict(run("log", path, "--limit", "1000", "--json").stdout)
    assert len(doc["transactions"]) == 1000 and doc["more"] is True
    doc = strict(run("scan", path, "--limit", "7", "--json").stdout)
    assert [i["key"] for i in doc["items"]] == ["h"] + [f"k{i:05d}" for i in range(6)]


def test_a_limit_past_sys_maxsize_lists_everything(versions_store):
    """`scan --limit N` (streamed since this audit) cut its stream with itertools.islice,
    which refuses a stop past sys.maxsize: `scan --limit 99999999999999999999999` failed
    with "ValueError ... (an unexpected error)", exit 1, where it had listed every key
    (click takes any int).  `log` and `history` take it too."""
    huge = str(10 ** 23)
    for args, listed, n in ((["scan", versions_store], "items", 2),
                            (["log", versions_store], "transactions", 41),
                            (["history", versions_store, "h"], "versions", 40)):
        p = run(*args, "--limit", huge, "--json")
        assert p.returncode == 0, (args, p.stderr)
        assert len(strict(p.stdout)[listed]) == n
        p = run(*args, "--limit", huge)
        assert p.returncode == 0 and p.stderr == "", (args, p.stderr)


# ---- Ctrl-C mid-document ------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> str:
    """Each of scan / log / history --json prints far more than a pipe's buffer."""
    path = str(tmp_path_factory.mktemp("big") / "s")
    with walstore.open(path, durability="none") as s:
        for i in range(3000):
            with s.transaction(meta={"step": i, "note": "n" * 40}) as tx:
                tx.put(f"k{i:05d}", "v" * 100)
                tx.put("h", {"i": i, "pad": "p" * 60})
    return path


@pytest.mark.parametrize("args", [["scan", "--json"], ["log", "--limit", "3000", "--json"],
                                  ["history", "h", "--json"]], ids=["scan", "log", "history"])
def test_json_listing_interrupted_mid_document_is_still_one_json_document(big_store, args):
    """`scan --json`, `log --json` and `history --json` built the whole document, then
    wrote it: Ctrl-C while it was written (the reader slow, the pipe full) left stdout in
    the middle of it, no JSON document, and the error document was not printed either
    (one had begun).  Streamed now, as `dump --json`: the document is closed with
    ``"error": "interrupted (Ctrl-C)"``, exit 130."""
    name = args[0]
    code, out, err = interrupted_with_a_slow_reader([name, big_store, *args[1:]], env())
    assert code == 130, (code, err)
    doc = strict(out)
    listed = {"scan": "items", "log": "transactions", "history": "versions"}[name]
    assert isinstance(doc[listed], list) and "interrupted" in doc["error"], doc.get("error")
    assert "Traceback" not in err
    assert err.strip() == f"walstore: {name} interrupted (Ctrl-C)"


def test_a_json_document_written_whole_is_never_cut_by_ctrl_c(tmp_path):
    """The verbs that print one JSON document at once (`files`, `diff`, `recover`,
    `verify`, `replicas` ...) were cut by a Ctrl-C while the reader was slow:
    `actions --json` of 3,000 actions stopped at 64 KiB (a pipe's buffer), mid-string,
    exit 130, and no error document followed (one had begun).  SIGINT is held while the
    document is written and taken after it: the document whole, then exit 130.
    (`actions --json`, `diff --json` and `files --json` are streamed since audit 53, as
    `log --json`: their document is closed with ``"error"``, at any depth; `actions
    --pending --json` is written whole.)"""
    path = str(tmp_path / "s")
    root = tmp_path / "ws"
    root.mkdir()
    with walstore.open(path, durability="none") as s:
        ws = s.workspace(str(root))
        with s.transaction() as tx:
            f = tx.files(ws)
            for i in range(3000):  # (~1.7 MB of JSON)
                with tx.action("charge", args={"n": i, "pad": "p" * 100}) as a:
                    a.result = {"ok": i}
                tx.put(f"k{i:05d}", "p" * 100)
                if i < 600:
                    f.write(f"d/file-{i:05d}.txt", "x")
        tx = s.transaction()
        for i in range(3000):  # (owed: rolled back, no compensator registered)
            with tx.action("charge", args={"n": i, "pad": "p" * 100}, compensate="refund"):
                pass
        try:
            tx.rollback()
        except walstore.CompensationFailed:
            pass
    for verb, listed in (("actions", "actions"), ("diff", "keys"), ("files", "workspaces")):
        extra = ["--from", "lsn:0"] if verb == "diff" else []
        code, out, err = interrupted_with_a_slow_reader([verb, path, *extra, "--json"], env())
        assert code == 130, (code, err)
        doc = strict(out)
        assert isinstance(doc[listed], list) and "interrupted" in doc["error"], doc
        assert err.strip() == f"walstore: {verb} interrupted (Ctrl-C)"
    code, out, err = interrupted_with_a_slow_reader(["actions", path, "--pending", "--json"],
                                                    env())
    assert code == 130, (code, err)
    doc = strict(out)
    assert len(doc["actions"]) == 3000 and "error" not in doc
    assert err.strip() == "walstore: actions interrupted (Ctrl-C)"


# ---- init inside a store ------------------------------------------------------------------
def test_init_backup_restore_and_demo_refuse_a_path_inside_another_store(tmp_path):
    """`walstore init STORE/wal/x` (or STORE/sub, STORE/db/y, through a symlink) made a
    store among another store's files: inside its WAL directory (its segment listing
    and trims walk there), inside its LMDB directory, or beside them where the outer
    store's backup, restore and purge never look.  Refused now: one line, exit 2
    (a usage error, as `init` of an existing store), nothing created.  `backup` DEST and
    `demo` PATH (which make a store too) refuse the same."""
    outer = tmp_path / "outer"
    assert run("init", str(outer)).returncode == 0
    os.symlink(outer / "db", tmp_path / "link")
    before = {d: sorted(os.listdir(outer / d)) for d in ("", "wal", "db")}
    for inner in (outer / "sub", outer / "wal" / "x", outer / "db" / "y",
                  outer / "a" / "b" / "c", tmp_path / "link" / "z"):
        p = run("init", str(inner))
        assert p.returncode == 2, (inner, p.stdout, p.stderr)
        line = one_line(p)
        assert "inside the store" in line and str(outer) in line, line
        assert not os.path.lexists(inner)
    assert {d: sorted(os.listdir(outer / d)) for d in ("", "wal", "db")} == before
    other = tmp_path / "other"
    with walstore.open(str(other)) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
    p = run("backup", str(other), str(outer / "copy"))
    assert p.returncode == 2 and "inside the store" in one_line(p)
    assert not os.path.lexists(outer / "copy")
    p = run("demo", str(outer / "demo"))
    assert p.returncode == 2 and "inside the store" in one_line(p)
    assert not os.path.lexists(outer / "demo")
    # a restore (and a follower) makes a store too
    rep = tmp_path / "rep"
    with walstore.open(str(tmp_path / "src"), replicate_to=f"file://{rep}",
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.sync_replica(timeout=60)
    for extra in ([], ["--follow"]):
        p = run("restore", f"file://{rep}", str(outer / "restored"), *extra)
        assert p.returncode == 2 and "inside the store" in one_line(p), p.stderr
        assert not any(n.startswith("restored") for n in os.listdir(outer))
    assert run("restore", f"file://{rep}", str(tmp_path / "restored")).returncode == 0
    # (beside a store, not inside: as before; nor is a stray file named STORE a store)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "STORE").write_text("my notes")
    assert run("init", str(tmp_path / "home" / "s")).returncode == 0
    assert run("init", str(tmp_path / "beside")).returncode == 0
    assert run("verify", str(outer)).returncode == 0


# ---- stats of a store, not of the CLI's handle --------------------------------------------
def test_stats_shows_the_stores_figures_not_its_read_only_handles(tmp_path):
    """`walstore stats` opens the store read-only and printed that handle's own
    ``stats()``: durability "full" of a store whose writer runs with "none", the reader's
    64 GiB map of one whose writer set a 1 MiB map, ``readonly`` true, 0 fsyncs of a
    store being written.  Now: the handle's own fields are null (``-``), the map size is
    the one in ``data.mdb`` (the writer's), and ``lmdb_bytes`` is that file's size."""
    path = str(tmp_path / "s")
    w = walstore.open(path, durability="none", map_size=1 << 20)
    try:
        for i in range(20):
            with w.transaction() as tx:
                tx.put(f"k{i}", "v" * 100)
        w.checkpoint()
        mine = w.stats()
        p = run("stats", path, "--json")
        assert p.returncode == 0, p.stderr
        doc = strict(p.stdout)
        assert doc["durability"] is None and doc["readonly"] is None
        assert doc["wal_fsyncs"] is None and doc["wal_rotations"] is None
        assert doc["lmdb_map_size"] == mine["lmdb_map_size"] == 1 << 20
        assert doc["lmdb_bytes"] == os.path.getsize(os.path.join(path, "db", "data.mdb"))
        assert doc["keys"] == 20 and doc["store_id"] == mine["store_id"]
        p = run("stats", path)
        lines = dict(ln.split(None, 1) for ln in p.stdout.splitlines())
        assert lines["durability"].strip() == "-" and lines["readonly"].strip() == "-"
        assert lines["lmdb_map_size"].strip() == str(1 << 20)
    finally:
        w.close()
