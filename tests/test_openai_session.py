"""WalstoreSession (walstore.integrations.openai_agents) against the OpenAI Agents SDK.

Differential: random operation sequences on WalstoreSession and the SDK's SQLiteSession
(and, for branches, AdvancedSQLiteSession) with identical observations after every step.
Crash safety with a real child process killed by SIGKILL; concurrency from asyncio tasks
and threads; restore points, rewind and branches; the SDK's Runner driving the session
with a scripted model, and the example.  Skipped without ``openai-agents`` installed; the
rewind tests are skipped until the store has scoped rewind (``store.rewind(scope=)``).
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("agents")

import walstore  # noqa: E402
from agents.extensions.memory.advanced_sqlite_session import AdvancedSQLiteSession  # noqa: E402
from agents.memory import Session, SessionSettings, SQLiteSession  # noqa: E402

from walstore.integrations.openai_agents import WalstoreSession  # noqa: E402
from store_support import run_beside  # noqa: E402

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


def assistant(text):
    return {"role": "assistant", "content": text}


# ---- the protocol ------------------------------------------------------------------------------
def test_is_an_sdk_session(store):
    s = WalstoreSession("t", store)
    assert isinstance(s, Session)
    assert s.session_id == "t"
    assert s.session_settings == SessionSettings()          # SQLiteSession's default
    s2 = WalstoreSession("t", store, session_settings={"limit": 3})
    assert s2.session_settings == SessionSettings(limit=3)


def test_core_does_not_import_the_sdk():
    code = ("import sys, walstore, walstore.integrations, walstore.cli; "
            "assert 'agents' not in sys.modules, 'walstore imported the SDK'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_items_round_trip_like_sqlite(store, tmp_path):
    """What comes back is what SQLiteSession gives back (a JSON round trip), not the input."""
    item = {"role": "user", "content": [{"type": "input_text", "text": "hé ✓"}],
            "n": (1, 2), "m": {1: "int key"}, "f": 1.5, "b": True, "z": None}
    ref = SQLiteSession("t", tmp_path / "ref.db")

    async def go():
        s = WalstoreSession("t", store)
        await s.add_items([item])
        await ref.add_items([item])
        return await s.get_items(), await ref.get_items()
    mine, theirs = run(go())
    assert mine == theirs == [{"role": "user", "content": [{"type": "input_text",
                                                            "text": "hé ✓"}],
                               "n": [1, 2], "m": {"1": "int key"}, "f": 1.5, "b": True,
                               "z": None}]
    ref.close()


def test_items_with_a_lone_surrogate_round_trip_like_sqlite(store, tmp_path):
    """A string cut inside a UTF-16 pair (a lone surrogate), which SQLiteSession's escaped
    JSON keeps, was refused by msgpack's UTF-8 ("surrogates not allowed"): add_items
    raised ValueError and nothing was added.  It comes back as SQLiteSession gives it,
    also copied into a branch, and the items stored before stay as they were."""
    plain = user("before")
    cut = {"role": "assistant", "content": "emoji cut in half: \ud83d",
           "\udc00key": ["\ude00\ud83d", "pair \ud83d\ude00"]}
    ref = SQLiteSession("t", tmp_path / "ref.db")

    async def go():
        s = WalstoreSession("t", store)
        await s.add_items([plain])
        await s.add_items([cut, user("after")])
        await ref.add_items([plain, cut, user("after")])
        mine, theirs = await s.get_items(), await ref.get_items()
        await s.create_branch_from_turn(2)
        await s.add_items([cut])
        return mine, theirs, await s.get_items(), await s.get_conversation_turns()
    mine, theirs, branch, turns = run(go())
    assert mine == theirs and theirs[1]["content"] == "emoji cut in half: \ud83d"
    assert theirs[1]["\udc00key"] == ["\ude00\ud83d", "pair \U0001f600"]
    assert branch == [theirs[0], theirs[1], theirs[1]]
    assert turns == [{"turn": 1, "content": "before"}]
    assert store.get("oa/t/i/main/00000000000000000001") == plain  # (still a map)
    ref.close()


# ---- differential against SQLiteSession -----------------------------------------------------
SESSION_IDS = ["alpha", "beta/1", "beta", "gamma"]   # "beta/1" must not fall under "beta"'s keys
SETTINGS = {"gamma": SessionSettings(limit=2)}


def random_item(rng: random.Random):
    kind = rng.random()
    text = "".join(rng.choice("abc xyz é✓\n\"'") for _ in range(rng.randint(0, 12)))
    if kind < 0.35:
        return user(text)
    if kind < 0.6:
        return {"id": f"msg_{rng.randint(0, 99)}", "type": "message", "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
    if kind < 0.75:
        return {"type": "function_call", "call_id": f"call_{rng.randint(0, 99)}",
                "name": "tool", "arguments": '{"x": %d}' % rng.randint(-5, 5)}
    if kind < 0.85:
        return {"type": "function_call_output", "call_id": "c", "output": text,
                "extra": {rng.randint(0, 3): (rng.random(), [None, False])}}
    if kind < 0.9:
        return text                                   # not a dict: both keep it as is
    if kind < 0.95:
        return {"role": "user", "content": text, "big": rng.randint(-2**63, 2**63 - 1)}
    return {"role": "system", "content": text, "bad": {1, 2}}   # not JSON: TypeError


async def observe(coro):
    try:
        return ("ok", await coro)
    except Exception as e:   # the exception type is the observation
        return ("raise", type(e).__name__)


@pytest.mark.parametrize("seed", range(6))
def test_differential_against_sqlite_session(store, tmp_path, seed):
    rng = random.Random(seed)
    ref_db = tmp_path / "ref.db"
    mine = {sid: WalstoreSession(sid, store, session_settings=SETTINGS.get(sid))
            for sid in SESSION_IDS}
    theirs = {sid: SQLiteSession(sid, ref_db, session_settings=SETTINGS.get(sid))
              for sid in SESSION_IDS}
    trace = []

    async def go():
        for step in range(160):
            sid = rng.choice(SESSION_IDS)
            op = rng.choices(["add", "get", "pop", "clear"], weights=[50, 30, 15, 3])[0]
            if step in (80, 120):   # at least two clears, whatever the seed
                op = "clear"
            if op == "add":
                items = [random_item(rng) for _ in range(rng.choice([0, 1, 1, 2, 3, 5]))]
                args = (items,)
            elif op == "get":
                size = len(await theirs[sid].get_items(-1))
                args = (rng.choice([None, 0, -1, -7, 1, 2, size, size + 1, size + 9,
                                    rng.randint(1, 6)]),)
            else:
                args = ()
            method = {"add": "add_items", "get": "get_items", "pop": "pop_item",
                      "clear": "clear_session"}[op]
            trace.append((step, sid, method, args))
            a = await observe(getattr(mine[sid], method)(*args))
            b = await observe(getattr(theirs[sid], method)(*args))
            assert a == b, trace[-5:]
            for other in SESSION_IDS:    # every session, after every step
                assert (await mine[other].get_items(-1)
                        == await theirs[other].get_items(-1)), (other, trace[-5:])
                assert await mine[other].get_items() == await theirs[other].get_items()
    run(go())
    for s in theirs.values():
        s.close()


def test_closed_session_refuses_like_sqlite(store, tmp_path):
    mine, theirs = WalstoreSession("t", store), SQLiteSession("t", tmp_path / "ref.db")

    async def go():
        for s in (mine, theirs):
            await s.add_items([user("a")])
            s.close()
        for name, args in [("add_items", ([],)), ("add_items", ([user("b")],)),
                           ("get_items", ()), ("pop_item", ()), ("clear_session", ())]:
            a = await observe(getattr(mine, name)(*args))
            b = await observe(getattr(theirs, name)(*args))
            assert a == b == ("raise", "RuntimeError"), name
    run(go())
    assert run(WalstoreSession("t", store).get_items()) == [user("a")]   # the store is open


def test_session_keys_all_under_one_prefix(store):
    async def go():
        a, b = WalstoreSession("a", store), WalstoreSession("a/b", store)
        await a.add_items([user("1"), assistant("2"), user("3")])
        await b.add_items([user("x")])
        await a.create_branch_from_turn(2, "alt")
        await a.add_items([user("3'")])
        await a.clear_session()
        return a, b
    a, b = run(go())
    assert a.scope == "oa/a/" and b.scope == "oa/a%2Fb/"
    assert not b.scope.startswith(a.scope)
    assert list(store.scan(prefix=a.scope)) == []            # cleared: nothing of a left
    assert [k for k, _v in store.scan()] == [b.scope + "i/main/" + "1".zfill(20)]


def test_long_and_non_ascii_session_ids_work_like_sqlite(store):
    """An id whose percent-encoding would push the keys past walstore's 500-byte limit
    (600 ASCII characters, 160 CJK ones) works as with SQLiteSession: its prefix is a
    digest ('#' + SHA-256: never an encoded id); shorter ids keep their readable prefix."""
    from agents import SQLiteSession

    async def go(sid):
        w, q = WalstoreSession(sid, store), SQLiteSession(sid)
        for s in (w, q):
            await s.add_items([user("hi"), assistant("hello")])
            await s.pop_item()
        return w, await w.get_items(), await q.get_items()
    seen = set()
    for sid in ("u" * 600, "日" * 160, "user-" + "x" * 480, "u" * 599, "short/日"):
        w, mine, theirs = run(go(sid))
        assert mine == theirs == [user("hi")], sid
        assert w.scope not in seen
        seen.add(w.scope)
        assert len(w.scope.encode()) <= 200
    assert run(go("short/日"))[0].scope == "oa/short%2F%E6%97%A5/"
    assert run(go("u" * 600))[0].scope.startswith("oa/#")


# ---- pop_items -----------------------------------------------------------------------------
def test_pop_items_is_one_transaction(store):
    s = WalstoreSession("t", store)

    async def go():
        await s.add_items([user(str(i)) for i in range(5)])
        before = len(store.log())
        popped = await s.pop_items(3)
        assert len(store.log()) == before + 1                  # one commit for three items
        assert popped == [user("2"), user("3"), user("4")]     # oldest first
        assert await s.get_items() == [user("0"), user("1")]
        assert await s.pop_items(0) == []
        assert await s.pop_items(10) == [user("0"), user("1")]
        assert await s.pop_items(1) == [] and await s.pop_item() is None
        with pytest.raises(ValueError):
            await s.pop_items(-1)
        with pytest.raises(TypeError):
            await s.pop_items(1.0)
    run(go())


def test_compaction_replaces_the_history_in_one_transaction(store):
    # (probe 32: without the SDK's replacement hook, its compaction session cleared the
    # history and added the compacted one in two calls: a crash between lost it all)
    from agents.memory.openai_responses_compaction_session import (
        OpenAIResponsesCompactionSession)
    s = WalstoreSession("t", store)
    other = WalstoreSession("u", store)
    compacting = OpenAIResponsesCompactionSession("t", s, client=object())

    async def go():
        await s.add_items([user(str(i)) for i in range(6)])
        await s.create_branch_from_turn(2, "alt")
        await other.add_items([user("keep")])
        before = len(store.log())
        await compacting._replace_underlying_session_items(
            output_items=[assistant("summary"), user("5")], previous_items=await s.get_items())
        assert len(store.log()) == before + 1  # one commit: no empty history in between
        assert await s.get_items() == [assistant("summary"), user("5")]
        assert [b["branch_id"] for b in await s.list_branches()] == ["main"]
        assert await other.get_items() == [user("keep")]
        await s.add_items([user("next")])
        assert await s.get_items() == [assistant("summary"), user("5"), user("next")]
        with pytest.raises(TypeError):  # nothing replaced when an item cannot be stored
            await s._atomic_replace_items([{"x": object()}])
        assert len(await s.get_items()) == 3

        class Mine(WalstoreSession):  # may store items its own way: the SDK falls back
            pass
        assert await Mine("v", store)._atomic_replace_items([user("x")]) is False
    run(go())


def _exchange_item(i):
    return [{"type": "message", "role": "user", "content": f"q{i}"},
            {"type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": f"a{i}", "annotations": []}]}]


async def _auto_compact(session, model_items, during=None):
    """One automatic compaction by the SDK's own OpenAIResponsesCompactionSession over
    ``session`` (a fake ``responses.compact``: no network), as Runner starts it after a turn
    whose model exchange held ``model_items``; ``during()`` runs while the request is in
    flight.  Returns the items the fake API was sent."""
    import types
    from agents.memory.openai_responses_compaction_session import (
        OpenAIResponsesCompactionSession)
    from agents.run_internal.items import digest_input_item
    sent = []

    class Responses:
        async def compact(self, **kw):
            sent.append(kw.get("input"))
            if during is not None:
                await during()
            return types.SimpleNamespace(output=[{"type": "message", "role": "user",
                                                  "content": "summary"}], usage=None)
    comp = OpenAIResponsesCompactionSession(
        "c", session, client=types.SimpleNamespace(responses=Responses()),
        should_trigger_compaction=lambda ctx: True)
    wrapper = types.SimpleNamespace(
        _session_compaction_is_automatic=True, usage=None,
        _session_compaction_model_exchange=(
            tuple(digest_input_item(i) for i in model_items), None))
    await comp._run_compaction({"response_id": "resp_1", "compaction_mode": "input"},
                               wrapper=wrapper)
    return sent


@pytest.mark.parametrize("window", ["whole", "suffix"])
def test_automatic_compaction_keeps_an_item_added_while_it_ran_like_sqlite(
        store, tmp_path, window):
    # (probe-openai: without _get_compaction_snapshot the SDK fell back to
    # _atomic_replace_items, which replaced the whole history blindly: an item another
    # session object added while the compaction request was in flight was deleted.
    # SQLiteSession's snapshot compares the stored suffix and skips the replacement.)
    history = [it for i in range(6) for it in _exchange_item(i)]
    model = history if window == "whole" else history[-4:]

    async def scenario(make):
        base, other = make(), make()
        await base.add_items(history)
        await _auto_compact(base, model,
                            during=lambda: other.add_items([user("CONCURRENT")]))
        return await base.get_items()

    async def go():
        db = str(tmp_path / "x.db")
        expected = await scenario(lambda: SQLiteSession("c", db))
        assert expected == history + [user("CONCURRENT")]   # SQLite skips the replacement
        before = len(store.log())
        got = await scenario(lambda: WalstoreSession("c", store))
        assert got == expected
        assert len(store.log()) == before + 2   # the two add_items; the refusal wrote nothing
    run(go())


@pytest.mark.parametrize("window", ["whole", "suffix"])
def test_automatic_compaction_replaces_the_suffix_in_one_transaction_like_sqlite(
        store, tmp_path, window):
    history = [it for i in range(6) for it in _exchange_item(i)]
    model = history if window == "whole" else history[-4:]

    async def scenario(session):
        await session.add_items(history)
        sent = await _auto_compact(session, model)
        await session.add_items([user("next")])
        return sent, await session.get_items()

    async def go():
        expected = await scenario(SQLiteSession("c", str(tmp_path / "x.db")))
        summary = {"type": "message", "role": "user", "content": "summary"}
        kept = [] if window == "whole" else history[:-4]
        assert expected[1] == kept + [summary, user("next")]
        s = WalstoreSession("c", store)
        log = len(store.log())
        assert await scenario(s) == expected
        assert len(store.log()) == log + 3      # add, ONE replacing commit, add
        assert [t.meta for t in store.log()[-3:]][1] == {"openai_session": "c",
                                                         "op": "compact_items"}
    run(go())


def test_compaction_snapshot_refuses_a_changed_branch_or_suffix(store):
    s = WalstoreSession("t", store)

    async def go():
        await s.add_items([user(str(i)) for i in range(5)])
        snap = await s._get_compaction_snapshot(3)
        assert snap.items == [user("2"), user("3"), user("4")] and snap.complete is False
        whole = await s._get_compaction_snapshot(10)
        assert whole.complete is True and len(whole.items) == 5
        assert (await s._get_compaction_snapshot(5)).complete is True
        # another branch made current meanwhile: refused, nothing changes
        await s.create_branch_from_turn(5, "alt")
        assert await snap.replace_suffix(0, [user("S")]) is False
        await s.switch_to_branch("main")
        assert await s.get_items() == [user(str(i)) for i in range(5)]
        # the newest item popped and added back equal: the history is the same, replaced
        await s.add_items([await s.pop_item()])
        assert await snap.replace_suffix(1, [user("S")]) is True
        assert await s.get_items() == [user("0"), user("1"), user("2"), user("S")]
        assert await snap.replace_suffix(1, [user("T")]) is False   # the suffix changed
        assert await snap.replace_suffix(3, [user("T")]) is False   # nothing to replace
        assert await s.get_items(branch="alt") == [user(str(i)) for i in range(4)]
        # prune_prefix drops the oldest items it approves, up to the first it refuses
        snap = await s._get_compaction_snapshot(1, prune_prefix=lambda i: i["content"] != "2")
        with pytest.raises(TypeError):   # an unstorable item: nothing replaced
            await snap.replace_suffix(0, [{"x": object()}])
        assert await snap.replace_suffix(0, [user("U")]) is True
        assert await s.get_items() == [user("2"), user("U")]

        class Mine(WalstoreSession):   # may store items its own way: the SDK falls back
            pass
        assert await Mine("v", store)._get_compaction_snapshot(3) is None
    run(go())


def test_add_items_is_one_transaction_and_all_or_nothing(store):
    s = WalstoreSession("t", store)

    async def go():
        await s.add_items([user("0")])
        n = len(store.log())
        await s.add_items([user(str(i)) for i in range(1, 50)])
        assert len(store.log()) == n + 1
        with pytest.raises(TypeError):
            await s.add_items([user("ok"), {"bad": object()}])
        with pytest.raises(ValueError):                       # an int msgpack cannot hold
            await s.add_items([user("ok"), {"big": 2**70}])
        assert len(await s.get_items()) == 50
    run(go())


# ---- crash safety: a real process killed with SIGKILL ---------------------------------------
CHILD = r"""
import asyncio, sys, walstore
from walstore.integrations.openai_agents import WalstoreSession

