"""Payload schemas of WAL records, and the log events decoded from them.

Every payload is a msgpack map with short string keys; readers ignore keys they do not
know (so a newer writer can add fields) and treat a missing required key as corruption.

===================  ==================================================================
record               payload
===================  ==================================================================
COMMIT               ``tx``, ``ts`` (unix seconds), ``meta``, ``w``: [[key, value|None]]
                     (None: a delete), and as needed ``actions`` (the rows of the actions
                     it commits), ``scope``, ``compensate`` (ids of committed actions a
                     revert/rewind undoes), ``redo`` (ids a forced revert marks
                     needs-redo), ``gid`` (committing a prepared transaction),
                     ``reverts``, ``rewound_to``, ``purge`` (a key prefix erased),
                     ``tags`` (str an integration stamped: ``add_commit_tag``)
WRITES               ``tx``, ``w``: an earlier chunk of a large COMMIT or PREPARE
                     (contiguous with it)
ABORT                ``tx``; ``recovered`` / ``copied``: written by recovery for a loser
ACTION_INTENT        ``tx``, ``id``, ``name``, ``args``, ``key``, ``compensate``, ``ts``,
                     ``scope``
ACTION_RESULT        ``tx``, ``id``, ``result``, ``error``
COMPENSATED          an action's new state: ``id``, ``state``, ``error``, ``attempts``
PREPARE              ``gid``, ``tx``, ``w``, ``r`` (keys read), ``rr`` (ranges scanned),
                     ``meta``, ``actions`` (ids), ``ts``, ``extra``
ROLLBACK_PREPARED    ``tx``, ``gid``
RESTORE_POINT        ``name``, ``ts``; ``drop``: the name is dropped
CHECKPOINT           ``applied``, ``ts``
SEAL                 ``{}``: the segment ends here, the next begins where this record ends
WORKSPACE            ``root`` (bytes, realpath), ``ignore`` (gitignore patterns), ``scope``,
                     ``ts``: a directory tree registered for reversible files
FILE_STEPS           ``tx``, ``ws`` (root), ``op``, ``steps``: [[path, before, after]] (Entry
                     rows, walstore.files.entries), in the order the operation makes them;
                     durable BEFORE the operation changes anything (write-ahead); ``watch``:
                     the WATCH_BEGIN LSN when the steps are a watch's changes (logged after),
                     ``began`` (ns) when its block began;
                     ``ts`` (when logged: a restore to a time cuts at it; older logs lack it)
WATCH_BEGIN          ``tx``, ``ws``, ``manifest`` (digest of the saved manifest before the
                     watched block: every tracked file's content is stored), ``ts``
WATCH_END            ``tx``, ``ws``, ``begin`` (WATCH_BEGIN LSN), ``n`` (changes, logged as
                     FILE_STEPS before it)
FILE_RESTORED        ``tx``, ``effects``: LSNs of FILE_STEPS / WATCH_BEGIN records whose
                     undo is done; ``held``: not undone, kept owed (a copy of a store)
FILE_CONFLICT        ``tx``, ``ws``, ``effect`` (LSN), ``conflict``: a FileConflict row (the
                     path, before-image, expected and current state, where walstore's
                     version was kept)
===================  ==================================================================

A COMMIT of a transaction with file effects carries ``files``: the LSNs of its live
FILE_STEPS records (effects undone by ``rollback_to`` are not listed).

An ``Event`` is one decoded record that changes the materialized state (everything but
WRITES chunks, CHECKPOINT and SEAL).  Commits carry their whole write set; the
``CommitAssembler`` joins WRITES chunks to their COMMIT for readers of the log.  The
writer builds a COMMIT's payload from its packed body and its packed writes
(``with_writes``), and a plain commit's Event keeps that packed body (see ``Event``).
"""
from __future__ import annotations

from typing import Any

from ..codec import MAX_KEY_BYTES, pack, unpack
from .format import RecordType

_WRITES, _COMMIT = RecordType.WRITES, RecordType.COMMIT
_ENDS = frozenset({RecordType.ABORT, RecordType.ROLLBACK_PREPARED})
_ACTION_RECORDS = frozenset({RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                             RecordType.COMPENSATED})
_FILE_RECORDS = frozenset({RecordType.WORKSPACE, RecordType.FILE_STEPS,
                           RecordType.WATCH_BEGIN, RecordType.WATCH_END,
                           RecordType.FILE_RESTORED, RecordType.FILE_CONFLICT})
