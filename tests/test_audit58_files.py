"""Adversarial audit of reversible files (audit 58): what the audits 50-55 did not try.

- A transaction that changed a directory's mode together with paths inside it — an
  agent's ``chmod a-w d`` after writing ``d/g`` (a release directory made read-only),
  or ``chmod u+w d`` of a read-only directory before editing in it — could not be
  reverted or rewound by a process without CAP_DAC_OVERRIDE (any non-root user): the
  undo's order (``watch.undo_order``: removals deepest first, then the rest shallowest
  first) put the directory's mode back in the middle, so the removal of ``d/g`` met the
  read-only ``d`` (or the re-creation of a removed file met the directory made
  read-only again first): ``PermissionError``, nothing reverted, where the rollback of
  the same transaction (newest first) worked.  Now a directory's mode that gives its
  owner write or search permission back goes first, one that takes them away last.
  ``test_revert_and_rewind_of_a_directory_made_read_only_with_changes_inside``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import walstore  # noqa: F401

from files_support import build, tree_state


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _unprivileged(script: str, *args: str, timeout: float = 120) -> str:
    """Run ``script`` as root without the capabilities that bypass permission bits
    (as an ordinary user would be); its stdout."""
    got = subprocess.run(["setpriv", "--inh-caps=-all",
                          "--bounding-set=-dac_override,-dac_read_search,-fowner",
                          sys.executable, "-c", script, *args],
                         capture_output=True, text=True, env=_child_env(), timeout=timeout)
    assert got.returncode == 0, got.stderr[-3000:]
    return got.stdout


needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                   reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")

READ_ONLY_UNDO = r"""
import json, os, sys, walstore
sys.path.insert(0, sys.argv[3])
from files_support import tree_state
store = walstore.open(sys.argv[1], durability="none")
ws = store.workspace(sys.argv[2])
how = sys.argv[4]
before = tree_state(sys.argv[2])
store.restore_point("p")
with store.transaction() as tx:
    f = tx.files(ws)
    f.write("d/g", "new\n")           # a file made in d, then d made read-only
    f.chmod("d", 0o500)
    f.chmod("m", 0o755)               # a read-only directory opened, then edited in
    f.write("m/c", "c\n")
    f.delete("m/b")
    f.chmod("m/n", 0o755)
    f.write("m/n/x", "x\n")
committed = tree_state(sys.argv[2])
txid = tx.id
out = {}
if how == "revert":
    info = store.revert(txid)
else:
    info = store.rewind("p")
out["undone"] = tree_state(sys.argv[2]) == before
store.revert(info.txid, force=True)   # and the revert of the revert brings it back
out["redone"] = tree_state(sys.argv[2]) == committed
store.close()
print(json.dumps(out))
"""


@needs_setpriv
@pytest.mark.parametrize("how", ["revert", "rewind"])
def test_revert_and_rewind_of_a_directory_made_read_only_with_changes_inside(tmp_path, how):
    root = str(tmp_path / "ws")
    build(root, {"d/f": "f\n", "m/b": "b\n", "m/n/a": "a\n"})
    os.chmod(os.path.join(root, "m/n"), 0o555)
    os.chmod(os.path.join(root, "m"), 0o555)
    before = tree_state(root)
    got = json.loads(_unprivileged(READ_ONLY_UNDO, str(tmp_path / "store"), root,
                                   os.path.dirname(__file__), how))
    assert got == {"undone": True, "redone": True}
    with walstore.open(str(tmp_path / "store")) as s:
        assert not s.last_recovery.file_conflicts
    os.chmod(os.path.join(root, "d"), 0o755)  # (what the redo made read-only again)
    assert tree_state(root)[b"m"] == ("dir", 0o755)
    assert before[b"m"] == ("dir", 0o555)
