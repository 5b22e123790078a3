"""Fuzzing the WAL reader, payload decoding and recovery with hypothesis.

Whatever the bytes, reading yields valid records or stops cleanly, decoding raises only
ValueError, and opening a store with a mutated WAL either recovers or refuses with a
CorruptionError that names the file — never another exception, never a big allocation.
The long-running version of the same targets is tools/fuzz_wal.py.
"""
from __future__ import annotations

import random
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.fuzz_wal import Fixture, fuzz_reader, fuzz_recovery, mutate
from walstore import codec
from walstore.log import records
from walstore.log.format import RECORD_MAGIC

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
