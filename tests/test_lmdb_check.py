"""Damaged LMDB data files are refused by walstore.engine.lmdb_check before LMDB maps them.

A real store is built with walstore.open, then its db/data.mdb is damaged (truncated at
several sizes, meta pages zeroed or altered, random bytes, missing, replaced by a FIFO or a
directory); check_lmdb_files must raise CorruptionError naming the file, and do so in a child
process that exits normally (the check itself never maps the file, so it cannot SIGBUS).
Healthy files must pass: the store undamaged, a foreign LMDB environment, and LMDB files that
legitimately end before their last page number (pages freed in the same transaction are
never written) -- including while another process is committing to them.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import lmdb
import pytest

import walstore
from walstore.errors import CorruptionError
from walstore.engine.lmdb_check import (DATA_FILE, LOCK_FILE, LmdbFileInfo, check_lmdb_data_file,
                                 check_lmdb_files)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS64 = struct.calcsize("P") == 8
needs64 = pytest.mark.skipif(not IS64, reason="meta offsets below are the 64-bit layout")

# offsets inside a meta page of the 64-bit layout (16-byte page header, then MDB_meta)
MAGIC, VERSION, PSIZE, FREE_FLAGS, FREE_DEPTH, FREE_ROOT = 16, 20, 40, 44, 46, 80
MAIN_FLAGS, MAIN_ROOT, LAST_PG, TXNID = 92, 128, 136, 144

CHILD = r"""
import json, sys
from walstore.errors import CorruptionError
from walstore.engine.lmdb_check import check_lmdb_files
try:
    info = check_lmdb_files(sys.argv[1])
    print(json.dumps({"outcome": "ok", "txnid": info.txnid if info else None}))
except CorruptionError as e:
    print(json.dumps({"outcome": "corrupt", "file": e.file, "reason": e.reason}))
"""

LMDB_READER = r"""
import lmdb, sys
env = lmdb.open(sys.argv[1], max_dbs=32)
n = 0
with env.begin() as t:
    for name, _ in list(t.cursor()):
        for _kv in t.cursor(db=env.open_db(name, txn=t)):
            n += 1
with env.begin(write=True) as t:   # a write reads and rewrites the free list
    t.put(b"written-by-the-oracle", b"x" * 5000, db=env.open_db(b"oracle", txn=t))
print(n)
"""


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def check_in_child(db_dir: str) -> dict:
    """Run check_lmdb_files in a fresh interpreter; it must exit normally, by no signal."""
    r = subprocess.run([sys.executable, "-c", CHILD, db_dir], capture_output=True, text=True,
                       timeout=60, env=child_env())
    assert r.returncode == 0, (f"check child ended with {r.returncode} "
                               f"(negative = killed by a signal): {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def read_with_lmdb_in_child(db_dir: str) -> subprocess.CompletedProcess:
    """LMDB itself as the oracle: read every record, then commit one write."""
    return subprocess.run([sys.executable, "-c", LMDB_READER, db_dir], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    """A real walstore store: its data.mdb bytes and what LMDB itself reports about it."""
    root = str(tmp_path_factory.mktemp("pristine") / "store")
    with walstore.open(root, durability="none") as s:
        for i in range(120):
            with s.transaction() as tx:
                tx.put(f"key{i % 40}", {"i": i, "pad": "x" * (i * 7 % 300)})
        with s.transaction() as tx:
            tx.put("big", "y" * 20000)      # an overflow page
    db = os.path.join(root, "db")
    env = lmdb.open(db, readonly=True, lock=False, max_dbs=32)
    facts = {"info": env.info(), "stat": env.stat()}
    env.close()
    with open(os.path.join(db, DATA_FILE), "rb") as f:
        data = f.read()
    return {"root": root, "db": db, "data": data, **facts}


@pytest.fixture
def damaged_dir(tmp_path, pristine):
    """A copy of the pristine store's db directory; returns (db_dir, data_path)."""
    db = str(tmp_path / "db")
    shutil.copytree(pristine["db"], db)
    return db, os.path.join(db, DATA_FILE)


