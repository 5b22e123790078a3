"""Fuzzing the WAL reader, payload decoding, recovery and the LMDB file check.

Whatever the bytes, reading yields valid records or stops cleanly, decoding raises only
ValueError, and opening a store with a mutated WAL either recovers or refuses with a
CorruptionError that names the file — never another exception, never a big allocation.
Records framed validly are read back exactly.  An LMDB data file is accepted by
walstore.engine.lmdb_check or refused with CorruptionError, and what it accepts LMDB opens without
dying of a signal.  The long-running version of the same targets is tools/fuzz_wal.py;
the last test runs its coverage-guided mode (atheris) briefly when atheris is installed.
"""
from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.fuzz_wal import (Fixture, LmdbCrashed, LmdbOpener, encode_framed, frame_segment,
                            fuzz_framed, fuzz_lmdb, fuzz_reader, fuzz_recovery, lmdb_seeds,
                            mutate, mutate_lmdb, parse_framed, wal_seeds)
from walstore import codec
from walstore.engine.lmdb_check import DATA_FILE, check_lmdb_files
from walstore.log import records
from walstore.log.format import RECORD_MAGIC, VALID_TYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fixture():
    fx = Fixture()
    yield fx
    fx.close()


@FAST
@given(st.binary(max_size=4096))
def test_reader_on_arbitrary_bytes_never_raises(tmp_path, data):
    fuzz_reader(data, str(tmp_path))


@FAST
@given(st.binary(max_size=512))
def test_payload_decoding_raises_only_value_error(data):
    try:
        records.decode(data)
    except ValueError:
        pass
    try:
        codec.unpack(data)
    except ValueError:
        pass


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1),
       mode=st.sampled_from(["strict", "tolerate-tail", "point-in-time", "skip-corrupt"]))
def test_recovery_of_mutated_wal_recovers_or_refuses_cleanly(fixture, seed, mode):
    outcome = fuzz_recovery(fixture, mutate(fixture.last_bytes, random.Random(seed)), mode)
    assert outcome in ("recovered", "refused")
    if mode != "strict":
        assert outcome == "recovered"


def test_huge_length_fields_allocate_nothing_big(tmp_path):
    """Headers claiming 4 GiB payloads, repeated: the reader must not allocate them."""
    header = struct.pack("<IIBB2sQQ", 0, 0xFFFFFFF0, 1, 0, RECORD_MAGIC, 0, 0)
    data = header * 2000
    tracemalloc.start()
    try:
        n = fuzz_reader(data, str(tmp_path))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 0
    assert peak < 4 * 1024 * 1024, f"reader allocated {peak} bytes for a {len(data)}-byte file"


def test_mutation_fixture_really_has_a_live_tail(fixture):
    """The recovery target is only meaningful if the mutated segment holds records."""
    import os
    from walstore.log.reader import SegmentReader
    path = os.path.join(fixture.pristine, "wal", fixture.last_name)
    reader = SegmentReader(path, fixture.store_id, int(fixture.last_name[:20]))
    assert len(list(reader.records())) > 10


# ---------------------------------------------------------------------------------------
# framed records: valid CRCs, fuzzed payloads

@FAST
@given(st.binary(max_size=4096))
def test_framed_records_are_read_back_exactly(tmp_path, data):
    n = fuzz_framed(data, str(tmp_path))
    assert n == len(parse_framed(data))


@FAST
@given(st.lists(st.tuples(st.sampled_from(sorted(VALID_TYPES)), st.binary(max_size=300)),
                max_size=12))
def test_framed_encoding_round_trips(recs):
    assert parse_framed(encode_framed(recs)) == recs


def test_wal_seeds_are_real_records(fixture, tmp_path):
    """The atheris corpus is seeded with the store's own records, valid where they land."""
    seeds = wal_seeds(fixture)
    full = max((k for k in seeds if k.startswith("segment-")), key=lambda k: len(seeds[k]))
    assert fuzz_reader(seeds[full], str(tmp_path)) > 50
    assert fuzz_framed(seeds[full.replace("segment", "framed")], str(tmp_path)) > 50
    types = {int(k[len("payload-type"):]) for k in seeds if k.startswith("payload-type")}
    assert {1, 3} <= types           # commits and a checkpoint at least
    for k in seeds:
        if k.startswith("payload-type"):
            assert isinstance(records.decode(seeds[k]), dict)
    assert frame_segment([])[:4] == frame_segment([(1, b"x")])[:4]


