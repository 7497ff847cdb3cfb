"""A batch journal under cancellation: a crash's cancel, a timeout, or a program that
cancels every task on its way out. Thread work (the load that cuts a torn tail, a write
and its fsync) cannot be stopped, so the journal never lets its file or its lock go
under it; and however it is cancelled, it closes once and nobody waits forever."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from violet_async import VioletClient, _journal
from violet_async.batch import Journal, JournalLockedError, JournalWriteError, run_batch
from violet_async.testing import FakeViolet

from .test_batch import items_for


class _Gate:
    """Holds a journal's thread work (a write or the load) until released, so that a
    test can cancel while the thread runs, as a crash or a timeout would."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any) -> Any:
            self.entered.set()
            assert self.release.wait(10)
            try:
                return real(*args)
            finally:
                self.left.set()

        return held

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


async def _still_locked(path: Path) -> bool:
    try:
        await (await Journal.open(path, input_id="x")).aclose()
    except JournalLockedError:
        return True
    return False


async def _closing_during_a_write(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Journal, _Gate, asyncio.Future[None], asyncio.Future[None]]:
    """A journal closing while the write of record "k#0" is held in its thread."""
    journal = await Journal.open(path, input_id="x")
    gate = _Gate()
    monkeypatch.setattr(Journal, "_write_durably", gate.wrap(Journal._write_durably))
    recording = asyncio.ensure_future(journal.record("k#0", 1, "sent"))
    await gate.wait_entered()
    closing = asyncio.ensure_future(journal.aclose())
    for _ in range(3):
        await asyncio.sleep(0)
    return journal, gate, recording, closing


async def test_a_cancelled_open_lets_the_journal_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cancelled while its journal's header is being written (the simulator's
    seeds 2428831 and 2678037: a crash at +0 s) releases the journal: the next run in the
    same process opens it instead of being refused by its own pid."""
    path = tmp_path / "j.jsonl"
    gate = _Gate()
    monkeypatch.setattr(Journal, "_write_durably", gate.wrap(Journal._write_durably))
    opening = asyncio.ensure_future(Journal.open(path, input_id="x"))
    await gate.wait_entered()
    opening.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert await _still_locked(path)  # the header's write still runs in its thread
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await opening
    journal = await Journal.open(path, input_id="x")
    assert journal.repaired == 0
    await journal.aclose()


async def test_a_cancelled_load_holds_the_lock_until_its_thread_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load may cut a torn tail in its thread: a cancelled open keeps the lock until
    that thread has finished, so another run never appends while it cuts."""
    path = tmp_path / "j.jsonl"
    await (await Journal.open(path, input_id="x")).aclose()
    gate = _Gate()
    monkeypatch.setattr(_journal, "_load_and_repair", gate.wrap(_journal._load_and_repair))
    opening = asyncio.ensure_future(Journal.open(path, input_id="x"))
    await gate.wait_entered()
    opening.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not opening.done()
    monkeypatch.undo()
    assert await _still_locked(path)
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert not await _still_locked(path)


async def test_a_cancelled_close_still_closes_once_the_write_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling aclose while a write runs in its thread: the write ends, its waiter
    learns it is durable, and then the file closes and the lock goes."""
    path = tmp_path / "j.jsonl"
    journal, gate, recording, closing = await _closing_during_a_write(path, monkeypatch)
    late = asyncio.ensure_future(journal.record("k#1", 2, "sent"))
    for _ in range(3):
        await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # The close goes on, but waits for the thread: its descriptor must stay open.
    for _ in range(5):
        await asyncio.sleep(0)
    assert not gate.left.is_set()
    assert await _still_locked(path)
    gate.release.set()
    await asyncio.wait_for(journal.aclose(), 5)  # the same close, now done
    await recording  # the line is durable, and its waiter was told so
    with pytest.raises(JournalWriteError, match="closed"):
        await asyncio.wait_for(late, 5)  # queued behind the close: told it was never written
    monkeypatch.undo()
    reopened = await Journal.open(path, input_id="x")
    entry = reopened.entry("k#0")
    assert entry is not None
    assert entry.state == "sent"
    assert reopened.entry("k#1") is None
    await reopened.aclose()


async def test_a_bad_rate_leaves_no_journal_open(tmp_path: Path, client: VioletClient) -> None:
    """A run refused for its arguments opens nothing: the journal is free afterwards."""
    path = tmp_path / "j.jsonl"
    with pytest.raises(ValueError, match="rate"):
        async for _ in run_batch(client, [], rate=-1.0, journal=path):
            pass  # pragma: no cover - nothing is yielded
    assert not path.exists()
    assert not await _still_locked(path)


async def _cancel_every_other_task() -> None:
    """What a program's shutdown does (``for t in asyncio.all_tasks(): t.cancel()``),
    sparing this test's own task."""
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            task.cancel()
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_close_after_the_flusher_was_cancelled_ends_and_lets_go(tmp_path: Path) -> None:
    """The journal's own writer task cancelled from outside: records are refused, and
    the close neither hangs nor keeps the lock."""
    path = tmp_path / "j.jsonl"
    journal = await Journal.open(path, input_id="x")
    journal._flusher.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises(JournalWriteError, match="stopped writing"):
        await asyncio.wait_for(journal.record("k#0", 1, "sent"), 5)
    await asyncio.wait_for(journal.aclose(), 5)
    assert not await _still_locked(path)


