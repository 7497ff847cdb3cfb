"""Fault injection for FakeViolet: a seeded random plan, scripted faults for exact
tests ("the next 2 refund POSTs on this bag drop after commit"), and the server's
standing quirks (list lag, paging, skewed or naive dates, trimmed reasons).

Which answers carry Violet's own JSON error body (``{"status", "message",
"error_code", "timestamp"}``, "Violet's app answered"): HTTP_500,
HTTP_500_AFTER_COMMIT, RATE_LIMIT, RATE_LIMIT_NO_HEADER and every rule violation
(4xx). Every other error status is a gateway's (plain text or HTML, never JSON):
HTTP_502, HTTP_503, HTTP_504, HTML_502, LATE_COMMIT, TIMEOUT_THEN_COMMIT and the
HTTP_50x_AFTER_COMMIT / HTTP_524_AFTER_COMMIT faults.
"""

from __future__ import annotations

import enum
import random
from collections import deque

import attrs

__all__ = ["Fault", "FaultPlan", "FaultScript", "ServerQuirks"]


class Fault(enum.Enum):
    """One thing that can go wrong with a request."""

    # Answered before anything is applied:
    HTTP_500 = "http_500"
    """Violet's app fails: 500 with Violet's JSON error body."""
    HTTP_502 = "http_502"
    """A gateway's 502, plain text ``Bad Gateway``."""
    HTTP_503 = "http_503"
    """Envoy's 503, plain text ``upstream connect error or disconnect/reset before
    headers...``."""
    HTTP_504 = "http_504"
    """A gateway's 504, plain text ``upstream request timeout``."""
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
    """Committed; Violet's app then answers 500 with its JSON error body."""
    HTTP_502_AFTER_COMMIT = "http_502_after_commit"
    """Committed; a gateway answers 502 (plain text)."""
    HTTP_503_AFTER_COMMIT = "http_503_after_commit"
    """Committed; Envoy answers 503 (plain text ``upstream connect error...``)."""
    HTTP_504_AFTER_COMMIT = "http_504_after_commit"
    """Committed; a gateway answers 504 (plain text ``upstream request timeout``)."""
    HTTP_524_AFTER_COMMIT = "http_524_after_commit"
    """Committed; Cloudflare answers 524 with its HTML "A timeout occurred" page."""
    TRUNCATED_JSON = "truncated_json"
    """Committed; the 200 body is cut in half."""
    WRONG_TYPES = "wrong_types"
    """Committed; the 200 body has an amount as a string."""
    WRONG_BAG_ANSWER = "wrong_bag_answer"
    """Committed; the 200 body is a refund naming another bag (a misrouted or cached
    answer): it applied, but the answer is not this request's."""
    STALE_ANSWER = "stale_answer"
    """Committed; the 200 body is the refund dated an hour before the answer (a
    replayed or cached answer, as far as the client can tell): it applied, but the
    answer cannot say what it made."""
    LATE_COMMIT = "late_commit"
    """A gateway's 504 now (plain text); the refund or cancel commits
    ``late_commit_delay`` seconds later on the fake's clock, and only then (reads in
    between do not see it; :meth:`FakeViolet.settle` lands it at once)."""
    TIMEOUT_THEN_COMMIT = "timeout_then_commit"
    """No answer: the request is held open until the fake's clock passes
    ``hang_seconds`` after it arrived (then a gateway's 504), the client disconnects
    (its read timeout) or the server stops. The commit lands ``late_commit_delay``
    after arrival on the fake's clock, whatever happened to the connection. Costs
    real time unless the client gives up or the fake's clock is advanced."""
    SLOW_BODY = "slow_body"
    """Committed; the 200 answer trickles out (a slow-loris), ``slow_body_delay``
    seconds between its first bytes and the rest."""
    RESET_MID_BODY = "reset_mid_body"
    """Committed; headers and half the body are sent, then the connection is reset."""
    REDIRECT = "redirect"
    """A 307 to ``redirect_to`` (another host); nothing applied."""
    # Opt-in (in no random plan, so seeded schedules stay as they were): script them.
    REFUND_CANCELED = "refund_canceled"
    """Recorded, then the platform refused it: the 2xx answer (a refund's 200, a
    cancel's 202) carries the refund in status CANCELED. No money moved; the record
    stays on the bag, CANCELED (a cancelled bag stays cancelled)."""
    REFUND_FAILED = "refund_failed"
    """As ``REFUND_CANCELED``, with the refund FAILED (for a cancel: the bag cancelled,
    its refund failed: the shopper got nothing back)."""
    SEE_OTHER = "see_other"
    """Committed; answered ``303 See Other`` with a ``Location`` to the refund made."""
    NO_ID_ANSWER = "no_id_answer"
    """Committed; the 200 body is the refund without its ``id`` (every property of
    Violet's refund is optional)."""
    FOREIGN_CANCELLATION = "foreign_cancellation"
    """Committed; answered 202 with a ``CANCELLATION_FAILURE`` cancellation body of
    another order, listing another bag (a misrouted or cached answer): it applied, but
    the answer is not this request's, and says nothing of this bag."""


