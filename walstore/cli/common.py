"""What several verb families share: the PATH/--json/--handlers parameters, opening a
store for a command, importing ``--handlers`` modules, and describing actions (the
``recover`` and ``actions`` listings)."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any, Callable, Iterable, Iterator

import click

import walstore

from . import _engine
from ._engine import command_word
from ._engine import never_runs, type_and_message
from .output import (UsageProblem, cut_text, end_progress, note_problem, progress_printer,
                     show_cell, stream_table, table)


class DirPath(click.Path):
    """A store's directory argument (PATH, a DEST): click's ``Path``, and one no store
    can live at (empty, not valid UTF-8: what ``walstore.open`` refuses before any I/O) is
    a usage error (exit 2) naming the argument.  It reached ``walstore.open``, whose
    ValueError every command said as "an unexpected error", exit 1 (`commit-prepared`
    as "bad GID", `demo` after its first section), while ``backup``/``restore`` took an
    empty DEST for the current directory (probe audit48)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, (str, bytes)):
            try:
                _engine.check_store_path(value)
            except ValueError as e:
                name = param.human_readable_name if param is not None else "PATH"
                raise UsageProblem(f"bad {name}: {e}") from None
        return super().convert(value, param, ctx)


PATH = click.argument("path", type=DirPath(file_okay=False, readable=False))
JSON = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
HANDLERS = click.option("--handlers", "handlers", default=None, metavar="MODULE",
                        help="Import compensators from MODULE's COMPENSATORS dict.")

# Recovery problems that are a normal crash outcome (said, not a reason to exit 1).
NORMAL_PROBLEMS = ("torn-tail", "stale-bytes", "watch-undone")

# Why an action still owes its compensation (``reason`` in JSON).
FAILED, NO_COMPENSATOR, NOT_RUN = "failed", "no-compensator", "not-run"


@contextlib.contextmanager
def open_store(path: str, **kw: Any) -> Iterator[walstore.Store]:
    """``with open_store(path) as store:`` the existing store at ``path`` (errors take the
    CLI's one error path).  A failure of the close after the block committed is said on
    stderr, never as the command's failure: what was committed stands (a probe: `walstore
    put` on a full disk printed "put failed", exit 1, for a put that had committed — the
    close's apply to LMDB was what failed, and the next open recovers it).

    ``recover="manual"``: a command that must not recover a store unseen (recovery rolls
    back the crashed transactions and, with compensators, runs their compensations)
    refuses one that needs it (NeedsRecovery, exit 1), naming `walstore recover`."""
    if kw.get("recover") != "manual" and "progress" not in kw:
        # an open recovers a store not shut down cleanly (a read-only one judges its log
        # as recovery would): its walk of the log is shown as `recover`'s and
        # `checkpoint`'s is (`put`, `get`, `scan`, `resolve`, ... ran a GB-sized walk
        # without a word), never under --json
        ctx = click.get_current_context(silent=True)
        as_json = bool(ctx is not None and ctx.params.get("as_json"))
        kw["progress"] = None if as_json else progress_printer(
            "check log" if kw.get("readonly") else "recover")  # (read-only: changes nothing)
    try:
        store = walstore.open(path, create=False, **kw)
        end_progress()
    except walstore.NeedsRecovery:
        command = click.get_current_context().info_name
        raise walstore.NeedsRecovery(
            f"store {os.path.abspath(path)} was not shut down cleanly and `{command}` does "
            f"not recover it: run `walstore recover {command_word(path)}` first (it says what it rolls "
            f"back and compensates); nothing was changed") from None
    try:
        owed_at_open = None
        if not kw.get("readonly"):
            owed_at_open = owed_after_recovery(store)
        yield store
        if not kw.get("readonly"):  # (after the work: a failure stays one line)
            say_recovery(store, path, owed_at_open)
    except BaseException:
        with contextlib.suppress(Exception):  # (the block's own error is the one said)
            store.close()
        raise
    try:
        store.close()
    except walstore.WalstoreError as e:
        if kw.get("readonly"):
            raise
        click.echo(f"walstore: warning: what the command committed stands, but closing the "
                   f"store failed: {e} (the next open recovers)", err=True)


