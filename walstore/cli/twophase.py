"""Two-phase commit verbs: prepared (in-doubt transactions), commit-prepared,
rollback-prepared, resolve-atomic (the in-doubt groups of ``walstore.atomic``)."""
from __future__ import annotations

import contextlib
import json
from typing import NoReturn

import click

import walstore

from . import _engine, main, refused
from ._engine import command_word
from .common import (HANDLERS, JSON, PATH, DirPath, check_before_recovery, load_handlers,
                     open_store)
from .output import (EXIT_INTERRUPTED, EXIT_PROBLEM, emit_json_list, fail, note_problem,
                     show_cell, show_gid, table)


# AFTER_CHECK: the GID is checked (it is one walstore gives; it names a prepared
# transaction, when the store needs recovery) before the store is opened for the
# decision; a ValueError the decision raises after that is no bad GID: it was said as "bad GID 'g1': workspace root ... does not
# exist", exit 2, for a rollback that had been decided (probe audit48).  It is a problem
# found, exit 1, in its own words.


@main.command()
@PATH
@JSON
def prepared(path: str, as_json: bool) -> None:
    """In-doubt two-phase transactions (exit 1 when there are any); read-only (works
    beside a running writer)."""
    with open_store(path, readonly=True) as store:
        rows = _engine.prepared_details(store)
    if rows:  # (before printing: a reader gone mid-output keeps exit 1, see note_problem)
        note_problem()
    if as_json:
        emit_json_list("prepared", rows)
    else:
        table([[show_gid(p["gid"]), p["txid"], p["keys"], show_cell(p["meta"])] for p in rows],
              ["GID", "TXID", "WRITES", "META"])
    if rows:
        raise SystemExit(EXIT_PROBLEM)


def typed_gid(path: str, gid: str) -> str:
    """The gid the GID argument names: the text as typed, or — when no prepared
    transaction has that gid and it is a JSON string — the gid it spells: the form
    ``prepared`` and ``recover`` show a gid in when a terminal could not show it as it is
    (``show_gid``).  It was taken as the gid itself (UnknownGid, exit 2), so a gid shown
    so could only be decided from Python, and one holding a NUL, which no argv can carry,
    not from the CLI at all (audit 58)."""
    if len(gid) < 2 or gid[0] != '"' or gid[-1] != '"':
        return gid
    try:
        spelled = json.loads(gid)
    except ValueError:
        return gid
    if not isinstance(spelled, str) or spelled == gid:
        return gid
    try:
        _engine.check_gid(spelled)
    except (TypeError, ValueError):
        return gid
    with open_store(path, readonly=True) as store:
        try:
            if store.decision(gid) == "prepared":
                return gid
        except (TypeError, ValueError):  # (no gid: the JSON form of a long one)
            pass
        if store.decision(spelled) == "prepared":
            return spelled
    return gid


FORCE = click.option("--force", is_flag=True,
                     help="Decide a participant of a walstore.atomic group alone (the group "
                          "may end mixed; resolve-atomic decides it whole).")


def _group_guard(path: str, gid: str, force: bool) -> None:
    """A gid of a ``walstore.atomic`` group, decided on a participant (not the store that
    coordinates it): refused unless ``--force`` — the coordinator's decision is the
    group's, and a participant decided by hand against it leaves the group mixed (its
    refund run where the charge stood elsewhere, or the reverse).  `prepared` and
    `recover` invited it, and nothing from the command line could read the
    coordinator's decision (audit 58's note); `resolve-atomic` does."""
    coordinator = _engine.atomic_coordinator_id(gid)
    if coordinator is None or force:
        return
    with open_store(path, readonly=True) as store:
        if store.store_id.hex() == coordinator:
            return  # (the coordinator's decision is the group's)
    refused(walstore.ConflictError(gid),
            f"{show_gid(gid)} belongs to a walstore.atomic group coordinated by store "
            f"{coordinator[:16]}..., not by this one: decide the group with `walstore "
            f"resolve-atomic COORDINATOR_PATH {path}` (every store follows the "
            f"coordinator's decision), or --force to decide this store alone")


