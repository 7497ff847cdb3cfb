"""Calling from an arq job: the idempotency key is the job's own identity (arq gives a
retried job the same ``job_id``), so a job delivered twice, or cancelled by
``job_timeout`` with its POST in flight and retried, refunds once.

``WorkerSettings`` is what ``arq examples.arq_refund_job.WorkerSettings`` runs (with
``VIOLET_*`` and ``VIOLET_STORE=redis://...`` set). Run as a script, it plays arq
itself: it calls the job twice with the same job id on an embedded FakeViolet.

    pip install -e '.[fleet]'           # in a checkout of this repository
    python examples/arq_refund_job.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from arq import Retry
from arq.worker import func

from violet_async import AmbiguousOutcomeError, BagPendingError, RetryPolicy, VioletClient
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeViolet

#: arq cancels a job after this long, wherever it is.
JOB_TIMEOUT = 300
#: The call's own deadline ends first: it returns (or parks the refund as pending)
#: by itself, instead of being cut off at a random await by job_timeout. Cut off or
#: not, the record of the send is in the store and the retry resumes it.
CALL_DEADLINE = 240.0


async def startup(ctx: dict[str, Any]) -> None:
    # VIOLET_STORE=redis://... puts keys where every worker sees them.
    client = VioletClient.from_env(retry=RetryPolicy(deadline=CALL_DEADLINE))
    ctx["violet"] = await client.__aenter__()


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["violet"].aclose()


async def refund_job(ctx: dict[str, Any], order_id: int, bag_id: int, amount: int) -> int | None:
    client: VioletClient = ctx["violet"]
    try:
        refund = await client.refund_bag(
            order_id,
            bag_id,
            amount_refunded=amount,
            # The job's identity, not its try: every delivery of this job is one refund.
            idempotency_key=f"arq-job:{ctx['job_id']}",
        )
    except (AmbiguousOutcomeError, BagPendingError) as exc:
        # Sent, not confirmed yet: run the job again later; the key resumes it.
        raise Retry(defer=60) from exc
    return refund.id


class WorkerSettings:
    functions: ClassVar = [func(refund_job, timeout=JOB_TIMEOUT, max_tries=50)]
    on_startup = startup
    on_shutdown = shutdown


@contextlib.asynccontextmanager
async def violet(store: SQLiteStore) -> AsyncIterator[VioletClient]:
    """A client from VIOLET_* variables, or on an embedded FakeViolet when none are set."""
    if os.environ.get("VIOLET_APP_ID"):
        async with VioletClient.from_env(store=store) as client:
            yield client
    else:
        async with FakeViolet(orders=10, seed=1) as fake, fake.client(store=store) as client:
            yield client


async def main() -> None:
    """arq's part, played here: the same job delivered twice (a retry after a crash or
    a job_timeout)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteStore(Path(tmp) / "keys.db") as store, violet(store) as client:
            ctx: dict[str, Any] = {"violet": client, "job_id": "refund-bag-200001"}
            first = await refund_job({**ctx, "job_try": 1}, 100001, 200001, 500)
            second = await refund_job({**ctx, "job_try": 2}, 100001, 200001, 500)
    print(f"job delivered twice: refund {first}, then refund {second}")


if __name__ == "__main__":
    asyncio.run(main())
