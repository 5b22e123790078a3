"""walstore never changes the mode of a directory it did not make for itself.

``walstore backup SRC /tmp/copy`` made /tmp itself 0700 (its sticky bit gone): the
helper that makes directories set the mode of the path it was given even when that
path existed, and the backup gave it DEST's parent (stop 48: a run of the suite then
failed where another user needed /tmp).  A file:// replica's folders likewise.  The
store's own directories are still 0700, an empty one the user made for it included."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import walstore
from store_support import cli_env


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _store(path: str) -> None:
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("k", 1)


def test_a_backup_leaves_its_destinations_parent_mode_alone(tmp_path):
    src, shared = str(tmp_path / "src"), tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # (as /tmp)
    _store(src)
    r = subprocess.run([sys.executable, "-m", "walstore", "backup", src,
                        str(shared / "copy")], env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _mode(shared) == 0o1777
    assert _mode(shared / "copy") == 0o700
    with walstore.open(str(shared / "copy"), readonly=True) as c:
        assert c.get("k") == 1


def test_a_backup_into_an_empty_directory_makes_it_the_stores_own(tmp_path):
    src, dest = str(tmp_path / "src"), tmp_path / "dest"
    dest.mkdir(mode=0o755)
    os.chmod(dest, 0o755)
    _store(src)
    r = subprocess.run([sys.executable, "-m", "walstore", "backup", src, str(dest)],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _mode(dest) == 0o700


def test_a_file_replica_leaves_its_existing_folder_mode_alone(tmp_path):
    rep = tmp_path / "rep"
    rep.mkdir()
    os.chmod(rep, 0o755)
    with walstore.open(str(tmp_path / "src"), replicate_to=f"file://{rep}",
                       replicate_options={"interval": 0.05}) as s:
        with s.transaction() as tx:
            tx.put("k", 1)
        s.sync_replica(timeout=30)
    assert _mode(rep) == 0o755
    made = [os.path.join(d, n) for d, dirs, _f in os.walk(rep) for n in dirs]
    assert made and all(_mode(p) == 0o700 for p in made), made


def test_a_store_in_an_empty_directory_the_user_made_is_0700(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    os.chmod(path, 0o755)
    _store(str(path))
    assert _mode(path) == 0o700
