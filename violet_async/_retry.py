"""Retry policy, backoff and ``Retry-After``; repeating reads and logins. The only
tenacity importer.

Reads (GET) and logins are repeated on every transient failure: a connection error or
timeout, 408, 429, any 5xx. Other 4xx are raised, and so is a 2xx whose body cannot be
read: the server answered, and asking again gets the same body (a body cut short in
transit is a connection error, and is repeated). Refund and
cancel POSTs are never repeated here: whether one may be sent again is the refund
protocol's decision (``_protocol.py``, and README's "Never refund twice").

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

from ._protocol import Settings
from ._telemetry import ATTEMPT, count_retry
from .exceptions import (
    APIConnectionError,
    APIError,
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

log = logging.getLogger("violet_async.retry")

T = TypeVar("T")

#: 4xx statuses worth repeating a read for.
SAFE_STATUSES = frozenset({408, 429})


class Verdict(enum.Enum):
    RETRY = "retry"
    RAISE = "raise"


def classify(exc: BaseException) -> Verdict:
    """Whether a failed read (GET) or login may simply be repeated: every transient
    failure may. (Refund and cancel POSTs never come here: ``_protocol`` decides.)"""
    if isinstance(exc, VioletError) and exc._retries_spent:
        return Verdict.RAISE
    if isinstance(exc, APIConnectionError):
        return Verdict.RETRY
    if isinstance(exc, APIError):
        return Verdict.RETRY if exc.status in SAFE_STATUSES or exc.status >= 500 else Verdict.RAISE
    # Anything else, including a 2xx body that cannot be parsed: the server answered,
    # and the same request gets the same answer. It is not weather; the caller decides
    # (a read-back counts it as a failed read, never as absence).
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
    """Time source for backoff, deadlines and the refund protocol; tests pass a fake
    one (``violet_async.testing.FakeClock``)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, waits)."""
        ...

    def time(self) -> float:
        """Wall-clock Unix time (when a refund was sent)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@attrs.frozen
class RetryPolicy:
    """How a call is retried, and how long a refund's outcome is waited for. Every
    default is named and documented here.

    Attempts are sends of the request; a read-back after a failure is not an attempt,
    a re-send after it is.

    The settle windows decide when a refund that failed in flight may be called absent
    and sent again (see README, "Never refund twice"): only a read-back that starts
    after the window and still misses it proves absence. ``settle_running`` covers a
    request that may still be running at Violet (no answer from Violet: a timeout, a
    dropped connection, a gateway's 502/503/504/524): Violet's own request to the
    merchant's platform can take tens of seconds, and a gateway gives up on it long
    before Violet does. An error Violet itself answered (a 5xx with its JSON body) gets
    the same window: Violet's own call to the platform may have timed out inside it and
    still be running. ``settle_lag`` covers a 2xx that does not fit its request (it
    applied; only the refund list's replication lag is left to wait out).
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
    """Total seconds for one call: sends, waits, read-backs, settle waits and logins
    included; each attempt's timeout shrinks to what is left. When a refund's settle
    window outlasts it, the call raises AmbiguousOutcomeError with a ``pending``
    record to resume. None: no deadline. Default 60."""
    max_retry_after: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    """Longest ``Retry-After`` honoured, in seconds; longer values are capped."""
    settle_running: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    """Seconds after a send that got no answer from Violet, or Violet's own 5xx, during
    which the refund may still appear. Default 60."""
    settle_lag: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    """Seconds after a send Violet answered with a 2xx that did not fit, or a refusal
    after an earlier doubted send, during which the refund may still be missing from
    the bag's refund list (replication lag). Default 5."""
    settle_delay: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    """First wait between read-backs, doubling up to 8 s; the last read-back is at the
    window's end. Default 1."""
    clock_skew: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    """Without a baseline, a refund created up to this many seconds before the first
    send still counts as possibly this call's, when Violet's clock could not be
    estimated from ``Date`` headers (with an estimate, 5 s). Default 60."""
    read_before_send: bool = False
    """Read the bag's refunds before the first send, so that after a failure only
    refunds new since then are candidates (exact, no clock involved). Costs one GET
    per call. Default off for direct calls; the batch runner turns it on."""

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """One send per call. A refund that fails in flight is still read back (a
        re-send needs a second attempt, so it raises instead)."""
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

    def delay_after(self, retry_number: int, cause: VioletError) -> float:
        """The wait before retry ``retry_number`` after ``cause``: its ``Retry-After``
        (capped) when it has one, else the backoff."""
        retry_after = None
        if isinstance(cause, APIError):
            retry_after = parse_retry_after(cause.headers.get("Retry-After"))
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return self.backoff(retry_number)

    def protocol_settings(self) -> Settings:
        """What the refund protocol reads of this policy."""
        return Settings(
            max_attempts=self.max_attempts,
            settle_running=self.settle_running,
            settle_lag=self.settle_lag,
            settle_delay=self.settle_delay,
            clock_skew=self.clock_skew,
            read_before_send=self.read_before_send,
        )


