"""The commands of ``walstore`` (registered on :data:`walstore.cli.main`).

Each command opens what it needs, does one thing, and reports it: aligned text for people,
one JSON document with ``--json``.  Helpers live in :mod:`walstore.cli`.
"""
from __future__ import annotations

import json
import os

import click

from . import recovery as recovery_mod
from .cli import (EXIT_PROBLEM, EXIT_USAGE, emit_json, fail, jsonable, kv_lines, main,
                  open_store, parse_key, progress_printer, show_key, show_value, table)
from .errors import CorruptionError, NotAStore, StoreLocked, WalstoreError

PATH = click.argument("path", type=click.Path(file_okay=False))
JSON = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


@main.command()
@PATH
def init(path: str) -> None:
    """Create an empty store at PATH."""
    import walstore
    from .layout import Layout
    if Layout(path).exists():
        fail(f"{path} is already a store", EXIT_USAGE)
    try:
        walstore.open(path).close()
    except NotAStore as e:
        fail(str(e), EXIT_USAGE)
    click.echo(f"created store {os.path.abspath(path)}")


@main.command()
@PATH
@click.option("--mode", type=click.Choice(recovery_mod.MODES), default="strict",
              show_default=True, help="What to give up when the WAL is damaged.")
@click.option("--handlers", "handlers", default=None, metavar="MODULE",
              help="Import MODULE for compensators (only when named).")
@JSON
def recover(path: str, mode: str, handlers: str | None, as_json: bool) -> None:
    """Recover PATH after a crash: REDO committed work, UNDO losers, cut a torn tail."""
    import walstore
    from .store import Options
    compensators = _load_handlers(handlers) if handlers else None
    try:
        store = walstore.Store(path, create=False, options=Options(recovery_mode=mode),
                               compensators=compensators,
                               progress=None if as_json else progress_printer("recover"))
    except CorruptionError as e:
        _report_refused(e, path, as_json)
        return
    except (NotAStore,) as e:
        fail(str(e), EXIT_USAGE)
    except StoreLocked as e:
        fail(f"{e}: recovery needs the writer's lock; stop the writer first")
    with store:
        report = store.last_recovery
    doc = report.as_dict()
    problem = (any(p.kind not in ("torn-tail", "stale-bytes") for p in report.problems) or bool(report.in_doubt)
               or bool(report.pending_compensations))
    if as_json:
        emit_json(doc)
    else:
        _print_recovery(doc)
    raise SystemExit(EXIT_PROBLEM if problem else 0)


def _load_handlers(module: str) -> dict:
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        fail(f"cannot import handlers module {module!r}: {e}", EXIT_USAGE)
    comps = getattr(mod, "COMPENSATORS", None)
    if comps is None:
        comps = {n: f for n, f in vars(mod).items()
                 if callable(f) and getattr(f, "walstore_compensator", None)}
    return dict(comps)


def _report_refused(e: CorruptionError, path: str, as_json: bool) -> None:
    doc = {"recovered": False, "refused": True, "reason": e.reason, "file": e.file,
           "offset": e.offset, "lsn": e.lsn}
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"recovery refused: {e}")
        click.echo("nothing after the damage was applied; choose what to give up with "
                   "--mode tolerate-tail | point-in-time | skip-corrupt")
    raise SystemExit(EXIT_PROBLEM)


def _print_recovery(doc: dict) -> None:
    kv_lines([("mode", doc["mode"]), ("segments", doc["segments"]),
              ("records read", doc["records"]), ("commits redone", doc["redone"]),
              ("log ends at LSN", doc["end_lsn"]), ("torn bytes cut", doc["torn_bytes"]),
              ("losers (no commit)", len(doc["losers"])), ("seconds", f"{doc['seconds']:.3f}")])
    for p in doc["problems"]:
        click.echo(f"{p['kind']}: {p['reason']} at {p['file']} offset {p['offset']} "
                   f"(LSN {p['lsn']}), {p['bytes']} bytes {p['action'] or 'found'}"
                   + (f" -> {p['quarantined']}" if p['quarantined'] else ""))
    if doc["given_up_records"]:
        click.echo(f"gave up {doc['given_up_records']} valid records behind the damage "
                   f"(commits of txids {doc['given_up_txids']}); they are in quarantine/")
    if doc.get("compensated"):
        click.echo(f"compensations run: {', '.join(doc['compensated'])}")
    if doc.get("pending_compensations"):
        click.echo(f"pending compensations (need a compensator or `walstore resolve`): "
                   f"{', '.join(doc['pending_compensations'])}")
    if doc.get("in_doubt"):
        click.echo(f"in-doubt prepared transactions (need `walstore commit-prepared` or "
                   f"`rollback-prepared`): {', '.join(doc['in_doubt'])}")
    click.echo("recovered" + (" cleanly" if doc["clean"] else ""))


@main.command()
@PATH
@JSON
def verify(path: str, as_json: bool) -> None:
    """Check every checksum and WAL-vs-LMDB consistency (read-only)."""
    from .verify import verify_store
    try:
        rep = verify_store(path, progress=None if as_json else progress_printer("verify"))
    except NotAStore as e:
        fail(str(e), EXIT_USAGE)
    if as_json:
        emit_json(rep.as_dict())
    else:
        kv_lines([("segments", rep.segments), ("records", rep.records), ("commits", rep.commits),
                  ("LMDB keys", rep.lmdb_keys), ("keys checked vs WAL", rep.keys_checked),
                  ("applied LSN", rep.applied_lsn), ("WAL end LSN", rep.wal_end_lsn)])
        for w in rep.warnings:
            click.echo(f"warning: {w}")
        for e in rep.errors:
            click.echo(f"error: {e}")
        click.echo("ok" if rep.ok else f"{len(rep.errors)} problem(s) found")
    raise SystemExit(0 if rep.ok else EXIT_PROBLEM)


