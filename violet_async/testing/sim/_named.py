"""Named risks: violations README names as remaining risk, counted instead of flagged.

Remaining risks (b) and (d) (docs/remaining-risk.md) are classified here. (b): an ask handed a
refund another system made, identical to its request, on its bag, near its send, while
nothing it sent applied and nothing it read could have shown that refund before its
last send, nor made in a 429 wait its process sent again after without reading the
bag. Such an ``[attribution]`` violation is counted (``named:risk_b``) and listed
in the seed's report as "risk (b)"; every other one stays a violation. Every condition
is computed from what the simulator recorded (``SimViolet.commits``, ``posts``,
``pages``), never from trace text; a shape whose identity is not computed here is
never excused. (d): a ``[double]`` whose refunds were each made by one of two processes
(clients) that share no record store, both sent after the ask's record was handed out
pending, each right after a whole read of the bag of its own, neither having read the
other's refund before its own send (``named:risk_d``). (g): a ``[failed-but-applied]``
or ``[double]`` whose refund was made by a send of a process whose wall clock was
hours ahead of the clock that dates refunds from before the process was made (it
saw no step), behind ``Date`` headers every one as far ahead, with no read of the bag
by that process before the send: every reading of Violet's clock dates the refund
more than the 14 h a wrong offset can explain before the send (``named:risk_g``).
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timezone
from typing import Any

from .._state import _DATE_FORMATS
from ._violet import PageListed, PostLeft, SimCommit

__all__ = ["RISK_B_LATE", "RISK_G_SPAN", "risk_b", "risk_d", "risk_g"]

#: README's (g): how far before the send every reading must date the refund (on top of
#: ``clock_skew``): "more than 14 h", the widest a wrongly labelled offset can shift a
#: date (UTC-12 to UTC+14). The classifier's own, not the SDK's
#: ``_matching.WRONG_OFFSET_SPAN``: that constant lowered (a bug) would lower this bar
#: with it, and refunds the SDK skipped as made an hour before the send were excused.
RISK_G_SPAN = 14 * 3600.0

#: Seconds after the last send's ``settle_running`` within which an identical refund is
#: still taken for the ask's own (README: "settle_running plus 5 minutes after it").
RISK_B_LATE = 300.0


def risk_b(world: Any, label: str, refund_id: int | None) -> tuple[bool, str]:
    """Whether ask ``label`` handed ``refund_id`` is remaining risk (b), and why (or
    which condition it fails: it then stays a violation)."""
    made = [c for c in world.violet.commits if c.refund_id == refund_id]
    if len(made) != 1 or made[0].label is not None:
        return False, "1: not another system's refund"
    refund: SimCommit = made[0]
    ask = world.asks[label]
    _, bag_id = world.ids[ask.bag]
    if refund.bag_id != bag_id:
        return False, "1: on another bag"
    if not _identical(world, ask, refund):
        return False, "1: not identical to the ask's request"
    ours = [*world.violet.commits, *world.violet.voided]
    if any((_base(c.label) or "").rstrip("^") == label for c in ours):
        return False, "2: a send of the ask applied"
    entries: list[PostLeft | PageListed] = [*world.violet.posts, *world.violet.pages]
    if sum(a.bag == ask.bag for a in world.asks.values()) > 1 and any(
        e.label is None and e.bag_id == bag_id for e in entries
    ):
        return False, "3/4: a request without its ask's label on a bag asks share"
    sent = [p for p in world.violet.posts if _its(p, label, bag_id)]
    # README's "our send": the first that could have applied, as its caller knew it (a
    # POST whose connection never opened, or whose 4xx reached the caller, did not).
    could = [p.at for p in sent if not p.refused and not 400 <= (p.answered or 0) < 500]
    if not could:
        return False, "3: no send of the ask could have applied"
    settings = world.policy.protocol_settings()
    lower = settings.date_tolerance if world.s.date_header else settings.clock_skew
    since = min(could) - lower
    until = max(could) + settings.settle_running + RISK_B_LATE
    if not since <= refund.at <= until:
        return False, f"3: made at t={refund.at - 1000.0:.3f}, outside its sends' span"
    last = max(p.at for p in sent)
    for page in world.violet.pages:
        if _its(page, label, bag_id) and refund.refund_id in page.ids and page.at < last:
            return False, f"4: a page read for the ask listed it at t={page.at - 1000.0:.3f}"
    handed = {s.label for s in world.seen if s.what == "refund" and s.refund_id == refund_id}
    if handed != {label}:
        return False, f"5: handed to {sorted(handed - {label})} too"
    waited = _in_unread_wait(world, sent, bag_id, refund.at)
    if waited is not None:
        return False, (
            f"6: made in {waited}'s 429 wait, and {waited} sent again with no read between"
        )
    return True, (
        f"{label} was handed refund {refund_id}, made by another actor at "
        f"t={refund.at - 1000.0:.3f}, identical to its request, within "
        f"[{since - 1000.0:.3f}, {until - 1000.0:.3f}] of its {len(could)} send(s) that "
        "could have applied; "
        "none of its sends applied, no read of it listed the refund before its last send"
    )


def risk_d(world: Any, label: str, ids: list[int]) -> tuple[bool, str]:
    """Whether ask ``label``'s refunds ``ids`` (a ``[double]``) are remaining risk (d):
    one pending record resumed in two processes that share no record store, each
    proving the ask absent by a whole read of the bag of its own right before it sent,
    neither able to see the other's re-send (not listed yet when its own send left).
    Every condition is computed from the simulator's records (which client sent each
    POST, which POST made each refund, which client read each page); any other double
    stays a violation."""
    made = [c for c in world.violet.commits if c.refund_id in ids]
    if len(made) != len(ids) or any(_base(c.label) != label for c in made):
        return False, "1: not every refund made by a send of the ask"
    by: dict[str, list[SimCommit]] = {}
    for commit in made:
        by.setdefault(commit.client or "", []).append(commit)
    if len(by) < 2 or any(len(c) > 1 for c in by.values()):
        return False, "1: not one refund from each of two processes"
    # The process is the client that sent the POST, never a label's suffix: a label
    # with none is also another process's (key_clock's app2, a resume round's client).
    stores: dict[str, Any] = world.process_stores
    if any(p not in stores for p in by):
        return False, f"2: made by a process whose store is not known ({sorted(by)})"
    if sum(stores[p] is not None for p in by) > 1:
        return False, "2: the processes share a record store"
    handed = [
        s.at for s in world.seen if s.label == label and s.what == "pending" and s.who == label
    ]
    if not handed:
        return False, "3: the ask's record was never handed out pending"
    out = min(handed)  # the loop's time is the simulator's clock (Violet's too)
    if any(c.sent_at is None or c.sent_at < out for c in made):
        # A POST that left before (the call that left the record) and landed late is
        # the record's own send, which every resume must wait out.
        return False, "3: a refund made by a send that left before the record was handed out"
    for who, (commit,) in by.items():
        others = {c.refund_id for c in made if c is not commit}
        assert commit.sent_at is not None
        pages = _read_by(world, who, commit.bag_id, label)
        for page in pages:
            if page.at < commit.at and others & set(page.ids):
                return False, (
                    f"4: {who} read the other's refund at t={page.at - 1000.0:.3f} "
                    "before its own send"
                )
        read = _last_read(pages, commit.sent_at)
        if read is None or read[0].at < out:
            return False, f"5: {who} sent with no read of the bag since the record was handed out"
        if not _whole(read):
            return False, f"5: {who}'s last read before its send was not whole"
        listed = min(c.visible_at for c in made if c is not commit)
        if listed <= commit.sent_at:
            # A read right before the send would have shown it: a send that left on an
            # older proof (a wait after the read) is not blind.
            return False, (
                f"6: the other's refund was listed at t={listed - 1000.0:.3f}, before "
                f"{who}'s send left"
            )
    return True, (
        f"{label}'s pending record was resumed in {len(by)} processes with no shared "
        f"store ({', '.join(sorted(by))}); each sent right after a whole read of the bag "
        f"of its own, neither's reads listed the other's refund before its own send: "
        f"refunds {sorted(ids)}"
    )


def risk_g(world: Any, text: str) -> tuple[bool, str]:
    """Whether violation ``text`` (a ``[failed-but-applied]`` or a ``[double]``) is
    remaining risk (g) (docs/remaining-risk.md): the ask's refund was made by a send of
    a process that read no page of the bag for the ask before it, whose first whole read
    after the send listed the refund, and every reading of Violet's clock that process
    had (its wall clock, which saw no step since the process was made, and every
    ``Date`` header it was answered with) places the refund's date more than
    ``RISK_G_SPAN`` plus ``clock_skew`` before the send. For a ``[double]``, the
    second refund is that process's own re-send, or a resume's in another process
    whose every reading of Violet's clock was as far off (:func:`_resumer_clock`),
    after a whole read of its own that listed the first. Every condition is
    computed from the simulator's records; any other shape stays a violation."""
    found = re.search(r"refund\(s\) \[([\d, ]+)\]|refunds for one ask: \[([\d, ]+)\]$", text)
    if found is None:
        return False, "0: no refund ids in the violation"
    ids = [int(i) for i in (found.group(1) or found.group(2)).split(", ")]
    if world.s.date_style != "iso" or world.s.naive_dates:
        return False, "1: refund dates not precise"
    made = sorted((c for c in world.violet.commits if c.refund_id in ids), key=lambda c: c.at)
    if len(made) != len(ids) or len({_base(c.label) for c in made}) != 1:
        return False, "1: not every refund made by a send of one ask"
    double = text.startswith("[double] ")
    if double and len(made) != 2:  # one refund and its re-send
        return False, "1: not two refunds"
    if not double and not text.startswith("[failed-but-applied] "):
        return False, "0: not a failed-but-applied or a double"
    first = made[0]
    who, label = first.client, _base(first.label)
    if who is None or first.sent_at is None or label is None:
        return False, "1: the refund's send is not known"
    again = made[1].client if double else who
    if double and (again is None or made[1].sent_at is None):
        return False, "1: the second refund's send is not known"
    if not double and text.split()[1] != first.label:
        # The caller told it failed is the one whose send made the refund (its label,
        # ``A1~2``, is the commits'): another process's call (``A1``) told it failed
        # judged with its own clocks, which are not the ones checked below.
        return False, "1: told it failed in another call than the one whose send made it"
    checked = made[:1] if double else made
    for commit in checked:
        if commit.client != who or commit.sent_at is None:
            return False, "1: refunds sent by more than one process"
        why = _unseen_clock(world, commit, who, label)
        if why:
            return False, why
    if double and again != who:
        # A resume of the ask's record in another process (``A1~j``, made after the
        # first process's send): its own clock is checked too (condition 7).
        assert again is not None
        why = _resumer_clock(world, first, again)
        if why:
            return False, why
    if double:
        reads = _read_by(world, again, first.bag_id, label)
        assert made[1].sent_at is not None
        read = _last_read(reads, made[1].sent_at)
        if read is None or first.refund_id not in {i for p in read for i in p.ids}:
            return False, "5: the re-send did not follow a read that listed the first refund"
    resumed = f" (sent again by {again}, a resume of its record)" if again != who else ""
    return True, (
        f"{label}'s refund(s) {ids} were made by {who}'s send(s){resumed}: a process made "
        "after its wall clock stepped hours ahead, behind Date headers as far ahead, with "
        "no read of the bag before the send: every reading dated its own refund more than "
        "14 h before it"
    )