async def main(path):
    store = walstore.open(path, durability="full")
    s = WalstoreSession("crash", store)
    i = len(await s.get_items()) // 3
    while True:
        await s.add_items([{"role": "user", "content": f"{i}.{j}", "pad": "x" * 300}
                           for j in range(3)])
        print(i, flush=True)
        i += 1

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("round_", range(3))
def test_kill_9_keeps_every_acknowledged_add_whole(tmp_path, round_):
    path = str(tmp_path / "store")
    rng = random.Random(round_)
    acked = -1
    for _life in range(2):   # kill, reopen, continue, kill again
        proc = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ))
        want = acked + rng.randint(5, 40)
        try:
            while acked < want:
                line = proc.stdout.readline()
                assert line, f"child died: {proc.wait()}"
                acked = int(line)
            time.sleep(rng.random() * 0.02)   # land the kill anywhere in the next add
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        acked = max([acked] + [int(x) for x in proc.stdout.read().split()])
        proc.stdout.close()
        store = walstore.open(path)
        try:
            items = run(WalstoreSession("crash", store).get_items())
        finally:
            store.close()
        contents = [item["content"] for item in items]
        batches = len(contents) // 3
        assert len(contents) == 3 * batches, "a partial add is visible"
        assert contents == [f"{i}.{j}" for i in range(batches) for j in range(3)]
        assert acked + 1 <= batches <= acked + 2   # every ack; at most the one in flight
        acked = batches - 1


