"""Reading and writing keys: get, put, delete, scan, and the history of a store (log) and
of a key (history).  KEY and --prefix follow the key syntax of :mod:`.output`."""
from __future__ import annotations

from typing import Any, Iterator

import click

import walstore

from . import WalstoreCommand, _engine, main
from ._engine import command_word, type_and_message
from .common import JSON, PATH, open_store
from .output import (EXIT_INTERRUPTED, EXIT_PROBLEM, EXIT_USAGE, KEY, PREFIX,
                     NegativeNumberArguments,
                     UsageProblem, emit_json, emit_json_list, end_progress, fail,
                     note_problem, parse_json_value, progress_printer, show_cell, show_key,
                     show_time, show_value, stream_table, table, untag)


class _ValueCommand(NegativeNumberArguments, WalstoreCommand):
    """put's: its JSON VALUE may be a negative number (``walstore put PATH k -5``)."""


@main.command()
@PATH
@click.argument("key", type=KEY)
def get(path: str, key: str | bytes) -> None:
    """Print the value of KEY as JSON (exit 1 when absent)."""
    # (errors quote the key as show_key writes it, not its repr: repr doubled the
    # backslashes of a json:"a\nb" key, and the key shown no longer pasted back)
    with open_store(path, readonly=True) as store:
        if key not in store:
            fail(f"key '{show_key(key)}' not found", kind="KeyError")
        click.echo(show_value(store[key]))


@main.command(cls=_ValueCommand)
@PATH
@click.argument("key", type=KEY)
@click.argument("value")
@click.option("--tagged", is_flag=True,
              help='VALUE uses the tags `get` and --json print: {"base64": ...} is bytes, '
                   '{"float": "nan"} a float, {"map": [[k, v], ...]} a map with non-str keys.')
def put(path: str, key: str | bytes, value: str, tagged: bool) -> None:
    """Set KEY to the JSON VALUE in one transaction (a negative number is a VALUE:
    `walstore put PATH k -5`)."""
    decoded = parse_json_value(value)
    if tagged:
        decoded = untag(decoded)
    with open_store(path) as store:
        with store.transaction(meta={"cli": "put"}) as tx:
            try:
                tx.put(key, decoded)
            except (TypeError, ValueError) as e:  # the key or value itself is refused
                fail(f"cannot put '{show_key(key)}': {e}", EXIT_USAGE)
    click.echo(f"committed txid {tx.id} at LSN {tx.lsn}")


@main.command()
@PATH
@click.argument("key", type=KEY)
def delete(path: str, key: str | bytes) -> None:
    """Delete KEY in one transaction."""
    with open_store(path) as store:
        if key not in store:
            fail(f"key '{show_key(key)}' not found", kind="KeyError")
        with store.transaction(meta={"cli": "delete"}) as tx:
            tx.delete(key)
    click.echo(f"committed txid {tx.id} at LSN {tx.lsn}")


@main.command()
@PATH
@click.argument("prefix", type=KEY)
@click.option("--yes", is_flag=True, help="Confirm: this cannot be undone.")
@JSON
def purge(path: str, prefix: str | bytes, yes: bool, as_json: bool) -> None:
    """Erase every key under PREFIX and all its history (cannot be undone)."""
    if not yes:
        raise UsageProblem("purge erases every key under the prefix and all its history, "
                           "for good: add --yes to confirm")
    # progress on stderr (text mode): the open's recovery of an unclean store, then the
    # rewrite of LMDB at the purge's checkpoint (a purge of a large store said nothing)
    with open_store(path, progress=None if as_json else progress_printer("recover")) as store:
        end_progress()
        try:
            doc = store.purge(prefix, progress=None if as_json else progress_printer("purge"))
        except walstore.ErasureOwed as e:  # (committed: never said as "purge failed")
            cause = e.__cause__
            fail(f"purge of {show_key(prefix)} committed (transaction {e.txid}, "
                 f"{e.report.get('keys_erased')} key(s) erased from every read), but erasing "
                 f"their old bytes from the store's files failed: "
                 f"{type_and_message(cause)}; the erasure is owed: the next writable "
                 f"open of the store (or `walstore checkpoint {command_word(path)}`) finishes it")
        except KeyboardInterrupt as e:  # (committed before the Ctrl-C: said so, exit 130;
            done = getattr(e, "purge_committed", None)  # it read "purge interrupted", as
            if done is None:                            # if nothing was purged: audit 60)
                raise
            fail(f"purge of {show_key(prefix)} committed (transaction {done['txid']}, "
                 f"{done.get('keys_erased')} key(s) erased from every read), then was "
                 f"interrupted (Ctrl-C) while erasing their old bytes from the store's "
                 f"files; the erasure is owed: the next writable open of the store (or "
                 f"`walstore checkpoint {command_word(path)}`) finishes it", EXIT_INTERRUPTED,
                 "KeyboardInterrupt")
        finally:
            end_progress()
    doc["lsn"] = int(doc["lsn"]) if doc.get("lsn") is not None else None
    if not doc["keys_erased"] and not as_json:  # (a mistyped prefix read as a success:
        # "purged 0 key(s)", exit 0 — audit 58; on stderr: the table-free line stays)
        click.echo(f"note: no key was under {show_key(prefix)}, live or in the history "
                   f"kept (a mistyped prefix? `walstore scan {command_word(path)} --prefix ...` lists "
                   f"what there is)", err=True)
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"purged {doc['keys_erased']} key(s) under {show_key(prefix)} "
                   f"(transaction {doc['txid']}); {doc['segments_removed']} WAL segment(s) "
                   f"and {doc['lmdb_bytes_before'] - doc['lmdb_bytes_after']} bytes of LMDB "
                   f"free pages removed")
        gone = doc.get("quarantine_removed_names") or []
        if gone:
            click.echo(f"removed from quarantine/ (copies that may hold erased bytes): "
                       f"{', '.join(gone)}")


