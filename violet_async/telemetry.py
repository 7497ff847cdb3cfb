"""Observability: the SDK's logger tree, OpenTelemetry tracing and metrics, and raw
responses for debugging.

::

    # logs without code: VIOLET_LOG=debug (or info) in the environment
    import logging
    logging.getLogger("violet_async.http").setLevel(logging.DEBUG)  # one line per attempt

    from violet_async import telemetry
    telemetry.instrument()  # spans and metrics through the global OpenTelemetry providers

    with telemetry.capture_responses() as seen:
        await client.refund_bag(order_id, bag_id, amount_refunded=500)
    print(seen[-1].status, dict(seen[-1].headers), seen[-1].body)

The logger tree and what each logger says: the Observability page (docs/observability.md).
"""

from ._telemetry import (
    REQUEST_ID_HEADERS,
    capture_responses,
    instrument,
    setup_logging_from_env,
    uninstrument,
)

__all__ = [
    "REQUEST_ID_HEADERS",
    "capture_responses",
    "instrument",
    "setup_logging_from_env",
    "uninstrument",
]
