"""What a probe reading the README and CONTRACT literally found (stop 29), each named after
the sentence it broke."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

import walstore


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from walstore.cli import main; "
                           "sys.argv[0] = 'walstore'; main()", *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


@pytest.mark.parametrize("name", ["tx:2", "lsn:0", "12"])
def test_a_restore_point_name_the_command_line_reads_as_a_txid_or_lsn_is_refused(tmp_path,
                                                                                 name):
    """`restore_point("tx:2")` was accepted, and `walstore rewind --to tx:2` then rewound
    to txid 2, undoing what came after it."""
    with walstore.open(str(tmp_path / "s")) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        with pytest.raises(ValueError, match="command line"):
            s.restore_point(name)
        assert s.restore_points() == {}


def test_a_key_with_control_characters_is_shown_so_it_pastes_back(tmp_path):
    """README: "any key shown can be pasted back" — "\\x1b[31mred" was shown as "red"
    (the colour code stripped in a pipe), "a\\nb" as a backslash and an n."""
    path = str(tmp_path / "s")
    keys = ["\x1b[31mred", "a\nb", "red", "json:x"]
    with walstore.open(path) as s:
        with s.transaction() as tx:
            for i, k in enumerate(keys):
                tx.put(k, i)
    shown = [line.split()[0] for line in _cli("scan", path).stdout.splitlines()
             if line.strip() and not line.startswith(("KEY", "key", "-"))]
    assert len(shown) == len(keys), shown
    for text in shown:
        r = _cli("get", path, text)
        assert r.returncode == 0, (text, r.stderr)
    values = sorted(int(_cli("get", path, text).stdout) for text in shown)
    assert values == [0, 1, 2, 3]


def test_missing_parent_directories_are_made_0700(tmp_path):
    """README: "missing parent directories are created, 0700" — under umask 022 they
    came out 0755 (os.makedirs gives the mode to the last directory only)."""
    old = os.umask(0o022)
    try:
        walstore.open(str(tmp_path / "p1" / "p2" / "store")).close()
    finally:
        os.umask(old)
    for d in ("p1", "p1/p2", "p1/p2/store"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o700, d


@pytest.mark.parametrize("value", [1.5, "3", True])
def test_an_lsn_is_made_from_an_int_only(value):
    """`walstore.LSN(1.5)` was LSN 1, `LSN("3")` LSN 3, `LSN(True)` LSN 1: a point that
    named another position than the caller wrote."""
    with pytest.raises(TypeError):
        walstore.LSN(value)
    assert walstore.LSN(7) == 7 and repr(walstore.LSN(7)) == "LSN(7)"
    assert walstore.LSN(walstore.LSN(3)) == 3


def test_an_open_refused_for_its_replica_settings_leaves_the_store_untouched(tmp_path):
    """A refused ``replicate_to`` URL was checked after the store was open: a cleanly
    closed store was left marked as crashed (the next recover="manual" open raised
    NeedsRecovery), and a new path was created."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
    for url, opts in (("s3://user:secret@bucket/x", None), ("ftp://host/x", None),
                      (f"file://{tmp_path / 'rep'}", {"interval": "x"}),
                      (f"file://{tmp_path / 'rep'}", {"lease_ttl": 0})):
        with pytest.raises((walstore.ReplicationError, TypeError, ValueError)) as e:
            walstore.open(path, replicate_to=url, replicate_options=opts)
        if opts:
            assert next(iter(opts)) in str(e.value)
    walstore.open(path, recover="manual").close()  # still clean
    with pytest.raises(walstore.ReplicationError):
        walstore.open(str(tmp_path / "new"), replicate_to="s3://user:pw@b/x")
    assert not (tmp_path / "new").exists()


def test_a_reader_closing_the_pipe_early_is_not_a_failure(tmp_path):
    """`walstore stats | head -1` said "stats failed: Broken pipe", exit 1."""
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.update({f"key-{i:06d}": "v" * 40 for i in range(5000)})  # (> a pipe's buffer)
    for verb in ("scan", "log"):
        p = subprocess.Popen([sys.executable, "-c", "import sys; from walstore.cli import "
                              "main; sys.argv[0] = 'walstore'; main()", verb, path],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert p.stdout.read(10)
        p.stdout.close()  # the reader goes away, as `head -1` does
        err = p.stderr.read().decode()
        assert p.wait(60) == 0 and err == "", (verb, p.returncode, err)
