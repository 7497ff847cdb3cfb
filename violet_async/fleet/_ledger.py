"""The fleet ledger: one Redis hash per refund item, the batch journal's states.

Keys (``P`` is the ledger's prefix, ``{violet}`` by default: one hash tag, so every key
of a fleet lives in one Redis Cluster slot and the Lua scripts may touch them together)::

    P:item:<item key>          hash: state, kind, order_id, bag_id, request, line, source,
                               ask (the protocol record, JSON), refund_id, reconciled,
                               error, message, outcome, needs_review, updated_at,
                               paid (the amount an applied refund moved), held_by (an
                               item held as already_present: the earlier item's key),
                               repeat_sig (the operator's --allow-repeat, signed)
    P:states                   hash: <item key> -> state (counts for ``status``)
    P:bag:<bag_id>:refunds     set: refund ids this ledger recorded as applied on the bag
                               (another item's refund is never taken for this one's)
    P:bag:<bag_id>:owners      hash: refund id -> the item key it is the refund of
    P:bag:<bag_id>:owner_sigs  hash: refund id -> the HMAC of (bag, refund, owner) under
                               the fleet key: an owner without it is no one's word
    P:bag:<bag_id>:items       set: every item key registered on the bag (since this
                               release; older items are found through owners and open)
    P:blocked                  set: items that ended not sent because every item keeping
                               their bag open is under review (``status`` lists them;
                               a member whose record says otherwise is stale)
    P:epoch                    hash: id, created, hold_until: the ledger's life. Written at
                               first use; a worker that finds it gone or replaced knows
                               Redis lost the ledger, and no send leaves before hold_until

States: ``new`` (enqueued, never sent), ``sent`` (the protocol record, written and
fsynced *before* the POST leaves), ``pending`` (may have applied; resumed by read-back),
``applied`` and ``failed`` (terminal: definitely applied / definitely not applied by this
ledger's asks). A terminal state is never overwritten.

Durability: a ``sent`` record must survive a Redis crash, or a re-run could send blind
(``hold_if_present`` is then the last guard, and it cannot see a POST still in flight).
An epoch created at first use (or after a loss) holds every send back for a full settle
window, so a POST in flight when Redis lost the ledger has landed, and shows, before
its item is read again; :meth:`RedisLedger.new_fleet` starts a ledger known to be new
(nothing of it can be in flight) without that wait. Run Redis with ``appendonly yes`` and
``appendfsync always`` (Redis answers a write only after it is fsynced), or give the
ledger ``wait_replicas`` (``WAIT``) / ``wait_aof`` (``WAITAOF``, Redis >= 7.2) so the write
is acknowledged by replicas or their AOF before the send.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import attrs
import orjson
from redis.exceptions import NoScriptError

from .._converter import converter, encode_request, request_from_dict
from .._engine import Ended, Outcome, resumable
from .._item_key import item_key, numbered
from .._journal_index import money_of, same_money
from .._protocol import PendingRefund, Phase
from ..batch import BatchItem, item_ask
from ..exceptions import RequestValidationError
from ..models import CancelBagRequest, RefundBagRequest

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "FLEET_KEY_ENV",
    "DurabilityError",
    "Epoch",
    "ForgedItemError",
    "LedgerHeldError",
    "LedgerLostError",
    "LedgerRecord",
    "LockLostError",
    "NonDurableRedisError",
    "RedisLedger",
    "RefundOwnedError",
    "State",
    "UnderReview",
    "check_applied",
    "is_blocked",
    "item_key",
    "keyed_items",
    "load_fleet_key",
    "sign_item",
    "sign_merchant",
]

#: A Lua script call to queue on a pipeline: the script as ``register_script`` made it
#: (its ``sha``; called again alone when Redis had not loaded it), its keys and args.
ScriptCall = tuple[Any, list[Any], list[Any]]


State = Literal["new", "sent", "pending", "applied", "failed"]
STATES: tuple[State, ...] = ("new", "sent", "pending", "applied", "failed")
TERMINAL = frozenset({"applied", "failed"})
DEFAULT_PREFIX = "{violet}"
#: How many reads :meth:`RedisLedger.queue_bag_view` queues.
BAG_VIEW_READS = 5


#: The environment variable holding the fleet key: the secret every producer signs its
#: items with and every worker checks before a send.
FLEET_KEY_ENV = "VIOLET_FLEET_KEY"
#: A shorter key can be guessed; 16 bytes of randomness is the least a key must hold.
MIN_FLEET_KEY = 16


class ForgedItemError(Exception):
    """An item in Redis carries no valid signature under the fleet key (written by
    someone other than a producer holding ``VIOLET_FLEET_KEY``, or altered since):
    refused, nothing sent."""


def load_fleet_key(value: str | bytes | None = None) -> bytes:
    """The fleet key: ``value``, or ``VIOLET_FLEET_KEY``. Raises ValueError (naming the
    variable) when there is none, or it is shorter than 16 bytes."""
    if value is None:
        value = os.environ.get(FLEET_KEY_ENV) or None
    if value is None:
        raise ValueError(
            f"no fleet key: set {FLEET_KEY_ENV} to the same secret (at least "
            f"{MIN_FLEET_KEY} characters) on every producer and worker; items are "
            "signed with it, and a worker refuses anything unsigned"
        )
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if len(raw) < MIN_FLEET_KEY:
        raise ValueError(f"{FLEET_KEY_ENV} must be at least {MIN_FLEET_KEY} characters")
    return raw


def sign_item(key_bytes: bytes, key: str, item: BatchItem) -> str:
    """The HMAC-SHA256 of what an item would make a worker send: its ledger key (so a
    signed item cannot be replayed as another repeat), kind, order, bag and request.
    Its ``merchant_id`` is not part of it (:func:`sign_merchant`)."""
    message = orjson.dumps(
        [key, item.kind, item.order_id, item.bag_id, encode_request(item.request).decode()]
    )
    return hmac.new(key_bytes, message, hashlib.sha256).hexdigest()


def sign_merchant(key_bytes: bytes, key: str, merchant_id: int) -> str:
    """The HMAC-SHA256 of an item's ``merchant_id`` under its ledger key: kept apart
    from :func:`sign_item`, because the merchant decides no money (only which lane
    paces the item). A worker uses a merchant whose signature holds and ignores any
    other (the item is then paced as one of unknown merchant, never refused), and a
    worker that predates the column reads the item exactly as before."""
    message = orjson.dumps(["merchant_id", key, merchant_id])
    return hmac.new(key_bytes, message, hashlib.sha256).hexdigest()


def merchant_field(value: Any) -> int | None:
    """A stored ``merchant_id`` (a ledger field, a job's JSON): a positive whole number,
    or None for anything else (no merchant: the item is paced as one without; a value
    its producer signed and someone changed fails the signature instead)."""
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


class LockLostError(Exception):
    """This worker no longer holds the bag's lock: nothing more may be sent."""


class DurabilityError(Exception):
    """Redis did not confirm the ledger write as durable (WAIT / WAITAOF): not sent."""


class NonDurableRedisError(Exception):
    """Redis's configuration does not make every ledger write durable, and the operator
    did not accept the risk: no worker starts."""


class LedgerLostError(LockLostError):
    """The ledger's epoch is gone or replaced: Redis lost its data since this worker
    last looked. Nothing was sent."""


class LedgerHeldError(LockLostError):
    """The ledger is new (or was lost): no send leaves before ``until`` (Unix time), when
    a POST in flight from before has surely landed. Nothing was sent."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


class RefundOwnedError(Exception):
    """The refund an item would be marked applied with is another item's already."""


def check_applied(done: int, key: str, bag_id: int, refund_id: int | None) -> None:
    """Raise what the applied script's answer ``done`` says went wrong (1: written, 0:
    the item had ended already: nothing to raise): -2, LedgerLostError (the record is
    gone); -1, RefundOwnedError (the refund is another item's; nothing written)."""
    if done == -2:
        raise LedgerLostError(f"item {key} is gone from the ledger: Redis lost its data")
    if done == -1:
        raise RefundOwnedError(f"refund {refund_id} on bag {bag_id} is recorded as another item's")


@attrs.frozen
class Epoch:
    """The life of a ledger: ``id`` changes when Redis loses it; no send before
    ``hold_until``."""

    id: str
    hold_until: float


@attrs.frozen
class UnderReview:
    """An item keeping a bag open that no worker will move on: under review
    (``needs_review``), or its record cannot be read (``readable`` False). ``line`` and
    ``source`` as the record holds them (empty when it holds none)."""

    key: str
    line: str = ""
    source: str = ""
    readable: bool = True


@attrs.frozen
class BagView:
    """What a worker reads under a bag's lock before it decides to send, in one round
    trip and in this order (the bag's open set before its refunds, as two reads one
    after the other would see them): the item's record (None: not in the ledger), and
    the raw members of the bag's open set, its items' set, its owners' values and its
    refunds."""

    record: LedgerRecord | None
    opened: set[Any]
    items: set[Any]
    owners: list[Any]
    refunds: set[int]


def keyed_items(items: Iterable[BatchItem]) -> Iterable[tuple[str, BatchItem]]:
    """Each item with its key (:func:`item_key`, the batch journal's name for it too),
    identical items numbered by occurrence in input order."""
    seen: Counter[str] = Counter()
    for item in items:
        content = item.key
        occurrence = seen[content]
        seen[content] += 1
        yield numbered(content, occurrence), item


@attrs.frozen
class LedgerRecord:
    """One item as the ledger holds it."""

    key: str
    state: State
    item: BatchItem
    source: str = ""
    ask: dict[str, Any] | None = None
    refund_id: int | None = None
    reconciled: bool = False
    error: str | None = None
    message: str | None = None
    outcome: str | None = None
    needs_review: bool = False
    updated_at: float | None = None
    signature: str = ""
    """The producer's HMAC of the item under the fleet key (see :func:`sign_item`)."""
    ask_json: str = ""
    """``ask`` as stored (the bytes its signature covers)."""
    ask_signature: str = ""
    """The worker's HMAC of ``ask_json`` under the fleet key (a sent record's)."""
    restored: bool = False
    """Registered again from a job's copy after the ledger lost the item's record: a
    definite failure of a later run does not prove the item never applied."""
    paid: int | None = None
    """The amount an applied item's refund moved (None: not known, or a record written
    before this was kept)."""
    held_by: str = ""
    """Held as ``already_present``: the key of the earlier item of the same money."""
    repeat_signature: str = ""
    """The fleet key's HMAC of the operator's ``--allow-repeat`` for this item."""
    requests: int = 0
    """HTTP requests answered for this item over all its runs (baseline reads, sends,
    read-backs and merchant look-ups; a run that died before its end is not counted)."""
    rate_limited: int = 0
    """429s among :attr:`requests`."""

    def pending(self) -> PendingRefund | None:
        """The protocol record to resume from (None: never sent, or unreadable)."""
        if self.ask is None:
            return None
        return PendingRefund.from_dict(self.ask)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what a job returns, what ``status`` prints)."""
        return {
            "key": self.key,
            "state": self.state,
            "outcome": self.outcome or self.state,
            "line": self.item.line,
            "source": self.source,
            "order_id": self.item.order_id,
            "bag_id": self.item.bag_id,
            "refund_id": self.refund_id,
            "reconciled": self.reconciled,
            "error": self.error,
            "message": self.message,
            "needs_review": self.needs_review,
            "held_by": self.held_by or None,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
        }


# KEYS: record, states, lock (or the record again when no lock is checked), and the
# bag's open set when the item leaves it (new, failed): in the same script, so a worker
# dying between the two cannot leave a settled item keeping its bag from every send.
# ARGV: item key, new state, lock token ("" = no check), then field, value pairs
# -2: the record is gone (Redis lost the ledger), -1: the lock is not the token's:
# nothing is written
_WRITE = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return -2
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return -1
end
if KEYS[4] then
  redis.call('SREM', KEYS[4], ARGV[1])
end
if current == 'applied' or current == 'failed' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], unpack(ARGV, 4))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: record, states   ARGV: item key, then field, value pairs of a new record
# Returns the state the item had (nothing: it is new now).
_REGISTER = """
local current = redis.call('HGET', KEYS[1], 'state')
if current then
  return current
