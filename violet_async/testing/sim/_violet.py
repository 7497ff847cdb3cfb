"""The simulated Violet: FakeViolet's ledger and rules (``testing._state.Store``) behind
an in-process transport, every hostile behaviour a choice the schedule made up front.

``SimTransport.send`` is the SDK's only network seam (``Transport.send``): it returns a
``RawResponse`` or raises ``APIConnectionError`` / ``APITimeoutError`` exactly where the
real transport would, and a request that "hangs" holds the caller for the attempt's
timeout (``min(deadline, connect + read)``) in virtual time.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import attrs
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..._converter import parse_datetime
from ..._transport import REQUEST_LEFT, RawResponse, Timeouts
from ...exceptions import APIConnectionError, APITimeoutError
from .._faults import ServerQuirks
from .._state import FakeBag, RuleViolation, Store, cancellation_body, cancellation_failure_body
from ._vloop import SimClock

__all__ = [
    "ASK_LABEL",
    "CANCEL_SHAPES",
    "WORLD_POST_KINDS",
    "WORLD_READ_KINDS",
    "SimCommit",
    "SimFault",
    "SimTransport",
    "SimViolet",
]

#: The ask a request belongs to (set by the simulator around each call), so every
#: commit is attributed to exactly one ask.
ASK_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("sim_ask", default=None)

GATEWAY_PAGES: dict[int, tuple[str, bytes]] = {
    502: ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    503: (
        "text/plain",
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
    ),
    504: ("text/plain", b"upstream request timeout"),
    524: ("text/html", b"<html><body>Error 524: A timeout occurred</body></html>"),
}


@attrs.frozen
class SimFault:
    """One request's fault. ``kind`` is one of the module's kinds; ``delay`` a late
    commit's delay after arrival (or a Retry-After); ``status`` the 5xx variant."""

    kind: str
    delay: float = 0.0
    status: int = 0

    def __str__(self) -> str:
        extra = f" d={self.delay:g}" if self.delay else ""
        return f"{self.kind}{f'/{self.status}' if self.status else ''}{extra}"


#: Faults of a refund/cancel POST; "late" ones commit ``delay`` after arrival.
POST_KINDS = (
    "refused",  # connection never established: nothing sent
    "rate_limit",  # 429 (Retry-After = delay, 0: none)
    "token_expired",  # 401 error_code 11 before anything applies
    "drop_before",  # connection reset after sending, not applied
    "drop_after",  # committed, then reset
    "drop_late",  # reset; still running at Violet, commits later
    "hang_before",  # no answer until the attempt times out; not applied
    "hang_after",  # committed, no answer
    "hang_late",  # no answer, commits later
    "gateway_before",  # gateway page (502/503/504/524), not applied
    "gateway_after",  # committed, gateway page
    "gateway_late",  # gateway page now, commits later
    "violet_before",  # Violet's own JSON 500/503, not applied
    "violet_after",  # committed, then Violet's JSON 500/503
    "garbled_after",  # committed, 200 with a truncated body
)
READ_KINDS = (
    "refused",
    "rate_limit",
    "token_expired",
    "drop_before",
    "hang_before",
    "gateway_before",
    "violet_before",
    "garbled_after",
)
AUTH_KINDS = ("refused", "drop_before", "gateway_before", "violet_before")

#: Faults of the world kinds (``Schedule.kinds``), laid over the lists above by a second
#: random stream so that a seed's schedule without them is what it always was.
#: POSTs: committed, then a 2xx naming another bag (and another refund id).
WORLD_POST_KINDS = ("wrong_bag",)
#: A cancel that applied, answered in one of Violet's other shapes: the older page's bare
#: refund (200), ``cancelled_bags: []``, or only another bag's entry (202).
CANCEL_SHAPES = ("bare", "empty", "other")
#: Reads: the refund list with a record nobody can read.
WORLD_READ_KINDS = ("junk",)
#: POSTs (``_kinds_answers``): committed, then the refund CANCELED or FAILED (no money
#: moved), a 303, or a 200 without the refund's id.
ANSWER_POST_KINDS = ("refund_canceled", "refund_failed", "see_other", "no_id_answer")


