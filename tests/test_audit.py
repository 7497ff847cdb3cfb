"""`violet-async audit` and `violet_async.batch.audit` against a Violet scripted here:
one bag per case (a correct refund, a double, a missing one, an almost-matching one, an
EXTERNAL refund on an asked bag, an unreadable bag), each row's verdict and the exit code,
in process and through the console script."""
# The files read here are small inputs and outputs of a test: blocking reads are fine.

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import VioletClient
from violet_async._audit_cli import AuditOptions, escape, run_audit
from violet_async._batch_cli import read_items
from violet_async.batch import AuditRow, AuditStats, BatchItem, audit
from violet_async.testing import FakeClock, FakeViolet

from .conftest import TEST_POLICY, serve

APP_ID, SECRET, USER, PASSWORD = 11, "audit-app-secret-0123", "audit-user", "audit-pass-0123"
ESC = "\x1b"


def refund(
    refund_id: int, order_id: int, bag_id: int, amount: int, reason: str | None, **more: Any
) -> dict[str, Any]:
    """A refund record with every field Violet's spec page marks required."""
    return {
        "id": refund_id,
        "order_id": order_id,
        "bag_id": bag_id,
        "merchant_id": 1,
        "app_id": APP_ID,
        "transaction_id": 77,
        "gateway_transaction_id": "pi_77",
        "amount": amount,
        "reason": reason,
        "status": "COMPLETED",
        "refund_currency": "USD",
        "date_created": "2026-12-05T10:00:00Z",
        **more,
    }


@attrs.define
class Scripted:
    """Orders 1001-1007, one bag each (2001-2007), total 5000 USD cents, COMPLETED."""

    refunds: dict[int, list[dict[str, Any]]] = attrs.Factory(dict)
    forbidden: set[int] = attrs.Factory(set)
    page_size: dict[int, int] = attrs.Factory(dict)
    bag_status: dict[int, str] = attrs.Factory(dict)
    gets: int = 0
    posts: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/orders/{o}", self._order)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_post("/v1/orders/{o}/bags/{b}/{action}", self._post)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "audit-token-0123456789", "refresh_token": "r-0123"})

    async def _post(self, request: web.Request) -> web.Response:
        self.posts += 1  # an audit never sends: the test checks this stays 0
        return web.json_response({"message": "no"}, status=500)

    async def _order(self, request: web.Request) -> web.Response:
        self.gets += 1
        order_id = int(request.match_info["o"])
        bag_id = order_id + 1000
        bag = {
            "id": bag_id,
            "status": self.bag_status.get(bag_id, "COMPLETED"),
            "currency": "USD",
            "total": 5000,
        }
        return web.json_response({"id": order_id, "currency": "USD", "bags": [bag]})

    async def _list(self, request: web.Request) -> web.Response:
        self.gets += 1
        bag_id = int(request.match_info["b"])
        if bag_id in self.forbidden:
            message = f"{ESC}[2J{ESC}]52;c;cHduZWQ={chr(7)}bag belongs to another app"
            return web.json_response({"message": message, "error_code": 4030}, status=403)
        records = self.refunds.get(bag_id, [])
        size = self.page_size.get(bag_id)
        if size is None:
            return web.json_response(records)
        page = int(request.query.get("page", "0"))
        chunk = records[page * size : (page + 1) * size]
        last = (page + 1) * size >= len(records)
        return web.json_response(
            {
                "content": chunk,
                "number": page,
                "size": size,
                "last": last,
                "total_elements": len(records),
            }
        )


def six_cases() -> Scripted:
    server = Scripted()
    server.refunds = {
        2001: [refund(9001, 1001, 2001, 500, "damaged")],
        2002: [refund(9002, 1002, 2002, 700, "late"), refund(9003, 1002, 2002, 700, "late")],
        2003: [],
        2004: [refund(9004, 1004, 2004, 350, "wrong size")],
        2005: [
            refund(9005, 1005, 2005, 250, "gift"),
            refund(
                9006, 1005, 2005, 1200, None, status="EXTERNAL", date_created="2026-12-04T08:30:00Z"
            ),
        ],
    }
    server.page_size = {2002: 1}  # the double is on the second page
    server.forbidden = {2006}
    return server