def _resumer_clock(world: Any, commit: SimCommit, who: str) -> str:
    """Why ``who``, a process that resumed the record of ``commit``'s ask and sent it
    again, is not risk (g)'s shape (empty: it is): its clocks were recorded and every
    reading of Violet's clock it had places the refund's date more than
    ``RISK_G_SPAN`` plus ``clock_skew`` before the first send: its wall clock as it was
    when the process was made and as it was at every answer (a step it saw gives it
    the clock as it was: both are readings), and every ``Date`` header it was answered
    with. The clock of the process that sent it first is :func:`_unseen_clock`'s."""
    assert commit.sent_at is not None
    violet = world.violet
    born = violet.born.get(who)
    answers = violet.answered.get(who)
    if born is None or answers is None:
        return "7: the resuming process's clock was not recorded"
    date = _refund_date(world, commit)
    assert date is not None  # the first process's check read it
    gone = RISK_G_SPAN + world.policy.clock_skew
    walls = {born[0] - born[1], *(wall - mono for wall, mono, _ in answers)}
    # Each reading as Violet's clock minus the (shared) monotonic clock: the first
    # send on Violet's clock, by that reading, is ``sent_at`` plus it.
    if any(not date < commit.sent_at + reading - gone for reading in walls):
        return "7: the resuming process's clock does not date the refund hours before the send"
    dates = [when - mono for _, mono, when in answers if when is not None]
    if not dates:
        return "7: no Date header reached the resuming process"
    if any(not date < commit.sent_at + reading - gone for reading in dates):
        return "7: a Date header placed the refund near the send for the resuming process"
    return ""


