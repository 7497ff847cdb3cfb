"""One redaction of the client's own secrets, applied to every error before it is built.

A server can echo what it was sent: a login 400 quoting the request body, a gateway's
502 page listing the request headers. Whatever an error keeps (message, body, headers)
passes through :class:`Redactor` first, so the app secret, the password and the tokens
cannot reach a log line, an ``--output`` file or a journal through an error.
"""

from __future__ import annotations

import builtins
import functools
import html
import json
import re
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import quote, quote_plus

__all__ = ["REDACTED", "Redactor", "has_control_character", "printable", "printable_json"]

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


def printable_json(data: bytes) -> str:
    """JSON text (as ``orjson.dumps`` writes it) with every character that is not
    printable written as a ``\\uXXXX`` escape (a surrogate pair above U+FFFF): JSON
    escapes only C0 controls, so DEL, C1 controls and bidi overrides would reach a
    terminal raw. Such characters can only be inside strings; the JSON means the
    same once parsed."""
    text = data.decode()
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _json_escape(char) for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _forms(secret: str) -> set[str]:
    """Common whole spellings of a secret (as it is, inside a JSON string, HTML-escaped,
    URL-encoded): what a preview's cut tail is compared with. Redaction itself matches
    every spelling, character by character (:func:`_spelled`)."""
    ascii_json = json.dumps(secret)[1:-1]
    return {
        secret,
        json.dumps(secret, ensure_ascii=False)[1:-1],
        ascii_json,
        ascii_json.replace("/", "\\/"),
        _html_safe(ascii_json),
        html.escape(secret),
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
    }


def _html_safe(text: str) -> str:
    """``text`` with the characters an HTML-safe JSON writer escapes (Gson's default)."""
    for char in "<>&='":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


#: A character that begins an escape of another (JSON, URL, HTML; ``+`` a space).
_ESCAPES = re.compile(r"[\\\\%&+]")
#: The same without ``+``: a space's spelling only, so a text whose only such character
#: is ``+`` (a date's ``+0000``) holds a secret without a space in no other spelling.
_ESCAPES_BUT_PLUS = re.compile(r"[\\\\%&]")
#: One backslash, or up to 63 more: a JSON string quoted inside another doubles the
#: backslashes before an escape and adds one (k quotings: 2**k - 1; six quotings: 63).
#: Bounded, so a body that is a long run of backslashes costs a fixed number of steps
#: at each position (``\\+`` retried the whole run at each position: quadratic, 32 KB
#: took ~50 s); every escape of one character shares one run (``_char``), so a position
#: costs one scan of at most 64 backslashes, not one per escape. A longer run still has
#: its last 64 backslashes and the escape after them matched.
_MOST = 64
_BACKSLASHES = rf"\\{{1,{_MOST}}}"
#: The backslashes before an escape in a JSON string that was itself URL-encoded
#: (``%5Cu20ac``, ``%255C``), and the one a secret's first character takes of a run.
_ESCAPE_RUN = rf"(?:{_BACKSLASHES}|(?:%(?:25)?5c){{1,{_MOST}}})"
_FIRST_RUN = r"(?:\\|%(?:25)?5c)"
#: JSON's two-character escapes.
_SHORT = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t", "/": "/", '"': '"'}
#: HTML's named references (and the ampersand that begins any reference, itself in any
#: spelling: raw, JSON-escaped, URL-encoded).
_NAMED = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "apos"}
_AMP = rf"(?:&|{_BACKSLASHES}u0026|%(?:25)?26)"
_FIRST_AMP = r"(?:&|\\u0026|%(?:25)?26)"


def _char(char: str, *, bare: bool = True, first: bool = False) -> str:
    """A regex for one character of a secret in any spelling a server's echo gives it:
    itself; a JSON / JavaScript escape (``\\u0026``, ``\\x26``, ``\\/``, behind one to
    64 backslashes); URL-encoded (``%26``, twice: ``%2526``; ``+`` for a space);
    an HTML character reference (``&amp;``, ``&#38;``, ``&#x26;``)."""
    return "(?:" + "|".join(_char_spellings(char, bare=bare, first=first)) + ")"


