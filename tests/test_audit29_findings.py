"""Audit of issue 29 (security, round two): what a planted file, a hostile body and
server text could still do on main, each against a server scripted here or a file
planted the way another local user would (a file of theirs, mode 0666).

Files of another owner are made with ``os.chown(path, 65534, 65534)``, which needs
root: without it, only that part of a test is skipped (and says so); the mode part
(0666, a file others may write) runs everywhere."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import RetryPolicy, VioletClient, VioletError
from violet_async.stores import SQLiteStore

from . import _fleet_redis
from .conftest import serve
from .samples import refund_body
from .test_hardening import jwt

NOBODY = 65534
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
WHY_NOT_ROOT = "chown to another uid needs root; the mode part ran"

APP = 2929
SECRET = "audit29-app-secret-0123456789abcdef"
PASSWORD = "audit29-password-0123"
ORDER, BAG = 29, 2929

from .test_webhooks import SECRET as SECRET_OF_HOOKS  # noqa: E402


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class Bag29:
    """Violet for one bag of 10,000 cents: every POST applies (refunds counted in
    ``made``, ids from ``first_id``) and answers 200; the list shows them all."""

    def __init__(self, first_id: int) -> None:
        self.next_id = first_id
        self.made: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "audit29-token-0123456789", "refresh_token": "r29-1"})

    async def _list(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.made), content_type="application/json")

    async def _refund(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.next_id += 1
        record = refund_body(
            id=self.next_id,
            order_id=int(request.match_info["o"]),
            bag_id=int(request.match_info["b"]),
            app_id=APP,
            amount=body["amount_refunded"],
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=_stamp(time.time()),
            date_last_modified=_stamp(time.time()),
        )
        self.made.append(record)
        return web.json_response(record)


@asynccontextmanager
async def _client(server: Bag29, **options: Any) -> AsyncIterator[VioletClient]:
    async with (
        serve(server.app()) as base,
        VioletClient(
            APP,
            SECRET,
            username="audit29-user",
            password=PASSWORD,
            base_url=base + "/v1",
            retry=RetryPolicy(initial_delay=0.01, max_delay=0.05, deadline=10.0),
            **options,
        ) as client,
    ):
        yield client


# -- 1. a planted hot rollback journal beside a SQLite file ---------------------------


def _hot_journal(image: bytes, page_size: int = 4096) -> bytes:
    """A SQLite rollback journal (``-journal``) left "hot" by a crashed writer, whose
    page images are ``image``: SQLite plays it back into the database on the next open
    (WAL mode or not), so the database becomes ``image``. Written from the format
    (sqlite.org/fileformat.html#the_rollback_journal); nothing of the victim's file is
    needed."""
    pages = len(image) // page_size
    nonce = 0x2929
    header = bytes.fromhex("d9d505f920a163d7") + struct.pack(
        ">IIIII", 0xFFFFFFFF, nonce, pages, 512, page_size
    )
    records = [header.ljust(512, b"\0")]
    for number in range(pages):
        page = image[number * page_size : (number + 1) * page_size]
        checksum, at = nonce, page_size - 200
        while at > 0:
            checksum += page[at]
            at -= 200
        records.append(
            struct.pack(">I", number + 1) + page + struct.pack(">I", checksum & 0xFFFFFFFF)
        )
    return b"".join(records)


def _plant(path: Path, data: bytes) -> None:
    """``path`` as another local user leaves it: theirs (as root), anyone may write."""
    path.write_bytes(data)
    path.chmod(0o666)
    if ROOT:
        os.chown(path, NOBODY, NOBODY)


async def test_a_planted_hot_journal_never_rewrites_the_key_store(tmp_path: Path) -> None:
    """SECURITY.md: a ``SQLiteStore`` file, and its ``-wal`` and ``-shm``, are used only
    when they are this user's and no one else may write them ("a key file others may
    write could hold a planted finished key, returned as a refund that was never
    made"). SQLite also reads a third file beside the database: a hot rollback journal
    (``-journal``), played back into the database on open, in WAL mode too. Another
    user who plants one beside our private key file (built from a key file of their
    own, with a finished key) makes the next call with that key return a refund Violet
    never made, sending nothing. It must be refused like a planted ``-wal``."""
    # Another user's key file: the same key, finished, through a Violet of their own
    # (keys are scoped by app id and host: 127.0.0.1 for both).
    theirs = tmp_path / "theirs.db"
    async with (
        SQLiteStore(theirs) as their_store,
        _client(Bag29(first_id=777_000), store=their_store) as planter,
    ):
        planted = await planter.refund_bag(ORDER, BAG, amount_refunded=100, idempotency_key="rma-1")
    # Our key file, private, already in use (another key).
    ours = tmp_path / "keys.db"
    server = Bag29(first_id=555_000)
    async with SQLiteStore(ours) as our_store, _client(server, store=our_store) as client:
        await client.refund_bag(ORDER, BAG + 1, amount_refunded=100, idempotency_key="rma-0")
    assert len(server.made) == 1
    assert not (tmp_path / "keys.db-wal").exists()  # a clean close
    before = ours.read_bytes()
    _plant(tmp_path / "keys.db-journal", _hot_journal(theirs.read_bytes()))
    try:
        async with SQLiteStore(ours) as our_store, _client(server, store=our_store) as client:
            got: Any = await client.refund_bag(
                ORDER, BAG, amount_refunded=100, idempotency_key="rma-1"
            )
    except VioletError as exc:  # refusing the planted file is the right outcome
        got = exc
    assert getattr(got, "id", None) != planted.id, (
        f"a planted -journal answered a refund this Violet never made: {got!r}, "
        f"refunds made here: {[r['id'] for r in server.made]}"
    )
    assert "keys.db-journal" in str(got)
    assert len(server.made) == 1  # nothing sent for the refused call
    assert ours.read_bytes() == before  # the planted journal was not played back


async def test_a_planted_hot_journal_never_rewrites_the_webhook_queue(tmp_path: Path) -> None:
    """SECURITY.md: the webhook queue (and its ``-wal`` / ``-shm``) is refused when
    another user planted it. A hot ``-journal`` planted beside it is played into the
    queue on open: rows another user chose (a pending event whose body no signature
    ever covered, handed to the app's callback as Violet's) enter the queue. It must be
    refused like a planted ``-wal``."""
    from violet_async.webhooks import SQLiteEventStore, WebhookReceiver

    from .test_webhooks_queue import order_body, record

    # Another user's queue file, with an event in it (a row: no signature is checked
    # when a queued event is handed to the callback).
    theirs = tmp_path / "theirs.db"
    planter = SQLiteEventStore(theirs)
    assert await planter.put(record(WebhookReceiver(SECRET_OF_HOOKS), order_body(), "evt-x"))
    await planter.aclose()
    ours = tmp_path / "queue.db"
    store = SQLiteEventStore(ours)
    assert await store.pending() == 0
    await store.aclose()
    _plant(tmp_path / "queue.db-journal", _hot_journal(theirs.read_bytes()))
    store = SQLiteEventStore(ours)
    try:
        due: Any = await store.due(time.time() + 10**6, 10)
    except Exception as exc:  # noqa: BLE001 - refusing the planted file is the outcome
        due = exc
    finally:
        await store.aclose()
    assert not (isinstance(due, list) and due), f"a planted -journal queued {due!r}"
    assert "queue.db-journal" in str(due)


# -- 2. a preview cut inside a secret spelled as a server echoes it ---------------------

SPECIAL = "audit29&secret=0123<456789>"


def _spellings(secret: str) -> dict[str, str]:
    """Echoes of ``secret`` the redactor matches whole (SECURITY.md): an HTML-safe JSON
    writer's ``\\u0026``, quoted two and three times; URL-encoded twice; HTML numeric
    references; a JSON string itself URL-encoded."""
    from urllib.parse import quote

    once = orjson.dumps(secret).decode()[1:-1]
    for char in "&=<>":
        once = once.replace(char, f"\\u{ord(char):04x}")
    twice = orjson.dumps(once).decode()[1:-1]
    thrice = orjson.dumps(twice).decode()[1:-1]
    return {
        "json quoted twice": twice,
        "json quoted three times": thrice,
        "url-encoded twice": quote(quote(secret, safe=""), safe=""),
        "html numeric": "".join(f"&#{ord(c)};" if c in "&<>=" else c for c in secret),
        "json, url-encoded": quote(once, safe=""),
    }


@pytest.mark.parametrize("spelling", sorted(_spellings(SPECIAL)))
def test_a_preview_cut_inside_any_spelling_of_a_secret_keeps_none_of_it(spelling: str) -> None:
    """SECURITY.md: "a preview of a body is cut after redaction, a tail that starts a
    secret dropped", for every spelling the redactor matches. A body cut inside a secret
    (the 1 KiB kept of a response too large to read) in an escaped spelling kept
    everything up to the cut: ``audit29\\\\u0026secret\\\\u003d01234`` (a string quoted
    twice) is 19 characters of a 27-character password. Every cut inside it must keep
    none of it."""
    from violet_async._redact import Redactor

    echoed = _spellings(SPECIAL)[spelling]
    redactor = Redactor(extra=[SPECIAL])
    pad = "x" * 70
    assert redactor.text(pad + echoed) == pad + "[REDACTED]"  # matched whole
    kept = {
        cut: redactor.preview((pad + echoed[:cut]).encode(), 10_000)
        for cut in range(1, len(echoed))
    }
    leaks = {cut: text[70:] for cut, text in kept.items() if text != pad}
    assert not leaks, leaks


async def test_a_too_large_answer_cut_inside_an_echoed_password_keeps_none_of_it() -> None:
    """The same, end to end: a gateway's 500 MB answer whose first KiB (what
    ``ResponseTooLargeError.body`` keeps) ends inside the app secret it echoes, quoted
    twice; the error's body and text keep no part of it."""
    once = orjson.dumps(SPECIAL).decode()[1:-1]
    for char in "&=<>":
        once = once.replace(char, f"\\u{ord(char):04x}")
    twice = orjson.dumps(once).decode()[1:-1]
    head = '{"error": "{\\"headers\\": {\\"X-Violet-App-Secret\\": \\"'
    cut = twice.index("secret") + 9  # 'audit29\\\\u0026secret\\\\u00'
    prefix = head + "p" * (1024 - len(head) - cut) + twice[:cut]
    assert len(prefix) == 1024
    left = asyncio.Event()

    async def page(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 500_000_000
        await response.prepare(request)
        await response.write(prefix.encode() + twice[cut:].encode() + b'\\"}}"}')
        await left.wait()  # the client leaves after its first KiB
        return response

    app = web.Application()
    app.router.add_get("/v1/orders/{o}", page)
    from violet_async import ResponseTooLargeError

    async with (
        serve(app) as base,
        VioletClient(
            APP,
            SPECIAL,
            token=jwt(time.time() + 3600),
            base_url=base + "/v1",
            retry=RetryPolicy.disabled(),
        ) as client,
    ):
        with pytest.raises(ResponseTooLargeError) as info:
            await client.get_order(ORDER)
        left.set()
    error = info.value
    assert error.body.startswith(head.encode())
    for text in (error.body.decode(errors="replace"), str(error)):
        assert "audit29" not in text, text[-80:]


# -- 3. a planted hard link to a file of ours ---------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    for key, value in {
        "VIOLET_APP_ID": str(APP),
        "VIOLET_APP_SECRET": SECRET,
        "VIOLET_USERNAME": "audit29-user",
        "VIOLET_PASSWORD": PASSWORD,
        "VIOLET_BASE_URL": base + "/v1",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("which", ["output", "problems", "journal"])
async def test_a_hard_link_to_a_victim_file_is_refused_and_the_victim_untouched(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md: a journal, a problems file or an ``--output`` another local user
    planted is refused before it is read or written. A hard link is the symlink's twin:
    planted under the name a run will open, in a shared directory, it names a file of
    ours (where the system lets a user link a file they do not own: macOS, the BSDs,
    Linux with ``fs.protected_hardlinks=0``), and it is a regular file of this user
    that no one else may write, so every check passes: ``--output`` truncated and
    rewrote the victim (a shell profile, a key), the problems file appended to it. A
    file with another name (a link count above 1) is refused, the victim untouched."""
    from violet_async._batch_cli import BatchOptions, run_file

    victim = tmp_path / "home" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("the victim's data\n")
    victim.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    source = shared / "in.csv"
    server = Bag29(first_id=1000)
    source.write_text(f"order_id,bag_id,amount_refunded\n{ORDER},{BAG},100\n")
    journal = shared / "j.jsonl"
    planted = {
        "journal": journal,
        "problems": journal.with_name(journal.name + ".problems.txt"),
        "output": shared / "out.jsonl",
    }[which]
    os.link(victim, planted)
    async with serve(server.app()) as base:
        _env(monkeypatch, base)
        out, err = io.StringIO(), io.StringIO()
        options = BatchOptions(journal=journal, output=shared / "out.jsonl")
        code = await run_file("refund", source, options, out=out, err=err)
    assert victim.read_text() == "the victim's data\n", (code, err.getvalue())
    assert code == 2, err.getvalue()
    assert "link" in err.getvalue()
    assert server.made == []  # refused before any send


# -- 4. the audit's journal and --output ------------------------------------------------


@pytest.mark.parametrize("planted", ["hard link", "others may write"])
async def test_the_audit_output_is_held_to_the_batch_outputs_checks(
    planted: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md: an ``--output`` that is a hard link, or that others may write, is
    refused with exit 2 before anything is written. ``violet-async audit --output``
    checked only the owner: it emptied a victim file of ours reached through a planted
    hard link, and used (narrowed) a file others could write."""
    from violet_async._audit_cli import AuditOptions, run_audit

    victim = tmp_path / "home" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("the victim's data\n")
    victim.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    output = shared / "audit.jsonl"
    if planted == "hard link":
        os.link(victim, output)
    else:
        output.write_text("the victim's data\n")
        output.chmod(0o666)
        victim = output
    source = shared / "in.csv"
    source.write_text(f"order_id,bag_id,amount_refunded\n{ORDER},{BAG},100\n")
    server = Bag29(first_id=1000)
    async with serve(server.app()) as base:
        _env(monkeypatch, base)
        out, err = io.StringIO(), io.StringIO()
        code = await run_audit(source, AuditOptions(output=output), out=out, err=err)
    assert victim.read_text() == "the victim's data\n", (code, err.getvalue())
    assert code == 2, err.getvalue()


async def test_the_audit_reads_no_journal_another_user_could_have_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md: a journal another user planted, or one they may write, is refused
    before it is read (a forged one makes the audit call a refund "ours", or raise the
    loud "the journal says SUCCEEDED" alarm). ``audit(journal=...)`` from Python read
    any file (its owner and mode unchecked, a symlink followed), and
    ``violet-async audit`` took a journal its group may write."""
    from violet_async._audit_cli import AuditOptions, run_audit
    from violet_async._batch_cli import BatchOptions, read_items, run_file
    from violet_async._files import UnsafeFileError
    from violet_async.batch import audit

    source = tmp_path / "in.csv"
    source.write_text(f"order_id,bag_id,amount_refunded\n{ORDER},{BAG},100\n")
    journal = tmp_path / "j.jsonl"
    server = Bag29(first_id=1000)
    async with serve(server.app()) as base:
        _env(monkeypatch, base)
        out, err = io.StringIO(), io.StringIO()
        assert (
            await run_file("refund", source, BatchOptions(journal=journal), out=out, err=err) == 0
        )
        items = [i for i in read_items(source, "refund") if not isinstance(i, Exception)]

        async def read(path: Path) -> Any:
            try:
                async with VioletClient.from_env() as client:
                    return [row async for row in audit(client, items, journal=path)]
            except UnsafeFileError as exc:
                return exc

        link = tmp_path / "link.jsonl"
        link.symlink_to(journal)
        assert isinstance(await read(link), UnsafeFileError)
        journal.chmod(0o660)
        code = await run_audit(source, AuditOptions(journal=journal), out=out, err=err)
        assert code == 2, err.getvalue()
        assert "others may write" in err.getvalue()
        journal.chmod(0o666)
        assert isinstance(await read(journal), UnsafeFileError)
        if not ROOT:
            pytest.skip(WHY_NOT_ROOT)
        journal.chmod(0o644)
        os.chown(journal, NOBODY, NOBODY)
        assert isinstance(await read(journal), UnsafeFileError)
        assert await run_audit(source, AuditOptions(journal=journal), out=out, err=err) == 2


# -- 5. a Redis writer and the fleet's last guard -------------------------------------

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key


@pytest.mark.parametrize("writer", ["names another owner", "leaves it with no owner"])
async def test_a_replayed_item_whose_refund_a_redis_writer_gave_away_is_never_sent_again(
    writer: str, redis_url: str
) -> None:
    """SECURITY.md, what a Redis writer can still do: "one who deletes an applied item's
    record and its bag's refund set, then replays the signed item, makes a worker start
    it anew, and then only the bag's read-back stands between it and a second refund
    (``hold_if_present``: a refund exactly like it that the ledger does not account for
    holds it back)". The writer can also *write* the bag's refund set: name the
    applied refund as another item's (an owner no producer signed). The replayed item
    then takes its own refund for that other item's, and the read-back no longer holds
    it: a second refund. So did a refund id added to the set with no owner (read as a
    ledger's from before owners were kept: another item's). An owner the fleet key did
    not sign must not count, and no unowned refund is another item's."""
    from violet_async import RefundBagRequest
    from violet_async.batch import BatchItem
    from violet_async.fleet import (
        BagLocks,
        FleetWorker,
        RedisLedger,
        create_fleet_pool,
        enqueue,
        item_key,
    )

    pool = await create_fleet_pool(redis_url)
    try:
        await pool.flushall()
        ledger = RedisLedger(pool)
        await ledger.new_fleet()
        item = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=100))
        assert (await enqueue(pool, [item], source="in.csv")).queued == 1
        key = item_key(item)
        signature = ledger.sign(key, item)  # what the producer's job carries
        server = Bag29(first_id=6000)

        async def run(job_item: BatchItem | None, sig: str | None) -> dict[str, Any]:
            # Each run a worker of its own (another process: nothing in memory).
            async with _client(server) as client:
                worker = FleetWorker(
                    client, RedisLedger(pool), BagLocks(pool, ttl=5.0, poll=0.01), None
                )
                return await worker.run(key, job_item, sig)

        first = await run(None, None)
        assert first["state"] == "applied"
        assert len(server.made) == 1
        refund_id = server.made[0]["id"]
        # The Redis writer: the item's record gone, its refund now "another item's".
        await pool.delete(ledger.record_key(key))
        if writer == "names another owner":
            await pool.hset(ledger.bag_owners_key(BAG), str(refund_id), "refund:forged:0")
        else:
            await pool.delete(ledger.bag_owners_key(BAG))
        await pool.sadd(ledger.bag_refunds_key(BAG), refund_id)
        again = await run(item, signature)  # the signed job, replayed
    finally:
        await pool.aclose()
    assert len(server.made) == 1, (
        f"a second refund: {[r['id'] for r in server.made]}; the replay ended {again}"
    )
    # Held back, naming the refund already on the bag (what the documented deletion
    # alone gives): never sent.
    assert again["outcome"] == "already_present", again


