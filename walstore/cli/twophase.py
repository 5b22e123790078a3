"""Two-phase commit verbs: prepared (in-doubt transactions), commit-prepared,
rollback-prepared."""
from __future__ import annotations

import json
from typing import NoReturn

import click

import walstore

from . import _engine, main, refused
from .common import HANDLERS, JSON, PATH, check_before_recovery, load_handlers, open_store
from .output import (EXIT_PROBLEM, emit_json_list, fail, note_problem, show_cell, show_gid,
                     table)


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


@main.command("commit-prepared")
@PATH
@click.argument("gid")
def commit_prepared(path: str, gid: str) -> None:
    """Commit the prepared transaction GID (as typed, or in the JSON form `prepared`
    shows it in)."""
    try:
        gid = typed_gid(path, gid)  # (before the check: a JSON form may be the longer)
        _engine.check_gid(gid)  # (one walstore never gives: before anything, see AFTER_CHECK)
        check_before_recovery(path, lambda store: store.prepared_details(gid))
    except (KeyError, TypeError, ValueError) as e:
        _refuse(gid, e)
    with open_store(path) as store:
        try:
            lsn = store.commit_prepared(gid)
        except KeyError as e:  # (decided meanwhile; the GID itself was checked above)
            _refuse(gid, e)
        except ValueError as e:  # (see AFTER_CHECK)
            fail(f"commit-prepared failed: {e}")
    click.echo(f"committed {show_gid(gid)} at LSN {lsn}")


@main.command("rollback-prepared")
@PATH
@click.argument("gid")
@HANDLERS
def rollback_prepared(path: str, gid: str, handlers: str | None) -> None:
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
    with open_store(path, compensators=comps) as store:
        try:  # (its own row: listing every prepared one to find it cost N per call)
            txids = [store.prepared_details(gid).txid]
        except KeyError:
            txids = []  # (decided meanwhile: the rollback below says so)
        try:
            store.rollback_prepared(gid)
        except KeyError as e:  # (decided meanwhile; the GID itself was checked above)
            _refuse(gid, e)
        except ValueError as e:  # (see AFTER_CHECK)
            fail(f"rollback-prepared failed: {e}")
        except walstore.CompensationFailed as e:
            fail(f"rolled back, but {e}")
        owed = [a for a in store.pending_compensations() if a.txid in txids]
        registered = dict(store.compensators)
    if owed:  # (before printing: see note_problem)
        note_problem()
    click.echo(f"rolled back {show_gid(gid)}")
    if owed:
        report_owed(owed, registered)
        raise SystemExit(EXIT_PROBLEM)


def _refuse(gid: str, e: Exception) -> NoReturn:
    """GID names nothing prepared (UnknownGid), or is one walstore never gives (empty, too
    long: TypeError): a usage error, exit 2."""
    refused(e, None if isinstance(e, KeyError) else f"bad GID {gid!r}: {e}")
