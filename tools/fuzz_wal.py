"""Fuzz the WAL reader, record decoding, recovery and the LMDB file check.

Targets (the same as tests/test_fuzz.py, for long runs):
  reader   - a segment file = a valid header + the input bytes, read by SegmentReader;
  framed   - the input read as (type, length, payload) triples, framed as VALID records
             (right CRC and LSN) and read back: the reader must return exactly those
             records, decoding and the commit assembler may only raise ValueError;
  payload  - record payload decoding;
  recovery - a real store's last segment mutated, opened in every recovery mode (strict
             may refuse with CorruptionError; nothing else may escape) [built-in loop];
  lmdb     - the input bytes as an LMDB data.mdb: walstore.engine.lmdb_check accepts it or raises
             CorruptionError, nothing else; when it accepts, LMDB itself opens, reads and
             writes the file in a child process, which must not die of a signal or hang.

The outcome must always be valid records or a clean error: any other exception, a hang,
a signal or an allocation beyond the bounded record size is a finding.

    python tools/fuzz_wal.py --seconds 60                     # built-in mutation loop
    python tools/fuzz_wal.py --atheris --target wal --seconds 300 [libFuzzer flags]
    python tools/fuzz_wal.py --atheris --target lmdb --seconds 180 --corpus DIR

--atheris (pip install 'walstore[fuzz]') instruments every walstore module for coverage
feedback, seeds the corpus (--corpus, a temporary directory by default) with real segments,
records and data.mdb files from a real store, and stops after --seconds
(libFuzzer's -max_total_time).  libFuzzer prints executions (#N), coverage (cov:),
features (ft:) and the corpus (corp: entries/bytes); new inputs are kept in the corpus.
"""
from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402
from walstore.engine.lmdb_check import DATA_FILE, check_lmdb_files  # noqa: E402
from walstore.errors import CorruptionError  # noqa: E402
from walstore.log import records  # noqa: E402
from walstore.log.format import (SEGMENT_HEADER_SIZE, VALID_TYPES, encode_record,  # noqa: E402
                                 encode_segment_header, segment_salt)
from walstore.log.reader import SegmentReader  # noqa: E402
from walstore.log.segment import list_segments  # noqa: E402

MODES = ("strict", "tolerate-tail", "point-in-time", "skip-corrupt")
ALLOC_LIMIT = 64 * 1024 * 1024