NOT_EVENTS = frozenset({RecordType.WRITES, RecordType.CHECKPOINT, RecordType.SEAL,
                        RecordType.COMMIT_PREPARED})
TX_RECORDS = frozenset({RecordType.COMMIT, RecordType.WRITES, RecordType.ABORT,
                        RecordType.ACTION_INTENT, RecordType.ACTION_RESULT,
                        RecordType.PREPARE, RecordType.ROLLBACK_PREPARED,
                        RecordType.FILE_STEPS, RecordType.WATCH_BEGIN, RecordType.WATCH_END,
                        RecordType.FILE_RESTORED, RecordType.FILE_CONFLICT})


# the only fields a packed event body may hold (see Event): any other marks a commit that
# does more than write keys (actions, compensations, files, 2PC, purge...), kept decoded
PLAIN_FIELDS = frozenset({"tx", "ts", "meta", "scope"})


class Event:
    """One record that changes materialized state, decoded.  ``writes`` only for commits
    (and prepares): [(stored key, packed value or None)]; ``body`` without ``w``.

    Unapplied events can wait long in the MemTable (tens of thousands of them), so a plain
    commit is kept in a form the garbage collector does not scan: its writes a tuple of
    (key, value) tuples and its body *packed* (the msgpack map its record was built from),
    when the body holds nothing but PLAIN_FIELDS.  ``body`` decodes it on each access,
    ``thaw`` once for good, and ``field`` reads one field, decoding only for a plain
    field.  (A full collection beside a 20,000-event backlog scanned, per commit, an
    Event, its body dict and the body's ``meta`` dict: PROFILE.md, ninth round.)

    ``start``: where its records begin, its first WRITES chunk's LSN for a chunked commit
    or prepare (else ``lsn``): ``end - start`` is the log it spans, what its writes hold."""

    __slots__ = ("lsn", "end", "type", "txid", "_body", "writes", "ticket", "start")

    def __init__(self, lsn: int, end: int, type: int, txid: int, body: dict | bytes,
                 writes: list | tuple | None = None, ticket: Any = None,
                 start: int | None = None) -> None:
        self.lsn = lsn
        self.end = end
        self.start = lsn if start is None else start
        self.type = type
        self.txid = txid
        self._body = body  # a dict, or a plain body packed
        self.writes = writes
        # a buffered commit record's ``Appended`` (durability="full"), until its committer
        # takes it to wait for durability
        self.ticket = ticket

    @property
    def body(self) -> dict:
        body = self._body
        return body if type(body) is dict else unpack(body)

    def field(self, name: str, default: Any = None) -> Any:
        """``body.get(name, default)``, without decoding a packed body for a field it
        cannot hold."""
        body = self._body
        if type(body) is dict:
            return body.get(name, default)
        return unpack(body).get(name, default) if name in PLAIN_FIELDS else default

    @property
    def packed_body(self) -> bytes | None:
        """The body still packed (a plain commit: only PLAIN_FIELDS), else None.  The
        applier writes such a commit's ``txns`` row from it without decoding it."""
        body = self._body
        return None if type(body) is dict else body

    def thaw(self) -> dict:
        """Decode a packed body for good (the applier, about to put the event in LMDB)."""
        body = self._body
        if type(body) is not dict:
            body = self._body = unpack(body)
        return body

    def __repr__(self) -> str:
        return (f"Event(lsn={self.lsn}, end={self.end}, type={self.type}, txid={self.txid}, "
                f"body={self.body!r}, writes={self.writes!r})")

    def write_bytes(self) -> int:
        return sum(len(k) + (len(v) if v else 0) for k, v in self.writes or ())


_FIXMAP = tuple(bytes((0x80 + n,)) for n in range(16))  # msgpack map headers, 0-15 entries