# ---- concurrency --------------------------------------------------------------------------------
def check_batches(items, writers, batches, per_batch):
    """Every (writer, batch) present once, whole and in order; each writer's batches ordered."""
    tags = [tuple(item["content"].split(".")) for item in items]
    assert len(tags) == writers * batches * per_batch
    assert len(set(tags)) == len(tags), "duplicated item"
    seen: dict[str, int] = {}
    for i in range(0, len(tags), per_batch):
        chunk = tags[i:i + per_batch]
        w, b = chunk[0][0], chunk[0][1]
        assert chunk == [(w, b, str(j)) for j in range(per_batch)], "interleaved batch"
        assert int(b) == seen.get(w, -1) + 1, "a writer's batches out of order"
        seen[w] = int(b)


def test_concurrent_asyncio_tasks_one_session(tmp_path):
    store = walstore.open(str(tmp_path / "store"), durability="normal")
    s = WalstoreSession("busy", store)

    async def writer(w):
        for b in range(10):
            await s.add_items([user(f"{w}.{b}.{j}") for j in range(3)])

    async def go():
        await asyncio.gather(*(writer(w) for w in range(8)))
        return await s.get_items()
    try:
        check_batches(run(go()), 8, 10, 3)
    finally:
        store.close()


def test_concurrent_threads_session_objects_and_a_conflicting_writer(store, monkeypatch):
    """Threads with their own event loop and session object, plus raw transactions writing
    the session's head key: adds that conflict are retried, never lost or doubled."""
    conflicts = []
    real_commit = walstore.Transaction.commit

    def counting_commit(tx):
        try:
            return real_commit(tx)
        except walstore.ConflictError:
            conflicts.append(tx.id)
            raise

    stop = threading.Event()
    head = WalstoreSession("busy", store)._head_key()

    def meddler():   # another writer of the session, e.g. a session object elsewhere
        for _ in range(2000):
            if stop.is_set():
                break
            store.run(lambda tx: tx.put(head, "main"))
            time.sleep(0.002)

    def writer(w):
        s = WalstoreSession("busy", store)

        async def go():
            for b in range(12):
                await s.add_items([user(f"{w}.{b}.{j}") for j in range(4)])
        asyncio.run(go())

    monkeypatch.setattr(walstore.Transaction, "commit", counting_commit)
    run_beside([threading.Thread(target=writer, args=(w,)) for w in range(4)],
               threading.Thread(target=meddler), stop)
    check_batches(run(WalstoreSession("busy", store).get_items()), 4, 12, 4)
    print(f"{len(conflicts)} optimistic conflicts retried")