@main.command()
@PATH
@click.option("--prefix", type=PREFIX, default=None,
              help="Only keys starting with this KEY (str: every str key, hex: every bytes key).")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@JSON
def scan(path: str, prefix: str | bytes | None, limit: int | None, as_json: bool) -> None:
    """Keys and values in key order (streamed: any number of keys in bounded memory)."""
    # (more: a key after the first --limit ones; said as log's and history's are: a
    # `scan --limit 10` showing 10 keys did not say whether there were others)
    more = [False]
    with open_store(path, readonly=True) as store:
        # (None: every key; a typed empty prefix, '' or b'', every str or every bytes key)
        # (not islice: a --limit past sys.maxsize, which click takes, is a ValueError there)
        items = _first(store.scan(prefix=prefix), limit, more)
        if as_json:  # (one at a time; Ctrl-C or a failure mid-way closes the document)
            emit_json_list("items", ({"key": k, "value": v} for k, v in items),
                           tail=lambda: {"more": more[0]})
            return
        stream_table(([show_key(k), show_cell(v)] for k, v in items), ["KEY", "VALUE"])
    if more[0]:  # (on stderr: a pipe reading the table gets only the table)
        click.echo(f"(the first {limit} keys shown; more with a larger --limit)", err=True)


@main.command("log")
@PATH
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@JSON
def log_cmd(path: str, limit: int, as_json: bool) -> None:
    """Committed transactions, newest first."""
    more = [False]
    with open_store(path, readonly=True) as store:
        # (one more: is there anything older?)
        infos = _first(_engine.iter_log(store, limit + 1), limit, more)
        if as_json:
            emit_json_list("transactions", (
                {"txid": i.txid, "lsn": i.lsn, "timestamp": i.timestamp, "meta": i.meta,
                 "keys": list(i.keys), "actions": list(i.actions),
                 "tags": _tags(i)} for i in infos),
                tail=lambda: {"more": more[0]})
            return
        stream_table(([i.txid, i.lsn, show_time(i.timestamp, local=True), len(i.keys),
                       show_cell(i.meta) if i.meta is not None else ""] for i in infos),
                     ["TXID", "LSN", "TIME", "KEYS", "META"])
    if more[0]:  # (on stderr: a pipe reading the table gets only the table)
        click.echo(f"(the newest {limit} shown; older ones with --limit N)", err=True)


def _tags(info: Any) -> list[str]:
    """The tags an integration put on a transaction's COMMIT (``add_commit_tag``: the
    OpenAI session's ``"openai-run"``); [] when none (every commit before stop 78)."""
    tags = info.extra.get("tags") if isinstance(info.extra, dict) else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _first(items: Iterator[Any], limit: int | None, more: list[bool]) -> Iterator[Any]:
    """The first ``limit`` of ``items`` (all when None); ``more[0]`` set when there was
    another after them (``items`` was asked for one more than ``limit``)."""
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            more[0] = True
            return
        yield item


@main.command("history")
@PATH
@click.argument("key", type=KEY)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the newest N versions (default: every retained version).")
@JSON
def history_cmd(path: str, key: str | bytes, limit: int | None, as_json: bool) -> None:
    """Versions of KEY, newest first (streamed: any number of versions in bounded
    memory; --limit N: the newest N, and whether there are older ones)."""
    more, shown = [False], [0]

    def counted(items: Iterator[Any]) -> Iterator[Any]:
        for v in items:
            shown[0] += 1
            yield v
    with open_store(path, readonly=True) as store:
        versions = counted(_first(store.iter_history(
            key, None if limit is None else limit + 1), limit, more))
        if as_json:
            emit_json_list("versions", ({"txid": v.txid, "lsn": v.lsn, "value": v.value,
                                         "deleted": v.deleted} for v in versions),
                           head={"key": key}, tail=lambda: {"more": more[0]})
        else:
            stream_table(([v.txid, v.lsn, "(deleted)" if v.deleted else show_cell(v.value)]
                          for v in versions), ["TXID", "LSN", "VALUE"])
    if not shown[0]:
        # (a key never written — a typo — listed no version, exit 0, as if it were a key
        # with history; `get` of it exits 1.  The document, or the table's header, stays:
        # an empty list is its answer; the status and this line say nothing was found)
        note_problem()
        click.echo(f"walstore: key '{show_key(key)}' has no version in the store's history "
                   f"(never written, purged, or trimmed by its retention)", err=True)
        raise SystemExit(EXIT_PROBLEM)
    if as_json:
        return
    if more[0]:
        click.echo(f"(the newest {limit} shown; older ones with a larger --limit, or "
                   f"without it)", err=True)
