"""Times the CLI's human output shows, pasted into ``walstore restore URL DEST --to``.

``walstore replicas`` cut its times (last commit, complete_to, snapshots, restore points) to
the second: the time shown for the last commit named a state without it, and a restore to
it was refused as "before the first commit the replica holds" (exit 2, probe-review40).
``walstore log`` showed local time to the second with no offset, which ``--to`` refuses
(it needs an offset) and which, once an offset is added, names a state without the commit.

Both now show ISO 8601 with the offset and the microsecond (the resolution a restore
compares stamps at).  Real processes: the CLI in subprocesses, real files, a ``file://``
replica."""
from __future__ import annotations

import re
import subprocess
import sys

import walstore

from store_support import CLI, cli_env, get_readonly


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True,
                          text=True, timeout=300, env=cli_env())


def _restored(url: str, dest: str, to: str) -> subprocess.CompletedProcess:
    r = _cli("restore", url, dest, "--to", to)
    assert r.returncode == 0, (to, r.stdout, r.stderr)
    return r


def _replica_with_two_commits_and_a_point(tmp_path) -> tuple[str, str]:
    src = str(tmp_path / "src")
    url = f"file://{tmp_path / 'rep'}"
    s = walstore.open(src, replicate_to=url)
    try:
        with s.transaction() as tx:
            tx.put("a", 1)
        s.restore_point("after-first")
        with s.transaction() as tx:
            tx.put("a", 2)
        s.sync_replica(timeout=30)
    finally:
        s.close()
    return src, url


def test_the_times_replicas_shows_restore_what_their_lines_describe(tmp_path):
    _src, url = _replica_with_two_commits_and_a_point(tmp_path)
    r = _cli("replicas", url)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    last = re.search(r"last commit tx 2 at (\S+)", out).group(1)
    point = re.search(r"point\s+after-first\s+LSN \d+\s+(\S+)", out).group(1)
    complete = re.search(r"complete\s+every commit up to (\S+)", out)

    _restored(url, str(tmp_path / "last"), last)
    assert get_readonly(str(tmp_path / "last"), "a") == 2  # (the commit the line names)

    _restored(url, str(tmp_path / "point"), point)
    assert get_readonly(str(tmp_path / "point"), "a") == 1
    with walstore.open(str(tmp_path / "point"), readonly=True) as c:
        assert "after-first" in c.restore_points()

    if complete is not None:  # (every commit up to it: both are in)
        _restored(url, str(tmp_path / "complete"), complete.group(1))
        assert get_readonly(str(tmp_path / "complete"), "a") == 2


def test_the_times_log_shows_restore_their_commit(tmp_path):
    src, url = _replica_with_two_commits_and_a_point(tmp_path)
    r = _cli("log", src)
    assert r.returncode == 0, r.stderr
    times = {}
    for line in r.stdout.splitlines()[1:]:
        txid, _lsn, when = line.split()[:3]
        times[int(txid)] = when
    assert set(times) == {1, 2}, r.stdout

    _restored(url, str(tmp_path / "tx1"), times[1])
    assert get_readonly(str(tmp_path / "tx1"), "a") == 1
    _restored(url, str(tmp_path / "tx2"), times[2])
    assert get_readonly(str(tmp_path / "tx2"), "a") == 2
