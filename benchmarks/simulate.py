"""Run many seeded fault schedules through the real refund protocol (see README,
"Reliability: simulation").

    python benchmarks/simulate.py --schedules 20000           # throughput + violations
    python benchmarks/simulate.py --seed 184                  # replay one, with its trace
    python benchmarks/simulate.py --seed 184 --shrink         # and its smallest schedule
    python benchmarks/simulate.py --find --schedules 5000     # stop at the first violation
    python benchmarks/simulate.py --kinds all --schedules 20000  # with every world kind

Prints schedules per second, faults injected by kind, outcomes, and violations by kind
with the first seed of each (replay it with --seed). ``--known`` lists kinds that are
counted but do not fail the run (exit 1 on any other).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from violet_async.testing.sim import WORLD_KINDS, shrink, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=2000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay one seed and print its trace")
    parser.add_argument("--mode", choices=("direct", "batch", "worker"))
    parser.add_argument("--shrink", action="store_true", help="shrink a failing --seed")
    parser.add_argument("--find", action="store_true", help="stop at the first violation")
    parser.add_argument("--known", default="", help="comma-separated kinds not to fail on")
    parser.add_argument(
        "--kinds",
        default="",
        help=f"world kinds to switch on, comma-separated, or 'all': {', '.join(WORLD_KINDS)}",
    )
    args = parser.parse_args(argv)
    world = set(WORLD_KINDS) if args.kinds == "all" else {k for k in args.kinds.split(",") if k}

    if args.seed is not None:
        result = simulate(args.seed, mode=args.mode, kinds=world)
        if result.ok:
            print(f"seed {args.seed}: no violation")
            print(result.schedule.describe())
            return 0
        if args.shrink:
            small = shrink(result)
            print(
                f"shrunk from {result.schedule.fault_count()} to "
                f"{small.schedule.fault_count()} faults"
            )
            result = small
        print(result.report())
        return 1

    known = {k for k in args.known.split(",") if k}
    print("world kinds:", ", ".join(sorted(world)) or "none")
    return _many(args, world, known)


def _many(args: argparse.Namespace, world: set[str], known: set[str]) -> int:
    injected: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    first: dict[str, int] = {}
    modes: Counter[str] = Counter()
    virtual = 0.0
    began = time.perf_counter()
    ran = 0
    for seed in range(args.start, args.start + args.schedules):
        result = simulate(seed, mode=args.mode, kinds=world)
        ran += 1
        modes[result.schedule.mode] += 1
        injected.update(result.injected)
        outcomes.update(result.outcomes)
        virtual += result.virtual_seconds
        for kind in result.kinds:
            kinds[kind] += 1
            first.setdefault(kind, seed)
        if args.find and result.kinds - known:
            print(f"found after {ran} schedules (seed {seed}): {sorted(result.kinds)}")
            print("\n".join(result.violations[:5]))
            return 1
    took = time.perf_counter() - began
    rate = ran / took
    print(
        f"{ran} schedules in {took:.1f}s: {rate:.0f} schedules/s "
        f"({virtual / 3600:.0f} h of virtual Violet time)"
    )
    print(f"a million schedules: ~{1_000_000 / rate / 60:.0f} min on this machine (one core)")
    print("modes:", dict(modes))
    print(f"faults injected: {sum(injected.values())}")
    for name, count in sorted(injected.items()):
        print(f"  {name:28} {count}")
    print("outcomes:", dict(outcomes))
    unexpected = {k: v for k, v in kinds.items() if k not in known}
    print(
        f"violations: {sum(unexpected.values())}"
        + (
            f" (+ known: { {k: v for k, v in kinds.items() if k in known} })"
            if known & set(kinds)
            else ""
        )
    )
    for kind, count in sorted(kinds.items()):
        print(f"  {kind:20} {count:6}  first seed {first[kind]}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
