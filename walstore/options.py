"""Tuning options of a store beyond ``open()``'s own arguments, validated at open.

Each option has a documented range; a value outside it raises ``ValueError`` naming the
option, the value and the range, before any file is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MIB = 1024 * 1024
RECOVERY_MODES = ("strict", "tolerate-tail", "point-in-time", "skip-corrupt")


@dataclass
class Options:
    """Tuning knobs; the defaults suit most agents.

    segment_size      largest WAL segment file, bytes (8 KiB .. 1 GiB; default 16 MiB)
    sync_interval     durability="normal": the most a power loss may lose, seconds (0.001 .. 60;
                      a background fdatasync starts every half interval)
    checkpoint_bytes  WAL bytes between automatic checkpoints (64 KiB .. 1 PiB; 64 MiB)
    apply_batch       unapplied log events that make the applier write LMDB while commits
                      go on (1 .. 10^9; 20,000); also caps its LMDB batches (at most 2000)
    apply_interval    seconds without a commit after which the applier writes LMDB
                      (0.001 .. 86400; 0.1): LMDB is written in pauses, off the commit tail
    max_unapplied     events waiting for LMDB before committers wait (100 .. 10^9; 50,000)
    max_unapplied_bytes  estimated memory of the events waiting for LMDB (their log bytes
                      plus a per-event and per-write overhead) before committers wait
                      (1 MiB .. 1 PiB; 64 MiB); the applier starts at half of it
    recovery_mode     strict | tolerate-tail | point-in-time | skip-corrupt
    retain_transactions  keep history of this many newest transactions (>= 1; None: all)
    retain_seconds    keep history this many seconds (> 0; None: all)
    """

    segment_size: int = 16 * MIB
    sync_interval: float = 0.2
    checkpoint_bytes: int = 64 * MIB
    apply_batch: int = 20_000
    apply_interval: float = 0.1
    max_unapplied: int = 50_000
    max_unapplied_bytes: int = 64 * MIB
    recovery_mode: str = "strict"
    retain_transactions: int | None = None
    retain_seconds: float | None = None

    def __post_init__(self) -> None:
        _int_range("segment_size", self.segment_size, 8 * 1024, 1024 * MIB)
        _num_range("sync_interval", self.sync_interval, 0.001, 60)
        _int_range("checkpoint_bytes", self.checkpoint_bytes, 64 * 1024, 1 << 50)
        _int_range("apply_batch", self.apply_batch, 1, 10 ** 9)
        _num_range("apply_interval", self.apply_interval, 0.001, 86400)
        _int_range("max_unapplied", self.max_unapplied, 100, 10 ** 9)
        _int_range("max_unapplied_bytes", self.max_unapplied_bytes, MIB, 1 << 50)
        if self.recovery_mode not in RECOVERY_MODES:
            raise ValueError(f"recovery_mode must be one of {', '.join(RECOVERY_MODES)}, "
                             f"not {self.recovery_mode!r}")
        if self.retain_transactions is not None:
            _int_range("retain_transactions", self.retain_transactions, 1, 1 << 62,
                       "or None to keep all")
        if self.retain_seconds is not None:
            _num_range("retain_seconds", self.retain_seconds, 1e-6, 1e12, "or None to keep all")

    @classmethod
    def from_keywords(cls, tuning: dict[str, Any]) -> "Options":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(tuning) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
        return cls(**tuning)


def check_flag(name: str, value: Any) -> bool:
    """``value`` when it is a bool; TypeError naming ``name`` otherwise (a flag taken by
    its truth: ``readonly="no"`` opened the store read-only)."""
    if value is not True and value is not False:
        raise TypeError(f"{name} must be True or False, not {value!r:.80}")
    return value


def _int_range(name: str, value: Any, lo: int, hi: int, extra: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"option {name}={value!r} is out of range: an integer from {lo:,} to "
                         f"{hi:,}{' ' + extra if extra else ''}")


def _num_range(name: str, value: Any, lo: float, hi: float, extra: str = "") -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not lo <= value <= hi):
        raise ValueError(f"option {name}={value!r} is out of range: a number from {lo} to "
                         f"{hi}{' ' + extra if extra else ''}")
