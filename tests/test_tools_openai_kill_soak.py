"""tools/openai_kill_soak.py on a few rounds (real children running the SDK's real Runner
SIGKILLed mid-turn, the request retried or the saved RunState resumed in a new process):
three tools in one response booked and killed, then a pause for approval killed twice.
Every disagreement must match a documented limit."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("agents")

from tools import openai_kill_soak  # noqa: E402

ROUNDS = ["4", "10"]
# (seed 79: round 4, three tools in one response under Runner.run, killed at its third
# booking, the resuming process killed at its first; round 10, a pause for approval
# under run_streamed, killed at its second booking, its resume killed too)


def test_killed_turns_retried_or_resumed_agree_with_the_ledger(capsys):
    rc = openai_kill_soak.main(["--seed", "79", "--json", "--only", *ROUNDS])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rounds"] == len(ROUNDS) and summary["unexplained"] == 0, out
    assert summary["kills"] >= 1, out   # (round 4's first kill, at its third booking)
