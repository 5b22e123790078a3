"""The ``walstore`` command line: the click group :data:`main` and its ONE error path.

Exit status: 0 success; 1 a problem found (corruption, a refused recovery, a failed
verify, pending compensations, in-doubt transactions, a store whose STORE file is
damaged, and every OS, LMDB, decoding or walstore error); 2 usage error (click's own, a
path that is not a store, a malformed key or point, a bad ``--handlers`` module).  Every error is ONE line on stderr naming what
failed, the file and the cause; ``--debug`` (or ``WALSTORE_DEBUG=1``) adds the traceback.

The commands live in one module per verb family (:mod:`.maintenance`, :mod:`.data`,
:mod:`.agent`, :mod:`.twophase`, :mod:`.tools`); rendering and command-line syntax in
:mod:`.output`; the internals the CLI uses in :mod:`._engine`.
"""
from __future__ import annotations

import codecs
import errno
import os
import struct
import sys
import traceback
from typing import Any, NoReturn

import click
import lmdb
import msgpack

import walstore
from . import _engine
from ._engine import command_word, type_and_message
from .output import (EXIT_INTERRUPTED, EXIT_PROBLEM, EXIT_USAGE, Failure, begin_command,
                     emit_json_error, end_progress, error_kind, error_text, problem_noted,
                     stdout_to_devnull)

__all__ = ["main"]

DEBUG_ENV = "WALSTORE_DEBUG"
# msgpack.PackException is plain Exception in msgpack 1.x: not listed on purpose.
_DECODING_ERRORS = (struct.error, msgpack.UnpackException, msgpack.ExtraData,
                    msgpack.FormatError, msgpack.StackError, UnicodeError)


def debugging(ctx: click.Context | None) -> bool:
    """``--debug`` given, or WALSTORE_DEBUG set to something other than empty, 0, false,
    no or off (``WALSTORE_DEBUG=false`` turned the tracebacks on)."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and root.params.get("debug"))


def explain(exc: BaseException, command: str, path: str | None) -> tuple[str, int]:
    """The one line (without the ``walstore:`` prefix) and exit status for an error."""
    usage = isinstance(exc, (walstore.NotAStore, walstore.UnknownPoint))  # named nothing
    if usage and path and isinstance(exc, walstore.NotAStore) \
            and _engine.identity_damaged(path, exc):
        usage = False  # (PATH holds a store whose STORE file is damaged: a problem found)
    code = EXIT_USAGE if usage else EXIT_PROBLEM
    return f"{command} failed: {_cause(exc, command, path)}", code


def _os_text(exc: OSError, where: str) -> str:
    """An OS error in one line: its text, ``[ERRNO]``, the file(s) it names."""
    name = errno.errorcode.get(exc.errno or 0)
    text = (exc.strerror or str(exc)) + (f" [{name}]" if name else "")
    files = [os.fsdecode(f) if isinstance(f, (str, bytes)) else str(f)
             for f in (exc.filename, exc.filename2) if f is not None]
    return text + (f": {' -> '.join(files)}" if files else where)


def _writing_stdout(exc: BaseException) -> bool:
    """The error came from writing the command's output to stdout (``> /dev/full``, a
    full disk under a redirection, EIO of a terminal gone), not from the store."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is click.utils.echo.__code__:
            try:
                return frame.f_locals.get("file").fileno() == 1
            except (AttributeError, OSError, ValueError):
                return False
        tb = tb.tb_next
    return False


