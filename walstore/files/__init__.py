"""Reversible files, the engine-free half: the library the engine calls (docs/FILES.md).

- ``paths``:   Workspace (root, ignore patterns), safe relative paths, the temp prefix
- ``ignore``:  the gitignore matcher
- ``entries``: Entry (absent | file | dir | symlink), reading one path, streaming content
- ``blobs``:   BlobStore (content by sha256: streamed, durable, deduplicated, reflinked)
- ``plan``:    what an operation will do to each path, before-images stored first
- ``apply``:   crash-safe primitives that make a path become an Entry; restore; conflicts
- ``watch``:   Manifest snapshots (incremental, racy-safe), diff, undo order
- ``monitor``: a workspace's inotify change monitor (what a snapshot must look at)

Nothing here logs to the WAL or knows about transactions: the engine logs the records
(before-images, watch manifests, conflicts) and calls these functions in order.
"""
from __future__ import annotations

from .apply import (Applied, FileConflict, RestoreStatus, delete, ensure_parents, make_dir,
                    make_symlink, remove_stray_temps, rename, restore, restore_status,
                    rmtree, set_mode, write_blob, write_file)
from .blobs import BlobStore, GcResult, PutResult
from .entries import Entry, FileBusyError, UnsupportedFileType, read_entry
from .ignore import IgnoreRules
from .paths import TEMP_PREFIX, Workspace
from .plan import (capture, plan_delete, plan_mkdir, plan_mode, plan_rename, plan_rmtree,
                   plan_symlink, plan_write, undo_steps)
from .watch import Change, Manifest, diff, restore_changes, snapshot, undo_order, walk

__all__ = ["Applied", "BlobStore", "Change", "Entry", "FileBusyError", "FileConflict",
           "GcResult", "IgnoreRules", "Manifest", "PutResult", "RestoreStatus", "TEMP_PREFIX",
           "UnsupportedFileType", "Workspace", "capture", "delete", "diff", "ensure_parents",
           "make_dir", "make_symlink", "plan_delete", "plan_mkdir", "plan_mode",
           "plan_rename", "plan_rmtree", "plan_symlink", "plan_write", "read_entry",
           "remove_stray_temps", "rename", "restore", "restore_changes", "restore_status",
           "rmtree", "set_mode", "snapshot", "undo_order", "undo_steps", "walk",
           "write_blob", "write_file"]
