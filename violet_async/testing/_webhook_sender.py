"""FakeViolet's webhook sender: signed ORDER_REFUNDED / ORDER_CANCELLED events, retried
on non-2xx like Violet (10 attempts, doubling delays, compressed timing), sent through
the SDK's own transport. The body is the full order stamped with
``date_last_modified`` (as Violet's is), so two commits never sign identical bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import orjson

from .._transport import Timeouts, Transport
from ..exceptions import VioletError
from ..webhooks import sign

__all__ = ["WebhookSender"]

_TIMEOUTS = Timeouts(connect=2.0, read=10.0)


class WebhookSender:
    """Delivers each event to every registered URL in the background. Each record in
    ``deliveries`` counts ``attempts`` and keeps every answer in ``statuses``; delivery
    stops at the first 2xx. ``sleep`` is injectable (tests pass a fake one)."""

    def __init__(
        self,
        app_secret: str,
        *,
        retry_delay: float,
        attempts: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.urls: list[str] = []
        self.deliveries: list[dict[str, Any]] = []
        self._secret = app_secret
        self._retry_delay = retry_delay
        self._attempts = attempts
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()
        self._transport: Transport | None = None
        self._serial = 0

    def send(self, topic: str, order_id: int, bag_id: int, body: bytes) -> None:
        """Start delivering one event (the body is the order) to every URL."""
        order = orjson.loads(body)
        if isinstance(order, dict) and "date_last_modified" not in order:
            order["date_last_modified"] = datetime.now(timezone.utc).isoformat()
            body = orjson.dumps(order)
        for url in self.urls:
            self._serial += 1
            headers = {
                "Content-Type": "application/json",
                "X-Violet-Hmac": sign(body, self._secret),
                "X-Violet-Event-Id": f"evt-{self._serial}",
                "X-Violet-Order-Id": str(order_id),
                "X-Violet-Bag-Id": str(bag_id),
                "X-Violet-Topic": topic,
            }
            task = asyncio.get_running_loop().create_task(self._deliver(url, headers, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, headers: dict[str, str], body: bytes) -> None:
        if self._transport is None:
            self._transport = Transport(None)
        delivery: dict[str, Any] = {
            "event_id": headers["X-Violet-Event-Id"],
            "topic": headers["X-Violet-Topic"],
            "order_id": int(headers["X-Violet-Order-Id"]),
            "bag_id": int(headers["X-Violet-Bag-Id"]),
            "attempts": 0,
            "status": None,
            "statuses": [],
        }
        self.deliveries.append(delivery)
        for attempt in range(self._attempts):
            delivery["attempts"] = attempt + 1
            try:
                response = await self._transport.send(
                    "POST", url, headers=headers, body=body, timeouts=_TIMEOUTS
                )
                delivery["status"] = response.status
                delivery["statuses"].append(response.status)
                if 200 <= response.status < 300:
                    return
            except VioletError as exc:
                delivery["status"] = type(exc).__name__
                delivery["statuses"].append(delivery["status"])
            if attempt + 1 < self._attempts:  # no pointless wait after the last try
                await self._sleep(self._retry_delay * 2**attempt)

    async def drain(self) -> None:
        """Wait until every delivery has succeeded or given up."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel deliveries still retrying and close the transport."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None
