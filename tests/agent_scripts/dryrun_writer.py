"""A child process for test_undo_dry_run.py: the agent that holds the store open (its
writer lock) while an operator asks another process what a rewind would do.

    python dryrun_writer.py STORE WORKSPACE

Builds a history: restore point ``p``; a transaction scoped to ``agents/a/`` with a
charge (compensator ``refund``); a transaction on other agents' keys and a file of the
workspace; an action-only transaction with a charge.  Then, applied to LMDB (a
checkpoint), prints ``READY`` and serves one command per line on stdin, answering one
JSON line each:

``rewind POINT [SCOPE]``  the real rewind: ``{"reverts", "compensate", "keys", "files",
                          "refunds"}`` (keys and files: those whose value or content
                          changed; refunds: the action ids the compensator ran for)
``quit``                  close the store and exit
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402

store_path, ws_root = sys.argv[1], sys.argv[2]
refunds: list[str] = []
s = walstore.open(store_path)
s.compensator("refund")(lambda action: refunds.append(action.id))
ws = s.workspace(ws_root)


def tree() -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(ws_root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.realpath(p)] = Path(p).read_bytes()
    return out


with s.transaction() as tx:
    tx.put("agents/a/x", 0)
    tx.put("agents/b/y", 0)
    tx.put("g", 0)
    tx.files(ws).write("f.txt", "v0")
s.restore_point("p")
with s.transaction(scope="agents/a/") as tx:
    tx.put("agents/a/x", 1)
    tx.put("agents/a/z", 1)
    with tx.action("charge", args={"n": 1}, compensate="refund") as act:
        act.result = {"charge": 1}
with s.transaction() as tx:
    tx.put("agents/b/y", 2)
    tx.put("g", 2)
    tx.files(ws).write("f.txt", "v1")
    tx.files(ws).write("new.txt", "n")
with s.transaction() as tx:
    with tx.action("charge", args={"n": 2}, compensate="refund") as act:
        act.result = {"charge": 2}
s.checkpoint()
print("READY", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    before, refunds[:] = tree(), []
    kv_before = dict(s.scan())
    info = s.rewind(cmd[1], scope=cmd[2] if len(cmd) > 2 else None)
    after, kv_after = tree(), dict(s.scan())
    s.checkpoint()  # (applied: the next dry run reads it all from LMDB)
    print(json.dumps({
        "reverts": list(info.extra.get("reverts", ())),
        "compensate": list(info.extra.get("compensate", ())),
        # the keys whose value changed (the rewind writes others of what it undid too)
        "keys": sorted((k for k in info.keys if kv_before.get(k) != kv_after.get(k)),
                       key=repr),
        "files": sorted(p for p in before.keys() | after.keys()
                        if before.get(p) != after.get(p)),
        "refunds": list(refunds)}), flush=True)
s.close()