class Fixture:
    """A small real store whose WAL the fuzzer mutates (rebuilt from a pristine copy)."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="walstore-fuzz-")
        self.pristine = os.path.join(self.root, "pristine")
        with walstore.open(self.pristine, segment_size=16384, durability="none") as s:
            for i in range(60):
                with s.transaction(meta={"i": i}) as tx:
                    tx.put(f"k{i % 7}", {"i": i, "pad": "x" * (i % 50)})
        # leave records in the WAL past the checkpoint: reopen, write, crash
        s = walstore.open(self.pristine, segment_size=16384, durability="none")
        for i in range(40):
            with s.transaction() as tx:
                tx.put(f"k{i % 5}", i)
        s.sync()
        s._drop_like_a_crash()
        segs = list_segments(os.path.join(self.pristine, "wal"))
        self.last_name = os.path.basename(segs[-1][1])
        with open(segs[-1][1], "rb") as f:
            self.last_bytes = f.read()
        self.store_id = walstore.open(self.pristine).store_id
        self.work = os.path.join(self.root, "work")

    def fresh_copy(self) -> str:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.pristine, self.work)
        return self.work

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def fuzz_reader(data: bytes, tmpdir: str, store_id: bytes = b"\x01" * 16) -> int:
    path = os.path.join(tmpdir, f"{0:020d}.wal")
    with open(path, "wb") as f:
        f.write(encode_segment_header(store_id, 0, 0) + data)
    reader = SegmentReader(path, store_id, 0)
    n = 0
    for rec in reader.records():
        assert len(rec.payload) <= len(data)
        n += 1
    assert reader.end is not None and reader.end.offset <= SEGMENT_HEADER_SIZE + len(data)
    return n


def mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        if len(b) <= SEGMENT_HEADER_SIZE:
            break  # truncated to the header: nothing left to mutate
        op = rnd.randrange(5)
        pos = rnd.randrange(SEGMENT_HEADER_SIZE, max(SEGMENT_HEADER_SIZE + 1, len(b)))
        if op == 0:
            b[pos] ^= 1 << rnd.randrange(8)
        elif op == 1:
            end = min(len(b), pos + rnd.choice((1, 7, 512, 4096)))
            b[pos:end] = bytes(end - pos)
        elif op == 2:
            del b[pos:]
        elif op == 3:
            b[pos:pos + 4] = rnd.choice((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"WRWR"))
        else:
            src = rnd.randrange(SEGMENT_HEADER_SIZE, max(SEGMENT_HEADER_SIZE + 1, len(b)))
            b[pos:pos + 64] = b[src:src + 64]
    return bytes(b)


def fuzz_recovery(fx: Fixture, mutated: bytes, mode: str) -> str:
    root = fx.fresh_copy()
    with open(os.path.join(root, "wal", fx.last_name), "wb") as f:
        f.write(mutated)
    try:
        s = walstore.open(root, options=walstore.Options(recovery_mode=mode,
                                                        segment_size=16384))
    except walstore.CorruptionError as e:
        assert e.reason and e.file
        return "refused"
    with s:
        list(s.scan())
    return "recovered"


def check_alloc(fn, *args) -> None:
    tracemalloc.start()
    try:
        fn(*args)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"peak allocation {peak} bytes"


FUZZ_STORE_ID = b"\x01" * 16
VALID = sorted(VALID_TYPES)


# ---------------------------------------------------------------------------------------
# framed: valid records with fuzzed payloads

def parse_framed(data: bytes) -> list[tuple[int, bytes]]:
    """The input as (type, u16 length, payload) triples; types folded onto valid ones."""
    out = []
    pos = 0
    while pos < len(data) and len(out) < 256:
        rtype = VALID[data[pos] % len(VALID)]
        length = int.from_bytes(data[pos + 1:pos + 3], "little")
        payload = data[pos + 3:pos + 3 + length]
        out.append((rtype, payload))
        pos += 3 + length
    return out


def encode_framed(recs: list[tuple[int, bytes]]) -> bytes:
    """The inverse of parse_framed (payloads longer than 65535 bytes are cut)."""
    return b"".join(bytes([VALID.index(t)]) + len(p[:65535]).to_bytes(2, "little") + p[:65535]
                    for t, p in recs)


def frame_segment(recs: list[tuple[int, bytes]], store_id: bytes = FUZZ_STORE_ID) -> bytes:
    """A segment starting at LSN 0 holding ``recs`` as valid records."""
    salt = segment_salt(store_id, 0)
    out = [encode_segment_header(store_id, 0, 0)]
    lsn = synced = 0
    for rtype, payload in recs:
        rec = encode_record(salt, rtype, lsn, synced, payload)
        out.append(rec)
        synced = lsn
        lsn += len(rec)
    return b"".join(out)


def fuzz_framed(data: bytes, tmpdir: str) -> int:
    """Frame the input as valid records; the reader must give back exactly those."""
    recs = parse_framed(data)
    path = os.path.join(tmpdir, f"{0:020d}.wal")
    with open(path, "wb") as f:
        f.write(frame_segment(recs))
    reader = SegmentReader(path, FUZZ_STORE_ID, 0)
    got = [(r.type, r.payload) for r in reader.records()]
    assert got == recs, f"framed {len(recs)} records, read back {len(got)}"
    assert reader.end is not None and reader.end.kind == "clean", reader.end
    assembler = records.CommitAssembler(max_bytes=1 << 20)
    for rtype, payload in got:
        try:
            assembler.feed(rtype, 0, 0, records.decode(payload), len(payload))
        except ValueError:
            pass
    return len(got)


# ---------------------------------------------------------------------------------------
# lmdb: the data-file check, with LMDB itself as the oracle

OPENER = r"""
import sys, lmdb
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        env = lmdb.open(path, max_dbs=16, map_size=64 << 20, sync=False, subdir=True)
        try:
            with env.begin() as t:
                names = [k for k, _ in t.cursor()]
                for name in names[:32]:
                    try:
                        db = env.open_db(name, txn=t, create=False)
                    except lmdb.Error:
                        continue
                    for _kv in t.cursor(db=db):
                        pass
            with env.begin(write=True) as t:
                t.put(b"fuzz", b"x" * 3000, db=env.open_db(b"fuzz-oracle", txn=t))
        finally:
            env.close()
        print("ok", flush=True)
    except lmdb.Error as e:
        print("err", type(e).__name__, flush=True)