end
redis.call('HSET', KEYS[1], 'state', 'new', unpack(ARGV, 2))
redis.call('HSET', KEYS[2], ARGV[1], 'new')
return false
"""

# KEYS: record, states, lock, epoch, bag open   ARGV: item key, "sent", lock token, epoch id, now,
# then field, value pairs. -1: lock lost; 0: terminal; -2: epoch lost; {-3, until}: held
_SEND = """
if ARGV[4] ~= '' then
  local epoch = redis.call('HMGET', KEYS[4], 'id', 'hold_until')
  if epoch[1] ~= ARGV[4] then
    return -2
  end
  if tonumber(epoch[2] or '0') > tonumber(ARGV[5]) then
    return {-3, epoch[2]}
  end
end
if redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return -1
end
local current = redis.call('HGET', KEYS[1], 'state')
if current == 'applied' or current == 'failed' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], unpack(ARGV, 6))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[1])
return 1
"""

# KEYS: record, states, bag refunds, bag owners, bag open, bag owner signatures, and
# the bag's lock to let go of once the item is applied (or the record again: none)
# ARGV: item key, refund id ('' = none), the owner's signature, the lock's token ('' =
# none), then field, value pairs
# One script: the refund, its owner and the item's state change together or not at all.
_APPLIED = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return -2
end
if current == 'applied' or current == 'failed' then
  return 0
end
if ARGV[2] ~= '' then
  local owner = redis.call('HGET', KEYS[4], ARGV[2])
  if owner and owner ~= ARGV[1] then
    return -1
  end
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[6], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[1], 'refund_id', ARGV[2])
end
redis.call('HSET', KEYS[1], 'state', 'applied', unpack(ARGV, 5))
redis.call('HSET', KEYS[2], ARGV[1], 'applied')
redis.call('SREM', KEYS[5], ARGV[1])
if ARGV[4] ~= '' and redis.call('GET', KEYS[7]) == ARGV[4] then
  redis.call('DEL', KEYS[7])
end
return 1
"""

