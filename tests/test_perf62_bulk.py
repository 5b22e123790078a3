"""Stop 62, bulk load: the fast paths of a big commit (the applier's ``txns`` row of many
keys joined in one C call) give exactly what the general paths give, and a bulk load
stays atomic, durable, readable before and after its apply, and recoverable."""
from __future__ import annotations

import os

import pytest

import walstore
from walstore.codec import pack, unpack
from walstore.engine import tables
from walstore.log.records import Event


def _keys(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 15, 16, 64, 65535, 65536])
@pytest.mark.parametrize("size", [1, 20, 255])
def test_joined_key_list_is_the_packed_list(n, size):
    writes = [(k, b"\xa1v") for k in _keys(n, size)]
    assert tables._packed_key_list(writes) == pack([[k, None] for k, _v in writes])


def test_joined_key_list_declines_what_it_cannot_join():
    assert tables._packed_key_list([(b"a" * 256, None)] * 70) is None  # (bin 16)
    assert tables._packed_key_list([(b"ab", None), (b"abc", None)] * 40) is None
    # a bytes-like key of another type: declined, or joined to the same bytes
    mixed = [(b"ab", None)] * 70 + [(bytearray(b"cd"), None)]
    got = tables._packed_key_list(mixed)
    assert got is None or got == pack([[k, None] for k, _v in mixed])


@pytest.mark.parametrize("n", [3, 63, 64, 1000])
@pytest.mark.parametrize("size", [5, 20, 300])
@pytest.mark.parametrize("fields", [3, 13])
def test_plain_txn_row_of_many_writes_is_the_decoded_row(n, size, fields):
    body = {"tx": 41, "ts": 1.5, "meta": {"a": 1}}
    body.update({f"x{i}": i for i in range(fields - 3)})  # (13: past a fixmap's room)
    writes = tuple((k, pack(i) if i % 3 else None) for i, k in enumerate(_keys(n, size)))
    packed = Event(100, 180, 1, 41, pack(body), writes)
    decoded = Event(100, 180, 1, 41, dict(body), writes)
    row = tables.plain_txn_row(packed, packed.packed_body)
    want = dict(body, lsn=100, end=180, w=[[k, None] for k, _v in writes])
    assert unpack(row) == want
    if fields == 3:  # (a plain body: the row the decoded path makes)
        assert want == unpack(pack(tables.txn_row(decoded)))
    if fields == 3:  # (and byte for byte what the general path packs)
        tail = pack({"lsn": 100, "end": 180, "w": [[k, None] for k, _v in writes]})
        assert row == b"".join((bytes((0x83 + 3,)), pack(body)[1:], tail[1:]))


def _items(n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(b"key:%016d" % ((i * 2654435761) & 0xFFFFFFFF), os.urandom(100))
            for i in range(start, start + n)]


def test_bulk_load_reads_before_and_after_the_apply_and_its_log_row(tmp_path):
    items = _items(5000)
    with walstore.open(tmp_path / "s", apply_interval=3600, apply_batch=10**6) as s:
        with s.transaction() as tx:
            tx.update(items)
        txid = tx.id
        for k, v in items[::97]:  # (from the MemTable: not applied yet)
            assert s.get(k) == v
        s._engine.drain()
        for k, v in items[::89]:  # (from LMDB)
            assert s.get(k) == v
        info = s.txn_info(txid)
        assert sorted(info.keys) == sorted(k for k, _v in items)
    with walstore.open(tmp_path / "s") as s:
        assert all(s.get(k) == v for k, v in items)
        hist = s.history(items[0][0])
        assert [h.value for h in hist] == [items[0][1]]


def test_bulk_load_over_existing_keys_keeps_their_history(tmp_path):
    old, new = _items(3000), _items(3000, start=1500)
    with walstore.open(tmp_path / "s") as s:
        with s.transaction() as tx:
            tx.update(old)
        s._engine.drain()
        with s.transaction() as tx:
            tx.update(new)
    with walstore.open(tmp_path / "s") as s:
        want = dict(old)
        want.update(new)
        assert all(s.get(k) == v for k, v in want.items())
        k, v = new[0]
        assert [h.value for h in s.history(k)] == [v, dict(old)[k]]


