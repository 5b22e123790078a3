"""Adversarial audit of reversible files (audit 55).

- A setgid directory (``chmod g+s``: its new entries take its group) that a non-member
  of its group owns, as a project directory made inside a shared setgid tree has: its
  undo (a rollback of an ``rmtree``) made it anew with a ``chmod`` to the recorded mode,
  and the kernel drops S_ISGID from a ``chmod`` by a process outside the file's group
  without CAP_FSETID; the directory came back without its setgid bit (mode restore not
  byte-exact).  Now the directory is made with its permission bits (``mkdir(2)`` keeps the
  setgid bit a setgid parent passes on) and ``chmod``-ed only when they differ.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

import walstore

from files_support import build, tree_state
from test_audit50_files import env  # noqa: F401  (the fixture)


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


NO_FSETID = """
import os, sys, walstore
os.umask(0o022)
store = walstore.open(sys.argv[1])
ws = store.workspace(sys.argv[2])
with store.transaction() as tx:
    tx.files(ws).rmtree("shared/proj")
    tx.rollback()
store.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop CAP_FSETID")
def test_rollback_keeps_the_setgid_bit_of_a_directory_of_a_group_it_is_not_in(tmp_path):
    root = str(tmp_path / "ws")
    build(root, {"shared/proj/f": "x\n"})
    os.chown(os.path.join(root, "shared"), -1, 4242)  # a group the child is not in
    os.chmod(os.path.join(root, "shared"), 0o2775)
    os.chown(os.path.join(root, "shared/proj"), -1, 4242)
    os.chmod(os.path.join(root, "shared/proj"), 0o2755)
    before = tree_state(root)
    assert before[b"shared/proj"] == ("dir", 0o2755)
    # (root without CAP_FSETID and outside group 4242: as a user outside it)
    subprocess.run(["setpriv", "--bounding-set=-fsetid", sys.executable, "-c", NO_FSETID,
                    str(tmp_path / "store"), root], check=True, env=_child_env(),
                   cwd=str(tmp_path), timeout=120)
    assert tree_state(root) == before
    assert os.lstat(os.path.join(root, "shared/proj")).st_gid == 4242
