"""The LangGraph integration's key schema: where every byte it stores lives.

This module owns the layout of the walstore keys of :class:`WalstoreSaver` (checkpoints,
channel blobs, pending writes, run index) and of :class:`WalstoreStore` (long-term memory
items and their expiry index), and the parsing back of those keys.  Nothing else in the
package builds a key by hand.

**One thread = one key prefix.**  Every key of one LangGraph thread, whatever its
checkpoint namespace (subgraphs included), starts with the thread's prefix::

    P = <key_prefix> 00 <thread part>                       the thread prefix

    P c <ns part> <checkpoint_id>                  -> checkpoint record
    P b <ns part> <channel part> <version part>    -> a channel value (absent: empty)
    P w <ns part> <checkpoint_id> 00 <task part> <msgpack idx>  -> one pending write
    P r <run part> <ns part> <checkpoint_id>       -> b"" (run index, for delete_for_runs)
    P l <ns part> <run token part>                 -> never a value: a run's fence
    P s                                            -> the LSN a run of the thread began
                                                      at while it had no checkpoint

so ``store.rewind(to, scope=P)`` and ``store.purge(P)`` address exactly one thread, and
a scan of ``P c`` lists its checkpoints.  A "part" is a self-delimiting component: the
msgpack encoding of the text (length first), or, for text longer than
:data:`MAX_PART` bytes, ``c4 10`` + a 16-byte BLAKE2b hash (the checkpoint record then
keeps the full text, see ``saver.py``).  Being self-delimiting, thread ``"a"``'s prefix is
never a prefix of thread ``"ab"``'s.

Long-term memory (``WalstoreStore``) lives beside the threads, not in any one of them (it
is shared across threads; a write made inside a graph node still rewinds with that node's
thread, because the transaction that made it belongs to the thread's scope)::

    <key_prefix> 01 <label 1> ... <label n> 01 <key utf-8>   -> item record
    <key_prefix> 02 <expiry, 8 bytes big-endian µs> <item key tail>  -> b"" (TTL index)

where a label is ``02 <utf-8> 00`` (LangGraph forbids NUL and ``.`` in labels) or, when
longer than :data:`MAX_LABEL` bytes, ``03 <32 hex digits of its hash> 00``; a key longer
than that is ``00 <32 hex digits>`` instead of ``01 <utf-8>`` (the record then keeps the
names).  Byte order of item keys is Python's order of ``(namespace tuple, key)`` (a
namespace's own items, ``00``/``01``, sort before a deeper label's ``02``), so a namespace
prefix is a key prefix, a namespace's items are one range, and listings come sorted
(hashed labels and keys excepted: they sort after, resp. before, the plain ones).

**The layout of walstore 0.1.x** (before the thread prefix; not read by this version):
``<key_prefix> c|b|h|w|r <thread part> <ns part> ...`` — a checkpoint was
``<key_prefix> c <thread part> <ns part> <checkpoint_id>``.  ``legacy_checkpoint_ranges``
and ``is_legacy_checkpoint`` let the saver find such checkpoints (and refuse to run over
them as if the store held none); ``LEGACY_LETTERS`` are the first bytes of every such key.
"""
from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_PART = 120          # longer thread ids / namespaces / channels / tasks are hashed
MAX_LABEL = 100         # longer memory namespace labels and keys are hashed
MAX_KEY = 480           # walstore's limit is 500 bytes per key; keep a margin

