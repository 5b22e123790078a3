"""Audit 59 of the integrations: WalstoreSaver, WalstoreStore, WalstoreSession and the
``transaction`` package join, used as a demanding user would.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time

import pytest

import walstore


@dataclasses.dataclass
class _Stamp:
    """A graph state's own dataclass (module level: the saver rebuilds it by name)."""
    when: datetime.datetime

# (``store``: conftest's, a durability="none" store in the test's directory)


async def _max_loop_gap(work) -> tuple[float, float]:
    """(the longest the event loop went without running a 2 ms ticker while ``work()`` was
    awaited, how long ``work()`` took)."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    gaps.clear()
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done = True
    await task
    return max(gaps), took


def test_session_writes_encode_their_items_off_the_event_loop(store):
    """WalstoreSession.add_items (and the compaction hooks) ran the SDK's JSON round trip
    and walstore's size check of every item on the event loop, before handing the write to
    a worker thread: 3,000 items of 2 KB held the loop 0.25 s of the call's 0.46 s, where
    SQLiteSession encodes its rows in its worker thread (0.016 s).  Every other task of
    an agent server (other conversations, streaming) stood still meanwhile."""
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession

    items = [{"role": "user", "content": [{"type": "input_text", "text": "word " * 400,
                                           "n": i}]} for i in range(3000)]

    async def main() -> list[tuple[float, float]]:
        runs = []
        for attempt in range(5):  # (the loop thread may lose the CPU on a busy machine)
            session = WalstoreSession(f"s{attempt}", store)
            gap, took = await _max_loop_gap(lambda: session.add_items(items))
            runs.append((gap, took))
            assert len(await session.get_items()) == 3000
            snap = await session._get_compaction_snapshot(3000)
            gap2, took2 = await _max_loop_gap(lambda: snap.replace_suffix(0, items))
            runs.append((gap2, took2))
            gap3, took3 = await _max_loop_gap(lambda: session._atomic_replace_items(items))
            runs.append((gap3, took3))
            assert await session.get_items() == items
            if all(_loop_ran(g, t) for g, t in runs[-3:]):
                return runs[-3:]
        return runs[-3:]
    runs = asyncio.run(main())
    for gap, took in runs:
        # (before: the loop stood still for over half of each write, 0.25 s of 0.46 s)
        assert _loop_ran(gap, took), (f"the event loop stood still {gap:.3f} s of the "
                                      f"write's {took:.3f} s: {runs}")


def _loop_ran(gap: float, took: float) -> bool:
    """The loop ran all along: no stall over 0.1 s, or over a quarter of the call (a
    machine under load may take the CPU from the loop's thread for a while)."""
    return gap < max(0.1, 0.25 * took)


def test_session_write_of_a_bad_item_still_adds_nothing(store):
    """(With the encoding in the worker thread) an item that is not JSON data, or too big
    for one walstore value, is still refused before anything of the batch is added."""
    pytest.importorskip("agents")
    from walstore.integrations.openai_agents import WalstoreSession

    async def main() -> None:
        session = WalstoreSession("bad", store)
        await session.add_items([{"role": "user", "content": "kept"}])
        with pytest.raises(TypeError):
            await session.add_items([{"role": "user", "content": "a"}, {"x": object()}])
        with pytest.raises(ValueError, match="item 1 of the batch"):
            await session.add_items([{"a": 1}, {"n": 2 ** 70}])
        with pytest.raises(TypeError):
            await session._atomic_replace_items([{"x": {1, 2}}])
        assert await session.get_items() == [{"role": "user", "content": "kept"}]
    asyncio.run(main())


def _put_value(saver, thread: str, value):
    """Save a checkpoint whose channel ``v`` holds ``value``; its config."""
    from langgraph.checkpoint.base import empty_checkpoint
    c = empty_checkpoint()
    c["channel_values"] = {"v": value}
    c["channel_versions"] = {"v": 1}
    return saver.put({"configurable": {"thread_id": thread, "checkpoint_ns": ""}}, c, {},
                     {"v": 1})


def test_a_numpy_array_that_would_not_come_back_is_refused_at_put(store):
    """A numpy array in the graph state went through LangGraph's encoding (dtype string,
    shape, raw bytes) unchecked: an array of Python objects (dtype object) was stored as
    its pointers, and every read of the thread after it raised StateTypeError ("cannot
    create an OBJECT array from memory buffer": the thread's head could not be loaded;
    SqliteSaver gives None); a structured array came back as raw ``|V12`` void bytes, a
    masked array without its mask, a matrix as a plain array — silently.  They are now
    refused at put (StateTypeError naming the type and the recipe, nothing written); a
    datetime64/timedelta64 array, which the encoding refused with a bare "Type is not
    msgpack serializable: numpy.ndarray", comes back as itself."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("langgraph")
    from walstore.integrations.langgraph import StateTypeError, WalstoreSaver

    saver = WalstoreSaver(store)
    refused = {
        "object": np.array([{"a": 1}, "x"], dtype=object),
        "structured": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]),
        "masked": np.ma.array([1, 2, 3], mask=[0, 1, 0]),
        "nested": {"rows": [np.array([None, 1], dtype=object)]},
    }
    for name, value in refused.items():
        with pytest.raises(StateTypeError, match=r"refuses to store a numpy\.") as e:
            _put_value(saver, name, value)
        assert "allowed_types" in str(e.value)
        assert saver.get_tuple({"configurable": {"thread_id": name}}) is None  # (nothing)
    kept = {
        "datetime64": np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
        "timedelta64": np.array([1, 2], dtype="timedelta64[s]"),
        "datetime64_fortran": np.asfortranarray(
            np.array([["2020-01-01", "2021-01-01"], ["2022-01-01", "2023-01-01"]],
                     dtype="datetime64[D]")),
        "int": np.arange(6).reshape(2, 3),
        "strided": np.arange(10)[::2],
        "text": np.array(["ab", "c"]),
        "big_endian": np.array([1, 2], dtype=">i4"),
    }
    for name, value in kept.items():
        got = saver.get_tuple(_put_value(saver, name, value)).checkpoint["channel_values"]["v"]
        assert type(got) is np.ndarray and got.dtype == value.dtype, name
        assert got.shape == value.shape and (got == value).all(), name


def _lose_a_put(path: str) -> None:
    """(In a worker process) a put built on a checkpoint the thread does not have: refused
    with StaleCheckpointError."""
    from langgraph.checkpoint.base import empty_checkpoint

    from walstore.integrations.langgraph import WalstoreSaver
    with walstore.open(path, durability="none") as store:
        WalstoreSaver(store).put(
            {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                              "checkpoint_id": "1f000000-0000-6000-8000-000000000000"}},
            empty_checkpoint(), {}, {})


def _answer() -> int:
    return 42


def test_a_stale_checkpoint_error_crosses_a_process_boundary_as_itself(path):
    """StaleCheckpointError (the saver's fencing verdict) could not be pickled or copied:
    its ``__init__`` takes five arguments and pickle calls it with the message alone, so
    one raised in a ProcessPoolExecutor worker broke the whole pool — the caller got
    BrokenProcessPool ("terminated abruptly"), not the error, and every other task of the
    pool failed with it — and ``copy.copy(e)`` raised TypeError."""
    import concurrent.futures
    import copy
    import multiprocessing
    import pickle

    pytest.importorskip("langgraph")
    from walstore.integrations.langgraph import StaleCheckpointError

    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(StaleCheckpointError) as caught:
            pool.submit(_lose_a_put, path).result(timeout=120)
        assert pool.submit(_answer).result(timeout=60) == 42  # (the pool still works)
    e = caught.value
    assert (e.thread_id, e.checkpoint_ns, e.head) == ("t", "", None)
    assert e.parent == "1f000000-0000-6000-8000-000000000000"
    assert "no longer has checkpoint" in str(e)
    for again in (pickle.loads(pickle.dumps(e)), copy.copy(e), copy.deepcopy(e)):
        assert type(again) is StaleCheckpointError and str(again) == str(e)
        assert (again.thread_id, again.parent, again.head, again.keys) == \
            (e.thread_id, e.parent, e.head, e.keys)
        assert isinstance(again, walstore.ConflictError)


def test_a_datetime_in_a_daylight_saving_zone_not_zoneinfo_is_refused_at_put(store):
    """A datetime in dateutil's ``gettz("Europe/Oslo")`` (or any tzinfo but ZoneInfo whose
    offset changes over the year) went through LangGraph's ISO text and came back in a
    fixed-offset ``datetime.timezone``: the zone gone, 2026-01-15 09:00 Oslo + 180 days
    gave 09:00+01:00, not 09:00+02:00 — the silent change the ZoneInfo fix removed for
    ZoneInfo only.  It is now refused at put (StateTypeError naming the tzinfo's type and
    ZoneInfo as the way), at any depth; a fixed zone (dateutil's tzutc, tzoffset) is
    stored by its offset as before."""
    pytest.importorskip("langgraph")
    tz = pytest.importorskip("dateutil.tz")
    import datetime as dt

    from walstore.integrations.langgraph import StateTypeError, WalstoreSaver

    saver = WalstoreSaver(store)
    oslo = dt.datetime(2026, 1, 15, 9, tzinfo=tz.gettz("Europe/Oslo"))
    for name, value in {"top": oslo, "in_list": [1, {"when": oslo}],
                        "in_dataclass": _Stamp(oslo)}.items():
        with pytest.raises(StateTypeError, match=r"dateutil\.tz\.tz\.tzfile.*ZoneInfo"):
            _put_value(saver, name, value)
        assert saver.get_tuple({"configurable": {"thread_id": name}}) is None
    for name, zone in {"utc": tz.tzutc(), "offset": tz.tzoffset("X", 5400)}.items():
        value = dt.datetime(2026, 1, 15, 9, tzinfo=zone)
        got = saver.get_tuple(_put_value(saver, name, value)).checkpoint["channel_values"]["v"]
        assert got == value and got.utcoffset() == value.utcoffset()
        later = dt.timedelta(days=180)
        assert (got + later).isoformat() == (value + later).isoformat()


def test_a_datetime_in_a_named_fixed_timezone_keeps_its_name(store):
    """A datetime in ``datetime.timezone(timedelta(hours=1), "CET")`` came back in an
    unnamed timezone (LangGraph's ISO text keeps the offset only): ``tzname()`` and
    ``strftime("%Z")`` said "UTC+01:00" where they said "CET" — a user-facing "09:00 CET"
    became "09:00 UTC+01:00".  It is now written by its fields and tzinfo, as a ZoneInfo
    datetime is; an unnamed or UTC one as before."""
    pytest.importorskip("langgraph")
    from walstore.integrations.langgraph import WalstoreSaver

    saver = WalstoreSaver(store)
    cet = datetime.timezone(datetime.timedelta(hours=1), "CET")
    for name, value in {
            "named": datetime.datetime(2026, 1, 15, 9, 30, 5, 7, tzinfo=cet, fold=1),
            "nested": [{"at": datetime.datetime(2026, 1, 15, 9, tzinfo=cet)}],
            "unnamed": datetime.datetime(2026, 1, 15, 9, tzinfo=datetime.timezone(
                datetime.timedelta(hours=-3))),
            "utc": datetime.datetime(2026, 1, 15, 9, tzinfo=datetime.timezone.utc)}.items():
        got = saver.get_tuple(_put_value(saver, name, value)).checkpoint["channel_values"]["v"]
        assert got == value and repr(got) == repr(value), name
        one, back = (value, got) if name != "nested" else (value[0]["at"], got[0]["at"])
        assert back.tzname() == one.tzname() and back.strftime("%H:%M %Z") == \
            one.strftime("%H:%M %Z"), name
        assert back.fold == one.fold
