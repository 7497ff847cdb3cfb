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


def test_demo_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad sizes exit 2 with a message."""
    assert main(["demo", "--bags", "0"]) == 2
    assert "--bags" in capsys.readouterr().err


def test_fake_server_prints_credentials_and_stops_on_sigterm() -> None:
    """fake-server prints base URL and credentials, and stops cleanly on SIGTERM."""
    with subprocess.Popen(
        [sys.executable, "-m", "violet_async", "fake-server", "--port", "0", "--orders", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("base_url=http://127.0.0.1:")
        lines = [proc.stdout.readline() for _ in range(5)]
        assert lines[0].startswith("app_id=")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=20) == 0
        assert "fake-server stopped" in rest
