"""`violet-async demo | refund FILE | cancel FILE | audit FILE | fake-server` (and
commands that modules add with :func:`add_command_hook`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import math
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _audit_cli, _batch_cli
from ._demo import run_demo
from ._redact import printable
from ._signals import on_signals
from ._version import __version__
from .exceptions import RequestValidationError, VioletError
from .testing import FakeViolet, FaultPlan
from .testing._faults import PLAN_NAMES

__all__ = ["COMMAND_HOOKS", "add_command_hook", "main"]


async def _serve(args: argparse.Namespace) -> int:
    fake = FakeViolet(
        orders=args.orders,
        seed=args.seed,
        faults=FaultPlan.named(args.faults, args.seed),
        host="127.0.0.1",
        port=args.port,
        token_lifetime=args.token_lifetime,
        cancel_response=args.cancel_response,
        merchants=args.merchants,
        merchant_limit=args.merchant_limit,
        merchant_limits={STRICT_MERCHANT: args.strict_merchant} if args.strict_merchant else None,
    )
    stop = asyncio.Event()
    restore_signals = on_signals(stop.set, (signal.SIGINT, signal.SIGTERM))
    try:
        await fake.start()
    except OSError as exc:
        restore_signals()
        await fake.stop()
        # Windows names it WSAEADDRINUSE (10048).
        if exc.errno not in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None)):
            raise
        # The usual first-run mistake (a second fake-server, or anything else on 8080)
        # gets one line, not the event loop's traceback.
        print(
            f"violet-async fake-server: port {args.port} is in use; pick another with --port",
            file=sys.stderr,
        )
        return 2
    try:
        # Printing the credentials is the point of this command: it is a fake server.
        print(_fake_server_banner(fake), end="", flush=True)
        await stop.wait()
    finally:
        restore_signals()
        await fake.stop()
    print("fake-server stopped", flush=True)
    return 0


#: Functions that add subcommands to the parser (``hook(subparsers)``). A command sets
#: ``handler=`` (``args -> exit code``) with ``set_defaults``; the fleet module uses this.
COMMAND_HOOKS: list[Callable[[Any], None]] = []


def add_command_hook(hook: Callable[[Any], None]) -> None:
    """Register ``hook(subparsers)`` to add subcommands to ``violet-async``."""
    if hook not in COMMAND_HOOKS:
        COMMAND_HOOKS.append(hook)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default shown (an option
    whose help already says its default, or a flag that is off, is left as it is)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        quiet = default in (None, False, argparse.SUPPRESS) or not action.option_strings
        if quiet or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _fake_server_banner(fake: FakeViolet) -> str:
    """Lines to paste into another terminal, then bags to try."""
    lines = [
        f"# FakeViolet is listening on {fake.base_url} (Ctrl-C stops it).",
        "# In another terminal, paste these lines, then run violet-async refund FILE:",
        f"export VIOLET_BASE_URL={fake.base_url}",
        f"export VIOLET_APP_ID={fake.app_id}",
        f"export VIOLET_APP_SECRET={fake.app_secret}",
        f"export VIOLET_USERNAME={fake.username}",
        f"export VIOLET_PASSWORD={fake.password}",
    ]
    if fake.seeded:
        last_order, last_bag = fake.seeded[-1]
        lines.append(
            f"# {len(fake.seeded)} orders with one bag each, order_id,bag_id from "
            f"{fake.seeded[0][0]},{fake.seeded[0][1]} to {last_order},{last_bag}; "
            "a file to try:"
        )
        lines.append("#   order_id,bag_id,amount_refunded,reason")
        # Bags that neither examples/ (orders 100001 to 100013) nor the command-line
        # walkthrough (100021 to 100023) use, where the server has them.
        tried = fake.seeded[30:33] if len(fake.seeded) >= 33 else fake.seeded[:3]
        for order_id, bag_id in tried:
            lines.append(f"#   {order_id},{bag_id},500,goodwill")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="violet-async",
        description="Violet bag refunds and cancels, safely.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_batch(sub)
    _add_audit(sub)
    _add_fake_server(sub)
    for hook in COMMAND_HOOKS:
        hook(sub)
    return parser


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="refund and cancel a few hundred bags on an embedded FakeViolet",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--bags", type=int, default=300, help="bags to refund or cancel")
    demo.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    demo.add_argument("--seed", type=int, default=7, help="seed of the fake data and faults")
    demo.add_argument(
        "--faults", choices=PLAN_NAMES, default="moderate", help="how hostile the server is"
    )
    demo.set_defaults(handler=_run_demo)


def _add_batch(sub: Any) -> None:
    for kind in ("refund", "cancel"):
        batch = sub.add_parser(
            kind,
            help=f"{kind} every bag listed in FILE (CSV with a header, or JSON lines)",
            description=f"{kind.capitalize()} every bag listed in FILE, each at most once.",
            epilog=_batch_cli.HELP,
            formatter_class=_HelpFormatter,
        )
        batch.add_argument("file", type=Path, metavar="FILE", help="the rows to send")
        batch.add_argument(
            "--dry-run",
            action="store_true",
            help="check every row, print the plan and its totals; send nothing",
        )
        batch.add_argument(
            "--journal",
            type=Path,
            default=None,
            help="where the run records each row (locked while a run uses it; "
            f"default: FILE.{kind}.journal.jsonl)",
        )
        batch.add_argument(
            "--output",
            type=Path,
            default=None,
            help="append one JSON line per row with its outcome (default: none)",
        )
        if kind == "refund":
            batch.add_argument(
                "--full-refunds",
                action="store_true",
                help="a row with an empty amount_refunded refunds its whole bag "
                "(without it such a row is refused; write full in the cell instead)",
            )
        batch.add_argument(
            "--retry-failed",
            action="store_true",
            help="send again rows an earlier run recorded as refused by Violet "
            "(each bag is read first)",
        )
        batch.add_argument(
            "--allow-repeat",
            action="store_true",
            help="send a row even when its bag already shows an identical refund that no "
            "journal accounts for (without it: reported already_present, not sent). "
            "This makes a second identical refund",
        )
        batch.add_argument("--concurrency", type=int, default=16, help="rows in flight")
        batch.add_argument(
            "--rate",
            type=float,
            default=None,
            help="at most this many rows started per second over every merchant (a global "
            "cap; each merchant's own pace is learned from its 429s) (default: no cap)",
        )
        batch.add_argument(
            "--env",
            choices=("sandbox", "production"),
            default=None,
            help="Violet environment (default: VIOLET_ENV, else sandbox)",
        )
        batch.add_argument(
            "--base-url",
            default=None,
            help="another Violet, such as fake-server's (default: VIOLET_BASE_URL)",
        )
        batch.add_argument(
            "--settle",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help=(
                "how long a refund whose request got no answer may still appear at "
                "Violet before it counts as not applied and may be sent again. Lower "
                "it only for platforms you know to commit faster: a refund that "
                "appears later than this can be sent twice"
            ),
        )
        batch.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="longest wait for one answer from Violet",
        )
        batch.set_defaults(handler=_run_batch)


def _add_audit(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="check every row of FILE against Violet's own records of each bag",
        description="Did every bag get exactly the refund its row asked for, once? "
        "Read from Violet's records; the journal or fleet ledger second.",
        epilog=_audit_cli.HELP,
        formatter_class=_HelpFormatter,
    )
    audit.add_argument("file", type=Path, metavar="FILE", help="the rows a batch ran")
    audit.add_argument(
        "--kind", choices=("refund", "cancel"), default="refund", help="what FILE asks for"
    )
    audit.add_argument(
        "--full-refunds",
        action="store_true",
        help="read an empty amount_refunded as a whole-bag refund (as the batch did)",
    )
    audit.add_argument(
        "--journal",
        type=Path,
        default=None,
        help="the batch journal to compare with (default: FILE.KIND.journal.jsonl if it exists)",
    )
    audit.add_argument(
        "--ledger",
        action="store_true",
        help="compare with a fleet's Redis ledger instead of a journal "
        "(its URL from --redis, else VIOLET_REDIS_URL: keeps the password out of ps)",
    )
    audit.add_argument(
        "--redis", default=None, metavar="URL", help="the fleet's Redis (implies --ledger)"
    )
    audit.add_argument("--prefix", default=None, help="the fleet ledger's key prefix")
    audit.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write one line per row (created 0600; never through a symlink)",
    )
    audit.add_argument(
        "--format", choices=("jsonl", "csv"), default="jsonl", help="the --output format"
    )
    audit.add_argument("--concurrency", type=int, default=8, help="orders read at once")
    audit.add_argument(
        "--rate",
        type=float,
        default=None,
        help="at most this many reads per second over every merchant (a global cap; each "
        "merchant's own pace is learned from its 429s) (default: no cap)",
    )
    audit.add_argument(
        "--env",
        choices=("sandbox", "production"),
        default=None,
        help="Violet environment (default: VIOLET_ENV, else sandbox)",
    )
    audit.add_argument("--base-url", default=None, help="another Violet (default: VIOLET_BASE_URL)")
    audit.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="longest wait for one answer"
    )
    audit.add_argument(
        "--spool-dir",
        type=Path,
        default=None,
        help="where the rows are spooled while grouped by bag (default: the system's temp dir)",
    )
    audit.set_defaults(handler=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    rate_ok = args.rate is None or (math.isfinite(args.rate) and args.rate > 0)
    timeout_ok = math.isfinite(args.timeout) and args.timeout > 0
    if args.concurrency < 1 or not rate_ok or not timeout_ok:
        print("violet-async: --concurrency, --rate and --timeout must be positive", file=sys.stderr)
        return 2
    options = _audit_cli.AuditOptions(
        kind=args.kind,
        journal=args.journal,
        redis=args.redis if args.redis is not None else ("" if args.ledger else None),
        prefix=args.prefix,
        output=args.output,
        format=args.format,
        concurrency=args.concurrency,
        rate=args.rate,
        full_refunds=args.full_refunds,
        environment=args.env,
        base_url=args.base_url,
        timeout=args.timeout,
        spool_dir=args.spool_dir,
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_audit_cli.run_audit(args.file, options))
    return 130  # pragma: no cover - only when the signal lands before the handler


def _add_fake_server(sub: Any) -> None:
    serve = sub.add_parser(
        "fake-server",
        help="run FakeViolet on 127.0.0.1 until Ctrl-C",
        description="Run FakeViolet on 127.0.0.1 and print the export lines that point "
        "violet-async and VioletClient.from_env() at it.",
        formatter_class=_HelpFormatter,
    )
    serve.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    serve.add_argument("--orders", type=int, default=1000, help="orders (one bag each) to seed")
    serve.add_argument("--seed", type=int, default=1, help="seed of the data and faults")
    serve.add_argument("--faults", choices=PLAN_NAMES, default="none", help="fault plan")
    serve.add_argument(
        "--token-lifetime", type=float, default=24 * 3600.0, help="seconds a login token lives"
    )
    serve.add_argument(
        "--cancel-response",
        choices=("refund", "cancellation"),
        default="cancellation",
        help="the shape of a cancel's answer: Violet's 202 cancellation body (default) "
        "or the bare refund on 200 of the older page",
    )
    serve.add_argument(
        "--merchants",
        type=_at_least_one,
        default=1,
        help="merchants the seeded bags take turns among (ids 20001 up)",
    )
    serve.add_argument(
        "--merchant-limit",
        type=_per_second,
        default=None,
        metavar="PER_S",
        help="refund and cancel POSTs a second each merchant's platform lets through; "
        "over it, Violet's 429 with a Retry-After, nothing applied (default: no limit)",
    )
    serve.add_argument(
        "--strict-merchant",
        type=_per_second,
        default=None,
        metavar="PER_S",
        help=f"merchant {STRICT_MERCHANT}'s own limit: one strict platform (as Shopify is) "
        "beside the others (default: as --merchant-limit)",
    )
    serve.set_defaults(handler=_run_fake_server)


#: The merchant ``fake-server --strict-merchant`` limits (the first seeded merchant).
STRICT_MERCHANT = 20001


def _per_second(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate above 0 a second")
    return rate


def _at_least_one(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    # One line, never a traceback: SDK messages are already redacted (and what a
    # server wrote in them is escaped).
    except RequestValidationError as exc:
        print(
            f"violet-async: configuration: {printable(_batch_cli.configuration_message(exc))}",
            file=sys.stderr,
        )
        return 2
    except VioletError as exc:
        print(f"violet-async: {type(exc).__name__}: {printable(exc)}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _run_demo(args: argparse.Namespace) -> int:
    if args.bags < 1 or args.concurrency < 1:
        print("violet-async: --bags and --concurrency must be >= 1", file=sys.stderr)
        return 2
    return asyncio.run(run_demo(args.bags, args.concurrency, args.seed, args.faults))


def _run_batch(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or (args.rate is not None and args.rate <= 0):
        print("violet-async: --concurrency and --rate must be positive", file=sys.stderr)
        return 2
    if args.settle < 0 or args.timeout <= 0:
        print("violet-async: --settle must be >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    options = _batch_cli.BatchOptions(
        concurrency=args.concurrency,
        rate=args.rate,
        journal=args.journal,
        output=args.output,
        dry_run=args.dry_run,
        retry_failed=args.retry_failed,
        allow_repeat=args.allow_repeat,
        full_refunds=getattr(args, "full_refunds", False),
        environment=args.env,
        base_url=args.base_url,
        settle_running=args.settle,
        timeout=args.timeout,
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_batch_cli.run_file(args.command, args.file, options))
    return 130  # pragma: no cover - only when the signal lands before the handler


def _run_fake_server(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(args))
    return 130  # pragma: no cover - only when the signal lands before the handler


def _add_fleet_commands(sub: Any) -> None:
    """``enqueue``, ``worker`` and ``status`` (the ``fleet`` extra)."""
    from .fleet import _cli as fleet_cli  # noqa: PLC0415 - present: the hook is registered

    fleet_cli.add_commands(sub, _HelpFormatter)
    for name in fleet_cli.COMMANDS:
        sub.choices[name].set_defaults(handler=fleet_cli.run)


def _add_fleet_placeholders(sub: Any) -> None:
    """``enqueue``, ``worker`` and ``status`` on the core install: each says which extra
    it needs, rather than argparse's "invalid choice"."""
    for name, text in (
        ("enqueue", "queue every row of FILE for the fleet's workers (needs the fleet extra)"),
        ("worker", "run a fleet worker (needs the fleet extra)"),
        ("status", "the fleet ledger (needs the fleet extra)"),
    ):
        # No option prefix: whatever follows (--redis URL, --help) is taken as it is.
        cmd = sub.add_parser(name, help=text, description=text, add_help=False, prefix_chars="+")
        cmd.add_argument("rest", nargs="*")
        cmd.set_defaults(handler=_needs_fleet_extra)


def _needs_fleet_extra(args: argparse.Namespace) -> int:
    print(
        f"violet-async {args.command}: the fleet commands need the fleet extra (redis-py "
        "and arq): pip install 'violet-async[fleet]'",
        file=sys.stderr,
    )
    return 2


try:  # the fleet commands need the 'fleet' extra (redis, arq)
    from .fleet import _cli as _fleet_cli  # noqa: F401 - imported to know it is there
except ImportError:  # without the extra: the commands say what to install
    add_command_hook(_add_fleet_placeholders)
else:
    add_command_hook(_add_fleet_commands)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