THREADS, MEMORY, EXPIRY = b"\x00", b"\x01", b"\x02"
CHECKPOINT, BLOB, WRITE, RUN = b"c", b"b", b"w", b"r"
LOST = b"l"  # P l <ns part> <run token>: never holds a value (see Namespace.lost_run)
FRESH = b"s"  # P s: where a run on the thread with no checkpoint began (fresh_start)
_LABEL, _HASHED_LABEL, _ITEM_KEY, _HASHED_ITEM_KEY = b"\x02", b"\x03", b"\x01", b"\x00"


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key above every key starting with ``prefix`` (None: unbounded)."""
    kept = prefix.rstrip(b"\xff")
    return kept[:-1] + bytes([kept[-1] + 1]) if kept else None


def part(text: Any) -> bytes:
    """A self-delimiting key component: msgpack str, or bin(16) hash when long."""
    return _part(str(text))


@functools.lru_cache(maxsize=8192)
def _part(text: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:  # (a bare UnicodeEncodeError named nothing)
        raise ValueError(f"{text[:80]!r} is not valid UTF-8 text ({e.reason}): a thread "
                         f"id, checkpoint namespace, checkpoint id or task id is part of a "
                         f"key, and keys are UTF-8; nothing was read or written") from None
    if len(raw) <= MAX_PART:
        return msgpack.packb(text, use_bin_type=True)
    return b"\xc4\x10" + hashlib.blake2b(raw, digest_size=16).digest()


def is_hashed(text: Any) -> bool:
    return len(str(text).encode("utf-8")) > MAX_PART


def read_part(key: bytes, i: int) -> tuple[str | None, int]:
    """Parse the component at ``key[i:]``: (text, or None when hashed; next index)."""
    b0 = key[i]
    if 0xA0 <= b0 <= 0xBF:
        n = b0 & 0x1F
        return key[i + 1:i + 1 + n].decode("utf-8"), i + 1 + n
    if b0 == 0xD9:
        n = key[i + 1]
        return key[i + 2:i + 2 + n].decode("utf-8"), i + 2 + n
    if b0 == 0xC4:
        return None, i + 2 + key[i + 1]
    raise ValueError(f"malformed walstore LangGraph key component at {i}: {key!r}")


@dataclass(frozen=True)
class Namespace:
    """The keys of one checkpoint namespace (``ns``) of one thread."""

    thread_prefix: bytes
    ns_part: bytes

    def checkpoints(self) -> bytes:
        return self.thread_prefix + CHECKPOINT + self.ns_part

    def checkpoint(self, checkpoint_id: str) -> bytes:
        return self.checkpoints() + checkpoint_id.encode("utf-8")

    def blobs(self) -> bytes:
        return self.thread_prefix + BLOB + self.ns_part

    def blob(self, channel: str, version: Any) -> bytes:
        return self.blobs() + part(channel) + part(version)

    def writes(self) -> bytes:
        return self.thread_prefix + WRITE + self.ns_part

    def writes_of(self, checkpoint_id: str) -> bytes:
        return self.writes() + checkpoint_id.encode("utf-8") + b"\x00"

    def write(self, checkpoint_id: str, task_id: str, idx: int) -> bytes:
        return self.writes_of(checkpoint_id) + part(task_id) + msgpack.packb(idx)

    def run(self, run_id: str, checkpoint_id: str) -> bytes:
        return (self.thread_prefix + RUN + part(run_id) + self.ns_part
                + checkpoint_id.encode("utf-8"))

    def lost_run(self, token: str) -> bytes:
        """A key no value is ever stored at: each node transaction of a run reads it as
        it begins, and the saver deletes it (a write of nothing) when the run loses a
        race, so the run's node transactions still open conflict at commit."""
        return self.thread_prefix + LOST + self.ns_part + part(token)


LEGACY_LETTERS = b"cbhwr"  # walstore 0.1.x: <key_prefix> + one of these + ...


