"""The shared budget store: Redis or Redis Cluster, through redis-py's asyncio client.

Each call is one Lua script (reserve, adjust) or one MGET/PING: one round trip, atomic on
the server. Reservations (and adjusts) made in the same turn of the event loop share one
script call. Scripts are sent once and then run by SHA (EVALSHA); after a server restart or
SCRIPT FLUSH they are sent again on the NOSCRIPT reply. On a single server reached over
TCP or a Unix socket the two scripts go through :mod:`extproc.budgets.script_link`, one
pipelined connection that costs the event loop far less than redis-py; everything else,
and Redis Cluster and TLS, goes through redis-py.

Key layout (``prefix`` defaults to ``budget``)::

    {<prefix>}:<scope>:<scope id>:<model or *>:<unit>:<window>:<window start>
    {budget}:team:search:gpt-4o:usd:month:1767225600      a counter (integer)
    {budget}:team:search:gpt-4o:usd:month:1767225600:used what settled exchanges used
                                                          (limits with alerts)
    {budget}:alert:<counter key>:<percent>                an alert claimed
    {budget}:idem:<token>                                 an adjust already applied

The logical part after the prefix is :func:`extproc.budgets.keys.counter_key`. Counters
expire (EXPIREAT) at their window's end plus ``EXPIRY_SLACK_SECONDS``; idempotency tokens
after TOKEN_TTL_SECONDS (3 hours).

Hash tag: every key carries the same tag, ``{<prefix>}``, so on Redis Cluster the whole
budget keyspace lives in one slot and every script touches a single slot (no CROSSSLOT).
It has to: one reservation spans the key, user, team *and* global counters, and the global
counter is shared by every request, so any tagging that keeps reservations atomic ends up
putting everything together anyway. The trade-off is that budgets use one shard (and its
replicas) of a cluster, not all of them. A script over a handful of keys costs a few
microseconds, so that shard serves tens of thousands of reservations per second; to spread
independent tenants over shards, give each deployment its own ``prefix``.

Errors: every redis-py error (connection refused, timeout, READONLY, OOM, CLUSTERDOWN...)
and socket error becomes :class:`~extproc.budgets.store.StoreUnavailable`
(:data:`BACKEND_ERRORS`), including the Cluster client's own, which are not ``RedisError``
(no node reachable, a slot without an owner during a fail-over). Sockets time out
after ``timeout`` seconds (0.25 by default) and redis-py's own retries are disabled, so a
dead server fails a call fast and the fail mode decides; the connection pool reconnects
on the next call. Measured on one core against a local Redis 7: a reservation over eight
counters takes ~0.4 ms round trip sequentially (the in-process store: ~20 µs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from extproc.budgets.script_link import Address, ScriptLink
from extproc.budgets.store import (
    EXPIRY_SLACK_SECONDS,
    TOKEN_TTL_SECONDS,
    AdjustResult,
    Counter,
    Delta,
    ReserveResult,
    StoreUnavailable,
    check_counters,
)

DEFAULT_PREFIX: Final = "budget"
DEFAULT_TIMEOUT: Final = 0.25
DEFAULT_MAX_CONNECTIONS: Final = 64
BACKEND_ERRORS: Final = (RedisError, RedisClusterException, OSError)
"""What redis-py raises when Redis does not serve a call: the Cluster client's
``RedisClusterException`` (no node reachable, ``SlotNotCoveredError``) is not a
``RedisError``, and escaping as one it was a 500 instead of the fail mode."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the shared budget store lives: a URL, whether it names a node of a Redis
    Cluster, and the prefix of every key (its hash tag): give each deployment sharing one
    Redis its own."""

    url: str
    cluster: bool = False
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    def key(self, name: str) -> str:
        """A key of this deployment's, in the budget counters' slot."""
        return f"{{{self.prefix}}}:{name}"


def check_prefix(prefix: str) -> None:
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"the Redis key prefix must be non-empty and without braces: {prefix!r}")


# Reservations made together (requests whose bodies arrived in the same turn of the event
# loop) go out as one script call, applied in order, each all-or-nothing. KEYS: each
# reservation's counters in turn. ARGV, for each reservation: its counter count, then
# limit, amount and expire-at (epoch s) per counter. Returns, for each reservation in turn,
# 0 and the values after incrementing all, or i and the values (nothing changed) when its
# counter i (1-based) would go over its limit.
RESERVE_LUA: Final = """
local out = {}
local k, a = 0, 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  a = a + 1
  local values = {}
  for i = 1, n do
    values[i] = tonumber(redis.call('GET', KEYS[k + i]) or '0')
  end
  local failed = 0
  for i = 1, n do
    local j = a + 3 * (i - 1)
    if values[i] + tonumber(ARGV[j + 1]) > tonumber(ARGV[j]) then
      failed = i
      break
    end
  end
  if failed == 0 then
    for i = 1, n do
      local j = a + 3 * (i - 1)
      values[i] = redis.call('INCRBY', KEYS[k + i], ARGV[j + 1])
      redis.call('EXPIREAT', KEYS[k + i], ARGV[j + 2])
    end
  end
  out[#out + 1] = failed
  for i = 1, n do out[#out + 1] = values[i] end
  k = k + n
  a = a + 3 * n
end
return out
"""

# Adjusts applied together: every adjust() made while the event loop runs one batch of
# callbacks (the records of one access-log batch, settlements of streams ending together)
# goes out as one script call. KEYS, for each adjust in turn: its idempotency key (or any
# of its counters, when it has no token), then its counters. ARGV: the token TTL, then for
# each adjust: 1 if it has a token else 0, its counter count, then amount and expire-at
# (epoch s) per counter. Returns, for each adjust in turn, 1 if it applied, then its
# counters' new values; an adjust whose token was already used changes nothing and
# returns 0, then the current values. A counter never goes below 0: a settlement (a minus
# amount, what was reserved and not used) reaching a counter Redis has lost (a restart
# without persistence, a fail-over, an eviction) would otherwise leave it owing, and admit
# that much more than the limit.
ADJUST_LUA: Final = """
local out = {}
local k, a = 1, 2
while a <= #ARGV do
  local tokened, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local applied = tokened ~= '1' or redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1])
  out[#out + 1] = applied and 1 or 0
  for i = 1, n do
    local key = KEYS[k + i]
    if applied then
      local value = redis.call('INCRBY', key, ARGV[a])
      if value < 0 then
        redis.call('SET', key, 0)
        value = 0
      end
      out[#out + 1] = value
      redis.call('EXPIREAT', key, ARGV[a + 1])
    else
      out[#out + 1] = tonumber(redis.call('GET', key) or '0')
    end
    a = a + 2
  end
  k = k + n + 1
end
return out
"""

RedisClient = Redis | RedisCluster
T = TypeVar("T")
R = TypeVar("R")


class _Batcher(Generic[T, R]):
    """Calls made during one turn of the event loop, sent as one; a lone call, at once.

    Under load many requests reach the same stage together, and a Redis call costs the
    client far more CPU than the script costs the server: the calls of one turn share a
    round trip. When they come one at a time (the last batch held one call, and none is
    under way), waiting for the turn gathers nobody and costs the lone request a task and
    three more turns of the loop (half its epoll waits at one connection): its call is then
    sent at once from its own task, and a call made meanwhile starts batching again. Each
    caller awaits its own result; one failure fails every call of a batch.
    """

    __slots__ = ("_alone", "_queued", "_send", "_sending", "_under_way")

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._send = send
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._sending: asyncio.Task[None] | None = None
        self._under_way = 0
        """Calls sent and not answered yet."""
        self._alone = True
        """Whether the last batch held a single call: calls come one at a time."""

    async def __call__(self, item: T) -> R:
        if self._alone and not self._under_way and self._sending is None:
            self._under_way += 1
            try:
                [result] = await self._send([item])
            finally:
                self._under_way -= 1
            return result
        loop = asyncio.get_running_loop()  # once: on CPython 3.11 each call is a getpid
        future: asyncio.Future[R] = loop.create_future()
        self._queued.append((item, future))
        if self._sending is None:
            self._sending = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the other calls of this turn join the batch
        batch, self._queued, self._sending = self._queued, [], None
        self._alone = len(batch) == 1
        self._under_way += len(batch)
        try:
            results = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self._under_way -= len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


class RedisStore:
    """Budget counters in Redis; see the module docstring for keys, scripts and errors."""

    __slots__ = (
        "_adjust",
        "_adjusts",
        "_client",
        "_link",
        "_reserve",
        "_reserves",
        "_slack",
        "_tag",
        "_token_prefix",
    )

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        slack: int = EXPIRY_SLACK_SECONDS,
        link: ScriptLink | None = None,
    ) -> None:
        """``link``, when given, runs the reserve and adjust scripts instead of ``client``."""
        check_prefix(prefix)
        self._client = client
        self._tag = f"{{{prefix}}}:"
        self._token_prefix = f"{self._tag}idem:"
        self._slack = slack
        self._link = link
        self._reserve = client.register_script(RESERVE_LUA)
        self._adjust = client.register_script(ADJUST_LUA)
        self._reserves = _Batcher(self._send_reserves)
        self._adjusts = _Batcher(self._send_adjusts)

    @classmethod
    def at(cls, target: RedisTarget) -> RedisStore:
        """The store ``target`` names (see :meth:`from_url`)."""
        return cls.from_url(target.url, prefix=target.prefix, cluster=target.cluster)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        cluster: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> RedisStore:
        """A store on a ``redis://``, ``rediss://`` or ``unix://`` URL.

        With ``cluster`` the URL names any node of a Redis Cluster. Otherwise calls share a
        blocking pool of ``max_connections``: under a burst they wait for a free connection
        instead of failing with "too many connections", which would look like an outage
        and trip the fail mode. The wait has no timer of its own (arming one cost ~10 % of
        the event loop's time in the benchmark): a connection frees up within ``timeout``,
        the socket timeout of the call holding it.
        """
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if cluster:
            return cls(RedisCluster.from_url(url, **options), prefix=prefix)
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, **options
        )
        return cls(Redis.from_pool(pool), prefix=prefix, link=_script_link(pool, timeout))

    @property
    def client(self) -> RedisClient:
        """The underlying client (health checks, tests); budget calls go through the store."""
        return self._client

    def key(self, logical_key: str) -> str:
        """The Redis key of a logical counter key."""
        return self._tag + logical_key

    async def reserve(self, counters: Sequence[Counter]) -> ReserveResult:
        check_counters(counters)
        if not counters:
            return ReserveResult(True, ())
        return await self._reserves(tuple(counters))

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        if not deltas:
            return AdjustResult(())
        return await self._adjusts((token, tuple(deltas)))

    async def _send_reserves(self, batch: list[tuple[Counter, ...]]) -> list[ReserveResult]:
        keys: list[str] = []
        args: list[int] = []
        for counters in batch:
            keys += [self._tag + c.key for c in counters]
            args.append(len(counters))
            for c in counters:
                args += (c.limit, c.amount, c.expires_at + self._slack)
        reply = [int(v) for v in await self._run(self._reserve, keys, args)]
        results: list[ReserveResult] = []
        at = 0
        for counters in batch:
            failed, values = reply[at], tuple(reply[at + 1 : at + 1 + len(counters)])
            at += 1 + len(counters)
            if failed == 0:
                results.append(ReserveResult(True, values))
            else:
                results.append(ReserveResult(False, values, failed - 1, counters[failed - 1].key))
        return results

    async def _send_adjusts(
        self, batch: list[tuple[str | None, tuple[Delta, ...]]]
    ) -> list[AdjustResult]:
        keys: list[str] = []
        args: list[int | str] = [TOKEN_TTL_SECONDS]
        for token, deltas in batch:
            if token:
                keys.append(self._token_prefix + token)
            else:  # never touched; a counter key keeps the call on one slot
                keys.append(self._tag + deltas[0].key)
            keys += [self._tag + d.key for d in deltas]
            args += ["1" if token else "0", len(deltas)]
            for d in deltas:
                args += (d.amount, d.expires_at + self._slack)
        reply = [int(v) for v in await self._run(self._adjust, keys, args)]
        results: list[AdjustResult] = []
        at = 0
        for _, deltas in batch:
            applied, values = reply[at] == 1, tuple(reply[at + 1 : at + 1 + len(deltas)])
            results.append(AdjustResult(values, applied))
            at += 1 + len(deltas)
        return results

    async def read(self, keys: Sequence[str]) -> tuple[int, ...]:
        if not keys:
            return ()
        reply = await self._call(self._client.mget([self._tag + k for k in keys]))
        return tuple(0 if v is None else int(v) for v in reply)

    async def ping(self) -> None:
        """A keyed command, so that on a cluster it asks the node holding the budgets'
        slot (PING would ask whichever node the client defaults to: health and recovery
        then followed an unrelated shard)."""
        await self._call(self._client.exists(self._tag + "probe"))

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
        with contextlib.suppress(*BACKEND_ERRORS):
            await self._client.aclose()

    async def _run(self, script: AsyncScript, keys: list[str], args: Sequence[int | str]) -> Any:
        """One budget script: over the pipelined link when there is one, else redis-py,
        by its hash and, if the server has not got it (restarted, failed over), by its
        source: both go to the node holding the keys. (redis-py's own fallback loads the
        script on every primary of a cluster first, so one unrelated shard down kept the
        budgets down.)"""
        source = cast(str, script.script)  # our str source
        if self._link is not None:
            return await self._link.run(source, keys, args)
        try:
            return await self._call(self._client.evalsha(script.sha, len(keys), *keys, *args))
        except NoScriptError:
            return await self._call(self._client.eval(source, len(keys), *keys, *args))

    @staticmethod
    async def _call(pending: Awaitable[Any]) -> Any:
        """``pending``'s reply; a failure of the server or the connection as the store's
        :class:`StoreUnavailable`. NOSCRIPT, which only EVALSHA answers, is raised as it
        is, for :meth:`_run` to send the script in full."""
        try:
            return await pending
        except NoScriptError:
            raise
        except BACKEND_ERRORS as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}: {error}") from error


def _script_link(pool: BlockingConnectionPool, timeout: float) -> ScriptLink | None:
    """A :class:`ScriptLink` to the pool's server, for plain TCP and Unix sockets (TLS and
    anything else stays with redis-py)."""
    settings = pool.connection_kwargs
    if pool.connection_class is Connection:
        where: dict[str, Any] = {"host": settings["host"], "port": int(settings["port"])}
    elif pool.connection_class is UnixDomainSocketConnection:
        where = {"path": settings["path"]}
    else:
        return None
    address = Address(
        **where,
        db=int(settings.get("db") or 0),
        username=settings.get("username"),
        password=settings.get("password"),
    )
    return ScriptLink(address, timeout)
