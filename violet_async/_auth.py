"""Credentials and the token lifecycle: lazy login, JWT ``exp``, single-flight refresh.

However many calls are in flight, at most one login or refresh runs at a time; the
others wait for it and use its token. Secrets live in attributes excluded from every
repr and are never formatted into a message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson

from .exceptions import AuthenticationError

__all__ = ["Auth", "Credentials", "jwt_expiry"]

log = logging.getLogger("violet_async")

DEFAULT_TOKEN_LIFETIME = 24 * 3600.0
#: Refresh this long before the token expires (or at half its life if shorter).
DEFAULT_REFRESH_MARGIN = 300.0


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


@attrs.define
class Credentials:
    """What the client authenticates with. Secrets are hidden from repr."""

    app_id: int
    app_secret: str = attrs.field(repr=False)
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    refresh_token: str | None = attrs.field(default=None, repr=False)

    def secrets(self) -> list[str]:
        """Every secret value, for redaction."""
        values = (self.app_secret, self.password, self.token, self.refresh_token)
        return [v for v in values if v]


#: (method, path, body, token header) -> (status, body). Sent by the client's transport.
AuthSend = Callable[[str, str, bytes | None, str | None], Awaitable[tuple[int, bytes]]]


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
        if credentials.token:
            self._schedule(credentials.token)
        self.logins = 0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"<Auth app_id={self._creds.app_id} token={'set' if self._token else 'unset'}>"

    @property
    def can_renew(self) -> bool:
        return bool(self._creds.refresh_token or self._creds.password)

    def _expiry_of(self, token: str) -> float:
        exp = jwt_expiry(token)
        return exp if exp is not None else self._now() + DEFAULT_TOKEN_LIFETIME

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
                await self._renew()
        return self._token  # type: ignore[return-value]

    async def _renew(self) -> None:
        if self._creds.refresh_token:
            try:
                await self._refresh()
            except AuthenticationError:
                if not self._creds.password:
                    raise
                log.info("violet_async: refresh token rejected; logging in again")
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
        data = await self._call("POST", "/login", body, None)
        token, refresh = data.get("token"), data.get("refresh_token")
        if not isinstance(token, str) or not token:
            raise _auth_error(
                "login answered without a token", status=200, method="POST", path="/login"
            )
        self.logins += 1
        self._set_token(token)
        if isinstance(refresh, str) and refresh:
            self._creds.refresh_token = refresh
        log.info("violet_async: logged in (app %s)", self._creds.app_id)

    async def _refresh(self) -> None:
        data = await self._call("GET", "/auth/token", None, self._creds.refresh_token)
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise _auth_error(
                "token refresh answered without a token",
                status=200,
                method="GET",
                path="/auth/token",
            )
        self.refreshes += 1
        self._set_token(token)
        log.info("violet_async: token refreshed (app %s)", self._creds.app_id)

    def _set_token(self, token: str) -> None:
        self._token = token
        self._creds.token = token
        self._schedule(token)

    def _schedule(self, token: str) -> None:
        """Renew ``refresh_margin`` before expiry, or at half the remaining life when
        the token is shorter-lived than twice the margin (tests, short sessions)."""
        now = self._now()
        self._expires_at = self._expiry_of(token)
        life = self._expires_at - now
        self._renew_at = self._expires_at - min(self._margin, max(life, 0.0) / 2)

    async def _call(
        self, method: str, path: str, body: bytes | None, token: str | None
    ) -> dict[str, Any]:
        status, raw = await self._send(method, path, body, token)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise _auth_error(
                f"{method} {path}: unreadable answer (status {status})",
                status=status,
                method=method,
                path=path,
            )
        return data
