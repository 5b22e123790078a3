"""Model-based test of the agent layer: the recorded state and the outside world agree.

A hypothesis RuleBasedStateMachine drives two agents ("a/" and "b/") through everything
that moves state and side effects together: transactions with puts, deletes and reads (and
another transaction committing while one is open: a conflict at commit),
charges (``tx.action`` whose body charges an outside ledger, compensated by a refund),
savepoints and ``rollback_to``/``release``, commit and rollback, outages of the refund
service (compensations fail, are kept owed, retried later or resolved by hand by an
operator who refunds), two-phase commit
(prepare, then commit_prepared or rollback_prepared, or a crash in between), restore
points, reverts (cascading, forced, scoped), rewinds (to names and txids, forced,
scoped), checkpoints, clean reopens, and crashes (the store dropped as a killed process
leaves it, then reopened: recovery).  The ledger is the outside world: it knows nothing
of walstore but what the action bodies and the refund compensator did to it.

After every step with no transaction open, for every charge the store records:
- the ledger holds 0 or 1 of it (a refund never runs twice, never without a charge);
- ``committed`` (its transaction committed, nothing undid it): charged in the ledger,
  and the transaction's evidence key (``<agent>paid/<n>``) is in the state;
- ``compensated``: refunded, and the evidence is gone from the state;
- ``needs-redo`` (a forced undo of its undo): refunded, the evidence back (that is what
  the mark says); ``pending``/``failed`` (owed): charged, the evidence gone;
  ``resolved``: refunded by hand, the evidence gone; in doubt (prepared): charged, the
  evidence not visible;
and every charge standing in the ledger is one the store records as standing (an owed
refund of an intent whose body may not have run, ``result`` None, may find nothing
charged: the refund service declines it, as a real one declines an unknown idempotency
key).  An unscoped rewind that succeeds leaves exactly the state the point named
(recorded when the point was made); a scoped undo moves only keys under its scope (a
transaction begun with ``scope=`` is that agent's wholly and is undone wholly, so here it
writes only its agent's keys; an untagged one writes anywhere); ``store.at`` of every
point reads as the point named.  At teardown ``verify`` finds no errors.

Variants, each a state machine of its own: ``FilesModel`` (every key mirrored by a file
in its agent's workspace, changed through ``tx.files`` and by plain file I/O inside
``watch()``), ``FaultModel`` (durability="full", disk faults armed during
an operation, then a crash), ``RetentionModel`` (history of the newest 3 transactions,
restore points dropped), ``ScopeModel`` (tagged transactions write outside their scope),
``ReplicaModel`` (copies restored from a ``file://`` replica at every point).  CI runs
15-60 examples of each; ``tools/agentmodel.py`` runs thousands.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule)

import walstore
from walstore.agent import actions as actions_module
from walstore.ops.verify import verify_store
from tools.faults import FaultBackend, installed

AGENTS = st.sampled_from(["a/", "b/"])
KEYS = st.sampled_from(["a/x", "a/y", "b/x", "b/y"])
SAVEPOINTS = st.sampled_from(["s1", "s2"])
STANDING = ("committed", "needs-redo")


@pytest.fixture(scope="module", autouse=True)
def _no_disk_waits():
    """The models' syncs (walstore's fsync, fdatasync, directory fsync, syncfs) return
    without waiting for the disk: every crash here is a killed process's
    (``_drop_like_a_crash``), whose page cache survives, so what each step leaves and
    every check are the same; the thousands of real syncs of a run (one in every open,
    close and checkpoint, each commit under FaultModel's durability="full") were half of
    its time or more on a busy disk.  Patched on ``OSBackend`` itself, so walstore's path
    stays that of no test backend installed; FaultModel's ``FaultBackend`` still sees,
    counts and fails every sync call as before."""
    from walstore.fileio import OSBackend
    with pytest.MonkeyPatch.context() as mp:
        for name in ("fsync", "fdatasync", "fsync_dir", "syncfs"):
            mp.setattr(OSBackend, name, lambda self, target: None)
        yield


def _settings(examples: int, steps: int) -> settings:
    """CI's search: ``examples`` runs of up to ``steps`` steps; WALSTORE_MODEL_EXAMPLES
    asks for more (``tools/agentmodel.py``)."""
    return settings(max_examples=int(os.environ.get("WALSTORE_MODEL_EXAMPLES", examples)),
                    stateful_step_count=steps, deadline=None)


def _content(value: dict) -> bytes:
    return b"%d\n" % value["n"]


def _scoped(state: dict, scope: str | None) -> dict:
    return {k: v for k, v in state.items() if scope is None or k.startswith(scope)}


class AgentModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="walstore-agent-model-")
        self.path = self.dir + "/store"
        self.ledger: dict[str, int] = {}        # action key -> charges minus refunds
        self.evidence: dict[str, str] = {}      # action key -> its evidence key
        self.down = False                       # the refund service fails while down
        self.double_refunds: list = []
        self._backoff = actions_module.COMPENSATION_BACKOFF
        actions_module.COMPENSATION_BACKOFF = 0  # (its retries at once: a model, no clock)
        self.store = self._open()
        self.tx = None
        self.agent, self.tagged = "a/", False
        self.savepoints: list[str] = []
        self.prepared: list[str] = []           # gids this model prepared, undecided
        self.points: dict[str, dict] = {}       # restore point -> the state it names
        self.after: dict[int, dict] = {}        # txid -> the state right after it
        self.counter = 0
        # FilesModel: txid -> the (root, names) of each workspace it listed, and the
        # names it changed there itself; gid -> the same, for a prepared one
        self.listings: dict[int, list] = {}
        self.touched: dict[int, set] = {}
        self.prepared_listings: dict[str, tuple] = {}

    mirrored = False  # FilesModel: every key has a file beside it (the files' world)
    durability = "none"  # FaultModel: "full"
    repeats_allowed = False  # FaultModel: a refund whose record failed runs again (its key)
    retain = None  # RetentionModel: history of the newest N transactions only
    wide_tags = False  # ScopeModel: a tagged transaction writes the other agent's keys too

    def _open(self) -> walstore.Store:
        store = walstore.open(self.path, durability=self.durability, segment_size=16384,
                              compensators={"refund": self._refund},
                              **self._options())
        if self.mirrored:  # a workspace per agent, in its scope (registered again: the same)
            for a in ("a", "b"):
                os.makedirs(f"{self.dir}/ws-{a}", exist_ok=True)
            self.ws = {a: store.workspace(f"{self.dir}/ws-{a[0]}", scope=a)
                       for a in ("a/", "b/")}
        return store

    def _options(self) -> dict:
        return {"retain_transactions": self.retain} if self.retain else {}

    def _mirror(self, key: str):
        """The workspace and file name that mirror ``key``."""
        return self.ws[key[:2]], key[2:].replace("/", "_")

    def _refund(self, action) -> None:
        """The payment service's refund: of a charge that never happened (an intent whose
        body did not run: recovery cannot tell it from one that crashed inside, so it
        compensates with ``result`` None) it refunds nothing, as a real one declines
        an unknown idempotency key; of a charge refunded already it counts a double."""
        if self.down:
            raise RuntimeError("the refund service is down")
        count = self.ledger.get(action.key)
        if count is None:
            assert action.result is None, action  # (a result: its body ran, and charged)
            self.ledger[action.key] = 0
        elif count == 0:  # (the service declines it: idempotency keys; where no fault
            self.double_refunds.append(action)  # kept the first from being recorded,
        else:                                   # walstore never runs one twice)
            self.ledger[action.key] = count - 1

    def _fresh(self) -> int:
        self.counter += 1
        return self.counter

    def _state(self) -> dict:
        return dict(self.store.scan())

    def _note(self, info) -> None:
        """Remember the state after a transaction that just committed (its txid)."""
        txid = getattr(info, "txid", info)
        if isinstance(txid, int):
            self.after[txid] = self._state()

    # ---- transactions --------------------------------------------------------------------
    @precondition(lambda self: self.tx is None)
    @rule(agent=AGENTS, tagged=st.booleans())
    def begin(self, agent, tagged) -> None:
        self.tx = self.store.transaction(scope=agent if tagged else None)
        self._forget(self.tx.id)
        self.agent, self.tagged = agent, tagged
        self.savepoints = []

    def _key(self, key: str) -> str:
        """A tagged transaction is its agent's wholly (a scoped undo takes all of it
        back): it writes only its agent's keys here, so that what a scoped undo may move
        is the keys under its scope; an untagged one writes anywhere."""
        return self.agent + key[2:] if self.tagged and not self.wide_tags else key

    @precondition(lambda self: self.tx is not None)
    @rule(key=KEYS)
    def put(self, key) -> None:
        key, value = self._key(key), {"n": self._fresh()}
        self.tx.put(key, value)
        if self.mirrored:
            ws, name = self._mirror(key)
            self._file_op(lambda files: files.write(name, _content(value)), ws, name)

    @precondition(lambda self: self.tx is not None and self.mirrored)
    @rule(key=KEYS, gone=st.booleans())
    def watched_change(self, key, gone) -> None:
        """FilesModel: the key's file changed by plain file I/O inside ``watch()`` (as a
        tool the agent runs changes it), the key beside it: the watch makes the change
        the transaction's (its rollback, revert and rewind put it back); a path another
        live transaction holds makes the watch's end put the block's changes back and
        raise ConflictError: the key's write then goes too (a rollback).  The tool
        deletes the file if it is there: a read walstore does not see (a subprocess's), so
        the agent asks ``exists`` first — what a transaction relies on, it reads through
        ``tx.files`` (without it: begin; the tool finds no file; another transaction
        writes the key and its file and commits; ours deletes the key and commits, and
        the file stays — serializable as walstore saw it, a blind delete after that
        commit; README, "Reversible files")."""
        key = self._key(key)
        ws, name = self._mirror(key)
        path = os.path.join(ws.root, name)
        value = {"n": self._fresh()}
        self.touched.setdefault(self.tx.id, set()).add((ws.root, name))
        if gone:
            self.tx.files(ws).exists(name)
        try:
            with self.tx.files(ws).watch():
                if gone:
                    if os.path.lexists(path):
                        os.unlink(path)
                else:
                    with open(path, "wb") as f:
                        f.write(_content(value))
        except walstore.ConflictError:
            self.rollback()
            return
        if gone:
            self.tx.delete(key)
        else:
            self.tx.put(key, value)

    @precondition(lambda self: self.tx is not None)
    @rule(key=KEYS)
    def delete(self, key) -> None:
        key = self._key(key)
        self.tx.delete(key)
        if self.mirrored:
            ws, name = self._mirror(key)
            self._file_op(lambda files: files.exists(name) and files.delete(name), ws, name)

    @precondition(lambda self: self.tx is not None)
    @rule(key=KEYS)
    def read(self, key) -> None:
        self.tx.get(key)  # (its snapshot; a later commit of the key makes ours conflict)

    @precondition(lambda self: self.tx is not None and self.mirrored)
    @rule(agent=AGENTS)
    def list_files(self, agent) -> None:
        """FilesModel: the transaction lists an agent's workspace (what a planner does
        before deciding what to write): when it commits, the names there are those it
        saw, but for the ones it changed itself (``_check_listing``); prepared, they stay
        so until its decision (``hold_reads``)."""
        ws = self.ws[agent]
        names = frozenset(self.tx.files(ws).listdir(""))
        self.listings.setdefault(self.tx.id, []).append((ws.root, names))

    def _forget(self, txid: int) -> None:
        """A new transaction: nothing noted under its txid (one that ended without a
        commit, or was lost in a crash, may have had the same number)."""
        self.listings.pop(txid, None)
        self.touched.pop(txid, None)

    def _check_listings(self, txid: int, listings=None, touched=None) -> None:
        """Right after ``txid`` committed (single-threaded: nothing ran between its
        commit check and here): every listing it made still holds."""
        listings = self.listings.pop(txid, []) if listings is None else listings
        touched = self.touched.pop(txid, set()) if touched is None else touched
        for root, seen in listings:
            own = {n for r, n in touched if r == root}
            now = frozenset(os.listdir(root))
            assert seen - own == now - own, (txid, root, sorted(seen), sorted(now))

    @precondition(lambda self: self.tx is not None)
    @rule(key=KEYS, charge=st.booleans())
    def interloper(self, key, charge) -> None:
        """Another transaction (of the other agent, in the same thread: nothing here
        waits) commits while ours is open: a key, maybe a charge; ours then conflicts at
        commit if it read that key (ConflictError: its charges refunded)."""
        mine = (self.tx, self.agent, self.tagged, self.savepoints)
        self.tx, self.agent, self.tagged = self.store.transaction(), key[:2], False
        self._forget(self.tx.id)
        try:
            self.put(key)
            if charge and self.tx is not None:
                self.charge()
            if self.tx is not None:
                self.commit()
        finally:
            self.tx, self.agent, self.tagged, self.savepoints = mine

    def _file_op(self, op, ws, name=None) -> None:
        """A file change beside the key's; a path a prepared or open transaction holds is
        refused (ConflictError, nothing changed): the key's write then goes too (a
        rollback)."""
        if name is not None:
            self.touched.setdefault(self.tx.id, set()).add((ws.root, name))
        try:
            op(self.tx.files(ws))
        except walstore.ConflictError:
            self.rollback()

    @precondition(lambda self: self.tx is not None)
    @rule()
    def charge(self) -> None:
        n = self._fresh()
        evidence = f"{self.agent}paid/{n}"
        with self.tx.action("charge", args={"n": n}, compensate="refund",
                            scope=self.agent) as act:
            self.evidence[act.key] = evidence
            self.ledger[act.key] = self.ledger.get(act.key, 0) + 1
            act.result = n
        self.tx.put(evidence, n)

    @precondition(lambda self: self.tx is not None)
    @rule(name=SAVEPOINTS)
    def savepoint(self, name) -> None:
        self.tx.savepoint(name)
        if name in self.savepoints:
            self.savepoints.remove(name)
        self.savepoints.append(name)

    @precondition(lambda self: self.tx is not None and self.savepoints)
    @rule(data=st.data())
    def rollback_to(self, data) -> None:
        name = data.draw(st.sampled_from(self.savepoints))
        try:
            self.tx.rollback_to(name)
        except walstore.CompensationFailed:  # rolled back; the refunds it owes stay owed
            assert self.down
        del self.savepoints[self.savepoints.index(name) + 1:]

    @precondition(lambda self: self.tx is not None and self.savepoints)
    @rule(data=st.data())
    def release(self, data) -> None:
        name = data.draw(st.sampled_from(self.savepoints))
        self.tx.release(name)
        del self.savepoints[self.savepoints.index(name):]

    @precondition(lambda self: self.tx is not None)
    @rule()
    def commit(self) -> None:
        tx, self.tx = self.tx, None
        try:
            tx.commit()
        except walstore.ConflictError:  # (a key it read changed since: ``interloper``; or
            assert tx.state == "rolled back"  # a prepared transaction holds one it wrote)
            return
        except walstore.CompensationFailed as e:  # (that conflict, and the refund failed)
            assert self.down and isinstance(e.__cause__, walstore.ConflictError), e
            assert tx.state == "rolled back"
            return
        if tx.lsn is not None:  # (nothing written: no commit record, no point)
            self._note(tx.id)
        self._check_listings(tx.id)

    @precondition(lambda self: self.tx is not None)
    @rule()
    def rollback(self) -> None:
        tx, self.tx = self.tx, None
        try:
            tx.rollback()
        except walstore.CompensationFailed:
            assert self.down
        assert tx.state == "rolled back"

    @precondition(lambda self: self.tx is not None and len(self.prepared) < 2)
    @rule()
    def prepare(self) -> None:
        tx, self.tx = self.tx, None
        gid = f"g{self._fresh()}"
        try:
            tx.prepare(gid)
        except walstore.ConflictError:
            try:
                tx.rollback()
            except walstore.CompensationFailed:
                assert self.down
            return
        self.prepared.append(gid)
        self.prepared_listings[gid] = (self.listings.pop(tx.id, []),
                                       self.touched.pop(tx.id, set()))

    @precondition(lambda self: self.tx is None and self.prepared)
    @rule(data=st.data(), commit=st.booleans())
    def decide(self, data, commit) -> None:
        gid = data.draw(st.sampled_from(self.prepared))
        self.prepared.remove(gid)
        listings, touched = self.prepared_listings.pop(gid, ([], set()))
        if commit:
            self.store.commit_prepared(gid)
            self._note(self.store.log(limit=1)[0])
            self._check_listings(-1, listings, touched)  # (held since its prepare)
        else:
            try:
                self.store.rollback_prepared(gid)
            except walstore.CompensationFailed:
                assert self.down
            assert gid not in self.store.prepared()

    # ---- the past ------------------------------------------------------------------------
    @precondition(lambda self: self.tx is None)
    @rule()
    def restore_point(self) -> None:
        name = f"p{self._fresh()}"
        self.store.restore_point(name)
        self.points[name] = self._state()

    @precondition(lambda self: self.tx is None)
    @rule(data=st.data(), cascade=st.booleans(), force=st.booleans(),
          scope=st.sampled_from([None, "a/", "b/"]))
    def revert(self, data, cascade, force, scope) -> None:
        log = self.store.log(limit=12)
        if not log:
            return
        txid = data.draw(st.sampled_from([i.txid for i in log]))
        before = self._state()
        try:
            info = self.store.revert(txid, cascade=cascade, force=force, scope=scope)
        except (walstore.RevertConflict, walstore.ConflictError):
            assert self._state() == before  # refused: nothing changed
            return
        except walstore.HistoryTrimmed:  # (a cascade reaching below the horizon)
            assert self.retain and self._state() == before
            return
        except walstore.CompensationFailed as e:  # the undo committed; refunds owed
            assert self.down and e.undo is not None, e
            info = e.undo
        now = self._state()
        if scope is not None and not self.wide_tags:  # nothing outside the scope moved
            assert {k: v for k, v in now.items() if not k.startswith(scope)} == \
                {k: v for k, v in before.items() if not k.startswith(scope)}
        self._note(info)

    @precondition(lambda self: self.tx is None and (self.points or self.after))
    @rule(data=st.data(), force=st.booleans(), scope=st.sampled_from([None, "a/", "b/"]))
    def rewind(self, data, force, scope) -> None:
        targets = [(name, state) for name, state in self.points.items()]
        targets += [(txid, state) for txid, state in self.after.items()]
        to, expected = data.draw(st.sampled_from(targets))
        before = self._state()
        try:
            info = self.store.rewind(to, scope=scope, force=force)
        except (walstore.RevertConflict, walstore.ConflictError):
            assert self._state() == before
            return
        except walstore.HistoryTrimmed:  # (a txid below the horizon; restore points pin)
            assert self.retain and isinstance(to, int) and self._state() == before
            return
        except walstore.CompensationFailed as e:  # the undo committed; refunds owed
            assert self.down and e.undo is not None, e
            info = e.undo
        now = self._state()
        if self.prepared:  # a prepared transaction's keys are not the rewind's to take
            return
        assert _scoped(now, scope) == _scoped(expected, scope), (to, scope)
        if scope is not None and not self.wide_tags:
            outside = {k: v for k, v in now.items() if not k.startswith(scope)}
            assert outside == {k: v for k, v in before.items() if not k.startswith(scope)}
        self._note(info)

    @precondition(lambda self: self.points or self.after)
    @rule(data=st.data())
    def read_the_past(self, data) -> None:
        """``store.at(point)`` is the state the point named, whatever came after it (undos,
        undos of undos, crashes, checkpoints); its files too (FilesModel)."""
        targets = sorted(self.points.items()) + sorted(self.after.items())
        point, expected = data.draw(st.sampled_from(targets))
        try:
            view = self.store.at(point)
        except walstore.HistoryTrimmed:  # (a txid below the horizon; restore points pin)
            assert self.retain and isinstance(point, int), point
            return
        assert dict(view.scan()) == expected, point
        if self.mirrored:
            for key, value in expected.items():
                if "/paid/" not in key:
                    ws, name = self._mirror(key)
                    assert view.files(ws).read(name) == _content(value), (point, key)

    # ---- the refund service, and the operator ---------------------------------------------
    @rule(down=st.booleans())
    def outage(self, down) -> None:
        self.down = down

    @precondition(lambda self: self.tx is None and not self.down)
    @rule()
    def retry_compensations(self) -> None:
        assert self.store.retry_compensations() == []

    @precondition(lambda self: self.tx is None)
    @rule(data=st.data())
    def resolve_by_hand(self, data) -> None:
        owed = self.store.pending_compensations()
        if not owed:
            return
        action = data.draw(st.sampled_from(owed))
        if self.ledger.get(action.key, 0) > 0:  # the operator refunds it (if it was
            self.ledger[action.key] -= 1         # charged at all), and says so
        assert self.store.resolve(action.id, note="refunded by hand").state == "resolved"

    # ---- the store's life ----------------------------------------------------------------
    @precondition(lambda self: self.tx is None)
    @rule()
    def checkpoint(self) -> None:
        self.store.checkpoint()

    @rule()
    def crash_and_reopen(self) -> None:
        self.store.sync()  # durability="none": a killed process keeps what reached the OS
        self.store._drop_like_a_crash()
        self.tx = None
        self.store = self._open()  # recovery: the open transaction's charges refunded
        assert sorted(self.store.prepared()) == sorted(self.prepared)

    @precondition(lambda self: self.tx is None)
    @rule()
    def clean_reopen(self) -> None:
        self.store.close()
        self.store = self._open()
        assert sorted(self.store.prepared()) == sorted(self.prepared)

    # ---- agreement -----------------------------------------------------------------------
    @invariant()
    def ledger_counts_are_zero_or_one(self) -> None:
        assert self.repeats_allowed or not self.double_refunds, self.double_refunds
        for key, count in self.ledger.items():
            assert count in (0, 1), (key, count)

    @invariant()
    def state_and_world_agree(self) -> None:
        if self.tx is not None:
            return  # (its charges are neither committed nor undone yet)
        state = self._state()
        in_doubt = {self.store.prepared_details(g).txid for g in self.store.prepared()}
        recorded = {}
        for a in self.store.actions():
            recorded[a.key] = a
            charged = self.ledger.get(a.key, 0) == 1
            shown = a.key in self.evidence and self.evidence[a.key] in state
            if a.txid in in_doubt and a.state == "pending":  # (held, undecided: not owed)
                assert charged and not shown and a.in_flight, (a, charged, shown)
            elif a.state == "committed":
                assert charged and shown, (a, charged, shown)
            elif a.state == "compensated":
                assert not charged and not shown, (a, charged, shown)
            elif a.state == "needs-redo":
                assert not charged and shown, (a, charged, shown)
            elif a.state in ("pending", "failed"):  # owed: the refund has not run (of a
                assert not shown and (charged or a.result is None), (a, charged, shown)
                # body that may not have run, either: an intent logged, no result)
            elif a.state == "resolved":  # (refunded by hand here)
                assert not charged and not shown, (a, charged, shown)
            else:
                raise AssertionError(f"an action in state {a.state!r}: {a}")
        for key, count in self.ledger.items():
            if count and key not in recorded:  # (a charge the store forgot? or one whose
                assert self.retain and self.evidence[key] in state, key  # settled row
                # retention trimmed with its commit: it stands, and so does its state)

    @invariant()
    def files_mirror_the_state(self) -> None:
        if not self.mirrored or self.tx is not None or self.store.prepared():
            return  # (a prepared transaction's files changed in place; its keys wait)
        state = self._state()
        for agent in ("a/", "b/"):
            root = f"{self.dir}/ws-{agent[0]}"
            on_disk = {}
            for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
                with open(os.path.join(root, name), "rb") as f:
                    on_disk[name] = f.read()
            wanted = {k[2:].replace("/", "_"): _content(v) for k, v in state.items()
                      if k.startswith(agent) and "/paid/" not in k}
            assert on_disk == wanted, (agent, on_disk, wanted)

    def teardown(self) -> None:
        try:
            self.down = False
            if self.tx is not None:
                self.tx.rollback()
            self.store.close()
            report = verify_store(self.path)
            assert not report.errors, report.errors
        finally:
            actions_module.COMPENSATION_BACKOFF = self._backoff
            shutil.rmtree(self.dir, ignore_errors=True)


AgentModel.TestCase.settings = _settings(60, 50)
TestAgentModel = AgentModel.TestCase


class FilesModel(AgentModel):
    """The same, with every key mirrored by a file in its agent's workspace (declared in
    the agent's scope), written and deleted in the same transaction as the key: after
    every step the files on disk are exactly the state's keys (reversible files follow
    commits, rollbacks, savepoints, reverts, rewinds, 2PC and crashes as keys do)."""

    mirrored = True


FilesModel.TestCase.settings = _settings(30, 40)
TestFilesModel = FilesModel.TestCase


class RetentionModel(AgentModel):
    """The same with history kept for the newest 3 transactions only (trimmed at
    checkpoints) and restore points dropped now and then: a restore point pins what it
    needs (``at`` and ``rewind`` to it stay exact however much was trimmed), a txid below
    the horizon raises HistoryTrimmed and changes nothing, and trimming never loses an
    owed compensation (a settled charge's row may go with its commit; it still stands)."""

    retain = 3

    @precondition(lambda self: self.tx is None and self.points)
    @rule(data=st.data())
    def drop_point(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(self.points)))
        self.store.drop_restore_point(name)
        del self.points[name]


