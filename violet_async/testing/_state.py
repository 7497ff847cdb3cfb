"""FakeViolet's data: orders, bags, SKUs, refunds, and the ledger tests assert on.

The rules are Violet's as the spec pages state them: refundable and cancellable
states, amounts and quantities that never go below zero, shipping bounded by what
was paid, bag status moving to PARTIALLY_REFUNDED / REFUNDED / CANCELED.

The shapes are Violet's documented examples: refund records carry what the
get-bag-refunds example carries (no ``gateway_transaction_id``, no transfer reversal
amounts; ``ServerQuirks.full_records`` adds every field of the spec page), refunds made
on the merchant's platform are ``EXTERNAL`` without transaction ids, and order SKUs
carry ``quantity_fulfilled`` and ``status`` (Violet sends no refunded quantity).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from ._clock import RealClock, ServerClock
from ._faults import ServerQuirks

__all__ = [
    "Commit",
    "FakeBag",
    "FakeOrder",
    "FakeSku",
    "Ledger",
    "Post",
    "RuleViolation",
    "Store",
    "cancellation_body",
    "cancellation_failure_body",
]

REFUNDABLE_BLOCKED = frozenset({"IN_PROGRESS", "REFUNDED", "CANCELED"})
CANCELLABLE = frozenset({"ACCEPTED", "SUBMITTED", "COMPLETED", "PARTIALLY_REFUNDED"})
# Violet sends dates in all three shapes; the fake rotates through them.
_DATE_FORMATS = ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S+0000", "%Y-%m-%dT%H:%M:%S.000Z")


class RuleViolation(Exception):
    """A request Violet would refuse: becomes a Violet-shaped 4xx."""

    def __init__(
        self, status: int, message: str, error_code: int, *, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.retry_after = retry_after


def render_date(when: float, variant: int, quirks: ServerQuirks) -> str:
    """Unix time ``when`` as Violet writes it: one of its three UTC shapes, or (with
    ``quirks.naive_dates``) server local time with no offset at all."""
    if quirks.day_dates:
        return datetime.fromtimestamp(when, tz=timezone.utc).strftime("%Y-%m-%dT00:00:00Z")
    if quirks.naive_dates:
        zone = timezone(timedelta(hours=quirks.server_utc_offset_hours))
        return datetime.fromtimestamp(when, tz=zone).strftime("%Y-%m-%dT%H:%M:%S")
    moment = datetime.fromtimestamp(when, tz=timezone.utc)
    return moment.strftime(_DATE_FORMATS[variant % len(_DATE_FORMATS)])


@attrs.define
class FakeSku:
    order_sku_id: int
    quantity: int
    price: int
    """Unit price in cents."""
    refunded_quantity: int = 0
    """The fake's own count, for its rules; never sent (Violet sends none)."""


@attrs.define
class FakeBag:
    id: int
    order_id: int
    merchant_id: int
    status: str = "COMPLETED"
    currency: str = "USD"
    skus: list[FakeSku] = attrs.Factory(list)
    shipping: int = 0
    tax: int = 0
    fulfilled: bool = False
    refunded_amount: int = 0
    refunded_shipping: int = 0
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    shown_status: str | None = None
    """The status the order still shows while ``bag_status_lag`` runs (None: the real
    one)."""
    status_shown_until: float = 0.0
    """The fake's monotonic clock time the lagging status ends."""

    def visible_status(self, now: float) -> str:
        """What ``GET /orders/{id}`` shows at ``now``: the platform reports a change
        minutes after it (``ServerQuirks.bag_status_lag``)."""
        if self.shown_status is not None and now < self.status_shown_until:
            return self.shown_status
        return self.status

    @property
    def total(self) -> int:
        return sum(s.price * s.quantity for s in self.skus) + self.shipping + self.tax

    @property
    def remaining(self) -> int:
        return self.total - self.refunded_amount

    def to_json(self, now: float = math.inf) -> dict[str, Any]:
        status = self.visible_status(now)
        financial = {
            "REFUNDED": "REFUNDED",
            "PARTIALLY_REFUNDED": "PARTIALLY_REFUNDED",
            "CANCELED": "REFUNDED",
        }.get(status, "PAID")
        return {
            "id": self.id,
            "order_id": self.order_id,
            "merchant_id": self.merchant_id,
            "status": status,
            "financial_status": financial,
            "fulfillment_status": "FULFILLED" if self.fulfilled else "PROCESSING",
            "currency": self.currency,
            "total": self.total,
            "shipping_total": self.shipping,
            "tax_total": self.tax,
            "sub_total": self.total - self.shipping - self.tax,
            "skus": [
                {
                    "id": s.order_sku_id,
                    "quantity": s.quantity,
                    "price": s.price,
                    "quantity_fulfilled": s.quantity if self.fulfilled else 0,
                    "status": _sku_status(status, self.fulfilled),
                }
                for s in self.skus
            ],
        }


