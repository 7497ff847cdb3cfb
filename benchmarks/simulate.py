"""Run many seeded fault schedules through the real refund protocol (see README,
"Reliability: simulation").

    python benchmarks/simulate.py --schedules 20000           # throughput + violations
    python benchmarks/simulate.py --seed 184                  # replay one, with its trace
    python benchmarks/simulate.py --seed 184 --shrink         # and its smallest schedule
    python benchmarks/simulate.py --find --schedules 5000     # stop at the first violation
    python benchmarks/simulate.py --kinds all --schedules 20000  # with every world kind
    python benchmarks/simulate.py --kinds all --schedules 200000 --processes 2  # both cores

Prints schedules per second, faults injected by kind, outcomes, and violations by kind
with its first ten seeds (replay one with --seed), and the named remaining risks counted
instead of flagged (``named:risk_b``, with their first ten seeds). ``--known`` lists kinds that are
counted but do not fail the run (exit 1 on any other). ``--processes N`` runs the seeds
in blocks of ``--block`` on N processes (the same seeds, the same results, printed in
seed order; a line on stderr per block done). The stores and journals a schedule opens
live in ``--tmp`` (``/dev/shm`` where there is one: a schedule's fsyncs then cost
nothing, and nothing the simulator checks depends on them).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator

import attrs

from violet_async.testing.sim import WORLD_KINDS, shrink, simulate

#: How many seeds of each violation kind the summary names.
SEEDS_SHOWN = 10
#: A RAM-backed directory; ``tempfile`` makes private (0700, random) directories in it.
SHM = "/dev/shm"  # noqa: S108


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=2000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay one seed and print its trace")
    parser.add_argument("--mode", choices=("direct", "batch", "worker"))
    parser.add_argument("--shrink", action="store_true", help="shrink a failing --seed")
    parser.add_argument("--find", action="store_true", help="stop at the first violation")
    parser.add_argument("--known", default="", help="comma-separated kinds not to fail on")
    parser.add_argument("--processes", type=int, default=1, help="processes to run seeds on")
    parser.add_argument("--block", type=int, default=500, help="seeds a process takes at once")
    parser.add_argument(
        "--tmp",
        default=SHM if os.access(SHM, os.W_OK) else None,
        help="where schedules keep their stores and journals (default: /dev/shm if writable)",
    )
    parser.add_argument(
        "--kinds",
        default="",
        help=f"world kinds to switch on, comma-separated, or 'all': {', '.join(WORLD_KINDS)}",
    )
    args = parser.parse_args(argv)
    if args.processes < 1 or args.block < 1:
        parser.error("--processes and --block must be at least 1")
    world = set(WORLD_KINDS) if args.kinds == "all" else {k for k in args.kinds.split(",") if k}

    if args.seed is not None:
        result = simulate(args.seed, mode=args.mode, kinds=world)
        if result.ok and result.excused:
            print(result.report())  # the named risks counted, with the trace
            return 0
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


@attrs.define
class _Tally:
    """What a block of seeds found (added up in seed order)."""

    injected: Counter[str] = attrs.Factory(Counter)
    outcomes: Counter[str] = attrs.Factory(Counter)
    kinds: Counter[str] = attrs.Factory(Counter)
    first: dict[str, list[int]] = attrs.Factory(dict)
    """Each violation kind's first ten seeds."""
    named: list[int] = attrs.Factory(list)
    """The first ten seeds with a named risk counted instead of flagged."""
    modes: Counter[str] = attrs.Factory(Counter)
    virtual: float = 0.0
    ran: int = 0
    found: tuple[int, list[str], list[str]] | None = None
    """--find: (seed, its violation kinds, its first violations)."""

    def add(self, other: _Tally) -> None:
        self.injected.update(other.injected)
        self.outcomes.update(other.outcomes)
        self.kinds.update(other.kinds)
        for kind, seeds in other.first.items():
            mine = self.first.setdefault(kind, [])
            mine[:] = (mine + seeds)[:SEEDS_SHOWN]
        self.named[:] = (self.named + other.named)[:SEEDS_SHOWN]
        self.modes.update(other.modes)
        self.virtual += other.virtual
        self.ran += other.ran
        self.found = self.found or other.found


