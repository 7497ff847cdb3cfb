"""A deterministic simulator for the refund protocol: the real ``VioletClient`` (its
protocol, retries and read-backs), the batch runner and its journal, run against a
simulated Violet in virtual time, under seeded fault schedules.

    from violet_async.testing.sim import simulate, shrink
    result = simulate(1234)          # one schedule, every invariant checked
    if not result.ok:
        print(shrink(result).report())   # the fewest faults that still fail, and the trace

Each schedule is drawn from ``random.Random(seed)`` and replays exactly. See README,
"Reliability: simulation".
"""

from ._run import CI_KINDS, WORLD_KINDS, Schedule, SimResult, generate, shrink, simulate
from ._violet import SimFault, SimTransport, SimViolet
from ._vloop import SimClock, SimDeadlock, VirtualTimeLoop

__all__ = [
    "CI_KINDS",
    "WORLD_KINDS",
    "Schedule",
    "SimClock",
    "SimDeadlock",
    "SimFault",
    "SimResult",
    "SimTransport",
    "SimViolet",
    "VirtualTimeLoop",
    "generate",
    "shrink",
    "simulate",
]
