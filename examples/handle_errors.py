"""What goes wrong, and how each failure reaches you: one typed error per case.

python examples/handle_errors.py                      # embedded FakeViolet
VIOLET_APP_ID=... python examples/handle_errors.py 100004 200004
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from violet_async import (
    AmbiguousOutcomeError,
    APIError,
    BadRequestError,
    NotFoundError,
    PendingRefund,
    RefundFailedError,
    RequestValidationError,
    VioletClient,
    VioletError,
)
from violet_async.testing import FakeViolet


@contextlib.asynccontextmanager
async def violet() -> AsyncIterator[VioletClient]:
    """A client from VIOLET_* variables, or on an embedded FakeViolet when none are set."""
    if os.environ.get("VIOLET_APP_ID"):
        async with VioletClient.from_env() as client:
            yield client
    else:
        async with FakeViolet(orders=10, seed=1) as fake, fake.client() as client:
            yield client


async def refund(client: VioletClient, order_id: int, bag_id: int, amount: Any) -> None:
    try:
        done = await client.refund_bag(order_id, bag_id, amount_refunded=amount)
        print(f"refunded {done.amount} cents on bag {bag_id}")
    except RequestValidationError as exc:
        # Raised before any I/O: nothing was sent. exc.field names the culprit.
        print(f"invalid input, nothing sent: field {exc.field!r}: {exc}")
    except NotFoundError as exc:
        print(f"no such order or bag ({exc.status}): {exc.message}")
    except BadRequestError as exc:
        # Violet refused it (already refunded, amount too large, ...): nothing applied.
        print(f"refused by Violet ({exc.status}, error_code {exc.error_code}): {exc.message}")
    except AmbiguousOutcomeError as exc:
        # Sent, failed in flight, not proven either way yet: never send it again
        # blindly. exc.pending resumes it later (see refund_or_park below).
        print(f"outcome pending, resume exc.pending later: {exc}")
    except RefundFailedError as exc:
        print(f"Violet recorded the refund as FAILED: {exc.refund.errors}")
    except APIError as exc:  # 401, 403, 409, 429, 5xx after retries
        print(f"HTTP {exc.status}: {exc.message}")
    except VioletError as exc:  # connection failures, unreadable bodies, ...
        print(f"{type(exc).__name__}: {exc}")


async def refund_or_park(client: VioletClient, order_id: int, bag_id: int) -> str:
    try:
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=500)
    except AmbiguousOutcomeError as exc:
        if exc.pending is None or exc.pending.needs_review:
            return "look at the bag: its refunds do not tell"
        stored = exc.pending.to_json()  # keep it anywhere: a row, a queue message
        refund = await client.resume(PendingRefund.from_json(stored))
    return f"refund {refund.id} ({'found by read-back' if refund.reconciled else 'answered'})"


async def main(order_id: int, bag_id: int) -> None:
    async with violet() as client:
        await refund(client, order_id, bag_id, 10.5)  # a float is never money
        await refund(client, order_id, bag_id + 999_999, 100)  # a bag that does not exist
        await refund(client, order_id, bag_id, 10**9)  # more than the bag holds
        await refund(client, order_id, bag_id, 100)  # fine
        print(await refund_or_park(client, order_id, bag_id))


if __name__ == "__main__":
    order_id, bag_id = map(int, sys.argv[1:3]) if len(sys.argv) > 2 else (100004, 200004)
    asyncio.run(main(order_id, bag_id))
