"""`violet-async refund FILE` and `violet-async cancel FILE`: the batch command line.

Input, output and exit codes are described in `HELP` (shown by `--help`); README's
"Batch refunds and cancels" walks through a whole run.
"""

from __future__ import annotations

import asyncio
import csv
import difflib
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import orjson

from ._client import Environment, VioletClient
from ._config import shown_url
from ._converter import converter, encode_request
from ._engine import AUTH_PATHS, never_reached
from ._files import UnsafeFileError, narrow_to_owner, open_owned
from ._journal import Journal, JournalLockedError, JournalMismatchError
from ._journal_index import RepeatCounter, known_key
from ._redact import Redactor, printable
from ._retry import RetryPolicy
from ._signals import on_signals
from ._transport import Timeouts
from .batch import (
    CLEAN_OUTCOMES,
    BatchItem,
    BatchResult,
    DryRun,
    Kind,
    journal_scope,
    run_batch,
)
from .exceptions import (
    APIError,
    AuthenticationError,
    RateLimitError,
    RequestValidationError,
    VioletError,
)
from .models import CancelBagRequest, RefundBagRequest, ShippingRefund, SkuRefund
from .models._validators import check_id

__all__ = ["HELP", "BatchOptions", "RowError", "read_items", "run_file"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_TRUE, _FALSE = {"true", "1", "yes", "y"}, {"false", "0", "no", "n"}
#: Rows of the plan a dry run prints, and problem rows the summary names.
PLAN_ROWS, PROBLEM_ROWS = 20, 10

_COMMON = ("order_id", "bag_id", "merchant_id", "reason", "restock_items", "notify_customer")
COLUMNS: dict[str, frozenset[str]] = {
    "refund": frozenset((*_COMMON, "amount_refunded", "shipping_amount", "skus")),
    "cancel": frozenset((*_COMMON, "reason_code")),
}
#: JSON lines may also give shipping as an object.
_JSON_ONLY = {"refund": frozenset({"shipping"}), "cancel": frozenset()}

HELP = """\
FILE is CSV with a header row, or JSON lines (.jsonl / .ndjson / .json), one request a row.

columns (anything else is refused, naming the column; nothing is sent):
  refund   order_id, bag_id, amount_refunded (cents, or "full" for the whole bag),
           reason, restock_items, notify_customer, shipping_amount (JSON: shipping
           {"amount": N} too), skus (a JSON list of {order_sku_id, quantity_refunded,
           amount_refunded})
  cancel   order_id, bag_id, reason_code (OTHER CUSTOMER INVENTORY FRAUD DECLINED),
           reason, restock_items, notify_customer
  merchant_id (optional, either kind): the bag's merchant, so its rows are paced by
  that merchant's limit from the first 429 on (without it, the merchant is read from
  the order once a 429 has been seen). Not sent; not part of a row's identity.
  An empty cell or JSON null is "not given": Violet's default applies. An empty
  amount_refunded is refused (unless skus are given or --full-refunds): a whole-bag
  refund must say "full".

Every row is checked (ids, amounts, enums, lengths) before anything is sent; --dry-run
lists every problem with its line, then the plan's totals. Each bag's refunds are read
before its send: a row the bag already shows, that no journal entry accounts for, is
reported already_present and not sent. The journal knows rows by content: after
fixing a row, run the same command again; only the fixed row is new. A fixed row that
asks the same money (amount, shipping, skus) of a bag as an earlier run's done row this
file no longer holds is not sent (already_present; --allow-repeat sends it). An earlier
run's row left open, on a bag no row here names, is read back (never sent) and listed.

environment:
  VIOLET_APP_ID, VIOLET_APP_SECRET   your app (required)
  VIOLET_USERNAME, VIOLET_PASSWORD   log in (or VIOLET_TOKEN, VIOLET_REFRESH_TOKEN)
  VIOLET_ENV                         sandbox (default) or production
  VIOLET_BASE_URL                    another Violet, e.g. `violet-async fake-server`
  VIOLET_PROXY                       an http:// proxy to reach Violet through

exit codes:
  0    every row succeeded or was already done
  1    some row failed, is unknown (may have applied: run again to resolve it),
       already_failed, already_present or not_sent; or an earlier run's row this
       file no longer holds (edited or removed) may have applied and is unresolved
  2    bad input or configuration, journal in use, credentials refused, Violet
       unreachable (nothing marked failed that never reached Violet)
  130  interrupted (Ctrl-C): run the same command again to finish
"""


class RowError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


# -- reading and checking rows ------------------------------------------------


def _id_field(row: dict[str, Any], name: str) -> int:
    value = row.get(name)
    if value is None or value == "":
        raise RequestValidationError(name, "is required")
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise RequestValidationError(name, f"must be a positive whole number, got {value!r}")
        value = int(text)
    return check_id(name, value)


def _int_field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise RequestValidationError(name, f"must be a whole number of cents, got {value!r}")
        return int(text)
    return value  # JSON values go to the model's own validation (floats are refused)


def _bool_field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "":
            return None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise RequestValidationError(name, f"must be true or false, got {value!r}")
    return value


def _text_field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    return None if value == "" else value


def _skus(row: dict[str, Any]) -> Any:
    value = row.get("skus")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RequestValidationError("skus", "must be a JSON list") from None
        repeated = _repeated_key(text, value) if isinstance(text := row["skus"], str) else None
        if repeated is not None:
            raise RequestValidationError("skus", f"field {repeated!r} named twice in one object")
    if not isinstance(value, list):
        raise RequestValidationError("skus", "must be a list")
    skus = []
    for index, sku in enumerate(value):
        if not isinstance(sku, dict):
            raise RequestValidationError(f"skus[{index}]", "must be an object")
        unknown = set(sku) - {"order_sku_id", "quantity_refunded", "amount_refunded"}
        if unknown:
            raise RequestValidationError(f"skus[{index}]", f"unknown fields {sorted(unknown)}")
        skus.append(SkuRefund(**sku))
    return skus


def _amount(row: dict[str, Any], skus: Any, *, full_refunds: bool) -> int | None:
    """The row's amount_refunded; None only for a whole-bag refund the row (or the
    --full-refunds flag) asks for, or a refund of SKU lines."""
    value = row.get("amount_refunded")
    if isinstance(value, str) and value.strip().lower() == "full":
        if skus is not None:
            raise RequestValidationError(
                "amount_refunded", "is full, but skus are given: refund the lines or the bag"
            )
        return None
    amount = _int_field(row, "amount_refunded")
    if amount == 0:
        raise RequestValidationError(
            "amount_refunded",
            "is 0: a refund of 0 cents refunds nothing; give the cents to refund, or full",
        )
    if amount is None and skus is None and not full_refunds:
        raise RequestValidationError(
            "amount_refunded",
            "is empty: give the cents to refund, or full to refund the whole bag "
            "(--full-refunds makes every empty amount a whole-bag refund)",
        )
    return amount  # type: ignore[no-any-return]


def _unknown(names: set[str], kind: Kind) -> str:
    """Name unknown columns, with what they probably meant."""
    known = COLUMNS[kind] | _JSON_ONLY[kind]
    other: Kind = "cancel" if kind == "refund" else "refund"
    hints = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6) or sorted(
            k for k in known if name and (k.startswith(name) or name in k.split("_"))
        )
        if name in COLUMNS[other] | _JSON_ONLY[other]:
            hints.append(f"{name!r} is a {other} column: is this a file for `{other}`?")
        elif close:
            hints.append(f"{name!r} (did you mean {close[0]!r}?)")
        else:
            hints.append(repr(name))
    return f"unknown column(s) for `{kind}`: {', '.join(hints)}"


