"""Agent-layer verbs: undo (revert, rewind with --scope/--dry-run) and the external side
effects (actions, resolve)."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Iterator

import click

import walstore

from . import _engine, main, refused
from ._engine import command_word
from .common import (HANDLERS, JSON, PATH, action_doc, action_docs, action_table,
                     check_before_recovery, load_handlers, open_store, owed_header)
from .output import (EXIT_INTERRUPTED, EXIT_PROBLEM, KEY, POINT, TXID, UsageProblem, emit_json,
                     emit_json_list, fail,
                     kv_lines, note_problem, one_line, settle_point, show_key, show_value,
                     some, table)


# UNRECOVERED: revert and rewind (also --dry-run) refuse a store that needs recovery
# (NeedsRecovery, exit 1: run `walstore recover` first, which says what it rolled back and
# compensated).  They recovered it first: with --handlers the crashed transactions'
# compensations ran, and then a dry run printed "nothing was changed", or the undo was
# refused (a txid naming nothing, a RevertConflict) — and `walstore recover` found nothing
# left to report, so the operator never saw what ran.


# REFUSED: an undo the store refuses with a ValueError naming its cause (a workspace
# root that is gone or no longer the directory registered: its files cannot be put back;
# a rename that would move the store) is a problem found, exit 1, said in that cause's
# words; the one error path called it "an unexpected error; `walstore --debug` shows
# where", as it says of a bug (probe audit48: `rewind --dry-run` of a copy whose
# workspace is on another machine).


@main.command()
@PATH
@click.argument("txid", type=TXID)
@click.option("--cascade", is_flag=True, help="Also revert later transactions on the same keys.")
@HANDLERS
@JSON
def revert(path: str, txid: int, cascade: bool, handlers: str | None, as_json: bool) -> None:
    """Undo committed transaction TXID as a new transaction."""
    comps = load_handlers(handlers, as_json)
    with _said_if_committed(path) as undo:  # (see COMMITTED)
        with open_store(path, recover="manual", compensators=comps) as store:  # (UNRECOVERED)
            undo.watch(store)
            info = undo.info = _undo_said(
                undo, "revert", "reverted", lambda: store.revert(txid, cascade=cascade))
            owed = undo.owed = still_owed(store, info.extra.get("compensate", ()) if info
                                          else ())
            registered = dict(store.compensators)
        _done(info, as_json, owed, registered)


@main.command()
@PATH
@click.option("--to", "to", type=POINT, required=True,
              help="tx:N, lsn:N, a TXID, or a restore point NAME.")
@click.option("--scope", type=KEY, default=None,
              help="Only keys under this prefix go back (a KEY, e.g. agents/a/).")
@click.option("--dry-run", is_flag=True, help="Print what would be undone; change nothing.")
@HANDLERS
@JSON
def rewind(path: str, to: Any, scope: str | bytes | None, dry_run: bool, handlers: str | None,
           as_json: bool) -> None:
    """Undo every transaction after a point, as one new transaction."""
    comps = load_handlers(handlers, as_json)
    # a dry run reads: it opens read-only, so it works beside the agent that holds the
    # store (StoreLocked before); a crashed store is still refused (see UNRECOVERED: the
    # planner raises NeedsRecovery), and a plan runs no compensator
    # (its --handlers say which compensations would run and which be left pending)
    opened = (open_store(path, readonly=True, compensators=comps) if dry_run
              else open_store(path, recover="manual", compensators=comps))
    with _said_if_committed(path) as undo, opened as store:  # (see COMMITTED)
        if not dry_run:
            undo.watch(store)

        def plan_or_rewind() -> Any:
            point = settle_point(store.restore_points(), to)
            if dry_run:  # (beside a live writer: its file history applied first)
                return _engine.while_writer_applies(
                    store, lambda: store.rewind(point, scope=scope, dry_run=True))
            undo.info = store.rewind(point, scope=scope, dry_run=False)
            return undo.info

        result = _undo_said(undo, "rewind", "rewound", plan_or_rewind)
        owed = undo.owed = [] if dry_run or result is None else still_owed(
            store, result.extra.get("compensate", ()))
        registered = dict(store.compensators)
    with _said_if_committed(path) as again:  # (the output: the undo known)
        again.info, again.owed = undo.info, undo.owed
        if dry_run:
            _show_plan(result, as_json)
        else:
            _done(result, as_json, owed, registered)


# COMMITTED: a Ctrl-C once the undo committed (while its compensations ran, most of its
# time; as the store closed; as the result was printed) said "revert interrupted
# (Ctrl-C)", as before it: the operator could not tell that the state was reverted, nor
# that the compensations not run yet are owed (probe-audit67; as `purge`'s, audit 60).
# It says so now, exit 130.


class _Undo:
    """What a revert or rewind committed, as far as the command knows it."""

    def __init__(self) -> None:
        self.store: walstore.Store | None = None
        self.before = 0   # the newest txid before the undo
        self.info: Any = None
        self.owed: list | None = None

    def watch(self, store: walstore.Store) -> None:
        self.store = store
        newest = store.log(limit=1)
        self.before = newest[0].txid if newest else 0

    def committed(self) -> Any:
        """The undo's TxnInfo when it committed (found in the log when the interrupt came
        before ``revert``/``rewind`` returned), else None."""
        if self.info is not None or self.store is None:
            return self.info
        try:
            newest = self.store.log(limit=1)
            if newest and newest[0].txid > self.before and newest[0].extra.get("reverts"):
                self.info = newest[0]
                self.owed = still_owed(self.store, self.info.extra.get("compensate", ()))
        except walstore.WalstoreError:
            pass
        return self.info


@contextlib.contextmanager
def _said_if_committed(path: str) -> Iterator[_Undo]:
    """A Ctrl-C in the block once the undo committed: one line saying so and what is
    owed, exit 130; before it, the interrupt as it came."""
    undo = _Undo()
    try:
        yield undo
    except KeyboardInterrupt:
        info = undo.committed()
        if info is None:
            raise
        command = click.get_current_context().info_name
        owed = undo.owed
        tail = ("" if owed == [] else
                f"; {len(owed)} compensation(s) not run yet are owed" if owed else
                "; compensations not run yet are owed")
        if owed != []:
            tail += (f": `walstore recover {command_word(path)} --handlers MODULE` runs "
                     f"them")
        fail(f"{command} committed (transaction {info.txid}, undoing transactions "
             f"[{some(info.extra.get('reverts', []))}]), then was interrupted (Ctrl-C)"
             f"{tail}", EXIT_INTERRUPTED, "KeyboardInterrupt")


def _undo_said(undo: _Undo, verb: str, done: str, call: Callable[[], Any]) -> Any:
    """``call()``, the undo of a revert or rewind (VERB), its refusals said in the command
    line's words: a failed compensation after the undo committed ("DONE, but ..."), a
    RevertConflict with the CLI's advice, a ValueError (see REFUSED) exit 1. A Ctrl-C
    looks up whether the undo committed while the store is still open (see COMMITTED).
    The API's RuntimeWarning of compensations left owed for want of a compensator is not
    shown: the command's own table says them, in its words (it printed a source line and
    the Python API's ``store.retry_compensations()`` above that table)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"the undo committed \(transaction",
                                    RuntimeWarning)
            return call()
    except KeyboardInterrupt:
        undo.committed()  # (looked up while the store is open)
        raise
    except walstore.CompensationFailed as e:
        fail(f"{done}, but {e}")
    except walstore.RevertConflict as e:
        raise _in_cli_words(e) from None
    except ValueError as e:  # (see REFUSED)
        fail(f"{verb} failed: {e}")


