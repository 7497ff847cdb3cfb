"""VioletClient: lifecycle, options and the endpoint coroutines. (How one request is
made, read or retried is in ``_requests.py``; when a refund may be sent again, in
``_protocol.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import attrs

from ._ask import checked_key
from ._auth import Auth, Credentials
from ._config import (
    UNSET,
    Environment,
    _Unset,
    check_app_info,
    check_base_url,
    check_extra_headers,
    scope_of,
    settings_from_env,
    shown_url,
    url_secrets,
)
from ._engine import Engine, KeyedAsks, unless_failed
from ._protocol import PendingRefund, Phase
from ._reconcile import KnownRefunds
from ._redact import Redactor
from ._requests import RequestPlumbing, Shared
from ._responses import (
    parse_order,
    refund_getter,
)
from ._retry import SYSTEM_CLOCK, Clock, Retrier, RetryHook, RetryPolicy
from ._telemetry import STATE, traced_call
from ._transport import (
    DEFAULT_MAX_RESPONSE_BYTES,
    USER_AGENT,
    BaseURL,
    Timeouts,
    Transport,
    check_proxy,
)
from .exceptions import (
    AmbiguousOutcomeError,
    BagPendingError,
    NotFoundError,
    RefundWaitTimeoutError,
    RequestValidationError,
)
from .models import (
    CancelBagRequest,
    Order,
    OrderRefund,
    ReasonCode,
    RefundBagRequest,
    ShippingRefund,
    SkuRefund,
)
from .models._validators import check_id
from .stores import MemoryStore, RecordStore, store_from_url

if TYPE_CHECKING:
    # Only _transport.py uses aiohttp's client; here it is a type in a signature.
    import aiohttp

__all__ = ["Environment", "VioletClient"]

T = TypeVar("T")


class VioletClient(RequestPlumbing):
    """Async client for Violet's bag refund and cancel endpoints.

    Use it as an async context manager (or call :meth:`aclose`). A caller-supplied
    ``aiohttp.ClientSession`` is never closed by the client.

    :param app_id: your Violet app's id.
    :param app_secret: your app's secret (sent as ``X-Violet-App-Secret``; never logged).
    :param username: with ``password``: log in on first use, renew before expiry.
    :param password: see ``username``.
    :param token: or an access token you already have.
    :param refresh_token: a refresh token, used to renew ``token``.
    :param environment: ``Environment.SANDBOX`` (default) or ``Environment.PRODUCTION``.
    :param base_url: any other Violet (``https://...``, ending in ``/v1``); wins over
        ``environment``. Plain http only to a loopback address.
    :param retry: retries, the never-twice rule's windows and the per-call deadline.
    :param timeouts: per-attempt ``connect`` and ``read`` timeouts, in seconds.
    :param session: your own ``aiohttp.ClientSession`` (never closed by the client).
    :param on_retry: called with a ``RetryEvent`` before each retry.
    :param allow_insecure_http: allow plain http to a host that is not loopback.
    :param refresh_margin: seconds before expiry at which a token is renewed.
    :param clock: the clock and sleep retries use (tests inject a fake one).
    :param max_connections: connections in the client's pool.
    :param max_response_bytes: largest answer read, in bytes (larger ones fail with
        ``ResponseTooLargeError``).
    :param proxy: an ``http://`` proxy (``http://user:password@host:port``); the
        environment's ``HTTP(S)_PROXY`` is never read.
    :param app_info: your app's name and version (``"refund-desk/2.3"``), appended to
        the User-Agent.
    :param keep_cancelled_sends: keep a refund or cancel POST whose caller cancelled
        the call after the request left running apart (within its own attempt's
        timeouts), and keep what its late answer proves for the ask's next resume or
        keyed repeat in this client: a 429 (or other refusal) that nothing applied, a
        2xx the ask's refund. Costs a task a POST (about 18 µs of client CPU at
        concurrency 1). Default False: a cancelled call's POST is cancelled with it,
        and its ask stays pending ("sent, may have applied"). See docs/web-apps.md.
    """

    def __init__(
        self,
        app_id: int,
        app_secret: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        refresh_token: str | None = None,
        environment: Environment = Environment.SANDBOX,
        base_url: str | None = None,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        session: aiohttp.ClientSession | None = None,
        on_retry: RetryHook | None = None,
        allow_insecure_http: bool = False,
        refresh_margin: float = 300.0,
        clock: Clock | None = None,
        max_connections: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        store: RecordStore | None = None,
        proxy: str | None = None,
        app_info: str | None = None,
        keep_cancelled_sends: bool = False,
        _transport: Any = None,
        _auth_now: Callable[[], float] | None = None,
    ) -> None:
        check_id("app_id", app_id)
        if not isinstance(app_secret, str) or not app_secret:
            raise RequestValidationError("app_secret", "must be a non-empty str")
        if token is None and not (username and password) and refresh_token is None:
            raise RequestValidationError(
                "token", "pass token=..., refresh_token=..., or username= and password="
            )
        if not isinstance(environment, Environment):
            raise RequestValidationError("environment", "must be an Environment")
        if not isinstance(keep_cancelled_sends, bool):
            raise RequestValidationError(
                "keep_cancelled_sends", f"must be a bool, got {type(keep_cancelled_sends).__name__}"
            )
        if store is not None and not all(
            callable(getattr(store, name, None))
            for name in ("claim", "save", "renew", "load", "aclose")
        ):
            raise RequestValidationError(
                "store",
                "must be a record store: MemoryStore(), SQLiteStore(path) or RedisStore(url)",
            )
        url = check_base_url(
            base_url if base_url is not None else environment.value,
            allow_insecure_http=allow_insecure_http,
        )
        credentials = Credentials(
            app_id=app_id,
            app_secret=app_secret,
            username=username,
            password=password,
            token=token,
            refresh_token=refresh_token,
            # A proxy's credentials too: a plain-http request carries them itself, and
            # a page echoing the request headers would show them (review 27).
            gateway_secrets=url_secrets(url)
            + (url_secrets(proxy) if isinstance(proxy, str) else ()),
        )
        # ``_transport``: private seam for violet_async.testing.sim (anything with the
        # Transport's open / aclose / closed / send); never an aiohttp object.
        # ``_auth_now``: the same simulator's clock for token renewals (by default
        # time.time, whatever ``clock`` is).
        check_proxy(proxy)  # before anything is built: bad input names the field
        user_agent = USER_AGENT if app_info is None else f"{USER_AGENT} {check_app_info(app_info)}"
        transport = _transport or Transport(
            session,
            connector_limit=max_connections,
            max_response_bytes=max_response_bytes,
            base_url=url,
            redactor=Redactor(credentials.secrets),
            proxy=proxy,
            mark_sent=keep_cancelled_sends,
        )
        self._retry = retry if retry is not None else RetryPolicy()
        self._timeouts = timeouts if timeouts is not None else Timeouts()
        self._on_retry = on_retry
        self._retrier_cache: Retrier | None = None
        self._shared = Shared(
            base_url=url,
            endpoint=BaseURL(url),
            transport=transport,
            auth=Auth(
                credentials,
                self._auth_send,
                refresh_margin=refresh_margin,
                **({} if _auth_now is None else {"now": _auth_now}),
            ),
            credentials=credentials,
            headers={
                "X-Violet-App-Id": str(app_id),
                "X-Violet-App-Secret": app_secret,
                "User-Agent": user_agent,
                "Content-Type": "application/json",
            },
            known_refunds=KnownRefunds(),
            clock=clock if clock is not None else SYSTEM_CLOCK,
            keep_cancelled_sends=keep_cancelled_sends,
        )
        # Built on the first keyed call: a call without a key never touches it.
        self._store = store
        # A store given (or VIOLET_STORE): client.resume keeps its records there too.
        self._shares_records = store is not None
        self._keys: KeyedAsks | None = None
        self._owns_store = False
        self._engine = Engine(self)

    # -- construction helpers ---------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> VioletClient:
        """Build a client from ``VIOLET_*`` environment variables.

        ``VIOLET_APP_ID``, ``VIOLET_APP_SECRET`` (required), ``VIOLET_USERNAME``,
        ``VIOLET_PASSWORD``, ``VIOLET_TOKEN``, ``VIOLET_REFRESH_TOKEN``, ``VIOLET_ENV``
        (sandbox | production), ``VIOLET_BASE_URL``, ``VIOLET_STORE`` (where keyed calls
        are kept: ``sqlite:///path``, ``redis://...``; the client closes a store it
        made this way), ``VIOLET_PROXY``, ``VIOLET_KEEP_CANCELLED_SENDS`` (``1``/``true``/
        ``yes``/``on`` or ``0``/``false``/``no``/``off``; anything else is refused).
        Keyword arguments win.
        """
        env = os.environ if environ is None else environ
        app_id, app_secret, settings = settings_from_env(env)
        made = "store" not in overrides and bool(env.get("VIOLET_STORE"))
        if made:
            settings["store"] = store_from_url(env["VIOLET_STORE"].strip())
        client = cls(app_id, app_secret, **{**settings, **overrides})
        client._owns_store = made
        return client

    def with_options(
        self,
        *,
        retry: RetryPolicy | _Unset = UNSET,
        timeouts: Timeouts | _Unset = UNSET,
        on_retry: RetryHook | _Unset | None = UNSET,
    ) -> VioletClient:
        """A client sharing this one's connection pool, token and lifecycle, with other
        retry or timeout settings. Closing the original closes it too."""
        clone = object.__new__(VioletClient)
        clone._shared = self._shared
        clone._retry = self._retry if isinstance(retry, _Unset) else retry
        clone._timeouts = self._timeouts if isinstance(timeouts, _Unset) else timeouts
        clone._on_retry = self._on_retry if isinstance(on_retry, _Unset) else on_retry
        clone._retrier_cache = None
        clone._store = self._store
        clone._shares_records = self._shares_records
        clone._keys = self._key_path()  # one key path for the client and its clones
        clone._owns_store = False
        clone._extra_headers = self._extra_headers
        clone._engine = Engine(clone)
        clone._engine.keys = clone._keys
        return clone

    def _for_call(
        self, timeout: float | Timeouts | None, extra_headers: Mapping[str, str] | None
    ) -> VioletClient:
        """This client, or (for a call with its own timeout or headers) a clone that
        shares its pool, token, bag locks and pending asks."""
        if timeout is None and extra_headers is None:
            return self
        timeouts = self._timeouts if timeout is None else _timeouts(timeout)
        clone = self.with_options(timeouts=timeouts)
        if extra_headers is not None:
            clone._extra_headers = check_extra_headers(extra_headers)
        return clone

    def __repr__(self) -> str:
        state = "closed" if self._shared.transport.closed else "open"
        return (
            f"<VioletClient app_id={self._shared.credentials.app_id} "
            f"base_url={shown_url(self._shared.base_url)!r} {state}>"
        )

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> VioletClient:
        await self._shared.transport.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client (and its session and store, if the client made them).
        Idempotent.

        The answers still awaited of POSTs whose callers cancelled them are dropped
        first: their asks stay pending ("sent, may have applied"), as without them."""
        late = tuple(self._shared.late_answers)
        for landing in late:
            landing.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
        await self._shared.transport.aclose()
        if self._owns_store and self._store is not None:
            self._owns_store = False
            await self._store.aclose()

    @property
    def closed(self) -> bool:
        return self._shared.transport.closed

    @property
    def base_url(self) -> str:
        return self._shared.base_url

    # -- endpoints --------------------------------------------------------------

    async def refund_bag(
        self,
        order_id: int,
        bag_id: int,
        request: RefundBagRequest | None = None,
        /,
        *,
        amount_refunded: int | _Unset | None = UNSET,
        shipping: ShippingRefund | _Unset | None = UNSET,
        skus: Sequence[SkuRefund] | _Unset | None = UNSET,
        reason: str | _Unset | None = UNSET,
        restock_items: bool | _Unset | None = UNSET,
        notify_customer: bool | _Unset | None = UNSET,
        idempotency_key: str | None = None,
        timeout: float | Timeouts | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> OrderRefund:
        """Refund a bag, fully (no amount) or partly. Never sends it twice.

        ``idempotency_key``: at most once per key, across calls and (with a shared
        ``store``) processes. A repeat with the same key and request gets the same
        outcome: the refund again with no request to Violet, the pending ask resumed,
        or a running call joined. The same key with another request raises
        ``IdempotencyKeyReusedError`` (nothing sent).

        ``amount_refunded`` and every other amount are in cents. ``timeout`` (seconds per
        attempt, or a ``Timeouts``) and ``extra_headers`` (sent with this call's
        requests; not the SDK's own headers) apply to this call only.

        Returns the refund; ``refund.errors`` may be non-empty. Raises
        ``RefundFailedError`` when Violet reports the refund FAILED or CANCELED (no money
        moved), and
        ``AmbiguousOutcomeError`` (with ``.pending`` to :meth:`resume`) when a failure in
        flight could not be resolved within the call's deadline. Any other error means
        the refund did not apply.

        :param order_id: the order's id.
        :param bag_id: the bag's id (one of the order's bags).
        :param request: a ``RefundBagRequest``, or give its fields as keywords.
        :param amount_refunded: cents to refund; left out, the whole bag.
        :param shipping: shipping to refund (``ShippingRefund(amount=cents)``).
        :param skus: the SKU lines to refund (``SkuRefund``); left out, every line.
        :param reason: shown to the merchant (and the shopper, if notified).
        :param restock_items: put the items back in stock (Violet's default: no).
        :param notify_customer: email the shopper (Violet's default: the merchant's setting).
        :param idempotency_key: at most once per key (see above).
        :param timeout: seconds per attempt for this call, or a ``Timeouts``.
        :param extra_headers: headers sent with this call's requests.
        """
        if (
            request is None
            and shipping is UNSET
            and skus is UNSET
            and reason is UNSET
            and restock_items is UNSET
            and notify_customer is UNSET
        ):
            # The common call (an amount, or nothing: the whole bag), validated the same.
            req = (
                RefundBagRequest()
                if amount_refunded is UNSET
                else RefundBagRequest(amount_refunded=amount_refunded)
            )
        else:
            fields = {
                "amount_refunded": amount_refunded,
                "shipping": shipping,
                "skus": skus,
                "reason": reason,
                "restock_items": restock_items,
                "notify_customer": notify_customer,
            }
            req = _request_from(RefundBagRequest, request, fields)
        client = self._for_call(timeout, extra_headers)
        try:
            if idempotency_key is not None:
                return await client._keyed("refund", order_id, bag_id, req, idempotency_key)
            if STATE.on:
                return await traced_call(
                    "violet.refund_bag",
                    client._refund(order_id, bag_id, req),
                    {"violet.order_id": order_id, "violet.bag_id": bag_id},
                )
            return unless_failed(
                await client._unkeyed("refund", order_id, bag_id, req), "refund", self._redactor()
            )
        except (AmbiguousOutcomeError, BagPendingError) as exc:
            _stamp(exc, self._key_scope())
            raise

    async def _refund(self, order_id: int, bag_id: int, req: RefundBagRequest) -> OrderRefund:
        return unless_failed(
            await self._unkeyed("refund", order_id, bag_id, req), "refund", self._redactor()
        )

    async def _cancel(self, order_id: int, bag_id: int, req: CancelBagRequest) -> OrderRefund:
        return unless_failed(
            await self._unkeyed("cancel", order_id, bag_id, req), "cancel", self._redactor()
        )

    async def _unkeyed(
        self,
        kind: Literal["refund", "cancel"],
        order_id: int,
        bag_id: int,
        req: RefundBagRequest | CancelBagRequest,
    ) -> OrderRefund:
        """A call without a key. With a store given, the record it leaves pending is
        kept there too (by its ``ask_id``, where :meth:`resume` keeps it), so that a
        copy edited before its resume (another amount, under the same identity) is
        refused in every process sharing the store (review 18: it was sent)."""
        try:
            return await self._engine.drive(kind, order_id, bag_id, req)
        except AmbiguousOutcomeError as exc:
            if self._shares_records and exc.pending is not None:
                # Shielded: a caller cancelling now still leaves the record kept.
                await asyncio.shield(self._key_path().keep(exc.pending))
            raise

    async def cancel_bag(
        self,
        order_id: int,
        bag_id: int,
        request: CancelBagRequest | None = None,
        /,
        *,
        reason_code: ReasonCode | str | _Unset = UNSET,
        reason: str | _Unset | None = UNSET,
        restock_items: bool | _Unset = UNSET,
        notify_customer: bool | _Unset = UNSET,
        idempotency_key: str | None = None,
        timeout: float | Timeouts | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> OrderRefund:
        """Cancel a bag; the shopper is refunded its total. Returns that refund.

        Raises ``CancellationFailedError`` when Violet reports the cancel failed,
        ``RefundFailedError`` when the bag was cancelled but its refund is FAILED or
        CANCELED (no money moved: refund the shopper another way), and
        ``AmbiguousOutcomeError`` like :meth:`refund_bag`; ``idempotency_key``,
        ``timeout`` and ``extra_headers`` as there."""
        fields = {
            "reason_code": reason_code,
            "reason": reason,
            "restock_items": restock_items,
            "notify_customer": notify_customer,
        }
        req = _request_from(CancelBagRequest, request, fields)
        client = self._for_call(timeout, extra_headers)
        try:
            if idempotency_key is not None:
                return await client._keyed("cancel", order_id, bag_id, req, idempotency_key)
            if STATE.on:
                return await traced_call(
                    "violet.cancel_bag",
                    client._cancel(order_id, bag_id, req),
                    {"violet.order_id": order_id, "violet.bag_id": bag_id},
                )
            return unless_failed(
                await client._unkeyed("cancel", order_id, bag_id, req), "cancel", self._redactor()
            )
        except (AmbiguousOutcomeError, BagPendingError) as exc:
            _stamp(exc, self._key_scope())
            raise

    def _key_path(self) -> KeyedAsks:
        keys = self._keys
        if keys is None:
            store = self._store if self._store is not None else MemoryStore()
            self._store = store
            in_flight = self._timeouts.connect + self._timeouts.read + self._retry.settle_running
            keys = self._keys = KeyedAsks(
                store,
                self._shared.clock,
                in_flight=in_flight,
                scope=self._key_scope(),
                origin=self._shared.origin,
                on_ended=self._ended_elsewhere,
                on_proven=self._shared.known_refunds.proven_late,
                on_earlier=self._earlier_ended,
            )
            self._engine.keys = keys
        return keys

    def _ended_elsewhere(self, pending: PendingRefund) -> None:
        """``pending``'s ask ended definitely not applied (another process ended it):
        it no longer holds its bag in this client."""
        unsettled = self._shared.unsettled
        if unsettled:
            unsettled.check(pending.bag_id, pending)

    def _earlier_ended(self, ask: PendingRefund, lineage: tuple[str, ...]) -> None:
        """A call of a key takes its new ``ask``; the key's earlier asks (``lineage``)
        ended definitely not applied, in this process or another. Records of them this
        client still holds pending no longer hold their bag; when one did, the new ask
        reads the bag before it is sent (the bag was in play while that ask's end was
        not known here: another system's identical refund made then must not pass for
        the new ask's own)."""
        unsettled = self._shared.unsettled
        if unsettled and unsettled.ended(ask.bag_id, lineage, ask):
            self._engine.mark_bag(ask.bag_id)

    def _redactor(self) -> Redactor:
        """Hides this client's secrets in a message built from an answer."""
        return self._shared.auth.redactor

    def _key_scope(self) -> str:
        """What a stored key is scoped by: :func:`~violet_async._config.scope_of`."""
        return scope_of(self._shared.credentials.app_id, self._shared.base_url)

    async def _keyed(
        self,
        kind: Literal["refund", "cancel"],
        order_id: int,
        bag_id: int,
        req: RefundBagRequest | CancelBagRequest,
        key: str,
    ) -> OrderRefund:
        """A refund or cancel under an idempotency key (``_engine.KeyedAsks``)."""
        call = self._key_path().run(
            self._engine.drive, kind, order_id, bag_id, req, key, self._deadline()
        )
        if STATE.on:
            attributes = {"violet.order_id": order_id, "violet.bag_id": bag_id}
            refund = await traced_call(f"violet.{kind}_bag", call, attributes)
        else:
            refund = await call
        return unless_failed(refund, kind, self._redactor())

    async def resume(self, pending: PendingRefund) -> OrderRefund:
        """Settle a refund or cancel that an earlier call left pending
        (``AmbiguousOutcomeError.pending``, possibly stored as JSON and read back with
        ``PendingRefund.from_json``), by the same rule as the call itself.

        Reads the bag back: returns the refund when it is there (``reconciled``);
        re-sends once absence is proven (the settle window has passed and the bag still
        does not show it); raises ``AmbiguousOutcomeError`` with a fresher ``pending``
        when that cannot be told yet, or ever (``pending.needs_review``).
        """
        if not isinstance(pending, PendingRefund):
            raise RequestValidationError(
                "pending", f"must be a PendingRefund, got {type(pending).__name__}"
            )
        if pending.phase not in (Phase.SENT, Phase.PENDING) and not (
            # Parked for review with every send proven not applied: resumed, it stays so.
            pending.phase is Phase.ABSENT and pending.needs_review
        ):
            raise RequestValidationError(
                "pending", f"is {pending.phase.value}: there is nothing to resume"
            )
        check_id("order_id", pending.order_id)
        check_id("bag_id", pending.bag_id)
        checked_key(pending.idempotency_key)
        scope = self._key_scope()
        if pending.scope is not None and pending.scope != scope:
            # Order and bag ids are only unique within one app's environment: this
            # client would read (and could refund) another bag under the same ids.
            raise RequestValidationError(
                "pending",
                f"was handed out by a client of another app or Violet host "
                f"({pending.scope!r}, this client is {scope!r}); resume it with a "
                "client of that app and host. Nothing was read or sent",
            )
        try:
            call = self._resume(pending)
            if STATE.on:
                attributes = {
                    "violet.order_id": pending.order_id,
                    "violet.bag_id": pending.bag_id,
                    "violet.kind": pending.kind,
                }
                return await traced_call("violet.resume", call, attributes)
            return await call
        except (AmbiguousOutcomeError, BagPendingError) as exc:
            _stamp(exc, scope)
            raise

    async def _resume(self, pending: PendingRefund) -> OrderRefund:
        if self._shares_records or pending.idempotency_key is not None:
            # A store was given: the ask's record is kept there by its ask_id, so a
            # record resumed again (here or in another process sharing the store) is
            # merged with the freshest copy, and one process resumes it at a time. A
            # record of a keyed call goes through its key's own entry (with or without
            # a store given): the keyed call's repeats and this resume are one ask.
            keys = self._key_path()
            refund = await keys.resume(self._engine.drive, pending, self._deadline())
            shared = self._shared
            shared.known_refunds.add(refund.id, pending.bag_id, pending.ask_id, refund)
            if shared.unsettled:
                # Settled elsewhere (another process, or earlier here): the bag is
                # free again in this client too.
                shared.unsettled.check(pending.bag_id, pending)
            keys.settled(pending, refund)
        else:
            refund = await self._engine.drive(
                pending.kind, pending.order_id, pending.bag_id, pending.request, resume=pending
            )
        return unless_failed(refund, pending.kind, self._redactor())

    async def list_bag_refunds(
        self,
        order_id: int,
        bag_id: int,
        *,
        timeout: float | Timeouts | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[OrderRefund]:
        """Every refund on a bag: a bare list, or every page of a paged answer.
        ``timeout`` and ``extra_headers`` apply to this call only."""
        path = self._bag_path(order_id, bag_id, "refunds")
        client = self._for_call(timeout, extra_headers)
        call = client._read_refunds(path, client._deadline())
        if STATE.on:
            attributes = {"violet.order_id": order_id, "violet.bag_id": bag_id}
            call = traced_call("violet.list_bag_refunds", call, attributes)
        return list((await call).refunds)

    async def get_order(self, order_id: int) -> Order:
        """The order with its bags (``GET /orders/{order_id}``)."""
        check_id("order_id", order_id)
        call = self._get(f"/orders/{order_id}", parse_order)
        if STATE.on:
            return await traced_call("violet.get_order", call, {"violet.order_id": order_id})
        return await call

    async def wait_for_refund(
        self,
        order_id: int,
        bag_id: int,
        refund_id: int,
        *,
        timeout: float = 300.0,
        poll_interval: float = 1.0,
        max_interval: float = 15.0,
    ) -> OrderRefund:
        """Poll ``GET /orders/{order_id}/refunds/{refund_id}`` until the refund reaches a
        terminal status (a 404 counts as "not listed yet": refund lists can lag).

        Waits ``poll_interval`` seconds, doubling up to ``max_interval``. Returns the
        final refund (a FAILED one is returned, not raised: check ``status``). Raises
        ``RefundWaitTimeoutError`` carrying the last state seen after ``timeout``, and
        ``ResponseFormatError`` for an answer naming another refund, bag or order (its
        state is not this refund's).
        """
        check_id("order_id", order_id)
        check_id("bag_id", bag_id)
        check_id("refund_id", refund_id)
        for name, seconds in (
            ("timeout", timeout),
            ("poll_interval", poll_interval),
            ("max_interval", max_interval),
        ):
            # NaN never ran out (every comparison false), and a max_interval of 0 or
            # below polled Violet in a loop with no wait at all (review 25).
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, (int, float))
                or not 0 < seconds < math.inf
            ):
                raise RequestValidationError(name, f"must be seconds > 0, got {seconds!r}")
        clock = self._shared.clock
        deadline = clock.monotonic() + timeout
        interval = poll_interval
        last: OrderRefund | None = None
        path = f"/orders/{order_id}/refunds/{refund_id}"
        parse = refund_getter(order_id, bag_id, refund_id)
        while True:
            with contextlib.suppress(NotFoundError):
                last = await self._get(path, parse)
            if last is not None and last.status is not None and last.status.is_terminal:
                return last
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                # A status Violet does not document is kept as written: it may echo
                # the request (review 28).
                state = "not found" if last is None else f"still {last.status}"
                state = self._redactor().text(state)
                raise RefundWaitTimeoutError(
                    f"refund {refund_id} on bag {bag_id} is {state} after {timeout:g}s",
                    refund=last,
                )
            await clock.sleep(min(interval, remaining))
            interval = min(interval * 2, max_interval)

    # -- the refund protocol ----------------------------------------------------


def _stamp(exc: AmbiguousOutcomeError | BagPendingError, scope: str) -> None:
    """The records ``exc`` hands out name the app and host of the client that made
    them (``PendingRefund.scope``): a resume by a client of another is refused."""
    if isinstance(exc, AmbiguousOutcomeError):
        if exc.pending is not None and exc.pending.scope is None:
            exc.pending = attrs.evolve(exc.pending, scope=scope)
    else:
        exc.pending = tuple(
            p if p.scope is not None else attrs.evolve(p, scope=scope) for p in exc.pending
        )


R = TypeVar("R", RefundBagRequest, CancelBagRequest)


def _request_from(cls: type[R], request: R | None, fields: dict[str, Any]) -> R:
    # Only the keywords given, so the model's defaults apply to the rest and a request
    # object plus keywords can be refused.
    given = {k: v for k, v in fields.items() if v is not UNSET}
    if request is None:
        return cls(**given)
    if not isinstance(request, cls):
        raise RequestValidationError(
            "request", f"must be a {cls.__name__}, got {type(request).__name__}"
        )
    if given:
        raise RequestValidationError(
            "request",
            f"pass a {cls.__name__} or keyword fields, not both (got {sorted(given)})",
        )
    return request


def _timeouts(timeout: float | Timeouts) -> Timeouts:
    """A call's ``timeout=``: a ``Timeouts``, or seconds for one attempt's answer (the
    connection gets at most 5 of them)."""
    if isinstance(timeout, Timeouts):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise RequestValidationError(
            "timeout", f"must be seconds or a Timeouts, got {type(timeout).__name__}"
        )
    if not (0 < timeout < float("inf")):
        raise RequestValidationError("timeout", f"must be > 0 seconds, got {timeout}")
    return Timeouts(connect=min(5.0, float(timeout)), read=float(timeout))
