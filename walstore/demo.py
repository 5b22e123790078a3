"""``walstore demo``: an agent's story, end to end, narrated for a newcomer.

It runs real things: transactions on a real store, a savepoint rolled back after a failed
step, a coding agent's file edits, deploy and watched test run rolled back together, a
child process killed with SIGKILL in the middle of its work, ``walstore recover``
as an operator would run it, and a check that every step the child was told was committed
survived.  Returns the exit status (0 when every check held).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import click

import walstore

from . import demo_payments as payments
from .signals import ASYNCHRONOUS, deferred

TOTAL_BUDGET = 100


def _out(text: str) -> None:
    """One line of the narration to stdout, through ``click.echo`` (flushed), so that a
    failed write is told as the command line tells every stdout failure: "writing its
    output to stdout failed" (``print`` made `walstore demo > /dev/full` say "No space
    left on device (store PATH)", blaming the store's disk)."""
    click.echo(text)


def say(text: str = "") -> None:
    _out(textwrap.fill(text, 88) if text else "")


def step(n: int, title: str) -> None:
    _out(f"\n== {n}. {title}")


def _shell_word(path: str) -> str:
    """``path`` as one word a shell and the command line take back as that path: quoted
    (``walstore log my store`` was two arguments) and, starting with ``-``, as ``./-x``
    (else an option)."""
    if path.startswith("-"):
        path = os.path.join(os.curdir, path)
    return shlex.quote(path)


def side_dir(path: str) -> str:
    """Where the demo keeps what its agents touch outside the store (a payments ledger, a
    project tree, a staging file): a new directory beside the store, never a user's."""
    return os.path.abspath(path).rstrip(os.sep) + "-demo-files"


def run_demo(path: str | None = None) -> int:
    """The demo's story; its store and ``PATH-demo-files`` stay when it ends (to inspect).
    Cut short (its reader gone: ``walstore demo | head -3``, Ctrl-C, an error), it
    removes what it made and nothing else: it left ``PATH-demo-files`` (and half a
    store), and a second ``walstore demo PATH`` refused, the directory existing."""
    made_root = None
    if not path:
        made_root = tempfile.mkdtemp(prefix="walstore-demo-")
        path = os.path.join(made_root, "agent-state")
    side = side_dir(path)
    if os.path.lexists(side):
        raise FileExistsError(f"the demo keeps its agents' outside files in {side}, which "
                              f"already exists: pick another PATH")
    # (an existing PATH is an empty directory, the CLI checks; called otherwise, what
    # it held is never removed)
    kept = set(os.listdir(path)) if os.path.isdir(path) and not made_root else None
    os.makedirs(side, mode=0o700)
    try:
        return _stories(path, side)
    except BaseException:
        with deferred():  # (a second Ctrl-C does not leave half of it)
            _remove_made(made_root or path, side, kept)
        raise


def _remove_made(root: str, side: str, kept: set | None) -> None:
    """Remove the demo's side directory and its store (``kept``: the names the directory
    held before, which stay, and so does the directory)."""
    shutil.rmtree(side, ignore_errors=True)
    if kept is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for name in (os.listdir(root) if os.path.isdir(root) else ()):
        if name in kept:
            continue
        p = os.path.join(root, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)


def _stories(path: str, side: str) -> int:
    step(1, "An agent keeps its world state in walstore")
    say(f"The planner agent opens its store at {path} (durability='full': a commit returns "
        f"only once it is on disk).")
    with walstore.open(path) as store:
        with store.transaction(meta={"agent": "planner", "step": "setup"}) as tx:
            tx.put("inventory/widgets", 10)
            tx.put("budget/available", TOTAL_BUDGET)
            tx.put("budget/spent", 0)
            tx.put("plan/steps_done", 0)
        say(f"Setup committed as transaction {tx.id} at log position {tx.lsn}: "
            f"{dict(store.scan())}")
        _savepoint_story(store)
    ledger = os.path.join(side, "payments.jsonl")
    with walstore.open(path, compensators=payments.COMPENSATORS) as store:
        _saga_story(store, ledger)
        _rewind_story(store, ledger)
    files_ok = _files_story(path, side)
    acked = _crash_story(path, ledger)
    return _recovery_story(path, acked, ledger, files_ok)


