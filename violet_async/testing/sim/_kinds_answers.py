"""World kinds of Violet's newer answers: a 2xx whose refund moved no money, a 303 after
the commit, a 200 without the refund's id; and a keyed call's pending record resumed in
one process while another repeats the keyed call on the same SQLite file.

Each is drawn from its own random stream (``"<kind>:<seed>"``), so a seed's schedule
with them off is what it always was.

- ``refund_answers``: some refund and cancel POSTs are answered (after the commit) with
  the refund in status ``CANCELED`` or ``FAILED`` (the platform refused it: Violet keeps
  the record, CANCELED or FAILED, and no money moved: it leaves the simulator's ledger),
  ``303 See Other`` (a ``Location`` to the refund made), or a 200 without the refund's
  ``id``. In direct mode, half the schedules add a twin ask: the same request on the
  same bag, from another caller without a key, a moment later, and in half of those the
  first POST is answered without its id and the next one is unsure (an id-less answer
  must never let the twin claim the first's refund). Invariants: a refund that moved no money is
  never reported as made; a caller told its refund failed made none (the base world's
  ``failed-but-applied``); at most one refund per ask (``double``); a refund handed out
  without its id is the caller's own (``attribution``), and is never handed to another
  ask (``idless-claimed``, whatever else the base world calls it).
- ``keyed_resume`` (direct mode): a second process (its own client) calls an ask alone
  on its bag with the first's idempotency key, through two ``SQLiteStore``s on one temp
  file; the first process, told its keyed call is pending, resumes the record it was
  handed (``client.resume``) rather than calling again, while the second repeats the
  keyed call. Invariants: at most one refund per key; the two callers' last definite
  answers agree (both handed a refund: the same one; none told "failed" after the
  other was handed the key's refund); and the base world's.
"""

from __future__ import annotations

import random
from typing import Any

from ._kinds_more import SecondCaller
from ._violet import ANSWER_POST_KINDS, SimFault

__all__ = ["ANSWER_KINDS", "ANSWER_POST_KINDS", "check", "draw"]

ANSWER_KINDS = ("refund_answers", "keyed_resume")


def draw(s: Any, kinds: frozenset[str], post: list[SimFault | None]) -> dict[str, Any]:
    """The schedule changes of ``kinds``' answer kinds over ``s`` (``post``: the POST
    faults drawn so far, changed in place)."""
    changes: dict[str, Any] = {}
    if "refund_answers" in kinds:
        rng = random.Random(f"refund_answers:{s.seed}")
        for i in range(len(post)):
            if rng.random() < 0.15:
                post[i] = SimFault(rng.choice(ANSWER_POST_KINDS))
        refunds = [a for a in s.asks if a.kind == "refund"]
        if s.mode == "direct" and refunds and rng.random() < 0.5:
            ask = rng.choice(refunds)
            twin = type(ask)(
                f"A{len(s.asks)}",
                ask.bag,
                ask.kind,
                ask.amount,
                ask.skus,
                ask.reason,
                round(ask.start + rng.choice((0.0, 0.3, 2.0, 8.0)), 3),
            )
            changes["asks"] = (*s.asks, twin)
            if post and rng.random() < 0.5:
                # The first POST answered without its id, the next one unsure: a twin
                # that reads the bag back sees a refund of its request it did not make.
                post[0] = SimFault("no_id_answer")
                if len(post) > 1:
                    post[1] = SimFault(
                        rng.choice(("drop_before", "hang_before", "gateway_before", "drop_after")),
                        status=502,
                    )
            # Another process's keyed caller is only ever on an ask alone on its bag.
            kept = tuple(c for c in s.second_callers if c.label != ask.label)
            if kept != s.second_callers:
                changes["second_callers"] = kept
    if "keyed_resume" in kinds and s.mode == "direct":
        rng = random.Random(f"keyed_resume:{s.seed}")
        asks = changes.get("asks", s.asks)
        on_bag: dict[int, int] = {}
        for a in asks:
            on_bag[a.bag] = on_bag.get(a.bag, 0) + 1
        seconds = tuple(
            SecondCaller(a.label, rng.choice((0.0, 0.3, 5.0, 40.0, 90.0)))
            for a in asks
            if on_bag[a.bag] == 1 and rng.random() < 0.8
        )
        if seconds:
            changes["second_callers"] = seconds
            changes["shared_store"] = "sqlite"
            changes["keyed_resume"] = True
    return changes


def check(world: Any) -> None:
    """The invariants of these kinds, on top of the base world's (see the module)."""
    violet = world.violet
    voided = {c.refund_id for c in violet.voided}
    if voided:
        violet.count("world:voided_refund", len(voided))
    idless = {r: (w or "").split("~")[0] for w, r in violet.idless}
    for seen in world.seen:
        if seen.what == "refund" and idless.get(seen.refund_id, seen.label) != seen.label:
            world.violations.append(
                f"[idless-claimed] {seen.who} was handed refund {seen.refund_id}, which "
                f"{idless[seen.refund_id]} was handed without its id"
            )
        if seen.what == "refund" and seen.refund_id in voided:
            world.violations.append(
                f"[void-reported-made] {seen.who} was handed refund {seen.refund_id}, "
                "which moved no money (CANCELED or FAILED)"
            )
        if seen.what == "refund" and seen.refund_id is None:
            world.violations.append(
                f"[idless-unbound] {seen.who} was handed a refund without an id no "
                "answer to its own send carried"
            )
    if not world.s.keyed_resume:
        return
    for label in world.two_processes:
        last: dict[str, Any] = {}
        for seen in world.seen:
            if seen.label == label and seen.what in ("refund", "failed"):
                last[seen.who] = seen
        first, second = last.get(label), last.get(f"{label}~2")
        if first is None or second is None:
            continue
        refunds = [x for x in (first, second) if x.what == "refund"]
        failed = [x for x in (first, second) if x.what == "failed"]
        # Both told of a refund: the same one. One told "failed" after the other was
        # handed the key's refund: a false failure (a failure told before it is true
        # then, and the base world checks nothing had applied).
        if (len(refunds) == 2 and first.refund_id != second.refund_id) or (
            refunds and failed and failed[0].at > refunds[0].at
        ):
            world.violations.append(
                f"[disagree] {label}: one key, the first process ended "
                f"{first.what} {first.refund_id or ''}, the second {second.what} "
                f"{second.refund_id or ''}"
            )
