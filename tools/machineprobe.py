"""How fast is this machine, in the two things walstore's test suite waits on: the CPU
(a fixed pure-Python loop) and the disk's durable write (4 KiB pwrite + fdatasync in the
temp directory, the one the tests' stores live in).

CI runs it before the tests and prints its line again after them, so a slow CI run can
be told apart: a slow CPU, a slow disk, or the suite itself.  About a second.

    python tools/machineprobe.py [--json]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time


def cpu_seconds(rounds: int = 3) -> float:
    """Best of ``rounds`` timings of a fixed loop of 2,000,000 Python additions."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        n = 0
        for i in range(2_000_000):
            n += i
        best = min(best, time.perf_counter() - t)
    return best


def fdatasync_ms(writes: int = 200) -> tuple[float, float]:
    """Median and 90th percentile, in ms, of one 4 KiB pwrite + fdatasync, in a new
    file in the temp directory (removed after)."""
    page = b"w" * 4096
    took = []
    with tempfile.TemporaryDirectory(prefix="walstore-probe-") as d:
        fd = os.open(os.path.join(d, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for i in range(writes):
                t = time.perf_counter()
                os.pwrite(fd, page, (i % 16) * 4096)
                os.fdatasync(fd)
                took.append((time.perf_counter() - t) * 1000)
        finally:
            os.close(fd)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.9)]


def main(argv: list[str]) -> int:
    median, p90 = fdatasync_ms()
    figures = {"cpus": os.cpu_count(), "cpu_loop_s": round(cpu_seconds(), 3),
               "fdatasync_median_ms": round(median, 3), "fdatasync_p90_ms": round(p90, 3),
               "tmp": tempfile.gettempdir()}
    if "--json" in argv:
        print(json.dumps(figures))
    else:
        print(f"machine: {figures['cpus']} CPUs; a 2,000,000-addition Python loop "
              f"{figures['cpu_loop_s']} s; 4 KiB pwrite+fdatasync in {figures['tmp']}: "
              f"median {figures['fdatasync_median_ms']} ms, p90 "
              f"{figures['fdatasync_p90_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
