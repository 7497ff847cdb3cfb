"""Checked by mypy --strict, never run: each store of an ask's records (the key stores',
the batch journal's, the fleet ledger's, and the runners' wrappers) is an AskRecords,
the one protocol the engine drives them through."""

from __future__ import annotations

from violet_async._engine import AskRecords, KeyRecords
from violet_async.batch import JournalRecords, _ItemRecords
from violet_async.fleet._ledger import LedgerRecords
from violet_async.fleet._worker import _ItemRecords as _FleetItemRecords


def every_store_of_records(
    keys: KeyRecords,
    journal: JournalRecords,
    batch_item: _ItemRecords,
    ledger: LedgerRecords,
    fleet_item: _FleetItemRecords,
) -> list[AskRecords]:
    return [keys, journal, batch_item, ledger, fleet_item]