def _savepoint_story(store: walstore.Store) -> None:
    step(2, "A failed step is rolled back to a savepoint, the rest of the work is kept")
    with store.transaction(meta={"agent": "planner", "step": "reserve"}) as tx:
        tx.put("plan/goal", "ship an order")
        try:
            with tx.savepoint("plan-a"):
                left = tx.get("inventory/widgets") - 25
                tx.put("inventory/widgets", left)
                say(f"Plan A reserves 25 widgets inside savepoint 'plan-a'; stock would be {left}.")
                if left < 0:
                    raise ValueError("not enough widgets for plan A")
        except ValueError as e:
            say(f"Plan A failed ({e}); the savepoint undid its writes: stock is back to "
                f"{tx.get('inventory/widgets')}.")
        with tx.savepoint("plan-b"):
            tx.put("inventory/widgets", tx.get("inventory/widgets") - 4)
            tx.put("orders/1", {"widgets": 4, "state": "reserved"})
        say("Plan B reserves 4 widgets and records the order; the transaction commits both "
            "the goal and plan B, nothing of plan A.")
    say(f"Committed state: widgets={store['inventory/widgets']}, order={store['orders/1']}, "
        f"goal={store['plan/goal']!r}.")


def _order(store: walstore.Store, ledger: str, order: str, widgets: int, fail: bool) -> None:
    with store.transaction(meta={"agent": "planner", "step": order}) as tx:
        with tx.action("reserve", args={"widgets": widgets}, compensate="release") as act:
            tx.put("inventory/widgets", tx.get("inventory/widgets") - widgets)
            act.result = {"reserved": widgets}
        with tx.action("charge", args={"amount": 10 * widgets, "ledger": ledger},
                       compensate="refund") as act:
            act.result = payments.charge(ledger, 10 * widgets, idempotency_key=act.key)
        tx.put(f"orders/{order}", {"widgets": widgets, "state": "paid"})
        if fail:
            raise RuntimeError("the shipping API is down")


def _saga_story(store: walstore.Store, ledger: str) -> None:
    step(3, "Side effects: a plan reserves and charges, then fails, and is compensated")
    say("Each external effect runs inside tx.action(...): its intent is logged durably before "
        "it runs, with an idempotency key. The charge goes to a payments ledger (a real file "
        "standing in for a payment API). Then shipping fails and the transaction rolls back.")
    try:
        _order(store, ledger, "2", widgets=2, fail=True)
    except RuntimeError as e:
        say(f"Order 2 failed ({e}). walstore ran the compensations newest first: the charge "
            f"was refunded (ledger balance now {payments.balance(ledger)}), the reservation "
            f"released (widgets={store['inventory/widgets']}), and order 2 was never written "
            f"({store.get('orders/2')}).")


def _rewind_story(store: walstore.Store, ledger: str) -> None:
    step(4, "A restore point, a successful order, and a rewind that undoes it")
    store.restore_point("before-order-3")
    _order(store, ledger, "3", widgets=1, fail=False)
    say(f"Order 3 committed: widgets={store['inventory/widgets']}, ledger balance "
        f"{payments.balance(ledger)}. The user changes their mind: rewind to 'before-order-3'.")
    info = store.rewind("before-order-3")
    say(f"Rewind committed as transaction {info.txid}, undoing {list(info.extra['reverts'])}: "
        f"widgets={store['inventory/widgets']}, order 3 is {store.get('orders/3')}, and the "
        f"charge was refunded (ledger balance {payments.balance(ledger)}) instead of being "
        f"re-executed or forgotten. History is kept: `walstore log` shows all of it.")


PROJECT = {
    "config.toml": "retries = 3\ntimeout = 30\n",
    "app.py": "def add(a, b):\n    return a + b\n",
    "test_app.py": ("import os\nfrom app import add\n"
                    "os.makedirs('.reports', exist_ok=True)\n"
                    "ok = add(2, 2) == 4 and 'retries = 0' not in open('config.toml').read()\n"
                    "open('.reports/last.txt', 'w').write('PASS' if ok else 'FAIL')\n"
                    "raise SystemExit(0 if ok else 1)\n"),
}


