"""walstore.atomic(a, b): one commit across several stores, and its crash matrix.

The first store is the coordinator: both transactions are prepared (durably), then the
coordinator's commit is the decision.  A real child process (twophase_scripts/atomic_child.py)
runs ``with walstore.atomic(a, b)`` and is killed with SIGKILL at each step; the parent
reopens both stores and calls ``walstore.resolve_atomic(a, b)``: the end state is all
committed or all rolled back, never mixed, and committed exactly when the coordinator's
decision record reached its log.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import walstore

SCRIPTS = Path(__file__).resolve().parent / "twophase_scripts"


def _open(path, **kw):
    kw.setdefault("durability", "full")
    return walstore.open(str(path), **kw)


@pytest.fixture
def pair(tmp_path):
    a = _open(tmp_path / "a")
    b = _open(tmp_path / "b")
    for s, key in ((a, "a/x"), (b, "b/x")):
        with s.transaction() as tx:
            tx.put(key, "old")
    yield a, b
    a.close()
    b.close()


def test_atomic_commits_on_both(pair):
    a, b = pair
    group = walstore.atomic(a, b, meta={"op": "move"})
    with group as (ta, tb):
        ta.put("a/x", "new")
        tb.put("b/x", "new")
        assert a.get("a/x") == "old" and b.get("b/x") == "old"  # nothing visible yet
    assert a.get("a/x") == "new" and b.get("b/x") == "new"
    assert a.prepared() == [] and b.prepared() == []
    assert a.decision(group.gid) == "commit" and b.decision(group.gid) == "commit"
    assert a.log(limit=1)[0].meta == {"op": "move"}
    assert walstore.resolve_atomic(a, b) == {}


def test_atomic_exception_rolls_back_both(pair):
    a, b = pair
    with pytest.raises(RuntimeError, match="agent gave up"):
        with walstore.atomic(a, b) as (ta, tb):
            ta.put("a/x", "new")
            tb.put("b/x", "new")
            raise RuntimeError("agent gave up")
    assert a.get("a/x") == "old" and b.get("b/x") == "old"
    assert a.prepared() == [] and b.prepared() == []
    assert ta.state == tb.state == "rolled back"
    # nothing is held: plain transactions write the same keys
    with a.transaction() as t:
        t.put("a/x", "later")
    with b.transaction() as t:
        t.put("b/x", "later")


@pytest.mark.parametrize("loser", ["a", "b"])
def test_conflict_in_one_prepare_rolls_back_the_other(pair, loser):
    a, b = pair
    stores = {"a": a, "b": b}
    group = walstore.atomic(a, b)
    with pytest.raises(walstore.ConflictError):
        with group as (ta, tb):
            ta.put("a/x", ta.get("a/x") + "+1")
            tb.put("b/x", tb.get("b/x") + "+1")
            with stores[loser].transaction() as other:  # changes what the group read
                other.put(f"{loser}/x", "changed")
    expect = {"a": "old", "b": "old"}
    expect[loser] = "changed"
    assert a.get("a/x") == expect["a"] and b.get("b/x") == expect["b"]
    assert a.prepared() == [] and b.prepared() == []
    assert a.decision(group.gid) in (None, "abort")
    assert b.decision(group.gid) in (None, "abort")
    with a.transaction() as t:  # a's prepared hold (if any) was released
        t.put("a/x", "free")
    assert walstore.resolve_atomic(a, b) == {}


def test_atomic_needs_distinct_stores(pair):
    a, _b = pair
    with pytest.raises(ValueError):
        walstore.atomic(a, a)
    with pytest.raises(TypeError):
        walstore.atomic()


def test_resolve_atomic_after_in_process_failure_between_prepare_and_decision(pair):
    """Both prepared, the coordinator never decided (its commit failed): presumed abort."""
    a, b = pair
    group = walstore.atomic(a, b)
    ta, tb = group.__enter__()
    ta.put("a/x", "new")
    tb.put("b/x", "new")
    ta.prepare(group.gid)
    tb.prepare(group.gid)
    assert sorted(walstore.resolve_atomic(a, b).values()) == ["rolled back"]
    assert a.get("a/x") == "old" and b.get("b/x") == "old"
    assert a.prepared() == [] and b.prepared() == []


# ---- crash matrix with real processes ------------------------------------------------------

STEPS = {  # step -> was the coordinator's decision (its COMMIT record) logged?
    "in-body": False,
    "a-prepared": False,
    "b-prepared": False,
    "a-commit-written": True,   # appended, not fsynced: a process kill keeps the page cache
    "a-commit-synced": True,
    "a-committed": True,
    "b-committed": True,
}


def _seed_stores(tmp_path):
    pa, pb = tmp_path / "a", tmp_path / "b"
    with _open(pa) as a:
        with a.transaction() as tx:
            tx.put("a/x", "old")
            tx.put("a/y", "old")
            tx.put("a/gone", "here")
    with _open(pb) as b:
        with b.transaction() as tx:
            tx.put("b/x", "old")
            tx.put("b/total", 10)
    return pa, pb


def _end_state(a, b) -> str:
    new = (a.get("a/x") == "new", a.get("a/y") == "new", a.get("a/gone") is None,
           b.get("b/x") == "new", b.get("b/total") == 11)
    old = (a.get("a/x") == "old", a.get("a/y") == "old", a.get("a/gone") == "here",
           b.get("b/x") == "old", b.get("b/total") == 10)
    if all(new):
        return "committed"
    if all(old):
        return "rolled back"
    return f"MIXED new={new} old={old}"


@pytest.mark.parametrize("step", list(STEPS))
def test_sigkill_at_each_step_resolves_all_or_nothing(tmp_path, step):
    pa, pb = _seed_stores(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "atomic_child.py"), str(pa), str(pb),
                           step, "new"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert f"STEP {step}" in proc.stdout and "DONE" not in proc.stdout
    gid = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GID "))
    decided = STEPS[step]

    a, b = _open(pa), _open(pb)
    try:
        # what each store holds in doubt follows from the step
        in_doubt_a = step in ("a-prepared", "b-prepared")
        in_doubt_b = step in ("b-prepared", "a-commit-written", "a-commit-synced", "a-committed")
        assert a.prepared() == ([gid] if in_doubt_a else [])
        assert b.prepared() == ([gid] if in_doubt_b else [])
        assert (a.decision(gid) == "commit") == decided
        outcomes = walstore.resolve_atomic(a, b)
        if in_doubt_a or in_doubt_b:
            assert outcomes == {gid: "committed" if decided else "rolled back"}
        else:
            assert outcomes == {}
        assert _end_state(a, b) == ("committed" if decided else "rolled back")
        assert a.prepared() == [] and b.prepared() == []
        # resolving again is harmless
        assert walstore.resolve_atomic(a, b) == {}
        # no key stays held
        with a.transaction() as t:
            t.put("a/x", t.get("a/x"))
        with b.transaction() as t:
            t.put("b/x", t.get("b/x"))
    finally:
        a.close()
        b.close()
    a, b = _open(pa), _open(pb)  # the resolution itself is durable
    try:
        assert _end_state(a, b) == ("committed" if decided else "rolled back")
        assert a.prepared() == [] and b.prepared() == []
    finally:
        a.close()
        b.close()


def test_child_without_crash_commits(tmp_path):
    pa, pb = _seed_stores(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "atomic_child.py"), str(pa), str(pb),
                           "none", "new"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    with _open(pa) as a, _open(pb) as b:
        assert _end_state(a, b) == "committed"


def test_resolving_many_groups_in_doubt_costs_linear_in_them(pair, monkeypatch):
    """A coordinator that crashed with G atomic groups in doubt: ``resolve_atomic`` asked
    each participant for its whole sorted list of prepared gids once per gid (G x G gids
    passed over: minutes at tens of thousands); it asks per gid now.  Counted, not timed."""
    a, b = pair
    groups = 300
    for _ in range(groups):
        group = walstore.atomic(a, b)
        ta, tb = group.__enter__()
        ta.prepare(group.gid)
        tb.prepare(group.gid)
        # (never exited: as if the process died before deciding)
    listed = [0]
    real = type(b).prepared

    def counted(self):
        out = real(self)
        listed[0] += len(out)
        return out
    monkeypatch.setattr(type(b), "prepared", counted)
    outcomes = walstore.resolve_atomic(a, b)
    assert len(outcomes) == groups and set(outcomes.values()) == {"rolled back"}
    assert a.prepared() == [] and b.prepared() == []
    assert listed[0] <= 4 * groups, listed[0]