# -- 6. a Redis's own text on the terminal -------------------------------------------

# (No CR: redis-py refuses a reply line with one before the server's text is used.)
HOSTILE = "\x1b[2K\x1b[1G1 item(s): applied 1\x1b]52;c;cm0gLXJmIH4=\x07"


@pytest.mark.parametrize("command", ["status", "enqueue", "worker"])
def test_a_redis_error_reply_reaches_the_terminal_escaped(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SECURITY.md: Redis is not trusted with intent, and text from a server is escaped
    before it is printed (``status`` escapes everything it reads from the ledger). A
    Redis (or anything listening at ``VIOLET_REDIS_URL``) that answers with an error
    carrying ESC, CR and an OSC 52 clipboard code had it printed raw by every fleet
    command: ``cannot reach Redis (...)``."""
    import socketserver
    import threading

    class Hostile(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                commands = data.count(b"\r\n*") + data.startswith(b"*")
                self.request.sendall(f"-ERR {HOSTILE}\r\n".encode() * commands)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("VIOLET_REDIS_URL", f"redis://127.0.0.1:{server.server_address[1]}/0")
        rows = tmp_path / "rows.csv"
        rows.write_text(f"order_id,bag_id,amount_refunded\n{ORDER},{BAG},100\n")
        from violet_async.__main__ import main

        args = {"status": ["status"], "enqueue": ["enqueue", str(rows)], "worker": ["worker"]}
        code = main(args[command])
    finally:
        server.shutdown()
        server.server_close()
    printed = capsys.readouterr()
    assert code == 2
    text = printed.out + printed.err
    assert "cannot reach Redis" in text
    assert not any(c in text for c in "\x1b\r\x07"), repr(text)
    assert "\\x1b]52;c;" in text  # shown, escaped


# -- 7. a 2xx page echoing the request, end to end through the batch's files ------------


async def test_a_2xx_page_echoing_the_secret_leaves_no_part_of_it_in_any_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 29, row 5, as an operator meets it: a gateway answers the refund POST 200
    with an HTML page echoing every request header (the app secret, the token) and the
    login body (the password), JSON-escaped and URL-encoded. The summary, the journal,
    the problems file and ``--output`` hold no part of any of them. (Held: no break.)"""
    from urllib.parse import quote

    from violet_async._batch_cli import BatchOptions, run_file

    secrets = [SECRET, PASSWORD, "audit29-token-0123456789"]
    seen: list[str] = []

    async def login(request: web.Request) -> web.Response:
        seen.append(await request.text())
        return web.json_response({"token": secrets[2], "refresh_token": "r29-1"})

    made: list[dict[str, Any]] = []

    async def page(request: web.Request) -> web.Response:
        if request.method == "POST":  # applied, whatever the gateway answers
            made.append(
                refund_body(
                    id=2901,
                    order_id=ORDER,
                    bag_id=BAG,
                    app_id=APP,
                    amount=100,
                    status="COMPLETED",
                    skus=[],
                    errors=[],
                    date_created=_stamp(time.time()),
                    date_last_modified=_stamp(time.time()),
                )
            )
        # The secret's first characters fall inside an 80-character preview.
        first = request.headers.get("X-Violet-App-Secret", "")
        echoed = " ".join(f"{k}={v}" for k, v in request.headers.items())
        text = f"<html>{'p' * 68}{first} {echoed} {seen[-1]} {quote(echoed)}</html>"
        return web.Response(text=text, content_type="text/html")

    async def listed(request: web.Request) -> web.Response:
        return web.json_response(made)

    app = web.Application()
    app.router.add_post("/v1/login", login)
    app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", listed)
    app.router.add_route("*", "/v1/orders/{tail:.*}", page)
    source = tmp_path / "in.csv"
    source.write_text(f"order_id,bag_id,amount_refunded\n{ORDER},{BAG},100\n")
    journal = tmp_path / "j.jsonl"
    output = tmp_path / "out.jsonl"
    async with serve(app) as base:
        _env(monkeypatch, base)
        out, err = io.StringIO(), io.StringIO()
        options = BatchOptions(journal=journal, output=output, settle_running=0.0)
        await run_file("refund", source, options, out=out, err=err)
    problems = journal.with_name(journal.name + ".problems.txt")
    texts = {
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "journal": journal.read_text(),
        "output": output.read_text(),
        "problems": problems.read_text() if problems.exists() else "",
    }
    # The refund the 2xx applied is found on the bag: one refund, reported.
    assert '"outcome":"succeeded","refund_id":2901' in texts["output"], texts["output"]
    assert len(made) == 1
    for name, text in texts.items():
        for secret in secrets:
            for size in (8, len(secret)):
                assert secret[:size] not in text, (name, secret[:size])


async def test_the_fleet_ledger_keeps_no_secret_a_refusal_echoes(redis_url: str) -> None:
    """SECURITY.md: no secret in the fleet ledger. Violet refuses the refund with a 400
    whose message quotes the request headers (app secret, token: JSON-escaped and
    URL-encoded): the item fails, and its ledger record and ``status`` hold no part of
    either. (Held: no break.)"""
    from urllib.parse import quote

    from violet_async import RefundBagRequest
    from violet_async.batch import BatchItem
    from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, create_fleet_pool, item_key
    from violet_async.fleet import enqueue as fleet_enqueue

    class Refusing(Bag29):
        async def _refund(self, request: web.Request) -> web.Response:
            headers = orjson.dumps({str(k): v for k, v in request.headers.items()}).decode()
            message = f"bad request: {headers} {quote(headers)}"
            return web.json_response({"message": message, "errors": [message]}, status=400)

    pool = await create_fleet_pool(redis_url)
    try:
        await pool.flushall()
        await RedisLedger(pool).new_fleet()
        item = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=100))
        assert (await fleet_enqueue(pool, [item], source="in.csv")).queued == 1
        key = item_key(item)
        async with _client(Refusing(first_id=1)) as client:
            worker = FleetWorker(client, RedisLedger(pool), BagLocks(pool, ttl=5.0), None)
            ended = await worker.run(key)
        stored = {
            k.decode(): v.decode(errors="replace")
            for k, v in (await pool.hgetall(RedisLedger(pool).record_key(key))).items()
        }
    finally:
        await pool.aclose()
    assert ended["state"] == "failed", ended
    assert "[REDACTED]" in stored["message"]
    text = orjson.dumps(stored).decode() + str(ended)
    for secret in (SECRET, "audit29-token-0123456789"):
        assert secret[:8] not in text, secret[:8]