def _tree(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = b"" if os.path.isdir(p) else open(p, "rb").read()
            out[os.path.relpath(p, root)] = (st.st_mode, data)
    return out


def _files_story(path: str, base: str) -> bool:
    step(5, "A coding agent edits files, deploys, runs the tests: they fail, all rolls back")
    project = os.path.join(base, "project")
    staging = os.path.join(base, "staging.txt")
    os.makedirs(project, exist_ok=True)
    for name, text in PROJECT.items():
        with open(os.path.join(project, name), "w") as f:
            f.write(text)
    with open(staging, "w") as f:
        f.write("app v1\n")

    def undeploy(action) -> None:  # the deploy's compensation: put the old release back
        with open(staging, "w") as f:
            f.write(action.result["previous"])

    before = _tree(project)
    with walstore.open(path, compensators={"undeploy": undeploy}) as store:
        ws = store.workspace(project, ignore=["__pycache__/"])
        say(f"The agent's repository {project} is registered as a workspace. In one "
            f"transaction the agent records its task, edits config.toml and app.py in "
            f"place (each before-image durable in the store first), deploys to staging "
            f"(an action with a compensation), and runs the test suite in a watched "
            f"subprocess: whatever the tests write is part of the transaction too.")
        try:
            with store.transaction(meta={"agent": "coder", "task": "faster add"}) as tx:
                tx.put("coder/task", "make add() faster")
                f = tx.files(ws)
                f.write("config.toml", "retries = 0\ntimeout = 30\n")
                f.write("app.py", "def add(a, b):\n    return a - b  # 'optimized'\n")
                with tx.action("deploy", args={"to": "staging"}, compensate="undeploy") as act:
                    with open(staging) as fh:
                        act.result = {"previous": fh.read()}
                    with open(staging, "w") as fh:
                        fh.write("app v2 (the agent's edit)\n")
                with f.watch() as w:
                    run = subprocess.run([sys.executable, "-B", "test_app.py"], cwd=project,
                                         capture_output=True)
                say(f"The tests exited {run.returncode}; the watch saw "
                    f"{[f'{c.kind} {os.fsdecode(c.path)}' for c in w.changes]}.")
                if run.returncode != 0:
                    raise RuntimeError("the test suite failed")
        except RuntimeError as e:
            say(f"The transaction raised ({e}) and rolled back, newest first: the test "
                f"report the subprocess wrote was removed, the deploy was compensated, "
                f"app.py and config.toml got their exact bytes and modes back, and the "
                f"task key was never committed.")
        with open(staging) as fh:
            deployed = fh.read()
        same = _tree(project) == before
        ok = same and deployed == "app v1\n" and store.get("coder/task") is None
        say(f"Project tree identical to before: {same}; staging runs {deployed.strip()!r}; "
            f"task key: {store.get('coder/task')!r}.")
    return ok


def _python_m(module: str, *args: str) -> list[str]:
    """The argv of ``python -m module args`` without the current directory on the child's
    ``sys.path`` (``-m`` puts it first: a ``msgpack.py`` where ``walstore demo`` ran was
    imported by the children and ran; ``-P`` needs Python 3.11).  The child imports the
    same walstore as this process (the directory holding this package), nothing else
    from an unexpected place."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(walstore.__file__)))
    boot = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if p != '']\n"
            f"if {root!r} not in sys.path:\n"
            f"    sys.path.insert(0, {root!r})\n"
            "import runpy\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return [sys.executable, "-c", boot, *args]


def _crash_story(path: str, ledger: str) -> list[dict]:
    step(6, "A worker process spends the budget step by step, and is killed mid-work")
    say("A child process runs the agent's loop: each step moves 1 unit of budget from "
        "'available' to 'spent' in one transaction, and prints ACK once commit() returned. "
        "After 40 steps it charges a card inside a transaction and we kill it with SIGKILL "
        "right after the charge, before that transaction commits (no cleanup, no close).")
    acked: list[dict] = []
    deadline = time.monotonic() + 60
    proc = None
    try:
        # (deferred: a Ctrl-C while it starts leaves no worker unknown to the finally
        # below, writing to a store being removed; its own session: a terminal's Ctrl-C
        # reaches the demo alone, which kills it — the worker printed a traceback.  The
        # mask before the section goes with it: the worker takes it back)
        blocked = _blocked_now()
        with deferred():
            proc = subprocess.Popen(_python_m("walstore.demo", "--worker", path, ledger,
                                              blocked),
                                    stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked.append(json.loads(line[4:]))
            if line.startswith("CHARGED") or time.monotonic() > deadline:
                break
    finally:  # (also when cut short: no worker left writing to a store being removed)
        with deferred():
            if proc is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                proc.stdout.close()
    say(f"Killed process {proc.pid} after it acknowledged {len(acked)} steps "
        f"(the last was step {acked[-1]['step'] if acked else None}).")
    return acked


def _recovery_story(path: str, acked: list[dict], ledger: str, files_ok: bool = True) -> int:
    step(7, "The operator runs `walstore recover --handlers walstore.demo_payments`")
    say(f"The crash left a charge whose transaction never committed (ledger balance "
        f"{payments.balance(ledger)}). Recovery REDOes committed work and, with the payment "
        f"compensators named, refunds it with the same idempotency key.")
    # (the absolute path: a PATH beginning with "-" was read by recover as an option, and
    # the demo ended at this step, exit 1)
    out = subprocess.run(_python_m("walstore", "recover", os.path.abspath(path), "--handlers",
                                   "walstore.demo_payments"), capture_output=True, text=True)
    _out(textwrap.indent(out.stdout.strip(), "    "))
    if out.returncode != 0:
        say(f"recover exited {out.returncode}: {out.stderr.strip()}")
        return 1
    step(8, "Checking the state after the crash")
    with walstore.open(path) as store:
        done = store["plan/steps_done"]
        available, spent = store["budget/available"], store["budget/spent"]
        last_acked = acked[-1]["step"] if acked else 0
        ok_acked = done >= last_acked
        ok_total = available + spent == TOTAL_BUDGET and spent == done
        say(f"Steps done: {done} (last acknowledged: {last_acked}); budget available "
            f"{available} + spent {spent} = {available + spent}.")
        say(("Every acknowledged step survived" if ok_acked else "LOST acknowledged steps!")
            + ("; no step is half-applied: the totals add up." if ok_total
               else "; the totals do NOT add up!"))
        ok_money = payments.balance(ledger) == 0 and not store.pending_compensations()
        say(f"Payments ledger balance {payments.balance(ledger)}: "
            + ("every charge of an undone transaction was refunded exactly once."
               if ok_money else "money is NOT where it should be!"))
    from .ops.verify import verify_store
    rep = verify_store(path)
    say(f"`walstore verify`: {rep.records} WAL records and {rep.lmdb_keys} keys checked: "
        f"{'ok' if rep.ok else rep.errors}.")
    good = ok_acked and ok_total and ok_money and rep.ok and files_ok
    step(9, "Done" if good else "FAILED")
    _out("Inspect it yourself:")
    for cmd in ("log", "dump", "stats", "actions", "files", "diff --from lsn:0"):
        _out(f"    walstore {cmd} {_shell_word(path)}")
    return 0 if good else 1


def _blocked_now() -> str:
    """The signals this thread blocks, as the worker's last argument ("1,10": numbers;
    "" none or no masks here)."""
    if not hasattr(signal, "pthread_sigmask"):
        return ""
    return ",".join(str(int(s)) for s in sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))


def _worker(path: str, ledger: str, blocked: str | None = None) -> None:
    """The child: spend the budget one durable step at a time, ACK after each commit;
    after 40 steps, charge a card and hang before committing (the parent kills it)."""
    # (started inside the parent's ``deferred()`` section: a process keeps the mask it
    # inherits across exec, and the worker ran with every asynchronous signal blocked --
    # ``kill`` and a Ctrl-C never reached it.  It takes back the mask the parent had
    # before the section (``blocked``), so a signal the demo's own parent blocked stays
    # blocked, as in any child; none given, every asynchronous signal let in)
    if hasattr(signal, "pthread_sigmask"):
        if blocked is None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, ASYNCHRONOUS)
        else:
            signal.pthread_sigmask(signal.SIG_SETMASK,
                                   {int(s) for s in blocked.split(",") if s})
    store = walstore.open(path)
    for _ in range(40):
        with store.transaction(meta={"agent": "worker"}) as tx:
            n = tx.get("plan/steps_done") + 1
            tx.put("plan/steps_done", n)
            tx.put("budget/available", tx.get("budget/available") - 1)
            tx.put("budget/spent", tx.get("budget/spent") + 1)
        print("ACK " + json.dumps({"step": n, "txid": tx.id}), flush=True)
        time.sleep(0.002)
    tx = store.transaction(meta={"agent": "worker", "step": "buy supplies"})
    with tx.action("charge", args={"amount": 25, "ledger": ledger}, compensate="refund") as act:
        act.result = payments.charge(ledger, 25, idempotency_key=act.key)
    print("CHARGED", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:])
    else:
        sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else None))
