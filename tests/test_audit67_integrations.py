"""Audit 67: the integrations under I/O faults and kill -9.

An ENOSPC or EIO (``lmdb.Error`` for LMDB's commits and syncs) at every I/O call the store
makes (``walstore.fileio``'s seam, ``tools.faults.FaultBackend``) during one operation of
each integration — the LangGraph saver's ``put`` / ``put_writes`` / ``delete_thread`` and
their async twins, the LangGraph store's batches, the OpenAI Agents session's
``add_items`` / ``pop_item`` / ``clear_session``, the ``transaction`` data manager's
two-phase commit — then the same object used again, the store reopened, and checked:

- what the caller was told is what is durable: returned -> there after reopen; a walstore
  error other than CommitOutcomeUnknown -> absent; CommitOutcomeUnknown -> one of the two
  whole states; never a foreign exception (OSError, lmdb.Error) out of the API;
- the integration's own invariants: a checkpoint with all its pending writes or none, the
  parent links and list order whole; the same object after the fault reads the state
  before or after, never a third one, and keeps working or refuses with a walstore error;
- a LangGraph graph run cut off by a fault, resumed after the reopen, ends as a run
  without a fault ends, each task's writes applied once;
- a real child killed with SIGKILL before each I/O call of ``put_writes`` /
  ``add_items`` leaves the operation whole or absent.

Findings (each fixed, its test below):

- walstore/integrations/transaction.py: a ``transaction.commit()`` whose walstore vote met
  a failed fsync of its PREPARE was aborted by the package, but walstore said nothing
  more than CommitOutcomeUnknown's "recovery decides": the next open found the
  transaction prepared, in doubt, its keys held (every later write of them a
  ConflictError), and nothing named the gid or the command that ends it (the finish's
  twin: a failed fsync of its COMMIT);
- walstore/agent/history.py (through ``WalstoreSession.restore_point`` /
  ``drop_restore_point``): a failed fsync of the restore point's record raised the log's
  plain LogFailed, and the next open found the point made (pinning history) or dropped;
- walstore/integrations/langgraph/store.py: a TTL renewal (``refresh_on_read``) that met
  a full disk or a failed fsync raised out of ``batch``: a get lost its answer, and a
  batch whose puts had committed was reported failed ("nothing of it was logged").
"""
from __future__ import annotations

import asyncio
import errno
import operator
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, TypedDict

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import walstore  # noqa: E402
from tools.faults import LMDB_OPS, FaultBackend, installed  # noqa: E402

OPTS = dict(durability="full", apply_interval=3600.0)  # (the applier never runs by itself)
FILE_SITES = ("open", "pwrite", "fsync", "fdatasync", "fsync_dir", "rename", "unlink",
              "write_back")
SITES = FILE_SITES + LMDB_OPS


def _outcome(fn: Callable[[], Any]) -> str:
    """"ok", "unknown" (CommitOutcomeUnknown), "failed" (another walstore error), or
    "FOREIGN ..." (anything else escaped the API)."""
    try:
        fn()
    except walstore.CommitOutcomeUnknown:
        return "unknown"
    except walstore.ErasureOwed:
        return "ok"  # (the purge committed; its erasure is owed)
    except walstore.WalstoreError:
        return "failed"
    except Exception as e:  # noqa: BLE001 - the finding this looks for
        return f"FOREIGN {type(e).__name__}: {e}"
    return "ok"


