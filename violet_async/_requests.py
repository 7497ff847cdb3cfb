"""How the client makes one request: a token (logging in or renewing when needed), one
attempt through the transport, one renewal on Violet's "Token has expired", errors
typed and redacted; reads retried on transient failures within a deadline, every page
followed; and the I/O the refund protocol's driver needs. ``VioletClient`` inherits it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Coroutine, Mapping, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from functools import partial
from logging import DEBUG
from typing import TypeVar, cast

import attrs
from yarl import URL

from ._auth import Auth, Credentials, is_token_expired_error
from ._matching import _sku_totals, date_span
from ._reconcile import BagIO, BagLocks, ClockOrigin, KnownRefunds, PendingAsks
from ._responses import (
    MAX_PAGES,
    PagingError,
    RefundPage,
    http_date,
    log,
    next_page,
    parse_order,
    parse_refund_page,
)
from ._retry import Clock, Retrier, RetryHook, RetryPolicy
from ._telemetry import ATTEMPT, CAPTURE, STATE, attempt_span, feed, http_log, request_id_of
from ._transport import (
    REQUEST_LEFT,
    BaseURL,
    RawResponse,
    RequestLeft,
    Timeouts,
    Transport,
    frozen_headers,
    redacted_response,
)
from .exceptions import (
    APIError,
    APITimeoutError,
    AuthenticationError,
    CancellationFailedError,
    ResponseFormatError,
    VioletError,
    api_error_from_response,
    redacted_copy,
)
from .models import Order, OrderRefund, SkuRefund
from .models._validators import check_id

__all__ = ["AnswerCheck", "RequestPlumbing", "Shared"]

T = TypeVar("T")


@attrs.define
class LateAnswer:
    """Where a refund or cancel POST whose caller cancelled it while its answer was on
    its way is handed to the engine (:meth:`Engine.drive` sets one for its call): the
    exchange keeps running, bounded by its own attempt's timeouts, and the engine
    records what its answer proves. None: no POST of the call was cut short."""

    task: asyncio.Future[RawResponse | None] | None = None


#: The running call's :class:`LateAnswer` (None outside :meth:`Engine.drive`: a POST
#: cut short by its caller is cancelled with it, as before).
LATE_ANSWER: ContextVar[LateAnswer | None] = ContextVar("violet_late_answer", default=None)


@attrs.define(repr=False)  # its headers hold the app secret and the token
class Shared:
    """State shared by a client and the clients ``with_options`` derives from it."""

    base_url: str
    endpoint: BaseURL
    transport: Transport
    auth: Auth
    credentials: Credentials
    headers: dict[str, str]
    known_refunds: KnownRefunds
    clock: Clock
    origin: ClockOrigin = attrs.Factory(lambda self: ClockOrigin(self.clock), takes_self=True)
    """The clock as it read when the client was made: a step of the wall clock since is
    seen by every ask made after it."""
    bag_locks: BagLocks = attrs.Factory(BagLocks)
    unsettled: PendingAsks = attrs.Factory(PendingAsks)
    """Asks this client left pending (AmbiguousOutcomeError), by bag: until they are
    resumed, no new ask is sent on their bag."""
    keep_cancelled_sends: bool = False
    """A POST whose caller cancelled the call after it left runs on apart, and its late
    answer is kept (``VioletClient(keep_cancelled_sends=True)``; see ``Engine.drive``)."""
    late_answers: set[asyncio.Task[None]] = attrs.Factory(set)
    """The answers of POSTs whose callers cancelled them, still awaited
    (``Engine._keep_late``): ``aclose`` drops them (their records stay pending)."""
    landing: dict[str, asyncio.Task[None]] = attrs.Factory(dict)
    """The same, by the ask (``ask_id``) whose send each is (its latest): a resume or
    keyed repeat of that ask waits for it before it reads the bag (``Engine.drive``)."""
    _token_headers: tuple[str, Mapping[str, str]] | None = None

    def headers_for(self, token: str) -> Mapping[str, str]:
        """The request headers with ``token``, built once per token."""
        cached = self._token_headers
        if cached is None or cached[0] != token:
            headers = frozen_headers({**self.headers, "X-Violet-Token": token})
            cached = self._token_headers = (token, headers)
        return cached[1]


class RequestPlumbing:
    """The request layer of a client; ``with_options`` clones share ``_shared`` and
    carry their own policy, timeouts and hook."""

    _shared: Shared
    _retry: RetryPolicy
    _timeouts: Timeouts
    _on_retry: RetryHook | None
    _retrier_cache: Retrier | None
    # A call's own extra_headers= (a per-call clone's); None on the client itself.
    _extra_headers: Mapping[str, str] | None = None

    def _bag_io(
        self,
        order_id: int,
        bag_id: int,
        path: str,
        body: bytes,
        parse: Callable[[RawResponse, str], OrderRefund],
    ) -> BagIO:
        """What the refund protocol's driver needs for one ask (built after a failure,
        or for an ask that reads before sending)."""
        return BagIO(
            send_once=partial(self._attempt, "POST", path, body, parse),  # parse checks it
            read_refunds=partial(self._read_refunds, self._bag_path(order_id, bag_id, "refunds")),
            read_order=partial(self._read_order, order_id),
            bag_id=bag_id,
            path=path,
            policy=self._retry,
            on_retry=self._on_retry,
        )

    async def _read_order(self, order_id: int, deadline: float | None) -> Order:
        return await self._get(f"/orders/{order_id}", parse_order, deadline=deadline)

    def _bag_path(self, order_id: int, bag_id: int, action: str) -> str:
        check_id("order_id", order_id)
        check_id("bag_id", bag_id)
        return f"/orders/{order_id}/bags/{bag_id}/{action}"

    def _deadline(self) -> float | None:
        """This call's deadline on the monotonic clock."""
        if self._retry.deadline is None:
            return None
        return self._shared.clock.monotonic() + self._retry.deadline

    def _retrier(self) -> Retrier:
        # One per client (its settings are fixed), built on first use.
        retrier = self._retrier_cache
        if retrier is None:
            retrier = self._retrier_cache = Retrier(self._retry, self._shared.clock, self._on_retry)
        return retrier

    async def _get(
        self,
        path: str,
        parse: Callable[[RawResponse, str], T],
        *,
        deadline: float | None = None,
        query: Mapping[str, str] | None = None,
    ) -> T:
        """A read, retried on every transient failure until ``deadline`` (monotonic;
        default: the policy's from now). First attempt inline."""
        clock = self._shared.clock
        if deadline is None:
            deadline = self._deadline()
        send = partial(self._attempt, "GET", path, None, parse, query=query)
        remaining = None if deadline is None else deadline - clock.monotonic()
        try:
            return await send(remaining)
        except VioletError as exc:
            return await self._retrier().after_first_failure(
                exc, send, deadline=deadline, method="GET", path=path
            )

    async def _read_refunds(self, path: str, deadline: float | None) -> RefundPage:
        """Every page of a bag's refunds, as one page, each refund once. A page that
        cannot be followed, or a server that answers another page than the one asked
        for, fails the whole read: part of a list is never taken for all of it."""
        first = page = await self._get(path, parse_refund_page, deadline=deadline)
        refunds: dict[int | None, OrderRefund] = {}
        unnamed: list[OrderRefund] = []
        pages_read = 1
        unreadable = 0
        # The pages the first one announces are asked for at once, a few at a time (a
        # read-back of a long list costs about one round trip, not one per page, so it
        # fits the call's deadline); each is still taken in order, checked as below, and
        # only when the walk reaches it.
        ahead = _PagesAhead(self, path, first, deadline)
        answered = [first]
        # Refunds are never deleted: a page counting more refunds than the first one
        # answered from the list after it grew, and what only such pages list may have
        # been made while the read ran (simulator seed 72: an ask's own refund, made
        # between the first page and the last, taken as listed by the first read after
        # its send, and its date hours off, was skipped as made long before it).
        begun = _count(first, len(first.refunds))
        grown: set[int] = set()
        kept_ids: set[int] = set()
        try:
            while True:
                unreadable += page.unreadable
                later = begun is not None and (page.total_elements or 0) > begun
                for refund in page.refunds:
                    if refund.id is None:
                        unnamed.append(refund)
                        continue
                    (grown if later else kept_ids).add(refund.id)
                    kept = refunds.setdefault(refund.id, refund)
                    if kept is not refund and _another_refund(kept, refund):
                        # Two records under one id carrying different refunds (a
                        # backend listing another id in ``id``): no repeat of one refund
                        # across pages. Keeping the first dropped an ask's own refund
                        # listed under an older one's id, and it was sent again (review
                        # 22). Which is which cannot be told: counted as a record that
                        # cannot be read.
                        log.warning(
                            "GET %s: two refund records carry id %s with different contents",
                            path,
                            refund.id,
                        )
                        unreadable += 1
                try:
                    # Skipped records count as read: the server's total counts them too.
                    collected = len(refunds) + len(unnamed) + unreadable
                    wanted = next_page(first, page, pages_read, collected)
                except PagingError as exc:
                    raise self._paging_error(path, str(exc)) from None
                if wanted is None:
                    break
                floor = _count(page, collected)
                page = await ahead.page(wanted, floor)
                answered.append(page)
                pages_read += 1
                if not page.paged:
                    # A server that ignores paging answers every page with the whole (or the
                    # first) list: it cannot be told from the end of the list.
                    raise self._paging_error(path, f"asked for page {wanted}, got a bare list")
                if page.number is not None and page.number != wanted:
                    raise self._paging_error(path, f"asked for page {wanted}, got {page.number}")
                counted = page.total_elements
                if floor is not None and counted and counted < floor:
                    # Refunds are never deleted: a page counting fewer than the page
                    # before it came from an older list (a cache, a replica behind), and
                    # a record the newer page moved onto it is on neither (review 24: an
                    # ask's own refund missed so was sent again). 0 is a count never
                    # filled in.
                    raise self._paging_error(
                        path,
                        f"page {wanted} counts {counted} refunds, the page before it {floor}",
                    )
            total = first.total_elements
            if pages_read > 1 and total is not None and collected < total:
                # Refunds are never deleted: fewer than the first page counted is a gap.
                raise self._paging_error(
                    path, f"the pages hold {collected} refunds, the first page counted {total}"
                )
        except VioletError as exc:
            # The read fails, but what the pages that answered list was on the bag when
            # it ran (a read before a re-send puts it in the baseline: simulator seed
            # 1235637, the other system's refund on a page that answered was taken for
            # the re-send's own).
            exc._listed = _listed(answered, ahead.answered())
            raise
        finally:
            await ahead.close()
        return RefundPage(
            [*refunds.values(), *unnamed],
            page.server_time,
            unreadable=unreadable,
            listed_late=frozenset(grown - kept_ids),
        )

    @staticmethod
    def _paging_error(path: str, problem: str) -> ResponseFormatError:
        return ResponseFormatError(
            f"GET {path}: {problem}",
            body=b"",
            status=200,
            field="$.number",
            method="GET",
            path=path,
        )

    async def _attempt(
        self,
        method: str,
        path: str,
        body: bytes | None,
        parse: Callable[[RawResponse, str], T],
        remaining: float | None,
        *,
        query: Mapping[str, str] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """One attempt: token, send, one renewal on an expired token, status check,
        parse. ``remaining`` is what is left of the call's deadline; ``before_send`` runs
        right before the request leaves, each time it does (after any login)."""
        shared = self._shared
        started = shared.clock.monotonic() if remaining is not None else 0.0
        if remaining is not None and remaining <= 0:
            raise _too_late(method, path)
        token = shared.auth.current()
        if token is None:
            token, remaining = await self._token_within(shared.auth.token(), remaining)
        url = shared.endpoint.join(path)
        if query:
            url = url.with_query(query)
        # Observability costs three cheap checks when nobody listens.
        send = shared.transport.send
        if STATE.tracer is not None or CAPTURE.get() is not None or http_log.isEnabledFor(DEBUG):
            send = partial(self._observed_send, path)
        if before_send is not None:
            remaining = await self._before_send(before_send, remaining, method, path)
        exchange = send(
            method,
            url,
            headers=self._headers(token),
            body=body,
            timeouts=self._timeouts,
            deadline=remaining,
        )
        # A refund or cancel POST of a call that keeps late answers (Engine.drive, only
        # with keep_cancelled_sends: off, nothing is looked up).
        late = LATE_ANSWER.get() if method == "POST" and shared.keep_cancelled_sends else None
        resp = await (exchange if late is None else _kept(late, exchange))
        if resp.status == 401:
            error = self._api_error(resp, method, path)
            if not is_token_expired_error(error):
                raise error
            # Violet rejected the token before doing anything: renewing and sending
            # again cannot apply the request twice.
            if remaining is not None:
                remaining -= shared.clock.monotonic() - started  # the refused send's time
            token, remaining = await self._token_within(shared.auth.expired(token), remaining)
            if before_send is not None:
                remaining = await self._before_send(before_send, remaining, method, path)
            resent = (shared.clock.time(), shared.clock.monotonic())
            exchange = send(
                method,
                url,
                headers=self._headers(token),
                body=body,
                timeouts=self._timeouts,
                deadline=remaining,
            )
            try:
                return self._answer(
                    await (exchange if late is None else _kept(late, exchange)),
                    method,
                    path,
                    parse,
                )
            except VioletError as exc:
                # The renewal may have taken long: this send left when it did, and a
                # refund dated between the first and this one is not this request's.
                exc._resent_at = resent
                raise
        return self._answer(resp, method, path, parse)

    def _answer(
        self,
        resp: RawResponse,
        method: str,
        path: str,
        parse: Callable[[RawResponse, str], T],
    ) -> T:
        """The parsed 2xx answer, or the typed error for any other."""
        if not 200 <= resp.status < 300:
            raise self._api_error(resp, method, path)
        try:
            return parse(resp, path)
        except (ResponseFormatError, CancellationFailedError) as exc:
            # A 2xx body may echo the request: the error keeps a redacted copy only,
            # raised outside this block so that nothing chains to the raw one.
            redacted = redacted_copy(exc, self._shared.auth.redactor)
        raise redacted

    def _headers(self, token: str) -> Mapping[str, str]:
        headers = self._shared.headers_for(token)
        if self._extra_headers is None:
            return headers
        return frozen_headers({**self._extra_headers, **headers})

    async def _before_send(
        self,
        hook: Callable[[], Awaitable[None]],
        remaining: float | None,
        method: str,
        path: str,
    ) -> float | None:
        """Run ``hook`` and charge its time to the call's deadline."""
        clock = self._shared.clock
        began = clock.monotonic()
        await hook()
        if remaining is None:
            return None
        remaining -= clock.monotonic() - began
        if remaining <= 0:
            raise _too_late(method, path)
        return remaining

    def _api_error(self, resp: RawResponse, method: str, path: str) -> APIError:
        """The typed error for an error status, with the client's secrets redacted."""
        return api_error_from_response(
            resp.status,
            resp.body,
            resp.headers,
            method=method,
            path=path,
            redact=self._shared.auth.redactor,
        )

    async def _observed_send(
        self,
        path: str,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeouts: Timeouts,
        deadline: float | None,
    ) -> RawResponse:
        """One exchange with its DEBUG line, span and capture (when any is on)."""
        attempt = ATTEMPT.get()
        scope = attempt_span(method, str(url), path, attempt) if STATE.on else nullcontext()
        started = time.perf_counter()
        with scope as span:
            try:
                resp = await self._shared.transport.send(
                    method, url, headers=headers, body=body, timeouts=timeouts, deadline=deadline
                )
            except VioletError as exc:
                elapsed = (time.perf_counter() - started) * 1000
                http_log.debug(
                    "%s %s -> %s after %.1f ms (attempt %d)",
                    method,
                    path,
                    type(exc).__name__,
                    elapsed,
                    attempt,
                )
                if span is not None:
                    span.set_attribute("error.type", type(exc).__name__)
                raise
            elapsed = (time.perf_counter() - started) * 1000
            request_id = request_id_of(resp.headers)
            if span is not None:
                span.set_attribute("http.response.status_code", resp.status)
                if request_id:
                    span.set_attribute("violet.request_id", request_id)
        http_log.debug(
            "%s %s -> %d in %.1f ms (attempt %d%s)",
            method,
            path,
            resp.status,
            elapsed,
            attempt,
            f", request id {request_id}" if request_id else "",
        )
        sink = CAPTURE.get()
        if sink is not None:
            # A gateway page may echo the request (app secret, token): kept redacted. A
            # sink that only counts (a fleet or batch item's) keeps none: none is made.
            redactor = self._shared.auth.redactor
            feed(sink, resp.status, lambda: redacted_response(resp, redactor))
        return resp

    async def _token_within(
        self, renewal: Awaitable[str], remaining: float | None
    ) -> tuple[str, float | None]:
        """A token, and what is left of the call's deadline after waiting for it (a
        login is charged to the call, and a send never starts with nothing left)."""
        if remaining is None:
            return await self._token(renewal, None), None
        clock = self._shared.clock
        started = clock.monotonic()
        token = await self._token(renewal, remaining)
        left = remaining - (clock.monotonic() - started)
        if left <= 0:
            raise APITimeoutError(
                "the call's deadline passed while getting a token; nothing was sent",
                request_sent=False,
            )
        return token, left

    @staticmethod
    async def _token(renewal: Awaitable[str], remaining: float | None) -> str:
        """Await a token within what is left of the call's deadline; a failure to get
        one was already retried by the auth step."""
        try:
            if remaining is None:
                return await renewal
            return await asyncio.wait_for(renewal, max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise APITimeoutError(
                "the call's deadline passed while logging in; nothing was sent",
                request_sent=False,
            ) from None
        except VioletError as exc:
            exc._retries_spent = True
            raise

    async def _auth_send(
        self, method: str, path: str, body: bytes | None, token: str | None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        shared = self._shared
        headers = dict(shared.headers)
        if token is not None:
            headers["X-Violet-Token"] = token

        async def send(remaining: float | None) -> tuple[int, bytes, Mapping[str, str]]:
            unanswered: VioletError | None = None
            try:
                resp = await shared.transport.send(
                    method,
                    shared.endpoint.join(path),
                    headers=headers,
                    body=body,
                    timeouts=self._timeouts,
                    deadline=remaining,
                )
            except ResponseFormatError as exc:
                if exc._unanswered is None:
                    raise
                unanswered = exc._unanswered
            if unanswered is not None:
                # A login's 2xx cut off mid-body says nothing of the refund or cancel
                # waiting for it (no answer, retried: logging in again is harmless),
                # never "it applied" (review 21: a call that never sent was told so).
                raise unanswered
            if not 200 <= resp.status < 300:
                error = api_error_from_response(
                    resp.status,
                    resp.body,
                    resp.headers,
                    method=method,
                    path=path,
                    redact=shared.auth.redactor,
                )
                if error.status in (400, 401, 403):
                    raise AuthenticationError(
                        error.message,
                        status=error.status,
                        error_code=error.error_code,
                        body=b"",  # a login answer is not kept: it may echo the user
                        headers=error.headers,
                        method=method,
                        path=path,
                    )
                raise error
            return resp.status, resp.body, resp.headers

        # Logging in or refreshing twice is harmless, so every transient failure retries.
        result: tuple[int, bytes, Mapping[str, str]] = await self._retrier().run(
            send, method=method, path=path
        )
        return result


class AnswerCheck:
    """``parse`` for the 2xx answer of one refund or cancel (``parse_refund`` or
    ``parse_cancel``, given the call's order and bag: it refuses an answer naming
    others), checked against the request: another amount than the one asked for, SKU
    lines other than the ones asked for, a refund already handed to another call, or a
    refund dated well before the answer itself (by the answer's own ``Date``), is an
    unreadable 2xx (``ResponseFormatError``): it applied, and the refund protocol reads
    the bag back rather than return a refund that is not this request's. A few
    compares per successful call."""

    __slots__ = (
        "ahead",
        "amount",
        "bag_id",
        "known",
        "not_before",
        "oldest",
        "order_id",
        "parse",
        "skus",
    )

    def __init__(  # noqa: PLR0917 - one call site, the call's own facts
        self,
        parse: Callable[..., OrderRefund],
        order_id: int,
        bag_id: int,
        amount: int | None,
        known: Container[int] = (),
        skus: Sequence[SkuRefund] | None = None,
        oldest: float | None = None,
        ahead: float = 60.0,
        not_before: float | None = None,
    ) -> None:
        self.parse = parse
        self.order_id = order_id
        self.bag_id = bag_id
        self.amount = amount
        self.known = known
        """Refunds already handed to other calls: an answer naming one is not this
        request's (a replayed or cached answer)."""
        self.skus = None if skus is None else _sku_totals(skus)
        """Units per order SKU the request asked for (None: it named none)."""
        self.oldest = oldest
        """Seconds: a refund dated more than this before the answer's own ``Date`` was
        not made by this request (which cannot have run that long). None: not checked."""
        self.ahead = ahead
        """Seconds: a refund dated more than this after the answer's own ``Date`` carries
        a date that cannot be right (a wrongly labelled offset): it places nothing."""
        self.not_before = not_before
        """Unix time, by this machine's clock: a refund dated before it was made before
        the call began (less Violet's clock skew), so not by this request, whatever the
        answer's ``Date`` says or when it has none. None: not checked."""

    def _misdated(self, refund: OrderRefund, resp: RawResponse) -> str:
        """Why the refund's date rules out this request's making it ("" when it does
        not, or it has none with an offset)."""
        span = date_span(refund)
        if span is None:
            return ""
        if self.not_before is not None and span[1] < self.not_before:
            # Review 35: a repeat after its bag's read-first mark lapsed, answered with
            # another system's refund made in the cut call's wait (a replayed answer;
            # no Date, or one behind Violet's clock), returned it as its own.
            return f"{self.not_before - span[1]:.0f}s before this call began"
        if self.oldest is None or (gap := _gap(span, resp)) is None:
            return ""
        before, after = gap
        if before > self.oldest:
            return f"{before:.0f}s before the answer"
        if after > self.ahead:
            return f"{after:.0f}s after the answer"
        return ""

    def __call__(self, resp: RawResponse, path: str) -> OrderRefund:
        # ``parse`` itself refuses an answer naming another order or bag (it is given
        # both): only what it cannot know is checked here.
        refund = self.parse(resp, path, order_id=self.order_id, bag_id=self.bag_id)
        if self.amount is not None and refund.amount != self.amount:
            wrong = f"an amount of {refund.amount}"
        elif refund.id in self.known:
            wrong = f"refund {refund.id}, already handed to another call"
        elif self.skus is not None and refund.skus and not _skus_fit(self.skus, refund):
            wrong = f"refund {refund.id} of other SKU lines"
        elif (self.oldest is not None or self.not_before is not None) and (
            dated := self._misdated(refund, resp)
        ):
            wrong = f"refund {refund.id}, dated {dated}"
        else:
            return refund
        asked = f"order {self.order_id}, bag {self.bag_id}"
        if self.amount is not None:
            asked += f", amount {self.amount}"
        raise ResponseFormatError(
            f"POST {path}: the 2xx answer names {wrong}, not this request's ({asked}): it "
            "applied, but what it made cannot be read from the answer",
            body=resp.body,
            status=resp.status,
            field="$",
            method="POST",
            path=path,
        )


async def _kept(late: LateAnswer, exchange: Awaitable[RawResponse]) -> RawResponse:
    """``exchange``'s answer, for a POST of a call that keeps late answers. The exchange
    runs as a task of its own that hands its answer over through a future the caller
    awaits (no shield: one task and one future a POST, its answer one loop step behind
    what a direct await gives). When the caller is cancelled, the cancellation goes on at
    once; the exchange is handed to ``late`` (the engine awaits its answer apart, or
    cancels it) once its request left (its connection handed over: ``RequestLeft``) or
    its answer came, and is cancelled with the call before (a connection still being
    opened, or a caller's own session, which marks nothing)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[RawResponse] = asyncio.Future(loop=loop)
    mark = RequestLeft()
    task = _start(loop, _handed(exchange, answer, mark))
    try:
        return await answer
    except asyncio.CancelledError:
        if not answer.cancelled():
            # Answered as the caller cancelled: the answer is in it.
            late.task = cast("asyncio.Future[RawResponse | None]", answer)
        elif mark.left or task.done():
            late.task = task  # on its way (or just in): awaited apart, within its timeouts
        else:
            drop_late(task)  # not left: it never leaves, as before
        raise


if sys.version_info >= (3, 12):

    def _start(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[object, None, RawResponse | None]
    ) -> asyncio.Task[RawResponse | None]:
        """The exchange's task, its first step run at once (up to its first wait: the
        request written on a pooled connection), not one loop step later."""
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:

    def _start(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[object, None, RawResponse | None]
    ) -> asyncio.Task[RawResponse | None]:
        """The exchange's task (it starts on the loop's next step)."""
        return asyncio.Task(coro, loop=loop)


async def _handed(
    exchange: Awaitable[RawResponse], answer: asyncio.Future[RawResponse], mark: RequestLeft
) -> RawResponse | None:
    """Run ``exchange`` and set its outcome on ``answer`` while the caller awaits it
    (None then); once the caller left (``answer`` cancelled), its answer or error is the
    task's own, for :class:`LateAnswer`. A cancellation of the exchange itself reaches
    the caller as one (what a shield did). ``mark`` is set once the request left."""
    REQUEST_LEFT.set(mark)  # in this task's own context: the connector marks it
    try:
        resp = await exchange
    except asyncio.CancelledError:
        if answer.done():
            raise
        answer.cancel()
        raise
    except BaseException as exc:
        if answer.done():
            raise
        answer.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
        return None
    if answer.done():
        return resp
    answer.set_result(resp)
    return None


def drop_late(task: asyncio.Future[RawResponse | None]) -> None:
    """A POST handed over (:func:`_kept`) that nothing awaits: cancelled, its outcome
    retrieved (never an unretrieved-exception warning)."""
    task.cancel()
    task.add_done_callback(_retrieved)


def _retrieved(done: asyncio.Future[RawResponse | None]) -> None:
    if not done.cancelled():
        done.exception()


def _count(page: RefundPage, collected: int) -> int | None:
    """How many refunds ``page`` says the list held when it answered (None: it does
    not say, or says fewer than were read: a count never filled in)."""
    total = page.total_elements
    return total if total is not None and total >= collected else None


def _another_refund(one: OrderRefund, other: OrderRefund) -> bool:
    """Two records of one id that carry different refunds (what a refund carries never
    changes; its status and its last change do)."""
    return (one.amount, one.date_created, one.bag_id) != (
        other.amount,
        other.date_created,
        other.bag_id,
    )


def _skus_fit(asked: Counter[int | None], refund: OrderRefund) -> bool:
    """The answer's SKU lines carry the units asked for; lines without their SKU or
    units (every field of Violet's records is optional) are only held to naming SKUs
    that were asked for."""
    lines = refund.skus
    if all(line.order_sku_id is not None and line.quantity_refunded for line in lines):
        return _sku_totals(lines) == asked
    return all(line.order_sku_id is None or line.order_sku_id in asked for line in lines)


#: The last ``Date`` header read and its Unix time: answers within one second share
#: it, so a busy client parses it about once a second.
_last_date: tuple[str, float | None] = ("", None)


def _gap(span: tuple[float, float], resp: RawResponse) -> tuple[float, float] | None:
    """How long before the answer's own ``Date`` a refund dated ``span`` was made at
    the least, and how long after it at the least (one of them is 0 or less). None when
    the answer has no readable ``Date``; a day-precision date (midnight UTC) spans its
    day. Violet's clock only: no local clock."""
    global _last_date  # noqa: PLW0603 - a one-entry cache, replaced whole
    header = resp.headers.get("Date")
    if not header:
        return None
    cached = _last_date
    if cached[0] == header:
        answered = cached[1]
    else:
        answered = http_date(header)
        _last_date = (header, answered)
    if answered is None:
        return None
    return answered - span[1], span[0] - answered


def _too_late(method: str, path: str) -> APITimeoutError:
    """The call's deadline passed before the request left (nothing was sent)."""
    return APITimeoutError(
        f"{method} {path}: the call's deadline passed before sending",
        method=method,
        path=path,
        request_sent=False,
    )


PAGES_IN_FLIGHT = 4
"""How many pages of one bag's refund list are asked for at once."""


def _listed(*pages: list[RefundPage]) -> tuple[OrderRefund, ...]:
    """Every refund record ``pages`` list, each id once."""
    seen: set[int] = set()
    listed: list[OrderRefund] = []
    for group in pages:
        for page in group:
            for refund in page.refunds:
                if refund.id is not None:
                    if refund.id in seen:
                        continue
                    seen.add(refund.id)
                listed.append(refund)
    return tuple(listed)


class _PagesAhead:
    """The pages of a refund list after the first, asked for before the walk reaches
    them. Only pages the first one announces (``total_pages``) are fetched ahead, at most
    :data:`PAGES_IN_FLIGHT` at a time; any other page is asked for when wanted. A page
    that failed fails the read only if the walk wants it; the rest are cancelled when
    the read ends, however it ends. A page read ahead is taken only when it answered
    from the list as it was when the page before it did, or later (:meth:`page`)."""

    __slots__ = ("_early", "_fetch", "_tasks")

    def __init__(
        self, requests: RequestPlumbing, path: str, first: RefundPage, deadline: float | None
    ) -> None:
        size = None if first.size is None else str(first.size)

        async def fetch(number: int) -> RefundPage:
            query = {"page": str(number)}
            if size is not None:
                query["size"] = size
            return await requests._get(path, parse_refund_page, deadline=deadline, query=query)

        self._fetch = fetch
        self._tasks: dict[int, asyncio.Task[RefundPage]] = {}
        self._early: list[RefundPage] = []  # pages read ahead that the walk reached
        # Without a count of refunds, a page read ahead could not be told from one
        # answered before the page the walk takes before it (``page``): none is.
        counted = _count(first, len(first.refunds)) is not None
        if first.paged and first.number is not None and first.last is not True and counted:
            count = min(first.total_pages or 0, MAX_PAGES)
            if count > 1:
                gate = asyncio.Semaphore(PAGES_IN_FLIGHT)
                for number in range(first.number + 1, first.number + count):
                    self._tasks[number] = asyncio.ensure_future(self._gated(gate, number))

    async def _gated(self, gate: asyncio.Semaphore, number: int) -> RefundPage:
        async with gate:
            return await self._fetch(number)

    async def page(self, number: int, floor: int | None) -> RefundPage:
        """Page ``number``, the walk having taken one counting ``floor`` refunds.

        A page asked for ahead is taken only when it counts at least as many refunds
        as the page the walk took before it (refunds are never deleted: it answered
        from the list as it was then, or later). One that counts fewer (or does not
        say) may have answered before that page: refunds made in between moved the
        list under it (newest first, every record a place down per new refund), and a
        record on the seam was on neither page while new ones read on the earlier
        page made the counts add up. The ask's own refund, missed that way, was
        proven absent and sent again (review 24). Such a page is asked for again now,
        after the page before it, as a walk one page at a time would."""
        task = self._tasks.pop(number, None)
        if task is not None:
            early = await task
            self._early.append(early)
            counted = early.total_elements
            if floor is not None and counted is not None and counted >= floor:
                return early
        return await self._fetch(number)

    def answered(self) -> list[RefundPage]:
        """Every page read ahead that answered so far (taken by the walk or not)."""
        done = [
            task.result()
            for task in self._tasks.values()
            if task.done() and not task.cancelled() and task.exception() is None
        ]
        return [*self._early, *done]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