def _in_cli_words(e: walstore.RevertConflict) -> walstore.RevertConflict:
    """A refusal's advice said as the command line takes it (`revert` said "use
    cascade=True", the Python API's words); ``force`` has no flag here."""
    text = (str(e).replace("use cascade=True", "use --cascade")
            .replace("use force=True", "use force=True from Python (store.revert / "
                     "store.rewind; the command line has no --force)"))
    out = walstore.RevertConflict(text, e.txids, e.actions, e.paths)
    out.__cause__ = e.__cause__
    return out


def still_owed(store: walstore.Store, ids: Any) -> list[walstore.Action]:
    """Of the actions ``ids`` an undo claimed, those whose compensation is still owed
    (no compensator in this run: ``--handlers``)."""
    wanted = set(ids)
    return [a for a in store.pending_compensations() if a.id in wanted] if wanted else []


def report_owed(owed: list[walstore.Action], registered: dict) -> None:
    """Human output: the compensations the command left owed (the caller exits 1)."""
    click.echo(owed_header(owed))
    action_table(owed, registered, results=False)


def _done(info: Any, as_json: bool, owed: list | None = None,
          registered: dict | None = None) -> None:
    reverted = list(info.extra.get("reverts", [])) if info else []
    owed = owed or []
    if owed:  # (before printing: a reader gone mid-output keeps exit 1, see note_problem)
        note_problem()
    if as_json:
        emit_json({"txid": info.txid if info else None, "lsn": info.lsn if info else None,
                   "reverted": reverted,
                   "pending_actions": action_docs(owed, registered)})
    elif info is None:
        click.echo("nothing to undo")
    else:
        # (the first 20: a rewind of 100,000 transactions printed them all on one line)
        click.echo(f"committed txid {info.txid} at LSN {info.lsn}, undoing transactions "
                   f"[{some(reverted)}]")
        if owed:
            report_owed(owed, registered or {})
    if owed:  # committed, but the outside world is not undone yet: a problem to act on
        raise SystemExit(EXIT_PROBLEM)