def _fault_sweep(tmp_path, build: Callable, make: Callable, state: Callable,
                 op: Callable, error: int, stride: int = 1) -> int:
    """Run ``op(make(store))`` on a copy of the store ``build`` made, once for each call
    (every ``stride``-th) of each I/O kind with that call failing (``error``; lmdb.Error at
    LMDB's calls), and check it as the module doc says.  Returns the cases run."""
    base = str(tmp_path / "base")
    s = walstore.open(base, **OPTS)
    build(s)
    s.close()

    def case(site: str | None, nth: int) -> tuple:
        path = str(tmp_path / f"c-{site}-{nth}")
        shutil.copytree(base, path)
        s = walstore.open(path, **OPTS)
        obj = make(s)
        before = state(obj)
        fb = FaultBackend()
        rule = fb.fail(site, error=error, nth=nth) if site else None
        with installed(fb):
            told = _outcome(lambda: op(obj))
            fb.clear()
            try:
                same = state(obj)
            except walstore.WalstoreError:
                same = None  # (refused clearly)
        try:
            s.close()
        except walstore.WalstoreError:
            s._drop_like_a_crash()
        s = walstore.open(path, **OPTS)
        try:
            durable = state(make(s))
        finally:
            s.close()
        shutil.rmtree(path)
        return told, before, same, durable, (rule.fired if rule else 1)

    told, before, _same, after, _ = case(None, 1)
    assert told == "ok" and after != before
    cases = 0
    for site in SITES:
        nth = 1
        while True:
            told, _b, same, durable, fired = case(site, nth)
            if not fired:
                break
            cases += 1
            where = f"{os.strerror(error)} at {site} #{nth}: told {told}"
            assert not told.startswith("FOREIGN"), where
            if told == "ok":
                assert durable == after, f"{where}, lost after the reopen"
            elif told == "failed":
                assert durable == before, f"{where}, yet it is there after the reopen"
            else:
                assert durable in (before, after), f"{where}, half of it after the reopen"
            assert same is None or same in (before, after), f"{where}, the same object " \
                f"then read a state that is neither"
            if told == "failed" and same is not None:
                assert same == before, f"{where}, yet the same object then read it"
            nth += stride
    assert cases > 0
    return cases


# ---- the transaction data manager: the finding ------------------------------------------------
def _vote_fails_at_prepare_fsync(path: str):
    """A transaction.commit() whose walstore vote meets an EIO at its PREPARE's fsync:
    (the error it raised, the warnings given, the walstore transaction)."""
    transaction = pytest.importorskip("transaction")
    from walstore.integrations.transaction import join
    s = walstore.open(path, **OPTS)
    with s.transaction() as tx:
        tx.put("order", "new")
    fb = FaultBackend()
    fb.fail("fdatasync", errno.EIO, path="*.wal")
    raised = None
    with installed(fb), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        transaction.begin()
        tx = join(s)
        tx.put("order", "paid")
        try:
            transaction.commit()
        except Exception as e:  # noqa: BLE001 - asserted by the caller
            raised = e
        transaction.abort()
    s._drop_like_a_crash()  # (read-only now; its reopen recovers)
    return raised, [str(w.message) for w in seen if w.category is RuntimeWarning], tx


def test_in_doubt_after_a_failed_vote_is_said_naming_the_gid_and_rollback_prepared(tmp_path):
    """A ``transaction.commit()`` whose walstore vote met a failed fsync of its PREPARE:
    the package aborts every participant (the decision is "no"), but walstore's
    transaction cannot be rolled back (the store is read-only) and the next open finds it
    prepared, in doubt, holding its keys.  Before the fix the caller got only
    CommitOutcomeUnknown ("whether it is prepared is unknown until the store is reopened
    (recovery decides)"), no warning: after the reopen every write of ``order`` raised
    ConflictError "held by prepared (in-doubt) transaction(s) ['zope-...']" and nothing
    had said which gid, or that ``walstore rollback-prepared`` ends it."""
    path = str(tmp_path / "s")
    raised, said, tx = _vote_fails_at_prepare_fsync(path)
    assert isinstance(raised, walstore.CommitOutcomeUnknown), raised
    gid = tx.gid
    assert gid is not None
    told = [m for m in said if gid in m]
    assert len(told) == 1, said  # (once: abort() and tpc_abort() both end it)
    assert f"walstore rollback-prepared {path} {gid}" in told[0]
    assert "commit-prepared" not in told[0]  # (nobody committed: the package aborted)
    s = walstore.open(path, **OPTS)
    try:
        assert s.prepared() == [gid]  # what the warning said may be so
        s.rollback_prepared(gid)      # what it said to do
        assert s.get("order") == "new"
        with s.transaction() as t:
            t.put("order", "retried")
        assert s.get("order") == "retried"
    finally:
        s.close()


