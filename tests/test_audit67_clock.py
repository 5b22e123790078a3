"""The wall clock misbehaving: stepped back (an NTP step, a VM restored from a snapshot),
jumped forward, or two processes disagreeing (audit 67).

A step is simulated by replacing the ``time`` module a walstore module reads with one whose
``time()``/``time_ns()`` are offset (``Stepped``): the machine's clock is never touched.
Real stores, real files, ``file://`` replicas.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import time
import types

import pytest

import walstore
from walstore import clock
from walstore.engine import engine as engine_mod
from walstore.replication import lease as lease_mod
from walstore.replication import manifest as manifest_mod
from walstore.replication import shipper as shipper_mod

from test_cli_shown_times import _cli  # (the CLI in a subprocess, as there)
from test_replication_support import replica, s3_endpoint  # noqa: F401  (s3 and file)


_REAL_TIME, _REAL_TIME_NS = time.time, time.time_ns


class Stepped(types.ModuleType):
    """The ``time`` module with the wall clock off by ``offset`` seconds (monotonic and
    everything else as they are): put in place of one module's ``time``."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__("time")
        self.offset = offset

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self) -> float:
        return _REAL_TIME() + self.offset

    def time_ns(self) -> int:
        return _REAL_TIME_NS() + int(self.offset * 1e9)


def _step_everywhere(monkeypatch, offset: float) -> list:
    """The wall clock off by ``offset`` seconds for every reader in the process (what a
    step of the machine's clock is): ``time.time``/``time.time_ns`` replaced; the offset
    is ``box[0]`` of the list returned."""
    box = [offset]
    # (the deleting clock's anchor, which a step back moves, is put back after the test)
    monkeypatch.setattr(clock, "_anchor", clock._anchor)
    monkeypatch.setattr(clock, "_ahead_since", clock._ahead_since)
    monkeypatch.setattr(time, "time", lambda: _REAL_TIME() + box[0])
    monkeypatch.setattr(time, "time_ns", lambda: _REAL_TIME_NS() + int(box[0] * 1e9))
    return box


def _commit(s, key, value) -> walstore.TxnInfo:
    with s.transaction() as tx:
        tx.put(key, value)
    return s.log(limit=1)[0]


# ---- lag_seconds ----------------------------------------------------------------------
@contextlib.contextmanager
def _shipping_store(tmp_path):
    """A store shipping to a file replica every 30 s, its first round (at open) caught up;
    closed at the end."""
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 30})
    try:
        assert s.replication().lag_bytes == 0  # (the first round ran at open)
        yield s
    finally:
        s.close()


def test_lag_seconds_stays_the_age_of_the_unshipped_commit_across_a_clock_step(
        tmp_path, monkeypatch):
    """The clock stepped back an hour while a commit waited to be shipped: lag_seconds
    went to about -3600 s (counted as wall time now minus the commit's stamp); stepped
    forward an hour, +3600 s for a commit a second old.  The age is counted on the
    monotonic clock from the moment the lag was first seen."""
    with _shipping_store(tmp_path) as s:
        _commit(s, "a", 1)
        time.sleep(0.5)
        before = s.replication()
        assert before.lag_bytes > 0 and 0.3 <= before.lag_seconds <= 5, before
        for offset in (-3600.0, 3600.0):
            monkeypatch.setattr(shipper_mod, "time", Stepped(offset))
            st = s.replication()
            assert st.lag_bytes > 0, st
            assert before.lag_seconds <= st.lag_seconds <= before.lag_seconds + 5, \
                (offset, st.lag_seconds)
        monkeypatch.setattr(shipper_mod, "time", time)
        s.sync_replica(timeout=10)
        assert s.replication().lag_seconds == 0.0


def _snapshots(url: str) -> list:
    from walstore.replication.manifest import decode
    path = url[len("file://"):] + "/manifest"
    with open(path, "rb") as f:
        return decode(f.read(), url)["snapshots"]


def test_periodic_snapshots_go_on_after_the_clock_steps_back(tmp_path, monkeypatch):
    """``snapshot_interval`` 1 s, then the clock stepped back an hour: no snapshot was
    shipped for the hour (the newest one's stamp lay an hour ahead, its age negative),
    so a restore replayed ever more WAL.  A snapshot stamped ahead of the clock is due:
    the next one is taken at once, the interval counted from it."""
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 0.05, "snapshot_interval": 1})
    try:
        _commit(s, "a", 1)
        s.sync_replica(timeout=10)
        before = len(_snapshots(rep))
        monkeypatch.setattr(shipper_mod, "time", Stepped(-3600.0))
        _commit(s, "b", 2)
        deadline = time.monotonic() + 5
        while len(_snapshots(rep)) <= before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_snapshots(rep)) > before
    finally:
        s.close()


