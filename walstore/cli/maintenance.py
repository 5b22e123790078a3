"""Operator verbs on a whole store: init, recover, verify, stats, checkpoint, backup, dump."""
from __future__ import annotations

import os
from typing import Any

import click

import walstore

from . import _engine, main
from ._engine import command_word
from .common import (HANDLERS, JSON, NORMAL_PROBLEMS, PATH, DirPath, action_docs, action_table,
                     load_handlers, open_store, owed_header)
from .output import (CELL_CHARS, EXIT_INTERRUPTED, EXIT_PROBLEM, Failure, UsageProblem,
                     cut_text, emit_json,
                     emit_json_list, emit_summary,
                     end_progress, kv_lines, note_problem, one_line, phase_progress,
                     progress_printer, show_gid, show_key, some)

# Recovery problems that are a normal crash outcome (exit 0), not a problem found.


@main.command()
@PATH
def init(path: str) -> None:
    """Create an empty store at PATH."""
    if _engine.is_store(path):
        raise UsageProblem(f"{path} is already a store")
    outer = _engine.enclosing_store(path)
    if outer is not None:  # (its WAL or LMDB directory, or beside them: see enclosing_store)
        raise UsageProblem(f"init failed: {path} lies inside the store {outer}; choose a "
                           f"path outside it")
    walstore.open(path).close()
    click.echo(f"created store {os.path.abspath(path)}")


@main.command()
@PATH
@click.option("--mode", type=click.Choice(_engine.RECOVERY_MODES), default="strict",
              show_default=True, help="What to give up when the WAL is damaged.")
@click.option("--rebuild-state", is_flag=True,
              help="When LMDB's state is lost or damaged and the WAL is whole from LSN 0: "
                   "move it to quarantine/ and rebuild it from the log.")
@HANDLERS
@JSON
def recover(path: str, mode: str, rebuild_state: bool, handlers: str | None,
            as_json: bool) -> None:
    """Recover PATH after a crash: REDO committed work, UNDO losers, cut a torn tail.

    Lists every action still owing its compensation (id, name, compensator, state, last
    error); exit 1 when any is owed, a transaction is in doubt or damage was found.
    LMDB's state lost or damaged: says whether --rebuild-state can rebuild it from
    the log, or only a backup or replica can bring the store back.
    """
    compensators = load_handlers(handlers, as_json)
    progress = None if as_json else progress_printer("recover")
    rebuilt = None
    try:
        store = _engine.open_for_recovery(path, mode, compensators, progress)
    except walstore.CorruptionError as e:
        if not (e.file and e.file.startswith(_engine.lmdb_file(path))):
            _report_refused(e, mode, as_json)
        # LMDB itself is damaged: not a log the modes could cut
        if not rebuild_state:
            _report_lmdb_damaged(path, e, mode, as_json)
        rebuilt = _engine.rebuild_state(path)  # (refuses, changing nothing, if it cannot)
        store = _engine.open_for_recovery(path, mode, compensators, progress)
    end_progress()
    with store:
        report = store.last_recovery
        owed = store.pending_compensations()
        registered = dict(store.compensators)
        found_now = {(c.get("workspace"), c.get("path")) for c in
                     getattr(report, "file_conflicts", ())}
        earlier = [c for c in store.file_conflicts()
                   if (c.get("workspace"), c.get("path")) not in found_now]
    doc = _recover_doc(mode)
    doc.update(report.as_dict(), recovered=True)
    doc["pending_actions"] = action_docs(owed, registered)
    doc["file_conflicts_recorded_earlier"] = earlier
    if rebuilt is not None:
        doc["rebuilt_state"] = {"damaged_state_moved_to": rebuilt}
    problem = (any(p.kind not in NORMAL_PROBLEMS for p in report.problems)
               or bool(report.in_doubt) or bool(owed))
    if problem:  # (before printing: a reader gone mid-output keeps exit 1, see note_problem)
        note_problem()
    if as_json:
        emit_json(doc)
    else:
        if rebuilt is not None:
            click.echo(f"LMDB's state was rebuilt from the log (the damaged one is kept in "
                       f"{rebuilt})")
        _print_recovery(doc)
        if earlier:  # (an application's open recovered the store before this command)
            click.echo(f"file conflicts recorded by earlier recoveries ({len(earlier)}; "
                       f"walstore's version kept aside, the other one stayed):")
            for c in earlier[-20:]:
                # (a conflict with nothing of walstore's to keep — a directory it made
                # holding others' files, walstore's version absent — has no copy: it
                # printed "-> None")
                kept = (f"-> {c['saved_as']}" if c.get("saved_as") else
                        f"(walstore's version: {c.get('before')}; no copy)")
                click.echo(one_line(f"  {c.get('path')} (workspace {c.get('workspace')}, "
                                    f"transaction {c.get('tx')}) {kept}"))
        if owed:
            click.echo(owed_header(owed))
            action_table(owed, registered, results=False)
        if problem:  # ("recovered cleanly" above a list of owed compensations misled)
            click.echo(f"recovered; not settled: {len(owed)} compensation(s) owed"
                       if owed and not report.in_doubt else
                       "recovered; not settled (see above)")
        else:
            click.echo("recovered" + (" cleanly" if doc["clean"] and not earlier else ""))
    raise SystemExit(EXIT_PROBLEM if problem else 0)


