"""A store opens, grows and reads under an address-space limit (``ulimit -v``).

walstore maps LMDB with 64 GiB of address space by default (the file only grows with the
data).  Under RLIMIT_AS below that, every open failed — writable or read-only, however
small the store — with "cannot open the LMDB environment: Cannot allocate memory".  Such
limits are set on shared hosts and batch systems; the open now falls back to a map the
process may make, and the map grows from there (``LmdbState._grow``'s smaller steps).
Each case runs in a real process with the limit set before walstore is imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import walstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 1_200_000_000  # bytes of address space: room for Python, LMDB, a few threads


def _run_limited(code: str, *args: str) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_store_is_created_written_grown_and_read_under_an_address_space_limit(tmp_path):
    path = str(tmp_path / "s")
    r = _run_limited("""
        import json, sys, walstore
        path = sys.argv[1]
        s = walstore.open(path, durability="normal")
        first = s._engine.state.map_size()
        # more than the first map holds, so the map must grow under the limit
        n, value = 0, b"v" * 4000
        while n * 4000 < first * 1.3:
            with s.transaction() as tx:
                tx.update({f"k{n + j}": value for j in range(500)})
            n += 500
        s.checkpoint()
        grown = s._engine.state.map_size()
        s.close()
        r = walstore.open(path, readonly=True)
        ok = r.get("k0") == value and r.get(f"k{n - 1}") == value and r.get(f"k{n}") is None
        r.close()
        print(json.dumps({"first": first, "grown": grown, "n": n, "ok": ok}))
    """, path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["first"] < LIMIT  # (the fallback map, not the 64 GiB default)
    assert out["grown"] > out["first"]  # the map grew under the limit
    assert out["ok"]
    # without the limit, everything written is there and checks out
    with walstore.open(path, readonly=True) as s:
        assert s.get(f"k{out['n'] - 1}") == b"v" * 4000
    v = subprocess.run([sys.executable, "-m", "walstore", "verify", path],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert v.returncode == 0, v.stdout + v.stderr


def test_a_store_made_without_a_limit_is_read_by_the_command_line_under_one(tmp_path):
    path = str(tmp_path / "s")
    with walstore.open(path) as s:
        with s.transaction() as tx:
            tx.put("greeting", "hello")
    r = _run_limited("""
        import sys
        from walstore.cli import main
        sys.argv = ["walstore", "get", sys.argv[1], "greeting"]
        main()
    """, path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hello" in r.stdout


def test_an_explicit_map_size_that_cannot_be_mapped_is_an_error_naming_it(tmp_path):
    """A map size the user asked for is never silently replaced by a smaller one."""
    path = str(tmp_path / "s")
    r = _run_limited("""
        import sys, walstore
        try:
            walstore.open(sys.argv[1], map_size=8 << 30)
        except walstore.WalstoreError as e:
            print(type(e).__name__, e)
        else:
            print("opened")
    """, path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "StoreIOError" in r.stdout and "Cannot allocate memory" in r.stdout, r.stdout
