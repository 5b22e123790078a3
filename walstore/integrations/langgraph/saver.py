"""``WalstoreSaver``: a LangGraph checkpointer in a walstore store, one thread per scope.

This module owns the checkpointer: reading and writing checkpoints and pending writes
(through the key schema of ``keys.py`` and the blob codec of ``blobs.py``), fencing racing
writers, pruning, copying and deleting threads, rewinding one thread, and telling walstore
which thread a transaction begun inside a graph node belongs to.

- **Transactions**: every ``put`` / ``put_writes`` / delete is one walstore transaction
  whose scope is the thread's key prefix, so a checkpoint and its channel blobs land
  together or not at all, and belong to their thread.  ``copy_thread`` writes one
  transaction per copied checkpoint (oldest first), so the copy can be rewound to any
  of them.
- **Fencing that tells a fork from a race.**  ``get_tuple`` of a thread's *latest*
  checkpoint marks the returned config as extending that namespace's line (a private
  ``configurable`` key LangGraph carries into the run's ``put`` calls); a ``put`` so marked
  whose parent already has another child is refused with :class:`StaleCheckpointError`:
  another writer built on the same checkpoint first (two runs, two workers, an
  ``update_state`` racing a run).  The refused run's step never happened, but its nodes
  may have committed walstore transactions in it (the rival's nodes ran at the same
  time): ``get_tuple`` names each load in the run's config (``RUN_TOKEN``, in place,
  as below), the scope provider notes each node transaction under that name and its
  step's checkpoint, and the refused ``put`` reverts them, newest first, with their
  compensations, before raising.  A ``put`` whose parent was addressed explicitly (a
  ``checkpoint_id`` in the config: time travel, new input or ``Command(resume=...)`` sent
  to an older checkpoint, ``update_state`` on a past checkpoint) is a fork and is
  allowed, as SqliteSaver branches; two such writers racing on the head itself (the
  parent was the newest checkpoint and a rival child appeared while writing) are still
  fenced.  A run on one branch is not disturbed by a fork made elsewhere in the thread
  (but a run that loads the thread just after a fork's first checkpoint was written
  continues that fork, then the newest checkpoint, as with any LangGraph saver).
  A run that loads a namespace as "latest" and finds it *empty* cannot be told so in a
  returned config (``get_tuple`` returns None), so ``get_tuple`` marks the config it was
  given, in place (another private ``configurable`` key, which LangGraph merges into the
  run's ``put`` configs).  That run's first ``put`` (parent None) is refused when the
  namespace has a checkpoint by then (another run on the same new thread got in first),
  and its later puts extend the head as above.  An unmarked parent-less ``put`` (a direct
  call) is fenced only as before; a marked one, once written, changes the mark so the
  same config's next parent-less put is not taken for the race.  (``graph.get_state`` of
  an empty thread leaves the mark in the caller's config: harmless, a later load that
  finds a checkpoint overrides it in the run's config.)  ``fencing=False`` turns all of
  it off.
- **Undo**: :meth:`WalstoreSaver.rewind` rewinds ONE thread to a checkpoint with walstore's
  scoped rewind (``store.rewind(to, scope=thread prefix)``): the thread's later
  checkpoints, and what its later steps wrote and did (memory items, keys, actions with
  compensations, in transactions that belong to the thread) are undone; other threads are
  untouched.  A transaction begun inside a graph node belongs to that node's thread with
  no annotation: at import this module registers a scope provider with walstore that
  reads LangGraph's run config (``langgraph.config.get_config()``).  The provider fences
  such a transaction as ``put`` is fenced: it reads the checkpoint its step builds on, so
  a rewind or ``delete_thread`` that removes it before the transaction commits makes the
  commit raise ConflictError (its actions compensated), and one begun after that is
  refused (``StaleCheckpointError``).  It also stamps the transaction's meta with the
  checkpoint its step builds on (``STEP_META``), the durable link a rewind after a crash
  follows to the work of a step that never got a checkpoint (``_early_work``).  While a
  rewind or ``delete_thread`` of a thread runs (``_RemovalUnderway``), the thread's saves
  and node transactions in other Python threads wait for its end, compensations included
  (``_await_removal``): a refusal never tells a run its step was undone before it is (a
  node transaction begun on an event loop's thread is refused instead: waiting there
  stopped the loop).
- **Rewinds and purges made on the store itself** count the same: the saver registers an
  undo watcher with walstore when it is made (``_watch_undo``:
  ``walstore.agent.scope.register_undo_watcher``), so ``store.rewind`` scoped to a
  thread's prefix, to a scope inside it or to one around threads (``b"lg"``), an
  unscoped one (every thread), and ``store.purge`` of such a prefix, cut off the runs in
  flight of each thread they reach with the same marks ``rewind`` makes (``_CutOff``; a
  scope around threads is marked once, ``_WIDE``, no thread listed).  Before (stop 76) a
  run in flight saved the step a ``store.rewind`` had just undone.  The undoing context
  is not cut off (its compensators write to the thread unhindered; an undo made in a
  node of the thread leaves that run going on, one around threads made there cuts it
  off at its next save); an undo that failed before its commit cuts off nothing.
  A rewind to a point after some of the run's node transactions leaves them, while the
  run's checkpoint of their step is refused (or taken back): the run's refused save
  reverts, with their compensations, those the thread records nowhere -- no checkpoint
  of the run on or after their step left, no pending write of their task on a
  checkpoint still there -- judged at the run's outermost graph
  (``_undo_cut_off_step``; before, stop 77, such a booking stood and a resume booked
  again).  A purge compensates nothing (``_UNDOS`` notes rewinds only), nor does
  such a run once its thread was erased too (``_ERASES``).
- **Resuming after a kill** (``_undo_on_resume``; ``undo_on_resume=False`` turns it
  off).  A process killed while a step ran leaves that step's node transactions
  committed and nothing recording them: the thread's head says the step has not run,
  and a resume runs it again (it booked twice: before, docs/GUIDE.md told users to
  rewind the thread to its head by hand first).  A run's load of the outermost graph's
  head (``get_tuple`` with LangGraph's Runtime in the config: never ``get_state``'s)
  first reverts, with their compensations, the node transactions an EARLIER open of
  the store committed in the step built on that head, or in a later step whose
  checkpoint was never saved, judged at the outermost graph by ``_step_recorded`` with
  the task each names (``TASK_META``, stamped beside ``STEP_META``; a functional-API
  ``@task``'s own, ``_task_chain``, with its callers, ``CALLERS_META``, else read from
  its ``STEP_META``, ``_stamped_callers``): kept when the
  task's outcome (regular writes, an interrupt's, an error's) was saved on the head
  after it committed, or a regular outcome of a task that called it was (LangGraph
  saves a ``@task``'s result and its caller's in parallel: the caller's may land
  alone, and a resume then never calls the task again), as the same process's resume
  would run it -- until the run saves an input checkpoint on that head (new input:
  LangGraph discards the head's saved outcomes and runs from the input), when the kept
  work is reverted too (``_undo_discarded``; before, a finished branch's booking
  stood beside its new one) -- and so is, inside one process, the work a run of this
  process recorded on a head whose step it left unfinished (a branch failed or stopped
  at an ``interrupt()`` beside one that finished), when new input or a
  ``graph.update_state`` that drops the saved outcomes is saved on it
  (``_undo_abandoned``, stop 80; not while
  a ``copy_thread`` copy still holds that head, whose resume returns that work as done);
  both made at the new run's first node transaction, before it reads, when LangGraph's
  background save of the input checkpoint has not come yet (``_discard_early``).
  A node LangGraph's ``RetryPolicy`` runs again after an attempt raised: the first node
  transaction of the next attempt reverts what the earlier attempts committed
  (``_undo_superseded``, stop 80; LangGraph drops their writes), and a transaction of an
  earlier attempt still running in a worker thread is refused (``_refuse_superseded``);
  a task whose step ended in an error, run again by a plain resume: what its failed run
  committed (``_undo_rerun``).  "Earlier" is the
  log's end when the store object met its first saver (``_EarlierOpen``: one writer
  process per store); a head is judged once per store object, under a per-thread lock;
  a read-only store writes nothing.  A run that finds the thread with no checkpoint at
  all (a new thread, or one whose first run was killed before any save:
  ``durability="exit"``) does the same from the thread's fresh-start mark
  (``_undo_on_fresh_start``: where the earlier open's run on the empty thread began;
  set by the first such run of each open).  Each undo is logged at WARNING by this
  module's logger and kept in ``WalstoreSaver.resume_undos`` (:class:`ResumeUndo`).
- **A ``store.revert`` cuts off no run.**  A revert of a node's transaction compensates
  its bookings and puts back its keys, but the thread's checkpoints, written by separate
  transactions, still say what the node returned: to undo a thread's steps, rewind the
  thread (``rewind``), which keeps checkpoints, memory, keys and bookings together.
- ``delete_thread`` erases the thread with ``store.purge(thread prefix)``: its keys and
  every past version of them.

Values go through LangGraph's serde; the default is :class:`StateSerializer` (see
``serde.py``): the graph's own dataclasses, Enums, pydantic models and datetimes come back
as themselves, anything that would not is refused at ``put``, nothing pickles.
"""
from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import functools
import heapq
import itertools
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Callable

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (WRITES_IDX_MAP, BaseCheckpointSaver,
                                           ChannelVersions, Checkpoint, CheckpointMetadata,
                                           CheckpointTuple, get_checkpoint_id,
                                           get_checkpoint_metadata)
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("walstore.integrations.langgraph needs LangGraph: "
                      "pip install 'walstore[langgraph]'") from e

from langgraph.checkpoint.base.id import uuid6  # (the generator of LangGraph's ids)

try:  # (the configurable key of a run's Runtime: set by a run, never by get_state)
    from langgraph._internal._constants import CONFIG_KEY_RUNTIME as _RUN_KEY
except ImportError:  # pragma: no cover - another langgraph layout
    _RUN_KEY = "__pregel_runtime"
try:  # (the configurable key of a run's durability, in each of its tasks' configs)
    from langgraph._internal._constants import CONFIG_KEY_DURABILITY as _DURABILITY_KEY
except ImportError:  # pragma: no cover - another langgraph layout
    _DURABILITY_KEY = "__pregel_durability"

try:
    from langgraph.checkpoint.base import writes_sort_key
except ImportError:  # pragma: no cover - older langgraph-checkpoint
    def writes_sort_key(task_path: str, task_id: str = "", idx: int = 0):
        return (task_path, task_id, idx)

import walstore
from walstore.agent.scope import (NO_SCOPE, add_commit_check, add_undo_fence, fenced_for,
                                  undo_kind)
from walstore.codec import encode_key
from walstore.errors import (CommitOutcomeUnknown, ConflictError, ErasureOwed,
                             HistoryTrimmed, PointTypeError, RevertConflict, WalstoreError,
                             type_and_message)

from .._async import finish_despite_cancel
from .._checks import check_store as _check_store
from .blobs import DEFAULT_DELTA_DEPTH, DEFAULT_VALUE_CACHE_BYTES, BlobCodec
from .keys import (BLOB, CHECKPOINT, FRESH, LEGACY_LETTERS, RUN, THREADS, WRITE,
                   Namespace, SaverKeys, is_hashed, is_legacy_checkpoint,
                   legacy_checkpoint_ranges, prefix_end, read_part)
from .serde import StateSerializer

__all__ = ["WalstoreSaver", "StaleCheckpointError", "ResumeUndo",
           "current_thread_scope", "SCOPE_PROVIDER_REGISTERED"]

_log = logging.getLogger(__name__)   # (a run's undo of what a killed process left: WARNING)

DEFAULT_PREFIX = b"lg"
EXTENDS_HEAD = "__walstore_extends_head__"   # configurable key: the ns whose head a run
#                                              loaded as "latest" (see the module doc)
READ_EMPTY = "__walstore_read_empty__"       # configurable key: the ns a run loaded as
#                                              "latest" and found empty (see the module doc)
_WRITTEN = "\x00written"                      # ... + this: and has put its first checkpoint
RUN_TOKEN = "__walstore_run__"               # + ns: configurable key naming one run's load
#                                              of a namespace (its node transactions)
ERROR_CHANNEL = "__error__"                  # LangGraph's write of a failed task's error
CHECKPOINTER_KEY = "__pregel_checkpointer"    # LangGraph's configurable key of the saver
STEP_META = "langgraph_step"                 # node transaction meta: {ns: checkpoint id
#                                              its step builds on} (``_stamp_step``)
TASK_META = "langgraph_task"                 # node transaction meta: the id of the task
#                                              of the outermost graph it is work of
CALLERS_META = "langgraph_callers"           # node transaction meta: the tasks that called
#                                              it, outermost first (``_task_chain``)
_PUT_RETRIES = 8
_RESUME_UNDOS_KEPT = 256  # ResumeUndo records a saver keeps (``resume_undos``), newest last
_CLOCK_SLACK = 0.05  # s: commit times are taken as commits queue, not quite in log order
_READ_RETRIES = 20
_ALIST_BATCH = 32  # checkpoints decoded per worker-thread hop of ``alist``, at most
NULL_TASK_ID = "00000000-0000-0000-0000-000000000000"  # LangGraph's task of a run's input


class StaleCheckpointError(ConflictError):
    """A ``put`` lost the race for a thread: another writer built on the same checkpoint.

    ``parent`` is the checkpoint this writer built on, ``head`` the namespace's newest
    checkpoint now.  Nothing of the refused put was written; when it lost a race to a
    rival (``head`` set), the transactions the run's nodes committed in that step were
    reverted and their actions compensated first (the message names them, and any that
    could not be: a rival changed the same keys since).
    """

    def __init__(self, message: str, thread_id: str, checkpoint_ns: str,
                 parent: str | None, head: str | None) -> None:
        super().__init__(message, [])
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.parent = parent
        self.head = head

    def __reduce__(self) -> tuple:
        # (pickle and copy call the class with ``args``, the message alone: unpickling
        # raised TypeError, so one raised in a worker process broke the whole
        # ProcessPoolExecutor — BrokenProcessPool for every task — and copy.copy raised)
        return (type(self), (str(self), self.thread_id, self.checkpoint_ns, self.parent,
                             self.head), dict(self.__dict__))


@dataclasses.dataclass(frozen=True)
class ResumeUndo:
    """What a run resuming a thread after a restart undid before its nodes ran
    (``WalstoreSaver.resume_undos``; see the module doc, "Resuming after a kill").

    ``checkpoint_id`` is the thread's head the run resumed from; ``undone`` the txids of
    the node transactions reverted (newest first; their actions compensated, their keys
    put back), which an earlier open of the store committed in the step built on that
    head (or in a step after it whose checkpoint was never saved) and which no
    checkpoint or pending write records; ``kept`` those of that step left as they are
    (their task's outcome is recorded on the head: it finished, was interrupted with
    ``interrupt()`` or failed, after they committed); ``left`` "txid (why)" of those
    that could not be undone (a later writer changed their keys, or their task is
    unknown: written by an older walstore beside tasks whose outcome is recorded) --
    undo them by hand (``saver.rewind`` of the head, or ``store.revert``).
    ``checkpoint_id`` is None when the thread had no checkpoint: the run the earlier open
    ran on it was killed before its first was saved, and all its node transactions were
    judged (``_undo_on_fresh_start``).  ``discarded`` is True for the undo of work whose
    record new input discarded: the run's input checkpoint was saved on ``checkpoint_id``,
    a head whose step was left unfinished -- by a killed process (work an earlier resume
    kept, ``_undo_discarded``) or by a run of this process that failed or stopped at an
    ``interrupt()`` (``_undo_abandoned``; there an ``update_state`` that drops the
    outcomes too) -- so LangGraph dropped the finished tasks' saved outcomes and runs
    them again.  ``superseded`` is True for the undo of what a
    node's earlier attempts committed, made as LangGraph retried the node (its
    ``RetryPolicy``: ``_undo_superseded``); ``checkpoint_id`` is then the checkpoint the
    step builds on.  ``rerun`` is True for the undo of what a task that failed (its
    error saved on ``checkpoint_id``, or cut short with no outcome) committed, made as
    a resume ran the task again (``_undo_rerun``)."""

    thread_id: str
    checkpoint_id: str | None
    undone: tuple[int, ...]
    kept: tuple[int, ...] = ()
    left: tuple[str, ...] = ()
    discarded: bool = False
    superseded: bool = False
    rerun: bool = False


def _refuse_legacy_layout(store: "walstore.Store", key_prefix: bytes) -> None:
    """WalstoreError when the store holds checkpoints that walstore 0.1.x wrote under
    ``key_prefix`` (``keys.legacy_checkpoint_ranges``): this version does not read that
    layout, and running over it would show every such thread as empty and start it over.
    A few short scans, once per saver."""
    for start, end in legacy_checkpoint_ranges(key_prefix):
        row = _first(store.scan(start=start, end=end))
        if row is None:
            continue
        legacy, thread_id = is_legacy_checkpoint(key_prefix, row[0])
        if not legacy:
            continue
        erase = ", ".join(repr(key_prefix + bytes([c])) for c in LEGACY_LETTERS)
        raise WalstoreError(
            f"store {store.path} holds LangGraph checkpoints written by walstore 0.1.x "
            f"(thread {thread_id!r}, key {row[0]!r}) in a key layout this version does not "
            f"read (it reads {key_prefix + THREADS!r}...): this saver would see no "
            f"checkpoint there and start such threads over, so it refuses.  Nothing was "
            f"changed.  Read or export them with walstore 0.1.x, then erase them with "
            f"store.purge(prefix) for each of {erase} (every key under those prefixes), "
            f"or give this saver another key_prefix to leave them where they are")


def _conf(config: RunnableConfig | None) -> dict:
    return (config or {}).get("configurable", {}) or {}


def _id_text(cid: Any) -> str | None:
    """A checkpoint id as the keys spell it: one given as another type (an int) matches
    no checkpoint, as in SqliteSaver and InMemorySaver (it raised AttributeError)."""
    return cid if cid is None or isinstance(cid, str) else str(cid)


def _where(config: RunnableConfig) -> tuple[str, str]:
    conf = _conf(config)
    return str(conf["thread_id"]), conf.get("checkpoint_ns", "") or ""


def _rewind_where(config: Any) -> tuple[str, str, str | None]:
    """(thread id, namespace, checkpoint id or None) of a config given to ``rewind`` (and
    ``rewind_plan``, ``rewind_point``, ``checkpoint_lsn``), checked before anything is
    read or changed: a config that is not a mapping, or whose ``configurable`` is not,
    or a namespace that is not a str, is a TypeError; one that names no thread
    (``thread_id`` missing or None) a ValueError; a ``checkpoint_id`` that is not a str
    names no checkpoint, ``walstore.errors.PointTypeError`` (an ``UnknownPoint`` that is
    also a TypeError, as ``store.rewind`` raises for a point of another type).  Each
    names what is wrong; nothing was changed.  (``_where`` raised a bare
    ``KeyError('thread_id')``, or AttributeError.)"""
    if not isinstance(config, Mapping):
        raise TypeError(f"rewind takes a LangGraph config (a dict with a 'configurable' "
                        f"dict naming thread_id and, optionally, checkpoint_id), not "
                        f"{type(config).__name__} ({config!r:.80}); nothing was changed")
    conf = config.get("configurable")
    if conf is None:
        raise ValueError(f"the config given to rewind has no 'configurable' dict, so it "
                         f"names no thread ({dict(config)!r:.120}); nothing was changed")
    if not isinstance(conf, Mapping):
        raise TypeError(f"the config given to rewind has a 'configurable' of type "
                        f"{type(conf).__name__}, not a dict ({conf!r:.80}); nothing was "
                        f"changed")
    thread_id = conf.get("thread_id")
    if thread_id is None:
        raise ValueError(f"the config given to rewind names no thread "
                         f"(configurable['thread_id'] is missing or None: "
                         f"{dict(conf)!r:.120}); nothing was changed")
    ns_name = conf.get("checkpoint_ns", "") or ""
    if not isinstance(ns_name, str):
        raise TypeError(f"configurable['checkpoint_ns'] must be a str, not "
                        f"{type(ns_name).__name__} ({ns_name!r:.80}); nothing was changed")
    cid = conf.get("checkpoint_id")
    if cid is not None and not isinstance(cid, str):
        raise PointTypeError(f"configurable['checkpoint_id'] {cid!r:.80} is of type "
                             f"{type(cid).__name__}: checkpoint ids are str, so it names "
                             f"no checkpoint of thread {str(thread_id)!r}; nothing was "
                             f"changed", cid)
    return str(thread_id), ns_name, cid or None


def _config(thread_id: str, ns: str, cid: str, **extra: Any) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                             "checkpoint_id": cid, **extra}}


def _mark(config: RunnableConfig | None, key: str, value: Any) -> None:
    """Set (None: remove) a private ``configurable`` key in a caller's config, in place
    (the only way to tell a run that loaded an empty thread from a direct put)."""
    conf = (config or {}).get("configurable")
    try:
        if value is None:
            conf.pop(key, None)
        else:
            conf[key] = value
    except (AttributeError, TypeError):  # no configurable dict, or a read-only mapping
        pass


_REMOVALS: "weakref.WeakKeyDictionary[Any, dict[bytes, float]]" = weakref.WeakKeyDictionary()
_REMOVALS_LOCK = threading.Lock()


def _forked() -> None:
    global _REMOVALS_LOCK, _UNDERWAY_DONE
    _REMOVALS_LOCK = threading.Lock()  # (one a parent's thread held at the fork stays held)
    _UNDERWAY_DONE = threading.Condition(threading.Lock())
    _UNDERWAY.clear()  # (the parent's threads removing are not the child's)


os.register_at_fork(after_in_child=_forked)


_REWINDS: "weakref.WeakKeyDictionary[Any, dict[bytes, float]]" = weakref.WeakKeyDictionary()

# thread prefix -> the Python threads rewinding or deleting it right now (per store
# object): the thread's saves and node transactions wait for its end (its compensations
# too), so a refusal that says the run's step was undone never comes before the undo
_UNDERWAY: "weakref.WeakKeyDictionary[Any, dict[bytes, list[int]]]" = \
    weakref.WeakKeyDictionary()
_UNDERWAY_DONE = threading.Condition(threading.Lock())


class _RemovalUnderway:
    """``with _RemovalUnderway(store, prefix):`` around a rewind or delete of the thread
    (marks, commit and compensations): the thread's saves and node transactions in other
    Python threads wait for its end meanwhile (``_await_removal``).  Two of one thread
    take turns (the second waits, at most ``_REMOVAL_WAIT_S``): each marks the thread's
    runs cut off as it begins and, failing without committing, puts back the marks it
    found -- interleaved, the one that failed last put back the other's mark, and the
    thread stayed marked with nothing removed (its run refused, told its step was
    undone, its booking standing: probe h3).  One nested in the same Python thread (a
    compensator rewinding the thread) goes on: it ends first."""

    def __init__(self, store: Any, prefix: bytes | Sequence[bytes]) -> None:
        # (several prefixes: the threads one undo made on the store reaches, _CutOff;
        # taken in the order given, sorted there, so two such undos never wait in turn)
        self.store = store
        self.prefixes = [prefix] if isinstance(prefix, bytes) else list(prefix)
        self.token: Any = None

    def __enter__(self) -> None:
        me = threading.get_ident()
        deadline = time.monotonic() + _REMOVAL_WAIT_S
        with _UNDERWAY_DONE:   # (the look and the entry in one hold of the lock)
            per_store = _UNDERWAY.setdefault(self.store, {})
            for prefix in self.prefixes:
                while not _removing_here(self.store, prefix):
                    threads = per_store.get(prefix)
                    left = deadline - time.monotonic()
                    if not threads or me in threads or left <= 0:
                        break
                    _UNDERWAY_DONE.wait(left)
                per_store.setdefault(prefix, []).append(me)
        self.token = _REMOVING_HERE.set(
            _REMOVING_HERE.get() | {(id(self.store), p) for p in self.prefixes})

    def __exit__(self, *exc: Any) -> None:
        _REMOVING_HERE.reset(self.token)
        me = threading.get_ident()
        with _UNDERWAY_DONE:
            per_store = _UNDERWAY.get(self.store, {})
            for prefix in self.prefixes:
                threads = per_store.get(prefix)
                if threads is not None:
                    threads.remove(me)
                    if not threads:
                        del per_store[prefix]
            _UNDERWAY_DONE.notify_all()


# (store id, thread prefix) of the removals the code running now works for: a
# compensator of one, and the threads it starts carrying its context (LangGraph's own, a
# graph it runs on the thread it undoes: its background saves), never wait for it.  The
# prefix may be a scope around threads (an undo made on the store: ``_CutOff``): every
# thread under it counts.
_REMOVING_HERE: "contextvars.ContextVar[frozenset]" = contextvars.ContextVar(
    "walstore_langgraph_removing", default=frozenset())


def _removing_here(store: Any, prefix: bytes) -> bool:
    here = _REMOVING_HERE.get()
    if not here:
        return False
    sid = id(store)
    if len(here) > 8:   # (many removals in this context: a lookup per byte of prefix)
        return any((sid, p) in here for p in _prefixes_in(prefix))
    return any(s == sid and prefix.startswith(p) for s, p in here)


def _prefixes_in(prefix: bytes, keys: Any = None) -> list[bytes]:
    """The prefixes of ``prefix`` (itself and b"" included), those in ``keys`` when
    given: a lookup per byte of it, whatever the number of keys."""
    return [prefix[:i] for i in range(len(prefix) + 1)
            if keys is None or prefix[:i] in keys]


def _others_removing(store: Any, prefix: bytes, me: int) -> bool:
    """Does another Python thread than ``me`` remove the thread ``prefix`` (or undo a scope
    around it) right now?  (Under ``_UNDERWAY_DONE``.)"""
    per_store = _UNDERWAY.get(store)
    if not per_store:
        return False
    if len(per_store) > 8:  # (many removals under way: a lookup per byte of prefix)
        return any(me not in per_store[key] for key in _prefixes_in(prefix, per_store))
    return any(threads and me not in threads and prefix.startswith(key)
               for key, threads in per_store.items())


_REMOVAL_WAIT_S = 120.0  # (then as before: a compensator of the rewind that runs a graph
#  on the very thread it undoes, in another Python thread not carrying its context (a
#  bare threading.Thread), and waits for it, would wait for ever; the cap is per save or
#  node transaction, however often it waits)


def _await_removal(store: Any, prefix: bytes, budget: dict | None = None) -> bool:
    """Wait until no rewind or delete of the thread ``prefix`` runs in another Python
    thread of this process (not for one this thread runs, nor one whose context this
    code carries: a compensator of it saving on the thread, in LangGraph's threads too; at
    most ``_REMOVAL_WAIT_S``, counted from the first wait of ``budget``:
    one save or node transaction passes the same dict to each of its waits, so a save
    refused after the cap ran out does not wait the cap again).  True when it waited for
    one that ended: the marks may have changed meanwhile (a removal re-marks the thread
    once committed, and puts the marks back when it failed without committing)."""
    if _removing_here(store, prefix):
        return False   # (on behalf of the removal: a compensator's work)
    me = threading.get_ident()
    waited = False
    budget = {} if budget is None else budget
    with _UNDERWAY_DONE:
        while True:
            if not _others_removing(store, prefix, me):
                return waited
            now = time.monotonic()
            deadline = budget.setdefault("deadline", now + _REMOVAL_WAIT_S)
            if now >= deadline:
                return False   # (still running)
            waited = True
            _UNDERWAY_DONE.wait(deadline - now)


def _removal_underway(store: Any, prefix: bytes) -> bool:
    """Does a rewind or delete of the thread ``prefix`` run in another Python thread?"""
    with _UNDERWAY_DONE:
        return (_others_removing(store, prefix, threading.get_ident())
                and not _removing_here(store, prefix))


def _on_event_loop() -> bool:
    """Does this thread run an asyncio event loop (an async node's own code)?"""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _rewinds(store: Any) -> dict[bytes, float]:
    """thread prefix -> when this process last began rewinding it (per store object)."""
    return _per_store(_REWINDS, store, dict)


# thread prefix -> when a rewind of it (``saver.rewind``, a ``store.rewind`` reaching it:
# not a purge, not ``delete_thread``) last committed in this process (monotonic, as
# ``_REWINDS``; per store object; a scope around threads in ``_WIDE["undos"]``): a run
# that loaded the thread before it and is refused has its step's bookings the rewind
# left standing undone (``WalstoreSaver._undo_cut_off_step``)
_UNDOS: "weakref.WeakKeyDictionary[Any, dict[bytes, float]]" = weakref.WeakKeyDictionary()


# thread prefix -> when an erasure of it (``delete_thread``, a ``store.purge`` reaching
# it) last committed in this process (as ``_UNDOS``; a scope around threads in
# ``_WIDE["erases"]``): a run that loaded the thread before it undoes nothing when
# refused, whatever rewind cut it off too (an erasure compensates nothing; judged after
# one, every booking of the run, its erased steps' too, looked recorded nowhere and was
# reverted: h4, stop 77)
_ERASES: "weakref.WeakKeyDictionary[Any, dict[bytes, float]]" = weakref.WeakKeyDictionary()


_MARKS_MAX = 65536  # threads with a removal/rewind mark kept per store: the oldest go first


def _note_mark(marks: dict, key: bytes, value: Any, limit: int = _MARKS_MAX) -> None:
    """``marks[key] = value``, the newest last; beyond ``limit`` threads the oldest
    mark is forgotten (a run that loaded that thread before it and still runs is then
    fenced only by its checkpoints and its node transactions' undo fence)."""
    with _REMOVALS_LOCK:
        _set_mark(marks, key, value, limit)


def _set_mark(marks: dict, key: bytes, value: Any, limit: int) -> None:
    """``_note_mark``'s work, under ``_REMOVALS_LOCK``."""
    marks.pop(key, None)
    marks[key] = value
    while len(marks) > limit:
        del marks[next(iter(marks))]