def _cause(exc: BaseException, command: str, path: str | None) -> str:
    where = f" (store {os.path.abspath(path)})" if path else ""
    if isinstance(exc, walstore.WalstoreError):
        text = error_text(exc)
        if isinstance(exc, OSError) and exc.errno and exc.strerror:
            # (a StoreIOError: as an OS error is said — no "[Errno N]" prefix — and its
            # wrapped OS error not said again: "...failed: Is a directory [EISDIR]: F")
            inner = exc.__cause__
            if isinstance(inner, OSError) and inner.errno == exc.errno \
                    and inner.filename == exc.filename:
                return _os_text(exc, where)
            text = _os_text(exc, "")  # (its cause another error: LMDB's, said below)
        if isinstance(exc, walstore.CorruptionError):
            text = f"corruption: {text}"
            if path and command not in ("recover", "verify"):
                text += f"; `walstore recover {command_word(path)}` shows the options"
        elif isinstance(exc, walstore.StoreLocked):
            text += " (stop it first, or use a read-only command)"
        inner = exc.__cause__
        if isinstance(inner, (OSError, lmdb.Error)) and str(inner) not in text:
            text += f" ({_cause(inner, command, None)})"  # a wrapped OS/LMDB error: say which
        return text
    if isinstance(exc, OSError):
        if _writing_stdout(exc):  # (it said "(store PATH)": the store's disk full? and
            # `put ... > /dev/full` said "put failed" of a put that had committed)
            if command == "demo":  # (a demo cut short removes what it made)
                return (f"writing its output to stdout failed: {_os_text(exc, '')} (the "
                        f"demo removed the store and files it had made)")
            return (f"writing its output to stdout failed: {_os_text(exc, '')} (what the "
                    f"command changed before that stands)")
        return _os_text(exc, where)
    if isinstance(exc, lmdb.Error):
        db = _engine.lmdb_file(path) if path else None
        return f"LMDB: {exc}" + (f": {db}" if db and db not in str(exc) else "")
    if isinstance(exc, _DECODING_ERRORS):
        return f"undecodable data ({type_and_message(exc)}){where}"
    if isinstance(exc, KeyError):
        return error_text(exc)
    return (f"{type_and_message(exc)}{where} (an unexpected error; `walstore --debug` "
            f"shows where)")


def report(ctx: click.Context, exc: BaseException) -> NoReturn:
    """The one error path: every exception escaping a command ends here."""
    if debugging(ctx):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message, code = explain(exc, ctx.info_name or "walstore", ctx.params.get("path"))
    failure = Failure(message, code, error_kind(exc))
    json_error(ctx, failure, failure.kind)
    raise failure from None


def refused(exc: BaseException, text: str | None = None) -> NoReturn:
    """A command's refusal of an argument (an action id or GID that names nothing, a GID
    walstore never gives) as a usage error (exit 2), said as the one error path says an
    error: "<command> failed: ..." (``text``, else the error's own words), and under
    ``--json`` ``type`` the exception's class (`revert 999` said "UsageError" where
    `rewind --to 999` said UnknownPoint)."""
    ctx = click.get_current_context()
    if debugging(ctx):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    command = ctx.info_name or "walstore"
    message = (f"{command} failed: {text}" if text is not None
               else explain(exc, command, ctx.params.get("path"))[0])
    raise Failure(message, EXIT_USAGE, error_kind(exc)) from None


def json_error(ctx: click.Context, failure: Failure, kind: str | None) -> None:
    """Under ``--json`` a failure is a JSON document too (scripts parse stdout)."""
    if ctx.params.get("as_json"):
        emit_json_error(ctx.info_name or "walstore", failure.format_message(),
                        failure.exit_code, kind)


def failure_kind(failure: Failure) -> str:
    """``type`` of a command's own failure under ``--json`` (docs/CLI.md: the exception's
    class): the class it names, else that of the exception it was raised while handling
    (``except ReplicationError: raise Failure(...)``; `replicas`/`restore` said null),
    else UsageError for exit 2 and Failure for a failure no exception caused."""
    if failure.kind:
        return failure.kind
    cause = failure.__cause__ or failure.__context__
    if isinstance(cause, Exception) and not isinstance(cause, click.ClickException):
        return error_kind(cause)
    return "UsageError" if failure.exit_code == EXIT_USAGE else type(failure).__name__


