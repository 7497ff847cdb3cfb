"""The aiohttp.web handler: acknowledge only what was handled, or durably kept.

Answers, in the order they are decided:

- 413: the body is over ``max_body``, with or without Content-Length (chunked bodies
  are read until EOF or one byte past the cap, never further);
- 401: bad or missing signature; 400: malformed ``X-Violet-*`` header, a header that
  disagrees with the signed body, a body that is not an order, an order too old;
- inline mode (default): 503 + Retry-After when ``max_concurrent`` callbacks already
  run, or when another delivery of the same event (same id or same body) is running;
  200 ``{"duplicate": true}`` when it was handled; otherwise the callback is awaited
  for ``budget`` seconds: success 200, exception 500 (claim released: the next
  delivery runs it again), still running 503 (it keeps running under its claim, up to
  ``callback_timeout``; the next delivery finds it done, or runs it again if it failed);
- queued mode: 200 once the event is committed to the store (``{"queued": true}``, or
  ``"duplicate": true`` if it was queued or handled before); 503 if the store failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from .._redact import printable
from ._dedup import ClaimResult
from ._queue import EventStore, SQLiteEventStore, StoredEvent, WebhookWorker
from ._receiver import (
    WebhookEvent,
    WebhookPayloadError,
    WebhookReceiver,
    WebhookSignatureError,
    WebhookTooLargeError,
)

__all__ = ["WebhookCallback", "WebhookHandler", "webhook_handler"]

log = logging.getLogger("violet_async.webhooks")

WebhookCallback = Callable[[WebhookEvent], Awaitable[Any]]

#: Violet gives a receiver 10 s; answer well inside it.
DEFAULT_BUDGET = 8.0


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is over ``limit`` bytes. Reads until EOF:
    ``content.read(n)`` returns what has arrived so far, not n bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def _answer(status: int, **body: Any) -> web.Response:
    headers = {"Retry-After": "60"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


class WebhookHandler:
    """Register ``handler.handle`` on an aiohttp.web route and
    ``app.cleanup_ctx.append(handler.cleanup_ctx)`` (starts the queue's worker, drains
    callbacks on shutdown). See the module docstring for every answer."""

    def __init__(
        self,
        receiver: WebhookReceiver,
        callback: WebhookCallback,
        *,
        budget: float = DEFAULT_BUDGET,
        max_concurrent: int = 32,
        callback_timeout: float = 60.0,
        queue: EventStore | str | os.PathLike[str] | None = None,
        worker_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if budget <= 0 or max_concurrent < 1:
            raise ValueError("budget must be positive and max_concurrent at least 1")
        if callback_timeout >= receiver.claim_ttl:
            raise ValueError("callback_timeout must be shorter than the receiver's claim_ttl")
        self.receiver = receiver
        self.callback = callback
        self.budget = budget
        self.max_concurrent = max_concurrent
        self.callback_timeout = callback_timeout
        self.tasks: set[asyncio.Task[bool]] = set()
        self._active = 0  # callbacks running or about to (claims in flight)
        self._clock = clock
        self.store: EventStore | None = (
            SQLiteEventStore(queue) if isinstance(queue, (str, os.PathLike)) else queue
        )
        self.worker: WebhookWorker | None = None
        if self.store is not None:
            options = {"callback_timeout": callback_timeout, **(worker_options or {})}
            self.worker = WebhookWorker(self.store, receiver, callback, **options)

    @property
    def mode(self) -> str:
        """``"inline"`` or ``"queued"``."""
        return "inline" if self.store is None else "queued"

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp.web request handler."""
        raw = await read_body(request, self.receiver.max_body)
        if raw is None:
            return _answer(413, error="body too large")
        try:
            event = self.receiver.parse(request.headers, raw)
        except WebhookSignatureError:
            log.warning("violet webhook refused: bad signature")
            return _answer(401, error="bad signature")
        except WebhookTooLargeError:  # pragma: no cover - read_body refused it already
            return _answer(413, error="body too large")
        except WebhookPayloadError as exc:
            log.warning("violet webhook refused: %s", printable(exc))
            return _answer(400, error="bad payload")
        if self.store is not None:
            return await self._enqueue(self.store, request, event, raw)
        return await self._inline(event)

    async def _enqueue(
        self, store: EventStore, request: web.Request, event: WebhookEvent, raw: bytes
    ) -> web.Response:
        record = StoredEvent.of(event, request.headers, raw, self._clock())
        try:
            new = await store.put(record)
        except Exception:  # not kept, so not acknowledged
            log.exception("violet webhook queue write failed for event %s", event.event_id)
            return _answer(503, error="queue unavailable")
        if new and self.worker is not None:
            self.worker.wake()
        return _answer(200, received=event.event_id, queued=new, duplicate=not new)

    async def _inline(self, event: WebhookEvent) -> web.Response:
        if self._active >= self.max_concurrent:
            return _answer(503, error="too many webhooks in progress")
        self._active += 1  # before the first await, so concurrent deliveries see it
        try:
            claim = await self.receiver.claim(event)
        except Exception:  # the dedup store is down: let Violet retry
            log.exception("violet webhook dedup store failed for event %s", event.event_id)
            claim = None
        except BaseException:
            self._active -= 1
            raise
        if claim is not ClaimResult.NEW:
            self._active -= 1
        if claim is None:
            return _answer(503, error="dedup store unavailable")
        if claim is ClaimResult.DONE:
            return _answer(200, received=event.event_id, duplicate=True)
        if claim is ClaimResult.RUNNING:
            return _answer(503, error="event in progress")
        task = asyncio.get_running_loop().create_task(self._run(event))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        finished, _ = await asyncio.wait({task}, timeout=self.budget)
        if not finished:
            log.warning("violet webhook %s over its %.1f s budget", event.event_id, self.budget)
            return _answer(503, error="callback still running")
        if not task.result():
            return _answer(500, error="callback failed")
        return _answer(200, received=event.event_id, duplicate=False)

    async def _run(self, event: WebhookEvent) -> bool:
        try:
            return await self._call(event)
        finally:
            self._active -= 1

    async def _call(self, event: WebhookEvent) -> bool:
        try:
            await asyncio.wait_for(self.callback(event), self.callback_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self.receiver.release(event)
            if not isinstance(exc, Exception):
                raise  # cancelled on shutdown: released, Violet delivers again
            log.exception("violet webhook callback failed for event %s", event.event_id)
            return False
        try:
            await self.receiver.done(event)
        except Exception:  # handled; the claim expires, a redelivery reruns
            log.exception("violet webhook dedup store failed marking %s done", event.event_id)
        return True

    async def drain(self) -> None:
        """Wait for callbacks still running (call on shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def start(self) -> None:
        """Start the queue's worker (queued mode): it replays what a crash left."""
        if self.worker is not None:
            self.worker.start()

    async def aclose(self) -> None:
        """Drain inline callbacks, stop the worker, close the store."""
        await self.drain()
        if self.worker is not None:
            await self.worker.stop()
        if self.store is not None:
            await self.store.aclose()

    async def cleanup_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: :meth:`start`, then :meth:`aclose` on shutdown."""
        await self.start()
        yield
        await self.aclose()


def webhook_handler(
    receiver: WebhookReceiver,
    callback: WebhookCallback,
    *,
    budget: float = DEFAULT_BUDGET,
    max_concurrent: int = 32,
    callback_timeout: float = 60.0,
    queue: EventStore | str | os.PathLike[str] | None = None,
    worker_options: dict[str, Any] | None = None,
) -> WebhookHandler:
    """An aiohttp.web handler (``app.router.add_post(path, handler.handle)``).

    Inline (default): ``callback(event)`` is awaited for ``budget`` seconds and the
    answer says whether it succeeded (2xx) or not (5xx, so Violet delivers again).
    Queued (``queue=`` a SQLite path or an :class:`EventStore`): 200 once the event
    is durably stored; a worker runs callbacks from the store until they succeed.
    Either way callbacks see at-least-once delivery: make them idempotent."""
    return WebhookHandler(
        receiver,
        callback,
        budget=budget,
        max_concurrent=max_concurrent,
        callback_timeout=callback_timeout,
        queue=queue,
        worker_options=worker_options,
    )