def test_in_doubt_after_a_failed_finish_is_said_naming_the_gid(tmp_path):
    """The finish's twin: every participant voted yes and walstore's COMMIT met a failed
    fsync (CommitOutcomeUnknown out of ``transaction.commit()``); the package's tpc_abort
    can neither commit nor roll it back (read-only).  Before the fix nothing was said:
    after a power loss the next open finds it prepared, in doubt, with no gid named."""
    transaction = pytest.importorskip("transaction")
    from walstore.integrations.transaction import join
    path = str(tmp_path / "s")
    s = walstore.open(path, **OPTS)
    fb = FaultBackend()
    fb.fail("fdatasync", errno.EIO, path="*.wal", nth=2)  # (1: the PREPARE, 2: the COMMIT)
    with installed(fb), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        transaction.begin()
        tx = join(s)
        tx.put("order", "paid")
        with pytest.raises(walstore.CommitOutcomeUnknown):
            transaction.commit()
        transaction.abort()
    said = [str(w.message) for w in seen if tx.gid and tx.gid in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in seen]
    assert f"walstore commit-prepared {path} {tx.gid}" in said[0]
    s._drop_like_a_crash()
    s = walstore.open(path, **OPTS)
    try:  # (no power was lost: the COMMIT reached the file, recovery commits it)
        assert s.get("order") == "paid" and s.prepared() == []
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["ENOSPC", "EIO"])
def test_two_phase_commit_of_two_stores_never_splits_under_a_fault_at_any_call(tmp_path,
                                                                              kind):
    """Two walstore stores in one ``transaction`` transaction, a fault at each I/O call of
    the commit: after reopening, each store holds the write or not, or holds it prepared
    (in doubt, not visible, and then a warning named it); two stores that decided never
    disagree; a commit that returned is in both."""
    transaction = pytest.importorskip("transaction")
    from walstore.integrations.transaction import join

    def case(site, nth, error):
        d = tmp_path / f"{site}-{nth}-{error}"
        stores = [walstore.open(str(d / n), **OPTS) for n in ("a", "b")]
        fb = FaultBackend()
        rule = fb.fail(site, error=error, nth=nth) if site else None
        with installed(fb), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tm = transaction.TransactionManager()
            tm.begin()

            def put_and_commit() -> None:
                # (the put too: a fault can fire in a store's background I/O first -- the
                # spare segment's fill, late under a loaded CI run, stop 81 -- and the
                # store, read-only since, refuses the write: nothing committed anywhere)
                for s in stores:
                    join(s, tm).put("k", 1)
                tm.commit()
            told = _outcome(put_and_commit)
            tm.abort()
        for s in stores:
            try:
                s.close()
            except walstore.WalstoreError:
                s._drop_like_a_crash()
        out = []
        for n in ("a", "b"):
            with walstore.open(str(d / n), **OPTS) as s:
                out.append((s.get("k"), s.prepared()))
        shutil.rmtree(d)
        return told, out, [str(w.message) for w in seen], (rule.fired if rule else 1)

    told, out, _said, _ = case(None, 1, 0)
    assert told == "ok" and out == [(1, []), (1, [])]
    cases = 0
    for site in SITES if kind == "ENOSPC" else FILE_SITES:  # (lmdb.Error: with ENOSPC)
        for error in (getattr(errno, kind),) if site in FILE_SITES else (errno.EIO,):
            nth = 1
            while True:
                told, out, said, fired = case(site, nth, error)
                if not fired:
                    break
                cases += 1
                where = f"{os.strerror(error)} at {site} #{nth}: told {told}, {out}"
                assert not told.startswith("FOREIGN"), where
                if told == "ok":
                    assert out == [(1, []), (1, [])], where
                decided = {v for v, doubt in out if not doubt}
                assert len(decided) <= 1, f"{where}: the stores disagree"
                for v, doubt in out:
                    if doubt:
                        assert v is None, f"{where}: an in-doubt write is visible"
                        assert any(doubt[0] in m for m in said), f"{where}: unsaid"
                nth += 1
    assert cases > 5