def test_concurrent_adds_and_pops(store):
    s = WalstoreSession("q", store)
    popped = []

    async def go():
        async def add(w):
            for b in range(15):
                await s.add_items([user(f"{w}.{b}")])

        async def pop():
            for _ in range(25):
                item = await s.pop_item()
                if item is not None:
                    popped.append(item["content"])
                await asyncio.sleep(0)
        await asyncio.gather(add(0), add(1), add(2), pop(), pop())
        return [i["content"] for i in await s.get_items()]
    left = run(go())
    everything = left + popped
    assert sorted(everything) == sorted(f"{w}.{b}" for w in range(3) for b in range(15))
    for w in range(3):   # what is left of a writer keeps its order
        mine = [int(c.split(".")[1]) for c in left if c.startswith(f"{w}.")]
        assert mine == sorted(mine)


def test_cancelled_add_still_lands_like_sqlite(store, tmp_path):
    async def cancelled_add(session):
        task = asyncio.ensure_future(session.add_items([user("x")]))
        await asyncio.sleep(0)          # the write is under way in its worker thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await session.get_items()
    ref = SQLiteSession("t", tmp_path / "ref.db")
    assert run(cancelled_add(WalstoreSession("t", store))) == run(cancelled_add(ref)) \
        == [user("x")]
    ref.close()


