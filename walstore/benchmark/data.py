"""What the benchmark writes and what it leaves on disk: keys, fresh values, sizes.

Keys are 20 bytes.  ``distinct_key(i)`` is a different key for every i (< 2**32), in a
scattered order, so inserts land all over a B-tree rather than at its right edge.  Values
are random bytes (the same pool in every process, so a child process can check a value)
led by a per-measurement nonce and a sequence number: no write repeats a value (SQLite does not rewrite a page whose bytes did not change, which fakes its speed),
and nothing compresses.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from .spec import Item

KEY_BYTES = 20
VALUE_BYTES = 100
MB = 1 << 20

_POOL = random.Random(0x5EED).randbytes(1 << 17)   # the same in every process
_SPREAD = 0x9E3779B1                  # odd, so i -> i * _SPREAD mod 2**32 is a bijection


def make_key(i: int) -> bytes:
    """The i-th key of a dense key space: exactly KEY_BYTES bytes."""
    return b"key:%016d" % i


def distinct_key(i: int) -> bytes:
    """The i-th of up to 2**32 distinct keys, scattered over the key order."""
    return make_key((i * _SPREAD) & 0xFFFFFFFF)


def make_value(seq: int, size: int = VALUE_BYTES, nonce: int = 0) -> bytes:
    """A fresh value of ``size`` bytes (at least 16): nonce, seq, then random bytes."""
    head = nonce.to_bytes(8, "little") + seq.to_bytes(8, "little")
    offset = (seq * 7919) % (len(_POOL) - size)
    return head + _POOL[offset:offset + size - 16]


def fresh_nonce() -> int:
    return int.from_bytes(os.urandom(8), "little")


def distinct_items(n: int, size: int = VALUE_BYTES, start: int = 0) -> list[Item]:
    """n writes of n distinct keys, each with a fresh value."""
    nonce = fresh_nonce()
    return [(distinct_key(i), make_value(i, size, nonce)) for i in range(start, start + n)]


def overwrite_items(n: int, keyspace: int, size: int = VALUE_BYTES) -> list[Item]:
    """n writes spread over ``keyspace`` keys (a prime stride), each with a fresh value."""
    nonce = fresh_nonce()
    return [(make_key((s * 7919) % keyspace), make_value(s, size, nonce)) for s in range(n)]


def allocated_bytes(path: str | Path) -> int:
    """Allocated bytes (st_blocks) of a file, or of every file under a directory
    (preallocated files count in full)."""
    path = str(path)
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:      # a file removed while we walk
                pass
    return total
