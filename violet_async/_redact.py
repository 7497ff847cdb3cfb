"""One redaction of the client's own secrets, applied to every error before it is built.

A server can echo what it was sent: a login 400 quoting the request body, a gateway's
502 page listing the request headers. Whatever an error keeps (message, body, headers)
passes through :class:`Redactor` first, so the app secret, the password and the tokens
cannot reach a log line, an ``--output`` file or a journal through an error.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import quote, quote_plus

__all__ = ["REDACTED", "Redactor", "has_control_character", "printable"]

REDACTED = "[REDACTED]"

#: C0 controls and DEL: never valid in a header value (CR/LF would split the header).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control_character(value: str) -> bool:
    return _CONTROL.search(value) is not None


def printable(value: object) -> str:
    """``value`` as text safe for a terminal or a log line: every character that is not
    printable (ESC, CR, LF, BEL, C1 controls such as CSI, bidi overrides, ...) is
    written as its escape (``\\x1b``, ``\\u202e``). What a server or an input file
    says goes through this before anything prints or logs it: an ESC sequence could
    forge a line, move the cursor or write the clipboard (OSC 52)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _forms(secret: str) -> set[str]:
    """The spellings a secret takes when a server echoes it: as it is, inside a JSON
    string (both the minimal and the ASCII-only escaping), and URL-encoded."""
    return {
        secret,
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1],
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
    }


class Redactor:
    """Replaces every known secret with ``[REDACTED]`` in text, bytes and headers.

    ``secrets`` is called at each redaction (errors are rare, and tokens change as the
    client logs in and refreshes), so a redactor built once stays current. Matching
    ignores case so that ``%2f`` and ``\\u00E9`` spellings are caught too; redacting a
    differently-cased word is the safe way to be wrong.
    """

    __slots__ = ("_extra", "_secrets")

    def __init__(
        self,
        secrets: Callable[[], Iterable[str | None]] | None = None,
        extra: Iterable[str | None] = (),
    ) -> None:
        self._secrets = secrets
        self._extra = tuple(s for s in extra if s)

    def __repr__(self) -> str:
        return "<Redactor>"

    def with_secrets(self, *values: str | None) -> Redactor:
        """A redactor that also hides ``values`` (the secrets of one request)."""
        return Redactor(self._secrets, (*self._extra, *(v for v in values if v)))

    def _forms(self) -> set[str]:
        values = list(self._extra)
        if self._secrets is not None:
            values.extend(s for s in self._secrets() if s)
        return {form for value in values for form in _forms(value) if form}

    def _pattern(self) -> re.Pattern[str] | None:
        forms = self._forms()
        if not forms:
            return None
        # Longest first, so a secret that contains another is replaced whole.
        alternatives = sorted(forms, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, alternatives)), re.IGNORECASE)

    def text(self, value: str) -> str:
        pattern = self._pattern()
        return value if pattern is None else pattern.sub(REDACTED, value)

    def bytes(self, value: bytes) -> bytes:
        pattern = self._pattern()
        if pattern is None or not value:
            return value
        # surrogateescape keeps bytes that are not UTF-8 exactly as they were.
        text = value.decode("utf-8", "surrogateescape")
        return pattern.sub(REDACTED, text).encode("utf-8", "surrogateescape")

    def preview(self, value: builtins.bytes, limit: int) -> str:
        """The first ``limit`` characters of ``value`` as text, redacted **before** it
        is cut (a cut first would leave the start of a secret that straddles it), and
        with a tail that begins a secret dropped (``value`` may itself be the first
        bytes of a longer body, ending inside one)."""
        text = value.decode("utf-8", "replace")
        pattern = self._pattern()
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        text = text[:limit]
        forms = self._forms()
        return text[: len(text) - _secret_tail(text, forms)] if forms else text

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        pattern = self._pattern()
        if pattern is None:
            return dict(headers)
        return {
            pattern.sub(REDACTED, key): pattern.sub(REDACTED, value)
            for key, value in headers.items()
        }


def _secret_tail(text: str, forms: Iterable[str]) -> int:
    """How many characters at the end of ``text`` are the start of a secret (0: none)."""
    lowered = text.lower()
    if not lowered:
        return 0
    last = lowered[-1]
    longest = 0
    for form in forms:
        start = form.lower()
        for size in range(min(len(start), len(lowered)), longest, -1):
            if start[size - 1] == last and lowered.endswith(start[:size]):
                longest = size
                break
    return longest