def _char_spellings(char: str, *, bare: bool = True, first: bool = False) -> list[str]:
    """The alternatives of :func:`_char`, one regex each."""
    code = ord(char)
    alternatives = [re.escape(char)]
    # What follows the backslashes of each JSON / JavaScript escape of ``char``: one
    # run of backslashes, then any of them (a run scanned once, not once per escape).
    tails = []
    if code <= 0xFFFF:
        tails.append(f"u{code:04x}")
    else:
        high, low = divmod(code - 0x10000, 0x400)
        tails.append(rf"u{0xD800 + high:04x}{_BACKSLASHES}u{0xDC00 + low:04x}")
        tails.append(f"U{code:08x}")
    if code <= 0xFF:
        tails.append(f"x{code:02x}")
    if char in _SHORT:
        short = _SHORT[char]
        tails.append(re.escape(short))
        if short == char:
            # ``\"`` in a JSON string itself URL-encoded (``%5C%22``) or written into
            # HTML (``\&quot;``): the escaped character in those spellings.
            named = f"|{_NAMED[char]}" if char in _NAMED else ""
            tails.append(f"%(?:25)?{code:02x}|&(?:#0*{code}|#x0*{code:x}{named});")
    # A secret's first character needs only the last backslash of its run (a match may
    # begin there; the rest of the run is no part of the secret), so a start costs no
    # scan of 64 (a body of 64-backslash runs: 64 such scans a character).
    alternatives.append((_FIRST_RUN if first else _ESCAPE_RUN) + "(?:" + "|".join(tails) + ")")
    if char == "\\" and bare:
        alternatives.append(_BACKSLASHES)
    alternatives.append("".join(f"%(?:25)?{byte:02x}" for byte in char.encode()))
    if char == " ":
        alternatives.append(r"\+")
    named = f"|{_NAMED[char]}" if char in _NAMED else ""
    amp = _FIRST_AMP if first else _AMP
    alternatives.append(rf"{amp}(?:#0*{code}|#x0*{code:x}{named});")
    return alternatives


def _spelled(secret: str) -> str:
    """A regex for ``secret`` in every spelling of each of its characters.

    A run of ``m`` backslashes in the secret is one bounded run of ``m`` to ``64m``
    backslashes (each escaped up to six times) or each of them in another spelling:
    ``m`` backslash patterns one after another would retry every split of a long run
    (exponential in ``m``)."""
    parts: list[str] = []
    for run in re.findall(r"\\+|[^\\]", secret):
        if run[0] != "\\":
            parts.append(_char(run, first=not parts))
            continue
        size = len(run)
        each = "".join(_char("\\", bare=False) for _ in run)
        most = size if not parts else _MOST * size  # at the start: its last ``size``
        parts.append(rf"(?:\\{{{size},{most}}}|(?:%(?:25)?5c){{{size},{most}}}|{each})")
    return "".join(parts)


def _guard(secrets: Iterable[str]) -> str:
    """A lookahead refusing a start deep inside a run of backslashes: a secret's first
    character takes one backslash of a run (its last), a secret that begins with ``m``
    backslashes takes ``m`` and the escape of the character after them at most 64, so
    a start further from the end of a run cannot match, and one check there spares
    every alternative its own try (a body of backslashes costs a few steps a
    character, not a few hundred)."""
    leading = max((len(s) - len(s.lstrip("\\")) for s in secrets), default=0)
    return rf"(?!\\{{{leading + _MOST + 1 if leading else 2}}})"


def _plain(values: tuple[str, ...]) -> re.Pattern[str]:
    """The secrets as they are, longest first (a secret that contains another is
    replaced whole)."""
    alternatives = sorted(set(values), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives)), re.IGNORECASE)


def _every_spelling(values: tuple[str, ...]) -> re.Pattern[str]:
    """The secrets in every spelling of each character (:func:`_spelled`), longest
    first."""
    alternatives = sorted(set(values), key=len, reverse=True)
    return re.compile(
        _guard(alternatives) + "(?:" + "|".join(map(_spelled, alternatives)) + ")",
        re.IGNORECASE,
    )


