"""Reversible files, the store's side (issue 12; the library is :mod:`walstore.files`,
the design is docs/FILES.md): registered workspaces, the file operations of a
transaction (``tx.files(ws)``), ``watch()``, and the undo of file effects — by a
rollback, a ``rollback_to``, or the next open after a crash.

The write-ahead rule for files: every operation first stores the before-image of each
path it touches (content in the blob store, durable), then logs FILE_STEPS (durable),
then changes the workspace; a ``watch()`` first stores a manifest of the tree (every
tracked file's content) and logs WATCH_BEGIN, and logs the changes it found as FILE_STEPS
after the block.  Every change is an *effect* in ``tx.effects``, in the order logged,
interleaved with actions, so ``rollback_to`` and rollback undo files and compensations
together, newest first (:mod:`walstore.agent.hooks`).

Undo is idempotent (a path already in its before-image is left alone) and never
overwrites a stranger: a path that is neither walstore's after-image nor the before-image
keeps the stranger's version, walstore's is saved under ``<store>/quarantine/files/``, and
a FILE_CONFLICT record says so.  Each undone effect is recorded once (FILE_RESTORED, which
removes its ``fsteps`` row).  What a crash left undone is in ``fsteps``: ``settle`` runs it
at open, before ``walstore.open`` returns, newest first across transactions.  What a
transaction dropped without an end (garbage-collected) left while the store stays open is
undone before another transaction changes one of its paths (``_put_back_stale``), so no
change ever takes uncommitted content as its before-image.

Concurrency: one lock (``_lock``) around planning, logging and applying a change (so the
blob store's garbage collection never runs between a put and the record naming it), and
one lock per workspace held for a whole ``watch()`` block (a watch owns its workspace:
another thread's file operations there wait for it).  ``store.close()`` waits for the
file operations, watch() blocks and rollbacks other threads are running, and refuses new
operations and watches from other threads once it began (``refuse_new``, ``busy_elsewhere``,
``undoing_elsewhere``).  Across processes, ``files/gc.lock``
(``gc_exclusive``): the gc skips its run while ``walstore backup`` or ``verify`` reads the
blobs their snapshot names.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .. import fileio
from ..errors import ConflictError, CorruptionError, FileConflictError, StoreClosed, \
    StoreIOError, WalstoreError, os_errors_as_store_errors, os_errors_wrapped, type_and_message
from ..engine import tables
from ..engine.recovery import Problem, RecoveryReport
from ..files import (BlobStore, Change, Entry, FileConflict, Manifest, Workspace,
                     apply as fapply, diff, plan, remove_stray_temps, restore_changes,
                     snapshot, undo_order, undo_steps)
from ..files.entries import UnsupportedFileType, read_whole
from ..files.monitor import WorkspaceMonitor, forced_full_walk
from ..files.watch import passages
from ..files.monitor import available as monitor_available
from ..files.paths import (MAX_ROOT_AND_PATH_BYTES, PathLike, check_length, display,
                           fs_bytes, parent_of)
from ..log.format import RecordType
from ..signals import deferred
from .scope import add_commit_check

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..engine.transaction import Transaction

_T = RecordType
STEP_CHUNK = 4000          # steps per FILE_STEPS record (a big rmtree or watch: several)
# ... and their rows' bytes per record, about: a step is at most ~9 KB (a 499-byte path and
# two symlink rows of 4,095-byte targets), so 4,000 of them passed the 32 MiB record limit
# (log.format.MAX_PAYLOAD) and the operation failed with a bare record-size error (a watch:
# after the tool's changes, which were put back)
STEP_CHUNK_BYTES = 4 << 20
SYMLINK_HOPS = 40          # read() follows at most this many symlinks inside the root
CLAIMS_SLACK = 4096        # stale path claims kept before a prune (see Files._claim)
GC_AFTER_BYTES = 8 * 1024 * 1024  # before-image bytes that make a blob gc due (at least)
MANIFEST_REFS_KEPT = 200_000  # blob names of saved manifests the gc keeps in memory (<= ~25 MB)


def _fingerprint(root: bytes, rel: bytes) -> tuple | None:
    """What a read of a path can see change without reading it again: its type and mode,
    inode, size and times (None: absent)."""
    try:
        st = os.lstat(root + b"/" + rel if rel else root)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_mode, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _listing(ws: Workspace, rel: bytes) -> frozenset[bytes] | None:
    """The names in directory ``rel`` (no symlink followed), the workspace's ignored ones
    left out (None: no such directory)."""
    where = ws.root_b + b"/" + rel if rel else ws.root_b
    # opened in its parent pinned from the root (as a read): by its absolute path, a
    # parent swapped for a symlink to outside the root after the checks listed a
    # directory outside the root
    try:
        pin = fapply.pin_dir(ws, parent_of(rel)) if rel else None
    except (FileNotFoundError, ValueError):  # (a parent gone, or a file or symlink now:
        return None                          # no such directory as the workspace sees it)
    try:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = (os.open(where, flags) if pin is None
              else os.open(rel.rpartition(b"/")[2], flags, dir_fd=pin.fd))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # (a symlink there now)
            return None
        raise
    finally:
        if pin is not None:
            pin.close()
    try:
        if not ws.ignore.patterns:  # (nothing to ignore: no file type asked of any name)
            return frozenset(os.fsencode(n) for n in os.listdir(fd))
        with os.scandir(fd) as it:  # (the type from the directory entry: no stat each;
            # a symlink is no directory, as git and the manifests say: followed, a
            # directory-only pattern hid a symlink to a directory that watch() tracks)
            found = [(os.fsencode(d.name), d.is_dir(follow_symlinks=False)) for d in it]
    finally:
        os.close(fd)
    return frozenset(n for n, is_dir in found
                     if not ws.ignored((rel + b"/" + n) if rel else n, is_dir))


def _first_before(effects, root: bytes, path: bytes):
    """The before-image ``path`` of ``root`` had at the first change ``effects`` (one
    transaction's file effects, newest first, as ``effects_of`` and ``_owed_now`` give
    them) made to it; None when they never did."""
    for eff in reversed(effects):  # (oldest first: the first match is the first change)
        if eff.ws.root_b != root:
            continue
        for c in getattr(eff, "steps", None) or ():
            if c.path == path:
                return c.before
    return None


def _child(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


# a listed directory's key among a transaction's file reads: (root, rel, LISTED)
LISTED = "listed"


def _step_chunks(steps: list) -> list[list]:
    """The rows of ``steps`` cut into FILE_STEPS records: at most STEP_CHUNK steps and
    about STEP_CHUNK_BYTES of rows each (a step's row is never cut)."""
    chunks: list[list] = []
    rows: list = []
    size = 0
    for c in steps:
        row = c.to_row()
        n = len(c.path) + _row_bytes(row[1]) + _row_bytes(row[2]) + 16
        if rows and (len(rows) >= STEP_CHUNK or size + n > STEP_CHUNK_BYTES):
            chunks.append(rows)
            rows, size = [], 0
        rows.append(row)
        size += n
    if rows:
        chunks.append(rows)
    return chunks


def _row_bytes(entry_row: Any) -> int:
    """About what an Entry row packs to (its strings and bytes, 9 bytes per other item)."""
    if not isinstance(entry_row, (list, tuple)):
        return 16
    return sum(len(x) if isinstance(x, (str, bytes)) else 9 for x in entry_row)


def _row_since_ns(row: dict) -> int | None:
    """When the steps of an ``fsteps`` row began (``FileEffect.since_ns``): a watch's
    ``began``, else the record's ``ts``; None in a row logged before either was kept."""
    began = row.get("began")
    if isinstance(began, int) and not isinstance(began, bool):
        return began
    ts = row.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0:
        return int(ts * 1e9)
    return None


@dataclass(eq=False)
class FileEffect:
    """One file operation of a transaction: its steps, logged as FILE_STEPS record(s)."""

    ws: Workspace
    op: str
    steps: list
    lsns: list
    txid: int
    began_as: Any = None  # a watch's changes: the OpenWatch it replaced (see Savepoint)
    # a watch's changes: special files (FIFO, socket, device) the watched block left at
    # paths it changed or inside directories it made (rel -> (st_dev, st_ino,
    # st_ctime_ns), seen at the block's end; in memory only: after a crash such a file is
    # a conflict, as before).
    # Manifests skip them, so the steps say "absent" there; the undo removes such a file
    # while it is still that one (the block's own), then puts the path back
    specials: dict = field(default_factory=dict)
    # put back by a rollback_to whose FILE_RESTORED record failed (a log write error):
    # kept in the transaction, so its rollback records it (done again, a no-op); unkept,
    # the next open took it for owed and found the path further back (an older step of
    # the transaction undone since): a false conflict and a quarantined copy (sweep-files)
    put_back: bool = False
    # interrupted in its records' wait (never made), or failed in its change (put back,
    # or being put back), and no FILE_RESTORED says so (a log write failed, a second
    # interrupt): kept for the rollback, and no commit may name it (a caller that caught
    # the interrupt committed a delete never made: audit 67)
    never_made: bool = False
    # failed in its change, and its undo found these paths (shown absolute) changed behind
    # walstore's back: not put back whole, kept for the rollback to report; no commit may
    # name it (one did, the disk holding another's bytes where at() said walstore's: audit 68)
    undo_conflicts: list = field(default_factory=list)
    # when its change began (ns, wall clock; a watch's: when the block began; None: not
    # known, a row logged before it was): a directory its undo removes keeps the ignored
    # paths older than that (``apply._clear_ignored``: a watched ``mv src dst`` carries
    # src's ignored ``.env`` along, and the undo deleted it for good)
    since_ns: int | None = None

    @property
    def lsn(self) -> int:
        """The order of effects (newest first on undo): its last record."""
        return self.lsns[-1]

    @property
    def blocks_commit(self) -> str | None:
        """A commit would name a change that is no longer on disk (see ``put_back``)."""
        if self.never_made:
            return (f"its file operation {self.op!r} was interrupted or failed, and is not "
                    f"recorded as made nor as put back; roll the transaction back")
        if self.undo_conflicts:
            paths = self.undo_conflicts
            more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
            return (f"its file operation {self.op!r} failed and could not be put back "
                    f"whole: {', '.join(paths[:5])}{more} changed behind walstore's "
                    f"back; roll the transaction back (its rollback reports them)")
        if not self.put_back:
            return None
        return ("a rollback to a savepoint put a file change back but could not record it "
                "(a log write failed); roll the transaction back")


@dataclass(eq=False)
class OpenWatch:
    """A ``watch()`` whose block has not ended (or whose end could not be seen)."""

    ws: Workspace
    manifest: Manifest
    digest: str
    lsn: int
    txid: int
    blocks_rollback: str = ("a watch() block is still running; leave it before rolling back "
                            "to a savepoint taken before it")
    # a savepoint taken inside the block cannot be rolled back to: what the watched
    # processes changed after it cannot be told from what they changed before it
    blocks_inner_rollback: str = ("the savepoint was taken inside a watch() block (what the "
                                  "watched processes changed after it cannot be told from "
                                  "what they changed before it); roll back to a savepoint "
                                  "taken before the watch began or after it ended")

    # the FILE_STEPS records of the block's changes, once the first is appended (the
    # list ``log_steps`` fills): settled with the begin by a rollback before the WATCH_END
    # swapped them in — an interrupt between the two left them owed, undone again by the
    # next open over what it found (audit 67)
    ended_lsns: list = field(default_factory=list)
    # its begin's wait was interrupted: the block never ran, nothing in the tree is the
    # watch's — its rollback puts nothing back (its settling WATCH_END unlogged, a write
    # failed, the rollback put back a write another transaction had committed since)
    never_ran: bool = False
    # (the manifest at its end, the block's changes, the special files it left:
    # ``FileEffect.specials``) once its end's snapshot was taken:
    # an end whose records then failed (a log write error) is undone by putting back
    # those changes only, each checked, as ``_abandon_watch`` does — put back from the
    # manifest the block began with, a write another transaction committed since the
    # block ended was undone too, the store saying it stood (audit 68)
    seen: Any = None
    # why its end could not be recorded (the block is over): what a refused commit says
    # ("cannot commit while a watch() is open" said no block was running: audit 68)
    end_failed: str = ""

    @property
    def lsns(self) -> list[int]:
        return [self.lsn, *self.ended_lsns]


@dataclass
class Watch:
    """What ``with f.watch() as w:`` yields: after the block, ``changes`` lists what
    changed (``walstore.files.Change``: path, kind, before, after)."""

    workspace: Workspace
    changes: list = field(default_factory=list)


@dataclass
class FileUndo:
    """One path a revert or rewind puts back: to ``target``; walstore left it as
    ``expected`` (its newest undone after-image)."""

    ws: Workspace
    path: bytes
    target: Entry
    expected: Entry
    # no later than the undone change of the path (the oldest undone transaction's commit
    # time, ns; None: not known): see ``FileEffect.since_ns``
    since_ns: int | None = None
    # a directory already in its target whose mode denies its owner write or search
    # permission, put in only so that the undo can open it for the paths under it and
    # close it again (``watch._through_writable``); not listed in a plan's ``files``
    passage: bool = False


class UndoBatch:
    """Effects undone together, newest first (one rollback, one recovery).  For each
    step it knows the before-images of the OLDER steps of the batch on the same path:
    when an undo interrupted by a crash runs again, a path an older effect also changed
    may already be further back than this step's before-image, which is not a conflict
    (``undo_steps(done=...)``; a path still in the step's after-image is put back all the
    same: ``restore_status``)."""

    def __init__(self, effects: list) -> None:
        self._befores: dict[tuple[bytes, bytes], list] = {}
        self._keys: dict[int, tuple] = {}
        self._stopped: set[bytes] = set()  # workspaces where a put-back failed
        # (txid, root, path) a step of the batch left in conflict (see ``steps_of``)
        self._conflicted: set[tuple[int, bytes, bytes]] = set()
        for eff in effects:
            if not isinstance(eff, FileEffect):
                continue
            for i, c in enumerate(eff.steps):
                key = (eff.lsns[0], i)
                self._keys[id(c)] = key
                self._befores.setdefault((eff.ws.root_b, c.path), []).append(
                    (key, c.before, eff.txid))

    def put_back(self, eff: Any, undo: Callable[[], list]) -> tuple[list, Exception | None]:
        """``undo()`` — put ``eff`` back — unless a newer effect of its workspace failed to
        go back: (its conflicts, None), or ([], why) when it was held back or failed (an
        I/O error; the older effects of that workspace then wait for it).  Undo goes newest
        first: undone past a failed one, the directory a transaction made, still holding
        the file whose removal failed, was taken for a stranger's, recorded as a conflict
        and kept for good (sweep-files).  A held-back effect stays with the failed one
        (kept in the transaction, or owed to the next open)."""
        if eff.ws.root_b in self._stopped:
            return [], WalstoreError("not put back yet: a newer change in its workspace "
                                     "could not be, and undo goes newest first")
        try:
            return undo(), None
        except (OSError, ValueError, WalstoreError) as e:
            self._stopped.add(eff.ws.root_b)
            return [], e

    def resume(self, eff: Any) -> None:
        """``eff`` failed to go back and is tried again at once (room made meanwhile: the
        settle at open): its workspace is no longer held back."""
        self._stopped.discard(eff.ws.root_b)

    def done(self, eff: "FileEffect") -> Callable[[Change], list[Entry]]:
        root = eff.ws.root_b

        def older(c: Change) -> list[Entry]:
            key = self._keys.get(id(c))
            return [b for k, b, _t in self._befores.get((root, c.path), ()) if key is not None
                    and k < key]
        return older

    # One conflict per path and transaction (audit 58).  Undone step by step, a path the
    # transaction changed twice and another process changed since was a conflict at
    # each step: the newest kept its own before-image — the transaction's uncommitted
    # bytes — at ``quarantine/files/tx<N>/<path>``, the older ones the committed content
    # at ``<path>.1``, two conflicts reported for one path, the first pointing at a
    # version never committed.  Now the first conflict keeps (and names) the oldest
    # before-image of the path in the batch — what the undo would have put back — and the
    # older steps of that path are left out: the stranger's version stays.
    def steps_of(self, eff: "FileEffect") -> list:
        """``eff``'s steps less those of a path a newer step of its transaction left in
        conflict in this batch."""
        root = eff.ws.root_b
        return [c for c in eff.steps if (eff.txid, root, c.path) not in self._conflicted]

    def keep(self, eff: "FileEffect") -> Callable[[Change], Entry | None]:
        """The version a conflict of a step of ``eff`` keeps: the oldest before-image of
        its path among the batch's steps of the same transaction (None: its own)."""
        root = eff.ws.root_b

        def oldest(c: Change) -> Entry | None:
            key = self._keys.get(id(c))
            olds = [(k, b) for k, b, t in self._befores.get((root, c.path), ())
                    if key is not None and t == eff.txid and k < key]
            return min(olds, key=lambda kb: kb[0])[1] if olds else None
        return oldest

    def conflicted(self, eff: "FileEffect", conflicts: list) -> None:
        for c in conflicts:
            self._conflicted.add((eff.txid, eff.ws.root_b, c.path))


def is_file_effect(effect: Any) -> bool:
    return isinstance(effect, (FileEffect, OpenWatch))


def _digests(row: list | None) -> Iterator[str]:
    if row and row[0] == "f" and isinstance(row[3], str):
        yield row[3]


def abs_display(ws_root: bytes, path: bytes) -> str:
    """The absolute path of a workspace path, as a str (surrogate escapes kept)."""
    return os.fsdecode(ws_root + b"/" + path)


def no_room_to_undo(eff: Any, err: OSError, freed: int | None = None) -> OSError:
    """``err`` (a put-back of ``eff`` that ran out of disk) with what an operator needs
    to make room: the bytes the file named needs (the largest before-image of that path
    among ``eff``'s steps; a watch's: not known) and the bytes free on its file system
    now, after the store gave back ``freed`` bytes of its own (``Files.free_room``, at
    open; None: a rollback's, which frees nothing of the store's).  (It
    said only "No space left on device": not how much room, nor that it was the rest
    of the disk, not the store's own, that stood in the way.)"""
    name = err.filename if isinstance(err.filename, str) else None
    root = os.fsdecode(eff.ws.root_b)
    sizes = [c.before.size for c in getattr(eff, "steps", ()) or ()
             if c.before.is_file and abs_display(eff.ws.root_b, c.path) == name]
    try:
        st = os.statvfs(os.path.dirname(name) if name else root)
        free = f"its file system has {st.f_bavail * st.f_frsize} bytes free"
    except OSError:
        free = "its file system's free bytes are not known"
    what = f"putting back {name} needs {max(sizes)} bytes" if sizes else \
        f"putting back {name or 'its files'} needs room"
    msg = f"{err.strerror or err}; {what}, {free}" + (
        f" (after the store freed {freed} bytes of its own)" if freed is not None else "")
    return OSError(err.errno, msg, name) if name else OSError(err.errno, msg)


def _with_parents(paths: list[bytes]) -> set[bytes]:
    """``paths`` (workspace-relative) and every parent directory of each."""
    out = set(paths)
    for p in paths:
        cut = p.rfind(b"/")
        while cut > 0:
            p = p[:cut]
            if p in out:
                break
            out.add(p)
            cut = p.rfind(b"/")
    return out

class Files:
    """The store's reversible files (one per open store)."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.dir = os.path.join(engine.path, "files")
        self.quarantine_dir = os.path.join(engine.path, "quarantine", "files")
        self._blobs: BlobStore | None = None
        self._blobs_failed: OSError | None = None  # creating it: a directory fsync failed
        self._lock = threading.RLock()
        self._registry: dict[bytes, Workspace] = {}
        self._ws_locks: dict[bytes, threading.RLock] = {}
        if engine.durability == "none":  # (file changes not fsynced: see sync_workspaces)
            engine.before_log_sync.append(self.sync_workspaces)
        self._manifests: dict[bytes, Manifest] = {}
        # saved manifest digest -> the blobs it names (a manifest never changes: the gc
        # loads each once, not every retained watch()'s tree at every gc), oldest first,
        # at most MANIFEST_REFS_KEPT digests in all
        self._manifest_refs: dict[str, frozenset[str]] = {}
        self._manifest_refs_count = 0
        self._manifest_names: dict[str, str] = {}  # (one string per digest among them)
        # root -> its change monitor (inotify: watch()'s snapshots examine only what
        # changed; see files/monitor.py); closed by ``close_monitors``
        self._monitors: dict[bytes, WorkspaceMonitor] = {}
        self._gc_horizon = -1
        self._gc_written: int | None = None  # the blob store's bytes_written at the last gc
        self._pinned = PinnedLogRefs()  # what the pinned WAL's file records name
        self._gc_kept = 0                    # and the bytes that gc kept
        # the last gc kept blobs that unapplied events named (an inline gc in a loop of
        # file operations): the next checkpoint's, after the apply, may free them
        self._gc_kept_unapplied = False
        # path claims (see ``_claim``): (root, path) -> the txid that last changed it, and
        # each claimant's Transaction (weakly: a dropped one claims nothing)
        self._claims: dict[tuple[bytes, bytes], int] = {}
        # (root, directory) -> txids of claims below it (``_note_under``)
        self._under: dict[tuple[bytes, bytes], set[int]] = {}
        # root -> txids of claims in it (``_note_under``): what a listing of the root or
        # a watch() must put back first is looked for among them, not in every claim
        self._in_root: dict[bytes, set[int]] = {}
        self._claimants: dict[int, weakref.ref] = {}
        self._claims_seeded = False
        # what prepared transactions read (``hold_reads``), held against every change by
        # walstore until their decision: (root, path) -> the txids that read the path;
        # (root, directory) -> the txids that listed it; (root, path) -> the txids that
        # read or listed something at or below it (changing it changes what they read)
        self._read_holds: dict[tuple[bytes, bytes], set[int]] = {}
        self._list_holds: dict[tuple[bytes, bytes], set[int]] = {}
        self._hold_below: dict[tuple[bytes, bytes], set[int]] = {}
        self._holds_of: dict[int, list[tuple[bytes, bytes, bool]]] = {}
        # claimants that have ended (or were dropped) and are known to owe no undo (see
        # ``_put_back_stale``): a dead claimant logs nothing more, so this never changes
        self._settled: set[int] = set()
        # txids whose decision to roll back is logged while their undo runs (shared with
        # TwoPhase: ``rollback_prepared``): their claims hold until the paths are back
        self.undoing: set[int] = set()
        # root -> the watch() running there (the workspace lock's holder): another
        # transaction's file operation in the same thread would land in that watch's diff
        self._watching: dict[bytes, OpenWatch] = {}
        # what recovery kept aside of crashed watches (see ``_undo_open_watch``)
        self.watch_saved: list[dict] = []
        self._blob_bytes_noted = 0  # blob bytes already counted toward a checkpoint
        # close(): the file operations and watch() blocks each thread is inside now (thread
        # ident -> how many), and the thread closing the store once it began
        # (``refuse_new``): another thread's new operation or watch is then refused before
        # it logs or changes anything, and close() waits for those under way (their steps
        # must be logged before the log closes: audit 60)
        self._busy: dict[int, int] = {}
        self._busy_lock = threading.Lock()
        self._closing_thread: int | None = None
        # the rollbacks each thread is running (from before the ABORT to the end of the
        # undo; never refused): close() waits for them, else the log closed between the
        # ABORT and the undo, which then put nothing back and returned as if it had
        self._undoing: dict[int, int] = {}

    # ---- close() -------------------------------------------------------------------------
    def refuse_new(self) -> None:
        """From now on a file operation or ``watch()`` another thread than this one
        begins raises StoreClosed before it logs or changes anything."""
        with self._busy_lock:
            self._closing_thread = threading.get_ident()

    def busy_elsewhere(self) -> int:
        """How many file operations and ``watch()`` blocks other threads are inside now."""
        me = threading.get_ident()
        with self._busy_lock:
            return sum(n for t, n in self._busy.items() if t != me)

    def undoing_elsewhere(self) -> int:
        """How many rollbacks (undos of effects) other threads are running now: one per
        thread (a rollback is counted at its ABORT and again, nested, at its undo; a
        nested one, from its compensator, is part of it) — close() said "2 rollback(s)"
        of one (audit 68)."""
        me = threading.get_ident()
        with self._busy_lock:
            return sum(1 for t in self._undoing if t != me)

    @contextlib.contextmanager
    def undoing_here(self) -> Iterator[None]:
        """Counted while this thread ends a transaction without a commit and undoes its
        effects (see ``undoing_elsewhere``)."""
        with self._counted(self._undoing):
            yield

    @contextlib.contextmanager
    def _busy_here(self, what: str) -> Iterator[None]:
        """Counted while a file operation or a watch() block runs (see ``refuse_new``)."""
        def refuse_while_closing(me: int) -> None:
            closer = self._closing_thread
            # (one nested in an operation or watch this thread is inside already — a write
            # in a watch() block — is part of what close() waits for: let through)
            if closer is not None and closer != me and not self._busy.get(me):
                raise StoreClosed(f"store {self.engine.path} is closing: {what} was not "
                                  f"begun (nothing was logged or changed)")
        with self._counted(self._busy, refuse_while_closing):
            yield

    @contextlib.contextmanager
    def _counted(self, table: dict[int, int],
                 check: Callable[[int], None] | None = None) -> Iterator[None]:
        """This thread counted in ``table`` (``_busy`` or ``_undoing``) while the block
        runs; ``check(thread id)`` first, under the same lock, may refuse it."""
        me = threading.get_ident()
        with deferred(), self._busy_lock:
            if check is not None:
                check(me)
            table[me] = table.get(me, 0) + 1
        try:
            yield
        finally:
            with deferred(), self._busy_lock:
                n = table.pop(me) - 1
                if n:
                    table[me] = n

    def sync_workspaces(self) -> None:
        """Under durability="none" file changes are not fsynced as they are made: before
        the log is made durable (``store.sync()``, each checkpoint) the file systems of
        every workspace this process used, and of the store (its blobs, quarantine), are
        synced (Linux ``syncfs``, one call per file system), so a durable record never
        describes file bytes a power loss can still take.  A root gone meanwhile is passed
        over (nothing of it left to sync); any other OSError is raised (the log is not
        synced then)."""
        # (no lock: a checkpoint runs this, and a file operation holding ``_lock`` may
        # wait for the applier's checkpoint; dict.copy is one step under the GIL)
        roots = [os.fsdecode(r) for r in self._registry.copy()]
        if not roots:
            return
        seen: set[int] = set()
        for root in (*roots, self.engine.path):
            try:
                dev = os.stat(root).st_dev
            except FileNotFoundError:
                continue
            if dev in seen:
                continue
            seen.add(dev)
            try:
                fileio.syncfs(root)
            except FileNotFoundError:
                continue

    @property
    def durable(self) -> bool:
        """Are file changes fsynced?  Unless the store runs with durability="none"."""
        return self.engine.durability != "none"

    # ---- the blob store -------------------------------------------------------------
    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            if self._blobs_failed is not None:
                e = self._blobs_failed
                raise OSError(e.errno, f"an earlier fsync of the directory of the store's file "
                              f"content failed ({e.strerror}): no file content is stored until "
                              f"the store is reopened", e.filename)
            if self.engine.readonly and not os.path.isdir(os.path.join(self.dir, "blobs")):
                raise CorruptionError("this store keeps no file content (no files/blobs "
                                      "directory)", file=os.path.join(self.dir, "blobs"))
            try:
                if not self.engine.readonly:
                    fileio.make_dir(self.dir)
                self._blobs = BlobStore(os.path.join(self.dir, "blobs"),
                                        readonly=self.engine.readonly)
            except OSError as e:
                # the directory made, its entry's fsync failed: final (made again by the
                # next file operation, which found it there and stored before-images in a
                # directory a power loss may drop: sweep-files)
                if fileio.is_sync_failure(e):
                    self._blobs_failed = e
                raise
        return self._blobs

    def quarantine(self, txid: int) -> str:
        return os.path.join(self.quarantine_dir, f"tx{txid}")

    # ---- workspaces -----------------------------------------------------------------
    def rows(self) -> dict[bytes, dict]:
        """Registered workspaces: LMDB's rows with the unapplied events folded on top."""
        return self.engine.views.workspace_rows()

    def workspace(self, root: PathLike, ignore: Any = None, scope: Any = None) -> Workspace:
        """Register ``root`` (durably) or return the Workspace it is registered as."""
        from .scope import check_scope
        scope = check_scope(scope)
        named = self._registered_as_named(root)
        if named is not None:  # (see _registered_as_named)
            named.check_root()  # ValueError: no longer the directory registered
            return named
        probe = Workspace(root, ignore, exclude=[self.engine.path], scope=scope)
        real = probe.root_b
        if len(real) + 1 > MAX_ROOT_AND_PATH_BYTES:
            # (the root is the ``workspaces`` table's LMDB key, and with each path the file
            # history's: one past 511 bytes was logged, then failed the apply, and every
            # open of the store after it; one past 498 leaves room for no path at all)
            raise ValueError(f"workspace root {probe.root!r} is {len(real)} bytes long; a "
                             f"root and a path in it are at most {MAX_ROOT_AND_PATH_BYTES} "
                             f"bytes together (LMDB's keys are at most 511 bytes), so a "
                             f"root is at most {MAX_ROOT_AND_PATH_BYTES - 1}; nothing was "
                             f"registered")
        store = os.fsencode(os.path.realpath(self.engine.path))
        if real == store or real.startswith(store + b"/"):
            raise ValueError(f"workspace {probe.root!r} lies inside the store "
                             f"{self.engine.path!r}")
        with self._lock:
            views = self.engine.views
            row = views.workspace_row(real)  # (its row alone: reading every workspace's
            if row is not None:              # made N registrations cost N^2)
                ws = self._from_row(row)
                same_ignore = ignore is None or list(probe.ignore.sources) == list(
                    ws.ignore.sources)
                same_scope = scope is None or scope == ws.scope
                if same_ignore and same_scope:
                    return ws
            other = views.workspace_overlapping(real)
            if other is not None:
                raise ValueError(f"workspace {probe.root!r} overlaps the registered "
                                 f"workspace {os.fsdecode(other)!r}")
            self.engine.check_writable()
            new_ignore = list(probe.ignore.sources) if ignore is not None or row is None \
                else list(row.get("ignore") or ())
            new_scope = scope if scope is not None or row is None else row.get("scope")
            eng = self.engine
            event = eng.log_event(_T.WORKSPACE, {"root": real, "ignore": new_ignore,
                                                 "scope": new_scope, "ts": time.time()})
            # a failed fsync: the record is written, the next open may find the workspace
            # registered (or its patterns changed) — unknown, as a commit's (it raised the
            # log's plain LogFailed, and the reopen found it done: audit 67)
            eng.pipeline.durable_or_unknown(  # (txid None: no transaction, as adcebaa's)
                eng.journal.force_durable, event, None,
                f"the registration of workspace {probe.root!r}",
                "whether it is registered" if row is None else "whether it changed")
            ws = self._registry.get(real)
            if ws is None:
                ws = Workspace(real, new_ignore, exclude=[self.engine.path], scope=new_scope)
                self._registry[real] = ws
            else:  # the same object, updated in place
                fresh = Workspace(real, new_ignore, exclude=[self.engine.path],
                                  scope=new_scope)
                ws.ignore, ws.scope = fresh.ignore, fresh.scope
                self._manifests.pop(real, None)
                self._drop_monitor(real)
            return ws

    def _registered_as_named(self, root: Any) -> Workspace | None:
        """The registered workspace whose root ``root`` names as written (absolute,
        normalized, no symlink resolved) when resolving symlinks would name another
        directory: the root, or a directory on the way to it, is a symlink now.  That
        workspace is meant, and its ``check_root`` refuses every change (docs/GUIDE.md: a root
        replaced by a symlink, or reached through one, is refused live).  Resolved
        first, the path named the symlink's target, which was registered as a new
        workspace and written in (probe audit48).  None otherwise."""
        try:
            lexical = os.path.normpath(os.path.abspath(os.fsencode(root)))
        except (TypeError, ValueError):
            return None  # (the caller's own checks say what is wrong)
        if lexical not in self._registry and self.engine.views.workspace_row(lexical) is None:
            return None
        if os.path.realpath(lexical) == lexical:
            return None  # (the usual way: resolved, it is the same root)
        return self.registered(lexical, gone_ok=True)

    def _from_row(self, row: dict) -> Workspace:
        root = row["root"]
        with self._lock:
            ws = self._registry.get(root)
            if ws is None:
                ws = Workspace(root, row.get("ignore") or None, exclude=[self.engine.path],
                               scope=row.get("scope"), registered=True)
                self._registry[root] = ws
            return ws

    def registered(self, root: bytes, gone_ok: bool = False) -> Workspace:
        """The Workspace registered at ``root`` (bytes, realpath'd); ValueError if none.

        ``gone_ok``: a root that no longer exists or is no directory is no error, for
        what reads the store's own records of it: its recorded history
        (``store.workspaces()``, ``at(p).files(ws)``, the CLI's ``files`` and ``diff``: a
        copy restored or backed up onto another machine "reads file history too"; the
        tree deleted since) and a prepared transaction's file effects (``effects_of``).
        It was: ``walstore files`` exited 2 (a usage error), ``diff`` said "an unexpected
        error", and a transaction in doubt in such a workspace made every ``tx.files``
        change in any other workspace raise ValueError naming it (probe audit48).  Such
        a Workspace is not kept; the live tree's operations meet the OS's error there
        (nothing creates the root anew), and a change through ``tx.files`` still refuses
        it (``workspace()``)."""
        ws = self._registry.get(root)
        if ws is not None:
            return ws
        row = self.engine.views.workspace_row(root)
        if row is None:
            raise ValueError(f"{os.fsdecode(root)!r} is not a registered workspace")
        if not gone_ok:
            return self._from_row(row)
        try:
            return self._from_row(row)
        except ValueError:  # (the root is gone, or no directory: its history stays)
            return Workspace(root, row.get("ignore") or None, exclude=[self.engine.path],
                             scope=row.get("scope"), registered=True, missing_ok=True)

    def resolve_ws(self, ws_or_root: Any, register: bool = True,
                   gone_ok: bool = False) -> Workspace:
        """A Workspace of this store from a Workspace or a root path (registered now when
        ``register`` and not yet; ``gone_ok``: see ``registered``)."""
        if isinstance(ws_or_root, Workspace):
            root = ws_or_root.root_b
            if self._registry.get(root) is ws_or_root:
                return ws_or_root
            return self.registered(root, gone_ok) if not register else self.workspace(root)
        if not isinstance(ws_or_root, (str, bytes, os.PathLike)):
            raise TypeError(f"a workspace is a Workspace or a directory path, not "
                            f"{type(ws_or_root).__name__}")
        named = self._registered_as_named(ws_or_root)
        if named is not None:  # (its root is a symlink now: see _registered_as_named)
            return named
        real = os.path.realpath(os.path.abspath(fs_bytes(ws_or_root, "workspace root")))
        if real in self._registry:
            return self._registry[real]
        row = self.engine.views.workspace_row(real)
        if row is not None:
            return self.registered(real, gone_ok) if gone_ok else self._from_row(row)
        if not register:
            raise ValueError(f"{os.fsdecode(real)!r} is not a registered workspace")
        return self.workspace(real)

    def scope_of(self, root: bytes) -> Any:
        try:
            return self.registered(root).scope
        except ValueError:
            return None

    def _ws_lock(self, ws: Workspace) -> threading.RLock:
        with self._lock:
            lock = self._ws_locks.get(ws.root_b)
            if lock is None:
                lock = self._ws_locks[ws.root_b] = threading.RLock()
            return lock

    # ---- a transaction's operations -------------------------------------------------
    def tx_files(self, tx: "Transaction", ws_or_root: Any) -> "TxFiles":
        return TxFiles(self, tx, self.resolve_ws(ws_or_root))

    def log_steps(self, tx: "Transaction", ws: Workspace, op: str, steps: list,
                  durable: bool = True, watch: int | None = None,
                  began_ns: int | None = None,
                  known: Callable[[FileEffect], None] | None = None) -> FileEffect:
        """Log ``steps`` as FILE_STEPS record(s) (the last one ``durable``).  ValueError,
        nothing logged, when a path is too long for the file history's keys (a watch finds
        paths that no call named).  ``began_ns``: a watch's steps, when its block began
        (logged as ``began``: the undo's bound for ignored paths, ``FileEffect.since_ns``);
        other steps began now (``ts``).  ``known(effect)``: called as the first record is
        appended (its LSNs grow with the others'), before the wait for the disk (as an
        intent's ``appended``): an interrupt in the wait, or a failed fsync, left steps in
        the log that the transaction did not know — owed, never settled by its rollback,
        and the next open put back their before-images over what was found (a file the
        user had deleted by hand since, the delete never made, came back: audit 67)."""
        since_ns = began_ns if began_ns is not None else time.time_ns()
        for c in steps:
            check_length(ws.root_b, c.path)
        self._count_blob_bytes()
        tx.logged = True
        lsns: list[int] = []
        eff = FileEffect(ws, op, steps, lsns, tx.id, since_ns=since_ns)

        def appended(event) -> None:  # (``known`` at the FIRST record: an interrupt
            # between two records of a big operation left the first in the log, in no
            # effect — owed, as above; the effect's LSNs grow with the records after it)
            lsns.append(event.lsn)
            if len(lsns) == 1:
                known(eff)
        chunks = _step_chunks(steps)
        for i, rows in enumerate(chunks):
            body = {"tx": tx.id, "ws": ws.root_b, "op": op, "steps": rows,
                    "ts": self.engine.clock()}
            if watch is not None:
                body["watch"] = watch
            if began_ns is not None:
                body["began"] = began_ns
            last = i == len(chunks) - 1
            if known is not None:
                self.engine.log_event(_T.FILE_STEPS, body, tx.id, durable=durable and last,
                                      appended=appended)
            else:
                ev = self.engine.log_event(_T.FILE_STEPS, body, tx.id,
                                           durable=durable and last)
                lsns.append(ev.lsn)
        # retention moved the horizon since the last blob gc, or enough before-images were
        # written since: collect now, the steps just logged (in the MemTable) keeping
        # their blobs (the checkpoint's own attempt is skipped whenever a file operation
        # holds the lock, which a writer of many files nearly always does: a loop of
        # rolled-back 1 MiB writes grew files/ by 1 MiB a rollback, 601 MiB after 600)
        if self._blobs is not None and (self._horizon_moved() or self._bytes_due()):
            self.gc()
        return eff

    def run(self, tx: "Transaction", ws: Workspace, op: str,
            make_plan: Callable[[], list], act: Callable[[], Any]) -> Any:
        """One operation: plan (before-images stored), log (durable), effect, apply.  When
        the apply fails, whatever it left is put back at once (the library leaves nothing
        half-done, so this is usually nothing) and the error is raised.

        Under the transaction's end lock, as its commit() and prepare() run: a change made
        by one thread while another committed was made in place after the commit took
        the transaction, in no record of it (a revert left it, a rollback could not put
        it back) — now it waits for that end and raises TransactionClosed, changing
        nothing (probe-audit56).  The end lock is taken only while free, with the
        workspace's lock held: a rollback holds the end lock and then waits for the
        workspace's lock (its undo), and a watch() block holds the workspace's lock
        across code that may take the end lock (a savepoint, an action) — waiting for
        either while holding the other could wait for ever; it is waited for with
        neither held, and then tried again."""
        with self._busy_here(f"file operation {op!r}"):
            return self._run(tx, ws, op, make_plan, act)

    def _run(self, tx: "Transaction", ws: Workspace, op: str,
             make_plan: Callable[[], list], act: Callable[[], Any]) -> Any:
        end = tx.end_lock
        while True:
            tx.check_writable()
            with self._ws_lock(ws):
                mine = False
                try:
                    with deferred():  # (an interrupt as it ends still finds ``mine``)
                        mine = end.acquire(blocking=False)
                    if mine:
                        tx.check_writable()
                        return self._run_ended_out(tx, ws, op, make_plan, act)
                finally:
                    if mine:
                        end.release()
            with end:  # (a commit, prepare or rollback under way: its end comes first)
                pass

    def _run_ended_out(self, tx: "Transaction", ws: Workspace, op: str,
                       make_plan: Callable[[], list], act: Callable[[], Any]) -> Any:
        with self._ws_lock(ws), self._lock:
            self._check_not_watched(tx, ws)
            steps = make_plan()
            if not steps:
                return None
            if self._put_back_stale(tx.id, ws, [c.path for c in steps]):
                steps = make_plan()  # (the before-images were what the dropped one left)
                if not steps:
                    return None
            if tx.file_reads:  # a path it read and changes now: unchanged since the read?
                self._check_reads(tx, [(ws.root_b, c.path) for c in steps])
            self._claim(tx, ws, steps)
            known: list[FileEffect] = []

            def joined(e: FileEffect) -> None:
                tx.effects.append(e)
                known.append(e)
            try:
                eff = self.log_steps(tx, ws, op, steps, known=joined)
            except BaseException:  # (an interrupt in the wait: the change is never made,
                # its steps are in the log — settled here, as an ``act`` that failed, or a
                # caller that caught it and committed committed a change never made: at()
                # said a.txt, there all along, did not exist — audit 67; a failed fsync:
                # the record fails, the effect stays for the rollback)
                if known:  # (out of the transaction as FILE_RESTORED is appended: a
                    # second interrupt there left it in, undone again by the rollback over
                    # a file deleted by hand since; unrecorded, it blocks the commit)
                    known[0].never_made = True
                    with contextlib.suppress(Exception):
                        self.record(tx.id, known, [], durable=False,
                                    appended=lambda _e: tx.effects.remove(known[0]))
                raise
            try:
                return act()
            except BaseException:
                eff.never_made = True  # (until recorded put back: a second interrupt in
                # the undo left it the transaction's as made, a.txt put back on disk and
                # committed as written — audit 67; out as its FILE_RESTORED is appended)
                with contextlib.suppress(Exception):
                    conflicts = undo_steps(ws, steps, self.blobs, self.quarantine(tx.id),
                                           check=True, durable=self.durable,
                                           since_ns=eff.since_ns)
                    if conflicts:
                        eff.never_made = False  # (kept as it was: the rollback's to report)
                        eff.undo_conflicts = [abs_display(ws.root_b, c.path)
                                              for c in conflicts]
                    else:
                        self.record(tx.id, [eff], [], durable=False,
                                    appended=lambda _e: tx.effects.remove(eff))
                raise

    # ---- paths read (serializable file reads) -------------------------------------------
    def note_read(self, tx: "Transaction", ws: Workspace, rel: bytes) -> None:
        """``tx`` read ``rel`` (its content or its existence) in the live tree: remembered
        with the path's claimant and metadata then, so that its commit (or prepare)
        conflicts when the path changed since — another transaction changed it and
        committed, still holds it uncommitted, or put it back by a rollback (a read
        followed by a write of one's own was a lost update: the other's commit between
        them was overwritten).  A path this transaction changed itself is its own (claimed:
        no other transaction can change it)."""
        reads = tx.file_reads
        key = (ws.root_b, rel)
        if reads is not None and key in reads:
            return
        with self._lock:
            if not self._claims_seeded:
                self._seed_claims()
            owner = self._claims.get(key)
            stale = self._stale_owners(tx, ws.root_b, rel)
        if stale:
            self._put_back_before_read(tx, ws, rel)
            with self._lock:
                owner = self._claims.get(key)
        if owner == tx.id:
            return
        if reads is None:
            reads = tx.file_reads = {}
            ref = weakref.ref(tx)  # (no cycle: a dropped transaction must still be freed
            # at once, see _live; added to the checks already set, a session's: stop 76)
            add_commit_check(tx, lambda: self._check_reads(ref(), None))
        reads[key] = (owner, _fingerprint(ws.root_b, rel))

    def committed(self, txid: int) -> None:
        """Transaction ``txid`` committed: it owes no undo, so the first read or change of
        a path it changed needs no look at what it owes (``_owed_now``: the unapplied
        events and its ``fsteps`` rows, ~0.25 ms) — as its first change did once per
        owner, its first read does since reads put back what dead owners left (audit 66).
        Not under ``_lock`` (a file operation of another thread holds it through its I/O:
        the commit would wait); a set's add is one step, and one lost to a concurrent
        prune costs that look again, nothing more."""
        if txid in self._claimants:
            self._settled.add(txid)

    def undone(self, txid: int) -> None:
        """Transaction ``txid`` ended without a commit and its undo put back every file
        effect it had, recorded (a rollback, a ``rollback_prepared``): it owes nothing, as
        a committed one (``committed``).  (Left unsettled, the first read of each path it
        changed looked at what it owes: after 400 one-file rollbacks a transaction read
        the 400 files at ~270-300 us a read, ~35-40 once settled: audit 66.)"""
        self.committed(txid)

    def _stale_owners(self, tx: "Transaction", root: bytes, rel: bytes,
                      listing: bool = False) -> set[int]:
        """The transactions that changed ``rel`` or a parent of it (``listing``: or a path
        below it) and ended without being known to owe nothing (``_settled``): what a
        read of it must put back first.  Caller holds ``_lock``."""
        owners = {self._claims.get((root, p)) for p in _with_parents([rel])}
        if listing:
            owners |= self._under.get((root, rel), set()) if rel else \
                self._in_root.get(root, set())
        return {t for t in owners if t is not None and t != tx.id and t not in self._settled
                and not self._live(t)}

    def _put_back_before_read(self, tx: "Transaction", ws: Workspace, rel: bytes,
                              listing: bool = False) -> None:
        """Before ``tx`` reads ``rel``: what a transaction that ended without its files put
        back left there — dropped, or rolled back on a full disk (its FileConflictError
        said "owed: put back at the next open") — is put back first, as before a change
        (``_put_back_stale``); ConflictError when it still cannot be (the read is refused:
        those bytes were never committed).  (The read returned them, and the transaction
        that read them committed on content the next open took away; with room again,
        every read returned them until the store was reopened: audit 66.)  Inside a
        watch() of ``ws`` (this thread's) nothing is put back — the watch would take the
        put-back for its own change: refused the same way.  Counted as a file operation
        (``_busy_here``): close() waits for it (it closed the log, and let the store's
        lock go, while a read still put a file back: audit 66)."""
        with self._busy_here("a read putting back what a transaction left"), \
                self._ws_lock(ws), self._lock:
            running = self._watching.get(ws.root_b)
            if running is None:
                self._put_back_stale(tx.id, ws, None if listing else [rel])
                return
            owed = self._owed_now(self._stale_owners(tx, ws.root_b, rel, listing))
            if not owed:
                return
        where = abs_display(ws.root_b, rel) if rel else ws.root
        raise ConflictError(f"transaction {tx.id} cannot read {where} inside a watch(): "
                            f"transaction {min(owed)} ended without a commit and its change "
                            f"there is not put back yet (owed); nothing was read", [where])

    def before_list(self, tx: "Transaction", ws: Workspace, rel: bytes) -> None:
        """Before ``tx`` lists directory ``rel``: what transactions that ended without
        their files put back left below it is put back first (``_put_back_before_read``:
        a name a failed rollback created was listed as current)."""
        key = (ws.root_b, rel, LISTED)
        if tx.file_reads is not None and key in tx.file_reads:
            return
        with self._lock:
            if not self._claims_seeded:
                self._seed_claims()
            stale = self._stale_owners(tx, ws.root_b, rel, listing=True)
        if stale:
            self._put_back_before_read(tx, ws, rel, listing=True)

    def note_list(self, tx: "Transaction", ws: Workspace, rel: bytes,
                  names: frozenset[bytes]) -> None:
        """``tx`` listed directory ``rel`` and saw ``names``: its commit (or prepare)
        conflicts when the names there changed since — by another transaction (committed
        or not) or another process — but for the names of paths this transaction changed
        itself (its own creations and deletions are not conflicts)."""
        reads = tx.file_reads
        key = (ws.root_b, rel, LISTED)
        if reads is not None and key in reads:
            return
        if reads is None:
            reads = tx.file_reads = {}
            ref = weakref.ref(tx)
            add_commit_check(tx, lambda: self._check_reads(ref(), None))
        reads[key] = (None, names)

    def _check_reads(self, tx: "Transaction", keys: list | None) -> None:
        """ConflictError when a path ``tx`` read (``keys`` of them; None: every one it did
        not change itself) changed since it read it, or a directory it listed holds other
        names (``keys``: the paths it is about to change, so also their directories'
        listings).  Run under the journal lock at commit and prepare (it takes no lock of
        this class: a file change takes ours, then the journal's), and under ours before
        ``tx`` changes a path it read.  A change by walstore shows as a new claimant
        (every change is claimed; a stale claim pruned since shows as one too: a conflict,
        never a miss) and as new metadata (its writes rename a new inode into place); a
        change by another process, by its metadata (size, times, inode, mode).  An OS
        error looking (EIO, EACCES) is a StoreIOError: the transaction does not commit."""
        with os_errors_as_store_errors():
            self._check_reads_now(tx, keys)

    def _check_reads_now(self, tx: "Transaction", keys: list | None) -> None:
        reads = tx.file_reads or {}
        if keys is None:
            items = reads.items()
        else:
            wanted = [*keys, *((root, parent_of(rel), LISTED) for root, rel in keys)]
            items = [(k, reads[k]) for k in dict.fromkeys(wanted) if k in reads]
        claims = self._claims
        for key, (owner, seen) in items:
            if len(key) == 3:
                self._check_listing(tx, key[0], key[1], seen)
                continue
            root, rel = key
            now = claims.get((root, rel))
            if now == tx.id:
                continue  # (changed by this transaction after the read: checked then)
            live = now is not None and self._live(now)
            if now != owner or live or _fingerprint(root, rel) != seen:
                where = abs_display(root, rel)
                who = (f"transaction {now}, which has not ended, changed it" if live else
                       "it changed since")
                raise ConflictError(f"transaction {tx.id} read {where}, and {who}; nothing "
                                    f"was written", [where])

    def _check_listing(self, tx: "Transaction", root: bytes, rel: bytes,
                       seen: frozenset[bytes]) -> None:
        """``_check_reads`` of one listed directory: the names now against those seen,
        leaving out the paths ``tx`` changed itself; a name another transaction that has
        not ended changed is a conflict too (its creation may yet be rolled back)."""
        ws = self._registry.get(root)
        now = _listing(ws, rel) if ws is not None else None
        claims = self._claims
        mine = tx.id
        changed = [n for n in (seen ^ (now or frozenset()))
                   if claims.get((root, _child(rel, n))) != mine]
        if now is None and ws is not None and not changed:
            # the directory itself gone: a change unless this transaction removed it
            changed = [] if claims.get((root, rel)) == mine else [b""]
        live = None
        if not changed:
            for n in now or ():
                t = claims.get((root, _child(rel, n)))
                if t is not None and t != mine and self._live(t):
                    live = t
                    break
        if changed or live is not None:
            where = abs_display(root, rel)
            who = (f"transaction {live}, which has not ended, changed a name in it"
                   if live is not None else "the names in it changed since")
            raise ConflictError(f"transaction {tx.id} listed {where}, and {who}; nothing "
                                f"was written", [where])

    # ---- what prepared transactions read, held until their decision -------------------
    def hold_reads(self, tx: "Transaction") -> dict:
        """Before ``tx`` prepares: the paths it read and the directories it listed are
        held against every change by walstore (``_check_claims`` refuses a change of one
        while ``tx`` is live — open, or prepared until decided), as a prepared
        transaction's read keys are; returns the PREPARE record's fields naming them, so a
        reopened store holds them again (``_seed_claims``).  Held before the prepare's
        check runs: a change made before the hold is what that check finds, and one after
        it is refused."""
        reads = tx.file_reads
        if not reads:
            return {}
        paths: dict[bytes, list[bytes]] = {}
        lists: dict[bytes, list[bytes]] = {}
        for key in reads:
            (lists if len(key) == 3 else paths).setdefault(key[0], []).append(key[1])
        with self._lock:
            for ended in [t for t in self._holds_of if not self._live(t)]:
                self._drop_holds(ended)  # (decided since: bounded by what is in doubt)
            self._add_holds(tx.id, paths, lists)
        out = {}
        if paths:
            out["file_reads"] = [[root, rels] for root, rels in paths.items()]
        if lists:
            out["file_lists"] = [[root, rels] for root, rels in lists.items()]
        return out

    def _add_holds(self, txid: int, paths: dict, lists: dict) -> None:
        """Caller holds ``_lock``."""
        noted = self._holds_of.setdefault(txid, [])
        for held, index in ((paths, self._read_holds), (lists, self._list_holds)):
            for root, rels in held.items():
                for rel in rels:
                    index.setdefault((root, rel), set()).add(txid)
                    for at in _with_parents([rel]):
                        self._hold_below.setdefault((root, at), set()).add(txid)
                    noted.append((root, rel, index is self._list_holds))

    def _drop_holds(self, txid: int) -> None:
        """Caller holds ``_lock``: ``txid`` ended, nothing of it is held any more."""
        for root, rel, listed in self._holds_of.pop(txid, ()):
            index = self._list_holds if listed else self._read_holds
            for idx, at in ((index, rel), *((self._hold_below, p)
                                            for p in _with_parents([rel]))):
                owners = idx.get((root, at))
                if owners is not None:
                    owners.discard(txid)
                    if not owners:
                        del idx[(root, at)]

    def release_holds(self, txid: int) -> None:
        """``txid``'s prepare failed: what it read is not held any more."""
        with self._lock:
            self._drop_holds(txid)

    def _check_holds(self, tx: "Transaction", root: bytes, paths: list[bytes]) -> None:
        """``_check_claims``'s test of what prepared transactions read (caller holds
        ``_lock``): changing a path one read, a directory at or above one, or a name in a
        directory one listed is refused while that transaction is live."""
        ended = set()
        for path in paths:
            holders = (self._read_holds.get((root, path), set())
                       | self._hold_below.get((root, path), set())
                       | self._list_holds.get((root, parent_of(path)), set()))
            for holder in sorted(holders):
                if holder == tx.id:
                    continue
                if not self._live(holder):
                    ended.add(holder)
                    continue
                where = abs_display(root, path)
                raise ConflictError(f"transaction {tx.id} would change {where}, which "
                                    f"transaction {holder} read and has not ended (open, "
                                    f"or prepared and in doubt); nothing was changed",
                                    [where])
        for holder in ended:
            self._drop_holds(holder)

    def _count_blob_bytes(self) -> None:
        """Before-images stored since the last look count toward the next checkpoint like
        log bytes do: retention trims history, and the blob gc frees content, only at
        checkpoints, which the log's bytes alone trigger — a workload writing big files
        with small records (64 KiB per transaction, 300 log bytes) grew the blob store by
        tens of MB between checkpoints, unbounded by ``retain_transactions``."""
        b = self._blobs
        if b is None:
            return
        new = b.bytes_written - self._blob_bytes_noted
        if new > 0:
            self._blob_bytes_noted = b.bytes_written
            self.engine.wal.bytes_since_checkpoint += new  # (the applier looks every 0.1 s)

    # ---- path claims ------------------------------------------------------------------
    def _claim(self, tx: "Transaction", ws: Workspace, steps: list) -> None:
        """Changes happen in place at once, so a path changed by a transaction that has not
        ended (open, or prepared and in doubt) is that transaction's until it ends: a
        second transaction changing it would overwrite a change its owner may still undo
        (its rollback would then find a stranger's version and quarantine it).  So the
        second one gets ConflictError here, before anything is changed (caller holds
        ``_lock``).  A claim of an ended transaction is stale and simply taken over (one
        that still owes undo — dropped without an end — is put back first by the caller:
        ``_put_back_stale``)."""
        self._check_claims(tx, ws.root_b, [c.path for c in steps])
        self._note_claims(tx, ws.root_b, steps)

    def _check_not_watched(self, tx: "Transaction", ws: Workspace) -> None:
        """Caller holds the workspace's lock.  A watch() of another transaction running
        there can only be this very thread's (the lock is the watch's): a change made now
        would be found in that watch's diff and become the other transaction's (undone by
        its rollback).  Refused before anything changes."""
        running = self._watching.get(ws.root_b)
        owner = None if running is None else running.txid
        if owner is not None and owner != tx.id:
            raise WalstoreError(
                f"transaction {tx.id} cannot change files in {ws.root!r} while this thread "
                f"runs a watch() of transaction {owner} there (the change would become part "
                f"of that watch); nothing was changed")

    def _check_claims(self, tx: "Transaction", root: bytes, paths: list[bytes]) -> None:
        """``_claim``'s test alone (nothing noted); caller holds ``_lock``.  The parent
        directories of each path count too: a directory another transaction created (or
        changed) and has not ended is its own — a file written into it made its rollback
        find the directory holding a file walstore did not know (a conflict reported of
        walstore's own committed file)."""
        if not self._claims_seeded:
            self._seed_claims()
        if self._holds_of:
            self._check_holds(tx, root, paths)
        for path in _with_parents(paths):
            owner = self._claims.get((root, path))
            if owner is not None and owner != tx.id and self._live(owner):
                where = abs_display(root, path)
                raise ConflictError(f"transaction {tx.id} would change {where}, which "
                                    f"transaction {owner} changed and has not ended (open, "
                                    f"or prepared and in doubt); nothing was changed",
                                    [where])
        # and a directory holding a path another live transaction changed (removing it
        # let that one's rollback put the directory back behind the remover's commit)
        under = self._under
        for path in paths:
            for owner in under.get((root, path), ()):
                if owner == tx.id or not self._live(owner):
                    continue
                where = abs_display(root, path)
                raise ConflictError(f"transaction {tx.id} would change {where}, a directory "
                                    f"holding a path transaction {owner} changed and has "
                                    f"not ended (open, or prepared and in doubt); nothing "
                                    f"was changed", [where])

    def put_back_dropped(self, root: bytes, path: bytes, dry_run: bool = False) -> bool:
        """An undo's plan, before it compares ``path`` with its target: what a transaction
        that ended without commit or rollback (dropped) left there is put back first, as
        before any change of it (``_put_back_stale``; an undo planned from those
        uncommitted bytes took the path for done, and the next open's undo of the dropped
        one brought the undone version back).  ``dry_run``: nothing is changed; True when
        such bytes are there (the plan keeps the path)."""
        ws = self.registered(root)
        with self._ws_lock(ws), self._lock:
            if dry_run:
                if not self._claims_seeded:
                    self._seed_claims()
                owners = {self._claims.get((root, p)) for p in _with_parents([path])}
                return any(t is not None and t not in self._settled and not self._live(t)
                           and self._owed_now({t}) for t in owners)
            return self._put_back_stale(None, ws, [path])

    def dropped_before(self, root: bytes, path: bytes) -> Any:
        """A dry run's stand-in for ``put_back_dropped``: what ``path`` holds once the
        real undo has put back what dropped transactions left there (the before-image of
        their oldest owed step of it, an ``Entry``), or None when none of them changed
        the path itself (a parent only: the plan keeps the path, as it did).  Compared
        with the dropped bytes instead, the plan listed a path and a transaction the
        real undo, after the put-back, found done (it returned None), or planned one
        the real undo refused as changed behind walstore's back (RevertConflict)."""
        with self._lock:
            if not self._claims_seeded:
                self._seed_claims()
            owner = self._claims.get((root, path))
            if owner is None or owner in self._settled or self._live(owner):
                return None
            owed = self._owed_now({owner})
        return _first_before(owed.get(owner, ()), root, path)

    def check_unclaimed(self, root: bytes, path: bytes) -> None:
        """An undo's plan: ConflictError when a transaction that has not ended (open,
        prepared, or rolling back) changed ``path`` (the undo's own is not begun yet)."""
        with self._lock:
            if not self._claims_seeded:
                self._seed_claims()
            owner = self._claims.get((root, path))
            if owner is not None and self._live(owner):
                where = abs_display(root, path)
                raise ConflictError(f"{where} was changed by transaction {owner}, which has "
                                    f"not ended (open, or prepared and in doubt); it cannot "
                                    f"be put back now; nothing was changed", [where])

    def _note_claims(self, tx: "Transaction", root: bytes, steps: list) -> None:
        for c in steps:
            self._claims[(root, c.path)] = tx.id
            self._note_under(root, c.path, tx.id)
        self._claimants[tx.id] = weakref.ref(tx)
        # (by claimants too: on a fixed set of paths ``_claims`` never grows, while
        # ``_claimants``, ``_under``'s txid sets and ``_settled`` took an entry per file
        # transaction for good — a soak, 20 paths: 590 claimants after 573 file
        # transactions, linear — and each directory check walked every past txid)
        if (len(self._claims) > 2 * self._live_claims + CLAIMS_SLACK
                or len(self._claimants) > 2 * self._live_claimants + CLAIMS_SLACK):
            self._prune_claims()

    _live_claims = 0  # claims held by live transactions at the last prune
    _live_claimants = 0  # and their claimants

    def _note_under(self, root: bytes, path: bytes, txid: int) -> None:
        """Index ``path``'s claim under each of its parent directories (``_under``: (root,
        directory) -> the txids that changed a path below it; a set, so a finished
        claimant never hides a live one), and in its root (``_in_root``)."""
        self._in_root.setdefault(root, set()).add(txid)
        if b"/" in path:
            under = self._under
            for parent in _with_parents([path]) - {path}:
                under.setdefault((root, parent), set()).add(txid)

    def _live(self, txid: int) -> bool:
        """Has transaction ``txid`` not ended: open (and not prepared away), prepared, or
        rolled back with its undo still running (its paths are not back yet)?"""
        ref = self._claimants.get(txid)
        tx = ref() if ref is not None else None
        if tx is not None and (tx.undo_pending or (tx.state == "active" and tx.gid is None)):
            return True
        return txid in self.undoing or self.engine.prepared.holds_txid(txid)

    def _prune_claims(self) -> None:
        """Forget the claims of ended transactions (bounded memory) — not those of one
        that still owes undo (dropped without an end): the next change of its paths puts
        them back first (``_put_back_stale``)."""
        owners = set(self._claims.values())
        live = {t for t in owners if self._live(t)}
        dead = owners - live - self._settled
        keep = live | set(self._owed_now(dead)) if dead else live
        self._claims = {k: t for k, t in self._claims.items() if t in keep}
        self._claimants = {t: r for t, r in self._claimants.items() if t in keep}
        self._under = {}
        self._in_root = {}
        for (root, path), t in self._claims.items():
            self._note_under(root, path, t)
        self._settled &= set(self._claims.values())
        self._live_claims = len(self._claims)
        self._live_claimants = len(self._claimants)

    def _owed_now(self, txids: set[int] | None = None) -> dict[int, list]:
        """The file effects each transaction of ``txids`` (None: every one) still owes
        undo — its ``fsteps`` rows, held ones excepted — as effects, newest first; only
        transactions that owe something are keys.  Without a drain (no LMDB write): the
        MemTable's unapplied events are taken first and folded over LMDB's rows with the
        applier's transitions (as ``engine.views`` do), so each event counts once."""
        eng = self.engine
        types = frozenset({_T.FILE_STEPS, _T.WATCH_BEGIN, _T.WATCH_END, _T.FILE_RESTORED,
                           _T.COMMIT})
        events = [e for e in eng.memtable.events_of(types)
                  if txids is None or e.txid in txids]
        st = eng.state
        rows: dict[int, dict[int, dict | None]] = {}
        spans = [(b"", None)] if txids is None else [
            (tables.fsteps_prefix(t), tables.fsteps_prefix(t) + b"\xff" * 8)
            for t in sorted(txids)]
        for lo, hi in spans:
            for raw, v in st.scan(lo, hi, db="fsteps"):
                txid, lsn = tables.split_fsteps_key(raw)
                row = tables.unpack_row(v, "fsteps", raw, st.data_file)
                rows.setdefault(txid, {})[lsn] = None if row.get("held") else row
        for e in events:
            mine = rows.setdefault(e.txid, {})
            if e.type in (_T.FILE_STEPS, _T.WATCH_BEGIN):
                if mine.get(e.lsn, True) is not None:  # (a held row stays held)
                    mine[e.lsn] = tables.fsteps_row(e)
            elif e.type == _T.WATCH_END:
                mine.pop(int(e.body.get("begin", -1)), None)
            elif e.type == _T.FILE_RESTORED:
                for lsn in e.body.get("effects") or ():
                    if e.body.get("held"):
                        mine[int(lsn)] = None
                    else:
                        mine.pop(int(lsn), None)
            else:  # COMMIT: every row of the transaction goes
                mine.clear()
        out: dict[int, list] = {}
        for txid, mine in rows.items():
            effs = []
            for lsn, row in mine.items():
                if row is None:
                    continue
                try:
                    effs.append(self._effect_of_row(self.registered(row["ws"]), txid, lsn,
                                                    row))
                except (OSError, ValueError, CorruptionError):
                    continue  # (unreadable: left owed, as at open)
            if effs:
                out[txid] = sorted(effs, key=lambda e: e.lsn, reverse=True)
        return out

    def _put_back_stale(self, txid: int | None, ws: Workspace,
                        paths: list[bytes] | None = None) -> bool:
        """Before transaction ``txid`` changes ``paths`` of ``ws`` (None: any path, a
        ``watch()``), put back what a claimant of one of them that has ended but still owes
        undo left there: a transaction dropped (garbage-collected) without commit or
        rollback while the store stays open, or one whose rollback could not put a path
        back.  Its changes are uncommitted; left in place, the new change took them as its
        before-image — a revert of it brought back content no transaction committed, and
        the next open's undo of the dropped one met the new change's committed version as
        a stranger's (a file conflict, walstore's version quarantined).  Undone as its
        rollback would (its effects in ``ws``, newest first, FILE_RESTORED and any
        FILE_CONFLICT recorded): a crash in between leaves rows the next open undoes,
        idempotently.  Caller holds the workspace's lock and ``_lock``; True when
        something was undone (the caller plans again).  A path that cannot be put back
        (an I/O error): ConflictError, nothing of ``txid`` changed."""
        root = ws.root_b
        if not self._claims_seeded:
            self._seed_claims()
        if paths is None:
            owners = set(self._in_root.get(root, ()))
        else:  # (and of their parent directories: one it created holds its files)
            owners = {self._claims.get((root, p)) for p in _with_parents(paths)}
        owners = {t for t in owners if t is not None and t != txid
                  and t not in self._settled and not self._live(t)}
        if not owners:
            return False
        owed = self._owed_now(owners)
        self._settled |= owners - set(owed)
        effects = sorted((e for t in owed for e in owed[t] if e.ws.root_b == root),
                         key=lambda e: (e.lsn, e.txid), reverse=True)
        if not effects:
            return False
        batch = UndoBatch(effects)
        done: dict[int, list] = {}
        conflicts: dict[int, list] = {}
        failed = []
        try:
            for eff in effects:
                got, err = batch.put_back(eff, lambda: self.undo_one(eff.txid, eff, batch))
                if err is not None:
                    failed.append((eff, err))
                    continue
                done.setdefault(eff.txid, []).append(eff)
                conflicts.setdefault(eff.txid, []).extend((eff.lsn, c) for c in got)
        finally:
            for t in sorted(done):
                self.record(t, done[t], conflicts.get(t, []))
        if failed:
            eff, err = failed[0]
            where = abs_display(root, eff.steps[0].path) if getattr(eff, "steps", None) \
                else ws.root
            raise ConflictError(f"transaction {eff.txid} ended without a commit and its "
                                f"change of {where} could not be put back "
                                f"({type_and_message(err)}); it stays owed (the next "
                                f"open puts it back); nothing was changed", [where])
        if not any(e.ws.root_b != root for t in owed for e in owed[t]):
            self._settled |= set(owed)
        return True

    def uncommitted_before(self, root: bytes, path: bytes) -> Any:
        """What ``path`` was before a transaction that has not ended changed it in place
        (its first step's before-image, an ``Entry``), or None.  A view of a committed
        point reads this for a path with no committed version, not the uncommitted bytes
        now on disk (it read them: a dirty read of a file another transaction may still
        roll back).  So it does for one that ended owing its undo — dropped, or rolled
        back on a full disk: its bytes stay until put back (``_put_back_stale``), and a
        view of a point before it read the file it created as there at that point (audit
        66).  A read-only store knows none of the writer's transactions (no claims): the
        ``fsteps`` rows of all that have not put their files back are read instead (it
        read the bytes a dropped or open transaction of the writer made: audit 66)."""
        if self.engine.readonly:
            owed = self._owed_now()
            return _first_before(sorted((e for effs in owed.values() for e in effs),
                                        key=lambda e: e.lsn, reverse=True), root, path)
        with self._lock:
            if not self._claims_seeded:
                self._seed_claims()
            owner = self._claims.get((root, path))
            if owner is None or owner in self._settled:
                return None
            if not self._live(owner):
                owed = self._owed_now({owner})
                if not owed:
                    self._settled.add(owner)  # (as ``_put_back_stale`` notes it)
                return _first_before(owed.get(owner, ()), root, path)
        return _first_before(self.effects_of(owner), root, path)

    def _seed_claims(self) -> None:
        """Once per open: the paths of transactions still prepared from before (a crash or
        a close left them in doubt) are theirs until decided."""
        self._claims_seeded = True
        # (a copy of the set: it is changed under the journal lock, not this one, and
        # another thread's prepare or decision in the loop raised "dictionary changed size
        # during iteration" out of the first file operation, the seeding left half done
        # for good — the rest of the prepared transactions' paths unclaimed — audit 58)
        for p in list(self.engine.prepared.by_gid.values()):  # (and what they read)
            self._add_holds(p.txid, dict(p.extra.get("file_reads") or ()),
                            dict(p.extra.get("file_lists") or ()))
        for txid in sorted(self.engine.prepared.txids()):
            for eff in self.effects_of(txid):
                for c in getattr(eff, "steps", None) or ():
                    self._claims[(eff.ws.root_b, c.path)] = txid
                    self._note_under(eff.ws.root_b, c.path, txid)

    def apply_undo(self, tx: "Transaction", items: list[FileUndo], force: bool) -> None:
        """A revert or rewind: put each path back (in ``tx``, before its commit), logged
        as the undoing transaction's own FILE_STEPS (before = the path now, stored; after =
        the target), so rolling ``tx`` back, or reverting it later, works like any other
        file effect.  A path that changed since it was planned: RevertConflict.  Forced,
        a directory to remove loses what others put in it too (``_strangers_under``)."""
        from ..errors import RevertConflict
        tx.check_writable()
        by_ws: dict[bytes, list[FileUndo]] = {}
        for it in items:
            by_ws.setdefault(it.ws.root_b, []).append(it)
        for root in sorted(by_ws):  # what a dropped transaction left goes first
            with self._ws_lock(by_ws[root][0].ws), self._lock:
                self._put_back_stale(tx.id, by_ws[root][0].ws,
                                     [it.path for it in by_ws[root]])
        with self._lock:  # a path an open or prepared transaction changed is its own:
            for root in sorted(by_ws):  # refused before any workspace is touched
                self._check_claims(tx, root, [it.path for it in by_ws[root]])
        for root in sorted(by_ws):
            ws = by_ws[root][0].ws
            with self._ws_lock(ws), self._lock:
                self._check_not_watched(tx, ws)
                ws.check_root()
                back = [Change.of(it.path, it.target, self._capture_undone(ws, it.path))
                        for it in by_ws[root]]
                specials: list[bytes] = []  # (FIFOs, sockets, devices in such a directory)
                strangers = self._strangers_under(ws, back, specials) if force else []
                back += strangers
                forward = [Change.of(c.path, c.after, c.before) for c in undo_order(back)]
                self._claim(tx, ws, forward)
                where = os.fsencode(self.quarantine(tx.id))
                for c in strangers:  # (a copy kept aside as well: see _strangers_under)
                    if c.after.is_file or c.after.is_symlink:
                        fapply.save_aside(c.path, c.after, self.blobs, where)
                self.log_steps(tx, ws, "revert", forward, known=tx.effects.append)
                for rel in sorted(specials, key=len, reverse=True):
                    fapply.remove_special(ws, rel, self.durable)
                conflicts = []
                since = {it.path: it.since_ns for it in by_ws[root]}
                for c in forward:
                    got = fapply.restore(ws, c.path, c.after, None if force else c.before,
                                         self.blobs, self.quarantine(tx.id), self.durable,
                                         since_ns=since.get(c.path))
                    if got is not None:
                        conflicts.append(abs_display(root, c.path))
                if conflicts:
                    raise RevertConflict(f"file(s) changed while transaction {tx.id} was "
                                         f"putting them back: {conflicts}", paths=conflicts)

    def _capture_undone(self, ws: Workspace, path: bytes) -> Entry:
        """What a path an undo puts back holds now (its step's before-image); a FIFO,
        socket or device (a forced undo puts the path back over it: ``apply.restore``
        removes it) is absent, as the manifests describe one."""
        try:
            return plan.capture_reachable(ws, path, self.blobs)
        except UnsupportedFileType:
            return Entry.absent()

    def _strangers_under(self, ws: Workspace, back: list, specials: list) -> list:
        """A forced undo puts the earlier version over whatever is there, and a directory
        that must go (the undone transaction created it) may hold paths walstore never
        recorded (another process put them there): those become absent too, as steps of
        the undoing transaction (rolling it back, or reverting it, brings them back), and
        ``apply_undo`` keeps a copy of each file and symlink under
        ``quarantine/files/tx<txid>/``.  (The revert used to raise RevertConflict for the
        directory, force or not.)  All of it is captured before anything changes; a
        directory holding walstore's own directory (the store) is refused then.  A FIFO,
        socket or device there (no step can describe one) is listed in ``specials``, which
        the caller removes after logging the steps (it was UnsupportedFileType)."""
        from ..errors import RevertConflict
        known = {c.path for c in back}
        out: list[Change] = []
        for c in back:
            if not c.after.is_dir or c.before.is_dir:
                continue
            held = ws.holding_excluded(c.path)
            if held is not None:
                where = abs_display(ws.root_b, c.path)
                raise RevertConflict(f"{where} cannot be put back: it holds walstore's own "
                                     f"directory {abs_display(ws.root_b, held)}; nothing "
                                     f"was changed", paths=[where])
            for p, e in plan.capture_subtree(ws, c.path, c.after, self.blobs,
                                             specials)[1:]:
                if p not in known:
                    known.add(p)
                    out.append(Change.of(p, Entry.absent(), e))
        return out

    # ---- watch() --------------------------------------------------------------------
    @contextlib.contextmanager
    def watch(self, tx: "Transaction", ws: Workspace) -> Iterator[Watch]:
        # (counted to its end's record: a close() in another thread waits for the block,
        # or refuses it — it closed the log under the block, whose changes then stayed
        # on disk after a clean close, put back by the next open as after a crash: audit 60)
        with self._busy_here("a watch() block"):
            yield from self._watch(tx, ws)

    def _watch(self, tx: "Transaction", ws: Workspace) -> Iterator[Watch]:
        tx.check_writable()
        lock = self._ws_lock(ws)
        with lock:
            with self._lock:
                self._check_not_watched(tx, ws)
                outer = self._watching.get(ws.root_b)
            if outer is not None:
                # nested in this transaction's own watch of the workspace, which records
                # every change of the block already: this one only reports them (it used
                # to log them as well, so a rollback undid them twice, the second time
                # over the first: a conflict, and a deleted file back)
                with self._nested_watch(outer) as handle:
                    yield handle
                return
            # (an OS error of the begin — the first snapshot's blobs: a full disk, EIO —
            # is a StoreIOError, as a file operation's; the block's own errors pass as
            # they are)
            with self._lock, os_errors_as_store_errors():
                # what a dropped transaction left in the workspace goes first (else the
                # manifest took it as the before-image: see _put_back_stale)
                self._put_back_stale(tx.id, ws)
                m0 = snapshot(ws, self.blobs, previous=self._previous(ws),
                              monitor=self._monitor(ws))
                digest = m0.save(self.blobs)
                self._manifest_digests(digest, m0)  # (what the next gc will ask: ~4 ms
                # here for a 20,000-file tree, against ~60 ms to load it back then)
                tx.logged = True
                began: list[OpenWatch] = []

                def known(event) -> None:  # (before the wait for the disk, as an intent:
                    # an interrupt there, or a failed fsync, left a WATCH_BEGIN the
                    # rollback did not know; owed in the log, the next open put back every
                    # difference from m0 — a later commit's files included)
                    began.append(OpenWatch(ws, m0, digest, event.lsn, tx.id))
                    tx.note_inner_blocker(began[0])  # (a savepoint taken now is inside it)
                    tx.effects.append(began[0])
                try:
                    self.engine.log_event(_T.WATCH_BEGIN, {"tx": tx.id, "ws": ws.root_b,
                                                           "manifest": digest,
                                                           "ts": self.engine.clock()},
                                          tx.id, durable=True, appended=known)
                except BaseException:  # (an interrupt in the wait: the block never runs;
                    # ended here with no change, as ``_abandon_watch`` — left open, a caller
                    # that caught it and went on had its rollback put back every difference
                    # from m0, a write another transaction committed since included: audit
                    # 67; a failed fsync: the end fails, the rollback says what the reopen does)
                    if began:  # (out of the transaction as its end is appended: a
                        # second interrupt, in this end's wait, leaves neither owed)
                        w0 = began[0]  # (no block runs: none to leave, none inside)
                        w0.never_ran, w0.blocks_rollback, w0.blocks_inner_rollback = \
                            True, "", ""
                        with contextlib.suppress(Exception):
                            self.engine.log_event(_T.WATCH_END, {
                                "tx": tx.id, "ws": ws.root_b, "begin": began[0].lsn,
                                "n": 0}, tx.id, durable=True,
                                appended=lambda _e: tx.effects.remove(began[0]))
                    raise
                self._manifests[ws.root_b] = m0
                w = began[0]
                self._watching[ws.root_b] = w
            handle = Watch(ws)
            failed = False
            try:
                yield handle
            except BaseException:
                failed = True
                raise
            finally:
                try:
                    with os_errors_as_store_errors():
                        self._end_watch(tx, w, handle)
                except BaseException as e:
                    # (the block is over: a rollback_to past the watch said "a watch()
                    # block is still running; leave it": audit 68) — its changes known
                    # (``seen``), a rollback_to puts them back as a rollback does
                    w.blocks_rollback = "" if w.seen is not None else (
                        f"the end of a watch() block could not be recorded "
                        f"({type_and_message(e)}); what the block changed can only be "
                        f"put back whole: roll the transaction back")
                    tx.note_block_ended(w)  # (a savepoint taken now is not inside it)
                    w.end_failed = f"{type_and_message(e)}"
                    if not failed or not isinstance(e, Exception):
                        raise  # (the block's own error wins; the watch stays open)
                finally:
                    with self._lock:
                        self._watching.pop(ws.root_b, None)

    @contextlib.contextmanager
    def _nested_watch(self, outer: OpenWatch) -> Iterator[Watch]:
        """A watch inside ``outer`` (same transaction, same workspace; caller holds the
        workspace's lock): nothing stored or logged; ``changes`` (after the block) lists
        what changed inside it, compared through the outer watch's patterns."""
        ws = outer.manifest.workspace(outer.ws)
        with os_errors_as_store_errors():
            m0 = snapshot(ws, None, previous=outer.manifest)
        handle = Watch(outer.ws)
        yield handle
        with os_errors_as_store_errors():
            handle.changes = diff(m0, snapshot(ws, None, previous=m0))

    def _end_watch(self, tx: "Transaction", w: OpenWatch, handle: Watch) -> None:
        self.engine.check_not_forked()  # (a forked child's copy of its parent's watch:
        # the parent's watch sees what the child changed; before the lock, which a
        # parent's thread may have held at the fork)
        if tx.state != "active" or w not in tx.effects:
            return  # ended (rolled back) inside the block: its undo ran already
        ws = w.ws
        with self._lock:
            if self.engine.closed:  # (close() stopped waiting for the block: its end's
                # snapshot stored the changed files' contents in the closed store's blobs
                # after close() had returned and let the store go — audit 60)
                raise StoreClosed(f"store {self.engine.path} was closed during the watch() "
                                  f"block of transaction {tx.id}: its changes could not be "
                                  f"logged; the next open puts them back")
            # through the patterns the watch began with: a registration changing them
            # meanwhile (``workspace(root, ignore=...)``) made a file ignored then, and
            # untouched, "created" by the watch, and its rollback deleted it
            m1 = snapshot(w.manifest.workspace(ws), self.blobs, previous=w.manifest,
                          monitor=self._monitor(ws))
            changes = diff(w.manifest, m1)
            w.seen = (m1, changes, _specials_at(ws, m1, changes))
            # logged in an order whose reverse is the undo order (removals deepest first,
            # then re-creations shallowest first), so they undo like any other steps; a
            # read-only directory holding changes is opened and closed by them too
            # (``passages``: not claimed, not among the block's changes)
            forward = list(reversed(undo_order(changes + passages(changes, m1))))
            for c in changes:
                if len(ws.root_b) + len(c.path) > MAX_ROOT_AND_PATH_BYTES:
                    self._put_back_overlong_watch(tx, w, m1, changes, c.path)
            try:  # a path another live transaction changed is its own (``_claim``)
                self._check_claims(tx, ws.root_b, [c.path for c in changes])
            except ConflictError as e:
                self._put_back_claimed_watch(tx, w, m1, changes, e)
            # (changed already: claimed, unchecked; before their record, which may fail —
            # claimed after it, another transaction overwrote a path of this live one and
            # committed, and this one's rollback called it changed behind walstore's
            # back: audit 68)
            self._note_claims(tx, ws.root_b, changes)
            eff = self.log_steps(tx, ws, "watch", forward, durable=False, watch=w.lsn,
                                 began_ns=w.manifest.taken_ns,
                                 known=lambda e: setattr(w, "ended_lsns", e.lsns)
                                 ) if forward else None
            if eff is not None:
                eff.specials = w.seen[2]
                eff.began_as = w

            def ended(event) -> None:  # (before the wait for the disk, as the begin's: an
                # interrupt there left the open watch in the transaction, its changes'
                # steps in none — the rollback put the tree back and recorded the begin
                # only, and the next open undid the steps again, over what it found: a
                # file made anew since, by hand, as the block had made it, was deleted)
                i = tx.effects.index(w)
                if eff is None:
                    del tx.effects[i]
                else:
                    tx.effects[i] = eff
            self.engine.log_event(_T.WATCH_END, {"tx": tx.id, "ws": ws.root_b,
                                                 "begin": w.lsn, "n": len(changes)},
                                  tx.id, durable=True, appended=ended)
            self._manifests[ws.root_b] = m1
            handle.changes = changes

    def _abandon_watch(self, tx: "Transaction", w: OpenWatch, m1: Manifest,
                       changes: list) -> str:
        """End the watch ``w`` with none of the block's ``changes`` in ``tx``: put back from
        the manifest taken before the block (a path changed again since the end's snapshot
        stays, a conflict), WATCH_END logged with no change, the watch out of ``tx``'s
        effects, ``m1`` the workspace's manifest.  Returns what the error message adds
        about the paths left as they are.  Caller holds ``_lock``."""
        ws = w.ws
        specials = w.seen[2] if w.seen is not None else _specials_at(ws, m1, changes)
        if specials:  # (as the steps' undo: a FIFO left in a directory the block made kept
            # it, "changed again since the block ended", and the rollback's conflict)
            _remove_own_specials(ws, specials, self.durable)
        unlimited = w.manifest.workspace(ws).without_length_limit()
        conflicts = restore_changes(unlimited, changes + passages(changes, m1), self.blobs,
                                    self.quarantine(tx.id), check=True,
                                    durable=self.durable, since_ns=w.manifest.taken_ns)
        self.engine.log_event(_T.WATCH_END, {"tx": tx.id, "ws": ws.root_b,
                                             "begin": w.lsn, "n": 0}, tx.id, durable=True)
        tx.effects.remove(w)
        self._manifests[ws.root_b] = m1
        if not conflicts:
            return ""
        return (f"; {len(conflicts)} path(s) changed again since the block ended were left "
                f"as they are: " + ", ".join(str(c) for c in conflicts[:5]))

    def _put_back_claimed_watch(self, tx: "Transaction", w: OpenWatch, m1: Manifest,
                                changes: list, taken: ConflictError) -> None:
        """A watched process changed a path another transaction changed and has not ended
        (open, or prepared and in doubt): taken over unchecked, both committed and the
        store's view of the path was the other's while the disk held the process's bytes.
        As any change of a claimed path is refused, none of the block's changes becomes
        this transaction's: they are put back now, from the manifest taken before the
        block (the other transaction's bytes included; a path changed again since the end's
        snapshot stays, a conflict), the watch ends with no change, and ConflictError says
        so (``run()`` retries the transaction).  Caller holds ``_lock``."""
        kept = self._abandon_watch(tx, w, m1, changes)
        raise ConflictError(
            f"a process watched in workspace {w.ws.root!r} changed a path another "
            f"transaction holds ({str(taken).removesuffix('; nothing was changed')}); "
            f"none of the block's {len(changes)} change(s) "
            f"became part of transaction {tx.id}: they were put back to their state before "
            f"the watch{kept}", list(taken.keys))

    def _put_back_overlong_watch(self, tx: "Transaction", w: OpenWatch, m1: Manifest,
                                 changes: list, path: bytes) -> None:
        """A watched process made ``path``, too long for the file history's keys (see
        ``check_length``): the block's changes cannot be logged, so none of them becomes
        the transaction's.  They are put back now, from the manifest taken before the
        block (as ``_undo_open_watch`` does after a crash; a path changed again since the
        end's snapshot stays, a conflict), the watch ends with no change, and ValueError
        says so.  (Before, the end raised "nothing was changed", the watch stayed open, and
        its rollback could not reach the long paths: they stayed, reported as a
        stranger's change.)  Caller holds ``_lock``."""
        ws = w.ws
        kept = self._abandon_watch(tx, w, m1, changes)
        n = len(ws.root_b) + len(path)
        raise ValueError(
            f"a process watched in workspace {ws.root!r} made {display(path)!r}, too long "
            f"for walstore's file history: with the root it is {n} bytes, at most "
            f"{MAX_ROOT_AND_PATH_BYTES} (LMDB's keys are at most 511 bytes); none of the "
            f"block's {len(changes)} change(s) became part of transaction {tx.id}: they "
            f"were put back to their state before the watch{kept}")

    def _monitor(self, ws: Workspace) -> WorkspaceMonitor | None:
        """The change monitor of ``ws`` (made on first use; None: not on this platform,
        or ``WALSTORE_WATCH_FULL_WALK`` asks for full walks).  Caller holds the
        workspace's lock and ``_lock``."""
        if forced_full_walk() or not monitor_available() or self.engine.closed:
            self._drop_monitor(ws.root_b)
            return None
        mon = self._monitors.get(ws.root_b)
        if mon is None:
            mon = self._monitors[ws.root_b] = WorkspaceMonitor()
        return mon

    def _drop_monitor(self, root: bytes) -> None:
        mon = self._monitors.pop(root, None)
        if mon is not None:
            mon.close()

    def close_monitors(self) -> None:
        """Close every workspace's inotify descriptor (the store closes)."""
        with self._lock:
            for root in list(self._monitors):
                self._drop_monitor(root)

    def _previous(self, ws: Workspace) -> Manifest | None:
        """The newest manifest of ``ws`` (in memory, or saved by an earlier process)."""
        m = self._manifests.get(ws.root_b)
        if m is not None:
            return m
        row = self.engine.views.workspace_row(ws.root_b) or {}
        digest = row.get("manifest")
        if digest and self.blobs.has(digest):
            with contextlib.suppress(ValueError, OSError, CorruptionError):
                return Manifest.load(self.blobs, digest)
        return None

    # ---- commit ---------------------------------------------------------------------
    def commit_fields(self, tx: "Transaction") -> dict:
        """COMMIT fields (``files``: the live effects' LSNs).  Under durability "full"
        (and "normal"), what watched processes changed is fsynced here, before the commit
        record (walstore's own operations fsynced their changes as they made them)."""
        effs = [e for e in tx.effects if is_file_effect(e)]
        if not effs:
            return {}
        if any(isinstance(e, OpenWatch) and e.never_ran for e in effs):
            raise WalstoreError(f"transaction {tx.id} cannot commit: a watch() whose begin "
                                f"was interrupted could not be ended (a log write failed); "
                                f"roll the transaction back")
        ended = next((e for e in effs if isinstance(e, OpenWatch) and e.end_failed), None)
        if ended is not None:
            raise WalstoreError(f"transaction {tx.id} cannot commit: the end of a watch() "
                                f"block could not be recorded ({ended.end_failed}), so "
                                f"what the block changed is in no record of it; the "
                                f"transaction is rolled back (a rollback_to a savepoint "
                                f"taken before the watch, first, keeps the rest)")
        if any(isinstance(e, OpenWatch) for e in effs):
            raise WalstoreError(f"transaction {tx.id} cannot commit while a watch() is open "
                                f"(inside its block, or its changes could not be read)")
        if self.durable:  # (an OS error: StoreIOError, the transaction rolls back)
            with os_errors_as_store_errors():
                self._sync_watched([e for e in effs if e.op == "watch"])
        return {"files": [lsn for e in effs for lsn in e.lsns]}

    def _sync_watched(self, effs: list[FileEffect]) -> None:
        files: set[bytes] = set()
        dirs: set[bytes] = set()
        for eff in effs:
            for c in eff.steps:
                p = eff.ws.abspath(c.path)
                dirs.add(eff.ws.abspath(parent_of(c.path)))
                if c.after.is_file:
                    files.add(p)
                elif c.after.is_dir:
                    dirs.add(p)
        for p in sorted(files):
            try:
                fd = fileio.open_file(os.fsdecode(p), os.O_RDONLY | os.O_NOFOLLOW
                                      | os.O_NONBLOCK)
            except OSError as e:
                # changed since: not walstore's to make durable (ENXIO: a socket now)
                if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                    continue
                raise
            try:
                # a FIFO or device put there since the watch ended is a stranger's, as
                # a removal is: its fsync (EINVAL) failed the commit, which then rolled
                # the whole transaction back over another process's file
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    fileio.fsync(fd)
            finally:
                os.close(fd)
        for d in sorted(dirs, key=len, reverse=True):
            if os.path.isdir(d) and not os.path.islink(d):
                fileio.fsync_dir(os.fsdecode(d))

    # ---- undo -----------------------------------------------------------------------
    def undo_one(self, txid: int, eff: Any, batch: UndoBatch | None = None,
                 recovering: bool = False) -> list[FileConflict]:
        """Put back what one effect changed; its conflicts (raises on an I/O error).
        ``batch``: the effects undone with it (see UndoBatch); ``recovering``: at open,
        after a crash (see ``_undo_open_watch``)."""
        if isinstance(eff, OpenWatch) and eff.seen is None and not eff.never_ran \
                and not recovering:  # (the commits since it began in LMDB, where
            self.engine.drain()  # ``_committed_since`` reads them; drained at open)
        with self._ws_lock(eff.ws), self._lock:
            # a root replaced by a symlink since: nothing is put back through it (the
            # effect stays owed, reported); path by path it would be a conflict each
            eff.ws.check_root()
            if isinstance(eff, OpenWatch):
                if eff.never_ran and not recovering:  # (no block ran: recorded only)
                    return []
                if eff.seen is not None and not recovering:  # (its end's records failed)
                    m1, changes, specials = eff.seen
                    if specials:  # (as the steps' undo: a FIFO left in a directory the
                        # block made kept it, a conflict: audit 68)
                        _remove_own_specials(eff.ws, specials, self.durable)
                    unlimited = eff.manifest.workspace(eff.ws).without_length_limit()
                    return restore_changes(unlimited, changes + passages(changes, m1),
                                           self.blobs, self.quarantine(txid), check=True,
                                           durable=self.durable,
                                           since_ns=eff.manifest.taken_ns)
                return self._undo_open_watch(eff.ws, eff.manifest, txid, recovering,
                                             began=eff.lsn)
            if getattr(eff, "specials", None) and not recovering:
                _remove_own_specials(eff.ws, eff.specials, self.durable)
            steps = eff.steps if batch is None else batch.steps_of(eff)
            if recovering:
                steps = [c for c in steps if not self._committed_since(eff.ws.root_b, c.path,
                                                                        eff.lsns[0])]
            got = undo_steps(eff.ws, steps, self.blobs, self.quarantine(txid),
                             check=True, durable=self.durable,
                             done=batch.done(eff) if batch is not None else None,
                             after_crash=recovering, since_ns=eff.since_ns,
                             keep=batch.keep(eff) if batch is not None else None)
            if batch is not None:
                batch.conflicted(eff, got)
            return got

    def _committed_since(self, root: bytes, path: bytes, lsn: int) -> bool:
        """Has a transaction committed a version of ``path`` after ``lsn`` (LMDB, drained
        at open)?  Then an owed step of a loser logged at ``lsn`` is superseded: putting its
        before-image back would undo committed work, and the committed version found there
        is no stranger's.  (A store written before ``_put_back_stale`` existed could hold a
        dropped transaction's owed step under a later commit of the same path: its open
        reported a file conflict and quarantined a file walstore itself had committed.)"""
        st = self.engine.state
        if st.fversions is None:
            return False
        prefix = tables.fpath_prefix(root, path)
        for raw, _v in st.scan(tables.fversion_key(root, path, lsn + 1), prefix + b"\xff" * 9,
                               db="fversions"):
            if tables.is_fversion_of(raw, prefix):
                return True
        return False

    def _undo_open_watch(self, ws: Workspace, m0: Manifest, txid: int,
                         recovering: bool = False,
                         began: int | None = None) -> list[FileConflict]:
        """A watch that never ended (a crash inside it, or its end could not be read):
        every difference from its manifest is put back, as the watched processes' own.

        After a crash (``recovering``) that is a guess walstore cannot check: anyone may
        have changed the tree between the crash and this open (an edit, a watched
        process that outlived its parent).  So before a path is put back, the version
        found now (a file or symlink) is kept under
        ``quarantine/files/tx<txid>/watch/<path>`` and listed (``watch_saved``, in the
        recovery report): put back as promised, and nothing lost.

        A path a transaction committed a version of after the watch began (``began``, its
        WATCH_BEGIN's LSN) is that commit's, as ``undo_one`` leaves an owed step's: a
        watch whose end's records failed, the caller going on, another transaction's
        committed write of a path the block never changed was put back to the tree as
        the block began by the next open after a crash (audit 68)."""
        now = snapshot(m0.workspace(ws), self.blobs if recovering else None, previous=m0)
        changes = diff(m0, now)
        if began is not None:
            changes = [c for c in changes
                       if not self._committed_since(ws.root_b, c.path, began)]
        # (paths a watched process made over the history's length limit are put back too)
        unlimited = ws.without_length_limit()
        if recovering:
            self._keep_found(unlimited, changes, txid)
        return restore_changes(unlimited, changes + passages(changes, now), self.blobs,
                               self.quarantine(txid),
                               check=False, durable=self.durable, since_ns=m0.taken_ns)

    def _keep_found(self, ws: Workspace, changes: list, txid: int) -> None:
        """Keep the current file or symlink of each change aside (see above)."""
        where = os.fsencode(os.path.join(self.quarantine(txid), "watch"))
        for c in changes:
            if not (c.after.is_file or c.after.is_symlink):
                continue  # a directory's files are changes of their own; absence: nothing
            saved = fapply.save_aside(c.path, c.after, self.blobs, where)
            self.watch_saved.append({"tx": txid, "workspace": os.fsdecode(ws.root_b),
                                     "path": abs_display(ws.root_b, c.path),
                                     "found": c.after.describe(), "saved_as": saved})

    def record(self, txid: int, done: list, conflicts: list[tuple[int, FileConflict]],
               durable: bool = True,
               appended: Callable[[Any], None] | None = None) -> None:
        """Log the outcome of undoing ``done`` effects: one FILE_CONFLICT per conflict,
        then FILE_RESTORED naming them (durable: the last record covers the others;
        ``appended``: ``log_event``'s, for the FILE_RESTORED)."""
        for effect_lsn, c in conflicts:
            self.engine.log_event(_T.FILE_CONFLICT, {
                "tx": txid, "ws": _ws_of(done, effect_lsn), "effect": effect_lsn,
                "conflict": c.to_row(), "ts": time.time()}, txid)
        lsns = [lsn for e in done for lsn in e.lsns]
        if lsns:
            self.engine.log_event(_T.FILE_RESTORED, {"tx": txid, "effects": lsns}, txid,
                                  durable=durable, appended=appended)

    # ---- after a crash --------------------------------------------------------------
    def owed_rows(self) -> list[tuple[int, int, dict]]:
        """(txid, LSN, row) of every ``fsteps`` row no live transaction owns (at open:
        all of them), newest first, except prepared (in doubt) and held ones."""
        eng = self.engine
        eng.drain()
        st = eng.state
        prepared = eng.prepared.txids()
        out = []
        for raw, v in st.scan(b"", None, db="fsteps"):
            txid, lsn = tables.split_fsteps_key(raw)
            row = tables.unpack_row(v, "fsteps", raw, st.data_file)
            if txid in prepared or row.get("held"):
                continue
            out.append((txid, lsn, row))
        out.sort(key=lambda t: t[1], reverse=True)
        return out

    def owed_effects(self, copied: bool = False) -> tuple[list, list]:
        """At open: the file effects a crash (or an interrupted rollback) left owed, as
        effects to undo, and (txid, LSN, workspace, error) of rows that cannot even be
        read back (their workspace is gone, a manifest is damaged).  In a copy of another
        store (``copied``) they are held instead: never undone automatically, since the
        workspace on this machine is not the one they changed."""
        eng = self.engine
        eng.drain()
        if os.path.isdir(os.path.join(self.dir, "blobs")):
            self.blobs.remove_temps()
        owed = self.owed_rows()
        if copied:
            by_tx: dict[int, list[int]] = {}
            for txid, lsn, _row in owed:
                by_tx.setdefault(txid, []).append(lsn)
            for txid, lsns in sorted(by_tx.items()):
                eng.log_event(_T.FILE_RESTORED, {"tx": txid, "effects": sorted(lsns),
                                                 "held": True}, txid, durable=True)
            return [], []
        effects, failures = [], []
        for txid, lsn, row in owed:
            try:
                effects.append(self._effect_of_row(self.registered(row["ws"]), txid, lsn, row))
            except (OSError, ValueError, CorruptionError) as e:
                failures.append((txid, lsn, row.get("ws"), e))
        return effects, failures

    def remove_temps_of(self, effects: list) -> None:
        """After a crash: remove the temp names an interrupted change left next to the
        paths of ``effects`` (anywhere in the tree for a watch)."""
        dirs: dict[bytes, set | None] = {}
        for eff in effects:
            if isinstance(eff, FileEffect):
                if dirs.get(eff.ws.root_b, set()) is not None:
                    dirs.setdefault(eff.ws.root_b, set()).update(
                        parent_of(c.path) for c in eff.steps)
            else:
                dirs[eff.ws.root_b] = None
        for root, ds in dirs.items():
            with contextlib.suppress(OSError, ValueError):
                remove_stray_temps(self.registered(root), None if ds is None else sorted(ds),
                                   durable=self.durable)

    def _effect_of_row(self, ws: Workspace, txid: int, lsn: int, row: dict) -> Any:
        if row.get("op") == "watch" and "manifest" in row:
            return OpenWatch(ws, Manifest.load(self.blobs, row["manifest"]), row["manifest"],
                             lsn, txid)
        steps = [Change.from_row(s) for s in row.get("steps") or ()]
        return FileEffect(ws, row.get("op", "?"), steps, [lsn], txid,
                          since_ns=_row_since_ns(row))

    def effects_of(self, txid: int) -> list:
        """The owed effects of one ended transaction (``rollback_prepared``), newest first.
        A workspace whose root is gone still names its paths (``gone_ok``): the claims of
        a transaction in doubt there, and its rollback, which puts back what it can (a
        path it created is absent already) as a live rollback does."""
        self.engine.drain()
        st = self.engine.state
        prefix = tables.fsteps_prefix(txid)
        out = []
        for raw, v in st.scan(prefix, prefix + b"\xff" * 8, db="fsteps"):
            _t, lsn = tables.split_fsteps_key(raw)
            row = tables.unpack_row(v, "fsteps", raw, st.data_file)
            out.append(self._effect_of_row(self.registered(row["ws"], gone_ok=True), txid,
                                           lsn, row))
        return sorted(out, key=lambda e: e.lsn, reverse=True)

    def step_lsns_of(self, txid: int) -> list[int]:
        """The LSNs of one transaction's ``fsteps`` rows not held (its file effects still
        owed), read from the rows alone: no workspace is looked at (a copy's
        ``rollback_prepared`` holds them, TwoPhase; its workspace may be elsewhere)."""
        self.engine.drain()
        st = self.engine.state
        prefix = tables.fsteps_prefix(txid)
        out = []
        for raw, v in st.scan(prefix, prefix + b"\xff" * 8, db="fsteps"):
            if not tables.unpack_row(v, "fsteps", raw, st.data_file).get("held"):
                out.append(tables.split_fsteps_key(raw)[1])
        return out

    @staticmethod
    def conflict_doc(ws_root: bytes, c: FileConflict) -> dict:
        return {"workspace": os.fsdecode(ws_root), "path": abs_display(ws_root, c.path),
                "before": c.before.describe(), "current": c.current.describe(),
                "expected": None if c.expected is None else c.expected.describe(),
                "saved_as": c.saved_as, "reason": c.reason}

    def conflicts(self) -> list[dict]:
        """Every file conflict recorded (newest last)."""
        self.engine.drain()
        st = self.engine.state
        out = []
        if st.fconflicts is None:
            return out
        from ..engine.lmdb_state import from_u64
        for raw, v in st.scan(b"", None, db="fconflicts"):
            row = tables.unpack_row(v, "fconflicts", raw, st.data_file)
            c = FileConflict.from_row(row["conflict"])
            out.append(dict(self.conflict_doc(row["ws"], c), tx=row.get("tx"),
                            lsn=from_u64(raw, 0, "fconflicts", None, st), ts=row.get("ts")))
        return out

    # ---- retention ------------------------------------------------------------------
    def _horizon_moved(self) -> bool:
        horizon = self.engine.state.meta_int(b"horizon")
        return horizon > 0 and horizon != self._gc_horizon

    def _gc_due(self) -> bool:
        """A blob gc is worth its scan of the file tables: retention moved the horizon,
        or before-images written since the last gc reached a quarter of what that gc kept
        (at least GC_AFTER_BYTES), or none ran yet in this process, or the last one kept
        blobs only unapplied events named (``log_steps`` collects inline, in a loop of file
        operations, before the applier caught up).  (Only the horizon
        counted: under the default retention, which never moves it, the blobs of rolled-
        back writes and of watch() manifests stayed for good — 20 rolled-back 1 MB writes
        left 20 MB.)"""
        if self._horizon_moved():
            return True
        b = self._blobs
        if b is None:
            return False
        if self._gc_written is None or self._gc_kept_unapplied:
            return True
        return self._bytes_due()

    def _bytes_due(self) -> bool:
        """Before-images written since the last gc (or since this process began, when none
        ran yet) reached a quarter of what that gc kept, at least GC_AFTER_BYTES."""
        b = self._blobs
        since = b.bytes_written - (self._gc_written or 0)
        return since >= max(GC_AFTER_BYTES, self._gc_kept // 4)

    def gc(self, due: bool = False) -> dict:
        """A checkpoint hook: when due (``_gc_due``, or ``due``), remove the blobs nothing
        retained refers to (skipped while a file operation is under way)."""
        eng = self.engine
        if not os.path.isdir(os.path.join(self.dir, "blobs")) or not (due or self._gc_due()):
            return {}
        # a probe, then the lock by ``with`` (walstore.signals: an interrupt right after an
        # acquire() outside a ``with`` left the lock held, and every file operation of the
        # process waited for ever); a file operation that begins in between is waited for
        with deferred():
            busy = not self._lock.acquire(blocking=False)
            if not busy:
                self._lock.release()
        if busy:
            return {"blobs_gc": "skipped (a file operation is under way)"}
        # the pinned WAL read before the lock (file operations do not wait for it): the
        # call in ``referenced`` then reads only what was appended meanwhile
        self._pinned_log_refs(set(), set())
        with self._lock, gc_exclusive(self.dir) as free:
            if not free:
                return {"blobs_gc": "skipped (a backup is copying the file content)"}
            horizon = eng.state.meta_int(b"horizon")
            written = self.blobs.bytes_written
            unread: set[str] = set()
            manifests: set[str] = set()
            refs = self.referenced(manifests_out=manifests, unread_out=unread)
            if unread:  # (what only it names would be taken for garbage: kept, all)
                return {"blobs_gc": f"skipped (a saved watch manifest does not load: "
                                    f"{', '.join(sorted(d[:12] for d in unread))}; "
                                    f"`walstore verify` names it)"}
            res = self.blobs.gc(refs)
            self._forget_manifests(manifests)
            self._gc_horizon = horizon
            self._gc_written, self._gc_kept = written, res.kept_bytes
            return {"blobs_removed": res.removed, "blob_bytes_freed": res.freed}

    def free_room(self) -> int:
        """Room that is the store's own, given back before a file undo that ran out of it
        is tried again (at open): the blobs nothing refers to (a rolled-back write's
        after-image, kept until the next blob gc — at a crashed writer's recovery, the
        close of that recovery).  The blobs of the owed undos are referred to by their
        ``fsteps`` rows (recorded done only after the settle): kept.  Bytes freed."""
        return int(self.gc(due=True).get("blob_bytes_freed", 0))

    def referenced(self, manifests_out: set[str] | None = None,
                   unread_out: set[str] | None = None) -> set[str]:
        """Every blob a retained row, a saved manifest, an unapplied event or a file record
        of the WAL a retention pin keeps (a replica has not received it yet) refers to.
        ``manifests_out``: given, the digests among them that are saved watch manifests
        are added to it (``walstore verify`` loads each one); ``unread_out``: given, those
        manifests that could not be read (damaged or missing: the blobs only they name are
        not in the set — the gc then collects nothing, probe-disk42)."""
        eng = self.engine
        st = eng.state
        refs: set[str] = set()
        manifests: set[str] = set()

        def steps_refs(steps) -> None:
            for _p, before, after in steps or ():
                refs.update(_digests(before))
                refs.update(_digests(after))
        # the unapplied events first, LMDB after: the applier drops events only once LMDB
        # holds them, so each is seen in one place or both (the other way round an apply
        # between the two reads hid its steps, and their blobs went)
        self._gc_kept_unapplied = False
        for e in eng.views.unapplied_file_events():
            self._gc_kept_unapplied = True
            steps_refs(e.body.get("steps"))
            if e.body.get("manifest"):
                manifests.add(e.body["manifest"])
        for k, v in st.scan(b"", None, db="fsteps"):
            row = tables.unpack_row(v, "fsteps", k, st.data_file)
            steps_refs(row.get("steps"))
            if row.get("manifest"):
                manifests.add(row["manifest"])
        horizon = st.meta_int(b"horizon")
        below: dict[bytes, list] = {}  # path prefix -> after of its newest version below
        for k, v in st.scan(b"", None, db="fversions"):
            _t, before, after = tables.unpack_row(v, "fversions", k, st.data_file)
            if tables.split_fversion_key(k)[2] >= horizon:
                refs.update(_digests(before))
                refs.update(_digests(after))
            else:  # below the horizon only the state the newest version left is read
                below[k[:-8]] = after
        for after in below.values():
            refs.update(_digests(after))
        for k, v in st.scan(b"", None, db="fconflicts"):
            c = tables.unpack_row(v, "fconflicts", k, st.data_file).get("conflict") or {}
            refs.update(_digests(c.get("before")))
        for row in self.rows().values():
            if row.get("manifest"):
                manifests.add(row["manifest"])
        self._pinned_log_refs(refs, manifests)
        for m in self._manifests.values():
            refs.update(m.digests())
        for d in manifests:
            refs.add(d)
            try:
                refs.update(self._manifest_digests(d))
            except (ValueError, OSError, CorruptionError):
                if unread_out is not None:
                    unread_out.add(d)
        if manifests_out is not None:
            manifests_out.update(manifests)
        return refs

    def _forget_manifests(self, kept: set[str]) -> None:
        """The gc: drop from ``_manifest_refs`` the saved manifests nothing retained names
        any more (``kept``: those ``referenced`` found; the others' blobs are gone with
        this gc, and no later gc asks for them).  Only the MANIFEST_REFS_KEPT cap bounded
        the cache, counted in blob names: a store kept open with retention held every
        watch()'s manifest since its open (a probe: 400 watches, retention 50, 400
        entries), and a manifest naming no blob (a tree of directories and symlinks)
        counted nothing, so those grew without any bound."""
        cache = self._manifest_refs
        gone = [d for d in cache if d not in kept]
        for d in gone:
            self._manifest_refs_count -= len(cache.pop(d))
        if gone and len(self._manifest_names) > 2 * self._manifest_refs_count + 1024:
            self._manifest_names = {n: n for names in cache.values() for n in names}

    def _manifest_digests(self, digest: str, manifest: Manifest | None = None
                          ) -> frozenset[str]:
        """The blobs the saved manifest ``digest`` names (loaded once: see
        ``_manifest_refs``; ``manifest``: the one just saved, read instead of its blob).
        Digests shared by many loaded manifests share one string."""
        cache = self._manifest_refs
        got = cache.pop(digest, None)
        if got is None:
            if manifest is not None:  # (its names are its records' own strings, shared
                got = frozenset(manifest.digests())  # with the manifests built from it)
            else:
                shared = self._manifest_names
                got = frozenset(shared.setdefault(n, n)
                                for n in Manifest.load(self.blobs, digest).digests())
            self._manifest_refs_count += len(got)
        cache[digest] = got  # (now the newest)
        while self._manifest_refs_count > MANIFEST_REFS_KEPT and len(cache) > 1:
            oldest = next(iter(cache))
            self._manifest_refs_count -= len(cache.pop(oldest))
        if len(self._manifest_names) > 2 * self._manifest_refs_count + 1024:
            self._manifest_names = {n: n for names in cache.values() for n in names}
        return got


    def _pinned_log_refs(self, refs: set[str], manifests: set[str]) -> None:
        """The blobs named by the file records of the local WAL from the lowest retention
        pin on (the replica's position, bounded by ``max_pin_bytes``: the log from there is
        kept for a shipper that has not sent it yet), read with the one log reader.  The
        shipper uploads a record's blobs in the round that ships it: a blob removed before
        that (retention trimmed the version, the gc ran) was named by the replica's history
        but never in it — a restore of those points could not read their files (24 of 30
        restores lacked content with ``retain_transactions=2``: probe-repl).  A replica
        lagging past ``max_pin_bytes`` keeps no WAL, but the records still on disk from its
        position are shipped all the same: its position (``replica_positions``, unbounded)
        counts here too (probe-repl44: the gc removed their content, and the replica's
        history named 37 blobs it never received).

        Incremental (``PinnedLogRefs``): each call reads only the records appended since
        the last one (a full walk of a lagging replica's pinned WAL took 2.5 s per 440 MB,
        and file operations waited behind it: probe-review)."""
        eng = self.engine
        pins = [p for p in (pin() for pin in [*eng.retention_pins, *eng.replica_positions])
                if p is not None]
        if not pins or eng.wal is None:
            self._pinned.clear()
            return
        got_refs, got_manifests = self._pinned.update(eng.layout.wal, eng.store_id, min(pins))
        refs.update(got_refs)
        manifests.update(got_manifests)


class PinnedLogRefs:
    """The blobs (and watch manifests) named by the file records of the WAL from a pin
    on, kept between calls: each ``update`` reads the log from where the last one ended
    (from the pin when it moved below that, or on the first call) and forgets what only
    records below the pin named.  Bounded by the WAL on disk from the lowest pin or replica
    position (past ``max_pin_bytes`` of lag the WAL is trimmed, and the walk begins at the
    first segment left).
    Thread-safe."""

    FILE_TYPES = (_T.FILE_STEPS, _T.WATCH_BEGIN, _T.FILE_CONFLICT)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        self.start: int | None = None   # the pin the entries are kept from
        self.walked_to: int | None = None  # the end of the last record read
        self.refs: dict[str, int] = {}       # digest -> the newest LSN naming it
        self.manifests: dict[str, int] = {}  # manifest digest -> the newest LSN naming it

    def update(self, wal_dir: str, store_id: bytes, pin: int
               ) -> tuple[set[str], set[str]]:
        from ..log import records as _records
        from ..log.reader import LogReader
        with self._lock:
            if self.start is None or pin < self.start or self.walked_to is None:
                self.clear()
                frm = pin
            else:
                frm = max(pin, self.walked_to)
            self.start = pin
            for rec in LogReader(wal_dir, store_id).records(frm):
                self.walked_to = rec.end_lsn
                if rec.type not in self.FILE_TYPES:
                    continue
                try:
                    body = _records.decode(rec.payload)
                except ValueError:
                    continue  # (recovery judges a record that does not decode)
                found: set[str] = set()
                for step in body.get("steps") or ():
                    if isinstance(step, (list, tuple)) and len(step) == 3:
                        for row in step[1:]:
                            if isinstance(row, (list, tuple)) and len(row) > 3:
                                found.update(_digests(row))
                conflict = body.get("conflict")
                if isinstance(conflict, dict) and isinstance(conflict.get("before"), list) \
                        and len(conflict["before"]) > 3:
                    found.update(_digests(conflict["before"]))
                for d in found:
                    self.refs[d] = rec.lsn
                if isinstance(body.get("manifest"), str):
                    self.manifests[body["manifest"]] = rec.lsn
            if self.walked_to is None:
                self.walked_to = frm
            for table in (self.refs, self.manifests):
                for d in [d for d, lsn in table.items() if lsn < pin]:
                    del table[d]
            return set(self.refs), set(self.manifests)


GC_LOCK = "gc.lock"  # under files/: a gc holds it exclusive, a backup shared (ops.backup)


@contextlib.contextmanager
def gc_exclusive(files_dir: str) -> Iterator[bool]:
    """The blob gc's side of ``files/gc.lock``: yields True with the lock held exclusive,
    False (and no gc may run) while a backup holds it shared — ``walstore backup``, in any
    process, copies the blobs its LMDB snapshot names, which a gc in between could remove
    (a dead backup's lock goes with its process)."""
    import fcntl

    from ..engine.layout import held_flock, unlock_and_close
    fd = fileio.open_file(os.path.join(files_dir, GC_LOCK), os.O_RDWR | os.O_CREAT)
    held_flock(fd)  # (a child forked meanwhile closes its copy: see layout._forked)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        unlock_and_close(fd)  # (unlocked first: a child forked during the gc kept it)


def _specials_at(ws: Workspace, m1: Manifest, changes: list) -> dict:
    """The special files a watched block left at the paths of its ``changes`` or inside a
    directory it made (its end's manifest ``m1`` skipped them): rel -> (st_dev, st_ino,
    st_ctime_ns) (an inode number alone is reused at once by a FIFO made anew).  (Only
    those at a changed path were: a test run's socket in a directory it made kept the
    directory from its rollback, reported as changed behind walstore's back.)"""
    out: dict = {}
    if not m1.stats.skipped:
        return out
    changed = {c.path for c in changes}
    made = {c.path for c in changes if c.after.is_dir and not c.before.is_dir}
    for rel in m1.stats.skipped:
        if rel not in changed and not (made and _with_parents([rel]) & made):
            continue
        try:
            st = os.lstat(ws.abspath(rel))
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                or stat.S_ISLNK(st.st_mode)):
            out[rel] = (st.st_dev, st.st_ino, st.st_ctime_ns)
    return out


def _remove_own_specials(ws: Workspace, specials: dict, durable: bool) -> None:
    """Before a watch's changes are undone: remove each special file the block left
    (``FileEffect.specials``) that is still the very same one; another one there, or
    anything else, stays (the undo then finds a conflict)."""
    for rel in sorted(specials, key=len, reverse=True):
        try:
            _r, abs_path = ws.resolve(rel)
            st = os.lstat(abs_path)
        except (OSError, ValueError):
            continue
        if (st.st_dev, st.st_ino, st.st_ctime_ns) != specials[rel] or stat.S_ISREG(st.st_mode) \
                or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            continue
        fileio.unlink(os.fsdecode(abs_path))
        if durable:
            fileio.fsync_dir(os.fsdecode(ws.abspath(parent_of(rel))))


def _ws_of(done: list, effect_lsn: int) -> bytes | None:
    for e in done:
        if effect_lsn in e.lsns:
            return e.ws.root_b
    return None


class TxFiles:
    """``tx.files(ws)``: the transaction's file operations in one workspace.  Paths are
    relative to the workspace root (str or bytes); an absolute path, a ``..`` leaving the
    root, or a symlink on the way raises ValueError and changes nothing.  Every change is
    made in place at once, after its before-images are durable in the store; rollback
    (and ``rollback_to`` a savepoint taken before it) puts it back."""

    def __init__(self, files: Files, tx: "Transaction", ws: Workspace) -> None:
        self._files = files
        self._tx = tx
        self.workspace = ws

    def __repr__(self) -> str:
        return f"<TxFiles {self.workspace.root!r} of transaction {self._tx.id}>"

    def _run(self, op: str, make_plan, act):
        return self._files.run(self._tx, self.workspace, op, make_plan, act)

    @property
    def _blobs(self) -> BlobStore:
        return self._files.blobs

    @property
    def _durable(self) -> bool:
        return self._files.durable

    # ---- changes ----------------------------------------------------------------------
    @os_errors_wrapped
    def write(self, path: PathLike, data: str | bytes, mode: int | None = None) -> None:
        """Make ``path`` a file holding ``data`` (str: UTF-8); ``mode`` default: the
        current file's, else 0o666 less the umask.  Missing parents are created."""
        if isinstance(data, str):
            try:
                data = data.encode("utf-8")
            except UnicodeEncodeError as e:  # (a bare codec error named nothing)
                raise ValueError(f"the str content written to {path!r} is not valid UTF-8 "
                                 f"text ({e.reason} at character {e.start})") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"file content is str or bytes, not {type(data).__name__}")
        data = bytes(data)
        if mode is not None:
            fapply.check_mode(mode)
        ws = self.workspace
        self._run("write", lambda: plan.plan_write(ws, path, data, self._blobs, mode),
                  lambda: fapply.write_file(ws, path, data, mode, self._durable))

    @os_errors_wrapped
    def mkdir(self, path: PathLike, mode: int | None = None, exist_ok: bool = False) -> None:
        """Create the directory ``path`` (and missing parents)."""
        ws = self.workspace
        if mode is not None:
            fapply.check_mode(mode)
        rel, abs_path = ws.resolve(path)
        if exist_ok and os.path.isdir(abs_path) and not os.path.islink(abs_path):
            return
        if exist_ok and os.path.islink(abs_path):
            # a symlink leading outside: ValueError, as a read of it (it was
            # FileExistsError); one leading to a directory inside is that directory
            try:
                _r, _a, st = self._final(rel)
            except FileNotFoundError:
                pass  # (dangling: it exists, FileExistsError below)
            else:
                if stat.S_ISDIR(st.st_mode):
                    return
        self._run("mkdir", lambda: plan.plan_mkdir(ws, rel, self._blobs, mode),
                  lambda: fapply.make_dir(ws, rel, mode, self._durable))

    @os_errors_wrapped
    def symlink(self, path: PathLike, target: str | bytes) -> None:
        """Make ``path`` a symlink to ``target`` (data: never followed by walstore)."""
        ws = self.workspace
        t = fs_bytes(target, "symlink target")
        if not t or b"\0" in t:
            raise ValueError("a symlink target must be non-empty and contain no NUL byte")
        self._run("symlink", lambda: plan.plan_symlink(ws, path, t, self._blobs),
                  lambda: fapply.make_symlink(ws, path, t, self._durable))

    @os_errors_wrapped
    def chmod(self, path: PathLike, mode: int) -> None:
        """Change the permission bits of a file or directory."""
        ws = self.workspace
        fapply.check_mode(mode)
        self._run("chmod", lambda: plan.plan_mode(ws, path, mode, self._blobs),
                  lambda: fapply.set_mode(ws, path, mode, self._durable))

    @os_errors_wrapped
    def delete(self, path: PathLike) -> None:
        """Remove a file, a symlink or an empty directory (FileNotFoundError if absent)."""
        ws = self.workspace
        self._run("delete", lambda: plan.plan_delete(ws, path, self._blobs),
                  lambda: fapply.delete(ws, path, self._durable))

    @os_errors_wrapped
    def rename(self, src: PathLike, dst: PathLike) -> None:
        """Move ``src`` to ``dst`` (replacing a file or symlink there; missing parents of
        ``dst`` are created)."""
        ws = self.workspace
        self._run("rename", lambda: plan.plan_rename(ws, src, dst, self._blobs),
                  lambda: fapply.rename(ws, src, dst, self._durable))

    @os_errors_wrapped
    def rmtree(self, path: PathLike) -> None:
        """Remove ``path`` and everything under it (only what was captured before)."""
        ws = self.workspace
        holder: dict = {}

        def make_plan() -> list:
            holder["steps"] = plan.plan_rmtree(ws, path, self._blobs)
            return holder["steps"]

        def act():
            expected = {c.path: c.before for c in holder["steps"]}
            return fapply.rmtree(ws, path, expected, self._durable)
        self._run("rmtree", make_plan, act)

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watch]:
        """Every change made inside the block, by any process, in the workspace (paths
        its ``ignore=`` patterns match excepted) becomes part of the transaction."""
        with self._files.watch(self._tx, self.workspace) as w:
            yield w

    # ---- reads ------------------------------------------------------------------------
    def _final(self, path: PathLike) -> tuple[bytes, bytes, os.stat_result]:
        """(rel, abs, lstat) of ``path`` with symlinks inside the root followed (one
        leading outside, or too many hops: ValueError)."""
        ws = self.workspace
        rel, abs_path = ws.resolve(path)
        for _hop in range(SYMLINK_HOPS):
            st = os.lstat(abs_path)
            if not stat.S_ISLNK(st.st_mode):
                return rel, abs_path, st
            target = os.readlink(abs_path)
            if target.startswith(b"/"):
                if not ws.contains(target):
                    raise ValueError(f"{display(rel)!r} is a symlink leading outside the "
                                     f"workspace {ws.root!r}")
                nxt = os.path.relpath(os.path.normpath(target), ws.root_b)
            else:
                nxt = parent_of(rel) + b"/" + target if parent_of(rel) else target
            try:
                rel, abs_path = ws.resolve(nxt)
            except ValueError as e:
                raise ValueError(f"{display(rel)!r} is a symlink leading outside the "
                                 f"workspace {ws.root!r} ({e})") from None
        raise ValueError(f"too many levels of symlinks at {display(rel)!r}")

    @os_errors_wrapped
    def read(self, path: PathLike) -> bytes:
        """The content of a file (this transaction's own writes are in place already).
        A closed store's: StoreClosed, as every read of it (it read the disk)."""
        self._files.engine.check_open()
        asked = self._note_read(path)
        rel, abs_path, st = self._final(path)
        if rel != asked:  # (through a symlink: the file it leads to too)
            self._files.note_read(self._tx, self.workspace, rel)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{display(rel)!r} is a directory",
                                    os.fsdecode(abs_path))
        # A FIFO, socket or device is refused, looked at before and after the open (one
        # swapped in between): opened as a file, a FIFO without a writer blocked the
        # caller forever and a character device (a /dev/zero twin) was read without end.
        # O_NONBLOCK makes the open of a FIFO return at once, so the fstat can say so.
        fd = fapply.open_to_read(self.workspace, rel) if stat.S_ISREG(st.st_mode) else None
        try:
            if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsupportedFileType(f"cannot read {display(rel)!r} in workspace "
                                          f"{self.workspace.root!r}: it is a special file "
                                          f"(FIFO, socket or device); walstore tracks files, "
                                          f"directories and symlinks")
            return read_whole(fd)  # (the content once in memory, not chunks plus a join)
        finally:
            if fd is not None:
                os.close(fd)

    @os_errors_wrapped
    def exists(self, path: PathLike) -> bool:
        self._files.engine.check_open()
        self._note_read(path)
        rel, _abs = self.workspace.resolve(path)
        # looked up in its parent pinned from the root (as a read): by its absolute path,
        # a parent swapped for a symlink to outside after the check answered for outside
        try:
            with fapply.pinned_parent(self.workspace, rel) as (_parent, pinned):
                return os.path.lexists(pinned)
        except FileNotFoundError:  # (a parent gone since the check)
            return False

    def _note_read(self, path: PathLike) -> bytes:
        """A read of ``path`` (before it reads: a change between the note and the read
        shows at commit as a conflict, never as a miss); returns its relative form."""
        rel, _abs = self.workspace.resolve(path)
        self._files.note_read(self._tx, self.workspace, rel)
        return rel

    @os_errors_wrapped
    def listdir(self, path: PathLike = "") -> list[str]:
        """The names in a directory, ignored ones left out.  A symlink is followed as
        ``read`` follows it: inside the root only (one leading outside: ValueError)."""
        self._files.engine.check_open()
        ws = self.workspace
        if ws.rel(path, allow_root=True):
            asked, _abs = ws.resolve(path)
            rel, abs_path, _st = self._final(path)
            if rel != asked:  # (through a symlink: the link is read too)
                self._files.note_read(self._tx, ws, asked)
        else:
            rel, abs_path = ws.resolve(path, allow_root=True)
        self._files.before_list(self._tx, ws, rel)
        names = _listing(ws, rel)
        if names is None:  # (as os.listdir says it: absent, or not a directory)
            fd = os.open(abs_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.close(fd)
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", os.fsdecode(abs_path))
        # validated at commit like a read (the names, not what the files hold)
        self._files.note_list(self._tx, ws, rel, names)
        return sorted(os.fsdecode(n) for n in names)


@dataclass
class FilesRecoveryReport(RecoveryReport):
    """The recovery report of a store with reversible files: ``file_conflicts`` lists the
    paths recovery could not put back because they changed behind walstore's back (each
    also a ``file-conflict`` problem, so ``walstore recover`` lists it and exits 1)."""

    file_conflicts: list = field(default_factory=list)
    # crashed watches put back: the version each path had at recovery, kept aside (see
    # ``Files._undo_open_watch``); a normal crash outcome, listed (``watch-undone``)
    watch_saved: list = field(default_factory=list)

    @classmethod
    def of(cls, report: RecoveryReport) -> "FilesRecoveryReport":
        if isinstance(report, cls):
            return report
        return cls(**{f.name: getattr(report, f.name) for f in fields(report)})

    def add_files(self, conflicts: list[dict], failures: list,
                  watch_saved: list[dict] = ()) -> None:
        self.file_conflicts.extend(conflicts)
        for w in watch_saved:
            self.watch_saved.append(w)
            self.problems.append(Problem(
                "watch-undone", w["path"], 0, 0,
                f"changed while a watch() of transaction {w['tx']} ran when the store "
                f"crashed (or after the crash): put back to its state before the watch; "
                f"the version found ({w['found']}) is kept", 0, "saved", w["saved_as"]))
        for c in conflicts:
            self.problems.append(Problem(
                "file-conflict", c["path"], 0, 0,
                f"changed behind walstore's back since transaction {c['tx']} (now "
                f"{c['current']}; walstore's version: {c['before']}): the other version "
                f"stays", 0, "kept", c["saved_as"]))
        for txid, lsn, ws, err in failures:
            self.problems.append(Problem(
                "file-undo-failed", os.fsdecode(ws or b"?"), 0, lsn,
                f"the file changes of transaction {txid} could not be put back "
                f"({type_and_message(err)}); they stay owed: put back at the next "
                f"open (or `walstore recover`)",
                0, "owed"))
