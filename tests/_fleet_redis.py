"""A real redis-server for the fleet tests: its own process on 127.0.0.1, a free port, a
temporary directory, the AOF fsynced on every write (what the fleet ledger needs).

Skipped only when redis-server is missing *and* this is not CI: in CI (``CI`` set) a
missing redis-server fails the tests, never skips them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must install it: .ci/run)")
        pytest.skip("redis-server is not installed")
    return found


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = redis_binary()
    directory: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
        [
            binary,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(directory),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start (exit {proc.poll()})")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: The fleet key of the tests' producers and workers (``VIOLET_FLEET_KEY``).
FLEET_KEY = "fleet-test-key-not-a-secret-0123"


@pytest.fixture(autouse=True)
def fleet_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every fleet test runs with a fleet key in the environment (subprocesses too)."""
    monkeypatch.setenv("VIOLET_FLEET_KEY", FLEET_KEY)
    return FLEET_KEY