def _plan_fields(plan: Any) -> dict:
    """The rewind plan (a dict, a dataclass, or an object with ``as_dict``) as a dict."""
    if isinstance(plan, dict):
        return plan
    if hasattr(plan, "as_dict"):
        return dict(plan.as_dict())
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return dict(vars(plan))


def _show_plan(plan: Any, as_json: bool) -> None:
    fields = _plan_fields(plan) if plan is not None else {}
    if as_json:
        emit_json({"dry_run": True, "plan": fields})
        return
    click.echo("dry run: nothing was changed")
    scalars = []
    for name, value in fields.items():
        if isinstance(value, (list, tuple)) and value and all(
                isinstance(v, dict) for v in value):
            click.echo(f"{name}:")
            headers = list(dict.fromkeys(k for row in value for k in row))
            table([[_plan_cell(row.get(h)) for h in headers] for row in value],
                  [str(h).upper() for h in headers])
        elif isinstance(value, (list, tuple, set, frozenset)):
            # (the first 20: a plan over 20,000 keys printed them on one 180 KB line)
            scalars.append((name, some(value, text=_plan_cell) or "(none)"))
        else:
            scalars.append((name, _plan_cell(value)))
    kv_lines(scalars)


def _plan_cell(v: Any) -> str:
    if v is None:
        return ""
    return show_key(v) if isinstance(v, (str, bytes)) else show_value(v)


@main.command("actions")
@PATH
@click.option("--pending", is_flag=True, help="Only compensations still owed.")
@JSON
def actions_cmd(path: str, pending: bool, as_json: bool) -> None:
    """External side effects: intents, results, compensation state (and why one is owed)."""
    if pending:  # (the owed ones: few, listed whole)
        with open_store(path, readonly=True) as store:
            # (beside a live writer, a compensation it is running right now is not owed:
            # said on stderr, not listed — as `verify` says it)
            acts, going = _engine.owed_beside_writer(
                store, lambda: store.actions(pending=True))
        for a in going:
            click.echo(one_line(f"walstore: note: {_engine.under_way_text(a)}"), err=True)
        if acts:  # (before printing: see note_problem)
            note_problem()
        if as_json:
            emit_json({"actions": action_docs(acts, None)})
        else:
            action_table(acts, None)
        if acts:
            raise SystemExit(EXIT_PROBLEM)
        return
    # every action: streamed (a store with 100,000 actions held each, as an Action, its
    # JSON document and its text: ~6.7 KB an action, 165 MB for 20,000)
    with open_store(path, readonly=True) as store:
        acts = store.iter_actions()
        if as_json:
            emit_json_list("actions", (action_doc(a, None) for a in acts))
        else:
            action_table(acts, None, stream=True)


@main.command()
@PATH
@click.argument("action_id")
@click.option("--note", default=None, help="Why it was handled by hand.")
def resolve(path: str, action_id: str, note: str | None) -> None:
    """Mark a pending or failed compensation handled by hand."""
    try:
        _engine.check_resolve_note(note)
    except ValueError as e:
        raise UsageProblem(str(e)) from None
    try:
        check_before_recovery(path, lambda store: store.get_action(action_id))
    except KeyError as e:  # ACTION_ID names no action
        refused(e)
    with open_store(path) as store:
        try:
            done = store.resolve(action_id, note)
        except KeyError as e:
            refused(e)
    # (a needs-redo one redone by hand reads committed again: said, not "resolved")
    click.echo(f"action {action_id} resolved" if done.state == "resolved" else
               f"action {action_id} marked redone by hand (state: {done.state})")
