"""External side effects (the Saga pattern): intents, results, compensations.

An agent wraps a side effect in ``tx.action(name, args=..., compensate="refund")``.
Entering it makes an ACTION_INTENT record durable *before* the body runs (write-ahead
for side effects); leaving it logs the result.  Every way a transaction can end without
committing leads to the same place: an ABORT (or ROLLBACK_PREPARED) record, durable,
which turns its actions' rows to ``pending`` (:mod:`walstore.engine.tables`), and then
their compensations, newest first, each recorded by a COMPENSATED record.  That holds for
``rollback()``, an exception, a conflict at commit, ``rollback_prepared``, and a crash
(recovery writes the ABORT of every loser).  A revert or rewind *claims* the committed
actions it undoes in its own COMMIT (two undoers cannot both claim one action), then
compensates them the same way.

Exactly once: the decision (ABORT / the claiming COMMIT) is durable before any
compensation runs; a compensation runs only for an action whose state is ``pending``,
under a per-action guard, and its outcome is one durable record.  A crash between a
compensator's effect and its record means it runs again at the next open with the same
``act.key`` (idempotency key), so an external system that honours the key sees it once.

When the store cannot record anything any more (an fsync failed), no compensation runs:
the actions stay owed in the log and the next open's recovery runs them.  When only the
ABORT's write failed (disk full, EIO: the log goes on), the transaction, which never
reached its commit point, is undone at once and every outcome recorded; recovery ends it
later as a loser, whose ABORT changes no settled row (``Saga._settle_unended``).

States (``Action.state``): ``committed``, ``pending``, ``failed``, ``compensated``,
``resolved``, ``needs-redo``; an action of a transaction still in flight reads
``pending`` with ``in_flight`` set, and is not owed yet.
"""
from __future__ import annotations

import collections
import dis
import inspect
import sys
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..codec import ACTION_ROW_BYTES, MAX_ACTION_BYTES, pack, storable, unpack, utf8
from ..errors import (ActionIdTypeError, CompensationFailed, EmptyArgumentError, ReadOnlyError,
                      StoreClosed, UnknownAction, WalstoreError, shown,
                      type_and_message)
from ..log import records
from ..log.format import RecordType
from ..log.writer import LogFailed, WalWriteError
from ..signals import deferred
from ..engine import tables

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..engine.transaction import Transaction

COMPENSATION_RETRIES = 3
COMPENSATION_BACKOFF = 0.02
# the error text recorded for an action (its body's exception) or a failed compensation
# (the compensator's): at most this many UTF-8 bytes of it, then how much was cut (an
# unbounded one, a 3 MiB response body in the message, overran the COMMIT at commit, or
# the COMPENSATED record at rollback, with a bare record-size error)
MAX_ERROR_BYTES = 4096
PENDING, FAILED, COMPENSATED, RESOLVED, COMMITTED = (
    tables.PENDING, tables.FAILED, tables.COMPENSATED, tables.RESOLVED, tables.COMMITTED)
OPEN_STATES = tables.OWED_STATES


def own_copy(value: Any) -> Any:
    """``value`` (a msgpack value read from a row) as an object of the caller's own: a
    dict or list is copied whole (through msgpack, so any depth the store takes), other
    values are immutable and returned as they are."""
    if isinstance(value, (dict, list)):
        return unpack(pack(value))
    return value


@dataclass
class Action:
    """One external side effect, as compensators and ``pending_compensations()`` see it."""

    id: str
    txid: int
    name: str
    args: Any = None
    result: Any = None
    key: str = ""
    compensate: str | None = None
    state: str = PENDING
    error: str | None = None
    attempts: int = 0
    ts: float = field(default_factory=time.time)
    lsn: int = 0  # LSN of its intent record: the order in which actions happened
    scope: Any = None
    held: bool = False      # owed, but never run automatically (inherited by a copy)
    in_flight: bool = False  # its transaction has not ended yet
    # what its body raised (its ``error`` as the body's end recorded it), kept when
    # ``error`` says something else (its transaction rolled back, a compensation failed):
    # a compensated one says it again (the row of an action whose body raised read
    # "compensated" with no error, what the body raised lost)
    raised: str | None = field(default=None, compare=False)
    # (thread ident, the frame running the ``with``) while its body runs: see ActionScope
    # and ``blocks_rollback`` (the frame itself, not its id: a returned frame's id is
    # soon another's)
    _body: tuple[int, Any] | None = field(default=None, repr=False, compare=False)
    # what its row adds to its transaction's COMMIT (args, result, error, names: counted in
    # ``tx.action_bytes``); given back by a rollback to a savepoint that takes it out
    commit_bytes: int = field(default=0, repr=False, compare=False)
    # the args and result as recorded (the intent's, the body's end), copies of walstore's
    # own that no caller holds: the COMMIT's row is made of them, so ``act.result``
    # changed in place after the body (or ``act.args`` in it) no longer reached the COMMIT
    # event in memory and the row LMDB got from it, the WAL saying otherwise (audit 61).
    # None: as ``args``/``result`` (an Action read back from a row: those are copies)
    recorded: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def blocks_rollback(self) -> str | None:
        """Why a rollback (or one to a savepoint before it) must wait: its ``with
        tx.action(...)`` body is still running, so its side effect may not have happened
        yet (compensating it first, then the body acting, left the charge standing while
        the store said "compensated").  Whether the body runs is read off the frame of
        its ``with`` (still executing: ``_frame_executing``), so an interrupt that cut
        the block's exit short never leaves the action refusing."""
        if not _body_running(self._body):
            return None
        return (f"action {self.name!r} ({self.id}) is still running (its side effect may "
                f"not have happened yet); leave its with block before rolling back")

    blocks_full_rollback = blocks_rollback

    @property
    def blocks_commit(self) -> str | None:
        """Why a commit or prepare must wait: its ``with tx.action(...)`` body is still
        running, so its result is not known yet (committed or prepared, the COMMIT carried
        ``result=None``; a prepared transaction's commit kept it so for good, and a later
        undo's compensator could not tell which charge to refund: probe-2pc44)."""
        if not _body_running(self._body):
            return None
        return (f"action {self.name!r} ({self.id}) is still running (its result is not "
                f"known yet); leave its with block first")

    def row(self) -> dict:
        args, result = (self.args, self.result) if self.recorded is None else self.recorded
        return {"id": self.id, "tx": self.txid, "name": self.name, "args": args,
                "result": result, "key": self.key, "compensate": self.compensate,
                "state": self.state, "error": self.error, "attempts": self.attempts,
                "ts": self.ts, "lsn": self.lsn, "scope": self.scope}

    @classmethod
    def from_row(cls, row: dict) -> "Action":
        """The action a row records, its ``args`` and ``result`` its own copies: a row
        folded from an unapplied event shares its dicts with that event (and the next
        reader's row), so a caller or a compensator changing ``action.args`` in place
        changed what ``actions()`` showed after, what the compensation was given, and,
        applied to LMDB from the event, the record itself (audit 61)."""
        state = row.get("state", PENDING)
        in_flight = state == tables.IN_FLIGHT
        return cls(row["id"], row["tx"], row.get("name") or "?", own_copy(row.get("args")),
                   own_copy(row.get("result")), row.get("key", ""), row.get("compensate"),
                   PENDING if in_flight else state, records.error_text_of(row.get("error")),
                   row.get("attempts", 0),
                   row.get("ts", 0.0), row.get("lsn", 0), row.get("scope"),
                   bool(row.get("held")), in_flight,
                   raised=records.error_text_of(row.get("raised")))

    def as_dict(self) -> dict:
        """The JSON view (``walstore actions --json``): the stored row's fields (``tx`` is
        the txid, the row's name for it) plus ``txid``, as the Python attribute is called."""
        d = self.row()
        d["txid"] = self.txid
        d["held"] = self.held
        d["in_flight"] = self.in_flight
        return d

    @property
    def owed(self) -> bool:
        return self.state in OPEN_STATES and not self.in_flight


