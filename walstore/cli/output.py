"""What the command line prints and how it reads what the user types.

Owns: strict RFC 8259 JSON rendering (:func:`jsonable`, :func:`emit_json`; streamed:
:func:`emit_json_list`, nested with :class:`JsonStream`), aligned tables
and key/value lines, times (:func:`show_time`), progress on stderr, the one-line failure
(:func:`fail`, :class:`Failure`, :class:`UsageProblem`), and the command-line syntax of keys
and points (:func:`parse_key` / :func:`show_key`, :func:`read_point`) with their click
types.

JSON rules (one document per command, ``json.dumps(..., allow_nan=False)``):

- Where JSON has no form for a value, a one-key "tag" object stands in:
  ``{"base64": "..."}`` bytes; ``{"float": "nan"}`` / ``{"float": "inf"}`` /
  ``{"float": "-inf"}`` a float JSON cannot spell; ``{"map": [[key, value], ...]}`` a map
  with any key that is not a str (bytes keys are ``{"base64": ...}`` there, ints stay ints),
  so a bytes key never looks like a str key.
- A str-keyed map that would itself look like a tag (exactly one key, named ``base64``,
  ``float`` or ``map``) is written in the ``{"map": ...}`` form too.  Hence every JSON object
  with exactly one key named ``base64``, ``float`` or ``map`` is a tag, and every other
  object is a map with those str keys: the rendering is unambiguous.

Keys on the command line (every KEY argument, ``--prefix`` and ``--scope``):
``hex:00ff`` and ``b64:AP8=`` name bytes keys; ``str:TEXT`` names the str key ``TEXT``
literally (``str:hex:x`` is the str ``"hex:x"``); anything else is a str key.  A malformed
``hex:``/``b64:`` value is a usage error.  Human output writes keys the same way (bytes as
``hex:...``, a str that starts with one of the prefixes as ``str:...``), so a key can be
pasted back.

VALUE (``put``): strict JSON (no NaN/Infinity, no number beyond a float's range); a
negative number is a value, not an option (:class:`NegativeNumberArguments`).

Times in human output (``log``, ``replicas``) are ISO 8601 with the offset and the
microsecond (:func:`show_time`), the resolution a restore compares at: pasted into
``restore --to`` the time shown for a commit includes that commit (cut to the second, it
named a state without it).

Points (``--to``): ``tx:N`` a txid, ``lsn:N`` a log position, bare digits a txid,
``name:TEXT`` the restore point named ``TEXT``, anything else a restore point name; a
malformed ``tx:``/``lsn:`` is a usage error.  A store written by walstore 0.1.0 may hold
restore points named ``tx:N`` or ``lsn:N`` (later walstores refuse such names): a
command that opened the store refuses such a spelling as ambiguous (:func:`settle_point`)
instead of silently taking the txid or LSN, and ``name:`` reaches the point.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, NoReturn

import click

from ._engine import check_key, type_and_message

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
PROGRESS_MIN_BYTES = 32 * 1024 * 1024
TAGS = frozenset({"base64", "float", "map"})
KEY_PREFIXES = ("str:", "hex:", "b64:", "json:")
# not shown as typed: C0/C1 controls, the line separators, and the bidirectional controls
# (U+202E shows the text after it reversed: a name "\u202egpj.exe" read as "exe.jpg")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e"
                      r"\u2066-\u2069]")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_DIGITS = re.compile(r"[0-9]+")


# ---- failing in one line ---------------------------------------------------------------
class Failure(click.ClickException):
    """A command's failure: one line on stderr, then exit with ``exit_code``.  ``kind`` is
    the class of the exception it reports (``type`` under ``--json``); None: the class of
    the exception being handled where it was raised, if any (the CLI's one error path
    looks at ``__context__``)."""

    def __init__(self, message: str, code: int = EXIT_PROBLEM, kind: str | None = None) -> None:
        # one line: a multi-line message is joined; any other control character (a \r or
        # a vertical tab in what the user typed, `--handlers $'x\ry'`) is escaped, as
        # :func:`one_line` writes it (it reached the terminal raw: probe audit48)
        super().__init__(one_line(" ".join(message.split()) if "\n" in message else message))
        self.exit_code = code
        self.kind = kind

    def show(self, file: Any = None) -> None:
        click.echo(f"walstore: {self.format_message()}", err=True)


class UsageProblem(Failure):
    """A usage error we detect ourselves (bad key syntax, a bad --handlers): exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE, "UsageError")


