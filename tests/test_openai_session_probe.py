"""WalstoreSession: the findings of a probe of the OpenAI Agents integration (probe49).

A rewind whose compensator writes to the session (it hung); sessions of nested namespaces
sharing keys; a branch name too long for its items' keys; a non-int ``limit``; an item over
16 MiB; ``switch_to_branch(None)``; ``erase()`` (a session purged from every file).
"""
from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from agents.memory import SQLiteSession  # noqa: E402

import walstore.integrations.openai_agents as oa  # noqa: E402
from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "store"), durability="none")
    yield s
    s.close()


def user(text):
    return {"role": "user", "content": text}


# ---- a compensator that writes to the session ---------------------------------------------
REWIND_CHILD = textwrap.dedent("""
    import asyncio, sys
    import walstore
    from walstore.integrations.openai_agents import WalstoreSession

    store = walstore.open(sys.argv[1], durability="none")
    s = WalstoreSession("A", store)

    @store.compensator("cancel")
    def cancel(action):   # notes the retraction in the conversation it belongs to
        note = {"role": "system", "content": f"booking {action.args['i']} cancelled"}
        asyncio.run(WalstoreSession("A", store).add_items([note]))

    async def main():
        await s.add_items([{"role": "user", "content": "hi"}])
        await s.restore_point("p")
        with store.transaction() as tx:
            with tx.action("book", args={"i": 1}, compensate="cancel", scope=s.scope) as act:
                act.result = 1
        await s.add_items([{"role": "user", "content": "book"}])
        await s.rewind("p")
        print(await s.get_items())
    asyncio.run(main())
    store.close()
""")