RetentionModel.TestCase.settings = _settings(30, 50)
TestRetentionModel = RetentionModel.TestCase


class ScopeModel(AgentModel):
    """The same, with transactions begun with ``scope=`` writing the other agent's keys
    too: a scoped undo takes such a transaction back wholly, its keys outside the scope
    included (or refuses, RevertConflict, where a transaction it keeps wrote them later).
    Keys inside the scope still end exactly as at the point; outside, only the agreement
    of state and ledger is checked."""

    wide_tags = True


ScopeModel.TestCase.settings = _settings(30, 50)
TestScopeModel = ScopeModel.TestCase


class ReplicaModel(AgentModel):
    """The same, replicating to a ``file://`` replica, with one more step: wait until the
    replica holds every commit (``sync_replica``), restore a copy at a point the model
    knows (a restore point or a txid) and open it.  The copy reads exactly as the point
    named (a point-in-time cut), lists the restore points up to it, and opening it runs
    no compensation (the actions of transactions in flight at the cut are listed as owed,
    never run: the machine that ran them is gone)."""

    def _options(self) -> dict:
        return {"replicate_to": f"file://{self.dir}/replica",
                "replicate_options": {"interval": 0.05}}

    @precondition(lambda self: self.points or self.after)
    @rule(data=st.data())
    def restore_a_copy(self, data) -> None:
        targets = sorted(self.points.items()) + sorted(self.after.items())
        point, expected = data.draw(st.sampled_from(targets))
        self.store.sync_replica(timeout=30)
        self.copies = getattr(self, "copies", 0) + 1
        dest = f"{self.dir}/copy-{self.copies}"
        walstore.restore(f"file://{self.dir}/replica", dest, to=point)
        ran: list = []
        copy = walstore.open(dest, compensators={"refund": ran.append})
        event(f"restored a copy at a {type(point).__name__} point, "
              f"{'with' if copy.pending_compensations() else 'no'} refunds owed")
        try:
            assert dict(copy.scan()) == expected, point
            assert ran == []  # (nothing runs in a copy)
            for a in copy.pending_compensations():  # (in flight at the cut: owed, held)
                assert a.held and self.ledger.get(a.key, 0) in (0, 1), a
            names = {n for n, state in self.points.items()}
            assert set(copy.restore_points()) <= names
            if isinstance(point, str):
                assert point in copy.restore_points()
        finally:
            copy.close()
            shutil.rmtree(dest, ignore_errors=True)