def _unseen_clock(world: Any, commit: SimCommit, who: str, label: str) -> str:
    """Why ``commit`` (made by ``who``'s send for ``label``) is not risk (g)'s shape
    (empty: it is)."""
    assert commit.sent_at is not None
    violet = world.violet
    born = violet.born.get(who)
    answers = violet.answered.get(who)
    if born is None or answers is None:
        return "2: the process's clock was not recorded"
    pages = _read_by(world, who, commit.bag_id, label)
    if any(p.at < commit.sent_at for p in pages):
        return "3: the process read the bag for the ask before its send"
    after = sorted((p for p in pages if p.at > commit.sent_at), key=lambda p: p.at)
    starts = [i for i, p in enumerate(after) if p.number == 0]
    if not starts:
        return "4: no read of the bag after the send"
    first_read = after[starts[0] : starts[1] if len(starts) > 1 else None]
    if not _whole(first_read) or commit.refund_id not in {i for p in first_read for i in p.ids}:
        return "4: the first read after the send did not list the refund whole"
    wall0, mono0 = born
    if any(abs((wall - mono) - (wall0 - mono0)) > 1.0 for wall, mono, _ in answers):
        return "5: the process's wall clock stepped after it was made"
    date = _refund_date(world, commit)
    if date is None:
        return "6: the refund's date is not known"
    sent = wall0 + (commit.sent_at - mono0)  # the process's wall clock at the send
    gone = RISK_G_SPAN + world.policy.clock_skew
    if not date < sent - gone:
        return "6: the process's clock does not date the refund hours before the send"
    dates = [when - wall for wall, _, when in answers if when is not None]
    if not dates:
        return "6: no Date header reached the process"
    if any(not date < sent + offset - gone for offset in dates):
        return "6: a Date header placed the refund near the send"
    return ""