# ---- the LangGraph saver ----------------------------------------------------------------------
def _saver_bits():
    pytest.importorskip("langgraph.checkpoint.base")
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    from walstore.integrations.langgraph import WalstoreSaver
    return empty_checkpoint, uuid6, WalstoreSaver


def _cfg(thread: str, cid: str | None = None) -> dict:
    c = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    if cid:
        c["configurable"]["checkpoint_id"] = cid
    return c


class SaverCase:
    """Two threads of three checkpoints, each with two tasks' pending writes; the state
    read back is every thread's ``list()`` (ids, parent ids, values, writes) and its
    ``get_tuple`` head, checked for whole parent links on the way."""

    def __init__(self) -> None:
        self.empty, self.uuid6, self.Saver = _saver_bits()
        self.version = 0
        self.heads: dict[str, str] = {}
        self.new_id = ""

    def checkpoint(self, cid: str | None = None, **values: Any) -> dict:
        c = self.empty()
        self.version += 1
        c["id"] = cid or str(self.uuid6())
        c["channel_values"] = dict(values)
        c["channel_versions"] = {k: f"{self.version:032}.0" for k in values}
        return c

    def build(self, s) -> None:
        sv = self.Saver(s)
        for t in ("t", "u"):
            parent = None
            for i in range(3):
                c = self.checkpoint(a=f"{t}{i}", b=list(range(i)))
                parent = sv.put(_cfg(t, parent), c, {"step": i, "source": "loop"},
                                c["channel_versions"])["configurable"]["checkpoint_id"]
                sv.put_writes(_cfg(t, parent), [("a", f"w{i}"), ("b", [i])], f"task{i}")
                sv.put_writes(_cfg(t, parent), [("a", f"v{i}")], f"other{i}")
            self.heads[t] = parent
        self.new_id = str(self.uuid6())  # (newer than every one above)

    def make(self, s):
        return self.Saver(s)

    def state(self, sv) -> dict:
        out = {}
        for t in ("t", "u", "v"):
            chain = list(sv.list(_cfg(t)))
            for newer, older in zip(chain, chain[1:]):
                assert newer.parent_config["configurable"]["checkpoint_id"] == \
                    older.config["configurable"]["checkpoint_id"], "a broken parent link"
            assert [c.config["configurable"]["checkpoint_id"] for c in chain] == sorted(
                (c.config["configurable"]["checkpoint_id"] for c in chain), reverse=True)
            head = sv.get_tuple(_cfg(t))
            assert (head is None) == (not chain)
            if head is not None:
                assert head.config["configurable"]["checkpoint_id"] == chain[0].config[
                    "configurable"]["checkpoint_id"]
                assert head.pending_writes == chain[0].pending_writes
            out[t] = [(c.config["configurable"]["checkpoint_id"],
                       c.parent_config and c.parent_config["configurable"]["checkpoint_id"],
                       c.checkpoint["channel_values"], sorted(map(repr, c.pending_writes)))
                      for c in chain]
        return out


def _saver_op(case: SaverCase, name: str) -> Callable:
    def put(sv):
        c = case.checkpoint(case.new_id, a="new", b=[1, 2, 3, 4])
        sv.put(_cfg("t", case.heads["t"]), c, {"step": 9, "source": "loop"},
               c["channel_versions"])

    def aput(sv):
        c = case.checkpoint(case.new_id, a="new", b=[5])
        asyncio.run(sv.aput(_cfg("t", case.heads["t"]), c, {"step": 9, "source": "loop"},
                            c["channel_versions"]))

    def put_new_thread(sv):
        c = case.checkpoint(case.new_id, a="first")
        sv.put(_cfg("v"), c, {"step": -1, "source": "input"}, c["channel_versions"])

    def put_writes(sv):
        sv.put_writes(_cfg("t", case.heads["t"]),
                      [("a", "x1"), ("b", [7]), ("c", "x" * 3000)], "task-new")

    def aput_writes(sv):
        asyncio.run(sv.aput_writes(_cfg("u", case.heads["u"]),
                                   [("a", "y1"), ("__error__", "boom")], "task-new"))

    return {"put": put, "aput": aput, "put_new_thread": put_new_thread,
            "put_writes": put_writes, "aput_writes": aput_writes,
            "delete_thread": lambda sv: sv.delete_thread("u"),
            "adelete_thread": lambda sv: asyncio.run(sv.adelete_thread("t"))}[name]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("name", ["put", "aput", "put_new_thread", "put_writes",
                                  "aput_writes"])
