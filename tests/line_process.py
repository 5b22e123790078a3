"""Test support: a real child process driven one command per line (stdin), answering one
JSON document per line (stdout), after printing ``READY`` once it is set up.

Used for processes that hold a store open beside the test (a read-only reader, an agent
that owns the writer lock): ``p = LineProcess(script, *args); p("get", "k"); p.close()``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


class LineProcess:
    """``python script args...``: one command per line in, one JSON line out."""

    def __init__(self, script: Path | str, *args: str, quit_timeout: float = 60) -> None:
        self.quit_timeout = quit_timeout
        self.proc = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", (line, self.proc.stderr.read())

    def __call__(self, *cmd: str) -> Any:
        self.proc.stdin.write(" ".join(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        return json.loads(line)

    def close(self) -> None:
        """``quit``, then wait for the child (killed if it does not end in time)."""
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=self.quit_timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