# ---- restore points -----------------------------------------------------------------------------
def test_a_cancelled_restore_point_or_drop_is_settled_when_the_caller_hears_of_it(
        store, monkeypatch):
    """restore_point / drop_restore_point are mutations: a cancelled one finishes before
    the CancelledError reaches the caller (it ran in to_thread alone: the caller heard
    "cancelled" and the point was made, or dropped, a moment later)."""
    for verb in ("restore_point", "drop_restore_point"):
        real = getattr(store, verb)

        def slow(name, real=real):
            time.sleep(0.2)      # the store work outlives the cancellation
            return real(name)
        monkeypatch.setattr(store, verb, slow)

    async def go():
        s = WalstoreSession("a", store)
        for verb, exists_after in (("restore_point", True), ("drop_restore_point", False)):
            task = asyncio.ensure_future(getattr(s, verb)("p"))
            await asyncio.sleep(0.02)           # under way in its worker thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ("p" in await s.restore_points()) is exists_after, verb
    run(go())


def test_restore_points_are_per_session(store):
    async def go():
        a, b = WalstoreSession("a", store), WalstoreSession("b", store)
        pa = await a.restore_point("p")
        await a.add_items([user("1")])
        pb = await b.restore_point("p")
        assert isinstance(pa, walstore.LSN) and pb > pa
        assert await a.restore_points() == {"p": pa}
        assert await b.restore_points() == {"p": pb}
        assert set(store.restore_points()) == {"oa/a/p", "oa/b/p"}
        await a.drop_restore_point("p")
        assert await a.restore_points() == {} and await b.restore_points() == {"p": pb}
        with pytest.raises(KeyError):
            await a.drop_restore_point("p")
        with pytest.raises(ValueError):
            await a.restore_point("")
    run(go())