def test_a_saver_write_under_a_fault_at_any_call_is_whole_or_absent_as_told(
        tmp_path, name, error):
    case = SaverCase()
    _fault_sweep(tmp_path, case.build, case.make, case.state, _saver_op(case, name), error)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("name", ["delete_thread", "adelete_thread"])
def test_a_thread_deleted_under_a_fault_at_any_call_is_gone_or_whole_as_told(
        tmp_path, name, error):
    # (every sixth call of each kind: a purge makes ~85 I/O calls)
    case = SaverCase()
    _fault_sweep(tmp_path, case.build, case.make, case.state, _saver_op(case, name), error,
                 stride=6)


# ---- the LangGraph store ----------------------------------------------------------------------
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_store_batch_of_puts_and_deletes_under_a_fault_is_whole_or_absent_as_told(
        tmp_path, error):
    pytest.importorskip("langgraph.store.base")
    from langgraph.store.base import GetOp, PutOp

    from walstore.integrations.langgraph import WalstoreStore
    ttl = {"default_ttl": 60.0, "refresh_on_read": True}

    def build(s):
        WalstoreStore(s, ttl=ttl).batch(
            [PutOp(("m", "a"), f"k{i}", {"v": i, "pad": "x" * 100}) for i in range(5)]
            + [PutOp(("m", "b"), f"k{i}", {"v": i}, ttl=None) for i in range(3)])

    def state(st):
        return [sorted((i.key, i.value) for i in st.search(ns, limit=100, refresh_ttl=False))
                for ns in (("m", "a"), ("m", "b"))]

    def op(st):
        st.batch([GetOp(("m", "a"), "k3", refresh_ttl=True),
                  PutOp(("m", "a"), "k1", {"v": 100}), PutOp(("m", "a"), "k2", None),
                  PutOp(("m", "b"), "new", {"v": "n"}), PutOp(("m", "b"), "k0", None)])
    _fault_sweep(tmp_path, build, lambda s: WalstoreStore(s, ttl=ttl), state, op, error)


# ---- the OpenAI Agents session ----------------------------------------------------------------
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("name", ["add_items", "pop_item", "clear_session"])
def test_a_session_change_under_a_fault_at_any_call_is_whole_or_absent_as_told(
        tmp_path, name, error):
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession

    def build(s):
        for sid in ("a", "b"):
            asyncio.run(WalstoreSession(sid, s).add_items(
                [{"role": "user", "content": f"{sid}{i}"} for i in range(4)]))

    def make(s):
        return WalstoreSession("a", s), WalstoreSession("b", s)

    def state(sessions):
        async def read():
            return [await x.get_items() for x in sessions]
        return asyncio.run(read())

    ops = {"add_items": lambda o: asyncio.run(o[0].add_items(
               [{"role": "assistant", "content": "x" * 300}, {"role": "user", "content": "y"}])),
           "pop_item": lambda o: asyncio.run(o[0].pop_item()),
           "clear_session": lambda o: asyncio.run(o[0].clear_session())}
    _fault_sweep(tmp_path, build, make, state, ops[name], error)


# ---- a LangGraph run cut off by a fault, resumed after the reopen -----------------------------
class Fan(TypedDict):
    log: Annotated[list, operator.add]
    n: int


