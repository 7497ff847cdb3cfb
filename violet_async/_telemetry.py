"""Logs, traces and metrics: what happened to every refund, at no cost when nobody
listens.

Loggers (all under ``violet_async``; nothing is configured unless ``VIOLET_LOG`` is set)::

    violet_async.http        DEBUG: one line per attempt: method, path, status or error,
                             duration, attempt number, Violet's request id
    violet_async.retry       INFO: every retry and re-send, with its cause and wait
    violet_async.reconcile   INFO: read-backs after a failure and their verdict, pending
    violet_async.auth        INFO: logins and token refreshes
    violet_async.webhooks    WARNING: refused webhooks, failed callbacks

No line carries a header, a request body, a token, the app secret or the password.

Tracing and metrics go through OpenTelemetry's API (``pip install 'violet-async[otel]'``)
and are off until :func:`instrument` is called: one span per SDK call
(``violet.refund_bag``, ``violet.cancel_bag``, ``violet.resume``, ...) with child spans per
HTTP attempt (semantic-convention attributes) and per read-back; counters of calls by
outcome, retries by cause, read-backs by verdict, ambiguous outcomes, batch and fleet
items by how they ended; a histogram of call duration.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from .exceptions import REQUEST_ID_HEADERS, request_id_of

__all__ = [
    "ATTEMPT",
    "CAPTURE",
    "REQUEST_ID_HEADERS",
    "STATE",
    "RequestCount",
    "capture_responses",
    "counting_requests",
    "feed",
    "instrument",
    "request_id_of",
    "setup_logging_from_env",
    "traced_call",
    "uninstrument",
]

T = TypeVar("T")

http_log = logging.getLogger("violet_async.http")
reconcile_log = logging.getLogger("violet_async.reconcile")

#: The attempt number of the request being made (set only on retries and re-sends).
ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("violet_attempt", default=1)
#: Where :func:`capture_responses` collects raw responses (None: nowhere).
CAPTURE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "violet_capture", default=None
)


def setup_logging_from_env(environ: Mapping[str, str] | None = None) -> None:
    """``VIOLET_LOG=debug|info`` sends the SDK's logs to stderr without any code (like
    ``OPENAI_LOG``). Anything else leaves logging to the application."""
    value = (os.environ if environ is None else environ).get("VIOLET_LOG", "").strip().lower()
    level = {"debug": logging.DEBUG, "info": logging.INFO}.get(value)
    if level is None:
        return
    logger = logging.getLogger("violet_async")
    if not any(getattr(h, "_violet_env", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._violet_env = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)


@contextlib.contextmanager
def capture_responses() -> Iterator[list[Any]]:
    """Collect the raw responses (``.status``, ``.headers``, ``.body``) of every request
    the SDK makes in this task (and tasks it starts) inside the block, for debugging::

        with capture_responses() as seen:
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=500)
        print(seen[-1].status, seen[-1].headers.get("X-Request-Id"), seen[-1].body)
    """
    seen: list[Any] = []
    token = CAPTURE.set(seen)
    try:
        yield seen
    finally:
        CAPTURE.reset(token)


class RequestCount:
    """The requests answered in a block and the 429s among them: a :data:`CAPTURE` sink
    that keeps no response (it still feeds a caller's ``capture_responses`` list)."""

    __slots__ = ("outer", "rate_limited", "requests")

    def __init__(self, outer: list[Any] | None = None) -> None:
        self.requests = 0
        self.rate_limited = 0
        self.outer = outer

    def append(self, response: Any) -> None:
        self.counted(response.status, lambda: response)

    def counted(self, status: int, response: Callable[[], Any]) -> None:
        """Count an answered request; its response is made (redacted) only for a
        caller's list this count feeds."""
        self.requests += 1
        self.rate_limited += status == 429
        if self.outer is not None:
            feed(self.outer, status, response)


def feed(sink: Any, status: int, response: Callable[[], Any]) -> None:
    """Give a :data:`CAPTURE` sink one answered request. A sink that counts
    (``counted``: :class:`RequestCount`, a batch item's) is given its status, and the
    response only if it feeds a caller's list; a list is given ``response()``. Nothing
    is redacted for a sink that keeps no response."""
    counted = getattr(sink, "counted", None)
    if counted is not None:
        counted(status, response)
    else:
        sink.append(response())


@contextlib.contextmanager
def counting_requests() -> Iterator[RequestCount]:
    """Count the requests the SDK makes in this task (and tasks it starts) inside the
    block."""
    count = RequestCount(CAPTURE.get())
    token = CAPTURE.set(count)  # type: ignore[arg-type] # a list-like sink: append only
    try:
        yield count
    finally:
        CAPTURE.reset(token)


class _State:
    """The instruments, once :func:`instrument` is called (None: off)."""

    __slots__ = ("ambiguous", "calls", "duration", "items", "readbacks", "retries", "tracer")

    def __init__(self) -> None:
        self.tracer: Any = None
        self.calls: Any = None
        self.retries: Any = None
        self.readbacks: Any = None
        self.ambiguous: Any = None
        self.duration: Any = None
        self.items: Any = None

    @property
    def on(self) -> bool:
        return self.tracer is not None


STATE = _State()


def instrument(*, tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Turn on spans and metrics through OpenTelemetry (the global providers unless
    given). Requires ``opentelemetry-api`` (the ``otel`` extra)."""
    try:
        from opentelemetry import metrics, trace  # noqa: PLC0415 - optional extra
    except ImportError:  # pragma: no cover - the extra is installed in the test run
        raise ImportError(
            "tracing and metrics need opentelemetry-api: pip install 'violet-async[otel]'"
        ) from None
    from ._version import __version__  # noqa: PLC0415 - no import cycle at module load

    tracer_provider = tracer_provider or trace.get_tracer_provider()
    meter = (meter_provider or metrics.get_meter_provider()).get_meter("violet_async", __version__)
    STATE.tracer = tracer_provider.get_tracer("violet_async", __version__)
    STATE.calls = meter.create_counter(
        "violet.calls", unit="{call}", description="SDK calls by operation and outcome"
    )
    STATE.retries = meter.create_counter(
        "violet.retries", unit="{retry}", description="Retries and re-sends by cause"
    )
    STATE.readbacks = meter.create_counter(
        "violet.readbacks", unit="{read}", description="Read-backs after a failure by verdict"
    )
    STATE.ambiguous = meter.create_counter(
        "violet.ambiguous", unit="{call}", description="Calls that ended pending"
    )
    STATE.duration = meter.create_histogram(
        "violet.call.duration", unit="s", description="Duration of SDK calls"
    )
    STATE.items = meter.create_counter(
        "violet.items", unit="{item}", description="Batch and fleet items by how they ended"
    )


def uninstrument() -> None:
    """Turn spans and metrics off again."""
    STATE.__init__()  # type: ignore[misc]


async def traced_call(name: str, call: Awaitable[T], attributes: dict[str, Any]) -> T:
    """Await ``call`` inside a span named ``name``, recording its outcome (the caller
    checks :attr:`STATE.on` first, so this costs nothing when off)."""
    started = time.perf_counter()
    outcome = "error"
    with STATE.tracer.start_as_current_span(name, attributes=attributes) as span:
        try:
            result = await call
        except BaseException as exc:
            outcome = "pending" if type(exc).__name__ == "AmbiguousOutcomeError" else "error"
            span.set_attribute("error.type", type(exc).__name__)
            span.set_attribute("violet.outcome", outcome)
            if outcome == "pending":
                STATE.ambiguous.add(1, {"violet.operation": name})
            raise
        else:
            reconciled = bool(getattr(result, "reconciled", False))
            outcome = "reconciled" if reconciled else "ok"
            span.set_attribute("violet.outcome", outcome)
            span.set_attribute("violet.reconciled", reconciled)
            refund_id = getattr(result, "id", None)
            if isinstance(refund_id, int):
                span.set_attribute("violet.refund_id", refund_id)
            return result
        finally:
            labels = {"violet.operation": name, "violet.outcome": outcome}
            STATE.calls.add(1, labels)
            STATE.duration.record(time.perf_counter() - started, labels)


def attempt_span(method: str, url: str, path: str, attempt: int) -> Any:
    """A client span for one HTTP attempt (only called when :attr:`STATE.on`)."""
    return STATE.tracer.start_as_current_span(
        f"{method} {path}",
        kind=_client_kind(),
        attributes={
            "http.request.method": method,
            "url.full": _without_userinfo(url),
            "url.path": path,
            "http.request.resend_count": attempt - 1,
        },
    )


def _without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (OpenTelemetry's HTTP conventions: url.full
    must not carry credentials)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"


def read_span(ask: Any) -> Any:
    """A span around one read-back of a bag (a no-op context when off)."""
    if not STATE.on:
        return contextlib.nullcontext()
    return STATE.tracer.start_as_current_span(
        "violet.read_back",
        attributes={"violet.bag_id": ask.bag_id, "violet.order_id": ask.order_id},
    )


def _client_kind() -> Any:
    from opentelemetry.trace import SpanKind  # noqa: PLC0415 - only when instrumented

    return SpanKind.CLIENT


def count_retry(cause: str, method: str) -> None:
    if STATE.on:
        STATE.retries.add(1, {"violet.cause": cause, "http.request.method": method})


def count_item(source: str, kind: str, outcome: str) -> None:
    """One batch item (``source="batch"``) or fleet item (``"fleet"``) ended."""
    if STATE.on:
        STATE.items.add(
            1, {"violet.source": source, "violet.kind": kind, "violet.outcome": outcome}
        )


def count_readback(verdict: str) -> None:
    if STATE.on:
        STATE.readbacks.add(1, {"violet.verdict": verdict})
