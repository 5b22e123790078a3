"""The one error hierarchy of walstore.

Every exception walstore raises on purpose derives from :class:`WalstoreError`, so a
caller can catch the whole family with one ``except``.  Errors that describe bad input
to a call (a key of the wrong type, a value msgpack cannot encode) are the builtin
``TypeError`` / ``ValueError`` instead, as Python users expect.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


class WalstoreError(Exception):
    """Base class of every walstore error."""


class ConflictError(WalstoreError):
    """A transaction read or scanned something another committed transaction changed.

    Nothing of the failed transaction was written.  ``keys`` lists the conflicting keys
    (as far as they are known).
    """

    def __init__(self, message: str, keys: list | None = None) -> None:
        super().__init__(message)
        self.keys = list(keys or [])


class RevertConflict(WalstoreError):
    """Undoing would clobber later work: later committed transactions (``txids``), actions
    that were compensated and cannot be redone (``actions``), or files changed behind
    walstore's back (``paths``)."""

    def __init__(self, message: str, txids: list[int] | None = None,
                 actions: list[str] | None = None, paths: list[str] | None = None) -> None:
        super().__init__(message)
        self.txids = list(txids or [])
        self.actions = list(actions or [])
        self.paths = list(paths or [])


class CompensationFailed(WalstoreError):
    """A compensation kept failing after its retries; it is marked ``failed`` and kept
    pending.  ``undo``: raised by a ``revert`` or ``rewind`` whose undo committed before
    its compensations ran, the ``TxnInfo`` of that undoing transaction (it stands), else
    None.  ``committed``: True when that undo committed (the message says so too): the
    state is the undone one, and only the named compensations are still owed."""

    undo: Any = None
    committed: bool = False

    def __init__(self, message: str, action_ids: list | None = None) -> None:
        super().__init__(message)
        self.action_ids = list(action_ids or [])


class NeedsRecovery(WalstoreError):
    """The store was not shut down cleanly and was opened with ``recover="manual"``."""


class CorruptionError(WalstoreError):
    """Bytes on disk are damaged in a way recovery must not paper over.

    Carries where and why: ``file``, ``offset`` (byte offset in that file), ``lsn`` (the
    log position, when known) and ``reason``.
    """

    def __init__(self, reason: str, file: str | None = None, offset: int | None = None,
                 lsn: int | None = None) -> None:
        self.reason = reason
        self.file = file
        self.offset = offset
        self.lsn = lsn
        where = []
        if file is not None:
            where.append(f"file {file}")
        if offset is not None:
            where.append(f"offset {offset}")
        if lsn is not None:
            where.append(f"LSN {lsn}")
        super().__init__(f"{reason}" + (f" ({', '.join(where)})" if where else ""))


