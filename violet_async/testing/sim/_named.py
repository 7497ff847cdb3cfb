"""Named risks: violations README names as remaining risk, counted instead of flagged.

Only remaining risk (b) (docs/remaining-risk.md) is classified here: an ask handed a
refund another system made, identical to its request, on its bag, near its send, while
nothing it sent applied and nothing it read could have shown that refund before its
last send. Such an ``[attribution]`` violation is counted (``named:risk_b``) and listed
in the seed's report as "risk (b)"; every other one stays a violation. Every condition
is computed from what the simulator recorded (``SimViolet.commits``, ``posts``,
``pages``), never from trace text; a shape whose identity is not computed here is
never excused.
"""

from __future__ import annotations

from typing import Any

from ._violet import PageListed, PostLeft, SimCommit

__all__ = ["RISK_B_LATE", "risk_b"]

#: Seconds after the last send's ``settle_running`` within which an identical refund is
#: still taken for the ask's own (README: "settle_running plus 5 minutes after it").
RISK_B_LATE = 300.0


def risk_b(world: Any, label: str, refund_id: int | None) -> str | None:
    """Why ask ``label`` handed ``refund_id`` is remaining risk (b), or None (it stays a
    violation)."""
    made = [c for c in world.violet.commits if c.refund_id == refund_id]
    if len(made) != 1 or made[0].label is not None:
        return None  # 1. another system's refund (not voided, not an ask's)
    refund: SimCommit = made[0]
    ask = world.asks[label]
    _, bag_id = world.ids[ask.bag]
    if refund.bag_id != bag_id or not _identical(world, ask, refund):
        return None  # 1. on the ask's bag, identical to its request
    ours = [*world.violet.commits, *world.violet.voided]
    if any((_base(c.label) or "").rstrip("^") == label for c in ours):
        return None  # 2. nothing the ask sent applied
    entries: list[PostLeft | PageListed] = [*world.violet.posts, *world.violet.pages]
    if sum(a.bag == ask.bag for a in world.asks.values()) > 1 and any(
        e.label is None and e.bag_id == bag_id for e in entries
    ):
        return None  # a request without its ask's label, on a bag asks share: whose?
    posts = [p.at for p in world.violet.posts if _its(p, label, bag_id)]
    if not posts:
        return None
    settings = world.policy.protocol_settings()
    lower = settings.date_tolerance if world.s.date_header else settings.clock_skew
    first, last = min(posts), max(posts)
    if not first - lower <= refund.at <= last + settings.settle_running + RISK_B_LATE:
        return None  # 3. near its sends
    for page in world.violet.pages:
        if _its(page, label, bag_id) and refund.refund_id in page.ids and page.at < last:
            return None  # 4. a read of the ask listed it before its last send
    handed = {s.label for s in world.seen if s.what == "refund" and s.refund_id == refund_id}
    if handed != {label}:
        return None  # 5. handed to another ask too
    return (
        f"{label} was handed refund {refund_id}, made by another actor at "
        f"t={refund.at - 1000.0:.3f}, identical to its request, within "
        f"[{first - lower - 1000.0:.3f}, "
        f"{last + settings.settle_running + RISK_B_LATE - 1000.0:.3f}] of its "
        f"{len(posts)} send(s); none of its sends applied, no read of it listed the "
        "refund before its last send"
    )


def _identical(world: Any, ask: Any, refund: SimCommit) -> bool:
    """Identical by the SDK's matching rule: the amount (a whole-bag ask or a cancel:
    the bag's whole remaining amount), the reason (any, when the ask gave none; else
    equal after the server's trim), no lines and no shipping (the simulator's asks carry
    no shipping; an ask with lines is never excused: no other system here makes a line
    refund, and line amounts are not recorded)."""
    if ask.skus or refund.lines or refund.shipping:
        return False
    if ask.kind == "cancel" or ask.amount is None:
        if not refund.emptied:
            return False
    elif refund.amount != ask.amount:
        return False
    if ask.reason is None:
        return True
    reason = ask.reason.strip() if world.s.trim_reasons else ask.reason
    return bool(refund.reason == reason)


def _its(entry: PostLeft | PageListed, label: str, bag_id: int) -> bool:
    """``entry`` was a request of ask ``label`` (any of its processes; one made without
    an ask set around it, a batch item, is its bag's ask's)."""
    if entry.bag_id != bag_id:
        return False
    return _base(entry.label if entry.label is not None else entry.bag_label) == label


def _base(label: str | None) -> str | None:
    return label.split("~")[0] if label is not None else None
