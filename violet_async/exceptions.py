"""Every error violet_async raises.

No aiohttp, cattrs or tenacity exception ever reaches a caller: each is turned into one
of these. An aiohttp exception is never kept as ``__cause__`` or ``__context__`` (it
holds the request's headers, app secret and token included): its useful facts (class
name, host and port, the operating system's reason) are copied into the SDK error.

::

    VioletError
    ├── RequestValidationError (also ValueError)   bad input; nothing was sent
    ├── ClientClosedError                          the client was used after close
    ├── APIConnectionError                         no HTTP answer was read
    │   └── APITimeoutError                        ... because a timeout expired
    ├── ResponseFormatError                        a body we could not read
    │   └── ResponseTooLargeError                  ... because it exceeds max_response_bytes
    ├── AmbiguousOutcomeError                      a POST may or may not have applied
    ├── BagPendingError                            not sent: an ask on the bag is pending
    ├── RefundAlreadyPresentError                  not sent: the bag already holds it
    ├── IdempotencyKeyReusedError                  not sent: the key was used for another request
    ├── RecordStoreError                           the record store failed; nothing was sent
    ├── RefundFailedError                          2xx, but the refund status is FAILED
    ├── RefundWaitTimeoutError                     wait_for_refund ran out of time
    ├── CancellationFailedError                    2xx, but the cancel did not happen
    └── APIError                                   an HTTP error status
        ├── BadRequestError                        400
        │   └── UnprocessableEntityError           422
        ├── AuthenticationError                    401
        ├── PermissionDeniedError                  403
        ├── NotFoundError                          404
        ├── ConflictError                          409
        ├── RateLimitError                         429
        └── ServerError                            5xx

Secrets (app secret, password, tokens) are never part of any message or attribute:
errors carry the method and path of the request (relative to the base URL, such as
``/orders/1/bags/2/refunds``), never its headers, and whatever they keep from a response
(message, body, headers) passed through the client's redaction first, so a server that
echoes the request cannot put a secret into an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

# Nothing of the package is imported here at run time (only types, below): every other
# module imports this one, so it must never need them.
if TYPE_CHECKING:
    from ._protocol import PendingRefund
    from ._redact import Redactor
    from .models import OrderRefund

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AmbiguousOutcomeError",
    "AuthenticationError",
    "BadRequestError",
    "BagPendingError",
    "CancellationFailedError",
    "ClientClosedError",
    "ConflictError",
    "IdempotencyKeyReusedError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RecordStoreError",
    "RefundAlreadyPresentError",
    "RefundFailedError",
    "RefundWaitTimeoutError",
    "RequestValidationError",
    "ResponseFormatError",
    "ResponseTooLargeError",
    "ServerError",
    "UnprocessableEntityError",
    "VioletError",
]

_BODY_PREVIEW = 200
#: Characters of an unreadable 2xx body quoted in a ResponseFormatError's message.
_FORMAT_PREVIEW = 80

#: Response headers that may carry Violet's (or its gateway's) request id, in order of
#: preference. Violet does not document one; these are the common names. (Here, so that
#: this module imports nothing of the package; ``violet_async.telemetry`` exports it.)
REQUEST_ID_HEADERS = ("X-Request-Id", "X-Violet-Request-Id")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")


def request_id_of(headers: Mapping[str, str]) -> str | None:
    """Violet's request id from response headers, when it sent one: printable ASCII
    only (it is printed and logged; an ESC or CR in it could forge a terminal line),
    anything else is not taken for one."""
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            value = value[:200]
            return value if _PRINTABLE_ASCII.fullmatch(value) else None
    return None


class VioletError(Exception):
    """Base class of every error raised by violet_async."""

    #: Set when the failure already went through its own retries (a login inside a
    #: call): the call around it must not retry it again and multiply the attempts.
    _retries_spent: bool = False
    #: Set (wall, monotonic) when the request left a second time inside one attempt,
    #: after Violet refused an expired token and it was renewed: the failure is that
    #: send's, which left then, not when the attempt began.
    _resent_at: tuple[float, float] | None = None
    #: Set on the unreadable 2xx made of a POST's answer cut off mid-body: the failure
    #: it was (no answer), for a request that is safe to send again (a login).
    _unanswered: VioletError | None = None
    #: Set on a failed read of a bag's refunds: the records its pages that did answer
    #: listed (a read that failed on a later page). They were on the bag when it ran.
    _listed: tuple[OrderRefund, ...] = ()
    #: Set on the failure of the read made before an ask's first send (its baseline),
    #: which ended the ask: nothing of it was sent.
    _before_send: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RequestValidationError(VioletError, ValueError):
    """A request argument is invalid; nothing was sent.

    ``field`` names the offending argument (``skus[0].quantity_refunded`` style).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ClientClosedError(VioletError):
    """The client was used after it was closed."""