# KEYS: record   ARGV: requests, 429s (a run's), "1" to return the record with them
# Adds a run's request counts to its item. A record that is gone (Redis lost the
# ledger) is not made again with only counts in it (returns nothing); a count field
# someone else wrote as text is set to the run's count. Returns the item's totals, or
# (ARGV[3] "1") the record as HGETALL reads it, with its new totals last.
_COUNT = """
local record
if ARGV[3] == '1' then
  record = redis.call('HGETALL', KEYS[1])
  if #record == 0 then
    return false
  end
elseif redis.call('HEXISTS', KEYS[1], 'state') == 0 then
  return false
end
local function add(field, n)
  local total = redis.pcall('HINCRBY', KEYS[1], field, n)
  if type(total) == 'table' then
    redis.call('HSET', KEYS[1], field, n)
    return tonumber(n)
  end
  return total
end
local requests = add('requests', ARGV[1])
local limited = add('rate_limited', ARGV[2])
if record then
  table.insert(record, 'requests')
  table.insert(record, tostring(requests))
  table.insert(record, 'rate_limited')
  table.insert(record, tostring(limited))
  return record
end
return {requests, limited}
"""

# KEYS: epoch   ARGV: new id, now, hold_until for a new epoch
# The epoch, created when missing. Returns {id, hold_until}.
_EPOCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'created', ARGV[2], 'hold_until', ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'id', 'hold_until')
"""

# KEYS: epoch   ARGV: until. Moves hold_until later, never earlier; returns it.
_HOLD = """
local held = tonumber(redis.call('HGET', KEYS[1], 'hold_until') or '0')
if tonumber(ARGV[1]) > held then
  redis.call('HSET', KEYS[1], 'hold_until', ARGV[1])
  return ARGV[1]
end
return tostring(held)
"""


T = TypeVar("T")


async def resolve(value: Awaitable[T] | T) -> T:
    """redis-py types its commands as sync-or-async; the asyncio client's are awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


