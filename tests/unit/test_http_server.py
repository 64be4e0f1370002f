"""The HTTP/1.1 server under the authorizer and the admin port, over a real socket, with
a handler that echoes what it was asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from extproc import http_server
from extproc.http_server import Request, Write, frame
from tests.unit.http_client import read_answers

UNREADABLE = frame(400, (), b"unreadable")
FAILED = frame(500, (), b"failed")
LIMIT = 4096
BIG = 256 * 1024
"""The size of the answer to ``/big...``."""


class Echo:
    """Answers each request with its method, path and body size; ``/raise`` raises,
    ``/slow`` waits for ``release``."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: Request, write: Write) -> None:
        path = request.headers[":path"]
        self.seen.append(path)
        if path == "/raise":
            raise RuntimeError("handler bug")
        if path == "/answer-then-raise":
            write(frame(200, (), b"answered"))
            raise RuntimeError("handler bug after its answer")
        if path == "/slow":
            self.entered.set()
            await self.release.wait()
        if path == "/headers":
            write(frame(200, (), orjson.dumps(request.headers)))
            return
        if path.startswith("/big"):
            write(frame(200, (), b"x" * BIG))
            return
        body = orjson.dumps(
            {
                "method": request.headers[":method"],
                "path": path,
                "bytes": sum(map(len, request.body)),
            }
        )
        write(frame(200, (), body))


Served = tuple[http_server.Server, Echo]


async def serve(idle_seconds: float | None = None, request_seconds: float = 60.0) -> Served:
    echo = Echo()
    server = http_server.Server(
        echo,
        unreadable=UNREADABLE,
        failed=FAILED,
        max_request_bytes=LIMIT,
        idle_seconds=idle_seconds,
        request_seconds=request_seconds,
    )
    await server.start("127.0.0.1", 0, reuse_port=False)
    return server, echo


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server, echo = await serve()
    yield server, echo
    server.close()


