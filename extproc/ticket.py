"""An exchange's ticket: what settling and reporting it takes, carried by Envoy.

An answer the service reads only to account for it is settled by whichever process reads
it (:mod:`extproc.accounting`): under ``settings.accounting: envoy`` the one Envoy's access
log reaches once the exchange is over; under ``service`` the one Envoy's report of the
answer reaches before its end, or the access log for an answer not reported.
That process must be able to settle the budget reservation and write the audit record
without the state of the process that decided the request: with ``--workers`` or several
replicas, Envoy's streams reach any of them, and a record Envoy re-sends after a restart
reaches a process that never saw the request. So the deciding process writes that state
into the request's dynamic metadata, which Envoy copies into the record and into the
report: the HTTP authorizer as an answer header Envoy keeps
(``dynamic_metadata_from_headers``), ext_proc in its own namespace.

A ticket is signed (HMAC-SHA256) and honoured for 2 hours (:data:`LIFETIME_SECONDS`).
The access-log port is the gRPC port, so a forged record could otherwise give budget back
or write audit records. A
ticket is seen only by Envoy and the service; were one replayed, its budget would still
settle once (the store remembers a reservation's token for as long as a ticket lives) and
a metered exchange would not be reported again, but one nothing meters would: keep the
gRPC port reachable from Envoy only.
The processes of one service share the key: ``EXTPROC_TICKET_KEY`` if set, else one kept
in the budget store's Redis (:func:`shared_key`), else a random one per start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.budgets.alerts import Watch
from extproc.budgets.keys import Unit
from extproc.budgets.meter import Cost, Settlement
from extproc.budgets.pricing import Price
from extproc.budgets.redis_store import BACKEND_ERRORS, RedisTarget
from extproc.budgets.store import TOKEN_TTL_SECONDS
from extproc.exchange import Exchange
from extproc.telemetry.record import exchange_record

log = logging.getLogger(__name__)

VERSION = "t1"
"""First part of every ticket; a process reads only the versions it knows."""
KEY_VARIABLE = "EXTPROC_TICKET_KEY"
"""The secret replicas share so that each settles the others' tickets."""
KEY_NAME = "ticket-key"
"""Where :func:`shared_key` keeps the key, after the budget keys' prefix."""
LIFETIME_SECONDS = TOKEN_TTL_SECONDS - 3600
"""How long a ticket is honoured (two hours): an hour less than the store remembers a
settlement (a margin for clocks that disagree), so a replay can never settle a
reservation twice. An answer still streaming after that settles nothing: it stays charged
as reserved (budgets err toward over-charging) and has no audit record."""
KEY_BYTES = 32
_TAG_CHARS = 22
"""Of a MAC's base64url, what :meth:`TicketSigner.tag` keeps: 132 bits."""
REFRESH_SECONDS = 10.0
"""How often at most an unknown signature has a process fetch the shared key again."""
FOLLOW_SECONDS = 30.0
"""How often a process fetches the shared key again anyway."""
MAX_KEYS = 3
"""Keys a process still reads tickets with (the newest signs)."""
KEPT_TICKETS = 512
"""Tickets a process keeps, as it issued them, until it reads them back: an answer's report
(or access-log record) usually reaches the process that decided its request, which then
skips decoding and checking what it signed itself (~35 us of a report's CPU). Beyond the
most recent ones (~4.5 KB each, ~2.3 MB in all), and in any other process, a ticket is
read from its text."""


class InvalidTicket(ValueError):
    """Not a ticket this service signed (forged, corrupted, or another key's)."""


class UnknownSignature(InvalidTicket):
    """Signed with none of the keys this process knows (forged, or another key's)."""


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
    """When the exchange began (epoch ns): its span's start, and the ticket's age."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A ticket as signed: the text Envoy carries, and what it says."""

    text: str
    ticket: Ticket


def signing_key(configured: str | None) -> bytes:
    """The key tickets are signed with: from the configured secret, else a fresh one (then
    only this process and the workers it forks can read its tickets)."""
    if configured:
        return hashlib.sha256(configured.encode("utf-8")).digest()
    return secrets.token_bytes(KEY_BYTES)


def shared_key(redis: RedisTarget, name: str = KEY_NAME) -> bytes | None:
    """A random key kept in the budget store's Redis, made by the first process to ask.

    Replicas that share budgets then share the key, also across restarts (a record Envoy
    re-sends to a restarted service still settles), with nothing to configure. Whoever
    can read it could forge tickets, but could as well rewrite the budgets beside it.
    It is kept under ``name`` beside the budget counters (same prefix, same slot). ``None``
    if Redis does not answer now: the caller signs with a key of its own meanwhile (at
    start), or keeps the keys it has (:meth:`TicketSigner.refresh`).
    """
    key = redis.key(name)
    try:
        value = _kept_key(redis, key)
    except BACKEND_ERRORS as error:
        log.warning("the ticket key could not be read from Redis (%s)", error)
        return None
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        log.warning("%s in Redis is not a %d-byte key: not used", key, KEY_BYTES)
        return None
    return value


