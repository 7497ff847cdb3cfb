"""Client configuration: Violet's hosts, the base-URL rules, and ``VIOLET_*`` variables."""

from __future__ import annotations

import base64
import contextlib
import enum
import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from ._redact import has_control_character
from .exceptions import RequestValidationError

__all__ = [
    "UNSET",
    "Environment",
    "check_base_url",
    "scope_of",
    "settings_from_env",
    "shown_url",
    "url_secrets",
]


class Environment(enum.Enum):
    """Violet's hosts. App secrets differ between the two."""

    SANDBOX = "https://sandbox-api.violet.io/v1"
    PRODUCTION = "https://api.violet.io/v1"


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET = _Unset.UNSET


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def shown_url(url: str) -> str:
    """``url`` as a message, a repr or a log may show it: without ``user:password@``
    (a gateway's credentials in ``VIOLET_BASE_URL``). Everything up to the last ``@``
    is hidden: a password holding ``/``, ``?`` or ``#`` is read by a URL parser as
    the port or the path, so where the credentials end cannot be told (an ``@`` in
    a path hides the host as well: a message only)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def url_secrets(url: str) -> tuple[str, ...]:
    """The password of ``url``'s ``user:password@``, as written and decoded, and the
    ``Authorization: Basic`` credentials the HTTP client sends for its userinfo (a
    gateway's page listing the request headers quotes them, and the password, or a
    token written as the user name, decodes from them: review 27), for redaction
    (nothing when it carries none; a user name alone is no secret, and hiding a short
    common word everywhere would hide what an error says)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ()
    raw = parts.password
    found = [raw, unquote(raw)] if raw else []
    if parts.username or raw:
        # As aiohttp builds it (``BasicAuth.from_url``): the decoded user and password,
        # latin-1 (UTF-8 where latin-1 cannot hold them).
        pair = f"{unquote(parts.username or '')}:{unquote(raw or '')}"
        for encoding in ("latin-1", "utf-8"):
            with contextlib.suppress(UnicodeEncodeError):
                found.append(base64.b64encode(pair.encode(encoding)).decode("ascii"))
    return tuple(dict.fromkeys(found))


def scope_of(app_id: int, base_url: str) -> str:
    """What a stored record is scoped by: the app id and the base URL's host (sandbox
    or production, or your own), so two apps or two environments sharing a record
    store (or a batch journal) never meet. Not the port or path: a restarted process
    with the same host resumes what the last one left."""
    host = (urlsplit(base_url).hostname or "").lower()
    return f"{app_id} {host}"


def check_base_url(base_url: str, *, allow_insecure_http: bool) -> str:
    if not isinstance(base_url, str):
        raise RequestValidationError(
            "base_url", f"must be a str URL, got {type(base_url).__name__}"
        )
    if any(ch.isspace() for ch in base_url):
        # A space pasted with the URL: refused before any request (it would be sent as
        # part of the path, or dropped, depending on where it stands).
        raise RequestValidationError(
            "base_url",
            f"must not contain spaces or other whitespace, got {shown_url(base_url)!r}; "
            "Violet's API "
            "URLs look like https://sandbox-api.violet.io/v1",
        )
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - parsed on access: a port out of range raises here
    except ValueError:  # a port that is not a number, a broken [IPv6] host
        # Not the parser's own words: they quote the port it read, which is a password
        # holding '/' in ``user:pass/word@host`` (review 25).
        raise RequestValidationError(
            "base_url",
            f"is not a valid URL (its port or [IPv6] host cannot be read; a password in "
            f"it must be percent-encoded), got {shown_url(base_url)!r}",
        ) from None
    if "@" in base_url and "@" not in parts.netloc:
        # An ``@`` after the host, none before it: a password holding ``/`` (not
        # percent-encoded) whose part before it is digits parses, as the port of a
        # host named by the user name (review 28: the app secret went to that host,
        # and the password reached the span's url.full). Violet's paths hold no ``@``.
        raise RequestValidationError(
            "base_url",
            f"has an '@' after its host (a password in it must be percent-encoded), "
            f"got {shown_url(base_url)!r}",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestValidationError(
            "base_url", f"must be an http(s) URL, got {shown_url(base_url)!r}"
        )
    if parts.query or parts.fragment or base_url.endswith(("?", "#")):
        # Request paths are appended to the base URL's path; a query would be lost.
        raise RequestValidationError("base_url", "must not carry a query or fragment")
    if parts.scheme == "http" and not (allow_insecure_http or _is_loopback(parts.hostname)):
        raise RequestValidationError(
            "base_url",
            "plain http sends the app secret in clear text; use https, a loopback "
            "address, or pass allow_insecure_http=True",
        )
    return base_url.rstrip("/")


def check_app_info(app_info: object) -> str:
    """``app_info=``: your app's name and version (``"refund-desk/2.3"``), appended to the
    User-Agent so that Violet's logs tell your app's calls apart. Printable ASCII, at
    most 200 characters."""
    if not isinstance(app_info, str) or not app_info.strip():
        raise RequestValidationError("app_info", 'must be a non-empty str like "my-app/1.2"')
    if len(app_info) > 200 or not all(" " <= ch <= "~" for ch in app_info):
        raise RequestValidationError(
            "app_info", "must be printable ASCII of at most 200 characters (a header value)"
        )
    return app_info.strip()


# The SDK's own headers, and the ones HTTP itself manages: not a call's to set.
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "transfer-encoding", "connection", "user-agent"}
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_extra_headers(headers: object) -> Mapping[str, str]:
    """``extra_headers=``: names that are HTTP tokens, printable values, none of the
    SDK's own (``X-Violet-*``, ``Content-Type``, ``User-Agent``: use ``app_info=``)."""
    if not isinstance(headers, Mapping):
        raise RequestValidationError(
            "extra_headers", f"must be a mapping of str to str, got {type(headers).__name__}"
        )
    checked: dict[str, str] = {}
    for name, value in headers.items():
        field = f"extra_headers[{name!r}]"
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise RequestValidationError(field, "is not a valid header name")
        lowered = name.lower()
        if lowered.startswith("x-violet-") or lowered in _RESERVED_HEADERS:
            hint = " (use app_info=)" if lowered == "user-agent" else ""
            raise RequestValidationError(field, f"is set by the SDK itself{hint}")
        if not isinstance(value, str) or not all(" " <= ch <= "~" or ch == "\t" for ch in value):
            raise RequestValidationError(field, "must be a str of printable ASCII")
        checked[name] = value
    return checked


