"""tools/langgraph_undo_race.py on a few seeds: two whose rewind to a subgraph's
checkpoint refunded a sibling task's booking and kept its pending writes (the state said
"booked", the world had it refunded) before stop 77 h6's fix, and a short stride.  Every
disagreement must match a documented limit (erase, revert, a raw-point split of a
finished run's step)."""
from __future__ import annotations

import pytest

pytest.importorskip("langgraph")

from tools import langgraph_undo_race  # noqa: E402


def test_runs_cut_off_by_undos_agree_with_the_ledger(capsys):
    rc = langgraph_undo_race.main(["--only", "10040", "10216", *map(str, range(10000, 10008))])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "10 iterations, 0 matching no documented limit" in out