class StoreLocked(WalstoreError):
    """Another writer holds the store; ``pid`` names it (None when unknown)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class ReadOnlyError(WalstoreError):
    """A write was attempted on a read-only store (opened so, or after an fsync error)."""


class CommitOutcomeUnknown(ReadOnlyError):
    """The commit record was written but its fsync failed: whether the transaction
    committed is unknown until recovery.  The store is read-only now; no compensation ran
    (the next open decides: committed, nothing to compensate; not committed, its
    compensations run then).  ``txid`` names the transaction."""

    def __init__(self, message: str, txid: int | None = None) -> None:
        super().__init__(message)
        self.txid = txid


class StoreClosed(WalstoreError):
    """The store (or the transaction) is closed."""


class NotAStore(WalstoreError):
    """The path exists but is not a walstore store, or is one of a format version this
    walstore does not read: a newer walstore's (a newer STORE version, a WAL record of a
    type or flags it does not know: the message says so and to upgrade walstore)."""


class StoreIOError(WalstoreError, OSError):
    """The operating system failed an operation on the store's files (a full disk, a
    read-only file system, EIO, no permission): ``errno``, ``strerror`` and ``filename``
    are the OSError's, which is chained as the cause.  Also an OSError, so code that
    handles OS errors keeps working."""


class ErasureOwed(StoreIOError):
    """``store.purge`` committed — its keys are gone from every API and the purge stands
    (it cannot be undone, and retrying it is not needed) — but a step after its commit
    failed: applying it to LMDB or erasing the old bytes from the store's files (the cause
    is chained: a full disk, an I/O error).  The erasure is owed, recorded with the purge's
    rows in LMDB (or by its record in the log, which the next open replays), and
    ``store.checkpoint()`` or the next writable open finishes it; when the failure
    turned the store read-only, reopen it.  So the data is erased from every API now
    and from every file once that runs: do not report the purge as failed.  ``report``: the purge's ``txid``, ``lsn``,
    ``keys_deleted``, ``keys_erased`` and ``"erasure_owed": True``; ``errno``: the cause's
    (None when it had none).  A ``StoreIOError`` (an ``OSError``), as the failures it
    wraps mostly were."""

    def __init__(self, message: str, report: dict | None = None,
                 code: int | None = None) -> None:
        if code is None:
            super().__init__(message)
        else:
            super().__init__(code, message)
        self.report = dict(report or {})
        self.txid = self.report.get("txid")
        self.lsn = self.report.get("lsn")

    def __reduce__(self):
        return (type(self), (self.strerror if self.errno is not None else str(self),
                             self.report, self.errno))


_OS_ERROR_CLASSES: dict[type, type] = {}


def as_store_error(e: OSError) -> OSError:
    """``e`` as a StoreIOError that is also ``e``'s own OSError subclass (a
    ``FileExistsError`` stays one: ``except FileExistsError`` and ``except WalstoreError``
    both catch it), with ``errno``, ``strerror`` and ``filename`` kept.  Raise it ``from
    e``.  A walstore error is returned as it is."""
    if isinstance(e, WalstoreError):
        return e
    cls = type(e)
    wrapped = _OS_ERROR_CLASSES.get(cls)
    if wrapped is None:
        if cls is OSError or not issubclass(cls, OSError):
            wrapped = StoreIOError
        else:
            name = f"Store{cls.__name__}"
            wrapped = globals().get(name)
            if wrapped is None:  # (bound here by name: pickle finds it, e.g. across a
                wrapped = type(name, (StoreIOError, cls),  # process pool)
                               {"__module__": __name__, "__qualname__": name,
                                "__doc__": f"A StoreIOError that is also a {cls.__name__}."})
                globals()[name] = wrapped
        _OS_ERROR_CLASSES[cls] = wrapped
    if e.errno is None:
        return wrapped(str(e))
    if e.filename is None:
        return wrapped(e.errno, e.strerror)
    if e.filename2 is None:
        return wrapped(e.errno, e.strerror, e.filename)
    return wrapped(e.errno, e.strerror, e.filename, None, e.filename2)


@contextlib.contextmanager
def os_errors_as_store_errors() -> Iterator[None]:
    """The OS errors of the block leave as ``as_store_error`` makes them, the cause
    chained (a part of a call whose other part runs user code: ``watch()``'s begin and
    end, never its block)."""
    try:
        yield
    except OSError as e:
        wrapped = as_store_error(e)
        if wrapped is e:
            raise
        raise wrapped from e


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters with the
    length said (a 100 KB name asked for was echoed whole into the message, and into
    every log line that printed it)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}... ({len(text):,} characters)"


def type_and_message(e: BaseException) -> str:
    """``"Type: message"`` of ``e`` as reports, the action log, tables and warnings say it;
    just ``"Type"`` when its message is empty (a Ctrl-C read "KeyboardInterrupt: ", a bare
    ``raise RuntimeError()`` "RuntimeError: "); a ``__str__`` that fails does not replace
    the exception on its way.  The one place this is formatted: no copies."""
    try:
        message = str(e)
    except Exception:  # (a broken __str__)
        message = "(its message could not be read)"
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def command_word(path: object) -> str:
    """A path as one word of a command a message suggests (`walstore recover PATH`), so
    that it pastes back into a shell: quoted when it holds a space or a shell character
    (``walstore recover my store`` was two arguments) and, beginning with ``-``, written
    ``./-x`` (else an option)."""
    import os
    import shlex
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    if text.startswith("-"):
        text = os.path.join(os.curdir, text)
    return shlex.quote(text)


def os_errors_wrapped(method):
    """``method`` with its OS errors leaving as ``as_store_error`` makes them (the file
    operations of reversible files: a FileExistsError is still one)."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        with os_errors_as_store_errors():
            return method(*args, **kwargs)
    return call


