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


def _kill_when_ready(script: str, *args: str) -> None:
    """Run ``script`` in a real process until it prints READY, then kill -9 it."""
    child = subprocess.Popen([sys.executable, "-c", script, *args],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        child.kill()
        child.wait()


def _crashed_store(tmp_path) -> str:
    path = str(tmp_path / "s")
    _kill_when_ready(CRASHING_WRITER, path)
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


GIVEN_UP_WRITER = textwrap.dedent("""
    import os, sys, time, walstore
    path, ledger = sys.argv[1], sys.argv[2]
    s = walstore.open(path, apply_interval=3600, apply_batch=10**6)  # (LMDB applies nothing)
    with s.transaction() as tx:
        tx.put("a", 1)
    tx = s.transaction()
    tx.put("b", 2)
    with tx.action("charge", args={"amount": 40}, compensate="refund") as act:
        fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, b"charge\\n"); os.fsync(fd); os.close(fd)
        act.result = {"charge_id": "c1"}
    print("READY", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("handlers", [True, False])
def test_a_salvage_mode_that_gives_up_an_action_intent_compensates_or_lists_it(tmp_path,
                                                                               handlers):
    # (a flipped byte in the log before an in-flight transaction's ACTION_INTENT, then
    # `walstore recover --mode tolerate-tail`: the cut gave up the intent and its result
    # with everything after the damage, and the charge that ran stood with nothing owed,
    # verify ok — "gave up records of txids 2" was all it said)
    import glob
    import json
    import os
    from walstore.log.format import SEGMENT_HEADER_SIZE
    path, ledger = str(tmp_path / "s"), str(tmp_path / "ledger")
    _kill_when_ready(GIVEN_UP_WRITER, path, ledger)
    (seg,) = glob.glob(os.path.join(path, "wal", "*.wal"))
    with open(seg, "r+b") as f:  # damage inside the first record (the first commit)
        f.seek(SEGMENT_HEADER_SIZE + 12)
        b = f.read(1)
        f.seek(SEGMENT_HEADER_SIZE + 12)
        f.write(bytes([b[0] ^ 0xFF]))
    (tmp_path / "handlers51.py").write_text(textwrap.dedent(f"""
        import os
        def refund(action):
            assert action.result == {{"charge_id": "c1"}}, action.result
            fd = os.open({ledger!r}, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"refund\\n"); os.fsync(fd); os.close(fd)
        COMPENSATORS = {{"refund": refund}}
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "walstore", "recover", path, "--mode", "tolerate-tail",
           "--json"] + (["--handlers", "handlers51"] if handlers else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert "given-up-action" in [p["kind"] for p in rep["problems"]]
    with open(ledger) as f:
        lines = f.read().split()
    with walstore.open(path) as s:
        states = {a.id: a.state for a in s.actions()}
        assert s.get("b") is None  # (its transaction was given up)
    if handlers:
        assert lines == ["charge", "refund"] and states == {"2.1": "compensated"}
    else:
        assert lines == ["charge"] and states == {"2.1": "pending"}
        assert "2.1" in json.dumps(rep["pending_compensations"])


def test_a_rewind_to_an_lsn_records_it_as_an_lsn_not_a_txid(tmp_path):
    # (rewind(LSN(n))'s meta said {"rewind": n}: by the points' own convention txid n)
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        with s.transaction() as tx:
            tx.put("a", 1)
        with s.transaction() as tx2:
            tx2.put("a", 2)
        info = s.rewind(walstore.LSN(tx.lsn))
        assert info.meta == {"rewind": f"lsn:{tx.lsn}"}
        assert s.get("a") == 1
        info = s.rewind(tx.id)
        assert info is None or info.meta == {"rewind": tx.id}
