"""Redaction of secrets echoed deep inside quotings and inside other encodings."""

from __future__ import annotations

import html
import json
from urllib.parse import quote, quote_plus

import pytest

from violet_async._redact import REDACTED, Redactor

SECRET = 'pa"ss\\w\u20acrd-9'


def _quoted(text: str, times: int) -> str:
    for _ in range(times):
        text = json.dumps(text)[1:-1]
    return text


@pytest.mark.parametrize("times", range(6))
@pytest.mark.parametrize("before", ["", "C:\\", '"', "x "])
def test_a_secret_quoted_up_to_six_times_is_redacted(times: int, before: str) -> None:
    """The echo of a JSON body (one quoting) quoted up to five times more: 63
    backslashes before the secret's ``"`` in its middle, 64 before its ``\\``."""
    body = _quoted(json.dumps({"k": before + SECRET}), times)
    redacted = Redactor(lambda: [SECRET]).text(f"upstream said: {body}")
    assert REDACTED in redacted
    assert "rd-9" not in redacted
    assert "ss" not in redacted


@pytest.mark.parametrize(
    "spell",
    [quote, quote_plus, lambda t: quote(quote(t)), html.escape],
    ids=["url", "plus", "url2", "html"],
)
@pytest.mark.parametrize("times", [0, 1, 2])
def test_a_json_echo_url_encoded_or_in_html_is_redacted(spell: object, times: int) -> None:
    """``%5Cu20ac``, ``%5C%22`` and ``\\&quot;``: JSON escapes inside a URL or HTML."""
    body = spell(_quoted(json.dumps({"k": SECRET}), times))  # type: ignore[operator]
    redacted = Redactor(lambda: [SECRET]).text(f"x {body} y")
    assert "rd-9" not in redacted
    assert "ss" not in redacted


def test_a_body_of_64_backslash_runs_is_redacted_and_keeps_its_length() -> None:
    """Runs just short of the guard at every position: each is scanned a fixed number
    of times (a 4 MiB such body takes ~0.1 s; benchmarked, not timed here)."""
    body = ("\\" * 64 + "x") * 2_000 + _quoted(json.dumps(SECRET), 5)
    redacted = Redactor(lambda: [SECRET]).text(body)
    assert redacted.startswith(("\\" * 64 + "x") * 2_000)
    assert REDACTED in redacted[-200:]
    assert "rd-9" not in redacted


def test_one_redactor_builds_every_spelling_only_when_a_text_needs_it() -> None:
    """A text with no escape character is matched by the secrets as they are; the same
    redactor then meets a text with one (URL-encoded, JSON-escaped, HTML) and still
    redacts every spelling; a changed secret is matched in every spelling at once."""
    secrets = [SECRET]
    redactor = Redactor(lambda: secrets)
    assert redactor.text(f"plain {SECRET} echo") == f"plain {REDACTED} echo"
    for spelled in (quote(SECRET), json.dumps(SECRET)[1:-1], html.escape(SECRET)):
        assert redactor.text(f"said: {spelled}!") == f"said: {REDACTED}!"
    secrets[0] = "n3w&t0ken"
    assert redactor.text(f"x {quote('n3w&t0ken')} y") == f"x {REDACTED} y"
    assert redactor.text("x n3w&t0ken y") == f"x {REDACTED} y"
    assert redactor.text(f"x {quote(SECRET)} y") == f"x {quote(SECRET)} y"


@pytest.mark.parametrize("secret", ["s3cr+t", "two words", "a+b c"])
def test_a_text_whose_only_escape_character_is_a_plus_still_hides_every_secret(
    secret: str,
) -> None:
    """A body whose only escape-like character is a date's ``+0000`` is matched by the
    secrets as they are unless a secret has a space (whose spelling ``+`` is): a secret
    with a ``+`` as itself, and a space spelled ``+``, are both redacted."""
    redactor = Redactor(lambda: [secret])
    dated = '{"date_created":"2025-06-15T15:02:29+0000","echo":"%s"}'
    assert redactor.text(dated % secret) == dated % REDACTED
    assert redactor.text(dated % secret.replace(" ", "+")) == dated % REDACTED
    assert redactor.text(dated % secret.upper()) == dated % REDACTED
