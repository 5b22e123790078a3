"""Scopes: a key prefix naming one agent's or one conversation's part of the store.

A scope limits ``rewind``/``revert`` to the keys under its prefix (and to the actions
declared in it).  A transaction belongs to a scope when it is begun with ``scope=``, or,
without one, when a registered *scope provider* names one: an integration registers a
provider that reads its framework's context (LangGraph's run config inside a graph node),
so a transaction begun inside a node belongs to that node's thread without annotation.
A provider may also check each transaction it named the scope of as it begins (``on_begin``):
read keys in it, so that the ordinary read-set validation refuses its commit if they
changed (LangGraph: the checkpoint its step builds on, which a rewind of the thread
removes), or refuse it outright, or fence it against undo of its scope
(``add_undo_fence(tx, scope)``: a rewind reaching into the scope, or a purge across it,
committed after the transaction's snapshot makes its commit conflict, whatever it read;
read ``tx.snapshot`` then, so the fence dates from the begin).
``scope=NO_SCOPE`` begins one that belongs to no scope whatever a provider names (work
done inside a node on behalf of no thread, e.g. LangGraph's TTL upkeep of an app-wide item).
Work that declares its scope itself (``scope=`` at the begin, or an action's) is shown to
the registered *scope guards* (``register_scope_guard``): the integration owning a kind of
scope may fence or refuse it (OpenAI sessions: a tool's work for a turn a rewind of the
session cut off), or add a check its commit runs as it appends (``add_commit_check``,
chained with those already set: a workspace's read check), or tag its COMMIT
(``add_commit_tag``: read back in ``TxnInfo.extra["tags"]``).  Registered *undo watchers*
(``register_undo_watcher``) are told of each rewind and purge before it begins
(``undo_kind`` tells which), of each revert once it planned (what it reaches:
``UndoReach``), and of each one's end, compensations included, in the undoing thread: the
integration owning a kind of scope counts an undo reaching one of its scopes however it
was called (OpenAI sessions: ``store.rewind(..., scope=session.scope)`` cuts off the
session's turns in flight as ``session.rewind`` does).  ``on_revert`` is an extension
point no integration of walstore uses: a revert compensates what it undoes and edits no
conversation or thread, so OpenAI sessions and the LangGraph saver cut off nothing for it.
"""
from __future__ import annotations

import contextvars
import os
import threading
from typing import Any, Callable

from ..codec import MAX_KEY_BYTES, encode_prefix, prefix_end
from ..errors import (CommitOutcomeUnknown, CompensationFailed, EmptyArgumentError,
                      ErasureOwed)
from ..signals import deferred

# The registered providers, in registration order: ``register_scope_provider`` appends to
# it, under ``_lock``, and nothing else changes it.  Public to read, never to change: one
# list for the process's life, changed in place only, so a module that imported it sees
# every registration (``Store.transaction`` tests it before asking ``provided_scope``:
# every transaction begins there, and with no integration registered that is the whole cost).
PROVIDERS: list[Callable[[], Any]] = []
_on_begin: dict[Callable[[], Any], Callable[[Any, Any], None]] = {}
_lock = threading.Lock()


def _forked() -> None:
    global _lock
    _lock = threading.Lock()  # (one a parent's thread held at the fork stays held)


os.register_at_fork(after_in_child=_forked)


class _NoScope:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_SCOPE"


NO_SCOPE: Any = _NoScope()  # transaction(scope=NO_SCOPE): in no scope, providers not asked


def register_scope_provider(fn: Callable[[], Any],
                            on_begin: Callable[[Any, Any], None] | None = None) -> None:
    """Register ``fn() -> str | bytes | None``, asked when a transaction begins without a
    scope; the first provider naming a scope wins.  ``on_begin(store, tx)``, when given,
    is called with each transaction whose scope ``fn`` named, before ``transaction()``
    returns it: a key it reads with ``tx.get`` and another commit changes before the
    transaction commits makes that commit raise ConflictError (the ordinary read-set
    validation: a check at commit with no hook of its own), and what it raises refuses
    the transaction (rolled back: nothing changed).  Registering the same function again
    only replaces its ``on_begin``."""
    with _lock:
        if fn not in PROVIDERS:
            PROVIDERS.append(fn)
        if on_begin is not None:
            _on_begin[fn] = on_begin
        else:
            _on_begin.pop(fn, None)