def legacy_checkpoint_ranges(key_prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The (start, end) key ranges that hold walstore 0.1.x's checkpoint keys under
    ``key_prefix``: ``c`` then a thread part (msgpack fixstr, str8, or a bin8 hash)."""
    c = bytes(key_prefix) + b"c"
    return [(c + b"\xa0", c + b"\xc0"), (c + b"\xc4\x10", c + b"\xc4\x11"),
            (c + b"\xd9", c + b"\xda")]


def is_legacy_checkpoint(key_prefix: bytes, key: bytes) -> tuple[bool, str | None]:
    """(whether ``key`` is a walstore 0.1.x checkpoint key under ``key_prefix``: a thread
    part, a namespace part and a checkpoint id; its thread id, None when hashed)."""
    i = len(key_prefix) + 1
    try:
        thread_id, i = read_part(key, i)
        _ns, i = read_part(key, i)
        key[i:].decode("utf-8")
    except (ValueError, IndexError):
        return False, None
    return i < len(key), thread_id


class SaverKeys:
    """Key schema of one :class:`WalstoreSaver` (all its keys start with ``root``)."""

    def __init__(self, key_prefix: bytes) -> None:
        self.root = bytes(key_prefix) + THREADS

    def thread(self, thread_id: Any) -> bytes:
        """The prefix every key of the thread starts with (its rewind/purge scope)."""
        return self.root + part(thread_id)

    def at(self, thread_id: Any, ns: str) -> Namespace:
        return Namespace(self.thread(thread_id), part(ns))

    def within(self, thread_prefix: bytes, ns: str) -> Namespace:
        return Namespace(thread_prefix, part(ns))

    @staticmethod
    def runs_of(thread_prefix: bytes, run_id: str) -> bytes:
        return thread_prefix + RUN + part(run_id)

    @staticmethod
    def all_checkpoints(thread_prefix: bytes) -> bytes:
        return thread_prefix + CHECKPOINT

    @staticmethod
    def fresh_start(thread_prefix: bytes) -> bytes:
        """The key holding the log position (an int LSN) at which a run of the thread
        began while the thread had no checkpoint (``WalstoreSaver._undo_on_fresh_start``):
        where a later open looks for the work of such a run that a kill cut off."""
        return thread_prefix + FRESH

    def thread_of(self, key: bytes) -> tuple[bytes, str | None]:
        """(thread prefix, thread id or None when hashed) of any key of this saver."""
        thread_id, i = read_part(key, len(self.root))
        return key[:i], thread_id

    @staticmethod
    def parse_checkpoint(thread_prefix: bytes, key: bytes) -> tuple[str | None, bytes, str]:
        """(ns or None when hashed, ns part, checkpoint_id) of a checkpoint key."""
        start = len(thread_prefix) + 1
        ns, i = read_part(key, start)
        return ns, key[start:i], key[i:].decode("utf-8")

    @staticmethod
    def parse_run(run_prefix: bytes, key: bytes) -> tuple[bytes, str]:
        """(ns part, checkpoint_id) of a run index key found under ``run_prefix``."""
        _ns, i = read_part(key, len(run_prefix))
        return key[len(run_prefix):i], key[i:].decode("utf-8")

    @staticmethod
    def parse_write(writes_of: bytes, key: bytes) -> tuple[str | None, int]:
        """(task id or None when hashed, idx) of a pending write key under ``writes_of``."""
        task_id, i = read_part(key, len(writes_of))
        return task_id, msgpack.unpackb(key[i:])


# ---- long-term memory -----------------------------------------------------------------
def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; a ValueError naming ``what`` when it holds a lone surrogate
    (the bare UnicodeEncodeError from the key's encoding named neither the label or key
    nor the item, and a get or search raised it just the same); a TypeError when it is
    not a str (a GetOp or PutOp built with an int key raised AttributeError)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__} ({text!r:.80}); "
                        f"nothing was read or written")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {text[:80]!r} is not valid UTF-8 text ({e.reason}): "
                         f"WalstoreStore keys are UTF-8, so no such item can be stored "
                         f"or found") from None


def _label(text: str) -> bytes:
    raw = _utf8(text, "namespace label")
    if len(raw) <= MAX_LABEL:
        return _LABEL + raw + b"\x00"
    return _HASHED_LABEL + hashlib.blake2b(raw, digest_size=16).hexdigest().encode() + b"\x00"


def _is_long(text: str) -> bool:
    return len(text.encode("utf-8")) > MAX_LABEL


class MemoryKeys:
    """Key schema of one :class:`WalstoreStore`."""

    def __init__(self, key_prefix: bytes) -> None:
        self.items = bytes(key_prefix) + MEMORY
        self.expiry = bytes(key_prefix) + EXPIRY

    def namespace(self, namespace: tuple[str, ...]) -> bytes:
        """Prefix of every item in ``namespace`` and in the namespaces below it."""
        return self.items + b"".join(_label(label) for label in namespace)

    @staticmethod
    def deeper(namespace_prefix: bytes) -> bytes:
        """Where the namespaces below the one of ``namespace_prefix`` start: its own
        items all sort before."""
        return namespace_prefix + _LABEL

    def item(self, namespace: tuple[str, ...], key: str) -> bytes:
        raw = _utf8(key, "key")
        if len(raw) <= MAX_LABEL:
            out = self.namespace(namespace) + _ITEM_KEY + raw
        else:
            out = (self.namespace(namespace) + _HASHED_ITEM_KEY
                   + hashlib.blake2b(raw, digest_size=16).hexdigest().encode())
        if len(out) > MAX_KEY:
            raise ValueError(f"namespace {namespace!r} with key {key[:40]!r} is too long to "
                             f"store ({len(out)} key bytes; the limit is {MAX_KEY}): use "
                             f"fewer or shorter labels")
        return out

    @staticmethod
    def needs_names(namespace: tuple[str, ...], key: str) -> bool:
        """Whether the item key hashes a label or the key (the record keeps the names)."""
        return _is_long(key) or any(_is_long(label) for label in namespace)

    def parse_item(self, key: bytes) -> tuple[tuple[str, ...] | None, str | None]:
        """(namespace, key) of an item key; None for either when a part of it is hashed."""
        labels: list[str] = []
        hashed = False
        i = len(self.items)
        while key[i:i + 1] in (_LABEL, _HASHED_LABEL):
            end = key.index(b"\x00", i)
            if key[i:i + 1] == _LABEL:
                labels.append(key[i + 1:end].decode("utf-8"))
            else:
                hashed = True
            i = end + 1
        name = key[i + 1:].decode("utf-8") if key[i:i + 1] == _ITEM_KEY else None
        return (None if hashed else tuple(labels)), name

    def namespace_of(self, key: bytes) -> bytes:
        """The namespace prefix (labels only) of an item key."""
        i = len(self.items)
        while key[i:i + 1] in (_LABEL, _HASHED_LABEL):
            i = key.index(b"\x00", i) + 1
        return key[:i]

    def expiry_entry(self, expires_us: int, item_key: bytes) -> bytes:
        return self.expiry + struct.pack(">Q", expires_us) + item_key[len(self.items):]

    def parse_expiry(self, key: bytes) -> tuple[int, bytes]:
        """(expiry in µs since the epoch, item key) of an expiry index entry."""
        n = len(self.expiry)
        return struct.unpack_from(">Q", key, n)[0], self.items + key[n + 8:]
