"""aioresponses 0.7.9 builds ClientResponse without the ``stream_writer`` argument
aiohttp 3.14 requires (aioresponses issue #289; fix proposed in PR #288, unreleased).

aiohttp 3.14 is a security release, so we test against it and patch the mock instead:
aiohttp only reads ``stream_writer.output_size``. A no-op on aiohttp < 3.14. Remove
once aioresponses ships the fix.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any
from unittest.mock import Mock

import aioresponses.core
from aiohttp import ClientResponse

_NEEDS_STREAM_WRITER = "stream_writer" in inspect.signature(ClientResponse.__init__).parameters


class _CompatClientResponse(ClientResponse):
    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        loop = kwargs.get("loop")
        if isinstance(loop, Mock):
            # aioresponses hands each response a Mock loop in debug mode, so aiohttp
            # captured the whole call stack per response (a traceback for an unclosed
            # response's warning, which is raised either way): most of a wire test's time.
            loop.get_debug.return_value = False
        super().__init__(method, url, **kwargs)


def install() -> None:
    if _NEEDS_STREAM_WRITER:
        aioresponses.core.ClientResponse = _CompatClientResponse  # type: ignore[misc]
