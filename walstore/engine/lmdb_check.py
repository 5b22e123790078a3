"""Check an LMDB environment's files before LMDB maps them.

This module owns walstore's knowledge of LMDB's on-disk format (meta pages, page headers,
the free-list tree) and one decision: is ``<db_dir>/data.mdb`` safe to hand to
``lmdb.open``, or is it damaged (:class:`walstore.errors.CorruptionError` naming the file)?
It imports only the standard library and ``walstore.errors``.

Why: LMDB maps the data file.  If the newest snapshot needs a page that lies past the end
of the file (a truncated copy, a full disk during ``cp``), touching it is a SIGBUS: the
process dies with exit 135 and no message.  LMDB itself only reads the first 152 bytes of
each meta page before mapping, and a zero-length file is silently re-initialised as a new,
empty database.  So walstore reads the file with ``pread`` (never ``mmap``) first.

The layout (learned from lmdb.h / mdb.c of LMDB 0.9, the line py-lmdb 3.0 bundles as 0.9.36,
and py-lmdb's own hardening patches; no code is copied):

* Page header ``MDB_page`` (16 bytes on 64-bit builds): pgno (pgno_t), pad (u16), flags (u16),
  lower/upper (u16 each; for overflow pages the two form ``mp_pages``, a u32).
* Pages 0 and 1 are meta pages (flag ``P_META`` 0x08).  At offset 16: ``MDB_meta`` = magic
  0xBEEFC0DE (u32), version (u32, 1; 999 in MDB_DEVEL builds), fixed-map address (void*),
  map size (size_t), two ``MDB_db`` records (free-list DB, main DB), last page number,
  txnid.  ``MDB_db`` = pad (u32; for the free DB this is the page size), flags (u16),
  depth (u16), branch/leaf/overflow page counts, entries, root page (``P_INVALID`` = ~0 for
  an empty tree).
* ``mdb_env_read_header`` reads 152 bytes at offset 0 and at offset ``psize`` (from meta 0):
  BOTH must carry ``P_META``, the magic and version 1, or LMDB refuses the file
  (MDB_INVALID / MDB_VERSION_MISMATCH); the one with the larger txnid is used (a tie: page 0).
  A transaction ``t`` writes meta page ``t % 2``.  py-lmdb additionally rejects a page size
  that is 0, not a power of two or above 32 KiB, a tree deeper than 32 levels, a root page
  0 or 1, and the flag combinations DUPFIXED/INTEGERDUP/REVERSEDUP without DUPSORT.
* 32-bit builds use 4-byte pgno_t/size_t (a 12-byte page header); MDB_VL32 builds use the
  64-bit layout.  The checker reads the layout of the running interpreter (what the local
  py-lmdb writes) and names the other layout or byte order when it finds one.
* The file may legitimately END BEFORE page ``last_pg``: pages allocated and freed in the
  same transaction (loose pages, freed overflow runs) are never written, and LMDB's own
  ``mdb_env_copy`` clamps to the file size for that reason.  Measured here: 2,109 of 3,000
  commits of a put/delete workload left the file shorter than ``(last_pg + 1) * psize``.
  Each page up to ``last_pg`` is either reachable from the snapshot or listed once in the
  free-list DB, so a short file is only damage when a missing page is NOT on the free list.
  The checker proves that by walking the free-list tree (a bounded number of pages).

What is checked (any failure is a CorruptionError naming the file):
  missing data file (when ``expect_existing``), empty file (LMDB would start over), not a
  regular file, too short for both meta pages.  Per meta page: zeros, P_META flag, magic
  (naming another byte order or word size), version, its own page number, page size,
  last page, txnid (range, and parity: transaction t writes page t % 2, and LMDB's readers
  use page ``txnid & 1`` -- a txnid on the wrong page makes LMDB use the other snapshot),
  the two core DBs (flags, including no DUPSORT on the free list, which trips an assertion
  in LMDB; depth; root in 2..last_pg; page counts).  Both meta pages must be valid and agree
  on the page size.  For the newest snapshot: the root pages of the free-list DB, the main
  DB and every named DB recorded in the main DB's root page lie inside the file, carry
  their own page number, are branch/leaf pages with sane bounds that match their MDB_db
  record (a depth-1 tree is one leaf holding all its entries), no two trees share a root,
  every node on them lies inside the page, child pointers and overflow runs stay within
  last_pg (overflow headers read while the budget lasts); the page counts fit below
  ``last_pg`` and inside the file.  The free list is walked (within the read budget): no
  root page may be on it, and every page up to ``last_pg`` that lies past the end of the
  file must be.  ``lock.mdb``, when present, must be a regular file (LMDB rebuilds its
  contents when it is the first user).

What it CANNOT detect (documented for users; walstore's other evidence must cover these):
  * damage inside the B-trees below the root pages (a flipped byte in a leaf or branch
    page of a tree deeper than one level, an interior pointer into the never-written tail,
    a page both reachable and on the free list): LMDB reports most as MDB_CORRUPTED or
    trips an assertion (SIGABRT); a pointer into the free tail is a SIGBUS.  A full walk
    (``walk_lmdb_data_file``) costs O(file size) and is left to ``verify``.  walstore's
    small trees (one leaf each) are covered whole; big ones only at their roots.  After an
    unclean shutdown, recovery adds ``check_lmdb_paths`` before each REDO batch: small
    trees (``SMALL_TREE_PAGES``) whole, the action table whole at the open's first call
    (the open reads it whole; an undo's or a loser's rows lie anywhere), in big ones the root-to-leaf paths of the keys the
    batch touches, of the first and last key, and each path page's two neighbours -- every
    page REDO's writes, cursor steps and rebalancing reach, at a cost that grows with the
    WAL tail times the depth, not with the number of keys (CONTRACT 4.4; the full walk it
    replaced took 2.7 s for 400,000 keys).  Leaves off those paths are ``verify``'s.
  * a valid OLDER copy of data.mdb, or a valid LMDB environment of another program (a
    "foreign LMDB" with the right format passes): only walstore's own records (its applied
    LSN against the WAL, its store id) can tell those apart.
  * a free list larger than the read budget (``FREE_LIST_BUDGET`` bytes): the tail past the
    end of the file is then reported unverified (``tail_verified=False``), not refused, and
    roots are not checked against the free list.
  * damage to the older meta page's snapshot beyond its meta fields (LMDB does not read
    that snapshot once it has picked the newer one).
  * a store whose data file is damaged after this check ran (the check is a snapshot).

A live writer (a follower checks while the writer commits): the check holds no LMDB reader
slot, so pages can be recycled under it.  A page reachable from the newest meta page (txnid
T) is only rewritten by transaction T+3 or later (T+1 frees it; mdb_page_alloc reuses a
free-list record only when it is older than txnid - 1).  So when a check fails, the meta
pages and the file size are read again: unchanged means no commit happened and the damage
is real; changed means run again (``ATTEMPTS``).  Measured: 18 of 28,067 checks against a
process committing flat out needed the re-run; none raised.

Errors: only CorruptionError for anything found in the bytes.  An ``OSError`` other than a
read error (EIO) -- permission denied, for example -- is not evidence of damage and
propagates unchanged.  Memory: at most two pages of the maximum page size (32 KiB) are held
at a time, plus a free-list walk stack of at most 32 levels and a bitmap of the missing
tail bounded by the read budget; reads are capped at ``FREE_LIST_BUDGET`` bytes.
"""
from __future__ import annotations