@main.command()
@PATH
@JSON
def stats(path: str, as_json: bool) -> None:
    """Sizes, positions and counters of a store."""
    with open_store(path, readonly=True) as store:
        doc = store.stats()
    if as_json:
        emit_json(doc)
    else:
        kv_lines(sorted(doc.items()))


@main.command("log")
@PATH
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@JSON
def log_cmd(path: str, limit: int, as_json: bool) -> None:
    """Committed transactions, newest first."""
    import time
    with open_store(path, readonly=True) as store:
        infos = store.log(limit=limit)
    if as_json:
        emit_json({"transactions": [i.as_dict() for i in infos]})
        return
    rows = [[i.txid, i.lsn, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.timestamp)),
             len(i.keys), json.dumps(jsonable(i.meta)) if i.meta is not None else ""]
            for i in infos]
    table(rows, ["TXID", "LSN", "TIME", "KEYS", "META"])


@main.command()
@PATH
@click.option("--from", "from_lsn", type=click.IntRange(min=0), default=0, help="First LSN.")
@JSON
def dump(path: str, from_lsn: int, as_json: bool) -> None:
    """Raw WAL records, decoded."""
    from .inspect import iter_wal
    try:
        items = list(iter_wal(path, from_lsn)) if as_json else iter_wal(path, from_lsn)
    except NotAStore as e:
        fail(str(e), EXIT_USAGE)
    if as_json:
        emit_json({"records": items})
        return
    for r in items:
        click.echo(f"{r['lsn']:>12}  {r['type']:<17} {r['length']:>7}  {r['summary']}")


@main.command()
@PATH
@click.argument("key")
def get(path: str, key: str) -> None:
    """Print the value of KEY as JSON (exit 1 when absent)."""
    with open_store(path, readonly=True) as store:
        k = parse_key(key)
        if k not in store:
            fail(f"key {key!r} not found")
        click.echo(show_value(store[k]))


@main.command()
@PATH
@click.argument("key")
@click.argument("value")
def put(path: str, key: str, value: str) -> None:
    """Set KEY to the JSON VALUE in one transaction."""
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError as e:
        fail(f"VALUE must be JSON ({e}); quote strings: '\"text\"'", EXIT_USAGE)
    with open_store(path) as store:
        with store.transaction(meta={"cli": "put"}) as tx:
            tx.put(parse_key(key), decoded)
    click.echo(f"committed txid {tx.id} at LSN {tx.lsn}")


@main.command()
@PATH
@click.argument("key")
def delete(path: str, key: str) -> None:
    """Delete KEY in one transaction."""
    with open_store(path) as store:
        k = parse_key(key)
        if k not in store:
            fail(f"key {key!r} not found")
        with store.transaction(meta={"cli": "delete"}) as tx:
            tx.delete(k)
    click.echo(f"committed txid {tx.id} at LSN {tx.lsn}")


@main.command()
@PATH
@click.option("--prefix", default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None)
@JSON
def scan(path: str, prefix: str | None, limit: int | None, as_json: bool) -> None:
    """Keys and values in key order."""
    rows = []
    with open_store(path, readonly=True) as store:
        for k, v in store.scan(prefix=parse_key(prefix) if prefix else None):
            rows.append((k, v))
            if limit and len(rows) >= limit:
                break
    if as_json:
        emit_json({"items": [{"key": show_key(k), "value": v} for k, v in rows]})
    else:
        table([[show_key(k), show_value(v)] for k, v in rows], ["KEY", "VALUE"])


@main.command()
@PATH
@JSON
def checkpoint(path: str, as_json: bool) -> None:
    """Apply the WAL to LMDB, sync it, and trim old WAL segments."""
    with open_store(path) as store:
        doc = store.checkpoint()
    if as_json:
        emit_json(doc)
    else:
        kv_lines(sorted(doc.items()))


@main.command()
@PATH
@click.argument("dest", type=click.Path(file_okay=False))
@JSON
def backup(path: str, dest: str, as_json: bool) -> None:
    """Copy PATH to DEST consistently, even while a writer is running."""
    from .backup import backup as do_backup
    try:
        doc = do_backup(path, dest)
    except NotAStore as e:
        fail(str(e), EXIT_USAGE)
    except WalstoreError as e:
        fail(str(e))
    if as_json:
        emit_json(doc)
    else:
        kv_lines(sorted(doc.items()))


@main.command()
@click.argument("path", required=False, type=click.Path(file_okay=False))
def demo(path: str | None) -> None:
    """An agent scenario end to end, narrated."""
    from .demo import run_demo
    raise SystemExit(run_demo(path))


@main.command()
@click.option("--quick", is_flag=True, help="A short run (under a minute).")
@JSON
def bench(quick: bool, as_json: bool) -> None:
    """Benchmarks against SQLite and raw LMDB, run in one go (ratios)."""
    try:
        from .benchmark import render_markdown, run_benchmarks
    except ImportError as e:
        fail(f"benchmarks unavailable: {e}")
    results = run_benchmarks(quick=quick, progress=(lambda m: click.echo(m, err=True)))
    if as_json:
        emit_json(results)
    else:
        click.echo(render_markdown(results))
