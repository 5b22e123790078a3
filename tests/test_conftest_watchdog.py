"""The watchdog of a whole ``-n`` run (``conftest.whole_run_seconds``): armed in the
xdist controller unless WALSTORE_SLOW=1 or WALSTORE_RUN_SECONDS=0.  Each case runs pytest
in a subprocess on a test file of its own, with ``tests/conftest.py`` loaded as a plugin
(``-p conftest``) and one worker (``-n 1``; none where the controller is not the point)."""
from __future__ import annotations

import os
import subprocess
import sys

from store_support import cli_env

HERE = os.path.dirname(os.path.abspath(__file__))
WAITS = "import time\\ndef test_waits():\\n    time.sleep(4)\\n"


def _pytest(tmp_path, env: dict, body: str, workers: int = 1
            ) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-n", str(workers),
         "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt"), "-o", "addopts=",
         str(tmp_path / "test_inner.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**{k: v for k, v in cli_env().items()  # (the outer run's own left out)
                if not k.startswith(("PYTEST_", "WALSTORE_SLOW", "WALSTORE_RUN_SECONDS"))},
             "PYTHONPATH": os.pathsep.join([HERE, cli_env()["PYTHONPATH"]]), **env})


def test_walstore_slow_0_keeps_the_watchdog_armed(tmp_path):
    """WALSTORE_SLOW=0 runs no slow test, as unset: the watchdog is armed as unset too
    (it was not: any value but unset disarmed it)."""
    r = _pytest(tmp_path, {"WALSTORE_SLOW": "0", "WALSTORE_RUN_SECONDS": "1"},
                WAITS.replace("\\n", "\n"))
    assert r.returncode == 1 and "Timeout (0:00:01)!" in r.stderr, (r.returncode,
                                                                    r.stdout, r.stderr)


def test_an_empty_walstore_run_seconds_is_the_default(tmp_path):
    """WALSTORE_RUN_SECONDS= (set empty, as a CI template leaves an unset variable) is the
    default; a value that is no number is one line naming it, exit 4 (the session ended
    at the conftest's import: ValueError, a traceback, exit 4)."""
    r = _pytest(tmp_path, {"WALSTORE_RUN_SECONDS": ""}, "def test_passes():\n    pass\n")
    assert r.returncode == 0 and "1 passed" in r.stdout, (r.stdout, r.stderr)
    r = _pytest(tmp_path, {"WALSTORE_RUN_SECONDS": "soon"}, "def test_passes():\n    pass\n",
                workers=0)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "WALSTORE_RUN_SECONDS='soon': give the seconds" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "ValueError" not in r.stderr, r.stderr
