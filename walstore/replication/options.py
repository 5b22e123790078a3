"""Replication options (``replicate_options=`` / CLI flags), with their defaults.

Owns the names and defaults only; each is documented in docs/REPLICATION.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
DAY = 24 * 3600.0  # the longest wait between rounds: beyond it a wait overflowed (1e300,
#                    inf: the shipper thread died of OverflowError while state said running)


_ADDRESSING = ("auto", "virtual", "path")  # botocore's S3 addressing styles
_REGION = re.compile(r"(?![0-9]+$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # botocore's


@dataclass
class ReplicateOptions:
    # where
    endpoint_url: str | None = None     # S3-compatible endpoint; else AWS_ENDPOINT_URL, else AWS
    region: str | None = None
    addressing_style: str = "auto"      # "path" for servers without virtual-host buckets
    # shipping
    interval: float = 1.0               # seconds between shipping rounds (the RPO bound)
    max_object_bytes: int = 64 * MiB    # bound of one WAL object
    compact_fanout: int = 32            # this many adjacent objects of a level merge into one
    max_pin_bytes: int = 1 * GiB        # WAL the trim pin may hold back before giving up
    # snapshots and retention
    snapshot_interval: float = 3600.0   # seconds between LMDB snapshots (if anything changed)
    snapshot_wal_bytes: int = 256 * MiB  # or after this much WAL shipped since the last one
    retention_seconds: float = 24 * 3600.0  # keep snapshots (and the WAL they need) this long
    retain_snapshots: int = 2           # ... and always at least this many
    delete_grace: float = 600.0         # objects a manifest dropped are deleted this late
    complete_every: float = 60.0        # an idle shipper writes the manifest's complete_to
                                        # this often (one PUT each; see docs/REPLICATION.md)
    # lease
    lease_ttl: float = 600.0            # a lease not renewed this long may be taken over
    # requests
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3               # per request (the client's retries, with jitter)
    max_backoff: float = 30.0           # between failed shipping rounds
    blob_uploads: int = 8               # blobs uploaded at once (each its own request)
    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB
    max_manifest_bytes: int = 64 * MiB
    extra: dict = field(default_factory=dict)

    def _check_types(self) -> None:
        """Each option of the type its default has (a number, not a bool or a str: an
        ``interval="x"`` failed later as "'<=' not supported", naming no option)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra":
                ok = isinstance(v, dict)
                want = "a dict"
            elif f.type in ("float", "int"):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and (f.type == "float" or isinstance(v, int))
                want = "a number" if f.type == "float" else "an int"
            else:  # str or None
                ok = v is None and "None" in f.type or isinstance(v, str)
                want = "a str"
            if not ok:
                raise TypeError(f"replicate_options {f.name} must be {want}, not "
                                f"{type(v).__name__} ({v!r})")

    @classmethod
    def from_any(cls, value: Any = None, **overrides: Any) -> "ReplicateOptions":
        if isinstance(value, ReplicateOptions):
            opts = dataclasses.replace(value)
        else:
            known = {f.name for f in dataclasses.fields(cls)}
            if value is not None and not isinstance(value, Mapping):
                # (``dict([1])`` said "cannot convert dictionary update sequence element
                # #0 to a sequence", naming neither the argument nor what it takes)
                raise TypeError(f"replicate_options must be a dict of option names to "
                                f"values (or None), not {type(value).__name__}")
            given = dict(value or {})
            unknown = sorted(set(given) - known)
            if unknown:
                raise ValueError(f"unknown replicate_options: {', '.join(unknown)}")
            opts = cls(**given)
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        if not isinstance(value, ReplicateOptions) and "lease_ttl" not in (value or {}) \
                and overrides.get("lease_ttl") is None:
            # a lease_ttl not given follows a long interval: three rounds (see check_lease;
            # a bad interval is refused below, named as such)
            iv = opts.interval
            if isinstance(iv, (int, float)) and not isinstance(iv, bool) \
                    and 0 < iv <= DAY and opts.lease_ttl < 3 * iv:
                opts.lease_ttl = 3.0 * iv
        if opts.endpoint_url is None:
            opts.endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or \
                os.environ.get("AWS_ENDPOINT_URL") or None
        opts._check_types()
        for f in dataclasses.fields(opts):  # (an int no float holds: lease_ttl=10**400 made
            v = getattr(opts, f.name)       # every round fail with OverflowError, nothing
            if f.type == "float" and isinstance(v, int):  # shipped; delete_grace and
                try:                                      # retention likewise, later)
                    float(v)
                except OverflowError:
                    raise ValueError(f"replicate_options {f.name} must be a number of "
                                     f"seconds a float holds, not an int of {len(str(v))} "
                                     f"digits") from None
        for f in dataclasses.fields(opts):  # (NaN passes every comparison below: `interval
            v = getattr(opts, f.name)        # nan` shipped in a busy loop)
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"replicate_options {f.name} must be a number, not NaN")
        for name, low in (("interval", "above 0"), ("max_backoff", "from 0")):
            v = getattr(opts, name)
            if not (0 < v if name == "interval" else 0 <= v) or v > DAY:
                raise ValueError(f"replicate_options {name} must be a number of seconds {low} "
                                 f"and at most {DAY:g} (a day), not {v!r}")
        for name, what in (("snapshot_interval", "between snapshots"),
                           ("complete_every", "between idle manifest writes"),
                           ("retention_seconds", "snapshots are kept")):
            if getattr(opts, name) < 0:
                raise ValueError(f"replicate_options {name} must be a number of seconds "
                                 f"{what}, 0 or more, not {getattr(opts, name)!r}")
        if opts.region is not None and not _REGION.fullmatch(opts.region):
            raise ValueError(f"replicate_options region must be a region name (letters, "
                             f"digits and '-', e.g. us-east-1), not {opts.region!r}")
        if opts.lease_ttl <= 0 or opts.max_attempts < 1:
            raise ValueError("lease_ttl must be positive and max_attempts >= 1")
        if not 1 <= opts.blob_uploads <= 64:
            raise ValueError(f"replicate_options blob_uploads must be 1 to 64 (blobs "
                             f"uploaded at once), not {opts.blob_uploads!r}")
        # Each was accepted and failed later, or never: botocore's own exception escaping
        # open() for an addressing style, a timeout refused only when an S3 client was
        # built, every round failing on a negative threshold or a bound of 0 bytes.
        if opts.addressing_style not in _ADDRESSING:
            raise ValueError(f"replicate_options addressing_style must be one of "
                             f"{', '.join(_ADDRESSING)}, not {opts.addressing_style!r}")
        for name in ("connect_timeout", "read_timeout"):
            v = getattr(opts, name)
            if not 0 < v <= DAY:
                raise ValueError(f"replicate_options {name} must be a number of seconds "
                                 f"above 0 and at most {DAY:g} (a day), not {v!r}")
        for name, low in (("max_object_bytes", 1), ("max_manifest_bytes", 1),
                          ("multipart_threshold", 0), ("max_pin_bytes", 0),
                          ("snapshot_wal_bytes", 0), ("delete_grace", 0)):
            if getattr(opts, name) < low:
                raise ValueError(f"replicate_options {name} must be {low} or more, not "
                                 f"{getattr(opts, name)!r}")
        if opts.compact_fanout < 2 or opts.retain_snapshots < 1:
            raise ValueError("compact_fanout must be >= 2 and retain_snapshots >= 1")
        if opts.part_size < 5 * MiB:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part)")
        return opts

    def check_lease(self) -> None:
        """For a shipper: ``lease_ttl`` at least 3 times ``interval``.  The lease is renewed
        by the shipping rounds, every ``lease_ttl / 3`` when rounds come that often; rounds
        further apart renew it once a round, and with ``lease_ttl`` below ``interval`` it
        lapsed between every two rounds: another writer (a second shipper of the store, a
        copy of it) could take the replica over, and this one stopped for good,
        "lease-lost".  (A restore or a follower takes no lease: not checked there.)"""
        if self.lease_ttl < 3 * self.interval * (1 - 1e-9):  # (0.6 vs 3 * 0.2: a float's slack)
            raise ValueError(f"replicate_options lease_ttl ({self.lease_ttl:g} s) must be at "
                             f"least 3 times interval ({self.interval:g} s): the shipping "
                             f"rounds renew the lease, and with rounds further apart than "
                             f"lease_ttl / 3 it lapses between them (another writer may take "
                             f"the replica over); raise lease_ttl or lower interval")