# ---- rewind (needs the store's scoped rewind) -------------------------------------------------
def book(store, session, what):
    """A tool's transaction: a booking action declared in the session's scope."""
    with store.transaction() as tx:
        with tx.action("book", args={"what": what}, compensate="cancel",
                       scope=session.scope) as act:
            act.result = {"booking": what}
        tx.put(session.key(f"bookings/{what}"), "confirmed")
        tx.put(f"hotel-ledger/{what}", "confirmed")   # outside every session


def test_rewind_retracts_one_session_and_compensates_its_tools(store):
    cancelled = []
    store.compensator("cancel")(lambda action: cancelled.append(action.result["booking"]))

    async def go():
        a, b = WalstoreSession("a", store), WalstoreSession("b", store)
        await a.add_items([user("hi"), assistant("hello")])
        await b.add_items([user("b1")])
        await a.restore_point("before-turn-2")
        book(store, a, "oslo")
        await a.add_items([user("book oslo"), assistant("booked 3 nights")])
        book(store, b, "rome")
        await b.add_items([user("book rome"), assistant("booked")])
        b_items = await b.get_items()

        plan = await a.rewind("before-turn-2", dry_run=True)
        assert plan is not None
        assert len(await a.get_items()) == 4 and cancelled == []   # a plan changes nothing

        info = await a.rewind("before-turn-2")
        assert isinstance(info, walstore.TxnInfo)
        assert await a.get_items() == [user("hi"), assistant("hello")]
        assert cancelled == ["oslo"]                              # a's booking, not b's
        assert store.get(a.key("bookings/oslo")) is None
        assert await b.get_items() == b_items                     # b untouched
        assert store.get(b.key("bookings/rome")) == "confirmed"
        assert store.get("hotel-ledger/oslo") == "confirmed"      # outside the scope: stays
        assert await a.rewind("before-turn-2") is None            # nothing more to undo
    run(go())


def test_rewind_while_another_session_writes(store):
    """A rewind racing another session's commits retries or does not conflict; either way
    the other session keeps every item and this one is back at its point."""
    async def go():
        a, b = WalstoreSession("a", store), WalstoreSession("b", store)
        await a.add_items([user("keep")])
        await a.restore_point("p")
        await a.add_items([user(f"drop {i}") for i in range(20)])

        async def b_writes():
            for i in range(40):
                await b.add_items([user(f"b {i}")])
        writer = asyncio.ensure_future(b_writes())
        await asyncio.sleep(0)
        await a.rewind("p")
        await writer
        assert await a.get_items() == [user("keep")]
        assert [i["content"] for i in await b.get_items()] == [f"b {i}" for i in range(40)]
    run(go())


