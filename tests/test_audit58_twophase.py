r"""Audit 58 (probe3): two-phase commit and the coordinator (CONTRACT section 2, "Two-phase
commit"), as a demanding user coordinating several stores: prepares killed at each step,
decisions recovered, in-doubt transactions resolved from the CLI, many held at once.

Findings (each test named below fails on the code before its fix):

- Every in-doubt transaction's written values stayed in memory for as long as it was in
  doubt: the prepared set (which needs only the keys, for the holds) kept the whole write
  set of each, from the prepare on, and every writable open loaded all of them at once
  (a dict of every prepared row).  300 in doubt writing 1 MiB each: an open took 530 MB
  of anonymous memory before it returned.  The prepared set keeps keys now; the values
  stay in the log and LMDB and are read, one transaction at a time, by
  ``commit_prepared`` and ``prepared_details``
  (``test_an_open_holds_no_in_doubt_values_in_memory``,
  ``test_a_writer_holds_no_values_of_what_it_prepared``); ``rollback_prepared`` and
  ``decision`` answer from the keys alone (the first fix had them read the whole row:
  ``test_rolling_back_or_asking_about_a_big_in_doubt_transaction_reads_none_of_its_values``).
- ``walstore.resolve_atomic(b, a, c)`` — the coordinator not given first — looked only at
  groups led by ``b``, returned ``{}`` and left every store in doubt, holding its keys:
  the caller was told there was nothing to resolve.  A group's gid names its coordinator
  (``atomic-<store id>-...``): it is found among the stores given, in any order; a group
  whose coordinator is not given stays in doubt
  (``test_resolve_atomic_finds_the_coordinator_whatever_the_order``: an atomic group of
  three stores killed by SIGKILL before and after its decision).
- ``walstore prepared`` (and ``recover``) showed a gid a terminal cannot show as a JSON
  string (``"a\nb"``), but ``commit-prepared PATH '"a\nb"'`` took that text as the gid:
  UnknownGid, exit 2; a gid holding a NUL (no argv can carry one) could not be decided
  from the CLI at all; " g " was shown as ``g`` (naming nothing) and a gid that is itself
  quoted looked like another's JSON form.  Those are shown as JSON strings now, and the
  2PC verbs take a GID in the form shown (the text as typed wins when it is itself a
  prepared gid) (``test_every_gid_walstore_prepared_lists_can_be_decided_from_the_cli``;
  ``test_a_gid_that_is_itself_json_text_is_taken_as_typed`` guards the precedence).
- ``commit_prepared`` / ``rollback_prepared`` (and their CLI verbs) of a gid committed or
  rolled back before said "no prepared transaction with gid 'g'", word for word what a
  gid never prepared gets: a coordinator retrying its decision after a crash could not
  tell "done already" from "the prepare was lost".  The refusal (UnknownGid; exit 2)
  says how the gid ended now, or that none was prepared or decided under it
  (``test_deciding_a_gid_decided_already_says_how_it_ended``).
- One ``walstore.atomic(a, b)`` object entered a second time kept the first use's
  progress and gid: after a first use that rolled back, a second whose prepare at ``b``
  was refused skipped the rollback of ``a`` (left prepared, in doubt, holding its keys,
  its charge not refunded) and raised the ConflictError as if every participant had
  rolled back; after a first use that prepared, the second was refused "gid ... is
  already used".  Each ``with`` is a group of its own now, with a fresh gid
  (``test_an_atomic_group_used_again_rolls_every_participant_back_when_a_prepare_fails``).
- The first file operation after an open claims the paths of the transactions in doubt,
  iterating the prepared set under the files lock while the set changes under the
  journal lock: another thread's prepare (or decision) in that loop raised a bare
  "RuntimeError: dictionary changed size during iteration" out of ``f.write``, and the
  seeding, marked done first, stayed half done for good — a path of a transaction in
  doubt could then be written and committed by another transaction (its rollback then
  reported a file conflict: the stranger's version stayed).  The loop walks a copy now
  (``test_a_prepare_beside_the_first_file_operation_leaves_every_claim_seeded``; the
  other thread's prepare is made to land in the loop by a trace hook).
- ``rewind(..., dry_run=True)`` read the prepared holds (``PreparedSet.check``) without
  the journal lock, under which prepares and decisions change them: another thread's
  prepare of a transaction that scanned a range, landing in the check's walk over those
  ranges, raised a bare "RuntimeError: dictionary changed size during iteration" out of
  the dry run.  It reads them under the lock now
  (``test_a_dry_run_beside_a_prepare_reads_the_holds_under_the_lock``; a trace hook
  makes the other thread's prepare land there).
- A dry run on a read-only handle — what ``walstore rewind --dry-run`` opens — checked
  the keys it would put back against the handle's in-memory prepared set, which stays
  empty there: it returned the plan (exit 0) that the real ``walstore rewind`` refused
  (ConflictError, exit 1: a key held by a transaction in doubt).  A read-only dry run
  builds the holds from the prepared rows, keys only
  (``test_a_read_only_dry_run_sees_the_holds_of_transactions_in_doubt``).
- `walstore verify` of a cleanly closed store holding a prepared transaction that
  changed a file said "file undo owed: 1 file change(s) of transaction 1 ... were not put
  back (the next open tries again)" beside the gid in doubt: false (they are held until
  the decision; no open puts them back) — it asked a read-only handle's in-memory
  prepared set, which stays empty, for the txids in doubt.  They come from the prepared
  rows now
  (``test_verify_does_not_call_the_file_changes_of_a_transaction_in_doubt_owed``).
- `walstore recover` lists the gids in doubt joined by ", ": a gid "a, b" beside "c" read
  "a, b, c", three gids none of which is "a, b".  A gid holding a comma is shown as a JSON
  string (``test_recover_lists_a_gid_holding_a_comma_as_one_gid``).

Real stores, real child processes; nothing of walstore is mocked.
- ``tx.prepare("")`` and a gid past 200 bytes raised a bare TypeError (the right type, a
  bad value): an ``EmptyArgumentError`` now, a ValueError and a TypeError both, as an empty
  restore point name's (``test_a_str_gid_of_a_bad_length_is_a_value_error_too``; the
  lead's, from this audit's notes).
"""
from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

