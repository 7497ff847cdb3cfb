"""Retry policy, failure classification and backoff. The only tenacity importer.

Classification (also in README):

=====================================================  ==========  ===================
failure                                                GET         refund / cancel POST
=====================================================  ==========  ===================
connection never established (refused, DNS, pool or    retry       retry
connect timeout)
408, 429, 503 (``Retry-After`` honoured up to a cap)   retry       retry
other 4xx                                              raise       raise
read timeout, dropped connection, 500 / 502 / 504,     retry       **ambiguous**: read
unreadable 2xx body                                                back, never re-send
                                                                   blindly
=====================================================  ==========  ===================

The first attempt of every call runs outside tenacity: a call that succeeds first
time pays for one try/except and nothing else.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import timezone
from typing import Any, Protocol, TypeVar, cast

import attrs
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_random_exponential

from .exceptions import (
    APIConnectionError,
    APIError,
    ResponseFormatError,
    VioletError,
)

__all__ = [
    "Clock",
    "RetryEvent",
    "RetryPolicy",
    "Verdict",
    "classify",
    "parse_retry_after",
]

log = logging.getLogger("violet_async")

T = TypeVar("T")

#: Statuses Violet answers before doing anything: the request can be sent again.
SAFE_STATUSES = frozenset({408, 429, 503})
#: Statuses that may come after the refund was committed.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})


class Verdict(enum.Enum):
    RETRY = "retry"
    AMBIGUOUS = "ambiguous"
    RAISE = "raise"


def classify(exc: BaseException, *, idempotent: bool) -> Verdict:
    """Decide what a failure allows. The table in this module's docstring, as code."""
    if isinstance(exc, VioletError) and exc._retries_spent:
        return Verdict.RAISE
    if isinstance(exc, APIConnectionError):
        if not exc.request_sent:
            return Verdict.RETRY
        return Verdict.RETRY if idempotent else Verdict.AMBIGUOUS
    if isinstance(exc, APIError):
        if exc.status in SAFE_STATUSES:
            return Verdict.RETRY
        if exc.status in AMBIGUOUS_STATUSES:
            return Verdict.RETRY if idempotent else Verdict.AMBIGUOUS
        return Verdict.RAISE
    if isinstance(exc, ResponseFormatError) and exc.status < 300:
        # A truncated or garbled success body: the server did act.
        return Verdict.RETRY if idempotent else Verdict.AMBIGUOUS
    return Verdict.RAISE


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        current = now if now is not None else time.time()
        seconds = when.timestamp() - current
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


class Clock(Protocol):
    """Time source for backoff and deadlines; tests pass a fake one."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@attrs.frozen
class RetryPolicy:
    """How a call is retried. Every default is named and documented here.

    Attempts are sends of the request; a read-back after an ambiguous failure is not
    an attempt, but a re-send after it is.
    """

    max_attempts: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    """Sends per call, first one included. Default 4."""
    initial_delay: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    """Backoff base in seconds: the n-th retry waits up to initial_delay * 2**(n-1)."""
    max_delay: float = attrs.field(default=8.0, validator=attrs.validators.ge(0))
    """Cap on one backoff wait, in seconds. Default 8."""
    jitter: bool = True
    """Full jitter: wait a uniform random time up to the backoff. Default on."""
    deadline: float | None = attrs.field(default=60.0)
    """Total seconds for one call, waits and retries included; each attempt's timeout
    shrinks to what is left. None: no deadline. Default 60."""
    max_retry_after: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    """Longest ``Retry-After`` honoured, in seconds; longer values are capped."""
    settle_delay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    """Seconds between read-backs when reconciling an ambiguous refund or cancel."""
    settle_reads: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    """Read-backs that must all miss the refund before it is called absent and re-sent."""
    clock_skew: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    """Seconds of clock difference tolerated between this machine and Violet when
    deciding whether a refund read back was created by this call."""

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """One send per call. Ambiguous refunds are still read back before raising."""
        return cls(max_attempts=1)

    def backoff(self, retry_number: int) -> float:
        """Wait before the ``retry_number``-th retry (1-based), without Retry-After."""
        if self.jitter:
            strategy = wait_random_exponential(multiplier=self.initial_delay, max=self.max_delay)
        else:
            return min(self.max_delay, self.initial_delay * 2.0 ** (retry_number - 1))
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = retry_number
        delay: float = strategy(state)
        return delay


@attrs.frozen
class RetryEvent:
    """What the ``on_retry`` hook receives before each wait."""

    attempt: int
    """Sends made so far in this call."""
    delay: float
    """Seconds about to be waited."""
    cause: VioletError
    """The failure that triggered the retry."""
    method: str
    path: str
    read_back: bool
    """True when the bag was read back first and the refund proved absent."""


RetryHook = Callable[[RetryEvent], Any]


class RESEND:
    """Reconciliation's answer when the request provably did not apply."""