def compensation_under_way(a: Action) -> bool:
    """Is ``a``, read from outside its store's live writer, a compensation that writer is
    running right now?  A live rollback logs its ABORT (the action reads owed from then:
    pending, error ``tables.ROLLED_BACK``, no attempt recorded) and then runs the
    compensations, each outcome one record: compensated, failed after its tries, or no
    compensator registered (its own error).  Only the caller knows a writer is alive
    (``engine.layout.writer_alive``); an interrupt that cut the rollback short between the
    two also reads so, until that writer's next ``retry_compensations`` or open."""
    return (a.state == PENDING and not a.in_flight and not a.held and bool(a.compensate)
            and a.attempts == 0 and a.error == tables.ROLLED_BACK)


class ActionScope:
    """``with tx.action(...) as act:`` — logs the intent on entry, the result on exit.

    Not the action: used without ``with`` (``act = tx.action(...)``) nothing is logged,
    so reading or setting an action's field on it (``act.key``, ``act.result = ...``)
    raises AttributeError saying so — setting ``result`` was silently kept on this object,
    and a charge made that way had no intent, no result and no compensation."""

    __slots__ = ("_saga", "_tx", "action", "_entered")

    def __init__(self, saga: "Saga", tx: "Transaction", action: Action) -> None:
        self._saga = saga
        self._tx = tx
        self.action = action
        self._entered = False

    def _not_entered(self, name: str) -> AttributeError:
        return AttributeError(
            f"tx.action({self.action.name!r}) returns a context manager, not the action: "
            f"write `with tx.action(...) as act:` and use act.{name} inside it (entering "
            f"logs the durable intent before the side effect runs; nothing was logged for "
            f"this one)")

    def __getattr__(self, name: str) -> Any:  # (only for what the object does not have)
        if name in _ACTION_FIELDS:
            raise self._not_entered(name)
        raise AttributeError(f"'ActionScope' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ActionScope.__slots__:
            raise self._not_entered(name)
        object.__setattr__(self, name, value)

    def __enter__(self) -> Action:
        if self._entered:  # (a second ``with`` on one scope logged a second intent under
            # the same id and idempotency key: two side effects, one action row — audit48)
            raise WalstoreError(f"action {self.action.id} ({self.action.name!r}) was "
                                f"entered already: one tx.action(...) is one side effect; "
                                f"call tx.action(...) again for another; nothing was logged")
        # Under the transaction's end lock, as a commit() or prepare() of another thread
        # is: that one either finds this body running (and refuses: blocks_commit) or has
        # ended before the intent is logged (then TransactionClosed, nothing logged, the
        # body never runs).  Between its check of running bodies and its record, an
        # intent logged by another thread ran its side effect after the commit took the
        # transaction: committed with no result, the action said "pending" for good and
        # was in no list of what is owed (probe-audit56).
        # (counted from before the intent to the body's start: a close() in another
        # thread waits for it, or refuses it — it closed the log under an intent just
        # logged, and the body's result was lost: audit 60)
        counted: list = []
        try:
            try:  # (counted inside: an interrupt right after the count cannot leave it so)
                self._saga.begin_entering(self.action, counted)
                with self._tx.end_lock:
                    self._saga.log_intent(self._tx, self.action)
                    self._entered = True
                    # while the body runs, its side effect may not have happened yet: a
                    # rollback (or one to a savepoint before it) would compensate it
                    # first (Action.blocks_rollback)
                    self.action._body = (threading.get_ident(), _block_frame())
            finally:
                if counted:  # (taken off by a C call, no Python call before it: an
                    # interrupt at the start of the method that took it off, or inside
                    # its ``deferred()``, left the count for good, and close() waited
                    # 5 s for an entry that had ended, then warned of actions "still
                    # running in other threads")
                    self._saga._entering.remove(counted)
        except BaseException:  # (an interrupt held off to the count's end: the body
            self.action._body = None  # never runs, and the rollback must not wait for it)
            raise
        return self.action

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._saga.engine.forked_from is not None:  # (a forked child's copy of its
            # parent's action: its result cannot be logged here; the parent's is the one)
            if exc_type is not None:
                return False  # (the child's exception passes as it is)
            self._saga.engine.check_not_forked()
        # (counted as leaving from before the body is marked ended until its result is
        # logged, by C calls on a list: a close() in another thread that found the body
        # ended and the result not yet logged rolled the transaction back, and the
        # action's row said result=None, the result the body had lost — audit 60's close
        # under an agent loop, 5 rounds in 288 on a loaded machine.  Not by keeping
        # ``_body`` set: each check of a running body walks this thread's frames, and on
        # CPython 3.11 a walk racing frames being pushed and popped crashed the process)
        token = threading.get_ident()
        leaving = self._saga._leaving
        try:
            leaving.append(token)
            self.action._body = None
            if exc_type is not None:
                self.action.error = error_text(exc)
            self._saga.log_result(self._tx, self.action)
        finally:
            if token in leaving:
                leaving.remove(token)
        return False


# what a misused ActionScope (never entered) is asked for: the fields of an Action
_ACTION_FIELDS = frozenset({"id", "txid", "name", "args", "result", "key", "compensate",
                            "state", "error", "scope"})


def error_text(exc: BaseException) -> str:
    """``"Type: message"`` of ``exc`` (``errors.type_and_message``: the type alone when
    the message is empty), as an action's error records it: at most MAX_ERROR_BYTES of it
    (see ``bounded_error``)."""
    return bounded_error(type_and_message(exc))


def bounded_error(text: str) -> str:
    """``text`` cut to its first MAX_ERROR_BYTES UTF-8 bytes plus ``"... (N bytes cut)"``
    when longer (on a character boundary)."""
    if len(text) <= MAX_ERROR_BYTES // 4:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_ERROR_BYTES:
        return text
    head = raw[:MAX_ERROR_BYTES].decode("utf-8", "ignore")
    return f"{head}... ({len(raw) - len(head.encode('utf-8')):,} bytes cut)"


def action_key(action_id: Any) -> str:
    """An action's id as given to ``get_action`` / ``resolve``: a str such as ``"1.10"``
    (or the Action itself); TypeError for anything else — a float ``1.10`` was str()ed to
    ``"1.1"``, another action, and resolved it."""
    if isinstance(action_id, Action):
        return action_id.id
    if not isinstance(action_id, str):
        raise ActionIdTypeError(f"no action with id {action_id!r}: an action id is a str "
                                f"such as '1.10' (Action.id), not {type(action_id).__name__}")
    return action_id


def check_resolve_note(note: str | None) -> None:
    """TypeError / ValueError unless ``note`` is a ``resolve`` note: None, or a str of at
    most MAX_ERROR_BYTES bytes of UTF-8 (it is kept in the action's row, as an error is)."""
    if note is not None and not isinstance(note, str):
        raise TypeError(f"a resolve note is a str or None, not {type(note).__name__}")
    if note is not None:  # (a lone surrogate failed in the record's packing, with a bare
        utf8(note, "resolve note")  # codec error naming nothing — probe-audit48)
    if note is not None and _error_bytes(note) > MAX_ERROR_BYTES:
        raise ValueError(f"a resolve note is at most {MAX_ERROR_BYTES:,} bytes of UTF-8, "
                         f"not {_error_bytes(note):,} (it is kept in the action's row; "
                         f"keep a longer report elsewhere and name it in the note)")


def _error_bytes(error: str | None) -> int:
    return 0 if error is None else len(error.encode("utf-8", "surrogatepass"))


# code flags of frames that can be suspended (generator, coroutine, async generator): such
# a frame is on no thread's stack while it waits at an ``await`` / ``yield``
_SUSPENDABLE = 0x20 | 0x80 | 0x100 | 0x200


def _body_running(body: tuple[int, Any] | None) -> bool:
    """Does the ``with tx.action(...)`` block ``body`` (thread ident, frame) still run?  A
    block in a coroutine or generator runs until its exit clears ``_body`` (suspended at an
    ``await``, its frame is on no stack: another task's ``prepare`` was accepted there and
    the action's result lost: review44); elsewhere, while its frame executes (an interrupt
    that cut the exit short never leaves the action refusing)."""
    if body is None:
        return False
    ident, frame = body
    if type(frame) is _StackEntry:
        return frame.running(ident == threading.get_ident())
    if frame.f_code.co_flags & _SUSPENDABLE:
        return True
    if ident == threading.get_ident():  # (its own thread: this very stack, which nothing
        # else changes meanwhile; the frame left as it is)
        return _on_this_stack(frame)
    return _frame_executing(frame)


# what may only pass an entry on: a context manager's ``__enter__`` (a wrapper of the
# action's) and ``contextlib.ExitStack.enter_context``, whose frames end before the block
_FORWARDERS = frozenset({"__enter__", "enter_context"})
# the opcode of a ``with`` statement calling ``__enter__`` (3.11: BEFORE_WITH; 3.10:
# SETUP_WITH)
_WITH_ENTRY = frozenset(dis.opmap[n] for n in ("BEFORE_WITH", "SETUP_WITH") if n in dis.opmap)


def _block_frame() -> Any:
    """What runs the block of the ``with`` entering an action (called from
    ``ActionScope.__enter__``): its caller's frame, or, entered through a wrapper's
    ``__enter__``, the frame that called that (the wrapper's ends before the block runs:
    the body was judged ended at once, and a commit or a rollback went through under it,
    its result lost).  A forwarder that is itself entering a ``with`` (``with
    tx.action(...)`` written inside an ``__enter__``) runs the block: it is the one.
    Entered through ``ExitStack.enter_context`` (directly, by a helper function, through
    a wrapper), a ``_StackEntry``: the block is the stack's, however far up or wherever
    the stack is kept."""
    f = sys._getframe(2)
    while f.f_code.co_name in _FORWARDERS and f.f_back is not None and \
            not f.f_code.co_flags & _SUSPENDABLE and not _entering_a_with(f):
        if f.f_code.co_name == "enter_context":
            entry = _StackEntry.of(f)
            if entry is not None:
                return entry
        f = f.f_back
    return f


class _StackEntry:
    """An action entered through ``contextlib.ExitStack.enter_context`` (or
    ``AsyncExitStack``'s): its body runs while the stack holds the exit callback of what
    was entered (the action's scope, or a wrapper of it), and while ``enter_context``
    itself still runs (the callback is pushed after ``__enter__`` returns).  The stack
    takes a callback off before calling it, so an exit an interrupt cut short counts as
    ended, and so does a stack dropped unclosed or one whose callbacks ``pop_all`` moved
    to another stack.  (A frame was used before: the helper's, ended at once, for
    ``return stack.enter_context(...)`` in a helper; then the outermost frame holding
    the stack, which kept a body whose exit was cut short "running" for as long as that
    frame ran, or for good in a coroutine: stop 74.)"""

    __slots__ = ("stack", "entered", "entering")

    def __init__(self, stack: Any, entered: Any, entering: Any) -> None:
        self.stack = weakref.ref(stack)
        self.entered = id(entered)  # (alive while its callback is: the callback holds it)
        self.entering: Any = entering  # the ``enter_context`` frame, until it ended

    @classmethod
    def of(cls, frame: Any) -> "_StackEntry | None":
        """The entry ``frame`` (``enter_context``'s) makes; None when it is not an exit
        stack's (some other function of that name)."""
        code = frame.f_code
        if code.co_argcount != 2:
            return None
        names = code.co_varnames[:2]
        stack = frame.f_locals.get(names[0])
        if not isinstance(getattr(stack, "_exit_callbacks", None), collections.deque):
            return None
        try:
            return cls(stack, frame.f_locals.get(names[1]), frame)
        except TypeError:  # (a stack that takes no weak reference)
            return None

    def running(self, own_thread: bool) -> bool:
        stack = self.stack()
        if stack is not None:
            callbacks = stack._exit_callbacks
            if isinstance(callbacks, collections.deque):
                for entry in list(callbacks):  # (a copy made in one C call)
                    callback = entry[1] if isinstance(entry, tuple) else entry
                    if id(getattr(callback, "__self__", None)) == self.entered:
                        return True
        frame = self.entering
        if frame is not None:
            if _on_this_stack(frame) if own_thread else _frame_executing(frame):
                return True
            self.entering = None
        return False


def _entering_a_with(f: Any) -> bool:
    """Is frame ``f`` (calling something now) at a ``with`` statement's entry?"""
    code, i = f.f_code.co_code, f.f_lasti
    return 0 <= i < len(code) and code[i] in _WITH_ENTRY


def _on_this_stack(frame: Any) -> bool:
    """Is ``frame`` on this thread's stack?"""
    f = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def _frame_executing(frame: Any) -> bool:
    """Is ``frame`` (not a generator's or coroutine's) of another thread still executing:
    on that thread's stack, running or a caller of what runs?  Asked in ONE C call:
    ``frame.clear()`` refuses an executing frame (RuntimeError, nothing changed) and
    empties a finished one.  A finished frame is only ever asked about when its block's
    exit never ran (an interrupt cut it short: the exit clears ``_body``): its locals are
    let go here, as ``traceback.clear_frames`` would (a finalizer among them runs now, as
    at any collection; a traceback of that interrupt shows the frame without them).  It
    used to walk the other thread's stack through ``f_back`` from
    ``sys._current_frames()``: on CPython 3.11 that deadlocked under a collection
    (gh-106883: audit 69), and the walk, whose loop lets the GIL go between two steps,
    raced the other thread pushing and popping frames and once crashed the process
    (a segmentation fault in a test worker: stop 72).  (The body's own thread walks its
    own stack: nothing races it there, and the frame keeps its locals — a traceback the
    program holds, a debugger's post-mortem, still shows them.)"""
    try:
        frame.clear()
    except RuntimeError:
        return True
    return False


def check_packable(what: str, value: Any) -> None:
    """TypeError unless ``value`` can be logged and read back (see codec.storable)."""
    storable(what, value)


def _in_doubt_note(gid: Any) -> str:
    """What an action of the prepared transaction ``gid`` says of itself."""
    return (f"in doubt: its transaction is prepared as gid {shown(gid)} (commit-prepared "
            f"or rollback-prepared decides; not owed until then)")


def newest_first(a: Action):
    """Newest first by when the intent was logged (its LSN), then by id."""
    txid, _, seq = a.id.partition(".")
    return (-a.lsn, -int(txid), -int(seq or 0))


class UndoProgress:
    """One undo's progress across the interrupts that land in it: the effects already
    handled (by ``id``), the file effects put back and their conflicts (and how many of
    each are recorded), the first interrupt (raised once the files are back), whether
    the undo ran to its end."""

    __slots__ = ("handled", "done", "conflicts", "recorded", "conflicts_recorded",
                 "interrupt", "finished")

    def __init__(self) -> None:
        self.handled: set[int] = set()
        self.done: list = []
        self.conflicts: list = []
        self.recorded = 0
        self.conflicts_recorded = 0
        self.interrupt: BaseException | None = None
        self.finished = False


def never_runs(fn: Callable) -> str | None:
    """Why calling ``fn`` would not run its body (an ``async def`` makes a coroutine, a
    generator function a generator): a compensator is called and its return taken as
    done, so such a one was recorded ``compensated`` with no refund made (Python only
    warned "coroutine ... was never awaited" — probe-audit48).  None for a plain one."""
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return ("is an async function: walstore calls a compensator and takes its return "
                "as done, so its body would never run; register a plain function (e.g. "
                "lambda action: asyncio.run(fn(action)))")
    if inspect.isgeneratorfunction(fn):
        return ("is a generator function: calling it runs none of its body; register a "
                "plain function")
    return None


def _unrun(result: Any) -> str | None:
    """What a compensator returned instead of running its body (a coroutine, a generator:
    nothing of it runs unless driven), closed so Python does not warn of it; None for any
    other return — a Task or Future it scheduled runs by itself, the compensator's own
    choice (counted failed and retried, it was scheduled once per try)."""
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        result.close()
    elif not inspect.isasyncgen(result):
        return None
    return f"a {type(result).__name__}"


def check_compensators(compensators: Any) -> dict[str, Callable]:
    """``compensators=`` of ``walstore.open``, checked before the store is touched: a
    mapping of non-empty str names to callables (a wrong one was accepted and failed only
    when a rollback, after the side effect, needed it: the action then ``failed``)."""
    if compensators is None:
        return {}
    if not isinstance(compensators, Mapping):
        raise TypeError(f"compensators= takes a dict of name -> callable, not "
                        f"{type(compensators).__name__}; nothing was opened")
    for name, fn in compensators.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"a compensator name must be a non-empty str, not {name!r}; "
                            f"nothing was opened")
        if not callable(fn):
            raise TypeError(f"compensator {name!r} is not callable (a "
                            f"{type(fn).__name__}); nothing was opened")
        why = never_runs(fn)
        if why:
            raise TypeError(f"compensator {name!r} {why}; nothing was opened")
    return dict(compensators)