def _refund_date(world: Any, commit: SimCommit) -> float | None:
    """``commit``'s ``date_created`` as Violet recorded it (Unix seconds), read in one
    of the fake's own UTC shapes (``_state._DATE_FORMATS``), never by the SDK's parser;
    None when it is in none of them (a date without an offset: server local time)."""
    for order in world.violet.store.orders.values():
        bag = order.bags.get(commit.bag_id)
        if bag is None:
            continue
        for record in bag.refunds:
            value = record.get("date_created")
            if record.get("id") != commit.refund_id or not isinstance(value, str):
                continue
            for shape in _DATE_FORMATS:
                try:
                    moment = datetime.strptime(value, shape)
                except ValueError:
                    continue
                return moment.replace(tzinfo=timezone.utc).timestamp()
    return None


def risk_d_failed(world: Any, text: str) -> tuple[bool, str]:
    """Whether ``text`` (a ``[failed-but-applied]`` of ask L in the first process) is
    remaining risk (d) told as a failure: L's pending record was resumed in two
    processes that share no record store; the first's re-send never left (its
    connection refused) or was answered 429, every earlier send of it that may have
    applied was followed by a whole read of its own before the next left (condition
    6), and it told its caller "failed" (true then: nothing of L had applied); the
    second, knowing nothing of that, sent after a whole read of its own and applied.
    Every condition is computed from the simulator's records; any other shape stays a
    violation."""
    found = re.match(
        r"\[failed-but-applied\] (\S+) was told it failed .* but refund\(s\) \[([\d, ]+)\] "
        r"were made for it$",
        text,
    )
    if found is None:
        return False, "0: not a failed-but-applied of the shape the base world writes"
    label, ids = found.group(1), [int(i) for i in found.group(2).split(", ")]
    told = [s.at for s in world.seen if s.label == label and s.who == label and s.what == "failed"]
    if not told:
        return False, "1: no failure told to the ask's own caller"
    told_at = max(told)
    made = [c for c in world.violet.commits if c.refund_id in ids]
    if len(made) != len(ids) or any(_base(c.label) != label for c in made):
        return False, "1: not every refund made by a send of the ask"
    senders = {c.client for c in made}
    first = {p.client for p in world.violet.posts if p.label == label and p.at <= told_at}
    if len(senders) != 1 or len(first) != 1 or senders == first or None in senders:
        return False, "2: not one process that told the failure and another that applied"
    (second,) = senders
    (mine,) = first
    sent = sorted(
        (p for p in world.violet.posts if p.label == label and p.at <= told_at),
        key=lambda p: p.at,
    )
    last = sent[-1]
    if not _never_applied(last):
        return False, "2: the first process's last send was not definitely not applied"
    stores: dict[str, Any] = world.process_stores
    if mine not in stores or second not in stores:
        return False, "2: a process whose store is not known"
    if stores[mine] is not None and stores[second] is not None:
        return False, "2: the processes share a record store"
    handed = [
        s.at for s in world.seen if s.label == label and s.what == "pending" and s.who == label
    ]
    if not handed or min(handed) > told_at:
        return False, "3: the ask's record was never handed out pending before the failure"
    out = min(handed)
    if any(c.sent_at is None or c.sent_at < out for c in made):
        return False, "3: a refund made by a send that left before the record was handed out"
    if any(c.at <= told_at for c in made):
        return False, "4: a refund was made before the failure was told"
    reads = _read_by(world, mine, last.bag_id, label)
    for before, after in itertools.pairwise(sent):
        if _never_applied(before):
            continue
        read = _last_read(reads, after.at)
        if read is None or read[0].at <= before.at or not _whole(read):
            return False, (
                "6: the first process sent again after a send that may have applied, "
                "with no whole read of its own in between"
            )
    for commit in made:
        assert commit.sent_at is not None
        pages = _read_by(world, second, commit.bag_id, label)
        read = _last_read(pages, commit.sent_at)
        if read is None or read[0].at < out or not _whole(read):
            return False, "5: the second process sent with no whole read of its own"
    return True, (
        f"{label}'s pending record was resumed in {mine} and in {second} (no shared "
        f"store); {mine}'s re-send was definitely not applied and its caller told so; "
        f"{second}, knowing nothing of it, sent after a whole read: refund(s) {ids}"
    )


