"""Every file in examples/ runs as written, and the code README and docs show is theirs."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from violet_async.testing import FakeViolet

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60.0

# example -> a line its output must contain (a regular expression).
EXPECTED = {
    "quickstart.py": r"^refund 4000\d\d: 500 cents on bag 200001, COMPLETED$",
    "refund_and_cancel.py": r"^cancelled bag 200003: refund 4000\d\d of \d+ cents$",
    "handle_errors.py": r"^refused by Violet \(400, error_code \d+\): .+$",
    "batch_from_python.py": r"^first run: \{'succeeded': 5\}; second run: \{'already_done': 5\}$",
    "fakeviolet_in_your_tests.py": r"^3 passed",
    "aiohttp_webhook.py": r"^webhook \S+: order 100001$",
    "webhook_any_framework.py": r"^bag 200001: PARTIALLY_REFUNDED$",
    "fleet_plain_loop.py": r"^fleet: \{'applied': 5\}; refunds at Violet: 5$",
    "audit_from_python.py": r"^audit: \{'as_asked': 3\}$",
    "web_app_refund.py": r"^4 clicks, 1 refund: \{'state': 'refunded', 'refund_id': \d+, .*\}$",
    "arq_refund_job.py": r"^job delivered twice: refund (\d+), then refund \1$",
}
# These always play Violet with an embedded FakeViolet (a pytest file; a webhook sender).
EMBEDDED_ONLY = {
    "fakeviolet_in_your_tests.py",
    "aiohttp_webhook.py",
    "webhook_any_framework.py",
    "fleet_plain_loop.py",  # also starts its own redis-server (needs it installed)
}


def clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIOLET_")}
    return {**env, "PYTHONWARNINGS": "error", **extra}


async def run_example(name: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``examples/NAME`` in a subprocess without blocking this loop (the server
    it talks to lives here); returns the exit code and its stdout + stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode()


def test_every_example_is_tested() -> None:
    """Each file in examples/ has an expected line of output here."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - EMBEDDED_ONLY))
async def test_example_runs_against_violet_env(name: str) -> None:
    """The example talks to the server VIOLET_* points at and exits 0 with its result."""
    # The examples use orders 100001 to 100013 of a server seeded like fake-server.
    async with FakeViolet(orders=13, seed=1) as fake:
        env = clean_env(
            {
                "VIOLET_APP_ID": str(fake.app_id),
                "VIOLET_APP_SECRET": fake.app_secret,
                "VIOLET_USERNAME": fake.username,
                "VIOLET_PASSWORD": fake.password,
                "VIOLET_BASE_URL": fake.base_url,
            }
        )
        code, out = await run_example(name, env)
        assert code == 0, out
        assert re.search(EXPECTED[name], out, re.MULTILINE), out
        assert fake.ledger.requests, "the example never reached the server VIOLET_* names"


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_example_runs_with_no_configuration(name: str) -> None:
    """With no VIOLET_* variables the example starts its own FakeViolet and exits 0."""
    code, out = await run_example(name, clean_env())
    assert code == 0, out
    assert re.search(EXPECTED[name], out, re.MULTILINE), out


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


def shown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", shown_files(), ids=lambda p: p.name)
def test_python_shown_in_docs_is_copied_from_an_example(path: Path) -> None:
    """Every python block in README / docs is a verbatim excerpt of a file in examples/."""
    sources = [p.read_text() for p in EXAMPLES.glob("*.py")]
    for block in python_blocks(path.read_text()):
        assert any(block in source for source in sources), f"not in examples/:\n{block}"