@attrs.define
class FakeOrder:
    id: int
    app_id: int
    bags: dict[int, FakeBag] = attrs.Factory(dict)

    def to_json(self, now: float = math.inf) -> dict[str, Any]:
        """The order as Violet shows it at ``now`` (the fake's monotonic clock; the
        default shows every bag's real status)."""
        return {
            "id": self.id,
            "app_id": self.app_id,
            "bags": [b.to_json(now) for b in self.bags.values()],
        }


def _sku_status(bag_status: str, fulfilled: bool) -> str:
    if bag_status in ("CANCELED", "REFUNDED"):
        return bag_status
    return "SHIPPED" if fulfilled else "PROCESSING"


@attrs.define
class Post:
    """One refund or cancel POST the server received."""

    route: str
    """"refund" or "cancel"."""
    at: float
    """When it arrived (the fake's monotonic clock)."""
    fault: str | None
    """The fault it drew (its value), if any."""
    refund_id: int | None = None
    """The refund it committed, once it has (a late commit fills it in later)."""


@attrs.frozen
class Commit:
    """One refund record the server committed."""

    refund_id: int
    route: str
    """"refund", "cancel" or "external" (:meth:`FakeViolet.another_actor_refund`)."""
    at: float
    """The fake's monotonic clock at commit time."""
    visible_at: float
    """When it shows in the refund list (``at`` plus any list lag)."""


@attrs.define
class Ledger:
    """What the fake did, for assertions such as "exactly one refund per bag".

    ``refunds_per_bag`` counts refunds made through the API (and by direct
    ``Store.commit_refund`` calls); ``external_refunds_per_bag`` those made by
    :meth:`FakeViolet.another_actor_refund`. ``posts_per_bag`` and
    ``commits_per_bag`` list, in order, every POST received and every commit.
    """

    refunds_per_bag: Counter[int] = attrs.Factory(Counter)
    amount_per_bag: Counter[int] = attrs.Factory(Counter)
    external_refunds_per_bag: Counter[int] = attrs.Factory(Counter)
    posts_per_bag: dict[int, list[Post]] = attrs.Factory(dict)
    commits_per_bag: dict[int, list[Commit]] = attrs.Factory(dict)
    requests: Counter[str] = attrs.Factory(Counter)
    faults: Counter[str] = attrs.Factory(Counter)
    logins: int = 0
    refreshes: int = 0

    def double_refunds(self) -> dict[int, int]:
        """Bags refunded more than once, with their refund counts."""
        return {bag: n for bag, n in self.refunds_per_bag.items() if n > 1}

    @property
    def total_refunds(self) -> int:
        return sum(self.refunds_per_bag.values())