def with_writes(packed_body: bytes, packed_writes: bytes) -> bytes:
    """The payload of a commit record from its packed body (a msgpack map) and its packed
    write list: the map with one more entry, ``w``, last (what packing
    ``dict(body, w=writes)`` makes, without building that dict)."""
    n = packed_body[0] - 0x80
    if 0 <= n < 15:  # a fixmap (the common case: a few fields)
        return b"".join((_FIXMAP[n + 1], packed_body[1:], b"\xa1w", packed_writes))
    first = packed_body[0]
    if first == 0x8f:
        n, rest = 15, packed_body[1:]
    elif first == 0xde:
        n, rest = int.from_bytes(packed_body[1:3], "big"), packed_body[3:]
    elif first == 0xdf:
        n, rest = int.from_bytes(packed_body[1:5], "big"), packed_body[5:]
    else:
        raise ValueError("a commit body must pack as a msgpack map")
    n += 1
    head = b"\xde" + n.to_bytes(2, "big") if n <= 0xFFFF else b"\xdf" + n.to_bytes(4, "big")
    return b"".join((head, rest, b"\xa1w", packed_writes))


def extend_map(packed_map: bytes, extra: dict) -> bytes:
    """``pack(dict(unpack(packed_map), **extra))`` without decoding ``packed_map`` (its
    keys must differ from ``extra``'s): the entries of both maps under one header."""
    packed_extra = pack(extra)
    m, rest = _map_head(packed_map)
    x, extra_rest = _map_head(packed_extra)
    n = m + x
    if n < 16:
        head = _FIXMAP[n]
    elif n <= 0xFFFF:
        head = b"\xde" + n.to_bytes(2, "big")
    else:
        head = b"\xdf" + n.to_bytes(4, "big")
    return b"".join((head, rest, extra_rest))


def _map_head(packed: bytes) -> tuple[int, bytes]:
    """(entries, the bytes after the header) of a packed msgpack map."""
    first = packed[0]
    if 0x80 <= first <= 0x8f:
        return first - 0x80, packed[1:]
    if first == 0xde:
        return int.from_bytes(packed[1:3], "big"), packed[3:]
    if first == 0xdf:
        return int.from_bytes(packed[1:5], "big"), packed[5:]
    raise ValueError("not a packed msgpack map")


MAX_TXID = 1 << 63  # transaction ids below it (they are packed as u64, and one past)
MAX_STORED_KEY = MAX_KEY_BYTES + 1  # a stored key: its type tag and the key
_KEY_TAGS = (b"s", b"b")            # str and bytes keys (walstore.codec)


def decode(payload: bytes) -> dict:
    """Unpack a payload; ValueError when it is not a msgpack map."""
    body = unpack(payload)
    if not isinstance(body, dict):
        raise ValueError(f"record payload is a {type(body).__name__}, not a map")
    return body


def parse_writes(body: dict) -> list:
    writes = body.get("w")
    if not isinstance(writes, list):
        raise ValueError("record has no write list")
    out = []
    for w in writes:
        if (not isinstance(w, list) or len(w) < 2 or not isinstance(w[0], bytes)
                or not (w[1] is None or isinstance(w[1], bytes))):
            raise ValueError("malformed write entry")
        k = w[0]
        if not 1 < len(k) <= MAX_STORED_KEY or k[:1] not in _KEY_TAGS:
            raise ValueError(f"write entry with an impossible stored key {k[:24]!r}")
        out.append((k, w[1]))
    return out


def _action_id(x: Any) -> bool:
    """An action id as walstore gives them: ``"<txid>.<n>"``."""
    txid, dot, n = x.partition(".") if isinstance(x, str) else ("", "", "")
    return txid.isascii() and txid.isdigit() and (not dot or (n.isascii() and n.isdigit()))


def _ids(body: dict, name: str, what: str) -> None:
    v = body.get(name)
    ok = _action_id if what == "action ids" else (
        lambda x: isinstance(x, int) and not isinstance(x, bool))
    if v is not None and (not isinstance(v, list) or not all(ok(x) for x in v)):
        raise ValueError(f"field {name!r} is not a list of {what}")


def _gid(gid: Any, required: bool) -> None:
    if gid is None and not required:
        return
    if not isinstance(gid, str) or len(gid.encode("utf-8", "replace")) > 509:
        raise ValueError("field 'gid' is not a str LMDB can hold (at most 509 bytes)")