@attrs.frozen
class RetryEvent:
    """What the ``on_retry`` hook receives before each wait."""

    attempt: int
    """Sends (or reads) made so far in this call."""
    delay: float
    """Seconds about to be waited."""
    cause: VioletError
    """The failure that triggered the retry."""
    method: str
    path: str
    read_back: bool
    """True when the bag was read back first and the refund proved absent."""


RetryHook = Callable[[RetryEvent], Any]


class _Again(Exception):
    """Internal: the last attempt failed in a retryable way."""

    def __init__(self, cause: VioletError) -> None:
        super().__init__()
        self.cause = cause


async def announce(hook: RetryHook | None, event: RetryEvent) -> None:
    """Log a retry and tell the ``on_retry`` hook. A hook must never change a refund's
    outcome: its failure is logged, and the call carries on."""
    count_retry(type(event.cause).__name__, event.method)
    log.info(
        "%s %s attempt %d failed (%s); retrying in %.2fs%s",
        event.method,
        event.path,
        event.attempt,
        type(event.cause).__name__,
        event.delay,
        " after read-back" if event.read_back else "",
    )
    if hook is None:
        return
    try:
        result = hook(event)
        if asyncio.iscoroutine(result):
            await result
    except Exception:
        log.exception("the on_retry hook raised; the call continues")


class Retrier:
    """Repeats a read (GET) or a login on transient failures under a policy. The
    caller makes the first attempt itself; tenacity only runs after a failure."""

    def __init__(self, policy: RetryPolicy, clock: Clock, on_retry: RetryHook | None) -> None:
        self.policy = policy
        self.clock = clock
        self.on_retry = on_retry

    async def run(
        self,
        send: Callable[[float | None], Awaitable[T]],
        *,
        method: str,
        path: str,
        deadline: float | None = None,
    ) -> T:
        """Run one call. ``deadline`` (monotonic) defaults to the policy's from now."""
        now = self.clock.monotonic()
        if deadline is None and self.policy.deadline is not None:
            deadline = now + self.policy.deadline
        try:
            return await send(deadline - now if deadline is not None else None)
        except VioletError as exc:
            failure = exc
        return await self.after_first_failure(
            failure, send, deadline=deadline, method=method, path=path
        )

    async def after_first_failure(
        self,
        failure: VioletError,
        send: Callable[[float | None], Awaitable[T]],
        *,
        deadline: float | None,
        method: str,
        path: str,
    ) -> T:
        """Take over a call whose first attempt failed with ``failure``."""
        if classify(failure) is Verdict.RAISE:
            raise failure
        attempts = 1

        def remaining() -> float | None:
            return None if deadline is None else deadline - self.clock.monotonic()

        def out_of_budget(delay: float) -> bool:
            left = remaining()
            return attempts >= self.policy.max_attempts or (left is not None and delay >= left)

        def wait(retry_state: RetryCallState) -> float:
            return self.policy.delay_after(attempts, _cause_of(retry_state))

        def stop(retry_state: RetryCallState) -> bool:
            return out_of_budget(retry_state.upcoming_sleep)

        async def before_sleep(retry_state: RetryCallState) -> None:
            cause = _cause_of(retry_state)
            event = RetryEvent(
                attempts, retry_state.upcoming_sleep, cause, method, path, read_back=False
            )
            await announce(self.on_retry, event)

        first_delay = self.policy.delay_after(attempts, failure)
        if out_of_budget(first_delay):
            raise failure
        first = RetryEvent(attempts, first_delay, failure, method, path, read_back=False)
        await announce(self.on_retry, first)
        if first_delay:
            await self.clock.sleep(first_delay)
        retrying = AsyncRetrying(
            sleep=self.clock.sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, _Again)),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    ATTEMPT.set(attempts)
                    try:
                        return await send(remaining())
                    except VioletError as exc:
                        if classify(exc) is Verdict.RETRY:
                            raise _Again(exc) from exc
                        raise
        except _Again as again:
            raise again.cause from again.cause.__cause__
        finally:
            ATTEMPT.set(1)
        raise AssertionError("unreachable: tenacity either returns or raises")


def _cause_of(retry_state: RetryCallState) -> VioletError:
    """The SDK error behind the ``_Again`` tenacity saw (only retryable ones reach it)."""
    again = cast("_Again", retry_state.outcome.exception())  # type: ignore[union-attr]
    return again.cause
