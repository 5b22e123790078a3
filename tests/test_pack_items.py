"""``codec.pack_items`` (``tx.update``'s packing): many pairs are packed a column at a
time in C loops; the result, and every error with its message, must be what packing
each pair by itself gives (``{encode_key(k): pack_value(v, k)}``, the last value of a
repeated key winning)."""
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