def check_fields(rtype: int, body: dict) -> None:
    """ValueError when a field the appliers and readers index has the wrong type: a
    record no walstore writes (its CRC holds: crafted, or a writer's bug), refused as a
    bad payload (recovery's strict mode names it) rather than a TypeError mid-apply."""
    if rtype == _COMMIT:
        acts = body.get("actions")
        if acts is not None and (not isinstance(acts, list) or any(
                not isinstance(a, dict) or not _action_id(a.get("id")) for a in acts)):
            raise ValueError("field 'actions' is not a list of action rows with an id")
        for a in acts or ():
            _action_fields(a)
        _int(body, "rewound_to", False)
        for name in ("crossed", "compensate", "redo", "unredo"):
            _ids(body, name, "action ids")
        _ids(body, "reverts", "txids")
        _ids(body, "files", "LSNs")
        tags = body.get("tags")
        if tags is not None and (not isinstance(tags, list)
                                 or not all(isinstance(t, str) for t in tags)):
            raise ValueError("field 'tags' is not a list of str")
        _gid(body.get("gid"), False)
        if "purge" in body:
            rng = body.get("purge_range")
            if (not isinstance(body["purge"], (str, bytes)) or not isinstance(rng, list)
                    or len(rng) != 2 or not isinstance(rng[0], bytes)
                    or not (rng[1] is None or isinstance(rng[1], bytes))):
                raise ValueError("a purge without a valid prefix and key range")
    elif rtype == RecordType.PREPARE or rtype == RecordType.ROLLBACK_PREPARED:
        _gid(body.get("gid"), rtype == RecordType.PREPARE)
        if rtype == RecordType.PREPARE:  # (ids; walstore 0.1.0 kept whole action rows
            acts = body.get("actions")   # there, each with its id: Prepared.legacy_actions)
            if acts is not None and (not isinstance(acts, list) or not all(
                    _action_id(a.get("id") if isinstance(a, dict) else a) for a in acts)):
                raise ValueError("field 'actions' is not a list of action ids")
            for name in ("r", "rr"):
                if not isinstance(body.get(name, []), list):
                    raise ValueError(f"field {name!r} is not a list")
            if not isinstance(body.get("extra") or {}, dict):
                raise ValueError("field 'extra' is not a map")
            fence = body.get("fence", [])   # (the scopes it works for: conflicts.Prepared)
            if not isinstance(fence, list) or not all(
                    isinstance(f, (str, bytes)) and f for f in fence):
                raise ValueError("field 'fence' is not a list of scopes")
            _ts(body)
    elif rtype == RecordType.RESTORE_POINT:
        name = body.get("name")
        if not isinstance(name, str) or not 0 < len(name.encode("utf-8", "replace")) <= 511:
            raise ValueError("the restore point has no name LMDB can hold (a str of 1 to "
                             "511 bytes)")
        _ts(body)
    elif rtype in _ACTION_RECORDS:
        if not _action_id(body.get("id")):
            raise ValueError(f"the action id {str(body.get('id'))[:40]!r} is not one "
                             f"walstore gives (<txid>.<n>)")
        _action_fields(body)
    elif rtype in _FILE_RECORDS:
        _check_file_fields(rtype, body)
        _ts(body)


def error_text_of(error: Any) -> str | None:
    """An action's ``error`` as text: a resolve note an older walstore logged as another
    value (see ``_action_fields``) is its ``repr``."""
    return error if error is None or isinstance(error, str) else repr(error)


# (the fields an action row takes from these records, as ``tables.ROW_CHECKS`` reads them
# back: a record with another type there was applied, and then every read of its row
# refused — probe-audit60: refused here instead, as the bad payload it is)
ACTION_STATES = frozenset({"in-flight", "committed", "pending", "failed", "compensated",
                           "resolved", "needs-redo"})


def _action_fields(body: dict) -> None:
    # (a ``resolved`` action's ``error`` is the note ``resolve`` was given: walstore 0.1.0,
    # and 0.2.0 until 70cb304, logged whatever value it got there, a dict or an int; such
    # a record is one walstore wrote, never refused — readers take it as text:
    # ``error_text_of``)
    for name in ("tx", "attempts", "lsn"):
        v = body.get(name)
        if v is not None and not (type(v) is int and 0 <= v < 1 << 64):
            raise ValueError(f"field {name!r} is not an unsigned integer")
    for name in ("name", "compensate", "key", "error"):
        v = body.get(name)
        if v is not None and not isinstance(v, str) and not (
                name == "error" and body.get("state") == "resolved"):
            raise ValueError(f"field {name!r} is not a str")
    if "state" in body and body["state"] not in ACTION_STATES:
        raise ValueError(f"field 'state' is not an action state ({body['state']!r:.40})")
    _ts(body)