def _fan_graph(saver, ran: list):
    """START -> a -> (b, c) -> d: two parallel tasks whose writes are pending writes."""
    from langgraph.graph import START, StateGraph

    def node(name):
        def run(s):
            ran.append(name)
            return {"log": [name]} if name in "bc" else {"log": [name], "n": s["n"] + 1}
        return run
    b = StateGraph(Fan)
    for x in "abcd":
        b.add_node(x, node(x))
    b.add_edge(START, "a")
    b.add_edge("a", "b")
    b.add_edge("a", "c")
    b.add_edge(["b", "c"], "d")
    return b.compile(checkpointer=saver)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("sites", [("pwrite", "open"), ("fdatasync", "fsync", "fsync_dir"),
                                   ("write_back", "rename", "unlink") + LMDB_OPS],
                         ids=["writes", "syncs", "other"])
def test_a_run_cut_off_by_a_fault_resumes_from_the_last_durable_checkpoint(
        tmp_path, mode, sites):
    """The run ends as a run without a fault ends: every node's write applied once
    (``log`` holds each name once), ``n`` counted by a and d only."""
    pytest.importorskip("langgraph.graph")
    from walstore.integrations.langgraph import WalstoreSaver
    config = {"configurable": {"thread_id": "g"}}

    def invoke(graph, value):
        if mode == "async":
            return asyncio.run(graph.ainvoke(value, config, durability="sync"))
        return graph.invoke(value, config, durability="sync")

    def case(site, nth, error):
        path = str(tmp_path / f"{site}-{nth}-{error}")
        s = walstore.open(path, **OPTS)
        fb = FaultBackend()
        rule = fb.fail(site, error=error, nth=nth) if site else None
        with installed(fb):
            s._engine.wal.request_spare()  # (its I/O among the faulted calls, as when an
            # open made it at once: a run this small never writes half a segment)
            told = _outcome(lambda: invoke(_fan_graph(WalstoreSaver(s), []), {"log": ["in"],
                                                                               "n": 0}))
        try:
            s.close()
        except walstore.WalstoreError:
            s._drop_like_a_crash()
        with walstore.open(path, **OPTS) as s:
            ran: list = []
            graph = _fan_graph(WalstoreSaver(s), ran)
            history = list(graph.get_state_history(config))
            for newer, older in zip(history, history[1:]):
                assert newer.parent_config["configurable"]["checkpoint_id"] == \
                    older.config["configurable"]["checkpoint_id"]
            if history:
                invoke(graph, None)   # (from the last durable checkpoint)
            else:
                invoke(graph, {"log": ["in"], "n": 0})  # (nothing durable: from the start)
            end = graph.get_state(config)
        shutil.rmtree(path)
        return told, end.values, end.next, ran, (rule.fired if rule else 1)

    told, final, _next, _ran, _ = case(None, 1, 0)
    assert told == "ok" and final == {"log": ["in", "a", "b", "c", "d"], "n": 2}
    cases = 0
    for site in sites:
        for error in ((errno.ENOSPC, errno.EIO) if site in FILE_SITES else (errno.EIO,)):
            nth = 1
            while True:
                told, values, nxt, ran, fired = case(site, nth, error)
                if not fired:
                    break
                cases += 1
                where = f"{os.strerror(error)} at {site} #{nth}: told {told}, resumed {ran}"
                assert not told.startswith("FOREIGN"), where
                assert sorted(values["log"]) == sorted(final["log"]), where
                assert values["n"] == 2 and nxt == (), where
                if told == "ok":
                    assert ran == [], where
                nth += 2 if site == "pwrite" else 1  # (every other WAL write: ~10 s)
    assert cases > 0


# ---- kill -9 of a real writer before each I/O call --------------------------------------------
KILLED_CHILD = r"""
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[4])
import walstore
from tools.faults import FaultBackend, installed

path, what, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = walstore.open(path, durability="full", apply_interval=3600.0)
if what == "put_writes":
    from walstore.integrations.langgraph import WalstoreSaver
    saver = WalstoreSaver(s)
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                               "checkpoint_id": sys.argv[5]}}
    op = lambda: saver.put_writes(config, [("a", "x1"), ("b", [7]), ("c", "x" * 5000)],
                                  "task-new")
else:
    from walstore.integrations.openai_agents import WalstoreSession
    session = WalstoreSession("a", s)
    op = lambda: asyncio.run(session.add_items(
        [{"role": "user", "content": f"n{i}", "pad": "p" * 2000} for i in range(3)]))
fb = FaultBackend()
fb.fail(("open", "pwrite", "fsync", "fdatasync", "fsync_dir", "rename", "unlink",
         "write_back", "lmdb_commit", "lmdb_sync"), nth=nth,
        raises=lambda: os.kill(os.getpid(), signal.SIGKILL))
with installed(fb):
    op()
print("acked", flush=True)
s._drop_like_a_crash()
"""


