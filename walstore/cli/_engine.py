"""The command line's one door into walstore's internals.

Everything the CLI needs beyond the public API (``walstore.open``, ``Store`` methods, the
errors) is imported and wrapped here and nowhere else in :mod:`walstore.cli`, so moving
the engine modules means editing this file only.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator

from ..agent.actions import check_resolve_note, never_runs
from ..agent.files import FilesRecoveryReport
from ..agent.coordinator import coordinator_id as atomic_coordinator_id
from ..agent.twophase import check_gid
from ..codec import encode_key
from ..engine.lmdb_check import DATA_FILE, check_lmdb_data_file
from ..engine.layout import (FORMAT_NAME, MAX_IDENTITY_BYTES, READ_VERSIONS, Layout,
                              enclosing_store, store_path)
from ..errors import (CorruptionError, NotAStore, command_word,  # noqa: F401 (the CLI's
                      type_and_message)  # hints and messages use them)
from ..engine.recovery import MODES as RECOVERY_MODES
from ..ops.backup import backup as _backup
from ..ops.rebuild import rebuild_refusal, rebuild_state
from ..ops.inspect import DAMAGE as WAL_DAMAGE, iter_wal as _iter_wal
from ..ops.verify import (VerifyReport, owed_beside_writer, under_way_text,
                          verify_store as _verify_store)
from ..options import Options
from ..signals import Flag
from ..store import Store

__all__ = ["RECOVERY_MODES", "WAL_DAMAGE", "check_key", "check_store_path", "check_gid",
           "check_resolve_note",
           "identity_damaged", "rebuild_refusal", "rebuild_state", "open_for_recovery",
           "verify", "wal_records", "backup", "is_store", "enclosing_store", "store_stats", "iter_log", "lmdb_file", "prepared_details",
           "run_demo", "demo_side_dir", "benchmarks", "replication", "tracked_files",
           "changes_between", "while_writer_applies", "owed_beside_writer", "under_way_text", "Flag", "never_runs", "atomic_coordinator_id"]

Progress = Callable[[int, int], None] | None


def recovery_report_keys(mode: str) -> dict:
    """A recovery report's fields (``store.last_recovery.as_dict()``), as a store of
    reversible files gives them, each at its default: `recover --json`'s one shape."""
    return FilesRecoveryReport(mode=mode).as_dict()


def check_key(key: Any) -> None:
    """TypeError/ValueError naming the problem when walstore would refuse ``key``."""
    encode_key(key)


def check_store_path(path: Any) -> None:
    """ValueError naming the problem when no store can live at ``path`` (empty, a NUL,
    not valid UTF-8), as ``walstore.open`` would refuse it."""
    store_path(path)


def open_for_recovery(path: str, mode: str, compensators: dict | None,
                      progress: Progress) -> Store:
    """Open the existing store at ``path`` as its writer, recovering in ``mode``."""
    return Store(path, create=False, options=Options(recovery_mode=mode),
                 compensators=compensators, progress=progress)


def verify(path: str, progress: Progress, blob_progress: Progress = None,
           lmdb_progress: Progress = None, rows_progress: Progress = None) -> VerifyReport:
    return _verify_store(path, progress=progress, blob_progress=blob_progress,
                         lmdb_progress=lmdb_progress, rows_progress=rows_progress)


def wal_records(path: str, from_lsn: int) -> Iterator[dict]:
    return _iter_wal(path, from_lsn)


def backup(src: str, dest: str, progress: Progress = None) -> dict:
    return _backup(src, dest, progress)


def is_store(path: str) -> bool:
    return Layout(path).exists()


