"""Child for tests/test_twophase.py: prepare a transaction, then die by SIGKILL.

usage: prepare_and_die.py STORE GID [--at after-prepare|before-prepared-row]

The transaction reads ``acct/a`` and ``ro/key`` (read only), scans ``range/``, writes ``acct/a`` and
``new/key`` and deletes ``gone``.  ``after-prepare`` kills the process as soon as
``tx.prepare`` returned (after printing PREPARED); ``before-prepared-row`` kills it inside
prepare, after the PREPARE record was fsynced but before the LMDB ``prepared`` row exists.
"""
import os
import signal
import sys

import walstore


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    path, gid = sys.argv[1], sys.argv[2]
    at = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--at" else "after-prepare"
    store = walstore.open(path, durability="full")
    tx = store.transaction(meta={"who": "child"})
    a = tx.get("acct/a")
    tx.get("ro/key")
    assert list(tx.scan(prefix="range/")) == []  # a scanned (empty) range is held too
    tx.put("acct/a", a + 50)
    tx.put("new/key", {"from": "prepared"})
    tx.delete("gone")
    if at == "before-prepared-row":
        journal = store._engine.journal
        real_force_durable = journal.force_durable

        def force_durable(end, *rest):  # the LMDB row is applied after the WAL record is durable
            real_force_durable(end, *rest)
            print("PREPARE-LOGGED", flush=True)
            die()
        journal.force_durable = force_durable
    tx.prepare(gid)
    print("PREPARED", flush=True)
    die()


if __name__ == "__main__":
    main()
