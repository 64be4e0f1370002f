"""A raw HTTP/1.1 client for the tests of our own servers: bytes in, parsed answers out."""

from __future__ import annotations

import asyncio

Answer = tuple[int, dict[str, str], bytes]


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[Answer]:
    """``count`` answers framed by content-length, in the order they arrive."""
    answers = []
    for _ in range(count):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *lines = head.strip().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        body = await reader.readexactly(int(headers["content-length"]))
        answers.append((int(status_line.split()[1]), headers, body))
    return answers
