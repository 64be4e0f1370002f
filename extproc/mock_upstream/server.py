"""The mock LLM upstream as an aiohttp app: the route table, and running it.

One line per endpoint in :func:`build_app` (the registry); every piece of behaviour lives in
the module that route points to. All state (the request record, the id counter) hangs on the
app object, so two apps in one process - say, two upstreams in a failover test - never share
anything, and importing this package changes nothing.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import anthropic_api, embeddings, openai_api, responses_api
from .controls import MOCK_NAME, controls_middleware, provider_headers
from .ids import ID_COUNTER, new_counter
from .recorder import DEFAULT_LIMIT, RECORDER, Recorder
from .replies import json_response

# Generous: benchmark prompts can be large, and a 413 from the mock would be mistaken for the
# gateway's own body limit.
DEFAULT_MAX_BODY = 64 * 1024 * 1024


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _recorded(request: web.Request) -> web.Response:
    return json_response(request.app[RECORDER].as_json())


async def _clear_recorded(request: web.Request) -> web.Response:
    request.app[RECORDER].clear()
    return web.Response(status=204)


def build_app(
    *, record_limit: int = DEFAULT_LIMIT, max_body: int = DEFAULT_MAX_BODY, name: str = "mock"
) -> web.Application:
    """A fresh mock upstream app, recording the last ``record_limit`` API requests."""
    app = web.Application(middlewares=[controls_middleware], client_max_size=max_body)
    app.on_response_prepare.append(provider_headers)
    app[RECORDER] = Recorder(record_limit)
    app[ID_COUNTER] = new_counter()
    app[MOCK_NAME] = name
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/embeddings", embeddings.embeddings)
    app.router.add_post("/v1/responses", responses_api.responses)
    app.router.add_get("/v1/models", openai_api.models)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_get("/_mock/requests", _recorded)
    app.router.add_delete("/_mock/requests", _clear_recorded)
    app.router.add_get("/healthz", _healthz)
    return app


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (a project dependency; ~2x the throughput), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(host: str, port: int, name: str = "mock") -> None:
    """Serve the mock on ``host:port`` until interrupted (Ctrl-C / SIGTERM).

    No access log (it would cost more than answering), a deep accept backlog for benchmark
    concurrency, and a short shutdown grace so Ctrl-C in ``make up`` is quick.
    """
    web.run_app(
        build_app(name=name),
        host=host,
        port=port,
        access_log=None,
        backlog=4096,
        shutdown_timeout=1.0,
        loop=_event_loop(),
        print=lambda _: print(
            f"mock upstream {name!r} listening on http://{host}:{port}", flush=True
        ),
    )
