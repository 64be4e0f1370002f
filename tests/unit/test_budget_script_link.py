"""The pipelined script link: against the real Redis, and against servers that misbehave."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import hiredis
import pytest
from redis.asyncio import Redis

from extproc.budgets.redis_store import RedisStore
from extproc.budgets.script_link import Address, ScriptLink, pack
from extproc.budgets.store import StoreUnavailable
from tests.unit.test_budget_stores import REDIS_URL, until

ECHO = "return {KEYS[1], ARGV[1]}"


def test_commands_are_written_as_resp_bulk_strings() -> None:
    assert pack(("EVALSHA", "ab", 1, b"k\r\n")) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n"
    )


@pytest.fixture
async def link() -> AsyncIterator[ScriptLink]:
    store = RedisStore.from_url(REDIS_URL, prefix=f"test-{uuid.uuid4().hex[:8]}")
    try:
        await store.ping()
    except StoreUnavailable:
        pytest.fail(f"no Redis at {REDIS_URL}")
    assert store._link is not None, "a plain redis:// URL gets the script link"
    yield store._link
    await store.close()


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    link: ScriptLink,
) -> None:
    await link.run(ECHO, ["first"], [0])
    connection = link._protocol
    replies = await asyncio.gather(*(link.run(ECHO, [f"k{i}"], [i]) for i in range(200)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
    assert connection is not None and link._protocol is connection


async def test_a_flushed_script_is_sent_again(link: ScriptLink) -> None:
    assert await link.run(ECHO, ["a"], [1]) == [b"a", b"1"]
    async with Redis.from_url(REDIS_URL) as admin:
        await admin.script_flush()
    assert await link.run(ECHO, ["b"], [2]) == [b"b", b"2"]


async def test_an_error_reply_fails_that_call_only(link: ScriptLink) -> None:
    with pytest.raises(StoreUnavailable, match="redis: "):
        await link.run("return redis.call('INCRBY', KEYS[1], 'x')", ["k"], [])
    assert await link.run(ECHO, ["c"], [3]) == [b"c", b"3"]


async def test_the_database_of_the_url_is_selected() -> None:
    key = f"test-db-{uuid.uuid4().hex[:8]}"
    url = f"{REDIS_URL.rsplit('/', 1)[0]}/15" if REDIS_URL.count("/") > 2 else f"{REDIS_URL}/15"
    store = RedisStore.from_url(url, prefix="test-db")
    assert store._link is not None
    await store._link.run("return redis.call('SET', KEYS[1], '1')", [key], [])
    await store.close()
    async with Redis.from_url(url) as db15:
        assert await db15.get(key) == b"1"
        await db15.delete(key)


class FakeRedis:
    """Records every command; answers ``:7``, ``:8``, … in order, except on the connections
    it is told to ignore (numbered from 0), after ``delay`` seconds for the first command,
    and AUTH and SELECT after ``login_delay`` seconds each."""

    def __init__(self, silent: set[int], delay: float = 0.0, login_delay: float = 0.0) -> None:
        self.silent = silent
        self.delay = delay
        self.login_delay = login_delay
        self.answered = 7
        self.connections: list[list[list[bytes]]] = []
        self.closed = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        commands: list[list[bytes]] = []
        number = len(self.connections)
        self.connections.append(commands)
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                commands.append(command)
                if number in self.silent:
                    continue
                if command[0] in (b"AUTH", b"SELECT"):
                    await asyncio.sleep(self.login_delay)
                    writer.write(b"+OK\r\n")
                    continue
                delay, self.delay = self.delay, 0.0
                if delay:
                    await asyncio.sleep(delay)
                writer.write(b":%d\r\n" % self.answered)
                self.answered += 1
        writer.close()
        self.closed += 1


async def serve(fake: FakeRedis) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_silent_server_times_out_and_the_next_call_reconnects() -> None:
    fake = FakeRedis(silent={0})
    server, port = await serve(fake)
    link = ScriptLink(Address(host="127.0.0.1", port=port), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no reply"):
        await link.run(ECHO, ["k"], [1])
    assert time.monotonic() - started < 1.0
    assert await link.run(ECHO, ["k"], [1]) == 7
    assert len(fake.connections) == 2
    await link.close()
    server.close()


async def test_a_slow_reply_fails_only_its_own_call() -> None:
    """Calls queued behind a slow one still get their replies; new calls reconnect."""
    fake = FakeRedis(silent=set(), delay=0.6)
    server, port = await serve(fake)
    link = ScriptLink(Address(host="127.0.0.1", port=port), timeout=0.5)
    slow = asyncio.ensure_future(link.run(ECHO, ["a"], [1]))
    await asyncio.sleep(0.3)
    queued = asyncio.ensure_future(link.run(ECHO, ["b"], [2]))  # deadline at 0.8 s
    with pytest.raises(StoreUnavailable, match="no reply"):
        await slow
    assert await link.run(ECHO, ["c"], [3]) == 7  # a fresh connection, served at once
    assert await queued == 9  # its reply came, in order, after the slow one's (8)
    assert len(fake.connections) == 2
    await link.close()
    server.close()


async def test_calls_waiting_for_a_connection_share_one_attempt() -> None:
    """A server that accepts and never answers AUTH (a stalled Redis with a password): the
    calls made while the connection is opened fail with that one attempt, each within
    its own timeout. (Each making an attempt of its own in turn, one request every 30 ms
    waited 0.25, 0.47, 0.70 ... 2 s: past Envoy's wait, before the fail mode took over.)"""
    fake = FakeRedis(silent={0, 1})
    server, port = await serve(fake)
    link = ScriptLink(Address(host="127.0.0.1", port=port, password="pw"), timeout=0.3)

    async def call(after: float) -> float:
        await asyncio.sleep(after)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await link.run(ECHO, ["k"], [1])
        return time.monotonic() - started

    waited = await asyncio.gather(*(call(0.03 * i) for i in range(5)), call(0.0))
    assert max(waited) < 0.3 + 0.15
    assert len(fake.connections) == 1
    await link.close()
    server.close()


async def test_a_call_fails_within_its_timeout_however_its_time_is_spent() -> None:
    """Connecting, AUTH, SELECT and the script's reply, each within the timeout, once
    added up to a call of three timeouts: a slower Redis counts as down."""
    fake = FakeRedis(silent=set(), login_delay=0.2)
    server, port = await serve(fake)
    link = ScriptLink(Address(host="127.0.0.1", port=port, db=3, password="pw"), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no reply"):
        await link.run(ECHO, ["k"], [1])
    assert time.monotonic() - started < 0.3 + 0.15
    await link.close()
    await until(lambda: fake.closed == 1)  # its SELECT answered to a closed connection
    server.close()


async def test_credentials_and_database_are_sent_before_the_first_script() -> None:
    fake = FakeRedis(silent=set())
    server, port = await serve(fake)
    address = Address(host="127.0.0.1", port=port, db=3, username="gw", password="s3cret")
    link = ScriptLink(address, timeout=1.0)
    assert await link.run(ECHO, ["k"], [1]) == 7
    [commands] = fake.connections
    assert commands[0] == [b"AUTH", b"gw", b"s3cret"]
    assert commands[1] == [b"SELECT", b"3"]
    assert commands[2][0] == b"EVALSHA"
    await link.close()
    server.close()


async def test_a_refused_connection_is_store_unavailable() -> None:
    server, port = await serve(FakeRedis(silent=set()))
    server.close()
    await server.wait_closed()
    link = ScriptLink(Address(host="127.0.0.1", port=port), timeout=0.5)
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await link.run(ECHO, ["k"], [1])


def test_tls_and_cluster_urls_stay_with_redis_py() -> None:
    assert RedisStore.from_url("rediss://127.0.0.1:6380/0")._link is None
    assert RedisStore.from_url("unix:///tmp/redis.sock?db=2")._link is not None