@attrs.frozen
class SimCommit:
    refund_id: int
    label: str | None
    """The ask that made it (None: another actor)."""
    bag_id: int
    amount: int
    at: float
    visible_at: float
    reason: str | None = None
    """As Violet recorded it (trimmed, if the server trims)."""
    lines: tuple[tuple[int, int], ...] = ()
    """(order sku id, quantity) of each line, sorted."""
    shipping: int = 0
    emptied: bool = False
    """It took all the bag had left."""
    client: str | None = None
    """The client (process) whose POST made it (``app``, ``job``, ``worker2``); None
    for another actor's."""
    sent_at: float | None = None
    """When the POST that made it left (a late commit lands after it); None for another
    actor's."""


@attrs.define
class PostLeft:
    """A refund or cancel POST that reached the transport (a structured log for the
    named-risk classifier, ``_named``)."""

    label: str | None
    """Its ask's label (``A1``, ``A1~w2``), or None when no ask was set around the call
    (batch items: ``bag_label`` is the simulator's guess by bag)."""
    bag_label: str | None
    bag_id: int
    at: float
    refused: bool = False
    """Its connection never opened: nothing was sent."""
    answered: int | None = None
    """The status of its answer, if one reached the caller."""
    client: str = ""
    """The client (process) that sent it: ``app``, ``job``, ``app2``, ``resume0``."""


@attrs.frozen
class PageListed:
    """A page of a refund list read that arrived at its caller: the refund ids it
    carried, as Violet made it at ``at`` (readable or not)."""

    label: str | None
    bag_label: str | None
    bag_id: int
    at: float
    ids: tuple[int, ...]
    client: str = ""
    """The client (process) that read it."""
    number: int = 0
    """Its page number (from 0; an unpaged list is page 0)."""
    last: bool = True
    """Violet made it as the list's last page."""


