"""The one name of a refund or cancel item, for the batch journal and the fleet ledger.

An item is known by what it asks, never by its place in an input::

    refund:<order_id>:<bag_id>:<digest>:<occurrence>

``digest`` is a BLAKE2b (10 bytes) of the canonical request body, exactly as it is sent
(:func:`~violet_async._converter.encode_request`); ``occurrence`` numbers identical
items of one input in input order, from 0 (the second identical row is another refund,
``...:1``). The line number is not part of it: moving rows changes nothing, an edited
row is a new item, and the same refund enqueued from two files is one item.

Journals written before this scheme named an item ``<kind>:<sha256[:32]>#<n>`` (a
SHA-256 of kind, order, bag and the unstructured request). :func:`legacy_journal_key`
still computes that name, for one purpose only: reading such a journal (its lines are
renamed to this scheme as they are loaded, see
:func:`violet_async._journal_index.read_journal`). Nothing is written under it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from ._converter import converter, encode_request

__all__ = ["content_key", "item_key", "legacy_journal_key", "numbered", "split_key"]

#: A key of a journal written before this scheme: ``kind:<32 hex>#<n>``.
LEGACY_KEY = re.compile(r"(refund|cancel):([0-9a-f]{32})#(0|[1-9][0-9]{0,17})")


def content_key(kind: str, order_id: int, bag_id: int, request: Any) -> str:
    """What an item asks, without its occurrence: ``kind:order:bag:digest``. Identical
    items share it (:attr:`BatchItem.key <violet_async.batch.BatchItem.key>`)."""
    digest = hashlib.blake2b(encode_request(request), digest_size=10).hexdigest()
    return f"{kind}:{order_id}:{bag_id}:{digest}"


def numbered(content: str, occurrence: int) -> str:
    """The key of the ``occurrence``-th item (from 0) whose :func:`content_key` is
    ``content``."""
    return f"{content}:{occurrence}"


def item_key(item: Any, occurrence: int = 0) -> str:
    """The key of ``item`` (a :class:`~violet_async.batch.BatchItem`), the
    ``occurrence``-th identical item of its input (from 0): the name the batch journal
    and the fleet ledger both know it by."""
    return numbered(content_key(item.kind, item.order_id, item.bag_id, item.request), occurrence)


def split_key(key: str) -> tuple[str, int | None]:
    """(content key, occurrence) of an item key; occurrence None when the key has none
    (not a key of this scheme)."""
    content, _, number = key.rpartition(":")
    if content and number.isascii() and number.isdigit() and len(number) < 19:
        return content, int(number)
    return key, None


def legacy_journal_key(kind: str, order_id: int, bag_id: int, request: Any, occurrence: int) -> str:
    """The name a journal written before this scheme gave the item. ``request``: a
    request model, or the unstructured dict a journal's record holds (hashed as it is:
    what the release that wrote it hashed, whatever fields the model has gained since).
    Read-only: for recognising those lines, never for writing."""
    unstructured = request if type(request) is dict else converter.unstructure(request)
    body = orjson.dumps([kind, order_id, bag_id, unstructured], option=orjson.OPT_SORT_KEYS)
    return f"{kind}:{hashlib.sha256(body).hexdigest()[:32]}#{occurrence}"
