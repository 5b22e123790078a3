"""Audit 55 of the OpenAI Agents session, the ``transaction`` package join, and the
examples as a user runs them.

Each test is named after the promise the code broke before its fix; its docstring says
what went wrong and how it was seen.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_langgraph_example_run_again_in_its_kept_dir_tells_no_false_story(tmp_path):
    """``examples/langgraph_agent.py --dir DIR`` keeps DIR; run a second time there, it
    resumed the first run's thread and hotel ledger: it rewound to the FIRST run's
    checkpoint, printed "compensated bookings: ['Oslo', 'Rome', 'Paris', 'Lisbon', 'Oslo',
    'Rome']" (every compensated action of both runs as this rewind's), and after booking
    Lisbon anew printed "walstore actions: {'Lisbon': 'compensated', ...}".  A second run
    in the same DIR is now refused with one line, touching nothing."""
    pytest.importorskip("langgraph")
    work = tmp_path / "w"
    first = _example("langgraph_agent.py", "--dir", str(work))
    assert first.returncode == 0, first.stderr
    ledger = (work / "hotel.json").read_bytes()
    again = _example("langgraph_agent.py", "--dir", str(work))
    assert again.returncode == 1, again.stdout[-2000:]
    assert "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already holds a run" in again.stderr
    assert again.stdout == ""
    assert (work / "hotel.json").read_bytes() == ledger
    # a new directory still runs the whole story
    fresh = _example("langgraph_agent.py", "--dir", str(tmp_path / "new"), "--json")
    assert fresh.returncode == 0, fresh.stderr
    summary = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert summary["walstore"]["active"] == ["Paris", "Lisbon"]


def test_the_openai_example_run_again_on_its_store_tells_no_false_story(tmp_path):
    """``examples/openai_agent_retract.py STORE_DIR`` run a second time on the same store
    continued the first run's conversation against a new, empty simulated hotel: after
    the rewind it printed "session's bookings: [('oa/traveller-1/k/bookings/H-2', ...)]",
    a booking this run's hotel never made (and the third run's H-2 overwrote it).  A
    second run on the same STORE_DIR is now refused with one line."""
    pytest.importorskip("agents")
    path = str(tmp_path / "store")
    first = _example("openai_agent_retract.py", path)
    assert first.returncode == 0, first.stderr
    assert "session's bookings: []" in first.stdout
    again = _example("openai_agent_retract.py", path)
    assert again.returncode == 1, again.stdout[-2000:]
    assert "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already holds a store" in again.stderr
    assert again.stdout == ""