# The registered scope guards, in registration order (``register_scope_guard``; changed in
# place only, under ``_lock``): asked when a transaction declares its work in a scope
# itself, ``scope=`` at its begin or at ``tx.action``.  Public to read, never to change.
GUARDS: list[Callable[[Any, Any, Any], None]] = []


def register_scope_guard(fn: Callable[[Any, Any, Any], None]) -> None:
    """Register ``fn(store, tx, scope)``, called when a transaction is begun with an
    explicit ``scope=`` (before ``transaction()`` returns it), when it declares an
    action in a scope (``tx.action(..., scope=)``, or in the transaction's own scope), before
    the action is logged or its body runs, and when it takes up the files of a workspace
    registered with a scope (``tx.files(ws)``, before any file is touched).  What it raises refuses that: the transaction
    is rolled back at its begin, or the action is not begun (the caller's ``with`` never
    enters) or the files not handed out (the transaction stays open, as after any
    refused call).  It may fence the transaction against undo of the scope
    (``add_undo_fence(tx, scope)``, then ``tx.snapshot``).
    An integration owning a kind of scope registers one (OpenAI sessions: a tool's work
    for a turn that a rewind of its session cut off is refused).  Registering the same
    function again changes nothing."""
    with _lock:
        if fn not in GUARDS:
            GUARDS.append(fn)


def add_undo_fence(tx: Any, scope: Any) -> None:
    """Fence ``tx`` against undo of ``scope`` too (``Transaction.undo_fence``: one scope,
    or a tuple of them when it works for several: a tool booking in two sessions' scopes,
    or in a session's inside a LangGraph node).  Setting the attribute kept only the
    last (or first) scope, and a rewind of another committing while the transaction ran
    let its work there commit after it and stand (stop 75).  A scope already fenced, or
    one inside it (a rewind of ``scope`` reaches into it), is not added again.  Read
    ``tx.snapshot`` after: the fence dates from it."""
    fence = tx.undo_fence
    if fence is None:
        tx.undo_fence = scope
        return
    fences = tuple(fence) if isinstance(fence, (tuple, list)) else (fence,)
    if not any(_inside(f, scope) for f in fences):
        tx.undo_fence = fences + (scope,)


class CommitChecks(list):
    """The checks one transaction's commit runs (``add_commit_check``), in order: a
    flat list, so a transaction checked a thousand times nests no calls."""
    __slots__ = ()

    def __call__(self) -> None:
        for check in self:
            check()


def add_commit_check(tx: Any, check: Callable[[], None]) -> None:
    """Add ``check`` to what ``tx``'s commit (or prepare) runs under the journal lock as
    it appends (``Transaction.commit_check``; what it raises, ConflictError, refuses the
    commit: the transaction rolls back, its actions compensated): after those already
    set (a workspace's read check, an integration's), never replacing one.  It must be
    quick, take no lock and hold no reference to ``tx`` (a dropped transaction is freed
    at once)."""
    current = tx.commit_check
    if current is None:
        tx.commit_check = check
    elif isinstance(current, CommitChecks):
        current.append(check)
    else:
        tx.commit_check = CommitChecks((current, check))


def add_commit_tag(tx: Any, tag: str) -> None:
    """Tag ``tx``'s COMMIT with ``tag`` (its ``tags`` field: ``store.log()`` shows them in
    ``TxnInfo.extra["tags"]``), once: what an integration must read back from the log
    after a restart about how the transaction was made (OpenAI sessions: work of a tool
    inside an SDK run, ``"openai-run"``).  A transaction that never commits keeps none."""
    tags = tx.commit_body.setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def commit_checks(tx: Any) -> list[Callable[[], None]]:
    """The checks ``add_commit_check`` gave ``tx`` (a copy; [] when none)."""
    current = tx.commit_check
    if current is None:
        return []
    return list(current) if isinstance(current, CommitChecks) else [current]


def fenced_for(tx: Any, scope: Any) -> bool:
    """Is ``tx`` fenced against undo of ``scope`` (its fence names it or a scope inside
    it)?"""
    fence = tx.undo_fence
    return fence is not None and any(
        _inside(f, scope) for f in (fence if isinstance(fence, (tuple, list)) else (fence,)))


def _inside(inner: Any, outer: Any) -> bool:
    """Does scope ``inner`` lie inside scope ``outer`` (both str, or both bytes: a str
    subclass such as an ``enum.StrEnum`` member is a str, as the log records it)?"""
    if isinstance(outer, str):
        return isinstance(inner, str) and inner.startswith(outer)
    return isinstance(outer, bytes) and isinstance(inner, bytes) and inner.startswith(outer)