@main.command("commit-prepared")
@PATH
@click.argument("gid")
@FORCE
def commit_prepared(path: str, gid: str, force: bool) -> None:
    """Commit the prepared transaction GID (as typed, or in the JSON form `prepared`
    shows it in)."""
    try:
        gid = typed_gid(path, gid)  # (before the check: a JSON form may be the longer)
        _engine.check_gid(gid)  # (one walstore never gives: before anything, see AFTER_CHECK)
        check_before_recovery(path, lambda store: store.prepared_details(gid))
    except (KeyError, TypeError, ValueError) as e:
        _refuse(gid, e)
    _group_guard(path, gid, force)
    decided = False  # (a Ctrl-C after it, the store closing: said as decided)
    try:
        with open_store(path) as store:
            try:
                lsn = store.commit_prepared(gid)
            except KeyboardInterrupt:
                _interrupted_once_decided(store, path, gid, [], "committed")
            except KeyError as e:  # (decided meanwhile; the GID itself was checked above)
                _refuse(gid, e)
            except ValueError as e:  # (see AFTER_CHECK)
                fail(f"commit-prepared failed: {e}")
            decided = True
    except KeyboardInterrupt:
        if not decided:
            raise
        fail(f"commit-prepared: committed {show_gid(gid)}, then was interrupted (Ctrl-C)",
             EXIT_INTERRUPTED, "KeyboardInterrupt")
    click.echo(f"committed {show_gid(gid)} at LSN {lsn}")


def _interrupted_once_decided(store: walstore.Store, path: str, gid: str, txids: list,
                              decided: str) -> None:
    """A Ctrl-C in `commit-prepared` / `rollback-prepared`: once GID was decided (no
    longer prepared; a rollback's compensations running, most of its time), one line
    saying so and what is owed, exit 130 — it said "rollback-prepared interrupted
    (Ctrl-C)" as before the decision (probe-audit67); before it, the interrupt as it
    came."""
    try:
        undecided = gid in store.prepared()
        owed = [a for a in store.pending_compensations() if a.txid in txids]
    except walstore.WalstoreError:
        undecided, owed = True, []
    if undecided:
        raise  # (the Ctrl-C being handled, as it came)
    command = click.get_current_context().info_name
    fail(f"{command}: {decided} {show_gid(gid)}, then was interrupted (Ctrl-C)"
         f"{_owed_tail(path, owed)}", EXIT_INTERRUPTED, "KeyboardInterrupt")


def _owed_tail(path: str, owed: list | None) -> str:
    """What the interrupt line adds of the compensations left owed (None: not known).
    A copy's held ones (owed in its source) are never run here: `recover` was named as
    running them (audit67 review), as ``owed_header`` says of them."""
    if owed == []:
        return ""
    run = [a for a in owed or () if not a.held]
    held = len(owed or ()) - len(run)
    tail = (f"; {len(run)} compensation(s) not run yet are owed" if run else
            "" if held else "; compensations not run yet may be owed")
    if run or not held:
        tail += f": `walstore recover {command_word(path)} --handlers MODULE` runs them"
    if held:
        tail += (f"; {held} held compensation(s), owed in the source store when it was "
                 f"copied, are never run here (`walstore resolve` once handled where "
                 f"they ran)")
    return tail


