"""The command line's one door into walstore's internals.

Everything the CLI needs beyond the public API (``walstore.open``, ``Store`` methods, the
errors) is imported and wrapped here and nowhere else in :mod:`walstore.cli`, so moving
the engine modules means editing this file only.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from ..engine.layout import Layout
from ..engine.recovery import MODES as RECOVERY_MODES
from ..ops.backup import backup as _backup
from ..ops.inspect import iter_wal as _iter_wal
from ..ops.verify import VerifyReport, verify_store as _verify_store
from ..options import Options
from ..store import Store

__all__ = ["RECOVERY_MODES", "open_for_recovery", "verify", "wal_records", "backup",
           "is_store", "lmdb_file", "prepared_details", "run_demo", "benchmarks",
           "replication"]

Progress = Callable[[int, int], None] | None


def open_for_recovery(path: str, mode: str, compensators: dict | None,
                      progress: Progress) -> Store:
    """Open the existing store at ``path`` as its writer, recovering in ``mode``."""
    return Store(path, create=False, options=Options(recovery_mode=mode),
                 compensators=compensators, progress=progress)


def verify(path: str, progress: Progress) -> VerifyReport:
    return _verify_store(path, progress=progress)


def wal_records(path: str, from_lsn: int) -> Iterator[dict]:
    return _iter_wal(path, from_lsn)


def backup(src: str, dest: str) -> dict:
    return _backup(src, dest)


def is_store(path: str) -> bool:
    return Layout(path).exists()


def lmdb_file(path: str) -> str:
    """The LMDB environment of the store at ``path`` (to name it in error messages)."""
    return Layout(path).db


def prepared_details(store: Store) -> list[dict[str, Any]]:
    """In-doubt two-phase transactions: gid, txid, number of writes, prepare time, meta."""
    out = []
    for gid in store.prepared():
        p = store.prepared_details(gid)
        out.append({"gid": gid, "txid": p.txid, "keys": len(p.writes), "ts": p.ts,
                    "meta": p.meta})
    return out


def run_demo(path: str | None) -> int:
    from ..demo import run_demo as _run_demo
    return _run_demo(path)


def benchmarks() -> tuple[Callable[..., dict], Callable[[dict], str]]:
    """(run_benchmarks, render_markdown); ImportError when the extras are missing."""
    from ..benchmark import render_markdown, run_benchmarks
    return run_benchmarks, render_markdown


def replication(*names: str) -> tuple:
    """Names from walstore.replication (imported only by the replication commands)."""
    from .. import replication as _replication
    from ..replication.targets import display_url
    found = {"display_url": display_url}
    return tuple(found[n] if n in found else getattr(_replication, n) for n in names)
