"""Replication costs: commit throughput with replication on vs off, lag under a steady
load, requests per hour (idle, and 10 commits/s), restore time per 100 MB of WAL.

The S3 server is moto's, started in its own process on 127.0.0.1 (so its CPU does not
share the writer's interpreter); ``--target file`` uses a file:// replica instead.
Short by default (a minute or two); ``--full`` runs longer rounds.  Writes
bench/results/replication.md (and prints it).

    python bench/replication.py [--full] [--target s3|file]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import walstore  # noqa: E402

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                          str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p, url
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise RuntimeError("moto server did not start")


class Target:
    def __init__(self, kind: str, tmp: str) -> None:
        self.kind, self.tmp = kind, tmp
        self.proc = None
        if kind == "s3":
            os.environ.update(FAKE_ENV)
            self.proc, self.endpoint = start_moto()
            import boto3
            self.client = boto3.client("s3", endpoint_url=self.endpoint)

    def new(self, **opts) -> tuple[str, dict]:
        name = uuid.uuid4().hex[:10]
        if self.kind == "s3":
            bucket = f"bench-{name}"
            self.client.create_bucket(Bucket=bucket)
            return f"s3://{bucket}/store", {"endpoint_url": self.endpoint, **opts}
        return f"file://{self.tmp}/replica-{name}", dict(opts)

    def close(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()


def commits(store, n: int, size: int = 100) -> float:
    pad = os.urandom(size // 2).hex()
    t = time.perf_counter()
    for i in range(n):
        with store.transaction() as tx:
            tx.put(f"k{i % 5000:05d}", f"{i}-{pad}")  # fresh values every time
    return n / (time.perf_counter() - t)


def paced(store, rate: float, seconds: float) -> int:
    """Commit at ``rate`` per second for ``seconds``; returns how many."""
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        with store.transaction() as tx:
            tx.put(f"k{i}", i)
        i += 1
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
    return i


def throughput(target: Target, tmp: str, n: int, rounds: int) -> dict:
    url, opts = target.new(interval=1.0)
    off = walstore.open(os.path.join(tmp, "off"))
    on = walstore.open(os.path.join(tmp, "on"), replicate_to=url, replicate_options=opts)
    rates = {"off": [], "on": []}
    try:
        for _ in range(rounds):  # interleaved: the machine's noise hits both alike
            rates["off"].append(commits(off, n))
            rates["on"].append(commits(on, n))
        on.sync_replica(timeout=120)
    finally:
        off.close()
        on.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"off": med["off"], "on": med["on"], "ratio": med["on"] / med["off"],
            "rounds": rounds, "commits": n}


def steady_lag(target: Target, tmp: str, rate: float, seconds: float) -> dict:
    url, opts = target.new(interval=1.0)
    s = walstore.open(os.path.join(tmp, "lag"), replicate_to=url, replicate_options=opts)
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            st = s.replication()
            samples.append((st.lag_seconds, st.lag_bytes))

    t = threading.Thread(target=sample)
    t.start()
    try:
        paced(s, rate, seconds)
        stop.set()
        t.join()
        t0 = time.perf_counter()
        s.sync_replica(timeout=60)
        drain = time.perf_counter() - t0
    finally:
        stop.set()
        s.close()
    secs = sorted(x[0] for x in samples)
    byts = sorted(x[1] for x in samples)
    return {"rate": rate, "seconds": seconds, "lag_p50_s": secs[len(secs) // 2],
            "lag_max_s": secs[-1], "lag_p50_bytes": byts[len(byts) // 2],
            "lag_max_bytes": byts[-1], "final_sync_s": drain}


def requests_per_hour(target: Target, tmp: str, seconds: float) -> dict:
    url, opts = target.new(interval=1.0)
    s = walstore.open(os.path.join(tmp, "req"), replicate_to=url, replicate_options=opts)
    try:
        with s.transaction() as tx:
            tx.put("x", 1)
        s.sync_replica(timeout=30)
        time.sleep(1.5)
        before = sum(s.replication().requests.values())
        time.sleep(seconds)
        idle = sum(s.replication().requests.values()) - before
        lease = 3600 / (s._shipper.opts.lease_ttl / 3)
        before = dict(s.replication().requests)
        paced(s, 10.0, seconds)
        after = dict(s.replication().requests)
    finally:
        s.close()
    busy = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    scale = 3600 / seconds
    return {"window_s": seconds, "idle_measured": idle, "idle_per_hour": idle * scale + lease,
            "lease_renewals_per_hour": lease,
            "busy_per_hour": {k: round(v * scale) for k, v in busy.items() if v},
            "busy_total_per_hour": round(sum(busy.values()) * scale)}


def restore_time(target: Target, tmp: str, mb: int) -> dict:
    url, opts = target.new(interval=0.5, snapshot_interval=1e9, snapshot_wal_bytes=1 << 40)
    src = walstore.open(os.path.join(tmp, "big"), durability="normal", replicate_to=url,
                        replicate_options=opts)
    blob = 64 * 1024
    try:
        written = 0
        i = 0
        while written < mb * 1_000_000:
            with src.transaction() as tx:
                for _ in range(16):
                    tx.put(f"b{i % 20000:05d}", os.urandom(blob))
                    i += 1
            written += 16 * blob
        src.sync_replica(timeout=600)
        wal_end = src.replication().shipped_lsn
    finally:
        src.close()
    dest = os.path.join(tmp, "restored")
    t = time.perf_counter()
    rep = walstore.restore(url, dest, replicate_options=opts)
    t_restore = time.perf_counter() - t
    t = time.perf_counter()
    walstore.open(dest).close()  # REDO of the restored log into LMDB
    t_open = time.perf_counter() - t
    per100 = (t_restore + t_open) / (rep["wal_bytes"] / 100e6)
    return {"wal_bytes": rep["wal_bytes"], "wal_end": wal_end, "objects": rep["wal_objects"],
            "restore_s": t_restore, "open_redo_s": t_open, "per_100MB_s": per100,
            "per_1GB_s_extrapolated": per100 * 10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--target", choices=["s3", "file"], default="s3")
    args = ap.parse_args()
    full = args.full
    tmp = tempfile.mkdtemp(prefix="walstore-bench-repl-")
    target = Target(args.target, tmp)
    try:
        print("throughput ...", flush=True)
        tp = throughput(target, tmp, 5000 if full else 1000, 5 if full else 3)
        print("lag under load ...", flush=True)
        lag = steady_lag(target, tmp, 200.0, 30.0 if full else 6.0)
        print("requests ...", flush=True)
        req = requests_per_hour(target, tmp, 60.0 if full else 8.0)
        print("restore ...", flush=True)
        rt = restore_time(target, tmp, 1000 if full else 100)
    finally:
        target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"# Replication benchmark ({'full' if full else 'short'}, target {args.target}, "
        f"{time.strftime('%Y-%m-%d')})", "",
        "Single-thread commits, durability=full, replication interval 1 s; medians of "
        "interleaved rounds on a shared 2-core machine: trust ratios more than absolutes.", "",
        ("The S3 server is moto's on 127.0.0.1 (no network, no real S3): transfer times "
         "here are a loopback's, a floor for real S3 (latency per request, bandwidth), not "
         "an estimate of it." if args.target == "s3" else
         "The replica is a file:// directory on the same disk (no network)."), "",
        "| measure | value |", "|---|---|",
        f"| commits/s, replication off | {tp['off']:.0f} |",
        f"| commits/s, replication on | {tp['on']:.0f} |",
        f"| ratio on/off (target >= 0.90) | {tp['ratio']:.3f} |",
        f"| lag at {lag['rate']:.0f} commits/s: p50 / max seconds | "
        f"{lag['lag_p50_s']:.2f} / {lag['lag_max_s']:.2f} |",
        f"| lag at {lag['rate']:.0f} commits/s: p50 / max bytes | "
        f"{lag['lag_p50_bytes']} / {lag['lag_max_bytes']} |",
        f"| requests/hour, idle store (measured {req['idle_measured']} in "
        f"{req['window_s']:.0f} s + lease renewals) | {req['idle_per_hour']:.0f} |",
        f"| requests/hour at 10 commits/s (from {req['window_s']:.0f} s) | "
        f"{req['busy_total_per_hour']} {req['busy_per_hour']} |",
        f"| restore of {rt['wal_bytes'] / 1e6:.0f} MB of WAL ({rt['objects']} objects): "
        f"download+check+write / open (REDO) | {rt['restore_s']:.1f} s / "
        f"{rt['open_redo_s']:.1f} s |",
        f"| restore time per 100 MB of WAL | {rt['per_100MB_s']:.1f} s |",
        (f"| restore time for 1 GB of WAL (measured: the row above) | "
         f"{rt['restore_s'] + rt['open_redo_s']:.0f} s |" if rt["wal_bytes"] >= 1e9 else
         f"| restore time for 1 GB of WAL (EXTRAPOLATED x10 from the row above; "
         f"`--full` measures it) | {rt['per_1GB_s_extrapolated']:.0f} s |"),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(os.path.dirname(__file__), "results", "replication.md")
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