def _never_applied(post: PostLeft) -> bool:
    """``post`` proved nothing of its ask applied and that nothing of it can still
    apply, as the SDK itself takes such an answer before it tells a caller "failed":
    its connection never opened, or Violet answered 429 (refused before anything was
    done). Another 4xx to a send of an ask whose earlier send may have applied is never
    a failure told (``refused_after_doubt``: the bag is read, then review)."""
    return post.refused or post.answered == 429


def _read_by(world: Any, client: str, bag_id: int, label: str) -> list[PageListed]:
    """The pages of ``bag_id``'s refund list that ``client`` (a process) read for ask
    ``label`` (any of its processes' labels), in the order Violet made them."""
    return [
        p
        for p in world.violet.pages
        if p.client == client and p.bag_id == bag_id and _base(_who(p)) == label
    ]


def _last_read(pages: list[PageListed], before: float) -> list[PageListed] | None:
    """The pages of the last list read (from its page 0 on) Violet made before
    ``before``, in the order made; None if there is none."""
    made = sorted((p for p in pages if p.at < before), key=lambda p: p.at)
    starts = [i for i, p in enumerate(made) if p.number == 0]
    return made[starts[-1] :] if starts else None


def _whole(read: list[PageListed]) -> bool:
    """Every page of ``read`` arrived, up to one Violet made as the list's last."""
    numbers = {p.number for p in read}
    ends = [p.number for p in read if p.last]
    return bool(ends) and numbers >= set(range(min(ends) + 1))


