"""``violet-async demo | refund FILE | cancel FILE | fake-server``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _batch_cli
from ._demo import run_demo
from .exceptions import RequestValidationError, VioletError
from .testing import FakeViolet, FaultPlan
from .testing._faults import PLAN_NAMES

try:  # the fleet commands need the 'fleet' extra (redis, arq)
    from .fleet import _cli as _fleet_cli
except ImportError:  # pragma: no cover - without the extra
    _fleet_cli = None  # type: ignore[assignment]

__all__ = ["main"]


async def _serve(args: argparse.Namespace) -> int:
    fake = FakeViolet(
        orders=args.orders,
        seed=args.seed,
        faults=FaultPlan.named(args.faults, args.seed),
        host="127.0.0.1",
        port=args.port,
        token_lifetime=args.token_lifetime,
        cancel_response=args.cancel_response,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await fake.start()
    except OSError as exc:
        await fake.stop()
        if exc.errno != errno.EADDRINUSE:
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
        print(f"base_url={fake.base_url}", flush=True)
        print(f"app_id={fake.app_id}", flush=True)
        print(f"app_secret={fake.app_secret}", flush=True)
        print(f"username={fake.username}", flush=True)
        print(f"password={fake.password}", flush=True)
        print(f"orders={len(fake.seeded)} first={fake.seeded[:1]}", flush=True)
        await stop.wait()
    finally:
        await fake.stop()
    print("fake-server stopped", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="violet-async", description="Violet bag refunds and cancels, safely."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="refund and cancel a few hundred bags on an embedded FakeViolet"
    )
    demo.add_argument("--bags", type=int, default=300)
    demo.add_argument("--concurrency", type=int, default=16)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--faults", choices=PLAN_NAMES, default="moderate")

    for kind in ("refund", "cancel"):
        batch = sub.add_parser(
            kind,
            help=f"{kind} every bag listed in FILE (CSV with a header, or JSON lines)",
            description=_batch_cli.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        batch.add_argument("file", type=Path)
        batch.add_argument("--concurrency", type=int, default=16)
        batch.add_argument("--rate", type=float, default=None, help="max requests per second")
        batch.add_argument(
            "--journal",
            type=Path,
            default=None,
            help="journal path (default: FILE.<command>.journal.jsonl)",
        )
        batch.add_argument("--output", type=Path, default=None, help="results as JSON lines")
        batch.add_argument(
            "--dry-run",
            action="store_true",
            help="validate every row and print the plan; send nothing",
        )
        batch.add_argument(
            "--retry-failed",
            action="store_true",
            help="send again the items a previous run recorded as failed",
        )
        batch.add_argument("--env", choices=("sandbox", "production"), default=None)
        batch.add_argument("--base-url", default=None)
        batch.add_argument(
            "--settle",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help=(
                "how long a refund whose request got no answer may still appear at "
                "Violet before it counts as not applied and may be sent again "
                "(default: %(default)s). Lower it only for platforms you know to "
                "commit faster: a refund that appears later than this can be sent twice"
            ),
        )
        batch.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="longest wait for one answer from Violet (default: %(default)s)",
        )

    serve = sub.add_parser("fake-server", help="run FakeViolet on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--orders", type=int, default=1000)
    serve.add_argument("--seed", type=int, default=1)
    serve.add_argument("--faults", choices=PLAN_NAMES, default="none")
    serve.add_argument("--token-lifetime", type=float, default=24 * 3600.0)
    serve.add_argument("--cancel-response", choices=("refund", "cancellation"), default="refund")
    if _fleet_cli is not None:
        _fleet_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    # One line, never a traceback: SDK messages are already redacted.
    except RequestValidationError as exc:
        print(f"violet-async: configuration: {exc}", file=sys.stderr)
        return 2
    except VioletError as exc:
        print(f"violet-async: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.bags < 1 or args.concurrency < 1:
            print("violet-async: --bags and --concurrency must be >= 1", file=sys.stderr)
            return 2
        return asyncio.run(run_demo(args.bags, args.concurrency, args.seed, args.faults))
    if args.command in ("refund", "cancel"):
        if args.concurrency < 1 or (args.rate is not None and args.rate <= 0):
            print("violet-async: --concurrency and --rate must be positive", file=sys.stderr)
            return 2
        if args.settle < 0 or args.timeout <= 0:
            print("violet-async: --settle must be >= 0 and --timeout > 0", file=sys.stderr)
            return 2
        return asyncio.run(
            _batch_cli.run_file(
                args.command,
                args.file,
                _batch_cli.BatchOptions(
                    concurrency=args.concurrency,
                    rate=args.rate,
                    journal=args.journal,
                    output=args.output,
                    dry_run=args.dry_run,
                    retry_failed=args.retry_failed,
                    environment=args.env,
                    base_url=args.base_url,
                    settle_running=args.settle,
                    timeout=args.timeout,
                ),
            )
        )
    if _fleet_cli is not None and args.command in _fleet_cli.COMMANDS:
        return _fleet_cli.run(args)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(args))
    return 130  # pragma: no cover - only when the signal lands before the handler


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
