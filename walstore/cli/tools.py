"""Verbs that show walstore off rather than operate a store: demo and bench."""
from __future__ import annotations

import os

import click

from . import _engine, main
from .common import JSON, DirPath
from .output import UsageProblem, emit_json, fail


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
    raise SystemExit(_engine.run_demo(path))


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
    results = run_benchmarks(quick=quick, progress=(lambda m: click.echo(m, err=True)))
    if as_json:
        emit_json(results)
    else:
        click.echo(render_markdown(results))