def _recover_doc(mode: str) -> dict:
    """The one shape of `recover --json`, recovered or refused, every key present: what
    does not apply is null (or an empty list).  A refusal printed only its own keys (no
    `records`, `pending_actions`, ...) and a recovery none of `refused`, `reason`,
    `file`, `offset`, `lsn`: a script reading either met a KeyError."""
    doc = {k: [] if isinstance(v, list) else None
           for k, v in _engine.recovery_report_keys(mode).items()}
    doc.update(mode=mode, recovered=False, refused=False, reason=None, file=None,
               offset=None, lsn=None, pending_actions=[], file_conflicts_recorded_earlier=[],
               rebuilt_state=None)
    return doc


def _report_lmdb_damaged(path: str, e: walstore.CorruptionError, mode: str = "strict",
                         as_json: bool = False) -> None:
    """LMDB's state is lost or damaged: the options are a rebuild from the log (when it
    is whole from LSN 0) or a backup / replica.  Nothing was changed.  One error line, as
    every command says LMDB damage; under --json first the one shape of `recover --json`,
    refused (it printed ``{"error": ...}`` alone: a script reading ``doc["refused"]`` of
    a refusal met a KeyError for this damage only: probe-audit59)."""
    why = _engine.rebuild_refusal(path)
    if why is None:
        option = (f"options: `walstore recover {command_word(path)} --rebuild-state` rebuilds LMDB from "
                  f"the WAL, which is whole from LSN 0 (the damaged state is moved to "
                  f"quarantine/); or restore the store from a backup or a replica")
    else:
        option = (f"it cannot be rebuilt from the log ({why}): the option is to restore "
                  f"the store from a backup or a replica")
    if as_json:
        note_problem()
        doc = _recover_doc(mode)
        doc.update(refused=True, reason=e.reason, file=e.file, offset=e.offset, lsn=e.lsn,
                   clean=False, problems=[{
                       "kind": "refused", "file": e.file, "offset": e.offset, "lsn": e.lsn,
                       "reason": f"{e.reason}; {option}", "bytes": 0, "action": "refused",
                       "quarantined": None}])
        emit_json(doc)  # (the error line follows on stderr; no second document)
    raise Failure(f"recover failed: corruption: {e}; nothing was changed; {option}",
                  EXIT_PROBLEM, type(e).__name__)