class Redactor:
    """Replaces every known secret with ``[REDACTED]`` in text, bytes and headers.

    ``secrets`` is called at each redaction (errors are rare, and tokens change as the
    client logs in and refreshes), so a redactor built once stays current. Matching
    ignores case so that ``%2f`` and ``\\u00E9`` spellings are caught too; redacting a
    differently-cased word is the safe way to be wrong.
    """

    __slots__ = ("_compiled", "_extra", "_secrets")

    def __init__(
        self,
        secrets: Callable[[], Iterable[str | None]] | None = None,
        extra: Iterable[str | None] = (),
    ) -> None:
        self._secrets = secrets
        self._extra = tuple(s for s in extra if s)
        #: The secrets, their plain pattern, the characters that make a text need
        #: every spelling, and that pattern once a text has needed it.
        self._compiled: (
            tuple[tuple[str, ...], re.Pattern[str], re.Pattern[str], re.Pattern[str] | None] | None
        ) = None

    def __repr__(self) -> str:
        return "<Redactor>"

    def with_secrets(self, *values: str | None) -> Redactor:
        """A redactor that also hides ``values`` (the secrets of one request)."""
        return Redactor(self._secrets, (*self._extra, *(v for v in values if v)))

    def _values(self) -> tuple[str, ...]:
        values = list(self._extra)
        if self._secrets is not None:
            values.extend(s for s in self._secrets() if s)
        return tuple(values)

    def _forms(self) -> set[str]:
        return {form for value in self._values() for form in _forms(value) if form}

    def _pattern(self, text: str) -> re.Pattern[str] | None:
        """The pattern for ``text``: every spelling of every secret; or, for a text
        with no character that begins an escape (``\\``, ``%``, ``&``; ``+`` where a
        secret has a space), the secrets as they are (matching that is several times
        faster)."""
        values = self._values()
        if not values:
            return None
        compiled = self._compiled
        if compiled is None or compiled[0] != values:
            escapes = _ESCAPES if any(" " in value for value in values) else _ESCAPES_BUT_PLUS
            compiled = self._compiled = (values, _plain(values), escapes, None)
        if compiled[2].search(text) is None:
            return compiled[1]
        if compiled[3] is None:
            # Built on the first text that needs it: a large pattern (every spelling of
            # every character), whose compiling costs far more than most redactions.
            compiled = self._compiled = (*compiled[:3], _every_spelling(values))
        return compiled[3]

    def text(self, value: str) -> str:
        pattern = self._pattern(value)
        return value if pattern is None else pattern.sub(REDACTED, value)

    def bytes(self, value: bytes) -> bytes:
        if not value:
            return value
        # surrogateescape keeps bytes that are not UTF-8 exactly as they were.
        text = value.decode("utf-8", "surrogateescape")
        pattern = self._pattern(text)
        if pattern is None:
            return value
        return pattern.sub(REDACTED, text).encode("utf-8", "surrogateescape")

    def preview(self, value: builtins.bytes, limit: int) -> str:
        """The first ``limit`` characters of ``value`` as text, redacted **before** it
        is cut (a cut first would leave the start of a secret that straddles it), and
        with a tail that begins a secret dropped (``value`` may itself be the first
        bytes of a longer body, ending inside one)."""
        text = value.decode("utf-8", "replace")
        pattern = self._pattern(text)
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        text = text[:limit]
        values = self._values()
        if not values:
            return text
        cut = max(_secret_tail(text, self._forms()), _spelled_tail(text, values))
        return text[: len(text) - cut]

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {self.text(key): self.text(value) for key, value in headers.items()}


#: The longest one character of a secret can be spelled: a run of 64 ``%255c`` and a
#: reference (``%2526#x10ffff;``) or a surrogate pair.
_LONGEST_CHAR = 5 * _MOST + 24
#: A run of backslashes (or their URL-encoded spellings) that an escape may follow; and
#: the unfinished start of one ``%255c`` / ``%5c``.
_RUN = re.compile(rf"(?:\\|%(?:25)?5c){{1,{_MOST}}}", re.IGNORECASE)
_RUN_START = re.compile(r"%(?:2(?:55?)?|5)?", re.IGNORECASE)


