"""A copy (backup, restore) remembers the idempotency-key namespace of the transactions it
inherited, across reopens and copies of copies.

Each action's key (``ws-<namespace>-<action id>``) is stored in its intent record; recovery
rebuilds it from the action id and the namespace when that record was lost (salvage of a
damaged log).  A copy gets a namespace of its own at its first writable open (its new
charges must never share a key with its source's), and after that open the source's
namespace was forgotten: an inherited action whose intent was lost was listed with key ""
— the one thing an operator settling it by hand can ask the payment system about
(found by the recovery audit of stop 55).
"""
from __future__ import annotations

import os
import subprocess
import sys

import walstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backup(src: str, dest: str) -> None:
    r = subprocess.run([sys.executable, "-m", "walstore", "backup", src, dest],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr


def _charge(store) -> tuple[int, str, str]:
    with store.transaction() as tx:
        with tx.action("charge", args={"amount": 1}) as act:
            act.result = {"ok": True}
    return tx.id, act.id, act.key


def test_inherited_keys_are_rebuilt_after_reopens_and_in_copies_of_copies(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    with walstore.open(a) as s:
        t1, aid1, key1 = _charge(s)
    _backup(a, b)
    with walstore.open(b) as s:  # (its first open: a namespace of its own)
        t2, aid2, key2 = _charge(s)
    assert key2.split("-")[1] != key1.split("-")[1]  # (its own keys, never its source's)
    with walstore.open(b) as s:  # reopened: the source's namespace is still known
        eng = s._engine
        assert eng._action_key_of(t1, aid1) == key1
        assert eng._action_key_of(t2, aid2) == key2
    _backup(b, c)
    with walstore.open(c) as s:
        t3, aid3, key3 = _charge(s)
    with walstore.open(c) as s:  # a copy of a copy: each generation's keys
        eng = s._engine
        assert eng._action_key_of(t1, aid1) == key1
        assert eng._action_key_of(t2, aid2) == key2
        assert eng._action_key_of(t3, aid3) == key3
        assert len({key1, key2, key3}) == 3