def test_status_json_escapes_what_json_leaves_raw(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md: text from a server (the ledger, which a Redis writer may write, and
    Violet's messages it keeps) is escaped before it is printed. ``status`` escapes it;
    ``status --json`` printed what JSON does not escape raw: DEL, C1 controls (U+009B,
    a CSI on a terminal that reads 8-bit controls) and bidi overrides (U+202E). They
    are ``\\uXXXX`` escapes now, the JSON unchanged once parsed."""
    import redis as sync_redis

    from violet_async.__main__ import main

    message = "no\x9b2J\u202efake\x7f\U000e0041"
    with sync_redis.Redis.from_url(redis_url) as plain:
        plain.flushall()
        plain.hset(
            "{violet}:item:refund:1:2:x:0",
            mapping={
                "state": "failed",
                "kind": "refund",
                "order_id": 1,
                "bag_id": 2,
                "request": '{"amount_refunded":100}',
                "line": 2,
                "message": message,
            },
        )
        plain.hset("{violet}:states", "refund:1:2:x:0", "failed")
    monkeypatch.setenv("VIOLET_REDIS_URL", redis_url)
    assert main(["status", "--json"]) == 1
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    assert printed[:-1].isprintable(), repr(printed)
    assert orjson.loads(printed)["problems"][0]["message"] == message
