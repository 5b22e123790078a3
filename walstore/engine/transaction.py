"""Transactions and savepoints: the unit of work an agent does against the store.

A transaction buffers its writes in memory (nothing reaches the WAL before commit, so a
rollback of plain writes costs nothing on disk), reads its own writes, and reads committed
state from ONE snapshot taken at its first read (:mod:`walstore.engine.snapshot`): it
never sees a state no sequence of commits produced.  What it read is validated at commit
(serializable optimistic concurrency, :mod:`walstore.engine.conflicts`).

The transaction owns its commit (``commit``): it assembles a CommitRequest and hands it to
the one pipeline (:mod:`walstore.engine.pipeline`), then acts on where an error came from:
before the commit point, nothing was committed and the transaction rolls back and
compensates its actions; ``CommitOutcomeUnknown``, the outcome is for recovery to decide
and nothing is compensated.  External side effects, files and two-phase commit are the
agent layer's (``hooks``, a ``TransactionHooks``); the transaction only keeps their order.

Savepoints follow SQLite: ``savepoint(name)`` pushes one; ``rollback_to(sp)`` undoes every
write (and compensates every action) made after ``sp`` and discards newer savepoints while
``sp`` stays usable; ``release(sp)`` pops ``sp`` and every newer one and keeps their
writes; a name means the innermost savepoint of that name.

States: ``active`` -> ``committed`` | ``rolled back`` | ``outcome unknown``; ``prepared``
(``gid`` set) is active but takes no more writes, actions or savepoints.  The end is decided once:
``commit``, ``rollback``, ``prepare``, ``rollback_to`` and the store's ``close()`` hold the
transaction's end lock while they decide, so a ``rollback()`` from another thread (or
``close()``) waits for a ``commit()`` under way and then raises TransactionClosed, or wins
and the later ``commit()`` raises it, never both.  Lifetime: used by one thread (another
may end it: a write racing that end is in what it commits or prepares, or refused with
TransactionClosed — ``seal_writes``); may stay open for hours at no cost to others (it holds no lock, no LMDB
reader, no WAL); dropped without an end, it simply never commits (actions it logged are
compensated by the next open's recovery).
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref

from _thread import RLock as _RLock
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from ..codec import MAX_KEY_BYTES, MAX_TXN_WRITE_BYTES, WRITE_OVERHEAD, Key, check_meta, \
    check_stored, decode_key, encode_key, encode_prefix, pack_items, pack_value, prefix_end, unpack_common, DECODE_ERRORS, \
    unpack_value
from ..errors import (CommitOutcomeUnknown, CompensationFailed, CorruptionError,
                      FileConflictError, TransactionClosed, TransactionTooLarge, UnknownGid,
                      WalstoreError, type_and_message)
from ..log.format import LSN
from ..signals import deferred
from .conflicts import ReadSet
from .keyindex import KeyIndex
from .lmdb_state import let_go
from .tables import row_damaged
from .pipeline import CommitRequest

_new_seal = object.__new__  # a _Seal without its __init__ (the commit sets its fields)
_lsn = int.__new__  # an LSN of an int walstore made, without LSN()'s check (the commit path)

if TYPE_CHECKING:
    from .engine import Engine
    from ..agent.actions import ActionScope
    from ..agent.files import TxFiles

_MISSING = object()
# what an action a rollback to a savepoint took out still adds to the COMMIT (its id, in
# ``crossed``), counted in MAX_ACTION_BYTES in place of its ``commit_bytes``
CROSSED_ID_BYTES = 64
ACTIVE, COMMITTED, ROLLED_BACK, UNKNOWN = "active", "committed", "rolled back", "outcome unknown"


def _entry_bytes(k: bytes, v: Any) -> int:
    """What the write of ``k`` (packed value ``v``; None: a delete; _MISSING: none) counts
    against MAX_TXN_WRITE_BYTES, as ``log.records.chunk_writes`` counts it."""
    if v is _MISSING:
        return 0
    return len(k) + WRITE_OVERHEAD + (len(v) if v is not None else 0)


class TransactionHooks(Protocol):
    """What the agent layer does for a transaction (implemented by walstore.agent)."""

    def start_action(self, tx: "Transaction", name: str, args: Any, compensate: str | None,
                     scope: Any) -> Any: ...

    def files_of(self, tx: "Transaction", ws: Any) -> Any: ...

    def commit_body(self, tx: "Transaction") -> dict:
        """The COMMIT's extra fields.  Asked only of a transaction with effects, a scope
        or ``commit_body`` fields of its own: one with none commits none (the common
        commit, decided in ``Transaction._commit`` without a call)."""

    def note_crossed(self, tx: "Transaction", effects: list) -> None:
        """A rollback to a savepoint took ``effects`` out of ``tx`` (called with signals
        deferred, no I/O): what the commit must still say of them."""

    def undo_actions(self, tx: "Transaction", actions: list, cause: BaseException | None
                     ) -> None: ...

    def end_without_commit(self, tx: "Transaction", cause: BaseException | None,
                           ended: Callable[[], None]) -> None:
        """Record that ``tx`` ends uncommitted, call ``ended`` (no interrupt between the
        two), then undo its effects."""

    def prepare(self, tx: "Transaction", gid: str) -> None: ...

    def commit_prepared(self, gid: str) -> int: ...

    def rollback_prepared(self, gid: str) -> None: ...

    def effects_began(self, tx: "Transaction") -> None:
        """``tx`` logged its first effect (an intent, a before-image): until it ends it is
        one the store must roll back if it is closed under it."""

    def effects_ended(self, tx: "Transaction") -> None:
        """``tx`` (one ``effects_began`` named) ended."""


def scan_bounds(prefix: Key | None, start: Key | None, end: Key | None,
                reverse: bool = False) -> tuple[bytes, bytes | None]:
    """Stored-key bounds [lo, hi) of a scan (start inclusive, end exclusive); TypeError
    when ``reverse`` is not a bool (a str failed deep inside as "'str' object cannot be
    interpreted as an integer").

    str and bytes keys are distinct and never ordered against each other (as in Python),
    so a bound names its own type's keys: a str ``start`` or ``end`` scans str keys only,
    a bytes one bytes keys only, and bounds of both types are a TypeError.  (The stored
    order puts every bytes key before every str key: ``scan(end="m")`` yielded every bytes
    key too, ``scan(start=b"x")`` every str key, and ``scan(prefix="a/", start=b"a/2")``
    ignored its start — probe-audit48.)"""
    if reverse is not True and reverse is not False:
        raise TypeError(f"reverse must be a bool, not {type(reverse).__name__}")
    lo, hi = b"", None
    space = b""  # the type tag of the bounds given (encode_key's ``s`` or ``b``)
    for which, bound in (("prefix", prefix), ("start", start), ("end", end)):
        if bound is None:
            continue
        b = encode_prefix(bound)
        if not space:
            space = b[:1]
            lo, hi = space, prefix_end(space)  # (never None: the tag is not 0xff)
        elif b[:1] != space:
            raise TypeError(f"scan bounds must be all str or all bytes: str and bytes keys "
                            f"are distinct and never ordered against each other ({which} "
                            f"is {type(bound).__name__}, an earlier bound is "
                            f"{'str' if space == b's' else 'bytes'})")
        if which == "prefix":
            lo, hi = max(lo, b), min(hi, prefix_end(b) or hi)
        elif which == "start":
            lo = max(lo, b)
        else:
            hi = min(hi, b)
    return lo, hi


class Savepoint:
    """A named point inside a transaction.  Use it with ``rollback_to`` / ``release``."""

    def __init__(self, tx: "Transaction", name: str | None, undo_len: int, serial: int,
                 effect_mark: int, inside: tuple = ()) -> None:
        self.name = name
        # (weakly: the transaction holds its savepoints, and a strong reference back made a
        # cycle — a transaction dropped after a savepoint stayed alive, its undo log and
        # its file claims held against every other transaction, until the cyclic gc ran;
        # without one it is freed, and rolled back, at once — audit 62)
        self._tx_ref = weakref.ref(tx)
        self._undo_len = undo_len
        self._serial = serial
        self.effect_mark = effect_mark  # how many effects (actions, file changes) existed
        # effects still running when it was taken that cannot be cut at it (an open
        # watch(): ``blocks_inner_rollback``); rolling back to it is refused
        self.inside = inside
        self.active = True
        # the keys whose value before this savepoint's level is already in the undo log
        # at this level (``Transaction._keep_before``): a key written again at the same
        # level adds no entry (each rewrite added one, holding the value it replaced: a
        # savepoint under 200 rewrites of a 1 MiB value kept 200 MiB alive for a 1 MiB
        # write set, past every bound of the transaction — probe-audit54)
        self.recorded: set[bytes] = set()

    @property
    def _tx(self) -> "Transaction | None":
        """Its transaction (None once that was dropped and freed)."""
        return self._tx_ref()

    def __enter__(self) -> "Savepoint":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        tx = self._tx
        if not self.active or tx is None or tx.state != ACTIVE:
            return False
        if exc_type is not None and tx.gid is not None:
            # prepared inside the block (it voted yes): its write set is fixed until its
            # coordinator decides, as the ``with`` transaction's end leaves it; the block's
            # exception goes on (a rollback_to here raised TransactionClosed in its place,
            # the caller's error only as its context — probe-audit54)
            tx.release(self)
            return False
        if exc_type is not None:
            try:
                tx.rollback_to_on(self, exc)
            except (CompensationFailed, FileConflictError):
                # the writes after it were undone and its effects' undo was tried (some
                # failed: owed, listed): the block still ends, so the savepoint goes with
                # it (left active, a later ``rollback_to(name)`` outside the block undid
                # the transaction's writes since — probe-audit48)
                if self.active and tx.state == ACTIVE:
                    tx.release(self)
                raise
        tx.release(self)
        return False

    def __repr__(self) -> str:
        return f"<Savepoint {self.name!r} #{self._serial} {'active' if self.active else 'gone'}>"


class _Seal:
    """The write set a commit or prepare under way took (``Transaction.seal_writes``):
    a write another thread makes meanwhile is in it or is refused (``_late_write``)."""

    __slots__ = ("writes", "lookup", "racers", "source", "size", "changed")

    def __init__(self, tx: "Transaction") -> None:
        """Takes ``tx``'s write set (``Transaction.seal_writes``): ``tx._seal`` is this
        from the moment its fields a racing write reads are set."""
        self.writes: list | None = None
        self.lookup: dict | None = None
        # the id() of the write-set dict the copy was taken of, and the transaction's
        # write bytes then: a racing write that reaches its check after the commit's end
        # dropped ``writes`` is told by the dict it wrote into (a commit's end replaces
        # the dict: a write into the new one is in no commit), and the end keeps
        # ``writes`` when the dict changed after the copy (``changed``, set by the end:
        # a write there will come to check itself, then drop them; a writer interrupted
        # before its check leaves them to the transaction object's life): set below
        self.changed = False
        # one entry per racing write waiting to check itself against ``writes``: the end
        # of the commit keeps them for it, else drops them (a committed transaction its
        # caller keeps holds none of its writes)
        self.racers: list = []
        tx._seal = self  # (seen by every write after this line)
        # (a copy in one C step first: a list made by iterating the live dict raised
        # RuntimeError, "dictionary changed size during iteration", when another thread
        # wrote meanwhile — the collector can run Python code between two items)
        source = tx._writes
        self.source = id(source)
        self.size = tx._write_bytes  # (read before the copy: a write between the two
        # reads counts as changed, never the other way round)
        self.writes = list(source.copy().items())


class _RolledBackTo:
    """The verb a refused ``rollback_to(sp)`` names ("rolled back to <Savepoint ...>"),
    formatted only when a refusal says it."""

    __slots__ = ("sp", "active")

    def __init__(self, sp: Any, active: bool | None) -> None:
        self.sp = sp
        # (as the savepoint was at the call: a commit the refused call waited for may
        # have ended it since)
        self.active = active

    def __format__(self, spec: str) -> str:
        sp = self.sp
        if type(sp) is Savepoint:
            return (f"rolled back to <Savepoint {sp.name!r} #{sp._serial} "
                    f"{'active' if self.active else 'gone'}>")
        return f"rolled back to {sp!r}"

    __str__ = __repr__ = lambda self: self.__format__("")


class Transaction:
    """A unit of work; commit on ``with`` exit, roll back on an exception (a prepared one
    is left in doubt for its coordinator: see ``__exit__``)."""

    # The attributes the common paths read (a commit reads ~25 of them) are slots, set in
    # __init__: CPython 3.11 specializes no read of a class attribute
    # through an instance (each was a generic lookup, the type's then the instance's
    # dict, ~170 instructions: ~3.4k of an empty transaction's 28.8k), a slot's read and
    # store it does.  The rest stay class attributes, set per instance once changed
    # (every transaction began by storing them all, and past 30 attributes its instance
    # dict was built over again at its first new one).  The slots:
    # - ``_seal``: set once a commit or prepare takes the write set (a _Seal)
    # - ``lsn``, ``gid``: the commit's LSN; the gid it is prepared as
    # - ``_snapshot``: the LSN it reads at, from its first read
    # - ``_logged``: wrote a record before commit (an intent, a before-image)
    # - ``_request``: the commit() under way or done (a CommitRequest)
    # - ``_ending``: the end call under way (see ``_end_lock`` in __init__)
    # - ``_write_trigger``: the write set's size as MAX_TXN_WRITE_BYTES counts it is
    #   bounded at each write: ``_write_bytes`` is an upper bound of it (each write adds
    #   its key and value, a rewrite's old value is not taken off: no lookup on the hot
    #   path); once the bound passes this trigger (MAX_TXN_WRITE_BYTES), the trigger drops
    #   to -1 and the size is counted exactly from then on (``_count_exactly``, a lookup
    #   per write)
    # - ``_write_order``: the write set's key order for scans, made by the first scan of
    #   a large write set (``_writes_in``); dropped when keys leave the write set
    #   (``rollback_to``)
    # - ``_inner_blockers``: the effects that joined ``effects`` with
    #   ``blocks_inner_rollback`` (an open watch()): ``note_inner_blocker``.  A savepoint
    #   looks only at these (it tested every effect: an agent loop taking a savepoint per
    #   action paid for all the earlier actions, 16,000 steps in 24 s); a list once one
    #   is noted
    # - ``_savepoints``, ``_undo``, ``_undo_lock``: the savepoints, oldest first, and the
    #   undo log of the writes made under them (each entry a key and its value before the
    #   level it was logged at); the undo log and each savepoint's ``recorded`` keys
    #   change in one step against savepoint(), release() and rollback_to() under
    #   ``_undo_lock`` (see ``_keep_before``).  Empty tuples and no lock until the first
    #   savepoint() makes the transaction's own (under the end lock, before the savepoint
    #   joins the list: whoever sees a savepoint finds the lock and the log)
    # - ``guard_ranges``: ranges guarded against commits that land after the snapshot, as
    #   a scan's are, but not against prepared transactions' holds (an undo's whole
    #   scope; see ReadSet)
    # - ``guard_scopes``: the scopes an undo guards whole, keys or not (ReadSet.scopes;
    #   None: every commit)
    # - ``undo_fence``: the scope this transaction works for (or a tuple of them),
    #   fenced against undo: a rewind of it or a purge across it committed after this
    #   began makes the commit conflict (ReadSet.fence)
    # - ``guard_files``: an undo restoring files: any commit that changed files since its
    #   snapshot conflicts (the file history it planned from ends there; ReadSet.files)
    # - ``file_reads``, ``commit_check``: workspace paths this transaction read
    #   (``tx.files(ws).read``/``exists``), and the check its commit runs on them under
    #   the journal lock (CommitRequest.check): set by walstore.agent.files at the first
    #   such read, and by integrations (an OpenAI session's undo check), each added to
    #   those set (walstore.agent.scope.add_commit_check)
    # - ``_serial``: numbers its savepoints
    # - ``_order_gen``: counts the rollback_to()s that took keys out of the write set: a
    #   key order made before one (perhaps by another thread's scan, while its keys were
    #   being taken out) is not used (``_writes_in``)
    __slots__ = ("__dict__", "__weakref__", "_seal", "lsn", "gid", "_snapshot", "_logged",
                 "_request", "_ending", "_write_trigger", "_write_order", "_inner_blockers",
                 "_savepoints", "_undo", "_undo_lock", "guard_ranges", "guard_scopes",
                 "undo_fence", "guard_files", "file_reads", "commit_check", "_serial",
                 "_order_gen")

    actions_begun = 0    # numbers action ids
    action_bytes = 0     # what its actions add to its COMMIT (MAX_ACTION_BYTES)
    undo_pending = False  # rolled back, its effects not yet all undone (see _rollback)
    closed_by_store = False  # rolled back by the store's close() (end_at_close)
    _unknown_of = "its COMMIT"  # outcome unknown: the record whose fsync failed
    # the thread that logged its first effect (weakly; see AgentHooks.roll_back_open):
    # its object, not its ident, which a later thread may be given again
    thread: "weakref.ref | None" = None

    def __init__(self, engine: "Engine", hooks: TransactionHooks, txid: int, meta: Any = None,
                 scope: Any = None) -> None:
        self._engine = engine
        self._hooks = hooks
        # what must stay alive while the transaction is open (the Store facade that began
        # it: a store the program dropped was closed by its __del__ under an open
        # transaction); let go when it finishes
        self.keepalive: Any = None
        self.id = txid
        self.meta = meta if meta is None else check_meta(meta)
        self.scope = scope
        self.state = ACTIVE
        self._writes: dict[bytes, bytes | None] = {}
        self._write_bytes = 0  # (see ``_write_trigger``)
        self.read_keys: set[bytes] = set()
        # scanned ranges, each once (an ordered set: a transaction polling one prefix kept
        # a range per scan — 100,000 polls held 14 MiB and logged 100,000 ranges in its
        # PREPARE, past whose record limit prepare was refused — probe-audit54)
        self.read_ranges: dict[tuple[bytes, bytes | None], None] = {}
        self.effects: list = []   # live actions and file changes, in the order logged
        self.commit_body: dict = {}  # agent layer: extra COMMIT fields (revert, rewind, ...)
        # A transaction's end is decided once: commit(), rollback(), prepare(),
        # rollback_to() and close()'s rollback hold this lock from their check of the state
        # to the state they leave (a commit() in one thread and a rollback() in another —
        # a watchdog, or close() — both went ahead: the rollback logged the ABORT and
        # refunded, then the COMMIT landed and commit() returned).  The second caller
        # waits for the first and then finds it ended.  ``_ending`` names the call holding
        # it: the same thread coming in again (a compensator, a signal handler) is refused
        # rather than let through the re-entrant lock
        self._end_lock = _RLock()  # (the C lock: threading.RLock is a wrapper's call)
        # the slots (see __slots__), as they begin
        self._seal = self.lsn = self.gid = self._snapshot = self._request = None
        self._ending = self._write_order = self._undo_lock = self.undo_fence = None
        self.file_reads = self.commit_check = None
        self._logged = self.guard_files = False
        self._write_trigger = MAX_TXN_WRITE_BYTES
        self._inner_blockers = self._savepoints = self._undo = ()
        self.guard_ranges = self.guard_scopes = ()
        self._serial = self._order_gen = 0
        # (``_undo``, ``_savepoints`` and ``_undo_lock``: the class's empty ones until the
        # first savepoint(); most transactions take none)

    @property
    def logged(self) -> bool:
        """Wrote a record before its commit (an intent, a before-image): its effects are
        in the outside world, so ending it without a commit must undo them."""
        return self._logged

    @logged.setter
    def logged(self, value: bool) -> None:
        if value and not self._logged and self.state == ACTIVE:
            self.thread = weakref.ref(threading.current_thread())
            self._hooks.effects_began(self)
        self._logged = value

    # ---- context manager ---------------------------------------------------------------
    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.state != ACTIVE:
            return False
        if self.gid is not None:
            # prepared (it voted yes): only the coordinator decides — ``commit()`` /
            # ``rollback()`` or the store's ``commit_prepared`` / ``rollback_prepared``.
            # The block's end leaves it in doubt, an exception included (it committed
            # here, deciding for a coordinator that might still abort the others)
            return False
        if exc_type is not None:
            if self._engine._forked_from is not None:
                # a forked child leaving its parent's block on an exception (a sys.exit,
                # an error): the transaction is the parent's, which goes on with it; the
                # child's exception passes as it is (a rollback here raised StoreClosed
                # over it, saying the undo ran "when the store is reopened": a child's
                # sys.exit(0) exited 1 with a traceback)
                return False
            self.rollback_on(exc)
        else:
            try:
                self.commit()
            except WalstoreError:
                if self.state == ACTIVE:
                    # refused before anything was decided (``_check_no_running_body``: a
                    # put-back a rollback_to could not record): the block ends the
                    # transaction all the same — left active, it kept its claims until
                    # someone found it (review44)
                    with contextlib.suppress(WalstoreError):
                        self.rollback()
                raise
        return False

    def rollback_on(self, cause: BaseException) -> None:
        """Roll back because of ``cause``, as a ``with`` block ending on it does (a
        CompensationFailed chains it), a prepared transaction too (its coordinator
        deciding abort: ``atomic``); nothing when it already ended."""
        with self._end_lock:
            if self._ending is None and self.state == ACTIVE:
                self._ending = "rolled back"
                try:
                    self._rollback(cause)
                finally:
                    self._ending = None

    def _check_active(self) -> None:
        if self.state != ACTIVE:
            if self.closed_by_store:
                raise TransactionClosed(f"transaction {self.id} was rolled back by the store's "
                                        f"close() (nothing of it was committed; its "
                                        f"compensations ran)")
            raise TransactionClosed(f"transaction {self.id} is already {self.state}")
        self._engine.check_open()

    def _check_undecided(self) -> None:
        """A prepared transaction decided meanwhile through the store
        (``store.commit_prepared``/``rollback_prepared``, ``resolve_atomic``) is finished as
        decided, and TransactionClosed raised: its reads went on showing its write set
        (after ``rollback_prepared``, rows the store never held) and its state read
        "active" until its own commit() or rollback() was called (audit 68)."""
        gid = self.gid
        if gid in self._engine.prepared:
            return
        if self._ending is not None:
            # its commit() or rollback() is under way (in another thread, or this one's
            # compensator) and finishes it: not waited for — a read waited on the end
            # lock while the rollback's compensations ran, for ever one hanging (audit
            # 68).  A decision made durable ends its reads now
            decided = self._decision(gid)
            if decided == "commit" or decided == "abort":
                how = "committed" if decided == "commit" else "rolled back"
                raise TransactionClosed(f"transaction {self.id} is already {how} (the "
                                        f"decision on {gid!r} is durable; the commit() "
                                        f"or rollback() under way finishes it)")
            return
        with self._end_lock:
            if self._ending is None:
                self._finish_as_decided()
        self._check_active()

    def check_writable(self) -> None:
        """Raise unless this transaction takes writes now: TransactionClosed when it has
        ended (or was decided through the store while prepared), or is prepared (a
        prepared transaction takes no more writes or actions); the store's refusal
        (StoreClosed, a read-only store, a failed store: ``Engine.check_writable``)
        otherwise.  Nothing is changed.  What ``put`` raises; the agent layer asks it
        before logging an action's intent, a file operation or a prepare."""
        self._check_active()
        if self.gid is not None:
            self._check_undecided()  # (decided meanwhile: it said "is prepared" of it)
            raise TransactionClosed(f"transaction {self.id} is prepared as {self.gid!r}; it "
                                    f"takes no more writes or actions")
        self._engine.check_writable()

    # ---- reads ---------------------------------------------------------------------------
    @property
    def snapshot(self) -> int:
        """The LSN this transaction reads at (taken at its first read)."""
        if self._snapshot is None:
            self._engine.refresh()
            self._snapshot = self._engine.memtable.published
        return self._snapshot

    def _read_at(self) -> int:
        """The snapshot, for a read.  A read-only store's later reads first follow the
        writer's LMDB (``Engine.follow_state``: the snapshot stays), so a purge applied
        since the snapshot raises SnapshotTooOld here as it does in the writer."""
        at = self._snapshot
        if at is None:
            return self.snapshot
        if self._engine.follower is not None:
            self._engine.follow_state()
        return at

    def get(self, key: Key, default: Any = None) -> Any:
        self._check_active()
        if self.gid is not None:  # (prepared: one test on the read path)
            self._check_undecided()
        if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES:
            k = b"b" + key  # (``encode_key``'s first case: codec._BYTES, the tag)
        else:
            k = encode_key(key)
        v = self._writes.get(k, _MISSING)  # (one lookup: a test then a lookup raised
        if v is _MISSING:                  # KeyError when another thread's rollback_to
            # took the key out in between — probe-audit51)
            self.read_keys.add(k)
            v = self._engine.reader.as_of(k, self._read_at(), True)
        if v is None:
            return default
        try:  # (``unpack_value``'s first try written out: a call less per read)
            return unpack_common(v)
        except DECODE_ERRORS:
            pass
        try:
            return unpack_value(v)
        except CorruptionError as e:  # (damage inside the value: name the row)
            raise row_damaged("data", k, e, self._engine.state.data_file) from e

    def __getitem__(self, key: Key) -> Any:
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def __iter__(self) -> Iterator[Any]:
        """Not iterable: ``for k in x`` fell back to ``x[0]``, ``x[1]`` ... (Python's old
        protocol, as ``__getitem__`` is defined) and raised a KeyError or "key must be str
        or bytes, not int: 0"; iterate ``scan()`` instead (probe-audit51)."""
        raise TypeError(f"a Transaction is not iterable; iterate its scan() (key, value pairs "
                        f"in key order), e.g. for key, value in x.scan(prefix=...)")

    def __contains__(self, key: Key) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def scan(self, prefix: Key | None = None, start: Key | None = None, end: Key | None = None,
             reverse: bool = False) -> Iterator[tuple[Key, Any]]:
        """(key, value) in key order within the bounds (start inclusive, end exclusive).
        Bad bounds and an ended transaction raise here, at the call; what is read (and
        the range recorded for validation) begins at the first ``next``."""
        self._check_active()
        if self.gid is not None:
            self._check_undecided()
        return self._scan(*scan_bounds(prefix, start, end, reverse), reverse)

    def _scan(self, lo: bytes, hi: bytes | None, reverse: bool
              ) -> Iterator[tuple[Key, Any]]:
        self._check_active()  # (again: it may have ended between the call and the first read)
        self.read_ranges[(lo, hi)] = None
        mine = self._writes_in(lo, hi)
        committed = self._engine.reader.scan(lo, hi, reverse, self._read_at())
        for k, v in _overlay(committed, mine, reverse):
            if self.state != ACTIVE or self.gid is not None:  # (ended under a half-read
                # scan: it went on yielding its write set as if it were there, rows a
                # rollback had undone and the store would never hold, where tx.get raised
                # at once — probe-audit55; or decided through the store once prepared)
                self._check_active()
                if self.gid is not None:
                    self._check_undecided()
            try:
                item = decode_key(k), unpack_value(v)
            except CorruptionError as e:
                raise row_damaged("data", k, e, self._engine.state.data_file) from e
            yield item

    def _writes_in(self, lo: bytes, hi: bytes | None) -> dict[bytes, bytes | None]:
        """This transaction's writes in [lo, hi): a pass over a small write set, else a
        range of its key order (``_WriteOrder``), so a scan beside 100,000 writes costs
        what it reads, not the write set (it cost ~7 ms a scan)."""
        writes = self._writes
        if len(writes) <= _SMALL_WRITE_SET:
            # a copy made in one C step that runs no Python code, so no other thread runs
            # during it (a pass over the dict raised RuntimeError when another thread wrote
            # meanwhile — probe-audit51; so did ``list(writes.items())``, seen once in CI:
            # its tuples can set off a garbage collection, whose finalizers run Python
            # code and let another thread's rollback_to in mid-pass)
            snap = writes.copy()
            return {k: v for k, v in snap.items() if k >= lo and (hi is None or k < hi)}
        # Another thread may write, or roll back to a savepoint, while this one scans (a
        # transaction shared by an agent's threads): the order is brought up to date
        # under its own lock, made again when it cannot be, and a key it lists that left
        # the write set meanwhile is passed over (before: RuntimeError, and an order
        # that lost the keys written during its catch_up, left out of every later scan)
        gen = self._order_gen
        order = self._write_order
        if order is None or order.gen != gen or not order.catch_up(writes):
            order = self._write_order = _WriteOrder(writes, gen)
        with order.lock:
            keys = order.keys.range(lo, hi)
        out = {}
        for k in keys:
            v = writes.get(k, _MISSING)
            if v is not _MISSING:
                out[k] = v
        return out

    # ---- writes --------------------------------------------------------------------------
    def put(self, key: Key, value: Any) -> None:
        eng = self._engine  # (``Engine.writable`` written out: a property is a call)
        if (self.state != ACTIVE or self.gid is not None or eng.closed or eng.readonly
                or eng.failure is not None or eng.wal is None or eng.wal.failed is not None):
            self.check_writable()  # one test on the hot path; the reason is raised here
        if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES:
            k = b"b" + key  # (``encode_key``'s first case: codec._BYTES, the tag)
        else:
            k = encode_key(key)
        packed = pack_value(value, key)
        size = self._write_bytes + len(k) + len(packed) + WRITE_OVERHEAD
        if size > self._write_trigger:  # (``_set`` written out: every put comes here)
            size = self._count_exactly(((k, packed),), key)
        if self._savepoints:  # (its before-image and the write in one step)
            writes = self._keep_before({k: packed}, size)
        else:
            writes = self._writes  # (the dict written into: ``_late_write`` asks which)
            writes[k] = packed
            self._write_bytes = size
        if self._seal is not None:  # (a commit by another thread took the writes)
            self._late_write(((k, packed),), writes)

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def update(self, items: Mapping | Iterable[tuple[Key, Any]]) -> None:
        """Put many pairs at once (a mapping or an iterable of (key, value)): the bulk
        load call, with the same validation as ``put``."""
        self.check_writable()
        # (the pairs alone passing the bound: refused before the rest is read and packed)
        staged = pack_items(items.items() if isinstance(items, Mapping) else items,
                            MAX_TXN_WRITE_BYTES, lambda size: self._too_big(size, None))
        size = (self._write_bytes + sum(map(len, staged)) + sum(map(len, staged.values()))
                + WRITE_OVERHEAD * len(staged))  # (packed values: never None)
        if size > self._write_trigger:
            size = self._count_exactly(staged.items(), None)
        # the dict taken, the size stored, then the write: no call between the first two
        # and the third (a thread switch after the update would let a commit's end look
        # at a changed dict with an unchanged size: ``_Seal.changed``)
        if self._savepoints:  # (the before-images and the write in one step)
            writes = self._keep_before(staged, size)
        else:
            writes = self._writes
            self._write_bytes = size
            writes.update(staged)
        if self._seal is not None:
            self._late_write(staged.items(), writes)

    def delete(self, key: Key) -> None:
        self.check_writable()
        self._set(encode_key(key), None)

    def __delitem__(self, key: Key) -> None:
        self.delete(key)

    def write_stored(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Write pairs already in their stored form — an encoded key (``encode_key``)
        and a packed value, or None: a delete — into the write set, as ``put``/``delete``
        would (same accounting, savepoints and size bound: TransactionTooLarge), without
        decoding and packing them again: a purge erasing the keys it scanned, an undo
        putting back the raw value a key had (``reader.as_of``).  ``check_writable()``
        first, once; the pairs are consumed in order, each checked to be of the stored
        form (``codec.check_stored``: TypeError/ValueError; one that fails leaves those
        before it written, as a loop of puts does)."""
        self.check_writable()
        for k, packed in items:
            check_stored(k, packed)  # (public: a pair of another form bricked the store)
            self._set(k, packed)

    def _set(self, k: bytes, packed: bytes | None) -> None:
        size = self._write_bytes + len(k) + WRITE_OVERHEAD + (0 if packed is None
                                                              else len(packed))
        if size > self._write_trigger:
            size = self._count_exactly(((k, packed),), decode_key(k))
        if self._savepoints:  # (its before-image and the write in one step)
            writes = self._keep_before({k: packed}, size)
        else:
            writes = self._writes
            writes[k] = packed
            self._write_bytes = size
        if self._seal is not None:
            self._late_write(((k, packed),), writes)

    def _keep_before(self, new: dict, size: int) -> dict:
        """Write ``new`` (stored key -> packed value or None) into the write set under a
        savepoint, the set's size then ``size``, and return the dict written into; first
        log the value each key has now, for a rollback to the newest savepoint, unless it
        is logged at that savepoint's level already: the first write of a key at a level
        keeps what a rollback to it puts back; the later ones only replace values of that
        same level, which no rollback ever puts back.  (So the undo log holds at most one
        entry per key and level, not one per write.)  Under ``_undo_lock``: which level an
        entry lands in and which level counts its key must agree, or a release merging
        the levels dropped the only entry of a key (another thread's savepoint() taken
        between the note and the append put the entry in the new level while the old one
        counted the key: a rollback_to then left the write in place — 1 in a few thousand
        races in CI).  The write too: made after the lock was let go, a rollback_to() in
        another thread between the entry and the write put back the value logged and
        emptied the level, then the write landed with no entry (and the key's next write
        logged it as the value "before" the savepoint): a later rollback_to() left it in
        place (16-31 of 200 such races — audit 64); a savepoint() there had the write,
        made under it, logged at the level below.  The lock is the C lock, taken by a
        ``with`` (no interrupt between its acquire and the block: walstore.signals).  No
        signals are held off (a section costs every put under a savepoint two system
        calls): an interrupt may land between a key's entry and its note in the level,
        which leaves one entry too many — harmless: a rollback takes a level's entries
        back newest first, so the oldest, the value before the level, is the one left; a
        release merging levels keeps the oldest — and never a key noted without its entry
        (the entry goes in first); or after the write, which then stands, logged."""
        with self._undo_lock:
            sps, writes = self._savepoints, self._writes
            if sps:  # (else released meanwhile by another thread: nothing to keep)
                level, undo = sps[-1].recorded, self._undo
                for k in new:
                    if k not in level:
                        undo.append((k, writes.get(k, _MISSING)))
                        level.add(k)
            # (the size stored, then the write: as ``update``'s, see there)
            self._write_bytes = size
            writes.update(new)
        return writes

    def _count_exactly(self, new: Iterable[tuple[bytes, bytes | None]], key: Any) -> int:
        """The write set's exact size once ``new`` (distinct keys) is written, counting it
        from the writes already made the first time (the upper bound passed the limit:
        from then on every write comes here); refused (``_too_big``) past the limit."""
        writes = self._writes
        if self._write_trigger >= 0:
            # (over a copy taken in one C step: another thread's rollback_to between two
            # steps of the generator raised RuntimeError out of put)
            self._write_bytes = sum(_entry_bytes(k, v) for k, v in writes.copy().items())
            self._write_trigger = -1
        size = self._write_bytes
        for k, v in new:
            size += _entry_bytes(k, v) - _entry_bytes(k, writes.get(k, _MISSING))
        if size > MAX_TXN_WRITE_BYTES:
            self._too_big(size, key)
        return size

    def _too_big(self, size: int, key: Any) -> None:
        """The write that would take the write set past MAX_TXN_WRITE_BYTES is refused at
        its call (recovery takes back no bigger transaction: committed, it was lost with
        the store at the next crash); nothing of it is written, the transaction stays
        open."""
        what = "this update()" if key is None else f"the write of key {key!r:.80}"
        raise TransactionTooLarge(
            f"transaction {self.id}: {what} would take its writes to {size:,} bytes; one "
            f"transaction writes at most {MAX_TXN_WRITE_BYTES:,} (keys and values, "
            f"{WRITE_OVERHEAD} bytes more each): split the work into several transactions "
            f"(nothing of this write was made; the transaction is still open)")

    def seal_writes(self) -> list:
        """The write set as a commit or prepare takes it (its end lock held): a list of
        (stored key, packed value or None).  A put, update or delete that another thread
        makes from here on is either in that list or refused (``_late_write``): one made
        as another thread's commit() copied the set returned without error and was in no
        commit — a write silently lost, though its thread was told nothing failed."""
        return _Seal(self).writes  # (its fields in _Seal.__init__)

    def _late_write(self, items, written: dict) -> None:
        """A write made while a commit or prepare took the write set (``seal_writes``):
        return when it is part of what that one took and it went through; otherwise
        TransactionClosed, saying the write is in no commit.  ``written``: the write-set
        dict the write went into."""
        seal = self._seal
        if seal is None:  # (the prepare failed: the transaction is active and writable)
            return
        if self._end_lock._is_owned():
            raise TransactionClosed(f"transaction {self.id} is being committed or prepared "
                                    f"by this thread (this write came from inside that "
                                    f"call): the write is not part of it")
        seal.racers.append(None)  # (before the wait: the commit's end keeps ``writes``)
        with self._end_lock:  # (the commit or prepare under way ends first)
            try:
                self._check_late_write(seal, items, written)
            finally:
                seal.racers.pop()
                if not seal.racers and self.state != ACTIVE:
                    seal.writes = seal.lookup = None

    def _check_late_write(self, seal: _Seal, items, written: dict) -> None:
        """``_late_write``'s verdict, the end lock held."""
        if self._seal is None or (seal.writes is None and self.state == ACTIVE):
            return  # (it did not take place: the write stands in the active transaction)
        if seal.writes is None:  # (this write came to check after the commit's end had
            # dropped what it took, the writer descheduled between its write and its
            # check for the whole commit)
            if id(written) != seal.source:
                pass  # (it went into the dict the end put in place: in no commit.  The
                # ids cannot collide: ``written`` is alive, and was made while the copied
                # dict still was)
            elif self.state in (COMMITTED, UNKNOWN):  # (into the copied dict, which
                # the end found unchanged since the copy: the write came before the copy
                # (in the commit), or rarely went unseen (an update() of keys all there
                # already, its size computed from a stale count equal to the copy's).
                # No silent loss, no false claim either)
                how = ("committed" if self.state == COMMITTED else
                       "ended (its outcome unknown until the next open)")
                raise TransactionClosed(
                    f"transaction {self.id} was {how} by another thread while this write "
                    f"was made: whether the write is part of it is not known (read the key "
                    f"to see)")
        elif self.state == COMMITTED or (self.state == ACTIVE and self.gid is not None):
            lookup = seal.lookup
            if lookup is None:
                lookup = seal.lookup = dict(seal.writes)
            if all(lookup.get(k, _MISSING) is v for k, v in items):
                return
        how = ("prepared" if self.state == ACTIVE else
               "ended (its outcome unknown until the next open)" if self.state == UNKNOWN
               else self.state)
        raise TransactionClosed(f"transaction {self.id} was {how} by another thread while "
                                f"this write was made: the write is not part of it (nothing "
                                f"of it was written)")

    @property
    def writes(self) -> dict[bytes, bytes | None]:
        """The buffered write set (stored key -> packed value, None for a delete).  Read
        it, never change it: writes go through ``put``/``update``/``delete``, which bound
        its size and keep its key order for scans (``_WriteOrder``)."""
        return self._writes

    # ---- external side effects -----------------------------------------------------------
    def action(self, name: str, args: Any = None, compensate: str | None = None,
               scope: Any = None) -> "ActionScope":
        """``with tx.action("charge", args=..., compensate="refund") as act:`` (Saga).

        Entering logs a durable intent before the body runs; ``act.key`` is a stable
        idempotency key; set ``act.result``.  ``scope``: the key prefix a scoped rewind
        counts this action in (default: the transaction's scope).
        """
        self.check_writable()
        return self._hooks.start_action(self, name, args, compensate,
                                        self.scope if scope is None else scope)

    def files(self, ws: Any) -> "TxFiles":
        """``tx.files(ws)``: this transaction's file operations in a workspace (a
        ``store.workspace(...)`` or its root path; see walstore.agent.files.TxFiles)."""
        self._check_active()
        if self.gid is not None:  # (decided meanwhile through the store: it handed out
            self._check_undecided()  # the file operations of an ended one — audit 69)
        return self._hooks.files_of(self, ws)

    # ---- savepoints ----------------------------------------------------------------------
    def savepoint(self, name: str | None = None) -> Savepoint:
        if name is not None and not isinstance(name, str):  # (``rollback_to`` and
            raise TypeError(f"a savepoint name is a str or None, not "  # ``release`` take
                            f"{type(name).__name__}")  # no other name: it was accepted here)
        if self.state != ACTIVE or self._engine.closed or self.gid is not None:
            self._check_savepoint_allowed()  # (the common answer is one test)
        with self._end_lock:  # (as rollback_to and release: another thread's release
            # emptied the undo log between its length and the append, and a rollback to
            # this savepoint then undid nothing — probe-audit51)
            if self.state != ACTIVE or self.gid is not None:  # (ended or prepared by the
                # call this one waited for in another thread: it returned an active
                # savepoint of the committed transaction — audit 64)
                self._check_savepoint_allowed()
            self._serial += 1
            inside = self._inside() if self._inner_blockers else ()
            if self._undo_lock is None:  # (the first savepoint: see the class's)
                self._undo_lock = _RLock()
                self._undo = []
                self._savepoints = []
            with self._undo_lock:  # (its level begins where the log ends: no put between)
                sp = Savepoint(self, name, len(self._undo), self._serial, len(self.effects),
                               inside)
                self._savepoints.append(sp)
        return sp

    def _check_savepoint_allowed(self) -> None:
        """Raise why no savepoint can be taken now: the transaction ended, the store
        closed, or it is prepared (its write set is fixed: a savepoint taken then could
        never be rolled back to; it was handed out as active — stop 65)."""
        self._check_active()
        if self.gid is not None:
            self._check_undecided()  # (decided meanwhile: it said "is prepared" of it)
            raise TransactionClosed(f"transaction {self.id} is prepared as {self.gid!r}: its "
                                    f"write set and actions are fixed until it is committed "
                                    f"or rolled back; no savepoint was taken")

    def note_inner_blocker(self, effect: Any) -> None:
        """``effect`` (one with ``blocks_inner_rollback``: an open watch()) is about to
        join ``effects``: savepoints taken while it is there are taken inside it.  Called
        before the append, so no effect with it is in ``effects`` unnoted."""
        self._inner_blockers = [*self._inner_blockers, effect]

    def note_block_ended(self, effect: Any) -> None:
        """``effect``'s block is over though it stays in ``effects`` (a watch() whose end
        could not be recorded): savepoints taken from now on are not inside it (one taken
        after such a block was refused "taken inside a watch() block": audit 68)."""
        self._inner_blockers = [b for b in self._inner_blockers if b is not effect]

    def _inside(self) -> tuple:
        """The effects in ``effects`` that a savepoint taken now is inside of (those with
        ``blocks_inner_rollback``, in their order): the noted ones still there.  One that
        left ``effects`` (its watch ended, was abandoned or rolled back) never comes
        back, so it is forgotten."""
        effects = self.effects
        live = [b for b in self._inner_blockers if any(x is b for x in effects)]
        self._inner_blockers = live
        return tuple(b for b in live if getattr(b, "blocks_inner_rollback", None))

    def _find(self, sp: Savepoint | str) -> int:
        sps = self._savepoints
        if sps and sps[-1] is sp:  # (the newest: most rollbacks and releases)
            return len(sps) - 1
        if isinstance(sp, Savepoint):
            owner = sp._tx
            if owner is not self:  # (it said "no longer active" of one still active in
                # its own transaction — probe-audit48)
                raise ValueError(f"{sp!r} belongs to transaction "
                                 f"{'(dropped)' if owner is None else owner.id}, not to "
                                 f"transaction {self.id}; nothing was changed")
            for i in range(len(self._savepoints) - 1, -1, -1):
                if self._savepoints[i] is sp:
                    return i
            raise ValueError(f"{sp!r} is no longer active in transaction {self.id} "
                             f"(released, or discarded by a rollback to an outer savepoint)")
        if isinstance(sp, str):
            for i in range(len(self._savepoints) - 1, -1, -1):
                if self._savepoints[i].name == sp:
                    return i
            raise ValueError(f"no active savepoint named {sp!r} in transaction {self.id}")
        raise TypeError(f"expected a Savepoint or its name, not {type(sp).__name__}")

    def rollback_to(self, sp: Savepoint | str) -> None:
        """Undo everything after ``sp``; ``sp`` stays usable, newer savepoints are gone.
        Not on a prepared transaction: its write set is fixed until the decision."""
        if self.state != ACTIVE or self._engine.closed:
            self._check_active()  # (the reason, raised; the common answer is one test)
        self._rolling_back_to(sp, None)  # (not beside another thread's commit())

    def rollback_to_on(self, sp: Savepoint | str, cause: BaseException) -> None:
        """``rollback_to(sp)`` because of ``cause``, as a ``with tx.savepoint()`` block
        ending on it does: a CompensationFailed chains ``cause`` and names it, as a
        ``with`` transaction's (``rollback_on``) does (it had neither: the exception that
        made the block roll back showed only as the context — probe-audit48)."""
        self._check_active()
        self._rolling_back_to(sp, cause)

    def _rolling_back_to(self, sp: Savepoint | str, cause: BaseException | None) -> None:
        """``_deciding(f"rolled back to {sp!r}", "rolled back to a savepoint",
        self._rollback_to, sp, cause)`` written out: the verb a refusal names is made only
        then (a Savepoint's repr was a call and an f-string every rollback_to), and the
        generic call with its *args was a frame more."""
        active = sp.active if type(sp) is Savepoint else None  # (its state at the call)
        if self.gid is not None:  # (decided meanwhile: ``_rollback_to`` said "is prepared")
            self._check_undecided()
        with self._end_lock:
            if self._ending is not None or self.state != ACTIVE:
                self._refuse_end(_RolledBackTo(sp, active))  # (raises)
            self._ending = "rolled back to a savepoint"
            try:
                self._rollback_to(sp, cause)
            finally:
                self._ending = None
                seal = self._seal
                if seal is not None:  # (as ``_deciding``'s)
                    if self.state == ACTIVE and self.gid is None:
                        self._seal = None
                    elif self.state != ACTIVE and not seal.racers and not seal.changed:
                        seal.writes = seal.lookup = None

    def _rollback_to(self, sp: Savepoint | str, cause: BaseException | None) -> None:
        """``rollback_to()``'s work, with the end lock held; ``cause``: what made it roll
        back (chained by a CompensationFailed)."""
        if self.gid is not None:
            raise TransactionClosed(f"transaction {self.id} is prepared as {self.gid!r}: its "
                                    f"write set and actions are fixed until it is committed "
                                    f"or rolled back; nothing was undone")
        i = self._find(sp)
        target = self._savepoints[i]
        effects, mark = self.effects, target.effect_mark
        if len(effects) > mark:
            for e in effects[mark:]:
                why = getattr(e, "blocks_rollback", None)
                if why:  # (before anything is undone)
                    raise WalstoreError(f"cannot roll back transaction {self.id} to "
                                        f"{target!r}: {why}")
        if target.inside:
            for e in target.inside:  # begun before the savepoint, cannot be cut at it
                if any(x is e or getattr(x, "began_as", None) is e
                       for x in self.effects[:mark]):
                    raise WalstoreError(f"cannot roll back transaction {self.id} to "
                                        f"{target!r}: {e.blocks_inner_rollback}")
        # one step (an interrupt inside it left the writes undone and the actions kept, or
        # the actions dropped and never noted; a put beside it logged into a level going)
        with deferred(), self._undo_lock:
            undo, writes = self._undo, self._writes
            exact = self._write_trigger < 0
            taken_out = False
            stop = target._undo_len
            while len(undo) > stop:
                k, prev = undo.pop()
                if exact:  # (else the upper bound of the size still holds)
                    self._write_bytes += _entry_bytes(k, prev) \
                        - _entry_bytes(k, writes.get(k, _MISSING))
                if prev is _MISSING:
                    writes.pop(k, None)
                    taken_out = True
                else:
                    writes[k] = prev
            if taken_out:  # (the write set's key order assumes keys only ever added)
                self._order_gen += 1
                self._write_order = None
            target.recorded.clear()  # (its level's entries were all taken back above)
            sps = self._savepoints
            if len(sps) > i + 1:
                for gone in sps[i + 1:]:
                    gone.active = False
                    gone.recorded = set()
                del sps[i + 1:]
            crossed = ()
            if len(effects) > target.effect_mark:
                crossed = effects[target.effect_mark:]
                del effects[target.effect_mark:]
                # the actions taken out are not in the COMMIT, only their ids
                # (``crossed``): their args, results and errors no longer count against
                # MAX_ACTION_BYTES
                for e in crossed:
                    self.action_bytes -= getattr(e, "commit_bytes", CROSSED_ID_BYTES) \
                        - CROSSED_ID_BYTES
                self._hooks.note_crossed(self, crossed)
        if crossed:
            self._hooks.undo_actions(self, crossed, cause)

    def release(self, sp: Savepoint | str) -> None:
        """Forget ``sp`` and every newer savepoint; their writes are kept."""
        self._check_active()
        if self.gid is not None:  # (decided meanwhile through the store: it released
            self._check_undecided()  # silently, the state still "active" — audit 69)
        with self._end_lock:  # (the savepoints change under no other thread's lookup:
            # an IndexError came out of it — probe-audit51)
            if self.state != ACTIVE:  # (ended by the commit() or rollback() this call
                # waited for: a ValueError said the savepoint was "released, or discarded
                # by a rollback to an outer savepoint" — audit 64)
                self._check_active()
            i = self._find(sp)
            sps = self._savepoints
            with deferred(), self._undo_lock:
                if i:
                    self._merge_levels(sps[i - 1], sps[i]._undo_len)
                for gone in sps[i:]:
                    gone.active = False
                    gone.recorded = set()  # (a caller may keep the object: not its keys)
                del sps[i:]
                if not sps:
                    self._undo.clear()

    def _merge_levels(self, outer: Savepoint, start: int) -> None:
        """The undo entries from ``start`` on (the levels of the savepoints a release
        forgets) join ``outer``'s level: an entry of a key ``outer``'s level logged
        already goes (it holds a value of that level, which no rollback puts back), so
        the log keeps one entry per key and level (an outer savepoint around a loop of
        ``savepoint / put / release`` grew it by an entry a step).  Called with
        ``_undo_lock`` held, before the savepoints go."""
        undo, level = self._undo, outer.recorded
        kept = []
        for k, prev in undo[start:]:
            if k not in level:
                level.add(k)
                kept.append((k, prev))
        del undo[start:]
        undo.extend(kept)

    # ---- two-phase commit ----------------------------------------------------------------
    def prepare(self, gid: str) -> None:
        """Phase one: validate and make the transaction durable as prepared (in doubt).

        Its keys stay held against other transactions until ``commit()`` /
        ``store.commit_prepared(gid)`` or ``rollback()`` / ``store.rollback_prepared(gid)``.
        """
        self._check_active()
        if self.gid is not None:  # (decided meanwhile: ``_prepare`` said "already prepared")
            self._check_undecided()
        self._deciding(f"prepared as {gid!r}", "prepared", self._prepare, gid)

    def _prepare(self, gid: str) -> None:
        """``prepare()``'s work, with the end lock held."""
        if self.gid is not None:
            raise ValueError(f"transaction {self.id} is already prepared as {self.gid!r}")
        self._check_no_running_body("prepare")
        try:
            self._hooks.prepare(self, gid)
        except CommitOutcomeUnknown:
            # the PREPARE's fsync failed: whether it is prepared is for recovery to decide,
            # as a commit's is (it stayed "active", and a rollback then said "rolled back"
            # of a transaction the next open found prepared and a coordinator committed)
            self.gid = gid
            self._finish(UNKNOWN, f"its PREPARE as {gid!r}")
            raise
        except BaseException as e:
            let_go(e)  # (its validation's LMDB reads: see Transaction._commit)
            # an interrupt after its PREPARE was logged: it IS prepared (left looking
            # unprepared, its rollback wrote an ABORT while the gid stayed prepared, its
            # keys held, until a resolve_atomic or a reopen: fix-interrupts)
            p = self._engine.prepared.by_gid.get(gid)
            if p is not None and p.txid == self.id:
                self.gid = gid
            raise
        self.gid = gid

    def read_set(self) -> ReadSet | None:
        if not self.read_keys and not self.read_ranges and not self.guard_ranges \
                and not self.guard_scopes and self.undo_fence is None \
                and not self.guard_files:
            return None
        if self.guard_ranges or self.guard_scopes:
            return ReadSet(self.snapshot, set(self.read_keys),
                           list(self.read_ranges) + list(self.guard_ranges),
                           held_ranges=list(self.read_ranges),
                           scopes=list(self.guard_scopes) or None, fence=self.undo_fence,
                           files=self.guard_files)
        return ReadSet(self.snapshot, set(self.read_keys), list(self.read_ranges),
                       fence=self.undo_fence, files=self.guard_files)

    # ---- the end -------------------------------------------------------------------------
    def commit(self) -> int | None:
        """Make the writes durable (per the store's durability) and visible.

        Returns the commit record's LSN (None when there was nothing to write).  Raises
        ConflictError (nothing written, actions compensated) when validation fails, and
        CommitOutcomeUnknown when the commit record's fsync failed.
        """
        if self.state != ACTIVE or self._engine.closed:
            self._check_active()  # (the reason, raised; the common answer is one test)
        # (``_deciding("committed", "committed", self._commit)`` written out: every commit
        # comes here, and the generic call with its *args was a frame more)
        with self._end_lock:
            if self._ending is not None or self.state != ACTIVE:
                self._refuse_end("committed")  # (raises)
            self._ending = "committed"
            try:
                return self._commit()
            finally:  # (``_deciding``'s end written out too, not a shared helper: a
                # call's entry is a point a signal handler runs at, and an interrupt there
                # left ``_ending`` set for good — the interrupt sweep's savepoint modes)
                self._ending = None
                seal = self._seal
                if seal is not None:  # (as ``_deciding``'s)
                    if self.state == ACTIVE and self.gid is None:
                        self._seal = None
                    elif self.state != ACTIVE and not seal.racers and not seal.changed:
                        seal.writes = seal.lookup = None

    def _commit(self) -> int | None:
        """``commit()``'s work, with the end lock held."""
        if self.effects:  # (no effect: no body runs; most commits)
            self._check_no_running_body("commit")
        if self.gid is not None:
            self._check_decision_in_doubt()
            try:
                lsn = self._hooks.commit_prepared(self.gid)
                self._finish(COMMITTED)  # (inside: an interrupt at its call left it "active")
            except CommitOutcomeUnknown:
                # the COMMIT's fsync failed: as a plain commit's, the outcome is for the
                # next open to decide (it stayed "active", and a rollback then said
                # "no prepared transaction" of one still in doubt)
                self._finish(UNKNOWN, f"the COMMIT deciding {self.gid!r}")
                raise
            except UnknownGid as e:  # decided by another caller (``commit_prepared``,
                self._finish_as_decided()  # ``resolve_atomic``): it stands, and says so
                if self.state == ACTIVE:
                    self._await_decision()
                if self.state == ACTIVE:
                    raise
                raise UnknownGid(f"prepared transaction {self.gid!r} was already decided "
                                 f"by another caller: it is {self.state}", self.gid) from e
            except BaseException:  # (an interrupt once its COMMIT was appended -- at the
                # applier's wake-up -- left it "active", decided "commit": an atomic
                # group's coordinator open beside its committed participants)
                self._finish_as_decided()
                raise
            self.lsn = LSN(lsn)
            return self.lsn
        if self._request is not None and self._committed_request() is not None:
            return self.lsn  # (committed, then interrupted: see _committed_request)
        req = None
        try:
            # (no effect, no scope, no field of its own: no body, the hooks' answer too)
            body = (self._hooks.commit_body(self)
                    if self.effects or self.scope is not None or self.commit_body else {})
            # (``seal_writes`` written out, _Seal.__init__'s steps in its order: a type
            # call to a Python __init__ is a frame more and a slot wrapper, every commit)
            seal = _new_seal(_Seal)
            seal.writes = seal.lookup = None
            seal.changed = False
            seal.racers = []
            self._seal = seal  # (seen by every write after this line)
            source = self._writes
            seal.source = id(source)
            seal.size = self._write_bytes
            writes = seal.writes = list(source.copy().items())
            read = (self.read_keys or self.read_ranges or self.guard_ranges
                    or self.guard_scopes or self.undo_fence is not None or self.guard_files)
            if not writes and not body:
                if read or self.commit_check is not None:  # (else nothing to validate)
                    self._validate_reads_only()
                lsn = None
            else:
                req = self._request = CommitRequest(
                    self.id, writes, self.meta, self.read_set() if read else None, body,
                    check=self.commit_check)
                lsn = self._engine.pipeline.commit(req).lsn
            # (inside the ``try``: an interrupt landing between the commit's return and
            # this line left the transaction "active", and the caller's natural rollback
            # then compensated a charge whose commit stood — a probe, 11-20 in 50,000)
            self._finish(COMMITTED)
            self.lsn = None if lsn is None else _lsn(LSN, lsn)
            self._request = None  # (its writes: a caller keeping ``tx`` kept them all)
            return self.lsn
        except CommitOutcomeUnknown:
            self._finish(UNKNOWN, "its COMMIT")  # recovery decides; nothing is compensated now
            raise
        except BaseException as e:
            # (the frames the error came through, the validation's LMDB read transactions
            # in them, are let go: a ConflictError kept by the caller held two reader
            # slots of the 1,024 every process shares — probe-audit60)
            let_go(e)
            if req is not None and req.committed:
                # committed, and then interrupted (a KeyboardInterrupt held off until the
                # point of no return: walstore.signals): the interrupt goes on, the
                # commit stands and nothing is compensated
                self._finish(COMMITTED)
                self.lsn = LSN(req.lsn)
                if isinstance(e, Exception):
                    # an error, not an interrupt (a MemoryError finishing the transaction
                    # in memory, at a memory limit): CONTRACT, "an error after the commit
                    # point never turns a commit into a reported failure" — it came out
                    # of commit() while the commit stood, and a caller retrying what
                    # failed ran its side effects twice.  Contained, as a background
                    # error (``stats()``)
                    self._engine.background_errors.append(
                        f"after transaction {self.id} committed: {type_and_message(e)}")
                    del self._engine.background_errors[:-10]
                    return self.lsn
                raise
            if self.state == ACTIVE:
                self._rollback(e)
            raise

    def _check_no_running_body(self, verb: str) -> None:
        """WalstoreError, the transaction left as it is (active: nothing rolled back, so
        nothing is compensated before the body acted), while one of its effects' bodies
        still runs (``blocks_commit``: a ``with tx.action(...)`` block)."""
        for e in self.effects:
            why = getattr(e, "blocks_commit", None)
            if why:
                raise WalstoreError(f"cannot {verb} transaction {self.id}: {why}")

    def _committed_request(self) -> "CommitRequest | None":
        """The commit request that passed its point of no return while an interrupt cut
        ``commit()`` short before it could say so (the transaction is then finished as
        committed here: nothing may roll it back or commit it again); else None."""
        req = self._request
        if req is None or not req.committed:
            return None
        if self.state != COMMITTED:
            self._finish(COMMITTED)
        self.lsn = LSN(req.lsn)
        return req

    def _validate_reads_only(self) -> None:
        reads = self.read_set()
        if reads is None and self.commit_check is None:
            return
        eng = self._engine
        if eng.readonly:
            return  # a read-only store's snapshot cannot have been written over by itself
        if (reads is not None and eng.stopped_by is not None
                and reads.snapshot >= eng.memtable.published):
            # the store stopped writing (a failed fsync: CommitOutcomeUnknown) and no
            # commit was acknowledged past this snapshot, nor will be until a reopen: the
            # records appended past it are undecided, and a transaction that only read is
            # ordered before them.  Checked against them, it raised ConflictError ("wrote
            # after it started") on every retry of reads the store serves
            reads = None
            if self.commit_check is None:
                return
        checked = None if reads is None else eng.pipeline.checker.check_applied(self.id, reads)
        with eng.journal.lock:
            if reads is not None:
                eng.pipeline.checker.check_recent(self.id, reads, checked, eng.applied_lsn)
                eng.prepared.check(self.id, [], reads)
            if self.commit_check is not None:
                self.commit_check()

    def rollback(self) -> None:
        """Discard every write; compensate the actions this transaction ran.

        A ``commit()`` another thread is running is waited for: then this raises
        TransactionClosed (it committed) or rolls back what the failed commit left."""
        self._engine.check_not_forked()  # (before the end lock: a parent's thread may
        # have held it at the fork)
        self._deciding("rolled back", "rolled back", self._rollback_checked, active=False)

    def end_at_close(self, timeout: float) -> bool:
        """The store's ``close()`` rolls this transaction back (``rollback()``), waiting
        up to ``timeout`` seconds for a ``commit()`` or ``rollback()`` another thread is
        running: False when that one is still running then (its own outcome stands);
        True when the end is decided (rolled back here, or by the other call).  A
        ``commit()`` that comes after this rollback raises TransactionClosed (a
        StoreClosed) saying close() rolled it back: nothing of it was committed and its
        compensations ran, once, here."""
        lock = self._end_lock
        if lock._is_owned():  # (close() from inside this transaction's own end: refused)
            return False
        # wait for the other call without taking the lock (a plain ``acquire`` lets an
        # interrupt land after it returns, keeping the lock for ever: walstore.signals);
        # then take it by a ``with``, at worst behind a call that began just now
        deadline = time.monotonic() + timeout
        while self._ending is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        with lock:
            if self._ending is not None or self.state != ACTIVE or self.gid is not None:
                return True  # (ended meanwhile; or prepared meanwhile: its coordinator's)
            self._ending = "rolled back"
            self.closed_by_store = True
            try:
                self._rollback_checked()
            except BaseException:
                if self.state != ROLLED_BACK:  # (it had committed; or nothing was undone)
                    self.closed_by_store = False
                raise
            finally:
                self._ending = None
            return True

    def _deciding(self, verb: str, ending: str, work: Callable, *args: Any,
                  active: bool = True) -> Any:
        """``work(*args)`` with the end lock held and ``_ending`` saying what it does (the
        end is decided once: see the module docstring); TransactionClosed (naming
        ``verb``) when another call decided it first, or this thread is inside one
        already; ``active``: refused too when the transaction has ended (a rollback()
        says why itself).  A ``with`` on the C lock: no interrupt between its acquire and
        the block."""
        with self._end_lock:
            if self._ending is not None or (active and self.state != ACTIVE):
                self._refuse_end(verb)  # (raises)
            self._ending = ending
            try:
                return work(*args)
            finally:
                self._ending = None
                seal = self._seal
                if seal is not None:
                    if self.state == ACTIVE and self.gid is None:
                        self._seal = None  # (a commit or prepare that left it active: a
                        # prepare refused; the writes made meanwhile stand: _late_write)
                    elif self.state != ACTIVE and not seal.racers and not seal.changed:
                        seal.writes = seal.lookup = None  # (ended: holds none of them,
                        # unless a write landed after the copy: its writer, not yet
                        # registered, will check against them, then drop them)

    @property
    def end_lock(self) -> "_RLock":
        """The lock this transaction's end is decided under (a C ``RLock``, one per
        transaction, for its whole life): commit(), rollback(), prepare(), rollback_to()
        and the store's close() hold it from their check of the state to the state they
        leave.  The agent layer holds it (``with``; or ``acquire(blocking=False)`` and
        ``release``) around a change that must land wholly before or wholly after that
        end — an action's intent, a file operation — then asks ``check_writable()``
        under it.  Never wait for it while holding a lock that an end takes (a
        workspace's lock: a rollback holds this one and then waits for that one); the
        same thread re-entering it from inside an end is refused by the end's own
        check, not by the lock."""
        return self._end_lock

    def finish_if_decided(self) -> str:
        """A prepared transaction decided outside it (``store.commit_prepared`` /
        ``rollback_prepared``, ``resolve_atomic``) is finished as the decision says, so
        its ``state`` says it ("committed", LSN set; "rolled back"; "outcome unknown"
        when that decision's fsync failed); nothing when it is not prepared, already
        ended, still in doubt, or its decision is still being made durable.  Returns
        ``state``.  Idempotent; for the transaction's owner (the Zope data manager asks
        it before it reads the state).  Nothing either while its commit() or rollback()
        is under way (another thread's; or this thread's, from inside it): that call
        finishes it, once its undo is done — finished here, a rollback read "rolled
        back" while its compensations ran and its files held the prepared content, and
        a commit was finished twice (audit 70).  The end lock is only tried, never
        waited for (the caller may hold a workspace's lock: see ``end_lock``); held by
        another thread, this is an end, or a change that must land before one, under
        way, and the state is read as it is."""
        if self.state != ACTIVE or self.gid is None:
            return self.state
        lock = self._end_lock
        mine = False
        try:
            with deferred():  # (an interrupt as it ends still finds ``mine``)
                mine = lock.acquire(blocking=False)
            if mine and self._ending is None:
                self._finish_as_decided()
        finally:
            if mine:
                lock.release()
        return self.state

    def ending_in_this_thread(self) -> bool:
        """Is the calling thread inside this transaction's commit()/rollback() (its end
        lock held here)?"""
        return bool(self._end_lock._is_owned())

    def _refuse_end(self, verb: str) -> None:
        """Raise TransactionClosed for a commit()/rollback() that finds the end decided
        (by the call it waited for) or being decided by this same thread."""
        if self._ending is not None and self.state == ACTIVE:
            raise TransactionClosed(f"transaction {self.id} is being {self._ending} by this "
                                    f"thread (this call came from inside that one: a "
                                    f"compensator or a signal handler); it was not {verb} "
                                    f"here")
        if self.state == UNKNOWN:
            raise TransactionClosed(f"transaction {self.id}'s outcome is unknown (the fsync of "
                                    f"{self._unknown_of} failed): the next open of the store "
                                    f"decides (recovery); nothing changed")
        if self.closed_by_store:
            raise TransactionClosed(f"transaction {self.id} was rolled back by the store's "
                                    f"close() (nothing of it was committed; its compensations "
                                    f"ran); it was not {verb} here")
        how = self.state
        if how == COMMITTED and self.lsn is not None:
            how = f"committed (at LSN {int(self.lsn)})"
        raise TransactionClosed(f"transaction {self.id} is already {how} (by another call); "
                                f"it was not {verb} here")

    def _rollback_checked(self) -> None:
        """``rollback()``'s work, with the end lock held."""
        if self.state == ACTIVE and self._committed_request() is not None:
            raise TransactionClosed(f"transaction {self.id} is already committed (at LSN "
                                    f"{int(self.lsn)}: an interrupt reached commit() after "
                                    f"its point of no return); nothing was rolled back")
        if self.state == ACTIVE and self.gid is not None:
            self._check_decision_in_doubt()  # (decided through the store: its fsync failed)
        if self.state == UNKNOWN:
            raise TransactionClosed(f"transaction {self.id}'s outcome is unknown (the fsync of "
                                    f"{self._unknown_of} failed): the next open of the store "
                                    f"decides (recovery); nothing changed")
        if self.state != ACTIVE:
            raise TransactionClosed(f"transaction {self.id} is already {self.state}")
        for e in self.effects:
            why = getattr(e, "blocks_full_rollback", None)
            if why:  # (before anything is undone)
                raise WalstoreError(f"cannot roll back transaction {self.id}: {why}")
        self._rollback(None)

    def _rollback(self, cause: BaseException | None) -> None:
        # a forked child's copy of its parent's transaction: StoreClosed naming the parent
        # (the parent's copy is the one to end; nothing is undone or recorded here)
        self._engine.check_not_forked()
        if self._committed_request() is not None:
            return  # (an interrupt after the point of no return: the commit stands)
        if self.gid is not None:
            gid = self.gid
            if gid in self._engine.pipeline.in_doubt:
                self._finish(UNKNOWN, f"the decision on {gid!r}")
                return  # (the next open decides; nothing is compensated now)
            try:
                self._hooks.rollback_prepared(gid)
            except CommitOutcomeUnknown:
                self._finish(UNKNOWN, f"the ROLLBACK_PREPARED of {gid!r}")
                raise
            except UnknownGid as e:  # (another caller's decision, maybe still being
                self._finish_as_decided()  # made durable: as in _commit)
                if self.state == ACTIVE:
                    self._await_decision()
                if self.state == ACTIVE:
                    raise
                raise UnknownGid(f"prepared transaction {gid!r} was already decided by "
                                 f"another caller: it is {self.state}; nothing was rolled "
                                 f"back here", gid) from e
            finally:  # decided (by this call, or by another caller just before: its
                self._finish_as_decided()  # decision stands, UnknownGid says so)
            return
        if not (self.logged or self.effects):
            self._finish(ROLLED_BACK)
            return
        # from here until its effects are undone the transaction still owns what they
        # changed (a path another transaction must not take over: agent.files claims).  It
        # is finished together with its ABORT record (an interrupt between the two left it
        # finished with no record: its actions neither compensated nor owed, and close()
        # no longer rolling it back); an interrupt before that leaves it open, to roll
        # back again
        self.undo_pending = True
        try:
            self._hooks.end_without_commit(self, cause, lambda: self._finish(ROLLED_BACK))
        finally:
            self.undo_pending = False

    def _finish_as_decided(self) -> None:
        """A prepared transaction whose gid is decided (by its own call, or by another
        caller: ``store.commit_prepared``/``rollback_prepared``, ``resolve_atomic``) is
        finished as the decision says; one still in doubt (its decision's fsync failed)
        as "outcome unknown"; one whose decision is still being made durable stays open."""
        gid, eng = self.gid, self._engine
        if self.state != ACTIVE or gid is None or gid in eng.prepared:
            return
        decided = self._decision(gid)
        if gid in eng.pipeline.in_doubt:  # (its fsync failed: recovery decides)
            self._finish(UNKNOWN, f"the decision on {gid!r}")
        elif decided == "commit":
            self._finish(COMMITTED)
            row = eng.views.txn_row(self.id)
            if row is not None and row.get("lsn") is not None:
                self.lsn = LSN(row["lsn"])
        elif decided != "prepared":  # ("prepared": its decision being made durable)
            self._finish(ROLLED_BACK)

    def _decision(self, gid: str) -> str | None:
        """The store's decision on ``gid`` once durable: under durability="normal" a
        decision is published at its append, before its forced fsync — the owner was told
        "committed" (tx.lsn set; the Zope data manager finished) of a decision whose fsync
        then failed, its outcome unknown (audit 68, review 4)."""
        eng = self._engine
        if eng.journal.durability == "normal":
            return eng.views.decision(gid, eng.wal.synced_lsn)
        return eng.views.decision(gid)

    def _await_decision(self, timeout: float = 60.0) -> None:
        """Another caller's decision of this prepared transaction is being made durable
        (its fsync under way): wait for it, then finish as decided.  (The owner's
        commit() raised UnknownGid "being made durable" and left it "active", no LSN,
        though it committed: the Zope data manager's tpc_finish, reading it not
        committed, raised — audit 68.)  Returns at once when it is back in doubt (the
        fsync failed) or after ``timeout`` seconds, still active."""
        gid, eng = self.gid, self._engine
        deadline = time.monotonic() + timeout
        while (self.state == ACTIVE and gid not in eng.prepared and not eng.closed
               and time.monotonic() < deadline):
            time.sleep(0.001)
            self._finish_as_decided()
        if self.state == ACTIVE:  # (that decision's fsync failed: back in the prepared
            # set, in doubt — it raised UnknownGid "being made durable (nothing changed
            # now)" and left it "active" — audit 68, review 4)
            self._check_decision_in_doubt()

    def _check_decision_in_doubt(self) -> None:
        """A prepared transaction whose decision (made through ``store.commit_prepared``
        or ``rollback_prepared``) failed its fsync is in doubt until the next open: it
        is finished as "outcome unknown" and TransactionClosed says so."""
        gid = self.gid
        if gid is not None and gid in self._engine.pipeline.in_doubt:
            self._finish(UNKNOWN, f"the decision on {gid!r}")
            raise TransactionClosed(f"transaction {self.id}'s outcome is unknown (the fsync of "
                                    f"{self._unknown_of} failed): the next open of the store "
                                    f"decides (recovery); nothing changed")

    def _finish(self, state: str, unknown_of: str | None = None) -> None:
        self.state = state
        if unknown_of is not None:
            self._unknown_of = unknown_of  # (the record whose fsync failed)
        self.keepalive = None
        if self._logged:
            self._hooks.effects_ended(self)
        if self._savepoints:
            for sp in self._savepoints:
                sp.active = False
                sp.recorded = set()
            self._savepoints.clear()
        fresh = {}  # (made first: the swap below is plain loads and stores, no call)
        old, size = self._writes, self._write_bytes
        self._writes = fresh
        self._write_bytes = 0
        seal = self._seal
        if seal is not None and seal.writes is not None:  # a write after the copy: its
            # writer, maybe not yet registered, checks against ``writes`` (kept for it)
            seal.changed = len(old) != len(seal.writes) or size != seal.size
        # the exact count's trigger, the key order and the inner blockers go back to
        # their beginnings (slots: three stores)
        self._write_trigger = MAX_TXN_WRITE_BYTES
        self._write_order = None
        self._inner_blockers = ()
        if self.commit_check is not None:  # (set with file_reads; one test per commit)
            self.file_reads = self.commit_check = None
        if self._undo:
            self._undo.clear()

    def __repr__(self) -> str:
        return f"<Transaction {self.id} {self.state}>"


_SMALL_WRITE_SET = 256  # a scan passes over a write set this small (no order kept)


class _WriteOrder:
    """A transaction's written keys in order (``keys``, a KeyIndex), kept up to date
    without a cost on the put path: a dict keeps its keys in insertion order and a write
    set only gains keys while this lives (a rollback_to that takes one out drops it), so
    the keys put since the last scan are the dict's last ``len(writes) - count``."""

    __slots__ = ("keys", "count", "gen", "lock")

    def __init__(self, writes: dict[bytes, Any], gen: int) -> None:
        keys = list(writes)  # (at once: another thread may write meanwhile)
        self.keys = KeyIndex(keys, distinct=True)
        self.count = len(keys)
        self.gen = gen  # (Transaction._order_gen when it was made)
        self.lock = threading.Lock()  # (scans of two threads bring it up to date)

    def catch_up(self, writes: dict[bytes, Any]) -> bool:
        """Add the keys written since; False when that cannot be told (the write set
        changed under the pass, or lost keys): the caller makes a new order."""
        with self.lock:
            it = reversed(writes)  # (before the length: a write after it makes the pass
            new = len(writes) - self.count  # raise, never go unseen)
            if new <= 0:
                return new == 0
            try:
                keys = list(islice(it, new))
            except RuntimeError:  # (another thread wrote meanwhile)
                return False
            add = self.keys.add
            for k in keys:
                add(k)
            self.count += new
            return True


def _overlay(base: Iterator[tuple[bytes, bytes]], mine: dict[bytes, bytes | None],
             reverse: bool) -> Iterator[tuple[bytes, bytes]]:
    """Merge a key-ordered stream with the transaction's own writes (which win)."""
    updates = sorted(mine.items(), reverse=reverse)
    ui, n = 0, len(updates)
    for k, v in base:
        while ui < n and (updates[ui][0] > k if reverse else updates[ui][0] < k):
            if updates[ui][1] is not None:
                yield updates[ui]
            ui += 1
        if ui < n and updates[ui][0] == k:
            if updates[ui][1] is not None:
                yield updates[ui]
            ui += 1
        else:
            yield k, v
    while ui < n:
        if updates[ui][1] is not None:
            yield updates[ui]
        ui += 1
