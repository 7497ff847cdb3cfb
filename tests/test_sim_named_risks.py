"""The simulator's named-risk classifier (violet_async.testing.sim._named): an
``[attribution]`` violation that is README's remaining risk (b) by every condition is
counted (``named:risk_b``) and listed in the seed's report; any other stays a violation.

Replay a seed with ``python benchmarks/simulate.py --kinds all --seed N``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import attrs
import pytest

from violet_async import _matching, _protocol, _reconcile
from violet_async.testing.sim import WORLD_KINDS, _named, generate, simulate
from violet_async.testing.sim._violet import SimCommit


@pytest.fixture
def verdicts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None, bool, str]]:
    """Every verdict ``_named.risk_b`` gives during the test."""
    seen: list[tuple[str, int | None, bool, str]] = []
    real = _named.risk_b

    def spy(world: Any, label: str, refund_id: int | None) -> tuple[bool, str]:
        excused, why = real(world, label, refund_id)
        seen.append((label, refund_id, excused, why))
        return excused, why

    monkeypatch.setattr(_named, "risk_b", spy)
    return seen


def test_an_identical_refund_another_system_made_near_the_send_is_counted_as_risk_b() -> None:
    """Seed 1369951 (``--kinds all``, direct): A4 (250, no reason) sent once; Violet
    answered 429 (not applied) but the connection dropped before the answer reached
    the caller. Another system refunded 250 on its bag 1.8 s after that send, listed
    after every read A4 made before it; a repeat parked it for review and a resume took
    it. Counted as risk (b), not flagged, and named in the report."""
    result = simulate(1369951, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_b"] == 1
    assert len(result.excused) == 1
    assert result.excused[0].startswith("risk (b): A4 was handed refund 400006"), result.excused
    assert "named risk (b): A4" in result.report()


def test_a_refund_a_read_listed_before_the_re_send_stays_an_attribution_violation(
    monkeypatch: pytest.MonkeyPatch, verdicts: list[tuple[str, int | None, bool, str]]
) -> None:
    """Re-introduce the bug seed 1235637 found (fixed in fdc16df): the read before a
    re-send after a 429 fails on a later page, and what its pages that answered listed
    is ignored (the ask is sent at once, as it was before that fix and seed 5062095's,
    which reads again after a failed read that listed nothing). Another
    system's identical refund, on a page that answered before the re-send, is then
    taken for the ask's own: everything else in risk (b) holds, and condition 4 (a read
    of the ask listed it before its last send) keeps it a violation."""
    from violet_async import _protocol

    real = _protocol.step

    def ignores_answered_pages(
        ask: Any, obs: Any, settings: Any, now: float, *args: Any, **kwargs: Any
    ) -> Any:
        failed = obs.kind is _protocol.ObsKind.READ_FAILED
        if failed and ask.phase is _protocol.Phase.ABSENT and not ask.needs_review:
            return _protocol._send(ask, now, proven=True)
        return real(ask, obs, settings, now, *args, **kwargs)

    monkeypatch.setattr(_protocol, "step", ignores_answered_pages)
    result = simulate(1235637, kinds=frozenset(WORLD_KINDS))
    assert "attribution" in result.kinds, result.report()
    assert not result.excused
    assert [(v[0], v[1], v[2]) for v in verdicts] == [("A1", 400007, False)]
    assert verdicts[0][3].startswith("4: a page read for the ask listed it"), verdicts


def test_a_refund_without_a_reason_is_identical_as_the_sdks_matching_says() -> None:
    """Seed 1415847 (``--kinds all``, direct): A1 asked 500 with a reason; the refund it
    was handed (another system's, 500, 8.6 s after A1's send that had no answer) carries
    no reason. The SDK's matching takes a record without a reason for any ask's (Violet
    and its platforms may leave it out), so README's risk (b) names it: counted."""
    result = simulate(1415847, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_b"] == 1


def test_a_refund_with_another_reason_is_not_identical() -> None:
    """Condition 1 on its own: another reason (after the trim) is another refund; an
    ask without a reason takes any; a record without one matches any ask's."""
    world = SimpleNamespace(s=SimpleNamespace(trim_reasons=False))
    ask = SimpleNamespace(kind="refund", amount=500, reason="Damaged in transit  ", skus=None)

    def commit(reason: str | None, amount: int = 500) -> SimCommit:
        return SimCommit(9, None, 1, amount, 0.0, 0.0, reason=reason)

    assert not _named._identical(world, ask, commit("Customer requested refund."))
    assert _named._identical(world, ask, commit("Damaged in transit"))
    assert _named._identical(world, ask, commit(None))
    assert not _named._identical(world, ask, commit(None, amount=250))
    reasonless = SimpleNamespace(kind="refund", amount=500, reason=None, skus=None)
    assert _named._identical(world, reasonless, commit("Customer requested refund."))


def test_a_refund_made_in_a_429_wait_with_no_read_before_the_re_send_stays_a_violation(
    monkeypatch: pytest.MonkeyPatch, verdicts: list[tuple[str, int | None, bool, str]]
) -> None:
    """Re-introduce the bug review 27 fixed: a send after a 429 (and a keyed repeat of a
    record left in that wait) goes at once, with no read of the bag before it. Seed
    1401264 (``--kinds all``): A3's POST answered 429; another system refunded A3's
    100 on its bag 10 s later, in the wait; the caller cut the call and its keyed
    repeat sent again 2 s after that refund, unread (answered 500); a resume took the
    refund. It is made within ``date_tolerance`` of the re-send, so conditions 1-5
    hold, yet on the fixed code the read before the re-send lists it (no violation):
    condition 6 (made in a 429 wait with no read before the re-send) keeps it one."""
    from violet_async import _protocol

    real_after = _protocol._after_send_failure
    real_start = _protocol.start

    def no_read(ask: Any, error: Any, obs: Any, settings: Any, *args: Any) -> Any:
        if _protocol.classify_send_failure(error) is _protocol.Cause.RATE_LIMITED:
            return _protocol._send(ask, args[0], obs.backoff, proven=True)
        return real_after(ask, error, obs, settings, *args)

    def send_at_once(ask: Any, settings: Any, now: float, *, attempt_timeout: float) -> Any:
        ask, action = real_start(ask, settings, now, attempt_timeout=attempt_timeout)
        if ask.phase is _protocol.Phase.ABSENT:
            return _protocol._send(ask, now, proven=True)  # no read first
        return ask, action

    monkeypatch.setattr(_protocol, "_after_send_failure", no_read)
    monkeypatch.setattr(_protocol, "start", send_at_once)
    result = simulate(1401264, kinds=frozenset(WORLD_KINDS))
    assert "attribution" in result.kinds, result.report()
    assert not result.excused
    assert [(v[0], v[1], v[2]) for v in verdicts] == [("A3", 400005, False)]
    assert verdicts[0][3].startswith("6: made in A3's 429 wait"), verdicts


def test_a_repeat_sent_unread_after_a_cut_429_wait_stays_a_violation(
    monkeypatch: pytest.MonkeyPatch, verdicts: list[tuple[str, int | None, bool, str]]
) -> None:
    """Re-introduce the bug e97a880 fixed (seed 1216220): a call cut in its 429 wait
    leaves its bag unmarked, so the caller's repeat sends with no read first. Another
    system's identical refund made in the wait is taken by the repeat; conditions 1-5
    hold (it is within ``date_tolerance`` of the repeat's send), and condition 6 keeps
    it a violation."""
    from violet_async import _reconcile

    monkeypatch.setattr(
        _reconcile.PendingAsks, "cut_while_absent", lambda self, bag_id, request: None
    )
    result = simulate(1216220, kinds=frozenset(WORLD_KINDS))
    assert "attribution" in result.kinds, result.report()
    assert not result.excused
    assert [(v[0], v[2]) for v in verdicts] == [("A3", False)]
    assert verdicts[0][3].startswith("6: made in A3's 429 wait"), verdicts


@pytest.mark.parametrize("seed", [1401264, 1437149, 1426376])
def test_a_429_wait_read_before_the_re_send_or_in_another_process_stays_risk_b(
    seed: int,
) -> None:
    """Condition 6's bounds on the code as it is: 1401264 (the read before the keyed
    repeat's re-send lists the wait's refund: nothing taken); 1437149 (the read came
    1.4 s before the lagging list showed the refund: risk (b), counted); 1426376 (a
    second process of the ask, which never saw the first's 429, sent with no read:
    risk (b) across processes, counted)."""
    result = simulate(seed, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_b"] == (seed != 1401264)


def test_a_record_resumed_in_two_processes_sharing_no_store_is_risk_d() -> None:
    """Seed 1493911 (``--kinds all``, direct): A2's call was parked pending in the app;
    early_resume's job (another process, no record store) resumed it, and while that
    resume read the bag the app resumed the same record too (an identical repeat joined
    it). Both proved the ask absent after its window and sent, 0 s apart: 2 refunds,
    README's remaining risk (d). Counted, not flagged, and named in the report."""
    result = simulate(1493911, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_d"] == 1
    assert result.excused == [
        "risk (d): A2's pending record was resumed in 2 processes with no shared store "
        "(app, job); each sent right after a whole read of the bag of its own, neither's "
        "reads listed the other's refund before its own send: refunds [400006, 400007]"
    ]
    assert "named risk (d): A2" in result.report()


@pytest.fixture
def verdicts_d(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], bool, str]]:
    """Every verdict ``_named.risk_d`` gives during the test."""
    seen: list[tuple[str, list[int], bool, str]] = []
    real = _named.risk_d

    def spy(world: Any, label: str, ids: list[int]) -> tuple[bool, str]:
        excused, why = real(world, label, ids)
        seen.append((label, ids, excused, why))
        return excused, why

    monkeypatch.setattr(_named, "risk_d", spy)
    return seen


def test_a_joined_resume_sent_with_no_read_stays_a_double(
    monkeypatch: pytest.MonkeyPatch, verdicts_d: list[tuple[str, list[int], bool, str]]
) -> None:
    """Re-introduce a bug: the app's resume of a record it parked itself (an identical
    call's repeat joins it) sends at once, with no read of the bag. Seed 1493911: the
    job's resume proved A2 absent and sent (listed 5 s later); 11 s after, the app's
    join sent unread, and any read would have listed the job's refund. The app and the
    job share no store and no read of the app's listed the job's refund (it read none):
    conditions 1-4 held and the double was excused. Condition 5 (each process sent
    right after a whole read of its own, made since the record was handed out) keeps
    it a violation."""
    from violet_async import _protocol, _reconcile

    joined: set[str] = set()
    real_check = _reconcile.PendingAsks.check
    real_recall = _reconcile.KnownRefunds.recall

    def check(self: Any, bag_id: int, resume: Any) -> Any:
        if resume is not None and any(r.ask_id == resume.ask_id for r in self.records_on(bag_id)):
            joined.add(resume.ask_id)  # this client's own parked record
        return real_check(self, bag_id, resume)

    def recall(self: Any, resume: Any) -> Any:
        resume = real_recall(self, resume)
        sent = resume.phase in (_protocol.Phase.SENT, _protocol.Phase.PENDING)
        if resume.ask_id in joined and sent and not resume.needs_review:
            joined.discard(resume.ask_id)
            # Taken for a new ask whose baseline was read: sent at once.
            baseline = resume.baseline or frozenset()
            return attrs.evolve(resume, phase=_protocol.Phase.NEW, baseline=baseline)
        return resume

    monkeypatch.setattr(_reconcile.PendingAsks, "check", check)
    monkeypatch.setattr(_reconcile.KnownRefunds, "recall", recall)
    result = simulate(1493911, kinds=frozenset(WORLD_KINDS))
    assert result.kinds == {"double"}, result.report()
    assert not result.excused
    assert [(v[0], v[2], v[3]) for v in verdicts_d] == [
        ("A2", False, "5: app sent with no read of the bag since the record was handed out")
    ]


def test_a_resume_sent_at_once_in_a_round_client_stays_a_double(
    monkeypatch: pytest.MonkeyPatch, verdicts_d: list[tuple[str, list[int], bool, str]]
) -> None:
    """Re-introduce a bug: a resume ignores its settle window and sends at once, no
    read. Seed 1494112: key_clock's second process (app2) left its probe P pending; the
    job resumed it and sent at once, and so did a resume round's client (resume0) an
    hour later, the job's refund long listed. P's label has no suffix, so the process
    was taken for the app (whose store is None): excused. The process is the client
    that sent the POST (condition 2: resume0's store is not known)."""
    from violet_async import _protocol

    real_start = _protocol.start

    def send_at_once(ask: Any, settings: Any, now: float, *, attempt_timeout: float) -> Any:
        resumed = ask.phase in (_protocol.Phase.SENT, _protocol.Phase.PENDING)
        ask, action = real_start(ask, settings, now, attempt_timeout=attempt_timeout)
        if resumed and action.do is _protocol.Do.READ:
            return _protocol._send(ask, now)  # no read, no window
        return ask, action

    monkeypatch.setattr(_protocol, "start", send_at_once)
    result = simulate(1494112, kinds=frozenset(WORLD_KINDS))
    assert "double" in result.kinds, result.report()
    assert not result.excused
    assert [(v[0], v[2], v[3]) for v in verdicts_d] == [
        ("P", False, "2: made by a process whose store is not known (['job', 'resume0'])")
    ]


def _two_process_world(
    *,
    stores: dict[str, Any],
    handed_at: float = 10.0,
    listed: tuple[int, ...] = (),
    app_sent: float = 90.0,
    pages: tuple[Any, ...] | None = None,
) -> SimpleNamespace:
    """A2: pending at t=10 (loop time); the job's send made 6 at t=90 (listed at 95),
    the app's (left at ``app_sent``) made 7 at t=90 or then; the job read a page
    listing ``listed`` at t=80, and each read the bag (one whole page) at t=85."""
    from violet_async.testing.sim._violet import PageListed

    commits = [
        SimCommit(6, "A2~j", 2, 500, 90.0, 95.0, client="job", sent_at=90.0),
        SimCommit(7, "A2", 2, 500, max(app_sent, 90.0), 91.0, client="app", sent_at=app_sent),
    ]
    if pages is None:
        pages = (
            PageListed("A2~j", None, 2, 80.0, listed, "job"),
            PageListed("A2~j", None, 2, 85.0, (), "job"),
            PageListed("A2", None, 2, 85.0, (), "app"),
        )
    return SimpleNamespace(
        violet=SimpleNamespace(commits=commits, pages=list(pages)),
        process_stores=stores,
        seen=[SimpleNamespace(label="A2", what="pending", who="A2", at=handed_at)],
    )


def test_risk_d_holds_only_for_two_blind_processes_sharing_no_store() -> None:
    """Each condition of ``_named.risk_d`` on its own: two processes (clients) with no
    store in common, both sending after the record was handed out, each right after a
    whole read of its own, neither reading the other's refund before its own send."""
    from violet_async.testing.sim._violet import PageListed

    none = {"app": None, "job": None}
    ok, why = _named.risk_d(_two_process_world(stores=none), "A2", [6, 7])
    assert ok, why
    shared = _two_process_world(stores={"app": object(), "job": object()})
    assert _named.risk_d(shared, "A2", [6, 7]) == (
        False,
        "2: the processes share a record store",
    )
    unknown = _two_process_world(stores={"app": None})
    assert _named.risk_d(unknown, "A2", [6, 7])[1].startswith("2: made by a process")
    early = _two_process_world(stores=none, handed_at=95.0)
    assert _named.risk_d(early, "A2", [6, 7])[1].startswith("3: a refund made by a send that")
    landed_late = _two_process_world(stores=none, app_sent=5.0)  # the call's own send
    assert _named.risk_d(landed_late, "A2", [6, 7])[1].startswith("3: a refund made by a send")
    seen = _two_process_world(stores=none, listed=(7,))
    assert _named.risk_d(seen, "A2", [6, 7])[1].startswith("4: job read the other's refund")
    assert _named.risk_d(seen, "A3", [6, 7])[1].startswith("1: not every refund")
    unread = _two_process_world(
        stores=none,
        pages=(PageListed("A2~j", None, 2, 85.0, (), "job"), PageListed("A2", None, 2, 5.0, ())),
    )
    assert _named.risk_d(unread, "A2", [6, 7])[1] == (
        "5: app sent with no read of the bag since the record was handed out"
    )
    part = _two_process_world(
        stores=none,
        pages=(
            PageListed("A2~j", None, 2, 85.0, (), "job"),
            PageListed("A2", None, 2, 84.0, (), "app", 0, last=False),  # page 1 never came
        ),
    )
    assert _named.risk_d(part, "A2", [6, 7])[1] == (
        "5: app's last read before its send was not whole"
    )
    stale = _two_process_world(stores=none, app_sent=96.0)  # job's refund listed at 95
    assert _named.risk_d(stale, "A2", [6, 7])[1] == (
        "6: the other's refund was listed at t=-905.000, before app's send left"
    )
    other_client = _two_process_world(stores=none)
    other_client.violet.commits[1] = attrs.evolve(other_client.violet.commits[1], client="resume0")
    assert _named.risk_d(other_client, "A2", [6, 7])[1].startswith(
        "2: made by a process whose store is not known"
    )


def test_the_hook_reads_every_double_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_named`` hands ``risk_d`` the label and every id of each ``[double]``
    (two or more refunds, any label), removes only the one excused, and leaves the
    other kinds of the same shape (``[overlap-after-pending]``, ``[torn-journal]``)
    alone."""
    from violet_async.testing.sim import _run

    asked: list[tuple[str, list[int]]] = []

    def risk_d(world: Any, label: str, ids: list[int]) -> tuple[bool, str]:
        asked.append((label, ids))
        return label == "A2^", "why"

    monkeypatch.setattr(_named, "risk_d", risk_d)
    asked_g: list[str] = []

    def risk_g(world: Any, text: str) -> tuple[bool, str]:
        asked_g.append(text)
        return False, "why not"

    monkeypatch.setattr(_named, "risk_g", risk_g)
    counted: list[str] = []
    violations = [
        "[double] A2^: 2 refunds for one ask: [400006, 400007]",
        "[double] A10: 3 refunds for one ask: [400001, 400012, 400103]",
        "[overlap-after-pending] A3: 2 refunds for one ask: [400008, 400009]",
        "[torn-journal] A4: 2 refunds for one ask: [400010, 400011]",
    ]
    world = SimpleNamespace(
        attributions=[],
        violations=list(violations),
        excused=[],
        violet=SimpleNamespace(count=counted.append),
    )
    _run._World.check_named(world)  # type: ignore[arg-type]
    assert asked == [("A2^", [400006, 400007]), ("A10", [400001, 400012, 400103])]
    assert asked_g == [violations[1]]  # risk (g) is asked of what risk (d) left
    assert world.violations == violations[1:]
    assert counted == ["named:risk_d"]
    assert world.excused == ["risk (d): why"]


def test_a_process_made_hours_ahead_behind_date_headers_as_far_ahead_is_risk_g(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seed 7148594 (``--kinds all``, direct): the machine's wall clock stepped 15 h
    ahead; a second process on the same store, made after the step (it saw none), called
    A1's key again behind ``Date`` headers 15 h ahead too. Its POST applied and was
    answered 503; with no read of the bag before the send, every reading dated the
    refund 15 h before the send, "made long before" it, and the call was told it failed:
    README's remaining risk (g). Counted, not flagged; and each of risk (g)'s conditions,
    taken away from the same world, makes it a violation again."""
    worlds: list[tuple[Any, str]] = []
    real = _named.risk_g

    def spy(world: Any, text: str) -> tuple[bool, str]:
        worlds.append((world, text))
        return real(world, text)

    monkeypatch.setattr(_named, "risk_g", spy)
    result = simulate(7148594, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_g"] == 1
    assert result.excused[0].startswith("risk (g): A1's refund(s) [400009] were made by app2")
    assert "named risk (g): A1" in result.report()

    ((world, text),) = [(w, t) for w, t in worlds if "400009" in t]
    assert text.startswith("[failed-but-applied] A1~2")
    assert real(world, text)[0]
    violet = world.violet
    answers = list(violet.answered["app2"])
    born = violet.born["app2"]

    # A Date header on Violet's own clock: one reading placed the refund near the send.
    wall, mono, _ = answers[0]
    violet.answered["app2"] = [*answers, (wall, mono, wall - 54_000.0)]
    assert real(world, text) == (False, "6: a Date header placed the refund near the send")
    # The process's wall clock stepped after it was made (it could see that).
    violet.answered["app2"] = [*answers, (wall + 30.0, mono, None)]
    assert real(world, text) == (False, "5: the process's wall clock stepped after it was made")
    violet.answered["app2"] = answers
    # Its clock on Violet's: the refund is dated at the send by it.
    violet.born["app2"] = (born[0] - 54_480.0, born[1])
    violet.answered["app2"] = [(w - 54_480.0, m, d) for w, m, d in answers]
    assert real(world, text) == (
        False,
        "6: the process's clock does not date the refund hours before the send",
    )
    violet.born["app2"], violet.answered["app2"] = born, answers
    # A read of the bag before the send (a baseline).
    pages = list(violet.pages)
    made = next(c for c in violet.commits if c.refund_id == 400009)
    mine = next(p for p in pages if p.client == "app2" and p.bag_id == made.bag_id)
    violet.pages = [*pages, attrs.evolve(mine, at=made.sent_at - 0.5)]
    assert real(world, text) == (
        False,
        "3: the process read the bag for the ask before its send",
    )
    violet.pages = pages
    # Day-precision dates.
    world.s = attrs.evolve(world.s, date_style="day")
    assert real(world, text) == (False, "1: refund dates not precise")
    world.s = attrs.evolve(world.s, date_style="iso")
    # The first process's call (A1, which saw the step) told it failed, not app2's.
    other = text.replace("[failed-but-applied] A1~2 was", "[failed-but-applied] A1 was")
    assert other != text
    assert real(world, other) == (
        False,
        "1: told it failed in another call than the one whose send made it",
    )
    assert real(world, text)[0]


def _scaled(schedule: Any, scale: float) -> Any:
    """``schedule`` with its clock steps and ``Date`` offsets of hours scaled."""
    return attrs.evolve(
        schedule,
        clock_steps=tuple(
            (at, step * scale if abs(step) > 3_600.0 else step) for at, step in schedule.clock_steps
        ),
        date_bias=schedule.date_bias * scale,
        date_jumps=tuple(j * scale if abs(j) > 3_600.0 else j for j in schedule.date_jumps),
    )


def test_risk_g_holds_readmes_14_h_whatever_the_sdks_constant_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Risk (g)'s bar is README's "more than 14 h" (``_named.RISK_G_SPAN``), never the
    SDK's ``WRONG_OFFSET_SPAN``. Seed 7148594's world with its 15 h step and ``Date``
    offsets at 3 h: the SDK as it is claims app2's refund (no violation). With the SDK's
    constant lowered to 1 h (a bug put back: a refund dated over an hour before the send
    by every reading skipped as made long before), app2's keyed call is told it failed
    while its refund applied; the classifier, reading that constant, lowered its own bar
    with it and excused the false outcome as risk (g). It stays a violation."""
    schedule = _scaled(generate(7148594, kinds=frozenset(WORLD_KINDS)), 0.2)
    clean = simulate(schedule)
    assert not clean.kinds, clean.report()
    assert not clean.excused

    for module in (_matching, _protocol):
        monkeypatch.setattr(module, "WRONG_OFFSET_SPAN", 3_600.0)
    # As the classifier read it before (imported from the SDK); none of its own now.
    monkeypatch.setattr(_named, "WRONG_OFFSET_SPAN", 3_600.0, raising=False)
    result = simulate(schedule)
    assert "failed-but-applied" in result.kinds, result.report()
    assert result.injected["named:risk_g"] == 0


def test_a_refund_date_without_an_offset_is_never_risk_g(monkeypatch: pytest.MonkeyPatch) -> None:
    """A date without an offset (server local time) places no refund hours before a
    send. Seed 7148594's world with naive dates (Violet 5 h west of UTC): the SDK as it
    is leaves app2's refund undated (no violation). With naive dates read as UTC (a bug
    this project had, put back), the refund looks 20 h older than the send, is skipped
    and the keyed call told it failed; the classifier, reading the date as the SDK's
    parser gives it (naive: this machine's zone), excused that as risk (g). It stays a
    violation: condition 1 (precise dates) and the date read only in Violet's UTC
    shapes (``_state._DATE_FORMATS``)."""
    schedule = attrs.evolve(generate(7148594, kinds=frozenset(WORLD_KINDS)), naive_dates=True)
    clean = simulate(schedule)
    assert not clean.kinds, clean.report()
    assert not clean.excused

    def as_utc(when: datetime | None) -> float | None:
        if when is None:
            return None
        return (when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)).timestamp()

    for module in (_matching, _protocol, _reconcile):
        monkeypatch.setattr(module, "unix_time", as_utc)
    worlds: list[tuple[Any, str]] = []
    real = _named.risk_g

    def spy(world: Any, text: str) -> tuple[bool, str]:
        worlds.append((world, text))
        return real(world, text)

    monkeypatch.setattr(_named, "risk_g", spy)
    result = simulate(schedule)
    assert "failed-but-applied" in result.kinds, result.report()
    assert result.injected["named:risk_g"] == 0
    ((world, text),) = [(w, t) for w, t in worlds if "400009" in t]
    assert real(world, text) == (False, "1: refund dates not precise")
    # Precise by the schedule, the record's date without an offset is still not read.
    world.s = attrs.evolve(world.s, naive_dates=False)
    assert real(world, text) == (False, "6: the refund's date is not known")


def test_a_resume_in_another_process_whose_every_reading_is_as_far_off_is_risk_g(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seed 62 of risk (g)'s forced world (the machine's wall clock 15 h ahead of
    Violet's refund-dating clock from the start, ``Date`` headers 15 h ahead too,
    precise dates). A0's POST applied (answered 200 without an id); the first read after
    it listed the refund, dated 15 h before the send by every reading, skipped as made
    long before it; the call's deadline ended it pending. The wall clock stepped 1 h
    more; a resume of the record in another process (``job``, which saw that step: its
    clock as it is, 16 h ahead, and as it was, 15 h) read the bag, every reading of its
    own dating the refund 15 h or more before the send, and sent it again: two refunds.
    README's (g) in a resume (condition 7: the resuming process's own readings). Each of
    its readings taken back to Violet's clock makes it a violation again."""
    from violet_async.testing.sim import _run

    init = _run.SteppedClock.__init__

    def ahead(self: Any, loop: Any) -> None:
        init(self, loop)
        self._step = 54_000.0

    monkeypatch.setattr(_run.SteppedClock, "__init__", ahead)
    worlds: list[tuple[Any, str]] = []
    real = _named.risk_g

    def spy(world: Any, text: str) -> tuple[bool, str]:
        worlds.append((world, text))
        return real(world, text)

    monkeypatch.setattr(_named, "risk_g", spy)
    schedule = attrs.evolve(
        generate(62, kinds=frozenset(WORLD_KINDS)),
        clock_steps=(),
        date_bias=54_000.0,
        date_jumps=(),
        date_lag=0.0,
        date_style="iso",
        naive_dates=False,
        date_header=True,
    )
    result = simulate(schedule)
    assert not result.kinds, result.report()
    assert result.injected["named:risk_g"] == 1
    assert "(sent again by job, a resume of its record)" in result.excused[0]

    ((world, text),) = worlds
    assert text == "[double] A0: 2 refunds for one ask: [400004, 400006]"
    assert real(world, text)[0]
    violet = world.violet
    answers = list(violet.answered["job"])
    born = violet.born["job"]
    # A Date header of the resuming process on Violet's own clock.
    wall, mono, _ = answers[0]
    violet.answered["job"] = [*answers, (wall, mono, wall - 57_600.0)]
    assert real(world, text) == (
        False,
        "7: a Date header placed the refund near the send for the resuming process",
    )
    # Its wall clock, at one answer, on Violet's clock.
    violet.answered["job"] = [*answers, (wall - 57_600.0, mono, None)]
    assert real(world, text) == (
        False,
        "7: the resuming process's clock does not date the refund hours before the send",
    )
    # Its clock as it was when it was made (before the step it saw), on Violet's.
    violet.answered["job"] = answers
    violet.born["job"] = (born[0] - 54_000.0, born[1])
    assert real(world, text) == (
        False,
        "7: the resuming process's clock does not date the refund hours before the send",
    )
    violet.born["job"] = born
    del violet.answered["job"]
    assert real(world, text) == (False, "7: the resuming process's clock was not recorded")
    violet.answered["job"] = answers
    assert real(world, text)[0]


def test_a_record_resumed_in_two_processes_told_failed_in_one_is_risk_d(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seed 9102246 (``--kinds all``, direct): A0's whole-bag refund was handed out
    pending; its caller resumed it in the app, which proved it absent and sent again:
    the connection was refused (nothing sent), and the caller was told "failed", true
    then. early_resume's job (another process, no record store) resumed the same
    pending record, proved it absent by a whole read of its own and sent it: one
    refund. README's remaining risk (d), told as a failure: counted, not flagged; each
    condition taken away from the same world makes it a violation again."""
    worlds: list[tuple[Any, str]] = []
    real = _named.risk_d_failed

    def spy(world: Any, text: str) -> tuple[bool, str]:
        worlds.append((world, text))
        return real(world, text)

    monkeypatch.setattr(_named, "risk_d_failed", spy)
    result = simulate(9102246, kinds=frozenset(WORLD_KINDS))
    assert not result.kinds, result.report()
    assert result.injected["named:risk_d_failed"] == 1
    assert result.excused == [
        "risk (d), told failed: A0's pending record was resumed in app and in job (no "
        "shared store); app's re-send was definitely not applied and its caller told so; "
        "job, knowing nothing of it, sent after a whole read: refund(s) [400005]"
    ]
    ((world, text),) = worlds
    assert real(world, text)[0]
    stores = dict(world.process_stores)
    world.process_stores = {**stores, "job": object(), "app": object()}
    assert real(world, text) == (False, "2: the processes share a record store")
    world.process_stores = stores
    posts = list(world.violet.posts)
    last = max((p for p in posts if p.label == "A0"), key=lambda p: p.at)
    world.violet.posts = [p for p in posts if p is not last] + [
        attrs.evolve(last, refused=False, answered=500)
    ]
    assert real(world, text) == (
        False,
        "2: the first process's last send was not definitely not applied",
    )
    world.violet.posts = posts
    pages = list(world.violet.pages)
    world.violet.pages = [p for p in pages if p.client != "job"]
    assert real(world, text) == (False, "5: the second process sent with no whole read of its own")
    world.violet.pages = pages
    seen = list(world.seen)
    world.seen = [s for s in seen if not (s.what == "pending" and s.label == "A0")]
    assert real(world, text) == (
        False,
        "3: the ask's record was never handed out pending before the failure",
    )


def test_risk_d_told_failed_needs_a_failure_the_sdk_itself_tells(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Audit of ``risk_d_failed`` (SDK bugs put back, docs/simulation.md): the first
    process's failure is (d)'s only when the SDK as it is tells it. A resumed record's
    re-send answered another 4xx than 429 is read and goes to review
    (``refused_after_doubt``), never "failed"; and a send that may have applied is
    followed by a whole read before the next send leaves (a 5xx taken as a connection
    never opened re-sent at once, the retry refused, told "failed": the job's refund
    was excused). Seed 9102246's world with either is a violation; as it is, counted."""
    worlds: list[tuple[Any, str]] = []
    real = _named.risk_d_failed

    def spy(world: Any, text: str) -> tuple[bool, str]:
        worlds.append((world, text))
        return real(world, text)

    monkeypatch.setattr(_named, "risk_d_failed", spy)
    result = simulate(9102246, kinds=frozenset(WORLD_KINDS))
    assert result.injected["named:risk_d_failed"] == 1
    ((world, text),) = worlds
    assert real(world, text)[0]
    posts = list(world.violet.posts)
    last = max((p for p in posts if p.label == "A0"), key=lambda p: p.at)
    assert last.refused
    others = [p for p in posts if p is not last]
    for status, excused in ((400, False), (404, False), (422, False), (429, True)):
        world.violet.posts = [*others, attrs.evolve(last, refused=False, answered=status)]
        assert real(world, text)[0] is excused, status
    world.violet.posts = posts
    # A send answered 502 between the app's last whole read and its refused re-send:
    # nothing read after it, the re-send left at once.
    read = max(p.at for p in world.violet.pages if p.client == "app" and p.label == "A0")
    assert read < last.at
    gateway = attrs.evolve(last, at=(read + last.at) / 2, refused=False, answered=502)
    world.violet.posts = [*posts, gateway]
    assert real(world, text) == (
        False,
        "6: the first process sent again after a send that may have applied, "
        "with no whole read of its own in between",
    )
    # The same send followed by a whole read of the app's own before the re-send: (d).
    page = max(
        (p for p in world.violet.pages if p.client == "app" and p.label == "A0"),
        key=lambda p: p.at,
    )
    assert page.number == 0
    assert page.last
    pages = list(world.violet.pages)
    world.violet.pages = [*pages, attrs.evolve(page, at=(gateway.at + last.at) / 2)]
    assert real(world, text)[0]
    world.violet.pages = pages
    world.violet.posts = posts
    assert real(world, text)[0]