def guard_scope(store: Any, tx: Any, scope: Any) -> None:
    """Ask every registered guard about ``tx`` working in ``scope`` (see
    ``register_scope_guard``); what one raises propagates."""
    for fn in list(GUARDS):
        fn(store, tx, scope)


# The registered undo watchers, in registration order (``register_undo_watcher``; changed
# in place only, under ``_lock``).  Public to read, never to change.
UNDO_WATCHERS: list[Callable[[Any, Any], "Callable[[bool], None] | None"]] = []
# The ``on_revert`` of those registered with one, in the same order (changed in place
# only, under ``_lock``): ``Store.revert`` tests it before watching (no such watcher: no
# cost).  Public to read, never to change.
REVERT_WATCHERS: list[Callable[[Any, "UndoReach"], "Callable[[bool], None] | None"]] = []
_on_revert: dict[Callable[[Any, Any], Any], Callable[[Any, "UndoReach"], Any]] = {}


class UndoReach:
    """What a ``store.revert`` reaches, told to the undo watchers' ``on_revert`` once it
    planned (``register_undo_watcher``): ``scope``, the revert's ``scope=`` (None:
    unscoped); ``scopes``, the scopes of the work it undoes (the scope its transactions
    were begun in, those its compensated or needs-redo-marked actions were declared in,
    those of the workspaces whose files it puts back; with ``scope=``, each inside it, or
    ``scope`` itself for one around it); ``keys``, the keys it puts back (as the user gave
    them, cascade included).  All of it comes from the revert's own plan: its size is the
    revert's, whatever the store's age.  A revert undoing nothing tells nobody."""

    __slots__ = ("scope", "scopes", "keys")

    def __init__(self, scope: Any, scopes: Any = (), keys: Any = ()) -> None:
        self.scope = scope
        self.scopes: tuple = tuple(scopes)
        self.keys: tuple = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self.scopes or self.keys)

    def __repr__(self) -> str:
        return (f"UndoReach(scope={self.scope!r}, scopes={self.scopes!r}, "
                f"keys={self.keys[:5]!r}{'...' if len(self.keys) > 5 else ''})")

    def reaches(self, prefix: Any) -> bool:
        """Does the revert reach scope ``prefix``: a key under it, or a scope nesting
        with it (inside it, or around it)?  (O(its keys): an integration with many
        scopes looks each key's up by its prefixes instead.)"""
        return (any(_inside(s, prefix) or _inside(prefix, s) for s in self.scopes)
                or any(_inside(k, prefix) for k in self.keys))


_End = Callable[[bool], None]

# Which undo the watchers are being told of, set around their calls (``undo_kind``).
_UNDOING: "contextvars.ContextVar[str | None]" = contextvars.ContextVar(
    "walstore_undo_kind", default=None)


def undo_kind() -> str | None:
    """Inside an undo watcher's call (``register_undo_watcher``): which undo it is told
    of, ``"rewind"``, ``"purge"`` or ``"revert"``; None elsewhere.  (OpenAI sessions name
    it in their refusals: a turn cut off by a purge was said to be "rewound".)"""
    return _UNDOING.get()


