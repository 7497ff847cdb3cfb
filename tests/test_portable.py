"""The command line where Windows differs from Linux: no ``fcntl`` module, and event
loops without ``add_signal_handler``. Each test runs the CLI in a subprocess whose
Python has both taken away (``fcntl`` is left only to portalocker, which uses
``msvcrt`` on Windows instead)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import portalocker
import pytest

from violet_async._signals import on_signals
from violet_async.testing import FakeViolet

from .test_batch_cli import env_for

# Runs before the CLI: what Windows lacks, taken away.
LIKE_WINDOWS = """
import asyncio, sys
import portalocker  # keeps its own fcntl, as it keeps msvcrt on Windows
sys.modules["fcntl"] = None  # any later `import fcntl` raises ImportError

def no_signal_handlers(self, *args, **kwargs):
    raise NotImplementedError  # what Windows' Proactor and Selector loops raise

asyncio.AbstractEventLoop.add_signal_handler = no_signal_handlers
asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = no_signal_handlers
for name in [n for n in sys.modules if n == "violet_async" or n.startswith("violet_async.")]:
    del sys.modules[name]
from violet_async.__main__ import main
try:
    import fcntl
except ImportError:
    pass
else:
    raise SystemExit("fcntl is still importable")
sys.exit(main(sys.argv[1:]))
"""


async def like_windows(
    *args: str, env: dict[str, str] | None = None, interrupt_when: str | None = None
) -> tuple[int, str, str]:
    """Run the CLI with ARGS in a Windows-like subprocess: (exit code, stdout, stderr).
    With ``interrupt_when``, Ctrl-C (SIGINT) is sent once stdout shows that text."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LIKE_WINDOWS,
        *args,
        env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    seen = b""
    if interrupt_when is not None:
        while interrupt_when.encode() not in seen:
            chunk = await asyncio.wait_for(proc.stdout.read(4096), 30)
            assert chunk, seen.decode()
            seen += chunk
        proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, (seen + out).decode(), err.decode()


async def test_the_demo_runs_without_fcntl_or_signal_handlers() -> None:
    """`violet-async demo` needs neither."""
    code, out, err = await like_windows("demo", "--bags", "20")
    assert code == 0, out + err
    assert re.search(r"^  journal lines \(fsynced\) +[1-9]", out, re.MULTILINE), out
    assert re.search(r"^  bags refunded twice \(ledger\) +0$", out, re.MULTILINE), out


async def test_a_batch_runs_is_locked_and_resumes_without_fcntl(tmp_path: Path) -> None:
    """refund FILE runs, a second run on the same journal while the lock is held is
    refused, and a re-run after the first skips every done row: the journal's lock
    and Ctrl-C work without fcntl and without loop signal handlers."""
    async with FakeViolet(orders=4, seed=3) as fake:
        rows = [f"{o},{b},100,portable" for o, b in fake.seeded]
        csv = tmp_path / "refunds.csv"
        csv.write_text("order_id,bag_id,amount_refunded,reason\n" + "\n".join(rows) + "\n")
        code, out, err = await like_windows("refund", str(csv), env=env_for(fake))
        assert code == 0, out + err
        assert fake.ledger.refunds_per_bag == {b: 1 for _, b in fake.seeded}
        code, out, err = await like_windows("refund", str(csv), env=env_for(fake))
        assert code == 0, out + err
        assert "already_done" in out
        code, out, err = await like_windows("audit", str(csv), env=env_for(fake))
        assert code == 0, out + err  # every row as asked, read without loop signal handlers
        with (tmp_path / "refunds.csv.refund.journal.jsonl.lock").open("r+b") as held:
            portalocker.lock(held, portalocker.LockFlags.EXCLUSIVE)  # another run holds it
            code, out, err = await like_windows("refund", str(csv), env=env_for(fake))
        assert code == 2, out + err
        assert "is in use by" in err
        assert fake.ledger.requests["refund"] == 4


async def test_ctrl_c_stops_fake_server_without_loop_signal_handlers() -> None:
    """Python's own SIGINT handler hands the stop to the loop (the Windows path)."""
    code, out, err = await like_windows(
        "fake-server", "--port", "0", interrupt_when="export VIOLET_PASSWORD"
    )
    assert code == 0, out + err
    assert "fake-server stopped" in out


async def test_on_signals_falls_back_to_python_handlers_and_restores_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In this process: a loop without signal handlers gets Python's, the signal
    reaches the loop, and the previous handler is back afterwards."""
    loop = asyncio.get_running_loop()

    def no_signal_handlers(*args: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_signal_handler", no_signal_handlers)
    before = signal.getsignal(signal.SIGINT)
    got = asyncio.Event()
    restore = on_signals(got.set)
    try:
        assert signal.getsignal(signal.SIGINT) is not before
        signal.raise_signal(signal.SIGINT)
        await asyncio.wait_for(got.wait(), 5)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before