def test_bulk_load_recovered_from_its_chunks_without_an_apply(tmp_path):
    """Committed and closed without the apply (a crash after the commit): the chunked
    commit (WRITES chunks, then COMMIT) comes back whole from the log."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import os, walstore
        items = [(b"key:%016d" % i, b"v%d" % i * 10) for i in range(60000)]
        s = walstore.open({str(tmp_path / 's')!r}, apply_interval=3600,
                          apply_batch=10**6)
        with s.transaction() as tx:
            tx.update(items)
        os._exit(0)  # (no close: nothing applied to LMDB)
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(walstore.__file__)))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    with walstore.open(tmp_path / "s") as s:
        for i in range(0, 60000, 997):
            assert s.get(b"key:%016d" % i) == b"v%d" % i * 10
        assert s.get(b"key:%016d" % 59999) == b"v59999" * 10


def test_pack_items_short_bytes_lane_is_the_general_packing():
    """Bytes keys with bytes values under 256 bytes take a lane of their own (the value's
    bin 8 head joined, no Packer call): the same dict as encode_key/pack_value give, for
    every length around its edges, beside pairs of every other kind."""
    from walstore.codec import MAX_KEY_BYTES, encode_key, pack_items, pack_value
    pairs = [(b"k" * n, b"v" * m) for n in (1, 2, MAX_KEY_BYTES) for m in (0, 1, 255, 256,
                                                                          70000)]
    pairs += [("str-key", b"x" * 10), (b"b", "text"), (b"i", 7), (b"d", {"a": [1, b"z"]}),
              (b"k" * 3, b"again" * 3), (b"k" * 3, b"last")]  # (a repeated key: the last)
    got = pack_items(pairs)
    want = {}
    for k, v in pairs:
        want[encode_key(k)] = pack_value(v, k)
    assert got == want and list(got) == list(want)


def test_pack_items_short_bytes_lane_keeps_the_checks():
    from walstore.codec import MAX_KEY_BYTES, pack_items
    with pytest.raises(Exception) as lane:
        pack_items([(b"", b"v")])
    with pytest.raises(Exception) as general:
        pack_items([(b"", 1)])
    assert type(lane.value) is type(general.value)
    with pytest.raises(Exception) as lane:
        pack_items([(b"k" * (MAX_KEY_BYTES + 1), b"v")])
    with pytest.raises(Exception) as general:
        pack_items([(b"k" * (MAX_KEY_BYTES + 1), 1)])
    assert type(lane.value) is type(general.value) and str(lane.value) == str(general.value)
    with pytest.raises(TypeError, match="update\\(\\) takes a mapping"):
        pack_items([(b"k", b"v"), b"kv!"])
    seen = []

    def over(size):
        seen.append(size)
        raise OverflowError(size)
    with pytest.raises(OverflowError):  # (the bound met in the lane, before the next pair)
        pack_items(((b"k%d" % i, b"v" * 200) for i in range(10**6)), 10_000, over)
    assert seen and seen[0] > 10_000 and seen[0] < 10_000 + 400


def test_bulk_commit_into_an_idle_memtable_keeps_one_version_per_key(tmp_path):
    """The MemTable's bulk entry (its versions built in C): each key's chain is one
    (lsn, packed value) in a tuple of its own, the reads and the per-key last-commit LSN
    the conflict checks use are the per-key path's, and all leave at the apply."""
    items = _items(3000)
    with walstore.open(tmp_path / "s", apply_interval=3600, apply_batch=10**6) as s:
        with s.transaction() as tx:
            tx.update(items)
        mt = s._engine.memtable
        event = next(e for e in mt.events if e.txid == tx.id and e.type == 1)
        versions = mt.versions
        assert len(versions) == len(items)
        chains = {id(c) for c in versions.values()}
        assert len(chains) == len(items)  # (no chain shared between keys)
        for k, v in event.writes:
            assert versions[k] == ((event.lsn, v),) and type(versions[k]) is tuple
        # a second commit over a loaded key: its chain grows as the per-key path's does
        k0, v0 = items[0]
        with s.transaction() as tx2:
            tx2.put(k0, b"second")
        assert s.get(k0) == b"second"
        # a transaction that read the key before that commit conflicts with it
        t3 = s.transaction()
        assert t3.get(items[1][0]) == items[1][1]
        with s.transaction() as tx4:
            tx4.put(items[1][0], b"other")
        t3.put(items[1][0], b"mine")
        with pytest.raises(walstore.ConflictError):
            t3.commit()
        s._engine.drain()
        assert not mt.versions
        assert s.get(k0) == b"second" and s.get(items[1][0]) == b"other"
        assert all(s.get(k) == v for k, v in items[2:])