@pytest.mark.parametrize("what", ["put_writes", "add_items"])
def test_a_writer_killed_before_any_io_call_of_its_write_leaves_it_whole_or_absent(
        tmp_path, what):
    """A real child killed with SIGKILL right before its 1st, 2nd, ... I/O call of one
    ``put_writes`` (three writes of a task) / ``add_items`` (three items): after the
    reopen all of it or none is there — all when it acknowledged — and the checkpoint the
    writes belong to is intact."""
    if what == "put_writes":
        case = SaverCase()
    else:
        pytest.importorskip("agents")
        case = None
    from walstore.integrations.openai_agents import WalstoreSession
    base = str(tmp_path / "base")
    with walstore.open(base, **OPTS) as s:
        if case is not None:
            case.build(s)
        asyncio.run(WalstoreSession("a", s).add_items([{"role": "user", "content": "old"}]))

    def state(path):
        with walstore.open(path, **OPTS) as s:
            if case is None:
                return [i["content"] for i in asyncio.run(WalstoreSession("a", s).get_items())]
            saver = case.Saver(s)
            case.state(saver)  # (every thread's parent links and order whole)
            head = saver.get_tuple(_cfg("t", case.heads["t"]))
            return sorted((w[1], w[2] if w[1] != "c" else len(w[2]))
                          for w in head.pending_writes if w[0] == "task-new")

    whole = ([("a", "x1"), ("b", [7]), ("c", 5000)] if case is not None
             else ["old", "n0", "n1", "n2"])
    absent = [] if case is not None else ["old"]
    kills = 0
    for nth in range(1, 20):
        path = str(tmp_path / f"k{nth}")
        shutil.copytree(base, path)
        args = [sys.executable, "-c", KILLED_CHILD, path, what, str(nth), str(ROOT)]
        if case is not None:
            args.append(case.heads["t"])
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, -signal.SIGKILL), r.stderr
        got = state(path)
        if r.returncode == 0:
            assert "acked" in r.stdout and got == whole
            break
        kills += 1
        assert got in (whole, absent), f"killed before I/O call {nth}: {got}"
    assert kills >= 2  # (before the WAL write, before its fsync at least)


# ---- restore points of a session: the fsync of the record fails -------------------------------
@pytest.mark.parametrize("what", ["restore_point", "drop_restore_point"])
def test_restore_point_whose_fsync_failed_is_an_unknown_outcome_never_a_plain_failure(
        tmp_path, what):
    """``session.restore_point(name)`` / ``drop_restore_point(name)`` whose record's fsync
    fails.  Before the fix they raised LogFailed (a plain ReadOnlyError: "fsync of the WAL
    failed ...") and the next open found the point made (pinning the history it needs
    until dropped, by a caller told it was not) or dropped.  The record was written: as
    for a commit record, its outcome is unknown until the reopen — CommitOutcomeUnknown
    naming the point — and the reopen decides, all of it or none."""
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession
    path = str(tmp_path / "s")
    s = walstore.open(path, **OPTS)
    session = WalstoreSession("a", s)
    asyncio.run(session.add_items([{"role": "user", "content": "hi"}]))
    asyncio.run(session.restore_point("p1"))
    asyncio.run(session.add_items([{"role": "user", "content": "later"}]))
    fb = FaultBackend()
    fb.fail("fdatasync", errno.EIO, path="*.wal")
    op = (session.restore_point("p2") if what == "restore_point"
          else session.drop_restore_point("p1"))
    with installed(fb), pytest.raises(walstore.CommitOutcomeUnknown,
                                      match="restore point") as raised:
        asyncio.run(op)
    assert "unknown until the store is reopened" in str(raised.value)
    s._drop_like_a_crash()
    with walstore.open(path, **OPTS) as s:
        points = sorted(asyncio.run(WalstoreSession("a", s).restore_points()))
    assert points in (["p1"], ["p1", "p2"] if what == "restore_point" else [])