import walstore

MIB = 1 << 20


def _value(i: int) -> bytes:
    return bytes([i % 251]) * MIB


def _open_in_child(path) -> dict:
    """Open the store in a fresh process: the memory Python holds once the open returned
    (and its peak during the open), and what it sees in doubt."""
    code = textwrap.dedent(f"""
        import json, tracemalloc, walstore
        tracemalloc.start()
        store = walstore.open({str(path)!r})
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(json.dumps({{"held": held, "peak": peak, "in_doubt": len(store.prepared())}}))
        store.close()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_open_holds_no_in_doubt_values_in_memory(tmp_path):
    path = tmp_path / "store"
    n = 120  # 120 MiB of values in doubt
    with walstore.open(str(path), durability="none") as s:
        for i in range(n):
            tx = s.transaction()
            tx.put(f"k/{i}", _value(i))
            tx.put(f"small/{i}", i)
            tx.prepare(f"g{i}")
    seen = _open_in_child(path)
    assert seen["in_doubt"] == n
    # (before: the open kept every value, 120 MiB, and held them all at once in a dict)
    assert seen["held"] < 10 * MIB and seen["peak"] < 30 * MIB, seen
    # the values are all still there for the decisions, before and after a reopen
    with walstore.open(str(path)) as s:
        assert len(s.prepared_details("g3").writes) == 2
        for i in range(0, n, 2):
            s.commit_prepared(f"g{i}")
    with walstore.open(str(path)) as s:
        for i in range(1, n, 2):
            s.rollback_prepared(f"g{i}")
        assert s.prepared() == []
        for i in (0, 2, n - 2):
            assert s.get(f"k/{i}") == _value(i) and s.get(f"small/{i}") == i
        for i in (1, n - 1):
            assert s.get(f"k/{i}") is None and s.get(f"small/{i}") is None


def test_a_writer_holds_no_values_of_what_it_prepared(tmp_path):
    path = tmp_path / "store"
    n = 40
    with walstore.open(str(path), durability="none") as s:
        tracemalloc.start()
        try:
            for i in range(n):
                tx = s.transaction()
                tx.put(f"k/{i}", _value(i))
                tx.prepare(f"g{i}")
                del tx
            s.checkpoint()  # (applied: the log's events leave memory)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert held < 10 * MIB, held  # (before: every value, 40 MiB)
        # the decisions still commit the values (and the holds still hold)
        for i in range(n):
            s.commit_prepared(f"g{i}")
        assert all(s.get(f"k/{i}") == _value(i) for i in range(n))


# ---- resolve_atomic: the coordinator is the one the gid names ------------------------------

_ATOMIC_CHILD = textwrap.dedent("""
    import os, signal, sys
    import walstore
    from walstore.engine.transaction import Transaction
    paths, die_at = sys.argv[1:4], sys.argv[4]
    stores = [walstore.open(p) for p in paths]
    coordinator = stores[0]._engine
    real = Transaction.commit

    def commit(self):
        if die_at == "before-decision" and self._engine is coordinator:
            os.kill(os.getpid(), signal.SIGKILL)
        lsn = real(self)
        if die_at == "after-decision" and self._engine is coordinator:
            os.kill(os.getpid(), signal.SIGKILL)
        return lsn

    Transaction.commit = commit
    with walstore.atomic(*stores) as txs:
        for tx in txs:
            tx.put("x", die_at)
    print("NOT KILLED", flush=True)
""")


def _atomic_killed(tmp_path, die_at: str) -> list:
    paths = [str(tmp_path / name) for name in ("coord", "p1", "p2")]
    proc = subprocess.run([sys.executable, "-c", _ATOMIC_CHILD, *paths, die_at],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)
    return [walstore.open(p) for p in paths]


def test_resolve_atomic_finds_the_coordinator_whatever_the_order(tmp_path):
    """resolve_atomic(b, a, c) — the coordinator not first — returned {} and left every
    store in doubt, holding its keys: the caller was told nothing was left to resolve."""
    for die_at, outcome, value in (("before-decision", "rolled back", None),
                                   ("after-decision", "committed", "after-decision")):
        coord, p1, p2 = stores = _atomic_killed(tmp_path / die_at, die_at)
        try:
            gids = coord.prepared() if die_at == "before-decision" else p1.prepared()
            assert len(gids) == 1 and p2.prepared() == gids
            assert walstore.resolve_atomic(p1, coord, p2) == {gids[0]: outcome}
            assert [s.prepared() for s in stores] == [[], [], []]
            assert [s.get("x") for s in stores] == [value] * 3
            assert {s.decision(gids[0]) for s in stores} == {
                "commit" if value else "abort"}
        finally:
            for s in stores:
                s.close()


# ---- the CLI: every gid it lists can be typed back -----------------------------------------

def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstore", *args], capture_output=True,
                          text=True, timeout=120)


def test_every_gid_walstore_prepared_lists_can_be_decided_from_the_cli(tmp_path):
    """`walstore prepared` showed a gid a terminal cannot show as a JSON string ("a\\nb"),
    but `commit-prepared PATH '"a\\nb"'` took that text as the gid itself: UnknownGid,
    exit 2 — and one holding a NUL (which no argv can carry) could not be decided from
    the CLI at all.  A gid with spaces at its ends was shown bare (" g " as "g", which
    names nothing), and a gid that is itself quoted ('"q"') looked like the JSON form of
    another.  The listing quotes all of those now, and a GID given in the JSON form the
    listing shows names the gid it spells when no prepared gid is that text itself."""
    path = str(tmp_path / "store")
    long = "\u00e9" * 99 + "\n"  # (199 bytes; its JSON form is 600 characters)
    odd = ["a\nb", " g ", "x\x00y", '"q"', long, "plain"]
    with walstore.open(path) as s:
        for i, gid in enumerate(odd):
            tx = s.transaction()
            tx.put(f"k{i}", i)
            tx.prepare(gid)
    listed = _cli("prepared", path)
    assert listed.returncode == 1
    shown = [line.split("  ")[0] for line in listed.stdout.splitlines()[1:]]
    assert sorted(shown) == sorted(['"a\\nb"', '" g "', '"x\\u0000y"', '"\\"q\\""',
                                    json.dumps(long), "plain"]), listed.stdout
    for text in shown:  # each typed back as shown
        verb = "rollback-prepared" if text == "plain" else "commit-prepared"
        done = _cli(verb, path, text)
        assert done.returncode == 0, (text, done.stdout, done.stderr)
        assert text in done.stdout
    with walstore.open(path) as s:
        assert s.prepared() == []
        assert [s.decision(g) for g in odd] == ["commit"] * 5 + ["abort"]
        assert [s.get(f"k{i}") for i in range(len(odd))] == [0, 1, 2, 3, 4, None]


def test_a_gid_that_is_itself_json_text_is_taken_as_typed(tmp_path):
    """The gid typed as it is wins over the one its JSON form spells."""
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        for gid in ('"q"', "q"):
            tx = s.transaction()
            tx.put(gid, 1)
            tx.prepare(gid)
    done = _cli("commit-prepared", path, '"q"')
    assert done.returncode == 0, done.stderr
    with walstore.open(path) as s:
        assert s.prepared() == ["q"] and s.decision('"q"') == "commit"


# ---- deciding a gid that is not in doubt says what became of it ----------------------------

def test_deciding_a_gid_decided_already_says_how_it_ended(tmp_path):
    """commit_prepared / rollback_prepared of a gid committed or rolled back before said
    "no prepared transaction with gid 'g'", word for word what a gid never prepared gets:
    a coordinator retrying after a crash could not tell "done already" from "the prepare
    was lost", nor could an operator re-running `walstore commit-prepared`."""
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        for gid in ("c", "r"):
            tx = s.transaction()
            tx.put(gid, 1)
            tx.prepare(gid)
        s.commit_prepared("c")
        s.rollback_prepared("r")
        said = {}
        for call in (s.commit_prepared, s.rollback_prepared):
            for gid in ("c", "r", "never"):
                try:
                    call(gid)
                except walstore.UnknownGid as e:
                    said[call.__name__, gid] = str(e)
        for name in ("commit_prepared", "rollback_prepared"):
            assert "committed already" in said[name, "c"], said
            assert "rolled back already" in said[name, "r"], said
            assert "none was prepared or decided" in said[name, "never"], said
        assert s.get("c") == 1 and s.get("r") is None
    out = _cli("commit-prepared", path, "c")
    assert out.returncode == 2 and "committed already" in out.stderr, out.stderr
    out = _cli("rollback-prepared", path, "r")
    assert out.returncode == 2 and "rolled back already" in out.stderr, out.stderr


def test_rolling_back_or_asking_about_a_big_in_doubt_transaction_reads_none_of_its_values(
        tmp_path):
    """A writer's rollback_prepared and decision of an in-doubt transaction need its keys
    only (the prepared set's); with the values kept out of memory they must not read its
    row, values and all, for the answer (a 100 MiB one: 100 MiB read per call)."""
    path = tmp_path / "store"
    with walstore.open(str(path), durability="none") as s:
        tx = s.transaction()
        for i in range(60):
            tx.put(f"big/{i}", _value(i))
        tx.prepare("big")
        del tx
    with walstore.open(str(path)) as s:
        gc.collect()
        tracemalloc.start()
        try:
            assert s.decision("big") == "prepared" and s.prepared() == ["big"]
            s.rollback_prepared("big")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 10 * MIB, peak
        assert s.get("big/1") is None and s.decision("big") == "abort"


# ---- an atomic group object used for several ``with`` blocks --------------------------------

def test_an_atomic_group_used_again_rolls_every_participant_back_when_a_prepare_fails(
        tmp_path):
    """``group = walstore.atomic(a, b)`` entered a second time kept the first use's
    progress: after a first use that rolled back, a second whose prepare at ``b`` was
    refused skipped the rollback of ``a`` — left prepared, in doubt, holding its keys,
    its charge not refunded — and the caller got the ConflictError as if every
    participant had rolled back.  After a first use that prepared, the second was refused
    "gid ... is already used".  Each ``with`` is a group of its own now (a fresh gid)."""
    refunds = []
    a = walstore.open(str(tmp_path / "a"), compensators={"refund": refunds.append})
    b = walstore.open(str(tmp_path / "b"))
    try:
        holder = b.transaction()
        holder.put("x", 0)
        holder.prepare("holder")  # (b's prepare of "x" is refused while this holds it)
        group = walstore.atomic(a, b)
        with pytest.raises(KeyError):
            with group as (ta, tb):
                ta.put("y", 1)
                raise KeyError("the body failed")
        with pytest.raises(walstore.ConflictError):
            with group as (ta, tb):
                with ta.action("charge", compensate="refund") as act:
                    act.result = 1
                ta.put("y", 2)
                tb.put("x", 2)
        assert a.prepared() == [] and b.prepared() == ["holder"]
        assert [r.id for r in refunds] == [act.id] and a.get("y") is None
        b.rollback_prepared("holder")
        first = group.gid
        with group as (ta, tb):  # a group that prepared may be used again too
            ta.put("y", 3)
            tb.put("x", 3)
        assert group.gid != first and a.decision(first) == "abort"
        with group as (ta, tb):
            ta.put("y", 4)
            tb.put("x", 4)
        assert (a.get("y"), b.get("x")) == (4, 4)
        assert a.prepared() == [] and b.prepared() == []
    finally:
        a.close()
        b.close()


# ---- the file claims of transactions in doubt at open ---------------------------------------

def test_a_prepare_beside_the_first_file_operation_leaves_every_claim_seeded(tmp_path):
    """The first file operation after an open claims the paths of the transactions in
    doubt (``Files._seed_claims``), iterating the prepared set under the files lock; the
    set is changed under the journal lock, so another thread's prepare in that loop
    raised "dictionary changed size during iteration" (a bare RuntimeError out of
    ``f.write``), and the seeding, marked done before the loop, stayed half done: a path
    of a transaction in doubt could be overwritten and committed by another one.  The
    other thread's prepare is made to land in the loop by a trace hook (a real thread,
    real stores)."""
    import threading
    root = tmp_path / "ws"
    root.mkdir()
    (root / "held.txt").write_text("before")
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        for i in range(3):
            tx = s.transaction()
            tx.put(f"k{i}", i)
            tx.prepare(f"plain{i}")
        tx = s.transaction()
        tx.files(ws).write("held.txt", "prepared")
        tx.prepare("files")
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        landed = []

        def other():
            t = s.transaction()
            t.put("other", 1)
            t.prepare("other")

        def tracer(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_add_holds" and not landed:
                th = threading.Thread(target=other)
                th.start()
                th.join(30)
                landed.append(not th.is_alive())
            return None

        sys.settrace(tracer)
        try:
            with s.transaction() as t:
                t.files(ws).write("new.txt", "x")
        finally:
            sys.settrace(None)
        assert landed == [True]
        assert sorted(s.prepared()) == ["files", "other", "plain0", "plain1", "plain2"]
        with pytest.raises(walstore.ConflictError):  # still held by "files", in doubt
            with s.transaction() as t:
                t.files(ws).write("held.txt", "stranger")
        assert (root / "held.txt").read_text() == "prepared"
        s.rollback_prepared("files")
        assert (root / "held.txt").read_text() == "before"


# ---- a dry run's look at the prepared holds ------------------------------------------------

def test_a_dry_run_beside_a_prepare_reads_the_holds_under_the_lock(tmp_path):
    """``rewind(..., dry_run=True)`` checks the keys it would put back against the
    prepared holds (``PreparedSet.check``), which the prepared set documents as read
    under the journal lock, as prepares and decisions change it; the dry run read it
    without the lock, and another thread's prepare of a transaction that scanned a range,
    landing in its walk over those ranges, raised a bare "RuntimeError: dictionary
    changed size during iteration" out of the dry run.  The other thread's prepare is
    made to land there by a trace hook (a real thread, a real store)."""
    import inspect
    import threading
    from walstore.engine import conflicts
    lines, first = inspect.getsourcelines(conflicts.PreparedSet.check)
    walk = first + next(i for i, text in enumerate(lines)
                        if "for k in writes if k in read_ranges" in text)
    with walstore.open(str(tmp_path / "store")) as s:
        with s.transaction() as t:
            t.put("a", 1)
        s.restore_point("rp")
        with s.transaction() as t:
            t.put("a", 2)
        p1 = s.transaction()
        list(p1.scan(prefix="other/"))
        p1.put("other/x", 1)
        p1.prepare("scanned-1")
        landed = []

        def other():
            p2 = s.transaction()
            list(p2.scan(prefix="more/"))
            p2.put("more/y", 1)
            p2.prepare("scanned-2")

        def at_the_walk(frame, event, arg):
            if event == "line" and frame.f_lineno == walk and not landed:
                th = threading.Thread(target=other)
                th.start()
                th.join(1.0)  # (held out by the lock once it is taken: on after a second)
                landed.append(th)
            return at_the_walk

        def tracer(frame, event, arg):
            # (the walk's line in check's own frame: Python 3.12 inlines comprehensions,
            # so the walk has no frame of its own to be called)
            return at_the_walk if frame.f_code is conflicts.PreparedSet.check.__code__ else None

        sys.settrace(tracer)
        try:
            plan = s.rewind("rp", dry_run=True)
        finally:
            sys.settrace(None)
        assert len(landed) == 1
        landed[0].join(30)
        assert not landed[0].is_alive()
        assert plan.keys == ["a"]
        assert sorted(s.prepared()) == ["scanned-1", "scanned-2"]
        s.rollback_prepared("scanned-1")
        s.rollback_prepared("scanned-2")


def test_a_read_only_dry_run_sees_the_holds_of_transactions_in_doubt(tmp_path):
    """A dry run on a writer raises ConflictError when a key it would put back is held by
    a transaction in doubt (the real rewind's answer); on a read-only handle — what
    `walstore rewind --dry-run` opens — the prepared set it checked stays empty: it
    returned the plan, exit 0, and the real `walstore rewind` then failed, exit 1."""
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        with s.transaction() as t:
            t.put("a", 1)
        s.restore_point("rp")
        with s.transaction() as t:
            t.put("a", 2)
        p = s.transaction()
        p.get("a")  # (held: read by the transaction in doubt)
        p.put("b", 1)
        p.prepare("G")
    with walstore.open(path, readonly=True) as ro:
        with pytest.raises(walstore.ConflictError, match="'G'"):
            ro.rewind("rp", dry_run=True)
    dry = _cli("rewind", path, "--to", "rp", "--dry-run")
    real = _cli("rewind", path, "--to", "rp")
    assert dry.returncode == real.returncode == 1, (dry.stdout, dry.stderr)
    assert "held by prepared" in dry.stderr and "held by prepared" in real.stderr
    with walstore.open(path) as s:
        assert s.get("a") == 2 and s.prepared() == ["G"]
        s.rollback_prepared("G")
    dry = _cli("rewind", path, "--to", "rp", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["plan"]["keys"] == ["a"]


def test_verify_does_not_call_the_file_changes_of_a_transaction_in_doubt_owed(tmp_path):
    """`walstore verify` of a cleanly closed store holding a prepared transaction that
    changed a file said, beside the gid in doubt, "file undo owed: 1 file change(s) of
    transaction 1 ... were not put back (the next open tries again)": false — they are
    held until the decision, and no open puts them back (the read-only handle it asked
    for the txids in doubt keeps no prepared set)."""
    root = tmp_path / "ws"
    root.mkdir()
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        ws = s.workspace(str(root))
        tx = s.transaction()
        tx.files(ws).write("f.txt", "prepared")
        tx.prepare("G")
    out = _cli("verify", path, "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and doc["in_doubt"] == ["G"], out.stdout
    assert doc["owed_file_undos"] == [], doc["owed_file_undos"]
    human = _cli("verify", path)
    assert "file undo owed" not in human.stdout and "transaction G:" in human.stdout
    with walstore.open(path) as s:
        s.rollback_prepared("G")
    assert not (root / "f.txt").exists()
    out = _cli("verify", path, "--json")
    assert out.returncode == 0, out.stdout


def test_recover_lists_a_gid_holding_a_comma_as_one_gid(tmp_path):
    """`walstore recover` lists the gids in doubt joined by ", ": "a, b" and "c" read
    "a, b, c" — three gids, none of them "a, b".  A gid holding a comma is shown as a JSON
    string now (which the 2PC verbs take back)."""
    path = str(tmp_path / "store")
    with walstore.open(path) as s:
        for gid in ("a, b", "c"):
            tx = s.transaction()
            tx.put(gid, 1)
            tx.prepare(gid)
    out = _cli("recover", path)
    assert out.returncode == 1
    line = next(x for x in out.stdout.splitlines() if x.startswith("in-doubt"))
    assert line.endswith(': "a, b", c'), line
    done = _cli("rollback-prepared", path, '"a, b"')
    assert done.returncode == 0, done.stderr
    with walstore.open(path) as s:
        assert s.prepared() == ["c"] and s.decision("a, b") == "abort"


def test_a_str_gid_of_a_bad_length_is_a_value_error_too(tmp_path):
    """(h3's note, fixed by the lead) ``tx.prepare("")`` and a 201-byte gid raised a bare
    TypeError: the right type with a bad value is a ValueError too (as an empty key's),
    still a TypeError for callers that caught that."""
    with walstore.open(str(tmp_path / "s"), durability="none") as s:
        tx = s.transaction()
        tx.put("a", 1)
        for gid in ("", "x" * 201, "é" * 101):
            with pytest.raises(ValueError, match="gid") as e:
                tx.prepare(gid)
            assert isinstance(e.value, TypeError)
            with pytest.raises(ValueError, match="gid"):
                s.commit_prepared(gid)
        with pytest.raises(TypeError, match="gid") as e:
            tx.prepare(b"bytes")
        assert not isinstance(e.value, ValueError)
        tx.prepare("x" * 200)
        s.commit_prepared("x" * 200)
        assert s.get("a") == 1


def test_the_cli_decides_an_atomic_group_whole_and_refuses_a_participant_alone(tmp_path):
    """(h3's note, fixed by the lead) `walstore prepared` and `recover` listed a
    walstore.atomic group's gid on each participant and invited `rollback-prepared`,
    and nothing on the command line read the coordinator's decision: an operator
    rolling back a participant whose coordinator had committed ran its refund while the
    charge stood elsewhere — the group mixed.  Deciding a participant alone is refused
    now (exit 2, naming the coordinator and `resolve-atomic`; `--force` still does it),
    the coordinator's own decision is not, and `walstore resolve-atomic PATH...` decides
    every group the given stores coordinate (exit 1 while one stays in doubt)."""
    # the coordinator decided commit, the participants still in doubt
    paths, gid = _killed_group(tmp_path / "after", "after-decision")
    r = _cli("rollback-prepared", paths[1], gid)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "resolve-atomic" in r.stderr and "coordinated by store" in r.stderr
    r = _cli("commit-prepared", paths[2], gid)
    assert r.returncode == 2 and "resolve-atomic" in r.stderr, (r.stdout, r.stderr)
    # without the coordinator: nothing decided, said, exit 1
    r = _cli("resolve-atomic", paths[1], paths[2], "--json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["groups"] == [] and doc["in_doubt"] == [gid]
    # with it, in any order: the coordinator's decision followed
    r = _cli("resolve-atomic", paths[2], paths[0], paths[1])
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("committed ")
    assert _ends(paths) == ([[], [], []], ["after-decision"] * 3)

    # both in doubt before any decision: the coordinator may be decided alone (its
    # decision is the group's), a participant with --force only
    paths, gid = _killed_group(tmp_path / "before", "before-decision")
    r = _cli("rollback-prepared", paths[0], gid)
    assert r.returncode == 0, (r.stdout, r.stderr)
    r = _cli("rollback-prepared", paths[1], gid, "--force")
    assert r.returncode == 0, (r.stdout, r.stderr)
    r = _cli("resolve-atomic", paths[0], paths[1], paths[2], "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["groups"] == [{"gid": gid, "outcome": "rolled back"}]
    assert _ends(paths) == ([[], [], []], [None] * 3)


def _killed_group(where, die_at: str) -> tuple[list[str], str]:
    """The three stores' paths of an atomic group killed at ``die_at``, and its gid."""
    stores = _atomic_killed(where, die_at)
    gid = (stores[0].prepared() or stores[1].prepared())[0]
    for s in stores:
        s.close()
    return [str(where / n) for n in ("coord", "p1", "p2")], gid


def _ends(paths) -> tuple[list, list]:
    """What each store holds in doubt, and its "x"."""
    with contextlib.ExitStack() as opened:
        stores = [opened.enter_context(walstore.open(p)) for p in paths]
        return [s.prepared() for s in stores], [s.get("x") for s in stores]
