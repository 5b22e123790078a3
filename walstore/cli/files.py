"""Reversible-files verbs: ``walstore files`` (the paths walstore tracks in each registered
workspace, their state at a point and their versions) and ``walstore diff`` (keys and
files changed between two points).  Both open the store read-only."""
from __future__ import annotations

import itertools
from typing import Any

import click

from . import _engine, main
from .common import JSON, PATH, open_store
from .output import (POINT, JsonStream, UsageProblem, emit_json_list, jsonable, one_line,
                     point_text, settle_point, show_cell, show_key, stream_table, table)


def _entry_text(e: dict | None) -> str:
    if e is None:
        return "(unchanged by walstore)"
    if e["kind"] == "file":
        return f"file {e['mode']} {e['size']} B sha256:{e['sha256'][:12]}"
    if e["kind"] == "dir":
        return f"dir {e['mode']}"
    if e["kind"] == "symlink":
        return f"symlink -> {e['target']}"
    return "absent"


@main.command("files")
@PATH
@click.option("--workspace", "workspace", default=None, metavar="DIR",
              help="Only this registered workspace.")
@click.option("--at", "at", type=POINT, default=None,
              help="State at tx:N, lsn:N, a TXID or a restore point NAME (default: now).")
@JSON
def files_cmd(path: str, workspace: str | None, at: Any, as_json: bool) -> None:
    """Registered workspaces and the files walstore changed in them, with versions."""
    with open_store(path, readonly=True) as store:
        at = settle_point(store.restore_points(), at)
        try:
            docs = _engine.tracked_files(store, workspace, at)
        except ValueError as e:  # --workspace names no registered workspace
            raise UsageProblem(str(e)) from None
        # streamed: workspaces, their paths and each path's versions as they are read
        # (held whole, a workspace's document took ~4 KB a version)
        if as_json:
            emit_json_list("workspaces", (
                JsonStream({k: w[k] for k in ("root", "scope", "ignore")}, "files", (
                    JsonStream({"path": f["path"], "entry": f["entry"]}, "versions",
                               f["versions"]) for f in w["files"])) for w in docs),
                head={"at": None if at is None else jsonable(point_text(at))})
            return
        if not docs:
            click.echo("no registered workspace")
        for w in docs:
            extra = [f"scope {show_key(w['scope'])}" if w["scope"] is not None else "",
                     f"ignore {', '.join(w['ignore'])}" if w["ignore"] else ""]
            extra = [x for x in extra if x]
            click.echo(one_line(f"workspace {w['root']}"
                                + (f" ({'; '.join(extra)})" if extra else "")))
            rows = (_path_row(f) for f in w["files"])
            first = next(rows, None)
            if first is not None:
                stream_table(itertools.chain([first], rows),
                             ["PATH", "STATE" + (" AT POINT" if at is not None else ""),
                              "VERSIONS", "LAST TXID"])
            else:
                click.echo("  (no file changed through walstore)")


def _path_row(f: dict) -> list:
    """A ``files`` table row: the path, its state, how many versions, the newest's txid
    (the versions counted as they are read, not held)."""
    count, last = 0, ""
    for v in f["versions"]:
        if not count:
            last = v["txid"]
        count += 1
    return [f["path"] or ".", _entry_text(f["entry"]), count, last]


@main.command("diff")
@PATH
@click.option("--from", "start", type=POINT, required=True,
              help="tx:N, lsn:N, a TXID or a restore point NAME.")
@click.option("--to", "end", type=POINT, default=None, help="Another point (default: now).")
@JSON
def diff_cmd(path: str, start: Any, end: Any, as_json: bool) -> None:
    """Keys and files whose state differs between two points."""
    with open_store(path, readonly=True) as store:
        names = store.restore_points()
        doc = _engine.changes_between(store, settle_point(names, start),
                                      settle_point(names, end))
        # the changed keys streamed with their values, one at a time (held whole, a diff
        # of many large values took their size several times over)
        if as_json:
            emit_json_list("keys", doc["keys"], head={"from_lsn": doc["from_lsn"],
                                                      "to_lsn": doc["to_lsn"]},
                           tail=lambda: {"files": doc["files"]})
            return
        click.echo(f"between LSN {doc['from_lsn']} and LSN {doc['to_lsn']}:")
        rows = ([show_key(k["key"]), show_cell(k["before"]) if k["existed"] else "(absent)",
                 show_cell(k["after"]) if k["exists"] else "(absent)"] for k in doc["keys"])
        first = next(rows, None)
        if first is not None:
            stream_table(itertools.chain([first], rows), ["KEY", "BEFORE", "AFTER"])
        else:
            click.echo("no key changed")
    if doc["files"]:
        table([[f["kind"], f["path"], _entry_text(f["before"]), _entry_text(f["after"])]
               for f in doc["files"]], ["CHANGE", "PATH", "BEFORE", "AFTER"])
    else:
        click.echo("no file changed")
