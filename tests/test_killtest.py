"""Kill -9 for real: 20 cycles of a real ``worldhost serve`` process, three clients,
ticks running, SIGKILL at random moments (bench/killtest.py runs 200)."""

from __future__ import annotations

from pathlib import Path

from killtest import run


def test_kill_nine_loses_nothing_acknowledged(tmp_path: Path) -> None:
    totals = run(20, tmp_path, seed=20261122)
    assert totals.cycles == 20
    assert totals.acknowledged > 100
    assert totals.lost == 0, totals.problems
    assert totals.invented == 0, totals.problems
    assert totals.check_failures == 0, totals.problems
    assert totals.resume_failures == 0