def _state(text: str | None) -> State | None:
    for state in STATES:
        if text == state:
            return state
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLedger:
    """Where a fleet keeps each refund item's state (see the module docstring).

    ``redis`` is a ``redis.asyncio.Redis`` (an arq pool is one). Every method is one
    round trip; the state changes are Lua scripts, atomic across the fleet.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        wait_replicas: int = 0,
        wait_aof: bool = False,
        wait_timeout_ms: int = 1000,
        fleet_key: str | bytes | None = None,
    ) -> None:
        self.redis = redis
        #: The fleet key (given, or ``VIOLET_FLEET_KEY``; None: neither). Registering an
        #: item and checking one need it; reading the ledger does not.
        self.fleet_key: bytes | None = None
        try:
            self.fleet_key = load_fleet_key(fleet_key)
        except ValueError:
            if fleet_key is not None:
                raise
        self.prefix = prefix
        self.wait_replicas = wait_replicas
        self.wait_aof = wait_aof
        self.wait_timeout_ms = wait_timeout_ms
        self._write = redis.register_script(_WRITE)
        self._register = redis.register_script(_REGISTER)
        self._send = redis.register_script(_SEND)
        self._applied = redis.register_script(_APPLIED)
        self._epoch = redis.register_script(_EPOCH)
        self._hold = redis.register_script(_HOLD)
        self._count = redis.register_script(_COUNT)
        self.states_key = f"{prefix}:states"
        self.epoch_key = f"{prefix}:epoch"
        self.blocked_key = f"{prefix}:blocked"

    def record_key(self, key: str) -> str:
        return f"{self.prefix}:item:{key}"

    def bag_refunds_key(self, bag_id: int) -> str:
        return f"{self.prefix}:bag:{bag_id}:refunds"

    def bag_open_key(self, bag_id: int) -> str:
        return f"{self.prefix}:bag:{bag_id}:open"

    def bag_owners_key(self, bag_id: int) -> str:
        return f"{self.prefix}:bag:{bag_id}:owners"

    def bag_owner_sigs_key(self, bag_id: int) -> str:
        return f"{self.prefix}:bag:{bag_id}:owner_sigs"

    def bag_items_key(self, bag_id: int) -> str:
        return f"{self.prefix}:bag:{bag_id}:items"

    async def epoch(self, *, hold: float, now: float | None = None) -> Epoch:
        """The ledger's epoch, created when missing (first use, or Redis lost the
        ledger) with no send before ``now + hold``: a POST in flight from before has
        landed by then, and shows in the read-back before a send."""
        now = time.time() if now is None else now
        found = await self._epoch(
            keys=[self.epoch_key], args=[secrets.token_hex(8), repr(now), repr(now + hold)]
        )
        return Epoch(str(_text(found[0])), float(_text(found[1]) or 0.0))

    async def new_fleet(self, now: float | None = None) -> bool:
        """Start a ledger known to be new, with no send of it in flight anywhere: its
        first sends need not wait. Does nothing (False) when the ledger has an epoch."""
        now = time.time() if now is None else now
        created = await self._epoch(
            keys=[self.epoch_key], args=[secrets.token_hex(8), repr(now), "0"]
        )
        return float(_text(created[1]) or 0.0) == 0.0

    async def hold_sends(self, until: float) -> float:
        """No send of the fleet before ``until`` (never shortens a hold); returns the
        hold in force."""
        return float(_text(await self._hold(keys=[self.epoch_key], args=[repr(until)])) or 0)

    async def bag_view(self, key: str, bag_id: int) -> BagView:
        """Item ``key``'s record and its bag's sets (:class:`BagView`), in one round
        trip (a pipeline of reads, not a transaction: each read as alone)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_bag_view(pipe, key, bag_id)
            return self.parse_bag_view(key, await pipe.execute())

    def queue_bag_view(self, pipe: Any, key: str, bag_id: int) -> None:
        """Queue :meth:`bag_view`'s reads on ``pipe`` (a pipeline that may hold other
        commands before them: a bag lock's ``SET NX``); :meth:`parse_bag_view` reads
        their answers, the last :data:`BAG_VIEW_READS` of the pipeline's."""
        pipe.hgetall(self.record_key(key))
        pipe.smembers(self.bag_open_key(bag_id))
        pipe.smembers(self.bag_items_key(bag_id))
        pipe.hvals(self.bag_owners_key(bag_id))
        pipe.smembers(self.bag_refunds_key(bag_id))

    def parse_bag_view(self, key: str, answers: list[Any]) -> BagView:
        """The :class:`BagView` of item ``key`` from the answers to
        :meth:`queue_bag_view`'s reads (the last of ``answers``)."""
        raw, opened, items, owners, refunds = answers[-BAG_VIEW_READS:]
        return BagView(
            record=_parse(key, raw, self.merchant_of) if raw else None,
            opened=set(opened),
            items=set(items),
            owners=list(owners),
            refunds={int(v) for v in refunds},
        )

    async def bag_open(self, bag_id: int) -> set[Any]:
        """The raw members of ``bag_id``'s open set (for :meth:`open_on_bag` and
        :meth:`same_money_on_bag` under one bag lock: one read for both)."""
        return set(await resolve(self.redis.smembers(self.bag_open_key(bag_id))))

    async def open_on_bag(self, bag_id: int, *, members: set[Any] | None = None) -> set[str]:
        """Items on ``bag_id`` that were sent and not yet settled (sent or pending): while
        one is, no other item on the bag may send (it could claim that one's refund).
        ``members``: the bag's open set as :meth:`bag_open` read it under the bag's lock
        (None: read it now)."""
        if members is None:
            members = await self.bag_open(bag_id)
        keys = sorted(str(_text(m)) for m in members)
        if not keys:
            return set()
        # A settled item left in the set (a worker of an older release died between its
        # two writes) would keep the bag from every send for ever: it is dropped.
        states = await resolve(self.redis.hmget(self.states_key, keys))
        settled = [k for k, state in zip(keys, states, strict=True) if _text(state) in TERMINAL]
        if settled:
            await resolve(self.redis.srem(self.bag_open_key(bag_id), *settled))
        return set(keys) - set(settled)

    async def all_under_review(self, keys: Iterable[str]) -> list[UnderReview] | None:
        """The items ``keys`` (those keeping a bag open) when every one of them is under
        review (``needs_review``: no worker moves it on, a person settles it) or has a
        record that cannot be read; None when any is not (sent or pending and still
        being resolved, or its record is missing: its job may register it again)."""
        ordered = sorted(keys)
        found: list[UnderReview] = []
        for key, raw in zip(ordered, await self._raw_many(ordered), strict=True):
            if not raw:
                return None
            try:
                record = _parse(key, raw, self.merchant_of)
            except ValueError:
                data = {_text(k): _text(v) for k, v in raw.items()}
                found.append(
                    UnderReview(
                        key, data.get("line") or "", data.get("source") or "", readable=False
                    )
                )
                continue
            if not record.needs_review:
                return None
            found.append(UnderReview(key, str(record.item.line), record.source))
        return found

    async def mark_blocked(
        self, key: str, message: str, *, lock_key: str | None = None, token: str = ""
    ) -> None:
        """Leave ``key`` *new* (nothing sent), outcome ``not_sent``, with ``message``:
        its bag is kept open by items under review, which no wait settles. Listed by
        ``status`` (:meth:`blocked`); enqueued again, it runs as any new item. Given
        ``lock_key``, only while ``token`` holds it (LockLostError)."""
        # On the set first: a record is never blocked and not there (a stale member is
        # told apart by its record).
        await resolve(self.redis.sadd(self.blocked_key, key))
        await self._set(
            key,
            "new",
            lock=(lock_key, token),
            outcome="not_sent",
            error="BagUnderReview",
            message=message,
        )

    async def unblock(self, key: str, *, lock_key: str | None = None, token: str = "") -> None:
        """Clear what :meth:`mark_blocked` wrote (the item's bag is free now: it runs)."""
        await self._set(key, "new", lock=(lock_key, token), outcome="", error="", message="")
        await resolve(self.redis.srem(self.blocked_key, key))

    async def blocked(self) -> list[LedgerRecord]:
        """Items left not sent by :meth:`mark_blocked` and still so (new, ``not_sent``)."""
        found_keys = await resolve(self.redis.smembers(self.blocked_key))
        members = sorted(str(_text(m)) for m in found_keys)
        if not members:
            return []
        found = []
        for key, raw in zip(members, await self._raw_many(members), strict=True):
            if not raw:
                continue
            try:
                record = _parse(key, raw, self.merchant_of)
            except ValueError:
                continue
            if is_blocked(record):
                found.append(record)
        return found

    def _key(self) -> bytes:
        if self.fleet_key is None:
            return load_fleet_key()  # raises, naming VIOLET_FLEET_KEY
        return self.fleet_key

    def sign(self, key: str, item: BatchItem) -> str:
        """The signature a producer stores with ``item`` (ValueError: no fleet key)."""
        return sign_item(self._key(), key, item)

    def sign_merchant(self, key: str, merchant_id: int) -> str:
        """The signature a producer stores with an item's ``merchant_id``."""
        return sign_merchant(self._key(), key, merchant_id)

    def merchant_of(self, key: str, merchant_id: Any, signature: Any) -> int | None:
        """``merchant_id`` as stored with item ``key`` when ``signature`` is the fleet
        key's for it (None otherwise, or with no fleet key: an unknown merchant)."""
        merchant = merchant_field(merchant_id)
        if merchant is None or self.fleet_key is None:
            return None
        if not isinstance(signature, str) or not signature:
            return None
        if not hmac.compare_digest(sign_merchant(self.fleet_key, key, merchant), signature):
            return None
        return merchant

    def verify(self, key: str, item: BatchItem, signature: str | None) -> bool:
        """Whether ``signature`` is the fleet key's for ``item`` under ``key``."""
        if not signature:
            return False
        return hmac.compare_digest(self.sign(key, item), signature)

    async def register(
        self,
        key: str,
        item: BatchItem,
        *,
        source: str = "",
        signed: bool = True,
        restored: bool = False,
        allow_repeat: bool = False,
    ) -> State | None:
        """Add ``item`` as ``new``, signed with the fleet key (``signed=False``: a refused
        item, recorded unsigned), unless the ledger has it; returns the state it had
        (None: it was added). ``restored``: added again from a job's own copy because the
        ledger lost its record (whatever it did before the loss is not known).
        ``allow_repeat``: the operator sends it even where an earlier item of the bag
        asked the same money (:meth:`same_money_on_bag`)."""
        fields: dict[str, Any] = {
            "sig": self.sign(key, item) if signed else "",
            "kind": item.kind,
            "order_id": item.order_id,
            "bag_id": item.bag_id,
            "request": encode_request(item.request),
            "line": item.line,
            "source": source,
            "updated_at": repr(time.time()),
        }
        if item.merchant_id is not None and signed:
            fields["merchant_id"] = item.merchant_id
            fields["merchant_sig"] = self.sign_merchant(key, item.merchant_id)
        if restored:
            fields["restored"] = 1
        if allow_repeat:
            fields["repeat_sig"] = self._repeat_mac(key)
        args: list[Any] = [key]
        for name, value in fields.items():
            args += [name, value]
        # On the bag's item set first: a record is never on the ledger and not there.
        await resolve(self.redis.sadd(self.bag_items_key(item.bag_id), key))
        found = await self._register(keys=[self.record_key(key), self.states_key], args=args)
        return _state(_text(found))

    def _repeat_mac(self, key: str) -> str:
        return hmac.new(self._key(), b"repeat\0%s" % key.encode(), "sha256").hexdigest()

    def allows_repeat(self, record: LedgerRecord) -> bool:
        """Whether an operator with the fleet key enqueued ``record`` with
        ``--allow-repeat`` (sent even where the bag holds the same money already)."""
        if not record.repeat_signature:
            return False
        return hmac.compare_digest(self._repeat_mac(record.key), record.repeat_signature)

    async def allow_repeat(self, key: str) -> None:
        """Mark ``key`` as sent anyway (``--allow-repeat``); its state is left alone."""
        await resolve(self.redis.hset(self.record_key(key), "repeat_sig", self._repeat_mac(key)))

    async def same_money_on_bag(
        self, key: str, item: BatchItem, *, view: BagView | None = None
    ) -> LedgerRecord | None:
        """Another item on ``item``'s bag that applied, or was sent and is not settled
        (sent, pending, under review), and asked the same money of the bag by the batch
        runner's rule (:func:`~violet_async._journal_index.same_money`): ``item`` is
        likely that row edited, and sending it could refund the bag twice (an identical
        item of another occurrence is a repeat its input asks for, not an edit). An
        applied one is preferred; None: no such item. A record that cannot be read is taken as
        the same money (it may be). ``view``: the bag's sets as :meth:`bag_view` read
        them under the bag's lock (None: read them now)."""
        bag = item.bag_id
        if view is None:
            members = await resolve(self.redis.smembers(self.bag_items_key(bag)))
            owners = await resolve(self.redis.hvals(self.bag_owners_key(bag)))
            opened = await self.bag_open(bag)
        else:
            members, owners, opened = view.items, view.owners, view.opened
        keys = {str(_text(m)) for m in (*members, *owners, *opened)}
        # The n-th identical item of an input (the same content, another occurrence) is
        # a repeat the input asks for, not an edited row: it is its own money.
        base = key.rpartition(":")[0]
        keys = {k for k in keys if k.rpartition(":")[0] != base}
        if not keys:
            return None
        new = money_of(item.kind, item.order_id, bag, converter.unstructure(item.request))
        found: LedgerRecord | None = None
        ordered = sorted(keys)
        for other_key, raw in zip(ordered, await self._raw_many(ordered), strict=True):
            if not raw:
                continue
            try:
                other = _parse(other_key, raw, self.merchant_of)
            except ValueError:  # unreadable (a request error is one): may be the same money
                other = None
            if other is not None:
                if other.item.bag_id != bag or not _done_or_open(other):
                    continue
                done = money_of(
                    other.item.kind,
                    other.item.order_id,
                    bag,
                    converter.unstructure(other.item.request),
                    other.paid,
                )
                if new is not None and done is not None and not same_money(done, new):
                    continue
            else:
                other = LedgerRecord(key=other_key, state="pending", item=item, error="unreadable")
            if other.state == "applied":
                return other
            found = found or other
        return found

    async def mark_held(
        self, key: str, earlier: LedgerRecord, *, lock_key: str | None = None, token: str = ""
    ) -> None:
        """Hold ``key``, never sent, as ``already_present``: ``earlier`` asked the same
        money of the bag. Pending, for review (not terminal: ``--allow-repeat`` may
        release it); given ``lock_key``, only while ``token`` holds it."""
        refund = f"refund {earlier.refund_id}" if earlier.refund_id is not None else "a refund"
        if earlier.state == "applied":
            what = f"holds {refund} made by"
        else:
            what = f"may hold {refund}: sent ({earlier.state}), not settled, by"
        line = f"line {earlier.item.line} of {earlier.source}" if earlier.source else "an item"
        message = (
            f"bag {earlier.item.bag_id} {what} an earlier item ({line}) asking the same "
            "money of the bag (this one differs only in what does not move money, or "
            "asks the same amount as a whole-bag refund); not sent: an edited row? Check "
            "the bag; enqueue it with --allow-repeat to send it anyway"
        )
        if earlier.error == "unreadable":
            message = (
                f"bag {earlier.item.bag_id} has an item ({earlier.key}) whose ledger record "
                "cannot be read: it may have refunded the same money; not sent. Check the "
                "bag; enqueue it with --allow-repeat to send it anyway"
            )
        await self._set(
            key,
            "pending",
            lock=(lock_key, token),
            needs_review=1,
            outcome="already_present",
            held_by=earlier.key,
            refund_id="" if earlier.refund_id is None else earlier.refund_id,
            error="AlreadyPresent",
            message=message,
        )

    async def release(self, key: str) -> bool:
        """An item held as ``already_present`` back to ``new``, allowed to repeat
        (``--allow-repeat``). False: it is not held (nothing written)."""
        record = await self.get(key)
        if record is None or not record.held_by or record.state != "pending" or record.ask:
            return False
        await self._set(
            key,
            "new",
            needs_review=0,
            outcome="",
            held_by="",
            refund_id="",
            error="",
            message="",
            repeat_sig=self._repeat_mac(key),
        )
        return True

    async def _raw_many(self, keys: list[str]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(self.record_key(key))
            return list(await pipe.execute())

    async def get(self, key: str) -> LedgerRecord | None:
        """The record of ``key`` (None: not in the ledger)."""
        raw = await resolve(self.redis.hgetall(self.record_key(key)))
        return _parse(key, raw, self.merchant_of) if raw else None

    async def get_many(self, keys: list[str]) -> list[LedgerRecord | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(self.record_key(key))
            raws = await pipe.execute()
        return [
            _parse(key, raw, self.merchant_of) if raw else None
            for key, raw in zip(keys, raws, strict=True)
        ]

    async def mark_sent(
        self,
        key: str,
        ask: PendingRefund,
        *,
        lock_key: str,
        token: str,
        epoch: str | None = None,
        now: float | None = None,
    ) -> None:
        """Write the ``sent`` record, only while ``token`` holds ``lock_key`` (and, given
        an ``epoch``, while the ledger is that epoch and not held at ``now``), durably:
        raises LockLostError (LedgerLostError, LedgerHeldError) or DurabilityError, and
        then the caller must not send."""
        stamp = time.time() if now is None else now
        written = await self._send(
            keys=[
                self.record_key(key),
                self.states_key,
                lock_key,
                self.epoch_key,
                self.bag_open_key(ask.bag_id),
            ],
            args=[
                key,
                "sent",
                token,
                epoch or "",
                repr(stamp),
                *self._signed_ask(key, ask),
                *self._stamp(),
            ],
        )
        if isinstance(written, list):
            until = float(_text(written[1]) or 0.0)
            raise LedgerHeldError(
                f"the ledger holds every send until {until:.0f} (it is new, or Redis lost "
                "it): a request in flight from before must land first",
                until,
            )
        if written == -2:
            raise LedgerLostError(
                "the ledger's epoch is gone or replaced: Redis lost its data; nothing sent"
            )
        if written == -1:
            raise LockLostError(f"the lock of bag {ask.bag_id} was lost before a send")
        if written == 0:
            # Terminal already (another worker finished it): sending would be a second.
            raise LockLostError(f"item {key} was finished by another worker")
        await self._durable()

    async def mark_pending(
        self, key: str, ask: PendingRefund, *, lock_key: str | None = None, token: str = ""
    ) -> None:
        """Pending with ``ask``; given ``lock_key``, only while ``token`` holds it
        (LockLostError: nothing written, another worker has the item now)."""
        await resolve(self.redis.sadd(self.bag_open_key(ask.bag_id), key))
        ask_json, ask_sig = self._signed_ask(key, ask)[1::2]
        await self._set(
            key,
            "pending",
            lock=(lock_key, token),
            ask=ask_json,
            ask_sig=ask_sig,
            needs_review=int(ask.needs_review),
            message=ask.note or "",
        )

    async def mark_applied(
        self,
        key: str,
        bag_id: int,
        refund_id: int | None,
        *,
        reconciled: bool,
        outcome: str,
        paid: int | None = None,
    ) -> None:
        """Applied, with ``refund_id`` recorded on the bag as this item's, in one script:
        a worker dying mid-way leaves all of it or none. Raises RefundOwnedError when
        the refund is another item's already (nothing written)."""
        script, keys, args = self._applied_call(
            key, bag_id, refund_id, reconciled=reconciled, outcome=outcome, paid=paid
        )
        check_applied(await script(keys=keys, args=args), key, bag_id, refund_id)

    def _applied_call(
        self,
        key: str,
        bag_id: int,
        refund_id: int | None,
        *,
        reconciled: bool,
        outcome: str,
        paid: int | None,
        release: tuple[str, str] | None = None,
    ) -> ScriptCall:
        lock_key, token = release if release is not None else (self.record_key(key), "")
        return (
            self._applied,
            [
                self.record_key(key),
                self.states_key,
                self.bag_refunds_key(bag_id),
                self.bag_owners_key(bag_id),
                self.bag_open_key(bag_id),
                self.bag_owner_sigs_key(bag_id),
                lock_key,
            ],
            [
                key,
                "" if refund_id is None else refund_id,
                "" if refund_id is None else self._owner_mac(bag_id, refund_id, key),
                token,
                "reconciled",
                int(reconciled),
                "outcome",
                outcome,
                "paid",
                "" if paid is None else paid,
                *self._stamp(),
            ],
        )

    async def mark_applied_and_read(
        self,
        key: str,
        bag_id: int,
        refund_id: int | None,
        *,
        reconciled: bool,
        outcome: str,
        paid: int | None = None,
        then: Sequence[ScriptCall] = (),
        counts: tuple[int, int] | None = None,
        release: tuple[str, str] | None = None,
    ) -> tuple[int, LedgerRecord | None]:
        """:meth:`mark_applied`, then the scripts ``then`` (a merchant lane's success),
        then the item's record read back (with ``counts``, a run's requests and 429s,
        added as :meth:`get_counted` adds them), in one round trip: a pipeline, not a
        transaction, so each runs as alone, in that order, the applied write first.
        ``release``: (lock key, token) of the bag's lock, let go of in the applied
        write's own script when it writes (1), and only while the token holds it.

        Returns the applied script's answer (1: written; 0: the item had ended already;
        -1: the refund is another item's, nothing written, as :class:`RefundOwnedError`
        says; -2: the record is gone, Redis lost the ledger) and the record as read
        after it (None: not in the ledger; then no counts were added)."""
        applied = self._applied_call(
            key,
            bag_id,
            refund_id,
            reconciled=reconciled,
            outcome=outcome,
            paid=paid,
            release=release,
        )
        calls = [applied, *then]
        counted: ScriptCall | None = None
        if counts is not None:
            counted = (self._count, [self.record_key(key)], [counts[0], counts[1], "1"])
        async with self.redis.pipeline(transaction=False) as pipe:
            for script, keys, args in calls if counted is None else [*calls, counted]:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            if counted is None:
                pipe.hgetall(self.record_key(key))
            answers = list(await pipe.execute(raise_on_error=False))
        # A script Redis had not loaded (restarted, or its scripts flushed) did not run:
        # it runs now, in its turn; the record is then read again, after it.
        again = False
        for at, (script, keys, args) in enumerate(calls):
            if isinstance(answers[at], NoScriptError):
                answers[at] = await script(keys=keys, args=args)
                again = True
            elif isinstance(answers[at], Exception):
                raise answers[at]
        raw = answers[-1]
        if counted is not None and isinstance(raw, NoScriptError):
            script, keys, args = counted
            raw = await script(keys=keys, args=args)
        elif isinstance(raw, Exception):
            raise raw
        if counted is not None and raw:
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        if again and raw:
            # Its counts are in (a record gone stays gone: nothing to count, none made).
            raw = await resolve(self.redis.hgetall(self.record_key(key)))
        record = _parse(key, raw, self.merchant_of) if raw else None
        return int(answers[0]), record

    async def mark_review(
        self, key: str, message: str, *, lock_key: str | None = None, token: str = ""
    ) -> None:
        """Pending, for a person to look at (nothing more is sent for it); given
        ``lock_key``, only while ``token`` holds it (LockLostError)."""
        await self._set(key, "pending", lock=(lock_key, token), needs_review=1, message=message)

    async def mark_new(
        self,
        key: str,
        bag_id: int | None = None,
        *,
        lock_key: str | None = None,
        token: str = "",
    ) -> None:
        """Back to ``new``: the ask definitely did not apply and may start over (given
        ``lock_key``, only while ``token`` holds it: LockLostError)."""
        await self._set(
            key, "new", close=bag_id, lock=(lock_key, token), ask="", ask_sig="", needs_review=0
        )

    def _signed_ask(self, key: str, ask: PendingRefund) -> list[Any]:
        ask_json = orjson.dumps(ask.to_dict())
        return ["ask", ask_json, "ask_sig", self._ask_mac(key, ask_json)]

    def _ask_mac(self, key: str, ask_json: bytes) -> str:
        return hmac.new(
            self._key(), b"ask\0%s\0%s" % (key.encode(), ask_json), "sha256"
        ).hexdigest()

    def verify_ask(self, record: LedgerRecord) -> bool:
        """Whether the record's protocol record (a sent item's) is one a worker with the
        fleet key wrote for this item."""
        if not (record.ask_json and record.ask_signature):
            return False
        expected = self._ask_mac(record.key, record.ask_json.encode())
        return hmac.compare_digest(expected, record.ask_signature)

    async def mark_failed(
        self,
        key: str,
        error: str,
        message: str,
        *,
        outcome: str,
        bag_id: int | None = None,
        lock_key: str | None = None,
        token: str = "",
    ) -> None:
        """Failed (given ``lock_key``, only while ``token`` holds it: LockLostError)."""
        await self._set(
            key,
            "failed",
            close=bag_id,
            lock=(lock_key, token),
            error=error,
            message=message,
            outcome=outcome,
        )

    async def bag_refunds(self, bag_id: int, *, owner: str | None = None) -> set[int]:
        """Refund ids the ledger recorded on ``bag_id``, but those of item ``owner``: a
        refund is never "another item's" to the item it belongs to."""
        ids = {int(v) for v in await resolve(self.redis.smembers(self.bag_refunds_key(bag_id)))}
        if owner is not None and ids:
            owners = await self.bag_owners(bag_id)
            ids -= {r for r, k in owners.items() if k == owner}
        return ids

    async def bag_owners(self, bag_id: int) -> dict[int, str]:
        """Refund id -> the item it is the refund of, for refunds recorded on ``bag_id``
        (a ledger written before owners were kept may hold refunds with none). With the
        fleet key, only owners a worker holding it wrote: an owner a Redis writer named
        would make an item take its own refund for another's, and send again."""
        owners = await resolve(self.redis.hgetall(self.bag_owners_key(bag_id)))
        found = {int(r): str(_text(k)) for r, k in owners.items()}
        if self.fleet_key is None or not found:
            return found
        signed = await resolve(self.redis.hgetall(self.bag_owner_sigs_key(bag_id)))
        sigs = {int(r): str(_text(m)) for r, m in signed.items()}
        return {
            refund: owner
            for refund, owner in found.items()
            if hmac.compare_digest(self._owner_mac(bag_id, refund, owner), sigs.get(refund, ""))
        }

    def _owner_mac(self, bag_id: int, refund_id: int, owner: str) -> str:
        message = orjson.dumps(["owner", bag_id, refund_id, owner])
        return hmac.new(self._key(), message, hashlib.sha256).hexdigest()

    async def counts(self) -> Counter[str]:
        """Items by state."""
        states = await resolve(self.redis.hvals(self.states_key))
        return Counter(_text(s) or "" for s in states)

    async def add_requests(
        self, key: str, requests: int, rate_limited: int
    ) -> tuple[int, int] | None:
        """Add one run's answered requests and 429s to item ``key`` (one round trip);
        returns the item's totals (None: the item is not in the ledger, nothing was
        written)."""
        totals = await self._count(keys=[self.record_key(key)], args=[requests, rate_limited, "0"])
        if not totals:
            return None
        return (int(totals[0]), int(totals[1]))

    async def get_counted(self, key: str, requests: int, rate_limited: int) -> LedgerRecord | None:
        """:meth:`add_requests`, then the record of ``key`` as :meth:`get` reads it, in
        the same round trip (None: not in the ledger, nothing written)."""
        flat = await self._count(keys=[self.record_key(key)], args=[requests, rate_limited, "1"])
        if not flat:
            return None
        return _parse(key, dict(zip(flat[::2], flat[1::2], strict=True)), self.merchant_of)

    async def request_counts(self) -> dict[str, int]:
        """The fleet's answered requests and 429s so far, over every item's runs:
        ``{"requests": ..., "rate_limited": ...}`` (a read of every item's record)."""
        keys = sorted(str(_text(k)) for k in await resolve(self.redis.hkeys(self.states_key)))
        requests = rate_limited = 0
        for start in range(0, len(keys), 1000):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys[start : start + 1000]:
                    pipe.hmget(self.record_key(key), ["requests", "rate_limited"])
                for counted, limited in await pipe.execute():
                    requests += _count(_text(counted))
                    rate_limited += _count(_text(limited))
        return {"requests": requests, "rate_limited": rate_limited}

    async def keys_in(self, *states: State) -> list[str]:
        wanted = set(states)
        found = await resolve(self.redis.hgetall(self.states_key))
        return sorted(str(_text(k)) for k, v in found.items() if _text(v) in wanted)

    async def check_durability(self) -> list[str]:
        """What in the server's configuration makes a ``sent`` record less than durable
        (empty: fine, or CONFIG is not allowed, as on many managed Redis)."""
        if self.wait_replicas or self.wait_aof:
            return []
        try:
            config = await self.redis.config_get("appendonly")
            config.update(await self.redis.config_get("appendfsync"))
        except Exception:  # noqa: BLE001 - CONFIG disabled: nothing to tell
            return []
        problems = []
        if _text(config.get("appendonly")) != "yes":
            problems.append("appendonly is not yes")
        if _text(config.get("appendfsync")) != "always":
            problems.append("appendfsync is not always")
        return problems

    def _stamp(self) -> list[Any]:
        return ["updated_at", repr(time.time())]

    async def _set(
        self,
        key: str,
        state: State,
        *,
        close: int | None = None,
        lock: tuple[str | None, str] = (None, ""),
        **fields: Any,
    ) -> None:
        """Write ``state`` and ``fields``; ``close``: the bag whose open set the item
        leaves, in the same script; ``lock``: (lock key, token) the write needs held."""
        lock_key, token = lock
        args: list[Any] = [key, state, token if lock_key is not None else ""]
        for name, value in fields.items():
            args += [name, value]
        args += self._stamp()
        keys = [self.record_key(key), self.states_key, lock_key or self.record_key(key)]
        if close is not None:
            keys.append(self.bag_open_key(close))
        done = await self._write(keys=keys, args=args)
        if done == -1:
            raise LockLostError(f"item {key}: this worker's lock is gone; nothing written")
        if done == -2:
            raise LedgerLostError(f"item {key} is gone from the ledger: Redis lost its data")

    async def _durable(self) -> None:
        if self.wait_aof:
            local, _replicas = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "WAITAOF", 1, self.wait_replicas, self.wait_timeout_ms
            )
            if int(local) < 1:
                raise DurabilityError("WAITAOF: the local AOF did not confirm the write")
        elif self.wait_replicas:
            acked = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "WAIT", self.wait_replicas, self.wait_timeout_ms
            )
            if int(acked) < self.wait_replicas:
                raise DurabilityError(
                    f"WAIT: {acked} of {self.wait_replicas} replicas confirmed the write"
                )


