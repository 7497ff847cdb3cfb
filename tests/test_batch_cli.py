"""`violet-async refund|cancel FILE` against FakeViolet, including kill -9 and resume."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import orjson
import pytest

from violet_async._batch_cli import BatchOptions, run_file
from violet_async.testing import FakeViolet, FaultPlan


def env_for(fake: FakeViolet) -> dict[str, str]:
    return {
        "VIOLET_APP_ID": str(fake.app_id),
        "VIOLET_APP_SECRET": fake.app_secret,
        "VIOLET_USERNAME": fake.username,
        "VIOLET_PASSWORD": fake.password,
        "VIOLET_BASE_URL": fake.base_url,
    }


def write_csv(path: Path, fake: FakeViolet, count: int) -> Path:
    lines = ["order_id,bag_id,amount_refunded,reason,restock_items"]
    for n, (order_id, bag_id) in enumerate(fake.seeded[:count]):
        amount = "full" if n % 2 else "100"
        lines.append(f"{order_id},{bag_id},{amount},batch,{'true' if n % 3 == 0 else ''}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def run(kind: str, path: Path, **options: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_file(kind, path, BatchOptions(**options), out=out, err=err)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def fake_env(monkeypatch: pytest.MonkeyPatch) -> FakeViolet:
    fake = FakeViolet(orders=40, seed=5)
    await fake.start()
    for key, value in env_for(fake).items():
        monkeypatch.setenv(key, value)
    yield fake  # type: ignore[misc]
    await fake.stop()


async def test_refund_file_runs_and_summarizes(fake_env: FakeViolet, tmp_path: Path) -> None:
    """A CSV of refunds runs to completion, exit 0, with a summary and results file."""
    path = write_csv(tmp_path / "in.csv", fake_env, 30)
    code, out, _ = await run("refund", path, output=tmp_path / "out.jsonl")
    assert code == 0
    assert "succeeded              30" in out
    assert "refunds/s" in out
    rows = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert len(rows) == 30
    assert {r["outcome"] for r in rows} == {"succeeded"}
    assert fake_env.ledger.total_refunds == 30
    code, out, _ = await run("refund", path)
    assert code == 0
    assert "already_done           30" in out
    assert fake_env.ledger.total_refunds == 30


async def test_jsonl_cancel_file(fake_env: FakeViolet, tmp_path: Path) -> None:
    """JSON lines input for cancels, with reason codes."""
    path = tmp_path / "in.jsonl"
    lines = [
        orjson.dumps({"order_id": o, "bag_id": b, "reason_code": "CUSTOMER"})
        for o, b in fake_env.seeded[:5]
    ]
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    code, _, _ = await run("cancel", path)
    assert code == 0
    assert fake_env.ledger.requests["cancel"] == 5


async def test_bad_rows_are_all_reported_and_nothing_is_sent(
    fake_env: FakeViolet, tmp_path: Path
) -> None:
    """Every bad row is listed with its line number; exit 2; zero requests."""
    path = tmp_path / "bad.csv"
    path.write_text(
        "order_id,bag_id,amount_refunded,restock_items,skus\n"
        "1,2,1.5,,\n"
        "x,3,,,\n"
        "4,5,10,maybe,\n"
        '6,7,10,,"[{""order_sku_id"": 1, ""quantity_refunded"": 0}]"\n'
        "8,9,10,,\n"
    )
    code, _, err = await run("refund", path)
    assert code == 2
    for line, field in (
        (2, "amount_refunded"),
        (3, "order_id"),
        (4, "restock_items"),
        (5, "quantity_refunded"),
    ):
        assert f"line {line}: {field}" in err
    assert "line 6" not in err
    assert sum(fake_env.ledger.requests.values()) == 0


async def test_bad_jsonl_rows(fake_env: FakeViolet, tmp_path: Path) -> None:
    """Non-JSON, non-object and float-amount JSON rows are reported."""
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"order_id": 1, "bag_id": 2, "amount_refunded": 1.0}\nnope\n[1]\n'
        '{"order_id": 1, "bag_id": 2, "skus": [{"order_sku_id": 1, "qty": 1}]}\n'
    )
    code, _, err = await run("refund", path)
    assert code == 2
    assert "4 problem(s)" in err
    for line in (1, 2, 3, 4):
        assert f"bad.jsonl:line {line}:" in err
    assert sum(fake_env.ledger.requests.values()) == 0


async def test_dry_run_sends_nothing(fake_env: FakeViolet, tmp_path: Path) -> None:
    """--dry-run validates and prints the plan; the server sees no request."""
    path = write_csv(tmp_path / "in.csv", fake_env, 5)
    code, out, _ = await run("refund", path, dry_run=True)
    assert code == 0
    assert out.count("  line ") == 5
    assert "whole-bag refunds               2" in out
    assert sum(fake_env.ledger.requests.values()) == 0


async def test_failures_exit_1(fake_env: FakeViolet, tmp_path: Path) -> None:
    """A row Violet refuses makes the run exit 1, with the class in the summary."""
    path = tmp_path / "in.csv"
    order_id, bag_id = fake_env.seeded[0]
    path.write_text(
        f"order_id,bag_id,amount_refunded\n{order_id},{bag_id},full\n{order_id},999999,full\n"
    )
    code, out, _ = await run("refund", path)
    assert code == 1
    assert "NotFoundError" in out


async def test_missing_file_and_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing file or missing credentials exit 2 with a message."""
    assert (await run("refund", tmp_path / "none.csv"))[0] == 2
    path = tmp_path / "in.csv"
    path.write_text("order_id,bag_id,amount_refunded\n1,2,100\n")
    monkeypatch.delenv("VIOLET_APP_ID", raising=False)
    code, _, err = await run("refund", path)
    assert code == 2
    assert "VIOLET_APP_ID" in err


