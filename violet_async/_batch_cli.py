"""``violet-async refund FILE`` and ``violet-async cancel FILE``.

FILE is CSV with a header row, or JSON lines (``.jsonl`` / ``.ndjson``), one request a
row: ``order_id``, ``bag_id`` and the request model's fields (refund:
``amount_refunded``, ``reason``, ``restock_items``, ``notify_customer``,
``shipping_amount`` in CSV or ``shipping: {"amount": ...}`` in JSON, ``skus`` as a JSON
list; cancel: ``reason_code``, ``reason``, ``restock_items``, ``notify_customer``).
Every row is validated before anything is sent.

Exit codes: 0 all done, 1 some failed, 2 bad input or configuration, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import orjson

from ._client import Environment, VioletClient
from ._converter import converter
from ._journal import JournalMismatchError
from ._redact import Redactor
from ._retry import RetryPolicy
from ._transport import Timeouts
from .batch import BatchItem, BatchResult, Kind, run_batch
from .exceptions import RequestValidationError
from .models import CancelBagRequest, RefundBagRequest, ShippingRefund, SkuRefund

__all__ = ["run_file"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_TRUE, _FALSE = {"true", "1", "yes", "y"}, {"false", "0", "no", "n"}


class RowError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def _int_field(row: dict[str, Any], name: str, *, required: bool) -> Any:
    value = row.get(name)
    if value is None or value == "":
        if required:
            raise RequestValidationError(name, "is required")
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise RequestValidationError(name, f"must be a whole number, got {value!r}")
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


def _item(kind: Kind, line: int, row: dict[str, Any]) -> BatchItem:
    # An empty CSV cell and a JSON null both read as None, which the request models take
    # as "not given": the field is left out of the body and Violet applies its default.
    order_id = _int_field(row, "order_id", required=True)
    bag_id = _int_field(row, "bag_id", required=True)
    if kind == "cancel":
        fields: dict[str, Any] = {
            "reason_code": _text_field(row, "reason_code"),
            "reason": _text_field(row, "reason"),
            "restock_items": _bool_field(row, "restock_items"),
            "notify_customer": _bool_field(row, "notify_customer"),
        }
        return BatchItem(line, kind, order_id, bag_id, CancelBagRequest(**fields))
    shipping = row.get("shipping")
    if isinstance(shipping, dict):
        shipping = ShippingRefund(**shipping)
    elif row.get("shipping_amount") not in (None, ""):
        shipping = ShippingRefund(amount=_int_field(row, "shipping_amount", required=True))
    fields = {
        "amount_refunded": _int_field(row, "amount_refunded", required=False),
        "reason": _text_field(row, "reason"),
        "restock_items": _bool_field(row, "restock_items"),
        "notify_customer": _bool_field(row, "notify_customer"),
        "shipping": shipping,
        "skus": _skus(row),
    }
    return BatchItem(line, kind, order_id, bag_id, RefundBagRequest(**fields))


def _rows(handle: IO[str], path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                # exc.msg without the parser's position: it counts lines and columns
                # inside this one row ("line 2 column 1" for a row cut short), which
                # reads like a line of the file and is not one.
                yield number, RowError(number, f"not valid JSON ({exc.msg})")
        return
    reader = csv.DictReader(handle)
    for row in reader:
        # The header is line 1, so data rows are numbered as a spreadsheet shows them.
        yield reader.line_num, row


def read_items(path: Path, kind: Kind) -> Iterator[BatchItem | RowError]:
    """Lazily parse and validate every row; bad rows come back as RowError."""
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in _rows(handle, path):
            if isinstance(row, RowError):
                yield row
                continue
            if not isinstance(row, dict):
                yield RowError(line, "must be an object")
                continue
            try:
                yield _item(kind, line, row)
            except (RequestValidationError, TypeError) as exc:
                yield RowError(line, str(exc))


def _file_id(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """A bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def tick(self) -> None:
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
    environment: str | None = None
    base_url: str | None = None
    settle_running: float = 60.0
    timeout: float = 30.0