def _item(kind: Kind, line: int, row: dict[str, Any], *, full_refunds: bool) -> BatchItem:
    # An empty CSV cell and a JSON null both read as None, which the request models take
    # as "not given": the field is left out of the body and Violet applies its default.
    order_id = _id_field(row, "order_id")
    bag_id = _id_field(row, "bag_id")
    request: RefundBagRequest | CancelBagRequest
    if kind == "cancel":
        request = CancelBagRequest(
            reason_code=_text_field(row, "reason_code"),
            reason=_text_field(row, "reason"),
            restock_items=_bool_field(row, "restock_items"),
            notify_customer=_bool_field(row, "notify_customer"),
        )
    else:
        shipping = row.get("shipping")
        if isinstance(shipping, dict):
            unknown = set(shipping) - {"amount"}
            if unknown:
                raise RequestValidationError("shipping", f"unknown fields {sorted(unknown)}")
            shipping = ShippingRefund(**shipping)
        elif shipping is not None:
            raise RequestValidationError("shipping", 'must be an object like {"amount": 500}')
        if row.get("shipping_amount") not in (None, ""):
            if shipping is not None:
                raise RequestValidationError("shipping_amount", "and shipping are both given")
            shipping = ShippingRefund(amount=_int_field(row, "shipping_amount"))
        skus = _skus(row)
        request = RefundBagRequest(
            amount_refunded=_amount(row, skus, full_refunds=full_refunds),
            reason=_text_field(row, "reason"),
            restock_items=_bool_field(row, "restock_items"),
            notify_customer=_bool_field(row, "notify_customer"),
            shipping=shipping,
            skus=skus,
        )
    encode_request(request)  # every check a send makes, here, before anything is sent
    merchant = row.get("merchant_id")
    merchant_id = None if merchant is None or merchant == "" else _id_field(row, "merchant_id")
    return BatchItem(line, kind, order_id, bag_id, request, merchant_id)