def identity_damaged(path: str, exc: BaseException) -> bool:
    """``exc`` (a NotAStore) because PATH's own STORE file is torn or unreadable, in a
    directory that holds a store's log or LMDB state: damage found (exit 1), not a path
    that names no store (exit 2).  A store of another format version is not damage."""
    layout = Layout(path)
    if not os.path.lexists(layout.identity) and layout.holds_store_data():
        return True  # (its STORE file lost: read_identity names the damage)
    if (os.path.lexists(layout.identity) and not os.path.isfile(layout.identity)
            and layout.holds_store_data()):
        return True  # (a FIFO or a directory in its place: read_identity names it)
    if not os.path.isfile(layout.identity) or not (
            os.path.isdir(layout.wal) or os.path.isdir(layout.db)):
        return False
    try:
        layout.read_identity()
    except NotAStore as again:
        if str(again) != str(exc):
            return False  # (another path's refusal: a backup DEST)
    except Exception:  # (damage of another kind: its own error says it)
        return False
    else:
        return False
    try:
        with open(layout.identity, "rb") as f:
            doc = json.loads(f.read(MAX_IDENTITY_BYTES))
    except (ValueError, OSError, RecursionError):
        return True
    return not (isinstance(doc, dict) and doc.get("format") == FORMAT_NAME
                and doc.get("version") not in READ_VERSIONS)


# what a read-only handle's ``stats()`` says of itself, not of the store: the durability
# it was opened with (each writer's open chooses its own; a reader's is never used), and
# the counters of its own WAL writer (a reader has none: always 0)
HANDLE_ONLY_STATS = ("durability", "wal_fsyncs", "wal_rotations", "wal_inline_preallocations",
                     "wal_small_segments", "wal_buffered_commits", "wal_voided_commits", "commits_held_by_undo",
                     "wal_synced_lsn")


def store_stats(store: Store, path: str, damage: list | None = None) -> dict[str, Any]:
    """``walstore stats``: the store's figures as a read-only handle can know them.  Its
    own ``stats()`` said ``durability full`` of a store its writer runs with "none", a map
    size of 64 GiB (the reader's own mapping) of one whose writer set 1 MiB, ``readonly
    true`` and 0 fsyncs of a store being written: those of the handle the command opened.
    Here the handle's own fields are null (unknown from outside the writer), the map size
    is the one the writer noted (``lmdb_state.MAP_SIZE``; before that note, the one
    recorded in ``data.mdb``), ``lmdb_bytes`` that file's size, and
    ``readonly`` says whether the command's handle is the store's writer (never).
    ``damage``: a damaged note (CorruptionError) is appended to it and the figures go on
    (it failed the command, no figure said, though ``verify`` goes on past it)."""
    doc = store.stats()
    for name in HANDLE_ONLY_STATS:
        doc[name] = None
    doc["readonly"] = None
    info = check_lmdb_data_file(os.path.join(Layout(path).db, DATA_FILE),
                                expect_existing=False)
    # (the writer's, as it noted it: data.mdb's own record is the largest map any writer
    # ever had — LMDB persists only increases — and a store written before the note, or
    # by a walstore that does not note it since, has only that one: ``noted_map_size``)
    try:
        noted = store.engine.state.noted_map_size()
    except CorruptionError as e:
        if damage is None:
            raise
        damage.append(e)
        noted = None
    doc["lmdb_map_size"] = noted or (None if info is None else info.map_size)
    doc["lmdb_bytes"] = None if info is None else info.file_size
    return doc


def iter_log(store: Store, limit: int | None) -> Iterator[Any]:
    """``store.log(limit)``, read as it is consumed (``walstore log`` streams it)."""
    store.engine.check_open()
    return store.txn_history.iter_log(limit)  # (``store.log`` holds them all: a list)


def lmdb_file(path: str) -> str:
    """The LMDB environment of the store at ``path`` (to name it in error messages)."""
    return Layout(path).db


def prepared_details(store: Store) -> list[dict[str, Any]]:
    """In-doubt two-phase transactions, sorted by gid: gid, txid, number of writes,
    prepare time, meta, and how many workspace paths it read and directories it listed
    (held until its decision: a change of them through walstore is refused meanwhile).
    One pass, summaries only (``Store.prepared_summaries``)."""
    return store.prepared_summaries()


def run_demo(path: str | None) -> int:
    from ..demo import run_demo as _run_demo
    return _run_demo(path)