def owed_after_recovery(store: walstore.Store) -> set | None:
    """The ids of the compensations owed when the open's recovery ended (None: the store
    was shut down cleanly, nothing to say)."""
    report = store.last_recovery
    if report is None or not report.unclean:
        return None
    return {a.id for a in store.pending_compensations() if not a.in_flight}


def say_recovery(store: walstore.Store, path: str, owed_at_open: set | None = None) -> None:
    """A writing verb (put, delete, purge, checkpoint, ...) opened a store that was not
    shut down cleanly, and the open recovered it: when the verb's work is done, one line
    on stderr says what recovery did beyond redoing commits (transactions rolled back,
    compensations run, prepared ones in doubt, damage) and what of it is owed still
    (``owed_at_open``: what was owed when recovery ended, ``owed_after_recovery``), and the
    command exits 1 when something is left to act on (owed compensations, in-doubt
    transactions, damage).  `walstore put` said only "committed ..." and exited 0, while
    the crashed transaction's charge had become owed a refund (a probe).  Said after the
    work, so a failing verb's error stays its one line."""
    report = store.last_recovery
    if report is None or not report.unclean:
        return
    # (still owed of those owed when the open's recovery ended: one the verb itself left
    # owed — `rollback-prepared` of a gid in doubt with no compensator — is the verb's
    # to list, and it does; said here too, as "recovered as it opened: 1 compensation
    # owed", it blamed recovery for the verb's own refund)
    owed = [a for a in store.pending_compensations() if not a.in_flight
            and (owed_at_open is None or a.id in owed_at_open)]
    in_doubt = store.prepared()
    damage = [p for p in report.problems if p.kind not in NORMAL_PROBLEMS]
    said = []
    if report.losers:
        said.append(f"rolled back {len(report.losers)} unfinished transaction(s) "
                    f"{list(report.losers)[:10]}")
    if report.compensated:
        said.append(f"ran {len(report.compensated)} compensation(s)")
    if owed:
        said.append(f"{len(owed)} compensation(s) owed (`walstore actions {command_word(path)} --pending`)")
    if report.in_doubt and in_doubt:
        said.append(f"{len(in_doubt)} prepared transaction(s) in doubt "
                    f"(`walstore prepared {command_word(path)}`)")
    if damage:
        said.append(f"{len(damage)} problem(s) found (`walstore verify {command_word(path)}`): "
                    f"{damage[0].kind}: {damage[0].reason}")
    if not said:
        return
    click.echo(f"walstore: warning: {os.path.abspath(path)} was not shut down cleanly and "
               f"was recovered as it opened: {'; '.join(said)}", err=True)
    if owed or (report.in_doubt and in_doubt) or damage:
        note_problem()


def check_before_recovery(path: str, check: Callable[[walstore.Store], Any]) -> None:
    """Before a verb that can refuse what it is asked opens ``path`` to write: on a store
    that needs recovery, ``check`` (raising the refusal: an action id or a GID
    that names nothing) runs on a read-only open first.  The writable open recovers (the
    crashed transactions rolled back, their files put back and, with ``--handlers``, their
    compensations run): a refusal after it had changed the store and the outside world,
    and `walstore recover` then had nothing to report."""
    with open_store(path, readonly=True) as store:
        if store.needs_recovery():
            check(store)


