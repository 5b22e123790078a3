"""walstore's benchmark harness: walstore against SQLite, raw LMDB, the disk's own limit
and (for LangGraph) SqliteSaver, in one run, interleaved, with ratios and targets.

Imported only by ``walstore bench`` (inside the command) and bench/run.py; nothing else in
walstore imports it, and it uses walstore through the public API.  Modules:

- ``spec``: the vocabulary (Sample, Part, Workload, Target, Profile) and the timing loops;
- ``data``: keys, fresh values, sizes on disk;
- ``peers``: the systems measured (walstore, SQLite, raw LMDB, the bare pwrite+fdatasync
  loop);
- ``workloads``: the rows, the quick and full sizes, the targets;
- ``graphs``: the LangGraph graphs and per-invoke workloads;
- ``longrun``: recovery and the steady run, in child processes;
- ``runner``: rounds, interleaving, medians, percentiles, ratios, targets met or not;
- ``report``: Markdown, strict JSON, the PNG chart.
"""
from __future__ import annotations

from .longrun import child_main
from .report import render_json, render_markdown, render_png
from .runner import run_benchmarks

__all__ = ["run_benchmarks", "render_markdown", "render_json", "render_png", "child_main"]