def test_a_program_ending_with_a_journal_open_in_a_task_exits(tmp_path: Path) -> None:
    """``asyncio.run`` cancels what is left when its main returns; a task closing its
    journal on the way out must let the program end."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from violet_async.batch import Journal

        async def main():
            journal = await Journal.open({str(tmp_path / "j.jsonl")!r}, input_id="x")

            async def worker():
                try:
                    await asyncio.sleep(3600)
                finally:
                    await journal.aclose()

            asyncio.create_task(worker())
            await asyncio.sleep(0.05)

        asyncio.run(main())
        print("exited")
        """
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.strip() == "exited", done.stderr
    assert done.stderr == ""


async def test_cancelling_every_task_never_frees_the_file_under_a_running_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task cancelled while a write runs in its thread: the descriptor stays open
    and the lock held until the write has ended, so the line never lands in another
    file that reused the descriptor's number."""
    path = tmp_path / "j.jsonl"
    journal, gate, recording, closing = await _closing_during_a_write(path, monkeypatch)
    await _cancel_every_other_task()
    await asyncio.gather(closing, recording, return_exceptions=True)
    assert not gate.left.is_set()
    assert await _still_locked(path)
    others = [os.open(tmp_path / f"other{i}", os.O_WRONLY | os.O_CREAT, 0o600) for i in range(3)]
    gate.release.set()
    assert await asyncio.to_thread(gate.left.wait, 10)
    for other in others:
        os.close(other)
    assert all((tmp_path / f"other{i}").read_bytes() == b"" for i in range(3))
    await asyncio.wait_for(journal.aclose(), 5)
    monkeypatch.undo()
    assert not await _still_locked(path)
    assert b'"k#0"' in path.read_bytes()  # the write that was running ended whole


async def test_cancelling_every_task_never_frees_the_lock_under_a_running_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task cancelled while the load (which may cut a torn tail) runs: the lock
    stays held until the load has ended."""
    path = tmp_path / "j.jsonl"
    await (await Journal.open(path, input_id="x")).aclose()
    path.write_bytes(path.read_bytes() + b'{"key": "torn')
    gate = _Gate()
    monkeypatch.setattr(_journal, "_load_and_repair", gate.wrap(_journal._load_and_repair))
    opening = asyncio.ensure_future(Journal.open(path, input_id="x"))
    await gate.wait_entered()
    await _cancel_every_other_task()
    monkeypatch.undo()
    assert not opening.done()
    assert await _still_locked(path)
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await opening
    reopened = await Journal.open(path, input_id="x")
    assert reopened.repaired == 0  # the cancelled open's load had cut the torn tail
    await reopened.aclose()


async def test_a_twice_cancelled_close_still_lets_the_journal_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second cancel (a second Ctrl-C, a timeout around a timeout) of a close waiting
    for a write: the close still ends once the write has, and a retried aclose waits
    for that same close."""
    path = tmp_path / "j.jsonl"
    journal, gate, recording, closing = await _closing_during_a_write(path, monkeypatch)
    closing.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert journal._closing is not None
    journal._closing.cancel()  # the close task itself, as cancelling every task would
    for _ in range(3):
        await asyncio.sleep(0)
    assert await _still_locked(path)
    gate.release.set()
    await asyncio.gather(closing, recording, return_exceptions=True)
    await asyncio.gather(journal._closing, return_exceptions=True)
    monkeypatch.undo()
    await journal.aclose()
    assert not await _still_locked(path)


async def test_concurrent_closes_close_each_descriptor_once(tmp_path: Path) -> None:
    """Two aclose() at once are one close: no descriptor is closed twice (a second
    close could shut a file that reused the number)."""
    journal = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    closes = await asyncio.gather(journal.aclose(), journal.aclose(), journal.aclose())
    assert list(closes) == [None, None, None]
    assert not await _still_locked(tmp_path / "j.jsonl")