def _rows(handle: IO[str], path: Path, kind: Kind) -> Iterator[tuple[int, Any]]:
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        known = COLUMNS[kind] | _JSON_ONLY[kind]
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                # exc.msg without the parser's position: it counts lines and columns
                # inside this one row ("line 2 column 1" for a row cut short), which
                # reads like a line of the file and is not one.
                yield number, RowError(number, f"not valid JSON ({exc.msg})")
                continue
            repeated = _repeated_key(text, row)
            if repeated is not None:
                yield number, RowError(number, f"field {repeated!r} named twice in one object")
                continue
            if isinstance(row, dict) and set(row) - known:
                yield number, RowError(number, _unknown(set(row) - known, kind))
                continue
            yield number, row
        return
    yield from _csv_rows(handle, kind)


def _keys_in(value: Any) -> int:
    """How many object keys ``value`` (a parsed JSON row) holds, at every depth."""
    if isinstance(value, dict):
        return len(value) + sum(_keys_in(v) for v in value.values() if isinstance(v, (dict, list)))
    if isinstance(value, list):
        return sum(_keys_in(v) for v in value if isinstance(v, (dict, list)))
    return 0


def _repeated_key(text: str, row: Any) -> str | None:
    """A key that a JSON object of the row names twice (the parser keeps the last
    value: the operator reads the first), or None. Every key of a JSON text is followed
    by a colon, so when the text holds no more colons than the parsed row holds keys,
    no key can repeat: only a row with colons inside its strings is parsed again."""
    if text.count(":") <= _keys_in(row):
        return None
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen and not repeated:
                repeated.append(key)
            seen.add(key)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return repeated[0] if repeated else None


def _csv_rows(handle: IO[str], kind: Kind) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(handle)
    header = reader.fieldnames or []
    problems = []
    unknown = set(header) - COLUMNS[kind]
    if unknown:
        problems.append(_unknown(unknown, kind))
    repeated = sorted(name for name, n in Counter(header).items() if n > 1)
    if repeated:
        problems.append(f"column(s) named twice: {', '.join(map(repr, repeated))}")
    missing = [name for name in ("order_id", "bag_id") if name not in header]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    if problems:
        separator = next((s for s in (";", "\t") if any(s in name for name in header)), None)
        if separator is not None:  # the other problems only follow from this one
            problems = [
                f"the header is separated by {'semicolons' if separator == ';' else 'tabs'}, "
                "not commas: save the file as CSV with commas (Excel: CSV UTF-8), or as JSON "
                f"lines (header read: {header[0]!r})"
            ]
        yield 1, RowError(1, "; ".join(problems))
        return
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            # A cell over the csv module's limit (128 KiB), a NUL byte, a quote left
            # open: nothing after it can be read with certainty.
            line = reader.line_num + 1  # the line being read when it failed
            yield line, RowError(line, f"unreadable CSV ({exc})")
            return
        # The header is line 1, so data rows are numbered as a spreadsheet shows them.
        if None in row:
            yield reader.line_num, RowError(reader.line_num, "more cells than the header")
        elif None in row.values():
            yield reader.line_num, RowError(reader.line_num, "fewer cells than the header")
        else:
            yield reader.line_num, row


def read_items(
    path: Path, kind: Kind, *, full_refunds: bool = False
) -> Iterator[BatchItem | RowError]:
    """Lazily parse and check every row; bad rows come back as RowError."""
    # utf-8-sig: a file saved by Excel starts with a byte-order mark, not part of the
    # first column's name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for line, row in _rows(handle, path, kind):
            if isinstance(row, RowError):
                yield row
                continue
            if not isinstance(row, dict):
                yield RowError(line, "must be an object")
                continue
            try:
                yield _item(kind, line, row, full_refunds=full_refunds)
            except (RequestValidationError, TypeError) as exc:
                yield RowError(line, str(exc))


