"""Response ids: a per-app counter, so ids are unique, cheap and predictable in tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from aiohttp import web

ID_COUNTER: web.AppKey[Iterator[int]] = web.AppKey("mock_id_counter")


def new_counter() -> Iterator[int]:
    """A fresh counter for a new app (state lives on the app, never in this module)."""
    return itertools.count(1)


def next_id(request: web.Request, prefix: str) -> str:
    """The next id for this app, e.g. ``chatcmpl-mock-7``."""
    counter = request.app[ID_COUNTER]
    return f"{prefix}-mock-{next(counter)}"