def load_handlers(module: str | None, as_json: bool = False) -> dict[str, Callable] | None:
    """``--handlers MODULE``: its ``COMPENSATORS`` dict (name -> function); usage error when
    the module cannot be imported or has no such dict.

    ``as_json``: the command prints one JSON document on stdout, so what the module prints
    (on import, in a compensator: a refund that logs with ``print``) goes to stderr; it was
    written into stdout beside the document, which no script could parse (audit53)."""
    if module is None:
        return None
    quiet = stdout_to_stderr() if as_json else contextlib.nullcontext()
    try:
        with quiet:
            mod = _import_handlers(module)
    except (Exception, SystemExit) as e:  # any failure to import is the user's module,
        # named below; a SystemExit too (a module that exits, or parses its own argv with
        # argparse, at import): it ended the command with the module's status, `recover`
        # exiting 0 having recovered nothing, no --json document
        raise UsageProblem(f"--handlers {module}: cannot import it "
                           f"({type_and_message(e)})") from None
    comps = getattr(mod, "COMPENSATORS", None)
    if not isinstance(comps, dict):
        raise UsageProblem(f"--handlers {module}: the module has no COMPENSATORS dict "
                           f"(compensator name -> function)")
    bad = [n for n, f in comps.items() if not isinstance(n, str) or not callable(f)]
    if bad:
        raise UsageProblem(f"--handlers {module}: COMPENSATORS must map names (str) to "
                           f"functions; not so for {bad!r}")
    for name, fn in comps.items():  # (an async one: a usage error like the above, not
        why = never_runs(fn)         # "recover failed ... an unexpected error")
        if why:
            raise UsageProblem(f"--handlers {module}: compensator {name!r} {why}")
    return {name: _as_compensator(fn, as_json) for name, fn in comps.items()}


@contextlib.contextmanager
def stdout_to_stderr():
    """What a ``--handlers`` module writes while it is imported or a compensator runs goes
    to stderr, under ``--json``: ``sys.stdout`` and file descriptor 1 both.  Only
    ``sys.stdout`` was pointed at stderr, so a compensator that wrote to the descriptor
    (``os.write(1, ...)``, a C library) or ran a program that inherited it (``subprocess.run
    (["curl", ...])``: the common refund) wrote into the JSON document, which no script
    could parse then (probe-audit59).  A descriptor that cannot be duplicated (stdout or
    stderr closed) leaves descriptor 1 as it is."""
    saved = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


class CompensatorExited(Exception):
    """A compensator called ``sys.exit()``: a failure of that compensation."""


def _as_compensator(fn: Callable, as_json: bool) -> Callable:
    """``fn`` as the command runs it: a ``sys.exit()`` in it is a failure of that
    compensation (retried, then escalated: the action stays owed and `recover` lists it,
    exit 1), not the end of the command — it ended `recover` mid-way with the
    compensator's status (3: no exit status walstore gives), the store still needing
    recovery and nothing said.  ``as_json``: run with ``sys.stdout`` pointed at stderr
    (compensators run synchronously in the command, before its document is written)."""
    @functools.wraps(fn)
    def compensator(*args: Any, **kwargs: Any) -> Any:
        quiet = stdout_to_stderr() if as_json else contextlib.nullcontext()
        try:
            with quiet:
                return fn(*args, **kwargs)
        except SystemExit as e:
            raise CompensatorExited(f"the compensator called sys.exit({e.code!r})") from None
    return compensator