ReplicaModel.TestCase.settings = _settings(15, 30)
TestReplicaModel = ReplicaModel.TestCase


FAULTS = st.sampled_from([
    ("pwrite", "*.wal"), ("fdatasync", "*.wal"), ("lmdb", "commit"),
    ("point", "commit.after_durable"), ("point", "undo.*")])


class FaultModel(AgentModel):
    """The same under durability="full", with one more step: an operation (a charge
    committed, a charge rolled back, a prepared charge committed, a revert, a rewind) run
    while a disk fault is armed (the Nth WAL write or fdatasync fails, the Nth LMDB commit
    fails, or the Nth hit of a point right after the commit point or inside an undo
    raises), then a crash and a reopen (recovery).  Whatever the operation raised, the
    state and the ledger agree after the reopen, as after every other step."""

    durability = "full"
    repeats_allowed = True  # (CompensationFailed: "they stay owed and run again, with the
    # same idempotency keys": a refund that ran but could not be recorded)

    @precondition(lambda self: self.tx is None)
    @rule(op=st.sampled_from(["commit", "rollback", "prepared", "revert", "rewind"]),
          fault=FAULTS, nth=st.integers(1, 4), data=st.data())
    def fault_during(self, op, fault, nth, data) -> None:
        fb = FaultBackend()
        kind, where = fault
        if kind == "lmdb":
            armed = fb.fail_lmdb(where, nth=nth)
        elif kind == "point":
            armed = fb.fail_point(where, nth=nth)
        else:
            armed = fb.fail(kind, errno.EIO, path=where, nth=nth)
        raised = None
        with installed(fb):
            try:
                self._faulty(op, data)
            except Exception as e:  # noqa: BLE001 - whatever it was, the reopen must agree
                raised = type(e).__name__
        event(f"{op}: {kind} {where} {'fired' if armed.fired else 'not reached'}, "
              f"raised {raised}")  # (--hypothesis-show-statistics)
        if self.tx is not None:
            self.tx = None  # (dropped with the store, as a killed process drops it)
        self.store._drop_like_a_crash()
        self.store = self._open()
        self.prepared = sorted(self.store.prepared())  # (a PREPARE may be in doubt now)

    def _faulty(self, op: str, data) -> None:
        if op == "revert":
            log = self.store.log(limit=6)
            if log:
                self.store.revert(data.draw(st.sampled_from([i.txid for i in log])))
            return
        if op == "rewind":
            if self.points:
                self.store.rewind(data.draw(st.sampled_from(sorted(self.points))))
            return
        self.tx = self.store.transaction()
        self.agent, self.tagged = "a/", False
        self.put("a/x")
        self.charge()
        tx, self.tx = self.tx, None
        if op == "commit":
            tx.commit()
        elif op == "rollback":
            tx.rollback()
        else:
            gid = f"g{self._fresh()}"
            tx.prepare(gid)
            self.store.commit_prepared(gid)


FaultModel.TestCase.settings = _settings(30, 30)
TestFaultModel = FaultModel.TestCase
