"""World kind of review 25's class: another order's refund listed under an ask's bag.

- ``other_order`` (every mode): 0.5 to 20 s after one refund ask's first POST reaches
  Violet (or is lost on its way), the ask's bag lists a refund of the same amount and
  reason that names ANOTHER order (a record a backend filed under the wrong bag id; no
  money moved on this bag). Violet's listing is per bag, so an ask that reads its bag
  back after an unsure send sees a record that looks like its own in every field but
  the order. Invariant: the base world's ``attribution`` (that refund is never the
  ask's, whatever the clocks say: it names another order).

Drawn from its own random stream (``"other_order:<seed>"``), so a seed's schedule
without it is what it always was.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["ORDER_KINDS", "arm", "draw"]

ORDER_KINDS = ("other_order",)

#: Seconds after the ask's first POST that the other order's record is listed.
DELAYS = (0.5, 2.0, 6.0, 20.0)


def draw(s: Any, kinds: frozenset[str]) -> dict[str, Any]:
    """The schedule changes of ``other_order`` (when in ``kinds``) over ``s``."""
    if "other_order" not in kinds:
        return {}
    rng = random.Random(f"other_order:{s.seed}")
    asked = [a for a in s.asks if a.kind == "refund" and a.amount is not None]
    if len(s.bags) < 2 or not asked or rng.random() >= 0.5:
        return {}
    ask = rng.choice(asked)
    return {"other_order": (ask.label, rng.choice(DELAYS))}


def arm(world: Any) -> None:
    """Lay the drawn record's gate over the world's Violet (before any other gate: it
    only watches, and answers nothing)."""
    drawn: tuple[str, float] | None = world.s.other_order
    if drawn is None:
        return
    label, after = drawn
    ask = next(a for a in world.s.asks if a.label == label)
    order_id, bag_id = world.ids[ask.bag]
    other = next(o for o, _ in world.ids if o != order_id)
    violet = world.violet
    previous = violet.clean_gate
    fired = False

    def list_it() -> None:
        bag = violet.store.bag(order_id, bag_id)
        record = violet.store.foreign_refund(bag, ask.amount, ask.reason, order_id=other)
        violet.commit_at[record["id"]] = violet.clock.monotonic()
        violet.count("world:other_order_refund")

    def gate(bag: int, sent: str | None) -> Any:
        nonlocal fired
        if not fired and bag == bag_id and (sent or "").split("~")[0] == label:
            fired = True
            world.loop.call_later(after, list_it)
        return previous(bag, sent) if previous is not None else None

    violet.clean_gate = gate