def _import_handlers(module: str) -> Any:
    """A module name, found first in the current directory (as ``python -m`` would: the
    ``walstore`` script's own directory is on its path instead), or a ``.py`` file path.

    The current directory is on ``sys.path`` only when the named module (its top-level
    package) is there, and only while it is imported (its own imports of its neighbours
    included), never after: left at the front, it shadowed what walstore imports later (a
    probe: a ``boto3.py`` where ``restore --handlers`` ran was imported for an s3://
    replica, and ran)."""
    if module.endswith(".py") or os.sep in module:
        name = os.path.splitext(os.path.basename(module))[0]
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(module))
        if spec is None or spec.loader is None:
            raise ImportError(f"no Python module at {module}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    cwd = os.getcwd()
    top = module.partition(".")[0]
    if (cwd in sys.path or "" in sys.path  # (``python -m walstore``: the interpreter's own)
            or top in sys.modules or importlib.machinery.PathFinder.find_spec(top, [cwd])
            is None):  # (not in the current directory: nothing is looked up there)
        return importlib.import_module(module)
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def owed_reason(action: walstore.Action, compensators: dict | None) -> str | None:
    """Why ``action`` still owes its compensation; None when nothing is owed.

    ``failed``: its compensator ran and kept failing (``error`` says how).
    ``no-compensator``: no compensator was registered for it (with ``compensators``
    given, those of this run decide; without, a listing's, only the one recorded by the
    process that found none).  ``not-run``: one is registered in this run but has not run
    it, or (a listing) it was not run yet or was cut short by a crash.
    """
    if action.state == "failed":
        return FAILED
    if action.state != "pending" or action.in_flight:  # (in flight: not owed yet)
        return None
    if compensators is not None and action.compensate in compensators:
        return NOT_RUN
    if compensators is None and action.compensate and not (action.error or "").startswith(
            "no compensator registered"):
        # a listing (``actions``) runs nothing and cannot know what the application
        # registers: only a recorded "no compensator registered" says none was (a refund
        # cut short by kill -9 read "no compensator registered for 'refund'")
        return NOT_RUN
    return NO_COMPENSATOR


def last_error(action: walstore.Action, reason: str | None) -> str:
    """The LAST ERROR cell of a table row; the action's own error cut at CELL_CHARS (a
    compensator's exception message is kept up to 4 KB: the row was that wide)."""
    error = cut_text(action.error) if action.error else action.error
    if reason == FAILED:
        return f"failed after {action.attempts} tries: {error}"
    if reason == NO_COMPENSATOR:
        text = (f"no compensator registered for {action.compensate!r}" if action.compensate
                else "no compensator declared")
        note = error or ""
        return text if not note or note.startswith("no compensator") else f"{text}; {note}"
    if reason == NOT_RUN:
        hint = (f"not run yet, or cut short by a crash: runs when the store is opened "
                f"with compensator {action.compensate!r} registered")
        if getattr(action, "held", False):  # (never run automatically: its error says so)
            return error or "not run yet"
        return f"{error}; {hint}" if error else hint
    return error or ""


def action_docs(actions: list[walstore.Action], compensators: dict | None) -> list[dict]:
    """--json rows: the action's fields plus ``reason`` (see :func:`owed_reason`), left as
    data: ``emit_json`` renders the whole document once (rendered twice, a tag such as
    ``{"float": "nan"}`` would read as a one-key map and become ``{"map": ...}``)."""
    return [action_doc(a, compensators) for a in actions]


def action_doc(a: walstore.Action, compensators: dict | None) -> dict:
    """One row of :func:`action_docs` (``emit_json_list`` renders each once)."""
    return dict(a.as_dict(), reason=owed_reason(a, compensators))


def owed_header(owed: list[walstore.Action]) -> str:
    """The line above a table of owed compensations: what can settle them.  A ``held``
    one (a copy's, owed in its source) is never run here, ``--handlers`` or not."""
    held = sum(1 for a in owed if getattr(a, "held", False))
    if held == len(owed):
        return ("held compensations (owed in the source store when it was copied: never "
                "run here; `walstore resolve` once handled where they ran):")
    if held:
        return (f"pending compensations (need a compensator, --handlers MODULE, or "
                f"`walstore resolve`; the {held} held one(s), owed in the source store "
                f"when it was copied, are never run here):")
    return ("pending compensations (need a compensator, --handlers MODULE, or "
            "`walstore resolve`):")


def action_table(actions: Iterable[walstore.Action], compensators: dict | None,
                 results: bool = True, stream: bool = False) -> None:
    """A table of ``actions``; ``stream``: printed a page at a time as they come
    (:func:`stream_table`), never held whole."""
    rows = ([a.id, a.txid, a.name, a.compensate or "", a.state]
            + ([show_cell(a.result)] if results else [])
            + [last_error(a, owed_reason(a, compensators))] for a in actions)
    (stream_table if stream else table)(
        rows if stream else list(rows),
        ["ID", "TXID", "NAME", "COMPENSATOR", "STATE"] + (["RESULT"] if results else [])
        + ["LAST ERROR"])
