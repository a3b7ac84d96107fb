"""Kill -9 for real: cycles of a real ``worldhost serve`` process, three clients,
ticks running, SIGKILL at random moments (bench/killtest.py runs 200). Journal
commits run on the store's thread (the default, with NORMAL or FULL) or in the
event loop (``journal_commits = "loop"``): each path is killed mid-flight; and with
clients spread over three worlds."""

from __future__ import annotations

from pathlib import Path

import pytest

from killtest import run


@pytest.mark.parametrize(("synchronous", "commits", "cycles"),
                         [("NORMAL", "thread", 16), ("NORMAL", "loop", 8), ("FULL", "thread", 6)])
def test_kill_nine_loses_nothing_acknowledged(tmp_path: Path, synchronous: str, commits: str,
                                              cycles: int) -> None:
    totals = run(cycles, tmp_path, seed=20261122, synchronous=synchronous,
                 journal_commits=commits)
    assert totals.cycles == cycles
    assert totals.acknowledged > 40
    assert totals.lost == 0, totals.problems
    assert totals.invented == 0, totals.problems
    assert totals.check_failures == 0, totals.problems
    assert totals.resume_failures == 0
    assert totals.replay_failures == 0, totals.problems  # each resume replays what was sent


def test_kill_nine_loses_nothing_acknowledged_in_any_of_three_worlds(tmp_path: Path) -> None:
    """The same loop with a client in each of three worlds (``main``, ``w1``, ``w2``),
    each with its own running simulation: every world's store holds exactly what its
    own client was told, and each session resumes in the world it joined."""
    totals = run(6, tmp_path, seed=20261129, worlds=3)
    assert totals.cycles == 6
    assert totals.acknowledged > 30
    assert totals.lost == 0, totals.problems
    assert totals.invented == 0, totals.problems
    assert totals.check_failures == 0, totals.problems
    assert totals.resume_failures == 0
    assert totals.replay_failures == 0, totals.problems  # each resume replays what was sent