def _parse(
    key: str, raw: dict[Any, Any], merchant_of: Callable[[str, Any, Any], int | None]
) -> LedgerRecord:
    data = {_text(k): _text(v) for k, v in raw.items()}
    kind = data.get("kind")
    request_json = orjson.loads(data.get("request") or "{}")
    order_id = int(data.get("order_id") or 0)
    bag_id = int(data.get("bag_id") or 0)
    line = int(data.get("line") or 0)
    merchant = merchant_of(key, data.get("merchant_id"), data.get("merchant_sig"))
    if kind == "cancel":
        cancel = request_from_dict(CancelBagRequest, request_json)
        item = BatchItem(line, "cancel", order_id, bag_id, cancel, merchant)
    else:
        refund = request_from_dict(RefundBagRequest, request_json)
        item = BatchItem(line, "refund", order_id, bag_id, refund, merchant)
    ask = data.get("ask")
    refund_id = data.get("refund_id")
    updated = data.get("updated_at")
    state = data.get("state") or "new"
    return LedgerRecord(
        key=key,
        state=_state(state) or "new",
        item=item,
        source=data.get("source") or "",
        ask=orjson.loads(ask) if ask else None,
        refund_id=int(refund_id) if refund_id else None,
        reconciled=data.get("reconciled") == "1",
        error=data.get("error") or None,
        message=data.get("message") or None,
        outcome=data.get("outcome") or None,
        needs_review=data.get("needs_review") == "1",
        updated_at=float(updated) if updated else None,
        signature=data.get("sig") or "",
        ask_json=ask or "",
        ask_signature=data.get("ask_sig") or "",
        restored=data.get("restored") == "1",
        paid=int(paid) if (paid := data.get("paid")) else None,
        held_by=data.get("held_by") or "",
        repeat_signature=data.get("repeat_sig") or "",
        requests=_count(data.get("requests")),
        rate_limited=_count(data.get("rate_limited")),
    )


