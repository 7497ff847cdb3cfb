"""Credentials and the token lifecycle: lazy login, JWT ``exp``, single-flight refresh.

However many calls are in flight, at most one login or refresh runs at a time; the
others wait for it and use its token. Secrets live in attributes excluded from every
repr and are never formatted into a message; :attr:`Auth.redactor` hides them in
anything a server echoes back.

Clocks disagree. A token's ``exp`` is the server's time, so its remaining life is
measured from the ``Date`` of the answer that issued it (when that differs from ours
by more than a few seconds), and a token this client was just given is never renewed
ahead of time before :data:`MIN_TOKEN_AGE` (or half its life, when shorter) has passed:
a client clock hours ahead cannot turn every call into a login. A token Violet refuses
as expired is renewed; if two fresh tokens in a row are refused that way, renewals stop
until the last one is :data:`MIN_TOKEN_AGE` old, and calls fail with
``AuthenticationError`` meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import orjson

from ._redact import Redactor, has_control_character
from .exceptions import AuthenticationError, RequestValidationError

__all__ = ["Auth", "Credentials", "jwt_expiry"]

log = logging.getLogger("violet_async.auth")

DEFAULT_TOKEN_LIFETIME = 24 * 3600.0
#: Refresh this long before the token expires (or at half its life if shorter).
DEFAULT_REFRESH_MARGIN = 300.0
#: A token this client obtained is not renewed ahead of expiry before this many
#: seconds (or half its life by the server's clock, when shorter; never below
#: :data:`MIN_RENEW_INTERVAL`).
MIN_TOKEN_AGE = 60.0
#: The shortest time between two proactive renewals, whatever a server claims.
MIN_RENEW_INTERVAL = 0.5
#: A ``Date`` header within this many seconds of our clock is taken as agreeing (its
#: resolution is one second).
CLOCK_TOLERANCE = 5.0
#: How many replaced tokens stay known to the redactor.
_RETIRED_TOKENS = 4


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT as a Unix time, or None when it cannot be read.

    No signature check: the client only needs to know when to refresh."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims: Any = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


def _header_safe(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """Values sent as header values: a CR or LF would split the header, so any control
    character is refused before anything is sent."""
    if value is not None and has_control_character(value):
        raise RequestValidationError(
            attribute.name, "contains a control character (newline, tab, NUL...)"
        )


@attrs.define
class Credentials:
    """What the client authenticates with. Secrets are hidden from repr."""

    app_id: int
    app_secret: str = attrs.field(repr=False, validator=_header_safe)
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False, validator=_header_safe)
    refresh_token: str | None = attrs.field(default=None, repr=False, validator=_header_safe)
    gateway_secrets: tuple[str, ...] = attrs.field(default=(), repr=False)
    """The password of the base URL's ``user:password@`` (a gateway's), as written and
    decoded, and the ``Basic`` credentials sent for it: never sent as a Violet
    credential, hidden from errors all the same."""
    _retired: list[str] = attrs.field(factory=list, repr=False, init=False, eq=False)

    def secrets(self) -> list[str]:
        """Every secret value, for redaction (recently replaced tokens included)."""
        values = (self.app_secret, self.password, self.token, self.refresh_token)
        return [v for v in values if v] + [*self.gateway_secrets, *self._retired]

    def replace_token(self, token: str) -> None:
        """Use ``token`` from now on; the old one stays known to redaction for a while."""
        if self.token and self.token != token:
            self._retired = [*self._retired, self.token][-_RETIRED_TOKENS:]
        self.token = token


#: (method, path, body, token header) -> (status, body) or (status, body, headers).
#: Sent by the client's transport; the headers' ``Date`` tells the server's clock.
AuthSend = Callable[
    [str, str, bytes | None, str | None],
    Awaitable[tuple[int, bytes] | tuple[int, bytes, Mapping[str, str]]],
]


def _server_time(headers: Mapping[str, str]) -> float | None:
    """The ``Date`` header as a Unix time, or None when absent or unreadable."""
    value = headers.get("Date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _usable_token(value: object) -> bool:
    """A token from the server goes into a header: it must be printable ASCII."""
    return isinstance(value, str) and bool(value) and value.isascii() and value.isprintable()


def _auth_error(
    message: str, *, status: int, method: str, path: str, error_code: int | None = None
) -> AuthenticationError:
    # No body or headers: a login answer may echo what was sent.
    return AuthenticationError(
        message,
        status=status,
        error_code=error_code,
        body=b"",
        headers={},
        method=method,
        path=path,
    )


def is_token_expired_error(exc: BaseException) -> bool:
    """Violet's 401 for an expired token (``error_code`` 11, "Token has expired")."""
    if not isinstance(exc, AuthenticationError):
        return False
    return exc.error_code == 11 or "expired" in (exc.message or "").lower()


