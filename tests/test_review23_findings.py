"""Review 23: attacks on the batch command line and the fleet.

Each test scripts what it attacks with: its own server (aiohttp.web on 127.0.0.1, port
0) where Violet is involved, its own environment and files where the command line is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: A Redis password as people write them, with a character a URL reserves: redis-py,
#: arq and urllib quote what they could not read of the URL, which is this password
#: (or the rest of it after the '/').
PASSWORD = "Pa55w0rdSecretTail"
BAD_URLS = (
    f"redis://default:{PASSWORD}?x@redis.internal:6379/0",
    f"redis://:{PASSWORD}#frag@redis.internal:6379",
    f"redis://:head/{PASSWORD}@127.0.0.1:6390/0",
)


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIOLET_", "PYTHONWARNINGS"))}
    env.update(
        VIOLET_APP_ID="11",
        VIOLET_APP_SECRET="review23-app-secret-0123",
        VIOLET_USERNAME="review23",
        VIOLET_PASSWORD="review23-password-0123",
        # Nothing listens on port 9: a run that got past its checks would stop there.
        VIOLET_BASE_URL="http://127.0.0.1:9/v1",
        VIOLET_FLEET_KEY="review23-fleet-key-0123456789",
    )
    env.update(extra)
    return env


def _leaks(text: str) -> bool:
    return PASSWORD in text or PASSWORD[:8] in text


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_redis_url_that_cannot_be_read_stops_no_batch_and_shows_no_password(
    url: str, tmp_path: Path
) -> None:
    """Every ``violet-async`` command imports the fleet, and ``WorkerSettings`` read
    VIOLET_REDIS_URL as the package was imported: a password holding '?', '#' or '/'
    (not percent-encoded) made ``violet-async refund FILE`` (no fleet at all) die with a
    traceback ending in the password, on the terminal and in every CI log."""
    rows = tmp_path / "rows.csv"
    rows.write_text("order_id,bag_id,amount_refunded\n31,301,300\n", encoding="utf-8")
    env = _env(VIOLET_REDIS_URL=url)

    batch = _run(["-m", "violet_async", "refund", str(rows), "--dry-run"], env, tmp_path)
    assert not _leaks(batch.stdout + batch.stderr), batch.stderr
    assert batch.returncode == 0, batch.stderr
    assert "Traceback" not in batch.stderr

    for command in (["status"], ["enqueue", str(rows)], ["worker", "--burst"]):
        fleet = _run(["-m", "violet_async", *command], env, tmp_path)
        assert not _leaks(fleet.stdout + fleet.stderr), (command, fleet.stderr)
        assert fleet.returncode == 2, (command, fleet.stderr)
        assert "VIOLET_REDIS_URL" in fleet.stderr
        assert "percent-encoded" in fleet.stderr
        assert "Traceback" not in fleet.stderr

    # arq's own entry point (``arq violet_async.fleet.WorkerSettings``): an error that
    # names the variable, never the URL.
    arq = _run(["-c", "import violet_async.fleet as f; f.WorkerSettings"], env, tmp_path)
    assert arq.returncode != 0
    assert not _leaks(arq.stdout + arq.stderr), arq.stderr
    assert "VIOLET_REDIS_URL" in arq.stderr


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_store_or_audit_redis_url_that_cannot_be_read_shows_no_password(
    url: str, tmp_path: Path
) -> None:
    """``VIOLET_STORE`` (read by every batch run's client) and ``audit --redis`` quoted
    the same part of the URL (the password) in a traceback."""
    rows = tmp_path / "rows.csv"
    rows.write_text("order_id,bag_id,amount_refunded\n31,301,300\n", encoding="utf-8")

    batch = _run(["-m", "violet_async", "refund", str(rows)], _env(VIOLET_STORE=url), tmp_path)
    assert not _leaks(batch.stdout + batch.stderr), batch.stderr
    assert batch.returncode == 2, batch.stderr
    assert "VIOLET_STORE" in batch.stderr
    assert "Traceback" not in batch.stderr

    audit = _run(
        ["-m", "violet_async", "audit", str(rows), "--ledger", "--redis", url], _env(), tmp_path
    )
    assert not _leaks(audit.stdout + audit.stderr), audit.stderr
    assert audit.returncode == 2, audit.stderr
    assert "Traceback" not in audit.stderr


def test_a_redis_url_that_can_be_read_still_makes_worker_settings(tmp_path: Path) -> None:
    """The settings arq reads are made as before from a URL that can be read."""
    code = (
        "import violet_async.fleet as f\n"
        "s = f.WorkerSettings\n"
        "assert s is f.WorkerSettings\n"
        "print(s.redis_settings.host, s.redis_settings.port, s.redis_settings.password,"
        " s.max_jobs, s.__module__, s.__qualname__)\n"
    )
    env = _env(
        VIOLET_REDIS_URL="redis://:pa%3Fss@redis.internal:6380/2", VIOLET_FLEET_CONCURRENCY="7"
    )
    done = _run(["-c", code], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "redis.internal",
        "6380",
        "pa?ss",
        "7",
        "violet_async.fleet._arq",
        "WorkerSettings",
    ]
