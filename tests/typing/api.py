"""Checked by mypy --strict, never run: the public API types as users will write it."""

from __future__ import annotations

import aiohttp

from violet_async import (
    AmbiguousOutcomeError,
    APIError,
    CancelBagRequest,
    Environment,
    IdempotencyKeyReusedError,
    OrderRefund,
    ReasonCode,
    RefundBagRequest,
    RefundStatus,
    RetryEvent,
    RetryPolicy,
    ShippingRefund,
    SkuRefund,
    Timeouts,
    VioletClient,
)
from violet_async.stores import MemoryStore, RecordStore, SQLiteStore


async def refund_flow(session: aiohttp.ClientSession) -> list[OrderRefund]:
    def on_retry(event: RetryEvent) -> None:
        print(event.attempt, event.delay, event.cause, event.read_back)

    async with VioletClient(
        11,
        "secret",
        username="u",
        password="p",
        environment=Environment.SANDBOX,
        retry=RetryPolicy(max_attempts=3, deadline=20.0),
        timeouts=Timeouts(connect=2.0, read=10.0),
        session=session,
        on_retry=on_retry,
    ) as client:
        refund: OrderRefund = await client.refund_bag(
            1,
            2,
            amount_refunded=1000,
            shipping=ShippingRefund(amount=500),
            skus=[SkuRefund(order_sku_id=10000, quantity_refunded=1, amount_refunded=500)],
            reason="Customer requested refund.",
            restock_items=False,
            notify_customer=None,
        )
        same: OrderRefund = await client.refund_bag(1, 2, RefundBagRequest(amount_refunded=5))
        cancelled: OrderRefund = await client.cancel_bag(
            1, 3, reason_code=ReasonCode.CUSTOMER, reason="r", restock_items=True
        )
        other: OrderRefund = await client.cancel_bag(1, 4, CancelBagRequest())
        fast = client.with_options(retry=RetryPolicy.disabled(), timeouts=Timeouts(read=5))
        try:
            listed: list[OrderRefund] = await fast.list_bag_refunds(1, 2)
        except AmbiguousOutcomeError as exc:
            print(exc.candidates, exc.attempts)
            raise
        except APIError as exc:
            print(exc.status, exc.error_code, exc.body, exc.headers)
            raise
        done: bool = refund.status is not None and refund.status.is_terminal
        failed: bool = refund.status is RefundStatus.FAILED
        print(same, cancelled, other, done, failed, refund.reconciled)
        return listed


def from_environment() -> VioletClient:
    return VioletClient.from_env()


async def keyed_refunds() -> OrderRefund:
    stores: list[RecordStore] = [MemoryStore(), SQLiteStore("refunds.db", retention=3600.0)]
    async with VioletClient(11, "secret", token="t", store=stores[1]) as client:
        try:
            return await client.refund_bag(1, 2, amount_refunded=5, idempotency_key="rma-4711")
        except IdempotencyKeyReusedError as exc:
            print(exc.key)
            raise
        finally:
            await client.cancel_bag(1, 3, idempotency_key="rma-4712")
