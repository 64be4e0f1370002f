"""OpenAI embeddings (``/v1/embeddings``): text in, vectors out, no output tokens."""

from __future__ import annotations

from typing import Any

from extproc.dialects.base import DialectEnvelope, LLMRequest
from extproc.dialects.fields import require_model, text_or_tokens, token_id_count


class OpenAIEmbeddings:
    """Only ``input`` is text; ``dimensions`` and ``encoding_format`` are left to upstream."""

    name: str = "openai.embeddings"
    envelope: DialectEnvelope = "openai"
    output_cap_field: str | None = None
    min_output_cap: int = 1
    asks_stream_usage = False

    def parse(self, body: dict[str, Any]) -> LLMRequest:
        model = require_model(body)
        texts = text_or_tokens(body, "input", "input")
        return LLMRequest(
            dialect=self.name,
            model=model,
            texts=tuple(texts),
            max_output_tokens=0,  # vectors out: nothing to reserve for output
            stream=False,
            tools=(),
            body=body,
            prompt_token_ids=token_id_count(body["input"]),
        )


DIALECT = OpenAIEmbeddings()