def _count(text: str | None) -> int:
    """A counter field as a record holds it (0: none, or not a number: written by
    someone else; a count decides nothing)."""
    try:
        return max(int(text or 0), 0)
    except ValueError:
        return 0


def _done_or_open(record: LedgerRecord) -> bool:
    """Applied, or sent and not settled (an item held as already_present never sent)."""
    if record.state == "applied":
        return True
    return record.state in ("sent", "pending") and not record.held_by


def is_blocked(record: LedgerRecord) -> bool:
    """Left not sent by :meth:`RedisLedger.mark_blocked` (new, outcome ``not_sent``)."""
    return record.state == "new" and record.outcome == "not_sent"


def resumable_record(record: LedgerRecord, now: float) -> PendingRefund | None:
    """The record to resume from (None: never sent, send anew); ``now``: the client's
    time, for a torn record.

    The ledger's edge says whether it may have been sent (its sent and pending states;
    a record still NEW under them was torn mid-send, so counts as sent) and reads its
    record; what is resumed is the one rule of :func:`~violet_async._engine.resumable`."""
    if record.state not in ("sent", "pending"):
        return None
    try:
        stored = record.pending()
    except RequestValidationError:
        stored = None
    if stored is not None and stored.phase is Phase.NEW:
        stored = None  # its state says it was sent: torn, sent once
    return resumable(stored, item_ask(record.item), sent_at=record.updated_at or now)