class Auth:
    """Holds the current token and renews it, one renewal at a time."""

    def __init__(
        self,
        credentials: Credentials,
        send: AuthSend,
        *,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._creds = credentials
        self._send = send
        self._margin = refresh_margin
        self._now = now
        self._lock = asyncio.Lock()
        self._token = credentials.token
        self._expires_at = 0.0
        self._renew_at = 0.0
        # When (our clock) the current token was obtained by this client; None for a
        # token the caller passed in, whose age is unknown.
        self._obtained_at: float | None = None
        self._fresh_refusals = 0
        #: Hides this client's secrets (tokens as they change included) in errors.
        self.redactor = Redactor(credentials.secrets)
        if credentials.token:
            self._schedule(credentials.token, server_time=None, obtained=False)
        self.logins = 0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"<Auth app_id={self._creds.app_id} token={'set' if self._token else 'unset'}>"

    @property
    def can_renew(self) -> bool:
        return bool(self._creds.refresh_token or self._creds.password)

    def current(self) -> str | None:
        """The token when it needs no renewal, else None (then await :meth:`token`).
        Synchronous, so the common case costs no coroutine."""
        token = self._token
        # A static token is used until Violet says it expired.
        if token is not None and (self._now() < self._renew_at or not self.can_renew):
            return token
        return None

    async def token(self) -> str:
        """A token that is not about to expire; logs in or refreshes when needed."""
        token = self.current()
        if token is not None:
            return token
        async with self._lock:
            if self.current() is None:  # another call may have renewed while we waited
                await self._renew()
        return self._token  # type: ignore[return-value]

    async def expired(self, stale: str) -> str:
        """Violet rejected ``stale`` as expired: renew once (unless a concurrent call
        already did) and return the new token."""
        async with self._lock:
            if self._token == stale:
                if not self.can_renew:
                    raise _auth_error(
                        "the token has expired and this client cannot renew it: pass "
                        "refresh_token=... or username=/password= (or a new token)",
                        status=401,
                        method="",
                        path="",
                        error_code=11,
                    )
                self._check_refusal_rate()
                await self._renew()
        return self._token  # type: ignore[return-value]

    def _check_refusal_rate(self) -> None:
        """Count refusals of tokens this client was just given; after two in a row,
        stop renewing for a while rather than log in on every call."""
        now = self._now()
        obtained = self._obtained_at
        # A negative age is a wall clock stepped back since (NTP): the age is unknown,
        # and refusing to renew until the clock catches up would stop every call for
        # as long as the step (hours).
        if obtained is None or not 0.0 <= now - obtained < MIN_TOKEN_AGE:
            self._fresh_refusals = 0  # an ordinary expiry
            return
        self._fresh_refusals += 1
        if self._fresh_refusals >= 2:
            raise _auth_error(
                f"Violet refused tokens it had just issued as expired; not renewing again "
                f"for {obtained + MIN_TOKEN_AGE - now:.0f}s (is a server clock wrong?)",
                status=401,
                method="",
                path="",
                error_code=11,
            )

    async def _renew(self) -> None:
        if self._creds.refresh_token:
            try:
                await self._refresh()
            except AuthenticationError:
                if not self._creds.password:
                    raise
                log.info("refresh token rejected; logging in again")
            else:
                return
        await self._login()

    async def _login(self) -> None:
        if not (self._creds.username and self._creds.password):
            raise _auth_error(
                "no token and no username/password to log in with",
                status=401,
                method="POST",
                path="/login",
            )
        body = orjson.dumps({"username": self._creds.username, "password": self._creds.password})
        data, server_time = await self._call("POST", "/login", body, None)
        token, refresh = data.get("token"), data.get("refresh_token")
        if not _usable_token(token):
            raise _auth_error(
                "login answered without a usable token (missing, or not printable ASCII)",
                status=200,
                method="POST",
                path="/login",
            )
        if isinstance(refresh, str) and refresh and not _usable_token(refresh):
            raise _auth_error(
                "login answered with a refresh token that is not printable ASCII",
                status=200,
                method="POST",
                path="/login",
            )
        self.logins += 1
        self._set_token(token, server_time)  # type: ignore[arg-type]
        if isinstance(refresh, str) and refresh:
            self._creds.refresh_token = refresh
        log.info("logged in (app %s)", self._creds.app_id)

    async def _refresh(self) -> None:
        data, server_time = await self._call("GET", "/auth/token", None, self._creds.refresh_token)
        token = data.get("token")
        if not _usable_token(token):
            raise _auth_error(
                "token refresh answered without a usable token (missing, or not printable ASCII)",
                status=200,
                method="GET",
                path="/auth/token",
            )
        self.refreshes += 1
        self._set_token(token, server_time)  # type: ignore[arg-type]
        log.info("token refreshed (app %s)", self._creds.app_id)

    def _set_token(self, token: str, server_time: float | None) -> None:
        self._token = token
        self._creds.replace_token(token)
        self._schedule(token, server_time=server_time, obtained=True)

    def _schedule(self, token: str, *, server_time: float | None, obtained: bool) -> None:
        """Renew ``refresh_margin`` before expiry, or at half the remaining life when
        the token is shorter-lived than twice the margin (tests, short sessions).

        The remaining life is ``exp`` minus the server's time when it answered (the
        ``Date`` header, trusted when it differs from our clock by more than
        :data:`CLOCK_TOLERANCE`), so a skewed local clock shifts nothing. A token this
        client obtained is kept at least :data:`MIN_TOKEN_AGE` (or half its life when
        shorter; a token already dead by the server's own clock gets the full wait):
        whatever the clocks say, proactive renewals cannot come faster than that.
        """
        now = self._now()
        offset = 0.0
        if server_time is not None and abs(server_time - now) > CLOCK_TOLERANCE:
            offset = server_time - now
        exp = jwt_expiry(token)
        life = DEFAULT_TOKEN_LIFETIME if exp is None else exp - (now + offset)
        self._expires_at = now + life
        renew_at = now + life - min(self._margin, max(life, 0.0) / 2)
        if obtained:
            floor = (
                max(MIN_RENEW_INTERVAL, min(MIN_TOKEN_AGE, life / 2)) if life > 0 else MIN_TOKEN_AGE
            )
            renew_at = max(renew_at, now + floor)
        self._renew_at = renew_at
        self._obtained_at = now if obtained else None

    async def _call(
        self, method: str, path: str, body: bytes | None, token: str | None
    ) -> tuple[dict[str, Any], float | None]:
        answer = await self._send(method, path, body, token)
        status, raw = answer[0], answer[1]
        headers: Mapping[str, str] = answer[2] if len(answer) > 2 else {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise _auth_error(
                "unreadable answer (not a JSON object)",
                status=status,
                method=method,
                path=path,
            )
        return data, _server_time(headers)
