"""OpenAI Agents SDK sessions on walstore: ``WalstoreSession`` (extra ``walstore[openai-agents]``).

This module owns the walstore implementation of the SDK's ``Session`` protocol and the
conversation-level undo built on it: per-session restore points, ``rewind`` (retract the
turns after a point, with the compensations of the actions their tools registered),
``pop_items(n)`` and AdvancedSQLiteSession-style branches.  The walstore core never
imports it; it imports the SDK only for ``SessionSettings``.

::

    import walstore
    from agents import Agent, Runner
    from walstore.integrations.openai_agents import WalstoreSession

    store = walstore.open("agent-state")
    session = WalstoreSession("user-42", store)
    await session.restore_point("before-turn-3")
    result = await Runner.run(agent, "Book me a hotel in Oslo", session=session)
    await session.rewind("before-turn-3")   # the turn's items gone, its bookings compensated

Semantics of the protocol methods are SQLiteSession's (0.24): ``get_items(limit)`` returns
the newest ``limit`` items oldest first; ``limit=None`` falls back to
``session_settings.limit`` and then to all items; ``0`` gives ``[]``; a negative limit gives
all items (SQLite's ``LIMIT -1``).  ``pop_item`` returns the newest item or ``None``.  Items
go through ``json.dumps``/``json.loads`` exactly as SQLiteSession stores them (tuples come
back as lists, non-str dict keys as str, a non-JSON value raises ``TypeError`` and nothing
is added); they are stored as msgpack maps, so ``walstore scan`` shows them as data (an item
holding a lone surrogate, e.g. text cut inside an emoji, which msgpack's UTF-8 cannot
hold, is stored as the bytes of its ASCII JSON text instead).  Differences: an int
beyond 64 bits, which JSON text can hold, is refused (``ValueError``), and so is an item
over 16 MiB (16,777,216 bytes) packed as msgpack: an item is one walstore value (the
error names the item's index in the batch; nothing of the batch is added).  A ``limit``
that is not an int (``2.5``, ``nan``) raises ``TypeError`` (SQLiteSession's query fails).

Every call is one walstore transaction (writes go through ``store.run``, which retries an
optimistic conflict with another writer in the process: another session object, thread
or transaction on the same store), so an ``add_items`` is on disk whole or not at all
(``durability="full"``: before it returns).  Unlike SQLiteSession, whose file many
processes may write, a store has ONE writer process (a second ``walstore.open`` of it
raises ``StoreLocked``): other processes read the sessions with ``readonly=True``.  The
blocking store work runs in a worker thread (``asyncio.to_thread``), as SQLiteSession
does, the items' encoding and checks included (``_write_made``); a mutation (restore
points and their drops included) whose awaiting task is cancelled still finishes and then re-raises the cancellation, so the caller never
mistakes a committed write for a dropped one (one cancelled while still queued for a
worker thread never runs: the cancellation is raised at once, nothing written).  Writers of one session in one
process take a lock (an in-process queue instead of optimistic retries); readers read one
snapshot and take no lock.  A rewind does not take it: its compensations are user code and
may write to the session (e.g. add a "booking cancelled" item); the store serializes the
rewind against other writers itself.  A turn in flight while another caller (asyncio task
or thread of this process) rewinds the session is cut off: the session's writes wait while
a ``rewind`` or ``erase`` of it runs, its compensations included (not those made in the
rewind's own context: its compensators; at most ``_REWIND_WAIT_S``, then refused), and one from a context (task) that read or wrote
the session before a rewind or erase that committed raises ``ConflictError``, nothing
written, once that undo is done (a context that never touched the session neither
waits nor is refused); it was added after the rewind (during its
compensations even): items saying "booked" beside a booking the rewind cancelled (probe
h4, stop 74).  A context that reads the session again writes on (the next ``Runner.run``
of a task reads it first), once the turn it was cut off in is over: a read inside the
SDK run (``Runner.run``, ``run_streamed``) in which the context last read or wrote the
session, while that run goes on, leaves it cut off — a tool's ``get_items``, the
Runner's own mid-run reads (before it saves a turn's finished tools when another tool
raised), a run nested in a tool (``as_tool(session=...)``).  Such reads cleared it: the
tool's booking, or the turn's items, landed after the rewind (stop 76 h1).  A caller
outside any run reads on as before.  (The SDK marks each run with a contextvar, private
to it: ``_sdk_run_var``.  With an SDK that marks none, every read clears the cut-off, as
before; asyncio tasks cannot stand in for runs: a tool's task is a child of its run's,
but so is a request's task of the task that spawned it.)  One waiting on a rewind that
failed without committing writes.  (``_WriterLock`` keeps the per-session count of
rewinds, ``_SEEN`` what each context last saw; session writes are fenced against undo of
the scope, ``undo_fence``.)  A turn's tools are cut off too when they declare their work
in the session's scope (``tx.action(..., scope=session.scope)``, or a transaction begun
with ``scope=session.scope``): the module registers a scope guard
(``_guard_session_scope``) that fences such a transaction against undo of the session and
refuses it (``ConflictError``, the action's body never run) from a context cut off as
above; a rewind still under way refuses it too (a tool's transaction may be on the event
loop: no waiting).  Such a booking used to commit after the rewind and stand for good.
An undo not made through the session counts the same (``_watch_undo``, registered with
``walstore.agent.scope.register_undo_watcher``): ``store.rewind`` scoped to the session's
scope, to a prefix of it or to a scope inside it, an unscoped ``store.rewind``,
``store.purge`` of such a prefix; the context that called it is not cut off by it (a task
that ran it through ``asyncio.to_thread`` is: it reads the session again).  They were not
counted, and a turn in flight saved "booked" items after ``store.rewind`` had cancelled
its booking, or wrote into a purged session (probe h2, stop 75).  A rewind scoped inside
the session's scope does not meet the undo fence (that counts rewinds of the scope or
around it), so the session's checked writes and the guard's transactions also check at
their commit (``_UndoCheck``, under the journal lock) that no undo of the session was
marked since their check.  A ``store.revert`` cuts off no turn, whatever work of the
session it undoes: it compensates the reverted transaction's actions and puts back its
keys, and edits no conversation (an earlier turn's items still say what they said); a
turn in flight saves as it would.  (Cut off, the turn's save was refused after its tool
had booked, a booking no item holds, booked again when the turn was re-run: stop 76.)
Undo a conversation's turns with ``session.rewind`` or ``pop_items``.  The refusals name
what cut the turn off (``_SAID``).  A run resumed from a ``RunState`` (the SDK's human in the
loop: ``Runner.run(agent, state, session=session)`` after approvals) continues the paused
turn: after a rewind, erase, clear or pop past it, or a resume of the same RunState
before (noted in the session's scope: a pop of that resume's items does not undo it),
its save is refused (``ConflictError``, nothing written) and the work its approved
tools did in the session's scope before it (they run before the SDK touches the session)
is reverted, its actions compensated.  It saved into the rewound session (an output whose
call was gone), and its booking stood (stop 77 h1).  The session takes the SDK's
``wrapper`` argument and stamps the run's view on it, which ``to_state()`` copies
(``_STAMP``, in process), and checks a resumed run's first save against the calls the
branch holds (``_check_answers``, JSON too); see "a run resumed from a RunState" below.  The cut-off
follows a context: a sync caller that wraps each call in ``asyncio.run`` gives each a
fresh context and is never cut off (run a turn in one coroutine, or pass one context to
``asyncio.Runner.run(coro, context=ctx)`` and run its tools with ``ctx.run``).

A turn cut short by the end of its process (SIGKILL, a crash, power loss while a tool
ran: the Runner saves a step's tool calls and outputs only after its tools ran) left its
tools' bookings committed and no item recording them; the request retried after the
restart booked again.  So the first use of a session in an open of its store (the first
read or write of each of its calls, and the first work in its scope, ``_settle_restart``:
a new run's history read comes before its model and tools, a resumed run's approved
tools before its read) reverts, their actions compensated, the transactions an EARLIER
open of the store committed in the session's scope INSIDE AN SDK RUN (a tool's: the
scope guard tags them, ``_RUN_TAG``; from a thread without the run's context, such as an
executor's, while a run that touched the session goes on) after the session's last write
(items, branches, current branch), unless the newest item is an assistant message (a
turn that ended); in a copy (backup, restore) not its source's (``engine.inherited``:
held, as a copy's debts are).
The application's work between runs carries no tag and is kept: after a run that ended
without an assistant message (a pause for approval, ``stop_on_first_tool``, a raise, a
compaction) it was taken for a killed turn's, its booking cancelled and its saved
RunState deleted (stop 78 h3).  So only work declared in the scope (``tx.action(...,
scope=session.scope)``, ``transaction(scope=...)``) is a tool's; keys a tool writes in a
plain transaction are kept.  "Earlier": before the log end recovery found at this store
object's open (``_Opened``; one writer process per store, so no turn of it is in
flight); this open's work is never undone.  Work undone already (an undo killed in its
compensation: recovery finishes that) is recognised, not compensated again.  A cascade
(two tools of the turn writing one key) runs only when its plan takes back nothing else.
A run resumed from a RunState whose paused step the SDK held back from the session
(output guardrails with a stopping ``tool_use_behavior``) finds that step's bookings
undone after a restart (no item recorded them): its first write is refused, its
approved tools' work reverted, when the branch's newest item is an earlier open's (a
pause made in this open saved its input in it: resumed as usual).  Logged (a warning naming the session and txids) and
kept on ``session.restart_undo`` (``RestartUndo``).  A read-only store undoes nothing.

History compaction (the SDK's ``OpenAIResponsesCompactionSession``) uses SQLiteSession's
two hooks: automatic compaction after a run reads ``_get_compaction_snapshot`` (the
newest items of the branch the run wrote to) and replaces their suffix in one
transaction only if it is unchanged, so an item another session object added while the
compaction request was in flight survives (the replacement is skipped, as over
SQLiteSession); a manual ``run_compaction()`` replaces the whole history in one transaction
(``_atomic_replace_items``).

Key layout (str keys; ``S`` is the session id and ``B`` a branch name, both
percent-encoded so no session's prefix is a prefix of another's; ``oa/`` is the
``namespace``; an id longer than 160 characters percent-encoded is ``#`` and its SHA-256
digest instead — except a session walstore 0.1.0 wrote under its encoded id, which stays
there: ``_legacy_prefix``)::

    oa/S/head            -> current branch name (absent: "main")
    oa/S/i/B/<seq:020d>  -> one item (a JSON-shaped dict), in order of seq within branch B
    oa/S/br/B            -> {"created_at", "ns", "from_branch", "from_turn"}: a created branch
    oa/S/k/<name>        -> tool state of the session: ``session.key(name)`` (kept by clear)
    oa/S/r/<digest>      -> {"call_id"}: a tool call a resumed run answered (kept by clear
                            and pop: a second resume of its RunState is refused)

Everything of a session lies under ``session.scope`` (``"oa/S/"``), so a rewind scoped to
it moves this conversation and nothing else: its items, branches, current branch and tool
state return to the point; compensations run for the actions of undone transactions that
wrote only inside the scope or were declared in it: register a tool's side effects with
``tx.action(name, args, compensate=..., scope=session.scope)``.  Restore point names are
stored as ``"oa/S/<name>"`` so two sessions can both name a point ``"before-turn-3"``.

A ``namespace`` is a str ending in ``/``; every segment after its first must hold a
character that a percent-encoded session id never holds (anything but ASCII letters,
digits and ``_.-~%#``; e.g. ``"oa/tenant1:/"``), or the sessions of namespace ``"oa/"``
would hold it: session ``"tenant1"`` there has scope ``"oa/tenant1/"``, which is every
key of namespace ``"oa/tenant1/"``.  Such a namespace is refused (``ValueError``).

``erase()`` deletes a session for good: ``store.purge(scope)`` (its items, branches, tool
state and every past version of them, from every file of the store) and its restore
points.  What a purge keeps, an erase keeps: the committed transactions' meta (each
session write carries ``{"openai_session": id, "op": ...}``) and the args and results of
the actions its tools registered (see ``store.purge``).

Branches follow AdvancedSQLiteSession's API (``create_branch_from_turn``,
``switch_to_branch``, ``list_branches``, ``delete_branch``, ``get_conversation_turns``); a
turn is numbered by its user message (the n-th item with ``role == "user"`` in the branch).
Differences: the current branch is stored in the session (every session object and
process sees it, and a rewind restores it) instead of living in one Python object; a
branch holds a copy of the items it was created from (one transaction; conversations are
small), and a deleted branch's name may be used again.  ``add_items`` and ``pop_item(s)``
work on the branch their caller (asyncio task or thread: ``_SEEN``) last read or wrote,
not on one another caller switched to since, so a turn in flight keeps its items on the
branch whose history it answered (as AdvancedSQLiteSession's objects each keep theirs);
they were split, the question on one branch and the answer on the one another request
had switched or branched to (probe h2, stop 75).  When another caller deleted that
branch since (``delete_branch``, ``clear_session``, a manual ``run_compaction``; main is
never deleted), they raise ``ConflictError``, nothing written.  A caller's own switch,
new branch or clear moves it, and so does its read of the current branch; its read of a
branch it names (``get_items(branch=...)``), its delete of another branch and its
rewind that changed nothing leave it where it was (they moved it to the current branch,
another caller's: stop 75 h3); one that never read the session works on the current
branch.  Automatic compaction replaces the items of the branch the run wrote to.
Limit: the SDK's own mid-run ``get_items()`` (``OpenAIResponsesCompactionSession``'s
first check after a save, the Runner's retry cleanup) is a read of the current branch:
a switch by another caller during such a run still moves the rest of it (a rewind does
not: the read leaves a cut-off run cut off, above).
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import quote, unquote

from .. import (LSN, ConflictError, ErasureOwed, HistoryTrimmed, RevertConflict,
               SnapshotTooOld, TxnInfo, UnknownPoint, WalstoreError)
from ..codec import MAX_KEY_BYTES, pack_value
from ..agent.scope import (add_commit_check, add_commit_tag, add_undo_fence, commit_checks,
                           undo_committed, undo_kind)
from ._async import finish_despite_cancel
from ._checks import check_store as _check_store

if TYPE_CHECKING:
    from ..store import Store
    from ..txn import Transaction

__all__ = ["WalstoreSession", "RestartUndo"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

MAIN = "main"
_SEQ_DIGITS = 20
_RETRIES = 8   # optimistic retries of one call (store.run backs off exponentially: ~1.3 s in all)

MAX_ID_PART = 160  # a session id quoted longer than this is named by its digest


def _session_part(session_id: str) -> str:
    """The session's part of its key prefix: the id percent-encoded (readable in dumps and
    in ``walstore scan``) or, when that is long (keys hold at most 500 bytes, and the
    session's keys add to it), ``#`` and a SHA-256 digest of the id — ``#`` is never left
    unencoded by ``quote``, so the two forms cannot meet."""
    part = quote(session_id, safe='')
    if len(part) <= MAX_ID_PART:
        return part
    return "#" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def _legacy_prefix(store: "Store", namespace: str, session_id: str) -> str | None:
    """The prefix walstore 0.1.0 (and 0.2.0 until fe4414d) gave the session ``session_id``
    when that is not the prefix given now and the store holds something under it (a key,
    or one of its restore points); else None.  Those walstores named every session by its
    encoded id, however long (up to what a key holds); a session whose encoded id is
    longer than MAX_ID_PART is named by its digest since, and an upgraded store's
    conversation read as empty: get_items() [] after 0.1.0 had stored its items, a
    rewind to its restore point UnknownPoint (audit 61).  One probe of the key range (and
    of the restore point names), at construction, for such long ids only."""
    part = quote(session_id, safe='')
    if len(part) <= MAX_ID_PART:
        return None
    old = f"{namespace}{part}/"
    if _key_bytes(old) > MAX_KEY_BYTES:  # (no key of it could have been written)
        return None
    for _k, _v in store.scan(prefix=old):
        return old
    if any(name.startswith(old) for name in store.restore_points()):
        return old
    return None


def _holds_anything(store: "Store", prefix: str) -> bool:
    for _k, _v in store.scan(prefix=prefix):
        return True
    return any(name.startswith(prefix) for name in store.restore_points())


class _WriterLock:
    """A session's writer lock, held by its WalstoreSession objects (a ``threading.Lock``
    cannot be weakly referenced), and the session's rewinds in this process: ``epoch``
    counts those that committed (``rewind``, ``erase``, and ``store.rewind``,
    ``store.purge`` reaching its scope: ``_watch_undo``), ``underway`` holds those running
    (commit and compensations), so a caller whose turn began before one is cut off
    (``_SEEN``, ``WalstoreSession._guarded``).  ``marks`` counts those marked under way
    (begun): a transaction checked at ``marks`` is refused at its commit when it changed
    since (``_check_at_commit``).  ``kinds`` holds what the newest that committed were
    (``"rewind"``, ``"erase"``, ``"purge"``), for the refusals to say."""
    __slots__ = ("_lock", "epoch", "underway", "done", "_mutex", "marks", "kinds",
                 "settled", "settling", "owner", "runs", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.epoch = 0
        self.marks = 0
        self.kinds: tuple[str, ...] = ()   # (of the newest _KINDS_KEPT epochs)
        self.underway: list[_Undo] = []
        # ``done``'s lock, taken by a ``with`` on the C lock itself: through the
        # Condition's Python ``__enter__`` an interrupt (Ctrl-C in a sync program's
        # store.rewind or tool) could land right after the acquire, the lock then held
        # for good and every write and undo of the session stuck (walstore.signals)
        self._mutex = threading.Lock()
        self.done = threading.Condition(self._mutex)
        # the session's first use in this open of the store ran (``_settle_restart``)
        self.settled = False
        self.settling = threading.Lock()
        # (the newest WalstoreSession object of it: the scope guard's first use runs its
        # ``_settle_restart``)
        self.owner: Callable[[], Any] = lambda: None
        # (weak references to the SDK runs of this process that read or wrote the
        # session, pruned of those ended as one is added: ``_run_going_on``)
        self.runs: tuple[Callable[[], Any], ...] = ()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def begin(self, kind: str) -> "_Undo":
        token = _Undo(kind)
        with self._mutex:
            self.marks += 1
            self.underway.append(token)
        return token

    def end(self, token: "_Undo", committed: bool) -> int:
        """The rewind ``token`` ended; the epoch it left, for its own context to note
        (read later, it counted another caller's rewind ended meanwhile as its own)."""
        with self._mutex:
            if committed:  # (counted before it leaves ``underway``: _UndoCheck reads
                # both without this mutex, ``underway`` first, and never finds the undo
                # neither under way nor counted)
                self.epoch += 1
                self.kinds = (self.kinds + (token.kind,))[-_KINDS_KEPT:]
            self.underway.remove(token)
            self.done.notify_all()
            return self.epoch

    def kinds_since(self, epoch: int) -> tuple[str, ...]:
        """What the undos counted after ``epoch`` were (() when not all are kept)."""
        with self._mutex:
            n = self.epoch - epoch
            return self.kinds[-n:] if 0 < n <= len(self.kinds) else ()

    def kinds_underway(self) -> tuple[str, ...]:
        return tuple(t.kind for t in list(self.underway))

    def now(self) -> tuple[int, bool, int]:
        """(``marks``, whether an undo is under way, ``epoch``), read together."""
        with self._mutex:
            return self.marks, bool(self.underway), self.epoch

    def await_rewinds(self) -> bool:
        """Wait until no rewind of the session runs (at most ``_REWIND_WAIT_S``); False
        when one still runs then."""
        deadline = None
        with self._mutex:
            while self.underway:
                now = time.monotonic()
                deadline = deadline or now + _REWIND_WAIT_S
                if now >= deadline:
                    return False
                self.done.wait(deadline - now)
        return True


class _Undo:
    """One rewind, erase or purge of a session under way (``_WriterLock.begin``)."""
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


_KINDS_KEPT = 8
# How each kind of undo is said in a refusal: (noun, participle, what it did).
_SAID = {"rewind": ("a rewind", "rewound", "the turns after the point were retracted and "
                    "their tools' actions compensated"),
         "erase": ("an erase", "erased", "session.erase deleted it for good"),
         "purge": ("a purge", "purged", "store.purge erased its keys for good")}


def _undo_nouns(kinds: tuple[str, ...]) -> str:
    """``kinds`` as "a rewind", "a rewind and an erase"; unknown (()): every kind."""
    said = [_SAID[k][0] for k in dict.fromkeys(kinds) if k in _SAID]
    return " and ".join(said) if said else "a rewind, erase or purge"


def _undo_said(kinds: tuple[str, ...]) -> tuple[str, str]:
    """(participles, what they did) for the undos ``kinds``: ("purged", "store.purge
    erased ..."); unknown (()): every kind."""
    said = [_SAID[k] for k in dict.fromkeys(kinds) if k in _SAID]
    if not said:
        return ("rewound, erased or purged",
                "work of its turns was undone and their tools' actions compensated")
    return " and ".join(s[1] for s in said), "; ".join(s[2] for s in said)


# How long a session write of a caller that read the session waits for a rewind or erase
# of it by another caller (its compensations) before it is refused (ConflictError).
# (It wrote then: a turn in flight saved "booked" after a rewind still compensating.)
_REWIND_WAIT_S = 120.0

# What this context (an asyncio task, or a thread) last saw of each session it touched:
# (weakref to the session's _WriterLock, its ``epoch`` then, the branch it was on, the
# SDK run it was in: ``_turn_now``), newest last.  A write from a context that saw an older
# epoch is refused: a rewind by another caller committed since, so the turn it writes for
# may be one the rewind retracted and compensated (its bookings cancelled while its
# "booked" items landed after: probe h4, stop 74).  A read notes the epoch it read, so
# the caller writes on (the next ``Runner.run`` of a task reads the session first), but
# not while the run of the stale note goes on (``_turn_over``): a tool of the
# cut-off turn that read the history booked after the rewind, and the Runner's own read
# before saving a turn's finished tools saved them after it (stop 76 h1).  The branch,
# ``(name, its "ns" stamp)`` (None: follow the current branch), is where the context's
# writes land (``_pinned_branch``): the branch whose history its turn read, not one
# another caller switched to meanwhile.  Copied on change (never mutated): a task's
# children (gather, create_task, the SDK's tool tasks) see their parent's.
_SEEN: "contextvars.ContextVar[tuple[tuple[Any, int, Any, Any], ...]]" = \
    contextvars.ContextVar("walstore_openai_session_seen", default=())
_SEEN_MAX = 64   # (sessions remembered per context; one forgotten is not checked)

# The SDK's mark of the run a context is in (``Runner.run``, ``run_streamed``): a fresh
# object per run, set in the run's context for its whole length (its input read, its
# tools' tasks, which copy it, its saves, a run nested in a tool sets its own) and
# ``closed`` when the run ends.  Private to the SDK (0.24: ``agents.run_internal.
# agent_tool_configuration._current_run``): with an SDK without it, no read counts as
# one inside a run (a read clears a cut-off, as before stop 76; the tests check that the
# installed SDK has it).  Looked up once, at the first note.
_UNRESOLVED = object()
_run_var: Any = _UNRESOLVED


def _sdk_run_var() -> "contextvars.ContextVar[Any] | None":
    global _run_var
    if _run_var is _UNRESOLVED:
        var = None
        try:
            from agents.run_internal import agent_tool_configuration as conf
            if (isinstance(conf._current_run, contextvars.ContextVar)
                    and "closed" in getattr(conf._ToolConfigurationRun,
                                            "__dataclass_fields__", ())):
                var = conf._current_run
        except Exception:   # (another SDK: no run marked)
            pass
        _run_var = var
    return _run_var


def _turn_now() -> Any:
    """The SDK run this context is in (its tools' tasks and threads included), or None."""
    var = _sdk_run_var()
    return var.get() if var is not None else None


def _in_flight(turn: Any) -> bool:
    """Whether the run ``_turn_now`` gave goes on (not closed; one collected ended)."""
    return turn is not None and getattr(turn, "closed", True) is False


def _ref(obj: Any) -> Callable[[], Any]:
    if obj is None:
        return lambda: None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


# The sessions (their _WriterLock) whose rewind this context runs: its compensators'
# writes to the session neither wait for it nor are refused.
_REWINDING: "contextvars.ContextVar[tuple[Any, ...]]" = contextvars.ContextVar(
    "walstore_openai_session_rewinding", default=())


def _seen(state: _WriterLock) -> int | None:
    for ref, epoch, _branch, _turn in _SEEN.get():
        if ref() is state:
            return epoch
    return None


def _seen_branch(state: _WriterLock) -> Any:
    """The branch (name, ns) this context last read or wrote of the session, or None."""
    for ref, _epoch, branch, _turn in _SEEN.get():
        if ref() is state:
            return branch
    return None


def _seen_turn(state: _WriterLock) -> Any:
    """The SDK run (``_turn_now``) in which this context last read or wrote the session."""
    for ref, _epoch, _branch, turn in _SEEN.get():
        if ref() is state:
            return turn()
    return None


def _note_seen(state: _WriterLock, epoch: int, branch: Any = None) -> None:
    # the run noted: the one of the context's last note while that goes on (a run nested
    # in one of its tools is part of its turn), else the current one (None: no run)
    turn = _seen_turn(state)
    if not _in_flight(turn):
        turn = _turn_now()
    kept = tuple(p for p in _SEEN.get() if p[0]() is not state and p[0]() is not None)
    _SEEN.set((kept + ((weakref.ref(state), epoch, branch, _ref(turn)),))[-_SEEN_MAX:])


def _turn_over(state: _WriterLock, epoch: int) -> bool:
    """Whether a read of the session at ``epoch`` counts as this context reading it
    again (noted: it writes on): always, unless the context is cut off (it saw an older
    epoch) and the SDK run of its last note goes on: a read by that run — its tools,
    the Runner's own mid-run reads, a run nested in it — leaves it cut off.  A new run,
    or a caller outside any run, reads on."""
    seen = _seen(state)
    if seen is None or seen == epoch:
        return True
    return not _in_flight(_seen_turn(state))


# ---- a run resumed from a RunState (the SDK's human in the loop) ----------------------------
# ``Runner.run(agent, state, session=...)`` resumes a turn that paused for approvals: a new
# SDK run, often in another task or ``asyncio.run``, that touches the session only after
# the approved tools ran (it reads the tail, then saves their outputs).  Taken for a new
# turn, it saved into a session rewound, erased or cleared since the pause (an output
# whose function_call the rewind removed, or the paused response the SDK held back,
# "booked" beside a cancelled booking), and its approved tool booked with nothing in the
# conversation recording it (probe stop 77 h1).  Three things tie it to its turn:
#
# * The RunState's context wrapper.  The session opts into the SDK's ``wrapper``
#   argument (every protocol method takes it), and stamps on the wrapper what its run
#   saw of the session (``_STAMP``: epoch, branch, and the wrapper stamped);
#   ``result.to_state()`` copies the wrapper, so a run given a copy carrying a stamp of
#   another wrapper continues that turn: the stamp becomes its context's note
#   (``_adopt``), and an undo counted since cuts it off as it would have cut off the
#   paused run.  In process only: ``RunState.from_json`` makes a wrapper with no stamp.
# * The items: a resumed run's first write (``_OPENINGS``) of tool outputs must answer
#   calls the branch holds unanswered, and its calls must not be in the branch already
#   nor answered by a resumed run before (noted under ``r/``, kept by a pop or clear:
#   ``_answered_key``) (``_check_answers``) — a resume after a rewind, clear or pop, or
#   a second resume of one RunState, serialized or not.  Resumed: its wrapper carries the approvals
#   or rejections the resume acts on (``_decided``; a new run's carries none), or a
#   stamp it adopted.  (Every run's first write was checked: a new run whose input, or
#   whose ``session_input_callback``, gave tool items the branch holds was refused,
#   blaming a RunState, where SQLiteSession saves them: stop 77 h3.)
# * The work its tools did before that first write, in the session's scope (the scope
#   guard notes the transactions, ``_OPENINGS``): reverted, their actions compensated,
#   when that write is refused.  The guard cannot refuse it before: nothing in the
#   tool's context names the RunState.
_STAMP = "_walstore_session_seen"


class _Opening:
    """An SDK run that touched a session and has not written to it yet (``_OPENINGS``):
    the txids of its tools' work in the session's scope, and whether it resumes a turn
    a RunState paused (its wrapper's stamp taken, ``_adopt``), and whether its first
    write is checked (``_check_answers``: a resumed run's, ``_decided``)."""
    __slots__ = ("run", "state", "txids", "resumed", "checked")

    def __init__(self, run: Any, state: Any) -> None:
        self.run, self.state = run, state
        self.txids: list[int] = []
        self.resumed = False
        # (None until the run's wrapper tells: ``_first_checked``)
        self.checked: bool | None = None


# (id of an SDK run, id of a session's _WriterLock) -> its _Opening (weakly holding both):
# gone at the run's first write to the session, or at the run's end.
_OPENINGS: dict[tuple[int, int], _Opening] = {}
_openings_lock = threading.Lock()


def _undone_already(store: Any, txid: int, error: RevertConflict) -> bool:
    """Whether ``error`` (a revert of ``txid`` refused) says ``txid`` was undone already:
    every later writer it names is an undo whose ``reverts`` name ``txid`` (a rewind or
    revert of it) or a transaction such an undo took back with it."""
    try:
        reverts = {t: set(store.txn_info(t).extra.get("reverts") or ()) for t in error.txids}
    except (KeyError, WalstoreError):
        return False
    undos = [r for r in reverts.values() if txid in r]
    return bool(undos) and all(txid in r or any(t in u for u in undos)
                               for t, r in reverts.items())


def _forked_openings() -> None:
    global _openings_lock
    _openings_lock = threading.Lock()


os.register_at_fork(after_in_child=_forked_openings)


def _opening(state: _WriterLock, create: bool = False) -> _Opening | None:
    """The entry of the SDK run this context is in and the session (``_OPENINGS``), or
    None when that run wrote to the session already (or is no run); ``create`` opens
    the run's entry (its first contact)."""
    turn = _turn_now()
    if not _in_flight(turn):
        return None
    key = (id(turn), id(state))
    with _openings_lock:
        got = _OPENINGS.get(key)
        if got is not None and got.run() is turn and got.state() is state:
            return got
        if not create:
            return None
        try:
            # (the run's death ends its entry: it never wrote to the session, e.g. a run
            # without session= whose tool booked in the session's scope)
            run_ref = weakref.ref(turn, lambda _r, key=key: _drop_opening(key))
        except TypeError:
            return None
        got = _OPENINGS[key] = _Opening(run_ref, weakref.ref(state))
        return got


def _drop_opening(key: tuple[int, int]) -> None:
    with _openings_lock:
        _OPENINGS.pop(key, None)


def _close_opening(state: _WriterLock) -> _Opening | None:
    """Ends the entry of this context's run and the session; the entry (None: none)."""
    turn = _turn_now()
    if turn is None:
        return None
    key = (id(turn), id(state))
    with _openings_lock:
        got = _OPENINGS.get(key)
        if got is None or got.run() is not turn:
            return None
        del _OPENINGS[key]
        return got


def _contact(state: _WriterLock, wrapper: Any = None) -> None:
    """A session call (read, write, or a tool's work in its scope) from this context: the
    first of an SDK run that has not read or written the session (the context's note is
    of no run going on) opens the run's entry (``_OPENINGS``) and, given the run's
    context wrapper, takes the stamp of the turn it resumes (``_adopt``) and learns
    whether the run resumes one (``_decided``).  The run is noted on the session
    (``_note_run``)."""
    turn = _turn_now()
    if not _in_flight(turn):
        return
    _note_run(state, turn)
    if _in_flight(_seen_turn(state)):
        return
    opening = _opening(state, create=True)
    if wrapper is None:
        return
    adopted = _adopt(state, wrapper)
    if opening is not None:
        opening.resumed = adopted
        opening.checked = adopted or _decided(wrapper)


def _note_run(state: _WriterLock, turn: Any) -> None:
    """Note ``turn``, an SDK run going on, as one that read or wrote the session."""
    runs = state.runs
    if any(ref() is turn for ref in runs):
        return
    ref = _ref(turn)
    with state._mutex:
        state.runs = tuple(r for r in state.runs if _in_flight(r())) + (ref,)


def _run_going_on(state: _WriterLock) -> bool:
    """Whether an SDK run of this process that read or wrote the session goes on: work in
    its scope from a context in no run (a tool's thread that does not carry the run's
    context: ``loop.run_in_executor``, a ``ThreadPoolExecutor``, a ``threading.Thread``)
    is then taken for a tool's (``_RUN_TAG``)."""
    return any(_in_flight(ref()) for ref in state.runs)


def _first_checked(opening: _Opening | None, items: list[Any]) -> bool:
    """Whether a write of ``items`` is the first of a resumed run (``_check_answers``): its
    wrapper said so (``_contact``); told nothing (``OpenAIResponsesCompactionSession``
    hands its underlying session no wrapper, SDK 0.24), a first write holding no user
    message (a new run's first write is its input)."""
    if opening is None:
        return False
    if opening.checked is not None:
        return opening.checked
    return not any(_is_user(item) for item in items)


def _decided(wrapper: Any) -> bool:
    """Whether the run of ``wrapper`` acts on approval decisions (``state.approve`` or
    ``reject`` put them on the RunState's wrapper; a new run's wrapper holds none: SDK
    0.24's private ``_approvals``).  True when the wrapper cannot tell."""
    approvals = getattr(wrapper, "_approvals", None)
    return not isinstance(approvals, dict) or bool(approvals)


def _adopt(state: _WriterLock, wrapper: Any) -> bool:
    """The stamp ``wrapper`` carries for the session, put by the run of another wrapper (a
    RunState's copy of it: a resume), becomes this context's note, with this run: a
    rewind or erase counted since cuts the resumed turn off (a read does not clear it
    while this run goes on), and it writes to the branch the paused run wrote to."""
    for ref, epoch, branch, owner in getattr(wrapper, _STAMP, None) or ():
        if ref() is state and owner() is not wrapper:
            _note_seen(state, epoch, branch)
            return True
    return False


def _stamp(state: _WriterLock, wrapper: Any) -> None:
    """Stamp on ``wrapper`` what this context saw of the session (its note), unless the
    context is cut off: the stamp then keeps what the paused turn saw, so a later resume
    of a RunState copied from it is cut off too.  The stamp holds the session's
    _WriterLock (its rewind count) alive while the wrapper lives: a RunState kept in
    process while no WalstoreSession object of the conversation lived (a server making
    one per request) found the count gone, a new one at 0, and its held response was
    saved after the rewind (stop 77 h3).  (A function: ``copy.deepcopy`` keeps it.)"""
    if wrapper is None:
        return
    for ref, epoch, branch, _turn in _SEEN.get():
        if ref() is state:
            break
    else:
        return
    if epoch != state.epoch:
        return
    try:
        kept = tuple(e for e in getattr(wrapper, _STAMP, None) or ()
                     if e[0]() is not state and e[0]() is not None)
        setattr(wrapper, _STAMP, kept + ((lambda: state, epoch, branch,
                                          weakref.ref(wrapper)),))
    except (AttributeError, TypeError):
        pass   # (a wrapper taking no attribute: the items still check a resume)


# Tool calls and their outputs, by type: an output answers the call of its call_id.
def _call_id(item: Any, suffix: str) -> Any:
    if isinstance(item, dict):
        kind = item.get("type")
        if isinstance(kind, str) and kind.endswith(suffix):
            cid = item.get("call_id")
            return cid if isinstance(cid, str) else None
    return None


class _Unanswered(Exception):
    """Raised inside a session write's transaction function: the batch answers tool calls
    the branch does not hold unanswered, or holds calls it holds already (refused)."""


# The branch a session write of this context lands on (set by ``_guarded`` around the
# transaction function): [pinned (name, ns) or None, whether the function used it].
_PIN: "contextvars.ContextVar[list[Any] | None]" = contextvars.ContextVar(
    "walstore_openai_session_pin", default=None)


# The session writes that put their caller on the current branch, whatever branch it was
# on: its own switch and new branch.  (Every other write leaves it on its branch while
# that stands: ``WalstoreSession._guarded``.)
_MOVES_CALLER = frozenset({"switch_branch", "create_branch"})


class _RestartUndid(Exception):
    """Raised inside a session write's transaction function: a resumed run's first write
    saves the step its RunState held back (tool calls the branch never held), and the
    session's first use in this open undid an earlier open's work no item recorded:
    that step's (refused)."""


class _BranchGone(Exception):
    """Raised inside a session write's transaction function: the branch the caller was
    on was deleted since (refused)."""


class _RewindUnderway(Exception):
    """Raised inside a session write's transaction function: wait for the rewind, retry."""


class _CutOff(Exception):
    """Raised inside a session write's transaction function: refused (see _SEEN)."""


# One writer lock per (store, session prefix), shared by every WalstoreSession object of
# that session in this process while one of them lives.  Weakly held: a lock kept for
# every session id ever opened on a store stayed until the store went (a server's
# conversations, one WalstoreSession each: ~190 bytes per id for good, 80,000 ids 19 MB).
_locks_guard = threading.Lock()


def _forked() -> None:
    global _locks_guard
    _locks_guard = threading.Lock()  # (one a parent's thread held at the fork stays held)


os.register_at_fork(after_in_child=_forked)
_locks: "weakref.WeakKeyDictionary[Store, weakref.WeakValueDictionary[str, _WriterLock]]" = \
    weakref.WeakKeyDictionary()


def _writer_lock(store: "Store", prefix: str) -> _WriterLock:
    with _locks_guard:
        per_store = _locks.get(store)
        if per_store is None:
            per_store = _locks[store] = weakref.WeakValueDictionary()
        lock = per_store.get(prefix)
        if lock is None:
            lock = per_store[prefix] = _WriterLock()
        return lock


def _session_of_scope(store: Any, scope: str) -> tuple[str, _WriterLock] | None:
    """(prefix, writer lock) of the session of this process whose scope holds ``scope``
    (the scope itself or a prefix narrower than it), or None."""
    with _locks_guard:
        per_store = _locks.get(store)
    return _enclosing_session(per_store, scope) if per_store else None


# ---- a turn an earlier open of the store left cut short (killed mid-tool) -------------------
# The Runner saves a turn's input before the model runs and a step's tool calls with their
# outputs only after its tools ran: a process killed while a tool ran, after its booking
# committed, left a conversation holding no record of the call and a booking standing; the
# retried request booked again, the conversation saying one booking (stop 78 h2).  So the
# first use of a session in an open of its store (``_settle_restart``, before that call's
# read or write: a new run's first call, its history read, comes before its model and
# tools) reverts the work in the session's scope that an EARLIER open committed after the
# session's last write and that no saved item records, the work of a tool inside an SDK
# run (``_RUN_TAG``; the application's between runs is kept).  "Earlier open": committed
# before this store object's log began (``_Opened.boundary``): a store has one writer
# process, so such work belongs to no turn in flight.
@dataclass(frozen=True)
class RestartUndo:
    """What the first use of a session in this open of its store undid
    (``WalstoreSession.restart_undo``): the work an earlier open's turn, killed mid-tool,
    did in the session's scope after the session's last write, which no saved item
    records.  ``reverted``: the txids reverted now, their actions compensated;
    ``already``: those an earlier undo had taken back (not compensated again);
    ``failed``: ``"<txid> (<error>)"`` for those whose revert failed (their work stands)."""
    reverted: tuple[int, ...] = ()
    already: tuple[int, ...] = ()
    failed: tuple[str, ...] = ()


class _Opened:
    """What the sessions of this process know of one open store object: ``boundary``,
    the LSN its log began at in this open (work committed before it is an earlier
    open's; None for a read-only store, which undoes nothing), and, per session scope
    whose first use looked back (``_settle_restart``), what it undid (None: nothing), so
    a later WalstoreSession object of the session does not look again."""
    __slots__ = ("boundary", "settled")

    def __init__(self, boundary: int | None) -> None:
        self.boundary = boundary
        self.settled: dict[str, RestartUndo | None] = {}


_opened: "weakref.WeakKeyDictionary[Store, _Opened]" = weakref.WeakKeyDictionary()

# The COMMIT tag (``add_commit_tag``) of work in a session's scope done inside an SDK run
# (a tool's: the scope guard stamps it).  Only such work of an earlier open is undone at
# the first use: the application's work between runs carries none, and after a run that
# ended without an assistant message (a pause for approval, ``stop_on_first_tool``,
# ``StopAtTools``, ``MaxTurnsExceeded``, a compaction) it was taken for a killed turn's
# and undone: the app's booking cancelled, its saved RunState deleted (stop 78 h3).
_RUN_TAG = "openai-run"


def _opened_record(store: "Store") -> _Opened:
    """The store's ``_Opened``, made when this process first meets the store object (its
    first WalstoreSession): the end of the log recovery found at its open, or, when the
    store says none, the end of the newest commit then."""
    with _locks_guard:
        got = _opened.get(store)
    if got is not None:
        return got
    boundary: int | None = None
    if not store.readonly:
        end = getattr(store.last_recovery, "end_lsn", None)
        if isinstance(end, int) and not isinstance(end, bool):
            boundary = end
        else:
            newest = store.log(limit=1)
            boundary = newest[0].end_lsn if newest else 0
    with _locks_guard:
        return _opened.setdefault(store, _Opened(boundary))


# The sessions (their _WriterLock) whose first-use undo this context runs: its
# compensators' calls to the session do not wait for it (it waits for them).
_SETTLING: "contextvars.ContextVar[tuple[Any, ...]]" = contextvars.ContextVar(
    "walstore_openai_session_settling", default=())


def _ends_turn(item: Any) -> bool:
    """Whether ``item`` is an assistant message: a run's final answer (a turn killed in a
    tool has saved its input, or its previous step's tool outputs, last)."""
    return (isinstance(item, dict) and item.get("role") == "assistant"
            and item.get("type", "message") == "message")


class _UndoCheck:
    """A transaction's commit-time check (``add_commit_check``, run under the journal lock
    as it appends): ConflictError when a rewind, erase or purge of a session it was
    checked for (``_guarded``, ``_guard_session_scope``) by another caller was marked
    under way since that check, unless it ended having changed nothing.  The check ran
    as the transaction did; the undo fence
    refuses the commit of one that passed it before a rewind of the session's scope (or
    around it) or a purge and committed after it, but a rewind scoped INSIDE the
    session's scope (``store.rewind(point, scope=session.scope + "k/")``, which
    compensates the session's bookings) does not meet the fence: a turn's save, or its
    tool's booking, checked before it landed after it and stood.  Its undo watcher
    marks the session before it begins, so the check at the append closes that window:
    a session write is retried (and then refused as cut off), a tool's transaction rolls
    back, its actions compensated.  (Written for ``store.revert``, which cut off turns
    then: stop 76 h4.)"""
    __slots__ = ("checked",)

    def __init__(self) -> None:
        # session -> (its ``marks`` and ``epoch`` at the check, its scope, who is refused)
        self.checked: dict[_WriterLock, tuple[int, int, str, str]] = {}

    def __call__(self) -> None:
        for state, (marks, epoch, prefix, what) in self.checked.items():
            # an undo marked since the check, still under way or committed; one that
            # ended having changed nothing refuses nothing (it refused a tool's booking
            # and refunded it: h6's note, stop 76).  ``underway`` read before ``epoch``
            # (``_WriterLock.end`` counts before it takes the undo out)
            if state.marks != marks and (state.underway or state.epoch != epoch):
                # (no lock taken under the journal lock: the kinds only name it)
                n, done = state.epoch - epoch, state.kinds
                kinds = state.kinds_underway() + (done[-n:] if 0 < n <= len(done) else ())
                raise ConflictError(
                    f"{what}: {_undo_nouns(kinds)} of session scope {prefix!r} by another "
                    f"caller began after this transaction was checked and before its "
                    f"commit, so its work may be for a turn that cut off: refused at "
                    f"commit, nothing written (its actions compensated); read the session "
                    f"again (get_items, outside the run that was cut off) and run the "
                    f"turn anew")


def _check_at_commit(tx: Any, state: _WriterLock, marks: int, epoch: int, prefix: str,
                     what: str) -> None:
    """``tx``'s commit refused when an undo of the session marked after ``marks`` (the
    check ``tx`` passed) began before it (``_UndoCheck``; one per transaction)."""
    for check in commit_checks(tx):
        if isinstance(check, _UndoCheck):
            check.checked.setdefault(state, (marks, epoch, prefix, what))
            return
    check = _UndoCheck()
    check.checked[state] = (marks, epoch, prefix, what)
    add_commit_check(tx, check)


def _guard_session_scope(store: Any, tx: Any, scope: Any) -> None:
    """walstore asks this when a transaction is begun with ``scope=`` or declares an action
    in a scope (``walstore.agent.scope.register_scope_guard``).  In a session's scope:
    the transaction is fenced against undo of the session (a rewind or erase committing
    after its snapshot makes its commit conflict, its actions compensated), and refused
    (``ConflictError``, the action's body never run) when it comes from a context that
    read or wrote the session before a rewind or erase of it by another caller that
    committed since or is still under way: the tool work of a turn the rewind retracted
    (a booking made after the rewind that cancelled the turn's, standing for good:
    stop 75).  Let through, its commit is refused too when an undo of the session (a
    rewind scoped inside it too, whose commit the fence does not meet) was marked under
    way since (``_UndoCheck``).  A rewind's own context (its compensators) passes, not fenced, and
    a context that never touched the session passes, fenced."""
    if not isinstance(scope, str):
        return
    found = _session_of_scope(store, scope)
    if found is None:
        return
    prefix, state = found
    if state in _REWINDING.get():
        return   # (the rewind's compensators: they write for it)
    if _in_flight(_turn_now()) or _run_going_on(state):
        # (a tool's work inside an SDK run: after a restart, work of a run the process
        # ended in is told from the application's between runs by this, _cut_short_work;
        # from a thread that does not carry the run's context, work while a run of the
        # session goes on is taken for its tool's: untagged, a killed turn's booking made
        # in an executor's thread was kept and the retry booked again, stop 78 h5)
        add_commit_tag(tx, _RUN_TAG)
    # (work in the session's scope is a first use of it in this open: an earlier open's
    # turn cut short is undone before it — a run resumed from a RunState runs its
    # approved tools before it reads the session, and their booking rewrote the key of
    # the killed resume's, whose revert was then refused: two payments, one recorded)
    owner = state.owner()
    if owner is not None:
        owner._settle_restart(wait=False)
    # (work for another scope too, another session's or a LangGraph thread's, is fenced
    # for both: left at that one, a rewind of this session committing while the tool
    # ran let its booking here commit after it and stand)
    add_undo_fence(tx, prefix)
    # the snapshot first, then the check: a rewind that committed before the snapshot
    # began before it, so it is under way or counted in ``epoch`` now; one committing
    # after it makes the commit conflict (the fence)
    tx.snapshot
    # (a run's first contact: a run resumed from a RunState runs its approved tools
    # before it reads the session; their work is noted, reverted if its first write is
    # refused, _OPENINGS)
    _contact(state)
    seen = _seen(state)
    if seen is None:
        _note_work(state, tx)
        return   # (never touched the session: no turn of it to cut off)
    marks, underway, epoch = state.now()
    if underway or epoch != seen:
        kinds = state.kinds_underway() if underway else state.kinds_since(seen)
        raise ConflictError(
            f"scope {scope!r}: {_undo_nouns(kinds)} of session scope {prefix!r} by another "
            f"caller {'is under way' if underway else 'committed'} after this caller last "
            f"read or wrote the session, so this work may be for a turn it cut off: "
            f"refused, nothing ran or was written (read the session again with get_items, "
            f"outside the run that was cut off, and run the turn anew)")
    # (and at its commit: one marked from now on refuses it then, _UndoCheck)
    _check_at_commit(tx, state, marks, epoch, prefix, f"scope {scope!r}")
    _note_work(state, tx)


def _note_work(state: _WriterLock, tx: Any) -> None:
    """``tx``'s work in the session's scope, noted for the run this context is in while it
    has not written to the session (``_OPENINGS``)."""
    opening = _opening(state)
    if opening is not None and tx.id not in opening.txids:
        opening.txids.append(tx.id)


def _register_scope_guard() -> bool:
    from ..agent.scope import register_scope_guard
    register_scope_guard(_guard_session_scope)
    return True


def _watch_undo(store: Any, scope: Any) -> Callable[[bool], None] | None:
    """walstore calls this before a ``store.rewind`` or ``store.purge`` begins, in the
    undoing thread (``walstore.agent.scope.register_undo_watcher``): one reaching the
    scope of a session of this process (unscoped, scoped to a prefix of the session's
    scope, as the undo fence counts it, or to a scope inside it) not made by the
    session itself (``rewind``, ``erase``: ``_removal`` counts those) is counted as the
    session's own rewinds are,
    so a turn in flight is cut off by ``store.rewind(point, scope=session.scope)`` too:
    its writes wait while it runs, and are refused once it committed; its compensators
    (this context) are exempt.  Returns its end (None: it reaches no session)."""
    if scope is not None and not isinstance(scope, str):
        return None   # (a bytes scope holds no session's str keys)
    with _locks_guard:
        per_store = _locks.get(store)
        if not per_store:
            return None
        mine = _REWINDING.get()
        exact = per_store.get(scope) if scope is not None else None
        if exact is not None:
            # a session's own scope (its rewind, its erase, store.rewind(scope=
            # session.scope)) holds no other session's: no namespace nests in one
            # (_check_namespace).  (Every live session was tried: 10 ms an undo with
            # 20,000 of them in the process.)
            reached = [exact] if exact not in mine else []
        elif scope is not None and (inner := _enclosing_session(per_store, scope)):
            # a scope inside a session's (``session.key`` state, "oa/S/k/"): its rewind
            # compensates the session's bookings (declared around it) — it cut off
            # nothing, the turn in flight saved "booked" after it (stop 76)
            reached = [inner[1]] if inner[1] not in mine else []
        else:
            reached = [state for prefix, state in list(per_store.items())
                       if state not in mine and (scope is None or prefix.startswith(scope))]
    return _cut_off_sessions(reached, mine, undo_kind() or "rewind")


def _enclosing_session(per_store: Any, text: str) -> tuple[str, _WriterLock] | None:
    """(prefix, writer lock) of the session in ``per_store`` whose scope holds the key
    or scope ``text``, or None: each of its ``/``-ended prefixes looked up (a session's
    scope ends at a ``/``, and none holds another's)."""
    end = text.find("/")
    while end != -1:
        prefix = text[:end + 1]
        state = per_store.get(prefix)
        if state is not None:
            return prefix, state
        end = text.find("/", end + 1)
    return None


def _cut_off_sessions(reached: list[_WriterLock], mine: tuple, kind: str
                      ) -> Callable[[bool], None] | None:
    """The sessions ``reached`` marked under way by an undo of ``kind`` (their writes
    wait; this context, its compensators, is exempt); returns the end that counts the
    undo if it committed."""
    if not reached:
        return None
    # (walstore tells the watchers and calls their ends with signals held off: an
    # interrupt between two marks here, or in the end between two sessions' ends, left
    # a session under way for good — WatchedUndo)
    tokens = [(state, state.begin(kind)) for state in reached]
    rewinding = _REWINDING.set(mine + tuple(reached))

    def end(committed: bool) -> None:
        try:
            _REWINDING.reset(rewinding)
        except ValueError:   # (called in another context: an exit cut short at its
            pass             # start, ended by WatchedUndo.__del__; the ends still run)
        for state, token in tokens:
            epoch = state.end(token, committed)
            # (the undoing context is not cut off by it; one that changed nothing leaves
            # it as it was, on its branch: it was put back on the current one.  The
            # epoch its end left: ``state.epoch`` read after counted another caller's
            # rewind ended meanwhile, and the context wrote on past it)
            if committed and _seen(state) is not None:
                _note_seen(state, epoch)
    return end


def _register_undo_watcher() -> bool:
    from ..agent.scope import register_undo_watcher
    register_undo_watcher(_watch_undo)
    return True


# What a percent-encoded session id (or its "#" digest form) is made of: a namespace segment
# (after the first) holding only these could be a session's part of another namespace.
_PART_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~%#")


def _check_namespace(namespace: Any) -> str:
    """``namespace`` if the scopes of its sessions can never nest with those of another
    namespace's sessions; TypeError/ValueError otherwise."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
    if not namespace.endswith("/"):
        raise ValueError(f"namespace must end with '/', not {namespace!r}")
    _text(namespace, "namespace")  # (else the error named a whole item key, not namespace)
    segments = namespace[:-1].split("/")
    for n, seg in enumerate(segments[1:], start=1):
        if all(c in _PART_CHARS for c in seg):
            outer = "/".join(segments[:n]) + "/"
            raise ValueError(
                f"namespace {namespace!r} lies inside the scope of a session of namespace "
                f"{outer!r} (its segment {seg!r} could be a session id's encoding: session "
                f"{unquote(seg)!r} there has scope {outer + seg + '/'!r}, and its "
                f"clear_session, rewind and erase would reach this namespace's sessions). "
                f"Use one segment (e.g. {namespace[:-1].replace('/', '-') + '/'!r}), or put "
                f"a character other than ASCII letters, digits and _.-~%# in every segment "
                f"after the first (e.g. {outer + seg + ':/'!r})")
    return namespace


def _key_bytes(key: str) -> int:
    try:
        return len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{key!r} is not valid UTF-8 text: {e.reason}") from None


def _check_item_sizes(stored: list[Any]) -> None:
    """Each item fits one walstore value (ValueError naming its index, before any write)."""
    for i, item in enumerate(stored):
        label = f"items[{i}]"
        try:
            pack_value(item, key=label)
        except ValueError as e:
            msg = str(e).replace(f"value for key {label!r}", f"item {i} of the batch", 1)
            raise ValueError(f"{msg} (an item is one walstore value: at most 16 MiB "
                             f"packed as msgpack, no int beyond 64 bits); nothing was "
                             f"added") from None


def _prepared(items: list[Any]) -> list[Any]:
    """``items`` as stored (SQLiteSession's JSON round trip, ``_stored``), each checked to
    fit one walstore value: TypeError/ValueError before any write.  Called in the worker
    thread (``_write_made``), as SQLiteSession encodes its rows there."""
    stored = [_stored(_normalize(item)) for item in items]
    _check_item_sizes(stored)
    return stored


def _check_branch_id(name: Any, arg: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a str, not {type(name).__name__}")
    _text(name, arg)
    return name


def _text(name: str, arg: str) -> None:
    """ValueError naming ``arg`` when ``name`` is not valid UTF-8 text (a lone
    surrogate): it is part of a key (the bare UnicodeEncodeError named neither)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{arg} {name!r} is not valid UTF-8 text: {e.reason}") from None


def _normalize(item: Any) -> Any:
    """What SQLiteSession gives back for ``item``: a json.dumps/json.loads round trip."""
    return json.loads(json.dumps(item))


def _stored(item: Any) -> Any:
    """How a normalized item is stored: as itself, or, when one of its strings holds a
    lone surrogate (SQLiteSession's escaped JSON keeps it; msgpack's UTF-8 refused the
    item), as the bytes of its ``json.dumps`` text, every surrogate escaped.  An item is
    JSON-shaped, never bytes, so the two forms cannot be confused (``_loaded``)."""
    try:
        json.dumps(item, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(item).encode("ascii")
    return item


def _loaded(stored: Any) -> Any:
    """The item stored as ``stored`` (see ``_stored``)."""
    return json.loads(stored) if isinstance(stored, bytes) else stored


def _is_user(item: Any) -> bool:
    return isinstance(item, dict) and item.get("role") == "user"


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind} must be a non-empty str, not {name!r}")
    _text(name, kind)
    return name


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


class WalstoreSession:
    """The OpenAI Agents SDK ``Session`` protocol on a walstore store, plus undo and branches.

    ``session_id`` names the conversation; ``store`` is an open :class:`walstore.Store`
    (the session does not close it).  ``session_settings`` (a ``SessionSettings`` or a dict)
    defaults to ``SessionSettings()``; its ``limit`` applies when ``get_items`` gets none.
    ``namespace`` is the key prefix of all sessions (default ``"oa/"``).
    """

    session_settings: Any = None

    def __init__(self, session_id: str, store: "Store", session_settings: Any = None, *,
                 namespace: str = "oa/") -> None:
        try:
            from agents.memory.session_settings import SessionSettings, coerce_session_settings
        except ImportError as e:  # (a bare "No module named 'agents'", naming no extra)
            raise ImportError("WalstoreSession needs the OpenAI Agents SDK: pip install "
                              "'walstore[openai-agents]'") from e
        if not isinstance(session_id, str):
            raise TypeError(f"session_id must be a str, not {type(session_id).__name__}")
        _text(session_id, "session_id")  # (quote's bare UnicodeEncodeError named nothing)
        _check_store(store, "WalstoreSession")
        _check_namespace(namespace)
        self.session_id = session_id
        self.session_settings = (coerce_session_settings(session_settings)
                                 if session_settings is not None else SessionSettings())
        self.store = store
        self._prefix = f"{namespace}{_session_part(session_id)}/"
        legacy = _legacy_prefix(store, namespace, session_id)
        if legacy is not None:
            if _holds_anything(store, self._prefix):
                raise WalstoreError(
                    f"session {session_id[:60]!r}... is stored twice in this store: under "
                    f"{legacy[:80]!r}... (its encoded id, where walstore 0.1.0 put it) and "
                    f"under {self._prefix!r} (its digest, where walstores since put a "
                    f"session with so long an id); nothing was read or changed. Keep one: "
                    f"store.purge() the other prefix")
            self._prefix = legacy
        longest = f"{self._items_prefix(MAIN)}{0:0{_SEQ_DIGITS}d}"
        if _key_bytes(longest) > MAX_KEY_BYTES:
            raise ValueError(f"namespace {namespace!r} is too long: the session's item keys "
                             f"({_key_bytes(longest)} bytes) would not fit walstore's "
                             f"{MAX_KEY_BYTES}-byte key limit")
        self._lock = _writer_lock(store, self._prefix)
        self._opened = _opened_record(store)
        self._closed = False
        self._lock.owner = weakref.ref(self)   # (last: the scope guard may use it at once)

    def __repr__(self) -> str:
        return f"WalstoreSession({self.session_id!r}, scope={self._prefix!r})"

    # ---- where things live ---------------------------------------------------------------
    @property
    def scope(self) -> str:
        """The key prefix holding everything of this session (pass to ``tx.action(scope=)``)."""
        return self._prefix

    def key(self, name: str) -> str:
        """A key for the session's own tool state: rewinds with the session, survives clear."""
        return f"{self._prefix}k/{_check_name('a key name', name)}"

    def _head_key(self) -> str:
        return self._prefix + "head"

    def _items_prefix(self, branch: str) -> str:
        return f"{self._prefix}i/{quote(branch, safe='')}/"

    def _branch_key(self, branch: str) -> str:
        return f"{self._prefix}br/{quote(branch, safe='')}"

    def _check_branch_fits(self, branch: str) -> None:
        """ValueError unless the keys of ``branch``'s items fit walstore's key limit."""
        longest = f"{self._items_prefix(branch)}{0:0{_SEQ_DIGITS}d}"
        size = _key_bytes(longest)
        if size > MAX_KEY_BYTES:
            room = MAX_KEY_BYTES - (size - len(quote(branch, safe='')))
            raise ValueError(f"branch name of {len(branch)} characters is too long: its items' "
                             f"keys would be {size} bytes, over walstore's {MAX_KEY_BYTES}-byte "
                             f"key limit (this session's branch names may take at most {room} "
                             f"bytes percent-encoded)")

    def _point_name(self, name: str) -> str:
        return self._prefix + _check_name("a restore point name", name)

    # ---- running store work ----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("WalstoreSession is closed")

    def close(self) -> None:
        """Refuse further calls on this object (the store stays open: it is the caller's)."""
        self._closed = True

    async def _read(self, fn: Callable[["Transaction"], _T], note: str | None = "head",
                    wrapper: Any = None) -> _T:
        """``fn(tx)`` on one snapshot, in a worker thread; nothing is written or validated.
        ``note``: what the caller is taken to have read (``_SEEN``): ``"head"``, the
        current branch (its writes go there now); ``"kept"``, a branch it named (its
        writes stay where they were; a ``get_items(branch=...)`` moved them to the
        current branch, another caller's, stop 75 h3); None, nothing (the compaction
        snapshot).  ``wrapper``: the SDK run's context wrapper (``_STAMP``)."""
        self._check_open()
        if note is not None:
            _contact(self._lock, wrapper)

        def work() -> _T:
            # A purge (another caller's ``erase()``) or a history trim that overtook the
            # snapshot between two of its reads raised SnapshotTooOld out of get_items to
            # the SDK's runner (SQLiteSession's one SELECT reads either state): nothing
            # was read that counts, so it is read again from a fresh snapshot
            # (probe-audit55), a bounded number of times, as WalstoreSaver's reads are.
            for attempt in range(_RETRIES + 2):
                # (before the snapshot: a read while a rewind runs counts as before it)
                epoch = state.epoch
                tx = self.store.transaction()
                try:
                    # (the session's first use in this open: checked on this snapshot; an
                    # undo it waited for or ran wrote after it, so read again: once)
                    if self._settle_restart(tx):
                        continue
                    return fn(tx), epoch, (self._head_branch(tx) if note == "head"
                                           else None)
                except SnapshotTooOld:
                    if attempt >= _RETRIES:
                        raise
                finally:
                    tx.rollback()
            raise AssertionError("unreachable")  # pragma: no cover
        state = self._lock
        result, epoch, branch = await asyncio.to_thread(work)
        # (a read inside a turn that a rewind cut off leaves it cut off: _turn_over)
        if note is not None and _turn_over(state, epoch):
            _note_seen(state, epoch, branch if note == "head" else _seen_branch(state))
        if note is not None:
            _stamp(state, wrapper)
        return result

    async def _write(self, op: str, fn: Callable[["Transaction"], _T],
                     wrapper: Any = None) -> _T:
        """``fn(tx)`` as one committed transaction (retried on conflict), in a worker thread."""
        return await self._write_made(op, lambda: fn, wrapper)

    async def _write_made(self, op: str,
                          make: Callable[[], Callable[["Transaction"], _T]],
                          wrapper: Any = None) -> _T:
        """``_write`` of the transaction function ``make()`` returns, ``make`` called in
        the worker thread first: the items' encoding and checks (``_prepared``) run
        there, not on the event loop (they ran on it: 3,000 items of 2 KB held the loop
        0.25 s in add_items, where SQLiteSession encodes in its worker thread and held it
        0.016 s); what they raise (TypeError, ValueError) comes before any write.
        ``wrapper``: the SDK run's context wrapper (``_STAMP``)."""
        self._check_open()
        meta = {"openai_session": self.session_id, "op": op}
        state = self._lock
        _contact(state, wrapper)

        def work() -> tuple[_T, int, Any]:
            self._settle_restart()
            fn = make()
            done = self._guarded(op, fn, meta)
            _close_opening(state)   # (the run wrote: its turn is in the session now)
            return done
        result, epoch, branch = await finish_despite_cancel(work)
        _note_seen(state, epoch, branch)
        _stamp(state, wrapper)
        return result

    def _guarded(self, op: str, fn: Callable[["Transaction"], _T],
                 meta: dict[str, Any]) -> tuple[_T, int, Any]:
        """``fn`` committed as one transaction under the session's writer lock, the
        session's rewind epoch it was written at and the branch its caller is on after it
        (``_SEEN``).  ``fn`` appends to or pops from the branch its caller last read or
        wrote (``_pinned_branch``), and is refused (ConflictError) when another caller
        deleted that branch since.  While a rewind of the session by
        another caller runs (its compensations included), the write waits for its end;
        a caller that read or wrote the session before a rewind that committed since (in
        another context) is refused (ConflictError), nothing written: the turn it writes
        for may be one the rewind retracted and compensated.  The transaction is fenced
        against undo of the scope (``undo_fence``), so a rewind committing while it runs
        makes it conflict and be checked again; a checked one's commit also conflicts
        when any undo of the session, a rewind scoped inside it too, was marked under
        way since the check (``_UndoCheck``).  A compensator of the rewind (its context), and a context that
        never read or wrote the session, neither wait nor are refused."""
        state = self._lock
        exempt = state in _REWINDING.get()
        seen = None if exempt else _seen(state)
        # (a compensator of the rewind writes where the rewind left the session)
        pinned = None if exempt else _seen_branch(state)
        # (a context that never touched the session has no turn to cut off and does not
        # wait: a compensator writing from a pool thread, which carries no context of
        # the rewind, waited for the very rewind that waited for it)
        wait = seen is not None
        checked: list[int] = []

        def guarded(tx: "Transaction") -> _T:
            add_undo_fence(tx, self._prefix)
            tx.snapshot   # (taken now, before the checks: the fence dates from it)
            marks = state.marks   # (first: one marked after it refuses the commit)
            if wait and state.underway:
                raise _RewindUnderway
            epoch = state.epoch
            if seen is not None:
                if epoch != seen:
                    raise _CutOff(state.kinds_since(seen))
                # (a rewind scoped inside the session marked from now on, committed
                # before this commit: the fence misses it, and "booked" stood after the
                # refund — refused at the append instead, and retried: _UndoCheck)
                _check_at_commit(tx, state, marks, epoch, self._prefix,
                                 f"session {self.session_id!r}")
            pin = [pinned, False]
            token = _PIN.set(pin)
            try:
                result = fn(tx)
            finally:
                _PIN.reset(token)
            # where the caller is now: on its branch while that stands (it wrote to it,
            # add, pop; or left it alone, a delete of another branch, a compaction: those
            # put it on the current branch, another caller's, stop 75 h3), on the
            # current branch after its own switch or new branch, or when its branch is
            # gone (its own delete, a clear)
            if pinned is None or op in _MOVES_CALLER:
                where = self._head_branch(tx)
            elif pin[1]:
                where = pinned
            else:
                where = self._caller_branch(tx, pinned) or self._head_branch(tx)
            checked[:] = [epoch, where]
            return result
        while True:
            if wait and not state.await_rewinds():
                # (still under way after _REWIND_WAIT_S: it may have committed, its
                # epoch not yet counted.  Written then, a turn in flight saved "booked"
                # after the rewind had cancelled its booking: refused instead, stop 75.
                # A compensator writing from a thread without the rewind's context
                # never gets here: it never read the session, so it does not wait)
                raise ConflictError(
                    f"session {self.session_id!r}: {_undo_nouns(state.kinds_underway())} of "
                    f"it by another caller has run for over {_REWIND_WAIT_S:.0f} s (its "
                    f"compensations) "
                    f"since this caller last read or wrote it: nothing was written "
                    f"({op}); read the session again (get_items) once it ended")
            try:
                with state:
                    result = self.store.run(guarded, retries=_RETRIES, meta=meta)
                    return result, checked[0], checked[1]
            except _RewindUnderway:
                continue
            except _BranchGone as e:
                raise self._refusal(
                    f"branch {e.args[0]!r} of session {self.session_id!r} was deleted by "
                    f"another caller (delete_branch, clear_session, run_compaction) after "
                    f"this caller last read or wrote it: nothing was written ({op}); read "
                    f"the session again (get_items) and run the turn anew") from None
            except _CutOff as e:
                was, did = _undo_said(e.args[0])
                opening = _opening(state)
                if opening is not None and opening.resumed:
                    raise self._refusal(
                        f"session {self.session_id!r} was {was} after the run this "
                        f"RunState resumes paused ({did}): nothing was written ({op}); "
                        f"start a new Runner.run from the session as it is") from None
                raise self._refusal(
                    f"session {self.session_id!r} was {was} by another caller after this "
                    f"caller last read or wrote it ({did}): nothing was written "
                    f"({op}); read the session again (get_items, outside the run that was cut "
                    f"off: a new Runner.run does) and run the turn anew"
                    ) from None
            except _RestartUndid:
                raise self._refusal(
                    f"session {self.session_id!r}: this run resumes a RunState whose paused "
                    f"step the SDK held back from the session (output guardrails with a "
                    f"tool_use_behavior that stops at tools), and the session's first use "
                    f"after the restart undid the work no item recorded, that step's "
                    f"bookings (restart_undo): its outputs are not saved, nothing was "
                    f"written ({op}); start a new Runner.run from the session as it is"
                    ) from None
            except _Unanswered as e:
                raise self._refusal(
                    f"session {self.session_id!r} {e.args[0]}: the turn this run resumes "
                    f"(a RunState) was rewound, erased, cleared or popped since it paused, "
                    f"or the RunState was resumed already: nothing was written ({op}); "
                    f"start a new Runner.run from the session as it is") from None

    def _refusal(self, msg: str) -> ConflictError:
        """The ConflictError refusing a session write; when it is the first write of an SDK
        run whose tools worked in the session's scope before it (a run resumed from a
        RunState: ``_OPENINGS``), that work is reverted first, its actions compensated,
        and the error says so.  (Their booking stood, for a turn the session no longer
        holds: stop 77 h1.)"""
        opening = _close_opening(self._lock)
        txids = opening.txids if opening is not None else []
        if not txids:
            return ConflictError(msg)
        undone, already, failed = self._revert_work(txids, "revert_resumed_work")
        if undone:
            msg += (f"; the work this run's tools did in the session's scope before it "
                    f"was reverted, its actions compensated (transactions "
                    f"{sorted(undone)})")
        if already:
            msg += (f"; {'more of ' if undone else ''}the work this run's tools did in the "
                    f"session's scope before it was undone already, its actions "
                    f"compensated, by the rewind or revert that took it back (transactions "
                    f"{sorted(already)})")
        if failed:
            msg += f"; reverting it failed for transaction {', '.join(failed)}"
        return ConflictError(msg)

    def _revert_work(self, txids: list[int], op: str) -> tuple[list[int], list[int], list[str]]:
        """Revert the work ``txids`` (oldest first) did in the session's scope, newest
        first, their actions compensated (the session's own undo: its compensators' writes
        to the session neither wait nor are refused); returns (reverted, undone already,
        failed as ``"<txid> (<error>)"``).  A revert refused only because later ones of
        ``txids`` (or undos of them) wrote the same keys runs with ``cascade``: it takes
        them back with it, each action compensated once (two tools of one turn writing one
        key: the older one's revert was refused, its booking standing)."""
        undone: list[int] = []
        already: list[int] = []
        failed: list[str] = []
        batch = set(txids)
        meta = {"openai_session": self.session_id, "op": op}
        rewinding = _REWINDING.set(_REWINDING.get() + (self._lock,))
        try:
            for txid in reversed(txids):
                cascade = False
                while True:
                    try:
                        if self.store.revert(txid, scope=self._prefix, cascade=cascade,
                                             meta={**meta, "revert": txid}) is not None:
                            undone.append(txid)
                    except UnknownPoint:
                        pass   # (it never committed: nothing to undo)
                    except RevertConflict as e:
                        # (the rewind that cut the run off took it back, its actions
                        # compensated: said "reverting it failed", read as a booking
                        # standing, to cancel by hand — a second cancellation; stop 77 h5)
                        if _undone_already(self.store, txid, e):
                            already.append(txid)
                        elif (not cascade
                              and self._only_batch(getattr(e, "txids", None), batch)
                              and self._cascade_stays_in(txid, batch)):
                            cascade = True
                            continue
                        else:
                            failed.append(f"{txid} ({type(e).__name__}: {e})")
                    except WalstoreError as e:
                        failed.append(f"{txid} ({type(e).__name__}: {e})")
                    break
        finally:
            _REWINDING.reset(rewinding)
        return undone, already, failed

    def _only_batch(self, txids: Any, batch: set[int]) -> bool:
        """Whether every one of ``txids`` (a refusal's later writers, a cascade's plan) is
        in ``batch`` or an undo of work in it alone."""
        later = txids or ()
        if not later:
            return False
        try:
            for t in later:
                if t in batch:
                    continue
                reverts = set(self.store.txn_info(t).extra.get("reverts") or ())
                if not reverts or not reverts <= batch:
                    return False
        except (KeyError, WalstoreError):
            return False
        return True

    def _cascade_stays_in(self, txid: int, batch: set[int]) -> bool:
        """Whether the cascade of reverting ``txid`` (its plan, a dry run) takes back
        only ``batch`` and undos of it: it walks on from the later writers the refusal
        named to theirs, and took back this open's work, or another caller's, that wrote
        a key of a batch transaction's later writer (stop 78 h3)."""
        try:
            plan = self.store.revert(txid, scope=self._prefix, cascade=True, dry_run=True)
        except WalstoreError:
            return False
        return self._only_batch(getattr(plan, "txids", None), batch)

    # ---- a turn an earlier open left cut short ----------------------------------------------
    @property
    def restart_undo(self) -> RestartUndo | None:
        """What the first use of this session in this open of its store undid: the work a
        turn of an earlier open (a process killed mid-tool) did in the session's scope
        after the session's last write, which no saved item records; None when it undid
        nothing (or the session was not used yet in this open)."""
        return self._opened.settled.get(self._prefix)

    def _settle_restart(self, tx: "Transaction | None" = None, wait: bool = True) -> bool:
        """The first use of the session in this open of the store (run in the worker
        thread of every session call that reads or writes it, before its work): revert
        the work an earlier open did in the session's scope after the session's last
        write (``_cut_short_work``; the items read on ``tx`` when given: the caller's
        snapshot).  Once per session and store object; concurrent first uses wait for
        the one that runs it; a read-only store writes nothing.  Logged (a warning naming
        the session and txids) and kept on ``restart_undo``.  True when ``tx`` may
        predate what it waited for or reverted (the caller reads again).  ``wait=False``
        (the scope guard: a tool's transaction, perhaps on the event loop): another
        caller's undo under way refuses instead of waiting."""
        state = self._lock
        opened = self._opened
        if state.settled or opened.boundary is None or self.store.readonly:
            return False
        if state in _SETTLING.get():
            return False   # (its own compensators)
        if not state.settling.acquire(blocking=False):
            tx = None   # (another caller checks: its undo may write after ``tx``)
            if not wait:
                raise ConflictError(
                    f"session {self.session_id!r}: the undo of the work a turn an earlier "
                    f"open of the store left cut short (its first use in this open) is "
                    f"under way: refused, nothing ran or was written; try again once it "
                    f"ended")
            if not state.settling.acquire(timeout=_REWIND_WAIT_S):
                raise ConflictError(
                    f"session {self.session_id!r}: the undo of the work a turn an earlier "
                    f"open of the store left cut short (its first use in this open) has run "
                    f"for over {_REWIND_WAIT_S:.0f} s (its compensations): nothing was read "
                    f"or written; try again once it ended")
        try:
            if state.settled:
                return True
            if self._prefix in opened.settled:   # (an earlier session object of it ran it)
                state.settled = True
                return tx is None
            txids = self._cut_short_work(opened.boundary, tx)
            if txids is None:   # (nothing to look back for)
                state.settled = True
                return tx is None
            report = None
            if txids:
                token = _SETTLING.set(_SETTLING.get() + (state,))
                try:
                    undone, already, failed = self._revert_work(txids, "revert_cut_short")
                finally:
                    _SETTLING.reset(token)
                report = RestartUndo(tuple(sorted(undone)), tuple(sorted(already)),
                                     tuple(failed))
                _log.warning(
                    "session %r: work in its scope that an earlier open of the store "
                    "committed after the session's last write, no saved item recording it "
                    "(a turn cut short, e.g. a process killed in a tool), was undone at the "
                    "session's first use: reverted %s, undone already %s%s",
                    self.session_id, list(report.reverted), list(report.already),
                    f", reverting failed for {', '.join(failed)}" if failed else "")
            opened.settled[self._prefix] = report
            state.settled = True
            return tx is None or bool(txids)
        finally:
            state.settling.release()

    def _cut_short_work(self, boundary: int, tx: "Transaction | None" = None
                        ) -> list[int] | None:
        """The txids (oldest first) of the work committed before ``boundary`` (an earlier
        open) in the session's scope inside an SDK run (``_RUN_TAG``) after the session's
        last write (its items, branches or current branch: add, pop, clear, rewind ...):
        the tools of a turn that never saved them.  None when there is nothing to look back for: the session holds no
        item, its newest was saved in this open, or it is a final answer (a turn that
        ended; work after it is the application's, between turns)."""
        newest: list[tuple[str, Any]] = []
        own = tx is None
        if own:
            tx = self.store.transaction()
        try:
            branches = [MAIN] + [unquote(k[len(self._prefix) + 3:])
                                 for k, _v in tx.scan(prefix=self._prefix + "br/")]
            for branch in branches:
                for seq, item in self._newest(tx, branch, 1):
                    newest.append((f"{self._items_prefix(branch)}{seq:0{_SEQ_DIGITS}d}", item))
        finally:
            if own:
                tx.rollback()
        if all(_ends_turn(item) for _key, item in newest):
            return None   # (no history read: the common case, a session whose turns ended)
        last: Any = None
        for key, item in newest:
            versions = self.store.history(key, limit=1)
            if versions and (last is None or versions[0].lsn > last[0].lsn):
                last = (versions[0], item)
        if last is None or last[0].lsn >= boundary or _ends_turn(last[1]):
            return None
        writes = (self._prefix + "i/", self._prefix + "br/", self._head_key())
        # (in a copy, backup or restore, the source's transactions: their compensations
        # are never run here automatically, CONTRACT 4.10; the copy's first use refunded
        # the source's booking, and the source's first use refunded it again: stop 78 h5)
        inherited = self.store.engine.inherited
        work: list[int] = []
        since: Any = LSN(last[0].lsn)
        while True:
            try:
                page = self.store.log(limit=256, since=since, oldest_first=True)
            except HistoryTrimmed:   # (the item's commit is older than the retained
                if since is None:    # history: every retained commit is after it)
                    raise
                since = None
                continue
            for info in page:
                if info.lsn >= boundary:
                    return work
                keys = [k for k in info.keys if isinstance(k, str)]
                if any(k.startswith(writes) for k in keys):
                    work.clear()   # (a write of the session: work before it is kept)
                elif (_RUN_TAG in (info.extra.get("tags") or ())
                      and not info.extra.get("reverts") and not inherited(info.txid)
                      and self._in_scope(info, keys)):
                    work.append(info.txid)   # (a tool's, inside an SDK run: _RUN_TAG)
            if len(page) < 256:
                return work
            since = LSN(page[-1].lsn)

    def _in_scope(self, info: TxnInfo, keys: list[str]) -> bool:
        """Whether transaction ``info`` worked in the session's scope: wrote a key there,
        was begun with it (or a scope inside it), or declared an action in it."""
        prefix = self._prefix
        if any(k.startswith(prefix) for k in keys):
            return True
        if isinstance(info.scope, str) and info.scope.startswith(prefix):
            return True
        return any(isinstance(a, dict) and isinstance(a.get("scope"), str)
                   and a["scope"].startswith(prefix) for a in info.actions)

    # ---- reading inside a transaction -------------------------------------------------------
    def _current_branch(self, tx: "Transaction") -> str:
        return tx.get(self._head_key(), MAIN)

    def _branch_stamp(self, tx: "Transaction", branch: str) -> Any:
        """What tells this branch from another of the same name made after it was
        deleted: its "ns" (None for main and a branch stored without one)."""
        if branch == MAIN:
            return None
        info = tx.get(self._branch_key(branch))
        return info.get("ns") if isinstance(info, dict) else None

    def _head_branch(self, tx: "Transaction") -> tuple[str, Any]:
        """The current branch as ``_SEEN`` holds it: (name, stamp)."""
        branch = self._current_branch(tx)
        return branch, self._branch_stamp(tx, branch)

    def _pinned_branch(self, tx: "Transaction") -> str:
        """The branch a session write appends to or pops from: the one its caller (task or
        thread) last read or wrote (``_SEEN``), so a turn's items land on the branch whose
        history it answered although another caller switched or branched the session
        meanwhile (they did land on that other branch: the question on one, its answer on
        the other); the current branch for a caller that never read the session.
        ``_BranchGone`` when that branch was deleted since (or deleted and made anew)."""
        pin = _PIN.get()
        if pin is None or pin[0] is None:
            return self._current_branch(tx)
        if self._caller_branch(tx, pin[0]) is None:
            raise _BranchGone(pin[0][0])
        pin[1] = True
        return pin[0][0]

    def _caller_branch(self, tx: "Transaction", pinned: Any) -> tuple[str, Any] | None:
        """(name, stamp) of the branch a caller on ``pinned`` (``_SEEN``'s branch) works
        on: that branch while it stands, the current one for a caller on none (None);
        None when it was deleted since (or deleted and made anew)."""
        if pinned is None:
            return self._head_branch(tx)
        name, stamp = pinned
        if name == MAIN or (self._branch_exists(tx, name)
                            and self._branch_stamp(tx, name) == stamp):
            return pinned
        return None

    def _branch_exists(self, tx: "Transaction", branch: str) -> bool:
        if branch == MAIN:
            return True
        key = self._branch_key(branch)
        return _key_bytes(key) <= MAX_KEY_BYTES and key in tx

    def _scan_items(self, tx: "Transaction", branch: str, reverse: bool = False):
        """(seq, item) of one branch, oldest first (newest first with reverse)."""
        prefix = self._items_prefix(branch)
        for k, item in tx.scan(prefix=prefix, reverse=reverse):
            yield int(k[len(prefix):]), _loaded(item)

    def _newest(self, tx: "Transaction", branch: str, n: int | None) -> list[tuple[int, Any]]:
        """The newest ``n`` (seq, item) of ``branch`` (all with None), oldest first."""
        if n is None:
            return list(self._scan_items(tx, branch))
        out = []
        if n > 0:
            for pair in self._scan_items(tx, branch, reverse=True):
                out.append(pair)
                if len(out) == n:
                    break
        out.reverse()
        return out

    def _resolve_branch(self, tx: "Transaction", branch: str | None) -> str:
        if branch is None:
            return self._current_branch(tx)
        if not self._branch_exists(tx, branch):
            raise ValueError(f"Branch '{branch}' does not exist")
        return branch

    # ---- the Session protocol ---------------------------------------------------------------
    async def get_items(self, limit: int | None = None, *,
                        branch: str | None = None, wrapper: Any = None) -> list[Any]:
        """The newest ``limit`` items, oldest first (see the module docstring for ``limit``).

        ``branch`` reads another branch than the current one.  ``wrapper``: the SDK's
        run context (``RunContextWrapper``), which the Runner passes to a session taking
        it: it ties a run resumed from a RunState to its paused turn (``_STAMP``).
        """
        from agents.memory.session_settings import resolve_session_limit
        if branch is not None:
            _check_branch_id(branch, "branch")
        n = resolve_session_limit(limit, self.session_settings)
        if n is not None and not isinstance(n, int):   # (a bool is an int, as for SQLite)
            what = "limit" if limit is not None else "session_settings.limit"
            raise TypeError(f"{what} must be an int or None, not {type(n).__name__}")
        if n is not None and n < 0:
            n = None   # SQLite's LIMIT with a negative value: no limit

        def read(tx: "Transaction") -> list[Any]:
            return [item for _seq, item in self._newest(tx, self._resolve_branch(tx, branch), n)]
        # (a read of a branch it named leaves the caller's writes where they were)
        return await self._read(read, "head" if branch is None else "kept", wrapper)

    async def add_items(self, items: list[Any], *, wrapper: Any = None) -> None:
        """Append ``items``, all in one transaction, to the caller's branch: the one it
        last read or wrote (``_SEEN``; the current branch for a caller that never read
        the session).  The first write of an SDK run resumed from a RunState (it saves
        its approved tools' outputs so) is refused (``ConflictError``, nothing
        written) when its tool outputs answer calls the branch does not hold unanswered,
        or its tool calls are in the branch already (``_check_answers``)."""
        self._check_open()
        if not items:
            return
        items = list(items)
        state = self._lock

        def make() -> Callable[["Transaction"], None]:
            normalized = _prepared(items)  # (in the worker: TypeError before any write)
            # (a resumed run's first write: checked only then, so a long conversation's
            # turns are not scanned for their calls at every save)
            first = _first_checked(_opening(state), normalized)

            def add(tx: "Transaction") -> None:
                branch = self._pinned_branch(tx)
                last = self._newest(tx, branch, 1)
                prefix = self._items_prefix(branch)
                if first:
                    # (and noted: a resume answering one again is refused, _check_answers)
                    for call in self._check_answers(tx, branch, normalized):
                        tx.put(self._answered_key(call), {"call_id": call.get("call_id")})
                    if (any(_call_id(i, "_call") is not None for i in normalized)
                            and self._restart_undid(
                                f"{prefix}{last[0][0]:0{_SEQ_DIGITS}d}" if last else None)):
                        raise _RestartUndid()
                seq = last[0][0] + 1 if last else 1
                for i, item in enumerate(normalized):
                    tx.put(f"{prefix}{seq + i:0{_SEQ_DIGITS}d}", item)
            return add
        await self._write_made("add_items", make, wrapper)

    def _restart_undid(self, newest: str | None) -> bool:
        """Whether the session's first use in this open undid (or found undone) work an
        earlier open did in its scope (``restart_undo``) that a held-back step saved on a
        branch whose newest item is ``newest`` (its key; None: none) may hold: that item
        was written in an earlier open (a run paused in this open saved its input here
        first; its step's work was never undone: refused, its booking stood unrecorded
        and its payment was reverted, stop 78 h5)."""
        report = self._opened.settled.get(self._prefix)
        if report is None or not (report.reverted or report.already):
            return False
        boundary = self._opened.boundary
        if newest is None or boundary is None:
            return True
        versions = self.store.history(newest, limit=1)
        return not versions or versions[0].lsn < boundary

    def _answered_key(self, call: Any) -> str:
        """The key noting that a resumed run answered tool call item ``call`` (by its
        content: a model may reuse a ``call_id``, stop 77 h3)."""
        text = json.dumps(call, sort_keys=True)   # (ASCII: a lone surrogate escaped)
        return f"{self._prefix}r/{hashlib.sha256(text.encode('ascii')).hexdigest()}"

    def _check_answers(self, tx: "Transaction", branch: str, items: list[Any]
                       ) -> list[Any]:
        """``_Unanswered`` when ``items`` (a resumed run's first write) hold a tool output
        whose call (same ``call_id``) is neither earlier in them nor unanswered in
        ``branch``, or a tool call ``branch`` holds already (that very item: a model may
        give a call the ``call_id`` of an earlier turn's, stop 77 h3), or answer a call
        a resumed run answered before (``_answered_key``): the outputs of a
        run resumed from a RunState after a rewind, clear or pop removed its paused
        calls (an output no call precedes: the next model call fails on it), or of a
        second resume of one RunState (the tool's output saved twice; a held response,
        calls and all, too) — after a pop of the first's items too, which compensated
        nothing: the approved tool booked twice, both standing (stop 77 h5).
        The branch is read newest first, up to the calls the outputs answer (all of it
        when the items hold calls).  Returns the call items the outputs answer."""
        calls: dict[str, Any] = {}
        wanted: set[str] = set()
        found: list[Any] = []
        for item in items:
            cid = _call_id(item, "_call")
            if cid is not None:
                calls[cid] = item
                continue
            cid = _call_id(item, "_call_output")
            if cid is None:
                continue
            if cid in calls:
                found.append(calls[cid])
            else:
                wanted.add(cid)
        if not calls and not wanted:
            return found
        answered: set[str] = set()
        for _seq, item in self._scan_items(tx, branch, reverse=True):
            cid = _call_id(item, "_call")
            if cid is not None:
                if cid in calls and item == calls[cid]:
                    raise _Unanswered(f"holds tool call {cid!r} already (the response "
                                      f"this run saves was saved before)")
                if cid in wanted:
                    if cid in answered:
                        raise _Unanswered(f"holds an output for tool call {cid!r} already")
                    wanted.discard(cid)
                    found.append(item)
                    if not wanted and not calls:
                        break
                continue
            cid = _call_id(item, "_call_output")
            if cid is not None:
                answered.add(cid)
        if wanted:
            raise _Unanswered(f"holds no tool call {sorted(wanted)[0]!r} for this output to "
                              f"answer")
        for call in found:
            if self._answered_key(call) in tx:
                raise _Unanswered(f"answered tool call {call.get('call_id')!r} before (a "
                                  f"resume of this RunState saved its output; a pop of it "
                                  f"since compensated nothing)")
        return found

    async def pop_item(self, *, wrapper: Any = None) -> Any | None:
        """Remove and return the newest item of the caller's branch (as ``add_items``;
        None when it is empty)."""
        popped = await self._pop(1, wrapper)
        return popped[0] if popped else None

    async def clear_session(self, *, wrapper: Any = None) -> None:
        """Remove every item and branch of the session (tool state under ``key()`` stays,
        and so do the notes of the calls resumed runs answered: ``_check_answers``)."""
        await self._write("clear_session", self._clear, wrapper)

    def _clear(self, tx: "Transaction") -> None:
        for sub in ("i/", "br/"):
            for k, _v in tx.scan(prefix=self._prefix + sub):
                tx.delete(k)
        if self._head_key() in tx:
            tx.delete(self._head_key())

    async def _atomic_replace_items(self, items: list[Any]) -> bool:
        """The SDK's hook for history compaction (``OpenAIResponsesCompactionSession``):
        ``clear_session`` then ``add_items(items)`` as ONE transaction, so a crash or an
        error leaves the old history or the new one, never the empty gap between the two
        calls the SDK makes without it (SQLiteSession replaces in one transaction too).
        Used by manual ``run_compaction()`` (and by automatic compaction only when
        ``_get_compaction_snapshot`` gives none): it does not check what it replaces.
        Returns True (replaced); False for a subclass, which may store items its own way."""
        if type(self) is not WalstoreSession:
            return False
        self._check_open()
        items = list(items)

        def make() -> Callable[["Transaction"], None]:
            normalized = _prepared(items)  # (in the worker: TypeError before any write)

            def replace(tx: "Transaction") -> None:
                self._clear(tx)
                prefix = self._items_prefix(MAIN)
                for i, item in enumerate(normalized):
                    tx.put(f"{prefix}{i + 1:0{_SEQ_DIGITS}d}", item)
            return replace
        await self._write_made("replace_items", make)
        return True

    async def _get_compaction_snapshot(
            self, limit: int, *,
            prune_prefix: Callable[[Any], bool] | None = None) -> Any | None:
        """The SDK's hook for automatic history compaction (``OpenAIResponsesCompactionSession``
        after a run; SQLiteSession's protocol): the newest ``limit`` items of the caller's
        branch (the one its ``add_items`` go to: its run's), oldest first, whether they
        are all of it, and ``replace_suffix(start, output)``, a compare-and-swap.  It
        replaces the snapshot's items from ``start`` on with ``output`` in ONE transaction
        (the session's write path: an optimistic conflict retries it, re-reading) only if
        the caller's branch is still the snapshot's (not deleted, not left by its own
        switch) and its newest items are still exactly those (same positions, same
        contents: an item popped and added back equal counts as unchanged, where
        SQLiteSession's new row id would refuse); otherwise it changes nothing and
        returns False (the SDK then keeps the history: an item another session object
        added while the compaction request was in flight is not lost).  Older items
        stay, except that ``prune_prefix`` (passed by the SDK's EncryptedSession) removes
        the oldest items it approves of, up to the first it refuses, in the same
        transaction.  None for a subclass (it may store
        items its own way) or an SDK without the snapshot type."""
        if type(self) is not WalstoreSession:
            return None
        try:
            from agents.memory.session import _CompactionSnapshot
        except ImportError:   # an SDK without suffix compaction
            return None
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        want = max(limit, 0)
        state = self._lock

        def read(tx: "Transaction") -> tuple[Any, list[tuple[int, Any]], bool,
                                             list[tuple[int, str]]]:
            # the branch the caller's writes go to (its run's items: the exchange the SDK
            # compacts), not the current one: another caller's switch or new branch got
            # the summary of a run on this one (stop 75 h3).  Gone since: nothing to
            # compact (an empty snapshot, which the SDK skips).
            mine = self._caller_branch(tx, _seen_branch(state))
            if mine is None:
                return None, [], True, []
            got = self._newest(tx, mine[0], want + 1)   # one more: are there older items?
            rows = got[len(got) - want:] if len(got) > want else got
            # compared as JSON text, as SQLiteSession compares its rows (an item holding
            # NaN equals itself); encoded here, in the worker thread, not on the loop
            return mine, rows, len(got) <= want, [(seq, json.dumps(item))
                                                  for seq, item in rows]
        # (not noted: the SDK's read, not the turn's: it neither moves the caller nor
        # counts as its reading the session again)
        mine, rows, complete, expected_all = await self._read(read, None)

        async def replace_suffix(start: int, output: list[Any]) -> bool:
            expected = expected_all[start:]
            if not expected:
                return False
            self._check_open()
            output = list(output)
            first = expected[0][0]
            branch = mine[0]
            prefix = self._items_prefix(branch)
            stored: list[Any] = []

            def make() -> Callable[["Transaction"], bool]:
                stored[:] = _prepared(output)  # (in the worker: TypeError before any write)
                return replace

            def replace(tx: "Transaction") -> bool:
                pin = _PIN.get()
                if self._caller_branch(tx, pin[0] if pin else None) != mine:
                    return False   # (its own switch or new branch since, or it is gone)
                current = self._newest(tx, branch, len(expected))
                if [(seq, json.dumps(item)) for seq, item in current] != expected:
                    return False
                if prune_prefix is not None:
                    for seq, item in self._scan_items(tx, branch):
                        if seq >= first or not prune_prefix(item):
                            break
                        tx.delete(f"{prefix}{seq:0{_SEQ_DIGITS}d}")
                for seq, _item in expected:
                    tx.delete(f"{prefix}{seq:0{_SEQ_DIGITS}d}")
                # numbered after the replaced items, as SQLite's new rows are
                nxt = expected[-1][0] + 1
                for i, item in enumerate(stored):
                    tx.put(f"{prefix}{nxt + i:0{_SEQ_DIGITS}d}", item)
                return True
            return await self._write_made("compact_items", make)

        return _CompactionSnapshot([item for _seq, item in rows], complete, replace_suffix)

    # ---- more than the protocol -------------------------------------------------------------
    async def pop_items(self, n: int) -> list[Any]:
        """Remove the newest ``n`` items of the caller's branch (as ``add_items``) in one
        transaction.

        Returns them oldest first (what ``get_items(n)`` returned); fewer when the branch
        holds fewer, ``[]`` for ``n == 0``.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        if n == 0:
            self._check_open()
            return []
        return await self._pop(n)

    async def _pop(self, n: int, wrapper: Any = None) -> list[Any]:
        def pop(tx: "Transaction") -> list[Any]:
            branch = self._pinned_branch(tx)
            prefix = self._items_prefix(branch)
            newest = self._newest(tx, branch, n)
            for seq, _item in newest:
                tx.delete(f"{prefix}{seq:0{_SEQ_DIGITS}d}")
            return [item for _seq, item in newest]
        return await self._write("pop_items", pop, wrapper)

    async def erase(self) -> None:
        """Delete the session for good (a user's right to be forgotten; LangGraph's
        ``delete_thread``): ``store.purge(scope)`` erases its items, branches, current
        branch and tool state (``key()``) and every past version of them, from every API
        and every file of the store directory; then its restore points are dropped (and,
        when it had some, an empty purge of the scope runs again, so their names leave
        the store's files too).  It cannot be rewound or reverted.  A purge that fails
        before its commit (a full disk) leaves the session whole, its restore points
        included; one that committed but could not drop the points (``ErasureOwed``, a
        store turned read-only) leaves them to a retried ``erase()``, which finishes.
        Kept, as by any purge: the meta of the session's committed transactions
        (``{"openai_session": session_id, "op": ...}``) and the args and results of
        actions its tools registered (``tx.action``); copies outside the store directory
        (backups, replicas).  The object stays usable: an empty session.
        """
        self._check_open()

        def drop_points() -> bool:
            dropped = False
            for name in self.store.restore_points():
                if name.startswith(self._prefix):
                    try:
                        self.store.drop_restore_point(name)
                        dropped = True
                    except UnknownPoint:
                        pass   # dropped meanwhile by another caller
            return dropped

        purged = [False]

        def work() -> None:
            self._settle_restart()
            # (the purge first: the points went first before, and a purge failing at its
            # commit left them gone with the items all there, audit 68)
            try:
                self.store.purge(self._prefix)
            except ErasureOwed:  # (committed: the items are gone, so the points go too)
                try:
                    drop_points()
                except WalstoreError:
                    pass   # (a read-only store: the purge's error says so; a retry ends it)
                raise
            # (committed from here: an error out of the drops or the second purge, a full
            # disk, was taken for an erase that changed nothing, and a turn in flight
            # wrote into the erased session: stop 75 h1)
            purged[0] = True
            if drop_points():  # (their drop records name them: erased with the WAL they
                self.store.purge(self._prefix)  # are in, by the purge's checkpoint)
        await self._removal("erase", work, lambda _result: True, lambda: purged[0])

    # ---- restore points and rewind ----------------------------------------------------------
    async def restore_point(self, name: str) -> LSN:
        """Name the session's current state (``rewind(name)`` returns to it); its LSN.

        The point is the store's restore point ``scope + name``: it pins the history it
        needs until ``drop_restore_point(name)``.
        """
        self._check_open()
        point = self._point_name(name)

        def work() -> LSN:
            # (after the first use's undo: a point before it, rewound to, brought back the
            # keys of a booking its compensation had cancelled)
            self._settle_restart()
            return self.store.restore_point(point)
        # (a durable write: a cancelled caller hears of it only once it is made, as for
        # every other mutation; through to_thread alone it appeared after the cancellation)
        return await finish_despite_cancel(work)

    async def restore_points(self) -> dict[str, LSN]:
        """This session's restore points, by the names they were given."""
        self._check_open()
        points = await asyncio.to_thread(self.store.restore_points)
        return {n[len(self._prefix):]: lsn for n, lsn in points.items()
                if n.startswith(self._prefix)}

    async def drop_restore_point(self, name: str) -> None:
        self._check_open()
        point = self._point_name(name)

        def work() -> None:
            try:
                self.store.drop_restore_point(point)
            except UnknownPoint as e:
                raise self._unknown_point(name, point, e) from None
        await finish_despite_cancel(work)

    def _unknown_point(self, name: str, point: str, err: UnknownPoint) -> UnknownPoint:
        """The store's UnknownPoint for ``point`` said in the session's words: it named
        the store's point (``no restore point named 'oa/u1/nope'``), a name the caller
        never gave."""
        if getattr(err, "point", None) != point:
            return err
        return UnknownPoint(f"session {self.session_id!r} has no restore point named "
                            f"{name!r} (the store's point {point!r}; restore_points() lists "
                            f"the session's)", name)

    async def rewind(self, to: str | int | LSN, *, dry_run: bool = False,
                     force: bool = False) -> TxnInfo | Any | None:
        """Return this session to ``to``: retract every turn after it, compensate their tools.

        ``to`` is a name given to :meth:`restore_point`, a txid (int) or a ``walstore.LSN``.
        Only the session's keys (``scope``) move: its items, branches, current branch and
        tool state; other sessions and other keys stay.  Compensations run (newest first)
        for the actions of undone transactions that wrote only inside the scope or were
        declared in it (``tx.action(..., scope=session.scope)``).  Returns the
        ``TxnInfo`` of the undoing transaction (None if nothing was undone), or with
        ``dry_run=True`` the store's plan, changing nothing.  An unknown point raises
        ``walstore.UnknownPoint`` (a KeyError).
        """
        self._check_open()
        rewind = self.store.rewind
        if isinstance(to, str):
            point: Any = self._point_name(to)
        elif isinstance(to, int) and not isinstance(to, bool):
            point = to   # a txid, or an LSN (an int subclass)
        else:
            raise TypeError(f"to is a restore point name, a txid or an LSN, not "
                            f"{type(to).__name__}")
        kwargs: dict[str, Any] = {"scope": self._prefix, "dry_run": dry_run}
        if force:
            kwargs["force"] = True

        def work() -> Any:
            # A rewind that conflicts with a concurrent commit wrote nothing and ran no
            # compensation (they run after its commit): retried like store.run does.  No
            # session lock is held: the compensations run inside store.rewind, and one
            # that writes to this session (its add_items waits for that lock in another
            # thread) would wait for this rewind forever.
            if not dry_run:
                self._settle_restart()
            for attempt in range(_RETRIES + 1):
                try:
                    return rewind(point, **kwargs)
                except UnknownPoint as e:
                    if isinstance(to, str):
                        raise self._unknown_point(to, point, e) from None
                    raise
                except ConflictError as e:
                    # (held off by a prepared transaction of the scope: no retry clears
                    # that until it is decided, so said at once, not after ~1.3 s)
                    if attempt == _RETRIES or getattr(e, "held_by", None) is not None:
                        raise
                    time.sleep(0.005 * 2 ** attempt)
        if dry_run:
            return await asyncio.to_thread(work)
        return await self._removal("rewind", work, lambda result: result is not None)

    async def _removal(self, kind: str, work: Callable[[], _T],
                       committed: Callable[[_T], bool],
                       committed_before_error: Callable[[], bool] | None = None) -> _T:
        """``work()`` (a rewind or erase of the session) marked under way for its whole
        run, compensations included: the session's writes by other callers wait for its
        end, and, when it committed, those of callers that read or wrote the session
        before it are refused (``_guarded``).  Its own context (its compensators) is
        exempt.  It failed without committing: nobody is refused.  ``work`` of several
        store calls says with ``committed_before_error()`` that one committed before
        what it raised."""
        state = self._lock
        outcome: list[Any] = [False, 0]   # (committed, the epoch its end left)

        def marked() -> _T:
            token = state.begin(kind)
            done = False
            rewinding = _REWINDING.set(_REWINDING.get() + (state,))
            try:
                result = work()
                done = committed(result)
                return result
            except BaseException as e:
                # (committed all the same: compensations or an erasure owed, an outcome
                # unknown, an interrupt in a compensator — that one was taken for a
                # rewind that changed nothing, and a turn in flight saved after it)
                done = undo_committed(e) or bool(committed_before_error
                                                 and committed_before_error())
                raise
            finally:
                _REWINDING.reset(rewinding)
                outcome[:] = [done, state.end(token, done)]
        try:
            return await finish_despite_cancel(marked)
        finally:
            # (one that changed nothing leaves the caller as it was, on its branch: an
            # unknown point's rewind put it on the current branch, another caller's.
            # The epoch its end left, not ``state.epoch`` now: a rewind by another
            # caller that ended before this task resumed (a busy loop: milliseconds)
            # was counted as this caller's own, and its turn wrote on past it)
            if outcome[0]:
                _note_seen(state, outcome[1])

    # ---- branches (AdvancedSQLiteSession's API) ---------------------------------------------
    async def current_branch(self) -> str:
        return await self._read(self._current_branch)

    async def get_conversation_turns(self, branch_id: str | None = None) -> list[dict[str, Any]]:
        """The user turns of a branch (current by default): ``[{"turn", "content"}]``."""
        if branch_id is not None:
            _check_branch_id(branch_id, "branch_id")
        def read(tx: "Transaction") -> list[dict[str, Any]]:
            turns = []
            for _seq, item in self._scan_items(tx, self._resolve_branch(tx, branch_id)):
                if _is_user(item):
                    turns.append({"turn": len(turns) + 1, "content": item.get("content")})
            return turns
        return await self._read(read, "head" if branch_id is None else "kept")

    async def create_branch_from_turn(self, turn_number: int,
                                      branch_name: str | None = None) -> str:
        """A new branch holding the current branch's items before user turn ``turn_number``.

        The session switches to it (so the next ``add_items`` answers turn ``turn_number``
        anew); the source branch is kept.  Returns the branch name (generated when None).
        Raises ValueError if the turn has no user message, the name is taken, or the name is
        too long for its items' keys (walstore keys hold at most 500 bytes).
        """
        if isinstance(turn_number, bool) or not isinstance(turn_number, int):
            raise TypeError(f"turn_number must be an int, not {type(turn_number).__name__}")
        if branch_name is not None:
            _check_name("a branch name", branch_name)
            self._check_branch_fits(branch_name)
        stamp = int(time.time())

        def create(tx: "Transaction") -> str:
            source = self._current_branch(tx)
            copy: list[tuple[int, Any]] = []
            turn = 0
            for seq, item in self._scan_items(tx, source):
                if _is_user(item):
                    turn += 1
                    if turn == turn_number:
                        break
                copy.append((seq, item))
            else:
                raise ValueError(f"Turn {turn_number} does not contain a user message "
                                 f"in branch '{source}'")
            if branch_name is not None:
                if self._branch_exists(tx, branch_name):
                    raise ValueError(f"Branch ID '{branch_name}' is already in use. "
                                     f"Choose a new branch ID.")
                name = branch_name
            else:
                base = name = f"branch_from_turn_{turn_number}_{stamp}"
                suffix = 1
                while self._branch_exists(tx, name):
                    suffix += 1
                    name = f"{base}_{suffix}"
                self._check_branch_fits(name)
            # (after every branch of the session, whatever the clock says: list_branches
            # sorts by it, and a branch made after the clock stepped back was listed
            # before those made earlier: audit 67)
            newest = max((info.get("ns", 0) for _k, info in
                          tx.scan(prefix=self._prefix + "br/") if isinstance(info, dict)
                          and isinstance(info.get("ns", 0), int)), default=0)
            tx.put(self._branch_key(name), {"created_at": _utc_now(),
                                            "ns": max(time.time_ns(), newest + 1),
                                            "from_branch": source, "from_turn": turn_number})
            prefix = self._items_prefix(name)
            for seq, item in copy:
                tx.put(f"{prefix}{seq:0{_SEQ_DIGITS}d}", _stored(item))
            tx.put(self._head_key(), name)
            return name
        return await self._write("create_branch", create)

    async def switch_to_branch(self, branch_id: str) -> None:
        """Make ``branch_id`` the current branch (ValueError if it does not exist)."""
        _check_branch_id(branch_id, "branch_id")
        def switch(tx: "Transaction") -> None:
            if not self._branch_exists(tx, branch_id):
                raise ValueError(f"Branch '{branch_id}' does not exist")
            self._set_head(tx, branch_id)
        await self._write("switch_branch", switch)

    def _set_head(self, tx: "Transaction", branch: str) -> None:
        if branch == MAIN:
            if self._head_key() in tx:
                tx.delete(self._head_key())
        else:
            tx.put(self._head_key(), branch)

    async def delete_branch(self, branch_id: str, force: bool = False) -> None:
        """Delete a branch and its items; the current one only with ``force`` (then main)."""
        _check_name("a branch name", branch_id)
        if branch_id == MAIN:
            raise ValueError("Cannot delete the 'main' branch")

        def delete(tx: "Transaction") -> None:
            if not self._branch_exists(tx, branch_id):
                raise ValueError(f"Branch '{branch_id}' does not exist")
            if self._current_branch(tx) == branch_id:
                if not force:
                    raise ValueError(f"Cannot delete current branch '{branch_id}'. Use "
                                     f"force=True or switch branches first")
                self._set_head(tx, MAIN)
            tx.delete(self._branch_key(branch_id))
            for k, _v in tx.scan(prefix=self._items_prefix(branch_id)):
                tx.delete(k)
        await self._write("delete_branch", delete)

    async def list_branches(self) -> list[dict[str, Any]]:
        """Every branch: ``branch_id, message_count, user_turns, is_current, created_at,
        from_branch, from_turn``; main first, then in order of creation."""
        def read(tx: "Transaction") -> list[dict[str, Any]]:
            current = self._current_branch(tx)
            infos: list[tuple[str, dict]] = [(MAIN, {})]
            for k, info in tx.scan(prefix=self._prefix + "br/"):
                infos.append((unquote(k[len(self._prefix) + 3:]), info))
            infos[1:] = sorted(infos[1:], key=lambda p: (p[1].get("ns", 0), p[0]))
            out = []
            for name, info in infos:
                # counted as read: a list of every item of every branch held the whole
                # conversation in memory to give two numbers per branch
                count = turns = 0
                for _seq, item in self._scan_items(tx, name):
                    count += 1
                    turns += _is_user(item)
                out.append({"branch_id": name, "message_count": count,
                            "user_turns": turns,
                            "is_current": name == current,
                            "created_at": info.get("created_at"),
                            "from_branch": info.get("from_branch"),
                            "from_turn": info.get("from_turn")})
            return out
        return await self._read(read)


SCOPE_GUARD_REGISTERED = _register_scope_guard()
UNDO_WATCHER_REGISTERED = _register_undo_watcher()
