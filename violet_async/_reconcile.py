"""Resolving a refund or cancel whose outcome is unknown, without ever re-sending blindly.

Violet has no idempotency key. When a refund POST fails after it was sent, we read
the bag's refunds back and look for the one this call asked for.

Matching rule: a refund read back is *this call's* when all of these hold:

1. it is on the same bag;
2. this client has not already handed it to a caller (the client remembers the ids of
   the last 10,000 refunds it returned) and it was not present at an earlier read-back
   of this same call;
3. it was created no earlier than this call's first send, less ``RetryPolicy.clock_skew``;
4. it matches the request: same ``amount_refunded`` when one was given, the same
   ``(order_sku_id, quantity_refunded)`` lines when SKUs were given and the server
   lists them, the same ``reason`` when both sides carry one.

Exactly one candidate: it is returned with ``reconciled=True``. More than one: we will
not guess, ``AmbiguousOutcomeError``. None: read again after ``settle_delay``; after
``settle_reads`` successful reads that all miss, the refund is taken as absent and
re-sent (that re-send counts as an attempt). A read that fails is tried again, up to
``settle_reads`` more times; without enough successful reads, ``AmbiguousOutcomeError``.

Residual risk, stated plainly: (a) an identical refund made by someone else on the same
bag inside the clock-skew window, while this call's own POST did not apply, would be
taken as ours: the shopper is then refunded once, not twice, but by the other actor;
(b) a commit that lands more than about ``settle_delay * (settle_reads - 1)`` seconds
after the failed send, so that every read-back missed it, is followed by our re-send:
two refunds. Raise ``settle_delay`` for merchants whose platforms commit slowly.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone

import attrs

from ._retry import RESEND, CallState, Clock, RetryPolicy
from .exceptions import AmbiguousOutcomeError, VioletError
from .models import BagStatus, CancelBagRequest, OrderRefund, RefundBagRequest

__all__ = ["KnownRefunds", "Reconciler"]

ReadRefunds = Callable[[], Awaitable[Sequence[OrderRefund]]]
ReadBagStatus = Callable[[], Awaitable[BagStatus | None]]


class KnownRefunds:
    """Refund ids this client already returned to a caller (bounded, oldest evicted)."""

    def __init__(self, capacity: int = 10_000) -> None:
        # A set to look up, a deque for the order: add is three C calls on the hot path.
        self._ids: set[int] = set()
        self._order: deque[int] = deque()
        self._capacity = capacity

    def add(self, refund_id: int | None) -> None:
        if refund_id is None or refund_id in self._ids:
            return
        self._ids.add(refund_id)
        self._order.append(refund_id)
        if len(self._order) > self._capacity:
            self._ids.discard(self._order.popleft())

    def __contains__(self, refund_id: object) -> bool:
        return refund_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


def matches_refund_request(refund: OrderRefund, request: RefundBagRequest) -> bool:
    """Point 4 of the matching rule."""
    if request.amount_refunded is not None and refund.amount != request.amount_refunded:
        return False
    if request.skus and refund.skus:
        asked = Counter((s.order_sku_id, s.quantity_refunded) for s in request.skus)
        got = Counter((s.order_sku_id, s.quantity_refunded) for s in refund.skus)
        if asked != got:
            return False
    return not (
        request.reason is not None and refund.reason is not None and refund.reason != request.reason
    )


@attrs.define
class Reconciler:
    """One call's reconciliation; remembers what earlier read-backs of the call saw."""

    bag_id: int
    request: RefundBagRequest | CancelBagRequest
    read_refunds: ReadRefunds
    known: KnownRefunds
    policy: RetryPolicy
    clock: Clock
    read_bag_status: ReadBagStatus | None = None
    _baseline: set[int] | None = None

    def _candidates(self, refunds: Sequence[OrderRefund], state: CallState) -> list[OrderRefund]:
        earliest = datetime.fromtimestamp(
            state.sent_at_wall - self.policy.clock_skew, tz=timezone.utc
        )
        found = []
        for refund in refunds:
            if refund.bag_id is not None and refund.bag_id != self.bag_id:
                continue
            if refund.id in self.known:
                continue
            if self._baseline is not None and refund.id in self._baseline:
                continue
            if refund.date_created is not None and refund.date_created < earliest:
                continue
            if isinstance(self.request, RefundBagRequest) and not matches_refund_request(
                refund, self.request
            ):
                continue
            found.append(refund)
        return found

    async def __call__(self, failure: VioletError, state: CallState) -> object:
        """Return the refund this call made, RESEND, or raise AmbiguousOutcomeError.

        For a cancel, the bag must also read back as CANCELED before a refund is
        claimed; a bag that is CANCELED with no matching refund is never re-sent.
        """
        is_cancel = isinstance(self.request, CancelBagRequest)
        refunds: Sequence[OrderRefund] = ()
        candidates: list[OrderRefund] = []
        bag_status: BagStatus | None = None
        # Absence is only concluded from `settle_reads` reads that all succeeded; a read
        # that fails (after its own retries) is tried again, up to as many times more.
        misses, read_error = 0, None
        for read in range(self.policy.settle_reads * 2):
            if misses >= self.policy.settle_reads:
                break
            if read:
                # The call's deadline bounds reconciliation too.
                if state.deadline is not None and (
                    self.clock.monotonic() + self.policy.settle_delay >= state.deadline
                ):
                    break
                await self.clock.sleep(self.policy.settle_delay)
            try:
                refunds = await self.read_refunds()
                if is_cancel and self.read_bag_status is not None:
                    bag_status = await self.read_bag_status()
            except VioletError as exc:
                read_error = exc
                continue
            misses += 1
            candidates = self._candidates(refunds, state)
            if len(candidates) > 1:
                raise AmbiguousOutcomeError(
                    f"{failure}; {len(candidates)} refunds on bag {self.bag_id} match this "
                    "request, so which one it made cannot be told. Nothing was re-sent.",
                    request=self.request,
                    attempts=state.attempts,
                    observed=refunds,
                    candidates=candidates,
                ) from failure
            if candidates and (not is_cancel or bag_status is BagStatus.CANCELED):
                self.known.add(candidates[0].id)
                return attrs.evolve(candidates[0], reconciled=True)
        if misses < self.policy.settle_reads:
            why = (
                f"reading the bag back failed too ({read_error})"
                if read_error
                else ("the call's deadline ended the read-back")
            )
            raise AmbiguousOutcomeError(
                f"{failure}; {why}. It may or may not have been applied: check the bag "
                "before trying again.",
                request=self.request,
                attempts=state.attempts,
                observed=refunds,
            ) from read_error
        if candidates or bag_status is BagStatus.CANCELED:
            raise AmbiguousOutcomeError(
                f"{failure}; the bag read back as {bag_status} with "
                f"{len(candidates)} matching refund(s): not re-sent.",
                request=self.request,
                attempts=state.attempts,
                observed=refunds,
                candidates=candidates,
            ) from failure
        # Absent after settling. Remember what was there, so a read-back after the
        # re-send only considers refunds that appeared since.
        self._baseline = {r.id for r in refunds if r.id is not None}
        return RESEND
