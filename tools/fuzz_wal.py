"""Fuzz the WAL reader and recovery with arbitrary and mutated bytes.

Targets (the same as tests/test_fuzz.py, for long runs):
  reader   - a segment file = a valid header + the input bytes, read by SegmentReader;
  recovery - a real store's last segment mutated by the input, opened in every recovery
             mode (strict may refuse with CorruptionError; nothing else may escape);
  payload  - record payload decoding.

The outcome must always be valid records or a clean CorruptionError: any other
exception, a hang, or an allocation beyond the bounded record size is a finding.

    python tools/fuzz_wal.py --seconds 60            # built-in mutation loop
    python tools/fuzz_wal.py --atheris [libFuzzer flags]   # coverage-guided (pip install atheris)
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402
from walstore.log import records  # noqa: E402
from walstore.log.format import SEGMENT_HEADER_SIZE, encode_segment_header  # noqa: E402
from walstore.log.reader import SegmentReader
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


def run_loop(seconds: float, seed: int) -> dict:
    rnd = random.Random(seed)
    fx = Fixture()
    tmp = tempfile.mkdtemp(prefix="walstore-fuzz-reader-")
    counts = {"reader": 0, "recovery": 0, "payload": 0, "refused": 0}
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            raw = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 300)))
            fuzz_reader(mutate(fx.last_bytes, rnd)[SEGMENT_HEADER_SIZE:] + raw, tmp)
            counts["reader"] += 1
            try:
                records.decode(raw)
            except ValueError:
                pass
            counts["payload"] += 1
            outcome = fuzz_recovery(fx, mutate(fx.last_bytes, rnd), rnd.choice(MODES))
            counts["recovery"] += 1
            counts["refused"] += outcome == "refused"
    finally:
        fx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def run_atheris(argv: list[str]) -> None:
    import atheris  # only when asked for
    tmp = tempfile.mkdtemp(prefix="walstore-atheris-")

    def one(data: bytes) -> None:
        fuzz_reader(data, tmp)
        try:
            records.decode(data)
        except ValueError:
            pass

    atheris.Setup(argv, one)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--atheris", action="store_true", help="coverage-guided, needs atheris")
    args, rest = ap.parse_known_args()
    if args.atheris:
        run_atheris([sys.argv[0]] + rest)
        return
    counts = run_loop(args.seconds, args.seed)
    print(f"fuzz inputs: reader {counts['reader']}, recovery {counts['recovery']} "
          f"({counts['refused']} refused cleanly), payload {counts['payload']}; "
          f"unexpected exceptions 0 (seed {args.seed})")


if __name__ == "__main__":
    main()
