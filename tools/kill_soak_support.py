"""What the kill soaks share (tools/langgraph_kill_soak.py, tools/langgraph_react_kill_soak.py,
tools/openai_kill_soak.py): the outside world as a ledger -- a file of lines, each on
disk (fsynced) before the call that wrote it returns -- and a child process running a
soak's own file in ``--child`` mode, whose stdout lines are collected as they come (its
``READY``, its ``DONE {json}``) so the parent can kill it (SIGKILL) at a chosen moment.
Each soak keeps what is its own: the graph or agent, the kill points, the checks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def append(path: str, line: str) -> None:
    """One line at the end of ``path``, on disk before this returns."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_ledger(path: str) -> list[list[str]]:
    """The ledger's lines, each split into words ([] when there is no ledger yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split() for line in f.read().splitlines() if line.strip()]


def lines_in(path: str) -> int:
    """How many lines ``path`` has (0 when it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


class Child:
    """``script`` in ``--child MODE SPEC STORE LEDGER`` mode, in a subprocess that imports
    this walstore (an older one may be installed: the checkout comes first on its path);
    its stdout lines as they come (``lines``; ``ready`` set at ``READY``, or when it
    ended), its stderr once it ended (``err``).  ``wait``: the budget of ``finish``."""

    def __init__(self, script: str | Path, mode: str, spec: dict, store_path: str,
                 path: str, wait: float = 90.0) -> None:
        import walstore
        paths = [str(Path(walstore.__file__).resolve().parents[1]), str(ROOT),
                 os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
               "PYTHONDONTWRITEBYTECODE": "1"}
        self.wait = wait
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(script).resolve()), "--child", mode,
             json.dumps(spec), store_path, path], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        self.lines: list[str] = []
        self.err = b""
        self.ready = threading.Event()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if line == "READY":
                self.ready.set()
        self.ready.set()   # (ended: whoever waits looks at the process)

    def _read_err(self) -> None:
        self.err = self.proc.stderr.read()

    def _joined(self) -> None:
        for t in self._readers:
            t.join(10)

    def kill(self) -> bool:
        """SIGKILL it; did it die of it (not ended before)?"""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._joined()
        return alive and self.proc.returncode == -signal.SIGKILL

    def finish(self) -> int | None:
        """Wait for its end (killed past ``wait``: None)."""
        try:
            self.proc.wait(self.wait)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._joined()
        return self.proc.returncode

    def done(self) -> dict | None:
        """What its ``DONE {json}`` line said (None: it printed none)."""
        for line in self.lines:
            if line.startswith("DONE {"):
                return json.loads(line[5:])
        return None


def ledger_problems(out: dict, ledger: list[list[str]], rec: Any, booked: Any,
                    cancels: dict[str, list], pid_at: int, key_at: int) -> list[str]:
    """The disagreements between the ledger and what the state records (``rec``: the
    booking ids it records): recorded but never booked, recorded but cancelled, standing
    (booked, not cancelled) but unrecorded, and cancelled twice -- unless each earlier
    cancellation was the last line its process wrote, a process the round killed
    (``out["killed_pids"]``), with the idempotency key of the last: a compensation run
    again by recovery after its process was killed right after its effect (at least
    once, CONTRACT), counted in ``out["recompensated"]``.  ``cancels``: booking id ->
    [(line number, words)]; ``pid_at``/``key_at``: where a cancel line has its writer's
    pid and its key.  Sets ``out["live"]`` and ``out["recorded"]``."""
    problems: list[str] = []
    live = {b for b in booked if b not in cancels}
    if set(rec) - set(booked):
        problems.append("recorded-never-booked")
    if set(rec) & set(cancels):
        problems.append("recorded-but-cancelled")
    if live - set(rec):
        problems.append("live-unrecorded")
    killed = set(out.get("killed_pids", ()))
    for _bid, cs in cancels.items():
        if len(cs) < 2:
            continue
        explained = True
        for (i, w), _later in zip(cs, cs[1:]):
            pid = w[pid_at]
            last_of_pid = max(j for j, x in enumerate(ledger) if x[-1] == pid)
            if int(pid) not in killed or last_of_pid != i or w[key_at] != cs[-1][1][key_at]:
                explained = False
        if explained:
            out["recompensated"] = out.get("recompensated", 0) + 1
        else:
            problems.append("cancelled-twice")
    out["live"], out["recorded"] = sorted(live), sorted(rec)
    return problems


def first_kill(out: dict, child: Child, kill_at: Any, how: tuple, path: str) -> bool:
    """Kill the round's first child (``kill_at(child, how, path)``, the soak's own kill
    points) and note it in ``out`` (``kill1``; ``kills`` and ``killed_pids`` when it
    died of it; ``crash`` when it never got READY or ended with an error on its own);
    whether the round goes on."""
    k = kill_at(child, how, path)
    out["kill1"] = k
    if k.get("stuck"):
        out["crash"] = "run child never READY: " + child.err.decode()[-2000:]
        return False
    if k["killed"]:
        out["kills"] += 1
        out["killed_pids"].append(child.proc.pid)
    elif child.proc.returncode != 0:
        out["crash"] = f"run child exit {child.proc.returncode}: " + \
            child.err.decode()[-2000:]
        return False
    return True
