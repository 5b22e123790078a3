"""A child process for the compensation crash matrix: it SIGKILLs itself at one step of
one compensation path (tests/test_compensation_crash.py drives it).

    python compensation_child.py STORE LEDGER CALLS PATH STEP

Every path first commits ``committed`` = 7 with one charging action (the baseline, never
to be touched), then sets up its actions against the JSON-lines ledger (``ws_ledger``),
prints ``SETUP <json>`` (action ids, keys, txids, gid), arms the kill point and runs the
path's verb:

``rollback``           a transaction with two charges (and ``rb/x``) ``rollback()``s
``rollback_to``        a charge (``rt/kept``), a savepoint, two charges (``rt/dropped``),
                       ``rollback_to`` the savepoint, ``rt/after``, commit
``revert``             a committed transaction with two charges (``rv/x``) is reverted
``rewind``             a restore point, two committed transactions with a charge each
                       (``rw/1``, ``rw/2``), ``rewind`` to the point
``rollback_prepared``  two charges (``prb/x``), ``prepare``, ``rollback_prepared``
``commit_prepared``    one charge (``pc/x``), ``prepare``, ``commit_prepared``
``loser``              two charges (``lost/x``), then the process kills itself before
                       committing (the set-up of ``recover``; STEP is ignored)
``recover``            open the store a ``loser`` child left: recovery ends the loser
                       and runs its compensations, with the kill point armed

Steps (the kill points; the process kills itself with SIGKILL there):

``before-decision``  just before the decision record is appended: the ABORT of a
                     rollback or of recovery's loser, the undo's claiming COMMIT, the
                     ROLLBACK_PREPARED, the COMMIT of a prepared transaction;
``after-decision``   just after that record is durable, before any compensator runs
                     (for commits: at the ``commit.after_durable`` fault point, through a
                     ``walstore.fileio`` backend);
``effect:N``         inside the Nth compensator call, after its refund, before its
                     COMPENSATED record;
``recorded:N``       just after the Nth COMPENSATED record (state compensated) is durable;
``after-commit``     (rollback_to) after the transaction's commit returned.

If the kill point is never reached the child prints ``NOT KILLED`` and exits 3.
"""
from __future__ import annotations

import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import walstore  # noqa: E402
import ws_ledger  # noqa: E402
from walstore import fileio  # noqa: E402
from walstore.engine.engine import Engine  # noqa: E402
from walstore.engine.journal import Journal  # noqa: E402
from walstore.engine.pipeline import CommitPipeline  # noqa: E402
from walstore.log.format import RecordType  # noqa: E402

STEP = ""
ARMED = False
COUNT = {"effect": 0, "recorded": 0}


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def die(where: str) -> None:
    say("KILLED", where)
    os.kill(os.getpid(), signal.SIGKILL)


def at(step: str) -> bool:
    return ARMED and STEP == step


# ---- kill points -------------------------------------------------------------------------------
def install_kill_points() -> None:
    """Wrap the places each step names (class level: recovery runs inside open)."""
    log_event = Engine.log_event

    def log_event_k(self, rtype, body, txid=-1, durable=False, **kw):
        if rtype == RecordType.ABORT and at("before-decision"):
            die("before ABORT")
        event = log_event(self, rtype, body, txid, durable, **kw)
        if rtype == RecordType.ABORT and at("after-decision"):
            die("after ABORT")
        if rtype == RecordType.COMPENSATED and body.get("state") == "compensated" and ARMED:
            COUNT["recorded"] += 1
            if at(f"recorded:{COUNT['recorded']}"):
                die(f"after COMPENSATED #{COUNT['recorded']} ({body.get('id')})")
        return event
    Engine.log_event = log_event_k

    undo_losers = Engine._undo_losers

    def undo_losers_k(self, losers):
        if losers and at("before-decision"):
            die("before recovery's ABORT")
        undo_losers(self, losers)
        if losers and at("after-decision"):
            die("after recovery's ABORT")
    Engine._undo_losers = undo_losers_k

    append = Journal.append

    def append_k(self, rtype, body, txid=-1):
        if rtype == RecordType.ROLLBACK_PREPARED and at("before-decision"):
            die("before ROLLBACK_PREPARED")
        return append(self, rtype, body, txid)
    Journal.append = append_k

    durable_or_unknown = CommitPipeline.durable_or_unknown

    def durable_or_unknown_k(self, make_durable, event, txid, what, unknown, *args, **kw):
        durable_or_unknown(self, make_durable, event, txid, what, unknown, *args, **kw)
        if event.type == RecordType.ROLLBACK_PREPARED and at("after-decision"):
            die("after ROLLBACK_PREPARED")
    CommitPipeline.durable_or_unknown = durable_or_unknown_k

    commit = CommitPipeline.commit

    def commit_k(self, req):
        if (req.claims or req.gid) and at("before-decision"):
            die("before the claiming/prepared COMMIT")
        return commit(self, req)
    CommitPipeline.commit = commit_k

    class KillAtCommitPoint(fileio.OSBackend):
        def fault_point(self, name: str) -> None:
            if name == "commit.after_durable" and at("after-decision"):
                die("at commit.after_durable")
    fileio.set_backend(KillAtCommitPoint())