def test_a_forward_clock_jump_does_not_trim_the_replicas_history(tmp_path, monkeypatch):
    """``retention_seconds`` an hour, snapshots at every round; the shipper's clock jumped
    a day ahead (a bad NTP source, a VM's RTC), for a moment: retention dropped every
    snapshot but the newest and the WAL before it, for good — a restore to a time a minute
    earlier was refused as before the replica's first commit.  A deletion's clock is
    never later than the monotonic clock says since the process began: the jump trims
    nothing a correct clock keeps."""
    monkeypatch.setattr(shipper_mod, "RETENTION_EVERY", 0.0)
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 0.05, "snapshot_interval": 0,
                                         "retention_seconds": 3600, "retain_snapshots": 1,
                                         "delete_grace": 0})
    try:
        early = _commit(s, "a", 1)
        s.sync_replica(timeout=10)
        for i in range(3):
            _commit(s, "b", i)
            s.sync_replica(timeout=10)
        snaps = len(_snapshots(rep))
        assert snaps >= 2
        ahead = _step_everywhere(monkeypatch, 86400.0)
        _commit(s, "c", 1)
        s.sync_replica(timeout=10)
        time.sleep(0.3)  # (rounds with the clock ahead)
        ahead[0] = 0.0
        assert len(_snapshots(rep)) >= snaps
    finally:
        s.close()
    assert _restored(rep, str(tmp_path / "dest"), _just_after(early.timestamp)) == {"a": 1}


# ---- restore to a time ----------------------------------------------------------------
def _stepped_replica(tmp_path, monkeypatch, synced_after: tuple[str, ...],
                     replica) -> dict:
    """A replica (``replica``: the s3/file fixture) of commits a, b, c, then (the clock
    stepped back an hour) d, e; a WAL object ends after each key in ``synced_after``.
    Returns the stamps."""
    s = walstore.open(str(tmp_path / "src"), replicate_to=replica.url,
                      replicate_options=replica.opts(interval=30))
    stamps = {}
    try:
        for i, key in enumerate("abcde"):
            if key == "d":
                monkeypatch.setattr(engine_mod, "time", Stepped(-3600.0))
            stamps[key] = _commit(s, key, i + 1).timestamp
            if key == "b":
                time.sleep(0.01)
            if key in synced_after:
                s.sync_replica(timeout=10)
    finally:
        s.close()
        monkeypatch.setattr(engine_mod, "time", time)
    return stamps


def _restored(rep: str, dest: str, to: dt.datetime, options: dict | None = None) -> dict:
    walstore.restore(rep, dest, to=to, replicate_options=options)
    with walstore.open(dest) as r:
        return dict(r.scan())


def _just_after(stamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc) + dt.timedelta(microseconds=1)


@pytest.mark.parametrize("synced_after", [("c", "e"), ("b", "e")],
                         ids=["step-between-objects", "step-inside-the-later-object"])
def test_restore_to_a_time_the_stepped_clock_made_ambiguous_is_refused(
        tmp_path, monkeypatch, synced_after, replica):
    """Commits a, b, c, then the clock stepped back an hour, then d, e; WAL objects
    [a b c][d e] or [a b][c d e].  A restore to a time between b and c restored a..e: the
    cut was sought from the last WAL object whose first commit is at or before the time
    (the one holding d, its stamps an hour early), so c, stamped after the time, was in
    the copy — a state the source never held at that time by any clock.  The log holds
    commits stamped on both sides of that time in either order: refused (UnknownPoint)
    saying the clock stepped, nothing restored.  A time after every stamp restores all."""
    stamps = _stepped_replica(tmp_path, monkeypatch, synced_after, replica)
    dest = tmp_path / "dest"
    with pytest.raises(walstore.UnknownPoint, match="clock stepped back"):
        walstore.restore(replica.url, str(dest), to=_just_after(stamps["b"]),
                         replicate_options=replica.options)
    assert not dest.exists() or not any(dest.iterdir())
    assert _restored(replica.url, str(tmp_path / "end"), _just_after(stamps["c"]),
                     replica.options) == {k: i + 1 for i, k in enumerate("abcde")}