import array
import errno
import mmap
import os
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable

from walstore.errors import CorruptionError

__all__ = ["LmdbFileInfo", "check_lmdb_files", "check_lmdb_data_file", "check_lmdb_paths",
           "walk_lmdb_data_file", "DATA_FILE", "LOCK_FILE"]

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"

MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
MDB_DEVEL_VERSION = 999
NUM_METAS = 2
CURSOR_STACK = 32                  # LMDB's maximum tree depth
MIN_PAGE_SIZE = 512                # LMDB writes the OS page size; none is below 4 KiB today
MAX_PAGE_SIZE = 0x8000             # MAX_PAGESIZE of non-DEVEL builds

# page flags (MDB_page.mp_flags)
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
# node flags (MDB_node.mn_flags on leaf pages)
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
# database flags (MDB_db.md_flags)
MDB_DUPSORT, MDB_DUPFIXED, MDB_INTEGERDUP, MDB_REVERSEDUP = 0x04, 0x10, 0x20, 0x40
DUPSORT_ONLY = MDB_DUPFIXED | MDB_INTEGERDUP | MDB_REVERSEDUP
DB_PERSISTENT = 0x7E               # REVERSEKEY|DUPSORT|INTEGERKEY|DUPFIXED|INTEGERDUP|REVERSEDUP
# the free-list DB's flags are INTEGERKEY plus the environment flags below 0x10000 that
# mdb_env_init_meta0 copies in: FIXEDMAP and NOSUBDIR (DUPSORT there trips an assertion)
FREE_DB_FLAGS = 0x01 | 0x08 | 0x4000

ATTEMPTS = 10                      # re-checks when a live writer changes the meta pages
RETRY_PAUSE_S = 0.0005             # ... the first pause before one, doubled each time (0.5 s
#                                    in all at most: a writer's burst gives a quiet window)
FREE_LIST_BUDGET = 16 << 20        # bytes of free-list pages read to prove a short tail free
NODE_HEADER = 8                    # mn_lo, mn_hi, mn_flags, mn_ksize (u16 each)


class _Layout:
    """Sizes and struct formats of one LMDB build's on-disk words (native byte order)."""

    def __init__(self, name: str, word: str) -> None:
        self.name = name
        self.word = word                                   # pgno_t / size_t / txnid_t
        self.wsize = struct.calcsize("=" + word)
        self.header = struct.Struct("=" + word + "HHHH")   # pgno, pad, flags, lower, upper
        self.hdr = self.header.size                        # PAGEHDRSZ
        self.db = struct.Struct("=IHH" + word * 5)         # MDB_db
        self.meta = struct.Struct("=II" + word * 2 + "IHH" + word * 5 + "IHH" + word * 5
                                  + word * 2)
        self.meta_read = self.hdr + self.meta.size         # sizeof(MDB_metabuf)
        self.invalid = (1 << (8 * self.wsize)) - 1         # P_INVALID
        self.ov_pages = struct.Struct("=I")                # mp_pages at offset hdr - 4


LAYOUT64 = _Layout("64-bit", "Q")
LAYOUT32 = _Layout("32-bit", "I")
NATIVE = LAYOUT64 if struct.calcsize("P") == 8 else LAYOUT32
OTHER = LAYOUT32 if NATIVE is LAYOUT64 else LAYOUT64
_LITTLE = sys.byteorder == "little"
META_READ = max(LAYOUT64.meta_read, LAYOUT32.meta_read)   # bytes read of each meta page
MIN_UNBORN_PAGE = mmap.PAGESIZE  # (LMDB's page for a new environment: the OS page)


@dataclass(frozen=True)
class LmdbFileInfo:
    """What the check learned about a data file it accepted (the newest meta page's view)."""

    path: str
    file_size: int
    page_size: int
    txnid: int              # txnid of the newest valid meta page
    meta_page: int          # which meta page (0 or 1) is the newest
    last_page: int          # mm_last_pg of the newest meta page
    map_size: int           # map size recorded in the newest meta page
    entries: int            # entries of the main DB (named databases, for walstore)
    pages_in_use: int       # lower bound of pages the snapshot reaches (incl. meta pages)
    named_dbs: int | None   # named DBs found in the main DB's root page (None: not read)
    tail_pages: int         # pages up to last_page lying past the end of the file
    tail_verified: bool     # those pages were proved free (trivially True when 0)


@dataclass
class _Db:
    pad: int
    flags: int
    depth: int
    branch: int
    leaf: int
    overflow: int
    entries: int
    root: int

    @property
    def pages(self) -> int:
        return self.branch + self.leaf + self.overflow


@dataclass
class _Meta:
    index: int
    pgno: int
    flags: int
    magic: int
    version: int
    mapsize: int
    free: _Db
    main: _Db
    last_pg: int
    txnid: int

    @property
    def psize(self) -> int:
        return self.free.pad


