"""A mock LLM provider that echoes prompts back: the upstream for tests and benchmarks.

It speaks OpenAI (chat completions, completions, embeddings, responses, models) and Anthropic
(messages), streaming included, and answers with the last user message's text so a test can
see exactly what reached the provider through the gateway. Token counts follow the documented
rule in :mod:`.tokens`; request headers drive latency and failures (:mod:`.controls`);
``GET /_mock/requests`` shows what arrived (:mod:`.recorder`).

Public surface: :func:`build_app` (an aiohttp app, for in-process tests) and :func:`run`
(the ``extproc mock-upstream`` command).
"""

from .server import build_app, run

__all__ = ["build_app", "run"]
