"""The replication commands of the ``walstore`` CLI: ``replicate``, ``restore``, ``replicas``.

Owns the three click commands and their output; :func:`register` adds them to the main
group (the CLI package calls it).  Exit status: 0 success; 1 a problem (the replica
refused, unreachable, damaged, a verify mismatch, compensations or file effects owed by a
restored store, file content its history names that the replica lacks); 2 usage (a bad
point, a path that is not a store, a replica URL or ``--endpoint-url`` that cannot work:
an invalid bucket name, an endpoint that is no http(s) URL; a flag's value its replicate
option does not take: one line naming the flag).  The one-shot verbs (``replicas``,
``restore`` without ``--follow``, ``replicate --once``) make their requests in
``one_shot_requests``: a connection that cannot be made to a server never reached fails at
once, not after 15 attempts (10-13 s); ``replicate`` and ``restore --follow`` retry it as
the shipper and follower always do (a server restarting).  The replicate options a flag sets:
``_FLAGS``; the rest keep their defaults.  ``--json`` is one strict JSON document.  No
output ever carries credentials: URLs are shown without user info.

Points on the command line: ``tx:N`` or bare digits (a txid), ``lsn:N`` (a log position),
an ISO-8601 time with an offset (``2026-05-01T12:00:00+00:00``, ``...Z``), else a restore
point name.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import signal
import sys
from typing import Any, Iterator

import click

from walstore import NotAStore, ReplicationError, UnknownPoint, WalstoreError

from . import _engine
from ._engine import command_word
from . import WalstoreCommand, main
from .common import DirPath, load_handlers
from .output import (EXIT_INTERRUPTED, EXIT_PROBLEM, EXIT_USAGE, Failure, emit_json as _emit,
                     fail as _fail, show_key)
from .output import end_progress, note_problem, one_line, read_point as _parse_point, \
    phase_progress, progress_printer, show_point_name, show_time


def parse_point(text: str) -> Any:
    """A restore target: an ISO-8601 time with an offset (the last commit at or before
    it), else a point as every command takes it (tx:N, lsn:N, a txid, a name).  A text
    that only begins like a date ("2026-release", "2026-05-01": no time of day) is a
    restore point name, as `rewind --to` reads it: it was refused as "not ISO-8601" /
    "needs an offset", and a restore point so named could not be restored to (a name the
    replica lacks is refused with a word on the time syntax: :func:`_time_hint`).  A date
    and a time of day without an offset is refused (which zone it meant is unknown).
    A name is a name exactly as given: spaces around it are part of it (a point named
    " name" was taken as "name", the one without them, or refused as unknown); only a
    time is read with its surrounding spaces ignored."""
    t = text.strip()
    if _looks_like_time(t):
        try:
            when = _dt.datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            # (a restore point of the replica named exactly ``text`` is that point, as
            # `rewind --to` reads it: decided once the manifest is read)
            (time_text,) = _engine.replication("TimeText")
            return time_text.of(when, text)
        if when is not None and len(t) > 10:  # (a time of day: not a date alone)
            raise click.BadParameter(f"time {text!r} needs an offset (e.g. +00:00 or Z)")
    return _parse_point(text)


def _looks_like_time(text: str) -> bool:
    return len(text) >= 10 and text[:4].isdigit() and text[4:5] == "-"


def _time_hint(point: Any) -> str:
    """What an unknown restore point name that looks like a time adds to its refusal."""
    if isinstance(point, str) and _looks_like_time(point):
        return (f"; {point!r} was read as a restore point name: a time is ISO-8601 with an "
                f"offset (e.g. 2026-05-01T12:00:00+00:00 or ...Z)")
    return ""


def _stop_on_signals() -> "_engine.Flag":
    # (not an Event: its set() from a handler could wait for the lock its wait() held when
    # the signal came; see walstore.signals)
    stop = _engine.Flag()
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            before[sig] = signal.signal(sig, lambda *_a: stop.set())
        except ValueError:  # not the main thread (tests): Ctrl-C ends it the usual way
            pass

    def give_back() -> None:
        # (the command's end, however it ends: the CLI called in-process — main([...],
        # standalone_mode=False), click's CliRunner — kept these handlers after it
        # returned, and the caller's Ctrl-C and SIGTERM only set a dead Flag)
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    click.get_current_context().call_on_close(give_back)
    return stop


def _check_where(url: str, opts: Any) -> None:
    """A replica URL or S3 endpoint that cannot work is a usage error (exit 2) naming what
    is wrong, before any request (a bad bucket name failed as a bare
    "ParamValidationError", an endpoint that is no URL as "an unexpected error")."""
    from urllib.parse import urlsplit

    check_url, check_endpoint = _engine.replication("check_url", "check_endpoint")
    try:
        check_url(url)
        if urlsplit(url).scheme == "s3":
            check_endpoint(opts.endpoint_url)
    except ReplicationError as e:
        _fail(str(e), EXIT_USAGE)


# The flags that set a replicate option: option name -> flag (a usage error names the flag).
_FLAGS = {"endpoint_url": "--endpoint-url", "region": "--region", "interval": "--interval",
          "snapshot_interval": "--snapshot-interval", "retention_seconds": "--retention"}

ENDPOINT = click.option("--endpoint-url", default=None,
                        help="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
REGION = click.option("--region", default=None,
                      help="S3 region (else the AWS chain's: AWS_REGION, config files).")


def _options(**flags: Any) -> Any:
    """The ReplicateOptions the flags given set (None: not given, the default); a value
    no option takes is a one-line usage error (exit 2) naming its flag."""
    (ReplicateOptions,) = _engine.replication("ReplicateOptions")
    try:
        return ReplicateOptions.from_any(None, **flags)
    except (TypeError, ValueError) as e:
        msg = str(e)
        for name, flag in _FLAGS.items():
            msg = msg.replace(f"replicate_options {name} ", f"{flag} ")
        _fail(msg, EXIT_USAGE)


@click.command("replicate", cls=WalstoreCommand)
@click.argument("path", type=DirPath(file_okay=False, readable=False))
@click.argument("url")
@click.option("--once", is_flag=True, help="Ship what is durable now, then exit (cron).")
@click.option("--interval", type=float, default=None, help="Seconds between rounds (1).")
@click.option("--snapshot-interval", type=float, default=None, metavar="S",
              help="Seconds between LMDB snapshots, if the state moved (3600).")
@click.option("--retention", type=float, default=None, metavar="S",
              help="Seconds snapshots (and the WAL they need) are kept (86400; at least 2).")
@ENDPOINT
@REGION
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document (with --once: what was shipped; else, at the stop: "
                   "where the replica stands).")
def replicate_cmd(path: str, url: str, once: bool, interval: float | None,
                  snapshot_interval: float | None, retention: float | None,
                  endpoint_url: str | None, region: str | None, as_json: bool) -> None:
    """Ship the store at PATH to the replica URL (s3://bucket/prefix or file:///dir)."""
    DirectorySource, Shipper = _engine.replication("DirectorySource", "Shipper")
    try:
        source = DirectorySource(path)
    except NotAStore as e:
        _fail(str(e), EXIT_USAGE)
    opts = _options(interval=interval, endpoint_url=endpoint_url, region=region,
                    snapshot_interval=snapshot_interval, retention_seconds=retention)
    _check_where(url, opts)
    (one_shot_requests,) = _engine.replication("one_shot_requests")
    try:  # (--once: one-shot requests, see the top)
        with one_shot_requests() if once else contextlib.nullcontext():
            shipper = Shipper(source, url, opts)
    except (ValueError, ReplicationError) as e:
        _fail(str(e), EXIT_USAGE if isinstance(e, ValueError) else EXIT_PROBLEM)
    if once:
        # progress on stderr (text mode): the WAL and file content shipped, and a
        # snapshot's upload, each on a line of its own (a round shipping hundreds of MiB
        # said nothing until it ended)
        shown = (None, None) if as_json else (phase_progress("replicate"),
                                               phase_progress("replicate snapshot"))
        try:
            summary = shipper.ship_once(*shown)
        except WalstoreError as e:
            end_progress()
            shipper.stop()
            _fail(str(e))
        end_progress()
        # what the round left wrong though it shipped (a snapshot that failed, local blobs
        # damaged and not shipped, a replica object compaction cannot read, no restore
        # reaching the replica's end): said in the status only, and a cron job's
        # `replicate --once` exited 0 saying "shipped ..." (--json: a snapshot_error key)
        try:
            problem = shipper.status().last_error
        finally:
            shipper.stop()
        if problem:
            note_problem()
        if as_json:
            _emit({"url": shipper.url, **summary, "problem": problem})
        else:
            snap = "" if summary["snapshot"] is None else \
                f", snapshot at LSN {summary['snapshot']}"
            click.echo(f"shipped {summary['objects']} WAL object(s), {summary['bytes']} bytes; "
                       f"replica at LSN {summary['position']}{snap}")
        if problem:
            click.echo(one_line(f"walstore: replicate: the round shipped, but: {problem}"),
                       err=True)
            sys.exit(EXIT_PROBLEM)
        return
    stop = _stop_on_signals()
    try:
        shipper.start()
    except WalstoreError as e:
        _fail(str(e))
    _status(f"replicating {source.path} to {shipper.url} (Ctrl-C stops)")
    last = None
    try:
        while not stop.wait(1.0):
            st = shipper.status()
            where = (f"{st.shipped_lsn} (recorded; replica not reached yet)"
                     if st.state == "starting" else st.shipped_lsn)
            line = (f"shipped LSN {where}  lag {st.lag_bytes} B / {st.lag_seconds:.1f} s"
                    + (f"  error: {st.last_error}" if st.last_error else ""))
            if line != last:
                _status(line)
                last = line
            # (shipping stopped for good; "refused" too: found after a start the server
            # did not answer in time, it ran on shipping nothing, never exiting: audit 55)
            if st.state in ("lease-lost", "failed", "refused"):
                _fail(st.last_error or "lease lost", EXIT_PROBLEM, "ReplicationError")
    finally:
        shipper.stop()
    if as_json:  # stopped by Ctrl-C or SIGTERM: where the replica stands, one document
        _emit(_stopped_doc(shipper))  # (as `restore --follow --json` says; it printed nothing)


def _stopped_doc(shipper: Any) -> dict[str, Any]:
    """``replicate --json`` (no ``--once``) at its stop: the shipper's last status."""
    st = shipper.status()
    return {"url": shipper.url, "stopped": True, "state": st.state,
            "shipped_lsn": st.shipped_lsn, "durable_lsn": st.durable_lsn,
            "lag_bytes": st.lag_bytes, "lag_seconds": st.lag_seconds,
            "last_error": st.last_error, "snapshots": st.snapshots}


def _status(line: str) -> None:
    """A status line of a long-running `replicate` or `restore --follow` on stderr.  One
    that cannot be written (its reader went away: ``2>&1 | logger`` and the logger died;
    a full disk) is dropped, as progress lines are: the BrokenPipeError ended the shipper
    or follower with exit 0, replication stopped without a word."""
    try:
        click.echo(line, err=True)
    except OSError:
        pass


def _follow_report(info: dict) -> None:
    """A follower's round on stderr: what it appended, or the transient error it retries."""
    if info.get("error"):
        _status(f"at LSN {info['position']}: {info['error']} (retrying in "
                f"{info['retry_in']} s)")
    elif info["appended"]:
        _status(f"at LSN {info['position']} (+{info['appended']} bytes)")
    if info.get("blobs_missing"):
        _status(f"at LSN {info['position']}: {_missing_text(info['blobs_missing'])}; "
                f"the records are copied all the same (`walstore verify` of the copy "
                f"names the file versions that need it)")


def _say(text: str) -> None:
    """A human line of `restore`/`replicas` on one line, every control character escaped
    (:func:`one_line`): it shows what the replica holds (restore point, action and
    compensator names, the writer's host and path), input walstore does not control; a
    name holding a newline split its row, an OSC/ESC sequence reached the terminal."""
    click.echo(one_line(text))


MISSING_SHOWN = 10  # missing blobs named on the terminal (--json lists them all)


def _missing_text(digests: list[str]) -> str:
    shown = ", ".join(digests[:MISSING_SHOWN])
    more = len(digests) - MISSING_SHOWN
    return (f"the replica lacks the content of {len(digests)} file version(s) its history "
            f"names (blobs/{shown}{f' and {more} more' if more > 0 else ''})")


@contextlib.contextmanager
def _said_restored(dest: str, compensate: bool) -> Iterator[None]:
    """A Ctrl-C in the block: see :func:`_interrupted_restored`."""
    try:
        yield
    except KeyboardInterrupt:
        _interrupted_restored(dest, compensate)


def _interrupted_restored(dest: str, compensate: bool) -> None:
    """Ctrl-C once DEST holds the restored store (renamed into place, STORE last), in
    the open that recovers it (and runs its compensations, ``--compensate``): said so,
    exit 130.  It said "restore interrupted (Ctrl-C)" of a complete copy, and the restore
    run again refused DEST as "exists and is not empty" (probe-audit67).  Before DEST is
    a store, the interrupt stays the command's plain one."""
    if not _engine.is_store(dest):
        raise  # (the Ctrl-C being handled, as it came)
    raise Failure(f"restore interrupted (Ctrl-C) after {dest} was restored, in its first "
                  f"open: `walstore recover {command_word(dest)}"
                  f"{' --handlers MODULE' if compensate else ''}` finishes it",
                  EXIT_INTERRUPTED, "KeyboardInterrupt") from None


@click.command("restore", cls=WalstoreCommand)
@click.argument("url")
@click.argument("dest", type=DirPath(file_okay=False, readable=False))
@click.option("--to", "to", default=None, metavar="POINT|TIME",
              help="tx:N, lsn:N, a TXID, a restore point NAME, or an ISO-8601 time with "
                   "offset (default: everything).")
@click.option("--follow", is_flag=True, help="Keep DEST a current read-only copy (Ctrl-C stops).")
@click.option("--compensate", is_flag=True,
              help="Run the compensations of transactions in flight at the cut.")
@click.option("--handlers", default=None, metavar="MODULE",
              help="Import compensators (COMPENSATORS dict) from MODULE, for --compensate.")
@ENDPOINT
@REGION
@click.option("--interval", type=float, default=None, help="--follow: seconds between polls (1).")
@click.option("--apply-every", type=float, default=30.0, show_default=True,
              help="--follow: seconds between applying the followed log to LMDB.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def restore_cmd(url: str, dest: str, to: str | None, follow: bool, compensate: bool,
                handlers: str | None, endpoint_url: str | None, region: str | None,
                interval: float | None, apply_every: float, as_json: bool) -> None:
    """Rebuild a store at DEST from the replica at URL, to a point or a time."""
    follow_fn, restore = _engine.replication("follow", "restore")
    point = parse_point(to) if to is not None else None
    if follow and (to is not None or compensate):
        _fail("--follow keeps a copy of everything; it takes no --to or --compensate", EXIT_USAGE)
    # (an option of another mode was ignored without a word: `--handlers refunds`
    # without --compensate restored, ran no compensation and left them owed, exit 0)
    given = click.get_current_context().get_parameter_source
    if handlers is not None and not compensate:
        _fail("--follow runs no compensation; it takes no --handlers" if follow else
              "--handlers names the compensators --compensate runs: add --compensate "
              "(without it no compensation runs)", EXIT_USAGE)
    if not follow and (interval is not None
                       or given("apply_every") != click.core.ParameterSource.DEFAULT):
        _fail("--interval and --apply-every pace --follow: add --follow, or leave them out",
              EXIT_USAGE)
    # (--interval: a NaN, or beyond a day, is a usage error)
    opts = _options(endpoint_url=endpoint_url, region=region, interval=interval)
    _check_where(url, opts)
    outer = _engine.enclosing_store(dest)
    if outer is not None:  # (as `init` and `backup` refuse one: a store inside a store)
        _fail(f"restore destination {dest} lies inside the store {outer}; choose a "
              f"destination outside it", EXIT_USAGE)
    comps = load_handlers(handlers, as_json)
    if follow:
        (check_apply_every,) = _engine.replication("check_apply_every")
        try:  # (a NaN, negative or inf one was taken: never applied on time)
            check_apply_every(apply_every)
        except ValueError as e:
            _fail(str(e).replace("apply_every", "--apply-every", 1), EXIT_USAGE)
        stop = _stop_on_signals()
        (display_url,) = _engine.replication("display_url")
        _status(f"following {display_url(url)} into {dest} (Ctrl-C stops)")
        rounds = {"rounds": 0, "position": None, "appended": 0}

        def noted(info: dict) -> None:  # (what the --json document says at the stop)
            rounds["rounds"] += 1
            rounds["position"] = info.get("position", rounds["position"])
            rounds["appended"] += info.get("appended") or 0
            _follow_report(info)
        try:  # (progress on stderr, text mode: the first restore into an empty DEST, which
            # said nothing until the first round however large the replica)
            follow_fn(url, dest, opts, stop=stop, apply_every=apply_every, on_round=noted,
                      progress=None if as_json else progress_printer("restore"))
        except WalstoreError as e:
            if isinstance(e, OSError):  # (DEST's disk full, EIO: said as every verb says an
                raise  # OS error, "No space left on device (N bytes free there, M needed)
                #        [ENOSPC]: FILE"; it said "[Errno 28] No space left on device: 'F'")
            _fail(str(e))
        finally:
            end_progress()
        if as_json:  # (stopped by Ctrl-C or a signal: where the copy stands)
            _emit({"followed": display_url(url), "dest": dest, "stopped": True,
                   "position": rounds["position"], "rounds": rounds["rounds"],
                   "appended_bytes": rounds["appended"]})
        return
    # progress on stderr (text mode): the WAL replayed into DEST, then the open's REDO of
    # it; a restore of a large replica said nothing until the end (as `replicas --verify`
    # did; `backup` and `recover` show theirs)
    replayed = None if as_json else progress_printer("restore")
    (one_shot_requests,) = _engine.replication("one_shot_requests")
    try:
        with one_shot_requests():  # (see the top)
            report = restore(url, dest, point, opts, compensate=compensate,
                             progress=replayed)
    except KeyboardInterrupt:
        _interrupted_restored(dest, compensate)
    except UnknownPoint as e:  # (--to names nothing the replica holds: usage)
        _fail(str(e) + _time_hint(point), EXIT_USAGE)
    except ReplicationError as e:  # (a DEST found not empty up front is a usage error)
        _fail(str(e), EXIT_USAGE if getattr(e, "usage", False) else EXIT_PROBLEM)
    except (TypeError, ValueError) as e:
        _fail(str(e), EXIT_USAGE)
    finally:
        end_progress()
    with _said_restored(dest, compensate):  # (a Ctrl-C from here: DEST is restored)
        import walstore
        try:
            store = walstore.open(dest, compensators=comps if compensate else None,
                                  progress=None if as_json else progress_printer("recover"))
        except WalstoreError as e:
            _fail(f"restored {dest}, but opening it failed: {e}")
        finally:
            end_progress()
        try:
            pending = [{"id": a.id, "txid": a.txid, "name": a.name, "compensate": a.compensate,
                        "state": a.state, "error": a.error}
                       for a in store.pending_compensations()]
            if compensate:  # undone by that open, except those it could not put back
                rec = store.last_recovery
                failed = {p.lsn for p in getattr(rec, "problems", ())
                          if p.kind == "file-undo-failed"}
                report["owed_file_effects"] = [e for e in report["owed_file_effects"]
                                               if e["lsn"] in failed]
        finally:
            store.close()
    report["pending_compensations"] = pending
    # a bytes prefix is bytes again (the report gives it as {"hex": ...}): `--json` says
    # it as every bytes key, {"base64": ...}, the human line as the key syntax, hex:...
    # (it was {"hex": "00ff"}, and "purge of 'bytes 00ff'", as a str prefix
    # "bytes 00ff" shows)
    report["purges_applied"] = [p if isinstance(p, str) else bytes.fromhex(p["hex"])
                                for p in report.get("purges_applied", ())]
    owed_files = report["owed_file_effects"]
    missing = report["blobs_missing"]
    if pending or owed_files or missing:  # (before printing: see note_problem)
        note_problem()
    if as_json:
        _emit(report)
    else:
        _say(f"restored {report['dest']} from {report['url']}: {report['target']}")
        _say(f"  snapshot LSN {report['snapshot_lsn']}, {report['wal_objects']} WAL "
             f"object(s), {report['wal_bytes']} bytes replayed, cut at LSN "
             f"{report['cut_lsn']}, {report['seconds']} s")
        for k in report.get("snapshots_skipped", ()):
            _say(f"  snapshot LSN {k['lsn']} skipped ({k['error']}): restored from the "
                 f"snapshot at LSN {report['snapshot_lsn']} and the WAL after it (the state "
                 f"at LSN {k['lsn']} checked against the manifest's digest where it has one)")
        for p in report["purges_applied"]:
            _say(f"  purge of {show_key(p)} after the cut applied here too (erased keys "
                 f"stay erased)")
        if report["in_flight_txids"]:
            _say(f"  transactions in flight at the cut (not committed): "
                 f"{', '.join(map(str, report['in_flight_txids']))}")
        for a in pending:  # (with its state and last error: a --compensate whose
            # compensation raised said only "pending", the error nowhere)
            _say(f"  {'failed' if a['state'] == 'failed' else 'pending'} compensation "
                 f"{a['id']} {a['name']} -> {a['compensate']}"
                 + (f": {one_line(a['error'])}" if compensate and a["error"] else ""))
        for f in owed_files:
            more = len(f["paths"]) < (f["paths_total"] or 0)
            _say(f"  owed file effect of transaction {f['txid']} (LSN {f['lsn']}, "
                 f"{f['op']}) in {f['workspace']}: "
                 f"{', '.join(f['paths']) or 'the watched tree'}{' ...' if more else ''}")
    if pending and not as_json and compensate:
        # (it said "rerun with --compensate", as without it: rerun into DEST is refused,
        # DEST is not empty; the copy's own recovery retries them)
        click.echo(f"compensations did not all run here (failed, or no handler for them): "
                   f"`walstore recover {command_word(report['dest'])} --handlers MODULE` retries them, or "
                   f"`walstore resolve` once handled by hand", err=True)
    elif pending and not as_json:
        # (it said "rerun with --compensate": into DEST, which is not empty now, that is
        # refused; the held compensations never run in this copy)
        click.echo("compensations are pending (the machine that ran those actions is "
                   "gone): restore again into an empty destination with --compensate "
                   "--handlers MODULE to run them, or `walstore resolve` once handled "
                   "where they ran", err=True)
    if owed_files and not as_json:
        click.echo("file changes of transactions in flight at the cut were not undone (held: "
                   "the files on disk may still hold them, the restored state does not): "
                   "restore with --compensate on the machine that has the workspace to "
                   "put them back", err=True)
    if missing and not as_json:
        click.echo(f"{_missing_text(missing)}: the copy's file history at those points "
                   f"cannot be read (`walstore verify {command_word(report['dest'])}` names the versions)",
                   err=True)
    if pending or owed_files or missing:
        sys.exit(EXIT_PROBLEM)


@click.command("replicas", cls=WalstoreCommand)
@click.argument("url")
@click.option("--verify", is_flag=True, help="Restore to a temp dir and compare state digests.")
@ENDPOINT
@REGION
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def replicas_cmd(url: str, verify: bool, endpoint_url: str | None, region: str | None,
                 as_json: bool) -> None:
    """Snapshots, WAL range, restore points and lag of the replica at URL."""
    replicas, one_shot_requests = _engine.replication("replicas", "one_shot_requests")
    opts = _options(endpoint_url=endpoint_url, region=region)
    _check_where(url, opts)
    try:  # (--verify reads every object: its progress on stderr, never into --json)
        with one_shot_requests():  # (see the top)
            r = replicas(url, verify, opts,
                         progress=None if as_json else progress_printer("verify"))
    except ReplicationError as e:
        _fail(str(e))
    bad = verify and not r["verify"]["ok"]
    if bad:  # (before printing: a reader gone mid-output keeps exit 1, see note_problem)
        note_problem()
    if as_json:  # (stable keys: `verify` null without --verify; it was absent)
        _emit({**r, "verify": r.get("verify")})
        if bad:
            sys.exit(EXIT_PROBLEM)
        return
    w = r["writer"]
    _say(f"replica   {r['url']}  store {r['store_id']}  lineage {r['lineage']}")
    _say(f"writer    process {w['pid']} on {w['host']} ({w['path']})")
    age = r["age_seconds"]  # (negative: the writer's clock is ahead of this one's; "-3600
    # s ago" was shown: audit 67)
    _say(f"updated   {show_time(r['updated'])} ("
         + (f"{age:.0f} s ago)" if age > -0.5 else
            f"{-age:.0f} s ahead of this machine's clock: its clock or the writer's is off)"))
    if r.get("complete_to") is not None:  # (a restore to a later time is refused)
        # (never "complete" alone of a replica no restore reaches the end of, nor without
        # a word of the commits its holes lost: audit 67)
        _say(f"complete  every commit up to {show_time(r['complete_to'])}"
             + (" but for the hole(s) below" if r["holes"] else "")
             + ("" if not r.get("end_unrestorable") else
                f"; but no restore reaches the replica's end yet: "
                f"{one_line(r['end_unrestorable'])}"))
    lc = r["last_commit"] or {}
    _say(f"WAL       LSN {r['wal']['first']}..{r['wal']['end']}  {r['wal']['objects']} "
         f"object(s), {r['wal']['bytes']} bytes; last commit tx {lc.get('tx', '-')} at "
         f"{show_time(lc.get('ts'))}")
    every = r.get("restore_everything")
    if every and every["past_wal_end"]:  # (what a restore of everything gives: audit 68)
        _say(f"restore   a restore of everything restores the snapshot at LSN "
             f"{every['lsn']} (last commit tx {every['txid'] if every['txid'] is not None else '-'}"
             f"), past the WAL's end (LSN {every['wal_end']}, tx "
             f"{every['wal_end_txid'] if every['wal_end_txid'] is not None else '-'}): the "
             f"commits between them are in it but not restorable one by one (to a point, "
             f"txid or time) until its writer ships the WAL to it")
    for s in r["snapshots"]:
        _say(f"snapshot  LSN {s['lsn']:<12} {show_time(s['time'])}  {s['bytes']} bytes, "
             f"{s['keys']} keys{'' if s['restorable'] else '  (not yet restorable)'}")
    for p in r["restore_points"]:
        gone = p.get("dropped_lsn")
        _say(f"point     {show_point_name(p['name']):<20} LSN {p['lsn']:<12} {show_time(p['time'])}"
             + ("" if not p.get("dropped") else
                f"  (dropped at LSN {gone}: a restore to it restores its old position)"
                if gone is not None else "  (dropped)")
             + ("  (past the WAL's end: in a restore of everything only)"
                if p.get("past_wal_end") else ""))
    for h in r["holes"]:
        _say(f"hole      LSN {h['from']}..{h['to']}: {h['reason']}")
    if verify:
        for c in r["verify"]["checks"]:
            _say(f"verify    {c['check']}: {'ok' if c['ok'] else 'FAILED'}"
                 + (f" ({c['error']})" if c.get("error") else ""))
        if bad:
            sys.exit(EXIT_PROBLEM)


for _cmd in (replicate_cmd, restore_cmd, replicas_cmd):
    main.add_command(_cmd)