# The marks of the undos under way, per marks dict and key (``_mark_begin``): [the dict,
# the mark the key had with none under way (a committed one's since), the marks of those
# under way].  An undo that changed nothing takes its own out, and the key shows the
# newest left.  (Each put back the mark it had found: two rewinds of a thread whose
# turns overlapped (the second waited _REMOVAL_WAIT_S), both refused, the second put
# back the first's, and the run in flight was cut off by no undo.)
_MARKING: dict[tuple[int, bytes], list] = {}


def _mark_begin(marks: dict, key: bytes, mine: Any, limit: int = _MARKS_MAX) -> None:
    """An undo reaching ``key`` begins: ``mine`` marked, the mark it found kept for its
    end (``_mark_end``)."""
    with _REMOVALS_LOCK:
        at = _MARKING.get((id(marks), key))
        found = marks.get(key)
        if at is None or at[0] is not marks:
            at = _MARKING[(id(marks), key)] = [marks, found, []]
        elif found is not None and found not in at[2]:   # (made meanwhile, not by one
            at[1] = found if at[1] is None else max(at[1], found)   # under way)
        at[2].append(mine)
        _set_mark(marks, key, mine, limit)


def _mark_end(marks: dict, key: bytes, mine: Any, renewed: Any,
              limit: int = _MARKS_MAX) -> None:
    """The undo that marked ``mine`` ended: committed (or may have), ``renewed`` is
    marked (a run that loaded meanwhile is cut off too); None: it changed nothing, and
    the key shows the newest mark of the others under way or of one committed, none when
    there is none -- unless marked since by something else."""
    with _REMOVALS_LOCK:
        at = _MARKING.get((id(marks), key))
        left: list = []
        if at is not None and at[0] is marks:
            if mine in at[2]:
                at[2].remove(mine)
            if renewed is not None:
                at[1] = renewed
            left = [m for m in (at[1], *at[2]) if m is not None]
            if not at[2]:
                del _MARKING[(id(marks), key)]
        if renewed is not None:   # (never older than one marked since: a committed one's)
            now = marks.get(key)
            _set_mark(marks, key, renewed if now is None else max(now, renewed), limit)
        elif marks.get(key) == mine:
            if left:
                _set_mark(marks, key, max(left), limit)
            else:
                marks.pop(key, None)


# Marks of undos made on the store that reach a scope AROUND threads (an unscoped
# ``store.rewind``: b""; one scoped to ``b"lg"``): per store object, kind ("removals",
# "rewinds") -> scope -> mark, as the per-thread dicts hold them.  Marking
# each thread under the scope would read every thread of the store; a lookup tries the
# scopes here instead (``_mark_of``): normally none, a few (a committed one drops those
# inside it), and with many, each prefix of the thread's.  As many are kept as threads'
# (64 were: at the 65th the oldest was forgotten, and a run it had cut off saved the
# step it undid; stop 76 h5).
_WIDE: "weakref.WeakKeyDictionary[Any, dict[str, dict[bytes, Any]]]" = \
    weakref.WeakKeyDictionary()
_WIDE_MAX = _MARKS_MAX
_PER_THREAD = {"removals": _REMOVALS, "rewinds": _REWINDS, "undos": _UNDOS,
               "erases": _ERASES}


def _per_thread(store: Any, kind: str) -> dict[bytes, Any]:
    """The per-thread marks of ``kind`` (``_PER_THREAD``) of ``store``."""
    with _REMOVALS_LOCK:
        return _PER_THREAD[kind].setdefault(store, {})


def _wide(store: Any, kind: str) -> dict[bytes, Any]:
    with _REMOVALS_LOCK:
        return _WIDE.setdefault(store, {}).setdefault(kind, {})


def _mark_of(store: Any, kind: str, prefix: bytes) -> Any:
    """The newest mark of ``kind`` for thread ``prefix``: its own, or one of a scope
    around it (``_WIDE``); None when none.  (Read without the lock: single dict reads.)"""
    own = _PER_THREAD[kind].get(store)
    got = own.get(prefix) if own else None
    wide = _WIDE.get(store)
    marks = wide.get(kind) if wide else None
    if marks:
        scopes = list(marks) if len(marks) <= 8 else _prefixes_in(prefix, marks)
        for scope in scopes:
            mark = marks.get(scope)
            if mark is not None and prefix.startswith(scope) and (got is None
                                                                  or mark > got):
                got = mark
    return got


def _removal_mark(store: Any) -> tuple[int, int]:
    """A removal mark made now (``WalstoreSaver._removing``): the timestamp of a LangGraph
    id made now and the LSN of the newest commit."""
    newest = store.log(limit=1)
    return (_uuid6_ticks(str(uuid6())), int(newest[0].lsn) if newest else -1)


def _loaded_at(token: Any) -> float | None:
    """When the run whose load ``token`` is (``RUN_TOKEN``) loaded its thread."""
    try:
        return float(str(token).split("-", 1)[0])
    except ValueError:
        return None


def _removals(store: Any) -> dict[bytes, tuple[int, int]]:
    """thread prefix -> when this process last began removing checkpoints of it: the
    timestamp of a LangGraph id made then (``_uuid6_ticks``) and the LSN of the newest
    commit then (per store object, shared by every saver on it)."""
    return _per_store(_REMOVALS, store, dict)


_LOST_RUNS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_LOST_RUNS_MAX = 4096  # run tokens kept per store: the oldest are forgotten first


def _lost_runs(store: Any) -> "OrderedDict[str, None]":
    """The load tokens (``RUN_TOKEN``) of runs whose put lost a race to a rival (per store
    object): LangGraph goes on running such a run's later steps (``durability="async"``
    saves in the background; ``"exit"`` saves only at the end), and each of them is
    refused too, its node transactions reverted."""
    return _per_store(_LOST_RUNS, store, OrderedDict)


_STEP_TXNS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_STEP_TXNS_MAX = 4096  # (run, checkpoint) entries kept per store: abandoned runs' go first


class _LostRunUndo:
    """What undoing one lost run's node transactions did so far (per store; keyed by
    thread prefix, namespace and run token).  Several of the run's saves are refused at
    about the same time (its ``put`` and LangGraph's background ``put_writes`` of the
    same step): they take turns under ``lock``, and each reports all that was undone,
    so no refusal reaches its caller while the undo it stands for still runs in another
    thread (before, the second refusal found the registry emptied by the first and said
    nothing was undone, with the first's revert still under way: audit 74)."""

    __slots__ = ("lock", "undone", "left", "done")

    def __init__(self) -> None:
        self.lock = threading.RLock()  # (a compensator saving on the same run re-enters)
        self.undone: list[int] = []     # txids reverted, their actions compensated
        self.left: list[str] = []       # "txid (why)" of those a revert refused
        self.done: set[int] = set()     # txids a cut-off run's undo is done with


class _TaskAttempts(dict):
    """txid -> the attempt that began it, of one task's node transactions (``_AttemptTxns``);
    ``newest``: the newest attempt of the task that began a node transaction (a
    transaction of an older one is refused: ``_refuse_superseded``); ``undoing``: held
    while a later attempt's transaction undoes the earlier attempts' work, made by the
    first that needs it (``_undo_superseded``)."""

    __slots__ = ("newest", "undoing")

    def __init__(self) -> None:
        super().__init__()
        self.newest = 0
        self.undoing: Any = None   # (a threading.RLock)


class _AttemptTxns(OrderedDict):
    """(thread prefix, the node's task namespace, the run's load tokens) -> txid -> the
    node attempt (LangGraph's ``execution_info.node_attempt``) that began it: the node
    transactions of attempts that may yet be retried (``WalstoreSaver._undo_superseded``),
    the newest tasks' kept, ``_STEP_TXNS_MAX`` tasks and ``_SAVED_TXNS_MAX`` transactions
    at most (a retry of a task dropped leaves its earlier attempts' work standing).
    Used under ``_REMOVALS_LOCK``."""

    txns = 0

    def task(self, key: tuple) -> _TaskAttempts:
        """The ``_TaskAttempts`` of ``key``, made when missing (the newest task)."""
        got = self.get(key)
        if got is None:
            got = self[key] = _TaskAttempts()
        self.move_to_end(key)
        return got

    def note(self, key: tuple, txid: int, attempt: int) -> _TaskAttempts:
        got = self.task(key)
        if txid not in got:
            self.txns += 1
        got[txid] = attempt
        if attempt > got.newest:
            got.newest = attempt
        while len(self) > _STEP_TXNS_MAX or (self.txns > _SAVED_TXNS_MAX and len(self) > 1):
            self.txns -= len(self.popitem(last=False)[1])
        if len(got) > _SAVED_TXNS_MAX:
            # (one task making more: its oldest forgotten.  Before (h2), the bound above,
            # which keeps the newest task whole, let one node's map grow without end:
            # 100,000 transactions of one node, 100,000 entries)
            del got[next(iter(got))]
            self.txns -= 1
        return got

    def take(self, key: tuple, below: int) -> list[int]:
        """The txids of ``key`` begun by an attempt before ``below``, newest first,
        forgotten; ``below`` is the task's newest attempt from now (a transaction of an
        earlier one still open, or begun later, is refused: ``_refuse_superseded``)."""
        got = self.task(key)
        if below > got.newest:
            got.newest = below
        taken = sorted((t for t, a in got.items() if a < below), reverse=True)
        for txid in taken:
            del got[txid]
        self.txns -= len(taken)
        return taken


def _per_store(maps: "weakref.WeakKeyDictionary[Any, Any]", store: Any,
               make: Callable[[], Any]) -> Any:
    """The object ``maps`` holds for ``store``, made by ``make`` when missing."""
    with _REMOVALS_LOCK:
        got = maps.get(store)
        if got is None:
            got = maps[store] = make()
        return got


_SUBGRAPH_LOADS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


def _subgraph_loads(store: Any) -> "OrderedDict[str, tuple[tuple, int]]":
    """A subgraph's load token (``RUN_TOKEN`` + its namespace, set by ``get_tuple``) ->
    (the ``_AttemptTxns`` key of the task whose node runs that subgraph, that task's
    attempt then), per store object, the newest ``_STEP_TXNS_MAX`` kept: the node
    transactions of the subgraph's inner nodes are work of that attempt of the task
    (``_note_step_txn``), reverted when LangGraph's ``RetryPolicy`` runs the task again
    (``WalstoreSaver._undo_superseded_calls``)."""
    return _per_store(_SUBGRAPH_LOADS, store, OrderedDict)


_RETRIED_CALLS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


def _retried_calls(store: Any) -> "OrderedDict[tuple, dict[tuple, list]]":
    """(thread prefix, task namespace, the step's checkpoint id) -> the ``_AttemptTxns``
    key of each run that ran that task's subgraph again for a ``RetryPolicy`` (a load of
    ``<task ns>|N``) -> [(namespace, load token)] of those loads, per store object, the
    newest ``_STEP_TXNS_MAX`` kept: a later run that loads the task's subgraph anew
    (a resume of an ``interrupt()`` the retried subgraph stopped at) abandons that
    run's work there (``WalstoreSaver._undo_abandoned_calls``)."""
    return _per_store(_RETRIED_CALLS, store, OrderedDict)


_ABANDONING: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
# (store -> (thread prefix, task namespace, step) -> a lock held while a run reverts the
# abandoned retry's work there, ``_undo_abandoned_calls``: a concurrent run's first load
# of the same task's subgraph waits for it before its inner nodes run.  Used under
# ``_REMOVALS_LOCK``.)


_TASK_SAVES: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_TASK_SAVES_MAX = 4 * 4096   # (tasks kept per store: the newest steps' tasks)
_TASK_SAVERS_MAX = 256       # (run tokens kept per task)


def _note_task_save(store: Any, key: tuple, token: Any) -> None:
    """Note that the run whose load token is ``token`` saved an outcome (a regular
    write, an error's or an interrupt's; not a resume's answer) of task ``key`` =
    (thread prefix, namespace, checkpoint id, task id), per store object, the newest
    ``_TASK_SAVES_MAX`` tasks kept: a run of this process that committed work for a
    task stopped at its ``interrupt()`` and saved no outcome of it was cut short past
    the interrupt (``WalstoreSaver._undo_rerun``).  Each task keeps the newest
    ``_TASK_SAVERS_MAX`` runs' tokens (a head resumed that often forgets the oldest:
    their work is then left, as before stop 81)."""
    with _REMOVALS_LOCK:
        saves = _TASK_SAVES.get(store)
        if saves is None:
            saves = _TASK_SAVES[store] = OrderedDict()
        # (and under (prefix, namespace, checkpoint id, None): the runs that saved an
        # outcome of any task there -- a run whose step ended, not one in flight)
        for k in (key, key[:3] + (None,)):
            tokens = saves.setdefault(k, {})
            tokens[str(token)] = None
            if len(tokens) > _TASK_SAVERS_MAX:
                del tokens[next(iter(tokens))]
            saves.move_to_end(k)
        while len(saves) > _TASK_SAVES_MAX:
            saves.popitem(last=False)


def _task_savers(store: Any, key: tuple) -> set[str] | None:
    """The load tokens of the runs that saved an outcome of task ``key``
    (``_note_task_save``); None when none is known in this process."""
    with _REMOVALS_LOCK:
        saves = _TASK_SAVES.get(store)
        got = saves.get(key) if saves else None
        return set(got) if got else None


_RESUME_IDX = WRITES_IDX_MAP.get("__resume__")   # (a resume's answer: no outcome)
_SOURCE_WAIT_S = 2.0  # how long a node transaction waits for its step's checkpoint save
# to tell new input from a resume's later step (``WalstoreSaver._checkpoint_source``)


def _refuse_superseded(task: _TaskAttempts, attempt: int, thread_id: str,
                       task_ns: str) -> None:
    """Raise ConflictError when a later attempt of the task than ``attempt`` began a node
    transaction: LangGraph dropped this attempt (it raised, or its timeout cancelled it)
    and retries the node, whose undo of the earlier attempts' work is made at its
    first transaction -- a transaction of the dropped attempt still running in a
    worker thread (``asyncio.to_thread`` outlives a cancelled await: ``wait_for``, a
    ``TimeoutPolicy``) is refused at its begin and at its commit (its actions
    compensated).  Before (stop 80, h2), one still open then, or begun after, committed
    and its booking stood beside the retry's, the state recording one."""
    if task.newest > attempt:
        raise ConflictError(
            f"thread {thread_id!r}: attempt {attempt} of task {task_ns!r} was superseded "
            f"by attempt {task.newest} (LangGraph's RetryPolicy retried the node and "
            f"dropped this attempt's writes): its walstore transaction was refused, and "
            f"its actions compensated", [])


_ATTEMPTS: "weakref.WeakKeyDictionary[Any, _AttemptTxns]" = weakref.WeakKeyDictionary()


def _attempts(store: Any) -> _AttemptTxns:
    """The ``_AttemptTxns`` of ``store`` (per store object)."""
    return _per_store(_ATTEMPTS, store, _AttemptTxns)


def _node_attempt(conf: Mapping) -> tuple[tuple, int] | None:
    """(the run's load tokens, LangGraph's attempt number) of the node whose config
    ``conf`` is (``RetryPolicy``: 1, then 2, 3... as it retries); None when LangGraph
    does not say (an older langgraph, a config without its Runtime)."""
    info = getattr(conf.get(_RUN_KEY), "execution_info", None)
    attempt = getattr(info, "node_attempt", None)
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        return None
    tokens = tuple(sorted((k, str(v)) for k, v in conf.items()
                          if isinstance(k, str) and k.startswith(RUN_TOKEN)))
    return tokens, attempt


_DISCARDS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


class _Discard:
    """A run that loaded ``head``, a head whose step was left unfinished with work to
    undo should the run start from new input or re-run a failed task there
    (``WalstoreSaver._discard_early``).  ``gate`` orders the run's node transactions
    around the undo: the first to come makes it, the others (parallel branches, a
    ToolNode's tools) wait until it is made before they read -- else one that books
    only when its key says it has not found the first booking, kept it, and the undo
    then refunded it; ``settled`` once new input's discard is judged; ``reruns``: task
    id -> an Event set once that task's re-run undo is made (``_undo_rerun``)."""

    __slots__ = ("head", "gate", "settled", "reruns")

    def __init__(self, head: str) -> None:
        self.head = head
        self.gate = threading.Lock()
        self.settled = False
        self.reruns: dict[str, threading.Event] = {}


def _discards(store: Any) -> "OrderedDict[str, _Discard]":
    """run token (``RUN_TOKEN``) -> its ``_Discard``, of the runs that loaded a head
    whose step was left unfinished with work to discard should the run have new input
    (``WalstoreSaver._note_discardable``), per store object; the newest
    ``_LOST_RUNS_MAX`` (a run that begins no node transaction never takes its entry)."""
    return _per_store(_DISCARDS, store, OrderedDict)


_LOST_RUN_UNDOS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


def _lost_run_undo(store: Any, key: tuple) -> _LostRunUndo:
    """The ``_LostRunUndo`` of ``key`` in ``store`` (made on first use); beyond
    ``_LOST_RUNS_MAX`` runs the least recently used is forgotten (a refusal of that run
    after then reports only what it undid itself)."""
    with _REMOVALS_LOCK:
        runs = _LOST_RUN_UNDOS.get(store)
        if runs is None:
            runs = _LOST_RUN_UNDOS[store] = OrderedDict()
        got = runs.get(key)
        if got is None:
            got = runs[key] = _LostRunUndo()
        runs.move_to_end(key)
        while len(runs) > _LOST_RUNS_MAX:
            runs.popitem(last=False)
        return got


def _ended(outcomes: Mapping[str, set[int]]) -> bool:
    """Do the outcomes of a step's tasks (``WalstoreSaver._task_outcomes``) hold an
    error's or an interrupt's write: LangGraph ended the step without a checkpoint?"""
    ended = (WRITES_IDX_MAP.get("__error__"), WRITES_IDX_MAP.get("__interrupt__"))
    return any(kind in kinds for kinds in outcomes.values() for kind in ended)


def _newest_run(work: Mapping[int, tuple], tokens: Mapping[int, Any],
                task: str) -> set[int]:
    """Of the node transactions ``work`` (txid -> levels; ``tokens``: txid -> its run's
    token), those of ``task`` (its outermost level's) committed by the run that
    committed the newest of them: a task stopped at ``interrupt()``, answered, then
    failed -- that run's work is recorded nowhere, the earlier runs' that stopped at
    the interrupt are left (``_undo_abandoned``, ``_undo_rerun``)."""
    def of_task(t: int) -> bool:
        levels = work[t]
        if not levels:
            return False
        outer = min(levels, key=lambda lv: len(lv[0]))
        return bool(outer[3]) and outer[3][-1] == task
    mine = [t for t in work if of_task(t)]
    if not mine:
        return set()
    last = tokens.get(max(mine))
    return {t for t in mine if tokens.get(t) == last}


def _step_txns(store: Any) -> "OrderedDict[tuple, dict[int, tuple]]":
    """(thread prefix, ns, checkpoint id, run token) -> txids of the transactions begun
    in graph nodes of that run's step built on that checkpoint, in the order noted (a
    dict: each once, found without a scan), per store object; each to its levels
    (``_note_step_txn``: (ns, checkpoint id, run token, task id) of each namespace it
    is work of; () for an undo's own work)."""
    return _per_store(_STEP_TXNS, store, OrderedDict)


_SAVED_STEPS: "weakref.WeakKeyDictionary[Any, _SavedSteps]" = weakref.WeakKeyDictionary()
# node transactions ``_saved_steps`` holds per store, all its steps together (~220 bytes
# each): capped by steps alone, a node making 20,000 transactions a step kept 4 MiB a
# step, up to 4,096 steps (h4, stop 77); the oldest steps go first, the newest stays
_SAVED_TXNS_MAX = 65536


class _SavedSteps(OrderedDict):
    """``_saved_steps``'s map, with the count of the transactions its steps hold."""

    txns = 0

    def keep(self, key: tuple, value: tuple) -> None:
        """``self[key] = value`` as the newest, the oldest dropped past the caps (under
        ``_REMOVALS_LOCK``)."""
        old = self.pop(key, None)
        if old is not None:
            self.txns -= len(old[1])
        self[key] = value
        self.txns += len(value[1])
        while len(self) > _STEP_TXNS_MAX or (self.txns > _SAVED_TXNS_MAX and len(self) > 1):
            self.txns -= len(self.popitem(last=False)[1][1])


def _saved_steps(store: Any) -> _SavedSteps:
    """(thread prefix, ns, checkpoint id, run token) -> (the checkpoint that run's step
    built on it saved, its node transactions as ``_step_txns`` held them), per store
    object, the newest ``_STEP_TXNS_MAX`` steps holding ``_SAVED_TXNS_MAX`` transactions
    at most: a rewind may take such a checkpoint back and leave a booking of its step
    standing (``_undo_cut_off_step``; one of a step dropped is left standing, never one
    of a newer step: a run's later checkpoints are kept longer)."""
    return _per_store(_SAVED_STEPS, store, _SavedSteps)


_COPIES: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


def _copies(store: Any) -> "OrderedDict[bytes, set[bytes]]":
    """Thread prefix -> the prefixes of the threads ``copy_thread`` copied it to (per
    store object; the newest ``_MARKS_MAX`` sources kept).  A copy holds the source's
    checkpoints and pending writes under the same ids, so the saved outcome of a step a
    run of the source left unfinished is recorded by the copy as well: a resume of the
    copy reads it back (``_undo_abandoned`` leaves such work while one of them records
    it, and reverts it once none does, whichever thread takes the new input last)."""
    return _per_store(_COPIES, store, OrderedDict)


