"""tools/openai_resume_race.py, one after another (no threads racing: the outcomes do not
depend on timing): a stride of seeds, and two seeds of a RunState resumed again after its
answer was popped, which booked pay twice before stop 77 h5's fix.  Every problem must
match a documented limit."""
from __future__ import annotations

import pytest

pytest.importorskip("agents")

from tools import openai_resume_race  # noqa: E402


def test_sequential_resumes_and_undos_agree_with_the_ledger(capsys):
    rc = openai_resume_race.main(["--mode", "seq", "--only", "1317", "1585",
                                  *map(str, range(1, 16))])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "17 iterations" in out and ", 0 matching no documented limit" in out
