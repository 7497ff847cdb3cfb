"""The simulator's named-risk classifier (violet_async.testing.sim._named): an
``[attribution]`` violation that is README's remaining risk (b) by every condition is
counted (``named:risk_b``) and listed in the seed's report; any other stays a violation.

Replay a seed with ``python benchmarks/simulate.py --kinds all --seed N``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import attrs
import pytest

from violet_async.testing.sim import WORLD_KINDS, _named, simulate
from violet_async.testing.sim._violet import SimCommit


@pytest.fixture
def verdicts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None, bool, str]]:
    """Every verdict ``_named.risk_b`` gives during the test."""
    seen: list[tuple[str, int | None, bool, str]] = []
    real = _named.risk_b

    def spy(world: Any, label: str, refund_id: int | None) -> tuple[bool, str]:
        excused, why = real(world, label, refund_id)
        seen.append((label, refund_id, excused, why))
        return excused, why

    monkeypatch.setattr(_named, "risk_b", spy)
    return seen


def test_an_identical_refund_another_system_made_near_the_send_is_counted_as_risk_b() -> None:
    """Seed 1369951 (``--kinds all``, direct): A4 (250, no reason) sent once; Violet
    answered 429 (not applied) but the connection dropped before the answer reached
    the caller. Another system refunded 250 on its bag 1.8 s after that send, listed
    after every read A4 made before it; a repeat parked it for review and a resume took
    it. Counted as risk (b), not flagged, and named in the report."""
    result = simulate(1369951, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_b"] == 1
    assert len(result.excused) == 1
    assert result.excused[0].startswith("risk (b): A4 was handed refund 400006"), result.excused
    assert "named risk (b): A4" in result.report()


def test_a_refund_a_read_listed_before_the_re_send_stays_an_attribution_violation(
    monkeypatch: pytest.MonkeyPatch, verdicts: list[tuple[str, int | None, bool, str]]
) -> None:
    """Re-introduce the bug seed 1235637 found (fixed in fdc16df): the read before a
    re-send after a 429 fails on a later page, and what its pages that answered listed
    is ignored (``step`` sees no refunds in the READ_FAILED observation). Another
    system's identical refund, on a page that answered before the re-send, is then
    taken for the ask's own: everything else in risk (b) holds, and condition 4 (a read
    of the ask listed it before its last send) keeps it a violation."""
    from violet_async import _protocol

    real = _protocol.step

    def ignores_answered_pages(ask: Any, obs: Any, *args: Any, **kwargs: Any) -> Any:
        if obs.kind is _protocol.ObsKind.READ_FAILED and ask.phase is _protocol.Phase.ABSENT:
            obs = attrs.evolve(obs, refunds=())
        return real(ask, obs, *args, **kwargs)

    monkeypatch.setattr(_protocol, "step", ignores_answered_pages)
    result = simulate(1235637, kinds=frozenset(WORLD_KINDS))
    assert "attribution" in result.kinds, result.report()
    assert not result.excused
    assert [(v[0], v[1], v[2]) for v in verdicts] == [("A1", 400007, False)]
    assert verdicts[0][3].startswith("4: a page read for the ask listed it"), verdicts


def test_a_refund_without_a_reason_is_identical_as_the_sdks_matching_says() -> None:
    """Seed 1415847 (``--kinds all``, direct): A1 asked 500 with a reason; the refund it
    was handed (another system's, 500, 8.6 s after A1's send that had no answer) carries
    no reason. The SDK's matching takes a record without a reason for any ask's (Violet
    and its platforms may leave it out), so README's risk (b) names it: counted."""
    result = simulate(1415847, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_b"] == 1


def test_a_refund_with_another_reason_is_not_identical() -> None:
    """Condition 1 on its own: another reason (after the trim) is another refund; an
    ask without a reason takes any; a record without one matches any ask's."""
    world = SimpleNamespace(s=SimpleNamespace(trim_reasons=False))
    ask = SimpleNamespace(kind="refund", amount=500, reason="Damaged in transit  ", skus=None)

    def commit(reason: str | None, amount: int = 500) -> SimCommit:
        return SimCommit(9, None, 1, amount, 0.0, 0.0, reason=reason)

    assert not _named._identical(world, ask, commit("Customer requested refund."))
    assert _named._identical(world, ask, commit("Damaged in transit"))
    assert _named._identical(world, ask, commit(None))
    assert not _named._identical(world, ask, commit(None, amount=250))
    reasonless = SimpleNamespace(kind="refund", amount=500, reason=None, skus=None)
    assert _named._identical(world, reasonless, commit("Customer requested refund."))