def register_undo_watcher(fn: Callable[[Any, Any], "_End | None"],
                          on_revert: "Callable[[Any, UndoReach], _End | None] | None" = None
                          ) -> None:
    """Register ``fn(store, scope) -> end | None``, called in the undoing thread (and
    context) before a ``store.rewind`` (``scope``: its scope, None for an unscoped one;
    not a dry run) or a ``store.purge`` (``scope``: its prefix) begins.  ``end(committed)``,
    when returned, is called in that thread once the undo ended, its compensations run:
    ``committed`` is True when the undo committed (or may have: its outcome unknown),
    False when it changed nothing.  An integration owning a kind of scope registers one
    to count an undo reaching its scopes however it was called (OpenAI sessions: a turn
    in flight across ``store.rewind(..., scope=session.scope)`` is cut off).  What
    ``fn`` raises refuses the undo (nothing begun).  ``undo_kind()``, read in ``fn``,
    tells a rewind from a purge.  ``fn``, ``on_revert`` and the ends run with
    asynchronous signals held off (``walstore.signals.deferred``: a Ctrl-C comes in
    after them, never between a watcher's marks and its end): keep them quick.

    ``on_revert(store, reach) -> end | None``, when given, is told of each
    ``store.revert`` (not a dry run): a revert's reach is known only once it planned, so
    it is called then, in the undoing thread, before the revert commits, with what it
    reaches (``UndoReach``: the scopes and keys of what it undoes; never for one that
    undoes nothing).  A revert that plans again (a commit raced it) tells it only what
    the new plan reaches beyond the first.  Its ``end`` is called as ``fn``'s is, once
    the revert ended (``committed`` False when it raised before its commit).  It runs
    with the revert's transaction open, perhaps with every other thread's commits held
    out: it must not wait for another thread's commit.  What it raises refuses the
    revert (nothing committed).  ``fn`` is never called for a revert, and a watcher
    registered without ``on_revert`` is not told of one (as before stop 76; walstore's
    own integrations register none: a revert edits no conversation or thread).
    Registering the same ``fn`` again only replaces its ``on_revert``."""
    with _lock:
        if fn not in UNDO_WATCHERS:
            UNDO_WATCHERS.append(fn)
        if on_revert is not None:
            _on_revert[fn] = on_revert
        else:
            _on_revert.pop(fn, None)
        REVERT_WATCHERS[:] = [_on_revert[f] for f in UNDO_WATCHERS if f in _on_revert]


class WatchedUndo:
    """``with WatchedUndo(store, scope) as w:`` around a rewind or purge: the registered
    undo watchers told of it (see ``register_undo_watcher``); set ``w.committed`` when it
    returns.  An error out of it tells them whether the undo committed all the same (a
    compensation or an erasure owed after the commit, an outcome unknown).
    ``WatchedUndo(store, scope, revert=True)`` around a revert tells nobody as it begins:
    the revert calls ``w.reach(UndoReach)`` once it planned (``on_revert``);
    ``purge=True`` around a purge (``undo_kind``).  Call ``w.left()`` in a ``finally``
    around the ``with``."""

    __slots__ = ("ends", "committed", "store", "_told")

    def __init__(self, store: Any, scope: Any, revert: bool = False,
                 purge: bool = False) -> None:
        self.committed = False
        self.ends: list[Callable[[bool], None]] = []
        self.store = store
        # (a revert) each on_revert's (scopes, keys) it was told, kept per watcher: one
        # refusing with ConflictError, which the revert retries, was told nothing
        self._told: dict[Any, tuple[set, set]] = {}
        if revert:
            return
        self._tell(lambda fn: fn(store, scope), UNDO_WATCHERS,
                   "purge" if purge else "rewind", refused=True)

    def _tell(self, call: Callable[[Any], Any], watchers: list, kind: str,
              refused: bool = False) -> None:
        """Each of ``watchers`` told (``call(fn)``), its end kept, with asynchronous
        signals held off (walstore.signals): a Ctrl-C between a watcher's marks and its
        end kept left an OpenAI session under way for good, its every write refused
        after 120 s (stop 76 h4).  ``refused``: what one raises ends those told."""
        with deferred():
            token = _UNDOING.set(kind)
            try:
                for fn in list(watchers):
                    end = call(fn)
                    if end is not None:
                        self.ends.append(end)
            except BaseException:
                if refused:
                    try:
                        self._end(False)
                    except BaseException:  # noqa: BLE001 - (the refusing watcher's
                        pass               # error is said)
                raise
            finally:
                _UNDOING.reset(token)

    def reach(self, reach: UndoReach) -> None:
        """A revert planned to undo ``reach``: the ``on_revert`` watchers told of what of
        it they were not told yet (a second plan, after a conflict, may reach further).
        What one raises propagates (the revert is refused); the ends of those told are
        called by ``__exit__``.  What each was told is kept as it returns: a watcher
        refusing with ConflictError (the revert retries it) left those told before it
        unmarked, and the retry told them again, their ends run twice (stop 76 h4)."""
        scopes = list(dict.fromkeys(reach.scopes))

        def tell(fn: Callable[[Any, UndoReach], Any]) -> Any:
            told_scopes, told_keys = self._told.setdefault(fn, (set(), set()))
            new = UndoReach(reach.scope, [s for s in scopes if s not in told_scopes],
                            [k for k in reach.keys if k not in told_keys])
            if not new:
                return None
            end = fn(self.store, new)
            told_scopes.update(new.scopes)
            told_keys.update(new.keys)
            return end
        self._tell(tell, REVERT_WATCHERS, "revert")

    def __enter__(self) -> "WatchedUndo":
        return self

    def __exit__(self, et: Any, e: Any, tb: Any) -> None:
        with deferred():   # (an interrupt before or between the ends: see _tell)
            if e is not None:
                self.committed = undo_committed(e)
            self._end(self.committed)

    def left(self) -> None:
        """Called in a ``finally`` around the ``with``: the ends an interrupt at the very
        start of ``__exit__`` (before its section) kept from running, run as the undo
        left ``committed``; nothing when they ran."""
        if self.ends:
            self._end(self.committed)

    def _end(self, committed: bool) -> None:
        """Every end called, even when one raises (the first error raised after): one
        watcher's failing end left the others' undo under way for good (OpenAI sessions:
        every write then waited 120 s, every tool refused, stop 75 h3)."""
        ends, self.ends = self.ends, []
        error: BaseException | None = None
        for end in reversed(ends):
            try:
                end(committed)
            except BaseException as e:  # noqa: BLE001 - (raised once all ran)
                error = error or e
        if error is not None:
            raise error


