"""The applier's bulk path (commits of 256 writes or more: history rows built a column at
a time, rows put in key order and appended when they sort after a table's last key, a
MemTable emptied at once) against a dict model: random big and small commits, keys of
one length and of many, before, among and after the keys already stored, deletes of old
and new keys, several commits in one apply batch; state, history and views compared
after each apply and after a reopen."""
from __future__ import annotations

import random

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main


def _key(rng: random.Random, mixed: bool) -> bytes:
    if mixed:
        return bytes(rng.choice(b"abcz") for _ in range(rng.randint(1, 6)))
    return b"k%06d" % rng.randrange(0, 40_000)


@pytest.mark.parametrize("deletes", [True, False], ids=["deletes", "puts-only"])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-length", "mixed-lengths"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bulk_commits_match_a_model(tmp_path, seed, mixed, deletes):
    """``puts-only``: a bulk commit alone in its batch (seed 3) goes to ``data`` from its
    sorted writes, and a key range LMDB holds nothing in is not looked up (every key new):
    before, among and after the stored keys, and spanning some."""
    rng = random.Random(seed)
    path = str(tmp_path / "s")
    s = walstore.open(path, durability="none", apply_batch=10**6, apply_interval=3600)
    model: dict[bytes, int] = {}
    states: list[tuple[int, dict]] = []  # (txid, the state after it)
    for round_ in range(12):
        for _ in range(rng.randint(1, 3)):  # several commits in one apply batch
            big = rng.random() < 0.6
            n = rng.randint(256, 1500) if big else rng.randint(1, 20)
            with s.transaction() as tx:
                items = {}
                for _ in range(n):
                    k = _key(rng, mixed)
                    if model and rng.random() < 0.2:
                        k = rng.choice(list(model))
                    items[k] = rng.randrange(1 << 40)
                tx.update(items)
                gone = [k for k in list(model)[:: max(1, len(model) // 30)]
                        if k not in items and rng.random() < 0.5] if deletes else []
                for k in gone:
                    tx.delete(k)
            model.update(items)
            for k in gone:
                model.pop(k, None)
            states.append((tx.id, dict(model)))
            if seed == 3:
                s.checkpoint()  # one commit per apply batch (a bulk load's own batch)
        if round_ % 3 == 2:
            s.checkpoint()  # apply the batch
        assert dict(s.scan()) == model
    for txid, state in states[-6:]:
        assert dict(s.at(txid).scan()) == state, txid
    probe = rng.sample(list(model), min(30, len(model)))
    for k in probe:
        versions = s.history(k)
        assert versions[0].value == model[k]
    s.close()
    with walstore.open(path) as s:
        assert dict(s.scan()) == model
        for txid, state in states[-3:]:
            assert dict(s.at(txid).scan()) == state
        last = states[-1][0]
        s.revert(last, cascade=True)
        assert dict(s.scan()) == states[-2][1]
    out = CliRunner().invoke(main, ["verify", path])  # the state agrees with the log
    assert out.exit_code == 0, out.output
