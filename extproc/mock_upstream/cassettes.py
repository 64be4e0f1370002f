"""Replaying real recorded provider answers (go-vcr cassettes) instead of echoing.

``x-mock-cassette: chat-streaming`` makes the mock answer with the first recorded response
of ``<cassette dir>/chat-streaming.yaml`` byte for byte, status and content type included,
so tests can push real provider traffic (real usage blocks, real SSE framing) through the
gateway. The directory comes from ``EXTPROC_MOCK_CASSETTES`` and defaults to the shared
data sets beside the project.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import yaml
from aiohttp import web

from .errors import MockError

CASSETTE_HEADER = "x-mock-cassette"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")
_DEFAULT_DIR = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cassettes" / "openai"
)


def cassette_dir() -> Path:
    return Path(os.environ.get("EXTPROC_MOCK_CASSETTES", str(_DEFAULT_DIR)))


@lru_cache(maxsize=64)
def _load(path: Path) -> tuple[int, str, bytes]:
    interaction = yaml.safe_load(path.read_text())["interactions"][0]["response"]
    headers = {k.lower(): v for k, v in (interaction.get("headers") or {}).items()}
    content_type = (headers.get("content-type") or ["application/json"])[0]
    return int(interaction["code"]), content_type, interaction["body"].encode()


def replay(request: web.Request) -> web.Response | None:
    """The recorded answer named by the request's cassette header, or ``None`` if unset."""
    name = request.headers.get(CASSETTE_HEADER)
    if name is None:
        return None
    path = cassette_dir() / f"{name}.yaml"
    if not _NAME.match(name) or not path.is_file():
        raise MockError(400, f"{CASSETTE_HEADER}: no cassette named {name!r} in {cassette_dir()}")
    status, content_type, body = _load(path)
    return web.Response(status=status, body=body, headers={"content-type": content_type})
