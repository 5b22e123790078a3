"""``WalstoreSaver.list({"thread_id": T}, limit=k)`` (no checkpoint namespace: the form
LangGraph's docs show) reads about k checkpoints of each namespace, not every checkpoint
of the thread (counted, never timed).  It read and sorted the whole thread's checkpoints
to yield the newest few: beside 12,000 checkpoints (4,000 turns) a ``limit=5`` listing
took 0.16-0.34 s, and an agent listing its last few each turn paid N^2.  Each namespace is
now read newest first and the namespaces merged by checkpoint id; the rows and their order
are those of the full sort, ``before`` and ``filter`` included."""
from __future__ import annotations

import pytest

pytest.importorskip("langgraph.checkpoint.base")

from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402

from walstore.integrations.langgraph import WalstoreSaver  # noqa: E402
from walstore.integrations.langgraph.keys import SaverKeys  # noqa: E402


@pytest.fixture
def parsed(monkeypatch):
    """Checkpoint keys parsed (one per checkpoint row read)."""
    n = [0]
    real = SaverKeys.parse_checkpoint

    def counted(thread_prefix, key):
        n[0] += 1
        return real(thread_prefix, key)
    monkeypatch.setattr(SaverKeys, "parse_checkpoint", staticmethod(counted))
    return n


def _fill(saver, thread: str, n: int, namespaces=("",)) -> list:
    """n checkpoints per namespace, their ids interleaved across namespaces."""
    heads = {ns: None for ns in namespaces}
    ids = []
    for i in range(n):
        for ns in namespaces:
            c = empty_checkpoint()
            c["channel_values"] = {"i": i}
            c["channel_versions"] = {"i": i + 1}
            conf = {"configurable": {"thread_id": thread, "checkpoint_ns": ns}}
            if heads[ns] is not None:
                conf["configurable"]["checkpoint_id"] = heads[ns]
            out = saver.put(conf, c, {"source": "loop", "step": i, "ns": ns}, {"i": i + 1})
            heads[ns] = out["configurable"]["checkpoint_id"]
            ids.append((heads[ns], ns))
    return ids


def _listing(saver, thread, **kw):
    return [(t.config["configurable"]["checkpoint_id"], t.config["configurable"]["checkpoint_ns"])
            for t in saver.list({"configurable": {"thread_id": thread}}, **kw)]


def test_listing_the_newest_few_of_a_thread_reads_few(tmp_path, parsed):
    costs = []
    for n in (100, 800):
        saver = WalstoreSaver.from_path(str(tmp_path / f"s{n}"), durability="none")
        try:
            _fill(saver, "t", n)
            _fill(saver, "other", 50)
            parsed[0] = 0
            got = _listing(saver, "t", limit=5)
            costs.append(parsed[0])
            assert len(got) == 5
        finally:
            saver.close()
    # before: every checkpoint of the thread parsed (800); now one batch (64) at most
    assert costs[1] <= 80 and costs[1] <= costs[0] + 16, costs


def test_the_merged_listing_is_the_sorted_one(tmp_path):
    saver = WalstoreSaver.from_path(str(tmp_path / "s"), durability="none")
    try:
        ids = _fill(saver, "t", 90, namespaces=("", "sub:1", "sub:2|inner:3"))
        _fill(saver, "u", 10)
        want = sorted(ids, key=lambda r: r[0], reverse=True)
        assert _listing(saver, "t") == want
        assert _listing(saver, "t", limit=7) == want[:7]
        before = want[40][0]
        assert _listing(saver, "t", before={"configurable": {"thread_id": "t",
                                                             "checkpoint_id": before}},
                        limit=10) == [r for r in want if r[0] < before][:10]
        assert _listing(saver, "t", filter={"ns": "sub:1"}, limit=4) == \
            [r for r in want if r[1] == "sub:1"][:4]
        assert _listing(saver, "nobody", limit=3) == []
    finally:
        saver.close()
