"""Audit 70 review (h4): what the review of stop 70's fixes found.

``pending_compensations()`` now looks at the compensations running (``Saga.owed_now``,
under the saga's lock): asked from a signal handler while the main thread was inside
that lock, the process hung for good.  The map size note's stamp (``txid_reserved``) is
put back as it was by an older walstore's open and clean close that handed out no
transaction id, and `walstore stats` said the stale note as the last writer's map.
"""
from __future__ import annotations

import json
import subprocess
import sys

import walstore
from tests.store_support import cli_env
from tests.test_audit70_reports import _meta_rows, _stats

SIGNAL_HANDLER_ASKS = r"""
import signal, sys, time
import walstore
s = walstore.open(sys.argv[1], durability="none")
inside = [False]
def handler(sig, frame):
    if inside[0]:
        return
    inside[0] = True
    try:
        s.pending_compensations()
    finally:
        inside[0] = False
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
end = time.monotonic() + 2
while time.monotonic() < end:
    s.pending_compensations()
signal.setitimer(signal.ITIMER_REAL, 0)
s.close()
print("done")
"""


def test_pending_compensations_never_hangs_when_a_signal_handler_asks_it(tmp_path):
    """The main thread asks ``pending_compensations()`` in a loop; a SIGALRM handler (a
    status dump, a SIGTERM handler listing what is owed) asks it too.  The process hung
    for good within a second (the handler waited on the saga's lock, which the main
    thread it interrupted held inside ``owed_now``); before audit 70 it never took that
    lock.  Now it finishes."""
    try:
        r = subprocess.run([sys.executable, "-c", SIGNAL_HANDLER_ASKS, str(tmp_path / "s")],
                           capture_output=True, text=True, env=cli_env(), timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("pending_compensations() in a signal handler hung") from None
    assert r.returncode == 0 and r.stdout.strip() == "done", (r.returncode, r.stderr[-2000:])


def test_stats_does_not_say_a_stale_note_after_an_older_writer_that_ran_no_transaction(
        tmp_path):
    """This walstore's writer ran with 8 MiB and closed (its note stamped with
    ``txid_reserved`` N, the next id); then a walstore older than the note opened the
    store with 16 MiB and closed it cleanly without a transaction (a check, a checkpoint):
    its close writes ``txid_reserved`` N again — made here as such a writer leaves LMDB:
    an open and close, the note rows put back as they were.  `walstore stats` said 8 MiB,
    the stale note, as the writer's map (seen with stop 68's walstore too).  Now the
    note of a closed store stands only if ``applied`` is as it was when it was made."""
    path = str(tmp_path / "s")
    names = (b"map_size", b"map_size_at", b"map_size_applied")
    with walstore.open(path, durability="none", map_size=8 << 20) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    assert json.loads(_stats(path, "--json").stdout)["lmdb_map_size"] == 8 << 20
    note = _meta_rows(path, names=names)
    with walstore.open(path, durability="none", map_size=16 << 20):  # ("older": no tx)
        pass
    _meta_rows(path, note)  # (as the older writer left them: untouched)
    r = _stats(path, "--json")
    assert r.exit_code == 0, (r.exit_code, r.stderr)
    assert json.loads(r.stdout)["lmdb_map_size"] == 16 << 20
    with walstore.open(path, durability="none", map_size=12 << 20) as s:  # (this version)
        assert json.loads(_stats(path, "--json").stdout)["lmdb_map_size"] == 12 << 20
    assert json.loads(_stats(path, "--json").stdout)["lmdb_map_size"] == 12 << 20