@attrs.define
class _Tally:
    results: Counter[str] = attrs.Factory(Counter)
    errors: Counter[str] = attrs.Factory(Counter)
    reconciled: int = 0
    retries: int = 0

    def add(self, result: BatchResult) -> None:
        self.results[result.outcome] += 1
        if result.error_class and result.outcome in ("failed", "unknown"):
            self.errors[result.error_class] += 1
        self.reconciled += result.reconciled
        self.retries += result.retries

    def write(self, elapsed: float, out: IO[str]) -> None:
        results = self.results
        sent = results["succeeded"] + results["failed"] + results["unknown"]
        out.write("\nsummary\n")
        for key in ("succeeded", "already_done", "failed", "unknown", "already_failed"):
            out.write(f"  {key:<16} {results[key]:>8}\n")
        for name, count in sorted(self.errors.items()):
            out.write(f"    {name:<26} {count:>6}\n")
        out.write(f"  {'reconciled':<16} {self.reconciled:>8}\n")
        out.write(f"  {'retries':<16} {self.retries:>8}\n")
        out.write(f"  {'elapsed':<16} {elapsed:>7.1f}s\n")
        rate = results["succeeded"] / max(elapsed, 1e-9)
        out.write(f"  {'refunds/s':<16} {rate:>8.1f}  ({sent} sent this run)\n")


def _validate(kind: Kind, path: Path, err: IO[str]) -> int | None:
    """Count the rows, or report every bad one (with its line) and return None."""
    total = 0
    bad: list[RowError] = []
    for parsed in read_items(path, kind):
        if isinstance(parsed, RowError):
            bad.append(parsed)
        else:
            total += 1
    for error in bad:
        err.write(f"{path}:{error}\n")
    if bad:
        err.write(f"violet-async: {len(bad)} bad row(s); nothing was sent\n")
        return None
    return total


def _print_plan(kind: Kind, path: Path, total: int, out: IO[str]) -> None:
    out.write(f"dry run: {total} {kind}(s) in {path} are valid; nothing was sent\n")
    for item in read_items(path, kind):
        if isinstance(item, BatchItem):
            plan = orjson.dumps(converter.unstructure(item.request)).decode()
            out.write(
                f"  line {item.line}: {kind} order {item.order_id} bag {item.bag_id} {plan}\n"
            )


async def run_file(
    kind: Kind,
    path: Path,
    options: BatchOptions,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """The whole command: validate, then dry-run or run, then summarize."""
    if not path.is_file():  # noqa: ASYNC240 - one stat before any I/O starts
        err.write(f"violet-async: {path}: no such file\n")
        return EXIT_BAD_INPUT
    total = _validate(kind, path, err)
    if total is None:
        return EXIT_BAD_INPUT
    if options.dry_run:
        _print_plan(kind, path, total, out)
        return EXIT_OK
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
        err.write(f"violet-async: configuration: {exc}\n")
        return EXIT_BAD_INPUT
    return await _execute(kind, path, total, client, options, out=out, err=err)


async def _execute(
    kind: Kind,
    path: Path,
    total: int,
    client: VioletClient,
    options: BatchOptions,
    *,
    out: IO[str],
    err: IO[str],
) -> int:
    journal = options.journal or path.with_name(path.name + f".{kind}.journal.jsonl")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tally = _Tally()
    progress = _Progress(total, out)
    started = time.monotonic()
    sink = _open_private(options.output) if options.output else None
    # Errors are redacted where they are built; this is the second line of defence
    # for a file that outlives the run.
    redactor = Redactor(client._shared.credentials.secrets)
    try:
        async with client:
            items = (i for i in read_items(path, kind) if isinstance(i, BatchItem))
            async for result in run_batch(
                client,
                items,
                concurrency=options.concurrency,
                rate=options.rate,
                journal=journal,
                input_id=f"{kind}:{_file_id(path)}",
                retry_failed=options.retry_failed,
                stop=stop,
            ):
                tally.add(result)
                if sink is not None:
                    sink.write(orjson.dumps(_row_out(result, redactor)) + b"\n")
                progress.tick()
    except JournalMismatchError as exc:
        err.write(f"violet-async: {exc}\n")
        return EXIT_BAD_INPUT
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if sink is not None:
            sink.close()
    tally.write(time.monotonic() - started, out)
    out.write(f"journal: {journal}\n")
    if stop.is_set():
        out.write("interrupted: run the same command again to finish\n")
        return EXIT_INTERRUPTED
    failed = tally.results["failed"] or tally.results["unknown"]
    return EXIT_FAILED if failed else EXIT_OK


def _open_private(path: Path) -> IO[bytes]:
    """Open ``path`` for appending, readable by its owner only (0600): the results
    name orders and carry Violet's messages."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # a file left by an older version may be wider
    return os.fdopen(fd, "ab")


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
        "error": result.error_class,
        "message": redactor.text(message) if message is not None else None,
    }