def _report_refused(e: walstore.CorruptionError, mode: str, as_json: bool) -> None:
    """A recovery refused (strict, damage in the log): nothing changed.  Its ``--json``
    document has a recovery report's ``clean``, ``mode`` and ``problems`` too (a script
    reading ``doc["clean"]`` met a KeyError: probe probe-ops)."""
    problem = {"kind": "refused", "file": e.file, "offset": e.offset, "lsn": e.lsn,
               "reason": e.reason, "bytes": 0, "action": "refused", "quarantined": None}
    note_problem()  # (before printing: see note_problem)
    doc = _recover_doc(mode)
    doc.update(refused=True, reason=e.reason, file=e.file, offset=e.offset, lsn=e.lsn,
               clean=False, problems=[problem])
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"recovery refused: {e}")
        if str(e).startswith("foreign-log"):  # (no mode gives up a log that is not this one)
            click.echo("nothing was changed; no --mode applies a log LMDB did not come from")
        elif str(e).startswith("stray-file"):  # (not the log's damage: no mode helps)
            click.echo("nothing was changed; no --mode applies: move the entry named out "
                       "of wal/, then run recover again")
        elif str(e).startswith("the store's log is missing"):  # (no wal/: no log to cut)
            click.echo("nothing was changed; no --mode applies: the log directory is gone; "
                       "put it back, or restore the store from a backup or a replica")
        else:
            # only the modes that give up more than this one (a refused tolerate-tail
            # was told to try tolerate-tail: probe-audit59)
            more = _engine.RECOVERY_MODES[_engine.RECOVERY_MODES.index(mode) + 1:]
            if more:
                click.echo("nothing after the damage was applied; choose what to give up "
                           "with --mode " + " | ".join(more))
            else:
                click.echo("nothing after the damage was applied; no --mode gives up more: "
                           "restore the store from a backup or a replica")
    raise SystemExit(EXIT_PROBLEM)


def _print_recovery(doc: dict) -> None:
    kv_lines([("mode", doc["mode"]), ("segments", doc["segments"]),
              ("records read", doc["records"]), ("commits redone", doc["redone"]),
              ("log ends at LSN", doc["end_lsn"]), ("torn bytes cut", doc["torn_bytes"]),
              ("losers (no commit)", len(doc["losers"])), ("seconds", f"{doc['seconds']:.3f}")])
    for p in doc["problems"]:
        # (a path, not log bytes: a file conflict, a file undo owed — its LSN is its
        # record's, and "at <workspace> offset 0 (LSN 649), 0 bytes owed" read as if
        # nothing were owed beside a reason naming the bytes a file needs: a path on one line)
        if p["kind"] == "file-undo-failed" or not p["bytes"] and not p["offset"] \
                and not p["lsn"]:
            click.echo(one_line(f"{p['kind']}: {p['reason']}: {p['file']} "
                                f"{p['action'] or 'found'}"
                                + (f" -> {p['quarantined']}" if p['quarantined'] else "")))
            continue
        click.echo(f"{p['kind']}: {p['reason']} at {p['file']} offset {p['offset']} "
                   f"(LSN {p['lsn']}), {p['bytes']} bytes {p['action'] or 'found'}"
                   + (f" -> {p['quarantined']}" if p['quarantined'] else ""))
    if doc["given_up_records"]:
        click.echo(f"gave up {doc['given_up_records']} valid records behind the damage "
                   f"(records of txids {some(doc['given_up_txids'])}); they are in "
                   f"quarantine/")
    if doc.get("given_up_unreadable_bytes"):
        click.echo(f"gave up {doc['given_up_unreadable_bytes']} bytes of dropped segments "
                   f"that no valid record could be read from (what they held is unknown); "
                   f"they are in quarantine/")
    if doc.get("compensated"):
        click.echo(f"compensations run: {some(doc['compensated'])}")
    if doc.get("in_doubt"):
        click.echo(f"in-doubt prepared transactions (need `walstore commit-prepared` or "
                   f"`rollback-prepared`; a walstore.atomic group's, `walstore "
                   f"resolve-atomic` with its coordinator's path): "
                   f"{', '.join(map(show_gid, doc['in_doubt']))}")