ReconcileFn = Callable[[VioletError, "CallState"], Awaitable[Any]]


class CallState:
    """Book-keeping of one call across its attempts (slotted: one per call)."""

    __slots__ = ("attempts", "deadline", "sent_at_wall")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.attempts = 0
        self.sent_at_wall = 0.0


class _Again(Exception):
    """Internal: the last attempt failed in a retryable way."""

    def __init__(self, cause: VioletError) -> None:
        super().__init__()
        self.cause = cause


class Retrier:
    """Runs one call under a policy: fast first attempt, then tenacity."""

    def __init__(self, policy: RetryPolicy, clock: Clock, on_retry: RetryHook | None) -> None:
        self.policy = policy
        self.clock = clock
        self.on_retry = on_retry

    def _state(self, started: float, *, sent_at_wall: float) -> CallState:
        deadline = None if self.policy.deadline is None else started + self.policy.deadline
        state = CallState(deadline)
        state.sent_at_wall = sent_at_wall
        return state

    def _remaining(self, state: CallState) -> float | None:
        if state.deadline is None:
            return None
        return state.deadline - self.clock.monotonic()

    async def _send(self, send: Callable[[float | None], Awaitable[T]], state: CallState) -> T:
        remaining = self._remaining(state)
        state.attempts += 1
        if not state.sent_at_wall:
            state.sent_at_wall = time.time()
        return await send(remaining)

    async def run(
        self,
        send: Callable[[float | None], Awaitable[T]],
        *,
        idempotent: bool,
        method: str,
        path: str,
        reconcile: ReconcileFn | None = None,
        resume_sent_at: float | None = None,
    ) -> T:
        """Run one call. ``resume_sent_at`` (wall time) says an earlier process may have
        sent this request then: the bag is read back before anything is sent."""
        now = self.clock.monotonic()
        state = self._state(now, sent_at_wall=0.0)
        if resume_sent_at is not None and reconcile is not None:
            state.sent_at_wall = resume_sent_at
            outcome = await reconcile(
                VioletError("an earlier run sent this request and stopped before its answer"),
                state,
            )
            if outcome is not RESEND:
                return outcome  # type: ignore[no-any-return]
        # The first attempt, inline: no tenacity, no extra coroutine frame.
        state.attempts = 1
        if not state.sent_at_wall:
            state.sent_at_wall = time.time()
        try:
            return await send(state.deadline - now if state.deadline is not None else None)
        except VioletError as exc:
            failure = exc
        return await self._recover(
            failure,
            send,
            state,
            idempotent=idempotent,
            method=method,
            path=path,
            reconcile=reconcile,
        )

    async def after_first_failure(
        self,
        failure: VioletError,
        send: Callable[[float | None], Awaitable[T]],
        *,
        started: float,
        sent_at_wall: float,
        idempotent: bool,
        method: str,
        path: str,
        reconcile: ReconcileFn | None = None,
    ) -> T:
        """Take over a call whose first attempt the caller made itself (at monotonic
        ``started``, wall ``sent_at_wall``) and which failed with ``failure``. This is
        how the client keeps the retry machinery off the happy path entirely."""
        state = self._state(started, sent_at_wall=sent_at_wall)
        state.attempts = 1
        return await self._recover(
            failure,
            send,
            state,
            idempotent=idempotent,
            method=method,
            path=path,
            reconcile=reconcile,
        )

    async def _recover(
        self,
        failure: VioletError,
        send: Callable[[float | None], Awaitable[T]],
        state: CallState,
        *,
        idempotent: bool,
        method: str,
        path: str,
        reconcile: ReconcileFn | None,
    ) -> T:
        while True:
            verdict = classify(failure, idempotent=idempotent)
            if verdict is Verdict.RAISE:
                raise failure
            read_back = False
            if verdict is Verdict.AMBIGUOUS:
                if reconcile is None:
                    raise failure
                outcome = await reconcile(failure, state)
                if outcome is not RESEND:
                    return outcome  # type: ignore[no-any-return]
                read_back = True
            try:
                return await self._retry_loop(
                    failure,
                    send,
                    state,
                    idempotent=idempotent,
                    method=method,
                    path=path,
                    read_back=read_back,
                )
            except _Again as again:
                raise again.cause from again.cause.__cause__
            except VioletError as exc:
                failure = exc

    def _delay(self, retry_number: int, cause: VioletError) -> float:
        retry_after = None
        if isinstance(cause, APIError):
            retry_after = parse_retry_after(cause.headers.get("Retry-After"))
        if retry_after is not None:
            return min(retry_after, self.policy.max_retry_after)
        return self.policy.backoff(retry_number)

    def _out_of_budget(self, state: CallState, delay: float) -> bool:
        if state.attempts >= self.policy.max_attempts:
            return True
        remaining = self._remaining(state)
        return remaining is not None and delay >= remaining

    async def _announce(
        self,
        state: CallState,
        delay: float,
        cause: VioletError,
        method: str,
        path: str,
        *,
        read_back: bool,
    ) -> None:
        log.info(
            "violet_async retry: %s %s attempt %d failed (%s); retrying in %.2fs%s",
            method,
            path,
            state.attempts,
            type(cause).__name__,
            delay,
            " after read-back" if read_back else "",
        )
        if self.on_retry is None:
            return
        # An observability hook must never change a refund's outcome: its failure is
        # logged, and the call carries on.
        try:
            result = self.on_retry(
                RetryEvent(state.attempts, delay, cause, method, path, read_back)
            )
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("violet_async: the on_retry hook raised; the call continues")

    async def _retry_loop(
        self,
        failure: VioletError,
        send: Callable[[float | None], Awaitable[T]],
        state: CallState,
        *,
        idempotent: bool,
        method: str,
        path: str,
        read_back: bool,
    ) -> T:
        """Attempts 2..N. Raises ``_Again`` when the budget runs out on a retryable
        failure, the failure itself when it is not retryable (or ambiguous)."""
        # After a read-back proved the refund absent, the settle time was the wait.
        first_delay = 0.0 if read_back else self._delay(state.attempts, failure)
        if self._out_of_budget(state, first_delay):
            raise _Again(failure)
        await self._announce(state, first_delay, failure, method, path, read_back=read_back)
        if first_delay:
            await self.clock.sleep(first_delay)

        def wait(retry_state: RetryCallState) -> float:
            return self._delay(state.attempts, _cause_of(retry_state))

        def stop(retry_state: RetryCallState) -> bool:
            return self._out_of_budget(state, retry_state.upcoming_sleep)

        async def before_sleep(retry_state: RetryCallState) -> None:
            await self._announce(
                state,
                retry_state.upcoming_sleep,
                _cause_of(retry_state),
                method,
                path,
                read_back=False,
            )

        retrying = AsyncRetrying(
            sleep=self.clock.sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, _Again)),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self._send(send, state)
                except VioletError as exc:
                    if classify(exc, idempotent=idempotent) is Verdict.RETRY:
                        raise _Again(exc) from exc
                    raise
        raise AssertionError("unreachable: tenacity either returns or raises")


def _cause_of(retry_state: RetryCallState) -> VioletError:
    """The SDK error behind the ``_Again`` tenacity saw (only retryable ones reach it)."""
    again = cast("_Again", retry_state.outcome.exception())  # type: ignore[union-attr]
    return again.cause