def fail(message: str, code: int = EXIT_PROBLEM, kind: str | None = None) -> NoReturn:
    """Stop the command with one line on stderr and exit status ``code``.  Under ``--json``
    the error document's ``type`` is ``kind``, else the class of the exception being
    handled where fail() is called (``except ReplicationError as e: fail(str(e))`` says
    ReplicationError; it said null)."""
    if kind is None:
        handled = sys.exc_info()[1]
        if handled is not None and not isinstance(handled, click.ClickException):
            kind = error_kind(handled)
    raise Failure(message, code, kind)


def error_kind(exc: BaseException) -> str:
    """The class name ``type`` shows for ``exc`` under ``--json``: its own, or for a
    private class (``_DestTaken``) the nearest public one it derives from."""
    return next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))


def error_text(exc: BaseException) -> str:
    """An exception's message (a KeyError's without the quotes str() adds)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc)


# ---- JSON --------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def jsonable(obj: Any) -> Any:
    """msgpack-shaped data (and report objects) as strict-JSON-ready data; see the module doc."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        if obj.isascii():
            return obj
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate escapes are
            return {"base64": b64(os.fsencode(obj))}  # no JSON text): its bytes
        return obj
    if isinstance(obj, int):
        return int(obj)  # LSN and other int subclasses
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"base64": b64(obj)}
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj)
        if plain and not (len(obj) == 1 and next(iter(obj)) in TAGS):
            return {k: jsonable(v) for k, v in obj.items()}
        return {"map": [[jsonable(k), jsonable(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=json_text)
    if hasattr(obj, "as_dict"):
        return jsonable(obj.as_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    raise TypeError(f"cannot render a {type(obj).__name__} as JSON")


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict RFC 8259 text of already-jsonable data (NaN/Infinity fail loudly)."""
    return json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False)


# Set once a command has begun its JSON document: a failure after that must not print a
# second one (see :func:`emit_json_error`).  One command runs per process.
_json_started = False


@contextlib.contextmanager
def sigint_held() -> Any:
    """Ctrl-C (SIGINT) held off while a piece of a JSON document is written, and taken
    (KeyboardInterrupt) right after it: a document, or a streamed list's item, is on
    stdout whole or not at all.  A Ctrl-C while the reader was slow (the write blocked on
    a full pipe) cut `actions --json`, `files --json`, `diff --json` ... in the middle of
    their document, and no error document followed (one had begun).  A write blocked on
    a reader that never reads stays blocked until it reads or goes away (a Ctrl-C in a
    terminal reaches the reader too); SIGTERM and SIGKILL end it as before."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def emit_json(doc: Any) -> None:
    """Print one JSON document on stdout (whole, or not at all: :func:`sigint_held`)."""
    global _json_started
    text = json_text(jsonable(doc), indent=2)
    with sigint_held():
        _json_started = True
        click.echo(text)


def begin_command() -> None:
    """A command starts: no JSON document begun yet, no problem noted (the CLI may run
    many in one process)."""
    global _json_started
    _json_started = False
    _PROBLEM_NOTED[0] = False


_PROBLEM_NOTED = [False]


def note_problem() -> None:
    """A problem found on the way (said on stderr already) that does not stop the
    command: it does its work and prints its output, then exits 1.  A command that knows
    its verdict before it prints (`verify`, `recover`, `prepared`, ...) notes it first, so
    a reader that goes away mid-output (``| head -1``) still gets exit 1."""
    _PROBLEM_NOTED[0] = True


def problem_noted() -> bool:
    return _PROBLEM_NOTED[0]


def emit_json_error(command: str, message: str, code: int, kind: str | None) -> None:
    """A failing ``--json`` command's one document: ``{"error": {...}}`` on stdout (the one
    line on stderr stays), unless the command had already begun its own document."""
    if _json_started:
        return
    # the message is text, always a JSON string: one naming a file or URL that is not
    # valid UTF-8 (surrogate escapes, as argv holds it) became {"base64": ...}, an object
    # where scripts read a string (probe audit48); its surrogates are written as \udcff,
    # as the stderr line shows them
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        emit_json({"error": {"command": command, "message": message, "exit": code,
                             "type": kind}})
    except OSError:
        # the reader of stdout went away (``| head -1``, a script that stopped reading),
        # or stdout cannot be written (``> /dev/full``: ENOSPC, EIO): the document is
        # nobody's, but the error's line on stderr and its exit status still are; raised
        # on from here, click ended the process at once with exit 1 and said nothing
        # (`stats MISSING --json | true`: no line, 1 for a usage error), and an ENOSPC
        # printed a traceback
        stdout_to_devnull()


def stdout_to_devnull() -> None:
    """Point stdout at /dev/null (its reader went away): later writes, and the
    interpreter's own flush at exit, are quiet instead of raising BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class JsonStream:
    """An item of :func:`emit_json_list` that is itself streamed: the object
    ``{**head, name: [items...]}``, each of ``items`` an item or a JsonStream again (a
    listing nested in a listing: ``files``' workspaces, their paths, their versions)."""

    __slots__ = ("head", "name", "items")

    def __init__(self, head: dict, name: str, items: Iterable[Any]) -> None:
        self.head, self.name, self.items = head, name, items


def _json_pieces(item: Any, prefix: str, depth: int) -> Iterator[tuple[str, int]]:
    """``item``'s text in pieces, each whole JSON tokens (``prefix``, the separator before
    it, joined to its first piece: never a separator without what follows it), with how
    many JsonStreams each opens (1) or closes (-1)."""
    if not isinstance(item, JsonStream):
        yield prefix + json_text(jsonable(item)), 0
        return
    yield (prefix + "{" + "".join(f"{json_text(k)}: {json_text(jsonable(v))}, "
                                  for k, v in item.head.items())
           + f"{json_text(item.name)}: [", 1)
    sep = "\n" + "  " * (depth + 1)
    for sub in item.items:
        yield from _json_pieces(sub, sep, depth + 1)
        sep = ",\n" + "  " * (depth + 1)
    yield "]}", -1


def emit_json_list(name: str, items: Iterable[Any], head: dict | None = None,
                   tail: Callable[[], dict] | None = None) -> None:
    """Print ``{**head, name: [items...], **tail()}`` as one JSON document, streaming the
    items (``head``'s members first, ``tail()``'s after the list: what is known only once
    the items are out, e.g. ``more``).  The first item is taken before anything is printed
    (a command failing at once prints its error document instead); a failure after that
    closes the document with ``"error"`` (what was streamed stays valid JSON) and is
    raised on."""
    global _json_started
    it = iter(items)
    opening = "{" + "".join(f"{json_text(k)}: {json_text(jsonable(v))}, "
                            for k, v in (head or {}).items()) + f"{json_text(name)}: ["

    def closing() -> str:
        return "".join(f", {json_text(k)}: {json_text(jsonable(v))}"
                       for k, v in (tail() if tail else {}).items()) + "}"
    try:
        first = next(it)
    except StopIteration:
        end = closing()
        with sigint_held():
            _json_started = True
            click.echo(f"{opening}]{end}")
        return
    sep = "\n  "
    item = first
    closers: list[str] = []  # (what closes the JsonStreams an item left open)
    try:
        with sigint_held():  # (a Ctrl-C taken as this ends: the document is closed below)
            _json_started = True
            click.echo(opening, nl=False)
        while True:
            for text, opens in _json_pieces(item, sep, 1):
                with sigint_held():  # (an item, or a piece of a streamed one, whole or not
                    click.echo(text, nl=False)  # at all, and ``closers`` kept with it)
                    if opens > 0:
                        closers.append("]}")
                    elif opens < 0:
                        closers.pop()
            sep = ",\n  "
            item = next(it)
    except StopIteration:
        end = None
    except (Exception, KeyboardInterrupt) as e:
        # (Ctrl-C too: a KeyboardInterrupt is no Exception, and went past this, leaving
        # stdout in the middle of the list: no JSON document at all)
        why = ("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt)
               else f"{type_and_message(e)}")
        with sigint_held():
            click.echo("".join(reversed(closers))
                       + f"\n], {json_text('error')}: {json_text(why)}}}")
        raise
    try:
        end = closing()
    except (Exception, KeyboardInterrupt) as e:
        why = ("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt)
               else f"{type_and_message(e)}")
        with sigint_held():
            click.echo(f"\n], {json_text('error')}: {json_text(why)}}}")
        raise
    with sigint_held():
        click.echo(f"\n]{end}")


def emit_summary(doc: dict, as_json: bool) -> None:
    """A flat summary: one JSON document, or sorted aligned ``name  value`` lines."""
    if as_json:
        emit_json(doc)
    else:
        kv_lines([(k, _summary_value(v)) for k, v in sorted(doc.items())])


def _summary_value(v: Any) -> Any:
    """A summary's value for a human: ``-`` for nothing (None, an empty list or mapping),
    a list's items joined by commas, a mapping as compact JSON (`stats` printed Python's
    ``None`` and ``[]`` — audit48)."""
    if v is None or (isinstance(v, (list, tuple, dict)) and not v):
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) if isinstance(x, (str, int)) else show_value(x) for x in v)
    if isinstance(v, dict):
        return show_value(v)
    return v


LIST_SHOWN = 20  # items of a list a human line shows (--json: all)


def some(items: Any, shown: int = LIST_SHOWN, text: Callable[[Any], str] = str) -> str:
    """A long list in one short line: the first ``shown``, then how many more (``--json``
    has them all)."""
    items = list(items)
    head = ", ".join(map(text, items[:shown]))
    return head + (f", ... ({len(items) - shown} more; --json lists them all)"
                   if len(items) > shown else "")


def show_value(v: Any) -> str:
    """A value as compact strict JSON (``get``, and the start of a table's cell)."""
    return json_text(jsonable(v))


CELL_CHARS = 200  # a value in a table row is shown up to this long (--json: whole)


def show_cell(v: Any) -> str:
    """A value in a table row: compact strict JSON, cut at CELL_CHARS with what was left
    out said (`scan` printed a 200 KB value whole in one row)."""
    text = show_value(v)
    if len(text) <= CELL_CHARS:
        return text
    return f"{text[:CELL_CHARS]}... ({len(text):,} chars; --json or `get` shows it whole)"


def cut_text(text: str, limit: int = CELL_CHARS) -> str:
    """A text in a table row or a listing's line (an action's last error: a compensator's
    exception message, kept up to 4 KB), cut at ``limit`` saying how long it is: a row
    of `actions`, `recover` and `verify` was 4 KB wide (probe-audit59)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} chars; --json shows it whole)"


def parse_json_value(text: str) -> Any:
    """A VALUE argument: strict JSON (NaN/Infinity are not JSON and are refused, and so
    is a number too large for a float, which ``json`` would read as Infinity)."""
    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    def finite(token: str) -> float:
        number = float(token)
        if not math.isfinite(number):
            shown = token if len(token) <= 40 else token[:37] + "..."
            raise ValueError(f"{shown} is beyond a float's range (an infinite float is "
                             f"{{\"float\": \"inf\"}} with --tagged)")
        return number
    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except ValueError as e:
        raise UsageProblem(f"VALUE must be JSON ({e}); quote strings: '\"text\"'") from None
    except RecursionError:
        raise UsageProblem("VALUE nests too deeply to parse") from None


# a dashed word that starts like a number is a VALUE (``-5``, ``-1e3``; ``-05``, ``-5x``,
# ``-1,2`` too, which then fail as JSON, naming the value, where click said "No such
# option '-0'"); ``match``, not ``fullmatch``: whatever follows the first digit
_NEGATIVE_NUMBER = re.compile(r"-[0-9.]")


class NegativeNumberArguments(click.Command):
    """A command whose arguments may be negative JSON numbers: ``put PATH k -5`` (what
    ``get`` printed pastes back) stores -5, where click took ``-5`` for an unknown option.
    Only when every dashed word before ``--`` is one of the command's options or a
    negative number are unknown options let through as arguments, so a mistyped option
    is still "No such option"."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        words = args[:args.index("--")] if "--" in args else args
        known = {o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
        dashed = [w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-"]
        if any(_NEGATIVE_NUMBER.match(w) for w in dashed):
            unknown = [w for w in dashed if w not in known and not _NEGATIVE_NUMBER.match(w)]
            if unknown:  # (name the mistyped option, not the number)
                import difflib
                raise click.NoSuchOption(unknown[0], possibilities=difflib.get_close_matches(
                    unknown[0], sorted(known)), ctx=ctx)
            ctx.ignore_unknown_options = True
        return super().parse_args(ctx, args)


def untag(doc: Any) -> Any:
    """The inverse of the JSON rendering (``put --tagged``: what ``get`` printed, pasted
    back): a one-key object named ``base64``, ``float`` or ``map`` is its tag's value."""
    if isinstance(doc, list):
        return [untag(x) for x in doc]
    if not isinstance(doc, dict):
        return doc
    if len(doc) == 1:
        (tag, v), = doc.items()
        if tag == "base64":
            if not isinstance(v, str):
                raise UsageProblem('a {"base64": ...} tag holds a str')
            try:
                return base64.b64decode(v.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                raise UsageProblem(f"bad base64 in a tag: {v[:40]!r}") from None
        if tag == "float":
            if v not in ("nan", "inf", "-inf"):
                raise UsageProblem(f'a {{"float": ...}} tag is "nan", "inf" or "-inf", '
                                   f'not {v!r}')
            return float(v)
        if tag == "map":
            if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2
                                                  for p in v):
                raise UsageProblem('a {"map": ...} tag holds [[key, value], ...] pairs')
            out = {}
            for k, val in v:
                k = untag(k)
                if isinstance(k, (list, dict)):
                    raise UsageProblem(f"a map key cannot be {type(k).__name__}")
                out[k] = untag(val)
            return out
    return {k: untag(v) for k, v in doc.items()}


# ---- human output ----------------------------------------------------------------------------
def _cell(c: Any) -> str:
    """A table cell or a key/value line's value on one line: every control character
    escaped (:func:`one_line`).  Only \\r, \\n and \\t were: a file or action name
    holding an ESC sequence (``\\x1b[2J`` clears the screen) or a vertical tab reached
    the terminal from `files`, `diff` and `actions` (probe audit48)."""
    return one_line(c if isinstance(c, str) else str(c))


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


TABLE_PAGE = 500  # rows a streamed table aligns at a time


def stream_table(rows: Iterable[list[Any]], headers: list[str]) -> None:
    """:func:`table` of rows that come one at a time (``scan``, ``log``, ``history``),
    printed a page of TABLE_PAGE rows at a time, so a listing of any length is never held
    whole in memory (those verbs collected every row first).  A listing of one page is
    what :func:`table` prints; past it, each page is aligned at least as wide as those
    before it."""
    widths = [len(h) for h in headers]
    page: list[list[str]] = []
    first = True

    def flush() -> None:
        nonlocal first
        for r in page:
            for i, c in enumerate(r):
                widths[i] = max(widths[i], len(c))
        if first:
            click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
            first = False
        for r in page:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        page.clear()
    for r in rows:
        page.append([_cell(c) for c in r])
        if len(page) >= TABLE_PAGE:
            flush()
    if page or first:
        flush()


def show_time(ts: float | None, *, local: bool = False) -> str:
    """A record's float stamp as ISO 8601 with its offset and the microsecond, rounded as
    ``datetime.fromtimestamp`` rounds it (as a restore to a time compares stamps): pasted
    into ``restore --to`` it names a state that includes what it stamps.  UTC, or the local
    zone (with its offset) when ``local``; ``-`` for no stamp."""
    if not ts:
        return "-"
    when = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return (when.astimezone() if local else when).isoformat(timespec="microseconds")


def kv_lines(pairs: list[tuple[str, Any]]) -> None:
    if not pairs:
        return
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        click.echo(f"{k.ljust(width)}  {_cell(v)}")


_PROGRESS_LINE_OPEN = [False]  # a progress line is on stderr without its newline yet


def progress_printer(label: str) -> Callable[[int, int], None]:
    """A progress callback printing to stderr for large walks (and only then).  Its line
    is ended by ``end_progress`` when the command ends (a walk ends where the log does,
    often before the preallocated bytes its total counts: the line stayed open, and the
    next output, an error's line too, was written on it)."""
    state = {"last": -1}

    def show(done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        pct = int(100 * done / max(total, 1))
        # a line each time the count passes another 5% (steps of 2.49%, a MiB of 42 MB,
        # never met a multiple of 5 exactly: 0% and 100% were all that was shown)
        if pct != state["last"] and (pct // 5 != state["last"] // 5 or done >= total):
            state["last"] = pct
            line = f"{label}: {done / 1e6:8.1f} / {total / 1e6:.1f} MB ({pct:3d}%)"
            try:
                if not _stderr_is_a_terminal():  # (a log: a line each, no carriage returns)
                    click.echo(line, err=True)
                    return
                click.echo(f"\r{line}", err=True, nl=done >= total)
                _PROGRESS_LINE_OPEN[0] = done < total
            except OSError:  # (stderr on a full disk, closed: progress is not the work —
                pass  # `verify 2>/dev/full` failed a healthy store, `backup` made no copy)
    return show


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def end_progress() -> None:
    """End a progress line left open on stderr (what follows starts on a line of its
    own)."""
    if _PROGRESS_LINE_OPEN[0]:
        _PROGRESS_LINE_OPEN[0] = False
        with contextlib.suppress(OSError):
            click.echo("", err=True)


def phase_progress(label: str) -> Callable[[int, int], None]:
    """A progress printer for one part of a longer work (stderr, text mode), starting on a
    line of its own: the line of the part before may be left open (a log walk ends where
    the log does, before the total its preallocated bytes count)."""
    show = progress_printer(label)
    first = [True]

    def step(done: int, total: int) -> None:
        if first[0]:
            first[0] = False
            end_progress()
        show(done, total)
    return step


# ---- keys ----------------------------------------------------------------------------------
def parse_key(text: str) -> str | bytes:
    """A key as typed: ``hex:``/``b64:`` bytes, ``str:`` a literal str, else a str."""
    if text.startswith("str:"):
        return text[4:]
    if text.startswith("hex:"):
        digits = text[4:]
        if not _HEX.fullmatch(digits):
            raise UsageProblem(f"bad key {text!r}: after 'hex:' come pairs of hex digits "
                               f"(write str:{text} for the str key)")
        return bytes.fromhex(digits)
    if text.startswith("json:"):
        try:
            key = json.loads(text[5:])
        except ValueError:
            key = None
        if not isinstance(key, str):
            raise UsageProblem(f"bad key {text!r}: after 'json:' comes a JSON string (write "
                               f"str:{text} for the str key)")
        return key
    if text.startswith("b64:"):
        try:
            return base64.b64decode(text[4:].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise UsageProblem(f"bad key {text!r}: after 'b64:' comes padded standard base64 "
                               f"(write str:{text} for the str key)") from None
    return text


def show_key(k: str | bytes) -> str:
    """A key as a user would type it back (the inverse of :func:`parse_key`)."""
    if isinstance(k, (bytes, bytearray, memoryview)):
        return "hex:" + bytes(k).hex()
    if _CONTROL.search(k):  # (a terminal would act on them, a pipe strip them: shown as a
        return "json:" + json.dumps(k)  # JSON string, "\x1b[31mred" no longer as "red")
    # (a key starting with "-" pasted back as it was shown, `walstore get S -x`, is read
    # as an option: "No such option: -x", exit 2)
    return "str:" + k if k.startswith(KEY_PREFIXES) or k.startswith("-") else k


def one_line(text: str) -> str:
    """Free text (a record's summary) on one line: each control character (a newline, an
    ESC a terminal would act on) written as its JSON escape (``\\n``, ``\\u001b``)."""
    return _CONTROL.sub(lambda m: json.dumps(m.group())[1:-1], text)


def show_gid(gid: str) -> str:
    """A 2PC gid as an operator would type it back: as it is, or as a JSON string when it
    holds characters a terminal would act on (a newline split ``recover``'s list of
    in-doubt gids into lines that each named nothing), has spaces at an end (" g " was
    shown as "g", which names nothing), holds a comma (``recover`` lists gids joined by
    ", ": "a, b" read as two), or begins with a quote (so a shown gid that looks like
    JSON is JSON).  The 2PC verbs take a GID in that form back
    (walstore.cli.twophase: ``typed_gid``)."""
    if _CONTROL.search(gid) or gid != gid.strip() or gid.startswith('"') or "," in gid:
        return json.dumps(gid)
    return gid


def show_point_name(name: str) -> str:
    """A restore point name as an operator would type it back (``--to``): as it is, or as a
    JSON string (quoted: a shell takes the quotes off) when spaces begin or end it or it
    holds control characters — " name" and "name " were shown as "name" is, padded, and
    the one pasted back named another point, or none."""
    if name.startswith(("tx:", "lsn:", "name:")) or (name.isascii() and name.isdigit()):
        name = "name:" + name  # (typed back bare it reads as a txid or an LSN: 0.1.0's)
    if _CONTROL.search(name) or name != name.strip():  # (other non-ASCII text shown as
        return one_line(json.dumps(name, ensure_ascii=False))  # it is: \u escapes of the
    return name                                                # controls only)


class KeyType(click.ParamType):
    """A KEY on the command line: parsed (:func:`parse_key`) and checked as walstore checks
    a key (not empty, at most MAX_KEY_BYTES, valid UTF-8), so a bad one is a usage error
    (exit 2) before the store is opened.  ``allow_empty`` (scan's ``--prefix``): a bare ''
    is no prefix (None: every key), while an empty but typed prefix stays what it names, as
    in the Python call it stands for: ``str:`` (or ``json:""``) the str prefix '' (every str
    key), ``hex:``/``b64:`` the bytes prefix b'' (every bytes key).  (Both became "no
    prefix", listing str and bytes keys alike: probe-docs.)"""

    name = "KEY"

    def __init__(self, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty

    def convert(self, value: Any, param: Any, ctx: Any) -> str | bytes | None:
        if self.allow_empty and value == "":
            return None
        key = parse_key(value) if isinstance(value, str) else value
        if self.allow_empty and not key:
            return key
        try:
            check_key(key)
        except (TypeError, ValueError) as e:
            raise UsageProblem(f"bad key {value!r}: {e}") from None
        return key


KEY = KeyType()
PREFIX = KeyType(allow_empty=True)  # scan --prefix: '' is every key, str:/hex: every str/bytes key


# ---- points ----------------------------------------------------------------------------------
class SpelledTxid(int):
    """A txid the command line read from ``tx:N`` (``text``): a restore point so named (a
    walstore 0.1.0 store may hold one) makes it ambiguous (:func:`settle_point`)."""
    text: str = ""

    def settle(self, names: Any) -> Any:
        return _settle_for_replica(names, self)


class SpelledLSN(int):
    """An LSN the command line read from ``lsn:N`` (``text``; see :class:`SpelledTxid`).
    Not a walstore.LSN itself: :func:`settle_point` / :func:`plain_point` make it one."""
    text: str = ""

    def settle(self, names: Any) -> Any:
        return _settle_for_replica(names, self)


class PointName(str):
    """A restore point name the command line read from ``name:NAME`` (the point named
    NAME); ``whole`` keeps the text as typed (a point named ``name:NAME`` itself, made
    before ``name:`` meant anything, is that one when no point NAME exists)."""
    whole: str = ""

    def settle(self, names: Any) -> Any:
        return _settle_for_replica(names, self)


def read_point(text: str) -> Any:
    """``tx:N`` (a txid), ``lsn:N`` (an LSN), bare digits (txid), ``name:NAME`` (the
    restore point NAME), else a name, as the command line's POINT options read them: the
    ``tx:``/``lsn:``/``name:`` spellings come back as :class:`SpelledTxid` /
    :class:`SpelledLSN` / :class:`PointName`, for :func:`settle_point` (a command with its
    store open) or :func:`plain_point`."""
    for prefix in ("tx:", "lsn:"):
        if text.startswith(prefix):
            rest = text[len(prefix):]
            if not _DIGITS.fullmatch(rest):
                raise UsageProblem(f"bad point {text!r}: after {prefix!r} comes a "
                                   f"non-negative number")
            out = (SpelledTxid if prefix == "tx:" else SpelledLSN)(int(rest))
            out.text = text
            return out
    if text.startswith("name:") and len(text) > 5:
        name = PointName(text[5:])
        name.whole = text
        return name
    if _DIGITS.fullmatch(text):
        return int(text)
    if not text:
        raise UsageProblem("a point is tx:N, lsn:N, a txid or a restore point name, not ''")
    return text


def parse_point(text: str) -> Any:
    """``tx:N`` (int txid), ``lsn:N`` (walstore.LSN), bare digits (txid), ``name:NAME``
    (the name NAME), else a name: :func:`read_point` as the Python API takes it."""
    return plain_point(read_point(text))


def _settle_for_replica(names: Any, point: Any) -> Any:
    """:func:`settle_point` for ``walstore restore`` (its replica's restore point names, as
    ``walstore.restore`` reads them from the manifest: a ValueError is its usage error)."""
    try:
        return settle_point(names, point)
    except UsageProblem as e:
        raise ValueError(e.message) from None


def plain_point(point: Any) -> Any:
    """``point`` as the Python API takes it (an int txid, a walstore.LSN, a str name)."""
    import walstore
    if isinstance(point, SpelledLSN):
        return walstore.LSN(int(point))
    if isinstance(point, SpelledTxid):
        return int(point)
    if isinstance(point, PointName):
        return str(point)
    return point


def settle_point(names: Any, point: Any) -> Any:
    """The point a command line spelling means in a store whose restore point names are
    ``names`` (a container), as the Python API takes it.  Walstore 0.1.0 (and walstores
    until ``restore_point`` refused such names) let a restore point be named ``tx:5`` or
    ``lsn:120``: in a store upgraded from it, ``tx:5`` read silently as the txid while the
    store held the point (`rewind --to tx:5` rewound to another state, exit 0).  Such a
    spelling is now a usage error naming both readings and how to write each
    (``name:tx:5``: the point).  ``name:NAME`` is the point NAME; when no point NAME
    exists but one named ``name:NAME`` does (a name given before ``name:`` was read), that
    one; when both exist, a usage error (``name:name:NAME`` is the second)."""
    if point is None:
        return None
    if isinstance(point, (SpelledTxid, SpelledLSN)) and point.text in names:
        n, text = int(point), point.text
        if isinstance(point, SpelledTxid):
            what, other = "transaction", f"{n} (bare digits) for the transaction"
        else:  # (leading zeros: the same LSN, spelled as no such point is named)
            alt = next(a for a in (f"lsn:{'0' * z}{n}" for z in range(1, 1000))
                       if a not in names)
            what, other = "log position", f"{alt} for the log position"
        raise UsageProblem(f"{text!r} is ambiguous here: it names {what} {n} and "
                           f"also a restore point an older walstore let be named {text!r}; "
                           f"write name:{text} for the restore point, or {other}")
    if isinstance(point, PointName) and point.whole in names:
        if str(point) in names:
            raise UsageProblem(f"{point.whole!r} is ambiguous here: there are restore "
                               f"points named {str(point)!r} and {point.whole!r}; write "
                               f"name:{str(point)} for the first, name:{point.whole} for "
                               f"the second")
        return point.whole
    return plain_point(point)


def point_text(point: Any) -> str:
    """A point as the command line spells it (``tx:N``, ``lsn:N``, a name): a JSON
    document that echoed a txid and an LSN as the same bare number named neither."""
    import walstore
    point = plain_point(point)
    if isinstance(point, walstore.LSN):
        return f"lsn:{int(point)}"
    if isinstance(point, int):
        return f"tx:{point}"
    point = str(point)  # (a name that would read back as a point: ``name:`` before it)
    if point.startswith(("tx:", "lsn:", "name:")) or (point.isascii() and point.isdigit()):
        return "name:" + point
    return point


def parse_txid(text: str) -> int:
    """A transaction id as the command line spells it: digits or ``tx:N`` (as every
    point takes it, and as ``--json`` documents name a txid); ``lsn:N`` is a log
    position, never taken for the transaction of that number.  (`walstore revert PATH
    tx:5` said "'tx:5' is not a valid integer range", click's words for its type.)"""
    rest = text[3:] if text.startswith("tx:") else text
    if _DIGITS.fullmatch(rest) and int(rest) >= 1:
        return int(rest)
    if text.startswith("lsn:"):
        raise UsageProblem(f"TXID is a transaction id (digits or tx:N), not a log position "
                           f"({text!r}); `walstore log` lists each transaction's TXID and LSN")
    raise UsageProblem(f"TXID is a transaction id (digits or tx:N, from 1), not {text!r}")


class TxidType(click.ParamType):
    name = "TXID"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return parse_txid(value) if isinstance(value, str) else value


TXID = TxidType()


class PointType(click.ParamType):
    name = "POINT"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return read_point(value) if isinstance(value, str) else value


POINT = PointType()