def demo_side_dir(path: str) -> str:
    """The new directory beside PATH where the demo's agents keep their outside files."""
    from ..demo import side_dir
    return side_dir(path)


def benchmarks() -> tuple[Callable[..., dict], Callable[[dict], str]]:
    """(run_benchmarks, render_markdown); ImportError when the extras are missing."""
    from ..benchmark import render_markdown, run_benchmarks
    return run_benchmarks, render_markdown


def replication(*names: str) -> tuple:
    """Names from walstore.replication (imported only by the replication commands)."""
    from .. import replication as _replication
    from ..replication.restore import TimeText, check_apply_every
    from ..replication.targets import check_endpoint, check_url, display_url, one_shot_requests
    found = {"display_url": display_url, "check_url": check_url,
             "check_endpoint": check_endpoint, "check_apply_every": check_apply_every,
             "TimeText": TimeText, "one_shot_requests": one_shot_requests}
    return tuple(found[n] if n in found else getattr(_replication, n) for n in names)


# ---- reversible files (``walstore files``, ``walstore diff``) ----------------------------
def _boundary(store: Store, point: Any) -> int:
    """The boundary LSN of a point (None: the end of the log)."""
    eng = store.engine
    eng.drain()
    if point is None:
        return eng.memtable.published
    return int(store.at(point).lsn)  # (a view's boundary: the point resolved)


FILE_HISTORY_WAIT_S = 3.0  # how long `files`/`diff` wait for a live writer to apply


def _readable_file_history(store: Store, roots: list[bytes], *points: Any) -> list[int]:
    """The boundary LSNs of ``points`` (``_boundary``), read once the file history of
    every workspace in ``roots`` is readable (``check_file_history``: a read-only store
    whose log tail holds file records LMDB does not hold yet cannot read it).  Beside a
    live writer that is a moment's wait: it applies them when its commits pause, so the
    tail is read again (each ``_boundary`` refreshes it) for up to FILE_HISTORY_WAIT_S
    before the refusal stands; after a crash (no writer) it stands at once.  (Refused
    at once, `walstore files` and `walstore diff` failed in 1 run of 4 beside a writer
    committing a file change every 0.15 s on average, and in every run beside one
    committing without pause: probe-audit61.)"""
    def attempt() -> list[int]:
        bounds = [_boundary(store, p) for p in points]
        for root in roots:
            store.txn_history.check_file_history(
                store.reversible_files.registered(root, gone_ok=True))
        return bounds
    return while_writer_applies(store, attempt)


def while_writer_applies(store: Store, attempt: Callable[[], Any]) -> Any:
    """``attempt()``, called again (the log tail read again first) while it raises a
    read-only store's ReadOnlyError (file history the live writer has not applied yet:
    ``check_file_history``, ``check_file_commits_readable``) and a writer is alive, for
    up to FILE_HISTORY_WAIT_S; then (or with no writer: a crash) its error stands."""
    from ..engine.layout import writer_alive
    from ..errors import ReadOnlyError
    deadline, pause = None, 0.02
    while True:
        try:
            return attempt()
        except ReadOnlyError as e:
            if type(e) is not ReadOnlyError or not store.readonly:
                raise  # (CommitOutcomeUnknown and the like: no wait helps)
            now = time.monotonic()
            deadline = now + FILE_HISTORY_WAIT_S if deadline is None else deadline
            if now >= deadline or not writer_alive(Layout(store.path)):
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
            store.refresh()