"""


class LmdbCrashed(AssertionError):
    """LMDB died (signal) or hung on a data file walstore.engine.lmdb_check accepted."""


class LmdbOpener:
    """A long-lived child that opens data files with LMDB, so a SIGBUS kills only it."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.opened = 0

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", OPENER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, bufsize=1)
        return self.proc

    def open(self, db_dir: str) -> str:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(db_dir + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _w, _x = select.select([proc.stdout], [], [], self.timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            if not ready:
                proc.kill()
            code = proc.wait()
            self.proc = None
            what = "hung" if not ready else f"died with exit code {code}"
            if code < 0 and ready:
                what = f"was killed by signal {-code}"
            raise LmdbCrashed(f"LMDB {what} on a data file the check accepted ({db_dir})")
        self.opened += 1
        return line.split()[0]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def fuzz_lmdb(data: bytes, db_dir: str, opener: LmdbOpener | None = None) -> str:
    """``data`` as db_dir/data.mdb: "accepted" or "refused"; anything else is a finding."""
    for name in os.listdir(db_dir):
        os.remove(os.path.join(db_dir, name))
    with open(os.path.join(db_dir, DATA_FILE), "wb") as f:
        f.write(data)
    try:
        info = check_lmdb_files(db_dir)
    except CorruptionError as e:
        assert e.file and e.reason and "\n" not in e.reason, e
        return "refused"
    assert info is not None and info.file_size == len(data)
    if opener is not None:
        opener.open(db_dir)
    return "accepted"


def mutate_lmdb(data: bytes, rnd: random.Random, psize: int = 4096) -> bytes:
    """Damage a data.mdb where the check looks: meta pages, their fields, page ends."""
    b = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.randrange(6)
        meta = rnd.choice((0, psize))
        if op == 0 and len(b) > meta + 160:              # flip a bit of a meta page
            pos = meta + rnd.randrange(160)
            b[pos] ^= 1 << rnd.randrange(8)
        elif op == 1 and len(b) > meta + 152:            # a meta word set to an edge value
            off = meta + rnd.choice((40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128,
                                     136, 144))
            val = rnd.choice((0, 1, 2, 3, 0xFFFFFFFF, (1 << 64) - 1, len(b) // psize,
                              len(b) // psize + rnd.randrange(1, 50), rnd.getrandbits(64)))
            struct.pack_into("<Q", b, off, val & ((1 << 64) - 1))
        elif op == 2:                                    # truncate
            del b[rnd.choice((rnd.randrange(len(b) + 1), (len(b) // psize - 1) * psize)):]
        elif op == 3 and len(b) >= psize:                # zero a page
            pg = rnd.randrange(len(b) // psize)
            b[pg * psize:(pg + 1) * psize] = bytes(psize)
        elif op == 4 and len(b) >= 2 * psize:            # copy one page over another
            n = len(b) // psize
            src, dst = rnd.randrange(n), rnd.randrange(n)
            b[dst * psize:(dst + 1) * psize] = b[src * psize:(src + 1) * psize]
        elif len(b) > 16:                                # random bytes somewhere
            pos = rnd.randrange(len(b))
            b[pos:pos + 8] = rnd.randbytes(8)
    return bytes(b)


# ---------------------------------------------------------------------------------------
# seeds: real segments, records and data files

def wal_seeds(fx: Fixture) -> dict[str, bytes]:
    """Inputs for the wal target made from a real store's log.

    The store's records re-framed under the fuzz target's segment identity (so their CRCs
    and LSNs are valid there) for the raw reader, the same records as framed triples, and
    the payloads alone."""
    recs: list[tuple[int, bytes]] = []
    for start, path in list_segments(os.path.join(fx.pristine, "wal")):
        reader = SegmentReader(path, fx.store_id, start)
        recs.extend((r.type, r.payload) for r in reader.records())
    seeds: dict[str, bytes] = {}
    for n in (1, 3, 8, len(recs)):
        seeds[f"segment-{n}"] = frame_segment(recs[:n])[SEGMENT_HEADER_SIZE:]
        seeds[f"framed-{n}"] = encode_framed(recs[:n])
    by_type: dict[int, bytes] = {}
    for rtype, payload in recs:
        by_type.setdefault(rtype, payload)
    for rtype, payload in by_type.items():
        seeds[f"payload-type{rtype}"] = payload
    return seeds


def lmdb_seeds(workdir: str) -> dict[str, bytes]:
    """Real data.mdb files: a walstore store's, a small one, one shorter than its last page."""
    import lmdb
    seeds = {}
    root = os.path.join(workdir, "seed-store")
    with walstore.open(root, durability="none") as s:
        for i in range(20):
            with s.transaction() as tx:
                tx.put(f"k{i % 5}", {"i": i})
    with open(os.path.join(root, "db", DATA_FILE), "rb") as f:
        seeds["walstore"] = f.read()
    small = os.path.join(workdir, "seed-small")
    env = lmdb.open(small, max_dbs=2, map_size=1 << 24)
    with env.begin(write=True) as t:
        t.put(b"k", b"v", db=env.open_db(b"d", txn=t))
    env.close()
    with open(os.path.join(small, DATA_FILE), "rb") as f:
        seeds["small"] = f.read()
    short = os.path.join(workdir, "seed-short")
    env = lmdb.open(short, max_dbs=2, map_size=1 << 26)
    db = env.open_db(b"d")
    rnd = random.Random(1)
    for i in range(40):
        with env.begin(write=True) as t:
            t.put(b"k%d" % (i % 7), rnd.randbytes(300), db=db)
            t.put(b"big", b"z" * 40000, db=db)
            t.delete(b"big", db=db)
    env.close()
    with open(os.path.join(short, DATA_FILE), "rb") as f:
        seeds["short-tail"] = f.read()
    return seeds


def write_seeds(directory: str, seeds: dict[str, bytes]) -> int:
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(data)
    return len(seeds)


# ---------------------------------------------------------------------------------------
# drivers

def run_loop(seconds: float, seed: int, target: str = "all") -> dict:
    rnd = random.Random(seed)
    counts = {"reader": 0, "framed": 0, "recovery": 0, "payload": 0, "refused": 0,
              "lmdb": 0, "lmdb_refused": 0, "lmdb_opened": 0}
    fx = Fixture()
    tmp = tempfile.mkdtemp(prefix="walstore-fuzz-reader-")
    db_dir = os.path.join(tmp, "db")
    os.makedirs(db_dir)
    opener = LmdbOpener()
    lmdb_inputs = list(lmdb_seeds(tmp).values()) if target in ("lmdb", "all") else []
    framed = [encode_framed([(t, p)]) for t, p in
              ((int(k[len("payload-type"):]), v) for k, v in wal_seeds(fx).items()
               if k.startswith("payload-type"))]
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if target in ("wal", "all"):
                raw = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 300)))
                fuzz_reader(mutate(fx.last_bytes, rnd)[SEGMENT_HEADER_SIZE:] + raw, tmp)
                counts["reader"] += 1
                fuzz_framed(rnd.choice(framed) + raw, tmp)
                counts["framed"] += 1
                try:
                    records.decode(raw)
                except ValueError:
                    pass
                counts["payload"] += 1
                outcome = fuzz_recovery(fx, mutate(fx.last_bytes, rnd), rnd.choice(MODES))
                counts["recovery"] += 1
                counts["refused"] += outcome == "refused"
            if lmdb_inputs:
                outcome = fuzz_lmdb(mutate_lmdb(rnd.choice(lmdb_inputs), rnd), db_dir, opener)
                counts["lmdb"] += 1
                counts["lmdb_refused"] += outcome == "refused"
        counts["lmdb_opened"] = opener.opened
    finally:
        opener.close()
        fx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def instrument_walstore() -> int:
    """Add atheris coverage instrumentation to every function of every walstore module.

    walstore is imported at the top of this file (the built-in loop needs it), so this is
    atheris.instrument_imports(include=["walstore"]) after the fact: the same bytecode
    patching (atheris.instrument_func), applied to the functions already loaded, nested
    functions and methods included.
    """
    import gc

    import atheris
    count = 0
    for obj in gc.get_objects():
        if (isinstance(obj, types.FunctionType)
                and (getattr(obj, "__module__", None) or "").startswith("walstore")
                and obj.__module__ in sys.modules):
            atheris.instrument_func(obj)
            count += 1
    return count


def run_atheris(target: str, seconds: float, corpus: str | None, libfuzzer_args: list[str],
                open_with_lmdb: bool = True) -> None:
    import atheris  # only when asked for
    tmp = tempfile.mkdtemp(prefix="walstore-atheris-")
    corpus = corpus or os.path.join(tmp, "corpus")
    if target == "wal":
        fx = Fixture()
        try:
            seeded = write_seeds(corpus, wal_seeds(fx))
        finally:
            fx.close()
    else:
        seeded = write_seeds(corpus, lmdb_seeds(tmp))
    db_dir = os.path.join(tmp, "db")
    os.makedirs(db_dir)
    opener = LmdbOpener() if open_with_lmdb else None
    n = instrument_walstore()
    print(f"INFO: walstore: {n} functions instrumented; {seeded} seeds in {corpus}",
          file=sys.stderr, flush=True)

    stats = {"runs": 0, "records": 0, "accepted": 0, "refused": 0}

    def report() -> None:
        stats["runs"] += 1
        n = stats["runs"]
        if n & (n - 1) == 0 and n >= 1024:      # at powers of two, like libFuzzer's pulse
            extra = (f"records read back {stats['records']}" if target == "wal" else
                     f"accepted {stats['accepted']}, refused {stats['refused']}, opened by "
                     f"LMDB {opener.opened if opener else 0}")
            print(f"#{n}\twalstore {target}: {extra}", file=sys.stderr, flush=True)

    def one_wal(data: bytes) -> None:
        fuzz_reader(data, tmp)
        stats["records"] += fuzz_framed(data, tmp)
        try:
            records.decode(data)
        except ValueError:
            pass
        report()

    def one_lmdb(data: bytes) -> None:
        stats[fuzz_lmdb(data, db_dir, opener)] += 1
        report()

    args = [sys.argv[0]]
    if not any(a.startswith(("-max_total_time", "-runs")) for a in libfuzzer_args):
        args.append(f"-max_total_time={max(1, int(seconds))}")
    if not any(a.startswith("-artifact_prefix") for a in libfuzzer_args):
        artifacts = corpus.rstrip("/") + "-findings"      # not the working directory
        os.makedirs(artifacts, exist_ok=True)
        args.append(f"-artifact_prefix={artifacts}/")
        print(f"INFO: findings (crashing inputs) go to {artifacts}/", file=sys.stderr)
    if not any(a.startswith("-rss_limit_mb") for a in libfuzzer_args):
        # libFuzzer's limit (2,048 MB) judges the peak RSS getrusage reports, and Linux
        # carries a forking parent's peak across exec: started from a test process that
        # had reached 2.6 GB, every run was "out-of-memory" at once.  The limit is on
        # this harness's own growth: 2,048 MB above what it inherited.
        import resource
        inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        args.append(f"-rss_limit_mb={inherited_mb + 2048}")
    args += libfuzzer_args + [corpus]
    atheris.Setup(args, one_wal if target == "wal" else one_lmdb)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="how long to run (with --atheris: libFuzzer's -max_total_time)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--target", choices=("wal", "lmdb", "all"), default=None,
                    help="built-in loop: default all; --atheris: wal (default) or lmdb")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided, needs atheris")
    ap.add_argument("--corpus", help="--atheris corpus directory (seeded; new inputs kept)")
    ap.add_argument("--no-lmdb-open", action="store_true",
                    help="lmdb target: only the check, do not open accepted files with LMDB")
    args, rest = ap.parse_known_args()
    if args.atheris:
        target = args.target or "wal"
        if target == "all":
            ap.error("--atheris fuzzes one target at a time: --target wal or lmdb")
        run_atheris(target, args.seconds, args.corpus, rest, not args.no_lmdb_open)
        return
    if rest:
        ap.error(f"unknown arguments {rest} (libFuzzer flags need --atheris)")
    counts = run_loop(args.seconds, args.seed, args.target or "all")
    print(f"fuzz inputs: reader {counts['reader']}, framed {counts['framed']}, recovery "
          f"{counts['recovery']} ({counts['refused']} refused cleanly), payload "
          f"{counts['payload']}, lmdb {counts['lmdb']} ({counts['lmdb_refused']} refused, "
          f"{counts['lmdb_opened']} accepted and opened by LMDB); "
          f"unexpected exceptions 0 (seed {args.seed})")


if __name__ == "__main__":
    main()