@main.command()
@PATH
@JSON
def verify(path: str, as_json: bool) -> None:
    """Check every checksum and WAL-vs-LMDB consistency (read-only; hashes every blob of
    file content the store refers to); list in-doubt transactions and owed compensations
    (exit 1: they need a decision)."""
    # (progress, text mode: the log's walk, the file content hashed, LMDB's pages walked
    # and its rows decoded — those two took seconds a GB, nothing shown)
    rep = _engine.verify(path, *((None, None, None, None) if as_json else
                                 (progress_printer("verify"),
                                  phase_progress("verify file content"),
                                  phase_progress("verify LMDB pages"),
                                  phase_progress("verify LMDB rows"))))
    end_progress()
    if not rep.ok:  # (before printing: a reader gone mid-output keeps exit 1)
        note_problem()
    if as_json:
        emit_json(rep.as_dict())
    else:
        # ("-": not checked, null in JSON: the damage listed below stopped that check)
        kv_lines([(name, "-" if value is None else value) for name, value in (
            ("segments", rep.segments), ("records", rep.records), ("commits", rep.commits),
            ("LMDB keys", rep.lmdb_keys), ("keys checked vs WAL", rep.keys_checked),
            ("blobs checked", rep.blobs_checked),
            ("blob bytes hashed", rep.blob_bytes_hashed),
            ("applied LSN", rep.applied_lsn), ("WAL end LSN", rep.wal_end_lsn))])
        # (one line each, control characters escaped: they name actions, compensators and
        # files, whose names may hold any; an action named "charge\a\nx" split its line)
        for w in rep.warnings:
            click.echo(one_line(f"warning: {w}"))
        for e in rep.errors:
            click.echo(one_line(f"error: {e}"))
        if rep.errors.omitted:
            click.echo(f"error: ... and {rep.errors.omitted} more problem(s), not listed")
        if rep.needs_recovery:
            click.echo("note: the store was not shut down cleanly: the next open (or "
                       "`walstore recover`) recovers it")
        for a in rep.attention(show_gid):  # (a compensator's 4 KB error made a 4 KB line:
            line = f"needs a decision: {a}"  # cut; a gid never is: it is typed back whole)
            if not a.startswith("in-doubt prepared transaction "):
                line = cut_text(line, 2 * CELL_CHARS)
            click.echo(one_line(line))
        if rep.errors:
            click.echo(f"{rep.errors.total} problem(s) found")
        elif not rep.settled:
            click.echo(f"no damage found; {len(rep.attention())} thing(s) need a decision")
        else:
            click.echo("ok")
    raise SystemExit(0 if rep.ok else EXIT_PROBLEM)


@main.command()
@PATH
@JSON
def stats(path: str, as_json: bool) -> None:
    """Sizes, positions and counters of a store."""
    damage: list = []
    with open_store(path, readonly=True) as store:
        doc = _engine.store_stats(store, path, damage)
    for e in damage:  # (a damaged map size note: the figures, one line, exit 1 — it was the
        # command's failure, no figure said; before printing: see note_problem)
        note_problem()
        click.echo(f"walstore: stats: corruption: {one_line(str(e))}; lmdb_map_size is the "
                   f"one data.mdb records (`walstore verify {command_word(path)}` lists the "
                   f"damage)", err=True)
    emit_summary(doc, as_json)


@main.command()
@PATH
@JSON
def checkpoint(path: str, as_json: bool) -> None:
    """Apply the WAL to LMDB, sync it, and trim old WAL segments."""
    with open_store(path, progress=None if as_json else progress_printer("recover")) as store:
        end_progress()  # (a store not shut down cleanly: its recovery's walk was shown)
        doc = store.checkpoint()
    emit_summary(doc, as_json)