class Store:
    """All orders and the ids handed out, with Violet's refund and cancel rules."""

    def __init__(
        self,
        app_id: int,
        merchant_id: int = 20001,
        *,
        clock: ServerClock | None = None,
        quirks: ServerQuirks | None = None,
    ) -> None:
        self.app_id = app_id
        self.clock: ServerClock = clock or RealClock()
        self.quirks = quirks or ServerQuirks()
        #: Seconds a new commit's list entry lags; FakeViolet sets it per bag.
        self.lag_for: Callable[[int], float] = lambda bag_id: self.quirks.list_lag
        self.merchant_id = merchant_id
        self.orders: dict[int, FakeOrder] = {}
        self.ledger = Ledger()
        self._next_order = 100_000
        self._next_bag = 200_000
        self._next_sku = 300_000
        self._next_refund = 400_000
        self._next_refund_sku = 500_000
        #: Called after every commit with (bag, refund record); FakeViolet sends
        #: webhooks from it.
        self.on_commit: Callable[[FakeBag, dict[str, Any]], None] | None = None
        #: New refunds stay PROCESSING for this many reads of their bag's refunds.
        self.processing_reads = 0
        self._processing: dict[int, int] = {}
        self._visible_at: dict[int, float] = {}
        self._committed_at: dict[int, float] = {}

    def server_time(self) -> float:
        """The server's wall clock: the fake's clock plus ``server_clock_skew``."""
        return self.clock.time() + self.quirks.server_clock_skew

    def visible(self, record: dict[str, Any], *, behind: float = 0.0) -> bool:
        """Whether the (lagging) refund list shows this record yet; ``behind``: read
        from a replica that many seconds behind the primary."""
        now = self.clock.monotonic()
        if behind and self._committed_at.get(record["id"], -math.inf) > now - behind:
            return False
        return self._visible_at.get(record["id"], -math.inf) <= now

    def list_late(self, refund_id: int, bag_id: int, seconds: float) -> None:
        """The bag's list shows the committed refund ``refund_id`` only ``seconds``
        from now (fake's clock): a replica behind, so a read before then (a baseline
        read, say) misses a refund made earlier."""
        at = self.clock.monotonic() + seconds
        self._visible_at[refund_id] = at
        commits = self.ledger.commits_per_bag.get(bag_id, [])
        for index, commit in enumerate(commits):
            if commit.refund_id == refund_id:
                commits[index] = attrs.evolve(commit, visible_at=at)

    def reveal_all(self) -> None:
        """End list lag for every refund committed so far."""
        self._visible_at.clear()

    # -- seeding ----------------------------------------------------------------

    def add_order(self, bags: list[dict[str, Any]]) -> FakeOrder:
        """Seed an order. Each bag dict may give merchant_id, status, currency, shipping,
        tax, fulfilled, and skus as [{"quantity": q, "price": cents, "order_sku_id": id?}]."""
        self._next_order += 1
        order = FakeOrder(id=self._next_order, app_id=self.app_id)
        for spec in bags:
            self._next_bag += 1
            skus = []
            for sku in spec.get("skus") or [{"quantity": 1, "price": 1000}]:
                self._next_sku += 1
                skus.append(
                    FakeSku(
                        order_sku_id=sku.get("order_sku_id", self._next_sku),
                        quantity=sku["quantity"],
                        price=sku["price"],
                    )
                )
            bag = FakeBag(
                id=self._next_bag,
                order_id=order.id,
                merchant_id=spec.get("merchant_id", self.merchant_id),
                status=spec.get("status", "COMPLETED"),
                currency=spec.get("currency", "USD"),
                skus=skus,
                shipping=spec.get("shipping", 0),
                tax=spec.get("tax", 0),
                fulfilled=spec.get("fulfilled", False),
            )
            order.bags[bag.id] = bag
        self.orders[order.id] = order
        return order

    def generate(self, count: int, seed: int, *, merchants: int = 1) -> list[tuple[int, int]]:
        """Seed ``count`` single-bag orders deterministically; returns (order, bag) ids.
        With ``merchants`` > 1 the bags take turns among that many merchants (ids from
        the store's ``merchant_id`` up), as an export sorted by date would mix them."""
        rng = random.Random(seed)
        pairs = []
        for index in range(count):
            skus = [
                {"quantity": rng.randint(1, 3), "price": rng.choice((500, 1000, 2500, 4999))}
                for _ in range(rng.randint(1, 3))
            ]
            order = self.add_order(
                [
                    {
                        "status": rng.choice(("COMPLETED", "ACCEPTED", "SUBMITTED")),
                        "skus": skus,
                        "shipping": rng.choice((0, 500, 995)),
                        "tax": rng.choice((0, 120, 340)),
                        "merchant_id": self.merchant_id + index % merchants,
                    }
                ]
            )
            pairs.append((order.id, next(iter(order.bags))))
        return pairs

    # -- lookups ----------------------------------------------------------------

    def order(self, order_id: int) -> FakeOrder:
        order = self.orders.get(order_id)
        if order is None:
            raise RuleViolation(404, f"Order {order_id} not found", 4040)
        return order

    def bag(self, order_id: int, bag_id: int) -> FakeBag:
        bag = self.order(order_id).bags.get(bag_id)
        if bag is None:
            raise RuleViolation(404, f"Bag {bag_id} not found on order {order_id}", 4041)
        return bag

    # -- rules ------------------------------------------------------------------

    def check_refund(self, bag: FakeBag, body: dict[str, Any]) -> tuple[int, int, list[Any]]:
        """Validate a refund body against the bag; returns (amount, shipping, lines)."""
        if bag.status in REFUNDABLE_BLOCKED:
            raise RuleViolation(400, f"Bag {bag.id} is {bag.status} and cannot be refunded", 4001)
        shipping_body = body.get("shipping")
        shipping = 0
        if shipping_body is not None:
            shipping = _nonneg_int(
                shipping_body.get("amount") if isinstance(shipping_body, dict) else None,
                "shipping.amount",
            )
            if shipping > bag.shipping - bag.refunded_shipping:
                raise RuleViolation(400, "Shipping refund exceeds shipping paid", 4002)
        lines: list[tuple[FakeSku, int, int | None]] = []
        raw_skus = body.get("skus")
        if raw_skus is not None:
            if not isinstance(raw_skus, list):
                raise RuleViolation(400, "skus must be a list", 4003)
            by_id = {s.order_sku_id: s for s in bag.skus}
            for raw in raw_skus:
                if not isinstance(raw, dict):
                    raise RuleViolation(400, "skus entries must be objects", 4003)
                sku = by_id.get(raw.get("order_sku_id"))  # type: ignore[arg-type]
                if sku is None:
                    raise RuleViolation(400, f"Unknown order sku {raw.get('order_sku_id')}", 4004)
                qty = _nonneg_int(raw.get("quantity_refunded"), "quantity_refunded")
                if qty < 1 or qty > sku.quantity - sku.refunded_quantity:
                    raise RuleViolation(400, "quantity_refunded exceeds refundable quantity", 4005)
                line_amount = raw.get("amount_refunded")
                if line_amount is not None:
                    line_amount = _nonneg_int(line_amount, "amount_refunded")
                lines.append((sku, qty, line_amount))
        amount = body.get("amount_refunded")
        if amount is None:
            if lines:
                amount = (
                    sum(la if la is not None else sku.price * qty for sku, qty, la in lines)
                    + shipping
                )
            else:
                amount = bag.remaining
        else:
            amount = _nonneg_int(amount, "amount_refunded")
        if amount > bag.remaining:
            raise RuleViolation(
                400, f"Refund of {amount} exceeds the {bag.remaining} left on bag {bag.id}", 4006
            )
        return amount, shipping, lines

    def commit_refund(
        self,
        bag: FakeBag,
        body: dict[str, Any],
        checked: tuple[int, int, list[Any]] | None = None,
        *,
        status: str = "COMPLETED",
        route: str = "refund",
        age_seconds: float = 0.0,
    ) -> dict[str, Any]:
        """Apply a refund; ``checked`` is the result of :meth:`check_refund` on the bag
        as it is now (None re-checks, for commits that land late). ``route``
        "external" counts it as another system's; ``age_seconds`` back-dates it."""
        amount, shipping, lines = self.check_refund(bag, body) if checked is None else checked
        self._next_refund += 1
        refund_id = self._next_refund
        now = self.server_time() - age_seconds
        sku_records = []
        for sku, qty, _ in lines:
            sku.refunded_quantity += qty
            self._next_refund_sku += 1
            sku_records.append(
                {
                    "id": self._next_refund_sku,
                    "refund_id": refund_id,
                    "bag_id": bag.id,
                    "order_sku_id": sku.order_sku_id,
                    "quantity_refunded": qty,
                    "external_id": f"ext-sku-{self._next_refund_sku}",
                }
            )
        bag.refunded_amount += amount
        bag.refunded_shipping += shipping
        lag = self.quirks.bag_status_lag
        if lag > 0:
            # The platform reports the change minutes later: until then the order shows
            # the status from before this refund (or from before an earlier one, still
            # lagging).
            monotonic = self.clock.monotonic()
            bag.shown_status = bag.visible_status(monotonic)
            bag.status_shown_until = monotonic + lag
        if body.get("_cancel"):
            bag.status = "CANCELED"
        else:
            bag.status = "REFUNDED" if bag.remaining == 0 else "PARTIALLY_REFUNDED"
        platform = status == "EXTERNAL"
        record = self._record(
            bag,
            refund_id,
            now,
            amount=self._recorded_amount(amount, shipping, body),
            status=status,
            skus=sku_records,
            errors=[],
            dated=not self.quirks.missing_dates,
        )
        if platform:
            del record["transaction_id"]  # made on the platform: no Violet transaction
        if shipping:
            record["shipping"] = {
                "amount": shipping,
                "tax_amount": 0,
                "full_refund": shipping == bag.shipping,
            }
        if self.quirks.full_records:
            # Every field of the spec page, as the refund-bag example shows them.
            record.update(
                {
                    "gateway_transaction_id": None if platform else f"pi_fake_{bag.id}",
                    "merchant_transfer_reversal_amount_usd": amount * 9 // 10,
                    "developer_transfer_reversal_amount_usd": amount - amount * 9 // 10,
                    "merchant_transfer_reversal_amount_platform_currency": amount * 9 // 10,
                    "developer_transfer_reversal_amount_platform_currency": amount
                    - amount * 9 // 10,
                    "reason_code": body.get("reason_code", "OTHER"),
                    "platform_currency": "USD",
                    "shipping": record.get("shipping"),
                    "tax_amount": None,
                }
            )
        reason = body.get("reason")
        if isinstance(reason, str):
            record["reason"] = reason.strip() if self.quirks.trim_reasons else reason
        if self.processing_reads:
            record["status"] = "PROCESSING"
            self._processing[refund_id] = self.processing_reads
        bag.refunds.append(record)
        committed_at = self.clock.monotonic() - age_seconds
        visible_at = committed_at + self.lag_for(bag.id)
        if self.quirks.replica_behind:
            self._committed_at[refund_id] = committed_at
        if visible_at > self.clock.monotonic():
            self._visible_at[refund_id] = visible_at
        self.ledger.commits_per_bag.setdefault(bag.id, []).append(
            Commit(refund_id, route, committed_at, visible_at)
        )
        if route == "external":
            self.ledger.external_refunds_per_bag[bag.id] += 1
        else:
            self.ledger.refunds_per_bag[bag.id] += 1
        self.ledger.amount_per_bag[bag.id] += amount
        if self.on_commit is not None:
            self.on_commit(bag, record)
        return record

    def void_refund(
        self, bag: FakeBag, record: dict[str, Any], status: str, bag_status: str | None
    ) -> None:
        """The refund ``record`` just committed moved no money after all (the platform
        refused it): it stays on the bag in ``status`` (FAILED or CANCELED), and the
        bag's amounts, its units and the ledger's count and money go back. The bag
        returns to ``bag_status`` (None: it keeps its status, as a cancelled bag does)."""
        record["status"] = status
        record["errors"] = [
            {"id": record["id"], "error_code": 4500, "error_message": "the platform refused it"}
        ]
        self._processing.pop(record["id"], None)
        bag.refunded_amount -= record["amount"]
        bag.refunded_shipping -= (record.get("shipping") or {}).get("amount", 0)
        units = {line["order_sku_id"]: line["quantity_refunded"] for line in record["skus"]}
        for sku in bag.skus:
            sku.refunded_quantity -= units.get(sku.order_sku_id, 0)
        if bag_status is not None:
            bag.status = bag_status
        self.ledger.refunds_per_bag[bag.id] -= 1
        self.ledger.amount_per_bag[bag.id] -= record["amount"]

    def _recorded_amount(self, amount: int, shipping: int, body: dict[str, Any]) -> int:
        """The record's ``amount``: ``amount_with_shipping`` folds the shipping into an
        amount the body named."""
        if shipping and self.quirks.amount_with_shipping and body.get("amount_refunded"):
            return amount + shipping
        return amount

    def dead_refund(
        self, bag: FakeBag, amount: int, *, status: str = "FAILED", age_seconds: float = 0.0
    ) -> dict[str, Any]:
        """A refund attempt the platform refused (``FAILED``) or withdrew
        (``CANCELED``): listed on the bag, no money moved (the bag and the ledger's
        counts stay as they were)."""
        self._next_refund += 1
        refund_id = self._next_refund
        now = self.server_time() - age_seconds
        record = self._record(
            bag,
            refund_id,
            now,
            amount=amount,
            status=status,
            skus=[],
            errors=[{"id": refund_id, "error_code": 4001, "error_message": "platform refused"}],
        )
        bag.refunds.append(record)
        return record

    def foreign_refund(
        self, bag: FakeBag, amount: int, reason: str | None, *, order_id: int
    ) -> dict[str, Any]:
        """A COMPLETED refund of ``amount`` naming order ``order_id`` listed under
        ``bag`` (a record a backend filed under the wrong bag id): no money moved on
        this bag (its amounts and the ledger's counts stay as they were)."""
        self._next_refund += 1
        refund_id = self._next_refund
        record = self._record(
            bag,
            refund_id,
            self.server_time(),
            amount=amount,
            status="COMPLETED",
            skus=[],
            errors=[],
        )
        record["order_id"] = order_id
        if reason is not None:
            record["reason"] = reason
        bag.refunds.append(record)
        return record

    def _record(
        self,
        bag: FakeBag,
        refund_id: int,
        now: float,
        *,
        amount: int,
        status: str,
        skus: list[dict[str, Any]],
        errors: list[dict[str, Any]],
        dated: bool = True,
    ) -> dict[str, Any]:
        """A refund record as Violet lists it (its transaction id is Violet's: a
        platform-made refund drops it)."""
        return {
            "id": refund_id,
            "order_id": bag.order_id,
            "bag_id": bag.id,
            "merchant_id": bag.merchant_id,
            "app_id": self.app_id,
            "transaction_id": 600_000 + bag.id,
            "amount": amount,
            "refund_currency": bag.currency,
            "status": status,
            "skus": skus,
            "date_created": render_date(now, refund_id, self.quirks) if dated else None,
            "date_last_modified": render_date(now, refund_id + 1, self.quirks),
            "external_id": f"ext-refund-{refund_id}",
            "errors": errors,
        }

    def tick_processing(self, bag: FakeBag) -> None:
        """One read of the bag's refunds: PROCESSING refunds move toward COMPLETED."""
        for record in bag.refunds:
            left = self._processing.get(record["id"])
            if left is None:
                continue
            if left <= 1:
                del self._processing[record["id"]]
                record["status"] = "COMPLETED"
                record["date_last_modified"] = render_date(self.server_time(), 0, self.quirks)
            else:
                self._processing[record["id"]] = left - 1

    def check_cancel(self, bag: FakeBag) -> None:
        if bag.status not in CANCELLABLE:
            raise RuleViolation(400, f"Bag {bag.id} is {bag.status} and cannot be cancelled", 4010)
        if bag.fulfilled:
            raise RuleViolation(400, f"Bag {bag.id} is fulfilled and cannot be cancelled", 4011)
        if bag.remaining <= 0:
            raise RuleViolation(400, f"Bag {bag.id} has nothing left to refund", 4012)

    def commit_cancel(self, bag: FakeBag, body: dict[str, Any]) -> dict[str, Any]:
        self.check_cancel(bag)
        cancel_body = {
            "_cancel": True,
            "reason": body.get("reason"),
            "reason_code": body.get("reason_code", "OTHER"),
        }
        return self.commit_refund(bag, cancel_body, (bag.remaining, 0, []), route="cancel")