def _kept_key(redis: RedisTarget, key: str) -> object:
    """The value at ``key``, a random key put there first if there was none. The client is
    made here too: the Cluster client connects as it is made, and raises then when no node
    answers."""
    from redis import Redis, RedisCluster
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kind = RedisCluster if redis.cluster else Redis
    client = kind.from_url(
        redis.url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.set(key, secrets.token_bytes(KEY_BYTES), nx=True)
        return client.get(key)
    finally:
        client.close()


class TicketSigner:
    """Signs with one key and reads with any it knows.

    With a key kept in Redis (``refresh``), the server fetches it again every
    :data:`FOLLOW_SECONDS`, and a ticket signed with a key this process does not know has
    it fetch at once: a process that started while Redis was down, or after Redis lost
    its data, comes to sign with the key the others use, and reads the older ones still.
    """

    def __init__(self, key: bytes, refresh: Callable[[], bytes | None] | None = None) -> None:
        self._macs = {key: _keyed(key)}
        """Each key with its HMAC state (its pads already hashed: a copy per ticket costs
        half of keying a new one, about 4 of 8 us), newest first: the first signs."""
        self._refresh = refresh
        self._refreshed_at = -math.inf
        self._kept: OrderedDict[str, Ticket] = OrderedDict()
        """Tickets issued here and not read yet, by their text (:data:`KEPT_TICKETS`)."""
        self._fetching: asyncio.Future[bool] | None = None
        """The fetch under way, or the last one."""

    async def refresh(self) -> bool:
        """Fetch the shared key again (at most every :data:`REFRESH_SECONDS`); from then on
        sign with it and still read the older ones. Whether a key not known before came.

        Callers while a fetch is under way wait for it and share its answer: the records
        of one access-log batch, signed with a key this process has yet to fetch, each
        meet the unknown signature together, and each must be read with the key it brings
        (answered ``False`` at once, all but the first were dropped unsettled)."""
        fetching = self._fetching
        if fetching is None or fetching.done():
            now = time.monotonic()
            if self._refresh is None or now - self._refreshed_at < REFRESH_SECONDS:
                return False
            self._refreshed_at = now
            fetching = self._fetching = asyncio.ensure_future(self._fetch(self._refresh))
        # One caller cancelled (its stream ended) does not cancel the others' fetch.
        return await asyncio.shield(fetching)

    async def _fetch(self, fetch: Callable[[], bytes | None]) -> bool:
        """Fetch the shared key (off the loop: a blocking Redis call) and sign with it if
        it is new; whether it was. A fetch that fails is ``False`` (logged), never an error
        held by the shared future: when every caller waiting on it had been cancelled,
        nobody would read it, and asyncio would log it as never retrieved."""
        try:
            key = await asyncio.to_thread(fetch)
        except Exception:
            log.exception("fetching the ticket key from Redis failed")
            return False
        if key is None or key in self._macs:
            return False
        log.warning("the ticket key in Redis changed (Redis lost its data?): signing with it")
        known = [(key, _keyed(key)), *self._macs.items()]
        self._macs = dict(known[:MAX_KEYS])
        return True

    def issue(self, exchange: Exchange) -> Issued:
        """The ticket of ``exchange``, whose request goes upstream now; :meth:`keep` it
        once Envoy has it."""
        request, model, reservation = exchange.request, exchange.model, exchange.reservation
        price = model.price if model is not None else None
        settlement = reservation.settlement if reservation is not None else None
        ticket = Ticket(
            record=exchange_record(exchange),
            dialect=exchange.dialect.name if exchange.dialect is not None else "",
            stream=bool(request is not None and request.stream),
            input_tokens=exchange.input_tokens,
            price=price,
            settlement=settlement,
            traceparent=exchange.traceparent,
            started_ns=exchange.started_ns,
        )
        payload = {
            "record": ticket.record,
            "dialect": ticket.dialect,
            "stream": ticket.stream,
            "input_tokens": ticket.input_tokens,
            "price": None if price is None else (price.input, price.cached_input, price.output),
            # Apart from "price", which processes of an earlier version read as 3 numbers.
            "cache_write": None if price is None else price.cache_write,
            "cache_write_1h": None if price is None else price.cache_write_1h,
            "settlement": None if settlement is None else _settlement_fields(settlement),
            "traceparent": ticket.traceparent,
            "started_ns": ticket.started_ns,
        }
        signed = f"{VERSION}.{base64.urlsafe_b64encode(orjson.dumps(payload)).decode('ascii')}"
        signing = next(iter(self._macs.values()))
        return Issued(f"{signed}.{_mac(signing, signed.encode('ascii')).decode('ascii')}", ticket)

    def tag(self, purpose: bytes, data: bytes) -> str:
        """A MAC of ``data`` for ``purpose`` (which keeps it apart from tickets and other
        purposes) with the signing key: 22 base64url characters, 132 bits."""
        signing = next(iter(self._macs.values()))
        return _mac(signing, purpose + b"\0" + data)[:_TAG_CHARS].decode("ascii")

    def tagged(self, purpose: bytes, data: bytes, tag: str) -> bool:
        """Whether ``tag`` is :meth:`tag`'s for ``data`` under any key this process knows
        (a key replaced since still reads what it tagged), compared in constant time."""
        given, signed = tag.encode("ascii", "replace"), purpose + b"\0" + data
        macs = self._macs.values()
        return any(hmac.compare_digest(given, _mac(k, signed)[:_TAG_CHARS]) for k in macs)

    def keep(self, issued: Issued) -> None:
        """Keep a ticket Envoy has taken (:data:`KEPT_TICKETS`): its answer's report or
        record will likely come back here."""
        kept = self._kept
        kept[issued.text] = issued.ticket
        if len(kept) > KEPT_TICKETS:
            kept.popitem(last=False)

    def read(self, text: str, now_ns: int | None = None) -> Ticket:
        """The ticket ``text`` carries, or :class:`InvalidTicket`.

        One this process issued is handed back as it was kept, once (a second report of
        the same exchange reads the text afresh). Only its exact text finds it: the
        lookup hashes the text with the interpreter's secret seed, so a guess learns
        nothing from how long it took."""
        kept = self._kept.pop(text, None)
        if kept is not None:
            return _unexpired(kept, now_ns)
        raw = text.encode("utf-8", "replace")
        signed, _, mac = raw.rpartition(b".")
        version, _, body = signed.partition(b".")
        if version != VERSION.encode():
            raise InvalidTicket(f"unknown ticket version {version[:8]!r}")
        macs = self._macs.values()
        if not any(hmac.compare_digest(mac, _mac(keyed, signed)) for keyed in macs):
            raise UnknownSignature(f"signature does not match (replicas need one {KEY_VARIABLE})")
        try:
            ticket = _ticket(orjson.loads(base64.urlsafe_b64decode(body)))
        except (
            binascii.Error,
            orjson.JSONDecodeError,
            IndexError,
            KeyError,
            TypeError,
            ValueError,
        ) as e:
            raise InvalidTicket(f"unreadable ticket: {e}") from None
        return _unexpired(ticket, now_ns)


def _unexpired(ticket: Ticket, now_ns: int | None) -> Ticket:
    """``ticket``, or :class:`InvalidTicket` past :data:`LIFETIME_SECONDS`."""
    age = ((time.time_ns() if now_ns is None else now_ns) - ticket.started_ns) / 1e9
    if age > LIFETIME_SECONDS:
        raise InvalidTicket(f"expired ticket ({age / 3600:.0f} hours old)")
    return ticket


def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(keyed: hmac.HMAC, signed: bytes) -> bytes:
    mac = keyed.copy()
    mac.update(signed)
    return base64.urlsafe_b64encode(mac.digest())


def _settlement_fields(settlement: Settlement) -> dict[str, Any]:
    reserved = settlement.reserved
    return {
        "token": settlement.token,
        "reserved": (reserved.input_tokens, reserved.output_tokens, reserved.micro_usd),
        "counters": [(key, unit.value, ends) for key, unit, ends in settlement.counters],
        # Apart from "counters", which processes of an earlier version read as triples.
        "watches": [(w.counter, w.limit, w.thresholds, w.per_model) for w in settlement.watches],
    }


def _ticket(fields: dict[str, Any]) -> Ticket:
    prices, settlement = fields["price"], fields["settlement"]
    price = None
    if prices is not None:
        paid_input, cached_input, output = prices
        price = Price(
            paid_input,
            cached_input,
            output,
            fields.get("cache_write"),
            fields.get("cache_write_1h"),
        )
    return Ticket(
        record=dict(fields["record"]),
        dialect=str(fields["dialect"]),
        stream=bool(fields["stream"]),
        input_tokens=int(fields["input_tokens"]),
        price=price,
        settlement=None
        if settlement is None
        else Settlement(
            str(settlement["token"]),
            Cost(*settlement["reserved"]),
            tuple((str(k), Unit(u), int(e)) for k, u, e in settlement["counters"]),
            tuple(
                Watch(int(index), int(limit), tuple(int(t) for t in thresholds), bool(per_model))
                for index, limit, thresholds, per_model in settlement.get("watches", ())
            ),
        ),
        traceparent=fields["traceparent"],
        started_ns=int(fields["started_ns"]),
    )
