"""Test helpers users get with the SDK: FakeViolet (an embedded Violet server with a
bag state machine, a ledger and fault injection) and FakeClock (retries without real
sleeping)."""

from ._clock import FakeClock
from ._faults import Fault, FaultPlan
from ._server import FakeViolet
from ._state import FakeBag, FakeOrder, FakeSku, Ledger

__all__ = [
    "FakeBag",
    "FakeClock",
    "FakeOrder",
    "FakeSku",
    "FakeViolet",
    "Fault",
    "FaultPlan",
    "Ledger",
]