def test_rewind_restores_branches_and_the_current_branch(store):
    async def go():
        s = WalstoreSession("a", store)
        await s.add_items([user("1"), assistant("1a"), user("2"), assistant("2a")])
        await s.restore_point("p")
        await s.create_branch_from_turn(2, "alt")
        await s.add_items([user("2'")])
        await s.rewind("p")
        assert await s.current_branch() == "main"
        assert [b["branch_id"] for b in await s.list_branches()] == ["main"]
        assert len(await s.get_items()) == 4
    run(go())


def test_rewind_to_txid_and_lsn_and_unknown_points(store):
    async def go():
        s = WalstoreSession("a", store)
        await s.add_items([user("1")])
        lsn = store.log(limit=1)[0].lsn
        txid = store.log(limit=1)[0].txid
        await s.add_items([user("2")])
        await s.rewind(walstore.LSN(lsn))
        assert await s.get_items() == [user("1")]
        await s.add_items([user("3")])
        await s.rewind(txid)
        assert await s.get_items() == [user("1")]
        other = WalstoreSession("b", store)
        await other.restore_point("only-b")
        with pytest.raises(KeyError) as e:                # walstore.UnknownPoint
            await s.rewind("only-b")                       # b's point is not a's
        assert "oa/a/only-b" in str(e.value)
    run(go())


# ---- branches ---------------------------------------------------------------------------------
CONVERSATION = [user("1"), assistant("1a"), {"type": "function_call", "name": "t"},
                user("2"), assistant("2a"), user("3"), assistant("3a")]


def test_branch_from_turn_switch_list_delete(store):
    async def go():
        s = WalstoreSession("c", store)
        await s.add_items(CONVERSATION)
        assert [t["turn"] for t in await s.get_conversation_turns()] == [1, 2, 3]
        name = await s.create_branch_from_turn(2, "retry-2")
        assert name == "retry-2" and await s.current_branch() == "retry-2"
        assert await s.get_items() == CONVERSATION[:3]         # before turn 2's user message
        await s.add_items([user("2 again"), assistant("better")])
        assert await s.get_items(branch="main") == CONVERSATION
        auto = await s.create_branch_from_turn(1)               # from the branch we are on
        assert auto.startswith("branch_from_turn_1_") and await s.get_items() == []
        branches = {b["branch_id"]: b for b in await s.list_branches()}
        assert list(branches) == ["main", "retry-2", auto]
        assert branches["main"]["message_count"] == 7 and branches["main"]["user_turns"] == 3
        assert branches["retry-2"]["message_count"] == 5
        assert branches["retry-2"]["from_branch"] == "main"
        assert branches[auto]["is_current"] and not branches["main"]["is_current"]

        for bad in [lambda: s.create_branch_from_turn(9),
                    lambda: s.create_branch_from_turn(1, "retry-2"),
                    lambda: s.create_branch_from_turn(1, "main"),
                    lambda: s.create_branch_from_turn(1, " "),
                    lambda: s.create_branch_from_turn(0),
                    lambda: s.switch_to_branch("nope"),
                    lambda: s.delete_branch("main"),
                    lambda: s.delete_branch(auto),                # current, no force
                    lambda: s.delete_branch("nope")]:
            with pytest.raises(ValueError):
                await bad()
        with pytest.raises(TypeError):
            await s.create_branch_from_turn(True)
        await s.switch_to_branch("retry-2")
        assert (await s.pop_item()) == assistant("better")
        assert await s.get_items(branch="main") == CONVERSATION    # a pop stays in its branch
        await s.delete_branch("retry-2", force=True)
        assert await s.current_branch() == "main"
        assert [b["branch_id"] for b in await s.list_branches()] == ["main", auto]
        await s.create_branch_from_turn(3, "retry-2")               # a deleted name is free
        await s.clear_session()
        assert await s.current_branch() == "main"
        assert [b["branch_id"] for b in await s.list_branches()] == ["main"]
        assert await s.get_items() == []
    run(go())


def test_branch_names_with_slashes_stay_apart(store):
    async def go():
        s = WalstoreSession("c", store)
        await s.add_items([user("1"), user("2")])
        await s.create_branch_from_turn(2, "x")
        await s.add_items([user("x-2")])
        await s.switch_to_branch("main")
        await s.create_branch_from_turn(2, "x/i")
        await s.add_items([user("xi-2")])
        assert await s.get_items(branch="x") == [user("1"), user("x-2")]
        assert await s.get_items(branch="x/i") == [user("1"), user("xi-2")]
        await s.delete_branch("x")
        assert await s.get_items(branch="x/i") == [user("1"), user("xi-2")]
    run(go())