def _ts(body: dict) -> None:
    ts = body.get("ts", 0.0)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ValueError("field 'ts' is not a time")


def _int(body: dict, name: str, required: bool = True) -> None:
    v = body.get(name)
    if (v is not None or required) and (not isinstance(v, int) or isinstance(v, bool)):
        raise ValueError(f"field {name!r} is not an integer")


def _entry_row(row: Any, what: str) -> None:
    from ..files.entries import Entry  # (pure: what a path is, as before-images say it)
    try:
        Entry.from_row(row)
    except (ValueError, TypeError, KeyError, IndexError):
        raise ValueError(f"{what} is not a file entry row") from None


def _check_file_fields(rtype: int, body: dict) -> None:
    """The fields of the reversible-file records that recovery and verify index."""
    if rtype == RecordType.WORKSPACE:
        root = body.get("root")
        if not isinstance(root, bytes) or not root.startswith(b"/"):
            raise ValueError("the workspace root is not an absolute path (bytes)")
        ignore = body.get("ignore")
        if ignore is not None and (not isinstance(ignore, list) or not all(
                isinstance(p, (bytes, str)) for p in ignore)):
            raise ValueError("field 'ignore' is not a list of patterns")
        return
    if rtype != RecordType.FILE_RESTORED and not isinstance(body.get("ws"), bytes):
        raise ValueError("field 'ws' is not a workspace root (bytes)")
    if rtype == RecordType.FILE_STEPS:
        steps = body.get("steps")
        if not isinstance(body.get("op"), str) or not isinstance(steps, list):
            raise ValueError("a FILE_STEPS record without its op and steps")
        for step in steps:
            if (not isinstance(step, list) or len(step) != 3
                    or not isinstance(step[0], bytes)):
                raise ValueError("a file step that is not [path, before, after]")
            _entry_row(step[1], "a step's before-image")
            _entry_row(step[2], "a step's after-image")
        _int(body, "watch", False)
        _int(body, "began", False)
    elif rtype == RecordType.WATCH_BEGIN:
        if not isinstance(body.get("manifest"), str):
            raise ValueError("field 'manifest' is not a digest")
    elif rtype == RecordType.WATCH_END:
        _int(body, "begin")
        _int(body, "n", False)
    elif rtype == RecordType.FILE_RESTORED:
        _ids(body, "effects", "LSNs")
    elif rtype == RecordType.FILE_CONFLICT:
        _int(body, "effect")
        c = body.get("conflict")
        if not isinstance(c, dict) or not isinstance(c.get("path"), bytes):
            raise ValueError("field 'conflict' is not a file conflict row")
        _entry_row(c.get("before"), "the conflict's before-image")
        _entry_row(c.get("current"), "the conflict's current state")
        if c.get("expected") is not None:
            _entry_row(c.get("expected"), "the conflict's expected state")


def txid_of(body: dict) -> int:
    txid = body.get("tx")
    if not isinstance(txid, int) or isinstance(txid, bool) or not 0 <= txid < MAX_TXID:
        raise ValueError("record has no valid transaction id")
    return txid


def chunk_writes(writes: list, chunk_bytes: int) -> list[list]:
    """Split a write set (a list of (key, value) pairs) into slices of about
    ``chunk_bytes`` (the last goes in the COMMIT).  A chunk stays far below MAX_PAYLOAD:
    one value is at most 16 MiB."""
    chunks: list[list] = []
    start = size = 0
    for i, (k, v) in enumerate(writes):
        n = len(k) + (len(v) if v is not None else 0) + 16
        if size and size + n > chunk_bytes:
            chunks.append(writes[start:i])  # (a slice: pairs pack as arrays)
            start, size = i, 0
        size += n
    chunks.append(writes[start:])
    return chunks


# what one transaction's WRITES chunks not yet joined to their COMMIT or PREPARE may take
# in a reader's memory (payload bytes): every reader of the log (recovery, verify,
# followers) refuses past it, so a damaged log (chunks whose COMMIT never comes) cannot
# exhaust memory; writers refuse a write set past codec.MAX_TXN_WRITE_BYTES, below it
MAX_OPEN_TXN_BYTES = 512 * 1024 * 1024


