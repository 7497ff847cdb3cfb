"""The operator's scenarios from the "cannot hurt themselves" issue, each a real
subprocess run of the console script against FakeViolet on 127.0.0.1 (port 0)."""
# The files read here are tiny journals and inputs of a test: blocking reads are fine.
# ruff: noqa: ASYNC230, ASYNC240

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from violet_async.testing import FakeViolet, FaultPlan

from .test_batch_cli import env_for


async def cli(
    fake: FakeViolet | None, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m violet_async ARGS` to the end: (exit code, stdout, stderr)."""
    environ = {**os.environ, **(env_for(fake) if fake is not None else {}), **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "violet_async",
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def refunds_csv(path: Path, fake: FakeViolet, count: int, amount: int = 100) -> Path:
    rows = [f"{o},{b},{amount},batch" for o, b in fake.seeded[:count]]
    path.write_text("order_id,bag_id,amount_refunded,reason\n" + "\n".join(rows) + "\n")
    return path


def sent(fake: FakeViolet) -> int:
    return fake.ledger.requests["refund"] + fake.ledger.requests["cancel"]


async def test_unknown_columns_and_keys_exit_2_naming_them(tmp_path: Path) -> None:
    """A typo'd amount column (CSV or JSON), a cancels file given to refund and an unknown
    memo column each exit 2 naming the column and the file; nothing is sent."""
    async with FakeViolet(orders=3, seed=2) as fake:
        (o, b), *_ = fake.seeded
        typo = tmp_path / "typo.csv"
        typo.write_text(f"order_id,bag_id,amount\n{o},{b},500\n")
        code, out, err = await cli(fake, "refund", str(typo), "--dry-run")
        assert code == 2
        assert f"{typo}:line 1: unknown column(s) for `refund`: 'amount'" in err
        assert "did you mean 'amount_refunded'" in err
        assert "dry run" not in out
        jtypo = tmp_path / "typo.jsonl"
        jtypo.write_bytes(orjson.dumps({"order_id": o, "bag_id": b, "amount": 500}) + b"\n")
        code, _, err = await cli(fake, "refund", str(jtypo))
        assert code == 2
        assert f"{jtypo}:line 1: unknown column(s)" in err
        cancels = tmp_path / "cancels.csv"
        cancels.write_text(f"order_id,bag_id,reason_code\n{o},{b},CUSTOMER\n")
        code, _, err = await cli(fake, "refund", str(cancels))
        assert code == 2
        assert "'reason_code' is a cancel column: is this a file for `cancel`?" in err
        memo = tmp_path / "memo.csv"
        memo.write_text(f"order_id,bag_id,amount_refunded,memo\n{o},{b},500,hi\n")
        code, _, err = await cli(fake, "refund", str(memo))
        assert code == 2
        assert "'memo'" in err
        assert sent(fake) == 0
        assert fake.ledger.requests["login"] == 0


async def test_no_amount_is_never_a_silent_full_refund(tmp_path: Path) -> None:
    """An empty amount is refused with its line; "full" or --full-refunds says it, and the
    dry run's plan shows the rows, whole-bag refunds and the sum of amounts."""
    async with FakeViolet(orders=4, seed=2) as fake:
        (o1, b1), (o2, b2), (o3, b3), _ = fake.seeded
        path = tmp_path / "in.csv"
        path.write_text(f"order_id,bag_id,amount_refunded\n{o1},{b1},250\n{o2},{b2},\n{o3},{b3},\n")
        code, _, err = await cli(fake, "refund", str(path), "--dry-run")
        assert code == 2
        assert f"{path}:line 3: amount_refunded: is empty" in err
        assert f"{path}:line 4: amount_refunded: is empty" in err
        code, out, _ = await cli(fake, "refund", str(path), "--dry-run", "--full-refunds")
        assert code == 0
        assert "refunds                         3" in out
        assert "whole-bag refunds               2" in out
        assert "sum of amounts               2.50" in out
        path.write_text(f"order_id,bag_id,amount_refunded\n{o1},{b1},250\n{o2},{b2},FULL\n")
        code, out, _ = await cli(fake, "refund", str(path), "--dry-run")
        assert code == 0
        assert "whole-bag refunds               1" in out
        assert sent(fake) == 0


async def test_bad_ids_fail_the_up_front_check_with_every_line(tmp_path: Path) -> None:
    """bag_id -3 or 0 (JSON lines) and 0 (CSV) fail the check before anything is sent,
    each reported with its line, even when other rows are good."""
    async with FakeViolet(orders=3, seed=2) as fake:
        (o, b), *_ = fake.seeded
        rows = [
            {"order_id": o, "bag_id": b, "amount_refunded": 100},
            {"order_id": o, "bag_id": -3, "amount_refunded": 100},
            {"order_id": o, "bag_id": 0, "amount_refunded": 100},
            {"order_id": True, "bag_id": b, "amount_refunded": 100},
            {"order_id": "٣", "bag_id": b, "amount_refunded": 100},
        ]
        jsonl = tmp_path / "ids.jsonl"
        jsonl.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
        for extra in ((), ("--dry-run",)):
            code, _, err = await cli(fake, "refund", str(jsonl), *extra)
            assert code == 2
            for line in (2, 3, 4, 5):
                assert f"{jsonl}:line {line}: " in err
            assert f"{jsonl}:line 1:" not in err
        csv = tmp_path / "ids.csv"
        csv.write_text(f"order_id,bag_id,amount_refunded\n{o},{b},100\n{o},0,100\n0{o},{b},1\n")
        code, _, err = await cli(fake, "refund", str(csv), "--dry-run")
        assert code == 2
        assert f"{csv}:line 3: bag_id: must be a positive id, got 0" in err
        assert "line 4" not in err  # a leading zero is still a positive ASCII integer
        assert sent(fake) == 0


async def test_fix_one_row_and_rerun_does_exactly_the_one_new_thing(tmp_path: Path) -> None:
    """After a row fails, editing it and re-running the same command sends only that row;
    the same file with a new (or lost) journal refunds nobody twice."""
    async with FakeViolet(orders=6, seed=3) as fake:
        path = refunds_csv(tmp_path / "in.csv", fake, 5)
        lines = path.read_text().splitlines()
        o, b = fake.seeded[2]
        lines[3] = f"{o},999999,100,batch"  # a wrong bag: Violet refuses it
        path.write_text("\n".join(lines) + "\n")
        code, out, _ = await cli(fake, "refund", str(path))
        assert code == 1
        assert "line 4: order" in out
        assert "NotFoundError" in out
        assert fake.ledger.total_refunds == 4
        code, out, err = await cli(fake, "refund", str(path))
        assert code == 1, "a skipped failure is not a success"
        assert "already_failed          1" in out
        lines[3] = f"{o},{b},100,batch"
        path.write_text("\n".join(lines) + "\n")
        code, out, err = await cli(fake, "refund", str(path))
        assert code == 0, out + err
        assert "already_done            4" in out
        assert "(1 sent this run)" in out
        assert "different input" not in out + err
        assert fake.ledger.total_refunds == 5
        code, out, err = await cli(fake, "refund", str(path), "--journal", str(tmp_path / "new"))
        assert code == 1
        assert "already_present         5" in out
        assert "(0 sent this run)" in out
        assert "--allow-repeat" not in out + err, "no message suggests a double refund"
        assert fake.ledger.total_refunds == 5
        assert fake.ledger.double_refunds() == {}


class HeldAfterFirst(FakeViolet):
    """FakeViolet that holds every refund POST after the first one until ``go`` is set:
    the first run cannot finish before the second has tried the journal, however
    loaded the machine (it once did, and the second run found nothing to hold)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()

    async def _refund(self, request: web.Request) -> web.StreamResponse:
        if self.ledger.total_refunds >= 1:
            await self.go.wait()
        return await super()._refund(request)


async def test_two_runs_on_one_journal_the_second_exits_2_naming_the_holder(
    tmp_path: Path,
) -> None:
    """While a run holds the journal, a second run of the same command exits 2 at once
    naming the first one's pid, and every bag is refunded once."""
    count = 40
    async with HeldAfterFirst(
        orders=count, seed=4, faults=FaultPlan(latency=(0.05, 0.1), seed=4)
    ) as fake:
        path = refunds_csv(tmp_path / "in.csv", fake, count)
        journal = Path(f"{path}.refund.journal.jsonl")
        env = {**os.environ, **env_for(fake)}
        first = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "violet_async", "refund", str(path), "--concurrency", "2",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            for _ in range(400):
                await asyncio.sleep(0.05)
                if journal.exists() and b'"done"' in journal.read_bytes():
                    break
            started = time.monotonic()
            code, _, err = await cli(fake, "refund", str(path), "--concurrency", "2")
            assert code == 2
            assert f"in use by process {first.pid}" in err
            assert time.monotonic() - started < 10
        finally:
            fake.go.set()
        assert await first.wait() == 0
        assert fake.ledger.total_refunds == count
        assert fake.ledger.double_refunds() == {}


async def test_kill_9_then_a_torn_tail_then_resume_refunds_each_bag_once(tmp_path: Path) -> None:
    """kill -9 mid-run, a torn last journal line, a resumed run (which cuts the tail and
    appends cleanly), a second kill, a third run: each bag is refunded exactly once."""
    count = 120
    async with FakeViolet(
        orders=count, seed=6, faults=FaultPlan(latency=(0.005, 0.02), seed=6)
    ) as fake:
        path = refunds_csv(tmp_path / "in.csv", fake, count)
        journal = Path(f"{path}.refund.journal.jsonl")
        args = [str(path), "--concurrency", "4", "--settle", "0.5", "--timeout", "0.5"]
        env = {**os.environ, **env_for(fake)}

        async def killed_after(done: int) -> None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "violet_async", "refund", *args,
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            for _ in range(600):
                await asyncio.sleep(0.02)
                if journal.exists() and journal.read_bytes().count(b'"done"') >= done:
                    break
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

        await killed_after(20)
        torn = b'{"key":"refund:0000#0","line":99,"state":"do'
        with journal.open("ab") as handle:
            handle.write(torn)
        await killed_after(60)
        data = journal.read_bytes()
        assert torn not in data
        assert all(orjson.loads(line) for line in data.splitlines()[:-1])
        await asyncio.sleep(0.1)
        code, out, err = await cli(fake, "refund", *args)
        assert code == 0, out + err
        fake.settle()
        assert fake.ledger.double_refunds() == {}
        assert fake.ledger.total_refunds == count


async def test_wrong_password_stops_at_once_with_exit_2_and_marks_nothing(
    tmp_path: Path,
) -> None:
    """A refused login or a closed port exits 2 within seconds, sends nothing, marks no
    row failed; the next run with the right credentials refunds every bag, exit 0."""
    async with FakeViolet(orders=10, seed=7) as fake:
        path = refunds_csv(tmp_path / "in.csv", fake, 10)
        journal = Path(f"{path}.refund.journal.jsonl")
        started = time.monotonic()
        code, out, err = await cli(fake, "refund", str(path), env={"VIOLET_PASSWORD": "nope"})
        elapsed = time.monotonic() - started
        assert code == 2
        assert "Violet refused the credentials" in err
        assert "nothing was sent" in err
        assert elapsed < 15
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        code, _, err = await cli(
            fake, "refund", str(path), env={"VIOLET_BASE_URL": f"http://127.0.0.1:{closed}/v1"}
        )
        assert code == 2
        assert "cannot reach Violet" in err
        assert b'"failed"' not in journal.read_bytes()
        assert sent(fake) == 0
        code, out, _ = await cli(fake, "refund", str(path))
        assert code == 0
        assert "succeeded              10" in out
        assert fake.ledger.total_refunds == 10


async def test_exit_codes_and_the_summary_names_failed_lines(tmp_path: Path) -> None:
    """Exit 0 only when every row is done; the summary names failed lines with their
    error and where the full list is."""
    async with FakeViolet(orders=15, seed=8) as fake:
        o, _ = fake.seeded[0]
        rows = [f"{o},{900000 + n},100,x" for n in range(12)]
        path = tmp_path / "in.csv"
        path.write_text("order_id,bag_id,amount_refunded,reason\n" + "\n".join(rows) + "\n")
        code, out, _ = await cli(fake, "refund", str(path))
        assert code == 1
        assert "12 row(s) need attention (all of them in " in out
        assert out.count("NotFoundError: ") == 10
        problems = Path(f"{path}.refund.journal.jsonl.problems.txt")
        assert len(problems.read_text().splitlines()) == 12
        ok = refunds_csv(tmp_path / "ok.csv", fake, 3)
        assert (await cli(fake, "refund", str(ok)))[0] == 0
        assert (await cli(fake, "refund", str(ok)))[0] == 0  # already done is success
