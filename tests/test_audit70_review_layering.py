"""Review of the layering change (issue 10: the agent layer on Transaction's public
interface, Store.engine, the module-level privates made public, tests/test_layering.py).

- ``Transaction.write_stored`` is public on the object every application holds, and wrote
  whatever it was given: a stored key of 600 bytes, one without its type tag, a ``str``
  key or value — the commit was acknowledged, then the applier failed (the store turned
  read-only) and every later open refused the store ("write entry with an impossible
  stored key": the log's own parse of that record).  One call bricked the store.
- The layering checker missed a reach-in written in a package's ``__init__.py`` (its
  relative imports resolved one level too deep), one importing a private a package's
  ``__init__`` defines (``from ..engine import _x``), and one through ``import a.b as c``.
"""
from __future__ import annotations

import pytest

import walstore
from test_layering import reach_ins

BAD_PAIRS = [
    ((b"b" + b"\xff" * 600, None), ValueError),   # past LMDB's key limit
    ((b"zz", None), ValueError),                   # no type tag
    ((b"b", None), ValueError),                    # the tag alone: an empty key
    (("bkey", None), TypeError),                   # not a stored key (a str)
    ((bytearray(b"bkey"), None), TypeError),
    ((b"bkey", "text"), TypeError),                # not a packed value
    ((b"bkey", 7), TypeError),
    ((b"bkey", b"\xa1" * (16 * 1024 * 1024 + 1)), ValueError),  # past the value limit
]


@pytest.mark.parametrize("pair,error", BAD_PAIRS, ids=[repr(p[0])[:24] for p in BAD_PAIRS])
def test_a_store_opens_again_after_any_write_a_transaction_takes(path, pair, error):
    """Before the fix the pair was taken, the commit acknowledged, and the next open
    raised CorruptionError (the store could not be opened again without salvage)."""
    with walstore.open(path, durability="none") as s:
        with s.transaction() as tx:
            tx.put("good", 1)
            with pytest.raises(error):
                tx.write_stored([pair])
        s.checkpoint()
        assert not s.readonly
        assert dict(s.scan()) == {"good": 1}
    with walstore.open(path, durability="none") as s:
        assert dict(s.scan()) == {"good": 1}


def test_write_stored_still_writes_stored_pairs(store):
    """The purge's and the undo's use: an encoded key and a packed value (or None)."""
    from walstore.codec import encode_key, pack_value
    with store.transaction() as tx:
        tx.put("gone", 1)
    with store.transaction() as tx:
        tx.write_stored([(encode_key("k"), pack_value({"a": 1})), (encode_key(b"b"),
                         pack_value(2)), (encode_key("gone"), None)])
    assert dict(store.scan()) == {"k": {"a": 1}, b"b": 2}


def _tree(tmp_path, files: dict[str, str]):
    root = tmp_path / "walstore"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    return root


def _found(root):
    return sorted((m, r, a) for m, _, r, a in reach_ins(root))


def test_the_layering_check_sees_a_reach_in_in_a_packages_init(tmp_path):
    """A private imported by a checked layer's ``__init__.py`` was resolved as
    ``walstore.agent.engine.snap`` (one level too deep) and never seen."""
    root = _tree(tmp_path, {
        "engine/snap.py": "def _as_of(): pass\n",
        "agent/__init__.py": "from ..engine.snap import _as_of\n"
                             "from ..engine import snap as s2\ns2._as_of()\n"})
    assert _found(root) == [("walstore.agent.__init__", "s2", "_as_of"),
                            ("walstore.agent.__init__", "walstore.engine.snap", "_as_of")]


def test_the_layering_check_sees_a_private_of_a_packages_init(tmp_path):
    """``from ..engine import _x`` where walstore/engine/__init__.py defines ``_x``:
    the package's module was looked up as ``walstore.engine`` (stored as
    ``walstore.engine.__init__``) and never seen; and ``import a.b as c`` bound no alias."""
    root = _tree(tmp_path, {
        "engine/__init__.py": "def _x(): pass\n",
        "engine/snap.py": "def _as_of(): pass\n",
        "agent/a.py": "from ..engine import _x\n",
        "ops/b.py": "import walstore.engine.snap as sn\nsn._as_of()\n"})
    assert _found(root) == [("walstore.agent.a", "walstore.engine", "_x"),
                            ("walstore.ops.b", "sn", "_as_of")]


def test_the_layering_check_leaves_a_layers_own_init_alone(tmp_path):
    """No false alarm: a package's ``__init__`` importing its own modules' privates, and a
    layer reading another layer's public names."""
    root = _tree(tmp_path, {
        "agent/inner.py": "def _mine(): pass\n",
        "agent/__init__.py": "from .inner import _mine\nfrom . import inner\ninner._mine()\n",
        "engine/__init__.py": "def public(): pass\n",
        "ops/c.py": "from ..engine import public\nimport walstore.engine as e\ne.public()\n"})
    assert _found(root) == []


def test_a_damaged_stored_key_is_reported_as_corruption_not_a_unicode_error(path):
    """A str key's bytes in LMDB that are no longer UTF-8 (a flipped byte): ``scan()``
    raised a bare UnicodeDecodeError (``codec.decode_key``), where a value that does
    not decode raises CorruptionError naming the row and the file."""
    with walstore.open(path, durability="none") as s:
        with s.transaction() as tx:
            tx.put("zzzzunique", 1)
        s.checkpoint()
    data = f"{path}/db/data.mdb"
    with open(data, "rb") as f:
        raw = f.read()
    assert b"szzzzunique" in raw
    with open(data, "r+b") as f:
        f.write(raw.replace(b"szzzzunique", b"s\xffzzzunique"))
    with walstore.open(path, durability="none") as s:
        with pytest.raises(walstore.CorruptionError, match="not UTF-8"):
            list(s.scan())