def newest_meta_offset(data: bytes) -> int:
    t0 = struct.unpack_from("<Q", data, TXNID)[0]
    t1 = struct.unpack_from("<Q", data, 4096 + TXNID)[0]
    return 4096 if t1 > t0 else 0


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# ---------------------------------------------------------------------------------------
# the undamaged store, and structurally valid files

def test_undamaged_store_passes_and_reports_what_lmdb_reports(pristine):
    info = check_lmdb_files(pristine["db"])
    assert isinstance(info, LmdbFileInfo)
    assert info.page_size == pristine["stat"]["psize"]
    assert info.last_page == pristine["info"]["last_pgno"]
    assert info.txnid == pristine["info"]["last_txnid"]
    assert info.entries == pristine["stat"]["entries"]        # walstore's named DBs
    assert info.named_dbs == pristine["stat"]["entries"]
    assert info.file_size == len(pristine["data"])
    assert info.map_size >= (info.last_page + 1) * info.page_size
    assert info.meta_page == info.txnid % 2
    assert 2 < info.pages_in_use <= info.last_page + 1
    assert info.tail_verified
    assert check_in_child(pristine["db"])["outcome"] == "ok"


def test_foreign_lmdb_environment_passes_because_it_is_structurally_valid(tmp_path):
    """Another program's LMDB env has the right format: this check cannot tell it apart
    (walstore's own records -- store id, applied LSN -- must)."""
    env = lmdb.open(str(tmp_path / "foreign"), max_dbs=4)
    with env.begin(write=True) as t:
        other = env.open_db(b"something-else", txn=t, dupsort=True)
        for i in range(500):
            t.put(b"a%d" % (i % 9), b"dup%05d" % i, db=other)
            t.put(b"plain%d" % i, os.urandom(50))
    env.close()
    info = check_lmdb_files(str(tmp_path / "foreign"))
    assert info is not None and info.entries == 501
    assert info.named_dbs is None     # its main DB outgrew one page: named DBs are not read
    assert check_in_child(str(tmp_path / "foreign"))["outcome"] == "ok"


def test_missing_or_empty_file_is_fine_for_a_brand_new_store(tmp_path):
    assert check_lmdb_files(str(tmp_path / "nothing-here"), expect_existing=False) is None
    os.makedirs(tmp_path / "db")
    assert check_lmdb_files(str(tmp_path / "db"), expect_existing=False) is None
    (tmp_path / "db" / DATA_FILE).write_bytes(b"")   # a crash between create and first write
    assert check_lmdb_files(str(tmp_path / "db"), expect_existing=False) is None
    with pytest.raises(CorruptionError, match="empty"):
        check_lmdb_files(str(tmp_path / "db"))


def test_new_store_directory_is_checked_clean_after_walstore_creates_it(tmp_path):
    root = str(tmp_path / "s")
    with walstore.open(root, durability="none"):
        info = check_lmdb_files(os.path.join(root, "db"))   # while the store has it open
        assert info is not None and info.txnid >= 1


# ---------------------------------------------------------------------------------------
# the damage matrix

def _truncate(n):
    return lambda data: data[:n(data) if callable(n) else n]