def tracked_files(store: Store, workspace: str | None, point: Any) -> list[dict[str, Any]]:
    """Per workspace (or the one named): its registration and every path walstore changed
    (retained), with its state at ``point`` (None: now, per the log) and its versions up
    to then.  ValueError for a directory that is not a registered workspace.  A
    workspace's ``files``, and a path's ``versions``, are iterators read as they are
    consumed (held whole, 2,000 versions took 9 MB and any number could be asked for):
    consume them in order while ``store`` is open."""
    from ..agent.filehistory import describe
    files, fh = store.reversible_files, store.txn_history.file_history
    roots = sorted(files.rows())
    if workspace is not None:
        roots = [files.resolve_ws(workspace, register=False, gone_ok=True).root_b]
    boundary, = _readable_file_history(store, roots, point)

    def versions(root: bytes, rel: bytes) -> Iterator[dict[str, Any]]:
        for v in fh.iter_versions(root, rel):
            if v.lsn <= boundary:
                yield {"txid": v.txid, "lsn": int(v.lsn), "before": describe(v.before),
                       "after": describe(v.after)}

    def paths(root: bytes) -> Iterator[dict[str, Any]]:
        for rel in fh.tracked(root):
            yield {"path": os.fsdecode(rel), "entry": describe(fh.entry_at(root, rel, boundary)),
                   "versions": versions(root, rel)}
    out = []
    for root in roots:
        ws = files.registered(root, gone_ok=True)  # (its root may be gone: a copy's)
        out.append({"root": ws.root, "scope": ws.scope,
                    "ignore": [os.fsdecode(x) for x in ws.ignore.sources],
                    "files": paths(root)})
    return out


def changes_between(store: Store, start: Any, end: Any) -> dict[str, Any]:
    """Keys and files whose state differs between two points (``end`` None: now):
    [{key, before, after}] and [{path, kind, before, after}] (before/after: None when
    absent), from the transactions committed in between.  ``before`` is the state at
    ``start`` and ``after`` at ``end``, in whichever order the two points come (a later
    ``start``: what going back to ``end`` would change).  ``keys`` is an iterator, in key
    order, whose values are read as it is consumed (only the changed keys' names are
    held: every key's two values held at once made a diff of 400 values of 100 KB peak at
    170 MB); consume it while ``store`` is open."""
    from ..agent.filehistory import describe
    from ..agent.history import hide_purged
    from ..codec import decode_key, unpack_value
    from ..files import Change
    eng = store.engine
    # (read-only: the log's tail not applied yet, files unknown; a root gone is read too)
    first, second = _readable_file_history(store, sorted(store.reversible_files.rows()),
                                           start, end)
    lo, hi = min(first, second), max(first, second)
    keys: set[bytes] = set()
    paths: set[tuple[bytes, bytes]] = set()
    fh = store.txn_history.file_history
    # a purge LMDB does not hold yet (a read-only open after its writer was killed before
    # applying it): the keys it erased are absent at every point before it, and their
    # names are in no row (the diff printed their past values)
    purges = store.txn_history.unapplied_purges()

    def value(k: bytes, boundary: int) -> bytes | None:
        if any(p > boundary and plo <= k and (phi is None or k < phi)
               for p, plo, phi in purges):
            return None
        return eng.reader.as_of(k, boundary + 1)

    # oldest first, stopping past ``hi``: what is read grows with the commits between the
    # two points, not with those logged since (newest first read them all, skipped)
    for row in eng.views.commits_after(lo, oldest_first=True):
        if row["lsn"] > hi:
            break
        keys.update(w[0] for w in hide_purged(row, purges).get("w", []))
        paths.update(fh.changes_of(row["tx"]))
    def key_docs() -> Iterator[dict[str, Any]]:
        for k in sorted(keys):
            a, b = value(k, first), value(k, second)
            if a != b:
                yield {"key": decode_key(k),
                       "before": None if a is None else unpack_value(a),
                       "after": None if b is None else unpack_value(b),
                       "existed": a is not None, "exists": b is not None}
    file_docs = []
    for root, rel in sorted(paths):
        a, b = fh.entry_at(root, rel, first), fh.entry_at(root, rel, second)
        if a is None or b is None or a.same(b):
            continue
        file_docs.append({"path": os.fsdecode(root + b"/" + rel),
                          "kind": Change.of(rel, a, b).kind,
                          "before": describe(a), "after": describe(b)})
    return {"from_lsn": first, "to_lsn": second, "keys": key_docs(), "files": file_docs}