class _OwnOutputWrites:
    """What click itself prints to stdout while it parses (``--help``, ``--version``)
    fails as a command's output does: a reader gone ends it quietly, status 0; another
    write error (``> /dev/full``) is one line, exit 1 (it was a 36-line traceback)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except BrokenPipeError:
            _reader_went_away()
        except OSError as e:
            if not _writing_stdout(e):
                raise
            raise Failure(f"writing its output to stdout failed: {_os_text(e, '')}") from None


class WalstoreCommand(_OwnOutputWrites, click.Command):
    """A command whose escaping exceptions go through :func:`report`."""

    def invoke(self, ctx: click.Context) -> Any:
        begin_command()
        try:
            result = super().invoke(ctx)
            if problem_noted():  # (said on stderr as it was found: the work is done)
                raise SystemExit(EXIT_PROBLEM)
            return result
        except Failure as failure:  # a command's own one-line failure (fail(), usage)
            json_error(ctx, failure, failure_kind(failure))
            raise
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise
        except (KeyboardInterrupt, click.exceptions.Abort) as e:
            _interrupted(ctx, e)
        except BrokenPipeError:
            _reader_went_away()
        except Exception as exc:  # the one error path: one line, never a traceback
            report(ctx, exc)
        finally:
            end_progress()  # (before an error's line: click shows it after this)


def _interrupted(ctx: click.Context, e: BaseException) -> NoReturn:
    """Ctrl-C (or a prompt's answer cut off): one line, exit 130 for an interrupt (1 for
    an abort), and under ``--json`` the error document (click said "Aborted!", exit 1 —
    `verify`'s "damage found" — and printed no document)."""
    command = ctx.info_name or "walstore"
    if isinstance(e, KeyboardInterrupt):
        failure = Failure(f"{command} interrupted (Ctrl-C)", EXIT_INTERRUPTED,
                          "KeyboardInterrupt")
    else:
        failure = Failure(f"{command} aborted", EXIT_PROBLEM, "Abort")
    json_error(ctx, failure, failure.kind)
    raise failure from None


def _error_being_shown(exc: BaseException) -> click.ClickException | None:
    """The click error whose ``show()`` (its line on stderr) raised ``exc``, if any."""
    if isinstance(exc.__context__, click.ClickException):
        return exc.__context__
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        shown = frame.f_locals.get("self")
        if frame.f_code.co_name == "show" and isinstance(shown, click.ClickException):
            return shown
        tb = tb.tb_next
    return None


def _stderr_to_devnull() -> None:
    """Point stderr (file descriptor 2 and ``sys.stderr``) at /dev/null: it cannot be
    written, and the interpreter's flush at exit would fail on it again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    except OSError:
        pass


def _reader_went_away() -> NoReturn:
    """The reader of stdout closed it (``walstore stats | head -1``): what it wanted was
    delivered, so exit without a word (was: "stats failed: Broken pipe", exit 1): 0, or
    1 when the command had found a problem before it printed (noted: `verify` of a
    damaged store, `prepared` with transactions in doubt, `recover` leaving a refund owed
    exited 0 under ``| head -1``, a script's ``pipefail`` or ``PIPESTATUS`` reading
    "nothing to act on").  Stdout goes to /dev/null first, so the interpreter's own flush
    at exit is quiet."""
    stdout_to_devnull()
    raise SystemExit(EXIT_PROBLEM if problem_noted() else 0)


class WalstoreGroup(_OwnOutputWrites, click.Group):
    command_class = WalstoreCommand

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's ``main``; an error line that cannot be written (stderr full or gone:
        ``2>/dev/full``) keeps the error's exit status: the OSError raised while showing
        it escaped click, and a usage error exited 1 instead of 2, with a traceback
        Python could not write either."""
        try:
            return super().main(*args, **kwargs)
        except OSError as e:
            shown = _error_being_shown(e)
            if shown is None:
                raise
            stdout_to_devnull()
            _stderr_to_devnull()
            raise SystemExit(shown.exit_code) from None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """``walstore --json VERB ...`` is ``walstore VERB --json ...``: the flag before
        the verb was click's "No such option: --json" (exit 2) with no JSON document on
        stdout, where a script looking for one found nothing.  Moved after the verb, a
        verb without ``--json`` (``get``) refuses it as its own usage error, a document
        too.  (The group's own options are flags: the first other word is the verb.)"""
        head = 0
        while head < len(args) and args[head].startswith("-") and args[head] != "--":
            head += 1
        if head < len(args) and args[head] != "--" and "--json" in args[:head]:
            args = ([a for a in args[:head] if a != "--json"]
                    + [args[head], "--json"] + args[head + 1:])
        as_json = "--json" in args  # (before click's parser consumes the list)
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.ClickException as e:  # (the group's own usage error:
            if as_json:                              # `walstore --json`, `--json --bad`)
                emit_json_error(ctx.info_name or "walstore", e.format_message(),
                                e.exit_code, "UsageError" if e.exit_code == EXIT_USAGE
                                else type(e).__name__)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        """Usage errors found before a command runs (click's own, a malformed key or
        point) are a JSON document too under ``--json``."""
        args = [*getattr(ctx, "_protected_args", ()), *ctx.args]
        begin_command()
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException as e:
            if "--json" in args:
                command = e.ctx.info_name if getattr(e, "ctx", None) is not None else (
                    args[0] if args else "walstore")
                emit_json_error(command, e.format_message(), e.exit_code,
                                "UsageError" if e.exit_code == EXIT_USAGE
                                else type(e).__name__)
            raise


@click.group(cls=WalstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walstore")
@click.option("--debug", is_flag=True,
              help=f"Show the traceback of an error (or set {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """walstore: a crash-safe transactional key-value store for agent state.

    Keys: hex:00ff and b64:AP8= name bytes keys, str:TEXT the str key TEXT literally,
    anything else is a str key.  Points: tx:N, lsn:N, a txid, or a restore point name.
    """
    # a value nests up to about 1,024 levels (msgpack's bound, and `put` parses as deep);
    # rendering one recurses about twice a level: within Python's default 1,000, `get`,
    # `scan`, `history`, `dump` failed with RecursionError from ~480 levels on a value
    # the store (and `put`) had taken
    limit, stream = sys.getrecursionlimit(), sys.stdout
    errors = getattr(stream, "errors", None)
    if limit < RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)
    printable_stdout()

    def give_back() -> None:
        # (the CLI called in-process — main([...], standalone_mode=False) — left the
        # caller's recursion limit raised and its stdout writing lone surrogates where
        # it had raised: put back as the command ends)
        sys.setrecursionlimit(limit)
        if errors is not None and getattr(stream, "errors", errors) != errors:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError):
                pass
    click.get_current_context().call_on_close(give_back)


RECURSION_LIMIT = 3000


def printable_stdout() -> None:
    """Human output never fails on what it shows.  Under a UTF-8 locale (en_US.UTF-8:
    stdout's errors "strict"; only the C locale gives "surrogateescape") a file name that
    is not UTF-8 (`files`, `diff`, `rewind --dry-run`) failed the command as "undecodable
    data (UnicodeEncodeError ...)", exit 1, as if the store were damaged, and under a
    non-UTF-8 locale (latin-1) so did any non-ASCII key `scan` showed.  A UTF-8 stdout
    writes such a name's own bytes back (as ``ls`` does), another encoding escapes what
    it cannot hold (``\u65e5``).  ``--json`` is ASCII whatever the locale."""
    stream = sys.stdout
    if getattr(stream, "errors", None) != "strict" or not hasattr(stream, "reconfigure"):
        return
    try:
        utf8 = codecs.lookup(stream.encoding).name == "utf-8"
        stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")
    except (LookupError, ValueError, OSError):  # (a stream that cannot change: left as is)
        pass


from . import agent, data, files, maintenance, replication, tools, twophase  # noqa: E402,F401