class CommitAssembler:
    """Turns the stream of records into Events: joins WRITES chunks to their COMMIT (or
    PREPARE: a prepare's writes are chunked the same way; a store written before that has
    none before its PREPARE).

    ``feed`` returns the Event of a record that changes state (a COMMIT or PREPARE with its
    complete write list, earlier chunks first; ``start``: its first chunk's LSN), and None
    for the others; an ABORT or
    ROLLBACK_PREPARED drops buffered chunks.  ``max_bytes`` bounds what one unfinished
    transaction may buffer, and what all of them buffer together: a writer appends a
    transaction's chunks and its COMMIT or PREPARE at once, under one lock, so chunks of
    another transaction still open when a new chunk would pass the bound are a crash's
    leftovers (their COMMIT never written; each crash leaves at most one set, and a log
    kept across many crashes held them all — up to ``max_bytes`` each).  They are
    dropped, their txids kept (at most ``MAX_ORPHANS``): a COMMIT or PREPARE of one later
    is a damaged log (ValueError), never a commit applied without its dropped writes.
    Every reader of the log decodes through it.
    """

    MAX_ORPHANS = 65536  # txids of dropped chunk sets remembered (the oldest forgotten)

    def __init__(self, max_bytes: int | None = None) -> None:
        self.chunks: dict[int, list] = {}
        self.sizes: dict[int, int] = {}
        self.starts: dict[int, int] = {}  # txid -> LSN of its first buffered chunk
        self.max_bytes = MAX_OPEN_TXN_BYTES if max_bytes is None else max_bytes
        self.total = 0  # payload bytes buffered, all transactions together
        self.orphans: dict[int, int] = {}  # txid -> LSN of its dropped first chunk

    def _drop(self, txid: int) -> int:
        """Forget ``txid``'s buffered chunks; their first chunk's LSN (or -1)."""
        self.total -= self.sizes.pop(txid, 0)
        self.chunks.pop(txid, None)
        return self.starts.pop(txid, -1)

    def _drop_orphans(self, keep: int) -> None:
        for other in [t for t in self.sizes if t != keep]:
            self.orphans[other] = self._drop(other)
            if len(self.orphans) > self.MAX_ORPHANS:
                del self.orphans[next(iter(self.orphans))]

    def feed(self, rtype: int, lsn: int, end: int, body: dict, payload_len: int
             ) -> Event | None:
        txid = txid_of(body) if rtype in TX_RECORDS else -1
        check_fields(rtype, body)
        if rtype == _WRITES:
            size = self.sizes.get(txid, 0) + payload_len
            if size > self.max_bytes:
                raise ValueError(f"transaction {txid} exceeds {self.max_bytes} bytes of writes")
            if self.total + payload_len > self.max_bytes:
                self._drop_orphans(txid)
            writes = parse_writes(body)
            self.sizes[txid] = size
            self.total += payload_len
            self.starts.setdefault(txid, lsn)
            self.chunks.setdefault(txid, []).extend(writes)
            return None
        if rtype in NOT_EVENTS:
            return None
        writes = None
        start = lsn
        if rtype == _COMMIT or rtype == RecordType.PREPARE:
            if txid in self.orphans and txid not in self.sizes:
                raise ValueError(
                    f"transaction {txid}'s write chunks (from LSN {self.orphans[txid]}) "
                    f"were not followed by its {'COMMIT' if rtype == _COMMIT else 'PREPARE'}"
                    f" (other records came between): a damaged log")
            start = self.starts.get(txid, lsn)
            writes = self.chunks.get(txid, []) + parse_writes(body)
            self._drop(txid)
            body = {k: v for k, v in body.items() if k != "w"}
        elif rtype in _ENDS:
            self._drop(txid)
            self.orphans.pop(txid, None)
        return Event(lsn, end, rtype, txid, body, writes, None, start)


def commit_ts(body: dict) -> float:
    ts = body.get("ts", 0.0)
    return float(ts) if isinstance(ts, (int, float)) else 0.0


def jsonable_point(point: Any) -> Any:
    """A point as a rewind's meta records it: a txid as an int, an LSN as ``"lsn:N"``
    (the CLI's spelling; it was the bare int, which reads as txid N), a name as a str."""
    from .format import LSN
    if isinstance(point, LSN):
        return f"lsn:{int(point)}"
    return int(point) if isinstance(point, int) else str(point)
