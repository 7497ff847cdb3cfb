"""The command line: demo and fake-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from violet_async.__main__ import main


def test_demo_runs_and_reports_no_double_refunds(capsys: pytest.CaptureFixture[str]) -> None:
    """`violet-async demo` refunds and cancels on FakeViolet and exits 0."""
    assert main(["demo", "--bags", "60", "--concurrency", "8", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "bags refunded twice (ledger)" in out
    assert "refund succeeded" in out
    assert "cancel succeeded" in out
    assert "journal lines (fsynced)" in out
    retries = next(line for line in out.splitlines() if line.strip().startswith("retries"))
    assert int(retries.split()[1]) > 0  # the caller's on_retry hook saw the retries
    twice = next(line for line in out.splitlines() if "refunded twice" in line)
    assert twice.split()[-1] == "0"
    contradicted = next(line for line in out.splitlines() if "ledger contradicts" in line)
    assert contradicted.split()[-1] == "0"


def test_the_demo_checks_every_outcome_against_the_ledger() -> None:
    """A refund reported made must be on its bag once; one reported definitely not
    applied must not be there; pending, unknown and not-sent outcomes claim nothing."""
    from violet_async._demo import _contradicted

    made = {1: 1, 2: 0, 3: 2, 4: 1}
    ended = [
        (1, "succeeded"),  # on the bag once: true
        (2, "succeeded"),  # reported made, not there
        (3, "already_done"),  # there twice
        (4, "failed"),  # reported not applied, but made
        (5, "failed"),  # not there: true
        (4, "unknown"),  # claims nothing
        (2, "not_sent"),  # claims nothing
    ]
    assert _contradicted(ended, made) == [2, 3, 4]


def test_demo_paces_each_merchant_and_counts_what_rows_cost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's second part: every row of four merchants' (one strict) succeeds, none
    refunded twice, and each merchant's line shows its limit, rows, requests and 429s;
    no platform let more through in a second than its bucket allows."""
    assert main(["demo", "--bags", "3", "--concurrency", "16", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "100 refunds of 4 merchants (faults off)" in out
    assert "0 rows not succeeded, 0 bags refunded twice" in out
    table = out[out.index("merchant   limit/s") :].splitlines()[1:5]
    lanes = {int(line.split()[0]): line.split() for line in table}
    assert sorted(lanes) == [20001, 20002, 20003, 20004]
    for merchant, (_, limit, rows, requests, rate_limited, peak, *_) in lanes.items():
        assert float(limit) == (10.0 if merchant == 20001 else 100.0)
        assert int(rows) == 25
        # A baseline read and the POST a row at least; each 429 is one more answer.
        assert int(requests) >= 2 * 25 + int(rate_limited)
        assert int(peak) <= float(limit) + 4  # its rate and its bucket, in any second


def test_demo_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad sizes exit 2 with a message."""
    assert main(["demo", "--bags", "0"]) == 2
    assert "--bags" in capsys.readouterr().err


def test_fake_server_prints_export_lines_and_bags_then_stops_on_sigterm() -> None:
    """fake-server prints the export lines for VIOLET_*, bags to try, and stops on SIGTERM."""
    with subprocess.Popen(
        [sys.executable, "-m", "violet_async", "fake-server", "--port", "0", "--orders", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(12)]
            exports = dict(
                line.removeprefix("export ").strip().split("=", 1)
                for line in lines
                if line.startswith("export ")
            )
            assert set(exports) == {
                "VIOLET_BASE_URL",
                "VIOLET_APP_ID",
                "VIOLET_APP_SECRET",
                "VIOLET_USERNAME",
                "VIOLET_PASSWORD",
            }
            assert exports["VIOLET_BASE_URL"].startswith("http://127.0.0.1:")
            assert "#   100001,200001,500,goodwill\n" in lines
            proc.send_signal(signal.SIGTERM)
            rest = proc.stdout.read()
            assert proc.wait(timeout=20) == 0
            assert "fake-server stopped" in rest
        finally:
            proc.kill()


def test_version_and_help_name_every_option_default_and_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--version prints the version; refund --help explains every option, shows defaults,
    the VIOLET_* variables and exit codes, with no raw double backticks."""
    from violet_async import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"violet-async {__version__}"
    with pytest.raises(SystemExit):
        main(["refund", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # as read, not as wrapped
    assert "``" not in text
    for needle in (
        "(default: 16)",
        "(default: 60.0)",
        "(default: 30.0)",
        "VIOLET_APP_ID",
        "VIOLET_BASE_URL",
        "exit codes",
        "130",
        "--allow-repeat",
        "--full-refunds",
    ):
        assert needle in text, needle
    options = [w for w in text.split() if w.startswith("--")]
    assert options, text


def test_a_module_can_add_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """add_command_hook lets another module (fleet) add a subcommand with its handler."""
    from violet_async import __main__ as cli

    def hook(sub: object) -> None:
        extra = sub.add_parser("extra", help="a test command")  # type: ignore[attr-defined]
        extra.set_defaults(handler=lambda args: 7)

    cli.add_command_hook(hook)
    try:
        assert main(["extra"]) == 7
    finally:
        cli.COMMAND_HOOKS.remove(hook)