#: The ``outcome`` a failed record carries for each end it stands for (the rest are
#: ``failed``; ``refused`` is an item nobody with the fleet key signed).
FAILED_OUTCOMES = {
    Outcome.PRESENT: "already_present",
    Outcome.REVIEW: "unknown",
    Outcome.FAILED: "failed",
}


@attrs.define
class LedgerRecords:
    """The fleet ledger as the record store seam (``AskRecords``) of one item, under
    its bag's lock (``lock_key``, ``token``): ``record`` as read under that lock.

    ``load``: the record to resume (:func:`resumable_record`). ``save``: a sent record
    written durably before the send leaves, in one script with the lock and epoch
    checks (:meth:`RedisLedger.mark_sent`: a refused write raises, nothing is sent); a
    pending one; an ABSENT one (every send proven not applied, the next waiting to
    leave) makes the item new again. ``end``: the item's state for the outcome, in the
    ledger's words (``VOCABULARY["ledger"]``); an applied one in one round trip with
    the worker's ``then`` scripts (its merchant's lane) and the record read back
    (:meth:`RedisLedger.mark_applied_and_read`, letting go of the bag's lock as it
    writes), its answer kept in :attr:`applied`.

    ``lock_key`` None: the item's refund recorded again with no lock held (a run whose
    ledger write failed after its refund); only an applied end is recorded so."""

    ledger: RedisLedger
    record: LedgerRecord
    lock_key: str | None
    token: str
    clock: Callable[[], float]
    """The client's wall clock (a torn record's send time)."""
    epoch: Callable[[], str | None]
    """The ledger epoch the worker runs under (a send is refused in another)."""
    stamp: Callable[[], Awaitable[float]]
    """Redis's time now, as the worker carries it (a send's hold check)."""
    redact: Callable[[BaseException], str]
    """An error's text as the ledger keeps it (the client's secrets hidden)."""
    applied: tuple[int, LedgerRecord | None] | None = None
    """The applied end's answer (:meth:`RedisLedger.mark_applied_and_read`)."""

    async def load(self) -> PendingRefund | None:
        return resumable_record(self.record, self.clock())

    async def save(self, ask: PendingRefund) -> None:
        key = self.record.key
        ledger = self.ledger
        if self.lock_key is None:
            raise LockLostError(f"item {key}: nothing is saved or sent without the bag's lock")
        if ask.phase is Phase.SENT:
            epoch = self.epoch()
            await ledger.mark_sent(
                key,
                ask,
                lock_key=self.lock_key,
                token=self.token,
                epoch=epoch,
                now=await self.stamp(),
            )
        elif ask.phase is Phase.PENDING:
            await ledger.mark_pending(key, ask, lock_key=self.lock_key, token=self.token)
        elif ask.phase is Phase.ABSENT:
            # Every send so far proven not applied, and the next waits to leave (a
            # 429's Retry-After, a backoff): the item is new again until it does (the
            # stamp right before it leaves marks it sent). Left "sent" from the send
            # before, a run after this one stopped in the wait read the bag back and
            # took a refund another system made meanwhile for its own.
            await ledger.mark_new(
                key, self.record.item.bag_id, lock_key=self.lock_key, token=self.token
            )

    async def end(
        self,
        ended: Ended,
        *,
        then: Sequence[ScriptCall] = (),
        counts: tuple[int, int] | None = None,
    ) -> None:
        """``then``, ``counts``: as :meth:`RedisLedger.mark_applied_and_read` takes them,
        for an applied end."""
        ledger = self.ledger
        key = self.record.key
        bag_id = self.record.item.bag_id
        lock: dict[str, Any] = {"lock_key": self.lock_key, "token": self.token}
        outcome = ended.outcome
        refund = ended.refund
        if refund is not None:
            self.applied = await ledger.mark_applied_and_read(
                key,
                bag_id,
                refund.id,
                reconciled=refund.reconciled,
                outcome="reconciled" if refund.reconciled else "applied",
                paid=refund.amount,
                then=then,
                counts=counts,
                release=None if self.lock_key is None else (self.lock_key, self.token),
            )
            return
        if self.lock_key is None:
            raise LockLostError(f"item {key}: an end without a refund needs the bag's lock")
        exc = ended.error
        pending = getattr(exc, "pending", None)
        if outcome in (Outcome.PENDING, Outcome.REVIEW) and isinstance(pending, PendingRefund):
            # The ledger, not a worker's client, keeps the fleet's pending asks.
            await ledger.mark_pending(key, pending, **lock)
        elif outcome in (Outcome.NOT_SENT, Outcome.DEFERRED):
            # Nothing applied: the item starts over (only while it holds the bag).
            await ledger.mark_new(key, bag_id, **lock)
        elif outcome is Outcome.FAILED and self.record.restored:
            # Run again from the job's copy after Redis lost the ledger: this run
            # applied nothing, but the item may have applied before the loss (the
            # refund or cancel this run was refused for may be its own). Unknown.
            await ledger.mark_review(
                key,
                "the ledger lost this item's record (Redis lost its data) and its run "
                f"again from the job's copy ended in {type(exc).__name__}: "
                f"{self.redact(exc) if exc is not None else ''}; whether it applied before "
                "the loss is not known; nothing more is sent: check the bag",
                **lock,
            )
        else:
            await ledger.mark_failed(
                key,
                type(exc).__name__,
                self.redact(exc) if exc is not None else "",
                outcome=FAILED_OUTCOMES.get(outcome, Outcome.FAILED.value),
                bag_id=bag_id,
                **lock,
            )
