"""A new operator's first week with the console script: each a real subprocess run of
`violet-async` (the installed entry point) against FakeViolet on 127.0.0.1 (port 0)."""
# The files read here are tiny journals and inputs of a test: blocking reads are fine.

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import orjson
import pytest

from violet_async.testing import FakeViolet

from .test_batch_cli import env_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("violet-async")
# Credentials that never reach a server (for commands that fail before any I/O).
NO_SERVER = {"VIOLET_APP_ID": "1", "VIOLET_APP_SECRET": "s", "VIOLET_TOKEN": "t"}


async def run(
    *args: str, env: dict[str, str] | None = None, python: str | None = None
) -> tuple[int, str, str]:
    """Run the console script (or ``python -c PROGRAM ARGS``): (exit code, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VIOLET_")}
    command = [sys.executable, "-c", python, *args] if python else [str(SCRIPT), *args]
    proc = await asyncio.create_subprocess_exec(
        *command,
        env={**environ, "PYTHONWARNINGS": "error", **(env or {})},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def journal_states(path: Path) -> list[str]:
    journal = path.with_name(path.name + ".refund.journal.jsonl")
    if not journal.exists():
        return []
    lines = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
    return [line["state"] for line in lines if line.get("type") != "header"]


def test_the_console_script_is_installed() -> None:
    assert SCRIPT.is_file(), f"no {SCRIPT}: install the package (pip install -e .)"


@pytest.mark.parametrize("typo", ["/..", " ", "/v2"], ids=["no-v1", "trailing-space", "v2"])
async def test_a_wrong_base_url_path_exits_2_and_marks_no_row_failed(
    tmp_path: Path, typo: str
) -> None:
    """The login answers 404: exit 2 naming VIOLET_BASE_URL; nothing sent, no row
    failed; with the URL fixed the same command sends the row."""
    async with FakeViolet(orders=2, seed=1) as fake:
        (o, b), _ = fake.seeded
        path = tmp_path / "refunds.csv"
        path.write_text(f"order_id,bag_id,amount_refunded\n{o},{b},100\n")
        wrong = {**env_for(fake), "VIOLET_BASE_URL": fake.base_url + typo}
        code, out, err = await run("refund", str(path), env=wrong)
        assert code == 2, out + err
        assert "VIOLET_BASE_URL" in err
        assert "/v1" in err
        assert "failed" not in journal_states(path)
        assert fake.ledger.requests["refund"] == 0
        code, out, err = await run("refund", str(path), env=env_for(fake))
        assert code == 0, out + err
        assert "(1 sent this run)" in out
        assert fake.ledger.refunds_per_bag[b] == 1


async def test_a_rerun_after_a_refused_row_points_at_retry_failed(tmp_path: Path) -> None:
    """A row Violet refused is skipped on the re-run, and the summary says how to send
    it again; a run that refunded nothing prints no "refunds/s 0.0"."""
    async with FakeViolet(orders=2, seed=1) as fake:
        (o, _), _ = fake.seeded
        path = tmp_path / "refunds.csv"
        path.write_text(f"order_id,bag_id,amount_refunded\n{o},999999,100\n")
        code, out, err = await run("refund", str(path), env=env_for(fake))
        assert code == 1, out + err
        assert "failed: NotFoundError" in out
        assert "refunds/s" not in out
        assert "sent this run)" in out
        code, out, err = await run("refund", str(path), env=env_for(fake))
        assert code == 1, out + err
        assert "already_failed          1" in out
        assert "--retry-failed" in out
        assert "refunds/s" not in out
        assert "(0 sent this run)" in out


async def test_a_csv_saved_by_excel_with_a_bom_runs(tmp_path: Path) -> None:
    """UTF-8 with a byte-order mark: the first column is order_id, not '\\ufefforder_id'."""
    async with FakeViolet(orders=2, seed=1) as fake:
        (o, b), _ = fake.seeded
        path = tmp_path / "excel.csv"
        path.write_bytes(f"\ufefforder_id,bag_id,amount_refunded\r\n{o},{b},250\r\n".encode())
        code, out, err = await run("refund", str(path), env=env_for(fake))
        assert code == 0, out + err
        assert fake.ledger.refunds_per_bag[b] == 1
        jsonl = tmp_path / "excel.jsonl"
        jsonl.write_bytes("\ufeff".encode() + orjson.dumps({"order_id": o, "bag_id": b}) + b"\n")
        code, out, err = await run("cancel", str(jsonl), "--dry-run", env=env_for(fake))
        assert code == 0, out + err


@pytest.mark.parametrize(("separator", "word"), [(";", "semicolons"), ("\t", "tabs")])
async def test_a_semicolon_separated_file_gets_a_hint(
    tmp_path: Path, separator: str, word: str
) -> None:
    path = tmp_path / "refunds.csv"
    path.write_text(separator.join(["order_id", "bag_id", "amount_refunded"]) + "\n1;2;3\n")
    code, _, err = await run("refund", str(path), "--dry-run", env=NO_SERVER)
    assert code == 2
    assert f"separated by {word}, not commas" in err
    assert "did you mean" not in err


async def test_configuration_messages_name_variables_and_real_flags(tmp_path: Path) -> None:
    """No Python keyword arguments and no flag the CLI does not have."""
    path = tmp_path / "refunds.csv"
    path.write_text("order_id,bag_id,amount_refunded\n100001,200001,100\n")
    code, out, err = await run(
        "refund", str(path), env={"VIOLET_APP_ID": "1", "VIOLET_APP_SECRET": "s"}
    )
    assert code == 2
    assert "VIOLET_USERNAME and VIOLET_PASSWORD" in err
    assert "token=" not in err
    remote = {**NO_SERVER, "VIOLET_BASE_URL": "http://violet.example/v1"}
    code, out, err = await run("refund", str(path), env=remote)
    assert code == 2
    assert "VIOLET_BASE_URL" in err
    assert "use https" in err
    assert "allow_insecure_http" not in out + err


# The core install: redis-py and arq are not importable.
WITHOUT_FLEET_EXTRA = """
import sys
sys.modules["redis"] = None
sys.modules["arq"] = None
from violet_async.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["worker", "enqueue", "status"])
async def test_fleet_commands_on_the_core_install_name_the_extra(command: str) -> None:
    code, out, err = await run(
        command, "--redis", "redis://127.0.0.1:1/0", python=WITHOUT_FLEET_EXTRA
    )
    assert code == 2, out + err
    assert "pip install 'violet-async[fleet]'" in err
    assert "invalid choice" not in err