@main.command("rollback-prepared")
@PATH
@click.argument("gid")
@HANDLERS
@FORCE
def rollback_prepared(path: str, gid: str, handlers: str | None, force: bool) -> None:
    """Roll back the prepared transaction GID (as typed, or in the JSON form `prepared`
    shows it in; exit 1 when compensations stay owed)."""
    from .agent import report_owed
    comps = load_handlers(handlers)
    try:
        gid = typed_gid(path, gid)  # (before the check: a JSON form may be the longer)
        _engine.check_gid(gid)  # (one walstore never gives: before anything, see AFTER_CHECK)
        check_before_recovery(path, lambda store: store.prepared_details(gid))
    except (KeyError, TypeError, ValueError) as e:
        _refuse(gid, e)
    _group_guard(path, gid, force)
    decided = False  # (a Ctrl-C after it, the store closing: said as decided)
    owed: list | None = None
    try:
        with open_store(path, compensators=comps) as store:
            try:  # (its own row: listing every prepared one to find it cost N per call)
                txids = [store.prepared_details(gid).txid]
            except KeyError:
                txids = []  # (decided meanwhile: the rollback below says so)
            try:
                store.rollback_prepared(gid)
            except KeyboardInterrupt:
                _interrupted_once_decided(store, path, gid, txids, "rolled back")
            except KeyError as e:  # (decided meanwhile; the GID itself was checked above)
                _refuse(gid, e)
            except ValueError as e:  # (see AFTER_CHECK)
                fail(f"rollback-prepared failed: {e}")
            except walstore.CompensationFailed as e:
                fail(f"rolled back, but {e}")
            decided = True
            owed = [a for a in store.pending_compensations() if a.txid in txids]
            registered = dict(store.compensators)
    except KeyboardInterrupt:
        if not decided:
            raise
        # (with what is owed: "rolled back, then was interrupted" alone left the refunds
        # it listed unsaid when the Ctrl-C came as the store closed: audit67 review)
        fail(f"rollback-prepared: rolled back {show_gid(gid)}, then was interrupted (Ctrl-C)"
             f"{_owed_tail(path, owed)}", EXIT_INTERRUPTED, "KeyboardInterrupt")
    if owed:  # (before printing: see note_problem)
        note_problem()
    click.echo(f"rolled back {show_gid(gid)}")
    if owed:
        report_owed(owed, registered)
        raise SystemExit(EXIT_PROBLEM)


@main.command("resolve-atomic")
@click.argument("paths", nargs=-1, required=True,
                type=DirPath(file_okay=False, readable=False))
@HANDLERS
@JSON
def resolve_atomic_cmd(paths: tuple[str, ...], handlers: str | None, as_json: bool) -> None:
    """Finish the in-doubt walstore.atomic groups of the stores at PATHS (the
    coordinator's decision, rolled back when it is still in doubt, followed by every
    other store; exit 1 when a group stays in doubt: its coordinator is not among PATHS)."""
    comps = load_handlers(handlers, as_json)
    with contextlib.ExitStack() as opened:
        stores = [opened.enter_context(open_store(p, compensators=comps)) for p in paths]
        outcomes = walstore.resolve_atomic(*stores)
        left = sorted({g for s in stores for g in s.prepared()
                       if _engine.atomic_coordinator_id(g) is not None})
        owed = sum(1 for s in stores for _a in s.pending_compensations())
    if left or owed:  # (before printing: see note_problem)
        note_problem()
    if as_json:
        click.echo(json.dumps({"groups": [{"gid": g, "outcome": o}
                                          for g, o in sorted(outcomes.items())],
                               "in_doubt": left, "compensations_owed": owed}))
    else:
        for g, o in sorted(outcomes.items()):
            click.echo(f"{o} {show_gid(g)}")
        if not outcomes:
            click.echo("no walstore.atomic group in doubt that these stores coordinate")
        for g in left:
            click.echo(f"still in doubt: {show_gid(g)} (its coordinator, store "
                       f"{_engine.atomic_coordinator_id(g)[:16]}..., is not among PATHS)",
                       err=True)
        if owed:
            click.echo(f"{owed} compensation(s) owed: see `walstore actions PATH --pending`",
                       err=True)
    if left or owed:
        raise SystemExit(EXIT_PROBLEM)


def _refuse(gid: str, e: Exception) -> NoReturn:
    """GID names nothing prepared (UnknownGid), or is one walstore never gives (empty, too
    long: TypeError): a usage error, exit 2."""
    refused(e, None if isinstance(e, KeyError) else f"bad GID {gid!r}: {e}")
