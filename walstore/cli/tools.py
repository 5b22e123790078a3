"""Verbs that show walstore off rather than operate a store: demo and bench."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import click

from . import _engine, main
from .common import JSON, DirPath
from .output import EXIT_PROBLEM, UsageProblem, emit_json, fail, note_problem, one_line


EXIT_TERMINATED = 128 + signal.SIGTERM
_terminated = threading.Event()


def exit_if_terminated() -> None:
    """Raise the SystemExit of a SIGTERM again: the handler's can land where Python
    swallows exceptions (a weakref callback, a ``__del__``: "Exception ignored in ..."),
    and the bench then ran to its end."""
    if _terminated.is_set():
        raise SystemExit(EXIT_TERMINATED)


@contextlib.contextmanager
def terminated_as_exit(verb: str) -> Iterator[None]:
    """SIGTERM (``timeout``, a CI job cancelled, ``kill``) ends the verb as Ctrl-C does,
    through its cleanup, exit 143: it killed the process where it stood, and a bench left
    its scratch directory (a store of 20 MB from the row under way), a demo its store,
    ``PATH-demo-files`` and its worker process (up to a minute more)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        _terminated.set()
        raise SystemExit(EXIT_TERMINATED)
    _terminated.clear()
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except SystemExit as e:
        if e.code == EXIT_TERMINATED:  # (its cleanup done: one line, as for Ctrl-C)
            with contextlib.suppress(OSError):
                click.echo(f"walstore: {verb} terminated (SIGTERM)", err=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


@main.command()
@click.argument("path", required=False, type=DirPath())
def demo(path: str | None) -> None:
    """An agent scenario end to end, narrated (in a new store: PATH must not exist or be an
    empty directory)."""
    if path is not None and os.path.lexists(path) and (
            not os.path.isdir(path) or os.listdir(path)):
        raise UsageProblem(f"demo needs a new store: {path} exists and is not an empty "
                           f"directory")
    outer = None if path is None else _engine.enclosing_store(path)
    if outer is not None:
        raise UsageProblem(f"demo needs a new store: {path} lies inside the store {outer}; "
                           f"choose a path outside it")
    if path is not None and os.path.lexists(_engine.demo_side_dir(path)):
        raise UsageProblem(f"demo keeps its agents' outside files (a ledger, a project tree) "
                           f"in {_engine.demo_side_dir(path)}, which exists: pick another PATH")
    with terminated_as_exit("demo"):
        code = _engine.run_demo(path)
    raise SystemExit(code)


@main.command()
@click.option("--quick", is_flag=True,
              help="A shorter run: smaller workloads, 2 rounds (about a minute on a quiet "
                   "machine with a fast disk; minutes where fsync is slow).")
@JSON
def bench(quick: bool, as_json: bool) -> None:
    """Benchmarks against SQLite and raw LMDB, run in one go (ratios)."""
    try:
        run_benchmarks, render_markdown = _engine.benchmarks()
    except ImportError as e:
        fail(f"benchmarks unavailable: {e}")
    with terminated_as_exit("bench"):
        def progress(message: str) -> None:
            exit_if_terminated()
            click.echo(message, err=True)
        results = run_benchmarks(quick=quick, progress=progress)
        exit_if_terminated()
    failed = failed_rows(results)
    if failed:  # (before printing: a reader gone mid-output keeps exit 1)
        note_problem()
    if as_json:
        emit_json(results)
    else:
        click.echo(render_markdown(results))
    if failed:
        # (a row whose system failed was reported in its row and the run exited 0: a CI
        # job running `walstore bench` passed with walstore's own rows "error: ...")
        first = failed[0]
        click.echo(one_line(f"walstore: bench: {len(failed)} row(s) failed (their systems "
                            f"did not run to the end), e.g. {first['part']}/"
                            f"{first['system']}: {first['error']}"), err=True)
        raise SystemExit(EXIT_PROBLEM)


def failed_rows(results: dict) -> list[dict]:
    """The rows of a benchmark run whose system failed ("error: ..."; a "skipped: ..."
    row, a workload whose optional extra is not installed, is no failure)."""
    return [row for part in results.get("parts", ()) for row in part.get("rows", ())
            if isinstance(row.get("error"), str) and not row["error"].startswith("skipped")]