@pytest.mark.parametrize("every_task", [False, True], ids=["the-run", "every-task"])
async def test_a_cancelled_run_ends_and_lets_its_journal_go(
    tmp_path: Path, fake: FakeViolet, client: VioletClient, every_task: bool
) -> None:
    """A run cancelled mid-batch (a timeout around it), or a shutdown that cancels every
    task once (the run, its feeder and workers, the journal's writer): the run ends,
    and a second run in the same process resumes from its journal and refunds each bag
    once."""
    path = tmp_path / "j.jsonl"
    items = items_for(fake, 6)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in run_batch(client, items, concurrency=2, journal=path):
            started.set()

    run = asyncio.ensure_future(consume())
    await started.wait()
    me = asyncio.current_task()
    for task in asyncio.all_tasks() if every_task else {run}:
        if task is not me and "RequestHandler" not in repr(task):  # spare the server
            task.cancel()
    done, _ = await asyncio.wait({run}, timeout=10)
    assert run in done, "run_batch never returned"
    assert run.cancelled()
    assert not await _still_locked(path)
    second = [r async for r in run_batch(client, items, concurrency=2, journal=path)]
    assert len(second) == len(items)
    assert any(r.outcome == "already_done" for r in second)
    assert all(fake.ledger.refunds_per_bag[i.bag_id] == 1 for i in items)


async def test_every_task_cancelled_before_the_close_took_a_step_still_lets_go(
    tmp_path: Path,
) -> None:
    """A shutdown cancelling every task in the very iteration aclose() began (the close
    task never ran a line): the journal still lets go, and a retried aclose returns."""
    path = tmp_path / "j.jsonl"
    journal = await Journal.open(path, input_id="x")
    closing = asyncio.ensure_future(journal.aclose())
    await asyncio.sleep(0)  # aclose ran; its close task is only scheduled
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            task.cancel()
    await asyncio.gather(closing, journal._flusher, return_exceptions=True)
    await asyncio.wait_for(journal.aclose(), 5)
    assert not await _still_locked(path)


async def test_a_writer_cancelled_before_its_first_step_refuses_records(tmp_path: Path) -> None:
    """Opening a journal that has its header takes no await after the writer task is
    created; a cancel-every-task then cancels the writer before its first step: a
    record is refused (not left waiting forever) and the journal lets go."""
    path = tmp_path / "j.jsonl"
    await (await Journal.open(path, input_id="x")).aclose()
    journal = await Journal.open(path, input_id="x")
    journal._flusher.cancel()
    await asyncio.sleep(0)
    assert journal._flusher.cancelled()
    with pytest.raises(JournalWriteError, match="stopped writing"):
        await asyncio.wait_for(journal.record("k#0", 1, "sent"), 5)
    await asyncio.wait_for(journal.aclose(), 5)
    assert not await _still_locked(path)


async def test_a_write_no_thread_takes_fails_its_waiters(tmp_path: Path) -> None:
    """The executor refuses the write (shut down with the loop, or no thread can start):
    the waiting records get JournalWriteError instead of waiting forever."""
    journal = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    loop = asyncio.get_running_loop()
    dead = ThreadPoolExecutor(1)
    dead.shutdown()
    loop.set_default_executor(dead)
    try:
        with pytest.raises(JournalWriteError, match="could not write"):
            await asyncio.wait_for(journal.record("k#0", 1, "sent"), 5)
    finally:
        loop.set_default_executor(ThreadPoolExecutor(1))
        await asyncio.wait_for(journal.aclose(), 5)
    assert not await _still_locked(tmp_path / "j.jsonl")


async def test_a_full_disk_at_open_lets_the_lock_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the holder's pid into the lock file fails (a full disk): the open fails
    and the lock goes with it, so the next open in this process is not refused."""
    path = tmp_path / "j.jsonl"
    real = os.write

    def full(fd: int, data: bytes) -> int:
        if data == f"{os.getpid()}\n".encode():  # the holder's pid, into the lock file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        await Journal.open(path, input_id="x")
    monkeypatch.setattr(os, "write", real)
    await (await Journal.open(path, input_id="x")).aclose()


def test_a_close_begun_as_the_program_ends_lets_the_next_run_open(tmp_path: Path) -> None:
    """A worker starts aclose() in the iteration main returns in: asyncio.run cancels the
    close before its first step. A second asyncio.run in the same process (a service, a
    test suite) still opens the journal."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from violet_async.batch import Journal, JournalLockedError

        PATH = {str(tmp_path / "j.jsonl")!r}

        async def main():
            journal = await Journal.open(PATH, input_id="x")
            done = asyncio.Event()

            async def worker():
                await done.wait()
                await journal.aclose()

            asyncio.create_task(worker())
            await asyncio.sleep(0.01)
            done.set()

        asyncio.run(main())

        async def again():
            await (await Journal.open(PATH, input_id="x")).aclose()

        try:
            asyncio.run(again())
            print("reopened")
        except JournalLockedError as exc:
            print("locked:", exc)
        """
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.strip() == "reopened", (done.stdout, done.stderr)
    assert done.stderr == ""