@main.command()
@PATH
@click.argument("dest", type=DirPath(file_okay=False, readable=False))
@JSON
def backup(path: str, dest: str, as_json: bool) -> None:
    """Copy PATH to DEST consistently, even while a writer is running."""
    src, target = os.path.realpath(path), os.path.realpath(dest)
    if target == src or target.startswith(src.rstrip(os.sep) + os.sep):
        raise UsageProblem(f"backup destination {dest} is the store {path} or lies inside it")
    outer = _engine.enclosing_store(dest)
    if outer is not None:
        raise UsageProblem(f"backup destination {dest} lies inside the store {outer}; "
                           f"choose a destination outside it")
    try:
        doc = _engine.backup(path, dest, None if as_json else progress_printer("backup"))
    except KeyboardInterrupt:
        if not _engine.is_store(dest):  # (DEST as it was: absent or empty)
            raise
        # (the copy was in place, synced: "backup interrupted (Ctrl-C)" said of a complete
        # backup, and the backup run again refused DEST as not empty: probe-audit67)
        raise Failure(f"backup interrupted (Ctrl-C) once its copy was complete: {dest} "
                      f"holds the backup", EXIT_INTERRUPTED, "KeyboardInterrupt") from None
    end_progress()
    emit_summary(doc, as_json)


class _Lsn(click.ParamType):
    """A log position: ``N`` or ``lsn:N`` (as every other point argument writes it)."""
    name = "LSN"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value)
        digits = text[4:] if text.startswith("lsn:") else text
        if not (digits.isascii() and digits.isdigit()):
            raise UsageProblem(f"--from {text!r} is not a log position (N or lsn:N)")
        return int(digits)


# Every `dump --json` record has these keys, null where they do not apply: a damage
# pseudo-record (TORN, CORRUPT, GAP, ...) had no end_lsn, synced_lsn or payload (a GAP
# no offset), a BAD-PAYLOAD one no payload but a record_type: a script reading
# r["payload"] met a KeyError at the first damage.
_DUMP_KEYS = dict.fromkeys(("lsn", "end_lsn", "type", "record_type", "length", "synced_lsn",
                            "file", "offset", "payload", "summary"))


def _dump_summary(r: dict) -> str:
    """A record's summary for ``dump``'s human line: the keys it writes as the command line
    writes keys (:func:`show_key`: ``hex:...`` for bytes, ``str:hex:00`` for that str
    key), and nothing that breaks the line.  The walk's own summary said ``b'\\x00'`` for a
    bytes key and ``hex:00`` for the str key "hex:00" (which pasted back names the bytes
    key), and a key or restore point name holding a newline split the record's line in
    two, the second looking like a record of its own (probe audit48).  ``--json`` keeps
    the walk's summary: its ``payload`` has the keys, tagged."""
    payload = r.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("w"), list):
        keys = [w["key"] for w in payload["w"]]
        shown = ", ".join(show_key(k) for k in keys[:4]) + (
            f" (+{len(keys) - 4})" if len(keys) > 4 else "")
        return f"tx {payload.get('tx')}: {len(keys)} write(s): {one_line(shown)}"
    return one_line(str(r.get("summary", "")))


@main.command()
@PATH
@click.option("--from", "from_lsn", type=_Lsn(), default=0, help="First LSN (N or lsn:N).")
@JSON
def dump(path: str, from_lsn: int, as_json: bool) -> None:
    """Raw WAL records, decoded (exit 1 when the walk met damage: CORRUPT, TRUNCATED, GAP,
    BAD-SEGMENT, MISSING-NEXT)."""
    damaged: list[str] = []

    def noting(records):
        for r in records:
            if r["type"] in _engine.WAL_DAMAGE:
                damaged.append(r["type"])
                note_problem()  # (a reader gone after it keeps exit 1)
            yield r
    records = noting(_engine.wal_records(path, from_lsn))
    if as_json:  # streamed, one record at a time: bounded memory on any WAL
        emit_json_list("records", ({**_DUMP_KEYS, **r} for r in records))
    else:
        for r in records:
            where = ""
            if r["type"] in _engine.WAL_DAMAGE:  # where it is, as every damage report says
                where = f" [{r['file']}" + (f", offset {r['offset']}]" if "offset" in r
                                             else "]")
            click.echo(f"{r['lsn']:>12}  {r['type']:<17} {r['length']:>7}  "
                       f"{_dump_summary(r)}{where}")
    if damaged:
        raise SystemExit(EXIT_PROBLEM)