def test_restore_to_a_time_after_a_clock_ran_ahead_and_was_set_right_is_refused(
        tmp_path, monkeypatch):
    """Commit a; the clock ran a day ahead for a moment: commit b (stamped tomorrow); set
    right: commit c.  A restore to a time just after c restored only a, exit 0 (b,
    stamped tomorrow, ended the prefix): b and c, both committed before that time, were
    silently missing.  Refused, naming the record stamped later and the commit after it
    stamped earlier."""
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 30})
    try:
        _commit(s, "a", 1)
        ahead = _step_everywhere(monkeypatch, 86400.0)
        _commit(s, "b", 2)
        ahead[0] = 0.0
        c = _commit(s, "c", 3)
        s.sync_replica(timeout=10)
    finally:
        s.close()
    with pytest.raises(walstore.UnknownPoint, match=r"LSN \d+ is stamped"):
        walstore.restore(rep, str(tmp_path / "dest"), to=_just_after(c.timestamp))


def test_restore_to_a_time_no_prefix_of_the_log_matches_is_refused_clearly(tmp_path,
                                                                           monkeypatch):
    """The store's first commit c, then the clock stepped back an hour, then d: no prefix
    of the log is the state at a time between d and c (c, stamped later, comes first).
    Refused as a point naming no state (UnknownPoint), saying why, nothing restored;
    before, the copy held c and d."""
    rep = "file://" + str(tmp_path / "rep")
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 30})
    try:
        _commit(s, "c", 3)
        monkeypatch.setattr(engine_mod, "time", Stepped(-3600.0))
        d = _commit(s, "d", 4)
        s.sync_replica(timeout=10)
    finally:
        s.close()
    dest = tmp_path / "dest"
    with pytest.raises(walstore.UnknownPoint, match="stepped back"):
        walstore.restore(rep, str(dest), to=_just_after(d.timestamp))
    assert not dest.exists() or not any(dest.iterdir())


# ---- two clocks: the CLI's view of a replica written by a machine whose clock is ahead ---
def test_replicas_shows_a_writer_clock_ahead_as_such_not_a_negative_age(tmp_path,
                                                                        monkeypatch):
    """The replica's writer had a clock an hour ahead of this machine's (two machines
    disagree): ``walstore replicas URL`` said ``updated ... (-3600 s ago)``.  It says the
    time lies ahead of this machine's clock, by how much; ``--json`` keeps the signed
    ``age_seconds``."""
    rep = "file://" + str(tmp_path / "rep")
    monkeypatch.setattr(manifest_mod, "time", Stepped(3600.0))
    s = walstore.open(str(tmp_path / "src"), replicate_to=rep,
                      replicate_options={"interval": 30})
    try:
        _commit(s, "a", 1)
        s.sync_replica(timeout=10)
    finally:
        s.close()
    r = _cli("replicas", rep)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("updated"))
    assert "-" not in line.split("(")[1] and "ago" not in line, line
    assert re.search(r"\((3[56]\d\d) s ahead of this machine's clock", line), line
    got = json.loads(_cli("replicas", rep, "--json").stdout)
    assert -3700 < got["age_seconds"] < -3500, got


# ---- integrations -----------------------------------------------------------------------
def test_list_branches_in_order_of_creation_across_a_clock_step_back(store, monkeypatch):
    """``WalstoreSession.list_branches``: main first, then in order of creation.  A
    branch created after the clock stepped back an hour was listed before the one
    created just before the step (sorted by the wall-clock ns stamped at creation)."""
    pytest.importorskip("agents")
    import asyncio

    from walstore.integrations import openai_agents as oa

    async def go():
        s = oa.WalstoreSession("c", store)
        await s.add_items([{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}])
        await s.create_branch_from_turn(1, "first")
        await s.switch_to_branch("main")
        monkeypatch.setattr(oa, "time", Stepped(-3600.0))
        await s.create_branch_from_turn(1, "second")
        await s.switch_to_branch("main")
        await s.create_branch_from_turn(1, "third")
        return [b["branch_id"] for b in await s.list_branches()]

    assert asyncio.run(go()) == ["main", "first", "second", "third"]


