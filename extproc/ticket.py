"""An exchange's ticket: what settling and reporting it takes, carried by Envoy.

With ``settings.accounting: envoy`` the service does not read an answer it only accounts
for; Envoy's access log reports it once the exchange is over (:mod:`extproc.accounting`).
Whoever receives that record must be able to settle the budget reservation and write the
audit record without the state of the process that decided the request: with
``--workers`` or several replicas, Envoy's log stream reaches any of them, and a record
Envoy re-sends after a restart reaches a process that never saw the request. So the
deciding process writes that state into the request's dynamic metadata, which Envoy
copies into the record: the HTTP authorizer as an answer header Envoy keeps
(``dynamic_metadata_from_headers``), ext_proc in its own namespace.

A ticket is signed (HMAC-SHA256). The access-log port is the gRPC port, so a forged
record could otherwise give budget back or write audit records; the processes of one
service share the key (``EXTPROC_TICKET_KEY``, or a random one each start for the
workers of one supervisor).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.budgets.keys import Unit
from extproc.budgets.meter import Cost, Settlement
from extproc.budgets.pricing import Price
from extproc.exchange import Exchange
from extproc.telemetry.record import exchange_record

VERSION = "t1"
"""First part of every ticket; a process reads only the versions it knows."""
KEY_VARIABLE = "EXTPROC_TICKET_KEY"
"""The secret replicas share so that each settles the others' tickets."""


class InvalidTicket(ValueError):
    """Not a ticket this service signed (forged, corrupted, or another key's)."""


@dataclass(frozen=True, slots=True)
class Ticket:
    record: dict[str, Any]
    """The exchange's audit record as it stood when the request went upstream."""
    dialect: str
    stream: bool
    input_tokens: int
    """Prompt tokens counted before the call, for an estimate if usage never comes."""
    price: Price | None
    """The model's prices when the request was admitted (a reload may change them)."""
    settlement: Settlement | None
    """The budget reservation to settle; ``None`` when nothing was reserved."""
    traceparent: str | None
    started_ns: int


def signing_key(configured: str | None) -> bytes:
    """The key tickets are signed with: from the configured secret, else a fresh one (then
    only this process and the workers it forks can read its tickets)."""
    if configured:
        return hashlib.sha256(configured.encode("utf-8")).digest()
    return secrets.token_bytes(32)


class TicketSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def issue(self, exchange: Exchange) -> str:
        """The ticket of ``exchange``, whose request goes upstream now."""
        request, model, reservation = exchange.request, exchange.model, exchange.reservation
        price = model.price if model is not None else None
        settlement = reservation.settlement if reservation is not None else None
        payload = {
            "record": exchange_record(exchange),
            "dialect": exchange.dialect.name if exchange.dialect is not None else "",
            "stream": bool(request is not None and request.stream),
            "input_tokens": exchange.input_tokens,
            "price": None if price is None else (price.input, price.cached_input, price.output),
            "settlement": None if settlement is None else _settlement_fields(settlement),
            "traceparent": exchange.traceparent,
            "started_ns": exchange.started_ns,
        }
        body = base64.urlsafe_b64encode(orjson.dumps(payload))
        return f"{VERSION}.{body.decode('ascii')}.{self._mac(body)}"

    def read(self, text: str) -> Ticket:
        """The ticket ``text`` carries, or :class:`InvalidTicket`."""
        version, _, rest = text.partition(".")
        body, _, mac = rest.partition(".")
        if version != VERSION:
            raise InvalidTicket(f"unknown ticket version {version[:8]!r}")
        if not hmac.compare_digest(mac, self._mac(body.encode("ascii", "replace"))):
            raise InvalidTicket(f"signature does not match (replicas need one {KEY_VARIABLE})")
        try:
            fields = orjson.loads(base64.urlsafe_b64decode(body))
            return _ticket(fields)
        except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise InvalidTicket(f"unreadable ticket: {e}") from None

    def _mac(self, body: bytes) -> str:
        digest = hmac.new(self._key, body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii")


def _settlement_fields(settlement: Settlement) -> dict[str, Any]:
    reserved = settlement.reserved
    return {
        "token": settlement.token,
        "reserved": (reserved.input_tokens, reserved.output_tokens, reserved.micro_usd),
        "counters": [(key, unit.value, ends) for key, unit, ends in settlement.counters],
    }


def _ticket(fields: dict[str, Any]) -> Ticket:
    price, settlement = fields["price"], fields["settlement"]
    return Ticket(
        record=dict(fields["record"]),
        dialect=str(fields["dialect"]),
        stream=bool(fields["stream"]),
        input_tokens=int(fields["input_tokens"]),
        price=None if price is None else Price(*price),
        settlement=None
        if settlement is None
        else Settlement(
            str(settlement["token"]),
            Cost(*settlement["reserved"]),
            tuple((str(k), Unit(u), int(e)) for k, u, e in settlement["counters"]),
        ),
        traceparent=fields["traceparent"],
        started_ns=int(fields["started_ns"]),
    )
