"""The ``walstore`` command line: the verbs an operator thinks in.

Exit status: 0 success; 1 a problem found (corruption, a refused recovery, a failed
verify, pending compensations, in-doubt transactions); 2 usage error (click's own, and
bad arguments such as a path that is not a store).  ``--json`` prints one JSON document
with stable keys; human output is short aligned text, progress goes to stderr.
"""
from __future__ import annotations

import base64
import json
import sys
from typing import Any

import click


from .errors import CorruptionError, NeedsRecovery, NotAStore, StoreLocked

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


def jsonable(obj: Any) -> Any:
    """Make msgpack-shaped data JSON-safe: bytes become {"base64": ...}."""
    if isinstance(obj, bytes):
        return {"base64": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, bytes) else "0x" + k.hex(): jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(jsonable(doc), indent=2, sort_keys=True, default=str))


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def kv_lines(pairs: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        click.echo(f"{k.ljust(width)}  {v}")


def fail(message: str, code: int = EXIT_PROBLEM) -> None:
    click.echo(f"walstore: {message}", err=True)
    sys.exit(code)


def progress_printer(label: str):
    """A progress callback printing to stderr for large walks (and only then)."""
    state = {"last": -1}

    def show(done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        pct = int(100 * done / max(total, 1))
        if pct != state["last"] and (pct % 5 == 0 or done >= total):
            state["last"] = pct
            click.echo(f"\r{label}: {done / 1e6:8.1f} / {total / 1e6:.1f} MB ({pct:3d}%)",
                       err=True, nl=done >= total)
    return show


def open_store(path: str, **kw):
    """Open for a command; map the usual failures to messages and exit codes."""
    import walstore
    try:
        return walstore.open(path, create=False, **kw)
    except NotAStore as e:
        fail(str(e), EXIT_USAGE)
    except StoreLocked as e:
        fail(f"{e} (stop it first, or use a read-only command)")
    except NeedsRecovery as e:
        fail(str(e))
    except CorruptionError as e:
        fail(f"corruption: {e}\nrun `walstore recover {path}` to see the options")


def parse_key(key: str) -> Any:
    """A key on the command line is text; ``0x...`` (hex) means a bytes key."""
    if key.startswith("0x") and len(key) > 2:
        try:
            return bytes.fromhex(key[2:])
        except ValueError:
            pass
    return key


def show_key(k: Any) -> str:
    return k if isinstance(k, str) else "0x" + k.hex()


def show_value(v: Any) -> str:
    return json.dumps(jsonable(v), sort_keys=True)


class WalstoreGroup(click.Group):
    """Turns walstore errors escaping a command into a message and an exit status."""

    def invoke(self, ctx: click.Context):
        from .errors import WalstoreError
        try:
            return super().invoke(ctx)
        except NotAStore as e:
            fail(str(e), EXIT_USAGE)
        except (KeyError, ValueError, TypeError) as e:
            fail(str(e).strip('"'), EXIT_USAGE)
        except CorruptionError as e:
            fail(f"corruption: {e}")
        except (StoreLocked, NeedsRecovery, WalstoreError) as e:
            fail(str(e))


@click.group(cls=WalstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walstore")
def main() -> None:
    """walstore: a crash-safe transactional key-value store for agent state."""


from . import cli_commands  # noqa: E402,F401  (registers the commands on `main`)
from . import cli_agent  # noqa: E402,F401

if __name__ == "__main__":
    main()