# ---------------------------------------------------------------------------------------
# the LMDB data-file check, with LMDB itself as the oracle

@pytest.fixture(scope="module")
def lmdb_inputs(tmp_path_factory):
    return lmdb_seeds(str(tmp_path_factory.mktemp("lmdb-seeds")))


@pytest.fixture(scope="module")
def opener():
    o = LmdbOpener()
    yield o
    o.close()


def test_lmdb_seeds_are_accepted_and_one_ends_before_its_last_page(lmdb_inputs, tmp_path):
    tails = []
    for name, data in lmdb_inputs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / DATA_FILE).write_bytes(data)
        info = check_lmdb_files(str(tmp_path / name))
        tails.append(info.tail_pages)
    assert max(tails) > 0, "no seed exercises the never-written tail"


@FAST
@given(st.binary(max_size=20000))
def test_lmdb_check_on_arbitrary_bytes_accepts_or_refuses(tmp_path, data):
    db = tmp_path / "db"
    db.mkdir(exist_ok=True)
    assert fuzz_lmdb(data, str(db)) in ("accepted", "refused")


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_lmdb_accepts_only_what_lmdb_survives(tmp_path, lmdb_inputs, opener, seed):
    rnd = random.Random(seed)
    data = mutate_lmdb(lmdb_inputs[rnd.choice(sorted(lmdb_inputs))], rnd)
    db = tmp_path / "db"
    db.mkdir(exist_ok=True)
    assert fuzz_lmdb(data, str(db), opener) in ("accepted", "refused")


def test_the_lmdb_oracle_notices_a_crash(tmp_path, lmdb_inputs):
    """The opener really reports a signal: a truncated file the check is bypassed for."""
    db = tmp_path / "db"
    db.mkdir()
    data = lmdb_inputs["walstore"]
    (db / DATA_FILE).write_bytes(data[:8192])
    o = LmdbOpener()
    try:
        with pytest.raises(LmdbCrashed, match="signal 7"):
            o.open(str(db))
        (db / DATA_FILE).write_bytes(data)
        assert o.open(str(db)) == "ok"       # restarted after the crash
    finally:
        o.close()


def test_lmdb_check_on_hostile_meta_allocates_little(tmp_path, lmdb_inputs):
    data = bytearray(lmdb_inputs["walstore"])
    for off in (136, 4096 + 136):            # last page: 2**40
        struct.pack_into("<Q", data, off, 1 << 40)
    db = tmp_path / "db"
    db.mkdir()
    tracemalloc.start()
    try:
        fuzz_lmdb(bytes(data), str(db))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024


# ---------------------------------------------------------------------------------------
# the coverage-guided harness learns (issue 11, item 10)

@pytest.mark.parametrize("target", ["wal", "lmdb"])
def test_atheris_harness_learns_and_stops_by_itself(tmp_path, target):
    """2 s of fuzzing (after ~4 s of start-up and instrumentation): its first new inputs
    come within the first few dozen executions (hundreds a second here)."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fuzz_wal.py"),
                        "--atheris", "--target", target, "--seconds", "2",
                        "--corpus", str(corpus)],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    done = [line for line in r.stderr.splitlines() if "DONE" in line]
    assert done, r.stderr[-3000:]                 # -max_total_time came from --seconds
    m = re.search(r"cov: (\d+) ft: (\d+) corp: (\d+)/", done[-1])
    cov, ft, corp = map(int, m.groups())
    seeds = len([n for n in os.listdir(corpus) if n.startswith("seed-")])
    assert seeds >= 3
    assert cov > 50 and ft > cov
    assert corp > seeds                           # it kept inputs that found new coverage
    assert len(os.listdir(corpus)) > seeds