class Saga:
    """The store's side of intents and compensations."""

    def __init__(self, engine: "Engine", compensators: dict[str, Callable] | None) -> None:
        self.engine = engine
        self.compensators: dict[str, Callable] = check_compensators(compensators)
        # action id -> the thread running its compensation (or resolving it); close()
        # waits for other threads' (see ``running_elsewhere``)
        self._running: dict[str, int] = {}
        self._resolving: set[str] = set()  # those of ``_running`` that ``resolve`` holds
        # action id -> the thread undoing the transaction (or undo) it belongs to: that
        # thread runs it in its turn, newest first and between the file effects; another
        # thread's ``compensate`` (``retry_compensations``) passes it over (see ``reserved``)
        self._reserved: dict[str, int] = {}
        # action id -> how many compensators its reserving thread was inside when it
        # reserved it (``_depth``): a compensator calling ``retry_compensations`` (or
        # rolling back) on that thread leaves what an outer level reserved to that level
        # (it ran the older compensations of the rollback it was part of at once, inside
        # the newest's and before the file changes between them were put back)
        self._reserved_depth: dict[str, int] = {}
        self._local = threading.local()  # .depth: compensators running on this thread
        # (reentrant: a signal handler runs on the main thread, maybe inside one of its
        # sections, and may ask ``pending_compensations()`` -- ``owed_now`` takes it:
        # with a plain Lock a SIGALRM handler asking it hung the process for good,
        # probe-audit70 review.  A C lock: no check between acquire and block)
        self._running_lock = threading.RLock()
        # close(): once it begins (``refuse_intents``), another thread's ``tx.action``
        # is refused before its intent is logged; those between that check and their
        # body's start are counted (``_entering``), and close() waits for them and for
        # the bodies (their results must be logged before the log closes)
        self._closing_thread: int | None = None
        self._entering: list = []  # (one ``counted`` list per entry under way)
        # actions whose body has ended and whose result is being logged (their threads'
        # idents): close() waits for those of other threads too
        self._leaving: list = []

    def compensator(self, name: str) -> Callable[[Callable], Callable]:
        if not isinstance(name, str) or not name:
            raise TypeError("a compensator name must be a non-empty str")

        def register(fn: Callable) -> Callable:
            if not callable(fn):
                raise TypeError(f"compensator {name!r} must be callable, not "
                                f"{type(fn).__name__}")
            why = never_runs(fn)
            if why:
                raise TypeError(f"compensator {name!r} {why}")
            self.compensators[name] = fn
            self._warn_owed_to(name)
            return fn
        return register

    def _warn_owed_to(self, name: str) -> None:
        """A compensator registered after open (``@store.compensator``) runs nothing that
        is owed already — the recovery at open ran only those given to ``walstore.open(...,
        compensators=...)``, and running them one name at a time would break newest first
        across names — so a RuntimeWarning names the owed ones it could run and how (they
        stayed pending without a word: the README's decorator form, after a crash, never
        refunded until someone thought of ``retry_compensations()``)."""
        eng = self.engine
        if eng.readonly or not eng.writable:
            return
        try:
            owed = [a.id for a in self.actions(pending=True)
                    if a.compensate == name and not a.held]
        except WalstoreError:
            return
        with self._running_lock:  # (not those a rollback or undo under way runs in its turn)
            owed = [aid for aid in owed if aid not in self._reserved
                    and aid not in self._running]
        if owed:
            import warnings
            shown_ids = ", ".join(owed[:10]) + (f", ... ({len(owed)} in all)"
                                                if len(owed) > 10 else "")
            warnings.warn(
                f"compensator {name!r} registered, but {len(owed)} compensation(s) owed to "
                f"it already ({shown_ids}) do not run by themselves: the recovery at open runs "
                f"only the compensators given to walstore.open(..., compensators=...); call "
                f"store.retry_compensations() to run them now (newest first)",
                RuntimeWarning, stacklevel=3)

    # ---- close() -------------------------------------------------------------------------
    def refuse_intents(self) -> None:
        """From now on an action entered by another thread than this one raises
        StoreClosed before its intent is logged (its body never runs)."""
        with self._running_lock:
            self._closing_thread = threading.get_ident()

    def entering_elsewhere(self) -> int:
        """How many actions are being entered now (their intent logged or being logged,
        their body about to run)."""
        with self._running_lock:
            return len(self._entering)

    def leaving_elsewhere(self) -> int:
        """How many actions' bodies other threads ran have ended with their results not
        yet logged (a close() run from inside this thread's own does not wait for it)."""
        me = threading.get_ident()
        return sum(1 for ident in list(self._leaving) if ident != me)

    def begin_entering(self, action: Action, counted: list) -> None:
        """An action is being entered: refused once close() began in another thread, else
        counted (noted in ``counted``) until the entry takes ``counted`` off the list."""
        with deferred(), self._running_lock:
            closer = self._closing_thread
            if closer is not None and closer != threading.get_ident():
                raise StoreClosed(f"store {self.engine.path} is closing: action "
                                  f"{action.name!r} was not begun (its body did not run, "
                                  f"nothing was logged)")
            self._entering.append(counted)
            counted.append(True)

    # ---- logging ------------------------------------------------------------------------
    def new_action(self, tx: "Transaction", name: str, args: Any, compensate: str | None,
                   scope: Any) -> Action:
        if not isinstance(name, str) or not name:  # (an empty str: a ValueError too, as
            raise (EmptyArgumentError if isinstance(name, str) else TypeError)(  # every
                "an action name must be a non-empty str")  # other empty name — audit48)
        if compensate is not None and not isinstance(compensate, str):
            raise TypeError("compensate must be the name of a compensator (a str) or None")
        if compensate == "":  # (no compensator can be registered so; a rollback took it
            # for "declares no compensation" and owed nothing for the side effect)
            raise EmptyArgumentError("compensate must be the name of a compensator (a "
                                     "non-empty str) or None, not ''; the action did not "
                                     "run, nothing was logged")
        utf8(name, "action name")  # (logged as text: a bare codec error at the intent)
        if compensate is not None:
            utf8(compensate, "compensator name")
        if scope is not None:  # (the rule every other scope follows: non-empty, or no
            from .scope import check_scope  # scoped undo could ever name it)
            check_scope(scope)
        check_packable(f"args of action {name!r}", args)
        # its row goes into the COMMIT: refused now, before its body runs, when the
        # transaction's actions would pass what one record can carry (it failed at commit,
        # after the side effect, with a bare record-size error)
        packed_args = pack(args)
        size = (len(packed_args) + len(name.encode("utf-8", "surrogatepass"))
                + len((compensate or "").encode("utf-8", "surrogatepass"))
                + len(scope or "") + ACTION_ROW_BYTES)
        if tx.action_bytes + size > MAX_ACTION_BYTES:
            raise ValueError(
                f"action {name!r}: its args are {size - ACTION_ROW_BYTES:,} bytes packed, "
                f"and a transaction's actions may log at most {MAX_ACTION_BYTES >> 20} MiB "
                f"of args and results together ({tx.action_bytes:,} bytes used by its earlier "
                f"actions); the action did not run, nothing was logged")
        tx.action_bytes += size
        tx.actions_begun += 1
        aid = f"{tx.id}.{tx.actions_begun}"
        # the args as the intent logs them, a copy: the caller's object may change after
        # this call (or become unstorable), and the row, the COMMIT and an in-process
        # compensation must say what the intent said (a crash's recovery reads the intent)
        args = unpack(packed_args)
        return Action(aid, tx.id, name, args, None,
                      f"ws-{self.engine.key_namespace}-{aid}", compensate, scope=scope,
                      commit_bytes=size, recorded=(unpack(packed_args), None))

    def log_intent(self, tx: "Transaction", action: Action) -> None:
        tx.check_writable()
        # the event's args are its own (the MemTable keeps the body until the applier
        # writes the row from it): ``action.args`` changed in place (by the body, or by a
        # compensator given this object at a rollback) changed the row LMDB got, the WAL
        # saying otherwise (audit 61)
        body = {"tx": tx.id, "id": action.id, "name": action.name,
                "args": action.row()["args"], "key": action.key,
                "compensate": action.compensate, "ts": action.ts}
        if action.scope is not None:
            body["scope"] = action.scope
        tx.logged = True

        def known(event) -> None:  # (before the wait for the disk: an interrupt there left
            action.lsn = event.lsn  # a durable intent the rollback did not know, owed
            tx.effects.append(action)  # until the next open instead of compensated)
        self.engine.log_event(RecordType.ACTION_INTENT, body, tx.id, durable=True,
                              appended=known)

    def log_result(self, tx: "Transaction", action: Action) -> None:
        """Log the body's outcome.  A result msgpack cannot store is dropped (the action
        stays compensatable, its error says why) and TypeError is raised; one that would
        pass the transaction's MAX_ACTION_BYTES is dropped the same way (ValueError)."""
        bad: Exception | None = None
        try:
            check_packable(f"result of action {action.name!r}", action.result)
            if action.result is not None:
                packed = pack(action.result)
                size = len(packed)
                if tx.action_bytes + size > MAX_ACTION_BYTES:
                    raise ValueError(
                        f"result of action {action.name!r} is {size:,} bytes packed, and a "
                        f"transaction's actions may log at most {MAX_ACTION_BYTES >> 20} MiB "
                        f"of args and results together ({tx.action_bytes:,} bytes used)")
                tx.action_bytes += size
                action.commit_bytes += size
                # fixed as the body ended (a copy, as the args: see new_action)
                action.result = unpack(packed)
                recorded = unpack(packed)
            else:
                recorded = None
        except (TypeError, ValueError) as e:
            bad = e
            action.result = recorded = None
            action.error = f"{e}; the result was not recorded"
        action.recorded = (action.row()["args"], recorded)
        # its error text goes into the COMMIT's row too: bounded (MAX_ERROR_BYTES) and
        # counted, never refused (the body has run; what it adds stays within the room
        # the record keeps beside MAX_ACTION_BYTES, as the next action is refused)
        if action.error is not None:
            action.error = action.raised = bounded_error(action.error)
            tx.action_bytes += _error_bytes(action.error)
            action.commit_bytes += _error_bytes(action.error)
        if self.engine.writable:
            self.engine.log_event(RecordType.ACTION_RESULT, {
                "tx": tx.id, "id": action.id, "result": recorded,
                "error": action.error}, tx.id)  # (not ``action.result``: see ``recorded``)
        if bad is not None:
            raise bad

    def commit_fields(self, tx: "Transaction") -> dict:
        """The COMMIT fields for the transaction's live actions (and its scope)."""
        body = dict(tx.commit_body)
        # actions a rollback to a savepoint took out whose compensation did not finish
        # (still pending here: not compensated, failed or resolved, each recorded): the
        # commit makes them owed (AgentHooks.undo_actions)
        crossed = [a.id for a in body.pop("crossed", ()) if a.state == PENDING]
        if crossed:
            body["crossed"] = crossed
        live = [a for a in tx.effects if isinstance(a, Action)]
        if live:
            body["actions"] = [dict(a.row(), state=COMMITTED) for a in live]
        if tx.scope is not None:
            body["scope"] = tx.scope
        return body

    # ---- ending without a commit ---------------------------------------------------------
    def end_without_commit(self, tx: "Transaction", cause: BaseException | None,
                           ended: Callable[[], None],
                           undo: Callable[[list, "UndoProgress"], None] | None = None) -> None:
        """Log the ABORT (the decision, durable) and call ``ended`` with no interrupt
        between the two (walstore.signals), then undo the live effects: compensate the
        actions (``undo``, when given, undoes every effect, files included, in order).
        Their compensations are reserved for this thread from before the ABORT (which
        makes them owed) to the end of the undo (see ``reserved``)."""
        live = [a for a in tx.effects if isinstance(a, Action)]
        with self.reserved(live):
            self._end_without_commit(tx, cause, ended, undo, live)

    def _end_without_commit(self, tx: "Transaction", cause: BaseException | None,
                            ended: Callable[[], None],
                            undo: Callable[[list, "UndoProgress"], None] | None,
                            live: list[Action]) -> None:
        problem = None
        unwritten: WalstoreError | None = None  # the ABORT's write error, the log usable
        closed = self.engine.closed
        progress: UndoProgress | None = None  # set with the ABORT: the undo is owed
        try:
            while True:  # (the ABORT recorded, walstore's own undo work finishes even when
                try:     # an interrupt lands before ``undo`` could catch it: AgentHooks.undo)
                    if progress is None:
                        with deferred():
                            try:
                                if not self.engine.writable:
                                    problem = (self.engine.failure or self.engine.wal.failed
                                               or f"store {self.engine.path} is closed")
                                else:
                                    try:
                                        self.engine.log_event(RecordType.ABORT, {"tx": tx.id},
                                                              tx.id, durable=True)
                                    except WalstoreError as e:
                                        # a write error (ENOSPC, EIO) leaves the log usable:
                                        # the transaction never reached its commit point
                                        # and never will, so its undo runs now, each
                                        # outcome recorded (see ``_settle_unended``); it
                                        # used to be left for a "reopen" while the store
                                        # took commits on, the charge neither refunded
                                        # nor listed as owed
                                        if self.engine.writable:
                                            unwritten = e
                                        else:
                                            problem = e
                            finally:
                                ended()
                                progress = UndoProgress()
                    if problem is not None:
                        break
                    if undo is not None:
                        undo(list(tx.effects), progress)  # (raises the interrupt at its end)
                        return
                    if progress.interrupt is None:
                        self.compensate(live, cause=cause)
                    progress.finished = True
                    if progress.interrupt is not None:
                        raise progress.interrupt
                    return
                except Exception:
                    raise
                except BaseException as e:
                    if progress is None or progress.finished:
                        raise  # (before the ABORT: the transaction has not ended)
                    progress.interrupt = progress.interrupt or e
        finally:
            if unwritten is not None:
                self._settle_unended(tx.id, unwritten)
        owed = [a.id for a in live if a.compensate]
        files = len(tx.effects) - len(live)
        if owed or files:  # cannot record anything: the intents and file steps stay owed
            # in the log, and the next open's recovery ends this transaction and undoes
            # them (said, never silent)
            # (an open watch(): its record is in the log, not what the block changed, so
            # the reopen puts back every difference from the tree as the block began —
            # a change made there before it, by anyone, too: said, so none is made — but
            # a path a transaction committed since the block began, which it leaves:
            # files._undo_open_watch's ``began``; "every change ... by anyone" said more)
            watched = sorted({e.ws.root for e in tx.effects  # (one never run, too)
                              if getattr(e, "blocks_inner_rollback", None)
                              or getattr(e, "never_ran", False)})
            seen = (f" (a watch() of {', '.join(map(repr, watched))}: every change made "
                    f"there since the block began, by anyone, is put back then — but a path "
                    f"a transaction committed since, left as committed —, the versions "
                    f"found kept aside in the store's quarantine)" if watched else "")
            what = " and ".join(x for x in (
                f"the compensations of action(s) {owed}" if owed else "",
                f"the undo of {files} file change(s){seen}" if files else "") if x)
            error = StoreClosed if closed else ReadOnlyError
            raise error(f"transaction {tx.id} rolled back, but the store cannot record any "
                        f"more ({problem}): {what} run when the store is reopened"
                        ) from (cause or (problem if isinstance(problem, BaseException)
                                          else None))

    def _settle_unended(self, txid: int, error: WalstoreError) -> None:
        """Transaction ``txid`` rolled back but its ABORT could not be written (``error``,
        a write error: the log goes on) and its undo ran.  Its actions still in flight in
        the log — the undo did not reach them (an interrupt), their outcome could not be
        recorded, they declare no compensation, or a rollback to a savepoint left them —
        are recorded as the ABORT would have left them: ``pending`` (owed: listed, run by
        ``retry_compensations`` and by the next open) or ``resolved``.  The next open's
        recovery ends the transaction (its ABORT changes no settled row, so nothing runs
        twice).  When even that cannot be recorded, the store stops writing (read-only
        until reopened): it could neither list nor run them, so the next open decides."""
        eng = self.engine
        with deferred():  # (one step: an interrupt inside left rows in flight, unowed)
            if not eng.writable:
                return  # (stopped meanwhile: the next open ends it and runs what is owed)
            stuck = []
            for row in eng.views.action_rows_of(txid):
                if row.get("state") != tables.IN_FLIGHT:
                    continue
                action = Action.from_row(row)
                action.in_flight = False
                if action.compensate:
                    action.state, action.error = PENDING, "its transaction rolled back"
                elif not tables.declares_no_compensation(row):  # (its intent lost: owed)
                    action.state, action.error = PENDING, (
                        "its transaction rolled back; its ACTION_INTENT record was lost to "
                        "damage in the log, so what compensates it is unknown: settle it "
                        "by hand (walstore resolve)")
                else:
                    action.state, action.error = RESOLVED, ("its transaction rolled back; "
                                                            "it declares no compensation")
                try:
                    self.record_state(action)
                except WalstoreError:
                    stuck.append(action.id)
            if stuck:
                eng.fail(ReadOnlyError(
                    f"transaction {txid} rolled back, but neither its ABORT ({error}) nor "
                    f"the state of action(s) {stuck} could be recorded; they are settled "
                    f"when the store is reopened"))

    def settle_uncompensated(self, actions: list[Action]) -> None:
        """Actions that declare no compensation, undone by a rollback to a savepoint:
        nothing is owed, so each is recorded ``resolved`` (when the store can record)."""
        for action in actions:
            if not self.engine.writable:
                return  # (the next open ends the transaction: its ABORT settles them)
            action.state = RESOLVED
            action.error = ("undone by a rollback to a savepoint; it declares no "
                            "compensation")
            try:
                self.record_state(action)
            except BaseException:  # unrecorded: still in flight, so a commit settles it
                action.state, action.error = PENDING, None  # (``crossed``)
                raise

    # ---- compensation --------------------------------------------------------------------
    @contextmanager
    def reserved(self, actions: Iterable[Any]) -> Iterator[None]:
        """Reserve the compensations of ``actions`` (other effects are passed over) for
        this thread while it undoes them, one at a time, newest first (a rollback, an
        undo's claimed actions): their rows read ``pending`` from the decision on, and
        another thread's ``retry_compensations`` ran the older ones at once, before the
        newer one and the file changes between them were undone (a refund saw the file
        as the rolled-back transaction left it), or while the rollback ran, which then
        passed over the one running elsewhere and returned before its outcome was known.
        Reserved by another thread already: left to it.  Nested calls keep the outer
        reservation."""
        claimed: list[str] = []
        try:  # (claimed inside: an interrupt right after a claim cannot leave it held)
            self.reserve(actions, claimed)
            yield
        finally:
            self.release(claimed)

    def reserve(self, actions: Iterable[Any], into: list[str], take: bool = False) -> None:
        """Reserve the compensations of ``actions`` not reserved yet for this thread,
        appending their ids to ``into`` (``release`` them at the end).  ``take``: those
        another thread reserved too (an undo whose COMMIT claimed them: they are its to
        run, and the other undo that reserved them before its commit lost the race)."""
        me = threading.get_ident()
        # (signals held off: a Ctrl-C landing just as the lock was taken, before its
        # ``with`` began, left it held for good — every later compensation, and close(),
        # waited for ever: the interrupt sweep of a rollback hung, 1 run in 2 under load)
        with deferred(), self._running_lock:
            for a in actions:
                if not (isinstance(a, Action) and a.compensate):
                    continue
                owner = self._reserved.get(a.id)
                if owner is None or (take and owner != me):
                    into.append(a.id)  # (first: released even if interrupted here)
                    self._reserved[a.id] = me
                    self._reserved_depth[a.id] = self._depth()

    def release(self, ids: Iterable[str]) -> None:
        """End this thread's reservation of ``ids`` (from ``reserve``)."""
        me = threading.get_ident()
        with deferred(), self._running_lock:  # (as in ``reserve``)
            for aid in ids:
                if self._reserved.get(aid) == me:
                    del self._reserved[aid]
                    self._reserved_depth.pop(aid, None)

    def _depth(self) -> int:
        """How many compensators are running on this thread now (nested calls)."""
        return getattr(self._local, "depth", 0)

    def compensate(self, actions: list[Action], cause: BaseException | None = None,
                   raise_on_failure: bool = True, include_held: bool = False) -> list[Action]:
        """Run compensations newest first; returns the actions that failed.  Only actions
        still owing one run; each outcome is one durable record.  Those another thread
        has reserved (``reserved``: it is undoing their transaction) are left to it."""
        with self.reserved(actions):
            return self._compensate(actions, cause, raise_on_failure, include_held)

    def _compensate(self, actions: list[Action], cause: BaseException | None,
                    raise_on_failure: bool, include_held: bool) -> list[Action]:
        me = threading.get_ident()
        depth = self._depth()
        failed = []
        unrecorded: list[Action] = []
        skipped: list[Action] = []  # not run: the store stopped writing on a record's failure
        record_error: BaseException | None = None
        for action in sorted(actions, key=newest_first):
            if action.compensate is None:
                continue
            mine = False
            try:  # (the claim inside: an interrupt right after it cannot leave it claimed)
                with self._running_lock:
                    if (action.id in self._running
                            or self._reserved.get(action.id, me) != me
                            or self._reserved_depth.get(action.id, depth) < depth):
                        continue  # (the last: an outer level of this thread's)
                    self._running[action.id] = me
                    mine = True
                if not self.engine.writable:
                    if record_error is not None:  # (this call's record failed: named too)
                        skipped.append(action)
                    continue  # owed in the log: the next open compensates
                try:
                    current = self.engine.views.action_row(action.id)
                except StoreClosed:
                    continue  # (closed meanwhile: owed in the log, as above)
                if current is not None:
                    fresh = Action.from_row(current)
                    if fresh.state not in OPEN_STATES or (fresh.held and not include_held):
                        continue  # not owed (any more): another path settled it
                    # the row may lag this object: a result logged but not yet published
                    # (a savepoint's rollback_to syncs nothing first) read as None there,
                    # and the compensator, told nothing was charged, left the charge
                    if fresh.result is not None:
                        action.result = fresh.result
                    action.raised = action.raised or fresh.raised
                    action.attempts = max(action.attempts, fresh.attempts)
                fn = self.compensators.get(action.compensate)
                try:
                    if fn is None:
                        action.state = PENDING
                        action.error = f"no compensator registered for {action.compensate!r}"
                        self.record_state(action)
                        continue
                    if not self._run(fn, action):
                        failed.append(action)
                except WalstoreError as e:  # the outcome could not be recorded: still owed
                    # (and pending here too: a commit after a rollback_to names only its
                    # pending actions as owed, ``commit_fields``; left "compensated" or
                    # "failed" unrecorded, its row stayed in flight for good, never run)
                    action.state = PENDING
                    unrecorded.append(action)
                    record_error = record_error or e
            finally:
                if mine:
                    with self._running_lock:
                        self._running.pop(action.id, None)
        if unrecorded:
            ids = [a.id for a in unrecorded]
            rest = [a.id for a in skipped]
            # (closed meanwhile — by close() in another thread, or by a compensator — it
            # said "the store turned read-only", which it did not, and sent the reader
            # looking for a disk error)
            why = "was closed" if self.engine.closed else "turned read-only"
            more = (f"; compensation(s) {rest} did not run (the store {why}) and "
                    f"are owed to the next open too" if rest else "")
            if isinstance(record_error, LogFailed):
                # its record was written, its fsync failed: on disk or not, the next open
                # tells (it said "they run again" — after a failed fsync in a live process
                # the record is usually there, and the next open runs nothing)
                what = (f"whether the outcome of compensation(s) {ids} was recorded is "
                        f"unknown ({record_error}); they count as owed, and the next open "
                        f"runs them again, with the same idempotency keys, unless their "
                        f"record reached the disk")
            else:
                what = (f"the outcome of compensation(s) {ids} could not be recorded "
                        f"({record_error}); they stay owed and run again, with the same "
                        f"idempotency keys, when the store is reopened")
            raise CompensationFailed(f"{what}{more}", ids + rest) from record_error
        if failed and raise_on_failure:
            ids = [a.id for a in failed]
            because = ""
            if cause is not None:
                because = f"; they were compensating because of {type_and_message(cause)}"
            err = CompensationFailed(
                f"compensation failed for action(s) {ids} after {COMPENSATION_RETRIES} tries: "
                f"{failed[0].error}; they are kept as 'failed' "
                f"(store.pending_compensations()){because}", ids)
            raise err from cause
        return failed

    def _run(self, fn: Callable, action: Action) -> bool:
        action.state = PENDING
        for attempt in range(1, COMPENSATION_RETRIES + 1):
            action.attempts += 1
            # fn's return, under key 0 once it returned (never read by a missing key:
            # that calls fn)
            returned: dict = defaultdict(partial(fn, action))
            recorded: list = []
            try:
                # ``returned[0]`` (C: defaultdict's __missing__) notes fn's return before
                # control comes back to Python, where an interrupt (walstore.signals) could
                # land: one right after the compensator returned is told from one inside
                # it, and the compensation that ran is recorded (once), not run again at
                # the next open.  (Not ``list.extend(map(fn, ...))``: it took a
                # StopIteration fn raised for the end of its iteration — recorded as
                # "IndexError: list index out of range", then with its type and message
                # lost — audit 68)
                outer = self._depth()
                try:  # (set inside: an interrupt cannot leave this thread counted inside)
                    self._local.depth = outer + 1
                    returned[0]
                finally:
                    self._local.depth = outer
                unrun = _unrun(returned[0])
                if unrun:  # (a callable never_runs could not tell: an object whose
                    returned.clear()  # __call__ is async) — its body did not run: a
                    raise TypeError(  # failure, never recorded "compensated"
                        f"compensator {action.compensate!r} returned {unrun} instead of "
                        f"running: walstore calls a compensator synchronously")
                self._record_compensated(action, recorded)
                return True
            except Exception as e:
                if returned:  # (not the compensator's failure)
                    if not recorded and not isinstance(e, WalstoreError):
                        # it ran, and an error that is not the log's (a MemoryError) came
                        # before its record: recorded now, as after an interrupt below —
                        # left "pending", retry_compensations() and the next open ran it a
                        # second time (audit 56).  (A WalstoreError: the log could not
                        # record it; the caller leaves it owed.)
                        self._record_compensated(action, recorded)
                    raise
                action.error = error_text(e)  # a compensator's failure is
                if type(e) is StopIteration and not e.args:  # (data, escalated below)
                    action.error += (f"(raised by compensator {action.compensate!r}: a "
                                     f"next() on an exhausted iterator?)")
                if attempt < COMPENSATION_RETRIES:
                    time.sleep(COMPENSATION_BACKOFF * (2 ** (attempt - 1)))
                continue
            except BaseException:
                if returned and not recorded:  # it ran: recorded, then the interrupt goes on
                    self._record_compensated(action, recorded)
                raise
        action.state = FAILED
        self.record_state(action)
        return False

    def _record_compensated(self, action: Action, recorded: list) -> None:
        with deferred():  # (an interrupt while the record is written would leave a
            # compensation that ran owed, and run again at the next chance; its error:
            # what the body raised, if it did — the reason it was undone)
            action.state, action.error = COMPENSATED, action.raised
            self.record_state(action)
            recorded.append(True)

    def record_state(self, action: Action) -> None:
        """Durably record an action's compensation state (one COMPENSATED record)."""
        body = {"id": action.id, "state": action.state, "error": action.error,
                "attempts": action.attempts}
        try:
            self.engine.log_event(RecordType.COMPENSATED, body, action.txid, durable=True)
        except WalWriteError:
            # the record's write failed (ENOSPC, EIO) but the log goes on (only a failed
            # fsync stops it): the outcome is known here, so it is written once more.  Left
            # unrecorded, a compensation that ran read "pending", and
            # retry_compensations() and the next open ran it a second time (audit 56)
            if not self.engine.writable:
                raise
            self.engine.log_event(RecordType.COMPENSATED, body, action.txid, durable=True)

    # ---- queries ------------------------------------------------------------------------
    def actions(self, pending: bool = False) -> list[Action]:
        """Every action; ``pending``: those owing a compensation.  Seen from a read-only
        process while no writer runs (it crashed), the actions of transactions that never
        ended are owed too (recovery will end them) — except prepared (in-doubt) ones."""
        eng = self.engine
        eng.refresh()
        # owed ones: the rows the ``owed`` index names (in flight, pending, failed) and
        # the unapplied events' (Views.owed_rows), not every action ever recorded: an
        # open's settle reads this twice (CONTRACT 4.4: recovery's cost is the WAL's)
        rows = eng.views.owed_rows() if pending else eng.views.action_rows()
        out = list(self._as_seen((Action.from_row(r) for r in rows.values()),
                                 note_in_doubt=not pending))
        if pending:
            out = [a for a in out if a.owed]
        return sorted(out, key=newest_first)

    def iter_actions(self, pending: bool = False) -> Iterator[Action]:
        """``actions(pending)`` read as it is consumed: every action in memory that grows
        by a small sort key per action, not by its row (``Views.action_rows_newest_first``;
        the owed ones are few and listed as ``actions`` lists them).  Not one snapshot: an
        action trimmed meanwhile may be left out."""
        if pending:
            yield from self.actions(pending=True)
            return
        self.engine.refresh()
        yield from self._as_seen(Action.from_row(r)
                                 for r in self.engine.views.action_rows_newest_first())

    def _as_seen(self, actions: Iterable[Action], note_in_doubt: bool = True
                 ) -> Iterator[Action]:
        """``actions`` as a reader sees them.  An action of a prepared transaction reads
        pending and in flight (not owed): its error says which gid is in doubt (else a
        listing showed it "pending" with nothing more, the words of an owed compensation
        nobody ran); the prepared rows are read once, at the first action in flight
        (``note_in_doubt`` False: the owed listing, which drops in-flight ones — an open's
        settle — reads none unless crashed).  From a read-only process while no writer
        runs (it crashed), the actions of transactions that never ended are owed too
        (recovery will end them), except prepared (in-doubt) ones; in a copy not yet
        opened writable, owed ones are held."""
        eng = self.engine
        crashed = eng.readonly and not eng.writer_alive()
        gids = self._in_doubt() if crashed else None
        origin = getattr(eng, "origin", None) if crashed else None
        held = origin is not None and not origin.get("compensate")
        for a in actions:
            if a.in_flight and (crashed or note_in_doubt):
                if gids is None:
                    gids = self._in_doubt()
                if a.txid in gids:
                    a.error = ((a.error or "") + " " + _in_doubt_note(gids[a.txid])).lstrip()
            if crashed:
                if a.in_flight and a.txid not in gids and a.compensate:
                    a.in_flight = False
                    a.error = "its transaction did not commit before a crash"
                if held and a.owed and not a.held and a.txid not in gids:
                    # a copy (backup, restore) not yet opened writable: its first open
                    # holds every debt it inherited (Engine._hold_copied_debts); read-only,
                    # they are shown held already (they read held=False until that open: a
                    # script took them for compensations the next open would run)
                    a.held = True
                    a.error = ((a.error or "") + " (owed in the source store when it "
                               "was copied: never run automatically here)").lstrip()
            yield a

    def _in_doubt(self) -> dict:
        """txid -> gid of every prepared (in-doubt) transaction."""
        return dict(self.engine.views.prepared_summaries(lambda r: (r.get("tx"), r.get("gid"))))

    def get_action(self, action_id: str) -> Action:
        action_id = action_key(action_id)
        self.engine.refresh()
        row = self.engine.views.action_row(action_id)
        if row is None:
            raise UnknownAction(f"no action with id {shown(action_id)}")
        return Action.from_row(row)

    def shown_action(self, action_id: str) -> Action:
        """``get_action`` as ``actions()`` shows it (``_as_seen``): an action of a prepared
        transaction names its gid in ``error`` (``store.get_action`` said nothing of it,
        where ``store.actions()`` did)."""
        return next(self._as_seen([self.get_action(action_id)]))

    def resolve(self, action_id: str, note: str | None = None) -> Action:
        """Mark an owed compensation handled by hand.  Under the same per-action guard as
        ``compensate``: refused while its compensator runs (both would undo the effect,
        and the compensator's record would overwrite this one), and a compensation that
        starts meanwhile finds it resolved."""
        check_resolve_note(note)
        key = action_id = action_key(action_id)
        mine = False
        try:  # (claimed inside: an interrupt just after the claim, before a ``try`` began,
            # left the action "running" for good — never compensated nor resolvable again
            # in this process: the interrupt sweep of resolve, tests/test_audit55_interrupts)
            with self._running_lock:
                if key in self._resolving:  # (it said "its compensation is running now":
                    # another resolve, no compensation, and the action is resolved next)
                    raise WalstoreError(f"action {action_id} is being resolved by another "
                                        f"caller now; nothing was changed by this one "
                                        f"(its outcome: store.get_action)")
                if key in self._running:
                    raise WalstoreError(f"action {action_id}'s compensation is running now; "
                                        f"it cannot be resolved by hand meanwhile (wait for "
                                        f"its outcome: store.get_action)")
                mine = True
                self._running[key] = threading.get_ident()
                self._resolving.add(key)
            action = self.get_action(action_id)
            if action.in_flight:  # (it read "is pending (...); only pending ... can be
                # resolved", and said nothing of the gid of a prepared one)
                gid = self._in_doubt().get(action.txid)
                why = (_in_doubt_note(gid) if gid is not None else
                       "its transaction is still open (not owed unless it rolls back)")
                raise WalstoreError(f"action {action_id} owes nothing yet: {why}; only "
                                    f"pending or failed compensations can be resolved")
            if action.state == tables.NEEDS_REDO:
                # an operator redid its effect by hand (walstore cannot): the state says
                # charged and now so does the world — ``committed`` again, the note kept
                # (it was refused, and the mark could never be cleared).  An undo that
                # later takes the charged state away compensates it (``Undo._redo_marks``)
                action.state = COMMITTED
                action.error = note if note is not None else "redone by hand"
                self.record_state(action)
                return action
            if action.state not in OPEN_STATES:
                raise WalstoreError(
                    f"action {action_id} is {action.state}; only pending or failed "
                    f"compensations (or a needs-redo action, once redone by hand) can be "
                    f"resolved")
            # the note says how it was handled; without one, the last error stays (it
            # was replaced by None: the record of why the compensation failed, lost)
            action.state = RESOLVED
            if note is not None:
                action.error = note
            self.record_state(action)
            return action
        finally:
            if mine:
                with self._running_lock:
                    self._running.pop(key, None)
                    self._resolving.discard(key)

    def running_elsewhere(self) -> list[str]:
        """The ids of the compensations other threads are running now (close() waits for
        them: a compensation under way is an effect in the world whose outcome must be
        recorded before the log closes, else the next open runs it again)."""
        me = threading.get_ident()
        with self._running_lock:
            return [a for a, t in self._running.items() if t != me]

    def run_owed(self, include_held: bool = False) -> tuple[list[str], list[Action]]:
        """Run every owed compensation that has a compensator; (compensated ids, still
        owed).  Held ones only with ``include_held``."""
        owed = [a for a in self.actions(pending=True) if a.compensate in self.compensators
                and (include_held or not a.held)]
        failed = self.compensate(owed, raise_on_failure=False, include_held=include_held)
        done = [a.id for a in owed if a not in failed and a.state == COMPENSATED]
        return done, self.owed_now()

    def owed_now(self) -> list[Action]:
        """``actions(pending=True)`` less the compensations running now (another thread's
        ``retry_compensations``, a rollback or undo running them in its turn, a ``resolve``
        under way): not owed — their outcome is being decided, as ``walstore actions
        --pending`` and ``verify`` leave out one a live writer runs.  (A second
        ``retry_compensations`` beside a first listed the refund the first was running
        as still owed.)  One that ended between the listing and the look at what runs is
        read again."""
        before = self._busy()
        owed = self.actions(pending=True)
        running, reserved = self._busy(split=True)
        out = []
        for a in owed:
            if a.id in running:
                continue  # (running now: its outcome is being decided)
            if a.id in reserved and a.state == PENDING and a.compensate in self.compensators:
                continue  # (its undo runs it in its turn; one that undo settled as failed,
                # or can run no compensator for, is owed: left out, it read [] beside a
                # rollback whose refund had failed for good, pending_compensations() naming it)
            if a.id in before:  # (it ended meanwhile: its row now says how)
                try:
                    a = self.shown_action(a.id)
                except UnknownAction:  # (settled, then trimmed by a checkpoint: it raised
                    continue  # "no action with id ..." out of retry_compensations())
                if not a.owed:
                    continue
            out.append(a)
        return out

    def _busy(self, split: bool = False) -> Any:
        """The ids of the compensations being run, reserved or resolved now (``split``:
        (those run or resolved, those reserved) apart)."""
        with self._running_lock:
            running, reserved = set(self._running), set(self._reserved)
        return (running, reserved) if split else running | reserved
