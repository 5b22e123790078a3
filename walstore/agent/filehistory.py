"""The past of files: what committed transactions did to workspace paths, read back.

Reads the ``fversions`` and ``fchanges`` tables (:mod:`walstore.engine.tables`), which the
applier fills at each COMMIT with file effects: per path and commit, the path's first
before-image and last after-image in that transaction.  From them:

- ``entry_at(ws, path, B)``: the state of a path as of a boundary LSN B — the after-image
  of its newest version at or before B; else the before-image of its oldest version after
  B; else (walstore never changed it) the path as it is now;
- ``store.at(point).files(ws)`` (``HistoricalFiles``): ``read``, ``stream`` (1 MiB chunks,
  whichever way the content is read), ``entry``, ``exists``;
  content comes from the blob store (a path absent then: FileNotFoundError);
- ``versions`` / ``tracked``: for ``walstore files``; ``changes_of(txid)`` and
  ``later_writers``: for ``revert`` / ``rewind`` / ``diff``.

Costs grow with what is asked (index lookups per path and per transaction), never with
the age of the store.  Every reader drains first (the tables are LMDB's).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import CorruptionError, HistoryTrimmed, os_errors_as_store_errors, \
    os_errors_wrapped
from ..engine import tables
from ..files import Entry, Workspace, read_entry
from ..files.apply import pin_dir, open_to_read
from ..files.entries import ABSENT, DIR, UnsupportedFileType, iter_content
from ..files.paths import PathLike, display, parent_of
from ..log.format import LSN

if TYPE_CHECKING:
    from .files import Files


@dataclass(frozen=True)
class FileVersion:
    """What committed transaction ``txid`` (commit at ``lsn``) did to one path."""

    txid: int
    lsn: int
    before: Entry
    after: Entry


class FileHistory:
    def __init__(self, files: "Files") -> None:
        self.files = files
        self.engine = files.engine

    @property
    def _st(self):
        return self.engine.state

    def _ready(self) -> bool:
        return self._st.fversions is not None

    # ---- one path -------------------------------------------------------------------
    def versions(self, ws_root: bytes, path: bytes) -> list[FileVersion]:
        """Every retained version of a path, newest first."""
        return list(self.iter_versions(ws_root, path))

    def iter_versions(self, ws_root: bytes, path: bytes) -> Iterator[FileVersion]:
        """``versions``, read as they are consumed (``walstore files``: a path with any
        number of versions in bounded memory)."""
        if not self._ready():
            return
        st = self._st
        prefix = tables.fpath_prefix(ws_root, path)
        # (as a key's history: versions at or after the horizon and the newest below it,
        # what a finished trim keeps, not the rows a trim cut short left behind it)
        horizon = st.meta_int(b"horizon")
        for raw, v in st.scan(prefix, prefix + b"\xff" * 9, reverse=True, db="fversions"):
            if not tables.is_fversion_of(raw, prefix):
                continue
            txid, before, after = tables.unpack_row(v, "fversions", raw, st.data_file)
            lsn = tables.split_fversion_key(raw)[2]
            yield FileVersion(txid, LSN(lsn), Entry.from_row(before), Entry.from_row(after))
            if lsn < horizon:
                return

    def version(self, ws_root: bytes, path: bytes, lsn: int) -> FileVersion | None:
        key = tables.fversion_key(ws_root, path, lsn)
        raw = self._st.get(key, "fversions") if self._ready() else None
        if raw is None:
            return None
        txid, before, after = tables.unpack_row(raw, "fversions", key, self._st.data_file)
        return FileVersion(txid, LSN(lsn), Entry.from_row(before), Entry.from_row(after))

    def entry_at(self, ws_root: bytes, path: bytes, boundary: int) -> Entry | None:
        """The state of ``path`` as of ``boundary`` (None: never changed by walstore)."""
        if not self._ready():
            return None
        st = self._st
        prefix = tables.fpath_prefix(ws_root, path)
        for raw, v in st.scan(prefix, tables.fversion_key(ws_root, path, boundary + 1),
                              reverse=True, db="fversions"):
            if tables.is_fversion_of(raw, prefix):
                return Entry.from_row(tables.unpack_row(v, "fversions", raw, st.data_file)[2])
        for raw, v in st.scan(tables.fversion_key(ws_root, path, boundary + 1),
                              prefix + b"\xff" * 9, db="fversions"):
            if tables.is_fversion_of(raw, prefix):
                return Entry.from_row(tables.unpack_row(v, "fversions", raw, st.data_file)[1])
        return None

    def tracked(self, ws_root: bytes) -> Iterator[bytes]:
        """The paths of a workspace with retained versions, in byte order."""
        if not self._ready():
            return
        st = self._st
        prefix = tables.fws_prefix(ws_root)
        last = None
        for raw, _v in st.scan(prefix, prefix + b"\xff" * 3, db="fversions"):
            ws, path, _lsn = tables.split_fversion_key(raw)
            if ws != ws_root or path == last:
                continue
            last = path
            yield path

    # ---- transactions ---------------------------------------------------------------
    def changes_of(self, txid: int) -> list[tuple[bytes, bytes]]:
        """(workspace root, path) of every path committed transaction ``txid`` changed."""
        if not self._ready():
            return []
        st = self._st
        prefix = tables.fsteps_prefix(txid)
        return [tables.split_fchange_key(raw)[1:]
                for raw, _v in st.scan(prefix, prefix + b"\xff" * 8, db="fchanges")]

    def began(self, txid: int, ws_root: bytes, path: bytes) -> int | None:
        """When committed transaction ``txid``'s first change of ``path`` began (ns; None:
        not kept, a commit applied before it was)."""
        if not self._ready():
            return None
        raw = self._st.get(tables.fchange_key(txid, ws_root, path), "fchanges")
        return int.from_bytes(raw, "big") if raw is not None and len(raw) == 8 else None

    def later_writers(self, txid: int, lsn: int,
                      in_scope: Callable[[bytes], bool] = lambda _root: True) -> set[int]:
        """Transactions committed after ``lsn`` that changed a path ``txid`` changed (in
        a workspace ``in_scope``), or a path under a directory it created: undoing the
        creation removes the directory, which takes their paths with it (a revert of the
        transaction that made ``d/`` for ``d/a`` failed half way once a later one had
        written ``d/b``, and its dry run said it would go)."""
        out = set()
        st = self._st
        created: dict[bytes, list[bytes]] = {}
        for ws, path in self.changes_of(txid):
            if not in_scope(ws):
                continue
            prefix = tables.fpath_prefix(ws, path)
            for raw, v in st.scan(tables.fversion_key(ws, path, lsn + 1),
                                  prefix + b"\xff" * 9, db="fversions"):
                if tables.is_fversion_of(raw, prefix):
                    other = tables.unpack_row(v, "fversions", raw, st.data_file)[0]
                    if other != txid:
                        out.add(other)
            mine = self.version(ws, path, lsn)
            if mine is not None and mine.before.kind == ABSENT and mine.after.kind == DIR:
                created.setdefault(ws, []).append(path + b"/")
        for ws, dirs in created.items():  # (the workspace's retained versions, once)
            prefix = tables.fws_prefix(ws)
            for raw, v in st.scan(prefix, prefix + b"\xff" * 3, db="fversions"):
                _ws, path, at = tables.split_fversion_key(raw)
                if at > lsn and path.startswith(tuple(dirs)):
                    other = tables.unpack_row(v, "fversions", raw, st.data_file)[0]
                    if other != txid:
                        out.add(other)
        return out

    def read_content(self, entry: Entry, what: str) -> bytes:
        try:
            return self.files.blobs.read_bytes(entry.sha256 or "", limit=1 << 62)
        except FileNotFoundError:
            raise CorruptionError(f"the stored content of {what} (sha256:{entry.sha256}) is "
                                  f"missing from the content store",
                                  file=self.files.blobs.path(entry.sha256 or "0" * 64)) from None


class HistoricalFiles:
    """``store.at(point).files(ws)``: a workspace's files as they were at the point."""

    def __init__(self, history: FileHistory, ws: Workspace, boundary: int) -> None:
        self._history = history
        self.workspace = ws
        self.lsn = LSN(boundary)

    def __repr__(self) -> str:
        return f"<HistoricalFiles {self.workspace.root!r} at LSN {int(self.lsn)}>"

    def _check_retained(self) -> None:
        """HistoryTrimmed when retention moved the horizon past the point (the view may
        be kept while a checkpoint trims): asked after each answer is read, so what was
        read from a trim half done (a path's versions gone: read as absent; its content
        gc'd: read as damage) is never given out."""
        horizon = self._history._st.meta_int(b"horizon")
        if self.lsn < horizon:
            raise HistoryTrimmed(f"the history of LSN {int(self.lsn)} was trimmed while this "
                                 f"view of workspace {self.workspace.root!r} was in use "
                                 f"(retention); it is older than the retained history now "
                                 f"(horizon LSN {horizon})")

    def _retained(self, call: Callable[[], Any]) -> Any:
        try:
            out = call()
        except Exception as e:
            self._check_retained_from(e)
            raise
        self._check_retained()
        return out

    def _check_retained_from(self, e: Exception) -> None:
        """HistoryTrimmed (from ``e``) when the point was trimmed; else ``e`` stands (its
        caller raises it), also when the horizon cannot be read."""
        try:
            self._check_retained()
        except HistoryTrimmed as trimmed:
            raise trimmed from e
        except Exception:
            return

    @os_errors_wrapped
    def entry(self, path: PathLike) -> Entry:
        """What ``path`` was at the point (``Entry``: absent, file, dir or symlink)."""
        return self._retained(lambda: self._entry(path))

    def _entry(self, path: PathLike) -> Entry:
        ws = self.workspace
        rel = ws.rel(path)
        got = self._history.entry_at(ws.root_b, rel, self.lsn)
        if got is not None:
            return got
        got = self._uncommitted(rel)
        if got is not None:
            return got
        return self._as_now(rel, hash=True)

    def _uncommitted(self, rel: bytes) -> Entry | None:
        """A path with no committed version that a transaction which has not ended
        changed in place: its before-image (the path as every committed point had it)."""
        return self._history.files.uncommitted_before(self.workspace.root_b, rel)

    def _as_now(self, rel: bytes, hash: bool) -> Entry:
        """A path walstore never changed: as it is now.  Under a parent that is a file or
        a symlink it is absent (walstore never goes through either), not an error: at(p)
        of a path whose parent a later commit made a symlink said ValueError."""
        ws = self.workspace
        try:
            ws.check_parents(rel)
            # looked up in its parent pinned from the root: by its absolute path, a parent
            # swapped for a symlink to outside since the check described (hashed) a file
            # outside the root; under that symlink the path is absent, as above
            pin = pin_dir(ws, parent_of(rel))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return Entry.absent()
        try:
            return read_entry(ws.abspath(rel) if pin is None
                              else pin.path + b"/" + rel.rpartition(b"/")[2], hash=hash)
        except UnsupportedFileType:  # (named by its path, not the pinned one)
            raise UnsupportedFileType(f"{os.fsdecode(ws.abspath(rel))!r} is a special file "
                                      f"(FIFO, socket or device); walstore tracks files, "
                                      f"directories and symlinks") from None
        finally:
            if pin is not None:
                pin.close()

    def _check_way(self, rel: bytes, where: str) -> None:
        """ValueError when a directory on the way to ``rel`` was a symlink at the point,
        as the live read says (walstore never follows a symlink on the way to a path); it
        said "did not exist" for a path through a symlink leading outside the root."""
        parts = rel.split(b"/")[:-1]
        for i in range(1, len(parts) + 1):
            up = b"/".join(parts[:i])
            e = self._history.entry_at(self.workspace.root_b, up, self.lsn)
            if e is None:
                e = self._uncommitted(up)
            if e is None:
                e = self._as_now(up, hash=False)
            if e.is_symlink:
                raise ValueError(f"{where}: {display(up)!r} was a symlink (to "
                                 f"{os.fsdecode(e.target or b'')!r}); walstore never "
                                 f"follows a symlink on the way to a path")
            if not e.is_dir:
                return

    @os_errors_wrapped
    def exists(self, path: PathLike) -> bool:
        return self.entry(path).exists

    @os_errors_wrapped
    def read(self, path: PathLike) -> bytes:
        """The content ``path`` had at the point (bytes).  FileNotFoundError when it was
        absent, IsADirectoryError when it was a directory, ValueError when it was a
        symlink (never followed: ``entry(path).target`` is its target) or a directory on
        the way to it was.  A path walstore never changed is read as it is now.
        HistoryTrimmed when retention trimmed the point while this view was kept."""
        return self._retained(lambda: self._read(path))

    def _read(self, path: PathLike) -> bytes:
        e, live, where, abs_path = self._located(path)
        if live:
            # (O_NONBLOCK and the fstat: a FIFO swapped in since the look above is
            # refused, as the look refuses one, rather than block the reader forever)
            with os.fdopen(self._open_live(self.workspace, abs_path, where), "rb") as f:
                return f.read()
        return self._history.read_content(e, where)

    def _located(self, path: PathLike) -> tuple[Entry, bool, str, bytes]:
        """(the file ``path`` was at the point, read live?, how to name it, its absolute
        path): its newest committed version at or before the point; else, changed only by
        a transaction that has not ended, its before-image; else (``live``) as it is now.
        The errors ``read`` names when it was no file then."""
        ws = self.workspace
        rel = ws.rel(path)
        e = self._history.entry_at(ws.root_b, rel, self.lsn)
        if e is None:
            e = self._uncommitted(rel)
        live = e is None  # walstore never changed it: as it is now
        if live:
            e = self._as_now(rel, hash=False)
        where = f"{display(rel)!r} in workspace {ws.root!r} at LSN {int(self.lsn)}"
        abs_path = ws.abspath(rel)
        if not e.exists:
            self._check_way(rel, where)
            raise FileNotFoundError(errno.ENOENT, f"{where} did not exist",
                                    os.fsdecode(abs_path))
        if e.is_dir:
            raise IsADirectoryError(errno.EISDIR, f"{where} was a directory",
                                    os.fsdecode(abs_path))
        if e.is_symlink:
            raise ValueError(f"{where} was a symlink to {os.fsdecode(e.target or b'')!r}; "
                             f"walstore does not follow it")
        return e, live, where, abs_path

    @staticmethod
    def _open_live(ws: Workspace, abs_path: bytes, where: str) -> int:
        """A descriptor of the file at ``abs_path`` now (a special file: refused), opened
        in its parent pinned from the root (a parent swapped for a symlink to outside the
        root since the checks: WorkspaceChanged, never the outside file)."""
        fd = open_to_read(ws, abs_path[len(ws.root_b) + 1:])  # (ws.abspath's rel)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsupportedFileType(f"{where} is a special file (FIFO, socket or "
                                          f"device); walstore tracks files, "
                                          f"directories and symlinks")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def stream(self, path: PathLike) -> Iterator[bytes]:
        """The content ``path`` had at the point, in chunks of at most 1 MiB (for large
        files; stored content is verified against its sha256 as it is read).  Errors as
        ``read``.  Every case streams: a path walstore never changed is read from the
        file as it is now, one only a transaction that has not ended changed from its
        before-image (both fell back to ``read``, which holds the whole file: 64 MiB
        streamed cost 64 MiB of memory); content missing from the store is a
        CorruptionError, as ``read`` says (it escaped as a bare FileNotFoundError)."""
        with os_errors_as_store_errors():
            e, live, where, abs_path = self._retained(lambda: self._located(path))
            if live:
                fd = self._open_live(self.workspace, abs_path, where)
                try:
                    for _off, chunk, _hole in iter_content(fd):
                        yield bytes(chunk)
                finally:
                    os.close(fd)
                return
            try:
                for chunk in self._history.files.blobs.get(e.sha256 or ""):
                    self._check_retained()  # (its content gc'd meanwhile: trimmed, not damage)
                    yield chunk
            except Exception as err:
                self._check_retained_from(err)
                if isinstance(err, FileNotFoundError):
                    raise CorruptionError(
                        f"the stored content of {where} (sha256:{e.sha256}) is missing "
                        f"from the content store",
                        file=self._history.files.blobs.path(e.sha256 or "0" * 64)) from None
                raise
            self._check_retained()

    def symlink_target(self, path: PathLike) -> bytes | None:
        e = self.entry(path)
        return e.target if e.is_symlink else None


def describe(e: Entry | None) -> dict[str, Any] | None:
    """An Entry as plain data (for --json)."""
    if e is None:
        return None
    d: dict[str, Any] = {"kind": e.kind}
    if e.is_file:
        d.update(mode=oct(e.mode), size=e.size, sha256=e.sha256)
    elif e.is_dir:
        d.update(mode=oct(e.mode))
    elif e.is_symlink:
        d.update(target=os.fsdecode(e.target or b""))
    return d
