"""A coding agent whose file edits, test runs and deploys commit and roll back together.

    python examples/coding_agent_files.py [WORK_DIR]

(``WORK_DIR``, new or empty, is kept for a look afterwards; default: a temporary one.)

No network, no LLM: the "agent" is a scripted sequence of attempts, each one walstore
transaction, against a real repository directory and a real subprocess running its tests.

1. The repository is registered as a workspace (``store.workspace``); its build outputs
   are ignored (gitignore syntax).
2. Attempt 1 edits ``config.toml`` and ``calc.py`` (``tx.files(ws).write``: each path's
   before-image is durable in the store before it changes), deploys to "staging" (an
   action with a compensation), and runs the tests inside ``watch()``: everything the
   subprocess writes joins the transaction.  The tests fail, the transaction raises, and
   everything rolls back, newest first: the test report, the deploy, both files (exact
   bytes and modes), and the agent's state keys.
3. Attempt 2 tries an idea inside a savepoint, rolls back to it (files included), then
   makes the right edit; the tests pass; it commits.
4. ``store.at(point).files(ws).read(...)`` shows the file as it was; ``store.revert``
   undoes attempt 2 (files, keys, and the deploy's compensation) as a new transaction;
   ``walstore diff`` / ``walstore files`` show the same from the command line.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

import walstore

REPO = {
    "config.toml": "precision = 2\n",
    "calc.py": "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "test_calc.py": (
        "import os\n"
        "from calc import mean\n"
        "cfg = dict(line.split(' = ') for line in open('config.toml').read().splitlines())\n"
        "ok = round(mean([1, 2, 4]), int(cfg['precision'])) == 2.33 and mean([]) == 0\n"
        "os.makedirs('build', exist_ok=True)\n"
        "open('build/report.txt', 'w').write('PASS' if ok else 'FAIL')\n"
        "open('test-results.xml', 'w').write('<ok/>' if ok else '<failed/>')\n"
        "raise SystemExit(0 if ok else 1)\n"),
}


def run_tests(tx, ws) -> bool:
    """The repository's tests in a watched subprocess."""
    with tx.files(ws).watch() as w:
        result = subprocess.run([sys.executable, "-B", "test_calc.py"], cwd=ws.root,
                                capture_output=True, text=True)
    seen = ", ".join(f"{c.kind} {os.fsdecode(c.path)}" for c in w.changes) or "nothing"
    print(f"   tests exited {result.returncode}; the watch saw: {seen}")
    return result.returncode == 0


def main(work: str) -> None:
    repo, staging = os.path.join(work, "repo"), os.path.join(work, "staging.txt")
    os.makedirs(repo, exist_ok=True)
    for name, text in REPO.items():
        with open(os.path.join(repo, name), "w") as f:
            f.write(text)
    with open(staging, "w") as f:
        f.write("calc v1\n")

    def undeploy(action) -> None:
        with open(staging, "w") as f:
            f.write(action.result["previous"])

    def deploy(tx, version: str) -> None:
        with tx.action("deploy", args={"version": version}, compensate="undeploy") as act:
            with open(staging) as f:
                act.result = {"previous": f.read()}
            with open(staging, "w") as f:
                f.write(version + "\n")

    store = walstore.open(os.path.join(work, "agent-state"),
                          compensators={"undeploy": undeploy})
    ws = store.workspace(repo, ignore=["build/"])
    start = store.restore_point("start")
    print(f"1. workspace {ws.root} registered (build/ ignored); restore point at {start}")

    print("2. attempt 1: edit, deploy, test")
    try:
        with store.transaction(meta={"agent": "coder", "attempt": 1}) as tx:
            tx.put("coder/attempt", 1)
            f = tx.files(ws)
            f.write("config.toml", "precision = 0\n")
            f.write("calc.py", "def mean(xs):\n    return sum(xs) // len(xs)\n")
            deploy(tx, "calc v2 (attempt 1)")
            if not run_tests(tx, ws):
                raise RuntimeError("tests failed")
    except RuntimeError as e:
        config = open(os.path.join(repo, "config.toml")).read()
        report = os.path.exists(os.path.join(repo, "test-results.xml"))
        print(f"   {e}: rolled back. config.toml = {config!r}, staging = "
              f"{open(staging).read()!r}, coder/attempt = {store.get('coder/attempt')}, "
              f"test-results.xml exists: {report}")

    print("3. attempt 2: an idea tried in a savepoint and dropped, then the fix")
    with store.transaction(meta={"agent": "coder", "attempt": 2}) as tx:
        tx.put("coder/attempt", 2)
        f = tx.files(ws)
        sp = tx.savepoint("idea")
        f.rename("calc.py", "calc_old.py")
        f.write("calc.py", "import statistics\nmean = statistics.mean\n")
        tx.rollback_to(sp)               # calc.py is back, calc_old.py is gone
        f.write("calc.py", "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0\n")
        deploy(tx, "calc v2 (attempt 2)")
        if not run_tests(tx, ws):
            raise RuntimeError("tests failed")
    print(f"   committed as transaction {tx.id}; staging = {open(staging).read()!r}")

    old = store.at("start").files(ws).read("calc.py").decode()
    print(f"4. calc.py as of the restore point 'start':\n{old}")
    info = store.revert(tx.id)
    print(f"   revert of {tx.id} committed as {info.txid}: calc.py = "
          f"{open(os.path.join(repo, 'calc.py')).read()!r}, staging = {open(staging).read()!r}")
    store.close()
    # (it said `--from start` alone: after the revert the state is the start's again, and
    # that diff printed "no key changed / no file changed")
    print(f"   see also: walstore diff {shlex.quote(os.path.join(work, 'agent-state'))} --from start "
          f"--to tx:{tx.id}   (what attempt 2 changed)")


if __name__ == "__main__":
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="walstore-coder-")
    # (a second run in a kept WORK_DIR rewrote the repository behind the first run's
    # workspace and moved its restore point "start"; a file there ended in a traceback)
    if os.path.lexists(work) and (not os.path.isdir(work) or os.listdir(work)):
        sys.exit(f"error: {work} exists and is not an empty directory (a previous run?); "
                 f"pass a new or empty WORK_DIR")
    main(work)
