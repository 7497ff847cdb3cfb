"""`violet-async audit FILE`: every row of a refund or cancel file, checked against
Violet's own records (the batch journal or the fleet ledger second).

Input is the batch command's (same parser, same strict checks); output, verdicts and
exit codes are in `HELP` and docs/audit.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import IO, Any

import attrs
import orjson

from ._audit import AUDITS, MONEY_OFF, AuditRow, AuditStats, audit
from ._audit_judge import format_money
from ._batch_cli import RowError, _preflight, _Progress, configuration_message, read_items
from ._client import Environment, VioletClient
from ._files import NONBLOCK, UnsafeFileError, narrow_to_owner, open_owned
from ._journal import JournalMismatchError, _check_version, _parse
from ._redact import Redactor
from ._redis_url import redis_url_problem
from ._retry import RetryPolicy
from ._signals import on_signals
from ._transport import Timeouts
from .batch import BatchItem, Kind
from .exceptions import RequestValidationError

__all__ = ["HELP", "AuditOptions", "escape", "run_audit"]

EXIT_OK, EXIT_OFF, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Problem rows the summary names (all of them are in --output).
PROBLEM_ROWS = 10

HELP = """\
FILE is the refund or cancel file a batch ran (CSV or JSON lines, the same columns and
checks as `violet-async refund` / `cancel`). Every bag it names is read from Violet (its
order, then every page of its refunds), and every row gets one verdict:

  as_asked    exactly the refund the row asked for is on the bag, once (its id; with a
              journal, whether this tool made it)
  missing     no such refund on the bag (with the journal's view; a row the journal
              says succeeded is named loudly)
  extra       more refunds matching the row than rows asking for them (a double), or
              refunds on the bag no row asked for (EXTERNAL ones included)
  mismatch    a refund on the bag almost matches (amount, lines or reason differ)
  unreadable  the bag could not be read (why is given): not a verdict about money

Violet's records decide; the journal (--journal, default FILE.KIND.journal.jsonl when
it exists) or the fleet ledger (--ledger, --redis) only says what our side recorded.

exit codes:
  0    every row is as_asked
  1    some row is missing, extra, mismatch or unreadable
  2    bad input or configuration: nothing was read
  130  interrupted (Ctrl-C)
