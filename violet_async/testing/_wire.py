"""What FakeViolet's answers look like on the wire: Violet's JSON error body, the
gateways' non-JSON error pages, Spring pages, the ``Date`` header, the base URL."""

from __future__ import annotations

import ipaddress
import math
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

from ._faults import Fault, ServerQuirks
from ._state import RuleViolation

__all__ = ["client_host", "gateway_response", "http_date", "json_response", "page", "violet_error"]

_ENVOY_503 = (
    "upstream connect error or disconnect/reset before headers. "
    "reset reason: connection termination"
)
_CLOUDFLARE_524 = (
    "<!DOCTYPE html>\n<html><head><title>sandbox-api.violet.io | 524: A timeout occurred"
    '</title></head><body><div id="cf-error-details"><h1>A timeout occurred</h1>'
    "<span>Error code 524</span><p>The origin web server timed out responding to this "
    "request.</p></div></body></html>"
)
#: A gateway's answer per fault: status, content type, body. Never JSON.
_GATEWAY: dict[Fault, tuple[int, str, str]] = {
    Fault.HTTP_502: (502, "text/plain", "Bad Gateway"),
    Fault.HTTP_503: (503, "text/plain", _ENVOY_503),
    Fault.HTTP_504: (504, "text/plain", "upstream request timeout"),
    Fault.HTML_502: (502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
    Fault.LATE_COMMIT: (504, "text/plain", "upstream request timeout"),
    Fault.TIMEOUT_THEN_COMMIT: (504, "text/plain", "upstream request timeout"),
    Fault.HTTP_502_AFTER_COMMIT: (502, "text/plain", "Bad Gateway"),
    Fault.HTTP_503_AFTER_COMMIT: (503, "text/plain", _ENVOY_503),
    Fault.HTTP_504_AFTER_COMMIT: (504, "text/plain", "upstream request timeout"),
    Fault.HTTP_524_AFTER_COMMIT: (524, "text/html", _CLOUDFLARE_524),
}
GATEWAY_FAULTS = frozenset(_GATEWAY)


def gateway_response(fault: Fault) -> web.Response:
    """The error page a gateway in front of Violet would send for ``fault``."""
    status, content_type, body = _GATEWAY[fault]
    reason = "A timeout occurred" if status == 524 else None  # not in http.HTTPStatus
    return web.Response(status=status, reason=reason, text=body, content_type=content_type)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def violet_error(status: int, message: str, error_code: int, now: float) -> web.Response:
    """Violet's own error body, ``now`` being the server's Unix time."""
    body = {
        "status": status,
        "message": message,
        "error_code": error_code,
        "timestamp": int(now * 1000),
    }
    return json_response(body, status=status)


def http_date(now: float) -> str:
    """RFC 7231's IMF-fixdate, e.g. ``Tue, 07 Nov 2023 10:31:56 GMT``."""
    return formatdate(now, usegmt=True)


def _query_int(request: web.Request, name: str, default: int, minimum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RuleViolation(400, f"{name} must be an integer", 4008) from None
    if value < minimum:
        raise RuleViolation(400, f"{name} must be >= {minimum}", 4008)
    return value


def page(items: list[Any], request: web.Request, quirks: ServerQuirks) -> dict[str, Any]:
    """A Spring page of ``items`` for the request's ``page`` / ``size`` parameters
    (``size`` capped at ``quirks.page_size``), with snake_case or camelCase keys."""
    cap = quirks.page_size
    assert cap is not None
    number = _query_int(request, "page", 0, 0)
    size = min(_query_int(request, "size", cap, 1), cap)
    content = items[number * size : (number + 1) * size]
    total_pages = math.ceil(len(items) / size)
    camel = quirks.page_keys == "camel"
    return {
        "content": content,
        "number": number,
        "size": size,
        "totalPages" if camel else "total_pages": total_pages,
        "totalElements" if camel else "total_elements": len(items),
        "numberOfElements" if camel else "number_of_elements": len(content),
        "first": number == 0,
        "last": number >= total_pages - 1,
        "empty": not content,
    }


def client_host(host: str) -> str:
    """The host part of the base URL a client should use for a server bound to
    ``host``: IPv6 literals in brackets, and the loopback address of the same family
    for a wildcard bind (the SDK refuses plain http to anything but loopback)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name such as "localhost"
    if address.is_unspecified:
        return "[::1]" if address.version == 6 else "127.0.0.1"
    return f"[{host}]" if address.version == 6 else host