def _spelled_tail(text: str, secrets: Iterable[str]) -> int:
    """How many characters at the end of ``text`` begin a secret in any spelling the
    redactor matches (``s3cr\\\\u0026`` of ``s3cr&t``: a string quoted twice, cut
    inside its secret), each character whole or, the last one, begun (0: none).

    :func:`_secret_tail` knows a secret's common whole spellings only; this walks the
    secret a character at a time from each place near the end where one could begin."""
    longest = 0
    for secret in secrets:
        chars = [_char_patterns(c, first=n == 0) for n, c in enumerate(secret)]
        lowest = max(0, len(text) - _LONGEST_CHAR * len(secret))
        for start in range(lowest, len(text) - longest):
            if _begins(text, start, secret, chars):
                longest = len(text) - start
                break
    return longest


@functools.lru_cache(maxsize=4096)
def _char_patterns(char: str, *, first: bool) -> tuple[re.Pattern[str], ...]:
    """:func:`_char_spellings` of ``char``, each compiled (the same for every text)."""
    return tuple(re.compile(one, re.IGNORECASE) for one in _char_spellings(char, first=first))


def _begins(text: str, start: int, secret: str, chars: list[tuple[re.Pattern[str], ...]]) -> bool:
    """Whether ``text[start:]`` is a proper beginning of ``secret`` in some spelling:
    every way each character may be spelled is followed (``&#38;`` is ``&`` spelled
    as itself, then ``#38;``, or ``&`` as a reference), each place once."""
    todo = [(0, start)]
    seen = set(todo)
    while todo:
        index, at = todo.pop()
        if index == len(secret):
            continue  # the whole secret: the redaction before the cut replaced it
        # The end, or an unfinished spelling of this character.
        if len(text) - at <= _LONGEST_CHAR and _could_begin(secret[index], text[at:]):
            return True
        for pattern in chars[index]:
            found = pattern.match(text, at)
            if found is not None and found.end() > at:
                state = (index + 1, found.end())
                if state not in seen:
                    seen.add(state)
                    todo.append(state)
    return False


def _could_begin(char: str, rest: str) -> bool:
    """Whether ``rest`` (the end of a text) is empty or an unfinished spelling of
    ``char``."""
    if not rest:
        return True
    if rest[0] not in "\\%&":
        return False  # every unfinished spelling below begins with one of these
    lowered = rest.lower()
    run = _RUN.match(lowered)
    if run is not None:
        after = lowered[run.end() :]
        return (
            not after
            or _RUN_START.fullmatch(after) is not None
            or any(tail.startswith(after) for tail in _escape_tails(char))
        )
    if _RUN_START.fullmatch(lowered) is not None:
        return True
    return any(spelling.startswith(lowered) for spelling in _bare_spellings(char))


@functools.lru_cache(maxsize=4096)
def _escape_tails(char: str) -> tuple[str, ...]:
    """What follows the backslashes of each escape of ``char`` (lowercase)."""
    code = ord(char)
    if code <= 0xFFFF:
        tails = [f"u{code:04x}"]
    else:
        high, low = divmod(code - 0x10000, 0x400)
        tails = [f"u{0xD800 + high:04x}\\u{0xDC00 + low:04x}", f"u{code:08x}"]
    if code <= 0xFF:
        tails.append(f"x{code:02x}")
    if char in _SHORT:
        tails.append(_SHORT[char].lower())
        if _SHORT[char] == char:
            tails += [f"%{code:02x}", f"%25{code:02x}", *_references(char, ("&",))]
    tails += [f"u0026{ref[1:]}" for ref in _references(char, ("&",))]
    return tuple(tails)


@functools.lru_cache(maxsize=4096)
def _bare_spellings(char: str) -> tuple[str, ...]:
    """The spellings of ``char`` that begin with no backslash (lowercase)."""
    encoded = char.encode()
    return (
        "".join(f"%{byte:02x}" for byte in encoded),
        "".join(f"%25{byte:02x}" for byte in encoded),
        *_references(char, ("&", "%26", "%2526")),
    )


def _references(char: str, amps: tuple[str, ...]) -> list[str]:
    code = ord(char)
    names = [f"#{code};", f"#x{code:x};"]
    if char in _NAMED:
        names.append(f"{_NAMED[char]};")
    return [amp + name for amp in amps for name in names]


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
