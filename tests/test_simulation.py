"""The refund protocol under seeded fault schedules (violet_async.testing.sim): the real
client, batch runner and journal against a simulated Violet in virtual time.

A failure prints the seed, the schedule and its trace; replay it with
``python benchmarks/simulate.py --seed N [--shrink]``.
"""

from __future__ import annotations

import pytest

from violet_async.testing.sim import shrink, simulate

#: Seeds every CI run explores (all three modes: direct calls, batch with crashes and
#: torn journal lines, redelivered worker jobs).
CI_SEEDS = range(1500)

#: Violations the current code has, found by this simulator (README, "Reliability:
#: simulation"). Each has a test below pinning a seed; remove a kind once it is fixed.
KNOWN = {
    "deadline-auth": "an attempt that logs in or renews keeps the time left from before",
    "liveness-refused": "a pending whose re-send was refused never resolves by resume",
    "liveness": "a pending whose bag shows the effect but no refund never resolves",
    "torn-journal": "Journal.open appends onto a torn last line: that record is lost",
    "overlap-after-pending": "a resumed ask claims a later same-bag ask's refund",
}


def test_ci_seeds_hold_every_invariant() -> None:
    unexpected = []
    for seed in CI_SEEDS:
        result = simulate(seed)
        if result.kinds - set(KNOWN):
            unexpected.append(result)
    if unexpected:
        pytest.fail(shrink(unexpected[0]).report() + f"\n({len(unexpected)} seeds failed)")


def test_a_seed_replays_exactly() -> None:
    first, again = simulate(184), simulate(184)
    assert first.trace == again.trace
    assert first.violations == again.violations
    assert first.injected == again.injected
    assert first.injected
    assert "CRASHED during journal write" in "\n".join(first.trace)


@pytest.mark.parametrize(
    ("seed", "kind"),
    [
        (21, "deadline-auth"),
        (26, "liveness-refused"),
        (361, "liveness"),
        (282, "overlap-after-pending"),
    ],
)
def test_known_violation_still_reproduces(seed: int, kind: str) -> None:
    # When this fails, the issue was fixed: drop the kind from KNOWN.
    assert kind in simulate(seed).kinds


def test_torn_journal_double_refund_shrinks_to_two_crashes() -> None:
    result = simulate(776, mode="batch")
    assert "torn-journal" in result.kinds
    small = shrink(result)
    assert small.schedule.fault_count() <= 2
    assert "torn-journal" in small.kinds
    assert "[torn-journal] A0: 2 refunds for one ask" in small.report()