class _Damage(Exception):
    """Internal: one reason, raised as CorruptionError by the caller (with the file)."""

    def __init__(self, reason: str, offset: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


class _OverBudget(Exception):
    """Internal: the free-list walk needed more than FREE_LIST_BUDGET bytes."""


# ---------------------------------------------------------------------------------------
# public API

def check_lmdb_files(db_dir: str, *, expect_existing: bool = True) -> LmdbFileInfo | None:
    """Check the LMDB environment in ``db_dir`` (``data.mdb`` + ``lock.mdb``) before mapping.

    Returns what it learned, or None when there is no data file yet (or an empty one) and
    ``expect_existing`` is False (a brand-new store: LMDB will create it).  Raises
    :class:`CorruptionError` (``file`` = the damaged file) for anything that would make
    LMDB fail, crash (SIGBUS) or silently start over.
    """
    lock = os.path.join(db_dir, LOCK_FILE)
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise CorruptionError(f"the LMDB directory {db_dir} is not a directory",
                              file=db_dir) from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise CorruptionError(f"the LMDB lock file is not a regular file "
                                  f"({_kind(st.st_mode)})", file=lock)
    return check_lmdb_data_file(os.path.join(db_dir, DATA_FILE),
                                expect_existing=expect_existing)


def unborn_data_file(path: str) -> bool:
    """Is ``path`` the data file of an LMDB creation cut short while LMDB wrote its meta
    pages (a full disk): a regular file shorter than two pages whose first page is zeros
    or LMDB's FRESH meta page (txnid 0, no main root), so that no transaction ever
    committed in it.  A file that ever held a commit has a txnid of 2 or more on page 0
    (h4, stop 83: a size test alone took a damaged data file of commits, cut to a page,
    for one and replaced it with an empty store).  Reads one page; never raises."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size < 2 * MIN_UNBORN_PAGE:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(META_READ)
    except OSError:
        return False
    if not any(head):
        return True
    if len(head) < NATIVE.meta_read or _meta_problem(head, 0) is not None:
        return False
    m = _parse_meta(head, 0)
    return m.txnid == 0 and m.main.root == NATIVE.invalid and m.main.entries == 0


def check_lmdb_data_file(path: str, *, expect_existing: bool = True) -> LmdbFileInfo | None:
    """Check one LMDB data file (see :func:`check_lmdb_files`)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if expect_existing:
            raise CorruptionError("the LMDB data file is missing", file=path) from None
        return None
    if not stat.S_ISREG(st.st_mode):   # a FIFO would block open(), a directory fails later
        raise CorruptionError(f"the LMDB data file is not a regular file "
                              f"({_kind(st.st_mode)})", file=path)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if expect_existing:
            raise CorruptionError("the LMDB data file is missing", file=path) from None
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptionError("the LMDB data file is not a regular file", file=path)
        return _check_fd(fd, path, expect_existing)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# reading

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file); n is bounded."""
    assert 0 <= n <= MAX_PAGE_SIZE * 2
    parts = []
    got = 0
    while got < n:
        try:
            chunk = os.pread(fd, n - got, offset + got)
        except OSError as e:
            if e.errno == errno.EIO:
                raise _Damage(f"read error at offset {offset + got}: {e.strerror}",
                              offset + got) from None
            raise
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def _check_fd(fd: int, path: str, expect_existing: bool) -> LmdbFileInfo | None:
    """Run the check; when it fails while the meta pages change under it, run it again."""
    last: _Damage | None = None
    for attempt in range(ATTEMPTS):
        before = _fingerprint(fd)
        try:
            return _check_once(fd, path, expect_existing)
        except _Damage as e:
            last = e
        if _fingerprint(fd) == before:
            break          # the file held still: the damage is real
        # a writer committed meanwhile (its reused pages read as damage): again, after a
        # pause that grows — five at once were all cut by a fast writer on a loaded
        # machine, and a reader's open was refused as damaged (a CI run, 1 in ~10)
        time.sleep(RETRY_PAUSE_S * (1 << attempt))
    assert last is not None
    raise CorruptionError(last.reason, file=path, offset=last.offset)


def _fingerprint(fd: int) -> tuple[int, bytes]:
    """The file size and the first bytes of both meta pages at every possible page size."""
    head = _pread(fd, META_READ, 0)
    metas = [_pread(fd, META_READ, off) for off in _page_sizes()]
    return _file_size(fd), head + b"".join(metas)


def _page_sizes() -> list[int]:
    sizes = []
    p = MIN_PAGE_SIZE
    while p <= MAX_PAGE_SIZE:
        sizes.append(p)
        p *= 2
    return sizes


# ---------------------------------------------------------------------------------------
# meta pages

def _parse_meta(buf: bytes, index: int, lay: _Layout = NATIVE) -> _Meta:
    pgno, _pad, flags, _lower, _upper = lay.header.unpack_from(buf, 0)
    f = lay.meta.unpack_from(buf, lay.hdr)
    return _Meta(index=index, pgno=pgno, flags=flags, magic=f[0], version=f[1],
                 mapsize=f[3], free=_Db(*f[4:12]), main=_Db(*f[12:20]), last_pg=f[20],
                 txnid=f[21])


def _meta_problem(buf: bytes, index: int) -> str | None:
    """Why ``buf`` (the first bytes of meta page ``index``) is not a valid meta page."""
    lay = NATIVE
    if len(buf) < lay.meta_read:
        return "is cut short by the end of the file"
    if not any(buf):
        return "is all zero bytes"
    m = _parse_meta(buf, index)
    if m.magic != MDB_MAGIC:
        other = _parse_meta(buf, index, OTHER) if len(buf) >= OTHER.meta_read else m
        if other.magic == MDB_MAGIC and other.flags & P_META:
            return (f"has the {OTHER.name} layout of another LMDB build (this interpreter "
                    f"reads the {NATIVE.name} layout)")
        if m.magic == _byteswap32(MDB_MAGIC) or other.magic == _byteswap32(MDB_MAGIC):
            return "was written on a machine of the other byte order"
        return (f"has a bad magic number 0x{m.magic:08x} (expected 0x{MDB_MAGIC:08x}): "
                f"not an LMDB meta page")
    if not m.flags & P_META:
        return f"is not marked as a meta page (page flags 0x{m.flags:x})"
    if m.version != MDB_DATA_VERSION:
        if m.version == MDB_DEVEL_VERSION:
            return "has format version 999 of an MDB_DEVEL build"
        return f"has unknown format version {m.version} (LMDB 0.9 writes {MDB_DATA_VERSION})"
    if m.pgno != index:
        return f"says it is page {m.pgno}"
    ps = m.psize
    if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
        return (f"records an impossible page size {ps} (a power of two from "
                f"{MIN_PAGE_SIZE} to {MAX_PAGE_SIZE} bytes)")
    if m.last_pg < NUM_METAS - 1:
        return f"records last page {m.last_pg}, below the meta pages"
    if (m.last_pg + 1) * ps > 1 << 62:
        return f"records an impossible last page {m.last_pg}"
    if m.txnid > 1 << 62:
        return f"records an impossible txnid {m.txnid}"
    if m.txnid and m.txnid % 2 != index:
        # transaction t writes meta page t % 2, and LMDB's readers and writers (with a lock
        # file) use page (txnid & 1), not the page the txnid was found on
        return (f"holds txnid {m.txnid}, which belongs on meta page {m.txnid % 2}: LMDB "
                f"would read the other meta page for it")
    for name, db, persistent in (("free-list", m.free, FREE_DB_FLAGS),
                                 ("main", m.main, DB_PERSISTENT)):
        why = _db_problem(db, m.last_pg, persistent)
        if why:
            return f"{name} DB: {why}"
    if m.free.pages + m.main.pages > m.last_pg + 1 - NUM_METAS:
        return (f"counts {m.free.pages + m.main.pages} pages in its two trees, more than "
                f"fit below last page {m.last_pg}")
    return None


def _db_problem(db: _Db, last_pg: int, persistent: int) -> str | None:
    """What is impossible about one MDB_db record (as py-lmdb's LMDB would refuse it)."""
    if db.flags & DUPSORT_ONLY and not db.flags & MDB_DUPSORT:
        return f"flags 0x{db.flags:x} use DUPFIXED/INTEGERDUP/REVERSEDUP without DUPSORT"
    if db.flags & ~persistent:
        return f"unknown flags 0x{db.flags:x}"
    if db.depth > CURSOR_STACK:
        return f"depth {db.depth} exceeds LMDB's {CURSOR_STACK} levels"
    if db.root == NATIVE.invalid:
        return None
    if db.root < NUM_METAS or db.root > last_pg:
        return f"root page {db.root} is outside pages {NUM_METAS}..{last_pg}"
    if db.depth == 0:
        return f"has root page {db.root} but depth 0"
    if db.pages > last_pg + 1 - NUM_METAS:
        return f"counts {db.pages} pages, more than fit below last page {last_pg}"
    return None


def _byteswap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def _read_metas(fd: int) -> tuple[_Meta, _Meta]:
    """Both meta pages, as LMDB reads them (meta 1 at meta 0's page size), or _Damage."""
    size = _file_size(fd)
    if size < NATIVE.meta_read:
        raise _Damage(f"the file is too short ({size} bytes) to hold an LMDB meta page")
    buf0 = _pread(fd, META_READ, 0)
    why0 = _meta_problem(buf0, 0)
    m0 = None if why0 else _parse_meta(buf0, 0)
    if m0 is not None:
        offsets = [m0.psize]
    else:   # find meta page 1 anyway, to say which page is damaged
        native = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        offsets = sorted(_page_sizes(), key=lambda p: p != min(native, MAX_PAGE_SIZE))
    why1 = "could not be found"
    m1 = None
    for off in offsets:
        if off + NATIVE.meta_read > size:
            if m0 is not None:
                raise _Damage(f"the file is too short ({size} bytes) to hold both meta pages "
                              f"of {m0.psize} bytes: truncated")
            continue
        buf1 = _pread(fd, META_READ, off)
        problem = _meta_problem(buf1, 1)
        if problem is None:
            m1, why1 = _parse_meta(buf1, 1), None
            break
        if m0 is not None or off == offsets[0]:
            why1 = problem
    if m0 is None and m1 is None:
        raise _Damage(f"both LMDB meta pages are invalid: not an LMDB data file or "
                      f"destroyed (meta page 0 {why0}; meta page 1 {why1})", 0)
    if m0 is None:
        assert m1 is not None
        raise _Damage(f"LMDB meta page 0 {why0}; meta page 1 is valid (txnid {m1.txnid}), "
                      f"but LMDB needs both", 0)
    if m1 is None:
        raise _Damage(f"LMDB meta page 1 {why1}; meta page 0 is valid (txnid {m0.txnid}), "
                      f"but LMDB needs both", m0.psize)
    if m0.psize != m1.psize:
        raise _Damage(f"the meta pages disagree on the page size ({m0.psize} and "
                      f"{m1.psize})", m0.psize)
    return m0, m1


# ---------------------------------------------------------------------------------------
# pages of the newest snapshot

class _Pages:
    """pread access to whole pages, refusing pages past the end of the file."""

    def __init__(self, fd: int, psize: int, size: int, last_pg: int) -> None:
        self.fd = fd
        self.psize = psize
        self.file_pages = size // psize
        self.last_pg = last_pg
        self.budget = FREE_LIST_BUDGET
        self.walked = 0  # (pages a walk covered, overflow runs whole: its progress)
        self.step = max(WALK_PROGRESS_PAGES, (last_pg + 1) // WALK_PROGRESS_STEPS)
        self.next_report = self.step
        self.progress: Progress = None
        self.total = 0

    def raw(self, pgno: int, what: str, budget: bool = False) -> bytes:
        if pgno >= self.file_pages:
            raise _Damage(f"the {what} (page {pgno}) lies past the end of the file, which "
                          f"holds {self.file_pages} pages of {self.psize} bytes: truncated",
                          pgno * self.psize)
        if budget:
            self.budget -= self.psize
            if self.budget < 0:
                raise _OverBudget()
        data = _pread(self.fd, self.psize, pgno * self.psize)
        if len(data) < self.psize:
            raise _Damage(f"the {what} (page {pgno}) is cut short by the end of the file: "
                          f"truncated", pgno * self.psize)
        return data

    def btree(self, pgno: int, what: str, budget: bool = False) -> tuple[bytes, int, int]:
        """A branch or leaf page: (bytes, flags, number of keys); its header is checked."""
        lay = NATIVE
        if pgno < NUM_METAS or pgno > self.last_pg:
            raise _Damage(f"the {what} is page {pgno}, outside pages "
                          f"{NUM_METAS}..{self.last_pg}")
        page = self.raw(pgno, what, budget)
        own, _pad, flags, lower, upper = lay.header.unpack_from(page, 0)
        where = pgno * self.psize
        if own != pgno:
            raise _Damage(f"the {what} (page {pgno}) carries page number {own}: "
                          f"overwritten or zeroed", where)
        kind = flags & (P_BRANCH | P_LEAF | P_OVERFLOW | P_META)
        if kind not in (P_BRANCH, P_LEAF) or (flags & P_LEAF2 and kind != P_LEAF):
            raise _Damage(f"the {what} (page {pgno}) is not a B-tree page "
                          f"(flags 0x{flags:x})", where)
        if lower < lay.hdr or upper > self.psize or lower > upper:
            raise _Damage(f"the {what} (page {pgno}) has impossible bounds lower {lower}, "
                          f"upper {upper}", where)
        return page, flags, (lower - lay.hdr) >> 1

    def nodes(self, page: bytes, pgno: int, nkeys: int):
        """(offset, lo|hi<<16, flags, ksize) of each node, bounds-checked."""
        lay = NATIVE
        for i in range(nkeys):
            (off,) = struct.unpack_from("=H", page, lay.hdr + 2 * i)
            if off < lay.hdr + 2 * nkeys or off + NODE_HEADER > self.psize:
                raise _Damage(f"page {pgno}: node {i} at impossible offset {off}",
                              pgno * self.psize)
            a, b, nflags, ksize = struct.unpack_from("=HHHH", page, off)
            lo, hi = (a, b) if _LITTLE else (b, a)
            if off + NODE_HEADER + ksize > self.psize:
                raise _Damage(f"page {pgno}: node {i}'s key runs past the page",
                              pgno * self.psize)
            yield off, lo | (hi << 16), nflags, ksize


def _check_once(fd: int, path: str, expect_existing: bool) -> LmdbFileInfo | None:
    if _file_size(fd) == 0:
        if expect_existing:
            raise _Damage("the LMDB data file is empty (0 bytes); LMDB would silently start "
                          "a new, empty database in it")
        return None
    m0, m1 = _read_metas(fd)
    newest = m1 if m0.txnid < m1.txnid else m0          # LMDB's mdb_env_pick_meta
    size = _file_size(fd)                               # after the metas: it only grows
    psize = newest.psize
    if size < NUM_METAS * psize:
        raise _Damage(f"the file is too short ({size} bytes) to hold both meta pages of "
                      f"{psize} bytes: truncated")
    pages = _Pages(fd, psize, size, newest.last_pg)
    roots: dict[int, str] = {}

    in_use = NUM_METAS + newest.free.pages + newest.main.pages
    if newest.free.root != NATIVE.invalid:
        _check_root(pages, newest.free, "free-list DB", roots)
    named = None
    if newest.main.root != NATIVE.invalid:
        page, flags, nkeys = _check_root(pages, newest.main, "main DB", roots)
        if flags & P_LEAF and not newest.main.flags & MDB_DUPSORT:
            named, named_pages = _named_dbs(pages, newest, page, nkeys, roots)
            in_use += named_pages
    if in_use > newest.last_pg + 1:
        raise _Damage(f"the newest meta page (txnid {newest.txnid}) counts {in_use} pages in "
                      f"use, more than its last page {newest.last_pg} allows")
    if in_use > pages.file_pages:
        raise _Damage(f"the newest snapshot (txnid {newest.txnid}) uses at least {in_use} "
                      f"pages but the file holds only {pages.file_pages}: truncated")

    tail = max(0, newest.last_pg + 1 - pages.file_pages)
    verified = _free_list_pass(pages, newest, tail, roots)
    return LmdbFileInfo(path=path, file_size=size, page_size=psize, txnid=newest.txnid,
                        meta_page=newest.index, last_page=newest.last_pg,
                        map_size=newest.mapsize, entries=newest.main.entries,
                        pages_in_use=in_use, named_dbs=named, tail_pages=tail,
                        tail_verified=verified or tail == 0)


def _check_root(pages: _Pages, db: _Db, label: str,
                roots: dict[int, str]) -> tuple[bytes, int, int]:
    """Read and check one tree's root page against its MDB_db record; returns the page.

    LMDB keeps these exact: a depth-1 tree is one leaf holding every entry (every key,
    when the tree has duplicates), a deeper one has a branch page as root.  A root page
    shared by two trees, or a node reaching outside its page or the snapshot, is damage.
    """
    if db.root in roots:
        raise _Damage(f"page {db.root} is the root of both the {roots[db.root]} and the "
                      f"{label}", db.root * pages.psize)
    roots[db.root] = label
    what = f"root page of the {label}"
    page, flags, nkeys = pages.btree(db.root, what)
    where = db.root * pages.psize
    if flags & P_LEAF2:
        raise _Damage(f"the {what} (page {db.root}) is a LEAF2 page, which only duplicate "
                      f"sub-trees use", where)
    if db.depth == 1:
        dupsort = bool(db.flags & MDB_DUPSORT)
        if (not flags & P_LEAF or db.branch != 0 or db.leaf != 1
                or (db.entries < nkeys if dupsort else db.entries != nkeys)):
            raise _Damage(f"the {what} (page {db.root}) does not match its record: depth 1, "
                          f"{db.entries} entries, {db.branch} branch and {db.leaf} leaf "
                          f"pages, but the page is a {_kind_of(flags)} with {nkeys} keys",
                          where)
    elif not flags & P_BRANCH or db.branch < 1 or nkeys < 1:
        raise _Damage(f"the {what} (page {db.root}) is a {_kind_of(flags)} with {nkeys} keys "
                      f"but the tree has depth {db.depth} and {db.branch} branch pages",
                      where)
    for off, low, nflags, ksize in pages.nodes(page, db.root, nkeys):
        start = off + NODE_HEADER + ksize
        if flags & P_BRANCH:
            _child(pages, low, nflags, db.root, what, where + off)
            continue
        _check_value(pages, page, db.root, what, where + off, start, low, nflags)
    return page, flags, nkeys


def _child(pages: _Pages, low: int, nflags: int, pgno: int, what: str, at: int) -> int:
    """The child page a branch node points to, inside the snapshot (not its own page)."""
    child = low | (nflags << 32) if NATIVE.wsize == 8 else low
    if child < NUM_METAS or child > pages.last_pg or child == pgno:
        raise _Damage(f"the {what} (page {pgno}) points to child page {child}, outside pages "
                      f"{NUM_METAS}..{pages.last_pg}", at)
    return child


def _check_value(pages: _Pages, page: bytes, pgno: int, what: str, at: int, start: int,
                 low: int, nflags: int) -> None:
    """A leaf node's value: an overflow run's reference and header, or its bytes inside
    the page."""
    if nflags & F_BIGDATA:
        if start + NATIVE.wsize > pages.psize:
            raise _Damage(f"the {what} (page {pgno}): an overflow reference runs past the "
                          f"page", at)
        (ov,) = struct.unpack_from("=" + NATIVE.word, page, start)
        _check_overflow_run(pages, ov, low, f"a value on the {what}")
    elif start + low > pages.psize:
        raise _Damage(f"the {what} (page {pgno}): a record of {low} bytes runs past the "
                      f"page", at)


def _kind_of(flags: int) -> str:
    return "branch page" if flags & P_BRANCH else "leaf page"


def _check_overflow_run(pages: _Pages, ov: int, dsize: int, what: str) -> None:
    """An overflow run holding ``dsize`` bytes must start inside the snapshot and the file;
    its header is read while the read budget lasts."""
    need = (NATIVE.hdr - 1 + dsize) // pages.psize + 1            # LMDB's OVPAGES
    if ov < NUM_METAS or ov + need - 1 > pages.last_pg:
        raise _Damage(f"{what} is on overflow pages {ov}..{ov + need - 1}, outside pages "
                      f"{NUM_METAS}..{pages.last_pg}", ov * pages.psize)
    pages.walked += need - 1  # (its header is read below: the run counts whole in progress)
    if pages.budget < pages.psize:
        return
    first = pages.raw(ov, f"overflow page of {what}", budget=True)
    own, _pad, flags, _lo, _up = NATIVE.header.unpack_from(first, 0)
    (npages,) = NATIVE.ov_pages.unpack_from(first, NATIVE.hdr - 4)
    if own != ov or not flags & P_OVERFLOW or npages < need:
        raise _Damage(f"{what} points to page {ov}, which is not an overflow run of {need} "
                      f"pages (page number {own}, flags 0x{flags:x}, {npages} pages)",
                      ov * pages.psize)
    if ov + npages > pages.file_pages:
        raise _Damage(f"{what} is on overflow pages {ov}..{ov + npages - 1}, past the end "
                      f"of the file ({pages.file_pages} pages): truncated", ov * pages.psize)


def _named_dbs(pages: _Pages, meta: _Meta, page: bytes, nkeys: int,
               roots: dict[int, str]) -> tuple[int, int]:
    """Check the named DBs recorded in the main DB's (single leaf) root page.

    Returns (how many, the pages they count)."""
    root = meta.main.root
    count = total = 0
    for off, dsize, nflags, ksize in pages.nodes(page, root, nkeys):
        if not nflags & F_SUBDATA or nflags & F_DUPDATA:
            continue
        name = page[off + NODE_HEADER:off + NODE_HEADER + ksize]
        label = f"named DB {name.decode('utf-8', 'replace')!r}"
        start = off + NODE_HEADER + ksize
        if dsize != NATIVE.db.size or start + dsize > pages.psize:
            raise _Damage(f"the main DB's record of {label} has {dsize} bytes, not "
                          f"{NATIVE.db.size}", root * pages.psize + off)
        db = _Db(*NATIVE.db.unpack_from(page, start))
        why = _db_problem(db, meta.last_pg, DB_PERSISTENT)
        if why:
            raise _Damage(f"{label}: {why}", root * pages.psize + off)
        if db.root != NATIVE.invalid:
            _check_root(pages, db, label, roots)
        count += 1
        total += db.pages
    return count, total


def _free_list_pass(pages: _Pages, meta: _Meta, tail: int, roots: dict[int, str]) -> bool:
    """Walk the free list (within the read budget): no root page may be on it, and every
    page from the end of the file up to last_pg must be (a short file is otherwise
    truncated).  True when walked, False when it was too big to read.
    """
    first = pages.file_pages
    per_page = pages.psize // NATIVE.wsize
    if tail > meta.free.pages * per_page:
        raise _Damage(f"the newest snapshot (txnid {meta.txnid}) uses pages up to "
                      f"{meta.last_pg} but the file ends after page {first - 1}; its free "
                      f"list ({meta.free.pages} pages) cannot list the {tail} missing pages: "
                      f"truncated", first * pages.psize)
    if meta.free.root == NATIVE.invalid:
        return True
    if meta.free.pages * pages.psize > pages.budget:
        return False
    seen = bytearray((tail + 7) // 8)        # tail <= budget / word size: bounded
    found = 0
    try:
        for pgno in _free_pgnos(pages, meta):
            i = pgno - first
            if 0 <= i < tail:
                if not seen[i >> 3] & (1 << (i & 7)):
                    seen[i >> 3] |= 1 << (i & 7)
                    found += 1
            elif pgno in roots:
                raise _Damage(f"page {pgno}, the {roots[pgno]}'s root, is also on the free "
                              f"list: LMDB would hand it out again", pgno * pages.psize)
    except _OverBudget:
        return False
    if found < tail:
        raise _Damage(f"the newest snapshot (txnid {meta.txnid}) uses pages up to "
                      f"{meta.last_pg} but the file ends after page {first - 1}; "
                      f"{tail - found} of the {tail} missing pages are not on the free "
                      f"list, so they hold live data: truncated", first * pages.psize)
    return True


def _free_pgnos(pages: _Pages, meta: _Meta):
    """Every page number listed in the free-list DB (a walk bounded by the budget)."""
    root = meta.free.root
    if root == NATIVE.invalid:
        return
    lay = NATIVE
    stack = [array.array(lay.word, [root])]      # one array of pending pages per level
    while stack:
        level = stack[-1]
        if not level:
            stack.pop()
            continue
        pgno = level.pop()
        page, flags, nkeys = pages.btree(pgno, "free-list DB page", budget=True)
        if flags & P_BRANCH:
            if len(stack) >= CURSOR_STACK:
                raise _Damage(f"the free-list DB is deeper than {CURSOR_STACK} levels "
                              f"(a loop?) at page {pgno}", pgno * pages.psize)
            children = array.array(lay.word)
            for _off, low, nflags, _k in pages.nodes(page, pgno, nkeys):
                child = low | (nflags << 32) if lay.wsize == 8 else low
                children.append(child)
            stack.append(children)
            continue
        if flags & P_LEAF2:
            raise _Damage(f"free-list DB page {pgno} is a LEAF2 page", pgno * pages.psize)
        last_key = 0
        for off, dsize, nflags, ksize in pages.nodes(page, pgno, nkeys):
            where = pgno * pages.psize + off
            start = off + NODE_HEADER + ksize
            # a record is {txnid that freed the pages: an id of 1..txnid, in key order}
            # -> {count, pgno...}; LMDB asserts on anything else when it next writes
            if nflags & ~F_BIGDATA or ksize != lay.wsize:
                raise _Damage(f"free-list DB page {pgno}: a record with flags 0x{nflags:x} "
                              f"and a {ksize}-byte key is not a free-list record", where)
            (key,) = struct.unpack_from("=" + lay.word, page, off + NODE_HEADER)
            if not last_key < key <= meta.txnid:
                raise _Damage(f"free-list DB page {pgno}: record key {key} is out of order "
                              f"or beyond the snapshot's txnid {meta.txnid}", where)
            last_key = key
            if dsize < lay.wsize or dsize % lay.wsize:
                raise _Damage(f"free-list DB page {pgno}: a record of {dsize} bytes is not "
                              f"a list of {lay.wsize}-byte page numbers", where)
            if nflags & F_BIGDATA:
                yield from _overflow_ids(pages, page, pgno, start, dsize)
                continue
            if start + dsize > pages.psize:
                raise _Damage(f"free-list DB page {pgno}: a record runs past the page", where)
            yield from _idl(page[start:start + dsize], pgno, pages.psize)


def _idl(data: bytes, pgno: int, psize: int):
    """The page numbers of one free-list record: a count, then that many pgnos."""
    lay = NATIVE
    words = len(data) // lay.wsize
    if words == 0:
        return
    ids = array.array(lay.word, data[:words * lay.wsize])
    count = ids[0]
    if count > words - 1:
        raise _Damage(f"free-list record on page {pgno} claims {count} pages but holds "
                      f"room for {words - 1}", pgno * psize)
    yield from ids[1:count + 1]


def _overflow_ids(pages: _Pages, page: bytes, pgno: int, start: int, dsize: int):
    """The page numbers of a free-list record stored on an overflow run (streamed)."""
    lay = NATIVE
    if start + lay.wsize > pages.psize:
        raise _Damage(f"free-list DB page {pgno}: an overflow reference runs past the page",
                      pgno * pages.psize)
    (ov,) = struct.unpack_from("=" + lay.word, page, start)
    first = pages.raw(ov, "free-list overflow page", budget=True) \
        if NUM_METAS <= ov <= pages.last_pg else None
    if first is None:
        raise _Damage(f"free-list DB page {pgno} points to overflow page {ov}, outside pages "
                      f"{NUM_METAS}..{pages.last_pg}", pgno * pages.psize)
    own, _pad, flags, _lo, _up = lay.header.unpack_from(first, 0)
    (npages,) = lay.ov_pages.unpack_from(first, lay.hdr - 4)
    if own != ov or not flags & P_OVERFLOW:
        raise _Damage(f"free-list overflow page {ov} is not an overflow page (page number "
                      f"{own}, flags 0x{flags:x})", ov * pages.psize)
    if npages < 1 or ov + npages - 1 > pages.last_pg \
            or dsize > npages * pages.psize - lay.hdr or dsize % lay.wsize:
        raise _Damage(f"free-list overflow page {ov}: {npages} pages cannot hold a record of "
                      f"{dsize} bytes within last page {pages.last_pg}", ov * pages.psize)
    if dsize < lay.wsize:
        return
    # the count word, then ids, possibly continuing on the following (header-less) pages
    chunk = first[lay.hdr:lay.hdr + dsize]
    remaining = dsize - len(chunk)
    ids = array.array(lay.word, chunk)
    count = ids[0]
    if count > dsize // lay.wsize - 1:
        raise _Damage(f"free-list record on overflow page {ov} claims {count} pages but "
                      f"holds room for {dsize // lay.wsize - 1}", ov * pages.psize)
    left = count
    batch = ids[1:1 + left]
    left -= len(batch)
    yield from batch
    nxt = ov + 1
    while left > 0 and remaining > 0:
        data = pages.raw(nxt, "free-list overflow page", budget=True)[:remaining]
        remaining -= len(data)
        nxt += 1
        batch = array.array(lay.word, data)[:left]
        left -= len(batch)
        yield from batch


# ---------------------------------------------------------------------------------------
# the full walk (``verify``)
Progress = Callable[[int, int], None] | None
WALK_PROGRESS_STEPS = 200  # progress calls of a walk (one every 1/200 of its pages, at
WALK_PROGRESS_PAGES = 64   # least this many pages apart)


def walk_lmdb_data_file(path: str, snapshot: int | None = None,
                        progress: Progress = None) -> int:
    """Read every page reachable from the newest meta page — each tree's branch and leaf
    pages, level by level, named DBs and duplicate sub-trees, the header of every overflow
    run — and check each as :func:`check_lmdb_data_file` checks roots (page number,
    kind, bounds, node offsets, child pointers inside the snapshot, leaves exactly at the
    tree's depth, no page reached twice).  Returns the number of pages read.

    The damage LMDB itself meets with an assertion (SIGABRT: a zeroed or overwritten page
    inside a tree, found by a cursor walk) is found here first, in Python, so ``verify``
    reports it as a CorruptionError instead of dying.  O(file size) reads, O(pages / 8)
    bytes of memory (a bitmap of the pages seen); a live writer is handled as the root
    check handles it (``ATTEMPTS``) — or, better, pinned: ``snapshot`` is the txnid of a
    read transaction the caller holds open for the walk, so none of its pages can be
    recycled and the walk reads that snapshot's meta page (SnapshotMissed when a later
    commit already rewrote it).  Unpinned, a writer recycling pages faster than the
    re-checks looked made ``verify`` report damage that was not there (a probe: 1 run in
    20-40 beside a writer, tens of MB of data file).

    ``progress(bytes of pages read, bytes of the snapshot's pages)``: about
    WALK_PROGRESS_STEPS times (an attempt walked again counts again).
    """
    check_lmdb_data_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if snapshot is not None:  # pinned by the caller's read transaction: damage is damage
            m0, m1 = _read_metas(fd)
            meta = m0 if m0.txnid == snapshot else m1 if m1.txnid == snapshot else None
            if meta is None:
                raise SnapshotMissed(f"the meta page of transaction {snapshot} was "
                                     f"rewritten before it was read")
            try:
                return _walk_once(fd, meta, progress)
            except _Damage as e:
                raise CorruptionError(e.reason, file=path, offset=e.offset) from None
        last: _Damage | None = None
        for _attempt in range(ATTEMPTS):
            before = _fingerprint(fd)
            try:
                return _walk_once(fd, None, progress)
            except _Damage as e:
                last = e
            if _fingerprint(fd) == before:
                break
        assert last is not None
        raise CorruptionError(last.reason, file=path, offset=last.offset)
    finally:
        os.close(fd)


class SnapshotMissed(Exception):
    """``walk_lmdb_data_file(snapshot=T)``: T's meta page was overwritten (by T+2) before
    it was read; begin a newer read transaction and walk again."""


def _walk_once(fd: int, newest: "_Meta | None" = None, progress: Progress = None) -> int:
    if newest is None:
        m0, m1 = _read_metas(fd)
        newest = m1 if m0.txnid < m1.txnid else m0
    pages = _Pages(fd, newest.psize, _file_size(fd), newest.last_pg)
    if progress is not None:  # (the walk reads at most the snapshot's pages)
        pages.progress = progress
        pages.total = (newest.last_pg + 1) * newest.psize
    pages.budget = 1 << 62  # (the walk reads what it must: overflow headers included)
    seen = bytearray(newest.last_pg // 8 + 1)
    trees: list = [("free-list DB", newest.free, False, None),
                   ("main DB", newest.main, True, None)]
    count = 0
    while trees:
        label, db, is_main, _name = trees.pop()
        count += _walk_tree(pages, newest, label, db, is_main, seen, trees)
    if progress is not None:  # (done: the pages no tree reaches, free ones, are not read)
        progress(pages.total, pages.total)
    return count


def _walk_tree(pages: _Pages, newest: _Meta, label: str, db: _Db, is_main: bool,
               seen: bytearray, trees: list) -> int:
    """Every page of one tree (sub-trees found on its leaves are appended to ``trees``)."""
    if db.root == NATIVE.invalid:
        return 0
    count = 0
    stack = [(db.root, 1)]
    while stack:
        pgno, level = stack.pop()
        if NUM_METAS <= pgno <= newest.last_pg:
            if seen[pgno >> 3] & (1 << (pgno & 7)):
                raise _Damage(f"page {pgno} is reached twice (in the {label}): the "
                              f"B-trees are damaged", pgno * pages.psize)
            seen[pgno >> 3] |= 1 << (pgno & 7)
        children, subs = _visit(pages, newest, label, db, is_main, pgno, level)
        count += 1
        pages.walked += 1
        if pages.progress is not None and pages.walked >= pages.next_report:
            pages.next_report = pages.walked + pages.step
            pages.progress(pages.walked * pages.psize, pages.total)
        stack.extend((child, level + 1) for _key, child in children)
        trees.extend(subs)
    return count


def _visit(pages: _Pages, newest: _Meta, label: str, db: _Db, is_main: bool, pgno: int,
           level: int) -> tuple[list, list]:
    """Read and check one page of a tree: kind against the tree's depth, every node's
    offset and bounds, child pointers, values (overflow run headers), sub-database
    records.  Returns ([(key, child) of a branch page], [sub-trees of a leaf page])."""
    what = f"page of the {label} at depth {level}"
    page, flags, nkeys = pages.btree(pgno, what)
    where = pgno * pages.psize
    leaf = bool(flags & P_LEAF)
    if leaf != (level == db.depth) or level > db.depth:
        raise _Damage(f"the {what} (page {pgno}) is a {_kind_of(flags)}, but the "
                      f"tree has depth {db.depth}", where)
    children: list = []
    subs: list = []
    if flags & P_LEAF2:
        return children, subs  # fixed-size duplicate keys only: no nodes to follow
    for off, low, nflags, ksize in pages.nodes(page, pgno, nkeys):
        start = off + NODE_HEADER + ksize
        if not leaf:
            children.append((page[off + NODE_HEADER:start],
                             _child(pages, low, nflags, pgno, what, where + off)))
            continue
        _check_value(pages, page, pgno, what, where + off, start, low, nflags)
        if nflags & F_BIGDATA:
            continue
        if nflags & F_SUBDATA:  # a named DB (main DB) or a duplicate sub-tree
            if low != NATIVE.db.size:
                raise _Damage(f"the {what} (page {pgno}): a sub-database record of "
                              f"{low} bytes, not {NATIVE.db.size}", where + off)
            sub = _Db(*NATIVE.db.unpack_from(page, start))
            why = _db_problem(sub, newest.last_pg, DB_PERSISTENT)
            if why:
                raise _Damage(f"the {what} (page {pgno}): {why}", where + off)
            name = page[off + NODE_HEADER:start]
            text = name.decode("utf-8", "replace")
            named = is_main and not nflags & F_DUPDATA
            subs.append((f"named DB {text!r}" if named
                         else f"duplicates under a key of the {label}", sub, False,
                         name if named else None))
    return children, subs


# ---------------------------------------------------------------------------------------
# the bounded check (recovery after an unclean shutdown)
SMALL_TREE_PAGES = 64   # a tree of at most this many pages is checked whole


def check_lmdb_paths(path: str, keys: dict[bytes, list[bytes]],
                     whole: tuple[bytes, ...] = ()) -> int:
    """Check the pages a batch of writes will touch, before LMDB writes into them.

    ``keys`` maps a named DB to the keys the batch reads or writes there.  Checked as
    :func:`walk_lmdb_data_file` checks every page: the free-list DB and the main DB whole,
    every named DB of at most ``SMALL_TREE_PAGES`` pages whole, and in each bigger one the
    path from the root to the leaf of each key given, of its first and of its last key
    (appends), with the left and right neighbour of every page on those paths (LMDB
    rebalances a page with a neighbour after a delete; a cursor steps into them).  The
    cost grows with the keys given times the trees' depth, never with the store's size;
    pages off those paths are left to ``verify`` (see FORMAT.md).  ``whole``: named DBs
    checked whole whatever their size (the open's first call: ``owed``, the index of the
    action rows in flight or owed, which the open reads whole to find what is owed; then
    the paths of the ``actions`` rows it names; ``actions`` whole only for a store whose
    index is not exact, which the open reads whole once to build it).  Returns the number of pages read.  Call it with the writer lock held and
    no write transaction open.
    """
    check_lmdb_data_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        m0, m1 = _read_metas(fd)
        newest = m1 if m0.txnid < m1.txnid else m0
        pages = _Pages(fd, newest.psize, _file_size(fd), newest.last_pg)
        pages.budget = 1 << 62
        try:
            return _paths_once(pages, newest, keys, whole)
        except _Damage as e:
            raise CorruptionError(e.reason, file=path, offset=e.offset) from None
    finally:
        os.close(fd)


def _paths_once(pages: _Pages, newest: _Meta, keys: dict[bytes, list[bytes]],
                whole: tuple[bytes, ...] = ()) -> int:
    seen = bytearray(newest.last_pg // 8 + 1)
    found: list = []
    count = _walk_tree(pages, newest, "free-list DB", newest.free, False, seen, [])
    count += _walk_tree(pages, newest, "main DB", newest.main, True, seen, found)
    while found:
        label, db, _is_main, name = found.pop()
        if db.root == NATIVE.invalid:
            continue
        if name is None or db.pages <= SMALL_TREE_PAGES or name in whole:
            count += _walk_tree(pages, newest, label, db, False, seen, found)
            continue
        count += _check_paths(pages, newest, label, db, keys.get(name, ()), found)
    return count


def _check_paths(pages: _Pages, newest: _Meta, label: str, db: _Db, keys, found: list
                 ) -> int:
    """Root-to-leaf paths of ``keys`` (plus the first and last key) in one big tree, each
    page on them with its two neighbours; LMDB's default key order (memcmp, then length:
    Python's bytes order)."""
    visited: dict[int, list] = {}

    def visit(pgno: int, level: int) -> list:
        got = visited.get(pgno)
        if got is None:
            got, subs = _visit(pages, newest, label, db, False, pgno, level)
            found.extend(subs)
            visited[pgno] = got
        return got

    targets: list = [b""] + sorted(set(keys)) + [None]  # None: past every key
    for key in targets:
        pgno, level = db.root, 1
        while True:
            children = visit(pgno, level)
            if not children:
                break
            if key is None:
                i = len(children) - 1
            else:  # the last node whose key is <= key (node 0's key counts as -infinity)
                lo, hi = 1, len(children)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if children[mid][0] <= key:
                        lo = mid + 1
                    else:
                        hi = mid
                i = lo - 1
            for j in (i - 1, i + 1):
                if 0 <= j < len(children):
                    visit(children[j][1], level + 1)
            pgno, level = children[i][1], level + 1
            if level > db.depth:
                raise _Damage(f"the {label} is deeper than its depth {db.depth} at page "
                              f"{pgno}", pgno * pages.psize)
    return len(visited)
