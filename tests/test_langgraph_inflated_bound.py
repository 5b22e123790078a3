"""A channel value compressed by the saver must inflate within the bound every reader
applies (blobs.MAX_INFLATED, 1 GiB): a 1 GiB + 1 MiB string of one letter compresses to
about 1 MiB, so it was stored (the invoke returned) and every read of the thread then
raised "compressed value claims ... bytes".  The bound is lowered here to keep the test
small; the writer must never produce a length the reader refuses."""
from __future__ import annotations

from typing import TypedDict

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.graph import END, START, StateGraph  # noqa: E402

import walstore  # noqa: E402
from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph import blobs  # noqa: E402


class S(TypedDict):
    data: str


def _graph(saver, size: int):
    b = StateGraph(S)
    b.add_node("n", lambda s: {"data": "a" * size})
    b.add_edge(START, "n")
    b.add_edge("n", END)
    return b.compile(checkpointer=saver)


def test_a_value_past_the_inflate_bound_is_never_stored_compressed(tmp_path, monkeypatch):
    monkeypatch.setattr(blobs, "MAX_INFLATED", 64 * 1024)
    size = 100 * 1024  # past the (lowered) bound, compresses to a few hundred bytes
    cfg = {"configurable": {"thread_id": "t"}}
    with walstore.open(str(tmp_path / "s")) as store:
        assert len(_graph(WalstoreSaver(store), size).invoke({"data": ""}, cfg)["data"]) == size
    with walstore.open(str(tmp_path / "s")) as store:
        state = _graph(WalstoreSaver(store), size).get_state(cfg)
        assert len(state.values["data"]) == size


def test_a_value_within_the_bound_is_still_compressed():
    codec = blobs.BlobCodec(None)
    squeezed = codec.squeeze(b"a" * 100_000)
    assert isinstance(squeezed, list) and squeezed[1] == 100_000
    assert blobs.unsqueeze(squeezed) == b"a" * 100_000