def _saver_with_two_checkpoints(store):
    """A ``WalstoreSaver`` on ``store``, thread "t" given two checkpoints (ids from
    LangGraph's uuid6, clock_seq -1 and 0); returns the saver and the first's config."""
    from langgraph.checkpoint.base import id as lg_id
    from walstore.integrations.langgraph import WalstoreSaver
    from test_langgraph_saver import cfg, checkpoint

    saver = WalstoreSaver(store)
    first = saver.put(cfg("t"), checkpoint(x=1) | {"id": str(lg_id.uuid6(clock_seq=-1))},
                      {"source": "input", "step": -1}, {})
    saver.put(first, checkpoint(x=2) | {"id": str(lg_id.uuid6(clock_seq=0))},
              {"source": "loop", "step": 0}, {})
    return saver, first


@pytest.mark.parametrize("how", ["delete_thread", "rewind"])
def test_a_thread_run_again_after_a_removal_keeps_its_writes_across_a_clock_step_back(
        store, monkeypatch, how):
    """``delete_thread`` (or a rewind) of a thread, then the clock stepped back an hour,
    then the thread run again with durability="async": the pending writes of its new
    checkpoint, arriving before that checkpoint's save, were refused with
    StaleCheckpointError ("deleted while this run was working"): the removal was marked
    with the wall clock, and the new checkpoint's id (LangGraph's uuid6, made after it)
    carried a time an hour earlier.  The mark is taken from the same generator as the
    ids, which never goes back."""
    pytest.importorskip("langgraph.checkpoint.base")
    from langgraph.checkpoint.base import id as lg_id
    from test_langgraph_saver import cfg, checkpoint

    saver, first = _saver_with_two_checkpoints(store)
    time.sleep(0.01)
    if how == "delete_thread":
        saver.delete_thread("t")
    else:
        saver.rewind(first)
    monkeypatch.setattr(lg_id, "time", Stepped(-3600.0))
    cid = str(lg_id.uuid6(clock_seq=1))
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": cid}}
    saver.put_writes(config, [("msgs", ["early"])], "task-1")
    saver.put(first if how == "rewind" else cfg("t"), checkpoint(x=3) | {"id": cid},
              {"source": "loop", "step": 1}, {})
    assert saver.get_tuple(config).pending_writes == [("task-1", "msgs", ["early"])]


def test_a_memory_item_updated_after_a_clock_step_back_is_not_updated_before_it_was_made(
        store, monkeypatch):
    """``WalstoreStore``: an item put, the clock stepped back an hour, the item put again:
    its ``updated_at`` came an hour before its ``created_at`` (kept from the first put).
    An update is never dated before the item's previous version."""
    pytest.importorskip("langgraph.store.base")
    from walstore.integrations.langgraph import store as lg_store

    mem = lg_store.WalstoreStore(store)
    mem.put(("users", "u1"), "prefs", {"theme": "dark"})
    first = mem.get(("users", "u1"), "prefs")
    monkeypatch.setattr(lg_store, "time", Stepped(-3600.0))
    mem.put(("users", "u1"), "prefs", {"theme": "light"})
    item = mem.get(("users", "u1"), "prefs")
    assert item.value == {"theme": "light"}
    assert item.created_at == first.created_at
    assert item.updated_at >= first.updated_at >= item.created_at, (item.created_at,
                                                                    item.updated_at)


# ---- the lease between two clocks -------------------------------------------------------
def test_a_writer_whose_clock_runs_ahead_takes_the_lease_and_the_live_holder_stops(
        tmp_path, monkeypatch):
    """Found right (documented): a second shipper of the same store on a machine whose
    clock runs ``lease_ttl`` ahead sees the live holder's lease expired and takes it; the
    holder stops "lease-lost" at its next write (If-Match on the lease and manifest), never
    shipping into the successor's replica: one writer at a time, one consistent replica."""
    from walstore.replication.shipper import Shipper
    from walstore.replication.source import DirectorySource
    from walstore.replication.lease import LeaseLost

    rep = "file://" + str(tmp_path / "rep")
    path = str(tmp_path / "src")
    s = walstore.open(path, replicate_to=rep,
                      replicate_options={"interval": 30, "lease_ttl": 90})
    try:
        _commit(s, "a", 1)
        s.sync_replica(timeout=10)
        holder = s._shipper
        monkeypatch.setattr(lease_mod, "time", Stepped(200.0))  # (the taker's clock)
        taker = Shipper(DirectorySource(path), rep, {"interval": 30, "lease_ttl": 90})
        try:
            taker.ship_once()
            monkeypatch.setattr(lease_mod, "time", time)
            _commit(s, "b", 2)
            with pytest.raises(LeaseLost):
                holder.ship_once()
            with pytest.raises(walstore.ReplicationError, match="lease of .* is now held by"):
                s.sync_replica(timeout=10)  # (its background round meets the same)
            assert s.replication().state == "lease-lost"
            taker.ship_once()
        finally:
            taker.stop()
            taker.close()
    finally:
        s.close()
    assert _restored(rep, str(tmp_path / "dest"), None) == {"a": 1, "b": 2}


