"""``records.chunk_writes``: how a transaction's write set is cut into WRITES chunks (the
last part goes in the COMMIT), against the rule written plainly: a pair counts
len(key) + len(value) + 16, a chunk ends before the pair that would take it past
chunk_bytes.  Recovery's bound on one unfinished transaction's buffer and the chunk sizes
follow from these cuts."""
from __future__ import annotations

import random

import pytest

from walstore.log import records


def _rule(writes: list, chunk_bytes: int) -> list[list]:
    """The rule, written plainly: a pair counts len(key) + len(value) + 16; a chunk ends
    before the pair that would take it past chunk_bytes, unless it is empty."""
    chunks, cur, size = [], [], 0
    for k, v in writes:
        n = len(k) + (0 if v is None else len(v)) + 16
        if cur and size + n > chunk_bytes:
            chunks.append(cur)
            cur, size = [], 0
        cur.append((k, v))
        size += n
    chunks.append(cur)
    return chunks


@pytest.mark.parametrize("seed", range(40))
def test_chunks_follow_the_rule(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        n = rng.choice([0, 1, 2, 63, 64, 65, 300, 2000])
        big = rng.random() < 0.3
        deletes = rng.random() < 0.3
        writes = [(rng.randbytes(rng.randint(1, 24)),
                   None if deletes and rng.random() < 0.1
                   else rng.randbytes(rng.randint(0, 6000 if big else 60)))
                  for _ in range(n)]
        chunk_bytes = rng.choice([1, 16, 40, 1000, 4096, 65536, 1 << 20])
        got = records.chunk_writes(writes, chunk_bytes)
        assert [list(c) for c in got] == _rule(writes, chunk_bytes)


def test_a_pair_bigger_than_a_chunk_is_a_chunk_of_its_own() -> None:
    writes = [(b"a", b"x" * 10)] * 100 + [(b"b", b"y" * 5000)] + [(b"c", b"z")] * 100
    got = records.chunk_writes(writes, 1000)
    assert [(b"b", b"y" * 5000)] in got
    assert sum(map(len, got)) == len(writes)
    assert [p for c in got for p in c] == writes
