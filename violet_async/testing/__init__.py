"""Test helpers users get with the SDK: FakeViolet (an embedded Violet server with a
bag state machine, a ledger, fault injection and hostile-server quirks) and FakeClock
(virtual time shared by the client and FakeViolet: retries and late commits without
real sleeping)."""

from ._clock import FakeClock
from ._faults import Fault, FaultPlan, ServerQuirks
from ._server import FakeViolet, read_banner
from ._state import Commit, FakeBag, FakeOrder, FakeSku, Ledger, Post

__all__ = [
    "Commit",
    "FakeBag",
    "FakeClock",
    "FakeOrder",
    "FakeSku",
    "FakeViolet",
    "Fault",
    "FaultPlan",
    "Ledger",
    "Post",
    "ServerQuirks",
    "read_banner",
]