#: Faults that only make sense on a request that changes state.
COMMIT_FAULTS = frozenset(
    {
        Fault.DROP_AFTER_COMMIT,
        Fault.HTTP_500_AFTER_COMMIT,
        Fault.HTTP_502_AFTER_COMMIT,
        Fault.HTTP_503_AFTER_COMMIT,
        Fault.HTTP_504_AFTER_COMMIT,
        Fault.HTTP_524_AFTER_COMMIT,
        Fault.TRUNCATED_JSON,
        Fault.WRONG_TYPES,
        Fault.WRONG_BAG_ANSWER,
        Fault.STALE_ANSWER,
        Fault.LATE_COMMIT,
        Fault.TIMEOUT_THEN_COMMIT,
        Fault.SLOW_BODY,
        Fault.RESET_MID_BODY,
        Fault.REFUND_CANCELED,
        Fault.REFUND_FAILED,
        Fault.SEE_OTHER,
        Fault.NO_ID_ANSWER,
        Fault.FOREIGN_CANCELLATION,
    }
)
#: Faults no random plan draws (scripted for exact tests only).
_OPT_IN = frozenset(
    {
        Fault.REFUND_CANCELED,
        Fault.REFUND_FAILED,
        Fault.SEE_OTHER,
        Fault.NO_ID_ANSWER,
        Fault.FOREIGN_CANCELLATION,
    }
)
#: Left out of the chaos plan: a slow body and a held request cost real seconds, a
#: redirect is a hard (non-retryable) failure by design. Script them for exact tests.
_NOT_IN_CHAOS = (
    frozenset({Fault.SLOW_BODY, Fault.REDIRECT, Fault.TIMEOUT_THEN_COMMIT, Fault.STALE_ANSWER})
    | _OPT_IN
)
#: Left out of the hostile plan: a redirect is a configuration error, not weather. (A
#: stale answer is left out of both so that their seeded schedules stay as they were.)
_NOT_IN_HOSTILE = frozenset({Fault.REDIRECT, Fault.STALE_ANSWER}) | _OPT_IN


