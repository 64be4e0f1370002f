"""What the core tells an adapter to do with one phase of an exchange.

Two outcomes, both plain frozen data: :class:`Forward` lets the request continue
(optionally with header and body changes) and :class:`Reply` answers the caller directly
without contacting the upstream. Adapters translate them into Envoy protobufs; the core
never sees a protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Forward:
    """Continue towards the upstream, applying these changes first."""

    set_headers: Headers = ()
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    """A replacement body, or ``None`` to leave the body untouched."""
    clear_route_cache: bool = False
    """Ask Envoy to re-pick the route because a header it routes on changed."""
    skip_request_body: bool = False
    """No stage needs the request body: tell Envoy not to buffer or send it."""
    process_response: bool = False
    """A stage needs the answer (usage for budgets): ask Envoy for the response headers."""
    response_body: Literal["streamed", "buffered"] | None = None
    """At response headers: have Envoy send the answer's body, chunk by chunk (streamed)
    or whole (buffered, when it must be replaced as a whole)."""
    answer_headers: Headers = ()
    """Headers for the caller's answer, set now because the service will not see the
    answer (Envoy adds them from dynamic metadata; see accounting.py)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the caller now; the request never reaches the upstream."""

    status: int
    body: bytes
    headers: Headers = ()
    details: str = ""
    """A short token for Envoy's access log (``%RESPONSE_CODE_DETAILS%``)."""


Decision = Forward | Reply

CONTINUE = Forward()


def removals_not_set(remove: Iterable[str], set_headers: Headers) -> tuple[str, ...]:
    """The headers of ``remove`` that are not also in ``set_headers``: ext_authz's Envoy
    removes after it sets, so one both set and removed would be lost (a provider key set
    on the request, say); a client's copy of one that is set is overwritten instead."""
    setting = {name for name, _ in set_headers}
    return tuple(name for name in remove if name not in setting)
