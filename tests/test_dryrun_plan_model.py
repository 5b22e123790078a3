"""Property: a dry run's plan predicts the real undo exactly (CONTRACT "Action rollback").

``store.rewind(to, scope=, dry_run=True)`` and ``store.revert(txid, cascade=, scope=,
dry_run=True)`` return an ``UndoPlan`` — transactions undone, keys and files that change,
compensations that would run, newest first — and change nothing; the real call then does
exactly that.  A hypothesis RuleBasedStateMachine builds random histories of two agents
("a/" and "b/"): transactions (untagged or tagged ``scope=``) with puts and deletes,
charges (``tx.action`` compensated by a refund that appends to ``world``, the outside
world; sometimes declared ``scope=``), files written and deleted through ``tx.files`` in
one workspace per agent (registered ``scope=agent``), restore points, and undos of every
kind (revert, cascade, rewind to a name or a txid, scoped, forced).  Every undo is first
asked as a dry run, then done for real, and:

- the dry run changed nothing: state, files on disk, the action log, ``store.log()``,
  the outside world;
- a dry run that raised (RevertConflict, ConflictError, HistoryTrimmed, UnknownPoint):
  the real call raises the same type and changes nothing either;
- else: ``plan.txids`` are the real undo's ``reverts`` (``[]`` and an empty plan when it
  returned None); ``plan.files`` are exactly the files whose content changed on disk;
  ``plan.keys`` of a rewind are exactly the keys whose value changed, of a revert a
  superset (README: "a revert's every key of what it undoes"), equal to the keys the
  revert wrote; ``plan.compensations`` are the refunds the real call ran, same ids, same
  order; ``plan.needs_redo`` the actions it marked needs-redo.

CI runs a modest number of examples; ``WALSTORE_DRYRUN_EXAMPLES=N`` runs more.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import weakref

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, precondition, rule)

import walstore
from walstore.errors import (ConflictError, HistoryTrimmed, RevertConflict,
                             UnknownPoint)

AGENTS = ["a/", "b/"]
KEYS = st.sampled_from(["a/x", "a/y", "b/x", "b/y"])
FILES = st.sampled_from(["f.txt", "g.txt"])
SCOPES = st.sampled_from([None, None, "a/", "b/"])
EXPECTED = (RevertConflict, ConflictError, HistoryTrimmed, UnknownPoint)
EXAMPLES = int(os.environ.get("WALSTORE_DRYRUN_EXAMPLES", "30"))

OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("del"), KEYS, st.none()),
    st.tuples(st.just("file"), st.sampled_from(AGENTS), FILES, st.integers(0, 2)),
    st.tuples(st.just("rmfile"), st.sampled_from(AGENTS), FILES, st.none()),
    st.tuples(st.just("charge"), st.sampled_from([None, "a/", "b/"]), st.none()),
), min_size=1, max_size=4)


class Store:
    """A store and its outside world, opened in a fresh temp dir."""

    def __init__(self, **options) -> None:
        self.dir = tempfile.mkdtemp(prefix="dryrun-model-")
        self.world: list[str] = []  # refunds run, in order (the outside world)
        # path -> its bytes (None: absent) before a dropped transaction wrote it in place
        # (the next change of the path, or an undo of it, puts them back first)
        self.dropped: dict[str, bytes | None] = {}
        self.s = walstore.open(os.path.join(self.dir, "s"), durability="none",
                               compensators={"refund": lambda a: self.world.append(a.id)},
                               **options)
        self.ws = {}
        for agent in AGENTS:
            root = os.path.join(self.dir, "ws-" + agent[0])
            os.mkdir(root)
            self.ws[agent] = self.s.workspace(root, scope=agent)

    def close(self) -> None:
        try:
            self.s.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def tree(self) -> dict[str, bytes]:
        out = {}
        for agent in AGENTS:
            root = os.path.realpath(self.root(agent))
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    p = os.path.join(dirpath, f)
                    with open(p, "rb") as fh:
                        out[os.path.realpath(p)] = fh.read()
        return out

    def root(self, agent: str) -> str:
        return os.path.join(self.dir, "ws-" + agent[0])

    def snap(self) -> dict:
        s = self.s
        return {"state": dict(s.scan()), "files": self.tree(),
                "actions": sorted((a.id, a.state) for a in s.actions()),
                "log": [(t.txid, t.lsn) for t in s.log()],
                "world": list(self.world)}


def changed(before: dict, after: dict) -> set:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def undo(s, verb: str, target, *, scope, cascade=False, force=False, dry_run=False):
    if verb == "revert":
        return s.revert(target, cascade=cascade, scope=scope, force=force, dry_run=dry_run)
    return s.rewind(target, scope=scope, force=force, dry_run=dry_run)


def settle_dropped(st_: Store, before: dict, after: dict, planned=()) -> None:
    """A dropped transaction's path that the call changed had its bytes put back (the
    undo does that first, README): changed and not in the plan, it must hold exactly
    what it held before the drop, and counts as unchanged by the undo itself."""
    for p, pre in list(st_.dropped.items()):
        if after["files"].get(p) == before["files"].get(p):
            continue
        del st_.dropped[p]
        if p not in planned:
            assert after["files"].get(p) == pre, (p, pre, after["files"].get(p))
            if pre is None:
                before["files"].pop(p, None)
            else:
                before["files"][p] = pre


def check_plan(st_: Store, verb: str, target, *, scope, cascade=False, force=False) -> str:
    """Dry run, then the real call: the plan predicted it exactly.  Returns an outcome
    label (for the statistics)."""
    s = st_.s
    before = st_.snap()
    try:
        plan = undo(s, verb, target, scope=scope, cascade=cascade, force=force, dry_run=True)
        dry_err = None
    except EXPECTED as e:
        plan, dry_err = None, e
    assert st_.snap() == before, "the dry run changed something"
    if dry_err is not None:
        with pytest.raises(type(dry_err)):
            undo(s, verb, target, scope=scope, cascade=cascade, force=force)
        after = st_.snap()
        settle_dropped(st_, before, after)
        assert after == before, "the refused real call changed something"
        return "refused:" + type(dry_err).__name__
    world0 = len(st_.world)
    info = undo(s, verb, target, scope=scope, cascade=cascade, force=force)
    after = st_.snap()
    settle_dropped(st_, before, after, set(plan.files))
    ran = st_.world[world0:]
    keys_changed = changed(before["state"], after["state"])
    files_changed = changed(before["files"], after["files"])
    redo_before = {aid for aid, state in before["actions"] if state == "needs-redo"}
    redo_after = {aid for aid, state in after["actions"] if state == "needs-redo"}
    desc = (verb, target, scope, cascade, force, plan.as_dict())
    if info is None:
        assert plan.empty() and plan.txids == [], desc
        assert after == before, desc
        return "nothing"
    assert plan.txids == list(info.extra.get("reverts", ())), (desc, info.extra)
    if verb == "rewind":
        assert set(plan.keys) == keys_changed, (desc, keys_changed)
    else:
        assert keys_changed <= set(plan.keys), (desc, keys_changed)
        assert set(plan.keys) == set(info.keys), (desc, info.keys)
    assert set(plan.files) == files_changed, (desc, files_changed)
    assert [a.id for a in plan.compensations] == ran, (desc, ran)
    assert [a.id for a in plan.compensations] == list(info.extra.get("compensate", ())), desc
    assert set(plan.needs_redo) == redo_after - redo_before, (desc, after["actions"])
    assert set(plan.unredo) == redo_before - redo_after, (desc, after["actions"])
    return "done"


def collect(ref: weakref.ref) -> None:
    """See the dropped transaction ``ref`` refers to garbage-collected: collections of
    the youngest generations first, a full one only while it lives on.  (In every run
    seen its ``del`` freed it at once; a full collection of this process's heap, done
    each time before, took 0.1 s or more: most of the model's time.)"""
    for generation in (0, 1, 2):
        if ref() is None:
            return
        gc.collect(generation)
    assert ref() is None, "the dropped transaction was not garbage-collected"


class DryRunModel(RuleBasedStateMachine):
    options: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.st = Store(**self.options)
        self.points: list[str] = []
        self.n = 0

    def teardown(self) -> None:
        self.st.close()

    def txids(self) -> list[int]:
        return [t.txid for t in self.st.s.log()]

    @rule(ops=OPS, tag=SCOPES)
    def transaction(self, ops, tag):
        s = self.st.s
        with s.transaction(scope=tag) as tx:
            for op in ops:
                if op[0] == "put":
                    tx.put(op[1], op[2])
                elif op[0] == "del":
                    tx.delete(op[1])
                elif op[0] == "file":
                    self.settled(op[1], op[2])
                    tx.files(self.st.ws[op[1]]).write(op[2], f"{op[1]}{op[2]}{op[3]}")
                elif op[0] == "rmfile":
                    if self.path(op[1], op[2]) in self.st.dropped:
                        continue  # (exists() reads a dropped transaction's bytes: not
                        # ours to judge here, see the report)
                    f = tx.files(self.st.ws[op[1]])
                    if f.exists(op[2]):
                        f.delete(op[2])
                else:
                    with tx.action("charge", args={}, compensate="refund",
                                   scope=op[1]) as act:
                        act.result = {"ok": 1}

    def path(self, agent: str, name: str) -> str:
        return os.path.realpath(os.path.join(self.st.root(agent), name))

    def settled(self, agent: str, name: str) -> None:
        """A transaction changing the path puts a dropped one's bytes back first."""
        self.st.dropped.pop(self.path(agent, name), None)

    @rule(agent=st.sampled_from(AGENTS), name=FILES, n=st.integers(0, 2))
    def dropped(self, agent, name, n):
        """A transaction writes a file in place and is dropped (garbage-collected with no
        commit or rollback): its bytes stay there until the path is changed again."""
        p = self.path(agent, name)
        if p not in self.st.dropped:
            self.st.dropped[p] = self.st.tree().get(p)
        tx = self.st.s.transaction()
        tx.files(self.st.ws[agent]).write(name, f"dropped{n}")
        ref = weakref.ref(tx)
        del tx
        collect(ref)

    @precondition(lambda self: True)
    @rule(agent=st.sampled_from(AGENTS), name=FILES, gone=st.booleans())
    def stranger(self, agent, name, gone):
        """A file changed behind walstore's back (an undo over it: RevertConflict naming
        the path unless force=True)."""
        p = os.path.join(self.st.root(agent), name)
        if self.path(agent, name) in self.st.dropped:
            return  # (not under a dropped transaction's bytes: its put-back is a conflict)
        if gone:
            if os.path.exists(p):
                os.unlink(p)
        else:
            with open(p, "w") as fh:
                fh.write("stranger")

    @rule()
    def restore_point(self):
        self.n += 1
        name = f"p{self.n}"
        self.st.s.restore_point(name)
        self.points.append(name)

    @precondition(lambda self: self.txids())
    @rule(data=st.data(), cascade=st.booleans(), scope=SCOPES, force=st.booleans())
    def revert(self, data, cascade, scope, force):
        target = data.draw(st.sampled_from(self.txids()), label="txid")
        event("revert " + check_plan(self.st, "revert", target, scope=scope,
                                     cascade=cascade, force=force))

    @precondition(lambda self: self.txids() or self.points)
    @rule(data=st.data(), scope=SCOPES, force=st.booleans())
    def rewind(self, data, scope, force):
        choices = [*self.points, *self.txids(),
                   *(walstore.LSN(t.lsn) for t in self.st.s.log(limit=3))]
        target = data.draw(st.sampled_from(choices), label="to")
        event("rewind " + check_plan(self.st, "rewind", target, scope=scope, force=force))

    @rule(data=st.data())
    def unknown_point(self, data):
        bad = data.draw(st.sampled_from(["nope", 10_000, walstore.LSN(10**9)]))
        check_plan(self.st, "rewind", bad, scope=None)
        if isinstance(bad, int) and not isinstance(bad, walstore.LSN):
            check_plan(self.st, "revert", bad, scope=None)


class RetentionDryRunModel(DryRunModel):
    """The same with history of the newest 3 transactions only (trimmed at checkpoints)
    and restore points dropped: a plan refused HistoryTrimmed is refused by the real
    call too."""

    options = {"retain_transactions": 3}

    @rule()
    def checkpoint(self):
        self.st.s.checkpoint()

    @precondition(lambda self: self.points)
    @rule(data=st.data())
    def drop_point(self, data):
        name = data.draw(st.sampled_from(self.points))
        self.st.s.drop_restore_point(name)
        self.points.remove(name)

    def txids(self) -> list[int]:  # (trimmed ones too: HistoryTrimmed is a plan's answer)
        self.seen = getattr(self, "seen", set()) | {t.txid for t in self.st.s.log()}
        return sorted(self.seen)


def _settings(examples: int, steps: int):
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


DryRunModel.TestCase.settings = _settings(EXAMPLES, 20)
TestDryRunModel = DryRunModel.TestCase
RetentionDryRunModel.TestCase.settings = _settings(max(EXAMPLES // 3, 10), 20)
TestRetentionDryRunModel = RetentionDryRunModel.TestCase


# ---- regressions found by the model ------------------------------------------------------
def _drop(s, ws, name: str, data: str) -> None:
    """A transaction that writes ``name`` in place and is dropped (garbage-collected with
    no commit or rollback): its bytes stay on disk until an undo of the path (or the next
    open) puts them back."""
    import gc
    tx = s.transaction()
    tx.files(ws).write(name, data)
    del tx
    gc.collect()


def _x_at_p_then_changed(tmp_path):
    """A store whose workspace file x was "v0" at restore point "p" and "v1" since."""
    s = walstore.open(str(tmp_path / "s"), durability="none")
    (tmp_path / "ws").mkdir()
    ws = s.workspace(str(tmp_path / "ws"))
    with s.transaction() as tx:
        tx.files(ws).write("x", "v0")
    s.restore_point("p")
    with s.transaction() as tx:
        tx.files(ws).write("x", "v1")
    return s, ws


def test_dry_run_judges_a_dropped_path_as_the_put_back_leaves_it_done(tmp_path):
    """The path a rewind restores holds a dropped transaction's bytes, and under them the
    point's version already (a revert took the change back).  The real rewind puts the
    dropped bytes back, finds the path done and undoes nothing (None); the dry run kept
    the path in the plan, judged by the dropped bytes: it listed the path and the revert
    as undone, a plan of something the real call does not do."""
    s, ws = _x_at_p_then_changed(tmp_path)
    s.revert(s.log()[0].txid)
    _drop(s, ws, "x", "dropped")
    plan = s.rewind("p", dry_run=True)
    assert (tmp_path / "ws" / "x").read_text() == "dropped"  # the dry run changed nothing
    assert s.rewind("p") is None  # the real call undoes nothing
    assert (plan.txids, plan.files, plan.keys) == ([], [], [])
    assert plan.empty()
    s.close()


def test_dry_run_judges_a_dropped_path_as_the_put_back_leaves_it_conflict(tmp_path):
    """Under the dropped transaction's bytes is a stranger's change of the path (written
    behind walstore's back): the real rewind puts the dropped bytes back, meets the
    stranger's and raises RevertConflict; the dry run, judging the dropped bytes, planned
    the rewind as if it would go through."""
    s, ws = _x_at_p_then_changed(tmp_path)
    (tmp_path / "ws" / "x").write_text("stranger")
    _drop(s, ws, "x", "dropped")
    with pytest.raises(RevertConflict):
        s.rewind("p", dry_run=True)
    assert (tmp_path / "ws" / "x").read_text() == "dropped"  # the dry run changed nothing
    with pytest.raises(RevertConflict):
        s.rewind("p")
    # forced, the plan and the real call agree again: the path goes back to v0
    plan = s.rewind("p", dry_run=True, force=True)
    assert plan.files == [str((tmp_path / "ws" / "x").resolve())]
    info = s.rewind("p", force=True)
    assert info.extra["reverts"] == plan.txids
    assert (tmp_path / "ws" / "x").read_text() == "v0"
    s.close()
