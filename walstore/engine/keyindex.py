"""The MemTable's key order: which of its keys fall in a range, without a scan of them all.

Owns :class:`KeyIndex`, an ordered set of byte keys kept as sorted chunks of at most
``2 * CHUNK`` keys (a bisect over the chunks' last keys, then over one chunk), so adding,
removing and finding a range cost O(log n) comparisons and a short memmove, never O(n).

How the MemTable uses it (see :mod:`walstore.engine.memtable`):
- committers only *note* a key that is new to the MemTable (a list append, under the
  journal lock): nothing sorted on the commit path;
- the first range read after new keys arrived folds the noted keys into the order (under
  the index's own lock, never the journal's);
- keys that left the MemTable stay in the order until it is rebuilt (callers check each
  candidate against the MemTable's versions anyway); the order is dropped and rebuilt
  from the live keys once it holds more than twice as many keys as the MemTable plus
  ``SLACK``, so its size stays bounded by the MemTable's.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Iterable

CHUNK = 512
SLACK = 4096


class KeyIndex:
    """An ordered set of ``bytes`` keys: ``add``, ``discard``, ``range``, ``__len__``.  Not
    thread-safe by itself (the MemTable serializes access with its index lock)."""

    def __init__(self, keys: Iterable[bytes] = (), *, distinct: bool = False) -> None:
        """``distinct``: the caller vouches that ``keys`` holds no duplicates (a dict's
        keys), so they are sorted as they come; an order close to sorted (keys entered
        in ascending order, as agents' sequence numbers are) then sorts in about one
        pass, where deduplicating through a set would scramble it first."""
        ordered = sorted(keys) if distinct else sorted(set(keys))
        self._chunks: list[list[bytes]] = [ordered[i:i + CHUNK]
                                           for i in range(0, len(ordered), CHUNK)]
        self._lasts: list[bytes] = [c[-1] for c in self._chunks]
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def add(self, key: bytes) -> None:
        lasts = self._lasts
        if not lasts:
            self._chunks.append([key])
            lasts.append(key)
            self._len = 1
            return
        i = bisect_left(lasts, key)
        if i == len(lasts):  # past every key: the last chunk's new end
            i -= 1
            chunk = self._chunks[i]
            chunk.append(key)
            lasts[i] = key
        else:
            chunk = self._chunks[i]
            j = bisect_left(chunk, key)
            if chunk[j] == key:  # (j < len(chunk): key <= the chunk's last)
                return
            chunk.insert(j, key)
        self._len += 1
        if len(chunk) > 2 * CHUNK:
            self._chunks[i:i + 1] = [chunk[:CHUNK], chunk[CHUNK:]]
            lasts[i:i + 1] = [chunk[CHUNK - 1], chunk[-1]]

    def discard(self, key: bytes) -> None:
        """Remove ``key`` when present (O(log n) and a short memmove)."""
        lasts = self._lasts
        i = bisect_left(lasts, key)
        if i == len(lasts):
            return
        chunk = self._chunks[i]
        j = bisect_left(chunk, key)
        if chunk[j] != key:  # (j < len(chunk): key <= the chunk's last)
            return
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._chunks[i]
            del lasts[i]
        elif j == len(chunk):
            lasts[i] = chunk[-1]

    def range(self, lo: bytes, hi: bytes | None) -> list[bytes]:
        """The keys in [lo, hi) (``hi`` None: no upper bound), in order."""
        out: list[bytes] = []
        chunks = self._chunks
        i = bisect_left(self._lasts, lo)
        first = True
        while i < len(chunks):
            chunk = chunks[i]
            j = bisect_left(chunk, lo) if first else 0
            first = False
            if hi is None:
                out.extend(chunk[j:])
            elif chunk[-1] < hi:
                out.extend(chunk[j:])
            else:
                out.extend(chunk[j:bisect_left(chunk, hi, j)])
                return out
            i += 1
        return out