#: Every variable :func:`settings_from_env` reads.
ENV_VARIABLES = (
    "VIOLET_APP_ID",
    "VIOLET_APP_SECRET",
    "VIOLET_USERNAME",
    "VIOLET_PASSWORD",
    "VIOLET_TOKEN",
    "VIOLET_REFRESH_TOKEN",
    "VIOLET_ENV",
    "VIOLET_BASE_URL",
    "VIOLET_STORE",
    "VIOLET_PROXY",
    "VIOLET_KEEP_CANCELLED_SENDS",
)

#: The spellings ``VIOLET_KEEP_CANCELLED_SENDS`` accepts (after strip and lower case);
#: anything else is refused rather than guessed.
_FLAG_VALUES = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
    "": False,
}


def settings_from_env(env: Mapping[str, str]) -> tuple[int, str, dict[str, Any]]:
    """``(app_id, app_secret, keyword arguments)`` from ``VIOLET_*`` variables; a missing
    or malformed variable raises RequestValidationError naming it (never its value).

    No value may hold a control character: a newline pasted into a secret would split
    the header it is sent in. Numbers are ASCII digits only (``str.isdigit`` would
    accept ``²`` and ``١٢``).
    """
    for name in ENV_VARIABLES:
        value = env.get(name, "")
        # Only these four are stripped before use; the others are taken as they are.
        if name in (
            "VIOLET_APP_ID",
            "VIOLET_APP_SECRET",
            "VIOLET_ENV",
            "VIOLET_KEEP_CANCELLED_SENDS",
        ):
            value = value.strip()
        if has_control_character(value):
            raise RequestValidationError(
                name, "contains a control character (newline, tab, NUL...); check how it was set"
            )

    def required(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            raise RequestValidationError(name, "is not set")
        return value

    raw_id = required("VIOLET_APP_ID")
    if not (raw_id.isascii() and raw_id.isdigit()) or int(raw_id) == 0:
        raise RequestValidationError("VIOLET_APP_ID", "must be a positive integer (ASCII digits)")
    kwargs: dict[str, Any] = {
        "username": env.get("VIOLET_USERNAME") or None,
        "password": env.get("VIOLET_PASSWORD") or None,
        "token": env.get("VIOLET_TOKEN") or None,
        "refresh_token": env.get("VIOLET_REFRESH_TOKEN") or None,
        "base_url": env.get("VIOLET_BASE_URL") or None,
        # A proxy only when asked: proxy settings meant for other programs are ignored.
        "proxy": env.get("VIOLET_PROXY") or None,
    }
    keep = env.get("VIOLET_KEEP_CANCELLED_SENDS", "").strip().lower()
    if keep not in _FLAG_VALUES:
        raise RequestValidationError(
            "VIOLET_KEEP_CANCELLED_SENDS", "must be one of 1, true, yes, on, 0, false, no, off"
        )
    kwargs["keep_cancelled_sends"] = _FLAG_VALUES[keep]
    env_name = (env.get("VIOLET_ENV") or "sandbox").strip().lower()
    if env_name not in ("sandbox", "production"):
        raise RequestValidationError("VIOLET_ENV", "must be 'sandbox' or 'production'")
    kwargs["environment"] = Environment[env_name.upper()]
    return int(raw_id), required("VIOLET_APP_SECRET"), kwargs