def _identical(world: Any, ask: Any, refund: SimCommit) -> bool:
    """Identical by the SDK's matching rule (``_matching._compare``): the amount (a
    whole-bag ask or a cancel: the bag's whole remaining amount), the reason compared
    trimmed (any, when the ask gave none; and a record without a reason matches any
    ask's: Violet and its platforms may leave it out), no lines and no shipping (the
    simulator's asks carry no shipping; an ask with lines is never excused: no other
    system here makes a line refund, and line amounts are not recorded)."""
    if ask.skus or refund.lines or refund.shipping:
        return False
    if ask.kind == "cancel" or ask.amount is None:
        if not refund.emptied:
            return False
    elif refund.amount != ask.amount:
        return False
    asked = (ask.reason or "").strip()
    if not asked or refund.reason is None:
        return True
    return refund.reason.strip() == asked


def _in_unread_wait(world: Any, sent: list[PostLeft], bag_id: int, at: float) -> str | None:
    """The process (``A1``, ``A1~w2``) of the ask whose POSTs are ``sent`` that got a
    429 (nothing applied: it waits, or its caller repeats after ``Retry-After``) before
    ``at`` and whose next send left after ``at`` with no page of a list read of its own
    arriving in between; None if there is none. README's (b): a refund made while a
    call waited out a 429 is never ours; the call (and a repeat of it in the same
    client: the bag's mark) reads the bag right before the re-send, and what that read
    lists is never ours. Only a refund that read could not show (a list lagging) is
    (b); with no read at all, a refund made in the wait was taken by a defect."""
    for post in sent:
        if post.answered != 429 or not post.at <= at:
            continue
        who = _who(post)
        after = [p.at for p in sent if _who(p) == who and p.at > post.at]
        if not after or min(after) <= at:
            continue
        resend = min(after)
        read = any(
            page.bag_id == bag_id and _who(page) == who and post.at < page.at < resend
            for page in world.violet.pages
        )
        if not read:
            return who
    return None


def _who(entry: PostLeft | PageListed) -> str | None:
    """The process (and ask) that made ``entry``: ``A1``, ``A1~w2``."""
    return entry.label if entry.label is not None else entry.bag_label


def _its(entry: PostLeft | PageListed, label: str, bag_id: int) -> bool:
    """``entry`` was a request of ask ``label`` (any of its processes; one made without
    an ask set around it, a batch item, is its bag's ask's)."""
    if entry.bag_id != bag_id:
        return False
    return _base(entry.label if entry.label is not None else entry.bag_label) == label


def _base(label: str | None) -> str | None:
    return label.split("~")[0] if label is not None else None
