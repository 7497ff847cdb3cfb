"""What a new user meets first on the command line: rows that send only their filled
cells, a bad JSON line named by its file line, a busy port in one line."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from violet_async.__main__ import main
from violet_async._batch_cli import BatchItem, BatchOptions, RowError, read_items, run_file
from violet_async._converter import encode_request


def bodies(path: Path, kind: str) -> list[dict[str, Any]]:
    out = []
    for item in read_items(path, kind):  # type: ignore[arg-type]
        assert isinstance(item, BatchItem), item
        out.append(orjson.loads(encode_request(item.request)))
    return out


def test_empty_csv_cells_are_not_given(tmp_path: Path) -> None:
    """An empty CSV cell is left out of the body, so Violet's default applies."""
    path = tmp_path / "refunds.csv"
    path.write_text(
        "order_id,bag_id,amount_refunded,reason,restock_items,notify_customer,shipping_amount,skus\n"
        "1,2,full,,,,,\n"
        "1,3,500,,,false,,\n"
        '1,4,,why,true,,100,"[{""order_sku_id"": 9, ""quantity_refunded"": 1}]"\n'
    )
    assert bodies(path, "refund") == [
        {},
        {"amount_refunded": 500, "notify_customer": False},
        {
            "reason": "why",
            "restock_items": True,
            "shipping": {"amount": 100},
            "skus": [{"order_sku_id": 9, "quantity_refunded": 1}],
        },
    ]


def test_missing_and_null_json_fields_are_not_given(tmp_path: Path) -> None:
    """A cancel row's missing keys and JSON nulls are left out of the body."""
    path = tmp_path / "cancels.jsonl"
    path.write_text(
        '{"order_id": 1, "bag_id": 2}\n'
        '{"order_id": 1, "bag_id": 3, "reason_code": null, "restock_items": null}\n'
        '{"order_id": 1, "bag_id": 4, "reason_code": "FRAUD", "notify_customer": true}\n'
    )
    assert bodies(path, "cancel") == [
        {},
        {},
        {"reason_code": "FRAUD", "notify_customer": True},
    ]


def test_empty_csv_cancel_cells_are_not_given(tmp_path: Path) -> None:
    """Empty reason_code / restock / notify cells in a cancel CSV send {}."""
    path = tmp_path / "cancels.csv"
    path.write_text("order_id,bag_id,reason_code,reason,restock_items,notify_customer\n1,2,,,,\n")
    assert bodies(path, "cancel") == [{}]


async def test_bad_json_line_is_reported_by_file_line_without_parser_position(
    tmp_path: Path,
) -> None:
    """A row cut short reports FILE:line N: not valid JSON, not the parser's 'line 2 column 1'."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"order_id": 1, "bag_id": 2, "amount_refunded": 5}\n{"order_id": 1,\n\nnope\n')
    err = io.StringIO()
    code = await run_file("refund", path, BatchOptions(), out=io.StringIO(), err=err)
    assert code == 2
    lines = err.getvalue().splitlines()
    assert lines[0] == f"{path}:line 2: not valid JSON (unexpected end of data)"
    assert lines[1].startswith(f"{path}:line 4: not valid JSON (")
    assert "column" not in err.getvalue()
    assert "char" not in err.getvalue()


def test_row_error_names_its_line() -> None:
    """RowError carries the file's line number for the FILE:line N: prefix."""
    error = RowError(7, "not valid JSON (x)")
    assert (error.line, str(error)) == (7, "line 7: not valid JSON (x)")


def test_fake_server_on_a_busy_port_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """fake-server on a port in use prints one line naming the port and --port; exit 2."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["fake-server", "--port", str(port), "--orders", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"violet-async fake-server: port {port} is in use; pick another with --port\n"
    )