class _Gate:
    """A lock that a weak dictionary can hold (``_EarlierOpen.gates``)."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


_JUDGED_MAX = 65536   # threads whose judged head a store object keeps: the oldest go first


class _EarlierOpen:
    """What earlier opens of a store left of the runs they were running, as this store
    object sees it (one per store object, made with its first saver: ``_earlier_open``).

    walstore has one writer process per store (``StoreLocked``), so a node transaction
    committed before this store object met its first saver (``open_lsn``: the log's end
    then) was committed by an earlier open -- a process killed, or closed, since -- and
    belongs to no run of this process: nothing live can still record it.  A saver is
    always made before any run that uses it, so every node transaction of this process
    lies after ``open_lsn``.  (A marker in each node transaction's meta would say the
    same, but not for the stores written before it existed: their node transactions
    carry ``STEP_META`` and nothing more.)

    ``index(root)`` (``_WorkIndex``, one per saver key root) holds the node
    transactions (``STEP_META``) of the log up to ``open_lsn`` of the threads under
    ``root``, filled as runs resuming them ask (``WalstoreSaver._leftovers``): back to
    the time the oldest such head was made, each commit read once per root, whatever
    the number of threads resumed.  ``judged``: thread prefix -> the newest head judged
    (its work undone or kept) or saved by this open (``WalstoreSaver.put``: nothing of an
    earlier open builds on it): a run loading it again costs a dict read; ``gates``: one
    lock per thread, so two runs resuming it at once judge it once.  ``kept``: (thread
    prefix, head) -> the txids a resume kept on that head because their task's outcome
    was saved on it; new input discards those outcomes (``WalstoreSaver.put``)."""

    def __init__(self, open_lsn: int) -> None:
        self.open_lsn = open_lsn
        self.lock = threading.Lock()          # (judged, gates: held briefly)
        self.index_lock = threading.Lock()    # (the indexes: held while the log is read)
        self.indexes: dict[bytes, _WorkIndex] = {}
        self.judged: OrderedDict[bytes, str] = OrderedDict()
        self.kept: OrderedDict[tuple[bytes, str], list[int]] = OrderedDict()
        self.gates: "weakref.WeakValueDictionary[bytes, _Gate]" = \
            weakref.WeakValueDictionary()

    def index(self, root: bytes) -> "_WorkIndex":
        """(Under ``index_lock``.)"""
        got = self.indexes.get(root)
        if got is None:
            got = self.indexes[root] = _WorkIndex(self.open_lsn)
        return got

    def gate(self, prefix: bytes) -> _Gate:
        """The gate of thread ``prefix``: the caller keeps a reference while it holds the
        lock (``with earlier.gate(p).lock`` let the gate go at once, the weak dictionary
        forgot it, and the next caller made another: two runs judged one thread at
        once)."""
        with self.lock:
            got = self.gates.get(prefix)
            if got is None:
                got = self.gates[prefix] = _Gate()
            return got

    def is_judged(self, prefix: bytes, head: str) -> bool:
        return self.judged.get(prefix) == head   # (a single dict read)

    def judge(self, prefix: bytes, head: str) -> None:
        """``head`` of thread ``prefix`` is judged (or saved by this open): not again
        while it is the thread's newest judged (its work stays in the index: the few
        steps a kill cut off)."""
        with self.lock:
            self.judged.pop(prefix, None)
            self.judged[prefix] = head
            while len(self.judged) > _JUDGED_MAX:
                self.judged.popitem(last=False)


class _WorkIndex:
    """The node transactions an earlier open committed in the threads under one key root
    (``_EarlierOpen.index``): ``work``, thread prefix -> txid -> (LSN, the checkpoint its
    outermost step built on, its outermost task and the tasks that called it,
    ``_task_chain``, or () when not named), of the commits made from the
    time ``covered`` on with an LSN in (``lo``, ``open_lsn``].  Only work built on or
    after its thread's newest checkpoint is held (a step built on an older one ended in
    a checkpoint, or was undone by the rewind that removed it)."""

    __slots__ = ("covered", "lo", "work")

    def __init__(self, open_lsn: int) -> None:
        self.covered: float | None = None
        self.lo = open_lsn
        self.work: dict[bytes, dict[int, tuple[int, str, tuple[str, ...]]]] = {}


_EARLIER: "weakref.WeakKeyDictionary[Any, _EarlierOpen]" = weakref.WeakKeyDictionary()


def _earlier_open(store: Any) -> _EarlierOpen:
    """The ``_EarlierOpen`` of ``store``, made (the log's end read) on first use: by the
    store's first saver, before any run can use it."""
    with _REMOVALS_LOCK:
        got = _EARLIER.get(store)
    if got is not None:
        return got
    newest = store.log(limit=1)
    made = _EarlierOpen(int(newest[0].lsn) if newest else -1)
    with _REMOVALS_LOCK:
        return _EARLIER.setdefault(store, made)


def _outside_node(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a copy of this context that is in no graph node: the saver's own
    undo of a cut-off run, made from a save a subgraph's loop calls (in the context of
    its parent's node), was taken for a node transaction of that run and refused."""
    try:
        from langchain_core.runnables.config import var_child_runnable_config
    except ImportError:  # pragma: no cover - (langgraph depends on it)
        return fn()

    def outside() -> Any:
        var_child_runnable_config.set(None)
        return fn()
    return contextvars.copy_context().run(outside)


def _root_save_in_node(ns_name: str) -> bool:
    """Is a save to namespace ``ns_name`` a save of the outermost graph's loop made
    inside one of its nodes?  LangGraph commits a functional-API ``@task``'s writes (its
    result) in its caller's thread when the task finished before its future was
    registered: the saver's ``put_writes`` then ran in the ``@entrypoint``'s node
    context, and walstore's scope guard stamped it as that task's node work
    (``_stamp_step``, ``_note_step_txn``), so a rewind's cut-off undo, or a resume
    after a kill, reverted the saved result as work nothing records, then the called
    task's booking (stop 78, h6: about 3 runs in 100 under load).  The outermost loop's
    saves record its tasks' outcomes and are no task's work: such a save runs outside
    the node (``_outside_node``), as it does from LangGraph's own threads.  (A save of a
    subgraph's loop stays the work of the outermost task it runs in: a resume runs that
    task, the subgraph included, again.)"""
    if ns_name:
        return False
    try:
        from langchain_core.runnables.config import var_child_runnable_config
    except ImportError:  # pragma: no cover - (langgraph depends on it)
        return False
    conf = (var_child_runnable_config.get() or {}).get("configurable") or {}
    return bool(conf.get("checkpoint_ns"))   # (in a node: its task's namespace)


def _task_chain(task_ns: str, ns_name: str,
                checkpoint_map: Mapping | None = None) -> tuple[str, ...]:
    """The ids of the tasks of namespace ``ns_name``'s loop that a node whose own
    namespace is ``task_ns`` (LangGraph's ``"name:task id|name:task id..."``) runs in,
    outermost first: last the task whose saved outcome (pending writes) records the
    node's work, before it the tasks that called it (functional-API calls); () when
    ``task_ns`` does not lie in ``ns_name``.

    A task LangGraph's functional API runs for a call (a ``@task`` called from an
    ``@entrypoint`` or a node) belongs to its caller's loop under its own id, its
    namespace nested in the caller's: its saved result is read back, not run again, by
    a resume, so it is the task that records what it did.  It is told from a subgraph's
    task, whose namespace nests the same way, by ``checkpoint_map`` (the run config's):
    the caller's namespace maps to the checkpoint of the loop the call runs in, which is
    ``ns_name``'s own, where a subgraph's maps to the subgraph's own checkpoint.  (Before,
    stop 78's review, the caller's task was named: a resume after a kill, and a rewind's
    cut-off run, refunded the booking of a ``@task`` whose saved result the run then
    returned.)  The callers matter too: LangGraph saves a finished ``@task``'s result
    and its caller's (an ``@entrypoint``'s return) in parallel, so a kill can leave the
    caller's saved alone; a resume then takes the caller as done and never calls the
    task again, so the caller's regular outcome records the task's work (stop 79: the
    booking of a ``@task`` was refunded while the saved state recorded it)."""
    if ns_name:
        if not task_ns.startswith(ns_name + "|"):
            return ()
        rest = task_ns[len(ns_name) + 1:]
    else:
        rest = task_ns
    parts = rest.split("|")
    depth = 1
    here = checkpoint_map.get(ns_name) if checkpoint_map else None
    if isinstance(here, str):
        lead = ns_name + "|" if ns_name else ""
        while depth < len(parts) and \
                checkpoint_map.get(lead + "|".join(parts[:depth])) == here:
            depth += 1   # (a call's task, in the same loop as its caller)
    chain = tuple(part.rpartition(":")[2] for part in parts[:depth])
    if not chain[-1]:
        return ()
    return tuple(t for t in chain[:-1] if t) + chain[-1:]


def _call_caller(checkpoint_map: Mapping, ns_name: str, cid: str) -> bool:
    """Is ``ns_name`` (a key of a run config's ``checkpoint_map``) the namespace of a task
    that made a functional-API call (a ``@task``), not a loop's: LangGraph maps it to the
    checkpoint of the loop the call runs in, its caller's own (``_task_chain``), and no
    checkpoint is ever saved under it.  (Before, stop 78's review, the fence of a
    ``@task``'s transaction looked for that checkpoint there: after a rewind of the
    thread in the process, every ``@task`` transaction of a run resuming from a
    checkpoint made before the rewind was refused, "no longer has checkpoint".)"""
    if not ns_name:
        return False
    return checkpoint_map.get(ns_name.rpartition("|")[0]) == cid


def _uuid6_ticks(cid: str) -> int | None:
    """The timestamp of a uuid6 checkpoint id (LangGraph's), in its own 100 ns ticks, exact;
    None for other ids."""
    try:
        u = uuid.UUID(str(cid))
    except ValueError:
        return None
    if u.version != 6:
        return None
    return (u.time_low << 28) | (u.time_mid << 12) | (u.time_hi_version & 0x0FFF)


def _uuid6_time(cid: str) -> float | None:
    """The Unix time a uuid6 checkpoint id (LangGraph's) was made at; None for other ids."""
    t = _uuid6_ticks(cid)
    return None if t is None else (t - 0x01B21DD213814000) / 1e7


def _first(rows: Iterator) -> Any:
    """The first item of a (walstore scan) iterator, closing it; None when empty."""
    try:
        for row in rows:
            return row
        return None
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()


class _Line:
    """Checkpoint ``cid``'s ancestors (its line), read lazily from the snapshot of ``tx``
    only as far as the questions asked of it need: ``x in line`` (is ``x`` an ancestor of
    ``cid``: one of :meth:`WalstoreSaver._ancestors`) and ``x in line.made_by_step`` (an
    ancestor whose child on the line its own step made: metadata source ``"loop"``).

    ``x in line`` walks the line up from ``cid`` and ``x``'s own parents up from ``x``,
    a step of each in turn, until the line reaches ``x`` (an ancestor), or either walk
    meets the other (``x``'s parents reach ``cid`` or a node of the line found so far:
    the two lines joined below ``x``, so ``x`` is not on ``cid``'s), or the line ends.
    Its cost is the distance from ``x`` and from ``cid`` to where their lines join, not
    the thread's length: a checkpoint made after ``cid`` joins at ``cid`` within the
    steps a rewind undoes; a write of a step before ``cid`` is on a near ancestor.  Every
    checkpoint has one parent in a snapshot, so the answer is ``_ancestors``' — unless the
    parent links form a cycle through ``cid`` (only a checkpoint saved again under its own
    id with a descendant as its parent makes one; LangGraph never does), where a
    descendant of ``cid`` is taken for no ancestor.  An id with no checkpoint record is
    no ancestor (the line is made of records)."""

    def __init__(self, saver: "WalstoreSaver", tx: Any, ns: Namespace, cid: str) -> None:
        self.saver, self.tx, self.ns, self.cid = saver, tx, ns, cid
        child = tx.get(ns.checkpoint(cid)) or {}
        self.run_id = child.get("r")
        self._walk = saver._ancestors(tx, ns, cid, child)
        self._ids: list[str] = []               # the line found so far, parent first
        self._at: dict[str, int] = {}           # id -> its position in ``_ids``
        self._records: dict[str, Any] = {cid: child}
        self._done = False
        self._answers: dict[str, bool] = {}
        self.made_by_step = _MadeByStep(self)

    def _step(self) -> str | None:
        """Read one more ancestor; its id (None: the line ended)."""
        if self._done:
            return None
        got = next(self._walk, None)
        if got is None:
            self._done = True
            return None
        at, rec = got
        self._at.setdefault(at, len(self._ids))
        self._ids.append(at)
        self._records[at] = rec
        return at

    def __contains__(self, x: Any) -> bool:
        if not isinstance(x, str):
            return False  # (ids are text: None, the root's parent, is no ancestor)
        if x in self._at:
            return True
        if x == self.cid or self._done:
            return False
        known = self._answers.get(x)
        if known is not None:
            return known
        self._answers[x] = found = self._climb(x)
        return found

    def _climb(self, x: str) -> bool:
        rec = self.tx.get(self.ns.checkpoint(x))
        if not isinstance(rec, dict):
            return False  # (no record: not on a line of records)
        mine, cur = {x}, rec   # x's own line, as far as walked; the record at its top
        while True:
            at = self._step()
            if at is None:
                return x in self._at
            if at == x:
                return True
            if at in mine:
                return False  # (the lines joined at ``at``, below x: x is beside the line)
            if cur is not None:
                parent = cur.get("p")
                if not isinstance(parent, str) or parent in mine:
                    cur = None  # (x's line ended: the line alone walks on)
                elif parent == self.cid or parent in self._at:
                    return False  # (x descends from cid, or joins the line below x)
                else:
                    mine.add(parent)
                    got = self.tx.get(self.ns.checkpoint(parent))
                    cur = got if isinstance(got, dict) else None

    def made_by(self, x: Any) -> bool:
        if x not in self:
            return False
        i = self._at[x]
        child = self._records[self._ids[i - 1]] if i else self._records[self.cid]
        md = self.saver.codec.loads(child["m"]) if "m" in child else None
        return isinstance(md, dict) and md.get("source") == "loop"

    def close(self) -> None:
        close = getattr(self._walk, "close", None)
        if close is not None:
            close()


class _MadeByStep:
    """``x in made_by_step``: :meth:`_Line.made_by`."""

    def __init__(self, line: _Line) -> None:
        self.line = line

    def __contains__(self, x: Any) -> bool:
        return self.line.made_by(x)


class WalstoreSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpoint saver storing threads in a walstore store.

    ``WalstoreSaver(store)`` uses an open :class:`walstore.Store` (the caller closes it);
    ``WalstoreSaver.from_path(path, **open_kwargs)`` opens one and closes it on
    :meth:`close` / ``with`` / ``async with`` (there in a worker thread, the event loop
    left running while close waits for other threads' work in the store).  Every method has an ``a``-prefixed async twin that runs the
    blocking call (fsync) in a worker thread.

    Options: ``allowed_types`` (classes, or (module, name) pairs, rebuilt besides
    LangGraph's safe types and the application's own data classes; see ``serde.py``);
    ``app_types`` (default True: rebuild the application's own dataclasses, Enums,
    pydantic models and NamedTuples without listing them; False: only listed ones);
    ``serde`` (your own serializer instead; one with ``pickle_fallback`` is refused);
    ``fencing`` (default True, see the module doc); ``deltas`` (store grown lists as
    appended items, default True); ``delta_depth`` (a full copy every that many versions,
    default 128); ``compress`` (zlib for serialized values of 1 KiB or more, default
    True); ``key_prefix`` (bytes, default ``b"lg"``: the saver owns every key starting
    with ``key_prefix + b"\\x00"``); ``txn_meta`` (label each walstore transaction,
    visible in ``walstore log``); ``value_cache_bytes`` (default 32 MiB, 0: none): the
    rebuilt bytes of each channel's newest version, so the next invoke of a thread does
    not walk its delta chain (``blobs.ValueCache``; never a deserialized object);
    ``undo_on_resume`` (default True): a run resuming a thread from its head first
    undoes what the step a killed process was running there committed and nothing
    records, and new input on a head whose step a run of this process left unfinished
    first undoes the finished branches' work LangGraph discards (see the module doc,
    "Resuming after a kill"; each undo is logged at
    WARNING by this module's logger and kept in ``resume_undos``, a deque of
    :class:`ResumeUndo`, the newest 256); False leaves it standing, as before.
    """

    def __init__(self, store: "walstore.Store", *, serde: Any = None, fencing: bool = True,
                 deltas: bool = True, delta_depth: int = DEFAULT_DELTA_DEPTH,
                 key_prefix: bytes = DEFAULT_PREFIX, txn_meta: bool = True,
                 compress: bool = True, allowed_types: Sequence[Any] = (),
                 app_types: bool = True,
                 value_cache_bytes: int = DEFAULT_VALUE_CACHE_BYTES,
                 undo_on_resume: bool = True) -> None:
        # (a path, as SqliteSaver.from_conn_string takes, or None raised a bare
        # AttributeError "'str' object has no attribute 'scan'", where WalstoreStore and
        # WalstoreSession name what to pass — audit 61)
        _check_store(store, "WalstoreSaver")
        if getattr(serde, "pickle_fallback", False):
            raise ValueError("WalstoreSaver refuses a serde with pickle_fallback=True: a store "
                             "must never be able to run code when read")
        if serde is not None and allowed_types:
            raise TypeError("pass allowed_types or serde, not both")
        if serde is None:
            serde = StateSerializer(allowed_types, app_types=app_types)
        super().__init__(serde=serde)
        if not isinstance(key_prefix, (bytes, bytearray)) or not key_prefix:
            raise TypeError("key_prefix must be non-empty bytes")
        self.store = store
        self.fencing = fencing
        self.txn_meta = txn_meta
        self.keys = SaverKeys(bytes(key_prefix))
        _refuse_legacy_layout(store, bytes(key_prefix))
        self.codec = BlobCodec(self.serde, deltas=deltas, delta_depth=delta_depth,
                               compress=compress, value_cache_bytes=value_cache_bytes)
        self._owns_store = False
        if not isinstance(undo_on_resume, bool):
            raise TypeError(f"undo_on_resume must be True or False, not {undo_on_resume!r}")
        self.undo_on_resume = undo_on_resume
        # (the newest undos a run resuming a thread after a restart made: ResumeUndo)
        self.resume_undos: deque[ResumeUndo] = deque(maxlen=_RESUME_UNDOS_KEPT)
        _earlier_open(store)   # (the log's end as this process meets the store: before
        #                        any run of it; see _EarlierOpen)
        _note_saver(self)   # (an undo made on the store cuts off its runs: _watch_undo)

    @classmethod
    def from_path(cls, path: str, *, saver_options: dict | None = None,
                  **open_kwargs: Any) -> "WalstoreSaver":
        """Open (creating) the store at ``path`` and wrap it; ``close()`` closes it."""
        store = walstore.open(path, **open_kwargs)
        try:
            saver = cls(store, **(saver_options or {}))
        except BaseException:
            store.close()
            raise
        saver._owns_store = True
        return saver

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "WalstoreSaver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "WalstoreSaver":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # closed in a worker thread (finished even when cancelled): close() waits for
        # the work other threads still do in the store (an action's body, up to 5 s; a
        # rewind's compensations, up to 30 s), and on the event loop it held the loop
        # meanwhile — a body waiting on a coroutine (an async payments client through
        # run_coroutine_threadsafe) could not finish, and was compensated at the next
        # open with result=None after a 5 s stall (audit 61)
        if self._owns_store:
            await finish_despite_cancel(self.close, run_if_cancelled=True)

    def with_allowlist(self, extra_allowlist: Any) -> "WalstoreSaver":
        """LangGraph's hook (``compile()`` under ``LANGGRAPH_STRICT_MSGPACK=true``): a
        shallow copy whose serializer also rebuilds the graph's schema types."""
        clone = super().with_allowlist(extra_allowlist)
        if clone is not self:
            clone.codec = copy.copy(self.codec)
            clone.codec.serde = clone.serde
        return clone

    # ---- scopes and transactions -------------------------------------------------------
    def thread_scope(self, thread_id: str) -> bytes:
        """The key prefix of everything the thread stores: its walstore scope (pass it as
        ``store.transaction(scope=...)`` to make work done outside a graph node belong to
        the thread, or to ``store.rewind``/``store.purge``)."""
        return self.keys.thread(str(thread_id))

    def _meta(self, op: str, **fields: Any) -> dict | None:
        if not self.txn_meta:
            return None
        return {"langgraph": op, **{k: v for k, v in fields.items() if v is not None}}

    def _transaction(self, meta: Any, scope: bytes | None) -> Any:
        return self.store.transaction(meta=meta, scope=scope)

    def _run(self, fn: Callable[[Any], Any], *, scope: bytes | None = None,
             meta: Any = None, retries: int = _PUT_RETRIES) -> Any:
        """``fn(tx)`` in a transaction (of ``scope``), retried on ConflictError.  A
        StaleCheckpointError is a verdict, not a conflict to retry."""
        for attempt in range(retries + 1):
            tx = self._transaction(meta, scope)
            try:
                with tx:
                    return fn(tx)
            except StaleCheckpointError:
                raise
            except ConflictError:
                if attempt >= retries:
                    raise
                time.sleep(0.001 * (2 ** min(attempt, 6)) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(tx)`` in a transaction that only reads: it sees one consistent snapshot,
        so it ends in a rollback (no commit-time validation, no journal lock) and is tried
        again only when its snapshot became too old to finish."""
        for attempt in range(_READ_RETRIES + 1):
            tx = self._transaction(None, NO_SCOPE)  # (reads: no scope, no step fence)
            try:
                return fn(tx)
            except ConflictError:  # (SnapshotTooOld: history trimmed under a long read)
                if attempt >= _READ_RETRIES:
                    raise
            finally:
                if tx.state == "active":
                    tx.rollback()
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- reading -----------------------------------------------------------------------
    def _pending_writes(self, scan: Callable, ns: Namespace, cid: str) -> list:
        prefix = ns.writes_of(cid)
        rows = []
        for key, row in scan(prefix):
            task_id, idx = self.keys.parse_write(prefix, key)
            channel, type_, data, task_path = row[:4]
            task_id = row[4] if task_id is None else task_id
            rows.append((writes_sort_key(task_path, task_id, idx), task_id, channel,
                         [type_, data]))
        rows.sort(key=lambda r: r[0])
        return [(task_id, channel, self.codec.loads(v)) for _k, task_id, channel, v in rows]

    def _tuple(self, get: Callable, scan: Callable, thread_id: str, ns_name: str,
               ns: Namespace, cid: str, rec: dict, memo: dict, metadata: Any = None,
               **conf_extra: Any) -> CheckpointTuple:
        checkpoint = self.codec.loads(rec["c"])
        checkpoint["id"] = cid
        checkpoint["channel_values"] = self.codec.load_values(
            get, ns, checkpoint.get("channel_versions", {}), memo)
        parent = rec.get("p")
        return CheckpointTuple(
            config=_config(thread_id, ns_name, cid, **conf_extra),
            checkpoint=checkpoint,
            metadata=metadata if metadata is not None else self.codec.loads(rec["m"]),
            parent_config=_config(thread_id, ns_name, parent) if parent else None,
            pending_writes=self._pending_writes(scan, ns, cid),
        )

    def _latest(self, tx: Any, ns: Namespace) -> tuple[str, dict] | None:
        """(id, record) of the namespace's newest checkpoint."""
        prefix = ns.checkpoints()
        row = _first(tx.scan(prefix=prefix, reverse=True))
        if row is None:
            return None
        return row[0][len(prefix):].decode("utf-8"), row[1]

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, ns_name = _where(config)
        cid = _id_text(get_checkpoint_id(config))
        ns = self.keys.at(thread_id, ns_name)
        if self.fencing:
            # (a subgraph's load in a task's node: the attempt of that task, whose
            # config this is, before this load's own token is set)
            calling = _node_attempt(_conf(config)) if ns_name else None
            # names this load (a run's, when LangGraph's loop calls): the run's node
            # transactions carry it, so a put of the run refused for a race undoes them
            _mark(config, RUN_TOKEN + ns_name, f"{time.monotonic():.6f}-{uuid.uuid4().hex}")
            if calling is not None and self.undo_on_resume:
                self._undo_superseded_calls(thread_id, config, ns_name, calling)

        # a run's load of the outermost graph's checkpoint (not get_state's: a run's
        # config carries its Runtime) undoes, when it is the thread's head, what a killed
        # process's step left on it (_undo_on_resume)
        resuming = (self.undo_on_resume and not ns_name
                    and _RUN_KEY in (_conf(config) or {}))
        head: list = []
        fresh: list = []

        def read(tx):
            head.clear()
            fresh.clear()
            if cid:
                found, rec = cid, tx.get(ns.checkpoint(cid))
                if resuming and rec is not None:
                    latest = self._latest(tx, ns)
                    if latest is not None and latest[0] == cid:
                        head.append(cid)
            else:
                latest = self._latest(tx, ns)
                found, rec = latest if latest is not None else (None, None)
                if resuming and rec is not None:
                    head.append(found)
            if rec is None:
                if not cid and self.fencing:
                    _mark(config, READ_EMPTY, ns_name)
                if not cid and resuming:
                    fresh.append(True)   # (no checkpoint: the thread is new, or a kill
                    # came before its first: _undo_on_fresh_start)
                return None
            extra = {EXTENDS_HEAD: None if cid else ns_name} if self.fencing else {}
            if READ_EMPTY in _conf(config):
                extra[READ_EMPTY] = None  # (LangGraph merges this over the stale mark)
            return self._tuple(tx.get, lambda p: tx.scan(prefix=p), thread_id, ns_name, ns,
                               found, rec, {}, **extra)
        got = self._read(read)
        if head:
            # (what it reverts is node transactions: no checkpoint, blob or pending write
            # of the thread, so the tuple read stays what the run resumes from)
            self._undo_on_resume(thread_id, ns, head[0])
            self._note_discardable(ns, head[0], _conf(config).get(RUN_TOKEN))
        elif fresh:
            self._undo_on_fresh_start(thread_id, ns)
        return got

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first (by checkpoint id), filtered by thread, namespace,
        ``filter`` (metadata equality on every given key), ``before`` and ``limit``."""
        conf = _conf(config)
        thread_id = str(conf["thread_id"]) if conf.get("thread_id") is not None else None
        ns_name = conf.get("checkpoint_ns") if config else None
        want_id = _id_text(conf.get("checkpoint_id"))
        before_id = _id_text(get_checkpoint_id(before)) if before else None
        if limit is not None and limit <= 0:
            return
        # The whole listing reads ONE snapshot, a read-only transaction's (rolled back at
        # the end, or when the caller drops the generator): its rows were short scans of
        # the latest state and each checkpoint's values and writes were read latest again,
        # so a writer thread's prune or delete_thread between two listed checkpoints cut
        # the listing short (64 of 100) or listed checkpoints whose channel values were
        # gone (probe-audit55).  A snapshot pins nothing (walstore.engine.snapshot); one
        # a purge or trim overtook raises SnapshotTooOld, as a streamed store.scan does —
        # read again from a fresh snapshot while nothing was yielded (as ``_read`` does:
        # the every-thread listing reads all its ids first), raised once a row was.
        for attempt in range(_READ_RETRIES + 1):
            tx = self._transaction(None, NO_SCOPE)
            yielded = False
            try:
                for tup in self._list(tx, thread_id, ns_name, want_id, before_id, filter,
                                      limit):
                    yielded = True
                    yield tup
                return
            except walstore.SnapshotTooOld:
                if yielded or attempt >= _READ_RETRIES:
                    raise
            finally:
                if tx.state == "active":
                    tx.rollback()

    def _list(self, tx: Any, thread_id: str | None, ns_name: str | None,
              want_id: str | None, before_id: str | None, filter: dict[str, Any] | None,
              limit: int | None) -> Iterator[CheckpointTuple]:
        if thread_id is not None and ns_name is not None:
            ns = self.keys.at(thread_id, ns_name)
            prefix = ns.checkpoints()
            end = ns.checkpoint(before_id) if before_id else prefix_end(prefix)
            candidates = ((thread_id, ns_name, ns, k[len(prefix):].decode("utf-8"), rec)
                          for k, rec in self._scan_batched(prefix, end, reverse=True, src=tx))
        elif thread_id is not None:
            # every namespace of the thread, each read newest first and merged by id: a
            # ``limit`` reads about that many of each (all of the thread's checkpoints
            # were read and sorted: ``list(thread, limit=5)`` beside 12,000 checkpoints
            # took 0.34 s, and an agent listing its last few per turn paid N^2)
            tp = self.keys.thread(thread_id)
            candidates = heapq.merge(*(self._checkpoints_newest_first(tp, ns_part, before_id,
                                                                      tx)
                                       for ns_part in self._ns_parts(tp, tx)),
                                     key=lambda r: r[3], reverse=True)
        else:
            # (every thread's: the namespace filter holds here too — it was ignored, and
            # ``list({"configurable": {"checkpoint_ns": "sub"}})`` gave every namespace)
            rows = (row for tp in self._thread_prefixes(tx)
                    for row in self._checkpoints_of(tp, tx)
                    if not (before_id and row[3] >= before_id)
                    and (ns_name is None or row[1] == ns_name))
            if limit is not None:
                # only the page is held (the ``limit`` newest that pass ``filter``): every
                # checkpoint record of the store was held to sort them, for a page of one
                # (2,000 threads of 3 checkpoints: 7.8 MB); nlargest orders as the sort
                def wanted(row: tuple) -> bool:
                    if want_id and row[3] != want_id:
                        return False
                    return not filter or all(
                        self.codec.loads(row[4]["m"]).get(k) == v for k, v in filter.items())
                found = heapq.nlargest(limit, (r for r in rows if wanted(r)),
                                       key=lambda r: r[3])
            else:
                # the order is made of (id, thread, namespace) alone, each record read
                # again from the snapshot as it is yielded: every record of the store
                # (checkpoint and metadata) was held to sort them, before the first
                # was yielded (300 of 20 KB metadata: 3.8 MB peak for one read, now 0.2 MB)
                order = sorted(((r[3], r[0], r[1], r[2]) for r in rows),
                               key=lambda r: r[0], reverse=True)
                found = ((t, n, ns, cid, tx.get(ns.checkpoint(cid)))
                         for cid, t, n, ns in order)
            candidates = (r for r in found if r[4] is not None)
        memo: dict = {}
        get = tx.get
        scan = lambda p: tx.scan(prefix=p)  # noqa: E731
        for t, n, ns, cid, rec in candidates:
            # (the transaction only reads and is rolled back: the read set it keeps for a
            # commit's validation is never used, and a long listing held a key per blob
            # and a range per checkpoint read)
            tx.read_keys.clear()
            tx.read_ranges.clear()
            if want_id and cid != want_id:
                continue
            metadata = self.codec.loads(rec["m"])
            if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                continue
            tup = self._tuple(get, scan, t, n, ns, cid, rec, memo, metadata)
            # the memo keeps the versions of the checkpoint just read, no older ones: the
            # next (its parent, most often) shares those of the channels its step did not
            # write.  It kept every version the listing had read, so a whole history of a
            # growing ``messages`` list held each step's rebuilt list at once (200
            # checkpoints of one 1 KB message more each: 20 MB, the newest value 0.2 MB;
            # quadratic in the thread's length)
            memo = {k: memo[k] for k in (ns.blob(ch, ver) for ch, ver in
                                         tup.checkpoint.get("channel_versions", {}).items())
                    if k in memo}
            yield tup
            if limit is not None:
                limit -= 1
                if limit <= 0:
                    return

    def _checkpoints_of(self, thread_prefix: bytes, src: Any = None) -> Iterator[tuple]:
        """(thread_id, ns, Namespace, checkpoint_id, record) of every checkpoint of a
        thread, in key order."""
        prefix = self.keys.all_checkpoints(thread_prefix)
        _tp, parsed_thread = self.keys.thread_of(thread_prefix)
        for k, rec in self._scan_batched(prefix, prefix_end(prefix), src=src):
            ns_name, ns_part, cid = self.keys.parse_checkpoint(thread_prefix, k)
            yield (rec.get("t", parsed_thread), rec.get("n", ns_name),
                   Namespace(thread_prefix, ns_part), cid, rec)

    def _ns_parts(self, thread_prefix: bytes, src: Any = None) -> list[bytes]:
        """The namespace parts of the thread's checkpoints, in key order: one short scan
        per namespace (a part is self-delimiting: no other is a prefix of it)."""
        prefix = self.keys.all_checkpoints(thread_prefix)
        start, end = prefix, prefix_end(prefix)
        parts = []
        while True:
            row = _first((self.store if src is None else src).scan(start=start, end=end))
            if row is None:
                return parts
            _ns, ns_part, _cid = self.keys.parse_checkpoint(thread_prefix, row[0])
            parts.append(ns_part)
            start = prefix_end(prefix + ns_part)
            if start is None:
                return parts

    def _checkpoints_newest_first(self, thread_prefix: bytes, ns_part: bytes,
                                  before_id: str | None, src: Any = None) -> Iterator[tuple]:
        """``_checkpoints_of``'s rows of one namespace, newest first (by checkpoint id),
        those before ``before_id`` alone when given."""
        ns = Namespace(thread_prefix, ns_part)
        prefix = ns.checkpoints()
        end = ns.checkpoint(before_id) if before_id else prefix_end(prefix)
        _tp, parsed_thread = self.keys.thread_of(thread_prefix)
        for k, rec in self._scan_batched(prefix, end, reverse=True, src=src):
            ns_name, _part, cid = self.keys.parse_checkpoint(thread_prefix, k)
            yield (rec.get("t", parsed_thread), rec.get("n", ns_name), ns, cid, rec)

    def _thread_prefixes(self, src: Any = None) -> Iterator[bytes]:
        """The prefix of every thread in the store: one short scan per thread."""
        start, end = self.keys.root, prefix_end(self.keys.root)
        while True:
            row = _first((self.store if src is None else src).scan(start=start, end=end))
            if row is None:
                return
            thread_prefix, _thread_id = self.keys.thread_of(row[0])
            yield thread_prefix
            start = prefix_end(thread_prefix)

    def _scan_batched(self, lo: bytes, hi: bytes | None, reverse: bool = False,
                      batch: int = 64, src: Any = None) -> Iterator[tuple[bytes, Any]]:
        """Committed rows lo <= key < hi, read in short scans (no read transaction stays
        open while the caller works on a row), of ``src`` (a transaction: its snapshot;
        default: the store's latest state)."""
        while True:
            rows = []
            it = (self.store if src is None else src).scan(start=lo, end=hi, reverse=reverse)
            try:
                for row in it:
                    rows.append(row)
                    if len(rows) >= batch:
                        break
            finally:
                it.close()
            yield from rows
            if len(rows) < batch:
                return
            if reverse:
                hi = rows[-1][0]
            else:
                lo = rows[-1][0] + b"\x00"

    # ---- DeltaChannel support ------------------------------------------------------------
    def get_delta_channel_history(self, *, config: RunnableConfig,
                                  channels: Sequence[str]) -> Mapping[str, dict]:
        """Writes and seed of each channel along the target's ancestor chain (LangGraph's
        contract, as InMemorySaver answers it), read in one transaction: one reverse
        range read of the namespace's checkpoint records below the target, one range read
        of the writes of the chain, and point reads of the candidate seed blobs."""
        channels = list(channels)
        if not channels:
            return {}
        thread_id, ns_name = _where(config)
        cid = get_checkpoint_id(config)
        ns = self.keys.at(thread_id, ns_name)
        return self._read(lambda tx: self._delta_history(tx, ns, cid, channels))

    def _delta_history(self, tx: Any, ns: Namespace, cid: str | None,
                       channels: list[str]) -> dict:
        empty = {ch: {"writes": []} for ch in channels}
        if cid:
            rec = tx.get(ns.checkpoint(cid))
        else:
            latest = self._latest(tx, ns)
            cid, rec = latest if latest is not None else (None, None)
        if rec is None:
            return empty
        chain, seeds = self._delta_chain(tx, ns, cid, rec, set(channels))
        if not chain:
            return empty
        # writes: one range read spanning the chain's ids, kept when on the chain and
        # not older than the channel's seed checkpoint
        position = {c: i for i, c in enumerate(chain)}      # 0 = parent of the target
        horizon = {ch: seeds[ch][0] if ch in seeds else len(chain) - 1 for ch in channels}
        writes_prefix = ns.writes()
        rows = tx.scan(start=ns.writes_of(min(chain)),
                       end=prefix_end(ns.writes_of(max(chain))))
        per_channel: dict[str, list] = {ch: [] for ch in channels}
        for key, row in rows:
            at = key[len(writes_prefix):].split(b"\x00", 1)[0].decode("utf-8")
            i = position.get(at)
            channel = row[0]
            if i is None or channel not in per_channel or i > horizon[channel]:
                continue
            task_id, idx = self.keys.parse_write(ns.writes_of(at), key)
            task_id = row[4] if task_id is None else task_id
            per_channel[channel].append(((-i,) + tuple(writes_sort_key(row[3], task_id, idx)),
                                         task_id, [row[1], row[2]]))
        out: dict[str, dict] = {}
        for ch in channels:
            found = sorted(per_channel[ch], key=lambda w: w[0])
            entry: dict = {"writes": [(task_id, ch, self.codec.loads(v))
                                      for _k, task_id, v in found]}
            if ch in seeds:
                entry["seed"] = self.codec.loads(seeds[ch][1])
            out[ch] = entry
        return out

    def _delta_chain(self, tx: Any, ns: Namespace, target: str, target_rec: dict,
                     remaining: set[str]) -> tuple[list[str], dict]:
        """The target's ancestors, parent first, up to where every channel in
        ``remaining`` has a stored value (its seed): (chain, {channel: (chain index,
        typed seed)})."""
        chain: list[str] = []
        seeds: dict[str, tuple[int, list]] = {}
        memo: dict = {}
        if not remaining:
            return chain, seeds
        for cid, rec in self._ancestors(tx, ns, target, target_rec):
            chain.append(cid)
            versions = self.codec.loads(rec["c"]).get("channel_versions", {})
            for ch in list(remaining):
                if ch in versions:
                    typed = self.codec.read(tx.get, ns, ch, versions[ch], memo)
                    if typed is not None and typed[0] != "empty":
                        seeds[ch] = (len(chain) - 1, list(typed))
                        remaining.discard(ch)
            if not remaining:
                break
        return chain, seeds

    @staticmethod
    def _ancestors(tx: Any, ns: Namespace, target: str,
                   target_rec: dict) -> Iterator[tuple[str, dict]]:
        """(id, record) of the target's ancestors, parent first.  Records come from one
        reverse scan below the target; a parent whose id sorts above its child (ids from
        another process's clock) is read by key."""
        prefix = ns.checkpoints()
        rows = tx.scan(start=prefix, end=ns.checkpoint(target), reverse=True)
        pending: tuple[str, dict] | None = None
        want = target_rec.get("p")
        seen = {target}
        try:
            while want is not None and want not in seen:
                rec = None
                while True:
                    if pending is None:
                        row = next(rows, None)
                        if row is None:
                            break
                        pending = (row[0][len(prefix):].decode("utf-8"), row[1])
                    if pending[0] > want:
                        pending = None
                        continue
                    if pending[0] == want:
                        rec, pending = pending[1], None
                    break
                if rec is None:
                    rec = tx.get(ns.checkpoint(want))
                    if rec is None:
                        return
                seen.add(want)
                yield want, rec
                want = rec.get("p")
        finally:
            rows.close()

    # ---- writing -----------------------------------------------------------------------
    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        thread_id, ns_name = _where(config)
        conf = _conf(config)
        parent = conf.get("checkpoint_id")
        cid = checkpoint["id"]
        ns = self.keys.at(thread_id, ns_name)
        c = dict(checkpoint)
        values = c.pop("channel_values", {}) or {}
        c.pop("id", None)  # the key holds it
        md = get_checkpoint_metadata(config, metadata)
        record = {"c": self.codec.dumps(c), "m": self.codec.dumps(md), "p": parent}
        self._name_record(record, thread_id, ns_name)
        run_id = md.get("run_id")
        if run_id is not None:
            record["r"] = str(run_id)
        cache_scope = ns.blobs()
        blobs = [(ch, ver, self.codec.plan(cache_scope, ch, ver, values[ch]))
                 for ch, ver in new_versions.items() if ch in values]
        marker = conf.get(READ_EMPTY) if self.fencing else None
        read_empty = marker == ns_name   # found it empty, and has put nothing on it yet
        # a run that found the namespace empty extends the head it made from then on
        extends_head = self.fencing and (
            conf.get(EXTENDS_HEAD) == ns_name
            or (parent is not None and marker in (ns_name, ns_name + _WRITTEN)))
        first_latest: list = []
        cache_updates: list = []
        if not ns_name and parent is not None and md.get("source") == "input":
            self._undo_discarded(thread_id, ns, parent)

        def write(tx):
            # the marks again, after the transaction's snapshot, and fenced against undo
            # of the thread: a rewind marked and committed after the check above conflicts
            # (read before the snapshot, a rewind to the head slipped in between)
            self._cut_off_in(tx, conf, thread_id, ns_name, ns, parent, "a checkpoint built on")
            if self.fencing and parent is not None and tx.get(ns.checkpoint(parent)) is None:
                # (read, so a rewind or delete_thread racing this put makes it conflict)
                self._fence_gone(thread_id, ns_name, parent, extends_head)
            newer = self._newer_than(tx, ns, parent)
            latest = newer[-1][0] if newer else parent
            if not first_latest:
                first_latest.append(latest)
            rivals = [c for c, rec in newer if rec.get("p") == parent and c != cid]
            if parent is None and read_empty:
                # the run found the namespace empty: any checkpoint in it now is a rival's
                rivals = [c for c, _rec in newer if c != cid]
            self._fence(thread_id, ns_name, parent, latest, rivals, first_latest[0],
                        extends_head or read_empty)
            cache_updates.clear()
            for ch, ver, plan in blobs:
                tx.put(ns.blob(ch, ver),
                       self.codec.resolve(tx.get, ns, cache_scope, ch, plan, cache_updates))
            tx.put(ns.checkpoint(cid), record)
            if run_id is not None:
                tx.put(ns.run(str(run_id), cid), b"")
        token = conf.get(RUN_TOKEN + ns_name) if self.fencing else None
        if token is not None:
            # the transactions the nodes of the step that made this checkpoint began (built
            # on its parent): with durability="async" they may commit before the parent's
            # own save, and a rewind to the parent finds them here (_early_work; their
            # meta names the step too, STEP_META, which is what a rewind after a crash
            # finds when the step never got this far)
            registry = _step_txns(self.store)
            with _REMOVALS_LOCK:
                step = list(registry.get((ns.thread_prefix, ns_name, parent, token), ()))
            if step:
                record["s"] = sorted(set(step))
        # (while a rewind or delete of the thread runs in another Python thread, it is
        # waited for: a run that loaded the thread after it began is cut off only once
        # it committed, and its step's work it undid must not be saved as done)
        budget: dict = {}
        _await_removal(self.store, ns.thread_prefix, budget)
        while True:
            try:
                self._refuse_cut_off(conf, thread_id, ns_name, ns, parent,
                                     "a checkpoint built on", undo=False)
                meta = self._meta("put", thread_id=thread_id,
                                  checkpoint_ns=ns_name or None, checkpoint_id=cid)
                if _root_save_in_node(ns_name):   # (no node work: see there)
                    _outside_node(lambda: self._run(write, scope=ns.thread_prefix,
                                                    meta=meta))
                else:
                    self._run(write, scope=ns.thread_prefix, meta=meta)
                break
            except StaleCheckpointError as e:
                if self._removal_failed(e, conf, ns_name, ns, budget):
                    continue
                if e.head is None and token is not None and token in _lost_runs(self.store):
                    self._undo_lost_step(e, ns, token)  # (refused for a lost race)
                elif e.head is None and token is not None:
                    self._undo_cut_off_step(e, ns, token)  # (cut off by a rewind)
                if e.head is not None and token is not None:  # (a rival's race, not a rewind)
                    lost = _lost_runs(self.store)
                    with _REMOVALS_LOCK:
                        lost[token] = None
                        while len(lost) > _LOST_RUNS_MAX:
                            lost.popitem(last=False)
                    # the run's node transactions still open conflict at commit (each read
                    # this key as it began); then those committed are reverted
                    self._run(lambda tx: tx.delete(ns.lost_run(token)),
                              scope=ns.thread_prefix,
                              meta=self._meta("lost_run", thread_id=thread_id,
                                              checkpoint_ns=ns_name or None))
                    self._undo_lost_step(e, ns, token)
                raise
        if token is not None:  # (the step's transactions now belong to a checkpoint)
            registry, saved = _step_txns(self.store), _saved_steps(self.store)
            with _REMOVALS_LOCK:
                key = (ns.thread_prefix, ns_name, parent, token)
                saved.keep(key, (cid, registry.pop(key, None) or {}))
        if not ns_name and parent is not None and md.get("source") in ("input", "update") \
                and self.undo_on_resume:
            self._undo_abandoned(thread_id, ns, parent, cid, token,
                                 checkpoint if md.get("source") == "update" else None)
        if not ns_name and parent is not None and md.get("source") == "fork" \
                and self.undo_on_resume:
            for copied in self._forked_from(ns, parent, checkpoint, cid):
                self._undo_abandoned(thread_id, ns, copied, cid, token)
        if not ns_name and self.undo_on_resume:
            # (saved by this open: no earlier open's work builds on it, and a run loading
            # it as the head has nothing to judge, _undo_on_resume)
            _earlier_open(self.store).judge(ns.thread_prefix, cid)
        self.codec.remember(cache_updates)
        if read_empty and parent is None:
            # the config's next parent-less put (a direct caller reusing it) is not the
            # race any more; LangGraph may be copying this config for the run's next put
            # right now, which is why the mark is changed, never removed
            _mark(config, READ_EMPTY, ns_name + _WRITTEN)
        return _config(thread_id, ns_name, cid)

    @staticmethod
    def _newer_than(tx: Any, ns: Namespace, parent: str | None) -> list[tuple[str, dict]]:
        """(id, record) of the namespace's checkpoints newer than ``parent`` (all of them
        when None), oldest first: normally none or a rival or two, and a small range in
        the transaction's read set, so a concurrent put conflicts."""
        prefix = ns.checkpoints()
        start = ns.checkpoint(parent) + b"\x00" if parent else prefix
        return [(k[len(prefix):].decode("utf-8"), rec)
                for k, rec in tx.scan(start=start, end=prefix_end(prefix))]

    def _fence(self, thread_id: str, ns_name: str, parent: str | None, latest: str | None,
               rivals: list[str], first_latest: str | None, extends_head: bool) -> None:
        """Refuse a put that lost a race: another writer already built on ``parent``
        (``rivals``: its other children).  A run that loaded the thread's latest
        checkpoint extends it, so any rival means it lost; an explicit fork loses only
        when it forked the head and a rival appeared while it was writing."""
        if not self.fencing or not rivals:
            return
        if extends_head or first_latest == parent:
            raise StaleCheckpointError(
                f"thread {thread_id!r} (namespace {ns_name!r}) moved on: this writer built "
                f"on checkpoint {parent!r} but another writer already did "
                f"({', '.join(map(repr, rivals))}); the thread's newest checkpoint is "
                f"{latest!r} (reload the thread and retry, or address the checkpoint "
                f"explicitly to fork from it)",
                thread_id, ns_name, parent, latest)

    def _fence_gone(self, thread_id: str, ns_name: str, parent: str,
                    extends_head: bool, what: str = "a checkpoint built on",
                    rewound: bool = False) -> None:
        """Refuse a put built on a checkpoint the thread no longer has: a ``rewind`` undid
        it or ``delete_thread`` erased it while this run was working.  Writing it would
        bring the undone line back as the thread's head (with a parent that is gone); the
        same for pending writes of such a checkpoint (``put_writes``), which would be
        orphans under the thread's prefix (after a delete: the erased thread's data back
        in the store).  ``rewound``: pending writes of a run that loaded the thread
        before a rewind of it, for a checkpoint the rewind kept."""
        if rewound:
            raise StaleCheckpointError(
                f"thread {thread_id!r} (namespace {ns_name!r}) was rewound or deleted while "
                f"this run worked: its step on checkpoint {parent!r} was undone, so {what} it "
                f"{'were' if what.startswith('pending') else 'was'} refused and nothing "
                f"was written (reload the thread and retry)",
                thread_id, ns_name, parent, None)
        raise StaleCheckpointError(
            f"thread {thread_id!r} (namespace {ns_name!r}) no longer has checkpoint "
            f"{parent!r}: a rewind undid it or the thread was deleted while this run "
            f"worked, so {what} it {'were' if what.startswith('pending') else 'was'} "
            f"refused and nothing was written (reload the thread and retry)",
            thread_id, ns_name, parent, None)

    def _refuse_cut_off(self, conf: Mapping, thread_id: str, ns_name: str, ns: Namespace,
                        cid: str | None, what: str, undo: bool = True) -> None:
        """Refuse (StaleCheckpointError) a save or node transaction of a run that is cut
        off: it loaded the thread before a rewind or delete of it began in this process
        (whatever checkpoint the rewind kept: one to the very checkpoint the run's step
        builds on undid that step and compensated its bookings, and the run's next
        checkpoint then brought the step back as done), or one of its puts lost a race to
        a rival.  ``undo``: a lost run's node transactions noted so far are reverted first
        (its later steps too, as the first refusal's were); without it the caller does
        that (a refusal inside a transaction, or as a node transaction begins)."""
        why = self._cut_off(conf, ns_name, ns)
        if why == "removed":
            self._fence_gone(thread_id, ns_name, str(cid), True, what, rewound=True)
        if why == "lost":
            error = StaleCheckpointError(
                f"thread {thread_id!r} (namespace {ns_name!r}): this run lost a race to "
                f"another writer of the thread at an earlier step, so {what} checkpoint "
                f"{cid!r} {'were' if what.startswith('pending') else 'was'} refused and "
                f"nothing was written (reload the thread and retry)",
                thread_id, ns_name, cid, None)
            if undo:
                self._undo_lost_step(error, ns, conf.get(RUN_TOKEN + ns_name))
            raise error

    def _cut_off(self, conf: Mapping, ns_name: str, ns: Namespace) -> str | None:
        """Why the run ``conf`` names is cut off: "removed" (it loaded the thread before a
        rewind or delete of it began in this process: ``saver.rewind``, ``delete_thread``,
        or a ``store.rewind``/``store.purge`` reaching the thread, ``_watch_undo``),
        "lost" (it lost a race), or None."""
        if not self.fencing:
            return None
        token = conf.get(RUN_TOKEN + ns_name)
        if token is None:
            return None
        loaded = _loaded_at(token)
        if loaded is not None:
            rewound = _mark_of(self.store, "rewinds", ns.thread_prefix)
            if rewound is not None and loaded < rewound:
                return "removed"
        if token in _lost_runs(self.store):
            return "lost"
        return None

    def _cut_off_in(self, tx: Any, conf: Mapping, thread_id: str, ns_name: str,
                    ns: Namespace, cid: str | None, what: str) -> None:
        """Inside a save's transaction: fenced against undo of the thread (a rewind or
        delete committed after its snapshot conflicts, and the retry looks again), its
        snapshot taken, then ``_refuse_cut_off`` (nothing reverted here: the caller
        does that)."""
        if not self.fencing:
            return
        add_undo_fence(tx, ns.thread_prefix)
        _ = tx.snapshot
        self._refuse_cut_off(conf, thread_id, ns_name, ns, cid, what, undo=False)

    def _revert_into(self, run: Any, txid: int, prefix: bytes, meta: dict) -> None:
        """Revert ``txid`` (a refused run's node transaction) in the thread's scope, outside
        any graph node (``_outside_node``: made from a subgraph's save, in its parent
        node's context, it was refused as a node transaction of the refused run), and
        note it in ``run.undone`` (None from the revert: undone already, by another), or
        in ``run.left`` with why when it cannot be (a rival changed its keys since)."""
        try:
            if _outside_node(lambda: self.store.revert(txid, scope=prefix,
                                                       meta=meta)) is not None:
                run.undone.append(txid)
        except RevertConflict as e:
            if not self._undone_already(txid, e):
                run.left.append(f"{txid} ({type_and_message(e)})")
        except WalstoreError as e:
            run.left.append(f"{txid} ({type_and_message(e)})")

    def _undo_lost_step(self, error: StaleCheckpointError, ns: Namespace,
                        token: str) -> None:
        """Revert, newest first, the transactions the refused run's nodes committed, in
        every step of it noted so far (the step built on the put's parent, and those it
        ran ahead: ``durability="async"`` saves in the background, ``"exit"`` only at the
        end, so a loser's later steps ran too): those steps never happened, so what they
        wrote is undone and their actions compensated (``store.revert``).  Each is
        reverted once (the registry forgets it).  The error's message says what was
        undone, and what could not be (a rival changed the same keys since: reverting it
        would undo the rival's work too).  Refusals of one run at the same time take
        turns (``_LostRunUndo``): each returns once the undo is done, and tells all of
        it."""
        registry = _step_txns(self.store)
        run = _lost_run_undo(self.store, (ns.thread_prefix, error.checkpoint_ns, token))
        with run.lock:
            txids: list[int] = []
            with _REMOVALS_LOCK:
                for key in [k for k in registry if k[0] == ns.thread_prefix
                            and k[1] == error.checkpoint_ns and k[3] == token]:
                    txids += registry.pop(key)
            for txid in sorted(set(txids), reverse=True):
                try:
                    self.store.txn_info(txid)
                except (KeyError, WalstoreError):
                    continue  # (never committed: its actions, if any, were compensated)
                self._revert_into(run, txid, ns.thread_prefix, self._meta(
                    "undo_lost_step", thread_id=error.thread_id,
                    checkpoint_id=error.parent, txid=txid))
            undone, left = sorted(run.undone, reverse=True), list(run.left)
        if undone:
            error.args = (error.args[0] + f"; the transactions this run's nodes committed "
                          f"(txids {', '.join(map(str, undone))}) were "
                          f"reverted and their actions compensated",) + error.args[1:]
        if left:
            error.args = (error.args[0] + f"; NOT undone (revert them by hand, or undo "
                          f"what they did outside): {'; '.join(left)}",) + error.args[1:]

    def _undo_cut_off_step(self, error: StaleCheckpointError, ns: Namespace,
                           token: str) -> None:
        """A save of a run cut off by a rewind of its thread (``saver.rewind``, a
        ``store.rewind`` reaching it: ``_UNDOS``; not a purge or ``delete_thread``, which
        compensate nothing) was refused: the run will save nothing more, so what its
        nodes committed that no checkpoint or pending write of the thread records now is
        reverted, newest first, with its compensations (``store.revert``), as a lost
        run's are (``_undo_lost_step``).  A ``store.rewind`` to a point after a booking
        of the run leaves it (it is after the point), while the run's checkpoint of that
        step was never saved (or the rewind took it back): before, the booking stood
        with no checkpoint saying so, and resuming the thread booked again.  Each
        transaction the run's nodes began (``_step_txns``, and ``_saved_steps`` for the
        steps it saved; never an undo's own, ``undo_work``) is judged in the run's
        outermost graph (a subgraph's node transaction by its parent's task, which a
        resume runs again whole): kept when a checkpoint the run saved on or after its
        step still exists, or its task's pending writes on the checkpoint its step built
        on do (LangGraph takes the task as done); skipped when it never committed or an
        undo took it back already (the rewind itself, when it came after the rewind's
        point).  The error's message says what was reverted, and what could not be."""
        loaded = _loaded_at(token)
        rewound = _mark_of(self.store, "undos", ns.thread_prefix)
        if loaded is None or rewound is None or not loaded < rewound:
            return
        erased = _mark_of(self.store, "erases", ns.thread_prefix)
        if erased is not None and loaded < erased:
            return   # (erased since it loaded: a purge compensates nothing, _ERASES)
        prefix, ns_name = ns.thread_prefix, error.checkpoint_ns
        run = _lost_run_undo(self.store, (prefix, ns_name, token))
        with run.lock:
            work: dict[int, tuple] = {}
            runs: dict[tuple, list[str]] = {}   # (ns, token) -> checkpoints it saved
            registry, saved = _step_txns(self.store), _saved_steps(self.store)
            with _REMOVALS_LOCK:
                for key, txns in registry.items():
                    if key[0] == prefix and key[1] == ns_name and key[3] == token:
                        work.update(txns)
                for key, (cid, txns) in saved.items():
                    if key[0] == prefix:
                        runs.setdefault((key[1], key[3]), []).append(cid)
                        if key[1] == ns_name and key[3] == token:
                            work.update(txns)
            heads: dict[tuple, str | None] = {}
            written: dict[tuple, set[str]] = {}
            for txid in sorted(work, reverse=True):
                # (judged where the run's outermost graph ran it: a subgraph's node
                # transaction is its parent task's work, and resuming the thread runs
                # that task, the subgraph's saved steps included, again)
                if txid in run.done or not work[txid] or self._step_recorded(
                        error.thread_id, min(work[txid], key=lambda lv: len(lv[0])),
                        runs, heads, written):
                    continue
                run.done.add(txid)
                try:
                    info = self.store.txn_info(txid)
                except (KeyError, WalstoreError):
                    continue  # (never committed: its actions, if any, were compensated)
                if info.extra.get("undone_by"):
                    continue  # (undone already: by the rewind, or another undo)
                self._revert_into(run, txid, prefix, self._meta(
                    "undo_cut_off_step", thread_id=error.thread_id,
                    checkpoint_id=error.parent, txid=txid))
            undone, left = sorted(run.undone, reverse=True), list(run.left)
        if undone:
            error.args = (error.args[0] + f"; the transactions this run's nodes committed "
                          f"that no checkpoint of the thread records now (txids "
                          f"{', '.join(map(str, undone))}) were reverted and their "
                          f"actions compensated",) + error.args[1:]
        if left:
            error.args = (error.args[0] + f"; NOT undone (revert them by hand, or undo "
                          f"what they did outside): {'; '.join(left)}",) + error.args[1:]

    def _undo_on_resume(self, thread_id: str, ns: Namespace, head: str) -> None:
        """A run of the thread loaded ``head``, the outermost graph's newest checkpoint,
        to resume from it: first revert, newest first, with their compensations
        (``store.revert``), the node transactions an earlier open of the store committed
        in the step built on it -- or in a step after it whose checkpoint was never saved
        (``durability="async"`` and ``"exit"`` save behind the steps) -- that the thread
        records nowhere (``_step_recorded``, as ``_undo_cut_off_step`` judges: judged
        at the outermost graph, kept when their task's outcome was saved on ``head``
        after they committed).  That step was cut off by the end of the process that ran
        it (a kill): LangGraph runs it again from ``head``, so what it did must not
        stand twice.  The work of this process is never touched (``_EarlierOpen``: one
        writer process per store), nor is anything on a read-only store; a head is judged
        once per store object (two runs resuming it at once: the second waits for the
        first's undo, then finds it judged); one undone already (a rewind, a revert,
        the undo of a resume killed midway) is passed over, and a compensation a kill cut
        short is finished by the next open's recovery.  The undo is logged (WARNING) and
        kept in ``resume_undos``; a head saved by this open costs one lookup."""
        store = self.store
        if store.readonly:
            return   # (nothing is written from a read-only store: the writer's run undoes)
        earlier = _earlier_open(store)
        prefix = ns.thread_prefix
        if earlier.open_lsn < 0 or earlier.is_judged(prefix, head):
            return
        # (a head this open saved is judged as it is saved, put: this lookup, which waits
        # for the store to apply what it has committed, is for the others)
        newest = store.history(ns.checkpoint(head), limit=1)
        if not newest or newest[0].deleted or int(newest[0].lsn) > earlier.open_lsn:
            earlier.judge(prefix, head)   # (saved by this open: nothing earlier on it)
            return
        run, kept = _LostRunUndo(), []
        gate = earlier.gate(prefix)   # (held while it is used: _EarlierOpen.gate)
        try:
            with gate.lock:
                if earlier.is_judged(prefix, head):
                    return
                self._judge_leftovers(thread_id, ns, head, earlier, run, kept)
                earlier.judge(prefix, head)
                if kept:   # (undone after all if new input discards their outcomes)
                    with earlier.lock:
                        earlier.kept[(prefix, head)] = list(kept)
                        while len(earlier.kept) > _MARKS_MAX:
                            earlier.kept.popitem(last=False)
        finally:   # (what was undone is told, whatever stopped the rest)
            if run.undone:
                for saver in _savers_of(store):
                    saver.codec.forget(prefix)
            if run.undone or run.left or kept:
                self._tell_resume_undo(ResumeUndo(
                    thread_id, head, tuple(sorted(run.undone, reverse=True)),
                    tuple(sorted(kept, reverse=True)), tuple(run.left)))

    def _undo_discarded(self, thread_id: str, ns: Namespace, parent: str) -> None:
        """New input is saved on ``parent`` (a checkpoint of source "input"): LangGraph
        discards the pending writes of ``parent``'s tasks and runs the graph from the
        input, so the killed process's work that ``_undo_on_resume`` kept on that head
        because its task's (or a caller's) regular outcome was saved there is recorded
        nowhere any more: revert it now, with its compensations.  (Before, a parallel
        branch that finished before the kill kept its booking while the run from new
        input booked it again.)"""
        earlier = _earlier_open(self.store)
        with earlier.lock:
            kept = earlier.kept.pop((ns.thread_prefix, parent), None)
        if not kept:
            return
        # (only what was kept for a regular outcome, its task's or a caller's: a task
        # kept for its interrupt or error LangGraph runs again from its start anyway, as
        # in the process that ran it -- a booking before interrupt() is made again)
        done = self._tasks_done(ns, parent)
        with earlier.index_lock:
            work = earlier.index(self.keys.root).work.get(ns.thread_prefix, {})
            chains = {txid: work[txid][2] for txid in kept if txid in work}
        kept = [txid for txid in kept if done.intersection(chains.get(txid, ()))]
        if not kept:
            return
        run = _LostRunUndo()
        for txid in sorted(kept, reverse=True):
            self._revert_into(run, txid, ns.thread_prefix, self._meta(
                "undo_on_resume", thread_id=thread_id, checkpoint_id=parent, txid=txid))
        for saver in _savers_of(self.store):
            saver.codec.forget(ns.thread_prefix)
        self._tell_resume_undo(ResumeUndo(
            thread_id, parent, tuple(sorted(run.undone, reverse=True)), (),
            tuple(run.left), discarded=True))

    def _undo_abandoned(self, thread_id: str, ns: Namespace, parent: str, cid: str,
                        token: str | None, update: Checkpoint | None = None) -> None:
        """The input checkpoint ``cid`` of a run given new input was saved on ``parent``,
        whose step a run of THIS process began and left unfinished -- a task failed, or
        stopped at an ``interrupt()``, while a sibling finished -- so no checkpoint was
        built on ``parent`` (it is still the thread's head: the check below).  A plain
        resume (``invoke(None)``, ``Command(resume=...)``) reads the finished tasks'
        saved outcomes back and never runs them again; new input makes LangGraph discard
        them and run the graph from the input, the finished tasks again too.  So the node
        transactions of such a step (``_step_txns``: begun in a node of a run whose token
        is not this run's, on ``parent``) whose work the thread recorded -- their task's
        or a caller's regular outcome on ``parent``, or a checkpoint that run saved after
        them in a subgraph, at any level (``_step_recorded``) -- are reverted now, newest
        first, with their compensations -- and so is work nothing recorded of a task
        that failed (its error saved, or cut short by a sibling's with no outcome), as a
        plain resume re-running it does (``_undo_rerun``); an interrupted task's is
        left (LangGraph runs it again on the answer: book after ``interrupt()``).
        (Before, stop 79 left it alone: a finished branch's booking stood beside the one
        its run from the new input made, the state recording one.)  Done after the input
        checkpoint committed, so a put refused for a race discards nothing -- and, when
        the step ended in an error or an interrupt (no run builds on ``parent`` from it
        any more), before that, at the new run's first node transaction
        (``_discard_early``); an undo already made (a rewind, a revert, the early one)
        is passed over.  A thread related by
        ``copy_thread`` (``_kin``) holds the same step: its runs' work on ``parent`` is
        judged too (reverted in its own thread's scope), and nothing is reverted while
        one of them still records ``parent``'s outcomes (``_kin_records``: its resume
        returns them as done).

        ``update``: ``cid`` is instead ``graph.update_state``'s checkpoint on
        ``parent`` (source "update"), which drops ``parent``'s saved outcomes too --
        the update is applied as ``as_node``'s alone, and without ``as_node`` LangGraph
        takes it for ``__start__``'s and runs the branches again -- unless it is
        ``update_state(config, None, as_node=END)``, which applies them
        (``_update_applies``): that one records the work, and nothing is reverted.
        (Before, such an update left the first booking standing with nothing
        recording it, or beside the branch's new one.)"""
        prefix = ns.thread_prefix
        kin = self._kin(prefix)
        registry, saved = _step_txns(self.store), _saved_steps(self.store)
        work: dict[int, tuple] = {}
        homes: dict[int, bytes] = {}   # txid -> the thread whose run committed it
        tokens: dict[int, Any] = {}   # txid -> the token of the run that committed it
        runs: dict[tuple, list[str]] = {}
        with _REMOVALS_LOCK:
            for key, txns in registry.items():
                if key[0] in kin and key[1] == "" and key[2] == parent \
                        and key[3] != token:
                    work.update(txns)
                    homes.update(dict.fromkeys(txns, key[0]))
                    tokens.update(dict.fromkeys(txns, key[3]))
            if not work:
                return
            for key, (saved_cid, _txns) in saved.items():
                if key[0] in kin:
                    runs.setdefault((key[1], key[3]), []).append(saved_cid)
        # (the step built on ``parent`` never ended in a checkpoint: a checkpoint other
        # than this run's with ``parent`` as its parent means a run, a resume of the
        # interrupt say, read those outcomes back and recorded them further on)
        checkpoints = ns.checkpoints()
        for key, rec in self.store.scan(start=ns.checkpoint(parent) + b"\x00",
                                        end=prefix_end(checkpoints)):
            if isinstance(rec, dict) and rec.get("p") == parent and \
                    key[len(checkpoints):].decode("utf-8", "replace") != cid:
                return
        if self._kin_records(kin - {prefix}, parent):
            return
        if update is not None and self._update_applies(ns, parent, update):
            return
        heads: dict[tuple, str | None] = {}
        written: dict[tuple, set[str]] = {}
        run = _LostRunUndo()
        outcomes: dict[str, set[int]] | None = None
        interrupt, error = (WRITES_IDX_MAP.get("__interrupt__"),
                            WRITES_IDX_MAP.get("__error__"))
        for txid in sorted(work, reverse=True):
            levels = work[txid]
            if not levels:
                continue   # (an undo's own work)
            if not any(self._step_recorded(thread_id, level, runs, heads, written)
                       for level in levels):
                # (work nothing records: a failed task's -- its error saved, or cut short
                # by a sibling's with no outcome -- goes too, as when a resume runs that
                # task again, _undo_rerun; an interrupted task's stays, LangGraph's
                # documented semantics: book after interrupt())
                outer = min(levels, key=lambda lv: len(lv[0]))
                if not outer[3]:
                    continue
                if outcomes is None:
                    outcomes = self._task_outcomes(ns, parent)
                mine = outcomes.get(outer[3][-1], ())
                if (interrupt in mine and not (
                        error in mine and txid in _newest_run(work, tokens, outer[3][-1])
                        and self._failed_after_interrupt(ns, parent, outer[3][-1]))) \
                        or not _ended(outcomes):
                    continue   # (interrupted -- but a task that got past its
                    # interrupt() on an answer and then raised failed: its newest run's
                    # work goes, h3 stop 80 --; or a step still going: a run in flight,
                    # which loses the head now and undoes its own work, _undo_lost_step)
            try:
                info = self.store.txn_info(txid)
            except (KeyError, WalstoreError):
                continue   # (never committed: its actions, if any, were compensated)
            if info.extra.get("undone_by"):
                continue   # (undone already: a rewind, a revert)
            self._revert_into(run, txid, homes[txid], self._meta(
                "undo_abandoned", thread_id=thread_id, checkpoint_id=parent, txid=txid))
        if run.undone:
            for saver in _savers_of(self.store):
                for home in set(homes.values()):
                    saver.codec.forget(home)
        if run.undone or run.left:
            self._tell_resume_undo(ResumeUndo(
                thread_id, parent, tuple(sorted(run.undone, reverse=True)), (),
                tuple(run.left), discarded=True))

    def _undo_superseded(self, thread_id: str, conf: Mapping,
                         checkpoint_map: Mapping) -> None:
        """A node transaction begins in a later attempt of its node (LangGraph's
        ``RetryPolicy`` ran the node again after an attempt raised: ``node_attempt`` 2,
        3...): first revert, newest first, with their compensations, the transactions the
        node's earlier attempts in the same run and step committed (``_attempts``), once.
        LangGraph drops a failed attempt's writes and runs the node from its start, so
        what that attempt did through walstore is recorded nowhere, and the retry does it
        again (before, stop 80: a booking made before the attempt raised stood beside
        the retry's, the state recording one).  Made before this transaction reads, so a
        node that books only when its key says it has not books anew rather than keeping
        a booking the undo then refunds; every transaction of the later attempt waits
        for it (the task's ``undoing`` lock: a ToolNode's tools run in parallel).  Not
        made on an event loop's thread (an async
        node's own code; a compensator may need the loop), where the earlier attempts'
        work stands: run walstore work in ``asyncio.to_thread``.  Told like a resume's
        undo (``ResumeUndo.superseded``)."""
        task_ns = conf.get("checkpoint_ns")
        attempt = _node_attempt(conf) if isinstance(task_ns, str) and task_ns else None
        if attempt is None or attempt[1] <= 1:
            return
        prefix = self.thread_scope(thread_id)
        self._undo_superseded_task(thread_id, prefix, (prefix, task_ns, attempt[0]),
                                   attempt[1], checkpoint_map)

    def _undo_superseded_task(self, thread_id: str, prefix: bytes, key: tuple,
                              attempt: int, checkpoint_map: Mapping) -> None:
        """``_undo_superseded_of`` for task ``key`` (an ``_AttemptTxns`` key) at
        ``attempt``, under the task's ``undoing`` lock."""
        attempts = _attempts(self.store)
        with _REMOVALS_LOCK:
            task = attempts.task(key)
            if task.undoing is None:
                task.undoing = threading.RLock()
        # (every transaction of the later attempt waits for the undo, not the first
        # alone: a ToolNode's tools run in parallel, and one that books only when its key
        # says it has not, begun while another's undo ran, found the earlier attempt's
        # key, kept its booking, and the undo then cancelled it -- the state recording a
        # cancelled booking, h2)
        with task.undoing:
            self._undo_superseded_of(thread_id, prefix, attempts, key, attempt,
                                     checkpoint_map)

    def _undo_superseded_of(self, thread_id: str, prefix: bytes, attempts: "_AttemptTxns",
                            key: tuple, attempt: int, checkpoint_map: Mapping) -> None:
        """``_undo_superseded``'s work, under the task's ``undoing`` lock."""
        with _REMOVALS_LOCK:
            earlier = attempts.take(key, attempt)
        if not earlier:
            return
        step = checkpoint_map.get("") if isinstance(checkpoint_map.get(""), str) else None
        # (one never committed was rolled back, its actions compensated -- or is still
        # open in a worker thread, refused at its commit: _refuse_superseded)
        self._revert_work(thread_id, prefix, step, earlier, "undo_superseded",
                          superseded=True)

    def _undo_superseded_calls(self, thread_id: str, config: RunnableConfig, ns_name: str,
                               calling: tuple[tuple, int]) -> None:
        """A run loads subgraph namespace ``ns_name`` in a task's node (its graph's
        ``get_tuple``; ``config`` the task's, ``calling`` its ``_node_attempt``): note
        the load's token under that task and attempt, so that its inner nodes'
        transactions count as the task's work (``_note_step_txn``); and when it is a
        later attempt (LangGraph's ``RetryPolicy`` runs a subgraph node again in a new
        namespace, ``...|1``, from its start), first revert what the task's earlier
        attempts committed, their inner nodes' work included, as ``_undo_superseded``
        does for a node's own transactions.  (Before, stop 81: a subgraph node retried
        whole kept its first attempt's inner bookings beside the retry's, the state
        recording one.)  A retry's load is noted for the step (``_retried_calls``): a
        later run's first load of the task's subgraph in the same step abandons it
        (``_undo_abandoned_calls``)."""
        conf = _conf(config)
        info = getattr(conf.get(_RUN_KEY), "execution_info", None)
        task_ns = getattr(info, "checkpoint_ns", None)
        token = conf.get(RUN_TOKEN + ns_name)
        if not isinstance(task_ns, str) or not task_ns or token is None \
                or not (ns_name == task_ns or ns_name.startswith(task_ns + "|")):
            return
        prefix = self.thread_scope(thread_id)
        key = (prefix, task_ns, calling[0])
        loads = _subgraph_loads(self.store)
        with _REMOVALS_LOCK:
            loads[str(token)] = (key, calling[1])
            loads.move_to_end(str(token))
            while len(loads) > _STEP_TXNS_MAX:
                loads.popitem(last=False)
        checkpoint_map = conf.get("checkpoint_map")
        checkpoint_map = checkpoint_map if isinstance(checkpoint_map, Mapping) else {}
        step = checkpoint_map.get("")
        if isinstance(step, str):
            retried = _retried_calls(self.store)
            with _REMOVALS_LOCK:
                if ns_name != task_ns and calling[1] > 1:   # (``<task ns>|N``: a
                    # retry's load in this run; a node that runs its subgraph twice in
                    # one attempt loads ``|1`` too, and is no retry)
                    runs = retried.setdefault((prefix, task_ns, step), {})
                    runs.setdefault(key, []).append((ns_name, str(token)))
                    retried.move_to_end((prefix, task_ns, step))
                    while len(retried) > _STEP_TXNS_MAX:
                        retried.popitem(last=False)
                    earlier = {}
                elif ns_name != task_ns:
                    earlier = {}
                else:
                    runs = retried.get((prefix, task_ns, step)) or {}
                    earlier = {k: v for k, v in runs.items() if k != key}
                    for k in earlier:
                        del runs[k]
                # (two runs resuming the thread at once: one takes the undo, the other
                # waits for it to end -- before (h2, stop 81), it ran on at once, and
                # its idempotent inner node read the key of a booking the undo was about
                # to cancel, recording it: refunded while the state recorded it)
                abandoning = _ABANDONING.get(self.store)
                if abandoning is None:
                    abandoning = _ABANDONING[self.store] = {}
                undoing, waiting = None, None
                if earlier:
                    undoing = abandoning[(prefix, task_ns, step)] = threading.Lock()
                    undoing.acquire()
                elif ns_name == task_ns:
                    waiting = abandoning.get((prefix, task_ns, step))
            if undoing is not None:
                try:
                    self._undo_abandoned_calls(thread_id, prefix, step, earlier)
                finally:
                    with _REMOVALS_LOCK:
                        if abandoning.get((prefix, task_ns, step)) is undoing:
                            del abandoning[(prefix, task_ns, step)]
                    undoing.release()
            elif waiting is not None:
                with waiting:
                    pass
        if calling[1] > 1:
            self._undo_superseded_task(thread_id, prefix, key, calling[1], checkpoint_map)

    def _undo_abandoned_calls(self, thread_id: str, prefix: bytes, step: str,
                              earlier: Mapping[tuple, list]) -> None:
        """A run loads a task's subgraph anew (its first load, ``<task ns>``) in the step
        built on ``step``, where an earlier run of the thread ran it again for a
        ``RetryPolicy`` (``earlier``: that run's ``_AttemptTxns`` key -> its loads of
        ``<task ns>|N``) and stopped, at an ``interrupt()`` inside it: LangGraph runs the
        subgraph from its start again and never resumes ``<task ns>|N``, so what the
        inner nodes did there is recorded nowhere and done again -- reverted now, newest
        first, with its compensations, before the subgraph runs.  Left: the work of an
        inner task whose outcome there is its interrupt (LangGraph's documented
        semantics: it runs again from its start on the answer, book after
        ``interrupt()``).  (Before, stop 81: the retried attempt's bookings stood beside
        the resumed run's, the state recording one of each.)"""
        attempts, registry = _attempts(self.store), _step_txns(self.store)
        chosen: list[int] = []
        for key, loads in earlier.items():
            with _REMOVALS_LOCK:
                txids = set(attempts.take(key, 1 << 30))
                levels_of: dict[int, tuple] = {}
                for rkey, txns in registry.items():
                    if rkey[0] == prefix and (rkey[1], str(rkey[3])) in loads:
                        levels_of.update((t, lv) for t, lv in txns.items() if t in txids)
            for txid in sorted(txids, reverse=True):
                inner = [lv for lv in levels_of.get(txid, ()) if lv[0]]
                if inner:
                    ns_name, cid, _token, chain = max(inner, key=lambda lv: len(lv[0]))
                    ns = self.keys.at(thread_id, ns_name)
                    if chain and WRITES_IDX_MAP.get("__interrupt__") in \
                            self._task_outcomes(ns, cid).get(chain[-1], set()):
                        continue   # (stopped at its interrupt(): left)
                chosen.append(txid)
        if chosen:
            self._revert_work(thread_id, prefix, step, sorted(chosen, reverse=True),
                              "undo_abandoned_retry", superseded=True)

    def _revert_work(self, thread_id: str, prefix: bytes, checkpoint_id: str | None,
                     txids: Sequence[int], why: str, **kind: bool) -> None:
        """Revert node transactions ``txids`` of thread ``prefix``, in that order (newest
        first), with their compensations, each in the thread's scope outside any node
        (``_revert_into``, meta naming ``why``), passing over one that never committed
        (rolled back: its actions compensated) or was undone already (a rewind, a
        revert, an earlier undo); then tell it (``ResumeUndo`` with ``kind``'s flag,
        ``checkpoint_id``) when anything was reverted or left."""
        run = _LostRunUndo()
        for txid in txids:
            try:
                info = self.store.txn_info(txid)
            except (KeyError, WalstoreError):
                continue
            if info.extra.get("undone_by"):
                continue
            self._revert_into(run, txid, prefix, self._meta(
                why, thread_id=thread_id, checkpoint_id=checkpoint_id, txid=txid))
        if run.undone:
            for saver in _savers_of(self.store):
                saver.codec.forget(prefix)
        if run.undone or run.left:
            self._tell_resume_undo(ResumeUndo(
                thread_id, checkpoint_id, tuple(sorted(run.undone, reverse=True)), (),
                tuple(run.left), **kind))

    def _note_discardable(self, ns: Namespace, head: str, token: Any) -> None:
        """A run (load ``token``) loaded ``head``, the outermost graph's newest checkpoint:
        when a step built on it was left unfinished with work its new input would
        discard -- kept by a resume after a kill (``_EarlierOpen.kept``), or begun by
        another run of this process (``_step_txns``) --, note the run, so that its first
        node transaction, should it run from new input, first undoes that work
        (``_discard_early``): LangGraph saves the input checkpoint in the background
        while the first step's tasks run, so the undo at that save (``_undo_discarded``,
        ``_undo_abandoned``) could come after a task re-run from the input had read the
        work it undoes (a node that books only when its key says it has not: it found
        the first booking, kept it, and the undo then refunded it).  One scan of the
        in-flight registry a load that finds an earlier open's or another run's work."""
        if token is None or not self.fencing:
            return
        prefix = ns.thread_prefix
        earlier = _earlier_open(self.store)
        with earlier.lock:
            found = (prefix, head) in earlier.kept
        registry, discards = _step_txns(self.store), _discards(self.store)
        with _REMOVALS_LOCK:
            found = found or any(k[0] == prefix and k[1] == "" and k[2] == head
                                 and k[3] != token for k in registry)
            if found:
                discards[str(token)] = _Discard(head)
                while len(discards) > _LOST_RUNS_MAX:
                    discards.popitem(last=False)

    def _discard_early(self, thread_id: str, conf: Mapping,
                       checkpoint_map: Mapping) -> None:
        """A node transaction of a run begins (``_fence_node_transaction``, before its
        snapshot) and the run loaded a head with work to undo (``_note_discardable``):
        - its step builds on the head itself (a plain resume): the task it is work of
          runs again, and what the task's failed run committed is reverted first, once
          per task (``_undo_rerun``);
        - its step builds on an input checkpoint LangGraph made on the head for new
          input (its ``source``, once saved: ``_checkpoint_source``): what a killed
          process's resume kept (``_undo_discarded``) and what another run of this
          process recorded on the head, whose step ended in an error or an
          ``interrupt()`` (``_undo_abandoned``), is reverted first, once per run (a run
          still working on the head is not judged here; the input checkpoint's save
          judges it once it won the head).
        The run's other transactions wait until the undo is made (``_Discard``)."""
        token = conf.get(RUN_TOKEN)
        step = checkpoint_map.get("")
        if token is None or not isinstance(step, str):
            return
        discards = _discards(self.store)
        with _REMOVALS_LOCK:
            entry = discards.get(str(token))
        if entry is None:
            return
        head = entry.head
        ns = self.keys.at(thread_id, "")
        if step == head:
            # (a plain resume: the task this transaction is work of runs again; its
            # other transactions -- a ToolNode's parallel tools -- wait for the undo)
            task_ns = conf.get("checkpoint_ns")
            chain = _task_chain(task_ns, "", checkpoint_map) \
                if isinstance(task_ns, str) else ()
            if not chain:
                return
            with entry.gate:
                done = entry.reruns.get(chain[-1])
                mine = done is None
                if mine:
                    done = entry.reruns[chain[-1]] = threading.Event()
            if not mine:
                done.wait()
                return
            try:
                self._undo_rerun(thread_id, ns, head, chain[-1], token)
            finally:
                done.set()
            return
        # (new input -- or a later step of a resume whose first step began no node
        # transaction: told by the source of the checkpoint the step builds on, which
        # LangGraph saves in the background -- waited for, briefly; not seen, the input
        # checkpoint's own save judges.  The run's other transactions wait at the gate)
        with entry.gate:
            if entry.settled:
                return
            try:
                wait = conf.get(_DURABILITY_KEY) != "exit"
                source = self._checkpoint_source(ns, step, wait=wait)
                if source is None and not wait:
                    return   # (under "exit": looked at again by the next transaction)
                entry.settled = True
                if source == "input":
                    self._undo_discarded(thread_id, ns, head)
                    if self._step_ended(ns, head):
                        self._undo_abandoned(thread_id, ns, head, step, token)
            finally:
                if entry.settled:   # (once made: later transactions pass at once)
                    with _REMOVALS_LOCK:
                        if discards.get(str(token)) is entry:
                            del discards[str(token)]

    def _checkpoint_source(self, ns: Namespace, cid: str, wait: bool) -> str | None:
        """The ``source`` of checkpoint ``cid``'s metadata ("input", "loop", ...), once it
        is saved: LangGraph saves a run's checkpoint in the background while the step
        built on it runs, so with ``wait`` it is looked for again for up to
        ``_SOURCE_WAIT_S``; None when not saved by then (or under
        ``durability="exit"``, which saves none before the run ends)."""
        deadline = time.monotonic() + (_SOURCE_WAIT_S if wait else 0.0)
        while True:
            rec = self.store.get(ns.checkpoint(cid))
            if isinstance(rec, dict) and "m" in rec:
                try:
                    md = self.codec.loads(rec["m"])
                except Exception:   # (a record it cannot read: nothing to go by)
                    return None
                source = md.get("source") if isinstance(md, dict) else None
                return source if isinstance(source, str) else None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def _undo_rerun(self, thread_id: str, ns: Namespace, head: str, task: str,
                    token: Any) -> None:
        """A plain resume of ``head`` (``invoke(None)``, ``Command(resume=...)``) runs
        ``task`` of the step built on it again (its first node transaction in this run
        begins: ``_discard_early``), and the step ended there in an error (no
        checkpoint was built on ``head``): what the task's earlier run committed --
        another run of this process (``_step_txns``), or a killed process's, kept by
        its resume (``_EarlierOpen.kept``) -- is recorded nowhere when the task failed
        (its error saved on ``head``) or was cut short with no outcome (a sibling's
        failure ended the step while it ran), and the task does it again: revert it
        now, newest first, with its compensations, before this transaction reads.
        (Before, stop 80: a booking made before the task raised stood beside the
        rerun's, the state recording one; docs/GUIDE.md said to rewind by hand.)  Left
        as it is: a task stopped at an ``interrupt()`` (LangGraph's documented semantics:
        it runs again from its start on the answer, book after ``interrupt()``; and a
        node that books only when its key says it has not keeps the booking the human
        saw), and any task on a head a run built a checkpoint on since -- but for the
        work of a run of this process that saved no outcome of such a task (an answered
        run cut short past the interrupt by a failed sibling: nothing records that
        work, and the rerun does it again; ``_note_task_save``; stop 81, soak seed 2
        round 18: it stood beside the rerun's booking)."""
        outcomes = self._task_outcomes(ns, head)
        mine = outcomes.get(task, set())
        interrupt, error = (WRITES_IDX_MAP.get("__interrupt__"),
                            WRITES_IDX_MAP.get("__error__"))
        ended = _ended(outcomes)
        # (a task whose run after its interrupt() -- on the answer, or a resume failing
        # before the interrupt -- raised failed: only that newest run's work is
        # reverted, the runs that stopped at the interrupt keep theirs; h3, stop 80: it
        # was all left)
        answered = interrupt in mine and error in mine \
            and self._failed_after_interrupt(ns, head, task)
        stopped = interrupt in mine and not answered
        if not ended or any(isinstance(i, int) and i >= 0 for i in mine):
            return   # (a step still going, a finished task: not rerun)
        prefix = ns.thread_prefix
        savers = _task_savers(self.store, (prefix, "", head, task)) if stopped else None
        if stopped and savers is None:
            return   # (stopped at its interrupt, no run of it known here: left)
        # (of those, only a run whose step ended -- it saved an outcome of another task
        # on the head, a sibling's error: one still in flight, a concurrent resume of the
        # same head, saves its own outcome or loses the race and undoes its own work)
        ended_runs = (_task_savers(self.store, (prefix, "", head, None)) or set()) \
            if stopped else set()
        checkpoints = ns.checkpoints()
        for key, rec in self.store.scan(start=ns.checkpoint(head) + b"\x00",
                                        end=prefix_end(checkpoints)):
            if isinstance(rec, dict) and rec.get("p") == head:
                return   # (built on since: a run recorded or undid that step)
        txids: set[int] = set()
        runs: list[set[int]] = []
        levels_of: dict[int, tuple] = {}
        registry = _step_txns(self.store)
        with _REMOVALS_LOCK:
            for key, txns in registry.items():
                if key[0] == prefix and key[1] == "" and key[2] == head \
                        and key[3] != token and (savers is None or (
                            str(key[3]) not in savers and str(key[3]) in ended_runs)):
                    # (stopped at its interrupt: only a run that committed work for
                    # the task and saved no outcome of it -- an answered run cut short
                    # past the interrupt by a failed sibling, nothing recording it; the
                    # runs that stopped at the interrupt keep theirs)
                    runs.append({t for t, levels in txns.items() if any(
                        lv[0] == "" and lv[3] and lv[3][-1] == task for lv in levels)})
                    levels_of.update(txns)
        runs = [r for r in runs if r]
        if answered and runs:
            txids.update(max(runs, key=max))   # (the failed run: the newest)
        else:
            txids.update(*runs)
        earlier = _earlier_open(self.store)
        with earlier.lock:
            kept = [] if answered or stopped else list(earlier.kept.get((prefix, head), ()))
        if kept:
            with earlier.index_lock:
                work = earlier.index(self.keys.root).work.get(prefix, {})
                txids.update(t for t in kept if t in work and work[t][2]
                             and work[t][2][-1] == task)
        if not txids:
            return
        chosen = []
        runs_of: dict[tuple, list[str]] | None = None
        heads: dict[tuple, str | None] = {}
        written: dict[tuple, set[str]] = {}
        for txid in sorted(txids, reverse=True):
            try:
                meta = self.store.txn_info(txid).extra.get("meta")
            except (KeyError, WalstoreError):
                meta = None   # (never committed: _revert_work passes it over)
            if isinstance(meta, dict) and "langgraph" in meta:
                # (a subgraph task's own saves, made in its node: the rerun resumes the
                # subgraph from them -- reverted, its next save was refused as stale;
                # h3, stop 80)
                continue
            inner = [level for level in levels_of.get(txid, ()) if level[0]]
            if inner:
                # (an inner node's work: the subgraph resumes from its own checkpoints;
                # what they record -- a checkpoint its run saved after the inner step,
                # or the inner task's regular writes -- is not done again, and stays;
                # the rest is a failed inner task's, or one a failed sibling cut short,
                # which the rerun does again, unless it stopped at an interrupt())
                if runs_of is None:
                    runs_of, saved = {}, _saved_steps(self.store)
                    with _REMOVALS_LOCK:
                        for key, (saved_cid, _txns) in saved.items():
                            if key[0] == prefix and key[1]:
                                runs_of.setdefault((key[1], key[3]), []).append(saved_cid)
                if any(self._step_recorded(thread_id, level, runs_of, heads, written)
                       for level in inner):
                    continue
                deepest = max(inner, key=lambda lv: len(lv[0]))
                if not deepest[3] or not self._inner_rerun(thread_id, deepest):
                    continue
            chosen.append(txid)
        if stopped and chosen:
            # (a run taken for one cut short past the interrupt may be still in flight --
            # a concurrent resume whose sibling's error is saved while its answered
            # node runs on: its later saves of the task (the subgraph's checkpoints, the
            # task's outcome) would record the work reverted here, refunded while the
            # state recorded it (h2, stop 81).  Its subgraph loads are marked lost, as a
            # race's loser's: those saves are refused, the subgraph task fails, and what
            # it commits there later is reverted.  Not its outer load: a lost run's undo
            # reverts all its work in the namespace, a sibling's whose outcome it saved
            # on this head too -- refunded while recorded)
            lost = _lost_runs(self.store)
            with _REMOVALS_LOCK:
                for txid in chosen:
                    for level in levels_of.get(txid, ()):
                        if level[0] and level[2] is not None:
                            lost[level[2]] = None
                while len(lost) > _LOST_RUNS_MAX:
                    lost.popitem(last=False)
        self._revert_work(thread_id, prefix, head, chosen, "undo_rerun", rerun=True)

    def _inner_rerun(self, thread_id: str, level: tuple) -> bool:
        """Does a rerun of the subgraph step ``level`` (namespace, checkpoint, run token,
        task chain), whose outer task runs again, run its task again from its start: the
        checkpoint is saved (the subgraph resumes from it) and holds neither a regular
        outcome of the task (read back, not run again) nor its interrupt (left:
        LangGraph's documented semantics) -- it raised, or a failed sibling cut it short
        (an async run cancels the rest of the step: no write of it at all)?  Or the
        checkpoint was never saved and the namespace holds none at or after it (none at
        all: the subgraph runs from its start): under ``durability="exit"`` a subgraph
        whose own run ended without an error or interrupt saves nothing, and a sync run
        whose failed task ended the step does not wait for a sibling already running --
        the outer loop saves its checkpoint and pending writes at exit, then its executor
        waits for the sibling, whose outcome is never saved -- so the rerun resumes the
        subgraph from before that step (its newest checkpoint) and does the inner work
        again, which nothing records (before, h1 stop 81: the first booking stood beside
        the rerun's)."""
        ns_name, cid, token, chain = level
        ns = self.keys.at(thread_id, ns_name)
        if self.store.get(ns.checkpoint(cid)) is None:
            # (never saved: the subgraph resumes from its newest checkpoint; one at or
            # after ``cid`` -- another run's since -- does not run that step again)
            newest = self._latest(self.store, ns)
            return newest is None or newest[0] < cid
        mine = self._task_outcomes(ns, cid).get(chain[-1], set())
        if any(isinstance(i, int) and i >= 0 for i in mine):
            return False
        if WRITES_IDX_MAP.get("__interrupt__") in mine:
            # (stopped at its interrupt: left, but for the work of a run of it that
            # saved no outcome of it -- cut short past the interrupt, stop 81)
            savers = _task_savers(self.store, (ns.thread_prefix, ns_name, cid, chain[-1]))
            return savers is not None and str(token) not in savers
        return True

    def _task_writes(self, ns: Namespace, cid: str) -> Iterator[tuple[bytes, Any, Any]]:
        """(key, task id, idx) of each pending write saved on checkpoint ``cid``, in key
        order: the task id read from the row when the key holds it hashed; a key that
        does not parse is passed over."""
        prefix = ns.writes_of(cid)
        for key, row in self.store.scan(prefix=prefix):
            try:
                task_id, idx = self.keys.parse_write(prefix, key)
            except (ValueError, IndexError, UnicodeDecodeError):
                continue
            yield key, (row[4] if task_id is None and len(row) > 4 else task_id), idx

    def _task_outcomes(self, ns: Namespace, cid: str) -> dict[str, set[int]]:
        """task id -> the kinds (LangGraph's write index: >= 0 regular, an error's, an
        interrupt's...) of its pending writes saved on checkpoint ``cid``, the null
        task's (a run's input, a resume's answer) aside."""
        outcomes: dict[str, set[int]] = {}
        for _key, task_id, idx in self._task_writes(ns, cid):
            if isinstance(task_id, str) and task_id != NULL_TASK_ID:
                outcomes.setdefault(task_id, set()).add(idx)
        return outcomes

    def _step_ended(self, ns: Namespace, cid: str) -> bool:
        """Was the step built on checkpoint ``cid`` ended by LangGraph without a checkpoint:
        an error's or an interrupt's pending write of one of its tasks saved on it (no
        run builds on ``cid`` from that step any more)?"""
        return _ended(self._task_outcomes(ns, cid))

    def _forked_from(self, ns: Namespace, parent: str, fork: Checkpoint,
                     cid: str) -> list[str]:
        """The checkpoints ``fork`` (``cid``, source "fork":
        ``update_state(config, None, as_node="__copy__")``, saved beside the checkpoint
        it copies, on its parent ``parent``) may be a copy of: ``parent``'s other
        children with the same channel and seen versions.  The fork carries none of the
        copied checkpoint's saved outcomes -- its resume runs that step's finished tasks
        again -- so their work is judged as new input on the copied one would be
        (``_undo_abandoned``; before, the first booking stood beside the rerun's)."""
        checkpoints, found = ns.checkpoints(), []
        want = (fork.get("channel_versions"), fork.get("versions_seen"))
        for key, rec in self.store.scan(start=ns.checkpoint(parent) + b"\x00",
                                        end=prefix_end(checkpoints)):
            other = key[len(checkpoints):].decode("utf-8", "replace")
            if other == cid or not isinstance(rec, dict) or rec.get("p") != parent \
                    or "c" not in rec:
                continue
            c = self.codec.loads(rec["c"]) or {}
            if (c.get("channel_versions"), c.get("versions_seen")) == want:
                found.append(other)
        return found

    def _update_applies(self, ns: Namespace, parent: str, update: Checkpoint) -> bool:
        """Did ``graph.update_state``'s checkpoint ``update``, saved on ``parent``,
        apply ``parent``'s tasks (their saved outcomes)?  LangGraph marks a task it
        applies as having seen the versions of the channels that triggered it
        (``versions_seen``): only ``update_state(config, None, as_node=END)`` does, for
        every task of the step; an update applied as a node's (``as_node``, or the one
        LangGraph infers) adds that node with nothing seen.  So: does ``update`` mark a
        node as having seen a channel version ``parent`` did not?"""
        rec = self.store.get(ns.checkpoint(parent))
        if not isinstance(rec, dict) or "c" not in rec:
            return False
        before = (self.codec.loads(rec["c"]) or {}).get("versions_seen") or {}
        after = update.get("versions_seen") or {}
        return any(isinstance(seen, Mapping) and any(
            version != (before.get(node) or {}).get(chan) for chan, version in seen.items())
            for node, seen in after.items())

    def _kin(self, prefix: bytes) -> set[bytes]:
        """The thread prefix ``prefix`` and those of the threads related to it by
        ``copy_thread`` calls of this store object (``_copies``), either way and through
        copies of copies: they hold the same checkpoints and pending writes under the
        same ids, so a step one of them left unfinished is the others' too."""
        kin, todo, copies = {prefix}, [prefix], _copies(self.store)
        with _REMOVALS_LOCK:
            pairs = [(src, dst) for src, dsts in copies.items() for dst in dsts]
        while todo:
            at = todo.pop()
            for src, dst in pairs:
                for other in ((dst,) if src == at else (src,) if dst == at else ()):
                    if other not in kin:
                        kin.add(other)
                        todo.append(other)
        return kin

    def _kin_records(self, others: set[bytes], parent: str) -> bool:
        """Does one of the threads ``others`` (``_kin``) record the saved outcomes of
        its root checkpoint ``parent``: it holds ``parent``, and no checkpoint saved on
        it there dropped them -- new input, or an ``update_state`` that did not apply
        them (``_update_applies``)?  Its resume returns them as done, or a resume did
        (a checkpoint of its run on ``parent``), so the work they record must stay
        (before, new input on a thread refunded a booking its copy's resume then
        returned as done)."""
        for other in others:
            ns = self.keys.within(other, "")
            rec = self.store.get(ns.checkpoint(parent))
            if rec is None:
                continue
            checkpoints, dropped = ns.checkpoints(), False
            for _key, child in self.store.scan(start=ns.checkpoint(parent) + b"\x00",
                                               end=prefix_end(checkpoints)):
                if not isinstance(child, dict) or child.get("p") != parent \
                        or "m" not in child:
                    continue
                source = (self.codec.loads(child["m"]) or {}).get("source")
                if source == "input" or source == "update" and not self._update_applies(
                        ns, parent, self.codec.loads(child["c"]) or {}):
                    dropped = True
                    break
            if not dropped:
                return True
        return False

    def _undo_on_fresh_start(self, thread_id: str, ns: Namespace) -> None:
        """A run loaded the thread's outermost graph and found no checkpoint: the thread is
        new -- or a process that ran it was killed before any checkpoint of it was saved
        (``durability="exit"`` saves only at the run's end; ``"async"`` saves behind the
        steps, so a first step's booking can commit before the thread's first save).
        Such a run's node transactions stand and nothing records them, and LangGraph
        starts the thread over from its input: they would be made twice.

        The thread's fresh-start mark (``SaverKeys.fresh_start``: ``[the log's end
        before it was set, the open that set it]``, set here by the first run of each
        open that finds the thread empty) says where an earlier open's run on the empty
        thread began: the node transactions (``STEP_META``) that open committed in the
        thread from there up to this open (``_EarlierOpen.open_lsn``) are reverted,
        newest first, with their compensations (``store.revert``) -- no checkpoint
        records any of them -- then the mark is set for this open.  Passed over: one
        undone already (a rewind, a revert, an earlier undo cut short), a copy's of its
        source's work (named in ``left``, CONTRACT 4.10).  A mark this open set costs one
        read per run on the empty thread; a read-only store does nothing; a thread an
        older walstore ran (no mark) is not looked into; ``delete_thread`` and
        ``delete_for_runs`` remove the mark (they compensate nothing).  Told like
        ``_undo_on_resume``'s undo, with ``checkpoint_id`` None."""
        store = self.store
        if store.readonly:
            return
        earlier = _earlier_open(store)
        prefix = ns.thread_prefix
        key = self.keys.fresh_start(prefix)
        if _fresh_mark(store.get(key))[1] == earlier.open_lsn:
            return   # (set by this open: its runs are live, or ended in this process)
        run = _LostRunUndo()
        gate = earlier.gate(prefix)   # (held while it is used: _EarlierOpen.gate)
        try:
            with gate.lock:
                since, opened = _fresh_mark(store.get(key))
                if opened == earlier.open_lsn:
                    return
                if since is not None and earlier.open_lsn >= 0:
                    for txid in self._fresh_leftovers(prefix, since, earlier.open_lsn):
                        self._judge_fresh(thread_id, prefix, txid, run)
                newest = store.log(limit=1)
                mark = [int(newest[0].lsn) if newest else -1, earlier.open_lsn]
                _outside_node(lambda: self._run(
                    lambda tx: tx.put(key, mark), scope=prefix,
                    meta=self._meta("fresh_start", thread_id=thread_id)))
        finally:   # (what was undone is told, whatever stopped the rest)
            if run.undone:
                for saver in _savers_of(store):
                    saver.codec.forget(prefix)
            if run.undone or run.left:
                self._tell_resume_undo(ResumeUndo(
                    thread_id, None, tuple(sorted(run.undone, reverse=True)), (),
                    tuple(run.left)))

    def _fresh_leftovers(self, prefix: bytes, since: int, upto: int) -> list[int]:
        """The txids, newest first, of the node transactions (``STEP_META``) of the thread
        ``prefix`` committed after LSN ``since`` and up to ``upto`` (a walk of the log
        between them: the work of the run that set the fresh-start mark, and of what ran
        after it in that open)."""
        found: set[int] = set()
        start: int | None = since if since > 0 else None
        while True:
            try:
                for info in self._commits_after(start):
                    lsn = int(info.lsn)
                    if lsn > upto:
                        break
                    if lsn <= since:
                        continue
                    meta, scope = info.meta, info.scope
                    if isinstance(meta, dict) and isinstance(meta.get(STEP_META), dict) \
                            and isinstance(scope, bytes) \
                            and scope.startswith(self.keys.root) \
                            and _thread_prefix_of(self.keys.root, scope) == prefix:
                        found.add(info.txid)
                break
            except HistoryTrimmed:
                if start is None:   # pragma: no cover - (the retained log: never raised)
                    break
                # (the mark's position is older than the retained history -- retention
                # trimmed it, the killed run's work after it may be kept: it found none
                # of it, and the run booked again -- or a trim came under the walk: the
                # retained log from its start, what lies after the mark)
                start = None
        return sorted(found, reverse=True)

    def _judge_fresh(self, thread_id: str, prefix: bytes, txid: int,
                     run: _LostRunUndo) -> None:
        """Revert ``txid``, a node transaction of a run of an earlier open on the thread
        while it had no checkpoint (``_undo_on_fresh_start``), unless undone already or a
        copy's of its source's work."""
        try:
            info = self.store.txn_info(txid)
        except (KeyError, WalstoreError):
            return   # (trimmed from history)
        if info.extra.get("undone_by"):
            return
        if self.store.engine.inherited(txid):
            run.left.append(f"{txid} (made in the store this one is a copy of: its "
                            f"compensation is held here; undo it in one store only, "
                            f"by hand)")
            return
        self._revert_into(run, txid, prefix, self._meta(
            "undo_on_fresh_start", thread_id=thread_id, txid=txid))

    def _judge_leftovers(self, thread_id: str, ns: Namespace, head: str,
                         earlier: _EarlierOpen, run: _LostRunUndo, kept: list[int]) -> None:
        """``_undo_on_resume``'s judgement of the earlier open's work on ``head``, newest
        first: reverted (``run.undone``), ``kept``, or left (``run.left``, with why)."""
        written: dict = {}
        for txid, lsn, at, chain in self._leftovers(earlier, ns.thread_prefix, head):
            try:
                info = self.store.txn_info(txid)
            except (KeyError, WalstoreError):
                continue   # (trimmed from history)
            if info.extra.get("undone_by"):
                continue   # (undone already: a rewind, a revert, an earlier resume)
            if self.store.engine.inherited(txid):
                # (a copy's -- backup, restore -- of its source's work: a copy never runs
                # its source's compensations on its own, CONTRACT 4.10; undone here, the
                # source's own resume refunded the booking a second time)
                run.left.append(f"{txid} (made in the store this one is a copy of: its "
                                f"compensation is held here; undo it in one store only, "
                                f"by hand)")
                continue
            if at == head and not chain:
                # (stamped by an older walstore, no task named: alone in its step it is
                # the step's, and nothing records it; beside tasks whose outcome is
                # saved, whose it is cannot be told)
                if ("", head) not in written:
                    written[("", head)] = self._task_records(ns, head)
                if written[("", head)]:
                    run.left.append(f"{txid} (written by an older walstore, which did not "
                                    f"name its task, beside tasks whose outcome the "
                                    f"checkpoint records)")
                    continue
            elif self._step_recorded(thread_id, ("", at, None, chain), {}, {}, written,
                                     committed_at=lsn):
                kept.append(txid)
                continue
            self._revert_into(run, txid, ns.thread_prefix, self._meta(
                "undo_on_resume", thread_id=thread_id, checkpoint_id=head, txid=txid))

    def _tell_resume_undo(self, done: ResumeUndo) -> None:
        """Keep ``done`` in ``resume_undos``; log it (WARNING) when it reverted or left
        anything."""
        self.resume_undos.append(done)
        if not (done.undone or done.left):
            return
        if done.rerun:
            where = (f"resumed from checkpoint {done.checkpoint_id!r}, whose step ended in "
                     f"an error: LangGraph runs its failed task again")
        elif done.superseded:
            where = (f"retried a node (a later attempt of its RetryPolicy) in the step "
                     f"built on checkpoint {done.checkpoint_id!r}: LangGraph dropped the "
                     f"earlier attempts' writes")
        elif done.discarded:
            where = (f"took new input on checkpoint {done.checkpoint_id!r}, whose step was "
                     f"left unfinished (a kill, an error or an interrupt()): LangGraph "
                     f"discards the outcomes saved on it and runs its finished tasks again")
        elif done.checkpoint_id is not None:
            where = (f"resumed from checkpoint {done.checkpoint_id!r}: a process that ran "
                     f"the step built on it ended before saving it")
        else:
            where = "had no checkpoint: a process that ran it ended before saving its first"
        again = ("node runs" if done.superseded or done.rerun else
                 "tasks run" if done.discarded else
                 "step runs" if done.checkpoint_id is not None else "run starts over")
        _log.warning(
            "thread %r %s; %s%s", done.thread_id, where,
            (f"its node transactions {', '.join(map(str, done.undone))} were reverted "
             f"and their actions compensated before the {again} again"
             if done.undone else "nothing of it was reverted"),
            (f"; NOT undone (revert them by hand, or undo what they did outside): "
             f"{'; '.join(done.left)}" if done.left else ""))

    def _leftovers(self, earlier: _EarlierOpen, prefix: bytes, head: str
                   ) -> list[tuple[int, int, str, tuple[str, ...]]]:
        """(txid, LSN, the checkpoint its outermost step built on, its outermost task
        after its callers, ``_task_chain``, or ()), newest first, of the node
        transactions of the thread ``prefix`` that an earlier open committed in a step
        built on ``head`` or a later checkpoint (they
        began after ``head`` was made: the log is read from then, once per store object,
        ``_EarlierOpen``)."""
        made = _uuid6_time(head)
        if made is None:
            return []   # (ids not from LangGraph's clock: no order to go by)
        with earlier.index_lock:
            index = earlier.index(self.keys.root)
            self._cover(index, made - _CLOCK_SLACK)
            work = index.work.get(prefix, {})
            found = [(txid, lsn, at, chain) for txid, (lsn, at, chain) in work.items()
                     if at >= head]
        return sorted(found, key=lambda w: w[1], reverse=True)

    def _cover(self, index: _WorkIndex, since: float) -> None:
        """Index (``index.work``) the node transactions of this saver's threads committed
        from the time ``since`` on that are not indexed yet: the commits between the
        start ``since`` bisects to and ``index.lo``, oldest first (under the
        ``_EarlierOpen``'s ``index_lock``)."""
        if index.covered is not None and since >= index.covered:
            return
        upper = index.lo
        start = self._log_start(since, upper) if upper >= 0 else 0
        heads: dict[bytes, str | None] = {}
        try:
            for info in self._commits_after(start if start > 0 else None):
                if int(info.lsn) > upper:
                    break
                self._index_step_txn(index, info, heads)
        except HistoryTrimmed:
            pass   # (trimmed under the walk: nothing older to find)
        index.lo, index.covered = start, since

    def _index_step_txn(self, index: _WorkIndex, info: Any,
                        heads: dict[bytes, str | None]) -> None:
        """Note commit ``info`` in ``index.work`` when it is a node transaction
        (``STEP_META``) of a thread of this saver whose newest checkpoint is not newer
        than the step it is work of (``heads``: each thread's, read once a walk)."""
        meta = info.meta
        steps = meta.get(STEP_META) if isinstance(meta, dict) else None
        scope = info.scope
        if not isinstance(steps, dict) or not isinstance(scope, bytes) \
                or not scope.startswith(self.keys.root):
            return
        at = steps.get("")
        if not isinstance(at, str):
            at = max(_stamped_steps(meta), default=None)
            if at is None:
                return
        prefix = _thread_prefix_of(self.keys.root, scope)  # (a scope inside the thread's)
        if prefix is None:
            return
        if prefix not in heads:
            checkpoints = self.keys.within(prefix, "").checkpoints()
            row = _first(self.store.scan(prefix=checkpoints, reverse=True))
            heads[prefix] = None if row is None else \
                row[0][len(checkpoints):].decode("utf-8", "replace")
        head = heads[prefix]
        if head is None or at < head:
            return   # (no checkpoint to resume from, or its step ended in one)
        index.work.setdefault(prefix, {})[info.txid] = (int(info.lsn), at, _chain_of(meta))

    def _step_recorded(self, thread_id: str, level: tuple, runs: dict, heads: dict,
                       written: dict, committed_at: int | None = None) -> bool:
        """Does the thread record the step ``level`` (namespace, the checkpoint the step
        built on, the run's token, the node's task after the tasks that called it:
        ``_task_chain``) stands for: a checkpoint that run saved on or after it still
        exists (``runs``: the checkpoints each run saved; ``heads``: the newest of them
        that exists, found once), or that checkpoint and the regular pending writes on
        it of the task or of a task that called it do (``written``, read once a
        checkpoint: LangGraph takes a caller whose result was saved as done, and never
        calls the task again).  (Writes on a checkpoint the rewind took back record
        nothing: no resume loads them.  With durability="async" a task's writes may
        commit before its step's checkpoint; a rewind to a point between left them, and
        the task's booking was kept while a resume ran the task again and booked
        twice.)

        ``committed_at``: the LSN of the node transaction judged, after a restart
        (``_undo_on_resume``: no run is known, ``runs`` is empty): then the task's
        outcome counts in whatever form LangGraph saved it -- regular writes, an
        interrupt's, an error's -- when saved after the transaction committed
        (``_task_records``): a task LangGraph runs again after its interrupt or error
        (a resume in another process, as in this one) re-did that work in a run killed
        later, and only what it did before the outcome was saved is the outcome's.  A
        caller's outcome counts only in its regular form, saved after the commit: one
        interrupted or failed runs again, and calls the task again unless the task's
        own result was saved."""
        ns_name, cid, token, chain = level
        if (ns_name, token) not in heads:
            ns = self.keys.at(thread_id, ns_name)
            heads[(ns_name, token)] = next(
                (c for c in sorted(runs.get((ns_name, token), ()), reverse=True)
                 if self.store.get(ns.checkpoint(c)) is not None), None)
        head = heads[(ns_name, token)]
        if head is not None and head > cid:
            return True
        if not chain:
            return False
        if (ns_name, cid) not in written:
            ns = self.keys.at(thread_id, ns_name)
            there = self.store.get(ns.checkpoint(cid)) is not None
            if committed_at is None:
                written[(ns_name, cid)] = self._tasks_done(ns, cid) if there else set()
            else:
                written[(ns_name, cid)] = self._task_records(ns, cid) if there else {}
        found = written[(ns_name, cid)]
        if committed_at is None:
            return any(task in found for task in chain)
        *callers, task = chain
        return found.get(task, (-1, -1))[0] > committed_at or any(
            found.get(caller, (-1, -1))[1] > committed_at for caller in callers)

    def _failed_after_interrupt(self, ns: Namespace, cid: str, task: str) -> bool:
        """Did ``task``'s newest run on checkpoint ``cid`` end in an error saved after its
        ``interrupt()`` write (a run after the one that stopped at the interrupt -- on
        the answer, or a plain resume failing before it reached the interrupt again --
        raised), rather than stop at an interrupt after an earlier error?  Told by the
        LSNs of the two pending writes."""
        interrupt, error = (WRITES_IDX_MAP.get("__interrupt__"),
                            WRITES_IDX_MAP.get("__error__"))
        lsns: dict[int, int] = {}
        for key, task_id, idx in self._task_writes(ns, cid):
            if task_id != task or idx not in (interrupt, error):
                continue
            newest = self.store.history(key, limit=1)
            if newest and not newest[0].deleted:
                lsns[idx] = max(lsns.get(idx, -1), int(newest[0].lsn))
        return lsns.get(error, -1) > lsns.get(interrupt, -1) >= 0

    def _task_records(self, ns: Namespace, cid: str) -> dict[str, tuple[int, int]]:
        """task id -> (the LSN of the newest of its pending writes on checkpoint
        ``cid`` of any kind -- regular, an interrupt's, an error's, a resume's --, that
        of the newest regular one or -1), the null task's (a run's input) aside."""
        records: dict[str, tuple[int, int]] = {}
        for key, task_id, idx in self._task_writes(ns, cid):
            if not isinstance(task_id, str) or task_id == NULL_TASK_ID:
                continue
            newest = self.store.history(key, limit=1)
            if newest and not newest[0].deleted:
                lsn = int(newest[0].lsn)
                any_kind, regular = records.get(task_id, (-1, -1))
                records[task_id] = (max(any_kind, lsn), max(regular, lsn)
                                    if isinstance(idx, int) and idx >= 0 else regular)
        return records

    def _tasks_done(self, ns: Namespace, cid: str) -> set[str]:
        """The tasks with a regular pending write on checkpoint ``cid`` (not an error's,
        an interrupt's or a resume's, nor the null task's): LangGraph takes them as
        done and does not run them again."""
        done: set = set()
        for _key, task_id, idx in self._task_writes(ns, cid):
            if task_id != NULL_TASK_ID and isinstance(idx, int) and idx >= 0:
                done.add(task_id)
        return done

    def _undone_already(self, txid: int, error: RevertConflict) -> bool:
        """Does ``error`` (a revert of ``txid`` refused) say that ``txid`` was undone
        already: every later writer it names is an undo of it (its commit's ``reverts``
        names it: another caller's ``store.revert`` of the run's booking)?"""
        try:
            return bool(error.txids) and all(
                txid in (self.store.txn_info(t).extra.get("reverts") or ())
                for t in error.txids)
        except (KeyError, WalstoreError):
            return False

    def _checkpoint_removed(self, ns: Namespace, cid: str) -> bool:
        """Was checkpoint ``cid`` (not in the store now) removed, rather than not saved
        yet?  LangGraph saves a step's pending writes beside the save of the checkpoint
        they belong to (in the background), so writes often come first: that path must
        stay quick.  Removed: the thread was rewound or deleted (``delete_thread``,
        ``delete_for_runs``) in this process since the checkpoint's id was made (LangGraph's ids are time-based uuid6), or
        its namespace is empty and the log holds a purge of the thread since then
        (``delete_thread`` in another process; a brand-new thread's first writes are
        the only ones that read the log)."""
        made = _uuid6_time(cid)
        if made is None:
            return False  # (not LangGraph's ids: when it was made is unknown)
        removed = _mark_of(self.store, "removals", ns.thread_prefix)
        if removed is not None and removed[0] > _uuid6_ticks(cid):
            return True
        # (a removal of this process is judged by its mark alone: marked again once
        # delete_thread's purge committed, the log is read only after the mark's LSN.  The
        # log's commit stamps and the id's time are two readings of the wall clock: after
        # a step back of it, delete_thread's purge was stamped after the ids made since,
        # and a new run's early writes were refused: audit 67)
        since = removed[1] if removed is not None else None
        if _first(self.store.scan(prefix=ns.checkpoints())) is not None:
            return False
        key = ns.checkpoint(cid)
        n = 8
        while True:
            infos = self.store.log(limit=n)
            for info in infos:
                if info.timestamp < made - _CLOCK_SLACK or (
                        since is not None and int(info.lsn) <= since):
                    return False
                purged = info.extra.get("purge")
                if isinstance(purged, bytes) and key.startswith(purged) \
                        and info.timestamp > made:
                    return True
            if len(infos) < n:
                return False
            n *= 4

    def _fence_step(self, tx: Any, thread_id: str, checkpoint_map: Mapping,
                    conf: Mapping | None = None) -> None:
        """Fence ``tx``, begun inside a graph node of a run of the thread, as the run's
        ``put`` is fenced: read the checkpoint each namespace's step builds on (LangGraph's
        ``checkpoint_map``), so that a rewind or ``delete_thread`` removing it before
        ``tx`` commits makes the commit raise ConflictError (the read-set validation; its
        actions are compensated; before, it committed after the rewind and stayed: an
        action of an undone step, never compensated).  A checkpoint already removed
        refuses ``tx`` now.  Only what removes checkpoints (rewind, ``delete_thread``,
        ``prune``, ``delete_for_runs``) writes those keys: the step's other transactions
        never conflict over them.  A transaction of a run that is cut off (it loaded the
        thread before a rewind or delete of it, or lost a race: ``_refuse_cut_off``) is
        refused too, whatever checkpoint its step builds on.  (A functional-API call's
        caller namespace, ``_call_caller``, has no checkpoints: passed over.)"""
        for ns_name, cid in checkpoint_map.items():
            if not isinstance(ns_name, str) or not isinstance(cid, str) \
                    or _call_caller(checkpoint_map, ns_name, cid):
                continue
            ns = self.keys.at(thread_id, ns_name)
            key = ns.checkpoint(cid)
            tx.snapshot   # (taken now if not yet: before the latest state is read below)
            if self.store.get(key) is not None:
                k = encode_key(key)
                had = k in tx.read_keys
                if tx.get(key) is not None:
                    continue  # (read: in the transaction's read set)
                # (in the latest state, not in the snapshot, which is older: saved
                # since the transaction began -- a save under way then, durability=
                # "async", that landed; a removal cannot hide it from an older snapshot.
                # Not read, as one still under way is not: its read would make the
                # commit conflict.  Before (stop 81) it was taken for a removed
                # checkpoint and the node's work refused, StaleCheckpointError -- seen
                # under load, a subgraph node's first transaction beside its step's
                # background save)
                if not had:
                    tx.read_keys.discard(k)
                continue
            if self._checkpoint_removed(ns, cid):
                self._fence_gone(thread_id, ns_name, cid, True,
                                 "a transaction begun in a step built on")
            # (else its save is still under way, durability="async": not read, so the
            # save landing is no conflict)
        if conf is None:
            return
        # the snapshot (taken by the read above, else now) comes before the marks are
        # looked at: a rewind, delete or lost race marked after the look commits after
        # the snapshot, and the commit conflicts (undo_fence; the lost run's key)
        _ = tx.snapshot
        for ns_name, cid in checkpoint_map.items():
            if not isinstance(ns_name, str) or not isinstance(cid, str) \
                    or _call_caller(checkpoint_map, ns_name, cid):
                continue
            ns = self.keys.at(thread_id, ns_name)
            token = conf.get(RUN_TOKEN + ns_name)
            if token is not None:  # (a loss of the run's race deletes it: conflict)
                tx.get(ns.lost_run(str(token)))
            self._refuse_cut_off(conf, thread_id, ns_name, ns, cid,
                                 "a transaction begun in a step built on", undo=False)

    def _note_step_txn(self, tx: Any, thread_id: str, conf: Mapping,
                       checkpoint_map: Mapping, undo_work: bool = False) -> None:
        """Remember ``tx`` (begun in a node of a run's step) under each namespace's
        checkpoint the step builds on and the run's load token, so a put of that run
        refused for a race can undo it (:meth:`_undo_lost_step`), and one refused for a
        rewind can judge it (:meth:`_undo_cut_off_step`: never ``undo_work``, the own
        transaction of an undo made in the node, or a compensator's of it)."""
        prefix = self.thread_scope(thread_id)
        registry = _step_txns(self.store)
        task_ns = conf.get("checkpoint_ns")
        task_ns = task_ns if isinstance(task_ns, str) else ""
        # (each namespace's step, run and task the transaction is work of: one tuple,
        # shared by its entries; a run cut off by a rewind judges by it whether a saved
        # checkpoint or pending write records the transaction, _undo_cut_off_step)
        levels = tuple((ns_name, cid, conf.get(RUN_TOKEN + ns_name),
                        _task_chain(task_ns, ns_name, checkpoint_map))
                       for ns_name, cid in checkpoint_map.items()
                       if isinstance(ns_name, str) and isinstance(cid, str)
                       and conf.get(RUN_TOKEN + ns_name) is not None)
        attempt = _node_attempt(conf) if task_ns and not undo_work else None
        attempts_all = _attempts(self.store)
        attempts = attempts_all if attempt is not None else None
        with _REMOVALS_LOCK:
            task = (attempts.note((prefix, task_ns, attempt[0]), tx.id, attempt[1])
                    if attempts is not None else None)
            if task is not None and self.undo_on_resume:
                # (a transaction of a superseded attempt, still running in a worker
                # thread: refused now, and at its commit if a retry begins meanwhile)
                _refuse_superseded(task, attempt[1], thread_id, task_ns)
                add_commit_check(tx, functools.partial(
                    _refuse_superseded, task, attempt[1], thread_id, task_ns))
            if not undo_work:
                loads = _SUBGRAPH_LOADS.get(self.store)
                for ns_name, _cid, token, _task in (levels if loads else ()):
                    called = loads.get(str(token)) if ns_name else None
                    if called is not None and called[0][1] != task_ns:
                        # (work of the subgraph's inner node: also the calling task's,
                        # of its attempt then; refused when a later one began)
                        outer = attempts_all.note(called[0], tx.id, called[1])
                        if self.undo_on_resume:
                            _refuse_superseded(outer, called[1], thread_id, called[0][1])
                            # (and at its commit, as a node's own: one begun before the
                            # retry's load and still open in a worker thread then -- a
                            # ToolNode's parallel tool under ainvoke, which asyncio.gather
                            # does not cancel when a sibling tool raises -- was passed
                            # over by the undo and committed, its booking standing beside
                            # the retry's; h2, stop 81)
                            add_commit_check(tx, functools.partial(
                                _refuse_superseded, outer, called[1], thread_id,
                                called[0][1]))
            for ns_name, cid, token, _task in levels:
                key = (prefix, ns_name, cid, token)
                # (a dict: each once, a transaction fenced again by guard_node_scope too;
                # the ``not in`` of a list scanned every txid noted before, under the
                # lock: a node making 20,000 transactions spent 1.6 s of its 3.2 there)
                registry.setdefault(key, {})[tx.id] = () if undo_work else levels
                registry.move_to_end(key)
            while len(registry) > _STEP_TXNS_MAX:
                registry.popitem(last=False)

    def _removing(self, thread_prefix: bytes) -> None:
        """Note that checkpoints of the thread were (or are being) removed: pending writes
        of a checkpoint made before now and missing are refused from now on.  "Before now"
        in the order of LangGraph's own id generator (``uuid6``: its timestamp never goes
        back in a process): the mark is the timestamp of an id made now.  A wall-clock
        mark refused every new checkpoint's early writes (durability="async") for an hour
        after the clock stepped back an hour (audit 67): their ids, made after the
        removal, carried earlier times.  With it, the LSN of the newest commit then (the
        log is read after it only, see _checkpoint_removed)."""
        _note_mark(_removals(self.store), thread_prefix, _removal_mark(self.store))

    @staticmethod
    def _name_record(record: dict, thread_id: str, ns_name: str) -> None:
        if is_hashed(thread_id):
            record["t"] = thread_id
        if is_hashed(ns_name):
            record["n"] = ns_name

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        thread_id, ns_name = _where(config)
        cid = _conf(config)["checkpoint_id"]
        ns = self.keys.at(thread_id, ns_name)
        rows = []
        for idx, (channel, value) in enumerate(writes):
            widx = WRITES_IDX_MAP.get(channel, idx)
            if channel == ERROR_CHANNEL and isinstance(value, BaseException):
                # LangGraph's own record of a failed task (``get_state().tasks[i].error``,
                # the error handler a resume schedules): its encoding stores the
                # exception as its repr string, and SqliteSaver gives that back.  Refused
                # as a state value that would not come back as its type, the whole write
                # was lost, and a node with an ``error_handler`` failed the run with
                # StateTypeError instead of running its handler.
                value = repr(value)
            row = [channel, *self.codec.dumps(value), task_path]
            if is_hashed(task_id):
                row.append(task_id)
            rows.append((widx, ns.write(cid, task_id, widx), row))

        # (below, first) a task of a run that loaded the thread before a rewind or delete
        # of it (in this process) saving its writes late: the rewind undid its step (and
        # compensated what it did), the checkpoint kept may be the very one the task
        # worked on — refused, or a resume would take the task for done (after a delete:
        # writes of a checkpoint made after it, never saved, were left under the erased
        # thread); and a task of a run that lost a race earlier

        def write(tx):
            self._cut_off_in(tx, _conf(config), thread_id, ns_name, ns, cid,
                             "pending writes for")
            if self.fencing:
                if self.store.get(ns.checkpoint(cid)) is not None:
                    # (read, so a rewind or delete_thread racing these writes conflicts)
                    tx.get(ns.checkpoint(cid))
                elif self._checkpoint_removed(ns, cid):
                    self._fence_gone(thread_id, ns_name, cid, True, "pending writes for")
                # (else its save is still under way: not read, so the save landing
                # first is no conflict, and the writes commit in the order they came)
            for widx, key, row in rows:
                # a retried task's regular writes are kept as first written (idempotent);
                # special writes (errors, interrupts) are replaced, as LangGraph expects
                if widx >= 0 and tx.get(key) is not None:
                    continue
                tx.put(key, row)
        token = _conf(config).get(RUN_TOKEN + ns_name) if self.fencing else None
        budget: dict = {}
        _await_removal(self.store, ns.thread_prefix, budget)  # (as put does)
        while True:
            try:
                self._refuse_cut_off(_conf(config), thread_id, ns_name, ns, cid,
                                     "pending writes for", undo=False)
                meta = self._meta("put_writes", thread_id=thread_id,
                                  checkpoint_id=cid, task_id=task_id)
                if _root_save_in_node(ns_name):   # (a @task's result, in its caller's node)
                    _outside_node(lambda: self._run(write, scope=ns.thread_prefix,
                                                    meta=meta))
                else:
                    self._run(write, scope=ns.thread_prefix, meta=meta)
                if token is not None and any(widx != _RESUME_IDX for widx, _k, _r in rows):
                    _note_task_save(self.store, (ns.thread_prefix, ns_name, cid, task_id),
                                    token)
                return
            except StaleCheckpointError as e:
                if self._removal_failed(e, _conf(config), ns_name, ns, budget):
                    continue
                if token is not None and token in _lost_runs(self.store):
                    self._undo_lost_step(e, ns, token)  # (refused for a lost race)
                elif token is not None:
                    self._undo_cut_off_step(e, ns, token)  # (cut off by a rewind)
                raise

    def _removal_failed(self, error: StaleCheckpointError, conf: Mapping, ns_name: str,
                        ns: Namespace, budget: dict) -> bool:
        """A save refused (``error``) for a rewind or ``delete_thread`` of its thread
        under way in another Python thread waits for its end, compensations included, so
        the refusal (it says the run's step was undone) never reaches its caller before
        that undo is done.  True when that removal failed without committing (its marks
        put back, the checkpoint there): the run was not cut off, and the save is tried
        again (else its step's bookings stood with no checkpoint saying so, and a resume
        booked again)."""
        if error.head is not None or not _await_removal(self.store, ns.thread_prefix,
                                                         budget):
            return False
        return self._cut_off(conf, ns_name, ns) is None

    # ---- deleting, copying, pruning ----------------------------------------------------
    def delete_thread(self, thread_id: str) -> None:
        """Erase the thread with ``store.purge``: its keys and every past version gone from
        every API, their bytes from every file of the store (the purge's checkpoint).  Runs
        of the thread loaded before it are cut off — unless the purge failed without
        committing (a full disk): then nothing changed, for them either.  A
        ``store.purge`` of the thread's prefix (or of one around it) made directly cuts
        them off the same way (``_watch_undo``)."""
        prefix = self.thread_scope(thread_id)
        if current_thread_scope() == prefix:
            # (it failed with a StaleCheckpointError saying the run's checkpoint was gone
            # and to "reload the thread and retry": the purge, a transaction of the node,
            # is fenced against the very deletion it makes)
            raise ValueError(f"delete_thread({thread_id!r}) was called from a node of that "
                             f"thread's own run, which would go on writing into the "
                             f"thread it erases; nothing was deleted: delete it after the "
                             f"run returns (or from another thread's run)")
        # (a run of the thread refused meanwhile waits for the end: _await_removal)
        with _RemovalUnderway(self.store, prefix):
            self._delete_thread(prefix)

    def _delete_thread(self, prefix: bytes) -> None:
        # (a run of the thread loaded before it is cut off: its later saves are refused,
        # its node transactions too — one in flight conflicts with the purge)
        cut = _CutOff(self.store, prefix, False)
        cut.begin(_marks_now(self.store))
        try:
            self.store.purge(prefix)
        except (ErasureOwed, CommitOutcomeUnknown):
            # (committed, or may have: the marks stay, the removal's renewed)
            cut.end((_removal_mark(self.store), cut.marked[1]))
            raise
        except BaseException:
            # not committed (a full disk, a conflict): the thread is all there, so its
            # runs are not cut off — the marks as they were, as a refused rewind leaves
            # them (else the run in flight lost its next checkpoint, told its step was
            # undone), or as another undo under way made them (_mark_end)
            cut.end(None)
            raise
        else:  # (marked again once committed: an id made after this is of a new run,
            cut.end((_removal_mark(self.store), cut.marked[1]))  # see _checkpoint_removed)
        finally:  # (also when it raised: an ErasureOwed purge committed, the thread is
            self.codec.forget(prefix)  # gone; forgetting a live one costs a cache miss)

    def _drop_checkpoint(self, tx: Any, ns: Namespace, cid: str, rec: dict) -> None:
        tx.delete(ns.checkpoint(cid))
        for k in [k for k, _v in tx.scan(prefix=ns.writes_of(cid))]:
            tx.delete(k)
        if rec.get("r") is not None:
            tx.delete(ns.run(rec["r"], cid))

    def _collect_blobs(self, tx: Any, ns: Namespace, kept: list[dict]) -> None:
        """Delete the namespace's blobs no kept checkpoint needs (delta bases included)."""
        need: set[bytes] = set()
        for rec in kept:
            versions = self.codec.loads(rec["c"]).get("channel_versions", {})
            for ch, ver in versions.items():
                need.update(self.codec.chain_keys(tx.get, ns, ch, ver))
        for k in [k for k, _v in tx.scan(prefix=ns.blobs()) if k not in need]:
            tx.delete(k)

    def _namespaces(self, tx: Any, thread_prefix: bytes) -> dict[bytes, dict[str, dict]]:
        """ns part -> {checkpoint_id: record} of every namespace of a thread."""
        out: dict[bytes, dict[str, dict]] = {}
        for k, rec in tx.scan(prefix=self.keys.all_checkpoints(thread_prefix)):
            _ns, ns_part, cid = self.keys.parse_checkpoint(thread_prefix, k)
            out.setdefault(ns_part, {})[cid] = rec
        return out

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        run_ids = [str(r) for r in run_ids]
        if not run_ids:
            return
        for thread_prefix in list(self._thread_prefixes()):
            def delete(tx, tp=thread_prefix):
                touched: set[bytes] = set()
                for run in run_ids:
                    runs = self.keys.runs_of(tp, run)
                    for key, _v in list(tx.scan(prefix=runs)):
                        ns_part, cid = self.keys.parse_run(runs, key)
                        ns = Namespace(tp, ns_part)
                        rec = tx.get(ns.checkpoint(cid))
                        if rec is not None:
                            self._drop_checkpoint(tx, ns, cid, rec)
                        tx.delete(key)
                        touched.add(ns_part)
                if touched:
                    self._removing(tp)
                    tx.delete(self.keys.fresh_start(tp))   # (it compensates nothing)
                for ns_part in touched:
                    kept = [rec for _k, rec in tx.scan(prefix=Namespace(tp, ns_part)
                                                       .checkpoints())]
                    self._collect_blobs(tx, Namespace(tp, ns_part), kept)
                return bool(touched)
            if self._run(delete, scope=thread_prefix, meta=self._meta("delete_for_runs")):
                self.codec.forget(thread_prefix)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob, pending write and run entry of a thread (its
        whole key range: the complete parent chain, as DeltaChannel needs).

        The source is read at one snapshot; the copy is written one transaction per
        checkpoint, oldest first (every namespace, by checkpoint id), each with the blobs
        it is the first to need, its run entries and the pending writes of the checkpoint
        before it (a final transaction: the newest one's writes and anything else of the
        range).  So the copy's checkpoints were saved one after another, as the source's
        were, and :meth:`rewind` of the copy to any of them leaves exactly that one as
        its head (one transaction for all would make every copied checkpoint the same
        moment).  A copy cut short by a crash (or an error) holds the source's oldest
        checkpoints, each with its blobs and run entries and every one but the newest of
        them with its pending writes: the newest of them without its pending writes (they
        come in the next transaction, as the source's came after its save; a graph
        resumed from it runs that step's tasks again, as after a crash between a ``put``
        and its ``put_writes``).  Carrying them in the checkpoint's own transaction
        would make a rewind of the copy to it keep writes a rewind of the source undoes.

        The target must be a thread with nothing stored: a target that already has
        checkpoints or pending writes (the source itself included) raises ValueError
        naming it, and nothing is written — the copy would merge both histories into one
        thread (both heads' lines interleaved by id, the newest of either taken as its
        head).  Delete it first (``delete_thread``) or copy to a new thread id; a copy
        cut short by a crash is such a target too.  The check is made in the copy's
        first transaction, so a writer racing into the target meanwhile is seen.

        The copy is noted (``_copies``, per store object): new input on the source's
        head whose step a run of this process left unfinished leaves the finished
        branches' work while the copy holds that head too (``_undo_abandoned``)."""
        src, dst = str(source_thread_id), str(target_thread_id)
        src_p, dst_p = self.thread_scope(src), self.thread_scope(dst)
        self._refuse_existing_target(self.store, src, dst, dst_p)
        checkpoints = self.keys.all_checkpoints(src_p)
        blobs = src_p + BLOB
        # The snapshot is a transaction kept open (rolled back at the end) and read a step
        # at a time: the source was read whole into memory first, every value of the
        # thread at once (240 checkpoints of 100 KB: 32.6 MB; a long thread, all of it).
        # What plans the steps is held: each key, each checkpoint's record, and of a
        # blob only whether it is a delta, and of which base.
        for attempt in range(_READ_RETRIES + 1):
            snap = self._transaction(None, NO_SCOPE)  # (reads only: rolled back at the end)
            try:
                index = self._read_index_for_copy(snap, src_p, checkpoints, blobs)
                break
            except ConflictError:  # (SnapshotTooOld: history trimmed under the read)
                snap.rollback()
                if attempt >= _READ_RETRIES:
                    raise
            except BaseException:
                snap.rollback()
                raise
        try:
            meta = self._meta("copy_thread", source=src, target=dst)
            for n, keys in enumerate(self._copy_steps(src_p, index)):
                data = {k: snap.get(k) for k in keys}

                def step(tx, keys=keys, data=data, first=(n == 0)):
                    if first:  # (in the read set: a writer racing into it conflicts)
                        self._refuse_existing_target(tx, src, dst, dst_p)
                    self._copy_rows(tx, keys, data, src_p, dst_p, dst, checkpoints)
                self._run(step, scope=dst_p, meta=meta)
        finally:
            if snap.state == "active":
                snap.rollback()
        self.codec.forget(dst_p)
        copies = _copies(self.store)
        with _REMOVALS_LOCK:   # (the copy records what the source's heads record)
            copies.setdefault(src_p, set()).add(dst_p)
            copies.move_to_end(src_p)
            while len(copies) > _MARKS_MAX:
                copies.popitem(last=False)

    @staticmethod
    def _refuse_existing_target(src: Any, source: str, target: str, dst_p: bytes) -> None:
        """ValueError when thread ``target`` (prefix ``dst_p``) has anything stored, read
        from ``src`` (the store, or a copy transaction); its fresh-start mark alone is
        not (``_undo_on_fresh_start``: a run began on it and saved nothing)."""
        row = _first(src.scan(start=dst_p, end=dst_p + FRESH)) or \
            _first(src.scan(start=prefix_end(dst_p + FRESH), end=prefix_end(dst_p)))
        if row is None:
            return
        same = " (it is the source itself)" if source == target else ""
        raise ValueError(f"copy_thread({source!r}, {target!r}): thread {target!r} already "
                         f"has checkpoints or pending writes{same}, and copying into it "
                         f"would merge both histories into one thread; nothing was "
                         f"copied.  Delete it first (delete_thread({target!r})) or copy to "
                         f"a new thread id")

    def _read_index_for_copy(self, snap: Any, src_p: bytes, checkpoints: bytes,
                             blobs: bytes) -> dict[bytes, Any]:
        """The source thread's keys as ``_copy_steps`` plans them: a checkpoint's record
        as it is, a delta blob as ``{"b": its base}``, anything else as True."""
        index: dict[bytes, Any] = {}
        fresh = self.keys.fresh_start(src_p)
        for k, v in snap.scan(prefix=src_p):
            if k == fresh:
                continue   # (the source's runs' mark, not the copy's)
            if k.startswith(checkpoints):
                index[k] = v
            elif k.startswith(blobs) and isinstance(v, dict):
                index[k] = {"b": v.get("b")}
            else:
                index[k] = True
        return index

    def _copy_rows(self, tx: Any, keys: list[bytes], data: dict[bytes, Any], src_p: bytes,
                   dst_p: bytes, dst: str, checkpoints: bytes) -> None:
        """One copy transaction: ``keys`` of the source, as read at its snapshot."""
        for k in keys:
            v = data[k]
            if v is None:
                continue
            if k.startswith(checkpoints):
                v = dict(v)
                v.pop("t", None)
                v.pop("s", None)  # (the source's step transactions, not the copy's)
                if is_hashed(dst):
                    v["t"] = dst
            tx.put(dst_p + k[len(src_p):], v)

    def _copy_steps(self, src_p: bytes, data: dict[bytes, Any]) -> list[list[bytes]]:
        """The source thread's keys grouped into copy transactions, in commit order (see
        :meth:`copy_thread`)."""
        n = len(src_p) + 1  # past the thread prefix and the kind byte
        order: list[tuple[str, bytes, bytes]] = []          # (checkpoint id, ns part, key)
        writes: dict[tuple[bytes, str], list[bytes]] = {}
        runs: dict[tuple[bytes, str], list[bytes]] = {}
        rest: list[bytes] = []
        for k in data:
            kind = k[n - 1:n]
            try:
                if kind == CHECKPOINT:
                    _ns, ns_part, cid = self.keys.parse_checkpoint(src_p, k)
                    order.append((cid, ns_part, k))
                    continue
                if kind == WRITE:
                    _ns, i = read_part(k, n)
                    cid = k[i:].split(b"\x00", 1)[0].decode("utf-8")
                    writes.setdefault((k[n:i], cid), []).append(k)
                    continue
                if kind == RUN:
                    _run, i = read_part(k, n)
                    _ns, j = read_part(k, i)
                    runs.setdefault((k[i:j], k[j:].decode("utf-8")), []).append(k)
                    continue
            except (ValueError, IndexError, UnicodeDecodeError):
                pass  # not the saver's layout: copied in the last transaction
            if kind != BLOB:
                rest.append(k)
        order.sort()
        placed: set[bytes] = set()
        steps: list[list[bytes]] = []
        previous: tuple[bytes, str] | None = None
        for cid, ns_part, key in order:
            step: list[bytes] = []
            ns = Namespace(src_p, ns_part)
            versions = self.codec.loads(data[key]["c"]).get("channel_versions", {})
            for ch, ver in versions.items():
                for blob in self.codec.chain_keys(data.get, ns, ch, ver):
                    if blob in data and blob not in placed:
                        placed.add(blob)
                        step.append(blob)
            step.append(key)
            step.extend(runs.pop((ns_part, cid), ()))
            if previous is not None:
                step.extend(writes.pop(previous, ()))
            previous = (ns_part, cid)
            steps.append(step)
        last = [k for k in data if k[n - 1:n] == BLOB and k not in placed]
        if previous is not None:
            last.extend(writes.pop(previous, ()))
        for group in (*writes.values(), *runs.values()):
            last.extend(group)
        last.extend(rest)
        if last:
            steps.append(last)
        return steps

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep each namespace's newest checkpoint, and, when the graph
        uses DeltaChannel, the ancestors (with their writes) back to where every delta
        channel of that checkpoint has a stored snapshot, so its value still rebuilds;
        ``"delete"``: delete the threads."""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r} "
                             f"(use 'keep_latest' or 'delete')")
        for thread_id in [str(t) for t in thread_ids]:
            if strategy == "delete":
                self.delete_thread(thread_id)
                continue
            prefix = self.thread_scope(thread_id)

            def prune(tx, tp=prefix):
                for ns_part, records in self._namespaces(tx, tp).items():
                    ns = Namespace(tp, ns_part)
                    keep = self._needed_for_latest(tx, ns, records)
                    for cid, rec in records.items():
                        if cid not in keep:
                            self._drop_checkpoint(tx, ns, cid, rec)
                    self._collect_blobs(tx, ns, [records[c] for c in keep])
            self._removing(prefix)  # (a late pending write of a dropped one: refused)
            self._run(prune, scope=prefix, meta=self._meta("prune", thread_id=thread_id))
            self._removing(prefix)
            self.codec.forget(prefix)

    def _needed_for_latest(self, tx: Any, ns: Namespace, records: dict[str, dict]) -> set[str]:
        """The newest checkpoint and the ancestors its DeltaChannel values are rebuilt
        from (LangGraph's ``counters_since_delta_snapshot`` names those channels)."""
        latest = max(records)
        metadata = self.codec.loads(records[latest]["m"]) or {}
        delta_channels = set((metadata.get("counters_since_delta_snapshot") or {}).keys())
        if not delta_channels:
            return {latest}
        chain, _seeds = self._delta_chain(tx, ns, latest, records[latest], delta_channels)
        return {latest, *chain}

    # ---- versions ----------------------------------------------------------------------
    def get_next_version(self, current: str | int | float | None, channel: None = None) -> str:
        """``<counter, 10 digits>.<12 random hex>``: increasing, and unique across forks.

        Shorter than LangGraph's stock 49-character versions (they are repeated in every
        checkpoint's ``channel_versions`` and ``versions_seen``); a thread begun with the
        stock format continues correctly (the counter is read from either)."""
        if current is None:
            n = 0
        elif isinstance(current, (int, float)):
            n = int(current)
        else:
            n = int(str(current).split(".")[0])
        return f"{n + 1:010d}.{random.getrandbits(48):012x}"

    # ---- rewinding one thread ----------------------------------------------------------
    def checkpoint_lsn(self, config: RunnableConfig) -> "walstore.LSN":
        """The walstore log position of the commit that saved this checkpoint (the
        latest of the thread/namespace when the config names none)."""
        ns, cid = self._address(config)
        return self._created_at(ns.checkpoint(cid), self._named(config, cid), cid)

    def rewind_point(self, config: RunnableConfig) -> "walstore.LSN":
        """Where :meth:`rewind` rewinds to (the commits after it that it keeps:
        :meth:`rewind_plan`)."""
        return self.rewind_plan(config)[0]

    def rewind_plan(self, config: RunnableConfig) -> tuple["walstore.LSN", list[int]]:
        """See :meth:`_rewind_plan`."""
        return self._rewind_plan(config)[:2]

    def _rewind_plan(self, config: RunnableConfig
                     ) -> tuple["walstore.LSN", list[int], int | None]:
        """(the LSN :meth:`rewind` rewinds the thread to, the txids of the thread's
        commits after it that the rewind keeps: ``store.rewind(to, scope=, keep=)``).

        The point is the commit that saved the checkpoint.  LangGraph saves pending
        writes in the background, out of order, whatever the durability: a commit after
        the point that holds nothing but late writes of the run that made the checkpoint
        is kept, so the checkpoints the thread keeps keep those writes.  Such a write is
        a regular write of a task (not LangGraph's null task, which carries a run's
        input: ``Command`` resume, goto, update) on an ancestor whose child on the
        checkpoint's line was made by that ancestor's own step (metadata source
        ``"loop"``), committed before anything that shows another run began (a null-task
        write, or a checkpoint built on an ancestor beside the line).  Everything else of
        the thread after the point is undone: checkpoints, node transactions and their
        actions, whatever order they came in.

        With ``durability="async"`` the checkpoint's own save may land after work of the
        steps that follow it (:meth:`_early_work`): the point then moves to just before
        the oldest of that work, and the thread's other commits from there (the save
        itself among them) are kept.  When that work is the store's very first commit, no
        position lies before it: the point is that commit, and the third item its txid,
        which :meth:`rewind` undoes in the rewind's own transaction
        (``store.rewind(include=)``; else None)."""
        thread_id, _ns_name, _cid = _rewind_where(config)
        ns, cid = self._address(config)
        point = int(self._created_at(ns.checkpoint(cid), self._named(config, cid), cid))
        prefix, scope = ns.writes(), self.thread_scope(thread_id)
        checkpoints = ns.checkpoints()
        # The line (T's run id, its ancestors, those whose child on the line their own
        # step made) is read lazily, from one snapshot, only as far as the commits after
        # the point ask (:class:`_Line`): every ancestor was read (and its child's metadata
        # decoded), so rewinding one step of a thread of 3,000 checkpoints read 3,000.
        for attempt in range(_READ_RETRIES + 1):
            keep: list[int] = []
            late_on: dict[int, set[str]] = {}   # (a kept late write: the checkpoints it is on)
            tx = known = None
            try:
                for info in self._commits_after(point):  # oldest first, as far as needed
                    if not self._of_thread(info, scope):
                        continue  # (another thread's: a scoped rewind leaves it alone)
                    if known is None:
                        tx = self._transaction(None, NO_SCOPE)  # (reads only: rolled back)
                        known = _Line(self, tx, ns, cid)
                    if self._another_run(info, ns, cid, known, prefix, checkpoints,
                                         known.run_id):
                        break
                    if not info.actions and info.keys and all(
                            self._late_write(key, ns, prefix, known.made_by_step)
                            for key in info.keys):
                        keep.append(info.txid)
                        late_on[info.txid] = self._writes_on(info, scope)
                break
            except ConflictError:  # (SnapshotTooOld: history trimmed under the read)
                if attempt >= _READ_RETRIES:
                    raise
            finally:
                if known is not None:
                    known.close()
                if tx is not None and tx.state == "active":
                    tx.rollback()
        early = self._early_work(config, point)
        if early is None:
            return walstore.LSN(point), keep, None
        # (late writes on a checkpoint a step of the undone work was built on record that
        # work as done: undone with it, _early_work)
        keep = [t for t in keep if not late_on.get(t, set()) & early[3]]
        return early[0], early[1] + keep, early[2]

    def _commits_after(self, lsn: int | None, page: int = 256) -> Iterator[Any]:
        """The store's commits after ``lsn`` (None: all), oldest first, a page of
        ``store.log`` at a time, the first pages short (16, 64, then ``page``): a walk
        that stops early reads no further."""
        size = min(16, page)
        while True:
            infos = self.store.log(limit=size, oldest_first=True,
                                   since=None if lsn is None else walstore.LSN(lsn))
            yield from infos
            if len(infos) < size:
                return
            lsn = int(infos[-1].lsn)
            size = min(size * 4, page)

    def _commits_between(self, since: float, point: int) -> Iterator[Any]:
        """The store's commits up to LSN ``point``, oldest first, from where commits were
        last made before the time ``since`` (within ``_CLOCK_SLACK``: commit times are
        taken as commits queue, not quite in log order).  That start is found by bisecting
        the log by commit time (``store.log(limit=1, since=LSN)`` probes, ``_log_start``),
        so the cost is the commits from ``since`` to ``point``, not the store's age."""
        lo = self._log_start(since, point)
        try:
            for info in self._commits_after(lo if lo > 0 else None):
                if int(info.lsn) > point:
                    return
                yield info
        except HistoryTrimmed:  # (trimmed under the walk: nothing older to find)
            return

    def _log_start(self, since: float, point: int) -> int:
        """An LSN at or below ``point`` such that the commits after it include every one
        made from the time ``since`` on (within ``_CLOCK_SLACK``), and few before."""
        when = since - _CLOCK_SLACK
        lo, hi = 0, point  # the start lies in [lo, hi]; the first commit after lo < when
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                first = self.store.log(limit=1, since=walstore.LSN(mid), oldest_first=True)
            except HistoryTrimmed:  # (older than the retained history: nothing there)
                lo = mid + 1
                continue
            if not first or first[0].timestamp >= when:
                hi = mid
            else:
                lo = min(max(int(first[0].lsn), mid + 1), hi)
        return lo

    def _another_run(self, info: Any, ns: Namespace, cid: str, older: Any,
                     prefix: bytes, checkpoints: bytes, run_id: Any = None) -> bool:
        """Does commit ``info`` show that a run other than the one that made checkpoint
        ``cid`` (``run_id``) began: a null-task write (a run's input) in the namespace, a
        checkpoint put whose parent is one of ``cid``'s ancestors (``older``), beside the
        line, or one another run made (LangGraph waits for a run's background saves
        before the run returns: no late write of ``cid``'s run comes after it)."""
        for key in info.keys:
            if not isinstance(key, bytes):
                continue
            if key.startswith(prefix):
                at = key[len(prefix):].split(b"\x00", 1)[0].decode("utf-8", "replace")
                try:
                    task, _idx = self.keys.parse_write(ns.writes_of(at), key)
                except (ValueError, IndexError, UnicodeDecodeError):
                    continue
                if task == NULL_TASK_ID:
                    return True
            elif key.startswith(checkpoints):
                other = key[len(checkpoints):].decode("utf-8", "replace")
                if other == cid or other in older:
                    continue
                rec = next((v.value for v in self.store.history(key)
                            if v.lsn == info.lsn and not v.deleted), None)
                if isinstance(rec, dict) and (rec.get("p") in older or (
                        run_id is not None and rec.get("r") not in (None, run_id))):
                    return True
        return False

    def _early_work(self, config: RunnableConfig, point: int
                    ) -> tuple["walstore.LSN", list[int], int | None, set[str]] | None:
        """Work of the thread that belongs after checkpoint ``cid`` (its step's and later
        steps' node transactions, checkpoints and pending writes) but committed at or
        before ``point``: LangGraph's ``durability="async"`` saves a checkpoint in the
        background while the steps after it already run, so a booking of the next step
        can commit before the checkpoint's own save.  None when there is none; else (the
        LSN just before the oldest of it, the txids of the thread's commits from there to
        ``point`` that are not such work: kept by the rewind, ``store.rewind(keep=)``; the
        checkpoints the steps listed by later checkpoints were built on, ``bases``).

        Such work is known by the ids it names (LangGraph's checkpoint ids are uuid6,
        ordered by time): a checkpoint of any namespace made after ``cid``, a pending
        write on ``cid`` or a later checkpoint, and the node transactions whose logged
        meta names a step built on ``cid`` or later (``_stamp_step`` stamps each as it
        begins: durable, so a rewind in another process or after a kill -9 finds those of
        a step whose checkpoint was never saved; they began after ``cid`` was made, so the
        log is read from then to ``point`` only, :meth:`_commits_between`) or that a later
        checkpoint's record lists as its step's (``"s"``, noted by :meth:`put`: stores
        written before the stamp).  The thread's
        commits from the oldest of it to ``point`` are kept only when known to be work
        from before ``cid`` (:meth:`_before`), except pending writes on the checkpoint a
        step a later checkpoint lists was built on (its parent): they record that step's
        undone work as done.  A checkpoint
        of a subgraph is made in the middle of its parent graph's step, whose checkpoint,
        made later, lists all that step's node transactions, its sibling tasks' too:
        their bookings were undone while their pending writes on the parent's checkpoint
        (older than ``cid``) were kept, the state saying booked what the world had
        refunded, and the resume took the tasks as done (h6, stop 77).  The rest is
        undone.  (When the oldest is
        the store's very first commit, no position lies before it: the rewind goes to it
        and undoes it too, in one transaction, ``store.rewind(include=)``.)"""
        thread_id, _ns_name, _cid = _rewind_where(config)
        _ns, cid = self._address(config)
        made = _uuid6_time(cid)
        if made is None:
            return None  # (ids not from LangGraph's clock: no order to go by)
        scope = self.thread_scope(thread_id)
        later_keys: set[bytes] = set()
        step_txids: set[int] = set()
        bases: set[str] = set()   # (the checkpoints the listed steps were built on)
        # Of each namespace (subgraphs' too) only the keys from ``cid`` on are read
        # (``_rows_from``): every checkpoint and pending write of the thread was read, so
        # rewinding one step of a thread of 3,000 checkpoints read 6,000 rows (0.53 s).
        for key, rec in self._rows_from(scope, CHECKPOINT, cid):
            try:
                _n, _part, other = self.keys.parse_checkpoint(scope, key)
            except (ValueError, IndexError, UnicodeDecodeError):
                continue
            if other > cid and _uuid6_time(other) is not None:
                later_keys.add(key)
                listed = rec.get("s") if isinstance(rec, dict) else None
                if isinstance(listed, list):
                    step_txids.update(t for t in listed
                                      if isinstance(t, int) and not isinstance(t, bool))
                    if listed and isinstance(rec.get("p"), str):
                        bases.add(rec["p"])
        for key, _v in self._rows_from(scope, WRITE, cid):
            other = self._write_checkpoint(scope, key)
            if other is not None and other >= cid and _uuid6_time(other) is not None:
                later_keys.add(key)
        oldest, oldest_txid = None, None
        # and the node transactions whose meta names a step built on ``cid`` or a later
        # checkpoint (``_stamp_step``), a step whose checkpoint was never saved (a task
        # failed, an interrupt, a run still going or killed) among them: each began after
        # ``cid`` was made, so only the commits from then to ``point`` are read
        for info in self._commits_between(made - _CLOCK_SLACK, point):
            if info.scope == scope and any(
                    at >= cid and _uuid6_time(at) is not None
                    for at in _stamped_steps(info.meta)):
                step_txids.add(info.txid)
                if oldest is None or int(info.lsn) < oldest:
                    oldest, oldest_txid = int(info.lsn), info.txid
        for key in later_keys:
            try:
                lsn = int(self._created_at(key, "key"))
            except KeyError:
                continue
            if lsn <= point and (oldest is None or lsn < oldest):
                oldest = lsn
                oldest_txid = next((v.txid for v in self.store.history(key)
                                    if int(v.lsn) == lsn), None)
        for txid in step_txids:
            try:
                lsn = int(self.store.txn_info(txid).lsn)
            except (KeyError, WalstoreError):
                continue  # (never committed, or trimmed)
            if lsn <= point and (oldest is None or lsn < oldest):
                oldest, oldest_txid = lsn, txid
        if oldest is None:
            return None
        keep, first = [], None
        for info in self._commits_after(max(oldest - 1, 0)):
            if info.lsn > point:
                break
            if not self._of_thread(info, scope):
                continue
            if info.txid not in step_txids and self._before(info, scope, cid) \
                    and not self._writes_on(info, scope) & bases:
                keep.append(info.txid)  # (else: the steps' after ``cid``, undone)
        if oldest == 0:  # (the store's very first commit: no position lies before it)
            first = oldest_txid
        return walstore.LSN(max(oldest - 1, 0)), keep, first, bases

    def _rows_from(self, scope: bytes, kind: bytes, cid: str,
                   skip_after: int = 32) -> Iterator[tuple[bytes, Any]]:
        """The thread's rows of one kind (checkpoints, pending writes) whose id — what
        follows the namespace part — is ``cid`` or later, every namespace's, in key
        order (with any key not of the saver's layout: the caller's parse decides).

        One scan of the kind's range that, in a namespace with more than ``skip_after``
        rows below ``cid``, seeks to ``cid``'s place in it: a long namespace costs a seek,
        not its rows, and the one-checkpoint namespaces a subgraph makes at each call are
        read as they come (a seek for each of those, 4,000 of them, took 0.17 s where
        reading them took 0.03).  An id sorts as its key bytes do (UTF-8), and a pending
        write's id is followed by a NUL, so a row skipped here has an id below ``cid``."""
        base = scope + kind
        raw = cid.encode("utf-8")
        start, end = base, prefix_end(base)
        while True:
            seek = None
            rows = self.store.scan(start=start, end=end)
            try:
                ns_part, below = None, 0
                for key, value in rows:
                    try:
                        _ns, i = read_part(key, len(base))
                    except (ValueError, IndexError):
                        yield key, value
                        continue
                    if key[i:] >= raw:
                        yield key, value
                        continue
                    part = key[len(base):i]
                    if part != ns_part:
                        ns_part, below = part, 0
                    below += 1
                    if below > skip_after:
                        seek = base + part + raw
                        break
            finally:
                rows.close()
            if seek is None:
                return
            start = seek

    def _write_checkpoint(self, scope: bytes, key: bytes) -> str | None:
        """The checkpoint id a pending write key of the thread ``scope`` is for."""
        try:
            _n, i = read_part(key, len(scope) + 1)
            return key[i:].split(b"\x00", 1)[0].decode("utf-8")
        except (ValueError, IndexError, UnicodeDecodeError):
            return None

    def _writes_on(self, info: Any, scope: bytes) -> set[str]:
        """The checkpoints commit ``info`` writes pending writes of the thread ``scope``
        on."""
        on = set()
        for key in info.keys:
            if isinstance(key, bytes) and key.startswith(scope) \
                    and key[len(scope):len(scope) + 1] == WRITE:
                other = self._write_checkpoint(scope, key)
                if other is not None:
                    on.add(other)
        return on

    def _before(self, info: Any, scope: bytes, cid: str) -> bool:
        """Is commit ``info`` known to be the thread's work from before checkpoint ``cid``
        (its own save, an ancestor's save, pending writes of an ancestor): no actions, and
        every key a checkpoint (with its blobs and run index) not made after ``cid``, or a
        pending write on a checkpoint made before it.  A node transaction is never known
        to be: one that commits after work of ``cid``'s step began is that step's or a
        later one's (the steps before ``cid`` ended before ``cid`` was made)."""
        if info.actions or not info.keys:
            return False
        for key in info.keys:
            if not (isinstance(key, bytes) and key.startswith(scope)):
                return False
            kind = key[len(scope):len(scope) + 1]
            if kind == CHECKPOINT:
                try:
                    other = self.keys.parse_checkpoint(scope, key)[2]
                except (ValueError, IndexError, UnicodeDecodeError):
                    return False
                if other > cid:
                    return False
            elif kind == WRITE:
                other = self._write_checkpoint(scope, key)
                if other is None or other >= cid:
                    return False
            elif kind not in (BLOB, RUN):
                return False
        return True

    @staticmethod
    def _of_thread(info: Any, scope: bytes) -> bool:
        """Does commit ``info`` belong to the thread whose prefix is ``scope``?"""
        return (info.scope == scope
                or any(isinstance(k, bytes) and k.startswith(scope) for k in info.keys)
                or any(isinstance(a, dict) and a.get("scope") == scope for a in info.actions))

    def _late_write(self, key: Any, ns: Namespace, prefix: bytes,
                    made_by_step: Any) -> bool:
        """Is ``key`` a regular task's pending write on one of ``made_by_step``?"""
        if not (isinstance(key, bytes) and key.startswith(prefix)):
            return False
        try:
            at = key[len(prefix):].split(b"\x00", 1)[0].decode("utf-8")
            if at not in made_by_step:
                return False
            task, idx = self.keys.parse_write(ns.writes_of(at), key)
        except (ValueError, IndexError, UnicodeDecodeError):
            return False
        return task != NULL_TASK_ID and isinstance(idx, int) and idx >= 0

    def _address(self, config: RunnableConfig) -> tuple[Namespace, str]:
        """(namespace, checkpoint id) a rewind's config names: its checkpoint_id, else the
        namespace's newest (read, not loaded: ``get_tuple`` marked the caller's config
        as a run's load, so a rewind changed the config it was given)."""
        thread_id, ns_name, cid = _rewind_where(config)
        ns = self.keys.at(thread_id, ns_name)
        if not cid:
            latest = self._read(lambda tx: self._latest(tx, ns))
            if latest is None:
                where = f" (namespace {ns_name!r})" if ns_name else ""
                raise walstore.UnknownPoint(f"thread {thread_id!r}{where} has no checkpoint "
                                            f"to rewind to; nothing was changed",
                                            thread_id)  # (a KeyError too)
            cid = latest[0]
        return ns, cid

    @staticmethod
    def _named(config: RunnableConfig, cid: str) -> str:
        """``checkpoint 'id' of thread 't'`` (and its namespace when not the root's)."""
        thread_id, ns_name, _cid = _rewind_where(config)
        where = f", namespace {ns_name!r}" if ns_name else ""
        return f"checkpoint {cid!r} of thread {thread_id!r}{where}"

    def _created_at(self, key: bytes, what: str, point: Any = None) -> "walstore.LSN":
        """The LSN of the commit that created ``key``'s current value (not a re-put)."""
        versions = self.store.history(key)
        if not versions or versions[0].deleted:
            # (a WalstoreError and a KeyError: a bare KeyError named no walstore error)
            raise walstore.UnknownPoint(f"no {what} in the store (deleted, or never "
                                        f"saved); nothing was changed",
                                        what if point is None else point)
        lsn = versions[0].lsn
        for i in range(1, len(versions)):
            older = versions[i]
            if older.deleted:
                # a deletion undone since (a revert of the rewind that deleted it) brought
                # back the value it deleted: the checkpoint was saved before it, and a
                # rewind to the undo would undo nothing (the undo restored everything)
                before = versions[i + 1] if i + 1 < len(versions) else None
                if (before is not None and not before.deleted
                        and before.value == versions[i - 1].value):
                    continue
                break
            lsn = older.lsn
        return walstore.LSN(int(lsn))

    def rewind(self, config: RunnableConfig, dry_run: bool = False, meta: Any = None) -> Any:
        """Rewind ONE thread to the moment the checkpoint ``config`` names was saved.

        ``store.rewind(to, scope=<thread prefix>)`` with ``to`` the LSN of the commit that
        saved the checkpoint (:meth:`rewind_point`): the thread's later checkpoints and pending writes (every
        namespace, subgraphs included) are undone, and so is what its later steps wrote
        and did in transactions that belong to the thread (memory items, the agent's own
        keys, actions, whose compensations run, newest first); other threads are
        untouched.  The thread's newest checkpoint is that checkpoint again, so the graph
        resumes from it.  History is kept: the rewind can be reverted (``store.revert``;
        walstore refuses, or with ``force=True`` marks ``needs-redo``, the actions whose
        compensations ran).  Returns the rewind's :class:`walstore.TxnInfo` (None when
        nothing came after the checkpoint), or with ``dry_run=True`` walstore's plan
        (``.as_dict()``: transactions undone, keys that change, compensations that would
        run) and changes nothing.

        LangGraph saves pending writes in the background (checkpoints too with its
        default ``durability="async"``), so they may commit out of order: the rewind
        keeps the late writes of the steps before the checkpoint, and undoes work of the
        steps after it that committed before the checkpoint's save, the save itself kept
        (:meth:`rewind_plan`, ``store.rewind(keep=)``).  Anything else of the thread after
        the checkpoint is undone, so the thread and the world agree: a booking made by a
        node of the step after it is compensated, as that step will run again.  (When the
        store's very first commit is such work, no position lies before it: the rewind
        goes to it and undoes it in the same transaction, ``store.rewind(include=)``: a
        crash leaves both or neither.)  A node transaction of a step that never got a
        checkpoint (a task failed, the process was killed) is found by the step its meta
        names (``STEP_META``), in any process, after a restart too.

        A run of the thread inside a node while it rewinds is fenced at its next
        checkpoint and pending writes (``StaleCheckpointError``), and so is a walstore
        transaction its node begins without ``scope=`` (it belongs to the thread): one
        begun before the rewind raises ConflictError at commit (its actions are
        compensated), one begun after it is refused when it begins — whatever the
        durability: each is fenced against undo of its thread (``Transaction.undo_fence``),
        so one begun while its step's checkpoint is still being saved (``"async"``)
        conflicts too.  A run of the thread that loaded it before the rewind (in this
        process) is refused at its next checkpoint and pending writes, whatever checkpoint
        the rewind kept (``_refuse_cut_off``).  Called from a node of the thread's own
        run, it raises ValueError and changes nothing (as ``delete_thread`` does).
        ``store.rewind(to, scope=self.thread_scope(t))`` made by another caller cuts off
        the thread's runs the same way (the saver's undo watcher, ``_watch_undo``), as
        do an unscoped rewind and a ``store.purge`` of the thread.  A ``store.revert``
        cuts off no run: reverting a node's transaction compensates its bookings and
        puts back its keys, but the thread's checkpoints (separate transactions) still
        say what the node returned; to undo a thread's steps, rewind it (this method).
        """
        thread_id, _ns, _cid = _rewind_where(config)
        if dry_run:
            return self._rewind(config, thread_id, True, meta)
        if current_thread_scope() == self.thread_scope(thread_id):
            # (it failed with a StaleCheckpointError saying to "reload the thread and
            # retry": the rewind, a transaction of the node, is fenced against the very
            # undo it makes — as delete_thread's purge was: probe h3, stop 74)
            raise ValueError(f"rewind of thread {thread_id!r} was called from a node of "
                             f"that thread's own run, which would go on from the step it "
                             f"undoes; nothing was rewound: rewind it after the run "
                             f"returns (or from another thread's run)")
        # (a run of the thread refused meanwhile waits for the end, compensations too,
        # before it hears that its step was undone: _await_removal)
        with _RemovalUnderway(self.store, self.thread_scope(thread_id)):
            return self._rewind(config, thread_id, False, meta)

    def _rewind(self, config: RunnableConfig, thread_id: str, dry_run: bool,
                meta: Any) -> Any:
        to, keep, first = self._rewind_plan(config)
        scope = self.thread_scope(thread_id)
        cut = None
        if not dry_run:
            # noted before it commits too: a node transaction begun just after the commit
            # finds its step's checkpoint missing and must take it as removed
            cut = _CutOff(self.store, scope, False, rewind=True)
            cut.begin(_marks_now(self.store))
        try:
            result = self.store.rewind(to, scope=scope, dry_run=dry_run, keep=keep,
                                       include=[first] if first is not None else None,
                                       meta=meta if meta is not None
                                       else self._meta("rewind", thread_id=thread_id,
                                                       checkpoint_id=get_checkpoint_id(config)))
        except CommitOutcomeUnknown:
            if cut is not None:
                cut.end(cut.marked)  # (it may have committed: the marks stay)
            raise
        except BaseException:
            if cut is not None:  # refused (RevertConflict, ...): nothing was changed
                cut.end(None)
            raise
        if cut is not None:
            cut.end(_marks_now(self.store) if result is not None else None)
            self.codec.forget(scope)
        return result

    # ---- async twins (a mutating one, cancelled, still waits for its commit's outcome) --
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None
                    ) -> AsyncIterator[CheckpointTuple]:
        # Streamed as ``list`` is, a few checkpoints per hop to a worker thread (1, 2, 4
        # ... up to _ALIST_BATCH): it decoded every checkpoint of the thread, channel
        # values and all, before yielding the first, so an ``async for`` that stops early
        # (``aget_state_history`` read until a match) held the whole thread in memory
        # (160 checkpoints of 100 KB: 33 MB, where ``list`` holds one).  A batch runs to
        # its end even when the consumer is cancelled, so the generator is never closed
        # while a worker thread advances it.
        rows = self.list(config, filter=filter, before=before, limit=limit)
        size = 1
        try:
            while True:
                batch = await finish_despite_cancel(
                    lambda n=size: list(itertools.islice(rows, n)))
                for item in batch:
                    yield item
                if len(batch) < size:
                    return
                size = min(size * 2, _ALIST_BATCH)
        finally:
            rows.close()

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        return await finish_despite_cancel(
            lambda: self.put(config, checkpoint, metadata, new_versions))

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await finish_despite_cancel(lambda: self.put_writes(config, writes, task_id, task_path))

    async def adelete_thread(self, thread_id: str) -> None:
        await finish_despite_cancel(lambda: self.delete_thread(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await finish_despite_cancel(lambda: self.delete_for_runs(run_ids))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await finish_despite_cancel(lambda: self.copy_thread(source_thread_id, target_thread_id))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await finish_despite_cancel(lambda: self.prune(thread_ids, strategy=strategy))

    async def aget_delta_channel_history(self, *, config: RunnableConfig,
                                         channels: Sequence[str]) -> Mapping[str, dict]:
        return await asyncio.to_thread(
            lambda: self.get_delta_channel_history(config=config, channels=channels))

    async def arewind(self, config: RunnableConfig, dry_run: bool = False,
                      meta: Any = None) -> Any:
        return await finish_despite_cancel(lambda: self.rewind(config, dry_run, meta))


# ---- the scope of a transaction begun inside a graph node -------------------------------
def current_thread_scope() -> bytes | None:
    """The thread prefix of the LangGraph run this code runs in (inside a graph node
    whose checkpointer is a WalstoreSaver), else None.  walstore calls this when a
    transaction begins without ``scope=``."""
    try:
        from langgraph.config import get_config
        config = get_config()
    except (ImportError, RuntimeError):
        return None
    conf = config.get("configurable") or {}
    saver = conf.get(CHECKPOINTER_KEY)
    thread_id = conf.get("thread_id")
    if isinstance(saver, WalstoreSaver) and thread_id is not None:
        return saver.thread_scope(str(thread_id))
    return None


def fence_node_transaction(store: "walstore.Store", tx: Any) -> None:
    """walstore calls this with each transaction the provider above named the scope of, as
    it begins: fenced against a rewind or delete of its thread (``_fence_step``) when it
    is a transaction of the store that holds the thread."""
    try:
        from langgraph.config import get_config
        config = get_config()
    except (ImportError, RuntimeError):
        return
    conf = config.get("configurable") or {}
    saver = conf.get(CHECKPOINTER_KEY)
    thread_id = conf.get("thread_id")
    if isinstance(saver, WalstoreSaver) and saver.store is store and thread_id is not None:
        fence, meta = tx.undo_fence, tx.meta
        try:
            _fence_node_transaction(store, tx, saver, str(thread_id), conf)
        except BaseException:
            # (refused: the transaction as it was.  Left fenced, an action or files a
            # scope guard refused, the transaction still open, passed unchecked when
            # tried again in it (``guard_node_scope`` took the fence for the checks):
            # the cut-off run's booking after the rewind stood -- stop 75, h2)
            tx.undo_fence, tx.meta = fence, meta
            raise


def _fence_node_transaction(store: "walstore.Store", tx: Any, saver: "WalstoreSaver",
                            thread_id: str, conf: Mapping) -> None:
    """``fence_node_transaction``'s work, for a transaction of ``saver``'s store."""
    checkpoint_map = conf.get("checkpoint_map") or {}
    task_ns = conf.get("checkpoint_ns")
    _stamp_step(tx, checkpoint_map, _task_chain(task_ns, "", checkpoint_map)
                if isinstance(task_ns, str) else ())
    if saver.fencing:
        # a rewind of the thread (or its delete) committed after this began makes its
        # commit conflict, whatever it read (its snapshot is taken now): a booking of
        # a step the rewind undid, begun before it, stood beside the rewound thread
        prefix = saver.thread_scope(thread_id)
        add_undo_fence(tx, prefix)   # (beside a fence a guard set: both)
        if _removing_here(store, prefix):
            # (work for an undo reaching the thread made in this context: the undo's own
            # transaction, begun in a node -- an unscoped store.rewind, or one around
            # threads, was refused by the cut-off it had just marked, "the thread was
            # rewound", nothing undone -- or its compensators'.  Neither waits for it
            # nor is refused by it; the run is cut off at its next save once it
            # committed, and never reverts them: they are the undo's)
            saver._note_step_txn(tx, thread_id, conf, checkpoint_map, undo_work=True)
            return
        # (a rewind or delete of the thread running in another Python thread is
        # waited for, before the transaction reads: one of a run that loaded the
        # thread after the rewind began, committed before it, was undone by it,
        # and the run's next checkpoint, saved before the rewind marked its runs
        # cut off once committed, said the step was done.  Not on an event loop's
        # thread (an async node's own code): that blocked every task of the loop
        # for the whole removal, compensations included, and a compensator that
        # needs the loop (an async client's) for _REMOVAL_WAIT_S twice; refused
        # there instead.  The run's saves, in worker threads, still wait)
        on_loop = _on_event_loop()
        if on_loop and _removal_underway(store, prefix):
            raise StaleCheckpointError(
                f"thread {thread_id!r}: a rewind or delete_thread of it is under way in "
                f"another Python thread, and a walstore transaction begun on the event "
                f"loop cannot wait for its end without blocking the loop, so it was "
                f"refused and nothing was written (retry once the removal ended, or "
                f"begin it in asyncio.to_thread, where it waits)",
                thread_id, "", None, None)
        budget: dict = {}
        if not on_loop:
            _await_removal(store, prefix, budget)
            if saver.undo_on_resume:
                # (new input's discard of an unfinished step's work, and a retried
                # node's earlier attempts' work, before this transaction's snapshot:
                # _discard_early, _undo_superseded; on an event loop the input
                # checkpoint's save does the first, as a compensator may need the loop)
                _outside_node(lambda: saver._discard_early(thread_id, conf,
                                                           checkpoint_map))
                saver._undo_superseded(thread_id, conf, checkpoint_map)
        while True:
            try:
                saver._fence_step(tx, thread_id, checkpoint_map, conf)
                break
            except StaleCheckpointError as e:
                # (refused for a rewind or delete of the thread still under way: told
                # once it ended; begun again when it failed without committing)
                if e.head is not None or on_loop or not _await_removal(
                        store, prefix, budget) or any(
                        saver._cut_off(conf, ns_name, saver.keys.at(thread_id,
                                                                    ns_name))
                        for ns_name in checkpoint_map if isinstance(ns_name, str)):
                    raise
        saver._note_step_txn(tx, thread_id, conf, checkpoint_map)


def guard_node_scope(store: "walstore.Store", tx: Any, scope: Any) -> None:
    """walstore calls this when a transaction declares its scope itself (``scope=`` at its
    begin, an action's, a scoped workspace's files; ``register_scope_guard``): inside a
    graph node, work declared in the node's own thread (its prefix, or a scope inside it)
    is fenced as a transaction the provider named would be (``fence_node_transaction``).
    Before (stop 75), ``store.transaction(scope=saver.thread_scope(tid))`` in a node
    skipped the provider, so a cut-off run's booking made after a rewind or delete of
    its thread committed and stood."""
    prefix = current_thread_scope()
    if prefix is None or type(scope) is not type(prefix) or not scope.startswith(prefix):
        return
    if fenced_for(tx, prefix):
        return   # (fenced already: begun unscoped in the node, or guarded before)
    fence_node_transaction(store, tx)


def _stamp_step(tx: Any, checkpoint_map: Mapping, chain: tuple[str, ...] = ()) -> None:
    """Name, in ``tx``'s meta (logged with its commit), the checkpoint each namespace's
    step builds on (``{STEP_META: {ns: checkpoint id}}``) and the task of the outermost
    graph it is work of (``TASK_META``, when known: the last of ``chain``,
    ``_task_chain``) with the tasks that called it (``CALLERS_META``, outermost first,
    when any): the durable link from a node
    transaction to its step, so a rewind in any process, after a restart too, finds the
    work of a step whose checkpoint was never saved (:meth:`WalstoreSaver._early_work`),
    and a run resuming the thread after a kill tells a task whose outcome was saved
    from one the kill cut off (:meth:`WalstoreSaver._undo_on_resume`).
    A dict meta gains the entries; None becomes one; any other meta is wrapped
    (``{"meta": it, STEP_META: ...}``)."""
    steps = {ns: cid for ns, cid in checkpoint_map.items()
             if isinstance(ns, str) and isinstance(cid, str)}
    if not steps:
        return
    stamp: dict = {STEP_META: steps}
    if chain:
        stamp[TASK_META] = chain[-1]
        if len(chain) > 1:
            stamp[CALLERS_META] = list(chain[:-1])
    meta = tx.meta
    if meta is None:
        tx.meta = stamp
    elif isinstance(meta, dict):
        tx.meta = {**meta, **stamp}
    else:
        tx.meta = {"meta": meta, **stamp}


def _fresh_mark(value: Any) -> tuple[int | None, int | None]:
    """(since, opened) of a thread's fresh-start mark (``SaverKeys.fresh_start``); (None,
    None) when absent or not one."""
    if isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value[0], value[1]
    return None, None


def _chain_of(meta: Any) -> tuple[str, ...]:
    """The task chain (``_task_chain``: callers outermost first, then the task) a node
    transaction's meta names (``_stamp_step``); () when it names no task (a walstore
    before stop 78 named none).  Without ``CALLERS_META`` (stop 78's walstore named no
    callers) they are read from its step's stamp (``_stamped_callers``): before, a
    store killed by it between a ``@task``'s save and its caller's, resumed by this
    one, still had the booking refunded while the caller's saved result held it."""
    if not isinstance(meta, dict):
        return ()
    task = meta.get(TASK_META)
    if not isinstance(task, str) or not task:
        return ()
    callers = meta.get(CALLERS_META)
    if not isinstance(callers, list):
        callers = _stamped_callers(meta.get(STEP_META))
    return tuple(c for c in callers if isinstance(c, str) and c) + (task,)


def _stamped_callers(steps: Any) -> list[str]:
    """The tasks that called a node transaction's task, outermost first, as its step's
    stamp (``STEP_META``: its run config's ``checkpoint_map``) tells them: a caller's
    namespace maps to the outermost graph's checkpoint, the one its call runs in
    (``_call_caller``; a subgraph's maps to the subgraph's own), and nests in the
    namespace of the caller that called it."""
    if not isinstance(steps, dict) or len(steps) < 2:
        return []   # (a node of the outermost graph: the common case, read per commit)
    here = steps.get("")
    if not isinstance(here, str):
        return []
    callers = sorted((ns for ns, cid in steps.items()
                      if isinstance(ns, str) and ns and cid == here),
                     key=lambda ns: ns.count("|"))
    return [ns.rpartition("|")[2].rpartition(":")[2] for ns in callers]


def _stamped_steps(meta: Any) -> list[str]:
    """The checkpoint ids a node transaction's meta names as its step's (``_stamp_step``)."""
    steps = meta.get(STEP_META) if isinstance(meta, dict) else None
    if not isinstance(steps, dict):
        return []
    return [cid for cid in steps.values() if isinstance(cid, str)]


def _register_scope_provider() -> bool:
    try:
        from walstore.agent.scope import register_scope_provider
    except ImportError:  # a walstore without scopes: nothing to register
        return False
    register_scope_provider(current_thread_scope, on_begin=fence_node_transaction)
    from walstore.agent.scope import register_scope_guard
    register_scope_guard(guard_node_scope)
    return True


SCOPE_PROVIDER_REGISTERED = _register_scope_provider()


# ---- rewinds and purges made on the store itself -----------------------------------------
# the live savers of each store object: the key roots the undo watchers look threads up
# under, the codecs whose caches a committed undo clears
_SAVERS: "weakref.WeakKeyDictionary[Any, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_WATCHING = False


def _note_saver(saver: "WalstoreSaver") -> None:
    """Note ``saver`` among its store's (``_SAVERS``) and, with the process's first saver,
    register the undo watcher with walstore."""
    global _WATCHING
    with _REMOVALS_LOCK:
        _SAVERS.setdefault(saver.store, weakref.WeakSet()).add(saver)
        first, _WATCHING = not _WATCHING, True
    if first:
        from walstore.agent.scope import register_undo_watcher
        register_undo_watcher(_watch_undo)


def _savers_of(store: Any) -> list["WalstoreSaver"]:
    with _REMOVALS_LOCK:
        savers = _SAVERS.get(store)
        return list(savers) if savers else []


def _own_thread(store: Any) -> bytes | None:
    """The thread prefix of the LangGraph run whose node this code runs in, when its
    checkpointer is a saver of ``store``; else None."""
    try:
        from langgraph.config import get_config
        conf = get_config().get("configurable") or {}
    except (ImportError, RuntimeError):
        return None
    saver = conf.get(CHECKPOINTER_KEY)
    thread_id = conf.get("thread_id")
    if isinstance(saver, WalstoreSaver) and saver.store is store and thread_id is not None:
        return saver.thread_scope(str(thread_id))
    return None


def _thread_prefix_of(root: bytes, key: bytes) -> bytes | None:
    """The prefix of the thread ``key`` (a key or scope starting with a saver's ``root``)
    lies in; None when it stops inside the thread's own part (a scope around some
    threads).  Read from the key alone: no lookup."""
    try:
        _thread_id, end = read_part(key, len(root))
    except (IndexError, ValueError):
        return None
    return key[:end] if end <= len(key) else None


def _reached_by(roots: set[bytes], scope: Any, targets: dict[bytes, bool]) -> None:
    """Add to ``targets`` (key -> wide) what an undo of ``scope`` (None: unscoped) reaches
    of the threads under ``roots``: a thread's prefix (a scope equal to it or inside it),
    or a scope around threads (``wide``: unscoped, ``b"lg"``, a part of a thread's part)."""
    if scope is None:
        targets[b""] = True
        return
    if not isinstance(scope, bytes):
        return   # (a str scope holds no thread's bytes keys)
    for root in roots:
        if root.startswith(scope):
            targets[scope] = True
        elif scope.startswith(root):
            prefix = _thread_prefix_of(root, scope)
            if prefix is None:
                targets[scope] = True
            else:
                targets.setdefault(prefix, False)


class _CutOff:
    """The cut-off of the runs of the threads under ``key`` (a thread's prefix, or a scope
    around threads: ``wide``) by an undo, in this process: ``WalstoreSaver.rewind`` and
    ``delete_thread`` of the thread, or a ``store.rewind``/``store.purge`` reaching it
    (``_watch_undo``), made as the undo begins, renewed once it committed, taken out when
    it changed nothing (``_mark_end``: others under way overlapping keep theirs).  The
    marks given are made once for all the threads one undo on the store reaches
    (``_cut_off_runs``: several when savers' roots nest), and so is ``_RemovalUnderway``
    (the threads' saves and node transactions in other Python threads wait for its end,
    compensations included; the undoing context's own, its compensators', do not): made
    per thread, a store.revert reaching 20,000 threads (when reverts were watched) read
    the newest log entry twice a thread, grew the context's tuple and scanned every
    value cache (477 s)."""

    def __init__(self, store: Any, key: bytes, wide: bool, rewind: bool = False) -> None:
        # (``rewind``: the undo is a rewind, not a purge: once committed it is noted in
        # ``_UNDOS`` too, and a run it cut off undoes, when refused, the bookings of its
        # unsaved steps the rewind left standing; a purge's in ``_ERASES``, and such a
        # run undoes nothing)
        self.store, self.key, self.wide, self.rewind = store, key, wide, rewind
        self.marked: tuple = ()

    def _dicts(self) -> tuple[dict, dict]:
        if self.wide:
            return _wide(self.store, "removals"), _wide(self.store, "rewinds")
        return _removals(self.store), _rewinds(self.store)

    def begin(self, mine: tuple) -> None:
        """Mark: ``mine`` is (removal mark, monotonic time) made now."""
        limit = _WIDE_MAX if self.wide else _MARKS_MAX
        removals, cuts = self._dicts()
        _mark_begin(removals, self.key, mine[0], limit)
        try:
            _mark_begin(cuts, self.key, mine[1], limit)
        except BaseException:
            _mark_end(removals, self.key, mine[0], None, limit)
            raise
        self.marked = mine

    def end(self, renewed: tuple | None) -> None:
        """The undo ended: ``renewed`` (the marks made now) once it committed, None when
        it changed nothing (the marks as they were, unless renewed since)."""
        removals, cuts = self._dicts()
        limit = _WIDE_MAX if self.wide else _MARKS_MAX
        for marks, mark, new in zip((removals, cuts), self.marked, renewed or (None, None)):
            _mark_end(marks, self.key, mark, new, limit)
        if renewed is not None:   # (a rewind's in _UNDOS, an erasure's in _ERASES)
            kind = "undos" if self.rewind else "erases"
            undos = _wide(self.store, kind) if self.wide else _per_thread(self.store, kind)
            with _REMOVALS_LOCK:
                now = undos.get(self.key)
                _set_mark(undos, self.key, renewed[1] if now is None
                          else max(now, renewed[1]), limit)
        if renewed is not None and self.wide:   # (what a scope inside it marked is older)
            with _REMOVALS_LOCK:
                for marks in (removals, cuts):
                    for k in [k for k in marks if k != self.key and k.startswith(self.key)
                              and (id(marks), k) not in _MARKING]:
                        del marks[k]


def _marks_now(store: Any) -> tuple:
    """(removal mark, monotonic time) made now, for every thread one undo reaches."""
    return (_removal_mark(store), time.monotonic())


def _cut_off_runs(store: Any, targets: dict[bytes, bool]) -> Callable[[bool], None] | None:
    """Cut off the runs of ``targets`` (``_CutOff``), except a thread the undo is made
    for by the saver itself (``saver.rewind``, ``delete_thread``) and the thread of the
    node this undo is made in (its own run goes on, as a session's turn that rewinds its
    session); returns the end the undo watcher calls."""
    if not targets:
        return None
    own = _own_thread(store)
    rewind = undo_kind() != "purge"
    cuts = [_CutOff(store, key, wide, rewind) for key, wide in sorted(targets.items())
            if not (_removing_here(store, key) or (not wide and key == own))]
    if not cuts:
        return None
    underway = _RemovalUnderway(store, [cut.key for cut in cuts])
    underway.__enter__()
    begun: list[_CutOff] = []
    try:
        marks = _marks_now(store)
        for cut in cuts:
            cut.begin(marks)
            begun.append(cut)
    except BaseException:
        try:
            for cut in reversed(begun):
                cut.end(None)
        finally:
            underway.__exit__(None, None, None)
        raise

    def end(committed: bool) -> None:
        error: BaseException | None = None
        try:
            renewed = None
            if committed:
                try:
                    renewed = _marks_now(store)
                except BaseException as e:  # noqa: BLE001 - (the marks stay as made)
                    error, renewed = e, begun[0].marked
            for cut in reversed(begun):   # (each one's end, whatever another's raised)
                try:
                    cut.end(renewed)
                except BaseException as e:  # noqa: BLE001 - (raised once all ended)
                    error = error or e
            if committed:
                for saver in _savers_of(store):
                    if len(begun) > 16:   # (one pass over the cache, not one a thread)
                        saver.codec.forget(None)
                    else:
                        for cut in begun:
                            saver.codec.forget(cut.key)
        finally:
            underway.__exit__(None, None, None)
        if error is not None:
            raise error
    return end


def _roots(store: Any) -> set[bytes]:
    return {saver.keys.root for saver in _savers_of(store)}


def _watch_undo(store: Any, scope: Any) -> Callable[[bool], None] | None:
    """walstore calls this before a ``store.rewind`` or ``store.purge`` begins, in the
    undoing thread (``walstore.agent.scope.register_undo_watcher``): the runs in flight
    of each thread it reaches (scoped to the thread's prefix, to a scope inside it or to
    one around it; unscoped: every thread) are cut off as by ``saver.rewind`` of the
    thread.  Its cost is that of a few dict updates: a thread is found from the scope's
    own bytes, and a scope around threads is marked once (``_WIDE``), no thread listed.
    Returns its end (None: the undo reaches no thread of a saver of ``store``)."""
    roots = _roots(store)
    if not roots:
        return None
    targets: dict[bytes, bool] = {}
    _reached_by(roots, scope, targets)
    return _cut_off_runs(store, targets)