def request(path: str, method: str = "GET", body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def exchange(port: int, data: bytes) -> bytes:
    """Everything the server sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_pipelined_requests_under_the_limit_each_are_all_answered_in_order(
    served: Served,
) -> None:
    """The limit is per request, not per read: three requests of 3 KB sent at once."""
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = b"x" * 3000
    writer.write(b"".join(request(f"/{i}", "POST", body) for i in range(3)))
    answers = await read_answers(reader, 3)
    writer.close()
    assert [orjson.loads(a[2]) for a in answers] == [
        {"method": "POST", "path": f"/{i}", "bytes": 3000} for i in range(3)
    ]


async def test_an_unreadable_request_is_answered_after_the_ones_before_it(
    served: Served,
) -> None:
    server, echo = served
    data = await exchange(server.port, request("/first") + b"NOT HTTP\r\n\r\n")
    first, rest = data.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert rest.startswith(b'{"method":"GET","path":"/first","bytes":0}HTTP/1.1 400 Bad Request')
    assert b"connection: close" in rest and rest.endswith(b"unreadable")
    assert echo.seen == ["/first"]


async def test_a_request_over_the_limit_is_unreadable(served: Served) -> None:
    server, echo = served
    data = await exchange(server.port, request("/big", "POST", b"x" * (LIMIT + 1)))
    assert data.startswith(b"HTTP/1.1 400 Bad Request") and data.endswith(b"unreadable")
    assert echo.seen == []


async def test_an_upgrade_is_unreadable_and_never_reaches_the_handler(served: Served) -> None:
    server, echo = served
    upgrade = request("/ws", extra="connection: upgrade\r\nupgrade: websocket\r\n")
    data = await exchange(server.port, upgrade)
    assert data.startswith(b"HTTP/1.1 400 Bad Request")
    assert echo.seen == []


async def test_a_handler_that_raises_gets_the_failed_answer_and_the_connection_closes(
    served: Served,
) -> None:
    server, echo = served
    data = await exchange(server.port, request("/raise") + request("/never"))
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"connection: close" in data and data.endswith(b"failed")
    assert echo.seen == ["/raise"]  # the queued request is dropped with the connection
    # The server itself keeps serving.
    assert b'"path":"/next"' in await exchange(
        server.port, request("/next", extra="connection: close\r\n")
    )


async def test_a_handler_that_raises_after_answering_is_not_answered_twice(
    served: Served,
) -> None:
    server, _ = served
    data = await exchange(server.port, request("/answer-then-raise") + request("/never"))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"answered")
    assert data.count(b"HTTP/1.1") == 1


async def test_a_pipelining_client_past_the_queue_limit_is_still_answered_in_order(
    served: Served,
) -> None:
    """Reading pauses while http_server.MAX_QUEUED requests wait, and resumes: 600 KB
    of requests take several reads."""
    server, echo = served
    count = 200
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"".join(request(f"/{i}", "POST", b"x" * 3000) for i in range(count)))
    answers = await asyncio.wait_for(read_answers(reader, count), 10)
    writer.close()
    assert [orjson.loads(body)["path"] for _, _, body in answers] == [f"/{i}" for i in range(count)]
    assert echo.seen == [f"/{i}" for i in range(count)]


async def test_head_answers_carry_no_body(served: Served) -> None:
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/h", "HEAD") + request("/g"))
    head = await reader.readuntil(b"\r\n\r\n")
    body = orjson.dumps({"method": "HEAD", "path": "/h", "bytes": 0})
    assert f"content-length: {len(body)}\r\n".encode() in head  # the body it would have
    [(status, _, body)] = await read_answers(reader, 1)
    writer.close()
    assert status == 200 and orjson.loads(body)["path"] == "/g"


async def test_the_last_answer_before_closing_says_so(served: Served) -> None:
    """On "connection: close" and at shutdown, the answer announces the close, so a
    client's pool does not send another request on the connection."""
    server, echo = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/bye", extra="connection: close\r\n"))
    [(status, headers, body)] = await read_answers(reader, 1)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
    writer.close()
    assert status == 200 and headers["connection"] == "close"
    assert orjson.loads(body)["path"] == "/bye"  # framed whole

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/slow"))
    await asyncio.wait_for(echo.entered.wait(), 5)
    server.close()
    echo.release.set()
    [(status, headers, body)] = await read_answers(reader, 1)
    writer.close()
    assert status == 200 and headers["connection"] == "close"
    assert orjson.loads(body)["path"] == "/slow"


async def test_an_idle_connection_is_closed_after_idle_seconds() -> None:
    server, _ = await serve(idle_seconds=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request("/once"))
        await read_answers(reader, 1)
        writer.write(b"GET /half")  # never finished
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        server.close()


async def test_shutdown_can_wait_for_the_answers_in_progress(served: Served) -> None:
    """Shutdown closes what handlers read (the budget store) only after their answers:
    ``answered`` returns once the request in progress is answered, or says it was not."""
    server, echo = served
    assert await server.answered(0.1)  # nothing in progress
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/slow"))
    await asyncio.wait_for(echo.entered.wait(), 5)
    server.close()
    assert not await server.answered(0.05)  # still waiting for its release
    waiting = asyncio.create_task(server.answered(5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    echo.release.set()
    assert await waiting
    [(status, _, body)] = await read_answers(reader, 1)
    writer.close()
    assert status == 200 and orjson.loads(body)["path"] == "/slow"


async def test_shutdown_waits_for_an_answer_whose_client_has_gone(served: Served) -> None:
    """A probe whose client timed out is still running its handler (reading the store):
    ``answered`` waits for it too, though its connection is gone."""
    server, echo = served
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/slow"))
    await asyncio.wait_for(echo.entered.wait(), 5)
    writer.close()
    await asyncio.sleep(0.05)  # the server has seen the connection go
    server.close()
    assert not await server.answered(0.05)
    echo.release.set()
    assert await server.answered(5)


@pytest.mark.parametrize("sent", ["head", "head-and-part-of-the-body"])
async def test_shutdown_reads_and_answers_a_request_still_arriving(
    served: Served, sent: str
) -> None:
    """A request partly received when shutdown begins was sent before it: it is busy
    (shutdown waits for it), read to its end and answered, and the connection then
    closes; what the client sends after it is not read."""
    server, echo = served
    data = request("/arriving", "POST", b"x" * 3000) + request("/after")
    split = data.index(b"\r\n\r\n") + (4 if sent == "head-and-part-of-the-body" else -10)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data[:split])
    await asyncio.sleep(0.05)  # read by the server
    server.close()
    await asyncio.sleep(0.05)
    assert server.busy == 1 and echo.seen == []
    writer.write(data[split:])
    [(status, headers, body)] = await read_answers(reader, 1)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
    writer.close()
    assert status == 200 and headers["connection"] == "close"
    assert orjson.loads(body) == {"method": "POST", "path": "/arriving", "bytes": 3000}
    assert echo.seen == ["/arriving"] and await server.answered(5) and server.busy == 0


async def test_shutdown_closes_a_connection_between_requests_at_once(served: Served) -> None:
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/once"))
    await read_answers(reader, 1)
    server.close()
    assert server.busy == 0
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_an_unreadable_request_is_not_still_arriving(served: Served) -> None:
    """Once it is answered as unreadable, it no longer keeps shutdown waiting."""
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/big", "POST", b"x" * (LIMIT + 1))[: LIMIT + 100])
    [(status, _, _)] = await read_answers(reader, 1)
    assert status == 400 and await server.answered(5)
    assert server.busy == 0
    writer.close()


async def test_answers_a_client_does_not_read_are_not_piled_up(served: Served) -> None:
    """A client pipelining requests and reading none of the answers: once the socket's
    buffers are full the server answers nothing more until it reads (it had kept every
    answer, hundreds of megabytes for a few kilobytes of requests); then all come, in
    order."""
    server, echo = served
    count = 200  # 50 MB of answers: far more than the sockets' buffers hold
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=2 * BIG)
    writer.write(b"".join(request(f"/big{i}") for i in range(count)))
    await asyncio.sleep(0.5)
    assert len(echo.seen) < count // 2
    answers = await asyncio.wait_for(read_answers(reader, count), 20)
    writer.close()
    assert [len(body) for _, _, body in answers] == [BIG] * count
    assert echo.seen == [f"/big{i}" for i in range(count)]


async def test_a_client_that_half_closes_still_gets_its_answer(served: Served) -> None:
    """``printf 'GET /healthz ...' | nc -N``: the request, then the client's end of the
    connection; the answer comes even though the handler waits before it answers."""
    server, echo = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/slow"))
    writer.write_eof()
    await asyncio.wait_for(echo.entered.wait(), 5)
    echo.release.set()
    [(status, headers, body)] = await asyncio.wait_for(read_answers(reader, 1), 5)
    assert status == 200 and orjson.loads(body)["path"] == "/slow"
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_chunked_bodys_trailers_are_not_request_headers(served: Served) -> None:
    """A trailer named as a header (authorization) must not replace the request's own."""
    server, _ = served
    data = (
        b"POST /headers HTTP/1.1\r\nhost: t\r\nauthorization: Bearer real\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nauthorization: Bearer from-trailer\r\nx-extra: 1\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    [(status, _, body)] = await asyncio.wait_for(read_answers(reader, 1), 5)
    writer.close()
    seen = orjson.loads(body)
    assert status == 200 and seen["authorization"] == "Bearer real"
    assert "x-extra" not in seen


async def test_expect_100_continue_is_answered_before_the_body(served: Served) -> None:
    """curl asks before a body over 1 KB, and waits a second for the answer otherwise."""
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = b"x" * 2000
    writer.write(
        f"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n"
        "expect: 100-continue\r\n\r\n".encode()
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    [(status, _, answer)] = await asyncio.wait_for(read_answers(reader, 1), 5)
    writer.close()
    assert status == 200 and orjson.loads(answer)["bytes"] == len(body)


async def test_a_request_that_never_finishes_arriving_is_dropped() -> None:
    """Half a request, then nothing (the authorizer's port has no idle timeout: Envoy keeps
    its connections): closed once it is older than request_seconds, and no longer in
    flight for a shutdown to wait for."""
    server, _ = await serve(request_seconds=0.4)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request("/whole"))
        await read_answers(reader, 1)
        writer.write(request("/half", "POST", b"x" * 100)[:-50])
        await asyncio.sleep(0.1)
        assert server.busy == 1
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.busy == 0
        writer.close()
    finally:
        server.close()


async def test_a_client_that_reads_nothing_for_request_seconds_is_let_go() -> None:
    """Its answers wait unwritten, and so would a shutdown waiting for them: the
    connection is dropped once it has read nothing for request_seconds."""
    server, echo = await serve(request_seconds=0.5)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"".join(request(f"/big{i}") for i in range(200)))
        await asyncio.sleep(0.2)
        assert server.busy >= 1
        for _ in range(100):
            if server.busy == 0:
                break
            await asyncio.sleep(0.05)
        assert server.busy == 0 and len(echo.seen) < 200
        writer.close()
    finally:
        server.close()


async def test_shutdown_waits_for_a_request_still_arriving_no_longer_than_request_seconds() -> None:
    server, _ = await serve(request_seconds=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("/half", "POST", b"x" * 100)[:-50])
    await asyncio.sleep(0.1)
    server.close()
    assert server.busy == 1  # in flight: read to its end if it comes
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert server.busy == 0
    writer.close()


async def test_100_continue_is_not_sent_ahead_of_earlier_answers(served: Served) -> None:
    server, echo = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = b"x" * 10
    writer.write(
        request("/slow")
        + f"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n"
        "expect: 100-continue\r\n\r\n".encode()
        + body
    )
    await asyncio.wait_for(echo.entered.wait(), 5)
    echo.release.set()
    [(first, _, slow), (second, _, up)] = await asyncio.wait_for(read_answers(reader, 2), 5)
    writer.close()
    assert (first, orjson.loads(slow)["path"]) == (200, "/slow")
    assert (second, orjson.loads(up)["path"]) == (200, "/up")