async def test_an_unreachable_redis_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A port bound but not listening refuses at once: one clean line each, exit 2."""
    path = tmp_path / "refunds.csv"
    path.write_text("order_id,bag_id,amount_refunded\n100001,200001,100\n")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
        for args in (["enqueue", str(path)], ["status"], ["worker", "--burst"]):
            fleet = {**NO_SERVER, "VIOLET_FLEET_KEY": "fleet-test-key-not-a-secret-0123"}
            code, out, err = await run(*args, "--redis", url, env=fleet)
            assert code == 2, out + err
            assert "cannot reach Redis" in err
            assert "retries remaining" not in out + err
            assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("command", "described"),
    [
        ("enqueue", "each row at most once"),
        ("worker", "one lock per bag"),
        ("status", "counts by state"),
    ],
)
async def test_fleet_help_has_descriptions_defaults_and_exit_codes(
    command: str, described: str
) -> None:
    from violet_async.fleet._ledger import DEFAULT_PREFIX

    code, out, _ = await run(command, "--help")
    assert code == 0
    before_options = " ".join(out.split("options:")[0].split())
    assert described in before_options, "a description before the options"
    assert f"(default: {DEFAULT_PREFIX})" in out
    assert "exit codes:" in out
    assert "Redis unreachable" in out
    if command == "worker":
        assert "(default: 16)" in out
        assert "VIOLET_APP_ID" in out


async def test_a_dry_run_says_cents_and_currency_and_warns_on_a_huge_amount(
    tmp_path: Path,
) -> None:
    path = tmp_path / "refunds.csv"
    path.write_text("order_id,bag_id,amount_refunded\n100001,200001,750\n100002,200002,99999999\n")
    code, out, err = await run("refund", str(path), "--dry-run", env=NO_SERVER)
    assert code == 0, out + err
    assert "1,000,007.49  (from cents, in each order's own currency)" in out
    assert "warning: line 3: amount_refunded is 99,999,999 cents (999,999.99)" in out
    assert "line 2: amount" not in out


async def test_a_zero_cent_refund_is_a_row_error_and_nothing_is_sent(tmp_path: Path) -> None:
    async with FakeViolet(orders=2, seed=1) as fake:
        (o1, b1), (o2, b2) = fake.seeded
        path = tmp_path / "refunds.csv"
        path.write_text(f"order_id,bag_id,amount_refunded\n{o1},{b1},100\n{o2},{b2},0\n")
        code, _, err = await run("refund", str(path), env=env_for(fake))
        assert code == 2
        assert f"{path}:line 3: amount_refunded: is 0" in err
        assert fake.ledger.requests["refund"] == 0


async def test_the_fakeviolet_example_runs_under_pytest_inside_the_repo() -> None:
    """`pytest examples/fakeviolet_in_your_tests.py`, as its docstring says: the suite's
    coverage gate does not apply to a run of the example alone."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "examples/fakeviolet_in_your_tests.py",
        "-q",
        "-p",
        "no:cacheprovider",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    assert "3 passed" in out.decode()
    assert "Required test coverage" not in out.decode()
