"""Review 21: attacks an outsider would try on today's main.

Each test scripts its own server (tests/hostile.py) on a FakeClock shared with the
client; refunds are counted by the server's own record."""

from __future__ import annotations

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy
from violet_async._ask import machine_name, same_machine
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

AMOUNT = 300

#: ``/proc/self/timens_offsets`` of a process in the machine's first time namespace,
#: and of one in a namespace whose monotonic clock is 500 s ahead (a container made
#: with ``unshare --time --monotonic 500``, or restored by CRIU: its monotonic clock
#: goes on from where it was checkpointed). Both read the machine's ``boot_id``.
ROOT_OFFSETS = "monotonic           0         0\nboottime            0         0\n"
AHEAD_OFFSETS = "monotonic         500         0\nboottime            0         0\n"


class _NamespaceClock:
    """A process's view of the machine's clocks in a time namespace: the same wall
    clock, its monotonic clock ``ahead`` seconds ahead of the machine's; named as the
    process names its machine (its ``boot_id`` and its namespace's offsets)."""

    def __init__(self, clock: FakeClock, offsets: str, ahead: float) -> None:
        self._clock = clock
        self._ahead = ahead
        self.machine = machine_name(clock.machine, offsets)

    def monotonic(self) -> float:
        return self._clock.monotonic() + self._ahead

    def time(self) -> float:
        return self._clock.time()

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)


def test_a_time_namespace_names_another_machine() -> None:
    """Processes in two time namespaces of one boot read one ``boot_id`` but monotonic
    clocks that differ by their namespaces' offsets: their clock names are not of one
    machine. The first namespace names its machine by the boot alone (as records
    written before did)."""
    boot = "e149ceffa5a14446"
    root, ahead = machine_name(boot, ROOT_OFFSETS), machine_name(boot, AHEAD_OFFSETS)
    assert root == boot
    assert machine_name(boot, "") == boot  # no time namespaces (Linux before 5.6)
    assert not same_machine(f"p1@{root}", f"p2@{ahead}")
    assert same_machine(f"p1@{ahead}", f"p2@{machine_name(boot, AHEAD_OFFSETS)}")
    assert machine_name("", AHEAD_OFFSETS) == ""  # no boot: no machine


async def test_a_record_from_another_time_namespace_is_not_moved_by_its_offset() -> None:
    """A worker's POST is answered 504 while it is still running at Violet (it applies
    40 s later); the worker's call ends pending, its record stamped with its wall and
    monotonic time. A worker in a container on the same host (one ``boot_id``, its own
    time namespace, monotonic clock 500 s ahead) resumes the record 5 s later. Taken
    for a process on one machine, the record was moved by the "step" between the two
    monotonic clocks (-500 s): its settle window looked long over, the read-back missed
    the refund still running, and the refund was sent again: two refunds."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, b"gateway", commit_after=40.0), Step(200)])
    policy = RetryPolicy(max_attempts=3, deadline=20.0, settle_running=60.0)
    async with (
        hostile_client(
            server, retry=policy, clock=_NamespaceClock(clock, ROOT_OFFSETS, 0.0)
        ) as first,
        hostile_client(
            server, retry=policy, clock=_NamespaceClock(clock, AHEAD_OFFSETS, 500.0)
        ) as second,
    ):
        try:
            got: object = await first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        except AmbiguousOutcomeError as exc:
            got = exc
        assert isinstance(got, AmbiguousOutcomeError), got
        assert got.pending is not None
        assert server.posts == 1
        clock.advance(5.0)
        try:
            later: object = await second.resume(got.pending)
        except AmbiguousOutcomeError as exc:
            later = exc
        clock.advance(120.0)  # the first POST has applied
    assert len(server.ours) == 1, f"{later!r}: refunded twice"
    assert server.posts == 1
    if isinstance(later, OrderRefund):
        assert [later.id] == server.ours