@attrs.frozen
class ServerQuirks:
    """Standing behaviours of the server (not per-request faults). They live on the
    :class:`FaultPlan` (``FaultPlan(quirks=ServerQuirks(list_lag=0.5))``) so named
    plans can turn them on; FakeViolet's keywords of the same names override the
    plan's values one by one."""

    list_lag: float = 0.0
    """A committed refund shows in the bag's refund list (and the single-refund GET)
    only this many seconds (fake's clock) after its commit. The order's bag status
    and amounts change at commit time: only the list is a lagging replica."""
    list_lag_rate: float = 1.0
    """The share of commits that lag (drawn with the plan's seed); the rest show at
    once."""
    naive_dates: bool = False
    """Dates in the server's local time (``server_utc_offset_hours``) without an
    offset, e.g. ``2023-11-07T05:31:56``."""
    server_utc_offset_hours: float = -5.0
    missing_dates: bool = False
    """``date_created`` is null on refunds."""
    server_clock_skew: float = 0.0
    """Seconds the server's clock is ahead of the fake's clock (negative: behind);
    refund dates and the ``Date`` header use it."""
    trim_reasons: bool = False
    """The server stores (and answers with) ``reason.strip()``."""
    page_size: int | None = None
    """The bag's refund list is a Spring page of at most this many items, honouring
    the ``page`` (0-based) and ``size`` (capped here) query parameters. None: a bare
    JSON array."""
    page_keys: str = attrs.field(default="snake")
    """``"snake"`` (``total_pages``...) or ``"camel"`` (``totalPages``...)."""
    bag_status_lag: float = 0.0
    """After a refund or cancel, ``GET /orders/{id}`` (and webhook payloads) keep
    showing the bag's earlier status for this many seconds (fake's clock): after
    submission a bag's status is the merchant platform's to report, and Shopify can take
    about ten minutes. The refund list is not affected."""
    full_records: bool = False
    """Refund records carry every field of the spec page (``gateway_transaction_id``,
    transfer reversal amounts, ``reason_code``, ``platform_currency``, ``tax_amount``).
    Off: the fields of Violet's own get-bag-refunds example only."""

    replica_behind: float = 0.0
    """The refund list (and the single-refund GET) comes from a replica this many
    seconds behind the primary: a refund committed less than that ago is missing."""
    replica_flap: bool = False
    """Reads alternate between the primary and that replica: a refund shows, hides,
    then shows again."""
    date_header_skew: float = 0.0
    """Seconds the ``Date`` header is off from the server's own clock (a CDN or load
    balancer stamping its own), refund dates left alone."""
    date_header_flap: bool = False
    """Every other answer carries the skewed ``Date`` header, the rest the true one:
    the readings disagree."""
    day_dates: bool = False
    """Refund dates carry the day only (``2023-11-07T00:00:00Z``)."""
    listed_without_skus: bool = False
    """The bag's refund list (and the single-refund GET) leaves ``skus`` out of every
    record (every property of Violet's records is optional): a refund of SKU lines
    cannot be told from one of an amount."""
    amount_with_shipping: bool = False
    """A refund that names ``amount_refunded`` and ``shipping`` is recorded with the
    shipping in its ``amount`` (1000 and 500 read back as 1500): Violet's pages do not
    say which reading is right."""
    list_other_bags: bool = False
    """A bag's refund list also carries the refunds of the order's other bags."""
    listed_without_sku_ids: bool = False
    """The bag's refund list (and the single-refund GET) keeps each record's SKU lines
    but leaves out their ``order_sku_id`` (a platform's own line id only)."""
    listed_zero_ids: bool = False
    """The bag's refund list (and the single-refund GET) gives every record ``id`` and
    ``bag_id`` 0 (a backend's default for fields it never set)."""

    @page_keys.validator
    def _check_page_keys(self, _: object, value: str) -> None:
        if value not in ("snake", "camel"):
            raise ValueError("page_keys must be 'snake' or 'camel'")


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
    """Seconds (fake's clock) from a LATE_COMMIT / TIMEOUT_THEN_COMMIT request to its
    commit."""
    hang_seconds: float = 30.0
    """How long TIMEOUT_THEN_COMMIT holds a request (fake's clock) at most."""
    slow_body_delay: float = 2.0
    redirect_to: str = "http://127.0.0.1:9/elsewhere"
    routes: frozenset[str] = frozenset(
        {"refund", "cancel", "list_refunds", "get_refund", "get_order"}
    )
    """Routes the plan applies to (login and refresh are spared by default)."""
    quirks: ServerQuirks = ServerQuirks()
    """The server's standing behaviours; see :class:`ServerQuirks`."""

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
        if name == "hostile":
            return cls.hostile(seed)
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
            late_commit_delay=0.05,
            quirks=ServerQuirks(list_lag=0.05),
        )

    @classmethod
    def chaos(cls, seed: int = 0) -> FaultPlan:
        """Every fault that costs no real time, often (about 40% of requests
        misbehave), on a server with moderate list lag on half the commits, pages of
        5, a 2 s clock skew, trimmed reasons and naive UTC-5 dates."""
        faults = [f for f in Fault if f not in _NOT_IN_CHAOS]
        each = 0.4 / len(faults)
        return cls(
            rates=dict.fromkeys(faults, each),
            latency=(0.0, 0.01),
            seed=seed,
            retry_after="0",
            late_commit_delay=0.05,
            quirks=ServerQuirks(
                list_lag=0.1,
                list_lag_rate=0.5,
                naive_dates=True,
                server_clock_skew=2.0,
                trim_reasons=True,
                page_size=5,
            ),
        )

    @classmethod
    def hostile(cls, seed: int = 0) -> FaultPlan:
        """Everything the real world does: every fault (held requests and slow bodies
        included, so it costs real seconds unless the client's read timeout is short),
        commits landing seconds after the gateway gave up, a lagging refund list in
        pages of 2 with camelCase keys, naive dates, a clock 90 s behind, trimmed
        reasons."""
        faults = [f for f in Fault if f not in _NOT_IN_HOSTILE]
        each = 0.45 / len(faults)
        return cls(
            rates=dict.fromkeys(faults, each),
            latency=(0.0, 0.02),
            seed=seed,
            retry_after="1",
            late_commit_delay=2.5,
            hang_seconds=5.0,
            slow_body_delay=1.0,
            quirks=ServerQuirks(
                list_lag=1.5,
                list_lag_rate=0.7,
                naive_dates=True,
                server_clock_skew=-90.0,
                trim_reasons=True,
                page_size=2,
                page_keys="camel",
            ),
        )


#: Names accepted by :meth:`FaultPlan.named`.
PLAN_NAMES = ("none", "moderate", "chaos", "hostile")


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


#: What a commit fault drawn for a read becomes (a read commits nothing).
_READ_SUBSTITUTES = {
    Fault.LATE_COMMIT: Fault.HTTP_503,
    Fault.TIMEOUT_THEN_COMMIT: Fault.HTTP_504,
    Fault.HTTP_500_AFTER_COMMIT: Fault.HTTP_500,
    Fault.HTTP_503_AFTER_COMMIT: Fault.HTTP_503,
    Fault.HTTP_504_AFTER_COMMIT: Fault.HTTP_504,
}


class FaultDrawer:
    """Draws from a plan with its own seeded generator."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._lag_rng = random.Random(plan.seed + 1)
        self._choices = list(plan.rates.items())

    def lags(self) -> bool:
        """Whether the next commit's list entry lags (``quirks.list_lag_rate``)."""
        rate = self.plan.quirks.list_lag_rate
        return rate >= 1 or self._lag_rng.random() < rate

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
                    return _READ_SUBSTITUTES.get(fault, Fault.HTTP_502)
                return fault
            roll -= rate
        return None