def test_rewind_completes_when_a_compensator_writes_to_the_session(tmp_path):
    """rewind held the session's writer lock while store.rewind ran the compensations; a
    compensator's add_items (in another worker thread) waited for it forever."""
    try:
        out = subprocess.run([sys.executable, "-c", REWIND_CHILD, str(tmp_path / "s")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("session.rewind did not return: its compensator's add_items to the "
                    "same session waits for the lock the rewind holds")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[{'role': 'user', 'content': 'hi'}, "
                                  "{'role': 'system', 'content': 'booking 1 cancelled'}]")


# ---- namespaces ---------------------------------------------------------------------------
def test_a_namespace_inside_another_namespaces_session_is_refused(store):
    async def go():
        a = WalstoreSession("tenant1", store)                    # scope oa/tenant1/
        with pytest.raises(ValueError, match="inside the scope of a session"):
            WalstoreSession("i", store, namespace="oa/tenant1/")
        b = WalstoreSession("i", store, namespace="oa/tenant1:/")   # suggested instead
        c = WalstoreSession("i", store, namespace="oa-tenant1/")
        await b.add_items([user("b")])
        await c.add_items([user("c")])
        await a.add_items([user("a")])
        await a.clear_session()
        assert await b.get_items() == [user("b")]
        assert await c.get_items() == [user("c")]
    run(go())
    for bad in ("", "oa", "oa/x", "oa//", "a/b/c:/", "x:/%41/", "/x/"):
        with pytest.raises(ValueError):
            WalstoreSession("s", store, namespace=bad)
    with pytest.raises(TypeError):
        WalstoreSession("s", store, namespace=None)
    with pytest.raises(ValueError, match="too long"):
        WalstoreSession("s", store, namespace="n" * 480 + "/")


def test_scopes_of_accepted_namespaces_never_nest(store):
    namespaces = ["oa/", "oa:/", "/", "a:/b:/", "a:/b:/c d/", "oa/t:/", "oa/t:/i:/", "x/é/"]
    ids = ["", "tenant1", "t:", "i:", "t", "b:", "c d", "é", "#" + "0" * 64, "x" * 200, "a/b"]
    scopes = {}
    for ns in namespaces:
        for sid in ids:
            scopes[(ns, sid)] = WalstoreSession(sid, store, namespace=ns).scope
    for p1, s1 in scopes.items():
        for p2, s2 in scopes.items():
            if p1 != p2:
                assert not s2.startswith(s1), (p1, s1, p2, s2)


# ---- branch names too long for their keys -------------------------------------------------
def test_a_branch_name_too_long_for_its_item_keys_is_refused_at_creation(store):
    async def go():
        s = WalstoreSession("A", store)
        await s.add_items([user("u1"), {"role": "assistant", "content": "a1"}])
        with pytest.raises(ValueError, match="500-byte key limit"):
            await s.create_branch_from_turn(1, "b" * 480)
        assert await s.current_branch() == "main"
        assert [b["branch_id"] for b in await s.list_branches()] == ["main"]
        room = 500 - len(f"{s.scope}i//") - 20
        with pytest.raises(ValueError):
            await s.create_branch_from_turn(1, "b" * (room + 1))
        name = "b" * room                                    # the longest that fits: works
        assert await s.create_branch_from_turn(1, name) == name
        await s.add_items([user("u1 again")])
        assert await s.get_items() == [user("u1 again")]
        with pytest.raises(ValueError, match="does not exist"):
            await s.switch_to_branch("c" * 600)
    run(go())


# ---- get_items(limit) ---------------------------------------------------------------------
def test_get_items_refuses_a_limit_that_is_not_an_int(store, tmp_path):
    async def go():
        w, q = WalstoreSession("t", store), SQLiteSession("t", str(tmp_path / "r.db"))
        for s in (w, q):
            await s.add_items([{"i": i} for i in range(5)])
        for bad in (2.5, 2.0, math.nan, math.inf, "2"):
            with pytest.raises(TypeError, match="limit must be an int"):
                await w.get_items(bad)
        for ok in (True, False, 0, 3, -1, None):
            assert await w.get_items(ok) == await q.get_items(ok), ok
        settings = WalstoreSession("t", store, session_settings={"limit": 2})
        settings.session_settings.limit = 1.5
        with pytest.raises(TypeError, match="session_settings.limit"):
            await settings.get_items()
    run(go())


# ---- an item over 16 MiB ------------------------------------------------------------------
def test_an_item_over_16_mib_is_refused_naming_its_index_and_the_limit(store):
    async def go():
        s = WalstoreSession("t", store)
        big = {"role": "tool", "content": "x" * (17 * 2**20)}
        with pytest.raises(ValueError) as e:
            await s.add_items([user("small"), big])
        assert "item 1 of the batch" in str(e.value) and "16777216" in str(e.value)
        assert "oa/t/" not in str(e.value)                    # no internal key
        with pytest.raises(ValueError, match="item 0 of the batch"):
            await s.add_items([{"n": 2**64}])
        assert await s.get_items() == []                      # nothing of either batch
        await s.add_items([user("small")])
        with pytest.raises(ValueError, match="item 2 of the batch"):
            await s._atomic_replace_items([user("a"), user("b"), big])
        assert await s.get_items() == [user("small")]
    run(go())
    assert "16 MiB" in oa.__doc__ and "64 bits" in oa.__doc__


# ---- branch arguments of the wrong type -------------------------------------------------------
def test_branch_arguments_that_are_not_str_raise_a_clear_type_error(store):
    async def go():
        s = WalstoreSession("t", store)
        with pytest.raises(TypeError, match="branch_id must be a str, not NoneType"):
            await s.switch_to_branch(None)
        with pytest.raises(TypeError, match="branch_id must be a str, not int"):
            await s.get_conversation_turns(5)
        with pytest.raises(TypeError, match="branch must be a str, not bytes"):
            await s.get_items(branch=b"main")
    run(go())


# ---- erase ----------------------------------------------------------------------------------
def test_erase_removes_the_session_from_every_file_and_its_restore_points(tmp_path):
    path = str(tmp_path / "s")

    async def go():
        store = walstore.open(path, compensators={"unbook": lambda a: None})
        s = WalstoreSession("user-42", store)
        other = WalstoreSession("user-4", store)
        nested = WalstoreSession("x", store, namespace="oa/user-42:/")
        await s.restore_point("before-POINTMARKER")
        await s.add_items([user("book a room for ITEMMARKER")])
        await s.create_branch_from_turn(1, "BRANCHMARKER")
        await s.add_items([user("again ITEMMARKER")])
        with store.transaction() as tx:
            with tx.action("book", args={"guest": "kept"}, compensate="unbook",
                           scope=s.scope) as act:
                act.result = {"room": 1}
            tx.put(s.key("booking"), "KEYMARKER")
        await other.add_items([user("other")])
        await other.restore_point("other-point")
        await nested.add_items([user("nested")])
        for _ in range(3):
            await s.add_items([user("more ITEMMARKER")])
            await s.pop_item()
        await s.erase()
        store.checkpoint()
        assert await s.get_items() == [] and await s.restore_points() == {}
        assert await s.current_branch() == "main"
        assert [b["branch_id"] for b in await s.list_branches()] == ["main"]
        assert store.get(s.key("booking")) is None
        assert list(store.scan(prefix=s.scope)) == []
        assert await other.get_items() == [user("other")]             # others untouched
        assert list(await other.restore_points()) == ["other-point"]
        assert await nested.get_items() == [user("nested")]
        await s.add_items([user("new")])                               # still usable
        assert await s.get_items() == [user("new")]
        store.close()
    run(go())
    for marker in (b"ITEMMARKER", b"KEYMARKER", b"POINTMARKER", b"BRANCHMARKER"):
        hits = [f for f in Path(path).rglob("*") if f.is_file() and marker in f.read_bytes()]
        assert hits == [], (marker, hits)
    with walstore.open(path) as store:                                 # and after reopening
        assert run(WalstoreSession("user-42", store).get_items()) == [user("new")]
        assert run(WalstoreSession("user-4", store).get_items()) == [user("other")]


def test_a_name_that_is_not_utf8_text_is_a_value_error_naming_the_argument(tmp_path):
    # (probe-oai: a lone surrogate in a branch or restore point name escaped as a bare
    # UnicodeEncodeError from the key's encoding, naming neither the argument nor the
    # problem; SQLiteSession's is a ValueError too, so this one stays one)
    store = walstore.open(str(tmp_path / "s"), durability="none")
    s = WalstoreSession("A", store)
    run(s.add_items([{"role": "user", "content": "1"}, {"role": "user", "content": "2"}]))
    for label, call in [("branch_id", lambda: s.switch_to_branch("x\ud800")),
                        ("branch", lambda: s.get_items(branch="x\ud800")),
                        ("branch name", lambda: s.create_branch_from_turn(2, "x\ud800")),
                        ("restore point name", lambda: s.restore_point("x\ud800"))]:
        with pytest.raises(ValueError) as ei:
            run(call())
        assert not isinstance(ei.value, UnicodeError), label
        assert label in str(ei.value) and "UTF-8" in str(ei.value), str(ei.value)
    assert [i["content"] for i in run(s.get_items())] == ["1", "2"]
    store.close()