DAMAGE = {
    # name: (damage(data) -> bytes | None (= delete the file), expected reason pattern)
    "truncated-0": (_truncate(0), "empty"),
    "truncated-100": (_truncate(100), "too short"),
    "truncated-4KiB": (_truncate(4096), "too short .* both meta pages"),
    "truncated-8KiB": (_truncate(8192), "truncated"),
    "truncated-half": (_truncate(lambda d: len(d) // 2), "truncated"),
    "truncated-size-minus-1-page": (_truncate(lambda d: len(d) - 4096), "truncated"),
    "truncated-size-minus-1-byte": (_truncate(lambda d: len(d) - 1), "truncated"),
    "zeroed-meta-0": (lambda d: bytes(4096) + d[4096:], "meta page 0 is all zero"),
    "zeroed-meta-1": (lambda d: d[:4096] + bytes(4096) + d[8192:], "meta page 1 is all zero"),
    "zeroed-both-metas": (lambda d: bytes(8192) + d[8192:], "both LMDB meta pages are invalid"),
    "zeroed-whole-file": (lambda d: bytes(len(d)), "both LMDB meta pages are invalid"),
    "random-bytes-same-size": (lambda d: random.Random(7).randbytes(len(d)),
                               "both LMDB meta pages are invalid"),
    "missing": (lambda d: None, "missing"),
    "bad-magic": (lambda d: patch(d, MAGIC, "<I", 0xDEADBEEF), "bad magic"),
    "other-byte-order": (lambda d: patch(d, MAGIC, ">I", 0xBEEFC0DE), "other byte order"),
    "unknown-version": (lambda d: patch(d, VERSION, "<I", 2), "unknown format version 2"),
    "devel-version": (lambda d: patch(d, 4096 + VERSION, "<I", 999), "MDB_DEVEL"),
    "page-size-zero": (lambda d: patch(d, PSIZE, "<I", 0), "impossible page size 0"),
    "page-size-not-power-of-2": (lambda d: patch(d, newest_meta_offset(d) + PSIZE, "<I", 3000),
                                 "impossible page size 3000"),
    "page-size-64KiB": (lambda d: patch(d, PSIZE, "<I", 65536), "impossible page size"),
    "meta-1-claims-8KiB-pages": (lambda d: patch(d, 4096 + PSIZE, "<I", 8192),
                                 "disagree on the page size|meta page 1"),
    "meta-not-flagged-meta": (lambda d: patch(d, 10, "<H", 0x02), "not marked as a meta page"),
    "meta-wrong-page-number": (lambda d: patch(d, 4096, "<Q", 7), "says it is page 7"),
    "last-page-beyond-file": (lambda d: patch(d, newest_meta_offset(d) + LAST_PG, "<Q",
                                              len(d) // 4096 + 1000), "truncated"),
    "last-page-absurd": (lambda d: patch(d, newest_meta_offset(d) + LAST_PG, "<Q", 1 << 60),
                         "impossible last page"),
    "main-root-is-a-meta-page": (lambda d: patch(d, newest_meta_offset(d) + MAIN_ROOT, "<Q", 1),
                                 "root page 1 is outside"),
    "main-root-past-last-page": (lambda d: patch(d, newest_meta_offset(d) + MAIN_ROOT, "<Q",
                                                 10 ** 6), "outside pages"),
    "dupfixed-without-dupsort": (lambda d: patch(d, newest_meta_offset(d) + MAIN_FLAGS, "<H",
                                                 0x10), "without DUPSORT"),
    "depth-over-32": (lambda d: patch(d, newest_meta_offset(d) + FREE_DEPTH, "<H", 40),
                      "depth 40 exceeds"),
    "free-root-page-zeroed": (lambda d: _zero_page(d, FREE_ROOT), "page number 0"),
    "main-root-page-zeroed": (lambda d: _zero_page(d, MAIN_ROOT), "page number 0"),
    "txnid-on-the-wrong-meta-page": (lambda d: _bump_txnid(d), "belongs on meta page"),
    "free-list-db-flagged-dupsort": (lambda d: patch(d, newest_meta_offset(d) + FREE_FLAGS,
                                                     "<H", 0x0C), "unknown flags 0xc"),
    "main-root-is-the-free-list-root": (lambda d: patch(
        d, newest_meta_offset(d) + MAIN_ROOT, "<Q",
        struct.unpack_from("<Q", d, newest_meta_offset(d) + FREE_ROOT)[0]), "root of both"),
    "main-root-node-offset-outside-page": (lambda d: _patch_root_page(d, MAIN_ROOT, 16, "<H",
                                                                      4094), "impossible offset"),
    "main-root-claims-more-keys": (lambda d: _patch_root_page(d, MAIN_ROOT, 12, "<H",
                                                              struct.unpack_from(
                                                                  "<H", _root_page(d, MAIN_ROOT),
                                                                  12)[0] + 2),
                                   "does not match its record|impossible offset"),
    "main-root-moved-to-a-free-page": (lambda d: _root_on_free_page(d), "also on the free list"),
    "free-list-record-key-size-0": (lambda d: _patch_free_record(d, 6, "<H", 0),
                                    "not a free-list record"),
    "free-list-record-from-the-future": (lambda d: _patch_free_record(d, 8, "<Q", 1 << 40),
                                         "beyond the snapshot's txnid"),
}


def _patch_free_record(data: bytes, field: int, fmt: str, value) -> bytes:
    """Patch the first record (node) of the free-list DB's root leaf: +6 is its key size,
    +8 its key (the txnid that freed the pages)."""
    page = _root_page(data, FREE_ROOT)
    assert struct.unpack_from("<H", page, 10)[0] & 0x02, "free-list root is not a leaf"
    node = struct.unpack_from("<H", page, 16)[0]
    return _patch_root_page(data, FREE_ROOT, node + field, fmt, value)


def _root_page(data: bytes, root_field: int) -> bytes:
    pgno = struct.unpack_from("<Q", data, newest_meta_offset(data) + root_field)[0]
    return data[pgno * 4096:(pgno + 1) * 4096]


def _patch_root_page(data: bytes, root_field: int, offset: int, fmt: str, value) -> bytes:
    pgno = struct.unpack_from("<Q", data, newest_meta_offset(data) + root_field)[0]
    return patch(data, pgno * 4096 + offset, fmt, value)


def _bump_txnid(data: bytes) -> bytes:
    off = newest_meta_offset(data)
    return patch(data, off + TXNID, "<Q", struct.unpack_from("<Q", data, off + TXNID)[0] + 1)


def _root_on_free_page(data: bytes) -> bytes:
    """A consistent-looking file whose main-DB root is a page on the free list: the root
    page copied (with its page number) onto a free page, and the meta pointed there.
    LMDB would hand that page out again on the next write."""
    import tempfile

    import walstore.engine.lmdb_check as lc
    off = newest_meta_offset(data)
    meta = lc._parse_meta(data[off:off + lc.META_READ], off // 4096)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        pages = lc._Pages(f.fileno(), 4096, len(data), meta.last_pg)
        free = sorted(p for p in lc._free_pgnos(pages, meta) if p * 4096 < len(data))
    assert free, "the pristine store has no free page to move the root to"
    target = free[0]
    page = bytearray(_root_page(data, MAIN_ROOT))
    struct.pack_into("<Q", page, 0, target)
    out = data[:target * 4096] + bytes(page) + data[(target + 1) * 4096:]
    return patch(out, off + MAIN_ROOT, "<Q", target)


def _zero_page(data: bytes, root_field: int) -> bytes:
    pgno = struct.unpack_from("<Q", data, newest_meta_offset(data) + root_field)[0]
    return data[:pgno * 4096] + bytes(4096) + data[(pgno + 1) * 4096:]


@needs64
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_data_file_is_refused_naming_the_file(damaged_dir, pristine, name):
    db, path = damaged_dir
    damage, pattern = DAMAGE[name]
    new = damage(pristine["data"])
    if new is None:
        os.remove(path)
    else:
        assert new != pristine["data"]
        with open(path, "wb") as f:
            f.write(new)
    with pytest.raises(CorruptionError, match=pattern) as exc:
        check_lmdb_files(db)
    assert exc.value.file == path
    assert path in str(exc.value)
    assert "\n" not in str(exc.value)
    # the same, in a child process: it must end normally, never by a signal (no SIGBUS)
    out = check_in_child(db)
    assert out["outcome"] == "corrupt" and out["file"] == path


LMDB_OUTCOME = {
    # damage: what LMDB itself (py-lmdb 3.0, LMDB 0.9.36) does with the file unchecked
    "truncated-8KiB": -signal.SIGBUS,
    "truncated-half": -signal.SIGBUS,
    "truncated-size-minus-1-page": -signal.SIGBUS,
    "free-list-db-flagged-dupsort": -signal.SIGABRT,      # assertion 'mx != NULL'
    "main-root-moved-to-a-free-page": -signal.SIGABRT,    # assertion in mdb_page_touch
    "truncated-0": 0,                                     # silently starts an empty database
    "txnid-on-the-wrong-meta-page": 0,                    # silently reads the older snapshot
}


@needs64
@pytest.mark.parametrize("name", sorted(LMDB_OUTCOME))
def test_why_the_check_exists_lmdb_alone_crashes_or_loses_data(damaged_dir, pristine, name):
    """LMDB maps these files: it dies of a signal, or opens them as if nothing happened."""
    db, path = damaged_dir
    with open(path, "wb") as f:
        f.write(DAMAGE[name][0](pristine["data"]))
    r = read_with_lmdb_in_child(db)
    assert r.returncode == LMDB_OUTCOME[name], (r.returncode, r.stderr[-500:])
    if name == "truncated-0":
        assert r.stdout.split() == ["0"]              # every record is gone
    elif name == "txnid-on-the-wrong-meta-page":
        assert int(r.stdout.split()[0]) > 0
    with open(path, "wb") as f:
        f.write(DAMAGE[name][0](pristine["data"]))
    with pytest.raises(CorruptionError):
        check_lmdb_files(db)


@needs64
def test_32_bit_layout_is_named(tmp_path):
    """A file written by a 32-bit LMDB build (12-byte page header, 4-byte words)."""
    def meta32(pgno: int, txnid: int) -> bytes:
        header = struct.pack("<IHHHH", pgno, 0, 0x08, 0, 0)
        db = struct.pack("<IHH5I", 4096, 0x08, 0, 0, 0, 0, 0, 0xFFFFFFFF)
        main = struct.pack("<IHH5I", 0, 0, 0, 0, 0, 0, 0, 0xFFFFFFFF)
        meta = struct.pack("<IIII", 0xBEEFC0DE, 1, 0, 1 << 20) + db + main + \
            struct.pack("<II", 1, txnid)
        return (header + meta).ljust(4096, b"\0")
    os.makedirs(tmp_path / "db")
    (tmp_path / "db" / DATA_FILE).write_bytes(meta32(0, 0) + meta32(1, 1))
    with pytest.raises(CorruptionError, match="32-bit layout"):
        check_lmdb_files(str(tmp_path / "db"))


def test_not_a_regular_file_is_refused_without_hanging(tmp_path):
    db = tmp_path / "db"
    os.makedirs(db / DATA_FILE)
    with pytest.raises(CorruptionError, match="directory") as exc:
        check_lmdb_files(str(db))
    assert exc.value.file == str(db / DATA_FILE)
    os.rmdir(db / DATA_FILE)
    os.mkfifo(db / DATA_FILE)            # opening a FIFO for reading would block forever
    out = check_in_child(str(db))
    assert out["outcome"] == "corrupt" and "FIFO" in out["reason"]


def test_lock_file_that_is_not_a_file_is_refused(damaged_dir):
    db, _path = damaged_dir
    lock = os.path.join(db, LOCK_FILE)
    if os.path.exists(lock):
        os.remove(lock)
    os.makedirs(lock)
    with pytest.raises(CorruptionError) as exc:
        check_lmdb_files(db)
    assert exc.value.file == lock


def test_db_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "db").write_bytes(b"x")
    with pytest.raises(CorruptionError) as exc:
        check_lmdb_files(str(tmp_path / "db"))
    assert exc.value.file == str(tmp_path / "db")


# ---------------------------------------------------------------------------------------
# files that legitimately end before their last page

def churn(env, dbs, rnd: random.Random, commits: int, on_commit=None) -> None:
    """Puts and deletes, with big values written and deleted in the same transaction:
    LMDB then records pages in last_pg that it never writes to the file."""
    for _ in range(commits):
        with env.begin(write=True) as t:
            for _op in range(rnd.randint(1, 40)):
                db = rnd.choice(dbs)
                k = b"k%d" % rnd.randrange(2000)
                r = rnd.random()
                if r < 0.5:
                    t.put(k, rnd.randbytes(rnd.choice((10, 100, 1000, 5000))), db=db)
                elif r < 0.85:
                    t.delete(k, db=db)
                else:
                    t.put(b"big", b"z" * rnd.choice((10000, 100000, 300000)), db=db)
                    if rnd.random() < 0.7:
                        t.delete(b"big", db=db)
        if on_commit:
            on_commit()


def test_files_shorter_than_their_last_page_pass_when_the_tail_is_free(tmp_path):
    path = str(tmp_path / "env")
    env = lmdb.open(path, max_dbs=8, map_size=1 << 30, sync=False)
    dbs = [env.open_db(b"x%d" % i) for i in range(3)]
    seen = {"short": 0, "exact": 0}

    def check():
        info = check_lmdb_files(path)
        assert info.last_page == env.info()["last_pgno"]
        if info.tail_pages:
            assert info.tail_verified
            assert info.file_size < (info.last_page + 1) * info.page_size
            seen["short"] += 1
        else:
            seen["exact"] += 1

    churn(env, dbs, random.Random(3), 250, check)
    env.close()
    # the measured premise: most commits leave a short file, and LMDB reads it fine
    assert seen["short"] > 50, seen
    info = check_lmdb_files(path)
    readable = str(tmp_path / "readable")
    shutil.copytree(path, readable)
    r = read_with_lmdb_in_child(readable)
    assert r.returncode == 0, r.stderr
    # one page less: refused exactly when LMDB cannot cope, passed only when it can
    cut = str(tmp_path / "cut")
    shutil.copytree(path, cut)
    with open(os.path.join(cut, DATA_FILE), "r+b") as f:
        f.truncate(info.file_size - info.page_size)
    try:
        check_lmdb_files(cut)
        accepted = True
    except CorruptionError:
        accepted = False
    reader = read_with_lmdb_in_child(cut)
    assert accepted == (reader.returncode == 0), (accepted, reader.returncode)


def test_every_truncation_that_crashes_lmdb_is_refused(tmp_path):
    """The oracle is LMDB itself: each cut that kills a reader by a signal must be refused,
    and each cut the check accepts must be readable."""
    path = str(tmp_path / "env")
    env = lmdb.open(path, max_dbs=8, map_size=1 << 30, sync=False)
    dbs = [env.open_db(b"x%d" % i) for i in range(3)]
    churn(env, dbs, random.Random(11), 150)
    env.close()
    with open(os.path.join(path, DATA_FILE), "rb") as f:
        data = f.read()
    pages = len(data) // 4096
    work = str(tmp_path / "cut")
    os.makedirs(work)
    crashed = refused = 0
    rnd = random.Random(5)
    cuts = sorted({1, 2, 3, 5, 8, 13, pages // 4, pages // 2, pages - 3}
                  | {rnd.randrange(1, pages - 2) for _ in range(8)})
    for cut in cuts:
        with open(os.path.join(work, DATA_FILE), "wb") as f:
            f.write(data[:(pages - cut) * 4096])
        try:
            check_lmdb_files(work)
            accepted = True
        except CorruptionError:
            accepted = False
            refused += 1
        r = read_with_lmdb_in_child(work)
        crashed += r.returncode < 0
        if accepted:
            assert r.returncode == 0, f"cut {cut} pages: accepted, yet LMDB ended {r.returncode}"
    assert crashed > 0 and refused >= crashed


def test_no_false_alarm_while_another_process_commits(tmp_path):
    """A follower may check while the writer commits; the meta pages change under it."""
    path = str(tmp_path / "env")
    env = lmdb.open(path, max_dbs=8, map_size=1 << 30, sync=False)
    env.close()
    writer = subprocess.Popen([sys.executable, "-c", r"""
import lmdb, random, sys, time
sys.path.insert(0, sys.argv[2])
from tests.test_lmdb_check import churn
env = lmdb.open(sys.argv[1], max_dbs=8, map_size=1 << 30, sync=False)
dbs = [env.open_db(b"x%d" % i) for i in range(3)]
end = time.monotonic() + float(sys.argv[3])
rnd = random.Random(1)
while time.monotonic() < end:
    churn(env, dbs, rnd, 5)
print("done")
""", path, ROOT, "4"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    checks = 0
    try:
        time.sleep(0.3)
        while writer.poll() is None:
            check_lmdb_files(path)
            checks += 1
    finally:
        _out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert checks > 20


# ---------------------------------------------------------------------------------------
# bounded work on hostile input

@needs64
def test_hostile_counts_allocate_little(damaged_dir, pristine):
    """A meta page claiming a huge last page with a huge free list: refused or bounded."""
    db, path = damaged_dir
    off = newest_meta_offset(pristine["data"])
    data = patch(pristine["data"], off + LAST_PG, "<Q", 1 << 40)
    data = patch(data, off + 56, "<Q", (1 << 40) - 100)     # free-list leaf pages
    with open(path, "wb") as f:
        f.write(data)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptionError):
            check_lmdb_files(db)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak


def test_check_of_a_big_short_file_is_bounded(tmp_path):
    path = str(tmp_path / "env")
    env = lmdb.open(path, max_dbs=8, map_size=1 << 30, sync=False)
    dbs = [env.open_db(b"x%d" % i) for i in range(3)]
    churn(env, dbs, random.Random(3), 120)
    env.close()
    tracemalloc.start()
    try:
        info = check_lmdb_data_file(os.path.join(path, DATA_FILE))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info is not None
    assert peak < 4 * 1024 * 1024, peak


def test_verify_reports_a_zeroed_page_inside_a_tree_instead_of_aborting(tmp_path):
    """A 4 KiB page of zeros inside a deep tree (below the roots the open-time check
    reads): LMDB's cursor walk asserts (SIGABRT) on it, and `walstore verify` died with it.
    verify now reads every reachable page in Python first and reports the damage (exit 1,
    one report), for every page of the tree zeroed in turn."""
    import shutil
    import subprocess
    import sys
    from walstore.engine.lmdb_check import walk_lmdb_data_file
    path = str(tmp_path / "s")
    with walstore.open(path, durability="none") as s:
        for start in range(0, 6000, 500):
            with s.transaction() as tx:
                for i in range(start, start + 500):
                    tx.put(f"k{i:06d}", "v" * 60)
    data = os.path.join(path, "db", "data.mdb")
    reachable = walk_lmdb_data_file(data)
    assert reachable > 40
    pristine = open(data, "rb").read()
    psize = 4096
    detected = 0
    for pg in range(2, len(pristine) // psize):
        with open(data, "r+b") as f:
            f.seek(pg * psize)
            f.write(bytes(psize))
        try:
            walk_lmdb_data_file(data)
        except walstore.CorruptionError as e:
            detected += 1
            assert e.file == data
        with open(data, "r+b") as f:
            f.seek(pg * psize)
            f.write(pristine[pg * psize:(pg + 1) * psize])
    assert detected >= reachable - 2  # (every reachable page but the metas' own)
    with open(data, "r+b") as f:  # one page deep in the data tree: the CLI
        f.seek(20 * psize)
        f.write(bytes(psize))
    out = subprocess.run([sys.executable, "-m", "walstore", "verify", path, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, (out.returncode, out.stderr)
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and any("LMDB" in e for e in doc["errors"])
    shutil.rmtree(path)
