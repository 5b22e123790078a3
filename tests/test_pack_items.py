"""``codec.pack_items`` (``tx.update``'s packing) against packing each pair by itself
(``{encode_key(k): pack_value(v, k)}``, the last value of a repeated key winning): the same
result and every error with its message, for lists, tuples, dict items and generators of
pairs, odd pairs among many.  (A column-at-a-time version was tried in stop 41 and dropped:
slower than the loop — each pass over 100,000 pairs costs its cache misses — and its
review found it pairing keys with other keys' values when another thread changed the
dict; these tests keep any later attempt honest.)"""
from __future__ import annotations

import random

import pytest

from walstore import codec


def _one_by_one(pairs):
    out = {}
    for pair in pairs:
        try:
            k, v = pair
        except (TypeError, ValueError):
            raise TypeError(f"update() takes a mapping or (key, value) pairs, not "
                            f"{pair!r}") from None
        out[codec.encode_key(k)] = codec.pack_value(v, k)
    return out


def _outcome(fn, pairs):
    try:
        return "ok", fn(pairs)
    except Exception as e:
        return type(e).__name__, str(e)


_ODD_KEYS = [b"", "", "é", "ключ", b"x" * (codec.MAX_KEY_BYTES + 1), "y" * (codec.MAX_KEY_BYTES + 1),
             ("tuple",), 7, None]
_ODD_VALUES = [{"a": 1}, [1, 2], {(1, 2): 3}, 2 ** 70, object(), b"z" * (codec.MAX_VALUE_BYTES + 1)]


@pytest.mark.parametrize("seed", range(30))
def test_many_pairs_pack_as_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([64, 65, 200, 3000])
    str_keys = rng.random() < 0.5
    pairs = []
    for i in range(n):
        k = f"k{rng.randrange(n * 2)}" if str_keys else b"k%d" % rng.randrange(n * 2)
        v = rng.choice([None, True, 1.5, -3, rng.randbytes(rng.randint(0, 40)), "text", 2 ** 40])
        pairs.append((k, v))
    if rng.random() < 0.5:  # one odd pair somewhere: the same error, or the same result
        at = rng.randrange(n)
        if rng.random() < 0.5:
            pairs[at] = (rng.choice(_ODD_KEYS), pairs[at][1])
        else:
            pairs[at] = (pairs[at][0], rng.choice(_ODD_VALUES))
    if rng.random() < 0.2:
        pairs[rng.randrange(n)] = rng.choice([(1, 2, 3), 5, "ab", (b"k",)])
    want = _outcome(_one_by_one, pairs)
    for shape in (list, tuple, iter):
        assert _outcome(lambda ps: codec.pack_items(shape(ps)), pairs) == want
    as_dict = dict(p for p in pairs if isinstance(p, tuple) and len(p) == 2)
    assert (_outcome(lambda d: codec.pack_items(d.items()), as_dict)
            == _outcome(_one_by_one, list(as_dict.items())))


def test_big_values_release_the_packer_and_stay_exact() -> None:
    big = b"b" * (codec.RELEASE_PACKER_BYTES + 10)
    pairs = [(b"k%d" % i, big if i % 50 == 0 else i) for i in range(200)]
    assert codec.pack_items(pairs) == _one_by_one(pairs)
    assert list(codec.pack_items(pairs)) == list(_one_by_one(pairs))  # (the same order)


def test_a_dict_changed_by_another_thread_never_pairs_a_key_with_anothers_value() -> None:
    """A thread moving keys around in the dict (pop, put back with the same value) makes
    ``update`` raise RuntimeError, as iterating it does, or store every key with its own
    value — never a key with another key's value (a column version that read the dict
    three times and zipped keys of one read with values of another stored 1,998 of 2,000
    keys wrong; review of stop 41)."""
    import sys
    import threading
    import time

    import msgpack
    d = {b"k%05d" % i: i for i in range(2000)}
    stop = threading.Event()

    def mover() -> None:
        rng = random.Random(1)
        keys = list(d)
        while not stop.is_set():
            k = rng.choice(keys)
            d[k] = d.pop(k)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=mover, daemon=True)
    t.start()
    packed = 0
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                out = codec.pack_items(d.items())
            except RuntimeError:
                continue  # (the dict changed during the copy: loud, not wrong)
            packed += 1
            for k, v in out.items():
                assert msgpack.unpackb(v) == int(k[2:]), k
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old_interval)
    assert packed


def test_pairs_that_unpack_but_do_not_index_are_stored_as_before() -> None:
    class Pair:
        def __init__(self, k, v):
            self.k, self.v = k, v

        def __iter__(self):
            return iter((self.k, self.v))

        def __len__(self):
            return 2
    pairs = [Pair(b"k%d" % i, i) for i in range(100)]
    assert codec.pack_items(pairs) == _one_by_one((p.k, p.v) for p in pairs)
    two = [{b"a%d" % i: 1, b"b%d" % i: 2} for i in range(100)]  # (a dict unpacks its keys)
    assert codec.pack_items(two) == _one_by_one([tuple(p) for p in two])
    lists = [[b"k%d" % i, i] for i in range(100)]
    assert codec.pack_items(lists) == _one_by_one(lists)


def test_an_iterator_is_read_one_pair_at_a_time_up_to_the_first_bad_one() -> None:
    """A generator is never read ahead: its first bad pair raises update()'s error before
    anything after it is read (an endless one does not hang; one that fails later never
    gets the chance)."""
    read = []

    def endless():
        i = 0
        while True:
            if i > 50_000:
                raise AssertionError("read far past the bad pair")
            read.append(i)
            yield (b"k%d" % i, i) if i != 100 else (5, 5)
            i += 1
    with pytest.raises(TypeError, match="key must be str or bytes"):
        codec.pack_items(endless())
    assert read[-1] == 100

    def fails_after():
        yield from ((b"k%d" % i, i) for i in range(70))
        yield (5, 5)
        raise OSError("the source broke")
    with pytest.raises(TypeError, match="key must be str or bytes"):
        codec.pack_items(fails_after())