class TransactionClosed(StoreClosed):
    """The transaction was already committed or rolled back."""


class HistoryTrimmed(WalstoreError):
    """The requested point lies before the retained history horizon."""


class UnknownPoint(WalstoreError, KeyError):
    """A point (txid, LSN or restore point name) that names nothing in this store."""

    def __init__(self, message: str, point=None) -> None:
        super().__init__(message)
        self.point = point

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownAction(WalstoreError, KeyError):
    """No recorded action has this id (``store.resolve``, ``get_action``): a KeyError, as it
    always was, and a WalstoreError like the store's other refusals."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownGid(UnknownPoint):
    """No prepared transaction has this gid (never prepared, or already decided: by
    another thread too, a moment before)."""


class TrimmedOrUnknownPoint(HistoryTrimmed, UnknownPoint):
    """A txid among the trimmed ones that is not in the retained history: it was trimmed,
    or it never committed (the store keeps no list of trimmed ids to tell which), so it is
    both a ``HistoryTrimmed`` and an ``UnknownPoint``.  A txid above every trimmed one is
    a plain ``UnknownPoint``."""


class ActionIdTypeError(UnknownAction, TypeError):
    """An action id of a type that names no action (a float, None, an int...): an
    ``UnknownAction`` (it names nothing, nothing changes) that is also a ``TypeError`` — a
    float ``1.10`` was read as ``"1.1"``, another action."""


class WorkspaceChanged(WalstoreError, ValueError):
    """A directory walstore was working in inside a workspace was swapped for a symlink
    (or replaced) by another process while the operation ran: it stopped rather than go
    through it (nothing outside the root is touched).  Also a ``ValueError``, as every
    refusal of a path leading outside the root."""


class UnsupportedFileType(WalstoreError, ValueError):
    """A FIFO, socket or device where reversible files needed a file, a directory or a
    symlink (the only kinds walstore tracks): refused before anything changes.  Also a
    ``ValueError``, as every refusal of a path."""


class TransactionTooLarge(WalstoreError, ValueError):
    """The write that would take one transaction's write set past
    ``codec.MAX_TXN_WRITE_BYTES`` (keys and values, 16 bytes more each) was refused at its
    call: recovery takes back no bigger transaction.  Nothing of that write was made and the
    transaction is still open (roll back to a savepoint, or commit what it holds and go on
    in another).  A purge or undo that would write that much is refused before it changes
    anything."""


class PointTypeError(UnknownPoint, TypeError):
    """A point of a type that can name nothing (a float, a bool, None, a list...): an
    ``UnknownPoint`` (it names nothing, nothing changes) that is also a ``TypeError``."""


class EmptyArgumentError(TypeError, ValueError):
    """An empty str or bytes where a name or key prefix is needed (``restore_point("")``,
    ``purge("")``, ``scope=""``), or a gid of no bytes or past 200 (``tx.prepare("")``):
    the right type with a value that names nothing, so it is both — ``except ValueError`` catches it as ``tx.put("", ...)``'s does, and
    ``except TypeError`` as it always did."""


class ReplicationError(WalstoreError):
    """Replication could not do what was asked (ship within a timeout, restore, lease)."""


class UnknownRestorePoint(ReplicationError, UnknownPoint):
    """A restore target (txid, LSN, restore point name) the replica does not hold: a
    ``ReplicationError`` about the replica that is also an ``UnknownPoint``."""


class FileConflictError(WalstoreError):
    """Undoing file changes could not put every path back.  ``conflicts``: paths changed
    behind walstore's back (the stranger's version stays; walstore's is kept where each
    ``FileConflict.saved_as`` says); ``failed``: (path, error) of paths that could not be
    written (still owed: undone again at the next open)."""

    def __init__(self, message: str, conflicts: list | None = None,
                 failed: list | None = None) -> None:
        super().__init__(message)
        self.conflicts = list(conflicts or [])
        self.failed = list(failed or [])

    @property
    def paths(self) -> list[str]:
        return [c["path"] if isinstance(c, dict) else c.path for c in self.conflicts]
