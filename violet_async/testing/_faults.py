"""Fault injection for FakeViolet: a seeded random plan, and scripted faults for exact
tests ("the next 2 refund POSTs on this bag drop after commit")."""

from __future__ import annotations

import enum
import random
from collections import deque

import attrs

__all__ = ["Fault", "FaultPlan", "FaultScript"]


class Fault(enum.Enum):
    """One thing that can go wrong with a request."""

    # Answered before anything is applied:
    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    HTML_502 = "html_502"
    """A gateway's HTML error page."""
    RATE_LIMIT = "rate_limit"
    """429 with ``Retry-After``."""
    RATE_LIMIT_NO_HEADER = "rate_limit_no_header"
    DROP_BEFORE_COMMIT = "drop_before_commit"
    """Connection closed without an answer; nothing applied."""
    # Applied, then something goes wrong on the way back:
    DROP_AFTER_COMMIT = "drop_after_commit"
    """The refund is committed, then the connection is closed without an answer."""
    HTTP_500_AFTER_COMMIT = "http_500_after_commit"
    TRUNCATED_JSON = "truncated_json"
    """Committed; the 200 body is cut in half."""
    WRONG_TYPES = "wrong_types"
    """Committed; the 200 body has an amount as a string."""
    LATE_COMMIT = "late_commit"
    """504 now; the refund lands later (after ``late_commit_delay`` or the next
    read of the bag's refunds, whichever comes first)."""
    SLOW_BODY = "slow_body"
    """Committed; the 200 answer trickles out (a slow-loris), ``slow_body_delay``
    seconds between its first bytes and the rest."""
    RESET_MID_BODY = "reset_mid_body"
    """Committed; headers and half the body are sent, then the connection is reset."""
    REDIRECT = "redirect"
    """A 307 to ``redirect_to`` (another host); nothing applied."""


#: Faults that only make sense on a request that changes state.
COMMIT_FAULTS = frozenset(
    {
        Fault.DROP_AFTER_COMMIT,
        Fault.HTTP_500_AFTER_COMMIT,
        Fault.TRUNCATED_JSON,
        Fault.WRONG_TYPES,
        Fault.LATE_COMMIT,
        Fault.SLOW_BODY,
        Fault.RESET_MID_BODY,
    }
)
#: Left out of the chaos plan: a slow body costs real seconds, a redirect is a hard
#: (non-retryable) failure by design. Script them for exact tests.
_NOT_IN_CHAOS = frozenset({Fault.SLOW_BODY, Fault.REDIRECT})


@attrs.frozen
class FaultPlan:
    """Probabilities per fault (each request draws at most one), plus latency.

    Seeded: the same plan and the same request order give the same faults.
    """

    rates: dict[Fault, float] = attrs.field(factory=dict)
    latency: tuple[float, float] = (0.0, 0.0)
    """Uniform extra latency range in seconds, applied to every faulted route."""
    seed: int = 0
    retry_after: str = "1"
    """The Retry-After value sent with RATE_LIMIT."""
    late_commit_delay: float = 0.2
    slow_body_delay: float = 2.0
    redirect_to: str = "http://127.0.0.1:9/elsewhere"
    routes: frozenset[str] = frozenset({"refund", "cancel", "list_refunds", "get_order"})
    """Routes the plan applies to (login and refresh are spared by default)."""

    def __attrs_post_init__(self) -> None:
        total = sum(self.rates.values())
        if total > 1 or any(r < 0 for r in self.rates.values()):
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {total}")

    @classmethod
    def none(cls) -> FaultPlan:
        return cls()

    @classmethod
    def named(cls, name: str, seed: int = 0) -> FaultPlan:
        """The plan called ``name`` in :data:`PLAN_NAMES` (what the CLI's ``--faults``
        takes)."""
        if name == "chaos":
            return cls.chaos(seed)
        if name == "moderate":
            return cls.moderate(seed)
        if name == "none":
            return cls.none()
        raise ValueError(f"unknown fault plan {name!r}; choose from {', '.join(PLAN_NAMES)}")

    @classmethod
    def moderate(cls, seed: int = 0) -> FaultPlan:
        """A few percent of everything: what the demo runs."""
        return cls(
            rates={
                Fault.HTTP_503: 0.02,
                Fault.RATE_LIMIT: 0.02,
                Fault.DROP_BEFORE_COMMIT: 0.01,
                Fault.DROP_AFTER_COMMIT: 0.02,
                Fault.HTTP_502: 0.01,
                Fault.LATE_COMMIT: 0.01,
                Fault.TRUNCATED_JSON: 0.01,
            },
            latency=(0.0, 0.005),
            seed=seed,
            retry_after="0",
        )

    @classmethod
    def chaos(cls, seed: int = 0) -> FaultPlan:
        """Every fault, often: about 40% of requests misbehave."""
        faults = [f for f in Fault if f not in _NOT_IN_CHAOS]
        each = 0.4 / len(faults)
        return cls(
            rates=dict.fromkeys(faults, each),
            latency=(0.0, 0.01),
            seed=seed,
            retry_after="0",
            late_commit_delay=0.05,
        )


#: Names accepted by :meth:`FaultPlan.named`.
PLAN_NAMES = ("none", "moderate", "chaos")


class FaultScript:
    """Scripted faults, consumed in order by matching requests."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, int | None], deque[Fault]] = {}

    def add(self, route: str, faults: list[Fault], bag_id: int | None = None) -> None:
        self._queues.setdefault((route, bag_id), deque()).extend(faults)

    def take(self, route: str, bag_id: int | None) -> Fault | None:
        for key in ((route, bag_id), (route, None)):
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
        return None


class FaultDrawer:
    """Draws from a plan with its own seeded generator."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._choices = list(plan.rates.items())

    def latency(self) -> float:
        low, high = self.plan.latency
        return self._rng.uniform(low, high) if high > 0 else 0.0

    def draw(self, route: str, *, mutating: bool) -> Fault | None:
        if route not in self.plan.routes or not self._choices:
            return None
        roll = self._rng.random()
        for fault, rate in self._choices:
            if roll < rate:
                if fault in COMMIT_FAULTS and not mutating:
                    return Fault.HTTP_503 if fault is Fault.LATE_COMMIT else Fault.HTTP_502
                return fault
            roll -= rate
        return None