ROWS = [
    (1001, 2001, 500, "damaged"),
    (1002, 2002, 700, "late"),
    (1003, 2003, 300, "lost"),
    (1004, 2004, 400, "wrong size"),
    (1005, 2005, 250, "gift"),
    (1006, 2006, 100, "forbidden"),
]
EXPECTED = {
    2: ("as_asked", [9001]),
    3: ("extra", [9002, 9003]),
    4: ("missing", []),
    5: ("mismatch", [9004]),
    6: ("extra", [9005, 9006]),
    7: ("unreadable", []),
}


def write_rows(path: Path, rows: list[tuple[int, int, int, str]]) -> Path:
    lines = ["order_id,bag_id,amount_refunded,reason"]
    lines += [f"{o},{b},{a},{r}" for o, b, a, r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_journal(path: Path, rows: Path, states: dict[int, tuple[str, int | None]]) -> Path:
    """A batch journal (v2) saying, for the rows at the given lines, state and refund."""
    items = {i.line: i for i in read_items(rows, "refund") if isinstance(i, BatchItem)}
    lines = [orjson.dumps({"type": "header", "v": 2, "input": "x", "ts": 1.0})]
    for line, (state, refund_id) in states.items():
        record = {"key": f"{items[line].key}:0", "line": line, "state": state, "ts": 2.0}
        if refund_id is not None:
            record["refund_id"] = refund_id
        lines.append(orjson.dumps(record))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def env_for(base_url: str) -> dict[str, str]:
    return {
        "VIOLET_APP_ID": str(APP_ID),
        "VIOLET_APP_SECRET": SECRET,
        "VIOLET_USERNAME": USER,
        "VIOLET_PASSWORD": PASSWORD,
        "VIOLET_BASE_URL": base_url,
    }


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    server = six_cases()
    async with serve(server.app()) as url:
        yield server, f"{url}/v1"


def client_for(base_url: str, clock: FakeClock | None = None) -> VioletClient:
    return VioletClient(
        APP_ID,
        SECRET,
        username=USER,
        password=PASSWORD,
        base_url=base_url,
        retry=TEST_POLICY,
        clock=clock,
    )


async def run_rows(base_url: str, path: Path, **kwargs: Any) -> dict[int, AuditRow]:
    items = [i for i in read_items(path, "refund") if isinstance(i, BatchItem)]
    async with client_for(base_url, kwargs.pop("clock", None)) as client:
        return {row.item.line: row async for row in audit(client, items, **kwargs)}


async def test_every_case_gets_its_verdict_in_process(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    """One bag per case: as_asked, a double (its second refund on page 2), missing,
    an almost-matching amount, an EXTERNAL refund nobody asked for, an unreadable bag;
    nothing is sent."""
    server, base_url = scripted
    rows = write_rows(tmp_path / "rows.csv", ROWS)
    journal = write_journal(
        tmp_path / "j.jsonl", rows, {2: ("done", 9001), 4: ("done", 9999), 5: ("failed", None)}
    )
    got = await run_rows(base_url, rows, journal=journal, concurrency=3)
    assert {line: (r.audit, list(r.refund_ids)) for line, r in got.items()} == EXPECTED
    assert got[2].ours is True
    assert got[3].money == 700
    assert got[4].loud
    assert "THE JOURNAL SAYS SUCCEEDED (refund 9999)" in got[4].detail
    assert got[4].money == 300
    assert "amount: asked 400, refunded 350" in got[5].detail
    assert "Violet refused it" in got[5].detail
    assert got[6].money == 1200
    assert "EXTERNAL" in got[6].detail
    assert "2026-12-04" in got[6].detail
    assert "PermissionDeniedError" in got[7].detail
    assert got[7].money is None
    assert server.posts == 0


async def test_an_unreadable_refund_record_makes_the_bag_unreadable_never_as_asked(
    tmp_path: Path,
) -> None:
    """Beside the row's exact refund, a record Violet sends that cannot be read (an
    amount of the wrong type: skipped and counted by the page reader) or that lacks its
    amount: the bag's rows are unreadable, never as_asked nor missing."""
    server = Scripted()
    wrong_type = refund(9101, 1001, 2001, 0, None)
    wrong_type["amount"] = "lots"
    no_amount = refund(9102, 1002, 2002, 0, None)
    del no_amount["amount"]
    server.refunds = {
        2001: [refund(9001, 1001, 2001, 500, "damaged"), wrong_type],
        2002: [refund(9002, 1002, 2002, 700, "late"), no_amount],
    }
    rows = write_rows(tmp_path / "rows.csv", ROWS[:2])
    async with serve(server.app()) as url:
        got = await run_rows(f"{url}/v1", rows, clock=FakeClock())
    assert got[2].audit == "unreadable"
    assert "1 refund record(s) on the bag could not be read" in got[2].detail
    assert got[3].audit == "unreadable"
    assert "no id or no amount" in got[3].detail


def test_escape_shows_every_control_character() -> None:
    """ESC, BEL, C1 CSI and a bidi override come out as escapes; plain text unchanged."""
    assert escape(f"a{ESC}[2Jb\x07c\x9bd\u202ee") == "a\\x1b[2Jb\\x07c\\x9bd\\u202ee"
    assert escape("refund 9001 5.00 USD 'déjà vu'") == "refund 9001 5.00 USD 'déjà vu'"


async def test_the_cli_in_process_writes_jsonl_privately_and_exits_1(
    scripted: tuple[Scripted, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_audit: the summary counts rows and money per verdict, the loud row is
    named with !!!, server text is escaped, --output is 0600 JSON lines; exit 1."""
    server, base_url = scripted
    for name, value in env_for(base_url).items():
        monkeypatch.setenv(name, value)
    rows = write_rows(tmp_path / "rows.csv", ROWS)
    journal = write_journal(tmp_path / "j.jsonl", rows, {2: ("done", 9001), 4: ("done", 9999)})
    output = tmp_path / "audit.jsonl"
    out, err = io.StringIO(), io.StringIO()
    options = AuditOptions(journal=journal, output=output)
    code = await run_audit(rows, options, out, err)
    assert code == 1, err.getvalue()
    text = out.getvalue()
    assert ESC not in text
    assert "\\x1b[2J" in text
    assert "!!! 1 row(s) the journal says SUCCEEDED" in text
    assert "as_asked            1  USD 5.00" in text
    assert "extra               2  USD 19.00" in text
    assert "missing             1  USD 3.00" in text
    assert "mismatch            1  USD 3.50" in text
    assert "unreadable          1  (not a verdict about money)" in text
    assert "recorded making the refund found for 1 row(s)" in text
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    lines = [orjson.loads(x) for x in output.read_bytes().splitlines()]
    assert {x["line"]: (x["audit"], x["refund_ids"]) for x in lines} == EXPECTED
    assert set(lines[0]) >= {"line", "order_id", "bag_id", "audit", "refund_ids", "detail"}
    assert all(ESC not in x["detail"] for x in lines)
    assert server.posts == 0


async def test_exit_0_only_when_every_row_is_as_asked_and_csv_output(
    scripted: tuple[Scripted, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the correct row: exit 0; --format csv writes a header and one row."""
    _, base_url = scripted
    for name, value in env_for(base_url).items():
        monkeypatch.setenv(name, value)
    rows = write_rows(tmp_path / "rows.csv", [ROWS[0]])
    output = tmp_path / "audit.csv"
    code = await run_audit(
        rows, AuditOptions(output=output, format="csv"), io.StringIO(), io.StringIO()
    )
    assert code == 0
    header, row = output.read_text().splitlines()
    assert header.startswith("line,order_id,bag_id,audit,refund_ids")
    assert row.startswith("2,1001,2001,as_asked,9001,500,USD")


async def test_bad_input_and_a_planted_output_link_exit_2_reading_nothing(
    scripted: tuple[Scripted, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad row, a missing journal, or --output a symlink: exit 2, no request made,
    and the link's target untouched."""
    server, base_url = scripted
    for name, value in env_for(base_url).items():
        monkeypatch.setenv(name, value)
    bad = tmp_path / "bad.csv"
    bad.write_text("order_id,bag_id,amount_refunded\n1001,x,500\n")
    err = io.StringIO()
    assert await run_audit(bad, AuditOptions(), io.StringIO(), err) == 2
    assert "bag_id" in err.getvalue()
    rows = write_rows(tmp_path / "rows.csv", [ROWS[0]])
    err = io.StringIO()
    missing = AuditOptions(journal=tmp_path / "nope.jsonl")
    assert await run_audit(rows, missing, io.StringIO(), err) == 2
    assert "no such file" in err.getvalue()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    err = io.StringIO()
    assert await run_audit(rows, AuditOptions(output=link), io.StringIO(), err) == 2
    assert "nothing was read" in err.getvalue()
    assert target.read_text() == "keep me"
    assert server.gets == 0


async def test_the_console_script_gives_every_verdict_and_exit_1(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    """`violet-async audit FILE --journal J --output OUT` as a subprocess of the
    installed console script: exit 1, every row's verdict in OUT, the loud row on
    stderr; the batch's default journal is picked up when --journal is not given."""
    _, base_url = scripted
    rows = write_rows(tmp_path / "rows.csv", ROWS)
    write_journal(tmp_path / "rows.csv.refund.journal.jsonl", rows, {4: ("done", 9999)})
    output = tmp_path / "out.jsonl"
    script = Path(sys.executable).with_name("violet-async")
    proc = await asyncio.create_subprocess_exec(
        str(script),
        "audit",
        str(rows),
        "--output",
        str(output),
        env={**os.environ, **env_for(base_url)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1, err.decode()
    lines = [orjson.loads(x) for x in output.read_bytes().splitlines()]
    assert {x["line"]: (x["audit"], x["refund_ids"]) for x in lines} == EXPECTED
    assert "journal: " in out.decode()
    assert ESC.encode() not in out
    assert b"1 row(s) the journal says succeeded have no such refund" in err


async def test_memory_holds_a_few_orders_not_the_input(tmp_path: Path) -> None:
    """3,000 rows on FakeViolet, concurrency 4: every row as_asked, and at most a few
    orders' rows were held at once (the rest waited on disk)."""
    async with FakeViolet(orders=3_000, seed=5) as fake:
        items = []
        for line, (order_id, bag_id) in enumerate(fake.seeded, start=2):
            fake.another_actor_refund(order_id, bag_id, 100, reason="batch")
            items.append(BatchItem.refund(line, order_id, bag_id, _request(100, "batch")))
        stats = AuditStats()
        async with fake.client(retry=TEST_POLICY) as client:
            verdicts = [
                r.audit async for r in audit(client, iter(items), concurrency=4, stats=stats)
            ]
    assert verdicts == ["as_asked"] * 3_000
    assert stats.rows == 3_000
    assert stats.orders == 3_000
    assert stats.max_held_rows <= 4 * 2 + 1


def _request(amount: int, reason: str) -> Any:
    from violet_async import RefundBagRequest

    return RefundBagRequest(amount_refunded=amount, reason=reason)


async def test_a_list_that_is_not_the_bag_s_own_is_unreadable(tmp_path: Path) -> None:
    """A bag's list holding a refund of another bag, or of another order, or a record
    without an id: the bag is unreadable (a list we cannot fully trust proves nothing),
    never missing and never as_asked."""
    server = Scripted()
    exact = refund(9001, 1001, 2001, 500, "damaged")
    unnamed = refund(0, 1003, 2003, 500, "damaged")
    del unnamed["id"]
    server.refunds = {
        2001: [exact, refund(9002, 1001, 2099, 700, None)],
        2002: [refund(9003, 1099, 2002, 700, "late")],
        2003: [refund(9004, 1003, 2003, 300, "lost"), unnamed],
    }
    rows = write_rows(tmp_path / "rows.csv", ROWS[:3])
    async with serve(server.app()) as url:
        got = await run_rows(f"{url}/v1", rows)
    assert {line: r.audit for line, r in got.items()} == {
        2: "unreadable",
        3: "unreadable",
        4: "unreadable",
    }
    assert "holds refund 9002 of bag 2099" in got[2].detail
    assert "holds refund 9003 of order 1099" in got[3].detail
    assert "no id or no amount" in got[4].detail


async def test_leaving_early_ends_every_read_and_removes_the_spool(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    """Breaking out after the first row: no task is left running, no warning, and the
    scratch directory is gone."""
    _, base_url = scripted
    rows = write_rows(tmp_path / "rows.csv", ROWS)
    items = [i for i in read_items(rows, "refund") if isinstance(i, BatchItem)]
    spool = tmp_path / "spool"
    spool.mkdir()
    async with client_for(base_url) as client:
        async with contextlib.aclosing(
            audit(client, items, concurrency=2, spool_dir=spool)
        ) as rows_out:
            async for _ in rows_out:
                break
        assert list(spool.iterdir()) == []
    ours = [
        t
        for t in asyncio.all_tasks()
        if "violet_async" in getattr(t.get_coro(), "cr_code", t).co_filename  # type: ignore[union-attr]
    ]
    assert ours == []


async def test_refused_credentials_exit_2_and_leave_the_output_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight read is refused (401): exit 2, nothing else read, and an earlier
    --output file is left untouched (it is emptied only once Violet has answered)."""
    app = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"message": "bad credentials"}, status=401)

    app.router.add_post("/v1/login", refuse)
    rows = write_rows(tmp_path / "rows.csv", [ROWS[0]])
    output = tmp_path / "audit.jsonl"
    output.write_text("yesterday's audit\n")
    output.chmod(0o600)
    async with serve(app) as url:
        for name, value in env_for(f"{url}/v1").items():
            monkeypatch.setenv(name, value)
        err = io.StringIO()
        code = await run_audit(rows, AuditOptions(output=output), io.StringIO(), err)
    assert code == 2
    assert "nothing was sent" in err.getvalue() or "credentials" in err.getvalue()
    assert output.read_text() == "yesterday's audit\n"


async def test_server_text_in_currency_cannot_run_in_a_spreadsheet_or_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bag whose currency is a formula with an escape code: the CSV cell is quoted,
    the terminal summary shows it escaped and cut to a code's length. (The refund
    record names the same currency: a record in another currency than its bag's is
    never compared by amount.)"""
    hostile = f"=HYPERLINK({ESC}[31m)"
    server = Scripted()
    server.refunds = {2001: [refund(9001, 1001, 2001, 500, "damaged", refund_currency=hostile)]}
    app = server.app()

    @web.middleware
    async def hostile_currency(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if request.path == "/v1/orders/1001" and isinstance(response, web.Response):
            data = orjson.loads(response.body)  # type: ignore[arg-type]
            data["bags"][0]["currency"] = hostile
            return web.json_response(data)
        return response

    app.middlewares.append(hostile_currency)
    rows = write_rows(tmp_path / "rows.csv", [ROWS[0]])
    output = tmp_path / "audit.csv"
    out = io.StringIO()
    async with serve(app) as url:
        for name, value in env_for(f"{url}/v1").items():
            monkeypatch.setenv(name, value)
        options = AuditOptions(output=output, format="csv")
        assert await run_audit(rows, options, out, io.StringIO()) == 0
    row = output.read_text().splitlines()[1]
    assert ",'=HYPERLINK(\\x1b," in row  # cut to 12 characters, then escaped
    assert ESC not in out.getvalue()
    assert "=HYPERLINK(\\x1b" in out.getvalue()


async def test_a_journal_others_may_write_or_a_linked_one_is_refused(
    scripted: tuple[Scripted, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal anyone may write (it could say "succeeded" falsely), or a symlink to
    one: exit 2, nothing read."""
    server, base_url = scripted
    for name, value in env_for(base_url).items():
        monkeypatch.setenv(name, value)
    rows = write_rows(tmp_path / "rows.csv", [ROWS[0]])
    journal = write_journal(tmp_path / "j.jsonl", rows, {2: ("done", 9001)})
    journal.chmod(0o666)
    err = io.StringIO()
    assert await run_audit(rows, AuditOptions(journal=journal), io.StringIO(), err) == 2
    assert "others may write it" in err.getvalue()
    journal.chmod(0o600)
    link = tmp_path / "link.jsonl"
    link.symlink_to(journal)
    err = io.StringIO()
    assert await run_audit(rows, AuditOptions(journal=link), io.StringIO(), err) == 2
    assert "symbolic link" in err.getvalue()
    assert server.gets == 0
