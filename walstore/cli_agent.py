"""Agent-layer commands of ``walstore``: history, revert, rewind, actions, resolve.

Registered on :data:`walstore.cli.main` like walstore.cli_commands.
"""
from __future__ import annotations

import click

from .cli import (EXIT_PROBLEM, EXIT_USAGE, emit_json, fail, main, open_store, parse_key,
                  show_value, table)
from .errors import CompensationFailed, HistoryTrimmed, RevertConflict, WalstoreError

PATH = click.argument("path", type=click.Path(file_okay=False))
JSON = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


def _point(text: str):
    """NAME, a txid (digits; when no such txid exists, an LSN), or ``lsn:N`` / ``tx:N``."""
    from .txlog import LSN
    if text.startswith("lsn:") and text[4:].isdigit():
        return LSN(int(text[4:]))
    if text.startswith("tx:") and text[3:].isdigit():
        return int(text[3:])
    if text.isdigit():
        return int(text)
    return text


@main.command("history")
@PATH
@click.argument("key")
@JSON
def history_cmd(path: str, key: str, as_json: bool) -> None:
    """Versions of KEY, newest first."""
    with open_store(path) as store:
        versions = store.history(parse_key(key))
    if as_json:
        emit_json({"key": key, "versions": [v.__dict__ for v in versions]})
        return
    table([[v.txid, v.lsn, "(deleted)" if v.deleted else show_value(v.value)] for v in versions],
          ["TXID", "LSN", "VALUE"])


@main.command()
@PATH
@click.argument("txid", type=click.IntRange(min=1))
@click.option("--cascade", is_flag=True, help="Also revert later transactions on the same keys.")
@click.option("--handlers", default=None, metavar="MODULE", help="Import compensators from MODULE.")
@JSON
def revert(path: str, txid: int, cascade: bool, handlers: str | None, as_json: bool) -> None:
    """Undo committed transaction TXID as a new transaction."""
    from .cli_commands import _load_handlers
    comps = _load_handlers(handlers) if handlers else None
    with open_store(path, compensators=comps) as store:
        try:
            info = store.revert(txid, cascade=cascade)
        except RevertConflict as e:
            fail(f"{e}")
        except (KeyError, HistoryTrimmed) as e:
            fail(str(e).strip('"'), EXIT_USAGE)
        except CompensationFailed as e:
            fail(f"reverted, but {e}")
    _done(info, as_json)


@main.command()
@PATH
@click.option("--to", "to", required=True, help="A restore point NAME, a TXID, or lsn:N.")
@click.option("--handlers", default=None, metavar="MODULE", help="Import compensators from MODULE.")
@JSON
def rewind(path: str, to: str, handlers: str | None, as_json: bool) -> None:
    """Undo every transaction after a point, as one new transaction."""
    from .cli_commands import _load_handlers
    comps = _load_handlers(handlers) if handlers else None
    with open_store(path, compensators=comps) as store:
        try:
            info = store.rewind(_point(to))
        except (KeyError, HistoryTrimmed) as e:
            fail(str(e).strip('"'), EXIT_USAGE)
        except CompensationFailed as e:
            fail(f"rewound, but {e}")
    _done(info, as_json)


def _done(info, as_json: bool) -> None:
    if as_json:
        emit_json({"txid": info.txid if info else None, "lsn": info.lsn if info else None,
                   "reverted": list(info.extra.get("reverts", [])) if info else []})
    elif info is None:
        click.echo("nothing to undo")
    else:
        click.echo(f"committed txid {info.txid} at LSN {info.lsn}, undoing transactions "
                   f"{list(info.extra.get('reverts', []))}")


@main.command("actions")
@PATH
@click.option("--pending", is_flag=True, help="Only compensations still owed.")
@JSON
def actions_cmd(path: str, pending: bool, as_json: bool) -> None:
    """External side effects: intents, results, compensation state."""
    with open_store(path, readonly=True) as store:
        acts = store.actions(pending=pending)
    if as_json:
        emit_json({"actions": [a.as_dict() for a in acts]})
    else:
        table([[a.id, a.name, a.state, a.compensate or "", show_value(a.result), a.error or ""]
               for a in acts], ["ID", "NAME", "STATE", "COMPENSATE", "RESULT", "ERROR"])
    if pending and acts:
        raise SystemExit(EXIT_PROBLEM)


@main.command()
@PATH
@click.argument("action_id")
@click.option("--note", default=None, help="Why it was handled by hand.")
def resolve(path: str, action_id: str, note: str | None) -> None:
    """Mark a pending or failed compensation handled by hand."""
    with open_store(path) as store:
        try:
            store.resolve(action_id, note)
        except KeyError as e:
            fail(str(e).strip('"'), EXIT_USAGE)
        except WalstoreError as e:
            fail(str(e))
    click.echo(f"action {action_id} resolved")


@main.command()
@PATH
@JSON
def prepared(path: str, as_json: bool) -> None:
    """In-doubt two-phase transactions (exit 1 when there are any)."""
    with open_store(path) as store:
        rows = [(gid, store._prepared[gid]) for gid in store.prepared()]
    if as_json:
        emit_json({"prepared": [{"gid": g, "txid": p.txid, "keys": len(p.writes), "ts": p.ts,
                                 "meta": p.meta} for g, p in rows]})
    else:
        table([[g, p.txid, len(p.writes), show_value(p.meta)] for g, p in rows],
              ["GID", "TXID", "WRITES", "META"])
    if rows:
        raise SystemExit(EXIT_PROBLEM)


@main.command("commit-prepared")
@PATH
@click.argument("gid")
def commit_prepared(path: str, gid: str) -> None:
    """Commit the prepared transaction GID."""
    with open_store(path) as store:
        try:
            lsn = store.commit_prepared(gid)
        except KeyError as e:
            fail(str(e).strip('"'), EXIT_USAGE)
    click.echo(f"committed {gid} at LSN {lsn}")


@main.command("rollback-prepared")
@PATH
@click.argument("gid")
@click.option("--handlers", default=None, metavar="MODULE", help="Import compensators from MODULE.")
def rollback_prepared(path: str, gid: str, handlers: str | None) -> None:
    """Roll back the prepared transaction GID."""
    from .cli_commands import _load_handlers
    comps = _load_handlers(handlers) if handlers else None
    with open_store(path, compensators=comps) as store:
        try:
            store.rollback_prepared(gid)
        except KeyError as e:
            fail(str(e).strip('"'), EXIT_USAGE)
        except CompensationFailed as e:
            fail(f"rolled back, but {e}")
    click.echo(f"rolled back {gid}")
