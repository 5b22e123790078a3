"""tools/tailprobe.py: the slowest commits of a run, each given what ran beside it.

The attribution is checked on a made-up timeline (each cause where it must be, nothing
where it must not), and a real run with small segments is checked against the store's
own count of rotations: a commit that rotated is one that synced more than once."""
from __future__ import annotations

import json

from tools import tailprobe
from tools.tailprobe import Timeline, attribute

MAIN = 1


def _timeline() -> Timeline:
    """Ten commits of 100 µs (ns below), each with one 60 µs sync of its own, but:
    #3 syncs three times (a rotation), #5 meets a gen-2 collection, #7 an LMDB flush,
    #8 its own fdatasync is ten times the others', #9 spends 900 µs outside its sync."""
    t = Timeline()
    start = 0
    for i in range(10):
        length = {3: 400_000, 5: 300_000, 7: 350_000, 8: 700_000, 9: 1_000_000}.get(i, 100_000)
        t.commits.append((start, start + length))
        if i == 3:
            t.syncs += [(start + 10_000, start + 70_000, MAIN, "fdatasync"),
                        (start + 80_000, start + 140_000, MAIN, "fsync_dir"),
                        (start + 150_000, start + 210_000, MAIN, "fdatasync")]
        elif i == 8:
            t.syncs.append((start + 10_000, start + 610_000, MAIN, "fdatasync"))
        else:
            t.syncs.append((start + 10_000, start + 70_000, MAIN, "fdatasync"))
        if i == 5:
            t.gcs.append((start + 75_000, start + 280_000, 2))
        if i == 7:
            t.lmdb.append((start - 50_000, start + 5_000, start + 300_000))
            t.syncs.append((start + 5_000, start + 300_000, 2, "fdatasync"))  # (another
            # thread's sync: not the commit's own)
        start += length + 1_000
    return t


def test_each_slow_commit_is_given_the_cause_that_ran_beside_it() -> None:
    rows = attribute(_timeline(), MAIN, top=5)
    by_commit = {r["commit"]: r["causes"] for r in rows}
    assert set(by_commit) == {3, 5, 7, 8, 9}  # the five slow ones, slowest first
    assert [r["commit"] for r in rows] == [9, 8, 3, 7, 5]
    assert by_commit[3] == ["rotation"]
    assert by_commit[5] == ["gc-gen2"]
    assert by_commit[7] == ["lmdb-flush", "applier-python"]
    assert by_commit[8] == ["slow-fsync"]
    assert by_commit[9] == ["cpu"]
    assert rows[2]["own_syncs_us"] == [60, 60, 60]
    assert all(c in tailprobe.CAUSES for r in rows for c in r["causes"])


def test_a_real_run_finds_the_store_s_rotations_among_its_commits(tmp_path) -> None:
    report = tailprobe.run(300, 2048, directory=str(tmp_path / "not-made"), top=300,
                           options={"segment_size": 65536})
    assert report["rotations"] >= 5  # (300 × ~2.1 KiB records into 64 KiB segments)
    rotated = [r for r in report["slowest"] if "rotation" in r["causes"]]
    # every rotation ran inside one of the commits (this run's only writer), which synced
    # more than once; a checkpoint's record could rotate in the applier's thread instead
    assert 1 <= len(rotated) <= report["rotations"]
    assert len(rotated) >= report["rotations"] - 1
    assert all(len(r["own_syncs_us"]) > 1 for r in rotated)
    assert len(report["slowest"]) == 300
    assert report["p50_us"] <= report["p99_us"] <= report["p99.9_us"] <= report["max_us"]
    assert list((tmp_path / "not-made").iterdir()) == []  # its store is gone (the --dir
    # not made yet was made)


def test_the_command_line_prints_json_and_refuses_bad_input(tmp_path, capsys) -> None:
    assert tailprobe.main(["--commits", "50", "--value-bytes", "100", "--json",
                           "--dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["commits"] == 50 and len(report["slowest"]) == 10
    assert tailprobe.main(["--commits", "0", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tailprobe: ") and "--commits" in err and "Traceback" not in err
    for bad in ("segment_size", "segment_size=12", "no_such_option=1"):
        assert tailprobe.main(["--commits", "5", "--set", bad, "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tailprobe: ") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