def make_refund(calls: str):
    def refund(action) -> None:
        ws_ledger.note_call(calls, action)
        ws_ledger.refund(action.args["ledger"], action.key)
        if ARMED:
            COUNT["effect"] += 1
            if at(f"effect:{COUNT['effect']}"):
                die(f"inside compensator #{COUNT['effect']} after its effect ({action.id})")
    return refund


# ---- the paths ---------------------------------------------------------------------------------
def main() -> None:
    global STEP, ARMED
    store_path, ledger, calls, path, STEP = sys.argv[1:6]
    install_kill_points()
    if path == "recover":
        ARMED = True
        walstore.open(store_path, compensators={"refund": make_refund(calls)}).close()
        say("NOT KILLED")
        sys.exit(3)

    store = walstore.open(store_path, compensators={"refund": make_refund(calls)})
    setup: dict = {"actions": {}}

    def charge(tx, amount: int):
        with tx.action("charge", args={"ledger": ledger, "calls": calls, "amount": amount},
                       compensate="refund") as act:
            act.result = ws_ledger.charge(ledger, act.key, amount)
        setup["actions"][act.id] = {"key": act.key, "txid": tx.id, "amount": amount}
        return act

    def charged_commit(key: str, amounts, meta=None):
        tx = store.transaction(meta=meta)
        ids = [charge(tx, a).id for a in amounts]
        tx.put(key, sum(amounts))
        tx.commit()
        return tx, ids

    tx, ids = charged_commit("committed", [7])
    setup["baseline"] = ids[0]

    def go(**more) -> None:
        global ARMED
        setup.update(more)
        say("SETUP", json.dumps(setup, sort_keys=True))
        ARMED = True

    if path == "rollback":
        tx = store.transaction()
        ids = [charge(tx, 40).id, charge(tx, 2).id]
        tx.put("rb/x", 1)
        go(owed=ids, txid=tx.id)
        tx.rollback()
    elif path == "rollback_to":
        tx = store.transaction()
        kept = charge(tx, 40).id
        tx.put("rt/kept", 1)
        sp = tx.savepoint("plan-b")
        crossed = [charge(tx, 3).id, charge(tx, 4).id]
        tx.put("rt/dropped", 1)
        go(kept=kept, crossed=crossed, txid=tx.id)
        tx.rollback_to(sp)
        tx.put("rt/after", 1)
        tx.commit()
        if at("after-commit"):
            die("after the commit")
    elif path == "revert":
        tx, ids = charged_commit("rv/x", [40, 2])
        go(undone=ids, txid=tx.id)
        store.revert(tx.id)
    elif path == "rewind":
        store.restore_point("before")
        t1, ids1 = charged_commit("rw/1", [40])
        t2, ids2 = charged_commit("rw/2", [2])
        go(undone=ids1 + ids2, txids=[t1.id, t2.id])
        store.rewind("before")
    elif path in ("rollback_prepared", "commit_prepared"):
        tx = store.transaction(meta={"path": path})
        amounts = [40, 2] if path == "rollback_prepared" else [40]
        ids = [charge(tx, a).id for a in amounts]
        key = "prb/x" if path == "rollback_prepared" else "pc/x"
        tx.put(key, 1)
        gid = f"gid-{path}"
        tx.prepare(gid)
        go(ids=ids, gid=gid, txid=tx.id)
        if path == "rollback_prepared":
            store.rollback_prepared(gid)
        else:
            store.commit_prepared(gid)
    elif path == "loser":
        tx = store.transaction()
        ids = [charge(tx, 40).id, charge(tx, 2).id]
        tx.put("lost/x", 1)
        setup.update(owed=ids, txid=tx.id)
        say("SETUP", json.dumps(setup, sort_keys=True))
        die("with a transaction in flight")
    else:
        raise SystemExit(f"unknown path {path}")
    say("NOT KILLED")
    sys.exit(3)


if __name__ == "__main__":
    main()