class SimViolet:
    """Violet in process: ``Store`` holds orders, bags and the refund rules; faults come
    from per-route fault lists (the n-th POST takes ``post_faults[n]``, and so on), and
    every request and commit goes to ``trace``."""

    def __init__(  # noqa: PLR0915 - the world's whole state, in one place
        self,
        clock: SimClock,
        *,
        app_id: int,
        app_secret: str,
        username: str,
        password: str,
        quirks: ServerQuirks,
        post_faults: tuple[SimFault | None, ...] = (),
        read_faults: tuple[SimFault | None, ...] = (),
        auth_faults: tuple[SimFault | None, ...] = (),
        lags: tuple[float, ...] = (0.0,),
        latencies: Callable[[], float] = lambda: 0.05,
        date_header: bool = True,
        date_jumps: tuple[float, ...] = (),
        date_bias: float = 0.0,
        date_style: str = "iso",
        day_zone: float = 0.0,
        day_zone_utc: bool = False,
        cancel_shapes: tuple[str | None, ...] = (),
        replica_lag: float = 0.0,
    ) -> None:
        self.clock = clock
        self.store = Store(app_id, clock=clock, quirks=quirks)
        self.app_id = app_id
        self.app_secret = app_secret
        self.username = username
        self.password = password
        self.post_faults = list(post_faults)
        self.read_faults = list(read_faults)
        self.auth_faults = list(auth_faults)
        self.faults_on = True
        self._lags = lags or (0.0,)
        self._commits_seen = 0
        self.store.lag_for = self._next_lag
        self.latency = latencies
        self.date_header = date_header
        #: Seconds added to the n-th answer's ``Date`` header (a jump: one answer
        #: disagrees with the others), and to every answer's (a CDN's own clock: the
        #: header disagrees with the refund dates).
        self.date_jumps = date_jumps
        self.date_bias = date_bias
        self._answers = 0
        #: How refund dates are written: "iso" (Violet's usual shapes), "day" (day
        #: precision, ``...T00:00:00Z``) or "epoch" (milliseconds, a number).
        self.date_style = date_style
        #: With "day": the UTC offset (seconds) of the zone whose midnight a date is
        #: written at (0: UTC, ``...T00:00:00Z``).
        self.day_zone = day_zone
        #: That midnight written in UTC (``...T15:00:00+0000``): an exact-looking moment.
        self.day_zone_utc = day_zone_utc
        #: The shape of the n-th applied cancel's answer (None: the 202 body).
        self.cancel_shapes = cancel_shapes
        self._cancels_answered = 0
        #: Refund ids each ask was shown by a list read it received whole (every page)
        #: and could parse, and those it had
        #: been shown when it was last parked (pending or review): what a replica behind
        #: the primary can hide from its resume (shows, hides, shows). A refund no ask
        #: saw is hidden only by list lag (within the settle window: beyond it is
        #: README's remaining risk).
        self.shown_to: dict[str, set[int]] = {}
        self.hideable: dict[str, frozenset[int]] = {}
        #: Every other list read of a parked ask comes from a replica this far behind
        #: (every page of one read from the same one: a read whose first page came
        #: from the primary and every later page from the replica, on every read, is
        #: a list no read could ever take whole, which no real Violet serves for ever).
        self.replica_lag = replica_lag
        self._replica_reads: dict[str, int] = {}
        self._from_replica: dict[str, bool] = {}
        #: The refunds the answer being made shows the client (its label, their ids).
        self._showing: tuple[str, list[int], bool, bool] | None = None
        #: The pages of a list read each label has received so far.
        self._pages: dict[str, list[int]] = {}
        self.commit_at: dict[int, float] = {}
        self.tokens: dict[str, bool] = {}  # token -> still valid
        self.refresh_tokens: set[str] = set()
        self.secrets: set[str] = {app_secret, password}
        self._serial = 0
        self.commits: list[SimCommit] = []
        #: Per client (process): its wall clock and monotonic time read together when
        #: it was made, and at each answer that reached it, with that answer's ``Date``
        #: (Unix seconds; None: none or unreadable): for ``_named.risk_g``.
        self.born: dict[str, tuple[float, float]] = {}
        self.answered: dict[str, list[tuple[float, float, float | None]]] = {}
        #: Refunds Violet recorded that moved no money (CANCELED or FAILED: see
        #: ``_kinds_answers``): out of ``commits``, the ledger of money moved.
        self.voided: list[SimCommit] = []
        #: (the caller's label, refund id) of every 2xx answered without the id.
        self.idless: list[tuple[str | None, int]] = []
        #: bag id -> the ask sending to it, when no ASK_LABEL is set (batch items).
        self.bag_labels: dict[int, str] = {}
        #: [start, end] (virtual time) of every login / refresh request, and of every
        #: request answered 401 (the SDK renews and sends again).
        self.auth_calls: list[list[float]] = []
        self.trace: list[str] = []
        #: Structured logs for ``_named``: every POST that reached the transport, and
        #: every page of a refund list that arrived at its caller.
        self.posts: list[PostLeft] = []
        self.pages: list[PageListed] = []
        self._listing: tuple[int, float, tuple[int, ...], int, bool] | None = None
        self.injected: dict[str, int] = {}
        self.counts = {"post": 0, "read": 0, "auth": 0}
        #: A refund or cancel POST's bag id -> an answer refusing it before anything is
        #: looked at (a merchant platform's 429; ``_kinds_more.MerchantGate``), or None.
        self.post_gate: Callable[[int, str | None], RawResponse | None] | None = None
        #: A gate asked first about every POST (before the drawn fault of the request):
        #: its answer arrives as it is (no reset or hang laid over it).
        self.clean_gate: Callable[[int, str | None], RawResponse | None] | None = None
        self.clean_answer = False
        #: Every client's transport by name, and whose request is being answered now.
        self.transports: dict[str, SimTransport] = {}
        self.answering = ""
        #: The POST being answered (``_mutate`` links the refund it makes to it).
        self.posting: PostLeft | None = None

    # -- bookkeeping --------------------------------------------------------

    def _next_lag(self, bag_id: int) -> float:
        lag = self._lags[self._commits_seen % len(self._lags)]
        self._commits_seen += 1
        return lag

    def note(self, text: str) -> None:
        self.trace.append(f"t={self.clock.monotonic() - 1000.0:9.3f} {text}")

    def _take(self, route: str) -> SimFault | None:
        index = self.counts[route]
        self.counts[route] += 1
        faults = {"post": self.post_faults, "read": self.read_faults, "auth": self.auth_faults}[
            route
        ]
        if not self.faults_on or index >= len(faults):
            return None
        fault = faults[index]
        if fault is not None:
            self.count(f"{route}:{fault.kind}")
        return fault

    def count(self, key: str, n: int = 1) -> None:
        self.injected[key] = self.injected.get(key, 0) + n

    def _mint(self, prefix: str) -> str:
        self._serial += 1
        token = f"{prefix}-{self._serial}-{self._serial * 7919 % 100_003:05d}"
        self.secrets.add(token)
        return token

    def stop_faults(self) -> None:
        self.faults_on = False

    def other_actor_refund(self, bag: FakeBag, amount: int, reason: str) -> None:
        try:
            # Made on the merchant's platform: Violet lists it as EXTERNAL.
            record = self.store.commit_refund(
                bag,
                {"amount_refunded": amount, "reason": reason},
                status="EXTERNAL",
                route="external",
            )
        except RuleViolation as exc:
            self.note(f"ACTOR refund {amount} on bag {bag.id} refused: {exc.message}")
            return
        self._committed(None, bag, record)

    def _committed(
        self,
        label: str | None,
        bag: FakeBag,
        record: dict[str, Any],
        *,
        client: str | None = None,
        post: PostLeft | None = None,
    ) -> None:
        commit = self.store.ledger.commits_per_bag[bag.id][-1]
        self.commit_at[record["id"]] = commit.at
        lines = sorted((line["order_sku_id"], line["quantity_refunded"]) for line in record["skus"])
        self.commits.append(
            SimCommit(
                record["id"],
                label,
                bag.id,
                record["amount"],
                commit.at,
                commit.visible_at,
                reason=record.get("reason"),
                lines=tuple(lines),
                shipping=(record.get("shipping") or {}).get("amount", 0),
                emptied=bag.remaining == 0,
                client=client,
                sent_at=post.at if post is not None else None,
            )
        )
        who = label or "another actor"
        self.note(
            f"COMMIT refund {record['id']} bag {bag.id} amount {record['amount']} for {who}"
            f" (bag {bag.status}, listed at t={commit.visible_at - 1000.0:.3f})"
        )

    # -- answers ------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None) -> CIMultiDictProxy[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        if self.date_header:
            when = self.store.server_time() + self.date_bias
            index = self._answers
            self._answers += 1
            if index < len(self.date_jumps) and self.date_jumps[index]:
                when += self.date_jumps[index]
                if self.faults_on:
                    self.count("date:jump")
                else:
                    when -= self.date_jumps[index]
            headers["Date"] = formatdate(when, usegmt=True)
        headers["Content-Type"] = "application/json"
        if extra:
            headers.update(extra)
        return CIMultiDictProxy(headers)

    def _json(self, data: Any, status: int = 200) -> RawResponse:
        return RawResponse(status, self._headers(), orjson.dumps(data))

    def _dated(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with its dates in this Violet's style."""
        if self.date_style == "iso":
            return record
        shown = dict(record)
        for name in ("date_created", "date_last_modified"):
            value = record.get(name)
            if not isinstance(value, str):
                continue
            moment = _parse_iso(value)
            if self.date_style == "day" and self.day_zone:
                zone = timezone(timedelta(seconds=self.day_zone))
                local = moment.astimezone(zone)
                midnight = datetime(local.year, local.month, local.day, tzinfo=zone)
                shown[name] = (
                    midnight.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")
                    if self.day_zone_utc
                    else midnight.isoformat()
                )
            elif self.date_style == "day":
                shown[name] = moment.strftime("%Y-%m-%dT00:00:00Z")
            else:
                shown[name] = int(moment.timestamp() * 1000)
        return shown

    def _error(self, status: int, message: str, code: int, **headers: str) -> RawResponse:
        body = {
            "status": status,
            "message": message,
            "error_code": code,
            "timestamp": int(self.store.server_time() * 1000),
        }
        return RawResponse(status, self._headers(headers), orjson.dumps(body))

    def _gateway(self, status: int) -> RawResponse:
        content_type, body = GATEWAY_PAGES[status]
        return RawResponse(status, self._headers({"Content-Type": content_type}), body)

    # -- requests -----------------------------------------------------------

    async def handle(  # noqa: PLR0917 - Transport.send's arguments, passed on
        self,
        who: str,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,
    ) -> RawResponse:
        path = url.path.split("/v1", 1)[-1]
        parts = path.strip("/").split("/")
        label = asked = ASK_LABEL.get()
        if label is None and len(parts) == 5:
            label = self.bag_labels.get(int(parts[3]))
        if path in {"/login", "/auth/token"}:
            route = "auth"
        elif method == "POST":
            route = "post"
        else:
            route = "read"
        post = None
        if route == "post" and len(parts) == 5:
            post = PostLeft(asked, label, int(parts[3]), self.clock.monotonic(), client=who)
            self.posts.append(post)
        fault = self._take(route)
        began = self.clock.monotonic()
        answer = None
        try:
            answer = await self._handle(
                who,
                method,
                url,
                headers,
                body,
                timeout,
                label=label,
                parts=parts,
                path=path,
                route=route,
                fault=fault,
                post=post,
            )
        except APIConnectionError as exc:
            if post is not None:
                post.refused = not exc.request_sent
            raise
        else:
            return answer
        finally:
            if post is not None and answer is not None:
                post.answered = answer.status
            if route == "auth" or (answer is not None and answer.status == 401):
                self.auth_calls.append([began, self.clock.monotonic()])

    async def _handle(  # noqa: PLR0917 - handle's arguments, passed on
        self,
        who: str,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,
        *,
        label: str | None,
        parts: list[str],
        path: str,
        route: str,
        fault: SimFault | None,
        post: PostLeft | None = None,
    ) -> RawResponse:
        what = f"{who} {method} {path}{'?' + url.query_string if url.query_string else ''}"
        tag = f" [{label}]" if label else ""
        if fault is not None and fault.kind == "refused":
            await asyncio.sleep(min(0.01, timeout))
            self.note(f"{what}{tag}: connection refused (never sent)")
            raise APIConnectionError(
                f"{method} {path}: connection refused",
                method=method,
                path=path,
                request_sent=False,
                reason="connection refused",
            )
        latency = self.latency()
        up = latency / 2
        if up >= timeout:
            await asyncio.sleep(timeout)
            self.note(f"{what}{tag}: slow link, timed out before arriving")
            raise _timeout(method, path)
        await asyncio.sleep(up)
        # The request is at Violet now (a cancel before this was a request cut in
        # transit: it never arrives; from now on it runs whatever the caller does).
        _arrived()
        late: Callable[[], None] | None = None
        self._showing = None
        self._listing = None
        self.answering = who
        self.posting = post
        try:
            answer, late = self._answer(
                route, parts, dict(url.query), headers, body, fault=fault, label=label
            )
        except RuleViolation as exc:
            retry_after = {"Retry-After": exc.retry_after} if exc.retry_after else {}
            answer = self._error(exc.status, exc.message, exc.error_code, **retry_after)
        if self.clean_answer:
            self.clean_answer = False
            fault = None
        if late is not None and fault is not None:
            self.clock.call_later(fault.delay, late)
        # What this answer shows the client counts as shown only once it arrives (an
        # answer dropped, or arriving after the attempt timed out, showed nothing).
        showing, self._showing = self._showing, None
        listing, self._listing = self._listing, None
        shown = f"{answer.status}" if answer is not None else "no answer"
        kind = f" fault={fault}" if fault is not None else ""
        summary = _summary(answer) if answer is not None and route == "read" else ""
        self.note(f"{what}{tag}:{kind} -> {shown}{summary}")
        left = timeout - up
        if fault is not None and fault.kind.startswith("hang"):
            await asyncio.sleep(left)
            raise _timeout(method, path)
        if fault is not None and fault.kind.startswith("drop"):
            await asyncio.sleep(min(up, left))
            raise APIConnectionError(
                f"{method} {path}: server disconnected",
                method=method,
                path=path,
                request_sent=True,
                reason="server disconnected",
            )
        if latency - up >= left:
            await asyncio.sleep(left)
            self.note(f"{what}{tag}: answer arrived after the attempt timed out")
            raise _timeout(method, path)
        await asyncio.sleep(latency - up)
        assert answer is not None
        self._page_arrived(label, listing, showing, who)
        return answer

    def _page_arrived(
        self,
        label: str | None,
        listing: tuple[int, float, tuple[int, ...], int, bool] | None,
        showing: tuple[str, list[int], bool, bool] | None,
        client: str = "",
    ) -> None:
        """A list read's page reached its caller (``client``): what it listed, and
        showed."""
        if listing is not None:
            bag_id, made_at, listed, number, last = listing
            self.pages.append(
                PageListed(ASK_LABEL.get(), label, bag_id, made_at, listed, client, number, last)
            )
        if showing is not None:
            shown_label, ids, first, last = showing
            pages = self._pages[shown_label] = [
                *([] if first else self._pages.get(shown_label, [])),
                *ids,
            ]
            if last:
                self.shown_to.setdefault(shown_label, set()).update(pages)

    def _answer(
        self,
        route: str,
        parts: list[str],
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        fault: SimFault | None,
        label: str | None,
    ) -> tuple[RawResponse | None, Callable[[], None] | None]:
        if route == "post" and self.clean_gate is not None:
            first = self.clean_gate(int(parts[3]), label)
            if first is not None:
                self.clean_answer = True
                return first, None
        kind = fault.kind if fault is not None else None
        if kind == "rate_limit":
            extra = {"Retry-After": f"{fault.delay:g}"} if fault and fault.delay else {}
            return self._error(429, "Too many requests", 429, **extra), None
        if kind in ("drop_before", "hang_before"):
            return None, None
        if kind == "gateway_before":
            return self._gateway(fault.status if fault else 502), None
        if kind == "violet_before":
            return self._error(fault.status if fault else 500, "Internal error", 5000), None
        if (
            headers.get("X-Violet-App-Id") != str(self.app_id)
            or headers.get("X-Violet-App-Secret") != self.app_secret
        ):
            raise RuleViolation(401, "Invalid app id or app secret", 10)
        if route == "auth":
            return self._auth(parts, headers, body), None
        token = headers.get("X-Violet-Token", "")
        if kind == "token_expired" and token in self.tokens:
            self.tokens[token] = False
        valid = self.tokens.get(token)
        if valid is None:
            raise RuleViolation(401, "Invalid token", 12)
        if not valid:
            raise RuleViolation(401, "Token has expired", 11)
        if route == "read":
            answer = self._read(parts, query, fault, label)
            if kind == "garbled_after":
                answer = RawResponse(200, answer.headers, answer.body[: len(answer.body) // 2])
            return answer, None
        if self.post_gate is not None:
            refused = self.post_gate(int(parts[3]), label)
            if refused is not None:
                return refused, None
        return self._mutate(parts, body, fault, label)

    def _auth(
        self, parts: list[str], headers: Mapping[str, str], body: bytes | None
    ) -> RawResponse:
        if parts == ["login"]:
            data = orjson.loads(body or b"{}")
            if data.get("username") != self.username or data.get("password") != self.password:
                raise RuleViolation(401, "Invalid username or password", 13)
            token = self._mint("sim-token")
            refresh = self._mint("sim-refresh")
            self.tokens[token] = True
            self.refresh_tokens.add(refresh)
            return self._json(
                {
                    "id": 1,
                    "email": self.username,
                    "token": token,
                    "refresh_token": refresh,
                    "type": "DEVELOPER",
                }
            )
        if headers.get("X-Violet-Token", "") not in self.refresh_tokens:
            raise RuleViolation(401, "Invalid refresh token", 14)
        token = self._mint("sim-token")
        self.tokens[token] = True
        return self._json({"token": token})

    def forget_shown(self) -> None:
        """Every record of what asks were shown is lost (a ledger restarting empty): a
        replica behind hides from them, from now on, only what they are shown again (a
        refund no record saw is hidden only by list lag, as for any other)."""
        self.shown_to.clear()
        self.hideable.clear()

    def parked(self, label: str) -> None:
        """Ask ``label`` was parked: a replica may hide what it was shown so far."""
        self.hideable[label] = frozenset(self.shown_to.get(label, ()))

    def _read(
        self,
        parts: list[str],
        query: Mapping[str, str],
        fault: SimFault | None = None,
        label: str | None = None,
    ) -> RawResponse:
        order = self.store.order(int(parts[1]))
        if len(parts) == 2:
            return self._json(order.to_json(self.clock.monotonic()))
        bag = self.store.bag(order.id, int(parts[3]))
        shown = [r for r in bag.refunds if self.store.visible(r)]
        kind = fault.kind if fault is not None else None
        seen = self.hideable.get(label or "")
        replica = False
        if seen is not None and self.replica_lag:
            who = label or ""
            if int(query.get("page", "0")) == 0:
                n = self._replica_reads[who] = self._replica_reads.get(who, 0) + 1
                self._from_replica[who] = n % 2 == 1
            replica = self._from_replica.get(who, False)
        if replica:
            # A replica behind the primary: what the primary already served this ask,
            # committed within the lag, is not there yet.
            self.count("read:replica")
            behind = self.clock.monotonic() - self.replica_lag
            assert seen is not None
            kept = [r for r in shown if r["id"] not in seen or self.commit_at[r["id"]] <= behind]
            if len(kept) < len(shown):
                self.count("read:stale_hid")
            shown = kept
        readable = (
            not replica
            and label is not None
            and kind not in ("junk", "garbled_after")
            and self.date_style != "epoch"  # shown: what the client can read
        )
        listed = shown
        shown = [self._dated(r) for r in shown]
        if self.store.quirks.listed_without_skus:
            shown = [{k: v for k, v in r.items() if k != "skus"} for r in shown]
        if kind == "junk":
            # A record no reader can take: an older shape, a field of another type.
            shown = [*shown, {"id": f"legacy-{bag.id}", "amount": "12,00", "status": 7}]
        cap = self.store.quirks.page_size
        if cap is None:
            self._listing = (bag.id, self.clock.monotonic(), _ids(shown), 0, True)
            if readable:
                self._showing = (label or "", [r["id"] for r in listed], True, True)
            return self._json(shown)
        number = int(query.get("page", "0"))
        size = min(int(query.get("size", str(cap))), cap)
        content = shown[number * size : (number + 1) * size]
        total_pages = max(math.ceil(len(shown) / size), 1)
        last = number >= total_pages - 1
        self._listing = (bag.id, self.clock.monotonic(), _ids(content), number, last)
        if readable:
            # A page shows the client only what is on it, and a list only once its
            # last page arrived (a read that fails on a later page shows nothing).
            page = [r["id"] for r in listed[number * size : (number + 1) * size]]
            self._showing = (label or "", page, number == 0, last)
        return self._json(
            {
                "content": content,
                "number": number,
                "size": size,
                "total_pages": total_pages,
                "total_elements": len(shown),
                "number_of_elements": len(content),
                "first": number == 0,
                "last": number >= total_pages - 1,
                "empty": not content,
            }
        )

    def _mutate(
        self, parts: list[str], body: bytes | None, fault: SimFault | None, label: str | None
    ) -> tuple[RawResponse | None, Callable[[], None] | None]:
        kind = fault.kind if fault is not None else None
        order_id, bag_id, action = int(parts[1]), int(parts[3]), parts[4]
        bag = self.store.bag(order_id, bag_id)
        data = orjson.loads(body or b"{}")
        client, post = self.answering, self.posting

        def commit(recheck: bool) -> dict[str, Any]:
            if action == "cancel":
                record = self.store.commit_cancel(bag, data)
            else:
                record = self.store.commit_refund(bag, data, None if recheck else checked)
            self._committed(label, bag, record, client=client, post=post)
            return record

        if action == "cancel":
            try:
                self.store.check_cancel(bag)
            except RuleViolation as violation:
                if violation.error_code != 4011:
                    raise
                # The platform's refusal (a fulfilled order): 202, the bag's own status
                # CANCELLATION_FAILURE, as Violet's cancellation body reports it.
                refused = cancellation_failure_body(self.app_id, bag, violation.message)
                return self._json(refused, status=202), None
            checked = None
        else:
            checked = self.store.check_refund(bag, data)
        if kind in ("drop_late", "hang_late", "gateway_late"):

            def land() -> None:
                try:
                    commit(recheck=True)
                except RuleViolation as exc:
                    self.note(f"LATE COMMIT on bag {bag_id} for {label} refused: {exc.message}")

            if kind == "gateway_late":
                return self._gateway(fault.status if fault else 504), land
            return None, land
        before = bag.status
        record = commit(recheck=False)
        if kind in ANSWER_POST_KINDS:
            return self._answered(action, bag, record, kind, label, before), None
        if kind in ("drop_after", "hang_after"):
            return None, None
        if kind == "gateway_after":
            return self._gateway(fault.status if fault else 502), None
        if kind == "violet_after":
            return self._error(fault.status if fault else 500, "Internal error", 5000), None
        return self._applied(action, bag, self._dated(record), kind), None

    def _applied(
        self, action: str, bag: FakeBag, record: dict[str, Any], kind: str | None
    ) -> RawResponse:
        """The 2xx answer to a POST that applied, as ``kind`` shapes it."""
        if kind == "wrong_bag":
            # A 2xx naming another bag (and a refund that is not this one).
            other = next((b for b in self._bags() if b.id != bag.id), None)
            record = {
                **record,
                "id": 900_000 + len(self.commits),
                "bag_id": other.id if other is not None else bag.id + 1_000,
                "order_id": other.order_id if other is not None else bag.order_id + 1_000,
            }
        shape = None
        if action == "cancel" and kind is None:
            index = self._cancels_answered
            self._cancels_answered += 1
            if index < len(self.cancel_shapes) and self.faults_on:
                shape = self.cancel_shapes[index]
        if shape is not None:
            self.count(f"post:cancel_{shape}")
            if shape == "bare":
                return self._json(record)  # the older order-service page
            body = cancellation_body(self.app_id, bag, record)
            if shape == "empty":
                body["cancelled_bags"] = []
            else:
                other = next((b for b in self._bags() if b.id != bag.id), None)
                entry = body["cancelled_bags"][0]
                entry["bag_id"] = other.id if other is not None else bag.id + 1_000
                entry["refund"] = None
            return self._json(body, status=202)
        if action == "cancel":
            # Violet's cancellation body, 202 (the orders-and-checkout pages).
            answer = self._json(cancellation_body(self.app_id, bag, record), status=202)
        else:
            answer = self._json(record)
        if kind == "garbled_after":
            return RawResponse(200, answer.headers, answer.body[: len(answer.body) // 2])
        return answer

    def _answered(  # noqa: PLR0917 - _mutate's own
        self,
        action: str,
        bag: FakeBag,
        record: dict[str, Any],
        kind: str,
        label: str | None,
        before: str,
    ) -> RawResponse:
        """The answer of ``_kinds_answers``' POST fault ``kind`` to a POST that committed
        ``record``."""
        if kind in ("refund_canceled", "refund_failed"):
            # The platform refused it after Violet recorded it: no money moved.
            status = "CANCELED" if kind == "refund_canceled" else "FAILED"
            self.store.void_refund(bag, record, status, before if action == "refund" else None)
            made = next(c for c in self.commits if c.refund_id == record["id"])
            self.commits.remove(made)
            self.voided.append(made)
            self.note(f"VOID refund {record['id']} bag {bag.id}: {status}, no money moved")
            return self._applied(action, bag, self._dated(record), kind)
        if kind == "see_other":
            location = f"/v1/orders/{record['order_id']}/refunds/{record['id']}"
            return RawResponse(303, self._headers({"Location": location}), b"")
        self.idless.append((label, record["id"]))
        return self._json({k: v for k, v in self._dated(record).items() if k != "id"})

    def _bags(self) -> list[FakeBag]:
        return [b for o in self.store.orders.values() for b in o.bags.values()]


def _parse_iso(value: str) -> datetime:
    moment = parse_datetime(value)  # "+0000" too, on Python 3.10
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _ids(records: list[dict[str, Any]]) -> tuple[int, ...]:
    """The refund ids a page carries (a record nobody can read has none)."""
    return tuple(r["id"] for r in records if isinstance(r.get("id"), int))


def _summary(answer: RawResponse) -> str:
    if answer.status != 200:
        return ""
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return " (garbled)"
    if isinstance(data, dict) and "content" in data:
        data = data["content"]
    if isinstance(data, list):
        return f" saw refunds {[r.get('id') for r in data]}"
    if isinstance(data, dict) and "bags" in data:
        return f" saw bags {[(b.get('id'), b.get('status')) for b in data['bags']]}"
    return ""


def _timeout(method: str, path: str) -> APITimeoutError:
    return APITimeoutError(
        f"{method} {path}: timed out waiting for the response",
        method=method,
        path=path,
        request_sent=True,
        reason="timed out",
        error_type="TimeoutError",
    )


class SimTransport:
    """What ``VioletClient(_transport=...)`` sends through: one per client (process),
    named in the trace."""

    def __init__(
        self, violet: SimViolet, name: str, wall: Callable[[], float] | None = None
    ) -> None:
        self.violet = violet
        self.name = name
        self.closed = False
        #: The process's wall clock (None: not recorded).
        self.wall = wall
        if wall is not None:
            violet.born[name] = (wall(), violet.clock.monotonic())
            violet.answered[name] = []
        #: When the process this transport belongs to crashed (its monotonic time).
        self.died_at: float | None = None
        violet.transports[name] = self

    @property
    def dead(self) -> bool:
        """The process this transport belongs to crashed: nothing it sends arrives."""
        return self.died_at is not None

    @dead.setter
    def dead(self, value: bool) -> None:
        self.died_at = self.violet.clock.monotonic() if value else None

    async def open(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def send(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeouts: Timeouts,
        deadline: float | None = None,
    ) -> RawResponse:
        if self.dead:
            raise asyncio.CancelledError
        target = URL(url) if isinstance(url, str) else url
        attempt = timeouts.connect + timeouts.read
        timeout = attempt if deadline is None else max(min(deadline, attempt), 0.0)
        answer = await self.violet.handle(self.name, method, target, headers, body, timeout)
        if self.wall is not None:
            date = answer.headers.get("Date")
            try:
                when = None if date is None else parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                when = None
            seen = (self.wall(), self.violet.clock.monotonic(), when)
            self.violet.answered[self.name].append(seen)
        return answer


def _arrived() -> None:
    """The request is at Violet: the caller's :class:`RequestLeft`, if it asks, is set
    (what the real transport does once the headers are sent)."""
    if (mark := REQUEST_LEFT.get()) is not None:
        mark.left = True