Job = tuple[int, int, str | None, frozenset[str], bool, frozenset[str], str | None]


def _block(job: Job) -> _Tally:
    """Run seeds ``start`` to ``stop - 1`` (with --find: up to the first violation)."""
    start, stop, mode, world, find, known, tmp = job
    if tmp:
        tempfile.tempdir = tmp
    tally = _Tally()
    for seed in range(start, stop):
        result = simulate(seed, mode=mode, kinds=world)
        tally.ran += 1
        tally.modes[result.schedule.mode] += 1
        tally.injected.update(result.injected)
        tally.outcomes.update(result.outcomes)
        tally.virtual += result.virtual_seconds
        if result.excused and len(tally.named) < SEEDS_SHOWN:
            tally.named.append(seed)
        for kind in result.kinds:
            tally.kinds[kind] += 1
            seeds = tally.first.setdefault(kind, [])
            if len(seeds) < SEEDS_SHOWN:
                seeds.append(seed)
        if find and result.kinds - known:
            tally.found = (seed, sorted(result.kinds), result.violations[:5])
            break
    return tally


def _blocks(args: argparse.Namespace, world: set[str], known: set[str]) -> Iterator[Job]:
    stop = args.start + args.schedules
    for start in range(args.start, stop, args.block):
        end = min(start + args.block, stop)
        yield (start, end, args.mode, frozenset(world), args.find, frozenset(known), args.tmp)


def _many(args: argparse.Namespace, world: set[str], known: set[str]) -> int:
    tally = _Tally()
    began = time.perf_counter()
    jobs = _blocks(args, world, known)
    # spawn: each process starts clean (no threads or loops of this one carried over).
    pool = multiprocessing.get_context("spawn").Pool(args.processes) if args.processes > 1 else None
    try:
        for block in map(_block, jobs) if pool is None else pool.imap(_block, jobs):
            tally.add(block)
            if pool is not None:
                print(
                    f"  {tally.ran} schedules, {sum(tally.kinds.values())} violations, "
                    f"{time.perf_counter() - began:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            if tally.found is not None:
                seed, kinds, violations = tally.found
                print(f"found after {tally.ran} schedules (seed {seed}): {kinds}")
                print("\n".join(violations))
                return 1
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    took = time.perf_counter() - began
    rate = tally.ran / took
    print(
        f"{tally.ran} schedules in {took:.1f}s: {rate:.0f} schedules/s "
        f"({tally.virtual / 3600:.0f} h of virtual Violet time)"
    )
    print(
        f"a million schedules: ~{1_000_000 / rate / 60:.0f} min on this machine "
        f"({args.processes} process{'es' if args.processes > 1 else ''})"
    )
    print("modes:", dict(tally.modes))
    print(f"faults injected: {sum(tally.injected.values())}")
    for name, count in sorted(tally.injected.items()):
        print(f"  {name:28} {count}")
    print("outcomes:", dict(tally.outcomes))
    unexpected = {k: v for k, v in tally.kinds.items() if k not in known}
    print(
        f"violations: {sum(unexpected.values())}"
        + (
            f" (+ known: { {k: v for k, v in tally.kinds.items() if k in known} })"
            if known & set(tally.kinds)
            else ""
        )
    )
    for kind, count in sorted(tally.kinds.items()):
        shown = ", ".join(map(str, tally.first[kind]))
        print(f"  {kind:20} {count:6}  first seed{'s' if count > 1 else ''} {shown}")
    named = {k: v for k, v in tally.injected.items() if k.startswith("named:")}
    if named:
        # Named remaining risks (docs/simulation.md, "Named risks"): counted, not flagged.
        print(f"named risks (counted, not violations): {named}")
        print(f"  first seeds {', '.join(map(str, tally.named))}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