# ---- retention by age ---------------------------------------------------------------------
def test_retention_by_age_trims_nothing_a_correct_clock_keeps_after_a_step_back(
        tmp_path, monkeypatch):
    """Found right (documented): ``retain_seconds`` 0.5; two commits, the clock (commits'
    and retention's) stepped back an hour, two more: the trim keeps all four (none is 0.5 s
    old by either clock's count since the step); once the first two are 0.5 s old by the
    real clock they stay until the stepped clock passes their stamps — longer, never
    shorter — and the horizon never moves back."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_seconds=0.5) as s:
        first = [_commit(s, "k", i) for i in range(2)]
        _step_everywhere(monkeypatch, -3600.0)
        later = [_commit(s, "k", 10 + i) for i in range(2)]
        s.checkpoint()
        assert [i.txid for i in s.log()] == [t.txid for t in reversed(first + later)]
        time.sleep(0.6)
        s.checkpoint()
        assert [i.txid for i in s.log()] == [t.txid for t in reversed(first + later)]
        assert s.at(first[0].txid).get("k") == 0


def test_a_forward_clock_jump_does_not_trim_history_kept_by_age(tmp_path, monkeypatch):
    """``retain_seconds`` an hour; the clock jumped a day ahead for a moment, and a
    checkpoint ran then: every commit looked a day old and the whole history was trimmed
    (``at`` of a commit a second old raised HistoryTrimmed).  A deletion's clock is never
    later than the monotonic clock says: nothing a correct clock keeps is trimmed."""
    with walstore.open(str(tmp_path / "s"), durability="none", retain_seconds=3600) as s:
        first = [_commit(s, "k", i) for i in range(3)]
        ahead = _step_everywhere(monkeypatch, 86400.0)
        _commit(s, "k", 3)
        s.checkpoint()
        ahead[0] = 0.0
        assert len(s.log()) == 4
        assert s.at(first[0].txid).get("k") == 0


def test_a_purge_of_the_thread_after_this_process_marked_it_still_refuses_early_writes(
        store):
    """(Kept by the fix above.)  A rewind of the thread in this process (its mark), then a
    new checkpoint id, then ``store.purge`` of the thread's prefix straight on the store
    (not through the saver: no mark): that checkpoint's early pending writes are refused,
    the log read after the mark's LSN finding the purge."""
    pytest.importorskip("langgraph.checkpoint.base")
    from langgraph.checkpoint.base import id as lg_id
    from walstore.integrations.langgraph import StaleCheckpointError

    saver, first = _saver_with_two_checkpoints(store)
    saver.rewind(first)
    cid = str(lg_id.uuid6(clock_seq=1))
    time.sleep(0.01)
    store.purge(saver.thread_scope("t"))
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": cid}}
    with pytest.raises(StaleCheckpointError):
        saver.put_writes(config, [("msgs", ["late"])], "task-1")
    assert list(store.scan(prefix=saver.thread_scope("t"))) == []


def test_lag_seconds_of_a_commit_stamped_by_a_clock_set_right_since_is_its_real_age(
        tmp_path, monkeypatch):
    """A commit stamped while the clock ran a day behind (then set right): lag_seconds
    said a day for a commit a second old.  The shipper was caught up a moment before it
    was logged: the lag is never more than the monotonic time since then."""
    with _shipping_store(tmp_path) as s:
        monkeypatch.setattr(engine_mod, "time", Stepped(-86400.0))
        _commit(s, "a", 1)
        monkeypatch.setattr(engine_mod, "time", time)
        st = s.replication()
        assert st.lag_bytes > 0 and 0 <= st.lag_seconds < 30, st