def cancellation_body(app_id: int, bag: FakeBag, record: dict[str, Any]) -> dict[str, Any]:
    """Violet's 202 answer to a bag cancel that applied (the orders-and-checkout page's
    example, with this bag and its refund)."""
    return {
        "order_id": bag.order_id,
        "app_id": app_id,
        "status": "CANCELED",
        "cancelled_bags": [
            {
                "order_id": bag.order_id,
                "bag_id": bag.id,
                "merchant_id": bag.merchant_id,
                "external_order_id": f"ext-order-{bag.id}",
                "status": "CANCELED",
                "originated_by": "VIOLET",
                "date_cancelled": record["date_created"],
                "refund": record,
            }
        ],
        "message": "All external orders were cancelled.",
    }


def cancellation_failure_body(app_id: int, bag: FakeBag, message: str) -> dict[str, Any]:
    """Violet's 202 answer to a bag cancel the merchant's platform refused: the bag's
    own status is CANCELLATION_FAILURE, and nothing was refunded."""
    return {
        "order_id": bag.order_id,
        "app_id": app_id,
        "status": "CANCELLATION_FAILURE",
        "cancelled_bags": [
            {
                "order_id": bag.order_id,
                "bag_id": bag.id,
                "merchant_id": bag.merchant_id,
                "external_order_id": f"ext-order-{bag.id}",
                "status": "CANCELLATION_FAILURE",
                "originated_by": "VIOLET",
            }
        ],
        "message": message,
    }


def _nonneg_int(value: object, field: str) -> int:
    if type(value) is not int or value < 0:
        raise RuleViolation(400, f"{field} must be a non-negative integer", 4007)
    return value