@pytest.mark.parametrize("seed", range(3))
def test_branches_differential_against_advanced_sqlite_session(store, tmp_path, seed):
    """Branching from a turn, switching, adding and popping: the items every branch holds
    match AdvancedSQLiteSession's."""
    rng = random.Random(seed)
    mine = WalstoreSession("d", store)
    theirs = AdvancedSQLiteSession(session_id="d", db_path=tmp_path / "adv.db",
                                   create_tables=True)
    names = ["main"]

    async def go():
        counter = 0
        for step in range(60):
            op = rng.choices(["add", "pop", "branch", "switch"], weights=[10, 3, 2, 2])[0]
            if op == "add":
                counter += 1
                items = [user(f"u{counter}") if rng.random() < 0.5 else assistant(f"a{counter}")
                         for _ in range(rng.randint(1, 3))]
                await mine.add_items(items)
                await theirs.add_items(items)
            elif op == "pop":
                assert await mine.pop_item() == await theirs.pop_item()
            elif op == "branch":
                turns = await theirs.get_conversation_turns()
                assert [t["turn"] for t in await mine.get_conversation_turns()] \
                    == [t["turn"] for t in turns]
                if len(turns) < 2:
                    continue
                turn = rng.randint(2, len(turns))   # from turn 1 an advanced branch is empty
                name = f"b{step}"                    # and so does not exist for it
                assert await mine.create_branch_from_turn(turn, name) == \
                    await theirs.create_branch_from_turn(turn, name)
                names.append(name)
            else:
                name = rng.choice(names)
                try:
                    await theirs.switch_to_branch(name)
                except ValueError:   # an advanced branch without items does not exist
                    assert await theirs.get_items(branch_id=name) == []
                    continue
                await mine.switch_to_branch(name)
            assert await mine.get_items() == await theirs.get_items(), (step, op)
        for name in names:
            assert await mine.get_items(branch=name) == await theirs.get_items(branch_id=name)
        counts = {b["branch_id"]: (b["message_count"], b["user_turns"])
                  for b in await theirs.list_branches()}
        assert {b["branch_id"]: (b["message_count"], b["user_turns"])
                for b in await mine.list_branches() if b["branch_id"] in counts} == counts
    try:
        run(go())
    finally:
        theirs.close()


# ---- the SDK's Runner driving the session, offline --------------------------------------------
def load_example():
    spec = importlib.util.spec_from_file_location(
        "openai_agent_retract", ROOT / "examples" / "openai_agent_retract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_with_walstore_session_matches_sqlite_session(store, tmp_path):
    from agents import Agent, RunConfig, Runner, function_tool
    ex = load_example()

    @function_tool
    def weather(city: str) -> str:
        """The weather.

        Args:
            city: where.
        """
        return f"sunny in {city}"

    def script():
        return ex.ScriptedModel([[ex.say("hello", 1)],
                                 [ex.call("weather", {"city": "Oslo"}, 2)],
                                 [ex.say("It is sunny in Oslo.", 3)]])

    async def converse(session):
        model = script()
        agent = Agent(name="a", instructions="be brief", tools=[weather], model=model)
        config = RunConfig(tracing_disabled=True)
        outs = []
        for text in ["hi", "weather in Oslo?"]:
            result = await Runner.run(agent, text, session=session, run_config=config)
            outs.append((result.final_output, await session.get_items()))
        return outs, model.inputs
    ref = SQLiteSession("r", tmp_path / "ref.db")
    mine, mine_inputs = run(converse(WalstoreSession("r", store)))
    theirs, their_inputs = run(converse(ref))
    ref.close()
    assert mine == theirs
    assert mine_inputs == their_inputs            # the model saw the same history
    assert [o for o, _ in mine] == ["hello", "It is sunny in Oslo."]
    assert len(mine[1][1]) == 6                    # user, answer, user, call, output, answer


def test_example_retracts_the_wrong_turn_and_its_booking(tmp_path):
    ex = load_example()
    out = run(ex.main(str(tmp_path / "store")))
    assert [i.get("content") for i in out["after_rewind"]][:1] == \
        ["Hi, I'm planning a trip to Norway."]
    assert len(out["after_rewind"]) == 2
    assert out["hotel"]["H-1"]["status"] == "cancelled"
    assert out["hotel"]["H-2"]["status"] == "confirmed" and out["hotel"]["H-2"]["nights"] == 2
    assert list(out["booked"]) == [k for k in out["booked"] if k.endswith("bookings/H-2")] \
        and len(out["booked"]) == 1
    retried_turn_input = out["model_inputs"][3]   # the model call that answered turn 2 again
    assert "3 nights" not in str(retried_turn_input)
    assert len(out["final"]) == 6