"""

#: Bidi overrides and isolates, and line / paragraph separators: they reorder or
#: break what a terminal or spreadsheet shows, without being C0 or C1 controls.
_INVISIBLE = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) and bidi override shown as
    an escape (``\\x1b``, ``\\u202e``): server text must never drive a terminal."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char in _INVISIBLE or unicodedata.category(char) == "Cc":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


@attrs.frozen
class AuditOptions:
    kind: Kind = "refund"
    journal: Path | None = None
    redis: str | None = None
    prefix: str | None = None
    output: Path | None = None
    format: str = "jsonl"
    concurrency: int = 8
    rate: float | None = None
    full_refunds: bool = False
    environment: str | None = None
    base_url: str | None = None
    timeout: float = 30.0
    spool_dir: Path | None = None


class _BadInput(Exception):
    """Stop before anything is read (exit 2)."""


def _open_output(path: Path) -> IO[str]:
    """``path`` for writing, private (0600), held to the batch's checks (never through a
    symlink; a regular file of this user, with no other name, that no one else may
    write): a planted file or link is refused, not followed. It is emptied only once
    Violet has answered (a run refused at the start leaves it as it was)."""
    try:
        fd = open_owned(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except UnsafeFileError as exc:
        raise _BadInput(f"--output {exc}") from None
    except OSError as exc:
        raise _BadInput(f"--output {path}: cannot open it ({exc.strerror})") from None
    try:
        narrow_to_owner(fd)
        if NONBLOCK:  # Windows has no O_NONBLOCK (nor, before 3.12, set_blocking)
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "w", encoding="utf-8", newline="")


@attrs.define
class _Summary:
    rows: Counter[str] = attrs.Factory(Counter)
    money: defaultdict[str, Counter[str]] = attrs.Factory(lambda: defaultdict(Counter))
    unknown_money: Counter[str] = attrs.Factory(Counter)
    unasked: Counter[str] = attrs.Factory(Counter)
    ours: int = 0
    loud: list[str] = attrs.Factory(list)
    loud_count: int = 0
    loud_source: str = "journal"
    problems: list[str] = attrs.Factory(list)

    def add(self, row: AuditRow, text: str) -> None:
        verdict = row.audit
        self.rows[verdict] += 1
        currency = _currency(row.currency) or "?"
        if verdict in MONEY_OFF or verdict == "as_asked":
            if row.money is None:
                self.unknown_money[verdict] += 1
            else:
                self.money[verdict][currency] += row.money
        if row.unasked_money:
            self.money["extra"][currency] += row.unasked_money
        self.ours += bool(row.ours)
        if row.loud:
            if row.journal is not None:
                self.loud_source = row.journal.source
            self.loud_count += 1
            if len(self.loud) < PROBLEM_ROWS:
                self.loud.append(text)
        elif verdict != "as_asked" and len(self.problems) < PROBLEM_ROWS:
            self.problems.append(text)

    def write(self, out: IO[str], elapsed: float, stats: AuditStats, journal: str | None) -> None:
        out.write("\naudit summary\n")
        out.write(f"  {'verdict':<12} {'rows':>8}  money\n")
        for verdict in AUDITS:
            amounts = ", ".join(
                format_money(cents, currency)
                for currency, cents in sorted(self.money[verdict].items())
            )
            unknown = self.unknown_money[verdict]
            if unknown:
                amounts += f"{', ' if amounts else ''}+{unknown} row(s) of unknown amount"
            if verdict == "unreadable":
                amounts = "(not a verdict about money)"
            out.write(f"  {verdict:<12} {self.rows[verdict]:>8}  {amounts}\n".rstrip() + "\n")
        if journal is not None:
            out.write(f"  {journal}: recorded making the refund found for {self.ours} row(s)\n")
        out.write(
            f"  read {stats.orders} orders, {stats.bags} bags in {elapsed:.1f}s"
            f" ({stats.rate_limited} rate-limited reads retried)\n"
        )
        if self.loud_count:
            out.write(
                f"\n!!! {self.loud_count} row(s) the {self.loud_source} says SUCCEEDED have NO "
                "such refund at Violet: check these bags first\n"
            )
            for text in self.loud:
                out.write(f"!!!   {text}\n")
        shown = self.problems
        off = sum(self.rows[v] for v in AUDITS if v != "as_asked") - self.loud_count
        if off:
            out.write(f"\n{off} other row(s) are not as asked")
            out.write(" (all of them in --output):\n" if off > len(shown) else ":\n")
            for text in shown:
                out.write(f"  {text}\n")


def _currency(code: str | None) -> str | None:
    """A currency code as printed: escaped, and never longer than a code can be."""
    return escape(code[:12]) if code else None


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula is quoted."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _row_json(row: AuditRow, detail: str) -> dict[str, Any]:
    view = row.journal
    return {
        "line": row.item.line,
        "order_id": row.item.order_id,
        "bag_id": row.item.bag_id,
        "audit": row.audit,
        "refund_ids": list(row.refund_ids),
        "detail": detail,
        "money": row.money,
        "currency": _currency(row.currency),
        "ours": row.ours,
        "journal": escape(view.state) if view is not None and view.state else None,
    }


_CSV_COLUMNS = (
    "line",
    "order_id",
    "bag_id",
    "audit",
    "refund_ids",
    "money",
    "currency",
    "ours",
    "journal",
    "detail",
)


async def run_audit(
    path: Path,
    options: AuditOptions,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """The whole command: check every row, read every bag, write verdicts, summarize."""
    try:
        return await _run(path, options, out, err)
    except _BadInput as exc:
        err.write(f"violet-async audit: {escape(str(exc))}; nothing was read\n")
        return EXIT_BAD_INPUT


def _count_valid(path: Path, options: AuditOptions, err: IO[str]) -> int | None:
    """Rows of ``path`` (every one checked as the batch checks it), or None after naming
    every bad row. Nothing but a count is kept: the file may have millions of rows."""
    rows = bad = 0
    for parsed in read_items(path, options.kind, full_refunds=options.full_refunds):
        if isinstance(parsed, RowError):
            err.write(f"{escape(str(path))}:{escape(str(parsed))}\n")
            bad += 1
        else:
            rows += 1
    if bad:
        err.write(
            f"violet-async audit: {bad} problem(s) in {escape(str(path))}; nothing was read\n"
        )
        return None
    return rows


async def _ledger(options: AuditOptions) -> Any:
    """The fleet ledger at --redis URL, else at VIOLET_REDIS_URL."""
    url = options.redis or os.environ.get("VIOLET_REDIS_URL")
    if not url:
        raise _BadInput("--ledger needs --redis URL or VIOLET_REDIS_URL")
    try:
        from redis.asyncio import Redis  # noqa: PLC0415 - the fleet extra

        from .fleet import RedisLedger  # noqa: PLC0415
    except ImportError:
        raise _BadInput(
            "--redis needs the fleet extra: pip install 'violet-async[fleet]'"
        ) from None
    problem = redis_url_problem(url, "--redis (or VIOLET_REDIS_URL)")
    if problem is not None:
        raise _BadInput(problem)
    redis = Redis.from_url(url)
    try:
        await redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is configuration
        await redis.aclose()
        raise _BadInput(f"cannot reach the fleet's Redis ({type(exc).__name__})") from None
    prefix = options.prefix
    return RedisLedger(redis, prefix=prefix) if prefix else RedisLedger(redis)


async def _run(path: Path, options: AuditOptions, out: IO[str], err: IO[str]) -> int:  # noqa: PLR0912, PLR0915
    if not path.is_file():  # noqa: ASYNC240 - one stat before any I/O starts
        raise _BadInput(f"{path}: no such file")
    try:
        total = _count_valid(path, options, err)
    except UnicodeDecodeError as exc:
        raise _BadInput(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if total is None:
        return EXIT_BAD_INPUT
    journal = options.journal
    if journal is not None and options.redis is not None:
        raise _BadInput("give --journal or --ledger / --redis, not both")
    if journal is None and options.redis is None:
        default = path.with_name(path.name + f".{options.kind}.journal.jsonl")
        journal = default if default.is_file() else None
    if journal is not None and not journal.is_file():
        raise _BadInput(f"--journal {journal}: no such file")
    if journal is not None:
        _check_journal(journal)
    overrides: dict[str, Any] = {
        "retry": RetryPolicy(),
        "timeouts": Timeouts(connect=min(5.0, options.timeout), read=options.timeout),
    }
    if options.base_url:
        overrides["base_url"] = options.base_url
    if options.environment:
        overrides["environment"] = Environment[options.environment.upper()]
    try:
        client = VioletClient.from_env(**overrides)
    except RequestValidationError as exc:
        raise _BadInput(f"configuration: {configuration_message(exc)}") from None
    sink = _open_output(options.output) if options.output is not None else None
    ledger = await _ledger(options) if options.redis is not None else None
    writer = csv.writer(sink) if sink is not None and options.format == "csv" else None
    stop = asyncio.Event()
    restore_signals = on_signals(stop.set)
    summary = _Summary()
    stats = AuditStats()
    redactor = Redactor(client._shared.credentials.secrets)
    started = time.monotonic()
    try:
        async with client:
            if not await _preflight(
                client, path, options.kind, err, full_refunds=options.full_refunds
            ):
                return EXIT_BAD_INPUT
            if sink is not None:
                sink.truncate(0)
            if writer is not None:
                writer.writerow(_CSV_COLUMNS)
            if journal is not None:
                out.write(f"journal: {journal}\n")
            progress = _Progress(total, out)
            items = (
                i
                for i in read_items(path, options.kind, full_refunds=options.full_refunds)
                if isinstance(i, BatchItem)
            )
            try:
                rows = audit(
                    client,
                    items,
                    journal=journal,
                    ledger=ledger,
                    concurrency=options.concurrency,
                    rate=options.rate,
                    spool_dir=options.spool_dir,
                    stats=stats,
                )
                async for row in _until(rows, stop):
                    detail = escape(redactor.text(row.detail))
                    where = f"line {row.item.line}: order {row.item.order_id} bag {row.item.bag_id}"
                    summary.add(row, f"{where}: {row.audit}: {detail}")
                    if writer is not None:
                        record = _row_json(row, detail)
                        record["refund_ids"] = " ".join(map(str, row.refund_ids))
                        writer.writerow([_cell(record[c]) for c in _CSV_COLUMNS])
                    elif sink is not None:
                        sink.write(orjson.dumps(_row_json(row, detail)).decode() + "\n")
                    progress.tick()
            except JournalMismatchError as exc:
                raise _BadInput(str(exc)) from None
            except OSError as exc:
                raise _BadInput(f"cannot read or spool the input ({exc.strerror})") from None
    finally:
        restore_signals()
        if sink is not None:
            sink.close()
        if ledger is not None:
            await ledger.redis.aclose()
    recorder = str(journal) if journal else "the fleet ledger" if ledger is not None else None
    summary.write(out, time.monotonic() - started, stats, recorder)
    if summary.loud_count:
        err.write(
            f"violet-async audit: {summary.loud_count} row(s) the {summary.loud_source} says "
            "succeeded have no such refund at Violet\n"
        )
    if stop.is_set():
        out.write("interrupted: the verdicts above cover the rows read so far\n")
        return EXIT_INTERRUPTED
    done = sum(summary.rows.values())
    if done != total:
        err.write(f"violet-async audit: {total - done} row(s) got no verdict\n")
        return EXIT_OFF
    return EXIT_OK if summary.rows["as_asked"] == done else EXIT_OFF


async def _until(rows: Any, stop: asyncio.Event) -> Any:
    """The audit's rows until Ctrl-C."""
    async with contextlib.aclosing(rows):
        async for row in rows:
            yield row
            if stop.is_set():
                return


def _check_journal(journal: Path) -> None:
    """The journal is held to the batch's checks (a regular file of this user, with no
    other name, that no one else may write; never through a symlink: a planted journal
    could make the audit say "the journal says succeeded", or "ours", falsely), and its
    header is of a version this one reads."""
    try:
        fd = open_owned(journal, os.O_RDONLY)
    except UnsafeFileError as exc:
        raise _BadInput(f"--journal {exc}") from None
    except OSError as exc:
        raise _BadInput(f"--journal {journal}: cannot read it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        if NONBLOCK:
            os.set_blocking(fd, True)
        header, _ = _parse(handle.readline())
    try:
        _check_version(journal, header)
    except JournalMismatchError as exc:
        raise _BadInput(str(exc)) from None
