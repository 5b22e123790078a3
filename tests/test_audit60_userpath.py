"""Audit 60: the path a new user walks (README.md, docs/*.md, examples/*.py, ``walstore
demo``, ``walstore --help``, the OpenAI Agents session), each claim run as written.

- ``walstore demo > /dev/full`` said "No space left on device (store PATH)": it blamed the
  store's disk for a failed write of its narration to stdout (every other verb says
  "writing its output to stdout failed"), and the store it named had been removed;
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd, stdout=subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WALSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "walstore", *args], cwd=cwd, env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_demo_into_a_full_stdout_says_stdout_failed_not_the_store(tmp_path):
    with open("/dev/full", "w") as full:
        r = cli("demo", "st", cwd=tmp_path, stdout=full)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "writing its output to stdout failed" in lines[0], lines[0]
    assert "No space left on device" in lines[0]
    assert "(store " not in lines[0]                  # the store's disk is not the problem
    assert "removed" in lines[0]                      # and says what became of the store
    assert not (tmp_path / "st").exists() and not (tmp_path / "st-demo-files").exists()
