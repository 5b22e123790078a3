"""Replication of a walstore store to S3-compatible object storage or ``file:///dir``.

Owns continuous shipping of the WAL and periodic LMDB snapshots (:class:`Shipper`), the
replica layout (manifest, lease, WAL objects, snapshots), restore to a point,
a read-only follower, and replica inspection.  docs/REPLICATION.md tells the whole story.

The core never imports this package; boto3 is imported only by
:mod:`walstore.replication.s3` (the ``walstore[s3]`` extra), and only for ``s3://`` URLs.
Walstore internals are imported only by :mod:`.source` and :mod:`.logformat`.
"""
from __future__ import annotations

from typing import Any

from .options import ReplicateOptions
from .restore import follow, replicas, restore
from .shipper import ReplicationStatus, Shipper
from .source import DirectorySource, InProcessSource, Source
from .targets import open_target

__all__ = ["ReplicateOptions", "ReplicationStatus", "Shipper", "Source", "DirectorySource",
           "InProcessSource", "open_target", "restore", "follow", "replicas",
           "start_in_process"]


def start_in_process(store, url: str, options: Any = None) -> Shipper:
    """A started shipper for an open writer Store (the ``replicate_to=`` of open)."""
    return Shipper(InProcessSource(store), url, options).start()