def _file_id(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the plan -------------------------------------------------------------------


@attrs.define
class _Plan:
    """What a file asks for, in the totals an operator signs off."""

    rows: int = 0
    full: int = 0
    sku_only: int = 0
    amount: int = 0
    shipping: int = 0
    large: list[tuple[int, int]] = attrs.Factory(list)  # (line, cents) over LARGE_AMOUNT

    def add(self, item: BatchItem) -> None:
        request = item.request
        if isinstance(request, RefundBagRequest):
            if request.amount_refunded is not None:
                self.amount += request.amount_refunded
                if request.amount_refunded >= LARGE_AMOUNT:
                    self.large.append((item.line, request.amount_refunded))
            elif request.skus is not None:
                self.sku_only += 1
            else:
                self.full += 1
            if request.shipping is not None:
                self.shipping += request.shipping.amount
        self.rows += 1

    def write(self, kind: Kind, path: Path, out: IO[str]) -> None:
        out.write(f"plan for {path}:\n")
        out.write(f"  {kind + 's':<22} {self.rows:>10}\n")
        if kind == "refund":
            out.write(f"  {'whole-bag refunds':<22} {self.full:>10}\n")
            out.write(f"  {'refunds of SKU lines':<22} {self.sku_only:>10}\n")
            out.write(f"  {'sum of amounts':<22} {_money(self.amount):>10}  {_UNIT}\n")
            if self.shipping:
                out.write(f"  {'sum of shipping':<22} {_money(self.shipping):>10}  {_UNIT}\n")
            self.warn(out)

    def warn(self, out: IO[str]) -> None:
        """Name every row whose amount is large enough to be a typo."""
        for line, cents in self.large[:PLAN_ROWS]:
            out.write(
                f"  warning: line {line}: amount_refunded is {cents:,} cents "
                f"({_money(cents)}); amounts are in cents: check this is not a typo\n"
            )
        if len(self.large) > PLAN_ROWS:
            out.write(f"  warning: ... and {len(self.large) - PLAN_ROWS} more large amount(s)\n")


# Amounts are the order's currency in its minor unit; the file does not say which.
_UNIT = "(from cents, in each order's own currency)"
# A single refund of 10,000.00 or more is worth a second look before it is sent.
LARGE_AMOUNT = 1_000_000


def _money(cents: int) -> str:
    return f"{cents // 100:,}.{cents % 100:02d}"


def _check(kind: Kind, path: Path, err: IO[str], *, full_refunds: bool) -> _Plan | None:
    """The plan's totals, or report every bad row (with its line) and return None."""
    plan = _Plan()
    bad = 0
    for parsed in read_items(path, kind, full_refunds=full_refunds):
        if isinstance(parsed, RowError):
            err.write(printable(f"{path}:{parsed}") + "\n")
            bad += 1
        else:
            plan.add(parsed)
    if bad:
        err.write(f"violet-async: {bad} problem(s) in {path}; nothing was sent\n")
        return None
    return plan


def _print_plan(
    kind: Kind,
    path: Path,
    plan: _Plan,
    journal: Path,
    out: IO[str],
    *,
    full_refunds: bool,
    allow_repeat: bool = False,
) -> None:
    out.write(f"dry run: every row of {path} is valid; nothing was sent\n")
    shown = 0
    for item in read_items(path, kind, full_refunds=full_refunds):
        if isinstance(item, BatchItem) and shown < PLAN_ROWS:
            body = orjson.dumps(converter.unstructure(item.request)).decode()
            where = f"line {item.line}: {kind} order {item.order_id} bag {item.bag_id}"
            out.write(printable(f"  {where} {body}") + "\n")
            shown += 1
    if plan.rows > shown:
        out.write(f"  ... and {plan.rows - shown} more row(s)\n")
    plan.write(kind, path, out)
    entries = Journal.peek(journal)
    try:
        if entries:
            # Rows are numbered by repeat as the run numbers them (bounded: a counter
            # that moves to disk), and looked up in the journal one at a time.
            # A new row a run would not simply send (held for an earlier run's done
            # row of the same money, or waiting for an open one's read-back) is
            # counted and named as the run would treat it, from the journal alone.
            repeats = RepeatCounter()
            states: Counter[str] = Counter()
            dry = DryRun(entries, allow_repeat=allow_repeat)
            notes: list[str] = []
            try:
                for item in read_items(path, kind, full_refunds=full_refunds):
                    if isinstance(item, BatchItem):
                        content = item.key
                        n = repeats.take(content)
                        key = known_key(entries, entries.legacy_left, item, content, n)
                        entry = entries.get(key)
                        if entry is not None:
                            dry.own(entry)
                            states[entry.state] += 1
                            continue
                        verdict = dry.verdict(item, repeats)
                        states[verdict[0] if verdict is not None else "new"] += 1
                        if verdict is not None and len(notes) < PLAN_ROWS:
                            where = f"line {item.line}: {kind} order {item.order_id} bag"
                            notes.append(f"  {where} {item.bag_id}: {verdict[1]}")
            finally:
                repeats.close()
            summary = ", ".join(f"{states[s]} {s}" for s in sorted(states))
            out.write(printable(f"journal {journal}: {summary} (done rows are skipped)") + "\n")
            for note in notes:
                out.write(printable(note) + "\n")
    finally:
        entries.close()


# -- progress and summary ---------------------------------------------------------


class _Progress:
    """A bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def tick(self, result: BatchResult | None = None) -> None:
        if result is not None and result.earlier:
            return  # not a row of this input
        self.done += 1
        now = time.monotonic()
        if self.done != self.total and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        rate = self.done / max(now - self.started, 1e-9)
        if self.tty:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.out.write(f"\r[{bar}] {self.done}/{self.total} {rate:.0f}/s")
            if self.done == self.total:
                self.out.write("\n")
        else:
            self.out.write(f"progress {self.done}/{self.total} ({rate:.0f}/s)\n")
        self.out.flush()


@attrs.frozen
class BatchOptions:
    concurrency: int = 16
    rate: float | None = None
    journal: Path | None = None
    output: Path | None = None
    dry_run: bool = False
    retry_failed: bool = False
    allow_repeat: bool = False
    full_refunds: bool = False
    environment: str | None = None
    base_url: str | None = None
    settle_running: float = 60.0
    timeout: float = 30.0


_ORDER = (
    "succeeded",
    "already_done",
    "failed",
    "unknown",
    "not_sent",
    "already_failed",
    "already_present",
)
_ADVICE = {
    "failed": "Violet refused these (definitely not applied): fix the rows and run the "
    "same command again; rows you leave unchanged are skipped (--retry-failed re-checks "
    "each bag, then sends them again)",
    "unknown": "these may have applied: run the same command again; they are read back "
    "from the bag before anything is sent, never sent blind",
    "not_sent": "these were not applied (they never reached Violet, or the merchant's "
    "platform kept answering 429 until the run's limit): nothing is wrong with the rows; "
    "run the same command again",
    "already_present": "not sent: the bag already shows exactly this refund and no "
    "journal entry accounts for it (an earlier run with another journal, or another "
    "system), or an earlier run's row on the bag, edited since, did apply; check the "
    "bag before doing anything else with these rows",
    "already_failed": "skipped: an earlier run recorded Violet refusing these; once "
    "the cause is fixed, run the same command with --retry-failed (each bag is read "
    "first, then the row is sent again)",
}


@attrs.define
class _Tally:
    results: Counter[str] = attrs.Factory(Counter)
    errors: Counter[str] = attrs.Factory(Counter)
    problems: list[str] = attrs.Factory(list)
    problem_file: IO[str] | None = None
    reconciled: int = 0
    retries: int = 0
    sent: int = 0
    requests: int = 0
    rate_limited: int = 0
    #: Earlier runs' rows this file no longer holds, read back: what each turned out.
    earlier: list[str] = attrs.Factory(list)
    earlier_open: int = 0

    def add(self, result: BatchResult, redactor: Redactor) -> None:
        if result.earlier:
            self._add_earlier(result)
            return
        self.results[result.outcome] += 1
        self.reconciled += result.reconciled
        self.retries += result.retries
        self.sent += result.sent
        self.requests += result.requests
        self.rate_limited += result.rate_limited
        if result.outcome in CLEAN_OUTCOMES:
            return
        if result.error_class:
            self.errors[result.error_class] += 1
        item = result.item
        message = redactor.text(str(result.error)) if result.error is not None else ""
        refund = f" (refund {result.refund_id} on the bag)" if result.refund_id else ""
        text = (
            f"line {item.line}: order {item.order_id} bag {item.bag_id}: {result.outcome}"
            f"{refund}: {result.error_class or ''}{': ' if message else ''}{message}"
        )
        text = printable(text)  # Violet's messages reach a terminal and a file
        if len(self.problems) < PROBLEM_ROWS:
            self.problems.append(text)
        if self.problem_file is not None:
            self.problem_file.write(text + "\n")

    def _add_earlier(self, result: BatchResult) -> None:
        """An earlier run's row, on no bag this file's rows resolved it on, read back
        (never sent): applied, not applied, or still unresolved (the run is not clean)."""
        self.requests += result.requests
        self.rate_limited += result.rate_limited
        item = result.item
        if result.outcome == "already_done":
            said = f"applied: refund {result.refund_id} on the bag"
        elif result.outcome in ("not_sent", "failed"):
            why = "proven by read-back" if result.outcome == "not_sent" else result.error_class
            said = f"not applied ({why}); not sent, as no row of this file asks for it"
        else:
            self.earlier_open += 1
            said = (
                f"{result.outcome}: may have applied and could not be resolved; run the "
                "same command again to read it back (it is never sent)"
            )
        text = printable(
            f"line {item.line} of an earlier input: {item.kind} order {item.order_id} "
            f"bag {item.bag_id}: {said}"
        )
        self.earlier.append(text)
        if self.problem_file is not None:
            self.problem_file.write(text + "\n")

    @property
    def clean(self) -> bool:
        return not self.earlier_open and all(o in CLEAN_OUTCOMES for o in self.results)

    def write(self, elapsed: float, out: IO[str], problems_path: Path) -> None:
        results = self.results
        out.write("\nsummary\n")
        for key in _ORDER:
            out.write(f"  {key:<16} {results[key]:>8}\n")
        for name, count in sorted(self.errors.items()):
            out.write(f"    {name:<26} {count:>6}\n")
        out.write(f"  {'reconciled':<16} {self.reconciled:>8}\n")
        out.write(f"  {'retries':<16} {self.retries:>8}\n")
        rows = max(sum(results.values()), 1)
        out.write(
            f"  {'requests':<16} {self.requests:>8}  ({self.requests / rows:.2f} a row; "
            f"429s {self.rate_limited}, {self.rate_limited / rows:.2f} a row)\n"
        )
        out.write(f"  {'elapsed':<16} {elapsed:>7.1f}s\n")
        if results["succeeded"]:
            rate = results["succeeded"] / max(elapsed, 1e-9)
            out.write(f"  {'refunds/s':<16} {rate:>8.1f}  ({self.sent} sent this run)\n")
        else:  # a rate of 0.0 would read as a stalled run
            out.write(f"  {'sent':<16} {self.sent:>8}  ({self.sent} sent this run)\n")
        if self.earlier:
            out.write(
                f"\n{len(self.earlier)} row(s) of an earlier run that this file no longer "
                "holds as they were (edited or removed) were left open by that run; read "
                "back, never sent:\n"
            )
            for text in self.earlier[:PROBLEM_ROWS]:
                out.write(f"  {text}\n")
        bad = sum(results[k] for k in _ORDER if k not in CLEAN_OUTCOMES)
        if not bad:
            return
        out.write(f"\n{bad} row(s) need attention")
        out.write(f" (all of them in {problems_path}):\n" if bad > len(self.problems) else ":\n")
        for text in self.problems:
            out.write(f"  {text}\n")
        for key in _ORDER:
            if results[key] and key in _ADVICE:
                out.write(f"  {key}: {_ADVICE[key]}\n")


# -- running ----------------------------------------------------------------------


async def run_file(
    kind: Kind,
    path: Path,
    options: BatchOptions,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """The whole command: check every row, then dry-run or run, then summarize.
    ``out`` / ``err``: the streams to write to (None: ``sys.stdout`` / ``sys.stderr``
    as they are at the call, not as they were at import)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not path.is_file():  # noqa: ASYNC240 - one stat before any I/O starts
        err.write(f"violet-async: {path}: no such file\n")
        return EXIT_BAD_INPUT
    try:
        plan = _check(kind, path, err, full_refunds=options.full_refunds)
    except UnicodeDecodeError as exc:
        err.write(f"violet-async: {path}: not UTF-8 text ({exc.reason} at byte {exc.start})\n")
        return EXIT_BAD_INPUT
    if plan is None:
        return EXIT_BAD_INPUT
    journal = options.journal or path.with_name(path.name + f".{kind}.journal.jsonl")
    if options.dry_run:
        return _dry_run(
            kind,
            path,
            plan,
            journal,
            out,
            err,
            full_refunds=options.full_refunds,
            allow_repeat=options.allow_repeat,
        )
    plan.warn(err)
    overrides: dict[str, Any] = {
        "retry": RetryPolicy(settle_running=options.settle_running),
        "timeouts": Timeouts(connect=min(5.0, options.timeout), read=options.timeout),
    }
    if options.base_url:
        overrides["base_url"] = options.base_url
    if options.environment:
        overrides["environment"] = Environment[options.environment.upper()]
    try:
        client = VioletClient.from_env(**overrides)
    except RequestValidationError as exc:
        err.write(f"violet-async: configuration: {configuration_message(exc)}\n")
        return EXIT_BAD_INPUT
    try:
        log = await Journal.open(
            journal, input_id=f"{kind}:{_file_id(path)}", scope=journal_scope(client)
        )
    except (JournalLockedError, JournalMismatchError, UnsafeFileError) as exc:
        err.write(printable(f"violet-async: {exc}") + "\n")
        return EXIT_BAD_INPUT
    try:
        if log.repaired:
            out.write(f"journal {journal}: cut a torn last line ({log.repaired} bytes)\n")
        if log.input_changed:
            out.write(
                f"journal {journal}: {path} changed since this journal began; rows are "
                "matched by content: unchanged rows stay done, edited rows are new\n"
            )
        return await _execute(kind, path, plan.rows, client, log, options, out=out, err=err)
    except UnsafeFileError as exc:  # the problems file or --output: nothing was sent
        err.write(printable(f"violet-async: {exc}") + "\n")
        return EXIT_BAD_INPUT
    finally:
        await log.aclose()


def _dry_run(  # noqa: PLR0917 - one call site
    kind: Kind,
    path: Path,
    plan: _Plan,
    journal: Path,
    out: IO[str],
    err: IO[str],
    *,
    full_refunds: bool,
    allow_repeat: bool = False,
) -> int:
    try:
        _print_plan(
            kind, path, plan, journal, out, full_refunds=full_refunds, allow_repeat=allow_repeat
        )
    except UnsafeFileError as exc:  # a journal another user could have written
        err.write(printable(f"violet-async: {exc}") + "\n")
        return EXIT_BAD_INPUT
    return EXIT_OK


async def _preflight(
    client: VioletClient, path: Path, kind: Kind, err: IO[str], *, full_refunds: bool
) -> bool:
    """One cheap authenticated read before any send: refused credentials or no route to
    Violet stop the run here, with nothing sent and nothing marked failed."""
    rows = read_items(path, kind, full_refunds=full_refunds)
    first = next((i for i in rows if isinstance(i, BatchItem)), None)
    rows.close()  # type: ignore[attr-defined]
    if first is None:
        return True
    probe = client.with_options(retry=RetryPolicy(max_attempts=2, deadline=15.0))
    try:
        await probe.get_order(first.order_id)
    except VioletError as exc:
        if never_reached(exc):
            reason = _stop_reason(exc, client._shared.base_url)
            err.write(f"violet-async: {reason}; nothing was sent\n")
            return False
    return True


def _fatal(result: BatchResult, tally: _Tally) -> bool:
    """A row that never reached Violet because of the credentials, or because no
    connection could be made while no row has got through yet, stops the run. (A
    connection lost later, after the client's retries, is that row's outcome.)"""
    if result.outcome != "not_sent" or result.earlier or isinstance(result.error, RateLimitError):
        return False
    if isinstance(result.error, AuthenticationError) or _login_answered(result.error):
        return True
    return not tally.results["succeeded"]


def _login_answered(exc: BaseException | None) -> bool:
    """The login (or token renewal) was answered with an error status other than 401:
    there is no Violet API at that URL (a path without /v1, a stray character)."""
    return (
        isinstance(exc, APIError)
        and not isinstance(exc, AuthenticationError)
        and exc.path in AUTH_PATHS
    )


def configuration_message(exc: RequestValidationError) -> str:
    """A configuration error in the command line's terms: the VIOLET_* variables and
    flags an operator sets, not the Python keyword arguments behind them."""
    if exc.field in ("token", "refresh_token", "username", "password"):
        return (
            "no credentials to log in with: set VIOLET_USERNAME and VIOLET_PASSWORD "
            "(or VIOLET_TOKEN, or VIOLET_REFRESH_TOKEN)"
        )
    if exc.field == "base_url":
        if "plain http" in str(exc):
            return (
                "VIOLET_BASE_URL (or --base-url) is plain http to another machine: the "
                "app secret would cross the network in clear text; use https (plain "
                "http is accepted only for 127.0.0.1 / localhost, such as fake-server)"
            )
        return f"VIOLET_BASE_URL (or --base-url): {exc}"
    return str(exc)


def _stop_reason(exc: BaseException | None, base_url: str = "") -> str:
    if isinstance(exc, AuthenticationError):
        return (
            f"Violet refused the credentials ({printable(exc)}); check VIOLET_APP_ID, "
            "VIOLET_APP_SECRET, VIOLET_USERNAME / VIOLET_PASSWORD or VIOLET_TOKEN"
        )
    if isinstance(exc, APIError) and _login_answered(exc):
        return (
            f"the login at {printable(shown_url(base_url))!r} was answered {exc.status} "
            f"({printable(exc)}): is VIOLET_BASE_URL (or --base-url) right? Violet's API "
            f"URLs end in /v1, such as {Environment.SANDBOX.value}"
        )
    if os.environ.get("VIOLET_PROXY"):
        return (
            f"cannot reach Violet ({printable(exc)}); check VIOLET_BASE_URL / VIOLET_ENV, "
            "VIOLET_PROXY and the network"
        )
    return (
        f"cannot reach Violet ({printable(exc)}); check VIOLET_BASE_URL / VIOLET_ENV and "
        f"the network{_proxy_hint()}"
    )


# The variables other tools read for a proxy; violet-async reads only VIOLET_PROXY.
_OTHER_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _proxy_hint() -> str:
    """Behind a proxy named only by HTTPS_PROXY (read by curl and pip, never by the
    SDK), say how to use it rather than leave a bare connection error."""
    named = next((name for name in _OTHER_PROXY_VARIABLES if os.environ.get(name)), None)
    if named is None:
        return ""
    return (
        f"; {named} is set, but violet-async never reads it: to reach Violet through "
        "that proxy, set VIOLET_PROXY to its http:// URL"
    )


async def _execute(  # noqa: PLR0917 - one call site
    kind: Kind,
    path: Path,
    total: int,
    client: VioletClient,
    log: Journal,
    options: BatchOptions,
    *,
    out: IO[str],
    err: IO[str],
) -> int:
    stop = asyncio.Event()
    restore_signals = on_signals(stop.set)
    interrupted = False
    stopped: BatchResult | None = None
    tally = _Tally()
    progress = _Progress(total, out)
    started = time.monotonic()
    problems_path = log.path.with_name(log.path.name + ".problems.txt")
    sink = _open_private(options.output) if options.output else None
    try:
        tally.problem_file = _open_private(problems_path, append=False)
    except BaseException:
        if sink is not None:
            sink.close()
        raise
    # Errors are redacted where they are built; this is the second line of defence
    # for a file that outlives the run.
    redactor = Redactor(client._shared.credentials.secrets)
    try:
        async with client:
            if not await _preflight(client, path, kind, err, full_refunds=options.full_refunds):
                return EXIT_BAD_INPUT
            items = (
                i
                for i in read_items(path, kind, full_refunds=options.full_refunds)
                if isinstance(i, BatchItem)
            )
            async for result in run_batch(
                client,
                items,
                concurrency=options.concurrency,
                rate=options.rate,
                journal=log,
                retry_failed=options.retry_failed,
                allow_repeat=options.allow_repeat,
                stop=stop,
            ):
                tally.add(result, redactor)
                if stopped is None and _fatal(result, tally):
                    # Refused credentials, or no connection before anything got through:
                    # every other row would end the same way. Stop feeding; rows in
                    # flight finish.
                    stopped = result
                    stop.set()
                if sink is not None:
                    sink.write(orjson.dumps(_row_out(result, redactor)) + b"\n")
                progress.tick(result)
            interrupted = stop.is_set() and stopped is None
    finally:
        restore_signals()
        if sink is not None:
            sink.close()
        tally.problem_file.close()
        if not (tally.problems or tally.earlier):
            problems_path.unlink(missing_ok=True)
    tally.write(time.monotonic() - started, out, problems_path)
    out.write(f"journal: {log.path}\n")
    if stopped is not None:
        reason = _stop_reason(stopped.error, client._shared.base_url)
        err.write(
            f"violet-async: stopped at line {stopped.item.line}: {reason};"
            " rows that never reached Violet are not marked failed: run the same command"
            " again once this is fixed\n"
        )
        return EXIT_BAD_INPUT
    if interrupted:
        out.write("interrupted: run the same command again to finish\n")
        return EXIT_INTERRUPTED
    ended = sum(tally.results.values())
    if ended != total:
        # Never a clean exit for a run that did not account for every row.
        err.write(f"violet-async: {total - ended} row(s) ended without a result; run again\n")
        return EXIT_FAILED
    return EXIT_OK if tally.clean else EXIT_FAILED


def _open_private(path: Path, *, append: bool = True) -> Any:
    """Open ``path`` for appending (bytes) or anew (text), readable by its owner only
    (0600): results name orders and carry Violet's messages. A symlink, or a file of
    another user or that others may write, is refused (:class:`UnsafeFileError`)
    before it is truncated or written."""
    fd = open_owned(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0), 0o600)
    if not append:
        os.ftruncate(fd, 0)
    narrow_to_owner(fd)  # a file left by an older version may be readable by others
    return os.fdopen(fd, "ab") if append else os.fdopen(fd, "w", encoding="utf-8")


def _row_out(result: BatchResult, redactor: Redactor) -> dict[str, Any]:
    message = str(result.error) if result.error is not None else None
    return {
        "line": result.item.line,
        "order_id": result.item.order_id,
        "bag_id": result.item.bag_id,
        "outcome": result.outcome,
        "refund_id": result.refund_id,
        "amount": result.refund.amount if result.refund is not None else None,
        "reconciled": result.reconciled,
        "attempts": result.attempts,
        "sent": result.sent,
        "requests": result.requests,
        "rate_limited": result.rate_limited,
        "error": result.error_class,
        "message": redactor.text(message) if message is not None else None,
        "earlier": result.earlier,
    }
