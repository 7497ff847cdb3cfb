"""A resume over a big finished journal, in bounded memory: peak RSS and time.

Writes a journal as a finished run leaves it (for every row a "sent" line with its
protocol record, then a "done" line), then, in a fresh process, resumes the batch over
the same rows: ``Journal.open`` (streamed, the finished items in the on-disk index)
and ``run_batch`` skipping every done row (no server is needed: nothing is sent).

    python benchmarks/bench_journal.py --rows 10000000

Prints the journal's size, the time to write it, and the resume's time and peak RSS
(the whole process: interpreter, the SDK, the journal index and the runner).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from violet_async import RefundBagRequest
from violet_async._ask import sent_once
from violet_async.batch import BatchItem


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rows(count: int) -> Iterator[BatchItem]:
    request = RefundBagRequest(amount_refunded=100, reason="bench")
    for line in range(1, count + 1):  # every row its own bag: the most distinct keys
        yield BatchItem.refund(line, 100_000_000 + line, 200_000_000 + line, request)


def write_journal(path: Path, count: int) -> None:
    ask = orjson.dumps(
        sent_once("refund", 1, 2, RefundBagRequest(amount_refunded=100), 1.7e9).to_dict()
    )
    with path.open("wb", buffering=1 << 22) as out:
        out.write(orjson.dumps({"type": "header", "v": 2, "input": "bench", "ts": 1.7e9}) + b"\n")
        for item in rows(count):
            key = f"{item.key}#0".encode()
            out.write(
                b'{"key":"%s","line":%d,"state":"sent","ask":%s,"ts":1.7e9,"first_sent":1.7e9}\n'
                % (key, item.line, ask)
            )
            out.write(
                b'{"key":"%s","line":%d,"state":"done","refund_id":%d,"reconciled":false,'
                b'"ts":1.7e9,"first_sent":1.7e9}\n' % (key, item.line, 10_000_000 + item.line)
            )
    path.chmod(0o600)


async def resume(path: Path, count: int) -> None:
    from violet_async import VioletClient
    from violet_async._journal import Journal
    from violet_async.batch import run_batch

    started = time.perf_counter()
    journal = await Journal.open(path, input_id="bench")
    opened = time.perf_counter() - started
    rss_open = peak_rss_mb()
    outcomes: dict[str, int] = {}
    # Never reached: done rows are skipped (anything else stops the run).
    client = VioletClient(1, "secret-not-used", token="t", base_url="http://127.0.0.1:9/v1")
    stop = asyncio.Event()
    async with client:
        async for result in run_batch(client, rows(count), journal=journal, stop=stop):
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
            if result.outcome != "already_done":
                stop.set()
    await journal.aclose()
    total = time.perf_counter() - started
    print(
        orjson.dumps(
            {
                "open_s": round(opened, 1),
                "resume_s": round(total, 1),
                "peak_rss_mb_after_open": round(rss_open, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "outcomes": outcomes,
            }
        ).decode()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        asyncio.run(resume(args.child, args.rows))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.journal.jsonl"
        started = time.perf_counter()
        write_journal(path, args.rows)
        print(
            f"journal: {args.rows:,} rows, {path.stat().st_size / 1e9:.2f} GB, "
            f"written in {time.perf_counter() - started:.1f} s"
        )
        child = [sys.executable, __file__, "--rows", str(args.rows), "--child", str(path)]
        done = subprocess.run(child, check=True, capture_output=True, text=True)  # noqa: S603
        print("resume:", done.stdout)


if __name__ == "__main__":
    main()