async def test_kill_9_mid_run_then_resume_refunds_each_bag_once(tmp_path: Path) -> None:
    """SIGKILL the CLI mid-run, run the same command again: every item is refunded
    exactly once according to the server's ledger."""
    count = 300
    async with FakeViolet(
        orders=count, seed=8, faults=FaultPlan(latency=(0.005, 0.02), seed=8)
    ) as fake:
        path = write_csv(tmp_path / "in.csv", fake, count)
        journal = tmp_path / "in.csv.refund.journal.jsonl"
        command = [sys.executable, "-m", "violet_async", "refund", str(path), "--concurrency", "8"]
        # Items the kill caught between journaling and sending wait out a settle window
        # on resume: keep it short here (real seconds).
        command += ["--settle", "0.5", "--timeout", "0.5"]
        env = {**os.environ, **env_for(fake)}
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(600):  # up to 30 s for 60 items to be done
            await asyncio.sleep(0.05)
            if journal.exists() and journal.read_bytes().count(b'"done"') >= 60:
                break
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        text = journal.read_bytes()
        done_before = text.count(b'"state":"done"')
        assert 60 <= done_before < count, "the kill must land mid-run"
        await asyncio.sleep(0.1)  # requests in flight at the kill may still commit
        resumed = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await resumed.communicate()
        assert resumed.returncode == 0, err.decode()
        assert b"already_done" in out
        fake.settle()
        ledger = fake.ledger
        assert ledger.double_refunds() == {}
        assert ledger.total_refunds == count
        assert all(ledger.refunds_per_bag[b] == 1 for _, b in fake.seeded)


async def test_ctrl_c_stops_cleanly_with_130_then_resume_finishes(tmp_path: Path) -> None:
    """SIGINT stops feeding, lets in-flight calls finish, prints the summary and exits
    130; the same command then finishes the rest, each bag refunded once."""
    count = 200
    async with FakeViolet(
        orders=count, seed=9, faults=FaultPlan(latency=(0.005, 0.02), seed=9)
    ) as fake:
        path = write_csv(tmp_path / "in.csv", fake, count)
        journal = tmp_path / "in.csv.refund.journal.jsonl"
        command = [sys.executable, "-m", "violet_async", "refund", str(path), "--concurrency", "4"]
        env = {**os.environ, **env_for(fake)}
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(600):
            await asyncio.sleep(0.05)
            if journal.exists() and journal.read_bytes().count(b'"done"') >= 30:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = await proc.communicate()
        assert proc.returncode == 130
        assert b"interrupted" in out
        assert b"summary" in out
        text = journal.read_bytes()
        # In-flight calls finished: nothing is left "sent" without an outcome.
        assert text.count(b'"state":"sent"') == text.count(b'"state":"done"')
        assert text.count(b'"state":"done"') < count
        again = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await again.wait() == 0
        assert fake.ledger.double_refunds() == {}
        assert fake.ledger.total_refunds == count


def test_progress_bar_on_a_terminal_and_lines_otherwise() -> None:
    """A TTY gets a redrawn bar ending in a newline; a pipe gets plain lines."""
    from violet_async._batch_cli import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = _Progress(3, tty)
    for _ in range(3):
        bar.tick()
    assert "\r[" in tty.getvalue()
    assert "3/3" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    pipe = io.StringIO()
    lines = _Progress(2, pipe)
    lines.tick()
    lines.tick()
    first, second = pipe.getvalue().splitlines()
    assert first.startswith("progress 1/2 (")
    assert second.startswith("progress 2/2 (")


async def test_shipping_keys_are_checked_like_sku_keys(
    fake_env: FakeViolet, tmp_path: Path
) -> None:
    """Round 2, row 8: an unknown key in a JSONL ``shipping`` object is a row error
    naming the field, its name escaped (no raw ESC reaches the terminal), nothing sent."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"order_id": 1, "bag_id": 2, "shipping": {"amount": 5, "\\u001b[2Jx": 1}}\n')
    code, _, err = await run("refund", path)
    assert code == 2
    assert "line 1: shipping: unknown fields" in err
    assert "\x1b" not in err
    assert "\\x1b[2Jx" in err
    assert sum(fake_env.ledger.requests.values()) == 0


async def test_a_csv_cell_over_the_csv_limit_is_a_row_error(
    fake_env: FakeViolet, tmp_path: Path
) -> None:
    """A CSV cell over 128 KiB ends in a typed row error with its line, exit 2, never
    an uncaught ``_csv.Error``; nothing is sent."""
    path = tmp_path / "big.csv"
    path.write_text(
        f"order_id,bag_id,amount_refunded,reason\n1,2,100,ok\n3,4,100,{'r' * 140_000}\n"
    )
    code, _, err = await run("refund", path)
    assert code == 2
    assert "big.csv:line 3: unreadable CSV (field larger than field limit" in err
    assert sum(fake_env.ledger.requests.values()) == 0