class APIConnectionError(VioletError):
    """No HTTP response could be read.

    ``request_sent`` is False when the connection was never established, so the
    server cannot have seen the request; True when it may have. ``host`` and ``port``
    name the server, ``reason`` says what went wrong in words (``connection refused``,
    the resolver's text for a DNS failure), ``errno`` is the operating system's error
    number when there was one, and ``error_type`` the name of the underlying aiohttp
    or OS exception (which is not chained: it holds the request's headers).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str = "",
        path: str = "",
        request_sent: bool = True,
        host: str | None = None,
        port: int | None = None,
        reason: str = "",
        errno: int | None = None,
        error_type: str = "",
    ) -> None:
        super().__init__(message)
        self.method = method
        self.path = path
        self.request_sent = request_sent
        self.host = host
        self.port = port
        self.reason = reason
        self.errno = errno
        self.error_type = error_type


class APITimeoutError(APIConnectionError):
    """A connect or read timeout, or the per-call deadline, expired."""


class ResponseFormatError(VioletError):
    """A response body could not be read into the expected shape.

    ``body`` is the raw body, ``field`` the path of the offending field when known.
    """

    def __init__(
        self,
        message: str,
        *,
        body: bytes,
        status: int,
        field: str | None = None,
        method: str = "",
        path: str = "",
        preview: bool = False,
    ) -> None:
        # ``preview``: the message ends with the body's first characters. The client
        # replaces the error with a redacted copy, whose preview is cut from the
        # redacted body (a cut first could leave part of a secret).
        self._detail = message
        self._preview = preview
        if preview:
            message = f"{message}: {body[:_FORMAT_PREVIEW].decode('utf-8', 'replace')!r}"
        super().__init__(message)
        self.body = body
        self.status = status
        self.field = field
        self.method = method
        self.path = path


class ResponseTooLargeError(ResponseFormatError):
    """The response body (after decompression) exceeds the client's
    ``max_response_bytes``; reading stopped there.

    ``status`` is the HTTP status of the answer, ``body`` only its first bytes (at most
    1 KiB, redacted), ``limit`` the cap. For a refund or cancel POST this means the
    answer was unreadable, so the request may have been applied.
    """

    def __init__(
        self,
        message: str,
        *,
        body: bytes,
        status: int,
        limit: int,
        method: str = "",
        path: str = "",
    ) -> None:
        super().__init__(message, body=body, status=status, method=method, path=path)
        self.limit = limit


class AmbiguousOutcomeError(VioletError):
    """A refund or cancel was sent, failed in flight, and whether it took effect is not
    proven yet. Nothing was re-sent.

    ``pending`` is the ask's record (a :class:`~violet_async.PendingRefund`, JSON
    round-trippable): store it and ``await client.resume(pending)`` later, which reads
    the bag back by the same rule and returns the refund, re-sends once absence is
    proven, or raises this again with a fresher record. ``pending.needs_review`` is
    True when waiting cannot settle it (several refunds match, or one almost does):
    look at the bag. ``request`` is what was asked, ``attempts`` how many times it was
    sent, ``candidates`` the refunds that could be this request's.

    Every other error from ``refund_bag`` / ``cancel_bag`` means the request did not
    apply.
    """

    def __init__(
        self,
        message: str,
        *,
        request: object,
        attempts: int,
        observed: Sequence[OrderRefund] = (),
        candidates: Sequence[OrderRefund] = (),
        pending: PendingRefund | None = None,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.attempts = attempts
        self.observed = tuple(observed)
        self.candidates = tuple(candidates)
        self.pending = pending


class BagPendingError(VioletError):
    """Not sent: this client left a refund or cancel of the bag pending
    (``AmbiguousOutcomeError``) and it has not been resumed. A new request on the bag
    could claim that one's refund, or have its own claimed by it; resume the pending
    one first (``client.resume(error.pending[0])``). ``pending`` are the records."""

    def __init__(self, message: str, *, pending: Sequence[PendingRefund]) -> None:
        super().__init__(message)
        self.pending = tuple(pending)


class IdempotencyKeyReusedError(VioletError):
    """Not sent: the ``idempotency_key`` was already used for another request (another
    kind, order, bag, amount, reason...). A key stands for one request, at most once;
    use a new key for a new request. ``key`` is the key."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class RecordStoreError(VioletError):
    """The record store (``VioletClient(store=...)``) could not load or save the record
    of a call made with an ``idempotency_key``. Raised before a send: nothing was sent.
    ``key`` is the key."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class RefundAlreadyPresentError(VioletError):
    """Not sent: the bag already holds a refund that carries exactly what this request
    asks for, and nothing accounts for it (the batch runner's guard, when an earlier
    run's journal is lost or replaced). ``refunds`` are the ones found."""

    def __init__(self, message: str, *, refunds: Sequence[OrderRefund]) -> None:
        super().__init__(message)
        self.refunds = tuple(refunds)


class RefundFailedError(VioletError):
    """Violet answered 2xx but the refund's status is FAILED. ``refund`` has the details."""

    def __init__(self, message: str, *, refund: OrderRefund) -> None:
        super().__init__(message)
        self.refund = refund


class RefundWaitTimeoutError(VioletError):
    """``wait_for_refund`` timed out. ``refund`` is the last state seen (None when the
    refund was never listed)."""

    def __init__(self, message: str, *, refund: OrderRefund | None) -> None:
        super().__init__(message)
        self.refund = refund


class CancellationFailedError(VioletError):
    """Violet answered 2xx but the bag was not cancelled (CANCELLATION_FAILURE).

    ``status`` is the cancel status read, ``body`` the raw response.
    """

    def __init__(self, message: str, *, status: str, body: bytes) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class APIError(VioletError):
    """Violet answered with an HTTP error status.

    Carries ``status``, ``error_code`` and ``message`` (parsed leniently from the body),
    the raw ``body``, the response ``headers``, Violet's ``request_id`` when the answer
    had one, and the request ``method`` and ``path``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_code: int | str | None,
        body: bytes,
        headers: Mapping[str, str],
        method: str,
        path: str,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.body = body
        self.headers = dict(headers)
        self.method = method
        self.path = path

    @property
    def request_id(self) -> str | None:
        """Violet's request id for this answer, when its headers carry one (quote it to
        Violet's support)."""
        lowered = {k.lower(): v for k, v in self.headers.items()}
        return request_id_of({name: lowered.get(name.lower(), "") for name in REQUEST_ID_HEADERS})

    def __str__(self) -> str:
        code = f" (error_code {self.error_code})" if self.error_code is not None else ""
        request = f"{self.method} {self.path} -> " if self.method or self.path else ""
        request_id = self.request_id
        tail = f" [request id {request_id}]" if request_id else ""
        return f"{request}{self.status}{code}: {self.message}{tail}"


class BadRequestError(APIError):
    """400: Violet rejected the request (state or values)."""


class UnprocessableEntityError(BadRequestError):
    """422: Violet understood the request but will not process it."""


class AuthenticationError(APIError):
    """401: missing, wrong or expired credentials."""


class PermissionDeniedError(APIError):
    """403: the app may not act on this order."""


class NotFoundError(APIError):
    """404: unknown order or bag."""


class ConflictError(APIError):
    """409: the bag's state does not allow this now."""


class RateLimitError(APIError):
    """429: too many requests (often passed through from the merchant's platform)."""


class ServerError(APIError):
    """5xx: Violet or the merchant's platform failed."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def _lenient_fields(body: bytes) -> tuple[int | str | None, str | None]:
    """Read ``error_code`` and ``message`` from whatever error shape Violet sent."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("error_code", data.get("code"))
    if not isinstance(code, (int, str)) or isinstance(code, bool):
        code = None
    message = data.get("message", data.get("error"))
    return code, message if isinstance(message, str) else None


def api_error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    redact: Redactor | None = None,
) -> APIError:
    """The one place an HTTP error status becomes a typed error.

    ``redact`` (the client's :class:`~violet_async._redact.Redactor`) is applied to the
    message, the body and the headers before the error holds them: a server may echo
    the request it refused. None leaves them as they are.
    """
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    error_code, message = _lenient_fields(body)
    if message is None:
        # Redacted before it is cut: a cut first could keep part of a secret.
        if redact is not None:
            preview = redact.preview(body, _BODY_PREVIEW).strip()
        else:
            preview = body[:_BODY_PREVIEW].decode("utf-8", "replace").strip()
        message = preview or f"HTTP {status} with an empty body"
    if redact is not None:
        message = redact.text(message)
        body = redact.bytes(body)
        headers = redact.headers(headers)
        if isinstance(error_code, str):
            error_code = redact.text(error_code)
    return cls(
        message,
        status=status,
        error_code=error_code,
        body=body,
        headers=headers,
        method=method,
        path=path,
    )


_E = TypeVar("_E", bound=BaseException)


def redacted_copy(error: _E, redact: Redactor) -> _E:
    """A copy of ``error`` (a :class:`ResponseFormatError` or
    :class:`CancellationFailedError` built from a 2xx body, which could echo the
    request) whose message and ``body`` hide the client's secrets. The copy has no
    cause or context: nothing chained to it keeps the raw body."""
    clone = type(error).__new__(type(error))
    clone.__dict__.update(error.__dict__)
    body = getattr(error, "body", None)
    if isinstance(body, bytes):
        clone.body = redact.bytes(body)  # type: ignore[attr-defined]
    if isinstance(error, ResponseFormatError):
        text = redact.text(error._detail)
        if error._preview:
            text = f"{text}: {redact.preview(error.body, _FORMAT_PREVIEW)!r}"
    else:
        text = redact.text(str(error))
    clone.args = (text,)
    if isinstance(clone, VioletError):
        clone.message = text
    return clone