# ---- the LangGraph store: a TTL refresh that cannot be written ---------------------------------
def _store_with_a_ttl_item(path: str, other_scope: bool):
    """A store (full durability) and a WalstoreStore with ``refresh_on_read`` holding item
    ("m",)/"x" with a TTL; ``other_scope``: as written by a graph thread's scope (so a
    batch outside it renews it after its own commit, in that scope)."""
    pytest.importorskip("langgraph.store.base")
    from walstore.integrations.langgraph import WalstoreStore
    s = walstore.open(path, **OPTS)
    st = WalstoreStore(s, ttl={"default_ttl": 1.0, "refresh_on_read": True})
    st.put(("m",), "x", {"v": 1})
    if other_scope:
        key = st.keys.item(("m",), "x")
        with s.transaction(scope=b"lg\x00thread") as tx:
            tx.put(key, {**tx.get(key), "s": b"lg\x00thread"})
    return s, st


@pytest.mark.parametrize("fault", ["ENOSPC", "EIO-fsync"])
def test_a_batch_whose_puts_committed_is_not_reported_failed_for_a_ttl_refresh(
        tmp_path, fault):
    """A batch of a put and a ``refresh_ttl`` get of an item another scope wrote: the put
    commits, then the item's expiry is renewed in its writer's scope, in a transaction of
    its own — which meets a full disk (or a failed fsync).  Before the fix the batch raised
    that WalWriteError ("could not write the WAL record ... nothing of it was logged") or
    CommitOutcomeUnknown: the caller was told the batch failed, and its put was there."""
    from langgraph.store.base import GetOp, PutOp
    path = str(tmp_path / "s")
    s, st = _store_with_a_ttl_item(path, other_scope=True)
    fb = FaultBackend()
    if fault == "ENOSPC":
        rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal", nth=2)  # (2: the refresh's)
    else:
        rule = fb.fail("fdatasync", errno.EIO, path="*.wal", nth=2)
    with installed(fb):
        got, put = st.batch([GetOp(("m",), "x", refresh_ttl=True), PutOp(("m",), "y", {"v": 2})])
    assert rule.fired == 1
    assert got.value == {"v": 1} and put is None
    s._drop_like_a_crash()
    with walstore.open(path, **OPTS) as s:
        from walstore.integrations.langgraph import WalstoreStore
        assert WalstoreStore(s).get(("m",), "y", refresh_ttl=False).value == {"v": 2}


@pytest.mark.parametrize("fault", ["ENOSPC", "EIO-fsync"])
def test_a_read_keeps_its_answer_when_its_ttl_refresh_cannot_be_written(tmp_path, fault):
    """``store.get(ns, key)`` with ``refresh_on_read``: the read, then its TTL refresh in
    a transaction of its own meets a full disk (or a failed fsync).  Before the fix the get
    raised WalWriteError, or CommitOutcomeUnknown (of a read: "transaction 3's commit
    record ..."), and its answer was lost, where the same get on the store made read-only
    by that very fsync returned the item (a read-only store renews nothing: the items
    keep their expiry, as here)."""
    path = str(tmp_path / "s")
    s, st = _store_with_a_ttl_item(path, other_scope=False)
    fb = FaultBackend()
    if fault == "ENOSPC":
        rule = fb.fail("pwrite", errno.ENOSPC, path="*.wal")
    else:
        rule = fb.fail("fdatasync", errno.EIO, path="*.wal")
    with installed(fb):
        item = st.get(("m",), "x")
        assert rule.fired == 1
        assert item is not None and item.value == {"v": 1}
        assert st.get(("m",), "x").value == {"v": 1}  # (and again: read-only or not)
    s._drop_like_a_crash()
