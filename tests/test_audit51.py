"""Small findings of stop 51, each named after the promise it broke; real processes."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import walstore

CRASHING_WRITER = textwrap.dedent("""
    import sys, time, walstore
    s = walstore.open(sys.argv[1])
    with s.transaction() as tx:
        tx.put("a", 1)
    tx = s.transaction()
    with tx.action("charge", args={}, compensate="refund") as act:
        act.result = 1
    tx.put("b", 2)
    print("READY", flush=True)
    time.sleep(60)
""")


def _crashed_store(tmp_path) -> str:
    path = str(tmp_path / "s")
    child = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, path],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        child.kill()
        child.wait()
    return path


def test_recover_manual_raises_needs_recovery_on_a_read_only_open_too(tmp_path):
    # (recover="manual" promises NeedsRecovery for a store not shut down cleanly; a
    # read-only open with it opened silently, showing the committed state)
    path = _crashed_store(tmp_path)
    with pytest.raises(walstore.NeedsRecovery, match="walstore recover"):
        walstore.open(path, readonly=True, recover="manual")
    with walstore.open(path, readonly=True) as ro:  # auto: the committed state, as before
        assert ro.get("a") == 1 and ro.get("b") is None
        assert [a.state for a in ro.actions()] == ["pending"]
    with pytest.raises(walstore.NeedsRecovery):  # nothing was changed by either open
        walstore.open(path, recover="manual")
    with walstore.open(path) as s:  # recovery
        assert s.get("b") is None
    with walstore.open(path, readonly=True, recover="manual") as ro:  # clean now
        assert ro.get("a") == 1


@pytest.mark.parametrize("what", ["store", "transaction", "view"])
def test_iterating_a_store_transaction_or_view_is_a_type_error_naming_scan(tmp_path, what):
    # (no __iter__ beside __getitem__: ``for k in store`` called store[0], store[1]... and
    # raised "key must be str or bytes, not int: 0", a KeyError for a view)
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        obj = {"store": lambda: s, "transaction": s.transaction,
               "view": lambda: s.at(tx.id)}[what]()
        with pytest.raises(TypeError, match=r"scan\(\)"):
            iter(obj)
        with pytest.raises(TypeError, match="not iterable"):
            list(obj)
        assert list(obj.scan()) == [("a", 1)]