def reached_scope(declared: Any, scope: Any) -> Any:
    """The part of scope ``declared`` a revert limited to ``scope`` (None: unlimited)
    reaches: ``declared`` when inside ``scope``, ``scope`` when inside ``declared`` (work
    declared around it, taken only within it), else None (another scope's)."""
    if declared is None or scope is None:
        return declared
    if _inside(declared, scope):
        return declared
    return scope if _inside(scope, declared) else None


def undo_committed(e: BaseException) -> bool:
    """Whether the rewind, revert or purge that raised ``e`` committed (or may have: its
    outcome unknown) all the same: a compensation or an erasure owed after the commit, an
    interrupt or error out of its compensations (``undo_committed``) or its erasure
    (``purge_committed``).  Nothing else is committed: what raises before the commit
    changes nothing."""
    return (isinstance(e, (ErasureOwed, CommitOutcomeUnknown))
            or (isinstance(e, CompensationFailed) and bool(getattr(e, "committed", False)))
            or getattr(e, "undo_committed", None) is not None
            or getattr(e, "purge_committed", None) is not None)


def current_scope() -> Any:
    return provided_scope()[0]


def provided_scope() -> tuple[Any, Callable[[Any, Any], None] | None]:
    """(the scope a registered provider names, that provider's ``on_begin``); (None,
    None) when none names one."""
    if not PROVIDERS:
        return None, None  # (every transaction begins here: no integration, no cost)
    for fn in list(PROVIDERS):
        try:
            scope = fn()
        except Exception:  # a provider outside its framework's context: no scope
            scope = None
        if scope is not None:
            return check_scope(scope), _on_begin.get(fn)
    return None, None


def check_scope(scope: Any) -> Any:
    if scope is None:
        return None
    if not isinstance(scope, (str, bytes)) or not scope:
        raise (EmptyArgumentError if isinstance(scope, (str, bytes)) else TypeError)(
            f"a scope is a non-empty key prefix (str or bytes), not {scope!r}")
    size = len(scope)
    if isinstance(scope, str) and not scope.isascii():
        try:  # (logged with the commit, and a str key is stored as UTF-8: refused here, at
            size = len(scope.encode("utf-8"))  # the call, not by a UnicodeEncodeError at
        except UnicodeEncodeError as e:        # commit)
            raise ValueError(f"scope {scope!r} is not valid UTF-8 text: {e.reason}; "
                             f"nothing changed") from None
    if size > MAX_KEY_BYTES:  # (a prefix of no key; it was logged in every commit record
        # and txns row, and one past the record limit failed only at commit)
        raise ValueError(f"scope is {size:,} bytes long; a scope is a key prefix and the "
                         f"limit is {MAX_KEY_BYTES} bytes (the key limit); nothing changed")
    return scope


class ScopeRange:
    """The stored-key range [lo, hi) of a scope prefix (a str prefix matches str keys)."""

    def __init__(self, scope: Any) -> None:
        self.scope = check_scope(scope)
        self.lo = encode_prefix(scope)
        self.hi = prefix_end(self.lo)

    def contains(self, stored_key: bytes) -> bool:
        return stored_key >= self.lo and (self.hi is None or stored_key < self.hi)

    def same(self, other: Any) -> bool:
        """Was something declared in this scope (or a narrower one inside it)?"""
        if other is None or type(other) is not type(self.scope):
            return False
        return other.startswith(self.scope)
